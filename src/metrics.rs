//! Every metric varco exports: its name, help text and labels, in one
//! place. Labels are room, upstream, class or kind: never a raw path or a
//! client address, so cardinality stays bounded on a click day.

use crate::increases::Increases;
use crate::room::adaptive::{Direction, Reason};
use crate::router::SharedRouting;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family varco exports (deploy/ is checked against this).
pub const NAMES: &[&str] = &[
    "varco_requests_total",
    "varco_request_duration_seconds",
    "varco_upstream_response_seconds",
    "varco_upstream_errors_total",
    "varco_upstream_responses_total",
    "varco_upstream_closed_idle_total",
    "varco_upstream_in_flight",
    "varco_upstream_up",
    "varco_upstream_taken_out",
    "varco_upstream_share",
    "varco_upstream_weight",
    "varco_upstream_health_checks_total",
    "varco_open_connections",
    "varco_connections_dropped_total",
    "varco_log_lines_dropped_total",
    "varco_request_bodies_total",
    "varco_request_buffer_bytes",
    "varco_request_buffer_limit_bytes",
    "varco_max_connections",
    "varco_build_info",
    "varco_store_errors_total",
    "varco_store_connections_replaced_total",
    "varco_store_clock_offset_seconds",
    "varco_config_reloads_total",
    "varco_tls_certificate_expiry_timestamp_seconds",
    "varco_rejected_total",
    "varco_wait_seconds",
    "varco_room_queue_length",
    "varco_room_active_sessions",
    "varco_room_queue_counter",
    "varco_room_serving_counter",
    "varco_room_reserved_slots",
    "varco_room_admission_rate_per_minute",
    "varco_room_max_active",
    "varco_room_observed_admissions_per_second",
    "varco_room_estimated_wait_seconds",
    "varco_room_mode",
    "varco_room_leader",
    "varco_tickets_issued_total",
    "varco_admitted_total",
    "varco_abandoned_total",
    "varco_adaptive_adjustments_total",
    "varco_adaptive_latency_seconds",
    "varco_adaptive_failure_ratio",
    "varco_adaptive_target_latency_seconds",
    "varco_adaptive_min_per_minute",
    "varco_adaptive_max_per_minute",
    "varco_in_flight_wait_seconds",
    "varco_room_in_flight",
    "varco_room_in_flight_limit",
    "varco_room_in_flight_queued",
    "varco_room_in_flight_sessions",
    "varco_pass_extensions_total",
    "varco_reentries_total",
    "varco_reentries_refused_total",
    "varco_missed_turns_total",
    "varco_audit_records_total",
    "varco_audit_write_errors_total",
    "varco_state_write_errors_total",
    "varco_state_snapshot_timestamp_seconds",
    "varco_lane_queue_length",
    "varco_lane_active_sessions",
    "varco_lane_admission_rate_per_minute",
    "varco_lane_admitted_total",
];

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub upstream_response_seconds: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub open_connections: IntGauge,
    /// By `crate::listener::Dropped`.
    pub connections_dropped: IntCounterVec,
    /// Read from the log's writer at each scrape.
    log_lines_dropped: IntCounter,
    dropped_lines_counting: std::sync::Mutex<()>,
    /// By handling: buffered, streamed_large, streamed_memory_full.
    pub request_bodies: IntCounterVec,
    pub request_buffer_bytes: IntGauge,
    pub request_buffer_limit_bytes: IntGauge,
    pub max_connections: IntGauge,
    pub build_info: IntGaugeVec,
    pub upstream_responses: IntCounterVec,
    pub upstream_closed_idle: IntCounterVec,
    pub upstream_in_flight: IntGaugeVec,
    /// Rooms with `health_check` only.
    pub upstream_health_checks: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub store_connections_replaced: IntCounterVec,
    /// No labels; no series until a tick measured it (cluster mode).
    pub store_clock_offset: prometheus::GaugeVec,
    pub config_reloads: IntCounterVec,
    /// By `cert` file; no series without TLS.
    tls_certificate_expiry: IntGaugeVec,
    /// The `cert` labels set last, so a reload drops only those it
    /// dropped (a reset first would show a scrape no series at all).
    tls_certificates: std::sync::Mutex<Vec<String>>,
    pub rejected: IntCounterVec,
    pub wait_seconds: HistogramVec,
    pub adaptive_adjustments: IntCounterVec,
    pub in_flight_wait_seconds: HistogramVec,
    pub pass_extensions: IntCounterVec,
    pub reentries: IntCounterVec,
    pub reentries_refused: IntCounterVec,
    pub missed_turns: IntCounterVec,
    pub audit_records: IntCounter,
    pub audit_write_errors: IntCounter,
    /// By kind: `snapshot` or `marks`.
    pub state_write_errors: IntCounterVec,
    /// No labels: a vec so that a node without a snapshot exports no
    /// series (a 0 would look like a snapshot stale since 1970).
    pub snapshot_written: IntGaugeVec,
    /// The room counters as this process saw them rise.
    increases: std::sync::Arc<Increases>,
}

/// Waits in line: seconds to a day, the default `ticket_ttl` (a click
/// day of 300,000 people at 600 a minute is an eight-hour line; past
/// the last bound, `histogram_quantile` reads every wait as that bound).
const WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
    21600.0, 28800.0, 43200.0, 86400.0,
];

/// Latency buckets from 5 ms to 5 min: a portal under click-day load lives
/// in the upper half, and a room's `response_timeout` may be over the
/// default 60 s (past the last bound, quantiles read every answer as that
/// bound).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "varco_requests_total",
                "Requests answered, by room and status class (a room's request whose client left before its answer: 4xx, nginx's 499)",
            ),
            &["room", "class"],
        )
        .expect("valid metric");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "varco_request_duration_seconds",
                "Time from request to response headers, by room",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["room"],
        )
        .expect("valid metric");
        let upstream_response_seconds = HistogramVec::new(
            HistogramOpts::new(
                "varco_upstream_response_seconds",
                "Time an upstream took to send response headers; a request it left unanswered past response_timeout counts at the time waited",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["room", "upstream"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "varco_upstream_errors_total",
                "Failed upstream requests, by kind: connect, timeout, protocol",
            ),
            &["room", "upstream", "kind"],
        )
        .expect("valid metric");
        let open_connections = IntGauge::new(
            "varco_open_connections",
            "Client connections open on the public listener",
        )
        .expect("valid metric");
        let connections_dropped = IntCounterVec::new(
            Opts::new(
                "varco_connections_dropped_total",
                "Client connections closed before any request was read, by reason: per_address (over server.max_connections_per_ip), proxy_header (a PROXY header missing, bad or late, or from a peer not in trusted_proxies), tls_handshake (failed or timed out)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        // At 0 from the start, so an alert on increase() sees the first.
        for why in crate::listener::Dropped::ALL {
            connections_dropped.with_label_values(&[why.label()]);
        }
        let log_lines_dropped = IntCounter::new(
            "varco_log_lines_dropped_total",
            "Log lines dropped because the reader of varco's stderr fell behind by more than the lines held in memory",
        )
        .expect("valid metric");
        let request_buffer_bytes = IntGauge::new(
            "varco_request_buffer_bytes",
            "Memory set aside for request bodies read whole (upstream.request_buffer), from their first byte until they are written to an upstream",
        )
        .expect("valid metric");
        let request_buffer_limit_bytes = IntGauge::new(
            "varco_request_buffer_limit_bytes",
            "upstream.request_buffer_memory: the most request bodies read whole may hold together",
        )
        .expect("valid metric");
        let max_connections = IntGauge::new(
            "varco_max_connections",
            "server.max_connections: the client connections the public listener holds at once (more wait in the backlog)",
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "varco_build_info",
                "Always 1; the version label says which varco runs",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let upstream_responses = counter(
            "varco_upstream_responses_total",
            "Responses from upstreams, by status class",
            &["room", "upstream", "class"],
        );
        let upstream_closed_idle = counter(
            "varco_upstream_closed_idle_total",
            "Requests that met a kept-alive connection the upstream had closed and went again (not failures; many mean upstream.pool_idle_timeout is above the upstream's keep-alive)",
            &["room", "upstream"],
        );
        let upstream_in_flight = IntGaugeVec::new(
            Opts::new(
                "varco_upstream_in_flight",
                "Requests waiting for an upstream's response headers",
            ),
            &["room", "upstream"],
        )
        .expect("valid metric");
        let upstream_health_checks = counter(
            "varco_upstream_health_checks_total",
            "Active health checks of an upstream (rooms with health_check), by result: passed or failed",
            &["room", "upstream", "result"],
        );
        let request_bodies = counter(
            "varco_request_bodies_total",
            "Request bodies, by handling: buffered (read whole first), streamed_large (larger than upstream.request_buffer), streamed_memory_full (upstream.request_buffer_memory was in use), streamed_slow (not whole within upstream.request_buffer_time); refused_large, refused_memory_full, refused_slow: the same for a request let through without a pass (an exempt path, a login detour), refused rather than streamed",
            &["handling"],
        );
        // From 0, so increase() sees the first body streamed for want of
        // memory.
        for handling in [
            "buffered",
            "streamed_large",
            "streamed_memory_full",
            "streamed_slow",
            "refused_large",
            "refused_memory_full",
            "refused_slow",
        ] {
            request_bodies.with_label_values(&[handling]);
        }
        let store_errors = counter(
            "varco_store_errors_total",
            "Store operations that failed: ticks, the gate's and the status's questions, operators' changes",
            &["room"],
        );
        let store_connections_replaced = counter(
            "varco_store_connections_replaced_total",
            "Times the connection to Redis was replaced, by reason: unanswered (calls timed out in a row: a connection dropped on the way) or read_only (Redis was demoted to replica); 0 from the start, cluster mode only",
            &["reason"],
        );
        let store_clock_offset = prometheus::GaugeVec::new(
            Opts::new(
                "varco_store_clock_offset_seconds",
                "This node's clock minus Redis's, measured at the start and at each tick (positive: ahead); cluster mode only. The node runs on Redis's clock, its own moved by this (what it sends, signs and checks); its log lines keep its own",
            ),
            &[],
        )
        .expect("valid metric");
        let config_reloads = counter(
            "varco_config_reloads_total",
            "Config reloads, by result: ok or refused",
            &["result"],
        );
        // From 0, so increase() sees the first refused reload (a series
        // born at 1 shows none, and VarcoReloadRefused would miss it).
        for result in ["ok", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        let tls_certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "varco_tls_certificate_expiry_timestamp_seconds",
                "When each certificate varco presents stops being valid (unix seconds; the earliest of its chain), by cert file: server.tls's, and upstream.tls_client's",
            ),
            &["cert"],
        )
        .expect("valid metric");
        let rejected = counter(
            "varco_rejected_total",
            "Requests turned away, by reason: ip_limit (new tickets), status_ip_limit (polls), session_limit (a pass holder over the per-session rate), closed, cross_site (another site's request holding no pass), not_a_page (an image, script, style sheet, font or media file a page loads, holding no place and not let in straight away: it takes none), in_flight_full and in_flight_wait (admitted, but the in-flight cap and its queue were full), session_in_flight (a pass over in_flight.per_session)",
            &["room", "reason"],
        );
        let wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "varco_wait_seconds",
                "Time in line, from ticket to admission",
            )
            .buckets(WAIT_BUCKETS.to_vec()),
            &["room"],
        )
        .expect("valid metric");
        let adaptive_adjustments = counter(
            "varco_adaptive_adjustments_total",
            "Changes of the adaptive admission rate, by direction and reason (headroom, latency, failures)",
            &["room", "direction", "reason"],
        );
        let in_flight_wait_seconds = HistogramVec::new(
            HistogramOpts::new(
                "varco_in_flight_wait_seconds",
                "Time an admitted request waited for an in-flight slot (those that had to wait)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["room"],
        )
        .expect("valid metric");
        let pass_extensions = counter(
            "varco_pass_extensions_total",
            "Passes extended because the portal failed the person (5xx or no answer)",
            &["room"],
        );
        let reentries = counter(
            "varco_reentries_total",
            "Lapsed passes given back ahead of the queue, by reason: upstream_failure (the portal had failed them), login_detour (a login callback came back) or crash (a session a memory store's crash lost, taken back)",
            &["room", "reason"],
        );
        let reentries_refused = counter(
            "varco_reentries_refused_total",
            "Re-entries refused because the pass had used its max_reentries (after portal failures) or max_flow_returns (after login detours)",
            &["room"],
        );
        let missed_turns = counter(
            "varco_missed_turns_total",
            "Tickets that came back after their turn's claim window had passed (a closed tab, a phone asleep): each took a new place at the back",
            &["room"],
        );
        let audit_records = IntCounter::new(
            "varco_audit_records_total",
            "Records appended to the admission log",
        )
        .expect("valid metric");
        let audit_write_errors = IntCounter::new(
            "varco_audit_write_errors_total",
            "Ticks whose admission log record could not be written durably (failed, or not on disk within 1 s)",
        )
        .expect("valid metric");
        let state_write_errors = counter(
            "varco_state_write_errors_total",
            "Writes of the memory store's snapshot or of its ticket numbers written ahead (marks) that failed: a restart or a crash could lose places",
            &["kind"],
        );
        let snapshot_written = IntGaugeVec::new(
            Opts::new(
                "varco_state_snapshot_timestamp_seconds",
                "When the memory store's snapshot was last written whole, or varco started from it (unix seconds): one older than a few store.snapshot_intervals means a restart would lose the places taken since",
            ),
            &[],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pass_extensions.clone()),
            Box::new(reentries.clone()),
            Box::new(reentries_refused.clone()),
            Box::new(missed_turns.clone()),
            Box::new(audit_records.clone()),
            Box::new(audit_write_errors.clone()),
            Box::new(state_write_errors.clone()),
            Box::new(snapshot_written.clone()),
            Box::new(adaptive_adjustments.clone()),
            Box::new(in_flight_wait_seconds.clone()),
            Box::new(request_seconds.clone()),
            Box::new(upstream_response_seconds.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(open_connections.clone()),
            Box::new(connections_dropped.clone()),
            Box::new(log_lines_dropped.clone()),
            Box::new(request_bodies.clone()),
            Box::new(request_buffer_bytes.clone()),
            Box::new(request_buffer_limit_bytes.clone()),
            Box::new(max_connections.clone()),
            Box::new(build_info.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(upstream_closed_idle.clone()),
            Box::new(upstream_in_flight.clone()),
            Box::new(upstream_health_checks.clone()),
            Box::new(store_errors.clone()),
            Box::new(store_connections_replaced.clone()),
            Box::new(store_clock_offset.clone()),
            Box::new(config_reloads.clone()),
            Box::new(tls_certificate_expiry.clone()),
            Box::new(rejected.clone()),
            Box::new(wait_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // process_open_fds against process_max_fds (a proxy's usual way
        // to fail on a click day: every connection is a file), resident
        // memory, CPU, threads, and the start time that explains a
        // counter's reset: what Prometheus's own client libraries, nginx's
        // and HAProxy's exporters give. Read from /proc: Linux only.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        Metrics {
            registry,
            requests,
            request_seconds,
            upstream_response_seconds,
            upstream_errors,
            open_connections,
            connections_dropped,
            log_lines_dropped,
            dropped_lines_counting: std::sync::Mutex::new(()),
            request_bodies,
            request_buffer_bytes,
            request_buffer_limit_bytes,
            max_connections,
            build_info,
            upstream_responses,
            upstream_closed_idle,
            upstream_in_flight,
            upstream_health_checks,
            store_errors,
            store_connections_replaced,
            store_clock_offset,
            config_reloads,
            tls_certificate_expiry,
            tls_certificates: Default::default(),
            rejected,
            wait_seconds,
            adaptive_adjustments,
            in_flight_wait_seconds,
            pass_extensions,
            reentries,
            reentries_refused,
            missed_turns,
            audit_records,
            audit_write_errors,
            state_write_errors,
            snapshot_written,
            increases: Default::default(),
        }
    }

    /// Shows when each certificate in force expires (`cert` file, unix
    /// seconds), at start and after each reload: certificates a reload
    /// dropped go.
    pub fn certificates_expire(&self, expiries: &[(String, u64)]) {
        let mut shown = self
            .tls_certificates
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (cert, at) in expiries {
            self.tls_certificate_expiry
                .with_label_values(&[cert])
                .set(i64::try_from(*at).unwrap_or(i64::MAX));
        }
        for gone in shown.iter() {
            if !expiries.iter().any(|(cert, _)| cert == gone) {
                let _ = self.tls_certificate_expiry.remove_label_values(&[gone]);
            }
        }
        *shown = expiries.iter().map(|(cert, _)| cert.clone()).collect();
    }

    /// Registers the per-room gauges and counters, read from the rooms'
    /// stores at each scrape (so they cost nothing between scrapes).
    pub fn watch_rooms(&self, routing: SharedRouting) {
        self.follow_rooms(&routing.load().rooms);
        let _ = self.registry.register(Box::new(RoomCollector::new(
            routing,
            self.increases.clone(),
        )));
    }

    /// Takes in the rooms' totals for their counters (see `increases`).
    pub fn follow_rooms(&self, rooms: &[std::sync::Arc<crate::room::Room>]) {
        self.increases.follow(rooms);
    }

    /// Drops the series of rooms, and of a room's upstreams, that the
    /// configuration in force no longer has. A room or an upstream a
    /// reload removed would otherwise be exported, frozen, until the
    /// next restart: on every dashboard, and in every alert that reads
    /// it. Series of the rooms and upstreams kept stay as they are (a
    /// reload resolves the same ones again), and so do those of requests
    /// no room served (`room="-"`).
    pub fn forget_gone(&self, rooms: &[std::sync::Arc<crate::room::Room>]) {
        let room_of = |name: &str| rooms.iter().find(|r| r.name == name);
        let has_upstream = |room: &crate::room::Room, label: &str| {
            room.upstreams.all().iter().any(|u| u.label == label)
        };
        let kept = |labels: &Labels| match (labels.get("room"), labels.get("upstream")) {
            (Some(&"-"), _) | (None, _) => true,
            (Some(room), None) => room_of(room).is_some(),
            (Some(room), Some(up)) => room_of(room).is_some_and(|r| has_upstream(r, up)),
        };
        forget_where(&self.requests, &kept);
        forget_where(&self.request_seconds, &kept);
        forget_where(&self.upstream_response_seconds, &kept);
        forget_where(&self.upstream_errors, &kept);
        forget_where(&self.upstream_responses, &kept);
        forget_where(&self.upstream_closed_idle, &kept);
        forget_where(&self.upstream_in_flight, &kept);
        forget_where(&self.store_errors, &kept);
        forget_where(&self.rejected, &kept);
        forget_where(&self.wait_seconds, &kept);
        // Kept, and only while the room still has what they count.
        let kept_while = |labels: &Labels, has: &dyn Fn(&crate::room::Room) -> bool| {
            kept(labels)
                && labels
                    .get("room")
                    .and_then(|room| room_of(room))
                    .is_some_and(|r| has(r))
        };
        // A room's adaptive admission turned off: its frozen adjustments
        // would read as a rate that stopped moving.
        forget_where(&self.adaptive_adjustments, &|labels: &Labels| {
            kept_while(labels, &|r| r.config.adaptive.is_some())
        });
        forget_where(&self.in_flight_wait_seconds, &kept);
        forget_where(&self.pass_extensions, &kept);
        forget_where(&self.reentries, &kept);
        forget_where(&self.reentries_refused, &kept);
        forget_where(&self.missed_turns, &kept);
        // Checks that stopped (the room's health_check taken out) would
        // read as a check that passed once and never ran again.
        forget_where(&self.upstream_health_checks, &|labels: &Labels| {
            kept_while(labels, &|r| r.config.health_check.is_some())
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        {
            // One scrape at a time reads and adds: two Prometheus servers
            // scraping at once would each add the same difference.
            let _one = self
                .dropped_lines_counting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let dropped = crate::logging::dropped_lines();
            let counted = self.log_lines_dropped.get();
            if dropped > counted {
                self.log_lines_dropped.inc_by(dropped - counted);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A series' labels, by name.
type Labels<'a> = std::collections::HashMap<&'a str, &'a str>;

/// Removes every series of `vec` whose labels `kept` refuses. Prometheus
/// removes a series only by all its labels: they are read off the
/// series themselves (once per reload, not on any request's path).
fn forget_where<B: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<B>,
    kept: &dyn Fn(&Labels) -> bool,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for series in family.get_metric() {
            let labels: Labels = series
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if !kept(&labels) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// One room's series, resolved once when the room is built:
/// `with_label_values` hashes and locks on every call, too much for the hot
/// path.
pub struct RoomMetrics {
    /// Indexed by status class: 1xx..5xx.
    requests: [IntCounter; 5],
    request_seconds: Histogram,
    pub rejected_ip_limit: IntCounter,
    pub rejected_status_ip_limit: IntCounter,
    pub rejected_session_limit: IntCounter,
    pub rejected_closed: IntCounter,
    pub rejected_cross_site: IntCounter,
    pub rejected_not_a_page: IntCounter,
    pub rejected_in_flight_full: IntCounter,
    pub rejected_in_flight_wait: IntCounter,
    pub rejected_session_in_flight: IntCounter,
    pub wait_seconds: Histogram,
    pub in_flight_wait_seconds: Histogram,
    pub pass_extensions: IntCounter,
    pub reentries_after_failure: IntCounter,
    pub reentries_after_detour: IntCounter,
    pub reentries_after_crash: IntCounter,
    pub reentries_refused: IntCounter,
    pub missed_turns: IntCounter,
    /// Resolved with the room, so the series is there at 0 before the
    /// first failure: a brief outage shows in `increase()`.
    pub store_errors: IntCounter,
    /// An adaptive room's rate changes, resolved with the room as the
    /// others: at 0 from the start, and never made again by a tick still
    /// running over a room a reload removed (its series forgotten).
    /// Increase for headroom; decrease for latency, for failures.
    adjustments: Option<[IntCounter; 3]>,
}

impl RoomMetrics {
    /// `adaptive`: the room's rate is adaptive (see `adjusted`).
    pub fn new(m: &Metrics, room: &str, adaptive: bool) -> Self {
        let adjusted = |direction, reason| {
            m.adaptive_adjustments
                .with_label_values(&[room, direction, reason])
        };
        let class = |c| m.requests.with_label_values(&[room, c]);
        let rejected = |reason| m.rejected.with_label_values(&[room, reason]);
        RoomMetrics {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            request_seconds: m.request_seconds.with_label_values(&[room]),
            rejected_ip_limit: rejected("ip_limit"),
            rejected_status_ip_limit: rejected("status_ip_limit"),
            rejected_session_limit: rejected("session_limit"),
            rejected_closed: rejected("closed"),
            rejected_cross_site: rejected("cross_site"),
            rejected_not_a_page: rejected("not_a_page"),
            rejected_in_flight_full: rejected("in_flight_full"),
            rejected_in_flight_wait: rejected("in_flight_wait"),
            rejected_session_in_flight: rejected("session_in_flight"),
            wait_seconds: m.wait_seconds.with_label_values(&[room]),
            in_flight_wait_seconds: m.in_flight_wait_seconds.with_label_values(&[room]),
            pass_extensions: m.pass_extensions.with_label_values(&[room]),
            reentries_after_failure: m.reentries.with_label_values(&[room, "upstream_failure"]),
            reentries_after_detour: m.reentries.with_label_values(&[room, "login_detour"]),
            reentries_after_crash: m.reentries.with_label_values(&[room, "crash"]),
            reentries_refused: m.reentries_refused.with_label_values(&[room]),
            missed_turns: m.missed_turns.with_label_values(&[room]),
            store_errors: m.store_errors.with_label_values(&[room]),
            adjustments: adaptive.then(|| {
                [
                    adjusted("increase", "headroom"),
                    adjusted("decrease", "latency"),
                    adjusted("decrease", "failures"),
                ]
            }),
        }
    }

    pub fn adjusted(&self, direction: Direction, reason: Reason) {
        let i = match (direction, reason) {
            (Direction::Increase, _) => 0,
            (Direction::Decrease, Reason::Failures) => 2,
            (Direction::Decrease, _) => 1,
        };
        if let Some(a) = &self.adjustments {
            a[i].inc();
        }
    }

    pub fn observe(&self, status: u16, seconds: f64) {
        self.count(status);
        self.request_seconds.observe(seconds);
    }

    /// A request counted without its time: one whose client left before
    /// its answer was ready had no time to its response headers.
    pub fn count(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }
}

/// One upstream's series, resolved once (see [`RoomMetrics`]).
pub struct UpstreamMetrics {
    pub response_seconds: Histogram,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub protocol_errors: IntCounter,
    pub closed_idle: IntCounter,
    /// Indexed by status class: 1xx..5xx.
    responses: [IntCounter; 5],
    pub in_flight: IntGauge,
}

impl UpstreamMetrics {
    pub fn new(m: &Metrics, room: &str, upstream: &str) -> Self {
        let errors = |kind| m.upstream_errors.with_label_values(&[room, upstream, kind]);
        let class = |c| m.upstream_responses.with_label_values(&[room, upstream, c]);
        UpstreamMetrics {
            response_seconds: m
                .upstream_response_seconds
                .with_label_values(&[room, upstream]),
            connect_errors: errors("connect"),
            timeouts: errors("timeout"),
            protocol_errors: errors("protocol"),
            closed_idle: m.upstream_closed_idle.with_label_values(&[room, upstream]),
            responses: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            in_flight: m.upstream_in_flight.with_label_values(&[room, upstream]),
        }
    }

    pub fn response(&self, status: u16) {
        self.responses[(status / 100).clamp(1, 5) as usize - 1].inc();
    }
}

type Gauges = Vec<(&'static str, prometheus::GaugeVec)>;

/// The rooms' own state as metrics, read at scrape time.
struct RoomCollector {
    routing: SharedRouting,
    gauges: Gauges,
    mode: IntGaugeVec,
    counters: Vec<(&'static str, IntCounterVec)>,
    /// Rooms with lanes: each lane's line, labelled room and lane.
    lane_gauges: Gauges,
    lane_admitted: IntCounterVec,
    /// Each upstream of each room: 1 in rotation, 0 out.
    upstream_up: IntGaugeVec,
    /// Each upstream of each room: 1 while an operator keeps it out.
    upstream_taken_out: IntGaugeVec,
    /// Each upstream of each room: the share of its turns it takes.
    upstream_share: prometheus::GaugeVec,
    /// Each upstream of each room: its turns against the others'.
    upstream_weight: IntGaugeVec,
    /// The room counters as this process saw them rise.
    increases: std::sync::Arc<Increases>,
    /// One scrape at a time fills the vectors above: the registry lets
    /// two gather at once (two Prometheus servers), and interleaved resets
    /// and fills would report a counter twice or a gauge not at all.
    scraping: std::sync::Mutex<()>,
}

impl RoomCollector {
    fn new(routing: SharedRouting, increases: std::sync::Arc<Increases>) -> Self {
        let gauge = |name: &'static str, help: &str| {
            let g =
                prometheus::GaugeVec::new(Opts::new(name, help), &["room"]).expect("valid metric");
            (name, g)
        };
        let counter = |name: &'static str, help: &str| {
            (
                name,
                IntCounterVec::new(Opts::new(name, help), &["room"]).expect("valid metric"),
            )
        };
        let lane_gauge = |name: &'static str, help: &str| {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), &["room", "lane"])
                .expect("valid metric");
            (name, g)
        };
        RoomCollector {
            routing,
            increases,
            scraping: std::sync::Mutex::new(()),
            upstream_up: IntGaugeVec::new(
                Opts::new(
                    "varco_upstream_up",
                    "1 while an upstream is in rotation; 0 while it is out: cooling down after failed requests (upstream.max_fails, upstream.fail_cooldown), failing its health checks, or taken out by an operator",
                ),
                &["room", "upstream"],
            )
            .expect("valid metric"),
            upstream_taken_out: IntGaugeVec::new(
                Opts::new(
                    "varco_upstream_taken_out",
                    "1 while an operator keeps an upstream out of rotation (varco ctl upstream-out), else 0",
                ),
                &["room", "upstream"],
            )
            .expect("valid metric"),
            upstream_share: prometheus::GaugeVec::new(
                Opts::new(
                    "varco_upstream_share",
                    "The share of its turns in rotation an upstream takes: 1 in full rotation, growing from 0 to 1 over health_check.slow_start after it comes back (checks, an operator, a cool-down's end), 0 while out",
                ),
                &["room", "upstream"],
            )
            .expect("valid metric"),
            upstream_weight: IntGaugeVec::new(
                Opts::new(
                    "varco_upstream_weight",
                    "An upstream's weight: its turns in the room's rotation against the others' (share x weight is what it takes now)",
                ),
                &["room", "upstream"],
            )
            .expect("valid metric"),
            lane_gauges: vec![
                lane_gauge(
                    "varco_lane_queue_length",
                    "Rooms with lanes: people waiting in each lane",
                ),
                lane_gauge(
                    "varco_lane_active_sessions",
                    "Rooms with lanes: live passes admitted from each lane",
                ),
                lane_gauge(
                    "varco_lane_admission_rate_per_minute",
                    "Rooms with lanes: each lane's share of the rate in force (its weight over the weights of lanes with people waiting)",
                ),
            ],
            lane_admitted: IntCounterVec::new(
                Opts::new(
                    "varco_lane_admitted_total",
                    "Rooms with lanes: people admitted from each lane",
                ),
                &["room", "lane"],
            )
            .expect("valid metric"),
            gauges: vec![
                gauge(
                    "varco_room_queue_length",
                    "People waiting in line (queue counter minus serving counter)",
                ),
                gauge(
                    "varco_room_active_sessions",
                    "Live passes (seen within session_idle)",
                ),
                gauge(
                    "varco_room_queue_counter",
                    "The queue counter: numbers handed out (tickets and direct admissions)",
                ),
                gauge(
                    "varco_room_serving_counter",
                    "The serving counter: the highest number that may claim a pass",
                ),
                gauge(
                    "varco_room_reserved_slots",
                    "Slots held for called tickets not yet claimed (claim window)",
                ),
                gauge(
                    "varco_room_admission_rate_per_minute",
                    "The admission rate in force (absent: unlimited)",
                ),
                gauge(
                    "varco_room_max_active",
                    "The cap on live sessions in force (absent: unlimited)",
                ),
                gauge(
                    "varco_room_observed_admissions_per_second",
                    "Turns given per second over the last minute (tickets called and direct admissions, claimed or not)",
                ),
                gauge(
                    "varco_room_leader",
                    "1 on the node that advances the room's serving counter (every node with a store of its own; in a cluster, the holder of the room's lease, whose adaptive rate is the one in force, while it renews it), else 0 (in a cluster, before Redis answers, and once a lease it could not renew has lapsed)",
                ),
                gauge(
                    "varco_adaptive_latency_seconds",
                    "Adaptive admission: the upstream latency percentile over the last interval (absent: no answers)",
                ),
                gauge(
                    "varco_adaptive_failure_ratio",
                    "Adaptive admission: failed upstream answers (5xx, timeouts, connection errors) over the last interval",
                ),
                gauge(
                    "varco_adaptive_target_latency_seconds",
                    "Adaptive admission: the latency the percentile is held under",
                ),
                gauge(
                    "varco_adaptive_min_per_minute",
                    "Adaptive admission: the rate's floor",
                ),
                gauge(
                    "varco_adaptive_max_per_minute",
                    "Adaptive admission: the rate's ceiling",
                ),
                gauge(
                    "varco_room_in_flight",
                    "Requests holding an in-flight slot towards the upstreams",
                ),
                gauge(
                    "varco_room_in_flight_limit",
                    "The in-flight cap (absent: no cap)",
                ),
                gauge(
                    "varco_room_in_flight_queued",
                    "Admitted requests waiting for an in-flight slot",
                ),
                gauge(
                    "varco_room_in_flight_sessions",
                    "Sessions holding or waiting for in-flight slots of their own (with per_session)",
                ),
                gauge(
                    "varco_room_estimated_wait_seconds",
                    "Estimated wait for the last in line at the line's pace (absent: unknown)",
                ),
            ],
            mode: IntGaugeVec::new(
                Opts::new("varco_room_mode", "1 for the room's current mode"),
                &["room", "mode"],
            )
            .expect("valid metric"),
            counters: vec![
                counter(
                    "varco_tickets_issued_total",
                    "Numbers handed out: tickets and direct admissions",
                ),
                counter("varco_admitted_total", "People admitted (passes issued)"),
                counter(
                    "varco_abandoned_total",
                    "Called tickets never claimed within the claim window",
                ),
            ],
        }
    }

    fn set(&self, metric: &str, room: &str, value: f64) {
        if let Some((_, g)) = self.gauges.iter().find(|(n, _)| *n == metric) {
            g.with_label_values(&[room]).set(value);
        }
    }
}

impl prometheus::core::Collector for RoomCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d: Vec<&prometheus::core::Desc> = Vec::new();
        for (_, g) in &self.gauges {
            d.extend(g.desc());
        }
        d.extend(self.mode.desc());
        for (_, c) in &self.counters {
            d.extend(c.desc());
        }
        for (_, g) in &self.lane_gauges {
            d.extend(g.desc());
        }
        d.extend(self.lane_admitted.desc());
        d.extend(self.upstream_up.desc());
        d.extend(self.upstream_taken_out.desc());
        d.extend(self.upstream_share.desc());
        d.extend(self.upstream_weight.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one_at_a_time = self.scraping.lock().unwrap_or_else(|e| e.into_inner());
        for (_, g) in &self.gauges {
            g.reset();
        }
        self.mode.reset();
        for (_, c) in &self.counters {
            c.reset();
        }
        for (_, g) in &self.lane_gauges {
            g.reset();
        }
        self.lane_admitted.reset();
        self.upstream_up.reset();
        self.upstream_taken_out.reset();
        self.upstream_share.reset();
        self.upstream_weight.reset();
        let routing = self.routing.load();
        self.increases.follow(&routing.rooms);
        for room in &routing.rooms {
            let v = room.view();
            let name = room.name.as_str();
            for (i, u) in room.upstreams.all().iter().enumerate() {
                self.upstream_up
                    .with_label_values(&[name, &u.label])
                    .set(room.upstreams.is_healthy(i) as i64);
                self.upstream_taken_out
                    .with_label_values(&[name, &u.label])
                    .set(room.upstreams.is_taken_out(i) as i64);
                self.upstream_share
                    .with_label_values(&[name, &u.label])
                    .set(room.upstreams.share(i));
                self.upstream_weight
                    .with_label_values(&[name, &u.label])
                    .set(i64::from(u.weight));
            }
            if room.lanes.len() > 1 {
                for lane in &room.lanes {
                    let lv = lane.store.view();
                    let labels = [name, lane.name.as_str()];
                    let set = |metric: &str, value: f64| {
                        if let Some((_, g)) = self.lane_gauges.iter().find(|(n, _)| *n == metric) {
                            g.with_label_values(&labels).set(value);
                        }
                    };
                    set("varco_lane_queue_length", lv.in_line() as f64);
                    set("varco_lane_active_sessions", lv.active as f64);
                    if let Some(r) = room.lane_limits(lane).per_minute {
                        set("varco_lane_admission_rate_per_minute", r);
                    }
                    self.lane_admitted
                        .with_label_values(&labels)
                        .inc_by(self.increases.of_line(name, &room.line_name(lane)).admitted);
                }
            }
            self.set("varco_room_queue_length", name, v.in_line() as f64);
            self.set("varco_room_active_sessions", name, v.active as f64);
            self.set("varco_room_queue_counter", name, v.queue as f64);
            self.set("varco_room_serving_counter", name, v.serving as f64);
            self.set("varco_room_reserved_slots", name, v.reserved as f64);
            let leads = room.store.leads_now();
            self.set("varco_room_leader", name, if leads { 1.0 } else { 0.0 });
            if let Some(r) = room.per_minute() {
                self.set("varco_room_admission_rate_per_minute", name, r);
            }
            if let Some(m) = room.max_active() {
                self.set("varco_room_max_active", name, m as f64);
            }
            self.set(
                "varco_room_observed_admissions_per_second",
                name,
                v.observed_rate,
            );
            if let Some(wait) = v.estimated_wait() {
                self.set("varco_room_estimated_wait_seconds", name, wait);
            }
            if let Some(a) = &room.adaptive {
                let (latency, failures) = a.last_signals();
                if let Some(l) = latency {
                    self.set("varco_adaptive_latency_seconds", name, l.as_secs_f64());
                }
                self.set("varco_adaptive_failure_ratio", name, failures);
                self.set(
                    "varco_adaptive_target_latency_seconds",
                    name,
                    a.config.target_latency.as_secs_f64(),
                );
                self.set(
                    "varco_adaptive_min_per_minute",
                    name,
                    a.config.min_per_minute,
                );
                self.set(
                    "varco_adaptive_max_per_minute",
                    name,
                    a.config.max_per_minute,
                );
            }
            if let Some(f) = &room.in_flight {
                self.set("varco_room_in_flight", name, f.in_flight() as f64);
                self.set("varco_room_in_flight_limit", name, f.limit() as f64);
                self.set("varco_room_in_flight_queued", name, f.queued() as f64);
                if f.config().per_session.is_some() {
                    self.set("varco_room_in_flight_sessions", name, f.sessions() as f64);
                }
            }
            let current = room.mode().as_str();
            for mode in ["queue", "queue_all", "paused", "passthrough", "closed"] {
                self.mode
                    .with_label_values(&[name, mode])
                    .set((current == mode) as i64);
            }
            let c = self.increases.of_room(name);
            for ((_, counter), total) in
                self.counters
                    .iter()
                    .zip([c.issued, c.admitted, c.abandoned])
            {
                counter.with_label_values(&[name]).inc_by(total);
            }
        }
        let mut out = Vec::new();
        for (_, g) in &self.gauges {
            out.extend(g.collect());
        }
        out.extend(self.mode.collect());
        for (_, c) in &self.counters {
            out.extend(c.collect());
        }
        for (_, g) in &self.lane_gauges {
            out.extend(g.collect());
        }
        out.extend(self.lane_admitted.collect());
        out.extend(self.upstream_up.collect());
        out.extend(self.upstream_taken_out.collect());
        out.extend(self.upstream_share.collect());
        out.extend(self.upstream_weight.collect());
        out
    }
}

/// "2xx", "4xx", ...: status classes keep the label set small.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// One more in a gauge for as long as it lives: the gauge comes back down
/// however its holder ends (a task that stops early, a future dropped
/// when its client goes away).
pub struct Counted(IntGauge);

impl Counted {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    /// A wait as long as a ticket lives by default falls in a bucket of
    /// its own, not in `+Inf`, where quantiles read it as the last bound.
    #[test]
    fn a_wait_as_long_as_a_ticket_lives_has_its_bucket() {
        let ttl = crate::config::units::parse_duration(crate::config::file::DEFAULT_TICKET_TTL)
            .unwrap()
            .as_secs_f64();
        assert!(super::WAIT_BUCKETS.last().is_some_and(|b| *b >= ttl));
    }

    /// An answer that took the default response timeout, or a longer
    /// one a room sets, falls in a bucket under the last: in `+Inf`,
    /// quantiles read every slow answer as the last bound.
    #[test]
    fn a_timed_out_answer_has_its_bucket() {
        let timeout =
            crate::config::units::parse_duration(crate::config::file::DEFAULT_RESPONSE_TIMEOUT)
                .unwrap()
                .as_secs_f64();
        assert!(super::LATENCY_BUCKETS
            .last()
            .is_some_and(|b| *b >= 2.0 * timeout));
    }

    /// An adaptive room's rate changes are counted from 0, and a change
    /// made after a reload removed the room (a tick still running over
    /// it) does not bring its series back.
    #[test]
    fn an_adaptive_rooms_changes_start_at_0_and_stay_gone_once_forgotten() {
        use crate::room::adaptive::{Direction, Reason};
        let m = super::Metrics::new();
        let removed = super::RoomMetrics::new(&m, "removed", true);
        let fixed = super::RoomMetrics::new(&m, "fixed", false);
        let text = m.render();
        assert!(
            text.contains(
                "varco_adaptive_adjustments_total{direction=\"decrease\",reason=\"latency\",room=\"removed\"} 0"
            ),
            "{text}"
        );
        let adjustments_of = |text: &str, room: &str| {
            text.lines()
                .filter(|l| l.starts_with("varco_adaptive_adjustments_total{"))
                .filter(|l| l.contains(&format!("room=\"{room}\"")))
                .count()
        };
        assert_eq!(adjustments_of(&text, "removed"), 3, "{text}");
        assert_eq!(adjustments_of(&text, "fixed"), 0, "not adaptive: {text}");
        fixed.adjusted(Direction::Increase, Reason::Headroom);
        m.forget_gone(&[]);
        removed.adjusted(Direction::Decrease, Reason::Failures);
        let text = m.render();
        assert_eq!(adjustments_of(&text, "removed"), 0, "{text}");
        assert_eq!(adjustments_of(&text, "fixed"), 0, "{text}");
    }
}
