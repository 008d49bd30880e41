//! The one-node store: each room's admission state under a mutex (held for
//! microseconds, never across an await), live sessions in a dashmap, and
//! snapshots to a file (write, fsync, rename) so a restart keeps every
//! place in line and every live session.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use futures_util::future::{self, BoxFuture, FutureExt};
use serde::{Deserialize, Serialize};

use super::{KeyId, Liveness, NewSession, RoomStore, RoomView, StoreError};
use crate::room::admission::{AdmissionState, Claim, Issued, Limits};

pub struct MemoryRoom {
    state: Mutex<AdmissionState>,
    lottery_kid: KeyId,
    /// Session id -> expiry (unix ms). Only admitted people are here.
    sessions: DashMap<u128, AtomicU64>,
    /// Sessions the portal ended -> when to forget them (unix ms).
    ended: DashMap<u128, u64>,
}

impl MemoryRoom {
    fn new(state: AdmissionState) -> Self {
        MemoryRoom {
            state: Mutex::new(state),
            lottery_kid: KeyId::default(),
            sessions: DashMap::new(),
            ended: DashMap::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        // A panic while holding the lock cannot leave the counters half
        // updated in a way worse than losing them: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn purge(&self, now_ms: u64) -> u64 {
        self.sessions
            .retain(|_, exp| exp.load(Ordering::Relaxed) > now_ms);
        self.ended.retain(|_, until| *until > now_ms);
        self.sessions.len() as u64
    }

    fn live(&self) -> u64 {
        self.sessions.len() as u64
    }
}

impl RoomStore for MemoryRoom {
    fn issue(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<Issued, StoreError>> {
        let issued = self.lock().issue(&limits, now_ms);
        future::ready(Ok(issued)).boxed()
    }

    fn admit_directly(
        &self,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        let mut state = self.lock();
        let n = state.admit_directly(&limits, self.live(), now_ms);
        if n.is_some() {
            self.sessions
                .insert(session.sid, AtomicU64::new(session.expires_ms));
        }
        drop(state);
        future::ready(Ok(n)).boxed()
    }

    fn claim(
        &self,
        n: u64,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Claim, StoreError>> {
        let mut state = self.lock();
        let c = state.claim(n, &limits, now_ms);
        if c == Claim::Admitted {
            self.sessions
                .insert(session.sid, AtomicU64::new(session.expires_ms));
        }
        drop(state);
        future::ready(Ok(c)).boxed()
    }

    fn tick(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        let mut state = self.lock();
        let active = self.purge(now_ms);
        let advanced = state.tick(&limits, active, now_ms);
        drop(state);
        future::ready(Ok(advanced)).boxed()
    }

    fn touch(&self, sid: u128, now_ms: u64, idle_ms: u64) -> Liveness {
        match self.sessions.get(&sid) {
            Some(exp) if exp.load(Ordering::Relaxed) > now_ms => {
                exp.store(now_ms + idle_ms, Ordering::Relaxed);
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
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        // One node knows every session: the local answer is the answer.
        future::ready(Ok(self.touch(sid, now_ms, idle_ms) == Liveness::Alive)).boxed()
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

    fn restore(
        &self,
        sid: u128,
        expires_ms: u64,
        _now_ms: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        if self.ended.contains_key(&sid) {
            return future::ready(Ok(false)).boxed();
        }
        self.sessions
            .entry(sid)
            .and_modify(|e| {
                e.fetch_max(expires_ms, Ordering::Relaxed);
            })
            .or_insert_with(|| AtomicU64::new(expires_ms));
        future::ready(Ok(true)).boxed()
    }

    fn view(&self) -> RoomView {
        let s = self.lock();
        RoomView {
            queue: s.queue,
            serving: s.serving,
            waiting: s.waiting(),
            active: self.live(),
            reserved: s.reserved(),
            opened: s.opened,
            prequeue: s.prequeue,
            observed_rate: s.observed_rate(),
            admitted_total: s.admitted_total,
            abandoned_total: s.abandoned_total,
        }
    }

    fn lottery_key_id(&self) -> Option<String> {
        self.lottery_kid.get()
    }

    fn set_lottery_key_id(&self, kid: &str) {
        self.lottery_kid.set_once(kid);
    }
}

/// All rooms of one node, and their snapshot file.
pub struct MemoryStore {
    rooms: DashMap<String, Arc<MemoryRoom>>,
    snapshot: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    saved_ms: u64,
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
}

impl MemoryStore {
    /// Restores from `snapshot` when the file exists; a missing file is a
    /// first start, an unreadable one is an error (refusing to start beats
    /// silently throwing everyone out of line).
    ///
    /// Nobody could come in, nor make a request, while varco was down: the
    /// time between the snapshot and `now_ms` counts against nobody's claim
    /// window and nobody's idle time. A person called just before a crash
    /// keeps the rest of their window, an admitted person their session.
    pub fn open(snapshot: Option<PathBuf>, now_ms: u64) -> Result<Self, String> {
        let store = MemoryStore {
            rooms: DashMap::new(),
            snapshot,
        };
        if let Some(path) = &store.snapshot {
            if path.exists() {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("store.snapshot: cannot read {}: {e}", path.display()))?;
                let snap: Snapshot = serde_json::from_str(&text).map_err(|e| {
                    format!(
                        "store.snapshot: {} is not a varco snapshot: {e}",
                        path.display()
                    )
                })?;
                let down = now_ms.saturating_sub(snap.saved_ms);
                for (name, mut r) in snap.rooms {
                    for b in r.state.batches.iter_mut() {
                        b.at_ms += down;
                    }
                    let room = MemoryRoom::new(r.state);
                    if let Some(kid) = &r.lottery_kid {
                        room.lottery_kid.replace(kid);
                    }
                    for (sid, exp) in r.sessions {
                        if let Ok(sid) = u128::from_str_radix(&sid, 16) {
                            room.sessions.insert(sid, AtomicU64::new(exp + down));
                        }
                    }
                    for (sid, until) in r.ended {
                        if let Ok(sid) = u128::from_str_radix(&sid, 16) {
                            room.ended.insert(sid, until + down);
                        }
                    }
                    store.rooms.insert(name, Arc::new(room));
                }
                tracing::info!(path = %path.display(), rooms = store.rooms.len(), down_ms = down, "restored the queue from the snapshot");
            }
        }
        Ok(store)
    }

    /// The room's store, created fresh unless a snapshot restored it.
    pub fn room(&self, name: &str, limits: &Limits, now_ms: u64) -> Arc<MemoryRoom> {
        self.rooms
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(MemoryRoom::new(AdmissionState::new(limits, now_ms))))
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
                let state = room.lock().clone();
                let sessions = room
                    .sessions
                    .iter()
                    .map(|s| {
                        (
                            format!("{:032x}", s.key()),
                            s.value().load(Ordering::Relaxed),
                        )
                    })
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
                    },
                )
            })
            .collect();
        let snap = Snapshot {
            version: 1,
            saved_ms: now_ms,
            rooms,
        };
        let bytes = serde_json::to_vec(&snap).map_err(std::io::Error::other)?;
        write_atomically(path, &bytes)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
