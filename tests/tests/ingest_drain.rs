//! SIGTERM drain: the collector stops accepting, finishes the requests in flight (each still
//! answered only after Kafka acknowledged it), flushes the producer, and exits.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::ingest::{account, consume_exactly, Collector};
use sluice_tests::TestDb;

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_then_refuses_connections() {
    let db = TestDb::migrated().await.unwrap();
    let acct = account(&db, "acme").await.unwrap();
    let mut config = Collector::config(&db);
    // Hold every acknowledgement back a second, so requests are surely in flight at shutdown.
    config.producer_linger_ms = 1_000;
    let collector = Collector::start(config).await.unwrap();
    let addr = collector.addr;
    let topic = collector.topics.event.clone();

    let mut requests = Vec::new();
    for r in 0..10 {
        let url = collector.url("/v1/batch");
        let key = acct.key.plaintext.clone();
        requests.push(tokio::spawn(async move {
            let batch: Vec<_> = (0..50)
                .map(|i| json!({"type": "track", "event": "E", "anonymousId": format!("v{r}"), "messageId": format!("r{r}-{i}")}))
                .collect();
            reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&json!({ "batch": batch }))
                .send()
                .await
                .map(|resp| resp.status())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    collector.stop().await.unwrap();

    let mut ok = 0;
    for r in requests {
        let status = r
            .await
            .unwrap()
            .expect("an in-flight request is answered, not cut");
        assert_eq!(status, StatusCode::OK);
        ok += 1;
    }
    assert_eq!(ok, 10);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no connections accepted after the drain"
    );
    let (within, linger) = (Duration::from_secs(30), Duration::from_millis(500));
    let once = "every acknowledged message is on the topic, once";
    consume_exactly(&topic, 500, within, linger, once).await;
}
