//! sluice's data contract, shared by every part of the pipeline.
//!
//! # Layout
//! - [`apikey`]: write keys: format, stored hash, constant-time check.
//! - [`topics`]: Kafka topic names and the message key rule.
//! - [`messages`]: the JSON values the collector produces and the writer consumes.
//! - [`runtime`]: what every sluice binary does at start-up (logs, metrics recorder, signals).

pub mod apikey;
pub mod messages;
pub mod runtime;
pub mod topics;
