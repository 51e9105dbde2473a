//! Writer benchmarks (not timed tests; figures go to docs/benchmarks.md and docs/writer.md).
//!
//! ```sh
//! SLUICE_BENCH_DATABASE_URL=postgres://sluice@127.0.0.1:54320/sluice \
//! SLUICE_BENCH_KAFKA_BROKERS=127.0.0.1:19092 \
//! cargo bench -p sluice-writer --bench writer -- [copy|e2e|all] [ROWS]
//! ```
//!
//! - `copy`: the same event rows COPYed five ways into a fresh migrated database with one
//!   month of 8 hash leaves: psql's `\copy ... (FORMAT binary)` of the writer's own encoding
//!   (the machine's limit), hand-encoded chunks through `CopyInSink` into the parent and into
//!   the computed leaves, tokio-postgres' `BinaryCopyInWriter` into the parent, and the cost of
//!   the `event_dedup` claim alone.
//! - `e2e`: a topic pre-filled with ROWS events, then a writer started on it; rows/s from start
//!   to the last row visible, against psql's COPY of the identical rows into the same table.
//!   With `SLUICE_BENCH_FILL_ROWS=20000000`, `event` and `event_dedup` first hold that many
//!   rows (a steady state; the fill takes minutes and prints its progress), and with
//!   `SLUICE_BENCH_E2E_DATABASE_URL` it runs on that database instead of a fresh one.
//!
//! `SLUICE_BENCH_SQL`, when set, runs on each fresh database after the migrations: a setting
//! to try before it becomes a migration.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::Utc;
use common::{
    connect, dedup_claim, drop_db, env, events, fresh_db, kafka_properties, psql_copy, rate, reset,
    unique, FIRST_TENANT,
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sluice_schema::messages::EventMessage;
use sluice_schema::topics::{message_key, Topics};
use sluice_writer::copy;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::Client;

async fn hand_parent(client: &mut Client, evs: &[EventMessage]) -> Result<Duration> {
    let started = Instant::now();
    let tx = client.transaction().await?;
    let chunks = copy::encode_events(evs);
    copy::send(&tx, copy::COPY_EVENT, chunks).await?;
    tx.commit().await?;
    Ok(started.elapsed())
}

async fn hand_leaf(
    client: &mut Client,
    evs: &[EventMessage],
    leaf_of: &HashMap<i64, String>,
) -> Result<Duration> {
    let started = Instant::now();
    let mut by_leaf: HashMap<&str, Vec<&EventMessage>> = HashMap::new();
    for e in evs {
        by_leaf
            .entry(leaf_of[&e.tenant_id].as_str())
            .or_default()
            .push(e);
    }
    let tx = client.transaction().await?;
    for (leaf, rows) in by_leaf {
        copy::send(&tx, &copy::copy_event_into(leaf), copy::encode_events(rows)).await?;
    }
    tx.commit().await?;
    Ok(started.elapsed())
}

async fn generic_writer(client: &mut Client, evs: &[EventMessage]) -> Result<Duration> {
    let started = Instant::now();
    let tx = client.transaction().await?;
    let sink = tx.copy_in(copy::COPY_EVENT).await?;
    let types = [
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::UUID,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::JSONB,
        Type::JSONB,
        Type::INET,
        Type::TEXT,
        Type::BOOL,
    ];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    for e in evs {
        let ip: Option<std::net::IpAddr> = e.ip.as_deref().and_then(|s| s.parse().ok());
        let props = Json(&e.properties);
        let ctx = Json(&e.context);
        let row: [&(dyn ToSql + Sync); 18] = [
            &e.tenant_id,
            &e.occurred_at,
            &e.event_id,
            &e.workspace_id,
            &e.kind.as_str(),
            &e.name,
            &e.anonymous_id,
            &e.user_id,
            &e.session_id,
            &e.message_id,
            &e.received_at,
            &e.sent_at,
            &e.timestamp,
            &props,
            &ctx,
            &ip,
            &e.user_agent,
            &e.bot,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    tx.commit().await?;
    Ok(started.elapsed())
}

async fn copy_bench(admin_url: &str, n: usize) -> Result<()> {
    let url = fresh_db(admin_url).await?;
    let mut client = connect(&url).await?;
    let evs = events(n);
    let bytes = copy::encode_events(&evs)
        .iter()
        .map(|c| c.len())
        .sum::<usize>();
    println!("copy: {n} events, {} bytes/row in binary COPY", bytes / n);
    // Leaf of each tenant, from PostgreSQL's own hash routing.
    let month = sluice_schema::partitions::month_table_name(Utc::now().date_naive());
    let mut leaf_of = HashMap::new();
    for tenant in FIRST_TENANT..FIRST_TENANT + 50 {
        let r: i32 = client
            .query_one(
                &format!("SELECT r FROM generate_series(0, 7) r WHERE satisfies_hash_partition('{month}'::regclass, 8, r, $1::bigint)"),
                &[&tenant],
            )
            .await?
            .get(0);
        leaf_of.insert(tenant, format!("{month}_p{r}"));
    }
    let mut results: Vec<(&str, Vec<f64>)> = Vec::new();
    for round in 0..3 {
        let mut add = |name: &'static str, took: Duration| match results
            .iter_mut()
            .find(|(n2, _)| *n2 == name)
        {
            Some((_, v)) => v.push(rate(n, took)),
            None => results.push((name, vec![rate(n, took)])),
        };
        reset(&client).await?;
        add("psql \\copy binary (limit)", psql_copy(&url, &evs).await?);
        reset(&client).await?;
        add(
            "hand-encoded, parent",
            hand_parent(&mut client, &evs).await?,
        );
        reset(&client).await?;
        add(
            "hand-encoded, computed leaves",
            hand_leaf(&mut client, &evs, &leaf_of).await?,
        );
        reset(&client).await?;
        add(
            "BinaryCopyInWriter, parent",
            generic_writer(&mut client, &evs).await?,
        );
        reset(&client).await?;
        add(
            "event_dedup claim alone",
            dedup_claim(&mut client, "event_dedup", &evs).await?,
        );
        eprintln!("round {round} done");
    }
    println!("| method | rows/s (median of 3) |\n| --- | ---: |");
    for (name, mut v) in results {
        v.sort_by(f64::total_cmp);
        println!("| {name} | {:.0} |", v[1]);
    }
    drop(client);
    drop_db(admin_url, &url).await
}

/// Deletes the benchmark's event rows (its tenants, from `from`) and vacuums: what follows
/// meets the table as it was.
async fn remove_rows(client: &Client, tenants: &[i64], from: chrono::DateTime<Utc>) -> Result<()> {
    client
        .execute(
            "DELETE FROM event WHERE tenant_id = ANY($1) AND occurred_at >= $2",
            &[&tenants, &from],
        )
        .await?;
    // One statement a call: VACUUM refuses the implicit transaction of a multi-statement string.
    client.batch_execute("VACUUM event").await?;
    client.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Rows the writer committed for `group` (its stored offsets, in the rows' transactions):
/// cheap to poll where `count(*)` of a filled `event` is not.
async fn committed(client: &Client, group: &str) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM writer_offset WHERE consumer_group = $1",
            &[&group],
        )
        .await?
        .get(0))
}

async fn e2e_bench(admin_url: &str, brokers: &str, n: usize, fill_rows: i64) -> Result<()> {
    // A database given (migrated; `loadtest/bench` passes its filled one) or a fresh one.
    let given = std::env::var("SLUICE_BENCH_E2E_DATABASE_URL").ok();
    let url = match &given {
        Some(url) => url.clone(),
        None => fresh_db(admin_url).await?,
    };
    let client = connect(&url).await?;
    if fill_rows > 0 {
        let report = sluice_loadtest::fill::fill(&client, fill_rows, |done, s| {
            eprintln!("fill: {done} of {fill_rows} rows and claims, {s:.0} s");
        })
        .await?;
        println!("fill: {report}");
    }
    let prefix = format!("{}.", unique("bench"));
    let topics = Topics::with_prefix(&prefix);
    let props = kafka_properties()?;
    let mut producer = ClientConfig::new();
    producer
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("compression.type", "lz4");
    props.apply(&mut producer);
    let producer: FutureProducer = producer.create()?;
    // Topics with the writer's defaults, created by a writer-like admin call.
    let mut admin = ClientConfig::new();
    admin.set("bootstrap.servers", brokers);
    props.apply(&mut admin);
    let admin_timeout = Duration::from_secs(30);
    sluice_schema::topics::create_missing(&admin, &topics.all(), 4, 1, admin_timeout).await?;
    let evs = events(n);
    let started = Instant::now();
    for chunk in evs.chunks(5_000) {
        let sends: Vec<_> = chunk
            .iter()
            .map(|e| {
                let key = message_key(e.tenant_id, e.anonymous_id.as_deref(), None);
                let payload = serde_json::to_vec(e).unwrap_or_default();
                let producer = producer.clone();
                let topic = topics.event.clone();
                async move {
                    producer
                        .send(
                            FutureRecord::to(&topic).key(&key).payload(&payload),
                            Duration::from_secs(60),
                        )
                        .await
                        .map_err(|(e, _)| e)
                }
            })
            .collect();
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    println!(
        "e2e: {n} events pre-filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let group = unique("bench");
    let mut config = sluice_writer::Config::for_tests(brokers, &url, &prefix, &group);
    let batch_rows = 20_000;
    config.batch_max_rows = batch_rows;
    config.flush_interval_ms = 500;
    config.lanes = env("SLUICE_WRITER_LANES", "2").parse()?;
    config.kafka_args.kafka_properties = env("SLUICE_KAFKA_PROPERTIES", "")
        .split(',')
        .map(str::to_owned)
        .collect();
    println!("e2e: writer with {} lanes", config.lanes);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let writer = tokio::spawn(sluice_writer::run(config, async move {
        let _ = stop_rx.await;
    }));
    let mut first: Option<(Instant, usize)> = None;
    loop {
        let c = committed(&client, &group).await?;
        if c > 0 && first.is_none() {
            first = Some((Instant::now(), c as usize));
        }
        if c as usize >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "writer too slow: {c} of {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    // Sustained: from the first committed batch to the last (start-up and group join excluded).
    let sustained = first.map(|(t, c)| rate(n - c, t.elapsed())).unwrap_or(0.0);
    if first.is_some_and(|(_, c)| c >= n) {
        eprintln!(
            "e2e: every row landed in the first commit seen: no sustained rate (0); give more rows than a batch holds ({batch_rows})"
        );
    }
    let _ = stop_tx.send(());
    writer.await??;
    let writer_rate = rate(n, took);
    // The limit goes into the same table: the benchmark's rows out, the fill kept.
    let from = evs
        .iter()
        .map(|e| e.occurred_at)
        .min()
        .unwrap_or_else(Utc::now);
    let tenants: Vec<i64> = (FIRST_TENANT..FIRST_TENANT + 50).collect();
    remove_rows(&client, &tenants, from).await?;
    let limit = rate(n, psql_copy(&url, &evs).await?);
    // The same database may be measured again (`loadtest/bench`): leave no benchmark rows.
    remove_rows(&client, &tenants, from).await?;
    client
        .execute("DELETE FROM visitor WHERE tenant_id = ANY($1)", &[&tenants])
        .await?;
    client
        .execute("DELETE FROM session WHERE tenant_id = ANY($1)", &[&tenants])
        .await?;
    println!("| writer, from a pre-filled topic, start to last row (includes group join) | {writer_rate:.0} rows/s |");
    println!("| writer, sustained (first batch visible to last) | {sustained:.0} rows/s |");
    println!("| psql \\copy (FORMAT binary) of the same rows | {limit:.0} rows/s |");
    println!("| ratio, sustained / limit | {:.2} |", sustained / limit);
    // Its topics go too (a pre-filled topic of 200,000 events is 100 MB of the broker's disk).
    sluice_schema::topics::delete(&admin, &topics.all(), admin_timeout).await?;
    drop(client);
    if given.is_none() {
        drop_db(admin_url, &url).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let (args, db) = common::start();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let brokers = env("SLUICE_BENCH_KAFKA_BROKERS", "127.0.0.1:19092");
    if matches!(what, "copy" | "all") {
        copy_bench(&db, n).await?;
    }
    if matches!(what, "e2e" | "all") {
        let fill_rows = env("SLUICE_BENCH_FILL_ROWS", "0").parse()?;
        e2e_bench(&db, &brokers, n, fill_rows).await?;
    }
    Ok(())
}
