//! The collector's link to PostgreSQL (its key store) cut through a TCP proxy of the test's own:
//! a key still in the cache keeps working; a key not cached gets 503 with `Retry-After`, never
//! 401 (the key is not unknown, the store is unreachable) and never 200; once the cache entry
//! has expired the collector fails closed (503) rather than trusting a key it cannot re-check;
//! after the link is back, both keys work again at once (a failed look-up is not cached).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::ingest::{account, Collector};
use sluice_tests::private::TcpProxy;
use sluice_tests::{Stack, TestDb};

async fn track(collector: &Collector, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(key)
        .json(&json!({"event": "e", "anonymousId": "a"}))
        .send()
        .await
        .expect("collector answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_store_cut_means_503_for_uncached_keys_and_cached_keys_work_within_the_ttl() {
    const TTL_MS: u64 = 3_000;
    let db = TestDb::migrated().await.unwrap();
    let cached = account(&db, "cached").await.unwrap();
    let uncached = account(&db, "uncached").await.unwrap();
    let pg = Stack::get()
        .database_url
        .split_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(hp, _)| hp.to_owned())
        .unwrap();
    let proxy = TcpProxy::start(&pg).await.unwrap();
    let mut config = Collector::config(&db);
    let (user, rest) = db.url.split_once('@').unwrap();
    let (_, name) = rest.split_once('/').unwrap();
    config.database_args.database_url = format!("{user}@{}/{name}", proxy.addr());
    config.key_cache_ttl_ms = TTL_MS;
    let collector = Collector::start(config).await.unwrap();
    assert_eq!(
        track(&collector, &cached.key.plaintext).await.status(),
        StatusCode::OK
    );

    proxy.cut();
    let r = track(&collector, &cached.key.plaintext).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a cached key works while the store is away"
    );
    let r = track(&collector, &uncached.key.plaintext).await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "uncached key while the store is away"
    );
    assert!(r.headers().contains_key("retry-after"));
    let body = r.text().await.unwrap();
    assert!(body.contains("retry"), "tells the client to retry: {body}");

    tokio::time::sleep(Duration::from_millis(TTL_MS + 500)).await;
    let r = track(&collector, &cached.key.plaintext).await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "past its TTL a key that cannot be re-checked is not trusted"
    );

    proxy.restore();
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let a = track(&collector, &cached.key.plaintext).await.status();
        let b = track(&collector, &uncached.key.plaintext).await.status();
        statuses.push((a, b));
        if a == StatusCode::OK && b == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        statuses.last().copied(),
        Some((StatusCode::OK, StatusCode::OK)),
        "both keys work after the link is back: {statuses:?}"
    );
    eprintln!(
        "key store back: both keys accepted after {} tries",
        statuses.len()
    );
}
