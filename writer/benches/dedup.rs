//! The dedup claim as the window fills: the claim of ROWS new events into claim tables already
//! holding 0 and then `SLUICE_BENCH_DEDUP_FILL` (20,000,000) claims, the day-partitioned table
//! keyed by client time (0007) against the earlier one keyed by random ids (0003's shape).
//! Not a timed test; figures go to docs/benchmarks.md ("Dedup").
//!
//! ```sh
//! SLUICE_BENCH_DATABASE_URL=postgres://sluice@127.0.0.1:54320/sluice \
//! cargo bench -p sluice-writer --bench dedup -- [ROWS]
//! ```

mod common;

use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::Utc;
use common::{connect, dedup_claim, drop_db, env, events, fresh_db, rate};
use sluice_schema::messages::{self, EventMessage};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

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
            let holding = holding as i64;
            client
                .execute(
                    sluice_loadtest::fill::FILL_CLAIMS,
                    &[&from, &(span_ms / holding).max(1), &0_i64, &(holding - 1)],
                )
                .await?;
            client
                .execute(
                    // In random order, as the claims arrived: the index as production grows it.
                    "INSERT INTO claim_by_id SELECT 1 + i % 50, gen_random_uuid() \
                     FROM generate_series(0, $1::bigint - 1) AS i",
                    &[&holding],
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

#[tokio::main]
async fn main() -> Result<()> {
    let (args, db) = common::start();
    let n: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let fill = env("SLUICE_BENCH_DEDUP_FILL", "20000000").parse()?;
    dedup_bench(&db, n, fill).await
}
