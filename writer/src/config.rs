//! The writer's settings: one typed struct, every field a CLI flag with a `SLUICE_*`
//! environment variable and a default for the local stack (docs/architecture.md §8.4).

use std::net::SocketAddr;

use sluice_schema::cli::{own_words, DatabaseArgs, KafkaArgs, PiiArgs, TopicArgs};
use sluice_schema::readiness;
use sluice_schema::runtime::LogFormat;

/// The writer's defaults, each used by its clap attribute and by [`Config::for_tests`]; the
/// shared ones are `sluice_schema::defaults`'.
pub mod defaults {
    pub use sluice_schema::defaults::*;

    /// `SLUICE_WRITER_BATCH_MAX_ROWS`.
    pub const BATCH_MAX_ROWS: usize = 20_000;
    /// `SLUICE_WRITER_LANES`.
    pub const LANES: usize = 2;
    /// `SLUICE_WRITER_BATCH_MAX_BYTES`: 32 MiB.
    pub const BATCH_MAX_BYTES: usize = 32 * 1024 * 1024;
    /// `SLUICE_WRITER_FLUSH_INTERVAL_MS`: a record waits half of it on average before its
    /// batch is stored; a writer that is behind stores full batches whatever it is.
    pub const FLUSH_INTERVAL_MS: u64 = 250;
    /// `SLUICE_WRITER_RETENTION_DAYS`.
    pub const RETENTION_DAYS: u32 = 400;
    /// `SLUICE_WRITER_DEDUP_WINDOW_DAYS`.
    pub const DEDUP_WINDOW_DAYS: u32 = 7;
    /// `SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES`.
    pub const SUPPRESSION_CACHE_MAX_ENTRIES: usize = 1_000_000;
    /// `SLUICE_WRITER_RETRY_MAX_MS`.
    pub const RETRY_MAX_MS: u64 = 5_000;
}

/// The writer's words for the shared flags of `sluice_schema::cli` it explains its own way
/// (argument id, help text).
const OWN_WORDS: &[(&str, &str)] = &[
    (
        "database_url",
        "PostgreSQL URL (the database holding `event`, `visitor`, \
        ... and `writer_offset`), libpq style: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` \
        apply",
    ),
    (
        "kafka_properties",
        "librdkafka property `key=value` for every Kafka \
        client of the writer (TLS, SASL); repeatable, or comma-separated in the variable. \
        Properties the writer's guarantees rest on (group, commits, isolation, idempotence, \
        acks) are refused",
    ),
    (
        "pii_keys",
        "PII keys, `id=base64(32 bytes)[,id=...]`. Needed to store \
        email and phone of identify calls; without them such calls are dead-lettered with \
        reason `pii_key_missing`",
    ),
    (
        "pii_keys_file",
        "File holding the PII keys (a mounted Secret); wins over --pii-keys",
    ),
    (
        "pii_active_key",
        "Id of the PII key new ciphertexts are sealed with (one of `SLUICE_PII_KEYS`)",
    ),
    (
        "topic_partitions",
        "Partitions of each topic created at start-up when \
        missing (existing topics keep theirs). Writer instances beyond this number stay idle",
    ),
    (
        "topic_replication",
        "Replication factor of topics created at start-up",
    ),
];

/// Everything `sluice-writer` can be told. Build it with `Config::parse()` in the binary, or
/// with [`Config::for_tests`] and field updates in tests.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sluice-writer",
    about = "Kafka -> PostgreSQL writer of sluice",
    version,
    mut_args(own_words(OWN_WORDS))
)]
pub struct Config {
    /// The PostgreSQL of the events and of the writer's offsets.
    #[command(flatten)]
    pub database_args: DatabaseArgs,

    /// The Kafka brokers and the operator's librdkafka properties.
    #[command(flatten)]
    pub kafka_args: KafkaArgs,

    /// Consumer group of every writer instance of one pipeline.
    #[arg(long, env = "SLUICE_WRITER_GROUP", default_value = "sluice-writer")]
    pub group: String,

    /// Address of `/metrics`, `/healthz` and `/readyz`. Port 0 picks a free port (tests).
    #[arg(long, env = "SLUICE_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    pub metrics_listen: SocketAddr,

    /// Prefix of every topic name (empty: docs/architecture.md §3.1's). Tests use a unique prefix.
    #[arg(long, env = "SLUICE_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// The PII keys email and phone are stored with.
    #[command(flatten)]
    pub pii_args: PiiArgs,

    /// How the topics created at start-up are made.
    #[command(flatten)]
    pub topic_args: TopicArgs,

    /// Most messages in one batch (one PostgreSQL transaction). Bounds the writer's memory.
    #[arg(long, env = "SLUICE_WRITER_BATCH_MAX_ROWS", default_value_t = defaults::BATCH_MAX_ROWS)]
    pub batch_max_rows: usize,

    /// Batches stored at once, each on its own PostgreSQL connection. Partition `p` of every
    /// topic goes to lane `p % lanes`, so one visitor's messages (one key: the same
    /// partition number in topics of equal size, as created) meet in one lane. Memory bound: one batch and one channel per lane.
    #[arg(long, env = "SLUICE_WRITER_LANES", default_value_t = defaults::LANES)]
    pub lanes: usize,

    /// Most payload bytes in one batch, the second memory bound.
    #[arg(long, env = "SLUICE_WRITER_BATCH_MAX_BYTES", default_value_t = defaults::BATCH_MAX_BYTES)]
    pub batch_max_bytes: usize,

    /// Longest a message waits in a batch before the batch is stored, in milliseconds.
    #[arg(long, env = "SLUICE_WRITER_FLUSH_INTERVAL_MS", default_value_t = defaults::FLUSH_INTERVAL_MS)]
    pub flush_interval_ms: u64,

    /// Events older than this many days are dead-lettered (`out_of_retention`) rather than
    /// creating partitions for long-gone months.
    #[arg(long, env = "SLUICE_WRITER_RETENTION_DAYS", default_value_t = defaults::RETENTION_DAYS)]
    pub retention_days: u32,

    /// How long a claimed event id blocks a client retry of the same `messageId`, in days.
    #[arg(long, env = "SLUICE_WRITER_DEDUP_WINDOW_DAYS", default_value_t = defaults::DEDUP_WINDOW_DAYS)]
    pub dedup_window_days: u32,

    /// Most entries of the erasure suppression list kept in memory. Past it, each batch asks
    /// the database about its messages of tenants with erasures (one more statement).
    #[arg(
        long,
        env = "SLUICE_WRITER_SUPPRESSION_CACHE_MAX_ENTRIES",
        default_value_t = defaults::SUPPRESSION_CACHE_MAX_ENTRIES
    )]
    pub suppression_cache_max_entries: usize,

    /// Month partitions created ahead of the current month.
    #[arg(long, env = "SLUICE_PARTITION_MONTHS_AHEAD", default_value_t = defaults::PARTITION_MONTHS_AHEAD)]
    pub partition_months_ahead: u32,

    /// Hash partitions (by tenant) of each new month; an existing month keeps its own.
    #[arg(long, env = "SLUICE_PARTITION_HASH_MODULUS", default_value_t = defaults::PARTITION_HASH_MODULUS)]
    pub partition_hash_modulus: u32,

    /// Most retry wait after PostgreSQL failures, in milliseconds (backoff doubles up to it).
    #[arg(long, env = "SLUICE_WRITER_RETRY_MAX_MS", default_value_t = defaults::RETRY_MAX_MS)]
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
            database_args: DatabaseArgs::new(database_url),
            kafka_args: KafkaArgs::new(kafka_brokers),
            group: group.to_owned(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            topic_prefix: topic_prefix.to_owned(),
            pii_args: PiiArgs::default(),
            // Fewer partitions, a shorter flush and retry ceiling than production: tests
            // create topics per case and wait on stored rows.
            topic_args: TopicArgs {
                topic_partitions: 4,
                topic_replication: defaults::TOPIC_REPLICATION,
                topic_min_insync_replicas: 0,
            },
            batch_max_rows: defaults::BATCH_MAX_ROWS,
            lanes: defaults::LANES,
            batch_max_bytes: defaults::BATCH_MAX_BYTES,
            flush_interval_ms: 200,
            retention_days: defaults::RETENTION_DAYS,
            dedup_window_days: defaults::DEDUP_WINDOW_DAYS,
            suppression_cache_max_entries: defaults::SUPPRESSION_CACHE_MAX_ENTRIES,
            partition_months_ahead: defaults::PARTITION_MONTHS_AHEAD,
            partition_hash_modulus: defaults::PARTITION_HASH_MODULUS,
            retry_max_ms: 2_000,
            readiness_interval_ms: readiness::DEFAULT_INTERVAL_MS,
            log_format: LogFormat::Text,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn test_config_differs_from_the_declared_defaults_only_where_it_says() {
        let parsed = Config::try_parse_from(["sluice-writer"]).unwrap();
        let mut tests = Config::for_tests(
            &parsed.kafka_args.kafka_brokers,
            &parsed.database_args.database_url,
            &parsed.topic_prefix,
            &parsed.group,
        );
        assert_eq!(
            (
                tests.topic_args.topic_partitions,
                tests.flush_interval_ms,
                tests.retry_max_ms
            ),
            (4, 200, 2_000)
        );
        tests.metrics_listen = parsed.metrics_listen;
        tests.topic_args.topic_partitions = parsed.topic_args.topic_partitions;
        tests.flush_interval_ms = parsed.flush_interval_ms;
        tests.retry_max_ms = parsed.retry_max_ms;
        assert_eq!(format!("{tests:?}"), format!("{parsed:?}"));
    }

    #[test]
    fn own_words_name_real_flags() {
        let command = <Config as clap::CommandFactory>::command();
        let unknown = sluice_schema::cli::unknown_words(&command, OWN_WORDS);
        assert!(unknown.is_empty(), "{unknown:?}");
    }
}
