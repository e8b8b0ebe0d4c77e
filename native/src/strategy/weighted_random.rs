//! weighted_random: endpoint i with P_i = w_i / Σw, independently per call: a uniform draw in
//! [0, Σw) is located among the cumulative weights by binary search (O(log N) per pick).

pub const NAME: &str = "weighted_random";

pub struct WeightedRandom {
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    /// `weights` is not empty and holds no 0.
    pub fn new(weights: &[u32]) -> Self {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        WeightedRandom { cumulative }
    }

    fn total(&self) -> u64 {
        *self.cumulative.last().expect("not empty")
    }

    #[inline]
    pub fn pick(&self) -> usize {
        let draw = fastrand::u64(..self.total());
        self.cumulative.partition_point(|&c| c <= draw)
    }

    pub fn explain(&self) -> (usize, String) {
        let i = self.pick();
        let below = if i == 0 { 0 } else { self.cumulative[i - 1] };
        let w = self.cumulative[i] - below;
        (i, format!("{NAME}: drawn with P = {w}/{}", self.total()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_the_weights() {
        let p = WeightedRandom::new(&[6, 3, 1]);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[p.pick()] += 1;
        }
        // Within 5 standard deviations (≈ 155, 145, 95).
        assert!(counts[0].abs_diff(60_000) < 775, "{counts:?}");
        assert!(counts[1].abs_diff(30_000) < 725, "{counts:?}");
        assert!(counts[2].abs_diff(10_000) < 475, "{counts:?}");
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let p = WeightedRandom::new(&[u32::MAX; 1000]);
        assert!(p.pick() < 1000);
        assert!(p
            .explain()
            .1
            .ends_with(&format!("/{}", u64::from(u32::MAX) * 1000)));
    }
}
