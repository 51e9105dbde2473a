//! Every metric the collector exports (docs/architecture.md §7.2, fixed names first), the recorder.
//! Label values are bounded: endpoints, statuses, types, outcomes and reasons are fixed sets.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// The process-wide Prometheus recorder, installed on first use. Several collectors in one
/// process (tests) share it, since `metrics` allows one global recorder.
pub fn handle() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let bytes = [
                256.0,
                1024.0,
                4096.0,
                16384.0,
                65536.0,
                262_144.0,
                524_288.0,
                1_048_576.0,
            ];
            let skew = [0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &bytes))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(CLOCK_SKEW_SECONDS.into()), &skew)
                })
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
}
