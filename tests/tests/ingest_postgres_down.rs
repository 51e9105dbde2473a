//! PostgreSQL unreachable (the network to it cut by a proxy of the test's own): keys already
//! in the cache keep working, an uncached key gets 503 with Retry-After (never 401: the key
//! may well be valid), `/readyz` says not ready; when the network returns, all is well again.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::ingest::{account, Collector};
use sluice_tests::private::TcpProxy;
use sluice_tests::{Stack, TestDb};

#[tokio::test]
async fn postgres_cut_keeps_cached_keys_working_and_answers_503_for_others() {
    let db = TestDb::migrated().await.unwrap();
    let cached = account(&db, "cached").await.unwrap();
    let uncached = account(&db, "uncached").await.unwrap();

    // The collector reaches the test database only through the proxy.
    let pg_hostport = Stack::get()
        .database_url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let proxy = TcpProxy::start(&pg_hostport).await.unwrap();
    let mut config = Collector::config(&db);
    config.database_args.database_url = db.url.replace(&pg_hostport, &proxy.addr().to_string());
    config.key_cache_ttl_ms = 60_000;
    let collector = Collector::start(config).await.unwrap();
    let http = reqwest::Client::new();
    let send = |key: String| {
        let http = http.clone();
        let url = collector.url("/v1/track");
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"event": "E", "userId": "u"}))
                .send()
                .await
                .unwrap()
        }
    };

    assert_eq!(
        send(cached.key.plaintext.clone()).await.status(),
        StatusCode::OK
    );
    proxy.cut();

    assert_eq!(
        send(cached.key.plaintext.clone()).await.status(),
        StatusCode::OK,
        "a cached key needs no database"
    );
    let r = send(uncached.key.plaintext.clone()).await;
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "an unchecked key is not called unknown"
    );
    assert!(r.headers().contains_key("retry-after"));

    let metrics_readyz = format!("http://{}/readyz", collector.metrics_addr);
    let mut not_ready = false;
    for _ in 0..50 {
        let r = http.get(&metrics_readyz).send().await.unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["dependencies"]["postgres"]["ok"], false);
            assert_eq!(body["dependencies"]["kafka"]["ok"], true);
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(not_ready, "/readyz reports PostgreSQL down");

    proxy.restore();
    let mut recovered = false;
    for _ in 0..100 {
        if send(uncached.key.plaintext.clone()).await.status() == StatusCode::OK {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "an uncached key works again once PostgreSQL is back"
    );
    collector.wait_ready(Duration::from_secs(10)).await.unwrap();
    collector.stop().await.unwrap();
}
