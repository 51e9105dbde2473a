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
//! independent messages; within a wave each step (find the lead, write it, link it) is sent
//! for all messages at once, pipelined on the connection with prepared statements, so a wave
//! costs a few round trips instead of three per message.
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

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::Value;
use sluice_schema::messages::{IdentityKind, IdentityMessage, JsonObject, SealedField};
use sluice_schema::pii::{PiiKeys, Sealed, EMAIL_TRAIT, PHONE_TRAIT};
use tokio_postgres::{Statement, Transaction};

use crate::error::is_data_error;

use crate::decode::Rejection;

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

/// One PII value of a message (never logged).
#[derive(Clone)]
enum PiiValue {
    /// From a version 1 message's traits: sealed here with the active key.
    Plain(String),
    /// Sealed by the collector.
    Sealed(Sealed),
}

/// The email and phone of an identify.
#[derive(Clone, Default)]
struct Pii {
    email: Option<PiiValue>,
    phone: Option<PiiValue>,
}

/// What [`take_pii`] takes out of an identify.
struct Taken {
    pii: Pii,
    /// The traits without email and phone.
    traits: JsonObject,
    email_fp: Option<Vec<u8>>,
    phone_fp: Option<Vec<u8>>,
}

/// Splits `email` and `phone` out of traits (plaintext, version 1), and takes the sealed ones
/// of a version 2 message, which win. Fingerprints: the collector's, else computed here.
fn take_pii(msg: &IdentityMessage, keys: Option<&PiiKeys>) -> Result<Taken, Rejection> {
    let mut rest = msg.traits.clone();
    let mut take = |k: &str| match rest.remove(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (email, phone) = (take(EMAIL_TRAIT), take(PHONE_TRAIT));
    let email_fp = keys
        .zip(email.as_deref())
        .and_then(|(k, e)| k.fingerprint_email(e))
        .map(|f| f.to_vec());
    let phone_fp = keys
        .zip(phone.as_deref())
        .and_then(|(k, p)| k.fingerprint_phone(p))
        .map(|f| f.to_vec());
    let mut pii = Pii {
        email: email.map(PiiValue::Plain),
        phone: phone.map(PiiValue::Plain),
    };
    let (mut email_fp, mut phone_fp) = (email_fp, phone_fp);
    if let Some(sealed) = &msg.pii {
        let open = |f: &SealedField| -> Result<(PiiValue, Option<Vec<u8>>), Rejection> {
            let (ciphertext, fingerprint) = f.decode().ok_or_else(|| {
                Rejection::new(
                    "malformed",
                    "a sealed PII value or fingerprint is not base64; the producer is not a sluice collector",
                )
            })?;
            let value = PiiValue::Sealed(Sealed {
                key_id: sealed.key_id.clone(),
                ciphertext,
            });
            Ok((value, fingerprint))
        };
        if let Some(f) = &sealed.email {
            let (value, fp) = open(f)?;
            pii.email = Some(value);
            email_fp = fp;
        }
        if let Some(f) = &sealed.phone {
            let (value, fp) = open(f)?;
            pii.phone = Some(value);
            phone_fp = fp;
        }
    }
    Ok(Taken {
        pii,
        traits: rest,
        email_fp,
        phone_fp,
    })
}

/// Checked before the transaction: an identify carrying plaintext PII cannot be stored
/// without keys, nor one whose sealed values are not base64.
pub(crate) fn precheck(msg: &IdentityMessage, keys: Option<&PiiKeys>) -> Result<(), Rejection> {
    if msg.kind != IdentityKind::Identify {
        return Ok(());
    }
    let Taken { pii, .. } = take_pii(msg, keys)?;
    let plain = |v: &Option<PiiValue>| matches!(v, Some(PiiValue::Plain(_)));
    if keys.is_none() && (plain(&pii.email) || plain(&pii.phone)) {
        return Err(Rejection::new(
            "pii_key_missing",
            "identify carries a plaintext email or phone (a collector that does not seal) but the writer has no SLUICE_PII_KEYS; set them and replay the DLQ",
        ));
    }
    Ok(())
}

/// Most messages in one wave: bounds the statements in flight on the connection.
const WAVE_MAX: usize = 1000;

/// Most plans looked at to form one wave: bounds the lookup statement.
const WINDOW: usize = 5000;

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
    let mut plans: Vec<Plan<'_>> = Vec::with_capacity(msgs.len());
    for (first, m) in msgs.iter().enumerate() {
        let plan = match Plan::new(m, first, keys) {
            Ok(plan) => plan,
            Err(rejection) => {
                applied.refused.push((first, rejection));
                continue;
            }
        };
        // A plan covers consecutive messages only (`first..first + messages`): never fold
        // across one refused above (precheck refuses those first, so this is a safeguard).
        let follows = plans
            .last()
            .is_some_and(|last| last.first + last.messages as usize == first);
        let rest = match plans.last_mut() {
            Some(last) if follows => last.absorb(plan),
            _ => Some(plan),
        };
        plans.extend(rest);
    }
    // Indexes of the plans not applied yet, in order.
    let mut pending: Vec<usize> = (0..plans.len()).collect();
    while !pending.is_empty() {
        let window = &pending[..pending.len().min(WINDOW)];
        let looking = std::time::Instant::now();
        let reach = find_matches(tx, st, &plans, window).await?;
        applied.reach_time += looking.elapsed();
        // Everything the plans looked at so far hold (joined or not): a later plan that shares
        // any of it depends on one of them and waits.
        let mut taken = Keys::default();
        let mut taken_leads: HashSet<i64> = HashSet::new();
        let mut members: Vec<usize> = Vec::new();
        for (slot, &i) in window.iter().enumerate() {
            let p = &plans[i];
            let keys_free = taken.hold(p);
            let leads_free = reach[slot].iter().all(|l| !taken_leads.contains(l));
            taken_leads.extend(reach[slot].iter().copied());
            if keys_free && leads_free && members.len() < WAVE_MAX {
                members.push(i);
            }
        }
        let wave: Vec<&Plan<'_>> = members.iter().map(|&i| &plans[i]).collect();
        // 1. Find each message's lead, all at once.
        let found = find_all(tx, st, &wave).await?;
        // Disjoint reach means distinct leads among what existed at the reach lookup; this later
        // statement also sees leads other transactions (lanes, writers) committed since, so
        // should a lead appear twice, the wave stops before the second message, which waits.
        let mut leads = HashSet::new();
        let kept = found
            .iter()
            .position(|f| f.lead_id().is_some_and(|id| !leads.insert(id)))
            .unwrap_or(found.len());
        let wave = &wave[..kept];
        // 2. Decide each lead's ciphertexts; a message whose kept value cannot be brought
        // under one key id with its new one is refused, and touches nothing.
        let mut writes: Vec<(&Plan<'_>, &Found, LeadPii)> = Vec::with_capacity(wave.len());
        for (p, f) in wave.iter().zip(&found) {
            match p.lead_pii(keys, f) {
                Ok(pii) => writes.push((p, f, pii)),
                Err(rejection) => applied.refused.extend(
                    (p.first..p.first + p.messages as usize).map(|i| (i, rejection.clone())),
                ),
            }
        }
        // 3. Update or insert each lead.
        let ids = settle(join_all(writes.iter().map(|(p, f, pii)| p.write(tx, st, f, pii))).await)?;
        let written: Vec<&Plan<'_>> = writes.iter().map(|(p, ..)| *p).collect();
        applied.leads += written.iter().map(|p| p.messages).sum::<u64>();
        // 4. Link the anonymous ids (and point their visitor rows at the lead).
        let linked = link_all(tx, st, &written, &ids).await?;
        applied.links += linked;
        applied.waves += 1;
        let done: HashSet<usize> = members[..kept].iter().copied().collect();
        pending.retain(|i| !done.contains(i));
    }
    Ok(applied)
}

/// Every existing lead each plan of `window` (indexes into `plans`) can reach through any of
/// its keys, in one statement: the wave is formed from these.
async fn find_matches(
    tx: &Transaction<'_>,
    st: &Statements,
    plans: &[Plan<'_>],
    window: &[usize],
) -> Result<Vec<Vec<i64>>, tokio_postgres::Error> {
    let mut slots: Vec<i64> = Vec::new();
    let mut tenants: Vec<i64> = Vec::new();
    let mut users: Vec<Option<&str>> = Vec::new();
    let mut emails: Vec<Option<&[u8]>> = Vec::new();
    let mut phones: Vec<Option<&[u8]>> = Vec::new();
    let mut anons: Vec<Option<&str>> = Vec::new();
    for (slot, &i) in window.iter().enumerate() {
        let (p, slot) = (&plans[i], slot as i64);
        let m = p.msg;
        // An alias reaches the lead of its user id and of its previous id, as a user id and
        // as an anonymous id (the two lookups it and its link make).
        let previous = m.previous_id.as_deref();
        slots.push(slot);
        tenants.push(m.tenant_id);
        users.push(m.user_id.as_deref());
        emails.push(p.email_fp.as_deref());
        phones.push(p.phone_fp.as_deref());
        anons.push(match m.kind {
            IdentityKind::Identify => m.anonymous_id.as_deref(),
            IdentityKind::Alias => previous,
        });
        if m.kind == IdentityKind::Alias && previous.is_some() {
            slots.push(slot);
            tenants.push(m.tenant_id);
            users.push(previous);
            emails.push(None);
            phones.push(None);
            anons.push(None);
        }
    }
    let rows = tx
        .query(
            &st.find_matches,
            &[&slots, &tenants, &users, &emails, &phones, &anons],
        )
        .await?;
    let mut reach = vec![Vec::new(); window.len()];
    for row in rows {
        let slot: i64 = row.get(0);
        if let Some(r) = usize::try_from(slot).ok().and_then(|s| reach.get_mut(s)) {
            r.push(row.get(1));
        }
    }
    Ok(reach)
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

/// The statements, prepared once per batch (an unprepared query costs a second round trip).
struct Statements {
    find_matches: Statement,
    find_leads: Statement,
    update_lead: Statement,
    insert_lead: Statement,
    find_alias: Statement,
    rename_lead: Statement,
    insert_alias: Statement,
    link: Statement,
}

impl Statements {
    async fn prepare(tx: &Transaction<'_>) -> Result<Statements, tokio_postgres::Error> {
        let (
            find_matches,
            find_leads,
            update_lead,
            insert_lead,
            find_alias,
            rename_lead,
            insert_alias,
            link,
        ) = futures::try_join!(
            tx.prepare(FIND_MATCHES),
            tx.prepare(FIND_LEADS),
            tx.prepare(UPDATE_LEAD),
            tx.prepare(INSERT_LEAD),
            tx.prepare(FIND_ALIAS),
            tx.prepare(RENAME_LEAD),
            tx.prepare(INSERT_ALIAS),
            tx.prepare(LINK),
        )?;
        Ok(Statements {
            find_matches,
            find_leads,
            update_lead,
            insert_lead,
            find_alias,
            rename_lead,
            insert_alias,
            link,
        })
    }
}

/// Keys held by plans not applied yet, per namespace (user ids, anonymous ids, fingerprints).
#[derive(Default)]
struct Keys<'a> {
    users: HashSet<(i64, &'a str)>,
    anonymous: HashSet<(i64, &'a str)>,
    fingerprints: HashSet<(i64, &'a [u8])>,
}

impl<'a> Keys<'a> {
    /// `p`'s keys: user ids, anonymous ids and fingerprints (an alias's previous id is both a
    /// user id and an anonymous id).
    fn of(p: &'a Plan<'a>) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a [u8]>) {
        let m = p.msg;
        let previous = m.previous_id.as_deref();
        let users = m.user_id.as_deref().into_iter().chain(previous).collect();
        let anonymous = m
            .anonymous_id
            .as_deref()
            .into_iter()
            .chain(previous)
            .collect();
        let fps = p
            .email_fp
            .as_deref()
            .into_iter()
            .chain(p.phone_fp.as_deref())
            .collect();
        (users, anonymous, fps)
    }

    /// Holds `p`'s keys (a message that waits holds them too); true when none of them was
    /// held before.
    fn hold(&mut self, p: &'a Plan<'a>) -> bool {
        let t = p.msg.tenant_id;
        let (users, anonymous, fps) = Keys::of(p);
        let free = users.iter().all(|u| !self.users.contains(&(t, *u)))
            && anonymous.iter().all(|a| !self.anonymous.contains(&(t, *a)))
            && fps.iter().all(|f| !self.fingerprints.contains(&(t, *f)));
        self.users.extend(users.into_iter().map(|u| (t, u)));
        self.anonymous.extend(anonymous.into_iter().map(|a| (t, a)));
        self.fingerprints.extend(fps.into_iter().map(|f| (t, f)));
        free
    }
}

/// One message with what can be computed before the database: PII split out and
/// fingerprinted, remaining traits.
struct Plan<'a> {
    /// The first message (tenant, workspace, ids, kind).
    msg: &'a IdentityMessage,
    /// Index of that message among those applied; the plan covers `first..first + messages`.
    first: usize,
    pii: Pii,
    traits: Value,
    email_fp: Option<Vec<u8>>,
    phone_fp: Option<Vec<u8>>,
    /// Earliest and latest `occurred_at` of the messages folded in (the link's first and last
    /// seen).
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    /// Messages folded into this plan.
    messages: u64,
}

/// A lead an identify matched, with what its update needs.
struct LeadRow {
    id: i64,
    email: Option<Vec<u8>>,
    phone: Option<Vec<u8>>,
    key_id: Option<String>,
}

/// What step 1 found.
enum Found {
    /// Identify: the matched lead, if any.
    Identify(Option<LeadRow>),
    /// Alias: the lead known by the user id or the previous id (id, its user id), if any.
    Alias(Option<(i64, Option<String>)>),
    /// An alias without both ids (refused by decode::validate already): nothing to do.
    Nothing,
}

impl Found {
    fn lead_id(&self) -> Option<i64> {
        match self {
            Found::Identify(Some(row)) => Some(row.id),
            Found::Alias(Some((id, _))) => Some(*id),
            _ => None,
        }
    }
}

/// What a lead row stores of PII after an identify: both ciphertexts under one key id.
#[derive(Default)]
struct LeadPii {
    email: Option<Vec<u8>>,
    phone: Option<Vec<u8>>,
    key_id: Option<String>,
}

impl<'a> Plan<'a> {
    fn new(
        msg: &'a IdentityMessage,
        first: usize,
        keys: Option<&PiiKeys>,
    ) -> Result<Plan<'a>, Rejection> {
        if msg.kind == IdentityKind::Alias {
            return Ok(Plan {
                msg,
                first,
                pii: Pii::default(),
                traits: Value::Null,
                email_fp: None,
                phone_fp: None,
                first_at: msg.occurred_at,
                last_at: msg.occurred_at,
                messages: 1,
            });
        }
        let Taken {
            pii,
            traits,
            email_fp,
            phone_fp,
        } = take_pii(msg, keys)?;
        Ok(Plan {
            msg,
            first,
            pii,
            traits: Value::Object(traits),
            email_fp,
            phone_fp,
            first_at: msg.occurred_at,
            last_at: msg.occurred_at,
            messages: 1,
        })
    }

    /// The ciphertexts and key id the lead stores after this identify (see [`lead_pii`]).
    fn lead_pii(&self, keys: Option<&PiiKeys>, found: &Found) -> Result<LeadPii, Rejection> {
        let old = match found {
            Found::Identify(Some(row)) => Some(row),
            Found::Identify(None) => None,
            // Aliases write no PII.
            _ => return Ok(LeadPii::default()),
        };
        lead_pii(keys, &self.pii, old)
    }

    /// Folds `next`, the message right after this plan's, into it when both are identifies
    /// with the same keys (tenant, user id, anonymous id, fingerprints): applying the fold
    /// has the effect of applying the two in order (traits merged with the later one winning,
    /// as `traits || a || b`; the later PII; the link's first/last seen least/greatest).
    /// Visitors identify repeatedly, so runs of such messages are the common case. Returns
    /// `next` when it cannot be folded.
    fn absorb(&mut self, next: Plan<'a>) -> Option<Plan<'a>> {
        let (a, b) = (self.msg, next.msg);
        let same = a.kind == IdentityKind::Identify
            && b.kind == IdentityKind::Identify
            && a.tenant_id == b.tenant_id
            && a.user_id == b.user_id
            && a.anonymous_id == b.anonymous_id
            && self.email_fp == next.email_fp
            && self.phone_fp == next.phone_fp;
        if !same {
            return Some(next);
        }
        if let (Value::Object(acc), Value::Object(more)) = (&mut self.traits, next.traits) {
            acc.extend(more);
        }
        self.pii.email = next.pii.email.or(self.pii.email.take());
        self.pii.phone = next.pii.phone.or(self.pii.phone.take());
        self.first_at = self.first_at.min(next.first_at);
        self.last_at = self.last_at.max(next.last_at);
        self.messages += next.messages;
        None
    }

    fn kind(&self) -> &'static str {
        match self.msg.kind {
            IdentityKind::Identify => "identify",
            IdentityKind::Alias => "alias",
        }
    }

    /// The anonymous id to link: an identify's anonymous id, an alias's previous id.
    fn link_id(&self) -> Option<&str> {
        match self.msg.kind {
            IdentityKind::Identify => self.msg.anonymous_id.as_deref().filter(|a| !a.is_empty()),
            IdentityKind::Alias => self
                .msg
                .user_id
                .as_ref()
                .and(self.msg.previous_id.as_deref()),
        }
    }

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

    /// Updates or inserts the lead with `pii` (from [`Plan::lead_pii`]); returns its id.
    async fn write(
        &self,
        tx: &Transaction<'_>,
        st: &Statements,
        found: &Found,
        pii: &LeadPii,
    ) -> Result<i64, tokio_postgres::Error> {
        let m = self.msg;
        let (email_fp, phone_fp, traits) = (&self.email_fp, &self.phone_fp, &self.traits);
        match found {
            Found::Identify(Some(row)) => {
                let id = row.id;
                tx.execute(
                    &st.update_lead,
                    &[
                        &m.tenant_id,
                        &id,
                        &m.user_id,
                        traits,
                        &pii.email,
                        &pii.phone,
                        &pii.key_id,
                        email_fp,
                        phone_fp,
                    ],
                )
                .await?;
                Ok(id)
            }
            Found::Identify(None) => {
                let row = tx
                    .query_one(
                        &st.insert_lead,
                        &[
                            &m.tenant_id,
                            &m.workspace_id,
                            &m.user_id,
                            &pii.email,
                            &pii.phone,
                            &pii.key_id,
                            email_fp,
                            phone_fp,
                            traits,
                        ],
                    )
                    .await?;
                Ok(row.get(0))
            }
            Found::Alias(Some((id, current))) => {
                if current.as_deref() != m.user_id.as_deref() {
                    // The previous id was the lead's user id: it is now known by the new one.
                    tx.execute(&st.rename_lead, &[&m.tenant_id, id, &m.user_id])
                        .await?;
                }
                Ok(*id)
            }
            Found::Alias(None) | Found::Nothing => {
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

/// Every lead each lookup row reaches (slot, lead id): by user id, email fingerprint, phone
/// fingerprint and anonymous-id link, one index lookup per branch (see `FIND_LEADS` on `OR`).
const FIND_MATCHES: &str = "SELECT DISTINCT q.slot, m.id \
    FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::text[]) \
      AS q(slot, tenant_id, user_id, email_fp, phone_fp, anonymous_id) \
    CROSS JOIN LATERAL ( \
      (SELECT l.id FROM lead l WHERE l.tenant_id = q.tenant_id AND l.user_id = q.user_id) \
      UNION ALL (SELECT l.id FROM lead l \
        WHERE l.tenant_id = q.tenant_id AND l.email_fingerprint = q.email_fp) \
      UNION ALL (SELECT l.id FROM lead l \
        WHERE l.tenant_id = q.tenant_id AND l.phone_fingerprint = q.phone_fp) \
      UNION ALL (SELECT k.lead_id FROM identity_link k \
        WHERE k.tenant_id = q.tenant_id AND k.anonymous_id = q.anonymous_id) \
    ) m(id)";

/// The best lead for each identify of a wave (arrays in, one row per match, by ordinality):
/// same user id, then same email fingerprint, then same phone
/// fingerprint, then the lowest-id lead the anonymous id is linked to. One index lookup per
/// branch: an `OR` of the four in one `WHERE` (the first version) made PostgreSQL read every
/// lead of the tenant for each identify (a bitmap scan on `tenant_id` filtered row by row),
/// so each call grew with the tenant's leads and 20,000-message batches took 5-30 s.
const FIND_LEADS: &str = "SELECT q.n, m.id, m.email_ciphertext, m.phone_ciphertext, m.pii_key_id \
    FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bytea[], $5::text[]) \
      WITH ORDINALITY AS q(tenant_id, user_id, email_fp, phone_fp, anonymous_id, n) \
    CROSS JOIN LATERAL ( \
      SELECT * FROM ( \
        (SELECT 1 AS rank, l.* FROM lead l WHERE l.tenant_id = q.tenant_id AND l.user_id = q.user_id) \
        UNION ALL (SELECT 2, l.* FROM lead l \
          WHERE l.tenant_id = q.tenant_id AND l.email_fingerprint = q.email_fp) \
        UNION ALL (SELECT 3, l.* FROM lead l \
          WHERE l.tenant_id = q.tenant_id AND l.phone_fingerprint = q.phone_fp) \
        UNION ALL (SELECT 4, l.* FROM identity_link k JOIN lead l \
          ON l.tenant_id = k.tenant_id AND l.id = k.lead_id \
          WHERE k.tenant_id = q.tenant_id AND k.anonymous_id = q.anonymous_id) \
      ) c ORDER BY rank, id LIMIT 1 \
    ) m";

/// A fingerprint owned by another lead stays there (unique per tenant): the call is attached
/// to the best match and does not steal it.
const UPDATE_LEAD: &str =
    "UPDATE lead SET user_id = coalesce(user_id, $3), traits = traits || $4, \
       email_ciphertext = $5, phone_ciphertext = $6, pii_key_id = $7, \
       email_fingerprint = CASE WHEN $8::bytea IS NULL OR EXISTS (SELECT 1 FROM lead o \
         WHERE o.tenant_id = $1 AND o.email_fingerprint = $8 AND o.id <> $2) \
         THEN email_fingerprint ELSE $8 END, \
       phone_fingerprint = CASE WHEN $9::bytea IS NULL OR EXISTS (SELECT 1 FROM lead o \
         WHERE o.tenant_id = $1 AND o.phone_fingerprint = $9 AND o.id <> $2) \
         THEN phone_fingerprint ELSE $9 END, \
       updated_at = now() \
     WHERE tenant_id = $1 AND id = $2";

const INSERT_LEAD: &str = "INSERT INTO lead (tenant_id, workspace_id, user_id, email_ciphertext, \
       phone_ciphertext, pii_key_id, email_fingerprint, phone_fingerprint, traits) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id";

/// The lead an alias renames or links to: the one known by the new user id first.
const FIND_ALIAS: &str =
    "SELECT id, user_id FROM lead WHERE tenant_id = $1 AND user_id IN ($2, $3) \
     ORDER BY (user_id = $2) DESC LIMIT 1";

const RENAME_LEAD: &str =
    "UPDATE lead SET user_id = $3, updated_at = now() WHERE tenant_id = $1 AND id = $2";

const INSERT_ALIAS: &str =
    "INSERT INTO lead (tenant_id, workspace_id, user_id) VALUES ($1, $2, $3) RETURNING id";

/// The link, and the visitor row (it may not exist yet: its topic is consumed independently)
/// pointed at its lead, in one statement.
const LINK: &str = "WITH q AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], \
       $4::text[], $5::timestamptz[], $6::timestamptz[]) \
       AS q(tenant_id, anonymous_id, lead_id, kind, first_at, last_at)), \
     link AS (INSERT INTO identity_link AS l (tenant_id, anonymous_id, lead_id, kind, \
       first_seen_at, last_seen_at) SELECT tenant_id, anonymous_id, lead_id, kind, first_at, last_at \
       FROM q ORDER BY tenant_id, anonymous_id \
     ON CONFLICT (tenant_id, anonymous_id, lead_id) DO UPDATE SET \
       first_seen_at = least(l.first_seen_at, excluded.first_seen_at), \
       last_seen_at = greatest(l.last_seen_at, excluded.last_seen_at)) \
     UPDATE visitor v SET lead_id = q.lead_id FROM q \
     WHERE v.tenant_id = q.tenant_id AND v.anonymous_id = q.anonymous_id \
       AND v.lead_id IS DISTINCT FROM q.lead_id";

/// Why a message is refused when a lead's values cannot share one key id.
fn key_missing(key_id: &str) -> Rejection {
    Rejection::new(
        "pii_key_missing",
        format!(
            "the lead keeps a value sealed under PII key {key_id:?} and this identify brings one under another key; the writer needs both keys to re-seal the kept value (one key id covers a lead): add {key_id:?} to the writer's SLUICE_PII_KEYS and replay the DLQ"
        ),
    )
}

/// The ciphertexts and single key id a lead stores after an identify with `new` values, over
/// the lead `old` (none: a new lead).
///
/// - New values: the key of the first one (email, else phone) is the lead's; every other value,
///   new or kept, that is under another key is re-sealed under it. A kept value whose key this
///   writer lacks (or that does not open) refuses the message: relabelling its ciphertext
///   with the new key id would make it undecryptable for ever.
/// - No new value: the kept ones move to the writer's active key when all of them open,
///   else stay as they are, under their own key id.
fn lead_pii(
    keys: Option<&PiiKeys>,
    new: &Pii,
    old: Option<&LeadRow>,
) -> Result<LeadPii, Rejection> {
    let old_key = old.and_then(|r| r.key_id.as_deref());
    let kept = |new: &Option<PiiValue>, old_ct: Option<&Vec<u8>>| match new {
        Some(_) => None,
        None => old_ct.cloned(),
    };
    let kept_email = kept(&new.email, old.and_then(|r| r.email.as_ref()));
    let kept_phone = kept(&new.phone, old.and_then(|r| r.phone.as_ref()));
    // Plaintext values (version 1) are sealed with the writer's active key.
    let seal = |v: &PiiValue| -> Result<Sealed, Rejection> {
        match v {
            PiiValue::Sealed(s) => Ok(s.clone()),
            PiiValue::Plain(p) => keys.map(|k| k.encrypt(p.as_bytes())).ok_or_else(|| {
                Rejection::new(
                    "pii_key_missing",
                    "identify carries a plaintext email or phone but the writer has no SLUICE_PII_KEYS; set them and replay the DLQ",
                )
            }),
        }
    };
    let new_email = new.email.as_ref().map(seal).transpose()?;
    let new_phone = new.phone.as_ref().map(seal).transpose()?;
    let Some(target) = new_email
        .as_ref()
        .or(new_phone.as_ref())
        .map(|s| s.key_id.clone())
    else {
        // Nothing new: move the kept values to the active key only when all of them open.
        if let (Some(keys), Some(old_key)) = (keys, old_key) {
            if old_key != keys.active_key_id() {
                let move_one = |ct: &Option<Vec<u8>>| -> Result<Option<Vec<u8>>, ()> {
                    match ct {
                        Some(ct) => {
                            let plain = keys.decrypt(old_key, ct).map_err(|_| ())?;
                            Ok(Some(keys.encrypt(&plain).ciphertext))
                        }
                        None => Ok(None),
                    }
                };
                if let (Ok(email), Ok(phone)) = (move_one(&kept_email), move_one(&kept_phone)) {
                    return Ok(LeadPii {
                        email,
                        phone,
                        key_id: Some(keys.active_key_id().to_owned()),
                    });
                }
            }
        }
        return Ok(LeadPii {
            email: kept_email,
            phone: kept_phone,
            key_id: old_key.map(str::to_owned),
        });
    };
    // Brings one value under `target`: as it is when already there, else opened and sealed.
    let under_target = |ct: Vec<u8>, from: &str| -> Result<Vec<u8>, Rejection> {
        if from == target {
            return Ok(ct);
        }
        let keys = keys.ok_or_else(|| key_missing(from))?;
        let plain = keys.decrypt(from, &ct).map_err(|_| key_missing(from))?;
        keys.encrypt_with(&target, &plain)
            .map(|s| s.ciphertext)
            .map_err(|_| key_missing(&target))
    };
    let email = match (new_email, kept_email) {
        (Some(s), _) => Some(under_target(s.ciphertext, &s.key_id)?),
        (None, Some(ct)) => Some(under_target(ct, old_key.unwrap_or(&target))?),
        (None, None) => None,
    };
    let phone = match (new_phone, kept_phone) {
        (Some(s), _) => Some(under_target(s.ciphertext, &s.key_id)?),
        (None, Some(ct)) => Some(under_target(ct, old_key.unwrap_or(&target))?),
        (None, None) => None,
    };
    Ok(LeadPii {
        email,
        phone,
        key_id: Some(target),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys of 32 bytes of 1 (`k1`) and of 2 (`k2`), as base64.
    fn keys(list: &[(&str, u8)], active: &str) -> PiiKeys {
        let text: Vec<String> = list
            .iter()
            .map(|(id, b)| {
                let b64 = match b {
                    1 => "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                    _ => "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
                };
                format!("{id}={b64}")
            })
            .collect();
        PiiKeys::from_env_strings(&text.join(","), active).unwrap()
    }

    fn lead(keys: &PiiKeys, email: &str, phone: &str) -> LeadRow {
        LeadRow {
            id: 1,
            email: Some(keys.encrypt(email.as_bytes()).ciphertext),
            phone: Some(keys.encrypt(phone.as_bytes()).ciphertext),
            key_id: Some(keys.active_key_id().to_owned()),
        }
    }

    fn sealed_phone(keys: &PiiKeys, phone: &str) -> Pii {
        Pii {
            email: None,
            phone: Some(PiiValue::Sealed(keys.encrypt(phone.as_bytes()))),
        }
    }

    fn open(keys: &PiiKeys, pii: &LeadPii, ct: &Option<Vec<u8>>) -> String {
        let key = pii.key_id.as_deref().unwrap();
        String::from_utf8(keys.decrypt(key, ct.as_ref().unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn a_kept_value_is_resealed_under_the_new_values_key() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        // The collector seals under k2; the writer knows both keys.
        let collector = keys(&[("k1", 1), ("k2", 2)], "k2");
        let writer = keys(&[("k1", 1), ("k2", 2)], "k1");
        let pii = lead_pii(Some(&writer), &sealed_phone(&collector, "+442"), Some(&row)).unwrap();
        assert_eq!(pii.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &pii, &pii.email), "ada@example.com");
        assert_eq!(open(&writer, &pii, &pii.phone), "+442");
    }

    #[test]
    fn a_kept_value_whose_key_is_missing_refuses_instead_of_relabelling() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        let collector = keys(&[("k1", 1), ("k2", 2)], "k2");
        // Writer lost k1: relabelling the kept email as k2 would orphan it.
        let writer = keys(&[("k2", 2)], "k2");
        let refused = lead_pii(Some(&writer), &sealed_phone(&collector, "+442"), Some(&row))
            .err()
            .unwrap();
        assert_eq!(refused.reason, "pii_key_missing");
        assert!(refused.detail.contains("k1"), "{}", refused.detail);
        // No keys at all: refused the same way.
        assert!(lead_pii(None, &sealed_phone(&collector, "+442"), Some(&row)).is_err());
        // The same key, or both values new: nothing to re-seal, stored as they came.
        let same = lead_pii(None, &sealed_phone(&old, "+443"), Some(&row)).unwrap();
        assert_eq!(same.key_id.as_deref(), Some("k1"));
        assert_eq!(same.email, row.email);
        let both = Pii {
            email: Some(PiiValue::Sealed(collector.encrypt(b"new@example.com"))),
            phone: Some(PiiValue::Sealed(collector.encrypt(b"+444"))),
        };
        let both = lead_pii(None, &both, Some(&row)).unwrap();
        assert_eq!(both.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&collector, &both, &both.email), "new@example.com");
    }

    #[test]
    fn without_new_values_the_lead_moves_to_the_active_key_only_when_all_open() {
        let old = keys(&[("k1", 1)], "k1");
        let row = lead(&old, "ada@example.com", "+441");
        let writer = keys(&[("k1", 1), ("k2", 2)], "k2");
        let moved = lead_pii(Some(&writer), &Pii::default(), Some(&row)).unwrap();
        assert_eq!(moved.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &moved, &moved.phone), "+441");
        // k1 unknown: left exactly as it was, under its own id.
        let lost = keys(&[("k2", 2)], "k2");
        let kept = lead_pii(Some(&lost), &Pii::default(), Some(&row)).unwrap();
        assert_eq!(kept.key_id.as_deref(), Some("k1"));
        assert_eq!((kept.email, kept.phone), (row.email, row.phone));
    }

    #[test]
    fn plaintext_values_of_version_1_are_sealed_with_the_writers_active_key() {
        let writer = keys(&[("k1", 1), ("k2", 2)], "k2");
        let pii = Pii {
            email: Some(PiiValue::Plain("ada@example.com".into())),
            phone: None,
        };
        let new = lead_pii(Some(&writer), &pii, None).unwrap();
        assert_eq!(new.key_id.as_deref(), Some("k2"));
        assert_eq!(open(&writer, &new, &new.email), "ada@example.com");
        assert!(new.phone.is_none());
        assert!(lead_pii(None, &pii, None).is_err());
    }
}
