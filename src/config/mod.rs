//! Configuration: the file as written ([`file`]), its units ([`units`]),
//! and the validated [`Config`] the rest of varco reads ([`validate`]).

pub mod file;
pub mod units;
pub mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;

pub use file::RawConfig;

use crate::room::admission::Mode;
use crate::room::token::Keyring;

/// The demo default, embedded so `varco demo` needs no file on disk.
pub const DEMO_CONFIG: &str = include_str!("../../config/varco.toml");

/// The demo config with its portal room sent to `portal` (`varco demo
/// --portal-listen`), where the embedded file says 127.0.0.1:9001.
pub fn demo_config(portal: std::net::SocketAddr) -> String {
    DEMO_CONFIG.replace(
        "upstreams = [\"http://127.0.0.1:9001\"]",
        &format!("upstreams = [\"http://{portal}\"]"),
    )
}

/// A validated configuration: every value parsed, every default applied.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    /// Signing keys for tickets and passes.
    pub keys: Keyring,
    /// Bearer tokens for the admin API, by id (who made a change).
    pub admin_tokens: Vec<AdminToken>,
    pub rooms: Vec<RoomConfig>,
    /// The admission log's file, if any.
    pub audit_log: Option<PathBuf>,
    /// The key that signs `X-Varco-Arrival`, if the portal wants it.
    pub arrival_key: Option<Vec<u8>>,
    /// The file as read, with defaults filled in: what `check-config` prints.
    pub raw: RawConfig,
    /// The files holding secrets, each with the key that names it: see
    /// [`Config::cautions`].
    pub secret_files: Vec<(String, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub workers: usize,
    pub tls: Option<TlsConfig>,
    pub trusted_proxies: Vec<IpNet>,
    /// Which header a trusted proxy names the client in.
    pub client_address_header: crate::proxy::headers::ClientHeader,
    /// Each public connection starts with a PROXY protocol header from
    /// one of `trusted_proxies`.
    pub proxy_protocol: bool,
    /// Every public connection counts as HTTPS (a balancer in front ends
    /// TLS without saying so).
    pub assume_https: bool,
    pub max_connections: usize,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_body_size: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    /// 0: no limit per address.
    pub max_connections_per_ip: usize,
    pub keepalive_timeout: Duration,
    pub send_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Zero: stop accepting at once.
    pub shutdown_delay: Duration,
    /// Each request gets an `X-Request-Id` (a trusted proxy's is kept).
    pub request_id: bool,
    /// Whether a trusted proxy's `X-Request-Id` is kept.
    pub request_id_from_proxies: bool,
}

/// The certificates the public listener presents: the first to a client
/// that names no host, or one no other certificate names.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub certificates: Vec<TlsCertificate>,
}

#[derive(Debug, Clone)]
pub struct TlsCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The two files as read when the config was checked.
    pub certified: std::sync::Arc<rustls::sign::CertifiedKey>,
    /// The DNS names it is valid for (its subjectAltName), lower case;
    /// `*.example.it` for a wildcard.
    pub names: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Passive health: `max_fails` failed requests cool an upstream down
    /// for `fail_cooldown` (see `PassiveHealth`).
    pub fail_cooldown: Duration,
    pub max_fails: u32,
    /// Largest request body read whole before forwarding; 0: none.
    pub request_buffer: u64,
    /// What bodies read whole may hold together.
    pub request_buffer_memory: u64,
    /// Longest a body is read whole for; then it streams.
    pub request_buffer_time: Duration,
    /// The roots https upstreams' certificates must chain to, from
    /// `upstream.tls_ca`; empty: the system's.
    pub tls_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// What varco shows an https upstream that asks who it is.
    pub tls_client: Option<TlsCertificate>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub json: bool,
    pub level: String,
    pub access: bool,
}

#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub id: String,
    pub token: String,
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken({})", self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis {
        url: String,
        prefix: String,
        /// The PEM roots `store.tls_ca` held when read, for rediss://;
        /// None: the system's roots. Read once: the store connects with
        /// these, and a CA renewed under the same path is a change of
        /// `[store]`, which a reload names as waiting for a restart, as a
        /// renewed `upstream.tls_ca` is.
        tls_ca: Option<Vec<u8>>,
    },
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub lease: Duration,
    pub snapshot: Option<PathBuf>,
    pub snapshot_interval: Duration,
    pub tick: Duration,
}

#[derive(Debug, Clone)]
pub struct RoomConfig {
    pub name: String,
    /// Scheme and authority of each upstream, e.g. `http://10.0.0.5:8000`.
    pub upstreams: Vec<Uri>,
    /// Each upstream's weight, in the order of `upstreams`: its turns in
    /// the rotation against the others'.
    pub weights: Vec<u32>,
    pub hosts: Vec<HostPattern>,
    pub paths: Vec<String>,
    /// `paths` matched whatever their case (see `RawRoom`).
    pub paths_ignore_case: bool,
    pub preserve_host: bool,
    /// For its https upstreams: the TLS server name, when not the host of
    /// their URLs.
    pub tls_server_name: Option<rustls::pki_types::ServerName<'static>>,
    /// None: `upstream.response_timeout`.
    pub response_timeout: Option<Duration>,
    pub admission_per_minute: Option<f64>,
    pub max_active: Option<u64>,
    pub session_idle: Duration,
    pub claim_window: Duration,
    pub ticket_ttl: Duration,
    pub mode: Mode,
    /// Scheduled opening, unix ms.
    pub opens_at_ms: Option<u64>,
    /// The UTC offset `opens_at` was written with (seconds): the waiting
    /// page tells the opening in the operator's zone.
    pub opens_at_offset_s: i32,
    pub bypass: Bypass,
    pub exempt_paths: Vec<String>,
    /// As requests are matched (`router::as_matched`): `/caf%C3%A8` is
    /// `/café` here.
    pub flow_paths: Vec<String>,
    pub flow_window: Duration,
    pub failure_grace: Duration,
    pub max_reentries: u64,
    pub max_flow_returns: u64,
    pub language: Language,
    /// `cookie_same_site = "none"`: varco's cookies go with cross-site
    /// requests too (under HTTPS only), so an identity provider's POST
    /// back to a flow path carries them.
    pub cross_site_cookies: bool,
    /// The operator's template text, already read.
    pub page_template: Option<String>,
    /// The operator's error page template text, already read.
    pub error_template: Option<String>,
    pub tickets_per_ip_per_minute: u32,
    pub status_per_ip_per_minute: u32,
    /// Each pass's requests: (per second, burst).
    pub per_session: Option<(u32, u32)>,
    /// With adaptive admission, `admission_per_minute` is where the rate
    /// starts (and always set).
    pub adaptive: Option<AdaptiveConfig>,
    pub in_flight: Option<InFlightConfig>,
    pub health_check: Option<HealthCheckConfig>,
    /// Empty: one queue. Otherwise every lane, the default one included.
    pub lanes: Vec<LaneConfig>,
    /// The other rooms' secret headers: a balancer that adds one room's
    /// bypass header to all its traffic sends it to every room's portal.
    pub other_rooms_secrets: Vec<(http::HeaderName, String)>,
}

/// A lane: a FIFO line of its own with a share of the room's rate.
#[derive(Debug, Clone)]
pub struct LaneConfig {
    pub name: String,
    pub weight: f64,
    /// Who belongs (empty: the default lane, everyone else).
    pub selector: Bypass,
    /// The selector's header holds a token signed with its secret.
    pub signed: bool,
}

impl LaneConfig {
    /// The lane without a selector takes everyone the others do not.
    pub fn is_default(&self) -> bool {
        self.selector.cidrs.is_empty() && self.selector.header.is_none()
    }
}

/// Bounds and signals of adaptive admission (see `room::adaptive`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    pub min_per_minute: f64,
    pub max_per_minute: f64,
    pub target_latency: Duration,
    pub max_error_rate: f64,
    pub percentile: f64,
    pub interval: Duration,
    pub step_per_minute: f64,
    pub backoff: f64,
}

/// The cap on requests at once towards a room's upstreams.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlightConfig {
    /// With `adaptive`, the ceiling.
    pub limit: usize,
    pub queue: usize,
    pub wait: Duration,
    pub adaptive: bool,
    /// The most slots one pass's session holds at once.
    pub per_session: Option<usize>,
}

/// Active health checks of a room's upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// `/healthz`, with its query if any.
    pub path: http::uri::PathAndQuery,
    pub interval: Duration,
    pub timeout: Duration,
    /// None: the upstream's own address.
    pub host: Option<http::HeaderValue>,
    pub fall: u32,
    pub rise: u32,
    /// Zero: an upstream back takes its full share at once.
    pub slow_start: Duration,
    /// Empty: any 2xx or 3xx passes.
    pub expect_status: Vec<u16>,
}

impl RoomConfig {
    /// The headers that carry varco's own secrets (`bypass`'s, unsigned
    /// lanes' selectors'), with the secret: a request carrying one is
    /// not passed on with it, or the portal's logs and error pages would
    /// show it to whoever reads those. (A signed lane's token expires and
    /// is the portal's to hand out.)
    pub fn secret_headers(&self) -> impl Iterator<Item = &(http::HeaderName, String)> {
        self.own_secret_headers().chain(&self.other_rooms_secrets)
    }

    /// This room's own (see [`RoomConfig::secret_headers`]).
    pub fn own_secret_headers(&self) -> impl Iterator<Item = &(http::HeaderName, String)> {
        let lanes = self.lanes.iter().filter(|l| !l.signed).map(|l| &l.selector);
        std::iter::once(&self.bypass)
            .chain(lanes)
            .filter_map(|b| b.header.as_ref())
    }

    /// Whether the room starts gated: the rule `Room::is_gated` applies
    /// at run time (`Mode::gates`), on the configured values.
    pub fn is_gated(&self) -> bool {
        self.mode.gates(|| {
            self.admission_per_minute.is_some()
                || self.max_active.is_some()
                || self.opens_at_ms.is_some()
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Bypass {
    pub cidrs: Vec<IpNet>,
    /// Header name and its secret value.
    pub header: Option<(http::HeaderName, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    It,
    En,
}

impl Language {
    /// The BCP 47 tag, for `<html lang>` and the templates' `{{lang}}`.
    pub fn tag(self) -> &'static str {
        match self {
            Language::It => "it",
            Language::En => "en",
        }
    }
}

/// Which request hosts a room answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Any,
    /// `*.example.org`: any subdomain (stored as `.example.org`).
    Suffix(String),
    Exact(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            HostPattern::Exact(h) => host == h,
        }
    }

    /// The pattern as an operator writes it in `hosts`.
    pub fn written(&self) -> String {
        match self {
            HostPattern::Any => "*".into(),
            HostPattern::Suffix(s) => format!("*{s}"),
            HostPattern::Exact(h) => h.clone(),
        }
    }

    /// More specific patterns win ties between rooms with the same path:
    /// an exact host, then the longest suffix (`*.apply.example.org`
    /// before `*.example.org`, as nginx's `server_name` does), then `*`.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(_) => (2, 0),
            HostPattern::Suffix(s) => (1, s.len()),
            HostPattern::Any => (0, 0),
        }
    }
}

/// One problem in a config: the key it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Every problem found in a config, reported together so an operator fixes
/// them in one pass.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "invalid config ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn one(key: &str, reason: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            key: key.into(),
            reason: reason.into(),
        }])
    }

    /// True when some problem names this key (tests pin messages by key).
    pub fn names(&self, key: &str) -> bool {
        self.0.iter().any(|e| e.key == key)
    }
}

/// Below this a timeout is most likely a unit mistyped (`"5ms"`).
const SHORTEST_LIKELY_TIMEOUT: Duration = Duration::from_millis(50);

/// Above these a room's windows are most likely a unit mistyped
/// (`"60m"` for `"60s"`, `"5h"` for `"5m"`).
const LONGEST_LIKELY_CLAIM_WINDOW: Duration = Duration::from_secs(30 * 60);
const LONGEST_LIKELY_SESSION_IDLE: Duration = Duration::from_secs(12 * 3600);

impl Config {
    /// What a config may say but most likely should not: told by
    /// `check-config`, at start and at a reload taken, as warnings
    /// (varco still starts, the reload is still taken).
    pub fn cautions(&self) -> Vec<String> {
        let mut out = Vec::new();
        let admin = self.server.admin_listen;
        if !self.admin_tokens.is_empty() && !admin.ip().is_loopback() {
            out.push(format!(
                "server.admin_listen: {admin} is reachable from other hosts, and the admin \
                 API speaks plain HTTP: its bearer tokens cross the network in clear. Keep \
                 it on a private network (in a container, publish its port on loopback \
                 only), or reach it through an SSH tunnel"
            ));
        }
        // A typo of a unit ("5ms" for "5m") takes a portal offline: every
        // connection or answer "too slow", the upstreams cooled down. A
        // timeout that short is possible on one machine, so told, not
        // refused.
        let rooms = self.rooms.iter().flat_map(|r| {
            let name = &r.name;
            r.response_timeout
                .map(|t| (format!("rooms.{name}.response_timeout"), t))
                .into_iter()
                .chain(
                    r.in_flight
                        .as_ref()
                        .map(|f| (format!("rooms.{name}.in_flight.wait"), f.wait)),
                )
                .chain(
                    r.health_check
                        .as_ref()
                        .map(|h| (format!("rooms.{name}.health_check.timeout"), h.timeout)),
                )
        });
        let timeouts = [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("server.send_timeout", self.server.send_timeout),
            (
                "server.tls_handshake_timeout",
                self.server.tls_handshake_timeout,
            ),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
        ]
        .into_iter()
        .map(|(k, t)| (k.to_string(), t))
        .chain(rooms);
        for (key, t) in timeouts {
            if t < SHORTEST_LIKELY_TIMEOUT {
                out.push(format!(
                    "{key}: {} ms: did you mean minutes (\"m\") or seconds (\"s\")? A \
                     unit mistyped there fails every request, or every check",
                    t.as_millis()
                ));
            }
        }
        // The other way round: "60m" for "60s" holds each turn nobody
        // takes (the person left) an hour, and the line crawls; "5h" for
        // "5m" each pass left open. Possible on purpose, so told.
        for r in &self.rooms {
            let name = &r.name;
            if r.claim_window > LONGEST_LIKELY_CLAIM_WINDOW {
                out.push(format!(
                    "rooms.{name}.claim_window: {} min: each turn called and not taken (the \
                     person left) holds its slot that long before the next in line is called; \
                     did you mean seconds (\"s\")? A few minutes keeps the turns of people on \
                     phones who looked away",
                    r.claim_window.as_secs() / 60
                ));
            }
            if r.session_idle > LONGEST_LIKELY_SESSION_IDLE {
                out.push(format!(
                    "rooms.{name}.session_idle: {} h: a pass nobody uses (a tab left open, a \
                     person gone) holds its slot that long; did you mean minutes (\"m\")?",
                    r.session_idle.as_secs() / 3600
                ));
            }
            // A template that keeps the page's script without what it
            // reads for a refused poll and for screen readers: legal, and
            // worse.
            let Some(t) = r.page_template.as_deref() else {
                continue;
            };
            if !t.contains("id=\"varco\"") {
                continue;
            }
            if !t.contains("data-poll-cap=") {
                out.push(format!(
                    "rooms.{name}.page_template: keeps the page's script but not \
                     data-poll-cap=\"{{{{poll_cap_seconds}}}}\" on <main>: after a refused \
                     poll the page then waits up to 39 s, and a turn called meanwhile may \
                     lapse within the claim window"
                ));
            }
            if !t.contains("id=\"said\"") {
                out.push(format!(
                    "rooms.{name}.page_template: keeps the page's script but no element \
                     id=\"said\" (aria-live): a screen reader hears no update of the place \
                     or the wait"
                ));
            }
        }
        for (key, path) in &self.secret_files {
            use std::os::unix::fs::PermissionsExt;
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let mode = meta.permissions().mode() & 0o777;
            let can = match key.as_str() {
                "secrets.key_file" => "sign passes and skip the line",
                "admin.tokens_file" => "pause, open or reload the rooms",
                "store.url_file" => "reach the cluster's Redis",
                "secrets.arrival_key_file" => "sign arrivals for the portal",
                "upstream.tls_client.key" => "pose as varco to the portal",
                k if k.ends_with(".secret_file") => "skip the line or choose a lane",
                _ => "pose as this site",
            };
            if mode & 0o004 != 0 {
                out.push(format!(
                    "{key}: {} is readable by every user of this machine (mode {mode:o}): \
                     whoever reads it can {can}. Make it readable by varco only \
                     (chmod 600, or 640 with varco's group)",
                    path.display(),
                ));
            } else if mode & 0o002 != 0 {
                // Read again at each reload: what anyone writes there is
                // in force at the next one (a certificate renewal's hook).
                out.push(format!(
                    "{key}: {} is writable by every user of this machine (mode {mode:o}): \
                     whoever writes it can put their own in it, in force at the next \
                     reload. Make it writable by its owner only (chmod 600)",
                    path.display(),
                ));
            }
        }
        out
    }

    /// Reads, parses and validates a config file. Relative paths inside it
    /// (TLS files) are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one("(file)", format!("cannot read {}: {e}", path.display()))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, base)
    }

    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
                let path = e.path().clone();
                let e = e.into_inner();
                ConfigErrors::one(
                    &toml_error_key(&path, text, &e),
                    one_line(&e) + &location(text, &e),
                )
            })?;
        validate::validate(raw, base)
    }

    /// The resolved config as TOML, every default spelled out; the Redis
    /// password left out (`check-config` prints this, to a terminal or a
    /// journal).
    pub fn to_toml(&self) -> String {
        let mut raw = self.raw.clone();
        raw.store.url = raw.store.url.as_deref().map(redacted);
        toml::to_string_pretty(&raw).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

/// A URL with the password of its user part written as `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((user, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    match user.split_once(':') {
        Some((name, _)) => format!("{scheme}://{name}:***@{host}{path}"),
        None => url.to_string(),
    }
}

/// A URL that did not parse, for an error: everything before its last
/// `@` written as `***`. Where its user part ends cannot be told (a
/// password holding `/`, `?` or `#`, not percent-encoded, is what made
/// it fail), so none of it is shown.
///
/// A value with neither a scheme nor an `@` is not shown at all: most
/// likely a password alone (`url_env` naming the variable that holds
/// just the password, as Helm charts make them). A query is not shown
/// either: `redis+unix://` URLs carry the password there (`?pass=`).
pub fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Without a scheme (`user:pw@host`, `redis:/:pw@host`) the part
        // before the last `@` may be a password all the same.
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => format!("*** ({} characters, not shown)", url.chars().count()),
        };
    };
    let rest = match rest.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => rest.to_string(),
    };
    match rest.split_once('?') {
        Some((before, _)) => format!("{scheme}://{before}?***"),
        None => format!("{scheme}://{rest}"),
    }
}

/// Names the key a parse error is about: the path serde followed, down to
/// the field of an inline table in an array (`rooms.portal.upstreams[0].url`);
/// when the file itself is broken (no path yet), the table the error stands
/// in, the last `[header]` before it.
fn toml_error_key(path: &serde_path_to_error::Path, text: &str, e: &toml::de::Error) -> String {
    if path.iter().next().is_some() {
        return path.to_string();
    }
    let offset = e.span().map(|s| s.start.min(text.len())).unwrap_or(0);
    text[..offset]
        .lines()
        .rev()
        .find_map(|l| {
            l.trim()
                .strip_prefix('[')
                .and_then(|l| l.split(']').next())
                .map(|t| t.trim_matches(|c| c == '[' || c == ' ').to_string())
        })
        .unwrap_or_else(|| "(syntax)".to_string())
}

/// toml's message for `e`: it puts what it expected on a second line; a
/// report gives each problem one.
pub(crate) fn one_line(e: &toml::de::Error) -> String {
    e.message().trim().replace('\n', ": ")
}

pub(crate) fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}
