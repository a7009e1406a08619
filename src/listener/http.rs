//! Serving an axum router on a `Listener`, over HTTP/1.1 and HTTP/2 (by ALPN under TLS,
//! by preface in clear text), with graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{Listener, Stream};

/// Request extension: whether the connection came in over TLS (X-Forwarded-Proto).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTls(pub bool);

/// Protocol limits for one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions {
    /// Slowloris guard: the whole request head must arrive within this time.
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    /// How long shutdown waits for in-flight requests before dropping connections.
    pub drain_timeout: Duration,
}

/// Serves `router` until `shutdown`; then each connection finishes the requests in
/// flight (HTTP/1 stops keep-alive, HTTP/2 sends GOAWAY), up to the drain timeout.
pub async fn serve_http(
    listener: Listener,
    router: Router,
    options: HttpOptions,
    shutdown: CancellationToken,
) {
    let drain = options.drain_timeout;
    let connection_shutdown = shutdown.clone();
    listener
        .serve(shutdown, drain, move |stream, peer| {
            serve_connection(
                stream,
                peer,
                router.clone(),
                options,
                connection_shutdown.clone(),
            )
        })
        .await;
}

async fn serve_connection(
    stream: Stream,
    peer: SocketAddr,
    router: Router,
    options: HttpOptions,
    shutdown: CancellationToken,
) {
    let tls = ConnectionTls(matches!(stream, Stream::Tls(_)));
    let service = router.map_request(move |request: hyper::Request<hyper::body::Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(tls);
        request
    });
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_headers(options.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 * 1024);
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(connection);
    let outcome = tokio::select! {
        outcome = connection.as_mut() => outcome,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = outcome {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
