//! PostHog's capture API as the wire sees it, against the real broker: every capture path the
//! SDKs and their older versions use, with and without the trailing slash, `POST` and `GET
//! ?data=`, each body encoding, the skew correction, the remote config and flags answers, and
//! bodies that cannot be taken: a 4xx with the reason, counted by endpoint and reason.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chrono::Utc;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_schema::messages::{self, EventMessage, EventType};
use sluice_tests::ingest::{served, Collector};
use sluice_tests::TestDb;

const WAIT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(500);

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip in memory");
    enc.finish().expect("gzip in memory")
}

fn form(json: &Value) -> String {
    let b64 = STANDARD.encode(json.to_string());
    let escaped = b64
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    format!("data={escaped}")
}

#[tokio::test]
async fn every_capture_path_and_encoding_is_stored_under_the_events_uuid() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    let event = |id: &str| {
        json!({"event": "Path Tried", "uuid": id, "properties": {"distinct_id": "d-1", "token": key,
               "$lib": "raw"}})
    };
    let mut ids = Vec::new();
    let paths = ["/e", "/i/v0/e", "/batch", "/capture", "/track", "/engage"];
    for (n, path) in paths
        .iter()
        .flat_map(|p| [p.to_string(), format!("{p}/")])
        .enumerate()
    {
        // Each path with another encoding: JSON, gzip bytes as text/plain (posthog-js 1.449),
        // gzip-js named in the query, a base64 form (beacons), and GET ?data=.
        let id = format!("p-{n}");
        let body = json!({"api_key": key, "batch": [event(&id)]});
        let req = match n % 5 {
            0 => http.post(collector.url(&path)).json(&body),
            1 => http
                .post(collector.url(&format!("{path}?ip=0&ver=1.449.2")))
                .header("content-type", "text/plain")
                .body(gzip(body.to_string().as_bytes())),
            2 => http
                .post(collector.url(&format!("{path}?compression=gzip-js")))
                .body(gzip(event(&id).to_string().as_bytes())),
            3 => http
                .post(collector.url(&format!("{path}?compression=base64")))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&json!([event(&id)]))),
            _ => http.get(collector.url(&format!("{path}?{}", form(&event(&id))))),
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["status"], 1, "{path}: {answer}");
        ids.push(id);
    }
    let consumed = collector
        .consume(&collector.topics.event, ids.len(), WAIT, LINGER)
        .await
        .unwrap();
    let got: HashSet<String> = consumed
        .iter()
        .map(|c| {
            assert!(
                !c.value.to_string().contains(&key),
                "keys never reach Kafka"
            );
            let m: EventMessage = messages::decode(&serde_json::to_vec(&c.value).unwrap()).unwrap();
            assert_eq!(m.kind, EventType::Track);
            assert_eq!(m.name.as_deref(), Some("Path Tried"));
            assert_eq!(m.anonymous_id.as_deref(), Some("d-1"));
            assert_eq!(
                m.event_id,
                messages::event_id(acct.tenant_id, &m.message_id)
            );
            m.message_id
        })
        .collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn a_clients_clock_skew_is_corrected_from_sent_at_and_offset() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    // The client's clock runs an hour ahead: its event happened 10 s before it sent it.
    let sent_at = Utc::now() + chrono::Duration::hours(1);
    let ts = sent_at - chrono::Duration::seconds(10);
    let body = json!({"api_key": acct.key.plaintext, "sent_at": sent_at.to_rfc3339(), "batch": [
        {"event": "Skewed", "uuid": "skew-ts", "distinct_id": "d", "timestamp": ts.to_rfc3339()},
        {"event": "Skewed", "uuid": "skew-offset", "distinct_id": "d", "offset": 5000}]});
    let resp = reqwest::Client::new()
        .post(collector.url("/batch/"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let consumed = collector
        .consume(&collector.topics.event, 2, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(consumed.len(), 2);
    for c in &consumed {
        let m: EventMessage = messages::decode(&serde_json::to_vec(&c.value).unwrap()).unwrap();
        let before = (m.received_at - m.occurred_at).num_milliseconds();
        let want = if m.message_id == "skew-ts" {
            10_000
        } else {
            5_000
        };
        assert!(
            (before - want).abs() < 1_500,
            "{}: {before} ms",
            m.message_id
        );
    }
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn remote_config_and_flags_switch_every_feature_off_for_any_origin() {
    let db = TestDb::migrated().await.unwrap();
    let collector = Collector::start(Collector::config(&db)).await.unwrap();
    let http = reqwest::Client::new();
    let config = http
        .get(collector.url("/array/phc_site/config"))
        .header("origin", "https://site.example")
        .send()
        .await
        .unwrap();
    assert_eq!(config.status(), StatusCode::OK);
    assert_eq!(config.headers()["access-control-allow-origin"], "*");
    let config: Value = config.json().await.unwrap();
    assert_eq!(config["sessionRecording"], false);
    assert_eq!(config["hasFeatureFlags"], false);
    let js = http
        .get(collector.url("/array/phc_site/config.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains("_POSTHOG_REMOTE_CONFIG[\"phc_site\"]"), "{js}");
    for path in [
        "/flags/?v=2&config=true",
        "/flags",
        "/decide/?v=3",
        "/decide",
    ] {
        let resp = http
            .post(collector.url(path))
            .header("content-type", "text/plain")
            .body(gzip(br#"{"token":"phc_site","distinct_id":"d"}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        let flags: Value = resp.json().await.unwrap();
        assert_eq!(flags["flags"], json!({}), "{path}");
        assert_eq!(flags["featureFlags"], json!({}), "{path}");
    }
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn bodies_that_cannot_be_taken_are_4xx_with_the_reason_counted_by_endpoint_and_reason() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    for (path, body, status, says) in [
        ("/e/", "hello".to_owned(), 400, "neither JSON"),
        (
            "/e/",
            json!({"event": "e", "distinct_id": "d"}).to_string(),
            401,
            "api_key or token",
        ),
        (
            "/batch/",
            json!({"api_key": key, "batch": [{"event": "e"}]}).to_string(),
            400,
            "distinct_id is required",
        ),
        (
            "/batch/",
            json!({"api_key": "sk_notakey", "batch": []}).to_string(),
            401,
            "unknown write key",
        ),
        (
            "/v1/track",
            json!({"writeKey": key, "anonymousId": "a"}).to_string(),
            400,
            "event name",
        ),
        ("/v1/batch", "{\"batch\": ".to_owned(), 400, "not valid"),
    ] {
        let resp = http
            .post(collector.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let text = resp.text().await.unwrap();
        assert!(text.contains(says), "{path}: {text}");
    }
    let metrics = collector.metrics().await.unwrap();
    for (endpoint, reason) in [
        ("posthog", "malformed"),
        ("posthog", "missing_key"),
        ("posthog", "missing_identity"),
        ("posthog", "unknown_key"),
        ("track", "missing_field"),
        ("batch", "malformed"),
    ] {
        let series = format!(
            "sluice_ingest_refused_requests_total{{endpoint=\"{endpoint}\",reason=\"{reason}\"}} 1"
        );
        assert!(metrics.contains(&series), "{series}:\n{metrics}");
    }
    collector.stop().await.unwrap();
}
