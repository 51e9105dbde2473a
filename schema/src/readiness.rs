//! Readiness of a service, one type and one JSON shape for the collector and the writer
//! (docs/architecture.md §4.7): the last probe of Kafka and of PostgreSQL, refreshed by the
//! service's background loop, so `/readyz` answers from memory and never waits on a dead
//! dependency.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long one probe may take before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Default of `SLUICE_READINESS_INTERVAL_MS`: time between two probes of each dependency.
pub const DEFAULT_INTERVAL_MS: u64 = 2_000;

/// What a service needs to be ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The Kafka cluster: a metadata request.
    Kafka,
    /// PostgreSQL: `SELECT 1` (or the service's own trivial query).
    Postgres,
}

impl Dependency {
    /// Its name in the JSON body and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Dependency::Kafka => "kafka",
            Dependency::Postgres => "postgres",
        }
    }
}

/// The last probe of one dependency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Probe {
    /// Whether it answered.
    pub ok: bool,
    /// How long the probe took, in milliseconds.
    pub latency_ms: u64,
    /// Why it failed (what to fix), when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every dependency's last probe; `None` until its first one finished.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dependencies {
    /// Kafka's.
    pub kafka: Option<Probe>,
    /// PostgreSQL's.
    pub postgres: Option<Probe>,
}

/// The `/readyz` body of both services: `{"ready": bool, "dependencies": {"kafka": probe or
/// null, "postgres": probe or null}}`; answered with 200 when `ready`, else 503.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// Both dependencies answered their last probe.
    pub ready: bool,
    /// The probes themselves.
    pub dependencies: Dependencies,
}

/// Readiness shared between a probe loop and the `/readyz` handler.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The latest probes.
    state: Mutex<Dependencies>,
}

impl Readiness {
    /// Records one probe's outcome, timed from `started`; returns whether it succeeded.
    pub fn record(
        &self,
        dependency: Dependency,
        started: Instant,
        result: Result<(), String>,
    ) -> bool {
        let probe = Probe {
            ok: result.is_ok(),
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error: result.err(),
        };
        let ok = probe.ok;
        // A poisoned lock only means a panic elsewhere mid-update; the value is still whole.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match dependency {
            Dependency::Kafka => state.kafka = Some(probe),
            Dependency::Postgres => state.postgres = Some(probe),
        }
        ok
    }

    /// Runs `check` for at most [`PROBE_TIMEOUT`] and records it; returns whether it succeeded.
    pub async fn probe(
        &self,
        dependency: Dependency,
        check: impl Future<Output = Result<(), String>>,
    ) -> bool {
        let started = Instant::now();
        let result = tokio::time::timeout(PROBE_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {} s", PROBE_TIMEOUT.as_secs())));
        self.record(dependency, started, result)
    }

    /// The current view, for `/readyz`. Ready needs both: Kafka since nothing can be
    /// acknowledged (collector) or dead-lettered (writer) without it, PostgreSQL since keys
    /// cannot be checked (collector) and nothing stored (writer) without it.
    pub fn answer(&self) -> Answer {
        let dependencies = self.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let up = |p: &Option<Probe>| p.as_ref().is_some_and(|p| p.ok);
        Answer {
            ready: up(&dependencies.kafka) && up(&dependencies.postgres),
            dependencies,
        }
    }

    /// True when both dependencies answered their last probe.
    pub fn ready(&self) -> bool {
        self.answer().ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_both_answered_their_last_probe() {
        let r = Readiness::default();
        assert_eq!(
            serde_json::to_value(r.answer()).unwrap(),
            serde_json::json!({"ready": false, "dependencies": {"kafka": null, "postgres": null}})
        );
        assert!(r.record(Dependency::Kafka, Instant::now(), Ok(())));
        assert!(!r.ready(), "PostgreSQL not probed yet");
        assert!(r.record(Dependency::Postgres, Instant::now(), Ok(())));
        assert!(r.ready());
        assert!(!r.record(
            Dependency::Postgres,
            Instant::now(),
            Err("down; fix X".into())
        ));
        let body = serde_json::to_value(r.answer()).unwrap();
        assert_eq!(body["ready"], false);
        assert_eq!(body["dependencies"]["postgres"]["ok"], false);
        assert_eq!(body["dependencies"]["postgres"]["error"], "down; fix X");
        assert_eq!(body["dependencies"]["kafka"]["ok"], true);
        assert!(body["dependencies"]["kafka"].get("error").is_none());
        assert!(body["dependencies"]["kafka"]["latency_ms"].is_u64());
    }

    #[tokio::test]
    async fn a_probe_that_hangs_fails_after_the_timeout() {
        let r = Readiness::default();
        let ok = r
            .probe(
                Dependency::Kafka,
                std::future::pending::<Result<(), String>>(),
            )
            .await;
        assert!(!ok);
        let kafka = r.answer().dependencies.kafka.unwrap();
        assert_eq!(kafka.error.as_deref(), Some("timed out after 2 s"));
        assert!(r.probe(Dependency::Postgres, async { Ok(()) }).await);
        assert_eq!(Dependency::Postgres.as_str(), "postgres");
    }
}
