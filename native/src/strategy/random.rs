//! random: a uniform draw among the eligible endpoints, P_i = 1/N. Weights are ignored.

pub const NAME: &str = "random";

pub struct Random {
    n: usize,
}

impl Random {
    pub fn new(n: usize) -> Self {
        Random { n }
    }

    /// A draw from the calling thread's generator (no shared state, no lock).
    #[inline]
    pub fn pick(&self) -> usize {
        fastrand::usize(..self.n)
    }

    pub fn explain(&self) -> (usize, String) {
        let n = self.n;
        (
            self.pick(),
            format!("{NAME}: uniform choice, each of {n} has P = 1/{n}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform() {
        let p = Random::new(4);
        let mut counts = [0u32; 4];
        for _ in 0..40_000 {
            counts[p.pick()] += 1;
        }
        // 5 standard deviations of a fair draw: sqrt(40000 * 1/4 * 3/4) ≈ 87.
        assert!(
            counts.iter().all(|&c| c.abs_diff(10_000) < 5 * 87),
            "{counts:?}"
        );
    }
}
