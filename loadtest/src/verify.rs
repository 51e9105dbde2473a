//! The `verify` command: compare what the collector acknowledged (the ack file) with what
//! PostgreSQL holds, and measure how long each acknowledged event took to become a row.
//!
//! Two phases:
//! 1. **Visibility** (while the run goes on, with `--follow`, or after it): every
//!    `poll_interval` the timed events not yet seen (one acknowledged event in
//!    `latency_sample`, by event id) are looked up by primary key in
//!    `event_dedup`, which the writer fills in the same transaction as `event` (so a row there
//!    means the event row is committed and visible). An event's end-to-end latency is the end
//!    of the first query that saw it minus its ack time: an upper bound, at most one poll
//!    interval plus one poll's queries above the truth. While the writer is behind, each poll
//!    probes a tenant's pending events in ack order only up to the first chunk of which
//!    nothing is visible, so a lagging writer is not slowed further by the verifier. Both clocks
//!    are this machine's (run `run` and `verify` on one host, or hosts with synchronised
//!    clocks). Timing a sample rather than every event keeps the verifier's own queries from
//!    taking the database's CPU from the writer it measures (timing every event slowed the
//!    writer from 19,900 to 13,500 rows/s on two shared cores); the audit still checks every
//!    acknowledged event.
//! 2. **Audit** (once every ack is seen, or `timeout` after the last ack was read): the run's
//!    rows are read from `event` itself, per tenant over the run's time range, found by their
//!    message-id prefix, and counted per `event_id`: an acknowledged event with no row is
//!    lost, an `event_id` with two rows is a duplicate. Rows of the run that were never
//!    acknowledged (a request that timed out on the client but reached Kafka) are reported,
//!    and are not a failure: at-least-once delivery of an unacknowledged request is allowed.
//!    Untimed events may land just after the last timed one: while events are missing and
//!    the count still falls, the audit is repeated (until `timeout`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use sluice_schema::dedup::DAY_MS;
use sluice_schema::messages::event_id;
use uuid::Uuid;

use crate::acks::AckReader;
use crate::keys;
use crate::report::{new_histogram, record_us, Latency};
use crate::Error;

/// Settings of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    /// The ack file `run` wrote.
    pub ack_file: PathBuf,
    /// PostgreSQL the writer writes to.
    pub database_url: String,
    /// Keep reading the ack file until `run` marks it finished.
    pub follow: bool,
    /// Pause between visibility polls.
    pub poll_interval: Duration,
    /// How long to wait for missing rows after the last ack was read.
    pub timeout: Duration,
    /// Print a line per second while waiting.
    pub progress: bool,
    /// Time one acknowledged event in this many (1: every event).
    pub latency_sample: u32,
}

/// Events looked up per query at most (bounded statement size).
const LOOKUP_CHUNK: usize = 5000;
/// Events of a tenant looked up by a poll's first query.
const FIRST_CHUNK: usize = 8;
/// How far before the first and after the last ack an event's `occurred_at` may lie. The
/// generator stamps events with their send time and the collector corrects for clock skew,
/// so rows land within seconds of their ack; the margin only bounds the audit's range scan.
const AUDIT_MARGIN: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Counts of one tenant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TenantCounts {
    /// Tenant id.
    pub tenant_id: i64,
    /// Events acknowledged.
    pub acked: u64,
    /// Rows of the run found in `event` (duplicates counted each).
    pub rows: u64,
    /// Acknowledged events without a row.
    pub missing: u64,
    /// Rows beyond the first per `event_id`.
    pub duplicates: u64,
    /// Distinct events of the run stored but never acknowledged.
    pub unacknowledged: u64,
}

/// The outcome of `verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The run checked.
    pub run_id: String,
    /// Events acknowledged.
    pub acked: u64,
    /// Rows of the run found in `event`.
    pub rows: u64,
    /// Acknowledged events with no row: loss.
    pub missing: u64,
    /// Extra rows of an `event_id`: duplicates.
    pub duplicates: u64,
    /// Stored events never acknowledged (allowed).
    pub unacknowledged: u64,
    /// Per tenant.
    pub tenants: Vec<TenantCounts>,
    /// Ack -> visible row, over the timed events the polls saw (upper bounds, see the module
    /// docs).
    pub end_to_end: Latency,
    /// One acknowledged event in this many was timed.
    pub latency_sample: u32,
    /// The measurement's resolution: the poll interval, milliseconds.
    pub resolution_ms: f64,
    /// Timed events that became visible only after the polls stopped (no latency for them).
    pub seen_only_in_audit: u64,
    /// Some missing message ids, for a look in the logs.
    pub missing_examples: Vec<String>,
    /// True when nothing acknowledged is lost or duplicated (and something was acknowledged).
    pub passed: bool,
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "verify run {}: {}",
            self.run_id,
            if self.passed { "PASSED" } else { "FAILED" }
        )?;
        writeln!(
            f,
            "  acknowledged {}  rows {}  missing {}  duplicates {}  stored but unacknowledged {}",
            self.acked, self.rows, self.missing, self.duplicates, self.unacknowledged
        )?;
        writeln!(f, "  ack -> visible  {}", self.end_to_end)?;
        writeln!(
            f,
            "                  (1 event in {} timed; upper bounds: resolution {:.0} ms poll interval plus one query; {} timed events seen only by the final audit)",
            self.latency_sample, self.resolution_ms, self.seen_only_in_audit
        )?;
        writeln!(
            f,
            "  tenant          acked       rows    missing duplicates  unacked"
        )?;
        for t in &self.tenants {
            writeln!(
                f,
                "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>8}",
                t.tenant_id, t.acked, t.rows, t.missing, t.duplicates, t.unacknowledged
            )?;
        }
        if self.acked == 0 {
            writeln!(
                f,
                "  the ack file holds no acknowledged events: did the run reach the collector?"
            )?;
        }
        if !self.missing_examples.is_empty() {
            writeln!(f, "  missing, e.g.: {}", self.missing_examples.join(" "))?;
        }
        Ok(())
    }
}

/// One acknowledged event under watch.
struct Watched {
    tenant_id: i64,
    message_id: String,
    ack_unix_us: i64,
    /// The claim keys it can be stored under (see [`claim_keys`]).
    keys: [i64; 2],
    /// Timed: its visibility is polled for.
    timed: bool,
    /// Set once a poll saw it.
    seen: bool,
}

/// True for the events `verify` times: one in `sample`, spread evenly by event id (a UUIDv5,
/// so uniform), and the same events on every run over the same acks.
fn is_timed(id: &Uuid, sample: u32) -> bool {
    let b = id.as_bytes();
    sample <= 1 || u32::from_le_bytes([b[12], b[13], b[14], b[15]]) % sample == 0
}

/// The chunk of `ids` (a tenant's pending events, in ack order) to probe after the chunk
/// `start..start + size` came back with `found` visible: the next one, twice as large, while
/// any of this one is visible; none once all of it is missing or `ids` are done.
fn next_probe(
    ids: &[Uuid],
    start: usize,
    size: usize,
    found: &HashSet<Uuid>,
) -> Option<(usize, usize)> {
    let any_visible = ids[start..start + size].iter().any(|id| found.contains(id));
    let next = start + size;
    let size = (size * 2).min(LOOKUP_CHUNK).min(ids.len() - next);
    (any_visible && size > 0).then_some((next, size))
}

/// Runs `verify`.
pub async fn verify(config: &VerifyConfig) -> Result<VerifyReport, Error> {
    let client = keys::connect(&config.database_url).await?;
    let mut reader = open_ack_file(config).await?;
    let mut tenant_of_key: HashMap<usize, i64> = HashMap::new();
    let mut watched: HashMap<Uuid, Watched> = HashMap::new();
    // Not yet seen, per tenant.
    let mut pending: BTreeMap<i64, Vec<Uuid>> = BTreeMap::new();
    let mut latency = new_histogram();
    let mut last_ack_read = std::time::Instant::now();
    let mut last_progress = std::time::Instant::now();

    loop {
        let chunk = reader.read_available()?;
        let unknown: Vec<_> = chunk
            .keys
            .iter()
            .filter(|k| k.tenant_id.is_none())
            .map(|k| k.prefix.clone())
            .collect();
        let resolved = if unknown.is_empty() {
            HashMap::new()
        } else {
            keys::tenants_of(&client, &unknown).await?
        };
        for k in &chunk.keys {
            let tenant = k
                .tenant_id
                .or_else(|| resolved.get(&k.prefix).copied())
                .ok_or_else(|| Error::UnknownKey {
                    prefix: k.prefix.clone(),
                })?;
            tenant_of_key.insert(k.index, tenant);
        }
        if !chunk.acks.is_empty() {
            last_ack_read = std::time::Instant::now();
        }
        for ack in chunk.acks {
            let tenant_id = *tenant_of_key
                .get(&ack.key_index)
                .ok_or_else(|| Error::AckFormat {
                    path: config.ack_file.clone(),
                    line: 0,
                    reason: format!(
                        "an ack names key {} that no #key line declares",
                        ack.key_index
                    ),
                })?;
            let id = event_id(tenant_id, &ack.message_id);
            let timed = is_timed(&id, config.latency_sample);
            if timed {
                pending.entry(tenant_id).or_default().push(id);
            }
            watched.insert(
                id,
                Watched {
                    tenant_id,
                    message_id: ack.message_id,
                    ack_unix_us: ack.ack_unix_us,
                    keys: claim_keys(ack.client_ms, ack.ack_unix_us),
                    timed,
                    seen: false,
                },
            );
        }

        // One poll: each tenant's oldest pending events are probed in rounds, one query a
        // round for all tenants, a tenant's probe doubling from FIRST_CHUNK while any of it
        // comes back visible. Ids are in ack order, but the writer stores each lane (a share
        // of the partitions) in its own transactions, so a chunk can be half visible while a
        // slow lane commits: stopping there would time the other lane's later rows only after
        // the slow one caught up. Once a whole chunk is missing, every lane is behind it and
        // probing further would only take CPU from the writer being measured; the look-ups a
        // poll wastes are at most as many as it found visible, plus FIRST_CHUNK a tenant.
        let mut probes: Vec<(i64, usize, usize)> = pending
            .iter()
            .map(|(tenant, ids)| (*tenant, 0, FIRST_CHUNK.min(ids.len())))
            .collect();
        let mut visible: Vec<(Uuid, i64)> = Vec::new();
        while !probes.is_empty() {
            let ask: Vec<(i64, Uuid)> = probes
                .iter()
                .flat_map(|&(tenant, start, size)| pending[&tenant][start..start + size].iter())
                .flat_map(|id| {
                    let keys = watched.get(id).map_or([0; 2], |w| w.keys);
                    let distinct = if keys[0] == keys[1] { 1 } else { 2 };
                    keys.into_iter().take(distinct).map(move |k| (k, *id))
                })
                .collect();
            let found = lookup(&client, &ask).await?;
            // The query's snapshot was taken before it returned: what it saw was visible by
            // now, so `now - ack` bounds the latency from above.
            let answered = unix_us();
            visible.extend(found.iter().map(|id| (*id, answered)));
            probes = probes
                .into_iter()
                .filter_map(|(tenant, start, size)| {
                    next_probe(&pending[&tenant], start, size, &found)
                        .map(|(start, size)| (tenant, start, size))
                })
                .collect();
        }
        for (id, answered) in &visible {
            if let Some(w) = watched.get_mut(id) {
                if !w.seen {
                    w.seen = true;
                    record_us(
                        &mut latency,
                        u64::try_from(answered - w.ack_unix_us).unwrap_or(0),
                    );
                }
            }
        }
        if !visible.is_empty() {
            for ids in pending.values_mut() {
                ids.retain(|id| watched.get(id).is_some_and(|w| !w.seen));
            }
        }
        pending.retain(|_, ids| !ids.is_empty());

        let acks_complete = reader.ended() || !config.follow;
        if acks_complete && pending.is_empty() {
            break;
        }
        if acks_complete && last_ack_read.elapsed() >= config.timeout {
            break;
        }
        if config.follow
            && !reader.ended()
            && last_ack_read.elapsed() >= config.timeout.max(Duration::from_secs(600))
        {
            tracing::warn!(
                "the ack file has not grown for 10 minutes and has no #end: auditing what it holds"
            );
            break;
        }
        if config.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = std::time::Instant::now();
            let waiting: usize = pending.values().map(Vec::len).sum();
            let timed = watched.values().filter(|w| w.timed).count();
            eprintln!(
                "[verify] acknowledged {}  timed {}  visible {}  waiting {}  p99 so far {:.1} ms",
                watched.len(),
                timed,
                timed - waiting,
                waiting,
                Latency::of(&latency).p99_ms
            );
        }
        tokio::time::sleep(config.poll_interval).await;
    }

    let run_id = reader.run_id().unwrap_or_default().to_owned();
    let mut report = audit(&client, &run_id, &watched, &latency, config).await?;
    // Only timed events were waited for: untimed ones of the last moments may still be
    // coming. Audit again while the missing count falls, within the timeout.
    let deadline = std::time::Instant::now() + config.timeout;
    while report.missing > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(config.poll_interval.max(Duration::from_secs(1))).await;
        let again = audit(&client, &run_id, &watched, &latency, config).await?;
        let falling = again.missing < report.missing;
        report = again;
        if !falling {
            break;
        }
    }
    Ok(report)
}

/// Opens the ack file; when following, waits (up to `timeout`) for `run` to create it.
async fn open_ack_file(config: &VerifyConfig) -> Result<AckReader, Error> {
    let deadline = std::time::Instant::now() + config.timeout;
    loop {
        match AckReader::open(&config.ack_file) {
            Err(Error::AckFile { source, .. })
                if config.follow
                    && source.kind() == std::io::ErrorKind::NotFound
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(config.poll_interval).await;
            }
            other => return other,
        }
    }
}

/// Phase 2: counts the run's rows in `event` per `event_id`.
async fn audit(
    client: &tokio_postgres::Client,
    run_id: &str,
    watched: &HashMap<Uuid, Watched>,
    latency: &Histogram<u64>,
    config: &VerifyConfig,
) -> Result<VerifyReport, Error> {
    let mut tenants: BTreeMap<i64, TenantCounts> = BTreeMap::new();
    let (mut lo, mut hi) = (i64::MAX, i64::MIN);
    for w in watched.values() {
        let t = tenants.entry(w.tenant_id).or_insert_with(|| TenantCounts {
            tenant_id: w.tenant_id,
            ..TenantCounts::default()
        });
        t.acked += 1;
        lo = lo.min(w.ack_unix_us);
        hi = hi.max(w.ack_unix_us);
    }
    let from = DateTime::<Utc>::from_timestamp_micros(lo).unwrap_or_default() - AUDIT_MARGIN;
    let to = DateTime::<Utc>::from_timestamp_micros(hi).unwrap_or_default() + AUDIT_MARGIN;
    let prefix = format!("{run_id}-");
    let mut found: HashMap<Uuid, i64> = HashMap::new();
    for (tenant_id, counts) in tenants.iter_mut() {
        let rows = client
            .query(
                "SELECT event_id, count(*) FROM event \
                 WHERE tenant_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                   AND left(message_id, $4) = $5 \
                 GROUP BY event_id",
                &[tenant_id, &from, &to, &(prefix.len() as i32), &prefix],
            )
            .await
            .map_err(Error::db("reading the run's rows from event"))?;
        for row in rows {
            let (id, n): (Uuid, i64) = (row.get(0), row.get(1));
            counts.rows += n as u64;
            counts.duplicates += (n - 1) as u64;
            if !watched.contains_key(&id) {
                counts.unacknowledged += 1;
            }
            found.insert(id, n);
        }
    }
    let mut missing_examples = Vec::new();
    let mut seen_only_in_audit = 0;
    for (id, w) in watched {
        if !found.contains_key(id) {
            if let Some(t) = tenants.get_mut(&w.tenant_id) {
                t.missing += 1;
            }
            if missing_examples.len() < 10 {
                missing_examples.push(w.message_id.clone());
            }
        } else if w.timed && !w.seen {
            seen_only_in_audit += 1;
        }
    }
    missing_examples.sort();
    let tenants: Vec<TenantCounts> = tenants.into_values().collect();
    let sum = |f: fn(&TenantCounts) -> u64| tenants.iter().map(f).sum::<u64>();
    let (acked, missing, duplicates) =
        (sum(|t| t.acked), sum(|t| t.missing), sum(|t| t.duplicates));
    Ok(VerifyReport {
        run_id: run_id.to_owned(),
        acked,
        rows: sum(|t| t.rows),
        missing,
        duplicates,
        unacknowledged: sum(|t| t.unacknowledged),
        end_to_end: Latency::of(latency),
        latency_sample: config.latency_sample.max(1),
        resolution_ms: config.poll_interval.as_secs_f64() * 1000.0,
        seen_only_in_audit,
        missing_examples,
        passed: acked > 0 && missing == 0 && duplicates == 0,
        tenants,
    })
}

/// The claim keys an acknowledged event can be stored under (`sluice_schema::dedup`): its
/// `timestamp`; for a call without one (the pixel), the start of its receipt's UTC day, which
/// is the ack's day or, for a request that crossed midnight, the day before.
fn claim_keys(client_ms: Option<i64>, ack_unix_us: i64) -> [i64; 2] {
    match client_ms {
        Some(ms) => [ms; 2],
        None => {
            let day = (ack_unix_us / 1000).div_euclid(DAY_MS) * DAY_MS;
            [day, day - DAY_MS]
        }
    }
}

/// Which of `ask`'s events (claim key, event id) are visible: looked up by primary key in
/// `event_dedup`, every tenant in one statement of at most LOOKUP_CHUNK events. The lateral
/// subquery with its LIMIT keeps the plan a loop of index probes, whatever the planner
/// guesses of the arrays' length.
async fn lookup(
    client: &tokio_postgres::Client,
    ask: &[(i64, Uuid)],
) -> Result<HashSet<Uuid>, Error> {
    let mut found = HashSet::new();
    for part in ask.chunks(LOOKUP_CHUNK) {
        let keys: Vec<i64> = part.iter().map(|(k, _)| *k).collect();
        let ids: Vec<Uuid> = part.iter().map(|(_, id)| *id).collect();
        let rows = client
            .query(
                "SELECT q.event_id FROM unnest($1::bigint[], $2::uuid[]) AS q(key_ms, event_id) \
                 CROSS JOIN LATERAL (SELECT 1 FROM event_dedup d \
                   WHERE d.key_ms = q.key_ms AND d.event_id = q.event_id LIMIT 1) AS hit",
                &[&keys, &ids],
            )
            .await
            .map_err(Error::db(
                "polling event_dedup (verify needs the writer's tables: point it at the database the writer stores to, migrated by `sluice-schema migrate up`)",
            ))?;
        found.extend(rows.iter().map(|r| r.get::<_, Uuid>(0)));
    }
    Ok(found)
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u128) -> Vec<Uuid> {
        (1..=n).map(Uuid::from_u128).collect()
    }

    #[test]
    fn a_half_visible_chunk_probes_on_so_a_fast_lane_is_timed_behind_a_slow_one() {
        let ids = ids(40);
        // Lane of even ids committed, odd ones still in a slow transaction.
        let found: HashSet<Uuid> = ids
            .iter()
            .copied()
            .filter(|id| id.as_u128() % 2 == 0)
            .collect();
        assert_eq!(next_probe(&ids, 0, 8, &found), Some((8, 16)));
        assert_eq!(next_probe(&ids, 8, 16, &found), Some((24, 16)));
        assert_eq!(next_probe(&ids, 24, 16, &found), None, "ids are done");
    }

    #[test]
    fn a_wholly_missing_chunk_ends_the_probe() {
        let ids = ids(40);
        let found: HashSet<Uuid> = ids[..8].iter().copied().collect();
        assert_eq!(next_probe(&ids, 0, 8, &found), Some((8, 16)));
        assert_eq!(next_probe(&ids, 8, 16, &found), None);
    }

    #[test]
    fn a_probe_grows_no_larger_than_a_lookup_chunk() {
        let ids = ids(3 * LOOKUP_CHUNK as u128);
        let found: HashSet<Uuid> = ids.iter().copied().collect();
        assert_eq!(
            next_probe(&ids, 0, LOOKUP_CHUNK, &found),
            Some((LOOKUP_CHUNK, LOOKUP_CHUNK))
        );
    }
}
