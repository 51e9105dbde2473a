//! The writer's metrics (docs/architecture.md §7.3), each defined once here with its kind,
//! labels and buckets, and emitted only through the functions below. Emitted once per batch or
//! per partition, never per message, with bounded label values.

use std::time::{Duration, Instant};

use sluice_schema::metrics::Metric;

/// Batch sizes: from a single straggler to the largest configurable batch.
pub const ROWS_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10_000.0, 20_000.0, 50_000.0, 100_000.0,
];

/// COPY and batch durations: a few ms (small batch) to the retry ceiling and beyond.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Rows stored per table; `table` is event, visitor, session, lead or identity_link.
pub const ROWS_TOTAL: Metric = Metric::counter(
    "sluice_writer_rows_total",
    &["table"],
    "Rows stored per table.",
);
/// Messages per stored batch.
pub const BATCH_ROWS_HISTOGRAM: Metric = Metric::histogram(
    "sluice_writer_batch_rows",
    &[],
    ROWS_BUCKETS,
    "Messages per stored batch.",
);
/// The batch-size histogram's name, for the recorder's bucket setting in health.rs (which
/// moves to the shared runtime shell, reading [`ALL`]).
pub const BATCH_ROWS: &str = BATCH_ROWS_HISTOGRAM.name;
/// Seconds spent in the event COPY of a batch.
pub const COPY_DURATION: Metric = Metric::histogram(
    "sluice_writer_copy_duration_seconds",
    &[],
    SECONDS_BUCKETS,
    "Seconds spent in the event COPY of a batch.",
);
/// Seconds from the start of a batch's transaction to its commit.
pub const BATCH_DURATION: Metric = Metric::histogram(
    "sluice_writer_batch_duration_seconds",
    &[],
    SECONDS_BUCKETS,
    "Seconds from the start of a batch's transaction to its commit.",
);
/// Messages between a partition's high watermark and the writer's position.
pub const CONSUMER_LAG: Metric = Metric::gauge(
    "sluice_writer_consumer_lag",
    &["topic", "partition"],
    "Messages between a partition's high watermark and the writer's stored position.",
);
/// Messages dead-lettered; `reason` is a fixed snake_case set.
pub const DLQ_TOTAL: Metric = Metric::counter(
    "sluice_writer_dlq_total",
    &["reason"],
    "Messages dead-lettered, by reason.",
);
/// Batch attempts that failed and were retried; `cause` is transient, offset_conflict or dlq.
pub const RETRIES_TOTAL: Metric = Metric::counter(
    "sluice_writer_retries_total",
    &["cause"],
    "Batch attempts that failed and were retried, by cause.",
);
/// Events dropped because their event id was already claimed (client retries, redelivery).
pub const DUPLICATE_EVENTS_TOTAL: Metric = Metric::counter(
    "sluice_writer_duplicate_events_total",
    &[],
    "Events dropped because their event id was already claimed.",
);
/// Messages dropped because they belong to an erased person or a deleted tenant (the
/// suppression list); `kind` is event, visitor, session or identity.
pub const SUPPRESSED_MESSAGES_TOTAL: Metric = Metric::counter(
    "sluice_writer_suppressed_messages_total",
    &["kind"],
    "Messages dropped because they belong to an erased person or a deleted tenant.",
);
/// Person entries of the suppression list held in memory (bounded by
/// `SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES`).
pub const SUPPRESSION_CACHE_ENTRIES: Metric = Metric::gauge(
    "sluice_writer_suppression_cache_entries",
    &[],
    "Person entries of the suppression list held in memory.",
);
/// 1 once the suppression list outgrew its bound and batches ask the database.
pub const SUPPRESSION_CACHE_OVERFLOW: Metric = Metric::gauge(
    "sluice_writer_suppression_cache_overflow",
    &[],
    "1 once the suppression list outgrew its bound and batches ask the database.",
);
/// Day partitions of `event_dedup` created by the writer (ahead of time or on demand).
pub const DEDUP_DAYS_CREATED_TOTAL: Metric = Metric::counter(
    "sluice_writer_dedup_days_created_total",
    &[],
    "Day partitions of event_dedup created.",
);
/// Day partitions of `event_dedup` dropped whole: their claims were past the dedup window.
pub const DEDUP_DAYS_DROPPED_TOTAL: Metric = Metric::counter(
    "sluice_writer_dedup_days_dropped_total",
    &[],
    "Day partitions of event_dedup dropped (past the dedup window).",
);
/// Month partitions created by the writer.
pub const PARTITIONS_CREATED_TOTAL: Metric = Metric::counter(
    "sluice_writer_partitions_created_total",
    &[],
    "Month partitions created by the writer.",
);
/// Messages in a lane's open batch, not yet stored; `lane` is 0 to lanes - 1.
pub const BUFFERED_MESSAGES: Metric = Metric::gauge(
    "sluice_writer_buffered_messages",
    &["lane"],
    "Messages in a lane's open batch, not yet stored.",
);
/// 1 while consumption is paused because the store is behind or PostgreSQL is down.
pub const PAUSED: Metric = Metric::gauge(
    "sluice_writer_paused",
    &[],
    "1 while consumption is paused because the store is behind or PostgreSQL is down.",
);
/// The end (Unix epoch seconds, UTC) of the last month whose event partitions this writer has
/// ensured ahead; set each time the ensure-ahead pass succeeds (start-up, hourly). An alert
/// fires when it comes within two months of now (partitions not being created).
pub const PARTITIONS_UNTIL: Metric = Metric::gauge(
    "sluice_writer_partitions_until_timestamp_seconds",
    &[],
    "End (Unix seconds) of the last month whose event partitions are ensured ahead.",
);
/// Rebalance events; `kind` is assign or revoke.
pub const REBALANCES_TOTAL: Metric = Metric::counter(
    "sluice_writer_rebalances_total",
    &["kind"],
    "Rebalance events, by kind.",
);

/// Seconds of a stored batch by phase of its transaction. Label: `step` ([`Phase`]).
pub const STEP_DURATION: Metric = Metric::histogram(
    "sluice_writer_step_duration_seconds",
    &["step"],
    SECONDS_BUCKETS,
    "Seconds a stored batch spent per phase: decode, connect, partitions, offsets, suppress, \
     claim (dedup), events (COPY), counters, visitors, sessions, identities, dead_letter, commit.",
);

/// Every metric the writer exports: what the recorder and the deploy checks read.
pub const ALL: &[Metric] = &[
    ROWS_TOTAL,
    BATCH_ROWS_HISTOGRAM,
    COPY_DURATION,
    BATCH_DURATION,
    CONSUMER_LAG,
    DLQ_TOTAL,
    RETRIES_TOTAL,
    DUPLICATE_EVENTS_TOTAL,
    SUPPRESSED_MESSAGES_TOTAL,
    SUPPRESSION_CACHE_ENTRIES,
    SUPPRESSION_CACHE_OVERFLOW,
    DEDUP_DAYS_CREATED_TOTAL,
    DEDUP_DAYS_DROPPED_TOTAL,
    PARTITIONS_CREATED_TOTAL,
    BUFFERED_MESSAGES,
    PAUSED,
    PARTITIONS_UNTIL,
    REBALANCES_TOTAL,
    STEP_DURATION,
];

/// Records rows stored in `table`.
pub(crate) fn rows(table: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!(ROWS_TOTAL.name, "table" => table).increment(n);
    }
}

/// Records a dead-lettered message.
pub(crate) fn dlq(reason: &'static str) {
    metrics::counter!(DLQ_TOTAL.name, "reason" => reason).increment(1);
}

/// Records one retried batch attempt.
pub(crate) fn retry(cause: &'static str) {
    metrics::counter!(RETRIES_TOTAL.name, "cause" => cause).increment(1);
}

/// Records a stored batch's size and durations.
pub(crate) fn batch(messages: usize, copy: Duration, total: Duration) {
    metrics::histogram!(BATCH_ROWS_HISTOGRAM.name).record(messages as f64);
    metrics::histogram!(COPY_DURATION.name).record(copy.as_secs_f64());
    metrics::histogram!(BATCH_DURATION.name).record(total.as_secs_f64());
}

/// A phase of a batch's transaction, in the order they run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// Kafka records to typed messages.
    Decode,
    /// Waiting for a pooled connection.
    Connect,
    /// Months and dedup days ensured.
    Partitions,
    /// Stored offsets checked and moved.
    Offsets,
    /// Erased visitors' messages dropped.
    Suppress,
    /// The dedup claim of the events.
    Claim,
    /// The event COPY.
    Events,
    /// Visitor and session counters of the claimed events.
    Counters,
    Visitors,
    Sessions,
    Identities,
    DeadLetter,
    Commit,
}

impl Phase {
    const ALL: [Phase; 13] = [
        Phase::Decode,
        Phase::Connect,
        Phase::Partitions,
        Phase::Offsets,
        Phase::Suppress,
        Phase::Claim,
        Phase::Events,
        Phase::Counters,
        Phase::Visitors,
        Phase::Sessions,
        Phase::Identities,
        Phase::DeadLetter,
        Phase::Commit,
    ];

    fn label(self) -> &'static str {
        match self {
            Phase::Decode => "decode",
            Phase::Connect => "connect",
            Phase::Partitions => "partitions",
            Phase::Offsets => "offsets",
            Phase::Suppress => "suppress",
            Phase::Claim => "claim",
            Phase::Events => "events",
            Phase::Counters => "counters",
            Phase::Visitors => "visitors",
            Phase::Sessions => "sessions",
            Phase::Identities => "identities",
            Phase::DeadLetter => "dead_letter",
            Phase::Commit => "commit",
        }
    }
}

/// Where one batch's attempt spent its time, by [`Phase`]: what tells an operator (and the
/// benchmark suite) which table a slow writer waits on.
#[derive(Debug, Default, Clone)]
pub(crate) struct Phases([Duration; Phase::ALL.len()]);

impl Phases {
    /// Adds `took` to `phase`.
    pub(crate) fn add(&mut self, phase: Phase, took: Duration) {
        self.0[phase as usize] += took;
    }

    /// Adds the time from `since` to now to `phase`, and moves `since` to now.
    pub(crate) fn lap(&mut self, phase: Phase, since: &mut Instant) {
        let now = Instant::now();
        self.add(phase, now - *since);
        *since = now;
    }

    /// The time of `phase`.
    pub(crate) fn get(&self, phase: Phase) -> Duration {
        self.0[phase as usize]
    }

    /// Milliseconds by phase label, for the debug log.
    pub(crate) fn millis(&self) -> Vec<(&'static str, u128)> {
        Phase::ALL
            .iter()
            .map(|p| (p.label(), self.get(*p).as_millis()))
            .collect()
    }

    /// Counts a stored batch's phases.
    pub(crate) fn record(&self) {
        for phase in Phase::ALL {
            let took = self.get(phase);
            if !took.is_zero() {
                metrics::histogram!(STEP_DURATION.name, "step" => phase.label())
                    .record(took.as_secs_f64());
            }
        }
    }
}

/// Records `n` events dropped as already claimed.
pub(crate) fn duplicates(n: u64) {
    metrics::counter!(DUPLICATE_EVENTS_TOTAL.name).increment(n);
}

/// Records `n` messages of `kind` dropped by the suppression list.
pub(crate) fn suppressed(kind: &'static str, n: u64) {
    metrics::counter!(SUPPRESSED_MESSAGES_TOTAL.name, "kind" => kind).increment(n);
}

/// Sets the suppression list's size and whether it overflowed its bound.
pub(crate) fn suppression_cache(entries: usize, overflow: bool) {
    metrics::gauge!(SUPPRESSION_CACHE_ENTRIES.name).set(entries as f64);
    metrics::gauge!(SUPPRESSION_CACHE_OVERFLOW.name).set(f64::from(u8::from(overflow)));
}

/// Records `n` dedup day partitions created.
pub(crate) fn dedup_days_created(n: u64) {
    metrics::counter!(DEDUP_DAYS_CREATED_TOTAL.name).increment(n);
}

/// Records `n` dedup day partitions dropped.
pub(crate) fn dedup_days_dropped(n: u64) {
    metrics::counter!(DEDUP_DAYS_DROPPED_TOTAL.name).increment(n);
}

/// Records `n` month partitions created.
pub(crate) fn partitions_created(n: u64) {
    metrics::counter!(PARTITIONS_CREATED_TOTAL.name).increment(n);
}

/// Sets the end (Unix seconds) of the last month ensured ahead.
pub(crate) fn partitions_until(unix_seconds: i64) {
    metrics::gauge!(PARTITIONS_UNTIL.name).set(unix_seconds as f64);
}

/// The gauge of messages buffered in `lane`'s open batch (a handle: the lane sets it often).
pub(crate) fn buffered(lane: usize) -> metrics::Gauge {
    metrics::gauge!(BUFFERED_MESSAGES.name, "lane" => lane.to_string())
}

/// Sets whether any lane's partitions are paused.
pub(crate) fn paused(paused: bool) {
    metrics::gauge!(PAUSED.name).set(if paused { 1.0 } else { 0.0 });
}

/// Sets a partition's lag, in messages.
pub(crate) fn lag(topic: &str, partition: i32, messages: i64) {
    metrics::gauge!(CONSUMER_LAG.name, "topic" => topic.to_owned(), "partition" => partition.to_string())
        .set(messages.max(0) as f64);
}

/// Records a rebalance event of `kind` (assign, revoke).
pub(crate) fn rebalance(kind: &'static str) {
    metrics::counter!(REBALANCES_TOTAL.name, "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_schema::metrics::Kind;
    use std::collections::HashSet;

    #[test]
    fn every_metric_is_named_for_the_writer_once_with_its_kind_rules() {
        let mut names = HashSet::new();
        for m in ALL {
            assert!(names.insert(m.name), "{} listed twice", m.name);
            assert!(m.name.starts_with("sluice_writer_"), "{}", m.name);
            assert!(!m.help.is_empty(), "{} has no help", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                Kind::Histogram => {
                    assert!(!m.buckets.is_empty(), "{} has no buckets", m.name);
                    assert!(m.buckets.windows(2).all(|w| w[0] < w[1]), "{}", m.name);
                }
                Kind::Gauge => assert!(m.buckets.is_empty(), "{}", m.name),
            }
        }
        assert_eq!(ALL.len(), 19);
        assert_eq!(BATCH_ROWS, "sluice_writer_batch_rows");
        // The misleadingly named constant of before: a batch's whole duration, not a commit's.
        assert_eq!(BATCH_DURATION.name, "sluice_writer_batch_duration_seconds");
    }
}
