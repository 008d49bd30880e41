//! The rustls server config from PEM files, offering h2 and http/1.1 by
//! ALPN; the certificate is swapped whole by a reload (certificates are
//! renewed every few weeks, and a restart would drop every connection).

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::ConfigError;

/// rustls 0.23 panics without a process-wide provider; main and tests call
/// this once before anything touches TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a certificate chain and its private key, checking they belong
/// together: the config check does this, so a file that would fail the
/// handshake fails `check-config`, the start and a reload instead.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ConfigError> {
    let bad = |key: &str, reason: String| ConfigError {
        key: key.into(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| {
            bad(
                "server.tls.cert",
                format!("cannot read {}: {e}", cert.display()),
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(
                "server.tls.cert",
                format!("{} is not PEM certificates: {e}", cert.display()),
            )
        })?;
    if chain.is_empty() {
        return Err(bad(
            "server.tls.cert",
            format!("{} holds no certificate", cert.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(
            "server.tls.key",
            format!("{} holds no usable private key: {e}", key.display()),
        )
    })?;
    CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider())
        .map(Arc::new)
        .map_err(|e| {
            bad(
                "server.tls",
                format!("certificate and key do not fit together: {e}"),
            )
        })
}

/// When the first certificate of the chain stops being valid (unix
/// seconds): the leaf, or an intermediate that expires before it. None
/// when no certificate of the chain can be read for it.
pub fn expires_at(key: &CertifiedKey) -> Option<u64> {
    use x509_cert::der::Decode;
    key.cert
        .iter()
        .filter_map(|der| x509_cert::Certificate::from_der(der).ok())
        .map(|c| {
            c.tbs_certificate
                .validity
                .not_after
                .to_unix_duration()
                .as_secs()
        })
        .min()
}

/// The certificate varco presents: a handshake takes the one in force
/// when it starts, so a reload changes it for new connections only.
#[derive(Debug)]
pub struct Certificate(ArcSwap<CertifiedKey>);

impl Certificate {
    pub fn new(first: Arc<CertifiedKey>) -> Arc<Certificate> {
        Arc::new(Certificate(ArcSwap::new(first)))
    }

    pub fn replace(&self, next: Arc<CertifiedKey>) {
        self.0.store(next);
    }

    /// The acceptor for the public listener, ALPN offering h2 first.
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        install_crypto_provider();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(server))
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
