//! least_request: the power of two choices on calls in flight, weight-aware, as Envoy's
//! LEAST_REQUEST. Two distinct endpoints are drawn with P_i = w_i/Σw; the call goes to the one
//! with fewer calls in flight per unit of weight, in_flight / w (ties: the first drawn). A
//! slow or overloaded endpoint holds its calls longer, so it is drawn as often but chosen
//! less; at equal load per weight (an idle Service too) the shares are the weights'.

use super::two_choices::TwoChoices;
use super::Load;

pub const NAME: &str = "least_request";

pub struct LeastRequest {
    choices: TwoChoices,
}

impl LeastRequest {
    /// `weights` is not empty and holds no 0.
    pub fn new(weights: &[u32]) -> Self {
        LeastRequest {
            choices: TwoChoices::new(weights),
        }
    }

    fn cost(&self, load: &dyn Load, i: usize) -> f64 {
        load.in_flight(i) as f64 / f64::from(self.choices.weight(i))
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
            |i| format!("{} in flight", load.in_flight(i)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{share_of_first, Fixed};
    use super::*;

    #[test]
    fn the_less_loaded_of_two_wins_and_weights_set_the_draws() {
        // Equal load: shares follow the weights (the draws), whichever wins ties.
        let p = LeastRequest::new(&[3, 1]);
        let idle = Fixed::new(&[0, 0], &[0.0, 0.0]);
        let first = share_of_first(|| p.pick(&idle));
        assert!((first - 0.75).abs() < 0.02, "{first}");
        // Endpoint 0 with 4 in flight for weight 3 against 1 for weight 1: 4/3 > 1/1, so
        // endpoint 1 wins every pair; with 3 against 1 they tie, and the draws decide again.
        let busy = Fixed::new(&[4, 1], &[0.0, 0.0]);
        assert!((0..1000).all(|_| p.pick(&busy) == 1));
        let even = Fixed::new(&[3, 1], &[0.0, 0.0]);
        let first = share_of_first(|| p.pick(&even));
        assert!((first - 0.75).abs() < 0.02, "{first}");
    }

    #[test]
    fn explain_names_both_candidates() {
        let p = LeastRequest::new(&[1, 1]);
        let load = Fixed::new(&[2, 5], &[0.0, 0.0]);
        let (i, why) = p.explain(&load);
        assert_eq!(i, 0);
        assert_eq!(
            why,
            "least_request: 10.0.0.0:1 (2 in flight) over 10.0.0.1:1 (5 in flight)"
        );
    }
}
