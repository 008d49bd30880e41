//! `varco simulate`: a click day in miniature. N citizens, each with their
//! own cookies, arrive in bursts of 50 a quarter second apart at the demo
//! portal and try to log in and
//! submit an application: first straight at the portal, then through
//! varco. Prints what each run achieved, so the difference is measured,
//! not claimed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use super::{PortalSettings, RunningPortal};
use crate::app::{self, Listeners};
use crate::body::{self, Body};
use crate::config::Config;

#[derive(Debug, Clone)]
pub struct SimSettings {
    pub citizens: usize,
    pub capacity: usize,
    /// The demo portal's time per request below its capacity.
    pub service_time: Duration,
    pub admission_per_minute: u32,
    pub max_active: u64,
    /// How long a citizen keeps trying before giving up.
    pub patience: Duration,
    /// How often a waiting citizen's page asks where they stand.
    pub poll: Duration,
    /// How long a citizen spends on each portal page before the next
    /// step (reading it, filling the form), on average: each page takes
    /// between none and twice this, at random, as people differ. With the
    /// portal's answers, how long a session holds its slot.
    pub think: Duration,
}

impl Default for SimSettings {
    fn default() -> Self {
        SimSettings {
            citizens: 300,
            capacity: 20,
            // Slower than the demo's default portal, so that a crowd of a
            // few hundred is well past its knee.
            service_time: Duration::from_millis(100),
            admission_per_minute: 1200,
            max_active: 20,
            patience: Duration::from_secs(90),
            poll: Duration::from_millis(200),
            think: Duration::ZERO,
        }
    }
}

/// Portal requests one citizen's application takes: home, login, submit.
pub const REQUESTS_PER_APPLICATION: u32 = 3;

/// What one run (with or without varco) achieved.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub citizens: usize,
    pub completed: usize,
    pub portal_requests: u64,
    pub portal_5xx: u64,
    /// Seconds from arrival to a submitted application, completed only.
    pub done_seconds: Vec<f64>,
    /// Seconds from arrival to the portal's first page, for those let in
    /// (those who gave up are in `citizens - admitted`).
    pub wait_seconds: Vec<f64>,
    /// varco's own answers that were neither its waiting page, nor a
    /// portal page it relayed, nor a 502 or 504: a 4xx (a refusal, a
    /// request it found bad) or a 503 (its store failing, the room
    /// closed; or the in-flight cap full, where a room has one). The
    /// rooms `varco simulate` runs have no cap and per-IP limits nobody
    /// meets: there each is a failure.
    pub refused: u64,
    /// varco's own 502s and 504s: the portal refused, reset or outwaited
    /// a request (a portal down shows here, not in `portal_5xx`).
    pub gateway_errors: u64,
    /// Requests that got no answer at all (refused, reset, 30 s).
    pub unanswered: u64,
    /// Responses that named another citizen.
    pub crossed: u64,
    /// Pairs let in against the order of arrival (`out_of_order`).
    pub order_inversions: u64,
    /// Citizens who reached the portal's first page.
    pub admitted: usize,
    /// Citizens who held a ticket: waited in line.
    pub ticketed: usize,
    /// The waits the waiting page told citizens later let in, each over
    /// the wait that followed (1: honest; below 1: promised too short).
    pub told: ToldWaits,
}

/// How the waits told held up: every one, and each citizen's first.
#[derive(Debug, Clone, Default)]
pub struct ToldWaits {
    pub first_over_waited: Vec<f64>,
    pub every_over_waited: Vec<f64>,
    /// How many of every wait told the citizen got in within the range
    /// of (its high end allowed one poll more: a page learns of its turn
    /// at a poll).
    pub every_within_range: usize,
}

impl ToldWaits {
    fn add(&mut self, told: &[Told], admitted: f64, poll: f64) {
        for (i, t) in told.iter().enumerate() {
            let waited = admitted - t.at;
            let ratio = t.eta / waited.max(0.001);
            if i == 0 {
                self.first_over_waited.push(ratio);
            }
            self.every_over_waited.push(ratio);
            if t.low <= waited && waited <= t.high + poll {
                self.every_within_range += 1;
            }
        }
    }
}

impl Outcome {
    pub fn error_rate(&self) -> f64 {
        if self.portal_requests == 0 {
            0.0
        } else {
            self.portal_5xx as f64 / self.portal_requests as f64
        }
    }
}

pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    // Nearest rank: on a small sample the p99 is its largest value, not
    // the one before it.
    let i = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i])
}

/// One citizen's place in the order of arrival, seconds from the start.
#[derive(Debug, Clone, Copy, Default)]
pub struct Place {
    /// The last ticket they held, for those who waited.
    pub ticket: Option<u64>,
    /// When they first asked.
    pub asked: f64,
    /// When the first answer came back (infinite: none ever did). By
    /// then they had their place: anyone who first asked later arrived
    /// later.
    pub answered: f64,
    /// When they reached the portal's first page, if they did.
    pub admitted: Option<f64>,
    /// When they stopped trying (done, or out of patience).
    pub left: f64,
}

/// Pairs of citizens let in against the order of arrival. One is ahead
/// of another when their first answer came back before the other first
/// asked: they had their place (a ticket, or the portal's page) before
/// the other arrived. That order is the simulation's own, not varco's
/// ticket numbers, which a varco numbering out of order would pass;
/// arrivals whose first requests overlap race each other to the door,
/// and are not judged. The pair counts when the one behind got in more
/// than `tolerance` earlier (tickets called in one tick claim in the
/// order their pages poll), or while the one ahead, never let in, was
/// still waiting. So the people let straight in and the people never
/// let in are judged too: a late arrival let in past a waiting line is
/// the line jump this looks for.
pub fn out_of_order(places: &[Place], tolerance: f64) -> u64 {
    let mut pairs = 0;
    for a in places {
        for b in places {
            let ahead = a.answered < b.asked;
            let Some(b_in) = b.admitted else { continue };
            if ahead && b_in + tolerance < a.admitted.unwrap_or(a.left) {
                pairs += 1;
            }
        }
    }
    pairs
}

/// Tickets admitted in the same tick claim in the order their pages
/// poll; arrivals this close race each other to the door.
const ORDER_TOLERANCE_SECONDS: f64 = 1.5;

struct Person {
    id: String,
    base: String,
    client: Client<HttpConnector, Body>,
    jar: HashMap<String, String>,
}

struct Reply {
    status: u16,
    body: String,
}

/// How long a citizen waits for a whole answer before counting it as
/// none.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Person {
    fn new(id: String, base: String) -> Self {
        Person {
            id,
            base,
            client: Client::builder(TokioExecutor::new()).build_http(),
            jar: HashMap::new(),
        }
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        form: Option<String>,
        json: bool,
    ) -> Option<Reply> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if !self.jar.is_empty() {
            let c: Vec<String> = self.jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            b = b.header("cookie", c.join("; "));
        }
        if json {
            b = b.header("accept", "application/json");
        }
        let body = match form {
            Some(f) => {
                b = b.header("content-type", "application/x-www-form-urlencoded");
                body::full(f)
            }
            None => body::empty(),
        };
        // One deadline for the headers and the body: an answer whose body
        // stalls (a Content-Length never met) would hold this citizen,
        // and the run waiting for every citizen, for ever.
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let resp = tokio::time::timeout_at(deadline, self.client.request(b.body(body).ok()?))
            .await
            .ok()?
            .ok()?;
        for sc in resp.headers().get_all("set-cookie") {
            let Ok(text) = sc.to_str() else { continue };
            let (kv, attrs) = text.split_once(';').unwrap_or((text, ""));
            if let Some((k, v)) = kv.split_once('=') {
                if attrs.contains("Max-Age=0") {
                    self.jar.remove(k);
                } else {
                    self.jar.insert(k.to_string(), v.to_string());
                }
            }
        }
        let status = resp.status().as_u16();
        let bytes = tokio::time::timeout_at(deadline, resp.into_body().collect())
            .await
            .ok()?
            .ok()?
            .to_bytes();
        Some(Reply {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}

/// One portal answer as a citizen saw it, seconds from the start.
#[derive(Debug, Clone, Copy)]
struct Hit {
    at: f64,
    latency: f64,
    failed: bool,
}

/// What the crowd saw, shared by its citizens.
#[derive(Default)]
struct Log {
    hits: std::sync::Mutex<Vec<Hit>>,
    admissions: std::sync::Mutex<Vec<f64>>,
}

impl Log {
    fn hit(&self, h: Hit) {
        self.hits.lock().unwrap_or_else(|e| e.into_inner()).push(h);
    }

    fn admitted(&self, at: f64) {
        self.admissions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(at);
    }
}

/// A wait the waiting page told a citizen, seconds.
#[derive(Clone, Copy)]
struct Told {
    at: f64,
    eta: f64,
    low: f64,
    high: f64,
}

#[derive(Default)]
struct Trace {
    told: Vec<Told>,
    done: Option<f64>,
    waited: Option<f64>,
    place: Place,
    requests: u64,
    errors_5xx: u64,
    refused: u64,
    gateway_errors: u64,
    unanswered: u64,
    crossed: u64,
}

/// One citizen's click day: get in (waiting if asked to), log in, apply.
async fn citizen(
    mut p: Person,
    start: Instant,
    s: SimSettings,
    through_varco: bool,
    log: Arc<Log>,
) -> Trace {
    let patience = s.patience;
    let arrived = start.elapsed().as_secs_f64();
    let mut t = Trace::default();
    t.place.asked = arrived;
    t.place.answered = f64::INFINITY;
    // The citizen's own cookie from the first request on, so every page
    // the portal sends, its home page too, names whom it is for.
    p.jar.insert("citizen".into(), p.id.clone());
    // Each citizen's own patience, from their own arrival.
    let deadline = Instant::now() + patience;
    let login = format!("citizen={}", p.id);
    let steps: [(&str, &str, Option<&str>); 3] = [
        ("GET", "/", None),
        ("POST", "/login", Some(login.as_str())),
        ("POST", "/apply", Some("iban=IT60X0542811101000000123456")),
    ];
    let mut step = 0;
    while step < steps.len() && Instant::now() < deadline {
        let (method, path, form) = steps[step];
        let sent = Instant::now();
        let Some(r) = p.send(method, path, form.map(str::to_string), false).await else {
            t.unanswered += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        // The portal's pages, its error page, and its redirects (a login
        // answers 303 with no body; varco itself never redirects).
        let from_portal = r.body.contains("Portale Bonus")
            || r.body.contains("cannot be served")
            || (300..400).contains(&r.status);
        if from_portal {
            t.requests += 1;
        }
        // A place: a ticket (the waiting page) or the portal's page. An
        // error (varco's 503, a 502, the portal's 500) gave none yet.
        let placed = (from_portal && r.status < 500) || r.body.contains("id=\"position\"");
        if placed && t.place.answered.is_infinite() {
            t.place.answered = start.elapsed().as_secs_f64();
        }
        if from_portal {
            log.hit(Hit {
                at: start.elapsed().as_secs_f64(),
                latency: sent.elapsed().as_secs_f64(),
                failed: r.status >= 500,
            });
        }
        if r.status >= 500 {
            if from_portal {
                t.errors_5xx += 1;
            } else if r.status == 502 || r.status == 504 {
                t.gateway_errors += 1;
            } else {
                t.refused += 1;
            }
            // A person hits reload after a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if through_varco && r.body.contains("id=\"position\"") {
            // The waiting page: poll the status like the page's script
            // does. The ticket is read from every answer: a missed turn
            // gives a new one, at the back.
            let mut first = true;
            loop {
                if !first {
                    if Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(s.poll).await;
                }
                first = false;
                let Some(answer) = p
                    .send("GET", "/.varco/status?room=portal", None, true)
                    .await
                else {
                    t.unanswered += 1;
                    continue;
                };
                let Some(v) = serde_json::from_str::<serde_json::Value>(&answer.body)
                    .ok()
                    .filter(|v| v["state"].is_string())
                else {
                    // Not the status (an error page, a refusal): the
                    // page's script would show nothing new.
                    t.refused += 1;
                    continue;
                };
                if let Some(n) = v["ticket"].as_u64() {
                    t.place.ticket = Some(n);
                }
                let secs = |k: &str| v[k].as_u64().map(|s| s as f64);
                if let (Some(eta), Some(low), Some(high)) = (
                    secs("eta_seconds"),
                    secs("eta_low_seconds"),
                    secs("eta_high_seconds"),
                ) {
                    t.told.push(Told {
                        at: start.elapsed().as_secs_f64(),
                        eta,
                        low,
                        high,
                    });
                }
                if v["state"] == "admitted" {
                    break;
                }
            }
            continue;
        }
        if !from_portal {
            // Neither the portal nor the waiting page (a 429, a 400): not
            // a step done; a person tries again after a second.
            t.refused += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if step == 0 && t.place.admitted.is_none() {
            let now = start.elapsed().as_secs_f64();
            t.place.admitted = Some(now);
            t.waited = Some(now - arrived);
            log.admitted(now);
        }
        // Every portal page names its citizen, who sent their cookie.
        if r.body.contains("data-citizen=")
            && !r.body.contains(&format!("data-citizen=\"{}\"", p.id))
        {
            t.crossed += 1;
        }
        if (200..400).contains(&r.status) {
            step += 1;
            if step < steps.len() {
                let share = (crate::room::token::random_u128() % 1001) as f64 / 500.0;
                tokio::time::sleep(s.think.mul_f64(share)).await;
            }
        }
    }
    if step == steps.len() {
        t.done = Some(start.elapsed().as_secs_f64() - arrived);
    }
    t.place.left = start.elapsed().as_secs_f64();
    t
}

async fn crowd(
    base: String,
    s: &SimSettings,
    through_varco: bool,
    start: Instant,
    log: Arc<Log>,
) -> Outcome {
    let mut tasks = Vec::with_capacity(s.citizens);
    for i in 0..s.citizens {
        let p = Person::new(format!("SIM{i:06}"), base.clone());
        tasks.push(tokio::spawn(citizen(
            p,
            start,
            s.clone(),
            through_varco,
            log.clone(),
        )));
        // Arrivals in bursts of 50 every quarter second, like a click at
        // 09:00.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let mut o = Outcome {
        citizens: s.citizens,
        ..Default::default()
    };
    let mut places = Vec::with_capacity(s.citizens);
    for t in tasks {
        // A citizen that panicked is a bug of the simulation's own: not
        // a citizen quietly left out of the table.
        let t = match t.await {
            Ok(t) => t,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => continue,
        };
        o.portal_requests += t.requests;
        o.portal_5xx += t.errors_5xx;
        o.refused += t.refused;
        o.gateway_errors += t.gateway_errors;
        o.unanswered += t.unanswered;
        o.crossed += t.crossed;
        if let Some(d) = t.done {
            o.completed += 1;
            o.done_seconds.push(d);
        }
        if let Some(w) = t.waited {
            o.wait_seconds.push(w);
        }
        if t.place.admitted.is_some() {
            o.admitted += 1;
        }
        if t.place.ticket.is_some() {
            o.ticketed += 1;
        }
        if let Some(admitted) = t.place.admitted {
            o.told.add(&t.told, admitted, s.poll.as_secs_f64());
        }
        places.push(t.place);
    }
    o.order_inversions = out_of_order(&places, ORDER_TOLERANCE_SECONDS);
    o
}

async fn start_portal(s: &SimSettings) -> std::io::Result<RunningPortal> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    super::spawn(
        listener,
        PortalSettings {
            capacity: s.capacity,
            service_time: s.service_time,
        },
    )
}

/// One second of a run through varco.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds from the start (the end of this second).
    pub t: f64,
    /// The admission rate in force, as varco's metrics said.
    pub rate_per_minute: Option<f64>,
    /// The portal's capacity in this second (it may change mid-run).
    pub capacity: usize,
    /// People admitted in this second.
    pub admitted: u64,
    pub portal_answers: u64,
    pub portal_5xx: u64,
    /// p90 of the portal's answers in this second, as citizens saw them.
    pub p90_latency: Option<f64>,
}

/// A run through varco: the outcome, second by second.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub outcome: Outcome,
    pub timeline: Vec<Sample>,
    /// Seconds the run lasted.
    pub seconds: f64,
}

impl Run {
    /// Completed applications per minute of the run.
    pub fn completed_per_minute(&self) -> f64 {
        self.outcome.completed as f64 * 60.0 / self.seconds.max(1.0)
    }

    /// The samples of the rate in force within (from, to] seconds.
    fn rates(&self, from: f64, to: f64) -> Vec<f64> {
        self.timeline
            .iter()
            .filter(|s| s.t > from && s.t <= to)
            .filter_map(|s| s.rate_per_minute)
            .collect()
    }

    /// The mean admission rate in force over (from, to] seconds.
    pub fn mean_rate(&self, from: f64, to: f64) -> Option<f64> {
        let r = self.rates(from, to);
        (!r.is_empty()).then(|| r.iter().sum::<f64>() / r.len() as f64)
    }

    /// The median admission rate in force over (from, to] seconds: where
    /// a sawtooth sits, whatever the depth of its troughs.
    pub fn median_rate(&self, from: f64, to: f64) -> Option<f64> {
        percentile(&self.rates(from, to), 0.5)
    }

    /// Portal answers and 5xx over [from, to) seconds.
    pub fn portal_answers(&self, from: f64, to: f64) -> (u64, u64) {
        self.timeline
            .iter()
            .filter(|s| s.t > from && s.t <= to)
            .fold((0, 0), |(a, f), s| (a + s.portal_answers, f + s.portal_5xx))
    }
}

/// A change to the portal during a run: at `at` from the start, its
/// capacity becomes `capacity`.
#[derive(Debug, Clone, Copy)]
pub struct CapacityChange {
    pub at: Duration,
    pub capacity: usize,
}

/// The crowd through varco with `room` (TOML lines of the room table, e.g.
/// the rate) in front of a fresh demo portal, sampled every second.
pub async fn through_varco(
    s: &SimSettings,
    room: &str,
    changes: &[CapacityChange],
) -> Result<Run, String> {
    let portal = start_portal(s).await.map_err(|e| e.to_string())?;
    let portal_addr = portal.addr;
    // Above the longest a citizen spends on a page (twice `think`): a
    // session that lapsed on the way sent its holder back to the line,
    // at the back, and read as a line jump.
    let idle = (2 * s.think.as_secs() + 30).max(30);
    // Every citizen waits on a connection of its own: the default cap
    // would hold the crowd past 10,000 in the backlog, counted as varco's.
    let connections = (s.citizens + 1_000).max(crate::config::file::DEFAULT_MAX_CONNECTIONS);
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         max_connections_per_ip = 0\nmax_connections = {connections}\n\
         [log]\naccess = false\nlevel = \"warn\"\n[secrets]\nephemeral = true\n\
         [rooms.portal]\nupstreams = [\"http://{portal_addr}\"]\n\
         session_idle = \"{idle}s\"\nclaim_window = \"30s\"\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n{room}\n"
    );
    let cfg = Config::from_toml(&toml, Path::new(".")).map_err(|e| e.to_string())?;
    let listeners = Listeners::bind(&cfg.server)
        .await
        .map_err(|e| e.to_string())?;
    let varco_addr = listeners.proxy_addr();
    let admin_addr = listeners.admin_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let varco = tokio::spawn(app::run(cfg, listeners, async move {
        let _ = stop_rx.await;
    }));

    let start = Instant::now();
    let log = Arc::new(Log::default());
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample_rate(admin_addr, start, done_rx.clone()));
    let changer = {
        let portal = portal.portal.clone();
        let changes = changes.to_vec();
        let mut done = done_rx;
        tokio::spawn(async move {
            let mut plan = vec![(0.0, portal.capacity())];
            for c in changes {
                tokio::select! {
                    _ = tokio::time::sleep_until((start + c.at).into()) => {}
                    _ = done.changed() => break,
                }
                portal.set_capacity(c.capacity);
                plan.push((c.at.as_secs_f64(), c.capacity));
            }
            plan
        })
    };
    let outcome = crowd(format!("http://{varco_addr}"), s, true, start, log.clone()).await;
    let seconds = start.elapsed().as_secs_f64();
    let _ = done_tx.send(true);
    let rates = sampler.await.unwrap_or_default();
    let plan = changer.await.unwrap_or_default();
    let _ = stop_tx.send(());
    // A varco that failed makes a table of nothing let in: an error to
    // report (and a non-zero exit), not a run to compare.
    match varco.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("varco stopped with an error: {e}")),
        Err(e) => return Err(format!("varco failed: {e}")),
    }
    drop(portal);
    Ok(Run {
        outcome,
        timeline: timeline(&log, &rates, &plan, seconds),
        seconds,
    })
}

/// The admission rate in force, read from varco's own metrics once a
/// second, as Prometheus would.
async fn sample_rate(
    admin: std::net::SocketAddr,
    start: Instant,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> Vec<(f64, f64)> {
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new()).build_http();
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = done.changed() => return out,
        }
        let Ok(req) = Request::get(format!("http://{admin}/metrics")).body(body::empty()) else {
            continue;
        };
        let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), client.request(req)).await
        else {
            continue;
        };
        let Ok(Ok(bytes)) =
            tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await
        else {
            continue;
        };
        let bytes = bytes.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        if let Some(v) = metric_value(&text, "varco_room_admission_rate_per_minute") {
            out.push((start.elapsed().as_secs_f64(), v));
        }
    }
}

/// The value of a metric's first series in a Prometheus text exposition.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn timeline(log: &Log, rates: &[(f64, f64)], plan: &[(f64, usize)], seconds: f64) -> Vec<Sample> {
    let hits = log.hits.lock().unwrap_or_else(|e| e.into_inner());
    let admissions = log.admissions.lock().unwrap_or_else(|e| e.into_inner());
    let n = seconds.ceil() as usize;
    (0..n)
        .map(|i| {
            let (from, to) = (i as f64, i as f64 + 1.0);
            let within = |t: f64| t >= from && t < to;
            let mut latencies: Vec<f64> = hits
                .iter()
                .filter(|h| within(h.at))
                .map(|h| h.latency)
                .collect();
            latencies.sort_by(|a, b| a.total_cmp(b));
            Sample {
                t: to,
                rate_per_minute: rates.iter().rfind(|(t, _)| *t < to).map(|(_, r)| *r),
                capacity: plan
                    .iter()
                    .rfind(|(t, _)| *t < to)
                    .map(|(_, c)| *c)
                    .unwrap_or(0),
                admitted: admissions.iter().filter(|t| within(**t)).count() as u64,
                portal_answers: latencies.len() as u64,
                portal_5xx: hits.iter().filter(|h| within(h.at) && h.failed).count() as u64,
                p90_latency: percentile(&latencies, 0.9),
            }
        })
        .collect()
}

/// The fewest open files a run of `citizens` needs in this one process:
/// each one waiting holds a connection to varco (its end and varco's),
/// or to the portal without varco (the same two), and a few are the
/// process's own. varco's connections to the portal come on top, as
/// many as requests in flight: what the hard limit leaves is for them.
pub fn files_needed(citizens: usize) -> u64 {
    2 * citizens as u64 + 64
}

/// Raises this process's soft limit of open files to its hard limit, as
/// Go's runtime does (a shell's 1024 failed the crowd's connections, and
/// the table blamed varco for the run's own limit); an error says what
/// to raise when even that is below what `citizens` need.
pub fn make_room_for(citizens: usize) -> Result<(), String> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let need = files_needed(citizens);
    // None: no limit.
    let may = |l: Rlimit| l.current.unwrap_or(u64::MAX);
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // Refused (a system cap below an unlimited hard limit), the
        // check below says what is left.
        let _ = setrlimit(Resource::Nofile, raised);
    }
    let now = may(getrlimit(Resource::Nofile));
    if now >= need {
        return Ok(());
    }
    Err(format!(
        "{citizens} citizens need about {need} open files (two for each: every citizen is a client inside this process), and it may open {now} (ulimit -n, the hard limit {}): raise it (ulimit -Hn {need}; LimitNOFILE), or ask for fewer citizens",
        limit.maximum.map_or("none".to_string(), |m| m.to_string())
    ))
}

/// Runs both halves and returns (without varco, with varco).
pub async fn run(s: &SimSettings) -> Result<(Outcome, Outcome), String> {
    let portal = start_portal(s).await.map_err(|e| e.to_string())?;
    let without = crowd(
        format!("http://{}", portal.addr),
        s,
        false,
        Instant::now(),
        Arc::new(Log::default()),
    )
    .await;
    drop(portal);
    let room = format!(
        "admission_per_minute = {}\nmax_active = {}",
        s.admission_per_minute, s.max_active
    );
    let with = through_varco(s, &room, &[]).await?;
    Ok((without, with.outcome))
}

/// The comparison as a table.
/// What varco promises a click day and the run with it did not keep: a
/// portal 5xx, someone let in against the order of arrival, a response
/// for another citizen. `varco simulate` exits 1 naming each, so a
/// script or CI running it fails.
pub fn broken_promises(with: &Outcome) -> Vec<String> {
    let mut broken = Vec::new();
    if with.portal_5xx > 0 {
        broken.push(format!(
            "the portal answered {} requests with a 5xx behind varco",
            with.portal_5xx
        ));
    }
    if with.order_inversions > 0 {
        broken.push(format!(
            "{} pairs were let in against the order of arrival",
            with.order_inversions
        ));
    }
    if with.crossed > 0 {
        broken.push(format!("{} responses named another citizen", with.crossed));
    }
    // A portal that refuses, resets or outwaits varco shows here, not in
    // its own 5xx: the citizen saw an error all the same.
    if with.gateway_errors > 0 {
        broken.push(format!(
            "varco answered {} requests with 502 or 504 (the portal refused, reset or outwaited them)",
            with.gateway_errors
        ));
    }
    if with.unanswered > 0 {
        broken.push(format!("{} requests got no answer", with.unanswered));
    }
    if with.refused > 0 {
        broken.push(format!(
            "varco answered {} requests with a refusal of its own (a 4xx or a 503)",
            with.refused
        ));
    }
    // A crowd that ran out of patience with nobody let in: the gate
    // failed, however quietly it did.
    if with.citizens > 0 && with.admitted == 0 {
        broken.push("nobody reached the portal".to_string());
    }
    broken
}

pub fn report(s: &SimSettings, without: &Outcome, with: &Outcome) -> String {
    let secs = |v: Option<f64>| v.map(|x| format!("{x:.1} s")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    out.push_str(&format!(
        "click day: {} citizens arriving 200 a second, {} s on each page, demo portal capacity {} at {} ms a request (500 past {} ms), varco: {} new sessions/min, max_active {}\n\n",
        s.citizens,
        s.think.as_secs_f64(),
        s.capacity,
        s.service_time.as_millis(),
        s.service_time.as_millis() * super::portal::PORTAL_TIMEOUT_FACTOR as u128,
        s.admission_per_minute,
        s.max_active
    ));
    out.push_str(&format!(
        "{:<34} {:>16} {:>16}\n",
        "", "without varco", "with varco"
    ));
    let row = |name: &str, a: String, b: String| format!("{name:<34} {a:>16} {b:>16}\n");
    out.push_str(&row(
        "applications completed",
        format!("{}/{}", without.completed, without.citizens),
        format!("{}/{}", with.completed, with.citizens),
    ));
    out.push_str(&row(
        "portal 5xx rate",
        format!("{:.1}%", 100.0 * without.error_rate()),
        format!("{:.1}%", 100.0 * with.error_rate()),
    ));
    out.push_str(&row(
        "median time to submit",
        secs(percentile(&without.done_seconds, 0.5)),
        secs(percentile(&with.done_seconds, 0.5)),
    ));
    out.push_str(&row(
        "p99 time to submit",
        secs(percentile(&without.done_seconds, 0.99)),
        secs(percentile(&with.done_seconds, 0.99)),
    ));
    out.push_str(&row(
        "varco's own refusals (4xx, 503)",
        without.refused.to_string(),
        with.refused.to_string(),
    ));
    out.push_str(&row(
        "varco's own 502/504",
        without.gateway_errors.to_string(),
        with.gateway_errors.to_string(),
    ));
    out.push_str(&row(
        "requests never answered",
        without.unanswered.to_string(),
        with.unanswered.to_string(),
    ));
    out.push_str(&row(
        "reached the portal",
        format!("{}/{}", without.admitted, without.citizens),
        format!("{}/{}", with.admitted, with.citizens),
    ));
    // Without varco the wait is for the portal's first page to load.
    out.push_str(&row(
        "median wait (of those let in)",
        secs(percentile(&without.wait_seconds, 0.5)),
        secs(percentile(&with.wait_seconds, 0.5)),
    ));
    out.push_str(&row(
        "p99 wait (of those let in)",
        secs(percentile(&without.wait_seconds, 0.99)),
        secs(percentile(&with.wait_seconds, 0.99)),
    ));
    // Without varco nobody is told a wait.
    let median = |v: &[f64]| match percentile(v, 0.5) {
        Some(m) => format!("{m:.2}"),
        None => "-".into(),
    };
    out.push_str(&row(
        "first wait told / wait (median)",
        median(&without.told.first_over_waited),
        median(&with.told.first_over_waited),
    ));
    out.push_str(&row(
        "every wait told / wait (median)",
        median(&without.told.every_over_waited),
        median(&with.told.every_over_waited),
    ));
    let within = |o: &Outcome| match o.told.every_over_waited.len() {
        0 => "-".into(),
        n => format!(
            "{:.0}%",
            100.0 * o.told.every_within_range as f64 / n as f64
        ),
    };
    out.push_str(&row(
        "waits told that held (in range)",
        within(without),
        within(with),
    ));
    out.push_str(&row(
        "let in out of arrival order",
        format!("{} pairs", without.order_inversions),
        format!("{} pairs", with.order_inversions),
    ));
    out.push_str(&row(
        "responses for another citizen",
        without.crossed.to_string(),
        with.crossed.to_string(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_broken_promise_is_named() {
        assert!(broken_promises(&Outcome::default()).is_empty());
        let broken = broken_promises(&Outcome {
            portal_5xx: 2,
            crossed: 1,
            ..Outcome::default()
        });
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(broken[0].contains("2 requests with a 5xx"), "{broken:?}");
        assert!(
            broken[1].contains("1 responses named another"),
            "{broken:?}"
        );
        let broken = broken_promises(&Outcome {
            order_inversions: 3,
            gateway_errors: 4,
            unanswered: 5,
            refused: 6,
            ..Outcome::default()
        });
        assert!(broken[0].contains("3 pairs"), "{broken:?}");
        assert!(
            broken[1].contains("4 requests with 502 or 504"),
            "{broken:?}"
        );
        assert!(broken[2].contains("5 requests got no answer"), "{broken:?}");
        assert!(
            broken[3].contains("6 requests with a refusal"),
            "{broken:?}"
        );
        // A crowd of which nobody got in, with no error counted.
        let broken = broken_promises(&Outcome {
            citizens: 10,
            ..Outcome::default()
        });
        assert_eq!(broken, ["nobody reached the portal"]);
        let some_in = Outcome {
            citizens: 10,
            admitted: 1,
            ..Outcome::default()
        };
        assert!(broken_promises(&some_in).is_empty());
    }

    /// An answer whose body never comes whole is no answer, in time: it
    /// must not hold the citizen, and the run, for ever.
    #[tokio::test(start_paused = true)]
    async fn an_answer_whose_body_never_ends_is_none() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
                .await
                .unwrap();
            // Open, and silent.
            std::future::pending::<()>().await;
            drop(s);
        });
        let mut p = Person::new("1".into(), format!("http://{addr}"));
        let got = tokio::time::timeout(ANSWER_TIMEOUT * 2, p.send("GET", "/", None, false)).await;
        assert!(
            matches!(got, Ok(None)),
            "{:?}",
            got.map(|r| r.map(|r| r.status))
        );
    }

    /// Asked at `asked`, answered 10 ms later.
    fn place(ticket: Option<u64>, asked: f64, admitted: Option<f64>) -> Place {
        Place {
            ticket,
            asked,
            answered: asked + 0.01,
            admitted,
            left: 100.0,
        }
    }

    #[test]
    fn arrival_order_counts_the_line_jumps_it_can_see() {
        let t = ORDER_TOLERANCE_SECONDS;
        // In order of arrival, one tick's in any order: no pair.
        let fair = [
            place(Some(1), 0.0, Some(5.0)),
            place(Some(2), 0.0, Some(4.9)),
            place(Some(3), 0.1, Some(8.0)),
        ];
        assert_eq!(out_of_order(&fair, t), 0);
        // A later arrival in well before an earlier one, whatever the
        // ticket numbers say (a varco numbering out of order).
        let swapped = [
            place(Some(2), 0.0, Some(9.0)),
            place(Some(1), 0.25, Some(5.0)),
        ];
        assert_eq!(out_of_order(&swapped, t), 1);
        // Someone let straight in, with no ticket, after another
        // arrived, while that one still waits.
        let jumped = [place(Some(1), 0.0, Some(20.0)), place(None, 0.5, Some(0.6))];
        assert_eq!(out_of_order(&jumped, t), 1);
        // The one ahead is never let in, and leaves after the one behind
        // got in: a pair; leaving before it: none.
        let mut stranded = [place(Some(1), 0.0, None), place(Some(2), 0.25, Some(30.0))];
        assert_eq!(out_of_order(&stranded, t), 1);
        stranded[0].left = 29.0;
        assert_eq!(out_of_order(&stranded, t), 0);
        // Without tickets (no varco) alike.
        let bare = [place(None, 0.0, Some(12.0)), place(None, 0.25, Some(4.0))];
        assert_eq!(out_of_order(&bare, t), 1);
        // Asked before the other's first answer came back: a race.
        let mut close = [place(None, 0.0, Some(12.0)), place(None, 0.25, Some(4.0))];
        close[0].answered = 0.3;
        assert_eq!(out_of_order(&close, t), 0, "arrivals too close to tell");
        // Never answered: ahead of nobody.
        close[0].answered = f64::INFINITY;
        assert_eq!(out_of_order(&close, t), 0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=80).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), Some(80.0));
        assert_eq!(percentile(&v, 0.5), Some(40.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 0.9), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
