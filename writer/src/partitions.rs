//! Partitions the writer keeps, off the hot path: month partitions of `event` and day
//! partitions of `event_dedup`, ensured ahead at start-up and on a timer, and on demand
//! (before the batch's transaction, on a connection of its own) when a batch needs one this
//! writer has not seen to exist.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use sluice_schema::dedup::{self, Window};
use sluice_schema::partitions::{self, PartitionConfig};
use tokio_postgres::Client;

use crate::metrics;

/// Partitions (by their first day) this writer has seen to exist, so the common case costs a
/// set lookup. Poisoning is ignored: the set is a cache, and a wrong entry is corrected by
/// the missing-partition path.
#[derive(Debug, Default)]
struct Known(Mutex<HashSet<NaiveDate>>);

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<NaiveDate>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Those of `days` not known to exist.
    fn missing(&self, days: impl Iterator<Item = NaiveDate>) -> HashSet<NaiveDate> {
        let known = self.lock();
        days.filter(|d| !known.contains(d)).collect()
    }
}

/// Months known to exist, so the common case (current month) costs a set lookup.
#[derive(Debug)]
pub(crate) struct Months {
    /// First days of months known to have a partition. Grows by a few entries a month;
    /// bounded in practice by retention plus months ahead.
    known: Known,
    /// Layout of new months.
    cfg: PartitionConfig,
}

impl Months {
    pub fn new(cfg: PartitionConfig) -> Months {
        Months {
            known: Known::default(),
            cfg,
        }
    }

    /// Ensures the current month and the months ahead (start-up and timer).
    pub async fn ensure_ahead(
        &self,
        client: &Client,
        now: DateTime<Utc>,
    ) -> Result<(), sluice_schema::SchemaError> {
        let ensured = partitions::ensure_ahead(client, now, &self.cfg).await?;
        let created = ensured.iter().filter(|e| e.created).count();
        metrics::partitions_created(created as u64);
        if let Some(last) = ensured.iter().map(|e| e.month).max() {
            let until = partitions::month_bounds(last).1.timestamp();
            metrics::partitions_until(until);
        }
        self.known
            .lock()
            .extend(ensured.into_iter().map(|e| e.month));
        Ok(())
    }

    /// Ensures every month of `times` exists; returns how many it created.
    pub async fn ensure_for(
        &self,
        client: &Client,
        times: impl Iterator<Item = DateTime<Utc>>,
    ) -> Result<usize, sluice_schema::SchemaError> {
        let missing = self
            .known
            .missing(times.map(|t| partitions::month_start(t.date_naive())));
        let mut created = 0;
        for month in missing {
            if partitions::ensure_month(client, month, self.cfg.hash_modulus).await? {
                created += 1;
                metrics::partitions_created(1);
            }
            self.known.lock().insert(month);
        }
        Ok(created)
    }

    /// Forgets a month (its partition was found missing after all, e.g. pruned by an operator).
    pub fn forget_all(&self) {
        self.known.lock().clear();
    }
}

/// Day partitions of `event_dedup` known to exist, and the window that says which days a
/// claim key can fall on.
#[derive(Debug)]
pub(crate) struct ClaimDays {
    /// The dedup window.
    pub window: Window,
    /// Days known to have a partition: about the window's length, as old days are
    /// forgotten when they are dropped.
    known: Known,
}

impl ClaimDays {
    pub fn new(window: Window) -> ClaimDays {
        ClaimDays {
            window,
            known: Known::default(),
        }
    }

    /// Ensures every day a claim key can fall on at `now`, and tomorrow's (start-up, timer).
    pub async fn ensure_ahead(
        &self,
        client: &Client,
        now: DateTime<Utc>,
    ) -> Result<(), sluice_schema::SchemaError> {
        self.ensure(client, self.window.days_ahead(now))
            .await
            .map(drop)
    }

    /// Ensures the days of these claim keys exist; returns how many it created.
    pub async fn ensure_for(
        &self,
        client: &Client,
        keys: impl Iterator<Item = i64>,
    ) -> Result<usize, sluice_schema::SchemaError> {
        self.ensure(client, keys.map(dedup::day_of_key)).await
    }

    async fn ensure(
        &self,
        client: &Client,
        days: impl Iterator<Item = NaiveDate>,
    ) -> Result<usize, sluice_schema::SchemaError> {
        let missing = self.known.missing(days);
        let mut created = 0;
        for day in missing {
            if dedup::ensure_day(client, day).await? {
                created += 1;
                metrics::dedup_days_created(1);
            }
            self.known.lock().insert(day);
        }
        Ok(created)
    }

    /// Drops the days past the window (see [`dedup::prune`]) and forgets them.
    pub async fn prune(
        &self,
        client: &Client,
        now: DateTime<Utc>,
    ) -> Result<usize, sluice_schema::SchemaError> {
        let dropped = dedup::prune(client, now, self.window).await?;
        metrics::dedup_days_dropped(dropped.len() as u64);
        let oldest = self.window.oldest_kept(now);
        self.known.lock().retain(|d| *d >= oldest);
        Ok(dropped.len())
    }

    /// Forgets every day (one was found missing after all, e.g. dropped by an operator).
    pub fn forget_all(&self) {
        self.known.lock().clear();
    }
}
