//! The `varco` binary itself: bounded memory while streaming a GiB each
//! way, graceful drain on SIGTERM, `check-config`, and a crash (SIGKILL)
//! that loses nobody's place.

mod common;

use std::process::Command;
use std::time::Duration;

use common::client::{self, get, send};
use common::gated::Citizen;
use common::process::{bin, demo_command, write_config, Process};
use common::{room_config, upstream};
use http::Request;
use http_body_util::BodyExt;
use varco::body;

const GIB: u64 = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_up_and_a_gib_down_stream_in_bounded_memory() {
    let up = upstream::spawn().await;
    let cfg = write_config(
        "stream",
        &room_config(&[up.addr], "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_body_size = \"2GiB\"\n[log]\naccess = false"),
    );
    let p = Process::start(&cfg);
    let base = p.peak_rss();

    let req = Request::post(format!("http://{}/upload", p.addr))
        .body(upstream::generated(GIB))
        .unwrap();
    let got = send(req).await;
    assert_eq!(
        (got.status, got.text()),
        (200, GIB.to_string()),
        "upload arrived whole"
    );

    let resp = client::http1()
        .request(
            Request::get(format!("http://{}/download?bytes={GIB}", p.addr))
                .body(body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        n += frame
            .unwrap()
            .data_ref()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(n, GIB, "download arrived whole");

    let peak = p.peak_rss();
    eprintln!(
        "varco peak RSS: {} MiB (at start {} MiB)",
        peak >> 20,
        base >> 20
    );
    assert!(
        peak < 128 << 20,
        "varco held {} MiB while streaming 2 GiB",
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_0() {
    let up = upstream::spawn().await;
    let cfg = write_config(
        "drain",
        &room_config(&[up.addr], "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"10s\""),
    );
    let p = Process::start(&cfg);
    let url = format!("http://{}/slow?ms=1500", p.addr);
    let in_flight =
        tokio::spawn(async move { send(Request::get(url).body(body::empty()).unwrap()).await });
    // Wait until the request is at the upstream, then ask varco to stop.
    while up.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal("TERM");
    let got = in_flight.await.unwrap();
    assert_eq!(
        (got.status, got.text()),
        (200, "slow done".to_string()),
        "in-flight request finished"
    );
    exits_0_with_its_listener_closed(p).await;
}

/// A fresh folder named after `name` holding `keys.toml`, a fixed key:
/// what a restart needs to verify the tickets it handed out before.
fn keyed_folder(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("varco-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n",
    )
    .unwrap();
    dir
}

/// Writes `dir`'s `varco.toml`: both listeners on ports of their own,
/// `server` more of `[server]`, the folder's key, then `rest`.
fn keyed_config(dir: &std::path::Path, server: &str, rest: &str) -> std::path::PathBuf {
    let cfg = dir.join("varco.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\
             [secrets]\nkey_file = \"keys.toml\"\n{rest}"
        ),
    )
    .unwrap();
    cfg
}

/// A folder with a key and a snapshot of `sessions` live sessions: a
/// start that takes a while to read them back, after the readiness line.
fn slow_start(name: &str, up: std::net::SocketAddr, sessions: u64) -> std::path::PathBuf {
    let dir = keyed_folder(name);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut list = String::with_capacity(sessions as usize * 60);
    for i in 1..=sessions {
        if i > 1 {
            list.push(',');
        }
        list.push_str(&format!("[\"{i:032x}\",{}]", now + 3_600_000));
    }
    std::fs::write(
        dir.join("state.json"),
        format!(
            "{{\"version\":1,\"saved_ms\":{now},\"rooms\":{{\"portal\":{{\"state\":\
             {{\"queue\":{sessions},\"serving\":{sessions},\"prequeue\":0,\"opened\":true,\
             \"tokens\":1.0,\"refilled_ms\":{now},\"batches\":[],\"claimed\":[],\"floor\":{sessions},\
             \"admitted_total\":{sessions},\"abandoned_total\":0,\"history\":[]}},\
             \"sessions\":[{list}]}}}}}}"
        ),
    )
    .unwrap();
    keyed_config(
        &dir,
        "",
        &format!(
            "[store]\nsnapshot = \"state.json\"\n\
             [rooms.portal]\nupstreams = [\"http://{up}\"]\nmax_active = 10000000\n"
        ),
    )
}

/// The demo tells the operator page's address once the admin listener
/// has its port (it said `:0` when asked for one of any), with the
/// password that opens it; `--portal-only` runs no varco and tells none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_tells_the_operator_page_where_it_is() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .to_string()
    };
    let mut demo = Spoken::spawn(&mut demo_command());
    let mut said = Vec::new();
    let told = loop {
        let line = demo.line();
        if let Some(rest) = line.strip_prefix("operator page: http://") {
            break rest.to_string();
        }
        said.push(line);
    };
    let admin = said
        .iter()
        .find_map(|l| l.split("(admin http://").nth(1))
        .map(|a| a.trim_end_matches(')').to_string())
        .expect("the readiness line first");
    let (addr, rest) = told.split_once("/status").unwrap();
    assert_eq!(addr, admin, "{told}");
    let password = rest
        .rsplit("password ")
        .next()
        .unwrap()
        .trim_end_matches(')');
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("wall:{password}"));
    let page = Request::get(format!("http://{addr}/status"))
        .header("authorization", format!("Basic {basic}"))
        .body(body::empty())
        .unwrap();
    assert_eq!(send(page).await.status, 200, "{told}");
    drop(demo);

    let mut portal = Spoken::spawn(Command::new(bin()).args([
        "demo",
        "--portal-only",
        "--portal-listen",
        &free(),
    ]));
    let first = portal.line();
    assert!(first.starts_with("demo portal listening"), "{first}");
}

/// A child process whose stdout lines are read as they come (on a thread
/// of their own), killed when dropped, a failed test's too.
struct Spoken {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Spoken {
    fn spawn(command: &mut Command) -> Spoken {
        use std::io::{BufRead, BufReader};
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Spoken { child, lines }
    }

    /// The next line, within 30 s.
    fn line(&mut self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("a line within 30 s")
    }
}

impl Drop for Spoken {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `varco demo` without `--config` has no file to reload: a SIGHUP is
/// told and counted as refused, and the demo goes on with its queue
/// (SIGHUP's default action would kill it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_without_a_file_lives_through_a_sighup() {
    let p = Process::demo();
    p.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let refused =
            client::metric(p.admin, "varco_config_reloads_total", "result=\"refused\"").await;
        if refused == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the SIGHUP was not counted as a refused reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = Citizen::new(p.addr).get("/").await;
    assert!(got.status < 500, "the demo still serves: {}", got.status);
    p.signal("TERM");
    exits_0_with_its_listener_closed(p).await;
}

/// Scripts signal varco as soon as it says it listens: the signal must
/// find varco's handlers, not the default action, which kills, even while
/// varco is still reading its snapshot back. A SIGHUP then reloads, and a
/// SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_sent_as_soon_as_varco_says_it_listens_are_varcos() {
    let up = upstream::spawn().await;
    let cfg = slow_start("early-signals", up.addr, 300_000);
    let p = Process::start(&cfg);
    p.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let reloads = loop {
        if let Some(n) =
            client::metric(p.admin, "varco_config_reloads_total", "result=\"ok\"").await
        {
            if n >= 1.0 {
                break n;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the early SIGHUP was not taken as a reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reloads, 1.0);
    drop(p);

    let p = Process::start(&cfg);
    p.signal("TERM");
    exits_0_with_its_listener_closed(p).await;
}

/// Waits for a varco told to stop: it exits 0 and no longer listens.
async fn exits_0_with_its_listener_closed(mut p: Process) {
    let (status, p) = tokio::task::spawn_blocking(move || {
        let s = p.child.wait().unwrap();
        (s, p)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0), "varco exits 0 after draining");
    assert!(
        tokio::net::TcpStream::connect(p.addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// With `shutdown_delay`, SIGTERM first turns `/readyz` to 503 and keeps
/// serving new connections, so a load balancer stops sending people here
/// before anyone is refused; then varco drains and exits as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_first_and_serves_through_the_delay() {
    let up = upstream::spawn().await;
    let cfg = write_config(
        "delay",
        &room_config(&[up.addr], "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_delay = \"3s\""),
    );
    let p = Process::start(&cfg);
    let readyz = format!("http://{}/readyz", p.admin);
    assert_eq!(get(&readyz).await.status, 200);
    p.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while get(&readyz).await.status != 503 {
        assert!(std::time::Instant::now() < deadline, "/readyz still 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new connection, after readiness failed, is still served.
    let got = get(&format!("http://{}/echo", p.addr)).await;
    assert_eq!(got.status, 200, "refused during the delay");
    exits_0_with_its_listener_closed(p).await;
}

/// `varco check-config FILE`, run to its end.
fn check_config(file: &std::path::Path) -> std::process::Output {
    Command::new(bin())
        .arg("check-config")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn check_config_prints_the_resolved_config() {
    let cfg = write_config(
        "good",
        "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\", { url = \"http://127.0.0.1:9002\", weight = 3 }]\n",
    );
    let out = check_config(&cfg);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("keepalive_timeout = \"75s\""), "{text}");
    assert!(text.contains("[rooms.portal]"), "{text}");
    assert!(
        text.contains("{ url = \"http://127.0.0.1:9002\", weight = 3 }"),
        "{text}"
    );
    // What it prints is a config varco reads back.
    let resolved = write_config("good-resolved", &text);
    let again = check_config(&resolved);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// A config refused at start for what the store holds (an opening still
/// to come over a queue that has opened) exits 2, as any bad config does:
/// a supervisor or a script tells it from a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_refused_at_start_for_the_saved_queue_exits_2() {
    let up = upstream::spawn().await;
    let dir = keyed_folder("refused-at-start");
    let first = format!(
        "[store]\nsnapshot = \"state.json\"\n\
         [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 10\n",
        up.addr
    );
    let cfg = keyed_config(&dir, "", &first);
    let p = Process::start(&cfg);
    assert!(Citizen::new(p.addr).get("/").await.reached_upstream());
    p.signal("TERM");
    exits_0_with_its_listener_closed(p).await;

    keyed_config(
        &dir,
        "",
        &(first.clone() + "opens_at = \"2099-12-01T09:00:00+01:00\"\n"),
    );
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await;
    let Ok(out) = out else {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        panic!("varco started over a queue that has opened");
    };
    let out = out.unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("rooms.portal.opens_at"), "{said}");
    assert_eq!(out.status.code(), Some(2), "{said}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        !printed.contains("varco listening"),
        "said it listens, then refused: {printed}"
    );
    // It served nobody: its marks are gone, and the next start (the
    // file mended) finds a clean stop, not a crash.
    assert!(!dir.join("state.json.marks").exists());
    keyed_config(&dir, "", &first);
    let mut p = Process::start_with(&cfg, &[], std::process::Stdio::piped());
    let stderr = p.child.stderr.take().unwrap();
    p.signal("TERM");
    let said = tokio::task::spawn_blocking(move || std::io::read_to_string(stderr).unwrap())
        .await
        .unwrap();
    assert!(
        !said.contains("stopped without its last snapshot"),
        "{said}"
    );
    exits_0_with_its_listener_closed(p).await;
}

/// An admin listener other hosts can reach, with tokens: allowed (a
/// private network), but said, as the tokens cross it in clear.
#[test]
fn check_config_warns_of_admin_tokens_on_an_open_listener() {
    std::env::set_var(
        "VARCO_TEST_OPEN_ADMIN_TOKENS",
        "anna:open-admin-token-0123456789",
    );
    let room = "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\n";
    let tokens = "[admin]\ntokens_env = \"VARCO_TEST_OPEN_ADMIN_TOKENS\"\n";
    let warned = |name: &str, toml: &str| {
        let out = check_config(&write_config(name, toml));
        let said = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "{said}");
        said.contains("warning: server.admin_listen: 0.0.0.0:9090 is reachable from other hosts")
    };
    let open = "[server]\nadmin_listen = \"0.0.0.0:9090\"\n";
    assert!(warned("open-admin", &format!("{open}{tokens}{room}")));
    assert!(
        !warned("open-admin-no-api", &format!("{open}{room}")),
        "no tokens, no API"
    );
    assert!(
        !warned("local-admin", &format!("{tokens}{room}")),
        "loopback"
    );
}

#[test]
fn check_config_names_every_bad_key_and_exits_nonzero() {
    let cfg = write_config(
        "bad",
        "[server]\nlisten = \"nowhere\"\nheader_read_timeout = \"30\"\n[rooms.portal]\nupstreams = [\"ftp://x\"]\n",
    );
    let out = check_config(&cfg);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in [
        "server.listen",
        "server.header_read_timeout",
        "rooms.portal.upstreams[0]",
    ] {
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

#[test]
fn run_refuses_a_bad_config() {
    let cfg = write_config(
        "bad-run",
        "[server]\nsurprise = 1\n[rooms.p]\nupstreams = [\"http://127.0.0.1:1\"]\n",
    );
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("server.surprise"), "{err}");
}

/// Numbers on the command line that would make a run say nothing (a
/// simulation at rate 0 ran its whole "without varco" half first, then
/// failed) are refused before anything starts, naming the flag.
#[test]
fn command_line_numbers_that_mean_nothing_are_refused_at_once() {
    for args in [
        &["simulate", "--rate", "0"][..],
        &["simulate", "--max-active", "0"],
        &["simulate", "--capacity", "0"],
        // --compare runs plans of its own: a rate or cap given with it
        // went unused, and the run seemed to have tested them.
        &["simulate", "--compare", "--rate", "100"],
        &["simulate", "--compare", "--max-active", "5"],
        &["demo", "--capacity", "0"],
        &["ctl", "--timeout", "0s", "status"],
    ] {
        let out = Command::new(bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(args[1]), "the flag is named: {args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} began: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A log reader that stops reading (journald busy, Docker's blocking log
/// driver, a pipe nobody drains) does not stop varco: its access lines
/// fill the 64 KiB pipe after a few hundred requests, and the workers
/// that wrote them would block in `write(2)`, every request with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stops_reading_does_not_stop_varco() {
    let up = upstream::spawn().await;
    // stderr piped, and never read.
    let p = json_logging("stalled-log", &[up.addr], "");
    let all = async {
        for _ in 0..1500 {
            // Logged with its path: about 500 bytes a line.
            let got = client::get(&format!("http://{}/{}", p.addr, "x".repeat(200))).await;
            assert_eq!(got.status, 200);
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(60), all)
            .await
            .is_ok(),
        "varco stopped answering once nobody read its log"
    );
    let metrics = client::get(&format!("http://{}/metrics", p.admin))
        .await
        .text();
    assert!(
        metrics.contains("varco_log_lines_dropped_total 0"),
        "every line held, none dropped: {metrics}"
    );
}

/// varco in front of `upstreams`, its logs in JSON on a piped stderr.
fn json_logging(name: &str, upstreams: &[std::net::SocketAddr], server: &str) -> Process {
    let cfg = write_config(
        name,
        &room_config(
            upstreams,
            &format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}"
            ),
        ),
    );
    Process::start_with(
        &cfg,
        &["--log-format", "json"],
        std::process::Stdio::piped(),
    )
}

/// The process's first `n` access lines, as written.
async fn raw_access_lines(p: &mut Process, n: usize) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    let stderr = p.child.stderr.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("varco::access"))
            .take(n)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), n, "{n} access lines: {lines:?}");
    lines
}

/// The process's first `n` access lines, as written and parsed.
async fn access_lines(p: &mut Process, n: usize) -> Vec<(String, serde_json::Value)> {
    raw_access_lines(p, n)
        .await
        .into_iter()
        .map(|l| {
            let v = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            (l, v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_access_line_per_request() {
    let up = upstream::spawn().await;
    let mut p = json_logging("json-log", &[up.addr], "");
    let got = send(
        Request::get(format!("http://{}/echo?secret=1", p.addr))
            .header("user-agent", "Mozilla/5.0 (Linux; Android 14) varco-test")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    // A HEAD of a page varco makes: hyper sends none of its body.
    let head = send(
        Request::head(format!("http://{}/.varco/nowhere", p.addr))
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, 404);
    let lines = access_lines(&mut p, 2).await;
    let ((line, v), (head_line, h)) = (&lines[0], &lines[1]);
    assert_eq!(h["method"], "HEAD");
    assert_eq!(h["bytes"], 0, "{head_line}");
    assert_eq!(
        h["completed"], true,
        "a HEAD is done without a body: {head_line}"
    );
    assert_eq!(v["room"], "portal", "{line}");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/echo", "the query is not logged");
    assert_eq!(v["status"], 200);
    assert_eq!(v["upstream"], up.addr.to_string());
    assert!(v["duration_ms"].as_f64().is_some());
    assert_eq!(v["bytes"], got.body.len(), "the body's bytes, as sent");
    assert_eq!(
        v["user_agent"],
        "Mozilla/5.0 (Linux; Android 14) varco-test"
    );
    assert_eq!(v["completed"], true);
    // The line names the request as the portal and the client saw it.
    let id = got.headers["x-request-id"].to_str().unwrap();
    assert_eq!(v["request_id"], id);
    assert_eq!(got.json()["headers"]["x-request-id"][0], id);
}

/// A path is written escaped in the text log, as the User-Agent is: a
/// raw line separator or a right-to-left override (which HTTP/1's parser
/// lets through in a path) would break or reverse a line in a log viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_logged_escaped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream::spawn().await;
    let cfg = write_config(
        "text-log",
        &room_config(
            &[up.addr],
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"",
        ),
    );
    let mut p = Process::start_with(&cfg, &[], std::process::Stdio::piped());
    let mut conn = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    conn.write_all(
        "GET /a\u{2028}b\u{202e}c HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 "), "an answer");
    let line = raw_access_lines(&mut p, 1).await.remove(0);
    assert!(
        !line.contains('\u{2028}') && !line.contains('\u{202e}'),
        "{line:?}"
    );
    assert!(line.contains(r"/a\u{2028}b\u{202e}c"), "{line}");
}

/// Behind a trusted load balancer the access line names the client it
/// forwards for, as every rule sees them, not the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_names_the_client_behind_a_trusted_balancer() {
    let up = upstream::spawn().await;
    let mut p = json_logging(
        "json-log-behind",
        &[up.addr],
        "trusted_proxies = [\"127.0.0.0/8\"]",
    );
    let got = send(
        Request::get(format!("http://{}/echo", p.addr))
            .header("x-forwarded-for", "203.0.113.9")
            .body(body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, 200);
    let lines = access_lines(&mut p, 1).await;
    let (line, v) = &lines[0];
    assert_eq!(v["client"], "203.0.113.9", "{line}");
}

/// A download the person gives up on is logged when it ends, as not
/// completed, with what went out: not as a plain 200 at its first byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_line_of_a_download_cut_short_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream::spawn().await;
    let mut p = json_logging("json-log-cut", &[up.addr], "");
    let total: u64 = 1 << 30;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("GET /download?bytes={total} HTTP/1.1\r\nHost: p\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let mut read = 0;
    while read < first.len() {
        let n = s.read(&mut first[read..]).await.unwrap();
        assert!(n > 0, "the download began");
        read += n;
    }
    drop(s);
    let lines = access_lines(&mut p, 1).await;
    let (line, v) = &lines[0];
    assert_eq!(v["status"], 200);
    assert_eq!(v["completed"], false, "{line}");
    let bytes = v["bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < total, "{line}");
}

/// A request whose client leaves before its answer is ready (a reload
/// while the portal is slow) gets its access line, as nginx's 499, and
/// its count: on a click day the reloads are many, and varco's figures
/// would otherwise part from the portal's, which served them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_left_unanswered_is_logged_as_499() {
    use std::sync::atomic::Ordering;
    use tokio::io::AsyncWriteExt;
    let up = upstream::spawn().await;
    let mut p = json_logging("json-log-left", &[up.addr], "");
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: p\r\n\r\n")
        .await
        .unwrap();
    client::until(
        "the portal has the request",
        Duration::from_secs(5),
        async || up.in_flight.load(Ordering::SeqCst) == 1,
    )
    .await;
    drop(s);
    let lines = tokio::time::timeout(Duration::from_secs(10), access_lines(&mut p, 1))
        .await
        .expect("an access line for the request its client left");
    let (line, v) = &lines[0];
    assert_eq!(v["status"], 499, "{line}");
    assert_eq!(v["completed"], false, "{line}");
    assert_eq!(v["path"], "/slow", "{line}");
    assert_eq!(
        client::metric(p.admin, "varco_requests_total", "class=\"4xx\"").await,
        Some(1.0)
    );
    // No answer's headers went out: no time to them.
    assert_eq!(
        client::metric(p.admin, "varco_request_duration_seconds_count", "").await,
        Some(0.0)
    );
}

/// A portal that fails a request: the warnings an operator reads (the
/// upstream cooling down, the failure) name the same request ID as the
/// error page the person holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_warnings_name_the_request_a_failed_upstream_met() {
    use std::io::{BufRead, BufReader};
    let mut p = json_logging("json-warn", &[common::dead_addr()], "");
    let got = get(&format!("http://{}/echo", p.addr)).await;
    assert_eq!(got.status, 502);
    let id = got.headers["x-request-id"].to_str().unwrap().to_string();
    let stderr = p.child.stderr.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.contains("varco::access"))
            .filter(|l| l.contains("\"level\":\"WARN\""))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let warned = |what: &str| {
        let line = lines
            .iter()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no warning {what:?} in {lines:?}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["request_id"].as_str().map(str::to_string)
    };
    assert_eq!(
        warned("upstream refused the connection; cooling down").as_deref(),
        Some(id.as_str())
    );
    assert_eq!(warned("upstream failure").as_deref(), Some(id.as_str()));
}

/// A keyed folder `name` with a config of one room of one slot (`room`
/// besides) over a snapshot taken at the start and then hourly: a crash
/// leaves everything since to the marks. Ticks every 100 ms.
fn one_slot_snapshotted(
    name: &str,
    up: std::net::SocketAddr,
    room: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = keyed_folder(name);
    let cfg = keyed_config(
        &dir,
        "",
        &format!(
            "[store]\nsnapshot = \"state.json\"\nsnapshot_interval = \"1h\"\ntick = \"100ms\"\n\
             [rooms.portal]\nupstreams = [\"http://{up}\"]\nmax_active = 1\n{room}\n\
             per_ip = {{ tickets_per_minute = 100000, status_per_minute = 100000 }}\n"
        ),
    );
    (dir, cfg)
}

/// Until the snapshot taken at the start is in `dir`.
async fn snapshot_taken(dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.join("state.json").exists() {
        assert!(std::time::Instant::now() < deadline, "no snapshot at start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The same person (their cookies) at another process, a restart's.
fn moved(c: &Citizen, p: &Process) -> Citizen {
    let mut n = Citizen::new(p.addr);
    n.jar = c.jar.clone();
    n
}

/// Until `c`'s turn is called, failing after 10 s.
async fn until_admitted(c: &mut Citizen) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.status("portal").await["state"] != "admitted" {
        assert!(std::time::Instant::now() < deadline, "never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// kill -9: a crash, no last snapshot; returns once the process is gone.
async fn killed(mut p: Process) {
    p.signal("KILL");
    let _ = tokio::task::spawn_blocking(move || {
        let _ = p.child.wait();
    })
    .await;
}

/// A crash leaves no last snapshot. Kill -9 after a snapshot taken at the
/// start: everything since is only in the marks written ahead. Nobody's
/// place goes to somebody else, the order holds, a newcomer queues behind
/// everyone, and the pass admitted since the snapshot keeps its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_hands_nobodys_place_to_somebody_else() {
    let up = upstream::spawn().await;
    let (dir, cfg) = one_slot_snapshotted("crash", up.addr, "");
    let p = Process::start(&cfg);
    // The snapshot taken at the start: everything after it is lost in the
    // crash but for the marks.
    snapshot_taken(&dir).await;
    let mut first = Citizen::new(p.addr);
    assert!(
        first.get("/").await.reached_upstream(),
        "the first is let in"
    );
    let pass = first
        .cookie("varco_pass_portal")
        .expect("a pass")
        .to_string();
    let mut line: Vec<Citizen> = (0..3).map(|_| Citizen::new(p.addr)).collect();
    let mut before = Vec::new();
    for c in line.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
        before.push(c.status("portal").await["position"].as_u64().unwrap());
    }
    assert_eq!(before, [1, 2, 3]);
    killed(p).await;
    assert!(
        std::fs::metadata(dir.join("state.json.marks")).is_ok(),
        "the marks outlive the crash"
    );

    let p = Process::start(&cfg);
    let mut first = moved(&first, &p);
    let mut line: Vec<Citizen> = line.iter().map(|c| moved(c, &p)).collect();
    let got = first.get("/").await;
    assert!(
        got.reached_upstream(),
        "the pass is still good: {}",
        got.status
    );
    assert_eq!(
        first.cookie("varco_pass_portal"),
        Some(pass.as_str()),
        "the same session, not a new admission"
    );
    assert_eq!(
        client::metric(p.admin, "varco_reentries_total", "reason=\"crash\"").await,
        Some(1.0)
    );
    let mut after = Vec::new();
    for c in line.iter_mut() {
        let s = c.status("portal").await;
        assert_eq!(s["state"], "waiting", "{s}");
        after.push(s["position"].as_u64().unwrap());
    }
    assert!(
        after.windows(2).all(|w| w[0] < w[1]),
        "order kept: {after:?}"
    );
    let mut late = Citizen::new(p.addr);
    assert!(
        late.get("/").await.is_waiting_page(),
        "nobody jumps the line"
    );
    let pos = late.status("portal").await["position"].as_u64().unwrap();
    assert!(
        pos > after[2],
        "the newcomer is behind everyone who held a ticket before the crash: {pos} vs {after:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A crash sets the serving counter back to the last snapshot's. A
/// person called and admitted since, whose number is not called again at
/// once (the room is full), gets that number back as their place in line,
/// ahead of everyone who came after: not a new ticket at the back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_in_a_crash_keeps_its_place_in_line() {
    let up = upstream::spawn().await;
    let (dir, cfg) = one_slot_snapshotted("crash-place", up.addr, "claim_window = \"10m\"");
    let p = Process::start(&cfg);
    snapshot_taken(&dir).await;
    // Number 1 comes in and leaves; number 2 is called and comes in.
    let mut first = Citizen::new(p.addr);
    assert!(first.get("/").await.reached_upstream());
    let mut second = Citizen::new(p.addr);
    assert!(second.get("/").await.is_waiting_page());
    let number = second.status("portal").await["ticket"].as_u64().unwrap();
    assert_eq!(first.get("/release").await.json()["upstream"], "released");
    until_admitted(&mut second).await;
    assert!(second.get("/").await.reached_upstream(), "called, in");
    killed(p).await;

    let p = Process::start(&cfg);
    let mut second = moved(&second, &p);
    // Number 1 is called again after the restart and holds the one place
    // for its claim window: number 2's session has nowhere to go.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client::metric(p.admin, "varco_room_reserved_slots", "room=\"portal\"").await != Some(1.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "number 1 never called again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = second.get("/").await;
    assert!(got.is_waiting_page(), "{}", got.status);
    assert!(
        second.cookie("varco_pass_portal").is_none(),
        "the pass goes"
    );
    let s = second.status("portal").await;
    assert_eq!(
        (&s["ticket"], &s["position"]),
        (&number.into(), &1.into()),
        "its own number, first in line: {s}"
    );
    let mut late = Citizen::new(p.addr);
    assert!(late.get("/").await.is_waiting_page());
    // Behind, past the numbers the crash may have handed out unseen.
    let pos = late.status("portal").await["position"].as_u64().unwrap();
    assert!(pos > 1, "the newcomer is behind: {pos}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A crash after a clean restart, before anyone new came (a line called,
/// passes claimed): the run's marks are written at its start, so the
/// next start still knows it crashed, and a pass claimed since the last
/// snapshot gets its own place back, not the back of the line. (Written
/// first with the first new number, the marks were missing here, and the
/// crash passed for a clean stop.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_clean_restart_is_still_a_crash() {
    let up = upstream::spawn().await;
    let (dir, cfg) = one_slot_snapshotted("crash-after-restart", up.addr, "claim_window = \"10m\"");
    let mut p = Process::start(&cfg);
    snapshot_taken(&dir).await;
    let mut first = Citizen::new(p.addr);
    assert!(first.get("/").await.reached_upstream());
    let mut second = Citizen::new(p.addr);
    assert!(second.get("/").await.is_waiting_page());
    let number = second.status("portal").await["ticket"].as_u64().unwrap();
    p.signal("TERM");
    let _ = tokio::task::spawn_blocking(move || p.child.wait()).await;
    let marks = dir.join("state.json.marks");
    assert!(!marks.exists(), "a clean stop leaves no marks");
    let saved = std::fs::metadata(dir.join("state.json"))
        .unwrap()
        .modified()
        .unwrap();

    let p = Process::start(&cfg);
    // The snapshot taken at the start, before anyone is called (the
    // store, and its marks, are opened before it).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(dir.join("state.json"))
        .unwrap()
        .modified()
        .unwrap()
        == saved
    {
        assert!(std::time::Instant::now() < deadline, "no snapshot at start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(marks.exists(), "the marks are written at the start");
    let mut first = moved(&first, &p);
    let mut second = moved(&second, &p);
    assert_eq!(first.get("/release").await.json()["upstream"], "released");
    until_admitted(&mut second).await;
    assert!(second.get("/").await.reached_upstream(), "called, in");
    killed(p).await;

    let p = Process::start(&cfg);
    let mut second = moved(&second, &p);
    let got = second.get("/").await;
    assert!(got.is_waiting_page(), "{}", got.status);
    let s = second.status("portal").await;
    assert_eq!(
        (&s["ticket"], &s["position"]),
        (&number.into(), &1.into()),
        "its own number, first in line, not a new one at the back: {s}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Kubernetes ConfigMap mounted as a folder: `varco.toml` is a symlink
/// through `..data` to a timestamped folder, and an edit swaps `..data`
/// and deletes the old folder. A reload reads the file by the path varco
/// was given, now the new one (it read the old folder's path it had
/// resolved at start, gone, and every reload failed until a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_a_configmap_edited_through_its_symlinks() {
    use std::os::unix::fs::symlink;
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let version = |name: &str, max_active: u32| {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(
            folder.join("varco.toml"),
            room_config(
                &[up.addr],
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                 [secrets]\nephemeral = true",
            ) + &format!("max_active = {max_active}\n"),
        )
        .unwrap();
    };
    version("..2026_12_05_first", 5);
    symlink("..2026_12_05_first", dir.join("..data")).unwrap();
    symlink("..data/varco.toml", dir.join("varco.toml")).unwrap();
    let p = Process::start(&dir.join("varco.toml"));
    let max_active = || client::metric(p.admin, "varco_room_max_active", "room=\"portal\"");
    assert_eq!(max_active().await, Some(5.0));

    // The kubelet's edit: the new folder, `..data` swapped in one rename,
    // the old folder removed.
    version("..2026_12_05_second", 7);
    symlink("..2026_12_05_second", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_12_05_first")).unwrap();

    p.signal("HUP");
    let reloads = async |result: &str| {
        let labels = format!("result=\"{result}\"");
        client::metric(p.admin, "varco_config_reloads_total", &labels)
            .await
            .unwrap_or(0.0)
    };
    client::until("the reload is done", Duration::from_secs(10), async || {
        reloads("ok").await + reloads("refused").await >= 1.0
    })
    .await;
    assert_eq!(reloads("ok").await, 1.0, "the reload failed");
    assert_eq!(max_active().await, Some(7.0));
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload by SIGHUP is in the audit log as one through the API is:
/// who asked (`SIGHUP`), then whether it was taken or refused and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_by_sighup_is_in_the_audit_log() {
    let up = upstream::spawn().await;
    let mut p = json_logging("audit-hup", &[up.addr], "");
    let mut audit = json_lines(&mut p, |line| line.contains("\"varco::audit\""));
    p.signal("HUP");
    let asked = next(&mut audit).await;
    assert_eq!(asked["message"], "config reload requested", "{asked}");
    assert_eq!(asked["who"], "SIGHUP");
    let taken = next(&mut audit).await;
    assert_eq!(
        taken["message"], "config reload taken: the new config is in force",
        "{taken}"
    );
    assert_eq!(taken["who"], "SIGHUP");
    assert_eq!(taken["rooms"], 1);

    write_config("audit-hup", "[rooms.portal]\nupstreams = []\n");
    p.signal("HUP");
    assert_eq!(next(&mut audit).await["who"], "SIGHUP");
    let refused = next(&mut audit).await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    assert_eq!(refused["who"], "SIGHUP");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("rooms.portal.upstreams")),
        "{refused}"
    );
}

/// Who may change the rooms is in the audit log: a token given, revoked
/// or changed by a reload of `tokens_file` is told on `varco::audit`, by
/// id, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_given_and_revoked_are_in_the_audit_log() {
    const ANNA: &str = "anna-token-0123456789-abcdef";
    const BRUNO: &str = "bruno-token-0123456789-abcdef";
    const ANNA_NEW: &str = "anna-new-token-0123456789-abcdef";
    let tokens = std::env::temp_dir()
        .join(format!("varco-test-{}", std::process::id()))
        .join("audit-tokens-list.toml");
    std::fs::create_dir_all(tokens.parent().unwrap()).unwrap();
    let write = |list: &[(&str, &str)]| {
        let text: String = list
            .iter()
            .map(|(id, token)| format!("[[tokens]]\nid = \"{id}\"\ntoken = \"{token}\"\n"))
            .collect();
        std::fs::write(&tokens, text).unwrap();
    };
    write(&[("anna", ANNA)]);
    let up = upstream::spawn().await;
    let mut p = json_logging(
        "audit-tokens",
        &[up.addr],
        &format!("[admin]\ntokens_file = \"{}\"", tokens.display()),
    );
    let mut audit = json_lines(&mut p, |line| {
        assert!(
            ![ANNA, BRUNO, ANNA_NEW].iter().any(|t| line.contains(t)),
            "a token in the log: {line}"
        );
        line.contains("\"varco::audit\"")
    });
    let told = async |audit: &mut tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>| {
        p.signal("HUP");
        assert_eq!(next(audit).await["message"], "config reload requested");
        let line = next(audit).await;
        assert_eq!(line["message"], "admin tokens replaced", "{line}");
        let taken = next(audit).await;
        assert_eq!(
            taken["message"], "config reload taken: the new config is in force",
            "{taken}"
        );
        line
    };
    write(&[("anna", ANNA), ("bruno", BRUNO)]);
    let line = told(&mut audit).await;
    assert_eq!(line["in_force"], "[\"anna\", \"bruno\"]", "{line}");
    assert_eq!(line["added"], "[\"bruno\"]", "{line}");
    assert_eq!(line["removed"], "[]", "{line}");
    // Anna's leaked: a new token under her id, Bruno's revoked.
    write(&[("anna", ANNA_NEW)]);
    let line = told(&mut audit).await;
    assert_eq!(line["removed"], "[\"bruno\"]", "{line}");
    assert_eq!(line["changed"], "[\"anna\"]", "{line}");
    assert_eq!(line["added"], "[]", "{line}");
}

/// Every admin API request gets a line on `varco::admin`, reads too (who
/// fetched the admission log, who polled the rooms), naming the token's
/// id, never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_admin_api_request_is_logged_with_who_asked() {
    const TOKEN: &str = "admin-log-token-0123456789";
    std::env::set_var("VARCO_TEST_ADMIN_LOG_TOKENS", format!("anna:{TOKEN}"));
    let up = upstream::spawn().await;
    let mut p = json_logging(
        "admin-log",
        &[up.addr],
        "[admin]\ntokens_env = \"VARCO_TEST_ADMIN_LOG_TOKENS\"",
    );
    let mut admin = json_lines(&mut p, |line| {
        assert!(!line.contains(TOKEN), "a token in the log: {line}");
        line.contains("\"varco::admin\"") || line.contains("request refused")
    });
    let ask = |path: &str| {
        Request::get(format!("http://{}{path}", p.admin))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(body::empty())
            .unwrap()
    };
    assert_eq!(send(ask("/api/rooms")).await.status, 200);
    assert_eq!(send(ask("/api/rooms/nope?x=1")).await.status, 404);
    // A citizen's ticket, checked for them: a credential, never logged.
    let ticket = "eyJhbGciOiJIUzI1NiJ9.eyJzZWNyZXQiOnRydWV9.c2lnbmF0dXJlLW9mLWEtdGlja2V0";
    assert_eq!(
        send(ask(&format!("/api/receipts/{ticket}"))).await.status,
        200
    );
    let first = next(&mut admin).await;
    assert_eq!(first["message"], "admin API request", "{first}");
    assert_eq!(
        (
            &first["who"],
            &first["method"],
            &first["path"],
            &first["status"]
        ),
        (
            &"anna".into(),
            &"GET".into(),
            &"/api/rooms".into(),
            &200.into()
        ),
        "{first}"
    );
    assert!(
        first["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{first}"
    );
    assert!(first["duration_ms"].as_f64().is_some(), "{first}");
    let second = next(&mut admin).await;
    assert_eq!(
        (&second["path"], &second["status"]),
        (&"/api/rooms/nope".into(), &404.into()),
        "the path without its query: {second}"
    );
    let third = next(&mut admin).await;
    assert_eq!(third["path"], "/api/receipts/…", "{third}");
    assert!(!third.to_string().contains("c2lnbmF0dXJl"), "{third}");
    // Nor when the token is refused: the ticket is the asker's all the
    // same.
    let wrong = Request::get(format!("http://{}/api/receipts/{ticket}", p.admin))
        .header("authorization", "Bearer not-a-token-varco-knows")
        .body(body::empty())
        .unwrap();
    assert_eq!(send(wrong).await.status, 401);
    let refused = next(&mut admin).await;
    assert_eq!(
        refused["message"], "admin API request refused: no token it knows",
        "{refused}"
    );
    assert_eq!(refused["path"], "/api/receipts/…", "{refused}");
    assert!(!refused.to_string().contains("c2lnbmF0dXJl"), "{refused}");

    // The operator page: a browser's first visit asks without a password
    // (not logged: the next refusal is the wrong password's); a wrong
    // password is someone guessing, as on the API.
    let status = |authorization: Option<&str>| {
        let mut b = Request::get(format!("http://{}/status", p.admin));
        if let Some(a) = authorization {
            b = b.header("authorization", a);
        }
        b.body(body::empty()).unwrap()
    };
    assert_eq!(send(status(None)).await.status, 401);
    // "anna:not-the-token", as a browser sends it.
    assert_eq!(
        send(status(Some("Basic YW5uYTpub3QtdGhlLXRva2Vu")))
            .await
            .status,
        401
    );
    let guessed = next(&mut admin).await;
    assert_eq!(
        (&guessed["message"], &guessed["path"], &guessed["presented"]),
        (
            &"admin API request refused: no token it knows".into(),
            &"/status".into(),
            &true.into()
        ),
        "{guessed}"
    );
}

/// A change whose caller gives up before the answer (a `ctl --timeout`
/// while Redis stalls) stays in force, is told on `varco::audit` though
/// the sharing is stalled, and still reaches the other nodes: a change
/// in force with no line saying who made it is what the audit log is
/// there to prevent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_caller_gives_up_is_in_the_audit_log() {
    const TOKEN: &str = "give-up-token-0123456789ab";
    std::env::set_var("VARCO_TEST_GIVE_UP_TOKENS", format!("anna:{TOKEN}"));
    std::env::set_var(
        "VARCO_TEST_GIVE_UP_KEYS",
        "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
    let up = upstream::spawn().await;
    let redis = common::redis::RedisServer::start();
    let mut p = json_logging(
        "give-up",
        &[up.addr],
        &format!(
            "[admin]\ntokens_env = \"VARCO_TEST_GIVE_UP_TOKENS\"\n\
             [secrets]\nkey_env = \"VARCO_TEST_GIVE_UP_KEYS\"\n\
             [store]\nkind = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        ),
    );
    let mut audit = json_lines(&mut p, |line| line.contains("\"varco::audit\""));
    // Redis stalled: sharing the change waits for the store's timeout
    // (500 ms), so the answer is normally still out when the caller
    // gives up. It gives up only once varco has the change in hand (its
    // line is the sign): one that gave up before varco even read its
    // request asked nothing, and on a loaded machine that can be after
    // any fixed wait.
    redis.signal("STOP");
    use tokio::io::AsyncWriteExt;
    let mut caller = tokio::net::TcpStream::connect(p.admin).await.unwrap();
    caller
        .write_all(
            format!(
                "POST /api/rooms/portal/pause HTTP/1.1\r\nhost: varco\r\n\
                 authorization: Bearer {TOKEN}\r\ncontent-length: 0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let told = next(&mut audit).await;
    drop(caller);
    redis.signal("CONT");
    assert_eq!(
        (&told["message"], &told["who"], &told["to"]),
        (
            &"room mode changed".into(),
            &"anna".into(),
            &"paused".into()
        ),
        "{told}"
    );
    let state = Request::get(format!("http://{}/api/rooms/portal", p.admin))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(body::empty())
        .unwrap();
    assert_eq!(send(state).await.json()["mode"], "paused");
    // Shared all the same: the other nodes take it from here.
    let shared = || {
        redis.command("EVAL \"return {ok=redis.call('HGET',KEYS[1],'mode') or 'none'}\" 1 varco:{portal}:live")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shared() != "+paused" {
        assert!(
            std::time::Instant::now() < deadline,
            "never shared: {}",
            shared()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// logrotate's way with the admission log: renamed, then SIGUSR1. The
/// records go on in a new file at the log's path, the two files verify as
/// one chain, and the new one alone only as a continuation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_admission_log_after_a_rotation() {
    let up = upstream::spawn().await;
    let dir = keyed_folder("rotate");
    let cfg = keyed_config(
        &dir,
        "",
        &format!(
            "[store]\ntick = \"100ms\"\n\
             [audit]\nlog = \"admissions.log\"\n\
             [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 100\n\
             per_ip = {{ tickets_per_minute = 100000, status_per_minute = 100000 }}\n",
            up.addr
        ),
    );
    let mut p = Process::start_with(
        &cfg,
        &["--log-format", "json"],
        std::process::Stdio::piped(),
    );
    let mut said = json_lines(&mut p, |line| {
        serde_json::from_str::<serde_json::Value>(line).is_ok()
    });
    let (log, old) = (dir.join("admissions.log"), dir.join("admissions.log.1"));
    let records =
        |path: &std::path::Path| std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    let admitted_and_logged = |path: std::path::PathBuf| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while records(&path) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no record in {path:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    assert!(Citizen::new(p.addr).get("/").await.reached_upstream());
    admitted_and_logged(log.clone()).await;
    std::fs::rename(&log, &old).unwrap();
    p.signal("USR1");
    loop {
        let line = next(&mut said).await;
        let m = line["message"].as_str().unwrap_or_default();
        if m.starts_with("admission log reopen") {
            assert!(m.starts_with("admission log reopened"), "{m}");
            break;
        }
    }
    assert!(log.exists(), "a new file at the log's path");
    assert!(Citizen::new(p.addr).get("/").await.reached_upstream());
    admitted_and_logged(log.clone()).await;
    assert_eq!(
        records(&old),
        1,
        "the first admission stays in the old file"
    );

    let verify = |args: &[&std::path::Path], continues: bool| {
        let mut c = Command::new(bin());
        c.args(["audit", "verify"]);
        if continues {
            c.arg("--continues");
        }
        let out = c.args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, out) = verify(&[&old, &log], false);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok: 2 records") && out.contains("portal: 2"),
        "{out}"
    );
    let (ok, out) = verify(&[&log], false);
    assert!(!ok && out.contains("--continues"), "{out}");
    let (ok, out) = verify(&[&log], true);
    assert!(ok && out.contains("continues a chain"), "{out}");
    let (ok, out) = verify(&[&log, &old], false);
    assert!(!ok, "out of order: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A SIGUSR1 whose reopen hangs on the disk (here: a named pipe at the
/// log's path, which nobody writes) holds up no shutdown: varco waited
/// for the reopen before its last snapshot, until the supervisor's kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_hung_on_the_disk_holds_up_no_shutdown() {
    let up = upstream::spawn().await;
    let dir = keyed_folder("reopen-hung");
    let cfg = keyed_config(
        &dir,
        "shutdown_grace = \"1s\"\n",
        &format!(
            "[store]\ntick = \"100ms\"\n\
             [audit]\nlog = \"admissions.log\"\n\
             [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 100\n",
            up.addr
        ),
    );
    let mut p = Process::start_with(
        &cfg,
        &["--log-format", "json"],
        std::process::Stdio::piped(),
    );
    let mut unfinished = json_lines(&mut p, |line| line.contains("left unfinished"));
    let log = dir.join("admissions.log");
    assert!(Citizen::new(p.addr).get("/").await.reached_upstream());
    client::until("a record", Duration::from_secs(10), async || {
        std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) > 0
    })
    .await;
    std::fs::rename(&log, dir.join("admissions.log.1")).unwrap();
    common::fifo_at(&log);
    p.signal("USR1");
    // Held open, never written: varco's read of it waits for ever, as on
    // a disk that stopped answering.
    let _held = common::fifo_writer_once_read(&log, "the reopen", Duration::from_secs(10)).await;
    p.signal("TERM");
    let mut status = None;
    client::until(
        "an exit within 15 s of SIGTERM",
        Duration::from_secs(15),
        async || {
            status = p.child.try_wait().unwrap();
            status.is_some()
        },
    )
    .await;
    let status = status.unwrap();
    assert_eq!(status.code(), Some(0));
    // Said, as the reopen's start was.
    assert_eq!(
        next(&mut unfinished).await["message"],
        "reopening the admission log left unfinished: varco is stopping"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An https upstream that refuses varco's client certificate (TLS 1.3:
/// after the handshake, the request's body already written): a form
/// sent there gets its 502, and the warning names that upstream, not
/// the next one, which was never asked (it was named, as "the request
/// body went to an upstream that failed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_refused_by_an_upstreams_tls_is_that_upstreams_failure() {
    let dir = keyed_folder("mtls-form");
    let key = rcgen::KeyPair::generate().unwrap();
    let someone = rcgen::CertificateParams::new(vec!["someone.example.it".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let strict = upstream::spawn_tls_for(&dir.join("ca.pem"), Some(someone.der())).await;
    let plain = upstream::spawn().await;
    let cfg = keyed_config(
        &dir,
        "",
        &format!(
            "[upstream]\ntls_ca = \"ca.pem\"\nmax_fails = 0\n\
             [rooms.portal]\nupstreams = [\"https://localhost:{}\", \"http://{}\"]\n",
            strict.addr.port(),
            plain.addr
        ),
    );
    let mut p = Process::start_with(
        &cfg,
        &["--log-format", "json"],
        std::process::Stdio::piped(),
    );
    let mut failures = json_lines(&mut p, |line| line.contains("upstream failure"));
    // Round robin: every other form goes to the strict upstream first.
    // Whether hyper wrote the body before it read the alert is a race: if
    // it read the alert first, the body is still here and goes on to the
    // next upstream (a 200). Forms are sent until one was written.
    let mut statuses = Vec::new();
    while !statuses.contains(&502) {
        assert!(
            statuses.len() < 60,
            "no form was written before the refusal: {statuses:?}"
        );
        let form = Request::builder()
            .method("POST")
            .uri(format!("http://{}/echo", p.addr))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body::full("name=Anna"))
            .unwrap();
        let status = send(form).await.status;
        assert!(status == 200 || status == 502, "{status}");
        statuses.push(status);
    }
    let warned = next(&mut failures).await;
    let error = warned["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("localhost:{}", strict.addr.port()))
            && !error.contains(&plain.addr.to_string()),
        "{warned}"
    );
    assert_eq!(strict.hits(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Snapshots go on while varco drains (up to `shutdown_grace`): a session
/// the portal ended during the drain is out of the next one. They stopped
/// at the drain's start, and a supervisor's kill before its end restored
/// the queue as it was then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_go_on_while_varco_drains() {
    let up = upstream::spawn().await;
    let dir = keyed_folder("drain-snapshots");
    let cfg = keyed_config(
        &dir,
        "shutdown_grace = \"60s\"\n",
        &format!(
            "[store]\nsnapshot = \"state.json\"\nsnapshot_interval = \"100ms\"\ntick = \"100ms\"\n\
             [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 10\n",
            up.addr
        ),
    );
    let p = Process::start(&cfg);
    let state = dir.join("state.json");
    let sessions = || {
        std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["rooms"]["portal"]["sessions"].as_array().map(Vec::len))
    };
    let (mut a, mut b) = (Citizen::new(p.addr), Citizen::new(p.addr));
    assert!(a.get("/").await.reached_upstream());
    assert!(b.get("/").await.reached_upstream());
    let within = Duration::from_secs(10);
    client::until("both sessions in a snapshot", within, async || {
        sessions() == Some(2)
    })
    .await;
    // b's request holds the drain open; a's submit, under way when the
    // drain begins, ends a's session during it.
    let held = tokio::spawn(async move { b.get("/slow?ms=30000").await.status });
    let submit = tokio::spawn(async move { a.get("/release?ms=1500").await.status });
    client::until("both at the portal", within, async || {
        up.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 2
    })
    .await;
    p.signal("TERM");
    assert_eq!(submit.await.unwrap(), 200);
    client::until("the ended session out of a snapshot", within, async || {
        sessions() == Some(1)
    })
    .await;
    drop(p);
    held.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The process's JSON log lines (`--log-format json`, on stderr) that
/// `keep` takes, parsed, as they come: read on a thread of their own.
fn json_lines(
    p: &mut Process,
    keep: impl Fn(&str) -> bool + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<serde_json::Value> {
    use std::io::{BufRead, BufReader};
    let stderr = p.child.stderr.take().unwrap();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if keep(&line) {
                let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).unwrap());
            }
        }
    });
    lines
}

/// The next line a reader passes on, within 30 s.
async fn next<T>(lines: &mut tokio::sync::mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), lines.recv())
        .await
        .expect("a line within 30 s")
        .expect("varco still logging")
}

/// An `opens_at` already past for a room nobody has come to (a year
/// mistyped) is said at start: the room opens now, not at the date meant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_past_opening_for_an_empty_room_is_told_at_start() {
    let up = upstream::spawn().await;
    let dir = keyed_folder("past-opening");
    let cfg = keyed_config(
        &dir,
        "",
        &format!(
            "[rooms.portal]\nupstreams = [\"http://{up}\"]\nmax_active = 10\n\
             opens_at = \"2025-12-01T09:00:00+01:00\"\n\
             [rooms.later]\nupstreams = [\"http://{up}\"]\nmax_active = 10\npaths = [\"/later\"]\n\
             opens_at = \"2099-12-01T09:00:00+01:00\"\n",
            up = up.addr
        ),
    );
    let mut p = Process::start_with(
        &cfg,
        &["--log-format", "json"],
        std::process::Stdio::piped(),
    );
    let mut said = json_lines(&mut p, |line| line.contains("opens_at is already past"));
    // Only for the room whose date has passed: every line, up to the
    // end of the log at the process's stop.
    let first = next(&mut said).await;
    p.signal("TERM");
    let mut told = vec![first];
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(30), said.recv()).await {
        told.push(line);
    }
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0]["room"], "portal", "{}", told[0]);
    assert_eq!(told[0]["opens_at"], "2025-12-01T08:00:00Z", "{}", told[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `varco simulate` under a shell's small open-files limit raises it as
/// far as the hard limit allows, and runs: every citizen is a client
/// inside the process, and the crowd failed on the run's own limit, the
/// table blaming varco. Past the hard limit it says what to raise.
#[test]
fn simulate_makes_room_for_its_crowd_or_says_what_to_raise() {
    let simulate = |limits: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit {limits} && exec \"$0\" simulate --citizens 100 --capacity 100 \
                 --rate 1000000 --max-active 100 --patience 20"
            ))
            .arg(bin())
            .output()
            .unwrap()
    };
    let small = simulate("-Sn 128");
    let said = String::from_utf8_lossy(&small.stderr);
    assert!(small.status.success(), "{said}");
    assert!(
        String::from_utf8_lossy(&small.stdout).contains("100/100"),
        "{}",
        String::from_utf8_lossy(&small.stdout)
    );
    let capped = simulate("-n 128");
    let said = String::from_utf8_lossy(&capped.stderr);
    assert_eq!(capped.status.code(), Some(1), "{said}");
    assert!(
        said.contains("need about 264 open files") && said.contains("ulimit"),
        "{said}"
    );
}
