//! Request bodies to validated messages, in stages: [`body`] undoes content encodings
//! (gzip, `text/plain` beacons, base64 `data=` forms), [`json`] guards (nesting depth,
//! surrogates, number range) and parses, [`segment`] reads each message's fields and applies
//! the Segment rules per call type, keeping `properties` and `context` as JSON text ([`raw`]
//! reads the few fields of them the collector needs), [`pixel`] reads the tracking pixel's
//! query, [`posthog`] maps PostHog's capture bodies. Any bytes end as parsed messages or a
//! [`PayloadError`] (a 4xx), never a panic.

pub mod body;
pub mod json;
pub mod pixel;
pub mod posthog;
pub(crate) mod raw;
pub mod segment;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sluice_schema::messages::{JsonObject, RawObject};

pub use body::{decode_base64, decode_body, pixel_data};
pub use segment::{parse, validate, Defaults};

/// Why a body cannot be taken: the request's answer is a 400 or a 413. It says what to send
/// instead; the collector's [`crate::IngestError`] wraps it.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The body is not a message the API accepts.
    #[error("malformed request: {0}")]
    BadRequest(String),
    /// The body, or one message, is over its size limit.
    #[error("{what} is over its limit of {limit} bytes; send smaller batches")]
    TooLarge {
        /// "request body" or "message".
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
}

impl PayloadError {
    /// The HTTP status of the error: 400 or 413.
    pub fn status(&self) -> StatusCode {
        match self {
            PayloadError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PayloadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The bounded metric label of the error.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::BadRequest(_) => "malformed",
            PayloadError::TooLarge { .. } => "too_large",
        }
    }
}

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
    /// PostHog's capture API (`/e/`, `/batch/`, ...), decoded by [`posthog`].
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
    /// Every kind, in declaration order: `Kind::ALL[k as usize] == k`.
    pub const ALL: [Kind; 7] = [
        Kind::Track,
        Kind::Page,
        Kind::Screen,
        Kind::Group,
        Kind::Identify,
        Kind::Alias,
        Kind::Pixel,
    ];

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

    /// The kind a batch message's `type` names.
    pub(crate) fn from_type(name: &str) -> Option<Kind> {
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
    /// `properties`, plus top-level fields the API does not define, as text: passed on.
    pub properties: RawObject,
    /// `traits` (identify, group): sealed or stripped of personal data, so read.
    pub traits: JsonObject,
    /// `context`, over the batch's context, plus SDK envelope fields (`integrations`, ...), as
    /// text: passed on, with what enrichment adds.
    pub context: RawObject,
    /// The fields of `context` and `properties` enrichment reads.
    pub peeked: Peeked,
}

/// What enrichment reads of a message's `context` and `properties`, read once when the message
/// is taken apart, so neither is ever parsed into a tree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Peeked {
    /// `context.page.url`, else `properties.url`.
    pub page_url: Option<String>,
    /// `context.page.referrer`, else `properties.referrer`; never empty.
    pub referrer: Option<String>,
    /// `context.userAgent`: a server SDK forwarding its end user's.
    pub user_agent: Option<String>,
    /// `context.ip`, as sent.
    pub ip: Option<String>,
    /// `context` has a `campaign`, of whatever value.
    pub has_campaign: bool,
    /// The text fields of `context.campaign`, under their UTM names (`name` as `campaign`).
    pub campaign_utm: JsonObject,
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

impl Parsed {
    /// Records a key a batch's message names (`noun` says which kind, for the error): the
    /// first is the request's, the others must be of its workspace (the caller checks).
    pub(crate) fn note_key(&mut self, key: &str, noun: &str) -> Result<(), PayloadError> {
        match &self.write_key {
            None => self.write_key = Some(key.to_owned()),
            Some(first) if first == key => {}
            Some(_) if self.other_keys.iter().any(|k| k == key) => {}
            Some(_) if self.other_keys.len() + 1 >= MAX_KEYS_PER_BATCH => {
                return Err(PayloadError::BadRequest(format!(
                    "a batch may name at most {MAX_KEYS_PER_BATCH} {noun}; send one key per request"
                )))
            }
            Some(_) => self.other_keys.push(key.to_owned()),
        }
        Ok(())
    }

    /// Adds message `index`: validated, or refused with its reason.
    pub(crate) fn push(
        &mut self,
        index: usize,
        message_id: Option<String>,
        checked: Result<Message, (Reason, String)>,
    ) {
        match checked {
            Ok(msg) => self.messages.push((index, msg)),
            Err((reason, detail)) => self.rejected.push(Rejected {
                index,
                message_id,
                reason,
                detail,
            }),
        }
    }
}

/// Most distinct write keys one batch may name: each costs a key check.
pub const MAX_KEYS_PER_BATCH: usize = 4;
