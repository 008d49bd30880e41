//! A room's upstreams: weighted round-robin choice, skipping any that recently
//! failed requests (refused a connection, gave no answer within the
//! response timeout, or broke the exchange) `max_fails` times: passive
//! health with a cool-down; and any that failed `fall` active health
//! checks in a row, until they pass
//! `rise` (see `health.rs`). One the checks bring back, or back from a
//! cool-down, may take its turns gradually over `slow_start`. An operator
//! may take one out by hand (a deploy on that server) and put it back.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http::Uri;

use crate::config::file::DEFAULT_WEIGHT;

pub struct Upstream {
    /// `http(s)://host[:port]/`, the base every request's path is put on.
    pub base: Uri,
    /// `host:port`, the metric label and log field.
    pub label: String,
    /// Its turns in the rotation against the others' (`weight`).
    pub weight: u32,
    /// Milliseconds since the pool's epoch until which this upstream is
    /// skipped; 0 when healthy.
    down_until_ms: AtomicU64,
    /// Failed requests counted towards `max_fails` (kept at `max_fails`
    /// once there, so the first failure after a cool-down starts the
    /// next), and when the last was.
    fails: AtomicU32,
    last_fail_ms: AtomicU64,
    /// Out of rotation by the active health checks.
    checked_down: AtomicBool,
    /// Taken out by an operator: never sent a request, even when every
    /// other upstream is down, until put back.
    taken_out: AtomicBool,
    /// Checks in a row that disagree with `checked_down` (one checker
    /// per upstream writes it).
    streak: AtomicU32,
    /// When the checks, an operator or the end of a cool-down brought it
    /// back (ms since the epoch; the cool-down's end may be ahead), while
    /// its slow start runs; 0 otherwise.
    back_at_ms: AtomicU64,
    /// Its turns in rotation since then, taken or passed on.
    turns: AtomicU64,
}

pub struct UpstreamPool {
    upstreams: Vec<Upstream>,
    /// The rotation: each upstream's index as many times as its weight,
    /// spread out (nginx's smooth weighted round robin, laid out once),
    /// so a weight of 3 against 1 goes a, a, b, a rather than a, a, a, b.
    wheel: Vec<usize>,
    next: AtomicUsize,
    /// Where a turn an upstream in its slow start passes up goes: spread
    /// over the others, not always to the next in line.
    spill: AtomicUsize,
    /// Where the turn of an upstream that is out goes, likewise.
    detour: AtomicUsize,
    passive: PassiveHealth,
    slow_start_ms: u64,
    /// The health checks' tasks: stopped with the pool (a reload replaced
    /// it), so two checkers never judge one upstream.
    checks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
}

/// `host:port`, the port written out (80 for http, 443 for https): two
/// upstreams differ by it, `http://x` and `https://x` included.
pub fn label(base: &Uri) -> String {
    let host = base.host().unwrap_or_default();
    let port = base
        .port_u16()
        .unwrap_or(if base.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Drop for UpstreamPool {
    fn drop(&mut self) {
        self.stop_checks();
    }
}

/// Passive health: `max_fails` failed requests take an upstream out for
/// `cooldown`; they add up until a request sent `cooldown` after the last
/// of them succeeds (nginx's `max_fails` and `fail_timeout`). 0 never
/// takes one out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    pub max_fails: u32,
    pub cooldown: Duration,
}

/// What a failed request did to its upstream, for the warning about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    CoolingDown,
    /// Not yet out: this many of `max` failures counted.
    Counted {
        fails: u32,
        max: u32,
    },
    /// `max_fails = 0`.
    NotCounted,
}

impl std::fmt::Display for AfterFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AfterFailure::CoolingDown => f.write_str("cooling down"),
            AfterFailure::Counted { fails, max } => {
                write!(
                    f,
                    "{fails} of {max} failures before a cool-down (max_fails)"
                )
            }
            AfterFailure::NotCounted => f.write_str("not cooling down (max_fails = 0)"),
        }
    }
}

/// Why an upstream was not taken out or put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTakenOut {
    NoSuchRoom,
    NoSuchUpstream,
    /// No other upstream of the room is in rotation.
    LastInRotation,
}

/// The rotation for `weights` (each at least 1): nginx's smooth weighted
/// round robin run once through a whole cycle. Equal weights give plain
/// round robin, 0, 1, 2, ...
fn wheel(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += i64::from(*w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            best
        })
        .collect()
}

/// One clock for every pool, so a reload can carry a slow start over.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl UpstreamPool {
    /// `weights` in the order of `bases`; an upstream missing one weighs 1.
    pub fn new(
        bases: &[Uri],
        weights: &[u32],
        passive: PassiveHealth,
        slow_start: Duration,
    ) -> Self {
        let weights: Vec<u32> = (0..bases.len())
            .map(|i| weights.get(i).copied().unwrap_or(DEFAULT_WEIGHT).max(1))
            .collect();
        let upstreams = bases
            .iter()
            .zip(&weights)
            .map(|(b, &weight)| Upstream {
                label: label(b),
                weight,
                base: b.clone(),
                down_until_ms: AtomicU64::new(0),
                fails: AtomicU32::new(0),
                last_fail_ms: AtomicU64::new(0),
                checked_down: AtomicBool::new(false),
                taken_out: AtomicBool::new(false),
                streak: AtomicU32::new(0),
                back_at_ms: AtomicU64::new(0),
                turns: AtomicU64::new(0),
            })
            .collect();
        UpstreamPool {
            upstreams,
            wheel: wheel(&weights),
            next: AtomicUsize::new(0),
            spill: AtomicUsize::new(0),
            detour: AtomicUsize::new(0),
            passive,
            slow_start_ms: slow_start.as_millis() as u64,
            checks: Default::default(),
        }
    }

    /// Takes the health checks' tasks, to stop them with the pool.
    pub fn run_checks(&self, tasks: Vec<tokio::task::AbortHandle>) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(tasks);
    }

    pub fn stop_checks(&self) {
        for task in self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn get(&self, index: usize) -> &Upstream {
        &self.upstreams[index]
    }

    pub fn all(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The pool's clock: `mark_healthy` takes when the request was sent
    /// by it.
    pub fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` by the pool's clock, for an instant the caller already read
    /// (no second clock read on the request path).
    pub fn ms_at(&self, at: Instant) -> u64 {
        // Never 0, which marks no slow start.
        (at.saturating_duration_since(epoch()).as_millis() as u64).max(1)
    }

    pub fn is_healthy(&self, index: usize) -> bool {
        self.is_healthy_at(index, self.now_ms())
    }

    fn is_healthy_at(&self, index: usize, now_ms: u64) -> bool {
        let u = &self.upstreams[index];
        // Acquire: an upstream seen back sees its slow start's mark too.
        !u.checked_down.load(Ordering::Acquire)
            && !u.taken_out.load(Ordering::Acquire)
            && u.down_until_ms.load(Ordering::Acquire) <= now_ms
    }

    /// Upstreams a request may go to: all but those taken out.
    pub fn in_play(&self) -> usize {
        self.upstreams
            .iter()
            .filter(|u| !u.taken_out.load(Ordering::Relaxed))
            .count()
    }

    /// The active checks' verdict: None without checks.
    pub fn checks_pass(&self, index: usize, checked: bool) -> Option<bool> {
        checked.then(|| !self.upstreams[index].checked_down.load(Ordering::Relaxed))
    }

    pub fn is_taken_out(&self, index: usize) -> bool {
        self.upstreams[index].taken_out.load(Ordering::Relaxed)
    }

    /// An operator takes the upstream `label` out of rotation (`out`) or
    /// puts it back; put back, it starts its slow start. Whether it was
    /// out before. Taking out the last upstream in rotation leaves the
    /// room answering 502 to everyone: only with `force`.
    pub fn take_out(&self, label: &str, out: bool, force: bool) -> Result<bool, NotTakenOut> {
        let Some(index) = self
            .upstreams
            .iter()
            .position(|u| u.label.eq_ignore_ascii_case(label))
        else {
            return Err(NotTakenOut::NoSuchUpstream);
        };
        let u = &self.upstreams[index];
        if out && !force && !(0..self.len()).any(|i| i != index && self.is_healthy(i)) {
            return Err(NotTakenOut::LastInRotation);
        }
        if !out && u.taken_out.load(Ordering::Relaxed) {
            // Failures from before it was taken out say nothing of it now.
            u.fails.store(0, Ordering::Relaxed);
            if self.slow_start_ms > 0 {
                u.turns.store(0, Ordering::Relaxed);
                u.back_at_ms.store(self.now_ms(), Ordering::Relaxed);
            }
        }
        Ok(u.taken_out.swap(out, Ordering::AcqRel))
    }

    /// Keeps out what an operator took out of the pool a reload replaces
    /// (by address).
    pub fn keep_taken_out_of(&self, old: &UpstreamPool) {
        for u in &self.upstreams {
            if let Some(o) = old.upstreams.iter().find(|o| o.label == u.label) {
                let out = o.taken_out.load(Ordering::Relaxed);
                u.taken_out.store(out, Ordering::Relaxed);
            }
        }
    }

    /// Goes on with the rotation of the pool a reload replaces when it is
    /// the same one (the same upstreams, by address, with the same
    /// weights, in the same order): started again at its first slot, the
    /// first upstream would take an extra turn at every reload, and all of
    /// them where reloads come more often than requests (a renewed
    /// certificate every few minutes on a quiet night).
    pub fn keep_rotation_of(&self, old: &UpstreamPool) {
        let slots = |p: &UpstreamPool| {
            p.wheel
                .iter()
                .map(|&i| p.upstreams[i].label.clone())
                .collect::<Vec<_>>()
        };
        if slots(self) != slots(old) {
            return;
        }
        for (to, from) in [
            (&self.next, &old.next),
            (&self.spill, &old.spill),
            (&self.detour, &old.detour),
        ] {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Keeps the cool-downs and the failures counted towards `max_fails`
    /// of the pool a reload replaces (by address): a reload (a renewed
    /// certificate, say) would otherwise send people to a server that is
    /// down until it failed them again.
    pub fn keep_cooldowns_of(&self, old: &UpstreamPool) {
        if self.passive.max_fails == 0 {
            return;
        }
        for u in &self.upstreams {
            if let Some(o) = old.upstreams.iter().find(|o| o.label == u.label) {
                for (to, from) in [
                    (&u.down_until_ms, &o.down_until_ms),
                    (&u.last_fail_ms, &o.last_fail_ms),
                ] {
                    to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                u.fails
                    .store(o.fails.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Takes the checks' verdicts from the same upstreams (by address) of
    /// the pool a reload replaces.
    pub fn keep_checks_of(&self, old: &UpstreamPool) {
        for u in &self.upstreams {
            if let Some(o) = old.upstreams.iter().find(|o| o.label == u.label) {
                let down = o.checked_down.load(Ordering::Relaxed);
                u.checked_down.store(down, Ordering::Relaxed);
                let streak = o.streak.load(Ordering::Relaxed);
                u.streak.store(streak, Ordering::Relaxed);
                let back = o.back_at_ms.load(Ordering::Relaxed);
                u.back_at_ms.store(back, Ordering::Relaxed);
            }
        }
    }

    /// Counts one active check; `Some(in_rotation)` when this check moved
    /// the upstream out of rotation (`fall` failures in a row) or back
    /// (`rise` passes in a row).
    pub fn record_check(&self, index: usize, passed: bool, fall: u32, rise: u32) -> Option<bool> {
        let u = &self.upstreams[index];
        let down = u.checked_down.load(Ordering::Relaxed);
        if passed != down {
            u.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = u.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < if down { rise } else { fall } {
            return None;
        }
        u.streak.store(0, Ordering::Relaxed);
        if passed {
            // Back by `rise` passes: the failed requests that counted
            // towards `max_fails` before it went down are old news (a
            // cool-down still running is not ended: the health page can
            // pass while the portal's own pages fail).
            u.fails.store(0, Ordering::Relaxed);
            if self.slow_start_ms > 0 {
                u.turns.store(0, Ordering::Relaxed);
                u.back_at_ms.store(self.now_ms(), Ordering::Relaxed);
            }
        }
        u.checked_down.store(!down, Ordering::Release);
        Some(passed)
    }

    /// Whether upstream `index`, in rotation, takes this turn: always,
    /// but during its slow start only the share of its turns that the
    /// slow start has run (a tenth of them a tenth of the way in), spread
    /// evenly. A server just back (restarted, caches cold) that got its
    /// full share at once on a click day could fall over again, and flap.
    fn takes_turn(&self, index: usize, now_ms: u64) -> bool {
        let u = &self.upstreams[index];
        let back = u.back_at_ms.load(Ordering::Relaxed);
        if back == 0 {
            return true;
        }
        let ran = now_ms.saturating_sub(back);
        if ran >= self.slow_start_ms {
            // A check may have started a new slow start meanwhile.
            let _ = u
                .back_at_ms
                .compare_exchange(back, 0, Ordering::Relaxed, Ordering::Relaxed);
            return true;
        }
        let share = ran * 1000 / self.slow_start_ms;
        let k = u.turns.fetch_add(1, Ordering::Relaxed);
        (k + 1) * share / 1000 > k * share / 1000
    }

    /// The share of its turns upstream `index` takes now (HAProxy's
    /// effective weight): 0 out of rotation, growing to 1 over its slow
    /// start, 1 in full rotation. What an operator watches while a
    /// server warms up.
    pub fn share(&self, index: usize) -> f64 {
        self.share_at(index, self.now_ms())
    }

    fn share_at(&self, index: usize, now_ms: u64) -> f64 {
        if !self.is_healthy_at(index, now_ms) {
            return 0.0;
        }
        let back = self.upstreams[index].back_at_ms.load(Ordering::Relaxed);
        if back == 0 || self.slow_start_ms == 0 {
            return 1.0;
        }
        let ran = now_ms.saturating_sub(back).min(self.slow_start_ms);
        // In thousandths, as `takes_turn` counts it.
        (ran * 1000 / self.slow_start_ms) as f64 / 1000.0
    }

    /// The next upstream in rotation that is healthy and not in `tried`.
    /// When every untried one is out, the next untried one anyway (one
    /// merely cooling down after a failed request before one the health
    /// checks found dead): a pool that is all down must still be probed,
    /// or it never recovers without checks. With it, whether the one
    /// picked is out (every untried one is): a probe, judged at the same
    /// instant as the pick.
    pub fn pick_or_probe(&self, tried: &[usize]) -> Option<(usize, bool)> {
        let now = self.now_ms();
        self.pick_at(tried, now)
            .map(|i| (i, !self.is_healthy_at(i, now)))
    }

    /// The upstream [`Self::pick_or_probe`] picks, alone.
    #[cfg(test)]
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        self.pick_at(tried, self.now_ms())
    }

    fn pick_at(&self, tried: &[usize], now: u64) -> Option<usize> {
        let n = self.upstreams.len();
        let usable = |j: usize| !tried.contains(&j) && self.is_healthy_at(j, now);
        let slot = self.wheel[self.next.fetch_add(1, Ordering::Relaxed) % self.wheel.len()];
        // A turn whose upstream cannot take it (out, or already tried) goes
        // to the others by weight: the next on the wheel would take every
        // turn of one that is out besides its own.
        let first = if usable(slot) {
            Some(slot)
        } else {
            self.by_weight(&self.detour, &usable).next()
        };
        if let Some(i) = first {
            if self.takes_turn(i, now) {
                return Some(i);
            }
            // The turn it passes up in its slow start goes to another, by
            // weight too: the next in line would carry its whole share
            // besides its own for the whole slow start.
            let other = self
                .by_weight(&self.spill, &|j| j != i && usable(j))
                .find(|&j| self.takes_turn(j, now));
            return other.or(Some(i));
        }
        // Every untried one is out: one cooling down before one the checks
        // found dead, never one an operator took out.
        let (mut cooling, mut checked_out) = (None, None);
        for i in (0..n)
            .map(|k| (slot + k) % n)
            .filter(|i| !tried.contains(i))
        {
            let u = &self.upstreams[i];
            if u.taken_out.load(Ordering::Relaxed) {
                continue;
            }
            if u.checked_down.load(Ordering::Relaxed) {
                checked_out.get_or_insert(i);
            } else {
                cooling.get_or_insert(i);
            }
        }
        cooling.or(checked_out)
    }

    /// The upstreams `ok` allows, each once, from one chosen by weight on
    /// `counter` on: over many turns each gets its weight's share.
    fn by_weight(
        &self,
        counter: &AtomicUsize,
        ok: &dyn Fn(usize) -> bool,
    ) -> impl Iterator<Item = usize> {
        let candidates: Vec<usize> = (0..self.upstreams.len()).filter(|&j| ok(j)).collect();
        let weight = |j: usize| self.upstreams[j].weight as usize;
        let total: usize = candidates.iter().map(|&j| weight(j)).sum();
        let mut first = 0;
        if total > 0 {
            let mut k = counter.fetch_add(1, Ordering::Relaxed) % total;
            for (p, &j) in candidates.iter().enumerate() {
                if k < weight(j) {
                    first = p;
                    break;
                }
                k -= weight(j);
            }
        }
        let len = candidates.len();
        (0..len).map(move |p| candidates[(first + p) % len])
    }

    /// Counts a failed request against the upstream. Successes soon after
    /// do not undo the count (as nginx): an upstream failing one request
    /// in two still reaches `max_fails`. Concurrent failures may be
    /// counted a little loosely; the cool-down is what matters.
    pub fn mark_failed(&self, index: usize) -> AfterFailure {
        self.mark_failed_at(index, self.now_ms())
    }

    fn mark_failed_at(&self, index: usize, now: u64) -> AfterFailure {
        let max = self.passive.max_fails;
        if max == 0 {
            return AfterFailure::NotCounted;
        }
        let u = &self.upstreams[index];
        u.last_fail_ms.store(now, Ordering::Relaxed);
        let fails = u.fails.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if fails < max {
            return AfterFailure::Counted { fails, max };
        }
        u.fails.store(max, Ordering::Relaxed);
        let until = now + self.cooldown_ms();
        if self.slow_start_ms > 0 {
            // Back at the cool-down's end, as after a check's return
            // (nginx's slow_start): the failures said something is wrong
            // there, and a click day's full share at once could make more.
            // Stored before the cool-down, so a pick that sees it over
            // sees the slow start too.
            u.turns.store(0, Ordering::Relaxed);
            u.back_at_ms.store(until, Ordering::Relaxed);
        }
        u.down_until_ms.store(until, Ordering::Release);
        AfterFailure::CoolingDown
    }

    /// A request sent at `sent_ms` (by `now_ms`) was answered.
    pub fn mark_healthy(&self, index: usize, sent_ms: u64) {
        self.mark_healthy_with(index, sent_ms, || self.now_ms())
    }

    /// `now` is read only when the answer ends a cool-down.
    fn mark_healthy_with(&self, index: usize, sent_ms: u64, now: impl FnOnce() -> u64) {
        let u = &self.upstreams[index];
        // Plain loads first: the common case (nothing counted) stays a read.
        let down_until = u.down_until_ms.load(Ordering::Relaxed);
        let fails = u.fails.load(Ordering::Relaxed);
        if down_until == 0 && fails == 0 {
            return;
        }
        let window = self.cooldown_ms();
        // Sent after it was cooled down (every upstream was, and it was
        // tried anyway, or the cool-down is over): it is back. An answer
        // to a request sent before says nothing about that.
        // (A request sent in the trip's own millisecond counts as after.)
        if down_until != 0 && sent_ms >= down_until.saturating_sub(window) {
            // Not over a cool-down a failure started meanwhile.
            if u.down_until_ms
                .compare_exchange(down_until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                u.fails.store(0, Ordering::Relaxed);
                // Ended early, it is back now rather than at the cool-down's
                // planned end: its slow start runs from here. (The first
                // answer after a cool-down that simply ran out lands here
                // too; its slow start began at the end, and goes on.)
                let now = now();
                if self.slow_start_ms > 0 && now < down_until {
                    u.turns.store(0, Ordering::Relaxed);
                    u.back_at_ms.store(now, Ordering::Relaxed);
                }
            }
        } else if fails != 0
            && sent_ms
                >= u.last_fail_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(window)
        {
            u.fails.store(0, Ordering::Relaxed);
        }
    }

    fn cooldown_ms(&self) -> u64 {
        self.passive.cooldown.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> UpstreamPool {
        let ports: Vec<u16> = (9000..).take(n).collect();
        pool_on(&ports, Duration::ZERO)
    }

    /// `http://127.0.0.1:PORT/` for each of `ports`.
    fn bases(ports: impl IntoIterator<Item = u16>) -> Vec<Uri> {
        ports
            .into_iter()
            .map(|p| format!("http://127.0.0.1:{p}/").parse().unwrap())
            .collect()
    }

    /// Upstreams on 127.0.0.1 at `ports`, a minute's cool-down.
    fn pool_on(ports: &[u16], slow_start: Duration) -> UpstreamPool {
        UpstreamPool::new(&bases(ports.iter().copied()), &[], passive(1), slow_start)
    }

    fn pool_with(n: u16, passive: PassiveHealth) -> UpstreamPool {
        UpstreamPool::new(&bases(9000..9000 + n), &[], passive, Duration::ZERO)
    }

    /// A minute's cool-down after `max_fails`.
    fn passive(max_fails: u32) -> PassiveHealth {
        PassiveHealth {
            max_fails,
            cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn weights_lay_out_a_smooth_rotation() {
        assert_eq!(wheel(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(wheel(&[3, 1]), [0, 0, 1, 0]);
        assert_eq!(wheel(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        let p = UpstreamPool::new(&bases(9000..9002), &[3, 1], passive(1), Duration::ZERO);
        let picks: Vec<usize> = (0..400).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 300);
        // The heavier one out: the lighter takes every turn.
        p.mark_failed(0);
        assert!((0..8).all(|_| p.pick(&[]) == Some(1)));
        // A retry never goes back to an upstream already tried.
        assert_eq!(p.pick(&[1]), Some(0), "out, but the only untried one");
    }

    #[test]
    fn the_turns_of_an_upstream_out_go_to_the_others_by_weight() {
        let count = |weights: &[u32]| {
            let p = UpstreamPool::new(
                &bases((9000..).take(weights.len())),
                weights,
                passive(1),
                Duration::ZERO,
            );
            p.mark_failed(0);
            let mut hits = vec![0; weights.len()];
            for _ in 0..1200 {
                hits[p.pick(&[]).unwrap()] += 1;
            }
            hits
        };
        // Not all of 0's turns to the one after it on the wheel.
        assert_eq!(count(&[2, 1, 1]), [0, 600, 600]);
        assert_eq!(count(&[1, 1, 1]), [0, 600, 600]);
        assert_eq!(count(&[3, 3, 1]), [0, 900, 300]);
    }

    #[test]
    fn round_robin_visits_each() {
        let p = pool(3);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn failed_upstream_is_skipped_until_healthy() {
        let p = pool(3);
        p.mark_failed(1);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        p.mark_healthy(1, p.now_ms());
        let picks: Vec<usize> = (0..3).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(picks.contains(&1));
    }

    #[test]
    fn max_fails_take_an_upstream_out_until_a_later_request_succeeds() {
        let p = pool_with(2, passive(3));
        let t = 1_000_000;
        assert_eq!(
            p.mark_failed_at(0, t),
            AfterFailure::Counted { fails: 1, max: 3 }
        );
        assert!(p.is_healthy_at(0, t));
        // A success soon after does not undo the count.
        p.mark_healthy(0, t + 5);
        assert_eq!(
            p.mark_failed_at(0, t + 10),
            AfterFailure::Counted { fails: 2, max: 3 }
        );
        // Nor does time alone: a hung upstream met rarely adds up too.
        assert_eq!(p.mark_failed_at(0, t + 500_000), AfterFailure::CoolingDown);
        let tripped = t + 500_000;
        assert!(!p.is_healthy_at(0, tripped + 59_999));
        // An answer to a request sent before the cool-down ends nothing.
        p.mark_healthy(0, tripped - 1);
        assert!(!p.is_healthy_at(0, tripped + 1));
        assert!(p.is_healthy_at(0, tripped + 60_000));
        // After the cool-down one more failure is enough...
        assert_eq!(
            p.mark_failed_at(0, tripped + 60_001),
            AfterFailure::CoolingDown
        );
        // ...and an answer to a request sent since (tried anyway, every
        // upstream out) brings it back, the count afresh.
        p.mark_healthy(0, tripped + 60_002);
        assert!(p.is_healthy_at(0, tripped + 60_003));
        assert_eq!(
            p.mark_failed_at(0, tripped + 60_004),
            AfterFailure::Counted { fails: 1, max: 3 }
        );

        // A success sent a cool-down after the last failure clears it.
        p.mark_failed_at(1, t);
        p.mark_failed_at(1, t + 1);
        p.mark_healthy(1, t + 1 + 60_000);
        assert_eq!(
            p.mark_failed_at(1, t + 70_000),
            AfterFailure::Counted { fails: 1, max: 3 }
        );

        // Back from the health checks, or put back by an operator: the
        // failures counted before are forgotten.
        let q = pool_with(2, passive(3));
        q.mark_failed_at(0, t);
        q.mark_failed_at(0, t + 1);
        assert_eq!(q.record_check(0, false, 1, 1), Some(false));
        assert_eq!(q.record_check(0, true, 1, 1), Some(true));
        assert_eq!(
            q.mark_failed_at(0, t + 2),
            AfterFailure::Counted { fails: 1, max: 3 }
        );
        q.mark_failed_at(1, t);
        q.mark_failed_at(1, t + 1);
        let label = q.get(1).label.clone();
        assert_eq!(q.take_out(&label, true, false), Ok(false));
        assert_eq!(q.take_out(&label, false, false), Ok(true));
        assert_eq!(
            q.mark_failed_at(1, t + 2),
            AfterFailure::Counted { fails: 1, max: 3 }
        );

        let never = pool_with(1, passive(0));
        for i in 0..10 {
            assert_eq!(never.mark_failed_at(0, t + i), AfterFailure::NotCounted);
        }
        assert!(never.is_healthy_at(0, t + 10));
    }

    #[test]
    fn checks_take_an_upstream_out_after_fall_and_back_after_rise() {
        let p = pool(2);
        let (fall, rise) = (3, 2);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(
            p.record_check(0, true, fall, rise),
            None,
            "a pass breaks the run"
        );
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert_eq!(p.record_check(0, false, fall, rise), None);
        assert!(p.is_healthy(0));
        assert_eq!(p.record_check(0, false, fall, rise), Some(false));
        assert!(!p.is_healthy(0));
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 1, 1]);
        assert_eq!(p.record_check(0, true, fall, rise), None);
        assert_eq!(
            p.record_check(0, false, fall, rise),
            None,
            "a failure breaks the run"
        );
        assert_eq!(p.record_check(0, true, fall, rise), None);
        assert_eq!(p.record_check(0, true, fall, rise), Some(true));
        assert!(p.is_healthy(0));
        p.mark_healthy(0, p.now_ms());
        assert!(p.is_healthy(0));
    }

    #[test]
    fn a_reload_keeps_cooldowns_and_counts_by_address() {
        let old = pool_on(&[9000, 9001], Duration::ZERO);
        old.mark_failed(1);
        let new = UpstreamPool::new(&bases([9001]), &[], passive(3), Duration::ZERO);
        new.keep_cooldowns_of(&old);
        assert!(!new.is_healthy(0), "still cooling down after the reload");
        // Unless failures no longer cool anything down.
        let never = UpstreamPool::new(&bases([9001]), &[], passive(0), Duration::ZERO);
        never.keep_cooldowns_of(&old);
        assert!(never.is_healthy(0));
    }

    #[test]
    fn a_reload_keeps_what_the_checks_found_by_address() {
        let old = pool(2);
        for _ in 0..3 {
            old.record_check(1, false, 3, 2);
        }
        assert!(!old.is_healthy(1));
        let new = pool_on(&[9001, 9002], Duration::ZERO);
        new.keep_checks_of(&old);
        assert!(
            !new.is_healthy(0),
            "127.0.0.1:9001 was out, at index 1 then"
        );
        assert!(new.is_healthy(1));
    }

    #[test]
    fn when_all_are_out_one_cooling_down_is_tried_before_one_checked_dead() {
        let p = pool(2);
        for _ in 0..3 {
            p.record_check(0, false, 3, 2);
        }
        p.mark_failed(1);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 1, 1]);
        assert_eq!(p.pick(&[1]), Some(0), "and the dead one after it");
    }

    #[test]
    fn all_down_still_probes_and_tried_are_excluded() {
        let p = pool(2);
        p.mark_failed(0);
        p.mark_failed(1);
        assert!(p.pick(&[]).is_some());
        assert_eq!(p.pick(&[0]), Some(1));
        assert_eq!(p.pick(&[0, 1]), None);
    }

    #[test]
    fn an_upstream_back_from_its_checks_takes_its_turns_gradually() {
        let p = pool_on(&[9001, 9002], Duration::from_secs(100));
        for _ in 0..3 {
            p.record_check(1, false, 3, 1);
        }
        assert_eq!(p.record_check(1, true, 3, 1), Some(true));
        // Just back: its turns go to the other.
        let picks: Vec<usize> = (0..20).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0; 20]);
        // Alone (the other tried), it is used whatever its slow start.
        assert_eq!(p.pick(&[0]), Some(1));
        // A quarter of the way in: a quarter of its turns.
        let back = p.upstreams[1].back_at_ms.load(Ordering::Relaxed);
        let at = |ms: u64| back + ms;
        let taken = (0..4000)
            .filter(|_| p.pick_at(&[], at(25_000)) == Some(1))
            .count();
        // Of 2000 turns, a quarter; without the slow start, all 2000.
        assert_eq!(taken, 500);
        assert_eq!(p.share_at(1, at(25_000)), 0.25);
        assert_eq!(
            p.share_at(0, at(25_000)),
            1.0,
            "the other takes its full share"
        );
        // Once it has run, every turn, and the mark is gone.
        let taken = (0..100)
            .filter(|_| p.pick_at(&[], at(100_000)) == Some(1))
            .count();
        assert_eq!(taken, 50);
        assert_eq!(p.upstreams[1].back_at_ms.load(Ordering::Relaxed), 0);
        assert_eq!(p.share(1), 1.0);
        p.mark_failed(1);
        assert_eq!(p.share(1), 0.0, "out of rotation, no share");
    }

    /// As nginx's slow_start: back from a cool-down (its end, or a later
    /// request answered before it), it warms up as after the checks.
    #[test]
    fn an_upstream_back_from_a_cool_down_takes_its_turns_gradually() {
        let p = pool_on(&[9001, 9002], Duration::from_secs(100));
        let t0 = p.now_ms();
        assert_eq!(p.mark_failed_at(1, t0), AfterFailure::CoolingDown);
        let end = t0 + 60_000;
        let taken_at = |ms: u64| {
            (0..400)
                .filter(|_| p.pick_at(&[], end + ms) == Some(1))
                .count()
        };
        assert_eq!(taken_at(0), 0, "just back: its turns go to the other");
        // The first answer after the cool-down ran out does not start the
        // slow start again.
        p.mark_healthy_with(1, end + 1, || end + 1);
        assert_eq!(p.upstreams[1].back_at_ms.load(Ordering::Relaxed), end);
        assert_eq!(p.share_at(1, end + 50_000), 0.5);
        assert_eq!(taken_at(50_000), 100, "half of its 200 turns");
        assert_eq!(taken_at(100_000), 200);
        assert_eq!(p.share_at(1, end + 100_000), 1.0);

        // Ended early by a request sent after the trip: from then on, not
        // from the cool-down's planned end.
        let p = pool_on(&[9001, 9002], Duration::from_secs(100));
        let t0 = p.now_ms();
        p.mark_failed_at(1, t0);
        p.mark_healthy(1, t0);
        let back = p.upstreams[1].back_at_ms.load(Ordering::Relaxed);
        assert!(back >= t0 && back < t0 + 60_000, "{back} vs {t0}");
        assert_eq!(p.share_at(1, back + 50_000), 0.5);

        // Without a slow start, its full share at the cool-down's end.
        let p = pool(2);
        let t0 = p.now_ms();
        p.mark_failed_at(1, t0);
        assert_eq!(p.upstreams[1].back_at_ms.load(Ordering::Relaxed), 0);
        assert_eq!(p.share_at(1, t0 + 60_000), 1.0);
    }

    #[test]
    fn without_slow_start_an_upstream_back_takes_every_turn() {
        let p = pool(2);
        for _ in 0..3 {
            p.record_check(1, false, 3, 1);
        }
        p.record_check(1, true, 3, 1);
        let taken = (0..20).filter(|_| p.pick(&[]) == Some(1)).count();
        assert_eq!(taken, 10);
    }

    #[test]
    fn the_turns_it_passes_up_are_spread_over_the_others() {
        let p = pool_on(&[9001, 9002, 9003], Duration::from_secs(100));
        for _ in 0..3 {
            p.record_check(1, false, 3, 1);
        }
        p.record_check(1, true, 3, 1);
        let back = p.upstreams[1].back_at_ms.load(Ordering::Relaxed);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[p.pick_at(&[], back).unwrap()] += 1;
        }
        // Round robin to the next in line would give 2000 and 1000.
        assert_eq!(counts, [1500, 0, 1500]);
    }

    #[test]
    fn an_upstream_taken_out_gets_nothing_until_put_back() {
        let p = pool(2);
        assert_eq!(p.take_out("127.0.0.1:9000", true, false), Ok(false));
        assert_eq!(
            p.take_out("127.0.0.1:9999", true, false),
            Err(NotTakenOut::NoSuchUpstream)
        );
        assert_eq!(
            p.take_out("127.0.0.1:9001", true, false),
            Err(NotTakenOut::LastInRotation),
            "the last in rotation only with force"
        );
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 1, 1, 1]);
        // Not even when the other is down.
        p.mark_failed(1);
        assert_eq!(p.pick(&[]), Some(1));
        assert_eq!(p.pick(&[1]), None);
        p.mark_healthy(1, p.now_ms());
        let reloaded = pool_on(&[9000, 9001], Duration::ZERO);
        reloaded.keep_taken_out_of(&p);
        assert!(reloaded.is_taken_out(0) && !reloaded.is_healthy(0));
        assert_eq!(reloaded.take_out("127.0.0.1:9000", false, false), Ok(true));
        let picks: Vec<usize> = (0..4).map(|_| reloaded.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
    }

    #[test]
    fn a_reload_goes_on_with_the_same_rotation() {
        let p = pool_on(&[9001, 9002, 9003], Duration::ZERO);
        assert_eq!(p.pick(&[]), Some(0));
        let reloaded = pool_on(&[9001, 9002, 9003], Duration::ZERO);
        reloaded.keep_rotation_of(&p);
        let picks: Vec<usize> = (0..3).map(|_| reloaded.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 0]);
        // Another rotation starts at its own beginning.
        let changed = pool_on(&[9001, 9003], Duration::ZERO);
        changed.keep_rotation_of(&reloaded);
        assert_eq!(changed.pick(&[]), Some(0));
    }

    #[test]
    fn an_upstream_put_back_starts_its_slow_start() {
        let p = pool_on(&[9001, 9002], Duration::from_secs(100));
        assert_eq!(p.take_out("127.0.0.1:9002", true, false), Ok(false));
        assert_eq!(p.upstreams[1].back_at_ms.load(Ordering::Relaxed), 0);
        assert_eq!(p.take_out("127.0.0.1:9002", false, false), Ok(true));
        let back = p.upstreams[1].back_at_ms.load(Ordering::Relaxed);
        assert!(back > 0, "put back, it warms up");
        let picks: Vec<usize> = (0..10).map(|_| p.pick_at(&[], back).unwrap()).collect();
        assert_eq!(picks, vec![0; 10]);
        // Forced, the last one goes too, and then nothing is in play.
        assert_eq!(p.take_out("127.0.0.1:9002", true, false), Ok(false));
        assert_eq!(p.take_out("127.0.0.1:9001", true, true), Ok(false));
        assert_eq!(p.in_play(), 0);
        assert_eq!(p.pick(&[]), None);
    }
}
