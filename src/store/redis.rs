//! The cluster store: every node's rooms share their counters, claim
//! windows and sessions in Redis, changed atomically by one Lua script
//! (loaded once, run by EVALSHA, re-sent on NOSCRIPT by the redis crate).
//! Exactly one node at a time advances the serving counter: the holder of
//! a lease with a TTL, which another node takes over when it lapses.
//!
//! The hot path stays local: a pass is checked against a local cache of
//! live sessions (one Redis look-up the first time a node sees it), and
//! activity is sent in one batch per tick.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt};
use redis::Script;

use super::blocks::Blocks;
use super::link::Link;
use super::skew::{RedisClock, Skew};
use super::{
    Checked, HandOver, KeyId, LiveChange, Liveness, NewSession, RoomStore, RoomView, SharedLive,
    StoreError,
};
use crate::room::admission::{
    expiry_after_step_back, Claim, Issued, Limits, Mode, STEPPED_BACK_MS,
};

const SCRIPT: &str = include_str!("admission.lua");

/// How long one Redis call may take before the node treats Redis as down.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);

/// Lost issues given back per call, and per tick: a burst of timeouts is
/// many, one script runs alone in Redis, and the rest of the tick (the
/// lease's renewal) waits behind them; what is left goes at the next.
const VOIDS_PER_CALL: usize = 200;
const VOIDS_PER_TICK: usize = 1_000;

/// Ends handed over per call after an outage: in one call, an outage's
/// worth (one per newcomer whose admission went unanswered) ran longer
/// than the store's timeout, was sent again at every tick, and kept the
/// node from ever getting past its hand-over.
const ENDS_PER_CALL: usize = 200;

/// The most ends a node keeps for Redis's return; one past them is
/// dropped, and its session, if Redis has one, idles out (a slot held
/// longer, none given twice). 100,000 is 500 calls at the return.
const ENDS_KEPT: usize = 100_000;

/// How long Redis keeps an issue's key (admission.lua's `PX`): a lost
/// answer older than this has nothing left to give back.
const ISSUE_KEPT: Duration = Duration::from_secs(300);

/// Whether Redis has forgotten the key of an issue whose answer was lost
/// at `lost`: nothing is left to give back.
fn forgotten(lost: &(String, std::time::Instant)) -> bool {
    lost.1.elapsed() >= ISSUE_KEPT
}

/// Records this node as alive and counts the nodes seen within a window;
/// with Redis's clock, which the node's is measured against.
const NODES: &str = r#"
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[3]))
return {redis.call('ZRANGE', KEYS[1], 0, -1), redis.call('TIME')}
"#;

/// Sets how far the leader's admission log has recorded the room, "run:to":
/// only in the run the state is in (a late write of a run Redis has since
/// lost would hide the current mark) and never back within one (a late
/// write of a leader that lost the lease).
const SET_AUDITED: &str = r#"
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
local cur = redis.call('GET', KEYS[2])
if cur then
  local run, to = string.match(cur, '^(%d+):(%d+)$')
  if run == ARGV[1] and tonumber(to) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[2])
return 1
"#;

/// Takes or renews the lease: the value is the node's id.
const LEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"#;

pub struct RedisStore {
    link: Arc<Link>,
    prefix: String,
    node: String,
    lease: Duration,
    /// `store.tick`: the script tells an outage from a tick's gap by it,
    /// whichever op it runs.
    tick_ms: u64,
    script: Arc<Script>,
    lease_script: Arc<Script>,
    nodes_script: Arc<Script>,
    /// This node's clock against Redis's, measured at the rooms' ticks.
    skew: Arc<Skew>,
    /// Each room's node-side state (session cache, the view, and while
    /// Redis is away the outage budget and provisional tickets), kept by
    /// name across reloads, as the memory store keeps its rooms.
    rooms: DashMap<String, Arc<RedisRoom>>,
}

impl RedisStore {
    /// Prepares the connection without waiting for Redis: a node starts
    /// (degraded) even while Redis is down, and the connection manager
    /// reconnects by itself (the link replaces what it cannot see fail).
    /// Short timeouts keep a slow Redis from holding requests: an answer
    /// later than this counts as a failure.
    pub async fn connect(
        url: &str,
        prefix: &str,
        lease: Duration,
        tick: Duration,
        tls_ca: Option<&[u8]>,
    ) -> Result<Self, String> {
        let client = match tls_ca {
            None => redis::Client::open(url),
            Some(pem) => {
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                };
                redis::Client::build_with_tls(url, certs)
            }
        }
        .map_err(|e| format!("store.url: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_connection_timeout(Some(STORE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let link = Arc::new(Link::new(client, config, STORE_TIMEOUT)?);
        let node = format!("{:032x}", crate::room::token::random_u128());
        Ok(RedisStore {
            link,
            prefix: prefix.to_string(),
            node,
            lease,
            tick_ms: tick.as_millis() as u64,
            script: Arc::new(Script::new(SCRIPT)),
            lease_script: Arc::new(Script::new(LEASE)),
            nodes_script: Arc::new(Script::new(NODES)),
            skew: Arc::default(),
            rooms: DashMap::new(),
        })
    }

    /// Connects now rather than on the first request: a visitor arriving
    /// just after the node starts would otherwise wait for the connection
    /// inside the store's timeout (and on a busy host get the 503 of a
    /// store away). An error here is not fatal: the node starts degraded
    /// and the connection manager keeps trying. Its answer is Redis's
    /// clock, measured as at a tick: the reads at start and the requests
    /// before the first tick go on Redis's clock too (a node started
    /// minutes ahead would otherwise run the others' sessions out).
    pub async fn reach(&self) -> Result<(), StoreError> {
        let mut lent = self.link.lend();
        // Connected first: a round trip that opens the connection would
        // count its setup against the measure.
        let r = redis::cmd("PING").query_async::<()>(&mut lent.conn).await;
        self.link.outcome(&lent, r)?;
        let mut lent = self.link.lend();
        let asking = self.skew.asking();
        let r = redis::cmd("TIME")
            .query_async::<Vec<String>>(&mut lent.conn)
            .await;
        let time = self.link.outcome(&lent, r)?;
        let first = !self.skew.ready();
        if let Some((asked_ms, at)) = asking {
            let offset = self.skew.measure(&time, asked_ms, at, at.elapsed());
            // What the node put by for Redis while on its own clock goes
            // to Redis on Redis's (the node's clock jumps here, by its
            // offset).
            if let Some(offset) = offset.filter(|_| first && self.skew.ready()) {
                for room in self.rooms.iter() {
                    room.onto_rediss_clock(offset);
                }
            }
        }
        Ok(())
    }

    /// Whether the node runs on Redis's clock yet (see [`Skew::ready`]):
    /// until then, [`RedisStore::reach`] comes before each tick.
    pub fn clock_ready(&self) -> bool {
        self.skew.ready()
    }

    /// Measures `clock` against Redis's at the start and at each tick,
    /// into `gauge` (`varco_store_clock_offset_seconds`), and gives back
    /// the clock the node is to run on: Redis's (see [`RedisClock`]).
    /// Must come before [`RedisStore::reach`].
    pub fn watch_clock(
        &self,
        clock: crate::clock::SharedClock,
        gauge: prometheus::GaugeVec,
    ) -> crate::clock::SharedClock {
        self.skew.watch(clock.clone(), gauge);
        Arc::new(RedisClock {
            node: clock,
            skew: self.skew.clone(),
        })
    }

    /// Counts each time the connection to Redis is replaced.
    pub fn count_replacements(&self, counter: prometheus::IntCounterVec) {
        self.link.count_replacements(counter);
    }

    /// The room named `name`: the one already made, if any, so a reload
    /// loses none of what this node holds for it.
    pub fn room(&self, name: &str) -> Arc<RedisRoom> {
        self.rooms
            .entry(name.to_string())
            .or_insert_with(|| self.new_room(name))
            .clone()
    }

    fn new_room(&self, name: &str) -> Arc<RedisRoom> {
        let k = |s: &str| format!("{}{{{name}}}:{s}", self.prefix);
        Arc::new(RedisRoom {
            link: self.link.clone(),
            keys: [
                k("state"),
                k("batches"),
                k("claimed"),
                k("sessions"),
                k("history"),
                k("provisional"),
                k("ended"),
                k("pace"),
                k("void"),
            ],
            issued_prefix: k("issued:"),
            lease_key: k("lease"),
            nodes_key: k("nodes"),
            live_key: k("live"),
            audited_key: k("audited"),
            node: self.node.clone(),
            lease_ms: self.lease.as_millis() as u64,
            tick_ms: self.tick_ms,
            script: self.script.clone(),
            lease_script: self.lease_script.clone(),
            nodes_script: self.nodes_script.clone(),
            skew: self.skew.clone(),
            peers: AtomicU64::new(1),
            fallback: Mutex::new(Fallback::default()),
            provisional: Blocks::default(),
            // From 1: 0 is what `Seen` holds before any answer.
            calls: AtomicU64::new(1),
            view: Mutex::new(Seen::default()),
            lottery_kid: KeyId::default(),
            sessions: DashMap::new(),
            touched: DashMap::new(),
            latest_tick_ms: AtomicU64::new(0),
            holder: AtomicBool::new(false),
            renewed: Mutex::new(None),
            recovering: tokio::sync::Mutex::new(()),
            nodes_heard: Mutex::new(NodesHeard::default()),
        })
    }
}

/// What a node may do on its own while Redis is away: its share of the
/// capacity and rate that were free when Redis was last seen, split among
/// the nodes then alive, so all nodes together stay within the limits.
#[derive(Default)]
struct Fallback {
    degraded: bool,
    /// Admissions made on this node in this outage.
    admitted: u64,
    /// This outage's id and the provisional tickets handed out in it.
    epoch: u64,
    issued: u64,
    tokens: f64,
    refilled_ms: u64,
    /// Sessions admitted here meanwhile, handed to Redis on its return.
    pending: Vec<(u128, u64)>,
    /// Earlier outages' blocks (epoch, count) whose hand-over failed.
    unplaced: Vec<(u64, u64)>,
    /// Sessions the portal ended while Redis was away (sid, how long to
    /// remember the end once sent): their slots are freed when it
    /// returns, not after `session_idle`. In memory only: a node restarted
    /// in the outage forgets them, and they idle out.
    ends_to_send: std::collections::HashMap<u128, u64>,
    /// Sessions a direct admission may have made though this node refused
    /// it (its answer lost: `admit_directly`): nobody holds them. Ended
    /// at the next tick Redis answers, after the portal's ends and
    /// within their own [`ENDS_KEPT`]: in an outage of timeouts every
    /// newcomer leaves one, and sharing the portal's room they pushed
    /// its releases out within the hour.
    unheld: Vec<(u128, u64)>,
    /// The keys of issues whose answers never came (Redis slower than the
    /// timeout): each may have taken a number nobody holds, given back
    /// at the next tick ('void'), or it would be called and hold a slot
    /// for the claim window. With when each was lost: Redis keeps an
    /// issue's key [`ISSUE_KEPT`], and one older is not sent. In memory
    /// only, as the ends.
    lost_issues: Vec<(String, std::time::Instant)>,
    /// After Redis lost sessions (its data, or its last writes): the
    /// slots taken when it was last seen whole, and until when the nodes
    /// may not all have reported theirs again (admission.lua's `hold`).
    /// Until an answer after that, a share counts at least those taken:
    /// the new counts say the room is empty while it may still be full.
    taken_before_loss: Option<(u64, u64)>,
}

impl Fallback {
    /// Keeps a session nobody holds to end, within [`ENDS_KEPT`].
    fn keep_unheld(&mut self, sid: u128, remember_ms: u64) {
        if self.unheld.len() < ENDS_KEPT {
            self.unheld.push((sid, remember_ms));
        }
    }

    /// Keeps a lost issue's key for Redis's return: within [`ENDS_KEPT`],
    /// those older than [`ISSUE_KEPT`] let go first (Redis has forgotten
    /// them), so an outage of timeouts does not grow it without end. The
    /// oldest first: looked through only when it can be let go, not at
    /// each arrival of a full list.
    fn keep_lost_issue(&mut self, key: String, lost: std::time::Instant) {
        if self.lost_issues.len() >= ENDS_KEPT && self.lost_issues.first().is_some_and(forgotten) {
            self.lost_issues.retain(|l| !forgotten(l));
        }
        if self.lost_issues.len() < ENDS_KEPT {
            self.lost_issues.push((key, lost));
        }
    }

    /// Keeps an end for Redis's return, within [`ENDS_KEPT`].
    fn keep_end(&mut self, sid: u128, remember_ms: u64) {
        if self.ends_to_send.len() < ENDS_KEPT || self.ends_to_send.contains_key(&sid) {
            let kept = self.ends_to_send.entry(sid).or_insert(remember_ms);
            *kept = (*kept).max(remember_ms);
        }
    }
}

/// What a hand-over after an outage (`RedisRoom::recovered`) has yet to
/// send: put back for the next tick when dropped.
struct Recovery<'a> {
    room: &'a RedisRoom,
    blocks: Vec<(u64, u64)>,
    pending: Vec<(u128, u64)>,
    ends: Vec<(u128, u64)>,
    unheld: Vec<(u128, u64)>,
    lost_issues: Vec<(String, std::time::Instant)>,
}

impl Drop for Recovery<'_> {
    fn drop(&mut self) {
        let mut f = self.room.lock_fallback();
        // Ahead of any taken since: they are older.
        let newer = std::mem::replace(&mut f.unplaced, std::mem::take(&mut self.blocks));
        f.unplaced.extend(newer);
        let newer = std::mem::replace(&mut f.pending, std::mem::take(&mut self.pending));
        f.pending.extend(newer);
        for (sid, remember) in self.ends.drain(..) {
            f.keep_end(sid, remember);
        }
        // Ahead of any kept since, and within the same bounds.
        let newer = std::mem::replace(&mut f.unheld, std::mem::take(&mut self.unheld));
        for (sid, remember) in newer {
            f.keep_unheld(sid, remember);
        }
        let newer = std::mem::replace(&mut f.lost_issues, std::mem::take(&mut self.lost_issues));
        for (key, lost) in newer {
            f.keep_lost_issue(key, lost);
        }
    }
}

pub struct RedisRoom {
    link: Arc<Link>,
    /// state, batches, claimed, sessions, history, provisional, ended,
    /// pace, void: one hash slot per room.
    keys: [String; 9],
    /// Each issue's key begins so (the rest: a random id), in the room's
    /// hash slot: see admission.lua's 'void'.
    issued_prefix: String,
    /// Where each outage's provisional tickets were placed. One of an
    /// earlier generation is kept to tell its tickets they lost their
    /// place (Redis lost its data after placing it).
    provisional: Blocks,
    /// Calls sent, in order: which answer was written after which.
    calls: AtomicU64,
    lease_key: String,
    nodes_key: String,
    /// The operators' live changes every node follows (a hash: `version`
    /// and the fields set).
    live_key: String,
    /// "run:to": how far the leader's admission log has recorded.
    audited_key: String,
    nodes_script: Arc<Script>,
    skew: Arc<Skew>,
    /// Nodes seen alive recently (at least 1).
    peers: AtomicU64,
    /// Which nodes those are, and since when this node's ticks have
    /// heard Redis without a break (see `provisional_lost`).
    nodes_heard: Mutex<NodesHeard>,
    fallback: Mutex<Fallback>,
    node: String,
    lease_ms: u64,
    tick_ms: u64,
    script: Arc<Script>,
    lease_script: Arc<Script>,
    /// The room's state as of the last call (at most one tick old).
    view: Mutex<Seen>,
    lottery_kid: KeyId,
    /// Sessions this node has seen alive, with their expiry.
    sessions: DashMap<u128, AtomicU64>,
    /// Sessions renewed here since the last tick (sent in one batch).
    touched: DashMap<u128, u64>,
    /// The furthest time a tick of this node ran at: one well behind it
    /// is a clock stepped back (see `mend_step_back`).
    latest_tick_ms: AtomicU64,
    holder: AtomicBool,
    /// When this node last renewed the lease: past `lease_ms`, another
    /// node may hold it, whatever `holder` last said.
    renewed: Mutex<Option<std::time::Instant>>,
    /// Held while what was done without Redis is handed over.
    recovering: tokio::sync::Mutex<()>,
}

/// result, detail, queue, serving, prequeue, opened, active, reserved,
/// rate (milli/s), admitted, abandoned, [lottery kid, generation, floor,
/// pace (milli/s), n, n session ids gone, epoch, base, ...].
type Reply = (
    i64,
    i64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    Vec<String>,
);

/// Puts the shared fields back after Redis lost them, under a new version.
/// KEYS[1] the live hash; ARGV[1] the version to pass, then field,
/// value pairs. Only into an empty hash: another node put it back first,
/// or an operator changed something since the loss, which stands.
const PUT_BACK_LIVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local above = tonumber(ARGV[1])
if v <= above then
  redis.call('HSET', KEYS[1], 'version', string.format('%d', above + 1))
end
return 0
"#;

/// Shares one live change. KEYS[1] the live hash; ARGV[1] the version the
/// asking node last followed, ARGV[2], ARGV[3] the change's field and
/// value, then the other field, value pairs that node followed. Those go
/// in first while the hash is gone (Redis lost its data) and no node has
/// put it back yet: the change alone would tell every node that the
/// other brakes were dropped, and they would go back to their files'.
const SHARE_LIVE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 and #ARGV > 3 then
  for i = 4, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  redis.call('HSET', KEYS[1], 'version', ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 0
"#;

/// Drops the shared fields and names the reset by its version and
/// ARGV[1], a random word: after Redis lost its data the versions start
/// again, and a reset named by its version alone could reuse the name of
/// one a node followed before the loss, which would miss it.
const RESET_LIVE: &str = r#"
redis.call('HDEL', KEYS[1], 'mode', 'rate', 'max_active')
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'reset', v .. ':' .. ARGV[1])
return 0
"#;

/// A live change as the field of the live hash it sets.
fn live_field(change: LiveChange) -> (&'static str, String) {
    match change {
        LiveChange::Mode(m) => ("mode", m.as_str().to_string()),
        LiveChange::PerMinute(r) => ("rate", limit_text(r)),
        LiveChange::MaxActive(m) => (
            "max_active",
            m.map(|v| v.to_string()).unwrap_or_else(|| "-1".into()),
        ),
    }
}

/// `-1` is unlimited, as in the admission script's arguments.
fn limit_text(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-1".into())
}

fn limit_of(text: &str) -> Option<Option<f64>> {
    let v: f64 = text.parse().ok()?;
    if v < 0.0 {
        return Some(None);
    }
    // A rate no node of this version takes (none, not a number, past
    // MAX_PER_MINUTE: an older node's, in a rolling upgrade) is left to
    // each node's config, as a field that does not parse: past the bound
    // the token bucket overflowed, and the snapshot with it.
    (v > 0.0 && v <= crate::room::admission::MAX_PER_MINUTE).then_some(Some(v))
}

/// The shared live changes from their hash; a field that does not parse
/// (written by a newer varco, say) is left to each node's config.
fn shared_from(fields: std::collections::HashMap<String, String>) -> SharedLive {
    SharedLive {
        version: fields.get("version").cloned().unwrap_or_default(),
        reset: fields.get("reset").cloned().unwrap_or_default(),
        mode: fields.get("mode").and_then(|m| Mode::parse(m)),
        per_minute: fields.get("rate").and_then(|r| limit_of(r)),
        max_active: fields.get("max_active").and_then(|m| match m.as_str() {
            "-1" => Some(None),
            m => m
                .parse()
                .ok()
                .filter(|m| (1..=crate::room::admission::MAX_ACTIVE).contains(m))
                .map(Some),
        }),
    }
}

/// The view after a reply. Two calls' replies can be taken in the other
/// order than Redis answered them (each task locks the view after its own
/// await), so within one generation of the room's state the queue and
/// serving counters, which only grow there, never move back: a place in
/// line never jumps back, and a reload never skips a claim it is due. A
/// new generation (the state started again: Redis lost its data) is taken
/// as it is.
fn followed_by(seen: u64, had: RoomView, generation: u64, replied: RoomView) -> RoomView {
    if seen != generation {
        return replied;
    }
    let queue = had.queue.max(replied.queue);
    let serving = had.serving.max(replied.serving);
    RoomView {
        queue,
        serving,
        waiting: queue.saturating_sub(serving),
        admitted_total: had.admitted_total.max(replied.admitted_total),
        abandoned_total: had.abandoned_total.max(replied.abandoned_total),
        floor: had.floor.max(replied.floor),
        prequeue: had.prequeue.max(replied.prequeue),
        opened: had.opened || replied.opened,
        ..replied
    }
}

/// The nodes alive, as this node's last tick heard them from Redis.
#[derive(Debug, Default)]
struct NodesHeard {
    /// When this node's ticks started hearing Redis again (0: its last
    /// tick did not).
    since_ms: u64,
    /// Each live node's mark: the first 32 bits of its id, which the
    /// epochs of its outages carry.
    live: Vec<u32>,
}

/// A node's mark: the first 32 bits of its id (hex).
fn mark_of(node: &str) -> Option<u32> {
    u32::from_str_radix(node.get(..8)?, 16).ok()
}

/// The node that handed out an outage's tickets, from its epoch.
fn issuer_of(epoch: u64) -> u32 {
    (epoch >> 32) as u32
}

/// What a node has seen of a room's state in Redis.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The state's generation (0: not heard yet).
    generation: u64,
    view: RoomView,
    /// The call whose answer first named this generation.
    since_call: u64,
    /// The latest call whose answer was taken, and the admissions it
    /// counted (as answered: the view keeps the most ever seen).
    last_call: u64,
    last_admitted: u64,
}

/// Takes the answer to call `call` into what the node has seen. An answer
/// from another generation to a call sent before the one that named the
/// generation seen is late, from the state before, and is not taken.
/// Returns whether Redis lost what the node had reported: a new
/// generation (its data), or, for a later call than any taken, fewer
/// admissions counted than before (its last writes: a restart from an
/// older save, a failover to a replica that was behind).
fn take_reply(seen: &mut Seen, generation: u64, call: u64, replied: RoomView) -> bool {
    let new_state = seen.generation != 0 && generation != seen.generation;
    if new_state && call < seen.since_call {
        return false;
    }
    let latest = call > seen.last_call;
    let lost = new_state
        || (seen.generation != 0 && latest && replied.admitted_total < seen.last_admitted);
    seen.view = followed_by(seen.generation, seen.view, generation, replied);
    if generation != seen.generation {
        seen.since_call = call;
    }
    if latest || new_state {
        (seen.last_call, seen.last_admitted) = (call, replied.admitted_total);
    }
    seen.generation = generation;
    lost
}

impl RedisRoom {
    /// A clock stepped back (Redis's host's: every node runs on it) left
    /// this node's sessions stamped before the step: each would be taken
    /// for live here for its idle time plus the step, while Redis lets it
    /// lapse one idle time from the step (admission.lua), and its holder,
    /// back meanwhile, would be let in beside whoever took the slot. Until
    /// the clock is back where it was, such an expiry runs from now
    /// (`expiry_after_step_back`).
    fn mend_step_back(&self, limits: &Limits, now_ms: u64) {
        let latest = self.latest_tick_ms.fetch_max(now_ms, Ordering::Relaxed);
        let idle = limits.session_idle_ms;
        if idle == 0 || now_ms + STEPPED_BACK_MS >= latest {
            return;
        }
        for e in self.sessions.iter() {
            let exp = e.value().load(Ordering::Relaxed);
            if let Some(mended) = expiry_after_step_back(exp, now_ms, idle) {
                e.value().store(mended, Ordering::Relaxed);
            }
        }
        for mut e in self.touched.iter_mut() {
            if let Some(mended) = expiry_after_step_back(*e.value(), now_ms, idle) {
                *e.value_mut() = mended;
            }
        }
    }

    fn lock_fallback(&self) -> std::sync::MutexGuard<'_, Fallback> {
        self.fallback.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_nodes_heard(&self) -> std::sync::MutexGuard<'_, NodesHeard> {
        self.nodes_heard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Is this node the one advancing the serving counter?
    pub fn holds_lease(&self) -> bool {
        self.holder.load(Ordering::Relaxed)
    }

    /// The generation and counters this node last saw, sent with every
    /// call: a Redis that lost its last writes takes its counters back up
    /// to them (see admission.lua).
    fn seen(&self) -> (u64, RoomView) {
        let s = self.view.lock().unwrap_or_else(|e| e.into_inner());
        (s.generation, s.view)
    }

    /// Refuses, as Redis away, until the node runs on Redis's clock: a
    /// node started with Redis away and its clock off would send times
    /// off by as much (a room opened early, sessions shifted). The next
    /// tick measures first; until then, the node's own share serves.
    fn clock_ready(&self) -> Result<(), StoreError> {
        if self.skew.ready() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "Redis has not answered since this node started: its clock is not measured yet"
                    .into(),
            ))
        }
    }

    /// The times this node put by for Redis while on its own clock (off
    /// by `offset_ms`, positive ahead), moved onto Redis's: session
    /// expiries to report and the own share's refill. Called once, at the
    /// first measure.
    fn onto_rediss_clock(&self, offset_ms: i64) {
        let moved = |t: u64| t.saturating_add_signed(-offset_ms);
        for mut e in self.touched.iter_mut() {
            *e.value_mut() = moved(*e.value());
        }
        for e in self.sessions.iter() {
            let exp = e.value();
            exp.store(moved(exp.load(Ordering::Relaxed)), Ordering::Relaxed);
        }
        let mut f = self.lock_fallback();
        for (_, exp) in &mut f.pending {
            *exp = moved(*exp);
        }
        f.refilled_ms = moved(f.refilled_ms);
    }

    async fn call(
        &self,
        op: &str,
        limits: &Limits,
        now_ms: u64,
        args: &[String],
    ) -> Result<Reply, StoreError> {
        self.call_keyed(op, limits, now_ms, args, &[]).await
    }

    /// As [`Self::call`], with `extra` keys after the room's (an issue's
    /// own: see admission.lua's 'void').
    async fn call_keyed(
        &self,
        op: &str,
        limits: &Limits,
        now_ms: u64,
        args: &[String],
        extra: &[String],
    ) -> Result<Reply, StoreError> {
        self.clock_ready()?;
        let mut inv = self.script.prepare_invoke();
        for k in self.keys.iter().chain(extra) {
            inv.key(k);
        }
        inv.arg(op)
            .arg(now_ms)
            .arg(limit_text(limits.per_minute))
            .arg(limit_text(limits.max_active.map(|m| m as f64)))
            .arg(limits.claim_window_ms)
            .arg(limits.tick_ms)
            .arg(limit_text(limits.opens_at_ms.map(|t| t as f64)))
            .arg(limits.mode.as_str());
        let (generation, seen) = self.seen();
        inv.arg(generation).arg(seen.queue).arg(seen.prequeue);
        for a in args {
            inv.arg(a);
        }
        let mut lent = self.link.lend();
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let r = inv.invoke_async(&mut lent.conn).await;
        let r: Reply = self.link.outcome(&lent, r)?;
        let replied = RoomView {
            queue: r.2,
            serving: r.3,
            waiting: r.2.saturating_sub(r.3),
            prequeue: r.4,
            opened: r.5 == 1,
            active: r.6,
            reserved: r.7,
            observed_rate: r.8 as f64 / 1000.0,
            admitted_total: r.9,
            abandoned_total: r.10,
            floor: r.11.get(2).and_then(|f| f.parse().ok()).unwrap_or_default(),
            pace: r
                .11
                .get(3)
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or_default() as f64
                / 1000.0,
        };
        // The time the state started from nothing, in ms (admission.lua's
        // `gen`); 0: no answer has named one yet.
        let generation: u64 = r.11.get(1).and_then(|g| g.parse().ok()).unwrap_or_default();
        let (lost, taken_before) = {
            let mut seen = self.view.lock().unwrap_or_else(|e| e.into_inner());
            let taken = seen.view.active + seen.view.reserved;
            (take_reply(&mut seen, generation, call, replied), taken)
        };
        {
            let mut f = self.lock_fallback();
            if lost {
                let hold = now_ms + (3 * self.tick_ms).max(5_000);
                let taken = f.taken_before_loss.map_or(0, |(t, _)| t).max(taken_before);
                f.taken_before_loss = Some((taken, hold));
            } else if f
                .taken_before_loss
                .is_some_and(|(_, until)| now_ms >= until)
            {
                f.taken_before_loss = None;
            }
        }
        if lost {
            // Only this node knows which sessions it serves: reported at
            // its next tick, they count again, and a person it admitted
            // who turns up at another node is let in there.
            tracing::warn!(
                sessions = self.sessions.len(),
                "Redis lost sessions (its data, or its last writes): reporting every session this node holds again"
            );
            for s in self.sessions.iter() {
                self.touched
                    .entry(*s.key())
                    .or_insert(s.value().load(Ordering::Relaxed));
            }
        }
        let lottery_kid = r.11.first().cloned().unwrap_or_default();
        let n_gone: usize = r.11.get(4).and_then(|n| n.parse().ok()).unwrap_or_default();
        let gone = r.11.get(5..5 + n_gone).unwrap_or_default();
        for sid in gone {
            // The portal ended it through another node: not alive here.
            if let Ok(sid) = u128::from_str_radix(sid, 16) {
                self.sessions.remove(&sid);
                self.touched.remove(&sid);
            }
        }
        let blocks: Vec<(u64, u64)> = r
            .11
            .get(5 + n_gone..)
            .unwrap_or_default()
            .chunks(2)
            .filter_map(|pair| match pair {
                [epoch, base] => Some((u64::from_str_radix(epoch, 16).ok()?, base.parse().ok()?)),
                _ => None,
            })
            .collect();
        // A tick's or a view's answer names every block Redis keeps.
        self.provisional
            .named(&blocks, generation, call, matches!(op, "tick" | "view"));
        if !lottery_kid.is_empty() {
            self.lottery_kid.replace(&lottery_kid);
        }
        Ok(r)
    }

    /// A direct admission decided locally while Redis is away: only in
    /// `queue` mode, only if nobody was waiting when Redis was last seen,
    /// and within this node's share of the free capacity and the rate.
    fn admit_on_my_own(&self, limits: &Limits, session: NewSession, now_ms: u64) -> Option<u64> {
        let v = self.view();
        if limits.mode != crate::room::admission::Mode::Queue || v.waiting > 0 || !v.opened {
            return None;
        }
        let peers = self.peers.load(Ordering::Relaxed).max(1);
        let mut f = self.lock_fallback();
        // Someone took a provisional ticket here and waits: a newcomer
        // whose token refilled meanwhile goes behind them, not ahead.
        if f.issued > 0 || !f.unplaced.is_empty() {
            return None;
        }
        if !f.degraded {
            f.degraded = true;
            f.admitted = 0;
            f.tokens = 1.0;
            f.refilled_ms = now_ms;
        }
        if let Some(max) = limits.max_active {
            let taken = f.taken_before_loss.map_or(0, |(t, _)| t);
            let share = max.saturating_sub((v.active + v.reserved).max(taken)) / peers;
            if f.admitted >= share {
                return None;
            }
        }
        if let Some(rate) = limits.per_minute {
            let elapsed = now_ms.saturating_sub(f.refilled_ms) as f64;
            f.refilled_ms = f.refilled_ms.max(now_ms);
            f.tokens = (f.tokens + rate / peers as f64 * elapsed / 60_000.0).min(1.0);
            if f.tokens < 1.0 {
                return None;
            }
            f.tokens -= 1.0;
        }
        f.admitted += 1;
        f.pending.push((session.sid, session.expires_ms));
        drop(f);
        self.remember(session);
        tracing::info!(node = %self.node, "admitted on this node's own share while the store is down");
        Some(0)
    }

    /// A ticket handed out while Redis is away: numbered within this
    /// node's outage, so these keep their order among themselves, and
    /// placed at the back of the line, as one block, when Redis returns.
    fn issue_provisionally(&self) -> Issued {
        let mut f = self.lock_fallback();
        if f.epoch == 0 {
            // The node's mark, then a random part: another node can tell
            // whose block it waits for (see `provisional_lost`).
            let random = (crate::room::token::random_u128() as u32).max(1);
            let mark = mark_of(&self.node).unwrap_or_default();
            f.epoch = (u64::from(mark) << 32) | u64::from(random);
        }
        f.issued += 1;
        Issued::Provisional {
            epoch: f.epoch,
            seq: f.issued,
        }
    }

    /// Redis answers again: hand over what was done without it.
    ///
    /// What is handed over is taken out under the lock first: a request
    /// whose own call failed meanwhile starts a new block of provisional
    /// tickets (or a new list of sessions) for the next tick, rather than
    /// numbering past a block already placed or joining a list already
    /// cleared. What fails to go over is put back, and so is what is left
    /// when the hand-over is dropped midway (the tick of a release whose
    /// person went away): dropped with it, a block of provisional tickets
    /// would never be placed, its holders waiting without a place until
    /// their tickets expire.
    async fn recovered(&self, limits: &Limits, now_ms: u64) -> Result<bool, StoreError> {
        // One hand-over at a time (a release ticks beside the tick loop):
        // two would split the blocks and could place a later outage's
        // before an earlier one's. False: another is under way.
        let Ok(_alone) = self.recovering.try_lock() else {
            return Ok(false);
        };
        let mut left = {
            let mut f = self.lock_fallback();
            if !f.degraded
                && f.issued == 0
                && f.unplaced.is_empty()
                && f.ends_to_send.is_empty()
                && f.unheld.is_empty()
                && f.pending.is_empty()
                && f.lost_issues.is_empty()
            {
                return Ok(true);
            }
            let mut blocks = std::mem::take(&mut f.unplaced);
            if f.issued > 0 {
                blocks.push((f.epoch, f.issued));
            }
            f.epoch = 0;
            f.issued = 0;
            Recovery {
                room: self,
                blocks,
                pending: std::mem::take(&mut f.pending),
                ends: f.ends_to_send.drain().collect(),
                unheld: std::mem::take(&mut f.unheld),
                lost_issues: std::mem::take(&mut f.lost_issues),
            }
        };
        // Ends and given-back numbers decide no admission: sent with
        // limits that move nothing.
        let inert = inert_limits(self.tick_ms);
        // Ends first: a session ended here or on another node is not
        // adopted back. The portal's, then those nobody holds.
        for ends in [&mut left.ends, &mut left.unheld] {
            while !ends.is_empty() {
                // Remembered from now: counted from the release, an outage
                // longer than the memory would have the end forgotten at once.
                let chunk = ends.len().min(ENDS_PER_CALL);
                let args: Vec<String> = ends[..chunk]
                    .iter()
                    .flat_map(|(sid, remember)| [hex(*sid), (now_ms + remember).to_string()])
                    .collect();
                self.call("end", &inert, now_ms, &args).await?;
                ends.drain(..chunk);
            }
        }
        // Before any block is placed: a number given back is called
        // ahead of them, holding nothing.
        left.lost_issues.retain(|l| !forgotten(l));
        let mut sent = 0;
        while !left.lost_issues.is_empty() && sent < VOIDS_PER_TICK {
            let keys: Vec<String> = left
                .lost_issues
                .iter()
                .take(VOIDS_PER_CALL)
                .map(|(k, _)| k.clone())
                .collect();
            sent += keys.len();
            let r = self.call_keyed("void", &inert, now_ms, &[], &keys).await?;
            if r.0 > 0 {
                tracing::info!(
                    given_back = r.0,
                    "gave back the numbers of tickets whose answers were lost (provisional tickets were handed out instead)"
                );
            }
            left.lost_issues.drain(..keys.len());
        }
        // Oldest first, as they were taken; those waiting for the
        // opening stay in `left`, to be placed at a later tick.
        let mut next = 0;
        while let Some(&(epoch, issued)) = left.blocks.get(next) {
            // Idempotent per epoch: a retry gets the block placed before.
            // Forgotten once every ticket of it has expired (each within
            // `ticket_ttl` of its issue, before now).
            let mut args = vec![format!("{epoch:016x}"), issued.to_string()];
            if limits.ticket_ttl_ms > 0 {
                let forget_at = now_ms + limits.ticket_ttl_ms + crate::room::token::LEEWAY_MS;
                args.push(forget_at.to_string());
            }
            match self.call("reserve", limits, now_ms, &args).await? {
                // Before the opening: placed behind the pre-queue at it.
                r if r.0 < 0 => next += 1,
                // Its answer named the block, as it names every one.
                _ => {
                    left.blocks.remove(next);
                }
            }
        }
        if !left.pending.is_empty() {
            let args: Vec<String> = left
                .pending
                .iter()
                .flat_map(|(sid, exp)| [hex(*sid), exp.to_string()])
                .collect();
            self.call("adopt", limits, now_ms, &args).await?;
            left.pending.clear();
        }
        drop(left);
        let mut f = self.lock_fallback();
        f.degraded = f.issued > 0 || !f.pending.is_empty();
        Ok(true)
    }

    fn remember(&self, s: NewSession) {
        self.sessions.insert(s.sid, AtomicU64::new(s.expires_ms));
    }

    /// Drops what this node holds of session `sid`, ended (or moved by a
    /// return): it lets nobody in here, its activity is not reported, and
    /// it is not handed over after an outage.
    fn forget_here(&self, sid: u128) {
        self.sessions.remove(&sid);
        self.touched.remove(&sid);
        self.lock_fallback().pending.retain(|(s, _)| *s != sid);
    }
}

/// Limits for script ops that only read or touch sessions (check, end):
/// those ops never admit, so no limit is ever applied. The tick is the
/// room's: by it the script tells an outage from the gap between ticks.
fn inert_limits(tick_ms: u64) -> Limits {
    Limits {
        per_minute: None,
        max_active: None,
        claim_window_ms: 0,
        tick_ms,
        opens_at_ms: None,
        mode: crate::room::admission::Mode::Queue,
        ticket_ttl_ms: 0,
        session_idle_ms: 0,
    }
}

fn hex(sid: u128) -> String {
    format!("{sid:032x}")
}

/// How far ahead of a node's run a ticket's can be and still be Redis's
/// (`holds_place`): a century of ms. A random u64 falls in it once in
/// six million.
const RUN_AHEAD_MS: u64 = 100 * 365 * 24 * 3_600_000;

impl RoomStore for RedisRoom {
    fn issue(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<Issued, StoreError>> {
        async move { Ok(self.issue_in_run(limits, now_ms).await?.0) }.boxed()
    }

    fn issue_in_run(
        &self,
        limits: Limits,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<(Issued, u64), StoreError>> {
        async move {
            let key = format!(
                "{}{:016x}",
                self.issued_prefix,
                crate::room::token::random_u128() as u64
            );
            let r = match self
                .call_keyed("issue", &limits, now_ms, &[], std::slice::from_ref(&key))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    // The script may have run: its number, nobody's, is
                    // given back once Redis answers.
                    if matches!(e, StoreError::Unanswered(_)) {
                        self.lock_fallback()
                            .keep_lost_issue(key, std::time::Instant::now());
                    }
                    return Ok((self.issue_provisionally(), self.generation()));
                }
            };
            // The run that answered, which the view may no longer name
            // (a late answer of a run Redis lost, or one taken since).
            let run = r.11.get(1).and_then(|g| g.parse().ok()).unwrap_or_default();
            Ok(if r.0 == 2 {
                (Issued::PreQueue(r.1 as u64), run)
            } else {
                (Issued::Number(r.1 as u64), run)
            })
        }
        .boxed()
    }

    fn admit_directly(
        &self,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>> {
        async move {
            let args = [hex(session.sid), session.expires_ms.to_string()];
            let sid = session.sid;
            let r = match self.call("direct", &limits, now_ms, &args).await {
                Ok(r) => r,
                // Beyond this node's own share the newcomer takes a
                // provisional ticket, as when people are waiting: a place
                // in line rather than an error page to retry.
                Err(e) => {
                    let own = self.admit_on_my_own(&limits, session, now_ms);
                    // The script may have run and only its answer come too
                    // late: a session nobody holds once this node refuses,
                    // keeping a slot for session_idle. Ended at the next
                    // tick Redis answers (a script that runs after its end,
                    // sent on a connection lost since, makes no session):
                    // a number goes unused, nobody is let in. Not
                    // here: in an outage of timeouts each newcomer waited
                    // for a second call that could not be answered either.
                    if own.is_none() && matches!(e, StoreError::Unanswered(_)) {
                        self.lock_fallback()
                            .keep_unheld(sid, super::ENDED_MEMORY_MS);
                    }
                    return Ok(own);
                }
            };
            if r.0 > 0 {
                self.remember(session);
                Ok(Some(r.0 as u64))
            } else {
                Ok(None)
            }
        }
        .boxed()
    }

    fn claim(
        &self,
        n: u64,
        generation: u64,
        limits: Limits,
        session: NewSession,
        now_ms: u64,
    ) -> BoxFuture<'_, Result<Claim, StoreError>> {
        async move {
            let args = [
                n.to_string(),
                hex(session.sid),
                session.expires_ms.to_string(),
                generation.to_string(),
            ];
            let r = match self.call("claim", &limits, now_ms, &args).await {
                Ok(r) => r,
                Err(e) => {
                    // The script may have run and only its answer come
                    // too late: the session it would have made, which
                    // only this request knows, says whether it did. Else
                    // a retry would find the ticket used and send its
                    // holder to the back of the line.
                    let sid = [hex(session.sid)];
                    return match self
                        .call("peek", &inert_limits(self.tick_ms), now_ms, &sid)
                        .await
                    {
                        Ok(p) if p.0 == 1 => {
                            self.remember(session);
                            Ok(Claim::Admitted)
                        }
                        _ => Err(e),
                    };
                }
            };
            Ok(match r.0 {
                1 => {
                    self.remember(session);
                    Claim::Admitted
                }
                2 => Claim::NotYet {
                    position: r.1 as u64,
                },
                3 => Claim::Expired,
                5 => Claim::OtherRun,
                _ => Claim::AlreadyClaimed,
            })
        }
        .boxed()
    }

    fn tick(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<u64, StoreError>> {
        async move {
            self.clock_ready()?;
            let mut lent = self.link.lend();
            let asking = self.skew.asking();
            let r = self
                .nodes_script
                .key(&self.nodes_key)
                .arg(now_ms)
                .arg(&self.node)
                .arg(3 * self.lease_ms.max(1000))
                .invoke_async::<(Vec<String>, Vec<String>)>(&mut lent.conn)
                .await;
            let live = match self.link.outcome(&lent, r) {
                Ok((live, time)) => {
                    if let Some((asked_ms, at)) = asking {
                        self.skew.measure(&time, asked_ms, at, at.elapsed());
                    }
                    live
                }
                Err(e) => {
                    self.lock_nodes_heard().since_ms = 0;
                    return Err(e);
                }
            };
            {
                let mut heard = self.lock_nodes_heard();
                if heard.since_ms == 0 {
                    heard.since_ms = now_ms.max(1);
                }
                heard.live = live.iter().filter_map(|n| mark_of(n)).collect();
                // Back from an outage longer than the window, this node
                // finds the others' marks gone until each ticks again: by
                // its count alone, a share of the free slots taken should
                // Redis go at once would be the whole of them, each node
                // back first taking it. The larger count holds for a
                // window after it heard Redis again.
                let seen = (live.len() as u64).max(1);
                let settling =
                    now_ms < heard.since_ms + 3 * self.lease_ms.max(1000) + 2 * self.tick_ms;
                let before = self.peers.load(Ordering::Relaxed);
                self.peers.store(
                    if settling { seen.max(before) } else { seen },
                    Ordering::Relaxed,
                );
            }
            // Sessions admitted without Redis first, then activity, so the
            // session count the tick sees is complete and fresh: while
            // another tick hands them over, this one admits nobody.
            if !self.recovered(&limits, now_ms).await? {
                return Ok(0);
            }
            self.mend_step_back(&limits, now_ms);
            let touched: Vec<(u128, u64)> = self
                .touched
                .iter()
                .map(|e| (*e.key(), *e.value()))
                .collect();
            if !touched.is_empty() {
                let mut args = Vec::with_capacity(touched.len() * 2);
                for (sid, exp) in &touched {
                    args.push(hex(*sid));
                    args.push(exp.to_string());
                }
                self.call("touch", &limits, now_ms, &args).await?;
                for (sid, exp) in touched {
                    self.touched.remove_if(&sid, |_, v| *v == exp);
                }
            }
            self.sessions
                .retain(|_, exp| exp.load(Ordering::Relaxed) > now_ms);
            let mut lent = self.link.lend();
            let r = self
                .lease_script
                .key(&self.lease_key)
                .arg(&self.node)
                .arg(self.lease_ms)
                .invoke_async(&mut lent.conn)
                .await;
            let held: i64 = self.link.outcome(&lent, r)?;
            self.holder.store(held == 1, Ordering::Relaxed);
            if held == 1 {
                *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(std::time::Instant::now());
            }
            let op = if held == 1 { "tick" } else { "view" };
            let idle = limits.session_idle_ms.to_string();
            let r = self.call(op, &limits, now_ms, &[idle]).await?;
            // The first node to draw a lottery records which key drew it,
            // so every node draws the same order.
            if r.11.first().is_none_or(|k| k.is_empty()) {
                if let Some(kid) = self.lottery_key_id() {
                    self.call("lottery", &limits, now_ms, &[kid]).await?;
                }
            }
            Ok(r.0.max(0) as u64)
        }
        .boxed()
    }

    fn refresh(&self, limits: Limits, now_ms: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        async move { self.call("view", &limits, now_ms, &[]).await.map(|_| ()) }.boxed()
    }

    fn touch(&self, sid: u128, now_ms: u64, idle_ms: u64) -> Liveness {
        match self.sessions.get(&sid) {
            // Renewed here, the session is told to Redis at this node's
            // next tick; one about to lapse could be dropped by the
            // leader's tick before that, its slot given to the next
            // person, and brought back by the late report: max_active
            // passed. Within two ticks of lapsing (a quarter of the idle
            // time at most, or every request of a room with a long tick
            // would ask Redis), Redis renews it at once (`check`), or
            // says it is gone.
            Some(exp)
                if exp.load(Ordering::Relaxed) > now_ms + (2 * self.tick_ms).min(idle_ms / 4) =>
            {
                exp.store(now_ms + idle_ms, Ordering::Relaxed);
                self.touched.insert(sid, now_ms + idle_ms);
                Liveness::Alive
            }
            // Unknown here, or expired locally: Redis decides (another
            // node may have renewed it).
            _ => Liveness::Unknown,
        }
    }

    fn peek_local(&self, sid: u128, now_ms: u64) -> Liveness {
        match self.sessions.get(&sid) {
            Some(exp) if exp.load(Ordering::Relaxed) > now_ms => Liveness::Alive,
            // Another node may hold it: Redis knows.
            _ => Liveness::Unknown,
        }
    }

    fn peek(&self, sid: u128, now_ms: u64) -> BoxFuture<'_, Result<bool, StoreError>> {
        async move {
            if self.peek_local(sid, now_ms) == Liveness::Alive {
                return Ok(true);
            }
            let r = self
                .call("peek", &inert_limits(self.tick_ms), now_ms, &[hex(sid)])
                .await?;
            Ok(r.0 == 1)
        }
        .boxed()
    }

    fn check_session(
        &self,
        sid: u128,
        now_ms: u64,
        idle_ms: u64,
    ) -> BoxFuture<'_, Result<Checked, StoreError>> {
        async move {
            let limits = inert_limits(self.tick_ms);
            let exp = now_ms + idle_ms;
            let r = self
                .call("check", &limits, now_ms, &[hex(sid), exp.to_string()])
                .await;
            Ok(match r?.0 {
                1 => {
                    self.sessions.insert(sid, AtomicU64::new(exp));
                    Checked::Alive
                }
                2 => Checked::Ended,
                _ => Checked::Unheard,
            })
        }
        .boxed()
    }

    fn take_at_its_word(&self, sid: u128, expires_ms: u64) -> bool {
        // Ended here in this outage: a copy of its pass is not let in.
        let f = self.lock_fallback();
        if f.ends_to_send.contains_key(&sid) {
            return false;
        }
        drop(f);
        self.sessions.insert(sid, AtomicU64::new(expires_ms));
        self.touched.insert(sid, expires_ms);
        true
    }

    fn end_session(
        &self,
        sid: u128,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        async move {
            self.forget_here(sid);
            let limits = inert_limits(self.tick_ms);
            match self
                .call(
                    "end",
                    &limits,
                    now_ms,
                    &[hex(sid), (now_ms + remember_ms).to_string()],
                )
                .await
            {
                Ok(r) => Ok(r.0 == 1),
                Err(e) => {
                    // Sent again when Redis answers (the next tick).
                    self.lock_fallback().keep_end(sid, remember_ms);
                    Err(e)
                }
            }
        }
        .boxed()
    }

    fn hand_over(
        &self,
        old: u128,
        new: u128,
        expires_ms: u64,
        now_ms: u64,
        remember_ms: u64,
    ) -> BoxFuture<'_, Result<HandOver, StoreError>> {
        async move {
            let limits = inert_limits(self.tick_ms);
            let r = self
                .call(
                    "handover",
                    &limits,
                    now_ms,
                    &[
                        hex(old),
                        hex(new),
                        expires_ms.to_string(),
                        (now_ms + remember_ms).to_string(),
                    ],
                )
                .await?;
            let made = match r.0 {
                1 => HandOver::Made,
                2 => HandOver::MadeBefore,
                _ => return Ok(HandOver::Refused),
            };
            self.forget_here(old);
            self.sessions
                .entry(new)
                .and_modify(|e| {
                    e.fetch_max(expires_ms, Ordering::Relaxed);
                })
                .or_insert_with(|| AtomicU64::new(expires_ms));
            Ok(made)
        }
        .boxed()
    }

    fn audited(&self) -> BoxFuture<'_, Result<Option<(u64, u64)>, StoreError>> {
        async move {
            let mut lent = self.link.lend();
            let r = redis::cmd("GET")
                .arg(&self.audited_key)
                .query_async::<Option<String>>(&mut lent.conn)
                .await;
            let mark = self.link.outcome(&lent, r)?;
            Ok(mark.and_then(|m| {
                let (run, to) = m.split_once(':')?;
                Some((run.parse().ok()?, to.parse().ok()?))
            }))
        }
        .boxed()
    }

    fn set_audited(&self, run: u64, to: u64) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let mut lent = self.link.lend();
            let r = Script::new(SET_AUDITED)
                .key(&self.keys[0])
                .key(&self.audited_key)
                .arg(run)
                .arg(to)
                .invoke_async::<()>(&mut lent.conn)
                .await;
            self.link.outcome(&lent, r)
        }
        .boxed()
    }

    fn share_live(
        &self,
        change: LiveChange,
        others: &[LiveChange],
        above: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let (field, value) = live_field(change);
        let others: Vec<(&'static str, String)> = others
            .iter()
            .map(|c| live_field(*c))
            .filter(|(f, _)| *f != field)
            .collect();
        async move {
            let script = Script::new(SHARE_LIVE);
            let mut inv = script.key(&self.live_key);
            inv.arg(above).arg(field).arg(value);
            for (f, v) in &others {
                inv.arg(*f).arg(v);
            }
            let mut lent = self.link.lend();
            let r = inv.invoke_async::<()>(&mut lent.conn).await;
            self.link.outcome(&lent, r)
        }
        .boxed()
    }

    fn put_back_live(
        &self,
        changes: &[LiveChange],
        above: u64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let fields: Vec<(&'static str, String)> = changes.iter().map(|c| live_field(*c)).collect();
        async move {
            let script = Script::new(PUT_BACK_LIVE);
            let mut inv = script.key(&self.live_key);
            inv.arg(above);
            for (field, value) in &fields {
                inv.arg(*field).arg(value);
            }
            let mut lent = self.link.lend();
            let r = inv.invoke_async::<()>(&mut lent.conn).await;
            self.link.outcome(&lent, r)
        }
        .boxed()
    }

    fn reset_live(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        async move {
            let mut lent = self.link.lend();
            // The hash is never deleted: a version that started again at 1
            // could equal one a node already followed.
            let name = format!("{:016x}", crate::room::token::random_u128() as u64);
            let r = Script::new(RESET_LIVE)
                .key(&self.live_key)
                .arg(name)
                .invoke_async::<()>(&mut lent.conn)
                .await;
            self.link.outcome(&lent, r)
        }
        .boxed()
    }

    fn shared_live(&self) -> BoxFuture<'_, Result<Option<SharedLive>, StoreError>> {
        async move {
            let mut lent = self.link.lend();
            let r = redis::cmd("HGETALL")
                .arg(&self.live_key)
                .query_async(&mut lent.conn)
                .await;
            let fields: std::collections::HashMap<String, String> = self.link.outcome(&lent, r)?;
            Ok(Some(shared_from(fields)))
        }
        .boxed()
    }

    fn view(&self) -> RoomView {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).view
    }

    fn run_and_view(&self) -> (u64, RoomView) {
        self.seen()
    }

    fn heard(&self) -> bool {
        // Every answer carries the state's generation.
        self.generation() != 0
    }

    fn leads(&self) -> bool {
        self.holds_lease()
    }

    fn leads_now(&self) -> bool {
        let lease = std::time::Duration::from_millis(self.lease_ms);
        self.holds_lease()
            && self
                .renewed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|at| at.elapsed() < lease)
    }

    fn generation(&self) -> u64 {
        self.view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    fn holds_place(&self, g: u64) -> bool {
        // A later generation than this node's is one another node heard
        // of first (Redis lost its data, and this node has not asked it
        // since): the ticket is of the new run, not of an earlier one.
        // Redis numbers a run by the time it began, in ms; a number ahead
        // by more than any Redis lives is no run of Redis's: the memory
        // store's are random, and a ticket of one (a node moved to
        // cluster mode with its keys) was shown its old number as a
        // place in the new line, and sent to the back once called.
        let current = self.generation();
        g == 0 || current == 0 || (current..current.saturating_add(RUN_AHEAD_MS)).contains(&g)
    }

    fn provisional_base(&self, epoch: u64) -> Option<(u64, u64)> {
        let run = self.generation();
        self.provisional.base(epoch, run).map(|base| (base, run))
    }

    fn provisional_lost(&self, epoch: u64, now_ms: u64) -> bool {
        let generation = self.generation();
        if self.provisional.lost(epoch, generation) {
            return true;
        }
        if self.provisional.base(epoch, generation).is_some() {
            return false;
        }
        // Not placed, and the node that handed it out gone (restarted, or
        // scaled away, in the outage: what it handed out was in its
        // memory only): the block would never be placed, and its holders
        // would wait, told nothing, until their tickets expire. Judged
        // only once every node alive has had time to tick since this one
        // heard Redis again (a node's entry lapses after 3 leases without
        // a tick; the node placing its blocks at its first tick back).
        // A node only cut off from Redis is judged gone too: its holders
        // take a place in the line as it is, ahead of where its block
        // would go when it comes back.
        let heard = self.lock_nodes_heard();
        let settled = 3 * self.lease_ms.max(1000) + 2 * self.tick_ms;
        heard.since_ms != 0
            && now_ms.saturating_sub(heard.since_ms) >= settled
            && !heard.live.contains(&issuer_of(epoch))
    }

    fn lottery_key_id(&self) -> Option<String> {
        self.lottery_kid.get()
    }

    fn set_lottery_key_id(&self, kid: &str) {
        self.lottery_kid.set_once(kid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outage of timeouts keeps at most [`ENDS_KEPT`] sessions nobody
    /// holds and lost issues' keys, whatever the arrivals; the issues
    /// Redis has forgotten make way for new ones.
    #[test]
    fn what_an_outage_keeps_for_redis_is_bounded() {
        let mut f = Fallback::default();
        for sid in 0..ENDS_KEPT as u128 + 10 {
            f.keep_unheld(sid, 1);
        }
        assert_eq!(f.unheld.len(), ENDS_KEPT);
        let now = std::time::Instant::now();
        let Some(forgotten) = now.checked_sub(ISSUE_KEPT + Duration::from_secs(1)) else {
            return; // A machine up for less than ISSUE_KEPT.
        };
        for i in 0..ENDS_KEPT + 10 {
            f.keep_lost_issue(format!("k{i}"), now);
        }
        assert_eq!(f.lost_issues.len(), ENDS_KEPT);
        f.lost_issues.clear();
        for i in 0..ENDS_KEPT {
            f.keep_lost_issue(format!("old{i}"), forgotten);
        }
        f.keep_lost_issue("new".into(), now);
        assert_eq!(f.lost_issues.len(), 1);
        assert_eq!(f.lost_issues[0].0, "new");
    }

    #[test]
    fn a_shared_rate_is_taken_only_within_what_a_node_takes() {
        assert_eq!(limit_of("240"), Some(Some(240.0)));
        assert_eq!(limit_of("0.5"), Some(Some(0.5)));
        assert_eq!(limit_of("-1"), Some(None), "unlimited");
        for out in ["1e306", "inf", "NaN", "0", "x"] {
            assert_eq!(limit_of(out), None, "{out}: left to the config");
        }
    }

    #[test]
    fn a_shared_cap_is_taken_only_within_what_a_node_takes() {
        let cap =
            |v: &str| shared_from([("max_active".to_string(), v.to_string())].into()).max_active;
        assert_eq!(cap("5"), Some(Some(5)));
        assert_eq!(cap("-1"), Some(None), "unlimited");
        for out in ["0", "1000000001", "18446744073709551615", "x"] {
            assert_eq!(cap(out), None, "{out}: left to the config");
        }
    }

    fn counters(queue: u64, serving: u64, active: u64) -> RoomView {
        RoomView {
            queue,
            serving,
            waiting: queue - serving,
            active,
            opened: true,
            admitted_total: serving,
            ..RoomView::default()
        }
    }

    #[test]
    fn a_late_reply_never_moves_the_line_back() {
        let newer = counters(500, 120, 40);
        let older = counters(480, 100, 45);
        let v = followed_by(1, newer, 1, older);
        assert_eq!((v.queue, v.serving, v.waiting), (500, 120, 380));
        assert_eq!(v.admitted_total, 120);
        assert_eq!(v.active, 45, "a gauge is taken as replied");
        let v = followed_by(1, older, 1, newer);
        assert_eq!((v.queue, v.serving, v.waiting), (500, 120, 380));
    }

    #[test]
    fn a_late_answer_from_the_state_before_is_not_taken() {
        let (old, new) = (1_796_000_000_000, 1_796_000_900_000);
        let mut seen = Seen::default();
        assert!(!take_reply(&mut seen, old, 1, counters(500, 120, 40)));
        assert!(
            take_reply(&mut seen, new, 3, counters(3, 0, 0)),
            "Redis lost its data: report every session again"
        );
        // Call 2 was sent before call 3 and answered by the old state.
        assert!(!take_reply(&mut seen, old, 2, counters(501, 121, 40)));
        assert_eq!((seen.generation, seen.view.queue), (new, 3));
        assert!(!take_reply(&mut seen, new, 4, counters(4, 1, 1)));
        assert_eq!(seen.view.serving, 1);
    }

    #[test]
    fn fewer_admissions_in_the_same_state_are_lost_writes() {
        let mut seen = Seen::default();
        assert!(!take_reply(&mut seen, 7, 1, counters(500, 120, 40)));
        assert!(!take_reply(&mut seen, 7, 3, counters(510, 125, 40)));
        // A late answer to an earlier call: not a loss.
        assert!(!take_reply(&mut seen, 7, 2, counters(505, 122, 40)));
        // A later call, fewer admissions: Redis came back from a save.
        assert!(take_reply(&mut seen, 7, 4, counters(510, 110, 30)));
        assert_eq!(seen.view.serving, 125, "the line never moves back");
        // Said once: from there, it counts on.
        assert!(!take_reply(&mut seen, 7, 5, counters(511, 111, 30)));
    }

    #[test]
    fn a_new_generation_starts_the_view_again() {
        let before = counters(500, 120, 40);
        let started_again = counters(3, 0, 0);
        let v = followed_by(1_796_000_000_000, before, 1_796_000_900_000, started_again);
        assert_eq!((v.queue, v.serving, v.admitted_total), (3, 0, 0));
        let first = followed_by(0, RoomView::default(), 1_796_000_000_000, before);
        assert_eq!(first.serving, 120);
    }
}
