//! Segment's official Node SDK (`@segment/analytics-node`, pinned by
//! `tests/segment-sdk/package-lock.json`) pointed at a collector, changed in nothing but its
//! `host`: every call type arrives on Kafka with its fields, under the `messageId` the SDK
//! made, and a batched run of 50 calls arrives whole and once.
//!
//! Needs `node` and `npm` (Debian's `nodejs` and `npm` packages; `deploy/local/test` installs
//! them). Without them the tests fail and say so: a skipped compatibility test would pass
//! for a collector no SDK can talk to. The SDK is installed with `npm ci` into
//! `tests/segment-sdk/node_modules` on the first run and again whenever the lockfile changes.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use sluice_schema::messages::{self, EventType, IdentityKind};
use sluice_tests::ingest::{
    events_by_message_id, identities_by_message_id, sdk_call_events, served, Account, Collector,
};
use sluice_tests::{repo_root, Stack};

const WAIT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(1_000);
/// The longest a driver run may take: its own flush timeout is 30 s.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(90);

/// What the driver (`tests/segment-sdk/driver.mjs`) prints.
#[derive(Debug, Deserialize)]
struct Report {
    /// Each call, as the SDK completed it.
    calls: Vec<Call>,
    /// Each HTTP request the SDK sent.
    requests: Vec<HttpRequest>,
    /// Everything the SDK reported as failed.
    errors: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct Call {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "messageId")]
    message_id: String,
}

#[derive(Debug, Deserialize)]
struct HttpRequest {
    url: String,
    messages: Option<usize>,
    status: Option<u16>,
}

fn sdk_dir() -> PathBuf {
    repo_root().join("tests/segment-sdk")
}

/// Installs the pinned SDK (once per process), failing the test with how to install Node.js
/// and npm when they are missing: the test never skips.
fn install_sdk() {
    if let Err(err) = sluice_tests::sdk::npm_ci(&sdk_dir()) {
        panic!("the Segment SDK test cannot run: {err:#}");
    }
}

/// Runs the driver's `scenario` against `collector` with `key` and returns its report,
/// failing the test when the SDK reported any error.
async fn drive(collector: &Collector, key: &str, scenario: &str) -> Report {
    install_sdk();
    let run = tokio::process::Command::new("node")
        .arg("driver.mjs")
        .arg(format!("http://{}", collector.addr))
        .arg(key)
        .arg(scenario)
        .current_dir(sdk_dir())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DRIVER_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("the SDK driver ({scenario}) ran over {DRIVER_TIMEOUT:?}"))
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Segment SDK reported errors ({scenario}, {}):\n{stdout}\n{stderr}",
        out.status
    );
    let report: Report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("driver printed no report ({err}):\n{stdout}\n{stderr}"));
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(!report.requests.is_empty(), "the SDK sent nothing");
    for r in &report.requests {
        assert_eq!(r.status, Some(200), "{r:?}");
        assert!(
            r.url.ends_with("/v1/batch"),
            "the SDK's own path: {}",
            r.url
        );
    }
    report
}

/// The SDK's messageId of each call type of a `calls` run.
fn ids_by_type(report: &Report) -> HashMap<&str, &str> {
    let ids: HashMap<&str, &str> = report
        .calls
        .iter()
        .map(|c| (c.kind.as_str(), c.message_id.as_str()))
        .collect();
    assert_eq!(ids.len(), 6, "one call of each type: {:?}", report.calls);
    for id in ids.values() {
        // The SDK's own form, so the ids checked below are not ones the collector made.
        assert!(id.starts_with("node-next-"), "{id}");
    }
    ids
}

/// Checks what a `calls` run put on the event and identity topics.
async fn assert_calls_arrived(collector: &Collector, acct: &Account, report: &Report) {
    let ids = ids_by_type(report);
    let brokers = &Stack::get().kafka_brokers;
    let tenant = acct.tenant_id;
    let by_id = sdk_call_events(collector, &acct.key.plaintext, WAIT, LINGER).await;
    let event = |kind: &str| {
        let id = ids[kind];
        let (key, msg) = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{kind} {id} not on the topic: {:?}", by_id.keys()));
        assert_eq!(msg.event_id, messages::event_id(tenant, id), "{kind}");
        assert_eq!(msg.tenant_id, tenant);
        assert_eq!(msg.workspace_id, acct.workspace_id);
        assert!(msg.sent_at.is_some() && msg.timestamp.is_some(), "{kind}");
        assert_eq!(
            msg.context["library"]["name"], "@segment/analytics-node",
            "{kind}"
        );
        assert!(
            msg.context["_metadata"]["nodeVersion"].is_string(),
            "SDK envelope kept in context: {kind}"
        );
        // The request's agent is the SDK's own; its events are not a crawler's.
        assert!(!msg.bot, "{kind}: {:?}", msg.user_agent);
        (key.clone(), msg.clone())
    };

    let (key, track) = event("track");
    assert_eq!(key, format!("{tenant}/sdk-anon-1"));
    assert_eq!(track.kind, EventType::Track);
    assert_eq!(track.name.as_deref(), Some("SDK Order Completed"));
    assert_eq!(track.anonymous_id.as_deref(), Some("sdk-anon-1"));
    assert_eq!(track.user_id, None);
    assert_eq!(track.properties["orderId"], "o-42");
    assert_eq!(track.properties["revenue"], 99.5);
    assert_eq!(track.properties["items"][0]["sku"], "sku-1");
    assert_eq!(track.context["campaign"]["source"], "sdk-news");
    // The SDK stamps timestamp and sentAt from one clock moments apart.
    let lag = track.received_at - track.occurred_at;
    assert!(
        lag.num_seconds().abs() < 30,
        "occurred_at near receipt: {lag}"
    );

    let (_, page) = event("page");
    assert_eq!(page.kind, EventType::Page);
    assert_eq!(page.name.as_deref(), Some("SDK Pricing"));
    assert_eq!(page.anonymous_id.as_deref(), Some("sdk-anon-1"));
    assert_eq!(page.properties["path"], "/pricing");
    assert_eq!(page.properties["category"], "Docs");

    let (key, screen) = event("screen");
    assert_eq!(key, format!("{tenant}/sdk-user-1"));
    assert_eq!(screen.kind, EventType::Screen);
    assert_eq!(screen.name.as_deref(), Some("SDK Settings"));
    assert_eq!(screen.user_id.as_deref(), Some("sdk-user-1"));
    assert_eq!(screen.properties["tab"], "billing");

    let (_, group) = event("group");
    assert_eq!(group.kind, EventType::Group);
    assert_eq!(group.user_id.as_deref(), Some("sdk-user-1"));
    assert_eq!(group.properties["groupId"], "sdk-group-1");
    assert_eq!(group.properties["traits"]["name"], "Initech");
    assert_eq!(group.properties["traits"]["employees"], 120);

    let identities = identities_by_message_id(brokers, &collector.topics.identity, 2, WAIT, LINGER)
        .await
        .expect("the identify and the alias");
    let identify = &identities[ids["identify"]];
    assert_eq!(identify.kind, IdentityKind::Identify);
    assert_eq!(identify.tenant_id, tenant);
    assert_eq!(identify.user_id.as_deref(), Some("sdk-user-1"));
    assert_eq!(identify.anonymous_id.as_deref(), Some("sdk-anon-1"));
    assert_eq!(identify.traits["name"], "Ada");
    assert_eq!(identify.traits["plan"], "enterprise");
    assert_eq!(
        identify.context["library"]["name"],
        "@segment/analytics-node"
    );
    let alias = &identities[ids["alias"]];
    assert_eq!(alias.kind, IdentityKind::Alias);
    assert_eq!(alias.user_id.as_deref(), Some("sdk-user-1"));
    assert_eq!(alias.previous_id.as_deref(), Some("sdk-anon-1"));
}

#[tokio::test]
async fn segment_node_sdk_calls_arrive_with_their_fields_under_the_sdks_message_ids() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let report = drive(&collector, &acct.key.plaintext, "calls").await;
    assert_eq!(report.requests.len(), 1, "six calls fit one batch");
    assert_eq!(report.requests[0].messages, Some(6));
    assert_calls_arrived(&collector, &acct, &report).await;
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn segment_node_sdk_bodies_gzipped_through_its_http_client_hook_arrive() {
    let (_db, acct, collector) = served("acme").await.unwrap();
    let report = drive(&collector, &acct.key.plaintext, "gzip").await;
    assert_calls_arrived(&collector, &acct, &report).await;
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn segment_node_sdk_batches_of_50_calls_arrive_whole_and_once() {
    const N: usize = 50;
    let (_db, acct, collector) = served("acme").await.unwrap();
    let report = drive(&collector, &acct.key.plaintext, &format!("batch:{N}")).await;

    // The driver caps batches at 20 calls: 50 take at least three requests.
    let sizes: Vec<usize> = report
        .requests
        .iter()
        .map(|r| r.messages.expect("request body is a batch"))
        .collect();
    assert!(sizes.len() >= 3, "{sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 20), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), N);
    let sdk_ids: HashSet<&str> = report.calls.iter().map(|c| c.message_id.as_str()).collect();
    assert_eq!(sdk_ids.len(), N);

    let consumed = collector
        .consume(&collector.topics.event, N, WAIT, LINGER)
        .await
        .unwrap();
    assert_eq!(consumed.len(), N, "each call exactly once");
    let by_id = events_by_message_id(&consumed);
    let got: HashSet<&str> = by_id.keys().map(String::as_str).collect();
    assert_eq!(got, sdk_ids);
    let mut seqs: Vec<i64> = by_id
        .values()
        .map(|(key, m)| {
            assert_eq!(
                m.event_id,
                messages::event_id(acct.tenant_id, &m.message_id)
            );
            assert_eq!(m.name.as_deref(), Some("SDK Batched"));
            let anon = m.anonymous_id.as_deref().unwrap();
            assert_eq!(key, &format!("{}/{anon}", acct.tenant_id));
            m.properties["seq"].as_i64().unwrap()
        })
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..N as i64).collect::<Vec<_>>());
    collector.stop().await.unwrap();
}
