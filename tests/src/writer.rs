//! Harness of the writer's tests: a migrated database and topics of the test's own, message
//! builders, a producer, and waiting for rows.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_schema::messages::{
    self, EventMessage, EventType, JsonObject, SessionMessage, Touch, VisitorMessage,
};
use sluice_schema::topics::{message_key, Topics};

use crate::query_scalar;
use crate::{bin_path, create_topics_on, kafka_config, unique_name, TestDb};

/// A database and topics for one writer test.
pub struct WriterEnv {
    /// Migrated database.
    pub db: TestDb,
    /// Topic prefix (unique).
    pub prefix: String,
    /// Topic names behind the prefix.
    pub topics: Topics,
    /// Consumer group (unique).
    pub group: String,
    /// Producer for the data topics.
    pub producer: FutureProducer,
    /// Kafka bootstrap servers of this environment.
    pub brokers: String,
    /// The client clock of [`WriterEnv::stream`]: message `m{i}` was sent at this time plus
    /// `i` ms, so streaming an id again is a client retry of it (same `timestamp`).
    pub clock_origin: DateTime<Utc>,
}

impl WriterEnv {
    /// Creates the database and the five topics with `partitions` partitions each.
    pub async fn new(partitions: i32) -> Result<WriterEnv> {
        WriterEnv::new_on(&crate::Stack::get().kafka_brokers, partitions).await
    }

    /// The same on another broker (a private one, for tests that stop it).
    pub async fn new_on(brokers: &str, partitions: i32) -> Result<WriterEnv> {
        let db = TestDb::migrated().await?;
        let prefix = format!("{}.", unique_name("w"));
        let topics = Topics::with_prefix(&prefix);
        create_topics_on(brokers, &topics.all(), partitions).await?;
        let mut config = kafka_config();
        config.set("bootstrap.servers", brokers);
        let producer: FutureProducer = config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .context("creating producer")?;
        Ok(WriterEnv {
            db,
            group: unique_name("g"),
            prefix,
            topics,
            producer,
            brokers: brokers.to_owned(),
            clock_origin: Utc::now(),
        })
    }

    /// Produces one raw value to `topic` under `key` and waits for the acknowledgement.
    pub async fn produce_raw(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        self.producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(err, _)| anyhow::anyhow!("producing to {topic}: {err}"))?;
        Ok(())
    }

    /// Produces events concurrently (bounded by librdkafka's queue) and waits for every ack.
    pub async fn produce_events(&self, events: &[EventMessage]) -> Result<()> {
        let topic = &self.topics.event;
        for chunk in events.chunks(2000) {
            let mut sends = Vec::with_capacity(chunk.len());
            for e in chunk {
                let key = message_key(e.tenant_id, e.anonymous_id.as_deref(), e.user_id.as_deref());
                let payload = serde_json::to_vec(e)?;
                let producer = self.producer.clone();
                let topic = topic.clone();
                sends.push(async move {
                    producer
                        .send(
                            FutureRecord::to(&topic).key(&key).payload(&payload),
                            Duration::from_secs(60),
                        )
                        .await
                        .map_err(|(err, _)| anyhow::anyhow!("producing: {err}"))
                });
            }
            for r in futures::future::join_all(sends).await {
                r?;
            }
        }
        Ok(())
    }

    /// Produces one message as JSON to `topic`.
    pub async fn produce_json<T: serde::Serialize>(
        &self,
        topic: &str,
        key: &str,
        msg: &T,
    ) -> Result<()> {
        self.produce_raw(topic, key, &serde_json::to_vec(msg)?)
            .await
    }
}

/// An event of `tenant` by `anonymous_id` with `message_id`, at `occurred_at`.
pub fn event(
    tenant: i64,
    anonymous_id: &str,
    message_id: &str,
    occurred_at: DateTime<Utc>,
) -> EventMessage {
    let mut properties = JsonObject::new();
    properties.insert("plan".into(), "pro".into());
    properties.insert("n".into(), 42.into());
    EventMessage {
        v: messages::VERSION,
        tenant_id: tenant,
        workspace_id: tenant * 10,
        event_id: messages::event_id(tenant, message_id),
        message_id: message_id.to_owned(),
        kind: EventType::Track,
        name: Some("Signed Up".into()),
        anonymous_id: Some(anonymous_id.to_owned()),
        user_id: None,
        session_id: Some(format!("s-{anonymous_id}")),
        occurred_at,
        timestamp: Some(occurred_at),
        sent_at: Some(occurred_at),
        received_at: Utc::now(),
        properties,
        context: JsonObject::new(),
        ip: Some("203.0.113.7".into()),
        user_agent: Some("Mozilla/5.0 (test)".into()),
        bot: false,
    }
}

/// A visitor message.
pub fn visitor(
    tenant: i64,
    anonymous_id: &str,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    count: i64,
    source: &str,
) -> VisitorMessage {
    let mut utm = JsonObject::new();
    utm.insert("source".into(), source.into());
    VisitorMessage {
        v: messages::VERSION,
        tenant_id: tenant,
        workspace_id: tenant * 10,
        anonymous_id: anonymous_id.to_owned(),
        user_id: None,
        first_seen_at: first,
        last_seen_at: last,
        event_count: count,
        first_touch: Touch {
            utm,
            referrer: Some(format!("https://{source}.example/")),
            landing_page: Some("https://shop.example/".into()),
        },
        user_agent: Some("Mozilla/5.0 (test)".into()),
        bot: false,
    }
}

/// A session message.
pub fn session(
    tenant: i64,
    session_id: &str,
    started: DateTime<Utc>,
    last: DateTime<Utc>,
    events: i64,
    pages: i64,
    source: &str,
) -> SessionMessage {
    let mut utm = JsonObject::new();
    utm.insert("source".into(), source.into());
    SessionMessage {
        v: messages::VERSION,
        tenant_id: tenant,
        workspace_id: tenant * 10,
        session_id: session_id.to_owned(),
        anonymous_id: Some("a-1".into()),
        user_id: None,
        started_at: started,
        last_seen_at: last,
        event_count: events,
        page_count: pages,
        first_touch: Touch {
            utm,
            referrer: None,
            landing_page: Some(format!("https://{source}.example/")),
        },
        device: JsonObject::new(),
        geo: JsonObject::new(),
    }
}

/// Polls `sql` (one bigint column, one row) until it returns `want`; fails after `timeout`
/// with the last value seen.
/// The real `sluice-writer` binary on `database_url` and `brokers`, storing `prefix`'s topics in
/// consumer group `group`: metrics on a port of its choosing, flushing every 100 ms, its log
/// appended to `log`, killed when dropped. Callers add settings (`.env`, the last one wins)
/// and spawn it.
pub fn writer_command(
    database_url: &str,
    brokers: &str,
    prefix: &str,
    group: &str,
    log: &std::path::Path,
) -> Result<tokio::process::Command> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = tokio::process::Command::new(bin_path("sluice-writer")?);
    command
        .env("SLUICE_DATABASE_URL", database_url)
        .env("SLUICE_KAFKA_BROKERS", brokers)
        .env("SLUICE_WRITER_GROUP", group)
        .env("SLUICE_TOPIC_PREFIX", prefix)
        .env("SLUICE_METRICS_LISTEN", "127.0.0.1:0")
        .env("SLUICE_WRITER_FLUSH_INTERVAL_MS", "100")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    Ok(command)
}

/// Rows of `event`.
pub async fn event_rows(client: &tokio_postgres::Client) -> Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM event", &[])
        .await?
        .get(0))
}

pub async fn wait_for_count(
    client: &tokio_postgres::Client,
    sql: &str,
    want: i64,
    timeout: Duration,
) -> Result<()> {
    let started = Instant::now();
    let mut last: Option<i64> = None;
    while started.elapsed() < timeout {
        if let Ok(row) = client.query_one(sql, &[]).await {
            let n: i64 = row.get(0);
            if n == want {
                return Ok(());
            }
            last = Some(n);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("`{sql}` was {last:?} after {timeout:?}, expected {want}")
}

/// A writer running in this process, stopped by [`RunningWriter::stop`].
pub struct RunningWriter {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), sluice_writer::WriterError>>,
}

impl RunningWriter {
    /// Starts `sluice_writer::run` with `config` on the current runtime.
    pub fn start(config: sluice_writer::Config) -> RunningWriter {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sluice_writer::run(config, async move {
            let _ = rx.await;
        }));
        RunningWriter {
            stop: Some(tx),
            task,
        }
    }

    /// Asks it to drain and waits for it; fails if it failed.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(60), &mut self.task).await {
            Ok(joined) => joined
                .context("writer task panicked")?
                .context("writer failed"),
            Err(_) => bail!("writer did not stop within 60 s"),
        }
    }

    /// True when the writer returned (by itself: an error).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Lets `outage` pass, then asserts the writer is still running: it waits out a stopped
    /// `what` (PostgreSQL, Kafka) instead of exiting.
    pub async fn outlasts(&self, outage: Duration, what: &str) {
        tokio::time::sleep(outage).await;
        assert!(
            !self.is_finished(),
            "the writer waits for {what} instead of exiting"
        );
    }
}

impl WriterEnv {
    /// A writer configuration for this environment (metrics on a free port).
    pub fn config(&self) -> sluice_writer::Config {
        sluice_writer::Config::for_tests(&self.brokers, &self.db.url, &self.prefix, &self.group)
    }
}

impl WriterEnv {
    /// Streams `total` events (5 tenants, 1,000 visitors) and, for each, a visitor message
    /// counting it once, at about `per_second` events a second, in the background. Each event's
    /// visitor adds 1 to `visitor.event_count`: a message stored twice or lost shows in the sum,
    /// not only in the event count (which `event_dedup` would protect on its own).
    pub fn stream(&self, total: usize, per_second: usize) -> tokio::task::JoinHandle<Result<()>> {
        self.stream_from(0, total, per_second)
    }

    /// [`WriterEnv::stream`] with message ids starting at `m{first}`.
    pub fn stream_from(
        &self,
        first: usize,
        total: usize,
        per_second: usize,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let producer = self.producer.clone();
        let (ev_topic, vis_topic) = (self.topics.event.clone(), self.topics.visitor.clone());
        let origin = self.clock_origin;
        tokio::spawn(async move {
            let chunk = (per_second / 10).max(1);
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut sent = first;
            let total = first + total;
            while sent < total {
                tick.tick().await;
                let now = Utc::now();
                let mut acks = Vec::with_capacity(chunk * 2);
                for i in sent..(sent + chunk).min(total) {
                    let tenant = 1 + (i % 5) as i64;
                    let anon = format!("a{}", i % 1000);
                    let mut e = event(tenant, &anon, &format!("m{i}"), now);
                    e.timestamp = Some(origin + chrono::Duration::milliseconds(i as i64));
                    let v = visitor(tenant, &anon, now, now, 1, "stream");
                    let key = message_key(tenant, Some(&anon), None);
                    for (topic, payload) in [
                        (&ev_topic, serde_json::to_vec(&e)?),
                        (&vis_topic, serde_json::to_vec(&v)?),
                    ] {
                        let producer = producer.clone();
                        let (topic, key) = (topic.clone(), key.clone());
                        acks.push(async move {
                            producer
                                .send(
                                    FutureRecord::to(&topic).key(&key).payload(&payload),
                                    Duration::from_secs(60),
                                )
                                .await
                                .map(|_| ())
                                .map_err(|(err, _)| anyhow::anyhow!("producing: {err}"))
                        });
                    }
                }
                for r in futures::future::join_all(acks).await {
                    r?;
                }
                sent = (sent + chunk).min(total);
            }
            Ok(())
        })
    }
}

/// Waits until `n` events and visitor counts summing to `n` are stored, then checks there is
/// no duplicate: the exactly-once effect, seen from the database.
pub async fn assert_stored_exactly_once(
    client: &tokio_postgres::Client,
    n: i64,
    timeout: Duration,
) -> Result<()> {
    wait_for_count(client, "SELECT count(*) FROM event", n, timeout).await?;
    wait_for_count(
        client,
        "SELECT coalesce(sum(event_count), 0)::bigint FROM visitor",
        n,
        timeout,
    )
    .await?;
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT (tenant_id, event_id)) FROM event",
            &[],
        )
        .await?;
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    if rows != n || distinct != n {
        bail!("{rows} event rows, {distinct} distinct ids, {n} produced");
    }
    // Stable: nothing more arrives late.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sum: i64 = query_scalar(
        client,
        "SELECT coalesce(sum(event_count), 0)::bigint FROM visitor",
    )
    .await?;
    if sum != n {
        bail!("visitor event_count sum moved to {sum} after settling, expected {n}");
    }
    Ok(())
}

/// One dead letter as read back from the DLQ topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadLetter {
    /// `sluice.reason` header.
    pub reason: String,
    /// `sluice.source.topic` header.
    pub topic: String,
    /// `sluice.source.partition` header.
    pub partition: i32,
    /// `sluice.source.offset` header.
    pub offset: i64,
    /// `sluice.detail` header.
    pub detail: String,
}

impl WriterEnv {
    /// Reads `n` dead letters from the DLQ topic (sorted), failing after `timeout`.
    pub async fn read_dlq(&self, n: usize, timeout: Duration) -> Result<Vec<DeadLetter>> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::{Headers, Message};
        use sluice_schema::topics::dlq_headers;
        let consumer: BaseConsumer = kafka_config()
            .set("group.id", unique_name("dlq"))
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&self.topics.dlq])?;
        let mut out = Vec::new();
        let started = Instant::now();
        while out.len() < n && started.elapsed() < timeout {
            let polled = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(200)));
            let Some(msg) = polled else { continue };
            let msg = msg?;
            let get = |name: &str| {
                msg.headers()
                    .and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default()
            };
            out.push(DeadLetter {
                reason: get(dlq_headers::REASON),
                topic: get(dlq_headers::SOURCE_TOPIC),
                partition: get(dlq_headers::SOURCE_PARTITION).parse().unwrap_or(-1),
                offset: get(dlq_headers::SOURCE_OFFSET).parse().unwrap_or(-1),
                detail: get(dlq_headers::DETAIL),
            });
        }
        if out.len() < n {
            bail!(
                "{} dead letters after {timeout:?}, expected {n}: {out:?}",
                out.len()
            );
        }
        out.sort();
        Ok(out)
    }
}

/// Waits until `group` has committed the end offset of every partition of the data topics.
///
/// Blocking (librdkafka calls): run it with `spawn_blocking`.
pub fn wait_all_consumed(group: &str, topics: &Topics) -> Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka_config().set("group.id", group).create()?;
    let t = Duration::from_secs(5);
    let mut behind = Vec::new();
    for _ in 0..300 {
        behind.clear();
        for topic in topics.data() {
            let md = consumer.fetch_metadata(Some(topic), t)?;
            for p in md.topics().iter().flat_map(|x| x.partitions()) {
                let (_, high) = consumer.fetch_watermarks(topic, p.id(), t)?;
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(topic, p.id());
                let committed = consumer.committed_offsets(tpl, t)?;
                let at = match committed.elements()[0].offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                if at < high {
                    behind.push((topic.to_owned(), p.id(), at, high));
                }
            }
        }
        if behind.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the writer did not consume everything: {behind:?}")
}

/// The whole HTTP/1.0 answer (status line, headers, body) to `GET path` on `127.0.0.1:port`:
/// a writer's metrics port, read without an HTTP client.
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}
