//! Kafka topic names, their creation, and the message key rule (docs/architecture.md §3).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication, TopicResult};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;

use crate::SchemaError;

/// Anonymous visitors, one message per visitor per collector request.
pub const VISITOR: &str = "sluice.visitor.v1";
/// Sessions, one message per session per collector request.
pub const SESSION: &str = "sluice.session.v1";
/// Events: track, page, screen, group and pixel calls.
pub const EVENT: &str = "sluice.event.v1";
/// Identity changes: identify and alias calls.
pub const IDENTITY: &str = "sluice.identity.v1";
/// Messages the writer cannot store, with the reason and their origin in headers.
pub const DLQ: &str = "sluice.dlq.v1";

/// The four topics the writer consumes, in the order it names them.
pub const DATA_TOPICS: [&str; 4] = [VISITOR, SESSION, EVENT, IDENTITY];

/// Every topic sluice uses, created at start-up when missing.
pub const ALL_TOPICS: [&str; 5] = [VISITOR, SESSION, EVENT, IDENTITY, DLQ];

/// Header names on dead-lettered messages.
pub mod dlq_headers {
    /// Why the writer could not store the message (a short snake_case word).
    pub const REASON: &str = "sluice.reason";
    /// Human-readable detail of the reason.
    pub const DETAIL: &str = "sluice.detail";
    /// Topic the message was consumed from.
    pub const SOURCE_TOPIC: &str = "sluice.source.topic";
    /// Partition the message was consumed from, in decimal.
    pub const SOURCE_PARTITION: &str = "sluice.source.partition";
    /// Offset of the message in its source partition, in decimal.
    pub const SOURCE_OFFSET: &str = "sluice.source.offset";
}

/// The topic names one deployment uses: docs/architecture.md §3.1's names behind a prefix
/// (`SLUICE_TOPIC_PREFIX`), so that tests, or two pipelines sharing one Kafka cluster, never
/// meet. The default prefix is empty: those names exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Topic of [`crate::messages::VisitorMessage`]s.
    pub visitor: String,
    /// Topic of [`crate::messages::SessionMessage`]s.
    pub session: String,
    /// Topic of [`crate::messages::EventMessage`]s.
    pub event: String,
    /// Topic of [`crate::messages::IdentityMessage`]s.
    pub identity: String,
    /// Dead-letter topic.
    pub dlq: String,
}

impl Topics {
    /// The names of docs/architecture.md §3.1, each behind `prefix` (which may be empty).
    pub fn with_prefix(prefix: &str) -> Topics {
        Topics {
            visitor: format!("{prefix}{VISITOR}"),
            session: format!("{prefix}{SESSION}"),
            event: format!("{prefix}{EVENT}"),
            identity: format!("{prefix}{IDENTITY}"),
            dlq: format!("{prefix}{DLQ}"),
        }
    }

    /// The four topics the writer consumes.
    pub fn data(&self) -> [&str; 4] {
        [&self.visitor, &self.session, &self.event, &self.identity]
    }

    /// Every topic, data and DLQ, as created at start-up.
    pub fn all(&self) -> [&str; 5] {
        [
            &self.visitor,
            &self.session,
            &self.event,
            &self.identity,
            &self.dlq,
        ]
    }
}

/// One of the four data topics (docs/architecture.md §3.1): what the collector produces to
/// and the writer consumes from, independent of the deployment's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataTopic {
    /// `sluice.visitor.v1`.
    Visitor,
    /// `sluice.session.v1`.
    Session,
    /// `sluice.event.v1`.
    Event,
    /// `sluice.identity.v1`.
    Identity,
}

impl DataTopic {
    /// The four, in the order [`Topics::data`] names them.
    pub const ALL: [DataTopic; 4] = [
        DataTopic::Visitor,
        DataTopic::Session,
        DataTopic::Event,
        DataTopic::Identity,
    ];

    /// This topic's name among `topics`.
    pub fn name(self, topics: &Topics) -> &str {
        match self {
            DataTopic::Visitor => &topics.visitor,
            DataTopic::Session => &topics.session,
            DataTopic::Event => &topics.event,
            DataTopic::Identity => &topics.identity,
        }
    }
}

impl Topics {
    /// Which data topic `name` is among these, if any (the DLQ is not one).
    pub fn data_topic(&self, name: &str) -> Option<DataTopic> {
        DataTopic::ALL.into_iter().find(|t| t.name(self) == name)
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics::with_prefix("")
    }
}

/// The `min.insync.replicas` sluice gives a topic of `replication` replicas when not told
/// otherwise: one less than the replicas, at least 1. With `acks=all` a write is then on every
/// replica but one before it is acknowledged, so losing any one broker loses no acknowledged
/// message and still takes writes; with two of three down, producers are refused (the
/// collector answers 503) rather than acknowledged on a single copy.
pub const fn default_min_insync_replicas(replication: i32) -> i32 {
    if replication > 2 {
        replication - 1
    } else {
        1
    }
}

/// The `min.insync.replicas` to create topics with: `configured` when above 0, else
/// [`default_min_insync_replicas`]; refused when it exceeds the replicas (every `acks=all`
/// write would fail).
pub fn min_insync_replicas(replication: i32, configured: i32) -> Result<i32, SchemaError> {
    let value = if configured > 0 {
        configured
    } else {
        default_min_insync_replicas(replication)
    };
    if value > replication.max(1) {
        return Err(SchemaError::Kafka {
            context: "checking the topic settings".into(),
            cause: format!(
                "min.insync.replicas {value} exceeds the replication factor {replication}, so no write could be acknowledged: set SLUICE_TOPIC_MIN_INSYNC_REPLICAS to at most {replication} (0 picks replication - 1)"
            ),
        });
    }
    Ok(value)
}

/// Creates the topics in `names` that are missing, with `partitions` partitions and
/// `replication` replicas each, and `min.insync.replicas` of
/// [`default_min_insync_replicas`]; topics that exist are left as they are. `client` names the
/// cluster (and any socket settings the caller wants); `timeout` bounds the request.
pub async fn create_missing(
    client: &ClientConfig,
    names: &[&str],
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<(), SchemaError> {
    create_missing_with(client, names, partitions, replication, 0, timeout).await
}

/// [`create_missing`] with `min.insync.replicas` set: `min_insync` above 0 is taken as it is,
/// 0 means [`default_min_insync_replicas`] (see [`min_insync_replicas`]).
pub async fn create_missing_with(
    client: &ClientConfig,
    names: &[&str],
    partitions: i32,
    replication: i32,
    min_insync: i32,
    timeout: Duration,
) -> Result<(), SchemaError> {
    let min_insync = min_insync_replicas(replication, min_insync)?.to_string();
    let (admin, opts) = admin(client, timeout)?;
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(name, partitions, TopicReplication::Fixed(replication))
                .set("min.insync.replicas", &min_insync)
        })
        .collect();
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(kafka_error("creating topics"))?;
    settled(results, "creating", RDKafkaErrorCode::TopicAlreadyExists)
}

/// Deletes the topics `names` (one missing already counts as deleted): for the throwaway
/// topics of benchmarks and tests, never a pipeline's own. `client` names the cluster;
/// `timeout` bounds the request.
pub async fn delete(
    client: &ClientConfig,
    names: &[&str],
    timeout: Duration,
) -> Result<(), SchemaError> {
    let (admin, opts) = admin(client, timeout)?;
    let results = admin
        .delete_topics(names, &opts)
        .await
        .map_err(kafka_error("deleting topics"))?;
    settled(
        results,
        "deleting",
        RDKafkaErrorCode::UnknownTopicOrPartition,
    )
}

/// An admin client of `client`'s cluster, and options bounding its requests by `timeout`.
fn admin(
    client: &ClientConfig,
    timeout: Duration,
) -> Result<(AdminClient<DefaultClientContext>, AdminOptions), SchemaError> {
    let admin = client
        .create()
        .map_err(kafka_error("creating the Kafka admin client"))?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    Ok((admin, opts))
}

/// A Kafka error while `context`.
fn kafka_error(context: &str) -> impl FnOnce(rdkafka::error::KafkaError) -> SchemaError + '_ {
    move |err| SchemaError::Kafka {
        context: context.to_owned(),
        cause: crate::kafka::describe_error(&err),
    }
}

/// Ok when every topic's result is a success or `done_already` (it was made or gone before).
fn settled(
    results: Vec<TopicResult>,
    verb: &str,
    done_already: RDKafkaErrorCode,
) -> Result<(), SchemaError> {
    for result in results {
        match result {
            Ok(_) => {}
            Err((_, code)) if code == done_already => {}
            Err((topic, code)) => {
                return Err(SchemaError::Kafka {
                    context: format!("{verb} topic {topic}"),
                    cause: code.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// Appends the key of every data message to `out`: `{tenant_id}/{anonymous_id}`, or the user
/// id when the message has no anonymous id, so that one visitor's messages stay ordered in
/// one partition. Appended, so a request's keys and payloads can share one buffer.
pub fn message_key_into(
    out: &mut Vec<u8>,
    tenant_id: i64,
    anonymous_id: Option<&str>,
    user_id: Option<&str>,
) {
    let who = anonymous_id.or(user_id).unwrap_or_default();
    out.extend_from_slice(itoa::Buffer::new().format(tenant_id).as_bytes());
    out.push(b'/');
    out.extend_from_slice(who.as_bytes());
}

/// [`message_key_into`] as a `String` of its own.
pub fn message_key(tenant_id: i64, anonymous_id: Option<&str>, user_id: Option<&str>) -> String {
    let mut key = Vec::new();
    message_key_into(&mut key, tenant_id, anonymous_id, user_id);
    // Written from `&str`s only: always UTF-8.
    String::from_utf8(key).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_prepended_to_every_topic() {
        assert_eq!(Topics::default().all(), ALL_TOPICS);
        let t = Topics::with_prefix("t1.");
        assert_eq!(t.event, "t1.sluice.event.v1");
        assert!(t.all().iter().all(|name| name.starts_with("t1.sluice.")));
        assert_eq!(t.data().len(), DATA_TOPICS.len());
    }

    #[test]
    fn min_insync_is_one_less_than_the_replicas_and_settable() {
        assert_eq!(min_insync_replicas(1, 0).unwrap(), 1);
        assert_eq!(min_insync_replicas(2, 0).unwrap(), 1);
        assert_eq!(min_insync_replicas(3, 0).unwrap(), 2);
        assert_eq!(min_insync_replicas(5, 0).unwrap(), 4);
        assert_eq!(min_insync_replicas(3, 3).unwrap(), 3);
        assert_eq!(min_insync_replicas(3, 1).unwrap(), 1);
        let err = min_insync_replicas(3, 4).unwrap_err().to_string();
        assert!(err.contains("SLUICE_TOPIC_MIN_INSYNC_REPLICAS"), "{err}");
    }

    #[test]
    fn data_topics_are_found_by_their_prefixed_names_only() {
        let t = Topics::with_prefix("p.");
        for topic in DataTopic::ALL {
            assert_eq!(t.data_topic(topic.name(&t)), Some(topic));
        }
        assert_eq!(t.data_topic(&t.dlq), None);
        assert_eq!(t.data_topic(EVENT), None);
        let names: Vec<&str> = DataTopic::ALL.iter().map(|d| d.name(&t)).collect();
        assert_eq!(names, t.data());
    }

    #[test]
    fn key_prefers_anonymous_id_then_user_id() {
        let key = |tenant_id, anonymous_id, user_id| {
            let mut out = b"before".to_vec();
            message_key_into(&mut out, tenant_id, anonymous_id, user_id);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(key(7, Some("a1"), Some("u1")), "before7/a1");
        assert_eq!(key(7, None, Some("u1")), "before7/u1");
        assert_eq!(key(7, None, None), "before7/");
        assert_eq!(key(-12, Some("a1"), None), "before-12/a1");
        assert_eq!(message_key(7, None, Some("u1")), "7/u1");
    }
}
