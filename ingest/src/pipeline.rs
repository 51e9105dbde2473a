//! The one request path every API endpoint shares, as stages: read (bounded in size and
//! time) -> decode -> authorize -> limit -> enrich -> produce, answering 200 only after Kafka
//! acknowledged every message; and the answer each outcome becomes, with its metrics.

use std::net::IpAddr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::auth::{key_from_headers, KeyStore, Principal};
use crate::enrich::{self, client_ip, Outgoing, RequestFacts};
use crate::error::IngestError;
use crate::metrics;
use crate::payload::{self, pixel, posthog, Endpoint, Kind, Message, Parsed, PayloadError};
use crate::payload::{Reason, Rejected};
use crate::produce::{records, Sink};
use crate::routes::App;
use crate::seal;

/// A 1x1 transparent GIF.
const PIXEL_GIF: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Answers one API request and records its metrics.
pub(crate) async fn ingest<S: Sink, K: KeyStore>(
    app: Arc<App<S, K>>,
    endpoint: Endpoint,
    req: Request,
) -> Response {
    let started = Instant::now();
    let label = endpoint.as_str();
    let is_pixel = matches!(
        endpoint,
        Endpoint::Single(Kind::Pixel) | Endpoint::SegmentPixel(_)
    );
    // Pixels are GETs: nothing to read. A body refused before it was read to its end (too
    // large, bad key, too slow) is left on the connection, which hyper therefore closes.
    let mut body_read = is_pixel;
    let response = match handle(&app, endpoint, req, &mut body_read).await {
        Ok(_) if is_pixel => pixel_answer(),
        // What PostHog's SDKs read as success.
        Ok((accepted, rejected)) if endpoint == Endpoint::PostHog => Json(Answer {
            status: Some(1),
            success: None,
            accepted,
            rejected,
        })
        .into_response(),
        Ok((accepted, rejected)) => Json(Answer {
            status: None,
            success: Some(true),
            accepted,
            rejected,
        })
        .into_response(),
        Err(err) => refusal_answer(label, err, body_read),
    };
    metrics::request_answered(label, response.status());
    metrics::request_duration(label, started.elapsed());
    response
}

/// A request's success answer, written straight from its fields (a `json!` map cost a tree
/// and three keys of allocations a request). PostHog's SDKs read `status`, Segment's
/// `success`.
#[derive(Serialize)]
struct Answer {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    success: Option<bool>,
    accepted: usize,
    rejected: Vec<Rejected>,
}

/// The pixel's answer: the GIF, never cached.
fn pixel_answer() -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/gif")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache, no-store, must-revalidate, private"),
            ),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
            (header::EXPIRES, HeaderValue::from_static("0")),
        ],
        PIXEL_GIF.as_slice(),
    )
        .into_response()
}

/// A failed request's answer: logged when it is the collector's fault, counted when the
/// client's.
fn refusal_answer(label: &'static str, err: IngestError, body_read: bool) -> Response {
    if err.status().is_server_error() {
        tracing::warn!(endpoint = label, cause = %err, "request failed");
    } else if err.status().is_client_error() {
        metrics::request_refused(label, err.reason());
    }
    let mut response = err.into_response();
    if !body_read {
        // Said, so that a client reusing connections does not send its next request
        // into one that is about to close (and lose it without an answer).
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The pipeline. Returns the accepted count and the refused messages.
async fn handle<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    endpoint: Endpoint,
    req: Request,
    body_read: &mut bool,
) -> Result<(usize, Vec<Rejected>), IngestError> {
    let received_at = Utc::now();
    let (parts, body) = req.into_parts();
    let head = Head::of(app, &parts)?;
    // A key in the headers is checked before the body is even read, so unauthenticated
    // floods cost no parsing.
    let header_principal = match &head.header_key {
        Some(key) => Some(app.auth.authenticate(key).await?),
        None => None,
    };
    let raw = read(app, endpoint, body, body_read).await?;
    let mut parsed = decode(app, endpoint, &head, &raw, received_at)?;
    // Nothing borrows the body past the parse. Freed now, its memory serves the next
    // request on this thread while still in cache, rather than sitting out the Kafka round
    // trip while hundreds of other requests allocate (a tenth of the collector's CPU was
    // malloc waiting for the memory of blocks freed long before).
    drop(raw);
    let principal = authorize(app, header_principal, &head, &mut parsed).await?;
    limit(app, principal, &parsed)?;
    let batch = enrich(app, endpoint, &head, principal, received_at, parsed)?;
    produce(app, batch).await
}

/// What the request's head says, before its body is read.
struct Head<'a> {
    /// The client's address, after trusted proxies.
    ip: Option<IpAddr>,
    user_agent: Option<String>,
    /// A key in `Authorization`.
    header_key: Option<String>,
    query: &'a str,
    content_encoding: Option<&'a str>,
    content_type: Option<&'a str>,
}

impl<'a> Head<'a> {
    /// The head of `parts`; a body announced over the limit is refused before a byte of it
    /// is read.
    fn of<S, K>(app: &App<S, K>, parts: &'a Parts) -> Result<Head<'a>, PayloadError> {
        let headers = &parts.headers;
        let announced =
            text(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > app.limits.max_request_bytes as u64) {
            return Err(PayloadError::TooLarge {
                what: "request body",
                limit: app.limits.max_request_bytes,
            });
        }
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr);
        Ok(Head {
            ip: peer.map(|peer| client_ip(peer, headers, &app.config.trusted_proxies)),
            user_agent: text(headers, header::USER_AGENT).map(str::to_owned),
            header_key: key_from_headers(headers),
            query: parts.uri.query().unwrap_or_default(),
            content_encoding: text(headers, header::CONTENT_ENCODING),
            content_type: text(headers, header::CONTENT_TYPE),
        })
    }
}

/// A header's value, if it is text.
fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Stage 1: the body, bounded in size and time. Pixels have none: their message is in the query.
async fn read<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    endpoint: Endpoint,
    body: Body,
    body_read: &mut bool,
) -> Result<Vec<u8>, IngestError> {
    if matches!(
        endpoint,
        Endpoint::Single(Kind::Pixel) | Endpoint::SegmentPixel(_)
    ) {
        return Ok(Vec::new());
    }
    let read_timeout = app.config.body_read_timeout_ms;
    let raw = tokio::time::timeout(
        Duration::from_millis(read_timeout),
        read_body(body, app.limits.max_request_bytes),
    )
    .await
    .map_err(|_| IngestError::BodyTimeout(read_timeout))??;
    *body_read = true;
    Ok(raw)
}

/// Reads a body up to `max` bytes; one byte more is a 413, without reading the rest.
pub(crate) async fn read_body(body: Body, max: usize) -> Result<Vec<u8>, PayloadError> {
    // Sized up front by the `Content-Length` (the body's size hint), never past `max`: growing
    // the buffer by doubling copied a batch's body three or four times.
    let announced = usize::try_from(body.size_hint().lower()).unwrap_or(max);
    let mut out = Vec::with_capacity(announced.min(max));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| PayloadError::BadRequest(format!("cannot read the body ({e})")))?;
        if out.len() + chunk.len() > max {
            return Err(PayloadError::TooLarge {
                what: "request body",
                limit: max,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Stage 2: the request's messages (or their refusals) and the keys its body names.
fn decode<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    endpoint: Endpoint,
    head: &Head<'_>,
    raw: &[u8],
    received_at: DateTime<Utc>,
) -> Result<Parsed, PayloadError> {
    let limits = &app.limits;
    let (encoding, content_type) = (head.content_encoding, head.content_type);
    match endpoint {
        Endpoint::Single(Kind::Pixel) => pixel::parse(head.query, limits),
        // Segment's pixel carries a whole API message: parsed and checked as a body is.
        Endpoint::SegmentPixel(_) => {
            payload::parse(&payload::pixel_data(head.query)?, endpoint, limits)
        }
        Endpoint::PostHog => {
            let json = posthog::decode(raw, head.query, encoding, content_type, limits)?;
            metrics::request_body(json.len());
            posthog::parse(&json, head.query, received_at, limits)
        }
        Endpoint::Batch | Endpoint::Single(_) => {
            let json = payload::decode_body(raw, encoding, content_type, limits)?;
            metrics::request_body(json.len());
            payload::parse(&json, endpoint, limits)
        }
    }
}

/// Stage 3: who the request is made with. Every other key a batch's messages name must be of
/// the same workspace: the messages are stored in the authenticated one whatever they say.
async fn authorize<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    header_principal: Option<Principal>,
    head: &Head<'_>,
    parsed: &mut Parsed,
) -> Result<Principal, IngestError> {
    let body_key = parsed.write_key.take();
    let header_key = head.header_key.as_deref();
    let principal = principal_of(app, header_principal, header_key, body_key.as_deref()).await?;
    for other in &parsed.other_keys {
        principal_of(app, Some(principal), None, Some(other)).await?;
    }
    Ok(principal)
}

/// Which key the request is made with. A key in the headers wins; a different `writeKey` in
/// the body must be of the same workspace, so a body cannot redirect data into another
/// workspace than the one its request authenticated for.
async fn principal_of<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    header_principal: Option<Principal>,
    header_key: Option<&str>,
    body_key: Option<&str>,
) -> Result<Principal, IngestError> {
    match (header_principal, body_key) {
        (Some(p), None) => Ok(p),
        (Some(p), Some(body)) if Some(body) == header_key => Ok(p),
        (Some(p), Some(body)) => match app.auth.authenticate(body).await {
            Ok(other) if other.workspace_id == p.workspace_id && other.tenant_id == p.tenant_id => {
                Ok(p)
            }
            Ok(_)
            | Err(
                IngestError::UnknownKey
                | IngestError::KeyRevoked
                | IngestError::KeyExpired
                | IngestError::KeyScope,
            ) => Err(IngestError::WorkspaceMismatch),
            Err(err) => Err(err),
        },
        (None, Some(body)) => app.auth.authenticate(body).await,
        (None, None) => Err(IngestError::MissingKey),
    }
}

/// Stage 4: every message, refused ones too, costs a token of the key's bucket.
fn limit<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    principal: Principal,
    parsed: &Parsed,
) -> Result<(), IngestError> {
    let cost =
        u32::try_from((parsed.messages.len() + parsed.rejected.len()).max(1)).unwrap_or(u32::MAX);
    app.limiter
        .check(principal.key_id, cost, Instant::now())
        .map_err(|retry_after_secs| {
            metrics::rate_limited();
            IngestError::RateLimited { retry_after_secs }
        })
}

/// A request's messages ready for Kafka, and what to count once Kafka answered.
struct Enriched {
    out: Outgoing,
    /// Accepted messages per [`Kind`] (indexed by `Kind as usize`).
    counts: [u64; Kind::ALL.len()],
    accepted: usize,
    rejected: Vec<Rejected>,
    /// The endpoint's type label for refused messages.
    rejected_kind: &'static str,
}

/// Stage 5: identifies that cannot be sealed refused, the rest enriched with the request's
/// facts and their personal data sealed (or stripped). A request left with no message is a
/// 400.
fn enrich<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    endpoint: Endpoint,
    head: &Head<'_>,
    principal: Principal,
    received_at: DateTime<Utc>,
    parsed: Parsed,
) -> Result<Enriched, IngestError> {
    let Parsed {
        mut messages,
        mut rejected,
        ..
    } = parsed;
    if app.sealer.is_none() {
        refuse_unsealable(&mut messages, &mut rejected);
    }
    for r in &rejected {
        metrics::message_rejected(r.reason.as_str());
    }
    if messages.is_empty() {
        return Err(if rejected.is_empty() {
            PayloadError::BadRequest("the batch is empty".into()).into()
        } else {
            IngestError::AllRejected(rejected)
        });
    }
    if let Some(sent) = messages.iter().find_map(|(_, m)| m.sent_at) {
        let skew = (received_at - sent).num_milliseconds().unsigned_abs() as f64 / 1000.0;
        metrics::clock_skew(skew);
    }
    let mut counts = [0u64; Kind::ALL.len()];
    for (_, m) in &messages {
        counts[m.kind as usize] += 1;
    }
    let facts = RequestFacts {
        principal,
        received_at,
        ip: head.ip,
        user_agent: head.user_agent.clone(),
        max_future: i64::try_from(app.config.max_future_ms)
            .ok()
            .and_then(chrono::TimeDelta::try_milliseconds)
            .unwrap_or(chrono::TimeDelta::MAX),
    };
    let accepted = messages.len();
    let mut out = enrich::enrich(messages.into_iter().map(|(_, m)| m).collect(), &facts);
    match &app.sealer {
        Some(sealer) => sealer.seal(&mut out),
        None => seal::strip_without_keys(&mut out, &app.config.pii_traits),
    }
    Ok(Enriched {
        out,
        counts,
        accepted,
        rejected,
        // A refused message's type may be the very thing wrong with it.
        rejected_kind: match endpoint {
            Endpoint::Single(kind) | Endpoint::SegmentPixel(kind) => kind.as_str(),
            Endpoint::Batch | Endpoint::PostHog => "unknown",
        },
    })
}

/// Without PII keys, plaintext email or phone must not reach Kafka: those identifies are
/// moved from `messages` to `rejected`.
fn refuse_unsealable(messages: &mut Vec<(usize, Message)>, rejected: &mut Vec<Rejected>) {
    if !messages.iter().any(|(_, m)| seal::needs_keys(m)) {
        return;
    }
    let (refused, kept): (Vec<_>, Vec<_>) = std::mem::take(messages)
        .into_iter()
        .partition(|(_, m)| seal::needs_keys(m));
    *messages = kept;
    rejected.extend(refused.into_iter().map(|(index, m)| Rejected {
        index,
        message_id: m.message_id,
        reason: Reason::PiiKeysMissing,
        detail: "identify carries an email or phone, and this collector has no PII keys to seal it: set SLUICE_PII_KEYS and SLUICE_PII_ACTIVE_KEY (the writer's) and send it again".into(),
    }));
    rejected.sort_by_key(|r| r.index);
}

/// Stage 6: the records sent, awaiting every acknowledgement; the messages counted by how
/// that ended.
async fn produce<S: Sink, K: KeyStore>(
    app: &App<S, K>,
    batch: Enriched,
) -> Result<(usize, Vec<Rejected>), IngestError> {
    let records = records(&batch.out)
        .map_err(|e| PayloadError::BadRequest(format!("cannot encode a message ({e})")))?;
    // The messages are in the records now; as for the body in `handle`, their memory is
    // freed before the wait for Kafka rather than after it.
    let Enriched {
        out,
        counts,
        accepted,
        rejected,
        rejected_kind,
    } = batch;
    drop(out);
    metrics::producer_queue(app.sink.queue_depth());
    let sent = app.sink.send(records).await;
    let outcome = if sent.is_ok() { "accepted" } else { "failed" };
    for kind in Kind::ALL {
        let n = counts[kind as usize];
        if n > 0 {
            metrics::messages(kind.as_str(), outcome, n);
        }
    }
    if !rejected.is_empty() {
        metrics::messages(rejected_kind, "rejected", rejected.len() as u64);
    }
    if let Err(err) = sent {
        metrics::kafka_error(err.reason());
        return Err(IngestError::Unavailable(
            err.to_string(),
            app.config.retry_after_secs(),
        ));
    }
    Ok((accepted, rejected))
}
