//! What a person sees when the upstream fails or the request is refused:
//! 502, 504, 413, as a small page or JSON, never a hang or a panic.

mod common;

use common::client::send;
use common::{dead_addr, room_config, upstream, Varco};
use http::Request;
use varco::body;

#[tokio::test]
async fn unreachable_upstream_is_502_with_a_page_or_json() {
    let v = Varco::start(&room_config(&[dead_addr()], "")).await;
    let got = send(Request::get(v.url("/")).body(body::empty()).unwrap()).await;
    assert_eq!(got.status, 502);
    assert!(got.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(
        got.headers["cache-control"],
        "no-store, private, no-transform"
    );
    assert!(got.text().contains("502"));

    let got = send(
        Request::get(v.url("/"))
            .header("accept", "application/json")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["status"], 502);

    let m = common::client::get(&format!("http://{}/metrics", v.admin))
        .await
        .text();
    assert!(m.contains("kind=\"connect\""), "{m}");
}

/// varco's own page that carries a pass (a 502 to someone just let in)
/// keeps its own Cache-Control, no-transform and all.
#[tokio::test]
async fn an_error_page_with_a_pass_keeps_its_own_cache_control() {
    let toml = room_config(&[dead_addr()], "[secrets]\nephemeral = true") + "max_active = 5\n";
    let v = Varco::start(&toml).await;
    let got = send(Request::get(v.url("/")).body(body::empty()).unwrap()).await;
    assert_eq!(got.status, 502);
    assert!(
        got.headers.contains_key("set-cookie"),
        "a pass: {:?}",
        got.headers
    );
    assert_eq!(
        got.headers["cache-control"],
        "no-store, private, no-transform"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_response_timeout() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        "[upstream]\nresponse_timeout = \"300ms\"",
    ))
    .await;
    let started = std::time::Instant::now();
    let got = send(
        Request::get(v.url("/slow?ms=5000"))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 504);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "504 came after the upstream, not the timeout"
    );
    let fast = send(
        Request::get(v.url("/slow?ms=10"))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(fast.status, 200);
    // The timeout is in the latency histogram at the time it waited, so
    // the p99 panel shows the portal hanging rather than hiding it.
    let seconds =
        |what: &'static str, labels: &'static str| common::client::metric(v.admin, what, labels);
    assert_eq!(
        seconds("varco_upstream_response_seconds_count", "room=\"portal\"").await,
        Some(2.0)
    );
    assert_eq!(
        seconds("varco_upstream_response_seconds_bucket", "le=\"0.25\"").await,
        Some(1.0),
        "only the fast answer came within 0.25 s"
    );
}

/// A room's own `response_timeout` holds for it alone, and a reload
/// changes it (the one in `[upstream]` waits for a restart).
#[tokio::test]
async fn a_rooms_response_timeout_is_its_own_and_a_reload_changes_it() {
    let up = upstream::spawn().await;
    let toml = |portal: &str| {
        format!(
            "[upstream]\nresponse_timeout = \"5s\"\n[rooms.portal]\nupstreams = [\"http://{0}\"]\nresponse_timeout = \"{portal}\"\n[rooms.pdf]\nupstreams = [\"http://{0}\"]\nhosts = [\"pdf.example.it\"]\n",
            up.addr
        )
    };
    let (g, path) = common::gated::Gated::start_written("room-timeout", &toml("300ms")).await;
    let slow = |host: &'static str| {
        Request::get(format!("http://{}/slow?ms=1000", g.addr))
            .header("host", host)
            .body(body::empty())
            .unwrap()
    };
    assert_eq!(send(slow("portal.example.it")).await.status, 504);
    assert_eq!(
        send(slow("pdf.example.it")).await.status,
        200,
        "the other room keeps upstream.response_timeout"
    );
    std::fs::write(&path, toml("3s")).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(send(slow("portal.example.it")).await.status, 200);
}

#[tokio::test]
async fn oversized_body_is_413_declared_or_streamed() {
    // Read whole by varco, streamed after a part was read, or streamed
    // from the start.
    for request_buffer in ["1MiB", "16KiB", "0"] {
        oversized_body_is_413(request_buffer).await;
    }
}

async fn oversized_body_is_413(request_buffer: &str) {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(
        &[up.addr],
        &format!(
            "[server]\nmax_body_size = \"64KiB\"\n[upstream]\nrequest_buffer = \"{request_buffer}\""
        ),
    ))
    .await;
    // Declared too large: refused before anything reaches the upstream.
    let req = Request::post(v.url("/upload"))
        .header("content-length", "1000000")
        .body(upstream::generated(1_000_000))
        .unwrap();
    assert_eq!(send(req).await.status, 413);
    assert_eq!(up.hits(), 0);
    // Chunked, no length: cut when the limit is crossed.
    let req = Request::post(v.url("/upload"))
        .body(upstream::generated(1_000_000))
        .unwrap();
    assert_eq!(send(req).await.status, 413);
    // Within the limit: passes.
    let req = Request::post(v.url("/upload"))
        .body(upstream::generated(60_000))
        .unwrap();
    let got = send(req).await;
    assert_eq!((got.status, got.text()), (200, "60000".to_string()));
}
