//! Client-side limits: slow headers, oversized heads, idle keep-alive and
//! the connection cap. Each one closes the offender while others are served.

mod common;

use std::time::{Duration, Instant};

use common::client::{get, raw};
use common::{room_config, upstream, Varco};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One header line every 200 ms for 10 s, never finishing the head
/// (stopping when varco closes); then what varco sent, read for 5 s more.
async fn trickle_head(slow: &mut TcpStream) -> Vec<u8> {
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow
            .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    rest
}

#[tokio::test]
async fn slow_header_sender_is_cut_off_while_others_are_served() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"",
    ))
    .await;

    let mut slow = TcpStream::connect(v.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: portal\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let trickle = trickle_head(&mut slow);
    let others = async {
        let mut ok = 0;
        for _ in 0..5 {
            if get(&v.url("/echo")).await.status == 200 {
                ok += 1;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    };
    let (rest, ok) = tokio::join!(trickle, others);
    assert_eq!(ok, 5, "other clients were served meanwhile");
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(8),
        "slow client held on for {cut_after:?}"
    );
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "{rest}"
    );
    assert_eq!(up.hits(), 5, "the slow request never reached the upstream");
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nmax_header_size = \"8KiB\"\nmax_headers = 20",
    ))
    .await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: portal\r\nCookie: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = raw(v.addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: portal\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw(v.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(up.hits(), 0);

    // The same count over HTTP/2, where it fits well inside the bytes
    // allowed; and as many as allowed pass.
    let tcp = TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = common::client::h2_handshake(tcp).await;
    // Cookies sent one to a field, as browsers do over HTTP/2, count as
    // the one Cookie line they are over HTTP/1.1.
    for (n, crumbs, status) in [(40, 0, 431), (19, 0, 200), (18, 60, 200)] {
        let mut req = http::Request::get(format!("http://portal:{}/", v.addr.port()));
        for i in 0..n {
            req = req.header(format!("x-h{i}"), "1");
        }
        for i in 0..crumbs {
            req = req.header("cookie", format!("c{i}=1"));
        }
        let resp = h2
            .send_request(req.body(varco::body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            status,
            "{n} headers and {crumbs} cookies over HTTP/2"
        );
    }
    assert_eq!(
        up.hits(),
        2,
        "only the requests within the count reached the portal"
    );
}

/// varco's default header count is hyper's own, which varco then leaves
/// unset (hyper is faster without one given): the limit must hold anyway.
#[tokio::test]
async fn the_default_header_count_holds_without_being_configured() {
    assert_eq!(varco::config::file::DEFAULT_MAX_HEADERS, 100);
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let head = |n: usize| {
        // n headers: Host, Connection and n - 2 others.
        let mut h = String::from("GET /echo HTTP/1.1\r\nHost: portal\r\n");
        for i in 2..n {
            h.push_str(&format!("X-H{i}: 1\r\n"));
        }
        h.push_str("Connection: close\r\n\r\n");
        h
    };
    let resp = raw(v.addr, head(100).as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(up.hits(), 1, "100 headers reached the upstream");
    let resp = raw(v.addr, head(101).as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert_eq!(up.hits(), 1, "101 headers did not");
}

#[tokio::test]
async fn malformed_request_gets_400_not_a_panic() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let resp = raw(
        v.addr,
        b"GARBAGE\x01\x02 / HTTP/9\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(get(&v.url("/echo")).await.status, 200, "still serving");
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nkeepalive_timeout = \"500ms\"",
    ))
    .await;
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: portal\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut all = Vec::new();
    // The response arrives, then the idle connection is closed (EOF).
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all)).await;
    assert!(r.is_ok(), "idle connection still open after 5 s");
    assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 200"));
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before the idle timeout"
    );
}

/// An HTTP/1 request whose method is `PRI` (the start of the HTTP/2
/// preface, but not the rest of it) is served as HTTP/1, and its head is
/// timed as any other's: a trickle of header lines is cut at
/// `header_read_timeout`, not at the keep-alive's 60 s.
#[tokio::test]
async fn a_head_that_begins_as_http2_does_is_still_timed() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"60s\"",
    ))
    .await;
    let mut slow = TcpStream::connect(v.addr).await.unwrap();
    slow.write_all(b"PRI /x HTTP/1.1\r\nHost: portal\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    trickle_head(&mut slow).await;
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(8),
        "the slow head held on for {cut_after:?}"
    );
}

/// An idle keep-alive connection lasts `keepalive_timeout`, not the header
/// timeout: the next request's head is timed from its first byte (hyper
/// timed it from the end of the last answer, so a balancer keeping
/// connections 60 s met closed ones after 30).
#[tokio::test]
async fn a_keepalive_outlasts_the_header_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"30s\"",
    ))
    .await;
    let tcp = TcpStream::connect(v.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for round in 0..2 {
        let req = http::Request::get("/echo")
            .header("host", "portal")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request {round}: {e}"));
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        if round == 0 {
            // Idle past the header timeout, well within the keep-alive:
            // the time that passes is what is tested.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
    }
    assert!(!conn.is_finished(), "the connection is still open");
}

/// A connection that sends nothing at all is closed after
/// `header_read_timeout`, not kept for `keepalive_timeout`.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"60s\"",
    ))
    .await;
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    let started = Instant::now();
    let mut all = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
    assert!(r.is_ok(), "a silent connection still open after 10 s");
    assert!(all.is_empty(), "{}", String::from_utf8_lossy(&all));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn connections_past_the_cap_wait_instead_of_being_served() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "[server]\nmax_connections = 1")).await;
    assert_eq!(
        common::client::metric(v.admin, "varco_max_connections", "").await,
        Some(1.0),
        "the cap, beside varco_open_connections"
    );
    // The first connection holds the only slot.
    let mut first = TcpStream::connect(v.addr).await.unwrap();
    first
        .write_all(b"GET /echo HTTP/1.1\r\nHost: p\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    // A second one is not served while the first stays open...
    let waiting = tokio::spawn(raw(
        v.addr,
        b"GET /echo HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "second connection served past max_connections"
    );
    assert_eq!(up.hits(), 1);
    // ...and is served once the first closes.
    drop(first);
    let resp = waiting.await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_with_408() {
    // Read whole by varco (the default), or streamed to the portal.
    for request_buffer in ["1MiB", "0"] {
        stalled_body_is_cut_off(request_buffer).await;
    }
}

async fn stalled_body_is_cut_off(request_buffer: &str) {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        &format!(
            "[server]\nbody_read_timeout = \"500ms\"\n[upstream]\nrequest_buffer = \"{request_buffer}\""
        ),
    ))
    .await;
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await
        .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 408") || text.is_empty(),
        "request_buffer {request_buffer}: {text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "held for {:?}",
        started.elapsed()
    );
    assert_eq!(get(&v.url("/echo")).await.status, 200, "others are served");
}

/// Sends a GET on `s` and reads the first bytes of the answer: `""` when
/// the connection was closed instead.
async fn ask(mut s: TcpStream) -> (TcpStream, String) {
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: p\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    (s, String::from_utf8_lossy(&buf[..n]).to_string())
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((from, 0).into()).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nmax_connections_per_ip = 2",
    ))
    .await;
    let (a, ra) = ask(TcpStream::connect(v.addr).await.unwrap()).await;
    let (b, rb) = ask(TcpStream::connect(v.addr).await.unwrap()).await;
    assert_eq!((ra.as_str(), rb.as_str()), ("HTTP/1.1 200", "HTTP/1.1 200"));
    // A third from the same address is closed at once...
    let mut third = TcpStream::connect(v.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /echo HTTP/1.1\r\nHost: p\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf)).await;
    assert!(
        buf.is_empty(),
        "served past the per-address limit: {}",
        String::from_utf8_lossy(&buf)
    );
    // ...and counted, for the operator's alert (carrier NAT).
    let dropped = |reason: &'static str| async move {
        common::client::metric(
            v.admin,
            "varco_connections_dropped_total",
            &format!("reason=\"{reason}\""),
        )
        .await
    };
    assert_eq!(dropped("per_address").await, Some(1.0));
    assert_eq!(dropped("proxy_header").await, Some(0.0));
    // ...while another address is served.
    let (_c, rc) = ask(connect_from([127, 0, 0, 2], v.addr).await).await;
    assert_eq!(rc, "HTTP/1.1 200");
    // Closing one frees its place.
    drop(a);
    let mut again = None;
    for _ in 0..50 {
        let (s, r) = ask(TcpStream::connect(v.addr).await.unwrap()).await;
        if r == "HTTP/1.1 200" {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the freed place was not given back");
    drop(b);
}

/// On a dual-stack listener (`[::]`) IPv4 clients arrive as
/// `::ffff:a.b.c.d`: each still counts as its own address, not as one
/// IPv6 subscriber's /64 all of them would share, so one busy address
/// does not shut out every IPv4 citizen.
#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_count_one_by_one() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nlisten = \"[::]:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_connections_per_ip = 1",
    ))
    .await;
    let at = std::net::SocketAddr::from(([127, 0, 0, 1], v.addr.port()));
    let ask = |from: [u8; 4]| async move { ask(connect_from(from, at).await).await };
    let (_held, first) = ask([127, 0, 0, 1]).await;
    assert_eq!(first, "HTTP/1.1 200");
    let (_, same) = ask([127, 0, 0, 1]).await;
    assert_eq!(same, "", "the limit holds for the same address");
    let (_, other) = ask([127, 0, 0, 2]).await;
    assert_eq!(other, "HTTP/1.1 200", "another IPv4 address was shut out");
}

/// A client that asks for a large response and stops reading it is
/// disconnected after `send_timeout`, though a request is in flight (the
/// keep-alive idle timeout does not apply then).
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nsend_timeout = \"1s\"\nkeepalive_timeout = \"60s\"\n[log]\naccess = false",
    ))
    .await;
    let open = || async {
        common::client::metric(v.admin, "varco_open_connections", "")
            .await
            .unwrap_or(0.0) as u64
    };
    let mut reader = TcpStream::connect(v.addr).await.unwrap();
    reader
        .write_all(b"GET /download?bytes=1000000000 HTTP/1.1\r\nHost: portal\r\n\r\n")
        .await
        .unwrap();
    // The response starts (the head arrives), then nothing more is read.
    let mut head = [0u8; 512];
    let n = reader.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(open().await, 1, "the reader's connection is open");
    let mut closed = false;
    for _ in 0..200 {
        if open().await == 0 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed,
        "a client reading nothing still holds its connection"
    );
    assert_eq!(get(&v.url("/echo")).await.status, 200, "others are served");
    drop(reader);
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_SETTINGS: u8 = 0x4;
const H2_PING: u8 = 0x6;

fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// An HTTP/2 client on raw TCP that sends a PING every 100 ms and never a
/// request; `polite` ones acknowledge varco's PINGs (and SETTINGS), as
/// every real client does. Returns how long varco kept it open, or None
/// if it still was after 10 s.
async fn pinger(v: &Varco, polite: bool) -> Option<Duration> {
    let mut tcp = TcpStream::connect(v.addr).await.unwrap();
    tcp.write_all(H2_PREFACE).await.unwrap();
    tcp.write_all(&h2_frame(H2_SETTINGS, 0, &[])).await.unwrap();
    let started = Instant::now();
    let ping = h2_frame(H2_PING, 0, &[7u8; 8]);
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return None,
            _ = every.tick() => {
                if tcp.write_all(&ping).await.is_err() {
                    return Some(started.elapsed());
                }
            }
            r = tcp.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return Some(started.elapsed()),
                    Ok(n) => n,
                };
                seen.extend_from_slice(&buf[..n]);
                // Whole frames: acknowledge varco's PINGs and SETTINGS.
                while seen.len() >= 9 {
                    let len = u32::from_be_bytes([0, seen[0], seen[1], seen[2]]) as usize;
                    if seen.len() < 9 + len {
                        break;
                    }
                    let (kind, flags) = (seen[3], seen[4]);
                    let payload = seen[9..9 + len].to_vec();
                    seen.drain(..9 + len);
                    let ack = match (kind, flags & 1) {
                        (H2_PING, 0) => Some(h2_frame(H2_PING, 1, &payload)),
                        (H2_SETTINGS, 0) => Some(h2_frame(H2_SETTINGS, 1, &[])),
                        _ => None,
                    };
                    if let (true, Some(ack)) = (polite, ack) {
                        if tcp.write_all(&ack).await.is_err() {
                            return Some(started.elapsed());
                        }
                    }
                }
            }
        }
    }
}

/// An HTTP/2 client that only pings: bytes move both ways, nothing is
/// asked. Like a client that sends nothing, it is closed once idle; one
/// that also ignores varco's own PINGs is closed as well.
#[tokio::test]
async fn an_http2_connection_that_only_pings_is_closed_when_idle() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nkeepalive_timeout = \"500ms\"",
    ))
    .await;
    let (polite, rude) = tokio::join!(pinger(&v, true), pinger(&v, false));
    let polite = polite.expect("a client that only pings stayed open");
    assert!(
        polite >= Duration::from_millis(400),
        "closed before the idle timeout"
    );
    rude.expect("a client that ignores varco's PINGs stayed open");
    assert_eq!(up.hits(), 0);
}

/// An HTTP/2 connection that asks nothing (its preface, then only pings)
/// is closed at `header_read_timeout`, as an HTTP/1 one that sends no
/// whole head, not kept for `keepalive_timeout`.
#[tokio::test]
async fn an_http2_connection_that_asks_nothing_is_closed_at_the_header_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"60s\"",
    ))
    .await;
    let kept = pinger(&v, true)
        .await
        .expect("an HTTP/2 connection that asked nothing stayed open 10 s");
    assert!(kept >= Duration::from_millis(900), "closed after {kept:?}");
    assert_eq!(up.hits(), 0);
}

/// The header timeout is an HTTP/2 connection's first request's only:
/// one served, then idle past it (well within the keep-alive), still
/// takes the next request, and a first request whose body takes longer
/// than it (its head came whole) is not cut.
#[tokio::test]
async fn an_http2_connection_that_asked_outlasts_the_header_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"30s\"",
    ))
    .await;
    let tcp = TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = common::client::h2_handshake(tcp).await;
    let (sending, parts) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    let frames = futures_util::stream::unfold(parts, |mut parts| async move {
        let part = parts.recv().await?;
        Some((
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(part)),
            parts,
        ))
    });
    let upload = http::Request::post(format!("http://portal:{}/echo", v.addr.port()))
        .body(varco::body::stream(http_body_util::StreamBody::new(frames)))
        .unwrap();
    let answer = tokio::spawn(h2.send_request(upload));
    sending
        .send(bytes::Bytes::from_static(b"first half, "))
        .await
        .unwrap();
    // Past the header timeout, the body not whole yet: the time that
    // passes is what is tested.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sending
        .send(bytes::Bytes::from_static(b"second half"))
        .await
        .unwrap();
    drop(sending);
    let resp = answer.await.unwrap().expect("the upload answered");
    assert_eq!(resp.status(), 200);
    // Idle past the header timeout, then asked again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = http::Request::get(format!("http://portal:{}/echo", v.addr.port()))
        .body(varco::body::empty())
        .unwrap();
    let resp = h2.send_request(again).await.expect("asked again");
    assert_eq!(resp.status(), 200);
}

/// An HTTP/2 response still being sent keeps its connection busy: the
/// portal trickles it out for longer than the idle timeout, and the
/// client then asks again on the same connection.
#[tokio::test]
async fn an_http2_response_still_coming_keeps_its_connection() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nkeepalive_timeout = \"500ms\"",
    ))
    .await;
    let tcp = TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = common::client::h2_handshake(tcp).await;
    let url = |p: &str| format!("http://portal:{}{p}", v.addr.port());
    let started = Instant::now();
    let req = http::Request::get(url("/trickle?chunks=12&ms=100"))
        .body(varco::body::empty())
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = common::client::read(resp).await;
    assert_eq!(got.body.len(), 12 * 1024);
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the response came faster than twice the idle timeout: the test proves nothing"
    );
    h2.ready().await.expect("the connection is still open");
    let again = h2
        .send_request(
            http::Request::get(url("/echo"))
                .body(varco::body::empty())
                .unwrap(),
        )
        .await
        .expect("a second request on the same connection");
    assert_eq!(again.status(), 200);
}

/// At a stop, one `shutdown_grace` covers both listeners, and what is
/// still open when it ends is closed then, before the last snapshot: an
/// operator's download on the admin port got a second grace (stretching
/// the exit past a supervisor's kill, which loses the last snapshot), and
/// a citizen's request left open went on being served (and could admit
/// somebody) after the snapshot.
#[tokio::test]
async fn the_shutdown_grace_is_one_deadline_and_ends_what_is_left() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-grace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An admission log far larger than the loopback's socket buffers: a
    // download of it that is never read holds its connection.
    let log = dir.join("audit.log");
    std::fs::write(&log, format!("{}\n", "x".repeat(1023)).repeat(64 << 10)).unwrap();
    std::env::set_var("VARCO_TEST_GRACE_TOKENS", "anna:grace-token-0123456789");
    let v = Varco::start(&room_config(
        &[up.addr],
        &format!(
            "[server]\nshutdown_grace = \"2s\"\n[admin]\ntokens_env = \"VARCO_TEST_GRACE_TOKENS\"\n\
             [audit]\nlog = \"{}\"",
            log.display()
        ),
    ))
    .await;

    let mut download = TcpStream::connect(v.admin).await.unwrap();
    download
        .write_all(
            b"GET /api/audit HTTP/1.1\r\nHost: admin\r\n\
              Authorization: Bearer grace-token-0123456789\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = [0u8; 12];
    download.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let citizen = tokio::spawn(raw(
        v.addr,
        b"GET /slow?ms=20000 HTTP/1.1\r\nHost: portal\r\n\r\n",
        Duration::from_secs(25),
    ));
    while up.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let stopping = Instant::now();
    v.stop().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "the stop took {took:?} with a 2 s grace"
    );
    // Closed at the grace, not answered by a varco that has stopped.
    let answer = tokio::time::timeout(Duration::from_secs(5), citizen)
        .await
        .expect("the citizen's connection is closed at the end of the grace")
        .unwrap();
    assert!(
        !answer.contains("slow done"),
        "served after the stop: {answer}"
    );
    // What was in the sockets' buffers, then the end: not the whole log.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), download.read_to_end(&mut rest))
        .await
        .expect("the download's connection is closed at the end of the grace");
    assert!(
        (rest.len() as u64) < std::fs::metadata(&log).unwrap().len(),
        "the download went on after the stop: {} bytes",
        rest.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A portal may answer before an upload ends (the head of its answer at
/// once, the rest when it has read everything). The upload's bytes after
/// that head are still the request's body, not the next request's head
/// under `header_read_timeout` (which cut such an upload there).
#[tokio::test]
async fn an_upload_the_portal_answered_early_is_not_cut_by_the_header_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nheader_read_timeout = \"1s\"\n[upstream]\nrequest_buffer = \"0\"",
    ))
    .await;
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    s.write_all(
        b"POST /duplex HTTP/1.1\r\nHost: portal\r\nContent-Length: 600\r\n\
          Connection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the portal's early answer")
            .unwrap();
        assert!(n > 0, "closed before the answer's head");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // 2.4 s of upload, well past the header timeout, after the answer.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if s.write_all(&[b'u'; 100]).await.is_err() {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("\r\n600\r\n"),
        "the portal did not get the whole upload: {text}"
    );
}
