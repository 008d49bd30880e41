//! The rustls server config from PEM files, offering h2 and http/1.1 by
//! ALPN; the certificates are swapped whole by a reload (certificates are
//! renewed every few weeks, and a restart would drop every connection).
//! With several, the host the client names (SNI) chooses, as HAProxy
//! chooses among its `crt` files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsCertificate, TlsConfig};

/// rustls 0.23 panics without a process-wide provider; main and tests call
/// this once before anything touches TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Reads a certificate chain and its private key, checking they belong
/// together: the config check does this, so a file that would fail the
/// handshake fails `check-config`, the start and a reload instead. `at`
/// is the config key errors name (`server.tls`, `server.tls[1]`).
pub fn read_certificate(
    at: &str,
    cert: PathBuf,
    key: PathBuf,
) -> Result<TlsCertificate, ConfigError> {
    let certified = certified_key(at, &cert, &key)?;
    let names = dns_names(&certified);
    Ok(TlsCertificate {
        cert,
        key,
        certified,
        names,
    })
}

fn certified_key(at: &str, cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ConfigError> {
    let bad = |key: String, reason: String| ConfigError { key, reason };
    let (cert_key, key_key) = (format!("{at}.cert"), format!("{at}.key"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| {
            bad(
                cert_key.clone(),
                format!("cannot read {}: {e}", cert.display()),
            )
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            bad(
                cert_key.clone(),
                format!("{} is not PEM certificates: {e}", cert.display()),
            )
        })?;
    if chain.is_empty() {
        return Err(bad(
            cert_key,
            format!("{} holds no certificate", cert.display()),
        ));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(
            key_key,
            format!("{} holds no usable private key: {e}", key.display()),
        )
    })?;
    CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider())
        .map(Arc::new)
        .map_err(|e| {
            bad(
                at.to_string(),
                format!("certificate and key do not fit together: {e}"),
            )
        })
}

/// The DNS names of the leaf certificate's subjectAltName, lower case
/// (browsers ignore the subject's common name, and so does varco).
fn dns_names(key: &CertifiedKey) -> Vec<String> {
    use x509_cert::der::oid::AssociatedOid;
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Some(leaf) = key
        .cert
        .first()
        .and_then(|der| x509_cert::Certificate::from_der(der).ok())
    else {
        return Vec::new();
    };
    leaf.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id == SubjectAltName::OID)
        .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0)
        .filter_map(|name| match name {
            GeneralName::DnsName(n) => Some(n.as_str().to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Whether a certificate name covers `host` (lower case): the same name,
/// or a wildcard `*.example.it` standing for exactly one label.
fn covers(name: &str, host: &str) -> bool {
    match name.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => name == host,
    }
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

/// The certificates varco presents: a handshake takes the ones in force
/// when it starts, so a reload changes them for new connections only.
#[derive(Debug)]
pub struct Certificates(ArcSwap<Vec<TlsCertificate>>);

impl Certificates {
    pub fn new(tls: &TlsConfig) -> Arc<Certificates> {
        Arc::new(Certificates(ArcSwap::from_pointee(
            tls.certificates.clone(),
        )))
    }

    pub fn replace(&self, tls: &TlsConfig) {
        self.0.store(Arc::new(tls.certificates.clone()));
    }

    /// The first certificate naming `host` exactly, else the first whose
    /// wildcard covers it, else the first of all (for a client that named
    /// no host, or one no certificate names: its own check decides).
    fn choose(&self, host: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let all = self.0.load();
        let host = host.map(str::to_ascii_lowercase);
        let named = |wildcard: bool| {
            let host = host.as_deref()?;
            all.iter().find(|c| {
                c.names
                    .iter()
                    .any(|n| n.starts_with("*.") == wildcard && covers(n, host))
            })
        };
        named(false)
            .or_else(|| named(true))
            .or_else(|| all.first())
            .map(|c| c.certified.clone())
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

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn a_wildcard_covers_one_label_only() {
        assert!(covers("portal.example.it", "portal.example.it"));
        assert!(!covers("portal.example.it", "example.it"));
        assert!(covers("*.example.it", "bonus.example.it"));
        assert!(!covers("*.example.it", "example.it"));
        assert!(!covers("*.example.it", "a.bonus.example.it"));
        assert!(!covers("*.example.it", ".example.it"));
        assert!(!covers("*.example.it", "bonusexample.it"));
    }
}
