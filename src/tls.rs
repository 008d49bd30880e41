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
use rustls::SignatureScheme;
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

/// The certificates of a PEM file, at least one: a chain to present, or
/// roots to trust (`upstream.tls_ca`).
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    certificates_in(&pem, path)
}

/// The certificates of `pem`, read from `path`, at least one.
pub fn certificates_in(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.into_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn certified_key(at: &str, cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ConfigError> {
    let bad = |key: String, reason: String| ConfigError { key, reason };
    let key_key = format!("{at}.key");
    let chain = read_certificates(cert).map_err(|e| bad(format!("{at}.cert"), e))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => bad(
            key_key.clone(),
            format!("cannot read {}: {e}", key.display()),
        ),
        e => bad(
            key_key.clone(),
            format!("{} holds no usable private key: {e}", key.display()),
        ),
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

    /// A certificate naming `host` exactly, else one whose wildcard
    /// covers it, else any (for a client that named no host, or one no
    /// certificate names: its own check decides); among those, one whose
    /// key signs with a scheme the client offers (an ECDSA and an RSA
    /// certificate for the same host, as nginx serves both); then the
    /// first in the file.
    fn choose(&self, host: Option<&str>, schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let all = self.0.load();
        let host = host.map(str::to_ascii_lowercase);
        let rank = |c: &TlsCertificate| {
            let Some(host) = host.as_deref() else {
                return 2;
            };
            let named = |wildcard: bool| {
                c.names
                    .iter()
                    .any(|n| n.starts_with("*.") == wildcard && covers(n, host))
            };
            if named(false) {
                0
            } else if named(true) {
                1
            } else {
                2
            }
        };
        let cannot_sign = |c: &TlsCertificate| c.certified.key.choose_scheme(schemes).is_none();
        all.iter()
            .enumerate()
            .min_by_key(|(i, c)| (rank(c), cannot_sign(c), *i))
            .map(|(_, c)| c.certified.clone())
    }

    /// The acceptor for the public listener, ALPN offering h2 first.
    pub fn acceptor(self: &Arc<Self>) -> TlsAcceptor {
        install_crypto_provider();
        let mut server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // http/1.0 too, as nginx: rustls ends a handshake whose client
        // offers no protocol in this list (`curl --http1.0` offers only
        // that one), and hyper serves HTTP/1.0.
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        // Stateless resumption, as nginx's default tickets: without, only
        // the last 256 sessions (two per connection) could resume, and on
        // a click day nearly every phone that reconnects pays a full
        // handshake. The ticket key is random per process and rotated
        // every 6 hours; another node's ticket makes a full handshake.
        match rustls::crypto::ring::Ticketer::new() {
            Ok(ticketer) => server.ticketer = ticketer,
            Err(e) => {
                tracing::warn!(error = %e, "no TLS session tickets: sessions resume only from a small cache")
            }
        }
        TlsAcceptor::from(Arc::new(server))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name(), hello.signature_schemes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `names` with a key of `alg`, as read from files.
    fn certificate(names: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> TlsCertificate {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let private = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let certified = Arc::new(
            CertifiedKey::from_der(
                vec![cert.der().clone()],
                private,
                &rustls::crypto::ring::default_provider(),
            )
            .unwrap(),
        );
        TlsCertificate {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            names: dns_names(&certified),
            certified,
        }
    }

    #[test]
    fn the_host_chooses_exact_names_before_wildcards_before_the_first() {
        let ecdsa = &rcgen::PKCS_ECDSA_P256_SHA256;
        let list = vec![
            certificate(&["localhost"], ecdsa),
            certificate(&["*.example.it"], ecdsa),
            certificate(&["pensioni.example.it"], ecdsa),
        ];
        assert_eq!(list[1].names, ["*.example.it"]);
        let served = Certificates::new(&TlsConfig {
            certificates: list.clone(),
        });
        let schemes = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let chosen = |host| served.choose(host, &schemes).unwrap();
        let is = |c: Arc<CertifiedKey>, i: usize| Arc::ptr_eq(&c, &list[i].certified);
        assert!(
            is(chosen(Some("pensioni.example.it")), 2),
            "exact, though listed after a wildcard"
        );
        assert!(
            is(chosen(Some("PENSIONI.Example.it")), 2),
            "case does not matter"
        );
        assert!(is(chosen(Some("bonus.example.it")), 1));
        assert!(
            is(chosen(Some("a.bonus.example.it")), 0),
            "a wildcard covers one label"
        );
        assert!(is(chosen(Some("example.it")), 0));
        assert!(is(chosen(None), 0));
    }

    #[test]
    fn a_key_the_client_can_verify_is_chosen_among_equals() {
        let list = vec![
            certificate(&["portal.example.it"], &rcgen::PKCS_ED25519),
            certificate(&["portal.example.it"], &rcgen::PKCS_ECDSA_P256_SHA256),
        ];
        let served = Certificates::new(&TlsConfig {
            certificates: list.clone(),
        });
        let host = Some("portal.example.it");
        let ecdsa_only = [SignatureScheme::ECDSA_NISTP256_SHA256];
        let both = [
            SignatureScheme::ED25519,
            SignatureScheme::ECDSA_NISTP256_SHA256,
        ];
        let chosen = served.choose(host, &ecdsa_only).unwrap();
        assert!(Arc::ptr_eq(&chosen, &list[1].certified));
        let chosen = served.choose(host, &both).unwrap();
        assert!(
            Arc::ptr_eq(&chosen, &list[0].certified),
            "the file's order among equals"
        );
    }

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
