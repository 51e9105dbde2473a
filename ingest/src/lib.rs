//! sluice's HTTP collector: a Segment-compatible tracking API and pixel that validates and
//! enriches messages and produces them to Kafka, answering 200 only after Kafka acknowledged
//! every message of the request.
//!
//! The only entry is [`serve`] (or [`serve_on`] with a metrics listener of the caller's):
//! the binary parses flags, binds, and calls it with the SIGTERM future; tests bind
//! `127.0.0.1:0` and pass their own shutdown future.
//!
//! # Layout
//! - [`config`]: every setting, a flag and a `SLUICE_*` variable.
//! - [`server`]: the accept loop: connection bound, hyper, header timeout, drain.
//! - [`routes`]: the shared state, endpoints, CORS.
//! - [`pipeline`]: the request path every endpoint shares: read -> decode -> authorize ->
//!   limit -> enrich -> produce, and the answer.
//! - [`auth`]: write keys: extraction, cached look-up, constant-time check, `last_used_at`.
//! - [`payload`]: body decoding (gzip, beacons, forms), typed parsing (`properties` and
//!   `context` kept as JSON text), the Segment rules,
//!   the pixel's query, PostHog's capture bodies mapped onto Segment messages.
//! - [`posthog_config`]: PostHog's remote config and feature flags, all off.
//! - [`enrich`]: receive time, skew-corrected `occurred_at`, IP, user agent, bot flag, UTM;
//!   visitor and session summaries.
//! - [`produce`]: records, the [`produce::Sink`] trait, the Kafka sink, topic creation.
//! - [`seal`]: an identify's personal data sealed (AES-256-GCM, fingerprints) before Kafka.
//! - [`limits`]: per-key token buckets.
//! - [`health`]: `/healthz`, `/readyz`.
//! - [`metrics`]: every metric name; the Prometheus recorder.
//! - [`error`]: the error enum and its HTTP mapping.

pub mod auth;
pub mod config;
pub mod enrich;
pub mod error;
pub mod health;
pub mod limits;
pub mod metrics;
pub mod payload;
pub mod pipeline;
pub mod posthog_config;
pub mod produce;
pub mod routes;
pub mod seal;
pub mod server;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use sluice_schema::readiness::{Dependency, PROBE_TIMEOUT};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::IngestError;

use auth::{KeyStore, PgKeyStore};
use produce::{KafkaSink, Sink};
use routes::App;

/// Runs the collector on `listener` until `shutdown` resolves, with `/metrics`, `/healthz`
/// and `/readyz` on `config.metrics_listen`. Then drains: stops accepting, finishes
/// in-flight requests, flushes the producer.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let addr = config.metrics_listen;
    let metrics_listener = TcpListener::bind(addr)
        .await
        .map_err(|source| IngestError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    serve_on(config, listener, metrics_listener, shutdown).await
}

/// [`serve`] with the metrics listener bound by the caller.
pub async fn serve_on(
    config: Config,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let prometheus = metrics::handle().map_err(IngestError::Metrics)?;
    let config = config
        .load_files()
        .map_err(|e| IngestError::Config(e.to_string()))?;
    let sink = KafkaSink::new(&config)?;
    let pool = database_pool(&config)?;
    let sealer = config
        .pii()
        .map_err(IngestError::PiiConfig)?
        .map(|keys| seal::Sealer::new(keys, &config.pii_traits));
    if sealer.is_none() {
        tracing::warn!("no SLUICE_PII_KEYS: identifies carrying an email or phone are refused");
    }
    let app = Arc::new(App::new(config, sink, PgKeyStore::new(pool)).with_sealer(sealer));

    // One token stops everything: the caller's shutdown future triggers it.
    let stop = CancellationToken::new();
    let background = tokio::spawn(background(app.clone(), stop.clone()));

    let metrics_app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus.render())),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(routes::readyz))
        .with_state(app.clone());
    let metrics_stop = stop.clone();
    let metrics_server = tokio::spawn(async move {
        axum::serve(metrics_listener, metrics_app)
            .with_graceful_shutdown(async move { metrics_stop.cancelled().await })
            .await
    });

    let local = listener.local_addr().ok();
    if let Some(addr) = local {
        tracing::info!(listen = %addr, "collector listening");
    }
    // The API stops first; metrics, probes and background duties run on through the drain.
    let api_stop = CancellationToken::new();
    let accept_stop = api_stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("draining: no new connections, finishing in-flight requests");
        api_stop.cancel();
    });
    let served = server::accept_loop(
        listener,
        routes::router(app.clone()),
        &app.config,
        accept_stop,
    )
    .await;

    // In-flight requests are done (each awaited its own acknowledgements); anything still in
    // the producer's queue belongs to requests that gave up, and gets its last chance here.
    app.sink
        .flush(Duration::from_millis(app.config.drain_timeout_ms))
        .await;
    app.auth.flush_last_used().await;
    stop.cancel();
    let _ = background.await;
    let _ = metrics_server.await;
    tracing::info!("collector stopped");
    served.map_err(|source| IngestError::Listen {
        addr: local.map(|a| a.to_string()).unwrap_or_default(),
        source,
    })
}

/// A small pool for key look-ups, with short timeouts so a dead database makes a fast 503.
fn database_pool(config: &Config) -> Result<deadpool_postgres::Pool, IngestError> {
    let target = sluice_schema::db::DbTarget::parse(&config.database_args.database_url)
        .map_err(|e| IngestError::DatabaseConfig(e.to_string()))?;
    tracing::info!(database = %target.redacted, kafka_properties = %config.kafka, "connecting");
    // 2 s everywhere: a key look-up past it is answered 503, not left hanging.
    let timeout = Duration::from_secs(2);
    target
        .pool(sluice_schema::db::PoolBounds {
            max_size: config.database_pool_size,
            wait_timeout: timeout,
            create_timeout: timeout,
            recycle_timeout: timeout,
        })
        .map_err(|e| IngestError::DatabaseConfig(e.to_string()))
}

/// Background duties until `stop`: readiness probes, topic creation (retried until it
/// works, so a collector started before Kafka becomes ready by itself), `last_used_at`.
async fn background<S: Sink, K: KeyStore>(app: Arc<App<S, K>>, stop: CancellationToken) {
    let mut topics_ready = false;
    let mut probe = tokio::time::interval(Duration::from_millis(
        app.config.readiness_interval_ms.max(100),
    ));
    let mut flush = tokio::time::interval(Duration::from_millis(
        app.config.key_last_used_flush_ms.max(100),
    ));
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = probe.tick() => {
                let started = Instant::now();
                // Not ready until the topics exist: a produce to a missing topic would only
                // time out.
                let mut topics_error = None;
                if !topics_ready {
                    match produce::ensure_topics(&app.config).await {
                        Ok(()) => topics_ready = true,
                        Err(err) => {
                            // The admin call only times out; the producer's client knows why.
                            let err = match app.sink.client_error() {
                                Some(cause) => format!("{err}; Kafka client error: {cause}"),
                                None => err,
                            };
                            tracing::warn!(cause = %err, "cannot create topics yet; retrying");
                            topics_error = Some(format!("creating topics: {err}"));
                        }
                    }
                }
                let kafka = match topics_error {
                    Some(err) => Err(err),
                    None => app.sink.probe(PROBE_TIMEOUT).await,
                };
                let up = app.health.record(Dependency::Kafka, started, kafka);
                metrics::dependency_up(Dependency::Kafka, up);
                let up = app.health.probe(Dependency::Postgres, app.auth.store().ping()).await;
                metrics::dependency_up(Dependency::Postgres, up);
            }
            _ = flush.tick() => app.auth.flush_last_used().await,
        }
    }
}
