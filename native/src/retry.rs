//! Retries: the transparent kind (a call that never reached a backend is sent again, always)
//! and the configured kind (a Service's `weighbridge.io/retry`: some statuses, a number of
//! tries, a per-try timeout, backoff), held back by a retry budget so that retries never
//! multiply an outage.
//!
//! A configured retry happens only while nothing of the response reached the client (the
//! backend answered Trailers-Only) and the request is still whole in the retry buffer; each
//! retried try carries `grpc-previous-rpc-attempts`, as gRPC's retry design (A6) specifies.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Tries beyond the first for calls that never reached a backend (refused connection, refused
/// stream, unprocessed by GOAWAY). Not budgeted: such a try cost no backend any work.
pub const TRANSPARENT_RETRIES: u32 = 2;

/// The budget's window: calls and retries of the last this many seconds count.
const WINDOW_S: u64 = 10;

/// A Service's configured retries (see docs/annotations.md, `weighbridge.io/retry`).
pub struct RetryPolicy {
    /// Bit n set: status code n is retried.
    codes: u32,
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Time for one try to get its response headers.
    pub per_try_timeout: Option<Duration>,
    backoff_base: Duration,
    backoff_max: Duration,
    budget_ratio: f64,
    budget_per_s: f64,
}

/// What Python hands over: (codes, attempts, per-try timeout s (0 = none), backoff base s,
/// backoff max s, budget ratio, budget retries per second).
pub type RetryArg = (Vec<u32>, u32, f64, f64, f64, f64, f64);

fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("{name} must be a number of seconds ≥ 0"))
}

impl RetryPolicy {
    pub fn from_arg(arg: RetryArg) -> Result<Self, String> {
        let (codes, attempts, per_try, base, max, ratio, per_s) = arg;
        let mut mask = 0u32;
        for code in codes {
            if !(1..=16).contains(&code) {
                return Err(format!("retry: status code {code} is not 1-16"));
            }
            mask |= 1 << code;
        }
        if attempts < 1 {
            return Err("retry: attempts must be at least 1".into());
        }
        if !(ratio.is_finite() && ratio >= 0.0 && per_s.is_finite() && per_s >= 0.0) {
            return Err("retry: the budget must be ≥ 0".into());
        }
        Ok(RetryPolicy {
            codes: mask,
            attempts,
            per_try_timeout: Some(seconds("retry: per-try timeout", per_try)?)
                .filter(|d| !d.is_zero()),
            backoff_base: seconds("retry: backoff", base)?,
            backoff_max: seconds("retry: backoff", max)?,
            budget_ratio: ratio,
            budget_per_s: per_s,
        })
    }

    pub fn retries(&self, code: u32) -> bool {
        code < 32 && self.codes & (1 << code) != 0
    }

    /// The pause before retry `n` (1 for the first): random in [0, min(base × 2^(n-1), max)].
    pub fn backoff(&self, n: u32) -> Duration {
        let ceiling = self
            .backoff_base
            .saturating_mul(1 << (n.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        ceiling.mul_f64(fastrand::f64())
    }

    pub fn describe_budget(&self) -> String {
        format!(
            "{}% of calls + {}/s",
            self.budget_ratio * 100.0,
            self.budget_per_s
        )
    }
}

/// Seconds since the engine's first call, for the budget's window.
pub fn now_s(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_secs()
}

#[derive(Default)]
struct Second {
    second: AtomicU64,
    calls: AtomicU64,
    retries: AtomicU64,
}

/// Retries ≤ ratio × calls + per second × window, over a sliding window of seconds (as
/// Linkerd's and Finagle's budgets). One per Service; lock-free, approximate at the edges of a
/// second when threads race, which a budget can afford.
#[derive(Default)]
pub struct Budget {
    seconds: [Second; WINDOW_S as usize],
}

impl Budget {
    fn second(&self, now: u64) -> &Second {
        let s = &self.seconds[(now % WINDOW_S) as usize];
        let seen = s.second.load(Relaxed);
        if seen != now + 1
            && s.second
                .compare_exchange(seen, now + 1, Relaxed, Relaxed)
                .is_ok()
        {
            s.calls.store(0, Relaxed);
            s.retries.store(0, Relaxed);
        }
        s
    }

    /// A call arrived (only Services with configured retries count them).
    pub fn deposit(&self, now: u64) {
        self.second(now).calls.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget if it has one.
    pub fn withdraw(&self, now: u64, policy: &RetryPolicy) -> bool {
        let current = self.second(now);
        let (mut calls, mut retries) = (0u64, 0u64);
        for s in &self.seconds {
            // Stored as second + 1, so that 0 means never used.
            let at = s.second.load(Relaxed);
            if at != 0 && at + WINDOW_S > now + 1 {
                calls += s.calls.load(Relaxed);
                retries += s.retries.load(Relaxed);
            }
        }
        let allowed = policy.budget_ratio * calls as f64 + policy.budget_per_s * WINDOW_S as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        current.retries.fetch_add(1, Relaxed);
        true
    }
}

/// What a Service's failover did, for `Engine.failover_counters()`.
#[derive(Default)]
pub struct ServiceCounters {
    pub transparent_retries: AtomicU64,
    pub retries: AtomicU64,
    pub budget_exhausted: AtomicU64,
    pub ejections: AtomicU64,
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Calls that asked for debug metadata and got it.
    pub debug_metadata: AtomicU64,
    /// Calls sent to the pod their `x-weighbridge-endpoint` named.
    pub endpoint_overrides: AtomicU64,
}

impl ServiceCounters {
    pub fn snapshot(&self) -> [(&'static str, u64); 8] {
        [
            (
                "transparent_retries",
                self.transparent_retries.load(Relaxed),
            ),
            ("retries", self.retries.load(Relaxed)),
            (
                "retry_budget_exhausted",
                self.budget_exhausted.load(Relaxed),
            ),
            ("ejections", self.ejections.load(Relaxed)),
            ("health_checks_passed", self.checks_passed.load(Relaxed)),
            ("health_checks_failed", self.checks_failed.load(Relaxed)),
            ("debug_metadata", self.debug_metadata.load(Relaxed)),
            ("endpoint_overrides", self.endpoint_overrides.load(Relaxed)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ratio: f64, per_s: f64) -> RetryPolicy {
        RetryPolicy::from_arg((vec![14], 3, 0.0, 0.025, 0.25, ratio, per_s)).unwrap()
    }

    #[test]
    fn codes_and_backoff() {
        let p = policy(0.2, 10.0);
        assert!(p.retries(14));
        assert!(!p.retries(2) && !p.retries(0) && !p.retries(99));
        assert!(p.per_try_timeout.is_none());
        for n in 1..10 {
            let b = p.backoff(n);
            let ceiling =
                Duration::from_millis(25 * (1 << (n - 1))).min(Duration::from_millis(250));
            assert!(b <= ceiling, "{n}: {b:?}");
        }
        assert!(RetryPolicy::from_arg((vec![17], 3, 0.0, 0.0, 0.0, 0.2, 1.0)).is_err());
        assert!(RetryPolicy::from_arg((vec![14], 3, -1.0, 0.0, 0.0, 0.2, 1.0)).is_err());
    }

    #[test]
    fn the_budget_is_a_ratio_of_calls_plus_a_floor() {
        let p = policy(0.2, 0.0);
        let b = Budget::default();
        for _ in 0..100 {
            b.deposit(5);
        }
        let granted = (0..50).filter(|_| b.withdraw(5, &p)).count();
        assert_eq!(granted, 20, "20% of 100 calls");
        // The window slides: ten seconds later those calls no longer count.
        assert!(!b.withdraw(16, &p));

        let floor = policy(0.0, 1.0);
        let b = Budget::default();
        let granted = (0..50).filter(|_| b.withdraw(3, &floor)).count();
        assert_eq!(granted, 10, "1/s over a 10 s window, with no calls at all");
    }
}
