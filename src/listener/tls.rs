//! TLS for every listener: rustls with the ring provider, TLS 1.2 and 1.3 only, ALPN for
//! HTTP/2 on HTTP listeners, and certificates that can be swapped while running.
//!
//! The certificate lives behind a resolver, not in the `ServerConfig`, so SIGHUP can
//! replace it: handshakes after the swap see the new certificate, connections already
//! established keep the session they negotiated.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("private key {key} does not belong to certificate {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The process-wide crypto provider: ring, so static musl builds need no C toolchain
/// beyond what SQLite already needs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key.
pub fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|error| TlsError::Certificate {
            path: files.cert.clone(),
            reason: error.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Certificate {
            path: files.cert.clone(),
            reason: "no PEM certificate in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| TlsError::Key {
        path: files.key.clone(),
        reason: error.to_string(),
    })?;
    CertifiedKey::from_der(chain, key, &crypto_provider()).map_err(|error| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: error.to_string(),
    })
}

/// A certificate that SIGHUP can replace.
pub struct ReloadableCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ReloadableCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableCert {
    pub fn load(files: &TlsFiles) -> Result<Arc<ReloadableCert>, TlsError> {
        let key = load_certified_key(files)?;
        Ok(Arc::new(ReloadableCert {
            files: files.clone(),
            current: RwLock::new(Arc::new(key)),
        }))
    }

    /// Re-reads the files. On failure the old certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.files)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(key);
        Ok(())
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Several certificates on one listener, chosen by the name the client asks for (SNI):
/// the first whose certificate is valid for that name (wildcards included), else the
/// first. Each one reloads on SIGHUP like a single certificate.
#[derive(Debug)]
pub struct SniCertificates {
    certificates: Vec<Arc<ReloadableCert>>,
}

impl SniCertificates {
    pub fn new(certificates: Vec<Arc<ReloadableCert>>) -> SniCertificates {
        SniCertificates { certificates }
    }
}

fn serves(key: &CertifiedKey, name: &rustls_pki_types::ServerName<'_>) -> bool {
    key.end_entity_cert()
        .ok()
        .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
        .is_some_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let asked = client_hello
            .server_name()
            .and_then(|name| rustls_pki_types::ServerName::try_from(name.to_owned()).ok());
        if let Some(name) = asked {
            for certificate in &self.certificates {
                let key = certificate.current();
                if serves(&key, &name) {
                    return Some(key);
                }
            }
        }
        self.certificates
            .first()
            .map(|certificate| certificate.current())
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

/// A server configuration for one listener. `alpn` lists protocols in preference order.
pub fn server_config(cert: Arc<dyn ResolvesServerCert>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Arc::new(config)
}
