//! The admin listener: `/metrics` for Prometheus, `/healthz` (the process
//! answers) and `/readyz` (config loaded, ready for traffic).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, Body};
use crate::listener::{ConnInfo, Handler};
use crate::metrics::Metrics;
use crate::page::NO_STORE;

pub struct Admin {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

impl Admin {
    pub fn new(metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Self {
        Admin { metrics, ready }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    r
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
        const PLAIN: &str = "text/plain; charset=utf-8";
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "use GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
            "/readyz" if self.ready.load(Ordering::Relaxed) => {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            }
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                "not ready: shutting down\n".into(),
            ),
            _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
        }
    }
}
