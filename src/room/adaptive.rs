//! Adaptive admission: the room's admission rate follows what the portal's
//! answers say about its health, within the operator's bounds.
//!
//! The control law is AIMD (additive increase, multiplicative decrease),
//! the law of TCP congestion control (Chiu and Jain, 1989): while the
//! portal is healthy and people are waiting, the rate grows by a fixed
//! step each interval; when the upstream latency percentile passes the
//! target, or too many answers fail, it is cut by a factor (for latency,
//! as deep as the overshoot, down to `backoff`). AIMD rather
//! than a gradient limiter (Netflix's concurrency-limits, Envoy's adaptive
//! concurrency) because what varco controls is a *rate of people*, whose
//! effect on the portal lags by the seconds each admitted person takes to
//! arrive and click: a gradient law reacts to the size of a signal that
//! lags, and oscillates; AIMD only reads its sign, probes gently and
//! backs off hard, which is stable with lag and never overshoots by more
//! than one step. The in-flight cap (`proxy::in_flight`) absorbs what one
//! step too many sends.
//!
//! After a cut for latency the controller waits for the people admitted
//! just before it to arrive (two intervals), and then holds as long as
//! each slow window is faster than the slowest of the overload: the
//! portal is working off its backlog, and a second cut would overshoot
//! downwards.
//!
//! Two windows are kept. The rate is judged on the whole path to the
//! portal: an admitted person's wait for an `in_flight` slot, and a
//! refusal by the cap, are the rate's doing (too many people admitted).
//! An adaptive in-flight limit is judged on the portal's own answers
//! only: judged on the wait it makes itself, a cut limit made requests
//! queue, the queueing read as overload, and the limit was cut again and
//! never grew back, while the portal answered fast.
//!
//! Signals are kept per decision: answers to requests sent before the
//! last change are dropped, so a cut is judged on the load it made, not on
//! the tail of the load before it. A request still unanswered past the
//! target counts as a slow answer already: an overloaded portal answers
//! late, and waiting for those answers is what lets a rate overshoot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AdaptiveConfig;

/// Latency buckets grow by this factor: percentiles within 10%.
const BUCKET_GROWTH: f64 = 1.1;
/// The first bucket's upper bound, in seconds.
const FIRST_BUCKET: f64 = 0.001;
/// 1 ms x 1.1^160: past an hour; slower answers share the last bucket.
const BUCKETS: usize = 160;

fn bucket_of(seconds: f64) -> usize {
    if seconds <= FIRST_BUCKET {
        return 0;
    }
    let i = (seconds / FIRST_BUCKET).ln() / BUCKET_GROWTH.ln();
    (i.ceil() as usize).min(BUCKETS - 1)
}

fn upper_bound(bucket: usize) -> f64 {
    FIRST_BUCKET * BUCKET_GROWTH.powi(bucket as i32)
}

/// Requests awaiting an answer are counted per slot of send time; the
/// ring covers this many slots. Each slot holds the number of the slot of
/// time its count belongs to: a request still unanswered when its slot
/// comes round again (25.6 s at a 200 ms target, under the default 60 s
/// response timeout) is not counted as sent in the new one, where it
/// would be overdue in a period it was not sent in.
const PENDING_SLOTS: usize = 1024;

/// A pending slot's word: its slot of time above, its count below.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// One window's counts as they come in.
struct Counts {
    latency: [AtomicU64; BUCKETS],
    answers: AtomicU64,
    failures: AtomicU64,
}

impl Counts {
    fn new() -> Self {
        Counts {
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            answers: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn add(&self, latency: Duration, failed: bool) {
        self.latency[bucket_of(latency.as_secs_f64())].fetch_add(1, Ordering::Relaxed);
        self.answers.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take(&self, overdue: u64) -> Window {
        Window {
            answers: self.answers.swap(0, Ordering::Relaxed),
            failures: self.failures.swap(0, Ordering::Relaxed),
            overdue,
            latency: self
                .latency
                .iter()
                .map(|b| b.swap(0, Ordering::Relaxed))
                .collect(),
        }
    }
}

/// What the request path reports: lock-free, a few atomic adds a request.
pub struct Signals {
    /// The whole path: the wait for an in-flight slot included, and the
    /// cap's refusals counted as failures (what the rate is judged on).
    path: Counts,
    /// The portal's own answers (what an in-flight limit is judged on).
    portal: Counts,
    /// Bumped at each change of rate; answers to requests sent under an
    /// older epoch are not counted.
    epoch: AtomicU64,
    /// When the current epoch began, ms since `origin`.
    epoch_ms: AtomicU64,
    /// Unanswered requests by slot of send time (see [`PENDING_SLOTS`]).
    pending: Box<[AtomicU64]>,
    slot_ms: u64,
    origin: Instant,
}

/// A request on its way upstream; hand it back to [`Signals::record`].
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    epoch: u64,
    at_ms: u64,
    /// Counted among the unanswered (see `overdue_at`): not while its
    /// body is still coming in from the person.
    pending: bool,
}

/// A request awaiting the upstream's answer. Dropped unanswered (the
/// client went away, its body failed), it is forgotten, not counted.
pub struct Outstanding<'a> {
    signals: &'a Signals,
    sent: Option<Sent>,
}

impl Outstanding<'_> {
    /// The upstream answered (or failed: 5xx, timeout, connection error)
    /// after `latency`, sent at once (the proxy always says how long it
    /// waited: [`Self::answer_queued`]).
    #[cfg(test)]
    pub fn answer(&mut self, latency: Duration, failed: bool) {
        self.answer_queued(Duration::ZERO, latency, failed);
    }

    /// The request's body went out whole (or failed): from now on it
    /// waits for the portal, under the rate in force now (its answer
    /// tells of that one).
    pub fn body_sent(&mut self) {
        if let Some(sent) = self.sent.as_mut().filter(|s| !s.pending) {
            let now = self.signals.now_ms();
            self.signals.pending_change(now, true);
            *sent = Sent {
                epoch: self.signals.epoch.load(Ordering::Relaxed),
                at_ms: now,
                pending: true,
            };
        }
    }

    /// The same, sent after waiting `queued` for an in-flight slot.
    pub fn answer_queued(&mut self, queued: Duration, latency: Duration, failed: bool) {
        if let Some(sent) = self.sent.take() {
            self.signals.record(sent, queued, latency, failed);
        }
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        if let Some(sent) = self.sent.take().filter(|s| s.pending) {
            self.signals.pending_change(sent.at_ms, false);
        }
    }
}

/// What one interval saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub answers: u64,
    pub failures: u64,
    /// Requests sent in this epoch, unanswered for longer than the target.
    pub overdue: u64,
    latency: Vec<u64>,
}

impl Window {
    /// Answers slower than `target`, plus the overdue: as a share of both.
    pub fn slow_share(&self, target: Duration) -> f64 {
        let first_slow = bucket_of(target.as_secs_f64()) + 1;
        let slow: u64 = self.latency.iter().skip(first_slow).sum::<u64>() + self.overdue;
        let all = self.answers + self.overdue;
        if all == 0 {
            0.0
        } else {
            slow as f64 / all as f64
        }
    }

    /// The latency under which `p` of the answers came, as the upper
    /// bound of its bucket; None without answers.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_secs_f64(upper_bound(i)));
            }
        }
        None
    }

    pub fn failure_rate(&self) -> f64 {
        if self.answers == 0 {
            0.0
        } else {
            self.failures as f64 / self.answers as f64
        }
    }
}

impl Signals {
    /// `target`: the latency held under; it sets how finely unanswered
    /// requests are aged.
    pub fn new(target: Duration) -> Self {
        Signals {
            path: Counts::new(),
            portal: Counts::new(),
            epoch: AtomicU64::new(0),
            epoch_ms: AtomicU64::new(0),
            pending: (0..PENDING_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            slot_ms: (target.as_millis() as u64 / 8).clamp(1, 1000),
            origin: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// One more (`up`) or one fewer request sent at `at_ms` unanswered.
    /// One fewer for a slot that has since come round again is nothing:
    /// that request is no longer counted.
    fn pending_change(&self, at_ms: u64, up: bool) {
        let k = at_ms / self.slot_ms;
        let slot = &self.pending[k as usize % PENDING_SLOTS];
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            let count = if w >> COUNT_BITS == k {
                w & COUNT_MASK
            } else {
                0
            };
            let count = if up {
                (count + 1).min(COUNT_MASK)
            } else if count == 0 || w >> COUNT_BITS != k {
                return None;
            } else {
                count - 1
            };
            Some(k << COUNT_BITS | count)
        });
    }

    /// Requests sent in slot of time `k` still unanswered.
    fn pending_in(&self, k: u64) -> u64 {
        let w = self.pending[k as usize % PENDING_SLOTS].load(Ordering::Relaxed);
        if w >> COUNT_BITS == k {
            w & COUNT_MASK
        } else {
            0
        }
    }

    /// A request leaves for the upstream now.
    pub fn send(&self) -> Outstanding<'_> {
        Outstanding {
            signals: self,
            sent: Some(self.send_at(self.now_ms())),
        }
    }

    /// A request with a body leaves for the upstream now: it waits for
    /// the portal's answer, and may be overdue, only from
    /// [`Outstanding::body_sent`] on. An upload at the pace of the
    /// person's line is not the portal's slowness; counted, ten slow
    /// uploads in a hundred requests cut the rate by `backoff`.
    pub fn send_with_body(&self) -> Outstanding<'_> {
        Outstanding {
            signals: self,
            sent: Some(Sent {
                epoch: self.epoch.load(Ordering::Relaxed),
                at_ms: self.now_ms(),
                pending: false,
            }),
        }
    }

    fn send_at(&self, at_ms: u64) -> Sent {
        self.pending_change(at_ms, true);
        Sent {
            epoch: self.epoch.load(Ordering::Relaxed),
            at_ms,
            pending: true,
        }
    }

    fn record(&self, sent: Sent, queued: Duration, latency: Duration, failed: bool) {
        if sent.pending {
            self.pending_change(sent.at_ms, false);
        }
        if sent.epoch != self.epoch.load(Ordering::Relaxed) {
            return;
        }
        self.path.add(queued + latency, failed);
        self.portal.add(latency, failed);
    }

    /// An admitted person's request the in-flight cap turned away after
    /// `waited`: a failure of the path to the portal, none of the portal's.
    pub fn refused(&self, waited: Duration) {
        self.path.add(waited, true);
    }

    /// Requests sent in this epoch and unanswered after `target`.
    fn overdue_at(&self, now_ms: u64, target: Duration) -> u64 {
        let Some(sent_before) = now_ms.checked_sub(target.as_millis() as u64) else {
            return 0;
        };
        let first = self.epoch_ms.load(Ordering::Relaxed) / self.slot_ms;
        // Only whole slots sent before the cut-off: never a young request.
        let Some(last) = (sent_before / self.slot_ms).checked_sub(1) else {
            return 0;
        };
        let first = first.max(last.saturating_sub(PENDING_SLOTS as u64 - 1));
        (first..=last).map(|k| self.pending_in(k)).sum()
    }

    /// Everything since the last take, the whole path's and the
    /// portal's own (the overdue are the portal's in both), and a fresh
    /// start.
    fn take_at(&self, now_ms: u64, target: Duration) -> (Window, Window) {
        let overdue = self.overdue_at(now_ms, target);
        (self.path.take(overdue), self.portal.take(overdue))
    }

    fn new_epoch_at(&self, now_ms: u64) {
        self.epoch_ms.store(now_ms, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Increase,
    Decrease,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Increase => "increase",
            Direction::Decrease => "decrease",
        }
    }
}

/// Why the law moved the rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Healthy, and people are waiting.
    Headroom,
    /// The latency percentile passed the target.
    Latency,
    /// Too many answers failed.
    Failures,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Headroom => "headroom",
            Reason::Latency => "latency",
            Reason::Failures => "failures",
        }
    }
}

/// A change of rate, for the log and the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub from: f64,
    pub to: f64,
    pub direction: Direction,
    pub reason: Reason,
}

/// What one interval's signals say, when they say anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Overloaded(Reason),
}

/// Judges a window; None without evidence (no answers, none overdue):
/// before an opening, or with nobody admitted yet, growing blindly would
/// only store up a surge.
pub fn judge(c: &AdaptiveConfig, window: &Window) -> Option<Verdict> {
    if window.answers == 0 && window.overdue == 0 {
        return None;
    }
    // The percentile is above the target when more than (1 - p) of the
    // answers are slower than it.
    Some(if window.failure_rate() > c.max_error_rate {
        Verdict::Overloaded(Reason::Failures)
    } else if window.slow_share(c.target_latency) > 1.0 - c.percentile {
        Verdict::Overloaded(Reason::Latency)
    } else {
        Verdict::Healthy
    })
}

/// The pure law for the rate: the next rate (or None to hold). `observed`
/// is the window's latency percentile: a cut for latency is as deep as
/// the overshoot (target / observed), never gentler than 0.95 (or than
/// `backoff`, if that is gentler still) nor deeper than `backoff`, so a rate a little over the knee is trimmed, not
/// halved, while a collapsing portal gets the full cut at once. `peak` is
/// the rate where the last overload began: from 20% under it to 10% over
/// it the step is halved, so the rate creeps up on the knee it found and
/// spends its time near it instead of running through it, and moves at
/// full speed elsewhere (TCP CUBIC's idea, in its simplest form).
pub fn next_rate(
    c: &AdaptiveConfig,
    verdict: Verdict,
    observed: Option<Duration>,
    demand: bool,
    rate: f64,
    peak: Option<f64>,
) -> Option<(f64, Reason)> {
    let next = match verdict {
        Verdict::Overloaded(reason) => {
            let factor = match (reason, observed) {
                (Reason::Latency, Some(p)) if p > c.target_latency => {
                    // A backoff gentler than 0.95 is the whole range (and
                    // clamp's bounds must not cross: it panics).
                    (c.target_latency.as_secs_f64() / p.as_secs_f64())
                        .clamp(c.backoff, c.backoff.max(0.95))
                }
                _ => c.backoff,
            };
            // Never up: an operator's brake under the floor holds.
            ((rate * factor).max(c.min_per_minute).min(rate), reason)
        }
        // Growing while nobody waits would raise a limit nothing tests.
        Verdict::Healthy if demand => {
            let next = rate + c.step_per_minute;
            let near_the_knee = peak.is_some_and(|p| (0.8 * p..=1.1 * p).contains(&next));
            let step = if near_the_knee {
                c.step_per_minute / 2.0
            } else {
                c.step_per_minute
            };
            // Never down: an operator's rate over the ceiling holds.
            (
                (rate + step).min(c.max_per_minute.max(rate)),
                Reason::Headroom,
            )
        }
        Verdict::Healthy => return None,
    };
    (next.0 != rate).then_some(next)
}

/// The same law for an adaptive in-flight limit, in whole requests: one
/// more while healthy and the limit held someone back; cut on overload.
pub fn next_limit(
    c: &AdaptiveConfig,
    verdict: Verdict,
    saturated: bool,
    limit: usize,
    ceiling: usize,
) -> usize {
    match verdict {
        Verdict::Overloaded(_) => ((limit as f64 * c.backoff).floor() as usize).max(1),
        Verdict::Healthy if saturated => (limit + 1).min(ceiling),
        Verdict::Healthy => limit,
    }
}

/// One room's controller: its signals and when it last decided.
pub struct Controller {
    pub config: AdaptiveConfig,
    pub signals: Signals,
    state: Mutex<State>,
}

#[derive(Default, Clone)]
struct State {
    decided_ms: Option<u64>,
    last: Window,
    /// Intervals left unjudged after a cut (see [`SETTLE_INTERVALS`]).
    settling: u32,
    /// The rate at the last cut that began an overload: where the knee
    /// was last seen.
    peak: Option<f64>,
    /// The last judged window was overloaded.
    overloaded: bool,
    /// ...and so was the one before it: a cut now is for the same
    /// overload (see [`Controller::cut_from`]).
    follow_up: bool,
    /// The latency percentile of the slowest window of this overload
    /// (settling ones included): while slow windows stay faster than it,
    /// the last cut is working off the backlog, and cutting again would
    /// overshoot downwards. Comparing with the worst rather than with the
    /// window before keeps the noise of one window from cutting again.
    worst: Option<Duration>,
    /// The last judged interval's verdict on the portal's own answers,
    /// for an adaptive in-flight limit; taken once.
    limit: Option<Verdict>,
}

/// After a cut for latency, this many intervals pass unjudged: people
/// admitted just before the cut are still arriving at the portal (a poll,
/// then a few pages), and judging the load they make would cut again for
/// the same overload. A cut for failures settles for none: failing
/// answers are damage, and the next interval may cut again at once.
pub const SETTLE_INTERVALS: u32 = 2;

impl Controller {
    pub fn new(config: AdaptiveConfig) -> Self {
        Controller {
            signals: Signals::new(config.target_latency),
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// The controller of a room a reload rebuilt, carrying on from `old`'s
    /// decisions: when it last judged, the intervals still to settle
    /// after a cut, the knee and the worst of an overload. Started over,
    /// the first tick judged a window shorter than an interval, a reload
    /// just after a cut cut again for the same overload, and the climb
    /// ran through the knee it had found. The signals start afresh:
    /// requests under way report to the old room's.
    pub fn continuing(config: AdaptiveConfig, old: &Controller) -> Self {
        let state = old.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Controller {
            state: Mutex::new(State {
                limit: None,
                ..state
            }),
            ..Controller::new(config)
        }
    }

    /// Called every tick; judges once per interval. A caller that acts on
    /// the verdict calls [`Self::changed`], so the next verdict is about
    /// the new setting only.
    pub fn step(&self, now_ms: u64) -> Option<Verdict> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let interval = self.config.interval.as_millis() as u64;
        // A tick may come a little early: a tenth of the interval is
        // close enough, or the controller would skip every other one. A
        // clock stepped back (NTP) is no reason to wait until it passes
        // the last decision again: overloaded, that would cut nothing.
        match state.decided_ms {
            Some(t) if now_ms >= t && now_ms + interval / 10 < t + interval => return None,
            _ => {}
        }
        state.decided_ms = Some(now_ms);
        let (window, portal) = self
            .signals
            .take_at(self.signals.now_ms(), self.config.target_latency);
        let verdict = judge(&self.config, &window);
        state.limit = (state.settling == 0)
            .then(|| judge(&self.config, &portal))
            .flatten();
        let p = window.percentile(self.config.percentile);
        state.last = window;
        if state.settling > 0 {
            state.settling -= 1;
            // Unjudged, but the backlog peaks while the people admitted
            // before the cut arrive, and later windows are judged
            // against that peak.
            if verdict == Some(Verdict::Overloaded(Reason::Latency)) {
                state.worst = state.worst.max(p);
            }
            return None;
        }
        if let Some(v) = verdict {
            let overloaded = matches!(v, Verdict::Overloaded(_));
            state.follow_up = overloaded && state.overloaded;
            state.overloaded = overloaded;
        }
        match verdict {
            Some(Verdict::Overloaded(Reason::Latency)) => {
                let worst = state.worst;
                state.worst = worst.max(p);
                if let (Some(now), Some(worst)) = (p, worst) {
                    if now < worst {
                        return None;
                    }
                }
            }
            Some(_) => state.worst = None,
            None => {}
        }
        verdict
    }

    /// The verdict on the portal's own answers in the interval the last
    /// [`Self::step`] judged (none while settling), once: what an
    /// adaptive in-flight limit follows.
    pub fn take_limit_verdict(&self) -> Option<Verdict> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .limit
            .take()
    }

    /// Where the knee was last seen: the rate at the cut that began the
    /// last overload.
    pub fn peak(&self) -> Option<f64> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).peak
    }

    /// The rate was cut from `rate`. Only the cut that begins an overload
    /// (the first overloaded window after a healthy one) marks the knee: a
    /// second cut for the same overload (the people admitted before the
    /// first were still arriving) is from a rate already below it, and
    /// remembering that rate as the knee would make the climb back creep
    /// from too low. TCP CUBIC likewise records its window at the loss,
    /// not at the reductions of the same recovery.
    pub fn cut_from(&self, rate: f64) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.follow_up || state.peak.is_none() {
            state.peak = Some(rate);
        }
    }

    /// The rate or the limit changed: what was sent before is not the new
    /// setting's doing; `settle` intervals pass unjudged.
    pub fn changed(&self, settle: u32) {
        self.signals.new_epoch_at(self.signals.now_ms());
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settling = settle;
    }

    /// The last interval's latency percentile and failure rate, for the
    /// metrics and the admin API.
    pub fn last_signals(&self) -> (Option<Duration>, f64) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (
            state.last.percentile(self.config.percentile),
            state.last.failure_rate(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            min_per_minute: 60.0,
            max_per_minute: 1200.0,
            target_latency: Duration::from_millis(500),
            max_error_rate: 0.01,
            percentile: 0.9,
            interval: Duration::from_secs(1),
            step_per_minute: 60.0,
            backoff: 0.7,
        }
    }

    fn rate_after(
        c: &AdaptiveConfig,
        w: &Window,
        demand: bool,
        rate: f64,
    ) -> Option<(f64, Reason)> {
        judge(c, w).and_then(|v| next_rate(c, v, w.percentile(c.percentile), demand, rate, None))
    }

    #[test]
    fn an_operators_rate_outside_the_bounds_is_never_moved_the_wrong_way() {
        let c = config();
        let slow = Some(Duration::from_secs(2));
        for reason in [Reason::Latency, Reason::Failures] {
            assert_eq!(
                next_rate(&c, Verdict::Overloaded(reason), slow, true, 10.0, None),
                None,
                "a brake under min_per_minute is not raised by an overload"
            );
        }
        assert_eq!(
            next_rate(
                &c,
                Verdict::Overloaded(Reason::Latency),
                slow,
                true,
                70.0,
                None
            ),
            Some((60.0, Reason::Latency)),
            "just over the floor: cut to the floor"
        );
        assert_eq!(
            next_rate(&c, Verdict::Healthy, None, true, 2000.0, None),
            None,
            "a rate over max_per_minute is not lowered while healthy"
        );
        assert_eq!(
            next_rate(
                &c,
                Verdict::Overloaded(Reason::Failures),
                None,
                true,
                2000.0,
                None
            ),
            Some((1400.0, Reason::Failures)),
            "...and cut from where it is when overloaded"
        );
    }

    #[test]
    fn creeps_up_on_the_last_knee() {
        let c = config();
        let h = Verdict::Healthy;
        assert_eq!(
            next_rate(&c, h, None, true, 500.0, Some(1000.0)),
            Some((560.0, Reason::Headroom)),
            "far below the last cut: the full step"
        );
        assert_eq!(
            next_rate(&c, h, None, true, 880.0, Some(1000.0)),
            Some((910.0, Reason::Headroom)),
            "near it: half a step"
        );
        assert_eq!(
            next_rate(&c, h, None, true, 760.0, Some(1000.0)),
            Some((790.0, Reason::Headroom)),
            "a step into the last fifth under it: half a step"
        );
        assert_eq!(
            next_rate(&c, h, None, true, 1100.0, Some(1000.0)),
            Some((1160.0, Reason::Headroom)),
            "well past it (the portal got stronger): the full step"
        );
    }

    #[test]
    fn the_limit_follows_the_same_law_in_whole_requests() {
        let c = config();
        let over = Verdict::Overloaded(Reason::Latency);
        assert_eq!(next_limit(&c, over, true, 10, 64), 7);
        assert_eq!(next_limit(&c, over, true, 1, 64), 1);
        assert_eq!(next_limit(&c, Verdict::Healthy, true, 10, 64), 11);
        assert_eq!(next_limit(&c, Verdict::Healthy, true, 64, 64), 64);
        assert_eq!(next_limit(&c, Verdict::Healthy, false, 10, 64), 10);
    }

    fn window(latencies_ms: &[u64], failures: u64) -> Window {
        let s = Signals::new(Duration::from_millis(500));
        for (i, ms) in latencies_ms.iter().enumerate() {
            let sent = s.send_at(0);
            s.record(
                sent,
                Duration::ZERO,
                Duration::from_millis(*ms),
                (i as u64) < failures,
            );
        }
        s.take_at(0, Duration::from_millis(500)).0
    }

    #[test]
    fn the_limit_is_judged_on_the_portals_answers_the_rate_on_the_whole_path() {
        let ctl = Controller::new(config());
        // The portal answers in 50 ms; requests waited 2 s for a slot
        // first, and two more were turned away by the cap.
        for _ in 0..8 {
            ctl.signals.send().answer_queued(
                Duration::from_secs(2),
                Duration::from_millis(50),
                false,
            );
        }
        ctl.signals.refused(Duration::from_secs(2));
        ctl.signals.refused(Duration::from_secs(2));
        assert_eq!(
            ctl.step(1_000),
            Some(Verdict::Overloaded(Reason::Failures)),
            "too many admitted: the rate is cut"
        );
        assert_eq!(
            ctl.take_limit_verdict(),
            Some(Verdict::Healthy),
            "the portal is fast: the limit may grow"
        );
        assert_eq!(ctl.take_limit_verdict(), None, "taken once");
        // The portal itself slow: both see it.
        ctl.changed(0);
        for _ in 0..8 {
            ctl.signals.send().answer(Duration::from_secs(2), false);
        }
        assert_eq!(ctl.step(2_000), Some(Verdict::Overloaded(Reason::Latency)));
        assert_eq!(
            ctl.take_limit_verdict(),
            Some(Verdict::Overloaded(Reason::Latency))
        );
        // Settling after a cut for latency: neither is judged.
        ctl.changed(SETTLE_INTERVALS);
        ctl.signals.send().answer(Duration::from_secs(2), false);
        assert_eq!(ctl.step(3_000), None);
        assert_eq!(ctl.take_limit_verdict(), None);
    }

    #[test]
    fn a_controller_rebuilt_by_a_reload_carries_on() {
        let old = Controller::new(config());
        old.signals.send().answer(Duration::from_millis(50), false);
        assert_eq!(old.step(1_000), Some(Verdict::Healthy));
        let new = Controller::continuing(config(), &old);
        new.signals.send().answer(Duration::from_millis(50), false);
        assert_eq!(new.step(1_500), None, "within the interval judged before");
        assert_eq!(new.step(2_000), Some(Verdict::Healthy));
        // A cut for latency, then a reload while it settles.
        new.signals.send().answer(Duration::from_secs(5), false);
        assert_eq!(new.step(3_000), Some(Verdict::Overloaded(Reason::Latency)));
        new.cut_from(600.0);
        new.changed(SETTLE_INTERVALS);
        let newer = Controller::continuing(config(), &new);
        newer.signals.send().answer(Duration::from_secs(5), false);
        assert_eq!(newer.step(4_000), None, "still settling");
        assert_eq!(newer.peak(), Some(600.0), "the knee kept");
    }

    #[test]
    fn a_clock_stepped_back_does_not_stop_the_decisions() {
        let ctl = Controller::new(config());
        ctl.signals.send().answer(Duration::from_millis(50), false);
        assert_eq!(ctl.step(600_000), Some(Verdict::Healthy));
        ctl.signals.send().answer(Duration::from_secs(5), false);
        assert_eq!(
            ctl.step(1_000),
            Some(Verdict::Overloaded(Reason::Latency)),
            "ten minutes back: judged at once"
        );
        assert_eq!(ctl.step(1_500), None, "then once an interval again");
    }

    #[test]
    fn percentile_is_within_a_bucket() {
        let w = window(&(1..=100).map(|i| i * 10).collect::<Vec<_>>(), 0);
        let p90 = w.percentile(0.9).unwrap().as_secs_f64();
        assert!((0.9..=0.9 * BUCKET_GROWTH).contains(&p90), "{p90}");
        let p50 = w.percentile(0.5).unwrap().as_secs_f64();
        assert!((0.5..=0.5 * BUCKET_GROWTH).contains(&p50), "{p50}");
        assert_eq!(Window::default().percentile(0.9), None);
    }

    #[test]
    fn grows_by_a_step_only_when_healthy_and_people_wait() {
        let c = config();
        let fast = window(&[50; 100], 0);
        assert_eq!(
            rate_after(&c, &fast, true, 300.0),
            Some((360.0, Reason::Headroom))
        );
        assert_eq!(rate_after(&c, &fast, false, 300.0), None);
        assert_eq!(rate_after(&c, &fast, true, 1200.0), None, "at max");
        assert_eq!(
            rate_after(&c, &fast, true, 1180.0),
            Some((1200.0, Reason::Headroom))
        );
        assert_eq!(rate_after(&c, &Window::default(), true, 300.0), None);
    }

    #[test]
    fn cuts_on_slow_tail_or_failures() {
        let c = config();
        // 85 fast, 15 slow: the p90 is slow.
        let mut ms = vec![50; 85];
        ms.extend([900; 15]);
        assert_eq!(
            rate_after(&c, &window(&ms, 0), true, 1000.0),
            Some((700.0, Reason::Latency))
        );
        // 95 fast, 5 slow: p90 fine.
        let mut ms = vec![50; 95];
        ms.extend([900; 5]);
        assert_eq!(
            rate_after(&c, &window(&ms, 0), true, 1000.0),
            Some((1060.0, Reason::Headroom))
        );
        // Just over the target: trimmed, not cut by the full backoff.
        let mut ms = vec![50; 80];
        ms.extend([600; 20]);
        let (trimmed, _) = rate_after(&c, &window(&ms, 0), true, 1000.0).unwrap();
        assert!((750.0..950.0).contains(&trimmed), "{trimmed}");
        // 2% failed, all fast.
        assert_eq!(
            rate_after(&c, &window(&[50; 100], 2), true, 1000.0),
            Some((700.0, Reason::Failures))
        );
        // Never below the floor, and no change once there.
        assert_eq!(
            rate_after(&c, &window(&[900; 10], 0), true, 70.0),
            Some((60.0, Reason::Latency))
        );
        assert_eq!(rate_after(&c, &window(&[900; 10], 0), true, 60.0), None);
    }

    #[test]
    fn a_backoff_gentler_than_the_trim_cuts_by_the_backoff() {
        let c = AdaptiveConfig {
            backoff: 0.97,
            ..config()
        };
        for slow_ms in [600, 900, 5000] {
            let (cut, why) = rate_after(&c, &window(&[slow_ms; 100], 0), true, 1000.0).unwrap();
            assert_eq!(why, Reason::Latency);
            assert!((969.0..=971.0).contains(&cut), "{slow_ms} ms: {cut}");
        }
    }

    #[test]
    fn overdue_requests_count_as_slow_before_they_answer() {
        let c = config();
        let s = Signals::new(c.target_latency);
        for _ in 0..20 {
            let sent = s.send_at(0);
            s.record(sent, Duration::ZERO, Duration::from_millis(50), false);
        }
        // Three still out since t=0; at 400 ms they are not yet overdue.
        let _out: Vec<Sent> = (0..3).map(|_| s.send_at(0)).collect();
        let young = s.take_at(400, c.target_latency).0;
        assert_eq!(young.overdue, 0);
        assert_eq!(
            rate_after(&c, &young, true, 300.0),
            Some((360.0, Reason::Headroom))
        );
        // At 2 s they are: 3 of 3 slow, with no answers at all.
        let late = s.take_at(2_000, c.target_latency).0;
        assert_eq!((late.answers, late.overdue), (0, 3));
        assert_eq!(
            rate_after(&c, &late, true, 300.0),
            Some((210.0, Reason::Latency))
        );
        // A request dropped unanswered is forgotten, not overdue forever.
        drop(s.send());
        assert_eq!(s.take_at(2_000, c.target_latency).0.overdue, 3);
        // After a change, what was sent before it is no longer this
        // rate's doing.
        s.new_epoch_at(2_000);
        assert_eq!(s.take_at(4_000, c.target_latency).0.overdue, 0);
    }

    #[test]
    fn a_request_older_than_the_ring_is_not_overdue_in_a_later_period() {
        let target = Duration::from_millis(200);
        let s = Signals::new(target);
        let hung = s.send_at(0); // a slot of 25 ms: the ring covers 25.6 s
        s.new_epoch_at(1_000);
        assert_eq!(s.overdue_at(26_000, target), 0, "sent before the change");
        let late = s.send_at(25_600); // the hung one's slot, come round
        assert_eq!(s.overdue_at(26_000, target), 1, "only the one sent now");
        s.record(hung, Duration::ZERO, Duration::from_secs(30), true);
        assert_eq!(
            s.overdue_at(26_000, target),
            1,
            "its answer takes no other's count"
        );
        s.record(late, Duration::ZERO, Duration::from_secs(1), false);
        assert_eq!(s.overdue_at(26_000, target), 0);
    }

    #[test]
    fn decides_once_an_interval_and_drops_answers_from_before_a_change() {
        let ctl = Controller::new(config());
        ctl.signals.send().answer(Duration::from_millis(50), false);
        let mut before = ctl.signals.send();
        assert_eq!(ctl.step(1_000), Some(Verdict::Healthy));
        ctl.changed(0);
        // Sent before the change, answered after: not this setting's doing.
        before.answer(Duration::from_secs(5), true);
        assert_eq!(ctl.step(1_500), None, "within the interval");
        assert_eq!(ctl.step(2_000), None, "stale answers dropped: no evidence");
        ctl.signals.send().answer(Duration::from_secs(5), false);
        assert_eq!(ctl.step(3_000), Some(Verdict::Overloaded(Reason::Latency)));
        let (p, failures) = ctl.last_signals();
        assert!(p.unwrap() >= Duration::from_secs(5));
        assert_eq!(failures, 0.0);
        ctl.cut_from(900.0);
        assert_eq!(
            ctl.peak(),
            Some(900.0),
            "a cut that begins an overload marks the knee"
        );
        // Slow but faster than the overload's worst window: the cut is
        // working off the backlog.
        ctl.changed(0);
        ctl.signals.send().answer(Duration::from_secs(2), false);
        assert_eq!(ctl.step(3_500), None, "within the interval");
        assert_eq!(ctl.step(3_950), None, "improving: hold");
        ctl.signals.send().answer(Duration::from_secs(3), false);
        assert_eq!(
            ctl.step(5_000),
            None,
            "slower than the window before, faster than the worst: hold"
        );
        ctl.signals.send().answer(Duration::from_secs(6), false);
        assert_eq!(
            ctl.step(6_000),
            Some(Verdict::Overloaded(Reason::Latency)),
            "worse than the worst: cut"
        );
        ctl.cut_from(630.0);
        assert_eq!(ctl.peak(), Some(900.0), "the same overload: the knee stays");
        // After a cut for latency, the settling intervals pass unjudged;
        // then the window after them is judged, at the returned time.
        let settle = |from_ms: u64, secs: u64| {
            ctl.changed(SETTLE_INTERVALS);
            for i in 0..SETTLE_INTERVALS as u64 {
                ctl.signals.send().answer(Duration::from_secs(secs), false);
                assert_eq!(ctl.step(from_ms + 1_000 * i), None, "settling");
            }
            from_ms + 1_000 * SETTLE_INTERVALS as u64
        };
        let judged = settle(7_000, 5);
        ctl.signals.send().answer(Duration::from_secs(7), false);
        assert_eq!(ctl.step(judged), Some(Verdict::Overloaded(Reason::Latency)));
        // The backlog peaks while settling: a judged window faster than
        // that peak holds, though slower than the window cut for (7 s).
        let judged = settle(10_000, 9);
        ctl.signals.send().answer(Duration::from_secs(8), false);
        assert_eq!(ctl.step(judged), None, "past the backlog's peak: hold");
        // A healthy window ends the overload; the next one starts afresh,
        // and its first cut marks the knee again.
        ctl.signals.send().answer(Duration::from_millis(50), false);
        assert_eq!(ctl.step(judged + 1_000), Some(Verdict::Healthy));
        ctl.signals.send().answer(Duration::from_secs(1), false);
        assert_eq!(
            ctl.step(judged + 2_000),
            Some(Verdict::Overloaded(Reason::Latency)),
            "a new overload is cut for at once, however mild"
        );
        ctl.cut_from(700.0);
        assert_eq!(ctl.peak(), Some(700.0), "a new overload: a new knee");
    }
}
