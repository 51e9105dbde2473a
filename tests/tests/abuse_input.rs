//! Bad input against a collector served in this process: every malformed, oversized or
//! hostile body gets a 4xx with a reason the client can act on, the collector stays healthy
//! (a valid request right after is accepted), and nothing of the bad requests reaches Kafka
//! (every topic of the collector is read back and must hold only the valid probe messages).
//!
//! Transport abuse (lying `Content-Length`, slow-loris, header floods, thousands of idle
//! connections) is driven over raw TCP, since an HTTP client library refuses to misbehave.
//!
//! The collector's memory under all of it at once is measured on the real binary
//! (`sluice-ingest`, so the resident set is the collector's alone; `cargo build -p sluice-ingest
//! --bins` first, deploy/local/test does).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_tests::abuse::{cases, gzip};
use sluice_tests::faults::vm_kib;
use sluice_tests::ingest::{account, consume, consume_exactly, ingest_command, served, Collector};
use sluice_tests::private::free_port;
use sluice_tests::{unique_name, ServiceLog, Stack, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one valid track and asserts it is accepted: the collector is still healthy.
async fn probe(collector: &Collector, key: &str, id: &str) {
    let r = reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(key)
        .json(&json!({"event": "probe", "anonymousId": "probe", "messageId": id}))
        .send()
        .await
        .expect("test setup");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "probe {id}: {}",
        r.text().await.expect("test setup")
    );
}

/// Reads every topic of the collector and returns the messageIds found on the event topic,
/// asserting the identity topic is empty (no bad identify/alias got through).
async fn produced_message_ids(collector: &Collector, expect: usize) -> Vec<String> {
    let brokers = &Stack::get().kafka_brokers;
    let linger = Duration::from_secs(1);
    let events = consume(
        brokers,
        &collector.topics.event,
        expect,
        Duration::from_secs(20),
        linger,
    )
    .await
    .expect("test setup");
    let identities = consume(
        brokers,
        &collector.topics.identity,
        1,
        Duration::from_secs(3),
        linger,
    )
    .await
    .expect("test setup");
    assert!(
        identities.is_empty(),
        "bad identify/alias reached Kafka: {identities:?}"
    );
    events
        .iter()
        .map(|c| {
            c.value["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_body_gets_a_4xx_with_a_reason_and_nothing_reaches_kafka() {
    let (_db, acct, collector) = served("abuse").await.unwrap();
    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    let cases = cases();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut req = http
            .post(collector.url(case.path))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(case.body.clone());
        if let Some(enc) = case.encoding {
            req = req.header("content-encoding", enc);
        }
        let started = Instant::now();
        let r = req.send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let reason = body["error"].as_str().unwrap_or_default().to_owned();
        if status != case.expect || reason.len() < 10 {
            failures.push(format!("{}: {status} {body}", case.name));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} took {:?}",
            case.name,
            started.elapsed()
        );
        // Still healthy after every case.
        probe(&collector, &key, &format!("probe-{i}")).await;
    }
    assert!(
        failures.is_empty(),
        "wrong answers:\n{}",
        failures.join("\n")
    );
    eprintln!("{} bad bodies refused", cases.len());

    let ids = produced_message_ids(&collector, cases.len()).await;
    assert_eq!(
        ids.len(),
        cases.len(),
        "only the probes reached Kafka: {ids:?}"
    );
    assert!(ids.iter().all(|id| id.starts_with("probe-")), "{ids:?}");
    collector.stop().await.unwrap();
}

/// A huge integer is valid JSON: it is either refused with a 4xx or stored as a number, never
/// a 5xx or a crash.
#[tokio::test]
async fn a_400_digit_integer_is_refused_or_kept_never_a_crash() {
    let (_db, acct, collector) = served("bignum").await.unwrap();
    let body = format!(
        r#"{{"event":"e","anonymousId":"a","messageId":"big","properties":{{"n":{}}}}}"#,
        "9".repeat(400)
    );
    let r = reqwest::Client::new()
        .post(collector.url("/v1/track"))
        .bearer_auth(&acct.key.plaintext)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    eprintln!("400-digit integer: {status}");
    assert!(
        status == StatusCode::OK || status.is_client_error(),
        "{status}"
    );
    probe(&collector, &acct.key.plaintext, "after-big").await;
}

/// Writes `head` on a fresh connection and returns what the server answered before closing
/// (or within `wait`).
async fn raw_exchange(collector: &Collector, head: &[u8], wait: Duration) -> String {
    let mut sock = TcpStream::connect(collector.addr)
        .await
        .expect("test setup");
    // The server may close before it read everything (a refused header flood): ignore.
    let _ = sock.write_all(head).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, sock.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `head` over a raw connection (10 s at most) and asserts the answer's status is
/// `want`; `what` names the case.
async fn assert_raw_status(collector: &Collector, head: &str, want: u16, what: &str) {
    let answer = raw_exchange(collector, head.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), Some(want), "{what}: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_content_length_and_header_floods_are_refused() {
    let (_db, acct, collector) = served("transport").await.unwrap();
    let key = acct.key.plaintext.clone();
    let body = r#"{"event":"e","anonymousId":"a","messageId":"lie"}"#;

    // Content-Length says more than is sent, then the client stops sending: no 200, ever.
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len() + 100
    );
    let mut sock = TcpStream::connect(collector.addr).await.unwrap();
    sock.write_all(head.as_bytes()).await.unwrap();
    sock.shutdown().await.unwrap(); // half-close: the promised bytes never come
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out);
    assert!(
        status_of(&answer).is_none_or(|s| (400..500).contains(&s)),
        "short body: {answer}"
    );

    // Content-Length says less than is sent: the rest is a second, malformed request.
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{body}"
    );
    assert_raw_status(&collector, &head, 400, "truncated by Content-Length").await;

    // Content-Length far over the limit: 413 before the body is read.
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n{{"
    );
    assert_raw_status(&collector, &head, 413, "huge Content-Length").await;

    // Two different Content-Lengths (request smuggling shape): refused.
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 5\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_raw_status(&collector, &head, 400, "double Content-Length").await;

    // 5,000 headers.
    let mut head = String::from("POST /v1/track HTTP/1.1\r\nHost: x\r\n");
    for i in 0..5_000 {
        head.push_str(&format!("X-Flood-{i}: {}\r\n", "v".repeat(20)));
    }
    head.push_str("Content-Length: 2\r\nConnection: close\r\n\r\n{}");
    let answer = raw_exchange(&collector, head.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        status_of(&answer).is_none_or(|s| (400..500).contains(&s)),
        "5000 headers: {answer}"
    );

    // One header of 1 MB.
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
        "v".repeat(1 << 20)
    );
    let answer = raw_exchange(&collector, head.as_bytes(), Duration::from_secs(10)).await;
    assert!(
        status_of(&answer).is_none_or(|s| (400..500).contains(&s)),
        "1 MB header: {answer}"
    );

    probe(&collector, &key, "after-transport").await;
    let ids = produced_message_ids(&collector, 1).await;
    assert_eq!(ids, vec!["after-transport".to_owned()]);
}

/// Slow-loris: connections that dribble their headers must not keep the collector from
/// serving others, and are closed by the server instead of held for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_and_do_not_starve_others() {
    let (_db, acct, collector) = served("loris").await.unwrap();
    let mut lorises = Vec::new();
    for _ in 0..300 {
        let mut sock = TcpStream::connect(collector.addr).await.unwrap();
        sock.write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\nX-A: ")
            .await
            .unwrap();
        lorises.push(sock);
    }
    // Others are served meanwhile.
    probe(&collector, &acct.key.plaintext, "beside-lorises").await;

    // One more byte every 2 s, for up to 60 s: the server must hang up on them.
    let started = Instant::now();
    let mut open = lorises.len();
    while open > 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        open = 0;
        for sock in &mut lorises {
            if sock.write_all(b"a").await.is_ok() {
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(1), sock.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {}
                    _ => open += 1,
                }
            }
        }
    }
    eprintln!(
        "slow-loris: {} of 300 still open after {:?}",
        open,
        started.elapsed()
    );
    assert_eq!(
        open,
        0,
        "{open} of 300 slow-loris connections still open after {:?}: the collector has no header read timeout",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_idle_connections_and_500_concurrent_requests_are_served() {
    let (_db, acct, collector) = served("crowd").await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..3_000 {
        idle.push(TcpStream::connect(collector.addr).await.unwrap());
    }
    let started = Instant::now();
    probe(&collector, &acct.key.plaintext, "beside-idle").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(idle);

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let sends = (0..500).map(|i| {
        let http = http.clone();
        let url = collector.url("/v1/track");
        let key = acct.key.plaintext.clone();
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"event":"e","anonymousId":format!("c{i}"),"messageId":format!("crowd-{i}")}))
                .send()
                .await
                .map(|r| r.status())
        }
    });
    let statuses = futures::future::join_all(sends).await;
    let ok = statuses
        .iter()
        .filter(|s| matches!(s, Ok(s) if *s == StatusCode::OK))
        .count();
    assert_eq!(
        ok,
        500,
        "{:?}",
        statuses
            .iter()
            .filter(|s| !matches!(s, Ok(s) if *s == StatusCode::OK))
            .take(5)
            .collect::<Vec<_>>()
    );
    let ids = produced_message_ids(&collector, 501).await;
    assert_eq!(ids.len(), 501, "every acknowledged message once");
}

/// The collector's resident set while hostile clients work it all at once must stay under
/// this. The collector's limits make it finite: a request in flight holds at most its
/// `max_request_bytes` (512,000) of body and as much again inflated, about 1.5 MB with the
/// parser's copy and 3 MB if every growing buffer ended at twice its content, so [`ABUSERS`]
/// at once hold 100 to 200 MB, plus a debug build's baseline (13 MiB measured). A body read or
/// inflated past its limit (one 20 MB bomb inflated whole per abuser) breaks it at once.
const ABUSE_RSS_BOUND_MIB: u64 = 256;

/// Abusers sending at once.
const ABUSERS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_memory_stays_bounded_under_oversized_bodies_gzip_bombs_and_connection_floods() {
    let db = TestDb::migrated().await.unwrap();
    let acct = account(&db, "abuse-rss").await.unwrap();
    let prefix = format!("{}.", unique_name("ar"));
    let (port, metrics_port) = (free_port().unwrap(), free_port().unwrap());
    let log = ServiceLog::new(&format!("{prefix}ingest"));
    let mut collector = ingest_command(&db.url, &prefix, port, metrics_port, log.path())
        .unwrap()
        // The abusers share one key: rate limiting would refuse them before their bodies are
        // read, and the test is about what reading them costs.
        .env("SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND", "0")
        .spawn()
        .expect("sluice-ingest (cargo build -p sluice-ingest --bins)");
    let pid = collector.id().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    // A fresh connection per request: the collector answers 413 before reading an oversized
    // body to its end and then closes the connection without `Connection: close`, so a pooled
    // client's next request on it would fail unanswered and never reach the collector.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    let started = Instant::now();
    while !matches!(http.get(&ready).send().await, Ok(r) if r.status() == 200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "sluice-ingest not ready: {}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = acct.key.plaintext.clone();
    let send_valid = |id: String| {
        let (http, url, key) = (http.clone(), format!("{base}/v1/track"), key.clone());
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"event": "probe", "anonymousId": "probe", "messageId": id}))
                .send()
                .await
                .map(|r| r.status())
        }
    };
    // Warm: the producer, the key cache and the connection pool exist before the baseline.
    for i in 0..50 {
        assert_eq!(
            send_valid(format!("warm-{i}")).await.unwrap(),
            StatusCode::OK
        );
    }
    let baseline_kib = vm_kib(pid, "VmRSS").unwrap();

    let peak_kib = Arc::new(AtomicU64::new(baseline_kib));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (peak_kib, stop) = (peak_kib.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = vm_kib(pid, "VmRSS") {
                    peak_kib.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // 3,000 connections held open and silent for the whole abuse.
    let mut idle = Vec::new();
    for _ in 0..3_000 {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let oversized = Arc::new(
        format!(
            r#"{{"batch":[{{"type":"track","event":"e","anonymousId":"a","properties":{{"s":"{}"}}}}]}}"#,
            "y".repeat(600_000)
        )
        .into_bytes(),
    );
    let bomb = Arc::new(gzip(&vec![b' '; 20 * 1024 * 1024]));
    // Just under the limit, so all of it is read and parsed before it is refused.
    let unfinished = Arc::new(
        format!(
            r#"{{"batch":[{{"type":"track","event":"{}"#,
            "x".repeat(500_000)
        )
        .into_bytes(),
    );
    let lying_head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n{{"
    );
    let abuse_for = Duration::from_secs(10);
    let abusers = (0..ABUSERS).map(|n| {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        let (oversized, bomb, unfinished) = (oversized.clone(), bomb.clone(), unfinished.clone());
        let lying_head = lying_head.clone();
        tokio::spawn(async move {
            // (what was sent, the status it got or None when the connection ended first)
            let mut seen: BTreeMap<(&'static str, Option<u16>), usize> = BTreeMap::new();
            let started = Instant::now();
            let mut round = n;
            while started.elapsed() < abuse_for {
                let post = |body: Vec<u8>, gzip: bool| {
                    let mut req = http
                        .post(format!("{base}/v1/batch"))
                        .bearer_auth(&key)
                        .header("content-type", "application/json")
                        .body(body);
                    if gzip {
                        req = req.header("content-encoding", "gzip");
                    }
                    async move { req.send().await.ok().map(|r| r.status().as_u16()) }
                };
                let answer = match round % 4 {
                    0 => ("oversized", post(oversized.to_vec(), false).await),
                    1 => ("gzip bomb", post(bomb.to_vec(), true).await),
                    2 => ("unfinished", post(unfinished.to_vec(), false).await),
                    _ => {
                        let mut out = Vec::new();
                        if let Ok(mut sock) = TcpStream::connect(("127.0.0.1", port)).await {
                            let _ = sock.write_all(lying_head.as_bytes()).await;
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                sock.read_to_end(&mut out),
                            )
                            .await;
                        }
                        (
                            "10 GB Content-Length",
                            status_of(&String::from_utf8_lossy(&out)),
                        )
                    }
                };
                *seen.entry(answer).or_default() += 1;
                round += 1;
            }
            seen
        })
    });
    let mut seen: BTreeMap<(&'static str, Option<u16>), usize> = BTreeMap::new();
    for abuser in futures::future::join_all(abusers).await {
        for (what, n) in abuser.unwrap() {
            *seen.entry(what).or_default() += n;
        }
    }
    // Still serving beside the idle crowd, once the abuse is over.
    assert_eq!(
        send_valid("after-abuse".into()).await.unwrap(),
        StatusCode::OK
    );
    drop(idle);
    stop.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    let hwm_kib = vm_kib(pid, "VmHWM").unwrap();
    let peak_kib = peak_kib.load(Ordering::Relaxed).max(hwm_kib);
    let end_kib = vm_kib(pid, "VmRSS").unwrap();
    assert!(
        collector.try_wait().unwrap().is_none(),
        "the collector survived"
    );
    eprintln!(
        "collector resident set: {} MiB at rest, peak {} MiB under abuse (bound {ABUSE_RSS_BOUND_MIB} MiB), {} MiB after; {ABUSERS} abusers for {abuse_for:?} beside 3,000 idle connections: {seen:?}",
        baseline_kib / 1024,
        peak_kib / 1024,
        end_kib / 1024,
    );
    let refused: usize = seen
        .iter()
        .filter(|((_, status), _)| status.is_some())
        .map(|(_, n)| n)
        .sum();
    assert!(refused > 100, "the abuse ran: {seen:?}");
    for ((what, status), n) in &seen {
        let expect = if *what == "unfinished" { 400 } else { 413 };
        assert!(
            status.is_none_or(|s| s == expect),
            "{n} x {what}: {status:?}, not {expect}"
        );
    }
    let topic = sluice_schema::topics::Topics::with_prefix(&prefix).event;
    let (within, linger) = (Duration::from_secs(20), Duration::from_secs(1));
    let only_valid = "only the 51 valid requests reached Kafka";
    consume_exactly(&topic, 51, within, linger, only_valid).await;
    assert!(
        peak_kib / 1024 < ABUSE_RSS_BOUND_MIB,
        "collector resident set peaked at {} MiB (bound {ABUSE_RSS_BOUND_MIB} MiB)",
        peak_kib / 1024
    );
}
