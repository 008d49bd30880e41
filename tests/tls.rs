//! TLS termination by rustls with a certificate made in the test, HTTP/2
//! chosen by ALPN, HTTP/1.1 still offered.

mod common;

use common::client::{self, h2_handshake, tls_connect};
use common::gated::Gated;
use common::{upstream, Varco};
use http::Request;
use varco::body;

struct Pki {
    dir: std::path::PathBuf,
    ca_der: Vec<u8>,
}

fn make_cert(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("varco-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_der = write_cert(&dir, 2040);
    Pki { dir, ca_der }
}

/// A new self-signed certificate for localhost valid until the first of
/// March of `until`, and its key, written to `cert.pem` and `key.pem` in
/// `dir`; returns the certificate (DER) for a client to trust.
fn write_cert(dir: &std::path::Path, until: i32) -> Vec<u8> {
    write_cert_for(dir, "cert", &["localhost"], until)
}

/// As `write_cert`, for `names` (host names, or IP addresses), to
/// `STEM.pem` and `STEM-key.pem` (`cert.pem` and `key.pem` for "cert").
fn write_cert_for(dir: &std::path::Path, stem: &str, names: &[&str], until: i32) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.not_after = rcgen::date_time_ymd(until, 3, 1);
    let cert = params.self_signed(&key).unwrap();
    let key_file = if stem == "cert" {
        "key.pem".to_string()
    } else {
        format!("{stem}-key.pem")
    };
    std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(key_file), key.serialize_pem()).unwrap();
    cert.der().to_vec()
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

type Http1Sender = hyper::client::conn::http1::SendRequest<body::Body>;

/// HTTP/1.1 on an open TLS connection, kept alive between requests.
async fn http1_over(tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Http1Sender {
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// `GET /echo` on a connection `http1_over` opened.
async fn echo(send: &mut Http1Sender) -> client::Got {
    let req = Request::get("/echo")
        .header("host", "localhost")
        .body(body::empty())
        .unwrap();
    client::read(send.send_request(req).await.unwrap()).await
}

/// `GET /echo` over HTTP/1.1 on an open TLS connection.
async fn echo_over_http1(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> client::Got {
    echo(&mut http1_over(tls).await).await
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
    // A client that offers only http/1.0 (`curl --http1.0`) is served,
    // not refused at the handshake.
    let (tls, proto) = tls_connect(v.addr, &pki.ca_der, &[b"http/1.0"]).await;
    assert_eq!(proto.as_deref(), Some(&b"http/1.0"[..]));
    assert_eq!(echo_over_http1(tls).await.status, 200);
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// A client that comes back resumes its TLS session however many came in
/// between (stateless tickets, as nginx issues by default): a click day's
/// phones reconnecting each cost a full handshake when only the last 256
/// sessions (two per connection) were kept.
#[tokio::test]
async fn a_client_that_comes_back_resumes_its_session_after_many_others() {
    let pki = make_cert("resume");
    let up = upstream::spawn().await;
    let v = Varco::start_in(&tls_config(up.addr), &pki.dir).await;
    let client = || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone().into()).unwrap();
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
    };
    // A request read whole: the tickets come after the handshake.
    let visit = async |connector: &tokio_rustls::TlsConnector| {
        let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.expect("handshake");
        let kind = tls.get_ref().1.handshake_kind();
        assert_eq!(echo_over_http1(tls).await.status, 200);
        kind
    };
    varco::tls::install_crypto_provider();
    let ours = client();
    assert_eq!(visit(&ours).await, Some(rustls::HandshakeKind::Full));
    for _ in 0..200 {
        visit(&client()).await;
    }
    assert_eq!(visit(&ours).await, Some(rustls::HandshakeKind::Resumed));
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
    // Both counted, for the operator.
    assert_eq!(
        client::metric(
            v.admin,
            "varco_connections_dropped_total",
            "reason=\"tls_handshake\""
        )
        .await,
        Some(2.0)
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// Certificates are renewed every few weeks (Let's Encrypt, cert-manager):
/// a reload puts the renewed one in force for new connections without
/// closing the open ones, and files that do not make a usable certificate
/// are refused, naming the key, with the one in force kept.
#[tokio::test]
async fn a_reload_puts_a_renewed_certificate_in_force() {
    let first = make_cert("renewed");
    let up = upstream::spawn().await;
    let path = first.dir.join("varco.toml");
    std::fs::write(&path, tls_config(up.addr)).unwrap();
    let g = Gated::start_file(&path).await;
    let (tls, _) = tls_connect(g.addr, &first.ca_der, &[b"http/1.1"]).await;
    let mut open = http1_over(tls).await;
    assert_eq!(echo(&mut open).await.status, 200);
    let expiry = || {
        client::metric(
            g.admin,
            "varco_tls_certificate_expiry_timestamp_seconds",
            "",
        )
    };
    let march = |y| rcgen::date_time_ymd(y, 3, 1).unix_timestamp() as f64;
    assert_eq!(expiry().await, Some(march(2040)));
    let plain = Varco::start(&common::room_config(&[up.addr], "")).await;
    assert_eq!(
        client::metric(
            plain.admin,
            "varco_tls_certificate_expiry_timestamp_seconds",
            ""
        )
        .await,
        None,
        "a varco without TLS has no certificate to expire"
    );

    let renewed = write_cert(&first.dir, 2041);
    g.app.reload().await.expect("reload");
    assert_eq!(expiry().await, Some(march(2041)));
    assert!(
        client::try_tls_connect(g.addr, "localhost", &first.ca_der)
            .await
            .is_err(),
        "a new connection still got the old certificate"
    );
    let (tls, _) = tls_connect(g.addr, &renewed, &[b"http/1.1"]).await;
    assert_eq!(echo_over_http1(tls).await.status, 200);
    assert_eq!(
        echo(&mut open).await.status,
        200,
        "the connection opened before the reload was kept"
    );

    // Not PEM at all; then a key that belongs to another certificate.
    let cert = first.dir.join("cert.pem");
    let good = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, "renewal went wrong\n").unwrap();
    let err = g
        .app
        .reload()
        .await
        .expect_err("a file without a certificate");
    assert!(err.to_string().contains("server.tls.cert"), "{err}");
    let other = make_cert("renewed-other");
    std::fs::write(&cert, good).unwrap();
    std::fs::copy(other.dir.join("key.pem"), first.dir.join("key.pem")).unwrap();
    let err = g
        .app
        .reload()
        .await
        .expect_err("a key of another certificate");
    assert!(
        err.to_string()
            .contains("server.tls: certificate and key do not fit"),
        "{err}"
    );
    let (tls, _) = tls_connect(g.addr, &renewed, &[b"http/1.1"]).await;
    assert_eq!(
        echo_over_http1(tls).await.status,
        200,
        "the certificate in force stayed after the refused reloads"
    );
    assert_eq!(expiry().await, Some(march(2041)));
    let _ = std::fs::remove_dir_all(&first.dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}

/// One varco in front of several portals with a certificate each: the
/// host the client asks for (SNI) chooses, exactly first, then by a
/// wildcard; a client naming no host gets the first.
#[tokio::test]
async fn the_host_the_client_asks_for_chooses_the_certificate() {
    let pki = make_cert("sni");
    let fallback = write_cert_for(&pki.dir, "default", &["localhost", "127.0.0.1"], 2040);
    let pension = write_cert_for(&pki.dir, "pension", &["pensioni.example.it"], 2041);
    let bonus = write_cert_for(&pki.dir, "bonus", &["*.bonus.example.it"], 2042);
    let up = upstream::spawn().await;
    let cfg = format!(
        "[server]\ntls = [{{ cert = \"default.pem\", key = \"default-key.pem\" }}, {{ cert = \"pension.pem\", key = \"pension-key.pem\" }}, {{ cert = \"bonus.pem\", key = \"bonus-key.pem\" }}]\n{}",
        common::room_config(&[up.addr], "")
    );
    let path = pki.dir.join("varco.toml");
    std::fs::write(&path, &cfg).unwrap();
    let v = Gated::start_file(&path).await;
    for (host, ca) in [
        ("pensioni.example.it", &pension),
        ("www.bonus.example.it", &bonus),
        ("localhost", &fallback),
        ("127.0.0.1", &fallback),
    ] {
        let tls = client::try_tls_connect(v.addr, host, ca)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(echo_over_http1(tls).await.status, 200, "{host}");
    }
    let series = || async {
        let metrics = client::get(&format!("http://{}/metrics", v.admin))
            .await
            .text();
        metrics
            .lines()
            .filter(|l| l.starts_with("varco_tls_certificate_expiry_timestamp_seconds{"))
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(series().await.len(), 3, "{:?}", series().await);

    // A reload that drops a certificate drops its host and its series.
    let fewer = cfg.replace(", { cert = \"bonus.pem\", key = \"bonus-key.pem\" }", "");
    assert_ne!(fewer, cfg);
    std::fs::write(&path, &fewer).unwrap();
    v.app.reload().await.expect("reload");
    assert!(
        client::try_tls_connect(v.addr, "www.bonus.example.it", &bonus)
            .await
            .is_err(),
        "the certificate the reload dropped is still presented"
    );
    let left = series().await;
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.iter().any(|l| l.contains("bonus.pem")), "{left:?}");

    // A certificate after the first that names no host could never be
    // chosen: refused, naming it.
    write_cert_for(&pki.dir, "bare", &["192.0.2.1"], 2040);
    let bad = cfg
        .replace("bonus.pem", "bare.pem")
        .replace("bonus-key", "bare-key");
    let err = varco::config::Config::from_toml(&bad, &pki.dir)
        .expect_err("a certificate nobody can be given")
        .to_string();
    assert!(
        err.contains("server.tls[2].cert") && err.contains("names no DNS host"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&pki.dir);
}
