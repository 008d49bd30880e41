//! Ticket numbers written ahead, as a database writes its sequences ahead:
//! no number is handed out before a mark at or above it is on disk, in a
//! small file next to the snapshot. A clean stop writes the last snapshot
//! and removes the marks; a crash leaves them, and the next start numbers
//! from the marks, so nobody's place is handed to somebody else. The
//! numbers between the last one handed out before the crash and the mark
//! belong to nobody: they are called like anyone who left (each holds a
//! slot for one claim window), so the lead is kept short: what arrives in
//! a fifth of a second (or four writes' time, if longer).
//!
//! The marks also tell the next start that the last one crashed, and
//! when the lost stretch began: passes whose session began after the last
//! snapshot are taken back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::room::admission::AdmissionState;

/// The fewest numbers written ahead at once.
const MIN_AHEAD: u64 = 8;
/// The most: a crash leaves at most this many places nobody holds.
const MAX_AHEAD: u64 = 100_000;
/// The shortest time ahead the lead covers: a fifth of a second of
/// arrivals. Shorter costs arrivals throughput (at 20 ms, 100 writes a
/// second cut a new arrival's rate by a fifth in an A/B); after a crash
/// it is as if the crash had come that much earlier in arrival terms.
const MIN_SPAN: Duration = Duration::from_millis(200);
/// The arrival rate is measured over at least this long.
const RATE_OVER: Duration = Duration::from_millis(100);

/// One room's marks on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// No number above this was handed out.
    pub queue: u64,
    /// No pre-queue number above this was handed out.
    pub prequeue: u64,
    /// The pre-queue's size when the room opened; none: not opened yet.
    /// Exact, so a start after a crash draws the same lottery.
    pub opened_with: Option<u64>,
    /// The queue's generation, for a room the crash kept out of the
    /// snapshot or whose snapshot is from before generations were kept:
    /// its tickets stay good. 0: marks of an older varco.
    #[serde(default)]
    pub generation: u64,
}

impl Marks {
    /// Makes a room's restored counters cover every number handed out
    /// before the crash. `fresh`: the room was not in the snapshot, so
    /// whether it had opened is the marks' to say.
    pub fn apply(&self, st: &mut AdmissionState, fresh: bool) {
        if fresh {
            st.opened = false;
            if self.generation != 0 {
                st.generation = self.generation;
            }
        }
        if !st.opened {
            st.prequeue = st.prequeue.max(self.prequeue);
            if let Some(p) = self.opened_with {
                // It opened after the snapshot: with exactly this many.
                st.prequeue = p;
                st.open();
            }
        }
        if st.opened {
            st.queue = st.queue.max(self.queue);
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct MarksFile {
    version: u32,
    /// When the process that wrote them started, unix ms.
    since_ms: u64,
    /// The crashes before it whose lost sessions may still come back:
    /// (from, restarted), unix ms (see `MemoryStore::lost`).
    #[serde(default)]
    lost: Vec<(u64, u64)>,
    rooms: HashMap<String, Marks>,
}

pub fn path_for(snapshot: &Path) -> PathBuf {
    let mut p = snapshot.as_os_str().to_owned();
    p.push(".marks");
    PathBuf::from(p)
}

/// What a crash left: its marks, and when the run that wrote them began.
#[derive(Debug)]
pub struct Left {
    pub since_ms: u64,
    pub lost: Vec<(u64, u64)>,
    pub rooms: HashMap<String, Marks>,
    /// The file as read: what a start refused puts back.
    pub bytes: Vec<u8>,
}

/// Reads the marks a crash left, if it did (a clean stop removes them).
pub fn read(path: &Path) -> Result<Option<Left>, String> {
    if !super::present(path, "marks file")? {
        return Ok(None);
    }
    let (f, bytes): (MarksFile, _) = super::read_json_bytes(path, "marks file")?;
    if f.version != 1 {
        return Err(format!(
            "store.snapshot: {} is marks version {}, this varco reads version 1",
            path.display(),
            f.version
        ));
    }
    Ok(Some(Left {
        since_ms: f.since_ms,
        lost: f.lost,
        rooms: f.rooms,
        bytes,
    }))
}

/// Wakes the writer; shared by every room of a store.
#[derive(Default)]
pub struct Wake {
    wanted: Mutex<bool>,
    cv: Condvar,
    /// Set from the first wake until the writer takes it up: every arrival
    /// past the low water asks, and only the first takes the lock.
    pending: AtomicBool,
    /// The writer stopped (it panicked): numbering goes on without marks.
    gone: AtomicBool,
}

impl Wake {
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    pub fn set_gone(&self) {
        self.gone.store(true, Ordering::Release);
    }

    /// Waits until woken or `timeout`; true when woken.
    pub fn wait(&self, timeout: Duration) -> bool {
        let w = self.wanted.lock().unwrap_or_else(|e| e.into_inner());
        let (mut w, _) = self
            .cv
            .wait_timeout_while(w, timeout, |w| !*w)
            .unwrap_or_else(|e| e.into_inner());
        // Cleared before the writer reads the rooms, so a wake from here on
        // brings another write.
        self.pending.store(false, Ordering::Release);
        std::mem::replace(&mut *w, false)
    }
}

/// One room's marks as they stand on disk, and who waits for them.
pub struct Ahead {
    queue: AtomicU64,
    prequeue: AtomicU64,
    opened: AtomicBool,
    /// Past this number (either counter), ask for more to be written.
    low_water: AtomicU64,
    wake: Arc<Wake>,
    written: tokio::sync::Notify,
    pace: Mutex<Pace>,
    /// A write did not come in time: numbers go out uncovered until the
    /// next one lands, rather than each arrival waiting in turn.
    late: AtomicBool,
}

/// How fast a room hands out numbers, for how far ahead to write.
#[derive(Default)]
struct Pace {
    /// Start of the current measure: when, and the count then.
    since: Option<(Instant, u64)>,
    /// Numbers a second, smoothed.
    rate: f64,
    /// The last write's lead.
    ahead: u64,
}

impl Ahead {
    pub fn new(wake: Arc<Wake>) -> Self {
        Ahead {
            queue: AtomicU64::new(0),
            prequeue: AtomicU64::new(0),
            opened: AtomicBool::new(false),
            low_water: AtomicU64::new(0),
            wake,
            written: tokio::sync::Notify::new(),
            pace: Mutex::new(Pace::default()),
            late: AtomicBool::new(false),
        }
    }

    /// A room restored at start (from the snapshot, or the marks a crash
    /// left) or made fresh: what it holds is already on disk, or needs
    /// no disk (a fresh room's opening has no pre-queue to draw).
    pub fn restored(&self, st: &AdmissionState) {
        self.queue.store(st.queue, Ordering::Release);
        self.prequeue.store(st.prequeue, Ordering::Release);
        self.opened.store(st.opened, Ordering::Release);
    }

    /// Whether the next number `st` hands out is covered by the marks on
    /// disk (asks for more when they run low). The caller holds the state
    /// and has already let it open if the time has come: a room that
    /// opened numbers nobody until the opening is on disk.
    pub fn covers_next(&self, st: &AdmissionState) -> bool {
        if self.wake.is_gone() || self.late.load(Ordering::Acquire) {
            return true;
        }
        let (next, mark) = if st.opened {
            if !self.opened.load(Ordering::Acquire) {
                self.wake.wake();
                return false;
            }
            (st.queue + 1, self.queue.load(Ordering::Acquire))
        } else {
            (st.prequeue + 1, self.prequeue.load(Ordering::Acquire))
        };
        if next >= self.low_water.load(Ordering::Relaxed) {
            self.wake.wake();
        }
        next <= mark
    }

    /// Whether the opening, if it happened, is on disk (the admission
    /// tick waits for it before calling anyone).
    pub fn covers_opening(&self, st: &AdmissionState) -> bool {
        if st.opened && !self.opening_on_disk() {
            self.wake.wake();
            return false;
        }
        true
    }

    /// Whether an opening would be on disk (or goes on without it: the
    /// writer gone, or late).
    pub fn opening_on_disk(&self) -> bool {
        self.opened.load(Ordering::Acquire)
            || self.wake.is_gone()
            || self.late.load(Ordering::Acquire)
    }

    /// A future that completes at the next write; created before the
    /// check it waits on, so no write slips between the two.
    pub fn written(&self) -> tokio::sync::futures::Notified<'_> {
        self.written.notified()
    }

    /// The marks to write now for `st`, and the number past which to ask
    /// again. The lead is what arrives in a fifth of a second, or in four
    /// writes' time if longer (so the next write lands before it runs
    /// out), doubled when it ran out:
    /// every number written ahead and not handed out before a crash is a
    /// place nobody holds. Marks never go down: numbers up to the marks on
    /// disk may be out already.
    pub fn plan(&self, st: &AdmissionState, now: Instant, write_took: Duration) -> (Marks, u64) {
        let issued = if st.opened { st.queue } else { st.prequeue };
        let mut pace = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        match pace.since {
            Some((t, n)) if now.duration_since(t) >= RATE_OVER => {
                let r = issued.saturating_sub(n) as f64 / now.duration_since(t).as_secs_f64();
                pace.rate = (pace.rate + r) / 2.0;
                pace.since = Some((now, issued));
            }
            Some(_) => {}
            None => pace.since = Some((now, issued)),
        }
        let on_disk = if st.opened {
            self.queue.load(Ordering::Acquire)
        } else {
            self.prequeue.load(Ordering::Acquire)
        };
        let span = (4.0 * write_took.as_secs_f64()).max(MIN_SPAN.as_secs_f64());
        let mut ahead = (pace.rate * span) as u64;
        if issued >= on_disk {
            ahead = ahead.max(2 * pace.ahead);
        }
        let ahead = ahead.clamp(MIN_AHEAD, MAX_AHEAD);
        pace.ahead = ahead;
        let marks = if st.opened {
            Marks {
                queue: (st.queue + ahead).max(self.queue.load(Ordering::Acquire)),
                prequeue: st.prequeue,
                opened_with: Some(st.prequeue),
                generation: st.generation,
            }
        } else {
            Marks {
                queue: 0,
                prequeue: (st.prequeue + ahead).max(on_disk),
                opened_with: None,
                generation: st.generation,
            }
        };
        (marks, issued + ahead / 2)
    }

    /// No write came within `waited`: numbers go out uncovered until the
    /// next write lands (said once, not once an arrival).
    pub fn too_late(&self, waited: Duration) {
        if !self.late.swap(true, Ordering::AcqRel) {
            tracing::error!(
                ?waited,
                "the ticket numbers were not written ahead in time; numbering goes on without them until the disk answers"
            );
        }
        self.wake.wake();
    }

    /// `marks` are on disk (or could not be written, and serving goes on).
    pub fn now_written(&self, marks: &Marks, low_water: u64) {
        if self.late.swap(false, Ordering::AcqRel) {
            tracing::info!("the ticket numbers are written ahead again");
        }
        self.queue.store(marks.queue, Ordering::Release);
        self.prequeue.store(marks.prequeue, Ordering::Release);
        self.opened
            .store(marks.opened_with.is_some(), Ordering::Release);
        self.low_water.store(low_water, Ordering::Relaxed);
        self.written.notify_waiters();
    }

    /// At a clean stop, before the last snapshot: no number beyond the
    /// counters `st` holds is covered any more, so none is handed out
    /// that the snapshot would not keep.
    pub fn freeze(&self, st: &AdmissionState) {
        self.queue.store(st.queue, Ordering::Release);
        self.prequeue.store(st.prequeue, Ordering::Release);
    }

    /// Lets everyone waiting go on (the writer stopped).
    pub fn release(&self) {
        self.written.notify_waiters();
    }
}

/// Writes every room's marks: to a temporary file, synced, renamed.
pub fn write(
    path: &Path,
    since_ms: u64,
    lost: &[(u64, u64)],
    rooms: HashMap<String, Marks>,
) -> std::io::Result<()> {
    let f = MarksFile {
        version: 1,
        since_ms,
        lost: lost.to_vec(),
        rooms,
    };
    let bytes = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
    super::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_never_go_down_and_the_lead_grows_when_it_ran_out() {
        let a = Ahead::new(Arc::new(Wake::default()));
        let t0 = Instant::now();
        let mut st = AdmissionState {
            opened: true,
            queue: 10,
            ..AdmissionState::default()
        };
        let took = Duration::from_millis(3);
        let (m, _) = a.plan(&st, t0, took);
        assert_eq!(m.queue, 10 + MIN_AHEAD);
        a.now_written(&m, 0);
        // A write planned earlier with a longer lead is on disk: a later,
        // slower estimate must not undercut it.
        a.now_written(&Marks { queue: 5_000, ..m }, 0);
        let (m, _) = a.plan(&st, t0 + Duration::from_millis(1), took);
        assert!(m.queue >= 5_000, "{m:?}");
        // Handed out up to the mark: the next lead is at least twice the last.
        st.queue = 5_000;
        let before = a.pace.lock().unwrap().ahead;
        let (m, _) = a.plan(&st, t0 + Duration::from_millis(2), took);
        assert!(m.queue >= 5_000 + 2 * before, "{m:?}");
    }

    #[test]
    fn the_lead_follows_the_arrival_rate() {
        let a = Ahead::new(Arc::new(Wake::default()));
        let t0 = Instant::now();
        let took = Duration::from_millis(5);
        let st = |queue| AdmissionState {
            opened: true,
            queue,
            ..AdmissionState::default()
        };
        let (m, _) = a.plan(&st(0), t0, took);
        a.now_written(&m, 0);
        // 10,000 a second for 200 ms (smoothed with the 0 before it): a
        // lead of a fifth of a second at 5,000 a second.
        let (m, _) = a.plan(&st(2_000), t0 + Duration::from_millis(200), took);
        let lead = m.queue - 2_000;
        assert!((500..=2_000).contains(&lead), "lead {lead}");
    }
}
