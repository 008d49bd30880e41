//! The one-node store: each room's admission state under a mutex (held for
//! microseconds, never across an await), live sessions in a dashmap, and
//! snapshots to a file (write, fsync, rename) so a restart keeps every
//! place in line and every live session. Between snapshots, numbers are
//! written ahead ([`super::ahead`]) so a crash hands nobody's place to
//! somebody else, and passes begun after the last snapshot are taken back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::future::{self, BoxFuture, FutureExt};
use serde::{Deserialize, Serialize};

use super::ahead::{self, Ahead, Marks, Wake};
use super::{
    read_json, write_atomically, Adoption, Checked, HandOver, KeyId, Liveness, NewSession,
    RoomStore, RoomView, StoreError,
};
use crate::room::admission::{
    expiry_after_step_back, new_generation, AdmissionState, Claim, Issued, Limits,
};

/// How long an arrival waits for its number to be written ahead before it
/// is handed out anyway.
const WRITE_AHEAD_WAIT: Duration = Duration::from_secs(2);

pub struct MemoryRoom {
    state: Mutex<AdmissionState>,
    lottery_kid: KeyId,
    /// Session id -> expiry (unix ms). Only admitted people are here.
    sessions: DashMap<u128, AtomicU64>,
    /// Sessions the portal ended -> when to forget them (unix ms).
    ended: DashMap<u128, u64>,
    /// The numbers on disk ahead of those handed out; none without a
    /// snapshot file (nothing survives a restart then anyway).
    ahead: Option<Ahead>,
    /// See [`MemoryStore::lost`].
    lost: Lost,
    /// The state's generation, which never changes in a room's life:
    /// read on every ticket without taking the lock.
    generation: u64,
    /// The longest idle time a session of this room was given (ms; 0:
    /// none seen), kept across restarts: what bounds how long a pass
    /// outlives its session (see [`restored_expiry`]).
    idle_ms: AtomicU64,
}

impl MemoryRoom {
    fn new(state: AdmissionState, ahead: Option<Ahead>, lost: Lost) -> Self {
        MemoryRoom {
            generation: state.generation,
            state: Mutex::new(state),
            lottery_kid: KeyId::default(),
            sessions: DashMap::new(),
            ended: DashMap::new(),
            ahead,
            lost,
            idle_ms: AtomicU64::new(0),
        }
    }

    /// Notes a session given `idle_ms`. Read first: the store is on every
    /// proxied request, and the idle time rarely changes.
    fn saw_idle(&self, idle_ms: u64) {
        if self.idle_ms.load(Ordering::Relaxed) < idle_ms {
            self.idle_ms.fetch_max(idle_ms, Ordering::Relaxed);
        }
    }

    /// Makes or renews session `sid` to end at `expires_ms`.
    fn hold(&self, sid: u128, expires_ms: u64, now_ms: u64) {
        self.saw_idle(expires_ms.saturating_sub(now_ms));
        self.sessions.insert(sid, AtomicU64::new(expires_ms));
    }

    /// The opening this room's queue was last run for before it opened
    /// (see [`AdmissionState::opening_ms`]).
    pub fn opening_ms(&self) -> Option<u64> {
        self.lock().opening_ms
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        // A panic while holding the lock cannot leave the counters half
        // updated in a way worse than losing them: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn purge(&self, now_ms: u64) -> u64 {
        // A clock stepped back (NTP, a restore on a host behind) leaves
        // expiries further ahead than any idle time gives: everyone who
        // left would hold a slot for idle time plus the step, a full
        // room admitting nobody for as long. Past twice the longest idle
        // time (a restored session's bound), they run from now.
        let idle = self.idle_ms.load(Ordering::Relaxed);
        self.sessions.retain(|_, exp| {
            let e = exp.load(Ordering::Relaxed);
            if let Some(mended) = expiry_after_step_back(e, now_ms, idle) {
                exp.store(mended, Ordering::Relaxed);
            }
            e > now_ms
        });
        self.ended.retain(|_, until| *until > now_ms);
        self.sessions.len() as u64
    }

    fn live(&self) -> u64 {
        self.sessions.len() as u64
    }

    /// Runs `step` on the state once the marks on disk cover what it may
    /// hand out (`covered` says whether they do; the room opens first if
    /// its time has come). Without a snapshot file, at once.
    fn durably<'a, T: Send + 'a>(
        &'a self,
        limits: Limits,
        now_ms: u64,
        covered: fn(&Ahead, &AdmissionState) -> bool,
        step: impl FnOnce(&mut AdmissionState) -> T + Send + 'a,
    ) -> BoxFuture<'a, T> {
        let Some(ahead) = &self.ahead else {
            return future::ready(step(&mut self.lock())).boxed();
        };
        {
            let mut st = self.lock();
            st.maybe_open(&limits, now_ms);
            if covered(ahead, &st) {
                return future::ready(step(&mut st)).boxed();
            }
        }
        async move {
            let deadline = tokio::time::Instant::now() + WRITE_AHEAD_WAIT;
            loop {
                // Registered before the check, so a write between the check
                // and the wait still wakes it.
                let mut written = std::pin::pin!(ahead.written());
                written.as_mut().enable();
                {
                    let mut st = self.lock();
                    st.maybe_open(&limits, now_ms);
                    if covered(ahead, &st) {
                        return step(&mut st);
                    }
                }
                if tokio::time::timeout_at(deadline, written).await.is_err() {
                    // A disk that hangs must not stop a click day: a crash
                    // that may come is the lesser harm.
                    ahead.too_late(WRITE_AHEAD_WAIT);
                    let mut st = self.lock();
                    st.maybe_open(&limits, now_ms);
                    return step(&mut st);
                }
            }
        }
        .boxed()
    }
}

impl RoomStore for MemoryRoom {
    fn issue(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<Issued, StoreError>> {
        self.durably(limits, now_ms, Ahead::covers_next, move |st| {
            Ok(st.issue(&limits, now_ms))
        })
    }

    fn admit_directly(
        &self,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        self.durably(limits, now_ms, Ahead::covers_next, move |st| {
            let n = st.admit_directly(&limits, self.live(), now_ms);
            if n.is_some() {
                self.hold(session.sid, session.expires_ms, now_ms);
            }
            Ok(n)
        })
    }

    fn claim(
        &self,
        n: u64,
        generation: u64,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Claim, StoreError>> {
        if !self.holds_place(generation) {
            return future::ready(Ok(Claim::OtherRun)).boxed();
        }
        let mut state = self.lock();
        let c = state.claim(n, &limits, now_ms);
        if c == Claim::Admitted {
            self.hold(session.sid, session.expires_ms, now_ms);
        }
        drop(state);
        future::ready(Ok(c)).boxed()
    }

    fn tick(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        // Nobody is called after an opening that is not on disk yet: a
        // crash would draw the lottery again.
        self.durably(limits, now_ms, Ahead::covers_opening, move |st| {
            let active = self.purge(now_ms);
            Ok(st.tick(&limits, active, now_ms))
        })
    }

    fn touch(&self, sid: u128, now_ms: u64, idle_ms: u64) -> Liveness {
        match self.sessions.get(&sid) {
            Some(exp) if exp.load(Ordering::Relaxed) > now_ms => {
                exp.store(now_ms + idle_ms, Ordering::Relaxed);
                self.saw_idle(idle_ms);
                Liveness::Alive
            }
            _ => Liveness::Dead,
        }
    }

    fn peek_local(&self, sid: u128, now_ms: u64) -> Liveness {
        match self.sessions.get(&sid) {
            Some(exp) if exp.load(Ordering::Relaxed) > now_ms => Liveness::Alive,
            _ => Liveness::Dead,
        }
    }

    fn peek(&self, sid: u128, now_ms: u64) -> BoxFuture<'_, Result<bool, StoreError>> {
        let alive = self.peek_local(sid, now_ms) == Liveness::Alive;
        future::ready(Ok(alive)).boxed()
    }

    fn check_session(
        &self,
        sid: u128,
        now_ms: u64,
        idle_ms: u64,
    ) -> BoxFuture<'_, Result<Checked, StoreError>> {
        // One node knows every session: the local answer is the answer
        // (and `touch` never leaves one unknown, so this is not asked).
        let alive = self.touch(sid, now_ms, idle_ms) == Liveness::Alive;
        future::ready(Ok(if alive {
            Checked::Alive
        } else {
            Checked::Unheard
        }))
        .boxed()
    }

    fn end_session(
        &self,
        sid: u128,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.ended.insert(sid, now_ms + remember_ms);
        future::ready(Ok(self.sessions.remove(&sid).is_some())).boxed()
    }

    fn hand_over(
        &self,
        old: u128,
        new: u128,
        expires_ms: u64,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<HandOver, StoreError>> {
        // Decided under the end's entry lock: of two asks at once, one
        // moves the session, the other finds it moved.
        let made = match self.ended.entry(old) {
            dashmap::Entry::Occupied(_) => match self.sessions.get(&new) {
                Some(e) if e.load(Ordering::Relaxed) > now_ms => {
                    e.fetch_max(expires_ms, Ordering::Relaxed);
                    HandOver::MadeBefore
                }
                _ => HandOver::Refused,
            },
            dashmap::Entry::Vacant(v) => {
                // The new session made before the end is marked: the
                // mark's insert lets go of the lock, and an ask that found
                // the old one ended but the new one not yet made would be
                // refused.
                self.sessions.remove(&old);
                self.hold(new, expires_ms, now_ms);
                v.insert(now_ms + remember_ms);
                HandOver::Made
            }
        };
        future::ready(Ok(made)).boxed()
    }

    fn adopt(
        &self,
        sid: u128,
        n: u64,
        began_ms: u64,
        now_ms: u64,
        idle_ms: u64,
        limits: &Limits,
    ) -> Adoption {
        // Slack: the snapshot's time is read before its sessions are,
        // and a session let in straight away is stamped before its wait
        // for the marks (up to WRITE_AHEAD_WAIT). Not one begun since a
        // restart (that run's own, lapsed and purged: it comes back as
        // anyone's lapsed pass does).
        let slack = 1_000 + WRITE_AHEAD_WAIT.as_millis() as u64;
        let lost_in_one = self.lost.iter().any(|&(lost_from, restarted)| {
            began_ms + slack >= lost_from && began_ms < restarted && now_ms < restarted + idle_ms
        });
        if !lost_in_one || self.ended.contains_key(&sid) {
            return Adoption::Refused;
        }
        // The serving counter went back to the snapshot's, so the pass's
        // own number may be called again: then it takes that slot. Else
        // only a free one: its slot may have gone to somebody else (its
        // number called again and lapsed).
        let mut st = self.lock();
        // Known here: taken back by a request of the same pass that got
        // the lock first (a page and its assets at once: this one, turned
        // away, took its holder out of the portal mid-form), or idled out
        // since, which was not lost. Under the lock, as the taking is.
        match self.peek_local(sid, now_ms) {
            Liveness::Alive => return Adoption::Alive,
            _ if self.sessions.contains_key(&sid) => return Adoption::Refused,
            _ => {}
        }
        let claim = st.claim(n, limits, now_ms);
        if claim != Claim::Admitted
            && limits
                .max_active
                .is_some_and(|max| self.live() + st.reserved() >= max)
        {
            // Not called again yet: the number is a place in line still,
            // ahead of everyone who came after it.
            return match claim {
                Claim::NotYet { .. } => Adoption::Waits,
                _ => Adoption::Refused,
            };
        }
        if let (Claim::NotYet { .. }, true) = (claim, n <= st.queue) {
            // Taken before its number is called again: marked claimed, or
            // a copy of its ticket claimed it then, a second session. (A
            // number past the queue, handed out without its mark on disk
            // before the crash, is the next newcomer's: not theirs to lose.)
            st.claimed.insert(n);
        }
        self.hold(sid, now_ms + idle_ms, now_ms);
        drop(st);
        tracing::info!(
            session = format_args!("{sid:032x}"),
            number = n,
            "a session lost in the crash is taken back"
        );
        Adoption::Taken
    }

    fn view(&self) -> RoomView {
        let s = self.lock();
        // An opening not on disk yet is not shown: a crash before the write
        // would draw the lottery over another size, and the places and seed
        // published would not be the ones that hold.
        let unwritten = s.opened && self.ahead.as_ref().is_some_and(|a| !a.opening_on_disk());
        let queue = if unwritten {
            s.queue - s.prequeue
        } else {
            s.queue
        };
        RoomView {
            queue,
            serving: s.serving,
            waiting: queue.saturating_sub(s.serving),
            active: self.live(),
            reserved: s.reserved(),
            opened: s.opened && !unwritten,
            prequeue: s.prequeue,
            observed_rate: s.observed_rate(),
            pace: s.pace(),
            admitted_total: s.admitted_total,
            abandoned_total: s.abandoned_total,
            floor: s.floor,
        }
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn lottery_key_id(&self) -> Option<String> {
        self.lottery_kid.get()
    }

    fn set_lottery_key_id(&self, kid: &str) {
        self.lottery_kid.set_once(kid);
    }
}

/// All rooms of one node, their snapshot file and the marks beside it.
pub struct MemoryStore {
    rooms: DashMap<String, Arc<MemoryRoom>>,
    snapshot: Option<PathBuf>,
    /// Wakes the thread that writes numbers ahead (with a snapshot file).
    wake: Option<Arc<Wake>>,
    /// See [`Lost`].
    lost: Lost,
    /// True once the last snapshot is written: no more marks (their
    /// absence tells the next start that this one stopped cleanly). Held
    /// while the marks are written, so none land after they are removed.
    closed: Mutex<bool>,
    /// Counts marks that could not be written, once the metrics are known.
    marks_errors: std::sync::OnceLock<prometheus::IntCounter>,
    /// The snapshot's lock (see `hold_snapshot`), held until the store
    /// is closed or dropped.
    held: Mutex<Option<std::fs::File>>,
    /// The marks file this start found (a crashed run's), as it was: put
    /// back by [`MemoryStore::abandon`].
    found_marks: Option<Vec<u8>>,
}

/// Takes the snapshot's lock (`SNAPSHOT.lock`, beside it): a second varco
/// started on the same snapshot (a copied config, a manual run beside the
/// service) would number from the same counters, and hand one ticket
/// number to two people. Released by the system when the process ends,
/// however it ends.
fn hold_snapshot(snapshot: &std::path::Path) -> Result<std::fs::File, String> {
    let mut name = snapshot.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            format!(
                "store.snapshot: cannot open its lock {}: {e}",
                path.display()
            )
        })?;
    // A varco still on its way out (a supervisor that starts the next
    // before the last has quite ended) gets a moment to let go.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "store.snapshot: {} is in use by another varco (it holds {}): two would hand out the same ticket numbers",
                    snapshot.display(),
                    path.display()
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!(
                    "store.snapshot: cannot lock {}: {e}",
                    path.display()
                ))
            }
        }
    }
}

/// The crashes whose lost sessions may still be taken back: for each,
/// (sessions begun from then on were lost with it, the start that found
/// them lost), unix ms. Kept in the snapshot and the marks, so a second
/// crash (a crash loop on a click day) does not refuse those the first
/// one lost: each crash its own window, not one from the first to the
/// last (a later run's own sessions, lapsed, are not taken back).
type Lost = Arc<[(u64, u64)]>;

/// How long a crash's window is kept: a pass lives at most twice its
/// session's idle time, and the window itself closes one idle time after
/// its restart; a day covers any idle time a portal asks for.
const LOST_KEPT_MS: u64 = 86_400_000;

/// At most this many crashes' windows are kept, the latest.
const LOST_KEPT: usize = 32;

/// What `version` a snapshot this varco writes carries.
const SNAPSHOT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    saved_ms: u64,
    /// See [`Lost`].
    #[serde(default)]
    lost: Vec<(u64, u64)>,
    rooms: HashMap<String, RoomSnapshot>,
}

#[derive(Serialize, Deserialize)]
struct RoomSnapshot {
    state: AdmissionState,
    #[serde(default)]
    lottery_kid: Option<String>,
    /// (session id as hex, expiry ms)
    sessions: Vec<(String, u64)>,
    /// Sessions the portal ended (session id as hex, forget at ms): without
    /// them a restart would let a kept copy of a released pass come back
    /// through a login callback.
    #[serde(default)]
    ended: Vec<(String, u64)>,
    /// See [`MemoryRoom::idle_ms`]; 0 in a snapshot from before it was
    /// kept (sessions are then restored in full).
    #[serde(default)]
    idle_ms: u64,
}

/// When a session saved to end at `exp_ms` ends after `down_ms` without
/// varco: as much later, as no request could renew it meanwhile, but not
/// past the last moment its pass can be valid. A pass is signed for two
/// idle times, only as its session is made or renewed, and a session is
/// last renewed before it ends: so no pass outlives `exp_ms` by more than
/// two of the longest idle time (`idle_ms`, whatever reloads did to it),
/// nor a clock skew's leeway more. Past that no request can renew the
/// session, and left to its full idle time it would hold a slot nobody
/// can use: after an overnight stop, a full room's every slot for one
/// idle time. `idle_ms` 0: not known, in full.
fn restored_expiry(exp_ms: u64, down_ms: u64, idle_ms: u64) -> u64 {
    let full = exp_ms + down_ms;
    if idle_ms == 0 {
        return full;
    }
    full.min(exp_ms + 2 * idle_ms + crate::room::token::LEEWAY_MS)
}

impl MemoryStore {
    /// Restores from `snapshot` when the file exists; a missing file is a
    /// first start, an unreadable one is an error (refusing to start beats
    /// silently throwing everyone out of line). Marks left by a crash
    /// raise the counters past every number handed out before it.
    ///
    /// Nobody could come in, nor make a request, while varco was down: the
    /// time between the snapshot and `now_ms` counts against nobody's claim
    /// window and nobody's idle time. A person called just before a crash
    /// keeps the rest of their window, an admitted person their session
    /// while their pass can still renew it.
    pub fn open(snapshot: Option<PathBuf>, now_ms: u64) -> Result<Arc<Self>, String> {
        // Without its folder every snapshot and mark would fail: the queue
        // would run undurable and a restart would lose every place. Checked
        // here, not by `check-config`, which may run on another machine
        // (and systemd's StateDirectory= makes the folder just before).
        if let Some(problem) = snapshot
            .as_deref()
            .and_then(|s| crate::config::validate::folder_missing(s, "the snapshot"))
        {
            return Err(format!("store.snapshot: {problem}"));
        }
        let held = snapshot.as_deref().map(hold_snapshot).transpose()?;
        let snap = match &snapshot {
            Some(path) if super::present(path, "snapshot")? => {
                Some(read_json::<Snapshot>(path, "snapshot")?)
            }
            _ => None,
        };
        if let (Some(snap), Some(path)) = (&snap, &snapshot) {
            if snap.version != SNAPSHOT_VERSION {
                return Err(format!(
                    "store.snapshot: {} is version {}; this varco reads version {SNAPSHOT_VERSION}",
                    path.display(),
                    snap.version
                ));
            }
            for (name, r) in &snap.rooms {
                // A session dropped for a bad id was somebody let in, sent
                // back to the line without a word.
                let bad_id = r
                    .sessions
                    .iter()
                    .chain(&r.ended)
                    .map(|(sid, _)| sid)
                    .find(|sid| u128::from_str_radix(sid, 16).is_err());
                let checked = match bad_id {
                    Some(sid) => Err(format!("session id {sid:?} is not hex")),
                    None => r.state.check(),
                };
                checked.map_err(|e| {
                    format!(
                        "store.snapshot: {}: room \"{name}\": {e}; the file is left as it is",
                        path.display()
                    )
                })?;
            }
        }
        let marks_path = snapshot.as_deref().map(ahead::path_for);
        let crashed = match &marks_path {
            Some(p) => ahead::read(p)?,
            None => None,
        };
        let found_marks = crashed.as_ref().map(|left| left.bytes.clone());
        let mut lost: Vec<(u64, u64)> = snap
            .iter()
            .flat_map(|s| s.lost.iter().copied())
            .chain(crashed.iter().flat_map(|left| left.lost.iter().copied()))
            .collect();
        if let Some(left) = &crashed {
            let saved_ms = snap.as_ref().map_or(0, |s| s.saved_ms);
            lost.push((saved_ms.max(left.since_ms), now_ms));
        }
        lost.retain(|&(_, restarted)| restarted + LOST_KEPT_MS > now_ms);
        lost.sort_unstable();
        lost.dedup();
        let lost: Lost = lost[lost.len().saturating_sub(LOST_KEPT)..].into();
        let store = Arc::new(MemoryStore {
            rooms: DashMap::new(),
            wake: snapshot.is_some().then(|| Arc::new(Wake::default())),
            snapshot,
            lost,
            closed: Mutex::new(false),
            marks_errors: std::sync::OnceLock::new(),
            held: Mutex::new(held),
            found_marks,
        });
        if let Some(snap) = snap {
            let down = now_ms.saturating_sub(snap.saved_ms);
            for (name, mut r) in snap.rooms {
                for b in r.state.batches.iter_mut() {
                    b.at_ms += down;
                }
                // The line's pace and the observed rate go on from where
                // they were: measured across the stop, they read as a line
                // that stood still, and the page told a wait too long
                // for a minute.
                for (at, _) in r.state.history.iter_mut().chain(r.state.pace.iter_mut()) {
                    *at += down;
                }
                if let Some(at) = r.state.pace_full.as_mut() {
                    *at += down;
                }
                if r.state.generation == 0 {
                    // A snapshot from before generations were kept: the
                    // one the crashed run gave it, if its marks say, so
                    // that run's tickets keep their places.
                    r.state.generation = crashed
                        .as_ref()
                        .and_then(|left| left.rooms.get(&name))
                        .map(|m| m.generation)
                        .filter(|g| *g != 0)
                        .unwrap_or_else(new_generation);
                }
                let room = store.new_room(r.state);
                if let Some(kid) = &r.lottery_kid {
                    room.lottery_kid.replace(kid);
                }
                room.saw_idle(r.idle_ms);
                // Ids checked above.
                for (sid, exp) in r.sessions {
                    if let Ok(sid) = u128::from_str_radix(&sid, 16) {
                        let exp = restored_expiry(exp, down, r.idle_ms);
                        room.sessions.insert(sid, AtomicU64::new(exp));
                    }
                }
                for (sid, until) in r.ended {
                    if let Ok(sid) = u128::from_str_radix(&sid, 16) {
                        room.ended.insert(sid, until + down);
                    }
                }
                store.rooms.insert(name, Arc::new(room));
            }
            if let Some(path) = &store.snapshot {
                tracing::info!(path = %path.display(), rooms = store.rooms.len(), down_ms = down, "restored the queue from the snapshot");
            }
        }
        if let Some(left) = crashed {
            for (name, marks) in left.rooms {
                store.recover(&name, &marks, now_ms);
            }
        }
        if let (Some(wake), Some(path)) = (&store.wake, marks_path) {
            // Written now, before anyone is served: a run's marks are what
            // tells the next start it crashed. Left to the first new number,
            // a crash before one (a line called, passes claimed, nobody new)
            // would pass for a clean stop, and every pass claimed since the
            // last snapshot be refused.
            // Failing, it is tried again by the writer (woken below), and
            // serving goes on, as at any later failure.
            let first = write_marks(&store, &path, now_ms, Duration::from_millis(5));
            if let Err(e) = &first {
                tracing::error!(path = %path.display(), error = %e, "cannot write the ticket numbers ahead at the start; a crash now could pass for a clean stop");
            }
            let (weak, writer_wake) = (Arc::downgrade(&store), wake.clone());
            std::thread::Builder::new()
                .name("varco-marks".into())
                .spawn(move || write_ahead(weak, writer_wake, path, now_ms))
                .map_err(|e| {
                    store.abandon();
                    format!("store.snapshot: cannot start the marks writer: {e}")
                })?;
            if first.is_err() {
                wake.wake();
            }
        }
        Ok(store)
    }

    /// Where to count marks that could not be written.
    pub fn count_marks_errors(&self, counter: prometheus::IntCounter) {
        let _ = self.marks_errors.set(counter);
    }

    fn new_room(&self, state: AdmissionState) -> MemoryRoom {
        let ahead = self.wake.as_ref().map(|w| {
            let a = Ahead::new(w.clone());
            a.restored(&state);
            a
        });
        MemoryRoom::new(state, ahead, self.lost.clone())
    }

    /// Raises a room's counters to the marks a crash left.
    fn recover(&self, name: &str, marks: &Marks, now_ms: u64) {
        let (from, to) = match self.rooms.get(name) {
            Some(room) => {
                let mut st = room.lock();
                let before = (st.queue, st.prequeue);
                marks.apply(&mut st, false);
                if let Some(ahead) = &room.ahead {
                    ahead.restored(&st);
                }
                (before, (st.queue, st.prequeue))
            }
            None => {
                let mut st = AdmissionState {
                    // As a fresh room's: one admission's worth.
                    tokens: 1.0,
                    refilled_ms: now_ms,
                    // Unless the marks keep the one it had.
                    generation: new_generation(),
                    ..AdmissionState::default()
                };
                marks.apply(&mut st, true);
                let to = (st.queue, st.prequeue);
                self.rooms
                    .insert(name.to_string(), Arc::new(self.new_room(st)));
                ((0, 0), to)
            }
        };
        tracing::warn!(
            room = name,
            queue_from = from.0,
            queue_to = to.0,
            prequeue_from = from.1,
            prequeue_to = to.1,
            "the last run stopped without its last snapshot (a crash?): numbering resumes past every number it handed out; those it wrote ahead and never handed out belong to nobody"
        );
    }

    /// The room's store if it has one (a room removed by a reload keeps
    /// it), without making one.
    pub fn existing(&self, name: &str) -> Option<Arc<MemoryRoom>> {
        self.rooms.get(name).map(|r| r.clone())
    }

    /// The rooms (and lanes, `room#lane`) held here that `kept` does not
    /// name, with what each holds at `now_ms`: after a start, those the
    /// snapshot restored that the config no longer has. Their sessions
    /// ended by then are let go first (nothing ticks them): restored,
    /// they still count until a tick.
    pub fn others(
        &self,
        kept: &std::collections::HashSet<String>,
        now_ms: u64,
    ) -> Vec<(String, RoomView)> {
        let mut others: Vec<(String, RoomView)> = self
            .rooms
            .iter()
            .filter(|r| !kept.contains(r.key()))
            .map(|r| {
                r.value().purge(now_ms);
                (r.key().clone(), r.value().view())
            })
            .collect();
        others.sort_by(|a, b| a.0.cmp(&b.0));
        others
    }

    /// Drops room `name`'s state: it is in no snapshot from now on.
    pub fn forget(&self, name: &str) {
        self.rooms.remove(name);
    }

    /// The room's store, created fresh unless a snapshot restored it.
    pub fn room(&self, name: &str, limits: &Limits, now_ms: u64) -> Arc<MemoryRoom> {
        self.rooms
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(self.new_room(AdmissionState::new(limits, now_ms))))
            .clone()
    }

    /// Writes every room's counters and sessions: to a temporary file,
    /// synced, then renamed over the old one, so a crash mid-write leaves
    /// the previous snapshot intact.
    pub fn save(&self, now_ms: u64) -> std::io::Result<()> {
        let Some(path) = &self.snapshot else {
            return Ok(());
        };
        let rooms = self
            .rooms
            .iter()
            .map(|r| {
                let room = r.value();
                // The sessions are read under the counters' lock, as a
                // claim writes both: read after, a claim between the two
                // was a session whose number was not marked claimed, and
                // after a crash a copy of its ticket claimed it again.
                let st = room.lock();
                let state = st.clone();
                let live: Vec<(u128, u64)> = room
                    .sessions
                    .iter()
                    .map(|s| (*s.key(), s.value().load(Ordering::Relaxed)))
                    .collect();
                drop(st);
                let sessions = live
                    .into_iter()
                    .map(|(sid, exp)| (format!("{sid:032x}"), exp))
                    .collect();
                let ended = room
                    .ended
                    .iter()
                    .map(|e| (format!("{:032x}", e.key()), *e.value()))
                    .collect();
                let lottery_kid = room.lottery_key_id();
                (
                    r.key().clone(),
                    RoomSnapshot {
                        state,
                        lottery_kid,
                        sessions,
                        ended,
                        idle_ms: room.idle_ms.load(Ordering::Relaxed),
                    },
                )
            })
            .collect();
        let snap = Snapshot {
            version: SNAPSHOT_VERSION,
            saved_ms: now_ms,
            lost: self.lost.to_vec(),
            rooms,
        };
        let bytes = serde_json::to_vec(&snap).map_err(std::io::Error::other)?;
        write_atomically(path, &bytes)
    }

    /// The last snapshot, at a clean stop: then the marks go, so the next
    /// start knows nothing was lost. Kept if the snapshot fails.
    pub fn close(&self, now_ms: u64) -> std::io::Result<()> {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        *closed = true;
        for room in self.rooms.iter() {
            if let Some(ahead) = &room.ahead {
                ahead.freeze(&room.lock());
            }
        }
        self.save(now_ms)?;
        if let Some(path) = &self.snapshot {
            super::remove_if_present(&ahead::path_for(path))?;
        }
        // Nothing more is written: the next varco may take it.
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }
}

impl MemoryStore {
    /// A start refused after the store opened (a config that does not
    /// fit the saved queue, an admission log that cannot be opened): it
    /// served nobody, and leaves what it found. Its own marks would tell
    /// the next start of a crash (burning numbers ahead for nobody, in a
    /// pre-queue blanks in the draw) and, over a crashed run's, move that
    /// crash's window to this start: passes begun in it refused. So the
    /// marks go, or the crashed run's are put back. No snapshot is
    /// written: the one on disk is what was found.
    pub fn abandon(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        *closed = true;
        if let Some(path) = &self.snapshot {
            let marks = ahead::path_for(path);
            let undone = match &self.found_marks {
                Some(bytes) => super::write_atomically(&marks, bytes),
                None => super::remove_if_present(&marks),
            };
            if let Err(e) = undone {
                tracing::error!(path = %marks.display(), error = %e, "cannot put back the marks this refused start found; the next start may take it for a crash");
            }
        }
        drop(closed);
        self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The marks writer: wakes when a room runs low, writes every room's marks
/// in one file, and lets the waiting hand out their numbers. Ends with the
/// store.
fn write_ahead(store: Weak<MemoryStore>, wake: Arc<Wake>, path: PathBuf, since_ms: u64) {
    /// Should the writer ever panic, numbering goes on without marks
    /// rather than waiting for a writer that is gone.
    struct Gone(Weak<MemoryStore>, Arc<Wake>);
    impl Drop for Gone {
        fn drop(&mut self) {
            self.1.set_gone();
            if let Some(store) = self.0.upgrade() {
                tracing::error!(
                    "the marks writer stopped; ticket numbers are no longer written ahead"
                );
                for room in store.rooms.iter() {
                    if let Some(ahead) = &room.ahead {
                        ahead.release();
                    }
                }
            }
        }
    }
    let _gone = Gone(store.clone(), wake.clone());
    // A guess until the first write is timed.
    let mut took = Duration::from_millis(5);
    loop {
        let woken = wake.wait(Duration::from_secs(1));
        let Some(store) = store.upgrade() else {
            return;
        };
        if !woken {
            continue;
        }
        let started = Instant::now();
        if let Err(e) = write_marks(&store, &path, since_ms, took) {
            // Serving goes on: a stalled queue on a click day is worse
            // than a crash that might come.
            tracing::error!(path = %path.display(), error = %e, "cannot write the ticket numbers ahead; a crash now could hand a place to two people");
            if let Some(c) = store.marks_errors.get() {
                c.inc();
            }
        }
        took = started.elapsed();
    }
}

/// Writes every room's marks once (`took`: how long the last write took,
/// for the lead), and tells the rooms what is covered now. Nothing once
/// the store is closed: the last snapshot holds every number handed out
/// (see `close`).
fn write_marks(
    store: &MemoryStore,
    path: &std::path::Path,
    since_ms: u64,
    took: Duration,
) -> std::io::Result<()> {
    let rooms: Vec<(String, Arc<MemoryRoom>)> = store
        .rooms
        .iter()
        .map(|r| (r.key().clone(), r.value().clone()))
        .collect();
    let now = Instant::now();
    let plans: Vec<_> = rooms
        .into_iter()
        .filter_map(|(name, room)| {
            let plan = room.ahead.as_ref()?.plan(&room.lock(), now, took);
            Some((name, room, plan))
        })
        .collect();
    let closed = store.closed.lock().unwrap_or_else(|e| e.into_inner());
    if *closed {
        return Ok(());
    }
    let marks = plans.iter().map(|(n, _, (m, _))| (n.clone(), *m)).collect();
    let written = ahead::write(path, since_ms, &store.lost, marks);
    drop(closed);
    // Told even when the write failed: numbering goes on rather than
    // wait for a disk that may not come back (the caller says so).
    for (_, room, (marks, low_water)) in &plans {
        if let Some(ahead) = &room.ahead {
            ahead.now_written(marks, *low_water);
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::admission::{Claim, Issued, Mode};

    fn limits(opens_at_ms: Option<u64>) -> Limits {
        Limits {
            per_minute: None,
            max_active: Some(1),
            claim_window_ms: 60_000,
            tick_ms: 1_000,
            opens_at_ms,
            mode: Mode::QueueAll,
            ticket_ttl_ms: 86_400_000,
            session_idle_ms: 300_000,
        }
    }

    fn limits_unbounded() -> Limits {
        Limits {
            max_active: None,
            ..limits(None)
        }
    }

    fn session(sid: u128) -> NewSession {
        NewSession {
            sid,
            expires_ms: 11_500 + 60_000,
        }
    }

    fn folder(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("varco-marks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("state.json")
    }

    fn marks_on_disk(snapshot: &std::path::Path) -> Marks {
        let left = ahead::read(&ahead::path_for(snapshot))
            .unwrap()
            .expect("marks");
        left.rooms["r"]
    }

    async fn number(room: &MemoryRoom, l: Limits, now: u64) -> u64 {
        match room.issue(l, now).await.unwrap() {
            Issued::Number(n) | Issued::PreQueue(n) => n,
            other => panic!("{other:?}"),
        }
    }

    /// A start refused after the store opened leaves what it found: after
    /// a clean stop, no crash for the next start and no numbers burnt;
    /// after a crash, that crash and its window.
    #[tokio::test]
    async fn a_refused_start_leaves_the_marks_it_found() {
        let snap = folder("refused");
        let l = limits(None);
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..3 {
            number(&room, l, 0).await;
        }
        store.close(1_000).unwrap();
        drop((room, store));
        MemoryStore::open(Some(snap.clone()), 2_000)
            .unwrap()
            .abandon();
        let store = MemoryStore::open(Some(snap.clone()), 3_000).unwrap();
        assert!(store.lost.is_empty(), "no crash to see");
        let room = store.room("r", &l, 3_000);
        assert_eq!(number(&room, l, 3_000).await, 4, "no number burnt");
        // A crash, then a refused start: the next start sees the crash,
        // from when the crashed run began.
        drop((room, store));
        MemoryStore::open(Some(snap.clone()), 4_000)
            .unwrap()
            .abandon();
        let store = MemoryStore::open(Some(snap.clone()), 5_000).unwrap();
        assert_eq!(store.lost[..], [(3_000, 5_000)]);
    }

    /// A crash loop: a pass lost in the first crash is still taken back
    /// after the second, within one idle time of the first restart; one
    /// the second run began and lost before its own snapshot (lapsed or
    /// ended, not in it) is not.
    #[tokio::test]
    async fn a_second_crash_keeps_the_first_ones_window() {
        let l = limits(None);
        let snap = folder("twice");
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        number(&room, l, 0).await;
        store.save(10_000).unwrap();
        room.tick(l, 11_000).await.unwrap();
        let claimed = room.claim(1, room.generation(), l, session(7), 11_500);
        assert_eq!(claimed.await.unwrap(), Claim::Admitted);
        drop((room, store));
        // The second run: a snapshot, then a crash before anybody asks.
        let store = MemoryStore::open(Some(snap.clone()), 15_000).unwrap();
        store.room("r", &l, 15_000);
        store.save(19_000).unwrap();
        drop(store);
        let store = MemoryStore::open(Some(snap), 20_000).unwrap();
        let room = store.room("r", &l, 20_000);
        room.tick(l, 20_000).await.unwrap();
        assert_eq!(store.lost[..], [(10_000, 15_000), (19_000, 20_000)]);
        assert_eq!(
            room.adopt(7, 1, 11_500, 21_000, 60_000, &l),
            Adoption::Taken
        );
        assert_eq!(
            room.adopt(8, 0, 15_500, 21_000, 60_000, &limits_unbounded()),
            Adoption::Refused
        );
    }

    /// After the clock stepped back ten minutes, a session idles out one
    /// idle time from the step, not one idle time and the step.
    #[test]
    fn a_clock_stepped_back_holds_no_session_longer() {
        let room = MemoryRoom::new(AdmissionState::new(&limits(None), 0), None, Lost::default());
        room.hold(7, 660_000, 600_000);
        assert_eq!(room.purge(1_000), 1, "alive after the step");
        assert_eq!(room.purge(62_000), 0, "gone one idle time after it");
    }

    #[tokio::test]
    async fn no_number_is_handed_out_before_a_mark_covers_it_on_disk() {
        let snap = folder("cover");
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &limits(None), 0);
        for expect in 1..=500 {
            let n = number(&room, limits(None), 0).await;
            assert_eq!(n, expect);
            let m = marks_on_disk(&snap);
            assert!(m.queue >= n, "number {n} handed out with {m:?} on disk");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_arrivals_are_all_covered_and_a_crash_reissues_none() {
        let snap = folder("concurrent");
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &limits(None), 0);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let (room, snap) = (room.clone(), snap.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for _ in 0..2_000 {
                        let n = number(&room, limits(None), 0).await;
                        if n % 97 == 0 {
                            let m = marks_on_disk(&snap);
                            assert!(m.queue >= n, "{n} handed out with {m:?} on disk");
                        }
                        got.push(n);
                    }
                    got
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 8_000, "every number once");
        let max = *all.last().unwrap();
        assert!(marks_on_disk(&snap).queue >= max);
        drop((room, store));
        let store = MemoryStore::open(Some(snap), 1).unwrap();
        let room = store.room("r", &limits(None), 1);
        assert!(number(&room, limits(None), 1).await > max);
    }

    /// A disk that never answers: the first arrival waits 2 s (a paused
    /// clock here), then numbering goes on without marks, nobody else
    /// waiting, until a write lands.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_disk_delays_numbering_once_then_not_at_all() {
        // No writer listens to this wake: every write is "stuck".
        let room = MemoryRoom::new(
            AdmissionState::new(&limits(None), 0),
            Some(Ahead::new(Arc::new(Wake::default()))),
            Lost::default(),
        );
        let t0 = tokio::time::Instant::now();
        assert_eq!(number(&room, limits(None), 0).await, 1);
        assert_eq!(t0.elapsed(), WRITE_AHEAD_WAIT, "the first waited");
        let t1 = tokio::time::Instant::now();
        for expect in 2..=10 {
            assert_eq!(number(&room, limits(None), 0).await, expect);
        }
        assert_eq!(t1.elapsed(), Duration::ZERO, "the others did not");
        // A write lands: the marks cover again, and bind again.
        let ahead = room.ahead.as_ref().unwrap();
        let (marks, low) = ahead.plan(&room.lock(), Instant::now(), Duration::from_millis(1));
        ahead.now_written(&marks, low);
        assert!(ahead.covers_next(&room.lock()));
        let past = Marks { queue: 10, ..marks };
        ahead.now_written(&past, 0);
        assert!(!ahead.covers_next(&room.lock()), "number 11 is not covered");
    }

    /// Between the opening and its write, the room shows itself not yet
    /// open (no drawn places, no seed), then open once it is on disk.
    #[tokio::test(start_paused = true)]
    async fn an_opening_shows_only_once_it_is_on_disk() {
        let l = limits(Some(10_000));
        let room = Arc::new(MemoryRoom::new(
            AdmissionState::new(&l, 0),
            Some(Ahead::new(Arc::new(Wake::default()))),
            Lost::default(),
        ));
        // The pre-queue's numbers, covered by a write (by hand: no writer).
        let ahead = room.ahead.as_ref().unwrap();
        let (marks, low) = ahead.plan(&room.lock(), Instant::now(), Duration::from_millis(1));
        ahead.now_written(&marks, low);
        for expect in 1..=3 {
            assert_eq!(room.issue(l, 0).await.unwrap(), Issued::PreQueue(expect));
        }
        // The opening: the tick opens the room in memory, then waits for the
        // write that (here) does not come.
        let ticking = tokio::spawn({
            let room = room.clone();
            async move { room.tick(l, 10_000).await }
        });
        tokio::task::yield_now().await;
        assert!(room.lock().opened, "opened in memory");
        let v = room.view();
        assert!(!v.opened, "not shown before it is on disk");
        assert_eq!((v.queue, v.prequeue), (0, 3));
        let (marks, low) = ahead.plan(&room.lock(), Instant::now(), Duration::from_millis(1));
        assert_eq!(marks.opened_with, Some(3));
        ahead.now_written(&marks, low);
        ticking.await.unwrap().unwrap();
        let v = room.view();
        assert!(v.opened, "shown once on disk");
        assert_eq!((v.queue, v.prequeue), (3, 3));
    }

    #[tokio::test]
    async fn after_a_crash_numbering_resumes_past_every_number_handed_out() {
        let snap = folder("crash");
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &limits(None), 0);
        let generation = room.generation();
        for _ in 0..10 {
            number(&room, limits(None), 0).await;
        }
        store.save(0).unwrap();
        for _ in 0..10 {
            number(&room, limits(None), 0).await;
        }
        // A crash: no close, so no last snapshot and the marks stay.
        drop((room, store));
        let store = MemoryStore::open(Some(snap.clone()), 5_000).unwrap();
        let room = store.room("r", &limits(None), 5_000);
        let n = number(&room, limits(None), 5_000).await;
        assert!(n > 20, "number {n} was handed out before the crash");
        assert_eq!(room.generation(), generation, "the same run of the queue");
        // A clean stop after it: numbering goes on exactly.
        store.close(6_000).unwrap();
        drop((room, store));
        assert!(
            !ahead::path_for(&snap).exists(),
            "a clean stop removes the marks"
        );
        let store = MemoryStore::open(Some(snap), 7_000).unwrap();
        let room = store.room("r", &limits(None), 7_000);
        assert_eq!(number(&room, limits(None), 7_000).await, n + 1);
        assert_eq!(room.generation(), generation);
    }

    #[tokio::test]
    async fn a_restart_keeps_a_session_while_its_pass_can_renew_it() {
        let snap = folder("idle");
        let l = Limits {
            mode: Mode::Queue,
            ..limits(None)
        };
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        let session = NewSession {
            sid: 7,
            expires_ms: 600_000,
        };
        assert!(room.admit_directly(l, session, 0).await.unwrap().is_some());
        // A reload shortened the idle time: the pass signed before it
        // still lives twenty minutes.
        assert_eq!(room.touch(7, 1_000, 60_000), Liveness::Alive);
        store.close(1_000).unwrap();
        drop((room, store));
        // Down 200 s: past two of the new idle times, within two of the
        // old.
        let store = MemoryStore::open(Some(snap.clone()), 201_000).unwrap();
        let room = store.room("r", &l, 201_000);
        assert_eq!(room.peek_local(7, 201_000), Liveness::Alive);
        store.close(201_000).unwrap();
        drop((room, store));
        // Down three hours, with no request in the run between: the
        // longest idle time was kept, and no pass lives that long.
        let later = 201_000 + 3 * 3_600_000;
        let store = MemoryStore::open(Some(snap), later).unwrap();
        let room = store.room("r", &l, later);
        assert_eq!(room.peek_local(7, later), Liveness::Dead);
    }

    #[tokio::test]
    async fn a_crash_before_the_opening_keeps_the_prequeue_numbers_apart() {
        let snap = folder("pre");
        let l = limits(Some(10_000));
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        let generation = room.generation();
        for expect in 1..=5 {
            assert_eq!(room.issue(l, 0).await.unwrap(), Issued::PreQueue(expect));
        }
        drop((room, store));
        let store = MemoryStore::open(Some(snap), 1_000).unwrap();
        let room = store.room("r", &l, 1_000);
        // No snapshot held the room: the marks keep its tickets good.
        assert_eq!(room.generation(), generation);
        match room.issue(l, 1_000).await.unwrap() {
            Issued::PreQueue(p) => assert!(p > 5, "pre-queue number {p} reissued"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_opening_after_the_last_snapshot_draws_the_same_lottery_after_a_crash() {
        let snap = folder("open");
        let l = limits(Some(10_000));
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..7 {
            room.issue(l, 0).await.unwrap();
        }
        store.save(0).unwrap();
        // The opening, then one arrival after it, then a crash.
        room.tick(l, 10_000).await.unwrap();
        let after = number(&room, l, 10_500).await;
        assert_eq!(after, 8, "the pre-queue takes places 1..=7");
        drop((room, store));
        let store = MemoryStore::open(Some(snap), 20_000).unwrap();
        let room = store.room("r", &l, 20_000);
        let v = room.view();
        assert!(v.opened, "the opening survives");
        assert_eq!(
            v.prequeue, 7,
            "the lottery is drawn over the same pre-queue"
        );
        assert!(number(&room, l, 20_000).await > after);
    }

    /// Each start from nothing is a new run of the queue, whose tickets
    /// hold no place in another; a snapshot keeps its run, and one from
    /// before runs were kept gets one (its tickets, of no run, hold theirs).
    #[tokio::test]
    async fn a_queue_started_from_nothing_is_a_new_run() {
        let runs: Vec<u64> = (0..2)
            .map(|_| {
                let store = MemoryStore::open(None, 0).unwrap();
                store.room("r", &limits(None), 0).generation()
            })
            .collect();
        assert!(
            runs[0] != 0 && runs[1] != 0 && runs[0] != runs[1],
            "{runs:?}"
        );
        let store = MemoryStore::open(None, 0).unwrap();
        let room = store.room("r", &limits(None), 0);
        assert!(room.holds_place(room.generation()));
        assert!(room.holds_place(0), "a ticket of no run");
        assert!(!room.holds_place(runs[0]), "a ticket of another run");

        let snap = folder("runs");
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let generation = store.room("r", &limits(None), 0).generation();
        store.close(0).unwrap();
        let mut old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&snap).unwrap()).unwrap();
        assert_eq!(old["rooms"]["r"]["state"]["generation"], generation);
        old["rooms"]["r"]["state"]
            .as_object_mut()
            .unwrap()
            .remove("generation");
        std::fs::write(&snap, old.to_string()).unwrap();
        let legacy = std::fs::read(&snap).unwrap();
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let given = store.room("r", &limits(None), 0).generation();
        assert!(given != 0 && given != generation, "{given}");
        store.close(0).unwrap();
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        assert_eq!(store.room("r", &limits(None), 0).generation(), given);
        drop(store);

        // The first run after an upgrade crashes before any snapshot of
        // its own: its marks keep the generation its tickets carry.
        std::fs::write(&snap, &legacy).unwrap();
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &limits(None), 0);
        let given = room.generation();
        number(&room, limits(None), 0).await;
        drop((room, store));
        assert_eq!(marks_on_disk(&snap).generation, given);
        let store = MemoryStore::open(Some(snap), 1_000).unwrap();
        assert_eq!(store.room("r", &limits(None), 1_000).generation(), given);
    }

    /// A second store on a snapshot another holds (a second varco on the
    /// same file) is refused; once the first ends, it opens.
    #[tokio::test]
    async fn a_snapshot_in_use_by_another_varco_is_refused() {
        let snap = folder("in-use");
        let first = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let err = match MemoryStore::open(Some(snap.clone()), 0) {
            Ok(_) => panic!("two stores on one snapshot"),
            Err(e) => e,
        };
        assert!(err.contains("in use by another varco"), "{err}");
        drop(first);
        assert!(
            MemoryStore::open(Some(snap), 0).is_ok(),
            "free once it ends"
        );
    }

    /// A snapshot that parses but does not hang together (a hand edit, a
    /// flipped digit), or of another version, is refused with the file
    /// named and left as it is; so is a snapshot whose folder is missing.
    #[tokio::test]
    async fn a_snapshot_that_does_not_hang_together_is_refused_and_kept() {
        let snap = folder("inconsistent");
        let l = limits(None);
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..3 {
            room.issue(l, 0).await.unwrap();
        }
        store.save(0).unwrap();
        drop((room, store));
        let good: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&snap).unwrap()).unwrap();
        assert_eq!(good["rooms"]["r"]["state"]["queue"], 3);
        let refused = |edit: &dyn Fn(&mut serde_json::Value), expect: &str| {
            let mut bad = good.clone();
            edit(&mut bad);
            let text = bad.to_string();
            std::fs::write(&snap, &text).unwrap();
            let err = match MemoryStore::open(Some(snap.clone()), 1_000) {
                Ok(_) => panic!("opened {text}"),
                Err(e) => e,
            };
            assert!(
                err.starts_with("store.snapshot: ") && err.contains(expect),
                "{err}"
            );
            assert_eq!(std::fs::read_to_string(&snap).unwrap(), text, "file kept");
        };
        refused(
            &|v| v["rooms"]["r"]["state"]["serving"] = 5.into(),
            "serving (5) is past queue (3)",
        );
        refused(
            &|v| v["rooms"]["r"]["state"]["floor"] = 1.into(),
            "floor (1) is past serving (0)",
        );
        refused(
            &|v| {
                v["rooms"]["r"]["state"]["serving"] = 2.into();
                v["rooms"]["r"]["state"]["batches"] =
                    serde_json::json!([{"at_ms": 0, "from": 1, "to": 2, "claimed": 3}]);
            },
            "batch 1..=2 (claimed 3)",
        );
        refused(&|v| v["version"] = 2.into(), "is version 2");
        refused(
            &|v| v["rooms"]["r"]["sessions"] = serde_json::json!([["0g", 5]]),
            "room \"r\": session id \"0g\" is not hex",
        );
        refused(
            &|v| v["rooms"]["r"]["ended"] = serde_json::json!([["x1", 5]]),
            "session id \"x1\" is not hex",
        );
        std::fs::write(&snap, good.to_string()).unwrap();
        assert!(MemoryStore::open(Some(snap.clone()), 1_000).is_ok());

        let lost = snap.parent().unwrap().join("gone").join("state.json");
        let err = MemoryStore::open(Some(lost), 0).err().expect("no folder");
        assert!(err.contains("is not a directory"), "{err}");

        // A link to a snapshot on a volume not mounted is no first start,
        // nor is a link to one there: a save would replace the link.
        for target in [snap.clone(), snap.with_file_name("not-mounted.json")] {
            let link = snap.with_file_name("linked.json");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let err = MemoryStore::open(Some(link.clone()), 1_000)
                .err()
                .expect("a link is refused");
            assert!(
                err.starts_with("store.snapshot: the snapshot ") && err.contains("is a link to"),
                "{err}"
            );
            assert!(std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink());
        }
        let marks = ahead::path_for(&snap);
        let _ = std::fs::remove_file(&marks);
        std::os::unix::fs::symlink(snap.with_file_name("gone.marks"), &marks).unwrap();
        let err = MemoryStore::open(Some(snap.clone()), 1_000)
            .err()
            .expect("marks that are a link to nothing");
        assert!(
            err.contains("the marks file") && err.contains("not there"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn passes_begun_after_the_last_snapshot_are_taken_back_once() {
        let snap = folder("adopt");
        let l = limits(None);
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..2 {
            number(&room, l, 0).await;
        }
        store.save(10_000).unwrap();
        // Number 1 is called and admitted after the snapshot; then a crash.
        room.tick(l, 11_000).await.unwrap();
        // A ticket of another run holds no place, and uses none.
        let other = room.generation() ^ 1;
        assert_eq!(
            room.claim(1, other, l, session(6), 11_500).await.unwrap(),
            Claim::OtherRun
        );
        assert_eq!(
            room.claim(1, room.generation(), l, session(7), 11_500)
                .await
                .unwrap(),
            Claim::Admitted
        );
        drop((room, store));

        let store = MemoryStore::open(Some(snap.clone()), 15_000).unwrap();
        let room = store.room("r", &l, 15_000);
        // The serving counter went back: number 1 is called again.
        room.tick(l, 15_000).await.unwrap();
        let idle = 60_000;
        assert!(
            room.adopt(1, 1, 2_000, 15_000, idle, &l) == Adoption::Refused,
            "begun before the snapshot: it would be in it"
        );
        assert!(
            room.adopt(7, 1, 11_500, 15_000, idle, &l) == Adoption::Taken,
            "begun after the snapshot: back, in its own number's slot"
        );
        assert_eq!(room.touch(7, 16_000, idle), Liveness::Alive);
        assert_eq!(room.view().reserved, 0, "its number's slot is taken");
        assert_eq!(
            room.adopt(7, 1, 11_500, 16_000, idle, &l),
            Adoption::Alive,
            "taken back already (a request of the same pass at once): alive, not taken again"
        );
        assert_eq!(room.view().active, 1, "counted once");
        assert!(
            room.adopt(5, 0, 12_000, 16_000, idle, &l) == Adoption::Refused,
            "another only into a free slot (max_active 1)"
        );
        assert_eq!(
            room.adopt(9, 2, 12_000, 16_000, idle, &l),
            Adoption::Waits,
            "number 2, not called again yet, is a place in line again"
        );
        assert!(
            room.adopt(3, 0, 12_000, 15_000 + idle, idle, &limits_unbounded()) == Adoption::Refused,
            "only within one idle time of the start"
        );
        assert!(
            room.adopt(11, 0, 15_500, 16_000, idle, &limits_unbounded()) == Adoption::Refused,
            "begun since the restart: this run's own session, lapsed, is not one lost"
        );
        // A clean start knows of no crash: nothing is taken back.
        store.close(20_000).unwrap();
        drop((room, store));
        let store = MemoryStore::open(Some(snap), 21_000).unwrap();
        let room = store.room("r", &limits(None), 21_000);
        assert_eq!(
            room.adopt(4, 0, 20_500, 21_000, idle, &l),
            Adoption::Refused
        );
    }

    #[tokio::test]
    async fn a_pass_taken_back_before_its_number_is_called_leaves_no_claim_to_it() {
        let snap = folder("adopt_ahead");
        let l = limits_unbounded();
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..3 {
            number(&room, l, 0).await;
        }
        store.save(10_000).unwrap();
        // Called and claimed after the snapshot; then a crash.
        room.tick(l, 11_000).await.unwrap();
        for n in 1..=3 {
            let c = room.claim(n, room.generation(), l, session(n as u128), 11_500);
            assert_eq!(c.await.unwrap(), Claim::Admitted);
        }
        drop((room, store));

        let store = MemoryStore::open(Some(snap), 15_000).unwrap();
        let room = store.room("r", &l, 15_000);
        // Taken back into a room with room before the line is called again.
        assert_eq!(
            room.adopt(3, 3, 11_500, 15_000, 60_000, &l),
            Adoption::Taken
        );
        room.tick(l, 16_000).await.unwrap();
        assert_eq!(
            room.claim(3, room.generation(), l, session(30), 16_500)
                .await
                .unwrap(),
            Claim::AlreadyClaimed,
            "a copy of its ticket makes no second session"
        );
        // Every number called again (those written ahead too) is owed a
        // slot but 3.
        let v = room.view();
        assert!(v.serving >= 3, "{v:?}");
        assert_eq!(v.reserved, v.serving - 1, "3 is owed no slot: {v:?}");
        // A number past the queue (handed out before the crash without
        // its mark on disk) is the next newcomer's: not marked claimed.
        let past = v.queue + 2;
        assert_eq!(
            room.adopt(40, past, 11_500, 16_500, 60_000, &l),
            Adoption::Taken
        );
        while number(&room, l, 16_500).await < past {}
        room.tick(l, 17_000).await.unwrap();
        assert_eq!(
            room.claim(past, room.generation(), l, session(41), 17_500)
                .await
                .unwrap(),
            Claim::Admitted,
            "the newcomer holding {past} comes in"
        );
    }

    /// A restart's stop counts against nobody: the line's pace, which the
    /// waiting page's estimate is drawn from, is the pace before it.
    #[tokio::test]
    async fn the_lines_pace_goes_on_across_a_restart() {
        let snap = folder("pace");
        let l = Limits {
            per_minute: Some(600.0),
            ..limits_unbounded()
        };
        let store = MemoryStore::open(Some(snap.clone()), 0).unwrap();
        let room = store.room("r", &l, 0);
        for _ in 0..200 {
            number(&room, l, 0).await;
        }
        for t in 1..=5 {
            room.tick(l, t * 1_000).await.unwrap();
        }
        let before = room.view().pace;
        assert!(before > 5.0, "{before}");
        store.close(5_000).unwrap();
        drop((room, store));

        let store = MemoryStore::open(Some(snap), 35_000).unwrap();
        let room = store.room("r", &l, 35_000);
        room.tick(l, 36_000).await.unwrap();
        let after = room.view().pace;
        assert!(
            after >= 0.9 * before,
            "{after} after a 30 s stop, {before} before"
        );
    }

    #[tokio::test]
    async fn a_return_moves_a_session_once_and_is_found_made_after() {
        let store = MemoryStore::open(None, 0).unwrap();
        let l = limits(None);
        let room = store.room("r", &l, 0);
        let ask = |old, new, now| room.hand_over(old, new, now + 60_000, now, 3_600_000);
        assert_eq!(ask(1, 2, 1_000).await.unwrap(), HandOver::Made);
        assert_eq!(
            room.peek_local(1, 1_000),
            Liveness::Dead,
            "the old one ended"
        );
        assert_eq!(room.peek_local(2, 1_000), Liveness::Alive);
        // Asked again: found made, the new one renewed.
        assert_eq!(ask(1, 2, 30_000).await.unwrap(), HandOver::MadeBefore);
        assert_eq!(room.peek_local(2, 80_000), Liveness::Alive);
        // Not to another id, nor once the new one has lapsed.
        assert_eq!(ask(1, 3, 30_000).await.unwrap(), HandOver::Refused);
        assert_eq!(ask(1, 2, 90_000).await.unwrap(), HandOver::Refused);
        // Nor a session the portal ended.
        room.end_session(4, 1_000, 3_600_000).await.unwrap();
        assert_eq!(ask(4, 5, 2_000).await.unwrap(), HandOver::Refused);
        assert_eq!(room.peek_local(5, 2_000), Liveness::Dead);
    }

    /// A page's requests with one lapsed pass, at once: each asks for the
    /// same move, and each is told it is made (now or before), never
    /// refused in the moment between the old one's end and the new one.
    #[test]
    fn returns_asked_at_once_are_each_let_in() {
        let store = MemoryStore::open(None, 0).unwrap();
        let l = limits(None);
        let room = store.room("r", &l, 0);
        for old in 1..=2_000u128 {
            let start = Arc::new(std::sync::Barrier::new(4));
            let asks: Vec<_> = (0..4)
                .map(|_| {
                    let (room, start) = (room.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        futures_util::FutureExt::now_or_never(room.hand_over(
                            old,
                            old + 1_000_000,
                            61_000,
                            1_000,
                            3_600_000,
                        ))
                        .expect("the memory store answers at once")
                        .unwrap()
                    })
                })
                .collect();
            let made: Vec<HandOver> = asks.into_iter().map(|a| a.join().unwrap()).collect();
            assert_eq!(
                made.iter().filter(|m| **m == HandOver::Made).count(),
                1,
                "return {old}: {made:?}"
            );
            assert!(!made.contains(&HandOver::Refused), "return {old}: {made:?}");
        }
    }
}
