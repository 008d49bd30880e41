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
        let json = page::wants_json(req.headers());
        let host = host_of(&req);
        let room = self
            .router
            .route(host.as_deref(), req.uri().path())
            .cloned();
        // Only what the access line needs survives the request; the path
        // without its query, since queries can carry personal data.
        let logged = self
            .access_log
            .then(|| (req.method().clone(), req.uri().path().to_string()));

        let Some(room) = room else {
            let resp = page::error(
                StatusCode::NOT_FOUND,
                "Nothing is served at this address.",
                json,
            );
            self.metrics
                .requests
                .with_label_values(&["-", status_class(404)])
                .inc();
            self.access(logged, "-", &resp, started, None, conn);
            return resp;
        };
        let (resp, upstream) = match self.forwarder.forward(&room, req, conn).await {
            Ok(f) => (f.response, Some(f.upstream)),
            Err(e) => {
                if e.side() == Side::Upstream {
                    tracing::warn!(room = %room.name, error = %e, "upstream failure");
                } else {
                    tracing::debug!(room = %room.name, error = %e, "client failure");
                }
                (page::error(e.status(), e.public_message(), json), None)
            }
        };
        room.metrics
            .observe(resp.status().as_u16(), started.elapsed().as_secs_f64());
        let label = upstream.map(|i| room.upstreams.get(i).label.as_str());
        self.access(logged, &room.name, &resp, started, label, conn);
        resp
    }
}

impl Gateway {
    fn access(
        &self,
        logged: Option<(http::Method, String)>,
        room: &str,
        resp: &Response<Body>,
        started: Instant,
        upstream: Option<&str>,
        conn: ConnInfo,
    ) {
        let Some((method, path)) = logged else { return };
        tracing::info!(
            target: "varco::access",
            room,
            method = %method,
            path = %path,
            status = resp.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            upstream = upstream.unwrap_or("-"),
            client = %conn.peer.ip(),
        );
    }
}
