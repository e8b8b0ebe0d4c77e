//! The power of two choices shared by the load-aware strategies: two distinct endpoints drawn
//! with P_i = w_i/Σw, the cheaper one taken. Drawing by weight keeps each endpoint's share at
//! its weight's when loads are equal; comparing costs moves calls away from the loaded.

use super::weighted_random::WeightedRandom;
use super::Load;

pub struct TwoChoices {
    draw: WeightedRandom,
    weights: Vec<u32>,
}

impl TwoChoices {
    pub fn new(weights: &[u32]) -> Self {
        TwoChoices {
            draw: WeightedRandom::new(weights),
            weights: weights.to_vec(),
        }
    }

    pub fn weight(&self, i: usize) -> u32 {
        self.weights[i]
    }

    /// Two distinct endpoints (the same one twice only when there is one).
    fn draw_two(&self) -> (usize, usize) {
        let a = self.draw.pick();
        if self.weights.len() == 1 {
            return (a, a);
        }
        // A second draw until it differs: with one endpoint holding most of the weight this
        // could take long, so after a few tries any other endpoint does.
        for _ in 0..4 {
            let b = self.draw.pick();
            if b != a {
                return (a, b);
            }
        }
        let n = self.weights.len();
        (a, (a + 1 + fastrand::usize(..n - 1)) % n)
    }

    #[inline]
    pub fn pick(&self, cost: impl Fn(usize) -> f64) -> usize {
        let (a, b) = self.draw_two();
        if a == b || cost(a) <= cost(b) {
            a
        } else {
            b
        }
    }

    /// A pick and why: `describe` says what each candidate's cost is made of.
    pub fn explain(
        &self,
        name: &str,
        load: &dyn Load,
        cost: impl Fn(usize) -> f64,
        describe: impl Fn(usize) -> String,
    ) -> (usize, String) {
        let (a, b) = self.draw_two();
        if a == b {
            return (a, format!("{name}: {} is the only endpoint", load.name(a)));
        }
        let (won, lost) = if cost(a) <= cost(b) { (a, b) } else { (b, a) };
        (
            won,
            format!(
                "{name}: {} ({}) over {} ({})",
                load.name(won),
                describe(won),
                load.name(lost),
                describe(lost)
            ),
        )
    }
}
