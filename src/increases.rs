//! The room counters Prometheus scrapes, as this process saw them go up.
//!
//! A room's totals (numbers issued, people admitted, turns abandoned)
//! live in its store and can move back: after a crash the memory store
//! comes back from a snapshot up to `snapshot_interval` old, a Redis
//! restored from an older RDB comes back behind, and one that lost its
//! data starts a run at 0. Exported as they are, any such drop reads to
//! Prometheus as a counter reset, and `rate()` and `increase()` count the
//! whole restored total as new: tens of thousands of admissions at once
//! on the dashboard and in the alerts. So each counter is what the totals
//! rose by while this process watched them, from 0 at its start (the
//! reset Prometheus expects of a process that starts), and a drop is
//! taken as the new base, never as a rise. The totals themselves stay in
//! the admin API.

use crate::room::lanes::Counted;
use crate::room::Room;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One line's totals (a room's, or one lane's) as this process saw them.
#[derive(Default)]
struct Tally {
    /// The run and totals last seen; none before the store has answered.
    last: Option<(u64, Counted)>,
    /// What the totals rose by since.
    risen: Counted,
}

impl Tally {
    fn see(&mut self, run: u64, now: Counted) {
        let rise = |from: u64, to: u64| to.saturating_sub(from);
        match self.last {
            // The same run: what it rose by.
            Some((r, was)) if r == run => {
                self.risen = self.risen.plus(&Counted {
                    issued: rise(was.issued, now.issued),
                    admitted: rise(was.admitted, now.admitted),
                    abandoned: rise(was.abandoned, now.abandoned),
                })
            }
            // A later run (Redis lost its data) began at 0: all of it is
            // new.
            Some((r, _)) if run > r => self.risen = self.risen.plus(&now),
            // An earlier one is a reply from before the loss arriving
            // late: its totals are no admissions of now, and taken as the
            // last seen they would make the later run's whole total count
            // again at its next reply.
            Some(_) => return,
            None => {}
        }
        self.last = Some((run, now));
    }
}

/// Every room's counters since this process started, by room and line
/// (`Room::line_name`: the room's own, or `room#lane`).
#[derive(Default)]
pub struct Increases {
    tallies: Mutex<HashMap<(String, String), Tally>>,
}

impl Increases {
    /// Takes in the totals of `rooms` as they are now, and forgets rooms
    /// no longer among them (a room a reload brings back starts again
    /// from 0, as a new series). Called at each tick, after a reload and
    /// at each scrape, so a rise is seen whichever comes first, and the
    /// base is taken before anybody comes in. The lanes a reload removes
    /// keep their tallies while their room lives: the room's counters add
    /// them up, and would move back without them.
    pub fn follow(&self, rooms: &[Arc<Room>]) {
        let mut tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies.retain(|(room, _), _| rooms.iter().any(|r| r.name == *room));
        for room in rooms {
            // Before a store has answered this node (it just started) its
            // totals are not known: 0 taken as the base would make the
            // cluster's count at the first answer a rise.
            for lane in room.lanes.iter().filter(|l| l.store.heard()) {
                let (run, view) = lane.store.run_and_view();
                tallies
                    .entry((room.name.clone(), room.line_name(lane)))
                    .or_default()
                    .see(run, Counted::of(&view));
            }
        }
    }

    /// What the room's counters rose by since this process started (0
    /// before its store has answered), across its lanes, those removed
    /// included.
    pub fn of_room(&self, room: &str) -> Counted {
        let tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies
            .iter()
            .filter(|((r, _), _)| r == room)
            .fold(Counted::default(), |sum, (_, t)| sum.plus(&t.risen))
    }

    /// What one line (`Room::line_name`) rose by since this process
    /// started.
    pub fn of_line(&self, room: &str, line: &str) -> Counted {
        let tallies = self.tallies.lock().unwrap_or_else(|e| e.into_inner());
        tallies
            .get(&(room.to_owned(), line.to_owned()))
            .map_or(Counted::default(), |t| t.risen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(n: u64) -> Counted {
        Counted {
            admitted: n,
            ..Counted::default()
        }
    }

    #[test]
    fn a_tally_counts_rises_from_its_first_totals_and_never_a_drop() {
        let mut t = Tally::default();
        t.see(7, admitted(48_000));
        assert_eq!(t.risen.admitted, 0, "restored totals are no admissions");
        t.see(7, admitted(48_010));
        assert_eq!(t.risen.admitted, 10);
        t.see(7, admitted(47_000));
        assert_eq!(t.risen.admitted, 10, "totals that moved back count nothing");
        t.see(7, admitted(47_005));
        assert_eq!(t.risen.admitted, 15, "rises go on from the new base");
    }

    #[test]
    fn a_later_run_counts_from_0_and_an_earlier_one_not_at_all() {
        let mut t = Tally::default();
        t.see(7, admitted(500));
        t.see(9, admitted(3));
        assert_eq!(t.risen.admitted, 3, "a new run's first admissions");
        t.see(7, admitted(500));
        assert_eq!(t.risen.admitted, 3, "a late reply of the old run");
        t.see(9, admitted(5));
        assert_eq!(t.risen.admitted, 5, "the new run's, once");
    }
}
