//! Operating the writer: `/healthz`, `/readyz` and `/metrics` answer on the metrics port with
//! the names of docs/architecture.md §7.3, and SIGTERM drains the real binary: the open batch is
//! stored and the process exits 0 promptly.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::Utc;
use sluice_tests::private::free_port;
use sluice_tests::query_scalar;
use sluice_tests::writer::{
    event, http_get, wait_for_count, writer_command, RunningWriter, WriterEnv,
};
use sluice_tests::{ServiceLog, Stack};

async fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let out = http_get(port, path).await?;
    let status = out.split(' ').nth(1).context("no status")?.parse()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer_on_the_metrics_port() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let port = free_port()?;
    let mut config = env.config();
    config.metrics_listen = ([127, 0, 0, 1], port).into();
    let writer = RunningWriter::start(config);
    env.produce_events(&[event(2, "h", "m-h", Utc::now())])
        .await?;
    let db = env.db.client().await?;
    wait_for_count(
        &db,
        "SELECT count(*) FROM event",
        1,
        Duration::from_secs(60),
    )
    .await?;

    assert_eq!(get(port, "/healthz").await?.0, 200);
    let (status, body) = get(port, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(ready["dependencies"]["postgres"]["ok"], true);
    assert_eq!(ready["dependencies"]["kafka"]["ok"], true);
    // The collector's shape exactly (docs/architecture.md §4.7): one parser for both services.
    let keys: Vec<&String> = ready
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(keys, ["dependencies", "ready"], "{body}");
    assert!(
        ready["dependencies"]["postgres"]["latency_ms"].is_u64(),
        "{body}"
    );
    // The lag gauge is exported every 5 s.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, text) = get(port, "/metrics").await?;
    assert_eq!(status, 200);
    for name in [
        "sluice_writer_rows_total{table=\"event\"} 1",
        "sluice_writer_batch_rows",
        "sluice_writer_copy_duration_seconds",
        "sluice_writer_consumer_lag{",
        // Histograms, not summaries: Prometheus can aggregate buckets across instances.
        "sluice_writer_batch_rows_bucket{le=",
        "sluice_writer_copy_duration_seconds_bucket{le=",
        "sluice_writer_batch_duration_seconds_bucket{le=",
        // Where the batch's time went, by phase.
        "sluice_writer_step_duration_seconds_count{step=\"claim\"} 1",
        "sluice_writer_step_duration_seconds_count{step=\"events\"} 1",
        "sluice_writer_step_duration_seconds_count{step=\"counters\"} 1",
        "sluice_writer_step_duration_seconds_count{step=\"commit\"} 1",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    // Everything produced is stored: every partition's lag reads 0 (not a stale value).
    let lags: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sluice_writer_consumer_lag{"))
        .collect();
    assert!(
        !lags.is_empty() && lags.iter().all(|l| l.ends_with(" 0")),
        "lag after everything was stored: {lags:?}"
    );
    // Months are ensured ahead at start-up (3 by default): the gauge is past now + 2 months.
    let until: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sluice_writer_partitions_until_timestamp_seconds "))
        .ok_or_else(|| anyhow::anyhow!("no partitions-until gauge in /metrics:\n{text}"))?
        .trim()
        .parse()?;
    let now = Utc::now().timestamp() as f64;
    assert!(
        until > now + 62.0 * 86400.0,
        "partitions ensured until {until}, now {now}"
    );
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_the_open_batch_and_exits_cleanly() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let db = env.db.client().await?;
    let log = ServiceLog::new(&format!("{}writer", env.prefix));
    let brokers = &Stack::get().kafka_brokers;
    let mut child = writer_command(&env.db.url, brokers, &env.prefix, &env.group, log.path())?
        // A batch that waits a minute: only the drain can store it in time.
        .env("SLUICE_WRITER_FLUSH_INTERVAL_MS", "60000")
        .spawn()?;
    // Let it join the group, then give it messages that sit in its open batch.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events: Vec<_> = (0..100)
        .map(|i| event(6, "t", &format!("m{i}"), Utc::now()))
        .collect();
    env.produce_events(&events).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
    assert_eq!(before, 0, "the batch is still open");
    let pid = child.id().context("no pid")?;
    let sent = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await?;
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .context("no exit within 20 s of SIGTERM")??;
    assert!(status.success(), "exit status {status}");
    let after: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
    assert_eq!(after, 100, "the drain stored the open batch");
    Ok(())
}
