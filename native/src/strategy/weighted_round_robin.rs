//! weighted_round_robin: nginx's smooth weighted round robin, P_i = w_i / Σw, exact per window.
//!
//! Each step adds w_i to every endpoint's credit and picks the endpoint with the most credit,
//! which then pays Σw. The sequence is periodic with period Σw and holds endpoint i exactly w_i
//! times per period, so *any* Σw consecutive picks give endpoint i exactly w_i of them, and a
//! heavy endpoint is interleaved with the others instead of picked in bursts.
//!
//! The schedule math happens at build time: weights are reduced by their gcd; equal weights are
//! a plain rotation; a period of up to `MAX_SCHEDULE` picks is precomputed, so a pick is one
//! atomic step. Longer periods run the same algorithm per pick (O(N), under a lock).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

use super::round_robin::RoundRobin;

pub const NAME: &str = "weighted_round_robin";

/// The longest period precomputed (a 256 KiB table at most).
pub const MAX_SCHEDULE: u64 = 1 << 16;

pub enum WeightedRoundRobin {
    /// All weights equal.
    Rotation(RoundRobin),
    /// One precomputed period of endpoint indices, walked by a shared cursor.
    Scheduled {
        schedule: Vec<u32>,
        next: AtomicUsize,
        /// Reduced weights, for explanations.
        weights: Vec<u64>,
    },
    /// The smooth step computed per pick.
    Online {
        weights: Vec<u64>,
        total: u64,
        credit: Mutex<Vec<i128>>,
    },
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One smooth step over `credit`; returns the endpoint picked.
fn step(weights: &[u64], total: u64, credit: &mut [i128]) -> usize {
    let mut best = 0;
    for (i, &w) in weights.iter().enumerate() {
        credit[i] += i128::from(w);
        if credit[i] > credit[best] {
            best = i;
        }
    }
    credit[best] -= i128::from(total);
    best
}

impl WeightedRoundRobin {
    /// `weights` is not empty and holds no 0; `start` is a random draw.
    pub fn new(weights: &[u32], start: u64) -> Self {
        if weights.iter().all(|&w| w == weights[0]) {
            return WeightedRoundRobin::Rotation(RoundRobin::new(weights.len(), start));
        }
        let g = weights.iter().fold(0, |g, &w| gcd(g, u64::from(w)));
        let weights: Vec<u64> = weights.iter().map(|&w| u64::from(w) / g).collect();
        let total: u64 = weights.iter().sum();
        let mut credit = vec![0i128; weights.len()];
        if total <= MAX_SCHEDULE {
            let schedule = (0..total)
                .map(|_| step(&weights, total, &mut credit) as u32)
                .collect();
            WeightedRoundRobin::Scheduled {
                schedule,
                next: AtomicUsize::new((start % total) as usize),
                weights,
            }
        } else {
            // Start somewhere in the first few rounds: a random phase without walking a
            // period that may be billions of steps long.
            for _ in 0..start % (4 * weights.len() as u64).min(total) {
                step(&weights, total, &mut credit);
            }
            WeightedRoundRobin::Online {
                weights,
                total,
                credit: Mutex::new(credit),
            }
        }
    }

    #[inline]
    pub fn pick(&self) -> usize {
        match self {
            WeightedRoundRobin::Rotation(r) => r.pick(),
            WeightedRoundRobin::Scheduled { schedule, next, .. } => {
                schedule[next.fetch_add(1, Relaxed) % schedule.len()] as usize
            }
            WeightedRoundRobin::Online {
                weights,
                total,
                credit,
            } => step(
                weights,
                *total,
                &mut credit.lock().unwrap_or_else(|e| e.into_inner()),
            ),
        }
    }

    pub fn explain(&self) -> (usize, String) {
        match self {
            WeightedRoundRobin::Rotation(r) => {
                let at = r.position();
                (
                    at,
                    format!(
                        "{NAME}: equal weights, so a plain rotation (position {} of {})",
                        at + 1,
                        r.endpoints()
                    ),
                )
            }
            WeightedRoundRobin::Scheduled {
                schedule,
                next,
                weights,
            } => {
                let at = next.load(Relaxed) % schedule.len();
                let i = schedule[at] as usize;
                (
                    i,
                    format!(
                        "{NAME}: step {} of a {}-pick schedule in which this endpoint has {} picks",
                        at + 1,
                        schedule.len(),
                        weights[i]
                    ),
                )
            }
            WeightedRoundRobin::Online {
                weights,
                total,
                credit,
            } => {
                let mut credit = credit.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let i = step(weights, *total, &mut credit);
                (
                    i,
                    format!(
                        "{NAME}: most credit (weight {} of {total} per period)",
                        weights[i]
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(p: &WeightedRoundRobin, n: usize) -> Vec<usize> {
        (0..n).map(|_| p.pick()).collect()
    }

    #[test]
    fn every_window_of_a_period_holds_the_weights() {
        for start in [0, 1, 7, 9] {
            let p = WeightedRoundRobin::new(&[5, 3, 2], start);
            let seq = picks(&p, 100);
            for w in seq.windows(10) {
                let count = |i| w.iter().filter(|&&x| x == i).count();
                assert_eq!((count(0), count(1), count(2)), (5, 3, 2), "{w:?}");
            }
            assert_ne!(&seq[..4], &[0, 0, 0, 0], "smooth, not bursty");
        }
    }

    #[test]
    fn weights_reduce_by_their_gcd_and_equal_ones_rotate() {
        let p = WeightedRoundRobin::new(&[500, 300, 200], 0);
        assert!(
            matches!(&p, WeightedRoundRobin::Scheduled { schedule, .. } if schedule.len() == 10)
        );
        let p = WeightedRoundRobin::new(&[7, 7, 7], 1);
        assert!(matches!(p, WeightedRoundRobin::Rotation(_)));
        assert_eq!(picks(&p, 4), [1, 2, 0, 1]);
    }

    #[test]
    fn long_periods_run_online_with_the_same_sequence() {
        let weights = [40_000, 30_001, 1];
        let online = WeightedRoundRobin::new(&weights, 0);
        assert!(matches!(online, WeightedRoundRobin::Online { .. }));
        // The same smooth sequence as a precomputed schedule would give.
        let (w, total) = ([40_000u64, 30_001, 1], 70_002);
        let mut credit = [0i128; 3];
        for _ in 0..1000 {
            assert_eq!(online.pick(), step(&w, total, &mut credit));
        }
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let p = WeightedRoundRobin::new(&[u32::MAX, u32::MAX - 1, 1], 3);
        for _ in 0..1000 {
            assert!(p.pick() < 3);
        }
    }
}
