//! What a citizen, a portal's developer or an auditor runs to check the
//! queue without trusting varco's word: `varco receipt verify`,
//! `varco lottery verify`, `varco audit verify` and `varco audit export`.
//! Each returns what to print and whether the check passed.

use std::io::Write;
use std::path::Path;

use clap::Subcommand;

use crate::audit;
use crate::config::Config;
use crate::room::lottery::{self, Lottery};
use crate::room::receipt;

#[derive(Subcommand)]
pub enum ReceiptAction {
    /// Is this receipt (room-number-time-code, as the waiting page shows
    /// it) or ticket (the cookie) genuine? Prints its room, number and
    /// arrival time.
    Verify {
        /// The config whose keys issued it.
        #[arg(long, short)]
        config: std::path::PathBuf,
        receipt: String,
    },
}

#[derive(Subcommand)]
pub enum LotteryAction {
    /// Where pre-queue ticket P landed, from the seed varco revealed at
    /// the opening and the number of pre-queue tickets.
    Verify {
        /// The seed in hex, as the status published it at the opening.
        #[arg(long)]
        seed: String,
        /// How many pre-queue tickets there were.
        #[arg(long)]
        size: u64,
        /// The pre-queue number (P17 on a receipt is 17).
        #[arg(long)]
        position: String,
        /// The SHA-256 published before the pre-queue opened: checked
        /// against the seed.
        #[arg(long)]
        commitment: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AuditAction {
    /// Checks a log's hash chain; names the record where it breaks.
    Verify {
        /// The log file, or - for standard input. A log rotated into
        /// several files: all of them, oldest first, checked as one chain.
        #[arg(required = true)]
        files: Vec<String>,
        /// Lets the first file begin past record 1: a rotated file checked
        /// without the files before it.
        #[arg(long)]
        continues: bool,
    },
    /// Checks that several logs together (a cluster's nodes', each
    /// checked alone as a chain) record every number each room called:
    /// exit 1 naming each range in no record.
    Ranges {
        /// Every node's log files, in any order (merged by time); a
        /// rotated log's files each on their own.
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// Prints the admission log of a config (checked first) as JSON lines.
    Export {
        #[arg(long, short)]
        config: std::path::PathBuf,
    },
}

pub struct Outcome {
    pub ok: bool,
    pub text: String,
}

fn fail(text: impl Into<String>) -> Outcome {
    Outcome {
        ok: false,
        text: text.into(),
    }
}

pub fn receipt(action: ReceiptAction) -> Outcome {
    let ReceiptAction::Verify { config, receipt } = action;
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {e}", config.display())),
    };
    if cfg.raw.secrets.keys_made_up() {
        return fail("this config's key is made at start and dies with the process: ask the running varco instead (admin API: GET /api/receipts/RECEIPT)");
    }
    match receipt::verify(&cfg.keys, &receipt) {
        Ok(v) => Outcome {
            ok: true,
            text: format!(
                "genuine: room {}, ticket {}, arrived {} (key {}, from the {})",
                v.receipt.room,
                v.receipt.number_label(),
                crate::timefmt::rfc3339(v.receipt.arrived * 1000),
                v.key_id,
                v.from
            ),
        },
        Err(why) => fail(format!("not genuine: {why}")),
    }
}

pub fn lottery(action: LotteryAction) -> Outcome {
    let LotteryAction::Verify {
        seed,
        size,
        position,
        commitment,
    } = action;
    let Some(seed_bytes) = lottery::from_hex(&seed).filter(|s| !s.is_empty()) else {
        return fail("--seed: not hex");
    };
    let Ok(pre) = position.trim_start_matches(['P', 'p']).parse::<u64>() else {
        return fail("--position: a pre-queue number such as 17 or P17");
    };
    let mut text = String::new();
    if let Some(c) = commitment {
        let actual = lottery::commitment(&seed_bytes);
        if !actual.eq_ignore_ascii_case(c.trim()) {
            return fail(format!(
                "the seed does NOT match the commitment: its SHA-256 is {actual}"
            ));
        }
        text.push_str("the seed matches the commitment published before the opening\n");
    }
    match Lottery::new(&seed_bytes, size).place(pre) {
        Some(place) => {
            text.push_str(&format!(
                "pre-queue ticket P{pre} of {size} landed at place {place}"
            ));
            Outcome { ok: true, text }
        }
        None => fail(format!(
            "--position {pre} is not between 1 and --size {size}"
        )),
    }
}

/// `varco audit`; `export` writes the log to `out` (the text is then
/// empty), streamed: a log of a busy day is hundreds of MB. A reader that
/// stops reading (`| head`) ends it, as it ends `cat`.
pub fn audit(action: AuditAction, out: &mut impl Write) -> Outcome {
    match action {
        AuditAction::Verify { files, continues } => verify_files(&files, continues),
        AuditAction::Ranges { files } => ranges_files(&files),
        AuditAction::Export { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(format!("{}: {e}", config.display())),
            };
            let Some(path) = cfg.audit_log else {
                return fail("this config has no audit.log");
            };
            let mut log = match export(&path) {
                Ok(log) => log,
                Err(e) => return fail(e),
            };
            match log.write_to(out) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    fail(format!("cannot write the log out: {e}"))
                }
                _ => Outcome {
                    ok: true,
                    text: String::new(),
                },
            }
        }
    }
}

/// `varco audit verify`: the files as one chain, oldest first.
fn verify_files(files: &[String], continues: bool) -> Outcome {
    let mut v = audit::Verifier::new();
    if continues {
        v = v.continuing();
    }
    for file in files {
        let checked = if file == "-" {
            v.file(std::io::stdin().lock())
        } else {
            match std::fs::File::open(file) {
                Ok(f) => v.file(f),
                Err(e) => return fail(format!("cannot read {file}: {e}")),
            }
        };
        if let Err(b) = checked {
            return fail(match files.len() {
                1 => b.to_string(),
                _ => format!("{file}: {b}"),
            });
        }
    }
    let s = v.summary();
    let name = |n: usize| files.get(n - 1).map_or("-", |f| f.as_str());
    let mut rooms: Vec<_> = s.admitted.iter().collect();
    rooms.sort();
    let per_room: Vec<String> = rooms.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    let mut text = format!(
        "ok: {} records, chain intact, head {}\nadmitted: {}",
        s.records,
        s.head,
        if per_room.is_empty() {
            "none".into()
        } else {
            per_room.join(", ")
        }
    );
    if let Some((seq, prev)) = &s.continued_from {
        text.push_str(&format!(
            "\ncontinues a chain: the first record is {seq}, after a record whose hash is {prev}: check that against the file before it, or a head written down"
        ));
    }
    for &file in &s.new_chains {
        text.push_str(&format!(
            "\na new chain begins at {} (record 1: varco started with no log at its path); the records before it are not linked to it",
            name(file)
        ));
    }
    if let Some((file, line)) = s.unfinished {
        text.push_str(&format!(
            "\nnot counted: an unfinished last line, {} line {line} (a record being written, or one a crash cut short, which varco drops at its next start)",
            name(file)
        ));
    }
    Outcome { ok: true, text }
}

/// `varco audit ranges`: the files' records merged per room, each file's
/// chain checked on its own (as a continuation: a rotated file begins
/// past record 1), its records as checked (a last line not ended is not
/// part of a log yet).
fn ranges_files(files: &[String]) -> Outcome {
    use audit::ranges::{self, Finding, Placed};
    let mut placed = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let reader = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) => return fail(format!("cannot read {file}: {e}")),
        };
        let mut v = audit::Verifier::new().continuing().keeping();
        if let Err(b) = v.file(reader) {
            return fail(format!("{file}: {b}"));
        }
        placed.extend(v.kept().into_iter().map(|(line, record)| Placed {
            file: i + 1,
            line,
            record,
        }));
    }
    let whence: std::collections::HashMap<(usize, usize), (String, String)> = placed
        .iter()
        .map(|p| {
            let r = &p.record;
            ((p.file, p.line), (r.node.clone(), r.time.clone()))
        })
        .collect();
    let at = |(file, line): (usize, usize)| {
        let (node, time) = &whence[&(file, line)];
        format!("{} line {line} ({node}, {time})", files[file - 1])
    };
    let c = ranges::merge(placed);
    if c.rooms.is_empty() {
        return fail(format!(
            "no records in the {} files given: nothing to check",
            files.len()
        ));
    }
    let gaps = c.gaps();
    let mut text = if gaps == 0 {
        format!(
            "ok: every number called is in a record ({} files merged)",
            files.len()
        )
    } else {
        let ranges = if gaps == 1 { "range" } else { "ranges" };
        format!("{gaps} {ranges} called and in no record")
    };
    for f in &c.findings {
        text.push('\n');
        text.push_str(&match f {
            Finding::Gap {
                room,
                from,
                to,
                before,
                after,
            } => match before {
                Some(before) => format!(
                    "{room}: {from} to {to} are in no record: called after {} and before {}",
                    at(*before),
                    at(*after)
                ),
                None => format!(
                    "{room}: {from} to {to} are in no record: called before the room's first record, {} (a file before it not given, or a log begun mid-run)",
                    at(*after)
                ),
            },
            Finding::Back {
                room,
                back_to,
                past,
                at: here,
            } => format!(
                "{room}: {} goes back to {back_to} after {past}: a new run (a start without the snapshot, a Redis that lost its data), numbers called again after a crash, or a lease handover logged from a little before; nobody is left out",
                at(*here)
            ),
        });
    }
    for (room, r) in &c.rooms {
        let nodes: Vec<&str> = r.nodes.iter().map(String::as_str).collect();
        text.push_str(&format!(
            "\n{room}: {} to {} in {} records, by {}",
            r.first,
            r.last,
            r.records,
            nodes.join(", ")
        ));
    }
    Outcome {
        ok: gaps == 0,
        text,
    }
}

/// A log whose chain holds, to be written out as it was checked: the
/// first `len` bytes of the file opened (the same file after a rotation
/// renamed it meanwhile).
struct Exported {
    file: std::fs::File,
    len: u64,
}

impl Exported {
    fn write_to(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        use std::io::{Read, Seek};
        self.file.rewind()?;
        std::io::copy(&mut (&self.file).take(self.len), out)?;
        out.flush()?;
        // Only appended to, what was checked is what went out; shorter,
        // varco took a record back (a write it could not make durable)
        // meanwhile, and what went out may not be what was checked.
        if self.file.metadata()?.len() < self.len {
            return Err(std::io::Error::other(
                "the log was cut back while it was exported (a record varco could not make durable): export it again",
            ));
        }
        Ok(())
    }
}

/// The log, if its chain holds; otherwise where it breaks. Read to its
/// last whole line: a running varco may be writing the next record (or
/// undoing one it could not make durable), and a line it has not ended
/// is not part of the log yet, as varco itself drops such a line when it
/// opens the log again. Read as it goes, never whole in memory.
fn export(path: &Path) -> Result<Exported, String> {
    use std::io::Read;
    let cannot = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(cannot)?;
    let len = whole_lines(&file).map_err(cannot)?;
    // Bytes, not text: a line that is not UTF-8 is the verifier's to
    // name, with its number, as `audit verify` does. After a rotation
    // the file at the path goes on from the one before.
    let mut v = audit::Verifier::new().continuing();
    v.file((&file).take(len))
        .map_err(|b| format!("{}: {b}", path.display()))?;
    Ok(Exported { file, len })
}

/// How many bytes of `file` end with its last line feed (0: none).
fn whole_lines(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut end = file.metadata()?.len();
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let from = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - from) as usize];
        file.read_exact_at(part, from)?;
        if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
            return Ok(from + i as u64 + 1);
        }
        end = from;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log `export` writes out, as text; or where its chain breaks.
    fn exported(path: &Path) -> Outcome {
        match export(path) {
            Ok(mut log) => {
                let mut out = Vec::new();
                log.write_to(&mut out).unwrap();
                Outcome {
                    ok: true,
                    text: String::from_utf8(out).unwrap(),
                }
            }
            Err(e) => fail(e),
        }
    }

    /// Longer than the chunk a last line feed is looked for in: found
    /// in the chunk before, and a piece of a record after it left out.
    #[test]
    fn a_log_past_one_chunk_is_exported_to_its_last_whole_line() {
        let (dir, path, log) = logged_to_5("long");
        for (i, serving) in (6..2_000).enumerate() {
            log.observe("a", serving, 2_000 + i as u64).unwrap();
        }
        let whole = std::fs::read_to_string(&path).unwrap();
        assert!(whole.len() > 128 * 1024, "{}", whole.len());
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&[b'x'; 70 * 1024]).unwrap();
        drop(f);
        let out = exported(&path);
        assert!(out.ok, "{}", out.text);
        assert_eq!(out.text, whole);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A folder of its own for test `name`, and an admission log in it
    /// whose first record admitted room `a`'s 1 to 5.
    fn logged_to_5(name: &str) -> (std::path::PathBuf, std::path::PathBuf, audit::AuditLog) {
        let dir = std::env::temp_dir().join(format!("varco-export-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admissions.log");
        let log = audit::AuditLog::open(&path, "node-a").unwrap();
        log.baseline("a", 0);
        log.observe("a", 5, 1_000).unwrap();
        (dir, path, log)
    }

    /// Two nodes' logs, the second taking over at `from`: together they
    /// cover the room only if it follows on from the first's last.
    #[test]
    fn two_nodes_logs_are_merged_and_a_range_in_neither_is_named() {
        let dir = std::env::temp_dir().join(format!("varco-ranges-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let two = |name: &str, from: u64| {
            let (one, two) = (
                dir.join(format!("{name}-1.log")),
                dir.join(format!("{name}-2.log")),
            );
            let a = audit::AuditLog::open(&one, "node-a").unwrap();
            a.baseline("a", 0);
            a.observe("a", 5, 1_000).unwrap();
            a.observe("a", 9, 2_000).unwrap();
            let b = audit::AuditLog::open(&two, "node-b").unwrap();
            b.baseline("a", from - 1);
            b.observe("a", from + 3, 3_000).unwrap();
            // Given newest first: merged by time.
            let files = [two, one].map(|p| p.display().to_string());
            (ranges_files(&files), files)
        };
        let (out, _) = two("handed-over", 10);
        assert!(out.ok, "{}", out.text);
        assert!(
            out.text
                .contains("a: 1 to 13 in 3 records, by node-a, node-b"),
            "{}",
            out.text
        );

        let (out, files) = two("gap", 12);
        assert!(!out.ok, "{}", out.text);
        let named = format!(
            "a: 10 to 11 are in no record: called after {} line 2 (node-a, {}) and before {} line 1 (node-b, {})",
            files[1],
            crate::timefmt::rfc3339(2_000),
            files[0],
            crate::timefmt::rfc3339(3_000)
        );
        assert!(out.text.contains(&named), "{}", out.text);
        // The second node's log alone: the numbers before its first
        // record are in none of the files given.
        let out = ranges_files(&files[..1]);
        assert!(!out.ok, "{}", out.text);
        let named = format!(
            "a: 1 to 11 are in no record: called before the room's first record, {} line 1 (node-b, {})",
            files[0],
            crate::timefmt::rfc3339(3_000)
        );
        assert!(out.text.contains(&named), "{}", out.text);

        let (out, _) = two("again", 3);
        assert!(out.ok, "numbers again leave nobody out: {}", out.text);
        assert!(out.text.contains("goes back to 3 after 9"), "{}", out.text);

        // Each file's chain is checked: an edited range is no merge.
        let edited =
            std::fs::read_to_string(&files[1])
                .unwrap()
                .replacen("\"to\":9", "\"to\":11", 1);
        std::fs::write(&files[1], edited).unwrap();
        let out = ranges_files(&files);
        assert!(
            !out.ok && out.text.contains("hash does not match"),
            "{}",
            out.text
        );

        // Nothing recorded is nothing shown: no "ok".
        let empty = dir.join("empty.log");
        std::fs::write(&empty, "").unwrap();
        let out = ranges_files(&[empty.display().to_string()]);
        assert!(!out.ok && out.text.contains("no records"), "{}", out.text);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// After a rotation the file at the log's path begins past record 1:
    /// it is exported all the same, and a broken one still is not.
    #[test]
    fn a_rotated_log_is_exported_from_where_it_goes_on() {
        let (dir, path, log) = logged_to_5("rotated");
        std::fs::rename(&path, dir.join("admissions.log.1")).unwrap();
        log.reopen().unwrap();
        log.observe("a", 9, 2_000).unwrap();
        log.observe("a", 12, 3_000).unwrap();
        let out = exported(&path);
        assert!(out.ok, "{}", out.text);
        assert_eq!(out.text.lines().count(), 2);
        let edited = std::fs::read_to_string(&path)
            .unwrap()
            .replacen("\"to\":9", "\"to\":8", 1);
        std::fs::write(&path, edited).unwrap();
        assert!(!exported(&path).ok);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A line that is not UTF-8 is named, with its number, as `audit
    /// verify` names it.
    #[test]
    fn a_line_that_is_not_text_is_named() {
        let (dir, path, _log) = logged_to_5("bytes");
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"\xff\n").unwrap();
        drop(f);
        let out = exported(&path);
        assert!(!out.ok);
        assert!(out.text.contains("line 2"), "{}", out.text);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_record_being_written_is_not_exported_nor_a_broken_chain() {
        let (dir, path, log) = logged_to_5("written");
        log.observe("a", 9, 2_000).unwrap();
        let whole = std::fs::read_to_string(&path).unwrap();
        assert_eq!(whole.lines().count(), 2, "two records: {whole}");
        // varco is appending the next record: half of it is on disk.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":3,\"room\":\"a\",\"fr").unwrap();
        drop(f);
        let out = exported(&path);
        assert!(out.ok, "{}", out.text);
        assert_eq!(out.text, whole);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
