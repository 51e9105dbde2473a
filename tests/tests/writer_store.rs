//! The writer stores what it consumes where it belongs: events in their month and tenant leaf
//! (creating a missing month), visitors and sessions merged whatever the arrival order, client
//! retries once, poison messages dead-lettered without blocking their partition.
//! Real Kafka, real PostgreSQL.

use std::time::Duration;

use anyhow::Result;
use chrono::{Datelike, Duration as Days, TimeZone, Utc};
use sluice_schema::partitions;
use sluice_tests::query_scalar;
use sluice_tests::writer::{event, session, visitor, wait_for_count, RunningWriter, WriterEnv};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_their_month_and_tenant_leaf() -> Result<()> {
    let env = WriterEnv::new(2).await?;
    let writer = RunningWriter::start(env.config());
    let now = Utc::now();
    let mut events = Vec::new();
    for tenant in [1_i64, 2, 3, 77] {
        for i in 0..50 {
            events.push(event(
                tenant,
                &format!("a{i}"),
                &format!("m-{tenant}-{i}"),
                now,
            ));
        }
    }
    env.produce_events(&events).await?;
    let db = env.db.client().await?;
    wait_for_count(&db, "SELECT count(*) FROM event", 200, WAIT).await?;

    let month = partitions::month_table_name(now.date_naive());
    let rows = db
        .query(
            "SELECT tenant_id, tableoid::regclass::text, count(*) FROM event GROUP BY 1, 2 ORDER BY 1",
            &[],
        )
        .await?;
    assert_eq!(
        rows.len(),
        4,
        "each tenant's events sit in exactly one leaf"
    );
    for row in rows {
        let (tenant, leaf, n): (i64, String, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(n, 50);
        let remainder: i32 = leaf
            .strip_prefix(&format!("{month}_p"))
            .unwrap_or_else(|| panic!("{leaf} is not a leaf of {month}"))
            .parse()?;
        // PostgreSQL's own hash routing agrees that the tenant belongs in that leaf.
        let ok: bool = db
            .query_one(
                &format!("SELECT satisfies_hash_partition('{month}'::regclass, 8, $1, $2::bigint)"),
                &[&remainder, &tenant],
            )
            .await?
            .get(0);
        assert!(ok, "tenant {tenant} in {leaf}");
    }
    // Values round-trip through the hand-made binary COPY.
    let row = db
        .query_one(
            "SELECT type, name, properties->>'plan', (properties->>'n')::int, host(ip), user_agent, \
             occurred_at, message_id FROM event WHERE tenant_id = 77 AND message_id = 'm-77-3'",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "track");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("Signed Up")
    );
    assert_eq!(row.get::<_, String>(2), "pro");
    assert_eq!(row.get::<_, i32>(3), 42);
    assert_eq!(row.get::<_, String>(4), "203.0.113.7");
    assert_eq!(row.get::<_, String>(5), "Mozilla/5.0 (test)");
    let stored: chrono::DateTime<Utc> = row.get(6);
    assert_eq!(stored.timestamp_micros(), now.timestamp_micros());
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_for_a_month_without_partition_gets_it_created_and_stored() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let writer = RunningWriter::start(env.config());
    // Two months back: inside retention, never created ahead.
    let now = Utc::now();
    let back = now
        .date_naive()
        .with_day(1)
        .and_then(|d| d.checked_sub_months(chrono::Months::new(2)));
    let when = Utc.from_utc_datetime(&back.expect("a date").and_hms_opt(12, 0, 0).expect("noon"));
    let table = partitions::month_table_name(when.date_naive());
    let db = env.db.client().await?;
    env.produce_events(&[event(5, "old", "m-old", when)])
        .await?;
    wait_for_count(&db, "SELECT count(*) FROM event", 1, WAIT).await?;
    let leaf: String = query_scalar(&db, "SELECT tableoid::regclass::text FROM event").await?;
    assert!(leaf.starts_with(&format!("{table}_p")), "{leaf}");
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visitor_and_session_merges_hold_across_batches_and_out_of_order() -> Result<()> {
    let env = WriterEnv::new(1).await?;
    let writer = RunningWriter::start(env.config());
    let t0 = Utc::now() - Days::hours(5);
    let h = Days::hours;
    let db = env.db.client().await?;
    let topic = env.topics.visitor.clone();
    // Latest first, then an earlier one (out of order), in separate batches.
    env.produce_json(
        &topic,
        "1/v",
        &visitor(1, "v", t0 + h(3), t0 + h(4), 2, "late"),
    )
    .await?;
    wait_for_count(&db, "SELECT count(*) FROM visitor", 1, WAIT).await?;
    env.produce_json(&topic, "1/v", &visitor(1, "v", t0, t0 + h(1), 3, "early"))
        .await?;
    // And two in one batch, one of them the new latest.
    env.produce_json(
        &topic,
        "1/v",
        &visitor(1, "v", t0 + h(2), t0 + h(5), 1, "mid"),
    )
    .await?;
    env.produce_json(
        &topic,
        "1/v",
        &visitor(1, "v", t0 + h(1), t0 + h(2), 4, "mid2"),
    )
    .await?;
    // All four merged: the earliest first seen and the latest last seen. The counters stay
    // 0: they count stored events (none here), not what visitor messages claim.
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM visitor WHERE anonymous_id = 'v' AND event_count = 0 \
             AND first_seen_at = '{}' AND last_seen_at = '{}'",
            t0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            (t0 + h(5)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ),
        1,
        WAIT,
    )
    .await?;
    let row = db
        .query_one(
            "SELECT first_seen_at, last_seen_at, first_utm->>'source', first_referrer FROM visitor \
             WHERE tenant_id = 1 AND anonymous_id = 'v'",
            &[],
        )
        .await?;
    let first: chrono::DateTime<Utc> = row.get(0);
    let last: chrono::DateTime<Utc> = row.get(1);
    assert_eq!(first.timestamp_micros(), t0.timestamp_micros());
    assert_eq!(last.timestamp_micros(), (t0 + h(5)).timestamp_micros());
    assert_eq!(
        row.get::<_, String>(2),
        "early",
        "first touch comes from the earliest message"
    );
    assert_eq!(
        row.get::<_, Option<String>>(3).as_deref(),
        Some("https://early.example/")
    );

    let topic = env.topics.session.clone();
    env.produce_json(
        &topic,
        "1/a-1",
        &session(1, "s", t0 + h(2), t0 + h(3), 5, 2, "second"),
    )
    .await?;
    env.produce_json(
        &topic,
        "1/a-1",
        &session(1, "s", t0, t0 + h(1), 1, 1, "first"),
    )
    .await?;
    wait_for_count(
        &db,
        &format!(
            "SELECT count(*) FROM session WHERE session_id = 's' AND event_count = 0 \
             AND started_at = '{}'",
            t0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ),
        1,
        WAIT,
    )
    .await?;
    let row = db
        .query_one(
            "SELECT started_at, last_seen_at, page_count, utm->>'source', landing_page FROM session \
             WHERE tenant_id = 1 AND session_id = 's'",
            &[],
        )
        .await?;
    assert_eq!(
        row.get::<_, chrono::DateTime<Utc>>(0).timestamp_micros(),
        t0.timestamp_micros()
    );
    assert_eq!(
        row.get::<_, chrono::DateTime<Utc>>(1).timestamp_micros(),
        (t0 + h(3)).timestamp_micros()
    );
    assert_eq!(
        row.get::<_, i64>(2),
        0,
        "pages are counted from stored events"
    );
    assert_eq!(row.get::<_, String>(3), "first");
    assert_eq!(
        row.get::<_, Option<String>>(4).as_deref(),
        Some("https://first.example/")
    );
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_retry_of_a_message_id_is_stored_once() -> Result<()> {
    let env = WriterEnv::new(2).await?;
    let writer = RunningWriter::start(env.config());
    let db = env.db.client().await?;
    let now = Utc::now();
    let first = event(9, "r", "retried", now);
    // The retry's skew correction differs by a few milliseconds: another primary key.
    let mut retry = first.clone();
    retry.occurred_at = now + Days::milliseconds(7);
    env.produce_events(&[first.clone(), retry.clone()]).await?;
    env.produce_events(&[event(9, "r", "other", now)]).await?;
    wait_for_count(&db, "SELECT count(*) FROM event_dedup", 2, WAIT).await?;
    // Later, in another batch.
    env.produce_events(&[retry]).await?;
    env.produce_events(&[event(9, "r", "marker", now)]).await?;
    wait_for_count(&db, "SELECT count(*) FROM event_dedup", 3, WAIT).await?;
    let n: i64 = query_scalar(
        &db,
        "SELECT count(*) FROM event WHERE message_id = 'retried'",
    )
    .await?;
    assert_eq!(n, 1);
    let total: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
    assert_eq!(total, 3);
    writer.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_go_to_the_dlq_with_headers_and_the_partition_keeps_flowing() -> Result<()>
{
    let env = WriterEnv::new(1).await?;
    let writer = RunningWriter::start(env.config());
    let db = env.db.client().await?;
    let now = Utc::now();
    let ev = env.topics.event.clone();
    env.produce_events(&[event(3, "p", "before", now)]).await?;
    env.produce_raw(&ev, "3/p", b"{not json").await?;
    let mut v2 = serde_json::to_value(event(3, "p", "v2", now))?;
    v2["v"] = 2.into();
    env.produce_raw(&ev, "3/p", &serde_json::to_vec(&v2)?)
        .await?;
    env.produce_events(&[event(3, "p", "ancient", now - Days::days(1000))])
        .await?;
    let mut nul = event(3, "p", "nul", now);
    nul.name = Some("a\u{0}b".into());
    env.produce_events(&[nul]).await?;
    // A session PostgreSQL refuses (last seen before start: a CHECK): found by splitting.
    let bad_session = session(3, "bad", now, now - Days::hours(1), 1, 1, "x");
    let good_session = session(3, "good", now - Days::hours(1), now, 1, 1, "x");
    env.produce_json(&env.topics.session, "3/a-1", &bad_session)
        .await?;
    env.produce_json(&env.topics.session, "3/a-1", &good_session)
        .await?;
    env.produce_events(&[event(3, "p", "after", now)]).await?;

    wait_for_count(&db, "SELECT count(*) FROM event", 2, WAIT).await?;
    // The events' own session (s-p) is counted from them; of the two session messages only
    // the good one is stored.
    wait_for_count(
        &db,
        "SELECT count(*) FROM session WHERE session_id IN ('good', 's-p')",
        2,
        WAIT,
    )
    .await?;
    wait_for_count(&db, "SELECT count(*) FROM session", 2, WAIT).await?;
    let names: Vec<String> = db
        .query("SELECT message_id FROM event ORDER BY message_id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["after", "before"]);

    let dead = env.read_dlq(5, WAIT).await?;
    for d in &dead {
        assert!(
            d.topic == env.topics.event || d.topic == env.topics.session,
            "{d:?}"
        );
        assert_eq!(d.partition, 0);
        assert!(!d.detail.is_empty());
    }
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "invalid",
            "malformed",
            "out_of_retention",
            "rejected_by_database",
            "unsupported_version"
        ]
    );
    // Offsets name the original messages: the malformed value was the event topic's 2nd, the
    // refused session the session topic's 1st.
    assert_eq!(
        (dead[1].topic.as_str(), dead[1].offset),
        (env.topics.event.as_str(), 1)
    );
    assert_eq!(
        (dead[3].topic.as_str(), dead[3].offset),
        (env.topics.session.as_str(), 0)
    );
    writer.stop().await
}
