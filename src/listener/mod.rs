//! Listening sockets, shared by the api, resp and gateway listeners: bind, optional TLS,
//! a cap on concurrent connections, and graceful shutdown.
//!
//! `Listener::bind` fails early (address in use, bad certificate) so start-up can
//! report it before anything else runs. `Listener::serve` is the one accept loop: it
//! finishes each TLS handshake and hands a `Stream` to a protocol's connection handler
//! (`serve_http` here, the RESP server in `resp/`), and drains on shutdown.

mod framing;
mod http;
mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::TlsFiles;

pub use framing::AmbiguousFraming;
pub use http::{ConnectionTls, HttpOptions, serve_http};
pub use tls::{
    ReloadableCert, SniCertificates, TlsError, crypto_provider, load_certified_key, server_config,
};

/// A TLS handshake that has not finished by then is dropped; it holds a connection slot.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{listener} listener: cannot bind {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{listener} listener: {source}")]
    Tls {
        listener: &'static str,
        source: TlsError,
    },
}

/// A bound socket, ready to accept.
pub struct Listener {
    name: &'static str,
    tcp: TcpListener,
    local_addr: SocketAddr,
    tls: Option<(TlsAcceptor, Vec<Arc<ReloadableCert>>)>,
    /// One permit per open connection. Accepting waits for a permit, so at the limit
    /// new clients queue in the kernel backlog instead of being accepted and dropped.
    slots: Arc<Semaphore>,
}

impl Listener {
    pub async fn bind(
        name: &'static str,
        addr: SocketAddr,
        tls: Option<&TlsFiles>,
        alpn: &[&[u8]],
        max_connections: u32,
    ) -> Result<Listener, ListenerError> {
        Listener::bind_with_certificates(
            name,
            addr,
            tls.map(std::slice::from_ref).unwrap_or_default(),
            alpn,
            max_connections,
        )
        .await
    }

    /// Binds with TLS when `certificates` is not empty: one certificate, or several
    /// chosen by SNI.
    pub async fn bind_with_certificates(
        name: &'static str,
        addr: SocketAddr,
        certificates: &[TlsFiles],
        alpn: &[&[u8]],
        max_connections: u32,
    ) -> Result<Listener, ListenerError> {
        let tls = if certificates.is_empty() {
            None
        } else {
            let loaded = certificates
                .iter()
                .map(ReloadableCert::load)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| ListenerError::Tls {
                    listener: name,
                    source,
                })?;
            let resolver: Arc<dyn rustls::server::ResolvesServerCert> = if loaded.len() == 1 {
                loaded[0].clone()
            } else {
                Arc::new(SniCertificates::new(loaded.clone()))
            };
            Some((TlsAcceptor::from(server_config(resolver, alpn)), loaded))
        };
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|source| ListenerError::Bind {
                listener: name,
                addr,
                source,
            })?;
        let local_addr = tcp.local_addr().map_err(|source| ListenerError::Bind {
            listener: name,
            addr,
            source,
        })?;
        Ok(Listener {
            name,
            tcp,
            local_addr,
            tls,
            slots: Arc::new(Semaphore::new(max_connections as usize)),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The (first) certificate SIGHUP reloads, when this listener speaks TLS.
    pub fn certificate(&self) -> Option<Arc<ReloadableCert>> {
        self.tls
            .as_ref()
            .and_then(|(_, certs)| certs.first().cloned())
    }

    /// Every certificate of this listener.
    pub fn certificates(&self) -> Vec<Arc<ReloadableCert>> {
        self.tls
            .as_ref()
            .map(|(_, certs)| certs.clone())
            .unwrap_or_default()
    }

    pub fn tls_acceptor(&self) -> Option<TlsAcceptor> {
        self.tls.as_ref().map(|(acceptor, _)| acceptor.clone())
    }

    /// Waits for a free connection slot, then for a client. Transient accept errors
    /// (EMFILE, ECONNABORTED) are logged and retried after a pause rather than ending
    /// the listener: running out of fds must not stop the service for good.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, OwnedSemaphorePermit) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.tcp.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return (stream, peer, permit);
                }
                Err(error) => {
                    tracing::warn!(listener = self.name, %error, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl Listener {
    /// Accepts until `shutdown` is cancelled, running `handle` for each connection on a
    /// task of its own (after the TLS handshake, when this listener speaks TLS). Then
    /// closes the socket, so new clients are refused, and waits up to `drain` for the
    /// handlers, which watch `shutdown` themselves to finish what is in flight.
    pub async fn serve<Handle, Done>(
        self,
        shutdown: CancellationToken,
        drain: Duration,
        handle: Handle,
    ) where
        Handle: Fn(Stream, SocketAddr) -> Done + Clone + Send + 'static,
        Done: Future<Output = ()> + Send + 'static,
    {
        let tracker = TaskTracker::new();
        let name = self.name;
        loop {
            let (tcp, peer, permit) = tokio::select! {
                accepted = self.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            let tls = self.tls_acceptor();
            let handle = handle.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let stream = match tls {
                    None => Stream::Plain(tcp),
                    Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                        Ok(Err(error)) => return tracing::debug!(listener = name, %peer, %error, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(listener = name, %peer, "TLS handshake timed out"),
                    },
                };
                handle(stream, peer).await;
            });
        }
        drop(self);
        tracker.close();
        tracing::info!(
            listener = name,
            open = tracker.len(),
            "stopped accepting; draining connections"
        );
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                listener = name,
                "drain timeout reached; closing remaining connections"
            );
        }
    }
}

/// An accepted connection, in clear text or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
