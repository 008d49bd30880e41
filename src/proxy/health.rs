//! Active health checks (`rooms.NAME.health_check`): every `interval`
//! each upstream of the room is asked for `path` (GET, answered 2xx or
//! 3xx within `timeout`); `fall` failures in a row take it out of
//! rotation, `rise` passes in a row bring it back. Passive health (a
//! cool-down after a failed request) learns of a dead upstream only from
//! a citizen's request that met it, and of its recovery only by risking
//! another; the checks learn both first.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{Request, Uri};
use http_body_util::{BodyExt, Limited};
use prometheus::IntCounter;
use tokio::time::MissedTickBehavior;

use crate::body;
use crate::config::{HealthCheckConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::proxy::client::{self, UpstreamClient};
use crate::proxy::forward::upstream_uri;
use crate::room::Room;

/// How much of a health page is read, so its connection can be reused.
const MAX_HEALTH_BODY: usize = 64 * 1024;

/// Starts checking each of `room`'s upstreams, if it has health checks;
/// the checks stop once the room is gone (replaced by a reload, or varco
/// stopped).
pub fn watch(room: &Arc<Room>, upstream: &UpstreamConfig, metrics: &Metrics) {
    let Some(cfg) = room.config.health_check.clone() else {
        return;
    };
    let client = client::build(upstream);
    for index in 0..room.upstreams.len() {
        let label = room.upstreams.get(index).label.as_str();
        let counted = |result| {
            metrics
                .upstream_health_checks
                .with_label_values(&[&room.name, label, result])
        };
        let counters = (counted("passed"), counted("failed"));
        tokio::spawn(check_loop(
            Arc::downgrade(room),
            index,
            cfg.clone(),
            client.clone(),
            counters,
        ));
    }
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
        // Held only for one check: a room a reload replaced goes.
        let Some(room) = room.upgrade() else {
            return;
        };
        let upstream = room.upstreams.get(index);
        let verdict = check(
            &client,
            upstream_uri(&upstream.base, Some(&cfg.path)),
            cfg.timeout,
        )
        .await;
        match &verdict {
            Ok(()) => passed.inc(),
            Err(_) => failed.inc(),
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
                "upstream out of rotation: it failed its health checks"
            ),
            (Some(true), _) => tracing::info!(
                room = %room.name,
                upstream = %upstream.label,
                checks = cfg.rise,
                "upstream back in rotation: it passed its health checks"
            ),
            _ => {}
        }
    }
}

/// One check: Ok for a 2xx or 3xx within `timeout`, else why not.
async fn check(client: &UpstreamClient, uri: Uri, timeout: Duration) -> Result<(), String> {
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "varco-health-check")
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
        let _ = Limited::new(resp.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await;
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}
