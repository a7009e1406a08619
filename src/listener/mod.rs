//! Listening sockets, shared by the api, resp and gateway listeners: bind, optional TLS,
//! a cap on concurrent connections, and graceful shutdown.
//!
//! `Listener::bind` fails early (address in use, bad certificate) so start-up can
//! report it before anything else runs. `serve_http` runs an axum router on it; the
//! RESP listener drives `accept` with its own connection handler.

mod http;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

pub use http::{HttpOptions, serve_http};
pub use tls::{ReloadableCert, TlsError, crypto_provider, load_certified_key, server_config};

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
    tls: Option<(TlsAcceptor, Arc<ReloadableCert>)>,
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
        let tls = match tls {
            Some(files) => {
                let cert = ReloadableCert::load(files).map_err(|source| ListenerError::Tls {
                    listener: name,
                    source,
                })?;
                Some((TlsAcceptor::from(server_config(cert.clone(), alpn)), cert))
            }
            None => None,
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

    /// The certificate SIGHUP reloads, when this listener speaks TLS.
    pub fn certificate(&self) -> Option<Arc<ReloadableCert>> {
        self.tls.as_ref().map(|(_, cert)| cert.clone())
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
