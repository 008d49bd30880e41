//! The public listener's request path: route to a room, forward to its
//! upstream, and turn any failure into a small page; one access-log line
//! and the request metrics per request.

use std::sync::Arc;
use std::time::Instant;

use http::header::HOST;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::Body;
use crate::listener::{ConnInfo, Handler};
use crate::metrics::{status_class, Metrics};
use crate::page;
use crate::proxy::{Forwarder, Side};
use crate::router::Router;

pub struct Gateway {
    router: Router,
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    access_log: bool,
}

impl Gateway {
    pub fn new(
        router: Router,
        forwarder: Forwarder,
        metrics: Arc<Metrics>,
        access_log: bool,
    ) -> Self {
        Gateway {
            router,
            forwarder,
            metrics,
            access_log,
        }
    }
}

/// The request's host: the Host header (HTTP/1.1) or :authority (HTTP/2).
fn host_of(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

impl Handler for Gateway {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // The path without its query: queries can carry personal data.
        let path = req.uri().path().to_string();
        let json = page::wants_json(req.headers());
        let host = host_of(&req);
        let room = self.router.route(host.as_deref(), &path).cloned();

        let (resp, room_name, upstream) = match room {
            None => (
                page::error(
                    StatusCode::NOT_FOUND,
                    "Nothing is served at this address.",
                    json,
                ),
                "-".to_string(),
                None,
            ),
            Some(room) => match self
                .forwarder
                .forward(&room, req, conn, &self.metrics)
                .await
            {
                Ok(f) => (f.response, room.name.clone(), Some(f.upstream)),
                Err(e) => {
                    if e.side() == Side::Upstream {
                        tracing::warn!(room = %room.name, error = %e, "upstream failure");
                    } else {
                        tracing::debug!(room = %room.name, error = %e, "client failure");
                    }
                    (
                        page::error(e.status(), e.public_message(), json),
                        room.name.clone(),
                        None,
                    )
                }
            },
        };

        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        self.metrics
            .requests
            .with_label_values(&[room_name.as_str(), status_class(status)])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[room_name.as_str()])
            .observe(elapsed.as_secs_f64());
        if self.access_log {
            tracing::info!(
                target: "varco::access",
                room = %room_name,
                method = %method,
                path = %path,
                status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                upstream = upstream.as_deref().unwrap_or("-"),
                client = %conn.peer.ip(),
            );
        }
        resp
    }
}
