//! The Segment rules: a parsed body of one endpoint to its messages, each checked per call
//! type (ids, names, times, required fields) and taken apart; refusals carry their reason.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::{Map, Value};
use sluice_schema::messages::JsonObject;

use super::json::{json_size_object, parse_json};
use super::{Endpoint, Kind, Limits, Message, Parsed, PayloadError, Reason};

/// Parses a JSON body of `endpoint` into messages. A malformed body is a 400; a batch's bad
/// messages are refused one by one while the good ones go on.
pub fn parse(json: &mut [u8], endpoint: Endpoint, limits: &Limits) -> Result<Parsed, PayloadError> {
    let Value::Object(mut body) = parse_json(json, limits.max_json_depth)? else {
        return Err(PayloadError::BadRequest("the JSON is not an object".into()));
    };
    let write_key = match body.remove("writeKey") {
        Some(Value::String(key)) => Some(key),
        _ => None,
    };
    let mut parsed = Parsed {
        write_key,
        ..Parsed::default()
    };
    match endpoint {
        Endpoint::Single(kind) | Endpoint::SegmentPixel(kind) => {
            let checked = validate(
                Value::Object(body),
                Some(kind),
                &Defaults::default(),
                limits,
            );
            if matches!(&checked, Err((Reason::TooLarge, _))) {
                return Err(PayloadError::TooLarge {
                    what: "message",
                    limit: limits.max_message_bytes,
                });
            }
            parsed.push(0, None, checked);
        }
        Endpoint::PostHog => {
            return Err(PayloadError::BadRequest(
                "a PostHog body is parsed by posthog::parse".into(),
            ))
        }
        Endpoint::Batch => parse_batch(body, &mut parsed, limits)?,
    }
    Ok(parsed)
}

/// A batch body's messages into `parsed`, each on its own: a bad one is refused, the rest go on.
fn parse_batch(
    mut body: Map<String, Value>,
    parsed: &mut Parsed,
    limits: &Limits,
) -> Result<(), PayloadError> {
    let Some(Value::Array(batch)) = body.remove("batch") else {
        return Err(PayloadError::BadRequest(
            "a batch body needs a \"batch\" array of messages".into(),
        ));
    };
    if batch.len() > limits.max_batch_messages {
        return Err(PayloadError::TooLarge {
            what: "batch (in messages, not bytes)",
            limit: limits.max_batch_messages,
        });
    }
    let defaults = Defaults {
        context: match body.remove("context") {
            Some(Value::Object(c)) => Some(c),
            _ => None,
        },
        sent_at: body
            .get("sentAt")
            .and_then(|v| parse_time(v).ok().flatten()),
    };
    for (index, item) in batch.into_iter().enumerate() {
        if let Some(key) = item.get("writeKey").and_then(Value::as_str) {
            parsed.note_key(key, "write keys")?;
        }
        let message_id = item
            .get("messageId")
            .and_then(Value::as_str)
            .filter(|id| id.len() <= limits.max_id_bytes)
            .map(str::to_owned);
        parsed.push(index, message_id, validate(item, None, &defaults, limits));
    }
    Ok(())
}

/// What a batch gives each of its messages unless the message says otherwise.
#[derive(Debug, Default)]
pub struct Defaults {
    /// The batch's `context`, under each message's own.
    pub context: Option<JsonObject>,
    /// The batch's `sentAt`.
    pub sent_at: Option<DateTime<Utc>>,
}

type Refusal = (Reason, String);

/// Top-level fields of the SDKs' envelope that are about delivery, not the event: kept in
/// `context` under their own names.
const ENVELOPE: [&str; 5] = ["integrations", "channel", "_metadata", "version", "library"];

/// Checks one message and takes it apart. `kind` is the endpoint's kind; `None` in a batch,
/// where the message's `type` says.
pub fn validate(
    value: Value,
    kind: Option<Kind>,
    defaults: &Defaults,
    limits: &Limits,
) -> Result<Message, Refusal> {
    let Value::Object(mut m) = value else {
        return Err((
            Reason::NotAnObject,
            "a message must be a JSON object".into(),
        ));
    };
    let size = json_size_object(&m);
    if size > limits.max_message_bytes {
        return Err((
            Reason::TooLarge,
            format!(
                "message is {size} bytes, over the limit of {}",
                limits.max_message_bytes
            ),
        ));
    }
    let kind = kind_of(&mut m, kind)?;
    let id = |m: &mut Map<String, Value>, field: &str| take_string(m, field, limits.max_id_bytes);
    let message_id = id(&mut m, "messageId")?;
    let anonymous_id = id(&mut m, "anonymousId")?;
    let user_id = id(&mut m, "userId")?;
    let group_id = id(&mut m, "groupId")?;
    let previous_id = id(&mut m, "previousId")?;
    let session_id = id(&mut m, "sessionId")?;
    let name_field = if kind == Kind::Track { "event" } else { "name" };
    if m.get(name_field).is_some_and(Value::is_number) {
        return Err((
            Reason::InvalidField,
            format!("{name_field} must be a string"),
        ));
    }
    let name = take_string(&mut m, name_field, limits.max_name_bytes)?;
    let timestamp = take_time(&mut m, "timestamp")?;
    let sent_at = take_time(&mut m, "sentAt")?.or(defaults.sent_at);
    let mut properties = take_object(&mut m, "properties")?;
    let traits = take_object(&mut m, "traits")?;
    let mut context = take_object(&mut m, "context")?;
    if let Some(batch_context) = &defaults.context {
        for (k, v) in batch_context {
            context.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let session_id = session_id.or_else(|| session_of_context(&context, limits));
    // A key must never travel on into Kafka or the database.
    m.remove("writeKey");
    // Leftover top-level fields are kept, never dropped silently (docs/architecture.md §4.2).
    for (k, v) in m {
        if ENVELOPE.contains(&k.as_str()) || matches!(kind, Kind::Identify | Kind::Alias) {
            context.entry(k).or_insert(v);
        } else {
            properties.entry(k).or_insert(v);
        }
    }
    let message = Message {
        kind,
        message_id,
        anonymous_id,
        user_id,
        session_id,
        name,
        group_id,
        previous_id,
        timestamp,
        sent_at,
        properties,
        traits,
        context,
    };
    required_fields(&message)?;
    Ok(message)
}

/// The message's kind: the endpoint's, else (in a batch) the one its `type` names. `type` is
/// removed either way.
fn kind_of(m: &mut Map<String, Value>, endpoint_kind: Option<Kind>) -> Result<Kind, Refusal> {
    let type_field = m.remove("type");
    match endpoint_kind {
        Some(kind) => Ok(kind),
        None => type_field
            .as_ref()
            .and_then(Value::as_str)
            .and_then(Kind::from_type)
            .ok_or_else(|| {
                (
                    Reason::InvalidType,
                    "type must be one of track, page, screen, identify, alias, group".into(),
                )
            }),
    }
}

/// The session id SDKs put in `context` (`sessionId` or `session_id`) when the message has none.
fn session_of_context(context: &JsonObject, limits: &Limits) -> Option<String> {
    match context
        .get("sessionId")
        .or_else(|| context.get("session_id"))
    {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= limits.max_id_bytes => {
            Some(s.clone())
        }
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// What each call type cannot do without.
fn required_fields(m: &Message) -> Result<(), Refusal> {
    let missing = |detail: &str| Err((Reason::MissingField, detail.to_owned()));
    match m.kind {
        Kind::Alias if m.user_id.is_none() || m.previous_id.is_none() => {
            missing("alias needs userId and previousId")
        }
        Kind::Alias => Ok(()),
        _ if m.anonymous_id.is_none() && m.user_id.is_none() => Err((
            Reason::MissingIdentity,
            "anonymousId or userId is required".into(),
        )),
        Kind::Track if m.name.is_none() => missing("track needs an event name in \"event\""),
        Kind::Group if m.group_id.is_none() => missing("group needs a groupId"),
        _ => Ok(()),
    }
}

/// A client time field (`timestamp`, `sentAt`), removed from the message.
fn take_time(m: &mut Map<String, Value>, field: &str) -> Result<Option<DateTime<Utc>>, Refusal> {
    match m.remove(field) {
        Some(v) => parse_time(&v).map_err(|()| {
            (
                Reason::InvalidTimestamp,
                format!("{field} must be RFC 3339 or epoch milliseconds"),
            )
        }),
        None => Ok(None),
    }
}

/// An id or name field: a non-empty string (numbers are accepted and kept as text, as some
/// SDKs send numeric user ids); absent or null is `None`.
fn take_string(
    m: &mut Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, Refusal> {
    let s = match m.remove(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err((Reason::InvalidField, format!("{field} must be a string"))),
    };
    if s.is_empty() {
        // An empty id is the same as none (analytics.js sends "" for a missing userId).
        return Ok(None);
    }
    if s.len() > max {
        return Err((
            Reason::FieldTooLong,
            format!("{field} is longer than {max} bytes"),
        ));
    }
    Ok(Some(s))
}

fn take_object(m: &mut Map<String, Value>, field: &str) -> Result<JsonObject, Refusal> {
    match m.remove(field) {
        None | Some(Value::Null) => Ok(JsonObject::new()),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err((
            Reason::InvalidField,
            format!("{field} must be a JSON object"),
        )),
    }
}

/// A client time: RFC 3339 text, or epoch milliseconds. `Ok(None)` for null.
fn parse_time(v: &Value) -> Result<Option<DateTime<Utc>>, ()> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| ()),
        Value::Number(n) => n
            .as_i64()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            // The same years RFC 3339 can say (0 to 9999), not chrono's ±262,000.
            .filter(|t| (0..=9999).contains(&t.year()))
            .map(Some)
            .ok_or(()),
        _ => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::decode_body;
    use serde_json::json;

    fn parse_value(v: Value, endpoint: Endpoint) -> Result<Parsed, PayloadError> {
        let mut bytes = serde_json::to_vec(&v).unwrap();
        parse(&mut bytes, endpoint, &Limits::default())
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
        assert_eq!(m.properties["plan"], "pro");
        assert_eq!(m.properties["x"], 1);
        assert_eq!(m.context["integrations"], json!({"All": true}));
        assert!(!m.properties.contains_key("writeKey"));
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
        assert_eq!(p.messages[0].1.context["library"]["name"], "x");
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
            .all(|(_, m)| !m.properties.contains_key("writeKey")));
        let many: Vec<Value> = (0..10)
            .map(|i| json!({"type": "track", "event": "E", "userId": "u", "writeKey": format!("k{i}")}))
            .collect();
        assert!(parse_value(json!({ "batch": many }), Endpoint::Batch).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        let mut deep = "[".repeat(100_000).into_bytes();
        assert!(matches!(
            parse(&mut deep, Endpoint::Batch, &Limits::default()),
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
            let mut b = body.as_bytes().to_vec();
            assert!(
                matches!(
                    parse(&mut b, Endpoint::Single(Kind::Track), &Limits::default()),
                    Err(PayloadError::BadRequest(_))
                ),
                "{body}"
            );
        }
        let mut pair = br#"{"event":"\ud83d\ude00","userId":"u"}"#.to_vec();
        let p = parse(&mut pair, Endpoint::Single(Kind::Track), &Limits::default()).unwrap();
        assert_eq!(p.messages[0].1.name.as_deref(), Some("\u{1F600}"));
        let p = parse_value(
            json!({"event": 5, "userId": 7}),
            Endpoint::Single(Kind::Track),
        )
        .unwrap();
        assert_eq!(p.rejected[0].reason, Reason::InvalidField);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let limits = Limits::default();
            for endpoint in [Endpoint::Batch, Endpoint::Single(Kind::Track), Endpoint::Single(Kind::Alias)] {
                let mut b = bytes.clone();
                let _ = parse(&mut b, endpoint, &limits);
                let _ = decode_body(&bytes, Some("gzip"), None, &limits);
                let _ = decode_body(&bytes, None, Some("application/x-www-form-urlencoded"), &limits);
            }
        }

        #[test]
        fn json_shaped_input_parses_or_fails_cleanly(s in r#"\{("(batch|type|event|userId|anonymousId|timestamp|context|properties)":(\[|\{|"[a-z]*"|[0-9]{1,20}|null|true|-1e999|"2024-01-01T00:00:00Z"),?){0,8}(\]|\})*"#) {
            let limits = Limits::default();
            for endpoint in [Endpoint::Batch, Endpoint::Single(Kind::Page)] {
                let mut b = s.clone().into_bytes();
                if let Ok(p) = parse(&mut b, endpoint, &limits) {
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
            let mut body = serde_json::to_vec(&json!({ "batch": batch })).unwrap();
            let limits = Limits::default();
            let parsed = parse(&mut body, Endpoint::Batch, &limits).unwrap();
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
}
