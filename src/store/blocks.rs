//! Where a cluster node keeps the blocks of provisional tickets Redis has
//! placed: outage epoch -> the first number of its block, in which state.
//!
//! Every `tick` and `view` answer names every block Redis keeps, so one
//! it no longer names was forgotten (its tickets have all expired). But a
//! node's calls run at once: an answer taken late may have been written
//! before a block this node placed meanwhile, and must not drop it. Each
//! block remembers the call that last named it, and only an answer to a
//! later call forgets it. (Redis runs one node's calls in the order they
//! were sent, over the node's one connection.)

use dashmap::DashMap;

#[derive(Default)]
pub struct Blocks {
    /// epoch -> (base, the generation of the state it was placed in, the
    /// call that last named it).
    placed: DashMap<u64, (u64, u64, u64)>,
}

impl Blocks {
    /// The blocks an answer to call `call` named, in state `generation`.
    /// `complete`: the answer names every block Redis keeps (a tick's or
    /// a view's); then one of the same state it does not name is gone,
    /// unless a later call named it. One of an earlier state is kept, to
    /// tell its tickets they lost their place.
    pub fn named(&self, blocks: &[(u64, u64)], generation: u64, call: u64, complete: bool) {
        if complete {
            self.placed.retain(|epoch, (_, placed_in, named_by)| {
                *placed_in != generation
                    || *named_by > call
                    || blocks.iter().any(|(e, _)| e == epoch)
            });
        }
        for &(epoch, base) in blocks {
            self.placed
                .entry(epoch)
                .and_modify(|b| {
                    // A late answer says nothing newer than a later call
                    // did (its state may be one Redis has lost since).
                    if call >= b.2 {
                        *b = (base, generation, call);
                    }
                })
                .or_insert((base, generation, call));
        }
    }

    /// Where the block of `epoch` starts, if it was placed in `generation`
    /// (the state as this node knows it).
    pub fn base(&self, epoch: u64, generation: u64) -> Option<u64> {
        let b = self.placed.get(&epoch)?;
        (b.1 == generation).then_some(b.0)
    }

    /// Whether the block of `epoch` was placed in a state other than
    /// `generation`: one Redis has since lost.
    pub fn lost(&self, epoch: u64, generation: u64) -> bool {
        self.placed.get(&epoch).is_some_and(|b| b.1 != generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_answer_keeps_a_block_placed_after_it_was_written() {
        let b = Blocks::default();
        // Call 5 (a view) was written before call 7 (a reserve) placed
        // epoch 0xe at 40; the reserve's answer is taken first.
        b.named(&[(0xe, 40)], 100, 7, false);
        b.named(&[], 100, 5, true);
        assert_eq!(
            b.base(0xe, 100),
            Some(40),
            "the late view drops nothing newer"
        );
        // A tick written after the reserve that no longer names it: gone.
        b.named(&[], 100, 9, true);
        assert_eq!(b.base(0xe, 100), None);
    }

    #[test]
    fn only_a_complete_answer_forgets_and_a_lost_state_is_told() {
        let b = Blocks::default();
        b.named(&[(1, 10), (2, 20)], 100, 1, false);
        b.named(&[(1, 10)], 100, 2, false);
        assert_eq!(b.base(2, 100), Some(20), "a reserve names only some");
        b.named(&[(1, 10)], 100, 3, true);
        assert_eq!(b.base(2, 100), None);
        // Redis lost its data: the block of the old state is kept, lost.
        b.named(&[], 200, 4, true);
        assert!(b.lost(1, 200));
        assert_eq!(b.base(1, 200), None);
        assert!(!b.lost(3, 200), "never placed: not lost");
        // Placed again in the new state (its epoch placed anew).
        b.named(&[(1, 55)], 200, 5, false);
        assert_eq!(b.base(1, 200), Some(55));
        assert!(!b.lost(1, 200));
    }
}
