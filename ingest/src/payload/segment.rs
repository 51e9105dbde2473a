//! The Segment rules: a body of one endpoint to its messages, each checked per call type
//! (ids, names, times, required fields) and taken apart; refusals carry their reason. The
//! body is read in one pass into each message's fields as JSON text borrowed from it:
//! `properties` and `context` are copied on as text, never built into trees.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::BTreeMap;
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
        context: body
            .context
            .map(|c| entries(c.get()).into_iter().collect())
            .unwrap_or_default(),
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
        let checked = check(&fields, None, &defaults, limits, false);
        // The id is only reported with a refusal: a valid message carries its own.
        let message_id = checked.is_err().then(|| {
            fields
                .get(Field::MessageId)
                .and_then(string)
                .filter(|id| id.len() <= limits.max_id_bytes)
        });
        parsed.push(index, message_id.flatten(), checked);
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
    // Compacting only shrinks text, so a message whose fields fit as sent needs no measuring.
    let size = match f.size(keyless, str::len) {
        sent if sent <= limits.max_message_bytes => sent,
        _ => f.size(keyless, compact_size),
    };
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
    let context = Merged::of(own_context, batch_context.chain(to_context));
    let properties = Merged::of(properties, to_properties).text();
    let peeked = Peeked::of(&context, &properties);
    let session_id = session_id.or_else(|| session_of_context(&context, defaults, limits));
    let context = context.text();
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

/// An object field (`context`, `properties`) with the entries of lower layers (the batch's
/// `context`, leftover fields) whose keys it lacks, the first of a key below winning: its
/// entries for the few reads that follow, from one scan of the message's own, made only when
/// a merge or a read needs it, and its text, written once at the end.
struct Merged<'a> {
    /// The message's own object, as sent.
    source: Option<&'a RawValue>,
    /// Its entries, in order (the last of a repeated key is the one that counts).
    own: OnceCell<Vec<(Cow<'a, str>, &'a RawValue)>>,
    /// The entries added from below, one per key.
    added: Vec<(&'a str, &'a RawValue)>,
}

impl<'a> Merged<'a> {
    fn of(
        source: Option<&'a RawValue>,
        under: impl IntoIterator<Item = (&'a str, &'a RawValue)>,
    ) -> Merged<'a> {
        let mut merged = Merged {
            source,
            own: OnceCell::new(),
            added: Vec::new(),
        };
        for (k, v) in under {
            // A handful of keys each side: a scan beats building a set.
            if merged.own(k).is_none() && !merged.added.iter().any(|(a, _)| *a == k) {
                merged.added.push((k, v));
            }
        }
        merged
    }

    /// The merged object's text, written out.
    fn text(&self) -> RawObject {
        match (self.source, self.added.is_empty()) {
            (Some(own), true) => raw::object(own),
            (None, true) => RawObject::default(),
            (_, false) => with_entries(self.own_entries(), self.added.iter().copied()),
        }
    }

    /// The merged object's value of `key`.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.own(key).or_else(|| {
            let added = self.added.iter().find(|(k, _)| *k == key);
            added.map(|(_, v)| *v)
        })
    }

    /// The message's own value of `key`, before anything was merged in.
    fn own(&self, key: &str) -> Option<&'a RawValue> {
        let own = self.own_entries();
        own.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The message's own entries, scanned on first use.
    fn own_entries(&self) -> &[(Cow<'a, str>, &'a RawValue)] {
        self.own
            .get_or_init(|| self.source.map(|o| entries(o.get())).unwrap_or_default())
    }
}

/// The session id SDKs put in `context` (`sessionId` or `session_id`) when the message has
/// none: the message's own context over the batch's, before leftover fields joined it.
fn session_of_context(
    context: &Merged<'_>,
    defaults: &Defaults<'_>,
    limits: &Limits,
) -> Option<String> {
    let layered = |key: &str| {
        context
            .own(key)
            .or_else(|| defaults.context.get(key).copied())
    };
    let found = layered("sessionId").or_else(|| layered("session_id"))?;
    match Scalar::of(found) {
        Scalar::Str(s) if !s.is_empty() && s.len() <= limits.max_id_bytes => Some(s.into_owned()),
        Scalar::Num(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Peeked {
    /// What enrichment reads of a message's final `context` and `properties`.
    fn of(context: &Merged<'_>, properties: &RawObject) -> Peeked {
        let [page, user_agent, ip, campaign] =
            ["page", "userAgent", "ip", "campaign"].map(|k| context.get(k));
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

    /// The field named `key`, if the rules read it.
    fn of(key: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == key)
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

    /// The message's size as JSON, each value's text measured by `measure`, without its
    /// `writeKey` when `keyless`.
    fn size(&self, keyless: bool, measure: fn(&str) -> usize) -> usize {
        let known = Field::ALL
            .into_iter()
            .filter(|f| !(keyless && *f == Field::WriteKey))
            .filter_map(|f| Some((f.name(), self.get(f)?)));
        let others = self.others.iter().map(|(k, v)| (k.as_ref(), *v));
        let (mut size, mut count) = (2, 0usize);
        for (k, v) in known.chain(others) {
            size += k.len() + 3 + measure(v.get());
            count += 1;
        }
        size + count.saturating_sub(1)
    }

    fn read<A: MapAccess<'a>>(mut map: A) -> Result<Fields<'a>, A::Error> {
        // Room for the fields a message usually has, so the list is allocated once.
        let mut fields = Fields {
            known: Vec::with_capacity(Field::ALL.len()),
            others: BTreeMap::new(),
        };
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
mod tests;
