//! The rustls server config from PEM files, offering h2 and http/1.1 by
//! ALPN.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// rustls 0.23 panics without a process-wide provider; main and tests call
/// this once before anything touches TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, String> {
    install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert)
        .map_err(|e| format!("server.tls.cert: cannot read {}: {e}", cfg.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "server.tls.cert: {} is not PEM certificates: {e}",
                cfg.cert.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert: {} holds no certificate",
            cfg.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| {
        format!(
            "server.tls.key: {} holds no usable private key: {e}",
            cfg.key.display()
        )
    })?;
    let mut server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("server.tls: certificate and key do not fit together: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
