//! Unit tests of the Segment rules and the typed parse.

use super::*;
use crate::payload::decode_body;
use serde_json::{json, Map};

fn parse_value(v: Value, endpoint: Endpoint) -> Result<Parsed, PayloadError> {
    let bytes = serde_json::to_vec(&v).unwrap();
    parse(&bytes, endpoint, &Limits::default())
}

#[test]
fn track_keeps_unknown_fields_and_strips_the_key() {
    let p = parse_value(
        json!({"event": "Signed Up", "anonymousId": "a1", "writeKey": "sk_x", "plan": "pro",
               "integrations": {"All": true}, "properties": {"x": 1}}),
        Endpoint::Single(Kind::Track),
    )
    .unwrap();
    assert_eq!(p.write_key.as_deref(), Some("sk_x"));
    let m = &p.messages[0].1;
    assert_eq!(m.name.as_deref(), Some("Signed Up"));
    assert_eq!(m.properties.to_object()["plan"], "pro");
    assert_eq!(m.properties.to_object()["x"], 1);
    assert_eq!(m.context.to_object()["integrations"], json!({"All": true}));
    assert!(!m.properties.to_object().contains_key("writeKey"));
}

#[test]
fn batch_accepts_good_messages_and_lists_bad_ones() {
    let p = parse_value(
        json!({"sentAt": "2024-05-01T10:00:00Z", "context": {"library": {"name": "x"}},
               "batch": [
            {"type": "track", "event": "A", "userId": 7},
            {"type": "track", "anonymousId": "a"},
            {"type": "nope", "anonymousId": "a"},
            "string",
            {"type": "alias", "userId": "u", "previousId": "p"},
            {"type": "page", "anonymousId": "a", "timestamp": "yesterday", "messageId": "m5"},
        ]}),
        Endpoint::Batch,
    )
    .unwrap();
    let ok: Vec<usize> = p.messages.iter().map(|(i, _)| *i).collect();
    assert_eq!(ok, [0, 4]);
    assert_eq!(p.messages[0].1.user_id.as_deref(), Some("7"));
    assert_eq!(p.messages[0].1.context.to_object()["library"]["name"], "x");
    assert!(p.messages[0].1.sent_at.is_some());
    let reasons: Vec<Reason> = p.rejected.iter().map(|r| r.reason).collect();
    assert_eq!(
        reasons,
        [
            Reason::MissingField,
            Reason::InvalidType,
            Reason::NotAnObject,
            Reason::InvalidTimestamp
        ]
    );
    assert_eq!(p.rejected[3].message_id.as_deref(), Some("m5"));
}

#[test]
fn keys_named_by_batch_messages_are_collected() {
    let p = parse_value(
        json!({"batch": [
            {"type": "track", "event": "E", "userId": "u", "writeKey": "k1"},
            {"type": "track", "event": "E", "userId": "u", "writeKey": "k2"},
            {"type": "track", "event": "E", "userId": "u", "writeKey": "k1"}]}),
        Endpoint::Batch,
    )
    .unwrap();
    assert_eq!(p.write_key.as_deref(), Some("k1"));
    assert_eq!(p.other_keys, ["k2"]);
    assert!(p
        .messages
        .iter()
        .all(|(_, m)| !m.properties.to_object().contains_key("writeKey")));
    let many: Vec<Value> = (0..10)
        .map(|i| json!({"type": "track", "event": "E", "userId": "u", "writeKey": format!("k{i}")}))
        .collect();
    assert!(parse_value(json!({ "batch": many }), Endpoint::Batch).is_err());
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    let deep = "[".repeat(100_000).into_bytes();
    assert!(matches!(
        parse(&deep, Endpoint::Batch, &Limits::default()),
        Err(PayloadError::BadRequest(_))
    ));
    // Brackets inside strings do not count.
    let p = parse_value(
        json!({"event": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "userId": "u"}),
        Endpoint::Single(Kind::Track),
    );
    assert!(p.is_ok());
}

#[test]
fn oversized_single_message_is_413_and_batch_item_is_rejected() {
    let big = "x".repeat(40_000);
    let err = parse_value(
        json!({"event": "e", "userId": "u", "properties": {"b": big}}),
        Endpoint::Single(Kind::Track),
    )
    .unwrap_err();
    assert!(matches!(err, PayloadError::TooLarge { .. }));
    let p = parse_value(
        json!({"batch": [{"type": "track", "event": "e", "userId": "u", "properties": {"b": big}},
                         {"type": "track", "event": "e", "userId": "u"}]}),
        Endpoint::Batch,
    )
    .unwrap();
    assert_eq!(p.messages.len(), 1);
    assert_eq!(p.rejected[0].reason, Reason::TooLarge);
}

#[test]
fn lone_surrogates_and_numeric_names_are_refused() {
    for body in [
        r#"{"event":"\ud800","userId":"u"}"#,
        r#"{"event":"\udc00x","userId":"u"}"#,
        r#"{"event":"\ud800\u0041","userId":"u"}"#,
    ] {
        let b = body.as_bytes().to_vec();
        assert!(
            matches!(
                parse(&b, Endpoint::Single(Kind::Track), &Limits::default()),
                Err(PayloadError::BadRequest(_))
            ),
            "{body}"
        );
    }
    let pair = br#"{"event":"\ud83d\ude00","userId":"u"}"#.to_vec();
    let p = parse(&pair, Endpoint::Single(Kind::Track), &Limits::default()).unwrap();
    assert_eq!(p.messages[0].1.name.as_deref(), Some("\u{1F600}"));
    let p = parse_value(
        json!({"event": 5, "userId": 7}),
        Endpoint::Single(Kind::Track),
    )
    .unwrap();
    assert_eq!(p.rejected[0].reason, Reason::InvalidField);
}

#[test]
fn repeated_keys_keep_the_last_and_escaped_keys_are_read() {
    let body = r#"{"batch":[{"type":"track","event":5,"event":"E","userId":"u",
        "properties":{"a":1},"properties":{"b":"\u00e9\ud83d\ude00"},
        "c\u006fntext":{"ip":"1.2.3.4","ip":"5.6.7.8"},"plan":"x","plan":"y"}]}"#;
    let p = parse(body.as_bytes(), Endpoint::Batch, &Limits::default()).unwrap();
    let m = &p.messages[0].1;
    assert_eq!(m.name.as_deref(), Some("E"));
    assert_eq!(
        Value::Object(m.properties.to_object()),
        json!({"b": "\u{e9}\u{1F600}", "plan": "y"})
    );
    assert_eq!(m.peeked.ip.as_deref(), Some("5.6.7.8"));
}

#[test]
fn wrong_types_are_refused_field_by_field() {
    for (msg, reason) in [
        (json!({"userId": ["u"]}), Reason::InvalidField),
        (
            json!({"userId": "u", "properties": [1]}),
            Reason::InvalidField,
        ),
        (json!({"userId": "u", "traits": 1}), Reason::InvalidField),
        (json!({"userId": "u", "context": "x"}), Reason::InvalidField),
        (
            json!({"userId": "u", "timestamp": true}),
            Reason::InvalidTimestamp,
        ),
        (
            json!({"userId": "u", "sentAt": {"a": 1}}),
            Reason::InvalidTimestamp,
        ),
        (json!({"userId": "u", "type": 7}), Reason::InvalidType),
        (
            json!({"userId": "u", "event": {"a": 1}}),
            Reason::InvalidField,
        ),
        (json!({"userId": true}), Reason::InvalidField),
    ] {
        let mut m = json!({"type": "track", "event": "E"});
        for (k, v) in msg.as_object().unwrap() {
            m[k] = v.clone();
        }
        let p = parse_value(json!({ "batch": [m] }), Endpoint::Batch).unwrap();
        assert_eq!(p.rejected[0].reason, reason, "{m}");
    }
}

#[test]
fn batch_context_and_leftovers_join_context_under_its_own() {
    let p = parse_value(
        json!({"context": {"library": {"name": "b"}, "sessionId": "s-batch", "locale": "fr"},
               "batch": [{"type": "track", "event": "E", "userId": "u",
                          "context": {"locale": "de"}, "integrations": {"All": false},
                          "name": "n", "extra": 1},
                         {"type": "identify", "userId": "u", "extra": 2, "locale": "x"}]}),
        Endpoint::Batch,
    )
    .unwrap();
    let (track, identify) = (&p.messages[0].1, &p.messages[1].1);
    assert_eq!(
        Value::Object(track.context.to_object()),
        json!({"library": {"name": "b"}, "sessionId": "s-batch", "locale": "de",
               "integrations": {"All": false}})
    );
    assert_eq!(
        Value::Object(track.properties.to_object()),
        json!({"name": "n", "extra": 1})
    );
    assert_eq!(track.session_id.as_deref(), Some("s-batch"));
    let context = identify.context.to_object();
    assert_eq!(
        (&context["extra"], &context["locale"]),
        (&json!(2), &json!("fr"))
    );
}

#[test]
fn every_field_is_read_by_its_name() {
    for f in Field::ALL {
        assert_eq!(Field::of(f.name()), Some(f));
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    #[test]
    fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let limits = Limits::default();
        for endpoint in [Endpoint::Batch, Endpoint::Single(Kind::Track), Endpoint::Single(Kind::Alias)] {
            let b = bytes.clone();
            let _ = parse(&b, endpoint, &limits);
            let _ = decode_body(&bytes, Some("gzip"), None, &limits);
            let _ = decode_body(&bytes, None, Some("application/x-www-form-urlencoded"), &limits);
        }
    }

    #[test]
    fn json_shaped_input_parses_or_fails_cleanly(s in r#"\{("(batch|type|event|userId|anonymousId|timestamp|context|properties)":(\[|\{|"[a-z]*"|[0-9]{1,20}|null|true|-1e999|"2024-01-01T00:00:00Z"),?){0,8}(\]|\})*"#) {
        let limits = Limits::default();
        for endpoint in [Endpoint::Batch, Endpoint::Single(Kind::Page)] {
            let b = s.clone().into_bytes();
            if let Ok(p) = parse(&b, endpoint, &limits) {
                proptest::prop_assert!(p.messages.len() + p.rejected.len() <= limits.max_batch_messages);
            }
        }
    }

    /// Valid JSON of message shape with any value in any field: every message is either
    /// refused with a reason or goes through enrichment and serialisation.
    #[test]
    fn any_message_shape_is_refused_or_enriched_and_serialised(
        batch in proptest::collection::vec(message_strategy(), 0..8)
    ) {
        let body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
        let limits = Limits::default();
        let parsed = parse(&body, Endpoint::Batch, &limits).unwrap();
        proptest::prop_assert_eq!(parsed.messages.len() + parsed.rejected.len(), batch.len());
        let facts = crate::enrich::RequestFacts {
            principal: crate::auth::Principal { key_id: 1, tenant_id: 1, workspace_id: 1 },
            received_at: Utc::now(),
            ip: None,
            user_agent: None,
            max_future: chrono::TimeDelta::days(1),
        };
        let accepted = parsed.messages.len();
        let out = crate::enrich::enrich(parsed.messages.into_iter().map(|(_, m)| m).collect(), &facts);
        proptest::prop_assert_eq!(out.events.len() + out.identities.len(), accepted);
        let records = crate::produce::records(&out).unwrap();
        proptest::prop_assert!(records.len() >= accepted);
    }
}

fn value_strategy() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(Value::from("2024-05-01T10:00:00+02:00")),
        Just(Value::from("0000-01-01T00:00:00Z")),
        Just(Value::from("9999-12-31T23:59:59Z")),
        // Near the ends of chrono's range, as epoch milliseconds.
        Just(Value::from(-8_000_000_000_000_000_i64)),
        Just(Value::from(8_000_000_000_000_000_i64)),
        Just(Value::from(
            "https://x.example/?utm_source=a&utm_campaign=b"
        )),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn message_strategy() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let fields = [
        "type",
        "event",
        "name",
        "messageId",
        "anonymousId",
        "userId",
        "groupId",
        "previousId",
        "sessionId",
        "timestamp",
        "sentAt",
        "properties",
        "traits",
        "context",
        "writeKey",
        "extra",
    ];
    let types = prop_oneof![
        Just(Value::from("track")),
        Just(Value::from("page")),
        Just(Value::from("screen")),
        Just(Value::from("identify")),
        Just(Value::from("alias")),
        Just(Value::from("group")),
    ];
    (
        types,
        proptest::collection::vec(
            (proptest::sample::select(fields.to_vec()), value_strategy()),
            0..10,
        ),
    )
        .prop_map(|(t, pairs)| {
            let mut m = Map::new();
            m.insert("type".into(), t);
            m.insert("anonymousId".into(), Value::from("a"));
            for (k, v) in pairs {
                m.insert(k.to_owned(), v);
            }
            Value::Object(m)
        })
}
