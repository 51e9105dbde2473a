//! The dead-letter queue: messages the writer cannot store go to `sluice.dlq.v1` unchanged
//! (same key and value), with the reason and their origin in headers, so they can be
//! inspected and replayed. Produced and acknowledged *before* the batch's transaction
//! commits: a crash in between re-sends them (at-least-once into the DLQ), never loses them.

use std::time::Duration;

use futures::future::try_join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sluice_schema::kafka::{ErrorTap, KafkaProperties, TapContext};
use sluice_schema::topics::dlq_headers;

use crate::error::WriterError;

/// A message on its way to the DLQ.
#[derive(Debug)]
pub(crate) struct DeadLetter<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Original key.
    pub key: Option<&'a [u8]>,
    /// Original value.
    pub payload: Option<&'a [u8]>,
    /// Short snake_case reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub detail: &'a str,
}

/// Producer of the DLQ topic.
pub(crate) struct Dlq {
    /// Idempotent, acks=all producer; its client-wide errors feed `/readyz`.
    producer: FutureProducer<TapContext>,
    /// The producer's last client-wide error.
    tap: ErrorTap,
    /// The DLQ topic name (with the deployment's prefix).
    topic: String,
}

impl Dlq {
    pub fn new(
        brokers: &str,
        properties: &KafkaProperties,
        topic: String,
    ) -> Result<Dlq, WriterError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "zstd")
            .set("linger.ms", "5")
            // Bounded wait: a DLQ outage fails the batch (retried) instead of hanging it.
            .set("message.timeout.ms", "30000");
        properties.apply(&mut client);
        let context = TapContext::default();
        let tap = context.tap.clone();
        let producer: FutureProducer<TapContext> = client
            .create_with_context(context)
            .map_err(WriterError::kafka("creating the DLQ producer"))?;
        Ok(Dlq {
            producer,
            tap,
            topic,
        })
    }

    /// A handle on the producer (cheap clone), for the readiness check.
    /// The producer's client-wide errors, for the readiness check.
    pub fn tap(&self) -> ErrorTap {
        self.tap.clone()
    }

    pub fn producer(&self) -> FutureProducer<TapContext> {
        self.producer.clone()
    }

    /// Sends every letter and waits for all acknowledgements.
    pub async fn send(&self, letters: &[DeadLetter<'_>]) -> Result<(), String> {
        let sends = letters.iter().map(|l| {
            let partition = l.partition.to_string();
            let offset = l.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: dlq_headers::REASON,
                    value: Some(l.reason),
                })
                .insert(Header {
                    key: dlq_headers::DETAIL,
                    value: Some(l.detail),
                })
                .insert(Header {
                    key: dlq_headers::SOURCE_TOPIC,
                    value: Some(l.topic),
                })
                .insert(Header {
                    key: dlq_headers::SOURCE_PARTITION,
                    value: Some(&partition),
                })
                .insert(Header {
                    key: dlq_headers::SOURCE_OFFSET,
                    value: Some(&offset),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).headers(headers);
            if let Some(key) = l.key {
                record = record.key(key);
            }
            if let Some(payload) = l.payload {
                record = record.payload(payload);
            }
            let fut = self.producer.send(record, Duration::from_secs(30));
            async move { fut.await.map_err(|(err, _)| err.to_string()) }
        });
        try_join_all(sends).await?;
        for l in letters {
            crate::metrics::dlq(l.reason);
        }
        Ok(())
    }
}
