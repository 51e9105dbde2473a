//! The identity wave planner, pure: messages folded into plans, plans grouped into waves of
//! independent ones from what each reaches, with the effect of applying them in order. The
//! database work that feeds it (what each plan reaches, what a wave finds) is in `mod.rs`.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_schema::messages::{IdentityKind, IdentityMessage, JsonObject, SealedField};
use sluice_schema::pii::{PiiKeys, Sealed, EMAIL_TRAIT, PHONE_TRAIT};

use super::lead::{lead_pii, Found, LeadPii, Pii, PiiValue};
use crate::decode::Rejection;

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
pub(super) const WAVE_MAX: usize = 1000;

/// Most plans looked at to form one wave: bounds the lookup statement.
pub(super) const WINDOW: usize = 5000;

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
pub(super) struct Plan<'a> {
    /// The first message (tenant, workspace, ids, kind).
    pub msg: &'a IdentityMessage,
    /// Index of that message among those applied; the plan covers `first..first + messages`.
    pub first: usize,
    pub pii: Pii,
    pub traits: Value,
    pub email_fp: Option<Vec<u8>>,
    pub phone_fp: Option<Vec<u8>>,
    /// Earliest and latest `occurred_at` of the messages folded in (the link's first and last
    /// seen).
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// Messages folded into this plan.
    pub messages: u64,
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
    pub fn lead_pii(&self, keys: Option<&PiiKeys>, found: &Found) -> Result<LeadPii, Rejection> {
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

    pub fn kind(&self) -> &'static str {
        match self.msg.kind {
            IdentityKind::Identify => "identify",
            IdentityKind::Alias => "alias",
        }
    }

    /// The anonymous id to link: an identify's anonymous id, an alias's previous id.
    pub fn link_id(&self) -> Option<&str> {
        match self.msg.kind {
            IdentityKind::Identify => self.msg.anonymous_id.as_deref().filter(|a| !a.is_empty()),
            IdentityKind::Alias => self
                .msg
                .user_id
                .as_ref()
                .and(self.msg.previous_id.as_deref()),
        }
    }
}

impl Plan<'_> {
    /// The indexes of the messages this plan covers (folded consecutive ones).
    pub fn covers(&self) -> std::ops::Range<usize> {
        self.first..self.first + self.messages as usize
    }
}

/// Messages folded into plans, in order, and those refused before any database work (index
/// into `msgs`, reason). A run of identifies with the same keys folds into one plan.
pub(super) fn plan_all<'a>(
    msgs: &[&'a IdentityMessage],
    keys: Option<&PiiKeys>,
) -> (Vec<Plan<'a>>, Vec<(usize, Rejection)>) {
    let mut plans: Vec<Plan<'a>> = Vec::with_capacity(msgs.len());
    let mut refused = Vec::new();
    for (first, m) in msgs.iter().enumerate() {
        let plan = match Plan::new(m, first, keys) {
            Ok(plan) => plan,
            Err(rejection) => {
                refused.push((first, rejection));
                continue;
            }
        };
        // A plan covers consecutive messages only (`first..first + messages`): never fold
        // across one refused above (precheck refuses those first, so this is a safeguard).
        let follows = plans.last().is_some_and(|last| last.covers().end == first);
        let rest = match plans.last_mut() {
            Some(last) if follows => last.absorb(plan),
            _ => Some(plan),
        };
        plans.extend(rest);
    }
    (plans, refused)
}

/// The plans not applied yet, in order (indexes into the plans).
pub(super) struct Pending(Vec<usize>);

impl Pending {
    /// All of `plans` plans pending.
    pub fn new(plans: usize) -> Pending {
        Pending((0..plans).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first [`WINDOW`] pending plans: the next wave is formed from these.
    pub fn window(&self) -> &[usize] {
        &self.0[..self.0.len().min(WINDOW)]
    }

    /// Removes plans applied (or refused) by a wave.
    pub fn applied(&mut self, done: &[usize]) {
        let done: HashSet<usize> = done.iter().copied().collect();
        self.0.retain(|i| !done.contains(i));
    }
}

/// The next wave: the plans of `window` (indexes into `plans`, in order) that share no key and
/// no reached lead with any plan before them in the window, at most `max` of them. `reach[slot]`
/// holds the existing leads `window[slot]` reaches.
///
/// A plan that waits still holds its keys and leads: a later plan sharing any of them depends
/// on it (perhaps through it on an earlier one) and waits too, so order is kept transitively.
pub(super) fn form_wave(
    plans: &[Plan<'_>],
    window: &[usize],
    reach: &[Vec<i64>],
    max: usize,
) -> Vec<usize> {
    let mut taken = Keys::default();
    let mut taken_leads: HashSet<i64> = HashSet::new();
    let mut members: Vec<usize> = Vec::new();
    for (slot, &i) in window.iter().enumerate() {
        let reached = reach.get(slot).map_or(&[][..], Vec::as_slice);
        let keys_free = taken.hold(&plans[i]);
        let leads_free = reached.iter().all(|l| !taken_leads.contains(l));
        taken_leads.extend(reached.iter().copied());
        if keys_free && leads_free && members.len() < max {
            members.push(i);
        }
    }
    members
}

/// How many plans of a wave go ahead, given the lead each found (in wave order): all of them
/// up to the first lead found a second time, which waits with everything after it.
pub(super) fn distinct_leads(found: impl IntoIterator<Item = Option<i64>>) -> usize {
    let mut leads = HashSet::new();
    let mut n = 0;
    for id in found {
        if id.is_some_and(|id| !leads.insert(id)) {
            break;
        }
        n += 1;
    }
    n
}

/// The rows of the reach lookup (`FIND_MATCHES`) for a window, as the statement's arrays: one
/// row per plan (slot = its place in the window), and a second for an alias with a previous
/// id.
pub(super) struct ReachQuery<'a> {
    pub slots: Vec<i64>,
    pub tenants: Vec<i64>,
    pub users: Vec<Option<&'a str>>,
    pub emails: Vec<Option<&'a [u8]>>,
    pub phones: Vec<Option<&'a [u8]>>,
    pub anons: Vec<Option<&'a str>>,
}

impl<'a> ReachQuery<'a> {
    pub fn new(plans: &'a [Plan<'a>], window: &[usize]) -> ReachQuery<'a> {
        let mut q = ReachQuery {
            slots: Vec::new(),
            tenants: Vec::new(),
            users: Vec::new(),
            emails: Vec::new(),
            phones: Vec::new(),
            anons: Vec::new(),
        };
        for (slot, &i) in window.iter().enumerate() {
            let (p, slot) = (&plans[i], slot as i64);
            let m = p.msg;
            // An alias reaches the lead of its user id and of its previous id, as a user id
            // and as an anonymous id (the two lookups it and its link make).
            let previous = m.previous_id.as_deref();
            let anon = match m.kind {
                IdentityKind::Identify => m.anonymous_id.as_deref(),
                IdentityKind::Alias => previous,
            };
            q.push(slot, m.tenant_id, m.user_id.as_deref(), p, anon);
            if m.kind == IdentityKind::Alias && previous.is_some() {
                q.slots.push(slot);
                q.tenants.push(m.tenant_id);
                q.users.push(previous);
                q.emails.push(None);
                q.phones.push(None);
                q.anons.push(None);
            }
        }
        q
    }

    fn push(
        &mut self,
        slot: i64,
        tenant: i64,
        user: Option<&'a str>,
        p: &'a Plan<'a>,
        anon: Option<&'a str>,
    ) {
        self.slots.push(slot);
        self.tenants.push(tenant);
        self.users.push(user);
        self.emails.push(p.email_fp.as_deref());
        self.phones.push(p.phone_fp.as_deref());
        self.anons.push(anon);
    }
}

/// Each window slot's reached leads from the lookup's rows (slot, lead id); a row for a slot
/// outside the window is ignored.
pub(super) fn reach_of(slots: usize, rows: impl IntoIterator<Item = (i64, i64)>) -> Vec<Vec<i64>> {
    let mut reach = vec![Vec::new(); slots];
    for (slot, lead) in rows {
        if let Some(r) = usize::try_from(slot).ok().and_then(|s| reach.get_mut(s)) {
            r.push(lead);
        }
    }
    reach
}

#[cfg(test)]
mod tests;
