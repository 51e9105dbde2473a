//! JSON checking before and around the parser: the guard pass (simd-json's validation, and
//! the nesting depth read off its tape), the parse itself, and the compact size of a value's
//! text.

use serde::Deserialize;
use simd_json::Node;

use super::PayloadError;

thread_local! {
    /// The copy of the body simd-json unescapes in place and its working buffers, kept from
    /// one body to the next on each thread: allocating them afresh cost more than the whole
    /// validation of a 54 KB batch. They keep the size of the largest body the thread saw,
    /// a few times `max_request_bytes` at most.
    static SCRATCH: std::cell::RefCell<(Vec<u8>, simd_json::Buffers)> = Default::default();
}

/// Rejects JSON the rest of the collector must never see, before the typed parse:
/// - anything simd-json refuses: malformed JSON, bad UTF-8, control characters in strings,
///   numbers no 64-bit integer or finite double holds, `\u` escapes of lone low surrogates
///   (lone surrogates are not text: a lenient parser would turn them into replacement
///   characters, silently changing the data).
///   `properties` and `context` go on as text, and serde_json skips over the contents of
///   such raw values without decoding their escapes or ranging their numbers, so this is
///   where they are refused rather than handed to the writer;
/// - nesting deeper than `max`, read off simd-json's tape: deserialising recurses once per
///   level, so a 500 KB body of `[[[[...` would otherwise exhaust the stack (simd-json's own
///   pass does not recurse);
/// - a high-surrogate escape without its low one, which simd-json does not refuse but decodes
///   to a wrong character ([`lone_high_surrogate`]).
///
/// simd-json unescapes strings in place, so it is given a copy of the body.
fn check(json: &[u8], max: usize) -> Result<(), PayloadError> {
    SCRATCH.with_borrow_mut(|(copy, buffers)| {
        copy.clear();
        copy.extend_from_slice(json);
        let tape = simd_json::to_tape_with_buffers(copy, buffers).map_err(invalid)?;
        if depth_exceeds(&tape.0, max) {
            return Err(PayloadError::BadRequest(format!(
                "JSON nested deeper than {max} levels"
            )));
        }
        Ok(())
    })?;
    if lone_high_surrogate(json) {
        return Err(PayloadError::BadRequest(
            "a string holds a lone UTF-16 surrogate escape".into(),
        ));
    }
    Ok(())
}

/// Whether the tape nests arrays and objects deeper than `max`. Each container's node counts
/// the nodes inside it, so the ends of the open containers are kept on a stack, no recursion;
/// the stack never grows past `max + 1`.
fn depth_exceeds(tape: &[Node<'_>], max: usize) -> bool {
    let mut open: Vec<usize> = Vec::new();
    for (i, node) in tape.iter().enumerate() {
        while open.last().is_some_and(|end| *end <= i) {
            open.pop();
        }
        if let Node::Object { count, .. } | Node::Array { count, .. } = node {
            open.push(i + 1 + count);
            if open.len() > max {
                return true;
            }
        }
    }
    false
}

/// Whether JSON simd-json has accepted holds a high-surrogate escape not followed by a
/// low-surrogate escape. simd-json 0.17 refuses a lone low surrogate and a high one followed
/// by an escape below `\udc00`, but decodes a high one followed by anything else to U+0000
/// (`"\ud800"`) and one followed by `\ue000`-`\uffff` to a wrong character, without a
/// range check. Only the body's backslashes are visited (in valid JSON each starts an escape).
fn lone_high_surrogate(json: &[u8]) -> bool {
    let mut next = 0;
    for at in memchr::memchr_iter(b'\\', json) {
        if at < next {
            // The second backslash of `\\`, or inside a `\u` escape already read.
            continue;
        }
        if json.get(at + 1) != Some(&b'u') {
            next = at + 2;
            continue;
        }
        next = at + 6;
        if matches!(hex_unit(json, at + 2), Some(0xD800..=0xDBFF))
            && (json.get(at + 6..at + 8) != Some(&b"\\u"[..])
                || !matches!(hex_unit(json, at + 8), Some(0xDC00..=0xDFFF)))
        {
            return true;
        }
    }
    false
}

/// The UTF-16 unit of the four hex digits at `at`, if they are four hex digits.
fn hex_unit(json: &[u8], at: usize) -> Option<u16> {
    let digits = json.get(at..at + 4)?;
    std::str::from_utf8(digits)
        .ok()
        .and_then(|h| u16::from_str_radix(h, 16).ok())
}

/// The 400 of a body that is not JSON, with the parser's reason.
fn invalid(err: impl std::fmt::Display) -> PayloadError {
    PayloadError::BadRequest(format!("the JSON is not valid ({err})"))
}

/// Parses a body's JSON after [`check`]: the one way request JSON is read.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(
    json: &'a [u8],
    max_depth: usize,
) -> Result<T, PayloadError> {
    check(json, max_depth)?;
    let text = std::str::from_utf8(json).map_err(invalid)?;
    serde_json::from_str(text).map_err(invalid)
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
    use serde_json::value::RawValue;
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
        // Parsed as one raw value, as `properties` and `context` are: serde_json only skips
        // over their contents, so what is refused here is refused by the guard.
        let refused = |body: &str| {
            matches!(
                parse_json::<&RawValue>(body.as_bytes(), 4),
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
            r#"{"context":{"x":"\ud800\ue000"}}"#,
            r#"{"context":{"x":"a\\\ud800\uffff"}}"#,
            r#"{"context":{"x":"\ud800\ud800"}}"#,
            r#"{"context":{"x":"\ud800x"}}"#,
            r#"{"context":{"x":"\ud800\n"}}"#,
            r#"{"context":{"x":"\uDBFF"}}"#,
        ] {
            assert!(refused(bad), "{bad}");
        }
        for good in [
            r#"{"properties":{"a":[{"b":"[[[[[[[["}]}}"#,
            r#"{"properties":{"n":18446744073709551615,"m":-9223372036854775808}}"#,
            r#"{"properties":{"n":1e300,"m":-0,"o":1.5E-400,"p":"1e999"}}"#,
            r#"{"x":"\ud83d\ude00 \u00e9 \\ud800"}"#,
            r#"{"x":"\\\\ud800\ue000 \udbff\udfff"}"#,
        ] {
            assert!(!refused(good), "{good}");
        }
        assert!(refused(&format!(r#"{{"n":{}}}"#, "9".repeat(400))));
        assert!(matches!(
            parse_json::<&RawValue>(b"{\"a\":\"\xff\"}", 4),
            Err(PayloadError::BadRequest(_))
        ));
        // Depth: `max` levels pass, one more is refused with the limit in the message.
        assert!(parse_json::<Value>(br#"[{"a":[{"b":[]}]}]"#, 5).is_ok());
        for deep in [
            &br#"[{"a":[{"b":[[]]}]}]"#[..],
            br#"{"a":1,"b":[1,{"c":[[[{}]]]}]}"#,
        ] {
            match parse_json::<Value>(deep, 5) {
                Err(PayloadError::BadRequest(m)) => {
                    assert_eq!(m, "JSON nested deeper than 5 levels")
                }
                other => panic!("{other:?}"),
            }
        }
        // Siblings close their levels: many containers side by side are not deep.
        let wide = format!("[{}]", vec!["[[]]"; 1000].join(","));
        assert!(parse_json::<Value>(wide.as_bytes(), 3).is_ok());
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert!(parse_json::<Value>(deep.as_bytes(), 32).is_err());
    }
}
