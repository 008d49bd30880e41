//! "Portale Bonus", the demo portal: home, login, application form and
//! submit, each page personalised with the citizen's id (so a crossed
//! response is visible). Past its capacity it behaves like the pension
//! portal in April 2020: every request slows down, then they time out
//! with 500s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::body::{full, Body};
use crate::listener::{ConnInfo, Handler};
use crate::page::escape;

/// A request that has taken this many service times is abandoned with a
/// 500, as an application server's request timeout would.
pub const PORTAL_TIMEOUT_FACTOR: u32 = 10;

/// Form bodies are tiny; anything larger is not a citizen filling a form.
const MAX_FORM_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct PortalSettings {
    /// Requests it serves at once at full speed.
    pub capacity: usize,
    /// Time one request takes when the portal is not overloaded.
    pub service_time: Duration,
}

impl Default for PortalSettings {
    fn default() -> Self {
        PortalSettings {
            capacity: 50,
            service_time: Duration::from_millis(20),
        }
    }
}

pub struct Portal {
    settings: PortalSettings,
    /// Starts at `settings.capacity`; a test or a demo may change it live
    /// (a database failover halving the portal's strength).
    capacity: AtomicUsize,
    answered: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicUsize,
    next_citizen: AtomicU64,
    applications: AtomicU64,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Portal {
    pub fn new(settings: PortalSettings) -> Self {
        Portal {
            capacity: AtomicUsize::new(settings.capacity),
            settings,
            answered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            next_citizen: AtomicU64::new(1),
            applications: AtomicU64::new(0),
        }
    }

    pub fn applications(&self) -> u64 {
        self.applications.load(Ordering::Relaxed)
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Requests answered so far, and how many of them with a 5xx.
    pub fn answers(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// The steady rate of new sessions at which the portal reaches its
    /// capacity, for sessions of `requests` requests each, by Little's
    /// law: in flight = arrivals x service time.
    pub fn knee_per_minute(&self, requests: u32) -> f64 {
        60.0 * self.capacity() as f64
            / (self.settings.service_time.as_secs_f64() * requests.max(1) as f64)
    }

    /// The share of full speed each request gets with `in_flight` at once:
    /// the portal's `capacity` is shared out (processor sharing), so past
    /// it every request slows down together.
    fn share(capacity: usize, in_flight: usize) -> f64 {
        (capacity.max(1) as f64 / in_flight.max(1) as f64).min(1.0)
    }

    /// Serves the work of one request at the speed the crowd leaves it;
    /// false if it took longer than the portal's own timeout.
    async fn work(&self) -> bool {
        let need = self.settings.service_time;
        let step = (need / 10).max(Duration::from_millis(2));
        let started = tokio::time::Instant::now();
        let mut last = started;
        let mut done = Duration::ZERO;
        while done < need {
            if last - started > need * PORTAL_TIMEOUT_FACTOR {
                return false;
            }
            tokio::time::sleep(step.min(need - done)).await;
            let now = tokio::time::Instant::now();
            let share = Self::share(self.capacity(), self.in_flight.load(Ordering::Relaxed));
            done += (now - last).mul_f64(share);
            last = now;
        }
        true
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let citizen = citizen_of(req.headers());
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n"),
            (Method::GET, "/static/style.css") => {
                let mut r = Response::new(full(STYLE));
                r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/css"));
                r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
                r
            }
            (Method::GET, "/whoami") => match citizen {
                Some(c) => private(plain(StatusCode::OK, &format!("{c}\n"))),
                None => plain(StatusCode::UNAUTHORIZED, "no citizen\n"),
            },
            (Method::GET, "/") => {
                let (citizen, new) = match citizen {
                    Some(c) => (c, false),
                    None => (format!("C{:06}", self.next_citizen.fetch_add(1, Ordering::Relaxed)), true),
                };
                let mut r = html(&citizen, "Home", &format!(
                    "<p>Welcome, citizen <strong class=\"citizen\">{}</strong>.</p>\
                     <p>Applications for the bonus are open.</p>\
                     <p><a href=\"/login\">Log in</a> · <a href=\"/apply\">Apply</a></p>",
                    escape(&citizen)
                ));
                if new {
                    set_citizen_cookie(&mut r, &citizen);
                }
                r
            }
            (Method::GET, "/login") => html(citizen.as_deref().unwrap_or("guest"), "Log in",
                "<form method=\"post\" action=\"/login\"><label>Fiscal code <input name=\"citizen\" required></label> <button>Log in</button></form>"),
            (Method::POST, "/login") => {
                let form = match read_form(req).await {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                match form.iter().find(|(k, _)| k == "citizen").map(|(_, v)| v.clone()) {
                    Some(c) if valid_citizen(&c) => {
                        let mut r = redirect("/apply");
                        set_citizen_cookie(&mut r, &c);
                        r
                    }
                    _ => plain(StatusCode::BAD_REQUEST, "a fiscal code is letters and digits\n"),
                }
            }
            (Method::GET, "/apply") => match citizen {
                Some(c) => html(&c, "Application", &format!(
                    "<p>Application for citizen <strong class=\"citizen\">{}</strong>.</p>\
                     <form method=\"post\" action=\"/apply\"><label>IBAN <input name=\"iban\" required></label> <button>Submit</button></form>",
                    escape(&c)
                )),
                None => redirect("/login"),
            },
            (Method::POST, "/apply") => {
                let Some(c) = citizen else { return redirect("/login") };
                if let Err(r) = read_form(req).await {
                    return r;
                }
                let n = self.applications.fetch_add(1, Ordering::Relaxed) + 1;
                let mut r = html(&c, "Application received", &format!(
                    "<p>Application number <strong>{n}</strong> received for citizen <strong class=\"citizen\">{}</strong>.</p>",
                    escape(&c)
                ));
                // Done: the portal tells varco to give the slot to the next
                // person in line (see README, "For portal developers").
                r.headers_mut().insert("x-varco-release", HeaderValue::from_static("1"));
                r
            }
            _ => plain(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Handler for Portal {
    async fn handle(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&self.in_flight);
        let resp = if self.work().await {
            self.route(req).await
        } else {
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Request cannot be served\n",
            )
        };
        self.answered.fetch_add(1, Ordering::Relaxed);
        if resp.status().is_server_error() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        resp
    }
}

/// The first valid `citizen` cookie: another cookie with bytes beyond
/// ASCII hides nothing (the Cookie header is read as bytes).
fn citizen_of(headers: &HeaderMap) -> Option<String> {
    crate::cookies::all(headers, "citizen")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .find(|c| valid_citizen(c))
        .map(str::to_string)
}

fn valid_citizen(c: &str) -> bool {
    !c.is_empty() && c.len() <= 32 && c.chars().all(|ch| ch.is_ascii_alphanumeric())
}

async fn read_form(req: Request<Incoming>) -> Result<Vec<(String, String)>, Response<Body>> {
    let bytes: Bytes = Limited::new(req.into_body(), MAX_FORM_BYTES)
        .collect()
        .await
        .map_err(|_| plain(StatusCode::PAYLOAD_TOO_LARGE, "form too large\n"))?
        .to_bytes();
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn set_citizen_cookie(r: &mut Response<Body>, citizen: &str) {
    if let Ok(v) = HeaderValue::from_str(&format!(
        "citizen={citizen}; Path=/; HttpOnly; SameSite=Lax"
    )) {
        r.headers_mut().append(SET_COOKIE, v);
    }
}

fn private(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    r
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(full(text.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = plain(StatusCode::SEE_OTHER, "");
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    r
}

fn html(citizen: &str, title: &str, main: &str) -> Response<Body> {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · Portale Bonus</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>\
<body data-citizen=\"{}\"><header><h1>Portale Bonus</h1></header><main><h2>{title}</h2>{main}</main></body></html>\n",
        escape(citizen)
    );
    let mut r = Response::new(full(page));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    private(r)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:40rem;margin:auto;padding:1rem;line-height:1.5}\
header{border-bottom:2px solid #06c}h1{color:#06c}\n";

/// A demo portal serving on a listener until its handle is dropped.
pub struct RunningPortal {
    pub addr: std::net::SocketAddr,
    pub portal: Arc<Portal>,
    /// Dropping the sender stops the accept loop.
    _stop: tokio::sync::watch::Sender<bool>,
}

/// Serves a demo portal on `listener`, with varco's default listener
/// limits (not the proxy's), until the returned handle is dropped.
pub fn spawn(
    listener: tokio::net::TcpListener,
    settings: PortalSettings,
) -> std::io::Result<RunningPortal> {
    let addr = listener.local_addr()?;
    let portal = Arc::new(Portal::new(settings));
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(crate::listener::serve(
        listener,
        None,
        portal.clone(),
        // A portal's own limit is not varco's to set: the crowd of
        // `varco simulate` without varco (up to 20,000, each on its own
        // connection) meets the portal's capacity, not a connection cap.
        crate::listener::ListenerSettings {
            max_connections: 100_000,
            ..Default::default()
        },
        crate::listener::Stop {
            drain: rx,
            close: tokio_util::sync::CancellationToken::new(),
        },
        tokio_util::task::TaskTracker::new(),
        None,
    ));
    Ok(RunningPortal {
        addr,
        portal,
        _stop: stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::COOKIE;

    #[test]
    fn shares_its_capacity_past_it() {
        assert_eq!(Portal::share(8, 4), 1.0);
        assert_eq!(Portal::share(8, 8), 1.0);
        assert_eq!(Portal::share(8, 16), 0.5);
        assert_eq!(Portal::share(8, 0), 1.0);
    }

    #[tokio::test]
    async fn slows_down_then_times_out_under_a_crowd() {
        let p = Portal::new(PortalSettings {
            capacity: 1,
            service_time: Duration::from_millis(20),
        });
        let t = std::time::Instant::now();
        assert!(p.work().await, "alone: served");
        assert!(t.elapsed() < Duration::from_millis(20 * PORTAL_TIMEOUT_FACTOR as u64));
        // Twenty at once on a capacity of one: each gets 1/20 of the
        // speed, past its timeout.
        p.in_flight.store(20, Ordering::Relaxed);
        assert!(!p.work().await, "overloaded: timed out");
    }

    #[test]
    fn a_cookie_beyond_ascii_hides_no_citizen() {
        let mut h = HeaderMap::new();
        let raw = "tracker=caf\u{e9}; citizen=; citizen=c42; other=\u{fc}ber";
        h.append(COOKIE, HeaderValue::from_bytes(raw.as_bytes()).unwrap());
        assert_eq!(
            citizen_of(&h).as_deref(),
            Some("c42"),
            "the first valid one"
        );
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("citizen=a-b; x=1"));
        assert_eq!(citizen_of(&h), None, "not alphanumeric: no citizen");
    }
}
