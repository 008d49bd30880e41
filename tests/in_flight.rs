//! The in-flight cap towards the upstream: an admitted person's request
//! over the cap waits for a slot instead of failing; past the queue or
//! the wait it gets a 503 with Retry-After, and keeps the pass.

mod common;

use std::time::Duration;

use common::client::get;
use common::gated::{gated_config, Citizen, Gated};
use common::upstream;

async fn metric(g: &Gated, name: &str, labels: &str) -> Option<f64> {
    common::client::metric(g.admin, name, labels).await
}

/// Polls `cond` (5 s at most) until it holds: the readiness signal of a
/// request that is now held by the upstream or queued in varco.
async fn until(what: &str, cond: impl AsyncFnMut() -> bool) {
    common::client::until(what, Duration::from_secs(5), cond).await
}

/// Waits (5 s at most) until the upstream holds `n` requests at once.
async fn at_upstream(up: &upstream::Upstream, n: usize) {
    until(&format!("{n} requests at the upstream"), async || {
        up.in_flight.load(std::sync::atomic::Ordering::SeqCst) == n
    })
    .await
}

fn hold(mut c: Citizen, ms: u64) -> tokio::task::JoinHandle<(Citizen, u16)> {
    tokio::spawn(async move {
        let got = c.get(&format!("/slow?ms={ms}")).await;
        (c, got.status)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_requests_wait_then_get_503_and_keep_their_pass() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "admission_per_minute = 6000\nin_flight = { limit = 2, queue = 1, wait = \"1s\" }",
    ))
    .await;
    // One tick fills the rate's bucket: everyone below is admitted at once.
    g.advance(1_000).await;
    assert_eq!(
        metric(&g, "varco_room_in_flight_limit", "portal").await,
        Some(2.0)
    );

    // Two people hold both slots for a moment; a third waits in line and
    // is served when one comes free, not refused.
    let (a, b) = (hold(g.citizen(), 600), hold(g.citizen(), 600));
    at_upstream(&up, 2).await;
    let mut c = g.citizen();
    let got = c.get("/").await;
    assert!(got.reached_upstream(), "{} {}", got.status, got.text());
    let (a, a_status) = a.await.unwrap();
    let (b, b_status) = b.await.unwrap();
    assert_eq!((a_status, b_status), (200, 200));
    let waited = get(&format!("http://{}/metrics", g.admin)).await.text();
    assert!(
        waited.contains("varco_in_flight_wait_seconds_count{room=\"portal\"} 1"),
        "the third request waited for its slot:\n{waited}"
    );

    // Now both slots are held for long: one more waits (the queue holds
    // one), and a newcomer finds the queue full.
    let (a, b) = (hold(a, 5000), hold(b, 5000));
    at_upstream(&up, 2).await;
    let queued = tokio::spawn(async move {
        let got = c.get("/").await;
        (c, got)
    });
    until("one request queued in varco", async || {
        metric(&g, "varco_room_in_flight_queued", "portal").await == Some(1.0)
    })
    .await;
    let mut d = g.citizen();
    let full = d.get("/").await;
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.headers.contains_key("retry-after"));
    assert!(
        full.headers.get("refresh").is_none(),
        "no page asking again by itself: it would keep a walked-away person's session alive"
    );
    // In the room's language, with the request's ID to quote.
    let id = full.headers["x-request-id"].to_str().unwrap();
    assert!(
        full.text()
            .contains("Sei già dentro e non perdi il tuo posto")
            && full.text().contains(&format!("<code>{id}</code>")),
        "{}",
        full.text()
    );
    assert!(
        d.cookie("varco_pass_portal").is_some(),
        "admitted on this very request: the pass comes with the 503"
    );
    let (mut c, timed_out) = queued.await.unwrap();
    assert_eq!(timed_out.status, 503, "waited past the wait: refused");
    assert!(timed_out.headers.contains_key("retry-after"));
    assert_eq!(
        metric(&g, "varco_rejected_total", "reason=\"in_flight_full\"").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&g, "varco_rejected_total", "reason=\"in_flight_wait\"").await,
        Some(1.0)
    );

    // Once the slots come free, both refused people get through on the
    // passes they hold: nobody was sent back to the waiting room.
    let (_, a_status) = a.await.unwrap();
    let (_, b_status) = b.await.unwrap();
    assert_eq!((a_status, b_status), (200, 200));
    for p in [&mut c, &mut d] {
        let got = p.get("/").await;
        assert!(got.reached_upstream(), "{} {}", got.status, got.text());
    }
    assert_eq!(
        metric(&g, "varco_room_in_flight", "portal").await,
        Some(0.0),
        "every slot came back"
    );
}

/// A reload rebuilds the room, not its slots: requests held across it
/// still count against the cap, so the portal never carries the old
/// requests and a new cap's worth beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_across_a_reload_still_count() {
    let up = upstream::spawn().await;
    let cfg = gated_config(
        up.addr,
        "admission_per_minute = 6000\nin_flight = { limit = 2, queue = 0, wait = \"1s\" }",
    );
    let (g, file) = Gated::start_written("in-flight", &cfg).await;
    g.advance(1_000).await;
    let (a, b) = (hold(g.citizen(), 3000), hold(g.citizen(), 3000));
    at_upstream(&up, 2).await;
    std::fs::write(&file, cfg.replace("wait = \"1s\"", "wait = \"2s\"")).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(
        metric(&g, "varco_room_in_flight", "portal").await,
        Some(2.0),
        "the held requests count after the reload"
    );
    let mut c = g.citizen();
    let got = c.get("/").await;
    assert_eq!(
        got.status,
        503,
        "a third request beside two held: {}",
        got.text()
    );
    let ((_, a_status), (_, b_status)) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!((a_status, b_status), (200, 200));
    let got = c.get("/").await;
    assert!(got.reached_upstream(), "{} {}", got.status, got.text());
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

#[tokio::test]
async fn adaptive_rooms_export_their_signals() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"250ms\" }\n\
         in_flight = { limit = 16, adaptive = true }",
    ))
    .await;
    let mut c = g.citizen();
    assert!(c.get("/").await.reached_upstream());
    let text = get(&format!("http://{}/metrics", g.admin)).await.text();
    for name in [
        "varco_adaptive_failure_ratio",
        "varco_adaptive_target_latency_seconds",
        "varco_adaptive_min_per_minute",
        "varco_adaptive_max_per_minute",
        "varco_room_in_flight",
        "varco_room_in_flight_limit",
        "varco_room_in_flight_queued",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} not exported"
        );
    }
    // The rate starts at the floor when no admission_per_minute is given.
    assert_eq!(
        metric(&g, "varco_room_admission_rate_per_minute", "portal").await,
        Some(60.0)
    );
    // One healthy interval with someone waiting raises it (the tick is
    // the test's; the answer above is the evidence).
    let mut waiting = g.citizen();
    for _ in 0..20 {
        waiting.get("/").await;
    }
    g.advance(3_000).await;
    let raised = metric(&g, "varco_room_admission_rate_per_minute", "portal")
        .await
        .unwrap();
    assert!(raised > 60.0, "rate still {raised}");
    assert!(metric(
        &g,
        "varco_adaptive_adjustments_total",
        "direction=\"increase\""
    )
    .await
    .is_some_and(|n| n >= 1.0));
}

#[test]
fn bad_adaptive_and_in_flight_tables_are_named() {
    let err = varco::config::Config::from_toml(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:1\"]\n\
         admission_per_minute = 5000\n\
         adaptive = { min_per_minute = 600, max_per_minute = 60, target_latency = \"0s\", backoff = 1.5 }\n\
         in_flight = { limit = 0, adaptive = true }\n\
         [rooms.other]\nupstreams = [\"http://127.0.0.1:1\"]\npaths = [\"/other\"]\n\
         in_flight = { limit = 4, adaptive = true }\n\
         [rooms.slow]\nupstreams = [\"http://127.0.0.1:1\"]\npaths = [\"/slow\"]\n\
         adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"2s\" }\n",
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    for key in [
        "rooms.portal.adaptive.max_per_minute",
        "rooms.portal.adaptive.target_latency",
        "rooms.portal.adaptive.backoff",
        "rooms.portal.admission_per_minute",
        "rooms.portal.in_flight.limit",
        "rooms.other.in_flight.adaptive",
        // A target as long as the interval: slow answers would never be
        // seen before the next raise.
        "rooms.slow.adaptive.interval",
    ] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
}

/// A portal that goes on with a request whatever becomes of the
/// connection it came on (as PHP, WSGI or a Java servlet does): each
/// request holds it for `work`, then is answered. Counts the requests it
/// works on at once, and the most it ever did.
async fn works_on_regardless(
    work: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (running, peak) = (r.clone(), p.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(work).await;
                running.fetch_sub(1, Ordering::SeqCst);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone",
                    )
                    .await;
            });
        }
    });
    (addr, running, peak)
}

/// A person who gives up on a request (a reload, a tab closed) leaves
/// the portal working on it: its slot is held until the portal answers.
/// Freed at once, a crowd pressing reload would pile new requests onto a
/// portal still busy with the old ones, past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_on_keeps_its_slot_until_the_portal_answers() {
    use std::sync::atomic::Ordering;
    let (addr, running, peak) = works_on_regardless(Duration::from_millis(1500)).await;
    let g = Gated::start(&gated_config(
        addr,
        "in_flight = { limit = 1, wait = \"5s\" }",
    ))
    .await;
    let mut a = g.citizen();
    let gave_up = tokio::spawn(async move { a.get("/report").await });
    until("the portal works on the first request", async || {
        running.load(Ordering::SeqCst) == 1
    })
    .await;
    gave_up.abort();
    let _ = gave_up.await;
    let mut b = g.citizen();
    let got = b.get("/report").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "the portal never had more than the cap"
    );
}

/// A person who closes the tab on a slow final submit: the portal's
/// answer releases the session all the same, and the slot goes to the
/// next in line at once, not when the session idles out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_nobody_waited_for_still_ends_the_session() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nin_flight = { limit = 4 }",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let submit = tokio::spawn(async move { a.get("/release?ms=1500").await });
    at_upstream(&up, 1).await;
    submit.abort();
    let _ = submit.await;
    until("varco sees the client gone", async || {
        metric(&g, "varco_requests_total", "class=\"4xx\",room=\"portal\"").await == Some(1.0)
    })
    .await;
    assert_eq!(
        up.in_flight.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "before the portal's answer"
    );
    // No clock movement: only the release ticks.
    until("the next in line is called", async || {
        b.status("portal").await["state"] == "admitted"
    })
    .await;
    assert!(b.get("/").await.reached_upstream());
}

/// With `per_session`, one pass's session holds at most that many slots.
/// A client that gives its requests up as soon as they go out (each slot
/// held until the portal answers) waits behind its own, and is refused
/// as such (429, not the room's 503), while everyone else admitted walks
/// in. (That its wait is not the portal's, for adaptive admission, is
/// `proxy::in_flight`'s `the_room_wait_leaves_out_the_sessions_own`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_holds_at_most_its_share_of_the_slots() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "admission_per_minute = 6000\nin_flight = { limit = 3, wait = \"1s\", per_session = 1 }",
    ))
    .await;
    g.advance(1_000).await;
    let mut script = g.citizen();
    assert!(script.get("/").await.reached_upstream(), "admitted");
    let mut copy = g.citizen();
    copy.jar = script.jar.clone();
    let given_up = hold(copy, 2_000);
    at_upstream(&up, 1).await;
    given_up.abort();
    assert_eq!(
        metric(&g, "varco_room_in_flight_sessions", "portal").await,
        Some(1.0),
        "one session holds a slot of its own"
    );
    let again = script.get("/").await;
    assert_eq!(again.status, 429, "{}", again.text());
    assert!(again.headers.contains_key("retry-after"));
    assert!(script.cookie("varco_pass_portal").is_some(), "still inside");
    assert_eq!(
        metric(&g, "varco_rejected_total", "reason=\"session_in_flight\"").await,
        Some(1.0)
    );
    assert_eq!(
        metric(&g, "varco_rejected_total", "reason=\"in_flight_wait\"").await,
        Some(0.0)
    );
    let mut other = g.citizen();
    assert!(other.get("/").await.reached_upstream(), "another walks in");
    // Once the portal has answered the given-up request, the session's
    // slot is its own again.
    at_upstream(&up, 0).await;
    assert!(script.get("/").await.reached_upstream());
    until("no session holds a slot", async || {
        metric(&g, "varco_room_in_flight_sessions", "portal").await == Some(0.0)
    })
    .await;
}

/// An upload at the pace of the person's line is not the portal's
/// slowness: while its body is still coming in, the request is not
/// counted as waiting for the portal's answer, so it cuts nobody's rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_steer_adaptive_admission() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream::spawn().await;
    let room = gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1h\"\nadmission_per_minute = 300\n\
         adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"250ms\", interval = \"1s\" }",
    );
    let g = Gated::start(&format!("[upstream]\nrequest_buffer = \"0\"\n{room}")).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    assert!(g.citizen().get("/").await.is_waiting_page());
    let room = g.app.room("portal").unwrap();
    let start = room.per_minute().unwrap();
    let cookies: Vec<String> = holder.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut s = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: portal\r\nCookie: {}\r\nContent-Length: 10\r\n\r\nx",
        cookies.join("; ")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    at_upstream(&up, 1).await;
    // The person's line goes quiet past the target latency, over three
    // of the controller's intervals (the waits are on the real clock,
    // which the pending requests are timed on; the intervals on the
    // test's).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        g.advance(1_000).await;
    }
    let now = room.per_minute().unwrap();
    assert!(now >= start, "the rate was cut from {start} to {now}");
    s.write_all(b"xxxxxxxxx").await.unwrap();
    let mut answer = vec![0u8; 12];
    s.read_exact(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

/// Requests the gate lets through without a pass (here an exempt path)
/// are not brought by the admission rate: the cap turning a flood of
/// them away, or their slow answers, must not cut the rate for everyone
/// in line. Anyone can send them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_pass_do_not_steer_adaptive_admission() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1h\"\nexempt_paths = [\"/slow\"]\nadmission_per_minute = 300\n\
         adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"250ms\", interval = \"1s\" }\n\
         in_flight = { limit = 1, queue = 1, wait = \"1s\" }",
    ))
    .await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    assert!(g.citizen().get("/").await.is_waiting_page());
    let room = g.app.room("portal").unwrap();
    let start = room.per_minute().unwrap();
    // A slow exempt request holds the one slot; more queue and are
    // turned away.
    let slow = hold(g.citizen(), 1_500);
    at_upstream(&up, 1).await;
    let flood: Vec<_> = (0..4).map(|_| hold(g.citizen(), 1)).collect();
    let mut refused = 0;
    for f in flood {
        if f.await.unwrap().1 == 503 {
            refused += 1;
        }
    }
    assert!(refused >= 3, "the cap turned the flood away: {refused}");
    g.advance(1_000).await;
    slow.await.unwrap();
    g.advance(1_000).await;
    let now = room.per_minute().unwrap();
    assert!(now >= start, "the rate was cut from {start} to {now}");
}
