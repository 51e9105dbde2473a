//! JSON scanning before and around the parser: the nesting-depth and surrogate guard, the
//! parse itself, and a message's size without serialising it.

use serde_json::{Map, Value};

use super::PayloadError;

/// Rejects JSON nested deeper than `max` before it reaches a parser: deserialising into a
/// tree recurses once per level, so a 500 KB body of `[[[[...` would otherwise exhaust the
/// stack. Also rejects `\u` escapes of lone UTF-16 surrogates, which are not text (a
/// lenient parser would turn them into replacement characters, silently changing the data).
/// One pass over the bytes.
fn check_depth(json: &[u8], max: usize) -> Result<(), PayloadError> {
    let lone = || PayloadError::BadRequest("a string holds a lone UTF-16 surrogate escape".into());
    let mut depth = 0usize;
    let mut in_string = false;
    // The previous string token was a high-surrogate escape: a low one must follow.
    let mut want_low = false;
    let mut i = 0;
    while i < json.len() {
        let b = json[i];
        if in_string {
            if b == b'\\' {
                if json.get(i + 1) == Some(&b'u') {
                    let unit = json
                        .get(i + 2..i + 6)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok());
                    match unit {
                        Some(0xD800..=0xDBFF) if !want_low => want_low = true,
                        Some(0xDC00..=0xDFFF) if want_low => want_low = false,
                        Some(0xD800..=0xDFFF) => return Err(lone()),
                        _ if want_low => return Err(lone()),
                        _ => {}
                    }
                    i += 6;
                } else {
                    if want_low {
                        return Err(lone());
                    }
                    i += 2;
                }
                continue;
            }
            if want_low {
                return Err(lone());
            }
            if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(PayloadError::BadRequest(format!(
                        "JSON nested deeper than {max} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// Parses a body's JSON after [`check_depth`]: the one way request JSON is read.
pub(crate) fn parse_json(json: &mut [u8], max_depth: usize) -> Result<Value, PayloadError> {
    check_depth(json, max_depth)?;
    simd_json::serde::from_slice(json)
        .map_err(|err| PayloadError::BadRequest(format!("the JSON is not valid ({err})")))
}

/// The length of `v` as compact JSON, without serialising it (escapes not counted: a close
/// enough measure for a size limit, and it cannot be fooled into under-counting much).
pub fn json_size(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => {
            if *b {
                4
            } else {
                5
            }
        }
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => s.len() + 2,
        Value::Array(a) => 2 + a.iter().map(json_size).sum::<usize>() + a.len().saturating_sub(1),
        Value::Object(o) => json_size_object(o),
    }
}

pub(crate) fn json_size_object(o: &Map<String, Value>) -> usize {
    2 + o
        .iter()
        .map(|(k, v)| k.len() + 3 + json_size(v))
        .sum::<usize>()
        + o.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_size_matches_compact_serialisation() {
        let v = json!({"a": [1, 2.5, null, true, false], "b": {"c": "d"}, "e": []});
        assert_eq!(json_size(&v), serde_json::to_vec(&v).unwrap().len());
    }
}
