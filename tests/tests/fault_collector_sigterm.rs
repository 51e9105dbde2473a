//! The collector binary (`sluice-ingest`) gets SIGTERM in the middle of a steady load: it stops
//! accepting, finishes the requests in flight and flushes its producer, so every message it
//! acknowledged is on Kafka exactly once. Requests after the signal are refused at connect
//! (not acknowledged), which a client retries elsewhere.
//! Needs the binary built (`cargo build -p sluice-ingest --bins`; deploy/local/test does).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_schema::topics::Topics;
use sluice_tests::faults::{message_ids_in_topic, reconcile, Load};
use sluice_tests::ingest::{account, ingest_command};
use sluice_tests::private::free_port;
use sluice_tests::{unique_name, ServiceLog, Stack, TestDb};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_acknowledged_message() -> Result<()> {
    let db = TestDb::migrated().await?;
    let acct = account(&db, "sigterm").await?;
    let prefix = format!("{}.", unique_name("st"));
    let (port, metrics_port) = (free_port()?, free_port()?);
    let log = ServiceLog::new(&format!("{prefix}ingest"));
    let mut collector = ingest_command(&db.url, &prefix, port, metrics_port, log.path())?
        .env("SLUICE_READINESS_INTERVAL_MS", "200")
        // The load is the test's, not an abuser: no 429s mixed into the outcome.
        .env("SLUICE_RATE_LIMIT_PER_KEY_PER_SECOND", "0")
        .spawn()
        .context("starting sluice-ingest")?;
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{metrics_port}/readyz");
    let mut waited = 0;
    while !matches!(http.get(&ready).send().await, Ok(r) if r.status() == 200) {
        waited += 1;
        if waited > 300 {
            bail!("sluice-ingest not ready in 30 s: {}", log.text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let load = Load::start(
        &format!("http://127.0.0.1:{port}"),
        &acct.key.plaintext,
        "st",
        8,
        20,
        Duration::from_millis(5),
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = load.acked_so_far().await;
    let pid = collector.id().context("collector pid")?;
    let term = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    assert!(term.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), collector.wait())
        .await
        .context("sluice-ingest did not exit within 30 s of SIGTERM")??;
    let report = load.finish().await;
    let logs = log.text();
    assert!(exit.success(), "sluice-ingest exited with {exit}: {logs}");
    assert!(logs.contains("draining"), "the collector drained: {logs}");
    assert!(
        before > 500,
        "load was running when SIGTERM came ({before} acked)"
    );

    let topic = Topics::with_prefix(&prefix).event;
    let stored = message_ids_in_topic(
        &Stack::get().kafka_brokers,
        &topic,
        report.acked.len(),
        Duration::from_secs(60),
    )
    .await?;
    let r = reconcile(&report, &stored);
    eprintln!(
        "SIGTERM under load: {r:?}, statuses {:?}, {} transport errors",
        report.statuses, report.transport_errors
    );
    assert_eq!(r.lost, 0, "acknowledged messages lost");
    assert_eq!(r.duplicates, 0, "messages on Kafka twice");
    assert!(
        report.statuses.keys().all(|s| *s == 200 || *s == 503),
        "only 200, or 503 while draining: {:?}",
        report.statuses
    );
    Ok(())
}
