//! Upkeep off the hot path, on a timer of its own: month partitions ensured ahead every hour
//! and expired `event_dedup` claims pruned every ten minutes (start-up does both once).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::{metrics, partitions};

/// Off the hot path: expired dedup claims at start-up and every ten minutes, months ahead
/// every hour.
pub(crate) async fn run(
    pool: Pool,
    months: Arc<partitions::Months>,
    dedup_days: u32,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        ticks += 1;
        let Ok(client) = pool.get().await else {
            continue;
        };
        // Start-up ensured the months already; then hourly.
        if ticks % 6 == 0 {
            if let Err(err) = months.ensure_ahead(&client, chrono::Utc::now()).await {
                tracing::warn!(cause = %err, "cannot create month partitions ahead; retrying later");
            }
        }
        if let Err(err) = prune_dedup(&client, dedup_days).await {
            tracing::warn!(cause = %sluice_schema::db::describe(&err), "cannot prune event_dedup; retrying later");
        }
    }
}

/// Claims deleted per statement: each delete is a short transaction that never holds many
/// row locks, so it does not hold up a batch claiming ids.
const DEDUP_PRUNE_BATCH: i64 = 10_000;

/// Deletes the `event_dedup` claims whose event was received more than `window_days` days
/// ago: a client retry of such an event is stored again. Claims inside the window stay, so
/// retries within it are dropped as duplicates (docs/writer.md). Returns the claims deleted.
pub async fn prune_dedup(
    client: &tokio_postgres::Client,
    window_days: u32,
) -> Result<u64, tokio_postgres::Error> {
    let days = i32::try_from(window_days).unwrap_or(i32::MAX);
    let mut total = 0;
    loop {
        let deleted = client
            .execute(
                "DELETE FROM event_dedup WHERE ctid = ANY (ARRAY(SELECT ctid FROM event_dedup \
                 WHERE received_at < now() - make_interval(days => $1) LIMIT $2))",
                &[&days, &DEDUP_PRUNE_BATCH],
            )
            .await?;
        total += deleted;
        metrics::dedup_pruned(deleted);
        if deleted < DEDUP_PRUNE_BATCH as u64 {
            return Ok(total);
        }
    }
}
