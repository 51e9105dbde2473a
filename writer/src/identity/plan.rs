//! The identity wave planner, pure: messages folded into plans, plans grouped into waves of
//! independent ones from what each reaches, with the effect of applying them in order. The
//! database work that feeds it (what each plan reaches, what a wave finds) is in `mod.rs`.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_schema::messages::{IdentityKind, IdentityMessage, JsonObject, SealedField};
use sluice_schema::pii::{PiiKeys, Sealed};

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
    let (email, phone) = (take("email"), take("phone"));
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
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn keys() -> PiiKeys {
        PiiKeys::from_env_strings("k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=", "k1").unwrap()
    }

    fn msg(kind: IdentityKind, tenant: i64, n: i64) -> IdentityMessage {
        let at = Utc.timestamp_opt(1_700_000_000 + n, 0).unwrap();
        IdentityMessage {
            v: 1,
            tenant_id: tenant,
            workspace_id: 1,
            kind,
            message_id: format!("m{n}"),
            anonymous_id: None,
            user_id: None,
            previous_id: None,
            traits: JsonObject::new(),
            context: JsonObject::new(),
            occurred_at: at,
            received_at: at,
            pii: None,
        }
    }

    /// An identify of `anon` (and `user`, and a plaintext `email` trait) in tenant 1.
    fn identify(anon: &str, user: Option<&str>, email: Option<&str>) -> IdentityMessage {
        let mut m = msg(IdentityKind::Identify, 1, 0);
        m.anonymous_id = Some(anon.to_owned());
        m.user_id = user.map(str::to_owned);
        if let Some(e) = email {
            m.traits.insert("email".into(), Value::from(e));
        }
        m
    }

    /// An alias of `previous` into `user` in tenant 1.
    fn alias(previous: &str, user: &str) -> IdentityMessage {
        let mut m = msg(IdentityKind::Alias, 1, 0);
        m.previous_id = Some(previous.to_owned());
        m.user_id = Some(user.to_owned());
        m
    }

    /// Runs the planner as `apply` does, every wave applied whole, with `reach(i)` the leads
    /// message `i` reaches (the same at every lookup). Returns each wave's messages.
    fn waves_with(
        msgs: &[IdentityMessage],
        reach: impl Fn(usize) -> Vec<i64>,
        max: usize,
    ) -> Vec<Vec<usize>> {
        let refs: Vec<&IdentityMessage> = msgs.iter().collect();
        let k = keys();
        let (plans, refused) = plan_all(&refs, Some(&k));
        assert!(refused.is_empty(), "{:?}", refused.len());
        let mut pending = Pending::new(plans.len());
        let mut waves = Vec::new();
        while !pending.is_empty() {
            let window = pending.window();
            let r: Vec<Vec<i64>> = window.iter().map(|&i| reach(plans[i].first)).collect();
            let members = form_wave(&plans, window, &r, max);
            assert!(
                !members.is_empty(),
                "a wave always takes the first pending plan"
            );
            waves.push(members.iter().flat_map(|&i| plans[i].covers()).collect());
            pending.applied(&members);
        }
        waves
    }

    fn waves(msgs: &[IdentityMessage]) -> Vec<Vec<usize>> {
        waves_with(msgs, |_| Vec::new(), WAVE_MAX)
    }

    #[test]
    fn independent_messages_are_taken_together() {
        let msgs = [
            identify("a", Some("ua"), Some("a@example.com")),
            identify("b", Some("ub"), Some("b@example.com")),
            identify("c", None, None),
            alias("d", "ud"),
        ];
        assert_eq!(waves(&msgs), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn a_run_of_the_same_identify_folds_into_one_plan_the_later_winning() {
        let mut first = identify("a", Some("u"), None);
        first.traits.insert("plan".into(), Value::from("free"));
        first.traits.insert("seen".into(), Value::from(1));
        let mut second = identify("a", Some("u"), None);
        second.traits.insert("plan".into(), Value::from("pro"));
        second.occurred_at = first.occurred_at + chrono::Duration::seconds(5);
        let (msgs, k) = ([first, second], keys());
        let refs: Vec<&IdentityMessage> = msgs.iter().collect();
        let (plans, _) = plan_all(&refs, Some(&k));
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].covers(), 0..2);
        assert_eq!(plans[0].traits["plan"], "pro");
        assert_eq!(plans[0].traits["seen"], 1);
        assert_eq!(plans[0].first_at, msgs[0].occurred_at);
        assert_eq!(plans[0].last_at, msgs[1].occurred_at);
        assert_eq!(waves(&msgs), vec![vec![0, 1]]);
    }

    #[test]
    fn a_repeated_visitor_waits_behind_itself_however_many_others() {
        // Not consecutive, so not folded: x identifies three times among others.
        let msgs = [
            identify("x", Some("u1"), None),
            identify("y", None, None),
            identify("x", Some("u2"), None),
            identify("z", None, None),
            identify("x", Some("u3"), None),
            identify("w", None, None),
        ];
        assert_eq!(waves(&msgs), vec![vec![0, 1, 3, 5], vec![2], vec![4]]);
    }

    #[test]
    fn a_shared_user_id_or_fingerprint_orders_the_messages() {
        let by_user = [
            identify("a", Some("u"), None),
            identify("b", Some("u"), None),
        ];
        assert_eq!(waves(&by_user), vec![vec![0], vec![1]]);
        // Same email under two visitors and users: the fingerprint is shared.
        let by_email = [
            identify("a", Some("ua"), Some("Ada@Example.com")),
            identify("b", Some("ub"), Some("ada@example.com")),
        ];
        assert_eq!(waves(&by_email), vec![vec![0], vec![1]]);
    }

    #[test]
    fn a_shared_reachable_lead_orders_otherwise_independent_messages() {
        // Distinct keys, but both reach lead 7 (say a's email and b's user id point at it).
        let msgs = [
            identify("a", None, Some("a@example.com")),
            identify("b", Some("ub"), None),
            identify("c", None, None),
        ];
        let reach = |i: usize| if i < 2 { vec![7] } else { vec![8] };
        assert_eq!(
            waves_with(&msgs, reach, WAVE_MAX),
            vec![vec![0, 2], vec![1]]
        );
    }

    #[test]
    fn a_waiting_message_holds_its_keys_so_what_depends_on_it_waits_too() {
        // 1 waits behind 0 (anonymous id a); 2 shares nothing with 0 but user u with 1: it
        // must not overtake 1.
        let msgs = [
            identify("a", None, None),
            identify("a", Some("u"), None),
            identify("b", Some("u"), None),
            identify("c", None, None),
        ];
        assert_eq!(waves(&msgs), vec![vec![0, 3], vec![1], vec![2]]);
    }

    #[test]
    fn an_alias_chain_is_applied_link_by_link() {
        // a -> b, then b -> c, then an identify of c: each depends on the one before.
        let msgs = [
            alias("a", "b"),
            alias("b", "c"),
            identify("v", Some("c"), None),
            identify("w", None, None),
        ];
        assert_eq!(waves(&msgs), vec![vec![0, 3], vec![1], vec![2]]);
        // An alias's previous id is also an anonymous id: an identify of that visitor waits.
        let msgs = [alias("anon-1", "u"), identify("anon-1", None, None)];
        assert_eq!(waves(&msgs), vec![vec![0], vec![1]]);
    }

    #[test]
    fn the_same_ids_in_two_tenants_are_independent() {
        let mut other = identify("a", Some("u"), None);
        other.tenant_id = 2;
        let msgs = [identify("a", Some("u"), None), other];
        assert_eq!(waves(&msgs), vec![vec![0, 1]]);
        // Nor do they fold together.
        let refs: Vec<&IdentityMessage> = msgs.iter().collect();
        assert_eq!(plan_all(&refs, None).0.len(), 2);
    }

    #[test]
    fn a_wave_is_bounded_and_the_rest_follows_in_order() {
        let msgs: Vec<IdentityMessage> = (0..5)
            .map(|i| identify(&format!("v{i}"), None, None))
            .collect();
        assert_eq!(
            waves_with(&msgs, |_| Vec::new(), 2),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }

    #[test]
    fn a_refused_message_is_listed_and_never_folded_across() {
        let mut sealed = identify("a", None, None);
        sealed.pii = Some(sluice_schema::messages::SealedPii {
            key_id: "k1".into(),
            email: Some(SealedField {
                ciphertext: "not base64!".into(),
                fingerprint: None,
            }),
            phone: None,
        });
        let msgs = [identify("a", None, None), sealed, identify("a", None, None)];
        let refs: Vec<&IdentityMessage> = msgs.iter().collect();
        let (plans, refused) = plan_all(&refs, None);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, 1);
        assert_eq!(refused[0].1.reason, "malformed");
        let covered: Vec<_> = plans.iter().map(Plan::covers).collect();
        assert_eq!(covered, vec![0..1, 2..3]);
    }

    #[test]
    fn a_wave_stops_before_the_first_lead_found_twice() {
        assert_eq!(distinct_leads([Some(1), None, Some(2), None]), 4);
        assert_eq!(distinct_leads([Some(1), Some(2), Some(1), Some(3)]), 2);
        assert_eq!(distinct_leads([None, None]), 2);
        assert_eq!(distinct_leads(std::iter::empty()), 0);
    }

    #[test]
    fn the_reach_lookup_asks_an_alias_by_both_of_its_ids() {
        let msgs = [
            identify("a", Some("ua"), Some("a@example.com")),
            alias("p", "u"),
        ];
        let refs: Vec<&IdentityMessage> = msgs.iter().collect();
        let k = keys();
        let (plans, _) = plan_all(&refs, Some(&k));
        let q = ReachQuery::new(&plans, &[0, 1]);
        assert_eq!(q.slots, vec![0, 1, 1]);
        assert_eq!(q.users, vec![Some("ua"), Some("u"), Some("p")]);
        assert_eq!(q.anons, vec![Some("a"), Some("p"), None]);
        assert!(q.emails[0].is_some() && q.emails[1].is_none() && q.emails[2].is_none());
        assert_eq!(q.tenants, vec![1, 1, 1]);
        // Rows back: per slot, a stray slot ignored.
        let reach = reach_of(2, [(1, 9), (0, 4), (1, 5), (7, 1), (-1, 1)]);
        assert_eq!(reach, vec![vec![4], vec![9, 5]]);
    }

    #[test]
    fn the_window_bounds_what_one_wave_looks_at() {
        let mut pending = Pending::new(WINDOW + 3);
        assert_eq!(pending.window().len(), WINDOW);
        let first: Vec<usize> = pending.window()[..WINDOW - 1].to_vec();
        pending.applied(&first);
        assert_eq!(
            pending.window(),
            &[WINDOW - 1, WINDOW, WINDOW + 1, WINDOW + 2]
        );
        assert!(!pending.is_empty());
    }
}
