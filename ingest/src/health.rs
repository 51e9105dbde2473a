//! Liveness and readiness: `/healthz` (the process answers), `/readyz` (Kafka and PostgreSQL
//! answered the last probe of the background loop in `lib.rs`; the body is
//! [`sluice_schema::readiness::Answer`], the writer's shape too).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sluice_schema::readiness::Readiness;

/// `/readyz`: 200 or 503, with the probes as JSON.
pub fn readyz(readiness: &Readiness) -> Response {
    let answer = readiness.answer();
    let status = if answer.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(answer)).into_response()
}

/// `/healthz`: the process is alive enough to answer.
pub async fn healthz() -> &'static str {
    "ok\n"
}
