//! The erasure suppression list (`erasure_suppression`, written by `sluice-schema erase` and
//! `tenant delete`): messages of an erased person or a deleted tenant are dropped, not stored.
//!
//! The list is read incrementally by id *inside each batch's transaction*: the eraser waits
//! for writer transactions older than its suppression rows before it deletes, so a batch
//! either saw the rows or finished before the delete. The copy in memory is bounded
//! (`SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES`); past the bound the writer keeps only which
//! tenants have entries and asks the database about those tenants' messages, one statement
//! per batch. Messages of tenants without entries cost one hash lookup.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Mutex;

use serde_json::Value;
use sluice_schema::erase::{id_fingerprint, SuppressionKind};
use sluice_schema::messages::{JsonObject, SealedField, SealedPii};
use sluice_schema::pii::PiiKeys;
use tokio_postgres::Transaction;

use crate::metrics;

/// What a message is matched on: suppression kinds and fingerprints.
type Fingerprints = Vec<(SuppressionKind, [u8; 32])>;

/// The identifiers of one message that a suppression row can match.
#[derive(Debug, Default)]
pub(crate) struct Subject<'a> {
    /// Owning tenant.
    pub tenant: i64,
    /// User ids (`userId`; an alias's `previousId` may be one).
    pub user_ids: [Option<&'a str>; 2],
    /// Anonymous ids (`anonymousId`; an alias's `previousId` may be one).
    pub anonymous_ids: [Option<&'a str>; 2],
    /// An identify's email, as sent.
    pub email: Option<Cow<'a, str>>,
    /// An identify's phone, as sent.
    pub phone: Option<Cow<'a, str>>,
    /// Fingerprints the collector computed when it sealed the email and phone (version 2
    /// identities carry no plaintext to fingerprint here).
    pub sealed: Vec<(SuppressionKind, [u8; 32])>,
}

impl<'a> Subject<'a> {
    /// The email and phone of an identify's traits (strings, or a phone sent as a number).
    pub fn with_traits(mut self, traits: &'a JsonObject) -> Subject<'a> {
        let text = |k: &str| match traits.get(k) {
            Some(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            Some(Value::Number(n)) => Some(Cow::Owned(n.to_string())),
            _ => None,
        };
        self.email = text(sluice_schema::pii::EMAIL_TRAIT);
        self.phone = text(sluice_schema::pii::PHONE_TRAIT);
        self
    }

    /// The fingerprints of a sealed identify's email and phone (`None`: a version 1 message).
    pub fn with_sealed(mut self, pii: Option<&SealedPii>) -> Subject<'a> {
        let Some(pii) = pii else { return self };
        for (kind, field) in [
            (SuppressionKind::Email, &pii.email),
            (SuppressionKind::Phone, &pii.phone),
        ] {
            let fingerprint = field
                .as_ref()
                .and_then(SealedField::decode)
                .and_then(|(_, fp)| fp)
                .and_then(|fp| <[u8; 32]>::try_from(fp).ok());
            self.sealed.extend(fingerprint.map(|fp| (kind, fp)));
        }
        self
    }

    /// Every fingerprint of the subject, as stored in the list.
    fn fingerprints(&self, keys: Option<&PiiKeys>) -> Fingerprints {
        let mut out = Vec::with_capacity(4 + self.sealed.len());
        out.extend_from_slice(&self.sealed);
        for (kind, ids) in [
            (SuppressionKind::UserId, &self.user_ids),
            (SuppressionKind::AnonymousId, &self.anonymous_ids),
        ] {
            out.extend(
                ids.iter()
                    .flatten()
                    .map(|id| (kind, id_fingerprint(kind, id))),
            );
        }
        if let Some(keys) = keys {
            out.extend(
                self.email
                    .as_deref()
                    .and_then(|e| keys.fingerprint_email(e))
                    .map(|f| (SuppressionKind::Email, f)),
            );
            out.extend(
                self.phone
                    .as_deref()
                    .and_then(|p| keys.fingerprint_phone(p))
                    .map(|f| (SuppressionKind::Phone, f)),
            );
        }
        out
    }
}

/// The list as far as this writer has read it.
#[derive(Default)]
struct State {
    /// Highest `erasure_suppression.id` read.
    last_id: i64,
    /// Person entries, while within the bound.
    entries: HashSet<(i64, SuppressionKind, [u8; 32])>,
    /// Tenants with at least one entry of any kind (bounded by the tenants there are).
    tenants: HashSet<i64>,
    /// Deleted tenants.
    whole: HashSet<i64>,
    /// True once the list outgrew the bound: `entries` is dropped, the database is asked.
    overflow: bool,
}

/// The writer's copy of the suppression list, shared by its lanes.
pub(crate) struct Suppression {
    state: Mutex<State>,
    /// Most person entries kept in memory.
    max_entries: usize,
}

impl Suppression {
    pub(crate) fn new(max_entries: usize) -> Suppression {
        Suppression {
            state: Mutex::new(State::default()),
            max_entries,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the sets half-updated in a way that matters: every
        // update is an insert.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the rows added since the last call, in `tx`.
    async fn refresh(&self, tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
        let last = self.lock().last_id;
        let rows = tx
            .query(
                "SELECT id, tenant_id, kind, fingerprint FROM erasure_suppression WHERE id > $1 ORDER BY id",
                &[&last],
            )
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut s = self.lock();
        for row in rows {
            let (id, tenant): (i64, i64) = (row.get(0), row.get(1));
            s.last_id = s.last_id.max(id);
            s.tenants.insert(tenant);
            let Some(kind) = SuppressionKind::parse(row.get(2)) else {
                tracing::warn!(
                    kind = row.get::<_, &str>(2),
                    "unknown suppression kind; upgrade the writer"
                );
                continue;
            };
            if kind == SuppressionKind::Tenant {
                s.whole.insert(tenant);
                continue;
            }
            if s.overflow {
                continue;
            }
            let Ok(fp) = <[u8; 32]>::try_from(row.get::<_, &[u8]>(3)) else {
                continue;
            };
            s.entries.insert((tenant, kind, fp));
            if s.entries.len() > self.max_entries {
                tracing::warn!(
                    max = self.max_entries,
                    "the erasure suppression list outgrew SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES; \
                     asking the database per batch from now on (raise the bound to keep it in memory)"
                );
                s.overflow = true;
                s.entries = HashSet::new();
            }
        }
        metrics::suppression_cache(s.entries.len(), s.overflow);
        Ok(())
    }

    /// Which of `subjects` are suppressed (same order), with the list read up to now in `tx`.
    pub(crate) async fn check(
        &self,
        tx: &Transaction<'_>,
        subjects: &[Subject<'_>],
        keys: Option<&PiiKeys>,
    ) -> Result<Vec<bool>, tokio_postgres::Error> {
        self.refresh(tx).await?;
        let mut out = vec![false; subjects.len()];
        // Subjects to ask the database about (overflow only): index, fingerprints.
        let mut ask: Vec<(usize, Fingerprints)> = Vec::new();
        {
            let s = self.lock();
            if s.tenants.is_empty() {
                return Ok(out);
            }
            for (i, subject) in subjects.iter().enumerate() {
                if !s.tenants.contains(&subject.tenant) {
                    continue;
                }
                if s.whole.contains(&subject.tenant) {
                    out[i] = true;
                    continue;
                }
                let fps = subject.fingerprints(keys);
                if s.overflow {
                    ask.push((i, fps));
                } else {
                    out[i] = fps
                        .iter()
                        .any(|(k, f)| s.entries.contains(&(subject.tenant, *k, *f)));
                }
            }
        }
        if ask.iter().all(|(_, fps)| fps.is_empty()) {
            return Ok(out);
        }
        let (mut tenants, mut kinds, mut fps): (Vec<i64>, Vec<&str>, Vec<&[u8]>) =
            Default::default();
        for (i, list) in &ask {
            for (k, f) in list {
                tenants.push(subjects[*i].tenant);
                kinds.push(k.as_str());
                fps.push(f);
            }
        }
        let hits: HashSet<(i64, String, Vec<u8>)> = tx
            .query(
                "SELECT s.tenant_id, s.kind, s.fingerprint FROM erasure_suppression s \
                 JOIN unnest($1::bigint[], $2::text[], $3::bytea[]) AS q(tenant_id, kind, fingerprint) \
                 USING (tenant_id, kind, fingerprint)",
                &[&tenants, &kinds, &fps],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        for (i, list) in ask {
            let t = subjects[i].tenant;
            out[i] = list
                .iter()
                .any(|(k, f)| hits.contains(&(t, k.as_str().to_owned(), f.to_vec())));
        }
        Ok(out)
    }
}
