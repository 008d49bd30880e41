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
    pub user_agent: Option<HeaderValue>,
    pub status: StatusCode,
    pub upstream: Option<String>,
    pub client: IpAddr,
    pub request_id: Option<HeaderValue>,
}

/// An answer sent without a body whatever it holds (to HEAD; a 1xx, 204
/// or 304): hyper drops such a body unpolled, which is its end.
fn has_no_body(method: &Method, status: StatusCode) -> bool {
    method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
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
        let user_agent = self
            .user_agent
            .as_ref()
            .map_or("-".into(), |v| String::from_utf8_lossy(v.as_bytes()));
        // Strings as `&str`: the text format quotes them (a User-Agent has
        // spaces), as it quoted the room before.
        tracing::info!(
            target: "varco::access",
            room = self.room.as_str(),
            method = %self.method,
            path = %self.path,
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
                // hyper writes trailers last and asks for nothing after.
                if frame.is_trailers() {
                    self.ended = true;
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
            if has_no_body(&line.method, line.status) {
                // (HTTP/2 reads the body of a HEAD and sends none of it.)
                line.write(0, true);
                return;
            }
            // hyper stops polling once the body says it is at its end.
            let completed = self.ended || self.inner.is_end_stream();
            line.write(self.bytes, completed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn line(method: Method, status: StatusCode) -> Line {
        Line {
            started: Instant::now(),
            room: "portal".into(),
            method,
            path: "/".into(),
            user_agent: None,
            status,
            upstream: None,
            client: IpAddr::from([127, 0, 0, 1]),
            request_id: None,
        }
    }

    #[tokio::test]
    async fn trailers_end_a_body_and_its_bytes_are_counted() {
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ]);
        let mut logged = Logged {
            inner: body::stream(http_body_util::StreamBody::new(frames)),
            line: Some(line(Method::GET, StatusCode::OK)),
            bytes: 0,
            ended: false,
        };
        assert!(logged.frame().await.is_some());
        assert!(!logged.ended);
        assert!(logged.frame().await.is_some());
        assert_eq!(logged.bytes, 5);
        assert!(logged.ended, "hyper asks for nothing after trailers");
    }

    #[test]
    fn head_204_and_304_have_no_body() {
        assert!(has_no_body(&Method::HEAD, StatusCode::OK));
        assert!(has_no_body(&Method::GET, StatusCode::NO_CONTENT));
        assert!(has_no_body(&Method::GET, StatusCode::NOT_MODIFIED));
        assert!(!has_no_body(&Method::GET, StatusCode::NOT_FOUND));
    }
}
