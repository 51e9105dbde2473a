//! What the writer benchmarks share: connections and fresh databases, the benchmark's events,
//! the dedup claim as the writer makes it, and psql's COPY as the limit.

// Each benchmark target compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use sluice_schema::kafka::KafkaProperties;
use sluice_schema::messages::{self, EventMessage, EventType, JsonObject};
use sluice_writer::copy;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

/// What every benchmark starts with: logs, its arguments (cargo's `--bench` flag left out) and
/// the database to measure (`SLUICE_BENCH_DATABASE_URL`, the local stack's by default).
pub fn start() -> (Vec<String>, String) {
    sluice_schema::runtime::init_tracing(sluice_schema::runtime::LogFormat::Text);
    let args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let db = env(
        "SLUICE_BENCH_DATABASE_URL",
        "postgres://sluice@127.0.0.1:54320/sluice",
    );
    (args, db)
}

pub fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", Utc::now().timestamp_micros())
}

/// The services' own connector, so a TLS URL (`sslmode=verify-full&sslrootcert=...`) works.
pub async fn connect(url: &str) -> Result<Client> {
    Ok(sluice_schema::db::connect(url).await?)
}

/// `url` with its database replaced, the query (TLS parameters) kept.
pub fn with_db(url: &str, db: &str) -> String {
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
pub fn kafka_properties() -> Result<KafkaProperties> {
    Ok(KafkaProperties::parse_list(&env(
        "SLUICE_KAFKA_PROPERTIES",
        "",
    ))?)
}

/// A fresh migrated database with the current month's partition; returns its URL.
pub async fn fresh_db(admin_url: &str) -> Result<String> {
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
pub const FIRST_TENANT: i64 = 2_000_001;

/// Drops a database [`fresh_db`] made (the disk is shared: a filled one holds gigabytes).
pub async fn drop_db(admin_url: &str, url: &str) -> Result<()> {
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
pub fn events(n: usize) -> Vec<EventMessage> {
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

pub async fn reset(client: &Client) -> Result<()> {
    client
        .batch_execute("TRUNCATE event, event_dedup; CHECKPOINT")
        .await?;
    Ok(())
}

pub fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

/// The writer's claim of `evs` (binary COPY of key and id, 20,000 a statement) into `table`.
pub async fn dedup_claim(
    client: &mut Client,
    table: &str,
    evs: &[EventMessage],
) -> Result<Duration> {
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

/// psql's `\copy` of the writer's encoding of the same rows: the machine's limit.
pub async fn psql_copy(url: &str, evs: &[EventMessage]) -> Result<Duration> {
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
