//! Test harness for sluice's integration and fault tests: a real Kafka broker and a real
//! PostgreSQL, shared by every test of a run, with a database and topic names of each test's
//! own so tests run in parallel without meeting.
//!
//! `deploy/local/test` starts a fresh stack and names it in `SLUICE_TEST_KAFKA_BROKERS` and
//! `SLUICE_TEST_DATABASE_URL`. A test run without them (`cargo test` alone) starts the same
//! stack itself through `deploy/local/up --infra-only` (profile `test`), once per process.
//!
//! # Layout
//! - [`Stack`]: where the broker and the database are.
//! - [`TestDb`]: a fresh database per test, empty or migrated ([`TestDb::migrated`]),
//!   dropped when the test is done with it.
//! - [`query_scalar`], [`query_column`], [`query_pairs`]: the one value, the first column or
//!   the first two columns of a query.
//! - [`create_topics`], [`unique_name`]: topics of a test's own.
//! - [`bin_path`]: the sluice binaries, for tests that run (and kill) real processes;
//!   [`ServiceLog`]: where such a process writes its log, and its tail for a failure.
//! - [`private`]: Kafka and PostgreSQL instances of a test's own, and a TCP proxy to cut.
//! - [`ingest`]: a collector served in-process ([`ingest::served`] opens most collector
//!   tests: database, account, ready collector), [`ingest::post_json`], reading topics back.
//! - [`writer`]: the writer's topics, message builders, a producer, waiting for rows.
//! - [`abuse`]: the hostile bodies the collector's abuse tests send.
//! - [`deploy`]: what the deploy tests read: YAML of compose and k8s, `--help`, `promtool`.
//! - [`faults`]: a steady load ([`faults::Load::paced`]) recording every message's outcome,
//!   and the reconciliations that end the fault tests.
//! - [`sdk`]: the third-party SDKs the compatibility tests drive.
//! - [`tls`]: certificates made with `openssl` for TLS-only instances.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;

pub mod abuse;
pub mod deploy;
pub mod faults;
pub mod ingest;
pub mod private;
pub mod sdk;
pub mod tls;
pub mod writer;

/// Where the shared broker and database of this test run are.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Kafka bootstrap servers, `host:port`.
    pub kafka_brokers: String,
    /// URL of the cluster's maintenance database; tests make their own databases beside it.
    pub database_url: String,
}

impl Stack {
    /// The stack of this run: named by the environment, or started once per process.
    pub fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| match Self::from_env() {
            Some(stack) => stack,
            None => {
                Self::start().unwrap_or_else(|err| panic!("cannot start the test stack: {err:#}"))
            }
        })
    }

    fn from_env() -> Option<Stack> {
        let kafka_brokers = std::env::var("SLUICE_TEST_KAFKA_BROKERS").ok()?;
        let database_url = std::env::var("SLUICE_TEST_DATABASE_URL").ok()?;
        Some(Stack {
            kafka_brokers,
            database_url,
        })
    }

    fn start() -> Result<Stack> {
        let up = repo_root().join("deploy/local/up");
        let out = Command::new(&up)
            .arg("--infra-only")
            .env("SLUICE_PROFILE", "test")
            .output()
            .with_context(|| format!("running {}", up.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{} failed:\n{stdout}\n{}",
                up.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let value = |name: &str| {
            stdout
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::to_owned)
                .with_context(|| format!("{} printed no {name}", up.display()))
        };
        Ok(Stack {
            kafka_brokers: value("SLUICE_KAFKA_BROKERS=")?,
            database_url: value("SLUICE_DATABASE_URL=")?,
        })
    }
}

/// The repository's top folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A name no other test of any run uses: `{prefix}_{random hex}`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// The log file of a service a test runs as a process, in the temporary folder: removed when
/// the test is done with it, kept (and named on stderr) when the test panics, so a failure's
/// log can be read in full; a run of the suite no longer leaves a dozen logs behind.
pub struct ServiceLog {
    path: PathBuf,
}

impl ServiceLog {
    /// A log named `{name}.log`; `name` should come from [`unique_name`].
    pub fn new(name: &str) -> ServiceLog {
        ServiceLog {
            path: std::env::temp_dir().join(format!("{name}.log")),
        }
    }

    /// Where the service writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything written so far (empty if nothing was).
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }

    /// The last `lines` lines, to print beside a failure.
    pub fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServiceLog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("service log kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A database of one test's own, created empty on the shared cluster and dropped with it
/// (`DROP DATABASE ... WITH (FORCE)`, so connections a test left open do not keep it), so a
/// run does not leave hundreds of databases behind on the shared cluster.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// Its URL, for services and pools under test.
    pub url: String,
    /// The cluster's maintenance URL to drop it through; `None` for a database the test does
    /// not own ([`TestDb::existing`]).
    admin_url: Option<String>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin) = self.admin_url.take() else {
            return;
        };
        let name = self.name.clone();
        // Drop cannot await, and may run on a runtime's worker: a thread of its own with a
        // small runtime of its own does the round trip.
        let dropped = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = connect(&admin).await?;
                // The name is ours (`unique_name`), never input.
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                Ok(())
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("cannot drop test database {}: {err:#}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

impl TestDb {
    /// Creates a fresh, empty database.
    pub async fn new() -> Result<TestDb> {
        let stack = Stack::get();
        let admin = connect(&stack.database_url).await?;
        let name = unique_name("t");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = with_database(&stack.database_url, &name)?;
        Ok(TestDb {
            name,
            url,
            admin_url: Some(stack.database_url.clone()),
        })
    }

    /// A database the test does not own (a private cluster's `sluice`): used like a created
    /// one, never dropped.
    pub fn existing(name: &str, url: &str) -> TestDb {
        TestDb {
            name: name.to_owned(),
            url: url.to_owned(),
            admin_url: None,
        }
    }

    /// Creates a fresh database with every migration applied (no event month partitions:
    /// tests create the months they need with `sluice_schema::partitions`).
    pub async fn migrated() -> Result<TestDb> {
        let db = TestDb::new().await?;
        let mut client = db.client().await?;
        sluice_schema::migrate::up(&mut client)
            .await
            .with_context(|| format!("migrating test database {}", db.name))?;
        Ok(db)
    }

    /// A new connection to this database.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

/// Connects to PostgreSQL through the services' own connector (TLS parameters of the URL
/// apply), driving the connection on a background task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    Ok(sluice_schema::db::connect(url).await?)
}

/// The one value of `sql` (no parameters): a count or a flag, the way most tests read what a
/// run left behind.
pub async fn query_scalar<T>(client: &tokio_postgres::Client, sql: &str) -> Result<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    Ok(client.query_one(sql, &[]).await?.try_get(0)?)
}

/// The first column of every row of `sql` (no parameters), in the query's order.
pub async fn query_column<T>(client: &tokio_postgres::Client, sql: &str) -> Result<Vec<T>>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
}

/// The first two columns of every row of `sql` with `params`, in the query's order.
pub async fn query_pairs<A, B>(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<(A, B)>>
where
    A: for<'a> tokio_postgres::types::FromSql<'a>,
    B: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows = client.query(sql, params).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?)
}

/// `url` with its database path replaced by `name`.
fn with_database(url: &str, name: &str) -> Result<String> {
    let (base, rest) = url
        .rsplit_once('/')
        .context("database URL has no /database")?;
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    Ok(format!("{base}/{name}{query}"))
}

/// A Kafka client configuration pointing at the test broker.
pub fn kafka_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &Stack::get().kafka_brokers);
    config
}

/// Creates topics (one replica, `partitions` each) and waits until they exist; a topic that
/// exists already is fine.
pub async fn create_topics(names: &[&str], partitions: i32) -> Result<()> {
    create_topics_on(&Stack::get().kafka_brokers, names, partitions).await
}

/// [`create_topics`] on `brokers` (a private broker of a test that stops it). A broker
/// started moments ago can time out its first admin request while its controller settles
/// (CI, 2026-12-02): asked up to three times; what an earlier attempt made exists already.
pub async fn create_topics_on(brokers: &str, names: &[&str], partitions: i32) -> Result<()> {
    let mut config = kafka_config();
    config.set("bootstrap.servers", brokers);
    let mut attempt = 1;
    loop {
        let created = sluice_schema::topics::create_missing(
            &config,
            names,
            partitions,
            1,
            Duration::from_secs(30),
        )
        .await;
        match created {
            Err(err) if attempt < 3 => eprintln!("creating topics (attempt {attempt}): {err}"),
            other => return Ok(other?),
        }
        attempt += 1;
    }
}

/// Path of a sluice binary (`sluice-writer`, ...) built beside the running test executable.
/// `deploy/local/test` builds them before the tests run.
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>: the binaries sit in target/<profile>.
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target folder")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} is not built: run `cargo build --bins` (deploy/local/test does)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_swapped_in_urls() {
        assert_eq!(
            with_database("postgres://u@h:1/sluice", "t_1").unwrap(),
            "postgres://u@h:1/t_1"
        );
        assert_eq!(
            with_database("postgres://u@h:1/sluice?sslmode=disable", "x").unwrap(),
            "postgres://u@h:1/x?sslmode=disable"
        );
    }
}
