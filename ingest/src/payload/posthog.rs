//! PostHog's capture API: request bodies as posthog-js, posthog-node and posthog-python send
//! them, decoded and mapped onto the Segment-shaped messages the rest of the pipeline takes
//! (so keys, limits, enrichment and produce are the Segment path's, unchanged), and the
//! remote-config and feature-flag answers that switch every PostHog remote feature off.
//!
//! The mapping ([`to_segment`]) is pure: one PostHog event in, one Segment message out (or a
//! refusal with its reason), checked by [`segment::validate`] like any Segment message.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{json, Map, Value};

use super::json::parse_json;
use super::{body, segment, Defaults, Limits, Parsed, PayloadError, Reason, Rejected};

/// The first two bytes of every gzip stream. posthog-js 1.449 sends gzip bodies as
/// `text/plain` with no `compression=` parameter and no `Content-Encoding` (both would cost
/// a CORS preflight or a query string), so the bytes are the only sign.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Undoes a capture request's encodings, leaving JSON bytes: gzip (`Content-Encoding`,
/// `compression=gzip-js` or `gzip` in the query, or gzip bytes under any label), `data=`
/// forms with base64 or plain JSON (body, or the query of a `GET`), and `text/plain`.
pub fn decode(
    raw: &[u8],
    query: &str,
    content_encoding: Option<&str>,
    content_type: Option<&str>,
    limits: &Limits,
) -> Result<Vec<u8>, PayloadError> {
    let compression = query_param(query, "compression");
    if compression.as_deref() == Some("lz64") {
        return Err(PayloadError::BadRequest(
            "compression=lz64 is not supported; send gzip-js, base64 or plain JSON \
             (posthog-js 1.20 or later does)"
                .into(),
        ));
    }
    let gzipped =
        raw.starts_with(&GZIP_MAGIC) || matches!(compression.as_deref(), Some("gzip-js" | "gzip"));
    let encoding = match content_encoding {
        Some(e) if !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity") => Some(e),
        _ if gzipped && !raw.is_empty() => Some("gzip"),
        _ => None,
    };
    let body = if raw.is_empty() {
        // A `GET /e/?data=...`: the event is in the query, as in a form body.
        if query_param(query, "data").is_none() {
            return Err(PayloadError::BadRequest(
                "no event: send a JSON body, or data=<base64 JSON> in the query".into(),
            ));
        }
        body::pixel_data(query)?
    } else {
        body::decode_body(raw, encoding, content_type, limits)?.into_owned()
    };
    let starts_like_json = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{' || *b == b'[');
    if starts_like_json {
        return Ok(body);
    }
    // `compression=base64` without the `data=` form around it.
    std::str::from_utf8(&body)
        .ok()
        .and_then(body::decode_base64)
        .filter(|json| json.first().is_some_and(|b| *b == b'{' || *b == b'['))
        .ok_or_else(|| {
            PayloadError::BadRequest(
                "the body is neither JSON, gzip-compressed JSON, nor base64 JSON; \
                 send what a PostHog SDK sends"
                    .into(),
            )
        })
}

/// One query parameter's value, URL-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Parses a decoded capture body into messages: `{"api_key", "batch": [...], "sent_at"}`, a
/// bare array of events, or one event. The project key comes from `api_key`, `token` or
/// `$token` of the body or of its events, or from an event's `properties.token`. A body
/// without `sent_at` takes it from the query (`sent_at`, or `_` in epoch milliseconds, as
/// posthog-js puts it on the URL).
pub fn parse(
    json: &[u8],
    query: &str,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Parsed, PayloadError> {
    let value: Value = parse_json(json, limits.max_json_depth)?;
    let mut body_key = None;
    let mut sent_at = None;
    let events = match value {
        Value::Array(events) => events,
        Value::Object(mut body) if body.contains_key("batch") => {
            body_key = take_key(&mut body);
            sent_at = body.remove("sent_at").filter(|v| !v.is_null());
            match body.remove("batch") {
                Some(Value::Array(events)) => events,
                _ => {
                    return Err(PayloadError::BadRequest(
                        "\"batch\" must be an array of events".into(),
                    ))
                }
            }
        }
        Value::Object(event) => vec![Value::Object(event)],
        _ => {
            return Err(PayloadError::BadRequest(
                "the JSON is neither an event, an array of events, nor {\"batch\": [...]}".into(),
            ))
        }
    };
    if events.len() > limits.max_batch_messages {
        return Err(PayloadError::TooLarge {
            what: "batch (in events, not bytes)",
            limit: limits.max_batch_messages,
        });
    }
    let sent_at = sent_at.or_else(|| {
        query_param(query, "sent_at")
            .or_else(|| query_param(query, "_"))
            .and_then(|ms| ms.parse::<i64>().ok())
            .map(Value::from)
    });
    let defaults = Defaults::default();
    let mut parsed = Parsed {
        write_key: body_key,
        ..Parsed::default()
    };
    for (index, event) in events.into_iter().enumerate() {
        let message_id = event
            .get("uuid")
            .and_then(Value::as_str)
            .filter(|id| id.len() <= limits.max_id_bytes)
            .map(str::to_owned);
        let Value::Object(mut event) = event else {
            parsed.rejected.push(Rejected {
                index,
                message_id,
                reason: Reason::NotAnObject,
                detail: "an event must be a JSON object".into(),
            });
            continue;
        };
        if let Some(key) = take_key(&mut event) {
            parsed.note_key(&key, "project keys")?;
        }
        if event.get("sent_at").is_none_or(Value::is_null) {
            if let Some(sent) = &sent_at {
                event.insert("sent_at".into(), sent.clone());
            }
        }
        let mapped = to_segment(event, received_at)
            .and_then(|m| segment::validate(m, None, &defaults, limits));
        parsed.push(index, message_id, mapped);
    }
    Ok(parsed)
}

/// Removes every form of the project key from a body or an event (it must never reach
/// Kafka) and returns the first one found.
fn take_key(m: &mut Map<String, Value>) -> Option<String> {
    let mut found = None;
    let mut note = |v: Option<Value>| {
        if let Some(Value::String(key)) = v {
            if found.is_none() && !key.is_empty() {
                found = Some(key);
            }
        }
    };
    for field in ["api_key", "token", "$token"] {
        note(m.remove(field));
    }
    if let Some(Value::Object(props)) = m.get_mut("properties") {
        note(props.remove("token"));
    }
    found
}

/// A non-empty id: a string, or a number kept as text.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Maps one PostHog event onto a Segment message (the table in docs/ingest.md):
///
/// - `$identify`, `$set` and `$set_once` (and a body without `event` but with `$set` or
///   `$distinct_id`, the old `/engage/` one) are an identify of `distinct_id`, from
///   `$anon_distinct_id` (else `$device_id`); `$set` and `$set_once` are its traits (`$set`
///   wins);
/// - `$create_alias` is an alias: `properties.alias` becomes `distinct_id`;
/// - `$groupidentify` is a group: `$group_key`, with `$group_set` as traits;
/// - `$pageview` a page (`$current_url`, `$pathname`, `$referrer`, `title` in
///   `context.page`), `$screen` a screen named `$screen_name`, anything else a track;
/// - the visitor (`anonymousId`) is `$device_id`, else `$anon_distinct_id`, else
///   `distinct_id`; `distinct_id` is also the `userId` when it is another id than that;
/// - `uuid` is the `messageId`, `$session_id` the session, `timestamp` and `sent_at` are
///   `timestamp` and `sentAt` (so the skew correction is Segment's, which is PostHog's);
///   without a `timestamp`, `offset` milliseconds before receipt (and `sent_at` is not
///   applied to that server-clock time);
/// - every `$`-property, and every top-level field not named here, goes to `context` under
///   its own name; the other properties stay properties.
pub fn to_segment(
    mut event: Map<String, Value>,
    received_at: DateTime<Utc>,
) -> Result<Value, Refusal> {
    let mut props = match event.remove("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err((
                Reason::InvalidField,
                "properties must be a JSON object".into(),
            ))
        }
    };
    let name = event_name(&mut event)?;
    let distinct_id = id_of(event.get("distinct_id"))
        .or_else(|| id_of(event.get("$distinct_id")))
        .or_else(|| id_of(props.get("distinct_id")))
        .ok_or_else(|| {
            (
                Reason::MissingIdentity,
                "distinct_id is required (a non-empty string)".into(),
            )
        })?;
    event.remove("distinct_id");
    event.remove("$distinct_id");
    props.remove("distinct_id");

    let mut msg = Map::new();
    let mut traits = Map::new();
    let (kind, anonymous_id, user_id) = call_of(
        &name,
        distinct_id,
        &event,
        &mut props,
        &mut msg,
        &mut traits,
    )?;
    msg.insert("type".into(), Value::from(kind));
    if let Some(a) = anonymous_id {
        msg.insert("anonymousId".into(), Value::String(a));
    }
    if let Some(u) = user_id {
        msg.insert("userId".into(), Value::String(u));
    }
    if let Some(uuid) = event.remove("uuid") {
        msg.insert("messageId".into(), uuid);
    }
    if let Some(session) = id_of(props.get("$session_id")) {
        msg.insert("sessionId".into(), Value::String(session));
    }
    times(&mut event, &mut msg, received_at)?;
    let (properties, context) = context_of(kind, props, event);
    msg.insert("properties".into(), Value::Object(properties));
    msg.insert("traits".into(), Value::Object(traits));
    msg.insert("context".into(), Value::Object(context));
    Ok(Value::Object(msg))
}

/// A message refused, with its reason and what was wrong.
type Refusal = (Reason, String);

/// The event's name, removed from it. The old `/engage/` body has none but `$set` or
/// `$distinct_id`: an identify.
fn event_name(event: &mut Map<String, Value>) -> Result<String, Refusal> {
    match event.remove("event") {
        Some(Value::String(name)) if !name.is_empty() => Ok(name),
        None | Some(Value::Null)
            if event.contains_key("$set")
                || event.contains_key("$set_once")
                || event.contains_key("$distinct_id") =>
        {
            Ok("$identify".to_owned())
        }
        Some(Value::String(_)) | None | Some(Value::Null) => Err((
            Reason::MissingField,
            "a PostHog event needs an \"event\" name".into(),
        )),
        Some(_) => Err((Reason::InvalidField, "event must be a string".into())),
    }
}

/// The Segment call an event named `name` is, with its `anonymousId` and `userId`; what the
/// call needs besides (`previousId`, `groupId`, a name, traits) goes into `msg` and `traits`.
fn call_of(
    name: &str,
    distinct_id: String,
    event: &Map<String, Value>,
    props: &mut Map<String, Value>,
    msg: &mut Map<String, Value>,
    traits: &mut Map<String, Value>,
) -> Result<(&'static str, Option<String>, Option<String>), Refusal> {
    let device_id = id_of(props.get("$device_id"));
    let anon_id = id_of(props.get("$anon_distinct_id"));
    match name {
        // `$set` and `$set_once` events (posthog-python's `set`, `set_once`) only set person
        // properties: for sluice, an identify too.
        "$identify" | "$set" | "$set_once" => {
            for field in ["$set_once", "$set"] {
                for source in [event.get(field), props.get(field)] {
                    if let Some(Value::Object(set)) = source {
                        traits.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                }
            }
            let from = anon_id.or(device_id).filter(|a| *a != distinct_id);
            Ok(("identify", from, Some(distinct_id)))
        }
        "$create_alias" => {
            let alias = id_of(props.get("alias")).ok_or_else(|| {
                (
                    Reason::MissingField,
                    "$create_alias needs properties.alias".into(),
                )
            })?;
            props.remove("alias");
            msg.insert("previousId".into(), Value::String(alias));
            Ok(("alias", device_id, Some(distinct_id)))
        }
        other => {
            let anonymous = device_id.or(anon_id).unwrap_or_else(|| distinct_id.clone());
            let user = (distinct_id != anonymous).then_some(distinct_id);
            let kind = event_kind(other, props, msg, traits)?;
            Ok((kind, Some(anonymous), user))
        }
    }
}

/// The Segment type of an event that is not about identities.
fn event_kind(
    name: &str,
    props: &mut Map<String, Value>,
    msg: &mut Map<String, Value>,
    traits: &mut Map<String, Value>,
) -> Result<&'static str, Refusal> {
    Ok(match name {
        "$pageview" => "page",
        "$screen" => {
            if let Some(screen) = props.get("$screen_name").and_then(Value::as_str) {
                msg.insert("name".into(), Value::from(screen));
            }
            "screen"
        }
        "$groupidentify" => {
            let key = id_of(props.get("$group_key")).ok_or_else(|| {
                (
                    Reason::MissingField,
                    "$groupidentify needs properties.$group_key".into(),
                )
            })?;
            msg.insert("groupId".into(), Value::String(key));
            if let Some(Value::Object(set)) = props.remove("$group_set") {
                *traits = set;
            }
            "group"
        }
        _ => {
            msg.insert("event".into(), Value::String(name.to_owned()));
            "track"
        }
    })
}

/// `timestamp` and `sentAt` from the event's `timestamp`, `offset` and `sent_at`.
fn times(
    event: &mut Map<String, Value>,
    msg: &mut Map<String, Value>,
    received_at: DateTime<Utc>,
) -> Result<(), Refusal> {
    let mut from_offset = false;
    match event.remove("timestamp").filter(|t| !t.is_null()) {
        Some(t) => {
            msg.insert("timestamp".into(), t);
        }
        None => {
            // PostHog's rule: an event without a time happened `offset` ms before receipt.
            if let Some(offset) = event.get("offset").and_then(Value::as_i64) {
                let at = TimeDelta::try_milliseconds(offset)
                    .and_then(|d| received_at.checked_sub_signed(d))
                    .ok_or((Reason::InvalidTimestamp, "offset is out of range".into()))?;
                msg.insert(
                    "timestamp".into(),
                    Value::from(at.to_rfc3339_opts(SecondsFormat::Millis, true)),
                );
                from_offset = true;
            }
        }
    }
    event.remove("offset");
    let sent = event.remove("sent_at").filter(|t| !t.is_null());
    // A time from `offset` is already on the server's clock: correcting it by the client's
    // `sent_at` would apply the skew twice.
    if let Some(sent) = sent.filter(|_| !from_offset) {
        msg.insert("sentAt".into(), sent);
    }
    Ok(())
}

/// The message's `properties` and `context`: page and library facts in Segment's places,
/// every `$`-property and every leftover top-level field in `context` under its own name.
fn context_of(
    kind: &str,
    props: Map<String, Value>,
    event: Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let mut context = Map::new();
    let mut page = Map::new();
    for (from, to) in [
        ("$current_url", "url"),
        ("$pathname", "path"),
        ("$referrer", "referrer"),
    ] {
        if let Some(Value::String(v)) = props.get(from) {
            if !(to == "referrer" && v == "$direct") {
                page.insert(to.into(), Value::String(v.clone()));
            }
        }
    }
    if kind == "page" {
        if let Some(Value::String(title)) = props.get("title") {
            page.insert("title".into(), Value::String(title.clone()));
        }
    }
    if !page.is_empty() {
        context.insert("page".into(), Value::Object(page));
    }
    if let Some(Value::String(lib)) = props.get("$lib") {
        let mut library = json!({ "name": lib });
        if let Some(version) = props.get("$lib_version") {
            library["version"] = version.clone();
        }
        context.insert("library".into(), library);
    }
    let mut properties = Map::new();
    for (k, v) in props {
        if k.starts_with('$') {
            context.insert(k, v);
        } else {
            properties.insert(k, v);
        }
    }
    for (k, v) in event {
        context.entry(k).or_insert(v);
    }
    (properties, context)
}

#[cfg(test)]
mod tests;
