//! Maintenance does not stall the hot path, and keeps what it promises: `partitions prune`
//! detaches months concurrently, so a prune waiting behind a long query delays no writer batch
//! by more than a second; an interrupted concurrent detach is finished by the next prune; the
//! writer's dedup pruning drops claims older than the dedup window and keeps the ones inside.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{NaiveDate, TimeZone, Utc};
use sluice_schema::messages::event_id;
use sluice_schema::partitions;
use sluice_tests::private::free_port;
use sluice_tests::query_scalar;
use sluice_tests::writer::{
    assert_stored_exactly_once, event, wait_all_consumed, wait_for_count, RunningWriter, WriterEnv,
};
use sluice_tests::TestDb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(120);

fn day(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("a valid date")
}

async fn scrape(port: u16) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// A sample's value in a scrape (first line starting with `series`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Old months to prune, each with a row (their leaves are real tables).
async fn old_months(c: &tokio_postgres::Client, months: &[NaiveDate]) -> Result<()> {
    for &m in months {
        partitions::ensure_month(c, m, 2).await?;
        let at = Utc.from_utc_datetime(&m.and_hms_opt(12, 0, 0).expect("noon exists"));
        c.execute(
            "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) \
             VALUES (1, $1, gen_random_uuid(), 10, 'track', 'old', $1)",
            &[&at],
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_behind_a_long_query_delays_no_writer_batch_by_more_than_a_second() -> Result<()> {
    let env = WriterEnv::new(2).await?;
    let c = env.db.client().await?;
    old_months(&c, &[day(2020, 1, 1), day(2020, 2, 1)]).await?;
    let port = free_port()?;
    let mut config = env.config();
    config.metrics_listen = ([127, 0, 0, 1], port).into();
    config.flush_interval_ms = 100;
    let writer = RunningWriter::start(config);
    // The writer starts storing before the prune, and goes on during and after it.
    let stream = env.stream(24_000, 2_000);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A long query on event (an analyst's report): it holds its lock on every partition for
    // 4 s. A plain DETACH would queue an ACCESS EXCLUSIVE lock behind it, and every COPY
    // behind that.
    let reader = env.db.client().await?;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM event")
        .await?;
    let mut pruner = env.db.client().await?;
    let prune_started = Instant::now();
    let prune = tokio::spawn(async move {
        let dropped = partitions::prune(&mut pruner, Utc::now(), 12).await;
        (dropped, prune_started.elapsed())
    });
    // Meanwhile a probe commits a row into the current month every 100 ms: the hot path's
    // lock, measured directly.
    let mut worst_probe = Duration::ZERO;
    let probe_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < probe_until {
        let t = Instant::now();
        c.execute(
            "INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, message_id, received_at) \
             VALUES (99, now(), gen_random_uuid(), 990, 'track', 'probe', now())",
            &[],
        )
        .await?;
        worst_probe = worst_probe.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worst_probe < Duration::from_secs(1),
        "an insert waited {worst_probe:?} behind the prune"
    );
    assert!(!prune.is_finished(), "the detach waits for the long query");
    reader.batch_execute("COMMIT").await?;
    let (dropped, took) = prune.await?;
    assert_eq!(dropped?, ["event_y2020m01", "event_y2020m02"]);
    stream.await??;
    let probes: i64 = query_scalar(&c, "SELECT count(*) FROM event WHERE tenant_id = 99").await?;
    c.execute("DELETE FROM event WHERE tenant_id = 99", &[])
        .await?;
    assert_stored_exactly_once(&c, 24_000, WAIT).await?;

    let text = scrape(port).await?;
    let batches = sample(&text, "sluice_writer_batch_duration_seconds_count")
        .context("no batch duration histogram")?;
    let within = sample(
        &text,
        "sluice_writer_batch_duration_seconds_bucket{le=\"1\"}",
    )
    .context("no 1 s bucket")?;
    let slowest_bucket = text
        .lines()
        .filter(|l| l.starts_with("sluice_writer_batch_duration_seconds_bucket"))
        .find(|l| sample(l, "").is_some_and(|v| v >= batches))
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "prune took {took:?} behind the 4 s query; {batches} writer batches, {within} within 1 s \
         (all within: {slowest_bucket}); {probes} probe inserts, worst {worst_probe:?}"
    );
    assert!(batches > 20.0, "batches were stored during the prune");
    assert_eq!(within, batches, "a writer batch took more than a second");
    writer.stop().await
}

#[tokio::test]
async fn an_interrupted_concurrent_detach_is_finished_by_the_next_prune() -> Result<()> {
    let db = TestDb::migrated().await?;
    let mut c = db.client().await?;
    for m in 1..=4 {
        old_months(&c, &[day(2026, m, 1)]).await?;
    }
    // The detach's second phase waits for this transaction; it is cancelled meanwhile, as a
    // prune killed at that moment would be.
    let reader = db.client().await?;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM event")
        .await?;
    let detacher = db.client().await?;
    let pid: i32 = query_scalar(&detacher, "SELECT pg_backend_pid()").await?;
    let detach = tokio::spawn(async move {
        detacher
            .batch_execute("ALTER TABLE event DETACH PARTITION event_y2026m01 CONCURRENTLY")
            .await
    });
    let pending_sql =
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'event'::regclass AND inhdetachpending";
    wait_for_count(&c, pending_sql, 1, Duration::from_secs(30)).await?;
    c.execute("SELECT pg_cancel_backend($1)", &[&pid]).await?;
    assert!(detach.await?.is_err(), "the detach was interrupted");
    reader.batch_execute("COMMIT").await?;
    let pending: i64 = c.query_one(pending_sql, &[]).await?.get(0);
    assert_eq!(pending, 1, "the month is left detach-pending");

    let now = Utc.with_ymd_and_hms(2026, 4, 15, 0, 0, 0).unwrap();
    let dropped = partitions::prune(&mut c, now, 2).await?;
    assert_eq!(dropped, ["event_y2026m01", "event_y2026m02"]);
    let pending: i64 = c.query_one(pending_sql, &[]).await?.get(0);
    assert_eq!(pending, 0);
    let tables: i64 = query_scalar(&c, "SELECT count(*) FROM pg_class WHERE relname LIKE 'event_y2026m01%' OR relname LIKE 'event_y2026m02%'").await?;
    assert_eq!(tables, 0, "the months and their leaves are dropped");
    let left: i64 = c.query_one("SELECT count(*) FROM event", &[]).await?.get(0);
    assert_eq!(left, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_pruning_keeps_the_window_and_drops_only_older_claims() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let c = env.db.client().await?;
    // Claims of earlier deliveries: received 6 days 23 hours ago (inside a 7-day window) and
    // 7 days 1 hour ago (outside it).
    for (message, age) in [("inside", "6 days 23 hours"), ("outside", "7 days 1 hour")] {
        c.execute(
            &format!(
                "INSERT INTO event_dedup (tenant_id, event_id, received_at) VALUES (5, $1, now() - interval '{age}')"
            ),
            &[&event_id(5, message)],
        )
        .await?;
    }
    let mut config = env.config();
    config.dedup_window_days = 7;
    let writer = RunningWriter::start(config);
    // The writer prunes at start-up (then every ten minutes).
    wait_for_count(
        &c,
        "SELECT count(*) FROM event_dedup WHERE received_at < now() - interval '7 days'",
        0,
        WAIT,
    )
    .await?;
    let kept: i64 = query_scalar(&c, "SELECT count(*) FROM event_dedup").await?;
    assert_eq!(kept, 1, "the claim inside the window is kept");

    // A client retries both now: the one inside the window is still a duplicate, the one
    // outside it is stored (as promised: retries are caught for the window, not forever).
    let now = Utc::now();
    env.produce_events(&[
        event(5, "a", "inside", now),
        event(5, "a", "outside", now),
        event(5, "a", "fresh", now),
    ])
    .await?;
    wait_for_count(&c, "SELECT count(*) FROM event", 2, WAIT).await?;
    let (group, topics) = (env.group.clone(), env.topics.clone());
    tokio::task::spawn_blocking(move || wait_all_consumed(&group, &topics)).await??;
    let stored: Vec<String> = c
        .query("SELECT message_id FROM event ORDER BY message_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, ["fresh", "outside"]);
    // The direct call keeps to the same rule: nothing inside the window goes.
    let pruned = sluice_writer::prune_dedup(&c, 7).await?;
    assert_eq!(pruned, 0);
    let claims: i64 = query_scalar(&c, "SELECT count(*) FROM event_dedup").await?;
    assert_eq!(claims, 3);
    writer.stop().await
}
