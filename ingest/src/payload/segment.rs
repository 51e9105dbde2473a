//! The Segment rules: a body of one endpoint to its messages, each checked per call type
//! (ids, names, times, required fields) and taken apart; refusals carry their reason. The
//! body is read in one pass into each message's fields as JSON text borrowed from it:
//! `properties` and `context` are copied on as text, never built into trees.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use sluice_schema::messages::{JsonObject, RawObject};

use super::json::{compact_size, parse_json};
use super::raw::{self, entries, pick, with_entries, Key, Scalar};
use super::{Endpoint, Kind, Limits, Message, Parsed, PayloadError, Peeked, Reason};

/// Parses a JSON body of `endpoint` into messages. A malformed body is a 400; a batch's bad
/// messages are refused one by one while the good ones go on.
pub fn parse(json: &[u8], endpoint: Endpoint, limits: &Limits) -> Result<Parsed, PayloadError> {
    let not_an_object = || PayloadError::BadRequest("the JSON is not an object".into());
    match endpoint {
        Endpoint::Single(kind) | Endpoint::SegmentPixel(kind) => {
            let Item::Object(fields) = parse_json(json, limits.max_json_depth)? else {
                return Err(not_an_object());
            };
            let mut parsed = Parsed {
                write_key: fields.get(Field::WriteKey).and_then(string),
                ..Parsed::default()
            };
            // The key was taken off the body before the message was measured.
            let checked = check(&fields, Some(kind), &Defaults::default(), limits, true);
            if matches!(&checked, Err((Reason::TooLarge, _))) {
                return Err(PayloadError::TooLarge {
                    what: "message",
                    limit: limits.max_message_bytes,
                });
            }
            parsed.push(0, None, checked);
            Ok(parsed)
        }
        Endpoint::PostHog => Err(PayloadError::BadRequest(
            "a PostHog body is parsed by posthog::parse".into(),
        )),
        Endpoint::Batch => {
            let Top::Body(body) = parse_json(json, limits.max_json_depth)? else {
                return Err(not_an_object());
            };
            parse_batch(body, limits)
        }
    }
}

/// A batch body's messages, each on its own: a bad one is refused, the rest go on.
fn parse_batch(body: BatchBody<'_>, limits: &Limits) -> Result<Parsed, PayloadError> {
    let mut parsed = Parsed {
        write_key: body.write_key.and_then(string),
        ..Parsed::default()
    };
    let Some(Batch::Items(batch)) = body.batch else {
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
        context: body.context.map(|c| entries(c.get())).unwrap_or_default(),
        sent_at: body.sent_at.and_then(|v| parse_time(v).ok().flatten()),
    };
    for (index, item) in batch.into_iter().enumerate() {
        let Item::Object(fields) = item else {
            parsed.push(index, None, Err(not_an_object()));
            continue;
        };
        if let Some(key) = fields.get(Field::WriteKey).and_then(string) {
            parsed.note_key(&key, "write keys")?;
        }
        let message_id = fields
            .get(Field::MessageId)
            .and_then(string)
            .filter(|id| id.len() <= limits.max_id_bytes);
        parsed.push(
            index,
            message_id,
            check(&fields, None, &defaults, limits, false),
        );
    }
    Ok(parsed)
}

/// What a batch gives each of its messages unless the message says otherwise.
#[derive(Debug, Default)]
pub struct Defaults<'a> {
    /// The batch's `context` entries, under each message's own.
    pub context: BTreeMap<Cow<'a, str>, &'a RawValue>,
    /// The batch's `sentAt`.
    pub sent_at: Option<DateTime<Utc>>,
}

type Refusal = (Reason, String);

fn not_an_object() -> Refusal {
    (
        Reason::NotAnObject,
        "a message must be a JSON object".into(),
    )
}

/// The string `raw` holds, if it is one.
fn string(raw: &RawValue) -> Option<String> {
    Scalar::of(raw).into_string()
}

/// Top-level fields of the SDKs' envelope that are about delivery, not the event: kept in
/// `context` under their own names.
const ENVELOPE: [&str; 5] = ["integrations", "channel", "_metadata", "version", "library"];

/// Checks one message given as a JSON value (the pixel's and PostHog's, built as maps) and
/// takes it apart, as a message of a body is. `kind` is the endpoint's kind; `None` where the
/// message's `type` says.
pub fn validate(
    value: Value,
    kind: Option<Kind>,
    defaults: &Defaults<'_>,
    limits: &Limits,
) -> Result<Message, Refusal> {
    if !value.is_object() {
        return Err(not_an_object());
    }
    let text = value.to_string();
    match serde_json::from_str::<Item<'_>>(&text) {
        Ok(Item::Object(fields)) => check(&fields, kind, defaults, limits, false),
        _ => Err(not_an_object()),
    }
}

/// Checks one message and takes it apart. `kind` is the endpoint's kind; `None` in a batch,
/// where the message's `type` says. `keyless`: its size is measured without `writeKey`.
fn check(
    f: &Fields<'_>,
    kind: Option<Kind>,
    defaults: &Defaults<'_>,
    limits: &Limits,
    keyless: bool,
) -> Result<Message, Refusal> {
    let size = f.size(keyless);
    if size > limits.max_message_bytes {
        return Err((
            Reason::TooLarge,
            format!(
                "message is {size} bytes, over the limit of {}",
                limits.max_message_bytes
            ),
        ));
    }
    let kind = match kind {
        Some(kind) => kind,
        None => f
            .get(Field::Type)
            .and_then(string)
            .and_then(|t| Kind::from_type(&t))
            .ok_or_else(|| {
                (
                    Reason::InvalidType,
                    "type must be one of track, page, screen, identify, alias, group".into(),
                )
            })?,
    };
    let id = |field: Field| take_string(f.get(field), field.name(), limits.max_id_bytes);
    let message_id = id(Field::MessageId)?;
    let anonymous_id = id(Field::AnonymousId)?;
    let user_id = id(Field::UserId)?;
    let group_id = id(Field::GroupId)?;
    let previous_id = id(Field::PreviousId)?;
    let session_id = id(Field::SessionId)?;
    // A track's name is its `event`; any other call's `event` is just another field.
    let (name_field, other_name) = if kind == Kind::Track {
        (Field::Event, Field::Name)
    } else {
        (Field::Name, Field::Event)
    };
    let name_raw = f.get(name_field);
    if name_raw.is_some_and(|v| matches!(Scalar::of(v), Scalar::Num(_))) {
        return Err((
            Reason::InvalidField,
            format!("{} must be a string", name_field.name()),
        ));
    }
    let name = take_string(name_raw, name_field.name(), limits.max_name_bytes)?;
    let timestamp = take_time(f.get(Field::Timestamp), "timestamp")?;
    let sent_at = take_time(f.get(Field::SentAt), "sentAt")?.or(defaults.sent_at);
    let properties = take_object(f.get(Field::Properties), "properties")?;
    let traits = take_object(f.get(Field::Traits), "traits")?
        .and_then(|t| serde_json::from_str::<JsonObject>(t.get()).ok())
        .unwrap_or_default();
    let own_context = take_object(f.get(Field::Context), "context")?;
    // Leftover top-level fields are kept, never dropped silently (docs/architecture.md §4.2);
    // `type` and the key (which must never travel on into Kafka) are not.
    let leftovers = f
        .others
        .iter()
        .map(|(k, v)| (k.as_ref(), *v))
        .chain(f.get(other_name).map(|v| (other_name.name(), v)));
    let (mut to_context, mut to_properties) = (Vec::new(), Vec::new());
    for (k, v) in leftovers {
        if ENVELOPE.contains(&k) || matches!(kind, Kind::Identify | Kind::Alias) {
            to_context.push((k, v));
        } else {
            to_properties.push((k, v));
        }
    }
    let batch_context = defaults.context.iter().map(|(k, v)| (k.as_ref(), *v));
    let context = merged(own_context, batch_context.chain(to_context));
    let properties = merged(properties, to_properties);
    let peeked = Peeked::of(&context, &properties);
    let session_id =
        session_id.or_else(|| session_of_context(own_context, &defaults.context, limits));
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
        peeked,
    };
    required_fields(&message)?;
    Ok(message)
}

/// The object `own` (or `{}`) with the entries of `under` whose keys it lacks: the first of a
/// key in `under` wins.
fn merged<'a>(
    own: Option<&RawValue>,
    under: impl IntoIterator<Item = (&'a str, &'a RawValue)>,
) -> RawObject {
    let mut under = under.into_iter().peekable();
    if under.peek().is_none() {
        return own.map(raw::object).unwrap_or_default();
    }
    let text = own.map_or("{}", RawValue::get);
    let mut present: BTreeSet<Cow<'_, str>> = entries(text).into_keys().collect();
    let added: Vec<_> = under
        .filter(|(k, _)| present.insert(Cow::Borrowed(*k)))
        .collect();
    with_entries(text, added)
}

/// The session id SDKs put in `context` (`sessionId` or `session_id`) when the message has
/// none: the message's own context over the batch's, before leftover fields joined it.
fn session_of_context(
    own: Option<&RawValue>,
    batch: &BTreeMap<Cow<'_, str>, &RawValue>,
    limits: &Limits,
) -> Option<String> {
    let [camel, snake] = own.map_or([None; 2], |c| pick(c.get(), &["sessionId", "session_id"]));
    let camel = camel.or_else(|| batch.get("sessionId").copied());
    let snake = snake.or_else(|| batch.get("session_id").copied());
    match Scalar::of(camel.or(snake)?) {
        Scalar::Str(s) if !s.is_empty() && s.len() <= limits.max_id_bytes => Some(s.into_owned()),
        Scalar::Num(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Peeked {
    /// What enrichment reads of a message's final `context` and `properties`.
    fn of(context: &RawObject, properties: &RawObject) -> Peeked {
        let [page, user_agent, ip, campaign] =
            pick(context.get(), &["page", "userAgent", "ip", "campaign"]);
        let [mut url, mut referrer] = page
            .map(|p| pick(p.get(), &["url", "referrer"]))
            .unwrap_or_default()
            .map(|v| v.and_then(string));
        if url.is_none() || referrer.is_none() {
            let [p_url, p_referrer] = pick(properties.get(), &["url", "referrer"]);
            url = url.or_else(|| p_url.and_then(string));
            referrer = referrer.or_else(|| p_referrer.and_then(string));
        }
        let mut campaign_utm = JsonObject::new();
        if let Some(c) = campaign {
            let found = pick(c.get(), &["source", "medium", "name", "term", "content"]);
            for (to, v) in ["source", "medium", "campaign", "term", "content"]
                .into_iter()
                .zip(found)
            {
                if let Some(v) = v.and_then(string) {
                    campaign_utm.insert(to.into(), Value::String(v));
                }
            }
        }
        Peeked {
            page_url: url,
            referrer: referrer.filter(|r| !r.is_empty()),
            user_agent: user_agent.and_then(string),
            ip: ip.and_then(string),
            has_campaign: campaign.is_some(),
            campaign_utm,
        }
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

/// A client time field (`timestamp`, `sentAt`).
fn take_time(v: Option<&RawValue>, field: &str) -> Result<Option<DateTime<Utc>>, Refusal> {
    match v {
        Some(v) => parse_time(v).map_err(|()| {
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
fn take_string(v: Option<&RawValue>, field: &str, max: usize) -> Result<Option<String>, Refusal> {
    let s = match v.map(Scalar::of) {
        None | Some(Scalar::Null) => return Ok(None),
        Some(Scalar::Str(s)) => s,
        Some(Scalar::Num(n)) => Cow::Owned(n.to_string()),
        Some(Scalar::Other) => {
            return Err((Reason::InvalidField, format!("{field} must be a string")))
        }
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
    Ok(Some(s.into_owned()))
}

/// An object field's text; absent or null is `None`.
fn take_object<'a>(v: Option<&'a RawValue>, field: &str) -> Result<Option<&'a RawValue>, Refusal> {
    match v {
        None => Ok(None),
        Some(v) if v.get() == "null" => Ok(None),
        Some(v) if v.get().starts_with('{') => Ok(Some(v)),
        Some(_) => Err((
            Reason::InvalidField,
            format!("{field} must be a JSON object"),
        )),
    }
}

/// A client time: RFC 3339 text, or epoch milliseconds. `Ok(None)` for null.
fn parse_time(v: &RawValue) -> Result<Option<DateTime<Utc>>, ()> {
    match Scalar::of(v) {
        Scalar::Null => Ok(None),
        Scalar::Str(s) => DateTime::parse_from_rfc3339(&s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| ()),
        Scalar::Num(n) => n
            .as_i64()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            // The same years RFC 3339 can say (0 to 9999), not chrono's ±262,000.
            .filter(|t| (0..=9999).contains(&t.year()))
            .map(Some)
            .ok_or(()),
        Scalar::Other => Err(()),
    }
}

/// A field of a message the rules read; every other is kept as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Type,
    MessageId,
    AnonymousId,
    UserId,
    GroupId,
    PreviousId,
    SessionId,
    Event,
    Name,
    Timestamp,
    SentAt,
    Properties,
    Traits,
    Context,
    WriteKey,
}

impl Field {
    const ALL: [Field; 15] = [
        Field::Type,
        Field::MessageId,
        Field::AnonymousId,
        Field::UserId,
        Field::GroupId,
        Field::PreviousId,
        Field::SessionId,
        Field::Event,
        Field::Name,
        Field::Timestamp,
        Field::SentAt,
        Field::Properties,
        Field::Traits,
        Field::Context,
        Field::WriteKey,
    ];

    /// The field's key in a message.
    const fn name(self) -> &'static str {
        match self {
            Field::Type => "type",
            Field::MessageId => "messageId",
            Field::AnonymousId => "anonymousId",
            Field::UserId => "userId",
            Field::GroupId => "groupId",
            Field::PreviousId => "previousId",
            Field::SessionId => "sessionId",
            Field::Event => "event",
            Field::Name => "name",
            Field::Timestamp => "timestamp",
            Field::SentAt => "sentAt",
            Field::Properties => "properties",
            Field::Traits => "traits",
            Field::Context => "context",
            Field::WriteKey => "writeKey",
        }
    }

    fn of(key: &str) -> Option<Field> {
        Some(match key {
            "type" => Field::Type,
            "messageId" => Field::MessageId,
            "anonymousId" => Field::AnonymousId,
            "userId" => Field::UserId,
            "groupId" => Field::GroupId,
            "previousId" => Field::PreviousId,
            "sessionId" => Field::SessionId,
            "event" => Field::Event,
            "name" => Field::Name,
            "timestamp" => Field::Timestamp,
            "sentAt" => Field::SentAt,
            "properties" => Field::Properties,
            "traits" => Field::Traits,
            "context" => Field::Context,
            "writeKey" => Field::WriteKey,
            _ => return None,
        })
    }
}

/// One message as sent: its fields' JSON text, borrowed from the body. The last of a repeated
/// key wins, as when a message is read into a map.
#[derive(Debug, Default)]
struct Fields<'a> {
    /// The fields the rules read, in body order (a small list: a message has a dozen).
    known: Vec<(Field, &'a RawValue)>,
    /// Every other field.
    others: BTreeMap<Cow<'a, str>, &'a RawValue>,
}

impl<'a> Fields<'a> {
    fn get(&self, field: Field) -> Option<&'a RawValue> {
        self.known
            .iter()
            .rev()
            .find(|(f, _)| *f == field)
            .map(|(_, v)| *v)
    }

    /// The message's size as compact JSON, without its `writeKey` when `keyless`.
    fn size(&self, keyless: bool) -> usize {
        let known = Field::ALL
            .into_iter()
            .filter(|f| !(keyless && *f == Field::WriteKey))
            .filter_map(|f| Some((f.name(), self.get(f)?)));
        let others = self.others.iter().map(|(k, v)| (k.as_ref(), *v));
        let (mut size, mut count) = (2, 0usize);
        for (k, v) in known.chain(others) {
            size += k.len() + 3 + compact_size(v.get());
            count += 1;
        }
        size + count.saturating_sub(1)
    }

    fn read<A: MapAccess<'a>>(mut map: A) -> Result<Fields<'a>, A::Error> {
        let mut fields = Fields::default();
        while let Some(Key(key)) = map.next_key()? {
            let value = map.next_value()?;
            match Field::of(&key) {
                Some(field) => fields.known.push((field, value)),
                None => {
                    fields.others.insert(key, value);
                }
            }
        }
        Ok(fields)
    }
}

/// Drains what a visitor is not interested in, so the parser goes on past it.
fn drain<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The scalar cases of a visitor whose value is `$other` for anything but the shape it wants.
macro_rules! others_are {
    ($other:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}

/// A message of a batch, or a single call's body.
enum Item<'a> {
    Object(Fields<'a>),
    /// Not a JSON object.
    Other,
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Item<'de>, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item<'de>, A::Error> {
                Fields::read(map).map(Item::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item<'de>, A::Error> {
                drain(seq).map(|()| Item::Other)
            }
            others_are!(Item::Other);
        }
        d.deserialize_any(ItemVisitor)
    }
}

/// A batch body's `batch`.
enum Batch<'a> {
    Items(Vec<Item<'a>>),
    /// Not an array.
    Other,
}

impl<'de> Deserialize<'de> for Batch<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Batch<'de>, D::Error> {
        struct BatchVisitor;
        impl<'de> Visitor<'de> for BatchVisitor {
            type Value = Batch<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Batch<'de>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Batch::Items(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Batch<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Batch::Other)
            }
            others_are!(Batch::Other);
        }
        d.deserialize_any(BatchVisitor)
    }
}

/// The fields of a batch body (`POST /v1/batch`) the collector reads.
#[derive(Default)]
struct BatchBody<'a> {
    batch: Option<Batch<'a>>,
    context: Option<&'a RawValue>,
    sent_at: Option<&'a RawValue>,
    write_key: Option<&'a RawValue>,
}

/// A batch body, or JSON that is not an object.
enum Top<'a> {
    Body(BatchBody<'a>),
    Other,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Top<'de>, D::Error> {
        struct TopVisitor;
        impl<'de> Visitor<'de> for TopVisitor {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a batch body")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top<'de>, A::Error> {
                let mut body = BatchBody::default();
                while let Some(Key(key)) = map.next_key()? {
                    match key.as_ref() {
                        "batch" => body.batch = Some(map.next_value()?),
                        // A `context` that is not an object gives nothing.
                        "context" => {
                            let c: &RawValue = map.next_value()?;
                            body.context = c.get().starts_with('{').then_some(c);
                        }
                        "sentAt" => body.sent_at = Some(map.next_value()?),
                        "writeKey" => body.write_key = Some(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Top::Body(body))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top<'de>, A::Error> {
                drain(seq).map(|()| Top::Other)
            }
            others_are!(Top::Other);
        }
        d.deserialize_any(TopVisitor)
    }
}

#[cfg(test)]
mod tests {
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
}
