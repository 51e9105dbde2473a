//! The collector's CPU a request, in process: a request handed to the router as hyper hands it
//! over (with the peer's address), routed, read, parsed, authorized (the key cached), limited,
//! enriched, serialised and "produced" to a sink that acknowledges at once, the answer made;
//! with the collector's allocator and its Prometheus recorder, so every allocation and metric
//! is paid for (building the request's head, hyper's part, is timed too, alike in every
//! build). What the live collector spends beyond it is HTTP on the wire (the bare server's
//! floor in `loadtest/ab-collector`), librdkafka, and the waits and wake-ups around Kafka's
//! answer: this isolates the collector's own code per request from the run-to-run noise of
//! the live side-by-side runs.
//! Run: `cargo bench -p sluice-ingest --bench request`. Figures go in docs/benchmarks.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use bytes::Bytes;
use clap::Parser;
use common::{single_track, track};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;
use sluice_ingest::auth::{KeyRow, KeyStore, StoreError};
use sluice_ingest::produce::{ProduceError, Records, Sink};
use sluice_ingest::routes::{router, App};
use sluice_ingest::Config;
use tower::ServiceExt;

// `facts()` is the other benches'.
#[allow(dead_code)]
mod common;

/// The collector's allocator (`src/main.rs`): allocation is a good part of a request's cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Acknowledges every record at once, as librdkafka's copy and Kafka's answer would.
struct Acknowledging;

impl Sink for Acknowledging {
    async fn send(&self, records: Records) -> Result<(), ProduceError> {
        std::hint::black_box(records.len());
        Ok(())
    }
    fn queue_depth(&self) -> usize {
        0
    }
    async fn probe(&self, _: Duration) -> Result<(), String> {
        Ok(())
    }
    async fn flush(&self, _: Duration) {}
}

/// One key, always found (the live collector finds it in its cache after the first request).
struct OneKey(HashMap<String, KeyRow>);

impl KeyStore for OneKey {
    async fn fetch(&self, prefix: &str) -> Result<Option<KeyRow>, StoreError> {
        Ok(self.0.get(prefix).cloned())
    }
    async fn touch(&self, _: &[i64]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), String> {
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let _recorder = sluice_ingest::metrics::handle().expect("the Prometheus recorder");
    let key = sluice_schema::apikey::generate();
    let row = KeyRow {
        id: 1,
        tenant_id: 42,
        workspace_id: 7,
        hash: key.hash.to_vec(),
        scopes: vec!["write".into()],
        expires_at: None,
        revoked_at: None,
    };
    // No rate limit: the bench sends one key's requests far faster than its default allows.
    let config = Config::try_parse_from(["sluice-ingest", "--rate-limit-per-key-per-second", "0"])
        .expect("settings");
    let store = OneKey(HashMap::from([(key.prefix.clone(), row)]));
    let app = Arc::new(App::new(config, Acknowledging, store));
    let routes = router(app);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let bearer = format!("Bearer {}", key.plaintext);
    let peer: SocketAddr = "203.0.113.9:50000".parse().expect("an address");
    let single = Bytes::from(serde_json::to_vec(&single_track()).expect("json"));
    let batch: Vec<_> = (0..20).map(track).collect();
    let batch = Bytes::from(serde_json::to_vec(&json!({ "batch": batch })).expect("json"));
    let request = |path: &str, body: &Bytes| {
        let mut req = Request::post(path)
            .header("authorization", &bearer)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .header(
                "user-agent",
                "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
            )
            .body(Body::from(body.clone()))
            .expect("a request");
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    };
    let answer = |req: Request| {
        let status = runtime
            .block_on(routes.clone().oneshot(req))
            .expect("infallible")
            .status();
        assert_eq!(status, StatusCode::OK);
    };

    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("track_1_event", |b| {
        b.iter(|| answer(request("/v1/track", &single)))
    });
    g.throughput(Throughput::Elements(20));
    g.bench_function("batch_20_events", |b| {
        b.iter(|| answer(request("/v1/batch", &batch)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
