//! Every metric the collector exports (docs/architecture.md §7.2, fixed names first), the recorder.
//! Label values are bounded: endpoints, statuses, types, outcomes and reasons are fixed sets.

use metrics_exporter_prometheus::PrometheusHandle;
use sluice_schema::metrics::{BucketRule, SECONDS_BUCKETS};

/// Requests answered. Labels: `endpoint` (batch, track, ..., pixel), `status` (HTTP code).
pub const REQUESTS_TOTAL: &str = "sluice_ingest_requests_total";
/// Messages seen. Labels: `type` (track, page, ..., identify, alias), `outcome` (accepted,
/// rejected, failed: refused by Kafka or timed out).
pub const EVENTS_TOTAL: &str = "sluice_ingest_events_total";
/// Refused messages. Label: `reason` ([`crate::payload::Reason`]).
pub const REJECTED_TOTAL: &str = "sluice_ingest_rejected_total";
/// Requests answered with a 4xx: bodies or keys sluice cannot take. Labels: `endpoint` (as in
/// requests_total), `reason` ([`crate::error::IngestError::reason`]: malformed, too_large,
/// missing_key, ..., or the message reason when every message was refused).
pub const REFUSED_REQUESTS_TOTAL: &str = "sluice_ingest_refused_requests_total";
/// Seconds from request start to answer. Label: `endpoint`.
pub const REQUEST_DURATION_SECONDS: &str = "sluice_ingest_request_duration_seconds";
/// Seconds from the first enqueue of a request's messages to the last Kafka acknowledgement.
pub const KAFKA_PRODUCE_DURATION_SECONDS: &str = "sluice_ingest_kafka_produce_duration_seconds";
/// Produce failures. Label: `reason` (queue_full, timeout, kafka).
pub const KAFKA_ERRORS_TOTAL: &str = "sluice_ingest_kafka_errors_total";
/// Messages in the producer's queue, not yet acknowledged by Kafka.
pub const PRODUCER_QUEUE_MESSAGES: &str = "sluice_ingest_producer_queue_messages";
/// Request body sizes in bytes, after decompression.
pub const REQUEST_BODY_BYTES: &str = "sluice_ingest_request_body_bytes";
/// Absolute difference between a request's `sentAt` and its receipt, in seconds.
pub const CLOCK_SKEW_SECONDS: &str = "sluice_ingest_clock_skew_seconds";
/// Key cache look-ups. Label: `result` (hit, miss).
pub const KEY_CACHE_TOTAL: &str = "sluice_ingest_key_cache_total";
/// Entries in the key cache.
pub const KEY_CACHE_ENTRIES: &str = "sluice_ingest_key_cache_entries";
/// Dependency reachability, 1 or 0. Label: `dependency` (kafka, postgres).
pub const DEPENDENCY_UP: &str = "sluice_ingest_dependency_up";
/// Requests refused over this collector's per-key rate (also counted in requests_total with
/// status 429). No labels.
pub const RATE_LIMITED_TOTAL: &str = "sluice_ingest_rate_limited_total";
/// Gauge, the per-key rate this collector process enforces, messages per second (the fleet
/// figure's share when `SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND_FLEET` is set; 0: no limit).
/// Summed over the collectors it is the fleet's effective limit. No labels.
pub const RATE_LIMIT_PER_COLLECTOR: &str =
    "sluice_ingest_rate_limit_per_key_per_second_per_collector";
/// Keys with a live token bucket.
pub const RATE_LIMIT_BUCKETS: &str = "sluice_ingest_rate_limit_buckets";

/// The collector's histogram buckets (docs/architecture.md §7.2): durations 0.5 ms to 10 s,
/// body sizes 256 B to 1 MiB (the request bound is 500 kB), clock skew 0.1 s to a day.
pub const BUCKETS: &[BucketRule] = &[
    BucketRule::suffix("_duration_seconds", SECONDS_BUCKETS),
    BucketRule::suffix(
        "_bytes",
        &[
            256.0,
            1024.0,
            4096.0,
            16384.0,
            65536.0,
            262_144.0,
            524_288.0,
            1_048_576.0,
        ],
    ),
    BucketRule::name(
        CLOCK_SKEW_SECONDS,
        &[0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0],
    ),
];

/// The process-wide Prometheus recorder ([`sluice_schema::metrics::recorder`]), installed on
/// first use with [`BUCKETS`].
pub fn handle() -> Result<PrometheusHandle, String> {
    sluice_schema::metrics::recorder(BUCKETS)
}

/// Sets [`DEPENDENCY_UP`] from a readiness probe's outcome.
pub fn dependency_up(dependency: sluice_schema::readiness::Dependency, up: bool) {
    ::metrics::gauge!(DEPENDENCY_UP, "dependency" => dependency.as_str()).set(if up {
        1.0
    } else {
        0.0
    });
}
