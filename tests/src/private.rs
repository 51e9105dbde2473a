//! Private instances of the real parts, for fault tests that stop, restart or cut them:
//! the shared stack must never be touched by one test, since every other test runs on it.
//!
//! - [`PrivateKafka`] and [`PrivatePostgres`] run the same scripts as the local stack
//!   (`deploy/local/lib.sh`) with a state folder and ports of their own, and are stopped and
//!   deleted on drop.
//! - [`TcpProxy`] sits between a service and a dependency, so a test can cut the network
//!   (drop every connection, refuse new ones) and restore it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::{repo_root, unique_name};

/// A free TCP port on 127.0.0.1 (free when asked; good enough for tests).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
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
}

impl PrivateKafka {
    /// Formats and starts a fresh broker on free ports.
    pub async fn start() -> Result<PrivateKafka> {
        let port = free_port()?;
        let controller = free_port()?;
        let inner = Private::new(vec![
            ("SLUICE_KAFKA_PORT", port.to_string()),
            ("SLUICE_KAFKA_CONTROLLER_PORT", controller.to_string()),
            ("SLUICE_KAFKA_HEAP", "256m".to_owned()),
        ]);
        inner.run("start_kafka").await?;
        Ok(PrivateKafka { inner, port })
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

/// A TCP proxy on 127.0.0.1 in front of `target`, whose link a test can cut and restore.
///
/// While cut, every open connection is closed and new ones are accepted and closed at once,
/// as a service sees a dependency behind a broken network or a restarting load balancer.
pub struct TcpProxy {
    addr: SocketAddr,
    /// `true` while the link is cut; every connection task watches it.
    cut: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Starts a proxy to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let cut = Arc::new(cut);
        let target = target.to_owned();
        let task = tokio::spawn({
            let cut = Arc::clone(&cut);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if *cut.borrow() {
                        drop(client);
                        continue;
                    }
                    let rx = cut.subscribe();
                    let target = target.clone();
                    tokio::spawn(relay(client, target, rx));
                }
            }
        });
        Ok(TcpProxy { addr, cut, task })
    }

    /// The proxy's own address, to give the service under test.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link: closes every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut.send_replace(true);
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut.wait_for(|cut| *cut) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}
