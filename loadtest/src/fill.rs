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

/// What [`fill`] did.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FillReport {
    /// Rows added to `event`, and as many claims to `event_dedup`.
    pub rows: i64,
    /// Seconds it took, VACUUM ANALYZE and the checkpoint included.
    pub seconds: f64,
}

impl fmt::Display for FillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rows in event and as many claims in event_dedup, in {:.0} s (VACUUM ANALYZE and CHECKPOINT included)",
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
    let claims_from = now.timestamp_millis() - 6 * DAY_MS;
    let claim_step_ms = (6 * DAY_MS / rows.max(1)).max(1);
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
        rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

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
