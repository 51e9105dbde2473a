//! Production connectivity, with the real binaries: a TLS-only PostgreSQL (`ssl=on`,
//! `hostssl`-only pg_hba, SCRAM passwords) reached with `sslmode=verify-full`, and a Kafka
//! broker whose client listener is SASL_SSL (PEM keystore; PLAIN, SCRAM-SHA-256 and
//! SCRAM-SHA-512 users). Certificates are made by the test with `openssl`.
//!
//! Every secret goes in through a file or a variable (`SLUICE_DATABASE_URL_FILE`,
//! `SLUICE_KAFKA_PROPERTIES_FILE`, `SLUICE_KAFKA_PROPERTIES`, `SLUICE_PII_KEYS_FILE`), and
//! the captured stdout and stderr of every run are searched for each of them at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::json;
use sluice_tests::private::{free_port, PrivateKafka, PrivatePostgres};
use sluice_tests::tls::Certs;
use sluice_tests::writer::wait_for_count;
use sluice_tests::{bin_path, query_scalar, unique_name};

const PG_PASSWORD: &str = "pg-Pass-8e1f0c";
const WRONG_PG_PASSWORD: &str = "pg-Wrong-55d2a1";
const PLAIN_PASSWORD: &str = "plain-Pass-0b7c44";
const SCRAM256_PASSWORD: &str = "scram256-Pass-91ad3e";
const SCRAM512_PASSWORD: &str = "scram512-Pass-4c6e2b";
const WRONG_SASL_PASSWORD: &str = "sasl-Wrong-7d30f9";
const EMAIL: &str = "tls.secret.person@example.com";

/// `postgres://sluice:PASSWORD@localhost:PORT/sluice?sslmode=...&sslrootcert=CA`.
fn pg_url(pg: &PrivatePostgres, password: &str, mode: &str, ca: &Path) -> String {
    format!(
        "postgres://sluice:{password}@localhost:{}/sluice?sslmode={mode}&sslrootcert={}",
        pg.port(),
        ca.display()
    )
}

/// A file of the test's own (in the certificates' folder, deleted with it).
fn write_file(certs: &Certs, name: &str, text: &str) -> Result<PathBuf> {
    let path = certs.path(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Runs a sluice binary to its end; (success, stdout, stderr).
async fn run(bin: &str, args: &[&str], env: &[(&str, String)]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(bin_path(bin)?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "info")
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A service binary running with its stdout and stderr in one log file; killed on drop.
struct Service {
    child: tokio::process::Child,
    log: PathBuf,
    metrics: u16,
}

impl Service {
    fn start(bin: &str, env: &[(&str, String)], log: PathBuf) -> Result<Service> {
        let metrics = free_port()?;
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin_path(bin)?)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("SLUICE_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
            .env("RUST_LOG", "info")
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        Ok(Service {
            child,
            log,
            metrics,
        })
    }

    /// `/readyz`: (status, body).
    async fn readyz(&self) -> Result<(u16, String)> {
        let res = reqwest::get(format!("http://127.0.0.1:{}/readyz", self.metrics)).await?;
        Ok((res.status().as_u16(), res.text().await?))
    }

    /// Waits until `/readyz` answers `status` with a body holding `needle`; the last body
    /// and the log tail on failure.
    async fn wait_readyz(&self, status: u16, needle: &str, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok((got, body)) = self.readyz().await {
                if got == status && body.contains(needle) {
                    return Ok(body);
                }
                last = format!("{got} {body}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "/readyz never answered {status} with {needle:?}; last: {last}\nlog:\n{}",
            self.text()
        )
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it (SIGTERM, as Kubernetes would) and returns everything it printed.
    async fn stop(mut self) -> Result<String> {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            self.child.start_kill()?;
            self.child.wait().await?;
        }
        Ok(self.text())
    }
}

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} printed a secret ({secret}):\n{text}"
        );
    }
}

/// One `error:` line and nothing else on stderr: no backtrace, no "Caused by" block.
fn assert_one_error_line(stderr: &str, wanted: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(wanted), "wanted {wanted:?} in:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_postgres_takes_verify_full_and_refuses_an_unknown_ca_plain_tcp_and_a_wrong_password_in_one_line(
) -> Result<()> {
    let certs = Certs::make()?;
    let pg = PrivatePostgres::start_tls(&certs, PG_PASSWORD).await?;
    let ca = certs.path("ca.crt");
    let url_file = write_file(
        &certs,
        "database-url",
        &format!("{}\n", pg_url(&pg, PG_PASSWORD, "verify-full", &ca)),
    )?;
    let secrets = [PG_PASSWORD, WRONG_PG_PASSWORD];

    let (ok, stdout, stderr) = run(
        "sluice-schema",
        &["migrate", "up"],
        &[("SLUICE_DATABASE_URL_FILE", url_file.display().to_string())],
    )
    .await?;
    assert!(
        ok,
        "migrate through verify-full failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("applied 0001"), "{stdout}");
    assert_no_secret(
        "sluice-schema migrate",
        &format!("{stdout}{stderr}"),
        &secrets,
    );

    // verify-ca checks the chain only; sslmode=require without sslrootcert encrypts only.
    for mode in ["verify-ca", "require"] {
        let url = pg_url(&pg, PG_PASSWORD, mode, &ca);
        let url = if mode == "require" {
            url.split("&sslrootcert").next().unwrap_or(&url).to_owned()
        } else {
            url
        };
        let (ok, stdout, stderr) = run(
            "sluice-schema",
            &["migrate", "status"],
            &[("SLUICE_DATABASE_URL", url)],
        )
        .await?;
        assert!(ok, "sslmode={mode}: {stdout}\n{stderr}");
    }

    let other_ca = certs.path("other-ca.crt");
    let cases = [
        (
            pg_url(&pg, PG_PASSWORD, "verify-full", &other_ca),
            "not signed by a CA in sslrootcert",
        ),
        (
            pg_url(&pg, WRONG_PG_PASSWORD, "verify-full", &ca),
            "check the user and password in SLUICE_DATABASE_URL",
        ),
        (
            format!(
                "postgres://sluice:{PG_PASSWORD}@127.0.0.1:{}/sluice?sslmode=disable",
                pg.port()
            ),
            "accepts only encrypted connections",
        ),
    ];
    for (url, wanted) in cases {
        let (ok, stdout, stderr) = run(
            "sluice-schema",
            &["migrate", "status"],
            &[("SLUICE_DATABASE_URL", url)],
        )
        .await?;
        assert!(!ok, "{wanted}: it connected:\n{stdout}");
        eprintln!("refused as expected: {}", stderr.trim());
        assert_one_error_line(&stderr, wanted);
        assert!(
            stderr.contains("sluice:***@"),
            "the URL is shown redacted: {stderr}"
        );
        assert_no_secret("sluice-schema", &format!("{stdout}{stderr}"), &secrets);
    }

    // A client certificate (sslcert + sslkey) is what database sluice_certauth takes.
    let admin = sluice_schema::db::connect(&pg_url(&pg, PG_PASSWORD, "verify-full", &ca)).await?;
    admin
        .batch_execute("CREATE DATABASE sluice_certauth")
        .await?;
    let cert_url = format!(
        "postgres://sluice@localhost:{}/sluice_certauth?sslmode=verify-full&sslrootcert={}",
        pg.port(),
        ca.display()
    );
    let with_cert = format!(
        "{cert_url}&sslcert={}&sslkey={}",
        certs.path("client.crt").display(),
        certs.path("client.key").display()
    );
    let client = sluice_schema::db::connect(&with_cert).await?;
    let user: String = query_scalar(&client, "SELECT current_user::text").await?;
    assert_eq!(user, "sluice");
    let err = sluice_schema::db::connect(&cert_url)
        .await
        .err()
        .context("connected without a client certificate")?
        .to_string();
    assert!(err.contains("give sslcert and sslkey"), "{err}");

    // --help shows no value of a secret variable.
    let env = [
        (
            "SLUICE_DATABASE_URL",
            pg_url(&pg, PG_PASSWORD, "verify-full", &ca),
        ),
        (
            "SLUICE_KAFKA_PROPERTIES",
            format!("sasl.password={WRONG_PG_PASSWORD}"),
        ),
        ("SLUICE_PII_KEYS", format!("k1={WRONG_PG_PASSWORD}")),
    ];
    for bin in ["sluice-writer", "sluice-ingest", "sluice-schema"] {
        let (ok, stdout, stderr) = run(bin, &["--help"], &env).await?;
        assert!(
            ok && stdout.contains("SLUICE_DATABASE_URL"),
            "{bin}: {stderr}"
        );
        assert_no_secret(bin, &format!("{stdout}{stderr}"), &secrets);
    }
    // A property the writer's guarantees rest on is refused at start-up, in one line.
    let (ok, _, stderr) = run(
        "sluice-writer",
        &[],
        &[
            ("SLUICE_DATABASE_URL_FILE", url_file.display().to_string()),
            (
                "SLUICE_KAFKA_PROPERTIES",
                format!("sasl.password={PG_PASSWORD},enable.auto.commit=true"),
            ),
        ],
    )
    .await?;
    assert!(!ok);
    assert_one_error_line(&stderr, "enable.auto.commit cannot be set");
    assert_no_secret("sluice-writer", &stderr, &secrets);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_and_writer_store_exact_counts_through_tls_postgres_and_sasl_ssl_kafka_and_report_refused_credentials_and_unknown_cas(
) -> Result<()> {
    let certs = Certs::make()?;
    let pg = PrivatePostgres::start_tls(&certs, PG_PASSWORD).await?;
    let kafka = PrivateKafka::start_sasl_ssl(
        &certs,
        &[("collector", PLAIN_PASSWORD)],
        &[
            ("SCRAM-SHA-256", "writer", SCRAM256_PASSWORD),
            ("SCRAM-SHA-512", "ops", SCRAM512_PASSWORD),
        ],
    )
    .await?;
    let brokers = kafka.sasl_ssl_brokers().context("no SASL_SSL listener")?;
    let ca = certs.path("ca.crt");
    let url = pg_url(&pg, PG_PASSWORD, "verify-full", &ca);
    let url_file = write_file(&certs, "database-url", &url)?;
    let pii_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let pii_file = write_file(&certs, "pii-keys", &format!("k1={pii_key}\n"))?;
    let logs = |name: &str| certs.path(&format!("{name}.log"));

    let (ok, stdout, stderr) = run(
        "sluice-schema",
        &["migrate", "up"],
        &[("SLUICE_DATABASE_URL_FILE", url_file.display().to_string())],
    )
    .await?;
    assert!(ok, "{stdout}\n{stderr}");
    let mut captured = format!("{stdout}{stderr}");
    let db = sluice_schema::db::connect(&url).await?;
    let tenant = sluice_schema::control::create_tenant(&db, "tls").await?;
    let workspace = sluice_schema::control::create_workspace(&db, tenant, "main").await?;
    let key = sluice_schema::control::create_key(&db, workspace, Some("tls")).await?;

    let prefix = format!("{}.", unique_name("tls"));
    let common = |extra: Vec<(&'static str, String)>| {
        let mut env = vec![
            ("SLUICE_DATABASE_URL_FILE", url_file.display().to_string()),
            ("SLUICE_KAFKA_BROKERS", brokers.clone()),
            ("SLUICE_TOPIC_PREFIX", prefix.clone()),
            ("SLUICE_TOPIC_PARTITIONS", "2".to_owned()),
            // The collector seals email and phone with the writer's keys, read from a file.
            ("SLUICE_PII_KEYS_FILE", pii_file.display().to_string()),
            ("SLUICE_PII_ACTIVE_KEY", "k1".to_owned()),
        ];
        env.extend(extra);
        env
    };
    let ca_location = format!("ssl.ca.location={}", ca.display());
    // The collector reads PLAIN credentials from a file, as from a mounted Secret.
    let collector_props = write_file(
        &certs,
        "collector.properties",
        &format!(
            "# Kafka client settings of the collector\nsecurity.protocol=SASL_SSL\n\
             sasl.mechanism=PLAIN\nsasl.username=collector\nsasl.password={PLAIN_PASSWORD}\n{ca_location}\n"
        ),
    )?;
    let ingest_port = free_port()?;
    let collector = Service::start(
        "sluice-ingest",
        &common(vec![
            ("SLUICE_INGEST_LISTEN", format!("127.0.0.1:{ingest_port}")),
            (
                "SLUICE_KAFKA_PROPERTIES_FILE",
                collector_props.display().to_string(),
            ),
            ("SLUICE_READINESS_INTERVAL_MS", "500".to_owned()),
            // The collector seals the identify's email before Kafka (ingest/src/seal.rs).
            ("SLUICE_PII_KEYS_FILE", pii_file.display().to_string()),
            ("SLUICE_PII_ACTIVE_KEY", "k1".to_owned()),
        ]),
        logs("collector"),
    )?;
    // The writer takes SCRAM-SHA-256 from the variable.
    let writer = Service::start(
        "sluice-writer",
        &common(vec![
            (
                "SLUICE_KAFKA_PROPERTIES",
                format!(
                    "security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-256,sasl.username=writer,\
                     sasl.password={SCRAM256_PASSWORD},{ca_location}"
                ),
            ),
            ("SLUICE_WRITER_GROUP", unique_name("g")),
            ("SLUICE_WRITER_FLUSH_INTERVAL_MS", "100".to_owned()),
        ]),
        logs("writer"),
    )?;
    collector
        .wait_readyz(200, "\"ready\":true", Duration::from_secs(90))
        .await?;
    writer
        .wait_readyz(200, "\"ready\":true", Duration::from_secs(90))
        .await?;

    // 500 events in 10 batches, and one identify whose email the collector seals.
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{ingest_port}/v1/batch");
    for b in 0..10 {
        let batch: Vec<_> = (0..50)
            .map(|i| {
                json!({"type": "track", "event": "Tls Checked", "anonymousId": format!("a-{b}-{i}"),
                       "messageId": format!("m-{b}-{i}")})
            })
            .collect();
        let res = http
            .post(&api)
            .basic_auth(&key.plaintext, Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .await?;
        assert_eq!(res.status(), 200, "{}", res.text().await?);
    }
    let res = http
        .post(&api)
        .basic_auth(&key.plaintext, Some(""))
        .json(
            &json!({"batch": [{"type": "identify", "userId": "u-1", "anonymousId": "a-0-0",
                                 "messageId": "id-1", "traits": {"email": EMAIL}}]}),
        )
        .send()
        .await?;
    assert_eq!(res.status(), 200, "{}", res.text().await?);
    wait_for_count(
        &db,
        "SELECT count(*) FROM event",
        500,
        Duration::from_secs(90),
    )
    .await?;
    wait_for_count(&db, "SELECT count(*) FROM lead", 1, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events: i64 = query_scalar(&db, "SELECT count(*) FROM event").await?;
    assert_eq!(events, 500, "exactly the events sent, once each");

    // Mutual TLS (security.protocol=SSL with a client certificate), through the properties
    // parser the services use; without the certificate the broker refuses the handshake.
    let ssl_brokers = kafka.ssl_brokers().context("no SSL listener")?;
    let mtls = |with_cert: bool| -> Result<rdkafka::ClientConfig> {
        let mut items = vec!["security.protocol=SSL".to_owned(), ca_location.clone()];
        if with_cert {
            items.push(format!(
                "ssl.certificate.location={}",
                certs.path("client.crt").display()
            ));
            items.push(format!(
                "ssl.key.location={}",
                certs.path("client.key").display()
            ));
        }
        let props = sluice_schema::kafka::KafkaProperties::load(&items, None)?;
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &ssl_brokers);
        props.apply(&mut config);
        Ok(config)
    };
    let mtls_topic = format!("{prefix}mtls");
    sluice_schema::topics::create_missing(
        &mtls(true)?,
        &[&mtls_topic],
        1,
        1,
        Duration::from_secs(20),
    )
    .await
    .context("creating a topic over mutual TLS")?;
    let refused_mtls = sluice_schema::topics::create_missing(
        &mtls(false)?,
        &[&format!("{prefix}mtls2")],
        1,
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        refused_mtls.is_err(),
        "the broker took a client without a certificate"
    );

    // Refused credentials and an unknown CA: the services stay up, /readyz says what to fix.
    let refused = Service::start(
        "sluice-writer",
        &common(vec![
            (
                "SLUICE_KAFKA_PROPERTIES",
                format!(
                    "security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username=ops,\
                     sasl.password={WRONG_SASL_PASSWORD},{ca_location}"
                ),
            ),
            ("SLUICE_WRITER_GROUP", unique_name("g")),
        ]),
        logs("writer-refused"),
    )?;
    let other_ca = format!("ssl.ca.location={}", certs.path("other-ca.crt").display());
    let unknown_ca = Service::start(
        "sluice-ingest",
        &common(vec![
            (
                "SLUICE_INGEST_LISTEN",
                format!("127.0.0.1:{}", free_port()?),
            ),
            (
                "SLUICE_KAFKA_PROPERTIES",
                format!(
                    "security.protocol=SASL_SSL,sasl.mechanism=PLAIN,sasl.username=collector,\
                     sasl.password={PLAIN_PASSWORD},{other_ca}"
                ),
            ),
            ("SLUICE_READINESS_INTERVAL_MS", "500".to_owned()),
        ]),
        logs("collector-unknown-ca"),
    )?;
    let body = refused
        .wait_readyz(503, "refused the credentials", Duration::from_secs(60))
        .await?;
    assert!(body.contains("sasl.password"), "{body}");
    let body = unknown_ca
        .wait_readyz(503, "ssl.ca.location", Duration::from_secs(60))
        .await?;
    assert!(body.contains("TLS"), "{body}");

    // A wrong database password: the collector's key store says so in /readyz.
    let wrong_pg = write_file(
        &certs,
        "wrong-database-url",
        &pg_url(&pg, WRONG_PG_PASSWORD, "verify-full", &ca),
    )?;
    let mut env = common(vec![
        (
            "SLUICE_INGEST_LISTEN",
            format!("127.0.0.1:{}", free_port()?),
        ),
        (
            "SLUICE_KAFKA_PROPERTIES_FILE",
            collector_props.display().to_string(),
        ),
        ("SLUICE_READINESS_INTERVAL_MS", "500".to_owned()),
    ]);
    env[0].1 = wrong_pg.display().to_string();
    let wrong_password = Service::start("sluice-ingest", &env, logs("collector-wrong-pg"))?;
    wrong_password
        .wait_readyz(
            503,
            "check the user and password in SLUICE_DATABASE_URL",
            Duration::from_secs(60),
        )
        .await?;

    for service in [refused, unknown_ca, wrong_password, collector, writer] {
        captured.push_str(&service.stop().await?);
    }
    assert!(
        captured.contains("sluice:***@localhost"),
        "the services log where they connect, redacted"
    );
    assert!(
        !captured.contains("stack backtrace"),
        "no backtraces:\n{captured}"
    );
    assert_no_secret(
        "the services",
        &captured,
        &[
            PG_PASSWORD,
            WRONG_PG_PASSWORD,
            PLAIN_PASSWORD,
            SCRAM256_PASSWORD,
            SCRAM512_PASSWORD,
            WRONG_SASL_PASSWORD,
            &pii_key,
            &key.plaintext,
            EMAIL,
        ],
    );
    drop(kafka);
    drop(pg);
    drop(certs);
    Ok(())
}
