//! The admission log: an append-only, hash-chained record of who was let
//! in, for auditors. Each record says which range of ticket numbers a
//! room's serving counter admitted, when, and on which node, and carries
//! the SHA-256 of the record before it: editing, removing or reordering
//! any record breaks every hash after it, and `varco audit verify` names
//! the record where the chain breaks.
//!
//! One JSON object per line. Only the node that advances the counters
//! (always, alone; the lease holder in a cluster) writes, and each record
//! is on disk (fsync) before the next tick.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

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
}

/// Checks a whole log: every line a record, seq 1, 2, 3..., each `prev`
/// the hash of the one before, each hash right.
pub fn verify(reader: impl Read) -> Result<Summary, Break> {
    let mut head = GENESIS.to_string();
    let mut expected_seq = 1;
    let mut admitted: HashMap<String, u64> = HashMap::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line_no = i + 1;
        let fail = |seq, reason: String| Break {
            line: line_no,
            seq,
            reason,
        };
        let line = line.map_err(|e| fail(None, format!("cannot read: {e}")))?;
        let r: Record =
            serde_json::from_str(&line).map_err(|e| fail(None, format!("not a record: {e}")))?;
        if r.seq != expected_seq {
            return Err(fail(
                Some(r.seq),
                format!(
                    "expected record {expected_seq} here (a record was removed, added or moved)"
                ),
            ));
        }
        if r.prev != head {
            return Err(fail(
                Some(r.seq),
                "its prev is not the hash of the record before (a record before it was changed or removed)".into(),
            ));
        }
        if r.digest() != r.hash {
            return Err(fail(
                Some(r.seq),
                "its hash does not match its content (this record was changed)".into(),
            ));
        }
        if r.to < r.from {
            return Err(fail(Some(r.seq), "its range ends before it starts".into()));
        }
        // Anyone can write a record whose plain hash checks: a range as
        // wide as u64 must be a break, not an overflow.
        let total = admitted.entry(r.room.clone()).or_default();
        *total = (r.to - r.from)
            .checked_add(1)
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| {
                fail(
                    Some(r.seq),
                    "its range is wider than any count of people".into(),
                )
            })?;
        head = r.hash;
        expected_seq += 1;
    }
    Ok(Summary {
        records: expected_seq - 1,
        head,
        admitted,
    })
}

struct Chain {
    file: File,
    seq: u64,
    head: String,
    /// Per room: the serving counter already logged.
    logged: HashMap<String, u64>,
}

pub struct AuditLog {
    path: PathBuf,
    node: String,
    chain: Mutex<Chain>,
}

impl AuditLog {
    /// Opens (or creates) the log and continues its chain. A last line cut
    /// short by a crash mid-write is dropped (it was never complete, and
    /// the counters it would have logged are logged again); any other
    /// damage is left for `varco audit verify` to report.
    pub fn open(path: &Path, node: &str) -> std::io::Result<AuditLog> {
        let (mut seq, mut head, mut logged) = (0, GENESIS.to_string(), HashMap::new());
        if path.exists() {
            let mut text = std::fs::read_to_string(path)?;
            if !text.is_empty() && !text.ends_with('\n') {
                let keep = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
                tracing::warn!(path = %path.display(), "the admission log ends in a partial record (a crash mid-write): dropping it");
                text.truncate(keep);
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(keep as u64)?;
                f.sync_all()?;
            }
            for line in text.lines() {
                if let Ok(r) = serde_json::from_str::<Record>(line) {
                    seq = r.seq;
                    head = r.hash.clone();
                    logged.insert(r.room.clone(), r.to);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            node: node.to_string(),
            chain: Mutex::new(Chain {
                file,
                seq,
                head,
                logged,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How long the log is with only whole records in it: read under the
    /// chain's lock, so never in the middle of a record being written or
    /// taken back.
    pub fn committed_len(&self) -> std::io::Result<u64> {
        let c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        Ok(c.file.metadata()?.len())
    }

    /// Starts counting a room from `serving` without logging: when this
    /// node starts advancing a room it did not log before (a new room, or
    /// a lease taken over from another node that logged the rest).
    pub fn baseline(&self, room: &str, serving: u64) {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        c.logged.insert(room.to_string(), serving);
    }

    /// As `baseline`, unless the log already follows this room (a restart
    /// continues from its last record).
    pub fn baseline_if_new(&self, room: &str, serving: u64) {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        c.logged.entry(room.to_string()).or_insert(serving);
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
        Ok(Some(r))
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

    #[test]
    fn a_torn_last_line_is_dropped_at_open() {
        let (_d, path) = log_with(&[("a", 0), ("a", 5), ("a", 9)]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":3,\"room\":\"a\",\"fr").unwrap();
        drop(f);
        assert!(verify(File::open(&path).unwrap()).is_err());
        let log = AuditLog::open(&path, "n").unwrap();
        log.observe("a", 11, 5_000).unwrap().unwrap();
        let s = verify(File::open(&path).unwrap()).unwrap();
        assert_eq!((s.records, s.admitted["a"]), (3, 11));
    }
}
