//! `run` against a tiny in-process collector (axum) that checks auth, acknowledges and
//! records what it received, so the load generator's own guarantees are tested without the
//! real collector: every acknowledged event is in the ack file and nothing else is, failures
//! are counted by status, the open loop keeps its rate and charges stalls to latency.

// The stub's helpers are test code too: a broken stub should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use sluice_loadtest::acks::AckReader;
use sluice_loadtest::generate::{GeneratorConfig, Mix};
use sluice_loadtest::keys::Key;
use sluice_loadtest::run::{run, Mode, RunConfig};
use sluice_schema::apikey;

/// How the stub answers request number `n` (from 0).
type Policy = Arc<dyn Fn(u64) -> Answer + Send + Sync>;

#[derive(Clone, Copy)]
enum Answer {
    Ok,
    /// 200, but the message at this batch index is rejected.
    RejectIndex(usize),
    Status(u16),
    /// Answer 200 after a pause.
    SlowOk(Duration),
}

#[derive(Default)]
struct Seen {
    /// (write key, messageId) of every message in an acknowledged request, minus rejections.
    acked: BTreeSet<(String, String)>,
    /// Event messages (page/track/pixel) among them.
    acked_events: BTreeSet<String>,
    refused_requests: u64,
}

#[derive(Clone)]
struct Stub {
    count: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    policy: Policy,
}

fn key_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.strip_prefix("Basic ")?)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(text.strip_suffix(':')?.to_owned())
}

async fn answer(
    stub: &Stub,
    key: Option<String>,
    messages: Vec<(String, bool)>,
) -> (StatusCode, String) {
    let Some(key) = key else {
        return (StatusCode::UNAUTHORIZED, "{}".into());
    };
    let n = stub.count.fetch_add(1, Ordering::SeqCst);
    let answer = (stub.policy)(n);
    if let Answer::SlowOk(pause) = answer {
        tokio::time::sleep(pause).await;
    }
    if let Answer::Status(code) = answer {
        stub.seen.lock().unwrap().refused_requests += 1;
        return (StatusCode::from_u16(code).unwrap(), "{}".into());
    }
    let rejected = match answer {
        Answer::RejectIndex(i) if i < messages.len() => Some(i),
        _ => None,
    };
    let mut seen = stub.seen.lock().unwrap();
    for (i, (id, is_event)) in messages.into_iter().enumerate() {
        if Some(i) == rejected {
            continue;
        }
        if is_event {
            seen.acked_events.insert(id.clone());
        }
        seen.acked.insert((key.clone(), id));
    }
    let body = match rejected {
        Some(i) => format!(r#"{{"success":true,"rejected":[{{"index":{i},"reason":"invalid"}}]}}"#),
        None => r#"{"success":true}"#.to_owned(),
    };
    (StatusCode::OK, body)
}

async fn on_post(
    State(stub): State<Stub>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let value: serde_json::Value = serde_json::from_slice(&body).expect("the generator sends JSON");
    let list = match value.get("batch") {
        Some(batch) => batch.as_array().unwrap().clone(),
        None => vec![value],
    };
    let messages = list
        .iter()
        .map(|m| {
            (
                m["messageId"].as_str().unwrap().to_owned(),
                m["type"] != "identify",
            )
        })
        .collect();
    answer(&stub, key_of(&headers), messages).await
}

async fn on_pixel(State(stub): State<Stub>, RawQuery(query): RawQuery) -> (StatusCode, String) {
    let query = query.unwrap_or_default();
    let params: HashMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    let key = params.get("k").map(|k| (*k).to_owned());
    let id = params.get("m").expect("pixel carries m").to_string();
    answer(&stub, key, vec![(id, true)]).await
}

async fn start_stub(policy: Policy) -> (String, Stub) {
    let stub = Stub {
        count: Arc::default(),
        seen: Arc::default(),
        policy,
    };
    let app = Router::new()
        .route("/v1/batch", post(on_post))
        .route("/v1/page", post(on_post))
        .route("/v1/track", post(on_post))
        .route("/v1/identify", post(on_post))
        .route("/v1/p.gif", get(on_pixel))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, stub)
}

fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sluice-loadtest-{name}-{:x}.txt", rand_suffix()))
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn config(url: &str, mode: Mode, duration: Duration, ack_file: &std::path::Path) -> RunConfig {
    RunConfig {
        collector_url: url.to_owned(),
        mode,
        duration,
        max_requests: None,
        timeout: Duration::from_secs(5),
        generator: GeneratorConfig {
            seed: 11,
            keys: 3,
            visitors_per_tenant: 20,
            batch_size: 1..=8,
            mix: Mix::default(),
            ..GeneratorConfig::default()
        },
        run_id: "stubrun".into(),
        ack_file: Some(ack_file.to_owned()),
        progress: false,
    }
}

fn keys(n: usize) -> Vec<Key> {
    (0..n)
        .map(|_| Key::given(&apikey::generate().plaintext).unwrap())
        .collect()
}

fn read_acks(
    path: &std::path::Path,
) -> (
    Vec<sluice_loadtest::acks::KeyRecord>,
    Vec<sluice_loadtest::acks::AckRecord>,
    bool,
) {
    let mut reader = AckReader::open(path).unwrap();
    let chunk = reader.read_available().unwrap();
    (chunk.keys, chunk.acks, reader.ended())
}

#[tokio::test]
async fn ack_file_holds_exactly_the_acknowledged_events() {
    // Every 7th request is refused with 503, every 5th has its first message rejected.
    let policy: Policy = Arc::new(|n| match n {
        n if n % 7 == 3 => Answer::Status(503),
        n if n % 5 == 1 => Answer::RejectIndex(0),
        _ => Answer::Ok,
    });
    let (url, stub) = start_stub(policy).await;
    let ack_file = temp_file("exact");
    let keys = keys(3);
    let mode = Mode::Open {
        rate_rps: 200.0,
        max_in_flight: 64,
    };
    let report = run(
        config(&url, mode, Duration::from_millis(1500), &ack_file),
        keys.clone(),
        std::future::pending(),
    )
    .await
    .unwrap();

    let seen = stub.seen.lock().unwrap();
    let (key_records, acks, ended) = read_acks(&ack_file);
    assert!(ended, "the ack file is finished with #end");
    assert_eq!(key_records.len(), 3);
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(key_records[i].prefix, k.prefix);
    }
    let in_file: BTreeSet<String> = acks.iter().map(|a| a.message_id.clone()).collect();
    assert_eq!(in_file.len(), acks.len(), "no message id twice");
    assert_eq!(
        in_file, seen.acked_events,
        "ack file = events the stub acknowledged"
    );
    // Each ack names the key that sent it.
    let sent_with: HashMap<&str, &str> = seen
        .acked
        .iter()
        .map(|(k, m)| (m.as_str(), k.as_str()))
        .collect();
    for a in &acks {
        assert_eq!(
            sent_with[a.message_id.as_str()],
            keys[a.key_index].plaintext
        );
        assert!(a.message_id.starts_with("stubrun-"));
    }

    // 1.5 s at 200/s: 300 requests, all answered.
    assert_eq!(report.requests_sent, 300);
    assert_eq!(report.latency.count, 300);
    assert_eq!(
        report.errors.get("503").copied(),
        Some(seen.refused_requests)
    );
    assert_eq!(report.requests_acked + seen.refused_requests, 300);
    assert_eq!(report.events_acked, acks.len() as u64);
    assert!(report.messages_rejected > 0);
    assert!(report.identifies_acked > 0);
    std::fs::remove_file(&ack_file).unwrap();
}

#[tokio::test]
async fn closed_loop_keeps_n_requests_in_flight() {
    let policy: Policy = Arc::new(|_| Answer::SlowOk(Duration::from_millis(50)));
    let (url, stub) = start_stub(policy).await;
    let ack_file = temp_file("closed");
    let report = run(
        config(
            &url,
            Mode::Closed { connections: 4 },
            Duration::from_secs(1),
            &ack_file,
        ),
        keys(2),
        std::future::pending(),
    )
    .await
    .unwrap();
    // 4 connections x 1 s / 50 ms = 80 requests, less the scheduling slack.
    let answered = stub.count.load(Ordering::SeqCst);
    assert_eq!(report.requests_sent, answered);
    assert!((60..=84).contains(&answered), "{answered} requests");
    assert!(report.latency.p50_ms >= 50.0, "{:?}", report.latency);
    assert!(report.errors.is_empty());
    std::fs::remove_file(&ack_file).unwrap();
}

#[tokio::test]
async fn open_loop_charges_a_stall_to_every_request_it_delayed() {
    // One request in flight at most; request 20 stalls for 500 ms. At 100/s, the ~50 requests
    // due during the stall wait for it: an honest open loop reports each of them as late.
    let policy: Policy = Arc::new(|n| {
        if n == 20 {
            Answer::SlowOk(Duration::from_millis(500))
        } else {
            Answer::Ok
        }
    });
    let (url, _stub) = start_stub(policy).await;
    let ack_file = temp_file("stall");
    let mode = Mode::Open {
        rate_rps: 100.0,
        max_in_flight: 1,
    };
    let report = run(
        config(&url, mode, Duration::from_secs(2), &ack_file),
        keys(1),
        std::future::pending(),
    )
    .await
    .unwrap();
    assert_eq!(
        report.requests_sent, 200,
        "the schedule catches up after the stall"
    );
    let l = report.latency;
    assert!(l.max_ms >= 500.0, "{l:?}");
    // About 50 of 200 requests (25 %) were due during the stall: p90 must show it.
    assert!(
        l.p90_ms >= 100.0,
        "coordinated omission would hide the stall: {l:?}"
    );
    assert!(l.p50_ms < 100.0, "{l:?}");
    std::fs::remove_file(&ack_file).unwrap();
}

#[tokio::test]
async fn shutdown_stops_sending_and_finishes_the_ack_file() {
    let (url, _stub) = start_stub(Arc::new(|_| Answer::Ok)).await;
    let ack_file = temp_file("shutdown");
    let mode = Mode::Open {
        rate_rps: 100.0,
        max_in_flight: 16,
    };
    let report = run(
        config(&url, mode, Duration::from_secs(60), &ack_file),
        keys(1),
        tokio::time::sleep(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    assert!(
        (40..=60).contains(&report.requests_sent),
        "{}",
        report.requests_sent
    );
    let (_, acks, ended) = read_acks(&ack_file);
    assert!(ended);
    assert_eq!(acks.len() as u64, report.events_acked);
    std::fs::remove_file(&ack_file).unwrap();
}
