//! The collector's CPU cost per event without the network: parse + validate +
//! enrich + serialise the Kafka records, for one ~400-byte track call and a 100-event batch.
//! Run: `cargo bench -p sluice-ingest --bench pipeline`. Figures go in docs/benchmarks.md.

use std::hint::black_box;

use common::{facts, single_track, track};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use sluice_ingest::enrich::{enrich, RequestFacts};
use sluice_ingest::payload::{parse, Endpoint, Kind, Limits};
use sluice_ingest::produce::records;

mod common;

fn run(body: &[u8], endpoint: Endpoint, limits: &Limits, facts: &RequestFacts) -> usize {
    // The copy the request path makes of a body (`read_body` gathers its chunks).
    let buf = body.to_vec();
    let parsed = parse(&buf, endpoint, limits).expect("valid body");
    let out = enrich(parsed.messages.into_iter().map(|(_, m)| m).collect(), facts);
    records(&out).expect("serialisable").len()
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let facts = facts();
    let single = single_track();
    let single = serde_json::to_vec(&single).expect("json");
    let batch: Vec<_> = (0..100).map(track).collect();
    let batch = serde_json::to_vec(&json!({ "batch": batch })).expect("json");
    eprintln!(
        "single body {} bytes, batch body {} bytes",
        single.len(),
        batch.len()
    );

    let mut g = c.benchmark_group("collector");
    g.throughput(Throughput::Elements(1));
    g.bench_function("track_1_event", |b| {
        b.iter(|| {
            run(
                black_box(&single),
                Endpoint::Single(Kind::Track),
                &limits,
                &facts,
            )
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("batch_100_events", |b| {
        b.iter(|| run(black_box(&batch), Endpoint::Batch, &limits, &facts))
    });
    // For comparison: the same body parsed into a tree of maps, as the collector did before
    // it read messages into typed fields with `properties` and `context` as text.
    g.bench_function("batch_100_json_value_serde_json", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&batch)).expect("valid");
            v.is_object()
        })
    });
    // The stages apart, to see where the time goes.
    g.bench_function("batch_100_parse_validate", |b| {
        b.iter(|| {
            let buf = black_box(&batch).to_vec();
            parse(&buf, Endpoint::Batch, &limits)
                .expect("valid")
                .messages
                .len()
        })
    });
    let parsed = parse(&batch, Endpoint::Batch, &limits).expect("valid");
    let messages: Vec<_> = parsed.messages.into_iter().map(|(_, m)| m).collect();
    g.bench_function("batch_100_enrich", |b| {
        b.iter(|| enrich(black_box(messages.clone()), &facts).events.len())
    });
    let out = enrich(messages.clone(), &facts);
    g.bench_function("batch_100_serialize", |b| {
        b.iter(|| records(black_box(&out)).expect("serialisable").len())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
