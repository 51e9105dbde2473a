//! Faults: the writer process killed with SIGKILL mid-stream, and PostgreSQL stopped for 20 s
//! mid-stream. Afterwards every message is stored exactly once. The PostgreSQL test runs a
//! private cluster (the shared one must never stop); the kill test runs the real binary
//! (`cargo build -p sluice-writer --bins` first; deploy/local/test does).

use std::time::Duration;

use anyhow::{Context, Result};
use sluice_tests::private::{PrivateKafka, PrivatePostgres};
use sluice_tests::query_scalar;
use sluice_tests::writer::{assert_stored_exactly_once, writer_command, RunningWriter, WriterEnv};
use sluice_tests::{ServiceLog, Stack};
use tokio::process::Child;

/// Events streamed through the kill test.
const KILL_TEST_EVENTS: usize = 50_000;

fn spawn_writer(env: &WriterEnv, log: &std::path::Path) -> Result<Child> {
    let brokers = &Stack::get().kafka_brokers;
    writer_command(&env.db.url, brokers, &env.prefix, &env.group, log)?
        .env("SLUICE_WRITER_BATCH_MAX_ROWS", "2000")
        .spawn()
        .context("starting sluice-writer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_the_stream_loses_and_duplicates_nothing() -> Result<()> {
    let env = WriterEnv::new(4).await?;
    let db = env.db.client().await?;
    let log = ServiceLog::new(&env.group);
    let mut writer = spawn_writer(&env, log.path())?;
    let stream = env.stream(KILL_TEST_EVENTS, 5_000);
    let mut kills = Vec::new();
    let mut last = 0_i64;
    for _ in 0..4 {
        // Kill only once the new process is storing (past the rebalance), so each kill lands
        // mid-stream, with batches in flight.
        let started = std::time::Instant::now();
        loop {
            let stored: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
            if stored >= last + 3_000 || started.elapsed() > Duration::from_secs(60) {
                last = stored;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writer.start_kill()?; // SIGKILL: no drain, mid-batch
        writer.wait().await?;
        kills.push(last);
        writer = spawn_writer(&env, log.path())?;
    }
    eprintln!("killed with {kills:?} events stored");
    assert!(
        kills.windows(2).all(|w| w[0] < w[1])
            && *kills.last().unwrap_or(&0) < KILL_TEST_EVENTS as i64,
        "every kill landed mid-stream: {kills:?}"
    );
    stream.await??;
    let outcome =
        assert_stored_exactly_once(&db, KILL_TEST_EVENTS as i64, Duration::from_secs(240)).await;
    writer.start_kill()?;
    if outcome.is_err() {
        eprintln!("writer log tail:\n{}", log.tail(40));
    }
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_20_s_pauses_the_writer_which_then_catches_up() -> Result<()> {
    let pg = PrivatePostgres::start().await?;
    let env = WriterEnv::new(2).await?;
    {
        let mut client = sluice_tests::connect(&pg.url()).await?;
        sluice_schema::migrate::up(&mut client).await?;
    }
    let mut config = env.config();
    config.database_args.database_url = pg.url();
    config.retry_max_ms = 1_000;
    let writer = RunningWriter::start(config);
    let stream = env.stream(10_000, 1_000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.stop().await?;
    writer.outlasts(Duration::from_secs(20), "PostgreSQL").await;
    pg.start_again().await?;
    stream.await??;
    let db = sluice_tests::connect(&pg.url()).await?;
    assert_stored_exactly_once(&db, 10_000, Duration::from_secs(120)).await?;
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stopped_and_restarted_the_writer_reconnects_and_stores_everything_once() -> Result<()>
{
    let kafka = PrivateKafka::start().await?;
    let env = WriterEnv::new_on(&kafka.brokers(), 2).await?;
    let db = env.db.client().await?;
    let writer = RunningWriter::start(env.config());
    env.stream(3_000, 1_500).await??;
    assert_stored_exactly_once(&db, 3_000, Duration::from_secs(120)).await?;
    kafka.stop().await?;
    writer.outlasts(Duration::from_secs(10), "Kafka").await;
    kafka.start_again().await?;
    env.stream_from(3_000, 3_000, 1_500).await??;
    assert_stored_exactly_once(&db, 6_000, Duration::from_secs(180)).await?;
    writer.stop().await
}
