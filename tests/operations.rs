//! Operating varco live: the admin API behind its token, mode and limit
//! changes, reloads that keep connections and places, and the metrics
//! Prometheus scrapes, parsed by a real exposition-format parser.

mod common;

use std::time::Duration;

use common::client::{get, send};
use common::gated::{gated_config, Gated};
use common::upstream;
use http::Request;
use varco::body;

const TOKEN: &str = "test-token-0123456789abcdef";

fn with_admin(cfg: &str) -> String {
    std::env::set_var("VARCO_TEST_ADMIN_TOKENS", format!("anna:{TOKEN}"));
    format!("[admin]\ntokens_env = \"VARCO_TEST_ADMIN_TOKENS\"\n{cfg}")
}

async fn api(g: &Gated, method: &str, path: &str, token: Option<&str>) -> common::client::Got {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", g.admin));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(b.body(body::empty()).unwrap()).await
}

#[tokio::test]
async fn the_admin_api_needs_a_configured_token() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    assert_eq!(
        api(&g, "GET", "/api/rooms", Some(TOKEN)).await.status,
        404,
        "no tokens: no API"
    );
    // Said as what it is, for a change too (not "use GET").
    let off = api(&g, "POST", "/api/rooms/portal/pause", Some(TOKEN)).await;
    assert_eq!(off.status, 404);
    assert!(
        off.json()["error"]
            .as_str()
            .unwrap()
            .contains("the admin API is off"),
        "{}",
        off.text()
    );
    assert_eq!(
        get(&format!("http://{}/metrics", g.admin)).await.status,
        200
    );
    drop(g);

    let g = Gated::start(&with_admin(&gated_config(up.addr, "max_active = 1"))).await;
    assert_eq!(api(&g, "GET", "/api/rooms", None).await.status, 401);
    let wrong = api(&g, "GET", "/api/rooms", Some("wrong-token-wrong-token")).await;
    assert_eq!(wrong.status, 401);
    assert!(
        wrong.json()["error"]
            .as_str()
            .unwrap()
            .contains("not accepted"),
        "{}",
        wrong.text()
    );
    let got = api(&g, "GET", "/api/rooms", Some(TOKEN)).await;
    assert_eq!(got.status, 200);
    // A scheme's name is case-insensitive (RFC 9110 11.1).
    let lower = Request::builder()
        .uri(format!("http://{}/api/rooms", g.admin))
        .header("authorization", format!("bearer {TOKEN}"))
        .body(body::empty())
        .unwrap();
    assert_eq!(send(lower).await.status, 200);
    let head = api(&g, "HEAD", "/api/rooms", Some(TOKEN)).await;
    assert_eq!(
        (head.status, head.body.len()),
        (200, 0),
        "HEAD is GET without the body"
    );
    let rooms = got.json()["rooms"].clone();
    assert_eq!(rooms[0]["name"], "portal");
    assert_eq!(rooms[0]["max_active"], 1);
    assert_eq!(rooms[0]["mode"], "queue");

    // HTTP Basic (what a browser caches for the operator page, and sends
    // with a form any other site posts here) reads, and changes nothing.
    use base64::Engine;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("anna:{TOKEN}"))
    );
    let with_basic = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", g.admin))
            .header("authorization", basic.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body::empty())
            .unwrap()
    };
    assert_eq!(send(with_basic("GET", "/api/rooms")).await.status, 200);
    let forged = send(with_basic("POST", "/api/rooms/portal/passthrough")).await;
    assert_eq!(forged.status, 401, "{}", forged.text());
    let got = api(&g, "GET", "/api/rooms", Some(TOKEN)).await;
    assert_eq!(got.json()["rooms"][0]["mode"], "queue", "the mode held");

    // A route asked with the wrong method is said so, with what it takes
    // (RFC 9110 15.5.6), not as a path that is not there.
    for (method, path, allow) in [
        ("GET", "/api/reload", "POST"),
        ("GET", "/api/rooms/portal/pause", "POST"),
        (
            "HEAD",
            "/api/rooms/portal/upstreams/127.0.0.1:1/out",
            "POST",
        ),
        ("POST", "/api/rooms", "GET, HEAD"),
        ("DELETE", "/api/rooms/portal", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
    ] {
        let got = api(&g, method, path, Some(TOKEN)).await;
        assert_eq!(
            (
                got.status,
                got.headers.get("allow").map(|v| v.to_str().unwrap())
            ),
            (405, Some(allow)),
            "{method} {path}: {}",
            got.text()
        );
    }
    for (method, path) in [("GET", "/api/nothing"), ("POST", "/nothing")] {
        let got = api(&g, method, path, Some(TOKEN)).await;
        assert_eq!(got.status, 404, "{method} {path}: {}", got.text());
    }
    let got = api(&g, "GET", "/api/rooms", Some(TOKEN)).await;
    assert_eq!(got.json()["rooms"][0]["mode"], "queue", "nothing changed");
}

/// Without a config file (a demo started without one) there is nothing
/// to reload: said so, not as a file with mistakes, and counted.
#[tokio::test]
async fn a_reload_without_a_file_is_refused_and_counted() {
    let up = upstream::spawn().await;
    let g = Gated::start(&with_admin(&gated_config(up.addr, "max_active = 1"))).await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 409, "{}", got.text());
    assert_eq!(got.json()["reloaded"], false);
    assert_eq!(
        common::client::metric(g.admin, "varco_config_reloads_total", "result=\"refused\"").await,
        Some(1.0)
    );
}

/// An operator pauses a room while a reload is under way (a certificate
/// renewal's hook): the pause waits for the reload and lands on the room
/// it put in force. Made on the room being replaced, it was answered
/// "paused" and lost at the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_change_made_during_a_reload_holds_after_it() {
    let up = upstream::spawn().await;
    let (g, path) = Gated::start_written(
        "live-during-reload",
        &with_admin(&gated_config(up.addr, "max_active = 1")),
    )
    .await;
    // The reload reads the room's page template from a FIFO: it blocks
    // there, its lock held, until the test writes the template.
    let fifo = path.with_file_name("page.fifo");
    common::fifo_at(&fifo);
    std::fs::write(
        &path,
        with_admin(&gated_config(
            up.addr,
            &format!("max_active = 1\npage_template = \"{}\"", fifo.display()),
        )),
    )
    .unwrap();
    let app = g.app.clone();
    let reload = tokio::spawn(async move { app.reload().await.map_err(|e| e.to_string()) });
    let writer = common::fifo_writer_once_read(
        &fifo,
        "the reload reading the template",
        Duration::from_secs(5),
    )
    .await;
    let admin = g.admin;
    let mut pause = tokio::spawn(async move {
        let url = format!("http://{admin}/api/rooms/portal/pause");
        let req = Request::builder()
            .method("POST")
            .uri(url)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(body::empty())
            .unwrap();
        send(req).await
    });
    if let Ok(done) = tokio::time::timeout(Duration::from_secs(2), &mut pause).await {
        panic!("answered during the reload: {:?}", done.map(|g| g.status));
    }
    let mut writer = writer;
    std::io::Write::write_all(
        &mut writer,
        varco::page::waiting::DEFAULT_TEMPLATE.as_bytes(),
    )
    .unwrap();
    drop(writer);
    reload.await.unwrap().expect("reload");
    let paused = pause.await.unwrap();
    assert_eq!(paused.status, 200, "{}", paused.text());
    let state = api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
        .await
        .json();
    assert_eq!(state["mode"], "paused", "{state}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// While a room is paused nobody is called, so no wait can be told: the
/// estimate from before the pause would count down to nothing.
#[tokio::test]
async fn a_paused_room_gives_no_estimate() {
    let up = upstream::spawn().await;
    let g = Gated::start(&with_admin(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    )))
    .await;
    assert!(g.citizen().get("/").await.reached_upstream());
    let (mut b, mut c) = (g.citizen(), g.citizen());
    assert!(b.get("/").await.is_waiting_page());
    assert!(c.get("/").await.is_waiting_page());
    // The first session ends, b is called: the queue moves, as ticks
    // within the minute see it.
    for _ in 0..7 {
        g.advance(10_000).await;
    }
    let s = c.status("portal").await;
    assert!(
        s["eta_seconds"].is_u64(),
        "the queue moved: an estimate {s}"
    );
    api(&g, "POST", "/api/rooms/portal/pause", Some(TOKEN)).await;
    let s = c.status("portal").await;
    assert_eq!(s["paused"], true, "{s}");
    assert!(s["eta_seconds"].is_null(), "{s}");
    let page = c.get("/").await.text();
    assert!(
        page.contains("id=\"eta\">non ancora stimabile<"),
        "nor on the page"
    );
}

#[tokio::test]
async fn rooms_change_live_through_the_api() {
    let up = upstream::spawn().await;
    let g = Gated::start(&with_admin(&gated_config(up.addr, "max_active = 1"))).await;
    let mut first = g.citizen();
    assert!(first.get("/").await.reached_upstream());
    let mut second = g.citizen();
    assert!(second.get("/").await.is_waiting_page());

    // Raise the cap: the next tick lets the second in.
    let got = api(
        &g,
        "POST",
        "/api/rooms/portal/max_active?value=2",
        Some(TOKEN),
    )
    .await;
    assert_eq!(got.json()["max_active"], 2);
    // u64::MAX is the room's own mark for "no cap": taken as a cap, it
    // made none. A cap counts whole sessions.
    for bad in ["0", "-1", "1.5", "1000000001", "18446744073709551615"] {
        let got = api(
            &g,
            "POST",
            &format!("/api/rooms/portal/max_active?value={bad}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(got.status, 400, "max_active {bad}");
        assert!(got.text().contains("whole number"), "{}", got.text());
    }
    let got = api(&g, "POST", "/api/rooms/portal/max_active", Some(TOKEN)).await;
    assert_eq!(got.status, 400);
    assert!(got.text().contains("give ?value=N"), "{}", got.text());
    g.advance(1000).await;
    assert!(second.get("/").await.reached_upstream());
    assert_eq!(
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()["max_active"],
        2,
        "a refused value changes nothing"
    );

    // Pause: nobody new enters even with room to spare.
    api(
        &g,
        "POST",
        "/api/rooms/portal/max_active?value=unlimited",
        Some(TOKEN),
    )
    .await;
    assert_eq!(
        api(&g, "POST", "/api/rooms/portal/pause", Some(TOKEN))
            .await
            .json()["mode"],
        "paused"
    );
    let mut third = g.citizen();
    assert!(third.get("/").await.is_waiting_page());
    g.advance(1000).await;
    assert!(third.get("/").await.is_waiting_page());
    assert!(
        first.get("/").await.reached_upstream(),
        "pass holders carry on while paused"
    );
    // Resume: the queue moves again.
    api(&g, "POST", "/api/rooms/portal/resume", Some(TOKEN)).await;
    g.advance(1000).await;
    assert!(third.get("/").await.reached_upstream());

    // A rate, then close and open.
    let got = api(&g, "POST", "/api/rooms/portal/rate?value=30", Some(TOKEN)).await;
    assert_eq!(got.json()["admission_per_minute"], 30.0);
    // Far above 1e9 a minute the token bucket's burst overflowed to
    // infinity, and the snapshot could not be read back.
    for bad in ["-3", "inf", "infinity", "NaN", "1e306", "1000000001"] {
        let got = api(
            &g,
            "POST",
            &format!("/api/rooms/portal/rate?value={bad}"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(got.status, 400, "rate {bad}");
    }
    assert_eq!(
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()["admission_per_minute"],
        30.0,
        "a refused value changes nothing"
    );
    api(&g, "POST", "/api/rooms/portal/close", Some(TOKEN)).await;
    assert_eq!(g.citizen().get("/").await.status, 503);
    api(&g, "POST", "/api/rooms/portal/open", Some(TOKEN)).await;
    assert_ne!(g.citizen().get("/").await.status, 503);
    assert_eq!(
        api(&g, "POST", "/api/rooms/nowhere/pause", Some(TOKEN))
            .await
            .status,
        404
    );

    // Reset: mode, rate and cap back to the config.
    api(&g, "POST", "/api/rooms/portal/pause", Some(TOKEN)).await;
    let got = api(&g, "POST", "/api/rooms/portal/reset", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let state = got.json();
    assert_eq!(
        (
            &state["mode"],
            &state["admission_per_minute"],
            &state["max_active"]
        ),
        (
            &serde_json::json!("queue"),
            &serde_json::Value::Null,
            &serde_json::json!(1)
        ),
        "{state}"
    );
}

#[tokio::test]
async fn an_operators_brake_holds_on_an_adaptive_room() {
    let up = upstream::spawn().await;
    let g = Gated::start(&with_admin(&gated_config(
        up.addr,
        "adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"250ms\", interval = \"1s\" }\n\
         in_flight = { limit = 8, adaptive = true }",
    )))
    .await;
    let mut c = g.citizen();
    assert!(c.get("/").await.reached_upstream());
    let rate = async || {
        common::client::metric(g.admin, "varco_room_admission_rate_per_minute", "portal").await
    };
    let limit =
        async || common::client::metric(g.admin, "varco_room_in_flight_limit", "portal").await;
    let braked = api(&g, "POST", "/api/rooms/portal/rate?value=10", Some(TOKEN)).await;
    assert_eq!(braked.json()["admission_per_minute"], 10.0);
    // The portal fails: an overload, the cut cannot take the rate up to
    // min_per_minute.
    for _ in 0..5 {
        assert_eq!(c.get("/fail").await.status, 500);
    }
    g.advance(1_000).await;
    assert_eq!(limit().await, Some(5.0), "the verdict was overloaded");
    assert_eq!(rate().await, Some(10.0), "the brake holds");
    // With the rate lifted, the cap still follows the verdicts.
    api(
        &g,
        "POST",
        "/api/rooms/portal/rate?value=unlimited",
        Some(TOKEN),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(c.get("/fail").await.status, 500);
    }
    g.advance(1_000).await;
    assert_eq!(limit().await, Some(3.0), "cut again by backoff");
    // In passthrough the rate is not in force: not cut either, or the
    // room resumed would start at the floor.
    api(&g, "POST", "/api/rooms/portal/rate?value=300", Some(TOKEN)).await;
    api(&g, "POST", "/api/rooms/portal/passthrough", Some(TOKEN)).await;
    for _ in 0..5 {
        assert_eq!(c.get("/fail").await.status, 500);
    }
    g.advance(1_000).await;
    assert_eq!(limit().await, Some(2.0), "the cap still follows");
    assert_eq!(rate().await, Some(300.0), "the rate is left alone");
}

#[tokio::test]
async fn a_bad_reload_is_refused_and_a_good_one_keeps_connections_and_places() {
    let up = upstream::spawn().await;
    let (g, path) = Gated::start_written(
        "reload",
        &with_admin(&gated_config(up.addr, "max_active = 1")),
    )
    .await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut waiting: Vec<_> = (0..3).map(|_| g.citizen()).collect();
    for c in waiting.iter_mut() {
        c.get("/").await;
    }
    let before: Vec<_> = {
        let mut v = Vec::new();
        for c in waiting.iter_mut() {
            v.push(c.status("portal").await["position"].clone());
        }
        v
    };
    // A keep-alive connection open across the reloads (the holder's pass
    // rides on it).
    let pass = format!(
        "varco_pass_portal={}",
        holder.cookie("varco_pass_portal").unwrap()
    );
    let mut conn = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    assert!(ask(&mut conn, &pass).await.starts_with("HTTP/1.1 200"));

    std::fs::write(
        &path,
        "[rooms.portal]\nupstreams = []\nmode = \"sideways\"\n",
    )
    .unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422);
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("rooms.portal.upstreams") && err.contains("rooms.portal.mode"),
        "{err}"
    );
    assert_eq!(
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()["max_active"],
        1,
        "old config stays"
    );

    let good = with_admin(&gated_config(
        up.addr,
        "max_active = 2\nexempt_paths = [\"/static/\"]",
    )) + &format!(
        "[rooms.login]\nupstreams = [\"http://{}\"]\npaths = [\"/login\"]\n",
        up.addr
    );
    std::fs::write(&path, good).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["rooms"], 2);
    assert_eq!(
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()["max_active"],
        2
    );
    assert!(
        ask(&mut conn, &pass).await.starts_with("HTTP/1.1 200"),
        "the open connection survived"
    );
    assert!(
        holder.get("/").await.reached_upstream(),
        "the pass survived"
    );
    for (c, pos) in waiting.iter_mut().zip(before) {
        assert_eq!(c.status("portal").await["position"], pos, "places survived");
    }
    let m = get(&format!("http://{}/metrics", g.admin)).await.text();
    assert!(
        m.contains("varco_config_reloads_total{result=\"refused\"} 1"),
        "{m}"
    );
    assert!(m.contains("varco_config_reloads_total{result=\"ok\"} 1"));
}

#[tokio::test]
async fn a_reload_keeps_an_operators_live_changes_until_a_reset() {
    let up = upstream::spawn().await;
    let file = |limits: &str| with_admin(&gated_config(up.addr, limits));
    let (g, path) = Gated::start_written(
        "live-kept",
        &file("max_active = 5\nadmission_per_minute = 600"),
    )
    .await;
    let state = async || {
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()
    };
    api(&g, "POST", "/api/rooms/portal/pause", Some(TOKEN)).await;
    let braked = api(&g, "POST", "/api/rooms/portal/rate?value=7", Some(TOKEN)).await;
    assert_eq!(braked.status, 200);
    assert_eq!(
        braked.json()["live_changes"],
        serde_json::json!(["mode", "admission_per_minute"])
    );
    // A certificate renewal's reload, with the file's limits changed too:
    // the brake and the pause hold; max_active, not changed live, is the
    // file's.
    std::fs::write(&path, file("max_active = 9\nadmission_per_minute = 900")).unwrap();
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    let s = state().await;
    assert_eq!(s["mode"], "paused", "{s}");
    assert_eq!(s["admission_per_minute"], 7.0, "{s}");
    assert_eq!(s["max_active"], 9, "{s}");
    assert_eq!(
        s["live_changes"],
        serde_json::json!(["mode", "admission_per_minute"])
    );
    // A reset goes back to the file, and the next reload keeps to it.
    api(&g, "POST", "/api/rooms/portal/reset", Some(TOKEN)).await;
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    let s = state().await;
    assert_eq!(s["mode"], "queue", "{s}");
    assert_eq!(s["admission_per_minute"], 900.0, "{s}");
    assert_eq!(s["live_changes"], serde_json::json!([]));
}

#[tokio::test]
async fn a_reload_keeps_an_operators_brake_under_an_adaptive_floor() {
    let up = upstream::spawn().await;
    let (g, _path) = Gated::start_written(
        "brake-kept",
        &with_admin(&gated_config(
            up.addr,
            "adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"250ms\", interval = \"1s\" }",
        )),
    )
    .await;
    api(&g, "POST", "/api/rooms/portal/rate?value=10", Some(TOKEN)).await;
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    let s = api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
        .await
        .json();
    assert_eq!(s["admission_per_minute"], 10.0, "the brake holds: {s}");
}

async fn ask(conn: &mut tokio::net::TcpStream, cookie: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!("GET /echo HTTP/1.1\r\nHost: portal\r\nCookie: {cookie}\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

fn scrape(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid exposition format")
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// A room filling admits many more in its first seconds than its line
/// then moves at: the wait the page, the admin API and the metrics tell
/// is counted from the line's own pace once the room is full (one every
/// 10 s here), not from the admissions of the last minute (8 in 41 s),
/// which would promise the last in line 20 s instead of 40. Filled at the
/// room's rate over a few ticks, some let in straight away, or all
/// through the line (`queue_all`).
#[tokio::test]
async fn the_wait_is_told_from_the_lines_pace_not_the_rooms_filling() {
    for mode in ["queue", "queue_all"] {
        the_wait_is_told_from_the_lines_pace(mode).await;
    }
}

async fn the_wait_is_told_from_the_lines_pace(mode: &str) {
    let up = upstream::spawn().await;
    let room = format!("max_active = 4\nadmission_per_minute = 120\nmode = \"{mode}\"");
    let g = Gated::start(&with_admin(&gated_config(up.addr, &room))).await;
    let mut last =
        common::gated::fill_then_move_one_every_ten_seconds(std::slice::from_ref(&g)).await;
    let s = last.status("portal").await;
    assert_eq!(s["position"], 4, "{mode}: {s}");
    assert_eq!(
        s["eta_seconds"], 40,
        "{mode}: four places at one per 10 s {s}"
    );
    assert_eq!(
        (s["eta_low_seconds"].clone(), s["eta_high_seconds"].clone()),
        (32.into(), 60.into()),
        "{s}"
    );
    let state = api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
        .await
        .json();
    assert_eq!(state["estimated_wait_seconds"], 40, "{state}");
    let metrics = scrape(&get(&format!("http://{}/metrics", g.admin)).await.text());
    assert_eq!(
        value(
            &metrics,
            "varco_room_estimated_wait_seconds",
            &[("room", "portal")]
        ),
        Some(40.0)
    );
    // The admissions reported stay the room's, its filling counted: more
    // than the line's 6 a minute.
    let per_minute = state["observed_admissions_per_minute"].as_f64().unwrap();
    assert!(per_minute > 9.0, "{mode}: {state}");
}

/// Two Prometheus servers scraping at once each get the true figures: the
/// room metrics are filled per scrape, one scrape at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_at_once_report_the_same_counters() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    for _ in 0..5 {
        g.citizen().get("/").await;
    }
    let url = format!("http://{}/metrics", g.admin);
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..100 {
                    let s = scrape(&get(&url).await.text());
                    seen.push(value(
                        &s,
                        "varco_tickets_issued_total",
                        &[("room", "portal")],
                    ));
                }
                seen
            })
        })
        .collect();
    for s in scrapers {
        for v in s.await.unwrap() {
            assert_eq!(v, Some(5.0), "a scrape at the same time as another");
        }
    }
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nadmission_per_minute = 60",
    ))
    .await;
    let metrics_url = format!("http://{}/metrics", g.admin);
    let s0 = scrape(&get(&metrics_url).await.text());
    assert_eq!(
        value(&s0, "varco_room_queue_length", &[("room", "portal")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s0, "varco_room_max_active", &[("room", "portal")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s0,
            "varco_room_admission_rate_per_minute",
            &[("room", "portal")]
        ),
        Some(60.0)
    );
    assert_eq!(
        value(
            &s0,
            "varco_room_mode",
            &[("room", "portal"), ("mode", "queue")]
        ),
        Some(1.0)
    );
    // The process's own: files open against the limit (every connection
    // is one), memory, and the start time that explains a counter reset.
    let fds = value(&s0, "process_open_fds", &[]).expect("process_open_fds");
    let max_fds = value(&s0, "process_max_fds", &[]).expect("process_max_fds");
    assert!(fds >= 3.0 && fds < max_fds, "{fds} of {max_fds}");
    assert!(value(&s0, "process_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6));
    let started = value(&s0, "process_start_time_seconds", &[]).expect("a start time");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 86_400.0 && started <= now + 1.0,
        "{started}"
    );

    let mut people: Vec<_> = (0..4).map(|_| g.citizen()).collect();
    for c in people.iter_mut() {
        c.get("/").await;
    }
    let s1 = scrape(&get(&metrics_url).await.text());
    assert_eq!(
        value(&s1, "varco_room_queue_length", &[("room", "portal")]),
        Some(3.0)
    );
    assert_eq!(
        value(&s1, "varco_room_active_sessions", &[("room", "portal")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s1, "varco_tickets_issued_total", &[("room", "portal")]),
        Some(4.0)
    );
    assert_eq!(
        value(&s1, "varco_admitted_total", &[("room", "portal")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s1,
            "varco_upstream_responses_total",
            &[("room", "portal"), ("class", "2xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s1,
            "varco_requests_total",
            &[("room", "portal"), ("class", "2xx")]
        ),
        Some(4.0)
    );

    // Time passes: the first session ends, the next is called and claims.
    g.advance(6 * 60_000).await;
    people[1].get("/").await;
    let s2 = scrape(&get(&metrics_url).await.text());
    assert_eq!(
        value(&s2, "varco_admitted_total", &[("room", "portal")]),
        Some(2.0)
    );
    assert_eq!(
        value(&s2, "varco_room_serving_counter", &[("room", "portal")]),
        Some(2.0)
    );
    let waited = s2
        .samples
        .iter()
        .find(|x| x.metric == "varco_wait_seconds_count" || x.metric == "varco_wait_seconds")
        .map(|x| match &x.value {
            prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        });
    assert_eq!(waited, Some(1.0), "one wait observed");
    let text = get(&metrics_url).await.text();
    for name in varco::metrics::NAMES {
        // Absent until something happens.
        let optional = [
            "varco_room_estimated_wait_seconds",
            // Only with server.tls or upstream.tls_client (tests/tls.rs,
            // tests/proxy.rs).
            "varco_tls_certificate_expiry_timestamp_seconds",
            // Only with health_check (tests/proxy.rs).
            "varco_upstream_health_checks_total",
            // Only with store.snapshot (tests/waiting_room.rs).
            "varco_state_snapshot_timestamp_seconds",
            // Only in cluster mode (tests/cluster.rs).
            "varco_store_connections_replaced_total",
            "varco_store_clock_offset_seconds",
        ];
        // Only for rooms with adaptive admission or an in-flight cap
        // (checked in tests/in_flight.rs), or with lanes (tests/lanes.rs).
        let adaptive_or_capped = [
            "varco_adaptive_",
            "varco_in_flight_",
            "varco_room_in_flight",
            "varco_lane_",
        ]
        .iter()
        .any(|p| name.starts_with(p));
        if !optional.contains(name) && !adaptive_or_capped {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} not exported"
            );
        }
    }
    // No snapshot, no time of the last one: a 0 would read as one stale
    // since 1970, and VarcoQueueStateStale would fire.
    assert!(!text.contains("varco_state_snapshot_timestamp_seconds"));
}

#[test]
fn ctl_talks_to_a_running_varco_and_sighup_reloads() {
    use common::process::{bin, write_config, Process};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let up = rt.block_on(upstream::spawn());
    let cfg_text = |max: u32| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[admin]\ntokens_env = \"VARCO_TEST_ADMIN_TOKENS\"\n{}",
            gated_config(up.addr, &format!("max_active = {max}"))
        )
    };
    std::env::set_var("VARCO_TEST_ADMIN_TOKENS", format!("ops:{TOKEN}"));
    let path = write_config("ctl", &cfg_text(5));
    let p = Process::start(&path);
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(["ctl", "--admin", &format!("http://{}", p.admin)])
            .args(args)
            .env("VARCO_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // ctl as is, its failures too: to `admin`, a list.
    let fan = |admin: &str, args: &[&str]| {
        std::process::Command::new(bin())
            .args(["ctl", "--admin", admin])
            .args(args)
            .env("VARCO_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    let status = ctl(&["status"]);
    assert!(
        status.contains("portal") && status.contains("queue"),
        "{status}"
    );
    // The address as `admin_listen` writes it, without a scheme; the
    // token with the newline of the file or Secret it came from.
    let bare = std::process::Command::new(bin())
        .args(["ctl", "--admin", &p.admin.to_string(), "status"])
        .env("VARCO_ADMIN_TOKEN", format!("{TOKEN}\n"))
        .output()
        .unwrap();
    assert!(
        bare.status.success(),
        "{}",
        String::from_utf8_lossy(&bare.stderr)
    );
    // An https:// address is said to be one ctl cannot speak to.
    let https = fan(&format!("https://{}", p.admin), &["status"]);
    let said = String::from_utf8_lossy(&https.stderr);
    assert!(
        !https.status.success() && said.contains("speaks plain HTTP"),
        "{said}"
    );
    // The public listener given for the admin one answers with the gate
    // or the portal: not taken for a change made.
    for args in [&["status"][..], &["pause", "portal"]] {
        let public = fan(&p.addr.to_string(), args);
        let said = String::from_utf8_lossy(&public.stderr);
        assert!(
            !public.status.success() && said.contains("not an answer of varco's admin API"),
            "{args:?}: {said}"
        );
    }
    let out = ctl(&["pause", "portal"]);
    assert!(out.contains("\"mode\": \"paused\""), "{out}");
    let status = ctl(&["status"]);
    assert!(
        status.contains("paused*") && status.contains("* changed live"),
        "a live change is marked: {status}"
    );
    let out = ctl(&["rate", "portal", "1200"]);
    assert!(out.contains("\"admission_per_minute\": 1200"), "{out}");
    let out = ctl(&["reset", "portal"]);
    assert!(
        out.contains("\"mode\": \"queue\"") && out.contains("\"admission_per_minute\": null"),
        "back to the file: {out}"
    );
    ctl(&["pause", "portal"]);
    let upstream = up.addr.to_string();
    // The room's only upstream: taken out only when meant.
    let refused = fan(&p.admin.to_string(), &["upstream-out", "portal", &upstream]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("last upstream"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = ctl(&["upstream-out", "--force", "portal", &upstream]);
    assert!(out.contains("\"taken_out\": true"), "{out}");
    let status = ctl(&["status"]);
    assert!(
        status.contains(&format!("taken out: {upstream}")),
        "{status}"
    );
    let out = ctl(&["upstream-in", "portal", &upstream]);
    assert!(out.contains("\"taken_out\": false"), "{out}");

    // Several nodes (separate ones here, without Redis): one action for
    // all; a node that does not answer is named, and the others are still
    // told.
    let second = Process::start(&write_config("ctl-second", &cfg_text(5)));
    let dead = format!("http://{}", common::dead_addr());
    let both = format!("http://{},http://{}", p.admin, second.admin);
    let out = fan(&both, &["close", "portal"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("\"mode\": \"closed\"").count(), 2, "{text}");
    let out = fan(
        &format!("{dead},http://{}", second.admin),
        &["open", "portal"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && err.contains("1 of 2"), "{err}");
    assert!(err.contains("Connection refused"), "the reason: {err}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"mode\": \"queue\""),
        "the live node was told: {text}"
    );
    assert!(
        ctl(&["status"]).contains("closed"),
        "the first node was not in the list"
    );
    // A node that accepts but never answers (a full backlog, a wedged
    // process) is given up on after --timeout; the others are told.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stuck = format!("http://{}", stuck.local_addr().unwrap());
    let out = fan(
        &format!("{stuck},http://{}", second.admin),
        &["--timeout", "1s", "pause", "portal"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&stuck) && err.contains("no answer within 1s"),
        "{err}"
    );
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("\"mode\": \"paused\""),
        "the node after the stuck one was told"
    );
    // An empty list (an unset variable in a script) tells nobody: a failure.
    let out = fan("", &["pause", "portal"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("names no admin listener"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctl(&["pause", "portal"]);

    // SIGHUP: a good file applies...
    std::fs::write(&path, cfg_text(7)).unwrap();
    p.signal("HUP");
    let mut seen = String::new();
    for _ in 0..100 {
        seen = ctl(&["status"]);
        if seen.contains(" 7 ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen.contains(" 7 "), "max_active 7 after SIGHUP: {seen}");
    // ...a bad one is refused and the old one stays.
    std::fs::write(&path, "[rooms.portal]\nupstreams = \"not a list\"\n").unwrap();
    p.signal("HUP");
    let metrics_url = format!("http://{}/metrics", p.admin);
    let mut refused = false;
    for _ in 0..100 {
        let m = rt.block_on(get(&metrics_url)).text();
        if m.contains("varco_config_reloads_total{result=\"refused\"} 1") {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused, "the bad reload was counted as refused");
    // Its reasons, by ctl, a key a line as the log has them.
    let out = fan(&p.admin.to_string(), &["reload"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && said.contains("422")
            && said.contains("\n  - rooms.portal.upstreams"),
        "{said}"
    );
    assert!(
        ctl(&["status"]).contains(" 7 "),
        "the old config keeps serving"
    );
}

#[tokio::test]
async fn a_reload_cannot_move_the_opening_of_a_drawn_prequeue() {
    let up = upstream::spawn().await;
    let room = |opens: u64, max: u32| {
        with_admin(&gated_config(
            up.addr,
            &format!(
                "max_active = {max}\nadmission_per_minute = 60\nopens_at = \"{}\"",
                varco::timefmt::rfc3339(opens)
            ),
        ))
    };
    let opens = common::gated::T0 + 10 * 60_000;
    let (g, path) = Gated::start_written("opening", &room(opens, 1)).await;
    let mut early: Vec<_> = (0..8).map(|_| g.citizen()).collect();
    for c in early.iter_mut() {
        c.get("/").await;
    }
    // Before the opening a new opening is the operator's to choose.
    std::fs::write(&path, room(opens + 60_000, 1)).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    g.advance(11 * 60_000).await; // the opening
    let mut drawn = Vec::new();
    for c in early.iter_mut() {
        drawn.push(c.status("portal").await["ticket"].clone());
    }
    assert!(drawn.iter().all(|t| t.is_u64()), "{drawn:?}");

    // After it, moving it would draw every place again.
    std::fs::write(&path, room(opens + 2 * 60_000, 2)).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(err.contains("rooms.portal.opens_at"), "{err}");
    assert_eq!(
        api(&g, "GET", "/api/rooms/portal", Some(TOKEN))
            .await
            .json()["max_active"],
        1,
        "the old config stays"
    );
    let mut again = Vec::new();
    for c in early.iter_mut() {
        again.push(c.status("portal").await["ticket"].clone());
    }
    assert_eq!(drawn, again, "every drawn place kept");
    // The same opening with other changes is fine.
    std::fs::write(&path, room(opens + 60_000, 2)).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let m = get(&format!("http://{}/metrics", g.admin)).await.text();
    assert!(
        m.contains("varco_config_reloads_total{result=\"refused\"} 1"),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// Before the opening, a pre-queue page asks up to every 5 minutes: an
/// opening brought nearer than a page's longest wait (or removed) is
/// refused, naming the key, as it would call places whose pages have not
/// asked since; one brought nearer but still past it, or moved later, is
/// the operator's to choose.
#[tokio::test]
async fn a_reload_cannot_bring_a_prequeues_opening_nearer_than_its_pages_ask() {
    let up = upstream::spawn().await;
    let room = |opens: Option<u64>| {
        let opening = opens
            .map(|t| format!("opens_at = \"{}\"", varco::timefmt::rfc3339(t)))
            .unwrap_or_default();
        with_admin(&gated_config(
            up.addr,
            &format!("max_active = 1\nadmission_per_minute = 60\n{opening}"),
        ))
    };
    let t0 = common::gated::T0;
    let (g, path) = Gated::start_written("opening-nearer", &room(Some(t0 + 3_600_000))).await;
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    assert_eq!(early.status("portal").await["state"], "waiting");
    for nearer in [Some(t0 + 60_000), None] {
        std::fs::write(&path, room(nearer)).unwrap();
        let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
        assert_eq!(got.status, 422, "{nearer:?}: {}", got.text());
        let err = got.json()["error"].as_str().unwrap().to_string();
        assert!(
            err.contains("rooms.portal.opens_at") && err.contains("pre-queue"),
            "{err}"
        );
    }
    for fine in [t0 + 1_800_000, t0 + 7_200_000] {
        std::fs::write(&path, room(Some(fine))).unwrap();
        let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
        assert_eq!(got.status, 200, "{fine}: {}", got.text());
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The room of the opening tests: one slot, a minute's rate, `extra`.
fn one_slot_room(up: std::net::SocketAddr, extra: &str) -> String {
    with_admin(&gated_config(
        up,
        &format!("max_active = 1\nadmission_per_minute = 60\n{extra}"),
    ))
}

/// Writes `room` with an opening a day ahead and reloads: refused,
/// naming the key and why.
async fn a_later_opening_is_refused(
    g: &Gated,
    path: &std::path::Path,
    room: &dyn Fn(&str) -> String,
) {
    let later = varco::timefmt::rfc3339(common::gated::T0 + 24 * 3_600_000);
    std::fs::write(path, room(&format!("opens_at = \"{later}\""))).unwrap();
    let got = api(g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("rooms.portal.opens_at") && err.contains("already opened"),
        "{err}"
    );
}

/// An opening set for later on a room that is already admitting would
/// announce a time the queue does not wait for: the reload is refused,
/// naming the key, and the room goes on as before.
#[tokio::test]
async fn a_reload_cannot_schedule_an_opening_for_a_queue_that_has_opened() {
    let up = upstream::spawn().await;
    let room = |extra: &str| one_slot_room(up.addr, extra);
    let (g, path) = Gated::start_written("reopening", &room("")).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    a_later_opening_is_refused(&g, &path, &room).await;
    let s = waiting.status("portal").await;
    assert!(s["opens_at"].is_null(), "no opening announced: {s}");
    assert_eq!(s["position"], 1);
    // An opening already past changes nothing and is accepted.
    let past = varco::timefmt::rfc3339(common::gated::T0 - 3_600_000);
    std::fs::write(&path, room(&format!("opens_at = \"{past}\""))).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// The same for a room a reload brings back after an earlier one took it
/// out: its queue outlived it in the store, opened, and the restart would
/// refuse what the reload let in.
#[tokio::test]
async fn a_room_brought_back_cannot_schedule_an_opening_for_its_opened_queue() {
    let up = upstream::spawn().await;
    let room = |extra: &str| one_slot_room(up.addr, extra);
    let (g, path) = Gated::start_written("brought-back", &room("")).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    // Closed, and its one session over (5 minutes idle), it may go.
    let got = api(&g, "POST", "/api/rooms/portal/close", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    g.advance(6 * 60_000).await;
    let other = room("").replace("[rooms.portal]", "[rooms.other]");
    std::fs::write(&path, &other).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(g.app.room("portal").is_none());
    a_later_opening_is_refused(&g, &path, &room).await;
    assert!(g.app.room("portal").is_none(), "the old config stays");
    // Without the opening it comes back, its queue as it was.
    std::fs::write(&path, room("")).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let view = g.app.room("portal").unwrap().view();
    assert!(view.opened && view.admitted_total == 1, "{view:?}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A leaked admin token is revoked by editing the tokens file and
/// reloading: no restart (and no queue put at risk) for it.
#[tokio::test]
async fn a_reload_revokes_an_admin_token_taken_off_the_file() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-revoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = |list: &[(&str, &str)]| {
        let text: String = list
            .iter()
            .map(|(id, t)| format!("[[tokens]]\nid = \"{id}\"\ntoken = \"{t}\"\n"))
            .collect();
        std::fs::write(dir.join("tokens.toml"), text).unwrap();
    };
    const LEAKED: &str = "a-token-pasted-into-a-public-chat";
    tokens(&[("anna", TOKEN), ("bob", LEAKED)]);
    let cfg = format!(
        "[admin]\ntokens_file = \"tokens.toml\"\n{}",
        gated_config(up.addr, "max_active = 1")
    );
    let (g, path) = Gated::start_written("revoke", &cfg).await;
    assert_eq!(path.parent().unwrap(), dir);
    assert_eq!(api(&g, "GET", "/api/rooms", Some(LEAKED)).await.status, 200);
    tokens(&[("anna", TOKEN)]);
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(api(&g, "GET", "/api/rooms", Some(LEAKED)).await.status, 401);
    assert_eq!(api(&g, "GET", "/api/rooms", Some(TOKEN)).await.status, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A room `portal` of one slot and one-minute sessions, a person inside
/// (returned) and one waiting; its file then renames it `portale`, not
/// reloaded yet. The upstream is returned to be kept.
async fn a_full_room_renamed(name: &str) -> (upstream::Upstream, Gated, common::gated::Citizen) {
    let up = upstream::spawn().await;
    let cfg = with_admin(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    ));
    let (g, path) = Gated::start_written(name, &cfg).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    assert!(g.citizen().get("/").await.is_waiting_page());
    std::fs::write(&path, cfg.replace("[rooms.portal]", "[rooms.portale]")).unwrap();
    (up, g, holder)
}

/// A room renamed (or removed) while it holds people is refused: its
/// passes and tickets name it. Closed, it may go once its sessions end.
#[tokio::test]
async fn a_reload_refuses_to_drop_a_room_that_holds_people() {
    let (_up, g, mut holder) = a_full_room_renamed("room-in-use").await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("rooms.portal:") && err.contains("1 live sessions"),
        "{err}"
    );
    assert!(holder.get("/").await.reached_upstream(), "the pass holds");
    // Closed, the line is told so; the live session still holds it.
    let got = api(&g, "POST", "/api/rooms/portal/close", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    // Once the session has ended, it may go.
    g.advance(2 * 60_000).await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

/// A room turned into a plain proxy calls nobody from its line: once
/// its sessions have ended it may go, people still in line or not.
#[tokio::test]
async fn a_room_in_passthrough_may_go_once_its_sessions_end() {
    let (_up, g, _holder) = a_full_room_renamed("room-passthrough").await;
    let got = api(&g, "POST", "/api/rooms/portal/passthrough", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "a session inside: {}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("Keep it until its sessions have ended"),
        "{err}"
    );
    g.advance(2 * 60_000).await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

/// A key file that gives a key id in force another secret is refused:
/// every ticket and pass signed under it would count as none.
#[tokio::test]
async fn a_reload_refuses_a_key_id_given_another_secret() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-key-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const A: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const B: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let keys = |pairs: &[(&str, &str)]| {
        let text: String = pairs
            .iter()
            .map(|(id, secret)| format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n"))
            .collect();
        std::fs::write(dir.join("keys.toml"), text).unwrap();
    };
    keys(&[("k1", A)]);
    let cfg = with_admin(&gated_config(up.addr, "max_active = 1")).replace(
        "[secrets]\nephemeral = true",
        "[secrets]\nkey_file = \"keys.toml\"",
    );
    let (g, path) = Gated::start_written("key-secret", &cfg).await;
    assert_eq!(path.parent().unwrap(), dir);
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    // The same id, another secret: refused, naming the key file and id.
    keys(&[("k1", B)]);
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("secrets.key_file") && err.contains("\"k1\" now holds another secret"),
        "{err}"
    );
    assert!(holder.get("/").await.reached_upstream(), "the pass holds");
    // The new secret under a new id: taken, and the pass still holds.
    keys(&[("k1", A), ("k2", B)]);
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(holder.get("/").await.reached_upstream());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A room gated live on a varco started with no key (a key made up at
/// start signs its passes) keeps its people when a key file comes by a
/// reload: the file signs from then on, the made-up key verifies what it
/// signed until the restart.
#[tokio::test]
async fn a_key_file_brought_by_a_reload_keeps_the_made_up_keys_passes() {
    let up = upstream::spawn().await;
    let cfg = with_admin(&format!(
        "[rooms.portal]\nupstreams = [\"http://{}\"]\n",
        up.addr
    ));
    let (g, path) = Gated::start_written("made-up-key", &cfg).await;
    let dir = path.parent().unwrap().to_path_buf();
    let got = api(
        &g,
        "POST",
        "/api/rooms/portal/max_active?value=1",
        Some(TOKEN),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    assert!(holder.cookie("varco_pass_portal").is_some());
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n",
    )
    .unwrap();
    std::fs::write(&path, format!("[secrets]\nkey_file = \"keys.toml\"\n{cfg}")).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(
        holder.get("/form").await.reached_upstream(),
        "the pass the made-up key signed holds"
    );
    // New passes are the file's key's.
    let mut next = g.citizen();
    g.advance(60_000).await;
    let got = next.get("/").await;
    assert!(got.is_waiting_page(), "{}", got.text());
    let ticket = next.cookie("varco_ticket_portal").expect("a ticket");
    let header = ticket.split('.').next().unwrap();
    use base64::Engine;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    assert!(
        String::from_utf8(header)
            .unwrap()
            .contains("\"kid\":\"k1\""),
        "signed with the file's key"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A key rotation that drops the key a scheduled opening's lottery is
/// drawn with is refused while the draw matters: its commitment is
/// published, and every pre-queue place is computed from it until the
/// last pre-queue ticket expires.
#[tokio::test]
async fn a_reload_keeps_the_key_of_a_lottery_in_use() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-lottery-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = |ids: &[&str]| {
        let text: String = ids
            .iter()
            .map(|id| {
                let secret = match *id {
                    "k1" => "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                    _ => "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=",
                };
                format!("[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n")
            })
            .collect();
        std::fs::write(dir.join("keys.toml"), text).unwrap();
    };
    keys(&["k1"]);
    let opens = common::gated::T0 + 10 * 60_000;
    let cfg = with_admin(&gated_config(
        up.addr,
        &format!(
            "max_active = 100\nadmission_per_minute = 60\nticket_ttl = \"2h\"\nopens_at = \"{}\"",
            varco::timefmt::rfc3339(opens)
        ),
    ))
    .replace(
        "[secrets]\nephemeral = true",
        "[secrets]\nkey_file = \"keys.toml\"",
    );
    let (g, path) = Gated::start_written("lottery-key", &cfg).await;
    assert_eq!(path.parent().unwrap(), dir);
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    let commitment = early.status("portal").await["lottery"]["commitment"].clone();
    assert!(commitment.is_string());
    // Rotated out before the opening: refused, naming the key file.
    keys(&["k2"]);
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "{}", got.text());
    let err = got.json()["error"].as_str().unwrap().to_string();
    assert!(
        err.contains("secrets.key_file") && err.contains("\"k1\""),
        "{err}"
    );
    // Kept beside the new one: taken, and the draw is the same.
    keys(&["k1", "k2"]);
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    assert_eq!(
        early.status("portal").await["lottery"]["commitment"],
        commitment
    );
    // A shorter ticket_ttl shortens no ticket signed before: after the
    // opening plus the new one, the key is still needed.
    std::fs::write(
        &path,
        cfg.replace("ticket_ttl = \"2h\"", "ticket_ttl = \"20m\""),
    )
    .unwrap();
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    g.advance(10 * 60_000 + 30 * 60_000).await;
    keys(&["k2"]);
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 422, "tickets of 2h still out: {}", got.text());
    // Once every pre-queue ticket has expired, it may go.
    g.advance(2 * 3_600_000 - 30 * 60_000).await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A room brought back by a reload (removed by an earlier one once
/// closed and empty) is held to the opening its queue was run for, as a
/// start from the snapshot is: with its pre-queue drawn, another opening
/// (or none) would draw every place again. The reload took it, and the
/// next restart refused the file it was running.
#[tokio::test]
async fn a_room_brought_back_keeps_the_opening_of_its_draw() {
    let up = upstream::spawn().await;
    let opens = common::gated::T0 + 10 * 60_000;
    let opening = format!("opens_at = \"{}\"", varco::timefmt::rfc3339(opens));
    let other = format!(
        "[rooms.other]\nupstreams = [\"http://{}\"]\npaths = [\"/other\"]\n",
        up.addr
    );
    let cfg = with_admin(&gated_config(
        up.addr,
        &format!("max_active = 1\n{opening}"),
    )) + &other;
    let (g, path) = Gated::start_written("brought-back-drawn", &cfg).await;
    for _ in 0..2 {
        assert!(g.citizen().get("/").await.is_waiting_page());
    }
    g.advance(10 * 60_000 + 1_000).await;
    assert_eq!(
        api(&g, "POST", "/api/rooms/portal/close", Some(TOKEN))
            .await
            .status,
        200
    );
    // The turn called at the opening lapses; closed, nobody else is.
    g.advance(61_000).await;
    let reload = |text: String| {
        std::fs::write(&path, text).unwrap();
        api(&g, "POST", "/api/reload", Some(TOKEN))
    };
    let without = with_admin("[secrets]\nephemeral = true\n") + &other;
    let got = reload(without).await;
    assert_eq!(got.status, 200, "{}", got.text());
    for back in [
        cfg.replace(&opening, ""),
        cfg.replace(&opening, "opens_at = \"2026-01-01T09:00:00+01:00\""),
    ] {
        let got = reload(back).await;
        assert_eq!(got.status, 422, "{}", got.text());
        let err = got.json()["error"].as_str().unwrap().to_string();
        assert!(
            err.contains("rooms.portal.opens_at") && err.contains("places drawn"),
            "{err}"
        );
    }
    let got = reload(cfg.clone()).await;
    assert_eq!(got.status, 200, "{}", got.text());
}

/// A lottery drawn with a key made up at start (`ephemeral = true`) is
/// kept when a reload brings a key file: the made-up key goes on
/// verifying and drawing. The reload was refused, asking the file to
/// keep a key id no file can hold, and only a restart (every ticket
/// lost) got out of it.
#[tokio::test]
async fn a_reload_from_a_made_up_key_to_a_file_keeps_the_lottery() {
    let up = upstream::spawn().await;
    let opens = common::gated::T0 + 10 * 60_000;
    let cfg = with_admin(&gated_config(
        up.addr,
        &format!(
            "max_active = 100\nopens_at = \"{}\"",
            varco::timefmt::rfc3339(opens)
        ),
    ));
    let (g, path) = Gated::start_written("lottery-made-up", &cfg).await;
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    let commitment = early.status("portal").await["lottery"]["commitment"].clone();
    assert!(commitment.is_string());
    let dir = path.parent().unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n",
    )
    .unwrap();
    std::fs::write(
        &path,
        cfg.replace(
            "[secrets]\nephemeral = true",
            "[secrets]\nkey_file = \"keys.toml\"",
        ),
    )
    .unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        early.status("portal").await["lottery"]["commitment"],
        commitment
    );
    // The ticket signed with the made-up key still holds its place.
    assert_eq!(early.status("portal").await["state"], "waiting");
    let _ = std::fs::remove_dir_all(dir);
}

/// `varco demo --config FILE` with no `[admin]` makes up a token for the
/// run: a reload of that file keeps it (the operator page stays open),
/// and a file that names tokens replaces it.
#[tokio::test]
async fn a_reload_keeps_the_demos_made_up_token() {
    let up = upstream::spawn().await;
    let cfg = gated_config(up.addr, "max_active = 1");
    let dir = std::env::temp_dir().join(format!("varco-made-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("varco.toml");
    std::fs::write(&path, &cfg).unwrap();
    let g = Gated::start_file_edited(&path, |c| {
        c.admin_tokens.push(varco::config::AdminToken {
            id: "demo".into(),
            token: TOKEN.into(),
        })
    })
    .await;
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        api(&g, "GET", "/api/rooms", Some(TOKEN)).await.status,
        200,
        "the made-up token still opens the API after a reload"
    );
    // A file that names its tokens: those, and the made-up one is gone.
    std::env::set_var(
        "VARCO_TEST_MADE_UP_ADMIN",
        "anna:a-token-from-the-file-0123",
    );
    std::fs::write(
        &path,
        format!("[admin]\ntokens_env = \"VARCO_TEST_MADE_UP_ADMIN\"\n{cfg}"),
    )
    .unwrap();
    assert_eq!(
        api(&g, "POST", "/api/reload", Some(TOKEN)).await.status,
        200
    );
    assert_eq!(api(&g, "GET", "/api/rooms", Some(TOKEN)).await.status, 401);
    assert_eq!(
        api(&g, "GET", "/api/rooms", Some("a-token-from-the-file-0123"))
            .await
            .status,
        200
    );
    // The file names none again: the made-up one, and only it.
    std::fs::write(&path, &cfg).unwrap();
    assert_eq!(
        api(
            &g,
            "POST",
            "/api/reload",
            Some("a-token-from-the-file-0123")
        )
        .await
        .status,
        200
    );
    assert_eq!(api(&g, "GET", "/api/rooms", Some(TOKEN)).await.status, 200);
    assert_eq!(
        api(&g, "GET", "/api/rooms", Some("a-token-from-the-file-0123"))
            .await
            .status,
        401,
        "a token the file no longer names is revoked"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[store]` changes wait for a restart (a reload says so): the rooms a
/// reload builds keep the tick the tick loop and the store run with, or
/// a cluster's script would take each tick's gap for an outage.
#[tokio::test]
async fn a_reload_keeps_the_running_tick() {
    let up = upstream::spawn().await;
    let cfg = with_admin(&gated_config(up.addr, "max_active = 1")) + "[store]\ntick = \"5s\"\n";
    let (g, path) = Gated::start_written("reload-tick", &cfg).await;
    let tick = || g.app.room("portal").unwrap().limits().tick_ms;
    assert_eq!(tick(), 5000);
    std::fs::write(&path, cfg.replace("tick = \"5s\"", "tick = \"1s\"")).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.json()["restart_needed"],
        serde_json::json!(["store"]),
        "the answer says what waits for a restart"
    );
    assert_eq!(
        tick(),
        5000,
        "the reloaded room ticks as the running loop does"
    );
    // Back as it started: nothing waits.
    std::fs::write(&path, &cfg).unwrap();
    let got = api(&g, "POST", "/api/reload", Some(TOKEN)).await;
    assert_eq!(got.json()["restart_needed"], serde_json::json!([]));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A room or an upstream a reload removes takes its series with it: a
/// dashboard or an alert would read their last values for ever. Those of
/// the rooms and upstreams kept go on from where they were.
#[tokio::test]
async fn a_reload_takes_away_the_series_of_what_it_removed() {
    let (one, two, three) = (
        upstream::spawn().await,
        upstream::spawn().await,
        upstream::spawn().await,
    );
    let portal = |ups: &str| {
        format!(
            "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [{ups}]\n\
             hosts = [\"portal.example.it\"]\n"
        )
    };
    let both = format!("\"http://{}\", \"http://{}\"", one.addr, two.addr);
    let other = format!(
        "[rooms.other]\nupstreams = [\"http://{}\"]\nhosts = [\"other.example.it\"]\n\
         [rooms.other.health_check]\npath = \"/healthz\"\ninterval = \"1s\"\n",
        three.addr
    );
    let (g, path) = Gated::start_written("forget-series", &(portal(&both) + &other)).await;
    let mut person = g.citizen();
    person
        .headers
        .push(("host".into(), "portal.example.it".into()));
    for _ in 0..4 {
        assert!(person.get("/").await.reached_upstream());
    }
    let mut stranger = g.citizen();
    stranger
        .headers
        .push(("host".into(), "other.example.it".into()));
    assert!(stranger.get("/").await.reached_upstream());
    let metrics = || async { get(&format!("http://{}/metrics", g.admin)).await.text() };
    let gone_upstream = format!("upstream=\"{}\"", two.addr);
    let before = metrics().await;
    assert!(
        before
            .lines()
            .any(|l| l.starts_with("varco_requests_total{") && l.contains("room=\"other\"")),
        "{before}"
    );
    assert!(
        before.contains("varco_upstream_health_checks_total{"),
        "{before}"
    );
    assert!(before.contains(&gone_upstream), "{before}");
    let portal_2xx = [("room", "portal"), ("class", "2xx")];
    let served = value(&scrape(&before), "varco_requests_total", &portal_2xx);
    assert_eq!(served, Some(4.0));

    std::fs::write(&path, portal(&format!("\"http://{}\"", one.addr))).unwrap();
    g.app.reload().await.expect("reload");
    let after = metrics().await;
    let stale: Vec<&str> = after
        .lines()
        .filter(|l| l.contains("room=\"other\"") || l.contains(&gone_upstream))
        .collect();
    assert!(
        stale.is_empty(),
        "series of what the reload removed: {stale:?}"
    );
    assert_eq!(
        value(&scrape(&after), "varco_requests_total", &portal_2xx),
        served,
        "the kept room's counts go on"
    );
    assert!(after.contains(&format!("upstream=\"{}\"", one.addr)));
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A reload that turns a room's adaptive admission off takes its
/// adjustment series away: frozen, they would read as a rate that stopped
/// moving. Turned back on, they start again at 0.
#[tokio::test]
async fn a_reload_that_turns_adaptive_off_takes_its_series() {
    let up = upstream::spawn().await;
    let adaptive =
        "adaptive = { min_per_minute = 60, max_per_minute = 600, target_latency = \"500ms\" }";
    let with = gated_config(up.addr, adaptive);
    let without = gated_config(up.addr, "admission_per_minute = 60");
    let (g, path) = Gated::start_written("adaptive-off", &with).await;
    let adjustments = || async {
        get(&format!("http://{}/metrics", g.admin))
            .await
            .text()
            .lines()
            .filter(|l| l.starts_with("varco_adaptive_adjustments_total{"))
            .count()
    };
    assert_eq!(adjustments().await, 3, "made with the room, at 0");
    std::fs::write(&path, &without).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(adjustments().await, 0, "adaptive off: its series gone");
    std::fs::write(&path, &with).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(adjustments().await, 3, "back on: at 0 again");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A portal's release in a room whose limits were lifted live calls
/// nobody: unlimited, its tick called the whole line, and the room gated
/// again let each of those turns in at once, past its `max_active`.
#[tokio::test]
async fn a_release_while_the_limits_are_lifted_calls_nobody() {
    let up = upstream::spawn().await;
    let g = Gated::start(&with_admin(&gated_config(up.addr, "max_active = 1"))).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut line: Vec<_> = (0..3).map(|_| g.citizen()).collect();
    for c in &mut line {
        assert!(c.get("/").await.is_waiting_page());
    }
    let limit = |value: &'static str| {
        let g = &g;
        async move {
            let path = format!("/api/rooms/portal/max_active?value={value}");
            api(g, "POST", &path, Some(TOKEN)).await.status
        }
    };
    assert_eq!(limit("unlimited").await, 200);
    assert!(a.get("/release").await.reached_upstream());
    assert!(a.cookie("varco_pass_portal").is_none(), "the session ended");
    assert_eq!(limit("1").await, 200);
    g.advance(1000).await;
    let mut inside = 0;
    for c in &mut line {
        if c.get("/").await.reached_upstream() {
            inside += 1;
        }
    }
    assert_eq!(inside, 1, "one slot free, one person in");
}

/// A release on a request routed before a reload calls by the limits the
/// reload brought: by the old ones, it refilled the slot a lowered
/// `max_active` took away.
#[tokio::test]
async fn a_release_under_way_across_a_reload_calls_by_the_new_limits() {
    let up = upstream::spawn().await;
    let (g, path) =
        Gated::start_written("release-reload", &gated_config(up.addr, "max_active = 2")).await;
    let mut a = g.citizen();
    let mut b = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    assert!(b.get("/").await.reached_upstream());
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    // A slow submit, at the portal when the reload comes.
    let submit = tokio::spawn(async move { a.get("/release?ms=3000").await.status });
    common::client::until(
        "the submit at the portal",
        Duration::from_secs(5),
        async || up.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0,
    )
    .await;
    std::fs::write(&path, gated_config(up.addr, "max_active = 1")).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(submit.await.unwrap(), 200);
    assert_eq!(
        c.status("portal").await["state"],
        "waiting",
        "the one slot is b's"
    );
    g.advance(1000).await;
    assert!(c.get("/").await.is_waiting_page());
    assert!(b.get("/").await.reached_upstream());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
