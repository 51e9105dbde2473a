//! PostHog's capture API: request bodies as posthog-js, posthog-node and posthog-python send
//! them, decoded and mapped onto the Segment-shaped messages the rest of the pipeline takes
//! (so keys, limits, enrichment and produce are the Segment path's, unchanged), and the
//! remote-config and feature-flag answers that switch every PostHog remote feature off.
//!
//! The mapping ([`to_segment`]) is pure: one PostHog event in, one Segment message out (or a
//! refusal with its reason), checked by [`payload::validate`] like any Segment message.

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{json, Map, Value};

use crate::error::IngestError;
use crate::payload::{self, Defaults, Limits, Parsed, Reason, Rejected, MAX_KEYS_PER_BATCH};

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
) -> Result<Vec<u8>, IngestError> {
    let compression = query_param(query, "compression");
    if compression.as_deref() == Some("lz64") {
        return Err(IngestError::BadRequest(
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
            return Err(IngestError::BadRequest(
                "no event: send a JSON body, or data=<base64 JSON> in the query".into(),
            ));
        }
        payload::pixel_data(query)?
    } else {
        payload::decode_body(raw, encoding, content_type, limits)?
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
        .and_then(payload::decode_base64)
        .filter(|json| json.first().is_some_and(|b| *b == b'{' || *b == b'['))
        .ok_or_else(|| {
            IngestError::BadRequest(
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
    json: &mut [u8],
    query: &str,
    received_at: DateTime<Utc>,
    limits: &Limits,
) -> Result<Parsed, IngestError> {
    payload::check_depth(json, limits.max_json_depth)?;
    let value: Value = simd_json::serde::from_slice(json)
        .map_err(|err| IngestError::BadRequest(format!("the JSON is not valid ({err})")))?;
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
                    return Err(IngestError::BadRequest(
                        "\"batch\" must be an array of events".into(),
                    ))
                }
            }
        }
        Value::Object(event) => vec![Value::Object(event)],
        _ => {
            return Err(IngestError::BadRequest(
                "the JSON is neither an event, an array of events, nor {\"batch\": [...]}".into(),
            ))
        }
    };
    if events.len() > limits.max_batch_messages {
        return Err(IngestError::TooLarge {
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
    let defaults = Defaults {
        context: None,
        sent_at: None,
    };
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
            note_key(&mut parsed, key)?;
        }
        if event.get("sent_at").is_none_or(Value::is_null) {
            if let Some(sent) = &sent_at {
                event.insert("sent_at".into(), sent.clone());
            }
        }
        let mapped = to_segment(event, received_at)
            .and_then(|m| payload::validate(m, None, &defaults, limits));
        match mapped {
            Ok(m) => parsed.messages.push((index, m)),
            Err((reason, detail)) => parsed.rejected.push(Rejected {
                index,
                message_id,
                reason,
                detail,
            }),
        }
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

/// Records a key an event names: the first is the request's, the others must be of its
/// workspace (checked by the caller, as for a Segment batch).
fn note_key(parsed: &mut Parsed, key: String) -> Result<(), IngestError> {
    match &parsed.write_key {
        None => parsed.write_key = Some(key),
        Some(first) if *first == key => {}
        Some(_) if parsed.other_keys.contains(&key) => {}
        Some(_) if parsed.other_keys.len() + 1 >= MAX_KEYS_PER_BATCH => {
            return Err(IngestError::BadRequest(format!(
                "a batch may name at most {MAX_KEYS_PER_BATCH} project keys; send one key per request"
            )))
        }
        Some(_) => parsed.other_keys.push(key),
    }
    Ok(())
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
) -> Result<Value, (Reason, String)> {
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
    let name = match event.remove("event") {
        Some(Value::String(name)) if !name.is_empty() => name,
        None | Some(Value::Null)
            if event.contains_key("$set")
                || event.contains_key("$set_once")
                || event.contains_key("$distinct_id") =>
        {
            "$identify".to_owned()
        }
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err((
                Reason::MissingField,
                "a PostHog event needs an \"event\" name".into(),
            ))
        }
        Some(_) => return Err((Reason::InvalidField, "event must be a string".into())),
    };
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
    let device_id = id_of(props.get("$device_id"));
    let anon_id = id_of(props.get("$anon_distinct_id"));

    let mut msg = Map::new();
    let mut traits = Map::new();
    let (kind, anonymous_id, user_id) = match name.as_str() {
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
            ("identify", from, Some(distinct_id))
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
            ("alias", device_id, Some(distinct_id))
        }
        other => {
            let anonymous = device_id.or(anon_id).unwrap_or_else(|| distinct_id.clone());
            let user = (distinct_id != anonymous).then_some(distinct_id);
            let kind = match other {
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
                        traits = set;
                    }
                    "group"
                }
                _ => {
                    msg.insert("event".into(), Value::String(name.clone()));
                    "track"
                }
            };
            (kind, Some(anonymous), user)
        }
    };
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
    msg.insert("properties".into(), Value::Object(properties));
    msg.insert("traits".into(), Value::Object(traits));
    msg.insert("context".into(), Value::Object(context));
    Ok(Value::Object(msg))
}

/// PostHog's remote config (`/array/<key>/config`) with every remote feature off: no
/// recording, surveys, heatmaps, autocapture, exception or performance capture, site apps or
/// feature flags, so posthog-js asks for nothing else; gzip and base64 bodies are taken.
/// `surveys` is left out rather than `false`: posthog-js 1.449 loads its surveys script
/// (`/static/surveys.js`, which the collector does not serve) for `false` too.
pub fn remote_config(token: &str) -> Value {
    json!({
        "token": token,
        "supportedCompression": ["gzip-js", "base64"],
        "hasFeatureFlags": false,
        "captureDeadClicks": false,
        "capturePerformance": false,
        "autocapture_opt_out": true,
        "autocaptureExceptions": false,
        "analytics": { "endpoint": "/e/" },
        "elementsChainAsString": true,
        "errorTracking": { "autocaptureExceptions": false, "suppressionRules": [] },
        "logs": { "captureConsoleLogs": false },
        "sessionRecording": false,
        "heatmaps": false,
        "conversations": false,
        "productTours": false,
        "defaultIdentifiedOnly": true,
        "siteApps": [],
        "toolbarParams": {},
        "isAuthenticated": false,
    })
}

/// The script form of [`remote_config`] (`/array/<key>/config.js`), as posthog-js's loader
/// expects it: it sets `window._POSTHOG_REMOTE_CONFIG[<key>]`.
pub fn remote_config_js(token: &str) -> String {
    let config = json!({ "config": remote_config(token), "siteApps": [] });
    // The key is written as a JSON string, so no key can break out of the script.
    let key = Value::from(token);
    format!(
        "(function(){{window._POSTHOG_REMOTE_CONFIG=window._POSTHOG_REMOTE_CONFIG||{{}};\
         window._POSTHOG_REMOTE_CONFIG[{key}]={config};}})();\n"
    )
}

/// The answer of `/flags/?v=2` and of the older `/decide/`: no flag is on, nothing failed,
/// and (for `/decide/` readers) the remote config's switches, all off.
pub fn flags() -> Value {
    let mut answer = remote_config("");
    let object = answer.as_object_mut().expect("a JSON object literal");
    object.remove("token");
    for (k, v) in [
        ("flags", json!({})),
        ("featureFlags", json!({})),
        ("featureFlagPayloads", json!({})),
        ("errorsWhileComputingFlags", json!(false)),
        ("quotaLimited", json!([])),
        ("config", json!({ "enable_collect_everything": false })),
    ] {
        object.insert(k.into(), v);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::io::Write;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap()
    }

    fn map(v: Value) -> Value {
        let Value::Object(m) = v else { panic!() };
        to_segment(m, now()).unwrap()
    }

    fn refusal(v: Value) -> Reason {
        let Value::Object(m) = v else { panic!() };
        to_segment(m, now()).unwrap_err().0
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn a_custom_event_is_a_track_with_dollar_properties_in_context() {
        let m = map(json!({
            "event": "Order Completed", "distinct_id": "u-1", "uuid": "0190-a",
            "timestamp": "2026-12-01T11:59:00Z", "sent_at": "2026-12-01T11:59:30Z",
            "type": "capture",
            "properties": {"plan": "pro", "$lib": "posthog-node", "$lib_version": "5.70.0",
                            "$geoip_disable": true}
        }));
        assert_eq!(m["type"], "track");
        assert_eq!(m["event"], "Order Completed");
        assert_eq!(m["anonymousId"], "u-1", "distinct_id is the visitor");
        assert!(m.get("userId").is_none());
        assert_eq!(m["messageId"], "0190-a");
        assert_eq!(m["timestamp"], "2026-12-01T11:59:00Z");
        assert_eq!(m["sentAt"], "2026-12-01T11:59:30Z");
        assert_eq!(m["properties"], json!({"plan": "pro"}));
        assert_eq!(m["context"]["$lib"], "posthog-node");
        assert_eq!(m["context"]["$geoip_disable"], true);
        assert_eq!(m["context"]["library"]["version"], "5.70.0");
        assert_eq!(
            m["context"]["type"], "capture",
            "unknown top-level fields kept"
        );
    }

    #[test]
    fn an_identified_browser_event_is_keyed_by_its_device_with_the_user_id() {
        let m = map(json!({
            "event": "clicked", "uuid": "u",
            "properties": {"distinct_id": "user-9", "$device_id": "dev-1",
                            "$session_id": "s-1", "$current_url": "https://x.example/a?utm_source=n",
                            "$pathname": "/a", "$referrer": "$direct"}
        }));
        assert_eq!(m["anonymousId"], "dev-1");
        assert_eq!(m["userId"], "user-9");
        assert_eq!(m["sessionId"], "s-1");
        assert_eq!(
            m["context"]["page"],
            json!({"url": "https://x.example/a?utm_source=n", "path": "/a"})
        );
        // Before identify, posthog-js's distinct_id is the device id: one visitor, no user.
        let m = map(
            json!({"event": "e", "properties": {"distinct_id": "dev-1", "$device_id": "dev-1"}}),
        );
        assert_eq!(m["anonymousId"], "dev-1");
        assert!(m.get("userId").is_none());
    }

    #[test]
    fn pageview_and_screen_are_page_and_screen() {
        let m = map(json!({"event": "$pageview", "distinct_id": "d",
            "properties": {"$current_url": "https://x.example/p", "title": "Pricing",
                           "$referrer": "https://ref.example/"}}));
        assert_eq!(m["type"], "page");
        assert_eq!(m["context"]["page"]["title"], "Pricing");
        assert_eq!(m["context"]["page"]["referrer"], "https://ref.example/");
        assert_eq!(m["properties"]["title"], "Pricing");
        let m = map(json!({"event": "$screen", "distinct_id": "d",
            "properties": {"$screen_name": "Settings", "tab": "billing"}}));
        assert_eq!(m["type"], "screen");
        assert_eq!(m["name"], "Settings");
        assert_eq!(m["properties"]["tab"], "billing");
    }

    #[test]
    fn identify_takes_set_and_set_once_as_traits_from_the_anonymous_id() {
        let m = map(json!({"event": "$identify", "distinct_id": "user-1",
            "$set": {"plan": "pro"}, "$set_once": {"plan": "free", "first": "2026"},
            "properties": {"$anon_distinct_id": "anon-1", "$device_id": "dev-1"}}));
        assert_eq!(m["type"], "identify");
        assert_eq!(m["userId"], "user-1");
        assert_eq!(m["anonymousId"], "anon-1");
        assert_eq!(
            m["traits"],
            json!({"plan": "pro", "first": "2026"}),
            "$set wins"
        );
        assert_eq!(m["context"]["$set_once"]["plan"], "free", "kept as sent");
        // posthog-node puts $set in properties; without an anonymous id there is none.
        let m = map(json!({"event": "$identify", "distinct_id": "user-1",
            "properties": {"$set": {"name": "Ada"}}}));
        assert_eq!(m["traits"]["name"], "Ada");
        assert!(m.get("anonymousId").is_none());
        let m = map(json!({"event": "$set", "distinct_id": "user-3", "$set": {"a": 1}}));
        assert_eq!(
            (&m["type"], &m["userId"], &m["traits"]["a"]),
            (&json!("identify"), &json!("user-3"), &json!(1))
        );
        // The old /engage/ body has no event name.
        let m = map(json!({"$distinct_id": "user-2", "$set": {"a": 1}}));
        assert_eq!(m["type"], "identify");
        assert_eq!(m["userId"], "user-2");
    }

    #[test]
    fn create_alias_and_groupidentify_are_alias_and_group() {
        let m = map(json!({"event": "$create_alias", "distinct_id": "user-1",
            "properties": {"distinct_id": "user-1", "alias": "old-1"}}));
        assert_eq!(m["type"], "alias");
        assert_eq!(m["userId"], "user-1");
        assert_eq!(m["previousId"], "old-1");
        assert!(m["properties"].get("alias").is_none());
        assert_eq!(
            refusal(json!({"event": "$create_alias", "distinct_id": "u"})),
            Reason::MissingField
        );
        let m = map(
            json!({"event": "$groupidentify", "distinct_id": "$company_c-1",
            "properties": {"$group_type": "company", "$group_key": "c-1",
                           "$group_set": {"name": "Initech"}}}),
        );
        assert_eq!(m["type"], "group");
        assert_eq!(m["groupId"], "c-1");
        assert_eq!(m["traits"]["name"], "Initech");
        assert_eq!(m["context"]["$group_type"], "company");
        assert_eq!(
            refusal(json!({"event": "$groupidentify", "distinct_id": "u"})),
            Reason::MissingField
        );
    }

    #[test]
    fn offset_without_timestamp_is_before_receipt() {
        let m = map(
            json!({"event": "e", "distinct_id": "d", "offset": 1500, "sent_at": "2026-12-01T13:00:00Z"}),
        );
        assert_eq!(m["timestamp"], "2026-12-01T11:59:58.500Z");
        assert!(m.get("sentAt").is_none(), "no second skew correction");
        assert!(m["context"].get("offset").is_none());
        assert_eq!(
            refusal(json!({"event": "e", "distinct_id": "d", "timestamp": null,
                                  "offset": i64::MAX})),
            Reason::InvalidTimestamp
        );
    }

    #[test]
    fn events_without_name_or_distinct_id_are_refused_with_a_reason() {
        assert_eq!(refusal(json!({"distinct_id": "d"})), Reason::MissingField);
        assert_eq!(
            refusal(json!({"event": 5, "distinct_id": "d"})),
            Reason::InvalidField
        );
        assert_eq!(refusal(json!({"event": "e"})), Reason::MissingIdentity);
        assert_eq!(
            refusal(json!({"event": "e", "distinct_id": ""})),
            Reason::MissingIdentity
        );
        assert_eq!(
            refusal(json!({"event": "e", "distinct_id": "d", "properties": [1]})),
            Reason::InvalidField
        );
    }

    fn parse_json(v: Value, query: &str) -> Result<Parsed, IngestError> {
        let mut bytes = serde_json::to_vec(&v).unwrap();
        parse(&mut bytes, query, now(), &Limits::default())
    }

    #[test]
    fn bodies_of_every_shape_parse_and_keys_never_stay_in_messages() {
        let ev = |id: &str| json!({"event": "e", "distinct_id": "d", "uuid": id});
        let batch = parse_json(
            json!({"api_key": "phc_1", "batch": [ev("a"), ev("b")],
                                      "sent_at": "2026-12-01T11:00:00Z"}),
            "",
        )
        .unwrap();
        assert_eq!(batch.write_key.as_deref(), Some("phc_1"));
        assert_eq!(batch.messages.len(), 2);
        assert!(batch.messages.iter().all(|(_, m)| m.sent_at.is_some()));
        let array = parse_json(
            json!([{"event": "e", "distinct_id": "d",
                                       "properties": {"token": "phc_2"}}]),
            "_=1764590400000",
        )
        .unwrap();
        assert_eq!(array.write_key.as_deref(), Some("phc_2"));
        let m = &array.messages[0].1;
        assert!(m.sent_at.is_some(), "sent_at from the query's _");
        assert!(!serde_json::to_string(&m.properties)
            .unwrap()
            .contains("phc_2"));
        assert!(!serde_json::to_string(&m.context).unwrap().contains("phc_2"));
        let single = parse_json(
            json!({"event": "e", "distinct_id": "d", "api_key": "", "token": "phc_3"}),
            "",
        )
        .unwrap();
        assert_eq!(single.write_key.as_deref(), Some("phc_3"));
        let mixed = parse_json(
            json!({"api_key": "k1", "batch": [
            {"event": "e", "distinct_id": "d", "properties": {"token": "k2"}},
            "nope", {"distinct_id": "d"}]}),
            "",
        )
        .unwrap();
        assert_eq!(mixed.other_keys, ["k2"]);
        let reasons: Vec<Reason> = mixed.rejected.iter().map(|r| r.reason).collect();
        assert_eq!(reasons, [Reason::NotAnObject, Reason::MissingField]);
        assert!(parse_json(json!({"batch": {}}), "").is_err());
        assert!(parse_json(json!("x"), "").is_err());
        let mut deep = "[".repeat(10_000).into_bytes();
        assert!(parse(&mut deep, "", now(), &Limits::default()).is_err());
    }

    #[test]
    fn gzip_base64_forms_and_query_data_decode() {
        use base64::Engine;
        let limits = Limits::default();
        let json = br#"{"event":"e","distinct_id":"d"}"#;
        let gz = gzip(json);
        // posthog-js 1.449: gzip bytes as text/plain, no parameter, no header.
        assert_eq!(
            decode(&gz, "ver=1.449.2", None, Some("text/plain"), &limits).unwrap(),
            json
        );
        assert_eq!(
            decode(&gz, "compression=gzip-js", None, None, &limits).unwrap(),
            json
        );
        assert_eq!(decode(&gz, "", Some("gzip"), None, &limits).unwrap(), json);
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        let form = format!(
            "data={}",
            url::form_urlencoded::byte_serialize(b64.as_bytes()).collect::<String>()
        );
        assert_eq!(
            decode(
                form.as_bytes(),
                "compression=base64",
                None,
                Some("application/x-www-form-urlencoded"),
                &limits
            )
            .unwrap(),
            json
        );
        assert_eq!(
            decode(b64.as_bytes(), "compression=base64", None, None, &limits).unwrap(),
            json
        );
        assert_eq!(
            decode(b"", &form, None, None, &limits).unwrap(),
            json,
            "GET ?data="
        );
        for (body, query, says) in [
            (&b""[..], "", "no event"),
            (&b"hello"[..], "", "neither JSON"),
            (&b"x"[..], "compression=lz64", "lz64"),
            (&gz[..10], "", "gzip"),
        ] {
            let err = decode(body, query, None, None, &limits).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn remote_config_and_flags_switch_everything_off() {
        let c = remote_config("phc_x");
        for off in [
            "sessionRecording",
            "heatmaps",
            "hasFeatureFlags",
            "capturePerformance",
        ] {
            assert_eq!(c[off], false, "{off}");
        }
        assert_eq!(c["autocapture_opt_out"], true);
        assert!(c.get("surveys").is_none());
        let js = remote_config_js("k\"</script>");
        assert!(js.contains(r#"["k\"</script>"]"#), "{js}");
        let f = flags();
        assert_eq!(f["flags"], json!({}));
        assert_eq!(f["featureFlags"], json!({}));
        assert_eq!(f["errorsWhileComputingFlags"], false);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn any_bytes_decode_and_parse_or_fail_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            query in "(compression=(gzip-js|base64|lz64)|data=[a-zA-Z0-9+/=%]{0,40}|_=[0-9]{0,15}|&){0,3}",
        ) {
            let limits = Limits::default();
            if let Ok(mut json) = decode(&bytes, &query, None, Some("text/plain"), &limits) {
                let _ = parse(&mut json, &query, now(), &limits);
            }
            let mut raw = bytes.clone();
            let _ = parse(&mut raw, &query, now(), &limits);
        }
    }
}
