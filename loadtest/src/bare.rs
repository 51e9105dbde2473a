//! A bare HTTP server of the collector's framework (axum on tokio) that reads each request's
//! body and answers 200 with no other work: the ceiling a collector on this machine could
//! reach, against which the benchmark suite sets the real collector's figures.

use std::future::Future;

use axum::body::Bytes;
use axum::routing::{any, get};
use axum::Router;
use tokio::net::TcpListener;

/// The answer to every request, shaped like the collector's.
const OK_BODY: &str = r#"{"success":true}"#;

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Reading the body keeps the comparison fair: the collector must read it too.
    async fn ok(_body: Bytes) -> &'static str {
        OK_BODY
    }
    let app = Router::new()
        .route("/v1/p.gif", get(|| async { OK_BODY }))
        .route("/v1/{endpoint}", any(ok));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_every_endpoint_with_200() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, async move {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();
        for path in ["/v1/batch", "/v1/track", "/v1/identify"] {
            let resp = http
                .post(format!("http://{addr}{path}"))
                .body("{}")
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.text().await.unwrap(), OK_BODY);
        }
        let pixel = http
            .get(format!("http://{addr}/v1/p.gif?k=x"))
            .send()
            .await
            .unwrap();
        assert_eq!(pixel.status(), 200);
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
