//! [`SchemaError`]: the one error type of the schema library. Each message says what went
//! wrong and what to do about it.

/// Everything the schema library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A database call failed; `context` says which.
    // The server's message is in the text already, so the driver error is kept as a field
    // rather than a `source` (which would print it twice in a `{:#}` chain).
    #[error("{context}: {}", crate::db::describe(.cause))]
    Db {
        /// What was being done.
        context: String,
        /// The driver's error; see [`SchemaError::db_error`].
        cause: tokio_postgres::Error,
    },
    /// An applied migration's SQL differs from the file this binary carries.
    #[error(
        "migration {version:04} ({name}) was edited after it was applied (database checksum \
         {applied}, file checksum {file}); never edit an applied migration: restore the file \
         and add a new numbered migration with the change"
    )]
    ChecksumMismatch {
        /// Migration number.
        version: i32,
        /// Migration name.
        name: String,
        /// Hex SHA-256 recorded when it was applied.
        applied: String,
        /// Hex SHA-256 of the embedded file.
        file: String,
    },
    /// The database has a migration applied that this binary does not know.
    #[error(
        "the database has migration {version:04} ({name}) applied, which this build of \
         sluice-schema does not know; run a newer sluice-schema"
    )]
    UnknownMigration {
        /// Migration number.
        version: i32,
        /// Its name as recorded.
        name: String,
    },
    /// Kafka refused, or did not answer, a request to create topics.
    #[error(
        "{context}: {cause}; check that SLUICE_KAFKA_BROKERS reaches the cluster (and SLUICE_KAFKA_PROPERTIES its security settings), or create the \
         topics by hand / fix SLUICE_TOPIC_PARTITIONS and SLUICE_TOPIC_REPLICATION"
    )]
    Kafka {
        /// What was being done.
        context: String,
        /// Kafka's error.
        cause: String,
    },
    /// The database URL is malformed or its TLS parameters do not fit together.
    #[error("SLUICE_DATABASE_URL: {0}")]
    DatabaseUrl(String),
    /// A certificate or key file named by the database URL cannot be used.
    #[error("PostgreSQL TLS: {0}")]
    DatabaseTls(String),
    /// deadpool refused to build a connection pool: only possible with settings sluice never
    /// gives it (no runtime), so a bug.
    #[error("cannot build the PostgreSQL connection pool: {0}; this is a bug in sluice, please report it")]
    Pool(String),
    /// A connection to PostgreSQL failed; `cause` says why and what to fix (see
    /// [`crate::db::describe`]), `target` is the redacted URL.
    #[error("cannot connect to PostgreSQL at {target}: {cause}")]
    Connect {
        /// The URL, password redacted.
        target: String,
        /// What went wrong and which setting to fix.
        cause: String,
    },
    /// An operator-given Kafka property is malformed or not allowed.
    #[error("Kafka properties: {0}")]
    KafkaProperty(String),
    /// A secret file (`SLUICE_*_FILE`) cannot be read.
    #[error("{setting} {path}: {reason}")]
    SecretFile {
        /// The variable naming the file.
        setting: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A month partition setting is out of range.
    #[error("invalid partition setting: {0}")]
    InvalidPartitionConfig(String),
    /// An external id could not be decoded.
    #[error("invalid id {input:?}: {reason}")]
    InvalidId {
        /// What was given.
        input: String,
        /// Why it is refused.
        reason: String,
    },
    /// A row named by the caller does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// Every attempt to make a key hit a prefix in use: the random source is broken.
    #[error(
        "no free key prefix after {0} attempts: the system's random number source looks broken"
    )]
    KeyPrefixExhausted(usize),
    /// PII keys are missing or malformed.
    #[error("PII key configuration: {0}")]
    PiiConfig(String),
    /// A ciphertext could not be decrypted.
    #[error("cannot decrypt PII: {0}")]
    PiiDecrypt(String),
    /// Another `partitions prune` holds the prune lock.
    #[error("another partitions prune is running (it holds the prune lock); wait for it to finish, then run this one again")]
    PruneRunning,
    /// An erasure could not make sure every writer sees the suppression list.
    #[error("{0}; a writer batch cannot take that long: check the writers (a stuck one holds its transaction), then run the command again")]
    WritersBusy(String),
}

impl SchemaError {
    /// Wraps a driver error with what was being done.
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |cause| SchemaError::Db { context, cause }
    }

    /// The driver error behind a database failure.
    pub fn db_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            SchemaError::Db { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// The PostgreSQL SQLSTATE code of a database error, when the server sent one.
    pub fn sql_state(&self) -> Option<&str> {
        self.db_error().and_then(|e| e.code()).map(|c| c.code())
    }
}
