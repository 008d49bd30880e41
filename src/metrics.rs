//! Every metric varco exports: its name, help text and labels, in one
//! place. Labels are room, upstream, class or kind: never a raw path or a
//! client address, so cardinality stays bounded on a click day.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub upstream_response_seconds: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub open_connections: IntGauge,
    pub build_info: IntGaugeVec,
}

/// Latency buckets from 5 ms to 60 s: a portal under click-day load lives
/// in the upper half.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "varco_requests_total",
                "Requests answered, by room and status class",
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
                "Time an upstream took to send response headers",
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
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(upstream_response_seconds.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(open_connections.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            upstream_response_seconds,
            upstream_errors,
            open_connections,
            build_info,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
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
}

impl RoomMetrics {
    pub fn new(m: &Metrics, room: &str) -> Self {
        let class = |c| m.requests.with_label_values(&[room, c]);
        RoomMetrics {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            request_seconds: m.request_seconds.with_label_values(&[room]),
        }
    }

    pub fn observe(&self, status: u16, seconds: f64) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
        self.request_seconds.observe(seconds);
    }
}

/// One upstream's series, resolved once (see [`RoomMetrics`]).
pub struct UpstreamMetrics {
    pub response_seconds: Histogram,
    pub connect_errors: IntCounter,
    pub timeouts: IntCounter,
    pub protocol_errors: IntCounter,
}

impl UpstreamMetrics {
    pub fn new(m: &Metrics, room: &str, upstream: &str) -> Self {
        let errors = |kind| m.upstream_errors.with_label_values(&[room, upstream, kind]);
        UpstreamMetrics {
            response_seconds: m
                .upstream_response_seconds
                .with_label_values(&[room, upstream]),
            connect_errors: errors("connect"),
            timeouts: errors("timeout"),
            protocol_errors: errors("protocol"),
        }
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
