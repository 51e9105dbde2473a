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
//! - [`routes`]: endpoints, CORS, and the request pipeline.
//! - [`auth`]: write keys: extraction, cached look-up, constant-time check, `last_used_at`.
//! - [`payload`]: body decoding (gzip, beacons, forms), simd-json parsing, validation.
//! - [`posthog`]: PostHog's capture bodies mapped onto Segment messages; its remote config.
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
pub mod posthog;
pub mod produce;
pub mod routes;
pub mod seal;

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
    let served = accept_loop(
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

/// Accepts connections until `stop`, then waits (up to the drain timeout) for the requests
/// in flight. Each connection is served by hyper's HTTP/1 server with a header-read timeout
/// (slow-loris clients are hung up on) and a bounded head size; the number of connections
/// is bounded by a semaphore, so a flood waits in the kernel's backlog instead of in memory.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    config: &Config,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_buf_size(config.max_header_bytes.max(8192));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors or the like: back off instead of spinning.
                    tracing::error!(cause = %err, "failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), req)
            });
        let conn =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(cause = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = Duration::from_millis(config.drain_timeout_ms);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "requests still in flight after the drain timeout");
    }
    Ok(())
}

/// A small pool for key look-ups, with short timeouts so a dead database makes a fast 503.
fn database_pool(config: &Config) -> Result<deadpool_postgres::Pool, IngestError> {
    let target = sluice_schema::db::DbTarget::parse(&config.database_url)
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
