//! The tracking pixel (`GET /v1/p.gif?...`): its query string as one message, with short
//! parameter names so a URL stays short.

use serde_json::{json, Map, Value};

use super::{validate, Defaults, Kind, Limits, Parsed, PayloadError};

/// The tracking pixel's query string as one message. Parameters: `k` write key, `e` event
/// name, `a` anonymousId, `u` userId, `s` sessionId, `m` messageId, `ts` timestamp (RFC 3339
/// or epoch ms), `url` page URL, `r` referrer, `t` page title; every other parameter becomes
/// a string property. The key, if any, is the parsed body's `write_key`.
pub fn parse(query: &str, limits: &Limits) -> Result<Parsed, PayloadError> {
    if query.len() > limits.max_message_bytes {
        return Err(PayloadError::TooLarge {
            what: "message",
            limit: limits.max_message_bytes,
        });
    }
    let mut msg = Map::new();
    let mut page = Map::new();
    let mut properties = Map::new();
    let mut key = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        let field = match name.as_ref() {
            "k" => {
                key = Some(value);
                continue;
            }
            "e" => "name",
            "a" => "anonymousId",
            "u" => "userId",
            "s" => "sessionId",
            "m" => "messageId",
            "ts" => {
                let v = value
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(Value::String(value));
                msg.insert("timestamp".into(), v);
                continue;
            }
            "url" | "r" | "t" => {
                let field = match name.as_ref() {
                    "url" => "url",
                    "r" => "referrer",
                    _ => "title",
                };
                page.insert(field.into(), Value::String(value));
                continue;
            }
            other => {
                properties.insert(other.to_owned(), Value::String(value));
                continue;
            }
        };
        msg.insert(field.into(), Value::String(value));
    }
    if !page.is_empty() {
        msg.insert("context".into(), json!({ "page": page }));
    }
    msg.insert("properties".into(), Value::Object(properties));
    let mut parsed = Parsed {
        write_key: key,
        ..Parsed::default()
    };
    let checked = validate(
        Value::Object(msg),
        Some(Kind::Pixel),
        &Defaults::default(),
        limits,
    );
    parsed.push(0, None, checked);
    Ok(parsed)
}
