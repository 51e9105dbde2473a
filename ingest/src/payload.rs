//! Request bodies to validated messages: content decoding (gzip, `text/plain` beacons,
//! base64 `data=` forms), JSON parsing with simd-json behind a nesting-depth guard, and the
//! Segment rules per call type. Any bytes end as parsed messages or a 4xx, never a panic.

use std::io::Read;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use sluice_schema::messages::JsonObject;

use crate::error::IngestError;

/// The size and shape bounds a body is checked against (from [`crate::config::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single message, bytes of its compact JSON.
    pub max_message_bytes: usize,
    /// Largest body, bytes, as sent and after decompression.
    pub max_request_bytes: usize,
    /// Deepest nesting of objects and arrays in a body.
    pub max_json_depth: usize,
    /// Longest id, bytes.
    pub max_id_bytes: usize,
    /// Longest event/page/screen name, bytes.
    pub max_name_bytes: usize,
    /// Most messages in a batch.
    pub max_batch_messages: usize,
}

impl Limits {
    /// The defaults of the `SLUICE_MAX_*` settings (their clap attributes read these).
    pub const DEFAULT: Limits = Limits {
        max_message_bytes: 32_768,
        max_request_bytes: 512_000,
        max_json_depth: 32,
        max_id_bytes: 256,
        max_name_bytes: 512,
        max_batch_messages: 2_500,
    };

    /// The limits of a configuration.
    pub fn from_config(c: &crate::config::Config) -> Limits {
        Limits {
            max_message_bytes: c.max_message_bytes,
            max_request_bytes: c.max_request_bytes,
            max_json_depth: c.max_json_depth,
            max_id_bytes: c.max_id_bytes,
            max_name_bytes: c.max_name_bytes,
            max_batch_messages: c.max_batch_messages,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits::DEFAULT
    }
}

/// Which API call a request made; a batch names each message's kind in its `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/batch`.
    Batch,
    /// A single-message call of this kind.
    Single(Kind),
    /// Segment's pixel form of a single-message call: `GET /v1/pixel/<type>?data=...`.
    SegmentPixel(Kind),
    /// PostHog's capture API (`/e/`, `/batch/`, ...), decoded by [`crate::posthog`].
    PostHog,
}

impl Endpoint {
    /// Every route's endpoint (Segment's pixel with one of its kinds): what the property
    /// test and the fuzz target pick from.
    pub const ALL: [Endpoint; 9] = [
        Endpoint::Batch,
        Endpoint::Single(Kind::Track),
        Endpoint::Single(Kind::Page),
        Endpoint::Single(Kind::Screen),
        Endpoint::Single(Kind::Identify),
        Endpoint::Single(Kind::Alias),
        Endpoint::Single(Kind::Group),
        Endpoint::Single(Kind::Pixel),
        Endpoint::SegmentPixel(Kind::Track),
    ];

    /// The metric label of the endpoint.
    pub const fn as_str(self) -> &'static str {
        match self {
            Endpoint::Batch => "batch",
            Endpoint::Single(kind) => kind.as_str(),
            Endpoint::SegmentPixel(_) => "segment_pixel",
            Endpoint::PostHog => "posthog",
        }
    }
}

/// The kind of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A named action.
    Track,
    /// A web page view.
    Page,
    /// An app screen view.
    Screen,
    /// Joined a group.
    Group,
    /// Ties a visitor to a user and sets traits.
    Identify,
    /// Two user ids are one person.
    Alias,
    /// The tracking pixel.
    Pixel,
}

impl Kind {
    /// The Segment `type` name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Track => "track",
            Kind::Page => "page",
            Kind::Screen => "screen",
            Kind::Group => "group",
            Kind::Identify => "identify",
            Kind::Alias => "alias",
            Kind::Pixel => "pixel",
        }
    }

    fn from_type(name: &str) -> Option<Kind> {
        Some(match name {
            "track" => Kind::Track,
            "page" => Kind::Page,
            "screen" => Kind::Screen,
            "group" => Kind::Group,
            "identify" => Kind::Identify,
            "alias" => Kind::Alias,
            _ => return None,
        })
    }
}

/// Why one message of a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not a JSON object.
    NotAnObject,
    /// `type` missing or not one of the API's.
    InvalidType,
    /// Neither `anonymousId` nor `userId`.
    MissingIdentity,
    /// A field the type requires is missing (`event`, `groupId`, `previousId`).
    MissingField,
    /// A field has the wrong JSON type or is empty.
    InvalidField,
    /// An id or name is longer than its limit.
    FieldTooLong,
    /// `timestamp` or `sentAt` is not an RFC 3339 time or epoch milliseconds.
    InvalidTimestamp,
    /// The message is over the per-message size limit.
    TooLarge,
    /// An identify carries an email or phone, and this collector has no PII keys to seal it.
    PiiKeysMissing,
}

impl Reason {
    /// The metric label and the `reason` of the answer.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::NotAnObject => "not_an_object",
            Reason::InvalidType => "invalid_type",
            Reason::MissingIdentity => "missing_identity",
            Reason::MissingField => "missing_field",
            Reason::InvalidField => "invalid_field",
            Reason::FieldTooLong => "field_too_long",
            Reason::InvalidTimestamp => "invalid_timestamp",
            Reason::TooLarge => "too_large",
            Reason::PiiKeysMissing => "pii_keys_missing",
        }
    }
}

/// One refused message, as listed in the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    /// Position of the message in the batch (0 for single calls).
    pub index: usize,
    /// Its `messageId`, when it had a readable one.
    #[serde(rename = "messageId", skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Machine-readable reason.
    pub reason: Reason,
    /// What was wrong, for the developer reading the answer. Never holds field values.
    pub detail: String,
}

/// One validated message, before enrichment.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Kind of call.
    pub kind: Kind,
    /// Client `messageId`, if any.
    pub message_id: Option<String>,
    /// `anonymousId`.
    pub anonymous_id: Option<String>,
    /// `userId`.
    pub user_id: Option<String>,
    /// Session id (`sessionId`, `context.sessionId`).
    pub session_id: Option<String>,
    /// Event name (track) or page/screen name.
    pub name: Option<String>,
    /// `groupId` (group).
    pub group_id: Option<String>,
    /// `previousId` (alias).
    pub previous_id: Option<String>,
    /// Client `timestamp`.
    pub timestamp: Option<DateTime<Utc>>,
    /// Client `sentAt` (the message's own, else the batch's).
    pub sent_at: Option<DateTime<Utc>>,
    /// `properties`, plus top-level fields the API does not define.
    pub properties: JsonObject,
    /// `traits` (identify, group).
    pub traits: JsonObject,
    /// `context`, over the batch's context, plus SDK envelope fields (`integrations`, ...).
    pub context: JsonObject,
}

/// A parsed request: its messages (or their refusals) and the key named in the body.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Valid messages in request order, each with its index in the request.
    pub messages: Vec<(usize, Message)>,
    /// Refused messages.
    pub rejected: Vec<Rejected>,
    /// `writeKey` of the body, if any (Segment's browser SDK authenticates this way): the
    /// top-level one, else the first a batch's messages name (analytics.js in batching mode
    /// puts it on every message).
    pub write_key: Option<String>,
    /// Other keys a batch's messages name. Each must be of the request's workspace, since the
    /// messages would be stored there whatever key they name.
    pub other_keys: Vec<String>,
}

/// Most distinct write keys one batch may name: each costs a key check.
pub const MAX_KEYS_PER_BATCH: usize = 4;

/// Undoes `Content-Encoding` and the form wrapping of a body, leaving JSON bytes.
///
/// The decompressed size is capped too: a 500 KB gzip body can inflate to gigabytes.
pub fn decode_body(
    raw: &[u8],
    content_encoding: Option<&str>,
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<Vec<u8>, IngestError> {
    let too_large = IngestError::TooLarge {
        what: "request body",
        limit: limits.max_request_bytes,
    };
    if raw.len() > limits.max_request_bytes {
        return Err(too_large);
    }
    let body = match content_encoding.map(|e| e.trim().to_ascii_lowercase()) {
        None => raw.to_vec(),
        Some(e) if e.is_empty() || e == "identity" => raw.to_vec(),
        Some(e) if e == "gzip" || e == "x-gzip" => {
            let mut out =
                Vec::with_capacity(raw.len().saturating_mul(4).min(limits.max_request_bytes));
            let cap = u64::try_from(limits.max_request_bytes)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            flate2::read::MultiGzDecoder::new(raw)
                .take(cap)
                .read_to_end(&mut out)
                .map_err(|err| {
                    IngestError::BadRequest(format!("body is not valid gzip ({err})"))
                })?;
            if out.len() > limits.max_request_bytes {
                return Err(too_large);
            }
            out
        }
        Some(other) => {
            return Err(IngestError::BadRequest(format!(
                "Content-Encoding {other:?} is not supported; send gzip or no encoding"
            )))
        }
    };
    // A form body is `data=<base64>`. curl and many HTTP libraries label plain JSON as a form
    // by default, so a body that starts like JSON is read as JSON whatever its label says.
    let starts_like_json = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    let is_form = !starts_like_json
        && (body.starts_with(b"data=")
            || content_type.is_some_and(|t| {
                t.trim_start()
                    .starts_with("application/x-www-form-urlencoded")
            }));
    if is_form {
        return form_data(&body);
    }
    Ok(body)
}

/// The JSON inside a `data=<base64>` form body, as browser SDKs send it.
fn form_data(body: &[u8]) -> Result<Vec<u8>, IngestError> {
    data_field(body, "form body")
}

/// The JSON of a Segment pixel request, `GET /v1/pixel/<type>?data=<base64 JSON>`: the query
/// string has the form body's shape.
pub fn pixel_data(query: &str) -> Result<Vec<u8>, IngestError> {
    data_field(query.as_bytes(), "pixel query")
}

/// The `data` field of a URL-encoded form (`what` names it in errors): base64 of the JSON, or
/// the JSON itself (Segment calls the base64 step optional).
fn data_field(form: &[u8], what: &str) -> Result<Vec<u8>, IngestError> {
    let data = url::form_urlencoded::parse(form)
        .find(|(name, _)| name == "data")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            IngestError::BadRequest(format!("{what} has no data field; send data=<base64 JSON>"))
        })?;
    if data.trim_start().starts_with('{') {
        return Ok(data.into_bytes());
    }
    decode_base64(&data).ok_or_else(|| {
        IngestError::BadRequest(format!(
            "the data field of the {what} is not base64; send data=<base64 JSON>"
        ))
    })
}

/// Standard or URL-safe base64, padded or not (SDKs differ).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    // A standard-alphabet `+` put into a URL or form unescaped arrives URL-decoded as a space,
    // and a space is never base64: it can only have been a `+`, even at the end.
    let s = s.replace(' ', "+");
    let s = s.trim();
    GeneralPurpose::new(&alphabet::STANDARD, config)
        .decode(s)
        .or_else(|_| GeneralPurpose::new(&alphabet::URL_SAFE, config).decode(s))
        .ok()
}

/// Rejects JSON nested deeper than `max` before it reaches a parser: deserialising into a
/// tree recurses once per level, so a 500 KB body of `[[[[...` would otherwise exhaust the
/// stack. Also rejects `\u` escapes of lone UTF-16 surrogates, which are not text (a
/// lenient parser would turn them into replacement characters, silently changing the data).
/// One pass over the bytes.
pub(crate) fn check_depth(json: &[u8], max: usize) -> Result<(), IngestError> {
    let lone = || IngestError::BadRequest("a string holds a lone UTF-16 surrogate escape".into());
    let mut depth = 0usize;
    let mut in_string = false;
    // The previous string token was a high-surrogate escape: a low one must follow.
    let mut want_low = false;
    let mut i = 0;
    while i < json.len() {
        let b = json[i];
        if in_string {
            if b == b'\\' {
                if json.get(i + 1) == Some(&b'u') {
                    let unit = json
                        .get(i + 2..i + 6)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok());
                    match unit {
                        Some(0xD800..=0xDBFF) if !want_low => want_low = true,
                        Some(0xDC00..=0xDFFF) if want_low => want_low = false,
                        Some(0xD800..=0xDFFF) => return Err(lone()),
                        _ if want_low => return Err(lone()),
                        _ => {}
                    }
                    i += 6;
                } else {
                    if want_low {
                        return Err(lone());
                    }
                    i += 2;
                }
                continue;
            }
            if want_low {
                return Err(lone());
            }
            if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(IngestError::BadRequest(format!(
                        "JSON nested deeper than {max} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Parses a JSON body of `endpoint` into messages. A malformed body is a 400; a batch's bad
/// messages are refused one by one while the good ones go on.
pub fn parse(json: &mut [u8], endpoint: Endpoint, limits: &Limits) -> Result<Parsed, IngestError> {
    check_depth(json, limits.max_json_depth)?;
    let value: Value = simd_json::serde::from_slice(json)
        .map_err(|err| IngestError::BadRequest(format!("the JSON is not valid ({err})")))?;
    let Value::Object(mut body) = value else {
        return Err(IngestError::BadRequest("the JSON is not an object".into()));
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
            match validate(
                Value::Object(body),
                Some(kind),
                &Defaults::default(),
                limits,
            ) {
                Ok(msg) => parsed.messages.push((0, msg)),
                Err((reason, detail)) => {
                    if reason == Reason::TooLarge {
                        return Err(IngestError::TooLarge {
                            what: "message",
                            limit: limits.max_message_bytes,
                        });
                    }
                    parsed.rejected.push(Rejected {
                        index: 0,
                        message_id: None,
                        reason,
                        detail,
                    });
                }
            }
        }
        Endpoint::PostHog => {
            return Err(IngestError::BadRequest(
                "a PostHog body is parsed by posthog::parse".into(),
            ))
        }
        Endpoint::Batch => {
            let Some(Value::Array(batch)) = body.remove("batch") else {
                return Err(IngestError::BadRequest(
                    "a batch body needs a \"batch\" array of messages".into(),
                ));
            };
            if batch.len() > limits.max_batch_messages {
                return Err(IngestError::TooLarge {
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
                    match &parsed.write_key {
                        None => parsed.write_key = Some(key.to_owned()),
                        Some(first) if first == key => {}
                        Some(_) if parsed.other_keys.iter().any(|k| k == key) => {}
                        Some(_) if parsed.other_keys.len() + 1 >= MAX_KEYS_PER_BATCH => {
                            return Err(IngestError::BadRequest(format!(
                                "a batch may name at most {MAX_KEYS_PER_BATCH} write keys; send one key per request"
                            )))
                        }
                        Some(_) => parsed.other_keys.push(key.to_owned()),
                    }
                }
                let message_id = item
                    .get("messageId")
                    .and_then(Value::as_str)
                    .filter(|id| id.len() <= limits.max_id_bytes)
                    .map(str::to_owned);
                match validate(item, None, &defaults, limits) {
                    Ok(msg) => parsed.messages.push((index, msg)),
                    Err((reason, detail)) => parsed.rejected.push(Rejected {
                        index,
                        message_id,
                        reason,
                        detail,
                    }),
                }
            }
        }
    }
    Ok(parsed)
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
    let type_field = m.remove("type");
    let kind = match kind {
        Some(kind) => kind,
        None => type_field
            .as_ref()
            .and_then(Value::as_str)
            .and_then(Kind::from_type)
            .ok_or_else(|| {
                (
                    Reason::InvalidType,
                    "type must be one of track, page, screen, identify, alias, group".into(),
                )
            })?,
    };
    let id = |m: &mut Map<String, Value>, field: &str| take_string(m, field, limits.max_id_bytes);
    let message_id = id(&mut m, "messageId")?;
    let anonymous_id = id(&mut m, "anonymousId")?;
    let user_id = id(&mut m, "userId")?;
    let group_id = id(&mut m, "groupId")?;
    let previous_id = id(&mut m, "previousId")?;
    let mut session_id = id(&mut m, "sessionId")?;
    let name_field = if kind == Kind::Track { "event" } else { "name" };
    if m.get(name_field).is_some_and(Value::is_number) {
        return Err((
            Reason::InvalidField,
            format!("{name_field} must be a string"),
        ));
    }
    let name = take_string(&mut m, name_field, limits.max_name_bytes)?;
    let timestamp = match m.remove("timestamp") {
        Some(v) => parse_time(&v).map_err(|()| {
            (
                Reason::InvalidTimestamp,
                "timestamp must be RFC 3339 or epoch milliseconds".into(),
            )
        })?,
        None => None,
    };
    let sent_at = match m.remove("sentAt") {
        Some(v) => parse_time(&v).map_err(|()| {
            (
                Reason::InvalidTimestamp,
                "sentAt must be RFC 3339 or epoch milliseconds".into(),
            )
        })?,
        None => None,
    }
    .or(defaults.sent_at);
    let mut properties = take_object(&mut m, "properties")?;
    let traits = take_object(&mut m, "traits")?;
    let mut context = take_object(&mut m, "context")?;
    if let Some(batch_context) = &defaults.context {
        for (k, v) in batch_context {
            context.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if session_id.is_none() {
        session_id = match context
            .get("sessionId")
            .or_else(|| context.get("session_id"))
        {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= limits.max_id_bytes => {
                Some(s.clone())
            }
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
    }
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

    match kind {
        Kind::Alias if user_id.is_none() || previous_id.is_none() => {
            return Err((
                Reason::MissingField,
                "alias needs userId and previousId".into(),
            ));
        }
        Kind::Alias => {}
        _ if anonymous_id.is_none() && user_id.is_none() => {
            return Err((
                Reason::MissingIdentity,
                "anonymousId or userId is required".into(),
            ));
        }
        Kind::Track if name.is_none() => {
            return Err((
                Reason::MissingField,
                "track needs an event name in \"event\"".into(),
            ));
        }
        Kind::Group if group_id.is_none() => {
            return Err((Reason::MissingField, "group needs a groupId".into()));
        }
        _ => {}
    }
    Ok(Message {
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
    })
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

/// The length of `v` as compact JSON, without serialising it (escapes not counted: a close
/// enough measure for a size limit, and it cannot be fooled into under-counting much).
pub fn json_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => {
            if *b {
                4
            } else {
                5
            }
        }
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(json_size).sum::<usize>() + a.len().saturating_sub(1),
        Value::Object(o) => json_size_object(o),
    }
}

fn json_size_object(o: &Map<String, Value>) -> usize {
    2 + o
        .iter()
        .map(|(k, v)| k.len() + 3 + json_size(v))
        .sum::<usize>()
        + o.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_value(v: Value, endpoint: Endpoint) -> Result<Parsed, IngestError> {
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
            Err(IngestError::BadRequest(_))
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
        assert!(matches!(err, IngestError::TooLarge { .. }));
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
    fn gzip_and_forms_decode_and_bombs_are_capped() {
        use flate2::write::GzEncoder;
        use std::io::Write;
        let limits = Limits::default();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"a\":1}").unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(
            decode_body(&gz, Some("gzip"), None, &limits).unwrap(),
            b"{\"a\":1}"
        );
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b' '; 5_000_000]).unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < limits.max_request_bytes);
        assert!(matches!(
            decode_body(&bomb, Some("gzip"), None, &limits),
            Err(IngestError::TooLarge { .. })
        ));
        let form = b"data=eyJhIjoxfQ%3D%3D";
        assert_eq!(
            decode_body(
                form,
                Some("identity"),
                Some("application/x-www-form-urlencoded"),
                &limits
            )
            .unwrap(),
            b"{\"a\":1}"
        );
        assert!(decode_body(b"x", Some("br"), None, &limits).is_err());
        // curl -d labels JSON as a form: JSON it stays.
        assert_eq!(
            decode_body(
                b" {\"a\":1}",
                None,
                Some("application/x-www-form-urlencoded"),
                &limits
            )
            .unwrap(),
            b" {\"a\":1}"
        );
    }

    #[test]
    fn base64_of_either_alphabet_and_unescaped_plus_decode() {
        // "~~~" is "fn5+" in the standard alphabet, "fn5-" in the URL-safe one.
        for encoded in ["fn5+", "fn5-", "fn5 ", "fn5+\r\n", "e30=", "e30"] {
            assert!(decode_base64(encoded).is_some(), "{encoded:?}");
        }
        assert_eq!(decode_base64("fn5 ").unwrap(), b"~~~");
        assert_eq!(decode_base64("e30").unwrap(), b"{}");
        assert!(decode_base64("not*base64").is_none());
        assert_eq!(pixel_data("x=1&data=e30").unwrap(), b"{}");
        assert_eq!(pixel_data("data=%7B%7D").unwrap(), b"{}", "JSON as is");
        for bad in ["", "x=1", "data=%%", "data=*"] {
            assert!(
                matches!(pixel_data(bad), Err(IngestError::BadRequest(_))),
                "{bad:?}"
            );
        }
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
                    Err(IngestError::BadRequest(_))
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

    #[test]
    fn json_size_matches_compact_serialisation() {
        let v = json!({"a": [1, 2.5, null, true, false], "b": {"c": "d"}, "e": []});
        assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len());
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
