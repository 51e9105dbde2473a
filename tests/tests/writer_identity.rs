//! Identify and alias calls become leads with sealed PII, matched by fingerprint, and links
//! from anonymous ids to them. Real Kafka, real PostgreSQL.

use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use serde_json::json;
use sluice_schema::messages::{IdentityKind, IdentityMessage, JsonObject, VERSION};
use sluice_schema::pii::PiiKeys;
use sluice_tests::query_pairs;
use sluice_tests::writer::{wait_for_count, RunningWriter, WriterEnv};

const KEYS: &str = "k1=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const WAIT: Duration = Duration::from_secs(60);

/// `env`'s writer config with [`KEYS`], `k1` active.
fn keyed_config(env: &WriterEnv) -> sluice_writer::Config {
    let mut config = env.config();
    config.pii_args.pii_keys = KEYS.into();
    config.pii_args.pii_active_key = "k1".into();
    config
}

/// A writer environment of one lane, its [`keyed_config`], the [`keys`] and its identity
/// topic: the opening of the tests that seal.
async fn keyed_env() -> Result<(WriterEnv, sluice_writer::Config, PiiKeys, String)> {
    let env = WriterEnv::new(1).await?;
    let config = keyed_config(&env);
    let topic = env.topics.identity.clone();
    Ok((env, config, keys()?, topic))
}

/// [`KEYS`] as keys, `k1` active: what [`keyed_config`]'s writer seals with.
fn keys() -> Result<PiiKeys> {
    Ok(PiiKeys::from_env_strings(KEYS, "k1")?)
}

fn identify(anon: &str, user: Option<&str>, traits: serde_json::Value) -> IdentityMessage {
    let now = Utc::now();
    IdentityMessage {
        v: VERSION,
        tenant_id: 4,
        workspace_id: 40,
        kind: IdentityKind::Identify,
        message_id: format!("id-{anon}"),
        anonymous_id: Some(anon.into()),
        user_id: user.map(str::to_owned),
        previous_id: None,
        traits: traits.as_object().cloned().unwrap_or_default(),
        context: JsonObject::new(),
        occurred_at: now,
        received_at: now,
        pii: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_creates_an_encrypted_lead_and_links_matched_by_fingerprint() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let config = keyed_config(&env);
    let writer = RunningWriter::start(config);
    let keys = keys()?;
    let db = env.db.client().await?;
    let topic = env.topics.identity.clone();

    let first = identify(
        "a1",
        Some("u1"),
        json!({"email": "Ada@Example.com", "phone": "+44 20 7946 0000", "name": "Ada"}),
    );
    env.produce_json(&topic, "4/a1", &first).await?;
    wait_for_count(&db, "SELECT count(*) FROM identity_link", 1, WAIT).await?;
    let row = db
        .query_one(
            "SELECT id, user_id, email_ciphertext, pii_key_id, email_fingerprint, traits FROM lead WHERE tenant_id = 4",
            &[],
        )
        .await?;
    let lead: i64 = row.get(0);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("u1"));
    let sealed: Vec<u8> = row.get(2);
    let key_id: String = row.get(3);
    assert_eq!(key_id, "k1");
    assert!(
        !sealed.windows(3).any(|w| w == b"Ada"),
        "email is not stored in clear"
    );
    assert_eq!(keys.decrypt(&key_id, &sealed)?, b"Ada@Example.com");
    let fp: Vec<u8> = row.get(4);
    assert_eq!(
        Some(fp.as_slice()),
        keys.fingerprint_email("ada@example.com")
            .as_ref()
            .map(|f| &f[..])
    );
    let traits: serde_json::Value = row.get(5);
    assert_eq!(
        traits,
        json!({"name": "Ada"}),
        "email and phone leave the traits"
    );

    // Another device, no user id, same email: the same lead, a second link.
    env.produce_json(
        &topic,
        "4/a2",
        &identify("a2", None, json!({"email": "ada@example.com"})),
    )
    .await?;
    // An alias of an old id to the user.
    let mut alias = identify("x", Some("u1"), json!({}));
    alias.kind = IdentityKind::Alias;
    alias.anonymous_id = None;
    alias.previous_id = Some("old-device".into());
    env.produce_json(&topic, "4/u1", &alias).await?;
    wait_for_count(&db, "SELECT count(*) FROM identity_link", 3, WAIT).await?;
    let leads: i64 = db.query_one("SELECT count(*) FROM lead", &[]).await?.get(0);
    assert_eq!(leads, 1);
    let links: Vec<(String, i64, String)> = db
        .query(
            "SELECT anonymous_id, lead_id, kind FROM identity_link ORDER BY anonymous_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        links,
        [
            ("a1".to_owned(), lead, "identify".to_owned()),
            ("a2".to_owned(), lead, "identify".to_owned()),
            ("old-device".to_owned(), lead, "alias".to_owned()),
        ]
    );
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_with_pii_but_no_keys_is_dead_lettered_not_stored_in_clear() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let writer = RunningWriter::start(env.config());
    let db = env.db.client().await?;
    let topic = env.topics.identity.clone();
    env.produce_json(
        &topic,
        "4/a9",
        &identify("a9", Some("u9"), json!({"email": "x@example.com"})),
    )
    .await?;
    env.produce_json(
        &topic,
        "4/a8",
        &identify("a8", Some("u8"), json!({"plan": "pro"})),
    )
    .await?;
    wait_for_count(&db, "SELECT count(*) FROM lead", 1, WAIT).await?;
    let user: Option<String> = db.query_one("SELECT user_id FROM lead", &[]).await?.get(0);
    assert_eq!(user.as_deref(), Some("u8"));
    let dead = env.read_dlq(1, WAIT).await?;
    assert_eq!(dead[0].reason, "pii_key_missing");
    assert_eq!(
        (dead[0].topic.as_str(), dead[0].offset),
        (topic.as_str(), 0)
    );
    assert!(dead[0].detail.contains("SLUICE_PII_KEYS"));
    writer.stop().await
}

/// Many dependent identity messages stored in one go: the writer applies them in waves of
/// independent messages and folds runs of one visitor's identifies, and the outcome must be the
/// one of applying them one by one (same leads, traits merged in order, every link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_dependent_identities_ends_as_if_applied_in_order() -> Result<()> {
    let (env, config, keys, topic) = keyed_env().await?;
    const USERS: usize = 40;
    let mut msgs: Vec<IdentityMessage> = Vec::new();
    // Runs of one visitor's identifies (folded).
    for i in 0..USERS {
        msgs.push(identify(
            &format!("a{i}"),
            Some(&format!("u{i}")),
            json!({"n": 1, "name": format!("N{i}")}),
        ));
        msgs.push(identify(
            &format!("a{i}"),
            Some(&format!("u{i}")),
            json!({"n": 2}),
        ));
    }
    // Each step for every user in turn (waves of independent messages).
    for i in 0..USERS {
        msgs.push(identify(
            &format!("a{i}"),
            Some(&format!("u{i}")),
            json!({"email": format!("user{i}@example.com")}),
        ));
    }
    for i in 0..USERS {
        // Another device, found by the email fingerprint only.
        msgs.push(identify(
            &format!("b{i}"),
            None,
            json!({"email": format!("USER{i}@example.com")}),
        ));
    }
    for i in 0..USERS {
        let mut alias = identify("-", Some(&format!("u{i}")), json!({}));
        alias.kind = IdentityKind::Alias;
        alias.anonymous_id = None;
        alias.previous_id = Some(format!("p{i}"));
        msgs.push(alias);
    }
    for i in 0..USERS {
        // Found through the alias's link only.
        msgs.push(identify(&format!("p{i}"), None, json!({"last": "yes"})));
    }
    for i in 0..USERS {
        // Two messages with no key in common that find the same lead (user id, and a linked
        // device): the later one's traits must win.
        msgs.push(identify(
            &format!("a{i}"),
            Some(&format!("u{i}")),
            json!({"k": "first"}),
        ));
        msgs.push(identify(&format!("b{i}"), None, json!({"k": "second"})));
    }
    msgs.push(identify("end", Some("sentinel"), json!({})));
    for m in &msgs {
        env.produce_json(&topic, "4/all", m).await?;
    }
    // Started on the whole backlog, so it is stored in as few batches as possible.
    let writer = RunningWriter::start(config);
    let db = env.db.client().await?;
    wait_for_count(
        &db,
        "SELECT count(*) FROM lead WHERE user_id = 'sentinel'",
        1,
        WAIT,
    )
    .await?;

    let leads = db
        .query(
            "SELECT id, user_id, traits, email_ciphertext, pii_key_id FROM lead \
             WHERE user_id <> 'sentinel' ORDER BY user_id",
            &[],
        )
        .await?;
    assert_eq!(leads.len(), USERS, "one lead per user, none created twice");
    for row in &leads {
        let user: String = row.get(1);
        let i: usize = user.trim_start_matches('u').parse()?;
        let traits: serde_json::Value = row.get(2);
        assert_eq!(
            traits,
            json!({"n": 2, "name": format!("N{i}"), "last": "yes", "k": "second"}),
            "traits of {user} merged in message order"
        );
        let sealed: Vec<u8> = row.get(3);
        let key_id: String = row.get(4);
        // The later identify's email (same fingerprint, other spelling) was sealed last.
        assert_eq!(
            keys.decrypt(&key_id, &sealed)?,
            format!("USER{i}@example.com").into_bytes()
        );
        let lead: i64 = row.get(0);
        let links: Vec<(String, String)> = query_pairs(
            &db,
            "SELECT anonymous_id, kind FROM identity_link WHERE lead_id = $1 ORDER BY anonymous_id",
            &[&lead],
        )
        .await?;
        assert_eq!(
            links,
            [
                (format!("a{i}"), "identify".to_owned()),
                (format!("b{i}"), "identify".to_owned()),
                (format!("p{i}"), "alias".to_owned()),
            ],
            "links of {user}"
        );
    }
    writer.stop().await
}

/// A lead inserted by another transaction while the writer was looking for it (another lane or
/// another writer identifying the same user at that moment) is not bad data: the writer's
/// insert fails on the unique user id, the batch is retried, finds that lead and updates it.
/// Nothing is dead-lettered and no second lead appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lead_inserted_by_a_concurrent_transaction_is_updated_not_dead_lettered() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let writer = RunningWriter::start(env.config());
    let db = env.db.client().await?;
    let mut other = env.db.client().await?;
    let racing = other.transaction().await?;
    racing
        .execute(
            "INSERT INTO lead (tenant_id, workspace_id, user_id, traits) \
             VALUES (4, 40, 'racer', '{\"from\": \"other\"}')",
            &[],
        )
        .await?;
    env.produce_json(
        &env.topics.identity,
        "4/r1",
        &identify("r1", Some("racer"), json!({"plan": "pro"})),
    )
    .await?;
    // The writer found no lead and its insert now waits on the uncommitted one.
    wait_for_count(
        &db,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%INSERT INTO lead (%'",
        1,
        WAIT,
    )
    .await?;
    racing.commit().await?;

    wait_for_count(&db, "SELECT count(*) FROM identity_link", 1, WAIT).await?;
    let rows = db
        .query("SELECT traits FROM lead WHERE tenant_id = 4", &[])
        .await?;
    assert_eq!(rows.len(), 1, "one lead for the user id");
    let traits: serde_json::Value = rows[0].get(0);
    assert_eq!(traits, json!({"from": "other", "plan": "pro"}));
    let none = env.read_dlq(1, Duration::from_secs(5)).await;
    assert!(
        none.as_ref()
            .is_err_and(|e| e.to_string().starts_with("0 dead letters")),
        "nothing dead-lettered: {none:?}"
    );
    writer.stop().await
}

/// Waves take messages out of order when nothing links them, so what links them must hold
/// them back: a message that reaches an existing lead another message also reaches (through
/// different keys), and a message that shares a key only with a message that is itself
/// waiting. All must end as if applied in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_overtake_waiting_ones_only_when_nothing_links_them() -> Result<()> {
    let (env, config, keys, topic) = keyed_env().await?;
    let db = env.db.client().await?;

    // Leads stored earlier: `ux` with an email and a phone, `wz` with neither.
    let writer = RunningWriter::start(config.clone());
    env.produce_json(
        &topic,
        "4/old",
        &identify(
            "old",
            Some("ux"),
            json!({"email": "shared@example.com", "phone": "+1 555 0100"}),
        ),
    )
    .await?;
    env.produce_json(&topic, "4/oldw", &identify("oldw", Some("wz"), json!({})))
        .await?;
    wait_for_count(&db, "SELECT count(*) FROM identity_link", 2, WAIT).await?;
    writer.stop().await?;

    let filler = |i: usize| identify(&format!("f{i}"), Some(&format!("fu{i}")), json!({}));
    let mut msgs = vec![
        // Reaches the stored lead by its email only...
        identify(
            "b1",
            None,
            json!({"email": "shared@example.com", "k": "first"}),
        ),
        // ...a visitor's first identify...
        identify("a", Some("u"), json!({"n": 1})),
    ];
    msgs.extend((0..10).map(filler));
    // ...this one reaches the stored lead by its user id only: it must come after `b1`.
    msgs.push(identify("c1", Some("ux"), json!({"k": "second"})));
    // The visitor again, now with a phone: it waits behind its first identify...
    msgs.push(identify(
        "a",
        Some("u"),
        json!({"phone": "+44 20 7946 0001"}),
    ));
    msgs.extend((10..20).map(filler));
    // ...and this device shares only that phone: it must find the visitor's lead through it,
    // not make a lead of its own.
    msgs.push(identify("d", None, json!({"phone": "+44 20 7946 0001"})));
    // A new device; later it identifies with `ux`'s email and a new phone, which moves `ux`'s
    // phone to the new one (it waits behind its first identify)...
    msgs.push(identify("n", None, json!({"plan": "x"})));
    msgs.extend((20..25).map(filler));
    msgs.push(identify(
        "n",
        None,
        json!({"email": "shared@example.com", "phone": "+1 555 0199"}),
    ));
    // ...which frees the old phone for `wz`: this one shares no key with the waiting one, but
    // reaches `ux` through the old phone, so it must wait too.
    msgs.push(identify("w", Some("wz"), json!({"phone": "+1 555 0100"})));
    msgs.push(identify("end", Some("sentinel"), json!({})));
    for m in &msgs {
        env.produce_json(&topic, "4/all", m).await?;
    }
    let writer = RunningWriter::start(config);
    wait_for_count(
        &db,
        "SELECT count(*) FROM lead WHERE user_id = 'sentinel'",
        1,
        WAIT,
    )
    .await?;

    let traits: serde_json::Value = db
        .query_one("SELECT traits FROM lead WHERE user_id = 'ux'", &[])
        .await?
        .get(0);
    assert_eq!(traits["k"], "second", "the later message wins: {traits}");
    let visitor = db
        .query_one(
            "SELECT id, phone_fingerprint FROM lead WHERE user_id = 'u'",
            &[],
        )
        .await?;
    let (lead, phone): (i64, Option<Vec<u8>>) = (visitor.get(0), visitor.get(1));
    assert_eq!(
        phone.as_deref(),
        keys.fingerprint_phone("+44 20 7946 0001")
            .as_ref()
            .map(|f| &f[..])
    );
    let linked: Vec<i64> = db
        .query(
            "SELECT lead_id FROM identity_link WHERE anonymous_id = 'd'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(linked, [lead], "`d` is linked to the visitor's lead");
    let phone_of = |user: &'static str| {
        let db = &db;
        async move {
            let row = db
                .query_one(
                    "SELECT phone_fingerprint FROM lead WHERE user_id = $1",
                    &[&user],
                )
                .await?;
            anyhow::Ok(row.get::<_, Option<Vec<u8>>>(0))
        }
    };
    let fp = |phone: &str| keys.fingerprint_phone(phone).map(|f| f.to_vec());
    assert_eq!(
        phone_of("ux").await?,
        fp("+1 555 0199"),
        "ux has the new phone"
    );
    assert_eq!(
        phone_of("wz").await?,
        fp("+1 555 0100"),
        "wz has ux's old one"
    );
    let leads: i64 = db.query_one("SELECT count(*) FROM lead", &[]).await?.get(0);
    assert_eq!(
        leads,
        2 + 1 + 1 + 25 + 1,
        "ux, wz, u, the new device, the fillers, the sentinel"
    );
    writer.stop().await
}

/// Item 5 of issue 13: a lead whose old key the writer lacks is not relabelled. The lead is
/// stored under k1; then the collectors rotate to k2 and a phone change arrives sealed under
/// k2 (message version 2) at a writer that has lost k1. Storing it would label the kept email
/// `k2` although it is sealed under k1, and it could never be opened again: the message goes
/// to the DLQ with the reason and the lead stays as it was. A writer with both keys takes the
/// replayed message and re-seals the email under k2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reseal_without_the_old_key_is_refused_not_orphaned() -> Result<()> {
    const K2: &str = "k2=AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
    let env = WriterEnv::new(1).await?;
    let db = env.db.client().await?;
    let topic = env.topics.identity.clone();
    let both = PiiKeys::from_env_strings(&format!("{KEYS},{K2}"), "k2")?;
    let lead =
        "SELECT pii_key_id, email_ciphertext, phone_ciphertext FROM lead WHERE user_id = 'u5'";

    let config = keyed_config(&env);
    let writer = RunningWriter::start(config);
    let first = identify(
        "a5",
        Some("u5"),
        json!({"email": "ada@example.com", "phone": "+44 20 7946 0001"}),
    );
    env.produce_json(&topic, "4/a5", &first).await?;
    wait_for_count(
        &db,
        "SELECT count(*) FROM lead WHERE pii_key_id = 'k1'",
        1,
        WAIT,
    )
    .await?;
    writer.stop().await?;
    let before = db.query_one(lead, &[]).await?;

    // The collector's phone change, sealed under k2 as `sluice-ingest` seals it.
    let mut change = identify("a5", Some("u5"), json!({"phone": "+44 20 7946 0002"}));
    change.message_id = "id-a5-phone".into();
    change.v = sluice_schema::messages::IDENTITY_VERSION;
    change.pii = both.seal_identity_traits(&mut change.traits, &[]);
    assert_eq!(change.pii.as_ref().map(|p| p.key_id.as_str()), Some("k2"));

    // A writer that lost k1 (only k2 listed).
    let mut config = env.config();
    config.pii_args.pii_keys = K2.into();
    config.pii_args.pii_active_key = "k2".into();
    let writer = RunningWriter::start(config);
    env.produce_json(&topic, "4/a5", &change).await?;
    let dead = env.read_dlq(1, WAIT).await?;
    writer.stop().await?;
    assert_eq!(dead[0].reason, "pii_key_missing");
    assert!(dead[0].detail.contains("\"k1\""), "{}", dead[0].detail);
    assert_eq!(
        (dead[0].topic.as_str(), dead[0].offset),
        (topic.as_str(), 1)
    );
    let after = db.query_one(lead, &[]).await?;
    assert_eq!(after.get::<_, String>(0), "k1", "the lead keeps its key id");
    assert_eq!(
        after.get::<_, Vec<u8>>(1),
        before.get::<_, Vec<u8>>(1),
        "the email is untouched"
    );
    assert_eq!(after.get::<_, Vec<u8>>(2), before.get::<_, Vec<u8>>(2));

    // Both keys back: the replayed message is stored, the email re-sealed under k2.
    let mut config = env.config();
    config.pii_args.pii_keys = format!("{KEYS},{K2}");
    config.pii_args.pii_active_key = "k2".into();
    let writer = RunningWriter::start(config);
    env.produce_json(&topic, "4/a5", &change).await?;
    wait_for_count(
        &db,
        "SELECT count(*) FROM lead WHERE pii_key_id = 'k2'",
        1,
        WAIT,
    )
    .await?;
    writer.stop().await?;
    let row = db.query_one(lead, &[]).await?;
    let key: String = row.get(0);
    assert_eq!(
        both.decrypt(&key, &row.get::<_, Vec<u8>>(1))?,
        b"ada@example.com"
    );
    assert_eq!(
        both.decrypt(&key, &row.get::<_, Vec<u8>>(2))?,
        b"+44 20 7946 0002"
    );
    Ok(())
}
