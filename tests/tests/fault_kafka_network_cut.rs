//! The network between a service and Kafka cut under a steady load, with the broker itself up:
//! a private broker whose clients stay behind a TCP proxy of the test's own
//! ([`PrivateKafka::start_behind_proxy`]), so every connection of the service under test
//! (bootstrap, partition leaders, group coordinator) passes the proxy, while the other service
//! and the test's own checks reach the broker directly.
//!
//! - The collector's link, first cut (connections reset, new ones refused), then black-holed
//!   (nothing passes, nothing is closed, as in a partition): meanwhile every request is answered
//!   503 with `Retry-After`, never 200, and `/readyz` says not ready; after each restore the
//!   collector accepts again by itself. A writer on the direct path stores what was
//!   acknowledged, and at the end every acknowledged message is a row of `event` and a record
//!   of the event topic, exactly once.
//! - The writer's link, first black-holed for longer than its consumer session (the broker
//!   evicts it from the group mid-stream), then cut: the writer stays up, reports not ready,
//!   rejoins and catches up, and every acknowledged message is a row exactly once.
//!
//! Each test runs a broker, a collector, a writer and a load on two shared cores, so the tests
//! of this file take turns instead of running side by side.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sluice_tests::faults::{
    message_ids_in_topic, reconcile, settle_in_table, Load, ReadinessWatch,
};
use sluice_tests::ingest::{account, Collector};
use sluice_tests::private::{free_port, PrivateKafka, TcpProxy};
use sluice_tests::writer::{event_rows, writer_command, RunningWriter};
use sluice_tests::{unique_name, ServiceLog, TestDb};

/// One test of this file at a time (see the header).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The collector's produce timeout: a request waits this long for Kafka, then gets 503.
const PRODUCE_TIMEOUT_MS: u64 = 2_000;

/// After the link goes, how long a request whose acknowledgements had already arrived may
/// still take to be answered. A 200 after it would acknowledge data Kafka did not take.
const GRACE: Duration = Duration::from_millis(1_500);

/// How a link goes down.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// [`TcpProxy::cut`]: connections reset, new ones refused.
    Cut,
    /// [`TcpProxy::blackhole`]: connections silent, new ones unanswered.
    Blackhole,
}

impl Fault {
    fn apply(self, proxy: &TcpProxy) {
        match self {
            Fault::Cut => proxy.cut(),
            Fault::Blackhole => proxy.blackhole(),
        }
    }
}

/// Requests answered 200 in a status count.
fn ok(statuses: &BTreeMap<u16, usize>) -> usize {
    statuses.get(&200).copied().unwrap_or(0)
}

/// What one outage of the collector's link measured.
#[derive(Debug)]
struct CollectorOutage {
    /// Requests answered 200 from [`GRACE`] after the fault until the restore: must be 0.
    ok_while_down: usize,
    /// Requests answered 503 from the fault until the restore.
    refused_while_down: usize,
    /// `/readyz` answered "not ready" at least once while the link was down.
    unready_while_down: bool,
    /// From the restore to the first probe that found the collector ready again.
    ready_again_after: Option<Duration>,
    /// From the restore to the first request answered 200 again.
    accepting_again_after: Option<Duration>,
}

/// Takes the collector's link down for `length` under the running load, restores it, and
/// waits until the collector accepts again.
async fn collector_outage(
    proxy: &TcpProxy,
    load: &Load,
    ready: &ReadinessWatch,
    fault: Fault,
    length: Duration,
) -> Result<CollectorOutage> {
    let before = load.statuses_so_far().await;
    let down = Instant::now();
    fault.apply(proxy);
    tokio::time::sleep(GRACE).await;
    let settled = load.statuses_so_far().await;
    tokio::time::sleep(length.saturating_sub(GRACE)).await;
    let end = load.statuses_so_far().await;
    let restored = Instant::now();
    proxy.restore();
    let mut accepting_again_after = None;
    while restored.elapsed() < Duration::from_secs(60) {
        if ok(&load.statuses_so_far().await) > ok(&end) {
            accepting_again_after = Some(restored.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = |m: &BTreeMap<u16, usize>, s: u16| m.get(&s).copied().unwrap_or(0);
    Ok(CollectorOutage {
        ok_while_down: ok(&end) - ok(&settled),
        refused_while_down: count(&end, 503) - count(&before, 503),
        unready_while_down: ready.not_ready_between(down, restored),
        ready_again_after: ready.ready_after(restored, Duration::from_secs(60)).await,
        accepting_again_after,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_cut_from_kafka_answers_503_never_200_and_loses_nothing() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (kafka, proxy) = PrivateKafka::start_behind_proxy().await?;
    let db = TestDb::migrated().await?;
    let acct = account(&db, "kafka-cut").await?;
    let mut config = Collector::config_for_load(&db);
    config.kafka_args.kafka_brokers = proxy.addr().to_string();
    config.produce_timeout_ms = PRODUCE_TIMEOUT_MS;
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;
    let mut wconfig =
        sluice_writer::Config::for_tests(&kafka.brokers(), &db.url, &prefix, &unique_name("g"));
    wconfig.flush_interval_ms = 100;
    let writer = RunningWriter::start(wconfig);
    let ready = ReadinessWatch::start(
        format!("http://{}/readyz", collector.metrics_addr),
        Duration::from_millis(250),
    );

    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "kc", 4, 25);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = load.acked_so_far().await;
    let cut = collector_outage(&proxy, &load, &ready, Fault::Cut, Duration::from_secs(12)).await?;
    eprintln!("cut 12 s: {cut:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let hole = collector_outage(
        &proxy,
        &load,
        &ready,
        Fault::Blackhole,
        Duration::from_secs(12),
    )
    .await?;
    eprintln!("black hole 12 s: {hole:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    eprintln!(
        "load: {} messages acknowledged, statuses {:?}, {} without an answer, {} 503s with Retry-After",
        report.acked.len(),
        report.statuses,
        report.transport_errors,
        report.retry_after_503
    );

    assert!(before > 500, "load ran before the cut ({before} acked)");
    for outage in [&cut, &hole] {
        assert_eq!(
            outage.ok_while_down, 0,
            "200 answered while the collector could not reach Kafka: {outage:?}"
        );
        assert!(outage.refused_while_down > 0, "503 meanwhile: {outage:?}");
        assert!(
            outage.unready_while_down,
            "/readyz said not ready meanwhile: {outage:?}"
        );
        assert!(
            outage.ready_again_after.is_some() && outage.accepting_again_after.is_some(),
            "ready and accepting again within 60 s of the restore: {outage:?}"
        );
    }
    assert!(
        report.statuses.keys().all(|s| *s == 200 || *s == 503),
        "only 200 and 503: {:?}",
        report.statuses
    );
    assert_eq!(report.transport_errors, 0, "every request was answered");
    assert_eq!(
        report.retry_after_503,
        report.count(503),
        "every 503 has Retry-After"
    );

    // On Kafka: the idempotent producer wrote nothing twice across reconnections.
    let on_topic = message_ids_in_topic(
        &kafka.brokers(),
        &collector.topics.event,
        report.acked.len(),
        Duration::from_secs(60),
    )
    .await?;
    let topic = reconcile(&report, &on_topic);
    // In PostgreSQL, through the writer.
    let table = settle_in_table(&db.client().await?, &report, Duration::from_secs(120)).await?;
    eprintln!("collector's Kafka link cut and black-holed: topic {topic:?}, table {table:?}");
    assert_eq!(topic.lost, 0, "acknowledged messages not on Kafka");
    assert_eq!(topic.duplicates, 0, "messages on Kafka twice");
    assert_eq!(table.lost, 0, "acknowledged messages not stored");
    assert_eq!(table.duplicates, 0, "messages stored twice");
    writer.stop().await?;
    collector.stop().await?;
    Ok(())
}

/// What one outage of the writer's link measured.
#[derive(Debug)]
struct WriterOutage {
    /// Rows stored from [`GRACE`] after the fault until the restore (from batches fetched
    /// before it; the writer cannot fetch more).
    rows_while_down: i64,
    /// Messages acknowledged by the collector meanwhile: the backlog the writer must catch up.
    acked_while_down: usize,
    /// `/readyz` answered "not ready" at least once while the link was down.
    unready_while_down: bool,
    /// From the restore to the first probe that found the writer ready again.
    ready_again_after: Option<Duration>,
    /// From the restore until the rows caught up with what was acknowledged by the restore.
    caught_up_after: Option<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_cut_from_kafka_rejoins_and_stores_everything_once() -> Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (kafka, proxy) = PrivateKafka::start_behind_proxy().await?;
    let db = TestDb::migrated().await?;
    let acct = account(&db, "kafka-cut-writer").await?;
    let mut config = Collector::config_for_load(&db);
    config.kafka_args.kafka_brokers = kafka.brokers();
    let prefix = config.topic_prefix.clone();
    let collector = Collector::start(config).await?;

    // The real binary: its Kafka client is alone in its process, and it is the deployment's.
    let metrics_port = free_port()?;
    let log = ServiceLog::new(&format!("{prefix}writer"));
    let brokers = proxy.addr().to_string();
    let mut writer = writer_command(&db.url, &brokers, &prefix, &unique_name("g"), log.path())?
        .env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .spawn()
        .context("starting sluice-writer (cargo build -p sluice-writer --bins)")?;
    let ready = ReadinessWatch::start(
        format!("http://127.0.0.1:{metrics_port}/readyz"),
        Duration::from_millis(250),
    );
    let client = db.client().await?;
    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "wc", 4, 25);

    let outcome = async {
        // The writer starts slower than the load (migrations checked, month partitions made,
        // group joined): cut only once it is storing.
        let started = Instant::now();
        while event_rows(&client).await? < 1_000 {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the writer stored under 1,000 rows in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stored_before = event_rows(&client).await?;
        let mut outages = Vec::new();
        // Longer than the writer's consumer session (10 s): the broker evicts it mid-stream.
        for (fault, length) in [
            (Fault::Blackhole, Duration::from_secs(14)),
            (Fault::Cut, Duration::from_secs(8)),
        ] {
            let down = Instant::now();
            fault.apply(&proxy);
            tokio::time::sleep(GRACE).await;
            let (rows, acked) = (event_rows(&client).await?, load.acked_so_far().await);
            tokio::time::sleep(length.saturating_sub(GRACE)).await;
            if writer.try_wait()?.is_some() {
                bail!("the writer exited while cut from Kafka");
            }
            let (rows_end, acked_end) = (event_rows(&client).await?, load.acked_so_far().await);
            let restored = Instant::now();
            proxy.restore();
            let mut caught_up_after = None;
            while restored.elapsed() < Duration::from_secs(90) {
                if event_rows(&client).await? >= acked_end as i64 {
                    caught_up_after = Some(restored.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let outage = WriterOutage {
                rows_while_down: rows_end - rows,
                acked_while_down: acked_end - acked,
                unready_while_down: ready.not_ready_between(down, restored),
                ready_again_after: ready.ready_after(restored, Duration::from_secs(60)).await,
                caught_up_after,
            };
            eprintln!(
                "{fault:?} {length:?}: {} rows stored meanwhile from earlier fetches, {outage:?}",
                outage.rows_while_down
            );
            outages.push(outage);
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let report = load.finish().await;
        let r = settle_in_table(&client, &report, Duration::from_secs(120)).await?;
        Ok((stored_before, outages, report, r))
    }
    .await;
    let alive = writer.try_wait()?.is_none();
    let _ = writer.start_kill();
    let (stored_before, outages, report, r) =
        outcome.inspect_err(|_| eprintln!("writer log tail:\n{}", log.tail(40)))?;
    eprintln!(
        "writer's Kafka link black-holed and cut: {r:?}, {stored_before} rows before, statuses {:?}",
        report.statuses
    );
    assert!(alive, "the writer stayed up through both outages");
    assert!(
        report.statuses.keys().all(|s| *s == 200),
        "the collector, on the direct path, only answered 200: {:?}",
        report.statuses
    );
    for outage in &outages {
        assert!(
            outage.unready_while_down,
            "the writer's /readyz said not ready meanwhile: {outage:?}"
        );
        assert!(
            outage.ready_again_after.is_some() && outage.caught_up_after.is_some(),
            "ready again and caught up after the restore: {outage:?}"
        );
        assert!(
            outage.acked_while_down > 0,
            "load went on meanwhile: {outage:?}"
        );
    }
    if r.lost != 0 || r.duplicates != 0 {
        eprintln!("writer log tail:\n{}", log.tail(40));
    }
    assert_eq!(r.lost, 0, "acknowledged messages not stored");
    assert_eq!(r.duplicates, 0, "messages stored twice");
    collector.stop().await?;
    Ok(())
}
