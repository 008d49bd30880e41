//! The pooled HTTP client towards upstreams, with the timeouts hyper does
//! not set by default (connect) and a bounded idle pool.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::UpstreamConfig;

pub type UpstreamClient = Client<HttpConnector, Body>;

pub fn build(cfg: &UpstreamConfig) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    // The request URI carries the upstream's http:// base.
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        // Without a timer the pool never evicts idle connections.
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .build(connector)
}
