//! The hostile bodies of the collector's abuse tests (`tests/tests/abuse_input.rs`):
//! malformed JSON, oversized messages and batches, gzip bombs, deep nesting, wrong types and
//! encodings, each with the 4xx the collector must answer.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::json;

/// One hostile request: what it is, where it goes, its body and content encoding.
pub struct Case {
    /// What the case is.
    pub name: &'static str,
    /// The endpoint it is sent to.
    pub path: &'static str,
    /// The request body as sent.
    pub body: Vec<u8>,
    /// Its `Content-Encoding`, if any.
    pub encoding: Option<&'static str>,
    /// The 4xx it must get.
    pub expect: StatusCode,
}

/// `data` gzip-compressed (best compression: the bombs are small).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).expect("test setup");
    enc.finish().expect("test setup")
}

/// A track whose `properties.x` nests `depth` empty arrays.
pub fn nested(depth: usize) -> Vec<u8> {
    let mut s = String::from(r#"{"event":"e","anonymousId":"a","properties":{"x":"#);
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push_str("}}");
    s.into_bytes()
}

/// Every hostile body the collector must refuse, with the status it must answer.
pub fn cases() -> Vec<Case> {
    use StatusCode as S;
    let case = |name, path, body: &[u8], expect| Case {
        name,
        path,
        body: body.to_vec(),
        encoding: None,
        expect,
    };
    let big_string = "x".repeat(40_000);
    let huge_body = format!(
        r#"{{"event":"e","anonymousId":"a","properties":{{"s":"{}"}}}}"#,
        "y".repeat(600_000)
    );
    // 20 MB of one byte compresses to about 20 KB: under the wire limit, far over the
    // decompressed one.
    let bomb = gzip(&vec![b' '; 20 * 1024 * 1024]);
    let valid = br#"{"event":"e","anonymousId":"a","messageId":"gz"}"#;
    let good_gzip = gzip(valid);
    let truncated = good_gzip[..good_gzip.len() / 2].to_vec();
    let many = json!({"batch": (0..3000).map(|i| json!({"type":"track","event":"e","anonymousId":"a","messageId":format!("b{i}")})).collect::<Vec<_>>()});
    vec![
        case(
            "invalid JSON",
            "/v1/track",
            br#"{"event": "e", "anonymousId": "#,
            S::BAD_REQUEST,
        ),
        case(
            "not JSON at all",
            "/v1/track",
            b"hello world",
            S::BAD_REQUEST,
        ),
        case("empty body", "/v1/track", b"", S::BAD_REQUEST),
        case("JSON array body", "/v1/track", b"[1,2,3]", S::BAD_REQUEST),
        case("JSON null body", "/v1/track", b"null", S::BAD_REQUEST),
        case(
            "event name a number",
            "/v1/track",
            br#"{"event":5,"anonymousId":"a"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "anonymousId an array",
            "/v1/track",
            br#"{"event":"e","anonymousId":["a"]}"#,
            S::BAD_REQUEST,
        ),
        case(
            "properties a string",
            "/v1/track",
            br#"{"event":"e","anonymousId":"a","properties":"p"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "timestamp not a time",
            "/v1/track",
            br#"{"event":"e","anonymousId":"a","timestamp":"yesterday"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "track without event",
            "/v1/track",
            br#"{"anonymousId":"a"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "no identity",
            "/v1/track",
            br#"{"event":"e"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "alias without previousId",
            "/v1/alias",
            br#"{"userId":"u"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "group without groupId",
            "/v1/group",
            br#"{"anonymousId":"a"}"#,
            S::BAD_REQUEST,
        ),
        case(
            "batch not an array",
            "/v1/batch",
            br#"{"batch":{"type":"track"}}"#,
            S::BAD_REQUEST,
        ),
        case(
            "batch of garbage items",
            "/v1/batch",
            br#"{"batch":[1,"x",null,{"type":"nope","anonymousId":"a"}]}"#,
            S::BAD_REQUEST,
        ),
        case(
            "empty batch",
            "/v1/batch",
            br#"{"batch":[]}"#,
            S::BAD_REQUEST,
        ),
        case(
            "invalid UTF-8 in a string",
            "/v1/track",
            b"{\"event\":\"\xff\xfe\",\"anonymousId\":\"a\"}",
            S::BAD_REQUEST,
        ),
        case(
            "invalid UTF-8 outside strings",
            "/v1/track",
            b"\xc3\x28{\"event\":\"e\",\"anonymousId\":\"a\"}",
            S::BAD_REQUEST,
        ),
        case(
            "lone surrogate escape",
            "/v1/track",
            br#"{"event":"\ud800","anonymousId":"a"}"#,
            S::BAD_REQUEST,
        ),
        case("nested 33 deep", "/v1/track", &nested(33), S::BAD_REQUEST),
        case(
            "nested 100000 deep",
            "/v1/track",
            &nested(100_000),
            S::BAD_REQUEST,
        ),
        case(
            "number out of f64 range",
            "/v1/track",
            br#"{"event":"e","anonymousId":"a","properties":{"n":1e999999}}"#,
            S::BAD_REQUEST,
        ),
        case(
            "id over 256 bytes",
            "/v1/track",
            format!(r#"{{"event":"e","anonymousId":"{}"}}"#, "a".repeat(300)).as_bytes(),
            S::BAD_REQUEST,
        ),
        case(
            "event name over 512 bytes",
            "/v1/track",
            format!(r#"{{"event":"{}","anonymousId":"a"}}"#, "e".repeat(600)).as_bytes(),
            S::BAD_REQUEST,
        ),
        case(
            "message over 32 KB",
            "/v1/track",
            format!(r#"{{"event":"e","anonymousId":"a","properties":{{"s":"{big_string}"}}}}"#)
                .as_bytes(),
            S::PAYLOAD_TOO_LARGE,
        ),
        case(
            "body over 500 KB",
            "/v1/track",
            huge_body.as_bytes(),
            S::PAYLOAD_TOO_LARGE,
        ),
        case(
            "batch over 2500 messages",
            "/v1/batch",
            &serde_json::to_vec(&many).expect("test setup"),
            S::PAYLOAD_TOO_LARGE,
        ),
        case(
            "form body without data",
            "/v1/track",
            b"data2=abc",
            S::BAD_REQUEST,
        ),
        case(
            "form body with bad base64",
            "/v1/track",
            b"data=%%%***",
            S::BAD_REQUEST,
        ),
        Case {
            name: "gzip bomb (20 MB of spaces)",
            path: "/v1/batch",
            body: bomb,
            encoding: Some("gzip"),
            expect: S::PAYLOAD_TOO_LARGE,
        },
        Case {
            name: "truncated gzip",
            path: "/v1/track",
            body: truncated,
            encoding: Some("gzip"),
            expect: S::BAD_REQUEST,
        },
        Case {
            name: "plain JSON labelled gzip",
            path: "/v1/track",
            body: valid.to_vec(),
            encoding: Some("gzip"),
            expect: S::BAD_REQUEST,
        },
        Case {
            name: "unsupported encoding br",
            path: "/v1/track",
            body: valid.to_vec(),
            encoding: Some("br"),
            expect: S::BAD_REQUEST,
        },
    ]
}
