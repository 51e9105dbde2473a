//! The writer's dedup claims (`event_dedup`, migration 0007): the claim key of an event, and
//! the table's UTC-day partitions, made ahead and dropped whole once past the window.
//!
//! A claim is `(key_ms, event_id)`. `key_ms` is the client's own `timestamp` in Unix
//! milliseconds, which a retry repeats, so claims arrive in nearly ascending key order: each
//! insert lands at the right edge of the current day's index, whose cost does not grow with
//! the window (a key of random UUIDs over seven days did: 4.3 µs an id into an empty table,
//! 19.4 µs once it held 20 million, #16). A timestamp outside the window around the receipt
//! (a broken client clock) or absent is replaced by the start of the receipt's UTC day: such
//! a client's retries are recognised on the day of the first delivery only.

use chrono::{DateTime, Days, NaiveDate, TimeZone, Utc};
use tokio_postgres::Client;

use crate::SchemaError;

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// How long, in days of client time, a retry is recognised as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Days of client time a claim is kept (`SLUICE_WRITER_DEDUP_WINDOW_DAYS`).
    pub days: u32,
}

impl Window {
    fn ms(self) -> i64 {
        i64::from(self.days) * DAY_MS
    }

    /// The claim key of an event sent with `timestamp` and received at `received_at`, by a
    /// writer whose clock says `now`.
    ///
    /// The timestamp itself when it lies between `days` before the receipt and one day after
    /// it, else the start of the receipt's UTC day. Then brought into the days this writer
    /// keeps partitions for (`days` before today to tomorrow): a backlog received before the
    /// window, or a collector clock ahead of this writer's, is claimed at the window's edge.
    pub fn key_ms(
        self,
        timestamp: Option<DateTime<Utc>>,
        received_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> i64 {
        let received = received_at.timestamp_millis();
        let key = match timestamp.map(|t| t.timestamp_millis()) {
            Some(t) if t >= received - self.ms() && t <= received + DAY_MS => t,
            _ => day_floor(received),
        };
        let today = day_floor(now.timestamp_millis());
        key.clamp(today - self.ms(), today + 2 * DAY_MS - 1)
    }

    /// The days whose partitions must exist at `now`: every day [`Window::key_ms`] can fall
    /// on, and the day after (made before it is needed).
    pub fn days_ahead(self, now: DateTime<Utc>) -> impl Iterator<Item = NaiveDate> {
        let today = now.date_naive();
        let first = today - Days::new(u64::from(self.days));
        first.iter_days().take(self.days as usize + 3)
    }

    /// The oldest day kept at `now`: one before the oldest [`Window::key_ms`] can name, so a
    /// writer whose clock is behind this one's by less than a day still finds its partition.
    pub fn oldest_kept(self, now: DateTime<Utc>) -> NaiveDate {
        now.date_naive() - Days::new(u64::from(self.days) + 1)
    }
}

fn day_floor(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

/// The UTC day a claim key falls on.
pub fn day_of_key(key_ms: i64) -> NaiveDate {
    Utc.timestamp_millis_opt(day_floor(key_ms))
        .single()
        .map_or(NaiveDate::MIN, |t| t.date_naive())
}

/// The partition table of `day`: `event_dedup_dYYYYMMDD`.
pub fn day_table_name(day: NaiveDate) -> String {
    format!("event_dedup_d{}", day.format("%Y%m%d"))
}

/// The day of a partition table name, `None` for any other name (only names this parses are
/// spliced into SQL).
pub fn day_of_table(name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix("event_dedup_d")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

/// Creates the partition of `day` unless it exists; true when this call created it. Safe to
/// call from any number of writers at once (the database function serialises them).
pub async fn ensure_day(client: &Client, day: NaiveDate) -> Result<bool, SchemaError> {
    let created: bool = client
        .query_one("SELECT event_dedup_ensure_day($1)", &[&day])
        .await
        .map_err(SchemaError::db(format!(
            "creating dedup partition {}",
            day_table_name(day)
        )))?
        .get(0);
    if created {
        tracing::info!(table = %day_table_name(day), "event_dedup day partition created");
    }
    Ok(created)
}

/// The partitions of `event_dedup`, oldest first, with whether a detach of each was
/// interrupted.
pub async fn list(client: &Client) -> Result<Vec<(String, bool)>, SchemaError> {
    let rows = client
        .query(
            "SELECT c.relname::text, i.inhdetachpending FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'event_dedup'::regclass ORDER BY c.relname",
            &[],
        )
        .await
        .map_err(SchemaError::db("listing event_dedup partitions"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Detaches and drops every day partition older than [`Window::oldest_kept`]; returns the
/// dropped tables. A claim dropped this way is past the window: a retry of its event is
/// stored again. Writers prune on a timer; when another session holds the prune lock this
/// one returns at once with nothing dropped.
pub async fn prune(
    client: &Client,
    now: DateTime<Utc>,
    window: Window,
) -> Result<Vec<String>, SchemaError> {
    const LOCK: &str = "sluice.event_dedup_prune";
    if !crate::partitions::try_session_lock(client, LOCK).await? {
        return Ok(Vec::new());
    }
    let result = prune_locked(client, window.oldest_kept(now)).await;
    crate::partitions::session_unlock(client, LOCK).await;
    result
}

async fn prune_locked(client: &Client, oldest: NaiveDate) -> Result<Vec<String>, SchemaError> {
    let mut dropped = Vec::new();
    for (table, pending) in list(client).await? {
        if day_of_table(&table).is_none_or(|day| day >= oldest) {
            continue;
        }
        let how = crate::partitions::detach_and_drop(client, "event_dedup", &table, pending, false)
            .await?;
        tracing::info!(%table, how, "event_dedup day partition detached and dropped");
        dropped.push(table);
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const WEEK: Window = Window { days: 7 };

    #[test]
    fn the_key_is_the_client_timestamp_when_it_is_in_the_window() {
        let now = at("2026-12-02T10:00:00Z");
        for ts in [
            "2026-12-02T09:59:59.123Z",
            "2026-11-25T10:00:00Z",
            "2026-12-03T09:00:00Z",
        ] {
            let t = at(ts);
            assert_eq!(WEEK.key_ms(Some(t), now, now), t.timestamp_millis(), "{ts}");
        }
    }

    #[test]
    fn a_retry_repeats_the_key_whenever_it_arrives_within_the_window() {
        let ts = at("2026-12-01T23:59:00Z");
        let first = WEEK.key_ms(
            Some(ts),
            at("2026-12-01T23:59:01Z"),
            at("2026-12-01T23:59:02Z"),
        );
        let retry = WEEK.key_ms(
            Some(ts),
            at("2026-12-07T12:00:00Z"),
            at("2026-12-07T12:00:01Z"),
        );
        assert_eq!(first, retry);
    }

    #[test]
    fn broken_or_missing_clocks_key_on_the_receipt_day() {
        let received = at("2026-12-02T10:00:00Z");
        let day = at("2026-12-02T00:00:00Z").timestamp_millis();
        for ts in [
            None,
            Some(at("2019-01-01T00:00:00Z")),
            Some(at("2026-11-25T09:59:59.999Z")),
            Some(at("2026-12-03T10:00:00.001Z")),
            Some(at("2099-01-01T00:00:00Z")),
        ] {
            assert_eq!(WEEK.key_ms(ts, received, received), day, "{ts:?}");
        }
        // The same broken clock the next day is another key: recognised on one day only.
        let next = at("2026-12-03T01:00:00Z");
        assert_ne!(
            WEEK.key_ms(Some(at("2019-01-01T00:00:00Z")), next, next),
            day
        );
    }

    #[test]
    fn keys_stay_inside_the_days_the_writer_keeps() {
        let now = at("2026-12-10T10:00:00Z");
        // Received before the window (a backlog): at the window's first millisecond.
        let old = at("2026-11-20T10:00:00Z");
        let key = WEEK.key_ms(Some(old), old, now);
        assert_eq!(key, at("2026-12-03T00:00:00Z").timestamp_millis());
        // A collector whose clock runs days ahead of this writer: at tomorrow's last one.
        let ahead = at("2026-12-20T10:00:00Z");
        let key = WEEK.key_ms(Some(ahead), ahead, now);
        assert_eq!(key, at("2026-12-12T00:00:00Z").timestamp_millis() - 1);
        let kept: Vec<NaiveDate> = WEEK.days_ahead(now).collect();
        for key in [
            WEEK.key_ms(Some(old), old, now),
            WEEK.key_ms(Some(ahead), ahead, now),
        ] {
            assert!(kept.contains(&day_of_key(key)), "{key}");
        }
    }

    #[test]
    fn days_ahead_and_oldest_kept() {
        let now = at("2026-12-10T23:59:59Z");
        let days: Vec<String> = WEEK.days_ahead(now).map(|d| d.to_string()).collect();
        assert_eq!(days.first().map(String::as_str), Some("2026-12-03"));
        assert_eq!(days.last().map(String::as_str), Some("2026-12-12"));
        assert_eq!(days.len(), 10);
        assert_eq!(WEEK.oldest_kept(now).to_string(), "2026-12-02");
    }

    #[test]
    fn table_names_round_trip_and_nothing_else_parses() {
        let day = NaiveDate::from_ymd_opt(2026, 3, 7).unwrap();
        assert_eq!(day_table_name(day), "event_dedup_d20260307");
        assert_eq!(day_of_table("event_dedup_d20260307"), Some(day));
        for bad in [
            "event_dedup_d2026037",
            "event_dedup_d20261307",
            "event_dedup_d2026030;",
            "event_y2026m03",
        ] {
            assert_eq!(day_of_table(bad), None, "{bad}");
        }
        assert_eq!(day_of_key(-1).to_string(), "1969-12-31");
    }
}
