//! sluice's writer: Kafka -> PostgreSQL, with binary COPY, an exactly-once effect, month
//! partitions on demand and a dead-letter queue (docs/architecture.md §5).
//!
//! The only entry is [`run`]: it consumes the four data topics in one consumer group and
//! stores each batch, together with the Kafka offsets it covers, in one PostgreSQL
//! transaction, until its shutdown future resolves.
//!
//! # Layout
//! - [`config`]: settings (flags and `SLUICE_*` variables).
//! - `consume`: the Kafka consumer thread (`Poller`): lanes fed, paused and resumed.
//! - `rebalance`: the consumer's context: rebalances positioned from `writer_offset`; lag.
//! - `batch`: the store pipeline: batching, the transaction, retries; `batch/prepare` sorts a
//!   batch by step and drops suppressed messages, `batch/steps` splits bad batches.
//! - `decode`: Kafka values -> typed, validated messages.
//! - [`copy`]: binary COPY encoding and the event row format (public for the benchmark).
//! - `claim`: the events' dedup claims in `event_dedup`, then their COPY into `event`.
//! - `merge`: visitor and session upserts from a staged COPY.
//! - `identity`: identify/alias -> lead (PII sealed) and identity_link.
//! - `offsets`: `writer_offset` reads and conditional moves; owned partitions.
//! - `partitions`: month partitions ahead, on a timer and on demand.
//! - `maintenance`: the timer off the hot path: months and dedup days ahead, expired days dropped.
//! - `suppress`: the erasure suppression list: messages of erased people are dropped.
//! - `dlq`: the dead-letter producer.
//! - [`metrics`]: metric names.
//! - `health`: `/metrics`, `/healthz`, `/readyz`.
//! - [`error`]: the error type, [`WriterError`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rdkafka::ClientConfig;
use sluice_schema::db::DbTarget;
use sluice_schema::kafka::KafkaProperties;
use sluice_schema::partitions::PartitionConfig;
use sluice_schema::pii::PiiKeys;
use sluice_schema::secrets;
use sluice_schema::topics::Topics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod batch;
mod claim;
pub mod config;
mod consume;
pub mod copy;
mod decode;
mod dlq;
pub mod error;
mod health;
mod identity;
mod maintenance;
mod merge;
pub mod metrics;
mod offsets;
mod partitions;
mod rebalance;
mod suppress;

pub use config::Config;
pub use error::WriterError;

/// Runs a writer until `shutdown` resolves: finishes (or, when PostgreSQL is failing,
/// abandons) the open batch, leaves the consumer group and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), WriterError> {
    check(&config)?;
    health::install();
    let topics = Topics::with_prefix(&config.topic_prefix);
    let Secrets {
        target,
        kafka,
        keys,
    } = Secrets::load(&config)?;
    let pool = pool(&target, config.lanes)?;
    tracing::info!(database = %target.redacted, kafka_properties = %kafka, "connecting");

    let stop = CancellationToken::new();
    let consumer_stop = CancellationToken::new();
    let dlq = dlq::Dlq::new(&config.kafka_args.kafka_brokers, &kafka, topics.dlq.clone())?;
    // Health first, so that while the start-up checks below fail (wrong password, unknown CA,
    // refused SASL credentials, no migrations) /readyz says why, and the writer keeps trying
    // instead of exiting into a crash loop.
    health::serve(
        config.metrics_listen,
        pool.clone(),
        (dlq.producer(), dlq.tap()),
        topics.dlq.clone(),
        Duration::from_millis(config.readiness_interval_ms),
        consumer_stop.clone(),
    )
    .await?;

    let (months, claim_days) = partition_caches(&config);
    tokio::pin!(shutdown);
    let checks = || start_up_checks(&pool, &months, &claim_days, &config, &kafka, &topics);
    if !until_ready(checks, &dlq, &mut shutdown).await {
        consumer_stop.cancel();
        tracing::info!("shutdown requested before the writer was ready");
        return Ok(());
    }

    let assignments = Arc::new(offsets::Assignments::default());
    let consumer = start_consumer(
        &config,
        &kafka,
        &topics,
        pool.clone(),
        assignments.clone(),
        consumer_stop.clone(),
    )?;
    let lanes = config.lanes;

    tokio::spawn(maintenance::run(
        pool.clone(),
        months.clone(),
        claim_days.clone(),
        consumer_stop.clone(),
    ));

    let store = Arc::new(batch::Store {
        pool,
        group: config.group.clone(),
        dlq,
        months,
        claim_days,
        keys,
        suppression: suppress::Suppression::new(config.suppression_cache_max_entries),
        assignments,
        commands: consumer.commands,
        limits: batch::BatchLimits::new(&config),
    });
    tracing::info!(group = %config.group, prefix = %config.topic_prefix, lanes, "writer started");
    let pipeline = batch::spawn_lanes(&store, consumer.receivers, &stop);
    let shutting_down = until_stored(pipeline, &mut shutdown, &stop).await;
    // Only now may the consumer leave: its revocation would make the last batch's partitions
    // unowned and that batch unstorable.
    consumer_stop.cancel();
    let joined = tokio::task::spawn_blocking(move || consumer.thread.join()).await;
    stopped(shutting_down, joined.is_ok_and(|left| left.is_ok()))
}

/// What the writer knows of its partitions, empty at start: the months of `event` and the days
/// of `event_dedup` known to exist (and the dedup window).
fn partition_caches(config: &Config) -> (Arc<partitions::Months>, Arc<partitions::ClaimDays>) {
    let months = partitions::Months::new(PartitionConfig {
        hash_modulus: config.partition_hash_modulus,
        months_ahead: config.partition_months_ahead,
    });
    let claim_days = partitions::ClaimDays::new(sluice_schema::dedup::Window {
        days: config.dedup_window_days,
    });
    (Arc::new(months), Arc::new(claim_days))
}

/// How [`run`] ends once the lanes are done and the consumer thread joined: `shutting_down`
/// false means the lanes ended because the consumer's channels closed without a shutdown;
/// `left_cleanly` false, that the thread panicked while leaving the group.
fn stopped(shutting_down: bool, left_cleanly: bool) -> Result<(), WriterError> {
    if !shutting_down {
        return Err(WriterError::ConsumerThread(
            "its channel closed without a shutdown; see the log above".into(),
        ));
    }
    if !left_cleanly {
        return Err(WriterError::ConsumerThread(
            "it panicked while leaving the group".into(),
        ));
    }
    tracing::info!("writer stopped");
    Ok(())
}

/// The consumer thread and the pipeline's ends of its channels.
struct ConsumerThread {
    thread: std::thread::JoinHandle<()>,
    /// One per lane: the records of its partitions.
    receivers: Vec<mpsc::Receiver<consume::Record>>,
    /// Commands to the consumer thread (Kafka commits, repositions).
    commands: std::sync::mpsc::Sender<consume::Command>,
}

/// Creates the consumer and starts its thread, one bounded channel per lane.
fn start_consumer(
    config: &Config,
    kafka: &KafkaProperties,
    topics: &Topics,
    pool: Pool,
    assignments: Arc<offsets::Assignments>,
    stop: CancellationToken,
) -> Result<ConsumerThread, WriterError> {
    let topic_map = consume::TopicMap::new(topics);
    let consumer = consume::create(
        &config.kafka_args.kafka_brokers,
        kafka,
        &config.group,
        &topic_map,
        assignments,
        pool,
        stop.clone(),
    )?;
    // Per lane, the channel and the consumer thread's overflow bound the records waiting
    // behind the open batch: one batch's worth each.
    let max_pending = config.batch_max_rows.max(1000);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.lanes)
        .map(|_| mpsc::channel(max_pending))
        .unzip();
    let (commands, cmd_rx) = std::sync::mpsc::channel();
    let settings = consume::PollSettings {
        max_pending,
        retention_days: config.retention_days,
        months_ahead: config.partition_months_ahead,
    };
    let thread = std::thread::Builder::new()
        .name("sluice-consumer".into())
        .spawn(move || {
            consume::Poller::new(consumer, topic_map, senders, cmd_rx, settings).run(stop)
        })
        .map_err(|e| WriterError::ConsumerThread(e.to_string()))?;
    Ok(ConsumerThread {
        thread,
        receivers,
        commands,
    })
}

/// The settings read from values or files: the database, Kafka client properties, PII keys.
struct Secrets {
    target: DbTarget,
    kafka: KafkaProperties,
    keys: Option<PiiKeys>,
}

impl Secrets {
    fn load(config: &Config) -> Result<Secrets, WriterError> {
        let config_err = |e: sluice_schema::SchemaError| WriterError::Config(e.to_string());
        let database_url = config.database_args.url().map_err(config_err)?;
        let pii_keys = secrets::value_or_file(
            &config.pii_args.pii_keys,
            config.pii_args.pii_keys_file.as_deref(),
            "SLUICE_PII_KEYS_FILE",
        )
        .map_err(config_err)?;
        let kafka = config.kafka_args.properties().map_err(config_err)?;
        let keys = match pii_keys.trim() {
            "" => None,
            keys => Some(
                PiiKeys::from_env_strings(keys, &config.pii_args.pii_active_key).map_err(|e| {
                    WriterError::Config(format!("SLUICE_PII_KEYS / SLUICE_PII_ACTIVE_KEY: {e}"))
                })?,
            ),
        };
        let target = DbTarget::parse(&database_url).map_err(config_err)?;
        Ok(Secrets {
            target,
            kafka,
            keys,
        })
    }
}

/// Runs the start-up checks until they pass, logging why not with a growing backoff (1 s to
/// 30 s). False when `shutdown` came first.
async fn until_ready<C>(
    checks: impl Fn() -> C,
    dlq: &dlq::Dlq,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> bool
where
    C: Future<Output = Result<(), WriterError>>,
{
    let mut backoff = Duration::from_secs(1);
    loop {
        let Err(err) = checks().await else {
            return true;
        };
        // An admin call that times out does not say why; the DLQ producer's client,
        // connected to the same brokers with the same settings, does.
        let err = match (&err, dlq.tap().recent()) {
            (WriterError::Schema { .. }, Some(cause)) => {
                format!("{err}; Kafka client error: {cause}")
            }
            _ => err.to_string(),
        };
        tracing::error!(cause = %err, retry_in = ?backoff, "writer not ready");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = &mut *shutdown => return false,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Waits for the lanes to end; on `shutdown`, cancels `stop` so that they store their open
/// batch and end. True when they ended because of a shutdown.
async fn until_stored(
    pipeline: impl Future,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
    stop: &CancellationToken,
) -> bool {
    tokio::pin!(pipeline);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = &mut pipeline => return shutting_down,
            () = &mut *shutdown, if !shutting_down => {
                tracing::info!("shutdown requested: storing the open batch, then leaving the group");
                shutting_down = true;
                stop.cancel();
            }
        }
    }
}

fn check(config: &Config) -> Result<(), WriterError> {
    let bad = |what: &str| Err(WriterError::Config(what.to_owned()));
    if config.batch_max_rows == 0 {
        return bad("batch_max_rows must be at least 1 (SLUICE_WRITER_BATCH_MAX_ROWS)");
    }
    if config.lanes == 0 || config.lanes > 64 {
        return bad("lanes must be between 1 and 64 (SLUICE_WRITER_LANES)");
    }
    if config.flush_interval_ms == 0 {
        return bad("flush_interval_ms must be at least 1 (SLUICE_WRITER_FLUSH_INTERVAL_MS)");
    }
    if config.partition_hash_modulus == 0 || config.partition_hash_modulus > 1024 {
        return bad(
            "partition hash modulus must be between 1 and 1024 (SLUICE_PARTITION_HASH_MODULUS)",
        );
    }
    if config.topic_args.topic_partitions < 1 || config.topic_args.topic_replication < 1 {
        return bad("topic partitions and replication must be at least 1");
    }
    Ok(())
}

/// The database is reachable and migrated, months exist ahead, the topics exist.
async fn start_up_checks(
    pool: &Pool,
    months: &partitions::Months,
    claim_days: &partitions::ClaimDays,
    config: &Config,
    kafka: &KafkaProperties,
    topics: &Topics,
) -> Result<(), WriterError> {
    let client = pool
        .get()
        .await
        .map_err(|e| WriterError::Pool(sluice_schema::db::describe_pool(&e)))?;
    client
        .simple_query("SELECT 1 FROM writer_offset LIMIT 0")
        .await
        .map_err(WriterError::pg("checking that migrations are applied"))?;
    months
        .ensure_ahead(&client, chrono::Utc::now())
        .await
        .map_err(WriterError::schema("creating month partitions ahead"))?;
    let now = chrono::Utc::now();
    claim_days
        .ensure_ahead(&client, now)
        .await
        .map_err(WriterError::schema(
            "creating event_dedup day partitions ahead",
        ))?;
    claim_days
        .prune(&client, now)
        .await
        .map_err(WriterError::schema("dropping expired event_dedup days"))?;
    drop(client);
    create_topics(config, kafka, topics).await
}

/// A small pool: one connection per lane for batches, three for rebalances, DDL and health.
fn pool(target: &DbTarget, lanes: usize) -> Result<Pool, WriterError> {
    let mut target = target.clone();
    let pg = &mut target.config;
    pg.connect_timeout(Duration::from_secs(5));
    pg.application_name("sluice-writer");
    // Each batch's `CREATE TEMP TABLE IF NOT EXISTS` draws a NOTICE that tokio-postgres logs
    // at INFO: two lines per batch in the writer's log, saying nothing. Warnings still come.
    let options = format!(
        "{} -c client_min_messages=warning",
        pg.get_options().unwrap_or_default()
    );
    pg.options(options.trim_start());
    target
        .pool(sluice_schema::db::PoolBounds {
            max_size: lanes + 3,
            wait_timeout: Duration::from_secs(10),
            create_timeout: Duration::from_secs(5),
            recycle_timeout: Duration::from_secs(5),
        })
        .map_err(|e| WriterError::Config(e.to_string()))
}

/// Creates the topics when missing (docs/architecture.md §3.1); existing ones are left alone.
async fn create_topics(
    config: &Config,
    kafka: &KafkaProperties,
    topics: &Topics,
) -> Result<(), WriterError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.kafka_args.kafka_brokers);
    kafka.apply(&mut client);
    sluice_schema::topics::create_missing_with(
        &client,
        &topics.all(),
        config.topic_args.topic_partitions,
        config.topic_args.topic_replication,
        config.topic_args.topic_min_insync_replicas,
        Duration::from_secs(30),
    )
    .await
    .map_err(WriterError::schema("creating topics"))
}
