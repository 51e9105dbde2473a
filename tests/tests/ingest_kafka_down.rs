//! The collector's promise when Kafka stops: no request is told 200 unless Kafka has its
//! messages. Runs against a private broker of its own, stopped and started by the test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sluice_tests::ingest::{account, consume, post_json, Collector};
use sluice_tests::private::PrivateKafka;
use sluice_tests::TestDb;

/// One request's outcome.
#[derive(Debug, Clone)]
struct Sent {
    message_id: String,
    started: Instant,
    finished: Instant,
    status: Option<StatusCode>,
    retry_after: bool,
}

#[tokio::test]
async fn kafka_stopped_gets_503_in_time_and_every_200_is_on_the_topic() {
    let kafka = PrivateKafka::start().await.unwrap();
    let db = TestDb::migrated().await.unwrap();
    let acct = account(&db, "acme").await.unwrap();
    let mut config = Collector::config(&db);
    config.kafka_args.kafka_brokers = kafka.brokers();
    config.produce_timeout_ms = 3_000;
    let timeout = config.produce_timeout();
    let collector = Collector::start(config).await.unwrap();

    // Four clients send one message at a time for the whole test.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let mut clients = Vec::new();
    for client_no in 0..4 {
        let (sent, running) = (sent.clone(), running.clone());
        let url = collector.url("/v1/track");
        let key = acct.key.plaintext.clone();
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
            let mut n = 0;
            while running.load(Ordering::Relaxed) {
                let message_id = format!("c{client_no}-{n}");
                n += 1;
                let started = Instant::now();
                let resp = post_json(&http, &url, &key, &json!({"event": "E", "anonymousId": format!("v{client_no}"), "messageId": message_id})).await;
                let finished = Instant::now();
                let (status, retry_after) = match &resp {
                    Ok(r) => (Some(r.status()), r.headers().contains_key("retry-after")),
                    Err(_) => (None, false),
                };
                sent.lock().unwrap().push(Sent { message_id, started, finished, status, retry_after });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka.stop().await.unwrap();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let metrics_readyz = reqwest::get(format!("http://{}/readyz", collector.metrics_addr))
        .await
        .unwrap();
    assert_eq!(
        metrics_readyz.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while Kafka is down"
    );
    let up_begins = Instant::now();
    kafka.start_again().await.unwrap();

    // After Kafka returns, requests succeed again.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let recovered = sent
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.started > up_begins && s.status == Some(StatusCode::OK));
        if recovered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no 200 within 90 s of Kafka's return"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    running.store(false, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let sent = sent.lock().unwrap().clone();

    // While Kafka was down, nothing was acknowledged, and every refusal came in time.
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.started >= down && s.finished <= up_begins)
        .collect();
    assert!(
        during.len() >= 4,
        "requests were made during the outage: {}",
        during.len()
    );
    for s in &during {
        assert_eq!(s.status, Some(StatusCode::SERVICE_UNAVAILABLE), "{s:?}");
        assert!(s.retry_after, "503 carries Retry-After");
        let took = s.finished - s.started;
        assert!(
            took <= timeout + Duration::from_millis(1_500),
            "503 after {took:?}, timeout {timeout:?}"
        );
    }

    // Every message that got 200 is on the topic (at least once; a 503'd one may be too).
    let ok: Vec<&str> = sent
        .iter()
        .filter(|s| s.status == Some(StatusCode::OK))
        .map(|s| s.message_id.as_str())
        .collect();
    let on_topic = consume(
        &kafka.brokers(),
        &collector.topics.event,
        ok.len(),
        Duration::from_secs(60),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let ids: std::collections::HashSet<&str> = on_topic
        .iter()
        .filter_map(|c| c.value["message_id"].as_str())
        .collect();
    let missing: Vec<&&str> = ok.iter().filter(|id| !ids.contains(**id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not on the topic: {missing:?}"
    );
    eprintln!(
        "requests {}, 200 {}, 503 during outage {}, on topic {}",
        sent.len(),
        ok.len(),
        during.len(),
        on_topic.len()
    );
    collector.stop().await.unwrap();
}
