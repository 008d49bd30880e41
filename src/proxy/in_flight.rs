//! The in-flight cap: at most `limit` requests of a room at once towards
//! its upstreams, counted until the response body ends. A request over
//! the cap waits, first come first served, in a bounded queue for at most
//! `wait`; only past that is it refused (503 and Retry-After), and the
//! person keeps their pass: being admitted is never taken back. With
//! `per_session`, one pass's session holds at most that many slots at
//! once: its further requests wait behind its own, in a line of their
//! own, so one script (or a client resetting its requests, whose slots
//! stay held until the portal answers) cannot take the room's slots
//! from everyone else admitted.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::InFlightConfig;

pub struct InFlight {
    config: InFlightConfig,
    // tokio's semaphore is fair: waiters get permits in arrival order.
    slots: Arc<Semaphore>,
    sizes: Arc<Mutex<Sizes>>,
    /// Shared with the cap a reload replaces: those still waiting in the
    /// old one's line count against the new one's `queue`.
    queued: Arc<AtomicUsize>,
    /// Whether a request found every slot taken since the last look: the
    /// adaptive limit grows only when it was the limit that held.
    saturated: AtomicBool,
    /// A reload handed the slots to the room's successor: a tick still
    /// running over the old room must not resize them.
    retired: AtomicBool,
    /// Each session's own slots, with `per_session`: an entry lives while
    /// one of its slots is held or waited for. Shared across a reload.
    sessions: Arc<Sessions>,
}

type Sessions = DashMap<u128, Arc<SessionLine>>;

/// One session's own slots, and how many of its requests wait for one.
struct SessionLine {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
}

#[derive(Debug, Clone, Copy)]
struct Sizes {
    limit: usize,
    /// Slots to retire as they come back (the limit shrank while they
    /// were held).
    debt: usize,
}

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full on arrival.
    QueueFull,
    /// It waited `wait` and no slot came free.
    Waited,
    /// Its session held `per_session` slots for all of `wait`, or as
    /// many of its requests already waited for one: the room may have
    /// had slots free (not a sign of an overloaded portal).
    SessionWaited,
}

/// A slot held; dropping it frees the slot for the next in the queue.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    sizes: Arc<Mutex<Sizes>>,
    _session: Option<SessionSlot>,
}

/// One of a session's own slots: its permit goes back before its entry
/// is looked at (fields drop in order).
struct SessionSlot {
    _permit: OwnedSemaphorePermit,
    _entry: SessionEntry,
}

/// A session's line, held while one of its slots is held or waited for;
/// the last to let go takes the entry out of the map.
struct SessionEntry {
    line: Option<Arc<SessionLine>>,
    sessions: Arc<Sessions>,
    id: u128,
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        let mine = self.line.take();
        // Every clone of a line is made (`session_slot`) and let go (here)
        // under its entry's lock: once this one is gone, the map's alone
        // means nobody else holds a slot of it or waits for one.
        self.sessions.remove_if(&self.id, |_, line| {
            drop(mine);
            Arc::strong_count(line) == 1
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut sizes = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        if sizes.debt > 0 {
            sizes.debt -= 1;
            permit.forget();
        }
    }
}

struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn new(config: InFlightConfig) -> Self {
        InFlight {
            slots: Arc::new(Semaphore::new(config.limit)),
            sizes: Arc::new(Mutex::new(Sizes {
                limit: config.limit,
                debt: 0,
            })),
            queued: Arc::new(AtomicUsize::new(0)),
            saturated: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            sessions: Arc::new(DashMap::new()),
            config,
        }
    }

    /// The cap of a room rebuilt by a reload: the same slots, so requests
    /// held across the reload still count (a fresh cap beside them would
    /// let the portal carry both); the new config's sizes, and, adaptive
    /// before and after, the limit adaptive admission had reached, within
    /// the new ceiling.
    pub fn continuing(config: InFlightConfig, old: &InFlight) -> Self {
        let learned = {
            // Under the lock resize takes: a resize of the old cap already
            // past its check finishes before this (and its limit is the
            // one read here), and none starts after.
            let sizes = old.sizes.lock().unwrap_or_else(|e| e.into_inner());
            old.retired.store(true, Ordering::Relaxed);
            sizes.limit
        };
        let limit = if config.adaptive && old.config.adaptive {
            learned.min(config.limit)
        } else {
            config.limit
        };
        let cap = InFlight {
            slots: old.slots.clone(),
            sizes: old.sizes.clone(),
            queued: old.queued.clone(),
            saturated: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            sessions: old.sessions.clone(),
            config,
        };
        cap.resize(limit);
        cap
    }

    pub fn config(&self) -> &InFlightConfig {
        &self.config
    }

    /// The limit in force (the configured one, or what adaptive admission
    /// made of it).
    pub fn limit(&self) -> usize {
        self.sizes().limit
    }

    fn sizes(&self) -> Sizes {
        *self.sizes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        let s = self.sizes();
        (s.limit + s.debt).saturating_sub(self.slots.available_permits())
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Whether the limit held anyone back since the last call.
    pub fn take_saturated(&self) -> bool {
        self.saturated.swap(false, Ordering::Relaxed)
    }

    /// Sets the limit (at least 1): more slots at once, or fewer as the
    /// held ones come back.
    pub fn resize(&self, limit: usize) {
        let limit = limit.max(1);
        let mut sizes = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        if limit > sizes.limit {
            let mut grow = limit - sizes.limit;
            let repaid = grow.min(sizes.debt);
            sizes.debt -= repaid;
            grow -= repaid;
            self.slots.add_permits(grow);
        } else {
            let shrink = sizes.limit - limit;
            let forgotten = self.slots.forget_permits(shrink);
            sizes.debt += shrink - forgotten;
        }
        sizes.limit = limit;
    }

    fn slot(&self, permit: OwnedSemaphorePermit, session: Option<SessionSlot>) -> Slot {
        Slot {
            permit: Some(permit),
            sizes: self.sizes.clone(),
            _session: session,
        }
    }

    /// A slot, at once or after waiting in line; `session`, the pass's
    /// session the request comes on (none for a room not gated).
    pub async fn enter(&self, session: Option<u128>) -> Result<Slot, Refused> {
        self.enter_timed(session).await.0
    }

    /// [`enter`](Self::enter), with the time spent in the room's line:
    /// what the portal's load made the request wait, for adaptive
    /// admission and `varco_in_flight_wait_seconds` (a session waiting
    /// behind its own requests says nothing of the portal).
    pub async fn enter_timed(&self, session: Option<u128>) -> (Result<Slot, Refused>, Duration) {
        let started = tokio::time::Instant::now();
        let own = match (self.config.per_session, session) {
            (Some(most), Some(id)) => match self.session_slot(id, most).await {
                Ok(own) => Some(own),
                Err(refused) => return (Err(refused), Duration::ZERO),
            },
            _ => None,
        };
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return (Ok(self.slot(permit, own)), Duration::ZERO);
        }
        self.saturated.store(true, Ordering::Relaxed);
        let before = self.queued.fetch_add(1, Ordering::Relaxed);
        let _queued = Queued(&self.queued);
        if before >= self.config.queue {
            return (Err(Refused::QueueFull), Duration::ZERO);
        }
        // One `wait` for both lines, the session's and the room's.
        let in_line = tokio::time::Instant::now();
        let left = self.config.wait.saturating_sub(started.elapsed());
        let got = match tokio::time::timeout(left, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(self.slot(permit, own)),
            // The semaphore is never closed; a timeout is the only refusal.
            _ => Err(Refused::Waited),
        };
        (got, in_line.elapsed())
    }

    /// One of the session's `most` slots, waited for (within `wait`)
    /// behind its own requests, outside the room's queue; refused at once
    /// when as many as the room's queue would hold for `most` slots
    /// already wait (one pass parks no flood of requests).
    async fn session_slot(&self, id: u128, most: usize) -> Result<SessionSlot, Refused> {
        // Made before the wait: a refusal, or a client gone meanwhile, lets
        // go of the entry too.
        let entry = SessionEntry {
            line: Some(
                self.sessions
                    .entry(id)
                    .or_insert_with(|| {
                        Arc::new(SessionLine {
                            slots: Arc::new(Semaphore::new(most)),
                            waiting: AtomicUsize::new(0),
                        })
                    })
                    .clone(),
            ),
            sessions: self.sessions.clone(),
            id,
        };
        let Some(line) = entry.line.as_deref() else {
            return Err(Refused::SessionWaited);
        };
        let permit = match line.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let before = line.waiting.fetch_add(1, Ordering::Relaxed);
                let _waiting = Queued(&line.waiting);
                if before
                    >= most.saturating_mul(crate::config::file::DEFAULT_IN_FLIGHT_QUEUE_FACTOR)
                {
                    return Err(Refused::SessionWaited);
                }
                match tokio::time::timeout(self.config.wait, line.slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(Refused::SessionWaited),
                }
            }
        };
        Ok(SessionSlot {
            _permit: permit,
            _entry: entry,
        })
    }

    /// Sessions holding or waiting for a slot of their own now.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// What a refused person is told to wait before trying again.
    pub fn retry_after(&self) -> Duration {
        self.config.wait.max(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(limit: usize, queue: usize, wait_ms: u64) -> InFlight {
        InFlight::new(InFlightConfig {
            limit,
            queue,
            wait: Duration::from_millis(wait_ms),
            adaptive: false,
            per_session: None,
        })
    }

    #[tokio::test]
    async fn waits_for_a_slot_then_gets_it() {
        let c = Arc::new(cap(1, 1, 10_000));
        let held = c.enter(None).await.unwrap();
        assert_eq!(c.in_flight(), 1);
        let waiter = waiter(&c, None);
        while c.queued() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue (1) is full: the next is refused at once.
        assert_eq!(c.enter(None).await.err(), Some(Refused::QueueFull));
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!((c.in_flight(), c.queued()), (0, 0));
    }

    /// A reload's cap counts those still waiting in the old one's line:
    /// a fresh count let another full queue in beside them.
    #[tokio::test]
    async fn a_reloaded_cap_counts_the_line_of_the_old_one() {
        let old = Arc::new(cap(1, 1, 10_000));
        let held = old.enter(None).await.unwrap();
        let waiter = waiter(&old, None);
        while old.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let new = InFlight::continuing(*old.config(), &old);
        assert_eq!(new.queued(), 1);
        assert_eq!(new.enter(None).await.err(), Some(Refused::QueueFull));
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!((new.in_flight(), new.queued()), (0, 0));
    }

    #[tokio::test]
    async fn shrinks_as_held_slots_come_back_and_grows_at_once() {
        let c = cap(3, 0, 10);
        let a = c.enter(None).await.unwrap();
        let b = c.enter(None).await.unwrap();
        c.resize(1);
        assert_eq!((c.limit(), c.in_flight()), (1, 2));
        drop(a);
        // One of the two held slots is retired; one is still out.
        assert_eq!(c.in_flight(), 1);
        assert_eq!(c.enter(None).await.err(), Some(Refused::QueueFull));
        assert!(c.take_saturated());
        drop(b);
        let only = c.enter(None).await.unwrap();
        assert_eq!(c.enter(None).await.err(), Some(Refused::QueueFull));
        c.resize(2);
        let second = c.enter(None).await.unwrap();
        assert_eq!(c.in_flight(), 2);
        drop((only, second));
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_reloaded_cap_counts_the_requests_held_across_it() {
        let old = cap(2, 0, 10);
        let a = old.enter(None).await.unwrap();
        let b = old.enter(None).await.unwrap();
        let new = InFlight::continuing(
            InFlightConfig {
                limit: 3,
                queue: 0,
                wait: Duration::from_millis(10),
                adaptive: false,
                per_session: None,
            },
            &old,
        );
        assert_eq!((new.limit(), new.in_flight()), (3, 2));
        // A tick still adapting the old room changes nothing any more.
        old.resize(1);
        assert_eq!(new.limit(), 3);
        let c = new.enter(None).await.unwrap();
        assert_eq!(new.enter(None).await.err(), Some(Refused::QueueFull));
        drop((a, b, c));
        assert_eq!(new.in_flight(), 0);

        // Adaptive on both sides: the learned limit holds, under the new
        // ceiling; a fixed cap takes its configured limit.
        let adaptive = |limit| InFlightConfig {
            limit,
            queue: 0,
            wait: Duration::from_millis(10),
            adaptive: true,
            per_session: None,
        };
        let learned = |limit| {
            let cap = InFlight::new(adaptive(8));
            cap.resize(limit);
            cap
        };
        assert_eq!(InFlight::continuing(adaptive(8), &learned(1)).limit(), 1);
        assert_eq!(InFlight::continuing(adaptive(4), &learned(5)).limit(), 4);
        let fixed = InFlightConfig {
            adaptive: false,
            ..adaptive(6)
        };
        assert_eq!(InFlight::continuing(fixed, &learned(1)).limit(), 6);
    }

    /// A request of `session` waiting for its slot on a task of its own;
    /// it lets the slot go as soon as it has it.
    fn waiter(
        c: &Arc<InFlight>,
        session: Option<u128>,
    ) -> tokio::task::JoinHandle<Result<(), Refused>> {
        let c = c.clone();
        tokio::spawn(async move { c.enter(session).await.map(drop) })
    }

    fn per_session(limit: usize, most: usize, wait_ms: u64) -> Arc<InFlight> {
        Arc::new(InFlight::new(InFlightConfig {
            per_session: Some(most),
            ..*cap(limit, 4, wait_ms).config()
        }))
    }

    /// A session at its share waits behind its own requests, outside the
    /// room's queue, while another session walks in.
    #[tokio::test]
    async fn a_session_waits_behind_its_own_and_others_go_in() {
        let c = per_session(4, 1, 10_000);
        let held = c.enter(Some(7)).await.unwrap();
        let second = waiter(&c, Some(7));
        tokio::task::yield_now().await;
        assert_eq!(c.queued(), 0, "not in the room's queue");
        let other = c.enter(Some(8)).await.unwrap();
        let unpassed = c.enter(None).await.unwrap();
        assert_eq!(c.in_flight(), 3, "the waiting one holds no room slot");
        drop(held);
        assert_eq!(second.await.unwrap(), Ok(()));
        drop((other, unpassed));
        assert_eq!((c.in_flight(), c.sessions()), (0, 0), "nothing left behind");
    }

    #[tokio::test]
    async fn a_session_over_its_share_for_the_whole_wait_is_refused_as_such() {
        let c = per_session(4, 2, 50);
        let a = c.enter(Some(1)).await.unwrap();
        let b = c.enter(Some(1)).await.unwrap();
        assert_eq!(c.enter(Some(1)).await.err(), Some(Refused::SessionWaited));
        assert!(!c.take_saturated(), "the room's slots never ran out");
        drop((a, b));
        assert_eq!((c.in_flight(), c.sessions()), (0, 0));
    }

    /// A request given up on while it waits for its session's slot (the
    /// client gone) leaves no entry behind once the others let go.
    #[tokio::test]
    async fn a_waiter_given_up_on_leaves_nothing_behind() {
        let c = per_session(4, 1, 10_000);
        let held = c.enter(Some(3)).await.unwrap();
        let waiter = waiter(&c, Some(3));
        tokio::task::yield_now().await;
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(c.sessions(), 1);
        drop(held);
        assert_eq!(c.sessions(), 0);
    }

    /// Time behind the session's own requests is not time in the room's
    /// line: adaptive admission would read one script's wait as the
    /// portal's load.
    #[tokio::test(start_paused = true)]
    async fn the_room_wait_leaves_out_the_sessions_own() {
        let c = per_session(4, 1, 10_000);
        let held = c.enter(Some(9)).await.unwrap();
        let second = {
            let c = c.clone();
            tokio::spawn(async move { c.enter_timed(Some(9)).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(held);
        let (got, in_room_line) = second.await.unwrap();
        assert!(got.is_ok());
        assert_eq!(in_room_line, Duration::ZERO);
    }

    /// One pass parks no flood: past four waiters for each of its slots
    /// (the room's queue factor), its next request is refused at once.
    #[tokio::test(start_paused = true)]
    async fn a_sessions_line_is_bounded() {
        let c = per_session(4, 1, 10_000);
        let _held = c.enter(Some(2)).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..4 {
            waiters.push(waiter(&c, Some(2)));
            tokio::task::yield_now().await;
        }
        let at_once = tokio::time::Instant::now();
        assert_eq!(c.enter(Some(2)).await.err(), Some(Refused::SessionWaited));
        assert_eq!(at_once.elapsed(), Duration::ZERO, "refused without waiting");
        for w in waiters {
            w.abort();
        }
    }

    /// Slots of one session let go at once on two threads: the last to
    /// go takes the entry out, whichever it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_let_go_together_leave_no_entry() {
        let c = per_session(64, 8, 10_000);
        for round in 0..200u128 {
            let slots: Vec<Slot> =
                futures_util::future::join_all((0..8).map(|_| c.enter(Some(round % 3))))
                    .await
                    .into_iter()
                    .map(Result::unwrap)
                    .collect();
            let drops: Vec<_> = slots
                .into_iter()
                .map(|s| tokio::spawn(async move { drop(s) }))
                .collect();
            for d in drops {
                d.await.unwrap();
            }
        }
        assert_eq!((c.in_flight(), c.sessions()), (0, 0));
    }

    /// A reload's cap counts the slots sessions hold across it.
    #[tokio::test]
    async fn a_reloaded_cap_counts_the_sessions_slots() {
        let old = per_session(4, 1, 20);
        let held = old.enter(Some(5)).await.unwrap();
        let new = InFlight::continuing(*old.config(), &old);
        assert_eq!(new.enter(Some(5)).await.err(), Some(Refused::SessionWaited));
        drop(held);
        drop(new.enter(Some(5)).await.unwrap());
        assert_eq!(new.sessions(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_the_wait() {
        let c = cap(1, 4, 50);
        let _held = c.enter(None).await.unwrap();
        assert_eq!(c.enter(None).await.err(), Some(Refused::Waited));
        assert_eq!(c.queued(), 0);
    }
}
