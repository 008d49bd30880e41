//! TLS termination by rustls with a certificate made in the test, HTTP/2
//! chosen by ALPN, HTTP/1.1 still offered.

mod common;

use common::client::{self, h2_handshake, tls_connect};
use common::{upstream, Varco};
use http::Request;
use varco::body;

struct Pki {
    dir: std::path::PathBuf,
    ca_der: Vec<u8>,
}

fn make_cert(name: &str) -> Pki {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(format!("varco-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_der: cert.der().to_vec(),
    }
}

fn tls_config(up: std::net::SocketAddr) -> String {
    format!(
        "[server]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n[rooms.portal]\nupstreams = [\"http://{up}\"]\n"
    )
}

#[tokio::test]
async fn http2_over_tls_by_alpn() {
    let pki = make_cert("h2");
    let up = upstream::spawn().await;
    let v = Varco::start_in(&tls_config(up.addr), &pki.dir).await;

    let (tls, proto) = tls_connect(v.addr, &pki.ca_der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"h2"[..]));
    let mut h2 = h2_handshake(tls).await;
    for i in 0..3 {
        let req = Request::get(format!("https://localhost:{}/echo?n={i}", v.addr.port()))
            .body(body::empty())
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let j = client::read(resp).await.json();
        assert_eq!(j["uri"], format!("/echo?n={i}"));
        assert_eq!(j["headers"]["x-forwarded-proto"][0], "https");
    }
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// `GET /echo` over HTTP/1.1 on an open TLS connection.
async fn echo_over_http1(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> client::Got {
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/echo")
        .header("host", "localhost")
        .body(body::empty())
        .unwrap();
    client::read(send.send_request(req).await.unwrap()).await
}

#[tokio::test]
async fn http1_over_tls_still_works() {
    let pki = make_cert("h1");
    let up = upstream::spawn().await;
    let v = Varco::start_in(&tls_config(up.addr), &pki.dir).await;
    let (tls, proto) = tls_connect(v.addr, &pki.ca_der, &[b"http/1.1"]).await;
    assert_eq!(proto.as_deref(), Some(&b"http/1.1"[..]));
    let got = echo_over_http1(tls).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-forwarded-proto"][0], "https");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A TCP balancer in front of varco's TLS: its PROXY v2 header comes
/// first, then the client's own handshake, which varco still finishes.
#[tokio::test]
async fn tls_behind_a_balancer_speaking_the_proxy_protocol() {
    let pki = make_cert("proxied");
    let up = upstream::spawn().await;
    let cfg = tls_config(up.addr).replace(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\nproxy_protocol = true\n",
    );
    let v = Varco::start_in(&cfg, &pki.dir).await;
    let header = client::proxy_v2(1, "203.0.113.5:61000".parse().unwrap());
    let (tls, _) = client::tls_connect_after(v.addr, &header, &pki.ca_der, &[b"http/1.1"]).await;
    let got = echo_over_http1(tls).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["headers"]["x-forwarded-for"][0], "203.0.113.5");
    assert_eq!(got.json()["headers"]["x-forwarded-proto"][0], "https");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let pki = make_cert("hs");
    let up = upstream::spawn().await;
    let cfg = tls_config(up.addr).replace(
        "[server]\n",
        "[server]\ntls_handshake_timeout = \"300ms\"\n",
    );
    let v = Varco::start_in(&cfg, &pki.dir).await;
    // Sends nothing at all: the server must close within the timeout.
    let out = client::raw(v.addr, b"", std::time::Duration::from_secs(5)).await;
    assert!(out.is_empty());
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf),
    )
    .await;
    assert!(r.is_ok(), "connection without a handshake kept open");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    let _ = std::fs::remove_dir_all(&pki.dir);
}
