//! The HTTP API: routes, CORS, and the one request pipeline every endpoint shares:
//! read body (bounded) -> authenticate -> decode + parse -> rate limit -> enrich -> produce
//! -> answer only after Kafka acknowledged everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tower_http::cors::{Any, CorsLayer};

use crate::auth::{key_from_headers, Authenticator, KeyStore, Principal};
use crate::config::Config;
use crate::enrich::{client_ip, enrich, RequestFacts};
use crate::error::IngestError;
use crate::health::healthz;
use crate::limits::RateLimiter;
use crate::metrics;
use crate::payload::{self, Defaults, Endpoint, Kind, Limits, Parsed, Rejected};
use crate::posthog;
use crate::produce::{records, Sink};
use crate::seal::{self, Sealer};
use sluice_schema::readiness::Readiness;

/// Everything a request handler needs, shared by all requests.
pub struct App<S, K> {
    /// Settings.
    pub config: Config,
    /// Size and shape bounds, from `config`.
    pub limits: Limits,
    /// Where records go.
    pub sink: S,
    /// Key checks.
    pub auth: Authenticator<K>,
    /// Per-key token buckets.
    pub limiter: RateLimiter,
    /// Readiness, for `/readyz`.
    pub health: Readiness,
    /// Seals personal data before it is produced; `None` without PII keys.
    pub sealer: Option<Sealer>,
}

impl<S: Sink, K: KeyStore> App<S, K> {
    /// The shared state of a collector over `sink` and `store`.
    pub fn new(config: Config, sink: S, store: K) -> App<S, K> {
        let auth = Authenticator::new(
            store,
            Duration::from_millis(config.key_cache_ttl_ms),
            Duration::from_millis(config.key_cache_negative_ttl_ms),
            config.key_cache_max_entries,
            config.retry_after_secs(),
        );
        ::metrics::gauge!(metrics::RATE_LIMIT_PER_COLLECTOR)
            .set(f64::from(config.rate_limit_per_collector()));
        App {
            limits: Limits::from_config(&config),
            limiter: RateLimiter::new(
                config.rate_limit_per_collector(),
                config.rate_limit_burst_messages,
                config.key_cache_max_entries,
            ),
            auth,
            sink,
            health: Readiness::default(),
            sealer: None,
            config,
        }
    }

    /// The same app sealing personal data with `sealer` (see [`crate::seal`]).
    pub fn with_sealer(mut self, sealer: Option<Sealer>) -> App<S, K> {
        self.sealer = sealer;
        self
    }
}

/// What the per-endpoint handlers return.
type HandlerFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>;

/// The public API's routes. Segment's short paths (`/v1/t`, `/v1/p`, ...) are the ones
/// analytics.js posts to, so they are served too, and so is Segment's pixel API
/// (`/v1/pixel/<type>`), for `<img>` tags written for Segment.
pub fn router<S: Sink, K: KeyStore>(app: Arc<App<S, K>>) -> Router {
    fn on<S: Sink, K: KeyStore>(
        endpoint: Endpoint,
    ) -> impl Fn(State<Arc<App<S, K>>>, Request) -> HandlerFuture + Clone + Send + Sync + 'static
    {
        move |State(app), req| Box::pin(async move { ingest(app, endpoint, req).await })
    }
    let single = |kind| Endpoint::Single(kind);
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
        ])
        .max_age(Duration::from_secs(86_400));
    let segment_pixels = [
        Kind::Track,
        Kind::Page,
        Kind::Screen,
        Kind::Group,
        Kind::Identify,
        Kind::Alias,
    ]
    .into_iter()
    .fold(Router::new(), |routes, kind| {
        routes.route(
            &format!("/v1/pixel/{}", kind.as_str()),
            get(on::<S, K>(Endpoint::SegmentPixel(kind))),
        )
    });
    Router::new()
        .route("/v1/batch", post(on::<S, K>(Endpoint::Batch)))
        .route("/v1/b", post(on::<S, K>(Endpoint::Batch)))
        .route("/v1/track", post(on::<S, K>(single(Kind::Track))))
        .route("/v1/t", post(on::<S, K>(single(Kind::Track))))
        .route("/v1/page", post(on::<S, K>(single(Kind::Page))))
        .route("/v1/p", post(on::<S, K>(single(Kind::Page))))
        .route("/v1/screen", post(on::<S, K>(single(Kind::Screen))))
        .route("/v1/s", post(on::<S, K>(single(Kind::Screen))))
        .route("/v1/identify", post(on::<S, K>(single(Kind::Identify))))
        .route("/v1/i", post(on::<S, K>(single(Kind::Identify))))
        .route("/v1/alias", post(on::<S, K>(single(Kind::Alias))))
        .route("/v1/a", post(on::<S, K>(single(Kind::Alias))))
        .route("/v1/group", post(on::<S, K>(single(Kind::Group))))
        .route("/v1/g", post(on::<S, K>(single(Kind::Group))))
        .route("/v1/p.gif", get(on::<S, K>(single(Kind::Pixel))))
        .merge(segment_pixels)
        .merge(posthog_routes::<S, K>())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S, K>))
        .layer(cors)
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            app.config.max_concurrent_requests.max(1),
        ))
        .with_state(app)
}

/// PostHog's capture paths (new and old SDKs', with and without the trailing slash, `GET`
/// with `data=` too), its remote config and its feature flags.
fn posthog_routes<S: Sink, K: KeyStore>() -> Router<Arc<App<S, K>>> {
    let capture = |State(app): State<Arc<App<S, K>>>, req: Request| async move {
        ingest(app, Endpoint::PostHog, req).await
    };
    let mut routes = Router::new();
    for path in ["/e", "/i/v0/e", "/batch", "/capture", "/track", "/engage"] {
        routes = routes
            .route(path, get(capture).post(capture))
            .route(&format!("{path}/"), get(capture).post(capture));
    }
    for path in ["/flags", "/decide"] {
        routes = routes
            .route(path, get(posthog_flags::<S, K>).post(posthog_flags::<S, K>))
            .route(
                &format!("{path}/"),
                get(posthog_flags::<S, K>).post(posthog_flags::<S, K>),
            );
    }
    routes
        .route("/array/{token}/config", get(posthog_config))
        .route("/array/{token}/config.js", get(posthog_config_js))
}

/// PostHog's remote config: every remote feature off. The key is not checked: the answer is
/// the same for every key and holds nothing of the project.
async fn posthog_config(Path(token): Path<String>) -> Response {
    count_posthog_answer("posthog_config");
    Json(posthog::remote_config(&token)).into_response()
}

/// The script form of the remote config, which posthog-js's loader asks for first.
async fn posthog_config_js(Path(token): Path<String>) -> Response {
    count_posthog_answer("posthog_config");
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript; charset=utf-8"),
        )],
        posthog::remote_config_js(&token),
    )
        .into_response()
}

/// PostHog's feature flags: none is on. The body (bounded) is read and dropped, so the
/// connection stays usable.
async fn posthog_flags<S: Sink, K: KeyStore>(
    State(app): State<Arc<App<S, K>>>,
    req: Request,
) -> Response {
    if let Err(err) = read_body(req.into_body(), app.limits.max_request_bytes).await {
        return err.into_response();
    }
    count_posthog_answer("posthog_flags");
    Json(posthog::flags()).into_response()
}

/// Counts a config or flags answer as requests_total counts the others.
fn count_posthog_answer(endpoint: &'static str) {
    ::metrics::counter!(metrics::REQUESTS_TOTAL, "endpoint" => endpoint, "status" => "200")
        .increment(1);
}

/// `/readyz` of the collector's state.
pub async fn readyz<S: Sink, K: KeyStore>(State(app): State<Arc<App<S, K>>>) -> Response {
    crate::health::readyz(&app.health)
}

/// A 1x1 transparent GIF.
const PIXEL_GIF: [u8; 43] = [
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// Answers one API request and records its metrics.
async fn ingest<S: Sink, K: KeyStore>(
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
        Ok(accepted) if is_pixel => {
            let _ = accepted;
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
        // What PostHog's SDKs read as success.
        Ok((accepted, rejected)) if endpoint == Endpoint::PostHog => {
            Json(json!({ "status": 1, "accepted": accepted, "rejected": rejected })).into_response()
        }
        Ok((accepted, rejected)) => (
            StatusCode::OK,
            Json(json!({ "success": true, "accepted": accepted, "rejected": rejected })),
        )
            .into_response(),
        Err(err) => {
            if err.status().is_server_error() {
                tracing::warn!(endpoint = label, cause = %err, "request failed");
            } else if err.status().is_client_error() {
                ::metrics::counter!(metrics::REFUSED_REQUESTS_TOTAL, "endpoint" => label, "reason" => err.reason())
                    .increment(1);
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
    };
    ::metrics::counter!(metrics::REQUESTS_TOTAL, "endpoint" => label, "status" => response.status().as_u16().to_string())
        .increment(1);
    ::metrics::histogram!(metrics::REQUEST_DURATION_SECONDS, "endpoint" => label)
        .record(started.elapsed().as_secs_f64());
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
    let headers = &parts.headers;
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr);
    let ip = peer.map(|peer| client_ip(peer, headers, &app.config.trusted_proxies));
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);

    // A body announced over the limit is refused before a byte of it is read.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if announced.is_some_and(|n| n > app.limits.max_request_bytes as u64) {
        return Err(IngestError::TooLarge {
            what: "request body",
            limit: app.limits.max_request_bytes,
        });
    }

    // A key in the headers is checked before the body is even read, so unauthenticated
    // floods cost no parsing.
    let header_key = key_from_headers(headers);
    let header_principal = match &header_key {
        Some(key) => Some(app.auth.authenticate(key).await?),
        None => None,
    };

    let query = parts.uri.query().unwrap_or_default();
    let (parsed, body_key) = if endpoint == Endpoint::Single(Kind::Pixel) {
        pixel(query, &app.limits)?
    } else {
        let mut json = if let Endpoint::SegmentPixel(_) = endpoint {
            // Segment's pixel carries a whole API message: parsed and checked as a body is.
            payload::pixel_data(query)?
        } else {
            let read_timeout = app.config.body_read_timeout_ms;
            let raw = tokio::time::timeout(
                Duration::from_millis(read_timeout),
                read_body(body, app.limits.max_request_bytes),
            )
            .await
            .map_err(|_| IngestError::BodyTimeout(read_timeout))??;
            *body_read = true;
            let content_encoding = headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok());
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let json = if endpoint == Endpoint::PostHog {
                posthog::decode(&raw, query, content_encoding, content_type, &app.limits)?
            } else {
                payload::decode_body(&raw, content_encoding, content_type, &app.limits)?
            };
            ::metrics::histogram!(metrics::REQUEST_BODY_BYTES).record(json.len() as f64);
            json
        };
        let mut parsed = if endpoint == Endpoint::PostHog {
            posthog::parse(&mut json, query, received_at, &app.limits)?
        } else {
            payload::parse(&mut json, endpoint, &app.limits)?
        };
        let key = parsed.write_key.take();
        (parsed, key)
    };

    let principal = authorize(
        app,
        header_principal,
        header_key.as_deref(),
        body_key.as_deref(),
    )
    .await?;
    // Every other key a batch's messages name must be of the same workspace: the messages
    // are stored in the authenticated one whatever they say.
    for other in &parsed.other_keys {
        authorize(app, Some(principal), None, Some(other)).await?;
    }

    let cost =
        u32::try_from((parsed.messages.len() + parsed.rejected.len()).max(1)).unwrap_or(u32::MAX);
    if let Err(retry_after_secs) = app.limiter.check(principal.key_id, cost, Instant::now()) {
        ::metrics::counter!(metrics::RATE_LIMITED_TOTAL).increment(1);
        return Err(IngestError::RateLimited { retry_after_secs });
    }

    let Parsed {
        mut messages,
        mut rejected,
        ..
    } = parsed;
    if app.sealer.is_none() && messages.iter().any(|(_, m)| seal::needs_keys(m)) {
        // Plaintext email or phone must not reach Kafka: refuse those identifies.
        let (refused, kept): (Vec<_>, Vec<_>) =
            messages.into_iter().partition(|(_, m)| seal::needs_keys(m));
        messages = kept;
        rejected.extend(refused.into_iter().map(|(index, m)| payload::Rejected {
            index,
            message_id: m.message_id,
            reason: payload::Reason::PiiKeysMissing,
            detail: "identify carries an email or phone, and this collector has no PII keys to seal it: set SLUICE_PII_KEYS and SLUICE_PII_ACTIVE_KEY (the writer's) and send it again".into(),
        }));
        rejected.sort_by_key(|r| r.index);
    }
    for r in &rejected {
        ::metrics::counter!(metrics::REJECTED_TOTAL, "reason" => r.reason.as_str()).increment(1);
    }
    if messages.is_empty() {
        return Err(if rejected.is_empty() {
            IngestError::BadRequest("the batch is empty".into())
        } else {
            IngestError::AllRejected(rejected)
        });
    }
    if let Some(sent) = messages.iter().find_map(|(_, m)| m.sent_at) {
        let skew = (received_at - sent).num_milliseconds().unsigned_abs() as f64 / 1000.0;
        ::metrics::histogram!(metrics::CLOCK_SKEW_SECONDS).record(skew);
    }
    let mut counts = [0u64; 7];
    for (_, m) in &messages {
        counts[m.kind as usize] += 1;
    }
    let accepted = messages.len();
    let facts = RequestFacts {
        principal,
        received_at,
        ip,
        user_agent,
        max_future: i64::try_from(app.config.max_future_ms)
            .ok()
            .and_then(chrono::TimeDelta::try_milliseconds)
            .unwrap_or(chrono::TimeDelta::MAX),
    };
    let mut out = enrich(messages.into_iter().map(|(_, m)| m).collect(), &facts);
    match &app.sealer {
        Some(sealer) => sealer.seal(&mut out),
        None => seal::strip_without_keys(&mut out, &app.config.pii_traits),
    }
    let records = records(&out)
        .map_err(|e| IngestError::BadRequest(format!("cannot encode a message ({e})")))?;
    ::metrics::gauge!(metrics::PRODUCER_QUEUE_MESSAGES).set(app.sink.queue_depth() as f64);
    let sent = app.sink.send(records).await;
    let outcome = if sent.is_ok() { "accepted" } else { "failed" };
    for kind in [
        Kind::Track,
        Kind::Page,
        Kind::Screen,
        Kind::Group,
        Kind::Identify,
        Kind::Alias,
        Kind::Pixel,
    ] {
        let n = counts[kind as usize];
        if n > 0 {
            ::metrics::counter!(metrics::EVENTS_TOTAL, "type" => kind.as_str(), "outcome" => outcome).increment(n);
        }
    }
    if !rejected.is_empty() {
        // A refused message's type may be the very thing wrong with it.
        let kind = match endpoint {
            Endpoint::Single(kind) | Endpoint::SegmentPixel(kind) => kind.as_str(),
            Endpoint::Batch | Endpoint::PostHog => "unknown",
        };
        ::metrics::counter!(metrics::EVENTS_TOTAL, "type" => kind, "outcome" => "rejected")
            .increment(rejected.len() as u64);
    }
    if let Err(err) = sent {
        ::metrics::counter!(metrics::KAFKA_ERRORS_TOTAL, "reason" => err.reason()).increment(1);
        return Err(IngestError::Unavailable(
            err.to_string(),
            app.config.retry_after_secs(),
        ));
    }
    Ok((accepted, rejected))
}

/// Which key the request is made with. A key in the headers wins; a different `writeKey` in
/// the body must be of the same workspace, so a body cannot redirect data into another
/// workspace than the one its request authenticated for.
async fn authorize<S: Sink, K: KeyStore>(
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

/// Reads a body up to `max` bytes; one byte more is a 413, without reading the rest.
async fn read_body(body: Body, max: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| IngestError::BadRequest(format!("cannot read the body ({e})")))?;
        if out.len() + chunk.len() > max {
            return Err(IngestError::TooLarge {
                what: "request body",
                limit: max,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The tracking pixel's query string as one message. Parameters: `k` write key, `e` event
/// name, `a` anonymousId, `u` userId, `s` sessionId, `m` messageId, `ts` timestamp (RFC 3339
/// or epoch ms), `url` page URL, `r` referrer, `t` page title; every other parameter becomes
/// a string property.
fn pixel(query: &str, limits: &Limits) -> Result<(Parsed, Option<String>), IngestError> {
    if query.len() > limits.max_message_bytes {
        return Err(IngestError::TooLarge {
            what: "message",
            limit: limits.max_message_bytes,
        });
    }
    let mut msg = Map::new();
    let mut page = Map::new();
    let mut properties = Map::new();
    let mut key = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        let field = match name.as_ref() {
            "k" => {
                key = Some(value);
                continue;
            }
            "e" => "name",
            "a" => "anonymousId",
            "u" => "userId",
            "s" => "sessionId",
            "m" => "messageId",
            "ts" => {
                let v = value
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(value));
                msg.insert("timestamp".into(), v);
                continue;
            }
            "url" | "r" | "t" => {
                let field = match name.as_ref() {
                    "url" => "url",
                    "r" => "referrer",
                    _ => "title",
                };
                page.insert(field.into(), Value::String(value));
                continue;
            }
            other => {
                properties.insert(other.to_owned(), Value::String(value));
                continue;
            }
        };
        msg.insert(field.into(), Value::String(value));
    }
    if !page.is_empty() {
        msg.insert("context".into(), json!({ "page": page }));
    }
    msg.insert("properties".into(), Value::Object(properties));
    let mut parsed = Parsed::default();
    match payload::validate(
        Value::Object(msg),
        Some(Kind::Pixel),
        &Defaults::default(),
        limits,
    ) {
        Ok(m) => parsed.messages.push((0, m)),
        Err((reason, detail)) => parsed.rejected.push(Rejected {
            index: 0,
            message_id: None,
            reason,
            detail,
        }),
    }
    Ok((parsed, key))
}

#[cfg(test)]
mod tests {
    //! Handler tests without a broker or a database: the sink and the key store are in
    //! memory, so failure modes the real ones cannot be made to show on demand (a full
    //! producer queue, a key store that is down) are driven directly.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use axum::body::to_bytes;
    use clap::Parser;
    use tower::ServiceExt;

    use super::*;
    use crate::auth::{KeyRow, StoreError};
    use crate::produce::{ProduceError, Record};
    use sluice_schema::topics::DataTopic;

    /// Records what it is sent, or fails as told.
    #[derive(Default)]
    struct MemSink {
        sent: Mutex<Vec<Record>>,
        fail: Option<fn() -> ProduceError>,
    }

    impl Sink for MemSink {
        async fn send(&self, records: Vec<Record>) -> Result<(), ProduceError> {
            if let Some(fail) = self.fail {
                return Err(fail());
            }
            self.sent.lock().unwrap().extend(records);
            Ok(())
        }
        fn queue_depth(&self) -> usize {
            0
        }
        async fn probe(&self, _: Duration) -> Result<(), String> {
            Ok(())
        }
        async fn flush(&self, _: Duration) {}
    }

    /// Keys by prefix, or down.
    struct MemStore {
        rows: HashMap<String, KeyRow>,
        down: bool,
    }

    impl KeyStore for MemStore {
        async fn fetch(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
            if self.down {
                return Err(StoreError("connection refused".into()));
            }
            Ok(self.rows.get(prefix).cloned())
        }
        async fn touch(&self, _: &[i64]) -> Result<(), StoreError> {
            Ok(())
        }
        async fn ping(&self) -> Result<(), String> {
            Ok(())
        }
    }

    fn app(
        fail: Option<fn() -> ProduceError>,
        down: bool,
    ) -> (Arc<App<MemSink, MemStore>>, String) {
        let key = sluice_schema::apikey::generate();
        let row = KeyRow {
            id: 1,
            tenant_id: 10,
            workspace_id: 20,
            hash: key.hash.to_vec(),
            scopes: vec!["write".into()],
            expires_at: None,
            revoked_at: None,
        };
        let store = MemStore {
            rows: HashMap::from([(key.prefix.clone(), row)]),
            down,
        };
        let sink = MemSink {
            fail,
            ..MemSink::default()
        };
        let config = Config::try_parse_from(["x"]).unwrap();
        (Arc::new(App::new(config, sink, store)), key.plaintext)
    }

    async fn post(
        app: &Arc<App<MemSink, MemStore>>,
        key: &str,
        body: serde_json::Value,
    ) -> Response {
        let req = Request::post("/v1/track")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::from(body.to_string()))
            .unwrap();
        router(app.clone()).oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn accepted_track_yields_event_and_visitor_records_keyed_by_visitor() {
        let (app, key) = app(None, false);
        let resp = post(&app, &key, json!({"event": "E", "anonymousId": "a1"})).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let sent = app.sink.sent.lock().unwrap().clone();
        let topics: Vec<DataTopic> = sent.iter().map(|r| r.topic).collect();
        assert_eq!(topics, [DataTopic::Event, DataTopic::Visitor]);
        assert!(sent.iter().all(|r| r.key == "10/a1"));
    }

    #[tokio::test]
    async fn a_body_refused_before_it_is_read_closes_the_connection_and_says_so() {
        let (app, key) = app(None, false);
        let huge = Request::post("/v1/track")
            .header("authorization", format!("Bearer {key}"))
            .header("content-length", "999999999")
            .body(Body::empty())
            .unwrap();
        let resp = router(app.clone()).oneshot(huge).await.unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let bad_key = post(&app, "sk_notakey", json!({"event": "E", "userId": "u"})).await;
        assert_eq!(bad_key.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(bad_key.headers()[header::CONNECTION], "close");
        // Read to its end, a refused body leaves the connection usable.
        let read = post(&app, &key, json!({"event": 5})).await;
        assert_eq!(read.status(), StatusCode::BAD_REQUEST);
        assert!(read.headers().get(header::CONNECTION).is_none());
    }

    #[tokio::test]
    async fn full_queue_and_kafka_timeout_are_503_with_retry_after() {
        for fail in [(|| ProduceError::QueueFull) as fn() -> ProduceError, || {
            ProduceError::Timeout
        }] {
            let (app, key) = app(Some(fail), false);
            let resp = post(&app, &key, json!({"event": "E", "userId": "u"})).await;
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
            let body = to_bytes(resp.into_body(), 10_000).await.unwrap();
            assert!(String::from_utf8_lossy(&body).contains("retry"));
        }
    }

    async fn get(app: &Arc<App<MemSink, MemStore>>, uri: &str) -> Response {
        let req = Request::get(uri).body(Body::empty()).unwrap();
        router(app.clone()).oneshot(req).await.unwrap()
    }

    async fn text(resp: Response) -> String {
        String::from_utf8_lossy(&to_bytes(resp.into_body(), 100_000).await.unwrap()).into_owned()
    }

    #[tokio::test]
    async fn segment_pixel_takes_base64_of_either_alphabet_and_answers_a_gif() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let (app, key) = app(None, false);
        // At any alignment, "?>?~~~" encodes to base64 with a `+` (standard) or `-` (URL-safe),
        // and a `+` sent unescaped in a query reads as a space.
        let message = |id: &str| {
            json!({"writeKey": key, "anonymousId": "a1", "event": "Email Opened",
                   "messageId": id, "properties": {"subject": "?>?~~~"}})
            .to_string()
        };
        let standard = STANDARD.encode(message("m-std"));
        let raw_plus = STANDARD.encode(message("m-raw-plus"));
        assert!(raw_plus.contains('+'));
        let queries = [
            format!(
                "data={}",
                url::form_urlencoded::byte_serialize(standard.as_bytes()).collect::<String>()
            ),
            format!("data={raw_plus}"),
            format!("data={}", URL_SAFE_NO_PAD.encode(message("m-url-safe"))),
            format!(
                "data={}",
                url::form_urlencoded::byte_serialize(message("m-json").as_bytes())
                    .collect::<String>()
            ),
        ];
        for query in &queries {
            let resp = get(&app, &format!("/v1/pixel/track?{query}")).await;
            assert_eq!(resp.status(), StatusCode::OK, "{query}");
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "image/gif");
            assert!(resp.headers()[header::CACHE_CONTROL]
                .to_str()
                .unwrap()
                .contains("no-store"));
            assert!(to_bytes(resp.into_body(), 100)
                .await
                .unwrap()
                .starts_with(b"GIF89a"));
        }
        let sent = app.sink.sent.lock().unwrap().clone();
        let events: Vec<serde_json::Value> = sent
            .iter()
            .filter(|r| r.topic == DataTopic::Event)
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect();
        assert_eq!(events.len(), queries.len());
        for (event, id) in events
            .iter()
            .zip(["m-std", "m-raw-plus", "m-url-safe", "m-json"])
        {
            assert_eq!(event["message_id"], id);
            assert_eq!(event["type"], "track");
            assert_eq!(event["name"], "Email Opened");
            assert_eq!(event["properties"]["subject"], "?>?~~~");
            assert!(!event.to_string().contains(&key), "keys never reach Kafka");
        }
    }

    #[tokio::test]
    async fn segment_pixel_bad_data_is_a_4xx_with_a_reason() {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        let (app, key) = app(None, false);
        let no_key = STANDARD.encode(json!({"event": "E", "userId": "u"}).to_string());
        let no_event = STANDARD.encode(json!({"writeKey": key, "userId": "u"}).to_string());
        let not_json = STANDARD.encode("{\"writeKey\": ");
        for (uri, status, says) in [
            ("/v1/pixel/track?data=%%%".to_owned(), 400, "not base64"),
            (
                "/v1/pixel/track?data=not*base64".to_owned(),
                400,
                "not base64",
            ),
            ("/v1/pixel/track".to_owned(), 400, "no data field"),
            (format!("/v1/pixel/track?data={not_json}"), 400, "not valid"),
            (
                format!("/v1/pixel/track?data={no_event}"),
                400,
                "event name",
            ),
            (
                format!("/v1/pixel/track?data={no_key}"),
                401,
                "no write key",
            ),
        ] {
            let resp = get(&app, &uri).await;
            assert_eq!(resp.status().as_u16(), status, "{uri}");
            let body = text(resp).await;
            assert!(body.contains(says), "{uri}: {body}");
        }
        assert_eq!(
            get(&app, "/v1/pixel/nope?data=e30").await.status(),
            StatusCode::NOT_FOUND
        );
        assert!(app.sink.sent.lock().unwrap().is_empty());
    }

    async fn posthog_post(
        app: &Arc<App<MemSink, MemStore>>,
        uri: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        let req = Request::post(uri)
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        router(app.clone()).oneshot(req).await.unwrap()
    }

    fn sent_events(app: &Arc<App<MemSink, MemStore>>) -> Vec<serde_json::Value> {
        app.sink
            .sent
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.topic == DataTopic::Event)
            .map(|r| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn posthog_js_gzip_beacon_and_get_bodies_are_stored_and_answered_status_1() {
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine;
        use std::io::Write;
        let (app, key) = app(None, false);
        let event = |id: &str| {
            json!({"event": "clicked", "uuid": id, "timestamp": "2026-12-01T10:00:00Z",
                   "properties": {"distinct_id": "dev-1", "$device_id": "dev-1", "token": key,
                                  "$lib": "web"}})
        };
        let body = json!({"api_key": key, "batch": [event("e-gzip")],
                          "sent_at": "2026-12-01T10:00:01Z"});
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.to_string().as_bytes()).unwrap();
        let resp = posthog_post(
            &app,
            "/e/?ip=0&ver=1.449.2",
            "text/plain",
            gz.finish().unwrap(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<Value>(&text(resp).await).unwrap()["status"],
            1
        );
        let b64 = STANDARD.encode(json!([event("e-beacon")]).to_string());
        let form = format!(
            "data={}",
            url::form_urlencoded::byte_serialize(b64.as_bytes()).collect::<String>()
        );
        let resp = posthog_post(
            &app,
            "/batch?compression=base64",
            "application/x-www-form-urlencoded",
            form.clone().into_bytes(),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = get(&app, &format!("/i/v0/e/?{form}")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let ids: Vec<Value> = sent_events(&app)
            .iter()
            .map(|e| e["message_id"].clone())
            .collect();
        assert_eq!(ids, [json!("e-gzip"), json!("e-beacon"), json!("e-beacon")]);
        for e in sent_events(&app) {
            assert!(!e.to_string().contains(&key), "keys never reach Kafka");
            assert_eq!(e["name"], "clicked");
            assert_eq!(e["context"]["$lib"], "web");
        }
    }

    #[tokio::test]
    async fn posthog_bodies_that_cannot_be_taken_are_4xx_with_the_reason() {
        let (app, key) = app(None, false);
        for (uri, body, status, says) in [
            ("/e/", "not json at all".to_owned(), 400, "neither JSON"),
            (
                "/e/",
                json!({"event": "e", "distinct_id": "d"}).to_string(),
                401,
                "no write key",
            ),
            (
                "/capture/",
                json!({"api_key": key, "batch": [{"distinct_id": "d"}]}).to_string(),
                400,
                "needs an",
            ),
            (
                "/track",
                json!({"api_key": key, "batch": [{"event": "e"}]}).to_string(),
                400,
                "distinct_id is required",
            ),
            (
                "/e/",
                json!({"api_key": "sk_nope", "event": "e", "distinct_id": "d"}).to_string(),
                401,
                "unknown write key",
            ),
        ] {
            let resp = posthog_post(&app, uri, "application/json", body.into_bytes()).await;
            assert_eq!(resp.status().as_u16(), status, "{uri}");
            let body = text(resp).await;
            assert!(body.contains(says), "{uri}: {body}");
        }
        assert!(app.sink.sent.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn posthog_config_and_flags_answer_with_every_feature_off() {
        let (app, _) = app(None, false);
        let config: Value =
            serde_json::from_str(&text(get(&app, "/array/phc_k/config").await).await).unwrap();
        assert_eq!(config["sessionRecording"], false);
        let js = get(&app, "/array/phc_k/config.js").await;
        assert_eq!(js.status(), StatusCode::OK);
        assert!(js.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/javascript"));
        assert!(text(js).await.contains("_POSTHOG_REMOTE_CONFIG[\"phc_k\"]"));
        for uri in [
            "/flags/?v=2&config=true",
            "/flags",
            "/decide/?v=3",
            "/decide",
        ] {
            let resp = posthog_post(&app, uri, "text/plain", b"\x1f\x8bgarbage".to_vec()).await;
            assert_eq!(resp.status(), StatusCode::OK, "{uri}");
            let flags: Value = serde_json::from_str(&text(resp).await).unwrap();
            assert_eq!(flags["flags"], json!({}), "{uri}");
            assert_eq!(flags["featureFlags"], json!({}), "{uri}");
        }
    }

    #[tokio::test]
    async fn key_store_down_is_503_not_401() {
        let (app, key) = app(None, true);
        let resp = post(&app, &key, json!({"event": "E", "userId": "u"})).await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key(header::RETRY_AFTER));
        assert!(app.sink.sent.lock().unwrap().is_empty());
    }
}
