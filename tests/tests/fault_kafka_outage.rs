//! A private Kafka broker is stopped in the middle of a steady load and started again. While it
//! is down the collector answers 503 with `Retry-After` (never 200: nothing unstored is
//! acknowledged); afterwards it accepts again by itself, and every message it acknowledged,
//! before, during or after the outage, is on the broker exactly once.
//! The shared broker is never stopped: this test runs its own (tests/src/private.rs).

use std::time::Duration;

use anyhow::Result;
use sluice_tests::faults::{message_ids_in_topic, reconcile, Load};
use sluice_tests::ingest::{account, Collector};
use sluice_tests::private::PrivateKafka;
use sluice_tests::TestDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_means_503_never_200_and_nothing_acknowledged_is_lost() -> Result<()> {
    let kafka = PrivateKafka::start().await?;
    let db = TestDb::migrated().await?;
    let acct = account(&db, "kafka-outage").await?;
    let mut config = Collector::config_for_load(&db);
    config.kafka_args.kafka_brokers = kafka.brokers();
    config.produce_timeout_ms = 2_000;
    let collector = Collector::start(config).await?;

    let load = Load::paced(&collector.url(""), &acct.key.plaintext, "ko", 4, 10);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = load.statuses_so_far().await;
    kafka.stop().await?;
    let stopped_at = load.statuses_so_far().await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = load.statuses_so_far().await;
    kafka.start_again().await?;
    // Back to accepting by itself within a minute.
    let mut recovered = false;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = load.statuses_so_far().await;
        if now.get(&200).copied().unwrap_or(0) > during.get(&200).copied().unwrap_or(0) + 20 {
            recovered = true;
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.finish().await;
    eprintln!(
        "before {before:?}, when stopped {stopped_at:?}, after 12 s down {during:?}, end {:?}",
        report.statuses
    );
    assert!(
        before.get(&200).copied().unwrap_or(0) > 20,
        "load ran before the outage"
    );
    let ok_down =
        during.get(&200).copied().unwrap_or(0) - stopped_at.get(&200).copied().unwrap_or(0);
    assert_eq!(ok_down, 0, "200 answered while the only broker was down");
    assert!(report.count(503) > 0, "503 while the broker was down");
    assert_eq!(
        report.retry_after_503,
        report.count(503),
        "every 503 has Retry-After"
    );
    assert!(
        report.statuses.keys().all(|s| *s == 200 || *s == 503),
        "only 200 and 503: {:?}",
        report.statuses
    );
    assert!(
        recovered,
        "the collector accepts again after the broker is back"
    );

    let stored = message_ids_in_topic(
        &kafka.brokers(),
        &collector.topics.event,
        report.acked.len(),
        Duration::from_secs(60),
    )
    .await?;
    let r = reconcile(&report, &stored);
    eprintln!("Kafka outage: {r:?}");
    assert_eq!(r.lost, 0, "acknowledged messages lost");
    assert_eq!(r.duplicates, 0, "messages on Kafka twice");
    collector.stop().await?;
    Ok(())
}
