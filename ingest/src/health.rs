//! Liveness and readiness: `/healthz` (the process answers), `/readyz` (Kafka and PostgreSQL
//! answered the last probe; a JSON body gives each one's status and latency), refreshed by a
//! background probe loop so a readiness check never waits on a dead dependency.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::metrics;

/// The last probe of one dependency.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Whether it answered.
    pub ok: bool,
    /// How long the probe took, in milliseconds.
    pub latency_ms: u64,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Kafka: a metadata request. `None` until the first probe.
    pub kafka: Option<Probe>,
    /// PostgreSQL: a trivial query. `None` until the first probe.
    pub postgres: Option<Probe>,
}

/// Readiness shared between the probe loop and the handlers.
pub struct Health {
    /// The latest probes.
    state: Mutex<Readiness>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: Mutex::new(Readiness {
                kafka: None,
                postgres: None,
            }),
        }
    }
}

impl Health {
    /// Records one probe's outcome.
    pub fn record(&self, dependency: &'static str, started: Instant, result: Result<(), String>) {
        let probe = Probe {
            ok: result.is_ok(),
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error: result.err(),
        };
        ::metrics::gauge!(metrics::DEPENDENCY_UP, "dependency" => dependency).set(if probe.ok {
            1.0
        } else {
            0.0
        });
        if let Ok(mut state) = self.state.lock() {
            match dependency {
                "kafka" => state.kafka = Some(probe),
                _ => state.postgres = Some(probe),
            }
        }
    }

    /// The current view.
    pub fn snapshot(&self) -> Option<Readiness> {
        self.state.lock().ok().map(|s| s.clone())
    }

    /// True when both dependencies answered their last probe. Ready needs Kafka since
    /// nothing can be acknowledged without it, and PostgreSQL since uncached keys cannot be
    /// checked without it.
    pub fn ready(&self) -> bool {
        self.snapshot().is_some_and(|s| {
            s.kafka.as_ref().is_some_and(|p| p.ok) && s.postgres.as_ref().is_some_and(|p| p.ok)
        })
    }

    /// `/readyz`: 200 or 503, with the probes as JSON.
    pub fn readyz(&self) -> Response {
        let status = if self.ready() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = self.snapshot();
        (
            status,
            Json(serde_json::json!({ "ready": status == StatusCode::OK, "dependencies": body })),
        )
            .into_response()
    }
}

/// `/healthz`: the process is alive enough to answer.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// How long one probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
