//! Heap allocations a message on the collector's request path, stage by stage (decode and
//! parse, enrich, Kafka records): each one is a trip through the allocator, which was a sixth
//! of the collector's samples under load before they were cut.
//! Run: `cargo bench -p sluice-ingest --bench allocations`. Figures go in docs/benchmarks.md.

use common::{facts, single_track, track};
use serde_json::json;
use sluice_ingest::enrich::enrich;
use sluice_ingest::payload::{decode_body, parse, Endpoint, Kind, Limits};
use sluice_ingest::produce::records;

mod common;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Allocations so far (blocks allocated, reallocations included).
fn allocations() -> u64 {
    dhat::HeapStats::get().total_blocks
}

/// Allocations a message of `body` in each stage, averaged over a few requests.
fn per_message(body: &[u8], endpoint: Endpoint) -> [f64; 3] {
    const REQUESTS: u64 = 50;
    let limits = Limits::default();
    let facts = facts();
    let mut counts = [0u64; 3];
    let mut messages = 0u64;
    // The first request is left out: it builds what the process keeps (lazy tables).
    for request in 0..=REQUESTS {
        let start = allocations();
        let json = decode_body(body, None, None, &limits).expect("plain JSON");
        let parsed = parse(&json, endpoint, &limits).expect("valid body");
        let parsed_at = allocations();
        let n = parsed.messages.len() as u64;
        let out = enrich(
            parsed.messages.into_iter().map(|(_, m)| m).collect(),
            &facts,
        );
        let enriched_at = allocations();
        let records = records(&out).expect("serialisable");
        let recorded_at = allocations();
        drop(records);
        if request == 0 {
            continue;
        }
        messages += n;
        counts[0] += parsed_at - start;
        counts[1] += enriched_at - parsed_at;
        counts[2] += recorded_at - enriched_at;
    }
    counts.map(|n| n as f64 / messages as f64)
}

fn main() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let single = single_track();
    // A batch as analytics-node and the load generator send one: the library's context and
    // `sentAt` once, at the batch's top level.
    let shared: Vec<_> = (0..20)
        .map(|i| {
            let mut t = track(i);
            if let Some(o) = t.as_object_mut() {
                o.remove("sentAt");
                if let Some(context) = o.get_mut("context").and_then(|c| c.as_object_mut()) {
                    context.remove("library");
                }
            }
            t
        })
        .collect();
    let shared = json!({
        "batch": shared,
        "sentAt": "2026-11-24T10:00:01.000Z",
        "context": {"library": {"name": "analytics-node", "version": "2.1.0"}},
    });
    let hundred = json!({ "batch": (0..100).map(track).collect::<Vec<_>>() });
    let bodies = [
        (
            "single call",
            serde_json::to_vec(&single),
            Endpoint::Single(Kind::Track),
        ),
        (
            "batch of 20, shared context",
            serde_json::to_vec(&shared),
            Endpoint::Batch,
        ),
        (
            "batch of 100",
            serde_json::to_vec(&hundred),
            Endpoint::Batch,
        ),
    ];
    println!("| body | decode + parse | enrich | records | a message |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, body, endpoint) in bodies {
        let [parse, enrich, records] = per_message(&body.expect("json"), endpoint);
        println!(
            "| {name} | {parse:.1} | {enrich:.1} | {records:.1} | {:.1} |",
            parse + enrich + records
        );
    }
}
