//! The consumer's side of group membership: rebalances positioned from `writer_offset` (on
//! assignment each partition's start is read from the database and handed to
//! `incremental_assign`, cooperative-sticky), and the lag gauges of the partitions owned.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::offsets::{self, Assignments, PartState, Tp};

/// The consumer's context: where rebalances are decided.
pub(crate) struct WriterContext {
    /// Partitions owned and their positions, shared with the pipeline.
    pub assignments: Arc<Assignments>,
    /// Connections for reading `writer_offset` on assignment.
    pub pool: Pool,
    /// The runtime the pool's connections run on; this thread blocks on it.
    pub rt: Handle,
    /// Consumer group (the `writer_offset.consumer_group` value).
    pub group: String,
    /// Set on shutdown: stop retrying the offset read.
    pub stop: CancellationToken,
}

impl ClientContext for WriterContext {}

impl ConsumerContext for WriterContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::rebalance("assign");
                let parts: Vec<Tp> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let stored = self.load_offsets(&parts);
                for tp in &parts {
                    let next = stored.get(tp).copied();
                    let offset = next.map_or(Offset::Beginning, Offset::Offset);
                    if let Err(err) = tpl.set_partition_offset(&tp.0, tp.1, offset) {
                        tracing::error!(topic = %tp.0, partition = tp.1, cause = %err, "cannot set start offset");
                    }
                    self.assignments.set(
                        tp.clone(),
                        PartState {
                            epoch: self.assignments.next_epoch(),
                            stored_next: next,
                        },
                    );
                }
                tracing::info!(
                    partitions = parts.len(),
                    "partitions assigned, positioned from writer_offset"
                );
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(err) = result {
                    tracing::error!(cause = %err, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::rebalance("revoke");
                for e in tpl.elements() {
                    self.assignments
                        .remove(&(e.topic().to_owned(), e.partition()));
                    zero_lag(e.topic(), e.partition());
                }
                tracing::info!(
                    partitions = tpl.count(),
                    lost = consumer.assignment_lost(),
                    "partitions revoked"
                );
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = result {
                    tracing::error!(cause = %err, "unassigning partitions failed");
                }
            }
            other => {
                tracing::error!(code = ?other, "rebalance error: dropping every partition");
                for ((topic, partition), _) in self.assignments.snapshot() {
                    zero_lag(&topic, partition);
                }
                self.assignments.clear();
                if let Err(err) = consumer.unassign() {
                    tracing::error!(cause = %err, "unassigning after a rebalance error failed");
                }
            }
        }
    }
}

impl WriterContext {
    /// Reads stored offsets, retrying with backoff while PostgreSQL is unreachable: a partition
    /// must not start anywhere but where the table says.
    pub fn load_offsets(&self, parts: &[Tp]) -> HashMap<Tp, i64> {
        let mut wait = Duration::from_millis(100);
        loop {
            let attempt = self.rt.block_on(async {
                let client = self.pool.get().await.map_err(|e| e.to_string())?;
                offsets::load(&**client, &self.group, parts)
                    .await
                    .map_err(|e| sluice_schema::db::describe(&e))
            });
            match attempt {
                Ok(map) => return map,
                Err(err) if self.stop.is_cancelled() => {
                    // Shutting down: the partitions are assigned at the beginning but nothing
                    // will be stored from them; the conditional update refuses stale work.
                    tracing::warn!(cause = %err, "shutdown while reading offsets");
                    return Default::default();
                }
                Err(err) => {
                    tracing::warn!(cause = %err, retry_in_ms = wait.as_millis() as u64, "cannot read writer_offset; retrying");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Exports each owned partition's lag: high watermark minus the stored position.
///
/// All high watermarks come from one `ListOffsets` request (`offsets_for_times` with -1, the
/// latest offset, for every owned partition). The first version asked for each partition in
/// turn (`fetch_watermarks`, 500 ms timeout each): under load those requests timed out, the
/// gauges kept their old values (non-zero lag on drained partitions) and the pass held this
/// polling thread for up to 48 x 500 ms.
pub(crate) fn export_lag(consumer: &BaseConsumer<WriterContext>, assignments: &Assignments) {
    let owned = assignments.snapshot();
    let mut query = TopicPartitionList::new();
    for ((topic, partition), _) in &owned {
        // Offset::End is -1, which `ListOffsets` reads as "the latest offset".
        if let Err(err) = query.add_partition_offset(topic, *partition, Offset::End) {
            tracing::warn!(cause = %err, "cannot build the high-watermark query");
            return;
        }
    }
    if query.count() == 0 {
        return;
    }
    let highs = match consumer.offsets_for_times(query, Duration::from_secs(2)) {
        Ok(tpl) => tpl,
        Err(err) => {
            tracing::warn!(cause = %err, "cannot read high watermarks; lag gauges not updated this time");
            return;
        }
    };
    let mut missing = 0;
    for ((topic, partition), state) in owned {
        let high = match highs.find_partition(&topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(high)) => high,
            _ => {
                missing += 1;
                continue;
            }
        };
        let next = state.stored_next.unwrap_or(0);
        metrics::lag(&topic, partition, high - next);
    }
    if missing > 0 {
        tracing::debug!(
            missing,
            "no high watermark for some partitions (just assigned?)"
        );
    }
}

/// Sets a partition's lag gauge to 0 when this writer stops owning it. The exporter keeps a
/// series until the process ends (the `metrics` facade has no removal), and a revoked
/// partition's last value would otherwise stay: the alerts and the KEDA query take
/// `max by (topic, partition)` over all writers, so a stale non-zero beat the new owner's 0,
/// paged "not storing" on an idle pipeline and kept the autoscaler from scaling in. 0 is what
/// this writer has left to store of it.
fn zero_lag(topic: &str, partition: i32) {
    metrics::lag(topic, partition, 0);
}
