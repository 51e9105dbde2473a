//! The API's server loop: accepting connections (bounded in number), serving each with
//! hyper's HTTP/1 server under a header-read timeout and a head-size bound, and draining the
//! requests in flight at shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Accepts connections until `stop`, then waits (up to the drain timeout) for the requests
/// in flight. Each connection is served by hyper's HTTP/1 server with a header-read timeout
/// (slow-loris clients are hung up on) and a bounded head size; the number of connections
/// is bounded by a semaphore, so a flood waits in the kernel's backlog instead of in memory.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    router: Router,
    config: &Config,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(config.header_read_timeout_ms))
        .max_buf_size(config.max_header_bytes.max(8192));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors or the like: back off instead of spinning.
                    tracing::error!(cause = %err, "failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), req)
            });
        let conn =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(cause = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drain = Duration::from_millis(config.drain_timeout_ms);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "requests still in flight after the drain timeout");
    }
    Ok(())
}
