//! The admission log: an append-only, hash-chained record of who was let
//! in, for auditors. Each record says which range of ticket numbers a
//! room's serving counter admitted, when, and on which node, and carries
//! the SHA-256 of the record before it: editing, removing or reordering
//! any record breaks every hash after it, and `varco audit verify` names
//! the record where the chain breaks.
//!
//! One JSON object per line. Only the node that advances the counters
//! (always, alone; the lease holder in a cluster) writes, and each record
//! is on disk (fsync) before the next tick, unless the disk takes longer
//! than [`WRITE_WAIT`]: then the tick goes on, and the record written
//! next covers what was admitted meanwhile (see [`Writer`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod ranges;

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub room: String,
    /// First ticket number admitted in this record.
    pub from: u64,
    /// Last ticket number admitted in this record (the serving counter).
    pub to: u64,
    /// RFC 3339, for people; `time_ms` is what the hash covers.
    pub time: String,
    pub time_ms: u64,
    pub node: String,
    /// The hash of the record before (GENESIS for the first).
    pub prev: String,
    pub hash: String,
}

impl Record {
    /// What the hash covers: every field but the hash, in a fixed order.
    pub fn digest(&self) -> String {
        let text = format!(
            "varco-audit/v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.seq, self.room, self.from, self.to, self.time_ms, self.time, self.node, self.prev
        );
        crate::room::lottery::hex(
            ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref(),
        )
    }
}

/// Where a chain breaks: the first record that does not follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// 1-based: which of the files checked.
    pub file: usize,
    /// 1-based line of the file.
    pub line: usize,
    /// The record's seq, when it could be read.
    pub seq: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(
                f,
                "broken at record {s} (line {}): {}",
                self.line, self.reason
            ),
            None => write!(f, "broken at line {}: {}", self.line, self.reason),
        }
    }
}

/// What a sound chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// The last record's hash (GENESIS when empty): an auditor who wrote
    /// it down can later check that nothing before it changed.
    pub head: String,
    /// Per room: tickets admitted, over all records.
    pub admitted: HashMap<String, u64>,
    /// With [`Verifier::continuing`], a first record past 1: its seq and
    /// the hash it says came before, to be checked against the file
    /// before it or a head written down.
    pub continued_from: Option<(u64, String)>,
    /// The files (1-based) that begin a new chain (record 1 after later
    /// ones): varco started with no log at its path.
    pub new_chains: Vec<usize>,
    /// The file and line (1-based) where the last file ends in a line
    /// with no newline: a record being written, or one a crash cut short
    /// (varco drops it at its next start). Not part of the log (yet), and
    /// not a break.
    pub unfinished: Option<(usize, usize)>,
}

/// Checks a whole log: every line a record, seq 1, 2, 3..., each `prev`
/// the hash of the one before, each hash right.
pub fn verify(reader: impl Read) -> Result<Summary, Break> {
    let mut v = Verifier::new();
    v.file(reader)?;
    Ok(v.summary())
}

/// Checks a log kept in several files (rotated), oldest first, as one
/// chain: each file goes on from the record before it. A later file may
/// also begin a new chain at record 1 (varco started with no log at its
/// path and no head a rotation left: the log removed by hand), which the
/// summary names.
pub struct Verifier {
    head: String,
    expected_seq: u64,
    admitted: HashMap<String, u64>,
    continuing: bool,
    continued_from: Option<(u64, String)>,
    new_chains: Vec<usize>,
    unfinished: Option<(usize, usize)>,
    records: u64,
    last_time_ms: u64,
    files: usize,
    /// With [`Verifier::keeping`]: each record checked, with its line.
    kept: Option<Vec<(usize, Record)>>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier {
            head: GENESIS.to_string(),
            expected_seq: 1,
            admitted: HashMap::new(),
            continuing: false,
            continued_from: None,
            new_chains: Vec::new(),
            unfinished: None,
            records: 0,
            last_time_ms: 0,
            files: 0,
            kept: None,
        }
    }

    /// Keeps each record checked, with its line, for [`Verifier::kept`].
    pub fn keeping(mut self) -> Verifier {
        self.kept = Some(Vec::new());
        self
    }

    /// The records kept (see [`Verifier::keeping`]): whole lines only, as
    /// checked.
    pub fn kept(self) -> Vec<(usize, Record)> {
        self.kept.unwrap_or_default()
    }

    /// Lets the first file begin past record 1: a rotated file checked
    /// without the ones before it.
    pub fn continuing(mut self) -> Verifier {
        self.continuing = true;
        self
    }

    /// Checks the next file. A line left unfinished is only allowed at
    /// the end of the last file: a next file makes it a break.
    pub fn file(&mut self, reader: impl Read) -> Result<(), Break> {
        self.files += 1;
        let file_no = self.files;
        let mut reader = BufReader::new(reader);
        let mut bytes = Vec::new();
        let mut line_no = 0;
        loop {
            bytes.clear();
            let read = reader.read_until(b'\n', &mut bytes);
            line_no += 1;
            let fail = |seq, reason: String| Break {
                file: file_no,
                line: line_no,
                seq,
                reason,
            };
            if let Some((_, line)) = self.unfinished {
                return Err(fail(
                    None,
                    format!("the file before ends in an unfinished line (line {line}), yet the log goes on"),
                ));
            }
            let read = read.map_err(|e| fail(None, format!("cannot read: {e}")))?;
            if read == 0 {
                return Ok(());
            }
            if !bytes.ends_with(b"\n") {
                self.unfinished = Some((file_no, line_no));
                return Ok(());
            }
            let r: Record = serde_json::from_slice(&bytes)
                .map_err(|e| fail(None, format!("not a record: {e}")))?;
            let keep = self.kept.is_some().then(|| r.clone());
            self.record(r, line_no == 1)
                .map_err(|(seq, why)| fail(seq, why))?;
            if let (Some(kept), Some(r)) = (self.kept.as_mut(), keep) {
                kept.push((line_no, r));
            }
        }
    }

    fn record(&mut self, r: Record, first_in_file: bool) -> Result<(), (Option<u64>, String)> {
        let fail = |reason: &str| Err((Some(r.seq), reason.to_string()));
        if first_in_file && r.seq != self.expected_seq {
            if r.seq == 1 && r.prev == GENESIS && self.expected_seq > 1 {
                // A new chain comes after the old one; files given out of
                // order would otherwise pass as one.
                if r.time_ms < self.last_time_ms {
                    return fail("it begins a new chain dated before the record before it: are the files in order, oldest first?");
                }
                self.new_chains.push(self.files);
                self.head = GENESIS.to_string();
                self.expected_seq = 1;
            } else if self.expected_seq == 1 && self.continuing {
                self.continued_from = Some((r.seq, r.prev.clone()));
                self.head = r.prev.clone();
                self.expected_seq = r.seq;
            } else if self.expected_seq == 1 {
                return fail(&format!(
                    "expected record 1 here: this log begins with record {}, so the records before it were removed, or are in an earlier (rotated) file: give that file first, or --continues to check this one alone",
                    r.seq
                ));
            }
        }
        if r.seq != self.expected_seq {
            return fail(&format!(
                "expected record {} here (a record was removed, added or moved)",
                self.expected_seq
            ));
        }
        if r.prev != self.head {
            return fail("its prev is not the hash of the record before (a record before it was changed or removed)");
        }
        if r.digest() != r.hash {
            return fail("its hash does not match its content (this record was changed)");
        }
        if r.to < r.from {
            return fail("its range ends before it starts");
        }
        // Anyone can write a record whose plain hash checks: a range as
        // wide as u64 must be a break, not an overflow.
        let total = self.admitted.entry(r.room.clone()).or_default();
        *total = (r.to - r.from)
            .checked_add(1)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| {
                (
                    Some(r.seq),
                    "its range is wider than any count of people".to_string(),
                )
            })?;
        self.head = r.hash;
        self.expected_seq += 1;
        self.records += 1;
        self.last_time_ms = r.time_ms;
        Ok(())
    }

    pub fn summary(self) -> Summary {
        Summary {
            records: self.records,
            head: self.head,
            admitted: self.admitted,
            continued_from: self.continued_from,
            new_chains: self.new_chains,
            unfinished: self.unfinished,
        }
    }
}

struct Chain {
    file: File,
    seq: u64,
    head: String,
    /// Per room: the serving counter already logged.
    logged: HashMap<String, u64>,
    /// A rotation's head is on disk (see `Head`): it goes with the first
    /// record written after it, or it would outlive its use (a log
    /// removed by hand would go on from it, hiding what was removed).
    head_left: bool,
}

/// The file at the log's path as a reader finds it: which file (a
/// rotation puts another there) and how long it is with only whole
/// records in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    file: (u64, u64),
    len: u64,
}

pub struct AuditLog {
    path: PathBuf,
    node: String,
    chain: Mutex<Chain>,
    /// Kept apart from the chain's lock: a reader never waits for a write
    /// (on a hung disk, for ever).
    extent: Mutex<Extent>,
}

/// What an existing log ends with.
struct End {
    seq: u64,
    head: String,
    logged: HashMap<String, u64>,
    /// Bytes of whole lines.
    whole: u64,
}

/// Reads the log at `path` to its end, dropping a last line cut short by
/// a crash mid-write (it was never complete, and the counters it would
/// have logged are logged again). Any other damage (a line that is not a
/// record, not even UTF-8) is left for `varco audit verify` to report.
fn read_end(path: &Path) -> std::io::Result<End> {
    let mut end = End {
        seq: 0,
        head: GENESIS.to_string(),
        logged: HashMap::new(),
        whole: 0,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(end),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 || !line.ends_with(b"\n") {
            break;
        }
        end.whole += read as u64;
        if let Ok(r) = serde_json::from_slice::<Record>(&line) {
            end.seq = r.seq;
            end.head = r.hash.clone();
            end.logged.insert(r.room.clone(), r.to);
        }
    }
    if !line.is_empty() {
        tracing::warn!(path = %path.display(), "the admission log ends in a partial record (a crash mid-write): dropping it");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(end.whole)?;
        f.sync_all()?;
    }
    Ok(end)
}

/// Where a rotation leaves the chain's head (`LOG.head`), for a start
/// that finds the new file still empty.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    seq: u64,
    head: String,
    /// Per room, the serving counter logged: a start that found none
    /// would log from the counters the snapshot kept, and the numbers
    /// called after the last record and before a crash would be in no
    /// record. (A head left by an older varco has none.)
    #[serde(default)]
    logged: HashMap<String, u64>,
}

fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// The head a rotation left, if any; one that cannot be read is said and
/// let be (the chain then begins anew, which `verify` names).
fn read_head(log: &Path) -> Option<Head> {
    let path = head_path(log);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the head a rotation left; the admission log begins a new chain");
            return None;
        }
    };
    match serde_json::from_slice::<Head>(&text) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the head a rotation left is not one; the admission log begins a new chain");
            None
        }
    }
}

/// Opens the log at `path` for appending, creating it if need be; a new
/// file's name is made durable too (its folder fsynced), or a crash could
/// lose the file with every record in it.
fn open_append(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    if !existed {
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(folder)?.sync_all()?;
    }
    Ok(file)
}

/// Which file this is (a rotation puts another at the same path).
fn identity_of(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

fn identity(file: &File) -> std::io::Result<(u64, u64)> {
    Ok(identity_of(&file.metadata()?))
}

/// What [`AuditLog::reopen`] found at the log's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reopened {
    /// The file written to is still there: nothing to do.
    Same,
    /// Another file (a new one, after a rotation): the next record goes
    /// there, as record `next`, following on from the file before.
    Moved { next: u64 },
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain (see
    /// [`read_end`]): a damaged log does not stop a start.
    pub fn open(path: &Path, node: &str) -> std::io::Result<AuditLog> {
        let mut end = read_end(path)?;
        let mut head_left = false;
        if end.seq == 0 {
            // Rotated away, with no record written since: the chain goes
            // on from the head the rotation left, not from nothing.
            if let Some(left) = read_head(path) {
                (end.seq, end.head, end.logged) = (left.seq, left.head, left.logged);
                head_left = true;
            }
        }
        let file = open_append(path)?;
        let extent = Extent {
            file: identity(&file)?,
            len: end.whole,
        };
        Ok(AuditLog {
            path: path.to_path_buf(),
            node: node.to_string(),
            chain: Mutex::new(Chain {
                file,
                seq: end.seq,
                head: end.head,
                logged: end.logged,
                head_left,
            }),
            extent: Mutex::new(extent),
        })
    }

    /// Writes on in whatever file is now at the log's path: after a
    /// rotation (the file renamed, say by logrotate), a new one, created
    /// if need be, whose first record follows on from the last one in the
    /// file before, so the files verify as one chain. A file that already
    /// holds records there is continued as a start would continue it. On
    /// an error the log goes on in the file it was writing.
    pub fn reopen(&self) -> std::io::Result<Reopened> {
        let current = self.extent.lock().unwrap_or_else(|e| e.into_inner()).file;
        let there = match std::fs::metadata(&self.path) {
            Ok(m) => Some(identity_of(&m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if there == Some(current) {
            return Ok(Reopened::Same);
        }
        let end = read_end(&self.path)?;
        if end.seq == 0 {
            // The head goes on disk before the new file is used: a start
            // before its first record continues the chain from it.
            let c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
            let left = Head {
                seq: c.seq,
                head: c.head.clone(),
                logged: c.logged.clone(),
            };
            drop(c);
            let bytes = serde_json::to_vec(&left).map_err(std::io::Error::other)?;
            crate::store::write_atomically(&head_path(&self.path), &bytes)?;
        }
        let file = open_append(&self.path)?;
        let extent = Extent {
            file: identity(&file)?,
            len: end.whole,
        };
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        c.file = file;
        c.head_left = end.seq == 0;
        if end.seq > 0 {
            (c.seq, c.head) = (end.seq, end.head);
        }
        *self.extent.lock().unwrap_or_else(|e| e.into_inner()) = extent;
        Ok(Reopened::Moved { next: c.seq + 1 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long the log is with only whole records in it: never in the
    /// middle of a record being written or taken back.
    pub fn committed_len(&self) -> u64 {
        self.extent.lock().unwrap_or_else(|e| e.into_inner()).len
    }

    /// The log as it stands, to its last whole record: the file at its
    /// path, checked to be the one written to (a rotation between the
    /// open and the length would otherwise pair one file with the other's
    /// length, and cut a record in half).
    pub fn open_committed(&self) -> std::io::Result<(File, u64)> {
        let written = || *self.extent.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let before = written();
            let file = File::open(&self.path)?;
            let found = identity(&file)?;
            let after = written();
            if found == after.file {
                return Ok((file, after.len));
            }
            // A reopen between the two: look again.
            if before != after {
                continue;
            }
            return Err(std::io::Error::other(
                "the file at the admission log's path is not the one varco writes: rotated, and not reopened yet (SIGUSR1)",
            ));
        }
    }

    /// Starts counting a room from `serving` without logging: when this
    /// node starts advancing a room it did not log before (a new room, or
    /// a lease taken over from another node that logged the rest).
    pub fn baseline(&self, room: &str, serving: u64) {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        c.logged.insert(room.to_string(), serving);
    }

    /// At a start, with the counters the store came back with: a restart
    /// continues from the log's last record, unless the counters are
    /// behind it (a start without the snapshot: a new run from nothing;
    /// a crash since the last snapshot: numbers called again). Then from
    /// the counters: whoever is called from there is logged, again or
    /// for the first time, and nobody is left out.
    pub fn baseline_at_start(&self, room: &str, serving: u64) {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let logged = c.logged.entry(room.to_string()).or_insert(serving);
        *logged = (*logged).min(serving);
    }

    /// Logs what the room admitted since the last record, if anything.
    /// Returns the record written.
    pub fn observe(
        &self,
        room: &str,
        serving: u64,
        now_ms: u64,
    ) -> std::io::Result<Option<Record>> {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&logged) = c.logged.get(room) else {
            c.logged.insert(room.to_string(), serving);
            return Ok(None);
        };
        if serving <= logged {
            if serving < logged {
                // The counters were reset (a store wiped): start again.
                tracing::warn!(
                    room,
                    logged,
                    serving,
                    "the serving counter went back; the admission log follows from here"
                );
                c.logged.insert(room.to_string(), serving);
            }
            return Ok(None);
        }
        let mut r = Record {
            seq: c.seq + 1,
            room: room.to_string(),
            from: logged + 1,
            to: serving,
            time: crate::timefmt::rfc3339(now_ms),
            time_ms: now_ms,
            node: self.node.clone(),
            prev: c.head.clone(),
            hash: String::new(),
        };
        r.hash = r.digest();
        let mut line = serde_json::to_string(&r).map_err(std::io::Error::other)?;
        line.push('\n');
        let before = c.file.metadata()?.len();
        let written = c
            .file
            .write_all(line.as_bytes())
            .and_then(|()| c.file.sync_data());
        if let Err(e) = written {
            // A torn line, or one written twice under the same number by
            // the next try, would make the chain fail verification from
            // here on, as if tampered with: take it back, and the next
            // record covers this range too.
            if let Err(undo) = c.file.set_len(before) {
                tracing::error!(error = %undo, "could not take back a partly written admission record");
            }
            return Err(e);
        }
        c.seq = r.seq;
        c.head = r.hash.clone();
        c.logged.insert(room.to_string(), serving);
        if c.head_left {
            c.head_left = false;
            if let Err(e) = crate::store::remove_if_present(&head_path(&self.path)) {
                tracing::warn!(error = %e, "cannot remove the head a rotation left beside the admission log");
            }
        }
        self.extent.lock().unwrap_or_else(|e| e.into_inner()).len = before + line.len() as u64;
        Ok(Some(r))
    }
}

/// How long a tick waits for a record to be on disk before it goes on
/// without it.
pub const WRITE_WAIT: Duration = Duration::from_secs(1);

/// What became of a tick's record.
#[derive(Debug)]
pub enum Written {
    /// On disk (None: nothing was admitted since the last record).
    Done(Option<Record>),
    /// The disk refused it: the next record covers its range.
    Failed(std::io::Error),
    /// Not back within the wait (a slow or hung disk): it lands when the
    /// disk answers, or fails and the next record covers its range.
    Late,
    /// An earlier record is still being written: none was tried; the next
    /// one written covers this range.
    Busy,
}

/// The admission log written on a thread of its own. A write and its
/// fsync take the disk's time, on a hung disk for ever: on an async
/// worker that would stall every connection the worker serves, and in
/// the tick every room's admissions. Here the tick waits at most
/// [`WRITE_WAIT`], and while a write is out tries no other (the records
/// written later cover the ranges, as after a failed write).
pub struct Writer {
    log: Arc<AuditLog>,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    busy: Arc<AtomicBool>,
    /// Records on disk, counted where they land: one late for its tick
    /// lands all the same.
    records: prometheus::IntCounter,
}

type Job = Box<dyn FnOnce(&AuditLog) + Send>;

impl Writer {
    pub fn new(log: AuditLog, records: prometheus::IntCounter) -> std::io::Result<Writer> {
        let log = Arc::new(log);
        let busy = Arc::new(AtomicBool::new(false));
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let (theirs, free) = (log.clone(), busy.clone());
        // Ends when the writer is dropped (its sender with it). Not joined:
        // a write hung on the disk must not hold up a shutdown.
        std::thread::Builder::new()
            .name("varco-audit".into())
            .spawn(move || {
                for job in queue {
                    let done =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&theirs)));
                    if done.is_err() {
                        tracing::error!(
                            "writing the admission log panicked (a bug: please report it)"
                        );
                        free.store(false, Ordering::Release);
                    }
                }
            })?;
        Ok(Writer {
            log,
            jobs: Mutex::new(jobs),
            busy,
            records,
        })
    }

    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// [`AuditLog::baseline`], unless a write is out (it holds the chain):
    /// false then, to be tried again at the next tick.
    pub fn baseline(&self, room: &str, serving: u64) -> bool {
        self.unless_busy(|log| log.baseline(room, serving))
    }

    /// [`AuditLog::baseline_at_start`], for a line this node starts to
    /// log while it runs (a room a reload adds), unless a write is out:
    /// false then.
    pub fn begin(&self, room: &str, serving: u64) -> bool {
        self.unless_busy(|log| log.baseline_at_start(room, serving))
    }

    fn unless_busy(&self, f: impl FnOnce(&AuditLog)) -> bool {
        if self.busy.swap(true, Ordering::AcqRel) {
            return false;
        }
        f(&self.log);
        self.busy.store(false, Ordering::Release);
        true
    }

    /// [`AuditLog::observe`] on the writer's thread, waited for at most
    /// [`WRITE_WAIT`].
    pub async fn observe(&self, room: &str, serving: u64, now_ms: u64) -> Written {
        self.observe_within(room, serving, now_ms, WRITE_WAIT).await
    }

    /// Waits until every write asked for before has landed or failed: for
    /// a reader that wants the log as the ticks left it.
    pub async fn settled(&self) {
        self.on_thread(|_| ()).await;
    }

    /// [`AuditLog::reopen`] on the writer's thread, after the writes
    /// asked for before it (a hung disk holds it up as long as them).
    pub async fn reopen(&self) -> std::io::Result<Reopened> {
        self.on_thread(|log| log.reopen()).await.unwrap_or_else(|| {
            Err(std::io::Error::other(
                "the admission log's writer has ended, or failed reopening",
            ))
        })
    }

    /// Runs `f` on the writer's thread, after every job asked for before
    /// it, and waits for its answer; None if the thread has ended (or `f`
    /// panicked).
    async fn on_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(&AuditLog) -> T + Send + 'static,
    ) -> Option<T> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |log| {
            let _ = answer.send(f(log));
        });
        if !self.send(job) {
            return None;
        }
        answered.await.ok()
    }

    /// Hands `job` to the writer's thread; false if it has ended.
    fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.send(job).is_ok()
    }

    async fn observe_within(
        &self,
        room: &str,
        serving: u64,
        now_ms: u64,
        wait: Duration,
    ) -> Written {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Written::Busy;
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        let (room, busy, records) = (room.to_string(), self.busy.clone(), self.records.clone());
        let job: Job = Box::new(move |log| {
            let r = log.observe(&room, serving, now_ms);
            if let Ok(Some(_)) = r {
                records.inc();
            }
            // Free before the answer: the next tick may follow at once.
            busy.store(false, Ordering::Release);
            let _ = answer.send(r);
        });
        if !self.send(job) {
            self.busy.store(false, Ordering::Release);
            return Written::Failed(std::io::Error::other(
                "the admission log's writer has ended",
            ));
        }
        match tokio::time::timeout(wait, answered).await {
            Ok(Ok(Ok(r))) => Written::Done(r),
            Ok(Ok(Err(e))) => Written::Failed(e),
            Ok(Err(_)) => Written::Failed(std::io::Error::other(
                "the admission log's writer failed mid-write",
            )),
            Err(_) => Written::Late,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(records: &[(&str, u64)]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("admissions.log");
        let log = AuditLog::open(&path, "node-a").unwrap();
        for (i, (room, serving)) in records.iter().enumerate() {
            if log
                .observe(room, *serving, 1_000 * i as u64)
                .unwrap()
                .is_none()
            {
                log.baseline(room, *serving);
            }
        }
        (dir, path)
    }

    /// Bytes put at the end of the log, as other hands (or a write cut
    /// short) would leave them.
    fn append(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir()
                    .join(format!("varco-audit-{}", crate::room::token::random_u128()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// The hash is plain SHA-256, so anyone can forge a record that
    /// checks: one whose range covers every u64, or two whose counts add
    /// past u64, is a break, not a panic or a wrapped count.
    #[test]
    fn a_forged_range_too_wide_to_count_is_a_break() {
        let record = |seq: u64, from: u64, to: u64, prev: &str| {
            let mut r = Record {
                seq,
                room: "a".into(),
                from,
                to,
                time: "2026-12-02T00:00:00Z".into(),
                time_ms: 0,
                node: "n".into(),
                prev: prev.into(),
                hash: String::new(),
            };
            r.hash = r.digest();
            r
        };
        let lines = |rs: &[Record]| {
            rs.iter()
                .map(|r| serde_json::to_string(r).unwrap() + "\n")
                .collect::<String>()
        };
        let whole = record(1, 0, u64::MAX, GENESIS);
        let b = verify(lines(&[whole]).as_bytes()).unwrap_err();
        assert_eq!((b.line, b.seq), (1, Some(1)), "{}", b.reason);
        let first = record(1, 1, u64::MAX - 1, GENESIS);
        let second = record(2, 1, 5, &first.hash);
        let b = verify(lines(&[first, second]).as_bytes()).unwrap_err();
        assert_eq!((b.line, b.seq), (2, Some(2)), "{}", b.reason);
        assert!(b.reason.contains("wider than any count"), "{}", b.reason);
    }

    #[test]
    fn a_chain_verifies_and_continues_across_a_restart() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5), ("b", 0), ("b", 3), ("a", 9)]);
        let s = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!(s.records, 3);
        assert_eq!(s.admitted["a"], 9);
        assert_eq!(s.admitted["b"], 3);
        let log = AuditLog::open(&path, "node-b").unwrap();
        let r = log.observe("a", 12, 99_000).unwrap().unwrap();
        assert_eq!((r.seq, r.from, r.to), (4, 10, 12));
        let s2 = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!(s2.records, 4);
        assert_eq!(r.prev, s.head);
    }

    #[test]
    fn every_kind_of_tampering_is_caught_where_it_happens() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5), ("a", 9), ("a", 14), ("a", 20)]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        let check = |t: String| verify(t.as_bytes()).unwrap_err();
        // A changed range in record 2.
        let edited = text.replacen("\"to\":9", "\"to\":8", 1);
        let b = check(edited);
        assert_eq!((b.seq, b.line), (Some(2), 2), "{b}");
        // A changed range with its hash recomputed: the next record breaks.
        let mut r: Record = serde_json::from_str(lines[1]).unwrap();
        r.to = 8;
        r.hash = r.digest();
        let mut l = lines.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        l[1] = serde_json::to_string(&r).unwrap();
        let b = check(l.join("\n") + "\n");
        assert_eq!((b.seq, b.line), (Some(3), 3), "{b}");
        // A removed record.
        let b = check([lines[0], lines[2], lines[3]].join("\n") + "\n");
        assert_eq!(b.line, 2, "{b}");
        // Two records swapped.
        let b = check([lines[0], lines[2], lines[1], lines[3]].join("\n") + "\n");
        assert_eq!(b.line, 2, "{b}");
        // Garbage.
        let b = check(format!("{}\nnot json\n", lines[0]));
        assert_eq!((b.seq, b.line), (None, 2));
        // The untouched log is fine.
        assert!(verify(text.as_bytes()).is_ok());
    }

    /// A disk that does not answer: the tick waits once, then tries no
    /// write while that one is out; once it lands, the next record covers
    /// every number admitted meanwhile, and readers never waited.
    #[tokio::test]
    // The lock held across the waits is the hung write being tested.
    #[allow(clippy::await_holding_lock)]
    async fn a_hung_write_holds_up_no_tick_and_leaves_no_gap() {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("admissions.log");
        let records = prometheus::IntCounter::new("records", "records").unwrap();
        let w = Writer::new(AuditLog::open(&path, "n").unwrap(), records.clone()).unwrap();
        // A disk that answers is waited for, however slow the test's host;
        // one that hangs, 50 ms.
        let (answers, hangs) = (Duration::from_secs(60), Duration::from_millis(50));
        assert!(w.baseline("a", 0));
        let done = w.observe_within("a", 2, 1_000, answers).await;
        assert!(matches!(done, Written::Done(Some(_))), "{done:?}");
        let first = w.log().committed_len();
        assert_eq!(first, std::fs::metadata(&path).unwrap().len());

        // The chain held as a hung write would hold it.
        let hung = w.log.chain.lock().unwrap();
        let bounded = |f| tokio::time::timeout(Duration::from_secs(5), f);
        let late = bounded(w.observe_within("a", 5, 2_000, hangs))
            .await
            .expect("the wait is bounded");
        assert!(matches!(late, Written::Late), "{late:?}");
        let busy = bounded(w.observe_within("a", 6, 3_000, hangs))
            .await
            .unwrap();
        assert!(matches!(busy, Written::Busy), "{busy:?}");
        assert!(!w.baseline("b", 0), "a baseline waits for the write too");
        assert_eq!(w.log().committed_len(), first, "read without the chain");
        drop(hung);

        // The late write lands.
        w.settled().await;
        let next = w.observe_within("a", 7, 4_000, answers).await;
        let Written::Done(Some(r)) = next else {
            panic!("the disk answers again: {next:?}");
        };
        assert_eq!((r.from, r.to), (6, 7));
        let text = std::fs::read_to_string(&path).unwrap();
        let ranges: Vec<(u64, u64)> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .map(|r| (r.from, r.to))
            .collect();
        assert_eq!(ranges, [(1, 2), (3, 5), (6, 7)]);
        assert_eq!(records.get(), 3, "the late record counted too");
        assert_eq!(verify(text.as_bytes()).unwrap().admitted["a"], 7);
        assert_eq!(w.log().committed_len(), text.len() as u64);
    }

    /// A log damaged by other hands (a byte that is not UTF-8) still
    /// opens: the start goes on, and `audit verify` names the damage.
    #[test]
    fn a_log_that_is_not_utf8_does_not_stop_a_start() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5)]);
        append(&path, b"\xff\xfe not a record\n");
        let log = AuditLog::open(&path, "n").unwrap();
        let r = log.observe("a", 9, 5_000).unwrap().unwrap();
        assert_eq!((r.seq, r.from, r.to), (2, 6, 9), "the chain goes on");
        let b = verify(File::open(&path).unwrap()).unwrap_err();
        assert_eq!(b.line, 2, "{b}");
    }

    #[test]
    fn a_torn_last_line_is_dropped_at_open() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5), ("a", 9)]);
        append(&path, b"{\"seq\":3,\"room\":\"a\",\"fr");
        // Not a break: being written, or cut short by a crash.
        let s = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!((s.records, s.unfinished), (2, Some((1, 3))));
        let log = AuditLog::open(&path, "n").unwrap();
        log.observe("a", 11, 5_000).unwrap().unwrap();
        let s = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!((s.records, s.admitted["a"], s.unfinished), (3, 11, None));
    }

    /// The log rotated as logrotate does (renamed, then varco told): the
    /// records go on in a new file at the path, and the two files verify
    /// as one chain; the new one alone, only as a continuation.
    #[test]
    fn a_rotated_log_goes_on_in_a_new_file_as_one_chain() {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("admissions.log");
        let old = dir.0.join("admissions.log.1");
        let log = AuditLog::open(&path, "n").unwrap();
        log.baseline("a", 0);
        log.observe("a", 5, 1_000).unwrap().unwrap();
        let head = log.observe("a", 9, 2_000).unwrap().unwrap().hash;
        assert_eq!(log.reopen().unwrap(), Reopened::Same);

        std::fs::rename(&path, &old).unwrap();
        // Until it is told, varco writes on in the renamed file, and a
        // reader asking for the log is told why it cannot have it.
        let r = log.observe("a", 12, 3_000).unwrap().unwrap();
        assert!(log.open_committed().is_err());
        std::fs::write(&path, "").unwrap();
        let e = log.open_committed().unwrap_err();
        assert!(e.to_string().contains("SIGUSR1"), "{e}");

        assert_eq!(log.reopen().unwrap(), Reopened::Moved { next: 4 });
        let (_, len) = log.open_committed().unwrap();
        assert_eq!(len, 0);
        let next = log.observe("a", 20, 4_000).unwrap().unwrap();
        assert_eq!((next.seq, next.from, next.to), (4, 13, 20));
        assert_eq!(next.prev, r.hash);
        assert_ne!(r.hash, head);
        let (_, len) = log.open_committed().unwrap();
        assert_eq!(len, std::fs::metadata(&path).unwrap().len());

        let mut both = Verifier::new();
        both.file(File::open(&old).unwrap()).unwrap();
        both.file(File::open(&path).unwrap()).unwrap();
        let s = both.summary();
        assert_eq!((s.records, s.admitted["a"]), (4, 20));
        assert_eq!((s.continued_from, s.new_chains), (None, vec![]));

        let b = verify(File::open(&path).unwrap()).unwrap_err();
        assert_eq!((b.file, b.line, b.seq), (1, 1, Some(4)), "{b}");
        assert!(b.reason.contains("--continues"), "{b}");
        let mut alone = Verifier::new().continuing();
        alone.file(File::open(&path).unwrap()).unwrap();
        let s = alone.summary();
        assert_eq!(s.continued_from, Some((4, r.hash.clone())));
        assert_eq!((s.records, s.admitted["a"]), (1, 8));
        // In the wrong order, the chain breaks.
        let mut swapped = Verifier::new().continuing();
        swapped.file(File::open(&path).unwrap()).unwrap();
        let b = swapped.file(File::open(&old).unwrap()).unwrap_err();
        assert_eq!((b.file, b.line, b.seq), (2, 1, Some(1)), "{b}");
    }

    /// A start after a rotation, before a record was written in the new
    /// file, goes on from the head the rotation left: the files verify as
    /// one chain.
    #[test]
    fn a_start_after_a_rotation_goes_on_from_the_head_it_left() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5)]);
        let old = path.with_extension("log.1");
        let log = AuditLog::open(&path, "n").unwrap();
        std::fs::rename(&path, &old).unwrap();
        assert!(matches!(log.reopen().unwrap(), Reopened::Moved { next: 2 }));
        drop(log);
        let log = AuditLog::open(&path, "n").unwrap();
        log.baseline("a", 5);
        assert!(head_path(&path).exists());
        let r = log.observe("a", 7, 9_000).unwrap().unwrap();
        assert_eq!(r.seq, 2, "the chain goes on");
        assert!(
            !head_path(&path).exists(),
            "used: gone with the first record"
        );
        let mut v = Verifier::new();
        v.file(File::open(&old).unwrap()).unwrap();
        v.file(File::open(&path).unwrap()).unwrap();
        let s = v.summary();
        assert_eq!((s.records, s.new_chains), (2, vec![]));
        assert_eq!(s.admitted["a"], 7);
    }

    /// A crash after a rotation, before the new file's first record: what
    /// was called after the last record in the file before is logged at
    /// the next start, though the snapshot kept the counters past it.
    #[test]
    fn a_crash_after_a_rotation_leaves_no_number_out() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5)]);
        let log = AuditLog::open(&path, "n").unwrap();
        std::fs::rename(&path, path.with_extension("log.1")).unwrap();
        log.reopen().unwrap();
        drop(log);
        let log = AuditLog::open(&path, "n").unwrap();
        log.baseline_at_start("a", 9);
        let r = log.observe("a", 12, 9_000).unwrap().unwrap();
        assert_eq!((r.seq, r.from, r.to), (2, 6, 12));
    }

    /// A start with nothing at the log's path and no head left (the log
    /// removed by hand) begins a new chain: the files still verify, and
    /// the summary says where the chain began again. Only at a file's
    /// start: within a file, a record 1 is a break.
    #[test]
    fn a_new_chain_may_begin_only_at_the_start_of_a_file() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5)]);
        let old = path.with_extension("log.1");
        std::fs::rename(&path, &old).unwrap();
        let log = AuditLog::open(&path, "n").unwrap();
        log.baseline("a", 5);
        let r = log.observe("a", 7, 9_000).unwrap().unwrap();
        assert_eq!((r.seq, r.prev.as_str()), (1, GENESIS));
        let mut v = Verifier::new();
        v.file(File::open(&old).unwrap()).unwrap();
        v.file(File::open(&path).unwrap()).unwrap();
        let s = v.summary();
        assert_eq!((s.records, s.new_chains), (2, vec![2]));
        assert_eq!(s.admitted["a"], 7);

        let joined =
            std::fs::read_to_string(&old).unwrap() + &std::fs::read_to_string(&path).unwrap();
        let b = verify(joined.as_bytes()).unwrap_err();
        assert_eq!((b.line, b.seq), (2, Some(1)), "{b}");
    }

    /// A line left unfinished is allowed at the very end only.
    #[test]
    fn an_unfinished_line_before_another_file_is_a_break() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5)]);
        append(&path, b"{\"seq\":2,");
        let mut v = Verifier::new();
        v.file(File::open(&path).unwrap()).unwrap();
        let b = v.file(&b""[..]).unwrap_err();
        assert_eq!((b.file, b.line), (2, 1), "{b}");
        assert!(b.reason.contains("unfinished"), "{b}");
    }
}
