//! The deploy files agree with the programs they deploy. No container engine runs where sluice
//! is built, so `deploy/compose`, `deploy/k8s`, `deploy/prometheus` and `deploy/grafana` are
//! checked here instead of by running them:
//! - every `SLUICE_*` variable the compose file or a manifest sets is one the binary it starts
//!   really accepts (its `--help` lists `[env: NAME]`), and every command exists;
//! - ports, probes, Services, selectors, autoscalers and grace periods fit together;
//! - Prometheus configs and rules pass `promtool check`, and the rules' unit tests pass;
//! - the rules and the dashboard only query metrics the services' sources define.
//!
//! The binaries must be built first (`cargo build --bins`; `deploy/local/test` does).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use sluice_tests::deploy::*;
use sluice_tests::{bin_path, repo_root};
use yaml_rust2::Yaml;

// ---- compose -----------------------------------------------------------------------------

#[test]
fn compose_sets_only_variables_the_binaries_accept() {
    let file = compose();
    let services = compose_sluice_services(&file);
    let names: BTreeSet<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in ["migrate", "ingest", "writer"] {
        assert!(names.contains(wanted), "compose has no `{wanted}` service");
    }
    let mut problems = Vec::new();
    for (name, svc) in &services {
        let command = compose_command(svc);
        assert!(
            !command.is_empty(),
            "compose service {name} names no command"
        );
        let env: BTreeSet<String> = compose_env(svc).into_keys().collect();
        problems.extend(
            unaccepted(&command, &env)
                .into_iter()
                .map(|p| format!("compose {name}: {p}")),
        );
    }
    assert!(
        problems.is_empty(),
        "variables set in {COMPOSE} that the binaries do not accept:\n{}",
        problems.join("\n")
    );
}

#[test]
fn compose_ports_and_scrape_targets_match_the_services() {
    let file = compose();
    let svc = |name: &str| &file["services"][name];

    let ingest = compose_env(svc("ingest"));
    let (published, exposed) = compose_ports(svc("ingest"));
    let api = listen_port(&ingest["SLUICE_INGEST_LISTEN"]);
    let ingest_metrics = listen_port(&ingest["SLUICE_METRICS_LISTEN"]);
    assert!(
        published.contains(&api),
        "ingest listens on {api} but publishes {published:?}"
    );
    assert!(
        published.contains(&ingest_metrics) || exposed.contains(&ingest_metrics),
        "ingest metrics port {ingest_metrics} is neither published nor exposed"
    );
    for (name, env) in [("ingest", &ingest), ("writer", &compose_env(svc("writer")))] {
        for var in ["SLUICE_INGEST_LISTEN", "SLUICE_METRICS_LISTEN"] {
            if let Some(addr) = env.get(var) {
                assert!(
                    !addr.starts_with("127.") && !addr.starts_with("localhost"),
                    "compose {name}: {var}={addr} is loopback, unreachable from other containers"
                );
            }
        }
    }

    let writer = compose_env(svc("writer"));
    let (writer_published, writer_exposed) = compose_ports(svc("writer"));
    let writer_metrics = listen_port(&writer["SLUICE_METRICS_LISTEN"]);
    assert!(
        writer_published.is_empty(),
        "the writer publishes host ports {writer_published:?}: `--scale writer=N` would collide"
    );
    assert!(
        writer_exposed.contains(&writer_metrics),
        "writer metrics port {writer_metrics} is not exposed"
    );
    for var in ["SLUICE_PII_ACTIVE_KEY", "SLUICE_WRITER_GROUP"] {
        assert!(writer.contains_key(var), "compose writer sets no {var}");
    }
    // The keys come from a compose secret (a file under /run/secrets/), or the variable.
    let pii_keys = match writer.get("SLUICE_PII_KEYS_FILE") {
        Some(path) => {
            let name = path
                .strip_prefix("/run/secrets/")
                .unwrap_or_else(|| panic!("SLUICE_PII_KEYS_FILE={path} is not a compose secret"));
            assert!(
                items(&svc("writer")["secrets"])
                    .iter()
                    .filter_map(scalar)
                    .any(|s| s == name),
                "compose writer does not mount the secret {name}"
            );
            let source = scalar(&file["secrets"][name]["file"])
                .unwrap_or_else(|| panic!("compose defines no secret {name} with a file"));
            read(&format!("deploy/compose/{source}"))
        }
        None => writer
            .get("SLUICE_PII_KEYS")
            .cloned()
            .expect("compose writer sets neither SLUICE_PII_KEYS nor SLUICE_PII_KEYS_FILE"),
    };
    let active = &writer["SLUICE_PII_ACTIVE_KEY"];
    assert!(
        pii_keys
            .split(',')
            .any(|entry| entry.trim().starts_with(&format!("{active}="))),
        "the active PII key {active} is not among the writer's PII keys"
    );

    // Prometheus finds each service by its compose name, on its metrics port.
    let prom = yaml_docs("deploy/prometheus/prometheus.compose.yml").remove(0);
    let mut scraped = BTreeMap::new();
    for job in items(&prom["scrape_configs"]) {
        for sd in items(&job["dns_sd_configs"]) {
            for name in items(&sd["names"]).iter().filter_map(scalar) {
                let port = sd["port"].as_i64().expect("dns_sd_configs without port");
                scraped.insert(name, (scalar(&job["job_name"]).unwrap_or_default(), port));
            }
        }
    }
    assert_eq!(
        scraped.get("ingest"),
        Some(&("sluice-ingest".to_owned(), i64::from(ingest_metrics))),
        "Prometheus (compose) scrapes the collector elsewhere"
    );
    assert_eq!(
        scraped.get("writer"),
        Some(&("sluice-writer".to_owned(), i64::from(writer_metrics))),
        "Prometheus (compose) scrapes the writer elsewhere"
    );

    // Every file the compose file mounts is in the repository.
    let base = repo_root().join("deploy/compose");
    for (name, svc) in file["services"].as_hash().expect("services") {
        for volume in items(&svc["volumes"]).iter().filter_map(scalar) {
            let source = volume.split(':').next().unwrap_or_default();
            if source.starts_with('.') {
                assert!(
                    base.join(source).exists(),
                    "compose {}: mounts {source}, which does not exist",
                    scalar(name).unwrap_or_default()
                );
            }
        }
    }
}

#[test]
fn compose_file_passes_the_compose_loader_and_reads_the_same_here() {
    // compose-go validates against the Compose specification and applies anchors and merge
    // keys as `docker compose` does; what it resolves must be what the tests above checked.
    let resolved = go_run("deploy/compose/schemacheck", "../docker-compose.yml");
    let resolved: serde_json::Value =
        serde_json::from_str(&resolved).expect("schemacheck printed no JSON");
    let file = compose();
    for (name, svc) in compose_sluice_services(&file) {
        let official = &resolved[name.as_str()];
        let command: Vec<String> = official["command"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_owned))
            .collect();
        assert_eq!(command, compose_command(svc), "compose {name}: command");
        let env: BTreeMap<String, String> = official["environment"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        assert_eq!(env, compose_env(svc), "compose {name}: environment");
    }
}

// ---- kubernetes --------------------------------------------------------------------------

#[test]
fn k8s_sets_only_variables_the_binaries_accept() {
    let m = Manifests::load();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for kind in ["Deployment", "Job", "CronJob"] {
        for workload in m.of_kind(kind) {
            let name = workload["metadata"]["name"].as_str().unwrap_or("?");
            for container in items(&pod_spec(workload)["containers"]) {
                let command: Vec<String> = items(&container["command"])
                    .iter()
                    .filter_map(scalar)
                    .collect();
                assert!(
                    !command.is_empty(),
                    "{kind} {name} names no command: the image's default would run"
                );
                seen.insert(command[0].clone());
                let env = container_env(&m, container);
                for (var, value) in &env {
                    if value.is_none() {
                        problems.push(format!(
                            "{kind} {name}: {var} refers to a ConfigMap/Secret key that no \
                             manifest defines"
                        ));
                    }
                }
                assert!(
                    items(&container["envFrom"]).is_empty(),
                    "{kind} {name}: envFrom hides which variables a service gets; name them"
                );
                let names = env.into_keys().collect();
                problems.extend(
                    unaccepted(&command, &names)
                        .into_iter()
                        .map(|p| format!("{kind} {name}: {p}")),
                );
            }
        }
    }
    for binary in ["sluice-ingest", "sluice-writer", "sluice-schema"] {
        assert!(seen.contains(binary), "no manifest runs {binary}");
    }
    assert!(
        problems.is_empty(),
        "deploy/k8s sets variables the binaries do not accept:\n{}",
        problems.join("\n")
    );
}

#[test]
fn k8s_ports_probes_selectors_and_grace_periods_fit_together() {
    let m = Manifests::load();
    let mut deployments = BTreeMap::new();
    for d in m.of_kind("Deployment") {
        let name = scalar(&d["metadata"]["name"]).expect("Deployment without name");
        let labels = d["spec"]["template"]["metadata"]["labels"].clone();
        let selector = d["spec"]["selector"]["matchLabels"]
            .as_hash()
            .expect("Deployment without matchLabels");
        for (k, v) in selector {
            assert_eq!(
                &labels[k.as_str().unwrap_or_default()],
                v,
                "Deployment {name}: its selector does not select its own pods"
            );
        }
        deployments.insert(name, d);
    }
    for wanted in ["sluice-ingest", "sluice-writer"] {
        assert!(deployments.contains_key(wanted), "no Deployment {wanted}");
    }
    let selects = |selector: &Yaml, pod_labels: &Yaml| {
        selector.as_hash().is_some_and(|s| {
            !s.is_empty()
                && s.iter()
                    .all(|(k, v)| &pod_labels[k.as_str().unwrap_or_default()] == v)
        })
    };

    let mut topic_partitions = None;
    for (name, d) in &deployments {
        let pod = pod_spec(d);
        let container = &items(&pod["containers"])[0];
        let env = container_env(&m, container);
        let ports = container_ports(container);
        let var = |n: &str| env.get(n).cloned().flatten();

        // The metrics port is the one the binary listens on, and the probes ask it.
        let metrics = var("SLUICE_METRICS_LISTEN")
            .unwrap_or_else(|| panic!("Deployment {name} sets no SLUICE_METRICS_LISTEN"));
        assert_eq!(
            ports.get("metrics"),
            Some(&i64::from(listen_port(&metrics))),
            "Deployment {name}: container port `metrics` differs from SLUICE_METRICS_LISTEN"
        );
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(
                get["path"].as_str(),
                Some(path),
                "Deployment {name}: {probe} path"
            );
            assert_eq!(
                resolve_port(&get["port"], &ports),
                Some(i64::from(listen_port(&metrics))),
                "Deployment {name}: {probe} asks another port than the metrics listener"
            );
        }
        if let Some(listen) = var("SLUICE_INGEST_LISTEN") {
            assert_eq!(
                ports.get("http"),
                Some(&i64::from(listen_port(&listen))),
                "Deployment {name}: container port `http` differs from SLUICE_INGEST_LISTEN"
            );
        }
        if let Some(partitions) = var("SLUICE_TOPIC_PARTITIONS") {
            topic_partitions = Some(partitions.parse::<i64>().expect("SLUICE_TOPIC_PARTITIONS"));
        }

        // Grace period: the preStop pause plus the drain must end before SIGKILL.
        let grace = pod["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or_else(|| panic!("Deployment {name} sets no terminationGracePeriodSeconds"));
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_i64()
            .unwrap_or(0);
        let drain = var("SLUICE_DRAIN_TIMEOUT_MS")
            .map(|ms| ms.parse::<i64>().expect("SLUICE_DRAIN_TIMEOUT_MS") / 1000)
            .unwrap_or(0);
        assert!(
            grace > pre_stop + drain,
            "Deployment {name}: grace {grace}s does not cover preStop {pre_stop}s + drain {drain}s"
        );
        assert!(
            container["resources"]["requests"]["cpu"].as_str().is_some()
                || container["resources"]["requests"]["cpu"].as_i64().is_some(),
            "Deployment {name}: no CPU request (the HPA's utilisation needs one)"
        );
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "Deployment {name} may run as root"
        );
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_i64(),
            Some(dockerfile_uid()),
            "Deployment {name}: runAsUser differs from the Dockerfile's USER"
        );

        // Exactly one PodDisruptionBudget guards it.
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let pdbs = m
            .of_kind("PodDisruptionBudget")
            .into_iter()
            .filter(|p| selects(&p["spec"]["selector"]["matchLabels"], labels))
            .count();
        assert_eq!(
            pdbs, 1,
            "Deployment {name}: {pdbs} PodDisruptionBudgets select it"
        );
    }

    // Services select pods that have the ports they forward to.
    for svc in m.of_kind("Service") {
        let name = svc["metadata"]["name"].as_str().unwrap_or("?");
        let target = deployments
            .values()
            .find(|d| {
                selects(
                    &svc["spec"]["selector"],
                    &d["spec"]["template"]["metadata"]["labels"],
                )
            })
            .unwrap_or_else(|| panic!("Service {name} selects no Deployment's pods"));
        let ports = container_ports(&items(&pod_spec(target)["containers"])[0]);
        for port in items(&svc["spec"]["ports"]) {
            assert!(
                resolve_port(&port["targetPort"], &ports).is_some(),
                "Service {name}: targetPort {:?} is no port of its pods",
                port["targetPort"]
            );
        }
    }

    // Autoscalers scale Deployments that exist; writers never outnumber partitions.
    let hpa = m
        .named("HorizontalPodAutoscaler", "sluice-ingest")
        .expect("ingest HPA");
    assert!(deployments.contains_key(
        hpa["spec"]["scaleTargetRef"]["name"]
            .as_str()
            .unwrap_or_default()
    ));
    let scaled = m
        .named("ScaledObject", "sluice-writer")
        .expect("writer ScaledObject");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("sluice-writer")
    );
    let max = scaled["spec"]["maxReplicaCount"]
        .as_i64()
        .expect("maxReplicaCount");
    let partitions = topic_partitions.expect("no Deployment sets SLUICE_TOPIC_PARTITIONS");
    assert!(
        max <= partitions,
        "up to {max} writers for {partitions} partitions: the extra ones would sit idle"
    );
    let query =
        scalar(&items(&scaled["spec"]["triggers"])[0]["metadata"]["query"]).unwrap_or_default();
    assert!(
        query.contains("sluice_writer_consumer_lag"),
        "the writer scales on something else than its lag: {query}"
    );

    // NetworkPolicies open ports the pods have, and let the Prometheus that the writer's
    // autoscaler queries reach the metrics ports.
    let server = scalar(&items(&scaled["spec"]["triggers"])[0]["metadata"]["serverAddress"])
        .unwrap_or_default();
    let monitoring_ns = server
        .split('.')
        .nth(1)
        .expect("the autoscaler's Prometheus address has no namespace")
        .to_owned();
    for name in ["sluice-ingest", "sluice-writer"] {
        let d = deployments[name];
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let ports = container_ports(&items(&pod_spec(d)["containers"])[0]);
        let policies: Vec<&Yaml> = m
            .of_kind("NetworkPolicy")
            .into_iter()
            .filter(|p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
            .collect();
        assert!(!policies.is_empty(), "no NetworkPolicy selects {name}");
        let mut metrics_from = BTreeSet::new();
        for rule in policies.iter().flat_map(|p| items(&p["spec"]["ingress"])) {
            for port in items(&rule["ports"]) {
                let number = resolve_port(&port["port"], &ports).unwrap_or_else(|| {
                    panic!(
                        "NetworkPolicy of {name} opens {:?}, no port of its pods",
                        port["port"]
                    )
                });
                if Some(&number) == ports.get("metrics") {
                    for from in items(&rule["from"]) {
                        if let Some(ns) = scalar(
                            &from["namespaceSelector"]["matchLabels"]
                                ["kubernetes.io/metadata.name"],
                        ) {
                            metrics_from.insert(ns);
                        }
                    }
                }
            }
        }
        assert!(
            metrics_from.contains(&monitoring_ns),
            "{name}: metrics open to {metrics_from:?}, not to {monitoring_ns} where Prometheus runs"
        );
    }

    // Pruning never drops a month the writer would still fill: the months kept (all but the
    // current one are whole, of at least 28 days) outlast the writer's retention.
    let prune = m
        .of_kind("CronJob")
        .into_iter()
        .flat_map(|c| items(&pod_spec(c)["containers"]))
        .map(|c| {
            items(&c["command"])
                .iter()
                .filter_map(scalar)
                .collect::<Vec<_>>()
        })
        .find(|cmd| cmd.iter().any(|a| a == "prune"))
        .expect("no CronJob prunes partitions");
    let keep_months: i64 = prune
        .iter()
        .skip_while(|a| *a != "--keep-months")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("prune without --keep-months N");
    let writer = &items(&pod_spec(deployments["sluice-writer"])["containers"])[0];
    let retention_days: i64 = container_env(&m, writer)
        .get("SLUICE_WRITER_RETENTION_DAYS")
        .cloned()
        .flatten()
        .expect("the writer sets no SLUICE_WRITER_RETENTION_DAYS")
        .parse()
        .expect("SLUICE_WRITER_RETENTION_DAYS");
    assert!(
        (keep_months - 1) * 28 >= retention_days,
        "prune keeps {keep_months} months, less than the writer's {retention_days} days"
    );

    // kustomization.yaml lists every manifest, so `kubectl apply -k` misses none.
    let kustomization = yaml_docs("deploy/k8s/kustomization.yaml").remove(0);
    let listed: BTreeSet<String> = items(&kustomization["resources"])
        .iter()
        .filter_map(scalar)
        .collect();
    let present: BTreeSet<String> = m
        .docs
        .iter()
        .filter_map(|(file, _)| {
            Path::new(file)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .filter(|f| f != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml resources differ from the manifests in deploy/k8s"
    );
}

#[test]
fn k8s_manifests_decode_strictly_into_the_api_types() {
    // The Kubernetes API's own Go types, strict: unknown fields and wrong types are errors.
    go_run("deploy/k8s/schemacheck", "..");
}

#[test]
fn dockerfile_builds_every_binary_of_the_workspace() {
    let dockerfile = read("Dockerfile");
    for krate in ["schema", "ingest", "writer", "loadtest"] {
        let manifest = read(&format!("{krate}/Cargo.toml"));
        let bins: Vec<&str> = manifest
            .split("[[bin]]")
            .skip(1)
            .filter_map(|section| {
                section
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("name = "))
                    .map(|n| n.trim_matches('"'))
            })
            .collect();
        assert!(!bins.is_empty(), "{krate}/Cargo.toml declares no binary");
        for bin in bins {
            assert!(
                dockerfile.contains(&format!("target/release/{bin}")),
                "the Dockerfile does not ship {bin}"
            );
        }
    }
    assert!(dockerfile_uid() != 0, "the runtime image runs as root");
}

#[test]
fn runtime_image_has_every_shared_library_the_binaries_link() {
    let packages = runtime_packages();
    let mut missing = Vec::new();
    for binary in [
        "sluice-ingest",
        "sluice-writer",
        "sluice-schema",
        "sluice-loadtest",
    ] {
        let path = bin_path(binary).unwrap_or_else(|err| panic!("{err:#}"));
        let out = match Command::new("ldd").arg(&path).output() {
            Ok(out) => out,
            Err(err) => panic!(
                "running ldd (Debian's libc-bin, on every Debian system): {err}; the runtime \
                 image's libraries cannot be checked without it"
            ),
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)", or the loader alone.
            let Some(file) = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_owned)
            else {
                continue;
            };
            // With merged /usr, ldd names /lib/... while the package lists /usr/lib/...
            let canonical = std::fs::canonicalize(&file)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| file.clone());
            let owner = [&file, &canonical].into_iter().find_map(|path| {
                Command::new("dpkg")
                    .args(["-S", path])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            });
            let Some(owner) = owner else {
                missing.push(format!("{binary}: {file} (no Debian package owns it)"));
                continue;
            };
            // "zlib1g:amd64: /lib/x86_64-linux-gnu/libz.so.1"
            let package = owner
                .split(':')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            if !packages.contains(&package) {
                missing.push(format!("{binary}: {file} from package {package}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the runtime image lacks libraries the binaries link; add the packages to the \
         Dockerfile's runtime `apt-get install`:\n{}",
        missing.join("\n")
    );
}

// ---- prometheus and grafana --------------------------------------------------------------

#[test]
fn prometheus_configs_and_rules_pass_promtool() {
    for config in [
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/prometheus.compose.yml",
    ] {
        promtool(&["check", "config", config]);
    }
    promtool(&["check", "rules", "deploy/prometheus/rules/sluice.rules.yml"]);
    // Each alert fires on the failure it names and stays quiet on a healthy pipeline.
    promtool(&[
        "test",
        "rules",
        "deploy/prometheus/tests/sluice.rules.test.yml",
    ]);
}

#[test]
fn k8s_prometheus_rule_is_the_rules_file() {
    let m = Manifests::load();
    let rule = m
        .named("PrometheusRule", "sluice")
        .expect("deploy/k8s has no PrometheusRule sluice");
    let rules = yaml_docs("deploy/prometheus/rules/sluice.rules.yml").remove(0);
    assert!(
        !items(&rules["groups"]).is_empty(),
        "the rules file has no groups"
    );
    assert!(
        rule["spec"]["groups"] == rules["groups"],
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules/sluice.rules.yml: \
         copy the rules file's groups into it"
    );
}

#[test]
fn dashboard_shows_every_contract_metric() {
    let used: BTreeSet<String> = dashboard_exprs()
        .iter()
        .flat_map(|e| metrics_in(e))
        .collect();
    for metric in CONTRACT_METRICS {
        assert!(
            used.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
    let provisioned = yaml_docs("deploy/grafana/provisioning/datasources/prometheus.yml").remove(0);
    assert_eq!(
        provisioned["datasources"][0]["type"].as_str(),
        Some("prometheus")
    );
}

#[test]
fn rules_and_dashboard_query_only_metrics_the_services_define() {
    let defined = metrics_defined();
    let rules = yaml_docs("deploy/prometheus/rules/sluice.rules.yml").remove(0);
    let mut queried = BTreeMap::new();
    for group in items(&rules["groups"]) {
        for rule in items(&group["rules"]) {
            let name = scalar(&rule["alert"])
                .or_else(|| scalar(&rule["record"]))
                .unwrap_or_default();
            for metric in metrics_in(rule["expr"].as_str().unwrap_or_default()) {
                queried.insert(metric, format!("rule {name}"));
            }
        }
    }
    for expr in dashboard_exprs() {
        for metric in metrics_in(&expr) {
            queried
                .entry(metric)
                .or_insert_with(|| "the dashboard".to_owned());
        }
    }
    let missing: Vec<String> = queried
        .iter()
        .filter(|(metric, _)| !defined.contains(*metric))
        .map(|(metric, user)| format!("{metric} (used by {user})"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics queried but declared in neither ingest nor writer `metrics::ALL`:\n{}",
        missing.join("\n")
    );
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metrics_in("sum(rate(sluice_writer_rows_total[5m])) / x_sluice_no + histogram_quantile(0.9, sluice_writer_batch_rows_bucket)"),
        BTreeSet::from(["sluice_writer_rows_total".to_owned(), "sluice_writer_batch_rows".to_owned()])
    );
}
