//! The visitor and session summaries of one request (docs/architecture.md §3.3), accumulated
//! message by message: first and last seen, counts, first touch, device and location.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;
use sluice_schema::messages::{RawObject, SessionMessage, Touch, VisitorMessage, VERSION};

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
    /// Latest known user id.
    user_id: Option<String>,
    /// What a session keeps of its first message; a visitor's summary has none of it.
    session: Option<FirstOfSession>,
}

/// A session's visitor, device and location, from its first message.
#[derive(Default)]
struct FirstOfSession {
    anonymous_id: Option<String>,
    device: RawObject,
    geo: RawObject,
}

impl FirstOfSession {
    fn of(m: &Message) -> FirstOfSession {
        const FIELDS: [&str; 7] = [
            "device",
            "os",
            "screen",
            "userAgent",
            "location",
            "timezone",
            "locale",
        ];
        // One pass over the context for both objects; the values go on as their text (the
        // guard checked it), not as trees of maps.
        let found = crate::payload::raw::pick(m.context.get(), &FIELDS);
        let fields: [(&str, Option<&RawValue>); 7] = std::array::from_fn(|i| (FIELDS[i], found[i]));
        let (device, geo) = fields.split_at(4);
        FirstOfSession {
            anonymous_id: m.anonymous_id.clone(),
            device: object_of(device),
            geo: object_of(geo),
        }
    }
}

/// The object of the `fields` that were found, their values as they came.
fn object_of(fields: &[(&str, Option<&RawValue>)]) -> RawObject {
    struct Found<'a, 'f>(&'f [(&'a str, Option<&'a RawValue>)]);
    impl Serialize for Found<'_, '_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().filter_map(|(f, v)| Some((*f, (*v)?))))
        }
    }
    // A map of string keys and JSON values always writes.
    serde_json::value::to_raw_value(&Found(fields))
        .ok()
        .and_then(RawObject::new)
        .unwrap_or_default()
}

impl Summary {
    fn new(at: DateTime<Utc>, m: &Message, touch: &Touch, session: bool) -> Summary {
        Summary {
            first: at,
            last: at,
            events: 0,
            pages: 0,
            touch: touch.clone(),
            user_id: m.user_id.clone(),
            session: session.then(|| FirstOfSession::of(m)),
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

/// Summaries by key in first-seen order. A request has a few visitors and sessions: they are
/// found by a scan until there are enough for an index to pay (a server's batch of many
/// users' messages), which keeps the hashing and the keys' second copies off single calls.
#[derive(Default)]
struct Keyed {
    entries: Vec<(String, Summary)>,
    /// Index into `entries`, built once they are [`Keyed::SCANNED`].
    at: HashMap<String, usize>,
}

impl Keyed {
    const SCANNED: usize = 16;

    fn find(&mut self, key: &str) -> Option<usize> {
        if self.entries.len() < Self::SCANNED {
            return self.entries.iter().position(|(k, _)| k == key);
        }
        if self.at.is_empty() {
            self.at = (self.entries.iter().enumerate())
                .map(|(i, (k, _))| (k.clone(), i))
                .collect();
        }
        self.at.get(key).copied()
    }

    /// Counts `m` in the summary of `key`, made when it is the key's first message (with
    /// what a session keeps of it when `session`).
    fn add(&mut self, key: &str, at: DateTime<Utc>, m: &Message, touch: &Touch, session: bool) {
        let is_event = !matches!(m.kind, Kind::Identify | Kind::Alias);
        match self.find(key) {
            Some(i) => self.entries[i].1.add(at, m, touch, is_event),
            None => {
                let mut s = Summary::new(at, m, touch, session);
                s.add(at, m, touch, is_event);
                if !self.at.is_empty() {
                    self.at.insert(key.to_owned(), self.entries.len());
                }
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
        if let Some(anon) = m.anonymous_id.as_ref() {
            self.visitors.add(anon, at, m, touch, false);
        }
        if let Some(sid) = m.session_id.as_ref() {
            self.sessions.add(sid, at, m, touch, true);
        }
    }

    pub(super) fn finish(
        self,
        principal: Principal,
    ) -> (Vec<VisitorMessage>, Vec<SessionMessage<RawObject>>) {
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
            .map(|(session_id, s)| {
                // Always there: sessions are made with it (`Summaries::add`).
                let first = s.session.unwrap_or_default();
                SessionMessage {
                    v: VERSION,
                    tenant_id,
                    workspace_id,
                    session_id,
                    anonymous_id: first.anonymous_id,
                    user_id: s.user_id,
                    started_at: s.first,
                    last_seen_at: s.last,
                    event_count: s.events,
                    page_count: s.pages,
                    first_touch: s.touch,
                    device: first.device,
                    geo: first.geo,
                }
            })
            .collect();
        (visitors, sessions)
    }
}
