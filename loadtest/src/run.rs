//! The `run` command: drive the collector, measure it, record every acknowledged event.
//!
//! The pipeline: the dispatcher (open loop: one task following the [`RateSchedule`]; closed
//! loop: N workers, each sending its next request when the last one is answered) draws
//! requests from the [`Generator`] and sends each on its own task -> every answer goes as a
//! [`Completion`] over a bounded channel to the recorder -> the recorder, the only owner of
//! the histograms, counters and ack file, records it and prints the progress line each second.
//!
//! Open-loop latency runs from the intended send time, so a collector stall is charged to
//! every request that should have gone out meanwhile. The dispatcher wakes on tokio's 1 ms
//! timer: a request may leave up to about 1 ms after its intended time, and that is counted.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::acks::AckWriter;
use crate::generate::{message_id, Endpoint, Generator, GeneratorConfig, Request};
use crate::keys::Key;
use crate::report::{new_histogram, record_us, Latency, Progress, RunReport};
use crate::schedule::RateSchedule;
use crate::send::{Outcome, Sender};
use crate::Error;

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// A constant arrival rate, whatever the answers do.
    Open {
        /// Requests per second.
        rate_rps: f64,
        /// Requests in flight at most; past it the dispatcher waits (and the wait is charged to
        /// the requests' latency, since it runs from their intended times).
        max_in_flight: usize,
    },
    /// `connections` requests in flight, each followed by the next as soon as it is answered.
    Closed {
        /// Concurrent connections.
        connections: usize,
    },
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Collector base URL, e.g. `http://127.0.0.1:8080`.
    pub collector_url: String,
    /// Pacing.
    pub mode: Mode,
    /// How long to send for.
    pub duration: Duration,
    /// Stop after this many requests, if sooner.
    pub max_requests: Option<u64>,
    /// Per-request timeout (connect, send and full answer).
    pub timeout: Duration,
    /// What to send.
    pub generator: GeneratorConfig,
    /// Prefix of every message id of the run.
    pub run_id: String,
    /// Where to record acknowledged events, if anywhere.
    pub ack_file: Option<PathBuf>,
    /// Print the progress line on stderr each second.
    pub progress: bool,
}

/// One answered (or failed) request, for the recorder.
struct Completion {
    /// From the intended send time (open loop) or the send (closed loop) to the answer.
    latency_us: u64,
    /// When the answer arrived, Unix microseconds.
    ack_unix_us: i64,
    /// The `timestamp` of the request's messages, Unix milliseconds; `None` for the pixel,
    /// which sends none.
    client_ms: Option<i64>,
    outcome: Outcome,
    request: Request,
}

/// The `timestamp` (milliseconds, as the generator formats it) of a request generated at `now`.
fn client_ms(request: &Request, now: DateTime<Utc>) -> Option<i64> {
    (request.endpoint != Endpoint::Pixel).then(|| now.timestamp_millis())
}

/// Capacity of the completion channel: answers wait here for the recorder. Full, it slows the
/// request tasks' exit (not the dispatcher), so it bounds memory without skewing latency.
const COMPLETION_QUEUE: usize = 8192;
/// Upper bound of `--max-in-flight`.
const MAX_IN_FLIGHT_LIMIT: usize = 1_000_000;
/// How often the ack file is flushed, so a following `verify` sees acks promptly.
const ACK_FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Runs a load test until `config.duration` passes, `max_requests` are sent or `shutdown`
/// resolves, then waits for the requests in flight and reports.
pub async fn run(
    config: RunConfig,
    keys: Vec<Key>,
    shutdown: impl Future<Output = ()>,
) -> Result<RunReport, Error> {
    if keys.is_empty() {
        return Err(Error::Usage(
            "no write keys: pass --key KEY or --create-tenants N".into(),
        ));
    }
    let plaintexts: Vec<String> = keys.iter().map(|k| k.plaintext.clone()).collect();
    let (max_idle, mode_name, target_rps, connections) = match config.mode {
        Mode::Open {
            rate_rps,
            max_in_flight,
        } => (max_in_flight.min(1024), "open", Some(rate_rps), None),
        Mode::Closed { connections } => (connections, "closed", None, Some(connections)),
    };
    let sender = Sender::new(&config.collector_url, &plaintexts, config.timeout, max_idle)?;
    let ack = match &config.ack_file {
        Some(path) => {
            let records: Vec<_> = keys.iter().enumerate().map(|(i, k)| k.record(i)).collect();
            Some(AckWriter::create(path, &config.run_id, &records)?)
        }
        None => None,
    };
    let generator = Generator::new(
        GeneratorConfig {
            keys: keys.len(),
            ..config.generator.clone()
        },
        &config.run_id,
    );
    let sent = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel(COMPLETION_QUEUE);
    let start = Instant::now();
    let recorder = Recorder::new(
        start,
        sent.clone(),
        ack,
        config.run_id.clone(),
        config.progress,
    );
    let recorder = tokio::spawn(recorder.run(rx));

    let deadline = start + config.duration;
    let max_requests = config.max_requests.unwrap_or(u64::MAX);
    tokio::pin!(shutdown);
    match config.mode {
        Mode::Open {
            rate_rps,
            max_in_flight,
        } => {
            let schedule = RateSchedule::new(start, rate_rps)?;
            // At most a million: more sockets than that would exhaust the machine first.
            let max_in_flight = max_in_flight.clamp(1, MAX_IN_FLIGHT_LIMIT);
            let permits = Arc::new(Semaphore::new(max_in_flight));
            let mut generator = generator;
            for i in 0..max_requests {
                let intended = schedule.intended(i);
                if intended >= deadline {
                    break;
                }
                if intended > Instant::now() {
                    tokio::select! {
                        () = tokio::time::sleep_until(intended) => {}
                        () = &mut shutdown => break,
                    }
                }
                let permit = tokio::select! {
                    permit = permits.clone().acquire_owned() => permit,
                    () = &mut shutdown => break,
                };
                let Ok(permit) = permit else { break };
                let now = Utc::now();
                let request = generator.next_request(now);
                let client_ms = client_ms(&request, now);
                sent.fetch_add(1, Ordering::Relaxed);
                let (sender, tx) = (sender.clone(), tx.clone());
                tokio::spawn(async move {
                    let outcome = sender.send(&request).await;
                    let latency = intended.elapsed();
                    let done = Completion {
                        latency_us: micros(latency),
                        ack_unix_us: unix_us(),
                        client_ms,
                        outcome,
                        request,
                    };
                    // A closed channel means the recorder failed; its error is reported.
                    let _ = tx.send(done).await;
                    drop(permit);
                });
            }
            // Wait for every request in flight (each ends within the request timeout).
            let _all = permits
                .acquire_many(u32::try_from(max_in_flight).unwrap_or(u32::MAX))
                .await;
        }
        Mode::Closed { connections } => {
            let generator = Arc::new(Mutex::new(generator));
            let stop = Arc::new(AtomicBool::new(false));
            let mut workers = Vec::with_capacity(connections);
            for _ in 0..connections.max(1) {
                let (sender, tx, generator, stop, sent) = (
                    sender.clone(),
                    tx.clone(),
                    generator.clone(),
                    stop.clone(),
                    sent.clone(),
                );
                workers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if sent.fetch_add(1, Ordering::Relaxed) >= max_requests {
                            sent.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                        let now = Utc::now();
                        let request = generator
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .next_request(now);
                        let client_ms = client_ms(&request, now);
                        let begun = Instant::now();
                        let outcome = sender.send(&request).await;
                        let done = Completion {
                            latency_us: micros(begun.elapsed()),
                            ack_unix_us: unix_us(),
                            client_ms,
                            outcome,
                            request,
                        };
                        if tx.send(done).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            let all_done = futures::future::join_all(workers);
            tokio::pin!(all_done);
            tokio::select! {
                _ = &mut all_done => {}
                () = &mut shutdown => {
                    stop.store(true, Ordering::Relaxed);
                    all_done.await;
                }
            }
        }
    }
    drop(tx);
    let totals = recorder
        .await
        .map_err(|err| Error::Usage(format!("the recorder task failed: {err}")))??;
    let duration_s = totals
        .last_answer
        .unwrap_or(start)
        .duration_since(start)
        .as_secs_f64();
    let per_s = |n: u64| crate::report::per_second(n, duration_s);
    Ok(RunReport {
        run_id: config.run_id,
        mode: mode_name,
        target_rps,
        connections,
        duration_s,
        requests_sent: sent.load(Ordering::Relaxed),
        requests_acked: totals.requests_acked,
        errors: totals.errors,
        events_acked: totals.events_acked,
        identifies_acked: totals.identifies_acked,
        messages_rejected: totals.messages_rejected,
        requests_per_s: per_s(totals.requests_acked),
        events_per_s: per_s(totals.events_acked),
        messages_per_s: per_s(totals.events_acked + totals.identifies_acked),
        latency: Latency::of(&totals.latency),
        ack_file: config.ack_file.map(|p| p.display().to_string()),
    })
}

/// A fresh run id: 8 hex digits, random, so repeated runs never share message ids.
pub fn new_run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// What the recorder hands back at the end.
struct Totals {
    latency: Histogram<u64>,
    requests_acked: u64,
    events_acked: u64,
    identifies_acked: u64,
    messages_rejected: u64,
    errors: BTreeMap<String, u64>,
    last_answer: Option<Instant>,
}

/// Owns every measurement of the run; fed by the completion channel.
struct Recorder {
    start: Instant,
    /// Requests sent so far (the dispatcher counts them).
    sent: Arc<AtomicU64>,
    ack: Option<AckWriter>,
    run_id: String,
    progress: bool,
    totals: Totals,
    /// This second's completions, for the progress line.
    interval: Histogram<u64>,
    interval_acked: u64,
    interval_events: u64,
    interval_errors: BTreeMap<String, u64>,
    sent_at_last_tick: u64,
    answered: u64,
}

impl Recorder {
    fn new(
        start: Instant,
        sent: Arc<AtomicU64>,
        ack: Option<AckWriter>,
        run_id: String,
        progress: bool,
    ) -> Recorder {
        Recorder {
            start,
            sent,
            ack,
            run_id,
            progress,
            totals: Totals {
                latency: new_histogram(),
                requests_acked: 0,
                events_acked: 0,
                identifies_acked: 0,
                messages_rejected: 0,
                errors: BTreeMap::new(),
                last_answer: None,
            },
            interval: new_histogram(),
            interval_acked: 0,
            interval_events: 0,
            interval_errors: BTreeMap::new(),
            sent_at_last_tick: 0,
            answered: 0,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Completion>) -> Result<Totals, Error> {
        let mut flush = tokio::time::interval(ACK_FLUSH_INTERVAL);
        let mut tick =
            tokio::time::interval_at(self.start + Duration::from_secs(1), Duration::from_secs(1));
        let mut last_tick = self.start;
        loop {
            tokio::select! {
                done = rx.recv() => match done {
                    Some(done) => self.record(done)?,
                    None => break,
                },
                _ = flush.tick() => {
                    if let Some(ack) = &mut self.ack {
                        ack.flush()?;
                    }
                }
                now = tick.tick() => {
                    self.print_progress(now.duration_since(last_tick));
                    last_tick = now;
                }
            }
        }
        if let Some(ack) = self.ack.take() {
            ack.finish()?;
        }
        Ok(self.totals)
    }

    fn record(&mut self, done: Completion) -> Result<(), Error> {
        let now = Instant::now();
        self.totals.last_answer = Some(now);
        self.answered += 1;
        record_us(&mut self.totals.latency, done.latency_us);
        record_us(&mut self.interval, done.latency_us);
        let rejections = match done.outcome {
            Outcome::Acked(rejections) => rejections,
            failed => {
                let label = failed.error_label().unwrap_or_default();
                *self.totals.errors.entry(label.clone()).or_default() += 1;
                *self.interval_errors.entry(label).or_default() += 1;
                return Ok(());
            }
        };
        self.totals.requests_acked += 1;
        self.interval_acked += 1;
        let req = done.request;
        self.totals.messages_rejected += rejections.len() as u64;
        if rejections.unattributed > 0 {
            // Which messages were refused is unknown: claim none of them.
            return Ok(());
        }
        let rejected: HashSet<u64> = if rejections.is_empty() {
            HashSet::new()
        } else {
            // Messages carry consecutive sequence numbers in body order.
            let first = req
                .event_seqs
                .iter()
                .chain(&req.identify_seqs)
                .min()
                .copied()
                .unwrap_or(0);
            let by_id: HashSet<&str> = rejections.message_ids.iter().map(String::as_str).collect();
            req.event_seqs
                .iter()
                .chain(&req.identify_seqs)
                .copied()
                .filter(|&seq| {
                    rejections.indexes.contains(&((seq - first) as usize))
                        || by_id.contains(message_id(&self.run_id, seq).as_str())
                })
                .collect()
        };
        self.totals.identifies_acked += req
            .identify_seqs
            .iter()
            .filter(|s| !rejected.contains(s))
            .count() as u64;
        for &seq in req.event_seqs.iter().filter(|s| !rejected.contains(s)) {
            self.totals.events_acked += 1;
            self.interval_events += 1;
            if let Some(ack) = &mut self.ack {
                ack.ack(
                    req.key_index,
                    &message_id(&self.run_id, seq),
                    done.ack_unix_us,
                    done.client_ms,
                )?;
            }
        }
        Ok(())
    }

    fn print_progress(&mut self, interval: Duration) {
        let sent = self.sent.load(Ordering::Relaxed);
        let line = Progress {
            elapsed_s: self.start.elapsed().as_secs_f64(),
            interval_s: interval.as_secs_f64(),
            sent: sent - self.sent_at_last_tick.min(sent),
            acked: self.interval_acked,
            events: self.interval_events,
            errors: std::mem::take(&mut self.interval_errors),
            latency: Latency::of(&self.interval),
            in_flight: sent.saturating_sub(self.answered),
        };
        if self.progress {
            eprintln!("{line}");
        }
        self.sent_at_last_tick = sent;
        self.interval.reset();
        self.interval_acked = 0;
        self.interval_events = 0;
    }
}
