//! Serving an axum router on a `Listener`, over HTTP/1.1 and HTTP/2 (by ALPN under TLS,
//! by preface in clear text), with graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{Listener, TLS_HANDSHAKE_TIMEOUT};

/// Protocol limits for one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpOptions {
    /// Slowloris guard: the whole request head must arrive within this time.
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    /// How long shutdown waits for in-flight requests before dropping connections.
    pub drain_timeout: Duration,
}

/// Accepts until `shutdown` is cancelled, then stops accepting (the socket is closed,
/// so new clients are refused) and lets in-flight requests finish, up to the drain
/// timeout.
pub async fn serve_http(
    listener: Listener,
    router: Router,
    options: HttpOptions,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let name = listener.name();
    loop {
        let (stream, peer, permit) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let router = router.clone();
        let watcher = graceful.watcher();
        let tls = listener.tls_acceptor();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(stream, peer, router, options, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, router, options, watcher).await
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(listener = name, %peer, %error, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(listener = name, %peer, "TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    tracing::info!(
        listener = name,
        open = graceful.count(),
        "stopped accepting; draining connections"
    );
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "drain timeout reached; closing remaining connections"
        );
    }
}

async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    options: HttpOptions,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = router.map_request(move |request: hyper::Request<hyper::body::Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
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
    let connection =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}
