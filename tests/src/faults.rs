//! Harness of the fault suite: a steady HTTP load against a collector that records, for every
//! message it sent, whether the collector acknowledged it (200) or refused it, and the
//! reconciliations that end every fault test: what was acknowledged against what reached
//! Kafka or PostgreSQL, with duplicates counted. [`ReadinessWatch`] records a service's
//! `/readyz` through a fault, and [`vm_kib`] reads a process's memory from `/proc`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// What the load saw, per message.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// messageIds the collector answered 200 for: they must be stored, exactly once.
    pub acked: Vec<String>,
    /// messageIds of requests that got another status or no answer: they may or may not
    /// be stored (a client would retry them; the writer dedupes by messageId).
    pub unacked: Vec<String>,
    /// Requests per HTTP status.
    pub statuses: BTreeMap<u16, usize>,
    /// Requests that got no HTTP answer (connection refused or reset).
    pub transport_errors: usize,
    /// Answers of status 503 that carried a `Retry-After`.
    pub retry_after_503: usize,
}

impl LoadReport {
    /// Requests that got `status`.
    pub fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// A running load: `clients` tasks, each sending a batch of `batch` track messages, then
/// pausing `pause`, until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// [`Load::start`] at the fault tests' usual pace, 20 ms between a client's batches: fast
    /// enough that a fault lands mid-request, slow enough for two shared cores.
    pub fn paced(base: &str, key: &str, tag: &str, clients: usize, batch: usize) -> Load {
        Load::start(base, key, tag, clients, batch, Duration::from_millis(20))
    }

    /// Starts the load against `base` (`http://host:port`) with write key `key`.
    /// messageIds are `{tag}-{client}-{seq}-{i}`, unique across the test.
    pub fn start(
        base: &str,
        key: &str,
        tag: &str,
        clients: usize,
        batch: usize,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        let tasks = (0..clients)
            .map(|client| {
                let (stop, report, http) = (stop.clone(), report.clone(), http.clone());
                let url = format!("{base}/v1/batch");
                let (key, tag) = (key.to_owned(), tag.to_owned());
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<String> =
                            (0..batch).map(|i| format!("{tag}-{client}-{seq}-{i}")).collect();
                        let body = json!({"batch": ids.iter().map(|id| json!({
                            "type": "track", "event": "load", "messageId": id,
                            "anonymousId": format!("{tag}-v{}", (seq as usize * batch) % 97 + client),
                        })).collect::<Vec<_>>()});
                        let answer = http.post(&url).bearer_auth(&key).json(&body).send().await;
                        let mut r = report.lock().await;
                        match answer {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                *r.statuses.entry(status).or_default() += 1;
                                if status == 503 && resp.headers().contains_key("retry-after") {
                                    r.retry_after_503 += 1;
                                }
                                if status == 200 {
                                    r.acked.extend(ids);
                                } else {
                                    r.unacked.extend(ids);
                                }
                            }
                            Err(_) => {
                                r.transport_errors += 1;
                                r.unacked.extend(ids);
                            }
                        }
                        drop(r);
                        seq += 1;
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            report,
            tasks,
        }
    }

    /// messageIds acknowledged so far.
    pub async fn acked_so_far(&self) -> usize {
        self.report.lock().await.acked.len()
    }

    /// Requests per status so far.
    pub async fn statuses_so_far(&self) -> BTreeMap<u16, usize> {
        self.report.lock().await.statuses.clone()
    }

    /// Stops the clients, lets in-flight requests finish, and returns what they saw.
    pub async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        std::mem::take(&mut *self.report.lock().await)
    }
}

/// How stored messageIds compare with a load's acknowledgements.
#[derive(Debug)]
pub struct Reconciliation {
    /// Acknowledged messages.
    pub acked: usize,
    /// Acknowledged messages not stored: must be 0.
    pub lost: usize,
    /// Stored copies beyond the first of any messageId: must be 0.
    pub duplicates: usize,
    /// Unacknowledged messages that were stored anyway (allowed: at-least-once towards a
    /// client that retries; its retry is deduplicated by messageId).
    pub stored_unacked: usize,
}

/// Compares the stored messageIds (one entry per stored copy) with the load's report.
pub fn reconcile(report: &LoadReport, stored: &[String]) -> Reconciliation {
    let mut copies: HashMap<&str, usize> = HashMap::new();
    for id in stored {
        *copies.entry(id.as_str()).or_default() += 1;
    }
    let lost = report
        .acked
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .count();
    let duplicates = copies.values().map(|n| n - 1).sum();
    let stored_unacked = report
        .unacked
        .iter()
        .filter(|id| copies.contains_key(id.as_str()))
        .count();
    Reconciliation {
        acked: report.acked.len(),
        lost,
        duplicates,
        stored_unacked,
    }
}

/// The messageIds on an event topic, read until `at_least` arrived (or `within` passed),
/// then for `linger` more so late duplicates show.
pub async fn message_ids_in_topic(
    brokers: &str,
    topic: &str,
    at_least: usize,
    within: Duration,
) -> Result<Vec<String>> {
    let records =
        crate::ingest::consume(brokers, topic, at_least, within, Duration::from_secs(2)).await?;
    records
        .iter()
        .map(|c| match c.value["message_id"].as_str() {
            Some(id) => Ok(id.to_owned()),
            None => bail!("event record without message_id: {}", c.value),
        })
        .collect()
}

/// The messageIds in the `event` table, one entry per row.
pub async fn message_ids_in_table(client: &tokio_postgres::Client) -> Result<Vec<String>> {
    Ok(client
        .query("SELECT message_id FROM event", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Waits until every acknowledged message is a row of `event` (or `within` passes), then
/// reads a little longer, so late duplicates would show, and reconciles.
pub async fn settle_in_table(
    client: &tokio_postgres::Client,
    report: &LoadReport,
    within: Duration,
) -> Result<Reconciliation> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = reconcile(report, &message_ids_in_table(client).await?);
        if r.lost == 0 || tokio::time::Instant::now() > deadline {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return Ok(reconcile(report, &message_ids_in_table(client).await?));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A poller of a `/readyz` URL that keeps every answer, so a fault test can show that
/// readiness went false during the fault and came back after it.
pub struct ReadinessWatch {
    /// When each probe was sent, and whether it was answered 200.
    samples: Arc<std::sync::Mutex<Vec<(Instant, bool)>>>,
    task: JoinHandle<()>,
}

impl ReadinessWatch {
    /// Polls `url` every `every`. A probe unanswered within 5 s counts as not ready.
    pub fn start(url: String, every: Duration) -> ReadinessWatch {
        let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let task = tokio::spawn({
            let samples = samples.clone();
            async move {
                loop {
                    let sent = Instant::now();
                    let ready = matches!(http.get(&url).send().await, Ok(r) if r.status() == 200);
                    if let Ok(mut samples) = samples.lock() {
                        samples.push((sent, ready));
                    }
                    tokio::time::sleep(every).await;
                }
            }
        });
        ReadinessWatch { samples, task }
    }

    fn samples(&self) -> Vec<(Instant, bool)> {
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True when a probe sent in `[from, to)` was answered "not ready".
    pub fn not_ready_between(&self, from: Instant, to: Instant) -> bool {
        self.samples()
            .iter()
            .any(|(at, ready)| *at >= from && *at < to && !ready)
    }

    /// Waits up to `within` for a probe sent at or after `from` to be answered "ready", and
    /// returns how long after `from` that probe was sent.
    pub async fn ready_after(&self, from: Instant, within: Duration) -> Option<Duration> {
        let deadline = from + within;
        loop {
            let first = self
                .samples()
                .iter()
                .find(|(at, ready)| *at >= from && *ready)
                .map(|(at, _)| at.duration_since(from));
            if first.is_some() || Instant::now() > deadline {
                return first;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ReadinessWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A memory figure of process `pid` from `/proc/PID/status`, in KiB: `VmRSS` (resident now)
/// or `VmHWM` (the resident set's peak over the process's life, kept by the kernel, so no
/// spike between two samples is missed).
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
