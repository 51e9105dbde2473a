//! Handler tests without a broker or a database: the sink and the key store are in
//! memory, so failure modes the real ones cannot be made to show on demand (a full
//! producer queue, a key store that is down) are driven directly.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::body::{to_bytes, Body};
use clap::Parser;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::auth::{KeyRow, StoreError};
use crate::produce::{ProduceError, Records};
use sluice_schema::topics::DataTopic;

/// Records what it is sent, or fails as told.
#[derive(Default)]
struct MemSink {
    sent: Mutex<Vec<Sent>>,
    fail: Option<fn() -> ProduceError>,
}

impl Sink for MemSink {
    async fn send(&self, records: Records) -> Result<(), ProduceError> {
        if let Some(fail) = self.fail {
            return Err(fail());
        }
        self.sent
            .lock()
            .unwrap()
            .extend(records.iter().map(|r| Sent {
                topic: r.topic,
                key: String::from_utf8(r.key.to_vec()).unwrap(),
                payload: r.payload.to_vec(),
            }));
        Ok(())
    }
    fn queue_depth(&self) -> usize {
        0
    }
    async fn probe(&self, _: Duration) -> Result<(), String> {
        Ok(())
    }
    async fn flush(&self, _: Duration) {}
}

/// A record the sink was sent, kept.
#[derive(Clone)]
struct Sent {
    topic: DataTopic,
    key: String,
    payload: Vec<u8>,
}

/// Keys by prefix, or down.
struct MemStore {
    rows: HashMap<String, KeyRow>,
    down: bool,
}

impl KeyStore for MemStore {
    async fn fetch(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
        if self.down {
            return Err(StoreError("connection refused".into()));
        }
        Ok(self.rows.get(prefix).cloned())
    }
    async fn touch(&self, _: &[i64]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

fn app(fail: Option<fn() -> ProduceError>, down: bool) -> (Arc<App<MemSink, MemStore>>, String) {
    let key = sluice_schema::apikey::generate();
    let row = KeyRow {
        id: 1,
        tenant_id: 10,
        workspace_id: 20,
        hash: key.hash.to_vec(),
        scopes: vec!["write".into()],
        expires_at: None,
        revoked_at: None,
    };
    let store = MemStore {
        rows: HashMap::from([(key.prefix.clone(), row)]),
        down,
    };
    let sink = MemSink {
        fail,
        ..MemSink::default()
    };
    let config = Config::try_parse_from(["x"]).unwrap();
    (Arc::new(App::new(config, sink, store)), key.plaintext)
}

async fn post(app: &Arc<App<MemSink, MemStore>>, key: &str, body: serde_json::Value) -> Response {
    let req = Request::post("/v1/track")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    router(app.clone()).oneshot(req).await.unwrap()
}

#[tokio::test]
async fn accepted_track_yields_event_and_visitor_records_keyed_by_visitor() {
    let (app, key) = app(None, false);
    let resp = post(&app, &key, json!({"event": "E", "anonymousId": "a1"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let sent = app.sink.sent.lock().unwrap().clone();
    let topics: Vec<DataTopic> = sent.iter().map(|r| r.topic).collect();
    assert_eq!(topics, [DataTopic::Event, DataTopic::Visitor]);
    assert!(sent.iter().all(|r| r.key == "10/a1"));
}

#[tokio::test]
async fn a_body_refused_before_it_is_read_closes_the_connection_and_says_so() {
    let (app, key) = app(None, false);
    let huge = Request::post("/v1/track")
        .header("authorization", format!("Bearer {key}"))
        .header("content-length", "999999999")
        .body(Body::empty())
        .unwrap();
    let resp = router(app.clone()).oneshot(huge).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(resp.headers()[header::CONNECTION], "close");
    let bad_key = post(&app, "sk_notakey", json!({"event": "E", "userId": "u"})).await;
    assert_eq!(bad_key.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(bad_key.headers()[header::CONNECTION], "close");
    // Read to its end, a refused body leaves the connection usable.
    let read = post(&app, &key, json!({"event": 5})).await;
    assert_eq!(read.status(), StatusCode::BAD_REQUEST);
    assert!(read.headers().get(header::CONNECTION).is_none());
}

#[tokio::test]
async fn full_queue_and_kafka_timeout_are_503_with_retry_after() {
    for fail in [(|| ProduceError::QueueFull) as fn() -> ProduceError, || {
        ProduceError::Timeout
    }] {
        let (app, key) = app(Some(fail), false);
        let resp = post(&app, &key, json!({"event": "E", "userId": "u"})).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
        let body = to_bytes(resp.into_body(), 10_000).await.unwrap();
        assert!(String::from_utf8_lossy(&body).contains("retry"));
    }
}

async fn get(app: &Arc<App<MemSink, MemStore>>, uri: &str) -> Response {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    router(app.clone()).oneshot(req).await.unwrap()
}

async fn text(resp: Response) -> String {
    String::from_utf8_lossy(&to_bytes(resp.into_body(), 100_000).await.unwrap()).into_owned()
}

#[tokio::test]
async fn segment_pixel_takes_base64_of_either_alphabet_and_answers_a_gif() {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let (app, key) = app(None, false);
    // At any alignment, "?>?~~~" encodes to base64 with a `+` (standard) or `-` (URL-safe),
    // and a `+` sent unescaped in a query reads as a space.
    let message = |id: &str| {
        json!({"writeKey": key, "anonymousId": "a1", "event": "Email Opened",
               "messageId": id, "properties": {"subject": "?>?~~~"}})
        .to_string()
    };
    let standard = STANDARD.encode(message("m-std"));
    let raw_plus = STANDARD.encode(message("m-raw-plus"));
    assert!(raw_plus.contains('+'));
    let queries = [
        format!(
            "data={}",
            url::form_urlencoded::byte_serialize(standard.as_bytes()).collect::<String>()
        ),
        format!("data={raw_plus}"),
        format!("data={}", URL_SAFE_NO_PAD.encode(message("m-url-safe"))),
        format!(
            "data={}",
            url::form_urlencoded::byte_serialize(message("m-json").as_bytes()).collect::<String>()
        ),
    ];
    for query in &queries {
        let resp = get(&app, &format!("/v1/pixel/track?{query}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{query}");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "image/gif");
        assert!(resp.headers()[header::CACHE_CONTROL]
            .to_str()
            .unwrap()
            .contains("no-store"));
        assert!(to_bytes(resp.into_body(), 100)
            .await
            .unwrap()
            .starts_with(b"GIF89a"));
    }
    let sent = app.sink.sent.lock().unwrap().clone();
    let events: Vec<serde_json::Value> = sent
        .iter()
        .filter(|r| r.topic == DataTopic::Event)
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect();
    assert_eq!(events.len(), queries.len());
    for (event, id) in events
        .iter()
        .zip(["m-std", "m-raw-plus", "m-url-safe", "m-json"])
    {
        assert_eq!(event["message_id"], id);
        assert_eq!(event["type"], "track");
        assert_eq!(event["name"], "Email Opened");
        assert_eq!(event["properties"]["subject"], "?>?~~~");
        assert!(!event.to_string().contains(&key), "keys never reach Kafka");
    }
}

#[tokio::test]
async fn segment_pixel_bad_data_is_a_4xx_with_a_reason() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let (app, key) = app(None, false);
    let no_key = STANDARD.encode(json!({"event": "E", "userId": "u"}).to_string());
    let no_event = STANDARD.encode(json!({"writeKey": key, "userId": "u"}).to_string());
    let not_json = STANDARD.encode("{\"writeKey\": ");
    for (uri, status, says) in [
        ("/v1/pixel/track?data=%%%".to_owned(), 400, "not base64"),
        (
            "/v1/pixel/track?data=not*base64".to_owned(),
            400,
            "not base64",
        ),
        ("/v1/pixel/track".to_owned(), 400, "no data field"),
        (format!("/v1/pixel/track?data={not_json}"), 400, "not valid"),
        (
            format!("/v1/pixel/track?data={no_event}"),
            400,
            "event name",
        ),
        (
            format!("/v1/pixel/track?data={no_key}"),
            401,
            "no write key",
        ),
    ] {
        let resp = get(&app, &uri).await;
        assert_eq!(resp.status().as_u16(), status, "{uri}");
        let body = text(resp).await;
        assert!(body.contains(says), "{uri}: {body}");
    }
    assert_eq!(
        get(&app, "/v1/pixel/nope?data=e30").await.status(),
        StatusCode::NOT_FOUND
    );
    assert!(app.sink.sent.lock().unwrap().is_empty());
}

async fn posthog_post(
    app: &Arc<App<MemSink, MemStore>>,
    uri: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Response {
    let req = Request::post(uri)
        .header("content-type", content_type)
        .body(Body::from(body))
        .unwrap();
    router(app.clone()).oneshot(req).await.unwrap()
}

fn sent_events(app: &Arc<App<MemSink, MemStore>>) -> Vec<serde_json::Value> {
    app.sink
        .sent
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.topic == DataTopic::Event)
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect()
}

#[tokio::test]
async fn posthog_js_gzip_beacon_and_get_bodies_are_stored_and_answered_status_1() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use std::io::Write;
    let (app, key) = app(None, false);
    let event = |id: &str| {
        json!({"event": "clicked", "uuid": id, "timestamp": "2026-12-01T10:00:00Z",
               "properties": {"distinct_id": "dev-1", "$device_id": "dev-1", "token": key,
                              "$lib": "web"}})
    };
    let body = json!({"api_key": key, "batch": [event("e-gzip")],
                      "sent_at": "2026-12-01T10:00:01Z"});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.to_string().as_bytes()).unwrap();
    let resp = posthog_post(
        &app,
        "/e/?ip=0&ver=1.449.2",
        "text/plain",
        gz.finish().unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&text(resp).await).unwrap()["status"],
        1
    );
    let b64 = STANDARD.encode(json!([event("e-beacon")]).to_string());
    let form = format!(
        "data={}",
        url::form_urlencoded::byte_serialize(b64.as_bytes()).collect::<String>()
    );
    let resp = posthog_post(
        &app,
        "/batch?compression=base64",
        "application/x-www-form-urlencoded",
        form.clone().into_bytes(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = get(&app, &format!("/i/v0/e/?{form}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let ids: Vec<Value> = sent_events(&app)
        .iter()
        .map(|e| e["message_id"].clone())
        .collect();
    assert_eq!(ids, [json!("e-gzip"), json!("e-beacon"), json!("e-beacon")]);
    for e in sent_events(&app) {
        assert!(!e.to_string().contains(&key), "keys never reach Kafka");
        assert_eq!(e["name"], "clicked");
        assert_eq!(e["context"]["$lib"], "web");
    }
}

#[tokio::test]
async fn posthog_bodies_that_cannot_be_taken_are_4xx_with_the_reason() {
    let (app, key) = app(None, false);
    for (uri, body, status, says) in [
        ("/e/", "not json at all".to_owned(), 400, "neither JSON"),
        (
            "/e/",
            json!({"event": "e", "distinct_id": "d"}).to_string(),
            401,
            "no write key",
        ),
        (
            "/capture/",
            json!({"api_key": key, "batch": [{"distinct_id": "d"}]}).to_string(),
            400,
            "needs an",
        ),
        (
            "/track",
            json!({"api_key": key, "batch": [{"event": "e"}]}).to_string(),
            400,
            "distinct_id is required",
        ),
        (
            "/e/",
            json!({"api_key": "sk_nope", "event": "e", "distinct_id": "d"}).to_string(),
            401,
            "unknown write key",
        ),
    ] {
        let resp = posthog_post(&app, uri, "application/json", body.into_bytes()).await;
        assert_eq!(resp.status().as_u16(), status, "{uri}");
        let body = text(resp).await;
        assert!(body.contains(says), "{uri}: {body}");
    }
    assert!(app.sink.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn posthog_config_and_flags_answer_with_every_feature_off() {
    let (app, _) = app(None, false);
    let config: Value =
        serde_json::from_str(&text(get(&app, "/array/phc_k/config").await).await).unwrap();
    assert_eq!(config["sessionRecording"], false);
    let js = get(&app, "/array/phc_k/config.js").await;
    assert_eq!(js.status(), StatusCode::OK);
    assert!(js.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("application/javascript"));
    assert!(text(js).await.contains("_POSTHOG_REMOTE_CONFIG[\"phc_k\"]"));
    for uri in [
        "/flags/?v=2&config=true",
        "/flags",
        "/decide/?v=3",
        "/decide",
    ] {
        let resp = posthog_post(&app, uri, "text/plain", b"\x1f\x8bgarbage".to_vec()).await;
        assert_eq!(resp.status(), StatusCode::OK, "{uri}");
        let flags: Value = serde_json::from_str(&text(resp).await).unwrap();
        assert_eq!(flags["flags"], json!({}), "{uri}");
        assert_eq!(flags["featureFlags"], json!({}), "{uri}");
    }
}

#[tokio::test]
async fn key_store_down_is_503_not_401() {
    let (app, key) = app(None, true);
    let resp = post(&app, &key, json!({"event": "E", "userId": "u"})).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
    assert!(app.sink.sent.lock().unwrap().is_empty());
}
