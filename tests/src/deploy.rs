//! What the deploy tests (`tests/tests/deploy_config.rs`) read: repository files as YAML
//! (merge keys applied), the binaries' `--help` and the variables it documents, the compose
//! services, the Kubernetes manifests with their env resolved through ConfigMaps and Secrets,
//! the Dockerfile's runtime stage, `promtool`, and the metric names of PromQL expressions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

use crate::{bin_path, repo_root};

/// The text of the repository file `rel` (panics when it cannot be read).
pub fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// Every document of a YAML file, with `<<` merge keys applied (YAML 1.2 parsers keep them as
/// plain keys; compose files use them).
pub fn yaml_docs(rel: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(rel))
        .unwrap_or_else(|err| panic!("{rel} is not valid YAML: {err}"))
        .into_iter()
        .map(merge_keys)
        .collect()
}

/// `node` with YAML merge keys (`<<: *anchor`) applied.
pub fn merge_keys(node: Yaml) -> Yaml {
    match node {
        Yaml::Hash(hash) => {
            let merge_key = Yaml::String("<<".into());
            let mut out = yaml_rust2::yaml::Hash::new();
            let mut inherited = Vec::new();
            for (key, value) in hash {
                if key == merge_key {
                    match value {
                        Yaml::Array(items) => inherited.extend(items),
                        other => inherited.push(other),
                    }
                } else {
                    out.insert(key, merge_keys(value));
                }
            }
            for source in inherited {
                if let Yaml::Hash(source) = merge_keys(source) {
                    for (key, value) in source {
                        if !out.contains_key(&key) {
                            out.insert(key, value);
                        }
                    }
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(merge_keys).collect()),
        other => other,
    }
}

/// A scalar as text (YAML may type `8080` or `"8080"` or `true`).
pub fn scalar(node: &Yaml) -> Option<String> {
    match node {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The items of a YAML sequence; none for anything else.
pub fn items(node: &Yaml) -> &[Yaml] {
    node.as_vec().map(Vec::as_slice).unwrap_or(&[])
}

/// The port of a listen address such as `0.0.0.0:8080` or `[::]:8080`.
pub fn listen_port(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("listen address {addr:?} has no port"))
}

/// `--help` of a sluice binary (after `args`: a subcommand path and its flags), run without any `SLUICE_*`
/// variable of this process so clap prints the names only.
pub fn help(binary: &str, args: &[String]) -> String {
    let path = bin_path(binary).unwrap_or_else(|err| panic!("{err:#}"));
    let mut cmd = Command::new(&path);
    cmd.args(args).arg("--help");
    for (name, _) in std::env::vars() {
        if name.starts_with("SLUICE_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|err| panic!("running {}: {err}", path.display()));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{binary} {} --help` failed ({}): the deploy files run a command the binary does not \
         have.\nstdout: {text}\nstderr: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Whether a help text documents the environment variable `name` (clap: `[env: NAME]`, or
/// `[env: NAME=value]` when it is set).
pub fn documents_env(help: &str, name: &str) -> bool {
    help.contains(&format!("[env: {name}]")) || help.contains(&format!("[env: {name}="))
}

/// The variables among `names` that `command` (binary, then its arguments) does not accept:
/// neither the binary's top-level help nor the help of the full command names them. Asking
/// for help after the full argument list also makes clap reject an unknown subcommand or flag.
pub fn unaccepted(command: &[String], names: &BTreeSet<String>) -> Vec<String> {
    let (binary, args) = command.split_first().expect("an empty command");
    let mut helps = vec![help(binary, &[])];
    if !args.is_empty() {
        helps.push(help(binary, args));
    }
    names
        .iter()
        .filter(|name| name.starts_with("SLUICE_"))
        .filter(|name| !helps.iter().any(|h| documents_env(h, name)))
        .map(|name| format!("{binary}: {name}"))
        .collect()
}

// ---- compose -----------------------------------------------------------------------------

/// The compose file, relative to the repository.
pub const COMPOSE: &str = "deploy/compose/docker-compose.yml";

/// The compose file, parsed.
pub fn compose() -> Yaml {
    yaml_docs(COMPOSE).remove(0)
}

/// The compose services that run a sluice image, by name.
pub fn compose_sluice_services(file: &Yaml) -> Vec<(String, &Yaml)> {
    let services = file["services"]
        .as_hash()
        .expect("compose file has no services");
    services
        .iter()
        .filter(|(_, svc)| {
            svc["image"]
                .as_str()
                .is_some_and(|image| image.starts_with("sluice"))
        })
        .map(|(name, svc)| (scalar(name).unwrap_or_default(), svc))
        .collect()
}

/// A compose service's `environment`, as name and value.
pub fn compose_env(svc: &Yaml) -> BTreeMap<String, String> {
    svc["environment"]
        .as_hash()
        .map(|env| {
            env.iter()
                .filter_map(|(k, v)| Some((scalar(k)?, scalar(v).unwrap_or_default())))
                .collect()
        })
        .unwrap_or_default()
}

/// A compose service's command: its entrypoint and arguments.
pub fn compose_command(svc: &Yaml) -> Vec<String> {
    items(&svc["command"]).iter().filter_map(scalar).collect()
}

/// Container ports a compose service publishes (`ports`, last part) or exposes (`expose`).
pub fn compose_ports(svc: &Yaml) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let published = items(&svc["ports"])
        .iter()
        .filter_map(scalar)
        .filter_map(|p| p.rsplit(':').next().and_then(|c| c.parse().ok()))
        .collect();
    let exposed = items(&svc["expose"])
        .iter()
        .filter_map(scalar)
        .filter_map(|p| p.parse().ok())
        .collect();
    (published, exposed)
}

/// Runs the Go checker in `dir` (`go run . ARG` there) and returns its stdout; without Go the
/// test fails (a check that passes because it could not run proves nothing). The first run
/// fetches the checker's modules through the Go module proxy and builds it (about a minute);
/// later runs take a fraction of a second.
pub fn go_run(dir: &str, arg: &str) -> String {
    let out = match Command::new("go")
        .args(["run", ".", arg])
        .current_dir(repo_root().join(dir))
        .output()
    {
        Ok(out) => out,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "Go is not installed, so {dir} cannot check the deploy files against the official \
             schemas: install Go at least as new as {dir}/go.mod says (Debian 12's golang-go is \
             too old; deploy/local/lib.sh install_prereqs says so)"
        ),
        Err(err) => panic!("running go in {dir}: {err}"),
    };
    assert!(
        out.status.success(),
        "{dir} rejected the deploy files:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- kubernetes --------------------------------------------------------------------------

/// The documents of `deploy/k8s/*.yaml`, each with the file it came from.
pub struct Manifests {
    /// (file relative to the repository, document).
    pub docs: Vec<(String, Yaml)>,
}

impl Manifests {
    /// Reads every manifest of `deploy/k8s`.
    pub fn load() -> Manifests {
        let dir = repo_root().join("deploy/k8s");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("deploy/k8s")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for path in files {
            let rel = path
                .strip_prefix(repo_root())
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            for doc in yaml_docs(&rel) {
                if !doc.is_null() {
                    docs.push((rel.clone(), doc));
                }
            }
        }
        Manifests { docs }
    }

    /// The documents of `kind`.
    pub fn of_kind(&self, kind: &str) -> Vec<&Yaml> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    }

    /// The document of `kind` named `name`.
    pub fn named(&self, kind: &str, name: &str) -> Option<&Yaml> {
        self.of_kind(kind)
            .into_iter()
            .find(|d| d["metadata"]["name"].as_str() == Some(name))
    }

    /// The value a container's env entry resolves to, through ConfigMaps and Secrets.
    pub fn env_value(&self, entry: &Yaml) -> Option<String> {
        if let Some(value) = scalar(&entry["value"]) {
            return Some(value);
        }
        let from = &entry["valueFrom"];
        for (kind, key, data) in [
            ("ConfigMap", "configMapKeyRef", "data"),
            ("Secret", "secretKeyRef", "stringData"),
        ] {
            let reference = &from[key];
            if let (Some(name), Some(k)) = (reference["name"].as_str(), reference["key"].as_str()) {
                return self.named(kind, name).and_then(|obj| scalar(&obj[data][k]));
            }
        }
        None
    }
}

/// A workload's pod spec: Deployments and Jobs keep it at `spec.template.spec`, CronJobs one
/// level deeper.
pub fn pod_spec(workload: &Yaml) -> &Yaml {
    if workload["kind"].as_str() == Some("CronJob") {
        &workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &workload["spec"]["template"]["spec"]
    }
}

/// A container's env entries, each resolved through ConfigMaps and Secrets.
pub fn container_env(m: &Manifests, container: &Yaml) -> BTreeMap<String, Option<String>> {
    items(&container["env"])
        .iter()
        .filter_map(|e| Some((scalar(&e["name"])?, m.env_value(e))))
        .collect()
}

/// A container's named ports.
pub fn container_ports(container: &Yaml) -> BTreeMap<String, i64> {
    items(&container["ports"])
        .iter()
        .filter_map(|p| Some((scalar(&p["name"])?, p["containerPort"].as_i64()?)))
        .collect()
}

/// A probe's or Service's port (a number, or a container port's name) as a number.
pub fn resolve_port(port: &Yaml, ports: &BTreeMap<String, i64>) -> Option<i64> {
    port.as_i64()
        .or_else(|| port.as_str().and_then(|n| ports.get(n).copied()))
}

/// The numeric user the Dockerfile's runtime stage runs as.
pub fn dockerfile_uid() -> i64 {
    read("Dockerfile")
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .and_then(|u| u.split(':').next())
        .and_then(|u| u.trim().parse().ok())
        .expect("the Dockerfile sets no numeric USER")
}

/// Debian packages of the runtime stage: its `apt-get install` list, plus libc6 and libgcc-s1,
/// which every Debian image has.
pub fn runtime_packages() -> BTreeSet<String> {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile
        .split_once("AS runtime")
        .expect("the Dockerfile has no `AS runtime` stage")
        .1;
    let mut packages: BTreeSet<String> = ["libc6", "libgcc-s1"].map(str::to_owned).into();
    if let Some((_, rest)) = runtime.split_once("--no-install-recommends") {
        packages.extend(
            rest.split_whitespace()
                .take_while(|w| *w != "\\" && *w != "&&")
                .map(str::to_owned),
        );
    }
    packages
}

// ---- prometheus and grafana --------------------------------------------------------------

/// Runs promtool and fails unless it succeeds (a missing promtool fails too).
pub fn promtool(args: &[&str]) {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
    {
        Ok(out) => out,
        Err(err) => panic!(
            "cannot run `promtool {}`: {err}; install Debian's `prometheus` package \
             (deploy/local/lib.sh install_prereqs does)",
            args.join(" ")
        ),
    };
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `sluice_*` metric names a PromQL expression uses, without histogram suffixes.
pub fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("sluice_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            found.insert(base.to_owned());
        }
        i = end;
    }
    found
}

/// The metrics the services declare (`metrics::ALL` of each): all they can export, since
/// every metric is emitted through its declaration.
pub fn metrics_defined() -> BTreeSet<String> {
    sluice_ingest::metrics::ALL
        .iter()
        .chain(sluice_writer::metrics::ALL)
        .map(|m| m.name.to_owned())
        .collect()
}

/// The fixed metric names of docs/architecture.md §7.1: the dashboard shows each of them.
pub const CONTRACT_METRICS: [&str; 9] = [
    "sluice_ingest_requests_total",
    "sluice_ingest_events_total",
    "sluice_ingest_request_duration_seconds",
    "sluice_ingest_kafka_produce_duration_seconds",
    "sluice_writer_rows_total",
    "sluice_writer_batch_rows",
    "sluice_writer_copy_duration_seconds",
    "sluice_writer_consumer_lag",
    "sluice_writer_dlq_total",
];

/// The PromQL of every panel target of the Grafana dashboard (each bound to the
/// `${datasource}` variable, or this fails).
pub fn dashboard_exprs() -> Vec<String> {
    let text = read("deploy/grafana/dashboards/sluice.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is not JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("dashboard has no panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(
                target["expr"]
                    .as_str()
                    .expect("target without expr")
                    .to_owned(),
            );
            assert_eq!(
                target["datasource"]["uid"].as_str(),
                Some("${datasource}"),
                "panel {:?} is bound to one data source",
                panel["title"]
            );
        }
    }
    exprs
}
