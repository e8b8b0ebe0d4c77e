//! Slow start, for every strategy: an endpoint new to a Service, or whose weight went up,
//! takes a growing part of its share over a window instead of all of it at once (a cold JVM,
//! an empty cache). The strategy picks as always; a pick of a ramping endpoint is kept with
//! probability `admitted` and otherwise picked again, so a weighted strategy gives it
//! w_i × admitted of the weight, and a rotation skips its turn that often.
//!
//! admitted = from + (1 − from) × max(min, (elapsed / window)^(1 / aggression)), where `from`
//! is 0 for a new endpoint and old/new for a weight increase, as Envoy's slow start curve
//! (aggression 1: linear; above 1, faster at first).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A Service's slow start (`weighbridge.io/slow-start`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    pub aggression: f64,
    /// The least part admitted, as a fraction.
    pub min: f64,
}

/// (window s, aggression, min weight percent)
pub type SlowStartArg = (f64, f64, u32);

impl SlowStart {
    pub fn from_arg((window, aggression, min_percent): SlowStartArg) -> Result<Self, String> {
        let window = Duration::try_from_secs_f64(window)
            .ok()
            .filter(|w| !w.is_zero())
            .ok_or("slow start: the window must be a number of seconds > 0")?;
        if !(aggression.is_finite() && aggression > 0.0) || min_percent > 100 {
            return Err("slow start: aggression > 0 and min weight 0-100%".into());
        }
        Ok(SlowStart {
            window,
            aggression,
            min: f64::from(min_percent) / 100.0,
        })
    }

    /// The part admitted `elapsed` into a ramp that starts `from`.
    pub fn admitted(&self, elapsed: Duration, from: f64) -> f64 {
        if elapsed >= self.window {
            return 1.0;
        }
        let t = elapsed.as_secs_f64() / self.window.as_secs_f64();
        from + (1.0 - from) * t.powf(1.0 / self.aggression).max(self.min)
    }
}

const NONE: u64 = u64::MAX;

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// One endpoint's ramp within one Service; it outlives set updates.
pub struct Ramp {
    /// When it began, in ns since the epoch; `NONE` when not ramping.
    began: AtomicU64,
    /// f64 bits of the part admitted at its start.
    from: AtomicU64,
}

impl Default for Ramp {
    fn default() -> Self {
        Ramp {
            began: AtomicU64::new(NONE),
            from: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl Ramp {
    /// Starts (or restarts) a ramp now, from this part of the (new) weight.
    pub fn begin(&self, from: f64) {
        self.from.store(from.clamp(0.0, 1.0).to_bits(), Relaxed);
        self.began.store(now_ns(), Relaxed);
    }

    /// The part of its share the endpoint takes now under `policy`; 1 when not ramping (one
    /// atomic load, no clock read).
    #[inline]
    pub fn admitted(&self, policy: &SlowStart) -> f64 {
        let began = self.began.load(Relaxed);
        if began == NONE {
            return 1.0;
        }
        let elapsed = Duration::from_nanos(now_ns().saturating_sub(began));
        let part = policy.admitted(elapsed, f64::from_bits(self.from.load(Relaxed)));
        if part >= 1.0 {
            self.began.store(NONE, Relaxed); // done: no more clock reads
        }
        part
    }

    pub fn ramping(&self) -> bool {
        self.began.load(Relaxed) != NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_rises_from_its_floor_to_one_over_the_window() {
        let linear = SlowStart::from_arg((10.0, 1.0, 10)).unwrap();
        let s = Duration::from_secs;
        assert_eq!(linear.admitted(s(0), 0.0), 0.1, "the floor");
        assert!((linear.admitted(s(5), 0.0) - 0.5).abs() < 1e-12);
        assert_eq!(linear.admitted(s(10), 0.0), 1.0);
        // Aggression 2: the square root, faster at first.
        let eager = SlowStart::from_arg((10.0, 2.0, 0)).unwrap();
        assert!((eager.admitted(s(1), 0.0) - 0.1f64.sqrt()).abs() < 1e-12);
        // A weight going from 1 to 4 starts at a quarter and rises from there.
        assert!((linear.admitted(s(5), 0.25) - (0.25 + 0.75 * 0.5)).abs() < 1e-12);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(SlowStart::from_arg((0.0, 1.0, 10)).is_err());
        assert!(SlowStart::from_arg((10.0, 0.0, 10)).is_err());
        assert!(SlowStart::from_arg((10.0, 1.0, 101)).is_err());
    }

    #[test]
    fn a_ramp_ends_by_itself() {
        let policy = SlowStart::from_arg((0.001, 1.0, 0)).unwrap();
        let ramp = Ramp::default();
        assert_eq!(ramp.admitted(&policy), 1.0);
        ramp.begin(0.0);
        assert!(ramp.ramping());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(ramp.admitted(&policy), 1.0);
        assert!(!ramp.ramping());
    }
}
