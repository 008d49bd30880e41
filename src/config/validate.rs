//! Turns a [`RawConfig`] into a [`Config`], collecting every problem instead
//! of stopping at the first, each naming its key and how to fix it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use http::Uri;
use ipnet::IpNet;

use super::file::{
    RawAdaptive, RawHealthCheck, RawStore, DEFAULT_ADAPTIVE_STEP_FRACTION, DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_IN_FLIGHT_QUEUE_FACTOR, DEFAULT_SESSION_BURST_SECONDS, MAX_MAX_FAILS, MAX_WEIGHT,
};
use super::units::{parse_duration, parse_size};
use super::*;
use crate::room::admission::{Mode, MAX_ACTIVE, MAX_PER_MINUTE};
use crate::room::token::Keyring;

/// hyper refuses a read buffer below 8 KiB, and nothing sane needs more
/// than 1 MiB of request headers.
const MIN_HEADER_SIZE: u64 = 8 * 1024;
const MAX_HEADER_SIZE: u64 = 1 << 20;
/// The most worker threads `server.workers` may ask for.
const MAX_WORKERS: usize = 1024;
/// Connections or requests at once: far beyond any real deployment, and
/// far below tokio's semaphore limit (2^61), which panics above it.
const MAX_COUNT: usize = 1 << 30;
/// Headers in a request: hyper reserves this many slots per request.
const MAX_HEADERS: usize = 1000;
/// HAProxy allows any; an hour of warming up is already a server not ready.
const MAX_SLOW_START: Duration = Duration::from_secs(3600);
/// A body read whole is held in memory; uploads past this stream.
const MAX_REQUEST_BUFFER: u64 = 1 << 30;

struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        let key = key.into();
        // One problem per key: a later check of a key already found wrong
        // judges the stand-in value the first left (a duration that did
        // not parse reads as 1 s), not what was written.
        if self.0.iter().any(|e| e.key == key) {
            return;
        }
        self.0.push(ConfigError {
            key,
            reason: reason.into(),
        });
    }

    /// A problem with one entry of a list the operator wrote under one
    /// key (the tokens of `tokens_env`, the keys of `key_file`): each
    /// entry's is said, as every problem is said at once; only a repeat
    /// is not.
    fn add_entry(&mut self, key: &str, reason: impl Into<String>) {
        let reason = reason.into();
        if !self.0.iter().any(|e| e.key == key && e.reason == reason) {
            self.0.push(ConfigError {
                key: key.into(),
                reason,
            });
        }
    }

    fn duration(&mut self, key: &str, text: &str) -> Duration {
        self.duration_or(key, text, "must be greater than zero")
    }

    /// As `duration`, with what a zero would do said in its words.
    fn duration_or(&mut self, key: &str, text: &str, zero: &str) -> Duration {
        match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                self.add(key, zero);
                Duration::from_secs(1)
            }
            Ok(d) => d,
            Err(e) => {
                self.add(key, e);
                Duration::from_secs(1)
            }
        }
    }

    fn size(&mut self, key: &str, text: &str) -> u64 {
        parse_size(text).unwrap_or_else(|e| {
            self.add(key, e);
            0
        })
    }

    fn addr(&mut self, key: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.add(
                key,
                format!("\"{text}\" is not an address: write ip:port, e.g. \"127.0.0.1:8080\" or \"[::]:443\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn positive(&mut self, key: &str, value: usize) {
        if value == 0 {
            self.add(key, "must be at least 1");
        }
    }

    /// A file varco writes: its folder must exist.
    fn in_a_folder(&mut self, key: &str, file: Option<&Path>, what: &str) {
        if let Some(problem) = file.and_then(|f| folder_missing(f, what)) {
            self.add(key, problem);
        }
    }

    fn at_most(&mut self, key: &str, value: usize, max: usize, why: &str) {
        if value > max {
            self.add(key, format!("must be at most {max}: {why}"));
        }
    }
}

fn parse_health_check(
    h: &RawHealthCheck,
    key: &dyn Fn(&str) -> String,
    p: &mut Problems,
) -> HealthCheckConfig {
    let path = match h.path.parse::<http::uri::PathAndQuery>() {
        Ok(path) if h.path.starts_with('/') => path,
        _ => {
            p.add(
                key("health_check.path"),
                format!("{:?} is not a path (write it as \"/healthz\")", h.path),
            );
            http::uri::PathAndQuery::from_static("/")
        }
    };
    let before = p.0.len();
    let interval = p.duration(&key("health_check.interval"), &h.interval);
    let interval_read = p.0.len() == before;
    if interval_read && interval < Duration::from_millis(100) {
        p.add(
            key("health_check.interval"),
            "must be at least 100ms: more often only loads the portal",
        );
    }
    let timeout = match &h.timeout {
        Some(t) => p.duration(&key("health_check.timeout"), t),
        None => parse_duration(DEFAULT_HEALTH_TIMEOUT)
            .unwrap_or(Duration::from_secs(2))
            .min(interval),
    };
    if interval_read && timeout > interval {
        p.add(
            key("health_check.timeout"),
            format!(
                "must be at most the interval ({}): a check must end before the next begins",
                h.interval
            ),
        );
    }
    let host = h.host.as_ref().and_then(|host| {
        let valid = host.parse::<http::uri::Authority>().is_ok();
        match http::HeaderValue::from_str(host) {
            Ok(v) if valid => Some(v),
            _ => {
                p.add(
                    key("health_check.host"),
                    format!("{host:?} is not a host name (with an optional :port)"),
                );
                None
            }
        }
    });
    for (name, value) in [("fall", h.fall), ("rise", h.rise)] {
        if !(1..=100).contains(&value) {
            p.add(
                key(&format!("health_check.{name}")),
                "must be between 1 and 100 checks in a row",
            );
        }
    }
    let slow_start = match &h.slow_start {
        Some(s) => p.duration(&key("health_check.slow_start"), s),
        None => Duration::ZERO,
    };
    if slow_start > MAX_SLOW_START {
        p.add(
            key("health_check.slow_start"),
            "must be at most 1h: a server that needs longer to warm up is not ready",
        );
    }
    let expect_status = h.expect_status.clone().unwrap_or_default();
    if h.expect_status.as_ref().is_some_and(Vec::is_empty) {
        p.add(
            key("health_check.expect_status"),
            "lists no status: leave it out for any 2xx or 3xx",
        );
    }
    if let Some(bad) = expect_status.iter().find(|s| !(100..=599).contains(*s)) {
        p.add(
            key("health_check.expect_status"),
            format!("{bad} is not an HTTP status (100 to 599)"),
        );
    }
    HealthCheckConfig {
        path,
        interval,
        timeout,
        host,
        expect_status,
        slow_start: slow_start.min(MAX_SLOW_START),
        fall: h.fall.clamp(1, 100),
        rise: h.rise.clamp(1, 100),
    }
}

/// An https upstream in two rooms is one pool of connections, made with
/// one TLS server name: the rooms must agree on it.
fn same_server_names(rooms: &[RoomConfig], p: &mut Problems) {
    let mut named: HashMap<String, (&str, Option<String>)> = HashMap::new();
    for room in rooms {
        let name = room
            .tls_server_name
            .as_ref()
            .map(|n| n.to_str().into_owned());
        for u in room
            .upstreams
            .iter()
            .filter(|u| u.scheme_str() == Some("https"))
        {
            let label = crate::proxy::upstreams::label(u);
            match named.get(&label) {
                Some((other, theirs)) if *theirs != name => p.add(
                    format!("rooms.{}.tls_server_name", room.name),
                    format!(
                        "upstream {label} (in rooms.{}.upstreams) is also in room {other}, which names it {}: one pool of connections serves both rooms, so they must name it alike",
                        room.name,
                        theirs
                            .as_ref()
                            .map_or("by its address".to_string(), |t| format!("{t:?}"))
                    ),
                ),
                Some(_) => {}
                None => {
                    named.insert(label, (room.name.as_str(), name.clone()));
                }
            }
        }
    }
}

/// Why varco cannot write `file` (`what`) where it is: its folder is not
/// there; None when it is.
pub fn folder_missing(file: &Path, what: &str) -> Option<String> {
    let dir = file.parent()?;
    (!dir.as_os_str().is_empty() && !dir.is_dir()).then(|| {
        format!(
            "{} is not a directory varco can write {what} in",
            dir.display()
        )
    })
}

/// Whether two listeners would take the same port: the same address, or
/// one on every address of a family the other's is in (`[::]` takes
/// IPv4 too, as varco binds it dual-stack). Caught here, `check-config`
/// passed a file whose start then failed to bind.
fn listens_on_the_same(a: std::net::SocketAddr, b: std::net::SocketAddr) -> bool {
    let takes = |wide: std::net::SocketAddr, other: std::net::SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || takes(a, b) || takes(b, a))
}

pub fn validate(raw: RawConfig, base: &Path) -> Result<Config, ConfigErrors> {
    let mut p = Problems(Vec::new());
    let s = &raw.server;

    let listen = p.addr("server.listen", &s.listen);
    let admin_listen = p.addr("server.admin_listen", &s.admin_listen);
    if listens_on_the_same(listen, admin_listen) {
        p.add(
            "server.admin_listen",
            format!("must differ from server.listen ({listen}): the admin API needs its own port"),
        );
    }
    let tls = s.tls.as_ref().and_then(|list| {
        let entries = list.entries();
        if entries.is_empty() {
            p.add("server.tls", "lists no certificate");
        }
        let mut certificates = Vec::new();
        for (i, (at, t)) in entries.iter().enumerate() {
            let cert = base.join(&t.cert);
            let key = base.join(&t.key);
            let mut readable = true;
            for (k, path) in [(format!("{at}.cert"), &cert), (format!("{at}.key"), &key)] {
                if !path.is_file() {
                    p.add(k, format!("{} is not a readable file", path.display()));
                    readable = false;
                }
            }
            if !readable {
                continue;
            }
            match crate::tls::read_certificate(at, cert, key) {
                // Only the first is given without a name: another that
                // names none would never be presented.
                Ok(c) if i > 0 && c.names.is_empty() => p.add(
                    format!("{at}.cert"),
                    format!(
                        "{} names no DNS host (subjectAltName): no client asking for a host would be given it, and only the first certificate is given to the others",
                        c.cert.display()
                    ),
                ),
                Ok(c) => certificates.push(c),
                Err(e) => p.add(e.key, e.reason),
            }
        }
        (certificates.len() == entries.len() && !certificates.is_empty())
            .then_some(TlsConfig { certificates })
    });
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            parse_cidr(t)
                .map_err(|e| p.add(format!("server.trusted_proxies[{i}]"), e))
                .ok()
        })
        .collect();
    if s.proxy_protocol && s.trusted_proxies.is_empty() {
        p.add(
            "server.proxy_protocol",
            "needs server.trusted_proxies: only the load balancers listed there may send a PROXY header (anyone else could name any client)",
        );
    }
    // tokio panics (and varco exits 101 naming nothing) when the OS
    // refuses a worker thread: systemd's default TasksMax is about 4900.
    p.at_most(
        "server.workers",
        s.workers,
        MAX_WORKERS,
        "more threads than any machine has cores (0 is one per core)",
    );
    p.positive("server.max_connections", s.max_connections);
    p.at_most(
        "server.max_connections",
        s.max_connections,
        MAX_COUNT,
        "more connections than one process can open",
    );
    p.positive("server.max_headers", s.max_headers);
    p.at_most(
        "server.max_headers",
        s.max_headers,
        MAX_HEADERS,
        "hyper sets aside a slot for each on every request",
    );
    let max_header_size = p.size("server.max_header_size", &s.max_header_size);
    if !(MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&max_header_size) {
        p.add(
            "server.max_header_size",
            format!(
                "\"{}\" is out of range: use 8KiB to 1MiB",
                s.max_header_size
            ),
        );
    }
    let max_body_size = p.size("server.max_body_size", &s.max_body_size);
    // nginx's client_max_body_size 0 means no limit; here it would refuse
    // every form, a login's too, with 413.
    // (A size that did not parse reads as 0, and is named already.)
    if max_body_size < MIN_BODY_SIZE {
        p.add(
            "server.max_body_size",
            format!("\"{}\" is under 1KiB: every form, a login's too, would get 413 (0 does not mean \"no limit\" as in nginx: give the largest upload the portal takes)", s.max_body_size),
        );
    }
    let server = ServerConfig {
        listen,
        admin_listen,
        workers: s.workers,
        tls,
        trusted_proxies,
        proxy_protocol: s.proxy_protocol,
        assume_https: s.assume_https,
        max_connections: s.max_connections,
        max_header_size: max_header_size as usize,
        max_headers: s.max_headers,
        max_body_size,
        header_read_timeout: p.duration("server.header_read_timeout", &s.header_read_timeout),
        body_read_timeout: p.duration("server.body_read_timeout", &s.body_read_timeout),
        max_connections_per_ip: s.max_connections_per_ip,
        keepalive_timeout: p.duration("server.keepalive_timeout", &s.keepalive_timeout),
        send_timeout: p.duration("server.send_timeout", &s.send_timeout),
        tls_handshake_timeout: p.duration("server.tls_handshake_timeout", &s.tls_handshake_timeout),
        shutdown_grace: p.duration("server.shutdown_grace", &s.shutdown_grace),
        shutdown_delay: parse_duration(&s.shutdown_delay).unwrap_or_else(|e| {
            p.add("server.shutdown_delay", e);
            Duration::ZERO
        }),
        request_id: s.request_id,
        request_id_from_proxies: s.request_id_from_proxies,
        client_address_header: match s.client_address_header.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => crate::proxy::headers::ClientHeader::XForwardedFor,
            "forwarded" => crate::proxy::headers::ClientHeader::Forwarded,
            other => {
                p.add(
                    "server.client_address_header",
                    format!("\"{other}\" is neither \"x-forwarded-for\" nor \"forwarded\""),
                );
                crate::proxy::headers::ClientHeader::default()
            }
        },
    };

    let u = &raw.upstream;
    p.positive("upstream.pool_max_idle", u.pool_max_idle);
    if u.max_fails > MAX_MAX_FAILS {
        p.add(
            "upstream.max_fails",
            format!("at most {MAX_MAX_FAILS} (0: failed requests never cool an upstream down; health_check takes it out then)"),
        );
    }
    let request_buffer = p.size("upstream.request_buffer", &u.request_buffer);
    let request_buffer_memory = p.size("upstream.request_buffer_memory", &u.request_buffer_memory);
    let request_buffer_time = p.duration_or(
        "upstream.request_buffer_time",
        &u.request_buffer_time,
        "must be more than 0s (request_buffer = \"0\" turns buffering off)",
    );
    if request_buffer > MAX_REQUEST_BUFFER {
        p.add(
            "upstream.request_buffer",
            "at most 1GiB: a body larger than that streams to the upstream anyway",
        );
    } else if request_buffer > request_buffer_memory {
        p.add(
            "upstream.request_buffer",
            format!("{} is more than upstream.request_buffer_memory ({}): no body that size could be read whole", u.request_buffer, u.request_buffer_memory),
        );
    }
    let upstream = UpstreamConfig {
        connect_timeout: p.duration("upstream.connect_timeout", &u.connect_timeout),
        response_timeout: p.duration("upstream.response_timeout", &u.response_timeout),
        pool_idle_timeout: p.duration("upstream.pool_idle_timeout", &u.pool_idle_timeout),
        pool_max_idle: u.pool_max_idle,
        fail_cooldown: p.duration("upstream.fail_cooldown", &u.fail_cooldown),
        max_fails: u.max_fails,
        request_buffer,
        request_buffer_memory,
        request_buffer_time,
        tls_roots: u
            .tls_ca
            .as_ref()
            .map(|f| read_roots(&base.join(f)).map_err(|e| p.add("upstream.tls_ca", e)))
            .and_then(Result::ok)
            .unwrap_or_default(),
        tls_client: u.tls_client.as_ref().and_then(|t| {
            crate::tls::read_certificate(
                "upstream.tls_client",
                base.join(&t.cert),
                base.join(&t.key),
            )
            .map_err(|e| p.add(e.key, e.reason))
            .ok()
        }),
    };

    let json = match raw.log.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            p.add(
                "log.format",
                format!("\"{other}\" is not a format: use \"text\" or \"json\""),
            );
            false
        }
    };
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&raw.log.level) {
        p.add(
            "log.level",
            format!(
                "\"{}\" is not a log filter ({e}): use e.g. \"info\"",
                raw.log.level
            ),
        );
    }
    let log = LogConfig {
        json,
        level: raw.log.level.clone(),
        access: raw.log.access,
    };

    let tls_ca = raw.store.tls_ca.as_ref().map(|f| base.join(f));
    if let Some(ca) = &tls_ca {
        if !ca.is_file() {
            p.add(
                "store.tls_ca",
                format!("{} is not a readable file", ca.display()),
            );
        }
    }
    let url = store_url(&raw.store, base, &mut p);
    let kind = match (raw.store.kind.as_str(), &url) {
        ("memory", _) => {
            // Redis settings with the memory store: most likely a cluster
            // whose `kind` was forgotten, which would run as that many
            // separate queues, each node admitting its own max_active.
            let defaults = RawStore::default();
            let for_redis = [
                ("store.url", raw.store.url.is_some()),
                ("store.url_file", raw.store.url_file.is_some()),
                ("store.url_env", raw.store.url_env.is_some()),
                ("store.tls_ca", raw.store.tls_ca.is_some()),
                ("store.prefix", raw.store.prefix != defaults.prefix),
                ("store.lease", raw.store.lease != defaults.lease),
            ];
            for (key, set) in for_redis {
                if set {
                    p.add(
                        key,
                        "is for the Redis store: set store.kind = \"redis\" (the memory store keeps one node's queue)",
                    );
                }
            }
            StoreKind::Memory
        }
        // Unreadable: said under its own key.
        ("redis", Err(())) => StoreKind::Memory,
        ("redis", Ok(Some((url, from))))
            if url.starts_with("redis://") || url.starts_with("rediss://") =>
        {
            if tls_ca.is_some() && url.starts_with("redis://") {
                p.add("store.tls_ca", "is for TLS: write the url as rediss://");
            }
            // Read now as the store will read them at start: a check that
            // passes must not leave a start that fails.
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.as_str()) {
                p.add(
                    *from,
                    format!(
                        "\"{}\" cannot be read as a Redis URL: {e} (a password holding / ? # or @ is written percent-encoded: %2F %3F %23 %40)",
                        super::masked(url)
                    ),
                );
            }
            let tls_ca = tls_ca.as_ref().filter(|ca| ca.is_file()).and_then(|ca| {
                let pem = std::fs::read(ca)
                    .map_err(|e| format!("cannot read {}: {e}", ca.display()))
                    .and_then(|pem| crate::tls::certificates_in(&pem, ca).map(|_| pem));
                pem.map_err(|e| p.add("store.tls_ca", e)).ok()
            });
            StoreKind::Redis {
                url: url.clone(),
                prefix: raw.store.prefix.clone(),
                tls_ca,
            }
        }
        ("redis", Ok(Some((url, from)))) => {
            p.add(*from, format!("\"{}\" is not a Redis URL: write e.g. \"redis://10.0.0.9:6379/0\" or \"rediss://\" for TLS", super::masked(url)));
            StoreKind::Memory
        }
        ("redis", Ok(None)) => {
            p.add(
                "store.url",
                "store.kind = \"redis\" needs a url (or url_file, url_env), e.g. \"redis://10.0.0.9:6379/0\"",
            );
            StoreKind::Memory
        }
        (other, _) => {
            p.add(
                "store.kind",
                format!("\"{other}\" is not a store: use \"memory\" or \"redis\""),
            );
            StoreKind::Memory
        }
    };
    // Made-up keys (`ephemeral`, or a key made for a room that needed
    // none, then gated live) differ from node to node: a ticket from one
    // would be no ticket on another, and each node would draw its own
    // pre-queue order.
    if kind != StoreKind::Memory && raw.secrets.keys_made_up() {
        p.add(
            if raw.secrets.ephemeral { "secrets.ephemeral" } else { "secrets" },
            "cluster mode (store.kind = \"redis\") needs the keys every node shares: set secrets.key_file or secrets.key_env, the same on each node; keys varco makes up differ from node to node, and a ticket from one would be no ticket on another",
        );
    }
    if kind != StoreKind::Memory && raw.store.snapshot.is_some() {
        p.add(
            "store.snapshot",
            "only the memory store snapshots; Redis keeps the counters itself",
        );
    }
    let store = StoreConfig {
        kind,
        lease: p.duration("store.lease", &raw.store.lease),
        snapshot: raw.store.snapshot.as_ref().map(|s| base.join(s)),
        snapshot_interval: p.duration("store.snapshot_interval", &raw.store.snapshot_interval),
        tick: p.duration("store.tick", &raw.store.tick),
    };
    // Ticks and leases are counted in whole milliseconds: below one, a
    // tick of 0 ms would find a gap at every tick (every claim window
    // pushed on, no turn ever lapsing), and a lease of 0 ms none to set
    // (the lease is at least two ticks, below).
    if store.tick < MIN_TICK {
        p.add(
            "store.tick",
            format!("must be at least {MIN_TICK:?}: ticks are counted in whole milliseconds, and more often only loads the store"),
        );
    } else if store.tick > MAX_TICK {
        p.add(
            "store.tick",
            format!("must be at most {MAX_TICK:?}: a tick calls a tick's worth of the rate at once (at \"5m\", five minutes' worth in one go), and turns lapse only at a tick: at most a third of the shortest claim_window ({:?})", crate::page::waiting::MIN_CLAIM_WINDOW),
        );
    }
    if store.snapshot_interval < MIN_SNAPSHOT_INTERVAL {
        p.add(
            "store.snapshot_interval",
            format!("must be at least {MIN_SNAPSHOT_INTERVAL:?}: each snapshot writes and fsyncs the whole queue (every live session), and shorter, one follows another with no pause, the disk busy for nothing; the numbers handed out between two are kept by the marks written ahead"),
        );
    }
    // The lease is renewed once a tick: shorter than two ticks, one late
    // tick lets it lapse and the room's counters change hands for nothing.
    if matches!(store.kind, StoreKind::Redis { .. }) && store.lease < store.tick * 2 {
        p.add(
            "store.lease",
            format!(
                "must be at least twice store.tick ({:?}): the lease is renewed once a tick",
                store.tick
            ),
        );
    } else if matches!(store.kind, StoreKind::Redis { .. }) && store.lease > MAX_LEASE {
        // A node that dies holding it stops the line for as long: nobody
        // is called, no turn lapses, until another node takes over.
        p.add(
            "store.lease",
            format!("must be at most {MAX_LEASE:?}: when the node holding it dies, nobody is admitted until it lapses"),
        );
    }
    let keys = load_keys(&raw.secrets, base, &mut p);
    let admin_tokens = load_admin_tokens(&raw.admin, base, &mut p);

    if raw.rooms.is_empty() {
        p.add(
            "rooms",
            "no room is defined: add a [rooms.NAME] table with upstreams",
        );
    }
    let mut rooms = Vec::new();
    let mut routes: HashMap<(HostPattern, String), String> = HashMap::new();
    // The same in lower case, with whether the room ignores case.
    let mut folded: HashMap<(HostPattern, String), (String, bool)> = HashMap::new();
    for (name, r) in &raw.rooms {
        let key = |k: &str| format!("rooms.{name}.{k}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.add(
                format!("rooms.{name}"),
                "a room name uses only letters, digits, '-' and '_' (it is a metric label)",
            );
        } else if name == "-" {
            p.add(
                format!("rooms.{name}"),
                "\"-\" is the room label of requests no room serves: name the room otherwise",
            );
        }
        if r.upstreams.is_empty() {
            p.add(
                key("upstreams"),
                "lists no upstream: give at least one, e.g. [\"http://127.0.0.1:9001\"]",
            );
        }
        let mut upstreams: Vec<Uri> = Vec::new();
        let mut weights: Vec<u32> = Vec::new();
        // Where each kept upstream stands in the file, for the message
        // about a second one on the same host and port.
        let mut written_at: Vec<usize> = Vec::new();
        for (i, entry) in r.upstreams.iter().enumerate() {
            let at = key(&format!("upstreams[{i}]"));
            let weight = entry.weight();
            let weight_ok = (1..=MAX_WEIGHT).contains(&weight);
            if !weight_ok {
                p.add(
                    format!("{at}.weight"),
                    format!("{weight} is not 1 to {MAX_WEIGHT} (to send an upstream nothing for a while, take it out: varco ctl upstream-out)"),
                );
            }
            let u = entry.url();
            let Ok(uri) = parse_upstream(u).map_err(|e| p.add(&at, e)) else {
                continue;
            };
            if !weight_ok {
                continue;
            }
            // One server, one line in the metrics and one health verdict.
            // Host names are one in any case (as DNS has them).
            if let Some(j) = upstreams.iter().position(|o| {
                crate::proxy::upstreams::label(o)
                    .eq_ignore_ascii_case(&crate::proxy::upstreams::label(&uri))
            }) {
                p.add(
                    &at,
                    format!(
                        "\"{u}\" is the same host and port as upstreams[{}]",
                        written_at[j]
                    ),
                );
                continue;
            }
            if uri.scheme_str() == Some("https")
                && raw.upstream.tls_ca.is_none()
                && crate::proxy::client::system_roots().is_empty()
            {
                p.add(
                    &at,
                    "an https upstream, but this system has no TLS roots to verify it with (a minimal image?): set upstream.tls_ca",
                );
            }
            upstreams.push(uri);
            weights.push(weight);
            written_at.push(i);
        }
        let response_timeout = r.response_timeout.as_ref().map(|t| {
            p.duration_or(
                &key("response_timeout"),
                t,
                "must be more than 0s: every request would be a 504",
            )
        });
        let tls_server_name = r.tls_server_name.as_ref().and_then(|n| {
            // An IPv6 address as written in a URL.
            let bare = n
                .strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .unwrap_or(n);
            let name = rustls::pki_types::ServerName::try_from(bare.to_string())
                .map_err(|_| {
                    p.add(
                        key("tls_server_name"),
                        format!("{n:?} is not a DNS name or an IP address"),
                    )
                })
                .ok()?;
            if !upstreams.iter().any(|u| u.scheme_str() == Some("https")) {
                p.add(
                    key("tls_server_name"),
                    "no upstream of this room is https://: the name would never be used",
                );
            }
            Some(name)
        });
        let hosts: Vec<HostPattern> = r
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                parse_host(h)
                    .map_err(|e| p.add(key(&format!("hosts[{i}]")), e))
                    .ok()
            })
            .collect();
        if r.hosts.is_empty() {
            p.add(key("hosts"), "is empty: use [\"*\"] for any host");
        }
        if r.paths.is_empty() {
            p.add(key("paths"), "is empty: use [\"/\"] for every path");
        }
        for (i, path) in r.paths.iter().enumerate() {
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                p.add(
                    key(&format!("paths[{i}]")),
                    format!("\"{path}\" is not a path prefix: it starts with '/' and has no query"),
                );
            } else if crate::request_path::normalise(path) != Ok(None)
                || crate::router::as_read(path) != path.as_str()
            {
                // Requests are matched once made canonical, their escaped
                // slashes read as slashes: this prefix would match none,
                // and its traffic would go to another room (an ungated
                // one, say).
                p.add(
                    key(&format!("paths[{i}]")),
                    format!("\"{path}\" is not a path in canonical form (no `//`, `.` or `..` segments, `;` parameters, escaped or back slashes, escapes of unreserved characters, or lower-case escapes): it would never match; write \"{}\"", crate::router::as_read(&crate::request_path::normalise(path).ok().flatten().unwrap_or_else(|| path.clone()))),
                );
            }
            for h in &hosts {
                // In the form requests are matched in: `/caf%C3%A8` and
                // `/café` are one path.
                let matched = crate::router::as_matched(path).into_owned();
                // Two rooms' paths that one request would match alike.
                let matched = if r.paths_ignore_case {
                    matched.to_lowercase()
                } else {
                    matched
                };
                // And in any case, where a room ignores it: `/Bonus` as
                // written in one room is `/bonus` of one that ignores case.
                let folded_key = (h.clone(), matched.to_lowercase());
                if let Some((other, other_ignores)) = folded.get(&folded_key) {
                    if *other != *name && (r.paths_ignore_case || *other_ignores) {
                        p.add(
                            key("paths"),
                            format!(
                                "host \"{}\" and path \"{path}\" are room \"{other}\"'s too, in another case: with paths_ignore_case a request would match both",
                                h.written()
                            ),
                        );
                    }
                }
                folded
                    .entry(folded_key)
                    .or_insert((name.clone(), r.paths_ignore_case));
                let Some(other) = routes.insert((h.clone(), matched), name.clone()) else {
                    continue;
                };
                let written = h.written();
                if other != *name {
                    p.add(
                        key("paths"),
                        format!(
                            "host \"{written}\" and path \"{path}\" are already served by room \"{other}\""
                        ),
                    );
                } else if hosts.iter().filter(|o| *o == h).count() > 1 {
                    p.add(key("hosts"), format!("\"{written}\" is listed twice"));
                } else {
                    p.add(key("paths"), format!("\"{path}\" is listed twice"));
                }
            }
        }
        if let Some(rate) = r.admission_per_minute {
            if !(rate > 0.0 && rate <= MAX_PER_MINUTE) {
                p.add(
                    key("admission_per_minute"),
                    "must be a positive number of new sessions per minute, at most 1000000000",
                );
            }
        }
        if r.max_active == Some(0) {
            p.add(
                key("max_active"),
                "must be at least 1 (use mode = \"closed\" to admit nobody)",
            );
        }
        if r.max_active.is_some_and(|m| m > MAX_ACTIVE) {
            p.add(
                key("max_active"),
                "must be at most 1000000000 sessions (leave it out for no cap)",
            );
        }
        let mode = Mode::parse(&r.mode).unwrap_or_else(|| {
            p.add(
                key("mode"),
                format!(
                    "\"{}\" is not a mode: use queue, queue_all, paused, passthrough or closed",
                    r.mode
                ),
            );
            Mode::Queue
        });
        let opens_at_offset_s = r
            .opens_at
            .as_ref()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map_or(0, |d| d.offset().whole_seconds());
        let opens_at_ms = r.opens_at.as_ref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| p.add(key("opens_at"), format!("\"{t}\" is not an RFC 3339 time ({e}): write e.g. \"2026-12-01T09:00:00+01:00\"")))
                .ok()
                .and_then(|d| {
                    // Before 1970 is a typo for the year (1926 for 2026):
                    // as unix milliseconds it would wrap to an opening
                    // that never comes.
                    u64::try_from(d.unix_timestamp_nanos() / 1_000_000)
                        .map_err(|_| p.add(key("opens_at"), format!("\"{t}\" is before 1970: check the year")))
                        .ok()
                })
        });
        let bypass = r
            .bypass
            .as_ref()
            .map(|b| parse_bypass(b, "bypass", &key, base, &mut p))
            .unwrap_or_default();
        // Every path of the room exempt: nobody would meet the gate.
        if !r.exempt_paths.iter().any(|e| e == "/")
            && !r.paths.is_empty()
            && r.paths
                .iter()
                .all(|room_path| r.exempt_paths.iter().any(|e| covers(e, room_path)))
        {
            p.add(
                key("exempt_paths"),
                format!("cover every path of the room ({}): nobody would meet the gate; for a room without a gate, set mode = \"passthrough\"", r.paths.join(", ")),
            );
        }
        // An entry under none of the room's paths is never met here: the
        // request is another room's, or nobody's (a callback that would
        // be queued, an asset gated, the operator told nothing).
        // Both as requests are matched (`/caf%C3%A8` is `/café`).
        let outside = |e: &str| {
            let e = crate::router::as_matched(e);
            !r.paths.is_empty()
                && !r
                    .paths
                    .iter()
                    .any(|room_path| crate::router::on_prefix(room_path, &e))
        };
        let not_here = |e: &str| {
            format!(
                "\"{e}\" is under none of the room's paths ({}): its requests never reach this room; write it under one of them",
                r.paths.join(", ")
            )
        };
        for (i, e) in r.exempt_paths.iter().enumerate() {
            let at = key(&format!("exempt_paths[{i}]"));
            if e.starts_with('/') && outside(e) {
                p.add(at, not_here(e));
            } else if e == "/" {
                p.add(
                    at,
                    "\"/\" exempts every path: for a room without a gate, set mode = \"passthrough\"".to_string(),
                );
            } else if let Some(why) = prefix_problem(e, "exempt") {
                p.add(at, why);
            }
        }
        for (i, e) in r.flow_paths.iter().enumerate() {
            let at = key(&format!("flow_paths[{i}]"));
            // A detour that covers the whole room lets every ticket holder
            // past the queue (and a closed room) on any path.
            if let Some(room_path) = r.paths.iter().find(|room_path| covers(e, room_path)) {
                p.add(
                    at,
                    format!("\"{e}\" covers the room's path \"{room_path}\": every ticket holder would skip the queue; name the login callback itself (e.g. \"/oidc/callback\")"),
                );
            } else if e.starts_with('/') && outside(e) {
                p.add(at, not_here(e));
            } else if let Some(why) = prefix_problem(e, "flow") {
                p.add(at, why);
            }
        }
        // The waiting page polls every 5 s at the soonest (6.5 s with its
        // jitter): a shorter window could call and lapse a turn between
        // two polls of a page that is open and waiting.
        let claim_window = p.duration(&key("claim_window"), &r.claim_window);
        if claim_window < crate::page::waiting::MIN_CLAIM_WINDOW {
            p.add(
                key("claim_window"),
                format!(
                    "must be at least {}s: the waiting page polls every 5 s at the soonest, and a turn must outlast two polls",
                    crate::page::waiting::MIN_CLAIM_WINDOW.as_secs()
                ),
            );
        }
        // A typo ("5ms" for "5m") would end every pass between a page and
        // the requests it makes next (its assets, a form sent): each one
        // back in the queue, its slot given to the next in line.
        let session_idle = p.duration(&key("session_idle"), &r.session_idle);
        if session_idle < MIN_SESSION_IDLE {
            p.add(
                key("session_idle"),
                format!(
                    "{} is too short: a pass must outlast the pause between one page and the next request; at least {}s (the default is 5m)",
                    r.session_idle,
                    MIN_SESSION_IDLE.as_secs()
                ),
            );
        }
        // A ticket called near the end of its life must still be good for
        // the whole window in which it may claim its turn.
        let ticket_ttl = p.duration(&key("ticket_ttl"), &r.ticket_ttl);
        if ticket_ttl < claim_window {
            p.add(
                key("ticket_ttl"),
                format!(
                    "{} is shorter than claim_window ({}): a ticket called late in its life would expire before its holder could claim the turn. Set it to the longest wait you expect plus claim_window (the default is 24h)",
                    r.ticket_ttl, r.claim_window
                ),
            );
        }
        // A lapsed pass that may come back hours later is a session that
        // never ends: the windows stay within an hour (and a release is
        // remembered for as long as they last, `Room::ended_memory_ms`).
        let window_limit = Duration::from_millis(crate::store::ENDED_MEMORY_MS);
        let flow_window = p.duration(&key("flow_window"), &r.flow_window);
        if flow_window > window_limit {
            p.add(key("flow_window"), "must be at most 1h");
        }
        let failure_grace = p.duration(&key("failure_grace"), &r.failure_grace);
        if failure_grace * 2 > window_limit {
            p.add(key("failure_grace"), "must be at most 30m");
        }
        let language = match r.language.as_str() {
            "it" => Language::It,
            "en" => Language::En,
            other => {
                p.add(
                    key("language"),
                    format!("\"{other}\" is not a language varco speaks: use \"it\" or \"en\""),
                );
                Language::It
            }
        };
        let cross_site_cookies = match r.cookie_same_site.as_str() {
            "lax" => false,
            "none" => true,
            other => {
                p.add(
                    key("cookie_same_site"),
                    format!("\"{other}\" is not a SameSite varco sets: use \"lax\" or \"none\""),
                );
                false
            }
        };
        let mut read = |name: &str, file: &Option<String>| {
            file.as_ref().and_then(|t| {
                let path = base.join(t);
                std::fs::read_to_string(&path)
                    .map_err(|e| p.add(key(name), format!("cannot read {}: {e}", path.display())))
                    .ok()
            })
        };
        let page_template = read("page_template", &r.page_template);
        let error_template = read("error_template", &r.error_template);
        let templates = [
            (
                "page_template",
                &page_template,
                &crate::page::waiting::VARIABLES[..],
            ),
            (
                "error_template",
                &error_template,
                &crate::page::error_variable_names()[..],
            ),
        ];
        for (name, text, known) in templates {
            let unknown = text
                .as_deref()
                .map(|t| crate::page::unknown_variables(t, known))
                .unwrap_or_default();
            for v in unknown {
                let hint = crate::page::meant(&v, known)
                    .map(|k| format!(" (did you mean {{{{{k}}}}}?)"))
                    .unwrap_or_default();
                p.add_entry(
                    &key(name),
                    format!("{{{{{v}}}}} is no variable of this page{hint}: every person would see it as written; the README lists the variables, and in the page's text &#123;&#123;{v}}}}} shows the braces"),
                );
            }
        }
        if r.per_ip.tickets_per_minute == 0 {
            p.add(key("per_ip.tickets_per_minute"), "must be at least 1");
        }
        if r.per_ip.status_per_minute == 0 {
            p.add(key("per_ip.status_per_minute"), "must be at least 1");
        }
        let adaptive = r
            .adaptive
            .as_ref()
            .map(|a| parse_adaptive(a, r.admission_per_minute, &key, &mut p));
        let in_flight = r.in_flight.as_ref().map(|f| {
            if f.adaptive && r.adaptive.is_none() {
                p.add(
                    key("in_flight.adaptive"),
                    "an adaptive limit follows the room's adaptive admission: add an adaptive table to the room, or set a fixed limit",
                );
            }
            if f.limit == 0 {
                p.add(
                    key("in_flight.limit"),
                    "must be at least 1 request at once (remove in_flight for no cap)",
                );
            }
            let why = "more requests at once than one process can hold";
            p.at_most(&key("in_flight.limit"), f.limit, MAX_COUNT, why);
            if let Some(q) = f.queue {
                p.at_most(&key("in_flight.queue"), q, MAX_COUNT, why);
            }
            if let Some(most) = f.per_session {
                if most == 0 || most > f.limit {
                    p.add(
                        key("in_flight.per_session"),
                        format!(
                            "must be from 1 to in_flight.limit ({}) slots one session holds at once",
                            f.limit
                        ),
                    );
                }
            }
            InFlightConfig {
                limit: f.limit.max(1),
                queue: f
                    .queue
                    .unwrap_or(f.limit.saturating_mul(DEFAULT_IN_FLIGHT_QUEUE_FACTOR)),
                wait: p.duration(&key("in_flight.wait"), &f.wait),
                adaptive: f.adaptive,
                per_session: f.per_session,
            }
        });
        let lanes = parse_lanes(&r.lanes, &key, base, &mut p);
        let per_session = r.per_session.as_ref().map(|s| {
            if !(1..=10_000).contains(&s.requests_per_second) {
                p.add(
                    key("per_session.requests_per_second"),
                    "must be between 1 and 10000 requests a second",
                );
            }
            let rate = s.requests_per_second.clamp(1, 10_000);
            let burst = s
                .burst
                .unwrap_or(rate.saturating_mul(DEFAULT_SESSION_BURST_SECONDS));
            if burst < rate {
                p.add(
                    key("per_session.burst"),
                    format!("must be at least requests_per_second ({rate}): a second's worth"),
                );
            }
            (rate, burst.max(rate))
        });
        let health_check = r
            .health_check
            .as_ref()
            .map(|h| parse_health_check(h, &key, &mut p));
        let room = RoomConfig {
            name: name.clone(),
            upstreams,
            weights,
            hosts,
            paths: r.paths.clone(),
            paths_ignore_case: r.paths_ignore_case,
            preserve_host: r.preserve_host,
            tls_server_name,
            response_timeout,
            admission_per_minute: adaptive
                .as_ref()
                .map(|a| {
                    // max then min, not clamp: with the bounds refused
                    // above (NaN, crossed), clamp would panic before the
                    // errors are told.
                    r.admission_per_minute
                        .unwrap_or(a.min_per_minute)
                        .max(a.min_per_minute)
                        .min(a.max_per_minute.max(a.min_per_minute))
                })
                .or(r.admission_per_minute),
            max_active: r.max_active,
            session_idle,
            claim_window,
            ticket_ttl,
            mode,
            opens_at_ms,
            opens_at_offset_s,
            bypass,
            exempt_paths: r.exempt_paths.clone(),
            // Matched once here in the form requests are, not at every
            // request of someone in line.
            flow_paths: r
                .flow_paths
                .iter()
                .map(|f| crate::router::as_matched(f).into_owned())
                .collect(),
            flow_window,
            failure_grace,
            max_reentries: r.max_reentries,
            max_flow_returns: r.max_flow_returns,
            language,
            cross_site_cookies,
            page_template,
            error_template,
            tickets_per_ip_per_minute: r.per_ip.tickets_per_minute,
            status_per_ip_per_minute: r.per_ip.status_per_minute,
            per_session,
            adaptive,
            in_flight,
            health_check,
            lanes,
            other_rooms_secrets: Vec::new(),
        };
        if room.is_gated() && keys.is_none() {
            p.add(
                "secrets",
                format!("room \"{name}\" is gated (admission limits, an opening, or mode {}), so tickets need a signing key: set secrets.key_file or secrets.key_env (secrets.ephemeral = true only for a demo: tickets then die with the process)", room.mode.as_str()),
            );
        }
        rooms.push(room);
    }
    same_server_names(&rooms, &mut p);
    let secrets: Vec<Vec<(http::HeaderName, String)>> = rooms
        .iter()
        .map(|r| r.own_secret_headers().cloned().collect())
        .collect();
    for (i, room) in rooms.iter_mut().enumerate() {
        room.other_rooms_secrets = secrets
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, s)| s.iter().cloned())
            .collect();
    }

    let audit_log = raw.audit.log.as_ref().map(|l| base.join(l));
    p.in_a_folder("audit.log", audit_log.as_deref(), "the log");
    if raw.audit.log.as_ref().is_some_and(|l| l.trim().is_empty()) {
        p.add("audit.log", "is empty: name the log's file");
    } else if let Some(l) = audit_log.as_deref().filter(|l| l.is_dir()) {
        p.add(
            "audit.log",
            format!("{} is a folder: name a file in it", l.display()),
        );
    }
    let arrival_key = load_arrival_key(&raw.secrets, base, &mut p);
    // The portal holds a copy of the arrival key: were it a signing key,
    // whoever reads it there could sign passes and skip the line.
    if let (Some(keys), Some(arrival)) = (&keys, &arrival_key) {
        if keys.holds_secret(arrival) {
            p.add(
                if raw.secrets.arrival_key_file.is_some() {
                    "secrets.arrival_key_file"
                } else {
                    "secrets.arrival_key_env"
                },
                "is one of the ticket signing keys: the portal gets a copy of the arrival key, and with it could sign passes; make another (`head -c 32 /dev/urandom | base64`)",
            );
        }
    }
    if p.0.is_empty() {
        let keys = keys.unwrap_or_else(Keyring::ephemeral);
        let named = [
            ("secrets.key_file", &raw.secrets.key_file),
            ("admin.tokens_file", &raw.admin.tokens_file),
            ("secrets.arrival_key_file", &raw.secrets.arrival_key_file),
            ("store.url_file", &raw.store.url_file),
        ];
        let rooms_secret_files = raw.rooms.iter().flat_map(|(name, r)| {
            let bypass = r
                .bypass
                .as_ref()
                .and_then(|b| b.secret_file.as_ref())
                .map(|f| (format!("rooms.{name}.bypass.secret_file"), base.join(f)));
            let lanes = r.lanes.iter().filter_map(move |(lane, l)| {
                let f = l.secret_file.as_ref()?;
                Some((
                    format!("rooms.{name}.lanes.{lane}.secret_file"),
                    base.join(f),
                ))
            });
            bypass.into_iter().chain(lanes)
        });
        let secret_files = named
            .into_iter()
            .filter_map(|(key, file)| Some((key.to_string(), base.join(file.as_ref()?))))
            .chain(rooms_secret_files)
            .chain(
                raw.upstream
                    .tls_client
                    .iter()
                    .map(|t| ("upstream.tls_client.key".to_string(), base.join(&t.key))),
            )
            .chain(server.tls.iter().flat_map(|t| {
                t.certificates
                    .iter()
                    .map(|c| ("server.tls.key".to_string(), c.key.clone()))
            }))
            .collect();
        Ok(Config {
            secret_files,
            server,
            upstream,
            log,
            store,
            keys,
            admin_tokens,
            rooms,
            audit_log,
            arrival_key,
            raw,
        })
    } else {
        Err(ConfigErrors(p.0))
    }
}

fn parse_adaptive(
    a: &RawAdaptive,
    start: Option<f64>,
    key: &dyn Fn(&str) -> String,
    p: &mut Problems,
) -> AdaptiveConfig {
    let positive = |x: f64| x > 0.0 && x <= MAX_PER_MINUTE;
    if !positive(a.min_per_minute) {
        p.add(
            key("adaptive.min_per_minute"),
            "must be a positive number of new sessions per minute, at most 1000000000",
        );
    }
    if !positive(a.max_per_minute) || a.max_per_minute < a.min_per_minute {
        p.add(
            key("adaptive.max_per_minute"),
            "must be a number of new sessions per minute at least min_per_minute, at most 1000000000",
        );
    }
    if let Some(s) = start {
        if s < a.min_per_minute || s > a.max_per_minute {
            p.add(
                key("admission_per_minute"),
                "with adaptive, it is where the rate starts: it must lie within adaptive.min_per_minute and adaptive.max_per_minute",
            );
        }
    }
    if !(0.0..1.0).contains(&a.max_error_rate) {
        p.add(
            key("adaptive.max_error_rate"),
            "must be a fraction of failed upstream answers, 0 or more and below 1 (0.01 is 1%)",
        );
    }
    if !(a.percentile > 0.0 && a.percentile < 1.0) {
        p.add(
            key("adaptive.percentile"),
            "must be a fraction between 0 and 1 (0.9 is the 90th percentile)",
        );
    }
    if !(a.backoff > 0.0 && a.backoff < 1.0) {
        p.add(
            key("adaptive.backoff"),
            "must be a factor between 0 and 1 (0.7 cuts the rate to 70% on overload)",
        );
    }
    let step = a.step_per_minute.unwrap_or_else(|| {
        ((a.max_per_minute - a.min_per_minute) * DEFAULT_ADAPTIVE_STEP_FRACTION)
            .max(a.min_per_minute.min(1.0))
    });
    if !positive(step) {
        p.add(
            key("adaptive.step_per_minute"),
            "must be a positive number of new sessions per minute",
        );
    }
    let interval = p.duration(&key("adaptive.interval"), &a.interval);
    if interval < Duration::from_millis(100) {
        p.add(
            key("adaptive.interval"),
            "must be at least 100ms: each decision needs upstream answers to judge",
        );
    }
    let target_latency = p.duration(&key("adaptive.target_latency"), &a.target_latency);
    // Each change of rate starts the count afresh, so a decision sees only
    // answers sent and received within one interval: none slower than the
    // interval. With the target that close, a portal slowing down would
    // look healthy while the rate climbs.
    if interval < target_latency.saturating_mul(2) {
        p.add(
            key("adaptive.interval"),
            format!(
                "must be at least twice adaptive.target_latency ({}), or answers slower than the target never arrive within one interval: set it to \"{}\" or more",
                humantime::format_duration(target_latency),
                humantime::format_duration(target_latency.saturating_mul(2))
            ),
        );
    }
    AdaptiveConfig {
        min_per_minute: a.min_per_minute,
        max_per_minute: a.max_per_minute,
        target_latency,
        max_error_rate: a.max_error_rate,
        percentile: a.percentile,
        interval,
        step_per_minute: step,
        backoff: a.backoff,
    }
}

/// A CIDR ("10.0.0.0/8") or a single address ("192.0.2.7") that names
/// some machines: `0.0.0.0/0` (or `::/0`) is refused, for every list it
/// could go in says who is trusted
/// or let through: as a bypass it takes the room's gate off for everyone,
/// in `trusted_proxies` it lets anyone name any client (a bypass address,
/// another's limit).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "\"{text}\" is not an address or CIDR: write e.g. \"10.0.0.0/8\" or \"192.0.2.7\""
            )
        })?;
    if net.prefix_len() == 0 {
        return Err(format!(
            "\"{text}\" covers every address, so it would trust or let through anyone: name the networks meant"
        ));
    }
    Ok(net)
}

/// The certificates of a PEM file of roots (a private CA).
fn read_roots(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let roots = crate::tls::read_certificates(path)?;
    let (_, ignored) = rustls::RootCertStore::empty().add_parsable_certificates(roots.clone());
    if ignored > 0 {
        return Err(format!(
            "{}: {ignored} of its {} certificates cannot be used as roots",
            path.display(),
            roots.len()
        ));
    }
    Ok(roots)
}

/// The largest lane weight taken: weights are added up, and two of
/// 1e308 made infinity (every lane's share of the rate 0).
const MAX_LANE_WEIGHT: f64 = 1_000_000.0;
/// The shortest `session_idle` taken.
const MIN_SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

fn parse_upstream(text: &str) -> Result<Uri, String> {
    let uri: Uri = text
        .parse()
        .map_err(|_| format!("\"{text}\" is not a URL: write e.g. \"http://127.0.0.1:9001\""))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s.to_string(),
        Some(other) => {
            return Err(format!(
                "\"{text}\": varco speaks http:// and https:// to upstreams, not {other}://"
            ))
        }
        None => {
            return Err(format!(
                "\"{text}\" needs a scheme: write e.g. \"http://{text}\""
            ))
        }
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("\"{text}\" has no host"))?
        .clone();
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("\"{text}\" has a path: an upstream is scheme://host:port only; requests keep their own path"));
    }
    // The URL parser takes any text after the host's colon, and a port it
    // cannot read is none: the default port's, silently.
    if authority.as_str().contains('@') {
        return Err(format!("\"{text}\" holds credentials, which varco would not send: an upstream is scheme://host:port only"));
    }
    let after_host = &authority.as_str()[authority.host().len()..];
    if !after_host.is_empty() && authority.port_u16().is_none_or(|p| p == 0) {
        return Err(format!(
            "\"{text}\" has no valid port ({after_host}): write a number from 1 to 65535, or none for the scheme's"
        ));
    }
    Uri::builder()
        .scheme(scheme.as_str())
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(|e| format!("\"{text}\": {e}"))
}

fn parse_host(text: &str) -> Result<HostPattern, String> {
    let t = text.trim().to_ascii_lowercase();
    // The root's dot (`example.org.`): a request's Host loses it before it
    // is matched, so written here it would match nothing.
    let t = t.strip_suffix('.').map(str::to_string).unwrap_or(t);
    let valid = |h: &str| {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    if t == "*" {
        Ok(HostPattern::Any)
    } else if let Some(rest) = t.strip_prefix("*.") {
        if valid(rest) {
            Ok(HostPattern::Suffix(format!(".{rest}")))
        } else {
            Err(format!(
                "\"{text}\" is not a host pattern: use \"*\", \"*.example.org\" or \"example.org\""
            ))
        }
    } else if valid(&t) {
        Ok(HostPattern::Exact(t))
    } else {
        Err(format!("\"{text}\" is not a host pattern: use \"*\", \"*.example.org\" or \"example.org\" (no port)"))
    }
}

fn parse_bypass(
    b: &file::RawBypass,
    table: &str,
    key: &dyn Fn(&str) -> String,
    base: &Path,
    p: &mut Problems,
) -> Bypass {
    let cidrs = b
        .cidrs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            parse_cidr(c)
                .map_err(|e| p.add(key(&format!("{table}.cidrs[{i}]")), e))
                .ok()
        })
        .collect();
    let secret = match (&b.secret_file, &b.secret_env) {
        (Some(f), None) => file_value(f, &key(&format!("{table}.secret_file")), base, p),
        (None, Some(v)) => env_value(v, &key(&format!("{table}.secret_env")), p),
        (Some(_), Some(_)) => {
            p.add(key(table), "set secret_file or secret_env, not both");
            None
        }
        (None, None) => None,
    };
    if let Some(problem) = secret.as_deref().and_then(guessable) {
        p.add(key(table), format!("the secret {problem}"));
    }
    let header = match (&b.header, secret) {
        (Some(h), Some(s)) => match http::HeaderName::from_bytes(h.as_bytes()) {
            Ok(name) => Some((name, s)),
            Err(_) => {
                p.add(
                    key(&format!("{table}.header")),
                    format!("\"{h}\" is not a header name"),
                );
                None
            }
        },
        (Some(_), None) => {
            p.add(
                key(&format!("{table}.header")),
                format!("needs its secret: set {table}.secret_file or {table}.secret_env"),
            );
            None
        }
        (None, Some(_)) => {
            p.add(
                key(&format!("{table}.header")),
                "a secret is set but no header carries it",
            );
            None
        }
        (None, None) => None,
    };
    Bypass { cidrs, header }
}

/// Why a bypass secret, lane secret or admin token is no secret, if it
/// is not: short; with a character a header does not carry as written
/// (a space, a letter past ASCII: `caller` reads a token as ASCII, so
/// such a token could never match); few different characters
/// (`0000000000000000`); or one piece said over and over
/// (`changemechangeme`). A generated one passes: 16 random hex digits
/// have 5 different ones or more but for a chance of one in two million.
pub(crate) fn guessable(secret: &str) -> Option<String> {
    const HOW: &str = "make one with `head -c 24 /dev/urandom | base64`";
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 16 {
        return Some(format!(
            "is shorter than 16 characters: anyone could guess it; {HOW}"
        ));
    }
    // The character itself is not said: it is part of the secret.
    if let Some(c) = chars.iter().find(|c| !c.is_ascii_graphic()) {
        let what = if c.is_ascii() {
            "a space or a control character"
        } else {
            "a character past ASCII"
        };
        return Some(format!(
            "holds {what}: only visible ASCII characters arrive in a header as written; {HOW}"
        ));
    }
    let mut seen = chars.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() < 5 {
        return Some(format!(
            "has only {} different characters: anyone could guess it; {HOW}",
            seen.len()
        ));
    }
    let n = chars.len();
    if let Some(period) = (1..=n / 2).find(|p| chars[*p..] == chars[..n - p]) {
        return Some(format!(
            "is \"{}\" over and over: anyone could guess it; {HOW}",
            chars[..period].iter().collect::<String>()
        ));
    }
    None
}

/// A secrets or tokens file that toml cannot read, said without the line
/// it stopped on: toml's own message quotes that line, which holds a key
/// or a token, and this goes to the journal, the audit log of a refused
/// reload and the reload's answer.
fn secret_file_error(text: &str, e: &toml::de::Error) -> String {
    let message = super::one_line(e);
    // serde quotes a value of the wrong type (`invalid type: string
    // "Zq8v..."`): the message stops before it.
    let message = match message.split_once('"') {
        Some((before, _)) => format!("{}(the value is not shown)", before),
        None => message,
    };
    message + &super::location(text, e)
}

/// The keys that sign tickets and passes, from a file or the environment.
fn load_keys(s: &file::RawSecrets, base: &Path, p: &mut Problems) -> Option<Keyring> {
    use base64::Engine;
    let decode = |text: &str| {
        let t = text.trim();
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
    };
    let mut keys = Vec::new();
    let mut problem = |key: &str, reason: String| p.add_entry(key, reason);
    if let Some(f) = &s.key_file {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct KeyFile {
            keys: Vec<KeyEntry>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct KeyEntry {
            id: String,
            secret: String,
            /// Verifies what it signed, signs nothing: the first step of a
            /// rotation across a cluster, or the last of one.
            #[serde(default)]
            verify_only: bool,
        }
        let path = base.join(f);
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<KeyFile>(&t).map_err(|e| secret_file_error(&t, &e)))
        {
            Ok(kf) => keys.extend(
                kf.keys
                    .into_iter()
                    .map(|k| ("secrets.key_file", k.id, decode(&k.secret), k.verify_only)),
            ),
            Err(e) => problem(
                "secrets.key_file",
                format!("cannot use {}: {e}", path.display()),
            ),
        }
    }
    if let Some(var) = &s.key_env {
        match std::env::var(var) {
            Ok(v) => {
                for part in v.split(',').filter(|x| !x.trim().is_empty()) {
                    match part.split_once(':') {
                        Some((id, secret)) => keys.push((
                            "secrets.key_env",
                            id.trim().to_string(),
                            decode(secret),
                            false,
                        )),
                        None => problem(
                            "secrets.key_env",
                            format!(
                                "{var} holds an entry without \"id:\"; write id:base64,id:base64"
                            ),
                        ),
                    }
                }
            }
            Err(_) => problem(
                "secrets.key_env",
                format!("the environment variable {var} is not set"),
            ),
        }
    }
    let mut ring = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Each problem under the key the entry came from: with key_file and
    // key_env both set, "secrets" alone would not say where to look.
    let mut verify_only = Vec::new();
    for (from, id, secret, only_verifies) in keys {
        // A reload keeps the key varco made up at start, by this id (see
        // `App::reload`): a listed key of that name would outlive its
        // removal from the file.
        if id == crate::room::token::EPHEMERAL_KEY_ID {
            problem(
                from,
                format!("key id \"{id}\" is the name of the key varco makes up when none is given: give this key another id"),
            );
            continue;
        }
        // Verification takes the first key of an id, signing the newest:
        // two keys under one id would reject every token varco signs.
        if !seen.insert(id.clone()) {
            problem(
                from,
                format!("key id \"{id}\" is given twice (key_file and key_env together?): give each key its own id"),
            );
            continue;
        }
        match secret {
            Ok(b) if b.len() >= 32 => {
                let key = crate::room::token::SigningKey { id, secret: b };
                if only_verifies {
                    verify_only.push(key);
                } else {
                    ring.push(key);
                }
            }
            Ok(_) => problem(from, format!("key \"{id}\" is shorter than 32 bytes: make one with `head -c 32 /dev/urandom | base64`")),
            Err(_) => problem(from, format!("key \"{id}\" is not base64")),
        }
    }
    if ring.is_empty() && !verify_only.is_empty() {
        problem(
            "secrets.key_file",
            "every key is verify_only: one key must sign".into(),
        );
        return None;
    }
    if ring.is_empty() {
        match (&s.key_file, &s.key_env) {
            (Some(_), None) => problem("secrets.key_file", "no usable key found".into()),
            (None, Some(_)) => problem("secrets.key_env", "no usable key found".into()),
            (Some(_), Some(_)) => problem("secrets", "no usable key found".into()),
            (None, None) => {}
        }
        return s.ephemeral.then(Keyring::ephemeral);
    }
    if s.ephemeral {
        problem(
            "secrets.ephemeral",
            "cannot be true when keys are given".into(),
        );
    }
    // The keyring's last key signs: the verifying-only ones go first.
    verify_only.extend(ring);
    Some(Keyring::new(verify_only))
}

/// A room's lanes: each a weight and a selector (addresses, a header with
/// a secret, or a header carrying a token signed with that secret); the
/// one lane without a selector takes everyone else.
fn parse_lanes(
    raw: &std::collections::BTreeMap<String, file::RawLane>,
    key: &dyn Fn(&str) -> String,
    base: &Path,
    p: &mut Problems,
) -> Vec<LaneConfig> {
    let mut lanes = Vec::new();
    for (name, l) in raw {
        let table = format!("lanes.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.add(
                key(&table),
                "a lane's name is letters, digits, '-' and '_' (it is a metric label)",
            );
        }
        if !(l.weight > 0.0 && l.weight <= MAX_LANE_WEIGHT) {
            p.add(
                key(&format!("{table}.weight")),
                format!("must be a positive share of the room's rate, e.g. 0.2, at most {MAX_LANE_WEIGHT}"),
            );
        }
        let selector = parse_bypass(
            &file::RawBypass {
                cidrs: l.cidrs.clone(),
                header: l.header.clone(),
                secret_file: l.secret_file.clone(),
                secret_env: l.secret_env.clone(),
            },
            &table,
            key,
            base,
            p,
        );
        if l.signed && selector.header.is_none() {
            p.add(
                key(&format!("{table}.signed")),
                "a signed lane header needs header and its secret",
            );
        }
        lanes.push(LaneConfig {
            name: name.clone(),
            weight: l.weight,
            selector,
            signed: l.signed,
        });
    }
    let defaults = lanes.iter().filter(|l| l.is_default()).count();
    if !lanes.is_empty() && defaults != 1 {
        p.add(
            key("lanes"),
            format!("exactly one lane has no cidrs and no header: it takes everyone else (found {defaults})"),
        );
    }
    lanes
}

/// A secret given in a file (relative to the config), trimmed: a file
/// ends in a newline, which no header value or URL holds. None, said
/// under `key`, if it cannot be read.
fn file_value(file: &str, key: &str, base: &Path, p: &mut Problems) -> Option<String> {
    let path = base.join(file);
    std::fs::read_to_string(&path)
        .map(|text| text.trim().to_string())
        .map_err(|e| p.add(key, format!("cannot read {}: {e}", path.display())))
        .ok()
}

/// A secret given in an environment variable, trimmed as a file's is (a
/// Kubernetes secret made from a file holds its newline). None, said
/// under `key`, if it is not set.
fn env_value(var: &str, key: &str, p: &mut Problems) -> Option<String> {
    std::env::var(var)
        .map(|text| text.trim().to_string())
        .map_err(|_| {
            p.add(
                key,
                format!("the environment variable {var} is not set (or not UTF-8)"),
            )
        })
        .ok()
}

/// The Redis URL with the key it came from: `store.url`, or read from
/// `url_file` or `url_env`, so that its password need not sit in the
/// config file (trimmed: a file ends in a newline). Err: it was named but
/// could not be read (said under that key).
fn store_url(
    s: &RawStore,
    base: &Path,
    p: &mut Problems,
) -> Result<Option<(String, &'static str)>, ()> {
    match (&s.url, &s.url_file, &s.url_env) {
        (None, None, None) => Ok(None),
        (Some(url), None, None) => Ok(Some((url.clone(), "store.url"))),
        (None, Some(file), None) => file_value(file, "store.url_file", base, p)
            .map(|url| Some((url, "store.url_file")))
            .ok_or(()),
        (None, None, Some(var)) => env_value(var, "store.url_env", p)
            .map(|url| Some((url, "store.url_env")))
            .ok_or(()),
        _ => {
            p.add("store.url", "set one of url, url_file and url_env");
            Err(())
        }
    }
}

/// The key that signs `X-Varco-Arrival`: base64, at least 32 bytes.
fn load_arrival_key(s: &file::RawSecrets, base: &Path, p: &mut Problems) -> Option<Vec<u8>> {
    use base64::Engine;
    let (key, text) = match (&s.arrival_key_file, &s.arrival_key_env) {
        (Some(_), Some(_)) => {
            p.add(
                "secrets.arrival_key_env",
                "give the arrival key once: a file or an environment variable",
            );
            return None;
        }
        (Some(f), None) => (
            "secrets.arrival_key_file",
            file_value(f, "secrets.arrival_key_file", base, p)?,
        ),
        (None, Some(var)) => (
            "secrets.arrival_key_env",
            env_value(var, "secrets.arrival_key_env", p)?,
        ),
        (None, None) => return None,
    };
    let t = text.as_str();
    match base64::engine::general_purpose::STANDARD
        .decode(t)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t))
    {
        Ok(b) if b.len() >= 32 => Some(b),
        Ok(_) => {
            p.add(key, "the key is shorter than 32 bytes: make one with `head -c 32 /dev/urandom | base64`");
            None
        }
        Err(_) => {
            p.add(key, "the key is not base64");
            None
        }
    }
}

/// The admin API's bearer tokens; without any, the admin listener answers
/// only /metrics, /healthz and /readyz.
fn load_admin_tokens(a: &file::RawAdmin, base: &Path, p: &mut Problems) -> Vec<AdminToken> {
    let mut tokens = Vec::new();
    if let Some(f) = &a.tokens_file {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct TokenFile {
            tokens: Vec<AdminToken_>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct AdminToken_ {
            id: String,
            token: String,
        }
        let path = base.join(f);
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<TokenFile>(&t).map_err(|e| secret_file_error(&t, &e)))
        {
            // A source named but empty turns the admin API off without a
            // word, and with it `/api/reload`: said, as an empty key
            // source is.
            Ok(tf) if tf.tokens.is_empty() => p.add_entry(
                "admin.tokens_file",
                format!(
                    "{} holds no token: the admin API would be off; add a [[tokens]] entry, or remove admin.tokens_file",
                    path.display()
                ),
            ),
            // Trimmed, as the variable's are: a Bearer token arrives
            // without the spaces around it, and could never match.
            Ok(tf) => tokens.extend(tf.tokens.into_iter().map(|t| {
                (
                    "admin.tokens_file",
                    AdminToken {
                        id: t.id.trim().into(),
                        token: t.token.trim().into(),
                    },
                )
            })),
            Err(e) => p.add_entry(
                "admin.tokens_file",
                format!("cannot use {}: {e}", path.display()),
            ),
        }
    }
    if let Some(var) = &a.tokens_env {
        match std::env::var(var) {
            Ok(v) if v.split(',').all(|x| x.trim().is_empty()) => p.add_entry(
                "admin.tokens_env",
                format!(
                    "{var} holds no token: the admin API would be off; write id:token,id:token, or remove admin.tokens_env"
                ),
            ),
            Ok(v) => {
                for part in v.split(',').filter(|x| !x.trim().is_empty()) {
                    match part.split_once(':') {
                        Some((id, token)) => tokens.push((
                            "admin.tokens_env",
                            AdminToken {
                                id: id.trim().into(),
                                token: token.trim().into(),
                            },
                        )),
                        None => p.add_entry(
                            "admin.tokens_env",
                            format!(
                                "{var} holds an entry without \"id:\"; write id:token,id:token"
                            ),
                        ),
                    }
                }
            }
            Err(_) => p.add_entry(
                "admin.tokens_env",
                format!("the environment variable {var} is not set"),
            ),
        }
    }
    // Named by where each token came from, as the operator wrote it. The
    // audit log names who acted by the id of the token presented: each
    // id names one token, each token one id.
    for (i, (source, t)) in tokens.iter().enumerate() {
        if let Some(problem) = guessable(&t.token) {
            p.add_entry(source, format!("token \"{}\" {problem}", t.id));
        }
        if t.id.is_empty() {
            p.add_entry(
                source,
                "a token without an id: the audit log names who acted by it",
            );
        }
        let before = &tokens[..i];
        if !t.id.is_empty() && before.iter().any(|(_, o)| o.id == t.id) {
            p.add_entry(
                source,
                format!(
                    "id \"{}\" names two tokens: the audit log could not tell who acted",
                    t.id
                ),
            );
        }
        if let Some((_, o)) = before.iter().find(|(_, o)| o.token == t.token) {
            p.add_entry(
                source,
                format!(
                    "ids \"{}\" and \"{}\" share one token: each person or tool gets its own",
                    o.id, t.id
                ),
            );
        }
    }
    tokens.into_iter().map(|(_, t)| t).collect()
}

/// Whether a path prefix `e` takes in everything under a room's path:
/// the path itself or one above it, or the path with its slash (`/app/`
/// for `/app`, which leaves out only `/app` itself).
fn covers(e: &str, room_path: &str) -> bool {
    // Both as requests are matched (`/caf%C3%A8` is `/café`).
    let (e, room_path) = (
        crate::router::as_matched(e),
        crate::router::as_matched(room_path),
    );
    crate::router::prefix_matches(&e, &room_path)
        || e.strip_suffix('/') == Some(room_path.trim_end_matches('/'))
}

/// The smallest `max_body_size`: a login form's body fits.
const MIN_BODY_SIZE: u64 = 1 << 10;

/// The shortest time between two snapshots.
const MIN_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest admission tick: ticks are counted in whole milliseconds.
const MIN_TICK: Duration = Duration::from_millis(10);

/// The longest: a third of the shortest claim window, so a turn not
/// claimed lapses within a third of its window after it ends.
const MAX_TICK: Duration =
    Duration::from_secs(crate::page::waiting::MIN_CLAIM_WINDOW.as_secs() / 3);

/// The longest `store.lease`: how long a line may stand still after the
/// node advancing it dies.
const MAX_LEASE: Duration = Duration::from_secs(60);

/// Why an `exempt_paths` or `flow_paths` entry (`kind`) could not match
/// as written, if it could not.
fn prefix_problem(e: &str, kind: &str) -> Option<String> {
    if !e.starts_with('/') {
        Some(format!("\"{e}\" is not a path prefix: it starts with '/'"))
    } else if e.contains('?') {
        // Exempt entries were once prefixes of path and query: a config
        // written for that is told, not read another way.
        Some(format!(
            "\"{e}\" holds a query: {kind} paths match the path alone, on whole segments"
        ))
    } else if crate::request_path::normalise(e) != Ok(None) {
        // Paths are matched once made canonical: `/a//b` or `/static%2f`
        // would never match anything.
        Some(format!("\"{e}\" is not a path in canonical form (no `//`, `.` or `..` segments, escapes of unreserved characters, or lower-case escapes): it would never match"))
    } else {
        None
    }
}
