//! The collector's API against the real broker and database: every endpoint and status path,
//! the shape and keys of what lands on each topic, order per visitor, workspace isolation.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_schema::messages::{
    self, EventMessage, IdentityMessage, SessionMessage, VisitorMessage,
};
use sluice_tests::ingest::{
    account, consume, consume_as, post_json, served, served_with, Collector,
};
use sluice_tests::{Stack, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(500);

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

#[tokio::test]
async fn every_endpoint_produces_contract_messages_keyed_by_visitor() {
    let (db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let c = http();
    let sent_at = Utc::now() + chrono::Duration::hours(1); // client clock one hour ahead
    let ts = sent_at - chrono::Duration::seconds(10);
    let ctx = json!({"page": {"url": "https://shop.example/?utm_source=news&utm_campaign=spring", "referrer": "https://search.example/"},
                     "userAgent": "Mozilla/5.0 (compatible; Googlebot/2.1)", "sessionId": "s-1",
                     "os": {"name": "Android", "version": "14"}, "locale": "de-DE"});

    // Basic auth, as the server SDKs send it.
    let r = c
        .post(collector.url("/v1/track"))
        .basic_auth(&key, Some(""))
        .json(
            &json!({"event": "Signed Up", "anonymousId": "a-1", "messageId": "m-track",
                      "timestamp": ts.to_rfc3339(), "sentAt": sent_at.to_rfc3339(), "context": ctx,
                      "properties": {"plan": "pro"}, "extra": 42}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // Bearer.
    for (path, body) in [
        (
            "/v1/page",
            json!({"name": "Home", "anonymousId": "a-1", "messageId": "m-page", "context": ctx}),
        ),
        (
            "/v1/screen",
            json!({"name": "Settings", "userId": "u-9", "messageId": "m-screen"}),
        ),
        (
            "/v1/group",
            json!({"groupId": "g-1", "anonymousId": "a-1", "traits": {"size": 5}, "messageId": "m-group"}),
        ),
        (
            "/v1/identify",
            json!({"anonymousId": "a-1", "userId": "u-1", "traits": {"email": "x@example.com"}, "messageId": "m-identify"}),
        ),
        (
            "/v1/alias",
            json!({"previousId": "a-1", "userId": "u-1", "messageId": "m-alias"}),
        ),
    ] {
        let r = post_json(&c, collector.url(path), &key, &body)
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "{path}: {}",
            r.text().await.unwrap()
        );
    }
    // writeKey in the body, as analytics.js sends it, on a batch.
    let r = c
        .post(collector.url("/v1/batch"))
        .json(&json!({"writeKey": key, "batch": [
            {"type": "track", "event": "Clicked", "anonymousId": "a-2", "messageId": "m-b1"},
            {"type": "track", "anonymousId": "a-2"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["reason"], "missing_field");

    let brokers = &Stack::get().kafka_brokers;
    let events = consume(brokers, &collector.topics.event, 5, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(events.len(), 5, "track, page, screen, group, batch track");
    let by_id: HashMap<String, (String, EventMessage)> = events
        .iter()
        .map(|c| {
            let msg: EventMessage =
                messages::decode(&serde_json::to_vec(&c.value).unwrap()).unwrap();
            (msg.message_id.clone(), (c.key.clone(), msg))
        })
        .collect();
    let (track_key, track) = &by_id["m-track"];
    assert_eq!(track_key, &format!("{}/a-1", acct.tenant_id));
    assert_eq!(track.tenant_id, acct.tenant_id);
    assert_eq!(track.workspace_id, acct.workspace_id);
    assert_eq!(
        track.event_id,
        messages::event_id(acct.tenant_id, "m-track")
    );
    assert_eq!(track.name.as_deref(), Some("Signed Up"));
    assert_eq!(track.properties["plan"], "pro");
    assert_eq!(
        track.properties["extra"], 42,
        "unknown top-level fields are kept"
    );
    assert_eq!(track.session_id.as_deref(), Some("s-1"));
    assert!(track.bot, "Googlebot is flagged");
    assert_eq!(track.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(track.context["campaign"]["source"], "news");
    assert_eq!(
        track.timestamp.map(|t| t.timestamp_millis()),
        Some(ts.timestamp_millis())
    );
    // The client's clock was an hour ahead: occurred_at is about 10 s before receipt.
    let lag = track.received_at - track.occurred_at;
    assert!(
        (lag.num_milliseconds() - 10_000).abs() < 1_000,
        "skew corrected, lag {lag}"
    );
    let (screen_key, screen) = &by_id["m-screen"];
    assert_eq!(
        screen_key,
        &format!("{}/u-9", acct.tenant_id),
        "user id keys when no anonymous id"
    );
    assert_eq!(screen.kind, messages::EventType::Screen);
    assert_eq!(by_id["m-group"].1.properties["groupId"], "g-1");
    assert_eq!(by_id["m-page"].1.name.as_deref(), Some("Home"));
    assert!(!by_id["m-b1"].1.bot);

    let ids: Vec<IdentityMessage> =
        consume_as(brokers, &collector.topics.identity, 2, WAIT, LINGER)
            .await
            .unwrap();
    assert_eq!(ids.len(), 2);
    // The email left the traits and travels sealed, under the collector's active key.
    let identify = ids
        .iter()
        .find(|m| m.kind == messages::IdentityKind::Identify)
        .unwrap();
    assert_eq!(identify.v, messages::IDENTITY_VERSION);
    assert!(
        !identify.traits.contains_key("email"),
        "{:?}",
        identify.traits
    );
    let sealed = identify.pii.as_ref().unwrap();
    let (ciphertext, fingerprint) = sealed.email.as_ref().unwrap().decode().unwrap();
    let keys = sluice_tests::ingest::test_pii_keys();
    assert_eq!(
        keys.decrypt(&sealed.key_id, &ciphertext).unwrap(),
        b"x@example.com"
    );
    assert_eq!(
        fingerprint.as_deref(),
        keys.fingerprint_email("x@example.com")
            .as_ref()
            .map(|f| &f[..])
    );
    assert!(ids.iter().any(
        |m| m.kind == messages::IdentityKind::Alias && m.previous_id.as_deref() == Some("a-1")
    ));

    let visitors = consume(brokers, &collector.topics.visitor, 6, WAIT, LINGER)
        .await
        .unwrap();
    let v: Vec<VisitorMessage> = visitors
        .iter()
        .map(|c| serde_json::from_value(c.value.clone()).unwrap())
        .collect();
    let first = v
        .iter()
        .find(|v| v.anonymous_id == "a-1" && v.first_touch.utm.get("source").is_some())
        .unwrap();
    assert_eq!(first.first_touch.utm["campaign"], "spring");
    assert_eq!(
        first.first_touch.referrer.as_deref(),
        Some("https://search.example/")
    );
    assert!(visitors
        .iter()
        .all(|c| c.key.starts_with(&format!("{}/a-", acct.tenant_id))));

    let s: Vec<SessionMessage> = consume_as(brokers, &collector.topics.session, 2, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(s.len(), 2, "track and page each carried session s-1");
    assert!(s.iter().all(|s| s.session_id == "s-1"));
    assert_eq!(s.iter().map(|s| s.page_count).sum::<i64>(), 1);
    // Device and location, picked from the context as they were sent.
    for s in &s {
        assert_eq!(
            Value::Object(s.device.clone()),
            json!({"os": {"name": "Android", "version": "14"},
                   "userAgent": "Mozilla/5.0 (compatible; Googlebot/2.1)"})
        );
        assert_eq!(Value::Object(s.geo.clone()), json!({"locale": "de-DE"}));
    }

    // last_used_at is written in the background.
    let client = db.client().await.unwrap();
    let mut used: Option<DateTime<Utc>> = None;
    for _ in 0..50 {
        used = client
            .query_one(
                "SELECT last_used_at FROM api_key WHERE id = $1",
                &[&acct.key.id],
            )
            .await
            .unwrap()
            .get(0);
        if used.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(used.is_some(), "last_used_at set");
    let metrics = collector.metrics().await.unwrap();
    assert!(
        metrics.contains("sluice_ingest_requests_total{endpoint=\"track\",status=\"200\"}"),
        "{metrics}"
    );
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn status_paths_400_401_403_413() {
    let (db, acct, collector) = served_with("acme", |config| {
        config.key_cache_ttl_ms = 300;
    })
    .await
    .unwrap();
    let key = acct.key.plaintext.clone();
    let c = http();
    let track = json!({"event": "E", "userId": "u"});
    let post = |path: &str| c.post(collector.url(path));
    let send = |path: &str, key: &str, body: &Value| post(path).bearer_auth(key).json(body).send();

    let r = post("/v1/track").json(&track).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no key");
    assert!(
        r.text().await.unwrap().contains("Basic"),
        "says how to send a key"
    );
    let r = send(
        "/v1/track",
        "sk_0000000000000000000000000000000000000000",
        &track,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "unknown key");
    let r = send("/v1/track", "not-a-key", &track).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "malformed key");

    let r = post("/v1/track")
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = send("/v1/track", &key, &json!({"userId": "u"}))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "track without event");
    let r = send(
        "/v1/batch",
        &key,
        &json!({"batch": [{"type": "bogus", "userId": "u"}]}),
    )
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "batch of only bad messages"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["rejected"][0]["reason"], "invalid_type");

    let big = "x".repeat(40_000);
    let r = send(
        "/v1/track",
        &key,
        &json!({"event": "E", "userId": "u", "properties": {"b": big}}),
    )
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "message over 32 KB"
    );
    let batch: Vec<Value> = (0..20).map(|_| json!({"type": "track", "event": "E", "userId": "u", "properties": {"b": "y".repeat(30_000)}})).collect();
    let r = send("/v1/batch", &key, &json!({"batch": batch}))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "request over 500 KB"
    );

    // Expired key.
    let client = db.client().await.unwrap();
    let expiring = sluice_schema::control::create_key(&client, acct.workspace_id, None)
        .await
        .unwrap();
    client
        .execute(
            "UPDATE api_key SET expires_at = created_at + interval '1 millisecond' WHERE id = $1",
            &[&expiring.id],
        )
        .await
        .unwrap();
    let r = send("/v1/track", &expiring.plaintext, &track)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "expired");
    assert!(r.text().await.unwrap().contains("expired"));

    // Revoked key: works, is revoked, stops within the cache TTL.
    let r = send("/v1/track", &key, &track).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    sluice_schema::control::revoke_key(&client, acct.key.id)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = send("/v1/track", &key, &track).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "revoked");
    assert!(r.text().await.unwrap().contains("revoked"));
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn over_the_rate_limit_answers_429_with_retry_after() {
    let (db, acct, collector) = served_with("acme", |config| {
        config.rate_limit_per_key_per_second = 1;
        config.rate_limit_burst_messages = 3;
    })
    .await
    .unwrap();
    let c = http();
    let batch = json!({"batch": [
        {"type": "track", "event": "E", "userId": "u"},
        {"type": "track", "event": "E", "userId": "u"},
        {"type": "track", "event": "E", "userId": "u"}]});
    let r = post_json(&c, collector.url("/v1/batch"), &acct.key.plaintext, &batch)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post_json(&c, collector.url("/v1/batch"), &acct.key.plaintext, &batch)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "retry after {retry}");
    // Another key has its own bucket.
    let client = db.client().await.unwrap();
    let other = sluice_schema::control::create_key(&client, acct.workspace_id, None)
        .await
        .unwrap();
    let r = post_json(&c, collector.url("/v1/batch"), &other.plaintext, &batch)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn gzip_beacon_form_pixel_and_cors_are_accepted() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let key = acct.key.plaintext.clone();
    let c = http();

    let body = serde_json::to_vec(&json!({"batch": [{"type": "track", "event": "Zipped", "anonymousId": "z", "messageId": "m-gz"}]})).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&body).unwrap();
    let r = c
        .post(collector.url("/v1/batch"))
        .bearer_auth(&key)
        .header("content-encoding", "gzip")
        .header("content-type", "application/json")
        .body(enc.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "gzip");

    // A gzip bomb: 200 KB compressed to a few hundred bytes... of 5 MB.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![b' '; 5_000_000]).unwrap();
    let r = c
        .post(collector.url("/v1/batch"))
        .bearer_auth(&key)
        .header("content-encoding", "gzip")
        .body(enc.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "decompressed size is capped"
    );

    // navigator.sendBeacon: text/plain, key in the body, short path of analytics.js.
    let beacon =
        json!({"writeKey": key, "event": "Beacon", "anonymousId": "b", "messageId": "m-beacon"})
            .to_string();
    let r = c
        .post(collector.url("/v1/t"))
        .header("content-type", "text/plain;charset=UTF-8")
        .body(beacon)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "beacon");

    // base64 form body.
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD.encode(
        json!({"writeKey": key, "name": "Form", "anonymousId": "f", "messageId": "m-form"})
            .to_string()
            .as_bytes(),
    );
    let r = c
        .post(collector.url("/v1/page"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "data={}",
            data.replace('+', "%2B")
                .replace('=', "%3D")
                .replace('/', "%2F")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "form: {}",
        r.text().await.unwrap()
    );

    // Pixel.
    let r = c.get(collector.url(&format!("/v1/p.gif?k={key}&e=Opened&a=p&m=m-pixel&url=https%3A%2F%2Fx.example%2F%3Futm_medium%3Demail&campaign_id=c7")))
        .send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/gif");
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("no-store"));
    let gif = r.bytes().await.unwrap();
    assert!(gif.starts_with(b"GIF89a"));
    let r = c
        .get(collector.url("/v1/p.gif?e=Opened&a=p"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "pixel without k");

    // CORS preflight.
    let r = c
        .request(reqwest::Method::OPTIONS, collector.url("/v1/batch"))
        .header("origin", "https://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let events = collector
        .consume(&collector.topics.event, 4, WAIT, LINGER)
        .await
        .unwrap();
    let mut got: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e.value["message_id"].as_str().unwrap().to_owned(),
                e.value["type"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("m-beacon".into(), "track".into()),
            ("m-form".into(), "page".into()),
            ("m-gz".into(), "track".into()),
            ("m-pixel".into(), "pixel".into())
        ]
    );
    let pixel = events
        .iter()
        .find(|e| e.value["message_id"] == "m-pixel")
        .unwrap();
    assert_eq!(pixel.value["name"], "Opened");
    assert_eq!(pixel.value["properties"]["campaign_id"], "c7");
    assert_eq!(pixel.value["context"]["campaign"]["medium"], "email");
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn a_500_message_batch_arrives_in_order_per_visitor() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let batch: Vec<Value> = (0..500)
        .map(|i| {
            json!({"type": "track", "event": "Step", "anonymousId": format!("v-{}", i % 10),
                        "messageId": format!("m-{i}"), "properties": {"seq": i}})
        })
        .collect();
    let r = http()
        .post(collector.url("/v1/batch"))
        .bearer_auth(&acct.key.plaintext)
        .json(&json!({"batch": batch}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let events = collector
        .consume(&collector.topics.event, 500, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(events.len(), 500, "all acknowledged messages, once each");
    let mut last: HashMap<String, (i32, i64)> = HashMap::new();
    for e in &events {
        let seq = e.value["properties"]["seq"].as_i64().unwrap();
        if let Some((partition, prev)) = last.get(&e.key) {
            assert_eq!(*partition, e.partition, "one visitor, one partition");
            assert!(seq > *prev, "order kept for {}: {seq} after {prev}", e.key);
        }
        last.insert(e.key.clone(), (e.partition, seq));
    }
    assert_eq!(last.len(), 10);
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_of_workspace_a_cannot_write_into_workspace_b() {
    let db = TestDb::migrated().await.unwrap();
    let a = account(&db, "tenant-a").await.unwrap();
    let b = account(&db, "tenant-b").await.unwrap();
    let collector = Collector::start(Collector::config(&db)).await.unwrap();
    let c = http();
    // Authenticated as A, naming B's key in the body: refused, nothing produced.
    let r = c.post(collector.url("/v1/track")).bearer_auth(&a.key.plaintext)
        .json(&json!({"writeKey": b.key.plaintext, "event": "E", "anonymousId": "x", "messageId": "m-cross"}))
        .send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // The same with a key on one message of a batch.
    let r = c
        .post(collector.url("/v1/batch"))
        .bearer_auth(&a.key.plaintext)
        .json(&json!({"batch": [
            {"type": "track", "event": "E", "anonymousId": "x", "messageId": "m-cross-1"},
            {"type": "track", "event": "E", "anonymousId": "x", "messageId": "m-cross-2", "writeKey": b.key.plaintext}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a batch message naming B's key"
    );
    // Tenant or workspace ids in the body are data, not identity.
    let r = c.post(collector.url("/v1/track")).bearer_auth(&a.key.plaintext)
        .json(&json!({"event": "E", "anonymousId": "x", "messageId": "m-a", "tenant_id": b.tenant_id, "workspace_id": b.workspace_id}))
        .send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // analytics.js in batching mode: the key only on each message, no header.
    let r = c
        .post(collector.url("/v1/b"))
        .header("content-type", "text/plain")
        .body(json!({"batch": [{"type": "track", "event": "E", "anonymousId": "y", "messageId": "m-b", "writeKey": b.key.plaintext}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let events = collector
        .consume(&collector.topics.event, 2, WAIT, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "the refused requests produced nothing");
    let a_event = events
        .iter()
        .find(|e| e.value["message_id"] == "m-a")
        .unwrap();
    assert_eq!(a_event.value["tenant_id"], a.tenant_id);
    assert_eq!(a_event.value["workspace_id"], a.workspace_id);
    assert_eq!(a_event.key, format!("{}/x", a.tenant_id));
    let b_event = events
        .iter()
        .find(|e| e.value["message_id"] == "m-b")
        .unwrap();
    assert_eq!(b_event.value["workspace_id"], b.workspace_id);
    assert!(
        b_event.value["properties"].get("writeKey").is_none(),
        "keys never reach Kafka"
    );
    collector.stop().await.unwrap();
}

/// Without PII keys the collector cannot seal, so an identify carrying an email is refused
/// (never produced in plaintext), while one without personal traits goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pii_keys_an_identify_with_an_email_is_refused_not_produced() {
    let (_db, acct, collector) = served_with("nokeys", |config| {
        config.pii_args.pii_keys = String::new();
        config.pii_args.pii_active_key = String::new();
    })
    .await
    .unwrap();
    let body = json!({"batch": [
        {"type": "identify", "userId": "u-nk", "messageId": "m-nk-1", "traits": {"email": "nokeys@example.com"}},
        {"type": "identify", "userId": "u-nk", "messageId": "m-nk-2", "traits": {"plan": "pro"}},
    ]});
    let url = collector.url("/v1/batch");
    let r = post_json(&http(), url, &acct.key.plaintext, &body)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(
        answer["rejected"][0]["reason"], "pii_keys_missing",
        "{answer}"
    );
    assert_eq!(answer["rejected"][0]["index"], 0, "{answer}");
    let ids = collector
        .consume(&collector.topics.identity, 1, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(ids[0].value["message_id"], "m-nk-2");
    assert!(
        !ids[0].value.to_string().contains("nokeys@"),
        "{:?}",
        ids[0].value
    );
    collector.stop().await.unwrap();
}

/// A fleet-wide figure is shared out: 20 messages/s for the fleet over 10 collectors is 2 a
/// second here, so with the per-collector setting left at its 5,000 a burst of 3 is all this
/// collector lets through and the next message is refused (429, `Retry-After: 1`: one token
/// at 2 a second), where the per-collector 5,000 would have refilled it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rate_limit_is_enforced_as_this_collectors_share() {
    let (_db, acct, collector) = served_with("fleet", |config| {
        config.rate_limit_per_key_per_second_fleet = Some(20);
        config.collectors = 10;
        config.rate_limit_burst_messages = 3;
        assert_eq!(config.rate_limit_per_collector(), 2);
    })
    .await
    .unwrap();
    let c = http();
    let batch = |n: usize| json!({"batch": (0..n).map(|_| json!({"type": "track", "event": "E", "userId": "u"})).collect::<Vec<_>>()});
    let (url, key) = (collector.url("/v1/batch"), &acct.key.plaintext);
    let r = post_json(&c, &url, key, &batch(3)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post_json(&c, &url, key, &batch(1)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    collector.stop().await.unwrap();
}
