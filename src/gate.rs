//! The waiting room's part of the request path, for a gated room:
//!
//! bypass? -> exempt path? -> live pass? -> a lapsed pass coming back
//! (after a portal failure, or from a login detour)? -> a ticket on a login
//! detour? -> eligible ticket? -> room free and nobody waiting? ->
//! otherwise a ticket and the waiting page.
//!
//! The store makes each admission atomically; this module turns cookies
//! into claims and decisions into responses.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{HeaderValue, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::cookies;
use crate::page::waiting::{self, Status};
use crate::page::{Reader, Said};
use crate::proxy::headers::limit_key;
use crate::room::admission::{Claim, Issued, Mode};
use crate::room::lanes::Lane;
use crate::room::receipt;
use crate::room::token::{audience, random_u128, PassClaims, TicketClaims};
use crate::room::undelivered::Delivery;
use crate::room::Room;
use crate::store::{Adoption, Checked, HandOver, Liveness, NewSession, RoomView, StoreError};

/// The upstream ends a session with this response header.
pub const RELEASE_HEADER: &str = "x-varco-release";

/// What the gate decided for one request.
pub enum Gate {
    /// Send it upstream; add these cookies to the response; `pass` is the
    /// pass in force (its session, for a release by the portal; its place
    /// in the order of arrival, for `X-Varco-Arrival`).
    Proxy {
        set_cookies: Vec<HeaderValue>,
        pass: Option<PassClaims>,
        /// For an answer carrying a claimed pass: marks it delivered.
        delivery: Option<Delivery>,
        /// Let through without a pass or the bypass (an exempt path, a
        /// login detour): its body must come whole, within
        /// `upstream.request_buffer` and `request_buffer_time`, or it is
        /// refused rather than streamed, so that nobody the gate has not
        /// admitted holds a portal connection and an `in_flight` slot
        /// for as long as an upload takes.
        whole_body: bool,
    },
    /// Answer it here (waiting page, JSON, 429, closed).
    Respond(Response<Body>),
}

impl Gate {
    /// Proxied without a pass (the bypass, an exempt path, a login
    /// detour): no cookie to set, no pass in force.
    fn without_pass(whole_body: bool) -> Gate {
        Gate::Proxy {
            set_cookies: vec![],
            pass: None,
            delivery: None,
            whole_body,
        }
    }
}

pub struct GateRequest<'a> {
    pub headers: &'a HeaderMap,
    pub method: &'a Method,
    pub path_and_query: &'a str,
    /// The authority asked for (Host, or HTTP/2's :authority).
    pub host: Option<&'a str>,
    pub client_ip: IpAddr,
    /// Whether `client_ip` is the person's: not the balancer standing in
    /// for someone a PROXY header left unnamed (see [`ranges_ip`]).
    pub client_named: bool,
    pub tls: bool,
    pub json: bool,
    pub now_ms: u64,
}

/// The address that ranges (`bypass`, lanes) are matched against:
/// none for a client a PROXY header left unnamed. Its address is the
/// balancer's, most often in the very internal range a bypass names,
/// while its bytes are anyone's (a balancer sends UNKNOWN for traffic
/// it cannot name).
pub fn ranges_ip(client_ip: IpAddr, named: bool) -> Option<IpAddr> {
    named.then_some(client_ip)
}

impl<'a> GateRequest<'a> {
    /// The address ranges are matched against (see [`ranges_ip`]).
    fn ranges_ip(&self) -> Option<IpAddr> {
        ranges_ip(self.client_ip, self.client_named)
    }

    pub fn of(
        req: &'a Request<Incoming>,
        client_ip: IpAddr,
        client_named: bool,
        tls: bool,
        json: bool,
        now_ms: u64,
    ) -> Self {
        GateRequest {
            headers: req.headers(),
            method: req.method(),
            path_and_query: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
            host: crate::gateway::host_of(req),
            client_ip,
            client_named,
            tls,
            json,
            now_ms,
        }
    }

    /// Who reads what the gate answers: the room's language by default.
    fn reader<'r>(&self, room: &'r Room) -> Reader<'r> {
        room.reader(self.headers.get(http::header::ACCEPT_LANGUAGE), self.json)
    }
}

fn is_bypass(room: &Room, r: &GateRequest) -> bool {
    let b = &room.config.bypass;
    if let Some(ip) = r.ranges_ip() {
        if b.cidrs.iter().any(|n| n.contains(&ip)) {
            return true;
        }
    }
    match &b.header {
        Some((name, secret)) => carries_secret(r.headers, name, secret),
        None => false,
    }
}

/// Whether `headers` carry `secret` in `name`, in any of its fields
/// (compared in constant time): a balancer that adds the secret for an
/// operators' network appends it after whatever the client sent.
pub(crate) fn carries_secret(headers: &HeaderMap, name: &http::HeaderName, secret: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| constant_time_eq(v.as_bytes(), secret.as_bytes()))
}

/// Takes the fields of `name` that hold `secret` out of `headers`,
/// keeping the others in their order: those are the portal's (an
/// `Authorization` meant for it), the secret is varco's alone.
pub(crate) fn remove_secret(headers: &mut HeaderMap, name: &http::HeaderName, secret: &str) {
    if !carries_secret(headers, name, secret) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(name)
        .iter()
        .filter(|v| !constant_time_eq(v.as_bytes(), secret.as_bytes()))
        .cloned()
        .collect();
    headers.remove(name);
    for v in kept {
        headers.append(name.clone(), v);
    }
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a guessed secret was right.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first of the request's pass cookies that is genuine and in date
/// for this room; the store not asked whether its session lives.
fn signed_pass(room: &Room, headers: &HeaderMap, now_ms: u64) -> Option<PassClaims> {
    pass_of(room, cookies::each(headers, &room.pass_cookie), now_ms)
}

/// The first of these pass tokens that verifies for the room.
pub fn pass_of<'t>(
    room: &Room,
    tokens: impl IntoIterator<Item = &'t str>,
    now_ms: u64,
) -> Option<PassClaims> {
    let aud = audience("pass", &room.name);
    tokens
        .into_iter()
        .find_map(|token| room.keys.verify::<PassClaims>(token, &aud, now_ms))
}

/// What the pass a request carries is worth.
enum Held {
    /// A live session, renewed in the store.
    Pass(PassClaims),
    /// A session lost in a crash whose number the store, set back, has not
    /// called again: that number is the person's place in line.
    Place(PassClaims),
    None,
}

/// The live pass a request carries, if any, renewed in the store.
async fn live_pass(room: &Room, r: &GateRequest<'_>) -> Result<Held, StoreError> {
    let Some(pass) = signed_pass(room, r.headers, r.now_ms) else {
        return Ok(Held::None);
    };
    let Some(sid) = pass.session_id() else {
        return Ok(Held::None);
    };
    let Some(lane) = room.lane(&pass.l) else {
        return Ok(Held::None);
    };
    let idle = room.config.session_idle.as_millis() as u64;
    // Renewed within an idle time, so its session cannot have lapsed; and
    // not of a claim never confirmed (which may have made no session).
    // Not one renewed ahead of now: the clock stepped back since, and its
    // session, idle from the step, may have lapsed and its slot be taken.
    let renewed_ms = pass.nbf * 1000;
    let recent = pass.uc == 0
        && renewed_ms + idle > r.now_ms
        && renewed_ms <= r.now_ms + crate::room::admission::STEPPED_BACK_MS;
    let alive = match lane.store.touch(sid, r.now_ms, idle) {
        Liveness::Alive => true,
        Liveness::Dead => {
            let limits = room.lane_limits(lane);
            match lane
                .store
                .adopt(sid, pass.n, pass.at, r.now_ms, idle, &limits)
            {
                Adoption::Taken => {
                    room.metrics.reentries_after_crash.inc();
                    true
                }
                Adoption::Alive => true,
                Adoption::Waits => return Ok(Held::Place(pass)),
                Adoption::Refused => false,
            }
        }
        // With the store away, a pass this node has not seen (the person's
        // phone changed network, the balancer sent them here) is taken at
        // its word when it was renewed within an idle time, so its session
        // cannot have idled out: some node admitted it, and shutting
        // admitted people out of a portal they are using is worse than a
        // session counted late (DESIGN.md's invariant 7). A release clears
        // the cookie; an older pass gets the 503 "try again". Kept as
        // seen: the next requests do not wait on the store again, and the
        // store hears of the session when it returns, even if the node
        // that admitted it is gone by then.
        // A pass of a claim never confirmed is not: the session may not
        // exist, and its ticket was kept to claim again.
        Liveness::Unknown => match lane.store.check_session(sid, r.now_ms, idle).await {
            Ok(Checked::Alive) => true,
            Ok(Checked::Ended) => false,
            // Unheard of, though renewed within an idle time, so it cannot
            // have lapsed: the store lost it (its data or last writes, with
            // the node that reported it gone too), or the node that
            // admitted it on its own share in an outage stopped before
            // handing it over. Taken at its word, as with the store away,
            // and reported at the next tick: shutting a person out of the
            // form they are filling in is worse than a session counted
            // late (invariant 7).
            Ok(Checked::Unheard) if recent => {
                let taken = lane.store.take_at_its_word(sid, r.now_ms + idle);
                if taken {
                    tracing::info!(room = %room.name, "a recent pass the store has no session for: taken at its word, and reported");
                }
                taken
            }
            Ok(Checked::Unheard) => false,
            // (Or one this node still holds, which it only asked Redis
            // about as it was about to lapse.)
            Err(_)
                if recent
                    || (pass.uc == 0
                        && lane.store.peek_local(sid, r.now_ms) == Liveness::Alive) =>
            {
                room.metrics.store_errors.inc();
                let taken = lane.store.take_at_its_word(sid, r.now_ms + idle);
                tracing::debug!(room = %room.name, taken, "store away: a recent pass taken at its word");
                taken
            }
            Err(_) if queued_since(room, r.headers, r.now_ms, &pass) => {
                room.metrics.store_errors.inc();
                false
            }
            Err(e) => return Err(e),
        },
    };
    Ok(if alive { Held::Pass(pass) } else { Held::None })
}

/// Whether the request holds a ticket taken since `pass` was last
/// renewed: a live pass is never queued, so the gate then found its
/// session gone (it idled out; the cookie outlives it). With the store
/// away that pass is not taken at its word, nor answered "try again" for
/// the whole outage: the ticket decides, as for anyone in line.
fn queued_since(room: &Room, headers: &HeaderMap, now_ms: u64, pass: &PassClaims) -> bool {
    // Not a pass of a claim never confirmed: its own ticket is kept
    // beside it, to claim again.
    pass.uc == 0 && held_ticket(room, headers, now_ms).is_some_and(|(t, _)| t.nbf > pass.nbf)
}

/// The place in line of a session lost in a crash, handed back as the
/// ticket of its number (`Held::Place`): its holder waits ahead of
/// everyone who came after, and claims it when it is called again, rather
/// than take a new ticket at the back. The pass, now of no session, goes.
fn place_back(room: &Room, r: &GateRequest, pass: &PassClaims) -> Option<Gate> {
    let lane = room.lane(&pass.l)?;
    let next_url = destination(room, r, None);
    let ttl = room.config.ticket_ttl.as_millis() as u64;
    let mut t = TicketClaims::new(&room.name, pass.n, 0, r.now_ms, ttl, &next_url);
    t.at = pass.arr;
    t.l = pass.l.clone();
    t.g = lane.store.generation();
    // Closed, the place is kept all the same, on the closed page.
    let state = if room.lane_limits(lane).mode == Mode::Closed {
        room.metrics.rejected_closed.inc();
        "closed"
    } else {
        "waiting"
    };
    let status = status_for(room, lane, Some(&t), &lane.store.view(), r.now_ms, state);
    let mut resp = page(
        room,
        r,
        &status,
        &next_url,
        Some(ticket_cookie(room, &t, r)),
    );
    for c in cookies::clear(&room.pass_cookie, room.cookie_attrs(r.tls)) {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    tracing::info!(room = %room.name, number = pass.n, "a session lost in the crash gets its place in line back");
    Some(Gate::Respond(resp))
}

/// Whether a GET is a page the person asked for, not something the
/// browser fetched for one (the site's icon, an image, a script): by
/// `Sec-Fetch-Dest` where the browser sends it, else by an Accept that
/// takes HTML (or none at all: a script or an old browser).
fn is_navigation(headers: &HeaderMap) -> bool {
    if let Some(page) = crate::page::loads_a_page(headers) {
        return page;
    }
    headers
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_none_or(|a| a.contains("text/html") || a.trim() == "*/*")
}

/// Whether the browser says the request comes from another site's page
/// (`Sec-Fetch-Site: cross-site`) and is no top-level navigation: the
/// answer's SameSite=Lax cookies are not stored then. A link from
/// another site, followed, is a navigation, and keeps them; one a search
/// page prefetches or prerenders (`Sec-Purpose`, `Purpose`) is not
/// followed yet, and may never be: the browser asks again when it is.
fn keeps_no_lax_cookie(headers: &HeaderMap) -> bool {
    let is = |name: &str, value: &[u8]| headers.get(name).is_some_and(|v| v.as_bytes() == value);
    // Asked first: every new arrival passes here, and nearly none is
    // cross-site; the rest is read only for those that are.
    if !from_another_site(headers) {
        return false;
    }
    let speculative = ["sec-purpose", "purpose"].iter().any(|name| {
        headers.get(*name).is_some_and(|v| {
            let v = v.as_bytes();
            v.windows(8).any(|w| w.eq_ignore_ascii_case(b"prefetch"))
                || v.windows(9).any(|w| w.eq_ignore_ascii_case(b"prerender"))
        })
    });
    speculative
        || !(is("sec-fetch-mode", b"navigate")
            && headers
                .get("sec-fetch-dest")
                .is_none_or(|d| d.as_bytes() == b"document"))
}

/// A form sent from another site's page (`Sec-Fetch-Site: cross-site`,
/// a method other than GET or HEAD): the browser sent no Lax cookie with
/// it (see [`keeps_no_lax_cookie`] for what it then keeps).
fn posted_from_another_site(method: &Method, headers: &HeaderMap) -> bool {
    !matches!(*method, Method::GET | Method::HEAD) && from_another_site(headers)
}

/// `Sec-Fetch-Site: cross-site`: the browser says another site's page
/// sent the request.
fn from_another_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
}

/// The longest path a ticket remembers: with the rest of the ticket it
/// stays within a cookie's 4 KiB.
const LONGEST_REMEMBERED: usize = 1024;

/// A path the person may be sent back to: local, never `//host`.
fn safe_path(p: &str) -> Option<&str> {
    (p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && p.len() <= LONGEST_REMEMBERED)
        .then_some(p)
}

/// Where admission lands the person: the page asked for (a GET of a
/// page), else the page their ticket remembers (a POST is never
/// replayed; an image or a script's request is not where to send them),
/// else [`landing`].
fn destination(room: &Room, r: &GateRequest, ticket: Option<&TicketClaims>) -> String {
    let path = if matches!(*r.method, Method::GET | Method::HEAD) && is_navigation(r.headers) {
        safe_path(r.path_and_query)
    } else {
        ticket.and_then(|t| safe_path(&t.u))
    };
    // Encoded, a path of quotes grows threefold: past the longest a
    // ticket keeps, it is not remembered.
    match path.map(quotes_encoded) {
        Some(p) if p.len() <= LONGEST_REMEMBERED => p,
        _ => quotes_encoded(&landing(room, r)),
    }
}

/// `path` with what HTML or a script reads as its own (quotes, angle
/// brackets, backtick, braces) percent-encoded, as browsers send them in
/// a query: an operator's page may put `{{next_url}}` in an event
/// handler's attribute, where the entity `&#39;` is decoded back to a
/// quote before the script runs, and a path holding `');alert(1);('`
/// would run. The portal reads `%27` as `'`.
fn quotes_encoded(path: &str) -> String {
    const ENCODED: &[u8] = b"'\"<>`{}";
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match u8::try_from(c) {
            Ok(b) if ENCODED.contains(&b) => out.push_str(&format!("%{b:02X}")),
            _ => out.push(c),
        }
    }
    out
}

/// Where admission lands someone with no page to remember: a form posted
/// after the session lapsed (a POST is never replayed), or a path too long
/// to keep. The page they were on, when the Referer names one of this
/// room's on this host; else the room's first path. Not `/` blindly: that
/// may be another room, where this room's ticket claims nothing and lapses.
fn landing(room: &Room, r: &GateRequest) -> String {
    let in_room = |path: &str| {
        use crate::router::{as_matched, folded, prefix_matches};
        let ignore_case = room.config.paths_ignore_case;
        let path = folded(path.into(), ignore_case);
        room.config
            .paths
            .iter()
            .any(|p| prefix_matches(&folded(as_matched(p), ignore_case), &path))
    };
    let from_referer = r
        .headers
        .get(http::header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<http::Uri>().ok())
        .and_then(|u| {
            // The same host as rooms match it: any case, any port (a
            // balancer may write Host with :443, a browser never).
            let here = u.authority().zip(r.host).is_some_and(|(a, h)| {
                crate::router::normalise_host(a.host()) == crate::router::normalise_host(h)
            });
            if !here {
                return None;
            }
            let canonical = crate::request_path::normalise(u.path()) == Ok(None);
            let pq = u.path_and_query()?.as_str();
            (canonical && in_room(&crate::router::as_matched(u.path())))
                .then(|| safe_path(pq).map(str::to_string))
                .flatten()
        });
    from_referer.unwrap_or_else(|| {
        room.config
            .paths
            .first()
            .and_then(|p| safe_path(p))
            .unwrap_or("/")
            .to_string()
    })
}

/// The pass of a claim by ticket `t` (number `n`) whose answer never
/// went out, again: while this node holds the claim and its session lives.
fn resend(room: &Room, lane: &Lane, r: &GateRequest, n: u64, t: &TicketClaims) -> Option<Gate> {
    let label = room.lane_label(lane);
    let (sid, delivery) = room.undelivered.held_for(label, n, t.at, r.now_ms)?;
    let idle = room.config.session_idle.as_millis() as u64;
    if lane.store.touch(sid, r.now_ms, idle) != Liveness::Alive {
        room.undelivered.forget(label, n, t.at);
        return None;
    }
    tracing::info!(room = %room.name, n, "a claimed pass that never reached its holder sent again");
    Some(claimed(room, lane, r, sid, n, t, Some(delivery)))
}

/// Whether [`resend`] would send ticket `t`'s pass again, touching
/// nothing: a status poll says "admitted" where a reload would be let
/// in, or the page (and a program) would be told "closed" or "none"
/// while its turn is held for it.
fn resends(room: &Room, lane: &Lane, t: &TicketClaims, view: &RoomView, now_ms: u64) -> bool {
    // Most polls are of people still waiting, whose turn (and so any
    // claim of it) has not come: no look-up for them.
    effective_number(room, lane, t, view)
        .filter(|n| *n <= view.serving)
        .and_then(|n| {
            room.undelivered
                .holds(room.lane_label(lane), n, t.at, now_ms)
        })
        .is_some_and(|sid| lane.store.peek_local(sid, now_ms) == Liveness::Alive)
}

/// Hands session `sid`'s pass to ticket `t` (number `n`), the ticket
/// cleared. A GET or HEAD goes on to the portal with it. Any other
/// request's body never reaches the portal on a ticket: it is answered
/// here, the page (or JSON) saying the turn has come, and carries the
/// pass, so the same request sent again passes. (Answered "admitted"
/// without the pass, an API client would POST again for ever, and its
/// turn lapse unseen.)
fn claimed(
    room: &Room,
    lane: &Lane,
    r: &GateRequest,
    sid: u128,
    n: u64,
    t: &TicketClaims,
    delivery: Option<Delivery>,
) -> Gate {
    let pass = new_pass(room, lane, sid, n, line_start(room, t), r.now_ms);
    let mut set_cookies = vec![pass_cookie(room, &pass, r.tls)];
    set_cookies.extend(cookies::clear(
        &room.ticket_cookie,
        room.cookie_attrs(r.tls),
    ));
    if matches!(*r.method, Method::GET | Method::HEAD) {
        return Gate::Proxy {
            set_cookies,
            pass: Some(pass),
            delivery,
            whole_body: false,
        };
    }
    let view = lane.store.view();
    let status = status_for(room, lane, Some(t), &view, r.now_ms, "admitted");
    let mut resp = page(room, r, &status, &destination(room, r, Some(t)), None);
    for cookie in set_cookies {
        resp.headers_mut().append(SET_COOKIE, cookie);
    }
    if let Some(delivery) = delivery {
        let code = resp.status();
        resp = resp.map(|body| delivery.on_end_of(body, code));
    }
    Gate::Respond(resp)
}

/// A new pass for ticket number `n` of `lane`, who arrived at `arrived_ms`.
fn new_pass(
    room: &Room,
    lane: &Lane,
    sid: u128,
    n: u64,
    arrived_ms: u64,
    now_ms: u64,
) -> PassClaims {
    let idle = room.config.session_idle.as_millis() as u64;
    // The cookie lives twice the idle time and is renewed when half gone:
    // the store's session, not the cookie, decides when it ends.
    PassClaims {
        arr: arrived_ms,
        l: room.lane_label(lane).to_string(),
        ..PassClaims::new(&room.name, sid, n, now_ms, 2 * idle)
    }
}

/// The same pass, valid for another two idle times from now.
pub fn renewed(room: &Room, pass: &PassClaims, now_ms: u64) -> PassClaims {
    let idle = room.config.session_idle.as_millis() as u64;
    PassClaims {
        nbf: now_ms / 1000,
        exp: (now_ms + 2 * idle).div_ceil(1000),
        ..pass.clone()
    }
}

pub fn pass_cookie(room: &Room, claims: &PassClaims, tls: bool) -> HeaderValue {
    // The browser deletes a cookie whose Max-Age ran out, and never sends
    // it again: one that ran out with the token could never come back
    // from a login detour or a portal failure (`come_back`), which takes
    // a token lapsed by up to those windows. So the cookie outlives the
    // token by them; the token's `exp` and the store still decide.
    let lived = (claims.exp * 1000).saturating_sub(claims.nbf * 1000);
    let max_age = (lived + returns_horizon_ms(room)) / 1000;
    cookies::set_with(&room.pass_cookie, max_age, room.cookie_attrs(tls), |out| {
        room.keys.sign_into(claims, out)
    })
}

/// How long after its token's expiry a pass can still come back
/// (`come_back`): by a login detour's callback within `flow_window`, or
/// after a portal failure within two `failure_grace` (the failure's own
/// extension, then a grace to come back), in a room that allows either;
/// with the clock skew tokens are checked with. 0: it never comes back.
fn returns_horizon_ms(room: &Room) -> u64 {
    let c = &room.config;
    let ms = |d: Duration| d.as_millis() as u64;
    let detour = if c.flow_paths.is_empty() || c.max_flow_returns == 0 {
        0
    } else {
        ms(c.flow_window)
    };
    let failure = if c.max_reentries == 0 {
        0
    } else {
        2 * ms(c.failure_grace)
    };
    match detour.max(failure) {
        0 => 0,
        most => most + crate::room::token::LEEWAY_MS,
    }
}

/// A pass that lapsed, coming back ahead of the queue: on a login detour's
/// callback within `flow_window` of its expiry, or after the portal failed
/// the person (within `failure_grace` of the extended session's end, at
/// most `max_reentries` times). None: not such a pass; the usual gate.
async fn come_back(room: &Room, r: &GateRequest<'_>) -> Result<Option<Gate>, StoreError> {
    let c = &room.config;
    let ms = |d: Duration| d.as_millis() as u64;
    let (idle, grace, window) = (ms(c.session_idle), ms(c.failure_grace), ms(c.flow_window));
    let aud = audience("pass", &room.name);
    let Some(pass) = cookies::each(r.headers, &room.pass_cookie).find_map(|token| {
        room.keys
            .verify_lapsed::<PassClaims>(token, &aud, r.now_ms, window.max(2 * grace))
    }) else {
        return Ok(None);
    };
    // Never confirmed: its session may never have been made (its ticket,
    // kept, claims again instead).
    if pass.uc != 0 {
        return Ok(None);
    }
    let Some(sid) = pass.session_id() else {
        return Ok(None);
    };
    let Some(lane) = room.lane(&pass.l) else {
        return Ok(None);
    };
    let detour = room.is_flow_path(r.path_and_query) && pass.exp * 1000 + window >= r.now_ms;
    // The failure extended the session to f + idle + grace; a grace more
    // to come back.
    let failed = pass.f > 0 && r.now_ms <= pass.f + idle + 2 * grace;
    // Each return renews the pass, and with it its detour window: without
    // a count, a person could leave, let the slot go to the next in line,
    // and come back past max_active by the callback's path, again and
    // again. The counts are in the pass, and each return moves the person
    // to a new session (below), so no copy with a lower count lives on.
    // Each reason has its own: a slow login and a portal failure on the
    // same click day are both likely, and a callback's returns used up
    // leave the failure's to use.
    let detour = if detour && pass.fr < c.max_flow_returns {
        true
    } else if failed && pass.re < c.max_reentries {
        false
    } else {
        if detour || failed {
            room.metrics.reentries_refused.inc();
        }
        return Ok(None);
    };
    // Back in a new session, the old one ended: a copy of the pass kept
    // from before this return (its count lower) would otherwise be renewed
    // as live, count and all, and come back again and again. The new id
    // is the old one's, hashed: the same pass again, in parallel (a page's
    // requests at once, through any node) or after this answer was lost
    // (a phone's network), asks for the same move, and gets this return's
    // session, not one of its own. Not if the portal ended the old one.
    let new_sid = returned_sid(sid, detour);
    let made = lane
        .store
        .hand_over(
            sid,
            new_sid,
            r.now_ms + idle,
            r.now_ms,
            room.ended_memory_ms(),
        )
        .await?;
    match made {
        HandOver::Refused => return Ok(None),
        HandOver::MadeBefore => {
            tracing::debug!(room = %room.name, n = pass.n, "a return already made, its pass sent again");
        }
        HandOver::Made => {
            if detour {
                room.metrics.reentries_after_detour.inc();
            } else {
                room.metrics.reentries_after_failure.inc();
            }
            tracing::info!(room = %room.name, n = pass.n, reason = if detour { "login_detour" } else { "upstream_failure" }, "a lapsed pass came back ahead of the queue");
        }
    }
    let mut back = PassClaims {
        sid: format!("{new_sid:032x}"),
        at: r.now_ms,
        ..renewed(room, &pass, r.now_ms)
    };
    if detour {
        back.fr += 1;
    } else {
        back.re += 1;
    }
    Ok(Some(Gate::Proxy {
        set_cookies: vec![pass_cookie(room, &back, r.tls)],
        pass: Some(back),
        delivery: None,
        whole_body: false,
    }))
}

/// The session a return of session `old` moves to: the same on every
/// node and at every ask, so the store knows a return asked again from
/// a new one (`RoomStore::hand_over`). Each reason its own: a copy of the
/// pass kept from before a return after a portal failure, sent on a login
/// callback's path, would otherwise share that return's session with a
/// pass counting a detour instead, and its holder keep whichever count
/// suited the next return.
fn returned_sid(old: u128, detour: bool) -> u128 {
    let mut input = if detour {
        b"varco return after a detour ".to_vec()
    } else {
        b"varco return after a failure ".to_vec()
    };
    input.extend_from_slice(&old.to_le_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let mut sid = [0; 16];
    sid.copy_from_slice(&digest.as_ref()[..16]);
    u128::from_le_bytes(sid)
}

fn new_session(room: &Room, r: &GateRequest) -> NewSession {
    NewSession {
        sid: random_u128(),
        expires_ms: r.now_ms + room.config.session_idle.as_millis() as u64,
    }
}

/// When a ticket's holder joined the line: its arrival, or for a
/// pre-queue ticket the opening (the draw, not the hour of arrival,
/// orders the pre-queue: the portal's `X-Varco-Arrival` must not undo it).
fn line_start(room: &Room, t: &TicketClaims) -> u64 {
    match room.config.opens_at_ms {
        Some(opens) if t.pre > 0 => t.at.max(opens),
        _ => t.at,
    }
}

/// The person's ticket, with the lane it waits in: one that verifies, of
/// a lane the room still has, and of this run of its queue (one from an
/// earlier run holds no place in it: it counts as none). A provisional
/// ticket's place is its block's, wherever the store placed it: in the
/// state it came back with, whatever the run it was handed out in; none
/// once that state is lost too.
fn held_ticket<'r>(
    room: &'r Room,
    headers: &HeaderMap,
    now_ms: u64,
) -> Option<(TicketClaims, &'r Lane)> {
    let aud = audience("ticket", &room.name);
    cookies::each(headers, &room.ticket_cookie).find_map(|t| {
        let t = room.keys.verify::<TicketClaims>(t, &aud, now_ms)?;
        let lane = room.lane(&t.l)?;
        let holds = match provisional_place(&t) {
            Some((epoch, _)) => !lane.store.provisional_lost(epoch, now_ms),
            None => lane.store.holds_place(t.g),
        };
        holds.then_some((t, lane))
    })
}

/// Whether a ticket's turn has come and its claim window is still open.
fn called(room: &Room, lane: &Lane, ticket: Option<&TicketClaims>) -> bool {
    let Some(t) = ticket else {
        return false;
    };
    let view = lane.store.view();
    effective_number(room, lane, t, &view).is_some_and(|n| n <= view.serving && n > view.floor)
}

/// A provisional ticket's outage and its number in it ("epoch:seq").
fn provisional_place(t: &TicketClaims) -> Option<(u64, u64)> {
    let (epoch, seq) = t.dg.split_once(':')?;
    Some((u64::from_str_radix(epoch, 16).ok()?, seq.parse().ok()?))
}

/// The place of a ticket in its lane's order, or None before the opening.
fn effective_number(room: &Room, lane: &Lane, t: &TicketClaims, view: &RoomView) -> Option<u64> {
    place_in_run(room, lane, t, view).map(|(n, _)| n)
}

/// A ticket's place with the run of the queue it is a place in: the
/// ticket's own, or for a provisional ticket the run its block was placed
/// in, which the store names with the place (else the store's generation,
/// read again, could be a newer run's than the place).
fn place_in_run(room: &Room, lane: &Lane, t: &TicketClaims, view: &RoomView) -> Option<(u64, u64)> {
    if !t.dg.is_empty() {
        let (epoch, seq) = provisional_place(t)?;
        let (base, run) = lane.store.provisional_base(epoch)?;
        return Some((base + seq, run));
    }
    let n = if t.pre == 0 {
        t.n
    } else if view.opened {
        room.lottery_place(t.pre, view.prequeue)?
    } else {
        return None;
    };
    Some((n, t.g))
}

/// The store failed the gate: the "try again" page, with a cookie to set
/// when the failure may have admitted the person all the same.
#[derive(Debug)]
pub struct Failure {
    pub error: StoreError,
    pub set_cookie: Option<HeaderValue>,
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Failure {
            error,
            set_cookie: None,
        }
    }
}

pub async fn admit(room: &Room, r: &GateRequest<'_>) -> Result<Gate, Failure> {
    if is_bypass(room, r) {
        return Ok(Gate::without_pass(false));
    }
    if room.is_exempt(r.path_and_query) {
        // An asset or a health check sends no upload; one that does
        // without a pass must send it whole. (A pass is only verified,
        // not looked up: an exempt path costs no store round trip.)
        let whole_body = matches!(*r.method, Method::GET | Method::HEAD)
            || signed_pass(room, r.headers, r.now_ms).is_none();
        return Ok(Gate::without_pass(whole_body));
    }
    let pass = match live_pass(room, r).await? {
        Held::Pass(pass) => Some(pass),
        Held::Place(pass) => match place_back(room, r, &pass) {
            Some(gate) => return Ok(gate),
            None => None,
        },
        Held::None => None,
    };
    if let Some(pass) = pass {
        if let (Some(limiter), Some(sid)) = (&room.session_limiter, pass.session_id()) {
            if let Err(not_until) = limiter.check_key(&sid) {
                room.metrics.rejected_session_limit.inc();
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                return Ok(Gate::Respond(too_many(wait, r.reader(room), &IN_SESSION)));
            }
        }
        let mut set_cookies = vec![];
        let idle = room.config.session_idle.as_millis() as u64;
        let pass = if pass.uc != 0 {
            // The store has the session of a claim whose answer never
            // came: the claim was made, and its ticket is used. Its wait
            // is counted now, as the claim's answer would have: from the
            // arrival to the claim, when the pass was signed.
            room.metrics
                .wait_seconds
                .observe(pass.at.saturating_sub(pass.arr) as f64 / 1000.0);
            let pass = PassClaims {
                uc: 0,
                ..renewed(room, &pass, r.now_ms)
            };
            set_cookies.push(pass_cookie(room, &pass, r.tls));
            set_cookies.extend(cookies::clear(
                &room.ticket_cookie,
                room.cookie_attrs(r.tls),
            ));
            pass
        } else if pass.exp * 1000 < r.now_ms + idle {
            let pass = renewed(room, &pass, r.now_ms);
            set_cookies.push(pass_cookie(room, &pass, r.tls));
            pass
        } else {
            pass
        };
        // A ticket beside a live pass (another tab's request, sent before
        // the claim's answer came, took one) is a place nobody needs, and
        // would make the pass look lapsed to `queued_since`: gone.
        if pass.uc == 0
            && cookies::each(r.headers, &room.ticket_cookie)
                .next()
                .is_some()
        {
            set_cookies.extend(cookies::clear(
                &room.ticket_cookie,
                room.cookie_attrs(r.tls),
            ));
        }
        return Ok(Gate::Proxy {
            set_cookies,
            pass: Some(pass),
            delivery: None,
            whole_body: false,
        });
    }
    if let Some(gate) = come_back(room, r).await? {
        return Ok(gate);
    }

    let ticket = held_ticket(room, r.headers, r.now_ms);
    // A ticket keeps its lane; a new arrival joins the lane it selects.
    let lane = match &ticket {
        Some((_, lane)) => *lane,
        None => room.lane_for(r.headers, r.ranges_ip()),
    };
    let ticket = ticket.map(|(t, _)| t);
    let limits = room.lane_limits(lane);
    let safe_get = matches!(*r.method, Method::GET | Method::HEAD);
    let next_url = destination(room, r, ticket.as_ref());

    // A login detour is never queued for someone already in line: the
    // identity provider's callback reaches the portal, whatever its method.
    if ticket.is_some() && room.is_flow_path(r.path_and_query) {
        return Ok(Gate::without_pass(true));
    }

    // Closed: nobody new gets in or in line. A turn called before the
    // close is still its holder's, as a pass is (its slot is held for
    // it): it goes on to its claim; so does a pass whose answer never
    // reached its holder. Anyone else gets the closed page.
    let closed_page = |ticket: Option<&TicketClaims>| {
        room.metrics.rejected_closed.inc();
        let status = status_for(room, lane, ticket, &lane.store.view(), r.now_ms, "closed");
        Gate::Respond(page(room, r, &status, &next_url, None))
    };
    if limits.mode == Mode::Closed && !called(room, lane, ticket.as_ref()) {
        // Past its claim window too, as in an open room: the claim was
        // made, its session holds a slot, and only the answer was lost.
        let again = ticket.as_ref().and_then(|t| {
            let n = effective_number(room, lane, t, &lane.store.view())?;
            resend(room, lane, r, n, t)
        });
        return Ok(again.unwrap_or_else(|| closed_page(ticket.as_ref())));
    }

    // The person's turn came and went while they were away: said on the
    // page of the new ticket.
    let mut missed_turn = false;
    // A ticket of a run the store has lost: it says nothing true any more.
    let mut other_run = false;
    // Claimed already, its turn not over: see the closed page below.
    let mut used = false;
    if let Some(t) = &ticket {
        let view = lane.store.view();
        match place_in_run(room, lane, t, &view) {
            Some((n, run)) => {
                // Not yet eligible by the counters in hand: no claim to try.
                // A reload in line then costs no store round trip (in
                // cluster mode, none to Redis) and no session id.
                let claim = if n > view.serving {
                    None
                } else {
                    let session = new_session(room, r);
                    let c = match lane.store.claim(n, run, limits, session, r.now_ms).await {
                        Ok(c) => c,
                        // The claim may have been made, its answer (and
                        // the question after it) lost: retried, the
                        // ticket would be found used and its holder sent
                        // to the back. So the "try again" brings the pass
                        // of the session it would have made: good if the
                        // store has it, nothing if not (the ticket, kept,
                        // claims again then).
                        Err(error @ StoreError::Unanswered(_)) => {
                            let pass = PassClaims {
                                uc: 1,
                                ..new_pass(
                                    room,
                                    lane,
                                    session.sid,
                                    n,
                                    line_start(room, t),
                                    r.now_ms,
                                )
                            };
                            return Err(Failure {
                                error,
                                set_cookie: Some(pass_cookie(room, &pass, r.tls)),
                            });
                        }
                        Err(e) => return Err(e.into()),
                    };
                    Some((c, session))
                };
                match claim {
                    Some((Claim::Admitted, session)) => {
                        room.metrics
                            .wait_seconds
                            .observe(r.now_ms.saturating_sub(line_start(room, t)) as f64 / 1000.0);
                        // Until the session could idle out: after that its
                        // pass would let nobody in anyway.
                        let idle = room.config.session_idle.as_millis() as u64;
                        let delivery = room.undelivered.hold(
                            room.lane_label(lane),
                            n,
                            t.at,
                            session.sid,
                            r.now_ms,
                            r.now_ms + idle,
                        );
                        return Ok(claimed(room, lane, r, session.sid, n, t, delivery));
                    }
                    None | Some((Claim::NotYet { .. }, _)) => {
                        // After a claim the store's reply is the fresher
                        // view (in cluster mode it refreshed the counters).
                        let view = match claim {
                            Some(_) => lane.store.view(),
                            None => view,
                        };
                        let status = status_for(room, lane, Some(t), &view, r.now_ms, "waiting");
                        let cookie = headed_elsewhere(room, r, t, safe_get, &next_url);
                        return Ok(Gate::Respond(page(room, r, &status, &next_url, cookie)));
                    }
                    // Used or lapsed: this ticket admits nobody any more,
                    // unless the answer with its pass never reached the
                    // person: then the same session's pass again. (A used
                    // ticket past its claim window says Expired.)
                    Some((Claim::AlreadyClaimed, _)) => {
                        if let Some(gate) = resend(room, lane, r, n, t) {
                            return Ok(gate);
                        }
                        used = true;
                    }
                    Some((Claim::Expired, _)) => {
                        if let Some(gate) = resend(room, lane, r, n, t) {
                            return Ok(gate);
                        }
                        // Counted once its holder is back in (below): a
                        // retry refused meanwhile keeps the lapsed ticket,
                        // and would count it again at each.
                        missed_turn = true;
                    }
                    // Of a run the store has lost: no turn was missed;
                    // the holder arrives afresh, as with no ticket.
                    Some((Claim::OtherRun, _)) => other_run = true,
                }
            }
            // Before the opening's draw: the page says where the
            // pre-queue stands.
            None => {
                let status = status_for(room, lane, Some(t), &view, r.now_ms, "waiting");
                let cookie = headed_elsewhere(room, r, t, safe_get, &next_url);
                return Ok(Gate::Respond(page(room, r, &status, &next_url, cookie)));
            }
        }
    }

    // Its turn gone after all (claimed, lapsed meanwhile): no new place
    // while closed.
    if limits.mode == Mode::Closed {
        let mut closed = closed_page(ticket.as_ref().filter(|_| !other_run));
        // A used ticket whose claim window is still open reads "admitted"
        // to the status poll (which cannot know it was used), and the
        // page would reload into this answer at each poll: it goes.
        if let (true, Gate::Respond(resp)) = (used, &mut closed) {
            for c in cookies::clear(&room.ticket_cookie, room.cookie_attrs(r.tls)) {
                resp.headers_mut().append(SET_COOKIE, c);
            }
        }
        return Ok(closed);
    }
    // A used or lapsed ticket is no ticket: its holder arrives afresh.
    let lane = if ticket.is_some() {
        room.lane_for(r.headers, r.ranges_ip())
    } else {
        lane
    };
    let limits = room.lane_limits(lane);
    // Another site's page asking for something of the room (a hot-linked
    // image, an embedded frame, a script's fetch) keeps no cookie:
    // browsers store no SameSite=Lax cookie from it. A ticket would be a
    // place in line nobody holds (called, a slot for a claim window), a
    // direct admission a session nobody holds (a slot for
    // `session_idle`): on a popular page linking to the portal's images,
    // one of each for every view.
    // SameSite=None is written under HTTPS only (plain HTTP gets Lax).
    let attrs = room.cookie_attrs(r.tls);
    if !(attrs.cross_site && attrs.secure) && keeps_no_lax_cookie(r.headers) {
        room.metrics.rejected_cross_site.inc();
        let resp = crate::page::error(
            http::StatusCode::FORBIDDEN,
            &FROM_ANOTHER_SITE,
            r.reader(room),
        );
        return Ok(Gate::Respond(resp));
    }
    // A form another site's page posts (anyone's form, or an identity
    // provider's SAML or `form_post` answer) comes without the person's
    // Lax cookies, yet browsers keep a cookie its answer sets: a new
    // ticket there replaced the person's own, and their place, even a
    // turn come, went to the back of the line. The form is not sent
    // either way; a GET of the room's page carries the cookies, and finds
    // the person's place, or their pass.
    if !(attrs.cross_site && attrs.secure)
        && ticket.is_none()
        && posted_from_another_site(r.method, r.headers)
    {
        let mut resp = crate::page::error(
            http::StatusCode::SEE_OTHER,
            &POSTED_FROM_ANOTHER_SITE,
            r.reader(room),
        );
        let to = HeaderValue::try_from(destination(room, r, None))
            .unwrap_or(HeaderValue::from_static("/"));
        resp.headers_mut().insert(http::header::LOCATION, to);
        return Ok(Gate::Respond(resp));
    }
    // Each view of the counters takes the store's lock: only when needed.
    let direct = safe_get && limits.mode == Mode::Queue && lane.store.view().waiting == 0;
    // Asked before the address's share is charged: a page's assets would
    // use it up, and the person's own page then be refused.
    if !direct && crate::page::loads_for_a_page(r.headers) {
        return Ok(not_a_page(room, r));
    }
    // A direct admission is a new session as a ticket is a new place: both
    // within the address's share. Else a script without a cookie jar, in
    // a quiet hour, took a session a request (the whole rate, every
    // slot), each kept for session_idle.
    if let Err(not_until) = room.ticket_limiter.check_key(&limit_key(r.client_ip)) {
        room.metrics.rejected_ip_limit.inc();
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return Ok(Gate::Respond(too_many_for(r, room, wait, &FROM_ADDRESS)));
    }
    if direct {
        let session = new_session(room, r);
        if let Some(n) = lane.store.admit_directly(limits, session, r.now_ms).await? {
            if missed_turn {
                room.metrics.missed_turns.inc();
            }
            let pass = new_pass(room, lane, session.sid, n, r.now_ms, r.now_ms);
            let mut set_cookies = vec![pass_cookie(room, &pass, r.tls)];
            if ticket.is_some() {
                set_cookies.extend(cookies::clear(
                    &room.ticket_cookie,
                    room.cookie_attrs(r.tls),
                ));
            }
            return Ok(Gate::Proxy {
                set_cookies,
                pass: Some(pass),
                delivery: None,
                whole_body: false,
            });
        }
    }

    // Not let in straight away after all (the room full, the rate used):
    // a place, which an asset does not take either.
    if crate::page::loads_for_a_page(r.headers) {
        return Ok(not_a_page(room, r));
    }
    let (issued, run) = lane.store.issue_in_run(limits, r.now_ms).await?;
    let (n, pre, provisional) = match issued {
        Issued::Number(n) => (n, 0, String::new()),
        Issued::PreQueue(p) => (0, p, String::new()),
        Issued::Provisional { epoch, seq } => (0, 0, format!("{epoch:016x}:{seq}")),
    };
    // A ticket taken before a scheduled opening is good for `ticket_ttl`
    // from the opening: a place taken days ahead must not lapse before
    // the line even moves.
    let until_opening = room
        .config
        .opens_at_ms
        .map_or(0, |opens| opens.saturating_sub(r.now_ms));
    let ttl = room.config.ticket_ttl.as_millis() as u64 + until_opening;
    let mut claims = TicketClaims::new(&room.name, n, pre, r.now_ms, ttl, &next_url);
    claims.dg = provisional;
    claims.l = room.lane_label(lane).to_string();
    claims.g = run;
    let cookie = ticket_cookie(room, &claims, r);
    let mut status = status_for(
        room,
        lane,
        Some(&claims),
        &lane.store.view(),
        r.now_ms,
        "waiting",
    );
    status.missed_turn = missed_turn;
    if missed_turn {
        room.metrics.missed_turns.inc();
    }
    Ok(Gate::Respond(page(
        room,
        r,
        &status,
        &next_url,
        Some(cookie),
    )))
}

/// The answer to something a page shows or runs (an image, a script, a
/// style sheet; the browser says so) that would take a place in line: a
/// page's assets loaded in parallel after its ticket lapsed, or an
/// exempt page's, each took a number, and the browser kept only the last
/// cookie; the others were places nobody held, each holding a slot for
/// the claim window when called. The page itself takes the place (and a
/// script's own request, and a client that says nothing of it, an API
/// client, as ever).
fn not_a_page(room: &Room, r: &GateRequest) -> Gate {
    room.metrics.rejected_not_a_page.inc();
    let mut resp = crate::page::error(
        http::StatusCode::SERVICE_UNAVAILABLE,
        &NOT_A_PAGE,
        r.reader(room),
    );
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
    Gate::Respond(resp)
}

fn ticket_cookie(room: &Room, t: &TicketClaims, r: &GateRequest) -> HeaderValue {
    let max_age = t.exp.saturating_sub(r.now_ms / 1000);
    cookies::set_with(
        &room.ticket_cookie,
        max_age,
        room.cookie_attrs(r.tls),
        |out| room.keys.sign_into(t, out),
    )
}

/// Ticket `t` signed again to land on `next_url`, where a person held in
/// line went to another page: only when the destination changed, and
/// only for a page the person went to (the icon or an image the browser
/// fetched meanwhile is not where a form posted later should land).
fn headed_elsewhere(
    room: &Room,
    r: &GateRequest,
    t: &TicketClaims,
    safe_get: bool,
    next_url: &str,
) -> Option<HeaderValue> {
    (safe_get && t.u != next_url && is_navigation(r.headers)).then(|| {
        let mut t = t.clone();
        t.u = next_url.to_string();
        ticket_cookie(room, &t, r)
    })
}

fn page(
    room: &Room,
    r: &GateRequest,
    status: &Status,
    next_url: &str,
    cookie: Option<HeaderValue>,
) -> Response<Body> {
    let lang = waiting::language(r.headers, room.config.language);
    // A form sent by a person (the page, not a script: a script's gets
    // the JSON's 429) stops here, unsent.
    let unsent;
    let status = if matches!(*r.method, Method::GET | Method::HEAD) || r.json {
        status
    } else {
        unsent = Status {
            unsent: true,
            ..status.clone()
        };
        &unsent
    };
    let mut resp = waiting::respond(&room.template, status, lang, next_url, r.json);
    // A 200 tells whatever sent the form (a script varco took for a
    // person, a program asking for `*/*`) that it went through: the
    // page is shown as well with a 429, as a browser shows any page.
    if status.unsent && resp.status() == http::StatusCode::OK {
        *resp.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
    }
    if let Some(c) = cookie {
        resp.headers_mut().append(SET_COOKIE, c);
    }
    resp
}

/// A request from another site's page (see [`keeps_no_lax_cookie`]).
const FROM_ANOTHER_SITE: Said = Said {
    en: "This service is behind a waiting room: open it from its own address, not from another site's page.",
    it: "Questo servizio è dietro una sala d'attesa: aprilo dal suo indirizzo, non dalla pagina di un altro sito.",
};
/// A form from another site's page: sent on to the room's page.
const POSTED_FROM_ANOTHER_SITE: Said = Said {
    en: "This service is behind a waiting room: your form was not sent. Its page shows your place in line.",
    it: "Questo servizio è dietro una sala d'attesa: il modulo non è stato inviato. La sua pagina mostra il tuo posto in coda.",
};
/// Something a page loads, holding no place: the page takes it.
const NOT_A_PAGE: Said = Said {
    en: "This service is behind a waiting room: opening its page takes your place in line.",
    it: "Questo servizio è dietro una sala d'attesa: aprendo la sua pagina prendi il tuo posto in coda.",
};
/// Too many requests from one address (tickets, status polls).
const FROM_ADDRESS: Said = Said {
    en: "Too many requests from this address. Your place in line, if you have one, is kept: wait a moment and try again.",
    it: "Troppe richieste dal tuo indirizzo di rete. Il tuo posto in coda, se ne hai uno, è conservato: attendi un momento e riprova.",
};
/// A pass holder over `per_session`: the session is kept, only this
/// request is refused.
pub(crate) const IN_SESSION: Said = Said {
    en: "Too many requests in this session. Wait a moment and try again: you keep your place inside.",
    it: "Troppe richieste in questa sessione. Attendi un momento e riprova: resti dentro e non perdi il tuo posto.",
};

/// 429 saying `why`, with Retry-After: `wait`.
fn too_many(wait: Duration, reader: Reader, why: &Said) -> Response<Body> {
    let mut resp = crate::page::error(http::StatusCode::TOO_MANY_REQUESTS, why, reader);
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, crate::page::retry_after(wait));
    resp
}

/// [`too_many`] for someone without a pass: a person's page asks again
/// by itself (not a pass holder's: it would keep a walked-away person's
/// session alive).
fn too_many_for(r: &GateRequest, room: &Room, wait: Duration, why: &Said) -> Response<Body> {
    let mut resp = too_many(wait, r.reader(room), why);
    crate::page::refresh_for_a_person(&mut resp, r.method, r.json);
    resp
}

/// Where a ticket stands, honestly: the estimate comes from the pace the
/// line actually moved at over the last minute, given as a range.
pub fn status_for<'a>(
    room: &'a Room,
    lane: &Lane,
    ticket: Option<&TicketClaims>,
    view: &RoomView,
    now_ms: u64,
    state: &'static str,
) -> Status<'a> {
    let n = ticket.and_then(|t| effective_number(room, lane, t, view));
    let prequeue = ticket.is_some_and(|t| t.pre > 0) && !view.opened;
    // A turn that came and went unclaimed: the ticket admits nobody any
    // more. Said "admitted", a program would try to come in and find a
    // new ticket; `none` is what it is (the page then asks, as for any
    // ticket gone, and gets its new place with `missed_turn`).
    let lapsed = n.is_some_and(|n| n <= view.floor);
    let eligible = n.is_some_and(|n| n <= view.serving);
    let state = match state {
        "waiting" if lapsed => "none",
        "waiting" if eligible => "admitted",
        _ => state,
    };
    let position = n.filter(|_| !eligible).map(|n| n - view.serving);
    let ahead = position.map(|p| p - 1);
    let rate = view.pace;
    // Paused, nobody is called: the rate from before the pause would
    // count a wait down to nothing while the line stands still.
    let paused = room.mode() == Mode::Paused;
    let (eta, lo, hi) = match position {
        // Finite: a pace that is not (read from a store that went wrong)
        // would count every wait down to nothing.
        Some(p) if rate > 0.0 && rate.is_finite() && !paused => {
            let eta = p as f64 / rate;
            (
                Some(eta as u64),
                Some((eta * 0.8) as u64),
                Some((eta * 1.5).ceil() as u64),
            )
        }
        _ => (None, None, None),
    };
    Status {
        room: &room.name,
        state,
        position,
        ahead,
        eta_seconds: eta,
        eta_low_seconds: lo,
        eta_high_seconds: hi,
        queue_length: view.in_line(),
        prequeue,
        // Until the pre-queue is drawn too (the next tick; in cluster
        // mode, Redis's next answer): a pre-queue page says when.
        opens_at: room.config.opens_at_ms.filter(|t| *t > now_ms || prequeue),
        opens_offset_s: room.config.opens_at_offset_s,
        updated: now_ms,
        arrived: ticket.map(|t| t.at),
        // The number in line once known; before that the pre-queue number.
        ticket: n.or(ticket.map(|t| t.pre).filter(|p| *p > 0)),
        paused,
        receipt: ticket.and_then(|t| receipt::text_of(&room.line_name_cow(lane), t, &room.keys)),
        lottery: room.lottery_info(view, now_ms),
        missed_turn: false,
        claim_window_seconds: room.config.claim_window.as_secs(),
        unsent: false,
        no_cookie: false,
    }
}

/// `GET /.varco/status?room=NAME`: where the caller stands, as JSON.
pub async fn status(
    room: &Room,
    headers: &HeaderMap,
    client_ip: IpAddr,
    client_named: bool,
    now_ms: u64,
) -> Response<Body> {
    if let Err(not_until) = room.status_limiter.check_key(&limit_key(client_ip)) {
        room.metrics.rejected_status_ip_limit.inc();
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        return too_many(wait, Reader::Program, &FROM_ADDRESS);
    }
    let has_pass = match signed_pass(room, headers, now_ms)
        .and_then(|p| Some((p.session_id()?, room.lane(&p.l)?, p)))
    {
        // A pass cookie outlives its session (twice the idle time): only a
        // session still alive is "admitted", or a person whose session
        // lapsed and who queued again would be sent round in a loop. With
        // the store away, the pass is taken at its word (unless queued
        // since: see `queued_since`); the gate decides.
        Some((sid, lane, pass)) => match lane.store.peek_local(sid, now_ms) {
            Liveness::Alive => true,
            Liveness::Dead => false,
            Liveness::Unknown => match lane.store.peek(sid, now_ms).await {
                Ok(alive) => alive,
                Err(_) => {
                    room.metrics.store_errors.inc();
                    !queued_since(room, headers, now_ms, &pass)
                }
            },
        },
        None => false,
    };
    let ticket = held_ticket(room, headers, now_ms);
    let lane = match &ticket {
        Some((_, lane)) => *lane,
        None => room.lane_for(headers, ranges_ip(client_ip, client_named)),
    };
    let ticket = ticket.map(|(t, _)| t);
    let view = lane.store.view();
    // A turn called before the close can still be claimed: "waiting"
    // then reads "admitted" (see `status_for`), and the page goes on. A
    // live pass is let through, closed or not.
    let state = if has_pass
        || ticket
            .as_ref()
            .is_some_and(|t| resends(room, lane, t, &view, now_ms))
    {
        "admitted"
    } else if room.mode() == Mode::Closed && !called(room, lane, ticket.as_ref()) {
        "closed"
    } else if !room.is_gated() {
        // A room not gated (passthrough, its limits lifted) lets everyone
        // in: a page still open there moves on.
        "admitted"
    } else if ticket.is_none() {
        "none"
    } else {
        "waiting"
    };
    let mut status = status_for(room, lane, ticket.as_ref(), &view, now_ms, state);
    status.no_cookie = status.state == "none"
        && cookies::each(headers, &room.ticket_cookie).next().is_none()
        && cookies::each(headers, &room.pass_cookie).next().is_none();
    waiting::status_json(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_never_sooner_than_the_limit_allows() {
        let after = |ms| {
            too_many(Duration::from_millis(ms), Reader::Program, &FROM_ADDRESS).headers()
                [http::header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(after(1_900), "2");
        assert_eq!(after(2_000), "2");
        assert_eq!(after(2_001), "3");
        assert_eq!(after(0), "1");
    }
}
