//! JSON scanning before and around the parser: the guard pass (nesting depth, lone surrogate
//! escapes, numbers out of range), the parse itself, and the compact size of a value's text.

use serde::Deserialize;

use super::PayloadError;

/// Rejects JSON the rest of the collector must never see, before it reaches a parser, in one
/// pass over the bytes:
/// - nesting deeper than `max`: deserialising recurses once per level, so a 500 KB body of
///   `[[[[...` would otherwise exhaust the stack (and `properties` and `context` are passed on
///   as text, so their depth is checked here or nowhere);
/// - `\u` escapes of lone UTF-16 surrogates, which are not text (a lenient parser would turn
///   them into replacement characters, silently changing the data);
/// - numbers no 64-bit integer or finite double holds: `properties` and `context` go on as
///   text, and the tree parser the collector used before refused them, so they are refused
///   here too rather than handed to the writer.
fn check(json: &[u8], max: usize) -> Result<(), PayloadError> {
    let lone = || PayloadError::BadRequest("a string holds a lone UTF-16 surrogate escape".into());
    let mut depth = 0usize;
    let mut in_string = false;
    // The previous string token was a high-surrogate escape: a low one must follow.
    let mut want_low = false;
    let mut i = 0;
    while i < json.len() {
        if in_string {
            // Skip to the next quote or escape: most of a body is string contents.
            let Some(skip) = json[i..].iter().position(|b| *b == b'"' || *b == b'\\') else {
                break;
            };
            if want_low && (skip > 0 || json[i + skip] == b'"') {
                return Err(lone());
            }
            i += skip;
            if json[i] == b'"' {
                in_string = false;
                i += 1;
                continue;
            }
            if json.get(i + 1) == Some(&b'u') {
                match hex_unit(json, i + 2) {
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
        match json[i] {
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
            b'-' | b'0'..=b'9' => {
                let len = json[i..]
                    .iter()
                    .position(|b| !matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .unwrap_or(json.len() - i);
                if !number_in_range(&json[i..i + len]) {
                    return Err(PayloadError::BadRequest(
                        "a number is beyond what a 64-bit integer or a double holds".into(),
                    ));
                }
                i += len;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The UTF-16 unit of the four hex digits at `at`, if they are four hex digits.
fn hex_unit(json: &[u8], at: usize) -> Option<u16> {
    let digits = json.get(at..at + 4)?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|h| u16::from_str_radix(h, 16).ok())
}

/// False for a number token a 64-bit integer (without fraction or exponent) or a finite double
/// cannot hold. A token that is no number at all is the parser's to refuse.
fn number_in_range(token: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(token) else {
        return true;
    };
    if token.iter().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        text.parse::<f64>().map_or(true, f64::is_finite)
    } else {
        text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() || text.parse::<f64>().is_err()
    }
}

/// Parses a body's JSON after [`check`]: the one way request JSON is read.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(
    json: &'a [u8],
    max_depth: usize,
) -> Result<T, PayloadError> {
    check(json, max_depth)?;
    let text = std::str::from_utf8(json)
        .map_err(|err| PayloadError::BadRequest(format!("the JSON is not valid ({err})")))?;
    serde_json::from_str(text)
        .map_err(|err| PayloadError::BadRequest(format!("the JSON is not valid ({err})")))
}

/// The length of the JSON value `text` written compactly, strings counted by their decoded
/// length (as a size limit measured on parsed values did): insignificant whitespace and escapes
/// do not count, so a pretty-printed or escaped message is measured as a compact one.
pub(crate) fn compact_size(text: &str) -> usize {
    let b = text.as_bytes();
    let mut size = 0;
    let mut in_string = false;
    let mut i = 0;
    while i < b.len() {
        if in_string {
            // Plain string contents count byte for byte, up to the next quote or escape.
            let plain = b[i..]
                .iter()
                .position(|c| *c == b'"' || *c == b'\\')
                .unwrap_or(b.len() - i);
            size += plain;
            i += plain;
            if i == b.len() {
                break;
            }
        }
        match (in_string, b[i]) {
            (true, b'\\') if b.get(i + 1) == Some(&b'u') => {
                // The UTF-8 length of the unit (a surrogate pair: 4 bytes, 2 each).
                size += match hex_unit(b, i + 2) {
                    Some(0..=0x7F) => 1,
                    Some(0x80..=0x7FF | 0xD800..=0xDFFF) => 2,
                    _ => 3,
                };
                i += 6;
                continue;
            }
            (true, b'\\') => {
                size += 1;
                i += 2;
                continue;
            }
            (true, b'"') => {
                in_string = false;
                size += 1;
            }
            (false, b' ' | b'\t' | b'\n' | b'\r') => {}
            (false, b'"') => {
                in_string = true;
                size += 1;
            }
            _ => size += 1,
        }
        i += 1;
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn compact_size_matches_compact_serialisation() {
        let v =
            json!({"a": [1, 2.5, null, true, false], "b": {"c": "d\u{e9}\u{1F600}\n\""}, "e": []});
        let compact = serde_json::to_string(&v).unwrap();
        // The escapes `\n` and `\"` count as the one byte they stand for.
        assert_eq!(compact_size(&compact), compact.len() - 2);
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        assert_eq!(compact_size(&pretty), compact_size(&compact));
        let escaped = r#"{"b":{"c":"d\u00e9\ud83d\ude00\n\""},"a":[1,2.5,null,true,false],"e":[]}"#;
        assert_eq!(compact_size(escaped), compact_size(&compact));
    }

    #[test]
    fn the_guard_refuses_depth_surrogates_and_numbers_out_of_range_anywhere() {
        let refused = |body: &str| {
            matches!(
                parse_json::<Value>(body.as_bytes(), 4),
                Err(PayloadError::BadRequest(_))
            )
        };
        for bad in [
            r#"{"properties":{"a":[[[{"b":1}]]]}}"#,
            r#"{"context":{"x":"\ud800"}}"#,
            r#"{"context":{"x":"\udc00"}}"#,
            r#"{"properties":{"n":1e999}}"#,
            r#"{"properties":{"n":-1e999}}"#,
            r#"{"properties":{"n":18446744073709551616}}"#,
            r#"{"properties":{"n":-9223372036854775809}}"#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":1,}",
        ] {
            assert!(refused(bad), "{bad}");
        }
        for good in [
            r#"{"properties":{"a":[{"b":"[[[[[[[["}]}}"#,
            r#"{"properties":{"n":18446744073709551615,"m":-9223372036854775808}}"#,
            r#"{"properties":{"n":1e300,"m":-0,"o":1.5E-400,"p":"1e999"}}"#,
            r#"{"x":"\ud83d\ude00 \u00e9 \\ud800"}"#,
        ] {
            assert!(!refused(good), "{good}");
        }
        assert!(refused(&format!(r#"{{"n":{}}}"#, "9".repeat(400))));
    }
}
