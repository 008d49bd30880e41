//! The public listener's request path: the path made canonical, varco's
//! own paths (`/.varco/*`), route to a room, the waiting-room gate for
//! gated rooms, forward to the upstream, and turn any failure into a small
//! page; the request metrics, and one access line per request (written
//! when the answer's body is done: `access_log`).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderName, HeaderValue, ACCEPT_LANGUAGE, CACHE_CONTROL, EXPIRES, HOST, SET_COOKIE,
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ipnet::IpNet;

use crate::access_log;
use crate::body::Body;
use crate::clock::SharedClock;
use crate::config::Language;
use crate::cookies;
use crate::gate::{self, Gate, GateRequest, RELEASE_HEADER};
use crate::listener::{ConnInfo, Handler};
use crate::metrics::{status_class, Metrics};
use crate::page::{self, Reader, Said};
use crate::proxy::buffer::RequestBuffer;
use crate::proxy::forward::ClientGone;
use crate::proxy::headers::X_FORWARDED_PROTO;
use crate::proxy::in_flight::{InFlight, Refused, Slot};
use crate::proxy::{Forwarder, ProxyError, Side};
use crate::request_id::{self, RequestIds};
use crate::request_path;
use crate::room::arrival;
use crate::room::token::PassClaims;
use crate::room::undelivered::Delivery;
use crate::room::Room;
use crate::router::SharedRouting;

pub struct Gateway {
    routing: SharedRouting,
    buffer: RequestBuffer,
    /// Shared with the forwarding a client gave up on (see
    /// `through_room`).
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    /// `varco_request_duration_seconds` of room `-` (varco's own paths,
    /// the status polls of a click day among them), found once.
    own_seconds: prometheus::Histogram,
    clock: SharedClock,
    trusted_proxies: Vec<IpNet>,
    client_header: crate::proxy::headers::ClientHeader,
    access_log: bool,
    /// `server.request_id`: None when off.
    request_ids: Option<RequestIds>,
    /// Whether a trusted proxy's ID is kept: not behind a balancer that
    /// passes the client's on as it came, which would let the client
    /// choose it.
    request_id_from_proxies: bool,
}

/// What the end of a request needs of its start: the access line's
/// fields, and the request ID once the request is let through to the
/// portal.
struct Record<'g> {
    started: Instant,
    /// What the access line needs, when access lines are written.
    logged: Option<Logged>,
    conn: ConnInfo,
    id: Option<HeaderValue>,
    /// A claimed pass on its way: spent once the answer has gone out.
    delivery: Option<Delivery>,
    /// The room the request was routed to, once it is.
    room: Option<Arc<Room>>,
    /// Where a request routed to no room is counted.
    metrics: &'g Metrics,
    /// Answered (`Gateway::finish`): its line and counts go with the
    /// answer's body.
    answered: bool,
}

/// nginx's status for a request whose client closed the connection
/// before the answer was ready.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Record<'_> {
    /// A request whose handler is dropped before it answers: the client
    /// left (a reload, a tab closed, a stream reset) while it waited at
    /// the gate, for its body, for a slot or for the portal; or varco
    /// closed its connection (a shutdown's grace over). It still gets its
    /// access line and its count, as nginx logs a 499: on a click day
    /// the reloads are many, and without them varco's figures would part
    /// from the portal's, which served them all the same. Not its time:
    /// the histogram is the time to an answer's headers, and none went
    /// out.
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let status = StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
        let room = self.room.take();
        match &room {
            Some(room) => room.metrics.count(CLIENT_CLOSED),
            None => count_no_room(self.metrics, CLIENT_CLOSED),
        }
        let name = room.as_ref().map_or("-", |r| r.name.as_str());
        if let Some(line) = self.line(name, status, None) {
            line.write_unanswered();
        }
    }
}

impl Record<'_> {
    /// The access line, when lines are written: taken once, by the answer
    /// or by the request's end without one.
    fn line(
        &mut self,
        room: &str,
        status: StatusCode,
        upstream: Option<&str>,
    ) -> Option<access_log::Line> {
        let Logged {
            method,
            path,
            user_agent,
            client,
        } = self.logged.take()?;
        Some(access_log::Line {
            started: self.started,
            room: room.to_string(),
            method,
            path,
            user_agent,
            status,
            upstream: upstream.map(str::to_string),
            client,
            request_id: self.id.take(),
        })
    }
}

/// A request of no room (room `-`: varco's own paths, a refused or
/// unrouted request), counted as a room's are.
fn count_no_room(metrics: &Metrics, status: u16) {
    metrics
        .requests
        .with_label_values(&["-", status_class(status)])
        .inc();
}

/// The request's part of its access line.
struct Logged {
    method: http::Method,
    path: String,
    user_agent: Option<HeaderValue>,
    /// The client as every rule sees it: behind a trusted load balancer,
    /// the address it forwards for, not the balancer's own (nginx's
    /// `$remote_addr` with its realip module).
    client: std::net::IpAddr,
}

/// Who asked, for a page made after the request has gone to the portal.
struct Asked<'r> {
    json: bool,
    accept_language: Option<HeaderValue>,
    room: &'r Room,
}

impl Asked<'_> {
    fn reader(&self) -> Reader<'_> {
        self.room.reader(self.accept_language.as_ref(), self.json)
    }
}

/// What the gateway follows of `[server]` and `[log]`.
pub struct Settings {
    pub trusted_proxies: Vec<IpNet>,
    /// `server.client_address_header`.
    pub client_header: crate::proxy::headers::ClientHeader,
    /// `log.access`.
    pub access_log: bool,
    /// `server.request_id`.
    pub request_id: bool,
    /// `server.request_id_from_proxies`.
    pub request_id_from_proxies: bool,
}

impl Gateway {
    pub fn new(
        routing: SharedRouting,
        buffer: RequestBuffer,
        forwarder: Forwarder,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        settings: Settings,
    ) -> Self {
        Gateway {
            routing,
            buffer,
            forwarder: Arc::new(forwarder),
            own_seconds: metrics.request_seconds.with_label_values(&["-"]),
            metrics,
            clock,
            trusted_proxies: settings.trusted_proxies,
            client_header: settings.client_header,
            access_log: settings.access_log,
            request_ids: settings.request_id.then(RequestIds::new),
            request_id_from_proxies: settings.request_id_from_proxies,
        }
    }
}

/// A Host the portal could read as another than varco routes by: two
/// Host fields, one out of syntax (`router::valid_host`), or one naming
/// another than the request's authority: HTTP/2's :authority (RFC 9113
/// 8.3.1), or an HTTP/1.1 absolute-form target's, which RFC 9112 3.2.2
/// says wins over Host (a cache or firewall in front that reads it so
/// would see another site than varco routes and the portal serves);
/// without a Host,
/// an authority out of that syntax, or none at all in HTTP/1.1 (RFC 9112
/// 3.2: a 400, as nginx answers; HTTP/1.0 had no Host).
fn host_is_ambiguous(req: &Request<Incoming>) -> bool {
    let mut hosts = req.headers().get_all(HOST).iter();
    let Some(host) = hosts.next() else {
        // Routed and forwarded by :authority or the absolute target then;
        // `http` lets userinfo through.
        return match req.uri().authority() {
            Some(a) => !crate::router::valid_host(a.as_str().as_bytes()),
            None => req.version() == http::Version::HTTP_11,
        };
    };
    if hosts.next().is_some() || !crate::router::valid_host(host.as_bytes()) {
        return true;
    }
    match req.uri().authority() {
        Some(authority) => host.to_str().map_or(true, |h| {
            crate::router::normalise_host(h) != crate::router::normalise_host(authority.as_str())
        }),
        None => false,
    }
}

/// The request's host: the Host header (HTTP/1.1) or :authority (HTTP/2).
pub fn host_of(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

const MALFORMED: Said = Said {
    en: "This address is malformed.",
    it: "Questo indirizzo non è valido.",
};
const UNKNOWN_CODING: Said = Said {
    en: "This request is sent in a form this site does not take.",
    it: "Questa richiesta è inviata in una forma che il sito non accetta.",
};
const CATCHING_UP: Said = Said {
    en: "The waiting room is catching up. Please try again in a moment.",
    it: "La sala d'attesa si sta aggiornando. Riprova tra un momento.",
};
const VERY_BUSY: Said = Said {
    en: "The service is very busy right now. You have been admitted and you keep your place: try again in a few seconds.",
    it: "Il servizio è molto richiesto in questo momento. Sei già dentro e non perdi il tuo posto: riprova tra qualche secondo.",
};
/// Only asked for by the waiting page's script and API clients.
const NO_SUCH_ROOM: Said = Said {
    en: "No such waiting room.",
    it: "Questa sala d'attesa non esiste.",
};

/// An in-flight slot, or the 503 for a person who is admitted but whose
/// request found the cap and its queue full.
/// `admitted`: whether a refusal counts against the rate (see its
/// caller).
async fn enter(
    room: &Room,
    cap: &InFlight,
    session: Option<u128>,
    admitted: bool,
    asked: &Asked<'_>,
    reference: Option<&HeaderValue>,
) -> Result<(Slot, Duration), Response<Body>> {
    // The room's line only: a session waiting behind its own requests
    // says nothing of the portal's load.
    let (entered, w) = cap.enter_timed(session).await;
    let refused = match entered {
        Ok(slot) => {
            if w > Duration::from_millis(1) {
                room.metrics.in_flight_wait_seconds.observe(w.as_secs_f64());
            }
            return Ok((slot, w));
        }
        Err(r) => r,
    };
    if refused == Refused::SessionWaited {
        // One session over its own share: the portal may have had room
        // (not a sign for adaptive admission), and it is the sender's to
        // slow down.
        room.metrics.rejected_session_in_flight.inc();
        let mut resp = page::error_with_reference(
            StatusCode::TOO_MANY_REQUESTS,
            &crate::gate::IN_SESSION,
            asked.reader(),
            reference,
        );
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            page::retry_after(cap.retry_after()),
        );
        return Err(resp);
    }
    // An admitted person turned away is a failure of the path to the
    // portal, as adaptive admission sees it.
    if let Some(a) = room.adaptive.as_ref().filter(|_| admitted) {
        a.signals.refused(w);
    }
    match refused {
        Refused::SessionWaited => {}
        Refused::QueueFull => room.metrics.rejected_in_flight_full.inc(),
        Refused::Waited => {
            room.metrics.rejected_in_flight_wait.inc();
            room.metrics.in_flight_wait_seconds.observe(w.as_secs_f64());
        }
    }
    let mut resp = page::error_with_reference(
        StatusCode::SERVICE_UNAVAILABLE,
        &VERY_BUSY,
        asked.reader(),
        reference,
    );
    resp.headers_mut().insert(
        http::header::RETRY_AFTER,
        page::retry_after(cap.retry_after()),
    );
    // No Refresh, unlike the gate's 429: the person holds a pass, and a
    // page asking again by itself every few seconds would keep the
    // session of someone who walked away alive, and its place inside
    // taken, for as long as the cap refuses.
    Err(resp)
}

/// Adds one of varco's cookies to a response, whatever the portal said
/// about caching it: a response that sets a pass must never be stored by a
/// cache in front of varco and handed to the next person (invariant 6).
fn set_cookie(resp: &mut Response<Body>, cookie: HeaderValue) {
    let h = resp.headers_mut();
    h.append(SET_COOKIE, cookie);
    // varco's own page (a 502 to someone just let in) keeps its own,
    // which also says no-transform.
    if h.get(CACHE_CONTROL) != Some(&page::OWN_CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, page::NO_STORE);
    }
    // An HTTP/1.0 cache reads Expires, not Cache-Control; CDNs and nginx
    // read their own headers instead of it (RFC 9213, Akamai's
    // Edge-Control, Fastly's and Varnish's Surrogate-Control, nginx's
    // X-Accel-Expires).
    h.remove(EXPIRES);
    for cdn in &CDN_CACHE_HEADERS {
        h.remove(cdn);
    }
}

const CDN_CACHE_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("cdn-cache-control"),
    HeaderName::from_static("cloudflare-cdn-cache-control"),
    HeaderName::from_static("surrogate-control"),
    HeaderName::from_static("edge-control"),
    // nginx, in front of varco, takes it over Cache-Control.
    HeaderName::from_static("x-accel-expires"),
];

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Says the client gone when dropped (with the handler holding it).
struct SaysGone(ClientGone);

/// Whether the portal's answer ends the person's session: an
/// `X-Varco-Release: 1` in any of its fields, or any item of one (a
/// framework may fold two into `1, 1`, or add a `1` after another's
/// `0`). Every field goes: the client never sees one.
fn released(headers: &mut http::HeaderMap) -> bool {
    // Looked up first: `entry` may grow a full map, and nearly every
    // answer has none.
    if !headers.contains_key(RELEASE_HEADER) {
        return false;
    }
    let said = headers.get_all(RELEASE_HEADER).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|item| item.trim_ascii() == b"1")
    });
    headers.remove(RELEASE_HEADER);
    said
}

/// A request forwarded on a task of its own (it holds an `in_flight`
/// slot), as long as its handler waits for it. Dropped before the answer
/// came (the client gone: a tab closed on a slow final submit), it still
/// ends the session the answer releases, or the slot would be held until
/// the session idled out, when the portal said to give it to the next in
/// line at once. Only the portal's release: a logout's `Clear-Site-Data`
/// never reached the browser, which keeps its cookies.
struct Forwarding {
    task: Option<
        tokio::task::JoinHandle<(Result<crate::proxy::forward::Forwarded, ProxyError>, Slot)>,
    >,
    room: Arc<Room>,
    pass: Option<PassClaims>,
    unchecked_pass: Vec<String>,
    clock: SharedClock,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (room, pass, clock) = (self.room.clone(), self.pass.take(), self.clock.clone());
        let unchecked = std::mem::take(&mut self.unchecked_pass);
        runtime.spawn(async move {
            let Ok((Ok(mut forwarded), _slot)) = task.await else {
                return;
            };
            if released(forwarded.response.headers_mut()) {
                let now = clock.now_ms();
                let pass = pass
                    .or_else(|| gate::pass_of(&room, unchecked.iter().map(String::as_str), now));
                if let Some(p) = pass {
                    end_session(room, p, now).await;
                }
            }
        });
    }
}

impl Drop for SaysGone {
    fn drop(&mut self) {
        self.0 .0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Handler for Gateway {
    async fn handle(&self, mut req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let json = page::wants_json(req.headers());
        // Everything after this matches on the path the portal will see.
        let canonical = request_path::canonicalise(&mut req);
        // Only what the access line needs survives the request; the path
        // without its query, since queries can carry personal data.
        // The User-Agent, as nginx's combined log has it: what tells a
        // script taking tickets from a person on a click day.
        let logged = self.access_log.then(|| Logged {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
            client: conn.client(req.headers(), &self.trusted_proxies, self.client_header),
        });
        let mut record = Record {
            started,
            logged,
            conn,
            id: None,
            delivery: None,
            room: None,
            metrics: &self.metrics,
            answered: false,
        };
        let refused = match canonical {
            Err(e) => Some((StatusCode::BAD_REQUEST, &MALFORMED, e.to_string())),
            Ok(()) if host_is_ambiguous(&req) => {
                Some((StatusCode::BAD_REQUEST, &MALFORMED, "ambiguous Host".into()))
            }
            Ok(()) if crate::proxy::headers::has_unknown_coding(req.headers()) => Some((
                StatusCode::NOT_IMPLEMENTED,
                &UNKNOWN_CODING,
                "a transfer coding besides chunked".into(),
            )),
            Ok(()) => None,
        };
        if let Some((code, said, e)) = refused {
            tracing::debug!(error = %e, "request refused");
            let reader = Reader::of(req.headers(), json, Language::En);
            let resp = page::error(code, said, reader);
            self.count_own(code.as_u16(), started);
            return self.finish(record, resp, "-", None);
        }

        if req.uri().path().starts_with("/.varco/") {
            let resp = self.own_path(&req, conn, json).await;
            self.count_own(resp.status().as_u16(), started);
            return self.finish(record, resp, "-", None);
        }

        let room = self
            .routing
            .load()
            .router
            .route(host_of(&req), req.uri().path())
            .cloned();
        let Some(room) = room else {
            let reader = Reader::of(req.headers(), json, Language::En);
            let resp = page::error(StatusCode::NOT_FOUND, &page::NOTHING_HERE, reader);
            self.count_own(404, started);
            return self.finish(record, resp, "-", None);
        };

        record.room = Some(room.clone());
        let (resp, upstream) = self.through_room(&room, req, &mut record, json).await;
        room.metrics
            .observe(resp.status().as_u16(), started.elapsed().as_secs_f64());
        let label = upstream.map(|i| room.upstreams.get(i).label.as_str());
        self.finish(record, resp, &room.name, label)
    }
}

impl Gateway {
    /// A request of no room (room `-`: varco's own paths, a refused or
    /// unrouted request), counted and timed as a room's are.
    fn count_own(&self, status: u16, started: Instant) {
        count_no_room(&self.metrics, status);
        self.own_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// The request's ID (a trusted proxy's kept), when IDs are on.
    fn request_id(&self, headers: &http::HeaderMap, conn: ConnInfo) -> Option<HeaderValue> {
        let ids = self.request_ids.as_ref()?;
        let kept = self.request_id_from_proxies && conn.forwards(&self.trusted_proxies);
        Some(ids.choose(headers, kept))
    }

    /// The gate (for a gated room), then the upstream.
    async fn through_room(
        &self,
        room: &Arc<Room>,
        req: Request<Incoming>,
        record: &mut Record<'_>,
        json: bool,
    ) -> (Response<Body>, Option<usize>) {
        let conn = record.conn;
        let secure = self.is_https(&req, conn);
        let mut req = req;
        // Only varco says where someone stands in line.
        req.headers_mut().remove(&arrival::HEADER);
        let gated = room.is_gated();
        let (set_cookies, mut pass, whole_body) = if gated {
            let now = self.clock.now_ms();
            // Found once per request: the access line's, when it is kept.
            let ip = match &record.logged {
                Some(logged) => logged.client,
                None => conn.client(req.headers(), &self.trusted_proxies, self.client_header),
            };
            let named = conn.names_client();
            match gate::admit(room, &GateRequest::of(&req, ip, named, secure, json, now)).await {
                Ok(Gate::Proxy {
                    set_cookies,
                    pass,
                    delivery,
                    whole_body,
                }) => {
                    let head = req.method() == http::Method::HEAD;
                    record.delivery = delivery.map(|d| d.answering_head(head));
                    (set_cookies, pass, whole_body)
                }
                Ok(Gate::Respond(resp)) => return (resp, None),
                Err(gate::Failure {
                    error: e,
                    set_cookie,
                }) => {
                    // A failure, unlike the waiting page: a reference for
                    // the help desk and the log line, as the portal's own
                    // failures have.
                    record.id = self.request_id(req.headers(), conn);
                    room.metrics.store_errors.inc();
                    tracing::warn!(
                        room = %room.name,
                        error = %e,
                        request_id = request_id::text(record.id.as_ref()),
                        "store failure at the gate"
                    );
                    let reader = room.reader(req.headers().get(ACCEPT_LANGUAGE), json);
                    let mut resp = page::error_with_reference(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &CATCHING_UP,
                        reader,
                        record.id.as_ref(),
                    );
                    resp.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("10"));
                    // A person called as Redis blinked would otherwise sit
                    // on this page, phone down, while the claim window ran.
                    page::refresh_for_a_person(&mut resp, req.method(), json);
                    if let Some(cookie) = set_cookie {
                        resp.headers_mut().append(http::header::SET_COOKIE, cookie);
                    }
                    return (resp, None);
                }
            }
        } else {
            (Vec::new(), None, false)
        };
        // A pass the gate did not look at (an exempt path, a bypass, a
        // login detour, a room not gated now): the portal may still end
        // its session. Checked only if it does.
        let mut unchecked_pass = match pass {
            None => crate::cookies::each(req.headers(), &room.pass_cookie)
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            Some(_) => Vec::new(),
        };
        // The cookies sent, where there are other rooms: their passes
        // (all `Path=/` on this host) go too when a logout page clears
        // the site's cookies. A header value's clone is a count, not a
        // copy.
        let sent_cookies: Vec<HeaderValue> = if self.routing.load().rooms.len() > 1 {
            req.headers()
                .get_all(http::header::COOKIE)
                .iter()
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        // Only requests for the portal: one the gate answers (the waiting
        // page, the crowd of a click day) needs no ID to follow there, and
        // would pay for one.
        if let Some(id) = self.request_id(req.headers(), conn) {
            req.extensions_mut().insert(request_id::Stamp(id.clone()));
            record.id = Some(id);
        }

        // Kept now: the request goes to the portal, and a page for a
        // failure on the way is written after. Read only then: most
        // requests never need it.
        let asked = Asked {
            json,
            accept_language: req.headers().get(ACCEPT_LANGUAGE).cloned(),
            room,
        };

        // Before a slot of the portal's is taken: an upload at the pace
        // of a slow line holds varco's memory, not the portal's capacity.
        let (parts, incoming) = req.into_parts();
        let mut req = match self.buffer.read(incoming, whole_body).await {
            Ok(body) => Request::from_parts(parts, body),
            Err(e) => {
                tracing::debug!(room = %room.name, error = %e, "client failure");
                let mut resp = page::error_with_reference(
                    e.status(),
                    e.public_message(),
                    asked.reader(),
                    record.id.as_ref(),
                );
                if let Some(secs) = e.retry_after() {
                    resp.headers_mut()
                        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                }
                for c in set_cookies {
                    set_cookie(&mut resp, c);
                }
                return (resp, None);
            }
        };
        // What adaptive admission learns from: the admitted people's
        // requests. In a gated room, not those let through without a pass
        // (an exempt path, a bypass): the rate does not bring them, and
        // anyone can send them, so a flood of them would cut it for
        // everyone in line. In a room not gated, everyone's.
        let admitted = pass.is_some() || !gated;
        let (slot, queued) = match &room.in_flight {
            Some(cap) => match enter(
                room,
                cap,
                pass.as_ref().and_then(|p| p.session_id()),
                admitted,
                &asked,
                record.id.as_ref(),
            )
            .await
            {
                Ok((slot, queued)) => (Some(slot), queued),
                Err(mut resp) => {
                    // Whatever the gate granted (a new pass) still holds.
                    for c in set_cookies {
                        set_cookie(&mut resp, c);
                    }
                    return (resp, None);
                }
            },
            None => (None, Duration::ZERO),
        };
        let judged = admitted.then_some(queued);
        if let (Some(key), Some(p)) = (&room.arrival_key, &pass) {
            let line = room.lane(&p.l).map(|l| room.line_name(l));
            let a = arrival::Arrival {
                room: line.unwrap_or_else(|| room.name.clone()),
                n: p.n,
                at_ms: if p.arr > 0 { p.arr } else { p.at },
            };
            req.extensions_mut()
                .insert(arrival::Stamp(arrival::header(key, &a)));
        }
        let (forwarded, slot) = match slot {
            // The portal goes on with a request whose client gave up (a
            // reload, a tab closed: the handler is dropped), as PHP, WSGI
            // or a servlet does: its slot is held until the portal's
            // answer comes (within `response_timeout`), on a task of its
            // own, or a crowd pressing reload would pile new requests onto
            // a portal still busy with the old ones, past the cap.
            Some(slot) => {
                let gone = ClientGone(Arc::new(AtomicBool::new(false)));
                req.extensions_mut().insert(gone.clone());
                // Dropped with this handler: a client gone before the
                // request went out (or between two tries) is sent nothing.
                let _says_gone = SaysGone(gone);
                let (forwarder, on) = (self.forwarder.clone(), room.clone());
                // Lent to the wait, and taken back once answered: no copy
                // of them per request.
                let mut forwarding = Forwarding {
                    task: None,
                    room: room.clone(),
                    pass: pass.take(),
                    unchecked_pass: std::mem::take(&mut unchecked_pass),
                    clock: self.clock.clone(),
                };
                let task = forwarding.task.insert(tokio::spawn(async move {
                    let forwarded = forwarder.forward(&on, req, conn, judged).await;
                    (forwarded, slot)
                }));
                let done = task.await;
                // Answered while the handler waits: handled below.
                forwarding.task = None;
                pass = forwarding.pass.take();
                unchecked_pass = std::mem::take(&mut forwarding.unchecked_pass);
                match done {
                    Ok((forwarded, slot)) => (forwarded, Some(slot)),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    // Cancelled: only a runtime shutting down does that.
                    Err(e) => (
                        Err(ProxyError::Upstream {
                            upstream: room.name.clone(),
                            source: e.into(),
                        }),
                        None,
                    ),
                }
            }
            // Boxed: the forwarding state machine is the largest part of a
            // request's future, and every request (the waiting page too)
            // would otherwise carry, and copy, its size.
            None => (
                Box::pin(self.forwarder.forward(room, req, conn, judged)).await,
                None,
            ),
        };
        let (mut resp, upstream, portal_failed) = match forwarded {
            Ok(f) => {
                let failed = f.response.status().is_server_error();
                (f.response, Some(f.upstream), failed)
            }
            Err(e) => {
                let upstream_side = e.side() == Side::Upstream;
                if upstream_side {
                    tracing::warn!(
                        room = %room.name,
                        error = %e,
                        request_id = request_id::text(record.id.as_ref()),
                        "upstream failure"
                    );
                } else {
                    tracing::debug!(room = %room.name, error = %e, "client failure");
                }
                (
                    page::error_with_reference(
                        e.status(),
                        e.public_message(),
                        asked.reader(),
                        record.id.as_ref(),
                    ),
                    None,
                    upstream_side,
                )
            }
        };
        for c in set_cookies {
            set_cookie(&mut resp, c);
        }
        if portal_failed {
            if let Some(p) = &pass {
                self.keep_turn(room, p, &mut resp, secure);
            }
        }
        // The portal ends the session (e.g. after the application was
        // submitted): the slot goes to the next in line at once. So does
        // a logout page that has the browser delete the site's cookies
        // (over HTTPS, where browsers obey it): the pass is gone with
        // them, and its session would hold the slot until it idles out.
        let by_portal = released(resp.headers_mut());
        let cleared = secure && cookies::clears_site_cookies(resp.headers());
        if by_portal || cleared {
            let now = self.clock.now_ms();
            let pass = pass
                .or_else(|| gate::pass_of(room, unchecked_pass.iter().map(String::as_str), now));
            if let Some(p) = pass {
                end_session(room.clone(), p, now).await;
            }
            for clear in cookies::clear(&room.pass_cookie, room.cookie_attrs(secure)) {
                set_cookie(&mut resp, clear);
            }
        }
        // The browser deletes the other rooms' passes it sent as well
        // (Clear-Site-Data's cookies are the whole site's): their
        // sessions go with them. Not for `X-Varco-Release`, which is the
        // portal's word about its own room.
        if cleared && !sent_cookies.is_empty() {
            let mut sent = http::HeaderMap::new();
            for v in sent_cookies {
                sent.append(http::header::COOKIE, v);
            }
            let now = self.clock.now_ms();
            let routing = self.routing.load();
            // At once: with the store slow, one after the other would
            // hold the logout's answer a store wait per room.
            let ends = routing
                .rooms
                .iter()
                .filter(|r| r.name != room.name)
                .filter_map(|other| {
                    let pass = gate::pass_of(other, cookies::each(&sent, &other.pass_cookie), now)?;
                    Some(end_session(other.clone(), pass, now))
                });
            futures_util::future::join_all(ends).await;
        }
        let resp = match slot {
            // The slot is held until the response body has been sent.
            Some(slot) => resp.map(|body| {
                body.map_frame(move |frame| {
                    let _held = &slot;
                    frame
                })
                .boxed_unsync()
            }),
            None => resp,
        };
        (resp, upstream)
    }

    /// The portal failed an admitted person: their session lives
    /// `failure_grace` longer, and their pass (re-sent, marked with the
    /// failure's time) can bring them back ahead of the queue if it lapses
    /// anyway. The last Set-Cookie for a name wins, so this one replaces
    /// any pass the gate set on the same response.
    fn keep_turn(&self, room: &Room, pass: &PassClaims, resp: &mut Response<Body>, secure: bool) {
        let (Some(sid), Some(lane)) = (pass.session_id(), room.lane(&pass.l)) else {
            return;
        };
        let now = self.clock.now_ms();
        let c = &room.config;
        let extended = (c.session_idle + c.failure_grace).as_millis() as u64;
        lane.store.touch(sid, now, extended);
        let marked = PassClaims {
            f: now,
            ..gate::renewed(room, pass, now)
        };
        set_cookie(resp, gate::pass_cookie(room, &marked, secure));
        room.metrics.pass_extensions.inc();
    }

    /// Whether the person's browser spoke HTTPS: varco's own TLS, or a
    /// trusted load balancer in front that says so. Cookies are then
    /// marked Secure. Of a list (`https, http`: a chain of proxies, each
    /// adding the scheme it was reached by), the first is the browser's.
    /// One a client forged there only makes its own cookies stricter.
    fn is_https(&self, req: &Request<Incoming>, conn: ConnInfo) -> bool {
        if conn.tls {
            return true;
        }
        if !conn.forwards(&self.trusted_proxies) {
            return false;
        }
        // A balancer that writes `Forwarded` and passes the client's own
        // X-Forwarded-Proto on: only its word counts.
        let proto = match self.client_header {
            crate::proxy::headers::ClientHeader::XForwardedFor => {
                req.headers().get(&X_FORWARDED_PROTO)
            }
            crate::proxy::headers::ClientHeader::Forwarded => None,
        };
        match proto {
            Some(v) => crate::proxy::headers::first_element(v).eq_ignore_ascii_case(b"https"),
            // RFC 7239's `Forwarded: for=...;proto=https`, from a balancer
            // that sends only that.
            None => crate::proxy::headers::forwarded_says_https(req.headers()),
        }
    }

    async fn own_path(
        &self,
        req: &Request<Incoming>,
        conn: ConnInfo,
        json: bool,
    ) -> Response<Body> {
        match req.uri().path() {
            "/.varco/status" => {
                let room = query_param(req.uri().query(), "room")
                    .and_then(|name| self.routing.load().room(name).cloned());
                match room {
                    Some(room) => {
                        let ip =
                            conn.client(req.headers(), &self.trusted_proxies, self.client_header);
                        let named = conn.names_client();
                        gate::status(&room, req.headers(), ip, named, self.clock.now_ms()).await
                    }
                    None => page::error(StatusCode::NOT_FOUND, &NO_SUCH_ROOM, Reader::Program),
                }
            }
            // In the language (and on the template) of the room whose
            // site it is, as the room's other pages.
            _ => {
                let routing = self.routing.load();
                let accept = req.headers().get(ACCEPT_LANGUAGE);
                let reader = match routing.router.site(host_of(req), req.uri().path()) {
                    Some(room) => room.reader(accept, json),
                    None => Reader::of_value(accept, json, Language::En),
                };
                page::error(StatusCode::NOT_FOUND, &page::NOTHING_HERE, reader)
            }
        }
    }

    /// Every answer's last step: its request ID, and the access line.
    fn finish(
        &self,
        mut record: Record<'_>,
        mut resp: Response<Body>,
        room: &str,
        upstream: Option<&str>,
    ) -> Response<Body> {
        record.answered = true;
        if let Some(id) = &record.id {
            // A portal that answers with an ID (this one, or its own) is
            // left to say it.
            resp.headers_mut()
                .entry(request_id::HEADER)
                .or_insert_with(|| id.clone());
        }
        if let Some(delivery) = record.delivery.take() {
            let status = resp.status();
            resp = resp.map(|body| delivery.on_end_of(body, status));
        }
        match record.line(room, resp.status(), upstream) {
            Some(line) => resp.map(|body| line.on_end_of(body)),
            None => resp,
        }
    }
}

/// Ends `pass`'s session in `room`, and ticks its lane so the slot goes
/// to the next in line at once. On a task of its own: the person may be
/// gone before the store answers (the tab closed on the receipt), and an
/// end dropped midway would hold the slot for nobody until it idles out.
async fn end_session(room: Arc<Room>, pass: PassClaims, now: u64) {
    let Some(sid) = pass.session_id() else {
        return;
    };
    let name = pass.l.clone();
    let release = tokio::spawn(async move {
        let Some(lane) = room.lane(&name) else {
            return;
        };
        let ended = lane
            .store
            .end_session(sid, now, room.ended_memory_ms())
            .await;
        // The tick by the limits in force now: a request routed before a
        // reload (a slow submit) would call by the old `max_active` and
        // mode, past the brake an operator just put on. And none in a
        // room not gated now (limits lifted live): unlimited, a tick
        // calls the whole line, whose turns a room gated again would
        // then honour, all at once, past its `max_active`.
        let current = room.now_in_force();
        let ticked = match current.lane(&name) {
            Some(lane) if current.is_gated() => lane
                .store
                .tick(current.lane_limits(lane), now)
                .await
                .map(drop),
            _ => Ok(()),
        };
        // Its slot is freed when the store answers again (a Redis node
        // sends the end then); the next tick calls the next in line.
        if ended.is_err() || ticked.is_err() {
            room.metrics.store_errors.inc();
        }
    });
    if let Err(e) = release.await {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
    }
}
