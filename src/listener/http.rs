//! Serving an axum router (or any service of axum requests) on a `Listener`, over
//! HTTP/1.1 and HTTP/2 (by ALPN under TLS, by preface in clear text), with graceful
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::framing::Inspected;
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
    /// Look at HTTP/1 request heads before hyper does and mark requests whose framing
    /// was ambiguous (`AmbiguousFraming`); the gateway refuses them.
    pub inspect_framing: bool,
}

/// What an HTTP listener serves: an axum router, or any service of axum requests.
pub trait HttpService:
    tower::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: tower::Service<Request, Response = Response, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `router` until `shutdown`; then each connection finishes the requests in
/// flight (HTTP/1 stops keep-alive, HTTP/2 sends GOAWAY), up to the drain timeout.
pub async fn serve_http(
    listener: Listener,
    router: impl HttpService,
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
    router: impl HttpService,
    options: HttpOptions,
    shutdown: CancellationToken,
) {
    let tls = ConnectionTls(matches!(stream, Stream::Tls(_)));
    let (stream, heads) = if options.inspect_framing {
        let (stream, heads) = Inspected::new(stream);
        (Either::Inspected(stream), Some(heads))
    } else {
        (Either::Plain(stream), None)
    };
    let service = router.map_request(move |request: hyper::Request<hyper::body::Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(tls);
        if let Some(heads) = &heads {
            request.extensions_mut().insert(heads.next());
        }
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

/// A connection's stream, inspected or not (one concrete type for hyper).
enum Either {
    Plain(Stream),
    Inspected(Inspected<Stream>),
}

impl tokio::io::AsyncRead for Either {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
            Either::Inspected(stream) => std::pin::Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Either {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Either::Plain(stream) => std::pin::Pin::new(stream).poll_write(cx, data),
            Either::Inspected(stream) => std::pin::Pin::new(stream).poll_write(cx, data),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(stream) => std::pin::Pin::new(stream).poll_flush(cx),
            Either::Inspected(stream) => std::pin::Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Either::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
            Either::Inspected(stream) => std::pin::Pin::new(stream).poll_shutdown(cx),
        }
    }
}
