//! No PII and no key material in the logs or in plaintext in the database.
//!
//! A collector and a writer run in this process under a tracing subscriber that records every
//! line at TRACE level into a buffer. An identify flow (email and phone in traits), the same
//! person's track call carrying `context.traits` as analytics.js sends it, and requests with an
//! unknown, a malformed and a revoked key go through; once the lead is stored, the captured logs
//! and every row of every table of the database are searched for the email, the phone, the
//! write keys and the PII key.
//!
//! `context.traits`, which analytics.js attaches to every track and page call, would carry the
//! same email into `event.context`: the second test proves the collector strips it.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use sluice_tests::ingest::{account, Collector};
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

/// Forms of the PII a careless log line or column could hold.
fn pii_needles() -> Vec<String> {
    vec![
        EMAIL.to_owned(),
        EMAIL.to_ascii_lowercase(),
        "ada.secret-person".to_owned(),
        PHONE.to_owned(),
        "4155550199".to_owned(),
        "555-0199".to_owned(),
    ]
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
    let config = Collector::config(&db);
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await.unwrap();
    let pii_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let mut wconfig = sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &prefix,
        &unique_name("g"),
    );
    wconfig.pii_keys = format!("k1={pii_key}");
    wconfig.pii_active_key = "k1".into();
    let writer = sluice_tests::writer::RunningWriter::start(wconfig);

    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    let identify = json!({"anonymousId": "anon-pii", "userId": "user-pii", "messageId": "m-id",
        "traits": {"email": EMAIL, "phone": PHONE, "plan": "pro"}});
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
        let r = http
            .post(collector.url("/v1/identify"))
            .bearer_auth(bad)
            .json(&identify)
            .send()
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
    let r = http
        .post(collector.url("/v1/identify"))
        .bearer_auth(&other.key.plaintext)
        .json(&identify)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    wait_for_count(
        &client,
        "SELECT count(*) FROM lead WHERE email_ciphertext IS NOT NULL AND phone_ciphertext IS NOT NULL",
        1,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();

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
    wconfig.pii_keys = format!(
        "k1={}",
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    );
    wconfig.pii_active_key = "k1".into();
    let writer = sluice_tests::writer::RunningWriter::start(wconfig);
    // As analytics.js sends a track call after identify: the traits ride along in context.
    let track = json!({"event": "Viewed", "anonymousId": "anon-pii", "userId": "user-pii",
        "messageId": "m-tr", "context": {"traits": {"email": EMAIL, "phone": PHONE}}});
    let r = reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(&acct.key.plaintext)
        .json(&track)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let client = db.client().await.unwrap();
    wait_for_count(
        &client,
        "SELECT count(*) FROM event",
        1,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();
    let leaks = plaintext_in_tables(&client, &pii_needles()).await;
    assert!(
        leaks.is_empty(),
        "plaintext PII in the database:\n{}",
        leaks.join("\n")
    );
}
