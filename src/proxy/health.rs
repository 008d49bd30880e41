//! Active health checks (`rooms.NAME.health_check`): every `interval`
//! each upstream of the room is asked for `path` (GET, answered 2xx or
//! 3xx within `timeout`); `fall` failures in a row take it out of
//! rotation, `rise` passes in a row bring it back. Passive health (a
//! cool-down after `max_fails` failed requests) learns of a dead upstream only from
//! a citizen's request that met it, and of its recovery only by risking
//! another; the checks learn both first.

use std::sync::{Arc, Weak};

use http::{Request, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prometheus::IntCounter;
use tokio::time::MissedTickBehavior;

use crate::body;
use crate::config::{HealthCheckConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::proxy::client::{self, UpstreamClient};
use crate::proxy::forward::upstream_uri;
use crate::room::Room;

/// How much of a health page is read.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Starts checking each of `room`'s upstreams, if it has health checks;
/// the checks stop with the room's upstream pool (replaced by a reload,
/// or varco stopped).
pub fn watch(
    room: &Arc<Room>,
    upstream: &UpstreamConfig,
    names: &client::ServerNames,
    metrics: &Metrics,
) {
    let Some(cfg) = room.config.health_check.clone() else {
        return;
    };
    let client = checker(&cfg, upstream, names);
    let mut tasks = Vec::with_capacity(room.upstreams.len());
    for index in 0..room.upstreams.len() {
        let label = room.upstreams.get(index).label.as_str();
        let counted = |result| {
            metrics
                .upstream_health_checks
                .with_label_values(&[&room.name, label, result])
        };
        let counters = (counted("passed"), counted("failed"));
        let task = tokio::spawn(check_loop(
            Arc::downgrade(room),
            index,
            cfg.clone(),
            client.clone(),
            counters,
        ));
        tasks.push(task.abort_handle());
    }
    room.upstreams.run_checks(tasks);
}

/// A client that opens a connection for each check, as HAProxy does: one
/// kept alive would pass a server that no longer accepts connections,
/// and fail when the server closes it idle just as a check goes out.
fn checker(
    cfg: &HealthCheckConfig,
    upstream: &UpstreamConfig,
    names: &client::ServerNames,
) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .http1_max_headers(client::ANSWER_FIELDS)
        .build(client::Connector::new(
            connector,
            upstream,
            names,
            cfg.timeout,
        ))
}

async fn check_loop(
    room: Weak<Room>,
    index: usize,
    cfg: HealthCheckConfig,
    client: UpstreamClient,
    (passed, failed): (IntCounter, IntCounter),
) {
    let mut every = tokio::time::interval(cfg.interval);
    // A slow check delays the next rather than bunching them up.
    every.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // Held only for one check.
        let Some(room) = room.upgrade() else {
            return;
        };
        let upstream = room.upstreams.get(index);
        let uri = upstream_uri(&upstream.base, Some(&cfg.path));
        let verdict = check(&client, uri, &cfg).await;
        match &verdict {
            Ok(()) => passed.inc(),
            Err(reason) => {
                failed.inc();
                tracing::debug!(room = %room.name, upstream = %upstream.label, %reason, "health check failed");
            }
        }
        let moved = room
            .upstreams
            .record_check(index, verdict.is_ok(), cfg.fall, cfg.rise);
        match (moved, verdict) {
            (Some(false), Err(reason)) => tracing::warn!(
                room = %room.name,
                upstream = %upstream.label,
                %reason,
                checks = cfg.fall,
                in_rotation = %in_rotation(&room),
                "upstream out of rotation: it failed its health checks"
            ),
            (Some(true), _) => tracing::info!(
                room = %room.name,
                upstream = %upstream.label,
                checks = cfg.rise,
                in_rotation = %in_rotation(&room),
                slow_start = ?cfg.slow_start,
                "upstream back in rotation: it passed its health checks"
            ),
            _ => {}
        }
    }
}

/// "2 of 3": the room's upstreams in rotation, for the log.
fn in_rotation(room: &Room) -> String {
    let n = room.upstreams.len();
    let up = (0..n).filter(|&i| room.upstreams.is_healthy(i)).count();
    format!("{up} of {n}")
}

/// Whether a check's answer passes: one of `expect_status`, or without
/// it any 2xx or 3xx.
fn passes(status: http::StatusCode, expect_status: &[u16]) -> bool {
    if expect_status.is_empty() {
        status.is_success() || status.is_redirection()
    } else {
        expect_status.contains(&status.as_u16())
    }
}

/// One check: Ok for a status that passes, its page read to the end (or
/// to 64 KiB), within `timeout`; else why not.
async fn check(client: &UpstreamClient, uri: Uri, cfg: &HealthCheckConfig) -> Result<(), String> {
    let (host, timeout) = (cfg.host.as_ref(), cfg.timeout);
    let mut req = Request::get(uri).header(http::header::USER_AGENT, "varco-health-check");
    // The client sets Host from the URI only when none is given.
    if let Some(host) = host {
        req = req.header(http::header::HOST, host);
    }
    let req = req
        .body(body::empty())
        .map_err(|e| format!("cannot ask: {e}"))?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(": ");
                why.push_str(&s.to_string());
                source = s.source();
            }
            format!("no answer ({why})")
        })?;
        let status = resp.status();
        let read = Limited::new(resp.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await;
        // A long page is an answer; a page broken off is not.
        if let Err(e) = read {
            if !e.is::<http_body_util::LengthLimitError>() {
                return Err(format!("answered {status}, then broke off: {e}"));
            }
        }
        if passes(status, &cfg.expect_status) {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn without_expect_status_any_2xx_or_3xx_passes() {
        assert!(passes(StatusCode::OK, &[]));
        assert!(passes(StatusCode::FOUND, &[]));
        assert!(!passes(StatusCode::SERVICE_UNAVAILABLE, &[]));
        // A redirect to the login page is no longer health.
        assert!(!passes(StatusCode::FOUND, &[200]));
        assert!(passes(StatusCode::NO_CONTENT, &[200, 204]));
    }
}
