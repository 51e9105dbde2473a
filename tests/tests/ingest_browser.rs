//! Real browsers: headless Chromium (Debian's `chromium`, driven by playwright-core from
//! `tests/posthog-sdk/package-lock.json`) loads a page from another origin than the
//! collector's, which runs Segment's `@segment/analytics-next` and `posthog-js` pointed at
//! the collector, a pixel `<img>`, and a `sendBeacon` on page hide
//! (`tests/posthog-sdk/browser-driver.mjs`). Every call is stored exactly once, and the page
//! shows no console error and no failed or refused request (CORS included). With the
//! collector down, the SDKs queue and retry, and each call is stored once after it returns.
//!
//! Needs node, npm and Chromium (`deploy/local/test` installs them); without them the tests
//! fail and say so.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;
use sluice_tests::ingest::{account, Account, Collector};
use sluice_tests::private::TcpProxy;
use sluice_tests::writer::RunningWriter;
use sluice_tests::{sdk, unique_name, Stack, TestDb};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

/// One id an SDK made on the page: `sdk` (segment, posthog, pixel, beacon), the call or event
/// type, the id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Call {
    sdk: String,
    kind: String,
    id: String,
}

impl Call {
    /// Identify and alias calls go to the identity topic, not to the `event` table.
    fn is_identity(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "identify" | "alias" | "$identify" | "$create_alias" | "$set" | "$set_once"
        )
    }
}

fn calls(events: &Value) -> Vec<Call> {
    events
        .as_array()
        .expect("events")
        .iter()
        .map(|e| Call {
            sdk: e["sdk"].as_str().expect("a string").to_owned(),
            kind: e["type"].as_str().expect("a string").to_owned(),
            id: e["id"].as_str().expect("a string").to_owned(),
        })
        .collect()
}

/// The browser's run: the ids recorded once the page made its calls, and the final report.
struct Run {
    called: Vec<Call>,
    report: Value,
}

/// Runs the driver against `collector_url`; `between` runs once the page made its calls and
/// before the page is hidden.
async fn browse<F, Fut>(collector_url: &str, key: &str, run_id: &str, between: F) -> Run
where
    F: FnOnce(Vec<Call>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = sdk::posthog_dir();
    sdk::npm_ci(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    let chromium = std::env::var("SLUICE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    sdk::tool_version(&chromium, "chromium").unwrap_or_else(|e| panic!("{e:#}"));
    let mut child = tokio::process::Command::new("node")
        .arg("browser-driver.mjs")
        .arg(collector_url)
        .arg(key)
        .arg(run_id)
        .current_dir(&dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let first = next_line(&mut lines).await;
    assert_eq!(first["phase"], "called", "{first}");
    let called = calls(&first["events"]);
    between(called.clone()).await;
    stdin
        .write_all(b"go\n")
        .await
        .expect("writing to the driver");
    stdin.flush().await.expect("writing to the driver");
    let report = next_line(&mut lines).await;
    assert_eq!(report["phase"], "done", "{report}");
    let status = tokio::time::timeout(DRIVER_TIMEOUT, child.wait())
        .await
        .expect("the driver exits")
        .expect("waiting for the driver");
    assert!(status.success(), "driver: {status}");
    assert_eq!(
        report["blocked"],
        Value::Array(vec![]),
        "only loopback: {report}"
    );
    let origin = report["origin"].as_str().expect("the origin");
    assert!(
        !collector_url.starts_with(origin),
        "the page's origin is not the collector's"
    );
    Run { called, report }
}

/// The driver's next line of JSON.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(DRIVER_TIMEOUT, lines.next_line())
        .await
        .expect("the browser driver answers in time")
        .expect("reading the driver")
        .expect("the driver ended early (its error is above)");
    serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Waits until each event id is a row of `event` (or `WAIT` passed), then a little longer so
/// a late duplicate would show, and returns the rows per id.
async fn stored_events(db: &TestDb, tenant: i64, ids: &[String]) -> HashMap<String, i64> {
    let client = db.client().await.expect("a database connection");
    let count = || async {
        client
            .query(
                "SELECT message_id, count(*) FROM event WHERE tenant_id = $1 \
                 AND message_id = ANY($2) GROUP BY message_id",
                &[&tenant, &ids],
            )
            .await
            .expect("counting rows")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect::<HashMap<_, _>>()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while count().await.len() < ids.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    count().await
}

/// Waits until the page's `calls` arrived (events as rows, identify and alias calls on the
/// identity topic), as a visitor stays on a page until its SDKs sent what it did.
async fn wait_arrived(db: &TestDb, collector: &Collector, tenant: i64, calls: &[Call]) {
    let ids: Vec<String> = calls
        .iter()
        .filter(|c| !c.is_identity())
        .map(|c| c.id.clone())
        .collect();
    let stored = stored_events(db, tenant, &ids).await;
    assert_eq!(stored.len(), ids.len(), "{stored:?} of {calls:?}");
    let identities = calls.iter().filter(|c| c.is_identity()).count();
    let consumed = collector
        .consume(
            &collector.topics.identity,
            identities,
            WAIT,
            Duration::from_millis(200),
        )
        .await
        .expect("reading the identity topic");
    assert!(consumed.len() >= identities, "{consumed:?} of {calls:?}");
}

/// Checks every call of the page: events once each in PostgreSQL, identify and alias calls
/// once each on the identity topic.
async fn assert_each_stored_once(
    db: &TestDb,
    collector: &Collector,
    acct: &Account,
    calls: &[Call],
) {
    let unique: HashSet<&Call> = calls.iter().collect();
    assert_eq!(
        unique.len(),
        calls.len(),
        "the SDKs made each id once: {calls:?}"
    );
    let event_ids: Vec<String> = calls
        .iter()
        .filter(|c| !c.is_identity())
        .map(|c| c.id.clone())
        .collect();
    let stored = stored_events(db, acct.tenant_id, &event_ids).await;
    for id in &event_ids {
        assert_eq!(
            stored.get(id),
            Some(&1),
            "{id} stored once: {stored:?} of {calls:?}"
        );
    }
    let identity_ids: HashSet<&str> = calls
        .iter()
        .filter(|c| c.is_identity())
        .map(|c| c.id.as_str())
        .collect();
    let consumed = collector
        .consume(
            &collector.topics.identity,
            identity_ids.len(),
            WAIT,
            Duration::from_millis(1_000),
        )
        .await
        .expect("reading the identity topic");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in &consumed {
        *seen
            .entry(
                c.value["message_id"]
                    .as_str()
                    .expect("a message id")
                    .to_owned(),
            )
            .or_default() += 1;
    }
    for id in &identity_ids {
        assert_eq!(seen.get(*id), Some(&1), "{id} once: {seen:?}");
    }
    assert_eq!(seen.len(), identity_ids.len(), "{seen:?}");
}

fn kinds(calls: &[Call], sdk: &str) -> HashSet<String> {
    calls
        .iter()
        .filter(|c| c.sdk == sdk)
        .map(|c| c.kind.clone())
        .collect()
}

async fn setup() -> (TestDb, Account, Collector, RunningWriter) {
    let db = TestDb::migrated().await.expect("a test database");
    let acct = account(&db, "web").await.expect("an account");
    let collector = Collector::start(Collector::config(&db))
        .await
        .expect("a collector");
    let writer = RunningWriter::start(sluice_writer::Config::for_tests(
        &Stack::get().kafka_brokers,
        &db.url,
        &collector.config.topic_prefix,
        &unique_name("g"),
    ));
    (db, acct, collector, writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_next_posthog_js_pixel_and_beacon_each_store_once_without_a_console_or_cors_error(
) {
    let (db, acct, collector, writer) = setup().await;
    let run_id = unique_name("b");
    let (database, tenant, target) = (&db, acct.tenant_id, &collector);
    let run = browse(
        &collector.url(""),
        &acct.key.plaintext,
        &run_id,
        |called| async move { wait_arrived(database, target, tenant, &called).await },
    )
    .await;
    let calls = calls(&run.report["events"]);
    for kind in ["page", "track", "identify", "group", "alias"] {
        assert!(kinds(&calls, "segment").contains(kind), "{kind}: {calls:?}");
    }
    for kind in [
        "$pageview",
        "Browser Clicked",
        "$identify",
        "$groupidentify",
        "Browser Beacon",
    ] {
        assert!(
            kinds(&calls, "posthog").contains(kind),
            "{kind}: {}",
            run.report
        );
    }
    assert!(kinds(&calls, "pixel").contains("pixel"), "{calls:?}");
    assert!(kinds(&calls, "beacon").contains("track"), "{calls:?}");
    for what in ["console", "failed", "http_errors"] {
        assert_eq!(
            run.report[what],
            Value::Array(vec![]),
            "{what}: {}",
            run.report
        );
    }
    assert_each_stored_once(&db, &collector, &acct, &calls).await;
    let metrics = collector.metrics().await.unwrap();
    for endpoint in ["posthog", "posthog_config", "track", "pixel"] {
        assert!(
            metrics.contains(&format!(
                "sluice_ingest_requests_total{{endpoint=\"{endpoint}\",status=\"200\"}}"
            )),
            "{endpoint}: {metrics}"
        );
    }
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_collector_down_the_browser_sdks_queue_and_retry_and_store_each_call_once() {
    let (db, acct, collector, writer) = setup().await;
    let proxy = TcpProxy::start(&collector.addr.to_string()).await.unwrap();
    proxy.cut();
    let run_id = unique_name("o");
    let (link, database, tenant, target) = (&proxy, &db, acct.tenant_id, &collector);
    let run = browse(
        &format!("http://{}", proxy.addr()),
        &acct.key.plaintext,
        &run_id,
        |called| async move {
            assert!(
                kinds(&called, "segment").contains("track"),
                "analytics-next completes its calls into its queue: {called:?}"
            );
            // Down long enough for the SDKs' first attempts and retries to fail.
            tokio::time::sleep(Duration::from_secs(4)).await;
            link.restore();
            // Back: the queued calls arrive before the page is hidden.
            let retried: Vec<Call> = called.into_iter().filter(|c| c.sdk != "pixel").collect();
            wait_arrived(database, target, tenant, &retried).await;
        },
    )
    .await;
    let failed = run.report["failed"].as_array().unwrap();
    assert!(
        failed
            .iter()
            .any(|f| f["url"].as_str().unwrap().contains("/v1/")),
        "analytics-next met the outage: {}",
        run.report
    );
    assert!(
        failed
            .iter()
            .any(|f| f["url"].as_str().unwrap().contains("/e/")),
        "posthog-js met the outage: {}",
        run.report
    );
    let calls = calls(&run.report["events"]);
    assert!(
        !kinds(&calls, "pixel").contains("pixel"),
        "the pixel cannot load while the collector is down"
    );
    assert!(run.called.len() < calls.len(), "page hide added calls");
    assert_each_stored_once(&db, &collector, &acct, &calls).await;
    writer.stop().await.unwrap();
    collector.stop().await.unwrap();
}
