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

use std::collections::{HashMap, HashSet};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use sluice_schema::messages::{
    EventMessage, IdentityMessage, RawObject, SessionMessage, VisitorMessage,
};
use sluice_schema::pii::PiiKeys;
use tokio::sync::mpsc;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::consume::{Command, Record};
use crate::decode::{Decoded, Rejection};
use crate::dlq::{DeadLetter, Dlq};
use crate::error::{is_concurrent_lead_insert, is_data_error, StoreError};
use crate::offsets::{self, Assignments, Tp};
use crate::partitions::{ClaimDays, Months};
use crate::suppress::{Subject, Suppression};
use crate::{claim, identity, merge, metrics};
use sluice_schema::db::describe;

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

/// Runs one lane of the pipeline until `stop`; the open batch is then stored once more or
/// abandoned. Lanes own disjoint partitions, so their transactions move disjoint
/// `writer_offset` rows and commit in any order.
pub(crate) async fn run(
    store: Arc<Store>,
    lane: usize,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
) {
    let buffered = metrics::buffered(lane);
    let mut batch: Vec<Record> = Vec::with_capacity(store.limits.max_rows.min(100_000));
    let mut bytes = 0usize;
    let mut opened = Instant::now();
    loop {
        let full = batch.len() >= store.limits.max_rows || bytes >= store.limits.max_bytes;
        let due = !batch.is_empty() && opened.elapsed() >= store.limits.flush_interval;
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
                        opened = Instant::now();
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

/// A batch's decoded content, indexes pointing back into the batch's records.
#[derive(Default)]
struct Prepared<'a> {
    events: Vec<(usize, &'a EventMessage<RawObject>)>,
    visitors: Vec<(usize, &'a VisitorMessage)>,
    sessions: Vec<(usize, &'a SessionMessage)>,
    identities: Vec<(usize, &'a IdentityMessage)>,
    /// Messages refused before the database saw them.
    rejected: Vec<(usize, Rejection)>,
    /// Events dropped as duplicates of an earlier one in the same batch.
    in_batch_duplicates: u64,
    /// The writer's clock when the batch was prepared: it bounds the dedup claim keys.
    now: DateTime<Utc>,
}

impl Prepared<'_> {
    /// The dedup claim key of `e` (see [`sluice_schema::dedup::Window::key_ms`]).
    fn claim_key(&self, days: &ClaimDays, e: &EventMessage<RawObject>) -> i64 {
        days.window.key_ms(e.timestamp, e.received_at, self.now)
    }
}

/// One partition's move in a batch.
struct Move {
    tp: Tp,
    epoch: u64,
    expected: Option<i64>,
    next: i64,
}

/// Steps of the transaction that can be split to isolate a refused row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Events,
    Visitors,
    Sessions,
    Identities,
}

/// What the steps stored, for the metrics.
#[derive(Debug, Default)]
struct Stored {
    events: u64,
    duplicates: u64,
    visitors: u64,
    sessions: u64,
    leads: u64,
    links: u64,
    waves: u64,
    reach_time: Duration,
    copy_time: Duration,
    /// Messages dropped by the suppression list: events, visitors, sessions, identities.
    suppressed: [u64; 4],
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

    /// Sorts the batch's messages (decoded by the consumer thread, off this task) by step.
    fn prepare<'a>(&self, batch: &'a [Record]) -> Prepared<'a> {
        let mut p = Prepared {
            now: Utc::now(),
            ..Prepared::default()
        };
        let mut seen: HashSet<(i64, Uuid)> = HashSet::new();
        for (i, r) in batch.iter().enumerate() {
            match &r.decoded {
                Ok(Decoded::Event(e)) => {
                    // The same messageId twice in one batch: the first one stands.
                    if seen.insert((e.tenant_id, e.event_id)) {
                        p.events.push((i, e));
                    } else {
                        p.in_batch_duplicates += 1;
                    }
                }
                Ok(Decoded::Visitor(v)) => p.visitors.push((i, v)),
                Ok(Decoded::Session(s)) => p.sessions.push((i, s)),
                Ok(Decoded::Identity(m)) => match identity::precheck(m, self.keys.as_ref()) {
                    Ok(()) => p.identities.push((i, m)),
                    Err(rej) => p.rejected.push((i, rej)),
                },
                Err(rej) => p.rejected.push((i, rej.clone())),
            }
        }
        p
    }

    async fn store_once(&self, batch: &[Record], moves: &[Move]) -> Result<Stored, StoreError> {
        let decode_started = Instant::now();
        let prepared = self.prepare(batch);
        let decode_time = decode_started.elapsed();
        let mut conn = self.pool.get().await?;
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
        let tx = conn.transaction().await?;
        // Offsets first: a stale writer fails here before doing any work, and the row locks
        // serialise two writers that both think they own a partition.
        for m in moves {
            offsets::advance_in(&tx, &self.group, &m.tp, m.expected, m.next).await?;
        }
        let mut prepared = prepared;
        let suppressed = self.suppress(&tx, &mut prepared).await?;
        let mut stored = Stored {
            duplicates: prepared.in_batch_duplicates,
            suppressed,
            ..Stored::default()
        };
        let mut refused: Vec<(usize, Rejection)> = Vec::new();
        // Per-step times for the debug log: which table a slow batch spends its time on.
        let mut step_ms = [0u64; 4];
        for (k, step) in [
            Step::Events,
            Step::Visitors,
            Step::Sessions,
            Step::Identities,
        ]
        .into_iter()
        .enumerate()
        {
            let step_started = Instant::now();
            let bad = self.split_step(&tx, step, &prepared, &mut stored).await?;
            if step == Step::Events {
                stored.copy_time = step_started.elapsed();
            }
            step_ms[k] = step_started.elapsed().as_millis() as u64;
            refused.extend(bad);
        }
        self.dead_letter(batch, prepared.rejected.iter().chain(refused.iter()))
            .await?;
        let before_commit = Instant::now();
        tx.commit().await?;
        tracing::debug!(
            decode_ms = decode_time.as_millis() as u64,
            events_ms = step_ms[0],
            visitors_ms = step_ms[1],
            sessions_ms = step_ms[2],
            identities_ms = step_ms[3],
            events = prepared.events.len(),
            visitors = prepared.visitors.len(),
            sessions = prepared.sessions.len(),
            identities = prepared.identities.len(),
            identity_waves = stored.waves,
            identity_reach_ms = stored.reach_time.as_millis() as u64,
            commit_ms = before_commit.elapsed().as_millis() as u64,
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

    /// Drops the prepared messages the suppression list names (read in `tx`); returns how
    /// many of each kind.
    async fn suppress(
        &self,
        tx: &Transaction<'_>,
        p: &mut Prepared<'_>,
    ) -> Result<[u64; 4], tokio_postgres::Error> {
        let mut subjects: Vec<Subject<'_>> = Vec::with_capacity(
            p.events.len() + p.visitors.len() + p.sessions.len() + p.identities.len(),
        );
        for (_, e) in &p.events {
            subjects.push(Subject {
                tenant: e.tenant_id,
                user_ids: [e.user_id.as_deref(), None],
                anonymous_ids: [e.anonymous_id.as_deref(), None],
                ..Subject::default()
            });
        }
        for (_, v) in &p.visitors {
            subjects.push(Subject {
                tenant: v.tenant_id,
                user_ids: [v.user_id.as_deref(), None],
                anonymous_ids: [Some(v.anonymous_id.as_str()), None],
                ..Subject::default()
            });
        }
        for (_, m) in &p.sessions {
            subjects.push(Subject {
                tenant: m.tenant_id,
                user_ids: [m.user_id.as_deref(), None],
                anonymous_ids: [m.anonymous_id.as_deref(), None],
                ..Subject::default()
            });
        }
        for (_, m) in &p.identities {
            // An alias's previous id is a user id or an anonymous id: either erased one counts.
            let previous = m.previous_id.as_deref();
            subjects.push(
                Subject {
                    tenant: m.tenant_id,
                    user_ids: [m.user_id.as_deref(), previous],
                    anonymous_ids: [m.anonymous_id.as_deref(), previous],
                    ..Subject::default()
                }
                .with_traits(&m.traits)
                .with_sealed(m.pii.as_ref()),
            );
        }
        let verdicts = self
            .suppression
            .check(tx, &subjects, self.keys.as_ref())
            .await?;
        drop(subjects);
        let mut verdicts = verdicts.into_iter();
        let mut dropped = [0u64; 4];
        let mut keep = |k: usize| {
            let suppressed = verdicts.next().unwrap_or(false);
            dropped[k] += u64::from(suppressed);
            !suppressed
        };
        p.events.retain(|_| keep(0));
        p.visitors.retain(|_| keep(1));
        p.sessions.retain(|_| keep(2));
        p.identities.retain(|_| keep(3));
        Ok(dropped)
    }

    /// Runs one step over all its items under a savepoint; when PostgreSQL refuses the data,
    /// halves the items until the refused ones are alone. Returns them (batch index, reason).
    async fn split_step(
        &self,
        tx: &Transaction<'_>,
        step: Step,
        p: &Prepared<'_>,
        stored: &mut Stored,
    ) -> Result<Vec<(usize, Rejection)>, StoreError> {
        let n = match step {
            Step::Events => p.events.len(),
            Step::Visitors => p.visitors.len(),
            Step::Sessions => p.sessions.len(),
            Step::Identities => p.identities.len(),
        };
        let mut bad = Vec::new();
        if n == 0 {
            return Ok(bad);
        }
        let mut stack: Vec<Vec<usize>> = vec![(0..n).collect()];
        while let Some(idx) = stack.pop() {
            tx.batch_execute("SAVEPOINT sluice_step").await?;
            match self.run_step(tx, step, p, &idx, stored).await {
                Ok(refused) => {
                    tx.batch_execute("RELEASE SAVEPOINT sluice_step").await?;
                    bad.extend(refused);
                }
                Err(err) if sluice_schema::partitions::is_missing_partition(&err) => {
                    // A month vanished after we saw it (pruned by an operator): forget what we
                    // know and retry the batch, which recreates it.
                    self.months.forget_all();
                    self.claim_days.forget_all();
                    return Err(StoreError::Transient(describe(&err)));
                }
                Err(err) if is_concurrent_lead_insert(&err) => {
                    return Err(StoreError::Transient(describe(&err)));
                }
                Err(err) if is_data_error(&err) => {
                    tx.batch_execute(
                        "ROLLBACK TO SAVEPOINT sluice_step; RELEASE SAVEPOINT sluice_step",
                    )
                    .await?;
                    if let [only] = idx[..] {
                        let batch_index = match step {
                            Step::Events => p.events[only].0,
                            Step::Visitors => p.visitors[only].0,
                            Step::Sessions => p.sessions[only].0,
                            Step::Identities => p.identities[only].0,
                        };
                        bad.push((
                            batch_index,
                            Rejection::new("rejected_by_database", describe(&err)),
                        ));
                    } else {
                        let mid = idx.len() / 2;
                        stack.push(idx[mid..].to_vec());
                        stack.push(idx[..mid].to_vec());
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(bad)
    }

    async fn run_step(
        &self,
        tx: &Transaction<'_>,
        step: Step,
        p: &Prepared<'_>,
        idx: &[usize],
        stored: &mut Stored,
    ) -> Result<Vec<(usize, Rejection)>, tokio_postgres::Error> {
        let mut refused = Vec::new();
        match step {
            Step::Events => {
                let rows: Vec<&EventMessage<RawObject>> =
                    idx.iter().map(|&i| p.events[i].1).collect();
                let keys: Vec<i64> = rows
                    .iter()
                    .map(|e| p.claim_key(&self.claim_days, e))
                    .collect();
                let out = claim::events(tx, &rows, &keys).await?;
                stored.events += out.stored;
                stored.duplicates += out.duplicates;
            }
            Step::Visitors => {
                let rows: Vec<&VisitorMessage> = idx.iter().map(|&i| p.visitors[i].1).collect();
                stored.visitors += merge::visitors(tx, &rows).await?;
            }
            Step::Sessions => {
                let rows: Vec<&SessionMessage> = idx.iter().map(|&i| p.sessions[i].1).collect();
                stored.sessions += merge::sessions(tx, &rows).await?;
            }
            Step::Identities => {
                let rows: Vec<&IdentityMessage> = idx.iter().map(|&i| p.identities[i].1).collect();
                let applied = identity::apply(tx, &rows, self.keys.as_ref()).await?;
                stored.leads += applied.leads;
                stored.links += applied.links;
                stored.waves += applied.waves;
                stored.reach_time += applied.reach_time;
                // Refused by the identity step itself (a lead's kept PII it cannot re-seal).
                refused.extend(
                    applied
                        .refused
                        .into_iter()
                        .filter_map(|(j, rej)| Some((p.identities[*idx.get(j)?].0, rej))),
                );
            }
        }
        Ok(refused)
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
        metrics::batch(messages, stored.copy_time, took);
        tracing::debug!(
            messages,
            events = stored.events,
            duplicates = stored.duplicates,
            took_ms = took.as_millis() as u64,
            "batch stored"
        );
    }
}
