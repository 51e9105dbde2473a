//! Validated messages to Kafka messages (docs/architecture.md §3.3): receive time, skew-corrected
//! `occurred_at`, client IP (trusted proxies only), user agent and bot flag, UTM parameters
//! from the page URL; and the visitor and session summaries of each request.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sluice_schema::messages::{
    event_id, EventMessage, EventType, IdentityKind, IdentityMessage, JsonObject, RawObject,
    SessionMessage, Touch, VisitorMessage, VERSION,
};
use uuid::Uuid;

use crate::auth::Principal;
use crate::config::Cidr;
use crate::payload::raw::{entries, pick, with_entries};
use crate::payload::{Kind, Message};

mod summaries;
use summaries::Summaries;

/// Facts of the request that every message of it shares.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    /// Who sent it (from the key, never from the body).
    pub principal: Principal,
    /// When the collector received it.
    pub received_at: DateTime<Utc>,
    /// The client's address, after trusted proxies.
    pub ip: Option<IpAddr>,
    /// The request's `User-Agent`.
    pub user_agent: Option<String>,
    /// How far after `received_at` an `occurred_at` may lie; later ones are a broken client
    /// clock, and become `received_at` (the client's `timestamp` is kept as sent).
    pub max_future: chrono::TimeDelta,
}

/// The messages one request yields, by topic.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outgoing {
    /// Events (track, page, screen, group, pixel), `properties` and `context` as text.
    pub events: Vec<EventMessage<RawObject>>,
    /// Identify and alias calls.
    pub identities: Vec<IdentityMessage>,
    /// One per visitor seen in the request.
    pub visitors: Vec<VisitorMessage>,
    /// One per session seen in the request.
    pub sessions: Vec<SessionMessage<RawObject>>,
}

/// The client's address: the socket peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read from the right, skipping trusted hops, and the first untrusted
/// address is the client. Reading from the right matters: the left end is whatever the
/// client chose to write.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = peer.ip();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer_ip) {
        return peer_ip;
    }
    let mut client = peer_ip;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A garbled hop: nothing left of it can be believed.
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// Substrings (lower case) of crawler and automation user agents. Flagged, never dropped.
const BOT_MARKERS: [&str; 14] = [
    "bot",
    "crawl",
    "spider",
    "slurp",
    "headlesschrome",
    "lighthouse",
    "phantomjs",
    "facebookexternalhit",
    "bingpreview",
    "mediapartners-google",
    "python-requests",
    "curl/",
    "wget/",
    "scrapy",
];

/// True when the user agent looks like a crawler or automation.
pub fn is_bot(user_agent: &str) -> bool {
    let ua = user_agent.to_ascii_lowercase();
    BOT_MARKERS.iter().any(|m| ua.contains(m))
}

/// UTM parameters of a URL, named as in `Touch::utm` (`source`, `medium`, ...).
pub fn utm_from_url(url: &str) -> JsonObject {
    let mut utm = JsonObject::new();
    let Some((_, query)) = url.split_once('?') else {
        return utm;
    };
    let query = query.split('#').next().unwrap_or_default();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let field = match name.as_ref() {
            "utm_source" => "source",
            "utm_medium" => "medium",
            "utm_campaign" => "campaign",
            "utm_term" => "term",
            "utm_content" => "content",
            _ => continue,
        };
        if !value.is_empty() {
            utm.entry(field)
                .or_insert(Value::String(value.into_owned()));
        }
    }
    utm
}

/// Attribution of one message: UTM from the page URL (or the SDK's `context.campaign`),
/// referrer, and the page URL, taken out of what the parse read for enrichment.
fn touch_of(m: &mut Message) -> Touch {
    let url = m.peeked.page_url.take();
    let mut utm = url.as_deref().map(utm_from_url).unwrap_or_default();
    if utm.is_empty() {
        utm = std::mem::take(&mut m.peeked.campaign_utm);
    }
    Touch {
        utm,
        referrer: m.peeked.referrer.take(),
        landing_page: url,
    }
}

/// `occurred_at` corrected for the client's clock: the client says the event happened
/// `sentAt - timestamp` before sending, so it happened that long before we received it.
/// Without `sentAt`, `timestamp` as is; without either, the receive time.
pub fn occurred_at(
    timestamp: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
) -> DateTime<Utc> {
    match (timestamp, sent_at) {
        // Checked: client times are anything from year 0 to 9999, and a correction that
        // leaves chrono's range must not panic; the uncorrected time is then the best guess.
        (Some(ts), Some(sent)) => received_at
            .checked_sub_signed(sent.signed_duration_since(ts))
            .unwrap_or(ts),
        (Some(ts), None) => ts,
        (None, _) => received_at,
    }
}

/// Turns one request's validated messages into docs/architecture.md §3.3's messages.
pub fn enrich(messages: Vec<Message>, facts: &RequestFacts) -> Outgoing {
    let mut out = Outgoing::default();
    let mut summaries = Summaries::default();
    // Written out once: most messages have no address of their own.
    let request_ip = facts.ip.map(|ip| ip.to_string());
    // A batch's messages mostly come from one browser: its agent is searched for bot markers
    // once, not once a message.
    let mut last_agent = None;
    for mut m in messages {
        let mut at = occurred_at(m.timestamp, m.sent_at, facts.received_at);
        if at.signed_duration_since(facts.received_at) > facts.max_future {
            at = facts.received_at;
        }
        let message_id = m
            .message_id
            .take()
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let client = Client::of(&mut m, facts, request_ip.as_deref(), &mut last_agent);
        summaries.first_client(&client);
        let touch = touch_of(&mut m);
        if !matches!(m.kind, Kind::Alias) {
            add_campaign(&mut m, &touch);
        }
        summaries.add(at, &m, &touch);
        let kind = match m.kind {
            Kind::Track => EventType::Track,
            Kind::Page => EventType::Page,
            Kind::Screen => EventType::Screen,
            Kind::Group => EventType::Group,
            Kind::Pixel => EventType::Pixel,
            Kind::Identify | Kind::Alias => {
                out.identities
                    .push(identity_message(m, message_id, at, facts));
                continue;
            }
        };
        let event = event_message(m, kind, message_id, at, client, facts);
        out.events.push(event);
    }
    (out.visitors, out.sessions) = summaries.finish(facts.principal);
    out
}

/// Who sent one message: the end user's agent and address.
struct Client {
    user_agent: Option<String>,
    ip: Option<String>,
    bot: bool,
}

impl Client {
    /// Segment semantics: a server SDK forwards the end user's agent and address in
    /// `context`; the request's own are the SDK's, so they only fill in.
    /// `last_agent`: the agent last flagged in this request, and its flag.
    fn of(
        m: &mut Message,
        facts: &RequestFacts,
        request_ip: Option<&str>,
        last_agent: &mut Option<(String, bool)>,
    ) -> Client {
        let user_agent = m
            .peeked
            .user_agent
            .take()
            .or_else(|| facts.user_agent.clone());
        let ip = m
            .peeked
            .ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
            .map(|ip| ip.to_string())
            .or_else(|| request_ip.map(str::to_owned));
        let bot = match (user_agent.as_deref(), &*last_agent) {
            (None, _) => false,
            (Some(ua), Some((seen, bot))) if seen == ua => *bot,
            (Some(ua), _) => {
                let bot = is_bot(ua);
                *last_agent = Some((ua.to_owned(), bot));
                bot
            }
        };
        Client {
            user_agent,
            ip,
            bot,
        }
    }
}

/// The message's UTM parameters as Segment's `context.campaign` (`utm_campaign` as `name`),
/// unless the client sent one.
fn add_campaign(m: &mut Message, touch: &Touch) {
    if m.peeked.has_campaign || touch.utm.is_empty() {
        return;
    }
    /// The UTM parameters written as the campaign object, not copied into one.
    struct Campaign<'a>(&'a JsonObject);
    impl serde::Serialize for Campaign<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(self.0.iter().map(|(k, v)| {
                let k = if k == "campaign" { "name" } else { k };
                (k, v)
            }))
        }
    }
    let Ok(campaign) = serde_json::value::to_raw_value(&Campaign(&touch.utm)) else {
        return;
    };
    // `context` has no `campaign` (`has_campaign`), so it is added, not repeated.
    let context = with_entries(&entries(m.context.get()), [("campaign", &*campaign)]);
    m.context = context;
    m.peeked.has_campaign = true;
}

/// An identify or alias, for the identity topic.
fn identity_message(
    m: Message,
    message_id: String,
    at: DateTime<Utc>,
    facts: &RequestFacts,
) -> IdentityMessage {
    IdentityMessage {
        v: VERSION,
        tenant_id: facts.principal.tenant_id,
        workspace_id: facts.principal.workspace_id,
        kind: if m.kind == Kind::Identify {
            IdentityKind::Identify
        } else {
            IdentityKind::Alias
        },
        message_id,
        anonymous_id: m.anonymous_id,
        user_id: m.user_id,
        previous_id: m.previous_id,
        traits: m.traits,
        context: m.context.to_object(),
        occurred_at: at,
        received_at: facts.received_at,
        // Sealed after enrichment (`seal`), by a collector with PII keys.
        pii: None,
    }
}

/// A track, page, screen, group or pixel, for the event topic; traits riding along lose
/// their personal data.
fn event_message(
    m: Message,
    kind: EventType,
    message_id: String,
    at: DateTime<Utc>,
    client: Client,
    facts: &RequestFacts,
) -> EventMessage<RawObject> {
    let mut properties = m.properties;
    if m.kind == Kind::Group {
        // Rare enough to be written out again whole.
        let mut with_group = properties.to_object();
        if let Some(group_id) = m.group_id {
            with_group.insert("groupId".into(), Value::String(group_id));
        }
        let mut traits = m.traits;
        strip_pii(&mut traits);
        with_group.insert("traits".into(), Value::Object(traits));
        properties = RawObject::of(&with_group);
    }
    let mut context = m.context;
    strip_traits(&mut context, &sluice_schema::pii::SEALED_TRAITS);
    let tenant_id = facts.principal.tenant_id;
    EventMessage {
        v: VERSION,
        tenant_id,
        workspace_id: facts.principal.workspace_id,
        event_id: event_id(tenant_id, &message_id),
        message_id,
        kind,
        name: m.name,
        anonymous_id: m.anonymous_id,
        user_id: m.user_id,
        session_id: m.session_id,
        occurred_at: at,
        timestamp: m.timestamp,
        sent_at: m.sent_at,
        received_at: facts.received_at,
        properties,
        context,
        ip: client.ip,
        user_agent: client.user_agent,
        bot: client.bot,
    }
}

/// Removes personal data from traits that ride along on an event (analytics.js copies the
/// user's traits into `context.traits` of every call; group calls carry `traits`): events are
/// stored as they are, so email and phone would sit there in plaintext. Identify calls keep
/// them here: [`crate::seal`] seals them before the messages are produced (and drops the
/// other configured personal traits from events).
fn strip_pii(traits: &mut JsonObject) {
    for key in sluice_schema::pii::SEALED_TRAITS {
        traits.remove(key);
    }
}

/// Removes `names` from the `traits` object of `object` (text), writing it out again only when
/// one was there. An object whose text names no `traits` (and has no escape that could spell
/// it) is left unread.
pub(crate) fn strip_traits<S: AsRef<str>>(object: &mut RawObject, names: &[S]) {
    let text = object.get();
    if !text.contains("traits") && !text.contains('\\') {
        return;
    }
    let [traits] = pick(text, &["traits"]);
    let Some(traits) = traits else {
        return;
    };
    let traits = entries(traits.get());
    if !names
        .iter()
        .any(|n| traits.iter().any(|(k, _)| k == n.as_ref()))
    {
        return;
    }
    let mut whole = object.to_object();
    if let Some(Value::Object(traits)) = whole.get_mut("traits") {
        for name in names {
            traits.remove(name.as_ref());
        }
    }
    *object = RawObject::of(&whole);
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use chrono::{Datelike, Duration};

    /// A batch body parsed and enriched as a request from `ip` with `user_agent`.
    fn enrich_batch(
        body: &str,
        ip: Option<IpAddr>,
        user_agent: Option<&str>,
    ) -> (Outgoing, RequestFacts) {
        let parsed = crate::payload::parse(
            body.as_bytes(),
            crate::payload::Endpoint::Batch,
            &Default::default(),
        )
        .unwrap();
        let facts = RequestFacts {
            principal: Principal {
                key_id: 1,
                tenant_id: 1,
                workspace_id: 1,
            },
            received_at: Utc::now(),
            ip,
            user_agent: user_agent.map(str::to_owned),
            max_future: Duration::days(1),
        };
        let messages = parsed.messages.into_iter().map(|(_, m)| m).collect();
        (enrich(messages, &facts), facts)
    }

    #[test]
    fn skew_is_corrected_by_the_send_delay() {
        let received = Utc::now();
        let client_clock_ahead = Duration::hours(2);
        let sent = received + client_clock_ahead;
        let ts = sent - Duration::seconds(30);
        assert_eq!(
            occurred_at(Some(ts), Some(sent), received),
            received - Duration::seconds(30)
        );
        assert_eq!(occurred_at(Some(ts), None, received), ts);
        assert_eq!(occurred_at(None, Some(sent), received), received);
        // The extremes of what a client may send do not overflow.
        let year_0 = DateTime::parse_from_rfc3339("0000-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let year_9999 = DateTime::parse_from_rfc3339("9999-12-31T23:59:59Z")
            .unwrap()
            .to_utc();
        let _ = occurred_at(Some(year_0), Some(year_9999), received);
        let _ = occurred_at(Some(year_9999), Some(year_0), received);
    }

    #[test]
    fn a_time_beyond_the_future_bound_becomes_the_receive_time() {
        let body = r#"{"batch": [
            {"type": "track", "event": "E", "userId": "u", "timestamp": "9999-01-01T00:00:00Z"},
            {"type": "track", "event": "E", "userId": "u", "timestamp": "2001-01-01T00:00:00Z"}]}"#;
        let (out, facts) = enrich_batch(body, None, None);
        assert_eq!(out.events[0].occurred_at, facts.received_at);
        assert_eq!(
            out.events[0].timestamp.map(|t| t.year()),
            Some(9999),
            "kept as sent"
        );
        assert_eq!(
            out.events[1].occurred_at.year(),
            2001,
            "the past is believed"
        );
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.7, 10.0.0.2"),
        );
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &h, &trusted), stranger.ip());
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy.ip());
        assert_eq!(client_ip(proxy, &h, &[]), proxy.ip());
    }

    #[test]
    fn utm_and_bots() {
        let utm = utm_from_url(
            "https://x.io/a?utm_source=news&utm_medium=email&utm_campaign=spring%20sale&q=1#top",
        );
        assert_eq!(utm["source"], "news");
        assert_eq!(utm["campaign"], "spring sale");
        assert_eq!(utm.len(), 3);
        assert!(utm_from_url("https://x.io/").is_empty());
        assert!(is_bot("Mozilla/5.0 (compatible; Googlebot/2.1)"));
        assert!(!is_bot("Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"));
    }

    #[test]
    fn a_session_keeps_the_device_and_location_of_its_first_message_as_sent() {
        let body = r#"{"batch": [
            {"type": "page", "userId": "u", "anonymousId": "a", "sessionId": "s",
             "timestamp": "2026-01-01T00:00:02Z",
             "context": {"os": {"name": "Linux"}, "ip": "1.2.3.4", "locale": "de-DE",
                         "device": {"type": "desktop", "type": "laptop"}, "timezone": "Europe/Berlin"}},
            {"type": "track", "event": "E", "anonymousId": "a", "sessionId": "s",
             "timestamp": "2026-01-01T00:00:01Z",
             "context": {"os": {"name": "Android"}, "location": {"city": "Bonn"}}}]}"#;
        let (out, _) = enrich_batch(body, None, None);
        let [session] = &out.sessions[..] else {
            panic!("one session: {:?}", out.sessions)
        };
        // Read back as the writer reads it: maps, a repeated key's last value winning.
        let json = serde_json::to_string(session).unwrap();
        let read: SessionMessage = serde_json::from_str(&json).unwrap();
        assert_eq!(
            Value::Object(read.device),
            serde_json::json!({"device": {"type": "laptop"}, "os": {"name": "Linux"}})
        );
        assert_eq!(
            Value::Object(read.geo),
            serde_json::json!({"timezone": "Europe/Berlin", "locale": "de-DE"})
        );
        assert_eq!(read.anonymous_id.as_deref(), Some("a"));
        assert_eq!((read.event_count, read.page_count), (2, 1));
        let [visitor] = &out.visitors[..] else {
            panic!("one visitor: {:?}", out.visitors)
        };
        assert_eq!(visitor.event_count, 2);
        assert_eq!(visitor.user_id.as_deref(), Some("u"));
    }

    #[test]
    fn summaries_stay_one_per_key_past_the_scanned_few() {
        // 40 visitors, each twice, in turn: the second round finds them through the index.
        let messages: Vec<String> = (0..80)
            .map(|i| {
                format!(r#"{{"type": "track", "event": "E", "anonymousId": "a{}", "sessionId": "s{}"}}"#, i % 40, i % 40)
            })
            .collect();
        let body = format!(r#"{{"batch": [{}]}}"#, messages.join(","));
        let (out, _) = enrich_batch(&body, None, None);
        assert_eq!(out.visitors.len(), 40);
        assert_eq!(out.sessions.len(), 40);
        assert!(out.visitors.iter().all(|v| v.event_count == 2));
        assert!(out.sessions.iter().all(|s| s.event_count == 2));
        let order: Vec<&str> = out
            .visitors
            .iter()
            .map(|v| v.anonymous_id.as_str())
            .collect();
        assert_eq!(order[..3], ["a0", "a1", "a2"], "first-seen order");
    }

    #[test]
    fn each_message_keeps_its_own_agent_flag_and_address() {
        // Agents flagged once a run of equal ones, addresses written once a request: neither
        // may carry one message's over to the next.
        let body = r#"{"batch": [
            {"type": "track", "event": "E", "userId": "u", "context": {"userAgent": "Googlebot/2.1"}},
            {"type": "track", "event": "E", "userId": "u", "context": {"userAgent": "Googlebot/2.1"}},
            {"type": "track", "event": "E", "userId": "u", "context": {"userAgent": "Firefox/120.0", "ip": "203.0.113.9"}},
            {"type": "track", "event": "E", "userId": "u"},
            {"type": "track", "event": "E", "userId": "u", "context": {"userAgent": "GOOGLEBOT/2.1"}}]}"#;
        let (out, _) = enrich_batch(body, "198.51.100.1".parse().ok(), Some("curl/8.0"));
        let seen: Vec<_> = out
            .events
            .iter()
            .map(|e| {
                (
                    e.user_agent.as_deref().unwrap(),
                    e.bot,
                    e.ip.as_deref().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("Googlebot/2.1", true, "198.51.100.1"),
                ("Googlebot/2.1", true, "198.51.100.1"),
                ("Firefox/120.0", false, "203.0.113.9"),
                ("curl/8.0", true, "198.51.100.1"),
                ("GOOGLEBOT/2.1", true, "198.51.100.1"),
            ]
        );
    }
}
