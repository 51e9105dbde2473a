//! Identify and alias calls -> `lead` (email and phone sealed, matched by HMAC fingerprint)
//! and `identity_link` (anonymous id -> lead).
//!
//! Email and phone arrive sealed by the collector (message version 2) and are stored as they
//! are; version 1 messages (collectors before sealing) carry them in plaintext and are sealed
//! here with the active key. A lead has one key id for both ciphertexts, so a value kept from
//! before is re-sealed under the new value's key; when that needs a key this writer does not
//! have, the message is refused to the DLQ (`pii_key_missing`) rather than labelled with a key
//! that cannot open the kept value.
//!
//! Order matters (a later identify updates what an earlier one created), but most messages of
//! a batch have nothing to do with each other. They are therefore applied in *waves* of
//! independent messages; within a wave each step (find the lead, write it, link it) is one
//! set-based statement for all its identifies (aliases, rare, are pipelined one by one), so a
//! wave costs a few statements instead of three per message. (Lead writes one statement
//! each, even pipelined, took PostgreSQL ~0.1 ms a message: a fifth of a mixed drain.)
//!
//! A message joins a wave when it shares nothing with any message before it that is not yet
//! applied (in the wave or left for a later one): no user id, anonymous id or fingerprint,
//! and no existing lead that any of its keys reaches (one lookup of every match, done per
//! wave). Two such messages touch disjoint rows whichever goes first, so applying the wave at
//! once has the effect of applying the messages one by one; a message that shares something
//! waits for a later wave, behind the one it depends on. A visitor identifying five times in
//! a batch costs five waves, however many other visitors are in it. (Waves of *consecutive*
//! independent messages, the version before, ended at the first repeated visitor: ~40
//! messages a wave on a backlog, 8-12 s per 5,000 identities; one at a time, 20,000 took ~21 s.
//! See docs/writer.md.)
//!
//! Layout: `plan.rs` is the pure planner (messages -> plans -> waves, unit-tested without a
//! database), `lead.rs` what a lead stores of PII, `sql.rs` the statements; this file is the
//! database side: what each plan reaches, and each wave's find, write and link.

use futures::future::join_all;
use sluice_schema::messages::{IdentityKind, IdentityMessage};
use sluice_schema::pii::PiiKeys;
use tokio_postgres::{Statement, Transaction};

use crate::decode::Rejection;
use crate::error::is_data_error;

mod lead;
mod plan;
mod sql;

use lead::{Found, LeadPii, LeadRow};
pub(crate) use plan::precheck;
use plan::{Pending, Plan, ReachQuery, WAVE_MAX};

/// Rows touched by applying identity messages, for the per-table metrics.
#[derive(Debug, Default, Clone)]
pub(crate) struct Applied {
    /// Leads inserted or updated.
    pub leads: u64,
    /// Links inserted or updated.
    pub links: u64,
    /// Waves the messages were applied in (for the debug log).
    pub waves: u64,
    /// Time spent finding what each message reaches, to form the waves (for the debug log).
    pub reach_time: std::time::Duration,
    /// Messages refused (index into the messages given, reason), stored nowhere.
    pub refused: Vec<(usize, Rejection)>,
}

/// Applies identity messages, with the effect of applying them in order.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    msgs: &[&IdentityMessage],
    keys: Option<&PiiKeys>,
) -> Result<Applied, tokio_postgres::Error> {
    let mut applied = Applied::default();
    if msgs.is_empty() {
        return Ok(applied);
    }
    let st = &Statements::prepare(tx).await?;
    let (plans, refused) = plan::plan_all(msgs, keys);
    applied.refused = refused;
    let mut pending = Pending::new(plans.len());
    while !pending.is_empty() {
        let window = pending.window();
        let looking = std::time::Instant::now();
        let reach = find_matches(tx, st, &plans, window).await?;
        applied.reach_time += looking.elapsed();
        let members = plan::form_wave(&plans, window, &reach, WAVE_MAX);
        let wave: Vec<&Plan<'_>> = members.iter().map(|&i| &plans[i]).collect();
        let kept = apply_wave(tx, st, keys, &wave, &mut applied).await?;
        pending.applied(&members[..kept]);
    }
    Ok(applied)
}

/// Applies one wave: finds, writes and links every plan of it, all at once per step. Returns
/// how many of the wave's plans (a prefix) were applied or refused; the rest wait.
async fn apply_wave(
    tx: &Transaction<'_>,
    st: &Statements,
    keys: Option<&PiiKeys>,
    wave: &[&Plan<'_>],
    applied: &mut Applied,
) -> Result<usize, tokio_postgres::Error> {
    // 1. Find each message's lead, all at once.
    let found = find_all(tx, st, wave).await?;
    // Disjoint reach means distinct leads among what existed at the reach lookup; this later
    // statement also sees leads other transactions (lanes, writers) committed since, so
    // should a lead appear twice, the wave stops before the second message, which waits.
    let kept = plan::distinct_leads(found.iter().map(Found::lead_id));
    let wave = &wave[..kept];
    // 2. Decide each lead's ciphertexts; a message whose kept value cannot be brought
    // under one key id with its new one is refused, and touches nothing.
    let mut writes: Vec<(&Plan<'_>, &Found, LeadPii)> = Vec::with_capacity(wave.len());
    for (p, f) in wave.iter().zip(&found) {
        match p.lead_pii(keys, f) {
            Ok(pii) => writes.push((p, f, pii)),
            Err(rejection) => applied
                .refused
                .extend(p.covers().map(|i| (i, rejection.clone()))),
        }
    }
    // 3. Update or insert each lead.
    let ids = write_all(tx, st, &writes).await?;
    let written: Vec<&Plan<'_>> = writes.iter().map(|(p, ..)| *p).collect();
    applied.leads += written.iter().map(|p| p.messages).sum::<u64>();
    // 4. Link the anonymous ids (and point their visitor rows at the lead).
    applied.links += link_all(tx, st, &written, &ids).await?;
    applied.waves += 1;
    Ok(kept)
}

/// Every existing lead each plan of `window` (indexes into `plans`) can reach through any of
/// its keys, in one statement: the wave is formed from these.
async fn find_matches(
    tx: &Transaction<'_>,
    st: &Statements,
    plans: &[Plan<'_>],
    window: &[usize],
) -> Result<Vec<Vec<i64>>, tokio_postgres::Error> {
    let q = ReachQuery::new(plans, window);
    let rows = tx
        .query(
            &st.find_matches,
            &[
                &q.slots, &q.tenants, &q.users, &q.emails, &q.phones, &q.anons,
            ],
        )
        .await?;
    Ok(plan::reach_of(
        window.len(),
        rows.iter().map(|row| (row.get(0), row.get(1))),
    ))
}

/// Step 1 for a wave: the identifies' leads in one statement, the aliases' pipelined.
async fn find_all(
    tx: &Transaction<'_>,
    st: &Statements,
    wave: &[&Plan<'_>],
) -> Result<Vec<Found>, tokio_postgres::Error> {
    let identifies: Vec<usize> = (0..wave.len())
        .filter(|&i| wave[i].msg.kind == IdentityKind::Identify)
        .collect();
    let tenants: Vec<i64> = identifies.iter().map(|&i| wave[i].msg.tenant_id).collect();
    let users: Vec<Option<&str>> = identifies
        .iter()
        .map(|&i| wave[i].msg.user_id.as_deref())
        .collect();
    let emails: Vec<Option<&[u8]>> = identifies
        .iter()
        .map(|&i| wave[i].email_fp.as_deref())
        .collect();
    let phones: Vec<Option<&[u8]>> = identifies
        .iter()
        .map(|&i| wave[i].phone_fp.as_deref())
        .collect();
    let anons: Vec<Option<&str>> = identifies
        .iter()
        .map(|&i| wave[i].msg.anonymous_id.as_deref())
        .collect();
    let leads = async {
        if identifies.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &st.find_leads,
            &[&tenants, &users, &emails, &phones, &anons],
        )
        .await
    };
    let aliases = join_all(
        wave.iter()
            .filter(|p| p.msg.kind == IdentityKind::Alias)
            .map(|p| p.find(tx, st)),
    );
    let (leads, aliases) = futures::join!(leads, aliases);
    let mut found: Vec<Found> = wave
        .iter()
        .map(|p| match p.msg.kind {
            IdentityKind::Identify => Found::Identify(None),
            IdentityKind::Alias => Found::Nothing,
        })
        .collect();
    for row in leads? {
        // Ordinality is 1-based, over `identifies`.
        let n: i64 = row.get(0);
        let Some(&i) = usize::try_from(n - 1).ok().and_then(|k| identifies.get(k)) else {
            continue;
        };
        found[i] = Found::Identify(Some(LeadRow {
            id: row.get(1),
            email: row.get(2),
            phone: row.get(3),
            key_id: row.get(4),
        }));
    }
    let mut aliases = settle(aliases)?.into_iter();
    for (slot, p) in found.iter_mut().zip(wave) {
        if p.msg.kind == IdentityKind::Alias {
            if let Some(f) = aliases.next() {
                *slot = f;
            }
        }
    }
    Ok(found)
}

/// Step 2 for a wave: the identifies' leads updated in one statement and inserted in another,
/// the aliases' written pipelined (rare). Returns each write's lead id, in order. Statement
/// for statement this has the effect of writing them one by one: a wave's messages share no
/// key, fingerprint or lead, so no row one of them writes is read by another.
async fn write_all(
    tx: &Transaction<'_>,
    st: &Statements,
    writes: &[(&Plan<'_>, &Found, LeadPii)],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let mut ids = vec![0i64; writes.len()];
    let mut updates = LeadColumns::default();
    let mut inserts = LeadColumns::default();
    let mut aliases = Vec::new();
    for (i, (p, f, pii)) in writes.iter().enumerate() {
        match f {
            Found::Identify(Some(row)) => {
                ids[i] = row.id;
                updates.push(i, row.id, p, pii);
            }
            Found::Identify(None) => inserts.push(i, 0, p, pii),
            Found::Alias(_) | Found::Nothing => aliases.push(i),
        }
    }
    let update = async {
        if updates.slots.is_empty() {
            return Ok(0);
        }
        let c = &updates;
        tx.execute(
            &st.update_leads,
            &[
                &c.tenants,
                &c.ids,
                &c.users,
                &c.traits,
                &c.emails,
                &c.phones,
                &c.key_ids,
                &c.email_fps,
                &c.phone_fps,
            ],
        )
        .await
    };
    let insert = async {
        if inserts.slots.is_empty() {
            return Ok(Vec::new());
        }
        let c = &inserts;
        tx.query(
            &st.insert_leads,
            &[
                &c.tenants,
                &c.workspaces,
                &c.users,
                &c.emails,
                &c.phones,
                &c.key_ids,
                &c.email_fps,
                &c.phone_fps,
                &c.traits,
            ],
        )
        .await
    };
    let alias_writes = join_all(aliases.iter().map(|&i| {
        let (p, f, _) = &writes[i];
        let found = match f {
            Found::Alias(found) => found.as_ref(),
            Found::Identify(_) | Found::Nothing => None,
        };
        p.write_alias(tx, st, found)
    }));
    let (updated, inserted, alias_ids) = futures::join!(update, insert, alias_writes);
    let mut leads = settle(vec![updated.map(|_| Vec::new()), inserted])?;
    for row in leads.pop().unwrap_or_default() {
        // Ordinality is 1-based, over the inserts.
        let n: i64 = row.get(0);
        if let Some(&i) = usize::try_from(n - 1)
            .ok()
            .and_then(|k| inserts.slots.get(k))
        {
            ids[i] = row.get(1);
        }
    }
    for (&i, id) in aliases.iter().zip(settle(alias_ids)?) {
        ids[i] = id;
    }
    Ok(ids)
}

/// One array per column of the leads a wave updates or inserts.
#[derive(Default)]
struct LeadColumns<'a> {
    /// Index of each row in the wave's writes.
    slots: Vec<usize>,
    tenants: Vec<i64>,
    ids: Vec<i64>,
    workspaces: Vec<i64>,
    users: Vec<Option<&'a str>>,
    traits: Vec<&'a serde_json::Value>,
    emails: Vec<Option<&'a [u8]>>,
    phones: Vec<Option<&'a [u8]>>,
    key_ids: Vec<Option<&'a str>>,
    email_fps: Vec<Option<&'a [u8]>>,
    phone_fps: Vec<Option<&'a [u8]>>,
}

impl<'a> LeadColumns<'a> {
    fn push(&mut self, slot: usize, id: i64, p: &'a Plan<'_>, pii: &'a LeadPii) {
        self.slots.push(slot);
        self.tenants.push(p.msg.tenant_id);
        self.ids.push(id);
        self.workspaces.push(p.msg.workspace_id);
        self.users.push(p.msg.user_id.as_deref());
        self.traits.push(&p.traits);
        self.emails.push(pii.email.as_deref());
        self.phones.push(pii.phone.as_deref());
        self.key_ids.push(pii.key_id.as_deref());
        self.email_fps.push(p.email_fp.as_deref());
        self.phone_fps.push(p.phone_fp.as_deref());
    }
}

/// Step 3 for a wave: links and visitor rows in one statement (the wave's anonymous ids are
/// distinct, so no row is touched twice). Returns the messages linked.
async fn link_all(
    tx: &Transaction<'_>,
    st: &Statements,
    wave: &[&Plan<'_>],
    ids: &[i64],
) -> Result<u64, tokio_postgres::Error> {
    let mut tenants = Vec::new();
    let mut anons = Vec::new();
    let mut leads = Vec::new();
    let mut kinds = Vec::new();
    let mut messages = 0;
    let mut firsts = Vec::new();
    let mut lasts = Vec::new();
    for (p, &id) in wave.iter().zip(ids) {
        if let Some(anon) = p.link_id() {
            tenants.push(p.msg.tenant_id);
            anons.push(anon);
            leads.push(id);
            kinds.push(p.kind());
            messages += p.messages;
            firsts.push(p.first_at);
            lasts.push(p.last_at);
        }
    }
    if tenants.is_empty() {
        return Ok(0);
    }
    tx.execute(
        &st.link,
        &[&tenants, &anons, &leads, &kinds, &firsts, &lasts],
    )
    .await?;
    Ok(messages)
}

/// The outcome of pipelined statements: the first error PostgreSQL raised for the data (a
/// refused row, which the caller isolates by splitting), rather than the "transaction is
/// aborted" errors of the statements queued behind it.
fn settle<T>(
    results: Vec<Result<T, tokio_postgres::Error>>,
) -> Result<Vec<T>, tokio_postgres::Error> {
    let mut first: Option<tokio_postgres::Error> = None;
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => {
                let better = first
                    .as_ref()
                    .is_none_or(|f| !is_data_error(f) && is_data_error(&e));
                if better {
                    first = Some(e);
                }
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Declares [`Statements`] with one field per statement and its `prepare`, each name given
/// once next to its SQL.
macro_rules! statements {
    ($($name:ident = $sql:path),* $(,)?) => {
        /// The statements, prepared once per batch (an unprepared query costs a second round
        /// trip).
        struct Statements {
            $($name: Statement,)*
        }

        impl Statements {
            async fn prepare(tx: &Transaction<'_>) -> Result<Statements, tokio_postgres::Error> {
                let ($($name,)*) = futures::try_join!($(tx.prepare($sql),)*)?;
                Ok(Statements { $($name,)* })
            }
        }
    };
}

statements! {
    find_matches = sql::FIND_MATCHES,
    find_leads = sql::FIND_LEADS,
    update_leads = sql::UPDATE_LEADS,
    insert_leads = sql::INSERT_LEADS,
    find_alias = sql::FIND_ALIAS,
    rename_lead = sql::RENAME_LEAD,
    insert_alias = sql::INSERT_ALIAS,
    link = sql::LINK,
}

impl<'a> Plan<'a> {
    /// Step 1 for an alias: the lead known by its user id, else by its previous id.
    async fn find(
        &self,
        tx: &Transaction<'_>,
        st: &Statements,
    ) -> Result<Found, tokio_postgres::Error> {
        let m = self.msg;
        let (Some(user_id), Some(previous)) = (m.user_id.as_deref(), m.previous_id.as_deref())
        else {
            return Ok(Found::Nothing);
        };
        let row = tx
            .query_opt(&st.find_alias, &[&m.tenant_id, &user_id, &previous])
            .await?;
        Ok(Found::Alias(row.map(|r| (r.get(0), r.get(1)))))
    }

    /// Renames the lead an alias found (its id and user id), or inserts one; returns its id.
    async fn write_alias(
        &self,
        tx: &Transaction<'_>,
        st: &Statements,
        found: Option<&(i64, Option<String>)>,
    ) -> Result<i64, tokio_postgres::Error> {
        let m = self.msg;
        match found {
            Some((id, current)) => {
                if current.as_deref() != m.user_id.as_deref() {
                    // The previous id was the lead's user id: it is now known by the new one.
                    tx.execute(&st.rename_lead, &[&m.tenant_id, id, &m.user_id])
                        .await?;
                }
                Ok(*id)
            }
            None => {
                let row = tx
                    .query_one(
                        &st.insert_alias,
                        &[&m.tenant_id, &m.workspace_id, &m.user_id],
                    )
                    .await?;
                Ok(row.get(0))
            }
        }
    }
}
