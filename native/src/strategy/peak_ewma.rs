//! peak_ewma: the power of two choices on latency × load, as Linkerd and Finagle balance. Each
//! endpoint keeps a peak-sensitive EWMA of the time to its response headers (a sample above
//! the average replaces it at once; below, it is blended in with weight 1 - e^(-Δt/τ), and
//! with no samples the estimate decays towards 0 with the same τ, so an endpoint avoided while
//! slow is tried again). Two distinct endpoints are drawn with P_i = w_i/Σw; the call goes to
//! the one with the lower ewma × (1 + in_flight / w) (ties: the first drawn), so at equal
//! latency and load per weight the shares are the weights'. A new endpoint starts at
//! `DEFAULT_RTT`, decaying like any estimate until its first sample.

use std::time::Duration;

use super::two_choices::TwoChoices;
use super::Load;

pub const NAME: &str = "peak_ewma";

/// τ of the average: Linkerd's and Finagle's 10 s.
pub const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed of an endpoint never measured (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

pub struct PeakEwma {
    choices: TwoChoices,
}

impl PeakEwma {
    /// `weights` is not empty and holds no 0.
    pub fn new(weights: &[u32]) -> Self {
        PeakEwma {
            choices: TwoChoices::new(weights),
        }
    }

    fn cost(&self, load: &dyn Load, i: usize) -> f64 {
        let per_weight = load.in_flight(i) as f64 / f64::from(self.choices.weight(i));
        load.latency_ns(i) * (1.0 + per_weight)
    }

    #[inline]
    pub fn pick(&self, load: &dyn Load) -> usize {
        self.choices.pick(|i| self.cost(load, i))
    }

    pub fn explain(&self, load: &dyn Load) -> (usize, String) {
        self.choices.explain(
            NAME,
            load,
            |i| self.cost(load, i),
            |i| {
                format!(
                    "{:.1} ms, {} in flight",
                    load.latency_ns(i) / 1e6,
                    load.in_flight(i)
                )
            },
        )
    }
}

/// A peak-sensitive, time-decayed EWMA of latencies, updated lock-free by every thread (a
/// sample that races another may be lost, which an average can afford).
pub struct Ewma {
    /// f64 nanoseconds.
    value: std::sync::atomic::AtomicU64,
    /// When `value` was last set, in ns since `epoch()`.
    at: std::sync::atomic::AtomicU64,
}

impl Default for Ewma {
    /// `DEFAULT_RTT`, from now.
    fn default() -> Self {
        Ewma {
            value: (DEFAULT_RTT.as_nanos() as f64).to_bits().into(),
            at: now_ns().into(),
        }
    }
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

fn decay(dt_ns: u64) -> f64 {
    (-(dt_ns as f64) / DECAY.as_nanos() as f64).exp()
}

impl Ewma {
    /// Records one latency.
    pub fn observe(&self, sample: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_ns();
        let sample = sample.as_nanos() as f64;
        let w = decay(now.saturating_sub(self.at.load(Relaxed)));
        // The estimate now is value × w; a sample adds its (1 - w) part.
        let decayed = f64::from_bits(self.value.load(Relaxed)) * w;
        let next = if sample > decayed {
            sample
        } else {
            decayed + sample * (1.0 - w)
        };
        self.value.store(next.to_bits(), Relaxed);
        self.at.store(now, Relaxed);
    }

    fn decayed(&self, now: u64) -> f64 {
        use std::sync::atomic::Ordering::Relaxed;
        let value = f64::from_bits(self.value.load(Relaxed));
        value * decay(now.saturating_sub(self.at.load(Relaxed)))
    }

    /// The estimate now (decayed since the last sample), in ns.
    pub fn estimate_ns(&self) -> f64 {
        self.decayed(now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{share_of_first, Fixed};
    use super::*;

    #[test]
    fn equal_latency_and_load_follow_the_weights() {
        let p = PeakEwma::new(&[3, 1]);
        let load = Fixed::new(&[0, 0], &[2e6, 2e6]);
        let first = share_of_first(|| p.pick(&load));
        assert!((first - 0.75).abs() < 0.02, "{first}");
    }

    #[test]
    fn a_slower_endpoint_loses_at_equal_load() {
        let p = PeakEwma::new(&[1, 1]);
        let load = Fixed::new(&[0, 0], &[5e6, 1e6]);
        assert!((0..1000).all(|_| p.pick(&load) == 1));
        // …until the fast one carries five calls more.
        let load = Fixed::new(&[0, 5], &[5e6, 1e6]);
        let (i, why) = p.explain(&load);
        assert_eq!(i, 0, "{why}");
        assert_eq!(
            why,
            "peak_ewma: 10.0.0.0:1 (5.0 ms, 0 in flight) over 10.0.0.1:1 (1.0 ms, 5 in flight)"
        );
    }

    #[test]
    fn the_average_jumps_to_peaks_and_decays_slowly() {
        let e = Ewma::default();
        let start = e.estimate_ns();
        assert!(
            start <= DEFAULT_RTT.as_nanos() as f64 && start > 29e6,
            "{start}"
        );
        e.observe(Duration::from_millis(2)); // below: blended in, barely at once
        assert!(e.estimate_ns() > 29e6);
        e.observe(Duration::from_millis(80)); // a peak replaces it
        let peak = e.estimate_ns();
        assert!((79.9e6..=80.0e6).contains(&peak), "{peak}");
    }

    #[test]
    fn without_samples_the_estimate_decays_by_tau() {
        let e = Ewma::default();
        e.at.store(0, std::sync::atomic::Ordering::Relaxed); // as if set long ago
        let now = DECAY.as_nanos() as u64;
        let ratio = e.decayed(now) / DEFAULT_RTT.as_nanos() as f64;
        assert!((ratio - (-1f64).exp()).abs() < 1e-9, "{ratio}");
    }
}
