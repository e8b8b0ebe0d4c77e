//! ring_hash: consistent hashing of a request header onto a ring of the endpoints, with
//! bounded loads (Mirrokni, Thorup and Zadimoghaddam's "consistent hashing with bounded
//! loads", as Envoy's hash_balance_factor and HAProxy's hash-balance-factor).
//!
//! Each endpoint has points on a 64-bit ring in proportion to its weight (`POINTS` per
//! endpoint of average weight), placed by hashing its HOST:PORT, so that the points of the
//! others stay put when one leaves: a key moves only if its endpoint left (about 1/N of the
//! keys). A call's key (the header's value, hashed) goes to the first endpoint clockwise from
//! it that can take calls (not down, ejected or unhealthy) and whose calls in flight stay
//! within its bound, c × (all in flight + 1) × w_i / Σw: one hot key cannot pile more than c
//! times its share onto one pod, and the overflow, like the keys of an endpoint that cannot
//! take calls, goes on round the ring, the same way on every proxy. A call without the header
//! is a weighted random draw (P_i = w_i/Σw).

use super::weighted_random::WeightedRandom;
use super::Load;

pub const NAME: &str = "ring_hash";

/// Ring points of an endpoint of average weight (Envoy's minimum ring is 1024 for any N).
pub const POINTS: u64 = 160;
/// The most points on one ring.
pub const MAX_RING: u64 = 1 << 20;

pub struct RingHash {
    /// (point, endpoint), sorted by point.
    ring: Vec<(u64, u32)>,
    weights: Vec<u32>,
    total_weight: u64,
    /// c, the load bound (≥ 1).
    bound: f64,
    fallback: WeightedRandom,
}

/// FNV-1a, then SplitMix64's finalizer: stable across builds and machines (every proxy puts a
/// key on the same point), and well spread.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl RingHash {
    /// `weights` is not empty and holds no 0; `keys` name the endpoints (HOST:PORT); `bound`
    /// is c ≥ 1.
    pub fn new(keys: &[String], weights: &[u32], bound: f64) -> Self {
        let n = weights.len() as u64;
        let total_weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let per_average = POINTS.min(MAX_RING / n).max(1);
        let mut ring = Vec::new();
        for (i, (key, &w)) in keys.iter().zip(weights).enumerate() {
            let points = (u128::from(per_average) * u128::from(w) * u128::from(n)
                / u128::from(total_weight))
            .max(1) as u64;
            for r in 0..points {
                let point = hash(format!("{key}-{r}").as_bytes());
                ring.push((point, i as u32));
            }
        }
        ring.sort_unstable();
        RingHash {
            ring,
            weights: weights.to_vec(),
            total_weight,
            bound: bound.max(1.0),
            fallback: WeightedRandom::new(weights),
        }
    }

    /// The most calls endpoint `i` may have in flight before its keys go on round the ring.
    fn capacity(&self, i: usize, total_in_flight: u64) -> f64 {
        (self.bound * (total_in_flight + 1) as f64 * f64::from(self.weights[i])
            / self.total_weight as f64)
            .ceil()
    }

    /// The key's owner and the endpoint that takes it (the first within its bound).
    fn walk(&self, load: &dyn Load, key: u64) -> (usize, usize) {
        let start = self.ring.partition_point(|&(p, _)| p < key);
        let owner = self.ring[start % self.ring.len()].1 as usize;
        let total = load.total_in_flight();
        for k in 0..self.ring.len() {
            let i = self.ring[(start + k) % self.ring.len()].1 as usize;
            if load.available(i) && ((load.in_flight(i) + 1) as f64) <= self.capacity(i, total) {
                return (owner, i);
            }
        }
        (owner, owner) // every endpoint at its bound: cannot happen, since Σ bounds > total
    }

    #[inline]
    pub fn pick(&self, load: &dyn Load, key: Option<u64>) -> usize {
        match key {
            Some(key) => self.walk(load, key).1,
            None => self.fallback.pick(),
        }
    }

    pub fn explain(&self, load: &dyn Load, key: Option<u64>) -> (usize, String) {
        let Some(key) = key else {
            let i = self.fallback.pick();
            return (
                i,
                format!(
                    "{NAME}: no hash key in the call, so a weighted random draw (P = {}/{})",
                    self.weights[i], self.total_weight
                ),
            );
        };
        let (owner, i) = self.walk(load, key);
        let total = load.total_in_flight();
        let why = if owner == i {
            format!(
                "{NAME}: key {key:016x} is {}'s ({} in flight, bound {})",
                load.name(i),
                load.in_flight(i),
                self.capacity(i, total)
            )
        } else {
            format!(
                "{NAME}: key {key:016x} is {}'s, at its bound ({} in flight of {}), so the next \
                 within its bound on the ring: {}",
                load.name(owner),
                load.in_flight(owner),
                self.capacity(owner, total),
                load.name(i)
            )
        };
        (i, why)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::Fixed;
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn a_key_stays_put_and_only_a_leaving_endpoints_keys_move() {
        let n = 10;
        let all = RingHash::new(&keys(n), &vec![1; n], 1.25);
        let idle = Fixed::idle(n);
        let before: Vec<usize> = (0..10_000u64)
            .map(|k| all.pick(&idle, Some(hash(&k.to_be_bytes()))))
            .collect();
        let again: Vec<usize> = (0..10_000u64)
            .map(|k| all.pick(&idle, Some(hash(&k.to_be_bytes()))))
            .collect();
        assert_eq!(before, again, "the same key, the same endpoint");
        // Endpoint 3 leaves: the others keep their keys.
        let mut rest = keys(n);
        rest.remove(3);
        let fewer = RingHash::new(&rest, &vec![1; n - 1], 1.25);
        let idle = Fixed::idle(n - 1);
        let mut moved = 0;
        for (k, &was) in before.iter().enumerate() {
            let now = fewer.pick(&idle, Some(hash(&(k as u64).to_be_bytes())));
            let now = if now >= 3 { now + 1 } else { now }; // back to the old indices
            if now != was {
                assert_eq!(was, 3, "only the leaving endpoint's keys move");
                moved += 1;
            }
        }
        assert!(
            moved as f64 <= 1.5 / n as f64 * 10_000.0,
            "{moved} keys moved"
        );
        // Spread: each of 10 endpoints holds 10% of the keys, give or take.
        let mut counts = vec![0; n];
        for &i in &before {
            counts[i] += 1;
        }
        assert!(
            counts.iter().all(|&c| (700..=1300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn weights_set_the_share_of_the_ring() {
        let p = RingHash::new(&keys(2), &[3, 1], 1.25);
        let idle = Fixed::idle(2);
        let first = (0..20_000u64)
            .filter(|k| p.pick(&idle, Some(hash(&k.to_be_bytes()))) == 0)
            .count();
        assert!((13_500..=16_500).contains(&first), "{first}");
    }

    #[test]
    fn a_key_over_its_endpoints_bound_goes_on_round_the_ring() {
        let p = RingHash::new(&keys(4), &[1; 4], 1.25);
        let key = hash(b"hot");
        let (owner, _) = p.walk(&Fixed::idle(4), key);
        // The owner carries 5 of 8 calls in flight: bound ceil(1.25 × 9 / 4) = 3.
        let mut in_flight = [1u64; 4];
        in_flight[owner] = 5;
        let busy = Fixed::new(&in_flight, &[1e6; 4]);
        let taken = p.pick(&busy, Some(key));
        assert_ne!(taken, owner);
        let (_, why) = p.explain(&busy, Some(key));
        assert!(why.contains("at its bound (5 in flight of 3)"), "{why}");
        // No key: a weighted draw.
        assert!(p.pick(&busy, None) < 4);
        assert!(p.explain(&busy, None).1.contains("no hash key"));
    }

    #[test]
    fn an_endpoint_that_cannot_take_calls_hands_its_keys_to_the_next_on_the_ring() {
        let p = RingHash::new(&keys(5), &[1; 5], 1.25);
        let idle = Fixed::idle(5);
        let key = hash(b"k");
        let owner = p.pick(&idle, Some(key));
        let mut down = Fixed::idle(5);
        down.down[owner] = true;
        let next = p.pick(&down, Some(key));
        assert_ne!(next, owner);
        // The same next every time (every proxy agrees), and other keys stay put.
        assert!((0..100).all(|_| p.pick(&down, Some(key)) == next));
        for k in 0..1000u64 {
            let key = hash(&k.to_be_bytes());
            let was = p.pick(&idle, Some(key));
            if was != owner {
                assert_eq!(p.pick(&down, Some(key)), was);
            }
        }
    }

    #[test]
    fn the_hash_is_fixed() {
        // Every proxy, every build: the same point for the same key.
        assert_eq!(hash(b""), hash(b""));
        assert_ne!(hash(b"a"), hash(b"b"));
        assert_eq!(hash(b"user-42"), 0x7a15_96f0_e94b_5793);
    }
}
