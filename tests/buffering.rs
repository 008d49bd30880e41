//! Request buffering: a body is read whole before the portal is asked, so
//! a slow upload holds no portal connection or in-flight slot, and a body
//! read whole can go to the next upstream; past the per-request size or
//! the memory for all of them, bodies stream, whole and in order.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::client::{get, send};
use common::{dead_addr, room_config, upstream, Varco};
use varco::body;

/// A room on `upstreams` with `room` keys, under `[upstream]` keys.
fn config(upstreams: &[SocketAddr], upstream_table: &str, room: &str) -> String {
    room_config(upstreams, &format!("[upstream]\n{upstream_table}")) + room + "\n"
}

async fn metric(v: &Varco, name: &str, labels: &str) -> Option<f64> {
    common::client::metric(v.admin, name, labels).await
}

async fn until(what: &str, cond: impl AsyncFnMut() -> bool) {
    common::client::until(what, Duration::from_secs(5), cond).await
}

/// Starts a POST of `len` bytes and sends only `sent` of them.
async fn start_upload(v: &Varco, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    let head = format!("POST /upload HTTP/1.1\r\nHost: portal\r\nContent-Length: {len}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'x'; sent]).await.unwrap();
    s
}

/// Sends half of a 10-byte upload and nothing more: varco cuts it off
/// with 408 within 5 s.
async fn assert_half_an_upload_gets_408(v: &Varco) {
    let mut s = start_upload(v, 10, 5).await;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer))
        .await
        .expect("cut off within 5 s")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

/// Sends the rest of an upload begun with `start_upload`; the status line
/// and the body of the answer (the number of bytes the portal got).
async fn finish_upload(mut s: TcpStream, rest: usize) -> (String, String) {
    s.write_all(&vec![b'x'; rest]).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(String::from)
                })
                .and_then(|n| n.trim().parse::<usize>().ok());
            if n == 0 || length.is_some_and(|n| body.len() >= n) {
                let status = head.lines().next().unwrap_or("").to_string();
                return (status, body.to_string());
            }
        }
        assert!(n > 0, "connection closed before an answer");
    }
}

#[tokio::test]
async fn a_slow_upload_reaches_the_portal_only_whole_and_holds_no_slot_meanwhile() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(
        &[up.addr],
        "",
        "in_flight = { limit = 1, queue = 0, wait = \"100ms\" }",
    ))
    .await;
    let upload = start_upload(&v, 10, 5).await;
    // varco has the first half and set memory aside for the whole.
    until("the upload is being read whole", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(10.0)
    })
    .await;
    assert_eq!(
        up.hits(),
        0,
        "the portal has seen nothing of the upload yet"
    );
    // The room's one in-flight slot is free for somebody else.
    let other = get(&v.url("/page")).await;
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(up.hits(), 1);

    let (status, body) = finish_upload(upload, 5).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "10", "the portal got the whole upload");
    assert_eq!(up.hits(), 2);
    assert_eq!(
        metric(&v, "varco_request_bodies_total", "handling=\"buffered\"").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&v, "varco_request_buffer_bytes", "").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn a_body_read_whole_goes_to_the_next_upstream_when_the_first_refuses() {
    let up = upstream::spawn().await;
    let dead = dead_addr();
    // Round robin starts with the first: the dead one.
    let v = Varco::start(&config(&[dead, up.addr], "", "")).await;
    let got = send(
        Request::post(v.url("/form"))
            .body(body::full("name=Ada"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["body"], "name=Ada");
    assert_eq!(
        metric(
            &v,
            "varco_upstream_errors_total",
            &format!("upstream=\"{dead}\"")
        )
        .await,
        Some(1.0),
        "the dead upstream was tried first"
    );
}

/// A body of `pieces` chunks of 300 bytes, each of its own letter, sent
/// without a length (chunked).
fn chunked(pieces: u8) -> (body::Body, String) {
    let chunks: Vec<Bytes> = (0..pieces)
        .map(|i| Bytes::from(vec![b'a' + i; 300]))
        .collect();
    let whole = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let frames = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
    );
    (body::stream(http_body_util::StreamBody::new(frames)), whole)
}

#[tokio::test]
async fn a_body_without_a_length_is_read_whole_or_streamed_past_the_size() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(&[up.addr], "request_buffer = \"1KiB\"", "")).await;

    // Read whole: the portal gets it with its length.
    let (small, sent) = chunked(3);
    let got = send(Request::post(v.url("/small")).body(small).unwrap()).await;
    assert_eq!(got.status, 200);
    let seen = got.json();
    assert_eq!(seen["body"], sent.as_str());
    assert_eq!(seen["headers"]["content-length"][0], "900");
    assert!(seen["headers"]["transfer-encoding"].is_null(), "{seen}");

    // Past 1 KiB: what was read goes first, then the rest as it comes.
    let (large, sent) = chunked(20);
    let got = send(Request::post(v.url("/large")).body(large).unwrap()).await;
    assert_eq!(got.status, 200);
    let seen = got.json();
    assert_eq!(seen["body"], sent.as_str(), "the whole body, in order");
    assert_eq!(seen["headers"]["transfer-encoding"][0], "chunked");
    // A GET's too (hyper's client sends a GET of unknown length with no
    // body at all unless told it is chunked).
    let (large, sent) = chunked(20);
    let got = send(
        Request::get(v.url("/search"))
            .header("transfer-encoding", "chunked")
            .body(large)
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["body"], sent.as_str(), "a GET's body, whole");

    // A declared length past 1 KiB streams from the start.
    let got = send(
        Request::post(v.url("/declared"))
            .body(body::full(vec![b'z'; 2000]))
            .unwrap(),
    )
    .await;
    assert_eq!(got.json()["body"].as_str().map(str::len), Some(2000));

    let handled = async |how: &str| {
        metric(
            &v,
            "varco_request_bodies_total",
            &format!("handling=\"{how}\""),
        )
        .await
    };
    assert_eq!(handled("buffered").await, Some(1.0));
    assert_eq!(handled("streamed_large").await, Some(3.0));
}

#[tokio::test]
async fn bodies_stream_while_the_buffer_memory_is_in_use() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(
        &[up.addr],
        "request_buffer = \"1KiB\"\nrequest_buffer_memory = \"1KiB\"",
        "",
    ))
    .await;
    assert_eq!(
        metric(&v, "varco_request_buffer_limit_bytes", "").await,
        Some(1024.0)
    );
    let upload = start_upload(&v, 1024, 10).await;
    until("the first upload holds all the memory", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(1024.0)
    })
    .await;
    let got = send(
        Request::post(v.url("/second"))
            .body(body::full("second"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["body"], "second");
    assert_eq!(
        metric(
            &v,
            "varco_request_bodies_total",
            "handling=\"streamed_memory_full\""
        )
        .await,
        Some(1.0)
    );
    let (status, body) = finish_upload(upload, 1014).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "1024");
    // With the memory back, the next body is read whole again.
    let got = send(
        Request::post(v.url("/third"))
            .body(body::full("third"))
            .unwrap(),
    )
    .await;
    assert_eq!(got.json()["body"], "third");
    assert_eq!(
        metric(&v, "varco_request_bodies_total", "handling=\"buffered\"").await,
        Some(2.0)
    );
}

#[tokio::test]
async fn a_stalled_upload_being_read_whole_gets_408() {
    let up = upstream::spawn().await;
    let v = Varco::start(&format!(
        "[server]\nbody_read_timeout = \"200ms\"\n{}",
        config(&[up.addr], "", "")
    ))
    .await;
    assert_half_an_upload_gets_408(&v).await;
    assert_eq!(up.hits(), 0, "nothing of it reached the portal");
    assert_eq!(
        metric(&v, "varco_request_buffer_bytes", "").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn a_body_not_whole_in_time_streams_and_gives_its_memory_back() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(&[up.addr], "request_buffer_time = \"300ms\"", "")).await;
    let upload = start_upload(&v, 10, 5).await;
    // Past 300 ms the portal gets what was read, and the rest as it comes.
    until("the portal has the upload's start", async || up.hits() == 1).await;
    until("the memory is given back", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(0.0)
    })
    .await;
    assert_eq!(
        metric(
            &v,
            "varco_request_bodies_total",
            "handling=\"streamed_slow\""
        )
        .await,
        Some(1.0)
    );
    let (status, body) = finish_upload(upload, 5).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "10");
}

#[tokio::test]
async fn an_upload_abandoned_half_way_gives_its_memory_back() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(&[up.addr], "", "")).await;
    let upload = start_upload(&v, 10, 5).await;
    until("the upload is being read whole", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(10.0)
    })
    .await;
    drop(upload);
    until("the memory is given back", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(0.0)
    })
    .await;
    assert_eq!(up.hits(), 0);
}

/// varco answers `Expect: 100-continue` itself (it reads the body); the
/// portal gets the body whole, without the expectation.
#[tokio::test]
async fn an_expectation_of_100_continue_is_answered_by_varco() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(&[up.addr], "", "")).await;
    let mut s = TcpStream::connect(v.addr).await.unwrap();
    s.write_all(
        b"POST /form HTTP/1.1\r\nHost: portal\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .expect("an interim answer within 5 s")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 100 Continue\r\n\r\n");
    let (status, body) = finish_upload(s, 4).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["body"], "xxxx");
    assert!(seen["headers"]["expect"].is_null(), "{seen}");
}

/// An HTTP/2 body without content-length reaches the portal with one.
#[tokio::test]
async fn an_http2_body_without_a_length_gets_one() {
    let up = upstream::spawn().await;
    let v = Varco::start(&config(&[up.addr], "", "")).await;
    let tcp = TcpStream::connect(v.addr).await.unwrap();
    let mut h2 = common::client::h2_handshake(tcp).await;
    let (chunks, sent) = chunked(2);
    let req = Request::post(format!("http://portal:{}/h2", v.addr.port()))
        .body(chunks)
        .unwrap();
    let got = common::client::read(h2.send_request(req).await.unwrap()).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = got.json();
    assert_eq!(seen["body"], sent.as_str());
    assert_eq!(seen["headers"]["content-length"][0], "600");
}

/// A gated room whose `/upload` is exempt, nobody admitted yet
/// (`max_active = 1`, taken by whoever comes first), under `[upstream]`
/// keys `upstream_table`.
fn gated_with_exempt_upload(up: SocketAddr, upstream_table: &str) -> String {
    config(
        &[up],
        &format!("{upstream_table}\n[secrets]\nephemeral = true"),
        "max_active = 1\nexempt_paths = [\"/upload\"]",
    )
}

/// A request the gate let through without a pass (here an exempt path)
/// may not stream its body: past `request_buffer` it is refused (413),
/// not whole within `request_buffer_time` too (408), and while the
/// buffer memory is in use it is told to come back (503). Nobody the gate
/// has not admitted holds a portal connection and a slot for the length
/// of an upload. Someone admitted still streams a large body.
#[tokio::test]
async fn a_body_sent_without_a_pass_comes_whole_or_not_at_all() {
    let up = upstream::spawn().await;
    let v = Varco::start(&gated_with_exempt_upload(
        up.addr,
        "request_buffer = \"1KiB\"\nrequest_buffer_memory = \"1KiB\"",
    ))
    .await;
    let refused = async |handling: &str| {
        let labels = format!("handling=\"{handling}\"");
        metric(&v, "varco_request_bodies_total", &labels).await
    };
    let upload = |body: Vec<u8>, cookie: Option<&str>| {
        let mut b = Request::post(v.url("/upload"));
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        send(b.body(body::full(body)).unwrap())
    };
    let got = upload(vec![b'x'; 2048], None).await;
    assert_eq!(got.status, 413, "{}", got.text());
    assert_eq!(up.hits(), 0, "nothing of it reached the portal");
    assert_eq!(refused("refused_large").await, Some(1.0));
    assert_eq!(refused("streamed_large").await, Some(0.0));

    // One upload holds all the buffer memory: the next is told to wait.
    let first = start_upload(&v, 1024, 10).await;
    until("the first upload holds all the memory", async || {
        metric(&v, "varco_request_buffer_bytes", "").await == Some(1024.0)
    })
    .await;
    let got = upload(b"small".to_vec(), None).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.headers["retry-after"], "5");
    assert_eq!(refused("refused_memory_full").await, Some(1.0));
    let (status, body) = finish_upload(first, 1014).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body, "1024", "a body that fits goes whole");

    // Admitted (the room's one place), the same large body streams.
    let entered = get(&v.url("/")).await;
    let pass = entered.headers["set-cookie"].to_str().unwrap();
    let pass = pass.split(';').next().unwrap().to_string();
    assert!(pass.starts_with("varco_pass_portal="), "{pass}");
    let got = upload(vec![b'x'; 2048], Some(&pass)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.text(), "2048", "the portal got it all");
    assert_eq!(refused("streamed_large").await, Some(1.0));
}

#[tokio::test]
async fn a_body_sent_without_a_pass_not_whole_in_time_gets_408() {
    let up = upstream::spawn().await;
    let v = Varco::start(&gated_with_exempt_upload(
        up.addr,
        "request_buffer_time = \"300ms\"",
    ))
    .await;
    assert_half_an_upload_gets_408(&v).await;
    assert_eq!(up.hits(), 0, "nothing of it reached the portal");
    assert_eq!(
        metric(
            &v,
            "varco_request_bodies_total",
            "handling=\"refused_slow\""
        )
        .await,
        Some(1.0)
    );
}
