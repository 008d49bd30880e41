//! Small real clients: HTTP/1.1 and HTTP/2 (clear or TLS) over hyper, and
//! raw bytes over TCP for what a well-behaved client would never send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use varco::body::{self, Body};

pub type Http1 = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

pub fn http1() -> Http1 {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response with its body read to the end.
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub async fn read(resp: Response<hyper::body::Incoming>) -> Got {
    let (parts, b) = resp.into_parts();
    let body = b.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Got {
    send(Request::get(url).body(body::empty()).unwrap()).await
}

/// The value of the first series of metric `name` on varco's admin
/// listener whose line contains `labels` ("" for the unlabelled one).
pub async fn metric(admin: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    get(&format!("http://{admin}/metrics"))
        .await
        .text()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn send(req: Request<Body>) -> Got {
    let resp = http1().request(req).await.expect("request");
    read(resp).await
}

/// An HTTP/2 connection over any IO (clear TCP or TLS).
pub async fn h2_handshake<IO>(io: IO) -> hyper::client::conn::http2::SendRequest<Body>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// TLS to `addr` trusting only `ca_der`, offering the given ALPN protocols;
/// returns the stream and the protocol the server chose.
pub async fn tls_connect(
    addr: SocketAddr,
    ca_der: &[u8],
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Option<Vec<u8>>) {
    tls_connect_after(addr, &[], ca_der, alpn).await
}

/// As `tls_connect`, sending `first` (a load balancer's PROXY header)
/// before the handshake.
pub async fn tls_connect_after(
    addr: SocketAddr,
    first: &[u8],
    ca_der: &[u8],
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Option<Vec<u8>>) {
    let tls = try_tls_connect_as(addr, "localhost", first, ca_der, alpn).await;
    let tls = tls.expect("TLS handshake");
    let proto = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    (tls, proto)
}

/// A TLS handshake with `addr` for `host` (sent by SNI; an IP address is
/// not), trusting only `ca_der`: its error when the server's certificate
/// is not one `ca_der` signed for `host`.
pub async fn try_tls_connect(
    addr: SocketAddr,
    host: &str,
    ca_der: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    try_tls_connect_as(addr, host, &[], ca_der, &[b"http/1.1"]).await
}

async fn try_tls_connect_as(
    addr: SocketAddr,
    host: &str,
    first: &[u8],
    ca_der: &[u8],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    varco::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.to_vec().into()).unwrap();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(first).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    connector.connect(name, tcp).await
}

/// Polls `cond` every 10 ms until it holds, failing after `within`: the
/// readiness signal of something varco does on its own time.
pub async fn until(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends raw bytes and reads until the server closes or `limit` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A PROXY protocol v2 header, as AWS NLB and HAProxy's send-proxy-v2
/// write it: `command` 1 PROXY or 0 LOCAL, then TCP over IPv4 or IPv6.
pub fn proxy_v2(command: u8, source: std::net::SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    let mut addresses = Vec::new();
    match source {
        std::net::SocketAddr::V4(a) => {
            h.push(0x11);
            addresses.extend_from_slice(&a.ip().octets());
            addresses.extend_from_slice(&[10, 0, 0, 1]);
        }
        std::net::SocketAddr::V6(a) => {
            h.push(0x21);
            addresses.extend_from_slice(&a.ip().octets());
            addresses.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    addresses.extend_from_slice(&source.port().to_be_bytes());
    addresses.extend_from_slice(&443u16.to_be_bytes());
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(&addresses);
    h
}

/// `proxy_v2(1, source)` from a balancer that ended the client's TLS and
/// says so, as HAProxy's `send-proxy-v2-ssl`: a PP2_TYPE_SSL TLV with
/// PP2_CLIENT_SSL (after one of AWS's, which varco passes over).
pub fn proxy_v2_tls(source: std::net::SocketAddr) -> Vec<u8> {
    let mut h = proxy_v2(1, source);
    let tlvs: &[u8] = &[
        0xEA, 0, 5, 1, b'v', b'p', b'c', b'e', // PP2_TYPE_AWS
        0x20, 0, 5, 0x01, 0, 0, 0, 0, // PP2_TYPE_SSL: PP2_CLIENT_SSL, verified
    ];
    h.extend_from_slice(tlvs);
    let len = u16::from_be_bytes([h[14], h[15]]) + tlvs.len() as u16;
    h[14..16].copy_from_slice(&len.to_be_bytes());
    h
}
