//! Maintenance does not stall the hot path, and keeps what it promises: `partitions prune`
//! detaches months concurrently, so a prune waiting behind a long query delays no writer batch
//! by more than a second; an interrupted concurrent detach is finished by the next prune; the
//! writer drops the dedup claims' day partitions past the window whole and keeps the ones inside.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::{NaiveDate, TimeZone, Utc};
use sluice_schema::messages::event_id;
use sluice_schema::{dedup, partitions};
use sluice_tests::private::free_port;
use sluice_tests::writer::{
    assert_stored_exactly_once, event, wait_all_consumed, wait_for_count, RunningWriter, WriterEnv,
};
use sluice_tests::TestDb;
use sluice_tests::{query_column, query_scalar};
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
async fn dedup_days_past_the_window_are_dropped_whole_and_retries_inside_it_are_caught(
) -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let c = env.db.client().await?;
    let now = Utc::now();
    let window = dedup::Window { days: 7 };
    // Claims of earlier deliveries, keyed as the writer keys them: one sent 6 days 20 hours
    // ago (inside a 7-day window), one on a day past it.
    let inside_at = now - chrono::Duration::hours(6 * 24 + 20);
    let old_day = now.date_naive() - chrono::Days::new(9);
    let outside_at = Utc.from_utc_datetime(&old_day.and_hms_opt(12, 0, 0).expect("noon"));
    for (at, message) in [(inside_at, "inside"), (outside_at, "outside")] {
        dedup::ensure_day(&c, at.date_naive()).await?;
        c.execute(
            "INSERT INTO event_dedup (key_ms, event_id) VALUES ($1, $2)",
            &[&at.timestamp_millis(), &event_id(5, message)],
        )
        .await?;
    }
    let mut config = env.config();
    config.dedup_window_days = window.days;
    let writer = RunningWriter::start(config);
    // Start-up drops the old day whole and makes every day a claim key can fall on.
    let old_table = dedup::day_table_name(old_day);
    wait_for_count(
        &c,
        &format!("SELECT count(*) FROM pg_class WHERE relname = '{old_table}'"),
        0,
        WAIT,
    )
    .await?;
    let days: Vec<String> = query_column(
        &c,
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'event_dedup'::regclass ORDER BY 1",
    )
    .await?;
    let expected: Vec<String> = window.days_ahead(now).map(dedup::day_table_name).collect();
    assert_eq!(days, expected);

    // A client retries both with their original timestamps: the one inside the window is
    // still a duplicate, the one past it is stored (retries are caught for the window, not
    // forever).
    env.produce_events(&[
        event(5, "a", "inside", inside_at),
        event(5, "a", "outside", outside_at),
        event(5, "a", "fresh", now),
    ])
    .await?;
    wait_for_count(&c, "SELECT count(*) FROM event", 2, WAIT).await?;
    let (group, topics) = (env.group.clone(), env.topics.clone());
    tokio::task::spawn_blocking(move || wait_all_consumed(&group, &topics)).await??;
    let stored: Vec<String> =
        query_column(&c, "SELECT message_id FROM event ORDER BY message_id").await?;
    assert_eq!(stored, ["fresh", "outside"]);
    // The prune called directly keeps to the same rule: nothing inside the window goes.
    assert_eq!(dedup::prune(&c, now, window).await?, Vec::<String>::new());
    let claims: i64 = query_scalar(&c, "SELECT count(*) FROM event_dedup").await?;
    assert_eq!(
        claims, 3,
        "inside's first claim, outside's new one, fresh's"
    );
    writer.stop().await
}
