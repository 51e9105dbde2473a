//! The store pipeline: records from the consumer thread are gathered into batches (by rows,
//! bytes and time) and each batch is stored in one PostgreSQL transaction:
//!
//! 1. keep only records of partitions still owned, at their current epoch, at or after the
//!    stored position (redeliveries drop out here);
//! 2. decode; undecodable or invalid messages become dead letters;
//! 3. ensure the events' months exist (DDL on its own connection, outside the transaction);
//! 4. in the transaction: move each partition's `writer_offset` conditionally, drop messages
//!    of erased people and deleted tenants (the suppression list), claim event ids and COPY
//!    the events (counting them into their visitors and sessions), merge visitors and
//!    sessions, apply identities (each step under a savepoint: a row PostgreSQL refuses is
//!    found by splitting and dead-lettered alone);
//! 5. produce the dead letters and wait for Kafka's acknowledgement;
//! 6. commit; then advance the in-memory positions and commit the offsets to Kafka.
//!
//! PostgreSQL unreachable: the same batch is retried with capped exponential backoff; the
//! channel behind fills up and the consumer pauses. Nothing is committed anywhere before the
//! database has the rows.

mod prepare;
mod steps;

use std::collections::HashMap;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures::future::JoinAll;
use sluice_schema::pii::PiiKeys;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consume::{Command, Record};
use crate::decode::Rejection;
use crate::dlq::{DeadLetter, Dlq};
use crate::error::StoreError;
use crate::metrics::{self, Phase, Phases};
use crate::offsets::{self, Assignments, Tp};
use crate::partitions::{ClaimDays, Months};
use crate::suppress::Suppression;
use steps::{Step, Stored};

/// Limits and timings of the pipeline, from [`crate::Config`].
#[derive(Debug, Clone)]
pub(crate) struct BatchLimits {
    /// Most records per batch.
    pub max_rows: usize,
    /// Most payload bytes per batch.
    pub max_bytes: usize,
    /// Longest a record waits before its batch is stored.
    pub flush_interval: Duration,
    /// Longest wait between retries.
    pub retry_max: Duration,
}

impl BatchLimits {
    /// The limits `config` sets.
    pub(crate) fn new(config: &crate::Config) -> BatchLimits {
        BatchLimits {
            max_rows: config.batch_max_rows,
            max_bytes: config.batch_max_bytes,
            flush_interval: Duration::from_millis(config.flush_interval_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
        }
    }
}

/// Everything a batch is stored with.
pub(crate) struct Store {
    /// Connections (the batch's transaction, partition DDL).
    pub pool: Pool,
    /// `writer_offset.consumer_group`.
    pub group: String,
    /// Dead-letter producer.
    pub dlq: Dlq,
    /// Month partitions known to exist.
    pub months: Arc<Months>,
    /// Day partitions of `event_dedup`, and the dedup window.
    pub claim_days: Arc<ClaimDays>,
    /// PII keys, when configured.
    pub keys: Option<PiiKeys>,
    /// Erased people and deleted tenants, whose messages are dropped.
    pub suppression: Suppression,
    /// Owned partitions and positions.
    pub assignments: Arc<Assignments>,
    /// Requests to the consumer thread.
    pub commands: std_mpsc::Sender<Command>,
    /// Limits.
    pub limits: BatchLimits,
}

/// Starts one [`run`] task per lane, lane `i` reading `receivers[i]`; the future ends when
/// all have. Lanes are tasks of their own: one lane's encoding runs while another awaits
/// PostgreSQL.
pub(crate) fn spawn_lanes(
    store: &Arc<Store>,
    receivers: Vec<mpsc::Receiver<Record>>,
    stop: &CancellationToken,
) -> JoinAll<JoinHandle<()>> {
    futures::future::join_all(
        receivers
            .into_iter()
            .enumerate()
            .map(|(lane, rx)| tokio::spawn(run(store.clone(), lane, rx, stop.clone()))),
    )
}

/// Runs one lane of the pipeline until `stop`; the open batch is then stored once more or
/// abandoned. Lanes own disjoint partitions, so their transactions move disjoint
/// `writer_offset` rows and commit in any order.
async fn run(
    store: Arc<Store>,
    lane: usize,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
) {
    let buffered = metrics::buffered(lane);
    let mut batch: Vec<Record> = Vec::with_capacity(store.limits.max_rows.min(100_000));
    let mut bytes = 0usize;
    let mut opened = Instant::now();
    let is_full = |rows: usize, bytes: usize| {
        rows >= store.limits.max_rows || bytes >= store.limits.max_bytes
    };
    loop {
        let mut full = is_full(batch.len(), bytes);
        let due = !batch.is_empty() && opened.elapsed() >= store.limits.flush_interval;
        if due {
            // After a slow store the channel holds records older than the interval: those
            // already waiting join this batch rather than open one that waits again.
            while !full {
                let Ok(rec) = rx.try_recv() else { break };
                bytes += rec.size();
                batch.push(rec);
                full = is_full(batch.len(), bytes);
            }
        }
        if full || due {
            store.flush(&mut batch, &stop).await;
            bytes = 0;
            buffered.set(0.0);
            if stop.is_cancelled() {
                break;
            }
        }
        let deadline = tokio::time::Instant::from_std(opened + store.limits.flush_interval);
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                // Drain what the channel already holds (bounded), then a last store attempt.
                while let Ok(rec) = rx.try_recv() {
                    batch.push(rec);
                }
                store.flush(&mut batch, &stop).await;
                break;
            }
            rec = rx.recv() => match rec {
                Some(rec) => {
                    if batch.is_empty() {
                        opened = rec.received;
                    }
                    bytes += rec.size();
                    batch.push(rec);
                    buffered.set(batch.len() as f64);
                }
                None => {
                    store.flush(&mut batch, &stop).await;
                    break;
                }
            },
            () = tokio::time::sleep_until(deadline), if !batch.is_empty() => {}
        }
    }
}

/// One partition's move in a batch.
struct Move {
    tp: Tp,
    epoch: u64,
    expected: Option<i64>,
    next: i64,
}

impl Store {
    /// Stores `batch` (retrying while PostgreSQL is down) and empties it; abandons it when
    /// `stop` fires during a failure (nothing of it is committed then).
    async fn flush(&self, batch: &mut Vec<Record>, stop: &CancellationToken) {
        let mut wait = Duration::from_millis(100);
        loop {
            let moves = self.keep_owned(batch);
            if batch.is_empty() {
                return;
            }
            let started = Instant::now();
            match self.store_once(batch, &moves).await {
                Ok(stored) => {
                    self.after_commit(batch.len(), &moves, &stored, started.elapsed());
                    batch.clear();
                    return;
                }
                Err(StoreError::OffsetConflict {
                    topic,
                    partition,
                    expected,
                }) => {
                    metrics::retry("offset_conflict");
                    tracing::warn!(%topic, partition, ?expected, "stored offset moved under this writer; repositioning the partition");
                    self.assignments.invalidate(&topic, partition);
                    let _ = self.commands.send(Command::Reposition((topic, partition)));
                }
                Err(err) => {
                    let cause = if matches!(err, StoreError::Dlq(_)) {
                        "dlq"
                    } else {
                        "transient"
                    };
                    metrics::retry(cause);
                    if stop.is_cancelled() {
                        tracing::warn!(cause = %err, rows = batch.len(), "shutting down: batch abandoned, nothing of it committed");
                        batch.clear();
                        return;
                    }
                    tracing::warn!(cause = %err, retry_in_ms = wait.as_millis() as u64, "batch not stored; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = stop.cancelled() => {}
                    }
                    wait = (wait * 2).min(self.limits.retry_max);
                }
            }
        }
    }

    /// Drops records of partitions no longer owned, fetched before a seek, or already stored;
    /// returns each remaining partition's offset move.
    fn keep_owned(&self, batch: &mut Vec<Record>) -> Vec<Move> {
        let snapshot = self.assignments.snapshot();
        // A handful of partitions per writer: a linear search beats hashing owned strings.
        let find = |topic: &str, partition: i32| {
            snapshot
                .iter()
                .position(|((t, p), _)| *p == partition && t == topic)
        };
        let mut next: HashMap<usize, i64> = HashMap::new();
        batch.retain(|r| {
            let Some(i) = find(&r.topic, r.partition) else {
                return false;
            };
            let state = snapshot[i].1;
            let keep = state.epoch != 0
                && state.epoch == r.epoch
                && state.stored_next.is_none_or(|n| r.offset >= n);
            if keep {
                let e = next.entry(i).or_insert(r.offset + 1);
                *e = (*e).max(r.offset + 1);
            }
            keep
        });
        next.into_iter()
            .map(|(i, n)| {
                let (tp, state) = &snapshot[i];
                Move {
                    tp: tp.clone(),
                    epoch: state.epoch,
                    expected: state.stored_next,
                    next: n,
                }
            })
            .collect()
    }

    async fn store_once(&self, batch: &[Record], moves: &[Move]) -> Result<Stored, StoreError> {
        let mut phases = Phases::default();
        let mut since = Instant::now();
        let prepared = self.prepare(batch);
        phases.lap(Phase::Decode, &mut since);
        let mut conn = self.pool.get().await?;
        phases.lap(Phase::Connect, &mut since);
        if !prepared.events.is_empty() {
            self.months
                .ensure_for(&conn, prepared.events.iter().map(|(_, e)| e.occurred_at))
                .await
                .map_err(|e| StoreError::Transient(e.to_string()))?;
            self.claim_days
                .ensure_for(
                    &conn,
                    prepared
                        .events
                        .iter()
                        .map(|(_, e)| prepared.claim_key(&self.claim_days, e)),
                )
                .await
                .map_err(|e| StoreError::Transient(e.to_string()))?;
        }
        phases.lap(Phase::Partitions, &mut since);
        let tx = conn.transaction().await?;
        // Offsets first: a stale writer fails here before doing any work, and the row locks
        // serialise two writers that both think they own a partition.
        for m in moves {
            offsets::advance_in(&tx, &self.group, &m.tp, m.expected, m.next).await?;
        }
        phases.lap(Phase::Offsets, &mut since);
        let mut prepared = prepared;
        let suppressed = self.suppress(&tx, &mut prepared).await?;
        phases.lap(Phase::Suppress, &mut since);
        let mut stored = Stored {
            duplicates: prepared.in_batch_duplicates,
            suppressed,
            phases,
            ..Stored::default()
        };
        let mut refused: Vec<(usize, Rejection)> = Vec::new();
        for (step, phase) in [
            (Step::Events, None),
            (Step::Visitors, Some(Phase::Visitors)),
            (Step::Sessions, Some(Phase::Sessions)),
            (Step::Identities, Some(Phase::Identities)),
        ] {
            let bad = self.split_step(&tx, step, &prepared, &mut stored).await?;
            refused.extend(bad);
            // The events step times its own parts (claim, events, counters).
            match phase {
                Some(phase) => stored.phases.lap(phase, &mut since),
                None => since = Instant::now(),
            }
        }
        self.dead_letter(batch, prepared.rejected.iter().chain(refused.iter()))
            .await?;
        stored.phases.lap(Phase::DeadLetter, &mut since);
        tx.commit().await?;
        stored.phases.lap(Phase::Commit, &mut since);
        tracing::debug!(
            phases_ms = ?stored.phases.millis(),
            events = prepared.events.len(),
            visitors = prepared.visitors.len(),
            sessions = prepared.sessions.len(),
            identities = prepared.identities.len(),
            identity_waves = stored.waves,
            identity_reach_ms = stored.reach_time.as_millis() as u64,
            "batch timings"
        );
        Ok(stored)
    }

    /// Sends the rejected messages of `batch` (index, reason) to the DLQ, each logged, inside
    /// the batch's transaction: the offsets move only when the letters are out.
    async fn dead_letter(
        &self,
        batch: &[Record],
        rejections: impl Iterator<Item = &(usize, Rejection)>,
    ) -> Result<(), StoreError> {
        let letters: Vec<DeadLetter<'_>> = rejections
            .map(|(i, rej)| {
                let r = &batch[*i];
                DeadLetter {
                    topic: &r.topic,
                    partition: r.partition,
                    offset: r.offset,
                    key: r.key.as_deref(),
                    payload: r.payload.as_deref(),
                    reason: rej.reason,
                    detail: &rej.detail,
                }
            })
            .collect();
        if letters.is_empty() {
            return Ok(());
        }
        for l in &letters {
            tracing::warn!(
                topic = l.topic,
                partition = l.partition,
                offset = l.offset,
                reason = l.reason,
                detail = l.detail,
                "dead-lettering a message"
            );
        }
        self.dlq.send(&letters).await.map_err(StoreError::Dlq)
    }

    fn after_commit(&self, messages: usize, moves: &[Move], stored: &Stored, took: Duration) {
        for m in moves {
            self.assignments.advance(&m.tp, m.epoch, m.next);
        }
        let commit: Vec<(Tp, i64)> = moves.iter().map(|m| (m.tp.clone(), m.next)).collect();
        // The consumer thread may be gone at shutdown; Kafka's copy is advisory anyway.
        let _ = self.commands.send(Command::Commit(commit));
        metrics::rows("event", stored.events);
        metrics::rows("visitor", stored.visitors);
        metrics::rows("session", stored.sessions);
        metrics::rows("lead", stored.leads);
        metrics::rows("identity_link", stored.links);
        for (kind, n) in ["event", "visitor", "session", "identity"]
            .into_iter()
            .zip(stored.suppressed)
        {
            if n > 0 {
                metrics::suppressed(kind, n);
            }
        }
        if stored.duplicates > 0 {
            metrics::duplicates(stored.duplicates);
        }
        metrics::batch(messages, stored.phases.get(Phase::Events), took);
        stored.phases.record();
        tracing::debug!(
            messages,
            events = stored.events,
            duplicates = stored.duplicates,
            took_ms = took.as_millis() as u64,
            "batch stored"
        );
    }
}
