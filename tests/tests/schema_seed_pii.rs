//! Seed data and PII against the real PostgreSQL: the seed makes what it promises, sealed PII
//! opens under rotated keys and matches by fingerprint, a `pg_dump --data-only` of a seeded
//! database holds no plaintext email or phone, and JSON survives a round trip through JSONB.

use std::collections::HashSet;
use std::process::Command;

use base64::Engine as _;
use chrono::{TimeZone, Utc};
use serde_json::{json, Value};
use sluice_schema::pii::{self, PiiKeys};
use sluice_schema::seed::{self, SeedConfig};
use sluice_tests::query_column;
use sluice_tests::TestDb;

fn keys(list: &[(&str, u8)], active: &str) -> PiiKeys {
    let spec: Vec<String> = list
        .iter()
        .map(|(id, byte)| {
            format!(
                "{id}={}",
                base64::engine::general_purpose::STANDARD.encode([*byte; 32])
            )
        })
        .collect();
    PiiKeys::from_env_strings(&spec.join(","), active).expect("keys")
}

#[tokio::test]
async fn seeded_database_has_its_data_and_no_plaintext_pii() {
    let db = TestDb::migrated().await.unwrap();
    let mut client = db.client().await.unwrap();
    let old = keys(&[("k1", 1)], "k1");
    let now = Utc.with_ymd_and_hms(2026, 11, 20, 12, 0, 0).unwrap();
    let report = seed::run(
        &mut client,
        &old,
        now,
        &SeedConfig {
            visitors: 60,
            ..SeedConfig::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(report.tenants.len(), 2);
    assert!(
        report.leads > 0 && report.events > report.sessions && report.sessions >= report.visitors
    );

    // Counts in the database match the report, and events span both months.
    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) as u64 }
    };
    assert_eq!(count("SELECT count(*) FROM event").await, report.events);
    assert_eq!(count("SELECT count(*) FROM visitor").await, report.visitors);
    assert_eq!(count("SELECT count(*) FROM lead").await, report.leads);
    assert_eq!(
        count("SELECT count(DISTINCT tenant_id) FROM event").await,
        2
    );
    let months: Vec<String> = query_column(
        &client,
        "SELECT DISTINCT split_part(tableoid::regclass::text, '_p', 1) FROM event ORDER BY 1",
    )
    .await
    .unwrap();
    assert_eq!(months, ["event_y2026m10", "event_y2026m11"]);
    assert_eq!(
        count("SELECT count(*) FROM event WHERE occurred_at > '2026-11-20 12:00:00+00'").await,
        0
    );
    // Visitor and session counters agree with the events.
    assert_eq!(
        count("SELECT count(*) FROM visitor v WHERE event_count <> (SELECT count(*) FROM event e WHERE e.tenant_id = v.tenant_id AND e.anonymous_id = v.anonymous_id)").await,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM session s WHERE event_count <> (SELECT count(*) FROM event e WHERE e.tenant_id = s.tenant_id AND e.session_id = s.session_id)").await,
        0
    );
    let statuses: Vec<String> = query_column(
        &client,
        "SELECT status FROM funnel_version ORDER BY version",
    )
    .await
    .unwrap();
    assert_eq!(statuses, ["published", "draft"]);
    assert_eq!(count("SELECT count(*) FROM funnel_publication").await, 1);
    // The demo key is the first one and verifies against its stored hash.
    let demo = &report.keys[0];
    let hash: Vec<u8> = client
        .query_one("SELECT hash FROM api_key WHERE id = $1", &[&demo.id])
        .await
        .unwrap()
        .get(0);
    assert!(sluice_schema::apikey::verify(&demo.plaintext, &hash));

    // Rotate: a new active key; everything sealed under k1 still opens, and fingerprints of
    // the opened values match the stored ones.
    let rotated = keys(&[("k1", 1), ("k2", 2)], "k2");
    let rows = client
        .query("SELECT pii_key_id, email_ciphertext, phone_ciphertext, email_fingerprint, phone_fingerprint FROM lead", &[])
        .await
        .unwrap();
    let mut plaintexts = HashSet::new();
    for row in &rows {
        let key_id: String = row.get(0);
        assert_eq!(key_id, "k1");
        let email = String::from_utf8(rotated.decrypt(&key_id, &row.get::<_, Vec<u8>>(1)).unwrap())
            .unwrap();
        let phone = String::from_utf8(rotated.decrypt(&key_id, &row.get::<_, Vec<u8>>(2)).unwrap())
            .unwrap();
        assert_eq!(
            rotated.fingerprint_email(&email).map(Vec::from),
            Some(row.get(3))
        );
        assert_eq!(
            rotated.fingerprint_phone(&phone).map(Vec::from),
            Some(row.get(4))
        );
        let normalized = pii::normalize_phone(&phone).unwrap();
        plaintexts.insert(email.clone());
        plaintexts.insert(email.split('@').next().unwrap().to_owned());
        plaintexts.insert(phone);
        plaintexts.insert(normalized.clone());
        plaintexts.insert(normalized[2..].to_owned()); // national digits, without +1
    }
    assert_eq!(rotated.encrypt(b"x").key_id, "k2");
    // A process without the old key says which key to add back.
    let err = keys(&[("k2", 2)], "k2")
        .decrypt("k1", &rows[0].get::<_, Vec<u8>>(1))
        .unwrap_err();
    assert!(
        err.to_string().contains("add that retired key back"),
        "{err}"
    );

    let out = Command::new("/usr/lib/postgresql/15/bin/pg_dump")
        .args(["--data-only", "--dbname", &db.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = String::from_utf8(out.stdout).unwrap();
    assert!(dump.len() > 100_000, "the dump holds the seeded rows");
    assert!(dump.contains("Signed Up"), "the dump is readable text");
    for p in &plaintexts {
        assert!(
            !dump.contains(p.as_str()),
            "plaintext PII {p:?} found in pg_dump"
        );
    }
    assert!(
        !dump.contains("@example.com"),
        "an email domain of a lead found in pg_dump"
    );
}

#[tokio::test]
async fn json_survives_a_round_trip_through_jsonb() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    let at = Utc.with_ymd_and_hms(2026, 2, 3, 4, 5, 6).unwrap();
    sluice_schema::partitions::ensure_month(&client, at.date_naive(), 2)
        .await
        .unwrap();
    let properties = json!({
        "unicode": "grüße 🚀 \u{0001} \"quoted\" back\\slash",
        "nested": {"list": [1, 2.5, -3e-7, null, true, {"deep": []}], "empty": {}},
        "big": 9007199254740993_u64,
        "": "empty key",
        "revenue": 19.99,
    });
    let context = json!({"page": {"url": "https://example.com/?q=a&b=ç"}, "ip": "203.0.113.9"});
    client
        .execute(
            "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at, properties, context)
             VALUES (1, $1, gen_random_uuid(), 1, 'track', 'm-1', $1, $2, $3)",
            &[&at, &properties, &context],
        )
        .await
        .unwrap();
    let row = client
        .query_one(
            "SELECT properties, context, properties->'nested'->'list'->>1 FROM event",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Value>(0), properties);
    assert_eq!(row.get::<_, Value>(1), context);
    assert_eq!(row.get::<_, String>(2), "2.5");
}
