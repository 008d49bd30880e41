//! How far this node's clock is from Redis's. A cluster counts sessions,
//! claim windows and the admission rate on the times its nodes send, and
//! every node checks the tokens the others signed with seconds of
//! leeway: a node whose clock is off would let more people in than
//! `max_active` and hold turns open, and send passes back to the line,
//! and nothing else says why. Measured at the start and at each tick
//! against Redis's `TIME`, exported, logged when it goes past
//! [`WARN_MS`], and the node runs on Redis's clock ([`RedisClock`]): the
//! times it sends, the tokens it signs and checks, its opening hours and
//! its audit records are all on one clock, the whole cluster's.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::clock::{Clock, SharedClock};

/// Past this, said in the log: NTP keeps clocks within milliseconds, so
/// a second off is a time sync that failed, on the node or Redis's host.
pub const WARN_MS: i64 = 1_000;

#[derive(Default)]
pub struct Skew {
    /// The node's clock, read at each call, and where its offset goes.
    watched: OnceLock<(SharedClock, prometheus::GaugeVec)>,
    /// Said and not yet back in step: one line each way, not one a tick.
    warned: AtomicBool,
    /// The host's monotonic clock from the first measure on, and
    /// Redis's time (ms) at that origin as the last measure puts it:
    /// Redis's now is that plus the time gone since, whatever the node's
    /// clock does meanwhile. No lock: read at every read of the clock.
    origin: OnceLock<Instant>,
    redis_at_origin: AtomicI64,
    /// Set once `redis_at_origin` holds a measure (after it, so a read
    /// never takes the origin without its time: 1970).
    measured: AtomicBool,
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
    /// `asked_ms` when the call went (at `asked_at`) and `took` for the
    /// round trip: the node's clock minus Redis's, in ms (positive: the
    /// node is ahead).
    pub fn measure(
        &self,
        time: &[String],
        asked_ms: u64,
        asked_at: Instant,
        took: Duration,
    ) -> Option<i64> {
        let redis = redis_ms(time)?;
        let offset = offset_ms(redis, asked_ms, took);
        let origin = *self.origin.get_or_init(|| asked_at);
        let since = (asked_at + took / 2).saturating_duration_since(origin);
        self.redis_at_origin
            .store(redis as i64 - since.as_millis() as i64, Ordering::Relaxed);
        self.measured.store(true, Ordering::Release);
        if let Some((_, g)) = self.watched.get() {
            g.with_label_values::<&str>(&[]).set(offset as f64 / 1000.0);
        }
        match self.crossed(offset) {
            Some(true) => tracing::warn!(
                offset_ms = offset,
                "this node's clock is {} s {} Redis's: it runs on Redis's clock, but its log lines keep its own, and when every node is off alike it is Redis's host that is off (and every room's opening with it); keep every node's clock, and Redis's host's, in step (chrony, systemd-timesyncd)",
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

    /// Redis's now: the last measure (at the start, then each tick;
    /// within half a call's round trip) moved on by the monotonic clock,
    /// so a step of the node's clock between measures changes nothing.
    /// None before the first measure, and on a test's simulated clock
    /// (every node of a test cluster is set to it alike).
    pub fn redis_now_ms(&self) -> Option<u64> {
        let (clock, _) = self.watched.get()?;
        if clock.simulated() || !self.measured.load(Ordering::Acquire) {
            return None;
        }
        let origin = self.origin.get()?;
        let now =
            self.redis_at_origin.load(Ordering::Relaxed) + origin.elapsed().as_millis() as i64;
        Some(now.max(0) as u64)
    }

    /// Whether the node's clock is Redis's yet: false from `watch` to the
    /// first measure, while the node runs on its own (a node started with
    /// Redis away). Until then it sends Redis no time: any would be off by
    /// as much as its clock is. True unwatched (nothing to measure), and
    /// on a test's simulated clock (run on as it is).
    pub fn ready(&self) -> bool {
        match self.watched.get() {
            Some((clock, _)) => clock.simulated() || self.measured.load(Ordering::Acquire),
            None => true,
        }
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

/// The clock a cluster node runs on: Redis's, as [`Skew`] last measured
/// it; the node's own until Redis first answers (a node that starts with
/// Redis away signs on its own clock until then).
pub struct RedisClock {
    pub node: SharedClock,
    pub skew: std::sync::Arc<Skew>,
}

impl Clock for RedisClock {
    fn now_ms(&self) -> u64 {
        self.skew
            .redis_now_ms()
            .unwrap_or_else(|| self.node.now_ms())
    }

    fn simulated(&self) -> bool {
        self.node.simulated()
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
            s.measure(&at(1_000_000), 1_000_000, Instant::now(), Duration::ZERO),
            Some(0)
        );
        assert_eq!(
            s.measure(
                &at(1_000_050),
                1_000_000,
                Instant::now(),
                Duration::from_millis(100)
            ),
            Some(0),
            "read half way through a 100 ms call"
        );
        assert_eq!(
            s.measure(&at(1_600_000), 1_000_000, Instant::now(), Duration::ZERO),
            Some(-600_000),
            "ten minutes behind"
        );
        assert_eq!(
            s.measure(&at(1_000_000), 1_002_500, Instant::now(), Duration::ZERO),
            Some(2_500),
            "ahead"
        );
        assert_eq!(
            s.measure(&["1".into()], 1_000, Instant::now(), Duration::ZERO),
            None
        );
        assert_eq!(
            s.measure(
                &time(1, 2)
                    .into_iter()
                    .chain(["3".into()])
                    .collect::<Vec<_>>(),
                1_000,
                Instant::now(),
                Duration::ZERO
            ),
            None
        );
        assert_eq!(
            s.measure(
                &["x".into(), "0".into()],
                1_000,
                Instant::now(),
                Duration::ZERO
            ),
            None
        );
    }

    /// A node's clock the test sets, real (not simulated).
    struct Set(std::sync::atomic::AtomicU64);

    impl crate::clock::Clock for Set {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn gauge() -> prometheus::GaugeVec {
        prometheus::GaugeVec::new(prometheus::Opts::new("g", "g"), &[]).unwrap()
    }

    /// `got` is `want` moved on by the time the test took since the
    /// measure (Redis's clock runs on): well under a second.
    fn about(got: u64, want: u64) -> bool {
        (want..want + 1_000).contains(&got)
    }

    fn redis_clock(node: crate::clock::SharedClock) -> (RedisClock, std::sync::Arc<Skew>) {
        let skew = std::sync::Arc::new(Skew::default());
        skew.watch(node.clone(), gauge());
        let clock = RedisClock {
            node,
            skew: skew.clone(),
        };
        (clock, skew)
    }

    #[test]
    fn a_node_runs_on_rediss_clock_once_measured() {
        let node = std::sync::Arc::new(Set(1_000_000.into()));
        let (clock, skew) = redis_clock(node.clone());
        assert_eq!(clock.now_ms(), 1_000_000, "not measured yet: its own");
        skew.measure(&time(1_600, 0), 1_000_000, Instant::now(), Duration::ZERO);
        assert!(about(clock.now_ms(), 1_600_000));
        // The node's clock stepped ten minutes on before the next measure:
        // Redis's now is as it was.
        node.0.store(1_600_000, Ordering::Relaxed);
        assert!(about(clock.now_ms(), 1_600_000), "a step");
        skew.measure(&time(400, 0), 1_600_000, Instant::now(), Duration::ZERO);
        assert!(about(clock.now_ms(), 400_000), "ahead");
        skew.measure(
            &time(0, 0),
            1_600_000,
            Instant::now(),
            Duration::from_secs(1),
        );
        assert!(clock.now_ms() < 1_000, "never below the epoch");
    }

    #[test]
    fn a_simulated_clock_is_run_on_as_it_is() {
        let node = crate::clock::ManualClock::new(1_000_000);
        let (clock, skew) = redis_clock(std::sync::Arc::new(node));
        skew.measure(&time(1_600, 0), 1_000_000, Instant::now(), Duration::ZERO);
        assert_eq!(clock.now_ms(), 1_000_000);
        assert!(clock.simulated());
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
