//! The HTTP API: the collector's shared state, its routes and CORS; every API route runs
//! [`crate::pipeline`], PostHog's config and flags routes answer from [`crate::posthog_config`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tower_http::cors::{Any, CorsLayer};

use crate::auth::{Authenticator, KeyStore};
use crate::config::Config;
use crate::error::IngestError;
use crate::health::healthz;
use crate::limits::RateLimiter;
use crate::metrics;
use crate::payload::{Endpoint, Kind, Limits};
use crate::pipeline::{ingest, read_body};
use crate::posthog_config;
use crate::produce::Sink;
use crate::seal::Sealer;
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
        metrics::rate_limit_per_collector(config.rate_limit_per_collector());
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

/// The public API's routes. Segment's short paths (`/v1/t`, `/v1/p`, ...) are the ones
/// analytics.js posts to, so they are served too, and so is Segment's pixel API
/// (`/v1/pixel/<type>`), for `<img>` tags written for Segment.
pub fn router<S: Sink, K: KeyStore>(app: Arc<App<S, K>>) -> Router {
    // A closure making the handlers, not a function: its handlers' futures need no name, so
    // axum's one box holds each request's future (a named type meant a second box).
    let on = |endpoint: Endpoint| {
        move |State(app): State<Arc<App<S, K>>>, req: Request| ingest(app, endpoint, req)
    };
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
        ])
        .max_age(Duration::from_secs(86_400));
    let batch = post(on(Endpoint::Batch));
    let calls = Kind::ALL
        .into_iter()
        .filter(|kind| *kind != Kind::Pixel)
        .fold(Router::new(), |routes, kind| {
            let name = kind.as_str();
            let call = post(on(Endpoint::Single(kind)));
            routes
                .route(&format!("/v1/{name}"), call.clone())
                // Segment's short path is the call's first letter.
                .route(&format!("/v1/{}", &name[..1]), call)
                .route(
                    &format!("/v1/pixel/{name}"),
                    get(on(Endpoint::SegmentPixel(kind))),
                )
        });
    Router::new()
        .route("/v1/batch", batch.clone())
        .route("/v1/b", batch)
        .route("/v1/p.gif", get(on(Endpoint::Single(Kind::Pixel))))
        .merge(calls)
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
    let capture =
        |State(app): State<Arc<App<S, K>>>, req: Request| ingest(app, Endpoint::PostHog, req);
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
    Json(posthog_config::remote_config(&token)).into_response()
}

/// The script form of the remote config, which posthog-js's loader asks for first.
async fn posthog_config_js(Path(token): Path<String>) -> Response {
    count_posthog_answer("posthog_config");
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/javascript; charset=utf-8"),
        )],
        posthog_config::remote_config_js(&token),
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
        return IngestError::from(err).into_response();
    }
    count_posthog_answer("posthog_flags");
    Json(posthog_config::flags()).into_response()
}

/// Counts a config or flags answer as requests_total counts the others.
fn count_posthog_answer(endpoint: &'static str) {
    metrics::request_answered(endpoint, StatusCode::OK);
}

/// `/readyz` of the collector's state.
pub async fn readyz<S: Sink, K: KeyStore>(State(app): State<Arc<App<S, K>>>) -> Response {
    crate::health::readyz(&app.health)
}

#[cfg(test)]
mod tests;
