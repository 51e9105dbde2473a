//! Private instances of the real parts, for fault tests that stop, restart or cut them:
//! the shared stack must never be touched by one test, since every other test runs on it.
//!
//! - [`PrivateKafkaCluster`]: three (or n) KRaft nodes, for replication and broker loss.
//! - [`PrivateKafka`] and [`PrivatePostgres`] run the same scripts as the local stack
//!   (`deploy/local/lib.sh`) with a state folder and ports of their own, and are stopped and
//!   deleted on drop.
//! - [`TcpProxy`] sits between a service and a dependency, so a test can cut the network
//!   (reset every connection, refuse new ones), black-hole it (nothing passes, nothing is
//!   closed) and restore it.
//! - [`PrivateKafka::start_behind_proxy`] makes a broker whose clients stay behind such a
//!   proxy, which a Kafka client otherwise bypasses after its first metadata answer.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{repo_root, unique_name};

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests), taken below Linux's
/// ephemeral range (32768 and up): a broker a test stops and starts again on its port found it
/// taken by some client's outgoing connection meanwhile ("Address already in use"), which
/// port 0 invites, since it hands out ports from that range.
pub fn free_port() -> Result<u16> {
    const PORTS: std::ops::Range<u16> = 20_000..32_768;
    for _ in 0..1_000 {
        let port = rand::random_range(PORTS);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port on 127.0.0.1 in {PORTS:?} after 1,000 tries: stop what holds them")
}

/// A state folder and port settings for `deploy/local/lib.sh`.
struct Private {
    state: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Private {
    fn new(env: Vec<(&'static str, String)>) -> Private {
        let state = std::env::temp_dir().join(unique_name("sluice_private"));
        Private { state, env }
    }

    /// A shell that runs one function of `deploy/local/lib.sh` (`start_kafka`, ...) with this
    /// instance's state folder and ports.
    fn command(&self, function: &str) -> Command {
        let lib = repo_root().join("deploy/local/lib.sh");
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("source '{}' && {function}", lib.display()))
            .env("SLUICE_STATE", &self.state)
            .envs(self.env.iter().map(|(key, value)| (key, value)));
        cmd
    }

    /// Runs a function of `deploy/local/lib.sh` and fails with its output when it fails.
    async fn run(&self, function: &str) -> Result<()> {
        let mut cmd = self.command(function);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .with_context(|| format!("running {function}"))?;
        if !out.status.success() {
            bail!(
                "{function} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Best-effort stop on drop; the folder goes with it.
    fn drop_with(&self, function: &str) {
        let _ = self.command(function).output();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// A Kafka broker of one test's own (KRaft, one node, small heap), which the test may stop
/// and start again on the same port with its data kept.
pub struct PrivateKafka {
    inner: Private,
    port: u16,
    sasl_ssl_port: Option<u16>,
    ssl_port: Option<u16>,
}

impl PrivateKafka {
    /// Formats and starts a fresh broker on free ports.
    pub async fn start() -> Result<PrivateKafka> {
        PrivateKafka::start_with(Vec::new()).await
    }

    /// Formats and starts a fresh broker with a second listener behind a [`TcpProxy`] of its
    /// own: a client given `proxy.addr()` as bootstrap server is told the proxy's address in
    /// every metadata answer, so all of its connections (bootstrap, partition leaders, group
    /// coordinator) pass the proxy, and [`TcpProxy::cut`] cuts that client from Kafka. The
    /// broker itself, and clients given [`PrivateKafka::brokers`], do not pass the proxy.
    pub async fn start_behind_proxy() -> Result<(PrivateKafka, TcpProxy)> {
        let proxied = free_port()?;
        // The proxy first: the broker must advertise its address before anyone connects.
        let proxy = TcpProxy::start(&format!("127.0.0.1:{proxied}")).await?;
        let kafka = PrivateKafka::start_with(vec![
            ("SLUICE_KAFKA_PROXIED_PORT", proxied.to_string()),
            ("SLUICE_KAFKA_PROXIED_ADVERTISED", proxy.addr().to_string()),
        ])
        .await?;
        Ok((kafka, proxy))
    }

    /// Formats and starts a fresh broker with a SASL_SSL listener (TLS from `certs`' PEM
    /// keystore; PLAIN users `plain` and SCRAM users `scram` as (mechanism, name, password)),
    /// reached at [`PrivateKafka::sasl_ssl_brokers`], and an SSL listener that requires
    /// client certificates, at [`PrivateKafka::ssl_brokers`]. [`PrivateKafka::brokers`]
    /// stays plain, for the test's own set-up.
    pub async fn start_sasl_ssl(
        certs: &crate::tls::Certs,
        plain: &[(&str, &str)],
        scram: &[(&str, &str, &str)],
    ) -> Result<PrivateKafka> {
        let sasl_port = free_port()?;
        let ssl_port = free_port()?;
        let plain_users: Vec<String> = plain
            .iter()
            .map(|(name, password)| format!("user_{name}=\"{password}\""))
            .collect();
        let scram_users: Vec<String> = scram
            .iter()
            .map(|(mechanism, name, password)| {
                format!("{mechanism}=[name={name},password={password}]")
            })
            .collect();
        let mut kafka = PrivateKafka::start_with(vec![
            ("SLUICE_KAFKA_SASL_SSL_PORT", sasl_port.to_string()),
            (
                "SLUICE_KAFKA_SSL_KEYSTORE_PEM",
                certs.path("server-keystore.pem").display().to_string(),
            ),
            ("SLUICE_KAFKA_PLAIN_USERS", plain_users.join(" ")),
            ("SLUICE_KAFKA_SCRAM_USERS", scram_users.join(" ")),
            ("SLUICE_KAFKA_SSL_PORT", ssl_port.to_string()),
            (
                "SLUICE_KAFKA_SSL_TRUSTSTORE_PEM",
                certs.path("ca.crt").display().to_string(),
            ),
        ])
        .await?;
        kafka.sasl_ssl_port = Some(sasl_port);
        kafka.ssl_port = Some(ssl_port);
        Ok(kafka)
    }

    /// The mutual-TLS listener's bootstrap server (client certificates signed by the test
    /// CA required), when started by [`PrivateKafka::start_sasl_ssl`].
    pub fn ssl_brokers(&self) -> Option<String> {
        self.ssl_port.map(|port| format!("127.0.0.1:{port}"))
    }

    /// The SASL_SSL listener's bootstrap server, when started with one.
    pub fn sasl_ssl_brokers(&self) -> Option<String> {
        self.sasl_ssl_port.map(|port| format!("127.0.0.1:{port}"))
    }

    async fn start_with(extra: Vec<(&'static str, String)>) -> Result<PrivateKafka> {
        let port = free_port()?;
        let controller = free_port()?;
        let mut env = vec![
            ("SLUICE_KAFKA_PORT", port.to_string()),
            ("SLUICE_KAFKA_CONTROLLER_PORT", controller.to_string()),
            ("SLUICE_KAFKA_HEAP", "256m".to_owned()),
        ];
        env.extend(extra);
        let inner = Private::new(env);
        inner.run("start_kafka").await?;
        Ok(PrivateKafka {
            inner,
            port,
            sasl_ssl_port: None,
            ssl_port: None,
        })
    }

    /// Bootstrap servers, `127.0.0.1:port`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 60 s).
    pub async fn stop(&self) -> Result<()> {
        self.inner.run("stop_kafka").await
    }

    /// Starts the stopped broker again, same port, same data.
    pub async fn start_again(&self) -> Result<()> {
        self.inner.run("start_kafka").await
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.inner.drop_with("stop_kafka");
    }
}

/// A KRaft cluster of one test's own: `n` nodes, each broker and controller, 256 MB heaps,
/// consumer offsets replicated to every node, so that a test can kill brokers under load.
/// Nodes are killed and deleted on drop.
pub struct PrivateKafkaCluster {
    nodes: Vec<Private>,
    ports: Vec<u16>,
}

impl PrivateKafkaCluster {
    /// Formats and starts `n` nodes (at once: a node opens its port only once the controller
    /// quorum, which needs a majority of the nodes, has formed).
    pub async fn start(n: usize) -> Result<PrivateKafkaCluster> {
        let mut ports = Vec::with_capacity(n);
        let mut controllers = Vec::with_capacity(n);
        for _ in 0..n {
            ports.push(free_port()?);
            controllers.push(free_port()?);
        }
        let voters = controllers
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        // A Kafka cluster id: 16 random bytes, base64url without padding.
        let cluster_id = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
        };
        let nodes: Vec<Private> = (0..n)
            .map(|i| {
                Private::new(vec![
                    ("SLUICE_KAFKA_PORT", ports[i].to_string()),
                    ("SLUICE_KAFKA_CONTROLLER_PORT", controllers[i].to_string()),
                    ("SLUICE_KAFKA_HEAP", "256m".to_owned()),
                    ("SLUICE_KAFKA_NODE_ID", (i + 1).to_string()),
                    ("SLUICE_KAFKA_QUORUM_VOTERS", voters.clone()),
                    ("SLUICE_KAFKA_CLUSTER_ID", cluster_id.clone()),
                    ("SLUICE_KAFKA_INTERNAL_REPLICATION", n.to_string()),
                ])
            })
            .collect();
        let cluster = PrivateKafkaCluster { nodes, ports };
        let started =
            futures::future::join_all(cluster.nodes.iter().map(|n| n.run("start_kafka"))).await;
        for result in started {
            result?;
        }
        Ok(cluster)
    }

    /// Bootstrap servers of every node, `127.0.0.1:p1,127.0.0.1:p2,...`.
    pub fn brokers(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Kills node `id` (1-based, Kafka's `node.id`) with SIGKILL.
    pub async fn kill(&self, id: i32) -> Result<()> {
        let node = usize::try_from(id - 1)
            .ok()
            .and_then(|i| self.nodes.get(i))
            .with_context(|| format!("no node {id} in this cluster"))?;
        node.run("kill_kafka").await
    }
}

impl Drop for PrivateKafkaCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.drop_with("kill_kafka");
        }
    }
}

/// A PostgreSQL cluster of one test's own, which the test may stop and start again.
pub struct PrivatePostgres {
    inner: Private,
    port: u16,
}

impl PrivatePostgres {
    /// Creates (initdb) and starts a fresh cluster on a free port, with database `sluice`.
    pub async fn start() -> Result<PrivatePostgres> {
        let port = free_port()?;
        let inner = Private::new(vec![("SLUICE_PG_PORT", port.to_string())]);
        inner.run("start_postgres").await?;
        Ok(PrivatePostgres { inner, port })
    }

    /// Creates and starts a fresh TLS-only cluster: `ssl=on` with `certs`' server
    /// certificate, `hostssl`-only pg_hba with SCRAM, user `sluice` with `password`.
    pub async fn start_tls(certs: &crate::tls::Certs, password: &str) -> Result<PrivatePostgres> {
        let port = free_port()?;
        let inner = Private::new(vec![
            ("SLUICE_PG_PORT", port.to_string()),
            ("SLUICE_PG_SSL_DIR", certs.dir.display().to_string()),
            ("SLUICE_PG_PASSWORD", password.to_owned()),
        ]);
        inner.run("start_postgres").await?;
        Ok(PrivatePostgres { inner, port })
    }

    /// URL of its `sluice` database.
    pub fn url(&self) -> String {
        format!("postgres://sluice@127.0.0.1:{}/sluice", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the cluster (fast shutdown: open sessions are ended).
    pub async fn stop(&self) -> Result<()> {
        self.inner.run("stop_postgres").await
    }

    /// Starts the stopped cluster again with its data.
    pub async fn start_again(&self) -> Result<()> {
        self.inner.run("start_postgres").await
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.inner.drop_with("stop_postgres");
    }
}

/// The state of a [`TcpProxy`]'s link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Bytes pass both ways.
    Up,
    /// Every connection is reset, new ones are reset as soon as accepted: a dependency
    /// behind a firewall that rejects, or a peer that restarted.
    Cut,
    /// Nothing passes and nothing is closed: a partition that drops packets. Held bytes are
    /// delivered if the link comes back, as TCP would once the network heals.
    Blackhole,
}

/// A TCP proxy on 127.0.0.1 in front of `target`, whose link a test can cut, black-hole and
/// restore.
pub struct TcpProxy {
    addr: SocketAddr,
    /// The link's state; every connection task watches it.
    link: Arc<watch::Sender<Link>>,
    /// Connections accepted since the start, so a test can show its client really passed here.
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `target` (`host:port`). The target need not be up yet: each
    /// connection dials it when accepted.
    pub async fn start(target: &str) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, _) = watch::channel(Link::Up);
        let link = Arc::new(link);
        let accepted = Arc::new(AtomicUsize::new(0));
        let target = target.to_owned();
        let task = tokio::spawn({
            let (link, accepted) = (Arc::clone(&link), Arc::clone(&accepted));
            async move {
                loop {
                    let client = match listener.accept().await {
                        Ok((client, _)) => client,
                        Err(_) => {
                            // Out of descriptors, most likely: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    if *link.borrow() == Link::Cut {
                        reset(&client);
                        continue;
                    }
                    tokio::spawn(relay(client, target.clone(), link.subscribe()));
                }
            }
        });
        Ok(TcpProxy {
            addr,
            link,
            accepted,
            task,
        })
    }

    /// The proxy's own address, to give the service under test.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link: resets every connection (held ones too) and resets new ones as soon as
    /// they are accepted, until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.link.send_replace(Link::Cut);
    }

    /// Black-holes the link: open connections stay open but carry nothing, new ones are
    /// accepted and never answered, until [`TcpProxy::restore`] (which delivers what was held)
    /// or [`TcpProxy::cut`].
    pub fn blackhole(&self) {
        self.link.send_replace(Link::Blackhole);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.link.send_replace(Link::Up);
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Cut);
        self.task.abort();
    }
}

/// Closes `stream` with a reset instead of an orderly FIN, as a broken network or a rejecting
/// firewall does: the peer's next read fails instead of seeing a clean end.
fn reset(stream: &TcpStream) {
    // A zero linger does not block on drop (the deprecation is about positive ones): the
    // kernel sends RST at once.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

async fn relay(client: TcpStream, target: String, mut link: watch::Receiver<Link>) {
    // Accepted while black-holed: the client's connection opens but nothing answers on it
    // until the link comes back, as behind a partition.
    let up = link.wait_for(|l| *l != Link::Blackhole).await.map(|l| *l);
    if !matches!(up, Ok(Link::Up)) {
        reset(&client);
        return;
    }
    let Ok(server) = TcpStream::connect(&target).await else {
        reset(&client);
        return;
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let (upstream, downstream) = (link.clone(), link.clone());
    tokio::select! {
        _ = async {
            tokio::join!(
                pump(&mut client_rx, &mut server_tx, upstream),
                pump(&mut server_rx, &mut client_tx, downstream),
            )
        } => {}
        _ = link.wait_for(|l| *l == Link::Cut) => {}
    }
    if *link.borrow() == Link::Cut {
        reset(client_rx.as_ref());
        reset(server_rx.as_ref());
    }
}

/// Copies one direction until its end, its failure or a cut. Bytes read while the link is
/// black-holed are held, not dropped, so a connection that outlives the black hole carries an
/// intact stream; holding them also stops reading, which pushes back on the sender.
async fn pump(from: &mut OwnedReadHalf, to: &mut OwnedWriteHalf, mut link: watch::Receiver<Link>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let passing = link.wait_for(|l| *l != Link::Blackhole).await.map(|l| *l);
        if !matches!(passing, Ok(Link::Up)) || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Pass the end on, so a half-closed connection closes on the other side too.
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 || sock.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo_through(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.write_all(b"ping").await?;
        let mut buf = vec![0u8; 4];
        sock.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn proxy_passes_then_cuts_then_passes_again() {
        let proxy = TcpProxy::start(&echo_server().await.to_string())
            .await
            .unwrap();
        assert_eq!(echo_through(proxy.addr()).await.unwrap(), b"ping");

        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        proxy.cut();
        // The open connection is closed, and a new one gets nothing back.
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), open.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(echo_through(proxy.addr()).await.is_err());

        proxy.restore();
        assert_eq!(echo_through(proxy.addr()).await.unwrap(), b"ping");
    }

    /// Reads what arrives on `sock` within `wait`: `None` when nothing (not even an end) came.
    async fn read_within(sock: &mut TcpStream, wait: std::time::Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, sock.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            Ok(Err(_)) => Some(Vec::new()),
        }
    }

    #[tokio::test]
    async fn a_black_hole_holds_bytes_silently_and_delivers_them_when_restored() {
        let proxy = TcpProxy::start(&echo_server().await.to_string())
            .await
            .unwrap();
        let quiet = std::time::Duration::from_millis(500);
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"one").await.unwrap();
        assert_eq!(read_within(&mut open, quiet).await.unwrap(), b"one");

        proxy.blackhole();
        open.write_all(b"two").await.unwrap();
        assert_eq!(
            read_within(&mut open, quiet).await,
            None,
            "silence, not a close"
        );
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        new.write_all(b"new").await.unwrap();
        assert_eq!(
            read_within(&mut new, quiet).await,
            None,
            "silence, not a close"
        );

        proxy.restore();
        let wait = std::time::Duration::from_secs(5);
        assert_eq!(read_within(&mut open, wait).await.unwrap(), b"two");
        assert_eq!(read_within(&mut new, wait).await.unwrap(), b"new");

        // A cut after a black hole resets what it held.
        proxy.blackhole();
        open.write_all(b"three").await.unwrap();
        proxy.cut();
        assert_eq!(read_within(&mut open, wait).await.unwrap(), b"");
        assert!(proxy.accepted() >= 2);
    }
}
