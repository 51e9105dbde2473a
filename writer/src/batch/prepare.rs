//! A batch's messages sorted by step, before the transaction stores them: decoded content
//! ([`Prepared`]), in-batch duplicate events, identities refused up front, and the messages
//! the suppression list (erased people, deleted tenants) drops.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sluice_schema::messages::{
    EventMessage, IdentityMessage, RawObject, SessionMessage, VisitorMessage,
};
use tokio_postgres::Transaction;
use uuid::Uuid;

use super::Store;
use crate::consume::Record;
use crate::decode::{Decoded, Rejection};
use crate::identity;
use crate::partitions::ClaimDays;
use crate::suppress::Subject;

/// A batch's decoded content, indexes pointing back into the batch's records.
#[derive(Default)]
pub(super) struct Prepared<'a> {
    pub(super) events: Vec<(usize, &'a EventMessage<RawObject>)>,
    pub(super) visitors: Vec<(usize, &'a VisitorMessage)>,
    pub(super) sessions: Vec<(usize, &'a SessionMessage)>,
    pub(super) identities: Vec<(usize, &'a IdentityMessage)>,
    /// Messages refused before the database saw them.
    pub(super) rejected: Vec<(usize, Rejection)>,
    /// Events dropped as duplicates of an earlier one in the same batch.
    pub(super) in_batch_duplicates: u64,
    /// The writer's clock when the batch was prepared: it bounds the dedup claim keys.
    pub(super) now: DateTime<Utc>,
}

impl Prepared<'_> {
    /// The dedup claim key of `e` (see [`sluice_schema::dedup::Window::key_ms`]).
    pub(super) fn claim_key(&self, days: &ClaimDays, e: &EventMessage<RawObject>) -> i64 {
        days.window.key_ms(e.timestamp, e.received_at, self.now)
    }
}

impl Store {
    /// Sorts the batch's messages (decoded by the consumer thread, off this task) by step.
    pub(super) fn prepare<'a>(&self, batch: &'a [Record]) -> Prepared<'a> {
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

    /// Drops the prepared messages the suppression list names (read in `tx`); returns how
    /// many of each kind.
    pub(super) async fn suppress(
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
}
