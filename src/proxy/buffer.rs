//! Request buffering (nginx's `proxy_request_buffering on`): a request
//! body is read whole before an in-flight slot or an upstream connection is
//! taken. A person uploading a scanned document over a slow line then
//! holds only varco's memory for those minutes, not a connection of the
//! portal and a share of its capacity; and a body read whole can go to the
//! next upstream when the first refuses the connection.
//!
//! Memory is bounded twice: `upstream.request_buffer` per request and
//! `upstream.request_buffer_memory` for all of them together. A body past
//! either streams as it arrives, as without buffering (never refused for
//! it), and the metrics say so.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::timeout::{BodyReadTimeout, TimedBody};
use super::ProxyError;
use crate::body::BoxError;
use crate::metrics::Metrics;

/// A request's body as it goes to the upstream.
pub enum ClientBody {
    /// Empty, or read whole: it can be sent again to another upstream.
    Whole(Whole),
    /// Sent as the client sends it, after `prefix` (what was read while
    /// trying to buffer it).
    Streaming(Prefixed<TimedBody<Incoming>>),
}

/// A body read whole, and the share of the buffer memory it holds (given
/// back when the request is done with it).
pub struct Whole {
    pub bytes: Bytes,
    _held: Option<Held>,
}

pub struct RequestBuffer {
    /// Largest body read whole; 0 turns buffering off.
    per_request: u64,
    memory: Arc<Semaphore>,
    max_body_size: u64,
    read_timeout: Duration,
    in_use: IntGauge,
    buffered: IntCounter,
    too_large: IntCounter,
    memory_full: IntCounter,
}

impl RequestBuffer {
    pub fn new(
        per_request: u64,
        memory: u64,
        max_body_size: u64,
        read_timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        // A semaphore counts at most usize::MAX >> 3 permits; no machine
        // has that much memory to lend.
        let memory = usize::try_from(memory)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        metrics
            .request_buffer_limit_bytes
            .set(i64::try_from(memory).unwrap_or(i64::MAX));
        let bodies = |handling| metrics.request_bodies.with_label_values(&[handling]);
        RequestBuffer {
            // One body's permits are a u32, and never more than the
            // memory there is, nor than a body may be.
            per_request: per_request
                .min(u64::from(u32::MAX))
                .min(memory as u64)
                .min(max_body_size),
            memory: Arc::new(Semaphore::new(memory)),
            max_body_size,
            read_timeout,
            in_use: metrics.request_buffer_bytes.clone(),
            buffered: bodies("buffered"),
            too_large: bodies("streamed_large"),
            memory_full: bodies("streamed_memory_full"),
        }
    }

    /// The body of a request about to be forwarded: read whole when it
    /// fits, or ready to stream. Errors are the client's: a body larger
    /// than `server.max_body_size` (413), one that stalls for
    /// `server.body_read_timeout` (408), or a broken one (400).
    pub async fn read(
        &self,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<ClientBody, ProxyError> {
        let declared = content_length(headers);
        if declared.is_some_and(|n| n > self.max_body_size) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body_size,
            });
        }
        if body.is_end_stream() {
            return Ok(ClientBody::Whole(Whole {
                bytes: Bytes::new(),
                _held: None,
            }));
        }
        let body = TimedBody::new(body, self.read_timeout);
        let stream = |prefix: Bytes, rest| ClientBody::Streaming(Prefixed::new(prefix, rest));
        if self.per_request == 0 {
            return Ok(stream(Bytes::new(), body));
        }
        // Without a length (chunked, or HTTP/2 without content-length):
        // room for the largest body buffered, and a switch to streaming
        // past it.
        let room = match declared {
            Some(n) if n > self.per_request => {
                self.too_large.inc();
                return Ok(stream(Bytes::new(), body));
            }
            Some(n) => n,
            None => self.per_request,
        };
        let Ok(permit) = self.memory.clone().try_acquire_many_owned(room as u32) else {
            self.memory_full.inc();
            return Ok(stream(Bytes::new(), body));
        };
        let held = Held::new(permit, room, self.in_use.clone());
        let mut read = BytesMut::with_capacity(if declared.is_some() { room as usize } else { 0 });
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(client_error)?;
            // Request trailers are not kept (nginx drops them too): no
            // browser sends them, and a body read whole has its length.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            read.extend_from_slice(&data);
            if read.len() as u64 > room {
                // Only without a declared length: hyper holds a declared
                // one to its word.
                if read.len() as u64 > self.max_body_size {
                    return Err(ProxyError::BodyTooLarge {
                        limit: self.max_body_size,
                    });
                }
                self.too_large.inc();
                return Ok(stream(read.freeze(), body));
            }
        }
        self.buffered.inc();
        Ok(ClientBody::Whole(Whole {
            bytes: read.freeze(),
            _held: Some(held),
        }))
    }
}

fn client_error(e: BoxError) -> ProxyError {
    if e.is::<BodyReadTimeout>() {
        ProxyError::BodyTimeout
    } else {
        ProxyError::ClientBody(e)
    }
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A share of the buffer memory, shown in `varco_request_buffer_bytes`
/// while held.
struct Held {
    _permit: OwnedSemaphorePermit,
    bytes: i64,
    in_use: IntGauge,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, bytes: u64, in_use: IntGauge) -> Self {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        in_use.add(bytes);
        Held {
            _permit: permit,
            bytes,
            in_use,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.in_use.sub(self.bytes);
    }
}

pin_project! {
    /// `prefix`, then the rest of the body.
    pub struct Prefixed<B> {
        prefix: Option<Bytes>,
        #[pin]
        rest: B,
    }
}

impl<B> Prefixed<B> {
    fn new(prefix: Bytes, rest: B) -> Self {
        Prefixed {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl<B> http_body::Body for Prefixed<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn a_prefix_comes_before_the_rest() {
        let rest = StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"cd"))),
            Ok(Frame::data(Bytes::from_static(b"ef"))),
        ]));
        let body = Prefixed::new(Bytes::from_static(b"ab"), rest);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdef");
    }

    #[test]
    fn the_size_hint_counts_the_prefix() {
        let rest = http_body_util::Full::new(Bytes::from_static(b"xyz"));
        let body = Prefixed::new(Bytes::from_static(b"ab"), rest);
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
    }
}
