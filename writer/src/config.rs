//! The writer's settings: one typed struct, every field a CLI flag with a `SLUICE_*`
//! environment variable and a default for the local stack (docs/architecture.md §8.4).

use std::net::SocketAddr;
use std::path::PathBuf;

use sluice_schema::readiness;
use sluice_schema::runtime::LogFormat;

/// Everything `sluice-writer` can be told. Build it with `Config::parse()` in the binary, or
/// with [`Config::for_tests`] and field updates in tests.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-writer",
    about = "Kafka -> PostgreSQL writer of sluice",
    version
)]
pub struct Config {
    /// PostgreSQL URL (the database holding `event`, `visitor`, ... and `writer_offset`),
    /// libpq style: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` apply.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://sluice@127.0.0.1:54320/sluice"
    )]
    pub database_url: String,

    /// File holding the PostgreSQL URL (a mounted Secret); wins over --database-url.
    #[arg(long, env = "SLUICE_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,

    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "SLUICE_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub kafka_brokers: String,

    /// librdkafka property `key=value` for every Kafka client of the writer (TLS, SASL);
    /// repeatable, or comma-separated in the variable. Properties the writer's guarantees
    /// rest on (group, commits, isolation, idempotence, acks) are refused.
    #[arg(
        long = "kafka-property",
        env = "SLUICE_KAFKA_PROPERTIES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub kafka_properties: Vec<String>,

    /// File of librdkafka properties, one `key=value` a line, `#` comments (a mounted
    /// Secret); read after SLUICE_KAFKA_PROPERTIES.
    #[arg(long, env = "SLUICE_KAFKA_PROPERTIES_FILE")]
    pub kafka_properties_file: Option<PathBuf>,

    /// Consumer group of every writer instance of one pipeline.
    #[arg(long, env = "SLUICE_WRITER_GROUP", default_value = "sluice-writer")]
    pub group: String,

    /// Address of `/metrics`, `/healthz` and `/readyz`. Port 0 picks a free port (tests).
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: SocketAddr,

    /// Prefix of every topic name (empty: docs/architecture.md §3.1's). Tests use a unique prefix.
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// PII keys, `id=base64(32 bytes)[,id=...]`. Needed to store email and phone of identify
    /// calls; without them such calls are dead-lettered with reason `pii_key_missing`.
    #[arg(
        long,
        env = "SLUICE_PII_KEYS",
        default_value = "",
        hide_env_values = true
    )]
    pub pii_keys: String,

    /// File holding the PII keys (a mounted Secret); wins over --pii-keys.
    #[arg(long, env = "SLUICE_PII_KEYS_FILE")]
    pub pii_keys_file: Option<PathBuf>,

    /// Id of the PII key new ciphertexts are sealed with (one of `SLUICE_PII_KEYS`).
    #[arg(long, env = "SLUICE_PII_ACTIVE_KEY", default_value = "")]
    pub pii_active_key: String,

    /// Partitions of each topic created at start-up when missing (existing topics keep theirs).
    /// Writer instances beyond this number stay idle.
    #[arg(long, env = "SLUICE_TOPIC_PARTITIONS", default_value_t = 12)]
    pub topic_partitions: i32,

    /// Replication factor of topics created at start-up.
    #[arg(long, env = "SLUICE_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,

    /// `min.insync.replicas` of topics created at start-up; 0 picks replication - 1 (at
    /// least 1), so with `acks=all` losing one broker loses no acknowledged message.
    #[arg(long, env = "SLUICE_TOPIC_MIN_INSYNC_REPLICAS", default_value_t = 0)]
    pub topic_min_insync_replicas: i32,

    /// Most messages in one batch (one PostgreSQL transaction). Bounds the writer's memory.
    #[arg(long, env = "SLUICE_WRITER_BATCH_MAX_ROWS", default_value_t = 20_000)]
    pub batch_max_rows: usize,

    /// Batches stored at once, each on its own PostgreSQL connection. Partition `p` of every
    /// topic goes to lane `p % lanes`, so one visitor's messages (one key: the same
    /// partition number in topics of equal size, as created) meet in one lane. Memory bound: one batch and one channel per lane.
    #[arg(long, env = "SLUICE_WRITER_LANES", default_value_t = 2)]
    pub lanes: usize,

    /// Most payload bytes in one batch, the second memory bound.
    #[arg(long, env = "SLUICE_WRITER_BATCH_MAX_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub batch_max_bytes: usize,

    /// Longest a message waits in a batch before the batch is stored, in milliseconds.
    #[arg(long, env = "SLUICE_WRITER_FLUSH_INTERVAL_MS", default_value_t = 500)]
    pub flush_interval_ms: u64,

    /// Events older than this many days are dead-lettered (`out_of_retention`) rather than
    /// creating partitions for long-gone months.
    #[arg(long, env = "SLUICE_WRITER_RETENTION_DAYS", default_value_t = 400)]
    pub retention_days: u32,

    /// How long a claimed event id blocks a client retry of the same `messageId`, in days.
    #[arg(long, env = "SLUICE_WRITER_DEDUP_WINDOW_DAYS", default_value_t = 7)]
    pub dedup_window_days: u32,

    /// Most entries of the erasure suppression list kept in memory. Past it, each batch asks
    /// the database about its messages of tenants with erasures (one more statement).
    #[arg(
        long,
        env = "SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES",
        default_value_t = 1_000_000
    )]
    pub suppression_cache_max_entries: usize,

    /// Month partitions created ahead of the current month.
    #[arg(long, env = "SLUICE_PARTITION_MONTHS_AHEAD", default_value_t = 3)]
    pub partition_months_ahead: u32,

    /// Hash partitions (by tenant) of each new month; an existing month keeps its own.
    #[arg(long, env = "SLUICE_PARTITION_HASH_MODULUS", default_value_t = 8)]
    pub partition_hash_modulus: u32,

    /// Most retry wait after PostgreSQL failures, in milliseconds (backoff doubles up to it).
    #[arg(long, env = "SLUICE_WRITER_RETRY_MAX_MS", default_value_t = 5_000)]
    pub retry_max_ms: u64,

    /// How often `/readyz`'s view of Kafka and PostgreSQL is refreshed, in milliseconds.
    #[arg(long, env = "SLUICE_READINESS_INTERVAL_MS", default_value_t = readiness::DEFAULT_INTERVAL_MS)]
    pub readiness_interval_ms: u64,

    /// Log output format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// Defaults pointing at the given broker and database, with a free metrics port: the
    /// starting point of tests and benchmarks.
    pub fn for_tests(
        kafka_brokers: &str,
        database_url: &str,
        topic_prefix: &str,
        group: &str,
    ) -> Config {
        Config {
            database_url: database_url.to_owned(),
            database_url_file: None,
            kafka_brokers: kafka_brokers.to_owned(),
            kafka_properties: Vec::new(),
            kafka_properties_file: None,
            group: group.to_owned(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            topic_prefix: topic_prefix.to_owned(),
            pii_keys: String::new(),
            pii_keys_file: None,
            pii_active_key: String::new(),
            topic_partitions: 4,
            topic_replication: 1,
            topic_min_insync_replicas: 0,
            batch_max_rows: 20_000,
            lanes: 2,
            batch_max_bytes: 32 * 1024 * 1024,
            flush_interval_ms: 200,
            retention_days: 400,
            dedup_window_days: 7,
            suppression_cache_max_entries: 1_000_000,
            partition_months_ahead: 3,
            partition_hash_modulus: 8,
            retry_max_ms: 2_000,
            readiness_interval_ms: readiness::DEFAULT_INTERVAL_MS,
            log_format: LogFormat::Text,
        }
    }
}
