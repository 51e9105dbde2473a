//! Per-key rate limiting: a token bucket per write key, charged one token per message, so a
//! batch of 500 costs what 500 single calls cost. Buckets live in a bounded map.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::metrics;

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens left (fractional: refill is continuous).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

/// Token buckets by key id.
pub struct RateLimiter {
    /// Refill, tokens per second; 0 turns limiting off.
    rate: f64,
    /// Bucket size in tokens.
    burst: f64,
    /// Key id -> bucket. Bounded by `max_buckets`: full buckets are dropped first, since a
    /// dropped full bucket comes back exactly as it was.
    buckets: Mutex<HashMap<i64, Bucket>>,
    /// Most buckets kept.
    max_buckets: usize,
}

impl RateLimiter {
    /// A limiter refilling `per_second` tokens into buckets of `burst`.
    pub fn new(per_second: u32, burst: u32, max_buckets: usize) -> RateLimiter {
        RateLimiter {
            rate: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            max_buckets: max_buckets.max(1),
        }
    }

    /// Takes `cost` tokens from `key`'s bucket: `Ok` when there were enough, else `Err` with
    /// the seconds until there will be (at least 1). A request bigger than the whole bucket
    /// is let through when the bucket is full, so a large batch is slowed, never refused
    /// for ever.
    pub fn check(&self, key: i64, cost: u32, now: Instant) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            // A poisoned lock means a panic elsewhere; do not turn it into refused traffic.
            return Ok(());
        };
        if buckets.len() >= self.max_buckets && !buckets.contains_key(&key) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
            if buckets.len() >= self.max_buckets {
                buckets.clear();
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        let cost = f64::from(cost).min(self.burst);
        let result = if bucket.tokens >= cost {
            bucket.tokens -= cost;
            Ok(())
        } else {
            let wait = (cost - bucket.tokens) / self.rate;
            // Whole seconds for Retry-After; the float is small and positive here.
            Err((wait.ceil() as u64).max(1))
        };
        metrics::rate_limit_buckets(buckets.len());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_empties_and_refills() {
        let limiter = RateLimiter::new(10, 20, 100);
        let t0 = Instant::now();
        assert!(limiter.check(1, 15, t0).is_ok());
        assert_eq!(limiter.check(1, 10, t0), Err(1));
        // Another key has its own bucket.
        assert!(limiter.check(2, 20, t0).is_ok());
        // Half a second later five more tokens are back: 5 + 5 = 10.
        assert!(limiter
            .check(1, 10, t0 + Duration::from_millis(500))
            .is_ok());
        assert_eq!(limiter.check(1, 1, t0 + Duration::from_millis(500)), Err(1));
        // A request bigger than the bucket passes once the bucket is full again.
        assert!(limiter.check(1, 500, t0 + Duration::from_secs(10)).is_ok());
        assert_eq!(limiter.check(1, 30, t0 + Duration::from_secs(10)), Err(2));
    }

    #[test]
    fn zero_rate_is_unlimited_and_map_stays_bounded() {
        let off = RateLimiter::new(0, 1, 1);
        assert!(off.check(1, 1_000_000, Instant::now()).is_ok());
        let limiter = RateLimiter::new(1, 1, 3);
        let t0 = Instant::now();
        for key in 0..100 {
            assert!(limiter.check(key, 1, t0).is_ok());
        }
        assert!(limiter.buckets.lock().unwrap().len() <= 3);
    }
}
