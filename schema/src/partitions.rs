//! The partition manager for `event`: one range partition per calendar month (UTC), each
//! hashed by `tenant_id` into leaves. Months are created ahead of time (by the writer on start
//! and on a timer, and by `sluice-schema partitions ensure`) and on demand before a COPY needs
//! them; old months are detached and dropped by `prune`.
//!
//! Creation happens in the database function `event_ensure_month` (migration 0003), so one
//! statement is one transaction holding the advisory lock: callers on any number of
//! processes may race, and a caller needs only a shared `&Client`.

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeZone, Utc};
use tokio_postgres::Client;

use crate::SchemaError;

/// How months are laid out and how far ahead they are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionConfig {
    /// Hash leaves per new month. An existing month keeps the modulus it was made with.
    pub hash_modulus: u32,
    /// Months made beyond the current one.
    pub months_ahead: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            hash_modulus: 8,
            months_ahead: 3,
        }
    }
}

/// Largest modulus accepted: beyond it, planning time grows for little gain on one node.
pub const MAX_HASH_MODULUS: u32 = 1024;

/// The first day of `day`'s month.
pub fn month_start(day: NaiveDate) -> NaiveDate {
    day.with_day(1).unwrap_or(day)
}

/// `[start, end)` of `month`'s partition (any day of it), in UTC.
pub fn month_bounds(month: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = month_start(month);
    let end = start
        .checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX);
    let at_midnight = |d: NaiveDate| Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN));
    (at_midnight(start), at_midnight(end))
}

/// Name of `month`'s table: `event_yYYYYmMM`. Its leaves are `{name}_p{remainder}`.
pub fn month_table_name(month: NaiveDate) -> String {
    format!("event_y{:04}m{:02}", month.year(), month.month())
}

/// Creates the month holding `month` (any day of it) with `modulus` hash leaves, unless it
/// exists. Returns true when it was created. Idempotent and safe to call concurrently.
pub async fn ensure_month(
    client: &Client,
    month: NaiveDate,
    modulus: u32,
) -> Result<bool, SchemaError> {
    check_modulus(modulus)?;
    let modulus = modulus as i32; // within MAX_HASH_MODULUS
    let row = client
        .query_one(
            "SELECT event_ensure_month($1, $2)",
            &[&month_start(month), &modulus],
        )
        .await
        .map_err(SchemaError::db(format!(
            "creating partition {}",
            month_table_name(month)
        )))?;
    let created: bool = row.get(0);
    if created {
        tracing::info!(table = %month_table_name(month), modulus, "event month partition created");
    }
    Ok(created)
}

/// One month looked at by [`ensure_ahead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// First day of the month.
    pub month: NaiveDate,
    /// Its table name.
    pub table: String,
    /// True when this call created it.
    pub created: bool,
}

/// Makes sure the month of `now` and the `cfg.months_ahead` months after it exist.
pub async fn ensure_ahead(
    client: &Client,
    now: DateTime<Utc>,
    cfg: &PartitionConfig,
) -> Result<Vec<Ensured>, SchemaError> {
    check_modulus(cfg.hash_modulus)?;
    let first = month_start(now.date_naive());
    let mut out = Vec::with_capacity(cfg.months_ahead as usize + 1);
    for i in 0..=cfg.months_ahead {
        let month = first.checked_add_months(Months::new(i)).ok_or_else(|| {
            SchemaError::InvalidPartitionConfig(format!(
                "months_ahead {} runs past the calendar",
                cfg.months_ahead
            ))
        })?;
        let created = ensure_month(client, month, cfg.hash_modulus).await?;
        out.push(Ensured {
            month,
            table: month_table_name(month),
            created,
        });
    }
    Ok(out)
}

/// True when `err` is PostgreSQL refusing a row because no month partition holds it: the
/// writer answers it by calling [`ensure_month`] for the row's month and retrying.
pub fn is_missing_partition(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        db.code() == &tokio_postgres::error::SqlState::CHECK_VIOLATION
            && db.message().starts_with("no partition of relation")
    })
}

/// One month partition as it is in the database.
#[derive(Debug, Clone, PartialEq)]
pub struct MonthInfo {
    /// Table name.
    pub table: String,
    /// Its range, as PostgreSQL prints it.
    pub bounds: String,
    /// Hash leaves.
    pub leaves: Vec<LeafInfo>,
}

/// One hash leaf of a month.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafInfo {
    /// Table name.
    pub table: String,
    /// Its hash bound, as PostgreSQL prints it.
    pub bounds: String,
    /// The planner's row estimate (`pg_class.reltuples`; -1 before the first ANALYZE).
    pub estimated_rows: f64,
    /// Bytes on disk, indexes and TOAST included.
    pub total_bytes: i64,
}

/// The months of `event`, oldest first, with their leaves.
pub async fn list(client: &Client) -> Result<Vec<MonthInfo>, SchemaError> {
    let rows = client
        .query(
            "SELECT m.relname::text, pg_get_expr(m.relpartbound, m.oid),
                    l.relname::text, pg_get_expr(l.relpartbound, l.oid),
                    l.reltuples::float8, pg_total_relation_size(l.oid)
               FROM pg_inherits im
               JOIN pg_class m ON m.oid = im.inhrelid
               LEFT JOIN pg_inherits il ON il.inhparent = m.oid
               LEFT JOIN pg_class l ON l.oid = il.inhrelid
              WHERE im.inhparent = 'event'::regclass
              ORDER BY m.relname, length(l.relname), l.relname",
            &[],
        )
        .await
        .map_err(SchemaError::db("listing event partitions"))?;
    let mut out: Vec<MonthInfo> = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        if out.last().is_none_or(|m| m.table != table) {
            out.push(MonthInfo {
                table: table.clone(),
                bounds: row.get(1),
                leaves: Vec::new(),
            });
        }
        let leaf: Option<String> = row.get(2);
        if let (Some(leaf), Some(month)) = (leaf, out.last_mut()) {
            month.leaves.push(LeafInfo {
                table: leaf,
                bounds: row.get(3),
                estimated_rows: row.get(4),
                total_bytes: row.get(5),
            });
        }
    }
    Ok(out)
}

/// Detaches and drops every month that ends before the start of the month `keep_months - 1`
/// months before `now`'s month: `keep_months = 1` keeps only the current month. Returns the
/// dropped tables.
///
/// Writers are never locked out: each month is detached with `DETACH PARTITION ...
/// CONCURRENTLY`, which takes only a SHARE UPDATE EXCLUSIVE lock on `event` (COPYs go on) and
/// then waits for the transactions that may still use the month; a plain `DETACH` would take
/// ACCESS EXCLUSIVE on `event` and, queued behind one long query, stall every COPY behind
/// it. It cannot run in a transaction block, so each month is its own statement. A detach
/// interrupted in its second phase (prune killed, connection lost) leaves the month "detach
/// pending"; the next prune finishes it with `DETACH PARTITION ... FINALIZE`. With a DEFAULT
/// partition on `event` (sluice makes none; PostgreSQL refuses the concurrent form then)
/// the plain form is used under a 10 s `lock_timeout`. Only one prune runs at a time.
pub async fn prune(
    client: &mut Client,
    now: DateTime<Utc>,
    keep_months: u32,
) -> Result<Vec<String>, SchemaError> {
    if keep_months == 0 {
        return Err(SchemaError::InvalidPartitionConfig(
            "keep_months must be at least 1 (the current month is never dropped)".into(),
        ));
    }
    let oldest_kept = month_start(now.date_naive())
        .checked_sub_months(Months::new(keep_months - 1))
        .ok_or_else(|| {
            SchemaError::InvalidPartitionConfig(format!(
                "keep_months {keep_months} runs past the calendar"
            ))
        })?;
    let cutoff = month_table_name(oldest_kept);
    const LOCK: &str = "sluice.event_prune";
    if !try_session_lock(client, LOCK).await? {
        return Err(SchemaError::PruneRunning);
    }
    let result = prune_locked(client, &cutoff).await;
    session_unlock(client, LOCK).await;
    result
}

async fn prune_locked(client: &mut Client, cutoff: &str) -> Result<Vec<String>, SchemaError> {
    let row = client
        .query_one(
            "SELECT (SELECT partdefid <> 0 FROM pg_partitioned_table WHERE partrelid = 'event'::regclass),
                    ARRAY(SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                           WHERE i.inhparent = 'event'::regclass AND i.inhdetachpending)",
            &[],
        )
        .await
        .map_err(SchemaError::db("reading event's partitions"))?;
    let has_default: bool = row.get::<_, Option<bool>>(0).unwrap_or(false);
    let pending: Vec<String> = row.get(1);
    let mut dropped = Vec::new();
    // Month tables sort by name in date order; anything named below the cutoff is older.
    for month in list(client).await? {
        let t = month.table;
        if t.as_str() >= cutoff || !is_month_name(&t) {
            continue;
        }
        let how = detach_and_drop(client, "event", &t, pending.contains(&t), has_default).await?;
        tracing::info!(table = %t, how, "event month partition detached and dropped");
        dropped.push(t);
    }
    Ok(dropped)
}

/// Takes the session-level advisory lock `name` if no other session holds it.
pub(crate) async fn try_session_lock(client: &Client, name: &str) -> Result<bool, SchemaError> {
    Ok(client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            &[&name],
        )
        .await
        .map_err(SchemaError::db(format!("taking the lock {name}")))?
        .get(0))
}

/// Releases what [`try_session_lock`] took; a failure leaves it to the end of the connection.
pub(crate) async fn session_unlock(client: &Client, name: &str) {
    let _ = client
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&name],
        )
        .await;
}

/// Detaches `table` from `parent` and drops it, never locking writers out of `parent`
/// (see [`prune`]): `CONCURRENTLY`, or `FINALIZE` when an earlier detach was interrupted
/// (`pending`), or the plain form under a 10 s `lock_timeout` when `parent` has a DEFAULT
/// partition. Returns which of the three it was. `parent` and `table` are spliced into SQL:
/// callers pass names they have checked.
pub(crate) async fn detach_and_drop(
    client: &Client,
    parent: &str,
    table: &str,
    pending: bool,
    has_default: bool,
) -> Result<&'static str, SchemaError> {
    let t = table;
    let (how, sql) = if pending {
        (
            "finalize",
            format!("ALTER TABLE {parent} DETACH PARTITION {t} FINALIZE"),
        )
    } else if has_default {
        (
            "plain",
            format!(
                "BEGIN; SET LOCAL lock_timeout = '10s'; ALTER TABLE {parent} DETACH PARTITION {t}; COMMIT"
            ),
        )
    } else {
        (
            "concurrent",
            format!("ALTER TABLE {parent} DETACH PARTITION {t} CONCURRENTLY"),
        )
    };
    if how == "plain" {
        tracing::warn!(table = %t, "{parent} has a DEFAULT partition: detaching with a lock on all of {parent}");
    }
    if let Err(err) = client.batch_execute(&sql).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(SchemaError::db(format!(
            "detaching partition {t} ({how}; run the prune again: an interrupted detach is finished then)"
        ))(err));
    }
    // Detached, the partition is a table of its own that no writer reads: dropping it locks
    // only itself.
    if let Err(err) = client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '10s'; DROP TABLE {t}; COMMIT"
        ))
        .await
    {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(SchemaError::db(format!(
            "dropping the detached table {t} (drop it by hand: it is no longer part of {parent})"
        ))(err));
    }
    Ok(how)
}

/// True for names of the form `event_yYYYYmMM` (the only names safe to splice into SQL here).
pub fn is_month_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("event_y") else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 7 && b[4] == b'm' && b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit)
}

fn check_modulus(modulus: u32) -> Result<(), SchemaError> {
    if modulus == 0 || modulus > MAX_HASH_MODULUS {
        return Err(SchemaError::InvalidPartitionConfig(format!(
            "hash modulus must be between 1 and {MAX_HASH_MODULUS}, got {modulus}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn month_names_and_bounds() {
        assert_eq!(month_table_name(day(2026, 3, 17)), "event_y2026m03");
        let (lo, hi) = month_bounds(day(2026, 12, 31));
        assert_eq!(lo.to_rfc3339(), "2026-12-01T00:00:00+00:00");
        assert_eq!(hi.to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert!(is_month_name("event_y2026m03"));
        assert!(!is_month_name("event_y2026m03_p1"));
        assert!(!is_month_name("event_y2026m0;"));
    }
}
