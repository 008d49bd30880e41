//! A room at run time: its config, upstreams, metrics, and the waiting
//! room around them: the store holding its counters ([`admission`]),
//! tickets and passes ([`token`]), the pre-queue draw ([`lottery`]), and
//! the per-address abuse limits.

pub mod adaptive;
pub mod admission;
pub mod arrival;
pub mod lanes;
pub mod lottery;
pub mod receipt;
pub mod token;
pub mod undelivered;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::RoomConfig;
use crate::metrics::{Metrics, RoomMetrics, UpstreamMetrics};
use crate::page::waiting::Template;
use crate::page::Reader;
use crate::proxy::in_flight::InFlight;
use crate::proxy::upstreams::{AfterFailure, PassiveHealth, UpstreamPool};
use crate::store::{LiveChange, RoomStore, SharedLive, StoreError};
use adaptive::{Change, Controller, Verdict};
use admission::{Limits, Mode};
use token::Keyring;

/// The changes `shared` holds, one each.
fn shared_changes(shared: &SharedLive) -> Vec<LiveChange> {
    [
        shared.mode.map(LiveChange::Mode),
        shared.per_minute.map(LiveChange::PerMinute),
        shared.max_active.map(LiveChange::MaxActive),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A room's config as the admission rules read it.
pub fn limits_of(config: &RoomConfig, tick_ms: u64) -> Limits {
    Limits {
        per_minute: config.admission_per_minute,
        max_active: config.max_active,
        claim_window_ms: config.claim_window.as_millis() as u64,
        tick_ms,
        opens_at_ms: config.opens_at_ms,
        mode: config.mode,
        ticket_ttl_ms: config.ticket_ttl.as_millis() as u64,
        session_idle_ms: config.session_idle.as_millis() as u64,
    }
}

pub type IpLimiter = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;
pub type SessionLimiter = RateLimiter<u128, DefaultKeyedStateStore<u128>, DefaultClock>;

pub struct Room {
    pub name: String,
    pub config: RoomConfig,
    pub upstreams: UpstreamPool,
    pub metrics: RoomMetrics,
    /// Indexed like `upstreams`.
    pub upstream_metrics: Vec<UpstreamMetrics>,
    pub store: Arc<dyn RoomStore>,
    pub keys: Keyring,
    pub ticket_cookie: String,
    pub pass_cookie: String,
    /// New tickets per client address.
    pub ticket_limiter: IpLimiter,
    /// Status polls per client address.
    pub status_limiter: IpLimiter,
    /// Each pass's requests (`per_session`): state per live session only.
    pub session_limiter: Option<SessionLimiter>,
    /// The waiting page: the operator's template or the built-in one.
    pub template: Arc<Template>,
    /// The operator's error page (`error_template`), or varco's own.
    pub error_template: Option<crate::page::ErrorTemplate>,
    tick_ms: u64,
    /// What an operator may change live (admin API); starts from config.
    mode: AtomicU8,
    /// f64 bits of new sessions per minute; NaN: no rate limit.
    per_minute: AtomicU64,
    /// u64::MAX: no cap.
    max_active: AtomicU64,
    /// Adaptive admission, when the room has it.
    pub adaptive: Option<Controller>,
    /// The cap on requests at once towards the upstreams, if any.
    pub in_flight: Option<InFlight>,
    /// Claims whose pass has not reached its holder yet (this node's).
    pub undelivered: undelivered::Undelivered,
    /// The room of this name in force, shared by every room a reload put
    /// in this one's place: a request under way across reloads reports
    /// what its upstream did there too, where the requests after it go
    /// (see [`Room::mark_failed`]).
    pub in_force: Arc<Mutex<std::sync::Weak<Room>>>,
    /// A reload put another room in this one's place: only then is
    /// `in_force` asked (every answer would otherwise take its lock).
    pub superseded: std::sync::atomic::AtomicBool,
    /// Signs `X-Varco-Arrival` for the portal, when it has the key.
    pub arrival_key: Option<ring::hmac::Key>,
    /// The room's lines: one (unnamed, on `store`) without lanes; with
    /// lanes, the default lane first (on `store`), then the others.
    pub lanes: Vec<lanes::Lane>,
    /// The counts of lanes reloads removed, by line name: see
    /// [`Room::counted`].
    retired_lanes: Vec<(String, lanes::Counted)>,
    /// The longest `ticket_ttl` the room's tickets were signed with since
    /// this process started (a reload may shorten it; the tickets signed
    /// before keep theirs).
    pub longest_ticket_ttl: Duration,
    draw: Mutex<Option<Arc<Draw>>>,
    /// The cluster's live changes this room last followed.
    followed: Mutex<SharedLive>,
    /// Changes made through this node's API, counted: a read of the
    /// shared ones that overlaps one is not applied.
    local_changes: AtomicU64,
    /// Which of mode, rate and `max_active` an operator set since the
    /// last reset (through this node's API or, in a cluster, any node's):
    /// [`HELD_MODE`] and so on. A reload keeps them, as it keeps an
    /// upstream taken out: a certificate renewal's reload must not lift a
    /// brake.
    held: AtomicU8,
}

/// An operator's mode holds over the config's (see `Room::held`).
const HELD_MODE: u8 = 1;
/// An operator's `admission_per_minute` holds.
const HELD_RATE: u8 = 2;
/// An operator's `max_active` holds.
const HELD_MAX_ACTIVE: u8 = 4;

/// The path of a request target, the query aside.
fn path_of(path_and_query: &str) -> &str {
    path_and_query.split('?').next().unwrap_or_default()
}

/// Whether `path` is on one of `prefixes`, on whole segments.
fn on_any(prefixes: &[String], path: &str) -> bool {
    prefixes
        .iter()
        .any(|p| crate::router::prefix_matches(p, path))
}

/// A room's pre-queue draw under one lottery key.
struct Draw {
    kid: String,
    seed: Vec<u8>,
    /// The seed's SHA-256, published before the opening.
    commitment: String,
    seed_hex: String,
    /// The permutations for the pre-queues' sizes (each lane's is fixed
    /// at the opening).
    lotteries: Mutex<Vec<Arc<lottery::Lottery>>>,
}

const UNLIMITED: u64 = u64::MAX;

fn per_minute(n: u32) -> Quota {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    // A burst of a quarter minute's worth: a page reload storm passes, a
    // script does not.
    let burst = NonZeroU32::new((n.get() / 4).max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(burst)
}

impl Room {
    pub fn new(
        config: RoomConfig,
        passive: PassiveHealth,
        metrics: &Metrics,
        store: Arc<dyn RoomStore>,
        keys: Keyring,
        tick: Duration,
    ) -> Self {
        let default_lane =
            lanes::Lane::new(config.lanes.iter().find(|l| l.is_default()), store.clone());
        let slow_start = config
            .health_check
            .as_ref()
            .map_or(Duration::ZERO, |h| h.slow_start);
        let upstreams = UpstreamPool::new(&config.upstreams, &config.weights, passive, slow_start);
        let upstream_metrics = upstreams
            .all()
            .iter()
            .map(|u| UpstreamMetrics::new(metrics, &config.name, &u.label))
            .collect();
        Room {
            name: config.name.clone(),
            metrics: RoomMetrics::new(metrics, &config.name, config.adaptive.is_some()),
            upstream_metrics,
            upstreams,
            store,
            keys,
            ticket_cookie: format!("varco_ticket_{}", config.name),
            pass_cookie: format!("varco_pass_{}", config.name),
            ticket_limiter: RateLimiter::keyed(per_minute(config.tickets_per_ip_per_minute)),
            status_limiter: RateLimiter::keyed(per_minute(config.status_per_ip_per_minute)),
            session_limiter: config.per_session.map(|(rate, burst)| {
                let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
                RateLimiter::keyed(Quota::per_second(nz(rate)).allow_burst(nz(burst)))
            }),
            tick_ms: tick.as_millis() as u64,
            mode: AtomicU8::new(config.mode.to_u8()),
            per_minute: AtomicU64::new(config.admission_per_minute.unwrap_or(f64::NAN).to_bits()),
            max_active: AtomicU64::new(config.max_active.unwrap_or(UNLIMITED)),
            adaptive: config.adaptive.clone().map(Controller::new),
            in_flight: config.in_flight.map(InFlight::new),
            undelivered: Default::default(),
            in_force: Default::default(),
            superseded: Default::default(),
            arrival_key: None,
            lanes: vec![default_lane],
            retired_lanes: Vec::new(),
            longest_ticket_ttl: config.ticket_ttl,
            draw: Mutex::new(None),
            followed: Mutex::new(SharedLive::default()),
            local_changes: AtomicU64::new(0),
            held: AtomicU8::new(0),
            error_template: config
                .error_template
                .as_deref()
                .map(crate::page::ErrorTemplate::compile),
            template: match &config.page_template {
                Some(text) => Arc::new(Template::compile(text)),
                None => Arc::new(Template::compile(crate::page::waiting::DEFAULT_TEMPLATE)),
            },
            config,
        }
    }

    /// Who reads a page varco makes for this room: a program (`json`), or
    /// a person in the language of `accept` (Accept-Language), the room's
    /// by default, on the room's `error_template` when it has one.
    pub fn reader(&self, accept: Option<&http::HeaderValue>, json: bool) -> Reader<'_> {
        Reader::of_value(accept, json, self.config.language).with(self.error_template.as_ref())
    }

    /// How this room's cookies are scoped on a response over HTTPS
    /// (`secure`) or not.
    pub fn cookie_attrs(&self, secure: bool) -> crate::cookies::Attrs {
        crate::cookies::Attrs {
            secure,
            cross_site: self.config.cross_site_cookies,
        }
    }

    /// Keeps the longest `ticket_ttl` of `old` over a reload.
    pub fn with_ticket_ttl_of(mut self, old: Option<&Room>) -> Self {
        if let Some(old) = old {
            self.longest_ticket_ttl = self.longest_ticket_ttl.max(old.longest_ticket_ttl);
        }
        self
    }

    /// Carries `old`'s claims not yet delivered over a reload.
    pub fn with_undelivered_of(mut self, old: Option<&Room>) -> Self {
        if let Some(old) = old {
            self.undelivered = undelivered::Undelivered::continuing(&old.undelivered);
        }
        self
    }

    /// Goes on counting the lanes `old` had and this room has not (and
    /// those `old` went on counting), as they stood at this reload: a
    /// removed lane's people can no longer come in by it.
    pub fn with_retired_lanes_of(mut self, old: Option<&Room>) -> Self {
        let Some(old) = old else {
            return self;
        };
        let here: Vec<String> = self.lanes.iter().map(|l| self.line_name(l)).collect();
        let now = old
            .lanes
            .iter()
            .map(|l| (old.line_name(l), lanes::Counted::of(&l.store.view())));
        self.retired_lanes = old
            .retired_lanes
            .iter()
            .cloned()
            .chain(now)
            .filter(|(name, _)| !here.contains(name))
            .collect();
        self
    }

    /// Tickets issued, people admitted, turns abandoned: across the
    /// lanes, those reloads removed included, as the admin API shows
    /// them (a removed lane's people were admitted all the same). A lane
    /// brought back counts by its store again (which kept its counts),
    /// once. Prometheus's counters are `increases`.
    pub fn counted(&self) -> lanes::Counted {
        self.retired_lanes
            .iter()
            .fold(lanes::Counted::of(&self.view()), |t, (_, c)| t.plus(c))
    }

    /// An adaptive controller carrying on from the one of the room a
    /// reload replaces (see [`Controller::continuing`]).
    pub fn with_adaptive_of(mut self, old: Option<&Room>) -> Self {
        if let (Some(ctl), Some(old_ctl)) = (&self.adaptive, old.and_then(|o| o.adaptive.as_ref()))
        {
            self.adaptive = Some(Controller::continuing(ctl.config.clone(), old_ctl));
        }
        self
    }

    /// Shares the pointer to the room in force with the room a reload
    /// replaces (and so with every room before it).
    pub fn with_in_force_of(mut self, old: Option<&Room>) -> Self {
        if let Some(old) = old {
            self.in_force = old.in_force.clone();
        }
        self
    }

    /// Carries `old`'s in-flight slots over a reload (see
    /// `InFlight::continuing`).
    pub fn with_in_flight_of(mut self, old: Option<&Room>) -> Self {
        if let (Some(config), Some(old_cap)) = (
            self.config.in_flight,
            old.and_then(|o| o.in_flight.as_ref()),
        ) {
            self.in_flight = Some(InFlight::continuing(config, old_cap));
        }
        self
    }

    /// A room with a private memory store and a fresh key: for tests and
    /// benchmarks that need a room outside a running varco.
    pub fn standalone(config: RoomConfig) -> Self {
        let tick = Duration::from_secs(1);
        let store = crate::store::memory::MemoryStore::open(None, 0)
            .expect("no snapshot to read")
            .room(&config.name, &limits_of(&config, 1000), 0);
        Room::new(
            config,
            PassiveHealth {
                max_fails: crate::config::file::DEFAULT_MAX_FAILS,
                cooldown: Duration::from_secs(10),
            },
            &Metrics::new(),
            store,
            Keyring::ephemeral(),
            tick,
        )
    }

    /// Adds the lanes other than the default one, each on the store
    /// `store_for` gives for its name (`room#lane`).
    pub fn with_lanes(mut self, store_for: &dyn Fn(&str) -> Arc<dyn RoomStore>) -> Self {
        for l in &self.config.lanes {
            let name = lanes::Lane::store_name(&self.name, l);
            if name != self.name {
                self.lanes.push(lanes::Lane::new(Some(l), store_for(&name)));
            }
        }
        // Shares from the start: until the first tick, lanes admitting at
        // once would otherwise each take the whole room.
        lanes::share(&self.lanes, &self.limits(), None);
        self
    }

    /// The lane a new arrival joins (`ip`: none to match ranges against).
    pub fn lane_for(&self, headers: &http::HeaderMap, ip: Option<IpAddr>) -> &lanes::Lane {
        self.lanes
            .iter()
            .skip(1)
            .find(|l| l.selects(&self.name, headers, ip))
            .unwrap_or(&self.lanes[0])
    }

    /// The lane a ticket or pass names (empty: the default lane). None
    /// for a lane that no longer exists: such a token counts as none.
    pub fn lane(&self, name: &str) -> Option<&lanes::Lane> {
        if name.is_empty() {
            return self.lanes.first();
        }
        self.lanes.iter().skip(1).find(|l| l.name == name)
    }

    /// The name a lane's tokens carry: empty for the default lane, so a
    /// room's tokens are the same with lanes as without.
    pub fn lane_label<'a>(&self, lane: &'a lanes::Lane) -> &'a str {
        if lane.is_default() {
            ""
        } else {
            &lane.name
        }
    }

    /// The name receipts and the admission log give a lane's line:
    /// `room`, or `room#lane`.
    pub fn line_name(&self, lane: &lanes::Lane) -> String {
        self.line_name_cow(lane).into_owned()
    }

    /// `line_name`, borrowed for the default lane (every receipt on a
    /// waiting page names its line).
    pub fn line_name_cow(&self, lane: &lanes::Lane) -> std::borrow::Cow<'_, str> {
        match self.lane_label(lane) {
            "" => self.name.as_str().into(),
            l => format!("{}#{l}", self.name).into(),
        }
    }

    /// A lane's limits: its share of the room's, as of the last tick.
    pub fn lane_limits(&self, lane: &lanes::Lane) -> Limits {
        if self.lanes.len() < 2 {
            return self.limits();
        }
        lane.limits(self.limits())
    }

    /// Whether `view` holds the room's counters (see `RoomStore::heard`).
    pub fn heard(&self) -> bool {
        self.store.heard() && self.lanes.iter().all(|l| l.store.heard())
    }

    /// The room as a whole, across its lanes.
    pub fn view(&self) -> crate::store::RoomView {
        if self.lanes.len() < 2 {
            return self.store.view();
        }
        lanes::total(&self.lanes)
    }

    pub fn with_arrival_key(mut self, secret: Option<&[u8]>) -> Self {
        self.arrival_key = secret.map(arrival::key);
        self
    }

    /// Whether `path_and_query` is on one of the room's `exempt_paths`,
    /// which skip the gate entirely: on whole segments (`/static` is not
    /// `/static-admin/apply`), the query aside, of the path as sent.
    /// Not as rooms match it (escaped slashes read as slashes): a path
    /// that is exempt only once read that way is left to the gate.
    pub fn is_exempt(&self, path_and_query: &str) -> bool {
        on_any(&self.config.exempt_paths, path_of(path_and_query))
    }

    /// Whether `path_and_query` is one of the room's login detours: its
    /// path matched on whole segments, as rooms' `paths` are, since a
    /// detour lets a ticket holder through with any method
    /// (`/oidc/callback` is not `/oidc/callbacks/apply`).
    pub fn is_flow_path(&self, path_and_query: &str) -> bool {
        let path = crate::router::as_matched(path_of(path_and_query));
        on_any(&self.config.flow_paths, &path)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            per_minute: self.per_minute(),
            max_active: self.max_active(),
            mode: self.mode(),
            // A block of provisional tickets is kept until its last one
            // expires: those signed before a reload that shortened the
            // time keep theirs.
            ticket_ttl_ms: self.longest_ticket_ttl.as_millis() as u64,
            ..limits_of(&self.config, self.tick_ms)
        }
    }

    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Relaxed))
    }

    pub fn per_minute(&self) -> Option<f64> {
        let r = f64::from_bits(self.per_minute.load(Ordering::Relaxed));
        (!r.is_nan()).then_some(r)
    }

    pub fn max_active(&self) -> Option<u64> {
        let m = self.max_active.load(Ordering::Relaxed);
        (m != UNLIMITED).then_some(m)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode.to_u8(), Ordering::Relaxed);
    }

    pub fn set_per_minute(&self, rate: Option<f64>) {
        self.per_minute
            .store(rate.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
    }

    pub fn set_max_active(&self, max: Option<u64>) {
        self.max_active
            .store(max.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    /// An operator's change: here at once, and shared with every node
    /// of a cluster (an error: it holds on this node only).
    pub async fn change_live(&self, change: LiveChange) -> Result<(), StoreError> {
        self.apply_live(change);
        self.share_live(change).await
    }

    /// The change in force on this node.
    pub fn apply_live(&self, change: LiveChange) {
        self.local_changes.fetch_add(1, Ordering::SeqCst);
        let held = match change {
            LiveChange::Mode(m) => {
                self.set_mode(m);
                HELD_MODE
            }
            LiveChange::PerMinute(r) => {
                self.set_per_minute(r);
                HELD_RATE
            }
            LiveChange::MaxActive(m) => {
                self.set_max_active(m);
                HELD_MAX_ACTIVE
            }
        };
        self.held.fetch_or(held, Ordering::SeqCst);
        self.share_between_lanes();
    }

    /// The change told to the other nodes (cluster mode), with what this
    /// node followed of the others in case Redis just lost them.
    pub async fn share_live(&self, change: LiveChange) -> Result<(), StoreError> {
        let was = self
            .followed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let above = was.version.parse().unwrap_or(0);
        self.store
            .share_live(change, &shared_changes(&was), above)
            .await
            .inspect_err(|_| {
                self.metrics.store_errors.inc();
            })
    }

    /// Back to the config's mode, rate and `max_active`, here and (in a
    /// cluster) on every node.
    pub async fn reset_live(&self) -> Result<(), StoreError> {
        self.apply_reset();
        self.share_reset().await
    }

    /// Back to the config's on this node.
    pub fn apply_reset(&self) {
        self.local_changes.fetch_add(1, Ordering::SeqCst);
        self.back_to_config();
        self.held.store(0, Ordering::SeqCst);
        self.share_between_lanes();
    }

    /// The reset told to the other nodes (cluster mode).
    pub async fn share_reset(&self) -> Result<(), StoreError> {
        self.store.reset_live().await.inspect_err(|_| {
            self.metrics.store_errors.inc();
        })
    }

    fn back_to_config(&self) {
        self.set_mode(self.config.mode);
        self.set_per_minute(self.config.admission_per_minute);
        self.set_max_active(self.config.max_active);
    }

    /// Follows the live changes an operator made through any node of the
    /// cluster (each tick). Only what changed since the last look is
    /// applied: a field newly shared is taken, a field no longer shared
    /// goes back to the config, a reset takes all three back first; the
    /// rest stays as this node has it (an adaptive rate, a change made
    /// here while the store was away). False: the store did not answer.
    pub async fn follow_shared(&self) -> bool {
        let before = self.local_changes.load(Ordering::SeqCst);
        let shared = match self.store.shared_live().await {
            Ok(Some(s)) => s,
            Ok(None) => return true,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(room = %self.name, error = %e, "cannot read the cluster's live settings");
                // An error the store answered about this room's settings
                // is this room's: the next rooms still ask.
                return matches!(e, crate::store::StoreError::Refused(_));
            }
        };
        // An operator changed something here while the answer was on its
        // way: it may predate the change; look again next tick.
        if self.local_changes.load(Ordering::SeqCst) != before {
            return true;
        }
        if shared.version.is_empty() {
            let was = self
                .followed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if was == shared {
                return true;
            }
            // The hash is gone with Redis's data: keep what is in force
            // (a pause must not lift itself), and follow what comes next.
            // And put back what the cluster shared: a node started from
            // now on reads only the store, and came up with the file's
            // mode and limits (a rolling restart after the loss lifted
            // the pause). Until it is back, at each tick.
            tracing::warn!(room = %self.name, "the cluster's live settings are gone from the store; keeping the ones in force, and putting them back");
            if !self.put_back(&was).await {
                *self.followed.lock().unwrap_or_else(|e| e.into_inner()) = SharedLive::default();
            }
            return true;
        }
        let mut followed = self.followed.lock().unwrap_or_else(|e| e.into_inner());
        if *followed == shared {
            return true;
        }
        // A reset is one the store names: a hash put back after Redis lost
        // its data names none, and is no reset.
        let reset = !shared.reset.is_empty() && shared.reset != followed.reset;
        if reset {
            self.back_to_config();
            self.held.store(0, Ordering::SeqCst);
        }
        let c = &self.config;
        let hold = |bit: u8, shared: bool| {
            if shared {
                self.held.fetch_or(bit, Ordering::SeqCst);
            } else {
                self.held.fetch_and(!bit, Ordering::SeqCst);
            }
        };
        if reset || shared.mode != followed.mode {
            self.set_mode(shared.mode.unwrap_or(c.mode));
            hold(HELD_MODE, shared.mode.is_some());
        }
        if reset || shared.per_minute != followed.per_minute {
            self.set_per_minute(shared.per_minute.unwrap_or(c.admission_per_minute));
            hold(HELD_RATE, shared.per_minute.is_some());
        }
        if reset || shared.max_active != followed.max_active {
            self.set_max_active(shared.max_active.unwrap_or(c.max_active));
            hold(HELD_MAX_ACTIVE, shared.max_active.is_some());
        }
        self.share_between_lanes();
        tracing::info!(
            room = %self.name,
            version = %shared.version,
            mode = self.mode().as_str(),
            admission_per_minute = ?self.per_minute(),
            max_active = ?self.max_active(),
            "following the cluster's live settings"
        );
        *followed = shared;
        true
    }

    /// The changes the cluster shared (`was`, as this node last followed
    /// them) told to the store again after it lost them, unless a node
    /// did first or an operator changed something since. Shared values,
    /// not the ones in force here: a rate adaptive admission moved on
    /// this node is its own. False: nothing to put back.
    async fn put_back(&self, was: &SharedLive) -> bool {
        let changes = shared_changes(was);
        if changes.is_empty() {
            return false;
        }
        // At once: a node reading the fields one by one would take those
        // not there yet for dropped, and go back to its file's for a tick.
        // Past the version followed: versions keep moving up across the
        // loss. Tried again next tick if this fails.
        let above = was.version.parse().unwrap_or(0);
        if let Err(e) = self.store.put_back_live(&changes, above).await {
            self.metrics.store_errors.inc();
            tracing::warn!(room = %self.name, error = %e, "cannot put the live settings back into the store yet: a node started meanwhile runs on its file's");
        }
        true
    }

    /// A room built by a reload keeps the live changes of the room it
    /// replaces, as they are in force there (a rate adaptive admission
    /// moved since, a change made while Redis was away), until a reset;
    /// and what it followed of the cluster's, so the next tick applies
    /// only what changed since.
    pub fn keep_live_changes_of(&self, old: &Room) {
        // Under the old room's lock: a tick following the cluster on it
        // meanwhile changes the values, the bits and what it followed
        // together, and a copy of one without the others would take a
        // shared change for followed and never apply it here.
        let followed = old.followed.lock().unwrap_or_else(|e| e.into_inner());
        let held = old.held.load(Ordering::SeqCst);
        if held & HELD_MODE != 0 {
            self.set_mode(old.mode());
        }
        if held & HELD_RATE != 0 {
            self.set_per_minute(old.per_minute());
        }
        if held & HELD_MAX_ACTIVE != 0 {
            self.set_max_active(old.max_active());
        }
        self.held.store(held, Ordering::SeqCst);
        *self.followed.lock().unwrap_or_else(|e| e.into_inner()) = followed.clone();
        drop(followed);
        self.share_between_lanes();
    }

    /// The lanes' shares of the limits in force: again after a change of
    /// them outside a tick (an operator's, here or through another node,
    /// or a reload keeping them), or the lanes would admit by the old
    /// ones until the next.
    pub fn share_between_lanes(&self) {
        lanes::share(&self.lanes, &self.limits(), None);
    }

    /// The settings an operator changed live that hold over the config
    /// file's, by their config names.
    pub fn live_changes(&self) -> Vec<&'static str> {
        let held = self.held.load(Ordering::SeqCst);
        [
            (HELD_MODE, "mode"),
            (HELD_RATE, "admission_per_minute"),
            (HELD_MAX_ACTIVE, "max_active"),
        ]
        .into_iter()
        .filter(|(bit, _)| held & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }

    /// Whether the rate in force is an operator's (adaptive admission
    /// then keeps it as it is across a reload, under the floor too).
    pub fn rate_is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst) & HELD_RATE != 0
    }

    /// How long a session the portal ended must be remembered: as long as
    /// its pass could still come back through `come_back` (a login
    /// detour: the pass's own life, twice the idle time, then the flow
    /// window; a failure: the idle time and twice the grace), and never
    /// less than an hour.
    pub fn ended_memory_ms(&self) -> u64 {
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        let c = &self.config;
        let idle = ms(c.session_idle);
        let detour = 2 * idle + ms(c.flow_window);
        let failure = idle + 2 * ms(c.failure_grace);
        detour.max(failure).max(crate::store::ENDED_MEMORY_MS)
    }

    /// Whether requests pass the gate at all: limits or a scheduled
    /// opening, or an operator who paused, closed or queued the room.
    pub fn is_gated(&self) -> bool {
        self.mode().gates(|| {
            self.per_minute().is_some()
                || self.max_active().is_some()
                || self.config.opens_at_ms.is_some()
        })
    }

    /// The seed of this room's pre-queue lottery (secret, derived from a
    /// signing key, the same on every node) and what is published about
    /// it, derived once per lottery key: at the opening every pre-queue
    /// ticket's page and status poll needs them.
    fn draw(&self) -> Arc<Draw> {
        let kid = match self.store.lottery_key_id() {
            Some(k) => k,
            None => {
                let k = self.keys.signing_key().id.clone();
                self.store.set_lottery_key_id(&k);
                self.store.lottery_key_id().unwrap_or(k)
            }
        };
        let mut cached = self.draw.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = cached.as_ref().filter(|d| d.kid == kid) {
            return d.clone();
        }
        let secret = self
            .keys
            .key(&kid)
            .map(|k| k.secret.clone())
            .unwrap_or_else(|| self.keys.signing_key().secret.clone());
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let label = format!(
            "varco-lottery/{}/{}",
            self.name,
            self.config.opens_at_ms.unwrap_or(0)
        );
        let seed = ring::hmac::sign(&key, label.as_bytes()).as_ref().to_vec();
        let d = Arc::new(Draw {
            commitment: lottery::commitment(&seed),
            seed_hex: lottery::hex(&seed),
            lotteries: Mutex::new(Vec::new()),
            seed,
            kid,
        });
        *cached = Some(d.clone());
        d
    }

    /// The place drawn for pre-queue ticket `pre` among `size`.
    pub fn lottery_place(&self, pre: u64, size: u64) -> Option<u64> {
        let draw = self.draw();
        let lottery = {
            let mut ls = draw.lotteries.lock().unwrap_or_else(|e| e.into_inner());
            match ls.iter().find(|l| l.size() == size) {
                Some(l) => l.clone(),
                None => {
                    // One size per lane once open; before that, sizes
                    // come and go as the pre-queue grows.
                    if ls.len() >= 2 * self.lanes.len() {
                        ls.clear();
                    }
                    let l = Arc::new(lottery::Lottery::new(&draw.seed, size));
                    ls.push(l.clone());
                    l
                }
            }
        };
        // Drawn outside the lock: every pre-queue ticket polls at once.
        lottery.place(pre)
    }

    /// What the waiting page and the status publish about the pre-queue
    /// draw: the seed's SHA-256 from the start, the seed itself (and the
    /// pre-queue's size) once the room has opened. None without a
    /// scheduled opening.
    pub fn lottery_info(
        &self,
        view: &crate::store::RoomView,
        now_ms: u64,
    ) -> Option<crate::page::waiting::LotteryInfo> {
        let opens_at = self.config.opens_at_ms?;
        let draw = self.draw();
        let open = view.opened && now_ms >= opens_at;
        Some(crate::page::waiting::LotteryInfo {
            commitment: draw.commitment.clone(),
            seed: open.then(|| draw.seed_hex.clone()),
            size: open.then_some(view.prequeue),
        })
    }

    /// A request to upstream `index` failed (passive health): counted
    /// here and in the room in force, if a reload put another there, by
    /// address.
    /// Counted here only, a hung upstream met by a request sent before a
    /// reload kept its place in the new rotation, and the next requests
    /// waited their own response timeout there. What the room in force
    /// did with it is the answer.
    pub fn mark_failed(&self, index: usize) -> AfterFailure {
        let here = self.upstreams.mark_failed(index);
        match self.successor_of(index) {
            Some((room, i)) => room.upstreams.mark_failed(i),
            None => here,
        }
    }

    /// A request to upstream `index`, sent at `sent_ms`, was answered:
    /// here and in the room in force.
    pub fn mark_healthy(&self, index: usize, sent_ms: u64) {
        self.upstreams.mark_healthy(index, sent_ms);
        if let Some((room, i)) = self.successor_of(index) {
            room.upstreams.mark_healthy(i, sent_ms);
        }
    }

    /// The room of this name in force now: this one, or the one a reload
    /// put in its place (a request routed before the reload ends there).
    pub fn now_in_force(self: &Arc<Self>) -> Arc<Room> {
        if !self.superseded.load(Ordering::Relaxed) {
            return self.clone();
        }
        self.in_force
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
            .unwrap_or_else(|| self.clone())
    }

    /// The room in force, when a reload put it in this one's place, and
    /// where upstream `index` is in it.
    fn successor_of(&self, index: usize) -> Option<(Arc<Room>, usize)> {
        if !self.superseded.load(Ordering::Relaxed) {
            return None;
        }
        let next = self
            .in_force
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
            .filter(|r| !std::ptr::eq(Arc::as_ptr(r), self))?;
        let label = &self.upstreams.all().get(index)?.label;
        let i = next
            .upstreams
            .all()
            .iter()
            .position(|u| &u.label == label)?;
        Some((next, i))
    }

    /// One adaptive-admission step (each tick; the controller judges once
    /// an interval): the rate follows the verdict on the whole path, an
    /// adaptive in-flight limit the verdict on the portal's own answers;
    /// each change is logged and counted.
    pub fn adapt(&self, now_ms: u64) -> Option<Change> {
        let ctl = self.adaptive.as_ref()?;
        // An operator's `unlimited` leaves the rate alone, not the cap; so
        // does `passthrough`, where the rate is not in force: cut there, a
        // room resumed would start at the floor, from a false knee.
        let rate = self.per_minute().filter(|_| self.is_gated());
        let verdict = ctl.step(now_ms);
        let limit_verdict = ctl.take_limit_verdict();
        if verdict.is_none() && limit_verdict.is_none() {
            return None;
        }
        // People waiting are a demand the rate can meet only where the
        // queue is called: paused (or closed, or passthrough), a higher
        // rate is tested by nobody, and `resume` would start at it. Nor
        // while the room is full: the tick admits nobody whatever the
        // rate, and places freed at once (a cohort idling out, a raised
        // `max_active`) would be filled at a rate nobody tried.
        let v = self.view();
        let room_for_more = self
            .max_active()
            .is_none_or(|max| v.active + v.reserved < max);
        let demand =
            v.waiting > 0 && room_for_more && matches!(self.mode(), Mode::Queue | Mode::QueueAll);
        let (latency, failures) = ctl.last_signals();
        let latency_ms = latency.map(|d| d.as_secs_f64() * 1000.0);
        let (mut changed, mut settle) = (false, 0);
        let cap = self.in_flight.as_ref().filter(|c| c.config().adaptive);
        if let Some((cap, verdict)) = cap.zip(limit_verdict) {
            let (limit, ceiling) = (cap.limit(), cap.config().limit);
            let next =
                adaptive::next_limit(&ctl.config, verdict, cap.take_saturated(), limit, ceiling);
            if next != limit {
                cap.resize(next);
                changed = true;
                if verdict == Verdict::Overloaded(adaptive::Reason::Latency) {
                    settle = adaptive::SETTLE_INTERVALS;
                }
                tracing::info!(room = %self.name, from = limit, to = next, latency_ms, failure_rate = failures, "adaptive in-flight limit {}", if next > limit { "raised" } else { "lowered" });
            }
        }
        let next = match (rate, verdict) {
            (Some(rate), Some(verdict)) => {
                adaptive::next_rate(&ctl.config, verdict, latency, demand, rate, ctl.peak())
                    .map(|(to, reason)| (rate, to, reason))
            }
            _ => None,
        };
        let change = next.map(|(from, to, reason)| Change {
            from,
            to,
            direction: if to > from {
                adaptive::Direction::Increase
            } else {
                adaptive::Direction::Decrease
            },
            reason,
        });
        if let Some(change) = &change {
            self.set_per_minute(Some(change.to));
            self.metrics.adjusted(change.direction, change.reason);
            changed = true;
            if change.reason == adaptive::Reason::Latency {
                settle = adaptive::SETTLE_INTERVALS;
            }
            if change.direction == adaptive::Direction::Decrease {
                ctl.cut_from(change.from);
            }
            tracing::info!(
                room = %self.name,
                from = change.from,
                to = change.to,
                reason = change.reason.as_str(),
                latency_ms,
                failure_rate = failures,
                "adaptive admission rate {}",
                if change.direction == adaptive::Direction::Increase { "raised" } else { "lowered" },
            );
        }
        if changed {
            ctl.changed(settle);
        }
        change
    }

    /// Drops per-address limiter state that no longer limits anyone, so
    /// the limiters do not grow with the number of addresses ever seen.
    pub fn forget_idle_addresses(&self) {
        self.ticket_limiter.retain_recent();
        self.ticket_limiter.shrink_to_fit();
        self.status_limiter.retain_recent();
        self.status_limiter.shrink_to_fit();
        if let Some(l) = &self.session_limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached permutations answer as fresh ones would, for lanes'
    /// pre-queues of different sizes asked in turn.
    #[test]
    fn cached_draws_match_fresh_ones() {
        let cfg = crate::config::Config::from_toml(
            "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:9\"]\nadmission_per_minute = 60\nopens_at = \"2030-01-01T09:00:00Z\"\n",
            std::path::Path::new("."),
        )
        .expect("valid");
        let room = Room::standalone(cfg.rooms.into_iter().next().expect("one room"));
        let seed = room.draw().seed.clone();
        for round in 0..3 {
            for size in [10, 1000, 7] {
                let fresh = lottery::Lottery::new(&seed, size);
                for pre in [1, size / 2 + round, size] {
                    assert_eq!(room.lottery_place(pre, size), fresh.place(pre));
                }
                assert_eq!(room.lottery_place(size + 1, size), None);
            }
        }
        let info = room
            .lottery_info(&crate::store::RoomView::default(), 0)
            .expect("a scheduled opening");
        assert_eq!(info.commitment, lottery::commitment(&seed));
        assert_eq!(info.seed, None, "the seed stays secret before the opening");
    }
}
