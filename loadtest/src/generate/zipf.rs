//! The zipf sampler that skews the tenants' traffic shares.

use rand::Rng;

/// Samples ranks `0..n` with probability proportional to `1 / (rank + 1)^s`, by binary search
/// in the precomputed cumulative distribution (exact, and O(log n) per draw).
#[derive(Debug, Clone)]
pub struct Zipf {
    /// Cumulative probabilities, the last one 1.0.
    cdf: Vec<f64>,
}

impl Zipf {
    /// A sampler over `n` ranks (at least 1) with exponent `s` (0 = uniform).
    pub fn new(n: usize, s: f64) -> Zipf {
        let n = n.max(1);
        let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Zipf { cdf }
    }

    /// Probability of rank `r`.
    pub fn probability(&self, r: usize) -> f64 {
        let below = if r == 0 { 0.0 } else { self.cdf[r - 1] };
        self.cdf.get(r).map_or(0.0, |c| c - below)
    }

    /// Draws a rank.
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
}
