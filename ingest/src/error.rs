//! The collector's one error enum, and how each error becomes an HTTP answer: 400, 401, 403,
//! 413, 429 or 503 (with `Retry-After`). Every message tells the client what to do. A body's
//! own faults are [`PayloadError`]s, wrapped here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::payload::PayloadError;

/// Everything that can go wrong in the collector, at start-up or in a request.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body cannot be taken: malformed (400) or over a size limit (413).
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Every message of the request was refused; the body lists why.
    #[error("no message of the request was valid")]
    AllRejected(Vec<crate::payload::Rejected>),
    /// The client sent its body too slowly.
    #[error("the request body did not arrive within {0} ms; send it at once")]
    BodyTimeout(u64),
    /// No write key in the request.
    #[error("no write key: send it as the HTTP Basic user name, as a Bearer token, or as writeKey in the body (PostHog SDKs: the project key, as api_key or token)")]
    MissingKey,
    /// The key is not known (or not of the key's form).
    #[error("unknown write key: check the key, or create one with `sluice-schema key create`")]
    UnknownKey,
    /// The key was revoked.
    #[error("this write key was revoked: create a new one with `sluice-schema key create`")]
    KeyRevoked,
    /// The key is past its expiry.
    #[error("this write key has expired: create a new one with `sluice-schema key create`")]
    KeyExpired,
    /// The key may not write events.
    #[error("this write key has no write scope")]
    KeyScope,
    /// The body names a key of a workspace other than the authenticated key's.
    #[error("the writeKey in the body belongs to another workspace than the authenticated key; send one key")]
    WorkspaceMismatch,
    /// Over the key's rate limit.
    #[error("rate limit of this write key exceeded: retry after {retry_after_secs} s")]
    RateLimited {
        /// Seconds until enough tokens are back.
        retry_after_secs: u64,
    },
    /// Kafka did not acknowledge in time, or the producer queue is full.
    #[error("cannot store the events right now ({0}); retry after the Retry-After delay")]
    Unavailable(String, u64),
    /// The key store (PostgreSQL) cannot be reached to check an uncached key.
    #[error("cannot check the write key right now; retry after the Retry-After delay")]
    KeyStoreUnavailable(u64),
    /// A listener could not be bound or served.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Kafka producer could not be made from the configuration.
    #[error("invalid Kafka producer configuration: {0}; check SLUICE_KAFKA_BROKERS, SLUICE_KAFKA_PROPERTIES and SLUICE_PRODUCER_*")]
    KafkaConfig(String),
    /// A setting, or a file a setting names, is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database URL or pool is invalid.
    #[error("invalid database configuration: {0}; check SLUICE_DATABASE_URL")]
    DatabaseConfig(String),
    /// The PII keys are set but invalid.
    #[error("invalid PII configuration: {0}")]
    PiiConfig(String),
    /// The Prometheus recorder could not be installed.
    #[error("cannot install the metrics recorder: {0}")]
    Metrics(String),
}

impl IngestError {
    /// The HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            IngestError::Payload(err) => err.status(),
            IngestError::AllRejected(_) => StatusCode::BAD_REQUEST,
            IngestError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngestError::MissingKey | IngestError::UnknownKey => StatusCode::UNAUTHORIZED,
            IngestError::KeyRevoked
            | IngestError::KeyExpired
            | IngestError::KeyScope
            | IngestError::WorkspaceMismatch => StatusCode::FORBIDDEN,
            IngestError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Unavailable(..) | IngestError::KeyStoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            IngestError::Listen { .. }
            | IngestError::KafkaConfig(_)
            | IngestError::Config(_)
            | IngestError::DatabaseConfig(_)
            | IngestError::PiiConfig(_)
            | IngestError::Metrics(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A bounded label of why the request was refused, for metrics: the variant, or the first
    /// refused message's reason when every message was refused.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Payload(err) => err.reason(),
            IngestError::AllRejected(rejected) => rejected
                .first()
                .map_or("all_rejected", |r| r.reason.as_str()),
            IngestError::BodyTimeout(_) => "body_timeout",
            IngestError::MissingKey => "missing_key",
            IngestError::UnknownKey => "unknown_key",
            IngestError::KeyRevoked => "key_revoked",
            IngestError::KeyExpired => "key_expired",
            IngestError::KeyScope => "key_scope",
            IngestError::WorkspaceMismatch => "workspace_mismatch",
            IngestError::RateLimited { .. } => "rate_limited",
            IngestError::Unavailable(..) | IngestError::KeyStoreUnavailable(_) => "unavailable",
            IngestError::Listen { .. }
            | IngestError::KafkaConfig(_)
            | IngestError::Config(_)
            | IngestError::PiiConfig(_)
            | IngestError::DatabaseConfig(_)
            | IngestError::Metrics(_) => "internal",
        }
    }

    /// Seconds the client should wait before retrying, for 429 and 503.
    fn retry_after(&self) -> Option<u64> {
        match self {
            IngestError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            IngestError::Unavailable(_, secs) | IngestError::KeyStoreUnavailable(secs) => {
                Some(*secs)
            }
            _ => None,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = self.retry_after();
        let body = match &self {
            IngestError::AllRejected(rejected) => serde_json::json!({
                "success": false,
                "error": self.to_string(),
                "accepted": 0,
                "rejected": rejected,
            }),
            _ => serde_json::json!({ "success": false, "error": self.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
