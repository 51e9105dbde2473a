//! The Kafka side: one consumer on a thread of its own, feeding the store pipeline's lanes
//! through one bounded channel each (partition `p` of every topic to lane `p % lanes`).
//!
//! - Rebalances are handled in `rebalance.rs`, not by librdkafka's default: on assignment, each
//!   partition's start is read from `writer_offset` and handed to `incremental_assign`
//!   (cooperative-sticky), so a partition is positioned once, from the database, before any
//!   fetch. On revocation it is forgotten; records of it still in flight are dropped by the
//!   pipeline.
//! - When a lane's channel is full (the store is slower than Kafka, or PostgreSQL is down), the
//!   consumer pauses that lane's partitions but keeps polling, so it stays in the group; it
//!   resumes them when the lane catches up.
//! - The pipeline asks it, through a command channel, to commit offsets to Kafka (after the
//!   database commit, for lag tools) and to reposition a partition whose stored offset moved.

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use sluice_schema::kafka::KafkaProperties;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::decode::{self, Decoded, Rejection, TimeWindow};
use crate::error::WriterError;
use crate::metrics;
use crate::offsets::{Assignments, PartState, Tp};
use crate::rebalance::{export_lag, WriterContext};
use sluice_schema::topics::DataTopic;

/// One message as received, owned, stamped with its partition's epoch at receipt.
#[derive(Debug)]
pub(crate) struct Record {
    /// Source topic name.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// The partition's epoch when the record was polled (see [`PartState::epoch`]).
    pub epoch: u64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value (kept for the DLQ).
    pub payload: Option<Vec<u8>>,
    /// The value decoded and checked, on the consumer thread: that CPU work then overlaps the
    /// pipeline's wait on PostgreSQL instead of adding to it.
    pub decoded: Result<Decoded, Rejection>,
    /// When the consumer polled it: a batch is due by its oldest record's age, which counts
    /// the time the record waited behind a slow store.
    pub received: Instant,
}

impl Record {
    /// Bytes this record holds, for the batch's memory bound.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + 64
    }
}

/// Requests from the pipeline to the consumer thread.
#[derive(Debug)]
pub(crate) enum Command {
    /// Commit these next offsets to Kafka (asynchronously; the database has them already).
    Commit(Vec<(Tp, i64)>),
    /// Re-read this partition's stored offset, seek there and give it a fresh epoch.
    Reposition(Tp),
}

/// Names of the data topics and their kinds.
#[derive(Debug, Clone)]
pub(crate) struct TopicMap {
    entries: Vec<(Arc<str>, DataTopic)>,
}

impl TopicMap {
    pub fn new(topics: &sluice_schema::topics::Topics) -> TopicMap {
        TopicMap {
            entries: DataTopic::ALL
                .into_iter()
                .map(|t| (Arc::from(t.name(topics)), t))
                .collect(),
        }
    }

    fn lookup(&self, topic: &str) -> Option<(Arc<str>, DataTopic)> {
        self.entries
            .iter()
            .find(|(name, _)| &**name == topic)
            .map(|(n, k)| (n.clone(), *k))
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| &**n).collect()
    }
}

/// Creates the consumer and subscribes it to the data topics.
pub(crate) fn create(
    brokers: &str,
    properties: &KafkaProperties,
    group: &str,
    topics: &TopicMap,
    assignments: Arc<Assignments>,
    pool: Pool,
    stop: CancellationToken,
) -> Result<BaseConsumer<WriterContext>, WriterError> {
    let context = WriterContext {
        assignments,
        pool,
        rt: Handle::current(),
        group: group.to_owned(),
        stop,
    };
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Positions live in PostgreSQL; Kafka commits are explicit, after each DB commit.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // A partition with no stored offset starts at its beginning: nothing is skipped.
        .set("auto.offset.reset", "earliest")
        // Bounds librdkafka's prefetch per partition (the default is 64 MB).
        .set("queued.max.messages.kbytes", "16384")
        // Larger fetches: at librdkafka's 1 MB a partition the writer's lanes waited on Kafka
        // (events only, 300,000 rows: 30-33k rows/s with 1 MB, 60-64k with 4 MB, 60-67k with
        // 8 MB, against a raw COPY of 105-122k; writer/benches/writer.rs).
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        // The broker holds a fetch until 256 KB are there or 100 ms have passed. With
        // librdkafka's 1 byte a writer that keeps up fetches again the moment anything
        // arrives, and the fetches' CPU (Kafka's and the writer's) starved the stores they
        // fed (docs/benchmarks.md, the run of 2026-12-07 12:30Z).
        .set("fetch.min.bytes", "262144")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "2000");
    properties.apply(&mut client);
    let consumer: BaseConsumer<WriterContext> = client
        .create_with_context(context)
        .map_err(WriterError::kafka("creating the consumer"))?;
    consumer
        .subscribe(&topics.names())
        .map_err(WriterError::kafka("subscribing to the data topics"))?;
    Ok(consumer)
}

/// One lane as the consumer thread sees it.
struct Lane {
    tx: mpsc::Sender<Record>,
    /// Records polled but not yet accepted by the channel: a second batch's worth gathers here
    /// while the lane stores one, and only beyond `max_pending` are its partitions paused (a
    /// pause drops librdkafka's prefetched messages, which a resume must fetch again).
    pending: VecDeque<Record>,
    paused: bool,
}

/// The lane of a partition. Partition numbers are never negative; a broken one goes to lane 0.
fn lane_of(partition: i32, lanes: usize) -> usize {
    usize::try_from(partition).unwrap_or(0) % lanes
}

/// What the consumer thread needs besides its channels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PollSettings {
    /// Records held per lane beyond its channel before the lane's partitions are paused.
    pub max_pending: usize,
    /// Days back a message's time may lie (`SLUICE_RETENTION_DAYS`).
    pub retention_days: u32,
    /// Months ahead a message's time may lie (`SLUICE_PARTITION_MONTHS_AHEAD`).
    pub months_ahead: u32,
}

/// The window of accepted message times, recomputed at most once a second.
struct WindowClock {
    retention_days: u32,
    months_ahead: u32,
    current: TimeWindow,
    since: Instant,
}

impl WindowClock {
    fn new(retention_days: u32, months_ahead: u32) -> WindowClock {
        WindowClock {
            retention_days,
            months_ahead,
            current: TimeWindow::at(chrono::Utc::now(), retention_days, months_ahead),
            since: Instant::now(),
        }
    }

    fn now(&mut self) -> &TimeWindow {
        if self.since.elapsed() >= Duration::from_secs(1) {
            self.current =
                TimeWindow::at(chrono::Utc::now(), self.retention_days, self.months_ahead);
            self.since = Instant::now();
        }
        &self.current
    }
}

/// The consumer thread: poll, stamp, forward to the partition's lane; pause a lane's
/// partitions while it is full; run the pipeline's commands.
pub(crate) struct Poller {
    consumer: BaseConsumer<WriterContext>,
    topics: TopicMap,
    lanes: Vec<Lane>,
    commands: std_mpsc::Receiver<Command>,
    max_pending: usize,
    window: WindowClock,
    assignments: Arc<Assignments>,
    /// Repositions whose seek failed (a partition not fetching yet refuses seeks): retried.
    retry: Vec<Tp>,
    last_retry: Instant,
    last_lag: Instant,
    last_pause: Instant,
}

impl Poller {
    /// A poller feeding one lane per sender.
    pub fn new(
        consumer: BaseConsumer<WriterContext>,
        topics: TopicMap,
        senders: Vec<mpsc::Sender<Record>>,
        commands: std_mpsc::Receiver<Command>,
        settings: PollSettings,
    ) -> Poller {
        let assignments = consumer.context().assignments.clone();
        let lanes = senders
            .into_iter()
            .map(|tx| Lane {
                tx,
                pending: VecDeque::new(),
                paused: false,
            })
            .collect();
        Poller {
            consumer,
            topics,
            lanes,
            commands,
            max_pending: settings.max_pending,
            window: WindowClock::new(settings.retention_days, settings.months_ahead),
            assignments,
            retry: Vec::new(),
            last_retry: Instant::now(),
            last_lag: Instant::now(),
            last_pause: Instant::now(),
        }
    }

    /// Runs until `stop` (or until the pipeline's channels close), then leaves the group.
    pub fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            self.run_commands();
            if self.forward().is_err() {
                break;
            }
            self.poll_once();
            metrics::paused(self.lanes.iter().any(|l| l.paused));
            if self.last_lag.elapsed() >= Duration::from_secs(5) {
                export_lag(&self.consumer, &self.assignments);
                self.last_lag = Instant::now();
            }
        }
        leave(self.consumer);
    }

    /// The pipeline's commands, and the repositions to retry (every 200 ms).
    fn run_commands(&mut self) {
        while let Ok(cmd) = self.commands.try_recv() {
            self.retry
                .extend(run_command(&self.consumer, &self.assignments, cmd));
        }
        if !self.retry.is_empty() && self.last_retry.elapsed() >= Duration::from_millis(200) {
            self.last_retry = Instant::now();
            for tp in std::mem::take(&mut self.retry) {
                self.retry.extend(run_command(
                    &self.consumer,
                    &self.assignments,
                    Command::Reposition(tp),
                ));
            }
        }
    }

    /// Hands each lane's pending records to its channel; pauses a lane past `max_pending`,
    /// resumes it once drained. Err when a channel closed (the pipeline is gone).
    fn forward(&mut self) -> Result<(), ()> {
        let n = self.lanes.len().max(1);
        for (i, lane) in self.lanes.iter_mut().enumerate() {
            while let Some(rec) = lane.pending.pop_front() {
                match lane.tx.try_send(rec) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(rec)) => {
                        lane.pending.push_front(rec);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(()),
                }
            }
            if lane.pending.is_empty() && lane.paused {
                set_paused(&self.consumer, i, n, false);
                lane.paused = false;
            } else if lane.pending.len() >= self.max_pending && !lane.paused {
                set_paused(&self.consumer, i, n, true);
                lane.paused = true;
            }
        }
        Ok(())
    }

    /// Polls once (briefly when records wait for a lane) and queues what came on its lane.
    fn poll_once(&mut self) {
        let any_pending = self.lanes.iter().any(|l| !l.pending.is_empty());
        let timeout = if any_pending { 5 } else { 100 };
        match self.consumer.poll(Duration::from_millis(timeout)) {
            None => {}
            Some(Ok(msg)) => {
                repause(&self.consumer, &self.lanes, &mut self.last_pause);
                let Some((topic, kind)) = self.topics.lookup(msg.topic()) else {
                    return;
                };
                // Unowned partition (revoked between fetch and poll): drop.
                let Some(epoch) = self.assignments.epoch_of(msg.topic(), msg.partition()) else {
                    return;
                };
                let record = Record {
                    topic,
                    partition: msg.partition(),
                    offset: msg.offset(),
                    epoch,
                    key: msg.key().map(<[u8]>::to_vec),
                    payload: msg.payload().map(<[u8]>::to_vec),
                    decoded: decode::decode(kind, msg.payload(), self.window.now()),
                    received: Instant::now(),
                };
                let lane = lane_of(msg.partition(), self.lanes.len().max(1));
                self.lanes[lane].pending.push_back(record);
            }
            Some(Err(err)) => {
                // Broker down, partition EOF and the like: librdkafka reconnects by itself.
                tracing::warn!(cause = %err, "Kafka consumer error");
            }
        }
    }
}

/// A partition assigned while its lane is paused is not paused yet: pause it too (at most once
/// a second).
fn repause(consumer: &BaseConsumer<WriterContext>, lanes: &[Lane], last: &mut Instant) {
    if last.elapsed() < Duration::from_secs(1) {
        return;
    }
    let n = lanes.len().max(1);
    for (i, lane) in lanes.iter().enumerate() {
        if lane.paused {
            set_paused(consumer, i, n, true);
        }
    }
    *last = Instant::now();
}

/// Pauses or resumes the assigned partitions of lane `lane` of `lanes`.
fn set_paused(consumer: &BaseConsumer<WriterContext>, lane: usize, lanes: usize, pause: bool) {
    let result: KafkaResult<()> = consumer.assignment().and_then(|all| {
        let mut tpl = TopicPartitionList::new();
        for e in all.elements() {
            if lane_of(e.partition(), lanes) == lane {
                tpl.add_partition(e.topic(), e.partition());
            }
        }
        if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&tpl)
        }
    });
    match result {
        Ok(()) => tracing::debug!(pause, lane, "consumption paused/resumed"),
        Err(err) => {
            tracing::warn!(pause, lane, cause = %err, "cannot pause/resume partitions")
        }
    }
}

/// Runs one command; returns the partition to retry when a seek failed.
fn run_command(
    consumer: &BaseConsumer<WriterContext>,
    assignments: &Assignments,
    cmd: Command,
) -> Option<Tp> {
    match cmd {
        Command::Commit(positions) => {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), next) in positions {
                // Only partitions still owned: a commit for another's partition would be noise.
                if assignments.get(&topic, partition).is_some() {
                    if let Err(err) =
                        tpl.add_partition_offset(&topic, partition, Offset::Offset(next))
                    {
                        tracing::warn!(cause = %err, "cannot build Kafka commit");
                    }
                }
            }
            if tpl.count() > 0 {
                if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
                    // Kafka's copy is for lag tools only; the database holds the truth.
                    tracing::warn!(cause = %err, "Kafka offset commit failed");
                }
            }
            None
        }
        Command::Reposition(tp) => {
            assignments.get(&tp.0, tp.1)?;
            let ctx = consumer.context();
            let stored = ctx.load_offsets(std::slice::from_ref(&tp));
            let next = stored.get(&tp).copied();
            let offset = next.map_or(Offset::Beginning, Offset::Offset);
            match consumer.seek(&tp.0, tp.1, offset, Duration::from_secs(10)) {
                Ok(()) => {
                    assignments.set(
                        tp.clone(),
                        PartState {
                            epoch: assignments.next_epoch(),
                            stored_next: next,
                        },
                    );
                    tracing::info!(topic = %tp.0, partition = tp.1, next_offset = ?next, "partition repositioned from writer_offset");
                    None
                }
                Err(err) => {
                    // Still invalidated: its records keep being dropped until a seek works.
                    tracing::debug!(topic = %tp.0, partition = tp.1, cause = %err, "seek failed; retrying");
                    Some(tp)
                }
            }
        }
    }
}

/// Leaves the group cleanly: unsubscribing triggers the final revocation here, so the other
/// instances get the partitions at once instead of after the session timeout.
fn leave(consumer: BaseConsumer<WriterContext>) {
    consumer.unsubscribe();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
    {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    drop(consumer);
    tracing::info!("left the consumer group");
}
