//! The command-line settings both services take alike (docs/architecture.md §8.2): the
//! database, the Kafka client, the topics created at start-up and the PII keys, each a clap
//! `Args` group that `sluice-ingest` and `sluice-writer` flatten into their `Config`.
//!
//! Flag names, variables and defaults live here once. Where the two services explain a flag
//! in their own words (what the database is for, which Kafka properties are refused), each
//! service's `Config` sets that help text with [`own_words`], so `--help` reads as before.

use std::path::PathBuf;

use clap::Arg;

use crate::kafka::KafkaProperties;
use crate::{defaults, secrets, SchemaError};

/// For `#[command(mut_args(own_words(WORDS)))]`: gives each flag named in `words` (argument
/// id, i.e. field name, and help text) the service's own help text; other flags keep theirs.
pub fn own_words(words: &'static [(&'static str, &'static str)]) -> impl FnMut(Arg) -> Arg {
    move |arg| match words.iter().find(|(id, _)| arg.get_id() == *id) {
        Some((_, text)) => arg.help(*text),
        None => arg,
    }
}

/// The ids in `words` that name no argument of `command`: a service's test asserts there are
/// none, since [`own_words`] passes over an id it does not find.
pub fn unknown_words(
    command: &clap::Command,
    words: &[(&'static str, &'static str)],
) -> Vec<&'static str> {
    words
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !command.get_arguments().any(|a| a.get_id() == *id))
        .collect()
}

/// The PostgreSQL a service connects to: a URL, or a file holding it.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, libpq style: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` apply.
    #[arg(
        long,
        env = "SLUICE_DATABASE_URL",
        hide_env_values = true,
        default_value = defaults::DATABASE_URL
    )]
    pub database_url: String,

    /// File holding the PostgreSQL URL (a mounted Secret); wins over --database-url.
    #[arg(long, env = "SLUICE_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The given URL, no file.
    pub fn new(database_url: &str) -> DatabaseArgs {
        DatabaseArgs {
            database_url: database_url.to_owned(),
            database_url_file: None,
        }
    }

    /// The URL to connect to: the file's content when `SLUICE_DATABASE_URL_FILE` is set
    /// (it wins), else `SLUICE_DATABASE_URL`.
    pub fn url(&self) -> Result<String, SchemaError> {
        secrets::value_or_file(
            &self.database_url,
            self.database_url_file.as_deref(),
            "SLUICE_DATABASE_URL_FILE",
        )
    }
}

/// The Kafka brokers and the operator's librdkafka properties (TLS, SASL).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "SLUICE_KAFKA_BROKERS", default_value = defaults::KAFKA_BROKERS)]
    pub kafka_brokers: String,

    /// librdkafka property `key=value` for the service's Kafka clients (TLS, SASL);
    /// repeatable, or comma-separated in the variable. Properties sluice relies on are
    /// refused.
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
}

impl KafkaArgs {
    /// The given brokers, no properties.
    pub fn new(kafka_brokers: &str) -> KafkaArgs {
        KafkaArgs {
            kafka_brokers: kafka_brokers.to_owned(),
            kafka_properties: Vec::new(),
            kafka_properties_file: None,
        }
    }

    /// The properties of the flags, then of the file, checked ([`KafkaProperties::load`]).
    pub fn properties(&self) -> Result<KafkaProperties, SchemaError> {
        KafkaProperties::load(
            &self.kafka_properties,
            self.kafka_properties_file.as_deref(),
        )
    }
}

/// How the topics a service creates at start-up are made (existing topics keep theirs).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TopicArgs {
    /// Partitions of each topic created at start-up.
    #[arg(long, env = "SLUICE_TOPIC_PARTITIONS", default_value_t = defaults::TOPIC_PARTITIONS)]
    pub topic_partitions: i32,

    /// Replication factor of each topic created at start-up.
    #[arg(long, env = "SLUICE_TOPIC_REPLICATION", default_value_t = defaults::TOPIC_REPLICATION)]
    pub topic_replication: i32,

    /// `min.insync.replicas` of topics created at start-up; 0 picks replication - 1 (at
    /// least 1), so with `acks=all` losing one broker loses no acknowledged message.
    #[arg(long, env = "SLUICE_TOPIC_MIN_INSYNC_REPLICAS", default_value_t = 0)]
    pub topic_min_insync_replicas: i32,
}

/// The PII keys (docs/architecture.md §6.6): the list, a file holding it, the active key. Each
/// service reads them its own way (which of list and file wins, what no key means).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct PiiArgs {
    /// PII keys, `id=base64(32 bytes)[,id=...]`.
    #[arg(
        long,
        env = "SLUICE_PII_KEYS",
        default_value = "",
        hide_env_values = true
    )]
    pub pii_keys: String,

    /// File holding the PII keys (a mounted Secret).
    #[arg(long, env = "SLUICE_PII_KEYS_FILE")]
    pub pii_keys_file: Option<PathBuf>,

    /// Id of the key new values are sealed with (one of the keys).
    #[arg(long, env = "SLUICE_PII_ACTIVE_KEY", default_value = "")]
    pub pii_active_key: String,
}
