//! The accept loop and each connection's life: a cap on open connections,
//! the TLS handshake under a timeout, HTTP/1.1 and HTTP/2 on one port
//! (hyper-util's auto builder: ALPN under TLS, prior knowledge in clear),
//! header-read and keep-alive idle timeouts, and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::Body;
use crate::config::ServerConfig;

/// The connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The person's browser spoke TLS: to varco, or to a balancer in front
    /// whose PROXY header says it ended it (or that `server.assume_https`
    /// says ends it).
    pub tls: bool,
    /// A balancer's PROXY header named no client (LOCAL, UNKNOWN): `peer`
    /// is the balancer, standing in for someone unknown.
    pub anonymous: bool,
}

impl ConnInfo {
    /// Whether the forwarded headers (X-Forwarded-For, -Proto, request
    /// IDs) of this connection's requests are believed: it comes from one
    /// of `trusted`, and not for someone a PROXY header left unnamed (a
    /// TCP balancer passes the client's bytes as they came, so such
    /// headers there are the client's own, and believed they would let
    /// anyone choose their address: a bypass range, another's budget).
    pub fn forwards(&self, trusted: &[ipnet::IpNet]) -> bool {
        !self.anonymous && crate::proxy::headers::is_trusted(self.peer.ip(), trusted)
    }

    /// Whether [`Self::client`] is the person's address, not a balancer's
    /// standing in for someone a PROXY header left unnamed.
    pub fn names_client(&self) -> bool {
        !self.anonymous
    }

    /// The client, as every rule sees it: the peer, or whom the trusted
    /// proxies it forwards for name.
    pub fn client(
        &self,
        headers: &http::HeaderMap,
        trusted: &[ipnet::IpNet],
        from: crate::proxy::headers::ClientHeader,
    ) -> IpAddr {
        if self.anonymous {
            // As every other way through: on a dual-stack listener the
            // balancer's IPv4 address comes mapped, and IPv4 ranges
            // (bypass, lanes) would miss it.
            return crate::proxy::headers::canonical(self.peer.ip());
        }
        crate::proxy::headers::client_ip_from(headers, self.peer.ip(), trusted, from)
    }
}

/// Whatever answers requests on a listener: the gateway on the public
/// port, the admin API on the admin port.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// HTTP/2 limits set explicitly (see STYLE.md: one hyper release passed a
/// wrong local reset limit to h2, leaving it unlimited).
const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// The request header count hyper allows when it is not told one.
const HYPER_MAX_HEADERS: usize = 100;

#[derive(Debug, Clone)]
pub struct ListenerSettings {
    pub max_connections: usize,
    /// Open connections one address may hold; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Addresses the per-address limit does not apply to (load balancers).
    pub exempt: Vec<ipnet::IpNet>,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub keepalive_timeout: Duration,
    /// A write that makes no progress for this long ends the connection.
    pub send_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Every connection starts with a PROXY protocol header from one of
    /// `exempt` (the load balancers), naming the client; others are closed.
    pub proxy_protocol: bool,
    /// Every connection counts as HTTPS for the person (`ConnInfo::tls`).
    pub assume_https: bool,
}

impl Default for ListenerSettings {
    fn default() -> Self {
        ListenerSettings::defaults()
    }
}

impl ListenerSettings {
    pub fn from_server(s: &ServerConfig) -> Self {
        ListenerSettings {
            max_connections: s.max_connections,
            max_connections_per_ip: s.max_connections_per_ip,
            exempt: s.trusted_proxies.clone(),
            max_header_size: s.max_header_size,
            max_headers: s.max_headers,
            header_read_timeout: s.header_read_timeout,
            keepalive_timeout: s.keepalive_timeout,
            send_timeout: s.send_timeout,
            tls_handshake_timeout: s.tls_handshake_timeout,
            proxy_protocol: s.proxy_protocol,
            assume_https: s.assume_https,
        }
    }

    /// The same, for the admin listener: operators and Prometheus reach it
    /// directly, never through the balancer's PROXY header.
    pub fn for_admin(&self) -> Self {
        ListenerSettings {
            proxy_protocol: false,
            assume_https: false,
            ..self.clone()
        }
    }

    /// The defaults of `[server]`, for listeners that are not configured
    /// (the demo portal's).
    fn defaults() -> Self {
        use crate::config::file::*;
        use crate::config::units::{parse_duration, parse_size};
        let d = |s: &str| parse_duration(s).expect("default durations parse");
        ListenerSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: 0,
            exempt: Vec::new(),
            max_header_size: parse_size(DEFAULT_MAX_HEADER_SIZE).expect("default size parses")
                as usize,
            max_headers: DEFAULT_MAX_HEADERS,
            header_read_timeout: d(DEFAULT_HEADER_READ_TIMEOUT),
            keepalive_timeout: d(DEFAULT_KEEPALIVE_TIMEOUT),
            send_timeout: d(DEFAULT_SEND_TIMEOUT),
            tls_handshake_timeout: d(DEFAULT_TLS_HANDSHAKE_TIMEOUT),
            proxy_protocol: false,
            assume_https: false,
        }
    }

    fn http_builder(&self, streams: Streams) -> auto::Builder<Streams> {
        let mut b = auto::Builder::new(streams);
        let mut h1 = b.http1();
        h1
            // Without a timer, header_read_timeout silently does nothing.
            .timer(TokioTimer::new())
            // hyper times the head from when it starts waiting for one,
            // an idle keep-alive included: given header_read_timeout, it
            // cut every keep-alive there (30 s, not 75). The connection's
            // loop times heads from their first byte; this is a backstop.
            .header_read_timeout(self.header_read_timeout.max(self.keepalive_timeout))
            .max_buf_size(self.max_header_size.max(8192))
            // Head and body copied into one buffer and sent with one
            // write, rather than a writev of the two: a waiting page is a
            // few KiB, and the copy costs less than the vectored write
            // (BENCHMARKS.md, the waiting page).
            .writev(false)
            .keep_alive(true);
        // hyper parses into arrays on the stack for its own default count,
        // but into ones it fills first for any count it is given: 6 KiB
        // written per request. Its default is varco's, so only another
        // count is passed (tests/limits.rs checks both).
        if self.max_headers != HYPER_MAX_HEADERS {
            h1.max_headers(self.max_headers);
        }
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_header_list_size(self.max_header_size as u32)
            // How much of a request body a client may send before varco
            // reads it: hyper's fixed 1 MiB a stream and a connection let
            // a client park a mebibyte per connection in varco, counted
            // in no `request_buffer_memory`, while its request waits at
            // the gate or for an upstream (10,000 connections: 10 GiB).
            // Adaptive, the windows start at the protocol's 64 KiB and
            // grow with what a body read as it comes shows the link can
            // carry (an upload on a slow, far phone is not held to 64 KiB
            // a round trip, as a fixed small window would). The growth is
            // the client's to drive (a fast body, PINGs answered late), up
            // to hyper's ceiling of 16 MiB, which hyper offers no setting
            // for: README's threat table says so.
            .adaptive_window(true)
            // varco PINGs a client quiet for keepalive_timeout, and closes
            // one that does not answer: the goodbye of an idle connection
            // waits for such an answer, and would otherwise wait for ever.
            .keep_alive_interval(self.keepalive_timeout)
            .keep_alive_timeout(self.keepalive_timeout.min(Duration::from_secs(20)));
        b
    }
}

/// Where hyper runs each HTTP/2 stream, a task of its own apart from its
/// connection's: on the listener's tracker, ended at `close` as the
/// connections are. On tokio's own, a stream could still be admitting
/// someone after the grace, once the last snapshot is written.
#[derive(Clone)]
struct Streams {
    tracker: TaskTracker,
    close: CancellationToken,
}

tokio::task_local! {
    /// The HTTP/2 stream a task serves: cancelled, the stream alone ends
    /// (hyper resets it), the connection and its other streams go on.
    static STREAM: CancellationToken;
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let stream = self.close.child_token();
        let ended = stream.clone();
        self.tracker.spawn(STREAM.scope(stream, async move {
            ended.run_until_cancelled_owned(fut).await
        }));
    }
}

/// The answer to more headers than `server.max_headers`, as hyper gives
/// it over HTTP/1.
fn too_many_headers() -> Response<crate::body::Body> {
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
    resp.headers_mut()
        .insert(http::header::CACHE_CONTROL, crate::page::OWN_CACHE_CONTROL);
    resp
}

/// How a listener is told to stop: `drain` turning true (or its sender
/// dropped) ends the accepting and tells open connections to finish what
/// they are doing; `close`, once the grace is over, ends those left at
/// once, whatever they are doing.
#[derive(Clone)]
pub struct Stop {
    pub drain: watch::Receiver<bool>,
    pub close: CancellationToken,
}

/// What a listener counts (the public one only).
#[derive(Clone)]
pub struct Counters {
    /// `varco_open_connections`.
    pub open: prometheus::IntGauge,
    /// `varco_connections_dropped_total`, by reason.
    pub dropped: prometheus::IntCounterVec,
}

/// Why a connection was closed before any request was read: the label of
/// `varco_connections_dropped_total`.
#[derive(Clone, Copy)]
pub enum Dropped {
    /// Over `max_connections_per_ip`.
    PerAddress,
    /// Its PROXY header missing, bad or late, or from a peer that may not
    /// send one.
    ProxyHeader,
    /// Its TLS handshake failed or timed out.
    TlsHandshake,
}

impl Dropped {
    pub const ALL: [Dropped; 3] = [
        Dropped::PerAddress,
        Dropped::ProxyHeader,
        Dropped::TlsHandshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Dropped::PerAddress => "per_address",
            Dropped::ProxyHeader => "proxy_header",
            Dropped::TlsHandshake => "tls_handshake",
        }
    }
}

fn count_dropped(counters: &Option<Counters>, why: Dropped) {
    if let Some(c) = counters {
        c.dropped.with_label_values(&[why.label()]).inc();
    }
}

/// Accepts until `stop.drain` turns true, then returns; connections
/// already open are told to drain and tracked by `tracker`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    settings: ListenerSettings,
    stop: Stop,
    tracker: TaskTracker,
    counters: Option<Counters>,
) {
    let Stop {
        drain: mut shutdown,
        close,
    } = stop;
    let builder = Arc::new(settings.http_builder(Streams {
        tracker: tracker.clone(),
        close: close.clone(),
    }));
    // Past the cap, connections wait in the kernel's backlog rather than
    // being accepted and starved (HAProxy's maxconn behaviour).
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let per_ip: Arc<DashMap<IpAddr, usize>> = Arc::new(DashMap::new());
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Behind a balancer speaking the PROXY protocol the client is known
        // only once its header is read (in the connection's task): only
        // the balancers may send one, so nobody else can name a client.
        let held = if settings.proxy_protocol {
            if !crate::proxy::headers::is_trusted(peer.ip(), &settings.exempt) {
                tracing::debug!(%peer, "not a trusted proxy: no PROXY header accepted from it");
                count_dropped(&counters, Dropped::ProxyHeader);
                continue;
            }
            None
        } else {
            match PerIp::take(&per_ip, peer.ip(), &settings) {
                Some(held) => Some(held),
                None => {
                    // Over its share: closed at once, so one address cannot
                    // take the connection slots everyone else needs.
                    tracing::debug!(%peer, "too many connections from this address");
                    count_dropped(&counters, Dropped::PerAddress);
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let per_ip = per_ip.clone();
        let tls = tls.clone();
        let handler = handler.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let settings = settings.clone();
        let counters = counters.clone();
        let tasks = tracker.clone();
        let close = close.clone();
        // Past the grace, a connection (its TLS handshake, its PROXY
        // header, its requests) is dropped where it stands: what is left
        // must not admit anyone after the last snapshot is written.
        tracker.spawn(close.clone().run_until_cancelled_owned(async move {
            let mut stream = stream;
            // Open from the accept: a connection still sending its PROXY
            // header holds a slot too (VarcoConnectionsNearLimit).
            let open = counters
                .as_ref()
                .map(|c| crate::metrics::Counted::new(c.open.clone()));
            let (mut info, held) = match held {
                Some(held) => (
                    ConnInfo {
                        peer,
                        tls: false,
                        anonymous: false,
                    },
                    held,
                ),
                None => match from_balancer(&mut stream, peer, &per_ip, &settings).await {
                    Ok(x) => x,
                    Err(why) => {
                        count_dropped(&counters, why);
                        return;
                    }
                },
            };
            let peer = info.peer;
            let hold = Arc::new(ConnectionHold {
                _permit: permit,
                _per_ip: held,
                _open: open,
                tracker: tasks,
                close,
                activity: Arc::new(Activity::new()),
                idle: settings.keepalive_timeout,
            });
            match tls {
                None => {
                    info.tls |= settings.assume_https;
                    serve_connection(stream, info, &builder, handler, &settings, shutdown, hold)
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(
                        settings.tls_handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(stream)) => {
                            info.tls = true;
                            serve_connection(
                                stream, info, &builder, handler, &settings, shutdown, hold,
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            count_dropped(&counters, Dropped::TlsHandshake);
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            count_dropped(&counters, Dropped::TlsHandshake);
                        }
                    }
                }
            }
        }));
    }
}

/// The connection as a balancer's PROXY header tells it (the client it
/// names, or the balancer itself for its own checks; whether the client
/// spoke TLS to it), and the client's share of connections; why not when
/// the header is missing, bad or late, or the client is over its share:
/// the connection is then closed.
async fn from_balancer(
    stream: &mut tokio::net::TcpStream,
    balancer: SocketAddr,
    per_ip: &Arc<DashMap<IpAddr, usize>>,
    settings: &ListenerSettings,
) -> Result<(ConnInfo, PerIp), Dropped> {
    let read = tokio::time::timeout(
        settings.header_read_timeout,
        crate::proxy_header::read(stream),
    );
    let info = match read.await {
        Ok(Ok(crate::proxy_header::Accepted {
            client: Some(client),
            tls,
        })) => ConnInfo {
            peer: client,
            tls,
            anonymous: false,
        },
        Ok(Ok(_)) => ConnInfo {
            peer: balancer,
            tls: false,
            anonymous: true,
        },
        Ok(Err(e)) => {
            tracing::debug!(peer = %balancer, error = %e, "PROXY header refused");
            return Err(Dropped::ProxyHeader);
        }
        Err(_) => {
            tracing::debug!(peer = %balancer, "no PROXY header within header_read_timeout");
            return Err(Dropped::ProxyHeader);
        }
    };
    match PerIp::take(per_ip, info.peer.ip(), settings) {
        Some(held) => Ok((info, held)),
        None => {
            tracing::debug!(peer = %info.peer, "too many connections from this address");
            Err(Dropped::PerAddress)
        }
    }
}

async fn serve_connection<IO, H>(
    io: IO,
    info: ConnInfo,
    builder: &auto::Builder<Streams>,
    handler: Arc<H>,
    settings: &ListenerSettings,
    mut shutdown: watch::Receiver<bool>,
    hold: Arc<ConnectionHold>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = hold.activity.clone();
    // The first head is due from here: a TLS handshake or a PROXY header
    // has its own time, and must not use up the request's.
    activity
        .head_since
        .store(activity.now_ms() + 1, Ordering::Relaxed);
    let io = TokioIo::new(ActivityIo {
        inner: io,
        activity: activity.clone(),
        send_timeout: settings.send_timeout,
        stalled: None,
        sniffed: 0,
    });
    let service_activity = activity.clone();
    let max_headers = settings.max_headers;
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let handler = handler.clone();
        let busy = service_activity.begin_request();
        let h2 = req.version() == http::Version::HTTP_2;
        // HTTP/1's count is hyper's parser's (it answers 431 itself);
        // HTTP/2 has only a limit in bytes, under which hundreds of tiny
        // headers fit. Browsers send each cookie as a field of its own
        // over HTTP/2 (RFC 9113 8.2.3): they count as the one line they
        // are over HTTP/1.1.
        let too_many = h2 && {
            let cookies = req.headers().get_all(http::header::COOKIE).iter().count();
            req.headers().len() - cookies.saturating_sub(1) > max_headers
        };
        // A protocol upgrade may turn into a tunnel that outlives this
        // connection's serving: it takes the connection's hold along.
        if req.headers().contains_key(http::header::UPGRADE) {
            req.extensions_mut().insert(hold.clone());
        }
        if !h2 && !hyper::body::Body::is_end_stream(req.body()) {
            req.extensions_mut().insert(BodyComing {
                _busy: Arc::new(service_activity.busy()),
            });
        }
        async move {
            let resp = if too_many {
                too_many_headers()
            } else {
                handler.handle(req, info).await
            };
            // An HTTP/2 connection is idle by its streams alone: one
            // still sending its response body is busy.
            let resp = if h2 {
                let park = busy.0.park();
                resp.map(|body| {
                    crate::body::stream(Held {
                        body,
                        busy,
                        park,
                        rest: bytes::Bytes::new(),
                    })
                })
            } else {
                drop(busy);
                resp
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let idle = idle_expired(activity.clone(), settings.keepalive_timeout);
    tokio::pin!(idle);
    // HTTP/2's send_timeout: a stream parked on a client that never opens
    // its window. Ending it (hyper resets it) drops its upstream request
    // and its in-flight slot; the connection's other streams go on.
    // HTTP/1's header_read_timeout: a head begun and not whole.
    let every = (settings.send_timeout.min(settings.header_read_timeout) / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut stall_check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    stall_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining = *shutdown.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    let mut drain_began = Instant::now();
    let mut told_overdue = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                drain_began = Instant::now();
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle, if !draining => {
                draining = true;
                drain_began = Instant::now();
                conn.as_mut().graceful_shutdown();
            }
            // Whether the connection speaks HTTP/2 is known only once its
            // first bytes are read: until then, it is timed as HTTP/1.
            _ = stall_check.tick() => {
                // Closed without a word, as by hyper's own timer (and
                // nginx). Over HTTP/2 the first request only (its head
                // is not timed after that: `Activity::read`): a
                // connection that sent its preface, and then pings or a
                // head never finished, asks nothing, as an HTTP/1 one
                // that sends no whole head, and was kept for the
                // keep-alive.
                if activity.head_overdue(settings.header_read_timeout) {
                    // HTTP/2 is told first (GOAWAY): a request the client
                    // sends as the connection closes is then known as not
                    // taken, and safe to send again; a tick later the
                    // connection is closed whatever the client does.
                    if activity.by_streams.load(Ordering::Relaxed) && !told_overdue {
                        told_overdue = true;
                        if !draining {
                            draining = true;
                            drain_began = Instant::now();
                            conn.as_mut().graceful_shutdown();
                        }
                        continue;
                    }
                    tracing::debug!(peer = %info.peer, "no whole request head within header_read_timeout: connection closed");
                    return;
                }
                if !activity.by_streams.load(Ordering::Relaxed) {
                    continue;
                }
                if activity.end_stalled_streams(settings.send_timeout) {
                    tracing::debug!(peer = %info.peer, "an HTTP/2 client took no data of a response within send_timeout: connection closed");
                    return;
                }
                // Draining with no stream in flight, the connection should
                // end as soon as its last frames are out. What keeps it is
                // a body's last piece hyper took whole (the body gone, the
                // stream no longer watched) and the client's window never
                // lets out, while the client answers pings: for ever.
                if draining
                    && activity.in_flight.load(Ordering::Relaxed) == 0
                    && drain_began.max(activity.last()).elapsed() >= settings.send_timeout
                {
                    tracing::debug!(peer = %info.peer, "an HTTP/2 connection draining with data its client never took within send_timeout: closed");
                    return;
                }
            }
        }
    }
}

/// What an open connection holds: its place under `max_connections` and
/// its address's limit, the open-connections gauge, its activity. A
/// WebSocket tunnel outlives the HTTP serving of its connection (hyper
/// hands the socket over and returns): it takes the hold along, so the
/// connection stays counted, the graceful drain waits for it, and it
/// ends after `keepalive_timeout` without a byte either way.
pub struct ConnectionHold {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _per_ip: PerIp,
    /// Keeps `varco_open_connections` true even when a task ends early.
    _open: Option<crate::metrics::Counted>,
    tracker: TaskTracker,
    /// Cut at the end of the grace, as the connection it came from.
    close: CancellationToken,
    activity: Arc<Activity>,
    idle: Duration,
}

impl ConnectionHold {
    /// Runs an upgraded connection's tunnel under this hold.
    pub fn spawn_tunnel<F>(self: Arc<Self>, tunnel: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = tunnel => {}
                () = idle_expired(self.activity.clone(), self.idle) => {
                    tracing::debug!("an upgraded connection idle for keepalive_timeout closed");
                }
                () = self.close.cancelled() => {}
            }
            drop(self);
        });
    }
}

/// One connection counted against its address; released on drop. Entries
/// at zero are removed, so the map holds only addresses with connections.
struct PerIp {
    map: Option<(Arc<DashMap<IpAddr, usize>>, IpAddr)>,
}

impl PerIp {
    fn take(map: &Arc<DashMap<IpAddr, usize>>, ip: IpAddr, s: &ListenerSettings) -> Option<PerIp> {
        if s.max_connections_per_ip == 0 || crate::proxy::headers::is_trusted(ip, &s.exempt) {
            return Some(PerIp { map: None });
        }
        let ip = crate::proxy::headers::limit_key(ip);
        let mut n = map.entry(ip).or_insert(0);
        if *n >= s.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(PerIp {
            map: Some((map.clone(), ip)),
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        if let Some((map, ip)) = self.map.take() {
            map.remove_if_mut(&ip, |_, n| {
                *n -= 1;
                *n == 0
            });
        }
    }
}

/// When a connection last moved bytes and how many requests it is working
/// on: the keep-alive idle timeout closes only connections with neither.
///
/// HTTP/2 counts requests only: its bytes include PINGs and SETTINGS, which
/// a client can send forever to hold a connection (and its place under
/// `max_connections`) without asking for anything.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    by_streams: AtomicBool,
    /// When the request head being read began (its first bytes; for the
    /// first request, when serving began), in ms of the epoch plus one;
    /// 0: none.
    head_since: AtomicU64,
    /// When bytes last went out, in ms of the epoch.
    wrote_ms: AtomicU64,
    /// The HTTP/2 response bodies being sent, each with when it last
    /// handed hyper a frame that hyper has not come back for.
    parks: std::sync::Mutex<Vec<std::sync::Weak<Park>>>,
}

/// When an HTTP/2 response body last gave hyper a frame, in ms of the
/// connection's epoch plus one (0: hyper has come back for the next one).
/// hyper asks for the next frame only once the client's flow-control
/// window takes the last: a client that never opens it leaves the body
/// parked, holding its in-flight slot and its upstream request, while the
/// socket (no bytes to write) never looks stalled.
/// With the stream's own end (`STREAM`), so a stream parked past
/// `send_timeout` ends alone.
#[derive(Default)]
struct Park(AtomicU64, Option<CancellationToken>);

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            by_streams: AtomicBool::new(false),
            // Due from the accept until serving begins (see
            // `serve_connection`), as with nginx's client_header_timeout.
            head_since: AtomicU64::new(1),
            wrote_ms: AtomicU64::new(0),
            parks: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn park(&self) -> Arc<Park> {
        let stream = STREAM.try_with(CancellationToken::clone).ok();
        let park = Arc::new(Park(AtomicU64::new(0), stream));
        let mut parks = self.parks.lock().unwrap_or_else(|e| e.into_inner());
        parks.retain(|p| p.strong_count() > 0);
        parks.push(Arc::downgrade(&park));
        park
    }

    /// Ends each HTTP/2 stream whose response body has waited `timeout`
    /// for the client to take a frame (nginx's send_timeout, per stream):
    /// a download paused in one tab must not cut the form another tab is
    /// sending on the same connection. True when the connection must go:
    /// a stream cannot be ended alone, or every stream in flight is
    /// stalled (a client that takes nothing at all would otherwise open
    /// stream after stream, each an upstream request held for `timeout`,
    /// on a connection that never ends).
    fn end_stalled_streams(&self, timeout: Duration) -> bool {
        let now = self.now_ms();
        let limit = timeout.as_millis() as u64;
        let mut parks = self.parks.lock().unwrap_or_else(|e| e.into_inner());
        parks.retain(|p| p.strong_count() > 0);
        let stalled: Vec<Arc<Park>> = parks
            .iter()
            .filter_map(|p| p.upgrade())
            .filter(|p| {
                let since = p.0.load(Ordering::Relaxed);
                since != 0 && now.saturating_sub(since - 1) >= limit
            })
            .collect();
        if stalled.is_empty() {
            return false;
        }
        if stalled.len() >= self.in_flight.load(Ordering::Relaxed)
            || stalled.iter().any(|p| p.1.is_none())
        {
            return true;
        }
        for p in &stalled {
            if let Some(stream) = &p.1 {
                stream.cancel();
            }
        }
        tracing::debug!(
            streams = stalled.len(),
            "HTTP/2 streams whose client took no data within send_timeout: reset"
        );
        false
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Bytes came in. Over HTTP/1, with no request in flight, they begin
    /// the next request's head: due within `header_read_timeout` from
    /// them, not from the end of the last answer (hyper's own timer
    /// counts from there, which cut every keep-alive at the header
    /// timeout).
    fn read(&self) {
        if self.by_streams.load(Ordering::Relaxed) {
            return;
        }
        self.touch();
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        if self.by_streams.load(Ordering::Relaxed) {
            return;
        }
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        self.wrote_ms.store(now, Ordering::Relaxed);
    }

    /// Whether a request head begun has taken `limit` without an answer
    /// going out meanwhile (a pipelined head waits for a download before
    /// it).
    fn head_overdue(&self, limit: Duration) -> bool {
        let since = self.head_since.load(Ordering::Relaxed);
        if since == 0 {
            return false;
        }
        let from = (since - 1).max(self.wrote_ms.load(Ordering::Relaxed));
        self.now_ms().saturating_sub(from) >= limit.as_millis() as u64
    }

    fn begin_request(self: &Arc<Self>) -> InFlight {
        self.head_since.store(0, Ordering::Relaxed);
        self.busy()
    }

    fn busy(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

struct InFlight(Arc<Activity>);

/// An HTTP/1 request whose body is still coming in (a request's
/// extension): its connection stays busy, so the body's bytes are not
/// taken for the next request's head, until the body is whole or let go.
/// Over HTTP/1 a request is otherwise done once its answer's head is out,
/// and a portal may answer before an upload ends.
#[derive(Clone)]
pub struct BodyComing {
    _busy: Arc<InFlight>,
}

pin_project! {
    /// A request body that keeps its `BodyComing` until it ends.
    pub struct WhileComing<B> {
        #[pin]
        body: B,
        coming: Option<BodyComing>,
    }
}

impl<B> WhileComing<B> {
    pub fn new(body: B, coming: Option<BodyComing>) -> Self {
        WhileComing { body, coming }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for WhileComing<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.body.poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            *this.coming = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The most of a body hyper is handed at once over HTTP/2. hyper asks for
/// more only once the client's window has taken all it was handed, so
/// the time a body stays parked is the time the client takes this much:
/// `send_timeout` then means what it means for HTTP/1 (and nginx), a
/// client that takes almost nothing, not one that takes a 400 KB chunk
/// slowly.
const H2_PIECE: usize = 16 * 1024;

pin_project! {
    /// An HTTP/2 response body that keeps its stream counted as in flight
    /// until it is sent (or dropped with its stream), hands it to hyper in
    /// pieces, and says when it is parked on the client's flow-control
    /// window.
    struct Held {
        #[pin]
        body: Body,
        busy: InFlight,
        park: Arc<Park>,
        // What is left of a frame larger than a piece.
        rest: bytes::Bytes,
    }
}

impl hyper::body::Body for Held {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        this.park.0.store(0, Ordering::Relaxed);
        let frame = if this.rest.is_empty() {
            match this.body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) if data.len() > H2_PIECE => {
                        *this.rest = data.split_off(H2_PIECE);
                        hyper::body::Frame::data(data)
                    }
                    Ok(data) => hyper::body::Frame::data(data),
                    Err(frame) => frame,
                },
                other => return other,
            }
        } else {
            let at = this.rest.len().min(H2_PIECE);
            hyper::body::Frame::data(this.rest.split_to(at))
        };
        let now = this.busy.0.now_ms();
        this.park.0.store(now + 1, Ordering::Relaxed);
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.body.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn idle_expired(activity: Arc<Activity>, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        if Instant::now() < deadline {
            tokio::time::sleep_until(deadline.into()).await;
            continue;
        }
        if activity.in_flight.load(Ordering::Relaxed) == 0 {
            return;
        }
        // A request is still being worked on (e.g. a slow upstream).
        tokio::time::sleep(timeout).await;
    }
}

pin_project! {
    /// The connection's bytes: marks activity for the idle timeout, and
    /// ends a write that makes no progress for `send_timeout` (a client
    /// that stopped reading a response would otherwise hold the
    /// connection, and its upstream request, forever; the idle timeout
    /// does not apply while a request is in flight).
    struct ActivityIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        send_timeout: Duration,
        // Armed when a write first finds the socket full.
        stalled: Option<Pin<Box<tokio::time::Sleep>>>,
        // How many bytes of the HTTP/2 preface the connection began with
        // so far; SNIFFED once it is known either way.
        sniffed: u8,
    }
}

/// The HTTP/2 connection preface (in clear with prior knowledge, or
/// inside TLS after ALPN alike), whole: what hyper-util's auto server
/// also compares before it serves HTTP/2. Its first four bytes alone
/// (`PRI `) would let `PRI /x HTTP/1.1`, served as HTTP/1, out of the
/// timing of its head.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SNIFFED: u8 = u8::MAX;

/// Looks at a connection's next bytes for the HTTP/2 preface; a slow client
/// may send it a byte at a time.
fn sniff(sniffed: &mut u8, bytes: &[u8], activity: &Activity) {
    let at = *sniffed as usize;
    let n = bytes.len().min(H2_PREFACE.len() - at);
    if bytes[..n] != H2_PREFACE[at..at + n] {
        *sniffed = SNIFFED;
    } else if at + n == H2_PREFACE.len() {
        *sniffed = SNIFFED;
        activity.by_streams.store(true, Ordering::Relaxed);
    } else {
        *sniffed = (at + n) as u8;
    }
}

/// Disarms on progress; on a blocked write, arms the timer (once) and
/// fails the write when it fires.
fn watch_write<R>(
    stalled: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    send_timeout: Duration,
    cx: &mut Context<'_>,
    r: Poll<io::Result<R>>,
) -> Poll<io::Result<R>> {
    if r.is_ready() {
        *stalled = None;
        return r;
    }
    let timer = stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no data within send_timeout",
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<T: AsyncRead> AsyncRead for ActivityIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if *this.sniffed != SNIFFED {
                sniff(this.sniffed, &buf.filled()[before..], this.activity);
            }
            this.activity.read();
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for ActivityIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        watch_write(this.stalled, *this.send_timeout, cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote();
        }
        watch_write(this.stalled, *this.send_timeout, cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        watch_write(this.stalled, *this.send_timeout, cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Over TLS, closing writes: what the TLS layer still holds, then
        // its close_notify. A client that stopped reading would hold a
        // closing connection for ever.
        let this = self.project();
        let r = this.inner.poll_shutdown(cx);
        watch_write(this.stalled, *this.send_timeout, cx, r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// A connection a PROXY header left unnamed is its balancer's, read
    /// as IPv4 when a dual-stack listener gives it mapped, as every
    /// other client address is.
    #[test]
    fn an_unnamed_client_on_a_dual_stack_listener_is_read_as_ipv4() {
        let conn = ConnInfo {
            peer: "[::ffff:10.0.0.7]:443".parse().unwrap(),
            tls: false,
            anonymous: true,
        };
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = conn.client(
            &http::HeaderMap::new(),
            &trusted,
            crate::proxy::headers::ClientHeader::default(),
        );
        assert_eq!(ip, "10.0.0.7".parse::<IpAddr>().unwrap());
    }

    /// A TLS connection whose client stopped reading, closed while its
    /// TLS layer still holds bytes the socket cannot take: the close
    /// fails after send_timeout instead of waiting for ever.
    #[tokio::test]
    async fn a_close_that_cannot_be_sent_ends_after_send_timeout() {
        crate::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], private)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // The client finishes its handshake and then reads nothing.
        let reader = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tls);
        });
        let (tcp, _) = l.accept().await.unwrap();
        let mut tls = tokio_rustls::TlsAcceptor::from(Arc::new(server))
            .accept(tcp)
            .await
            .unwrap();
        // Fill the socket, and the TLS layer behind it.
        let chunk = vec![0u8; 1 << 20];
        let filled = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                tls.write_all(&chunk).await.unwrap();
            }
        })
        .await;
        assert!(filled.is_err(), "the client's socket never filled");

        let mut io = ActivityIo {
            inner: tls,
            activity: Arc::new(Activity::new()),
            send_timeout: Duration::from_millis(300),
            stalled: None,
            sniffed: 0,
        };
        let closed = tokio::time::timeout(Duration::from_secs(10), io.shutdown()).await;
        let error = closed
            .expect("the close waited past send_timeout")
            .expect_err("nothing could be sent");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        reader.abort();
    }
}
