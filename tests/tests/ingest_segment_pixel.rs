//! Segment's pixel API against the real broker and database: `GET /v1/pixel/<type>?data=`
//! with the base64 of a whole API message (write key inside) stores that message like a POST
//! of it would, answers a no-cache 1x1 GIF, and refuses bad data with a 4xx that says why.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_schema::messages::{self, EventMessage, EventType, IdentityKind, IdentityMessage};
use sluice_tests::ingest::{consume, served};
use sluice_tests::Stack;

const WAIT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(500);

/// `data` as a query value: standard base64 percent-encoded, the way `encodeURIComponent`
/// would leave it.
fn escaped(data: &str) -> String {
    data.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

#[tokio::test]
async fn segment_pixel_track_and_identify_arrive_with_their_fields() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();

    // Segment's documented example, with our key: an email open.
    let track = json!({"writeKey": key, "userId": "user_123", "event": "Email Opened",
        "messageId": "m-pixel-track", "timestamp": "2024-05-01T10:00:00Z",
        "properties": {"subject": "The Electric Daily ?>?~~~", "issue": 7},
        "context": {"campaign": {"name": "spring"}}});
    let identify = json!({"writeKey": key, "anonymousId": "anon-px", "userId": "user_123",
        "messageId": "m-pixel-identify", "traits": {"plan": "pro"}});
    for url in [
        collector.url(&format!(
            "/v1/pixel/track?data={}",
            escaped(&STANDARD.encode(track.to_string()))
        )),
        collector.url(&format!(
            "/v1/pixel/identify?data={}",
            URL_SAFE_NO_PAD.encode(identify.to_string())
        )),
    ] {
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        assert_eq!(r.headers()["content-type"], "image/gif");
        assert!(r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("no-store"));
        assert!(r.bytes().await.unwrap().starts_with(b"GIF89a"));
    }

    let brokers = &Stack::get().kafka_brokers;
    let events = consume(brokers, &collector.topics.event, 1, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].key, format!("{}/user_123", acct.tenant_id));
    let value = &events[0].value;
    assert!(!value.to_string().contains(&key), "keys never reach Kafka");
    let msg: EventMessage = messages::decode(&serde_json::to_vec(value).unwrap()).unwrap();
    assert_eq!(msg.kind, EventType::Track);
    assert_eq!(msg.message_id, "m-pixel-track");
    assert_eq!(
        msg.event_id,
        messages::event_id(acct.tenant_id, "m-pixel-track")
    );
    assert_eq!(msg.workspace_id, acct.workspace_id);
    assert_eq!(msg.name.as_deref(), Some("Email Opened"));
    assert_eq!(msg.user_id.as_deref(), Some("user_123"));
    assert_eq!(msg.properties["subject"], "The Electric Daily ?>?~~~");
    assert_eq!(msg.properties["issue"], 7);
    assert_eq!(msg.context["campaign"]["name"], "spring");
    assert_eq!(
        msg.timestamp.map(|t| t.to_rfc3339()),
        Some("2024-05-01T10:00:00+00:00".into())
    );

    let ids = consume(brokers, &collector.topics.identity, 1, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(ids.len(), 1);
    let id: IdentityMessage = serde_json::from_value(ids[0].value.clone()).unwrap();
    assert_eq!(id.kind, IdentityKind::Identify);
    assert_eq!(id.message_id, "m-pixel-identify");
    assert_eq!(id.anonymous_id.as_deref(), Some("anon-px"));
    assert_eq!(id.traits["plan"], "pro");
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn segment_pixel_bad_data_is_refused_with_a_reason_and_stores_nothing() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let http = reqwest::Client::new();
    let b64 = |v: Value| escaped(&STANDARD.encode(v.to_string()));

    for (query, status, says) in [
        ("data=%25%25%25".to_owned(), 400, "not base64"),
        ("data=****".to_owned(), 400, "not base64"),
        (String::new(), 400, "no data field"),
        (
            format!("data={}", escaped(&STANDARD.encode("{\"writeKey\":"))),
            400,
            "not valid",
        ),
        (
            format!("data={}", escaped(&STANDARD.encode("[1, 2]"))),
            400,
            "not an object",
        ),
        (
            format!("data={}", b64(json!({"writeKey": key, "userId": "u"}))),
            400,
            "event name",
        ),
        (
            format!("data={}", b64(json!({"event": "E", "userId": "u"}))),
            401,
            "no write key",
        ),
        (
            format!(
                "data={}",
                b64(
                    json!({"writeKey": "sk_nothere_0123456789abcdef0123456789abcdef",
                           "event": "E", "userId": "u"})
                )
            ),
            401,
            "unknown write key",
        ),
    ] {
        let r = http
            .get(collector.url(&format!("/v1/pixel/track?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{query}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["success"], false);
        let error = body["error"].as_str().unwrap();
        let detail = body["rejected"].to_string();
        assert!(
            error.contains(says) || detail.contains(says),
            "{query}: {body}"
        );
    }

    let events = collector
        .consume(
            &collector.topics.event,
            1,
            Duration::from_secs(3),
            Duration::ZERO,
        )
        .await
        .unwrap();
    assert!(events.is_empty(), "{events:?}");
    collector.stop().await.unwrap();
}
