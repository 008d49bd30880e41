//! Whether several admission logs together record every number a room
//! called once: `varco audit ranges`. Each log's chain proves nothing
//! was changed in it; a cluster keeps one log per node (each writes the
//! ranges it advanced while it held the lease), so a number called while
//! no log was kept (the lease lapsing, a handover that logged from too
//! far on) is in none of them, and no chain breaks. Merged by time per
//! room, the ranges must follow on: a number in no record is a gap.

use std::collections::{BTreeMap, BTreeSet};

use super::Record;

/// A record, and where it was read (1-based file and line).
#[derive(Debug, Clone)]
pub struct Placed {
    pub file: usize,
    pub line: usize,
    pub record: Record,
}

/// What the ranges of one room, merged, say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `from..=to` are in no record: called between `before` and `after`
    /// (their files and lines), and logged by no node.
    Gap {
        room: String,
        from: u64,
        to: u64,
        before: (usize, usize),
        after: (usize, usize),
    },
    /// The record at `at` begins at `back_to`, after numbers up to
    /// `past` were recorded: a new run (a start without the snapshot, a
    /// Redis that lost its data), or numbers called again after a crash.
    /// Nobody is left out; said so an auditor knows why counts repeat.
    Back {
        room: String,
        back_to: u64,
        past: u64,
        at: (usize, usize),
    },
}

/// One room's records, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Room {
    pub records: u64,
    /// The first number recorded and the last (in time order).
    pub first: u64,
    pub last: u64,
    pub nodes: BTreeSet<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    pub rooms: BTreeMap<String, Room>,
    pub findings: Vec<Finding>,
}

impl Coverage {
    pub fn gaps(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| matches!(f, Finding::Gap { .. }))
            .count()
    }
}

/// Merges `records` by room, in time order (the records of one node's
/// tick before another's; at the same millisecond, by number), and walks
/// each room's ranges. The nodes' clocks must be in step: a handover
/// logged by a clock behind the last leader's reads as a gap followed by
/// a repeat.
pub fn merge(mut records: Vec<Placed>) -> Coverage {
    records.sort_by(|a, b| {
        let key = |p: &Placed| (p.record.time_ms, p.record.from, p.record.to);
        a.record.room.cmp(&b.record.room).then(key(a).cmp(&key(b)))
    });
    let mut c = Coverage::default();
    // Per room: the next number expected, and where the last record was.
    let mut next: BTreeMap<String, (u64, (usize, usize))> = BTreeMap::new();
    for p in records {
        let r = &p.record;
        let at = (p.file, p.line);
        let room = c.rooms.entry(r.room.clone()).or_default();
        if room.records == 0 {
            room.first = r.from;
        }
        room.records += 1;
        room.last = r.to;
        room.nodes.insert(r.node.clone());
        if let Some(&(expected, before)) = next.get(&r.room) {
            if r.from > expected {
                c.findings.push(Finding::Gap {
                    room: r.room.clone(),
                    from: expected,
                    to: r.from - 1,
                    before,
                    after: at,
                });
            } else if r.from < expected {
                c.findings.push(Finding::Back {
                    room: r.room.clone(),
                    back_to: r.from,
                    past: expected - 1,
                    at,
                });
            }
        }
        next.insert(r.room.clone(), (r.to.saturating_add(1), at));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(file: usize, line: usize, room: &str, from: u64, to: u64, at: u64) -> Placed {
        Placed {
            file,
            line,
            record: Record {
                seq: line as u64,
                room: room.into(),
                from,
                to,
                time: String::new(),
                time_ms: at,
                node: format!("node{file}"),
                prev: String::new(),
                hash: String::new(),
            },
        }
    }

    #[test]
    fn two_nodes_ranges_that_follow_on_cover_the_room() {
        let c = merge(vec![
            placed(2, 1, "a", 4, 6, 3_000),
            placed(1, 1, "a", 1, 3, 1_000),
            placed(1, 2, "b", 1, 9, 1_000),
            placed(2, 2, "a", 7, 7, 4_000),
        ]);
        assert_eq!(c.findings, []);
        let a = &c.rooms["a"];
        assert_eq!((a.records, a.first, a.last), (3, 1, 7));
        assert_eq!(a.nodes.len(), 2);
        assert_eq!(c.rooms["b"].last, 9);
    }

    #[test]
    fn numbers_in_no_record_are_a_gap_between_the_records_around_them() {
        let c = merge(vec![
            placed(1, 1, "a", 1, 3, 1_000),
            placed(2, 1, "a", 7, 9, 3_000),
        ]);
        assert_eq!(
            c.findings,
            [Finding::Gap {
                room: "a".into(),
                from: 4,
                to: 6,
                before: (1, 1),
                after: (2, 1),
            }]
        );
        assert_eq!(c.gaps(), 1);
    }

    #[test]
    fn a_range_that_goes_back_is_said_and_followed_from_there() {
        let c = merge(vec![
            placed(1, 1, "a", 1, 50, 1_000),
            placed(1, 2, "a", 1, 4, 2_000),
            placed(1, 3, "a", 5, 8, 3_000),
        ]);
        assert_eq!(
            c.findings,
            [Finding::Back {
                room: "a".into(),
                back_to: 1,
                past: 50,
                at: (1, 2),
            }]
        );
        assert_eq!(c.gaps(), 0);
    }
}
