//! Harness of the collector's tests: a tenant, workspace and key in a migrated database of
//! the test's own, a collector served in-process on `127.0.0.1:0` with a topic prefix of its
//! own, and a consumer that reads back what the collector produced.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use sluice_ingest::{Config, IngestError};
use sluice_schema::control::{self, CreatedKey};
use sluice_schema::topics::Topics;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{bin_path, unique_name, Stack, TestDb};

/// The PII keys of test collectors (`k1`, 32 bytes of 7, active): a writer given the same
/// keys matches and re-seals what they sealed.
pub const TEST_PII_KEYS: &str = "k1=BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// [`TEST_PII_KEYS`] as keys.
pub fn test_pii_keys() -> sluice_schema::pii::PiiKeys {
    // A constant that parses; a failure here is a broken constant, caught by every test.
    sluice_schema::pii::PiiKeys::from_env_strings(TEST_PII_KEYS, "k1")
        .unwrap_or_else(|err| panic!("TEST_PII_KEYS: {err}"))
}

/// A tenant with a workspace and a write key.
pub struct Account {
    /// Tenant id.
    pub tenant_id: i64,
    /// Workspace id.
    pub workspace_id: i64,
    /// The key (plaintext in `key.plaintext`).
    pub key: CreatedKey,
}

/// Creates a tenant, a workspace and a write key in `db`.
pub async fn account(db: &TestDb, name: &str) -> Result<Account> {
    let client = db.client().await?;
    let tenant_id = control::create_tenant(&client, name).await?;
    let workspace_id = control::create_workspace(&client, tenant_id, "main").await?;
    let key = control::create_key(&client, workspace_id, Some("test")).await?;
    Ok(Account {
        tenant_id,
        workspace_id,
        key,
    })
}

/// A migrated database of the test's own, an account `name` in it and a ready collector on
/// it: how most collector tests begin. Bind the database to a name (`_db`, not `_`) for as long
/// as the collector runs, because dropping it drops the database.
pub async fn served(name: &str) -> Result<(TestDb, Account, Collector)> {
    let db = TestDb::migrated().await?;
    let acct = account(&db, name).await?;
    let collector = Collector::start(Collector::config(&db)).await?;
    Ok((db, acct, collector))
}

/// [`served`] with the collector's config adjusted by `adjust` first.
pub async fn served_with(
    name: &str,
    adjust: impl FnOnce(&mut Config),
) -> Result<(TestDb, Account, Collector)> {
    let db = TestDb::migrated().await?;
    let acct = account(&db, name).await?;
    let mut config = Collector::config(&db);
    adjust(&mut config);
    let collector = Collector::start(config).await?;
    Ok((db, acct, collector))
}

/// POSTs `body` as JSON to `url` with `key` as the bearer token: a Segment-style call.
pub async fn post_json<T: serde::Serialize + ?Sized>(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    key: impl std::fmt::Display,
    body: &T,
) -> reqwest::Result<reqwest::Response> {
    http.post(url).bearer_auth(key).json(body).send().await
}

/// A `sluice-ingest` process on `database_url` and the shared broker, under topic `prefix`
/// (3 partitions): API on `port`, metrics on `metrics_port`, its log written to `log`, killed
/// when dropped. Callers add settings (`.env`, the last one wins) and spawn it.
pub fn ingest_command(
    database_url: &str,
    prefix: &str,
    port: u16,
    metrics_port: u16,
    log: &std::path::Path,
) -> Result<tokio::process::Command> {
    let log = std::fs::File::create(log)?;
    let mut command = tokio::process::Command::new(bin_path("sluice-ingest")?);
    command
        .env("SLUICE_INGEST_LISTEN", format!("127.0.0.1:{port}"))
        .env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("SLUICE_KAFKA_BROKERS", &Stack::get().kafka_brokers)
        .env("SLUICE_DATABASE_URL", database_url)
        .env("SLUICE_TOPIC_PREFIX", prefix)
        .env("SLUICE_TOPIC_PARTITIONS", "3")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    Ok(command)
}

/// A collector running in the test's process.
pub struct Collector {
    /// API address.
    pub addr: SocketAddr,
    /// Metrics/health address.
    pub metrics_addr: SocketAddr,
    /// The topics it produces to.
    pub topics: Topics,
    /// The configuration it runs with.
    pub config: Config,
    /// Sends the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    /// The serving task.
    task: Option<JoinHandle<Result<(), IngestError>>>,
}

impl Collector {
    /// A test configuration: the shared broker and `db`, a unique topic prefix, fast probes,
    /// PII sealed with [`TEST_PII_KEYS`].
    pub fn config(db: &TestDb) -> Config {
        let mut config = Config::local();
        config.pii_args.pii_keys = TEST_PII_KEYS.into();
        config.pii_args.pii_active_key = "k1".into();
        config.kafka_args.kafka_brokers = Stack::get().kafka_brokers.clone();
        config.database_args.database_url = db.url.clone();
        config.topic_prefix = format!("{}.", unique_name("i"));
        config.topic_args.topic_partitions = 3;
        config.readiness_interval_ms = 200;
        config.key_last_used_flush_ms = 200;
        config
    }

    /// [`Collector::config`] for a test that drives its own load through one key: no rate
    /// limit, so no 429 is mixed into what the fault did.
    pub fn config_for_load(db: &TestDb) -> Config {
        let mut config = Collector::config(db);
        config.rate_limit_per_key_per_second = 0;
        config
    }

    /// Starts a collector with `config` and waits until `/readyz` says ready (topics made).
    pub async fn start(config: Config) -> Result<Collector> {
        let collector = Collector::start_unready(config).await?;
        collector.wait_ready(Duration::from_secs(60)).await?;
        Ok(collector)
    }

    /// Starts a collector without waiting for readiness.
    pub async fn start_unready(config: Config) -> Result<Collector> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let metrics_addr = metrics.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(sluice_ingest::serve_on(
            config.clone(),
            listener,
            metrics,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Collector {
            addr,
            metrics_addr,
            topics: config.topics(),
            config,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        let http = reqwest::Client::new();
        loop {
            let resp = http
                .get(format!("http://{}/readyz", self.metrics_addr))
                .send()
                .await;
            if let Ok(resp) = resp {
                if resp.status() == 200 {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("collector not ready within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The Prometheus text of the metrics port.
    pub async fn metrics(&self) -> Result<String> {
        Ok(
            reqwest::get(format!("http://{}/metrics", self.metrics_addr))
                .await?
                .text()
                .await?,
        )
    }

    /// [`consume`] of one of this collector's topics on the shared broker.
    pub async fn consume(
        &self,
        topic: &str,
        count: usize,
        within: Duration,
        linger: Duration,
    ) -> Result<Vec<Consumed>> {
        consume(&Stack::get().kafka_brokers, topic, count, within, linger).await
    }

    /// Sends the shutdown signal and waits for the drain to finish.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.context("collector task")??;
        }
        Ok(())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// One consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Partition it was on.
    pub partition: i32,
    /// Its key.
    pub key: String,
    /// Its value as JSON.
    pub value: serde_json::Value,
}

/// Reads `topic` from the start on `brokers` until `count` records arrived or `within`
/// passed; returns what arrived, in partition order per partition. Reads on for `linger`
/// after `count` so extra records (duplicates) would be seen too.
pub async fn consume(
    brokers: &str,
    topic: &str,
    count: usize,
    within: Duration,
    linger: Duration,
) -> Result<Vec<Consumed>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("ic"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating consumer")?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut until = deadline;
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(err)) => bail!("consuming {topic}: {err}"),
            Ok(Ok(msg)) => {
                let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
                let value = serde_json::from_slice(msg.payload().unwrap_or_default())
                    .with_context(|| format!("record on {topic} is not JSON"))?;
                out.push(Consumed {
                    partition: msg.partition(),
                    key,
                    value,
                });
                if out.len() == count {
                    until = tokio::time::Instant::now() + linger;
                }
            }
        }
    }
    Ok(out)
}

/// The identity messages on `topic`, by message id: [`consume`]s `count` records (failing
/// when another number arrives) and decodes each.
pub async fn identities_by_message_id(
    brokers: &str,
    topic: &str,
    count: usize,
    within: Duration,
    linger: Duration,
) -> Result<std::collections::HashMap<String, sluice_schema::messages::IdentityMessage>> {
    let consumed = consume(brokers, topic, count, within, linger).await?;
    anyhow::ensure!(
        consumed.len() == count,
        "{} identity messages where {count} were expected: {consumed:?}",
        consumed.len()
    );
    consumed
        .iter()
        .map(|c| {
            let m: sluice_schema::messages::IdentityMessage =
                serde_json::from_value(c.value.clone()).context("an identity message")?;
            Ok((m.message_id.clone(), m))
        })
        .collect()
}

/// Consumed event messages by message id: (record key, decoded message). Panics on a record
/// that is not an event message.
pub fn events_by_message_id(
    consumed: &[Consumed],
) -> std::collections::HashMap<String, (String, sluice_schema::messages::EventMessage)> {
    consumed
        .iter()
        .map(|c| {
            let bytes = serde_json::to_vec(&c.value).expect("a JSON value serialises");
            let msg: sluice_schema::messages::EventMessage =
                sluice_schema::messages::decode(&bytes).expect("an event message");
            (msg.message_id.clone(), (c.key.clone(), msg))
        })
        .collect()
}

/// What an SDK's `calls` run put on `collector`'s event topic (track, page, screen, group) by
/// message id ([`events_by_message_id`]). Panics unless exactly four arrived, or when one of
/// them holds `key`: a write key or project key never reaches Kafka.
pub async fn sdk_call_events(
    collector: &Collector,
    key: &str,
    within: Duration,
    linger: Duration,
) -> std::collections::HashMap<String, (String, sluice_schema::messages::EventMessage)> {
    let brokers = &Stack::get().kafka_brokers;
    let consumed = consume(brokers, &collector.topics.event, 4, within, linger)
        .await
        .expect("reading the event topic");
    assert_eq!(
        consumed.len(),
        4,
        "track, page, screen, group: {consumed:?}"
    );
    for c in &consumed {
        assert!(
            !c.value.to_string().contains(key),
            "the key never reaches Kafka: {}",
            c.value
        );
    }
    events_by_message_id(&consumed)
}

/// [`consume`]s `topic` and decodes each record's value as `T` (a message type).
pub async fn consume_as<T: serde::de::DeserializeOwned>(
    brokers: &str,
    topic: &str,
    count: usize,
    within: Duration,
    linger: Duration,
) -> Result<Vec<T>> {
    consume(brokers, topic, count, within, linger)
        .await?
        .into_iter()
        .map(|c| serde_json::from_value(c.value).context("a record of the expected message type"))
        .collect()
}

/// [`consume`]s `topic` of the shared broker for up to `within` (and `linger` after `count`
/// arrived) and panics unless exactly `count` records are there; `what` says which.
pub async fn consume_exactly(
    topic: &str,
    count: usize,
    within: Duration,
    linger: Duration,
    what: &str,
) -> Vec<Consumed> {
    let out = consume(&Stack::get().kafka_brokers, topic, count, within, linger)
        .await
        .unwrap_or_else(|err| panic!("reading {topic}: {err:#}"));
    assert_eq!(out.len(), count, "{what}: {out:?}");
    out
}
