//! Local observability works end to end: the real `sluice-ingest` and `sluice-writer` binaries
//! run as processes, `deploy/local/prometheus start` runs Debian's Prometheus against their
//! metrics ports with sluice's rules, and its HTTP API shows `sluice_writer_rows_total` rising
//! exactly with a short load sent through the collector, the rules loaded and quiet, the
//! dashboard's queries valid and its traffic panels showing the load, and every histogram the
//! dashboard draws exported with buckets.
//!
//! Needs the binaries built (`cargo build --bins`) and `prometheus` installed (Debian's
//! package, installed by `deploy/local/lib.sh` install_prereqs); without it the test fails.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_tests::ingest::account;
use sluice_tests::private::free_port;
use sluice_tests::writer::WriterEnv;
use sluice_tests::{bin_path, repo_root, unique_name, Stack};
use tokio::process::{Child, Command};

/// A sluice binary running as a child process, killed when dropped.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(binary: &str, env: &[(&str, String)], state: &std::path::Path) -> Service {
        let log = state.join(format!("{binary}.log"));
        let file = std::fs::File::create(&log).expect("creating a log file");
        let mut cmd = Command::new(bin_path(binary).expect("binary not built"));
        for (name, _) in std::env::vars() {
            if name.starts_with("SLUICE_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file.try_clone().expect("log file"))
            .kill_on_drop(true);
        Service {
            child: cmd.spawn().expect("starting a sluice binary"),
            log,
        }
    }

    /// Waits until `url` answers 200, or fails with the end of the service's log.
    async fn wait_ready(&mut self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = reqwest::get(url).await {
                if resp.status() == 200 {
                    return;
                }
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!("{url} not ready (exit: {exited:?}); log:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `deploy/local/prometheus` with a state folder and ports of this test's own.
struct LocalPrometheus {
    env: Vec<(&'static str, String)>,
    url: String,
}

impl LocalPrometheus {
    fn script(env: &[(&'static str, String)], arg: &str) -> std::process::Output {
        std::process::Command::new(repo_root().join("deploy/local/prometheus"))
            .arg(arg)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("running deploy/local/prometheus")
    }

    fn start(env: Vec<(&'static str, String)>) -> LocalPrometheus {
        let out = Self::script(&env, "start");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "deploy/local/prometheus start failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = stdout
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("PROMETHEUS_URL="))
            .unwrap_or_else(|| panic!("no PROMETHEUS_URL= last line in:\n{stdout}"))
            .to_owned();
        LocalPrometheus { env, url }
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    async fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let resp: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()
            .await
            .expect("querying Prometheus")
            .json()
            .await
            .expect("Prometheus answered no JSON");
        assert_eq!(resp["status"], "success", "query {query}: {resp}");
        resp["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|sample| {
                let value = sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (sample["metric"].clone(), value)
            })
            .collect()
    }

    /// The single value of `query`, or None while it has no sample.
    async fn value(&self, query: &str) -> Option<f64> {
        self.query(query).await.first().map(|(_, v)| *v)
    }

    /// Polls `query` until its value is `want`; fails with the last value seen.
    async fn wait_for(&self, query: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(query).await;
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("Prometheus: `{query}` is {last:?}, not {want} after 90 s");
    }
}

impl Drop for LocalPrometheus {
    fn drop(&mut self) {
        let out = Self::script(&self.env, "stop");
        if !out.status.success() {
            eprintln!(
                "deploy/local/prometheus stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Sends `requests` batches of `per_request` track events through the collector.
async fn load(api: &str, key: &str, run: &str, requests: usize, per_request: usize) {
    let http = reqwest::Client::new();
    for r in 0..requests {
        let batch: Vec<Value> = (0..per_request)
            .map(|i| {
                json!({
                    "type": "track",
                    "event": "Prometheus Checked",
                    "anonymousId": format!("{run}-{r}-{i}"),
                    "messageId": uuid::Uuid::new_v4().to_string(),
                    "properties": {"wave": run},
                })
            })
            .collect();
        let resp = http
            .post(format!("{api}/v1/batch"))
            .basic_auth(key, Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .await
            .expect("posting a batch");
        assert_eq!(
            resp.status(),
            200,
            "{}",
            resp.text().await.unwrap_or_default()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_prometheus_sees_rows_rising_with_the_load() {
    assert!(
        std::process::Command::new("prometheus")
            .arg("--version")
            .output()
            .is_ok(),
        "`prometheus` is not installed: apt-get install prometheus (deploy/local/lib.sh \
         install_prereqs does)"
    );
    let env = WriterEnv::new(3).await.unwrap();
    let account = account(&env.db, "prometheus").await.unwrap();
    let state = std::env::temp_dir().join(unique_name("sluice_prom"));
    std::fs::create_dir_all(&state).unwrap();
    let (api_port, ingest_metrics, writer_metrics, prom_port) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let stack = Stack::get();
    let common = [
        ("SLUICE_KAFKA_BROKERS", stack.kafka_brokers.clone()),
        ("SLUICE_DATABASE_URL", env.db.url.clone()),
        ("SLUICE_TOPIC_PREFIX", env.prefix.clone()),
    ];
    let mut ingest = Service::spawn(
        "sluice-ingest",
        &[
            &common[..],
            &[
                ("SLUICE_INGEST_LISTEN", format!("127.0.0.1:{api_port}")),
                (
                    "SLUICE_METRICS_LISTEN",
                    format!("127.0.0.1:{ingest_metrics}"),
                ),
            ],
        ]
        .concat(),
        &state,
    );
    let mut writer = Service::spawn(
        "sluice-writer",
        &[
            &common[..],
            &[
                ("SLUICE_WRITER_GROUP", env.group.clone()),
                (
                    "SLUICE_METRICS_LISTEN",
                    format!("127.0.0.1:{writer_metrics}"),
                ),
            ],
        ]
        .concat(),
        &state,
    );
    ingest
        .wait_ready(&format!("http://127.0.0.1:{ingest_metrics}/readyz"))
        .await;
    writer
        .wait_ready(&format!("http://127.0.0.1:{writer_metrics}/readyz"))
        .await;

    let prom = LocalPrometheus::start(vec![
        ("SLUICE_PROFILE", "test".into()),
        ("SLUICE_STATE", state.to_string_lossy().into_owned()),
        ("SLUICE_INGEST_METRICS_PORT", ingest_metrics.to_string()),
        ("SLUICE_WRITER_METRICS_PORT", writer_metrics.to_string()),
        ("SLUICE_PROMETHEUS_PORT", prom_port.to_string()),
    ]);
    // Both services are scraped, under the job names the rules and the dashboard use.
    prom.wait_for(r#"sum(up{job=~"sluice-ingest|sluice-writer"})"#, 2.0)
        .await;

    let api = format!("http://127.0.0.1:{api_port}");
    let key = &account.key.plaintext;
    let rows = r#"sum(sluice_writer_rows_total{table="event"})"#;
    load(&api, key, "wave1", 10, 20).await;
    prom.wait_for(rows, 200.0).await;
    load(&api, key, "wave2", 10, 20).await;
    prom.wait_for(rows, 400.0).await;
    let ok = r#"sum(sluice_ingest_requests_total{job="sluice-ingest",status="200"})"#;
    prom.wait_for(ok, 20.0).await;
    let accepted = r#"sum(sluice_ingest_events_total{outcome="accepted"})"#;
    prom.wait_for(accepted, 400.0).await;
    let stored = env
        .db
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM event", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(stored, 400, "Prometheus and the database disagree");

    // The rules are loaded, and on a healthy pipeline none fires.
    let rules: Value = reqwest::get(format!("{}/api/v1/rules", prom.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .map(|groups| {
            groups
                .iter()
                .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    assert!(loaded >= 10, "Prometheus loaded {loaded} rules: {rules}");
    let firing = prom.query(r#"ALERTS{alertstate="firing"}"#).await;
    assert!(
        firing.is_empty(),
        "alerts fire on a healthy pipeline: {firing:?}"
    );

    // Every query of the dashboard is valid PromQL for this Prometheus, and the panels of the
    // traffic just sent show it.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/grafana/dashboards/sluice.json"))
            .unwrap(),
    )
    .unwrap();
    // rate() needs two scrapes of a series inside its window, so a panel may take one scrape
    // interval (5 s) after the load to show it: poll.
    let must_show = [
        "Requests/s by endpoint and status",
        "Events/s by type and outcome",
        "Rows/s by table",
        "Consumer lag per partition",
        "Accepted events/s",
        "Rows stored/s",
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut empty = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "1m");
                // query() fails the test on a query Prometheus refuses (invalid PromQL).
                if prom.query(&expr).await.is_empty() {
                    empty.push(panel["title"].as_str().unwrap_or("?").to_owned());
                }
            }
        }
        let blank: Vec<&str> = must_show
            .iter()
            .copied()
            .filter(|shown| empty.iter().any(|title| title == shown))
            .collect();
        if blank.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard panels {blank:?} show no data 60 s after the load (all empty: {empty:?})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Every histogram the dashboard and rules draw quantiles from is exported with buckets
    // (a summary would have no `_bucket` series, and its quantiles cannot be aggregated).
    let mut missing = Vec::new();
    for histogram in [
        "sluice_ingest_request_duration_seconds",
        "sluice_ingest_kafka_produce_duration_seconds",
        "sluice_writer_batch_rows",
        "sluice_writer_copy_duration_seconds",
    ] {
        if prom
            .value(&format!("count({histogram}_bucket)"))
            .await
            .is_none()
        {
            missing.push(histogram);
        }
    }
    assert!(
        missing.is_empty(),
        "exported without `_bucket` series (a summary, not a histogram): {missing:?}; the \
         service must set buckets for them (PrometheusBuilder::set_buckets_for_metric)"
    );

    // Passed: nothing of the state folder (logs, Prometheus data) is worth keeping.
    drop(prom);
    drop((ingest, writer));
    let _ = std::fs::remove_dir_all(&state);
}
