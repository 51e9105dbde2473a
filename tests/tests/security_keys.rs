//! Write keys reach only their own workspace, and a revoked or expired key stops working
//! within the key cache's TTL (measured here with a 1.5 s TTL).
//!
//! Key comparison is constant-time by construction (`sluice_schema::apikey::verify` compares
//! SHA-256 digests with `subtle::ConstantTimeEq`), which no test here can observe: a test that
//! grepped the source for `ct_eq` was dropped, since it proved nothing about the running code.
//! `apikey`'s unit tests check that only the stored key's digest verifies.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::ingest::{account, consume_exactly, post_json, Collector};
use sluice_tests::TestDb;

const TTL_MS: u64 = 1_500;

async fn track(collector: &Collector, key: &str, id: &str) -> StatusCode {
    reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(key)
        .json(&json!({"event": "e", "anonymousId": "a", "messageId": id}))
        .send()
        .await
        .expect("collector answers")
        .status()
}

/// Sends with `key` every 100 ms until it is refused; the time that took.
async fn refused_after(
    collector: &Collector,
    key: &str,
    limit: Duration,
) -> (Duration, StatusCode) {
    let started = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let status = track(collector, key, &format!("after-{n}")).await;
        if status != StatusCode::OK || started.elapsed() > limit {
            return (started.elapsed(), status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_keys_are_refused_within_the_cache_ttl() {
    let db = TestDb::migrated().await.unwrap();
    let revoked = account(&db, "revoked").await.unwrap();
    let expired = account(&db, "expired").await.unwrap();
    let mut config = Collector::config(&db);
    config.key_cache_ttl_ms = TTL_MS;
    let collector = Collector::start(config).await.unwrap();
    // Both keys work and are cached.
    assert_eq!(
        track(&collector, &revoked.key.plaintext, "r0").await,
        StatusCode::OK
    );
    assert_eq!(
        track(&collector, &expired.key.plaintext, "e0").await,
        StatusCode::OK
    );

    let client = db.client().await.unwrap();
    sluice_schema::control::revoke_key(&client, revoked.key.id)
        .await
        .unwrap();
    client
        .execute(
            "UPDATE api_key SET expires_at = now() WHERE id = $1",
            &[&expired.key.id],
        )
        .await
        .unwrap();
    let bound = Duration::from_millis(TTL_MS + 1_000);
    let (took_revoked, status) = refused_after(&collector, &revoked.key.plaintext, bound * 2).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        took_revoked <= bound,
        "revoked key worked for {took_revoked:?}"
    );
    let (took_expired, status) = refused_after(&collector, &expired.key.plaintext, bound * 2).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        took_expired <= bound,
        "expired key worked for {took_expired:?}"
    );
    eprintln!(
        "TTL {TTL_MS} ms: revoked refused after {took_revoked:?}, expired after {took_expired:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_writes_only_into_its_own_workspace_whatever_the_body_claims() {
    let db = TestDb::migrated().await.unwrap();
    let a = account(&db, "tenant-a").await.unwrap();
    let b = account(&db, "tenant-b").await.unwrap();
    let collector = Collector::start(Collector::config(&db)).await.unwrap();
    let http = reqwest::Client::new();

    // The body names B's key while the header carries A's: refused.
    let r = post_json(&http, collector.url("/v1/track"), &a.key.plaintext, &json!({"writeKey": b.key.plaintext, "event": "e", "anonymousId": "x", "messageId": "cross"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // The body claims B's tenant and workspace in every field a careless parser might read.
    let forged = json!({"event": "e", "anonymousId": "x", "messageId": "forged",
        "tenant_id": b.tenant_id, "tenantId": b.tenant_id, "workspace_id": b.workspace_id,
        "workspaceId": b.workspace_id, "context": {"tenant_id": b.tenant_id, "workspace_id": b.workspace_id}});
    let r = post_json(&http, collector.url("/v1/track"), &a.key.plaintext, &forged)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // A's key prefix with another secret: unknown key, not A's.
    let prefix_len = sluice_schema::apikey::KEY_MARKER.len() + sluice_schema::apikey::PREFIX_LEN;
    let guessed = format!(
        "{}{}",
        &a.key.plaintext[..prefix_len],
        "x".repeat(sluice_schema::apikey::SECRET_LEN)
    );
    assert_eq!(
        track(&collector, &guessed, "guess").await,
        StatusCode::UNAUTHORIZED
    );

    let (within, linger) = (Duration::from_secs(30), Duration::from_secs(1));
    let forged = "only the forged-but-authenticated message";
    let events = consume_exactly(&collector.topics.event, 1, within, linger, forged).await;
    let e = &events[0].value;
    assert_eq!(e["message_id"], "forged");
    assert_eq!(
        e["tenant_id"], a.tenant_id,
        "tenant from the key, not the body"
    );
    assert_eq!(
        e["workspace_id"], a.workspace_id,
        "workspace from the key, not the body"
    );
    assert!(events[0].key.starts_with(&format!("{}/", a.tenant_id)));
}
