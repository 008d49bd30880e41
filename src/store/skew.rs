//! How far this node's clock is from Redis's. A cluster counts sessions,
//! claim windows and the admission rate on the times its nodes give, and
//! every node checks the tokens the others signed with seconds of
//! leeway: a node whose clock is off lets more people in than
//! `max_active`, holds turns open, or sends passes back to the line, and
//! nothing else says why. Measured at each tick against Redis's `TIME`,
//! exported, and logged when it goes past [`WARN_MS`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::clock::SharedClock;

/// Past this, said in the log: NTP keeps clocks within milliseconds, and a
/// second is a fifth of the leeway a token's expiry has across nodes.
pub const WARN_MS: i64 = 1_000;

#[derive(Default)]
pub struct Skew {
    /// The node's clock, read at each call, and where its offset goes.
    watched: OnceLock<(SharedClock, prometheus::GaugeVec)>,
    /// Said and not yet back in step: one line each way, not one a tick.
    warned: AtomicBool,
}

impl Skew {
    /// Measures `clock` from now on, into
    /// `varco_store_clock_offset_seconds`.
    pub fn watch(&self, clock: SharedClock, gauge: prometheus::GaugeVec) {
        let _ = self.watched.set((clock, gauge));
    }

    /// The node's time as a call that reads Redis's goes out, and when:
    /// read then, not at the tick's start, which a slow call before it
    /// (another room's) would put seconds back. None: not watched.
    pub fn asking(&self) -> Option<(u64, Instant)> {
        let (clock, _) = self.watched.get()?;
        Some((clock.now_ms(), Instant::now()))
    }

    /// Redis's `TIME` answer (seconds, microseconds), against the node's
    /// `asked_ms` when the call went and `took` for the round trip: the
    /// node's clock minus Redis's, in ms (positive: the node is ahead).
    pub fn measure(&self, time: &[String], asked_ms: u64, took: Duration) -> Option<i64> {
        let offset = offset_ms(redis_ms(time)?, asked_ms, took);
        if let Some((_, g)) = self.watched.get() {
            g.with_label_values::<&str>(&[]).set(offset as f64 / 1000.0);
        }
        match self.crossed(offset) {
            Some(true) => tracing::warn!(
                offset_ms = offset,
                "this node's clock is {} s {} Redis's: sessions, claim windows and the admission rate are counted on the nodes' clocks, and passes checked across nodes with 5 s of leeway; keep every node's clock in step (chrony, systemd-timesyncd)",
                offset.abs() as f64 / 1000.0,
                if offset > 0 { "ahead of" } else { "behind" }
            ),
            Some(false) => {
                tracing::info!(offset_ms = offset, "this node's clock is in step with Redis's again")
            }
            None => {}
        }
        Some(offset)
    }

    /// Whether `offset` went past [`WARN_MS`] (true) or came back within
    /// half of it (false) since the last measure; half, so an offset
    /// about the bound is not said at every tick.
    fn crossed(&self, offset: i64) -> Option<bool> {
        let off = offset.abs();
        if off > WARN_MS {
            (!self.warned.swap(true, Ordering::Relaxed)).then_some(true)
        } else if off < WARN_MS / 2 {
            self.warned.swap(false, Ordering::Relaxed).then_some(false)
        } else {
            None
        }
    }
}

/// Unix ms of a `TIME` answer.
fn redis_ms(time: &[String]) -> Option<u64> {
    let [secs, micros] = time else {
        return None;
    };
    Some(secs.parse::<u64>().ok()? * 1000 + micros.parse::<u64>().ok()? / 1000)
}

/// Redis read its clock somewhere in the round trip: taken as half way,
/// so the error is at most half of `took`.
fn offset_ms(redis_ms: u64, asked_ms: u64, took: Duration) -> i64 {
    let node_ms = asked_ms + took.as_millis() as u64 / 2;
    node_ms as i64 - redis_ms as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(secs: u64, micros: u64) -> Vec<String> {
        vec![secs.to_string(), micros.to_string()]
    }

    #[test]
    fn the_offset_is_the_nodes_clock_minus_rediss_half_way_through_the_call() {
        let s = Skew::default();
        let at = |ms: u64| time(ms / 1000, (ms % 1000) * 1000 + 999);
        assert_eq!(
            s.measure(&at(1_000_000), 1_000_000, Duration::ZERO),
            Some(0)
        );
        assert_eq!(
            s.measure(&at(1_000_050), 1_000_000, Duration::from_millis(100)),
            Some(0),
            "read half way through a 100 ms call"
        );
        assert_eq!(
            s.measure(&at(1_600_000), 1_000_000, Duration::ZERO),
            Some(-600_000),
            "ten minutes behind"
        );
        assert_eq!(
            s.measure(&at(1_000_000), 1_002_500, Duration::ZERO),
            Some(2_500),
            "ahead"
        );
        assert_eq!(s.measure(&["1".into()], 1_000, Duration::ZERO), None);
        assert_eq!(
            s.measure(
                &time(1, 2)
                    .into_iter()
                    .chain(["3".into()])
                    .collect::<Vec<_>>(),
                1_000,
                Duration::ZERO
            ),
            None
        );
        assert_eq!(
            s.measure(&["x".into(), "0".into()], 1_000, Duration::ZERO),
            None
        );
    }

    #[test]
    fn an_offset_is_said_once_past_the_bound_and_once_back() {
        let s = Skew::default();
        assert_eq!(s.crossed(200), None);
        assert_eq!(s.crossed(-1_500), Some(true));
        assert_eq!(s.crossed(-1_600), None, "said once");
        assert_eq!(s.crossed(800), None, "not back until within half");
        assert_eq!(s.crossed(-300), Some(false));
        assert_eq!(s.crossed(100), None);
        assert_eq!(s.crossed(1_001), Some(true));
    }
}
