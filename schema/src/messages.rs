//! The JSON values on Kafka topics (docs/architecture.md §3.3): what the collector produces and the
//! writer consumes.
//!
//! Every value carries `v`, the schema version. A writer refuses (dead-letters) a version it
//! does not know rather than guessing at its fields. Fields are added compatibly (optional,
//! with defaults) within a version; anything else is a new version on a new topic.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

mod time;

/// The message schema version this build produces and understands.
pub const VERSION: u16 = 1;

/// The version of identity messages this build produces: [`IdentityMessage`] with its PII
/// sealed by the collector ([`IdentityMessage::pii`]). Version 1 identity messages (plaintext
/// email and phone in `traits`, from collectors before sealing) are still read, so messages in
/// flight during an upgrade are stored; a writer older than this refuses version 2 to the DLQ
/// (`unsupported_version`) rather than dropping the sealed fields it does not know, so
/// writers are upgraded before collectors (docs/operations.md, "Upgrades").
pub const IDENTITY_VERSION: u16 = 2;

/// A JSON object, as kept in `properties`, `context`, `traits` and the JSONB columns.
pub type JsonObject = Map<String, Value>;

/// A JSON object kept as its text, for a reader that only passes it on: the writer hands
/// `properties` and `context` to PostgreSQL's `jsonb` as they came, since decoding them into
/// maps and writing them out again took a large share of its CPU. Deserialising checks that
/// the text is an object; the JSON syntax is checked by the deserialiser.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RawObject(Box<serde_json::value::RawValue>);

impl RawObject {
    /// The object's JSON text, as received.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// `raw` if it is an object, else `None`.
    pub fn new(raw: Box<serde_json::value::RawValue>) -> Option<RawObject> {
        raw.get()
            .trim_start()
            .starts_with('{')
            .then_some(RawObject(raw))
    }

    /// The text of `object`, written out.
    pub fn of(object: &JsonObject) -> RawObject {
        // Writing a map of string keys cannot fail.
        serde_json::value::to_raw_value(object)
            .map(RawObject)
            .unwrap_or_default()
    }

    /// The object as a map, for a reader that needs more than a few of its fields.
    pub fn to_object(&self) -> JsonObject {
        // The text is an object by construction.
        serde_json::from_str(self.get()).unwrap_or_default()
    }
}

impl Default for RawObject {
    /// `{}`, as a missing field of an [`EventMessage`] means.
    fn default() -> RawObject {
        RawObject(serde_json::value::to_raw_value(&JsonObject::new()).unwrap_or_default())
    }
}

impl PartialEq for RawObject {
    fn eq(&self, other: &RawObject) -> bool {
        self.get() == other.get()
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawObject, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        if raw.get().trim_start().starts_with('{') {
            Ok(RawObject(raw))
        } else {
            Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Other(raw.get()),
                &"a JSON object",
            ))
        }
    }
}

/// What kind of call produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// `POST /v1/track`: a named action.
    Track,
    /// `POST /v1/page`: a web page view.
    Page,
    /// `POST /v1/screen`: an app screen view.
    Screen,
    /// `POST /v1/group`: the user joined a group; `properties` holds `groupId` and `traits`.
    Group,
    /// `GET /v1/p.gif`: the tracking pixel.
    Pixel,
}

impl EventType {
    /// The name stored in the `event.type` column and used as a metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Pixel => "pixel",
        }
    }
}

/// One event, on [`crate::topics::EVENT`]. Becomes one row of the `event` table.
///
/// `J` is how `properties` and `context` are held: maps ([`JsonObject`]) where they are built
/// or read, their text ([`RawObject`]) where they are only passed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage<J = JsonObject> {
    /// Schema version, [`VERSION`].
    pub v: u16,
    /// Owning tenant (from the authenticated write key, never from the body).
    pub tenant_id: i64,
    /// Workspace of the write key.
    pub workspace_id: i64,
    /// Row id. Derived from `(tenant_id, message_id)` by [`event_id`], so a client retry of
    /// the same `messageId` yields the same id and the writer can drop the duplicate.
    pub event_id: Uuid,
    /// The client's `messageId`, or a server-made UUIDv7 when the client sent none.
    pub message_id: String,
    /// The kind of call.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Event name for track, page or screen name for page/screen; absent otherwise.
    #[serde(default)]
    pub name: Option<String>,
    /// Client-made visitor id (`anonymousId`).
    #[serde(default)]
    pub anonymous_id: Option<String>,
    /// Known user id (`userId`).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Client-made session id, when the SDK sends one.
    #[serde(default)]
    pub session_id: Option<String>,
    /// When it happened: the client `timestamp` corrected for clock skew
    /// (`received_at - (sent_at - timestamp)`), or `received_at` when the client sent none.
    #[serde(serialize_with = "time::write")]
    pub occurred_at: DateTime<Utc>,
    /// The client's own `timestamp`, uncorrected.
    #[serde(default, serialize_with = "time::write_opt")]
    pub timestamp: Option<DateTime<Utc>>,
    /// The client's `sentAt`.
    #[serde(default, serialize_with = "time::write_opt")]
    pub sent_at: Option<DateTime<Utc>>,
    /// When the collector received the request.
    #[serde(serialize_with = "time::write")]
    pub received_at: DateTime<Utc>,
    /// Event properties, including any top-level fields the API does not define.
    #[serde(default)]
    pub properties: J,
    /// Context (page, campaign/UTM, device, library, ...), enriched by the collector.
    #[serde(default)]
    pub context: J,
    /// Client IP address (from the socket or a trusted proxy's `X-Forwarded-For`).
    #[serde(default)]
    pub ip: Option<String>,
    /// The request's `User-Agent`.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// True when the user agent looks like a crawler or bot (flagged, never dropped).
    #[serde(default)]
    pub bot: bool,
}

/// First-touch attribution of a visitor or session: kept from the earliest message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Touch {
    /// UTM parameters (`source`, `medium`, `campaign`, `term`, `content`).
    #[serde(default)]
    pub utm: JsonObject,
    /// Referrer URL.
    #[serde(default)]
    pub referrer: Option<String>,
    /// URL of the first page.
    #[serde(default)]
    pub landing_page: Option<String>,
}

/// A visitor seen in one collector request, on [`crate::topics::VISITOR`]. The writer merges
/// these into the `visitor` table: `first_seen_at` least, `last_seen_at` greatest,
/// `event_count` added, first touch kept from the earliest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisitorMessage {
    /// Schema version, [`VERSION`].
    pub v: u16,
    /// Owning tenant.
    pub tenant_id: i64,
    /// Workspace of the write key.
    pub workspace_id: i64,
    /// Client-made visitor id, unique only inside its tenant.
    pub anonymous_id: String,
    /// Known user id, when the request carried one.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Earliest `occurred_at` of the request's messages for this visitor.
    #[serde(serialize_with = "time::write")]
    pub first_seen_at: DateTime<Utc>,
    /// Latest `occurred_at` of the request's messages for this visitor.
    #[serde(serialize_with = "time::write")]
    pub last_seen_at: DateTime<Utc>,
    /// How many events of this visitor the request carried.
    pub event_count: i64,
    /// Attribution of the earliest message.
    #[serde(default)]
    pub first_touch: Touch,
    /// The request's `User-Agent`.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// True when the user agent looks like a bot.
    #[serde(default)]
    pub bot: bool,
}

/// A session seen in one collector request, on [`crate::topics::SESSION`]. Merged like
/// visitors: `started_at` least, `last_seen_at` greatest, counters added.
///
/// `J` is how `device` and `geo` are held, as in [`EventMessage`]: the collector writes the
/// fields it picked from `context` as their text ([`RawObject`]), the writer reads maps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionMessage<J = JsonObject> {
    /// Schema version, [`VERSION`].
    pub v: u16,
    /// Owning tenant.
    pub tenant_id: i64,
    /// Workspace of the write key.
    pub workspace_id: i64,
    /// Client-made session id, unique only inside its tenant.
    pub session_id: String,
    /// Visitor of the session.
    #[serde(default)]
    pub anonymous_id: Option<String>,
    /// Known user id, when the request carried one.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Earliest `occurred_at` of the request's messages in this session.
    #[serde(serialize_with = "time::write")]
    pub started_at: DateTime<Utc>,
    /// Latest `occurred_at` of the request's messages in this session.
    #[serde(serialize_with = "time::write")]
    pub last_seen_at: DateTime<Utc>,
    /// Events of this session in the request.
    pub event_count: i64,
    /// Page and screen views of this session in the request.
    pub page_count: i64,
    /// Attribution of the earliest message.
    #[serde(default)]
    pub first_touch: Touch,
    /// Device facts (`context.device`, `context.os`, user agent, screen).
    #[serde(default)]
    pub device: J,
    /// Location facts (`context.location`, `context.timezone`, `context.locale`).
    #[serde(default)]
    pub geo: J,
}

/// What an identity message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// `POST /v1/identify`: ties `anonymous_id` to `user_id` and sets traits.
    Identify,
    /// `POST /v1/alias`: `previous_id` and `user_id` are the same person.
    Alias,
}

/// One personal value sealed by the collector: what `lead.{email,phone}_ciphertext` and
/// `lead.{email,phone}_fingerprint` store, in base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedField {
    /// Base64 (standard, padded) of `nonce || AES-256-GCM ciphertext || tag`
    /// ([`crate::pii::Sealed::ciphertext`]).
    pub ciphertext: String,
    /// Base64 of the HMAC-SHA256 fingerprint of the normalised value; absent when the value is
    /// not shaped like an email or phone number (stored, but matched by nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl SealedField {
    /// The ciphertext and fingerprint as bytes; `None` when either is not base64.
    pub fn decode(&self) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let ciphertext = b64.decode(&self.ciphertext).ok()?;
        let fingerprint = match &self.fingerprint {
            Some(fp) => Some(b64.decode(fp).ok()?),
            None => None,
        };
        Some((ciphertext, fingerprint))
    }
}

impl std::fmt::Debug for SealedField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedField")
            .field("ciphertext_len", &self.ciphertext.len())
            .field("fingerprint", &self.fingerprint.is_some())
            .finish()
    }
}

/// The email and phone of an identify, sealed in the collector with the active PII key
/// (`SLUICE_PII_ACTIVE_KEY`), so no plaintext personal data is ever on a topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedPii {
    /// Id of the key both values are sealed under.
    pub key_id: String,
    /// The `email` trait, if the call had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<SealedField>,
    /// The `phone` trait, if the call had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<SealedField>,
}

/// An identify or alias call, on [`crate::topics::IDENTITY`]. The writer turns it into a
/// `lead` (PII encrypted, matched by fingerprint) and `identity_link` rows.
///
/// Version [`IDENTITY_VERSION`]: email and phone are in [`IdentityMessage::pii`], sealed, and
/// the other traits configured as personal data (`SLUICE_PII_TRAITS`) are sealed in place in
/// `traits` as `{"$sealed": {"key_id": .., "ciphertext": ..}}`. Version 1 (older collectors)
/// may hold plaintext email and phone in `traits`: the writer seals them before they reach
/// PostgreSQL, and they must never be logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityMessage {
    /// Schema version: [`IDENTITY_VERSION`], or 1 from collectors that did not seal.
    pub v: u16,
    /// Owning tenant.
    pub tenant_id: i64,
    /// Workspace of the write key.
    pub workspace_id: i64,
    /// Identify or alias.
    pub kind: IdentityKind,
    /// The client's `messageId` (or a server-made UUIDv7).
    pub message_id: String,
    /// Client-made visitor id.
    #[serde(default)]
    pub anonymous_id: Option<String>,
    /// Known user id.
    #[serde(default)]
    pub user_id: Option<String>,
    /// For alias: the id being merged into `user_id`.
    #[serde(default)]
    pub previous_id: Option<String>,
    /// Traits as sent (identify); empty for alias.
    #[serde(default)]
    pub traits: JsonObject,
    /// Context, enriched by the collector.
    #[serde(default)]
    pub context: JsonObject,
    /// When it happened, skew-corrected like [`EventMessage::occurred_at`].
    #[serde(serialize_with = "time::write")]
    pub occurred_at: DateTime<Utc>,
    /// When the collector received the request.
    #[serde(serialize_with = "time::write")]
    pub received_at: DateTime<Utc>,
    /// Email and phone sealed by the collector (version 2); `None` when the call had neither,
    /// and always in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii: Option<SealedPii>,
}

/// Namespace of [`event_id`]'s name-based UUIDs.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f1c_e0a4_97d3_4c1e_8a5b_2f6d_1e3c_9b70);

/// The row id of an event: a name-based (v5) UUID of the tenant and the client's `messageId`,
/// so the same `messageId` retried by a client maps to the same row id within a tenant, and
/// two tenants' equal `messageId`s do not meet.
///
/// The same UUID as `Uuid::new_v5(&namespace, "{tenant_id}/{message_id}")`, hashed in parts:
/// the collector makes one an event, and writing the name out cost two allocations each.
pub fn event_id(tenant_id: i64, message_id: &str) -> Uuid {
    let mut hash = sha1_smol::Sha1::from(EVENT_ID_NAMESPACE.as_bytes());
    hash.update(itoa::Buffer::new().format(tenant_id).as_bytes());
    hash.update(b"/");
    hash.update(message_id.as_bytes());
    let digest = hash.digest().bytes();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// Why a Kafka value could not be read as a sluice message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The value is not JSON of the expected shape.
    #[error("not a valid message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The value's `v` is one this build does not understand; upgrade the writer.
    #[error("unsupported message version {found} (this build reads version {VERSION}); upgrade the writer")]
    UnsupportedVersion {
        /// The version found in the message.
        found: u16,
    },
}

impl DecodeError {
    /// A short snake_case reason, used as the DLQ header and metric label.
    pub const fn reason(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
        }
    }
}

/// A message type with a schema version field.
pub trait Versioned {
    /// The message's `v`.
    fn version(&self) -> u16;

    /// True for the versions this build reads (by default only [`VERSION`]).
    fn reads(version: u16) -> bool {
        version == VERSION
    }
}

macro_rules! versioned {
    ($($t:ty),*) => { $(impl Versioned for $t { fn version(&self) -> u16 { self.v } })* };
}
impl<J> Versioned for EventMessage<J> {
    fn version(&self) -> u16 {
        self.v
    }
}
versioned!(VisitorMessage, SessionMessage);

impl Versioned for IdentityMessage {
    fn version(&self) -> u16 {
        self.v
    }

    fn reads(version: u16) -> bool {
        version == VERSION || version == IDENTITY_VERSION
    }
}

/// Reads one Kafka value as message `T`, refusing versions this build does not know.
pub fn decode<T: DeserializeOwned + Versioned>(bytes: &[u8]) -> Result<T, DecodeError> {
    let msg: T = serde_json::from_slice(bytes)?;
    match msg.version() {
        v if T::reads(v) => Ok(msg),
        found => Err(DecodeError::UnsupportedVersion { found }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample_event() -> EventMessage {
        let now = Utc::now();
        EventMessage {
            v: VERSION,
            tenant_id: 1,
            workspace_id: 2,
            event_id: event_id(1, "m-1"),
            message_id: "m-1".into(),
            kind: EventType::Track,
            name: Some("Signed Up".into()),
            anonymous_id: Some("a-1".into()),
            user_id: None,
            session_id: Some("s-1".into()),
            occurred_at: now,
            timestamp: Some(now),
            sent_at: Some(now),
            received_at: now,
            properties: json!({"plan": "pro", "nested": {"x": [1, 2]}})
                .as_object()
                .cloned()
                .unwrap(),
            context: JsonObject::new(),
            ip: Some("203.0.113.9".into()),
            user_agent: Some("Mozilla/5.0".into()),
            bot: false,
        }
    }

    #[test]
    fn event_round_trips_through_json() {
        let msg = sample_event();
        let bytes = serde_json::to_vec(&msg).unwrap();
        let back: EventMessage = decode(&bytes).unwrap();
        assert_eq!(back, msg);
        let raw: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(raw["v"], 1);
        assert_eq!(raw["type"], "track");
    }

    #[test]
    fn an_event_read_with_raw_objects_keeps_their_text_and_refuses_non_objects() {
        let msg = sample_event();
        let bytes = serde_json::to_vec(&msg).unwrap();
        let raw: EventMessage<RawObject> = decode(&bytes).unwrap();
        assert_eq!(raw.event_id, msg.event_id);
        assert_eq!(raw.occurred_at, msg.occurred_at);
        let props: JsonObject = serde_json::from_str(raw.properties.get()).unwrap();
        assert_eq!(props, msg.properties);
        assert_eq!(raw.context.get(), "{}");
        // Serialised again, it is the same message.
        let again: EventMessage = decode(&serde_json::to_vec(&raw).unwrap()).unwrap();
        assert_eq!(again, msg);

        let mut value = serde_json::to_value(&msg).unwrap();
        value.as_object_mut().unwrap().remove("context");
        let defaulted: EventMessage<RawObject> =
            decode(&serde_json::to_vec(&value).unwrap()).unwrap();
        assert_eq!(defaulted.context, RawObject::default());
        assert_eq!(defaulted.context.get(), "{}");
        for bad in [json!([1]), json!("x"), json!(null), json!(3)] {
            value["properties"] = bad.clone();
            let err = decode::<EventMessage<RawObject>>(&serde_json::to_vec(&value).unwrap())
                .unwrap_err();
            assert!(err.to_string().contains("a JSON object"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_version_is_refused_with_its_reason() {
        let mut raw = serde_json::to_value(sample_event()).unwrap();
        raw["v"] = json!(2);
        let err = decode::<EventMessage>(&serde_json::to_vec(&raw).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "unsupported_version");
        assert!(err.to_string().contains("upgrade the writer"));
    }

    #[test]
    fn garbage_is_malformed() {
        let err = decode::<VisitorMessage>(b"{not json").unwrap_err();
        assert_eq!(err.reason(), "malformed");
    }

    #[test]
    fn event_id_is_stable_per_tenant_and_message() {
        assert_eq!(event_id(1, "abc"), event_id(1, "abc"));
        assert_ne!(event_id(1, "abc"), event_id(2, "abc"));
        assert_ne!(event_id(1, "abc"), event_id(1, "abd"));
        // "1" + "2/x" must not meet "12" + "/x".
        assert_ne!(event_id(1, "2/x"), event_id(12, "x"));
        // The ids already stored were made by `Uuid::new_v5` of the whole name: the same ids.
        for (tenant, id) in [
            (1, "abc"),
            (-42, ""),
            (i64::MAX, "é/ü"),
            (7, &*"m".repeat(300)),
        ] {
            let name = format!("{tenant}/{id}");
            assert_eq!(
                event_id(tenant, id),
                Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes()),
                "{name}"
            );
        }
    }

    #[test]
    fn identity_and_session_round_trip() {
        let now = Utc::now();
        let id = IdentityMessage {
            v: VERSION,
            tenant_id: 1,
            workspace_id: 2,
            kind: IdentityKind::Alias,
            message_id: "m".into(),
            anonymous_id: None,
            user_id: Some("u".into()),
            previous_id: Some("p".into()),
            traits: JsonObject::new(),
            context: JsonObject::new(),
            occurred_at: now,
            received_at: now,
            pii: None,
        };
        let back: IdentityMessage = decode(&serde_json::to_vec(&id).unwrap()).unwrap();
        assert_eq!(back, id);
        // Version 2 carries sealed PII; both versions are read, 3 is not.
        let sealed = IdentityMessage {
            v: IDENTITY_VERSION,
            kind: IdentityKind::Identify,
            pii: Some(SealedPii {
                key_id: "k2".into(),
                email: Some(SealedField {
                    ciphertext: "AAAA".into(),
                    fingerprint: Some("BBBB".into()),
                }),
                phone: None,
            }),
            ..id.clone()
        };
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(
            !text.contains("\"phone\""),
            "absent fields are left out: {text}"
        );
        let back: IdentityMessage = decode(text.as_bytes()).unwrap();
        assert_eq!(back, sealed);
        let future = IdentityMessage { v: 3, ..id };
        let err = decode::<IdentityMessage>(&serde_json::to_vec(&future).unwrap()).unwrap_err();
        assert_eq!(err.reason(), "unsupported_version");
        // Other messages stay at version 1 only.
        assert!(!VisitorMessage::reads(IDENTITY_VERSION));
        let s = SessionMessage {
            v: VERSION,
            tenant_id: 1,
            workspace_id: 2,
            session_id: "s".into(),
            anonymous_id: Some("a".into()),
            user_id: None,
            started_at: now,
            last_seen_at: now,
            event_count: 3,
            page_count: 1,
            first_touch: Touch::default(),
            device: JsonObject::new(),
            geo: JsonObject::new(),
        };
        let back: SessionMessage = decode(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
