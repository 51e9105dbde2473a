//! Every metric the collector exports (docs/architecture.md §7.2, fixed names first), each
//! declared once with its kind, labels and buckets in [`ALL`], and emitted only through the
//! small functions below, so a name or a label cannot drift between call sites; the recorder.
//! Label values are bounded: endpoints, statuses, types, outcomes and reasons are fixed sets.

use std::time::Duration;

use axum::http::StatusCode;
use metrics::{Label, SharedString};
use metrics_exporter_prometheus::PrometheusHandle;
use sluice_schema::metrics::{BucketRule, Kind, Metric, SECONDS_BUCKETS};
use sluice_schema::readiness::Dependency;

/// Body sizes: 256 B to the 1 MiB a body can inflate to.
pub const BYTES_BUCKETS: &[f64] = &[
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    524_288.0,
    1_048_576.0,
];

/// Clock skew: a tenth of a second to a day (phones with a wrong clock are off by hours).
pub const SKEW_BUCKETS: &[f64] = &[0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0];

/// Requests answered. Labels: `endpoint` (batch, track, ..., pixel), `status` (HTTP code).
pub const REQUESTS: Metric = Metric::counter(
    "sluice_ingest_requests_total",
    &["endpoint", "status"],
    "Requests answered, by endpoint and HTTP status.",
);
/// Messages seen. Labels: `type` (track, page, ..., identify, alias), `outcome` (accepted,
/// rejected, failed: refused by Kafka or timed out).
pub const EVENTS: Metric = Metric::counter(
    "sluice_ingest_events_total",
    &["type", "outcome"],
    "Messages seen, by type and outcome (accepted, rejected, failed).",
);
/// Refused messages. Label: `reason` ([`crate::payload::Reason`]).
pub const REJECTED: Metric = Metric::counter(
    "sluice_ingest_rejected_total",
    &["reason"],
    "Messages refused, by reason.",
);
/// Requests answered with a 4xx: bodies or keys sluice cannot take. Labels: `endpoint` (as in
/// requests_total), `reason` ([`crate::error::IngestError::reason`]: malformed, too_large,
/// missing_key, ..., or the message reason when every message was refused).
pub const REFUSED_REQUESTS: Metric = Metric::counter(
    "sluice_ingest_refused_requests_total",
    &["endpoint", "reason"],
    "Requests answered with a 4xx, by endpoint and reason.",
);
/// Seconds from request start to answer. Label: `endpoint`.
pub const REQUEST_DURATION: Metric = Metric::histogram(
    "sluice_ingest_request_duration_seconds",
    &["endpoint"],
    SECONDS_BUCKETS,
    "Seconds from request start to answer.",
);
/// Seconds from the first enqueue of a request's messages to the last Kafka acknowledgement.
pub const KAFKA_PRODUCE_DURATION: Metric = Metric::histogram(
    "sluice_ingest_kafka_produce_duration_seconds",
    &[],
    SECONDS_BUCKETS,
    "Seconds from a request's first enqueue to its last Kafka acknowledgement.",
);
/// Produce failures. Label: `reason` (queue_full, timeout, kafka).
pub const KAFKA_ERRORS: Metric = Metric::counter(
    "sluice_ingest_kafka_errors_total",
    &["reason"],
    "Produce failures, by reason (queue_full, timeout, kafka).",
);
/// Messages in the producer's queue, not yet acknowledged by Kafka.
pub const PRODUCER_QUEUE: Metric = Metric::gauge(
    "sluice_ingest_producer_queue_messages",
    &[],
    "Messages in the producer's queue, not yet acknowledged by Kafka.",
);
/// Request body sizes in bytes, after decompression.
pub const REQUEST_BODY: Metric = Metric::histogram(
    "sluice_ingest_request_body_bytes",
    &[],
    BYTES_BUCKETS,
    "Request body sizes in bytes, after decompression.",
);
/// Absolute difference between a request's `sentAt` and its receipt, in seconds.
pub const CLOCK_SKEW: Metric = Metric::histogram(
    "sluice_ingest_clock_skew_seconds",
    &[],
    SKEW_BUCKETS,
    "Seconds between a request's sentAt and its receipt.",
);
/// Key cache look-ups. Label: `result` (hit, miss, shared, refresh).
pub const KEY_CACHE: Metric = Metric::counter(
    "sluice_ingest_key_cache_total",
    &["result"],
    "Write-key cache look-ups, by result: hit, miss (asked the database), shared (waited for \
     another request's look-up of the same key), refresh (asked the database ahead of expiry).",
);
/// Entries in the key cache.
pub const KEY_CACHE_ENTRIES: Metric = Metric::gauge(
    "sluice_ingest_key_cache_entries",
    &[],
    "Entries in the write-key cache.",
);
/// Dependency reachability, 1 or 0. Label: `dependency` (kafka, postgres).
pub const DEPENDENCY: Metric = Metric::gauge(
    "sluice_ingest_dependency_up",
    &["dependency"],
    "Whether a dependency answered its last probe, 1 or 0.",
);
/// Requests refused over this collector's per-key rate (also counted in requests_total with
/// status 429). No labels.
pub const RATE_LIMITED: Metric = Metric::counter(
    "sluice_ingest_rate_limited_total",
    &[],
    "Requests refused over this collector's per-key rate.",
);
/// Gauge, the per-key rate this collector process enforces, messages per second (the fleet
/// figure's share when `SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_FLEET` is set; 0: no limit).
/// Summed over the collectors it is the fleet's effective limit. No labels.
pub const RATE_LIMIT_PER_COLLECTOR: Metric = Metric::gauge(
    "sluice_ingest_rate_limit_per_key_per_second_per_collector",
    &[],
    "The per-key rate this collector enforces, messages per second (0: no limit).",
);
/// Keys with a live token bucket.
pub const RATE_LIMIT_BUCKETS: Metric = Metric::gauge(
    "sluice_ingest_rate_limit_buckets",
    &[],
    "Write keys with a live token bucket.",
);

/// Every metric of the collector, fixed names first as docs/architecture.md §7.2 lists them.
pub const ALL: &[Metric] = &[
    REQUESTS,
    EVENTS,
    REJECTED,
    REFUSED_REQUESTS,
    REQUEST_DURATION,
    KAFKA_PRODUCE_DURATION,
    KAFKA_ERRORS,
    PRODUCER_QUEUE,
    REQUEST_BODY,
    CLOCK_SKEW,
    KEY_CACHE,
    KEY_CACHE_ENTRIES,
    DEPENDENCY,
    RATE_LIMITED,
    RATE_LIMIT_PER_COLLECTOR,
    RATE_LIMIT_BUCKETS,
];

/// The name [`handle`] matches the skew buckets by.
pub const CLOCK_SKEW_SECONDS: &str = CLOCK_SKEW.name;
/// The name `health.rs` sets dependency reachability under.
pub const DEPENDENCY_UP: &str = DEPENDENCY.name;

/// `metric`'s labels paired with `values`, in its declared order: a label cannot be named
/// differently at a call site than in [`ALL`].
fn labels<const N: usize>(metric: &Metric, values: [SharedString; N]) -> Vec<Label> {
    debug_assert_eq!(metric.labels.len(), N, "{} labels", metric.name);
    metric
        .labels
        .iter()
        .zip(values)
        .map(|(key, value)| Label::new(*key, value))
        .collect()
}

fn count<const N: usize>(metric: &Metric, values: [SharedString; N], n: u64) {
    debug_assert_eq!(metric.kind, Kind::Counter, "{}", metric.name);
    ::metrics::counter!(metric.name, labels(metric, values)).increment(n);
}

fn set<const N: usize>(metric: &Metric, values: [SharedString; N], value: f64) {
    debug_assert_eq!(metric.kind, Kind::Gauge, "{}", metric.name);
    ::metrics::gauge!(metric.name, labels(metric, values)).set(value);
}

fn observe<const N: usize>(metric: &Metric, values: [SharedString; N], value: f64) {
    debug_assert_eq!(metric.kind, Kind::Histogram, "{}", metric.name);
    ::metrics::histogram!(metric.name, labels(metric, values)).record(value);
}

/// A request of `endpoint` was answered with `status`.
pub fn request_answered(endpoint: &'static str, status: StatusCode) {
    count(
        &REQUESTS,
        [endpoint.into(), status.as_u16().to_string().into()],
        1,
    );
}

/// A request of `endpoint` took `elapsed` from its start to its answer.
pub fn request_duration(endpoint: &'static str, elapsed: Duration) {
    observe(&REQUEST_DURATION, [endpoint.into()], elapsed.as_secs_f64());
}

/// A request of `endpoint` was refused with a 4xx for `reason`.
pub fn request_refused(endpoint: &'static str, reason: &'static str) {
    count(&REFUSED_REQUESTS, [endpoint.into(), reason.into()], 1);
}

/// A request was refused over its key's rate.
pub fn rate_limited() {
    count(&RATE_LIMITED, [], 1);
}

/// A body of `bytes` (decompressed) was read.
pub fn request_body(bytes: usize) {
    observe(&REQUEST_BODY, [], bytes as f64);
}

/// A request's `sentAt` was `seconds` away from its receipt.
pub fn clock_skew(seconds: f64) {
    observe(&CLOCK_SKEW, [], seconds);
}

/// One message was refused for `reason`.
pub fn message_rejected(reason: &'static str) {
    count(&REJECTED, [reason.into()], 1);
}

/// `n` messages of type `kind` ended as `outcome` (accepted, rejected, failed).
pub fn messages(kind: &'static str, outcome: &'static str, n: u64) {
    count(&EVENTS, [kind.into(), outcome.into()], n);
}

/// A produce failed for `reason` (queue_full, timeout, kafka).
pub fn kafka_error(reason: &'static str) {
    count(&KAFKA_ERRORS, [reason.into()], 1);
}

/// A request's records took `elapsed` from the first enqueue to the last acknowledgement.
pub fn kafka_produced(elapsed: Duration) {
    observe(&KAFKA_PRODUCE_DURATION, [], elapsed.as_secs_f64());
}

/// The producer holds `messages` not yet acknowledged.
pub fn producer_queue(messages: usize) {
    set(&PRODUCER_QUEUE, [], messages as f64);
}

/// How a request found its write key's row.
#[derive(Debug, Clone, Copy)]
pub enum KeyLookup {
    /// In the cache.
    Hit,
    /// Asked the database.
    Miss,
    /// Waited for another request's look-up of the same key.
    Shared,
    /// In the cache, and asked the database again ahead of the entry's expiry.
    Refresh,
}

/// A write key's row was found, in the way `how` says.
pub fn key_cache_lookup(how: KeyLookup) {
    let label = match how {
        KeyLookup::Hit => "hit",
        KeyLookup::Miss => "miss",
        KeyLookup::Shared => "shared",
        KeyLookup::Refresh => "refresh",
    };
    count(&KEY_CACHE, [label.into()], 1);
}

/// The key cache holds `entries`.
pub fn key_cache_entries(entries: usize) {
    set(&KEY_CACHE_ENTRIES, [], entries as f64);
}

/// `dependency` (kafka, postgres) answered its probe, or did not.
pub fn dependency_up(dependency: Dependency, up: bool) {
    set(
        &DEPENDENCY,
        [dependency.as_str().into()],
        if up { 1.0 } else { 0.0 },
    );
}

/// This collector enforces `per_second` messages per key (0: no limit).
pub fn rate_limit_per_collector(per_second: u32) {
    set(&RATE_LIMIT_PER_COLLECTOR, [], f64::from(per_second));
}

/// `keys` have a live token bucket.
pub fn rate_limit_buckets(keys: usize) {
    set(&RATE_LIMIT_BUCKETS, [], keys as f64);
}

/// The process-wide Prometheus recorder ([`sluice_schema::metrics::recorder`]), installed on
/// first use with each declared histogram's own buckets from [`ALL`].
pub fn handle() -> Result<PrometheusHandle, String> {
    sluice_schema::metrics::recorder(&BucketRule::from_metrics(ALL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_declared_once_with_a_name_its_kind_and_labels_allow() {
        let mut names: Vec<&str> = ALL.iter().map(|m| m.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "a name declared twice");
        for m in ALL {
            assert!(m.name.starts_with("sluice_ingest_"), "{}", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters, and only they, end in _total",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Histogram,
                !m.buckets.is_empty(),
                "{}: histograms, and only they, have buckets",
                m.name
            );
            assert!(m.buckets.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
            assert!(m.labels.len() <= 2 && !m.help.is_empty(), "{}", m.name);
        }
        assert_eq!(CLOCK_SKEW_SECONDS, "sluice_ingest_clock_skew_seconds");
        assert_eq!(DEPENDENCY_UP, "sluice_ingest_dependency_up");
    }

    #[test]
    fn labels_pair_values_with_the_declared_names_in_order() {
        let pairs = labels(&REQUESTS, ["batch".into(), "200".into()]);
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|l| (l.key(), l.value())).collect();
        assert_eq!(pairs, [("endpoint", "batch"), ("status", "200")]);
    }

    /// The label names of a rendered sample line, `le` (a histogram's bucket) left out.
    fn label_names(line: &str) -> Vec<String> {
        let Some((_, rest)) = line.split_once('{') else {
            return Vec::new();
        };
        let inner = rest.split_once('}').map_or("", |(inner, _)| inner);
        inner
            .split(',')
            .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned()))
            .filter(|k| k != "le")
            .collect()
    }

    #[test]
    fn every_metric_is_emitted_by_its_function_with_exactly_its_declared_labels() {
        // Buckets from the declarations, so histograms render as histograms (`le` labels).
        let builder = ALL
            .iter()
            .filter(|m| m.kind == Kind::Histogram)
            .try_fold(
                metrics_exporter_prometheus::PrometheusBuilder::new(),
                |b, m| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(m.name.into()),
                        m.buckets,
                    )
                },
            )
            .unwrap();
        let recorder = builder.build_recorder();
        let rendered = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            request_answered("batch", StatusCode::OK);
            request_duration("batch", Duration::from_millis(3));
            request_refused("batch", "malformed");
            rate_limited();
            request_body(10);
            clock_skew(1.5);
            message_rejected("too_large");
            messages("track", "accepted", 2);
            kafka_error("timeout");
            kafka_produced(Duration::from_millis(1));
            producer_queue(0);
            key_cache_lookup(KeyLookup::Hit);
            key_cache_entries(1);
            dependency_up(Dependency::Kafka, true);
            rate_limit_per_collector(0);
            rate_limit_buckets(0);
        });
        let text = rendered.render();
        for m in ALL {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    l.strip_prefix(m.name)
                        .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
                })
                .collect();
            assert!(!lines.is_empty(), "{} is emitted by no function", m.name);
            for line in lines {
                assert_eq!(label_names(line), m.labels, "{line}");
            }
        }
        assert!(text.contains("sluice_ingest_requests_total{endpoint=\"batch\",status=\"200\"} 1"));
        assert!(text.contains("sluice_ingest_events_total{type=\"track\",outcome=\"accepted\"} 2"));
    }

    #[test]
    fn the_architecture_table_lists_every_metric() {
        let doc = include_str!("../../docs/architecture.md");
        // The collector's section, from its heading to the next one.
        let table = doc
            .split("Collector (`ingest/src/metrics.rs`")
            .nth(1)
            .and_then(|rest| rest.split("\n### ").next())
            .expect("docs/architecture.md has the collector's metrics section");
        for m in ALL {
            assert!(
                table.contains(&format!("| `{}` |", m.name)),
                "{} is not in docs/architecture.md's collector table",
                m.name
            );
        }
    }
}
