//! The transaction's steps (events, visitors, sessions, identities), each run under a
//! savepoint and split in halves when PostgreSQL refuses a row, so a refused row is found and
//! dead-lettered alone.

use std::time::Duration;

use sluice_schema::db::describe;
use sluice_schema::messages::{
    EventMessage, IdentityMessage, RawObject, SessionMessage, VisitorMessage,
};
use tokio_postgres::Transaction;

use super::prepare::Prepared;
use super::Store;
use crate::decode::Rejection;
use crate::error::{is_concurrent_lead_insert, is_data_error, StoreError};
use crate::metrics::Phases;
use crate::{claim, identity, merge};

/// Steps of the transaction that can be split to isolate a refused row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Events,
    Visitors,
    Sessions,
    Identities,
}

/// What the steps stored, for the metrics.
#[derive(Debug, Default)]
pub(super) struct Stored {
    pub(super) events: u64,
    pub(super) duplicates: u64,
    pub(super) visitors: u64,
    pub(super) sessions: u64,
    pub(super) leads: u64,
    pub(super) links: u64,
    pub(super) waves: u64,
    pub(super) reach_time: Duration,
    /// Where the attempt spent its time.
    pub(super) phases: Phases,
    /// Messages dropped by the suppression list: events, visitors, sessions, identities.
    pub(super) suppressed: [u64; 4],
}

impl Store {
    /// Runs one step over all its items under a savepoint; when PostgreSQL refuses the data,
    /// halves the items until the refused ones are alone. Returns them (batch index, reason).
    pub(super) async fn split_step(
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

    /// Stores the items `idx` of one step; returns those the step itself refused.
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
                let out = claim::events(tx, &rows, &keys, &mut stored.phases).await?;
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
}
