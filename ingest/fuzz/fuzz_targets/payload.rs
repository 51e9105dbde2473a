//! The collector's body path under coverage-guided input: any bytes, under any content
//! encoding, content type and endpoint, end as parsed messages or a 4xx error. A panic, or an
//! error that is not the client's fault, is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_ingest::payload::{decode_body, parse, Endpoint, Limits};

const ENCODINGS: [Option<&str>; 4] = [None, Some("gzip"), Some("deflate"), Some("identity")];
const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/json"),
    Some("text/plain"),
    Some("application/x-www-form-urlencoded"),
    None,
];

/// Small limits, so the size checks are reached by small inputs too.
const LIMITS: Limits = Limits {
    max_message_bytes: 512,
    max_request_bytes: 4_096,
    max_json_depth: 8,
    max_id_bytes: 16,
    max_name_bytes: 16,
    max_batch_messages: 8,
};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the endpoint, the encoding and the content type, so libFuzzer
    // explores every combination with the rest as the body.
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let endpoint = Endpoint::ALL[usize::from(pick) % Endpoint::ALL.len()];
    let encoding = ENCODINGS[usize::from(pick >> 3) % ENCODINGS.len()];
    let content_type = CONTENT_TYPES[usize::from(pick >> 5) % CONTENT_TYPES.len()];
    match decode_body(body, encoding, content_type, &LIMITS) {
        Err(err) => assert!(err.status().is_client_error(), "decode: {err}"),
        Ok(json) => {
            if let Err(err) = parse(&json, endpoint, &LIMITS) {
                assert!(err.status().is_client_error(), "parse: {err}");
            }
        }
    }
});
