//! End to end under faults: HTTP load into a collector, a writer storing into PostgreSQL, and a
//! fault in between; at the end every message the collector acknowledged is a row of `event`,
//! exactly once.
//!
//! - the writer's link to PostgreSQL cut for 10 s mid-stream (a TCP proxy of the test's own in
//!   front of the shared cluster, which is never stopped): open connections die mid-COPY, new
//!   ones are refused; the writer pauses, retries and catches up;
//! - the whole stack on a private PostgreSQL cluster, stopped for 8 s and started again (the
//!   collector keeps accepting on its cached key; the writer pauses and catches up);
//! - two writer processes (`sluice-writer`, the real binary) in one group, one SIGKILLed and
//!   restarted every few seconds, so kills land during COPY and during rebalances.

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_tests::faults::{settle_in_table, Load, LoadReport};
use sluice_tests::ingest::{account, Account, Collector};
use sluice_tests::private::TcpProxy;
use sluice_tests::writer::{event_rows, writer_command, RunningWriter};
use sluice_tests::{unique_name, ServiceLog, Stack, TestDb};
use tokio::process::Child;

/// `postgres://user@host:port/db` with host:port replaced by `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> Result<String> {
    let (scheme_user, rest) = url.split_once('@').context("database URL without @")?;
    let (_, path) = rest.split_once('/').context("database URL without /")?;
    Ok(format!("{scheme_user}@{addr}/{path}"))
}

/// A migrated database with account `name`, and a collector on it for load (no rate limit);
/// with the collector's topic prefix, for the writers.
async fn served_for_load(name: &str) -> Result<(TestDb, Account, Collector, String)> {
    let db = TestDb::migrated().await?;
    let acct = account(&db, name).await?;
    let config = Collector::config_for_load(&db);
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;
    Ok((db, acct, collector, prefix))
}

/// A writer in this process on `database_url` under `prefix`, in a group of its own, retrying
/// PostgreSQL at least every second and flushing every 100 ms: it catches up soon after a fault.
fn eager_writer(database_url: &str, prefix: &str) -> RunningWriter {
    let mut config = sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        database_url,
        prefix,
        &unique_name("g"),
    );
    config.retry_max_ms = 1_000;
    config.flush_interval_ms = 100;
    RunningWriter::start(config)
}

/// The load ran (over 1,000 messages acknowledged) and, within `within`, every message the
/// collector acknowledged is a row of `event`, exactly once; `fault` names the run in the log.
async fn assert_acked_stored_once(
    db: &TestDb,
    report: &LoadReport,
    within: Duration,
    fault: &str,
) -> Result<()> {
    assert!(
        report.acked.len() > 1_000,
        "load ran: {:?}",
        report.statuses
    );
    let client = db.client().await?;
    let r = settle_in_table(&client, report, within).await?;
    eprintln!("{fault}: {r:?}, statuses {:?}", report.statuses);
    assert_eq!(r.lost, 0, "acknowledged messages not stored");
    assert_eq!(r.duplicates, 0, "messages stored twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_link_cut_for_10_s_loses_and_duplicates_nothing() -> Result<()> {
    let (db, acct, collector, prefix) = served_for_load("pg-cut").await?;
    let pg = Stack::get()
        .database_url
        .split_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(hp, _)| hp.to_owned())
        .context("host:port of the test database")?;
    let proxy = TcpProxy::start(&pg).await?;
    let writer = eager_writer(&through(&db.url, proxy.addr())?, &prefix);

    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "pc", 4, 25);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.cut();
    writer.outlasts(Duration::from_secs(10), "PostgreSQL").await;
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    assert_eq!(report.count(200) * 25, report.acked.len());
    let settle = Duration::from_secs(90);
    assert_acked_stored_once(&db, &report, settle, "PostgreSQL link cut 10 s").await?;
    writer.stop().await?;
    collector.stop().await?;
    Ok(())
}

fn spawn_writer(db: &TestDb, prefix: &str, group: &str, log: &std::path::Path) -> Result<Child> {
    writer_command(&db.url, &Stack::get().kafka_brokers, prefix, group, log)?
        .env("SLUICE_WRITER_BATCH_MAX_ROWS", "500")
        .spawn()
        .context("starting sluice-writer (cargo build -p sluice-writer --bins)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_sigkilled_during_copy_and_rebalance_lose_and_duplicate_nothing() -> Result<()> {
    let (db, acct, collector, prefix) = served_for_load("kill").await?;
    let group = unique_name("g");
    let log = ServiceLog::new(&group);
    let mut writers = vec![
        spawn_writer(&db, &prefix, &group, log.path())?,
        spawn_writer(&db, &prefix, &group, log.path())?,
    ];
    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "wk", 4, 25);
    let client = db.client().await?;
    const KILLS: usize = 6;
    let mut last = 0;
    for round in 0..KILLS {
        // Kill only once the group is storing again (rows grew since the last kill), then
        // after an uneven delay: kills land during COPY and commit, not only in rebalances.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while event_rows(&client).await? <= last && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(150 + 350 * (round as u64 % 3))).await;
        let victim = round % 2;
        writers[victim].start_kill()?;
        writers[victim].wait().await?;
        last = event_rows(&client).await?;
        eprintln!("kill {round}: writer {victim} SIGKILLed with {last} rows stored");
        writers[victim] = spawn_writer(&db, &prefix, &group, log.path())?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    assert!(
        report.acked.len() > 1_000,
        "load ran: {:?}",
        report.statuses
    );
    let r = settle_in_table(&client, &report, Duration::from_secs(120)).await?;
    eprintln!(
        "{KILLS} writer SIGKILLs: {r:?}, statuses {:?}",
        report.statuses
    );
    for w in &mut writers {
        w.start_kill()?;
    }
    if r.lost != 0 || r.duplicates != 0 {
        eprintln!("writer log tail:\n{}", log.tail(30));
    }
    assert_eq!(r.lost, 0, "acknowledged messages not stored");
    assert_eq!(r.duplicates, 0, "messages stored twice");
    collector.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    // The whole stack on a private cluster (the shared one is never stopped): the collector's
    // key store and the writer's database both go away and come back.
    let pg = sluice_tests::private::PrivatePostgres::start().await?;
    let db = TestDb::existing("sluice", &pg.url());
    sluice_schema::migrate::up(&mut db.client().await?).await?;
    let acct = account(&db, "pg-restart").await?;
    let mut config = Collector::config_for_load(&db);
    // Long enough that the key stays cached through the restart: the collector keeps
    // accepting into Kafka while the database is away.
    config.key_cache_ttl_ms = 120_000;
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;
    let writer = eager_writer(&db.url, &prefix);

    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "pr", 4, 25);
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.stop().await?;
    writer.outlasts(Duration::from_secs(8), "PostgreSQL").await;
    pg.start_again().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.finish().await;
    let settle = Duration::from_secs(120);
    assert_acked_stored_once(&db, &report, settle, "PostgreSQL restarted").await?;
    writer.stop().await?;
    collector.stop().await?;
    Ok(())
}
