//! Latency summaries from HDR histograms, the live progress line, and the final reports of
//! `run` and `verify`, as text for people and JSON (`--json`) for scripts.
//!
//! Histograms record microseconds with 3 significant digits (any value within 0.1 %), from
//! 1 µs to 1 hour; a longer latency is clamped to an hour and still counted.

use std::collections::BTreeMap;
use std::fmt;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram tracks, in microseconds (one hour).
pub const MAX_TRACKED_US: u64 = 3_600_000_000;

/// A histogram of microseconds, 1 µs to [`MAX_TRACKED_US`], 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("constant histogram bounds are valid")
}

/// Records a latency in microseconds, clamped into the tracked range.
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_TRACKED_US));
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest value.
    pub max_ms: f64,
}

impl Latency {
    /// The summary of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (mean {:.2} ms, n={})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms, self.count
        )
    }
}

/// `count / seconds`, 0 for an empty interval.
pub fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

/// One second's progress, printed as one line on stderr.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Length of the interval this line covers.
    pub interval_s: f64,
    /// Requests sent in the interval.
    pub sent: u64,
    /// Requests acknowledged (2xx) in the interval.
    pub acked: u64,
    /// Events acknowledged in the interval.
    pub events: u64,
    /// Failures in the interval by status (`503`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Latency of the interval's completions.
    pub latency: Latency,
    /// Requests in flight at the end of the interval.
    pub in_flight: u64,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>5.0}s] sent {:>7.0}/s  acked {:>7.0}/s  events {:>8.0}/s  p50 {:>7.2} ms  p99 {:>8.2} ms  in flight {:>5}",
            self.elapsed_s,
            per_second(self.sent, self.interval_s),
            per_second(self.acked, self.interval_s),
            per_second(self.events, self.interval_s),
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.in_flight,
        )?;
        if self.errors.is_empty() {
            write!(f, "  errors 0")
        } else {
            write!(f, "  errors")?;
            for (status, n) in &self.errors {
                write!(f, " {status}={n}")?;
            }
            Ok(())
        }
    }
}

/// The final report of `run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The run id (prefix of every message id).
    pub run_id: String,
    /// `open` or `closed`.
    pub mode: &'static str,
    /// Open loop: the target arrival rate, requests per second.
    pub target_rps: Option<f64>,
    /// Closed loop: connections.
    pub connections: Option<usize>,
    /// Wall time from the first request to the last answer.
    pub duration_s: f64,
    /// Requests sent.
    pub requests_sent: u64,
    /// Requests answered 2xx.
    pub requests_acked: u64,
    /// Requests that failed, by status or transport error.
    pub errors: BTreeMap<String, u64>,
    /// Events (rows to be) acknowledged.
    pub events_acked: u64,
    /// Identify messages acknowledged (no event rows).
    pub identifies_acked: u64,
    /// Messages a 2xx answer listed as rejected.
    pub messages_rejected: u64,
    /// Acknowledged requests per second.
    pub requests_per_s: f64,
    /// Acknowledged events per second.
    pub events_per_s: f64,
    /// Acknowledged messages (events and identifies) per second.
    pub messages_per_s: f64,
    /// Request latency: from the intended send time (open loop) or the send (closed loop) to
    /// the full answer, over all answered requests (failures included).
    pub latency: Latency,
    /// Where the acknowledged message ids went.
    pub ack_file: Option<String>,
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run {} ({} loop)", self.run_id, self.mode)?;
        match (self.target_rps, self.connections) {
            (Some(rps), _) => writeln!(f, "  target        {rps:.0} requests/s (open loop; latency from the intended send time)")?,
            (_, Some(c)) => writeln!(f, "  connections   {c} (closed loop; latency from the send)")?,
            _ => {}
        }
        writeln!(f, "  duration      {:.2} s", self.duration_s)?;
        writeln!(
            f,
            "  requests      {} sent, {} acknowledged ({:.0}/s)",
            self.requests_sent, self.requests_acked, self.requests_per_s
        )?;
        writeln!(
            f,
            "  events        {} acknowledged ({:.0}/s); {} identifies; {} messages rejected",
            self.events_acked, self.events_per_s, self.identifies_acked, self.messages_rejected
        )?;
        write!(f, "  errors       ")?;
        if self.errors.is_empty() {
            write!(f, " none")?;
        }
        for (status, n) in &self.errors {
            write!(f, " {status}={n}")?;
        }
        writeln!(f)?;
        writeln!(f, "  latency       {}", self.latency)?;
        if let Some(path) = &self.ack_file {
            writeln!(f, "  ack file      {path}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let mut h = new_histogram();
        // 1..=1000 ms, one each.
        for ms in 1..=1000u64 {
            record_us(&mut h, ms * 1000);
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(l.p50_ms, 500.0), "{l:?}");
        assert!(close(l.p90_ms, 900.0), "{l:?}");
        assert!(close(l.p99_ms, 990.0), "{l:?}");
        assert!(close(l.p999_ms, 999.0), "{l:?}");
        assert!(close(l.max_ms, 1000.0), "{l:?}");
        assert!(close(l.mean_ms, 500.5), "{l:?}");
    }

    #[test]
    fn a_single_outlier_shows_in_the_tail_only() {
        let mut h = new_histogram();
        for _ in 0..9990 {
            record_us(&mut h, 2000);
        }
        for _ in 0..10 {
            record_us(&mut h, 5_000_000);
        }
        let l = Latency::of(&h);
        assert!((l.p99_ms - 2.0).abs() < 0.01, "{l:?}");
        assert!(
            (l.p999_ms - 2.0).abs() < 0.01,
            "p99.9 is the 9990th of 10000: {l:?}"
        );
        assert!((l.max_ms - 5000.0).abs() < 5.0, "{l:?}");
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut h = new_histogram();
        record_us(&mut h, 0);
        record_us(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(Latency::of(&h).max_ms >= 3_600_000.0 * 0.999);
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
    }

    #[test]
    fn rates_and_progress_line() {
        assert_eq!(per_second(500, 0.5), 1000.0);
        assert_eq!(per_second(5, 0.0), 0.0);
        let mut p = Progress {
            elapsed_s: 3.0,
            interval_s: 1.0,
            sent: 100,
            acked: 98,
            events: 1960,
            ..Progress::default()
        };
        p.errors.insert("503".into(), 2);
        let line = p.to_string();
        assert!(
            line.contains("sent     100/s") && line.contains("errors 503=2"),
            "{line}"
        );
    }
}
