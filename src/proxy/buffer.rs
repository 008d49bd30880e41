//! Request buffering (nginx's `proxy_request_buffering on`): a request
//! body is read whole before an in-flight slot or an upstream connection is
//! taken. A person uploading a scanned document over a slow line then
//! holds only varco's memory for those minutes, not a connection of the
//! portal and a share of its capacity; and a body read whole can go to the
//! next upstream when the first refuses the connection.
//!
//! Memory is bounded twice: `upstream.request_buffer` per request and
//! `upstream.request_buffer_memory` for all of them together, counted from
//! the first byte read until the body is written to the upstream. A body
//! past either, or not whole within `upstream.request_buffer_time`,
//! streams as it arrives (what was read first), as without buffering:
//! never refused for it, and the metrics say so; except the body of a
//! request nobody admitted (an exempt path, a login detour), which must
//! come whole or is refused.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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
    /// Empty, or read whole: it can be sent again to another upstream
    /// until one takes it.
    Whole(Whole),
    /// Sent as the client sends it, after what was read while trying to
    /// buffer it.
    Streaming(Prefixed<TimedBody<Incoming>>),
}

/// A body read whole, and the share of the buffer memory it holds (given
/// back once an upstream's connection has written it, or the request
/// ends).
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
    /// How long reading a body whole may take in all.
    within: Duration,
    in_use: IntGauge,
    buffered: IntCounter,
    too_large: IntCounter,
    memory_full: IntCounter,
    too_slow: IntCounter,
    refused_large: IntCounter,
    refused_memory_full: IntCounter,
    refused_slow: IntCounter,
}

pub struct BufferLimits {
    pub per_request: u64,
    pub memory: u64,
    pub within: Duration,
    pub max_body_size: u64,
    pub read_timeout: Duration,
}

impl RequestBuffer {
    pub fn new(limits: BufferLimits, metrics: &Metrics) -> Self {
        // A semaphore counts at most usize::MAX >> 3 permits; no machine
        // has that much memory to lend.
        let memory = usize::try_from(limits.memory)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        metrics
            .request_buffer_limit_bytes
            .set(i64::try_from(memory).unwrap_or(i64::MAX));
        let bodies = |handling| metrics.request_bodies.with_label_values(&[handling]);
        RequestBuffer {
            // One body's permits are a u32, and never more than the
            // memory there is, nor than a body may be.
            per_request: limits
                .per_request
                .min(u64::from(u32::MAX))
                .min(memory as u64)
                .min(limits.max_body_size),
            memory: Arc::new(Semaphore::new(memory)),
            max_body_size: limits.max_body_size,
            read_timeout: limits.read_timeout,
            within: limits.within,
            in_use: metrics.request_buffer_bytes.clone(),
            buffered: bodies("buffered"),
            too_large: bodies("streamed_large"),
            memory_full: bodies("streamed_memory_full"),
            too_slow: bodies("streamed_slow"),
            refused_large: bodies("refused_large"),
            refused_memory_full: bodies("refused_memory_full"),
            refused_slow: bodies("refused_slow"),
        }
    }

    /// The body of a request about to be forwarded: read whole when it
    /// fits, or ready to stream. Errors: a body larger than
    /// `server.max_body_size` (413), one that stalls for
    /// `server.body_read_timeout` (408), or a broken one (400).
    ///
    /// `whole_only`: a request nobody admitted (an exempt path, a login
    /// detour) may not stream: a body past `request_buffer` is refused
    /// (413), one not whole in `request_buffer_time` too (408), and one
    /// that finds the memory in use is told to come back (503).
    pub async fn read(&self, body: Incoming, whole_only: bool) -> Result<ClientBody, ProxyError> {
        // hyper's reading of Content-Length (or HTTP/2's), which it holds
        // the body to.
        let declared = body.size_hint().exact();
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
        let stream = |read, held, rest| ClientBody::Streaming(Prefixed::new(read, held, rest));
        if self.per_request == 0 {
            return Ok(stream(VecDeque::new(), None, body));
        }
        // Without a length (chunked, or HTTP/2 without content-length):
        // room for the largest body read whole, the rest given back once
        // it is.
        let room = match declared {
            Some(n) if n > self.per_request => {
                return self.too_large(whole_only, || stream(VecDeque::new(), None, body));
            }
            Some(n) => n,
            None => self.per_request,
        };
        let Ok(permit) = self.memory.clone().try_acquire_many_owned(room as u32) else {
            if whole_only {
                self.refused_memory_full.inc();
                return Err(ProxyError::BufferFull);
            }
            self.memory_full.inc();
            return Ok(stream(VecDeque::new(), None, body));
        };
        let mut held = Held::new(permit, self.in_use.clone());
        let mut body = body;
        let mut read = Gathered::for_room(room);
        let mut len: u64 = 0;
        let deadline = tokio::time::Instant::now() + self.within;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(Some(frame)) => frame.map_err(client_error)?,
                Ok(None) => break,
                // A line too slow to fill the buffer in time: the memory
                // would be held for its whole upload; it streams instead.
                Err(_) if whole_only => {
                    self.refused_slow.inc();
                    return Err(ProxyError::BodyTimeout);
                }
                Err(_) => {
                    self.too_slow.inc();
                    return Ok(stream(read.parts(), Some(held), body));
                }
            };
            // Request trailers are not kept (nginx drops them too): no
            // browser sends them, and a body read whole has its length.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            len += data.len() as u64;
            read.add(data);
            if len > room {
                // Only without a declared length: hyper holds a declared
                // one to its word.
                if len > self.max_body_size {
                    return Err(ProxyError::BodyTooLarge {
                        limit: self.max_body_size,
                    });
                }
                return self.too_large(whole_only, || stream(read.parts(), Some(held), body));
            }
        }
        held.shrink_to(len);
        self.buffered.inc();
        let mut read = read.parts();
        let bytes = match read.len() {
            0 => Bytes::new(),
            // A small body alone keeps a whole buffer (one of gathering,
            // or hyper's) for a few bytes: copied, cheaply.
            1 if len < GATHER as u64 => Bytes::copy_from_slice(&read[0]),
            1 => read.pop_front().unwrap_or_default(),
            _ => {
                let mut whole = BytesMut::with_capacity(len as usize);
                for part in read {
                    whole.extend_from_slice(&part);
                }
                whole.freeze()
            }
        };
        Ok(ClientBody::Whole(Whole {
            bytes,
            _held: Some(held),
        }))
    }

    /// A body past `request_buffer`: streamed, or refused when it must
    /// come whole.
    fn too_large(
        &self,
        whole_only: bool,
        stream: impl FnOnce() -> ClientBody,
    ) -> Result<ClientBody, ProxyError> {
        if whole_only {
            self.refused_large.inc();
            return Err(ProxyError::BodyTooLarge {
                limit: self.per_request,
            });
        }
        self.too_large.inc();
        Ok(stream())
    }
}

/// Frames below this are copied as they are read.
const SMALL: usize = 4096;
/// The buffers small frames are copied into.
const GATHER: usize = 16 * 1024;

/// What was read of a body before it is sent. hyper's frames are slices
/// of its read buffers: a body sent in frames of a byte each (chunks of
/// one byte, HTTP/2 DATA frames of one byte) would keep every read buffer
/// alive, its chunk headers and padding included, and cost a queue entry
/// a byte: many times the memory counted, which is the body's length.
/// Small frames are copied together into buffers filled to the last byte;
/// larger ones, whose framing costs little, are kept as they came.
struct Gathered {
    parts: VecDeque<Bytes>,
    small: BytesMut,
    /// What the body may still bring before it streams: a buffer no
    /// larger (a form of a few bytes takes a few bytes, not a buffer).
    room: u64,
}

impl Gathered {
    fn for_room(room: u64) -> Self {
        Gathered {
            parts: VecDeque::new(),
            small: BytesMut::new(),
            room,
        }
    }

    fn add(&mut self, data: Bytes) {
        self.room = self.room.saturating_sub(data.len() as u64);
        if data.len() >= SMALL {
            self.flush();
            self.parts.push_back(data);
            return;
        }
        let mut rest = &data[..];
        while !rest.is_empty() {
            if self.small.len() == self.small.capacity() {
                self.flush();
                let room = usize::try_from(self.room).unwrap_or(usize::MAX);
                self.small = BytesMut::with_capacity(GATHER.min(rest.len() + room));
            }
            let n = rest.len().min(self.small.capacity() - self.small.len());
            self.small.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }

    /// The copied bytes so far as a part; the rest of their buffer goes on
    /// filling.
    fn flush(&mut self) {
        if !self.small.is_empty() {
            self.parts.push_back(self.small.split().freeze());
        }
    }

    fn parts(mut self) -> VecDeque<Bytes> {
        self.flush();
        self.parts
    }
}

fn client_error(e: BoxError) -> ProxyError {
    if e.is::<BodyReadTimeout>() {
        ProxyError::BodyTimeout
    } else {
        ProxyError::ClientBody(e)
    }
}

/// A share of the buffer memory, shown in `varco_request_buffer_bytes`
/// while held.
struct Held {
    permit: OwnedSemaphorePermit,
    in_use: IntGauge,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, in_use: IntGauge) -> Self {
        in_use.add(permit.num_permits() as i64);
        Held { permit, in_use }
    }

    /// Gives back what a body without a length did not need.
    fn shrink_to(&mut self, bytes: u64) {
        let keep = usize::try_from(bytes).unwrap_or(usize::MAX);
        let spare = self.permit.num_permits().saturating_sub(keep);
        if let Some(spare) = self.permit.split(spare) {
            self.in_use.sub(spare.num_permits() as i64);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.in_use.sub(self.permit.num_permits() as i64);
    }
}

/// A body read whole, shared by the tries at sending it: the first
/// upstream that takes it takes it from here (and with it the memory it
/// holds, given back as it goes out). While it is here, no upstream has
/// taken it, and another may be asked.
#[derive(Clone)]
pub struct Sendable(Arc<Mutex<Option<Whole>>>);

impl Sendable {
    pub fn new(whole: Whole) -> Self {
        Sendable(Arc::new(Mutex::new(Some(whole))))
    }

    /// Whether no upstream has taken the body yet.
    pub fn is_here(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The body for one try; None once an upstream took it.
    pub fn body(&self) -> Option<OneTry> {
        let guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let len = guard.as_ref()?.bytes.len() as u64;
        Some(OneTry {
            from: self.clone(),
            len,
            sent: false,
        })
    }
}

/// A body read whole as the bytes of a frame, holding its memory share.
struct Owned(Whole);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

/// One try's body: the whole body in one frame, taken from its
/// [`Sendable`] when the upstream first asks for it.
pub struct OneTry {
    from: Sendable,
    len: u64,
    sent: bool,
}

impl http_body::Body for OneTry {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::replace(&mut self.sent, true) {
            return Poll::Ready(None);
        }
        let taken = self.from.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            // The memory is given back when hyper is done with the bytes
            // (written to the upstream), not when it takes them: a slow
            // upstream still holds them meanwhile.
            Some(whole) if !whole.bytes.is_empty() => {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_owner(Owned(whole))))))
            }
            Some(_) => Poll::Ready(None),
            None => Poll::Ready(Some(
                Err("the request body went to another upstream".into()),
            )),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent || self.len == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.sent {
            SizeHint::with_exact(0)
        } else {
            SizeHint::with_exact(self.len)
        }
    }
}

pin_project! {
    /// What was read first, then the rest of the body; the memory the
    /// first part held is given back once it is handed on.
    pub struct Prefixed<B> {
        read: VecDeque<Bytes>,
        held: Option<Held>,
        #[pin]
        rest: B,
    }
}

impl<B> Prefixed<B> {
    fn new(read: VecDeque<Bytes>, held: Option<Held>, rest: B) -> Self {
        Prefixed { read, held, rest }
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
        if let Some(part) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(part))));
        }
        this.held.take();
        this.rest.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead: u64 = self.read.iter().map(|p| p.len() as u64).sum();
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
    use http_body_util::StreamBody;

    fn parts(p: &[&'static [u8]]) -> VecDeque<Bytes> {
        p.iter().map(|b| Bytes::from_static(b)).collect()
    }

    /// A body in frames of one byte is kept in a few buffers, not one
    /// part (and one read buffer of hyper's) a byte; larger frames are
    /// kept as they came; the bytes and their order are as sent.
    #[test]
    fn small_frames_are_gathered_into_few_buffers() {
        let mut g = Gathered::for_room(1 << 20);
        let mut sent = Vec::new();
        for i in 0..200_000u32 {
            let b = [(i % 251) as u8];
            sent.extend_from_slice(&b);
            g.add(Bytes::copy_from_slice(&b));
        }
        let big = Bytes::from(vec![7u8; SMALL]);
        sent.extend_from_slice(&big);
        g.add(big.clone());
        g.add(Bytes::from_static(b"end"));
        sent.extend_from_slice(b"end");
        let parts = g.parts();
        assert!(parts.len() <= 200_000 / GATHER + 3, "{} parts", parts.len());
        assert!(
            parts.iter().any(|p| p.as_ptr() == big.as_ptr()),
            "a large frame kept, not copied"
        );
        let got: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(got, sent);
    }

    /// A body of a few bytes, its length declared, takes a buffer of that
    /// size, not a gathering buffer.
    #[test]
    fn a_small_declared_body_takes_its_own_size() {
        let mut g = Gathered::for_room(10);
        g.add(Bytes::from_static(b"iban="));
        assert_eq!(g.small.capacity(), 10);
        g.add(Bytes::from_static(b"IT001"));
        let parts = g.parts();
        assert_eq!(parts.len(), 1);
        assert_eq!(&parts[0][..], b"iban=IT001");
    }

    #[tokio::test]
    async fn what_was_read_comes_before_the_rest() {
        let rest = StreamBody::new(futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"ef"))),
            Ok(Frame::data(Bytes::from_static(b"gh"))),
        ]));
        let body = Prefixed::new(parts(&[b"ab", b"cd"]), None, rest);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcdefgh");
    }

    #[test]
    fn the_size_hint_counts_what_was_read() {
        let rest = http_body_util::Full::new(Bytes::from_static(b"xyz"));
        let body = Prefixed::new(parts(&[b"ab"]), None, rest);
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn the_memory_is_given_back_as_the_upstream_takes_the_body() {
        let metrics = Metrics::new();
        let memory = Arc::new(Semaphore::new(100));
        let permit = memory.clone().try_acquire_many_owned(10).unwrap();
        let mut held = Held::new(permit, metrics.request_buffer_bytes.clone());
        held.shrink_to(4);
        assert_eq!(memory.available_permits(), 96);
        assert_eq!(metrics.request_buffer_bytes.get(), 4);
        let sendable = Sendable::new(Whole {
            bytes: Bytes::from_static(b"form"),
            _held: Some(held),
        });
        // A try that never sent it (a refused connection) leaves it.
        drop(sendable.body().unwrap());
        assert!(sendable.is_here());
        let sent = sendable.body().unwrap().collect().await.unwrap().to_bytes();
        assert_eq!(&sent[..], b"form");
        assert!(!sendable.is_here());
        assert!(sendable.body().is_none());
        // Counted until the bytes are written (dropped), not just taken.
        assert_eq!(memory.available_permits(), 96);
        drop(sent);
        assert_eq!(memory.available_permits(), 100);
        assert_eq!(metrics.request_buffer_bytes.get(), 0);
    }
}
