//! Kafka values -> typed messages, with the checks PostgreSQL would otherwise fail a whole
//! batch on. A value that fails here is dead-lettered with a reason; it never blocks its
//! partition.

use chrono::{DateTime, Duration, Utc};
use sluice_schema::messages::{
    self, EventMessage, IdentityMessage, RawObject, SessionMessage, VisitorMessage,
};

pub(crate) use sluice_schema::messages::JsonObject;
use sluice_schema::topics::DataTopic;

/// One decoded, valid message.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// An event row.
    /// Properties and context stay JSON text: the writer only passes them to `jsonb`.
    Event(Box<EventMessage<RawObject>>),
    /// A visitor merge.
    Visitor(Box<VisitorMessage>),
    /// A session merge.
    Session(Box<SessionMessage>),
    /// An identify or alias.
    Identity(Box<IdentityMessage>),
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone)]
pub(crate) struct Rejection {
    /// Short snake_case reason: header value and metric label (a fixed set).
    pub reason: &'static str,
    /// Human-readable detail (never message contents: they may hold PII).
    pub detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Time window an event's `occurred_at` must fall in to be stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeWindow {
    /// Oldest storable time (now minus retention).
    pub oldest: DateTime<Utc>,
    /// Newest storable time (end of the last month partitions are kept ahead for).
    pub newest: DateTime<Utc>,
}

impl TimeWindow {
    /// The window at `now` for the given retention and months ahead.
    pub fn at(now: DateTime<Utc>, retention_days: u32, months_ahead: u32) -> TimeWindow {
        TimeWindow {
            oldest: now - Duration::days(i64::from(retention_days)),
            // Partitions exist for months_ahead months; a day of slack beyond that would let
            // a skewed clock reach an uncreated month, which is created on demand anyway.
            newest: now + Duration::days(31 * i64::from(months_ahead.max(1))),
        }
    }
}

/// Decodes and checks one value from a data topic.
pub(crate) fn decode(
    kind: DataTopic,
    payload: Option<&[u8]>,
    window: &TimeWindow,
) -> Result<Decoded, Rejection> {
    let bytes = payload.ok_or_else(|| Rejection::new("malformed", "message has no value"))?;
    // PostgreSQL refuses NUL in text and the \u0000 escape in jsonb; one such value would
    // fail the whole COPY, so it is refused here. (A raw NUL byte is invalid JSON anyway.)
    if memchr_escape_nul(bytes) {
        return Err(Rejection::new(
            "invalid",
            "a string holds the NUL character (\\u0000), which PostgreSQL cannot store",
        ));
    }
    let decoded = match kind {
        DataTopic::Event => Decoded::Event(Box::new(read(bytes)?)),
        DataTopic::Visitor => Decoded::Visitor(Box::new(read(bytes)?)),
        DataTopic::Session => Decoded::Session(Box::new(read(bytes)?)),
        DataTopic::Identity => Decoded::Identity(Box::new(read(bytes)?)),
    };
    validate(&decoded, window)?;
    Ok(decoded)
}

fn read<T: serde::de::DeserializeOwned + messages::Versioned>(
    bytes: &[u8],
) -> Result<T, Rejection> {
    messages::decode::<T>(bytes).map_err(|err| Rejection::new(err.reason(), err.to_string()))
}

fn memchr_escape_nul(bytes: &[u8]) -> bool {
    bytes.windows(6).any(|w| w == b"\\u0000")
}

fn validate(msg: &Decoded, window: &TimeWindow) -> Result<(), Rejection> {
    let tenant = match msg {
        Decoded::Event(m) => m.tenant_id,
        Decoded::Visitor(m) => m.tenant_id,
        Decoded::Session(m) => m.tenant_id,
        Decoded::Identity(m) => m.tenant_id,
    };
    if tenant <= 0 {
        return Err(Rejection::new(
            "invalid",
            format!("tenant_id {tenant} is not a tenant"),
        ));
    }
    match msg {
        Decoded::Event(m) => {
            if m.occurred_at < window.oldest {
                return Err(Rejection::new(
                    "out_of_retention",
                    format!(
                        "occurred_at {} is older than the retention window",
                        m.occurred_at
                    ),
                ));
            }
            if m.occurred_at > window.newest {
                return Err(Rejection::new(
                    "too_far_in_future",
                    format!(
                        "occurred_at {} is beyond the partitions kept ahead",
                        m.occurred_at
                    ),
                ));
            }
        }
        Decoded::Visitor(m) => {
            if m.anonymous_id.is_empty() {
                return Err(Rejection::new("invalid", "visitor without anonymous_id"));
            }
        }
        Decoded::Session(m) => {
            if m.session_id.is_empty() {
                return Err(Rejection::new("invalid", "session without session_id"));
            }
        }
        Decoded::Identity(m) => {
            let has = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
            let ok = match m.kind {
                messages::IdentityKind::Identify => has(&m.user_id) || has(&m.anonymous_id),
                messages::IdentityKind::Alias => has(&m.user_id) && has(&m.previous_id),
            };
            if !ok {
                return Err(Rejection::new(
                    "invalid",
                    "identify needs userId or anonymousId; alias needs userId and previousId",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn window() -> TimeWindow {
        TimeWindow::at(Utc::now(), 30, 3)
    }

    fn event(occurred_at: DateTime<Utc>) -> Vec<u8> {
        let now = Utc::now();
        serde_json::to_vec(&json!({
            "v": 1, "tenant_id": 1, "workspace_id": 1,
            "event_id": messages::event_id(1, "m"), "message_id": "m", "type": "track",
            "occurred_at": occurred_at, "received_at": now,
        }))
        .unwrap()
    }

    #[test]
    fn valid_event_decodes() {
        assert!(matches!(
            decode(DataTopic::Event, Some(&event(Utc::now())), &window()),
            Ok(Decoded::Event(_))
        ));
    }

    #[test]
    fn old_event_is_out_of_retention() {
        let err = decode(
            DataTopic::Event,
            Some(&event(Utc::now() - Duration::days(31))),
            &window(),
        )
        .unwrap_err();
        assert_eq!(err.reason, "out_of_retention");
    }

    #[test]
    fn nul_escape_and_garbage_are_refused() {
        let bad = br#"{"v":1,"name":"a\u0000b"}"#;
        assert_eq!(
            decode(DataTopic::Event, Some(bad), &window())
                .unwrap_err()
                .reason,
            "invalid"
        );
        assert_eq!(
            decode(DataTopic::Visitor, Some(b"{nope"), &window())
                .unwrap_err()
                .reason,
            "malformed"
        );
        assert_eq!(
            decode(DataTopic::Session, None, &window())
                .unwrap_err()
                .reason,
            "malformed"
        );
    }
}
