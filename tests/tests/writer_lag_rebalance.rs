//! Lag gauges tell the truth after a rebalance. Two real `sluice-writer` processes share a
//! consumer group; the second joins while the first is working through a backlog, so
//! partitions whose lag the first had exported move to the second. Once the backlog is
//! stored, every `sluice_writer_consumer_lag` series either writer exports is 0 (the one that
//! lost a partition zeroed it), and the alert rules (deploy/prometheus/rules) and the KEDA
//! query (deploy/k8s/writer.yaml), evaluated by promtool on series made from those scrapes,
//! agree: no "not storing" page, no "lag growing" warning, nothing for KEDA to scale on. The
//! same series with one revoked partition's stale value put back (what a writer exported
//! before the fix) do page, so the promtool check is not one that cannot fail.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use rdkafka::producer::FutureRecord;
use sluice_schema::topics::message_key;
use sluice_tests::private::free_port;
use sluice_tests::writer::{event, event_rows, visitor, wait_for_count, writer_command, WriterEnv};
use sluice_tests::{repo_root, unique_name, ServiceLog};
use yaml_rust2::YamlLoader;

const BACKLOG: usize = 40_000;

/// `(topic, partition) -> lag` of one writer's `/metrics`, and its `sluice_writer_rows_total`
/// lines as they are.
struct Scrape {
    lag: BTreeMap<(String, String), f64>,
    rows: Vec<(String, f64)>,
}

async fn scrape(port: u16) -> Result<Scrape> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await?
        .text()
        .await?;
    let mut lag = BTreeMap::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = match value.parse() {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let Some(labels) = series.strip_prefix("sluice_writer_consumer_lag{") {
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map(|v| v.trim_end_matches(['"', '}']).to_owned())
            };
            let (Some(topic), Some(partition)) = (label("topic"), label("partition")) else {
                bail!("a lag series without topic and partition: {line}");
            };
            lag.insert((topic, partition), value);
        } else if let Some(labels) = series.strip_prefix("sluice_writer_rows_total") {
            rows.push((labels.to_owned(), value));
        }
    }
    Ok(Scrape { lag, rows })
}

/// A promtool test file over `scrapes` (one per writer, as `instance`), each value held for
/// 40 minutes, with the given alert and expression checks.
fn promtool_file(rules: &str, scrapes: &[(&str, &Scrape)], checks: &str) -> String {
    let mut series = String::new();
    for (instance, s) in scrapes {
        for ((topic, partition), value) in &s.lag {
            series.push_str(&format!(
                "      - series: 'sluice_writer_consumer_lag{{namespace=\"sluice\",instance=\"{instance}\",topic=\"{topic}\",partition=\"{partition}\"}}'\n        values: '{value}x40'\n"
            ));
        }
        for (labels, value) in &s.rows {
            let labels = labels.trim_start_matches('{').trim_end_matches('}');
            series.push_str(&format!(
                "      - series: 'sluice_writer_rows_total{{namespace=\"sluice\",instance=\"{instance}\",{labels}}}'\n        values: '{value}x40'\n"
            ));
        }
    }
    format!(
        "rule_files:\n  - {rules}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}{checks}"
    )
}

/// Runs `promtool test rules` on `file`; Ok(()) when every check held, else its output.
fn promtool_test(file: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("{}.yml", unique_name("lag_rules")));
    std::fs::write(&path, file).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&path)
        .output()
        .map_err(|e| {
            format!("cannot run promtool ({e}): apt-get install prometheus (deploy/local/lib.sh install_prereqs does)")
        });
    let _ = std::fs::remove_file(&path);
    let out = out?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The KEDA trigger's Prometheus query in deploy/k8s/writer.yaml.
fn keda_query() -> String {
    let text = std::fs::read_to_string(repo_root().join("deploy/k8s/writer.yaml"))
        .expect("deploy/k8s/writer.yaml");
    let docs = YamlLoader::load_from_str(&text).expect("writer.yaml is YAML");
    docs.iter()
        .find(|d| d["kind"].as_str() == Some("ScaledObject"))
        .and_then(|d| d["spec"]["triggers"][0]["metadata"]["query"].as_str())
        .expect("writer.yaml has a ScaledObject with a Prometheus query")
        .to_owned()
}

/// Waits until `port`'s scrape satisfies `done`, returning it; fails after `within` with the
/// last scrape's lag.
async fn scrape_until(
    port: u16,
    within: Duration,
    done: impl Fn(&Scrape) -> bool,
) -> Result<Scrape> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(s) = scrape(port).await {
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("writer on :{port} after {within:?}: lag {:?}", s.lag);
            }
        } else if Instant::now() > deadline {
            bail!("writer on :{port} not scrapeable within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_lag_series_agree_after_a_rebalance() -> Result<()> {
    let env = WriterEnv::new(4).await?;
    let now = Utc::now();
    let events: Vec<_> = (0..BACKLOG)
        .map(|i| {
            event(
                1 + (i % 5) as i64,
                &format!("a{}", i % 997),
                &format!("m{i}"),
                now,
            )
        })
        .collect();
    env.produce_events(&events).await?;
    // A visitor message per event too: half the group's partitions carry a backlog, so some
    // that move surely had a non-zero lag.
    for chunk in events.chunks(2000) {
        let sends = chunk.iter().map(|e| {
            let anon = e.anonymous_id.clone().unwrap_or_default();
            let v = visitor(e.tenant_id, &anon, now, now, 1, "lag");
            let key = message_key(e.tenant_id, Some(&anon), None);
            let payload = serde_json::to_vec(&v);
            let (producer, topic) = (env.producer.clone(), env.topics.visitor.clone());
            async move {
                let payload = payload?;
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&payload),
                        Duration::from_secs(60),
                    )
                    .await
                    .map_err(|(err, _)| anyhow::anyhow!("producing: {err}"))?;
                anyhow::Ok(())
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }

    let log = ServiceLog::new(&unique_name("lag_rebalance"));
    let (port_a, port_b) = (free_port()?, free_port()?);
    let spawn = |port: u16| -> Result<tokio::process::Child> {
        let mut cmd = writer_command(
            &env.db.url,
            &env.brokers,
            &env.prefix,
            &env.group,
            log.path(),
        )?;
        // Small batches on one lane: the backlog lasts long enough for a lag export and a join.
        cmd.env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("SLUICE_WRITER_BATCH_MAX_ROWS", "100")
            .env("SLUICE_WRITER_LANES", "1");
        cmd.spawn().context("spawning sluice-writer")
    };
    let mut a = spawn(port_a)?;
    // A has exported a non-zero lag for some partitions: the values that must not go stale.
    let before = scrape_until(port_a, Duration::from_secs(60), |s| {
        s.lag.values().filter(|v| **v > 0.0).count() >= 2
    })
    .await?;
    let mut b = spawn(port_b)?;
    let client = env.db.client().await?;
    // B takes over some partitions while A is still behind.
    let joined = scrape_until(port_b, Duration::from_secs(60), |s| !s.lag.is_empty()).await?;
    let stored_at_join = event_rows(&client).await?;
    assert!(
        stored_at_join < BACKLOG as i64,
        "the backlog was stored before the second writer joined ({stored_at_join} rows): no rebalance mid-backlog"
    );
    wait_for_count(
        &client,
        "SELECT count(*) FROM event",
        BACKLOG as i64,
        Duration::from_secs(180),
    )
    .await?;
    wait_for_count(
        &client,
        "SELECT coalesce(sum(event_count), 0)::bigint FROM visitor",
        BACKLOG as i64,
        Duration::from_secs(180),
    )
    .await?;
    // Lag is exported every 5 s: within a few passes every series of both writers is 0.
    let all_zero = |s: &Scrape| !s.lag.is_empty() && s.lag.values().all(|v| *v == 0.0);
    let final_a = scrape_until(port_a, Duration::from_secs(30), all_zero).await;
    let final_b = scrape_until(port_b, Duration::from_secs(30), all_zero).await;
    let _ = (a.kill().await, b.kill().await);
    let (final_a, final_b) = (final_a?, final_b?);
    // Partitions that moved: exported by both writers, non-zero on A before B joined.
    let moved: Vec<&(String, String)> = final_a
        .lag
        .keys()
        .filter(|tp| final_b.lag.contains_key(*tp))
        .collect();
    assert!(
        !moved.is_empty(),
        "no partition moved from A to B (A {:?}, B {:?} at the join)",
        final_a.lag.keys(),
        joined.lag.keys()
    );
    let stale = moved
        .iter()
        .find(|tp| before.lag.get(**tp).is_some_and(|v| *v > 0.0))
        .map(|tp| ((*tp).clone(), before.lag[*tp]));

    // The rules and the KEDA query on those scrapes: all quiet, nothing to scale on.
    let rules = repo_root().join("deploy/prometheus/rules/sluice.rules.yml");
    let rules = rules.to_str().context("rules path")?;
    let keda = keda_query();
    let quiet = format!(
        "    alert_rule_test:\n\
         \x20     - {{eval_time: 30m, alertname: SluiceWriterNotStoring, exp_alerts: []}}\n\
         \x20     - {{eval_time: 30m, alertname: SluiceConsumerLagGrowing, exp_alerts: []}}\n\
         \x20   promql_expr_test:\n\
         \x20     - expr: '{keda}'\n\
         \x20       eval_time: 30m\n\
         \x20       exp_samples: [{{labels: '{{}}', value: 0}}]\n\
         \x20     - expr: 'sum(max by (topic, partition) (sluice_writer_consumer_lag))'\n\
         \x20       eval_time: 30m\n\
         \x20       exp_samples: [{{labels: '{{}}', value: 0}}]\n"
    );
    let file = promtool_file(rules, &[("a", &final_a), ("b", &final_b)], &quiet);
    if let Err(out) = promtool_test(&file) {
        panic!("the rules or the KEDA query disagree with the scrapes:\n{out}\n{file}");
    }

    // Control: A's revoked partition with its pre-rebalance value, as before the fix. The
    // same checks must fail (a page and a non-zero KEDA figure), or they prove nothing.
    if let Some(((topic, partition), value)) = stale {
        let mut stale_a = Scrape {
            lag: final_a.lag.clone(),
            rows: final_a.rows.clone(),
        };
        stale_a
            .lag
            .insert((topic.clone(), partition.clone()), value);
        let file = promtool_file(rules, &[("a", &stale_a), ("b", &final_b)], &quiet);
        let failed = promtool_test(&file).expect_err("a stale lag series passed the quiet checks");
        assert!(
            failed.contains("SluiceWriterNotStoring"),
            "the stale series should page SluiceWriterNotStoring:\n{failed}"
        );
    } else {
        panic!(
            "no moved partition had a non-zero lag on A before the join (A before: {:?}); the test needs one",
            before.lag
        );
    }
    Ok(())
}
