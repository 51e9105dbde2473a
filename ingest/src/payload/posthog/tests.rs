//! PostHog's mapping and decoding, on bodies as its SDKs send them.

use super::*;
use chrono::TimeZone;
use std::io::Write;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
}

fn map(v: Value) -> Value {
    let Value::Object(m) = v else { panic!() };
    to_segment(m, now()).unwrap()
}

fn refusal(v: Value) -> Reason {
    let Value::Object(m) = v else { panic!() };
    to_segment(m, now()).unwrap_err().0
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn a_custom_event_is_a_track_with_dollar_properties_in_context() {
    let m = map(json!({
        "event": "Order Completed", "distinct_id": "u-1", "uuid": "0190-a",
        "timestamp": "2026-12-01T11:59:00Z", "sent_at": "2026-12-01T11:59:30Z",
        "type": "capture",
        "properties": {"plan": "pro", "$lib": "posthog-node", "$lib_version": "5.70.0",
                        "$geoip_disable": true}
    }));
    assert_eq!(m["type"], "track");
    assert_eq!(m["event"], "Order Completed");
    assert_eq!(m["anonymousId"], "u-1", "distinct_id is the visitor");
    assert!(m.get("userId").is_none());
    assert_eq!(m["messageId"], "0190-a");
    assert_eq!(m["timestamp"], "2026-12-01T11:59:00Z");
    assert_eq!(m["sentAt"], "2026-12-01T11:59:30Z");
    assert_eq!(m["properties"], json!({"plan": "pro"}));
    assert_eq!(m["context"]["$lib"], "posthog-node");
    assert_eq!(m["context"]["$geoip_disable"], true);
    assert_eq!(m["context"]["library"]["version"], "5.70.0");
    assert_eq!(
        m["context"]["type"], "capture",
        "unknown top-level fields kept"
    );
}

#[test]
fn an_identified_browser_event_is_keyed_by_its_device_with_the_user_id() {
    let m = map(json!({
        "event": "clicked", "uuid": "u",
        "properties": {"distinct_id": "user-9", "$device_id": "dev-1",
                        "$session_id": "s-1", "$current_url": "https://x.example/a?utm_source=n",
                        "$pathname": "/a", "$referrer": "$direct"}
    }));
    assert_eq!(m["anonymousId"], "dev-1");
    assert_eq!(m["userId"], "user-9");
    assert_eq!(m["sessionId"], "s-1");
    assert_eq!(
        m["context"]["page"],
        json!({"url": "https://x.example/a?utm_source=n", "path": "/a"})
    );
    // Before identify, posthog-js's distinct_id is the device id: one visitor, no user.
    let m =
        map(json!({"event": "e", "properties": {"distinct_id": "dev-1", "$device_id": "dev-1"}}));
    assert_eq!(m["anonymousId"], "dev-1");
    assert!(m.get("userId").is_none());
}

#[test]
fn pageview_and_screen_are_page_and_screen() {
    let m = map(json!({"event": "$pageview", "distinct_id": "d",
        "properties": {"$current_url": "https://x.example/p", "title": "Pricing",
                       "$referrer": "https://ref.example/"}}));
    assert_eq!(m["type"], "page");
    assert_eq!(m["context"]["page"]["title"], "Pricing");
    assert_eq!(m["context"]["page"]["referrer"], "https://ref.example/");
    assert_eq!(m["properties"]["title"], "Pricing");
    let m = map(json!({"event": "$screen", "distinct_id": "d",
        "properties": {"$screen_name": "Settings", "tab": "billing"}}));
    assert_eq!(m["type"], "screen");
    assert_eq!(m["name"], "Settings");
    assert_eq!(m["properties"]["tab"], "billing");
}

#[test]
fn identify_takes_set_and_set_once_as_traits_from_the_anonymous_id() {
    let m = map(json!({"event": "$identify", "distinct_id": "user-1",
        "$set": {"plan": "pro"}, "$set_once": {"plan": "free", "first": "2026"},
        "properties": {"$anon_distinct_id": "anon-1", "$device_id": "dev-1"}}));
    assert_eq!(m["type"], "identify");
    assert_eq!(m["userId"], "user-1");
    assert_eq!(m["anonymousId"], "anon-1");
    assert_eq!(
        m["traits"],
        json!({"plan": "pro", "first": "2026"}),
        "$set wins"
    );
    assert_eq!(m["context"]["$set_once"]["plan"], "free", "kept as sent");
    // posthog-node puts $set in properties; without an anonymous id there is none.
    let m = map(json!({"event": "$identify", "distinct_id": "user-1",
        "properties": {"$set": {"name": "Ada"}}}));
    assert_eq!(m["traits"]["name"], "Ada");
    assert!(m.get("anonymousId").is_none());
    let m = map(json!({"event": "$set", "distinct_id": "user-3", "$set": {"a": 1}}));
    assert_eq!(
        (&m["type"], &m["userId"], &m["traits"]["a"]),
        (&json!("identify"), &json!("user-3"), &json!(1))
    );
    // The old /engage/ body has no event name.
    let m = map(json!({"$distinct_id": "user-2", "$set": {"a": 1}}));
    assert_eq!(m["type"], "identify");
    assert_eq!(m["userId"], "user-2");
}

#[test]
fn create_alias_and_groupidentify_are_alias_and_group() {
    let m = map(json!({"event": "$create_alias", "distinct_id": "user-1",
        "properties": {"distinct_id": "user-1", "alias": "old-1"}}));
    assert_eq!(m["type"], "alias");
    assert_eq!(m["userId"], "user-1");
    assert_eq!(m["previousId"], "old-1");
    assert!(m["properties"].get("alias").is_none());
    assert_eq!(
        refusal(json!({"event": "$create_alias", "distinct_id": "u"})),
        Reason::MissingField
    );
    let m = map(
        json!({"event": "$groupidentify", "distinct_id": "$company_c-1",
        "properties": {"$group_type": "company", "$group_key": "c-1",
                       "$group_set": {"name": "Initech"}}}),
    );
    assert_eq!(m["type"], "group");
    assert_eq!(m["groupId"], "c-1");
    assert_eq!(m["traits"]["name"], "Initech");
    assert_eq!(m["context"]["$group_type"], "company");
    assert_eq!(
        refusal(json!({"event": "$groupidentify", "distinct_id": "u"})),
        Reason::MissingField
    );
}

#[test]
fn offset_without_timestamp_is_before_receipt() {
    let m = map(
        json!({"event": "e", "distinct_id": "d", "offset": 1500, "sent_at": "2026-12-01T13:00:00Z"}),
    );
    assert_eq!(m["timestamp"], "2026-12-01T11:59:58.500Z");
    assert!(m.get("sentAt").is_none(), "no second skew correction");
    assert!(m["context"].get("offset").is_none());
    assert_eq!(
        refusal(json!({"event": "e", "distinct_id": "d", "timestamp": null,
                              "offset": i64::MAX})),
        Reason::InvalidTimestamp
    );
}

#[test]
fn events_without_name_or_distinct_id_are_refused_with_a_reason() {
    assert_eq!(refusal(json!({"distinct_id": "d"})), Reason::MissingField);
    assert_eq!(
        refusal(json!({"event": 5, "distinct_id": "d"})),
        Reason::InvalidField
    );
    assert_eq!(refusal(json!({"event": "e"})), Reason::MissingIdentity);
    assert_eq!(
        refusal(json!({"event": "e", "distinct_id": ""})),
        Reason::MissingIdentity
    );
    assert_eq!(
        refusal(json!({"event": "e", "distinct_id": "d", "properties": [1]})),
        Reason::InvalidField
    );
}

fn parse_json(v: Value, query: &str) -> Result<Parsed, PayloadError> {
    let bytes = serde_json::to_vec(&v).unwrap();
    parse(&bytes, query, now(), &Limits::default())
}

#[test]
fn bodies_of_every_shape_parse_and_keys_never_stay_in_messages() {
    let ev = |id: &str| json!({"event": "e", "distinct_id": "d", "uuid": id});
    let batch = parse_json(
        json!({"api_key": "phc_1", "batch": [ev("a"), ev("b")],
                                  "sent_at": "2026-12-01T11:00:00Z"}),
        "",
    )
    .unwrap();
    assert_eq!(batch.write_key.as_deref(), Some("phc_1"));
    assert_eq!(batch.messages.len(), 2);
    assert!(batch.messages.iter().all(|(_, m)| m.sent_at.is_some()));
    let array = parse_json(
        json!([{"event": "e", "distinct_id": "d",
                                   "properties": {"token": "phc_2"}}]),
        "_=1764590400000",
    )
    .unwrap();
    assert_eq!(array.write_key.as_deref(), Some("phc_2"));
    let m = &array.messages[0].1;
    assert!(m.sent_at.is_some(), "sent_at from the query's _");
    assert!(!serde_json::to_string(&m.properties)
        .unwrap()
        .contains("phc_2"));
    assert!(!serde_json::to_string(&m.context).unwrap().contains("phc_2"));
    let single = parse_json(
        json!({"event": "e", "distinct_id": "d", "api_key": "", "token": "phc_3"}),
        "",
    )
    .unwrap();
    assert_eq!(single.write_key.as_deref(), Some("phc_3"));
    let mixed = parse_json(
        json!({"api_key": "k1", "batch": [
        {"event": "e", "distinct_id": "d", "properties": {"token": "k2"}},
        "nope", {"distinct_id": "d"}]}),
        "",
    )
    .unwrap();
    assert_eq!(mixed.other_keys, ["k2"]);
    let reasons: Vec<Reason> = mixed.rejected.iter().map(|r| r.reason).collect();
    assert_eq!(reasons, [Reason::NotAnObject, Reason::MissingField]);
    assert!(parse_json(json!({"batch": {}}), "").is_err());
    assert!(parse_json(json!("x"), "").is_err());
    let deep = "[".repeat(10_000).into_bytes();
    assert!(parse(&deep, "", now(), &Limits::default()).is_err());
}

#[test]
fn gzip_base64_forms_and_query_data_decode() {
    use base64::Engine;
    let limits = Limits::default();
    let json = br#"{"event":"e","distinct_id":"d"}"#;
    let gz = gzip(json);
    // posthog-js 1.449: gzip bytes as text/plain, no parameter, no header.
    assert_eq!(
        decode(&gz, "ver=1.449.2", None, Some("text/plain"), &limits).unwrap(),
        json
    );
    assert_eq!(
        decode(&gz, "compression=gzip-js", None, None, &limits).unwrap(),
        json
    );
    assert_eq!(decode(&gz, "", Some("gzip"), None, &limits).unwrap(), json);
    let b64 = base64::engine::general_purpose::STANDARD.encode(json);
    let form = format!(
        "data={}",
        url::form_urlencoded::byte_serialize(b64.as_bytes()).collect::<String>()
    );
    assert_eq!(
        decode(
            form.as_bytes(),
            "compression=base64",
            None,
            Some("application/x-www-form-urlencoded"),
            &limits
        )
        .unwrap(),
        json
    );
    assert_eq!(
        decode(b64.as_bytes(), "compression=base64", None, None, &limits).unwrap(),
        json
    );
    assert_eq!(
        decode(b"", &form, None, None, &limits).unwrap(),
        json,
        "GET ?data="
    );
    for (body, query, says) in [
        (&b""[..], "", "no event"),
        (&b"hello"[..], "", "neither JSON"),
        (&b"x"[..], "compression=lz64", "lz64"),
        (&gz[..10], "", "gzip"),
    ] {
        let err = decode(body, query, None, None, &limits).unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
    #[test]
    fn any_bytes_decode_and_parse_or_fail_cleanly(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        query in "(compression=(gzip-js|base64|lz64)|data=[a-zA-Z0-9+/=%]{0,40}|_=[0-9]{0,15}|&){0,3}",
    ) {
        let limits = Limits::default();
        if let Ok(json) = decode(&bytes, &query, None, Some("text/plain"), &limits) {
            let _ = parse(&json, &query, now(), &limits);
        }
        let raw = bytes.clone();
        let _ = parse(&raw, &query, now(), &limits);
    }
}
