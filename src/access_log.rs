//! The access line: one per request, written when its answer's body is
//! done, sent whole or cut short, rather than when its headers leave. So
//! the line says how long the whole answer took and how much of its body
//! went out (nginx's `$request_time` and `$body_bytes_sent`), and a
//! download the person gave up on, or a portal that broke off its answer,
//! shows as not completed instead of as a plain 200.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{self, Body, BoxError};
use crate::request_id;

/// What the line says besides what the body's end tells.
pub struct Line {
    pub started: Instant,
    pub room: String,
    pub method: Method,
    /// Without the query, which can carry personal data.
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<String>,
    pub client: IpAddr,
    pub request_id: Option<HeaderValue>,
}

impl Line {
    /// `body`, which writes this line once it is done.
    pub fn on_end_of(self, body: Body) -> Body {
        body::stream(Logged {
            inner: body,
            line: Some(self),
            bytes: 0,
            ended: false,
        })
    }

    fn write(&self, bytes: u64, completed: bool) {
        tracing::info!(
            target: "varco::access",
            room = %self.room,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            // Whole microseconds: `0.054`, not `0.054450000000000005`.
            duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0,
            bytes,
            completed,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            client = %self.client,
            request_id = request_id::text(self.request_id.as_ref()),
        );
    }
}

struct Logged {
    inner: Body,
    line: Option<Line>,
    bytes: u64,
    ended: bool,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    // Dropped once hyper has written the end, or when the connection went
    // away first (or the body failed): either way the request is over.
    fn drop(&mut self) {
        if let Some(line) = self.line.take() {
            // hyper stops polling once the body says it is at its end.
            let completed = self.ended || self.inner.is_end_stream();
            line.write(self.bytes, completed);
        }
    }
}
