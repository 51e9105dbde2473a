//! Intended send times of the open-loop mode.
//!
//! Request `i` is due at `start + i / rate`, whatever happened to the requests before it. The
//! latency of a request is measured from this time, not from when it actually left: when the
//! collector stalls, the requests that should have gone out meanwhile are charged the wait, as
//! real clients would experience it (no coordinated omission). Each time is computed from
//! `start` afresh, so rounding never accumulates into drift.

use std::time::Duration;

use tokio::time::Instant;

use crate::Error;

/// A constant arrival rate from a start instant.
#[derive(Debug, Clone, Copy)]
pub struct RateSchedule {
    start: Instant,
    /// Requests per second, finite and positive.
    rate: f64,
}

impl RateSchedule {
    /// A schedule of `rate` requests per second from `start`.
    pub fn new(start: Instant, rate: f64) -> Result<RateSchedule, Error> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(Error::Usage(format!(
                "--rate must be a positive number of requests per second, not {rate}"
            )));
        }
        Ok(RateSchedule { start, rate })
    }

    /// When request `i` (from 0) is due.
    pub fn intended(&self, i: u64) -> Instant {
        self.start + self.offset(i)
    }

    /// Request `i`'s due time as an offset from the start.
    pub fn offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// How many requests fall due strictly before `elapsed` from the start.
    pub fn due_within(&self, elapsed: Duration) -> u64 {
        (elapsed.as_secs_f64() * self.rate).ceil() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_at_even_intervals_from_the_start() {
        let start = Instant::now();
        let s = RateSchedule::new(start, 1000.0).unwrap();
        assert_eq!(s.intended(0), start);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(2500), Duration::from_millis(2500));
        let third = RateSchedule::new(start, 3.0).unwrap();
        assert_eq!(third.offset(3), Duration::from_secs(1));
        // No drift: the millionth request is due exactly a million intervals in.
        let fast = RateSchedule::new(start, 7.0).unwrap();
        let off = fast.offset(7_000_000);
        assert!(
            off.abs_diff(Duration::from_secs(1_000_000)) < Duration::from_micros(1),
            "{off:?}"
        );
    }

    #[test]
    fn due_counts_match_the_rate() {
        let s = RateSchedule::new(Instant::now(), 250.0).unwrap();
        assert_eq!(s.due_within(Duration::from_secs(10)), 2500);
        assert_eq!(s.due_within(Duration::ZERO), 0);
        assert_eq!(s.due_within(Duration::from_micros(4001)), 2);
        assert!(s.offset(s.due_within(Duration::from_secs(3)) - 1) < Duration::from_secs(3));
    }

    #[test]
    fn nonsense_rates_are_refused() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = RateSchedule::new(Instant::now(), rate).unwrap_err();
            assert!(err.to_string().contains("--rate"));
        }
    }
}
