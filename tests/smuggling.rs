//! Request smuggling and desync: ambiguous framing from a client is
//! refused (400) or rewritten, never passed on for the upstream to read
//! differently. Raw bytes over TCP, as an attacker would send them.

mod common;

use std::time::Duration;

use common::client::raw;
use common::{room_config, upstream, Varco};

async fn send(v: &Varco, bytes: &str) -> String {
    raw(v.addr, bytes.as_bytes(), Duration::from_secs(3)).await
}

fn status(resp: &str) -> u16 {
    resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The JSON the echo upstream returned, if the request reached it.
fn echoed(resp: &str) -> Option<serde_json::Value> {
    let body = resp.split("\r\n\r\n").nth(1)?;
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    serde_json::from_str(&body[start..=end]).ok()
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_never_passed_on_ambiguously() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let resp = send(
        &v,
        "POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: p\r\n\r\n",
    )
    .await;
    match status(&resp) {
        400 => assert_eq!(up.hits(), 0),
        200 => {
            let j = echoed(&resp).expect("echo");
            assert_eq!(j["body"], "hello", "chunked framing wins, as RFC 9112 says");
            let h = &j["headers"];
            assert!(
                h.get("transfer-encoding").is_none() || h.get("content-length").is_none(),
                "{h}"
            );
            assert_ne!(
                h["content-length"][0], "4",
                "the stale length is not forwarded"
            );
        }
        other => panic!("unexpected {other}: {resp}"),
    }
    assert!(
        !resp.contains("/smuggled"),
        "nothing after the body was treated as a request for the upstream"
    );
    assert!(
        up.hits() <= 1,
        "the trailing bytes never became a second upstream request"
    );
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let resp = send(
        &v,
        "POST /echo HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;
    assert_eq!(status(&resp), 400, "{resp}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn obsolete_line_folding_and_spaces_in_names_are_refused() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    for bad in [
        "GET /echo HTTP/1.1\r\nHost: p\r\nX-Folded: a\r\n  b\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: p\r\nBad Header: x\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: p\r\nBad-Header : x\r\n\r\n",
    ] {
        let resp = send(&v, bad).await;
        assert_eq!(status(&resp), 400, "{bad:?} -> {resp}");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn invalid_chunk_sizes_never_reach_the_upstream_as_a_body() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let resp = send(
        &v,
        "POST /upload HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let code = status(&resp);
    assert!(code == 400 || code == 0 || resp.is_empty(), "{resp}");
    // If the upstream saw the request at all, it saw a failed body, not
    // bytes varco and it could read differently.
    if let Some(j) = echoed(&resp) {
        panic!("a malformed chunk was answered by the upstream: {j}");
    }
}

#[tokio::test]
async fn bare_line_feeds_are_normalised_before_the_upstream() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    let resp = send(
        &v,
        "GET /echo HTTP/1.1\nHost: p\nX-Seen: yes\nConnection: close\n\n",
    )
    .await;
    match status(&resp) {
        400 => assert_eq!(up.hits(), 0),
        200 => {
            // varco parsed it and wrote a fresh, CRLF-framed request.
            let j = echoed(&resp).expect("echo");
            assert_eq!(j["headers"]["x-seen"][0], "yes");
            assert_eq!(j["uri"], "/echo");
        }
        other => panic!("unexpected {other}: {resp}"),
    }
}

#[tokio::test]
async fn an_absolute_form_target_is_forwarded_consistently() {
    let up = upstream::spawn().await;
    let toml = format!(
        "[rooms.portal]\nupstreams = [\"http://{}\"]\nhosts = [\"portal.example.org\"]\n",
        up.addr
    );
    let v = Varco::start(&toml).await;
    // The target's host against Host: RFC 9112 says the target wins, a
    // cache in front may read it so, varco would route by Host. Refused.
    let resp = send(
        &v,
        "GET http://evil.example/echo HTTP/1.1\r\nHost: portal.example.org\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 400, "{resp}");
    assert_eq!(up.hits(), 0);
    // Both naming the portal (any case, a port): routed, and forwarded in
    // origin form with that one host.
    let resp = send(
        &v,
        "GET http://Portal.Example.org:80/echo HTTP/1.1\r\nHost: portal.example.org\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 200, "{resp}");
    let j = echoed(&resp).expect("echo");
    assert_eq!(j["uri"], "/echo");
    assert_eq!(j["headers"]["host"].as_array().map(Vec::len), Some(1));
    assert_eq!(j["headers"]["host"][0], "portal.example.org");
}

/// A Host varco and the portal could read differently is refused: nginx
/// serves `bonus.example.org:1:2` as bonus.example.org, while a lenient
/// router took it for another host and sent it, past the bonus room's
/// gate, to the room serving every other host.
#[tokio::test]
async fn a_host_read_two_ways_never_passes_the_gate() {
    let up = upstream::spawn().await;
    let toml = format!(
        "[secrets]\nephemeral = true\n\
         [rooms.bonus]\nupstreams = [\"http://{up}\"]\nhosts = [\"bonus.example.org\"]\n\
         max_active = 1\nmode = \"queue_all\"\n\
         [rooms.www]\nupstreams = [\"http://{up}\"]\n",
        up = up.addr
    );
    let v = Varco::start(&toml).await;
    for host in [
        "bonus.example.org:1:2",
        "bonus.example.org:80x",
        "bonus.example.org/x",
        "someone@bonus.example.org",
        "bonus.example.org\u{e4}",
        // A list to Spring or Express reading X-Forwarded-Host.
        "bonus.example.org,www.example.org",
    ] {
        let resp = send(
            &v,
            &format!("GET /apply HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status(&resp), 400, "{host:?} -> {resp}");
    }
    let two = "GET /apply HTTP/1.1\r\nHost: www.example.org\r\nHost: bonus.example.org\r\nConnection: close\r\n\r\n";
    assert_eq!(status(&send(&v, two).await), 400, "two Host fields");
    // Without a Host, the target's authority is held to the same syntax.
    let target = "GET http://someone@bonus.example.org/apply HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_eq!(
        status(&send(&v, target).await),
        400,
        "userinfo in the target"
    );
    assert_eq!(up.hits(), 0);
    // Read one way, however written: the bonus room's gate.
    let resp = send(
        &v,
        "GET /apply HTTP/1.1\r\nHost: BONUS.example.org.:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 200, "{resp}");
    assert!(resp.contains("aria-live"), "the waiting page: {resp}");
    assert_eq!(up.hits(), 0);
    let resp = send(
        &v,
        "GET /echo HTTP/1.1\r\nHost: www.example.org:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 200, "{resp}");
}

/// A transfer coding other than chunked (`gzip, chunked`): hyper takes
/// the chunks off and leaves the gzip, which would reach the portal as a
/// plain body it reads as sent. Refused with 501, as nginx does.
#[tokio::test]
async fn a_transfer_coding_besides_chunked_is_refused() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "")).await;
    for coding in ["gzip, chunked", "chunked, chunked", "x-custom,chunked"] {
        let resp = send(
            &v,
            &format!(
                "POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: {coding}\r\n\
                 Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(status(&resp), 501, "{coding}: {resp}");
    }
    // The same over two lines: one list (RFC 9110 5.3).
    let resp = send(
        &v,
        "POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&resp), 501, "{resp}");
    assert_eq!(up.hits(), 0);
    // Chunked alone, in any case, is HTTP/1.1's own framing.
    let resp = send(
        &v,
        "POST /echo HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: Chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(echoed(&resp).expect("echo")["body"], "hello", "{resp}");
}
