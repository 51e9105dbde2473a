//! Kafka positions kept in PostgreSQL (`writer_offset`), the heart of the exactly-once effect.
//!
//! Each batch's transaction stores the rows *and* moves every touched partition's
//! `next_offset` from the value this writer last saw to the new one, conditionally
//! (`WHERE next_offset = $expected`). A writer that lost a partition to another instance, and
//! whose view is therefore stale, updates no row: it rolls back and repositions instead of
//! storing the same messages twice. On assignment, partitions start where the table says.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio_postgres::{GenericClient, Transaction};

use crate::error::StoreError;

/// A topic partition, by name and number.
pub(crate) type Tp = (String, i32);

/// What this writer believes about one partition it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartState {
    /// Stamp of the current positioning; records stamped with another epoch were fetched
    /// before a seek or a reassignment and are dropped. 0 means "being repositioned".
    pub epoch: u64,
    /// `writer_offset.next_offset` as of our last read or commit; `None` while the table has
    /// no row for the partition (nothing stored yet: consumption starts at the beginning).
    pub stored_next: Option<i64>,
}

/// The partitions this writer owns, shared by the consumer thread (which changes them on
/// rebalance and reposition) and the store pipeline (which reads them at each flush and
/// advances `stored_next` after a commit).
#[derive(Debug, Default)]
pub(crate) struct Assignments {
    /// Owned partitions by topic, then partition (nested so that lookups by `&str` need no
    /// allocation: the consumer thread looks up every message). A std mutex: held only for
    /// map operations, never across an await.
    parts: Mutex<HashMap<String, HashMap<i32, PartState>>>,
    /// Source of fresh epochs.
    epochs: AtomicU64,
}

impl Assignments {
    /// A fresh non-zero epoch.
    pub fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<i32, PartState>>> {
        // A poisoned map only means another thread panicked mid-update of plain values; the
        // conditional update in the database stays the safety net.
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an owned partition and its position.
    pub fn set(&self, tp: Tp, state: PartState) {
        self.lock().entry(tp.0).or_default().insert(tp.1, state);
    }

    /// Forgets a partition (revoked or lost).
    pub fn remove(&self, tp: &Tp) {
        if let Some(parts) = self.lock().get_mut(&tp.0) {
            parts.remove(&tp.1);
        }
    }

    /// Forgets every partition.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The state of a partition, if owned.
    pub fn get(&self, topic: &str, partition: i32) -> Option<PartState> {
        self.lock()
            .get(topic)
            .and_then(|p| p.get(&partition))
            .copied()
    }

    /// Current epoch of a partition (the consumer thread stamps records with it).
    pub fn epoch_of(&self, topic: &str, partition: i32) -> Option<u64> {
        self.get(topic, partition).map(|s| s.epoch)
    }

    /// Marks a partition as being repositioned: its records are dropped until the consumer
    /// thread has sought it and given it a fresh epoch.
    pub fn invalidate(&self, topic: &str, partition: i32) {
        if let Some(state) = self
            .lock()
            .get_mut(topic)
            .and_then(|p| p.get_mut(&partition))
        {
            state.epoch = 0;
        }
    }

    /// After a commit: moves `stored_next` forward, unless the partition was repositioned or
    /// reassigned meanwhile (then the newer view stands).
    pub fn advance(&self, tp: &Tp, epoch: u64, next: i64) {
        if let Some(state) = self.lock().get_mut(&tp.0).and_then(|p| p.get_mut(&tp.1)) {
            if state.epoch == epoch {
                state.stored_next = Some(next);
            }
        }
    }

    /// Every owned partition and its state.
    pub fn snapshot(&self) -> Vec<(Tp, PartState)> {
        self.lock()
            .iter()
            .flat_map(|(t, parts)| parts.iter().map(|(p, s)| ((t.clone(), *p), *s)))
            .collect()
    }
}

/// Reads the stored positions of `parts` for `group`; partitions without a row are absent.
pub(crate) async fn load<C: GenericClient>(
    client: &C,
    group: &str,
    parts: &[Tp],
) -> Result<HashMap<Tp, i64>, tokio_postgres::Error> {
    let topics: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
    let partitions: Vec<i32> = parts.iter().map(|(_, p)| *p).collect();
    let rows = client
        .query(
            "SELECT o.topic, o.partition, o.next_offset \
             FROM writer_offset o \
             JOIN unnest($2::text[], $3::int[]) AS w(topic, partition) \
               ON o.topic = w.topic AND o.partition = w.partition \
             WHERE o.consumer_group = $1",
            &[&group, &topics, &partitions],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                (r.get::<_, String>(0), r.get::<_, i32>(1)),
                r.get::<_, i64>(2),
            )
        })
        .collect())
}

/// Moves one partition's stored position from `expected` to `next` inside the batch's
/// transaction. Zero rows touched means another writer moved it: [`StoreError::OffsetConflict`].
pub(crate) async fn advance_in(
    tx: &Transaction<'_>,
    group: &str,
    tp: &Tp,
    expected: Option<i64>,
    next: i64,
) -> Result<(), StoreError> {
    let touched = match expected {
        Some(expected) => {
            tx.execute(
                "UPDATE writer_offset SET next_offset = $4, updated_at = now() \
                 WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset = $5",
                &[&group, &tp.0, &tp.1, &next, &expected],
            )
            .await?
        }
        // No row yet: the first writer to store this partition creates it; a concurrent
        // creator makes ours a no-op, which is the same conflict.
        None => {
            tx.execute(
                "INSERT INTO writer_offset (consumer_group, topic, partition, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&group, &tp.0, &tp.1, &next],
            )
            .await?
        }
    };
    if touched == 1 {
        Ok(())
    } else {
        Err(StoreError::OffsetConflict {
            topic: tp.0.clone(),
            partition: tp.1,
            expected,
        })
    }
}
