//! The payload parser under random input, shaped by hand (JSON-like token soup, well-formed
//! messages with random values) where the coverage-guided fuzz target (`ingest/fuzz`) starts
//! from raw bytes: any bytes, under any content encoding and endpoint, end as parsed messages
//! or a 4xx error, never a panic and never a 5xx. Runs with every `cargo test`.

use std::io::Write;

use proptest::prelude::*;
use sluice_ingest::payload::{decode_body, parse, Endpoint, Limits};

fn endpoint(i: u8) -> Endpoint {
    Endpoint::ALL[usize::from(i) % Endpoint::ALL.len()]
}

/// Small limits so the size paths are reached by small inputs too.
fn limits() -> Limits {
    Limits {
        max_message_bytes: 512,
        max_request_bytes: 4_096,
        max_json_depth: 8,
        max_id_bytes: 16,
        max_name_bytes: 16,
        max_batch_messages: 8,
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Runs the whole body path; the property is that this returns (no panic) with a 4xx or Ok.
fn check(raw: &[u8], encoding: Option<&str>, content_type: Option<&str>, ep: Endpoint) {
    let limits = limits();
    match decode_body(raw, encoding, content_type, &limits) {
        Err(err) => assert!(err.status().is_client_error(), "decode: {err}"),
        Ok(json) => {
            if let Err(err) = parse(&json, ep, &limits) {
                assert!(err.status().is_client_error(), "parse: {err}");
            }
        }
    }
}

/// JSON-shaped text: mostly the tokens and field names of the Segment API, so the random
/// inputs reach the validation code rather than dying in the tokenizer.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("1e999".to_owned()),
        Just("-0".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        prop::sample::select(vec![
            "\"type\"",
            "\"track\"",
            "\"identify\"",
            "\"alias\"",
            "\"batch\"",
            "\"event\"",
            "\"anonymousId\"",
            "\"userId\"",
            "\"messageId\"",
            "\"timestamp\"",
            "\"sentAt\"",
            "\"properties\"",
            "\"context\"",
            "\"traits\"",
            "\"previousId\"",
            "\"groupId\"",
            "\"writeKey\"",
            "\"2024-02-30T25:61:00Z\"",
            "\"1700000000000\"",
        ])
        .prop_map(str::to_owned),
        "-?[0-9]{1,25}(\\.[0-9]{0,5})?".prop_map(|s| s),
        "\"[^\"\\\\]{0,20}\"".prop_map(|s| s),
    ];
    prop::collection::vec(token, 0..60).prop_map(|t| t.concat().into_bytes())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_end_as_messages_or_a_4xx(raw in prop::collection::vec(any::<u8>(), 0..2_048), ep in any::<u8>(), enc in 0u8..4) {
        let encoding = [None, Some("gzip"), Some("identity"), Some("deflate")][enc as usize];
        check(&raw, encoding, None, endpoint(ep));
    }

    #[test]
    fn any_json_shaped_text_ends_as_messages_or_a_4xx(raw in jsonish(), ep in any::<u8>(), zip in any::<bool>(), form in any::<bool>()) {
        let (body, enc) = if zip { (gzip(&raw), Some("gzip")) } else { (raw, None) };
        let ct = form.then_some("application/x-www-form-urlencoded");
        check(&body, enc, ct, endpoint(ep));
    }

    #[test]
    fn any_valid_message_with_random_values_is_accepted_or_refused_with_a_reason(
        event in proptest::option::of(".{0,24}"),
        anon in proptest::option::of("[ -~]{0,24}"),
        ts in proptest::option::of(any::<i64>()),
        props in proptest::collection::btree_map("[a-z]{1,4}", any::<f64>(), 0..5),
        ep in any::<u8>(),
    ) {
        let mut m = serde_json::Map::new();
        if let Some(e) = event { m.insert("event".into(), e.into()); }
        if let Some(a) = anon { m.insert("anonymousId".into(), a.into()); }
        if let Some(t) = ts { m.insert("timestamp".into(), t.into()); }
        let props: serde_json::Map<String, serde_json::Value> = props
            .into_iter()
            .map(|(k, v)| (k, serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into)))
            .collect();
        m.insert("properties".into(), props.into());
        let raw = serde_json::to_vec(&serde_json::Value::Object(m)).unwrap_or_default();
        check(&raw, None, Some("application/json"), endpoint(ep));
    }
}
