//! Producing a request's messages to Kafka and waiting for every acknowledgement: the
//! [`Sink`] trait (so handlers can be tested without a broker), the Kafka sink (idempotent,
//! `acks=all`, compressed, bounded queue), and topic creation at start-up.
//!
//! Delivery guarantee: [`Sink::send`] returns `Ok` only when Kafka acknowledged every record
//! of the call (with `acks=all`, when all in-sync replicas have it). Any other outcome is an
//! error the caller answers 503: some records may still have been stored, which the client's
//! retry with the same `messageId`s makes harmless (the writer deduplicates by event id).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use serde::Serialize;
use sluice_schema::kafka::{ErrorTap, TapContext};
use sluice_schema::topics;
use sluice_schema::topics::{message_key_into, DataTopic, Topics};
use tokio::sync::{oneshot, Notify};

use crate::config::Config;
use crate::enrich::Outgoing;
use crate::error::IngestError;
use crate::metrics;

/// One Kafka record, borrowed from its request's [`Records`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Destination.
    pub topic: DataTopic,
    /// `{tenant_id}/{anonymous_id or user_id}`.
    pub key: &'a [u8],
    /// The message's JSON.
    pub payload: &'a [u8],
}

/// A request's records, events first, in request order, so one visitor's records keep their
/// order within a partition. Keys and payloads are written one after another into a single
/// buffer: a record costs no allocation or copy of its own before librdkafka copies it (a
/// `Vec` and a `String` a record were 6 of a single call's 52 allocations).
#[derive(Debug)]
pub struct Records {
    bytes: Vec<u8>,
    /// Each record's topic and where its key and its payload end in `bytes` (each starts
    /// where the one before it ends).
    ends: Vec<(DataTopic, usize, usize)>,
}

impl Records {
    /// How many.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The records, in order.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        let mut start = 0;
        self.ends.iter().map(move |&(topic, key_end, end)| {
            let record = Record {
                topic,
                key: &self.bytes[start..key_end],
                payload: &self.bytes[key_end..end],
            };
            start = end;
            record
        })
    }

    fn push<T: Serialize>(
        &mut self,
        topic: DataTopic,
        (tenant_id, anonymous_id, user_id): (i64, Option<&str>, Option<&str>),
        msg: &T,
    ) -> Result<(), serde_json::Error> {
        message_key_into(&mut self.bytes, tenant_id, anonymous_id, user_id);
        let key_end = self.bytes.len();
        serde_json::to_writer(&mut self.bytes, msg)?;
        self.ends.push((topic, key_end, self.bytes.len()));
        Ok(())
    }
}

/// Serialises a request's messages into records (see [`Records`]).
pub fn records(out: &Outgoing) -> Result<Records, serde_json::Error> {
    let count = out.events.len() + out.identities.len() + out.visitors.len() + out.sessions.len();
    let mut records = Records {
        // About a record's size, so that a request's buffer seldom grows more than once.
        bytes: Vec::with_capacity(1024 * (count + 1)),
        ends: Vec::with_capacity(count),
    };
    for e in &out.events {
        let key = (e.tenant_id, e.anonymous_id.as_deref(), e.user_id.as_deref());
        records.push(DataTopic::Event, key, e)?;
    }
    for i in &out.identities {
        // An alias has no anonymous id: key it by the previous id, the identity being merged.
        let who = i.anonymous_id.as_deref().or(i.previous_id.as_deref());
        records.push(
            DataTopic::Identity,
            (i.tenant_id, who, i.user_id.as_deref()),
            i,
        )?;
    }
    for v in &out.visitors {
        let key = (v.tenant_id, Some(v.anonymous_id.as_str()), None);
        records.push(DataTopic::Visitor, key, v)?;
    }
    for s in &out.sessions {
        let key = (s.tenant_id, s.anonymous_id.as_deref(), s.user_id.as_deref());
        records.push(DataTopic::Session, key, s)?;
    }
    Ok(records)
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The producer's bounded queue is full: Kafka is slower than the traffic.
    #[error("producer queue full")]
    QueueFull,
    /// Not every acknowledgement came within the produce timeout.
    #[error("Kafka did not acknowledge in time")]
    Timeout,
    /// Kafka refused a record.
    #[error("Kafka refused a message: {0}")]
    Kafka(KafkaError),
}

impl ProduceError {
    /// Metric label.
    pub const fn reason(&self) -> &'static str {
        match self {
            ProduceError::QueueFull => "queue_full",
            ProduceError::Timeout => "timeout",
            ProduceError::Kafka(_) => "kafka",
        }
    }
}

/// Where a request's records go: Kafka in production, a vector in handler unit tests.
pub trait Sink: Send + Sync + 'static {
    /// Sends `records` and resolves when all are acknowledged, or with the first failure.
    fn send(&self, records: Records) -> impl Future<Output = Result<(), ProduceError>> + Send;
    /// Records handed over and not yet acknowledged.
    fn queue_depth(&self) -> usize;
    /// True when the backend answered recently (for `/readyz`); probes it.
    fn probe(&self, timeout: Duration) -> impl Future<Output = Result<(), String>> + Send;
    /// Waits up to `timeout` for everything in flight (drain).
    fn flush(&self, timeout: Duration) -> impl Future<Output = ()> + Send;
    /// The backend client's last connection-level error (refused credentials, TLS), when
    /// fresh: what a timed-out request does not say.
    fn client_error(&self) -> Option<String> {
        None
    }
}

/// What one request is owed by Kafka: an acknowledgement per record, counted down by the
/// producer's delivery callbacks. The last one, or the first failure, answers the request once.
/// One count a request rather than a future a record (rdkafka's `FutureProducer`): no channel
/// and box allocated per record, and one wake-up of the request instead of one per record.
struct Acks {
    /// Records not yet acknowledged.
    remaining: AtomicUsize,
    /// Taken by whichever delivery settles the request. Dropped unanswered (the producer
    /// went away under us, at shut-down), the request's wait ends in an error.
    answer: Mutex<Option<oneshot::Sender<Result<(), KafkaError>>>>,
}

impl Acks {
    fn new(records: usize, answer: oneshot::Sender<Result<(), KafkaError>>) -> Acks {
        Acks {
            remaining: AtomicUsize::new(records),
            answer: Mutex::new(Some(answer)),
        }
    }

    /// One record acknowledged; the last one answers the request.
    fn acknowledged(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settle(Ok(()));
        }
    }

    /// One record refused or timed out: the request's answer, unless it has one already.
    fn failed(&self, err: KafkaError) {
        self.settle(Err(err));
    }

    fn settle(&self, result: Result<(), KafkaError>) {
        // A poisoned lock only means another delivery panicked mid-settle: the answer is still
        // there to take.
        let taken = self
            .answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(answer) = taken {
            // The request may have given up waiting (its timeout): nobody to tell then.
            let _ = answer.send(result);
        }
    }
}

/// The collector producer's context: client-wide errors into the tap, as in every sluice
/// client, and each delivery counted against its request's [`Acks`].
#[derive(Default)]
struct AckContext {
    tap: TapContext,
}

impl ClientContext for AckContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.tap.error(error, reason);
    }
}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<Acks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<Acks>) {
        match result {
            Ok(_) => acks.acknowledged(),
            Err((err, _)) => acks.failed(err.clone()),
        }
    }
}

/// The Kafka [`Sink`].
pub struct KafkaSink {
    /// The shared producer; rdkafka batches across requests inside it. [`serve_deliveries`]
    /// runs its delivery callbacks.
    producer: Arc<BaseProducer<AckContext>>,
    /// Wakes [`serve_deliveries`] when records are sent to an idle producer.
    sent: Arc<Notify>,
    /// The producer's last client-wide error (refused credentials, TLS), for `/readyz`.
    tap: ErrorTap,
    /// Topic names.
    topics: Topics,
    /// How long a send waits for acknowledgements.
    timeout: Duration,
}

/// The producer settings of docs/architecture.md §3.4, with the bounds from `config`.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka_args.kafka_brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", &config.producer_compression)
        .set("linger.ms", config.producer_linger_ms.to_string())
        .set(
            "queue.buffering.max.messages",
            config.producer_queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            config.producer_queue_max_kbytes.to_string(),
        )
        // Give up on a message when the request gave up on it, so nothing is stored long
        // after its client was told 503 (librdkafka default: 300000).
        .set(
            "message.timeout.ms",
            config.produce_timeout_ms.max(1).to_string(),
        )
        // Notice a stopped broker quickly (librdkafka default: 60000).
        .set(
            "socket.timeout.ms",
            config.produce_timeout_ms.max(10).to_string(),
        )
        // Back within a second of the broker (librdkafka's default, 10 s between attempts, kept
        // the collector answering 503 for 6-10 s after a network cut healed).
        .set("reconnect.backoff.max.ms", "1000")
        // Requests go out when written: with Nagle on, a produce request pipelined behind an
        // unacknowledged one waited for its ACK (64 connections, batches of 20: 40,800 and
        // 51,223 events/s, p99 95 and 55 ms; with it off 56,775 and 58,833, p99 45 ms).
        .set("socket.nagle.disable", "true")
        .set("client.id", "sluice-ingest");
    config.kafka.apply(&mut c);
    c
}

impl KafkaSink {
    /// A sink producing to `config`'s brokers and topics.
    pub fn new(config: &Config) -> Result<KafkaSink, IngestError> {
        let context = AckContext::default();
        let tap = context.tap.tap.clone();
        let producer: Arc<BaseProducer<AckContext>> = Arc::new(
            producer_config(config)
                .create_with_context(context)
                .map_err(|e| IngestError::KafkaConfig(sluice_schema::kafka::describe_error(&e)))?,
        );
        let sent = Arc::new(Notify::new());
        tokio::spawn(serve_deliveries(Arc::downgrade(&producer), sent.clone()));
        Ok(KafkaSink {
            producer,
            sent,
            tap,
            topics: config.topics(),
            timeout: config.produce_timeout(),
        })
    }
}

impl Sink for KafkaSink {
    fn client_error(&self) -> Option<String> {
        self.tap.recent()
    }

    async fn send(&self, records: Records) -> Result<(), ProduceError> {
        if records.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (answer, answered) = oneshot::channel();
        let acks = Arc::new(Acks::new(records.len(), answer));
        // Enqueue in order (librdkafka keeps per-partition order with idempotence on), then
        // wait for all acknowledgements together: the request costs one round trip, not one
        // per message.
        for r in records.iter() {
            let record = BaseRecord::with_opaque_to(r.topic.name(&self.topics), acks.clone())
                .key(r.key)
                .payload(r.payload);
            match self.producer.send(record) {
                Ok(()) => {}
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(ProduceError::QueueFull)
                }
                Err((err, _)) => return Err(ProduceError::Kafka(err)),
            }
        }
        self.sent.notify_one();
        // librdkafka copied every key and payload: ours go before the wait (see `handle`).
        drop(records);
        drop(acks);
        // librdkafka times messages out at `message.timeout.ms` itself; this outer timeout
        // is the request's own promise, with a little slack for the callback to arrive.
        let answer = tokio::time::timeout(self.timeout + Duration::from_millis(500), answered)
            .await
            .map_err(|_| ProduceError::Timeout)?;
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut))) => {
                return Err(ProduceError::Timeout)
            }
            Ok(Err(err)) => return Err(ProduceError::Kafka(err)),
            // The producer was dropped under us: only at shut-down.
            Err(_dropped) => return Err(ProduceError::Timeout),
        }
        metrics::kafka_produced(started.elapsed());
        Ok(())
    }

    fn queue_depth(&self) -> usize {
        usize::try_from(self.producer.in_flight_count()).unwrap_or(0)
    }

    async fn probe(&self, timeout: Duration) -> Result<(), String> {
        let producer = self.producer.clone();
        // fetch_metadata blocks its thread; keep it off the runtime's workers.
        let result = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|md| md.brokers().len())
        })
        .await
        .map_err(|e| e.to_string())?;
        match result {
            Ok(0) => Err("no brokers in metadata".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(sluice_schema::kafka::describe_with_tap(&e, &self.tap)),
        }
    }

    async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        let result = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
        match result {
            Ok(Ok(())) => tracing::info!("producer flushed"),
            Ok(Err(err)) => tracing::warn!(cause = %err, "producer flush incomplete"),
            Err(err) => tracing::warn!(cause = %err, "producer flush task failed"),
        }
    }
}

/// Serves the producer's delivery reports (and client-wide errors) on the runtime: every
/// millisecond while records are owed, else when a send wakes it or every 100 ms. rdkafka's
/// `ThreadedProducer` gives them a thread of its own, which woke for each report and then woke
/// a runtime worker for each request it answered: below saturation that thread and the
/// wake-ups were a tenth of the collector's CPU (docs/benchmarks.md, "Deliveries on the
/// runtime"). Ends when the sink is dropped.
async fn serve_deliveries(producer: Weak<BaseProducer<AckContext>>, sent: Arc<Notify>) {
    loop {
        let Some(p) = producer.upgrade() else {
            return;
        };
        // One event (a partition batch's reports, or an error) per `poll(0)`; served until
        // the count of records owed stops falling, so the reports of a burst go at once.
        for _ in 0..MAX_EVENTS_A_TURN {
            let owed = p.in_flight_count();
            p.poll(Duration::ZERO);
            if p.in_flight_count() == owed {
                break;
            }
        }
        let idle = p.in_flight_count() == 0;
        drop(p);
        if idle {
            let _ = tokio::time::timeout(Duration::from_millis(100), sent.notified()).await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Events served in one turn at most, so a flood of reports cannot hold a worker.
const MAX_EVENTS_A_TURN: usize = 256;

/// Creates the topics of `config` that are missing.
pub async fn ensure_topics(config: &Config) -> Result<(), String> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.kafka_args.kafka_brokers)
        .set("socket.timeout.ms", "5000");
    config.kafka.apply(&mut client);
    topics::create_missing_with(
        &client,
        &config.topics().all(),
        config.topic_args.topic_partitions,
        config.topic_args.topic_replication,
        config.topic_args.topic_min_insync_replicas,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(records: usize) -> (Acks, oneshot::Receiver<Result<(), KafkaError>>) {
        let (answer, answered) = oneshot::channel();
        (Acks::new(records, answer), answered)
    }

    #[test]
    fn a_request_is_answered_by_its_last_acknowledgement_only() {
        let (acks, mut answered) = acks(3);
        acks.acknowledged();
        acks.acknowledged();
        assert!(
            answered.try_recv().is_err(),
            "answered before every record was acknowledged"
        );
        acks.acknowledged();
        assert!(matches!(answered.try_recv(), Ok(Ok(()))));
    }

    #[test]
    fn the_first_failure_answers_and_later_deliveries_change_nothing() {
        let (acks, mut answered) = acks(3);
        acks.acknowledged();
        acks.failed(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        acks.acknowledged();
        acks.failed(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge,
        ));
        assert!(matches!(
            answered.try_recv(),
            Ok(Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            )))
        ));
    }

    #[test]
    fn acks_dropped_unanswered_end_the_wait_in_an_error() {
        let (acks, mut answered) = acks(2);
        acks.acknowledged();
        drop(acks);
        assert!(matches!(
            answered.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
