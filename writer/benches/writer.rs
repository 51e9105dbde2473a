//! Writer benchmarks (not timed tests; figures go to docs/benchmarks.md and docs/writer.md).
//!
//! ```sh
//! SLUICE_BENCH_DATABASE_URL=postgres://sluice@127.0.0.1:54320/sluice \
//! SLUICE_BENCH_KAFKA_BROKERS=127.0.0.1:19092 \
//! cargo bench -p sluice-writer --bench writer -- [copy|e2e|dedup|all] [ROWS]
//! ```
//!
//! - `copy`: the same event rows COPYed five ways into a fresh migrated database with one
//!   month of 8 hash leaves: psql's `\copy ... (FORMAT binary)` of the writer's own encoding
//!   (the machine's limit), hand-encoded chunks through `CopyInSink` into the parent and into
//!   the computed leaves, tokio-postgres' `BinaryCopyInWriter` into the parent, and the cost of
//!   the `event_dedup` claim alone.
//! - `dedup`: the claim of ROWS new events into claim tables already holding 0 and then
//!   `SLUICE_BENCH_DEDUP_FILL` (20,000,000) claims: the day-partitioned table keyed by client
//!   time against the earlier one keyed by random ids.
//! - `e2e`: a topic pre-filled with ROWS events, then a writer started on it; rows/s from start
//!   to the last row visible, against psql's COPY of the identical rows into the same table.
//!   With `SLUICE_BENCH_FILL_ROWS=20000000`, `event` and `event_dedup` first hold that many
//!   rows (a steady state; the fill takes minutes and prints its progress), and with
//!   `SLUICE_BENCH_E2E_DATABASE_URL` it runs on that database instead of a fresh one.
//!
//! `SLUICE_BENCH_SQL`, when set, runs on each fresh database after the migrations: a setting
//! to try before it becomes a migration.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sluice_schema::kafka::KafkaProperties;
use sluice_schema::messages::{self, EventMessage, EventType, JsonObject};
use sluice_schema::topics::{message_key, Topics};
use sluice_writer::copy;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::Client;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Utc::now().timestamp_micros())
}

/// The services' own connector, so a TLS URL (`sslmode=verify-full&sslrootcert=...`) works.
async fn connect(url: &str) -> Result<Client> {
    Ok(sluice_schema::db::connect(url).await?)
}

/// `url` with its database replaced, the query (TLS parameters) kept.
fn with_db(url: &str, db: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((url, query)) => (url, format!("?{query}")),
        None => (url, String::new()),
    };
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}{query}"),
        None => format!("{url}{query}"),
    }
}

/// `SLUICE_KAFKA_PROPERTIES` (TLS, SASL), as the services read it.
fn kafka_properties() -> Result<KafkaProperties> {
    Ok(KafkaProperties::parse_list(&env(
        "SLUICE_KAFKA_PROPERTIES",
        "",
    ))?)
}

/// A fresh migrated database with the current month's partition; returns its URL.
async fn fresh_db(admin_url: &str) -> Result<String> {
    let name = unique("bench");
    connect(admin_url)
        .await?
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = with_db(admin_url, &name);
    let mut client = connect(&url).await?;
    sluice_schema::migrate::up(&mut client).await?;
    sluice_schema::partitions::ensure_month(&client, Utc::now().date_naive(), 8).await?;
    // A setting to try before it becomes a migration (storage parameters, indexes).
    if let Ok(sql) = std::env::var("SLUICE_BENCH_SQL") {
        client.batch_execute(&sql).await?;
    }
    Ok(url)
}

/// Tenant ids of the benchmark's events: clear of the ones a stack's seed, the load test and
/// `sluice_loadtest::fill` use, so its rows can be told apart (and removed) in a shared database.
const FIRST_TENANT: i64 = 2_000_001;

/// Drops a database [`fresh_db`] made (the disk is shared: a filled one holds gigabytes).
async fn drop_db(admin_url: &str, url: &str) -> Result<()> {
    let name = url
        .split('?')
        .next()
        .and_then(|u| u.rsplit('/').next())
        .unwrap_or_default();
    anyhow::ensure!(
        name.starts_with("bench_"),
        "not a benchmark database: {name}"
    );
    connect(admin_url)
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// Events of ~460 bytes in binary form, 50 tenants, now.
fn events(n: usize) -> Vec<EventMessage> {
    let now = Utc::now();
    (0..n)
        .map(|i| {
            let tenant = FIRST_TENANT + (i % 50) as i64;
            let message_id = format!("bench-{i}");
            let mut properties = JsonObject::new();
            properties.insert("plan".into(), "pro".into());
            properties.insert("price".into(), (i as f64 * 0.01).into());
            properties.insert("sku".into(), format!("SKU-{:08}", i % 9973).into());
            properties.insert("path".into(), "/pricing/enterprise".into());
            let mut context = JsonObject::new();
            context.insert("locale".into(), "en-GB".into());
            context.insert(
                "page".into(),
                serde_json::json!({"url": "https://shop.example/pricing", "title": "Pricing"}),
            );
            context.insert(
                "library".into(),
                serde_json::json!({"name": "analytics.js", "version": "4.1.0"}),
            );
            EventMessage {
                v: messages::VERSION,
                tenant_id: tenant,
                workspace_id: tenant * 10,
                event_id: messages::event_id(tenant, &message_id),
                message_id,
                kind: EventType::Track,
                name: Some(["Signed Up", "Viewed Pricing", "Added To Cart"][i % 3].into()),
                anonymous_id: Some(format!("anon-{:06}", i % 20_000)),
                user_id: None,
                session_id: Some(format!("sess-{:06}", i % 40_000)),
                occurred_at: now - chrono::Duration::milliseconds((n - i) as i64),
                timestamp: Some(now),
                sent_at: Some(now),
                received_at: now,
                properties,
                context,
                ip: Some("203.0.113.9".into()),
                user_agent: Some(
                    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0".into(),
                ),
                bot: false,
            }
        })
        .collect()
}

async fn reset(client: &Client) -> Result<()> {
    client
        .batch_execute("TRUNCATE event, event_dedup; CHECKPOINT")
        .await?;
    Ok(())
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

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

/// The writer's claim of `evs` (binary COPY of key and id, 20,000 a statement) into `table`.
async fn dedup_claim(client: &mut Client, table: &str, evs: &[EventMessage]) -> Result<Duration> {
    let window = sluice_schema::dedup::Window { days: 7 };
    let now = Utc::now();
    let started = Instant::now();
    let tx = client.transaction().await?;
    let sql = format!("COPY {table} (key_ms, event_id) FROM STDIN (FORMAT binary)");
    for chunk in evs.chunks(20_000) {
        let sink = tx.copy_in(&sql).await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::UUID]);
        tokio::pin!(writer);
        for e in chunk {
            let key = window.key_ms(e.timestamp, e.received_at, now);
            writer.as_mut().write(&[&key, &e.event_id]).await?;
        }
        writer.finish().await?;
    }
    tx.commit().await?;
    Ok(started.elapsed())
}

/// The claim before migration 0007, for comparison: random event ids under a key of tenant
/// and id in one unpartitioned table.
async fn dedup_claim_by_id(client: &mut Client, evs: &[EventMessage]) -> Result<Duration> {
    let started = Instant::now();
    let tx = client.transaction().await?;
    for chunk in evs.chunks(20_000) {
        let sink = tx
            .copy_in("COPY claim_by_id (tenant_id, event_id) FROM STDIN (FORMAT binary)")
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::UUID]);
        tokio::pin!(writer);
        for e in chunk {
            writer.as_mut().write(&[&e.tenant_id, &e.event_id]).await?;
        }
        writer.finish().await?;
    }
    tx.commit().await?;
    Ok(started.elapsed())
}

/// Per-id cost of the dedup claim as the window fills: the claim of `n` new events into a
/// claim table already holding 0 and then `fill` claims, for the day-partitioned table keyed
/// by client time (0007) and for the earlier table keyed by random ids (0003's shape).
async fn dedup_bench(admin_url: &str, n: usize, fill: usize) -> Result<()> {
    let url = fresh_db(admin_url).await?;
    let mut client = connect(&url).await?;
    let now = Utc::now();
    for day in (sluice_schema::dedup::Window { days: 7 }).days_ahead(now) {
        sluice_schema::dedup::ensure_day(&client, day).await?;
    }
    client
        .batch_execute(
            "CREATE TABLE claim_by_id (tenant_id bigint NOT NULL, event_id uuid NOT NULL, \
             PRIMARY KEY (tenant_id, event_id))",
        )
        .await?;
    println!("dedup: claims of {n} new events, into tables holding 0 and then {fill} claims");
    println!("| claim table | holding | µs an id | ids/s |\n| --- | ---: | ---: | ---: |");
    let mut batch = 0;
    for holding in [0, fill] {
        if holding > 0 {
            let started = Instant::now();
            // The window's earlier claims: client times over the last days, ascending, as they
            // arrived; ids random, as name-based UUIDs are.
            let span_ms = 6 * sluice_schema::dedup::DAY_MS;
            let from = now.timestamp_millis() - span_ms;
            client
                .execute(
                    "INSERT INTO event_dedup (key_ms, event_id) \
                     SELECT $1::bigint + i * ($2::bigint / $3::bigint), gen_random_uuid() \
                     FROM generate_series(0, $3::bigint - 1) AS i",
                    &[&from, &span_ms, &(holding as i64)],
                )
                .await?;
            client
                .execute(
                    // In random order, as the claims arrived: the index as production grows it.
                    "INSERT INTO claim_by_id SELECT 1 + i % 50, gen_random_uuid() \
                     FROM generate_series(0, $1::bigint - 1) AS i",
                    &[&(holding as i64)],
                )
                .await?;
            client
                .batch_execute("VACUUM ANALYZE event_dedup, claim_by_id")
                .await?;
            client.batch_execute("CHECKPOINT").await?;
            eprintln!(
                "dedup: filled both with {holding} claims in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
        for round in 0..2 {
            batch += 1;
            let evs: Vec<EventMessage> = events(n)
                .into_iter()
                .map(|mut e| {
                    e.message_id = format!("{batch}-{}", e.message_id);
                    e.event_id = messages::event_id(e.tenant_id, &e.message_id);
                    e
                })
                .collect();
            let by_time = dedup_claim(&mut client, "event_dedup", &evs).await?;
            let by_id = dedup_claim_by_id(&mut client, &evs).await?;
            client.batch_execute("CHECKPOINT").await?;
            if round == 0 {
                continue; // warm-up: caches and the first checkpoint
            }
            for (name, took) in [
                ("by day and client time (0007)", by_time),
                ("by tenant and random id (0003)", by_id),
            ] {
                println!(
                    "| {name} | {holding} | {:.2} | {:.0} |",
                    took.as_secs_f64() * 1e6 / n as f64,
                    rate(n, took)
                );
            }
        }
    }
    drop(client);
    drop_db(admin_url, &url).await
}

/// psql's `\copy` of the writer's encoding of the same rows: the machine's limit.
async fn psql_copy(url: &str, evs: &[EventMessage]) -> Result<Duration> {
    let path = std::env::temp_dir().join(format!("{}.pgcopy", unique("bench")));
    let bytes: Vec<u8> = copy::encode_events(evs).concat();
    std::fs::write(&path, &bytes)?;
    let cols = "(tenant_id, occurred_at, event_id, workspace_id, type, name, anonymous_id, user_id, \
                session_id, message_id, received_at, sent_at, original_timestamp, properties, context, \
                ip, user_agent, bot)";
    let started = Instant::now();
    let out = tokio::process::Command::new("psql")
        .arg(url)
        .arg("-v")
        .arg("ON_ERROR_STOP=1")
        .arg("-c")
        .arg(format!(
            "\\copy event {cols} FROM '{}' (FORMAT binary)",
            path.display()
        ))
        .output()
        .await
        .context("running psql")?;
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    anyhow::ensure!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
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
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        admin.create()?;
    let new: Vec<_> = topics
        .all()
        .iter()
        .map(|t| rdkafka::admin::NewTopic::new(t, 4, rdkafka::admin::TopicReplication::Fixed(1)))
        .collect();
    admin
        .create_topics(&new, &rdkafka::admin::AdminOptions::new())
        .await?;
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
    config.batch_max_rows = 20_000;
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
    admin
        .delete_topics(&topics.all(), &rdkafka::admin::AdminOptions::new())
        .await?;
    drop(client);
    if given.is_none() {
        drop_db(admin_url, &url).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    sluice_schema::runtime::init_tracing(sluice_schema::runtime::LogFormat::Text);
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let db = env(
        "SLUICE_BENCH_DATABASE_URL",
        "postgres://sluice@127.0.0.1:54320/sluice",
    );
    let brokers = env("SLUICE_BENCH_KAFKA_BROKERS", "127.0.0.1:19092");
    if matches!(what, "copy" | "all") {
        copy_bench(&db, n).await?;
    }
    if matches!(what, "e2e" | "all") {
        let fill_rows = env("SLUICE_BENCH_FILL_ROWS", "0").parse()?;
        e2e_bench(&db, &brokers, n, fill_rows).await?;
    }
    if matches!(what, "dedup" | "all") {
        let fill = env("SLUICE_BENCH_DEDUP_FILL", "20000000").parse()?;
        dedup_bench(&db, n, fill).await?;
    }
    Ok(())
}
