//! The load test end to end through the real services: `sluice-loadtest run` drives an
//! in-process collector (real Kafka), a writer stores what it produced (real PostgreSQL), and
//! `verify`, following the ack file while the run goes on, finds every acknowledged event
//! stored exactly once. Then the same `verify` is shown to catch a lost and a duplicated row.

use std::time::Duration;

use base64::Engine as _;
use sluice_loadtest::generate::GeneratorConfig;
use sluice_loadtest::keys::create_tenants;
use sluice_loadtest::run::{run, Mode, RunConfig};
use sluice_loadtest::verify::{verify, VerifyConfig};
use sluice_tests::ingest::Collector;
use sluice_tests::writer::RunningWriter;
use sluice_tests::{unique_name, Stack, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_event_is_stored_once_and_verify_catches_loss_and_duplicates() {
    let db = TestDb::migrated().await.unwrap();
    let collector = Collector::start(Collector::config(&db)).await.unwrap();
    let mut writer_config = sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &collector.config.topic_prefix,
        &unique_name("g"),
    );
    writer_config.pii_args.pii_keys = format!(
        "k1={}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 32])
    );
    writer_config.pii_args.pii_active_key = "k1".into();
    let writer = RunningWriter::start(writer_config);

    let client = db.client().await.unwrap();
    let keys = create_tenants(&client, 3, "e2e").await.unwrap();
    let tenant_ids: Vec<i64> = keys.iter().map(|k| k.tenant_id.unwrap()).collect();
    let ack_file = std::env::temp_dir().join(format!("{}.acks", unique_name("loadtest_e2e")));
    let _ = std::fs::remove_file(&ack_file);

    // verify follows the ack file from the start, so it times each event's way to its row.
    let verify_config = VerifyConfig {
        ack_file: ack_file.clone(),
        database_url: db.url.clone(),
        follow: true,
        poll_interval: Duration::from_millis(100),
        timeout: Duration::from_secs(60),
        progress: false,
        latency_sample: 1,
    };
    let run_config = RunConfig {
        collector_url: format!("http://{}", collector.addr),
        mode: Mode::Open {
            rate_rps: 50.0,
            max_in_flight: 256,
        },
        duration: Duration::from_secs(4),
        max_requests: None,
        timeout: Duration::from_secs(10),
        generator: GeneratorConfig {
            seed: 42,
            keys: 3,
            batch_size: 1..=12,
            visitors_per_tenant: 50,
            ..GeneratorConfig::default()
        },
        run_id: format!("{:08x}", rand::random::<u32>()),
        ack_file: Some(ack_file.clone()),
        progress: false,
    };
    let follower = {
        let config = verify_config.clone();
        tokio::spawn(async move { verify(&config).await })
    };
    let report = run(run_config, keys, std::future::pending()).await.unwrap();
    let checked = follower.await.unwrap().unwrap();

    assert_eq!(report.requests_sent, 200);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(report.events_acked > 500, "{report:?}");
    assert!(checked.passed, "{checked}");
    assert_eq!(checked.acked, report.events_acked);
    assert_eq!((checked.missing, checked.duplicates), (0, 0), "{checked}");
    assert_eq!(checked.rows, report.events_acked, "{checked}");
    assert_eq!(
        checked.end_to_end.count + checked.seen_only_in_audit,
        checked.acked
    );
    // Following the run, every event was timed by the polls, not only found by the audit.
    assert_eq!(checked.seen_only_in_audit, 0, "{checked}");
    assert!(checked.end_to_end.p99_ms < 10_000.0, "{checked}");
    eprintln!("ack -> visible: {}", checked.end_to_end);
    let mut seen_tenants: Vec<i64> = checked.tenants.iter().map(|t| t.tenant_id).collect();
    seen_tenants.sort_unstable();
    let mut expected = tenant_ids.clone();
    expected.sort_unstable();
    assert_eq!(seen_tenants, expected, "traffic reached every tenant");
    // Zipf: the first key carries the most.
    let first = checked
        .tenants
        .iter()
        .find(|t| t.tenant_id == tenant_ids[0])
        .unwrap();
    assert!(
        checked.tenants.iter().all(|t| t.acked <= first.acked),
        "{checked}"
    );

    // Timing a sample: one event in four is polled for, every event is still audited.
    let sampled = verify(&VerifyConfig {
        follow: false,
        latency_sample: 4,
        ..verify_config.clone()
    })
    .await
    .unwrap();
    assert!(sampled.passed, "{sampled}");
    assert_eq!((sampled.acked, sampled.rows), (checked.acked, checked.rows));
    assert_eq!(sampled.latency_sample, 4);
    let timed = sampled.end_to_end.count + sampled.seen_only_in_audit;
    assert!(
        timed * 8 > sampled.acked && timed * 8 < sampled.acked * 3,
        "about a quarter timed: {timed} of {}",
        sampled.acked
    );

    // A lost row: verify must fail and name it.
    let lost: String = client
        .query_one(
            "DELETE FROM event WHERE tenant_id = $1 \
             AND event_id = (SELECT event_id FROM event WHERE tenant_id = $1 LIMIT 1) RETURNING message_id",
            &[&tenant_ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    let audit = VerifyConfig {
        follow: false,
        timeout: Duration::from_millis(300),
        ..verify_config
    };
    let lossy = verify(&audit).await.unwrap();
    assert!(!lossy.passed);
    assert_eq!((lossy.missing, lossy.duplicates), (1, 0), "{lossy}");
    assert_eq!(lossy.missing_examples, vec![lost.clone()]);

    // A duplicated row (same event id, occurred_at a millisecond apart, as a retry without
    // deduplication would store it): verify must fail on it too.
    client
        .execute(
            "INSERT INTO event SELECT tenant_id, occurred_at + interval '1 millisecond', event_id, workspace_id, type, name, \
             anonymous_id, user_id, session_id, message_id, received_at, sent_at, original_timestamp, properties, context, ip, \
             user_agent, bot FROM event WHERE tenant_id = $1 AND message_id <> $2 LIMIT 1",
            &[&tenant_ids[1], &lost],
        )
        .await
        .unwrap();
    let doubled = verify(&audit).await.unwrap();
    assert!(!doubled.passed);
    assert_eq!((doubled.missing, doubled.duplicates), (1, 1), "{doubled}");

    writer.stop().await.unwrap();
    collector.stop().await.unwrap();
    std::fs::remove_file(&ack_file).unwrap();
}

/// The benchmarks' steady state: `fill` adds the rows and claims it says, under tenants no
/// test or seed uses, every claim in a day partition the writer keeps, and leaves the tables
/// vacuumed (the planner's estimate is the row count); `top_up` adds only what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_adds_rows_and_claims_of_its_own_tenants_leaves_them_vacuumed_and_tops_up() {
    let db = TestDb::migrated().await.unwrap();
    let client = db.client().await.unwrap();
    let mut progress = Vec::new();
    let report = sluice_loadtest::fill::fill(&client, 2_500, |done, _| progress.push(done))
        .await
        .unwrap();
    assert_eq!(report.rows, 2_500);
    assert_eq!(progress, [2_500]);
    let scalar = |sql: &'static str| {
        let client = &client;
        async move {
            sluice_tests::query_scalar::<i64>(client, sql)
                .await
                .unwrap()
        }
    };
    assert_eq!(scalar("SELECT count(*) FROM event").await, 2_500);
    assert_eq!(scalar("SELECT count(*) FROM event_dedup").await, 2_500);
    assert_eq!(
        scalar("SELECT count(DISTINCT tenant_id) FROM event WHERE tenant_id >= 1000001 AND tenant_id <= 1000050").await,
        50
    );
    let vacuumed = scalar(
        "SELECT count(*) FROM pg_stat_user_tables WHERE relname LIKE 'event_y%' AND last_vacuum IS NOT NULL",
    )
    .await;
    assert!(vacuumed > 0, "the filled leaves were vacuumed");

    // Run again to the same size, a top-up finds the fill and adds nothing; to a larger one,
    // only the difference.
    use sluice_loadtest::fill::{held, top_up};
    assert_eq!(held(&client).await.unwrap(), 2_500);
    let again = top_up(&client, 2_500, |_, _| {}).await.unwrap();
    assert_eq!((again.held, again.rows), (2_500, 0));
    let more = top_up(&client, 3_000, |_, _| {}).await.unwrap();
    assert_eq!((more.held, more.rows), (2_500, 500));
    assert_eq!(scalar("SELECT count(*) FROM event").await, 3_000);
    assert_eq!(scalar("SELECT count(*) FROM event_dedup").await, 3_000);
    assert_eq!(held(&client).await.unwrap(), 3_000);
}
