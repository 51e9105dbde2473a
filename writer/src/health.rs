//! `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (PostgreSQL
//! and Kafka answered the last probe of a background loop, the body
//! [`sluice_schema::readiness::Answer`] as the collector's) on the metrics port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::{FutureProducer, Producer};
use sluice_schema::kafka::{ErrorTap, TapContext};
use sluice_schema::metrics::BucketRule;
use sluice_schema::readiness::{Dependency, Readiness, PROBE_TIMEOUT};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::WriterError;

/// The process-wide Prometheus recorder ([`sluice_schema::metrics::recorder`]): installed by
/// the first service of the process (a test may run several writers; they share it).
fn recorder() -> Option<PrometheusHandle> {
    match sluice_schema::metrics::recorder(&BucketRule::from_metrics(crate::metrics::ALL)) {
        Ok(handle) => Some(handle),
        Err(err) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!(cause = %err, "the metrics recorder could not be installed (another one is?); /metrics will be empty"));
            None
        }
    }
}

/// Installs the process-wide recorder, so metrics recorded at start-up (partitions ensured
/// ahead) are kept: before it is installed, the `metrics` macros record nowhere.
pub(crate) fn install() {
    let _ = recorder();
}

/// What the probe loop checks.
struct Deps {
    pool: Pool,
    producer: FutureProducer<TapContext>,
    tap: ErrorTap,
    /// The DLQ topic: its metadata is what the writer needs from Kafka to dead-letter.
    topic: String,
}

/// Binds the metrics listener and serves it, and probes PostgreSQL and Kafka every
/// `interval`, until `stop`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    pool: Pool,
    (producer, tap): (FutureProducer<TapContext>, ErrorTap),
    topic: String,
    interval: Duration,
    stop: CancellationToken,
) -> Result<SocketAddr, WriterError> {
    let _ = recorder();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WriterError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| WriterError::Listen { addr, source })?;
    let readiness = Arc::new(Readiness::default());
    let deps = Deps {
        pool,
        producer,
        tap,
        topic,
    };
    tokio::spawn(probe_loop(deps, readiness.clone(), interval, stop.clone()));
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(cause = %err, "metrics listener failed");
        }
    });
    tracing::info!(addr = %local, "metrics and health listening");
    Ok(local)
}

/// Probes both dependencies now and every `interval` until `stop`.
async fn probe_loop(
    deps: Deps,
    readiness: Arc<Readiness>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                readiness.probe(Dependency::Postgres, ping_postgres(&deps.pool)).await;
                // Not through `probe`: its timeout would race the metadata call's own and
                // replace the client's account of why (refused credentials, unknown CA).
                let started = Instant::now();
                let kafka = kafka_metadata(&deps).await;
                readiness.record(Dependency::Kafka, started, kafka);
            }
        }
    }
}

async fn ping_postgres(pool: &Pool) -> Result<(), String> {
    let client = pool
        .get()
        .await
        .map_err(|e| sluice_schema::db::describe_pool(&e))?;
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| sluice_schema::db::describe(&e))
}

/// A metadata request on a blocking thread (librdkafka's call blocks), bounded by
/// [`PROBE_TIMEOUT`] by the call itself, so the thread is not left waiting.
async fn kafka_metadata(deps: &Deps) -> Result<(), String> {
    let producer = deps.producer.clone();
    let tap = deps.tap.clone();
    let topic = deps.topic.clone();
    tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), PROBE_TIMEOUT)
            .map(|_| ())
            .map_err(|e| sluice_schema::kafka::describe_with_tap(&e, &tap))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

async fn metrics_text() -> impl IntoResponse {
    match recorder() {
        Some(handle) => handle.render(),
        None => String::new(),
    }
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    let answer = readiness.answer();
    let status = if answer.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(answer))
}
