//! The one body type varco's services speak: boxed, so upstream streams,
//! client streams and varco's own small pages share a type; and the one
//! watcher of how an answer's body went out (whole or cut short), which
//! the access line and a claimed pass's delivery both wait on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any streaming body without reading it.
pub fn stream<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// An answer sent without a body whatever it holds (to HEAD; a 1xx, 204
/// or 304): hyper drops such a body unpolled, which is its end.
pub fn has_no_body(method: &Method, status: StatusCode) -> bool {
    method == Method::HEAD || status_has_no_body(status)
}

/// A status whose answer has no body, whatever the request (1xx, 204,
/// 304).
pub fn status_has_no_body(status: StatusCode) -> bool {
    status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// How an answer's body went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Data bytes taken by hyper (0 for a body sent without one).
    pub bytes: u64,
    /// Whole: hyper took its end (or it is sent without a body); else it
    /// was dropped before (the client went away, the body failed).
    pub completed: bool,
}

/// `body`, which calls `done` once it is over, when hyper drops it:
/// after it has taken the end, or when the connection went away first.
/// `bodiless`: an answer sent without its body (see [`has_no_body`]).
pub fn on_end<F>(body: Body, bodiless: bool, done: F) -> Body
where
    F: FnOnce(Ended) + Send + Unpin + 'static,
{
    stream(Watched {
        inner: body,
        bodiless,
        bytes: 0,
        ended: false,
        done: Some(done),
    })
}

struct Watched<F: FnOnce(Ended)> {
    inner: Body,
    bodiless: bool,
    bytes: u64,
    ended: bool,
    done: Option<F>,
}

impl<F: FnOnce(Ended) + Send + Unpin> http_body::Body for Watched<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                // hyper writes trailers last and asks for nothing after.
                if frame.is_trailers() {
                    this.ended = true;
                }
            }
            Poll::Ready(None) => this.ended = true,
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

impl<F: FnOnce(Ended)> Drop for Watched<F> {
    fn drop(&mut self) {
        let Some(done) = self.done.take() else {
            return;
        };
        done(if self.bodiless {
            // (HTTP/2 reads the body of a HEAD and sends none of it.)
            Ended {
                bytes: 0,
                completed: true,
            }
        } else {
            Ended {
                bytes: self.bytes,
                // hyper stops polling once the body says it is at its end.
                completed: self.ended || self.inner.is_end_stream(),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn watched(body: Body, bodiless: bool) -> (Body, Arc<Mutex<Option<Ended>>>) {
        let seen = Arc::new(Mutex::new(None));
        let into = seen.clone();
        let body = on_end(body, bodiless, move |e| *into.lock().unwrap() = Some(e));
        (body, seen)
    }

    #[tokio::test]
    async fn trailers_end_a_body_and_its_bytes_are_counted() {
        let frames = futures_util::stream::iter([
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(http::HeaderMap::new())),
        ]);
        let (mut body, seen) = watched(stream(http_body_util::StreamBody::new(frames)), false);
        assert!(body.frame().await.is_some());
        assert!(body.frame().await.is_some());
        drop(body);
        let e = seen.lock().unwrap().expect("told");
        assert_eq!(
            e,
            Ended {
                bytes: 5,
                completed: true
            },
            "hyper asks for nothing after trailers"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_midway_is_cut_short_and_one_never_sent_is_whole() {
        let frames = futures_util::stream::iter(
            ["ab", "cd"]
                .map(|part| Ok::<_, BoxError>(Frame::data(Bytes::from_static(part.as_bytes())))),
        );
        let (mut body, seen) = watched(stream(http_body_util::StreamBody::new(frames)), false);
        assert!(body.frame().await.is_some());
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            Some(Ended {
                bytes: 2,
                completed: false
            })
        );
        let (body, seen) = watched(full("a page never sent"), true);
        drop(body);
        assert_eq!(
            *seen.lock().unwrap(),
            Some(Ended {
                bytes: 0,
                completed: true
            })
        );
    }

    #[test]
    fn head_204_and_304_have_no_body() {
        assert!(has_no_body(&Method::HEAD, StatusCode::OK));
        assert!(has_no_body(&Method::GET, StatusCode::NO_CONTENT));
        assert!(has_no_body(&Method::GET, StatusCode::NOT_MODIFIED));
        assert!(!has_no_body(&Method::GET, StatusCode::NOT_FOUND));
    }
}
