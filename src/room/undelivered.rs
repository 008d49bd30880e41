//! Passes not yet delivered. A claim marks its ticket used in the store
//! at once, but the pass reaches the person only with the portal's answer
//! to the claiming request. If that answer never gets there (the person
//! gives up on a slow portal and reloads, the connection drops, an HTTP/2
//! stream is reset), the next request with the same ticket would
//! find it used and start again at the back of the line, while the session
//! made for it held a slot for nobody.
//!
//! So this node remembers each claim until the end of its answer's body
//! has gone out; until then, the same ticket gets the same session's pass
//! again. A ticket whose pass was delivered admits nobody any more (a
//! ticket that was admitted cannot admit a second time): a copy
//! presented in the moment between claim and delivery shares the one
//! session and its one slot, as a copied pass would. Per node: in cluster
//! mode a retry through another node finds the ticket used, as before.

use std::sync::Arc;

use dashmap::DashMap;

use crate::body::{self, Body};

/// Claims waiting for delivery, at most: a flood of abandoned claims
/// (each held until its deadline) cannot grow memory past this; beyond
/// it, a claim is simply not held, as before this existed.
const MAX_HELD: usize = 100_000;

/// The ticket a claim was made with: its lane's label, its number, its
/// arrival time (so a number handed out again after Redis lost its data
/// is another ticket).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Claimed {
    lane: String,
    n: u64,
    arrived_ms: u64,
}

impl Claimed {
    fn of(lane: &str, n: u64, arrived_ms: u64) -> Claimed {
        Claimed {
            lane: lane.to_string(),
            n,
            arrived_ms,
        }
    }
}

#[derive(Clone, Copy)]
struct Held {
    sid: u128,
    until_ms: u64,
}

#[derive(Default)]
pub struct Undelivered {
    held: Arc<DashMap<Claimed, Held>>,
}

impl Undelivered {
    /// Remembers that ticket (`lane`, `n`, `arrived_ms`) claimed session
    /// `sid`, until `until_ms` or the delivery of the returned guard's
    /// answer, whichever comes first.
    pub fn hold(
        &self,
        lane: &str,
        n: u64,
        arrived_ms: u64,
        sid: u128,
        now_ms: u64,
        until_ms: u64,
    ) -> Option<Delivery> {
        if !self.has_room(now_ms) {
            return None;
        }
        let ticket = Claimed::of(lane, n, arrived_ms);
        self.held.insert(ticket.clone(), Held { sid, until_ms });
        Some(self.delivery(ticket))
    }

    /// Whether another claim may be held, those past their time dropped
    /// first when there are `MAX_HELD`.
    fn has_room(&self, now_ms: u64) -> bool {
        if self.held.len() >= MAX_HELD {
            self.held.retain(|_, h| h.until_ms > now_ms);
        }
        self.held.len() < MAX_HELD
    }

    /// The session a ticket claimed whose pass has not been delivered, with
    /// a guard for the answer that carries it again.
    pub fn held_for(
        &self,
        lane: &str,
        n: u64,
        arrived_ms: u64,
        now_ms: u64,
    ) -> Option<(u128, Delivery)> {
        let ticket = Claimed::of(lane, n, arrived_ms);
        let held = *self.held.get(&ticket)?;
        if held.until_ms <= now_ms {
            self.held.remove_if(&ticket, |_, h| h.until_ms <= now_ms);
            return None;
        }
        Some((held.sid, self.delivery(ticket)))
    }

    /// The session held for a ticket, touching nothing: what a status
    /// poll reads to say whether a reload would bring the pass again.
    pub fn holds(&self, lane: &str, n: u64, arrived_ms: u64, now_ms: u64) -> Option<u128> {
        let held = *self.held.get(&Claimed::of(lane, n, arrived_ms))?;
        (held.until_ms > now_ms).then_some(held.sid)
    }

    /// Drops a hold whose session is gone: its pass would let nobody in.
    pub fn forget(&self, lane: &str, n: u64, arrived_ms: u64) {
        self.held.remove(&Claimed::of(lane, n, arrived_ms));
    }

    /// The holds of the room this one replaces (a reload): a claim in
    /// flight across it keeps its pass.
    pub fn continuing(old: &Undelivered) -> Undelivered {
        Undelivered {
            held: old.held.clone(),
        }
    }

    fn delivery(&self, ticket: Claimed) -> Delivery {
        Delivery {
            held: self.held.clone(),
            ticket,
            head: false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.held.len()
    }
}

/// The answer that carries a claimed pass: once its body has gone out
/// whole, the ticket is spent.
pub struct Delivery {
    held: Arc<DashMap<Claimed, Held>>,
    ticket: Claimed,
    /// An answer to a HEAD: sent without its body, which hyper drops
    /// unpolled once the head is written, its delivery.
    head: bool,
}

impl Delivery {
    fn delivered(&self) {
        self.held.remove(&self.ticket);
    }

    /// For an answer to a HEAD, whose body (a page varco made, say) is
    /// never sent.
    pub fn answering_head(mut self, head: bool) -> Self {
        self.head = head;
        self
    }

    /// `body`, which marks the pass delivered when its end has gone out.
    /// An answer dropped before (the person gone, the connection reset)
    /// leaves the ticket able to fetch its pass again.
    pub fn on_end_of(self, body: Body, status: http::StatusCode) -> Body {
        let bodiless = self.head || body::status_has_no_body(status);
        body::on_end(body, bodiless, move |e| {
            if e.completed {
                self.delivered();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BoxError;
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_pass_is_held_until_its_answer_ends() {
        let u = Undelivered::default();
        let d = u.hold("", 7, 1_000, 42, 2_000, 62_000).unwrap();
        assert_eq!(u.holds("", 7, 1_000, 3_000), Some(42));
        let (sid, again) = u.held_for("", 7, 1_000, 3_000).expect("held");
        assert_eq!(sid, 42);
        assert!(u.held_for("", 7, 999, 3_000).is_none(), "another ticket");
        assert!(u.held_for("", 8, 1_000, 3_000).is_none(), "another number");
        // An answer dropped half sent delivers nothing.
        let two_parts = futures_util::stream::iter(
            ["pa", "ge"]
                .map(|part| Ok::<_, BoxError>(Frame::data(Bytes::from_static(part.as_bytes())))),
        );
        let mut cut = again.on_end_of(
            body::stream(http_body_util::StreamBody::new(two_parts)),
            http::StatusCode::OK,
        );
        drop(cut.frame().await);
        drop(cut);
        assert!(u.held_for("", 7, 1_000, 3_000).is_some(), "still held");
        let whole = d
            .on_end_of(body::full("page"), http::StatusCode::OK)
            .collect()
            .await
            .unwrap();
        assert_eq!(whole.to_bytes(), "page");
        assert!(
            u.held_for("", 7, 1_000, 3_000).is_none(),
            "delivered: spent"
        );
        assert_eq!(u.len(), 0);
    }

    #[tokio::test]
    async fn an_empty_answer_is_delivered_when_dropped() {
        let u = Undelivered::default();
        let d = u.hold("", 1, 0, 1, 0, 60_000).unwrap();
        drop(d.on_end_of(body::empty(), http::StatusCode::OK));
        assert!(u.held_for("", 1, 0, 1).is_none());
        // A HEAD's answer: its page is never sent, nor polled.
        let d = u.hold("", 2, 0, 2, 0, 60_000).unwrap();
        let page = body::full("a page varco made");
        drop(
            d.answering_head(true)
                .on_end_of(page, http::StatusCode::BAD_GATEWAY),
        );
        assert!(u.held_for("", 2, 0, 1).is_none());
        // A GET's, dropped before any of it went: not delivered.
        let d = u.hold("", 3, 0, 3, 0, 60_000).unwrap();
        drop(d.on_end_of(body::full("a page"), http::StatusCode::BAD_GATEWAY));
        assert!(u.held_for("", 3, 0, 1).is_some());
    }

    #[test]
    fn a_held_claim_lapses_at_its_deadline() {
        let u = Undelivered::default();
        let _d = u.hold("", 1, 0, 1, 0, 60_000).unwrap();
        assert!(u.held_for("", 1, 0, 59_999).is_some());
        assert!(u.held_for("", 1, 0, 60_000).is_none());
        assert_eq!(u.len(), 0, "forgotten once found lapsed");
    }
}
