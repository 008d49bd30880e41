//! The pooled HTTP client towards upstreams, with the timeouts hyper does
//! not set by default (connect) and a bounded idle pool; `https://`
//! upstreams over rustls, their certificates verified against
//! `upstream.tls_ca` or the system's roots, for the host in their URL or
//! the room's `tls_server_name`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_rustls::{DefaultServerNameResolver, HttpsConnector, ResolveServerName};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::body::Body;
use crate::config::{RoomConfig, UpstreamConfig};
use crate::proxy::upstreams::label;

pub type UpstreamClient = Client<Connector, Body>;

/// The client requests go out with; a reload that changes a TLS server
/// name puts a new one in (with its own pool: connections made under the
/// old name are not reused once the requests on them end).
pub type SharedClient = Arc<ArcSwap<UpstreamClient>>;

/// The TLS server name of each https upstream (by `host:port`) whose
/// room names one (`rooms.NAME.tls_server_name`): what it is asked for
/// (SNI) and what its certificate must carry. Others go by their URL's
/// host. A reload swaps it whole; connections already made keep theirs.
#[derive(Clone, Default)]
pub struct ServerNames(Arc<ArcSwap<HashMap<String, ServerName<'static>>>>);

impl ServerNames {
    pub fn new(rooms: &[RoomConfig]) -> Self {
        let names = ServerNames::default();
        names.replace(rooms);
        names
    }

    /// Whether any name changed.
    pub fn replace(&self, rooms: &[RoomConfig]) -> bool {
        let mut named = HashMap::new();
        for room in rooms {
            let Some(name) = &room.tls_server_name else {
                continue;
            };
            for u in &room.upstreams {
                if u.scheme_str() == Some("https") {
                    named.insert(label(u), name.clone());
                }
            }
        }
        let changed = **self.0.load() != named;
        self.0.store(Arc::new(named));
        changed
    }
}

impl ResolveServerName for ServerNames {
    fn resolve(&self, uri: &http::Uri) -> Result<ServerName<'static>, BoxError> {
        match self.0.load().get(&label(uri)) {
            Some(name) => Ok(name.clone()),
            None => DefaultServerNameResolver::default().resolve(uri),
        }
    }
}

/// The most header fields an upstream's answer may have. hyper's default
/// is 100: a portal answer with more (many Set-Cookie, say) was a parse
/// error, counted as a broken upstream and retried on the others, and a
/// health check of that page failed. nginx bounds the head by size
/// (proxy_buffer_size), not by count.
pub const ANSWER_FIELDS: usize = 1000;

pub fn build(cfg: &UpstreamConfig, names: &ServerNames) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        // Without a timer the pool never evicts idle connections.
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .http1_max_headers(ANSWER_FIELDS)
        .build(Connector::new(connector, cfg, names, cfg.connect_timeout))
}

/// Connections to upstreams, `http://` in clear and `https://` over TLS,
/// each made within a time limit that covers the TLS handshake too (as
/// nginx's `proxy_connect_timeout`): an upstream that accepts TCP and
/// never finishes the handshake is a failed connection (502, cool-down,
/// the next upstream), not a request that waits `response_timeout`.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    limit: Duration,
}

type Stream = hyper_rustls::MaybeHttpsStream<hyper_util::rt::TokioIo<tokio::net::TcpStream>>;
type Connecting = Pin<Box<dyn std::future::Future<Output = Result<Tracked, BoxError>> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Connector {
    pub fn new(
        mut http: HttpConnector,
        cfg: &UpstreamConfig,
        names: &ServerNames,
        limit: Duration,
    ) -> Connector {
        // hyper then gives each of a name's addresses its part of the
        // limit and moves on to the next: without it, an address that
        // drops SYNs (one server of a DNS round robin powered off) took
        // the whole limit, the next never tried, and the whole name
        // cooled down or failed its checks.
        http.set_connect_timeout(Some(limit));
        Connector {
            inner: with_tls(http, cfg, names),
            limit,
        }
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Tracked;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(made) => made.map(|stream| Tracked {
                    stream,
                    answered: Answered::default(),
                }),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection (TLS included) within {limit:?}"),
                )) as BoxError),
            }
        })
    }
}

/// A connection to an upstream, marked once it has answered a request.
/// A request that fails on one that had, before any answer, most likely
/// met the keep-alive race (the upstream closed it, idle, as the request
/// went out): that says nothing of the upstream's health, and a request
/// that is safe to send twice can go again (nginx tries another
/// connection for it too).
pub struct Tracked {
    stream: Stream,
    answered: Answered,
}

/// The mark of a [`Tracked`] connection, found in the extensions of each
/// response it brings and in the error of a request that failed on it.
#[derive(Clone, Default)]
pub struct Answered(Arc<AtomicBool>);

impl Answered {
    /// The connection brought a response.
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the connection `error` came on had answered before.
    pub fn before(error: &hyper_util::client::legacy::Error) -> bool {
        let Some(connected) = error.connect_info() else {
            return false;
        };
        let mut found = http::Extensions::new();
        connected.get_extras(&mut found);
        found
            .get::<Answered>()
            .is_some_and(|a| a.0.load(Ordering::Relaxed))
    }
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        self.stream.connected().extra(self.answered.clone())
    }
}

impl hyper::rt::Read for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
}

/// `http` for `http://` upstreams and, under TLS, for `https://` ones
/// (HTTP/1.1, the upstream's host name, or the room's name for it,
/// checked).
fn with_tls(
    mut http: HttpConnector,
    cfg: &UpstreamConfig,
    names: &ServerNames,
) -> HttpsConnector<HttpConnector> {
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
        Some(identity) => {
            tls.with_client_cert_resolver(Arc::new(Identity(identity.certified.clone())))
        }
        None => tls.with_no_client_auth(),
    };
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .with_server_name_resolver(names.clone())
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
/// checks build clients too). The config check refuses https upstreams
/// without `upstream.tls_ca` when there are none.
pub fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "cannot read some of the system's TLS roots");
        }
        found.certs
    })
}
