//! The config file as written: serde structs that mirror the TOML, with
//! every default a named constant. Nothing here is validated; `validate.rs`
//! turns these into a [`super::Config`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Loopback by default: exposing a proxy must be a decision, not an accident.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Loopback by default: the admin API changes rooms live.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// HAProxy's and nginx's order of magnitude; past this, accepting more only
/// trades one slow connection for many.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// nginx allows 4 x 8 KiB header buffers; 32 KiB fits any real browser
/// request with cookies while bounding what a client can make us hold.
pub const DEFAULT_MAX_HEADER_SIZE: &str = "32KiB";
/// Envoy's default `max_headers_count`.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Uploads of scanned documents fit; a client cannot stream gigabytes at the
/// portal unless the operator raises it.
pub const DEFAULT_MAX_BODY_SIZE: &str = "100MiB";
/// hyper's and nginx's order (30-60 s): long enough for a phone on a bad
/// network, short enough that slowloris cannot hold connections.
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "30s";
/// nginx's `client_body_timeout` is 60 s between reads; 30 s is ample for
/// a phone, and bounds a client that stops sending half-way.
pub const DEFAULT_BODY_READ_TIMEOUT: &str = "30s";
/// Connections one address may hold open at once. Generous: many citizens
/// share one address behind a carrier's NAT; trusted proxies are exempt.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 256;
/// nginx's `send_timeout`: a client that takes nothing of a response for
/// this long is gone, or is holding the connection on purpose (slow read).
pub const DEFAULT_SEND_TIMEOUT: &str = "60s";
/// nginx's `keepalive_timeout`.
pub const DEFAULT_KEEPALIVE_TIMEOUT: &str = "75s";
/// A TLS handshake is a few round trips; 10 s covers a slow phone link.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: &str = "10s";
/// Below Kubernetes' default 30 s termination grace, so varco exits on its
/// own before it is killed.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "25s";
/// Envoy's default connect timeout; nginx's 60 s is far too long to notice
/// a dead upstream on a click day.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// nginx's `proxy_read_timeout`: time allowed for the response headers.
pub const DEFAULT_RESPONSE_TIMEOUT: &str = "60s";
/// Kept at or below common upstream keep-alive timeouts (nginx 75 s, Apache
/// 5-15 s is the odd one out) so varco rarely reuses a connection the
/// upstream is closing.
pub const DEFAULT_POOL_IDLE_TIMEOUT: &str = "30s";
/// nginx's `keepalive 32` per worker, times a few workers.
pub const DEFAULT_POOL_MAX_IDLE: usize = 128;
/// Scanned documents and every form fit: read whole, an upload on a slow
/// line holds varco's memory instead of a portal connection.
pub const DEFAULT_REQUEST_BUFFER: &str = "1MiB";
/// Hundreds of uploads at once, a small share of a server's memory; past
/// it bodies stream (as nginx with buffering off), never refused.
pub const DEFAULT_REQUEST_BUFFER_MEMORY: &str = "256MiB";
/// A megabyte in a minute is a slow phone line; a body not whole by then
/// would hold its memory for the rest of its upload, which may be long.
pub const DEFAULT_REQUEST_BUFFER_TIME: &str = "60s";
/// How long an upstream that failed `max_fails` requests is skipped (as
/// nginx's `fail_timeout`): a restart's length, not a deploy's.
pub const DEFAULT_FAIL_COOLDOWN: &str = "10s";
/// nginx's default: one failed request cools an upstream down, the
/// quickest way to stop sending people to a server that is gone.
pub const DEFAULT_MAX_FAILS: u32 = 1;
/// More than this many failures in a row is a server that is down; the
/// health checks are the tool for tolerance beyond it.
pub const MAX_MAX_FAILS: u32 = 100;
/// A pass ends after this long without a request: long enough to read a
/// form, short enough that a person who left frees the slot soon.
pub const DEFAULT_SESSION_IDLE: &str = "5m";
/// The waiting page polls every 10-30 s; a minute covers a few missed
/// polls (a phone changing networks) before the slot is given back.
pub const DEFAULT_CLAIM_WINDOW: &str = "60s";
/// A ticket outlives any realistic click-day queue.
pub const DEFAULT_TICKET_TTL: &str = "24h";
pub const DEFAULT_MODE: &str = "queue";
pub const DEFAULT_LANGUAGE: &str = "it";
/// Many citizens share one address behind a mobile carrier's NAT: limits
/// per address must be generous, and only stop scripts.
pub const DEFAULT_TICKETS_PER_IP_PER_MINUTE: u32 = 120;
/// A waiting page polls 2-6 times a minute; 1200 covers hundreds of
/// people behind one NAT.
pub const DEFAULT_STATUS_PER_IP_PER_MINUTE: u32 = 1200;
/// One admission tick a second: fine-grained enough that the rate per
/// minute is smooth, coarse enough to cost nothing.
pub const DEFAULT_TICK: &str = "1s";
/// Counters saved every few seconds: a crash loses at most this much
/// (tickets issued in that span are re-numbered later, never lost).
pub const DEFAULT_SNAPSHOT_INTERVAL: &str = "5s";
/// A few ticks: a dead leader's room stands still for at most this long.
pub const DEFAULT_LEASE: &str = "3s";
/// Adaptive admission backs off when more than 1% of upstream answers fail.
pub const DEFAULT_ADAPTIVE_MAX_ERROR_RATE: f64 = 0.01;
/// p90: the slow tail a crowd notices, with samples enough to be stable
/// over a few seconds.
pub const DEFAULT_ADAPTIVE_PERCENTILE: f64 = 0.9;
/// Admitted people reach the portal within a second or two; deciding more
/// often would react to load the last change has not yet caused.
pub const DEFAULT_ADAPTIVE_INTERVAL: &str = "2s";
/// Each overloaded interval cuts the rate to 70%: TCP Reno halves, which
/// leaves a waiting room idle too long; 0.7 reaches half in two steps.
pub const DEFAULT_ADAPTIVE_BACKOFF: f64 = 0.7;
/// The additive step, as a fraction of (max - min): from min to max in 20
/// healthy intervals.
pub const DEFAULT_ADAPTIVE_STEP_FRACTION: f64 = 0.05;
/// Past the in-flight limit, an admitted person's request waits this long
/// for a free slot before a 503: a click, not a timeout.
pub const DEFAULT_IN_FLIGHT_WAIT: &str = "3s";
/// HAProxy's `inter` is 2 s; a portal's health page is often not free,
/// and a click day's portal is busy enough.
pub const DEFAULT_HEALTH_INTERVAL: &str = "5s";
/// A pass's burst over its rate: seconds' worth of requests.
pub const DEFAULT_SESSION_BURST_SECONDS: u32 = 5;
pub const DEFAULT_HEALTH_TIMEOUT: &str = "2s";
/// HAProxy's defaults: three failures out, two successes back.
pub const DEFAULT_HEALTH_FALL: u32 = 3;
pub const DEFAULT_HEALTH_RISE: u32 = 2;
/// Requests that may wait for an in-flight slot, as a multiple of the limit.
pub const DEFAULT_IN_FLIGHT_QUEUE_FACTOR: usize = 4;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub secrets: RawSecrets,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub rooms: BTreeMap<String, RawRoom>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    /// The admission log: append-only, hash-chained, one JSON record per
    /// line, written (and fsynced) by the node that advances the counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// A TOML file with `[[tokens]] id = "anna" token = "..."`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<String>,
    /// An environment variable holding `id:token,id:token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_env: Option<String>,
}

impl RawAdmin {
    /// Whether the file says where admin tokens come from: without it, the
    /// tokens in force were made up at start (`varco demo`), or are none.
    pub fn names_tokens(&self) -> bool {
        self.tokens_file.is_some() || self.tokens_env.is_some()
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSecrets {
    /// A TOML file with `[[keys]] id = "..." secret = "base64"`; the last
    /// key signs, all verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// An environment variable holding `id:base64,id:base64` (last signs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// A random key made at start (the demo): tickets die with the process.
    pub ephemeral: bool,
    /// A file holding the base64 key that signs `X-Varco-Arrival` for the
    /// portal (a different key from the ticket keys: the portal gets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_key_file: Option<String>,
    /// An environment variable holding that key, in base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_key_env: Option<String>,
}

impl RawSecrets {
    /// Whether the keys are made up at start (`ephemeral`, or none given):
    /// nothing a reload or a restart could keep signs with them.
    pub fn keys_made_up(&self) -> bool {
        self.key_file.is_none() && self.key_env.is_none()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// "memory" (one node) or "redis" (many nodes).
    pub kind: String,
    /// Redis URL, e.g. "redis://:password@10.0.0.9:6379/0".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding that URL (its password kept out of the config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<String>,
    /// An environment variable holding that URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// Prefix of every Redis key varco writes.
    pub prefix: String,
    /// PEM root certificate(s) that sign the Redis server's certificate,
    /// for a rediss:// URL; without it, the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// How long the node advancing the counters holds its lease; another
    /// node takes over within this after it dies.
    pub lease: String,
    /// Where the memory store snapshots its counters; none: not saved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    pub snapshot_interval: String,
    pub tick: String,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: "memory".into(),
            url: None,
            url_file: None,
            url_env: None,
            prefix: "varco:".into(),
            tls_ca: None,
            lease: DEFAULT_LEASE.into(),
            snapshot: None,
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL.into(),
            tick: DEFAULT_TICK.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: String,
    pub admin_listen: String,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTlsList>,
    /// Peers whose X-Forwarded-* headers are believed (load balancers).
    pub trusted_proxies: Vec<String>,
    /// Which header `trusted_proxies` name the client in:
    /// `x-forwarded-for` or `forwarded`.
    pub client_address_header: String,
    /// The public listener expects a PROXY protocol header (v1 or v2)
    /// from each connection, sent by one of `trusted_proxies`.
    pub proxy_protocol: bool,
    /// Every public connection is HTTPS for the person: a balancer in
    /// front ends TLS without saying so.
    pub assume_https: bool,
    pub max_connections: usize,
    pub max_header_size: String,
    pub max_headers: usize,
    pub max_body_size: String,
    pub header_read_timeout: String,
    pub body_read_timeout: String,
    pub max_connections_per_ip: usize,
    pub keepalive_timeout: String,
    pub send_timeout: String,
    pub tls_handshake_timeout: String,
    pub shutdown_grace: String,
    /// After SIGTERM, how long `/readyz` says 503 while varco still
    /// accepts, so load balancers stop sending first ("0s": none).
    pub shutdown_delay: String,
    /// Each request gets an `X-Request-Id` (a trusted proxy's is kept).
    pub request_id: bool,
    /// A trusted proxy's `X-Request-Id` is kept (false: a balancer that
    /// passes the client's on as it came).
    pub request_id_from_proxies: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: DEFAULT_LISTEN.into(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            workers: 0,
            tls: None,
            trusted_proxies: Vec::new(),
            client_address_header: "x-forwarded-for".into(),
            proxy_protocol: false,
            assume_https: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_size: DEFAULT_MAX_HEADER_SIZE.into(),
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_size: DEFAULT_MAX_BODY_SIZE.into(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT.into(),
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT.into(),
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT.into(),
            send_timeout: DEFAULT_SEND_TIMEOUT.into(),
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT.into(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE.into(),
            shutdown_delay: "0s".into(),
            request_id: true,
            request_id_from_proxies: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

/// `server.tls`: one certificate (a table), or several chosen by the name
/// the client asks for (an array of tables, the first the default).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RawTlsList {
    One(RawTls),
    Several(Vec<RawTls>),
}

impl RawTlsList {
    /// Each certificate with the key an error about it names.
    pub fn entries(&self) -> Vec<(String, &RawTls)> {
        match self {
            RawTlsList::One(t) => vec![("server.tls".into(), t)],
            RawTlsList::Several(v) => v
                .iter()
                .enumerate()
                .map(|(i, t)| (format!("server.tls[{i}]"), t))
                .collect(),
        }
    }
}

// By hand rather than `untagged`: serde's untagged enums drop the inner
// error ("unknown field `crt`") for a vague "did not match any variant".
impl<'de> Deserialize<'de> for RawTlsList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawTlsList;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table { cert, key } or an array of such tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<RawTlsList, A::Error> {
                RawTls::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(RawTlsList::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, s: A) -> Result<RawTlsList, A::Error> {
                Vec::<RawTls>::deserialize(serde::de::value::SeqAccessDeserializer::new(s))
                    .map(RawTlsList::Several)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub connect_timeout: String,
    pub response_timeout: String,
    pub pool_idle_timeout: String,
    pub pool_max_idle: usize,
    pub fail_cooldown: String,
    /// Failed requests that cool an upstream down (see `PassiveHealth`);
    /// 0: never.
    pub max_fails: u32,
    /// Request bodies up to this size are read whole before an upstream
    /// is asked; "0" streams every body.
    pub request_buffer: String,
    /// What all bodies being read whole may hold together.
    pub request_buffer_memory: String,
    /// How long a body may take to be read whole; past it, it streams.
    pub request_buffer_time: String,
    /// A PEM file of the root(s) that sign https upstreams' certificates
    /// (a private CA); without it, the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// The certificate and key varco shows https upstreams that ask for
    /// one (mutual TLS: the portal lets only varco in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client: Option<RawTls>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT.into(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT.into(),
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT.into(),
            pool_max_idle: DEFAULT_POOL_MAX_IDLE,
            fail_cooldown: DEFAULT_FAIL_COOLDOWN.into(),
            max_fails: DEFAULT_MAX_FAILS,
            request_buffer: DEFAULT_REQUEST_BUFFER.into(),
            request_buffer_memory: DEFAULT_REQUEST_BUFFER_MEMORY.into(),
            request_buffer_time: DEFAULT_REQUEST_BUFFER_TIME.into(),
            tls_ca: None,
            tls_client: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    /// "text" (human-readable) or "json".
    pub format: String,
    /// A tracing filter such as "info" or "varco=debug,hyper=warn".
    pub level: String,
    /// One line per request on the `varco::access` target.
    pub access: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".into(),
            level: "info".into(),
            access: true,
        }
    }
}

/// One of a room's `upstreams`: its URL, or `{ url, weight }` for a
/// server that takes more of the room's requests than the others.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RawUpstreamEntry {
    Url(String),
    Weighted(RawWeighted),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeighted {
    pub url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// An upstream's weight when none is given: all take equal turns.
pub const DEFAULT_WEIGHT: u32 = 1;
/// As HAProxy's 256 and nginx's practice: a ratio finer than 1 to 100
/// between two servers of one portal says nothing a load balancer can
/// keep, and the rotation is laid out once per reload in that many turns.
pub const MAX_WEIGHT: u32 = 100;

impl RawUpstreamEntry {
    pub fn url(&self) -> &str {
        match self {
            RawUpstreamEntry::Url(u) => u,
            RawUpstreamEntry::Weighted(w) => &w.url,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            RawUpstreamEntry::Url(_) => DEFAULT_WEIGHT,
            RawUpstreamEntry::Weighted(w) => w.weight,
        }
    }
}

// By hand for the same reason as `RawTlsList`: an unknown field in the
// table is named, not "did not match any variant".
impl<'de> Deserialize<'de> for RawUpstreamEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawUpstreamEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a URL (\"http://10.0.0.5:8000\") or a table { url, weight }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawUpstreamEntry, E> {
                Ok(RawUpstreamEntry::Url(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<RawUpstreamEntry, A::Error> {
                RawWeighted::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(RawUpstreamEntry::Weighted)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoom {
    pub upstreams: Vec<RawUpstreamEntry>,
    #[serde(default = "default_hosts")]
    pub hosts: Vec<String>,
    #[serde(default = "default_paths")]
    pub paths: Vec<String>,
    /// Match `paths` without regard to case, for a portal that reads
    /// paths so (IIS, ASP.NET): `/BONUS/apply` is then this room's.
    #[serde(default)]
    pub paths_ignore_case: bool,
    /// Send the client's Host to the upstream (true) or the upstream's own
    /// authority (false).
    #[serde(default = "default_true")]
    pub preserve_host: bool,
    /// The name an https upstream is asked for (SNI) and its certificate
    /// checked against, instead of the host in its URL (nginx's
    /// `proxy_ssl_name`): an upstream reached by address, certified by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
    /// This room's `upstream.response_timeout`: a portal whose pages
    /// differ (a PDF made on the spot, a login) needs its own, and a
    /// reload changes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_per_minute: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_active: Option<u64>,
    #[serde(default = "default_session_idle")]
    pub session_idle: String,
    #[serde(default = "default_claim_window")]
    pub claim_window: String,
    #[serde(default = "default_ticket_ttl")]
    pub ticket_ttl: String,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bypass: Option<RawBypass>,
    #[serde(default)]
    pub exempt_paths: Vec<String>,
    /// Login detours (an OIDC callback, a SAML ACS): never queued for a
    /// person holding a ticket or a pass.
    #[serde(default)]
    pub flow_paths: Vec<String>,
    /// How long after a pass lapsed a login callback still brings it back.
    #[serde(default = "default_flow_window")]
    pub flow_window: String,
    /// After the portal fails an admitted person (5xx, no answer): how much
    /// longer their pass lives, and how long after it lapses they may
    /// still come back ahead of the queue.
    #[serde(default = "default_failure_grace")]
    pub failure_grace: String,
    /// Re-entries after portal failures one pass may use (0: none).
    #[serde(default = "default_max_reentries")]
    pub max_reentries: u64,
    /// Returns by a `flow_paths` callback one pass may use (0: none).
    #[serde(default = "default_max_flow_returns")]
    pub max_flow_returns: u64,
    /// Waiting page language when Accept-Language names neither it nor en.
    #[serde(default = "default_language")]
    pub language: String,
    /// SameSite of varco's cookies: "lax", or "none" (under HTTPS) for a
    /// login whose identity provider posts back across sites.
    #[serde(default = "default_cookie_same_site")]
    pub cookie_same_site: String,
    /// An operator's own waiting page template (see README).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_template: Option<String>,
    /// An operator's own template for varco's error pages (see README).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_template: Option<String>,
    #[serde(default)]
    pub per_ip: RawPerIp,
    /// A cap on each admitted person's requests (a script holding a pass
    /// would otherwise take the portal's capacity from everyone else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<RawPerSession>,
    /// Adaptive admission: the rate follows the portal's health.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<RawAdaptive>,
    /// A cap on requests at once towards the upstreams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<RawInFlight>,
    /// Lanes sharing the room's admission rate by weight.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lanes: BTreeMap<String, RawLane>,
    /// Active health checks of the upstreams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
}

/// HAProxy's `check` with `inter`, `timeout check`, `fall` and `rise`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// What each upstream is asked for (GET): 2xx or 3xx is healthy.
    pub path: String,
    #[serde(default = "default_health_interval")]
    pub interval: String,
    /// Default: DEFAULT_HEALTH_TIMEOUT, or the interval if shorter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The Host the checks name (default: the upstream's address), for
    /// an upstream that serves several sites by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Failed checks in a row that take an upstream out of rotation.
    #[serde(default = "default_health_fall")]
    pub fall: u32,
    /// Passed checks in a row that bring it back.
    #[serde(default = "default_health_rise")]
    pub rise: u32,
    /// The statuses that pass (HAProxy's `http-check expect status`):
    /// without it any 2xx or 3xx, and a redirect to a login page passes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<Vec<u16>>,
    /// Once the checks bring an upstream back, its share of requests
    /// grows from nothing to full over this long (HAProxy's `slowstart`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLane {
    /// Its share of the room's admission rate (weights are relative).
    pub weight: f64,
    /// Client addresses that belong to this lane.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
    /// A header that puts a request in this lane when it carries the
    /// secret (or, with `signed`, a token signed with the secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// The header holds an HS256 token signed with the secret (audience
    /// `varco:lane:ROOM:LANE`, with `exp`), not the secret itself.
    #[serde(default)]
    pub signed: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdaptive {
    pub min_per_minute: f64,
    pub max_per_minute: f64,
    pub target_latency: String,
    #[serde(default = "default_max_error_rate")]
    pub max_error_rate: f64,
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    #[serde(default = "default_adaptive_interval")]
    pub interval: String,
    /// Default: (max - min) x DEFAULT_ADAPTIVE_STEP_FRACTION.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_per_minute: Option<f64>,
    #[serde(default = "default_backoff")]
    pub backoff: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawInFlight {
    pub limit: usize,
    /// Default: limit x DEFAULT_IN_FLIGHT_QUEUE_FACTOR.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    #[serde(default = "default_in_flight_wait")]
    pub wait: String,
    /// With the room's `adaptive`: `limit` is the ceiling, and the limit
    /// in force follows the same signals as the rate.
    #[serde(default)]
    pub adaptive: bool,
    /// The most slots one pass's session holds at once; none: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_session: Option<usize>,
}

fn default_max_error_rate() -> f64 {
    DEFAULT_ADAPTIVE_MAX_ERROR_RATE
}

fn default_percentile() -> f64 {
    DEFAULT_ADAPTIVE_PERCENTILE
}

fn default_adaptive_interval() -> String {
    DEFAULT_ADAPTIVE_INTERVAL.into()
}

fn default_backoff() -> f64 {
    DEFAULT_ADAPTIVE_BACKOFF
}

fn default_health_interval() -> String {
    DEFAULT_HEALTH_INTERVAL.into()
}

fn default_health_fall() -> u32 {
    DEFAULT_HEALTH_FALL
}

fn default_health_rise() -> u32 {
    DEFAULT_HEALTH_RISE
}

fn default_in_flight_wait() -> String {
    DEFAULT_IN_FLIGHT_WAIT.into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBypass {
    #[serde(default)]
    pub cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// The header's secret value, from a file...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// ...or from an environment variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPerSession {
    pub requests_per_second: u32,
    /// Default: DEFAULT_SESSION_BURST_SECONDS seconds' worth (a page
    /// with its assets, a form and its redirect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPerIp {
    pub tickets_per_minute: u32,
    pub status_per_minute: u32,
}

impl Default for RawPerIp {
    fn default() -> Self {
        RawPerIp {
            tickets_per_minute: DEFAULT_TICKETS_PER_IP_PER_MINUTE,
            status_per_minute: DEFAULT_STATUS_PER_IP_PER_MINUTE,
        }
    }
}

fn default_session_idle() -> String {
    DEFAULT_SESSION_IDLE.into()
}

fn default_claim_window() -> String {
    DEFAULT_CLAIM_WINDOW.into()
}

fn default_ticket_ttl() -> String {
    DEFAULT_TICKET_TTL.into()
}

fn default_mode() -> String {
    DEFAULT_MODE.into()
}

fn default_language() -> String {
    DEFAULT_LANGUAGE.into()
}

fn default_cookie_same_site() -> String {
    "lax".into()
}

fn default_hosts() -> Vec<String> {
    vec!["*".into()]
}

fn default_paths() -> Vec<String> {
    vec!["/".into()]
}

fn default_flow_window() -> String {
    "10m".into()
}

fn default_failure_grace() -> String {
    "2m".into()
}

fn default_max_reentries() -> u64 {
    2
}

fn default_max_flow_returns() -> u64 {
    2
}

fn default_true() -> bool {
    true
}
