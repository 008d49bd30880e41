//! The admission state of one room and the rules that move it: the queue
//! counter, the serving counter advanced each tick by
//! min(rate budget, free capacity, people waiting), the claim window that
//! gives unclaimed slots back, and the pre-queue opening. Pure data and
//! arithmetic on a `now` passed in: the store holds it, tests drive it.
//!
//! Memory is fixed-size whatever the queue length: counters, a token
//! bucket, the batches still inside the claim window, and the claimed
//! ticket numbers inside that window (at most rate x claim window).

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

/// How a room lets people in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Mode {
    /// Admit directly while there is room and nobody waits; queue otherwise.
    Queue,
    /// Everyone without a pass takes a ticket; admission only by the queue.
    QueueAll,
    /// Nobody new is admitted; tickets are still handed out.
    Paused,
    /// No gate at all: a plain proxy.
    Passthrough,
    /// Nobody new gets in or in line; pass holders finish.
    Closed,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "queue" => Mode::Queue,
            "queue_all" => Mode::QueueAll,
            "paused" => Mode::Paused,
            "passthrough" => Mode::Passthrough,
            "closed" => Mode::Closed,
            _ => return None,
        })
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Mode {
        [
            Mode::Queue,
            Mode::QueueAll,
            Mode::Paused,
            Mode::Passthrough,
            Mode::Closed,
        ]
        .get(v as usize)
        .copied()
        .unwrap_or(Mode::Queue)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Queue => "queue",
            Mode::QueueAll => "queue_all",
            Mode::Paused => "paused",
            Mode::Passthrough => "passthrough",
            Mode::Closed => "closed",
        }
    }

    /// Whether a room in this mode passes requests through the gate, when
    /// it has limits or an opening (`limited`): always in a mode that
    /// queues, pauses or closes; never in passthrough; in `queue` only
    /// with limits (without, it is a plain proxy).
    pub fn gates(self, limited: impl FnOnce() -> bool) -> bool {
        match self {
            Mode::Passthrough => false,
            Mode::Paused | Mode::Closed | Mode::QueueAll => true,
            Mode::Queue => limited(),
        }
    }

    fn admits(self) -> bool {
        matches!(self, Mode::Queue | Mode::QueueAll)
    }
}

/// The highest rate a room takes, new sessions a minute (16 million a
/// second, past any portal): far above it the token bucket's burst, a
/// tick's worth, overflowed to infinity, which the snapshot writes as
/// null and the next start cannot read back (every place in line lost
/// with it).
pub const MAX_PER_MINUTE: f64 = 1e9;

/// The highest `max_active` a room takes (a thousand times any portal's):
/// past it a value from the admin API could reach the room's mark for
/// "unlimited" (`u64::MAX`) and turn a cap into none, and in cluster
/// mode Redis's scripts count in doubles, exact only below 2^53.
pub const MAX_ACTIVE: u64 = 1_000_000_000;

/// A room's limits as the admission rules need them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// New sessions per minute; `None`: unlimited.
    pub per_minute: Option<f64>,
    /// Live sessions at once; `None`: unlimited.
    pub max_active: Option<u64>,
    pub claim_window_ms: u64,
    pub tick_ms: u64,
    /// Scheduled opening, unix ms.
    pub opens_at_ms: Option<u64>,
    pub mode: Mode,
    /// How long a ticket stays valid: what the shared store keeps a block
    /// of provisional tickets for. 0: not known (a block is kept).
    pub ticket_ttl_ms: u64,
    /// How long a session lives without a request: what tells an expiry
    /// stamped before the clock stepped back from one stamped since, in
    /// the shared store. 0: not known.
    pub session_idle_ms: u64,
}

impl Limits {
    /// Token bucket size: one tick's worth of admissions plus one, so any
    /// 60 s window admits at most the rate plus about one tick's worth.
    /// The one more keeps the fraction a tick leaves over: with a bucket
    /// of exactly a tick's worth (or 1), 0.8 admissions a tick refilled to
    /// 1.6, was cut to 1, and 48 a minute became 30.
    fn burst(&self) -> f64 {
        match self.per_minute {
            Some(r) => r * self.tick_ms as f64 / 60_000.0 + 1.0,
            None => f64::INFINITY,
        }
    }
}

/// Tickets that became eligible together, while their claim window is open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub at_ms: u64,
    pub from: u64,
    pub to: u64,
    pub claimed: u64,
}

impl Batch {
    fn unclaimed(&self) -> u64 {
        (self.to + 1 - self.from) - self.claimed
    }
}

/// What a fresh arrival gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issued {
    /// A place in line.
    Number(u64),
    /// A pre-queue number: the place is drawn by lot at opening.
    PreQueue(u64),
    /// Handed out by one node while the shared store was away: the
    /// `seq`-th of its outage `epoch`; placed when the store returns.
    Provisional { epoch: u64, seq: u64 },
}

/// What a ticket holder's claim comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    Admitted,
    /// Not eligible yet: this many places from the front (1 = next).
    NotYet {
        position: u64,
    },
    /// Eligible once, but not claimed within the claim window.
    Expired,
    /// This ticket already became a pass.
    AlreadyClaimed,
    /// The number is of another run of the queue than the store's (Redis
    /// lost its data since the ticket was signed): somebody else's now, or
    /// a place the new run never gave. The ticket holds none.
    OtherRun,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AdmissionState {
    /// Tickets issued: effective numbers 1..=queue.
    pub queue: u64,
    /// The highest number that may claim a pass.
    pub serving: u64,
    /// Pre-queue tickets issued before the opening.
    pub prequeue: u64,
    /// True once a scheduled opening has happened (or when there is none).
    pub opened: bool,
    pub tokens: f64,
    pub refilled_ms: u64,
    pub batches: VecDeque<Batch>,
    pub claimed: BTreeSet<u64>,
    /// Numbers at or below this can no longer claim.
    pub floor: u64,
    pub admitted_total: u64,
    pub abandoned_total: u64,
    /// (time, serving) samples over the last minute: the observed rate.
    pub history: VecDeque<(u64, u64)>,
    /// (time, numbers called since the line formed) at each tick over the
    /// last minute that found people waiting: the pace of the line, what
    /// a wait is estimated from. Not the observed rate: a room filling
    /// admits at once many more than its line will ever move at, and a
    /// wait counted from that would be promised several times too short.
    #[serde(default)]
    pub pace: VecDeque<(u64, u64)>,
    /// When this line first found the room full (its free slots no more
    /// than it could take): see `record_pace`.
    #[serde(default)]
    pub pace_full: Option<u64>,
    /// The full room has turned over once since, or a minute passed: its
    /// pace is worth telling.
    #[serde(default)]
    pub pace_settled: bool,
    /// This run of the queue, drawn at random when its counters start
    /// from nothing; tickets carry it, so one from an earlier run (a
    /// start without the snapshot) is not taken for a number of this one.
    /// 0 in a snapshot from before it was kept: the store gives it one
    /// (its tickets carry none, and count as of any run).
    #[serde(default)]
    pub generation: u64,
    /// The scheduled opening this queue was last run for before it
    /// opened, and so opened at: part of the pre-queue lottery's seed. A
    /// restart under another `opens_at` would draw every pre-queue place
    /// again; kept so the start can refuse it, as a reload does. `None`:
    /// no opening, or a snapshot from before it was kept.
    #[serde(default)]
    pub opening_ms: Option<u64>,
}

/// How far behind a time already seen the clock must be to be taken as
/// stepped back, not merely a tick that ran late. In cluster mode only
/// against the same node's own times (admission.lua: the ticker's last
/// tick; `RedisRoom`: this node's): every node gives its own time, and a
/// reset against another's, a little ahead, would let a node ahead count
/// the gap again at every call.
pub const STEPPED_BACK_MS: u64 = 5_000;

/// A session's expiry stamped before the clock stepped back: further
/// ahead of `now_ms` than twice the idle time (a restored session's
/// bound), it runs one idle time from now instead. None: as it was, or
/// `idle_ms` not known (0). admission.lua's `mend_step_back` has the
/// same bound.
pub fn expiry_after_step_back(expiry_ms: u64, now_ms: u64, idle_ms: u64) -> Option<u64> {
    (idle_ms > 0 && expiry_ms > now_ms + 2 * idle_ms + STEPPED_BACK_MS).then_some(now_ms + idle_ms)
}

/// A queue generation: random, never 0 (0 on a ticket: not known).
pub fn new_generation() -> u64 {
    (crate::room::token::random_u128() as u64).max(1)
}

const HISTORY_MS: u64 = 60_000;

impl AdmissionState {
    pub fn new(limits: &Limits, now_ms: u64) -> Self {
        AdmissionState {
            opened: limits.opens_at_ms.is_none_or(|t| now_ms >= t),
            tokens: limits.burst().min(1.0),
            refilled_ms: now_ms,
            generation: new_generation(),
            opening_ms: limits.opens_at_ms,
            ..Default::default()
        }
    }

    /// Whether counters read back from a file hang together: a hand edit
    /// or a flipped digit that put `serving` past `queue` would underflow
    /// the people waiting (a panic, or in release a wrapped count and a
    /// broken FIFO).
    pub fn check(&self) -> Result<(), String> {
        if self.serving > self.queue {
            return Err(format!(
                "serving ({}) is past queue ({})",
                self.serving, self.queue
            ));
        }
        if self.floor > self.serving {
            return Err(format!(
                "floor ({}) is past serving ({})",
                self.floor, self.serving
            ));
        }
        for b in &self.batches {
            if b.from == 0 || b.from > b.to || b.to > self.serving || b.claimed > b.to - b.from + 1
            {
                return Err(format!(
                    "batch {}..={} (claimed {}) does not fit serving {}",
                    b.from, b.to, b.claimed, self.serving
                ));
            }
        }
        if !self.tokens.is_finite() {
            return Err("tokens is not a number".into());
        }
        Ok(())
    }

    /// Slots promised to eligible tickets that have not claimed yet.
    pub fn reserved(&self) -> u64 {
        self.batches.iter().map(Batch::unclaimed).sum()
    }

    pub fn waiting(&self) -> u64 {
        self.queue - self.serving
    }

    fn refill(&mut self, limits: &Limits, now_ms: u64) {
        // A clock stepped back (NTP, a restore on a host behind) counts
        // from its new time, or no token came for as long as it went back
        // and a room with a rate admitted nobody meanwhile.
        if now_ms + STEPPED_BACK_MS < self.refilled_ms {
            self.refilled_ms = now_ms;
        }
        let elapsed = now_ms.saturating_sub(self.refilled_ms);
        self.refilled_ms = self.refilled_ms.max(now_ms);
        if let Some(r) = limits.per_minute {
            self.tokens = (self.tokens + r * elapsed as f64 / 60_000.0).min(limits.burst());
        }
    }

    fn free(&self, limits: &Limits, active: u64) -> u64 {
        match limits.max_active {
            Some(max) => max.saturating_sub(active + self.reserved()),
            None => u64::MAX,
        }
    }

    fn budget(&self, limits: &Limits) -> u64 {
        match limits.per_minute {
            Some(_) => self.tokens.max(0.0).floor() as u64,
            None => u64::MAX,
        }
    }

    /// Opens the room if its time has come; true when it opened now.
    pub fn maybe_open(&mut self, limits: &Limits, now_ms: u64) -> bool {
        if self.opened {
            return false;
        }
        self.opening_ms = limits.opens_at_ms;
        if limits.opens_at_ms.is_some_and(|t| now_ms < t) {
            return false;
        }
        self.open();
        true
    }

    pub fn open(&mut self) {
        // The pre-queue takes places 1..=P in the lottery's order; those
        // who come after follow in arrival order.
        self.opened = true;
        self.queue += self.prequeue;
    }

    fn expire_batches(&mut self, limits: &Limits, now_ms: u64) {
        // A clock stepped back (NTP, a snapshot restored on a host
        // behind) would hold each turn called for its claim window plus
        // the step, its slot with it: a full room admitting nobody for
        // as long. Their windows run from now instead.
        if self
            .batches
            .back()
            .is_some_and(|b| b.at_ms > now_ms + STEPPED_BACK_MS)
        {
            for b in self.batches.iter_mut() {
                b.at_ms = b.at_ms.min(now_ms);
            }
        }
        while let Some(b) = self.batches.front() {
            if b.at_ms + limits.claim_window_ms > now_ms {
                break;
            }
            let b = self.batches.pop_front().expect("front exists");
            self.abandoned_total += b.unclaimed();
            self.floor = self.floor.max(b.to);
        }
        let floor = self.floor;
        self.claimed = self.claimed.split_off(&(floor + 1));
    }

    /// The line's pace: a tick that finds nobody waiting (or nobody
    /// called, paused) ends it, so the next line's is measured from when
    /// it forms, not over the quiet or the stop before it. `full`: this
    /// tick's free slots were no more than the line could take. The
    /// first such tick starts it again, its calls not counted: until
    /// then the line was filling the room's empty slots, a hundred in a
    /// second where, full, it moves only as fast as people leave. And
    /// how fast that is, the first to leave do not tell: the quick ones
    /// (or, sessions alike, nobody for a while, then everyone): it is
    /// told once as many have been called as the room holds, or after a
    /// minute.
    fn record_pace(
        &mut self,
        line: bool,
        full: bool,
        called: u64,
        max_active: Option<u64>,
        now_ms: u64,
    ) {
        // A clock stepped back starts it again too: a span measured
        // backwards says nothing. Not a tick a few ms behind the last: a
        // tick run at once for a released session can take the lock
        // before a scheduled one that read the clock earlier.
        let stepped_back = self
            .pace
            .back()
            .is_some_and(|(t, _)| *t > now_ms + STEPPED_BACK_MS);
        if !line || stepped_back {
            self.pace.clear();
            self.pace_full = None;
            self.pace_settled = false;
        }
        if !line {
            return;
        }
        let filled = full && self.pace_full.is_none();
        if filled {
            self.pace.clear();
            self.pace_full = Some(now_ms);
        }
        let called = if filled { 0 } else { called };
        let before = self.pace.back().map_or(0, |(_, c)| *c);
        sample(&mut self.pace, before + called, now_ms);
        if let Some(since) = self.pace_full {
            self.pace_settled |=
                before + called >= max_active.unwrap_or(0) || now_ms >= since + HISTORY_MS;
        }
    }

    /// One admission tick. Returns how many tickets became eligible.
    pub fn tick(&mut self, limits: &Limits, active: u64, now_ms: u64) -> u64 {
        self.maybe_open(limits, now_ms);
        self.refill(limits, now_ms);
        self.expire_batches(limits, now_ms);
        let mut advanced = 0;
        let line = limits.mode.admits() && self.opened && self.waiting() > 0;
        let free = self.free(limits, active);
        let full = limits.max_active.is_some() && free <= self.waiting().min(self.budget(limits));
        if limits.mode.admits() && self.opened {
            advanced = self.waiting().min(free).min(self.budget(limits));
            if advanced > 0 {
                let (from, to) = (self.serving + 1, self.serving + advanced);
                self.batches.push_back(Batch {
                    at_ms: now_ms,
                    from,
                    to,
                    // A pass taken back after a crash before its number
                    // was called again claimed it ahead.
                    claimed: self.claimed.range(from..=to).count() as u64,
                });
                self.serving += advanced;
                if limits.per_minute.is_some() {
                    self.tokens -= advanced as f64;
                }
            }
        }
        sample(&mut self.history, self.serving, now_ms);
        self.record_pace(line, full, advanced, limits.max_active, now_ms);
        advanced
    }

    /// A new arrival: a number, or a pre-queue number before the opening.
    pub fn issue(&mut self, limits: &Limits, now_ms: u64) -> Issued {
        self.maybe_open(limits, now_ms);
        if self.opened {
            self.queue += 1;
            Issued::Number(self.queue)
        } else {
            self.prequeue += 1;
            Issued::PreQueue(self.prequeue)
        }
    }

    /// An arrival admitted at once: only in `queue` mode, when nobody is
    /// waiting and both capacity and rate allow. Returns its number.
    pub fn admit_directly(&mut self, limits: &Limits, active: u64, now_ms: u64) -> Option<u64> {
        self.maybe_open(limits, now_ms);
        if limits.mode != Mode::Queue || !self.opened || self.waiting() > 0 {
            return None;
        }
        // A lane at no share of the rate until the next tick (nobody
        // waiting in it, people waiting in another) keeps its mark: that
        // tick's shares pay every lane the time since. Moved on here, the
        // time before the try was paid to nobody, and a room with lanes
        // called up to a fifth under its rate.
        if limits.per_minute != Some(0.0) {
            self.refill(limits, now_ms);
        }
        self.expire_batches(limits, now_ms);
        if self.free(limits, active) == 0 || self.budget(limits) == 0 {
            return None;
        }
        if limits.per_minute.is_some() {
            self.tokens -= 1.0;
        }
        self.queue += 1;
        self.serving += 1;
        let n = self.serving;
        self.admitted_total += 1;
        // Recorded as a claimed batch so the numbers stay contiguous.
        match self.batches.back_mut() {
            Some(b) if b.to + 1 == n && b.at_ms + limits.tick_ms > now_ms => {
                b.to = n;
                b.claimed += 1;
            }
            _ => self.batches.push_back(Batch {
                at_ms: now_ms,
                from: n,
                to: n,
                claimed: 1,
            }),
        }
        self.claimed.insert(n);
        Some(n)
    }

    /// A ticket holder asks to come in.
    pub fn claim(&mut self, n: u64, limits: &Limits, now_ms: u64) -> Claim {
        self.expire_batches(limits, now_ms);
        if n > self.serving {
            return Claim::NotYet {
                position: n - self.serving,
            };
        }
        if n <= self.floor {
            return Claim::Expired;
        }
        if !self.claimed.insert(n) {
            return Claim::AlreadyClaimed;
        }
        if let Some(b) = self.batches.iter_mut().find(|b| b.from <= n && n <= b.to) {
            b.claimed += 1;
        }
        self.admitted_total += 1;
        Claim::Admitted
    }

    /// Tickets made eligible per second over the last minute.
    pub fn observed_rate(&self) -> f64 {
        per_second(&self.history)
    }

    /// Numbers called per second from the line, over the last minute it
    /// stood (see `pace`); 0 until two ticks have seen the line, and while
    /// a full room's is not settled (see `record_pace`).
    pub fn pace(&self) -> f64 {
        if self.pace_full.is_some() && !self.pace_settled {
            return 0.0;
        }
        per_second(&self.pace)
    }
}

/// A (time, count) sample, and those older than a minute dropped; all
/// of them after a clock stepped back: a span measured backwards said
/// nothing for minutes (the rate read 0), then minutes of progress over
/// seconds (hundreds of times the rate), on the operator's dashboard.
fn sample(samples: &mut VecDeque<(u64, u64)>, value: u64, now_ms: u64) {
    if samples
        .back()
        .is_some_and(|(t, _)| *t > now_ms + STEPPED_BACK_MS)
    {
        samples.clear();
    }
    samples.push_back((now_ms, value));
    while samples
        .front()
        .is_some_and(|(t, _)| *t + HISTORY_MS < now_ms)
    {
        samples.pop_front();
    }
}

/// How fast a count grew over (time, count) samples, per second.
fn per_second(samples: &VecDeque<(u64, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some((t0, v0)), Some((t1, v1))) if t1 > t0 => {
            v1.saturating_sub(*v0) as f64 * 1000.0 / (t1 - t0) as f64
        }
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_minute: Option<f64>, max_active: Option<u64>) -> Limits {
        Limits {
            per_minute,
            max_active,
            claim_window_ms: 60_000,
            tick_ms: 1_000,
            opens_at_ms: None,
            mode: Mode::Queue,
            ticket_ttl_ms: 86_400_000,
            session_idle_ms: 300_000,
        }
    }

    #[test]
    fn direct_admission_until_full_then_fifo_numbers() {
        let l = limits(None, Some(3));
        let mut s = AdmissionState::new(&l, 0);
        let mut active = 0;
        for expect in 1..=3 {
            assert_eq!(s.admit_directly(&l, active, 0), Some(expect));
            active += 1;
        }
        assert_eq!(s.admit_directly(&l, active, 0), None);
        assert_eq!(s.issue(&l, 0), Issued::Number(4));
        assert_eq!(s.issue(&l, 0), Issued::Number(5));
        assert_eq!(s.claim(5, &l, 0), Claim::NotYet { position: 2 });
        // Someone leaves: the next tick makes number 4 (only) eligible.
        active -= 1;
        assert_eq!(s.tick(&l, active, 1_000), 1);
        assert_eq!(s.claim(5, &l, 1_000), Claim::NotYet { position: 1 });
        assert_eq!(s.claim(4, &l, 1_000), Claim::Admitted);
        assert_eq!(s.claim(4, &l, 1_000), Claim::AlreadyClaimed);
        // Nobody may jump the line while people wait.
        assert_eq!(s.admit_directly(&l, active, 1_000), None);
    }

    #[test]
    fn a_clock_stepped_back_still_refills() {
        let l = limits(Some(60.0), None);
        let mut s = AdmissionState::new(&l, 600_000);
        for _ in 0..100 {
            s.issue(&l, 600_000);
        }
        // NTP takes the clock ten minutes back: a second later, a token.
        let mut called = 0;
        for t in 1..=10 {
            called += s.tick(&l, 0, t * 1_000);
        }
        assert!(called >= 9, "{called} called in 10 s at 60 a minute");
        // A tick a little late counts no time twice.
        s.tick(&l, 0, 20_000);
        assert_eq!(s.tick(&l, 0, 19_000), 0);
    }

    /// The rate seen over the last minute is the rate the room admits at
    /// right after the clock stepped back, not 0 for minutes, then a
    /// surge.
    #[test]
    fn a_clock_stepped_back_keeps_the_observed_rate() {
        let l = limits(Some(600.0), None);
        let mut s = AdmissionState::new(&l, 600_000);
        for _ in 0..10_000 {
            s.issue(&l, 600_000);
        }
        for t in 601..=660 {
            s.tick(&l, 0, t * 1_000);
        }
        assert!(
            (s.observed_rate() - 10.0).abs() < 0.5,
            "{}",
            s.observed_rate()
        );
        // Five minutes back.
        for t in 361..=420 {
            s.tick(&l, 0, t * 1_000);
            if t >= 363 {
                let rate = s.observed_rate();
                assert!((rate - 10.0).abs() < 1.0, "{rate} a second at {t} s");
            }
        }
    }

    /// Turns called before the clock stepped back lapse one claim window
    /// after the step, not after the window and the step.
    #[test]
    fn a_clock_stepped_back_holds_no_turn_longer() {
        let l = limits(None, Some(1));
        let mut s = AdmissionState::new(&l, 600_000);
        s.issue(&l, 600_000);
        s.issue(&l, 600_000);
        assert_eq!(s.tick(&l, 0, 601_000), 1);
        // Ten minutes back: number 1's slot is held for its window...
        assert_eq!(s.tick(&l, 0, 62_000), 0);
        // ...from the step on, and then number 2 is called.
        assert_eq!(s.tick(&l, 0, 122_000), 1);
    }

    #[test]
    fn rate_holds_over_a_simulated_hour() {
        let l = limits(Some(600.0), None);
        let mut s = AdmissionState::new(&l, 0);
        for _ in 0..100_000 {
            s.issue(&l, 0);
        }
        let mut per_minute = Vec::new();
        let mut last = 0;
        for sec in 1..=3600u64 {
            s.tick(&l, 0, sec * 1000);
            if sec % 60 == 0 {
                per_minute.push(s.serving - last);
                last = s.serving;
            }
        }
        // Every minute: 600, at most one tick's worth (10) over.
        assert!(
            per_minute.iter().all(|&m| (590..=610).contains(&m)),
            "{per_minute:?}"
        );
        let total: u64 = per_minute.iter().sum();
        assert!((36_000 - 10..=36_000 + 10).contains(&total), "{total}");
    }

    /// One tick, everyone it called coming in at once: a session each,
    /// counted in `inside`. Returns how many it called.
    fn tick_and_come_in(s: &mut AdmissionState, l: &Limits, inside: &mut u64, now: u64) -> u64 {
        let called = s.tick(l, *inside, now);
        for n in s.serving + 1 - called..=s.serving {
            assert_eq!(s.claim(n, l, now), Claim::Admitted);
        }
        *inside += called;
        called
    }

    /// The pace is each line's own: measured from the tick that first
    /// finds it, not over the quiet before it nor a pause in it.
    #[test]
    fn the_pace_is_measured_from_when_the_line_formed() {
        let mut l = limits(Some(60.0), None);
        let mut s = AdmissionState::new(&l, 0);
        for sec in 1..=30 {
            s.tick(&l, 0, sec * 1000);
        }
        assert_eq!(s.pace(), 0.0, "no line yet");
        for _ in 0..100 {
            s.issue(&l, 30_000);
        }
        s.tick(&l, 0, 31_000);
        assert_eq!(s.pace(), 0.0, "one tick tells no pace");
        for sec in 32..=40 {
            s.tick(&l, 0, sec * 1000);
        }
        // One a second since the line formed, not 10 over 40 s.
        assert_eq!(s.pace(), 1.0);
        assert!(s.observed_rate() < 0.3, "{}", s.observed_rate());
        l.mode = Mode::Paused;
        s.tick(&l, 0, 41_000);
        assert_eq!(s.pace(), 0.0, "paused, the line stands");
        l.mode = Mode::Queue;
        for sec in 42..=51 {
            s.tick(&l, 0, sec * 1000);
        }
        // Measured again from the first tick after the pause: 9 in 9 s.
        assert_eq!(s.pace(), 1.0);
        // A tick that read the clock a moment before the last one took
        // the lock (one run at once for a released session) keeps it.
        s.tick(&l, 0, 50_990);
        assert!(s.pace() > 0.9, "{}", s.pace());
        // A clock stepped back starts it again rather than span nothing.
        s.tick(&l, 0, 20_000);
        assert_eq!(s.pace(), 0.0);
        s.tick(&l, 0, 22_000);
        assert!(s.pace() > 0.0);
    }

    /// A room held back by `max_active` moves as fast as people leave:
    /// the calls that filled its empty slots are no part of its pace.
    #[test]
    fn filling_the_room_is_not_the_lines_pace() {
        // Five a second: the room fills over two ticks.
        let l = limits(Some(300.0), Some(10));
        let mut s = AdmissionState::new(&l, 0);
        s.tick(&l, 0, 0);
        for _ in 0..40 {
            s.issue(&l, 0);
        }
        let mut active = 0;
        assert_eq!(
            tick_and_come_in(&mut s, &l, &mut active, 1_000),
            6,
            "the empty room fills"
        );
        assert_eq!(
            tick_and_come_in(&mut s, &l, &mut active, 2_000),
            4,
            "up to max_active"
        );
        for sec in 3..=10 {
            tick_and_come_in(&mut s, &l, &mut active, sec * 1000);
        }
        assert_eq!(s.pace(), 0.0, "full, and nobody left yet");
        // One leaves every 2 s from then on.
        for sec in 11..=30 {
            if sec % 2 == 0 {
                active -= 1;
            }
            tick_and_come_in(&mut s, &l, &mut active, sec * 1000);
            if sec == 28 {
                assert_eq!(s.pace(), 0.0, "9 of the 10 inside replaced: not yet");
            }
        }
        // 10 called in the 28 s since the room was full, not 14.
        assert_eq!(s.pace(), 10.0 / 28.0);
        // Counted over ticks after it, the filling would make it 20.
        assert!(s.observed_rate() > 0.6, "{}", s.observed_rate());
    }

    /// A full room whose people stay long: its pace is told after a
    /// minute, even before all inside have been replaced.
    #[test]
    fn a_slow_full_rooms_pace_is_told_after_a_minute() {
        let l = limits(None, Some(100));
        let mut s = AdmissionState::new(&l, 0);
        for _ in 0..150 {
            s.issue(&l, 0);
        }
        let mut inside = 0;
        for sec in 0..=60 {
            if sec % 10 == 0 && sec > 0 {
                inside -= 1;
            }
            tick_and_come_in(&mut s, &l, &mut inside, sec * 1000);
            if sec == 59 {
                assert_eq!(s.pace(), 0.0);
            }
        }
        assert_eq!(s.pace(), 0.1, "6 in 60 s");
    }

    #[test]
    fn a_rate_that_is_not_whole_admissions_a_tick_holds_too() {
        // 48 a minute is 0.8 a tick: the fraction must carry over.
        for rate in [48.0, 12.0, 150.0, 7.5] {
            let l = limits(Some(rate), None);
            let mut s = AdmissionState::new(&l, 0);
            for _ in 0..10_000 {
                s.issue(&l, 0);
            }
            for sec in 1..=600u64 {
                s.tick(&l, 0, sec * 1000);
            }
            let per_minute = s.serving as f64 / 10.0;
            assert!(
                (per_minute - rate).abs() <= 0.2 + 2.0 / 10.0,
                "{rate}: {per_minute}"
            );
        }
    }

    #[test]
    fn unclaimed_slots_come_back_after_the_claim_window() {
        let l = limits(None, Some(2));
        let mut s = AdmissionState::new(&l, 0);
        for _ in 0..5 {
            s.issue(&l, 0);
        }
        assert_eq!(s.tick(&l, 0, 1_000), 2, "two eligible, both reserved");
        assert_eq!(s.tick(&l, 0, 2_000), 0, "nothing free while reserved");
        assert_eq!(s.claim(1, &l, 2_000), Claim::Admitted);
        // Number 2 never comes back; after the window its slot is free.
        assert_eq!(s.tick(&l, 1, 61_000), 1);
        assert_eq!(s.claim(2, &l, 61_000), Claim::Expired);
        assert_eq!(s.abandoned_total, 1);
        assert_eq!(s.serving, 3);
    }

    #[test]
    fn paused_and_closed_admit_nobody() {
        for mode in [Mode::Paused, Mode::Closed] {
            let mut l = limits(None, None);
            l.mode = mode;
            let mut s = AdmissionState::new(&l, 0);
            s.issue(&l, 0);
            assert_eq!(s.tick(&l, 0, 1_000), 0, "{mode:?}");
            assert_eq!(s.admit_directly(&l, 0, 1_000), None, "{mode:?}");
        }
    }

    #[test]
    fn queue_all_admits_only_through_the_queue() {
        let mut l = limits(None, Some(10));
        l.mode = Mode::QueueAll;
        let mut s = AdmissionState::new(&l, 0);
        assert_eq!(s.admit_directly(&l, 0, 0), None);
        assert_eq!(s.issue(&l, 0), Issued::Number(1));
        assert_eq!(s.tick(&l, 0, 1_000), 1);
        assert_eq!(s.claim(1, &l, 1_000), Claim::Admitted);
    }

    #[test]
    fn prequeue_opens_into_the_first_places() {
        let mut l = limits(None, Some(100));
        l.opens_at_ms = Some(10_000);
        let mut s = AdmissionState::new(&l, 0);
        assert_eq!(s.issue(&l, 0), Issued::PreQueue(1));
        assert_eq!(s.issue(&l, 5_000), Issued::PreQueue(2));
        assert_eq!(
            s.admit_directly(&l, 0, 5_000),
            None,
            "closed before opening"
        );
        assert_eq!(s.tick(&l, 0, 6_000), 0);
        // After the opening, newcomers come after the whole pre-queue.
        assert_eq!(s.issue(&l, 10_000), Issued::Number(3));
        assert_eq!(s.tick(&l, 0, 11_000), 3);
    }
}
