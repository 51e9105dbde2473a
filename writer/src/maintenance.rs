//! Upkeep off the hot path, on a timer of its own: month partitions of `event` ensured ahead
//! every hour, day partitions of `event_dedup` ensured ahead and those past the dedup window
//! dropped every ten minutes (start-up ensures both once before consuming).

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::partitions::{ClaimDays, Months};

/// Off the hot path: months ahead every hour; claim days ahead and expired ones dropped
/// every ten minutes, the first time at start-up.
pub(crate) async fn run(
    pool: Pool,
    months: Arc<Months>,
    claim_days: Arc<ClaimDays>,
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
        let now = chrono::Utc::now();
        // Start-up ensured the months already; then hourly.
        if ticks % 6 == 0 {
            if let Err(err) = months.ensure_ahead(&client, now).await {
                tracing::warn!(cause = %err, "cannot create month partitions ahead; retrying later");
            }
        }
        if let Err(err) = claim_days.ensure_ahead(&client, now).await {
            tracing::warn!(cause = %err, "cannot create event_dedup day partitions ahead; retrying later");
        }
        if let Err(err) = claim_days.prune(&client, now).await {
            tracing::warn!(cause = %err, "cannot drop expired event_dedup days; retrying later");
        }
    }
}
