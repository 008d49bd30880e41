//! Where a room's counters and live sessions are kept: [`memory`] on one
//! node (the default, with snapshots), Redis for many nodes (cluster mode).
//! Every operation that changes who may enter happens atomically inside the
//! store; the hot path of an admitted person only touches a local session.

pub mod ahead;
pub mod blocks;
pub mod link;
pub mod memory;
pub mod redis;
pub mod skew;

use futures_util::future::{self, BoxFuture, FutureExt};
use serde::Serialize;

use crate::room::admission::{Claim, Issued, Limits, Mode};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Asked, but the answer did not come in time: what was asked may
    /// have been done all the same (the shared store runs what it got).
    #[error("store did not answer in time: {0}")]
    Unanswered(String),
    /// The store answered, with an error about what it was asked (a key
    /// of the wrong type, a script that failed on one room's state): that
    /// room's, not the store's as a whole.
    #[error("store refused: {0}")]
    Refused(String),
}

/// How long an ended session is remembered at the least; a room whose
/// passes may come back later than this remembers longer (see
/// `Room::ended_memory_ms`).
pub const ENDED_MEMORY_MS: u64 = 3_600_000;

/// A room's counters as last seen: what the waiting page and the metrics
/// show. Never used to decide admission.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoomView {
    pub queue: u64,
    pub serving: u64,
    pub waiting: u64,
    pub active: u64,
    pub reserved: u64,
    pub opened: bool,
    pub prequeue: u64,
    /// Admissions per second over the last minute.
    pub observed_rate: f64,
    /// Numbers called from the line per second, over the last minute it
    /// stood: what a wait is estimated from (see `AdmissionState::pace`).
    pub pace: f64,
    pub admitted_total: u64,
    pub abandoned_total: u64,
    /// Numbers at or below this can no longer claim: their turn came and
    /// its claim window passed (as of the last tick or claim).
    pub floor: u64,
}

impl RoomView {
    /// People waiting, as the page, the admin API and the metrics report
    /// them: before the opening everyone in line holds a pre-queue ticket
    /// (`waiting` counts the queue's numbers only).
    pub fn in_line(&self) -> u64 {
        if self.opened {
            self.waiting
        } else {
            self.waiting + self.prequeue
        }
    }

    /// The wait of someone joining now, in seconds, at the line's pace;
    /// `None` while the pace is not known.
    pub fn estimated_wait(&self) -> Option<f64> {
        (self.pace > 0.0).then(|| self.in_line() as f64 / self.pace)
    }
}

/// A new session to record together with an admission, so the count of
/// live sessions and the decision to admit never disagree.
#[derive(Debug, Clone, Copy)]
pub struct NewSession {
    pub sid: u128,
    pub expires_ms: u64,
}

/// The id of the key that draws a room's lottery: set once, at the first
/// draw, so a later key rotation cannot reshuffle the pre-queue.
#[derive(Debug, Default)]
pub struct KeyId(std::sync::Mutex<Option<String>>);

impl KeyId {
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_once(&self, kid: &str) {
        let mut k = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if k.is_none() {
            *k = Some(kid.to_string());
        }
    }

    /// What the shared store says wins over a local guess.
    pub fn replace(&self, kid: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(kid.to_string());
    }
}

/// One change an operator made live (admin API).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LiveChange {
    Mode(Mode),
    /// New sessions per minute; `None`: unlimited.
    PerMinute(Option<f64>),
    /// `None`: unlimited.
    MaxActive(Option<u64>),
}

/// The live changes every node of a cluster follows, as the store holds
/// them: each field an operator set through any node since the last
/// reset, a version that only ever moves up (within one life of Redis's
/// data), and the name of the last reset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedLive {
    /// Empty: nothing ever shared.
    pub version: String,
    /// The last reset's name (its version and a random word); empty:
    /// never reset.
    pub reset: String,
    pub mode: Option<Mode>,
    pub per_minute: Option<Option<f64>>,
    pub max_active: Option<Option<u64>>,
}

/// What a node knows about a session on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Not known on this node: ask the store (cluster mode only).
    Unknown,
}

/// What the store says of a session a node asked it about
/// (`RoomStore::check_session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Alive, and renewed.
    Alive,
    /// Ended by the portal.
    Ended,
    /// Not alive, and not ended: it lapsed, or the store never heard of
    /// it or lost it (see the gate).
    Unheard,
}

/// What the store made of a return (`RoomStore::hand_over`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    /// The old session moved to the new id now.
    Made,
    /// Moved by an earlier ask, the new session still alive: renewed.
    MadeBefore,
    /// The old session was ended (by the portal, or moved to a session
    /// that has ended or lapsed since): nobody comes back on it.
    Refused,
}

/// What became of a session lost in a crash (`RoomStore::adopt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Taken back: the pass lets its holder in again.
    Taken,
    /// Taken back already, by a request of the same pass at once (a page
    /// and its assets): alive, and counted once.
    Alive,
    /// Its number is ahead of the serving counter the crash set back, and
    /// no place is free: the number is its holder's place in line again.
    Waits,
    /// Not a session lost in the crash, or its place is gone.
    Refused,
}

pub trait RoomStore: Send + Sync + 'static {
    fn issue(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<Issued, StoreError>>;
    /// As `issue`, with the run (`generation`) its place belongs to, as
    /// the ticket is signed with: read apart, a run Redis started
    /// meanwhile named a number of the run before, which then claimed
    /// somebody else's turn in the new one.
    fn issue_in_run(
        &self,
        limits: Limits,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<(Issued, u64), StoreError>> {
        async move {
            let issued = self.issue(limits, now_ms).await?;
            Ok((issued, self.generation()))
        }
        .boxed()
    }
    fn admit_directly(
        &self,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;
    /// Claims the pass of number `n` of run `generation` (see
    /// [`RoomStore::generation`]; 0: of any run). The store checks the run
    /// itself: a node may not have heard yet that a shared store lost its
    /// data.
    fn claim(
        &self,
        n: u64,
        generation: u64,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Claim, StoreError>>;
    /// Advances the serving counter; returns how many became eligible.
    fn tick(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>>;
    /// Renews a live session, locally, without a store round trip.
    fn touch(&self, sid: u128, now_ms: u64, idle_ms: u64) -> Liveness;
    /// Whether a session is alive, without renewing it, as this node knows
    /// (no store round trip): for the status endpoint, which must not keep
    /// a session alive by polling.
    fn peek_local(&self, sid: u128, now_ms: u64) -> Liveness;
    /// The same, asking the store (for a session [`Self::peek_local`] does
    /// not know).
    fn peek(&self, sid: u128, now_ms: u64) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Asks the store about a session this node does not know, renewing it
    /// when alive.
    fn check_session(
        &self,
        sid: u128,
        now_ms: u64,
        idle_ms: u64,
    ) -> BoxFuture<'_, Result<Checked, StoreError>>;
    /// Keeps a session the gate took at its pass's word while the store
    /// was away, as one this node saw alive: its next requests ask the
    /// store nothing, and the store hears of it when it answers again
    /// (which names it back if it was ended). False: this node ended it
    /// itself meanwhile. Only a shared store fails so.
    fn take_at_its_word(&self, _sid: u128, _expires_ms: u64) -> bool {
        true
    }
    /// Ends a session (the portal released it): its slot is free at once,
    /// and it is remembered as ended for `remember_ms`, so `hand_over`
    /// cannot bring it back.
    fn end_session(
        &self,
        sid: u128,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;
    /// Moves session `old`, lapsed or live, to a new id `new`, live until
    /// `expires_ms`, ahead of anyone in line: for a person the portal
    /// failed, or one coming back from a login detour. `old` ends in the
    /// same step (remembered as `end_session` does), so no copy of its
    /// pass lives again. Asked again with the same ids (a page's requests
    /// at once, through any node; a retry after a lost answer), the same
    /// move is found made, and `new` renewed.
    fn hand_over(
        &self,
        old: u128,
        new: u128,
        expires_ms: u64,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<HandOver, StoreError>>;
    /// Takes back the session `sid` of a valid pass (admitted with
    /// number `n`) this node lost in a crash (begun after its last
    /// snapshot), for one idle time after the start that found the crash,
    /// into its own number's slot if that is called again, else into a
    /// free one. Only the memory store loses sessions so.
    fn adopt(
        &self,
        _sid: u128,
        _n: u64,
        _began_ms: u64,
        _now_ms: u64,
        _idle_ms: u64,
        _limits: &Limits,
    ) -> Adoption {
        Adoption::Refused
    }
    fn view(&self) -> RoomView;
    /// [`Self::generation`] and [`Self::view`] read together: a reply
    /// between two reads could pair one run's counters with another run.
    fn run_and_view(&self) -> (u64, RoomView) {
        (self.generation(), self.view())
    }
    /// Reads the room's counters from the store into [`Self::view`],
    /// advancing nothing: at start, for the checks and the counters' base
    /// (the memory store's are restored by then; the shared store's would
    /// come at the first tick).
    fn refresh(&self, _limits: Limits, _now_ms: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }
    /// Shares an operator's change with every node (cluster mode); one
    /// node has nobody to tell. `others`: what this node last followed of
    /// the cluster's other changes (as of version `above`), put in first
    /// if the store lost them and nobody has put them back yet (see
    /// [`Self::put_back_live`]).
    fn share_live(
        &self,
        _change: LiveChange,
        _others: &[LiveChange],
        _above: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }
    /// Puts back the changes the cluster shared after the store lost
    /// them, at once (a node reading them one by one would take those not
    /// there yet for dropped), with a version past `above`, the last this
    /// node followed: versions keep moving up across the loss. Nothing if
    /// the store holds shared changes again (put back by another node, or
    /// an operator's since).
    fn put_back_live(
        &self,
        _changes: &[LiveChange],
        _above: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }
    /// Drops every shared change: each node goes back to its config.
    fn reset_live(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }
    /// The shared changes as they stand; `None`: a store that shares none.
    fn shared_live(&self) -> BoxFuture<'_, Result<Option<SharedLive>, StoreError>> {
        future::ready(Ok(None)).boxed()
    }
    /// Where the block of provisional tickets of outage `epoch` starts in
    /// the queue, once the store has placed it, with the run it was placed
    /// in (read once with the place, so the two cannot disagree).
    fn provisional_base(&self, _epoch: u64) -> Option<(u64, u64)> {
        None
    }
    /// Whether the tickets of outage `epoch` hold no place: their block
    /// was placed in a state the store has since lost (its data went), or
    /// will never be placed (the node that handed them out is gone).
    fn provisional_lost(&self, _epoch: u64, _now_ms: u64) -> bool {
        false
    }
    /// Where the admission log of the node that advances the counters
    /// has recorded them up to: the run and the last number in a record
    /// on disk. Kept in a shared store, so that a node taking the lease
    /// over logs from there: what other nodes let in straight away since
    /// its last record is in no one's log otherwise. None: one node alone,
    /// which keeps its own.
    fn audited(&self) -> BoxFuture<'_, Result<Option<(u64, u64)>, StoreError>> {
        future::ready(Ok(None)).boxed()
    }
    /// Records [`Self::audited`], once the record is on disk.
    fn set_audited(&self, _run: u64, _to: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        future::ready(Ok(())).boxed()
    }
    /// Whether `view` holds the room's counters: at once for a store of
    /// its own; for a shared one, once it has answered this node.
    fn heard(&self) -> bool {
        true
    }
    /// Whether this node advances the room's counters (always, alone).
    fn leads(&self) -> bool {
        true
    }
    /// `leads`, as far as this node can tell now, for operators: a node
    /// cut off from the shared store no longer knows it holds the lease,
    /// which another node takes once it lapses.
    fn leads_now(&self) -> bool {
        self.leads()
    }
    /// The run of the room's queue this store holds, which every ticket
    /// carries: its counters started from nothing then (a first start, a
    /// start without the snapshot, a shared store that lost its data).
    /// 0: not known yet (a shared store not heard from).
    fn generation(&self) -> u64;
    /// Whether a ticket of generation `g` holds a place in this queue. One
    /// from an earlier run does not: its number is somebody else's now, or
    /// a place the new run never gave. 0 (a ticket of an older varco, or
    /// signed before the generation was known) holds one of any run.
    fn holds_place(&self, g: u64) -> bool {
        let current = self.generation();
        g == 0 || current == 0 || g == current
    }
    /// The key id whose key draws this room's lottery (fixed at opening).
    fn lottery_key_id(&self) -> Option<String>;
    fn set_lottery_key_id(&self, kid: &str);
}

/// Reads one of the memory store's JSON files (`what`: "snapshot", "marks
/// file"), each error naming `store.snapshot`, the file and the reason.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> Result<T, String> {
    read_json_bytes(path, what).map(|(value, _)| value)
}

/// Whether a state file is there to read. A link is refused: a link to
/// nothing (a volume not mounted) read as a first start voided every
/// ticket of the run before, and a save (a new file renamed over the old)
/// replaced a good link with a file of its own, off the volume it named.
/// A path that cannot be looked at is an error too, not a first start.
pub(crate) fn present(path: &std::path::Path, what: &str) -> Result<bool, String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!(
            "store.snapshot: cannot look at the {what} {}: {e}",
            path.display()
        )),
        Ok(m) if m.file_type().is_symlink() => Err(format!(
            "store.snapshot: the {what} {} is a link{}; set store.snapshot to the file \
             itself (a link to its folder is fine): a save renames a new file over the \
             path, which would replace the link",
            path.display(),
            match std::fs::read_link(path) {
                Ok(to) if path.try_exists().unwrap_or(false) => format!(" to {}", to.display()),
                Ok(to) => format!(
                    " to {}, which is not there (a volume not mounted?)",
                    to.display()
                ),
                Err(_) => String::new(),
            }
        )),
        Ok(_) => Ok(true),
    }
}

/// As [`read_json`], with the bytes it was read from.
pub(crate) fn read_json_bytes<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> Result<(T, Vec<u8>), String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("store.snapshot: cannot read {}: {e}", path.display()))?;
    let value = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "store.snapshot: {} is not a varco {what}: {e}",
            path.display()
        )
    })?;
    Ok((value, bytes))
}

/// Removes the file at `path`; one already gone is no error.
pub(crate) fn remove_if_present(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes `bytes` to `path` so that a crash mid-write leaves the previous
/// file whole: to `path.tmp`, synced, renamed over, the folder synced.
pub(crate) fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        };
        // The rename is durable only once the folder is: a failure here
        // is the write's (the marks writer would otherwise count numbers
        // as covered that a power cut could take back). Only a file
        // system that cannot sync a folder at all is let be.
        let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
        if let Err(e) = synced {
            use std::io::ErrorKind::{InvalidInput, Unsupported};
            if !matches!(e.kind(), InvalidInput | Unsupported) {
                return Err(e);
            }
        }
    }
    Ok(())
}
