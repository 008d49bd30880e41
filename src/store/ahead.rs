//! Ticket numbers written ahead, as a database writes its sequences ahead:
//! no number is handed out before a mark at or above it is on disk, in a
//! small file next to the snapshot. A clean stop writes the last snapshot
//! and removes the marks; a crash leaves them, and the next start numbers
//! from the marks, so nobody's place is handed to somebody else. The
//! numbers between the last one handed out before the crash and the mark
//! belong to nobody: they are passed over like anyone who left (each holds
//! a slot for one claim window).
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
const MIN_AHEAD: u64 = 64;
/// The most: a crash wastes at most this many places.
const MAX_AHEAD: u64 = 100_000;
/// How far ahead, in time: about a second of arrivals at the latest rate.
const AHEAD_FOR: Duration = Duration::from_secs(1);

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
}

impl Marks {
    /// Makes a room's restored counters cover every number handed out
    /// before the crash. `fresh`: the room was not in the snapshot, so
    /// whether it had opened is the marks' to say.
    pub fn apply(&self, st: &mut AdmissionState, fresh: bool) {
        if fresh {
            st.opened = false;
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
    pub rooms: HashMap<String, Marks>,
}

/// Reads the marks a crash left, if it did (a clean stop removes them).
pub fn read(path: &Path) -> Result<Option<Left>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("store.snapshot: cannot read {}: {e}", path.display()))?;
    let f: MarksFile = serde_json::from_str(&text).map_err(|e| {
        format!(
            "store.snapshot: {} is not a varco marks file: {e}",
            path.display()
        )
    })?;
    Ok(Some(Left {
        since_ms: f.since_ms,
        rooms: f.rooms,
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
}

impl Wake {
    pub fn wake(&self) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_one();
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
    /// (when, numbers handed out) at the last write: the latest rate.
    last: Mutex<Option<(Instant, u64)>>,
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
            last: Mutex::new(None),
        }
    }

    /// Whether the next number `st` hands out is covered by the marks on
    /// disk (asks for more when they run low). The caller holds the state
    /// and has already let it open if the time has come: a room that
    /// opened numbers nobody until the opening is on disk.
    pub fn covers_next(&self, st: &AdmissionState) -> bool {
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
        if st.opened && !self.opened.load(Ordering::Acquire) {
            self.wake.wake();
            return false;
        }
        true
    }

    /// A future that completes at the next write; created before the
    /// check it waits on, so no write slips between the two.
    pub fn written(&self) -> tokio::sync::futures::Notified<'_> {
        self.written.notified()
    }

    /// The marks to write now for `st` (about a second of arrivals beyond
    /// what is handed out), and the number past which to ask again.
    pub fn plan(&self, st: &AdmissionState, now: Instant) -> (Marks, u64) {
        let issued = if st.opened { st.queue } else { st.prequeue };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let ahead = match *last {
            Some((t, n)) => {
                let secs = now.duration_since(t).as_secs_f64().max(0.05);
                let rate = issued.saturating_sub(n) as f64 / secs;
                ((rate * AHEAD_FOR.as_secs_f64()) as u64).clamp(MIN_AHEAD, MAX_AHEAD)
            }
            None => MIN_AHEAD,
        };
        *last = Some((now, issued));
        let marks = if st.opened {
            Marks {
                queue: st.queue + ahead,
                prequeue: st.prequeue,
                opened_with: Some(st.prequeue),
            }
        } else {
            Marks {
                queue: 0,
                prequeue: st.prequeue + ahead,
                opened_with: None,
            }
        };
        (marks, issued + ahead / 2)
    }

    /// `marks` are on disk (or could not be written, and serving goes on).
    pub fn now_written(&self, marks: &Marks, low_water: u64) {
        self.queue.store(marks.queue, Ordering::Release);
        self.prequeue.store(marks.prequeue, Ordering::Release);
        self.opened
            .store(marks.opened_with.is_some(), Ordering::Release);
        self.low_water.store(low_water, Ordering::Relaxed);
        self.written.notify_waiters();
    }
}

/// Writes every room's marks: to a temporary file, synced, renamed.
pub fn write(path: &Path, since_ms: u64, rooms: HashMap<String, Marks>) -> std::io::Result<()> {
    let f = MarksFile {
        version: 1,
        since_ms,
        rooms,
    };
    let bytes = serde_json::to_vec(&f).map_err(std::io::Error::other)?;
    super::write_atomically(path, &bytes)
}
