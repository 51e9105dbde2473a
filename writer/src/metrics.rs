//! The writer's metrics (docs/architecture.md §7.3), named in one place. Emitted once per batch or
//! per partition, never per message, with bounded label values.

use std::time::Duration;

use sluice_schema::metrics::BucketRule;

/// Counter, rows stored per table. Labels: `table` (event, visitor, session, lead,
/// identity_link).
pub const ROWS_TOTAL: &str = "sluice_writer_rows_total";
/// Histogram, messages per stored batch. No labels.
pub const BATCH_ROWS: &str = "sluice_writer_batch_rows";
/// Histogram, seconds spent in the event COPY of a batch. No labels.
pub const COPY_DURATION: &str = "sluice_writer_copy_duration_seconds";
/// Histogram, seconds from the start of a batch's transaction to its commit. No labels.
pub const COMMIT_DURATION: &str = "sluice_writer_batch_duration_seconds";
/// Gauge, messages between a partition's high watermark and the writer's position. Labels:
/// `topic`, `partition`.
pub const CONSUMER_LAG: &str = "sluice_writer_consumer_lag";
/// Counter, messages dead-lettered. Labels: `reason` (a fixed snake_case set).
pub const DLQ_TOTAL: &str = "sluice_writer_dlq_total";
/// Counter, batch attempts that failed and were retried. Labels: `cause` (transient,
/// offset_conflict, dlq).
pub const RETRIES_TOTAL: &str = "sluice_writer_retries_total";
/// Counter, events dropped because their event id was already claimed (client retries,
/// redelivery). No labels.
pub const DUPLICATES_TOTAL: &str = "sluice_writer_duplicate_events_total";
/// Counter, messages dropped because they belong to an erased person or a deleted tenant
/// (the suppression list). Labels: `kind` (event, visitor, session, identity).
pub const SUPPRESSED_TOTAL: &str = "sluice_writer_suppressed_messages_total";
/// Gauge, person entries of the suppression list held in memory (bounded by
/// `SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES`). No labels.
pub const SUPPRESSION_CACHE_ENTRIES: &str = "sluice_writer_suppression_cache_entries";
/// Gauge, 1 once the suppression list outgrew its bound and batches ask the database. No
/// labels.
pub const SUPPRESSION_CACHE_OVERFLOW: &str = "sluice_writer_suppression_cache_overflow";
/// Counter, expired `event_dedup` claims deleted (older than the dedup window). No labels.
pub const DEDUP_PRUNED_TOTAL: &str = "sluice_writer_dedup_pruned_total";
/// Counter, month partitions created by the writer. No labels.
pub const PARTITIONS_CREATED: &str = "sluice_writer_partitions_created_total";
/// Gauge, messages in a lane's open batch, not yet stored. Labels: `lane` (0 to lanes - 1).
pub const BUFFERED: &str = "sluice_writer_buffered_messages";
/// Gauge, 1 while consumption is paused because the store is behind or PostgreSQL is down.
pub const PAUSED: &str = "sluice_writer_paused";
/// Gauge, the end (Unix epoch seconds, UTC) of the last month whose event partitions this
/// writer has ensured ahead; set each time the ensure-ahead pass succeeds (start-up, hourly).
/// An alert fires when it comes within two months of now (partitions not being created).
/// No labels.
pub const PARTITIONS_UNTIL: &str = "sluice_writer_partitions_until_timestamp_seconds";
/// Counter, rebalance events. Labels: `kind` (assign, revoke).
pub const REBALANCES_TOTAL: &str = "sluice_writer_rebalances_total";

/// The writer's histogram buckets (docs/architecture.md §7.3): batch sizes from a single
/// straggler to the largest configurable batch; COPY and batch durations from a few ms (a
/// small batch) to the retry ceiling and beyond.
pub const BUCKETS: &[BucketRule] = &[
    BucketRule::name(
        BATCH_ROWS,
        &[
            1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10_000.0, 20_000.0, 50_000.0,
            100_000.0,
        ],
    ),
    BucketRule::suffix(
        "_seconds",
        &[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ],
    ),
];

/// Records rows stored in `table`.
pub(crate) fn rows(table: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(ROWS_TOTAL, "table" => table).increment(n);
    }
}

/// Records a dead-lettered message.
pub(crate) fn dlq(reason: &'static str) {
    metrics::counter!(DLQ_TOTAL, "reason" => reason).increment(1);
}

/// Records one retried batch attempt.
pub(crate) fn retry(cause: &'static str) {
    metrics::counter!(RETRIES_TOTAL, "cause" => cause).increment(1);
}

/// Records a stored batch's size and durations.
pub(crate) fn batch(messages: usize, copy: Duration, total: Duration) {
    metrics::histogram!(BATCH_ROWS).record(messages as f64);
    metrics::histogram!(COPY_DURATION).record(copy.as_secs_f64());
    metrics::histogram!(COMMIT_DURATION).record(total.as_secs_f64());
}
