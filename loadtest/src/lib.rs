//! sluice's load generator and end-to-end verifier (`sluice-loadtest run|verify`).
//!
//! `run` drives a Segment-compatible collector over HTTP, open-loop (a constant arrival rate,
//! latency measured from each request's intended send time so a stall cannot hide) or
//! closed-loop (N connections flat out), and records every acknowledged `messageId` in an ack
//! file. `verify` reads that file and checks PostgreSQL: every acknowledged event stored once,
//! and how long each took from acknowledgement to a visible row.
//!
//! # Layout
//! - [`generate`]: the seeded traffic generator (zipf tenants, visitors, sessions, bodies).
//! - [`schedule`]: intended send times of the open-loop mode.
//! - [`send`]: one HTTP request to the collector and what its answer means.
//! - [`acks`]: the ack file, written by `run`, read (and followed) by `verify`.
//! - [`keys`]: write keys: given, or made with their tenants through the schema crate.
//! - [`report`]: HDR latency summaries, the progress line, the final reports.
//! - [`run`]: the `run` command.
//! - [`verify`]: the `verify` command.
//! - [`fill`]: millions of rows in `event` and `event_dedup`: a steady state to measure on.
//! - [`bare`]: a do-nothing HTTP server of the collector's framework, the benchmarks' ceiling.

pub mod acks;
pub mod bare;
pub mod fill;
pub mod generate;
pub mod keys;
pub mod report;
pub mod run;
pub mod schedule;
pub mod send;
pub mod verify;

use std::path::PathBuf;

/// What can go wrong in a load test; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value makes no sense.
    #[error("{0}")]
    Usage(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The ack file could not be written or read.
    #[error("ack file {path}: {source}; check the path, its folder and the free disk space")]
    AckFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The ack file is not one `run` wrote.
    #[error("ack file {path} line {line}: {reason}; pass a file written by `sluice-loadtest run --ack-file`")]
    AckFormat {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// PostgreSQL refused or failed a query.
    #[error("PostgreSQL: {context}: {source}; check SLUICE_DATABASE_URL, that the server runs and that `sluice-schema migrate up` was applied")]
    Database {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A write key the ack file names is not in `api_key`.
    #[error("write key sk_{prefix}… is not in the database's api_key table; verify against the database the collector used (SLUICE_DATABASE_URL)")]
    UnknownKey {
        /// The key's lookup prefix.
        prefix: String,
    },
    /// No connection to PostgreSQL; the message names the setting to fix.
    #[error("{0}")]
    Connect(String),
    /// Making tenants, workspaces or keys failed.
    #[error("cannot create load-test tenants: {0}; check SLUICE_DATABASE_URL and that `sluice-schema migrate up` was applied")]
    Control(String),
}

impl Error {
    pub(crate) fn db(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Database { context, source }
    }
}
