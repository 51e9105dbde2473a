//! sluice's data contract, shared by every part of the pipeline.
//!
//! # Layout
//! - [`apikey`]: write keys: format, stored hash, constant-time check.
//! - [`topics`]: Kafka topic names and the message key rule.
//! - [`messages`]: the JSON values the collector produces and the writer consumes.
//! - [`metrics`]: how a service declares its metrics (name, kind, labels, buckets); the
//!   Prometheus recorder installed from those buckets.
//! - [`runtime`]: what every sluice binary does at start-up (logs, signals).
//! - [`readiness`]: `/readyz` of both services: the last probe of Kafka and PostgreSQL.
//! - [`db`]: the PostgreSQL connector: libpq TLS parameters, OpenSSL, redacted URLs, errors
//!   that name the setting to fix.
//! - [`kafka`]: operator-given librdkafka properties (TLS, SASL), with sluice's own refused.
//! - [`defaults`]: defaults of the settings several binaries read.
//! - [`cli`]: the flags both services take alike (database, Kafka client, topics, PII keys).
//! - [`secrets`]: settings read from files (`SLUICE_DATABASE_URL_FILE`, ...).
//! - [`migrate`]: the numbered SQL migrations of `schema/migrations/` and their runner.
//! - [`dedup`]: the writer's dedup claims: their key (client time first) and day partitions.
//! - [`partitions`]: month and tenant-hash partitions of `event`: create ahead, list, prune.
//! - [`ids`]: BIGINT keys as checked, prefixed external ids (`tnt_`, `ws_`, `key_`, ...).
//! - [`pii`]: AES-256-GCM sealing and HMAC fingerprints of email and phone; key rotation.
//! - [`control`]: tenants, workspaces, write keys (create, revoke).
//! - [`erase`]: deleting a tenant or one person everywhere; the writers' suppression list.
//! - [`seed`]: development data: two tenants, two months of events, a funnel.
//! - [`error`]: [`SchemaError`], the library's one error type.

#![warn(missing_docs)]

pub mod apikey;
pub mod cli;
pub mod control;
pub mod db;
pub mod dedup;
pub mod defaults;
pub mod erase;
pub mod error;
pub mod ids;
pub mod kafka;
pub mod messages;
pub mod metrics;
pub mod migrate;
pub mod partitions;
pub mod pii;
pub mod readiness;
pub mod runtime;
pub mod secrets;
pub mod seed;
pub mod topics;

pub use error::SchemaError;
