//! Strategies: which endpoint of a Service takes the next call.
//!
//! One small module per strategy, as grpc-go's `balancer/` has. A `Picker` is built from the
//! eligible endpoints' weights when a backend set is applied (all arithmetic happens then) and
//! is immutable apart from its own atomics/locks: every engine thread picks from the same
//! picker, so a rotation stays one strict rotation and smooth WRR stays exact whichever thread
//! a call lands on. `pick` never blocks on I/O and never allocates.
//!
//! Python (dataplane/strategies) validates a set and hands over the strategy name and the
//! weights; the rule of each strategy lives here only.

mod least_request;
mod peak_ewma;
mod random;
mod ring_hash;
mod round_robin;
mod two_choices;
mod weighted_random;
mod weighted_round_robin;

pub use least_request::LeastRequest;
pub use peak_ewma::{Ewma, PeakEwma};
pub use random::Random;
pub use ring_hash::{hash as hash_key, RingHash, NAME as RING_HASH};
pub use round_robin::RoundRobin;
pub use weighted_random::WeightedRandom;
pub use weighted_round_robin::WeightedRoundRobin;

/// The strategies this engine executes, by the names the backend-set contract uses.
pub const NAMES: [&str; 7] = [
    round_robin::NAME,
    random::NAME,
    weighted_round_robin::NAME,
    weighted_random::NAME,
    least_request::NAME,
    peak_ewma::NAME,
    ring_hash::NAME,
];

/// What the load-aware strategies read of endpoint `i` (an index into the set's eligible
/// endpoints) when they pick.
pub trait Load {
    /// Calls in flight to it from this proxy.
    fn in_flight(&self, i: usize) -> u64;
    /// Calls in flight to all of them from this proxy.
    fn total_in_flight(&self) -> u64;
    /// Its latency estimate (peak EWMA of the time to response headers), in ns.
    fn latency_ns(&self, i: usize) -> f64;
    /// HOST:PORT, for explanations.
    fn name(&self, i: usize) -> &str;
    /// Whether it can take calls (not down, ejected or failing health checks).
    fn available(&self, _i: usize) -> bool {
        true
    }
}

pub enum Picker {
    RoundRobin(RoundRobin),
    Random(Random),
    WeightedRoundRobin(WeightedRoundRobin),
    WeightedRandom(WeightedRandom),
    LeastRequest(LeastRequest),
    PeakEwma(PeakEwma),
    RingHash(RingHash),
    /// Every pick fails with this message (a set with no eligible endpoint).
    Fail(String),
}

impl Picker {
    /// The picker of `strategy` over endpoints of `weights` (all > 0), named by `keys`
    /// (HOST:PORT, for ring_hash's points), or `Fail(empty)` when there are none. `start` is
    /// a random draw that sets where rotations begin, so proxies that rebuilt their pickers at
    /// the same moment do not all pick the same endpoint next; `bound` is ring_hash's load
    /// bound.
    pub fn build(
        strategy: &str,
        weights: &[u32],
        keys: &[String],
        start: u64,
        bound: f64,
        empty: String,
    ) -> Result<Self, String> {
        if !NAMES.contains(&strategy) {
            return Err(format!(
                "unknown strategy {strategy:?} (this engine knows {})",
                NAMES.join(", ")
            ));
        }
        if let Some(i) = weights.iter().position(|&w| w == 0) {
            return Err(format!(
                "endpoint {i} has weight 0: only eligible endpoints are picked"
            ));
        }
        if weights.is_empty() {
            return Ok(Picker::Fail(empty));
        }
        Ok(match strategy {
            round_robin::NAME => Picker::RoundRobin(RoundRobin::new(weights.len(), start)),
            random::NAME => Picker::Random(Random::new(weights.len())),
            weighted_round_robin::NAME => {
                Picker::WeightedRoundRobin(WeightedRoundRobin::new(weights, start))
            }
            least_request::NAME => Picker::LeastRequest(LeastRequest::new(weights)),
            peak_ewma::NAME => Picker::PeakEwma(PeakEwma::new(weights)),
            ring_hash::NAME => Picker::RingHash(RingHash::new(keys, weights, bound)),
            _ => Picker::WeightedRandom(WeightedRandom::new(weights)),
        })
    }

    /// The index of the endpoint for this call; `load` is read by the load-aware strategies,
    /// `key` (the call's hashed header) by ring_hash.
    #[inline]
    pub fn pick(&self, load: &dyn Load, key: Option<u64>) -> Result<usize, &str> {
        match self {
            Picker::RoundRobin(p) => Ok(p.pick()),
            Picker::Random(p) => Ok(p.pick()),
            Picker::WeightedRoundRobin(p) => Ok(p.pick()),
            Picker::WeightedRandom(p) => Ok(p.pick()),
            Picker::LeastRequest(p) => Ok(p.pick(load)),
            Picker::PeakEwma(p) => Ok(p.pick(load)),
            Picker::RingHash(p) => Ok(p.pick(load, key)),
            Picker::Fail(message) => Err(message),
        }
    }

    /// A pick, as `pick`, and why in the words of `explain`: for calls that ask for debug
    /// metadata. A draw (random, two choices, a ring walk) is stateless, so its explanation is
    /// a pick; a rotation says where it stood.
    pub fn pick_why(&self, load: &dyn Load, key: Option<u64>) -> Result<(usize, String), &str> {
        match self {
            Picker::RoundRobin(p) => Ok(p.pick_why()),
            Picker::WeightedRoundRobin(p) => Ok(p.pick_why()),
            _ => self.explain(load, key),
        }
    }

    /// The endpoint the next pick would take and why, without changing any state (random
    /// strategies draw one to show).
    pub fn explain(&self, load: &dyn Load, key: Option<u64>) -> Result<(usize, String), &str> {
        match self {
            Picker::RoundRobin(p) => Ok(p.explain()),
            Picker::Random(p) => Ok(p.explain()),
            Picker::WeightedRoundRobin(p) => Ok(p.explain()),
            Picker::WeightedRandom(p) => Ok(p.explain()),
            Picker::LeastRequest(p) => Ok(p.explain(load)),
            Picker::PeakEwma(p) => Ok(p.explain(load)),
            Picker::RingHash(p) => Ok(p.explain(load, key)),
            Picker::Fail(message) => Err(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Loads fixed by a test: in flight and latency per endpoint, named 10.0.0.I:1.
    pub struct Fixed {
        in_flight: Vec<u64>,
        latency: Vec<f64>,
        names: Vec<String>,
        pub down: Vec<bool>,
    }

    impl Fixed {
        pub fn new(in_flight: &[u64], latency: &[f64]) -> Self {
            Fixed {
                in_flight: in_flight.to_vec(),
                latency: latency.to_vec(),
                names: (0..in_flight.len())
                    .map(|i| format!("10.0.0.{i}:1"))
                    .collect(),
                down: vec![false; in_flight.len()],
            }
        }

        pub fn idle(n: usize) -> Self {
            Fixed::new(&vec![0; n], &vec![1e6; n])
        }
    }

    /// The share of 40,000 picks that went to endpoint 0.
    pub fn share_of_first(pick: impl Fn() -> usize) -> f64 {
        let n = 40_000;
        (0..n).filter(|_| pick() == 0).count() as f64 / f64::from(n)
    }

    impl Load for Fixed {
        fn in_flight(&self, i: usize) -> u64 {
            self.in_flight[i]
        }
        fn total_in_flight(&self) -> u64 {
            self.in_flight.iter().sum()
        }
        fn latency_ns(&self, i: usize) -> f64 {
            self.latency[i]
        }
        fn name(&self, i: usize) -> &str {
            &self.names[i]
        }
        fn available(&self, i: usize) -> bool {
            !self.down[i]
        }
    }

    #[test]
    fn unknown_strategies_and_zero_weights_are_refused() {
        let e = Picker::build("teleport", &[1], &[], 0, 1.25, String::new())
            .err()
            .unwrap();
        assert!(e.contains("unknown strategy \"teleport\""), "{e}");
        assert!(e.contains(
            "round_robin, random, weighted_round_robin, weighted_random, least_request, peak_ewma, \
             ring_hash"
        ));
        assert!(Picker::build("random", &[1, 0], &[], 0, 1.25, String::new()).is_err());
    }

    #[test]
    fn no_endpoints_fail_every_pick_with_the_message() {
        for name in NAMES {
            let p = Picker::build(name, &[], &[], 3, 1.25, "nothing to pick".into()).unwrap();
            let load = Fixed::idle(0);
            assert_eq!(p.pick(&load, None), Err("nothing to pick"));
            assert_eq!(p.explain(&load, None).err(), Some("nothing to pick"));
        }
    }

    #[test]
    fn explain_names_the_next_pick_of_rotations() {
        for name in [round_robin::NAME, weighted_round_robin::NAME] {
            let p = Picker::build(name, &[3, 1, 2], &[], 5, 1.25, String::new()).unwrap();
            let load = Fixed::idle(3);
            for _ in 0..20 {
                let (next, _) = p.explain(&load, None).unwrap();
                assert_eq!(p.pick(&load, None), Ok(next), "{name}");
            }
        }
    }

    #[test]
    fn pick_why_picks_as_pick_does_in_the_words_of_explain() {
        let wrr = weighted_round_robin::NAME;
        // A rotation, a plain one under weighted_round_robin, a schedule, and deadlines
        // (weights too large to precompute).
        for (name, weights) in [
            (round_robin::NAME, vec![1, 1, 1]),
            (wrr, vec![2, 2, 2]),
            (wrr, vec![3, 1, 2]),
            (wrr, vec![1_000_000, 999_999, 3]),
        ] {
            let a = Picker::build(name, &weights, &[], 5, 1.25, String::new()).unwrap();
            let b = Picker::build(name, &weights, &[], 5, 1.25, String::new()).unwrap();
            let load = Fixed::idle(weights.len());
            for _ in 0..50 {
                let (next, said) = a.explain(&load, None).unwrap();
                let (picked, why) = a.pick_why(&load, None).unwrap();
                assert_eq!((picked, &why), (next, &said), "{name} {weights:?}");
                assert_eq!(b.pick(&load, None), Ok(picked), "{name} {weights:?}");
            }
        }
        for name in NAMES {
            let keys = ["10.0.0.0:1".to_string(), "10.0.0.1:1".to_string()];
            let p = Picker::build(name, &[1, 2], &keys, 0, 1.25, String::new()).unwrap();
            let (i, why) = p.pick_why(&Fixed::idle(2), None).unwrap();
            assert!(i < 2 && why.starts_with(name), "{why}");
        }
    }
}
