//! No PII and no key material in the logs, on any topic, or in plaintext in the database.
//!
//! A collector and a writer run in this process under a tracing subscriber that records every
//! line at TRACE level into a buffer. An identify flow (email, phone and name in traits, name
//! configured as personal too), the same person's track call carrying `context.traits` as
//! analytics.js sends it, and requests with an unknown, a malformed and a revoked key go
//! through; once the lead is stored, it decrypts to the email, and the captured logs, every
//! message of every topic (data and DLQ) and every row of every table are searched for the
//! email, the phone, the name, the write keys and the PII key. Then the keys rotate through
//! the whole pipeline: a collector with a new active key seals a phone change, the writer
//! (which knows both keys) re-seals the kept email under it, and both decrypt.
//!
//! `context.traits`, which analytics.js attaches to every track and page call, would carry the
//! same email into `event.context`: the second test proves the collector strips it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use sluice_tests::ingest::{account, post_json, Collector};
use sluice_tests::writer::wait_for_count;
use sluice_tests::{unique_name, Stack, TestDb};
use tracing_subscriber::fmt::MakeWriter;

/// The log buffer every tracing line of this test binary goes to.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }
}

const EMAIL: &str = "Ada.Secret-Person@Example.COM";
const PHONE: &str = "+1 (415) 555-0199";
const NAME: &str = "Ada Secretperson";
const NEW_PHONE: &str = "+1 (415) 555-0142";

/// Forms of the PII a careless log line, message or column could hold.
fn pii_needles() -> Vec<String> {
    vec![
        EMAIL.to_owned(),
        EMAIL.to_ascii_lowercase(),
        "ada.secret-person".to_owned(),
        PHONE.to_owned(),
        "4155550199".to_owned(),
        "555-0199".to_owned(),
        NAME.to_owned(),
        "secretperson".to_owned(),
        NEW_PHONE.to_owned(),
        "4155550142".to_owned(),
    ]
}

/// Every record (key, value and headers, as text) on `topics` from their start, read until
/// nothing more arrives for 3 s.
async fn every_record(topics: &[&str]) -> Vec<String> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = sluice_tests::kafka_config()
        .set("group.id", unique_name("scan"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test setup");
    consumer.subscribe(topics).expect("test setup");
    let mut out = Vec::new();
    while let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await {
        let mut text = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        text.push(' ');
        text.push_str(&String::from_utf8_lossy(msg.payload().unwrap_or_default()));
        if let Some(headers) = msg.headers() {
            for h in headers.iter() {
                text.push_str(&format!(
                    " {}={}",
                    h.key,
                    String::from_utf8_lossy(h.value.unwrap_or_default())
                ));
            }
        }
        out.push(format!("{}: {text}", msg.topic()));
    }
    out
}

/// The lead of `user`: (pii key id, email, phone), opened with `keys`.
async fn open_lead(
    client: &tokio_postgres::Client,
    keys: &sluice_schema::pii::PiiKeys,
    user: &str,
) -> (String, String, String) {
    let row = client
        .query_one(
            "SELECT pii_key_id, email_ciphertext, phone_ciphertext FROM lead WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("the lead");
    let key_id: String = row.get(0);
    let open = |ct: Vec<u8>| {
        String::from_utf8(keys.decrypt(&key_id, &ct).expect("decrypts")).expect("UTF-8")
    };
    let email = open(row.get(1));
    let phone = open(row.get(2));
    (key_id, email, phone)
}

/// Waits (up to 60 s) until `sql`, a count, finds exactly one row.
async fn wait_for_one(client: &tokio_postgres::Client, sql: &str) {
    wait_for_count(client, sql, 1, Duration::from_secs(60))
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err:#}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identify_flow_leaves_no_pii_or_key_in_logs_or_plaintext_columns() {
    let logs = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .init();

    let db = TestDb::migrated().await.unwrap();
    let acct = account(&db, "pii").await.unwrap();
    let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let (pii_key, new_key) = (b64(rand::random()), b64(rand::random()));
    let mut config = Collector::config(&db);
    config.pii_args.pii_keys = format!("k1={pii_key}");
    config.pii_args.pii_active_key = "k1".into();
    config.pii_traits = vec!["email".into(), "phone".into(), "name".into()];
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config.clone()).await.unwrap();
    let mut wconfig = sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &prefix,
        &unique_name("g"),
    );
    // The writer already knows the next key (rotation step 1), and still seals with k1.
    wconfig.pii_args.pii_keys = format!("k1={pii_key},k2={new_key}");
    wconfig.pii_args.pii_active_key = "k1".into();
    let writer = sluice_tests::writer::RunningWriter::start(wconfig);
    let keys =
        sluice_schema::pii::PiiKeys::from_env_strings(&format!("k1={pii_key},k2={new_key}"), "k1")
            .unwrap();

    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    let identify = json!({"anonymousId": "anon-pii", "userId": "user-pii", "messageId": "m-id",
        "traits": {"email": EMAIL, "phone": PHONE, "name": NAME, "plan": "pro"},
        "context": {"traits": {"email": EMAIL}}});
    let r = http
        .post(collector.url("/v1/identify"))
        .basic_auth(&key, Some(""))
        .json(&identify)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // Refused keys: well-formed unknown, malformed, revoked (after the cache forgets it).
    let unknown = sluice_schema::apikey::generate().plaintext;
    let malformed = format!("{key}-tampered");
    for bad in [&unknown, &malformed] {
        let r = post_json(&http, collector.url("/v1/identify"), bad, &identify)
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            !r.text().await.unwrap().contains(bad.as_str()),
            "the answer echoes the key"
        );
    }
    let other = account(&db, "pii-revoked").await.unwrap();
    let client = db.client().await.unwrap();
    sluice_schema::control::revoke_key(&client, other.key.id)
        .await
        .unwrap();
    let r = post_json(
        &http,
        collector.url("/v1/identify"),
        &other.key.plaintext,
        &identify,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);

    wait_for_one(&client, "SELECT count(*) FROM lead WHERE email_ciphertext IS NOT NULL AND phone_ciphertext IS NOT NULL").await;
    // The collector sealed; the writer stored what it got: the lead decrypts to the email.
    assert_eq!(
        open_lead(&client, &keys, "user-pii").await,
        ("k1".to_owned(), EMAIL.to_owned(), PHONE.to_owned())
    );
    let traits: serde_json::Value = client
        .query_one("SELECT traits FROM lead WHERE user_id = 'user-pii'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(traits["plan"], "pro");
    assert_eq!(
        keys.open_envelope(&traits["name"]).unwrap(),
        NAME,
        "name is sealed in place"
    );
    collector.stop().await.unwrap();

    // Rotation step 2: collectors seal with k2. A phone change arrives sealed under k2; the
    // email the lead keeps is re-sealed by the writer under k2, so one key id covers both.
    let mut rotated = config;
    rotated.pii_args.pii_keys = format!("k1={pii_key},k2={new_key}");
    rotated.pii_args.pii_active_key = "k2".into();
    let collector = Collector::start(rotated).await.unwrap();
    let change =
        json!({"userId": "user-pii", "messageId": "m-id-2", "traits": {"phone": NEW_PHONE}});
    let r = http
        .post(collector.url("/v1/identify"))
        .basic_auth(&key, Some(""))
        .json(&change)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    wait_for_one(&client, "SELECT count(*) FROM lead WHERE pii_key_id = 'k2'").await;
    assert_eq!(
        open_lead(&client, &keys, "user-pii").await,
        ("k2".to_owned(), EMAIL.to_owned(), NEW_PHONE.to_owned())
    );
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();

    // Every topic: what the collector produced and what the writer dead-lettered.
    let topics = sluice_schema::topics::Topics::with_prefix(&prefix);
    let records = every_record(&topics.all()).await;
    assert!(
        records.iter().any(|r| r.contains("m-id-2")),
        "the scan read the identity topic: {records:?}"
    );
    for needle in pii_needles() {
        let needle = needle.to_ascii_lowercase();
        let found: Vec<&String> = records
            .iter()
            .filter(|r| r.to_ascii_lowercase().contains(&needle))
            .collect();
        assert!(found.is_empty(), "plaintext PII on a topic: {found:?}");
    }

    // Logs.
    let text = logs.text();
    assert!(
        text.lines().count() > 5,
        "the subscriber captured the services' logs:\n{text}"
    );
    let mut secrets = pii_needles();
    secrets.extend([
        key.clone(),
        key[sluice_schema::apikey::KEY_MARKER.len() + sluice_schema::apikey::PREFIX_LEN..]
            .to_owned(),
        unknown.clone(),
        malformed.clone(),
        other.key.plaintext.clone(),
        pii_key.clone(),
        new_key.clone(),
    ]);
    let lower = text.to_ascii_lowercase();
    for secret in &secrets {
        assert!(
            !lower.contains(&secret.to_ascii_lowercase()),
            "a secret ({} chars) is in the logs:\n{}",
            secret.len(),
            text.lines()
                .filter(|l| l
                    .to_ascii_lowercase()
                    .contains(&secret.to_ascii_lowercase()))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    let leaks = plaintext_in_tables(&client, &secrets).await;
    assert!(
        leaks.is_empty(),
        "plaintext secrets in the database:\n{}",
        leaks.join("\n")
    );
}

/// Every row of every table of the database as text, searched for `secrets`; the findings.
async fn plaintext_in_tables(client: &tokio_postgres::Client, secrets: &[String]) -> Vec<String> {
    let tables: Vec<String> = client
        .query(
            "SELECT quote_ident(relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r'",
            &[],
        )
        .await
        .expect("test setup")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() > 8, "{tables:?}");
    let mut leaks = Vec::new();
    for table in &tables {
        // Table names come from pg_class through quote_ident, not from input.
        let rows = client
            .query(&format!("SELECT t::text FROM {table} t"), &[])
            .await
            .expect("test setup");
        for row in rows {
            let text: String = row.get(0);
            let lower = text.to_ascii_lowercase();
            for secret in secrets {
                if lower.contains(&secret.to_ascii_lowercase()) {
                    leaks.push(format!(
                        "{table}: a {}-char secret in {text:.200}",
                        secret.len()
                    ));
                }
            }
        }
    }
    leaks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_in_a_track_calls_context_traits_is_not_stored_in_plaintext() {
    let db = TestDb::migrated().await.unwrap();
    let acct = account(&db, "ctx").await.unwrap();
    let config = Collector::config(&db);
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await.unwrap();
    let mut wconfig = sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &prefix,
        &unique_name("g"),
    );
    wconfig.pii_args.pii_keys = format!(
        "k1={}",
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    );
    wconfig.pii_args.pii_active_key = "k1".into();
    let writer = sluice_tests::writer::RunningWriter::start(wconfig);
    // As analytics.js sends a track call after identify: the traits ride along in context.
    // Its clock is an hour fast: `timestamp` and `sentAt` are stored as sent, `occurred_at`
    // corrected by the send delay.
    let sent_at = chrono::Utc::now() + chrono::Duration::hours(1);
    let timestamp = sent_at - chrono::Duration::seconds(30);
    let track = json!({"event": "Viewed", "anonymousId": "anon-pii", "userId": "user-pii",
        "messageId": "m-tr", "context": {"traits": {"email": EMAIL, "phone": PHONE}},
        "timestamp": timestamp.to_rfc3339(), "sentAt": sent_at.to_rfc3339()});
    let r = reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(&acct.key.plaintext)
        .json(&track)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let client = db.client().await.unwrap();
    wait_for_one(&client, "SELECT count(*) FROM event").await;
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();
    let row = client
        .query_one(
            "SELECT sent_at, original_timestamp, occurred_at, received_at FROM event",
            &[],
        )
        .await
        .unwrap();
    let at = |i: usize| row.get::<_, chrono::DateTime<chrono::Utc>>(i);
    // Microseconds in PostgreSQL, nanoseconds here.
    let close = |a: chrono::DateTime<chrono::Utc>, b: chrono::DateTime<chrono::Utc>| {
        (a - b).num_milliseconds().abs() < 1
    };
    assert!(close(at(0), sent_at), "sent_at {} vs {sent_at}", at(0));
    assert!(
        close(at(1), timestamp),
        "original_timestamp {} vs {timestamp}",
        at(1)
    );
    assert!(
        close(at(2), at(3) - chrono::Duration::seconds(30)),
        "occurred_at {} is received_at {} less the 30 s send delay",
        at(2),
        at(3)
    );
    let leaks = plaintext_in_tables(&client, &pii_needles()).await;
    assert!(
        leaks.is_empty(),
        "plaintext PII in the database:\n{}",
        leaks.join("\n")
    );
}
