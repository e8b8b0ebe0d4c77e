//! round_robin: strict rotation over the eligible endpoints, P_i = 1/N; every N consecutive
//! picks take each endpoint once. Weights are ignored.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub const NAME: &str = "round_robin";

pub struct RoundRobin {
    n: usize,
    /// Picks so far plus the random start; the next endpoint is `next % n`. Shared by every
    /// engine thread, so the rotation is one rotation per process.
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(n: usize, start: u64) -> Self {
        RoundRobin {
            n,
            next: AtomicUsize::new((start % n as u64) as usize),
        }
    }

    #[inline]
    pub fn pick(&self) -> usize {
        self.next.fetch_add(1, Relaxed) % self.n
    }

    /// Where the rotation stands: the position of the next pick.
    pub fn position(&self) -> usize {
        self.next.load(Relaxed) % self.n
    }

    pub fn explain(&self) -> (usize, String) {
        let at = self.position();
        (at, self.why(at))
    }

    /// A pick and why, in the words of `explain` (for calls that ask for debug metadata).
    pub fn pick_why(&self) -> (usize, String) {
        let at = self.pick();
        (at, self.why(at))
    }

    /// Why the pick at rotation position `at` (an endpoint index) took it.
    fn why(&self, at: usize) -> String {
        format!(
            "{NAME}: next in the rotation (position {} of {})",
            at + 1,
            self.n
        )
    }

    /// Why a rotation position `at` took its endpoint, as the weighted rotation words it.
    pub fn why_as(&self, name: &str, at: usize) -> String {
        format!(
            "{name}: equal weights, so a plain rotation (position {} of {})",
            at + 1,
            self.n
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_its_start_and_rotates_strictly() {
        let p = RoundRobin::new(3, 7);
        assert_eq!(p.position(), 1);
        let picks: Vec<_> = (0..7).map(|_| p.pick()).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn one_rotation_across_threads() {
        let p = std::sync::Arc::new(RoundRobin::new(4, 0));
        let counts: Vec<[u32; 4]> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut c = [0u32; 4];
                    for _ in 0..1000 {
                        c[p.pick()] += 1;
                    }
                    c
                })
            })
            .map(|t| t.join().unwrap())
            .collect();
        let total: Vec<u32> = (0..4).map(|i| counts.iter().map(|c| c[i]).sum()).collect();
        assert_eq!(
            total, [1000; 4],
            "4000 picks over 4 threads: exactly 1000 each"
        );
    }
}
