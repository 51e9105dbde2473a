//! Exactly-once (docs/architecture.md §5.2): Kafka redelivery, writers joining and leaving the
//! group, and writers killed mid-batch neither lose nor duplicate a row. Each test streams
//! events *and* visitor messages: a visitor message stored twice would double its count, so
//! the sums prove the offsets logic, not only the event dedup table.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_tests::kafka_config;
use sluice_tests::writer::{assert_stored_exactly_once, RunningWriter, WriterEnv};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_offsets_reset_to_the_beginning_store_nothing_twice() -> Result<()> {
    let env = WriterEnv::new(3).await?;
    let db = env.db.client().await?;
    let writer = RunningWriter::start(env.config());
    env.stream(2_000, 4_000).await??;
    assert_stored_exactly_once(&db, 2_000, WAIT).await?;
    writer.stop().await?;

    // Rewind the group's Kafka offsets of every data topic to the beginning.
    let rewind: BaseConsumer = kafka_config().set("group.id", &env.group).create()?;
    let mut zero = TopicPartitionList::new();
    for topic in env.topics.data() {
        for p in 0..3 {
            zero.add_partition_offset(topic, p, Offset::Offset(0))?;
        }
    }
    rewind
        .commit(&zero, CommitMode::Sync)
        .context("rewinding the group")?;
    drop(rewind);

    let writer = RunningWriter::start(env.config());
    env.stream(500, 4_000).await??;
    // 2,000 old (redelivered by Kafka's rewound offsets, skipped thanks to writer_offset) and
    // 500 new ones... the new batch reuses message ids m0..m499, so they are client retries
    // of earlier events: still 2,000 events, but visitors count every message once.
    wait_count_visitors(&db, 2_500).await?;
    let events: i64 = db
        .query_one("SELECT count(*) FROM event", &[])
        .await?
        .get(0);
    assert_eq!(events, 2_000, "retried message ids are not stored twice");
    // The Kafka copy of the offsets caught up again, after the database's.
    let check: BaseConsumer = kafka_config().set("group.id", &env.group).create()?;
    let mut committed = 0;
    for _ in 0..50 {
        let c = check.committed_offsets(
            {
                let mut t = TopicPartitionList::new();
                for p in 0..3 {
                    t.add_partition(&env.topics.event, p);
                }
                t
            },
            Duration::from_secs(5),
        )?;
        committed = c
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum::<i64>();
        if committed == 2_500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        committed, 2_500,
        "Kafka offsets committed after the database's"
    );
    writer.stop().await
}

async fn wait_count_visitors(db: &tokio_postgres::Client, n: i64) -> Result<()> {
    sluice_tests::writer::wait_for_count(
        db,
        "SELECT coalesce(sum(event_count), 0)::bigint FROM visitor",
        n,
        WAIT,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_joining_and_leaving_the_group_store_every_message_once() -> Result<()> {
    let env = WriterEnv::new(6).await?;
    let db = env.db.client().await?;
    let small_batches = || {
        let mut c = env.config();
        c.batch_max_rows = 500;
        c.flush_interval_ms = 100;
        c
    };
    let a = RunningWriter::start(small_batches());
    let b = RunningWriter::start(small_batches());
    let stream = env.stream(12_000, 1_500);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = RunningWriter::start(small_batches());
    tokio::time::sleep(Duration::from_secs(3)).await;
    a.stop().await?;
    stream.await??;
    assert_stored_exactly_once(&db, 12_000, WAIT).await?;
    assert!(!b.is_finished() && !c.is_finished());
    b.stop().await?;
    c.stop().await
}
