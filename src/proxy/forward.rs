//! Sends one request to a room's upstream and streams the answer back:
//! URI and version normalised for the HTTP/1.1 pool, hop-by-hop headers
//! removed, X-Forwarded-* set, the request body sent whole (read by
//! `buffer.rs`) or streamed, the answer streamed back, protocol upgrades
//! (WebSocket) tunnelled.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{
    HeaderValue, CONNECTION, CONTENT_LENGTH, COOKIE, EXPECT, HOST, TRAILER, TRANSFER_ENCODING,
    UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::sync::watch;

use super::buffer::{ClientBody, Sendable};
use super::client::{Answered, SharedClient};
use super::headers::{
    announced_trailers, filter_trailers, is_websocket_upgrade, set_forwarded_from, strip_hop_by_hop,
};
use super::timeout::{Taken, TimedBody, Watched};
use super::ProxyError;
use crate::body::{self, Body, BoxError};
use crate::listener::{BodyComing, ConnInfo, ConnectionHold, WhileComing};
use crate::room::Room;

pub struct Forwarder {
    client: SharedClient,
    response_timeout: Duration,
    max_body_size: u64,
    trusted_proxies: Vec<IpNet>,
    client_header: crate::proxy::headers::ClientHeader,
}

/// Set once the client a request is forwarded for has gone away (its
/// handler dropped), for a forwarding that runs on its own task: what
/// was sent runs to its answer, but nothing more is sent for nobody.
#[derive(Clone)]
pub struct ClientGone(pub Arc<std::sync::atomic::AtomicBool>);

impl ClientGone {
    fn is_gone(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A request body on its way out.
enum Outgoing {
    Empty,
    Whole(Sendable),
    /// Taken by the first try.
    Streaming(Option<Body>),
}

impl Outgoing {
    /// Whether the body can still go to an upstream (none has taken it).
    fn replayable(&self) -> bool {
        match self {
            Outgoing::Empty => true,
            Outgoing::Whole(sendable) => sendable.is_here(),
            Outgoing::Streaming(_) => false,
        }
    }
}

/// How many times a request goes again after a kept-alive connection
/// closed under it. One is the race; a few more cover the rest of an idle
/// pool the upstream closed at once; more would be an upstream that
/// answers once per connection and then breaks, which is a failure.
const STALE_TRIES: u32 = 3;
/// An upload the person had paused this long when the upstream broke
/// the exchange was what the upstream gave up on: a crash in a shorter
/// pause, one a person's line makes all the time, is still the
/// upstream's.
const PAUSED_UPLOAD: Duration = Duration::from_secs(1);
/// A kept-alive connection closed as the request went out fails within
/// a round trip; one the portal drops after holding the request longer
/// than this (a worker killed at its timeout) failed on the request, and
/// sending it again would run it again.
const RACE_WITHIN: Duration = Duration::from_millis(300);

/// A response from an upstream, with which one answered (an index into
/// the room's upstreams).
pub struct Forwarded {
    pub response: Response<Body>,
    pub upstream: usize,
}

impl Forwarder {
    pub fn new(
        client: SharedClient,
        response_timeout: Duration,
        max_body_size: u64,
        trusted_proxies: Vec<IpNet>,
        client_header: crate::proxy::headers::ClientHeader,
    ) -> Self {
        Forwarder {
            client,
            response_timeout,
            max_body_size,
            trusted_proxies,
            client_header,
        }
    }

    /// `judged`: for a request adaptive admission learns from (one with a
    /// pass, or any in a room not gated), how long it waited for an
    /// in-flight slot, which counts in the latency it judges, since
    /// admitted people waited it. None: a request a gated room let
    /// through without a pass (an exempt path, a bypass, a login detour),
    /// which the admission rate does not bring.
    pub async fn forward(
        &self,
        room: &Room,
        mut req: Request<ClientBody>,
        conn: ConnInfo,
        judged: Option<Duration>,
    ) -> Result<Forwarded, ProxyError> {
        let upgrade = req.version() == Version::HTTP_11 && is_websocket_upgrade(req.headers());
        let client_upgrade: Option<OnUpgrade> = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, client_body) = req.into_parts();
        let websocket_key = upgrade
            .then(|| parts.headers.get(http::header::SEC_WEBSOCKET_KEY).cloned())
            .flatten();
        // The connection's hold, for a tunnel to take along.
        let hold = parts.extensions.remove::<Arc<ConnectionHold>>();
        // A body read whole is no longer coming; a streamed one is until
        // it ends.
        let coming = parts.extensions.remove::<BodyComing>();
        let gone = parts.extensions.remove::<ClientGone>();
        let client_upgrade = client_upgrade.map(|u| (u, hold));

        // HTTP/2 carries the host only in :authority; capture it before the
        // URI is rewritten for the upstream.
        let host: Option<HeaderValue> = parts.headers.get(HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers, true);
        // Only the secret itself: a header of that name with another value
        // (an `Authorization` meant for the portal) is the portal's.
        for (name, secret) in room.config.secret_headers() {
            crate::gate::remove_secret(&mut headers, name, secret);
        }
        crate::cookies::strip_own(&mut headers);
        if parts.version == Version::HTTP_2 {
            join_cookies(&mut headers);
        }
        if upgrade {
            // WebSocket alone, whatever else the client offered.
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }
        // varco's own headers go in after the client's hop-by-hop ones are
        // gone: a client naming one in `Connection` cannot remove it.
        if let Some(crate::room::arrival::Stamp(v)) = parts.extensions.get() {
            headers.insert(crate::room::arrival::HEADER, v.clone());
        }
        // One value only, whatever the client sent.
        let request_id = parts
            .extensions
            .get::<crate::request_id::Stamp>()
            .map(|s| &s.0);
        if let Some(v) = request_id {
            headers.insert(crate::request_id::HEADER, v.clone());
        }
        // The warnings below name it: a request that moved on to another
        // upstream has no other trace of the one that failed it.
        let request_id = crate::request_id::text(request_id);
        let trusted = conn.forwards(&self.trusted_proxies);
        let proto = if conn.tls { "https" } else { "http" };
        set_forwarded_from(
            &mut headers,
            conn.peer.ip(),
            trusted,
            &self.trusted_proxies,
            proto,
            host.as_ref(),
            self.client_header,
        );
        match (&host, room.config.preserve_host) {
            (Some(h), true) => {
                headers.insert(HOST, h.clone());
            }
            // Without a Host, the client sets it from the upstream URI.
            _ => {
                headers.remove(HOST);
            }
        }

        // A body read whole (or none) can go to another upstream when the
        // first refuses the connection (or, for a request safe to send
        // twice, breaks the exchange), as long as none has taken it; a
        // streamed one cannot.
        let coming = match client_body {
            ClientBody::Streaming(_) => coming,
            ClientBody::Whole(_) => None,
        };
        // varco answered the client's `Expect: 100-continue` itself (hyper
        // does, when the body is first read), and hyper's client sends the
        // body without waiting: a promise to wait would only be a strict
        // portal's 417 (nginx and Envoy clear it too).
        headers.remove(EXPECT);
        let (mut outgoing, mut taken) = match client_body {
            ClientBody::Whole(whole) if whole.bytes.is_empty() => {
                // A POST ended at its headers (HTTP/2's END_STREAM, a
                // chunked `0`) says no length; hyper's client adds none for
                // an empty body, and IIS or a Java stack answers 411
                // (RFC 9110 8.6: a POST should say `Content-Length: 0`).
                if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH)
                    && !headers.contains_key(CONTENT_LENGTH)
                {
                    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
                }
                (Outgoing::Empty, None)
            }
            ClientBody::Whole(whole) => (Outgoing::Whole(Sendable::new(whole)), None),
            ClientBody::Streaming(streaming) => {
                // Without a length, hyper's client sends a GET (or HEAD)
                // with no body at all unless told it is chunked: the
                // portal got the request and never the body.
                if !headers.contains_key(CONTENT_LENGTH) {
                    headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                }
                let streaming = WhileComing::new(streaming, coming);
                let limited = Limited::new(streaming, self.max_body_size as usize);
                let (watched, taken) = Watched::new(limited.map_err(ClientBodyError));
                (
                    Outgoing::Streaming(Some(body::stream(watched))),
                    Some(taken),
                )
            }
        };

        let timeout = room
            .config
            .response_timeout
            .unwrap_or(self.response_timeout);
        let client = self.client.load_full();
        let path = parts.uri.path_and_query().cloned();
        let mut tried: Vec<usize> = Vec::with_capacity(1);
        let mut failed: Option<ProxyError> = None;
        // A request safe to send twice (RFC 9110, 9.2.2) may go again when
        // it failed before any answer; others never do, as nginx's
        // `proxy_next_upstream` without `non_idempotent`: a POST the portal
        // may have acted on is the person's to send again.
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let mut stale_tries = 0;
        loop {
            // Before the first try and between tries: a client gone
            // meanwhile is sent nothing (a portal not yet reached does
            // not work on it).
            if gone.as_ref().is_some_and(ClientGone::is_gone) {
                return Err(failed.unwrap_or_else(|| {
                    ProxyError::ClientBody(
                        "the client went away before the request was sent".into(),
                    )
                }));
            }
            let Some((index, probe)) = room.upstreams.pick_or_probe(&tried) else {
                // Every upstream in play was tried (the last try returns
                // first, unless one was taken out meanwhile), or all are
                // taken out.
                return Err(failed.unwrap_or_else(|| ProxyError::Unreachable {
                    upstream: room.name.clone(),
                    source: "no upstream in rotation: every one is taken out".into(),
                }));
            };
            tried.push(index);
            let upstream = room.upstreams.get(index);
            let uri = upstream_uri(&upstream.base, path.as_ref());
            let mut builder = Request::builder()
                .method(parts.method.clone())
                .uri(uri)
                .version(Version::HTTP_11);
            let replayable = outgoing.replayable();
            // Those taken out by an operator are never tried. Every
            // untried one out (found dead, or cooling down after
            // failures): one probe, then the answer. Going to each in
            // turn, a request would wait out a connect timeout for each,
            // holding its in-flight slot all the while.
            let last_upstream = probe || tried.len() >= room.upstreams.in_play();
            let last_try = !replayable || last_upstream;
            let may_go_again =
                replayable && (!last_upstream || idempotent && stale_tries < STALE_TRIES);
            if let Some(h) = builder.headers_mut() {
                *h = if may_go_again {
                    headers.clone()
                } else {
                    std::mem::take(&mut headers)
                };
            }
            let body = match &mut outgoing {
                Outgoing::Empty => body::empty(),
                Outgoing::Whole(sendable) => match sendable.body() {
                    Some(b) => body::stream(b),
                    None => {
                        return Err(ProxyError::Upstream {
                            upstream: upstream.label.clone(),
                            source: "the request body went to an upstream that failed".into(),
                        })
                    }
                },
                Outgoing::Streaming(b) => b.take().unwrap_or_else(body::empty),
            };
            let mut upstream_req = builder.body(body).map_err(|e| ProxyError::Upstream {
                upstream: upstream.label.clone(),
                source: e.into(),
            })?;
            let connected =
                hyper_util::client::legacy::connect::capture_connection(&mut upstream_req);

            let mut started = Instant::now();
            // `started` moves on to when a streamed body was sent; the
            // keep-alive race is judged from when the request went out.
            let sent_at = started;
            // By the pool's clock: an answer tells of the upstream's health
            // only as it was when the request left.
            let sent_ms = room.upstreams.ms_at(started);
            // What adaptive admission learns from: the upstream's latency
            // (and apart, the wait for an in-flight slot) and its
            // failures, never the client's. A body still coming in is the
            // person's pace: the request waits for the portal's answer
            // (and may be overdue) only once the body went out.
            let mut outstanding = room.adaptive.as_ref().zip(judged).map(|(a, queued)| {
                let o = match taken {
                    Some(_) => a.signals.send_with_body(),
                    None => a.signals.send(),
                };
                (o, queued)
            });
            // What the upstream had of the body when it failed.
            let body_taken = taken.clone();
            let metrics = &room.upstream_metrics[index];
            // Lowered on drop too: a client that goes away (an HTTP/2
            // reset) drops this future mid-wait.
            let counted = crate::metrics::Counted::new(metrics.in_flight.clone());
            let sent = self
                .answer(
                    client.request(upstream_req),
                    connected,
                    taken.take(),
                    timeout,
                    &mut started,
                    || {
                        if let Some((o, _)) = outstanding.as_mut() {
                            o.body_sent();
                        }
                    },
                )
                .await;
            drop(counted);
            let mut signal = |failed: bool| {
                if let Some((o, queued)) = outstanding.as_mut() {
                    o.answer_queued(*queued, started.elapsed(), failed);
                }
            };
            let outcome = match sent {
                None => {
                    metrics.timeouts.inc();
                    // At the time waited: left out, the slowest requests
                    // (a portal hanging) vanished from the percentiles.
                    metrics
                        .response_seconds
                        .observe(started.elapsed().as_secs_f64());
                    signal(true);
                    // A hung upstream still accepts connections: without
                    // this, it kept its share of the rotation, and every
                    // request sent to it waited response_timeout for a 504
                    // (nginx counts a timeout as a failure too).
                    let then = room.mark_failed(index);
                    tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, ?timeout, "upstream gave no answer in time; {then}");
                    return Err(ProxyError::Timeout {
                        upstream: upstream.label.clone(),
                        timeout,
                    });
                }
                Some(r) => r,
            };
            match outcome {
                Ok(resp) => {
                    if let Some(answered) = resp.extensions().get::<Answered>() {
                        answered.mark();
                    }
                    // That page's fault, as a malformed head is: neither
                    // counted against the upstream nor sent elsewhere.
                    let upgrading = client_upgrade.is_some();
                    if let Some(fault) = answer_fault(&resp, upgrading, websocket_key.as_ref()) {
                        metrics.protocol_errors.inc();
                        signal(false);
                        tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, fault, coding = ?resp.headers().get(TRANSFER_ENCODING), "upstream answer refused; not counted against it");
                        return Err(ProxyError::Upstream {
                            upstream: upstream.label.clone(),
                            source: fault.into(),
                        });
                    }
                    room.mark_healthy(index, sent_ms);
                    metrics.response(resp.status().as_u16());
                    signal(resp.status().is_server_error());
                    metrics
                        .response_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Forwarded {
                        response: into_client_response(resp, client_upgrade, timeout),
                        upstream: index,
                    });
                }
                Err(e) if e.is_connect() => {
                    metrics.connect_errors.inc();
                    signal(true);
                    let then = room.mark_failed(index);
                    tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "upstream refused the connection; {then}");
                    let error = ProxyError::Unreachable {
                        upstream: upstream.label.clone(),
                        source: e.into(),
                    };
                    if last_try {
                        return Err(error);
                    }
                    failed = Some(error);
                }
                Err(e) => {
                    if has_source::<http_body_util::LengthLimitError>(&e) {
                        return Err(ProxyError::BodyTooLarge {
                            limit: self.max_body_size,
                        });
                    }
                    if has_source::<super::timeout::BodyReadTimeout>(&e) {
                        return Err(ProxyError::BodyTimeout);
                    }
                    if has_source::<ClientBodyError>(&e) {
                        return Err(ProxyError::ClientBody(e.into()));
                    }
                    // The upstream gave up on a body the person had paused
                    // (a portal worker ended at its own read timeout): the
                    // person's delay, as `body_read_timeout` would have
                    // called it. Counted against the upstream, one stalled
                    // upload took it out of rotation and told adaptive
                    // admission the portal was failing.
                    if body_taken.as_ref().is_some_and(|t| {
                        matches!(*t.borrow(), Taken::AwaitingClient(_, since)
                            if since.elapsed() >= PAUSED_UPLOAD)
                    }) {
                        tracing::info!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "upstream gave up on an upload the person had paused; not counted against it");
                        return Err(ProxyError::BodyTimeout);
                    }
                    // Under TLS 1.3 an https upstream refuses varco's
                    // client certificate (or its lack of one) only after
                    // the handshake, with an alert on the first read: a
                    // refused connection, not a broken exchange.
                    // On a new connection it read nothing of the request:
                    // the next upstream may have it, as after any refused
                    // connection, unless its body went out with it (hyper
                    // writes it before it reads the alert, and a body
                    // read whole is let go of once written): then the 502
                    // is this upstream's, not one of the next that never
                    // had it. On one that had answered, the alert may
                    // come after the portal acted on it (a form sent
                    // twice): the answer is the 502.
                    if tls_alert(&e) {
                        metrics.connect_errors.inc();
                        signal(true);
                        let then = room.mark_failed(index);
                        tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "upstream refused the TLS connection (upstream.tls_client?); {then}");
                        let fresh = !Answered::before(&e);
                        let error = ProxyError::Unreachable {
                            upstream: upstream.label.clone(),
                            source: e.into(),
                        };
                        if last_try || !fresh || !outgoing.replayable() {
                            return Err(error);
                        }
                        failed = Some(error);
                        continue;
                    }
                    // A head the upstream got wrong (a bad field line,
                    // more than 1000 fields) belongs to that one answer,
                    // and any upstream serving the same page sends the
                    // same: counting it, or sending the request on, let
                    // one page requested a few times take every upstream
                    // out of rotation. nginx neither counts nor retries
                    // `invalid_header` unless told to.
                    if malformed_answer(&e) {
                        metrics.protocol_errors.inc();
                        signal(false);
                        tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "upstream sent a malformed answer; not counted against it");
                        return Err(ProxyError::Upstream {
                            upstream: upstream.label.clone(),
                            source: e.into(),
                        });
                    }
                    let again = idempotent && outgoing.replayable();
                    // The keep-alive race: a connection that had answered
                    // went away with no answer to this one. (A malformed
                    // answer there was no race: it came.)
                    let race =
                        Answered::before(&e) && closed_under(&e) && sent_at.elapsed() < RACE_WITHIN;
                    if race && again && stale_tries < STALE_TRIES {
                        // Not the upstream's failure: no signal, no count
                        // towards a cool-down. Any upstream may take it,
                        // this one included (on another connection).
                        stale_tries += 1;
                        metrics.closed_idle.inc();
                        tracing::debug!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "a kept-alive connection closed as the request went out; sending it again");
                        tried.pop();
                        continue;
                    }
                    metrics.protocol_errors.inc();
                    let then = if race {
                        // The person's failure all the same (a POST is not
                        // sent twice), not the upstream's.
                        "not counted against the upstream (a kept-alive connection closed)".into()
                    } else {
                        signal(true);
                        room.mark_failed(index).to_string()
                    };
                    tracing::warn!(room = %room.name, upstream = %upstream.label, request_id, error = %e, "upstream broke the exchange; {then}");
                    let error = ProxyError::Upstream {
                        upstream: upstream.label.clone(),
                        source: e.into(),
                    };
                    // By the count the headers were kept for.
                    if !again || last_upstream {
                        return Err(error);
                    }
                    failed = Some(error);
                }
            }
        }
    }
}

impl Forwarder {
    /// The upstream's answer to `request`, or None when it took too long.
    /// `timeout` (the room's `response_timeout`, or `upstream.`'s) counts
    /// from when the upstream has the whole
    /// request: an upload at the pace of the person's line is not the
    /// portal's delay, nor its failure. While the body goes out, the
    /// upstream must take a part of it within the same time (nginx's
    /// `proxy_send_timeout`; while the upstream waits for a part the client
    /// has not sent, the wait is the client's, `body_read_timeout`'s). The
    /// latency adaptive admission learns is timed from `started`, moved on
    /// to when the body was sent.
    async fn answer<F: Future>(
        &self,
        request: F,
        mut connected: hyper_util::client::legacy::connect::CaptureConnection,
        taken: Option<watch::Receiver<Taken>>,
        timeout: Duration,
        started: &mut Instant,
        body_sent: impl FnOnce(),
    ) -> Option<F::Output> {
        let mut request = std::pin::pin!(request);
        // The connection first (one kept alive, or one made within
        // `connect_timeout`, which the connector bounds): timed from the
        // start, a host that drops packets was a 504 at a shorter
        // `response_timeout`, never going on to the next upstream as a
        // failed connection does.
        tokio::select! {
            answer = &mut request => return Some(answer),
            _ = connected.wait_for_connection_metadata() => {}
        }
        if let Some(mut taken) = taken {
            loop {
                let state = *taken.borrow_and_update();
                if state == Taken::All {
                    break;
                }
                let client_owes = matches!(state, Taken::AwaitingClient(..));
                let changed = async {
                    if client_owes {
                        Ok(taken.changed().await)
                    } else {
                        tokio::time::timeout(timeout, taken.changed()).await
                    }
                };
                tokio::select! {
                    answer = &mut request => return Some(answer),
                    changed = changed => {
                        match changed {
                            Err(_) => return None,
                            // The body is gone: sent, or failed (the
                            // request says which).
                            Ok(Err(_)) => break,
                            Ok(Ok(())) => {}
                        }
                    }
                }
            }
            *started = Instant::now();
            body_sent();
        }
        tokio::time::timeout(timeout, request).await.ok()
    }
}

/// HTTP/2 lets a browser send its cookies as separate `cookie` fields
/// (header compression works better on each); an HTTP/1.1 server expects
/// one `Cookie` line, and some join repeated headers with commas, which
/// breaks a session cookie. RFC 9113 section 8.2.3: joined with "; ", as
/// nginx does.
fn join_cookies(headers: &mut http::HeaderMap) {
    let mut all = headers.get_all(COOKIE).iter();
    let (Some(first), Some(_)) = (all.next(), all.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(COOKIE, v);
    }
}

pub(crate) fn upstream_uri(base: &Uri, path: Option<&http::uri::PathAndQuery>) -> Uri {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(
        path.cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
}

/// Strips hop-by-hop headers from the upstream's answer, or, for a
/// switched protocol, joins the two upgraded connections into a tunnel.
/// A length the upstream said more than once (`5, 5`, or two fields),
/// which hyper's client took as it agreed, written once: passed on as it
/// came, hyper's server cannot read it back, and ends the client's
/// connection with no answer.
fn one_length(headers: &mut http::HeaderMap) {
    let fields = headers.get_all(CONTENT_LENGTH);
    let said_once =
        fields.iter().count() == 1 && fields.iter().all(|v| !v.as_bytes().contains(&b','));
    if said_once {
        return;
    }
    if let Some(n) = agreed_length(headers) {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
    }
}

/// The one value every Content-Length field and list item says.
fn agreed_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut agreed = None;
    for field in headers.get_all(CONTENT_LENGTH) {
        for item in field.to_str().ok()?.split(',') {
            let n: u64 = item.trim().parse().ok()?;
            if agreed.is_some_and(|a| a != n) {
                return None;
            }
            agreed = Some(n);
        }
    }
    agreed
}

fn into_client_response(
    resp: Response<Incoming>,
    client_upgrade: Option<(OnUpgrade, Option<Arc<ConnectionHold>>)>,
    read_timeout: Duration,
) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    match (parts.status, client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some((client_side, hold))) => {
            let upgrade = parts.headers.get(UPGRADE).cloned();
            strip_hop_by_hop(&mut parts.headers, false);
            crate::cookies::strip_own_set_cookies(&mut parts.headers);
            if let Some(u) = upgrade {
                parts
                    .headers
                    .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(UPGRADE, u);
            }
            let upstream_side = parts.extensions.remove::<OnUpgrade>();
            if let Some(upstream_side) = upstream_side {
                let t = tunnel(client_side, upstream_side);
                match hold {
                    Some(hold) => hold.spawn_tunnel(t),
                    None => {
                        tokio::spawn(t);
                    }
                }
            }
            Response::from_parts(parts, body::empty())
        }
        _ => {
            // hyper read a chunked answer by its chunks but keeps a
            // Content-Length sent alongside (request smuggling's shape on
            // the way back); once Transfer-Encoding is gone, the client
            // would take the body by that length: cut short or waiting
            // for bytes that never come. As HAProxy: the length goes.
            if parts.headers.contains_key(TRANSFER_ENCODING) {
                parts.headers.remove(CONTENT_LENGTH);
            } else {
                one_length(&mut parts.headers);
            }
            // `Trailer` goes with the hop-by-hop fields (RFC 2616 had it
            // there) and comes back for the fields that will follow.
            let announced = announced_trailers(&parts.headers);
            strip_hop_by_hop(&mut parts.headers, false);
            crate::cookies::strip_own_set_cookies(&mut parts.headers);
            if let Some(names) = announced {
                parts.headers.insert(TRAILER, names);
            }
            // An upstream that stops in the middle of its answer must not
            // hold the person's connection and the in-flight slot for ever
            // (nginx's proxy_read_timeout): the answer is cut off.
            let body = TimedBody::new(incoming, read_timeout).map_frame(|frame| {
                match frame.into_trailers() {
                    Ok(mut trailers) => {
                        filter_trailers(&mut trailers);
                        http_body::Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                }
            });
            Response::from_parts(parts, body::stream(body))
        }
    }
}

async fn tunnel(client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "protocol upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection closed with an error");
    }
}

/// Whether a TLS peer sent an alert (refused the connection) somewhere in
/// `e`'s chain; rustls's error arrives inside an `io::Error`, whose
/// `source()` skips it.
fn tls_alert(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|err| {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>());
        let tls = err.downcast_ref::<rustls::Error>().or(inner);
        matches!(tls, Some(rustls::Error::AlertReceived(_)))
    })
}

/// Why an answer hyper took is still not one to pass on, if it is not:
/// coded bytes the client would read as plain ones (`has_unknown_coding`),
/// a 101 to a WebSocket upgrade that is not the handshake asked for
/// (`accepts_websocket`: the tunnel would be a raw pipe to the portal),
/// or a 101 to a request that asked for no upgrade (hyper takes any 101
/// for one: the citizen got a 101 with no tunnel behind it, and a
/// connection closed).
fn answer_fault(
    resp: &Response<Incoming>,
    upgrading: bool,
    websocket_key: Option<&HeaderValue>,
) -> Option<&'static str> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrading {
        Some("a 101 to a request that asked for no upgrade")
    } else if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && !super::headers::accepts_websocket(resp.headers(), websocket_key)
    {
        Some("a 101 that is not the WebSocket handshake asked for")
    } else if super::headers::has_unknown_coding(resp.headers()) {
        Some("a transfer coding besides chunked")
    } else {
        None
    }
}

/// An answer that is HTTP but whose head hyper could not take: a field
/// line it cannot read, a bad length or transfer coding, more than 1000
/// fields. That page's fault, not the upstream's. An answer whose status
/// line is not HTTP's (a wrong port, a TLS server behind `http://`) is
/// the upstream's: hyper names no such kind, but its words for it are
/// pinned by a test.
fn malformed_answer(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|err| {
        err.downcast_ref::<hyper::Error>().is_some_and(|h| {
            h.is_parse_too_large() || (h.is_parse() && !h.is_parse_status() && !speaks_no_http(h))
        })
    })
}

fn speaks_no_http(e: &hyper::Error) -> bool {
    e.to_string().starts_with("invalid HTTP version parsed")
}

/// Whether the connection went away under a request: hyper saw it end
/// before an answer, or the socket was reset.
fn closed_under(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    chain(e).any(|err| {
        err.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
            || err.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
                )
            })
    })
}

fn has_source<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    chain(e).any(|err| err.is::<T>())
}

/// `e` and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| err.source())
}

/// Marks an error that came from reading the client's request body (the
/// client went away, sent a bad chunk, or too much): the client's fault,
/// never counted against the upstream.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
struct ClientBodyError(#[source] BoxError);
