//! A varco whose clock and admission ticks the test drives, and citizens:
//! clients with their own cookie jars.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use http::Request;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use varco::app::{App, AppError, Listeners};
use varco::body::{self, Body};
use varco::clock::ManualClock;
use varco::config::Config;

use super::client::{self, Got, Http1};

/// 2027-01-15T08:00:00Z: far from any real clock, so nothing passes by luck.
pub const T0: u64 = 1_800_000_000_000;

pub struct Gated {
    pub app: Arc<App>,
    pub clock: ManualClock,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), AppError>>>,
}

impl Gated {
    pub async fn start(toml: &str) -> Gated {
        Self::start_at(toml, T0, Path::new(".")).await
    }

    pub async fn start_at(toml: &str, now_ms: u64, base: &Path) -> Gated {
        Self::start_with(toml, now_ms, base, None, |_| {}, None).await
    }

    /// On `clock`, a real one, which the test does not drive: `clock`
    /// and `advance` here move a manual clock the app does not read.
    pub async fn start_on(toml: &str, clock: varco::clock::SharedClock) -> Gated {
        let now_ms = clock.now_ms();
        Self::start_with(toml, now_ms, Path::new("."), None, |_| {}, Some(clock)).await
    }

    /// From `toml` written to `varco.toml` in a fresh folder named after
    /// `name`: the test rewrites that file (the path returned) and reloads.
    pub async fn start_written(name: &str, toml: &str) -> (Gated, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("varco-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("varco.toml");
        std::fs::write(&path, toml).unwrap();
        (Self::start_file(&path).await, path)
    }

    /// From a config file, which the admin API can then reload.
    pub async fn start_file(path: &Path) -> Gated {
        Self::start_file_edited(path, |_| {}).await
    }

    /// As `start_file`, the config changed by `edit` once read, as `main`
    /// changes it (the demo's made-up admin token).
    pub async fn start_file_edited(path: &Path, edit: impl FnOnce(&mut Config)) -> Gated {
        let toml = std::fs::read_to_string(path).unwrap();
        let base = path.parent().unwrap().to_path_buf();
        Self::start_with(&toml, T0, &base, Some(path.to_path_buf()), edit, None).await
    }

    /// On a manual clock from `now_ms`, the app's own unless `real`.
    async fn start_with(
        toml: &str,
        now_ms: u64,
        base: &Path,
        file: Option<std::path::PathBuf>,
        edit: impl FnOnce(&mut Config),
        real: Option<varco::clock::SharedClock>,
    ) -> Gated {
        let clock = ManualClock::new(now_ms);
        let mut cfg = Config::from_toml(toml, base).unwrap_or_else(|e| panic!("test config: {e}"));
        edit(&mut cfg);
        cfg.server.listen = "127.0.0.1:0".parse().unwrap();
        cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(&cfg.server).await.expect("bind");
        let addr = listeners.proxy_addr();
        let admin = listeners.admin_addr();
        let app_clock = real.unwrap_or_else(|| Arc::new(clock.clone()));
        let mut app = App::new(cfg, app_clock).await.expect("app");
        if let Some(f) = file {
            app = app.with_config_path(f);
        }
        let app = Arc::new(app);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.clone().serve(
            listeners,
            async move {
                let _ = rx.await;
            },
            false,
        ));
        Gated {
            app,
            clock,
            addr,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Moves the clock on, then runs one admission tick.
    pub async fn advance(&self, ms: u64) {
        self.clock.advance_ms(ms);
        self.app.tick().await;
    }

    /// A person whose browser keeps time by this varco's clock: a cookie
    /// whose `Max-Age` ran out is not sent, as a browser deletes it.
    pub fn citizen(&self) -> Citizen {
        Citizen {
            clock: Some(self.clock.clone()),
            ..Citizen::new(self.addr)
        }
    }

    /// Graceful stop (which also saves the snapshot).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("serve task").expect("serve result");
        }
    }
}

impl Drop for Gated {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// One person with one browser: a cookie jar and a connection pool.
pub struct Citizen {
    addr: SocketAddr,
    client: Http1,
    pub jar: HashMap<String, String>,
    pub headers: Vec<(String, String)>,
    /// The browser's clock (the varco's it was made for): with it, each
    /// cookie set with a `Max-Age` is dropped once that has run out.
    clock: Option<ManualClock>,
    /// When each such cookie runs out (ms); a cookie put in the jar by
    /// hand has none.
    expires: HashMap<String, u64>,
}

impl Citizen {
    pub fn new(addr: SocketAddr) -> Citizen {
        Citizen {
            addr,
            client: client::http1(),
            jar: HashMap::new(),
            headers: Vec::new(),
            clock: None,
            expires: HashMap::new(),
        }
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.jar.get(name).map(String::as_str)
    }

    /// The claims of the token in cookie `name` (read, not verified).
    pub fn claims(&self, name: &str) -> Option<serde_json::Value> {
        use base64::Engine;
        let payload = self.cookie(name)?.split('.').nth(1)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// A person's application, posted to `/apply` (a form's body, no
    /// page of varco's in it).
    pub async fn post_form(&mut self, extra: &[(&str, &str)]) -> Got {
        self.request("POST", "/apply", varco::body::full("iban=IT00"), extra)
            .await
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Body,
        extra: &[(&str, &str)],
    ) -> Got {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(clock) = &self.clock {
            use varco::clock::Clock;
            let now = clock.now_ms();
            let gone: Vec<String> = self
                .expires
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                self.jar.remove(&k);
                self.expires.remove(&k);
            }
        }
        if !self.jar.is_empty() {
            let c: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            b = b.header("cookie", c.join("; "));
        }
        for (k, v) in self.headers.iter() {
            b = b.header(k.as_str(), v.as_str());
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let resp = self
            .client
            .request(b.body(body).unwrap())
            .await
            .expect("request");
        let got = client::read(resp).await;
        for sc in got.headers.get_all("set-cookie") {
            let text = sc.to_str().unwrap();
            let (kv, attrs) = text.split_once(';').unwrap_or((text, ""));
            let (k, v) = kv.split_once('=').unwrap();
            let max_age = attrs.split(';').find_map(|a| {
                a.trim()
                    .strip_prefix("Max-Age=")
                    .and_then(|s| s.parse::<u64>().ok())
            });
            if max_age == Some(0) {
                self.jar.remove(k);
                self.expires.remove(k);
            } else {
                self.jar.insert(k.to_string(), v.to_string());
                match (max_age, &self.clock) {
                    (Some(secs), Some(clock)) => {
                        use varco::clock::Clock;
                        self.expires
                            .insert(k.to_string(), clock.now_ms() + secs * 1000);
                    }
                    _ => {
                        self.expires.remove(k);
                    }
                }
            }
        }
        got
    }

    pub async fn get(&mut self, path: &str) -> Got {
        self.request("GET", path, body::empty(), &[]).await
    }

    /// A GET as an API client sends it (`Accept: application/json`).
    pub async fn get_json(&mut self, path: &str) -> Got {
        self.request(
            "GET",
            path,
            body::empty(),
            &[("accept", "application/json")],
        )
        .await
    }

    pub async fn status(&mut self, room: &str) -> serde_json::Value {
        let got = self.get_json(&format!("/.varco/status?room={room}")).await;
        assert_eq!(got.status, 200, "{}", got.text());
        got.json()
    }
}

impl Got {
    /// True when the test upstream answered (its echo is JSON naming it).
    pub fn reached_upstream(&self) -> bool {
        self.status == 200 && self.body.starts_with(b"{") && self.text().contains("\"upstream\"")
    }

    pub fn is_waiting_page(&self) -> bool {
        self.status == 200 && self.text().contains("id=\"position\"")
    }

    /// The waiting page for a form it stopped: a 429 with `Retry-After`,
    /// never a 200 whatever sent the form could take for "sent".
    #[allow(dead_code)] // not every test file uses it
    pub fn is_page_for_an_unsent_form(&self) -> bool {
        self.status == 429
            && self.headers.contains_key("retry-after")
            && self.text().contains("id=\"position\"")
    }
}

/// Moves every node's clock on and ticks them all (only the leader
/// advances the counters in cluster mode), at least every 5 s of the
/// clock: a longer silence is what an outage looks like to a shared room
/// (see admission.lua's catch_up), and the turns called before it are
/// kept.
pub async fn advance_all(nodes: &[Gated], ms: u64) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(5_000);
        left -= step;
        for g in nodes {
            g.clock.advance_ms(step);
        }
        for g in nodes {
            g.app.tick().await;
        }
    }
}

/// Over `nodes` (one room `portal` of `max_active = 4`, the test
/// upstream's `/release` ending sessions): four holders fill it (let in
/// straight away, or called from the line over the next ticks as the
/// room's rate allows), eight more line up, and once the room is full a
/// holder leaves every 10 s, four times. Checks that no wait is told
/// before the line has moved (the room filling is not its pace), nor
/// before all four inside have been replaced (the first to leave say
/// little of how fast people do), and returns the last in line: 4th from
/// the front, the line having moved at one per 10 s since the room was
/// full.
pub async fn fill_then_move_one_every_ten_seconds(nodes: &[Gated]) -> Citizen {
    advance_all(nodes, 1000).await;
    let mut holders: Vec<Citizen> = (0..4).map(|_| nodes[0].citizen()).collect();
    let mut outside = Vec::new();
    for (i, h) in holders.iter_mut().enumerate() {
        if !h.get("/").await.reached_upstream() {
            outside.push(i);
        }
    }
    let mut line: Vec<Citizen> = (0..8).map(|_| nodes[0].citizen()).collect();
    for c in &mut line {
        assert!(c.get("/").await.is_waiting_page());
    }
    advance_all(nodes, 1000).await;
    for _ in 0..20 {
        let mut still = Vec::new();
        for i in outside {
            if !holders[i].get("/").await.reached_upstream() {
                still.push(i);
            }
        }
        outside = still;
        if outside.is_empty() {
            break;
        }
        advance_all(nodes, 1000).await;
    }
    assert!(outside.is_empty(), "holders never called: {outside:?}");
    let last = line.last_mut().unwrap();
    let s = last.status("portal").await;
    assert_eq!(s["position"], 8, "{s}");
    assert!(
        s["eta_seconds"].is_null(),
        "the line has not moved: no wait to tell yet {s}"
    );
    for (i, h) in holders.iter_mut().enumerate() {
        advance_all(nodes, 10_000).await;
        assert_eq!(h.get("/release").await.status, 200);
        if i == 2 {
            let s = line.last_mut().unwrap().status("portal").await;
            assert!(s["eta_seconds"].is_null(), "3 of 4 replaced: {s}");
        }
    }
    line.pop().unwrap()
}

/// A gated room in front of `up`, with generous per-address limits (every
/// test citizen comes from 127.0.0.1), plus extra room keys.
pub fn gated_config(up: SocketAddr, room_keys: &str) -> String {
    format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{up}\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n{room_keys}\n"
    )
}
