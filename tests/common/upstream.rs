//! A real HTTP upstream for tests: echoes requests, streams large bodies,
//! answers slowly on demand, and accepts WebSocket-style upgrades.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use varco::body::{self, Body};

pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// Requests being handled right now.
    pub in_flight: Arc<AtomicUsize>,
    /// What `GET /healthz` says: 200 while true, 503 while false.
    pub healthy: Arc<AtomicBool>,
    /// The Host the last `GET /healthz` named.
    pub health_host: Arc<std::sync::Mutex<Option<String>>>,
}

impl Upstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub async fn spawn() -> Upstream {
    spawn_with(None).await
}

/// The same upstream behind TLS, with a new self-signed certificate for
/// `localhost`, written to `ca_file` for varco to trust.
pub async fn spawn_tls(ca_file: &std::path::Path) -> Upstream {
    spawn_tls_for(ca_file, None).await
}

/// As `spawn_tls`; with `client`, only a client showing that certificate
/// (DER) finishes the handshake.
pub async fn spawn_tls_for(ca_file: &std::path::Path, client: Option<&[u8]>) -> Upstream {
    varco::tls::install_crypto_provider();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(ca_file, cert.pem()).unwrap();
    let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let server = match client {
        None => rustls::ServerConfig::builder().with_no_client_auth(),
        Some(der) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(der.to_vec().into()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .unwrap();
            rustls::ServerConfig::builder().with_client_cert_verifier(verifier)
        }
    }
    .with_single_cert(vec![cert.der().clone()], private)
    .unwrap();
    spawn_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await
}

async fn spawn_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let health_host = Arc::new(std::sync::Mutex::new(None));
    let (h, f, well) = (hits.clone(), in_flight.clone(), healthy.clone());
    let named = health_host.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (h, f, well, named) = (h.clone(), f.clone(), well.clone(), named.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let f = f.clone();
                    let well = well.load(Ordering::SeqCst);
                    let named = named.clone();
                    async move {
                        f.fetch_add(1, Ordering::SeqCst);
                        let r = if req.uri().path() == "/healthz" {
                            let host = req.headers().get("host");
                            *named.lock().unwrap() =
                                host.and_then(|v| v.to_str().ok()).map(String::from);
                            match well {
                                true => text(StatusCode::OK, "ok"),
                                false => text(StatusCode::SERVICE_UNAVAILABLE, "down"),
                            }
                        } else {
                            handle(req, addr).await
                        };
                        f.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(r)
                    }
                });
                let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // More than varco lets through, so a test sees varco's
                // limit and not this portal's.
                b.http1().max_headers(200);
                match tls {
                    None => {
                        let _ = b
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    }
                    Some(tls) => {
                        let Ok(stream) = tls.accept(stream).await else {
                            return;
                        };
                        let _ = b
                            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                            .await;
                    }
                }
            });
        }
    });
    Upstream {
        addr,
        hits,
        in_flight,
        healthy,
        health_host,
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// A query parameter as text (`%20` a space).
fn query_text(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace("%20", " "))
}

async fn handle(mut req: Request<Incoming>, me: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/slow" => {
            let ms = query(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            text(StatusCode::OK, "slow done")
        }
        "/download" => {
            let n = query(&req, "bytes").unwrap_or(1024);
            let mut r = Response::new(body::stream(Generated { remaining: n }));
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/trickle" => {
            // `chunks` pieces of 1 KiB, one every `ms`: a response the
            // portal is still producing.
            let chunks = query(&req, "chunks").unwrap_or(10);
            let ms = query(&req, "ms").unwrap_or(100);
            let pieces = futures_util::stream::unfold(chunks, move |left| async move {
                if left == 0 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let piece = Frame::data(CHUNK.slice(..1024));
                Some((Ok::<_, Infallible>(piece), left - 1))
            });
            Response::new(body::stream(http_body_util::StreamBody::new(pieces)))
        }
        "/duplex" => {
            // The answer's head at once, its body (the bytes of the
            // upload) once the upload ends: a portal that answers before
            // it has read what is sent.
            let mut body = req.into_body();
            let counted = async move {
                let mut n: u64 = 0;
                while let Some(Ok(f)) = body.frame().await {
                    n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0);
                }
                Ok::<_, Infallible>(Frame::data(Bytes::from(n.to_string())))
            };
            Response::new(body::stream(http_body_util::StreamBody::new(
                futures_util::stream::once(counted),
            )))
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                    Err(_) => return text(StatusCode::BAD_REQUEST, "body error"),
                }
            }
            text(StatusCode::OK, &n.to_string())
        }
        "/fail" => text(StatusCode::INTERNAL_SERVER_ERROR, "the portal broke"),
        "/stall" => {
            // Headers and the first part of a 1000-byte answer, then
            // nothing, for ever: a portal stuck in the middle.
            let mut r = Response::new(body::stream(Stalled { first: true }));
            r.headers_mut().insert("content-length", 1000.into());
            r
        }
        "/cacheable" => {
            // A portal's asset, marked for any cache to keep for an hour.
            let mut r = text(StatusCode::OK, "{\"upstream\": \"cacheable\"}");
            let h = r.headers_mut();
            h.insert("cache-control", "public, max-age=3600".parse().unwrap());
            h.insert("expires", "Thu, 01 Jan 2099 00:00:00 GMT".parse().unwrap());
            // Read by CDNs instead of Cache-Control (RFC 9213).
            h.insert("cdn-cache-control", "max-age=3600".parse().unwrap());
            h.insert("surrogate-control", "max-age=3600".parse().unwrap());
            h.insert("x-accel-expires", "3600".parse().unwrap());
            r
        }
        "/own-request-id" => {
            // A portal that names its answers with its own ID.
            let mut r = text(StatusCode::OK, "{\"upstream\": \"own-id\"}");
            r.headers_mut()
                .insert("x-request-id", "portal-7".parse().unwrap());
            r
        }
        "/many-headers" => {
            // An answer with 150 header fields (hyper's default limit
            // is 100).
            let mut r = text(StatusCode::OK, "{\"upstream\": \"many\"}");
            for i in 0..150 {
                let name = http::HeaderName::from_bytes(format!("x-many-{i}").as_bytes()).unwrap();
                r.headers_mut().insert(name, "1".parse().unwrap());
            }
            r
        }
        "/release" => {
            // The portal ends the session, e.g. after a submitted form:
            // after `ms` (a slow submit), with the fields `values` names,
            // split at `.` (default one field, `1`).
            if let Some(ms) = query(&req, "ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let values = query_text(&req, "values").unwrap_or_else(|| "1".into());
            let mut r = text(StatusCode::OK, "{\"upstream\": \"released\"}");
            for v in values.split('.') {
                r.headers_mut()
                    .append("x-varco-release", v.parse().unwrap());
            }
            r
        }
        "/logout" => {
            // A logout page that has the browser delete the site's data.
            let mut r = text(StatusCode::OK, "{\"upstream\": \"logged out\"}");
            r.headers_mut()
                .insert("clear-site-data", "\"cache\", \"cookies\"".parse().unwrap());
            r
        }
        "/trailers" => {
            // A body followed by trailers (sent by hyper only to a
            // client that asked with `TE: trailers`), some of which a
            // proxy must not pass on.
            let mut trailers = http::HeaderMap::new();
            for (name, value) in [
                ("x-checksum", "abc"),
                ("x-varco-release", "1"),
                ("set-cookie", "t=1"),
            ] {
                trailers.insert(name, value.parse().unwrap());
            }
            let frames = futures_util::stream::iter([
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body"))),
                Ok(Frame::trailers(trailers)),
            ]);
            let mut r = Response::new(body::stream(http_body_util::StreamBody::new(frames)));
            r.headers_mut().insert(
                "trailer",
                "x-checksum, x-varco-release, set-cookie".parse().unwrap(),
            );
            r
        }
        "/claims-varco-cookies" => {
            // Another application on the same host (or a header injection)
            // setting cookies of varco's names: a ticket deleted, a pass
            // forged.
            let mut r = text(StatusCode::OK, "claims");
            let h = r.headers_mut();
            for c in [
                "__Host-varco_ticket_portal=; Max-Age=0; Path=/; Secure",
                "varco_pass_portal=forged; Path=/",
                "varco_theme=dark; Path=/",
                "lang=it; Path=/",
            ] {
                h.append("set-cookie", c.parse().unwrap());
            }
            r
        }
        "/hop" => {
            let mut r = text(StatusCode::OK, "hop");
            let h = r.headers_mut();
            h.insert("connection", "x-up-hop".parse().unwrap());
            h.insert("x-up-hop", "secret".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("proxy-authenticate", "Basic".parse().unwrap());
            h.append("set-cookie", "a=1; Path=/".parse().unwrap());
            h.append("set-cookie", "b=2; Path=/; HttpOnly".parse().unwrap());
            r
        }
        "/ws" => {
            // The handshake's answer to the client's key (RFC 6455), or,
            // with `?no-accept`, none: a page that answers 101 to anything.
            let accept = (req.uri().query() != Some("no-accept"))
                .then(|| req.headers().get("sec-websocket-key").cloned())
                .flatten()
                .map(|key| {
                    use base64::Engine;
                    let mut ctx =
                        ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
                    ctx.update(key.as_bytes());
                    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
                    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
                });
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", "websocket".parse().unwrap());
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            if let Some(accept) = accept {
                r.headers_mut()
                    .insert("sec-websocket-accept", accept.parse().unwrap());
            }
            r
        }
        _ => {
            // Echo: what the upstream saw, as JSON.
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let version = format!("{:?}", req.version());
            let mut headers = serde_json::Map::new();
            for (k, v) in req.headers() {
                let e = headers
                    .entry(k.as_str().to_string())
                    .or_insert_with(|| serde_json::json!([]));
                e.as_array_mut()
                    .unwrap()
                    .push(v.to_str().unwrap_or("?").into());
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v = serde_json::json!({
                "upstream": me.to_string(),
                "method": method,
                "uri": uri,
                "version": version,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            let mut r = text(StatusCode::OK, &v.to_string());
            r.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            r
        }
    }
}

fn text(status: StatusCode, s: &str) -> Response<Body> {
    let mut r = Response::new(body::full(s.to_string()));
    *r.status_mut() = status;
    r
}

/// A body of `remaining` bytes made on the fly, 64 KiB at a time.
struct Generated {
    remaining: u64,
}

const CHUNK: Bytes = Bytes::from_static(&[b'v'; 64 * 1024]);

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK.len() as u64);
        self.remaining -= n;
        Poll::Ready(Some(Ok(Frame::data(CHUNK.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}

/// One 100-byte frame, then pending for ever (nothing will wake it).
struct Stalled {
    first: bool,
}

impl http_body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if std::mem::take(&mut self.first) {
            return Poll::Ready(Some(Ok(Frame::data(CHUNK.slice(..100)))));
        }
        Poll::Pending
    }
}

pub fn generated(n: u64) -> Body {
    body::stream(Generated { remaining: n })
}
