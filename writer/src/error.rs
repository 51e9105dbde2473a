//! The writer's error type at its library boundary: every variant says what failed and what
//! an operator can do about it.

use rdkafka::error::KafkaError;

/// Why the writer stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// A setting is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// PostgreSQL could not be reached or refused a start-up step.
    #[error("PostgreSQL failed while {context}: {}; check SLUICE_DATABASE_URL and that the server is up and migrated (`sluice-schema migrate up`)", sluice_schema::db::describe(.source))]
    Postgres {
        /// What the writer was doing.
        context: &'static str,
        /// The driver's error (rendered with its causes in the message, so not a `source`).
        source: tokio_postgres::Error,
    },
    /// No pooled PostgreSQL connection could be had.
    #[error("cannot get a PostgreSQL connection: {0}")]
    Pool(String),
    /// The schema crate refused an operation (migrations missing, partition DDL failed).
    #[error("schema operation failed while {context}: {message}; run `sluice-schema migrate up`")]
    Schema {
        /// What the writer was doing.
        context: &'static str,
        /// The schema crate's error, rendered.
        message: String,
    },
    /// Kafka refused a client or an operation.
    #[error("Kafka failed while {context}: {message}; check SLUICE_KAFKA_BROKERS, SLUICE_KAFKA_PROPERTIES and that the broker is up")]
    Kafka {
        /// What the writer was doing.
        context: &'static str,
        /// The client's error, secrets left out ([`sluice_schema::kafka::describe_error`]).
        message: String,
    },
    /// The metrics/health listener could not be bound.
    #[error("cannot listen on {addr} for metrics and health: {source}; choose another SLUICE_METRICS_LISTEN")]
    Listen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The consumer thread ended or panicked outside a shutdown; a bug: the log has its cause.
    #[error("the Kafka consumer thread stopped unexpectedly: {0}")]
    ConsumerThread(String),
}

impl WriterError {
    /// Wraps a PostgreSQL error with what the writer was doing.
    pub(crate) fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> WriterError {
        move |source| WriterError::Postgres { context, source }
    }

    /// Wraps a Kafka error with what the writer was doing.
    pub(crate) fn kafka(context: &'static str) -> impl FnOnce(KafkaError) -> WriterError {
        move |err| WriterError::Kafka {
            context,
            message: sluice_schema::kafka::describe_error(&err),
        }
    }

    /// Wraps a schema-crate error with what the writer was doing.
    pub(crate) fn schema<E: std::fmt::Display>(
        context: &'static str,
    ) -> impl FnOnce(E) -> WriterError {
        move |err| WriterError::Schema {
            context,
            message: err.to_string(),
        }
    }
}

/// Why storing one batch failed; decides between retrying the whole batch and splitting it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// PostgreSQL unreachable, restarting, or failing for reasons not tied to a row: retry
    /// the same batch after a backoff.
    #[error("PostgreSQL unavailable: {0}")]
    Transient(String),
    /// Another writer moved one of our partitions' offsets: that partition's messages are
    /// stale here; reposition it and store the rest.
    #[error("offset of {topic}[{partition}] moved under us (expected {expected:?})")]
    OffsetConflict {
        /// Topic of the partition.
        topic: String,
        /// The partition.
        partition: i32,
        /// The `next_offset` this writer expected in the table.
        expected: Option<i64>,
    },
    /// Dead-lettering failed: nothing may be committed before the DLQ has the messages.
    #[error("dead-letter produce failed: {0}")]
    Dlq(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        StoreError::Transient(sluice_schema::db::describe(&err))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        StoreError::Transient(sluice_schema::db::describe_pool(&err))
    }
}

/// True when PostgreSQL refused the data itself (SQLSTATE class 22 data exception or 23
/// integrity violation): splitting the batch finds the row; retrying would fail forever.
pub(crate) fn is_data_error(err: &tokio_postgres::Error) -> bool {
    err.code()
        .map(|c| {
            let code = c.code();
            code.starts_with("22") || code.starts_with("23")
        })
        .unwrap_or(false)
}

/// A `lead` insert that lost a race: another transaction (a lane of this writer, or another
/// writer) inserted the same user id or fingerprint since this one looked. Not bad data: a
/// retry of the batch finds that lead and updates it instead.
pub(crate) fn is_concurrent_lead_insert(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            && db.table() == Some("lead")
    })
}
