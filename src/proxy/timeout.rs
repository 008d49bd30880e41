//! Time around bodies, which hyper does not keep. A client that sends its
//! headers and then trickles (or stops sending) its body, or an upstream
//! that stops in the middle of its answer, would hold a connection, an
//! upstream request and an in-flight slot for ever: [`TimedBody`] fails
//! a body when no data arrives for a while. An upload takes as long as the
//! person's line allows: [`Watched`] says when the upstream has the whole
//! request, so the wait for its answer is timed from then.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

#[derive(Debug, thiserror::Error)]
#[error("no body data for {0:?}")]
pub struct BodyReadTimeout(pub Duration);

pin_project! {
    pub struct TimedBody<B> {
        #[pin]
        inner: B,
        // Made the first time the body has to wait, and set again only
        // when it waits after progress: a body whose data is there when
        // asked (most answers of a few KiB) never touches the timer.
        deadline: Option<Pin<Box<Sleep>>>,
        progressed: bool,
        timeout: Duration,
    }
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        TimedBody {
            inner,
            deadline: None,
            progressed: false,
            timeout,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                // Progress: the clock starts again at the next wait.
                *this.progressed = true;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = *this.timeout;
                let deadline = match this.deadline {
                    Some(d) => {
                        if std::mem::take(this.progressed) {
                            d.as_mut().reset(Instant::now() + timeout);
                        }
                        d
                    }
                    None => {
                        *this.progressed = false;
                        this.deadline.insert(Box::pin(tokio::time::sleep(timeout)))
                    }
                };
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(BodyReadTimeout(*this.timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How much of a request body the upstream has taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// This many parts so far.
    Parts(u64),
    /// This many, and the upstream asked for the next, which the client
    /// has not sent yet (since then): the wait is the client's, not the
    /// upstream's.
    AwaitingClient(u64, std::time::Instant),
    All,
}

pin_project! {
    /// A request body that tells, through a watch channel, each time the
    /// upstream takes a part of it and when it has taken all of it.
    pub struct Watched<B> {
        #[pin]
        inner: B,
        taken: watch::Sender<Taken>,
    }
}

impl<B> Watched<B> {
    pub fn new(inner: B) -> (Self, watch::Receiver<Taken>) {
        let (taken, rx) = watch::channel(Taken::Parts(0));
        (Watched { inner, taken }, rx)
    }
}

impl<B: Body> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.taken.send_replace(Taken::All);
            }
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.taken.send_replace(Taken::All);
            }
            Poll::Ready(Some(Ok(_))) => this.taken.send_modify(|t| {
                if let Taken::Parts(n) | Taken::AwaitingClient(n, _) = *t {
                    *t = Taken::Parts(n + 1);
                }
            }),
            // Told once per wait, not at every poll.
            Poll::Pending => {
                this.taken.send_if_modified(|t| match *t {
                    Taken::Parts(n) => {
                        *t = Taken::AwaitingClient(n, std::time::Instant::now());
                        true
                    }
                    _ => false,
                });
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // hyper asks this, and may not poll again, once the length is met.
        let end = self.inner.is_end_stream();
        if end {
            self.taken.send_replace(Taken::All);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
