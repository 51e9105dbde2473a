//! The visitor and session summaries of one request (docs/architecture.md §3.3), accumulated
//! message by message: first and last seen, counts, first touch, device and location.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_schema::messages::{
    JsonObject, RawObject, SessionMessage, Touch, VisitorMessage, VERSION,
};

use super::Client;
use crate::auth::Principal;
use crate::payload::{Kind, Message};

/// Running summary of one visitor or session within a request.
struct Summary {
    /// Earliest `occurred_at`.
    first: DateTime<Utc>,
    /// Latest `occurred_at`.
    last: DateTime<Utc>,
    /// Events (not identify/alias) counted.
    events: i64,
    /// Page, screen and pixel views counted.
    pages: i64,
    /// Attribution of the earliest message.
    touch: Touch,
    /// Visitor of the first message (sessions).
    anonymous_id: Option<String>,
    /// Latest known user id.
    user_id: Option<String>,
    /// Device facts of the first message (sessions).
    device: JsonObject,
    /// Location facts of the first message (sessions).
    geo: JsonObject,
}

impl Summary {
    fn new(at: DateTime<Utc>, m: &Message, touch: &Touch) -> Summary {
        Summary {
            first: at,
            last: at,
            events: 0,
            pages: 0,
            touch: touch.clone(),
            anonymous_id: m.anonymous_id.clone(),
            user_id: m.user_id.clone(),
            device: pick(&m.context, ["device", "os", "screen", "userAgent"]),
            geo: pick(&m.context, ["location", "timezone", "locale"]),
        }
    }

    fn add(&mut self, at: DateTime<Utc>, m: &Message, touch: &Touch, is_event: bool) {
        if at < self.first {
            self.first = at;
            self.touch.clone_from(touch);
        }
        self.last = self.last.max(at);
        if is_event {
            self.events += 1;
        }
        if matches!(m.kind, Kind::Page | Kind::Screen | Kind::Pixel) {
            self.pages += 1;
        }
        if m.user_id.is_some() {
            self.user_id.clone_from(&m.user_id);
        }
    }
}

/// The `fields` of `o` there are, as values: read only for a session's first message.
fn pick<const N: usize>(o: &RawObject, fields: [&str; N]) -> JsonObject {
    let found = crate::payload::raw::pick(o.get(), &fields);
    fields
        .into_iter()
        .zip(found)
        .filter_map(|(f, v)| Some((f.to_owned(), serde_json::from_str::<Value>(v?.get()).ok()?)))
        .collect()
}

/// Summaries by key in first-seen order: the index map keeps the output deterministic.
#[derive(Default)]
struct Keyed {
    entries: Vec<(String, Summary)>,
    at: HashMap<String, usize>,
}

impl Keyed {
    fn add(&mut self, key: &str, at: DateTime<Utc>, m: &Message, touch: &Touch, is_event: bool) {
        match self.at.get(key) {
            Some(&i) => self.entries[i].1.add(at, m, touch, is_event),
            None => {
                let mut s = Summary::new(at, m, touch);
                s.add(at, m, touch, is_event);
                self.at.insert(key.to_owned(), self.entries.len());
                self.entries.push((key.to_owned(), s));
            }
        }
    }
}

/// The visitor and session summaries of one request, accumulated message by message.
#[derive(Default)]
pub(super) struct Summaries {
    visitors: Keyed,
    sessions: Keyed,
    /// The first message's user agent and bot flag: the visitor's.
    request_ua: Option<String>,
    request_bot: bool,
}

impl Summaries {
    pub(super) fn first_client(&mut self, client: &Client) {
        if self.request_ua.is_none() {
            self.request_ua.clone_from(&client.user_agent);
            self.request_bot = client.bot;
        }
    }

    /// Counts `m`, whose attribution is `touch`, in its visitor's and session's summaries.
    pub(super) fn add(&mut self, at: DateTime<Utc>, m: &Message, touch: &Touch) {
        let is_event = !matches!(m.kind, Kind::Identify | Kind::Alias);
        if let Some(anon) = m.anonymous_id.as_ref() {
            self.visitors.add(anon, at, m, touch, is_event);
        }
        if let Some(sid) = m.session_id.as_ref() {
            self.sessions.add(sid, at, m, touch, is_event);
        }
    }

    pub(super) fn finish(self, principal: Principal) -> (Vec<VisitorMessage>, Vec<SessionMessage>) {
        let Principal {
            tenant_id,
            workspace_id,
            ..
        } = principal;
        let (request_ua, request_bot) = (self.request_ua, self.request_bot);
        let visitors = self
            .visitors
            .entries
            .into_iter()
            .map(|(anonymous_id, s)| VisitorMessage {
                v: VERSION,
                tenant_id,
                workspace_id,
                anonymous_id,
                user_id: s.user_id,
                first_seen_at: s.first,
                last_seen_at: s.last,
                event_count: s.events,
                first_touch: s.touch,
                user_agent: request_ua.clone(),
                bot: request_bot,
            })
            .collect();
        let sessions = self
            .sessions
            .entries
            .into_iter()
            .map(|(session_id, s)| SessionMessage {
                v: VERSION,
                tenant_id,
                workspace_id,
                session_id,
                anonymous_id: s.anonymous_id,
                user_id: s.user_id,
                started_at: s.first,
                last_seen_at: s.last,
                event_count: s.events,
                page_count: s.pages,
                first_touch: s.touch,
                device: s.device,
                geo: s.geo,
            })
            .collect();
        (visitors, sessions)
    }
}
