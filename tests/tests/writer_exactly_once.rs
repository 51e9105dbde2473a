//! Exactly-once (docs/architecture.md §5.2): Kafka redelivery, writers joining and leaving the
//! group, and writers killed mid-batch neither lose nor duplicate a row. Each test streams
//! events *and* visitor messages: a visitor message stored twice would double its count, so
//! the sums prove the offsets logic, not only the event dedup table.

use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use sluice_tests::ingest::{account, Collector};
use sluice_tests::kafka_config;
use sluice_tests::writer::{
    assert_stored_exactly_once, wait_all_consumed, wait_for_count, RunningWriter, WriterEnv,
};
use sluice_tests::{query_scalar, unique_name, Stack, TestDb};

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
    // of earlier events: still 2,000 events, and the visitors' counters count only the
    // events stored (their visitor messages are new Kafka messages, but count nothing).
    // The 500 retries are stored (offsets committed below) before the counters are read.
    let mut stored_retries = false;
    for _ in 0..300 {
        if kafka_committed(&env)? == 2_500 {
            stored_retries = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stored_retries, "the retried batch was consumed");
    wait_count_visitors(&db, 2_000).await?;
    let events: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
    assert_eq!(events, 2_000, "retried message ids are not stored twice");
    // Settled: the counters stay at the distinct events.
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_count_visitors(&db, 2_000).await?;
    writer.stop().await
}

/// The event topic's offsets the group committed to Kafka (the writer commits them after the
/// database's, so 2,500 means the retried batch was stored).
fn kafka_committed(env: &WriterEnv) -> Result<i64> {
    let check: BaseConsumer = kafka_config().set("group.id", &env.group).create()?;
    let mut t = TopicPartitionList::new();
    for p in 0..3 {
        t.add_partition(&env.topics.event, p);
    }
    let c = check.committed_offsets(t, Duration::from_secs(5))?;
    Ok(c.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum::<i64>())
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

/// A client's retry of a whole batch (same `messageId`s, a new `sentAt`, as SDKs retry after a
/// timeout) through the real collector: the events are stored once, and so are the visitor
/// and session counters, although the collector produced their visitor and session messages
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_twice_counts_its_events_once_in_visitors_and_sessions() -> Result<()> {
    let db = TestDb::migrated().await?;
    let acct = account(&db, "retry").await?;
    let config = Collector::config(&db);
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;
    let writer_group = unique_name("g");
    let writer = RunningWriter::start(sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &prefix,
        &writer_group,
    ));
    // 60 messages: 3 visitors, each in its own session, tracks and pages.
    let batch = |sent_at: &str| {
        let messages: Vec<serde_json::Value> = (0..60)
            .map(|i| {
                serde_json::json!({
                    "type": if i % 3 == 0 { "page" } else { "track" },
                    "event": "Clicked",
                    "name": "Home",
                    "messageId": format!("retry-{i}"),
                    "anonymousId": format!("v{}", i % 3),
                    "sessionId": format!("s{}", i % 3),
                    "timestamp": "2026-11-30T12:00:00.000Z",
                })
            })
            .collect();
        serde_json::json!({"batch": messages, "sentAt": sent_at})
    };
    let http = reqwest::Client::new();
    for sent_at in ["2026-11-30T12:00:01.000Z", "2026-11-30T12:00:09.500Z"] {
        let status = http
            .post(collector.url("/v1/batch"))
            .basic_auth(&acct.key.plaintext, Some(""))
            .json(&batch(sent_at))
            .send()
            .await?
            .status();
        assert_eq!(status, 200, "batch sent at {sent_at}");
    }
    let c = db.client().await?;
    wait_for_count(&c, "SELECT count(*) FROM event", 60, WAIT).await?;
    // Every message of both requests (events, visitors, sessions) is stored once the group's
    // committed offsets reach the end of every topic: the writer commits after the database.
    let group = writer_group.clone();
    let topics = sluice_schema::topics::Topics::with_prefix(&prefix);
    tokio::task::spawn_blocking(move || wait_all_consumed(&group, &topics)).await??;
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM event), \
                    (SELECT sum(event_count)::bigint FROM visitor), \
                    (SELECT sum(event_count)::bigint FROM session), \
                    (SELECT sum(page_count)::bigint FROM session), \
                    (SELECT count(*) FROM visitor WHERE event_count <> 20)",
            &[],
        )
        .await?;
    let got: (i64, i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        got,
        (60, 60, 60, 20, 0),
        "(events, visitor events, session events, session pages, visitors not at 20)"
    );
    // The counters agree with the rows, per visitor and per session.
    let mismatched: i64 = c
        .query_one(
            "SELECT (SELECT count(*) FROM visitor v WHERE event_count <> (SELECT count(*) FROM event e \
               WHERE e.tenant_id = v.tenant_id AND e.anonymous_id = v.anonymous_id)) \
             + (SELECT count(*) FROM session s WHERE page_count <> (SELECT count(*) FROM event e \
               WHERE e.tenant_id = s.tenant_id AND e.session_id = s.session_id AND e.type = 'page'))",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(mismatched, 0);
    writer.stop().await?;
    collector.stop().await
}
