//! Month partitions of `event`, kept off the hot path: ensured ahead at start-up and on a
//! timer, and on demand (before the batch's transaction, on a connection of its own) when a
//! batch holds an event for a month this writer has not seen to exist.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, NaiveDate, Utc};
use sluice_schema::partitions::{self, PartitionConfig};
use tokio_postgres::Client;

use crate::metrics;

/// Months known to exist, so the common case (current month) costs a set lookup.
#[derive(Debug)]
pub(crate) struct Months {
    /// First days of months known to have a partition. Grows by a few entries a month;
    /// bounded in practice by retention plus months ahead.
    known: Mutex<HashSet<NaiveDate>>,
    /// Layout of new months.
    cfg: PartitionConfig,
}

impl Months {
    pub fn new(cfg: PartitionConfig) -> Months {
        Months {
            known: Mutex::new(HashSet::new()),
            cfg,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<NaiveDate>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
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
        self.lock().extend(ensured.into_iter().map(|e| e.month));
        Ok(())
    }

    /// Ensures every month of `times` exists; returns how many it created.
    pub async fn ensure_for(
        &self,
        client: &Client,
        times: impl Iterator<Item = DateTime<Utc>>,
    ) -> Result<usize, sluice_schema::SchemaError> {
        let missing: HashSet<NaiveDate> = {
            let known = self.lock();
            times
                .map(|t| partitions::month_start(t.date_naive()))
                .filter(|m| !known.contains(m))
                .collect()
        };
        let mut created = 0;
        for month in missing {
            if partitions::ensure_month(client, month, self.cfg.hash_modulus).await? {
                created += 1;
                metrics::partitions_created(1);
            }
            self.lock().insert(month);
        }
        Ok(created)
    }

    /// Forgets a month (its partition was found missing after all, e.g. pruned by an operator).
    pub fn forget_all(&self) {
        self.lock().clear();
    }
}
