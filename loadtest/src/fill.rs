//! A steady state to measure on: `event` and `event_dedup` filled with millions of rows of the
//! load generator's shape before a benchmark, since a freshly migrated, empty database hides
//! what full indexes cost (`sluice-loadtest fill`, `loadtest/bench`, the writer benchmark).

use std::fmt;
use std::time::Instant;

use chrono::Utc;
use sluice_schema::dedup::{self, Window, DAY_MS};
use tokio_postgres::Client;

use crate::Error;

/// Rows a statement inserts: a transaction of a minute or so, progress between them.
const CHUNK: i64 = 1_000_000;

/// Days before now the fill's claims spread over (inside the writer's 7-day window), and so
/// the days [`held`] counts claims in.
const CLAIM_DAYS: i64 = 6;

/// What [`fill`] did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FillReport {
    /// What [`top_up`] found there already ([`held`]); 0 for [`fill`].
    pub held: i64,
    /// Rows added to `event`, and as many claims to `event_dedup`.
    pub rows: i64,
    /// Seconds it took, VACUUM ANALYZE and the checkpoint included.
    pub seconds: f64,
}

impl fmt::Display for FillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.held > 0 {
            write!(f, "about {} rows and claims there already, ", self.held)?;
        }
        write!(
            f,
            "{} rows added to event and as many claims to event_dedup, in {:.0} s (VACUUM ANALYZE and CHECKPOINT included)",
            self.rows, self.seconds
        )
    }
}

/// Tenant ids of the fill: 50 above any a test or the seed makes (there is no foreign key on
/// `event`), so the rows a benchmark measures can be told from the fill by tenant.
pub const FIRST_TENANT: i64 = 1_000_001;

/// Adds `rows` track events to `event` (50 tenants from [`FIRST_TENANT`], 200,000 visitors, 400,000 sessions,
/// properties and context of the writer benchmark's size) spread over the current month up to
/// an hour ago, and `rows` dedup claims over the six days before now, then VACUUM ANALYZE and a
/// checkpoint: measured batches meet full indexes and no pending vacuum. The rows'
/// `message_id`s start with `fill-`. `progress` is told the rows done and the seconds taken
/// after each million.
pub async fn fill(
    client: &Client,
    rows: i64,
    mut progress: impl FnMut(i64, f64),
) -> Result<FillReport, Error> {
    let now = Utc::now();
    for day in (Window { days: 7 }).days_ahead(now) {
        dedup::ensure_day(client, day)
            .await
            .map_err(|e| Error::Usage(format!("creating the dedup days to fill: {e}")))?;
    }
    sluice_schema::partitions::ensure_month(client, now.date_naive(), 8)
        .await
        .map_err(|e| Error::Usage(format!("creating the month to fill: {e}")))?;
    let month_start = sluice_schema::partitions::month_bounds(now.date_naive()).0;
    let until = now - chrono::Duration::hours(1);
    let rows = rows.max(0);
    let step_us = (until - month_start).num_microseconds().unwrap_or(0) as f64 / rows.max(1) as f64;
    let claims_from = now.timestamp_millis() - CLAIM_DAYS * DAY_MS;
    let claim_step_ms = (CLAIM_DAYS * DAY_MS / rows.max(1)).max(1);
    let started = Instant::now();
    let mut done = 0;
    while done < rows {
        let hi = (done + CHUNK).min(rows) - 1;
        client
            .execute(FILL_EVENTS, &[&month_start, &step_us, &done, &hi])
            .await
            .map_err(Error::db(
                "filling event (run `sluice-schema migrate up` first)",
            ))?;
        client
            .execute(FILL_CLAIMS, &[&claims_from, &claim_step_ms, &done, &hi])
            .await
            .map_err(Error::db("filling event_dedup"))?;
        done = hi + 1;
        progress(done, started.elapsed().as_secs_f64());
    }
    // One statement a call: VACUUM refuses the implicit transaction of a multi-statement string.
    for sql in ["VACUUM ANALYZE event, event_dedup", "CHECKPOINT"] {
        client
            .batch_execute(sql)
            .await
            .map_err(Error::db("vacuuming the filled tables"))?;
    }
    Ok(FillReport {
        held: 0,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Fills up to `rows`: adds only what [`held`] finds missing, so a benchmark run again on the
/// same database measures the same steady state without adding another `rows` each time (20
/// million rows are 11 minutes and some 20 GB of this machine's disk).
pub async fn top_up(
    client: &Client,
    rows: i64,
    progress: impl FnMut(i64, f64),
) -> Result<FillReport, Error> {
    let held = held(client).await?;
    let report = fill(client, (rows - held).max(0), progress).await?;
    Ok(FillReport { held, ..report })
}

/// How much of a steady state the database holds: the fewer of the rows in the current
/// month's `event` table (the one the writer inserts into, whose indexes a benchmark meets)
/// and the claims in `event_dedup`'s days from six days ago to today (where [`fill`] puts
/// them). Planner estimates, as the last VACUUM ANALYZE (the fill's own) or autovacuum left
/// them: counting 20 million rows would take minutes.
pub async fn held(client: &Client) -> Result<i64, Error> {
    let today = Utc::now().date_naive();
    let month = sluice_schema::partitions::month_table_name(today);
    let days: Vec<String> = (0..=CLAIM_DAYS.unsigned_abs())
        .map(|back| dedup::day_table_name(today - chrono::Days::new(back)))
        .collect();
    let row = client
        .query_one(HELD, &[&month, &days])
        .await
        .map_err(Error::db("reading the planner's row estimates"))?;
    Ok(row.get::<_, i64>(0).min(row.get(1)))
}

/// Estimated rows of the leaves of month table `$1`, and of the claim day tables `$2`
/// (a table not made yet counts 0; `reltuples` is -1 until a table was first analyzed).
const HELD: &str = "
SELECT (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
          FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = to_regclass($1)),
       (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
          FROM pg_class c
         WHERE c.oid IN (SELECT to_regclass(name) FROM unnest($2::text[]) AS name))";

/// Rows `$3..=$4` of the fill, row `i` at `$1 + i * $2` µs.
const FILL_EVENTS: &str = r#"
INSERT INTO event (tenant_id, occurred_at, event_id, workspace_id, type, name, anonymous_id,
                   session_id, message_id, received_at, sent_at, original_timestamp,
                   properties, context, ip, user_agent)
SELECT t, at, gen_random_uuid(), t, 'track',
       (ARRAY['Signed Up', 'Viewed Pricing', 'Added To Cart'])[1 + i % 3],
       'fill-anon-' || (i % 200000), 'fill-sess-' || (i % 400000), 'fill-' || i, at, at, at,
       jsonb_build_object('plan', 'pro', 'price', i * 0.01,
                          'sku', 'SKU-' || lpad((i % 9973)::text, 8, '0'),
                          'path', '/pricing/enterprise'),
       '{"locale": "en-GB", "page": {"url": "https://shop.example/pricing", "title": "Pricing"},
         "library": {"name": "analytics.js", "version": "4.1.0"}}'::jsonb,
       '203.0.113.9', 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0'
FROM (SELECT i, 1000001 + i % 50 AS t,
             $1::timestamptz + make_interval(secs => i * $2::float8 / 1e6) AS at
      FROM generate_series($3::bigint, $4::bigint) AS i) g
"#;

/// Claims `$3..=$4`, claim `i` keyed `$1 + i * $2` ms: ascending, as clients' clocks send them
/// (also the writer's dedup benchmark's fill).
pub const FILL_CLAIMS: &str = "INSERT INTO event_dedup (key_ms, event_id) \
     SELECT $1::bigint + i * $2::bigint, gen_random_uuid() \
     FROM generate_series($3::bigint, $4::bigint) AS i";
