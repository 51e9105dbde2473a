//! Unit tests of the wave planner: the orderings `tests/tests/writer_identity.rs` checks
//! against PostgreSQL, and more, without a database.

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
