//! `varco simulate`: a click day in miniature. N citizens, each with their
//! own cookies, arrive at once at the demo portal and try to log in and
//! submit an application: first straight at the portal, then through
//! varco. Prints what each run achieved, so the difference is measured,
//! not claimed.

use std::collections::HashMap;
use std::path::Path;
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
    pub admission_per_minute: u32,
    pub max_active: u64,
    /// How long a citizen keeps trying before giving up.
    pub patience: Duration,
}

/// What one run (with or without varco) achieved.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub citizens: usize,
    pub completed: usize,
    pub portal_requests: u64,
    pub portal_5xx: u64,
    /// Seconds from arrival to a submitted application, completed only.
    pub done_seconds: Vec<f64>,
    /// Seconds spent in line (through varco only).
    pub wait_seconds: Vec<f64>,
    /// Responses that named another citizen.
    pub crossed: u64,
    /// Pairs admitted against ticket order by more than one admission tick.
    pub order_inversions: u64,
    pub admitted: usize,
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

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    Some(s[i])
}

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
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(b.body(body).ok()?),
        )
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
        let bytes = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Reply {
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }
}

#[derive(Default)]
struct Trace {
    done: Option<f64>,
    waited: Option<f64>,
    admitted_at: Option<f64>,
    ticket: Option<u64>,
    requests: u64,
    errors_5xx: u64,
    crossed: u64,
}

/// One citizen's click day: get in (waiting if asked to), log in, apply.
async fn citizen(mut p: Person, start: Instant, patience: Duration, through_varco: bool) -> Trace {
    let mut t = Trace::default();
    let deadline = start + patience;
    let login = format!("citizen={}", p.id);
    let steps: [(&str, &str, Option<&str>); 3] = [
        ("GET", "/", None),
        ("POST", "/login", Some(login.as_str())),
        ("POST", "/apply", Some("iban=IT60X0542811101000000123456")),
    ];
    let mut step = 0;
    while step < steps.len() && Instant::now() < deadline {
        let (method, path, form) = steps[step];
        let Some(r) = p.send(method, path, form.map(str::to_string), false).await else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let from_portal = r.body.contains("Portale Bonus") || r.body.contains("cannot be served");
        if from_portal || r.status >= 500 {
            t.requests += 1;
        }
        if r.status >= 500 {
            t.errors_5xx += 1;
            // A person hits reload after a second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if through_varco && r.body.contains("id=\"position\"") {
            // The waiting page: poll the status like the page's script does.
            if t.ticket.is_none() {
                let s = p
                    .send("GET", "/.varco/status?room=portal", None, true)
                    .await;
                t.ticket = s
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s.body).ok())
                    .and_then(|v| v["ticket"].as_u64());
            }
            loop {
                if Instant::now() >= deadline {
                    return t;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let s = p
                    .send("GET", "/.varco/status?room=portal", None, true)
                    .await;
                let admitted = s
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(&s.body).ok())
                    .is_some_and(|v| v["state"] == "admitted");
                if admitted {
                    break;
                }
            }
            continue;
        }
        if step == 0 && t.admitted_at.is_none() {
            let now = start.elapsed().as_secs_f64();
            t.admitted_at = Some(now);
            t.waited = Some(now);
        }
        // Every portal page names its citizen: after login it must be us.
        if step > 0
            && from_portal
            && r.body.contains("data-citizen=")
            && !r.body.contains(&format!("data-citizen=\"{}\"", p.id))
        {
            t.crossed += 1;
        }
        if (200..400).contains(&r.status) {
            step += 1;
        }
    }
    if step == steps.len() {
        t.done = Some(start.elapsed().as_secs_f64());
    }
    t
}

async fn crowd(base: String, s: &SimSettings, through_varco: bool) -> Outcome {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(s.citizens);
    for i in 0..s.citizens {
        let p = Person::new(format!("SIM{i:06}"), base.clone());
        tasks.push(tokio::spawn(citizen(p, start, s.patience, through_varco)));
        // Arrivals spread over the first second, like a click at 09:00.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let mut o = Outcome {
        citizens: s.citizens,
        ..Default::default()
    };
    let mut admissions = Vec::new();
    for t in tasks {
        let Ok(t) = t.await else { continue };
        o.portal_requests += t.requests;
        o.portal_5xx += t.errors_5xx;
        o.crossed += t.crossed;
        if let Some(d) = t.done {
            o.completed += 1;
            o.done_seconds.push(d);
        }
        if let Some(w) = t.waited {
            o.wait_seconds.push(w);
        }
        if let (Some(at), Some(n)) = (t.admitted_at, t.ticket) {
            admissions.push((n, at));
        }
        if t.admitted_at.is_some() {
            o.admitted += 1;
        }
    }
    // Tickets admitted in the same tick may claim in any order; an
    // inversion is a later ticket getting in over a second earlier.
    admissions.sort_by_key(|(n, _)| *n);
    for (i, (_, at_i)) in admissions.iter().enumerate() {
        for (_, at_j) in admissions.iter().skip(i + 1) {
            if *at_i > at_j + 1.5 {
                o.order_inversions += 1;
            }
        }
    }
    o
}

async fn start_portal(capacity: usize) -> std::io::Result<RunningPortal> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    super::spawn(
        listener,
        PortalSettings {
            capacity,
            ..PortalSettings::default()
        },
    )
}

/// Runs both halves and returns (without varco, with varco).
pub async fn run(s: &SimSettings) -> Result<(Outcome, Outcome), String> {
    let portal = start_portal(s.capacity).await.map_err(|e| e.to_string())?;
    let without = crowd(format!("http://{}", portal.addr), s, false).await;
    drop(portal);

    let portal = start_portal(s.capacity).await.map_err(|e| e.to_string())?;
    let portal_addr = portal.addr;
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         max_connections_per_ip = 0\n\
         [log]\naccess = false\nlevel = \"warn\"\n[secrets]\nephemeral = true\n\
         [rooms.portal]\nupstreams = [\"http://{portal_addr}\"]\n\
         admission_per_minute = {}\nmax_active = {}\nsession_idle = \"30s\"\nclaim_window = \"30s\"\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n",
        s.admission_per_minute, s.max_active
    );
    let cfg = Config::from_toml(&toml, Path::new(".")).map_err(|e| e.to_string())?;
    let listeners = Listeners::bind(&cfg.server)
        .await
        .map_err(|e| e.to_string())?;
    let varco_addr = listeners.proxy_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let varco = tokio::spawn(app::run(cfg, listeners, async move {
        let _ = stop_rx.await;
    }));
    let with = crowd(format!("http://{varco_addr}"), s, true).await;
    let _ = stop_tx.send(());
    let _ = varco.await;
    drop(portal);
    Ok((without, with))
}

/// The comparison as a table.
pub fn report(s: &SimSettings, without: &Outcome, with: &Outcome) -> String {
    let secs = |v: Option<f64>| v.map(|x| format!("{x:.1} s")).unwrap_or_else(|| "-".into());
    let mut out = String::new();
    out.push_str(&format!(
        "click day: {} citizens at once, demo portal capacity {} (500s past {}), varco: {} new sessions/min, max_active {}\n\n",
        s.citizens,
        s.capacity,
        2 * s.capacity,
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
        "median wait in line",
        "-".into(),
        secs(percentile(&with.wait_seconds, 0.5)),
    ));
    out.push_str(&row(
        "p99 wait in line",
        "-".into(),
        secs(percentile(&with.wait_seconds, 0.99)),
    ));
    out.push_str(&row(
        "admitted out of ticket order",
        "-".into(),
        format!("{} pairs", with.order_inversions),
    ));
    out.push_str(&row(
        "responses for another citizen",
        without.crossed.to_string(),
        with.crossed.to_string(),
    ));
    out
}
