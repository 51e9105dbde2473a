//! Visitors and sessions: many messages per key, merged into one row each.
//!
//! A batch's messages are first folded per key in memory (one upsert cannot touch a row
//! twice), then staged with a binary COPY into a temporary table and merged with one
//! `INSERT ... SELECT ... ON CONFLICT DO UPDATE`. The merge rules are commutative, so the
//! result does not depend on the order messages arrive in, within or across batches:
//! first seen = least, last seen = greatest, first touch comes from the earliest message,
//! "latest" fields from the latest one.
//!
//! The counters (`event_count`, `page_count`) are not taken from these messages: a client's
//! retry of a batch sends them again, with the same events. They are counted from the events
//! whose id the batch's transaction claimed ([`count_claimed`]), so each event counts once.
//! A row the counters create before its visitor or session message arrives has no first
//! touch yet; the message fills it in even at an equal first-seen time.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sluice_schema::messages::{EventMessage, EventType, SessionMessage, VisitorMessage};
use tokio_postgres::Transaction;

use crate::copy::{self, CopyEncoder};

/// Folds `b` into `a` (same tenant and anonymous id) with the table's merge rules.
fn fold_visitor(a: &mut VisitorMessage, b: &VisitorMessage) {
    if b.first_seen_at < a.first_seen_at {
        a.first_seen_at = b.first_seen_at;
        a.first_touch = b.first_touch.clone();
    }
    if b.last_seen_at >= a.last_seen_at {
        a.last_seen_at = b.last_seen_at;
        if b.user_id.is_some() {
            a.user_id = b.user_id.clone();
        }
        if b.user_agent.is_some() {
            a.user_agent = b.user_agent.clone();
        }
    } else {
        a.user_id = a.user_id.take().or_else(|| b.user_id.clone());
        a.user_agent = a.user_agent.take().or_else(|| b.user_agent.clone());
    }
    a.bot |= b.bot;
}

/// Folds `b` into `a` (same tenant and session id) with the table's merge rules.
fn fold_session(a: &mut SessionMessage, b: &SessionMessage) {
    if b.started_at < a.started_at {
        a.started_at = b.started_at;
        a.first_touch = b.first_touch.clone();
    }
    let later = b.last_seen_at >= a.last_seen_at;
    if later {
        a.last_seen_at = b.last_seen_at;
    }
    let (older, newer) = if later { (&*a, b) } else { (b, &*a) };
    let anonymous_id = newer
        .anonymous_id
        .clone()
        .or_else(|| older.anonymous_id.clone());
    let user_id = newer.user_id.clone().or_else(|| older.user_id.clone());
    let mut device = older.device.clone();
    device.extend(newer.device.clone());
    let mut geo = older.geo.clone();
    geo.extend(newer.geo.clone());
    a.anonymous_id = anonymous_id;
    a.user_id = user_id;
    a.device = device;
    a.geo = geo;
}

const STAGE_VISITOR: &str = "CREATE TEMP TABLE IF NOT EXISTS writer_stage_visitor (\
    tenant_id bigint, anonymous_id text, workspace_id bigint, user_id text, \
    first_seen_at timestamptz, last_seen_at timestamptz, first_utm jsonb, \
    first_referrer text, first_landing_page text, user_agent text, bot boolean) \
    ON COMMIT DELETE ROWS";

const COPY_VISITOR: &str = "COPY writer_stage_visitor (tenant_id, anonymous_id, workspace_id, \
    user_id, first_seen_at, last_seen_at, first_utm, first_referrer, \
    first_landing_page, user_agent, bot) FROM STDIN (FORMAT binary)";

// The CTE empties the stage as it reads it, so a later split attempt in the same transaction
// starts from an empty stage.
const MERGE_VISITOR: &str = "WITH s AS (DELETE FROM writer_stage_visitor RETURNING *) \
    INSERT INTO visitor AS v (tenant_id, anonymous_id, workspace_id, user_id, first_seen_at, \
      last_seen_at, event_count, first_utm, first_referrer, first_landing_page, user_agent, bot) \
    SELECT tenant_id, anonymous_id, workspace_id, user_id, first_seen_at, last_seen_at, \
      0, first_utm, first_referrer, first_landing_page, user_agent, bot \
    FROM s ORDER BY tenant_id, anonymous_id \
    ON CONFLICT (tenant_id, anonymous_id) DO UPDATE SET \
      first_seen_at = least(v.first_seen_at, excluded.first_seen_at), \
      last_seen_at = greatest(v.last_seen_at, excluded.last_seen_at), \
      first_utm = CASE WHEN excluded.first_seen_at < v.first_seen_at OR (excluded.first_seen_at = v.first_seen_at AND v.first_utm = '{}' AND v.first_referrer IS NULL AND v.first_landing_page IS NULL) THEN excluded.first_utm ELSE v.first_utm END, \
      first_referrer = CASE WHEN excluded.first_seen_at < v.first_seen_at OR (excluded.first_seen_at = v.first_seen_at AND v.first_utm = '{}' AND v.first_referrer IS NULL AND v.first_landing_page IS NULL) THEN excluded.first_referrer ELSE v.first_referrer END, \
      first_landing_page = CASE WHEN excluded.first_seen_at < v.first_seen_at OR (excluded.first_seen_at = v.first_seen_at AND v.first_utm = '{}' AND v.first_referrer IS NULL AND v.first_landing_page IS NULL) THEN excluded.first_landing_page ELSE v.first_landing_page END, \
      user_id = CASE WHEN excluded.last_seen_at >= v.last_seen_at THEN coalesce(excluded.user_id, v.user_id) ELSE coalesce(v.user_id, excluded.user_id) END, \
      user_agent = CASE WHEN excluded.last_seen_at >= v.last_seen_at THEN coalesce(excluded.user_agent, v.user_agent) ELSE coalesce(v.user_agent, excluded.user_agent) END, \
      bot = v.bot OR excluded.bot";

/// Folds messages with the same key into one, in arrival order, and returns one per key,
/// sorted by key: the merge then locks rows in one order in every transaction.
fn fold_by<'a, M: Clone, K: Ord + std::hash::Hash>(
    msgs: &[&'a M],
    key: impl Fn(&'a M) -> K,
    fold: impl Fn(&mut M, &M),
) -> Vec<M> {
    let mut folded: HashMap<K, M> = HashMap::with_capacity(msgs.len());
    for &m in msgs {
        match folded.entry(key(m)) {
            Entry::Occupied(mut acc) => fold(acc.get_mut(), m),
            Entry::Vacant(slot) => {
                slot.insert(m.clone());
            }
        }
    }
    let mut rows: Vec<(K, M)> = folded.into_iter().collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, m)| m).collect()
}

/// Merges visitor messages into `visitor`; returns the rows inserted or updated.
pub(crate) async fn visitors(
    tx: &Transaction<'_>,
    msgs: &[&VisitorMessage],
) -> Result<u64, tokio_postgres::Error> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let rows = fold_by(
        msgs,
        |m| (m.tenant_id, m.anonymous_id.as_str()),
        fold_visitor,
    );
    let mut enc = CopyEncoder::new(COPY_VISITOR);
    for m in &rows {
        enc.row();
        enc.i64(m.tenant_id);
        enc.text(&m.anonymous_id);
        enc.i64(m.workspace_id);
        enc.text_opt(m.user_id.as_deref());
        enc.ts(m.first_seen_at);
        enc.ts(m.last_seen_at);
        enc.jsonb(&m.first_touch.utm);
        enc.text_opt(m.first_touch.referrer.as_deref());
        enc.text_opt(m.first_touch.landing_page.as_deref());
        enc.text_opt(m.user_agent.as_deref());
        enc.bool(m.bot);
    }
    tx.batch_execute(STAGE_VISITOR).await?;
    copy::copy_in(tx, enc).await?;
    tx.execute(MERGE_VISITOR, &[]).await
}

const STAGE_SESSION: &str = "CREATE TEMP TABLE IF NOT EXISTS writer_stage_session (\
    tenant_id bigint, session_id text, workspace_id bigint, anonymous_id text, user_id text, \
    started_at timestamptz, last_seen_at timestamptz, \
    utm jsonb, referrer text, landing_page text, device jsonb, geo jsonb) ON COMMIT DELETE ROWS";

const COPY_SESSION: &str = "COPY writer_stage_session (tenant_id, session_id, workspace_id, \
    anonymous_id, user_id, started_at, last_seen_at, utm, referrer, \
    landing_page, device, geo) FROM STDIN (FORMAT binary)";

const MERGE_SESSION: &str = "WITH s AS (DELETE FROM writer_stage_session RETURNING *) \
    INSERT INTO session AS x (tenant_id, session_id, workspace_id, anonymous_id, user_id, \
      started_at, last_seen_at, event_count, page_count, utm, referrer, landing_page, device, geo) \
    SELECT tenant_id, session_id, workspace_id, anonymous_id, user_id, started_at, last_seen_at, \
      0, 0, utm, referrer, landing_page, device, geo \
    FROM s ORDER BY tenant_id, session_id \
    ON CONFLICT (tenant_id, session_id) DO UPDATE SET \
      started_at = least(x.started_at, excluded.started_at), \
      last_seen_at = greatest(x.last_seen_at, excluded.last_seen_at), \
      utm = CASE WHEN excluded.started_at < x.started_at OR (excluded.started_at = x.started_at AND x.utm = '{}' AND x.referrer IS NULL AND x.landing_page IS NULL) THEN excluded.utm ELSE x.utm END, \
      referrer = CASE WHEN excluded.started_at < x.started_at OR (excluded.started_at = x.started_at AND x.utm = '{}' AND x.referrer IS NULL AND x.landing_page IS NULL) THEN excluded.referrer ELSE x.referrer END, \
      landing_page = CASE WHEN excluded.started_at < x.started_at OR (excluded.started_at = x.started_at AND x.utm = '{}' AND x.referrer IS NULL AND x.landing_page IS NULL) THEN excluded.landing_page ELSE x.landing_page END, \
      anonymous_id = CASE WHEN excluded.last_seen_at >= x.last_seen_at THEN coalesce(excluded.anonymous_id, x.anonymous_id) ELSE coalesce(x.anonymous_id, excluded.anonymous_id) END, \
      user_id = CASE WHEN excluded.last_seen_at >= x.last_seen_at THEN coalesce(excluded.user_id, x.user_id) ELSE coalesce(x.user_id, excluded.user_id) END, \
      device = CASE WHEN excluded.last_seen_at >= x.last_seen_at THEN x.device || excluded.device ELSE excluded.device || x.device END, \
      geo = CASE WHEN excluded.last_seen_at >= x.last_seen_at THEN x.geo || excluded.geo ELSE excluded.geo || x.geo END";

/// Merges session messages into `session`; returns the rows inserted or updated.
pub(crate) async fn sessions(
    tx: &Transaction<'_>,
    msgs: &[&SessionMessage],
) -> Result<u64, tokio_postgres::Error> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let rows = fold_by(msgs, |m| (m.tenant_id, m.session_id.as_str()), fold_session);
    let mut enc = CopyEncoder::new(COPY_SESSION);
    for m in &rows {
        enc.row();
        enc.i64(m.tenant_id);
        enc.text(&m.session_id);
        enc.i64(m.workspace_id);
        enc.text_opt(m.anonymous_id.as_deref());
        enc.text_opt(m.user_id.as_deref());
        enc.ts(m.started_at);
        enc.ts(m.last_seen_at);
        enc.jsonb(&m.first_touch.utm);
        enc.text_opt(m.first_touch.referrer.as_deref());
        enc.text_opt(m.first_touch.landing_page.as_deref());
        enc.jsonb(&m.device);
        enc.jsonb(&m.geo);
    }
    tx.batch_execute(STAGE_SESSION).await?;
    copy::copy_in(tx, enc).await?;
    tx.execute(MERGE_SESSION, &[]).await
}

/// Visitor counters from claimed events: a visitor row without its message yet is made with
/// the events' times and no first touch; an existing one only counts up.
const COUNT_VISITORS: &str = "INSERT INTO visitor AS v (tenant_id, anonymous_id, workspace_id, \
      first_seen_at, last_seen_at, event_count, bot) \
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::timestamptz[], \
      $5::timestamptz[], $6::bigint[], $7::boolean[]) ORDER BY 1, 2 \
    ON CONFLICT (tenant_id, anonymous_id) DO UPDATE SET event_count = v.event_count + excluded.event_count";

/// Session counters from claimed events, like [`COUNT_VISITORS`].
const COUNT_SESSIONS: &str = "INSERT INTO session AS x (tenant_id, session_id, workspace_id, \
      anonymous_id, started_at, last_seen_at, event_count, page_count) \
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::timestamptz[], \
      $6::timestamptz[], $7::bigint[], $8::bigint[]) ORDER BY 1, 2 \
    ON CONFLICT (tenant_id, session_id) DO UPDATE SET event_count = x.event_count + excluded.event_count, \
      page_count = x.page_count + excluded.page_count";

/// One key's share of a batch's claimed events.
struct Tally<'a> {
    workspace_id: i64,
    anonymous_id: Option<&'a str>,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
    events: i64,
    pages: i64,
    bot: bool,
}

impl<'a> Tally<'a> {
    fn new(e: &'a EventMessage<impl Sized>) -> Tally<'a> {
        Tally {
            workspace_id: e.workspace_id,
            anonymous_id: e.anonymous_id.as_deref().filter(|a| !a.is_empty()),
            first: e.occurred_at,
            last: e.occurred_at,
            events: 0,
            pages: 0,
            bot: false,
        }
    }

    fn add(&mut self, e: &EventMessage<impl Sized>) {
        self.first = self.first.min(e.occurred_at);
        self.last = self.last.max(e.occurred_at);
        self.events += 1;
        // As the collector counts a session's pages: page, screen and pixel views.
        if matches!(
            e.kind,
            EventType::Page | EventType::Screen | EventType::Pixel
        ) {
            self.pages += 1;
        }
        self.bot |= e.bot;
    }
}

/// Adds the events just claimed (each id once, ever, within the dedup window) to their
/// visitor's and session's counters: two set-based statements per batch, pipelined.
pub(crate) async fn count_claimed<J>(
    tx: &Transaction<'_>,
    claimed: &[&EventMessage<J>],
) -> Result<(), tokio_postgres::Error> {
    let mut visitors: Tallies<'_> = HashMap::new();
    let mut sessions: Tallies<'_> = HashMap::new();
    for e in claimed {
        // An empty id names no row (the tables refuse it); the collector sends none.
        if let Some(a) = e.anonymous_id.as_deref().filter(|a| !a.is_empty()) {
            visitors
                .entry((e.tenant_id, a))
                .or_insert_with(|| Tally::new(e))
                .add(e);
        }
        if let Some(s) = e.session_id.as_deref().filter(|s| !s.is_empty()) {
            sessions
                .entry((e.tenant_id, s))
                .or_insert_with(|| Tally::new(e))
                .add(e);
        }
    }
    futures::try_join!(count_visitors(tx, &visitors), count_sessions(tx, &sessions))?;
    Ok(())
}

/// Claimed events' tallies by (tenant, anonymous id) or (tenant, session id).
type Tallies<'a> = HashMap<(i64, &'a str), Tally<'a>>;

/// Runs [`COUNT_VISITORS`] over the visitors' tallies, one array a column.
async fn count_visitors(
    tx: &Transaction<'_>,
    visitors: &Tallies<'_>,
) -> Result<u64, tokio_postgres::Error> {
    if visitors.is_empty() {
        return Ok(0);
    }
    let n = visitors.len();
    let (mut t, mut a, mut w) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut f, mut l, mut c, mut b) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((tenant, anon), x) in visitors {
        t.push(*tenant);
        a.push(*anon);
        w.push(x.workspace_id);
        f.push(x.first);
        l.push(x.last);
        c.push(x.events);
        b.push(x.bot);
    }
    tx.execute(COUNT_VISITORS, &[&t, &a, &w, &f, &l, &c, &b])
        .await
}

/// Runs [`COUNT_SESSIONS`] over the sessions' tallies, one array a column.
async fn count_sessions(
    tx: &Transaction<'_>,
    sessions: &Tallies<'_>,
) -> Result<u64, tokio_postgres::Error> {
    if sessions.is_empty() {
        return Ok(0);
    }
    let n = sessions.len();
    let (mut t, mut s, mut w, mut a) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut f, mut l, mut c, mut p) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((tenant, sid), x) in sessions {
        t.push(*tenant);
        s.push(*sid);
        w.push(x.workspace_id);
        a.push(x.anonymous_id);
        f.push(x.first);
        l.push(x.last);
        c.push(x.events);
        p.push(x.pages);
    }
    tx.execute(COUNT_SESSIONS, &[&t, &s, &w, &a, &f, &l, &c, &p])
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, Utc};
    use sluice_schema::messages::{Touch, VERSION};

    fn visitor(first: i64, last: i64, source: &str) -> VisitorMessage {
        let t0 = Utc::now();
        let mut utm = sluice_schema::messages::JsonObject::new();
        utm.insert("source".into(), source.into());
        VisitorMessage {
            v: VERSION,
            tenant_id: 1,
            workspace_id: 1,
            anonymous_id: "a".into(),
            user_id: None,
            first_seen_at: t0 + Duration::seconds(first),
            last_seen_at: t0 + Duration::seconds(last),
            event_count: 1,
            first_touch: Touch {
                utm,
                ..Touch::default()
            },
            user_agent: Some(source.into()),
            bot: false,
        }
    }

    #[test]
    fn visitor_fold_is_order_independent() {
        let (x, y) = (visitor(10, 20, "late"), visitor(0, 5, "early"));
        let mut a = x.clone();
        fold_visitor(&mut a, &y);
        let mut b = y.clone();
        fold_visitor(&mut b, &x);
        assert_eq!(a, b);
        assert_eq!(a.first_seen_at, y.first_seen_at);
        assert_eq!(a.last_seen_at, x.last_seen_at);
        assert_eq!(a.first_touch.utm["source"], "early");
        assert_eq!(a.user_agent.as_deref(), Some("late"));
    }
}
