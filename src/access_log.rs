//! The access line: one per request, written when its answer's body is
//! done, sent whole or cut short, rather than when its headers leave. So
//! the line says how long the whole answer took and how much of its body
//! went out (nginx's `$request_time` and `$body_bytes_sent`), and a
//! download the person gave up on, or a portal that broke off its answer,
//! shows as not completed instead of as a plain 200.

use std::net::IpAddr;
use std::time::Instant;

use http::{HeaderValue, Method, StatusCode};

use crate::body::{self, Body};
use crate::request_id;

/// What the line says besides what the body's end tells.
pub struct Line {
    pub started: Instant,
    pub room: String,
    pub method: Method,
    /// Without the query, which can carry personal data.
    pub path: String,
    pub user_agent: Option<HeaderValue>,
    pub status: StatusCode,
    pub upstream: Option<String>,
    pub client: IpAddr,
    pub request_id: Option<HeaderValue>,
}

impl Line {
    /// `body`, which writes this line once it is done.
    pub fn on_end_of(self, body: Body) -> Body {
        let bodiless = body::has_no_body(&self.method, self.status);
        body::on_end(body, bodiless, move |e| self.write(e.bytes, e.completed))
    }

    /// The line of a request whose client left before it was answered:
    /// nothing went out.
    pub fn write_unanswered(&self) {
        self.write(0, false);
    }

    fn write(&self, bytes: u64, completed: bool) {
        let user_agent = self
            .user_agent
            .as_ref()
            .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()));
        // Strings as `&str`: the text format quotes and escapes them (a
        // User-Agent has spaces; a path may hold a raw line separator or a
        // right-to-left override, which would break or reverse the line
        // in a log viewer).
        tracing::info!(
            target: "varco::access",
            room = self.room.as_str(),
            method = %self.method,
            path = self.path.as_str(),
            status = self.status.as_u16(),
            // Whole microseconds: `0.054`, not `0.054450000000000005`.
            duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0,
            bytes,
            completed,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            client = %self.client,
            user_agent = user_agent.as_ref(),
            request_id = request_id::text(self.request_id.as_ref()),
        );
    }
}
