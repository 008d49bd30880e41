//! Whether several admission logs together record every number a room
//! called once: `varco audit ranges`. Each log's chain proves nothing
//! was changed in it; a cluster keeps one log per node (each writes the
//! ranges it advanced while it held the lease), so a number called while
//! no log was kept (the lease lapsing, a handover that logged from too
//! far on) is in none of them, and no chain breaks. Merged by time per
//! room, the ranges must follow on: a number in no record is a gap.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    /// (their files and lines), and logged by no node. No `before`: the
    /// room's first record begins past 1 (every run numbers from 1), so
    /// the numbers before it are in none of the files given (an earlier
    /// file left out, a log begun mid-run or with its first lines cut).
    Gap {
        room: String,
        from: u64,
        to: u64,
        before: Option<(usize, usize)>,
        after: (usize, usize),
    },
    /// The record at `at` begins at `back_to`, after numbers up to
    /// `past` were recorded: a new run (a start without the snapshot, a
    /// Redis that lost its data: back to 1), numbers called again after
    /// a crash, or a lease handover logged from a little before. Nobody
    /// is left out; said so an auditor knows why counts repeat.
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

/// Merges `records` by room, in time order, and walks each room's
/// ranges. Each file keeps its own order (a k-way merge of the files, a
/// record placed by the latest time of its file so far): a node's clock
/// stepped back, or two records in the same millisecond, move none of a
/// file's records before its earlier ones. Across files the times must
/// be on one clock (a cluster's nodes write Redis's): a handover logged
/// by a clock behind the last leader's by more than the time between
/// their records reads as a gap followed by a repeat.
pub fn merge(mut records: Vec<Placed>) -> Coverage {
    records.sort_by_key(|p| (p.file, p.line));
    let mut latest: BTreeMap<usize, u64> = BTreeMap::new();
    let mut rooms: BTreeMap<String, BTreeMap<usize, VecDeque<(u64, Placed)>>> = BTreeMap::new();
    for p in records {
        let t = latest.entry(p.file).or_default();
        *t = (*t).max(p.record.time_ms);
        let t = *t;
        rooms
            .entry(p.record.room.clone())
            .or_default()
            .entry(p.file)
            .or_default()
            .push_back((t, p));
    }
    let mut c = Coverage::default();
    for (name, mut files) in rooms {
        let room = c.rooms.entry(name.clone()).or_default();
        // The highest number recorded in this run, and where the last
        // record was.
        let mut high: Option<(u64, (usize, usize))> = None;
        loop {
            let first = files
                .iter()
                .filter_map(|(f, q)| q.front().map(|(t, p)| (*t, p.record.from, *f)))
                .min();
            let Some((_, _, file)) = first else { break };
            let Some((_, p)) = files.get_mut(&file).and_then(VecDeque::pop_front) else {
                break;
            };
            let r = &p.record;
            let at = (p.file, p.line);
            if room.records == 0 {
                room.first = r.from;
            }
            room.records += 1;
            room.last = r.to;
            room.nodes.insert(r.node.clone());
            let mut top = r.to;
            // Before the first record, as if one had recorded up to 0.
            let (seen, before) = high.map_or((0, None), |(seen, at)| (seen, Some(at)));
            if r.from > seen.saturating_add(1) {
                c.findings.push(Finding::Gap {
                    room: name.clone(),
                    from: seen + 1,
                    to: r.from - 1,
                    before,
                    after: at,
                });
            } else if r.from <= seen {
                c.findings.push(Finding::Back {
                    room: name.clone(),
                    back_to: r.from,
                    past: seen,
                    at,
                });
                // Numbers start again at 1 in a new run; otherwise a
                // range within the ones recorded leaves them recorded.
                if r.from > 1 {
                    top = top.max(seen);
                }
            }
            high = Some((top, at));
        }
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
                before: Some((1, 1)),
                after: (2, 1),
            }]
        );
        assert_eq!(c.gaps(), 1);
    }

    /// Every run numbers from 1: a room whose first record begins later
    /// was called before any file given recorded it.
    #[test]
    fn numbers_before_the_first_record_are_a_gap() {
        let c = merge(vec![
            placed(1, 1, "a", 5, 9, 1_000),
            placed(1, 2, "b", 1, 2, 1_000),
        ]);
        assert_eq!(
            c.findings,
            [Finding::Gap {
                room: "a".into(),
                from: 1,
                to: 4,
                before: None,
                after: (1, 1),
            }]
        );
    }

    /// A node's clock stepped back: its later record reads earlier, and
    /// stays after the one before it in its file.
    #[test]
    fn a_files_own_order_holds_when_its_clock_stepped_back() {
        let c = merge(vec![
            placed(1, 1, "a", 1, 3, 5_000),
            placed(1, 2, "a", 4, 6, 2_000),
            placed(2, 1, "a", 7, 9, 6_000),
        ]);
        assert_eq!(c.findings, []);
        assert_eq!(c.rooms["a"].last, 9);
    }

    /// A new run right after a clock stepped back: the file's order, not
    /// the numbers, decides.
    #[test]
    fn a_new_run_after_a_step_back_keeps_the_files_order() {
        let c = merge(vec![
            placed(1, 1, "a", 1, 3, 5_000),
            placed(1, 2, "a", 4, 6, 2_000),
            placed(1, 3, "a", 1, 2, 3_000),
            placed(1, 4, "a", 3, 3, 6_000),
        ]);
        assert_eq!(
            c.findings,
            [Finding::Back {
                room: "a".into(),
                back_to: 1,
                past: 6,
                at: (1, 3),
            }]
        );
    }

    /// A handover logged from a little before the last leader's last
    /// record: the overlap is said, and the numbers after it are no gap.
    #[test]
    fn an_overlap_inside_what_was_recorded_leaves_no_false_gap() {
        let c = merge(vec![
            placed(1, 1, "a", 1, 10, 1_000),
            placed(2, 1, "a", 5, 7, 2_000),
            placed(2, 2, "a", 11, 12, 3_000),
        ]);
        assert_eq!(
            c.findings,
            [Finding::Back {
                room: "a".into(),
                back_to: 5,
                past: 10,
                at: (2, 1),
            }]
        );
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
