//! The pooled HTTP client towards upstreams, with the timeouts hyper does
//! not set by default (connect) and a bounded idle pool; `https://`
//! upstreams over rustls, their certificates verified against
//! `upstream.tls_ca` or the system's roots.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::body::Body;
use crate::config::UpstreamConfig;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

pub fn build(cfg: &UpstreamConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        // Without a timer the pool never evicts idle connections.
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .build(with_tls(connector, cfg))
}

/// `http` for `http://` upstreams and, under TLS, for `https://` ones
/// (HTTP/1.1 by ALPN, the upstream's host name checked).
pub fn with_tls(mut http: HttpConnector, cfg: &UpstreamConfig) -> HttpsConnector<HttpConnector> {
    // The request URI's scheme chooses; TLS is this connector's to add.
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    let trusted = if cfg.tls_roots.is_empty() {
        system_roots()
    } else {
        &cfg.tls_roots
    };
    roots.add_parsable_certificates(trusted.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(roots);
    let tls = match &cfg.tls_client {
        Some(identity) => tls.with_client_cert_resolver(Arc::new(Identity(identity.clone()))),
        None => tls.with_no_client_auth(),
    };
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// `upstream.tls_client`, shown to an upstream that asks (and only then).
#[derive(Debug)]
struct Identity(Arc<CertifiedKey>);

impl ResolvesClientCert for Identity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The system's roots, read once (a reload and each room's health
/// checks build clients too). None readable: no https upstream verifies,
/// and each says why in its error.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "cannot read some of the system's TLS roots");
        }
        found.certs
    })
}
