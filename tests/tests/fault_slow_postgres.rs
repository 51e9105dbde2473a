//! A slow PostgreSQL: a transaction holds `ACCESS EXCLUSIVE` on `event` (every month and leaf)
//! for 15 s while the load goes on, so the writer's COPY waits and batches back up behind it.
//! The writer (`sluice-writer`, the real binary, so its memory is its own) keeps its memory
//! bounded (resident set sampled every second), its exported lag grows, and once the lock is
//! released it catches up with nothing lost and nothing stored twice.

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_tests::faults::{message_ids_in_table, reconcile, vm_kib, Load};
use sluice_tests::ingest::{account, Collector};
use sluice_tests::private::free_port;
use sluice_tests::writer::writer_command;
use sluice_tests::{query_scalar, unique_name, ServiceLog, Stack, TestDb};

/// Resident set of `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<u64> {
    vm_kib(pid, "VmRSS").map(|kib| kib / 1024)
}

/// Sum of `sluice_writer_consumer_lag` over the event topic's partitions.
async fn event_lag(metrics: &str, topic: &str) -> f64 {
    let Ok(resp) = reqwest::get(metrics).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("sluice_writer_consumer_lag{") && l.contains(topic))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_lock_backs_batches_up_with_bounded_memory_and_no_loss() -> Result<()> {
    const LOCK_SECS: u64 = 15;
    const RSS_BOUND_MIB: u64 = 512;
    let db = TestDb::migrated().await?;
    let acct = account(&db, "slow-pg").await?;
    let config = Collector::config_for_load(&db);
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;
    let metrics_port = free_port()?;
    let log = ServiceLog::new(&format!("{prefix}writer"));
    let brokers = &Stack::get().kafka_brokers;
    let mut writer = writer_command(&db.url, brokers, &prefix, &unique_name("g"), log.path())?
        .env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .spawn()
        .context("starting sluice-writer (cargo build -p sluice-writer --bins)")?;
    let pid = writer.id().context("writer pid")?;
    let metrics = format!("http://127.0.0.1:{metrics_port}/metrics");
    let topic = collector.topics.event.clone();

    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "sp", 4, 25);
    let client = db.client().await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stored_before: i64 = query_scalar(&client, "SELECT count(*) FROM event").await?;
    let lag_before = event_lag(&metrics, &topic).await;

    eprintln!("before the lock: {stored_before} rows, lag {lag_before}");
    // Hold the lock on a connection of its own.
    let mut locker = db.client().await?;
    let tx = locker.transaction().await?;
    tx.batch_execute("LOCK TABLE event IN ACCESS EXCLUSIVE MODE")
        .await?;
    eprintln!("lock taken");
    let mut rss_peak = 0;
    let mut lag_peak = 0.0f64;
    for _ in 0..LOCK_SECS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak = rss_peak.max(rss_mib(pid).unwrap_or(0));
        lag_peak = lag_peak.max(event_lag(&metrics, &topic).await);
    }
    // (Counting rows now would wait for the lock this test holds.)
    tx.rollback().await?;
    eprintln!("lock released");
    let acked_at_release = load.acked_so_far().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;

    eprintln!("load stopped: {:?}", report.statuses);
    // Catch up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let r = loop {
        let r = reconcile(&report, &message_ids_in_table(&client).await?);
        rss_peak = rss_peak.max(rss_mib(pid).unwrap_or(0));
        if r.lost == 0 || tokio::time::Instant::now() > deadline {
            tokio::time::sleep(Duration::from_secs(3)).await;
            break reconcile(&report, &message_ids_in_table(&client).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    writer.start_kill()?;
    eprintln!(
        "lock {LOCK_SECS} s: stored {stored_before} before, \
         {acked_at_release} acked at release; lag {lag_before} -> peak {lag_peak}; \
         writer RSS peak {rss_peak} MiB; {r:?}"
    );
    assert!(
        lag_peak > lag_before + 1_000.0,
        "lag grew under the lock: {lag_before} -> {lag_peak}"
    );
    assert!(
        rss_peak > 0 && rss_peak < RSS_BOUND_MIB,
        "writer RSS peak {rss_peak} MiB"
    );
    assert_eq!(r.lost, 0, "acknowledged messages not stored");
    assert_eq!(r.duplicates, 0, "messages stored twice");
    collector.stop().await?;
    Ok(())
}
