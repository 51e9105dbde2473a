//! `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (PostgreSQL
//! and Kafka reachable, with each one's latency in a JSON body) on the metrics port.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::Pool;
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::{FutureProducer, Producer};
use serde_json::json;
use sluice_schema::kafka::{ErrorTap, TapContext};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::WriterError;

/// The process-wide Prometheus recorder ([`sluice_schema::metrics::recorder`]): installed by
/// the first service of the process (a test may run several writers; they share it).
fn recorder() -> Option<PrometheusHandle> {
    match sluice_schema::metrics::recorder(crate::metrics::BUCKETS) {
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

/// What `/readyz` checks.
#[derive(Clone)]
struct Deps {
    pool: Pool,
    producer: FutureProducer<TapContext>,
    tap: ErrorTap,
    topic: String,
}

/// Binds the metrics listener and serves it until `stop`; returns the bound address.
pub(crate) async fn serve(
    addr: SocketAddr,
    pool: Pool,
    (producer, tap): (FutureProducer<TapContext>, ErrorTap),
    topic: String,
    stop: CancellationToken,
) -> Result<SocketAddr, WriterError> {
    let _ = recorder();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WriterError::Listen { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| WriterError::Listen { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Deps {
            pool,
            producer,
            tap,
            topic,
        });
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

async fn metrics_text() -> impl IntoResponse {
    match recorder() {
        Some(handle) => handle.render(),
        None => String::new(),
    }
}

async fn readyz(State(deps): State<Deps>) -> impl IntoResponse {
    let started = Instant::now();
    let pg = tokio::time::timeout(Duration::from_secs(2), async {
        let client = deps
            .pool
            .get()
            .await
            .map_err(|e| sluice_schema::db::describe_pool(&e))?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| sluice_schema::db::describe(&e))
    })
    .await
    .unwrap_or_else(|_| Err("timed out after 2 s".into()));
    let pg_ms = started.elapsed().as_secs_f64() * 1000.0;

    let started = Instant::now();
    let producer = deps.producer.clone();
    let tap = deps.tap.clone();
    let topic = deps.topic.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&topic), Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| sluice_schema::kafka::describe_with_tap(&e, &tap))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let kafka_ms = started.elapsed().as_secs_f64() * 1000.0;

    let ready = pg.is_ok() && kafka.is_ok();
    let body = json!({
        "ready": ready,
        "postgres": { "ok": pg.is_ok(), "latency_ms": pg_ms, "error": pg.err() },
        "kafka": { "ok": kafka.is_ok(), "latency_ms": kafka_ms, "error": kafka.err() },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}
