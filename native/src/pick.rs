//! Executing a pick plan: the strategy's arithmetic happens in Python when a set is applied
//! (dataplane/strategies); per request the engine only steps a cursor or draws a number.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

pub enum Plan {
    /// Walk `order` (backend indices) with a shared cursor: round robin, smooth WRR.
    Cycle { order: Vec<u32>, next: AtomicUsize },
    /// Any backend, uniformly: random.
    Uniform,
    /// bisect_right of a uniform draw in [0, total) over cumulative weights: weighted random.
    Cumulative { cumulative: Vec<u64> },
    /// nginx smooth WRR computed per pick (periods too long to precompute).
    Smooth {
        weights: Vec<i64>,
        total: i64,
        credit: Mutex<Vec<i64>>,
    },
    /// Every pick fails with this message (empty set, unknown strategy).
    Fail(String),
}

impl Plan {
    pub fn build(kind: &str, table: Vec<u64>, start: u64, message: String) -> Result<Plan, String> {
        Ok(match kind {
            "cycle" if !table.is_empty() => {
                let order: Vec<u32> = table.into_iter().map(|i| i as u32).collect();
                let next = AtomicUsize::new(start as usize % order.len());
                Plan::Cycle { order, next }
            }
            "uniform" => Plan::Uniform,
            "cumulative" if table.last().is_some_and(|t| *t > 0) => {
                Plan::Cumulative { cumulative: table }
            }
            "smooth" if !table.is_empty() => {
                let weights: Vec<i64> = table.into_iter().map(|w| w as i64).collect();
                let total = weights.iter().sum();
                let plan = Plan::Smooth {
                    credit: Mutex::new(vec![0; weights.len()]),
                    weights,
                    total,
                };
                for _ in 0..start {
                    plan.smooth_step();
                }
                plan
            }
            "fail" => Plan::Fail(message),
            _ => {
                return Err(format!(
                    "bad pick plan {kind:?} with {} entries",
                    table.len()
                ))
            }
        })
    }

    /// The index of the backend for this request among `n`.
    #[inline]
    pub fn pick(&self, n: usize) -> Result<usize, &str> {
        match self {
            Plan::Cycle { order, next } => {
                let i = next.fetch_add(1, Relaxed) % order.len();
                Ok(order[i] as usize)
            }
            Plan::Uniform => Ok(fastrand::usize(..n)),
            Plan::Cumulative { cumulative } => {
                let draw = fastrand::u64(..*cumulative.last().unwrap_or(&1));
                Ok(cumulative.partition_point(|&c| c <= draw))
            }
            Plan::Smooth { .. } => Ok(self.smooth_step()),
            Plan::Fail(message) => Err(message),
        }
    }

    /// Where a rotation stands: the position in `order` of the next pick.
    pub fn cursor(&self) -> Option<usize> {
        match self {
            Plan::Cycle { order, next } => Some(next.load(Relaxed) % order.len()),
            _ => None,
        }
    }

    fn smooth_step(&self) -> usize {
        let Plan::Smooth {
            weights,
            total,
            credit,
        } = self
        else {
            return 0;
        };
        let mut credit = credit.lock().unwrap_or_else(|e| e.into_inner());
        let mut best = 0;
        for i in 0..weights.len() {
            credit[i] += weights[i];
            if credit[i] > credit[best] {
                best = i;
            }
        }
        credit[best] -= total;
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_starts_at_its_cursor_and_wraps() {
        let p = Plan::build("cycle", vec![2, 0, 1], 1, String::new()).unwrap();
        assert_eq!(p.cursor(), Some(1));
        let picks: Vec<_> = (0..6).map(|_| p.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.cursor(), Some(1));
    }

    #[test]
    fn smooth_holds_weights_in_every_period() {
        let p = Plan::build("smooth", vec![5, 3, 2], 0, String::new()).unwrap();
        let mut counts = [0; 3];
        for _ in 0..10 {
            counts[p.pick(3).unwrap()] += 1;
        }
        assert_eq!(counts, [5, 3, 2]);
    }

    #[test]
    fn cumulative_draws_follow_weights() {
        let p = Plan::build("cumulative", vec![6, 9, 10], 0, String::new()).unwrap();
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[p.pick(3).unwrap()] += 1;
        }
        assert!((59_000..61_000).contains(&counts[0]), "{counts:?}");
        assert!((29_000..31_000).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn fail_and_bad_plans() {
        let p = Plan::build("fail", vec![], 0, "no backends".into()).unwrap();
        assert_eq!(p.pick(0), Err("no backends"));
        assert!(Plan::build("cycle", vec![], 0, String::new()).is_err());
        assert!(Plan::build("cumulative", vec![0], 0, String::new()).is_err());
        assert!(Plan::build("teleport", vec![1], 0, String::new()).is_err());
    }
}
