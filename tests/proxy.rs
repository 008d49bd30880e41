//! The proxy path end to end: real varco, real upstreams.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::client::{self, get, send};
use common::{dead_addr, room_config, upstream, Varco};
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use varco::body;

#[tokio::test]
async fn get_and_post_reach_the_upstream_with_path_query_and_body() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;

    let got = get(&v.url("/some/path?x=1&y=2")).await;
    assert_eq!(got.status, 200);
    let j = got.json();
    assert_eq!(j["method"], "GET");
    assert_eq!(j["uri"], "/some/path?x=1&y=2");

    let req = Request::post(v.url("/form"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body::full("name=Maria&iban=IT60X0542811101000000123456"))
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, 200);
    let j = got.json();
    assert_eq!(j["method"], "POST");
    assert_eq!(j["body"], "name=Maria&iban=IT60X0542811101000000123456");
    assert_eq!(up.hits(), 2);
}

/// A portal answer with more header fields than hyper's default 100 (a
/// page setting many cookies) reaches the client whole, and the upstream
/// stays in rotation.
#[tokio::test]
async fn an_answer_with_many_header_fields_is_passed_on() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    // Read raw: hyper's client has the same limit of 100.
    let answer = common::client::raw(
        v.addr,
        b"GET /many-headers HTTP/1.1\r\nHost: portal\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-many-149: 1"), "{answer}");
    assert_eq!(up.hits(), 1, "not retried");
}

/// HTTP/1.1 requires a Host (RFC 9112 3.2): one without is refused with a
/// 400, as nginx does, rather than routed as host "" (an HTTP/1.0 request
/// may go without).
#[tokio::test]
async fn an_http11_request_without_host_is_a_400() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let answer = common::client::raw(
        v.addr,
        b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = common::client::raw(
        v.addr,
        b"GET /echo HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(!answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(up.hits(), 1, "only the HTTP/1.0 one reached the portal");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;

    let req = Request::get(v.url("/echo"))
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "must-go")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-end-to-end", "stays")
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    let h = &j["headers"];
    for gone in [
        "x-client-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    assert_eq!(h["x-end-to-end"][0], "stays");
    assert_eq!(h["te"][0], "trailers", "TE: trailers is end to end");

    let got = get(&v.url("/hop")).await;
    assert!(got.headers.get("x-up-hop").is_none(), "{:?}", got.headers);
    assert!(got.headers.get("keep-alive").is_none());
    assert!(got.headers.get("proxy-authenticate").is_none());
    let cookies: Vec<_> = got.headers.get_all("set-cookie").iter().collect();
    assert_eq!(
        cookies,
        ["a=1; Path=/", "b=2; Path=/; HttpOnly"],
        "Set-Cookie passes intact"
    );
}

/// Trailers reach a client that asks for them, over HTTP/1.1 as over
/// HTTP/2, without the fields that may not follow a body (RFC 9110 6.5.1)
/// nor varco's own release, which only a head carries: passed on, it
/// would say the session ended when it goes on.
#[tokio::test]
async fn trailers_pass_filtered_to_a_client_that_asks() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let answer = common::client::raw(
        v.addr,
        b"GET /trailers HTTP/1.1\r\nHost: portal\r\nTE: trailers\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await
    .to_ascii_lowercase();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.contains("\r\ntrailer: x-checksum\r\n"), "{head}");
    assert!(body.ends_with("0\r\nx-checksum: abc\r\n\r\n"), "{body:?}");

    let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = client::h2_handshake(tcp).await;
    let req = Request::get(format!("http://portal:{}/trailers", v.addr.port()))
        .header("te", "trailers")
        .body(body::empty())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["trailer"], "x-checksum");
    let collected = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    let trailers = collected.trailers().cloned().expect("trailers over HTTP/2");
    assert_eq!(collected.to_bytes(), "body");
    let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["x-checksum"], "{trailers:?}");
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_client_are_replaced() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let req = Request::get(v.url("/echo"))
        .header("host", "portal.example.org")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("true-client-ip", "6.6.6.6")
        .header("x-forwarded-ssl", "on")
        .header("x-forwarded-port", "443")
        .header("x-forwarded-prefix", "/admin")
        .header("x_real_ip", "6.6.6.6")
        .header("x_forwarded_for", "6.6.6.6")
        .header("proxy", "http://6.6.6.6:3128")
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    let h = &j["headers"];
    assert_eq!(h["x-forwarded-for"], serde_json::json!(["127.0.0.1"]));
    for forged in [
        "proxy",
        "x-real-ip",
        "true-client-ip",
        "x-forwarded-ssl",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x_real_ip",
        "x_forwarded_for",
    ] {
        assert!(h.get(forged).is_none(), "{forged} passed through");
    }
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["http"]));
    assert_eq!(
        h["x-forwarded-host"],
        serde_json::json!(["portal.example.org"])
    );
    assert!(h.get("forwarded").is_none());
    assert_eq!(
        h["host"],
        serde_json::json!(["portal.example.org"]),
        "Host preserved by default"
    );
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_proxy_are_extended() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]",
    ))
    .await;
    let req = Request::get(v.url("/echo"))
        .header("host", "portal.example.org")
        // The balancer appended the client's address to what the client
        // wrote (6.6.6.6).
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
        .header("x-forwarded-proto", "https")
        .header("x-real-ip", "198.51.100.7")
        // The client's own, passed on: its HTTP_PROXY would be anyone's.
        .header("proxy", "http://6.6.6.6:3128")
        .header("forwarded", "for=6.6.6.6")
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    let h = &j["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        serde_json::json!(["6.6.6.6, 198.51.100.7, 127.0.0.1"])
    );
    assert!(h.get("proxy").is_none(), "httpoxy");
    assert_eq!(
        h["forwarded"],
        serde_json::json!([
            "for=198.51.100.7;proto=https;host=\"portal.example.org\", for=127.0.0.1"
        ]),
        "the portal reads the address varco read first, in either header"
    );
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(
        h["x-real-ip"],
        serde_json::json!(["198.51.100.7"]),
        "a trusted proxy's own X-Real-IP is kept"
    );

    // A client's `Connection`, passed on by the balancer, naming the
    // headers it says the client in: as hop-by-hop, they would go, and
    // the portal would read the balancer as the client.
    let req = Request::get(v.url("/echo"))
        .header(
            "connection",
            "keep-alive, X-Forwarded-For, x-real-ip, forwarded, x-forwarded-proto, cf-connecting-ip",
        )
        .header("cf-connecting-ip", "198.51.100.7")
        .header("x-forwarded-for", "198.51.100.7")
        .header("x-forwarded-proto", "https")
        .header("x-real-ip", "198.51.100.7")
        .header("forwarded", "for=198.51.100.7;proto=https")
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    let h = &j["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        serde_json::json!(["198.51.100.7, 127.0.0.1"]),
        "{h}"
    );
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(h["x-real-ip"], serde_json::json!(["198.51.100.7"]));
    assert_eq!(h["cf-connecting-ip"], serde_json::json!(["198.51.100.7"]));
    assert!(
        h["forwarded"][0]
            .as_str()
            .is_some_and(|f| f.starts_with("for=198.51.100.7;proto=https")),
        "{h}"
    );
}

/// A balancer that writes `Forwarded` and passes the client's own
/// `X-Forwarded-For` on (HAProxy's `option forwarded`): by default varco
/// reads `X-Forwarded-For` first, and a client naming a bypass range there
/// skips a closed room. With `client_address_header = "forwarded"` only
/// the balancer's word counts, and the portal gets it, not the client's.
#[tokio::test]
async fn client_address_header_forwarded_reads_only_the_balancers_word() {
    let up = upstream::spawn().await;
    let config = |header: &str| {
        format!(
            "[secrets]\nephemeral = true\n[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n{header}\n\
             [rooms.portal]\nupstreams = [\"http://{}\"]\nmode = \"closed\"\n\
             bypass = {{ cidrs = [\"10.0.0.0/8\"] }}\n",
            up.addr
        )
    };
    let ask = |v: &Varco, client: &str| {
        Request::get(v.url("/echo"))
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-proto", "http")
            .header("forwarded", format!("for={client};proto=https"))
            .body(body::empty())
            .unwrap()
    };
    let default = Varco::start(&config("")).await;
    assert_eq!(
        send(ask(&default, "198.51.100.7")).await.status,
        200,
        "by default the client's X-Forwarded-For is read, as documented"
    );
    let v = Varco::start(&config("client_address_header = \"forwarded\"")).await;
    assert_eq!(
        send(ask(&v, "198.51.100.7")).await.status,
        503,
        "the room is closed to 198.51.100.7, whatever its X-Forwarded-For says"
    );
    let got = send(ask(&v, "10.0.0.9")).await;
    assert_eq!(got.status, 200, "the balancer names an operator");
    let h = &got.json()["headers"];
    assert_eq!(
        h["x-forwarded-for"],
        serde_json::json!(["10.0.0.9, 127.0.0.1"])
    );
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
}

/// A balancer passes the client's own `X-Forwarded-Host` and `Forwarded:
/// host=` on: the portal must not read a host varco did not route and gate
/// by (another room's, past this one's line). A balancer that sends only
/// `Forwarded` (HAProxy's `option forwarded`) has its scheme and client
/// said in the X-Forwarded-* headers too, as varco read them.
#[tokio::test]
async fn the_portal_reads_the_host_and_scheme_varco_read() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]",
    ))
    .await;
    let req = Request::get(v.url("/echo"))
        .header("x-forwarded-host", "bonus.example.org")
        .header(
            "forwarded",
            "for=198.51.100.7;proto=https;host=bonus.example.org",
        )
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    let h = &j["headers"];
    let host = h["host"][0].as_str().unwrap().to_string();
    assert_eq!(h["x-forwarded-host"], serde_json::json!([host.clone()]));
    assert_eq!(h["x-forwarded-proto"], serde_json::json!(["https"]));
    assert_eq!(
        h["x-forwarded-for"],
        serde_json::json!(["198.51.100.7, 127.0.0.1"])
    );
    assert_eq!(
        h["forwarded"],
        serde_json::json!([format!(
            "for=198.51.100.7;proto=https;host=\"{host}\", for=127.0.0.1"
        )])
    );
}

/// Every request for the portal gets an ID, sent there and back to the
/// client (one varco made, for a client's own could be anyone's), on
/// varco's error page for it too, in the page's text and its JSON as a
/// reference for a help desk; a trusted proxy's ID is kept, unless
/// `request_id_from_proxies = false`; `request_id = false` leaves the
/// header alone.
#[tokio::test]
async fn every_request_gets_an_id_for_the_portal_and_the_client() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let with_id = |url: String, id: &str| {
        Request::get(url)
            .header("x-request-id", id)
            .body(body::empty())
            .unwrap()
    };
    let got = send(with_id(v.url("/echo"), "forged-by-the-client")).await;
    let id = got.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(
        got.json()["headers"]["x-request-id"],
        serde_json::json!([id]),
        "the portal gets the same ID, and only that"
    );
    let next = get(&v.url("/echo")).await;
    assert_ne!(next.headers["x-request-id"], id.as_str());
    // Named in Connection, the client's header goes; varco's still comes.
    let mut named_hop_by_hop = with_id(v.url("/echo"), "forged-by-the-client");
    named_hop_by_hop
        .headers_mut()
        .insert("connection", "x-request-id".parse().unwrap());
    let hop = send(named_hop_by_hop).await;
    assert_eq!(
        hop.json()["headers"]["x-request-id"],
        serde_json::json!([hop.headers["x-request-id"].to_str().unwrap()])
    );
    let named = get(&v.url("/own-request-id")).await;
    assert_eq!(
        named.headers["x-request-id"], "portal-7",
        "the portal's own stays"
    );
    let own = get(&v.url("/.varco/nothing-here")).await;
    assert_eq!(own.status, 404);
    assert!(
        own.headers.get("x-request-id").is_none(),
        "not for the portal"
    );
    let gated = Varco::start(
        &(room_config(&[up.addr], "[secrets]\nephemeral = true")
            + "mode = \"queue_all\"\nadmission_per_minute = 1\n"),
    )
    .await;
    let page = get(&gated.url("/echo")).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("varco"), "the waiting page");
    assert!(
        page.headers.get("x-request-id").is_none(),
        "the gate's own answer"
    );
    let down = Varco::start(&room_config(&[common::dead_addr()], "")).await;
    let failed = get(&down.url("/echo")).await;
    assert_eq!(failed.status, 502);
    let reference = failed.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(reference.len(), 32);
    assert!(
        failed
            .text()
            .contains(&format!("di riferimento: <code>{reference}</code>")),
        "the page gives the reader the same ID: {}",
        failed.text()
    );
    let failed_json = send(
        Request::get(down.url("/echo"))
            .header("accept", "application/json")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        failed_json.json()["request_id"].as_str(),
        failed_json.headers["x-request-id"].to_str().ok()
    );

    let behind = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]",
    ))
    .await;
    let got = send(with_id(behind.url("/echo"), "lb-7f3a-0001")).await;
    assert_eq!(got.headers["x-request-id"], "lb-7f3a-0001");
    assert_eq!(
        got.json()["headers"]["x-request-id"],
        serde_json::json!(["lb-7f3a-0001"])
    );

    // A balancer that passes the client's header on as it came: its IDs
    // are the client's, and are replaced.
    let passing = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\nrequest_id_from_proxies = false",
    ))
    .await;
    let got = send(with_id(passing.url("/echo"), "forged-behind-the-lb")).await;
    let id = got.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");
    assert_eq!(
        got.json()["headers"]["x-request-id"],
        serde_json::json!([id])
    );

    let off = Varco::start(&room_config(&[up.addr], "[server]\nrequest_id = false")).await;
    let got = send(with_id(off.url("/echo"), "the-clients-own")).await;
    assert!(got.headers.get("x-request-id").is_none());
    assert_eq!(
        got.json()["headers"]["x-request-id"],
        serde_json::json!(["the-clients-own"])
    );
}

/// varco behind a PROXY-protocol balancer on 127.0.0.0/8 (`server`: more
/// `[server]` keys), with a key of its own, for one room over `up` with
/// the keys `room`.
async fn behind_a_proxy_balancer(up: std::net::SocketAddr, server: &str, room: &str) -> Varco {
    Varco::start(
        &(room_config(
            &[up],
            &format!(
                "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true\n\
                 {server}[secrets]\nephemeral = true"
            ),
        ) + room),
    )
    .await
}

/// Behind a TCP load balancer that speaks the PROXY protocol, the client
/// is the one its header names (v1 or v2), for the forwarded headers as
/// for every per-address rule; its own checks (LOCAL) are its own; a
/// connection without the header, or from a peer not in trusted_proxies,
/// is closed unanswered.
/// Behind a balancer that ends TLS and says so in its PROXY header
/// (HAProxy `send-proxy-v2-ssl`), a pass is a Secure cookie, as under
/// varco's own TLS; without the TLV it is not (the bytes came in clear).
#[tokio::test]
async fn a_balancer_that_ended_tls_gets_secure_cookies() {
    use common::client::{proxy_v2, proxy_v2_tls, raw};
    use std::time::Duration;
    let up = upstream::spawn().await;
    let v = behind_a_proxy_balancer(up.addr, "", "max_active = 5\n").await;
    let pass = |header: Vec<u8>| async move {
        let mut bytes = header;
        bytes.extend_from_slice(b"GET /echo HTTP/1.1\r\nhost: portal\r\nconnection: close\r\n\r\n");
        let got = raw(v.addr, &bytes, Duration::from_secs(5)).await;
        got.lines()
            .find(|l| {
                l.to_ascii_lowercase()
                    .starts_with("set-cookie: __host-varco_pass_portal=")
                    || l.to_ascii_lowercase()
                        .starts_with("set-cookie: varco_pass_portal=")
            })
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no pass: {got}"))
    };
    let secure = pass(proxy_v2_tls("198.51.100.7:40000".parse().unwrap())).await;
    assert!(secure.ends_with("; Secure"), "{secure}");
    let clear = pass(proxy_v2(1, "198.51.100.8:40000".parse().unwrap())).await;
    assert!(!clear.contains("Secure"), "{clear}");
    drop(v);

    // A balancer that ends TLS without saying so (an AWS NLB TLS
    // listener): the operator says it.
    let v = behind_a_proxy_balancer(up.addr, "assume_https = true\n", "max_active = 5\n").await;
    let mut bytes = proxy_v2(1, "198.51.100.9:40000".parse().unwrap());
    bytes.extend_from_slice(b"GET /echo HTTP/1.1\r\nhost: portal\r\nconnection: close\r\n\r\n");
    let got = raw(v.addr, &bytes, Duration::from_secs(5)).await;
    assert!(got.contains("\"x-forwarded-proto\":[\"https\"]"), "{got}");
    assert!(
        got.lines()
            .any(|l| l.starts_with("set-cookie: __Host-varco_pass_portal=")
                && l.ends_with("; Secure")),
        "{got}"
    );
}

/// A connection a PROXY header left unnamed matches no `bypass` range,
/// though its address, the balancer's, is in it: its bytes are anyone's.
/// A named client in the range is let through.
#[tokio::test]
async fn an_unnamed_client_matches_no_bypass_range() {
    use common::client::{proxy_v2, raw};
    use std::time::Duration;
    let up = upstream::spawn().await;
    let v = behind_a_proxy_balancer(
        up.addr,
        "",
        "mode = \"queue_all\"\nmax_active = 5\nbypass = { cidrs = [\"127.0.0.0/8\"] }\n",
    )
    .await;
    let ask = |header: Vec<u8>| async move {
        let mut bytes = header;
        bytes.extend_from_slice(b"GET /echo HTTP/1.1\r\nhost: portal\r\nconnection: close\r\n\r\n");
        raw(v.addr, &bytes, Duration::from_secs(5)).await
    };
    let named = ask(b"PROXY TCP4 127.0.0.5 10.0.0.1 50123 443\r\n".to_vec()).await;
    assert!(named.contains("\"upstream\""), "{named}");
    for header in [
        b"PROXY UNKNOWN\r\n".to_vec(),
        proxy_v2(0, "198.51.100.9:1".parse().unwrap()),
    ] {
        let got = ask(header).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(!got.contains("\"upstream\""), "let past the line: {got}");
    }
}

#[tokio::test]
async fn the_client_is_the_one_a_balancers_proxy_header_names() {
    use common::client::{proxy_v2, raw};
    use std::time::Duration;
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true",
    ))
    .await;
    let request = b"GET /echo HTTP/1.1\r\nhost: portal\r\nconnection: close\r\n\r\n";
    let forwarded_for = |header: &[u8]| {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(request);
        async move {
            let got = raw(v.addr, &bytes, Duration::from_secs(5)).await;
            let body = got.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
            let j: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
            j["headers"]["x-forwarded-for"][0]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("no answer: {got:?}"))
        }
    };
    assert_eq!(
        forwarded_for(b"PROXY TCP4 198.51.100.7 10.0.0.1 50123 443\r\n").await,
        "198.51.100.7"
    );
    assert_eq!(
        forwarded_for(b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 443\r\n").await,
        "2001:db8::7"
    );
    assert_eq!(
        forwarded_for(&proxy_v2(1, "198.51.100.8:40000".parse().unwrap())).await,
        "198.51.100.8"
    );
    assert_eq!(
        forwarded_for(&proxy_v2(1, "[2001:db8::8]:40000".parse().unwrap())).await,
        "2001:db8::8"
    );
    assert_eq!(
        forwarded_for(&proxy_v2(0, "198.51.100.9:1".parse().unwrap())).await,
        "127.0.0.1",
        "LOCAL: the balancer's own check"
    );
    assert_eq!(forwarded_for(b"PROXY UNKNOWN\r\n").await, "127.0.0.1");
    // A client that sends its own X-Forwarded-For names nobody: the
    // header's client is not a trusted proxy.
    let mut forged = b"PROXY TCP4 198.51.100.7 10.0.0.1 50123 443\r\n".to_vec();
    forged.extend_from_slice(
        b"GET /echo HTTP/1.1\r\nhost: portal\r\nx-forwarded-for: 10.9.9.9\r\nconnection: close\r\n\r\n",
    );
    let got = raw(v.addr, &forged, Duration::from_secs(5)).await;
    assert!(
        got.contains("\"x-forwarded-for\":[\"198.51.100.7\"]"),
        "{got}"
    );
    // Nor when the header named no client: the balancer stands in for
    // someone unknown, whose bytes (and forwarded headers) it passed on
    // as they came.
    for header in [
        b"PROXY UNKNOWN\r\n".to_vec(),
        proxy_v2(0, "198.51.100.9:1".parse().unwrap()),
    ] {
        let mut forged = header;
        forged.extend_from_slice(
            b"GET /echo HTTP/1.1\r\nhost: portal\r\nx-forwarded-for: 10.9.9.9\r\n\
              x-forwarded-proto: https\r\nconnection: close\r\n\r\n",
        );
        let got = raw(v.addr, &forged, Duration::from_secs(5)).await;
        assert!(got.contains("\"x-forwarded-for\":[\"127.0.0.1\"]"), "{got}");
        assert!(got.contains("\"x-forwarded-proto\":[\"http\"]"), "{got}");
    }
    // A balancer that ended the client's TLS and says so: HTTPS for the
    // portal. Without that TLV it stays http (above).
    let mut ended = common::client::proxy_v2_tls("198.51.100.10:40000".parse().unwrap());
    ended.extend_from_slice(request);
    let got = raw(v.addr, &ended, Duration::from_secs(5)).await;
    assert!(
        got.contains("\"x-forwarded-for\":[\"198.51.100.10\"]"),
        "{got}"
    );
    assert!(got.contains("\"x-forwarded-proto\":[\"https\"]"), "{got}");
    // No header, or a broken one: closed, nothing answered.
    assert_eq!(raw(v.addr, request, Duration::from_secs(5)).await, "");
    let mut broken = b"PROXY TCP4 nonsense\r\n".to_vec();
    broken.extend_from_slice(request);
    assert_eq!(raw(v.addr, &broken, Duration::from_secs(5)).await, "");
    let hits = up.hits();
    assert_eq!(hits, 10, "only the connections with a header were served");
    drop(v);

    // The per-address connection cap counts the named client, not the
    // balancer (which is exempt).
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true\nmax_connections_per_ip = 1",
    ))
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    held.write_all(
        b"PROXY TCP4 198.51.100.7 10.0.0.1 50123 443\r\nGET /echo HTTP/1.1\r\nhost: portal\r\n\r\n",
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    held.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200", "the first connection is served");
    let mut again = b"PROXY TCP4 198.51.100.7 10.0.0.1 50124 443\r\n".to_vec();
    again.extend_from_slice(request);
    assert_eq!(
        raw(v.addr, &again, Duration::from_secs(5)).await,
        "",
        "a second at once from the same client is over its share"
    );
    let mut other = b"PROXY TCP4 198.51.100.77 10.0.0.1 50124 443\r\n".to_vec();
    other.extend_from_slice(request);
    assert!(raw(v.addr, &other, Duration::from_secs(5))
        .await
        .starts_with("HTTP/1.1 200"));
    drop((held, v));
    let hits = up.hits();

    // Only the balancers may name a client.
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\nproxy_protocol = true",
    ))
    .await;
    let mut bytes = b"PROXY TCP4 198.51.100.7 10.0.0.1 50123 443\r\n".to_vec();
    bytes.extend_from_slice(request);
    assert_eq!(raw(v.addr, &bytes, Duration::from_secs(5)).await, "");
    assert_eq!(up.hits(), hits);
    // Counted: a balancer left out of trusted_proxies shows there.
    assert_eq!(
        common::client::metric(
            v.admin,
            "varco_connections_dropped_total",
            "reason=\"proxy_header\""
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn host_is_the_upstreams_own_when_not_preserved() {
    let up = upstream::spawn().await;
    let toml = format!(
        "[rooms.portal]\nupstreams = [\"http://{}\"]\npreserve_host = false\n",
        up.addr
    );
    let v = Varco::start(&toml).await;
    let req = Request::get(v.url("/echo"))
        .header("host", "portal.example.org")
        .body(body::empty())
        .unwrap();
    let j = send(req).await.json();
    assert_eq!(
        j["headers"]["host"],
        serde_json::json!([up.addr.to_string()])
    );
}

#[tokio::test]
async fn round_robin_and_a_dead_upstream_is_skipped() {
    let a = upstream::spawn().await;
    let b = upstream::spawn().await;
    let dead = dead_addr();
    let v = Varco::start(&room_config(&[a.addr, dead, b.addr], "")).await;
    for _ in 0..12 {
        let got = get(&v.url("/echo")).await;
        assert_eq!(
            got.status,
            200,
            "a GET is retried on the next upstream: {}",
            got.text()
        );
    }
    assert!(
        a.hits() >= 4 && b.hits() >= 4,
        "a={} b={}",
        a.hits(),
        b.hits()
    );
    assert_eq!(a.hits() + b.hits(), 12);
}

/// Weighted upstreams (nginx's `weight`): a server of three times the
/// others' strength takes three turns to their one, spread out.
#[tokio::test]
async fn a_heavier_upstream_takes_its_weight_in_requests() {
    let big = upstream::spawn().await;
    let small = upstream::spawn().await;
    let toml = format!(
        "[rooms.portal]\nupstreams = [{{ url = \"http://{}\", weight = 3 }}, \"http://{}\"]\n",
        big.addr, small.addr
    );
    let (g, _path) = common::gated::Gated::start_written("weights", &toml).await;
    let mut order = Vec::new();
    for _ in 0..40 {
        let got = get(&format!("http://{}/echo", g.addr)).await;
        assert_eq!(got.status, 200);
        order.push(got.json()["upstream"].as_str().unwrap().to_string());
    }
    assert_eq!((big.hits(), small.hits()), (30, 10));
    let (b, s) = (big.addr.to_string(), small.addr.to_string());
    assert_eq!(
        order[..4],
        [b.clone(), b.clone(), s, b],
        "spread out, not three in a row"
    );
    let state = varco::admin::room_state(&g.app.room("portal").unwrap());
    assert_eq!(state["upstreams"][0]["weight"], 3);
    assert_eq!(state["upstreams"][1]["weight"], 1);
    let of = format!("room=\"portal\",upstream=\"{}\"", big.addr);
    assert_eq!(
        client::metric(g.admin, "varco_upstream_weight", &of).await,
        Some(3.0)
    );
}

/// An upstream that accepts connections but never answers (hung, or
/// stopped with SIGSTOP) is cooled down after its first timeout, as one
/// that refuses is: it no longer costs every other request a 504.
#[tokio::test]
async fn an_upstream_that_never_answers_is_cooled_down() {
    let good = upstream::spawn().await;
    // Accepts (the kernel's backlog) and never reads or answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let v = Varco::start(&room_config(
        &[hung.local_addr().unwrap(), good.addr],
        "[upstream]\nresponse_timeout = \"300ms\"\nfail_cooldown = \"1h\"",
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(get(&v.url("/echo")).await.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 504).count(),
        1,
        "only the first request sent to the hung upstream waited: {statuses:?}"
    );
    assert_eq!(good.hits(), 7);
}

/// `max_fails`: an upstream is cooled down at its third failed request
/// (as nginx's `max_fails=3`), and never with 0 (the health checks alone
/// take it out then).
#[tokio::test]
async fn max_fails_failed_requests_cool_an_upstream_down() {
    let good = upstream::spawn().await;
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let timeouts = |max_fails: u32| {
        let config = room_config(
            &[hung.local_addr().unwrap(), good.addr],
            &format!(
                "[upstream]\nresponse_timeout = \"500ms\"\nfail_cooldown = \"1h\"\nmax_fails = {max_fails}"
            ),
        );
        async move {
            let v = Varco::start(&config).await;
            let mut statuses = Vec::new();
            for _ in 0..12 {
                statuses.push(get(&v.url("/echo")).await.status);
            }
            statuses.iter().filter(|s| **s == 504).count()
        }
    };
    // Round robin: requests 1, 3 and 5 go to the hung upstream, then none.
    assert_eq!(timeouts(3).await, 3, "cooled down at the third failure");
    assert_eq!(timeouts(0).await, 6, "every other request, for ever");
}

/// An upstream that answers the first request on each connection and
/// closes it, unanswered, at the next: as a portal whose keep-alive
/// timeout ends just as varco sends a request on the idle connection.
/// Counts the requests it answered and those it closed on.
struct ClosesKeptAlive {
    addr: std::net::SocketAddr,
    answered: Arc<AtomicUsize>,
    closed_on: Arc<AtomicUsize>,
}

async fn closes_kept_alive() -> ClosesKeptAlive {
    answers_then(b"").await
}

/// As [`closes_kept_alive`], writing `second` before it closes.
async fn answers_then(second: &'static [u8]) -> ClosesKeptAlive {
    answers_then_after(second, Duration::ZERO).await
}

/// As [`answers_then`], holding the second request for `hold` first (a
/// portal working on it whose worker is then killed).
async fn answers_then_after(second: &'static [u8], hold: Duration) -> ClosesKeptAlive {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = ClosesKeptAlive {
        addr: l.local_addr().unwrap(),
        answered: Arc::default(),
        closed_on: Arc::default(),
    };
    let (answered, closed_on) = (up.answered.clone(), up.closed_on.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (answered, closed_on) = (answered.clone(), closed_on.clone());
            tokio::spawn(async move {
                // Bodyless requests only: a head is a request.
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                // Counted before it goes: whoever reads the answer sees it.
                answered.fetch_add(1, Ordering::SeqCst);
                let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
                if read_request_head(&mut s).await.is_some() {
                    tokio::time::sleep(hold).await;
                    closed_on.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(second).await;
                }
            });
        }
    });
    up
}

/// A request that is safe to send twice and meets a kept-alive connection
/// the portal closes as it goes out is sent again on another connection:
/// the person gets the answer, not a 502, and the upstream is not counted
/// as failing (nginx tries another connection too). A POST is never sent
/// twice: the portal may have acted on it.
#[tokio::test]
async fn a_get_that_meets_a_closed_kept_alive_connection_goes_again() {
    let up = closes_kept_alive().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 1",
    ))
    .await;
    // The idle connection goes back to the pool as the answer ends: a few
    // tries make sure one request meets it.
    for _ in 0..20 {
        let got = get(&v.url("/again")).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.text(), "ok");
        if up.closed_on.load(Ordering::SeqCst) >= 2 {
            break;
        }
    }
    let closed = up.closed_on.load(Ordering::SeqCst);
    assert!(closed >= 2, "no request met a kept-alive connection");
    let of = "room=\"portal\"";
    assert_eq!(
        client::metric(v.admin, "varco_upstream_closed_idle_total", of).await,
        Some(closed as f64)
    );
    for kind in ["connect", "timeout", "protocol"] {
        let of = format!("kind=\"{kind}\",room=\"portal\"");
        assert_eq!(
            client::metric(v.admin, "varco_upstream_errors_total", &of).await,
            Some(0.0),
            "no {kind} failure counted"
        );
    }
    assert_eq!(
        client::metric(v.admin, "varco_upstream_up", of).await,
        Some(1.0)
    );

    let post = || send(Request::post(v.url("/submit")).body(body::empty()).unwrap());
    let mut statuses = Vec::new();
    loop {
        let (seen, before) = (up.answered.load(Ordering::SeqCst), closed_on(&up));
        let status = post().await.status;
        statuses.push(status);
        if closed_on(&up) > before {
            assert_eq!(status, 502, "a POST on a closed connection: {statuses:?}");
            assert_eq!(
                up.answered.load(Ordering::SeqCst),
                seen,
                "the POST was not sent again"
            );
            assert_eq!(
                client::metric(v.admin, "varco_upstream_up", of).await,
                Some(1.0),
                "nor the upstream cooled down for it"
            );
            break;
        }
        assert_eq!(status, 200);
        assert!(statuses.len() < 20, "no POST met a kept-alive connection");
    }
}

/// A kept-alive connection the portal drops after holding the request a
/// while (a worker killed at its timeout, a server's write timeout) is no
/// keep-alive race, which fails as the request goes out: sent again, the
/// same slow request would run up to four times. It is the upstream's
/// failure, counted.
#[tokio::test]
async fn a_connection_dropped_after_holding_the_request_is_not_the_race() {
    let up = answers_then_after(b"", Duration::from_secs(1)).await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 1",
    ))
    .await;
    let statuses = until_one_meets_a_kept_alive_connection(&v, &up, "/report").await;
    assert_eq!(statuses.last(), Some(&502), "{statuses:?}");
    assert_eq!(closed_on(&up), 1, "not sent again");
    let of = "room=\"portal\"";
    assert_eq!(
        client::metric(v.admin, "varco_upstream_closed_idle_total", of).await,
        Some(0.0)
    );
    assert_eq!(
        client::metric(v.admin, "varco_upstream_up", of).await,
        Some(0.0),
        "cooled down"
    );
}

/// A malformed answer on a kept-alive connection is not the race: not
/// sent again, counted as a protocol error.
#[tokio::test]
async fn a_broken_answer_on_a_kept_alive_connection_is_not_the_race() {
    let up = answers_then(b"NOT HTTP AT ALL\r\n\r\n").await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 0",
    ))
    .await;
    let statuses = until_one_meets_a_kept_alive_connection(&v, &up, "/again").await;
    assert_eq!(statuses.last(), Some(&502), "{statuses:?}");
    assert_eq!(closed_on(&up), 1, "not sent again");
    let of = "room=\"portal\"";
    assert_eq!(
        client::metric(v.admin, "varco_upstream_closed_idle_total", of).await,
        Some(0.0)
    );
    assert_eq!(
        client::metric(
            v.admin,
            "varco_upstream_errors_total",
            "kind=\"protocol\",room=\"portal\""
        )
        .await,
        Some(1.0)
    );
}

/// A malformed head is that page's, not the upstream's: every upstream
/// serving the same page sends the same. A page requested a few times
/// must not take every upstream out of rotation, nor go to each in turn;
/// nginx neither counts nor retries `invalid_header`.
#[tokio::test]
async fn a_malformed_answer_takes_no_upstream_out_of_rotation() {
    let (one, two) = (bad_on_one_page().await, bad_on_one_page().await);
    let v = Varco::start(&room_config(
        &[one.0, two.0],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 1",
    ))
    .await;
    let hits = || one.1.load(Ordering::SeqCst) + two.1.load(Ordering::SeqCst);
    for n in 1..=4 {
        let got = get(&v.url("/bad")).await;
        assert_eq!(got.status, 502, "{}", got.text());
        assert_eq!(hits(), n, "sent to one upstream only");
    }
    for upstream in [one.0, two.0] {
        let of = format!("room=\"portal\",upstream=\"{upstream}\"");
        assert_eq!(
            client::metric(v.admin, "varco_upstream_up", &of).await,
            Some(1.0),
            "{upstream} still in rotation"
        );
    }
    for _ in 0..4 {
        let got = get(&v.url("/good")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let mut seen = 0.0;
    for upstream in [one.0, two.0] {
        let of = format!("kind=\"protocol\",room=\"portal\",upstream=\"{upstream}\"");
        seen += client::metric(v.admin, "varco_upstream_errors_total", &of)
            .await
            .unwrap_or(0.0);
    }
    assert_eq!(seen, 4.0, "each is seen in the metrics");
}

/// An answer in a transfer coding besides chunked (`gzip, chunked`):
/// hyper takes the chunks off, and the field goes as hop-by-hop, so the
/// client would read gzip bytes as the page. A 502 (as nginx), counted as
/// a protocol error, the upstream left in rotation; `chunked` alone and
/// in any case is served.
#[tokio::test]
async fn an_answer_in_a_coding_besides_chunked_is_a_502() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let coding = if head.starts_with(b"GET /gzip-chunked ") {
                        "gzip, chunked"
                    } else if head.starts_with(b"GET /twice ") {
                        "chunked, chunked"
                    } else {
                        "Chunked"
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let v = Varco::start(&room_config(
        &[addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 1",
    ))
    .await;
    for path in ["/gzip-chunked", "/twice"] {
        let got = get(&v.url(path)).await;
        assert_eq!(got.status, 502, "{path}: {}", got.text());
    }
    let got = get(&v.url("/plain")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "hello");
    let of = format!("kind=\"protocol\",room=\"portal\",upstream=\"{addr}\"");
    assert_eq!(
        client::metric(v.admin, "varco_upstream_errors_total", &of).await,
        Some(2.0)
    );
}

/// An upstream that speaks no HTTP (a wrong port, a TLS server behind
/// `http://`) is not a page's fault: it is counted and taken out, and a
/// GET goes on to the next. (This pins the words hyper uses for it.)
#[tokio::test]
async fn an_upstream_that_speaks_no_http_is_taken_out() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ssh = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() {
                    let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
                }
            });
        }
    });
    let good = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[ssh, good.addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 1",
    ))
    .await;
    for _ in 0..4 {
        let got = get(&v.url("/echo")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    let of = format!("room=\"portal\",upstream=\"{ssh}\"");
    assert_eq!(
        client::metric(v.admin, "varco_upstream_up", &of).await,
        Some(0.0)
    );
    assert_eq!(good.hits(), 4);
}

/// An upstream whose `/bad` answers with a head no parser takes (a field
/// line without a colon), and every other page well; with its count of
/// requests for `/bad`.
async fn bad_on_one_page() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let bad = Arc::new(AtomicUsize::new(0));
    let counted = bad.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let answer: &[u8] = if head.starts_with(b"GET /bad ") {
                        counted.fetch_add(1, Ordering::SeqCst);
                        b"HTTP/1.1 200 OK\r\nthis is no field\r\ncontent-length: 2\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, bad)
}

fn closed_on(up: &ClosesKeptAlive) -> usize {
    up.closed_on.load(Ordering::SeqCst)
}

/// GETs `path` through `v` until one of them meets a connection `up`
/// kept alive (the idle connection goes back to the pool as an answer
/// ends, so a few tries make sure one does): every status, in order.
async fn until_one_meets_a_kept_alive_connection(
    v: &Varco,
    up: &ClosesKeptAlive,
    path: &str,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    while closed_on(up) == 0 {
        statuses.push(get(&v.url(path)).await.status);
        assert!(
            statuses.len() < 20,
            "no request met a kept-alive connection"
        );
    }
    statuses
}

/// A GET that an upstream breaks before any answer goes to the next
/// upstream (nginx's `proxy_next_upstream error`); a POST gets the 502.
#[tokio::test]
async fn a_get_broken_by_one_upstream_goes_to_the_next_a_post_does_not() {
    let good = upstream::spawn().await;
    // Reads the request head and closes: every request breaks there.
    let breaks = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broken = breaks.local_addr().unwrap();
    let met = Arc::new(AtomicUsize::new(0));
    let counted = met.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = breaks.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let _ = read_request_head(&mut s).await;
                counted.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let v = Varco::start(&room_config(
        &[broken, good.addr],
        "[upstream]\nfail_cooldown = \"1h\"\nmax_fails = 0",
    ))
    .await;
    for _ in 0..6 {
        let got = get(&v.url("/echo")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert!(
        met.load(Ordering::SeqCst) >= 1,
        "no GET met the broken upstream"
    );
    assert_eq!(good.hits(), 6);
    let mut statuses = Vec::new();
    loop {
        let (before, hits) = (met.load(Ordering::SeqCst), good.hits());
        let got = send(
            Request::post(v.url("/echo"))
                .body(body::full("form"))
                .unwrap(),
        )
        .await;
        statuses.push(got.status);
        if met.load(Ordering::SeqCst) > before {
            assert_eq!(got.status, 502, "{statuses:?}");
            assert_eq!(good.hits(), hits, "the POST went nowhere else");
            break;
        }
        assert_eq!(got.status, 200);
        assert!(statuses.len() < 6, "no POST met the broken upstream");
    }
}

/// Reads one request head from a raw connection; None if it closed first.
async fn read_request_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.ok()?;
        head.push(byte[0]);
    }
    Some(head)
}

#[tokio::test]
async fn unknown_host_gets_404_from_varco() {
    let up = upstream::spawn().await;
    let toml = format!(
        "[rooms.portal]\nupstreams = [\"http://{}\"]\nhosts = [\"portal.example.org\"]\n",
        up.addr
    );
    let v = Varco::start(&toml).await;
    let req = Request::get(v.url("/"))
        .header("host", "other.example.org")
        .body(body::empty())
        .unwrap();
    let got = send(req).await;
    assert_eq!(got.status, 404);
    assert_eq!(
        got.headers["cache-control"],
        "no-store, private, no-transform"
    );
    assert_eq!(up.hits(), 0);
}

/// varco's own error pages speak the person's language as the waiting
/// page does: Accept-Language, else the room's `language`; with no room,
/// English. A program reading JSON gets English.
#[tokio::test]
async fn varcos_own_pages_speak_the_persons_language() {
    let v = Varco::start(&room_config(&[common::dead_addr()], "")).await;
    let asking = |lang: Option<&str>, accept: &str| {
        let mut r = Request::get(v.url("/echo")).header("accept", accept);
        if let Some(l) = lang {
            r = r.header("accept-language", l);
        }
        r.body(body::empty()).unwrap()
    };
    let html = "text/html";
    let page = send(asking(None, html)).await;
    assert_eq!(page.status, 502);
    assert!(
        page.text().contains("<html lang=\"it\">"),
        "{}",
        page.text()
    );
    assert!(page.text().contains("Il servizio non è raggiungibile"));
    assert!(page
        .text()
        .contains("comunica questo codice di riferimento"));
    let page = send(asking(Some("en-GB,en;q=0.9,it;q=0.5"), html)).await;
    assert!(
        page.text().contains("<html lang=\"en\">"),
        "{}",
        page.text()
    );
    assert!(page
        .text()
        .contains("The service is not reachable right now."));
    let api = send(asking(Some("it"), "application/json")).await;
    assert_eq!(
        api.json()["message"],
        "The service is not reachable right now. Please try again in a moment."
    );
    // varco's own paths on the room's site speak the room's language too.
    let unknown = send(
        Request::get(v.url("/.varco/nowhere"))
            .header("accept", html)
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.text().contains("<html lang=\"it\">"),
        "{}",
        unknown.text()
    );

    let english_room = Varco::start(&room_config(&[common::dead_addr()], "").replace(
        "[rooms.portal]",
        "[rooms.portal]\nlanguage = \"en\"\nhosts = [\"portal.example.org\"]",
    ))
    .await;
    let nowhere = |lang: Option<&str>| {
        let mut r = Request::get(english_room.url("/echo")).header("host", "elsewhere.example.org");
        if let Some(l) = lang {
            r = r.header("accept-language", l);
        }
        r.body(body::empty()).unwrap()
    };
    let page = send(nowhere(None)).await;
    assert_eq!(page.status, 404, "no room for this host");
    assert!(
        page.text().contains("Nothing is served at this address."),
        "no room, no room's language: {}",
        page.text()
    );
    let page = send(nowhere(Some("it-IT"))).await;
    assert_eq!(page.status, 404);
    assert!(page.text().contains("nessun servizio"), "{}", page.text());
    assert!(
        !page.text().contains("Riprova"),
        "no advice to retry an address that serves nothing"
    );
    let room_default = send(
        Request::get(english_room.url("/echo"))
            .header("host", "portal.example.org")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(room_default.status, 502);
    assert!(
        room_default.text().contains("<html lang=\"en\">"),
        "the room's language: {}",
        room_default.text()
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_and_normalised_for_the_upstream() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = client::h2_handshake(tcp).await;
    let req = Request::get(format!(
        "http://portal.example.org:{}/echo?h2=1",
        v.addr.port()
    ))
    .body(body::empty())
    .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let j = client::read(resp).await.json();
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["uri"], "/echo?h2=1");
    assert_eq!(
        j["headers"]["host"][0],
        format!("portal.example.org:{}", v.addr.port())
    );
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let (mut s, head) = open_websocket(v.addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "the handshake reaches the client: {head}"
    );
    s.write_all(b"hello through the gate").await.unwrap();
    let mut echo = [0u8; 22];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&echo, b"hello through the gate");
}

/// A page tricked into answering 101 (no `Sec-WebSocket-Accept` for the
/// client's key) opens no tunnel: it would be a raw pipe to the portal,
/// past the in-flight cap and the pass's life.
#[tokio::test]
async fn a_101_that_is_no_websocket_handshake_opens_no_tunnel() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let (mut s, head) = open_websocket_at(v.addr, "/ws?no-accept").await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    // Whatever follows is no tunnel: the connection reads it as HTTP.
    let _ = s.write_all(b"hello through the gate").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        !String::from_utf8_lossy(&rest).contains("hello through the gate"),
        "echoed through a tunnel"
    );
    let of = format!("kind=\"protocol\",room=\"portal\",upstream=\"{}\"", up.addr);
    assert_eq!(
        client::metric(v.admin, "varco_upstream_errors_total", &of).await,
        Some(1.0)
    );
}

/// A 101 to a request that asked for no upgrade is the portal's fault, a
/// 502 with a reference, as one to a WebSocket handshake that does not
/// answer it: passed on, the citizen got a 101 with no tunnel behind it.
#[tokio::test]
async fn a_101_to_a_plain_request_is_a_502() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let r = client::get(&format!("http://{}/ws?no-accept", v.addr)).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let of = format!("kind=\"protocol\",room=\"portal\",upstream=\"{}\"", up.addr);
    assert_eq!(
        client::metric(v.admin, "varco_upstream_errors_total", &of).await,
        Some(1.0)
    );
}

/// A raw connection that asks for a WebSocket at the test upstream's
/// echoing `/ws`, and the head of the answer.
async fn open_websocket(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    open_websocket_at(addr, "/ws").await
}

async fn open_websocket_at(
    addr: std::net::SocketAddr,
    path: &str,
) -> (tokio::net::TcpStream, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: portal\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads one HTTP/1.1 response head from a raw connection.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn a_websocket_tunnel_holds_its_connection_slot_until_it_ends() {
    // One connection at a time, closed after half a second without bytes.
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nmax_connections = 1\nkeepalive_timeout = \"500ms\"",
    ))
    .await;
    let (mut ws, head) = open_websocket(v.addr).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    ws.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    ws.read_exact(&mut echo).await.unwrap();
    // The tunnel is a connection: the only slot is taken, and a second
    // connection waits in the backlog.
    let mut other = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    other
        .write_all(b"GET /echo HTTP/1.1\r\nHost: portal\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(200), other.read(&mut byte)).await;
    assert!(early.is_err(), "served while the tunnel held the only slot");
    // Idle for keepalive_timeout, the tunnel ends, and the slot goes on.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle tunnel stayed open");
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut other))
        .await
        .expect("served once the tunnel ended");
    assert!(head.starts_with("http/1.1 200"), "{head}");
}

#[tokio::test]
async fn an_h2c_upgrade_goes_out_as_an_ordinary_request() {
    // A tunnel speaking HTTP/2 to the portal would carry any request past
    // the gate: only WebSocket is tunnelled.
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(
        b"GET /echo HTTP/1.1\r\nHost: portal\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    assert!(!headers.contains_key("upgrade"), "{seen}");
    assert!(!headers.contains_key("http2-settings"), "{seen}");

    // Offered beside WebSocket, h2c is dropped: the portal sees WebSocket.
    let got = send(
        Request::get(v.url("/echo"))
            .header("connection", "upgrade")
            .header("upgrade", "h2c, websocket")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.json()["headers"]["upgrade"][0], "websocket");
}

/// The portal sets no cookie of varco's own names through varco: it
/// would delete every visitor's ticket (their place in line) or overwrite
/// their pass.
#[tokio::test]
async fn the_portal_cannot_set_varcos_cookies() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let got = get(&v.url("/claims-varco-cookies")).await;
    assert_eq!(got.status, 200);
    let set: Vec<&str> = got
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap())
        .collect();
    assert_eq!(set, ["varco_theme=dark; Path=/", "lang=it; Path=/"]);
}

/// `Expect: 100-continue` is varco's to answer: the portal gets none,
/// with a streamed body too. A POST ended at its headers (a chunked `0`)
/// reaches the portal with `Content-Length: 0`, as RFC 9110 asks of a
/// POST, not with no length at all.
#[tokio::test]
async fn the_portal_gets_no_expect_and_a_length_for_an_empty_post() {
    let up = upstream::spawn().await;
    for buffer in ["0", "1MiB"] {
        let v = Varco::start(&room_config(
            &[up.addr],
            &format!("[upstream]\nrequest_buffer = \"{buffer}\""),
        ))
        .await;
        let got = common::client::raw(
            v.addr,
            b"POST /echo HTTP/1.1\r\nHost: portal\r\nExpect: 100-continue\r\n\
              Content-Length: 5\r\nConnection: close\r\n\r\nhello",
            Duration::from_secs(5),
        )
        .await;
        assert!(got.contains("\"method\":\"POST\""), "{got}");
        assert!(!got.contains("\"expect\""), "buffer {buffer}: {got}");
        let got = common::client::raw(
            v.addr,
            b"POST /echo HTTP/1.1\r\nHost: portal\r\nTransfer-Encoding: chunked\r\n\
              Connection: close\r\n\r\n0\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        if buffer != "0" {
            assert!(
                got.contains("\"content-length\":[\"0\"]"),
                "buffer {buffer}: {got}"
            );
        }
    }
}

/// A portal that answers within 300 ms, behind varco streaming every
/// request body to it as it comes (`request_buffer = "0"`): read whole
/// by varco first, the portal would wait for nothing.
async fn streaming_uploads() -> (upstream::Upstream, Varco) {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nresponse_timeout = \"300ms\"\nrequest_buffer = \"0\"",
    ))
    .await;
    (up, v)
}

/// The answer to a 10-byte `POST /upload` on `s`: a 200 saying the
/// portal got all 10.
async fn the_portal_got_ten_bytes(s: &mut tokio::net::TcpStream) {
    let head = read_head(s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let mut body = [0u8; 2];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"10", "the portal got the whole upload");
}

#[tokio::test]
async fn a_slow_upload_is_not_the_portals_delay() {
    // A person on a slow line sends 10 bytes over about a second; the
    // portal answers within its 300 ms once it has them.
    let (_up, v) = streaming_uploads().await;
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: portal\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"x").await.unwrap();
    }
    the_portal_got_ten_bytes(&mut s).await;
    // The portal's own slowness is still a 504.
    let got = get(&v.url("/slow?ms=2000")).await;
    assert_eq!(got.status, 504);
}

/// A person's upload that pauses longer than the portal's
/// `response_timeout` is the person's delay (`body_read_timeout`'s), not
/// the portal's: no 504, no failure counted against the upstream.
#[tokio::test]
async fn a_paused_upload_is_not_the_portals_delay() {
    let (up, v) = streaming_uploads().await;
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: portal\r\nContent-Length: 10\r\n\r\nxxxxx")
        .await
        .unwrap();
    // The pause itself is what is tested: the person's line goes quiet.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"xxxxx").await.unwrap();
    the_portal_got_ten_bytes(&mut s).await;
    let of = format!("room=\"portal\",upstream=\"{}\"", up.addr);
    assert_eq!(
        client::metric(v.admin, "varco_upstream_up", &of).await,
        Some(1.0),
        "not cooled down"
    );
}

/// A portal worker that gives up on an upload its person paused (ended
/// at its own read timeout, as gunicorn's are) closes the connection
/// without an answer: the person's delay, a 408, not the upstream's
/// failure.
#[tokio::test]
async fn an_upstream_giving_up_on_a_paused_upload_is_not_its_failure() {
    assert_eq!(
        paused_upload_broken_after(Duration::from_millis(1500)).await,
        ("http/1.1 408".to_string(), Some(1.0))
    );
}

/// One that breaks early in a pause (a crash: a person's line pauses
/// all the time) is still the upstream's failure: a 502, counted.
#[tokio::test]
async fn an_upstream_breaking_early_in_a_paused_upload_is_still_its_failure() {
    assert_eq!(
        paused_upload_broken_after(Duration::from_millis(300)).await,
        ("http/1.1 502".to_string(), Some(0.0))
    );
}

/// The start of varco's answer to an upload whose person pauses after 5
/// of its 10 bytes, sent to an upstream that reads the head and closes
/// `after` it without an answer; and `varco_upstream_up` for it then.
async fn paused_upload_broken_after(after: Duration) -> (String, Option<f64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_head(&mut s).await;
                // The worker's end, within varco's body_read_timeout: the
                // time is what is tested.
                tokio::time::sleep(after).await;
                drop(s);
            });
        }
    });
    let v = Varco::start(&room_config(&[addr], "[upstream]\nrequest_buffer = \"0\"")).await;
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: portal\r\nContent-Length: 10\r\n\r\nxxxxx")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    let of = format!("room=\"portal\",upstream=\"{addr}\"");
    (
        head[..12].to_string(),
        client::metric(v.admin, "varco_upstream_up", &of).await,
    )
}

/// An upstream that sends, to each request, the bytes `answer` gives for
/// its head (a shape hyper's server would never write), then closes.
async fn answering(answer: fn(&str) -> &'static [u8]) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let _ = s.write_all(answer(&head)).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// An answer framed both ways (chunked and a Content-Length, the shape of
/// response smuggling) reaches the client whole, by its chunks.
#[tokio::test]
async fn an_answer_with_chunks_and_a_length_is_taken_by_its_chunks() {
    let addr = answering(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
          b\r\nhello world\r\n0\r\n\r\n"
    })
    .await;
    let v = Varco::start(&room_config(&[addr], "")).await;
    let got = get(&v.url("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "hello world");
    assert!(
        !got.headers.contains_key("content-length"),
        "{:?}",
        got.headers
    );
}

/// An answer whose length is said twice, or as a list of one value
/// (`Content-Length: 5, 5`, which hyper's client takes, RFC 9110 8.6),
/// reaches the client with one length: sent on as it came, hyper's server
/// could not read it back, and the client got an empty reply.
#[tokio::test]
async fn an_answer_with_its_length_said_twice_reaches_the_client() {
    let addr = answering(|head| {
        if head.contains("/list") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
        }
    })
    .await;
    let v = Varco::start(&room_config(&[addr], "")).await;
    for path in ["/list", "/twice"] {
        let got = get(&v.url(path)).await;
        assert_eq!((got.status, got.text().as_str()), (200, "hello"), "{path}");
        let lengths: Vec<_> = got.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"], "{path}");
    }
}

/// A browser may send its cookies over HTTP/2 as separate fields; the
/// HTTP/1.1 portal gets one Cookie line (RFC 9113 section 8.2.3).
#[tokio::test]
async fn http2_cookie_fields_reach_the_portal_as_one_line() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = client::h2_handshake(tcp).await;
    let req = Request::get(format!("http://portal.example.org:{}/echo", v.addr.port()))
        .header("cookie", "lang=it")
        .header("cookie", "varco_pass_portal=p.q.r")
        .header("cookie", "SESSION=abc")
        .body(body::empty())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let j = client::read(resp).await.json();
    assert_eq!(
        j["headers"]["cookie"],
        serde_json::json!(["lang=it; SESSION=abc"])
    );
}

/// In HTTP/2 a Host field naming another than :authority is malformed
/// (RFC 9113 8.3.1): varco routes by one, the portal might read the
/// other. The same host written otherwise (case, port) is served.
#[tokio::test]
async fn http2_host_and_authority_that_differ_are_refused() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = client::h2_handshake(tcp).await;
    let ask = |host: &'static str| {
        Request::get(format!("http://portal.example.org:{}/echo", v.addr.port()))
            .header("host", host)
            .body(body::empty())
            .unwrap()
    };
    let resp = h2.send_request(ask("other.example.org")).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(up.hits(), 0);
    let resp = h2.send_request(ask("PORTAL.example.org")).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_answer_stalled_midway_is_cut_off() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nresponse_timeout = \"300ms\"",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"GET /stall HTTP/1.1\r\nHost: portal\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    // The connection ends (the answer cut short) instead of hanging on.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "still waiting after 5 s");
    assert!(rest.len() < 1000, "a stalled answer cannot be whole");
}

#[tokio::test]
async fn metrics_count_requests_by_room_and_class() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    for _ in 0..3 {
        get(&v.url("/echo")).await;
    }
    let m = get(&format!("http://{}/metrics", v.admin)).await.text();
    assert!(
        m.contains("varco_requests_total{class=\"2xx\",room=\"portal\"} 3"),
        "{m}"
    );
    assert_eq!(
        get(&format!("http://{}/healthz", v.admin)).await.status,
        200
    );
    assert_eq!(get(&format!("http://{}/readyz", v.admin)).await.status, 200);
}

/// Waits (10 s at most) until metric `name` with `labels` satisfies
/// `holds`.
async fn until_metric(
    admin: std::net::SocketAddr,
    name: &str,
    labels: &str,
    holds: impl Fn(f64) -> bool,
) {
    let what = format!("{name}{{{labels}}} as expected");
    client::until(&what, Duration::from_secs(10), async || {
        client::metric(admin, name, labels)
            .await
            .is_some_and(&holds)
    })
    .await
}

/// Which upstream answered a `GET /echo`.
async fn answered_by(v: &Varco) -> String {
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 200);
    got.json()["upstream"].as_str().unwrap().to_string()
}

/// Active health checks: an upstream whose health page fails leaves the
/// rotation before any citizen's request meets it, and comes back once
/// the page passes again.
#[tokio::test]
async fn an_upstream_failing_its_health_checks_leaves_the_rotation_and_comes_back() {
    let sick = upstream::spawn().await;
    let well = upstream::spawn().await;
    let toml = room_config(&[sick.addr, well.addr], "")
        + "[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 2\n";
    sick.healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let v = Varco::start(&toml).await;
    let of = |u: &upstream::Upstream| format!("room=\"portal\",upstream=\"{}\"", u.addr);
    until_metric(v.admin, "varco_upstream_up", &of(&sick), |up| up == 0.0).await;
    assert_eq!(
        client::metric(v.admin, "varco_upstream_up", &of(&well)).await,
        Some(1.0)
    );
    for _ in 0..6 {
        assert_eq!(answered_by(&v).await, well.addr.to_string());
    }
    let failed = format!("result=\"failed\",{}", of(&sick));
    until_metric(
        v.admin,
        "varco_upstream_health_checks_total",
        &failed,
        |n| n >= 2.0,
    )
    .await;

    sick.healthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    until_metric(v.admin, "varco_upstream_up", &of(&sick), |up| up == 1.0).await;
    let mut answered = Vec::new();
    for _ in 0..4 {
        answered.push(answered_by(&v).await);
    }
    assert!(
        answered.contains(&sick.addr.to_string()),
        "back in rotation: {answered:?}"
    );
}

/// When the health checks find every upstream down, a request still
/// probes one (or a pool without checks would never recover), but only
/// one: going to each in turn, every request would wait out a connect
/// timeout per upstream (seconds each, to hosts that drop the attempt)
/// and hold its in-flight slot all that time, where nginx answers "no
/// live upstreams" at once.
#[tokio::test]
async fn a_pool_the_checks_found_all_down_is_probed_once_a_request() {
    let closed = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dead = [closed(), closed(), closed()];
    let toml = room_config(&dead, "")
        + "[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\nfall = 1\nrise = 1\n";
    let v = Varco::start(&toml).await;
    let of = |a: &std::net::SocketAddr| format!("room=\"portal\",upstream=\"{a}\"");
    for a in &dead {
        until_metric(v.admin, "varco_upstream_up", &of(a), |up| up == 0.0).await;
    }
    let connect_errors = async || {
        let mut n = 0.0;
        for a in &dead {
            let labels = format!("kind=\"connect\",{}", of(a));
            n += client::metric(v.admin, "varco_upstream_errors_total", &labels)
                .await
                .unwrap_or(0.0);
        }
        n
    };
    let before = connect_errors().await;
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 502);
    assert_eq!(connect_errors().await - before, 1.0, "one probe");
}

/// `expect_status` narrows what passes: an upstream answering its health
/// page with 200 fails a check that expects 204, and leaves the rotation.
#[tokio::test]
async fn a_health_check_expecting_another_status_takes_the_upstream_out() {
    let picky = upstream::spawn().await;
    let well = upstream::spawn().await;
    let toml = room_config(&[picky.addr, well.addr], "")
        + "[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 2\nexpect_status = [204]\n";
    let v = Varco::start(&toml).await;
    let of = |u: &upstream::Upstream| format!("room=\"portal\",upstream=\"{}\"", u.addr);
    let failed = |u: &upstream::Upstream| format!("result=\"failed\",{}", of(u));
    until_metric(v.admin, "varco_upstream_up", &of(&picky), |up| up == 0.0).await;
    until_metric(v.admin, "varco_upstream_up", &of(&well), |up| up == 0.0).await;
    assert!(
        client::metric(
            v.admin,
            "varco_upstream_health_checks_total",
            &failed(&well)
        )
        .await
        .is_some_and(|n| n >= 2.0),
        "200 is not 204"
    );
}

/// A checked page may answer with as many header fields as a citizen's
/// request may get back through varco (1000): with hyper's 100, a page
/// setting many cookies failed every check, and took every upstream out.
#[tokio::test]
async fn a_checked_page_with_many_header_fields_passes() {
    let up = upstream::spawn().await;
    let toml = room_config(&[up.addr], "")
        + "[rooms.portal.health_check]\npath = \"/many-headers\"\ninterval = \"500ms\"\ntimeout = \"500ms\"\nfall = 1\n";
    let v = Varco::start(&toml).await;
    let checks = |result: &str| {
        let labels = format!(
            "result=\"{result}\",room=\"portal\",upstream=\"{}\"",
            up.addr
        );
        async move {
            client::metric(v.admin, "varco_upstream_health_checks_total", &labels)
                .await
                .unwrap_or(0.0)
        }
    };
    client::until("two checks", Duration::from_secs(10), async || {
        checks("passed").await + checks("failed").await >= 2.0
    })
    .await;
    assert_eq!(checks("failed").await, 0.0);
}

/// With `slow_start`, an upstream the checks bring back gets a growing
/// share of the requests, not its full share at once.
#[tokio::test]
async fn an_upstream_back_from_its_checks_takes_its_share_gradually() {
    let sick = upstream::spawn().await;
    let well = upstream::spawn().await;
    let toml = room_config(&[sick.addr, well.addr], "")
        + "[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"200ms\"\nfall = 3\nrise = 1\nslow_start = \"5s\"\n";
    sick.healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let v = Varco::start(&toml).await;
    let of = format!("room=\"portal\",upstream=\"{}\"", sick.addr);
    until_metric(v.admin, "varco_upstream_up", &of, |up| up == 0.0).await;
    assert_eq!(
        client::metric(v.admin, "varco_upstream_share", &of).await,
        Some(0.0)
    );
    sick.healthy
        .store(true, std::sync::atomic::Ordering::SeqCst);
    until_metric(v.admin, "varco_upstream_up", &of, |up| up == 1.0).await;
    // The operator sees it warm up.
    let share = client::metric(v.admin, "varco_upstream_share", &of).await;
    assert!(share.is_some_and(|s| s < 1.0), "{share:?} just back");
    // Round robin alone would send it every other request: 20 of 40.
    let mut back = 0;
    for _ in 0..40 {
        if answered_by(&v).await == sick.addr.to_string() {
            back += 1;
        }
    }
    assert!(back <= 10, "{back} of 40 at the start of its slow start");
    // Within the slow start's 5 s it comes to its full share.
    client::until("its full share", Duration::from_secs(15), async || {
        let mut back = 0;
        for _ in 0..10 {
            if answered_by(&v).await == sick.addr.to_string() {
                back += 1;
            }
        }
        back == 5
    })
    .await;
    until_metric(v.admin, "varco_upstream_share", &of, |s| s == 1.0).await;
}

/// With `slow_start`, an upstream back from a cool-down after a failed
/// request warms up too (nginx's slow_start), rather than taking its
/// full share of a click day at once.
#[tokio::test]
async fn an_upstream_back_from_a_cool_down_takes_its_share_gradually() {
    let sick = upstream::spawn().await;
    let well = upstream::spawn().await;
    // An hour's slow start: a few seconds in, its share is still nothing.
    let toml = room_config(
        &[sick.addr, well.addr],
        "[upstream]\nresponse_timeout = \"300ms\"\nfail_cooldown = \"1s\"",
    ) + "[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"10s\"\nslow_start = \"1h\"\n";
    let v = Varco::start(&toml).await;
    let of = format!("room=\"portal\",upstream=\"{}\"", sick.addr);
    // The rotation's first turn is the sick one's: it times out, and
    // cools down (a timeout is never retried elsewhere).
    assert_eq!(get(&v.url("/slow?ms=2000")).await.status, 504);
    until_metric(v.admin, "varco_upstream_up", &of, |up| up == 1.0).await;
    let share = client::metric(v.admin, "varco_upstream_share", &of).await;
    assert!(share.is_some_and(|s| s < 0.01), "{share:?} just back");
    // Round robin alone would send it every other request: 10 of 20.
    let mut back = 0;
    for _ in 0..20 {
        if answered_by(&v).await == sick.addr.to_string() {
            back += 1;
        }
    }
    assert_eq!(back, 0, "at the start of its slow start");
}

/// A reload (a renewed certificate, say) goes on with the rotation where
/// it was: started again, the first upstream would take the turn after
/// every reload, and every turn where reloads outnumber requests.
#[tokio::test]
async fn a_reload_goes_on_with_the_rotation_where_it_was() {
    let a = upstream::spawn().await;
    let b = upstream::spawn().await;
    let (g, _path) =
        common::gated::Gated::start_written("rotation-reload", &room_config(&[a.addr, b.addr], ""))
            .await;
    let mut answered = Vec::new();
    for _ in 0..4 {
        let got = get(&format!("http://{}/echo", g.addr)).await;
        assert_eq!(got.status, 200);
        answered.push(got.json()["upstream"].as_str().unwrap().to_string());
        g.app.reload().await.expect("reload");
    }
    let (a, b) = (a.addr.to_string(), b.addr.to_string());
    assert_eq!(answered, [a.clone(), b.clone(), a, b]);
}

/// A hung upstream met by a request sent before a reload (a certificate
/// renewal, say) is cooled down in the rotation the reload put in force:
/// counted in the old one only, it kept its turns in the new one, and
/// each request sent there waited its own response timeout.
#[tokio::test]
async fn a_failure_seen_across_a_reload_counts_in_the_new_rotation() {
    let a = upstream::spawn().await;
    let b = upstream::spawn().await;
    let toml = room_config(
        &[a.addr, b.addr],
        "[upstream]\nresponse_timeout = \"500ms\"\nfail_cooldown = \"1h\"",
    );
    let (g, _path) = common::gated::Gated::start_written("failure-reload", &toml).await;
    let url = format!("http://{}/slow?ms=3000", g.addr);
    let hung = tokio::spawn(async move { get(&url).await.status });
    common::client::until(
        "the request at the first upstream",
        Duration::from_secs(5),
        async || a.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 1,
    )
    .await;
    // Twice: the rotation in between is gone by the time of the 504.
    g.app.reload().await.expect("reload");
    g.app.reload().await.expect("reload");
    assert_eq!(hung.await.unwrap(), 504);
    let of = format!("upstream=\"{}\"", a.addr);
    assert_eq!(
        client::metric(g.admin, "varco_upstream_up", &of).await,
        Some(0.0),
        "cooled down in the rotation in force"
    );
    for _ in 0..2 {
        let got = get(&format!("http://{}/echo", g.addr)).await;
        assert_eq!(got.json()["upstream"], b.addr.to_string());
    }
}

/// An operator takes an upstream out of rotation (a deploy on that
/// server): it gets no request until put back, and a reload keeps it out.
#[tokio::test]
async fn an_operator_takes_an_upstream_out_and_puts_it_back() {
    const TOKEN: &str = "take-it-out-for-a-deploy";
    std::env::set_var("VARCO_TEST_PROXY_ADMIN", format!("ops:{TOKEN}"));
    let a = upstream::spawn().await;
    let b = upstream::spawn().await;
    let toml = format!(
        "[admin]\ntokens_env = \"VARCO_TEST_PROXY_ADMIN\"\n{}",
        room_config(&[a.addr, b.addr], "")
    );
    let (g, _path) = common::gated::Gated::start_written("taken-out", &toml).await;
    let api = async |upstream: &str, action: &str| {
        client::send(
            Request::post(format!(
                "http://{}/api/rooms/portal/upstreams/{upstream}/{action}",
                g.admin
            ))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(body::empty())
            .unwrap(),
        )
        .await
    };
    let answered = async || {
        let got = get(&format!("http://{}/echo", g.addr)).await;
        assert_eq!(got.status, 200);
        got.json()["upstream"].as_str().unwrap().to_string()
    };
    let (a_label, b_label) = (a.addr.to_string(), b.addr.to_string());

    let got = api(&a_label, "out").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let state = got.json();
    assert_eq!(state["upstreams"][0]["upstream"], a_label.as_str());
    assert_eq!(state["upstreams"][0]["taken_out"], true);
    assert_eq!(state["upstreams"][0]["healthy"], false);
    assert_eq!(state["upstreams"][0]["share"], 0.0);
    assert_eq!(state["upstreams"][1]["share"], 1.0);
    for _ in 0..6 {
        assert_eq!(answered().await, b_label);
    }
    let of = format!("room=\"portal\",upstream=\"{a_label}\"");
    assert_eq!(
        client::metric(g.admin, "varco_upstream_taken_out", &of).await,
        Some(1.0)
    );
    assert_eq!(
        client::metric(g.admin, "varco_upstream_up", &of).await,
        Some(0.0)
    );
    g.app.reload().await.expect("reload");
    for _ in 0..6 {
        assert_eq!(answered().await, b_label, "a reload put it back");
    }
    // The other is now the last in rotation: taken out only when meant,
    // and then nobody gets through (not even to the one taken out).
    assert_eq!(api(&b_label, "out").await.status, 409);
    assert_eq!(api(&b_label, "out?force=true").await.status, 200);
    let hits = (a.hits(), b.hits());
    assert_eq!(get(&format!("http://{}/echo", g.addr)).await.status, 502);
    assert_eq!((a.hits(), b.hits()), hits);
    assert_eq!(api(&b_label, "in").await.status, 200);

    assert_eq!(api(&a_label, "in").await.status, 200);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(answered().await);
    }
    assert!(seen.contains(&a_label), "{seen:?}");
    assert_eq!(
        client::metric(g.admin, "varco_upstream_taken_out", &of).await,
        Some(0.0)
    );
    assert_eq!(api("10.9.9.9:1", "out").await.status, 404);
    assert_eq!(api(&a_label, "sideways").await.status, 404);
}

/// A reload keeps what the checks found (an upstream they took out gets no
/// citizen's request while the new checks count again), and a reload that
/// removes the checks puts every upstream back.
#[tokio::test]
async fn a_reload_keeps_the_checks_verdict_and_removing_the_checks_ends_it() {
    let sick = upstream::spawn().await;
    let well = upstream::spawn().await;
    let plain = room_config(&[sick.addr, well.addr], "");
    let checked = format!(
        "{plain}[rooms.portal.health_check]\npath = \"/healthz\"\ninterval = \"300ms\"\nfall = 3\nrise = 3\nhost = \"portal.example.it\"\n"
    );
    sick.healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (g, path) = common::gated::Gated::start_written("health-reload", &checked).await;
    let of = format!("room=\"portal\",upstream=\"{}\"", sick.addr);
    until_metric(g.admin, "varco_upstream_up", &of, |up| up == 0.0).await;
    assert_eq!(
        sick.health_host.lock().unwrap().as_deref(),
        Some("portal.example.it"),
        "the checks name the configured host"
    );

    // The same file again: new checks, that would need three failures
    // (600 ms at least) to take the upstream out on their own.
    g.app.reload().await.expect("reload");
    assert_eq!(
        client::metric(g.admin, "varco_upstream_up", &of).await,
        Some(0.0),
        "the reload put a dead upstream back in rotation"
    );

    std::fs::write(&path, &plain).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(
        client::metric(g.admin, "varco_upstream_up", &of).await,
        Some(1.0),
        "without checks nothing can bring the upstream back: it must start in"
    );
    assert_eq!(
        client::metric(g.admin, "varco_upstream_health_checks_total", &of).await,
        None,
        "checks that no longer run leave no count behind, frozen"
    );
}

/// An upstream across a network varco does not trust is reached over
/// TLS, its certificate verified: against `upstream.tls_ca` here (a
/// private CA); a certificate that does not chain to it is never sent a
/// request.
#[tokio::test]
async fn an_https_upstream_is_reached_over_verified_tls() {
    let dir = std::env::temp_dir().join(format!("varco-https-upstream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let up = upstream::spawn_tls(&dir.join("ca.pem")).await;
    let toml = format!(
        "[upstream]\ntls_ca = \"ca.pem\"\n[rooms.portal]\nupstreams = [\"https://localhost:{}\"]\npreserve_host = false\n",
        up.addr.port()
    );
    let v = Varco::start_in(&toml, &dir).await;
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.json()["headers"]["host"][0],
        format!("localhost:{}", up.addr.port())
    );
    assert_eq!(up.hits(), 1);

    // Another CA: the handshake fails, nothing reaches the upstream.
    let other = std::env::temp_dir().join(format!("varco-https-other-{}", std::process::id()));
    std::fs::create_dir_all(&other).unwrap();
    let _stranger = upstream::spawn_tls(&other.join("ca.pem")).await;
    let v = Varco::start_in(&toml, &other).await;
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    assert_eq!(
        up.hits(),
        1,
        "a request went to an upstream varco cannot verify"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}

/// `upstream.tls_ca` applies at a restart: a reload that sets it and
/// brings an https upstream is refused (the upstream would be verified
/// without it, every request failing), and the running config goes on.
#[tokio::test]
async fn a_reload_that_needs_a_new_upstream_ca_is_refused() {
    let dir = std::env::temp_dir().join(format!("varco-reload-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tls = upstream::spawn_tls(&dir.join("ca.pem")).await;
    let plain = upstream::spawn().await;
    let (g, path) = common::gated::Gated::start_written(
        "reload-ca",
        &format!("[rooms.portal]\nupstreams = [\"http://{}\"]\n", plain.addr),
    )
    .await;
    std::fs::write(
        &path,
        format!(
            "[upstream]\ntls_ca = \"{}\"\n[rooms.portal]\nupstreams = [\"https://localhost:{}\"]\npreserve_host = false\n",
            dir.join("ca.pem").display(),
            tls.addr.port()
        ),
    )
    .unwrap();
    let e = g.app.reload().await.expect_err("a CA that is not in force");
    assert!(e.to_string().contains("upstream.tls_ca"), "{e}");
    let got = get(&format!("http://{}/echo", g.addr)).await;
    assert_eq!(got.status, 200, "the running config goes on");
    assert_eq!((plain.hits(), tls.hits()), (1, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same: a CA file renewed under the same path, read only at a
/// restart, with a new https upstream that needs it.
#[tokio::test]
async fn a_reload_that_needs_a_renewed_upstream_ca_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("varco-renewed-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    let old = upstream::spawn_tls(&ca).await;
    let room = |port: u16| {
        format!(
            "[upstream]\ntls_ca = \"{}\"\n[rooms.portal]\nupstreams = [\"https://localhost:{port}\"]\npreserve_host = false\n",
            ca.display()
        )
    };
    let (g, path) = common::gated::Gated::start_written("renewed-ca", &room(old.addr.port())).await;
    assert_eq!(get(&format!("http://{}/echo", g.addr)).await.status, 200);
    // Another upstream, whose CA is written over the same file.
    let new = upstream::spawn_tls(&ca).await;
    std::fs::write(&path, room(new.addr.port())).unwrap();
    let e = g.app.reload().await.expect_err("a CA that is not in force");
    assert!(e.to_string().contains("upstream.tls_ca"), "{e}");
    assert_eq!(get(&format!("http://{}/echo", g.addr)).await.status, 200);
    assert_eq!((old.hits(), new.hits()), (2, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An https upstream reached by its address but certified for a name (a
/// private network) is checked against the room's `tls_server_name`:
/// requests and health checks reach it; without the name, or with
/// another, nothing does. A reload puts a new name in force.
#[tokio::test]
async fn an_https_upstream_reached_by_address_is_checked_against_the_rooms_name() {
    let dir = std::env::temp_dir().join(format!("varco-server-name-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    // Its certificate names localhost; varco reaches it at 127.0.0.1.
    let up = upstream::spawn_tls(&ca).await;
    let room = |extra: &str| {
        format!(
            "[upstream]\ntls_ca = \"{}\"\n[rooms.portal]\nupstreams = [\"https://127.0.0.1:{}\"]\npreserve_host = false\n{extra}",
            ca.display(),
            up.addr.port()
        )
    };
    let (g, path) = common::gated::Gated::start_written("server-name", &room("")).await;
    let url = format!("http://{}/echo", g.addr);
    let got = get(&url).await;
    assert_eq!(got.status, 502, "{}", got.text());

    std::fs::write(&path, room("tls_server_name = \"portal.example.it\"\n")).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(get(&url).await.status, 502);
    assert_eq!(
        up.hits(),
        0,
        "a request went to an upstream varco cannot verify"
    );

    let checked = "tls_server_name = \"localhost\"\nhealth_check = { path = \"/healthz\", interval = \"100ms\", fall = 1, rise = 1 }\n";
    std::fs::write(&path, room(checked)).unwrap();
    g.app.reload().await.expect("reload");
    let got = get(&url).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["uri"], "/echo");
    let passed = format!(
        "result=\"passed\",room=\"portal\",upstream=\"127.0.0.1:{}\"",
        up.addr.port()
    );
    until_metric(
        g.admin,
        "varco_upstream_health_checks_total",
        &passed,
        |n| n >= 1.0,
    )
    .await;

    // A name changed by a reload holds for the next request, though a
    // connection made under the old one is idle in the pool.
    std::fs::write(&path, room("tls_server_name = \"portal.example.it\"\n")).unwrap();
    g.app.reload().await.expect("reload");
    let hits = up.hits();
    assert_eq!(get(&url).await.status, 502);
    assert_eq!(up.hits(), hits);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A portal that lets only varco in (mutual TLS) is shown
/// `upstream.tls_client`; without it the handshake fails and no request
/// reaches the portal.
#[tokio::test]
async fn an_https_upstream_that_asks_who_calls_is_shown_varcos_certificate() {
    let dir = std::env::temp_dir().join(format!("varco-mtls-upstream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mine = rcgen::CertificateParams::new(vec!["varco.example.it".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("varco.pem"), mine.pem()).unwrap();
    std::fs::write(dir.join("varco-key.pem"), key.serialize_pem()).unwrap();
    let up = upstream::spawn_tls_for(&dir.join("ca.pem"), Some(mine.der())).await;
    let room = format!(
        "[rooms.portal]\nupstreams = [\"https://localhost:{}\"]\n",
        up.addr.port()
    );

    let anonymous = format!("[upstream]\ntls_ca = \"ca.pem\"\n{room}");
    let v = Varco::start_in(&anonymous, &dir).await;
    assert_eq!(get(&v.url("/echo")).await.status, 502);
    assert_eq!(up.hits(), 0);
    // TLS 1.3 says no only after the handshake: still a refused
    // connection, not a broken exchange.
    let of = format!(
        "kind=\"connect\",room=\"portal\",upstream=\"localhost:{}\"",
        up.addr.port()
    );
    assert_eq!(
        client::metric(v.admin, "varco_upstream_errors_total", &of).await,
        Some(1.0)
    );
    // So the request goes on to the next upstream, as from any refused
    // connection: each of two requests (round robin) gets an answer.
    let plain = upstream::spawn().await;
    let v = Varco::start_in(
        &format!(
            "{}upstreams = [\"https://localhost:{}\", \"http://{}\"]\n",
            anonymous.split("upstreams").next().unwrap(),
            up.addr.port(),
            plain.addr
        ),
        &dir,
    )
    .await;
    for _ in 0..2 {
        let got = get(&v.url("/echo")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    assert_eq!(
        client::metric(v.admin, "varco_upstream_errors_total", &of).await,
        Some(1.0)
    );
    assert_eq!((up.hits(), plain.hits()), (0, 2));

    let known = format!(
        "[upstream]\ntls_ca = \"ca.pem\"\ntls_client = {{ cert = \"varco.pem\", key = \"varco-key.pem\" }}\n{room}"
    );
    let v = Varco::start_in(&known, &dir).await;
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(up.hits(), 1);
    // When it runs out the portal refuses varco: its expiry is watched
    // like the certificates citizens see.
    let expiry = client::metric(
        v.admin,
        "varco_tls_certificate_expiry_timestamp_seconds",
        "varco.pem",
    )
    .await;
    assert!(expiry.is_some_and(|t| t > 1.7e9), "{expiry:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An https upstream that accepts the connection and never finishes the
/// TLS handshake is a failed connection within connect_timeout (502, the
/// next upstream), not a request waiting response_timeout.
#[tokio::test]
async fn a_tls_handshake_that_never_ends_is_a_failed_connection() {
    let good = upstream::spawn().await;
    // Accepts (the kernel's backlog) and never answers the handshake.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let toml = format!(
        "[upstream]\nconnect_timeout = \"300ms\"\nresponse_timeout = \"30s\"\n[rooms.portal]\nupstreams = [\"https://127.0.0.1:{}\", \"http://{}\"]\n",
        mute.local_addr().unwrap().port(),
        good.addr
    );
    let v = Varco::start(&toml).await;
    let started = std::time::Instant::now();
    let got = get(&v.url("/echo")).await;
    assert_eq!(got.status, 200, "the next upstream answers: {}", got.text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}: the handshake was not bounded by connect_timeout",
        started.elapsed()
    );
    assert_eq!(good.hits(), 1);
}

/// A host that drops the packets of new connections (here: a listener
/// whose backlog is full, never accepted) is a failed connection at
/// `connect_timeout`, and the request goes on to the next upstream, even
/// under a shorter `response_timeout`, which counts from the connection:
/// timed from the start, each request sent there was a 504.
#[tokio::test]
async fn a_host_that_drops_packets_fails_at_connect_timeout_under_any_response_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let silent = socket.listen(0).unwrap();
    let addr = silent.local_addr().unwrap();
    let knock = || {
        tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
    };
    let mut queued = Vec::new();
    while let Ok(Ok(s)) = knock().await {
        queued.push(s);
        assert!(queued.len() < 10, "the backlog never filled");
    }
    let good = upstream::spawn().await;
    let toml = format!(
        "[upstream]\nconnect_timeout = \"1s\"\nresponse_timeout = \"200ms\"\n[rooms.portal]\nupstreams = [\"http://{addr}\", \"http://{}\"]\n",
        good.addr
    );
    let v = Varco::start(&toml).await;
    for _ in 0..2 {
        let got = get(&v.url("/echo")).await;
        assert_eq!(got.status, 200, "the next upstream answers: {}", got.text());
    }
    assert_eq!(good.hits(), 2);
    drop(silent);
}

/// A connection still sending its PROXY header holds a slot, and counts
/// in `varco_open_connections` (what `VarcoConnectionsNearLimit` reads):
/// it counted only once the header was read.
#[tokio::test]
async fn a_connection_sending_its_proxy_header_counts_as_open() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\nproxy_protocol = true\nheader_read_timeout = \"30s\"",
    ))
    .await;
    let open = || client::metric(v.admin, "varco_open_connections", "");
    assert_eq!(open().await, Some(0.0));
    // Half a header, and nothing more.
    let mut balancer = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    balancer.write_all(b"PROXY TCP4 198.51").await.unwrap();
    let within = Duration::from_secs(5);
    client::until("counted", within, async || open().await == Some(1.0)).await;
    drop(balancer);
    client::until("no longer counted", within, async || {
        open().await == Some(0.0)
    })
    .await;
}
