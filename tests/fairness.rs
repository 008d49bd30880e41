//! Fairness a citizen, a portal and an auditor can check, and flows that
//! never strand anyone: queue receipts and `X-Varco-Arrival`, the committed
//! and revealed lottery, the hash-chained admission log, login detours,
//! and turns kept after a portal failure. Real varco, real upstream,
//! the real binary for the checks anyone would run.

mod common;

use std::process::Command;

use common::client::metric;
use common::gated::{Citizen, Gated, T0};
use common::process::{bin, write_config};
use common::upstream;
use varco::room::arrival;

const MIN: u64 = 60_000;
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
const ARRIVAL_KEY: &str = "YXJyaXZhbC1rZXktZm9yLXRoZS1wb3J0YWwtMDEyMzQ1";
/// One slot, a one-minute idle time, and a login callback.
const DETOUR_ROOM: &str =
    "max_active = 1\nsession_idle = \"1m\"\nflow_paths = [\"/oidc/callback\"]\nflow_window = \"10m\"";
const ADMIN: &str = "auditor:let-me-see-the-admission-log";

/// A room of [`config`] that opens at `opens`, with `room` keys.
fn opening_at(up: std::net::SocketAddr, opens: u64, room: &str) -> String {
    let at = varco::timefmt::rfc3339(opens);
    config(up, &format!("{room}\nopens_at = \"{at}\""), "")
}

/// A room with real keys (so the binary can check receipts offline), the
/// arrival key the portal shares, and an admin token.
fn config(up: std::net::SocketAddr, room: &str, top: &str) -> String {
    std::env::set_var("VARCO_TEST_FAIR_KEYS", format!("k1:{KEY}"));
    std::env::set_var("VARCO_TEST_FAIR_ARRIVAL", ARRIVAL_KEY);
    std::env::set_var("VARCO_TEST_FAIR_ADMIN", ADMIN);
    format!(
        "{top}\n[secrets]\nkey_env = \"VARCO_TEST_FAIR_KEYS\"\narrival_key_env = \"VARCO_TEST_FAIR_ARRIVAL\"\n\
         [admin]\ntokens_env = \"VARCO_TEST_FAIR_ADMIN\"\n\
         [rooms.portal]\nupstreams = [\"http://{up}\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n{room}\n"
    )
}

fn arrival_key() -> ring::hmac::Key {
    use base64::Engine;
    arrival::key(
        &base64::engine::general_purpose::STANDARD
            .decode(ARRIVAL_KEY)
            .unwrap(),
    )
}

/// What the upstream's echo says it got in X-Varco-Arrival.
fn arrivals_seen(got: &common::client::Got) -> Vec<String> {
    got.json()["headers"]["x-varco-arrival"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin()).args(args).output().expect("run varco");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

async fn admin_get(g: &Gated, path: &str) -> common::client::Got {
    let req = http::Request::get(format!("http://{}{path}", g.admin))
        .header("authorization", "Bearer let-me-see-the-admission-log")
        .body(varco::body::empty())
        .unwrap();
    common::client::send(req).await
}

#[tokio::test]
async fn receipts_verify_and_the_portal_gets_a_signed_arrival() {
    let up = upstream::spawn().await;
    let toml = config(up.addr, "max_active = 1", "");
    let file = write_config("fair-receipts", &toml);
    let g = Gated::start(&toml).await;

    // Admitted at once: the portal learns number 1, arrived now, signed;
    // whatever the client claimed is gone.
    let mut a = g.citizen();
    let got = a
        .request(
            "GET",
            "/",
            varco::body::empty(),
            &[("x-varco-arrival", "room=portal; n=0; at=0; sig=forged")],
        )
        .await;
    assert!(got.reached_upstream());
    let seen = arrivals_seen(&got);
    assert_eq!(seen.len(), 1, "{seen:?}");
    let a_arrival = arrival::verify(&arrival_key(), &seen[0]).expect("signed by the arrival key");
    assert_eq!(
        a_arrival,
        arrival::Arrival {
            room: "portal".into(),
            n: 1,
            at_ms: T0
        }
    );

    // In line: a receipt on the page and in the status.
    g.advance(7_000).await;
    let mut b = g.citizen();
    let page = b.get("/").await;
    assert!(page.is_waiting_page());
    let s = b.status("portal").await;
    let receipt = s["receipt"].as_str().expect("a receipt").to_string();
    assert!(receipt.starts_with("portal-2-"), "{receipt}");
    let code = receipt.rsplit('-').next().unwrap();
    assert_eq!(code.len(), 8);
    let html = page.text();
    assert!(html.contains(&receipt), "the page shows the receipt");
    assert!(html.contains(&format!(">{code}<")), "and its code");
    assert_eq!(s["arrived"], varco::timefmt::rfc3339(T0 + 7_000));

    // Anyone can check it: the binary with the config's keys...
    let (ok, out) = run(&[
        "receipt",
        "verify",
        "--config",
        file.to_str().unwrap(),
        &receipt,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("room portal, ticket 2"), "{out}");
    let ticket = b.cookie("varco_ticket_portal").unwrap().to_string();
    let (ok, out) = run(&[
        "receipt",
        "verify",
        "--config",
        file.to_str().unwrap(),
        &ticket,
    ]);
    assert!(ok && out.contains("ticket 2"), "{out}");
    let forged = receipt.replace("portal-2-", "portal-1-");
    let (ok, out) = run(&[
        "receipt",
        "verify",
        "--config",
        file.to_str().unwrap(),
        &forged,
    ]);
    assert!(!ok && out.contains("not genuine"), "{out}");
    // ... and the admin API of the running varco.
    let v = admin_get(&g, &format!("/api/receipts/{receipt}"))
        .await
        .json();
    assert_eq!(v["genuine"], true, "{v}");
    assert_eq!(v["number"], "2");
    let v = admin_get(&g, &format!("/api/receipts/{forged}"))
        .await
        .json();
    assert_eq!(v["genuine"], false, "{v}");

    // Admitted later: the portal gets b's arrival, not the admission time,
    // and a genuine header copied from someone else does not get through.
    let copied = seen[0].clone();
    a.get("/release").await;
    g.advance(10_000).await;
    let got = b
        .request(
            "GET",
            "/apply",
            varco::body::empty(),
            &[("x-varco-arrival", copied.as_str())],
        )
        .await;
    assert!(got.reached_upstream(), "{}", got.status);
    let seen = arrivals_seen(&got);
    assert_eq!(
        seen.len(),
        1,
        "a copied header does not get through: {seen:?}"
    );
    let b_arrival = arrival::verify(&arrival_key(), &seen[0]).unwrap();
    assert_eq!((b_arrival.n, b_arrival.at_ms), (2, T0 + 7_000));
    // Naming it in Connection (hop-by-hop, so stripped on the way) does
    // not take varco's own header away from the portal.
    let got = b
        .request(
            "GET",
            "/apply",
            varco::body::empty(),
            &[("connection", "x-varco-arrival")],
        )
        .await;
    assert!(got.reached_upstream(), "{}", got.status);
    assert_eq!(
        arrivals_seen(&got).len(),
        1,
        "the portal still gets the arrival"
    );
}

#[tokio::test]
async fn the_lottery_is_committed_before_and_revealed_at_the_opening() {
    let up = upstream::spawn().await;
    let opens = T0 + 10 * MIN;
    let toml = opening_at(
        up.addr,
        opens,
        "max_active = 100\nadmission_per_minute = 60",
    );
    let g = Gated::start(&toml).await;
    let mut early: Vec<Citizen> = (0..12).map(|_| g.citizen()).collect();
    let mut commitment = None;
    for c in early.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
        let s = c.status("portal").await;
        let l = &s["lottery"];
        assert!(l["seed"].is_null(), "no seed before the opening: {l}");
        let this = l["commitment"].as_str().unwrap().to_string();
        assert_eq!(this.len(), 64);
        // Those in line before the opening hold pre-queue tickets.
        assert!(s["queue_length"].as_u64() > Some(0), "{s}");
        // The same commitment for everyone, from the first ticket on.
        assert!(commitment.get_or_insert(this.clone()) == &this);
    }
    let commitment = commitment.unwrap();
    assert!(
        early[0].get("/").await.text().contains(&commitment),
        "on the page"
    );
    // The operator counts them too, as the page does.
    assert_eq!(
        metric(g.admin, "varco_room_queue_length", "room=\"portal\"").await,
        Some(12.0)
    );
    let state = admin_get(&g, "/api/rooms/portal").await.json();
    assert_eq!(state["queue_length"], 12, "{state}");

    g.advance(10 * MIN).await;
    let mut checked = 0;
    for c in early.iter_mut() {
        let s = c.status("portal").await;
        let l = &s["lottery"];
        let seed = l["seed"].as_str().expect("the seed, at the opening");
        assert_eq!(l["size"], 12);
        assert_eq!(l["commitment"], commitment.as_str());
        // The receipt keeps the pre-queue number; the status gives the place.
        let receipt = s["receipt"].as_str().unwrap();
        let pre = receipt.split('-').nth(1).unwrap();
        assert!(pre.starts_with('P'), "{receipt}");
        let place = s["ticket"].as_u64().unwrap();
        let (ok, out) = run(&[
            "lottery",
            "verify",
            "--seed",
            seed,
            "--size",
            "12",
            "--position",
            pre,
            "--commitment",
            &commitment,
        ]);
        assert!(ok, "{out}");
        assert!(out.contains("matches the commitment"), "{out}");
        assert!(
            out.ends_with(&format!("landed at place {place}\n")),
            "{out} vs {place}"
        );
        checked += 1;
    }
    assert_eq!(checked, 12);
    // A seed that is not the committed one is caught.
    let (ok, out) = run(&[
        "lottery",
        "verify",
        "--seed",
        "00ff",
        "--size",
        "12",
        "--position",
        "1",
        "--commitment",
        &commitment,
    ]);
    assert!(!ok && out.contains("does NOT match"), "{out}");
}

/// A folder of its own for test `name`, the admission log in it (not
/// there yet), and a room of [`config`] (`room` keys) that writes it.
fn audited(
    up: std::net::SocketAddr,
    name: &str,
    room: &str,
) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("varco-audit-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("admissions.log");
    let _ = std::fs::remove_file(&log);
    let toml = config(up, room, &format!("[audit]\nlog = \"{}\"", log.display()));
    (dir, log, toml)
}

/// A start without the snapshot is a new run of the queue, numbered from
/// 1 again: its first admissions are logged, though the log's last record
/// went further.
#[tokio::test]
async fn a_new_run_after_a_restart_is_logged_from_its_first_number() {
    let up = upstream::spawn().await;
    let (dir, log, toml) = audited(
        up.addr,
        "run",
        "max_active = 100\nadmission_per_minute = 600\nmode = \"queue_all\"",
    );
    for (run, people) in [(1, 5), (2, 2)] {
        // No tick before they come: the first one admits them.
        let g = Gated::start(&toml).await;
        let mut line: Vec<Citizen> = (0..people).map(|_| g.citizen()).collect();
        for p in line.iter_mut() {
            assert!(p.get("/").await.is_waiting_page(), "run {run}");
        }
        g.advance(1_000).await;
        for p in line.iter_mut() {
            assert_eq!(p.status("portal").await["state"], "admitted", "run {run}");
        }
        g.app.audit_settled().await;
        g.stop().await;
    }
    let ranges = common::logged_ranges(&log);
    assert_eq!(ranges.first(), Some(&(1, 5)), "{ranges:?}");
    assert_eq!(ranges.last(), Some(&(1, 2)), "the new run: {ranges:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    let summary = varco::audit::verify(text.as_bytes()).expect("one chain across both runs");
    assert_eq!(summary.admitted["portal"], 7);
    let _ = std::fs::remove_dir_all(&dir);
}

/// People let in since the last tick (straight away, in a room with
/// room to spare) are logged at a clean stop: no later tick would log
/// them, and a restart from the snapshot would give them its own time.
#[tokio::test]
async fn admissions_since_the_last_tick_are_logged_at_a_clean_stop() {
    let up = upstream::spawn().await;
    let (dir, log, toml) = audited(up.addr, "stop", "max_active = 100");
    let g = Gated::start(&toml).await;
    g.advance(1_000).await;
    for _ in 0..3 {
        assert!(g.citizen().get("/").await.reached_upstream());
    }
    g.clock.advance_ms(2_000);
    g.stop().await;
    let ranges = common::logged_ranges(&log);
    assert_eq!(ranges, [(1, 3)]);
    let text = std::fs::read_to_string(&log).unwrap();
    let first: varco::audit::Record = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first.time_ms, T0 + 3_000, "the stop's time");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A room a reload adds admits its first people straight away, before
/// its first tick: the log has them too.
#[tokio::test]
async fn a_room_a_reload_adds_logs_its_first_admissions() {
    let up = upstream::spawn().await;
    let (dir, log, toml) = audited(up.addr, "reload-added", "max_active = 100");
    let path = dir.join("varco.toml");
    std::fs::write(&path, &toml).unwrap();
    let g = Gated::start_file(&path).await;
    let bonus = format!(
        "[rooms.bonus]\nupstreams = [\"http://{}\"]\npaths = [\"/bonus\"]\nmax_active = 100\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n",
        up.addr
    );
    std::fs::write(&path, toml + &bonus).unwrap();
    g.app.reload().await.expect("reload");
    for _ in 0..3 {
        assert!(g.citizen().get("/bonus/apply").await.reached_upstream());
    }
    g.advance(1_000).await;
    g.app.audit_settled().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let summary = varco::audit::verify(text.as_bytes()).expect("a chain");
    assert_eq!(summary.admitted.get("bonus"), Some(&3), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `audit export` into a reader that stops early (`| head -1`) ends
/// quietly, exit 0, as `cat` does: it panicked ("failed printing to
/// stdout"), exit 101, after reading the whole log into memory twice.
#[test]
fn an_export_read_only_in_part_ends_quietly() {
    use std::io::BufRead;
    let (dir, log, toml) = audited(
        "127.0.0.1:9".parse().unwrap(),
        "export-head",
        "max_active = 1",
    );
    // More than a pipe holds (64 KiB): the writes after the reader left
    // fail.
    let written = varco::audit::AuditLog::open(&log, "node-a").unwrap();
    written.baseline("portal", 0);
    for serving in 1..2_000 {
        written.observe("portal", serving, T0 + serving).unwrap();
    }
    drop(written);
    assert!(std::fs::metadata(&log).unwrap().len() > 256 * 1024);
    let file = write_config("fair-export-head", &toml);
    let mut child = Command::new(bin())
        .args(["audit", "export", "--config", file.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("{\"seq\":1,"), "{first}");
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {said}", out.status);
    assert!(!said.contains("panicked"), "{said}");
    // A write that fails otherwise (here: a full disk) is no answer: a
    // script's report left empty must not pass.
    for args in [
        &["audit", "verify", log.to_str().unwrap()][..],
        &["audit", "export", "--config", file.to_str().unwrap()],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = Command::new(bin())
            .args(args)
            .stdout(full)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(said.contains("cannot write"), "{args:?}: {said}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_admission_log_is_chained_and_tampering_is_caught() {
    let up = upstream::spawn().await;
    let (dir, log, toml) = audited(
        up.addr,
        "chain",
        "max_active = 100\nadmission_per_minute = 2\nmode = \"queue_all\"",
    );
    let file = write_config("fair-audit", &toml);
    let g = Gated::start(&toml).await;
    let mut people: Vec<Citizen> = (0..6).map(|_| g.citizen()).collect();
    for p in people.iter_mut() {
        assert!(p.get("/").await.is_waiting_page());
    }
    // Two a minute: three minutes admit all six, a record per step.
    for _ in 0..6 {
        g.advance(30_000).await;
    }
    g.app.audit_settled().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(records.len() >= 3, "{text}");
    assert_eq!(records[0]["from"], 1);
    assert_eq!(records.last().unwrap()["to"], 6);
    assert_eq!(
        metric(g.admin, "varco_audit_records_total", "").await,
        Some(records.len() as f64)
    );

    let (ok, out) = run(&["audit", "verify", log.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(
        out.contains("chain intact") && out.contains("portal: 6"),
        "{out}"
    );
    let (ok, out) = run(&["audit", "export", "--config", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(out.trim_end(), text.trim_end());
    let api = admin_get(&g, "/api/audit").await;
    assert_eq!(api.status, 200);
    assert_eq!(api.text(), text);
    // Streamed from the file, not read whole first: no length ahead.
    assert!(
        api.headers.get("content-length").is_none(),
        "{:?}",
        api.headers
    );

    // An edited record: caught at that record.
    let edited = text.replacen("\"to\":1,", "\"to\":2,", 1);
    assert_ne!(edited, text);
    let bad = dir.join("edited.log");
    std::fs::write(&bad, &edited).unwrap();
    let (ok, out) = run(&["audit", "verify", bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("broken at record 1 (line 1)"), "{out}");
    // A removed record: caught where the chain skips.
    let lines: Vec<&str> = text.lines().collect();
    let removed = [lines[0]]
        .into_iter()
        .chain(lines[2..].iter().copied())
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&bad, removed + "\n").unwrap();
    let (ok, out) = run(&["audit", "verify", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("line 2"), "{out}");
    g.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_login_detour_never_strands_anyone() {
    let up = upstream::spawn().await;
    let g = Gated::start(&config(up.addr, DETOUR_ROOM, "")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    // Someone in line whose identity provider calls back (a POST, as SAML
    // does): through, not queued.
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let got = b
        .request(
            "POST",
            "/oidc/callback",
            varco::body::full("SAMLResponse=x"),
            &[],
        )
        .await;
    assert!(got.reached_upstream(), "{}", got.status);
    // Not an upload, though: past `upstream.request_buffer` (1 MiB) a body
    // from someone nobody admitted is refused, not streamed to the portal.
    let hits = up.hits();
    let big = varco::body::full(vec![b'x'; 2 << 20]);
    let got = b.request("POST", "/oidc/callback", big, &[]).await;
    assert_eq!(got.status, 413);
    assert_eq!(up.hits(), hits);
    // Only that path, on whole segments: not one that merely begins so.
    for other in ["/oidc/callbacks/apply", "/oidc/callback-apply"] {
        let got = b
            .request("POST", other, varco::body::full("iban=IT00"), &[])
            .await;
        assert!(!got.reached_upstream(), "{other}");
    }
    // Nobody else gets past the queue by that path.
    let mut c = g.citizen();
    let got = c
        .request("POST", "/oidc/callback", varco::body::full("x"), &[])
        .await;
    assert!(!got.reached_upstream());
    let hits = up.hits();

    // a leaves for a slow login; the pass lapses meanwhile.
    g.advance(3 * MIN).await;
    assert!(!a.get("/somewhere").await.reached_upstream(), "lapsed");
    a.jar.retain(|k, _| k == "varco_pass_portal");
    let got = a.get("/oidc/callback?code=1").await;
    assert!(got.reached_upstream(), "the callback brings the pass back");
    assert!(
        a.get("/apply").await.reached_upstream(),
        "and it is live again"
    );
    assert_eq!(up.hits(), hits + 2);
    assert_eq!(
        metric(g.admin, "varco_reentries_total", "reason=\"login_detour\"").await,
        Some(1.0)
    );

    // A pass the portal ended does not come back that way.
    let kept = a.jar.clone();
    a.get("/release").await;
    let mut replay = g.citizen();
    replay.jar = kept;
    assert!(!replay.get("/oidc/callback?code=2").await.reached_upstream());
    assert_eq!(
        metric(g.admin, "varco_reentries_total", "reason=\"login_detour\"").await,
        Some(1.0)
    );
}

/// A pass lives twice the idle time: with an idle time of an hour, a
/// released pass is still within its life (and its login window) long
/// after the first hour; its release must be remembered that long.
#[tokio::test]
async fn a_release_is_remembered_as_long_as_the_pass_could_come_back() {
    let up = upstream::spawn().await;
    let room =
        "max_active = 1\nsession_idle = \"1h\"\nflow_paths = [\"/oidc/callback\"]\nflow_window = \"10m\"";
    let g = Gated::start(&config(up.addr, room, "")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let kept = a.jar.clone();
    a.get("/release").await;
    assert!(b.get("/").await.reached_upstream(), "b took the slot");
    // b stays busy; the kept copy of a's pass comes back after 65 min,
    // when a one-hour memory would have forgotten the release.
    for _ in 0..13 {
        g.advance(5 * MIN).await;
        assert!(b.get("/apply").await.reached_upstream());
    }
    let mut replay = g.citizen();
    replay.jar = kept;
    let got = replay.get("/oidc/callback?code=1").await;
    assert!(
        !got.reached_upstream(),
        "a released pass came back after an hour: {}",
        got.status
    );
}

/// Each return by a login callback renews the pass, and its window: the
/// returns are counted against `max_flow_returns`, or one could leave,
/// let the slot go, and come back past `max_active` again and again.
#[tokio::test]
async fn returns_by_a_login_callback_are_counted() {
    let up = upstream::spawn().await;
    // Counted apart from the re-entries after portal failures: none of
    // those here, and the login's return still comes.
    let room = format!("{DETOUR_ROOM}\nmax_flow_returns = 1\nmax_reentries = 0");
    let g = Gated::start(&config(up.addr, &room, "")).await;
    let mut d = g.citizen();
    assert!(d.get("/").await.reached_upstream());
    let refused = || metric(g.admin, "varco_reentries_refused_total", "");
    assert_eq!(refused().await, Some(0.0));
    g.advance(3 * MIN).await;
    let mut e = g.citizen();
    assert!(e.get("/").await.reached_upstream(), "d's slot went on");
    assert!(d.get("/oidc/callback?code=1").await.reached_upstream());
    // e stays, so the room is full when d's pass lapses again.
    for _ in 0..6 {
        g.advance(MIN / 2).await;
        assert!(e.get("/apply").await.reached_upstream());
    }
    let got = d.get("/oidc/callback?code=2").await;
    assert!(
        !got.reached_upstream() && got.is_waiting_page(),
        "a second return past max_flow_returns = 1: {}",
        got.status
    );
    assert_eq!(refused().await, Some(1.0));
}

/// d, admitted in a room of one slot and an idle time of a minute, whose
/// session lapsed (its pass, made at 0, still good until 2m), and e, who
/// took the slot.
async fn lapsed_and_replaced(g: &Gated) -> (Citizen, Citizen) {
    let mut d = g.citizen();
    assert!(d.get("/").await.reached_upstream());
    g.advance(3 * MIN / 2).await;
    let mut e = g.citizen();
    assert!(e.get("/").await.reached_upstream(), "d's slot went on");
    (d, e)
}

/// The counts of returns are in the pass: a copy kept from before a
/// return (its count lower) must not come back, nor be renewed as live,
/// or one could return past `max_flow_returns` again and again, each time
/// past `max_active`.
#[tokio::test]
async fn a_copy_of_the_pass_from_before_a_return_does_not_come_back() {
    let up = upstream::spawn().await;
    let room = format!("{DETOUR_ROOM}\nmax_flow_returns = 1\nmax_reentries = 0");
    let g = Gated::start(&config(up.addr, &room, "")).await;
    let (mut d, mut e) = lapsed_and_replaced(&g).await;
    let before = d.jar.clone();
    assert!(d.get("/oidc/callback?code=1").await.reached_upstream());
    // The copy from before the return, still in date, is no live pass.
    let mut replay = g.citizen();
    replay.jar = before.clone();
    let got = replay.get("/apply").await;
    assert!(
        !got.reached_upstream(),
        "a copy from before the return renewed as live: {}",
        got.status
    );
    // d's own pass, from the return, still is.
    assert!(d.get("/apply").await.reached_upstream());
    for _ in 0..6 {
        g.advance(MIN / 2).await;
        assert!(e.get("/apply").await.reached_upstream());
    }
    // Lapsed again: the old copy (no return counted in it) does not come
    // back by the callback either.
    let mut replay = g.citizen();
    replay.jar = before;
    let got = replay.get("/oidc/callback?code=2").await;
    assert!(
        !got.reached_upstream(),
        "a copy from before the return came back past max_flow_returns: {}",
        got.status
    );
}

/// A return whose answer never reached the person (the connection
/// dropped on a phone's network, the portal slow to answer the login's
/// callback) does not cost the way back: the same pass again brings the
/// return's own new pass, as a lost claim's ticket does. Once that
/// answer has gone out, the old pass shares the return's one session, as
/// a copy of its pass would, and makes no other.
#[tokio::test]
async fn a_return_whose_answer_is_lost_is_sent_again() {
    use tokio::io::AsyncWriteExt;
    let up = upstream::spawn().await;
    let room =
        "max_active = 1\nsession_idle = \"1m\"\nflow_paths = [\"/slow\"]\nflow_window = \"10m\"";
    let g = Gated::start(&config(up.addr, room, "")).await;
    let (mut d, _e) = lapsed_and_replaced(&g).await;
    let before = d.jar.clone();
    let pass = d.cookie("varco_pass_portal").unwrap().to_string();
    let mut tcp = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    let callback = format!(
        "GET /slow?ms=30000 HTTP/1.1\r\nhost: localhost\r\ncookie: varco_pass_portal={pass}\r\n\r\n"
    );
    tcp.write_all(callback.as_bytes()).await.unwrap();
    let forwarding = async |n: f64| {
        metric(g.admin, "varco_upstream_in_flight", "room=\"portal\"").await == Some(n)
    };
    let wait = std::time::Duration::from_secs(10);
    common::client::until("the callback at the portal", wait, async || {
        forwarding(1.0).await
    })
    .await;
    drop(tcp);
    common::client::until("the callback dropped", wait, async || forwarding(0.0).await).await;
    // (The portal's slow page says "slow done".)
    let got = d.get("/slow?ms=1").await;
    assert_eq!(got.text(), "slow done", "sent to the queue: {}", got.status);
    assert_ne!(
        d.cookie("varco_pass_portal").unwrap(),
        pass,
        "the return's new pass"
    );
    assert!(d.get("/apply").await.reached_upstream());
    let sid = d.claims("varco_pass_portal").unwrap()["sid"].clone();
    let mut replay = g.citizen();
    replay.jar = before;
    let got = replay.get("/slow?ms=1").await;
    assert_eq!(got.text(), "slow done");
    assert_eq!(replay.claims("varco_pass_portal").unwrap()["sid"], sid);
    g.advance(1000).await;
    let room = g.app.room("portal").unwrap();
    assert_eq!(room.view().active, 2, "e and d's one returned session");
}

#[tokio::test]
async fn a_login_detour_is_bounded_by_its_window() {
    let up = upstream::spawn().await;
    let g = Gated::start(&config(up.addr, DETOUR_ROOM, "")).await;
    let mut d = g.citizen();
    assert!(d.get("/").await.reached_upstream());
    let old_pass = d.jar.clone();
    // d's session lapsed at 1m and the cookie ran out at 2m; at 11m the
    // slot is someone else's, yet the callback still brings d back.
    g.advance(11 * MIN).await;
    let mut e = g.citizen();
    assert!(e.get("/").await.reached_upstream());
    assert!(d.get("/oidc/callback?code=1").await.reached_upstream());
    // At 14m (2m + the 10m window is past) the old pass is only a lapsed
    // pass: the room is full (f), so it is the queue.
    g.advance(3 * MIN).await;
    let mut f = g.citizen();
    assert!(f.get("/").await.reached_upstream());
    let mut late = g.citizen();
    late.jar = old_pass;
    let got = late.get("/oidc/callback?code=2").await;
    assert!(
        !got.reached_upstream() && got.is_waiting_page(),
        "{}",
        got.status
    );
}

#[tokio::test]
async fn a_portal_failure_does_not_cost_the_turn() {
    let up = upstream::spawn().await;
    let g = Gated::start(&config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nfailure_grace = \"2m\"\nmax_reentries = 1",
        "",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());

    // The portal fails a: the pass lives past its idle time.
    assert_eq!(a.get("/fail").await.status, 500);
    assert_eq!(
        metric(g.admin, "varco_pass_extensions_total", "").await,
        Some(1.0)
    );
    g.advance(90_000).await; // past session_idle, within the grace
    assert!(a.get("/").await.reached_upstream(), "extended");
    assert_eq!(b.status("portal").await["state"], "waiting");

    // Failed again, then away past the extension: the slot went to b...
    assert_eq!(a.get("/fail").await.status, 500);
    g.advance(3 * MIN + 30_000).await;
    assert_eq!(b.status("portal").await["state"], "admitted");
    // ... but a comes back ahead of everyone still in line.
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    assert!(
        a.get("/").await.reached_upstream(),
        "back at the head of the line"
    );
    assert_eq!(
        metric(
            g.admin,
            "varco_reentries_total",
            "reason=\"upstream_failure\""
        )
        .await,
        Some(1.0)
    );

    // Capped: after max_reentries, a lapsed pass is just a lapsed pass.
    assert_eq!(a.get("/fail").await.status, 500);
    g.advance(4 * MIN).await;
    assert!(a.get("/").await.is_waiting_page());
    assert_eq!(
        metric(g.admin, "varco_reentries_refused_total", "").await,
        Some(1.0)
    );
}

/// Each reason to come back has its own count: a person failed by the
/// portal whose first request after is a login callback, in a room that
/// allows no callback returns, comes back for the failure.
#[tokio::test]
async fn a_callback_whose_returns_are_used_up_comes_back_for_a_failure() {
    let up = upstream::spawn().await;
    let g = Gated::start(&config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nfailure_grace = \"2m\"\nmax_reentries = 1\n\
         flow_paths = [\"/oidc/callback\"]\nmax_flow_returns = 0",
        "",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    assert_eq!(a.get("/fail").await.status, 500);
    g.advance(3 * MIN + 30_000).await;
    assert_eq!(b.status("portal").await["state"], "admitted");
    assert!(
        a.get("/oidc/callback?code=1").await.reached_upstream(),
        "sent to the line: the callback's count, used up, stood for both"
    );
    assert_eq!(
        metric(
            g.admin,
            "varco_reentries_total",
            "reason=\"upstream_failure\""
        )
        .await,
        Some(1.0)
    );
}

/// A copy of the pass kept from before a return after a portal failure,
/// sent on a login callback's path while that return's session lives, is
/// no second way back: it would share the session with a pass counting a
/// detour instead of the failure, and its holder could keep whichever
/// count suited the next return.
#[tokio::test]
async fn a_copy_from_before_a_return_is_no_return_for_another_reason() {
    let up = upstream::spawn().await;
    let room =
        format!("{DETOUR_ROOM}\nfailure_grace = \"2m\"\nmax_reentries = 1\nmax_flow_returns = 1");
    let g = Gated::start(&config(up.addr, &room, "")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    assert_eq!(a.get("/fail").await.status, 500);
    let mut copy = g.citizen();
    copy.jar = a.jar.clone();
    g.advance(3 * MIN + 30_000).await;
    assert!(
        a.get("/").await.reached_upstream(),
        "back after the failure"
    );
    let got = copy.get("/oidc/callback?code=1").await;
    assert!(
        !got.reached_upstream(),
        "the copy came back as a detour: {}",
        got.status
    );
    assert!(a.get("/apply").await.reached_upstream());
}

#[tokio::test]
async fn the_identity_provider_can_stand_behind_its_own_room() {
    // The portal and, under /idp, the identity provider: each its own
    // room with its own limits, so a login stampede queues at the IdP
    // without taking the portal's places, and the other way round.
    let portal = upstream::spawn().await;
    let idp = upstream::spawn().await;
    let g = Gated::start(&format!(
        "[secrets]\nephemeral = true\n\
         [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 2\n\
         flow_paths = [\"/oidc/callback\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n\
         [rooms.idp]\nupstreams = [\"http://{}\"]\npaths = [\"/idp\"]\nmax_active = 1\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n",
        portal.addr, idp.addr
    ))
    .await;
    let mut a = g.citizen();
    let mut b = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    assert!(b.get("/").await.reached_upstream());
    // Both go to log in: the IdP's room admits one at a time.
    assert!(a.get("/idp/login").await.reached_upstream());
    let got = b.get("/idp/login").await;
    assert!(got.is_waiting_page(), "queued at the IdP");
    assert_eq!(b.status("idp").await["position"], 1);
    // b's place at the portal is untouched meanwhile, and the portal's
    // callback is never queued for b.
    assert!(b.get("/oidc/callback?code=1").await.reached_upstream());
    assert_eq!(portal.hits(), 3);
    assert_eq!(idp.hits(), 1);
}

/// A pre-queue ticket is good for `ticket_ttl` from the opening, not from
/// when it was taken: a place taken hours ahead holds until the line
/// moves.
#[tokio::test]
async fn a_prequeue_ticket_taken_long_before_the_opening_keeps_its_place() {
    let up = upstream::spawn().await;
    let opens = T0 + 120 * MIN;
    let toml = opening_at(
        up.addr,
        opens,
        "max_active = 100\nadmission_per_minute = 600\nticket_ttl = \"1h\"",
    );
    let g = Gated::start(&toml).await;
    let mut early = g.citizen();
    let first = early.get("/").await;
    assert!(first.is_waiting_page());
    assert_eq!(
        ticket_max_age(&first),
        Some(3 * 3600),
        "an hour past the opening"
    );
    // Past the ticket's hour, and past the opening's first tick.
    g.advance(120 * MIN + 1_000).await;
    let s = early.status("portal").await;
    assert_eq!(s["state"], "admitted", "the pre-queue place held: {s}");
    assert!(early.get("/").await.reached_upstream());
}

/// The Max-Age of the ticket cookie a response sets, in seconds.
fn ticket_max_age(got: &common::client::Got) -> Option<u64> {
    got.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("varco_ticket_portal="))?
        .split("; ")
        .find_map(|a| a.strip_prefix("Max-Age="))?
        .parse()
        .ok()
}

/// The portal learns a pre-queue ticket's arrival as the opening: the
/// draw, not the hour of arrival, orders the pre-queue, and a portal that
/// serves first-come-first-served from `at` would otherwise hand its
/// budget to whoever came at midnight.
#[tokio::test]
async fn the_portal_gets_the_opening_as_a_prequeue_arrival() {
    let up = upstream::spawn().await;
    let opens = T0 + 10 * MIN;
    let toml = opening_at(
        up.addr,
        opens,
        "max_active = 100\nadmission_per_minute = 600",
    );
    let g = Gated::start(&toml).await;
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    g.advance(5 * MIN).await;
    let mut later = g.citizen();
    assert!(later.get("/").await.is_waiting_page());
    g.advance(5 * MIN + 1_000).await;
    for c in [&mut early, &mut later] {
        let got = c.get("/echo").await;
        assert!(got.reached_upstream(), "{}", got.text());
        let seen = arrivals_seen(&got);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].contains(&format!("; at={opens};")),
            "{} (opening {opens})",
            seen[0]
        );
    }
}
