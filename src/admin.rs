//! The admin listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers), `/readyz` (ready for traffic), and, when tokens are
//! configured, the admin API under `/api/` (bearer token): list rooms,
//! change a room's mode, rate or cap live, drain it, reload the config;
//! and `/status`, the operator page over that API (same tokens).
//! Every change is logged on target `varco::audit` with the token's id.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::app::{App, LiveBefore, ReloadError};
use crate::body::{full, Body};
use crate::listener::{ConnInfo, Handler};
use crate::proxy::upstreams::NotTakenOut;
use crate::room::admission::Mode;
use crate::room::Room;
use crate::store::{LiveChange, StoreError};

#[derive(Clone)]
pub struct Admin {
    app: Arc<App>,
    ready: Arc<AtomicBool>,
}

/// The credentials of an `Authorization` header of `scheme`, whose name
/// is case-insensitive (RFC 9110 11.1: `bearer` is `Bearer`).
fn with_scheme<'h>(header: &'h str, scheme: &str) -> Option<&'h str> {
    let (name, credentials) = header.split_once(' ')?;
    name.eq_ignore_ascii_case(scheme)
        .then_some(credentials.trim())
}

impl Admin {
    pub fn new(app: Arc<App>, ready: Arc<AtomicBool>) -> Self {
        Admin { app, ready }
    }

    /// The id of the token the request carries, if it is one of ours: as
    /// a bearer token (scripts, `varco ctl`), or as the password of HTTP
    /// Basic (a browser on the operator page asks for it natively) on a
    /// request that only reads. A browser sends cached Basic credentials
    /// with any site's form posted to this address; a Bearer header no
    /// other site can make it send, so only a Bearer token changes things.
    fn caller(&self, req: &Request<Incoming>) -> Option<String> {
        let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        let presented = if let Some(bearer) = with_scheme(header, "Bearer") {
            bearer.to_string()
        } else if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        } else {
            use base64::Engine;
            let encoded = with_scheme(header, "Basic")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            text.split_once(':')?.1.to_string()
        };
        self.app
            .admin_tokens()
            .iter()
            .find(|t| constant_time_eq(t.token.as_bytes(), presented.as_bytes()))
            .map(|t| t.id.clone())
    }

    /// The operator page: for each room its mode, line, sessions, rates,
    /// wait and upstream health, live, with the last hour drawn.
    fn operator_page(&self, req: &Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if self.app.admin_tokens().is_empty() {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "the operator page needs admin tokens: see [admin] in the README\n".into(),
            );
        }
        if self.caller(req).is_none() {
            // A browser's first visit asks without a password, as it
            // should: only a wrong one is someone guessing.
            if req.headers().contains_key(AUTHORIZATION) {
                refused(req, peer);
            }
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                "an admin token is required (as the password)\n".into(),
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"varco admin\", charset=\"UTF-8\""),
            );
            return r;
        }
        let mut r = text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::page::OPERATOR_PAGE.to_string(),
        );
        // Nothing from elsewhere: the page and its own API, no more.
        r.headers_mut().insert(
            http::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
        );
        r
    }
}

/// Told on `varco::audit`: who tried, never what they presented (a log
/// is no place for a token, nor for most of one).
fn refused(req: &Request<Incoming>, peer: SocketAddr) {
    tracing::warn!(
        target: "varco::audit",
        %peer,
        method = %req.method(),
        path = logged_path(req.uri().path()),
        presented = req.headers().contains_key(AUTHORIZATION),
        "admin API request refused: no token it knows"
    );
}

/// Compares the SHA-256 digests, byte by byte to the end: the time taken
/// says nothing of where a guess went wrong, nor of the token's length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let digest = |v: &[u8]| ring::digest::digest(&ring::digest::SHA256, v);
    let (a, b) = (digest(a), digest(b));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    typed(status, content_type, full(body))
}

fn typed(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    crate::page::mark_own(r.headers_mut());
    r
}

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    text(status, "application/json", v.to_string() + "\n")
}

fn problem(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, json!({ "error": message }))
}

/// The room's state after a change; 503 when the change holds on this
/// node only because the cluster's store could not take it.
fn changed(room: &Room, shared: Result<(), StoreError>) -> Response<Body> {
    match shared {
        Ok(()) => json_response(StatusCode::OK, room_state(room)),
        Err(e) => {
            tracing::error!(target: "varco::audit", room = %room.name, error = %e, "the change holds on this node only: the other nodes were not told");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "error": format!("changed on this node only; the other nodes were not told ({e}): try again"),
                    "room": room_state(room),
                }),
            )
        }
    }
}

/// A room's live state, as the API and `varco ctl status` show it.
pub fn room_state(room: &Room) -> Value {
    let v = room.view();
    let counted = room.counted();
    let per_second = v.observed_rate;
    let wait = v.estimated_wait().map(|w| w.round() as u64);
    let upstreams: Vec<Value> = room
        .upstreams
        .all()
        .iter()
        .enumerate()
        .map(|(i, u)| {
            json!({
                "upstream": u.label,
                "weight": u.weight,
                "healthy": room.upstreams.is_healthy(i),
                "taken_out": room.upstreams.is_taken_out(i),
                "share": room.upstreams.share(i),
                "checks_pass": room
                    .upstreams
                    .checks_pass(i, room.config.health_check.is_some()),
            })
        })
        .collect();
    json!({
        "name": room.name,
        "mode": room.mode().as_str(),
        "gated": room.is_gated(),
        "admission_per_minute": room.per_minute(),
        "max_active": room.max_active(),
        // What holds over the config file until a reset (a reload too).
        "live_changes": room.live_changes(),
        "queue_length": v.in_line(),
        "active_sessions": v.active,
        "reserved": v.reserved,
        "queue_counter": v.queue,
        "serving_counter": v.serving,
        "observed_admissions_per_minute": per_second * 60.0,
        "estimated_wait_seconds": wait,
        // As Prometheus has them: lanes a reload removed still count.
        "admitted_total": counted.admitted,
        "abandoned_total": counted.abandoned,
        "upstreams": upstreams,
        "lanes": lanes_state(room),
    })
}

/// Each lane's line, when the room has lanes (else an empty list).
fn lanes_state(room: &Room) -> Vec<Value> {
    if room.lanes.len() < 2 {
        return vec![];
    }
    room.lanes
        .iter()
        .map(|l| {
            let v = l.store.view();
            json!({
                "name": l.name,
                "weight": l.weight,
                "default": l.is_default(),
                "rate_per_minute": room.lane_limits(l).per_minute,
                "queue_length": v.in_line(),
                "active_sessions": v.active,
                "observed_admissions_per_minute": v.observed_rate * 60.0,
                "admitted_total": v.admitted_total,
            })
        })
        .collect()
}

fn query_value(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("value="))
        .map(str::to_string)
}

/// A positive number, or "unlimited".
fn limit_value<T: std::str::FromStr + PartialOrd + Default>(
    raw: Option<String>,
) -> Result<Option<T>, &'static str> {
    match raw.as_deref() {
        None => Err("give ?value=N (a positive number) or ?value=unlimited"),
        Some("unlimited") => Ok(None),
        // "inf" reads as a number: a rate of infinity turns the token
        // bucket into NaN.
        Some(v) if v.parse::<f64>().is_ok_and(|f| !f.is_finite()) => {
            Err("value must be a positive number or \"unlimited\"")
        }
        Some(v) => match v.parse::<T>() {
            Ok(n) if n > T::default() => Ok(Some(n)),
            _ => Err("value must be a positive number or \"unlimited\""),
        },
    }
}

/// The admission log, to be read up to its last whole record now. Opened
/// off the async workers, as every admission log file operation is.
async fn open_to_length(app: Arc<App>) -> std::io::Result<tokio::io::Take<tokio::fs::File>> {
    use tokio::io::AsyncReadExt;
    let opened = tokio::task::spawn_blocking(move || match app.audit() {
        Some(log) => log.open_committed(),
        None => Err(std::io::Error::other("no admission log")),
    })
    .await
    .map_err(std::io::Error::other)??;
    let (file, len) = opened;
    Ok(tokio::fs::File::from_std(file).take(len))
}

/// An admin API path as the log may hold it: a receipt or a ticket being
/// checked (`/api/receipts/...`) is a citizen's, and a ticket is a bearer
/// credential: whoever read it in the log could claim that turn.
fn logged_path(path: &str) -> String {
    match path.strip_prefix("/api/receipts/") {
        Some(_) => "/api/receipts/…".to_string(),
        None => path.to_string(),
    }
}

/// `text` with its `%XX` escapes decoded; None if one is malformed or the
/// result is not UTF-8.
fn percent_decoded(text: &str) -> Option<String> {
    let (out, whole) = crate::request_path::unescaped(text.as_bytes());
    whole.then(|| String::from_utf8(out).ok()).flatten()
}

impl Admin {
    async fn api(&self, req: Request<Incoming>, who: &str) -> Response<Body> {
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
        // HEAD is GET without the body (hyper leaves the body out).
        let method = match req.method() {
            &Method::HEAD => Method::GET,
            m => m.clone(),
        };
        match (method, parts.as_slice()) {
            (Method::GET, ["rooms"]) => {
                let rooms: Vec<Value> = self.app.rooms().iter().map(|r| room_state(r)).collect();
                json_response(StatusCode::OK, json!({ "rooms": rooms }))
            }
            // A citizen's receipt or ticket, checked for them (the same as
            // `varco receipt verify`, with the keys of this running varco).
            (Method::GET, ["receipts", text]) => {
                // A lane's receipt holds a `#`, sent as `%23`.
                let Some(text) = percent_decoded(text) else {
                    return problem(StatusCode::BAD_REQUEST, "a malformed %-escape");
                };
                match crate::room::receipt::verify(&self.app.keys(), &text) {
                    Ok(v) => json_response(StatusCode::OK, v.to_json()),
                    Err(why) => {
                        json_response(StatusCode::OK, json!({ "genuine": false, "reason": why }))
                    }
                }
            }
            // The admission log as written: one JSON record per line, for
            // `varco audit verify`.
            (Method::GET, ["audit"]) => match self.app.audit() {
                None => problem(
                    StatusCode::NOT_FOUND,
                    "no admission log: set audit.log in the config",
                ),
                // Streamed from the file, 64 KiB at a time: after a click
                // day it holds a line per admission (hundreds of MB), not
                // to be read whole by a worker the proxy shares. As long as
                // it was when asked for: the lines written meanwhile are
                // the next read's, and none is cut half way. No
                // Content-Length: a file cut short meanwhile would make it
                // a lie.
                Some(_) => match open_to_length(self.app.clone()).await {
                    Ok(file) => {
                        use futures_util::TryStreamExt;
                        let frames = tokio_util::io::ReaderStream::with_capacity(file, 64 << 10)
                            .map_ok(http_body::Frame::data);
                        typed(
                            StatusCode::OK,
                            "application/x-ndjson",
                            crate::body::stream(http_body_util::StreamBody::new(frames)),
                        )
                    }
                    Err(e) => problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &format!("cannot read the admission log: {e}"),
                    ),
                },
            },
            (Method::GET, ["history"]) => {
                json_response(StatusCode::OK, self.app.history().to_json())
            }
            (Method::GET, ["rooms", name]) => match self.app.room(name) {
                Some(r) => json_response(StatusCode::OK, room_state(&r)),
                None => problem(StatusCode::NOT_FOUND, "no such room"),
            },
            (Method::POST, ["reload"]) => {
                match self.app.reload_by(who).await {
                    Ok(r) => json_response(
                        StatusCode::OK,
                        json!({ "reloaded": true, "rooms": r.rooms, "restart_needed": r.restart_needed }),
                    ),
                    Err(e) => {
                        // 422 for a file with mistakes; nothing wrong with
                        // the request when there is no file to read.
                        let status = match e {
                            ReloadError::NoFile => StatusCode::CONFLICT,
                            ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                        };
                        json_response(status, json!({ "reloaded": false, "error": e.to_string() }))
                    }
                }
            }
            (Method::POST, ["rooms", name, "upstreams", upstream, action]) => {
                let out = match *action {
                    "out" => true,
                    "in" => false,
                    _ => return problem(StatusCode::NOT_FOUND, "actions: out, in"),
                };
                // An IPv6 upstream's brackets come escaped.
                let Some(label) = percent_decoded(upstream) else {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "a malformed escape in the upstream",
                    );
                };
                let force = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "force=true"));
                match self.app.take_upstream_out(name, &label, out, force).await {
                    Err(NotTakenOut::NoSuchRoom) => problem(StatusCode::NOT_FOUND, "no such room"),
                    Err(NotTakenOut::NoSuchUpstream) => problem(
                        StatusCode::NOT_FOUND,
                        "no such upstream in this room: name it host:port, as in GET /api/rooms/NAME",
                    ),
                    Err(NotTakenOut::LastInRotation) => problem(
                        StatusCode::CONFLICT,
                        "it is the last upstream of the room in rotation: everyone would get 502. Add ?force=true (varco ctl upstream-out --force) if that is what you want",
                    ),
                    Ok((room, was)) => {
                        tracing::info!(target: "varco::audit", who, room = %room.name, upstream = %label, action, was_out = was, force, "upstream taken out of rotation or put back by hand");
                        json_response(StatusCode::OK, room_state(&room))
                    }
                }
            }
            (Method::POST, ["rooms", name, action]) => {
                if self.app.room(name).is_none() {
                    return problem(StatusCode::NOT_FOUND, "no such room");
                }
                let value = query_value(&req);
                // None: reset, back to the config.
                let change = match *action {
                    "pause" | "drain" => Some(LiveChange::Mode(Mode::Paused)),
                    "resume" | "open" => Some(LiveChange::Mode(Mode::Queue)),
                    "queue_all" => Some(LiveChange::Mode(Mode::QueueAll)),
                    "close" => Some(LiveChange::Mode(Mode::Closed)),
                    "passthrough" => Some(LiveChange::Mode(Mode::Passthrough)),
                    "rate" => match limit_value::<f64>(value) {
                        Ok(Some(rate)) if rate > crate::room::admission::MAX_PER_MINUTE => {
                            return problem(
                                StatusCode::BAD_REQUEST,
                                "value must be at most 1000000000 new sessions per minute",
                            )
                        }
                        Ok(rate) => Some(LiveChange::PerMinute(rate)),
                        Err(e) => return problem(StatusCode::BAD_REQUEST, e),
                    },
                    "max_active" => match (value.is_none(), limit_value::<u64>(value)) {
                        (_, Ok(max))
                            if max.is_none_or(|m| m <= crate::room::admission::MAX_ACTIVE) =>
                        {
                            Some(LiveChange::MaxActive(max))
                        }
                        (true, Err(e)) => return problem(StatusCode::BAD_REQUEST, e),
                        // "1.5" too: a cap counts whole sessions.
                        (false, _) | (true, Ok(_)) => {
                            return problem(
                                StatusCode::BAD_REQUEST,
                                "value must be a whole number of sessions from 1 to 1000000000, or \"unlimited\"",
                            )
                        }
                    },
                    "reset" => None,
                    _ => {
                        return problem(
                            StatusCode::NOT_FOUND,
                            "actions: pause, resume, queue_all, close, open, drain, passthrough, rate, max_active, reset",
                        )
                    }
                };
                let told = |room: &Room, before: &LiveBefore| match change {
                    Some(LiveChange::Mode(mode)) => {
                        tracing::info!(target: "varco::audit", who, room = %room.name, action, from = before.mode.as_str(), to = mode.as_str(), "room mode changed");
                    }
                    Some(LiveChange::PerMinute(rate)) => {
                        tracing::info!(target: "varco::audit", who, room = %room.name, action, from = ?before.per_minute, to = ?rate, "admission rate changed");
                    }
                    Some(LiveChange::MaxActive(max)) => {
                        tracing::info!(target: "varco::audit", who, room = %room.name, action, from = ?before.max_active, to = ?max, "max_active changed");
                    }
                    None => {
                        tracing::info!(target: "varco::audit", who, room = %room.name, action, mode = room.mode().as_str(), admission_per_minute = ?room.per_minute(), max_active = ?room.max_active(), "live changes dropped: back to the config");
                    }
                };
                // A reload removed the room meanwhile.
                let Some((room, _, shared)) = self.app.change_live(name, change, told).await else {
                    return problem(StatusCode::NOT_FOUND, "no such room");
                };
                changed(&room, shared)
            }
            _ => match api_methods(&parts) {
                Some(allow) => not_allowed(allow),
                None => problem(StatusCode::NOT_FOUND, "see README: admin API"),
            },
        }
    }

    /// [`Admin::api`], then its line on `varco::admin`.
    async fn answer(
        &self,
        req: Request<Incoming>,
        who: String,
        peer: SocketAddr,
    ) -> Response<Body> {
        // Reads too (who fetched the admission log, who polled what):
        // the changes are on `varco::audit` already, but an admin API
        // answers questions an auditor may ask about later.
        let started = std::time::Instant::now();
        let (method, path) = (req.method().clone(), logged_path(req.uri().path()));
        let r = self.api(req, &who).await;
        tracing::info!(
            target: "varco::admin",
            who,
            %peer,
            method = %method,
            path,
            status = r.status().as_u16(),
            duration_ms = started.elapsed().as_micros() as f64 / 1000.0,
            "admin API request"
        );
        r
    }
}

/// The methods a route of the admin API answers (for a 405's `Allow`);
/// None for a path that is no route.
fn api_methods(parts: &[&str]) -> Option<&'static str> {
    match parts {
        ["rooms"] | ["rooms", _] | ["receipts", _] | ["audit"] | ["history"] => Some("GET, HEAD"),
        ["reload"] | ["rooms", _, _] | ["rooms", _, "upstreams", _, _] => Some("POST"),
        _ => None,
    }
}

/// 405 with the `Allow` RFC 9110 15.5.6 requires: a `GET` of a change
/// said "no such route" sent operators looking for the wrong mistake.
fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = problem(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("this path answers {allow} only"),
    );
    r.headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    r
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        const PLAIN: &str = "text/plain; charset=utf-8";
        let path = req.uri().path();
        if path.starts_with("/api/") && self.app.admin_tokens().is_empty() {
            // Said as what it is, whatever the method: a 405 "use GET"
            // sent operators looking for the wrong mistake.
            return problem(
                StatusCode::NOT_FOUND,
                "the admin API is off: set [admin] tokens (or tokens_env) and reload",
            );
        }
        if path.starts_with("/api/") {
            let Some(who) = self.caller(&req) else {
                let presented = req.headers().contains_key(AUTHORIZATION);
                refused(&req, conn.peer);
                let mut r = problem(
                    StatusCode::UNAUTHORIZED,
                    if presented {
                        "this token is not accepted (a bearer token of [admin] tokens; HTTP Basic for GET only)"
                    } else {
                        "a bearer token is required"
                    },
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"varco\""),
                );
                return r;
            };
            // A change runs to its end, audit line included, on a task of
            // its own: its caller may go away meanwhile (a `ctl
            // --timeout`, a Ctrl-C, a store slow to answer in cluster
            // mode), and a change left in force on this node with no line
            // saying who made it is what the audit log is there to prevent.
            if req.method() == Method::POST {
                let (admin, peer) = (self.clone(), conn.peer);
                let change = tokio::spawn(async move { admin.answer(req, who, peer).await });
                return match change.await {
                    Ok(r) => r,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled: only a runtime shutting down does that.
                    Err(_) => problem(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
                };
            }
            return self.answer(req, who, conn.peer).await;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            if !matches!(path, "/metrics" | "/healthz" | "/status" | "/readyz") {
                return text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into());
            }
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
        match path {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.app.metrics().render(),
            ),
            "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
            "/status" => self.operator_page(&req, conn.peer),
            // Degraded is still ready: a node without its store keeps
            // serving admitted people, and taking every node out of the
            // load balancer at once would lock everyone out.
            "/readyz" if self.ready.load(Ordering::Relaxed) => match self.app.store_trouble() {
                None => text(StatusCode::OK, PLAIN, "ready\n".into()),
                Some(why) => text(StatusCode::OK, PLAIN, format!("degraded: {why}\n")),
            },
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                "not ready: shutting down\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{constant_time_eq, percent_decoded};

    #[test]
    fn tokens_compare_whole() {
        let token = b"a-token-of-thirty-two-characters";
        assert!(constant_time_eq(token, token));
        assert!(!constant_time_eq(
            token,
            b"a-token-of-thirty-two-characterz"
        ));
        assert!(!constant_time_eq(token, b"a-token"), "a prefix");
        assert!(!constant_time_eq(token, b""));
    }

    #[test]
    fn escapes_decode_and_malformed_ones_are_refused() {
        assert_eq!(
            percent_decoded("portal%23partners-1-X").as_deref(),
            Some("portal#partners-1-X")
        );
        assert_eq!(percent_decoded("plain").as_deref(), Some("plain"));
        for bad in ["%", "%2", "%zz", "%+1", "%-1", "%ff"] {
            assert_eq!(percent_decoded(bad), None, "{bad}");
        }
    }
}
