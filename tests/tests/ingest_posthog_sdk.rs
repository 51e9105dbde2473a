//! PostHog's official server SDKs, posthog-node (pinned by `tests/posthog-sdk/package-lock.json`)
//! and posthog-python (pinned by `tests/posthog-sdk/requirements.txt`), pointed at a collector
//! and changed in nothing but their `host`: each sends a capture, a `$pageview`, a `$screen`,
//! an identify (posthog-python: `set`), an alias and a group identify, gzipped and not, and
//! asks for its flags. Every call arrives on Kafka once, under the `uuid` the SDK made, with
//! its fields, and is stored once in PostgreSQL by a writer.
//!
//! Needs node, npm and python3 with venv (`deploy/local/test` installs them); without them
//! the tests fail and say so.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sluice_schema::messages::{self, EventType, IdentityKind};
use sluice_tests::ingest::{
    account, identities_by_message_id, sdk_call_events, Account, Collector,
};
use sluice_tests::writer::RunningWriter;
use sluice_tests::{sdk, unique_name, Stack, TestDb};

const WAIT: Duration = Duration::from_secs(30);
const LINGER: Duration = Duration::from_millis(1_000);
/// The longest a driver run may take: its own shutdown waits up to 30 s.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(90);

/// Which SDK, and the names its calls carry.
struct Sdk {
    /// `node` or `python`.
    name: &'static str,
    /// The `$lib` it stamps on its events.
    lib: &'static str,
    /// The distinct id of its calls.
    user: &'static str,
    /// The track call's event name.
    track: &'static str,
    /// The screen call's name.
    screen: &'static str,
    /// The group call's key.
    group: &'static str,
    /// The other id of the alias call. The writer merges the two ids' leads into one, known
    /// by the alias's `userId`.
    alias: &'static str,
}

const NODE: Sdk = Sdk {
    name: "node",
    lib: "posthog-node",
    user: "ph-node-user-1",
    track: "Node Order Completed",
    screen: "Node Settings",
    group: "ph-company-1",
    alias: "ph-node-old-1",
};

const PYTHON: Sdk = Sdk {
    name: "python",
    lib: "posthog-python",
    user: "ph-py-user-1",
    track: "Python Order Completed",
    screen: "Python Settings",
    group: "ph-py-company-1",
    alias: "ph-py-old-1",
};

/// Runs the SDK's driver with `scenario` and returns its report, failing on any SDK error.
async fn drive(sdk: &Sdk, collector: &Collector, key: &str, scenario: &str) -> Value {
    let dir = sdk::posthog_dir();
    let mut cmd = match sdk.name {
        "node" => {
            sdk::npm_ci(&dir).unwrap_or_else(|e| panic!("{e:#}"));
            let mut cmd = tokio::process::Command::new("node");
            cmd.arg("node-driver.mjs");
            cmd
        }
        _ => {
            let mut cmd = tokio::process::Command::new(
                sdk::posthog_python().unwrap_or_else(|e| panic!("{e:#}")),
            );
            cmd.arg("python-driver.py");
            cmd
        }
    };
    let run = cmd
        .arg(format!("http://{}", collector.addr))
        .arg(key)
        .arg(scenario)
        .current_dir(&dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DRIVER_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("the {} driver ran over {DRIVER_TIMEOUT:?}", sdk.name))
        .expect("running the driver");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "posthog-{} reported errors ({scenario}, {}):\n{stdout}\n{stderr}",
        sdk.name,
        out.status
    );
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("driver printed no report ({err}):\n{stdout}\n{stderr}"));
    assert_eq!(report["errors"], Value::Array(vec![]), "{report}");
    let requests = report["requests"].as_array().expect("requests");
    assert!(
        requests
            .iter()
            .any(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/batch/"))),
        "the SDK's own capture path: {report}"
    );
    assert!(
        requests.iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/flags/?v="))),
        "the SDK asked for its flags: {report}"
    );
    for r in requests {
        assert_eq!(r["status"], 200, "{r}");
        let gzip = r["encoding"] == "gzip";
        if r["path"].as_str().is_some_and(|p| p.starts_with("/batch/")) {
            assert_eq!(gzip, scenario != "plain", "{r}");
        }
    }
    assert!(
        report["flags"]
            .as_object()
            .is_none_or(serde_json::Map::is_empty),
        "no flag is on: {report}"
    );
    report
}

/// The SDK's uuid of each call type.
fn uuids(sdk: &Sdk, report: &Value) -> HashMap<&'static str, String> {
    let by_event = |event: &str| -> String {
        let found: Vec<String> = report["requests"]
            .as_array()
            .expect("the driver's requests")
            .iter()
            .flat_map(|r| r["events"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["event"] == event)
            .filter_map(|e| e["uuid"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(found.len(), 1, "one {event}: {report}");
        found[0].clone()
    };
    let ids: HashMap<&'static str, String> = match sdk.name {
        "node" => [
            ("track", by_event(sdk.track)),
            ("page", by_event("$pageview")),
            ("screen", by_event("$screen")),
            ("identify", by_event("$identify")),
            ("alias", by_event("$create_alias")),
            ("group", by_event("$groupidentify")),
        ]
        .into_iter()
        .collect(),
        _ => ["track", "page", "screen", "identify", "alias", "group"]
            .into_iter()
            .map(|k| {
                let id = report["calls"][k].as_str();
                (k, id.unwrap_or_else(|| panic!("{k}: {report}")).to_owned())
            })
            .collect(),
    };
    for id in ids.values() {
        // The SDK's own (UUIDv7) ids: not ones the collector made.
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
    ids
}

/// Checks what one SDK run put on Kafka and in PostgreSQL.
async fn assert_calls_arrived(
    sdk: &Sdk,
    db: &TestDb,
    collector: &Collector,
    acct: &Account,
    report: &Value,
) {
    let ids = uuids(sdk, report);
    let brokers = &Stack::get().kafka_brokers;
    let tenant = acct.tenant_id;
    let by_id = sdk_call_events(collector, &acct.key.plaintext, WAIT, LINGER).await;
    let event = |kind: &str| {
        let id = &ids[kind];
        let (key, m) = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{kind} {id} not on the topic: {:?}", by_id.keys()));
        assert_eq!(m.event_id, messages::event_id(tenant, id), "{kind}");
        assert_eq!(m.workspace_id, acct.workspace_id);
        assert_eq!(
            m.context["$lib"], sdk.lib,
            "{kind}: $-properties in context"
        );
        assert_eq!(m.context["library"]["name"], sdk.lib, "{kind}");
        assert!(m.timestamp.is_some() && m.sent_at.is_some(), "{kind}");
        let lag = m.received_at - m.occurred_at;
        assert!(lag.num_seconds().abs() < 30, "{kind}: occurred_at {lag}");
        (key.clone(), m.clone())
    };
    let (key, track) = event("track");
    assert_eq!(
        key,
        format!("{tenant}/{}", sdk.user),
        "keyed by the visitor"
    );
    assert_eq!(track.kind, EventType::Track);
    assert_eq!(track.name.as_deref(), Some(sdk.track));
    assert_eq!(track.anonymous_id.as_deref(), Some(sdk.user));
    assert!(track.properties["revenue"].is_number());
    assert!(track.properties["orderId"].is_string());
    assert!(
        !track.properties.keys().any(|k| k.starts_with('$')),
        "{:?}",
        track.properties
    );
    let page = event("page").1;
    assert_eq!(page.kind, EventType::Page);
    assert!(page.context["page"]["url"]
        .as_str()
        .expect("a uuid")
        .starts_with("https://shop.example/"));
    let screen = event("screen").1;
    assert_eq!(screen.kind, EventType::Screen);
    assert_eq!(screen.name.as_deref(), Some(sdk.screen));
    let group = event("group").1;
    assert_eq!(group.kind, EventType::Group);
    assert_eq!(group.properties["groupId"], sdk.group);
    assert!(group.properties["traits"]["employees"].is_number());

    let identities = identities_by_message_id(brokers, &collector.topics.identity, 2, WAIT, LINGER)
        .await
        .expect("the identify and the alias");
    let identify = &identities[&ids["identify"]];
    assert_eq!(identify.kind, IdentityKind::Identify);
    assert_eq!(identify.user_id.as_deref(), Some(sdk.user));
    assert!(identify.traits["name"].is_string(), "{:?}", identify.traits);
    assert!(identify.traits["plan"].is_string(), "{:?}", identify.traits);
    let alias = &identities[&ids["alias"]];
    assert_eq!(alias.kind, IdentityKind::Alias);
    match sdk.name {
        // posthog-node's alias(distinctId, alias): the alias joins distinctId's person.
        "node" => {
            assert_eq!(identify.anonymous_id.as_deref(), Some("ph-node-anon-1"));
            assert_eq!(identify.traits["first_plan"], "free", "$set_once");
            assert_eq!(alias.user_id.as_deref(), Some(sdk.user));
            assert_eq!(alias.previous_id.as_deref(), Some("ph-node-old-1"));
        }
        // posthog-python's alias(previous_id, distinct_id) puts previous_id in the event's
        // distinct_id: the wire event, mapped as every PostHog alias is, links the same pair.
        _ => {
            assert_eq!(alias.user_id.as_deref(), Some("ph-py-old-1"));
            assert_eq!(alias.previous_id.as_deref(), Some(sdk.user));
        }
    }

    // Stored once each in PostgreSQL.
    let writer = RunningWriter::start(sluice_writer::Config::for_tests(
        brokers,
        &db.url,
        &collector.config.topic_prefix,
        &unique_name("g"),
    ));
    let client = db.client().await.expect("a database connection");
    let event_ids: Vec<String> = ["track", "page", "screen", "group"]
        .iter()
        .map(|k| ids[k].clone())
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    let rows = loop {
        let rows = client
            .query(
                "SELECT message_id, type, name, anonymous_id FROM event WHERE tenant_id = $1 \
                 AND message_id = ANY($2)",
                &[&tenant, &event_ids],
            )
            .await
            .expect("reading event rows");
        if rows.len() >= 4 || tokio::time::Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut stored: HashMap<String, (String, Option<String>)> = HashMap::new();
    for row in &rows {
        let id: String = row.get(0);
        assert!(
            stored
                .insert(id.clone(), (row.get(1), row.get(2)))
                .is_none(),
            "{id} stored twice"
        );
    }
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert_eq!(
        stored[&ids["track"]],
        ("track".into(), Some(sdk.track.into()))
    );
    assert_eq!(stored[&ids["page"]].0, "page");
    assert_eq!(
        stored[&ids["screen"]],
        ("screen".into(), Some(sdk.screen.into()))
    );
    assert_eq!(stored[&ids["group"]].0, "group");
    let deadline = tokio::time::Instant::now() + WAIT;
    let traits: Value = loop {
        let row = client
            .query_opt(
                "SELECT traits FROM lead WHERE tenant_id = $1 AND user_id = ANY($2)",
                &[&tenant, &vec![sdk.user, sdk.alias]],
            )
            .await
            .expect("reading lead rows");
        if let Some(row) = row {
            break row.get(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no lead for {} or {}",
            sdk.user,
            sdk.alias
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(traits["name"].is_string(), "{traits}");
    writer.stop().await.expect("the writer stops cleanly");
}

async fn run(sdk: &Sdk, scenario: &str) {
    let db = TestDb::migrated().await.expect("a test database");
    let acct = account(&db, "acme").await.expect("an account");
    let collector = Collector::start(Collector::config(&db))
        .await
        .expect("a collector");
    let report = drive(sdk, &collector, &acct.key.plaintext, scenario).await;
    assert_calls_arrived(sdk, &db, &collector, &acct, &report).await;
    let metrics = collector.metrics().await.expect("the metrics page");
    assert!(
        metrics.contains("sluice_ingest_requests_total{endpoint=\"posthog\",status=\"200\"}"),
        "{metrics}"
    );
    collector.stop().await.expect("the collector stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_node_gzipped_calls_arrive_once_with_their_fields_under_the_sdks_uuids() {
    run(&NODE, "calls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_node_uncompressed_calls_arrive_once_with_their_fields() {
    run(&NODE, "plain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_python_gzipped_calls_arrive_once_with_their_fields_under_the_sdks_uuids() {
    run(&PYTHON, "gzip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthog_python_uncompressed_calls_arrive_once_with_their_fields() {
    run(&PYTHON, "plain").await;
}
