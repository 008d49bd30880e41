//! Wires one varco: store, rooms, router, upstream client, listeners,
//! admin, the admission ticker, snapshots, and the bounded graceful
//! shutdown. `run` takes already-bound listeners so tests can bind port 0;
//! [`App`] lets tests drive the clock and the ticks themselves.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::audit::{self, AuditLog};
use crate::clock::{self, SharedClock};
use crate::config::file::RawServer;
use crate::config::{
    AdminToken, Config, ConfigError, ConfigErrors, ServerConfig, StoreKind, TlsConfig,
};
use crate::gateway::{self, Gateway};
use crate::history::History;
use crate::listener::{self, ListenerSettings};
use crate::metrics::Metrics;
use crate::proxy::buffer::{BufferLimits, RequestBuffer};
use crate::proxy::upstreams::{NotTakenOut, PassiveHealth};
use crate::proxy::{client, health, Forwarder};
use crate::room::admission::{Limits, Mode};
use crate::room::lanes::{self, Lane};
use crate::room::token::Keyring;
use crate::room::{limits_of, Room};
use crate::router::{Routing, SharedRouting};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{LiveChange, RoomStore, StoreError};
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Store(String),
    /// The config does not fit the state restored: `store.snapshot`.
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// The public and admin listeners, bound before `run`.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(server: &ServerConfig) -> Result<Listeners, AppError> {
        let bind = |key, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Bind { key, addr, source })
        };
        Ok(Listeners {
            proxy: bind("server.listen", server.listen).await?,
            admin: bind("server.admin_listen", server.admin_listen).await?,
        })
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }
}

/// One varco's state, built before it serves.
pub struct App {
    /// The config varco started with: listeners, timeouts and the store
    /// come from it; rooms may since have been reloaded.
    config: Config,
    /// The file to reload from (SIGHUP, admin API); none in tests.
    config_path: Option<PathBuf>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    stores: Stores,
    routing: SharedRouting,
    /// Why the store is failing, as of the last tick; None while healthy.
    store_trouble: std::sync::Mutex<Option<String>>,
    /// Serialises reloads, and holds the keys in force: an ephemeral key
    /// must outlive a reload, or every ticket and pass would die with it.
    reloading: tokio::sync::Mutex<Keyring>,
    /// The last hour of each room, for the operator page.
    history: History,
    /// The admission log, when `audit.log` is set.
    audit: Option<audit::Writer>,
    /// SIGHUP's stream when the caller installed it before saying it
    /// listens; the reload task takes it.
    hangup: std::sync::Mutex<Option<tokio::signal::unix::Signal>>,
    /// SIGUSR1's, likewise, for reopening the admission log (always
    /// handled: its default action would end varco).
    reopen: std::sync::Mutex<Option<tokio::signal::unix::Signal>>,
    /// Rooms this node advanced at the last tick, with the run of their
    /// queue then: a room it starts advancing (a lease taken over) is
    /// logged from where it stood before that tick; a new run, from its
    /// start.
    audit_led: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The certificates the public listener presents (`server.tls`); a
    /// reload swaps in the ones its files hold then.
    certificates: Option<Arc<tls::Certificates>>,
    /// The rooms' `tls_server_name`s, shared by every client towards
    /// upstreams (requests and health checks); a reload swaps them.
    server_names: client::ServerNames,
    /// The client requests go out with.
    upstream_client: client::SharedClient,
    /// The admin API's tokens: a reload swaps them, so a leaked one is
    /// revoked without a restart.
    admin_tokens: ArcSwap<Vec<crate::config::AdminToken>>,
    /// Ticks begun: which room the next one starts from.
    ticks: std::sync::atomic::AtomicU64,
}

/// A room's live settings before an operator's change, for the audit log.
pub struct LiveBefore {
    pub mode: Mode,
    pub per_minute: Option<f64>,
    pub max_active: Option<u64>,
}

/// A reload taken.
#[derive(Debug)]
pub struct Reloaded {
    /// The rooms now in force.
    pub rooms: usize,
    /// The tables (`server`, `upstream`, `log`, `store`, `audit`) that
    /// differ from the ones varco started with: their changes wait for a
    /// restart, and an operator who reloaded for them must hear it from
    /// the reload itself, not find it in the log.
    pub restart_needed: Vec<&'static str>,
}

/// Why a reload was refused; the old config keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
}

impl App {
    pub async fn new(config: Config, clock: SharedClock) -> Result<App, AppError> {
        let metrics = Arc::new(Metrics::new());
        let stores = match &config.store.kind {
            StoreKind::Memory => Stores::Memory(
                MemoryStore::open(config.store.snapshot.clone(), clock.now_ms())
                    .map_err(AppError::Store)?,
            ),
            StoreKind::Redis {
                url,
                prefix,
                tls_ca,
            } => Stores::Redis(Arc::new(
                RedisStore::connect(
                    url,
                    prefix,
                    config.store.lease,
                    config.store.tick,
                    tls_ca.as_deref(),
                )
                .await
                .map_err(AppError::Store)?,
            )),
        };
        if let Stores::Memory(m) = &stores {
            m.count_marks_errors(metrics.state_write_errors.with_label_values(&["marks"]));
        }
        // A cluster runs on one clock, Redis's: what each node sends,
        // signs and checks, and the admission log's times.
        let clock = match &stores {
            Stores::Redis(r) => {
                r.count_replacements(metrics.store_connections_replaced.clone());
                r.watch_clock(clock, metrics.store_clock_offset.clone())
            }
            Stores::Memory(_) => clock,
        };
        // /readyz says degraded from the start, not from the first tick.
        let mut trouble = None;
        if let Stores::Redis(redis) = &stores {
            if let Err(e) = redis.reach().await {
                tracing::warn!(error = %e, "cannot reach Redis at start: starting degraded, and trying again");
                trouble = Some(format!("at start: {e}"));
            }
        }
        // From 0, so increase() sees the first failure (a series born at 1
        // shows none).
        if config.store.snapshot.is_some() {
            metrics.state_write_errors.with_label_values(&["snapshot"]);
            // What is on disk now is the whole queue (just restored from it,
            // or nothing yet to lose): from here, a first write that hangs
            // ages the series, and VarcoQueueStateStale sees it, where an
            // absent series would stay silent.
            metrics
                .snapshot_written
                .with_label_values::<&str>(&[])
                .set((clock.now_ms() / 1000) as i64);
        }
        let rooms = build_rooms(
            &config,
            &config,
            &config.keys,
            &stores,
            &metrics,
            clock.now_ms(),
            &|_| None,
        );
        // The memory store's state is restored by now; the shared store's
        // is read here, for the rooms announcing an opening and for the
        // base of the room counters, before anybody comes in (a node that
        // cannot reach Redis starts, degraded: a reload checks the opening
        // then, and the counters start from Redis's first answer).
        let now = clock.now_ms();
        if let Stores::Redis(_) = &stores {
            // At once: with Redis away each waits for the store's timeout.
            let reads = rooms.iter().flat_map(|room| {
                room.lanes.iter().map(move |lane| async move {
                    if let Err(e) = lane.store.refresh(room.lane_limits(lane), now).await {
                        if room.config.opens_at_ms.is_some_and(|t| t > now) {
                            tracing::warn!(room = %room.name, error = %e, "cannot read the room's state at start: whether its queue has already opened is checked at the next reload");
                        } else {
                            tracing::warn!(room = %room.name, error = %e, "cannot read the room's state at start: its counters start from Redis's first answer");
                        }
                    }
                })
            });
            futures_util::future::join_all(reads).await;
        }
        // Keys made up at start draw nothing a restart could keep.
        let generated = config.raw.secrets.keys_made_up();
        let mut errors: Vec<ConfigError> = rooms
            .iter()
            .filter_map(|r| not_reopened(&r.name, r.config.opens_at_ms, &r.view(), now).err())
            .chain(rooms.iter().filter(|_| !generated).filter_map(|r| {
                // A key made up by an earlier run is in no file to keep:
                // its tickets went with it.
                let kid = r
                    .store
                    .lottery_key_id()
                    .filter(|k| k != crate::room::token::EPHEMERAL_KEY_ID)?;
                lottery_key_missing(
                    &r.config,
                    &kid,
                    r.config.ticket_ttl,
                    (&config.keys, key_source(&config)),
                    now,
                )
            }))
            .collect();
        if let Stores::Memory(m) = &stores {
            errors.extend(restored_queue_kept(m, &config, &rooms, now));
        }
        if !errors.is_empty() {
            stores.abandon();
            return Err(AppError::Config(ConfigErrors(errors)));
        }
        for room in &rooms {
            warn_if_opened_by_a_past_date(room, now);
        }
        certificates_in_force(
            &metrics,
            &config,
            config.server.tls.as_ref(),
            clock.now_ms(),
        );
        let server_names = client::ServerNames::new(&config.rooms);
        for room in &rooms {
            health::watch(room, &config.upstream, &server_names, &metrics);
        }
        let routing: SharedRouting = Arc::new(ArcSwap::from_pointee(Routing::new(rooms)));
        metrics.watch_rooms(routing.clone());
        let keys = config.keys.clone();
        let audit = match &config.audit_log {
            Some(path) => match AuditLog::open(path, &node_name())
                .and_then(|log| audit::Writer::new(log, metrics.audit_records.clone()))
            {
                Ok(writer) => Some(writer),
                Err(e) => {
                    stores.abandon();
                    return Err(AppError::Store(format!(
                        "audit.log: cannot open {}: {e}",
                        path.display()
                    )));
                }
            },
            None => None,
        };
        if let (Some(log), Stores::Memory(_)) = (audit.as_ref().map(|w| w.log()), &stores) {
            let routing = routing.load();
            for room in routing.rooms.iter() {
                for lane in &room.lanes {
                    log.baseline_at_start(&room.line_name(lane), lane.store.view().serving);
                }
            }
        }
        // One node alone advances every room from the start; in a cluster
        // a node logs only what it advances once it holds the lease.
        let audit_led = match &stores {
            Stores::Memory(_) => routing
                .load()
                .rooms
                .iter()
                .flat_map(|r| {
                    r.lanes
                        .iter()
                        .map(|l| (r.line_name(l), l.store.generation()))
                        .collect::<Vec<_>>()
                })
                .collect(),
            Stores::Redis(_) => Default::default(),
        };
        Ok(App {
            config_path: None,
            clock,
            metrics,
            stores,
            routing,
            store_trouble: std::sync::Mutex::new(trouble),
            reloading: tokio::sync::Mutex::new(keys),
            history: History::default(),
            audit,
            audit_led: std::sync::Mutex::new(audit_led),
            hangup: std::sync::Mutex::new(None),
            reopen: std::sync::Mutex::new(None),
            certificates: config.server.tls.as_ref().map(tls::Certificates::new),
            upstream_client: Arc::new(ArcSwap::from_pointee(client::build(
                &config.upstream,
                &server_names,
            ))),
            server_names,
            admin_tokens: ArcSwap::from_pointee(config.admin_tokens.clone()),
            ticks: Default::default(),
            config,
        })
    }

    /// The admin API's tokens in force.
    pub fn admin_tokens(&self) -> Arc<Vec<crate::config::AdminToken>> {
        self.admin_tokens.load_full()
    }

    /// The keys in force (the rooms sign with them; a reload may have
    /// rotated them since the start).
    pub fn keys(&self) -> Keyring {
        self.rooms()
            .first()
            .map(|r| r.keys.clone())
            .unwrap_or_else(|| self.config.keys.clone())
    }

    pub fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref().map(|w| w.log())
    }

    /// Waits until every admission log write the ticks asked for has
    /// landed (or failed): the log as the ticks left it.
    pub async fn audit_settled(&self) {
        if let Some(w) = &self.audit {
            w.settled().await;
        }
    }

    /// Reopens the admission log at its path (see [`AuditLog::reopen`]),
    /// saying what came of it. Returns whether the log is now written at
    /// its path.
    pub async fn reopen_audit_log(&self) -> bool {
        let Some(audit) = &self.audit else {
            tracing::info!("SIGUSR1: no admission log (audit.log) to reopen");
            return false;
        };
        let path = audit.log().path().display().to_string();
        match audit.reopen().await {
            Ok(audit::Reopened::Same) => {
                tracing::info!(%path, "admission log reopen: still the same file, nothing to do");
                true
            }
            Ok(audit::Reopened::Moved { next }) => {
                tracing::info!(%path, next_record = next, "admission log reopened: the next record goes to the file now at its path");
                true
            }
            Err(e) => {
                tracing::error!(%path, error = %e, "cannot reopen the admission log: records go on in the file written so far");
                false
            }
        }
    }

    /// The admission log's last records, at a clean stop: whoever was let
    /// in since the last tick (directly, in a room with room to spare, or
    /// while the connections drained) is otherwise in no record, or, once
    /// restarted from the snapshot, in one with the restart's time.
    /// Bounded: a disk that hangs must not hold the exit past the
    /// supervisor's patience, and the snapshot written after this.
    async fn log_last(&self) {
        if self.audit.is_none() {
            return;
        }
        let now = self.clock.now_ms();
        let rooms = self.rooms();
        let mut marks = Vec::new();
        let last = async {
            // A write still out (the last tick's, late) would have each
            // lane's record refused as busy.
            self.audit_settled().await;
            // In a cluster a drain longer than the lease may have lost it
            // unseen: a range the next leader logs too may repeat, none
            // is left out.
            for room in rooms.iter().filter(|r| r.is_gated()) {
                for lane in room.lanes.iter() {
                    let (run, view) = lane.store.run_and_view();
                    if let Some(mark) = self
                        .log_admissions(room, lane, (run, view.serving), now)
                        .await
                    {
                        marks.push((room, lane, mark));
                    }
                }
            }
            self.audit_settled().await;
        };
        if tokio::time::timeout(2 * audit::WRITE_WAIT, last)
            .await
            .is_err()
        {
            tracing::error!(
                "the admission log's last records are not on disk: the disk does not answer"
            );
        }
        // Apart from the disk's wait, and together: a Redis slow to
        // answer costs one store wait, not one a lane, and a mark not
        // shared only has the next leader log a range again.
        let shared = marks
            .into_iter()
            .map(|(room, lane, mark)| Self::mark_audited(room, lane, mark));
        let _ =
            tokio::time::timeout(audit::WRITE_WAIT, futures_util::future::join_all(shared)).await;
    }

    /// Appends what a room's lane admitted since the last record, if this
    /// node advances it. `before`: the lane's run and serving counter as
    /// this node knew them before the tick.
    /// Returns the lane's run and the last number of a record it wrote,
    /// for [`Self::mark_audited`].
    async fn log_admissions(
        &self,
        room: &Room,
        lane: &Lane,
        before: (u64, u64),
        now: u64,
    ) -> Option<(u64, u64)> {
        let audit = self.audit.as_ref()?;
        let line = room.line_name(lane);
        // A lane this node starts advancing in a cluster: where the node
        // that led it had logged up to. Its own view of the counters
        // already holds what every node let in straight away since, which
        // would be in no one's log.
        let newly_led = lane.store.leads()
            && !self
                .audit_led
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&line);
        // Unread, the mark would be taken as none, and the line begun
        // from this node's view for good: asked again next tick instead
        // (the mark is never above the view, so that tick covers this
        // one's admissions too).
        let handed = if newly_led {
            match lane.store.audited().await {
                Ok(mark) => mark,
                Err(_) => {
                    room.metrics.store_errors.inc();
                    return None;
                }
            }
        } else {
            None
        };
        let (run, serving) = {
            let mut led = self.audit_led.lock().unwrap_or_else(|e| e.into_inner());
            if !lane.store.leads() {
                led.remove(&line);
                return None;
            }
            // Led since the look above (a tick run alongside): the mark
            // was not read, and the next tick begins the line.
            if !newly_led && !led.contains_key(&line) {
                return None;
            }
            let (run, view) = lane.store.run_and_view();
            let handed_to = handed.filter(|(r, _)| *r == run).map(|(_, to)| to);
            let from_here = |serving: u64| handed_to.map_or(serving, |to| to.min(serving));
            let from = match led.get(&line) {
                // A lane this node starts advancing (a lease taken over, a
                // room a reload added): from where it stood before this
                // tick, so that the tick's own admissions are logged (the
                // node that led before logged up to about there; a range
                // may repeat, none is left out). Before this node had
                // heard the store, where it stood is not known: from now.
                None if before.0 == 0 => Some(from_here(view.serving)),
                None if before.0 == run => Some(from_here(before.1)),
                // The run changed under the tick: the new one from its
                // start.
                None => Some(0),
                // The store lost its data: its counters started again
                // from nothing, and this tick's admissions are the new
                // run's first (else logged from the tick's serving on,
                // as a counter that went back is).
                Some(&was) if was != run && was != 0 && run != 0 => Some(0),
                Some(_) => None,
            };
            // Tried again next tick if a write holds the log.
            if let Some(from) = from {
                if !audit.baseline(&line, from) {
                    return None;
                }
            }
            if run != 0 || !led.contains_key(&line) {
                led.insert(line.clone(), run);
            }
            (run, view.serving)
        };
        let path = audit.log().path().display();
        match audit.observe(&line, serving, now).await {
            // Counted by the writer, where a late one is counted too.
            audit::Written::Done(Some(record)) => return Some((run, record.to)),
            audit::Written::Done(None) => {}
            audit::Written::Failed(e) => {
                self.metrics.audit_write_errors.inc();
                tracing::error!(room = %room.name, error = %e, path = %path, "cannot append to the admission log");
            }
            audit::Written::Late => {
                self.metrics.audit_write_errors.inc();
                tracing::error!(room = %room.name, path = %path, wait = ?audit::WRITE_WAIT, "the admission log's disk has not answered a write: admissions go on, and the next record written covers them");
            }
            // Counted too: the alert holds for as long as the disk does not
            // answer.
            audit::Written::Busy => self.metrics.audit_write_errors.inc(),
        }
        None
    }

    /// Tells the shared store how far this node's admission log has
    /// recorded `lane` (cluster mode: see [`RoomStore::audited`]).
    /// Counted, not logged, when it fails: the next record's tries again,
    /// and a lease moving meanwhile costs a range logged twice.
    async fn mark_audited(room: &Room, lane: &Lane, (run, to): (u64, u64)) {
        if lane.store.set_audited(run, to).await.is_err() {
            room.metrics.store_errors.inc();
        }
    }

    /// One node alone advances every room from the start: a room or lane
    /// a reload adds (`rooms`, before they take requests) is logged from
    /// where its counters stand now. From its first tick, those it
    /// admitted straight away before that would be left out. If a write
    /// holds the log, the first tick takes the line up instead.
    fn log_new_lines(&self, rooms: &[Arc<Room>]) {
        let (Some(audit), Stores::Memory(_)) = (&self.audit, &self.stores) else {
            return;
        };
        let mut led = self.audit_led.lock().unwrap_or_else(|e| e.into_inner());
        for room in rooms {
            for lane in &room.lanes {
                let line = room.line_name(lane);
                if !led.contains_key(&line) && audit.begin(&line, lane.store.view().serving) {
                    led.insert(line, lane.store.generation());
                }
            }
        }
    }

    /// Remembers the file the config came from, for reloads.
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    pub fn rooms(&self) -> Vec<Arc<Room>> {
        self.routing.load().rooms.clone()
    }

    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        self.routing.load().room(name).cloned()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// An operator takes an upstream of `room` out of rotation (`out`) or
    /// puts it back, on this node: whether it was out before. Serialised
    /// with reloads, so one under way cannot build its rooms from the
    /// pool before the change and lose it.
    pub async fn take_upstream_out(
        &self,
        room: &str,
        upstream: &str,
        out: bool,
        force: bool,
    ) -> Result<(Arc<Room>, bool), NotTakenOut> {
        let _no_reload_meanwhile = self.reloading.lock().await;
        let room = self.room(room).ok_or(NotTakenOut::NoSuchRoom)?;
        let was = room.upstreams.take_out(upstream, out, force)?;
        Ok((room, was))
    }

    /// An operator's live change to room `name` (`None`: reset, back to
    /// the config), serialised with reloads: one under way finishes first,
    /// and the change lands on the room it put in force. Made on the room
    /// a reload was replacing, it was answered 200 and lost at the swap.
    /// `in_force` is called once the change is in force on this node,
    /// before it is shared: the audit line is written then, so a Redis
    /// that stalls the sharing (and a shutdown meanwhile) cannot leave a
    /// change in force that no line names.
    /// The room changed, what it had before, and whether the change was
    /// shared (cluster mode); None when no room has that name any more.
    pub async fn change_live(
        &self,
        name: &str,
        change: Option<LiveChange>,
        in_force: impl FnOnce(&Room, &LiveBefore),
    ) -> Option<(Arc<Room>, LiveBefore, Result<(), StoreError>)> {
        let _no_reload_meanwhile = self.reloading.lock().await;
        let room = self.room(name)?;
        let before = LiveBefore {
            mode: room.mode(),
            per_minute: room.per_minute(),
            max_active: room.max_active(),
        };
        match change {
            Some(c) => room.apply_live(c),
            None => room.apply_reset(),
        }
        in_force(&room, &before);
        let shared = match change {
            Some(c) => room.share_live(c).await,
            None => room.share_reset().await,
        };
        Some((room, before, shared))
    }

    /// A reload asked for by `who` (an admin token's id, or `SIGHUP`),
    /// told on `varco::audit` whatever comes of it: the audit log says
    /// who changed the config in force, when, and whether it was taken.
    pub async fn reload_by(&self, who: &str) -> Result<Reloaded, ReloadError> {
        tracing::info!(target: "varco::audit", who, action = "reload", "config reload requested");
        let result = self.reload().await;
        match &result {
            Ok(r) => {
                tracing::info!(target: "varco::audit", who, action = "reload", rooms = r.rooms, restart_needed = ?r.restart_needed, "config reload taken: the new config is in force")
            }
            Err(e) => {
                tracing::error!(target: "varco::audit", who, action = "reload", error = %e, "reload refused; the running config stays")
            }
        }
        result
    }

    /// Re-reads the config file and swaps in its rooms. Places in line and
    /// live sessions stay (the store is kept by room name); open
    /// connections stay; a bad file, or none to read, changes nothing
    /// (and is counted as refused).
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let mut keys = self.reloading.lock().await;
        let loaded = match &self.config_path {
            Some(path) => Config::load(path).map_err(ReloadError::from),
            None => Err(ReloadError::NoFile),
        };
        let result = match loaded {
            Ok(new) => match self
                .keeps_drawn_places(&new)
                .and_then(|()| self.keeps_lanes_in_use(&new))
                .and_then(|()| self.keeps_rooms_in_use(&new))
                .and_then(|()| keeps_key_secrets(&new, &keys))
                .and_then(|()| self.keeps_lottery_keys(&new, &keys))
                .and_then(|()| self.finds_upstream_tls_in_force(&new))
            {
                Ok(()) => self.returns_unopened(&new).await.map(|()| new),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let counted = |result| {
            self.metrics
                .config_reloads
                .with_label_values(&[result])
                .inc()
        };
        let new = result.inspect_err(|_| counted("refused"))?;
        // A file the reload brings (a key file, a lane's secret) is
        // looked at as one the start read is.
        for caution in new.cautions() {
            tracing::warn!("{caution}");
        }
        // A generated key (ephemeral, or none configured) stays: a new
        // random one would void every ticket and pass in hand.
        if !new.raw.secrets.keys_made_up() {
            // The key made up at start, when none was configured, goes on
            // verifying until the restart: a room gated live before the
            // key file came signed passes with it, and the file cannot
            // list it, so its holders would all be sent back to the line.
            let made_up = crate::room::token::EPHEMERAL_KEY_ID;
            let next = match keys.key(made_up) {
                Some(k) if new.keys.key(made_up).is_none() => new.keys.verifying_also(k),
                _ => new.keys.clone(),
            };
            let ids = |k: &Keyring| k.ids().map(str::to_string).collect::<Vec<_>>();
            let (was, now) = (ids(&keys), ids(&next));
            if was != now {
                let removed: Vec<&String> = was.iter().filter(|id| !now.contains(id)).collect();
                tracing::info!(target: "varco::audit", in_force = ?now, removed = ?removed, signs = %next.signing_key().id, "signing keys replaced: what a removed key signed counts as no token");
            }
            *keys = next;
        }
        let restart_needed = self.apply(new, &keys);
        // Counted once in force: whoever waits for the count (an operator,
        // a deployment script) then finds the new config serving.
        counted("ok");
        Ok(Reloaded {
            rooms: self.routing.load().rooms.len(),
            restart_needed,
        })
    }

    /// Refuses a new `opens_at` for a room that has opened: with a
    /// pre-queue, the opening is part of the lottery's seed, so the draw
    /// already revealed would be made again and every pre-queue ticket
    /// moved to another place; and an opening still to come would not
    /// hold back a queue that is already admitting (see `not_reopened`).
    fn keeps_drawn_places(&self, new: &Config) -> Result<(), ReloadError> {
        let now = self.clock.now_ms();
        self.check_running_rooms(new, |next, room| {
            if next.opens_at_ms == room.config.opens_at_ms {
                return None;
            }
            // Unheard, the view reads as a queue that never opened,
            // whatever Redis holds: an opening moved past checks.
            if !room.heard() {
                return Some(unheard(
                    format!("rooms.{}.opens_at", next.name),
                    "whether the queue has opened, and has a pre-queue drawn,",
                ));
            }
            let view = room.view();
            drawn_places_kept(room.config.opens_at_ms, next, &view, now)
                .or_else(|| not_reopened(&next.name, next.opens_at_ms, &view, now).err())
        })
    }

    /// Refuses a config without a lane that still holds people: their
    /// passes and tickets name it, and a token of a lane the room no
    /// longer has counts as none (`Room::lane`): every pass in it sent
    /// back to the line mid-flow, every place in it lost. Emptied first
    /// (its selector pointed at nobody, its people admitted and gone), it
    /// may go.
    fn keeps_lanes_in_use(&self, new: &Config) -> Result<(), ReloadError> {
        self.check_running_rooms(new, |next, room| {
            room.lanes.iter().skip(1).find_map(|lane| {
                let kept = next
                    .lanes
                    .iter()
                    .any(|l| !l.is_default() && l.name == lane.name);
                if !kept && !lane.store.heard() {
                    return Some(not_heard(
                        format!("rooms.{}.lanes.{}", next.name, lane.name),
                        "lane",
                    ));
                }
                let view = lane.store.view();
                // Called and not yet in, or drawn at the opening: neither
                // is waiting, and each one's ticket names the lane.
                let prequeue = if view.opened { 0 } else { view.prequeue };
                let held = view.active + view.waiting + view.reserved + prequeue;
                (!kept && held > 0).then(|| ConfigError {
                    key: format!("rooms.{}.lanes.{}", next.name, lane.name),
                    reason: format!(
                        "the lane still holds {} live sessions, {} people called and not yet in, {} waiting and {} in its pre-queue, whose passes and tickets name it: without it they count as none (sent back to the line mid-flow, their places lost). Keep it, selecting nobody into it (a header nobody sends), until it is empty",
                        view.active, view.reserved, view.waiting, prequeue
                    ),
                })
            })
        })
    }

    /// Refuses a config without a room (removed, or renamed) that still
    /// holds live sessions or people called, or people in line while it
    /// is open: their passes and tickets name it, so they would be sent
    /// back to the line mid-flow and lose their places, and a room under
    /// the new name would let in up to its `max_active` beside the
    /// sessions the portal still serves. Closed (`mode = "closed"`: its
    /// line told it is closed), or not gated (in `passthrough`, or
    /// without limits: nobody in its line is ever called, and everyone
    /// gets in), it may go once its sessions have ended. In a cluster,
    /// a room this node has not heard from the store since its start is
    /// not taken for empty.
    fn keeps_rooms_in_use(&self, new: &Config) -> Result<(), ReloadError> {
        let errors = self
            .rooms()
            .iter()
            .filter(|room| !new.rooms.iter().any(|r| r.name == room.name))
            .filter_map(|room| {
                let key = format!("rooms.{}", room.name);
                if !room.heard() {
                    return Some(not_heard(key, "room"));
                }
                let (mut inside, mut in_line) = (0, 0);
                for lane in &room.lanes {
                    let view = lane.store.view();
                    inside += view.active + view.reserved;
                    in_line += view.in_line();
                }
                let calls = room.is_gated() && room.mode() != Mode::Closed;
                if !calls {
                    in_line = 0;
                }
                (inside > 0 || in_line > 0).then(|| ConfigError {
                    key,
                    reason: format!(
                        "the room still holds {inside} live sessions and people called, and {in_line} in line, whose passes and tickets name it: removed or renamed, they would be sent back to the line mid-flow and lose their places, and a room under another name would let in up to its max_active beside them. {}remove it once its sessions have ended",
                        if calls {
                            "Close it first (mode = \"closed\", or varco ctl close), and "
                        } else {
                            "Keep it until its sessions have ended (session_idle after their last request): "
                        }
                    ),
                })
            })
            .collect();
        refused(errors)
    }

    /// Refuses a key file without the key a room's pre-queue lottery is
    /// drawn with, while the draw matters: its commitment is published,
    /// and until every pre-queue ticket has expired (`ticket_ttl` past
    /// the opening) each one's place is computed from it. Without the
    /// key the draw would fall back to another (`Room::draw`): the
    /// published commitment changed, every pre-queue place drawn again.
    fn keeps_lottery_keys(&self, new: &Config, running: &Keyring) -> Result<(), ReloadError> {
        if new.raw.secrets.keys_made_up() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        self.check_running_rooms(new, |next, room| {
            // Pre-queue tickets are good until the opening plus the
            // ticket_ttl they were signed with: a shorter one now does not
            // shorten theirs.
            let ttl = next.ticket_ttl.max(room.longest_ticket_ttl);
            let Some(kid) = room.store.lottery_key_id() else {
                // Unheard, the key the cluster drew with is not known
                // here: any key the file drops may be it.
                let dropped = (!room.heard())
                    .then(|| {
                        running
                            .ids()
                            .find(|id| {
                                lottery_key_missing(next, id, ttl, (&new.keys, key_source(new)), now)
                                    .is_some()
                            })
                    })
                    .flatten()?;
                return Some(unheard(
                    key_source(new).into(),
                    &format!("whether key \"{dropped}\", which the file drops, draws room {}'s pre-queue lottery", next.name),
                ));
            };
            running.key(&kid)?;
            // A key made up at start goes on verifying, and drawing, when
            // a reload brings a key file (`reload`), which cannot list it.
            if kid == crate::room::token::EPHEMERAL_KEY_ID {
                return None;
            }
            lottery_key_missing(next, &kid, ttl, (&new.keys, key_source(new)), now)
        })
    }

    /// `upstream.tls_ca` and `upstream.tls_client` wait for a restart,
    /// like the rest of `[upstream]`. A reload that changes one and brings
    /// an https upstream not running now would have it verified (or shown
    /// a certificate) with the running settings: every request to it
    /// would fail, the room down until a restart. Refused, naming the
    /// setting; one already running goes on as it did.
    fn finds_upstream_tls_in_force(&self, new: &Config) -> Result<(), ReloadError> {
        let Some(setting) = self.upstream_tls_changed(new) else {
            return Ok(());
        };
        let https = |u: &http::Uri| u.scheme_str() == Some("https");
        let in_force: Vec<String> = self
            .rooms()
            .iter()
            .flat_map(|r| r.config.upstreams.iter().filter(|u| https(u)))
            .map(crate::proxy::upstreams::label)
            .collect();
        let errors = new
            .rooms
            .iter()
            .flat_map(|r| r.upstreams.iter().map(move |u| (r, u)))
            .filter(|(_, u)| https(u) && !in_force.contains(&crate::proxy::upstreams::label(u)))
            .map(|(r, u)| ConfigError {
                key: setting.into(),
                reason: format!(
                    "changed, and it applies at the next restart, but room {} brings the https upstream {} that would be reached with the running one: restart varco, or reload without that upstream first",
                    r.name,
                    crate::proxy::upstreams::label(u)
                ),
            })
            .collect();
        refused(errors)
    }

    /// The first of `upstream.tls_ca` and `upstream.tls_client` that
    /// `new` changes: by what the files hold too, as a CA or a certificate
    /// renewed under the same path is read only at a restart as well.
    fn upstream_tls_changed(&self, new: &Config) -> Option<&'static str> {
        let (running, next) = (&self.config.raw.upstream, &new.raw.upstream);
        let (in_use, read_now) = (&self.config.upstream, &new.upstream);
        let chain = |c: &Option<crate::config::TlsCertificate>| {
            c.as_ref().map(|c| c.certified.cert.clone())
        };
        [
            (
                "upstream.tls_ca",
                running.tls_ca != next.tls_ca || in_use.tls_roots != read_now.tls_roots,
            ),
            (
                "upstream.tls_client",
                running.tls_client != next.tls_client
                    || chain(&in_use.tls_client) != chain(&read_now.tls_client),
            ),
        ]
        .into_iter()
        .find_map(|(key, changed)| changed.then_some(key))
    }

    /// The reload's refusal for what `check` finds wrong in the rooms of
    /// `new` that are running now (each with the running room).
    fn check_running_rooms(
        &self,
        new: &Config,
        check: impl Fn(&crate::config::RoomConfig, &Room) -> Option<ConfigError>,
    ) -> Result<(), ReloadError> {
        let errors = new
            .rooms
            .iter()
            .filter_map(|next| check(next, &*self.room(&next.name)?))
            .collect();
        refused(errors)
    }

    /// Refuses an opening still to come for a room the file brings back
    /// (removed by an earlier reload, or renamed back) whose queue has
    /// opened: its state outlived it in the store, and the restart
    /// `App::new` checks would refuse what this reload let in, after a
    /// day of admitting before the time the page announces. On one node,
    /// also an opening other than the one its queue was run for, with
    /// its pre-queue drawn (see `drawn_places_kept`), as a start would.
    async fn returns_unopened(&self, new: &Config) -> Result<(), ReloadError> {
        let now = self.clock.now_ms();
        let tick = self.config.store.tick.as_millis() as u64;
        let mut errors = Vec::new();
        for next in &new.rooms {
            if self.room(&next.name).is_some() {
                continue;
            }
            if let Stores::Memory(m) = &self.stores {
                let drawn = Lane::store_names(next).into_iter().find_map(|line| {
                    let kept = m.existing(&line)?;
                    drawn_places_kept(kept.opening_ms(), next, &kept.view(), now)
                });
                if let Some(e) = drawn {
                    errors.push(e);
                    continue;
                }
            }
            if next.opens_at_ms.is_none_or(|t| t <= now) {
                continue;
            }
            for line in Lane::store_names(next) {
                let view = match &self.stores {
                    Stores::Memory(m) => m.existing(&line).map(|r| r.view()),
                    Stores::Redis(redis) => {
                        let room = redis.room(&line);
                        match room.refresh(limits_of(next, tick), now).await {
                            Ok(()) => Some(room.view()),
                            // Not taken unchecked: a queue that had opened
                            // would admit before the time the page tells,
                            // and the next start refuse this very file.
                            Err(e) => {
                                errors.push(ConfigError {
                                    key: format!("rooms.{}.opens_at", next.name),
                                    reason: format!("cannot check whether the queue the store keeps for this room has already opened ({e}): reload again once the store answers"),
                                });
                                break;
                            }
                        }
                    }
                };
                if let Some(e) =
                    view.and_then(|v| not_reopened(&next.name, next.opens_at_ms, &v, now).err())
                {
                    errors.push(e);
                    break;
                }
            }
        }
        refused(errors)
    }

    /// Swaps in the rooms of `new`, signing with `keys`. Returns the
    /// tables whose changes wait for a restart.
    fn apply(&self, new: Config, keys: &Keyring) -> Vec<&'static str> {
        let (old, next) = (&self.config.raw, &new.raw);
        let mut restart_needed = Vec::new();
        for (table, changed) in [
            ("server", differs_but_certificate(&old.server, &next.server)),
            // Files read again under the same names count as changes: a
            // renewed client certificate, a rotated Redis password
            // (`url_file`) is in force only after a restart, and "nothing
            // waits" would be a lie the certificate's expiry then tells.
            (
                "upstream",
                differs(&old.upstream, &next.upstream) || self.upstream_tls_changed(&new).is_some(),
            ),
            ("log", differs(&old.log, &next.log)),
            (
                "store",
                differs(&old.store, &next.store) || self.config.store.kind != new.store.kind,
            ),
            ("audit", differs(&old.audit, &next.audit)),
        ] {
            if changed {
                tracing::warn!(
                    table,
                    "changes in this table apply at the next restart; rooms, keys and admin tokens apply now"
                );
                restart_needed.push(table);
            }
        }
        // The demo's token, made at start for a file that names none: a
        // reload of such a file keeps it, or the operator page and the
        // API went dark, with no way back but a restart.
        let made_up = !self.config.raw.admin.names_tokens() && !self.config.admin_tokens.is_empty();
        let tokens = match made_up && !next.admin.names_tokens() {
            true => &self.config.admin_tokens,
            false => &new.admin_tokens,
        };
        let was = self.admin_tokens.load_full();
        if *was != *tokens {
            // Who may change the rooms, from when: the audit log's first
            // question after a token leaked, and revoking by a reload is
            // the answer the README gives.
            let id = |t: &AdminToken| t.id.clone();
            let named = |from: &[AdminToken], t: &AdminToken| from.iter().any(|w| w.id == t.id);
            let in_force: Vec<String> = tokens.iter().map(id).collect();
            let added: Vec<String> = tokens.iter().filter(|t| !named(&was, t)).map(id).collect();
            let removed: Vec<String> = was.iter().filter(|t| !named(tokens, t)).map(id).collect();
            let changed: Vec<String> = tokens
                .iter()
                .filter(|t| was.iter().any(|w| w.id == t.id && w.token != t.token))
                .map(id)
                .collect();
            tracing::info!(target: "varco::audit", in_force = ?in_force, added = ?added, removed = ?removed, changed = ?changed, "admin tokens replaced");
            self.admin_tokens.store(Arc::new(tokens.clone()));
        }
        if let (Some(served), Some(t)) = (&self.certificates, &new.server.tls) {
            served.replace(t);
            certificates_in_force(&self.metrics, &self.config, Some(t), self.clock.now_ms());
        }
        let rooms = build_rooms(
            &new,
            &self.config,
            keys,
            &self.stores,
            &self.metrics,
            self.clock.now_ms(),
            &|name| self.room(name),
        );
        // An operator's live changes hold across a reload, until a reset.
        for room in &rooms {
            if let Some(old) = self.room(&room.name) {
                room.keep_live_changes_of(&old);
                let held = room.live_changes();
                if !held.is_empty() {
                    tracing::warn!(
                        target: "varco::audit",
                        room = %room.name,
                        held = ?held,
                        mode = room.mode().as_str(),
                        admission_per_minute = ?room.per_minute(),
                        max_active = ?room.max_active(),
                        "live changes hold over the reloaded file until a reset"
                    );
                }
            }
        }
        // What adaptive admission learned survives a reload (within the
        // new bounds); starting over would re-probe a portal we know.
        for room in &rooms {
            if let (Some(a), Some(old)) = (&room.adaptive, self.room(&room.name)) {
                if room.rate_is_held() {
                    continue;
                }
                if let (Some(_), Some(rate)) = (&old.adaptive, old.per_minute()) {
                    room.set_per_minute(Some(
                        rate.clamp(a.config.min_per_minute, a.config.max_per_minute),
                    ));
                    room.share_between_lanes();
                }
            }
        }
        // The old rooms' checks stop before their verdicts are taken
        // over, so none is lost and no upstream has two checkers. An
        // upstream the checks took out stays out until they pass it again,
        // rather than getting citizens' requests for `fall` checks; a room
        // whose checks were removed starts with every upstream in.
        for old in self.rooms() {
            old.upstreams.stop_checks();
        }
        // Before the new rooms take requests: new connections to their
        // https upstreams use the names they give now.
        if self.server_names.replace(&new.rooms) {
            // hyper's pool knows connections by address alone: one made
            // under the old name would be reused for as long as it is busy.
            let fresh = client::build(&self.config.upstream, &self.server_names);
            self.upstream_client.store(Arc::new(fresh));
            tracing::info!("TLS server names changed: new connections to the upstreams concerned");
        }
        for room in &rooms {
            *room.in_force.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(room);
            if let Some(old) = self.room(&room.name) {
                old.superseded
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                room.upstreams.keep_taken_out_of(&old.upstreams);
                room.upstreams.keep_cooldowns_of(&old.upstreams);
                room.upstreams.keep_rotation_of(&old.upstreams);
            }
            if let (Some(old), Some(_)) = (self.room(&room.name), &room.config.health_check) {
                room.upstreams.keep_checks_of(&old.upstreams);
            }
            health::watch(
                room,
                &self.config.upstream,
                &self.server_names,
                &self.metrics,
            );
        }
        let now = self.clock.now_ms();
        for room in &rooms {
            let before = self.room(&room.name).and_then(|r| r.config.opens_at_ms);
            if before != room.config.opens_at_ms {
                warn_if_opened_by_a_past_date(room, now);
            }
        }
        self.log_new_lines(&rooms);
        let names: Vec<&str> = rooms.iter().map(|r| r.name.as_str()).collect();
        tracing::info!(rooms = ?names, "config reloaded");
        // The rooms' counters as the old rooms leave them (a lane this
        // reload removes admitted since the last tick), then the new.
        self.metrics.follow_rooms(&self.rooms());
        self.routing.store(Arc::new(Routing::new(rooms)));
        self.metrics.follow_rooms(&self.rooms());
        self.metrics.forget_gone(&self.rooms());
        restart_needed
    }

    /// One lane's tick; a failure is counted and logged, and said for
    /// /readyz.
    async fn tick_lane(
        &self,
        room: &Room,
        lane: &Lane,
        limits: Limits,
        now: u64,
    ) -> Result<(), (String, bool)> {
        lane.store.tick(limits, now).await.map(drop).map_err(|e| {
            room.metrics.store_errors.inc();
            tracing::warn!(room = %room.name, lane = %lane.name, error = %e, "admission tick failed");
            // Refused: the store answered, about this room: the next
            // rooms' ticks are no slower for it.
            let answered = matches!(e, StoreError::Refused(_));
            (format!("room {}: {e}", room.name), answered)
        })
    }

    /// One admission tick for every gated room, and for a room not gated
    /// that still holds sessions.
    pub async fn tick(&self) {
        // A node started with Redis away runs on its own clock until
        // Redis answers: measured first, so this tick's time is Redis's.
        if let Stores::Redis(r) = &self.stores {
            if !r.clock_ready() {
                let _ = r.reach().await;
            }
        }
        let now = self.clock.now_ms();
        let mut trouble = None;
        // Whether a failed tick was one Redis did not answer: the rooms
        // after it skip theirs then (below). Each tick starts from another
        // room, so none is left behind for good.
        let mut unanswered = false;
        let rooms = {
            let mut rooms = self.rooms();
            let n = rooms.len() as u64;
            if n > 0 {
                let first = self
                    .ticks
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rooms.rotate_left((first % n) as usize);
            }
            rooms
        };
        // Every room, gated or not: an operator may have paused a plain
        // proxy through another node. A store that does not answer for
        // one will not for the next: one wait a tick, not one a room.
        for room in rooms.iter() {
            if !room.follow_shared().await {
                break;
            }
        }
        // Redis that did not answer one lane's tick will not answer the
        // next: the other lanes skip theirs (each would wait the store's
        // timeout, a tick of many rooms lasting seconds, and /readyz
        // learning late). An error it answered about one room's state is
        // that room's, and quick: the others tick (skipped, each would be
        // ticked once in so many ticks, and such gaps look like outages to
        // admission.lua). The memory store's failures are its own room's.
        let shared = matches!(self.stores, Stores::Redis(_));
        // Not only gated rooms: with its rate lifted (`unlimited`), an
        // adaptive room's in-flight limit still follows the verdicts.
        for room in rooms.iter() {
            room.adapt(now);
        }
        for room in rooms.iter().filter(|r| r.is_gated()) {
            for (i, lane) in room.lanes.iter().enumerate() {
                // Shares from the counts as they are after the lanes before
                // this one ticked: together they never pass max_active.
                let for_tick = lanes::share(&room.lanes, &room.limits(), Some(i));
                let mut limits = room.lane_limits(lane);
                if let Some(&max) = for_tick.get(i) {
                    limits.max_active = limits.max_active.map(|_| max);
                }
                if unanswered && shared {
                    continue;
                }
                let (run, view) = lane.store.run_and_view();
                match self.tick_lane(room, lane, limits, now).await {
                    Ok(()) => {
                        if let Some(mark) = self
                            .log_admissions(room, lane, (run, view.serving), now)
                            .await
                        {
                            Self::mark_audited(room, lane, mark).await;
                        }
                    }
                    Err((why, answered)) => {
                        unanswered |= !answered;
                        trouble = Some(why);
                    }
                }
            }
            // The shares until the next tick, from the counts after it.
            lanes::share(&room.lanes, &room.limits(), None);
        }
        // A room not gated now (passthrough, or its limits lifted live)
        // may still hold the sessions and called turns of its gated time:
        // they run out as time passes, admitting nobody. Left alone, the
        // Redis store would take the ungated time for an outage when the
        // room is gated again, and keep every session of before alive
        // for one more idle time: a room full of people long gone.
        for room in rooms.iter().filter(|r| !r.is_gated()) {
            for lane in &room.lanes {
                let v = lane.store.view();
                // People left waiting need no tick: passthrough calls
                // nobody, and the store keeps their places as they are.
                if v.active == 0 && v.reserved == 0 {
                    continue;
                }
                if unanswered && shared {
                    continue;
                }
                let limits = Limits {
                    mode: Mode::Passthrough,
                    ..room.lane_limits(lane)
                };
                if let Err((why, answered)) = self.tick_lane(room, lane, limits, now).await {
                    unanswered |= !answered;
                    trouble = Some(why);
                }
            }
        }
        self.history.sample(&self.rooms(), now);
        self.metrics.follow_rooms(&self.rooms());
        let mut t = self.store_trouble.lock().unwrap_or_else(|e| e.into_inner());
        if t.is_some() && trouble.is_none() {
            tracing::info!("the store answers again");
        }
        *t = trouble;
    }

    /// Why the store is failing, if it is (for /readyz).
    pub fn store_trouble(&self) -> Option<String> {
        self.store_trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn save(&self) {
        let Stores::Memory(memory) = &self.stores else {
            return;
        };
        // The store succeeds without writing when there is no file: no
        // time to report for it.
        if self.config.store.snapshot.is_none() {
            return;
        }
        let now = self.clock.now_ms();
        match memory.save(now) {
            Ok(()) => self.note_snapshot_written(now),
            Err(e) => {
                self.count_snapshot_error();
                tracing::error!(error = %e, "cannot write the snapshot; the queue would not survive a restart");
            }
        }
    }

    fn note_snapshot_written(&self, now_ms: u64) {
        self.metrics
            .snapshot_written
            .with_label_values::<&str>(&[])
            .set((now_ms / 1000) as i64);
    }

    fn count_snapshot_error(&self) {
        self.metrics
            .state_write_errors
            .with_label_values(&["snapshot"])
            .inc();
    }

    /// The snapshot at a clean stop, which also removes the numbers written
    /// ahead: the next start then knows nothing was lost.
    fn save_last(&self) {
        let Stores::Memory(memory) = &self.stores else {
            return;
        };
        if let Err(e) = memory.close(self.clock.now_ms()) {
            self.count_snapshot_error();
            tracing::error!(error = %e, "cannot write the last snapshot or remove the marks; the next start will take this stop for a crash");
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish within `server.shutdown_grace`, saves the
    /// snapshot and returns. With `auto_tick` false the caller ticks.
    pub async fn serve(
        self: Arc<Self>,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
        auto_tick: bool,
    ) -> Result<(), AppError> {
        let config = &self.config;
        let tls = self.certificates.as_ref().map(|c| c.acceptor());
        let forwarder = Forwarder::new(
            self.upstream_client.clone(),
            config.upstream.response_timeout,
            config.server.max_body_size,
            config.server.trusted_proxies.clone(),
            config.server.client_address_header,
        );
        let buffer = RequestBuffer::new(
            BufferLimits {
                per_request: config.upstream.request_buffer,
                memory: config.upstream.request_buffer_memory,
                within: config.upstream.request_buffer_time,
                max_body_size: config.server.max_body_size,
                read_timeout: config.server.body_read_timeout,
            },
            &self.metrics,
        );
        let gateway = Arc::new(Gateway::new(
            self.routing.clone(),
            buffer,
            forwarder,
            self.metrics.clone(),
            self.clock.clone(),
            gateway::Settings {
                trusted_proxies: config.server.trusted_proxies.clone(),
                client_header: config.server.client_address_header,
                access_log: config.log.access,
                request_id: config.server.request_id,
                request_id_from_proxies: config.server.request_id_from_proxies,
            },
        ));
        let ready = Arc::new(AtomicBool::new(true));
        let admin = Arc::new(Admin::new(self.clone(), ready.clone()));

        let (stop_tx, stop_rx) = watch::channel(false);
        let background = TaskTracker::new();
        if auto_tick {
            background.spawn(tick_loop(self.clone(), stop_rx.clone()));
        }
        // Snapshots go on through the drain, which lasts up to
        // `shutdown_grace`: the claims and releases of the requests still
        // open are in them should the supervisor kill varco before the
        // last one.
        let (drained_tx, drained_rx) = watch::channel(false);
        if config.store.snapshot.is_some() {
            background.spawn(snapshot_loop(self.clone(), drained_rx));
        }
        let hangup_installed = self
            .hangup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if self.config_path.is_some() || hangup_installed {
            background.spawn(reload_on_sighup(self.clone(), stop_rx.clone()));
        }
        background.spawn(reopen_on_sigusr1(self.clone(), stop_rx.clone()));
        let settings = ListenerSettings::from_server(&config.server);
        self.metrics
            .max_connections
            .set(i64::try_from(settings.max_connections).unwrap_or(i64::MAX));
        let close = tokio_util::sync::CancellationToken::new();
        let stop = listener::Stop {
            drain: stop_rx.clone(),
            close: close.clone(),
        };
        let connections = TaskTracker::new();
        let admin_connections = TaskTracker::new();
        let public = tokio::spawn(listener::serve(
            listeners.proxy,
            tls,
            gateway,
            settings.clone(),
            stop.clone(),
            connections.clone(),
            Some(listener::Counters {
                open: self.metrics.open_connections.clone(),
                dropped: self.metrics.connections_dropped.clone(),
            }),
        ));
        let private = tokio::spawn(listener::serve(
            listeners.admin,
            None,
            admin,
            settings.for_admin(),
            stop,
            admin_connections.clone(),
            None,
        ));

        shutdown.await;
        ready.store(false, Ordering::Relaxed);
        // Load balancers take a few probes to see /readyz fail; until then
        // they still send people here, who are served, not refused.
        let delay = config.server.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(
                ?delay,
                "shutting down: /readyz says 503; still serving until the delay is over"
            );
            tokio::time::sleep(delay).await;
        }
        tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: no new connections, draining the open ones");
        let _ = stop_tx.send(true);
        let _ = public.await;
        let _ = private.await;
        connections.close();
        admin_connections.close();
        background.close();
        // One grace for both listeners: the admin's must not stretch the
        // exit past what the supervisor allows (it kills, and the last
        // snapshot is never written).
        let deadline = tokio::time::Instant::now() + config.server.shutdown_grace;
        let drained = tokio::time::timeout_at(deadline, async {
            connections.wait().await;
            admin_connections.wait().await;
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                open = connections.len() + admin_connections.len(),
                "grace period over; closing the remaining connections"
            );
            // Before the last snapshot: a connection left serving could
            // still admit somebody whose claim it would miss.
            close.cancel();
            connections.wait().await;
            admin_connections.wait().await;
        }
        let _ = drained_tx.send(true);
        background.wait().await;
        self.log_last().await;
        self.save_last();
        tracing::info!("stopped");
        Ok(())
    }
}

async fn tick_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(app.config.store.tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        // A panicking tick would end the loop for good, every room frozen
        // while /readyz still said ready: told, and the next tick runs.
        if AssertUnwindSafe(app.tick()).catch_unwind().await.is_err() {
            tracing::error!("an admission tick panicked (a bug: please report it); ticking on");
            // Said on /readyz as "degraded", still 200, as for a store
            // away: a 503 would take a single node, and everyone admitted
            // through it, out of the balancer, for rooms that only stop
            // moving. The operator sees it there and in the log.
            *app.store_trouble.lock().unwrap_or_else(|e| e.into_inner()) =
                Some("an admission tick panicked".into());
        }
        ticks += 1;
        // About once a minute, forget addresses no limiter is holding back.
        if ticks.is_multiple_of(60) {
            for room in app.rooms() {
                room.forget_idle_addresses();
            }
        }
    }
}

/// SIGHUP reloads the config file, as nginx and HAProxy do.
async fn reload_on_sighup(app: Arc<App>, stop: watch::Receiver<bool>) {
    let installed = app.hangup.lock().unwrap_or_else(|e| e.into_inner()).take();
    on_signal(
        installed,
        tokio::signal::unix::SignalKind::hangup(),
        "cannot listen for SIGHUP; reload through the admin API",
        "the reload",
        stop,
        || app.reload_by("SIGHUP"),
    )
    .await;
}

/// SIGUSR1 reopens the admission log, as it makes nginx reopen its logs:
/// after logrotate renamed it, the records go to a new file at its path.
async fn reopen_on_sigusr1(app: Arc<App>, stop: watch::Receiver<bool>) {
    let installed = app.reopen.lock().unwrap_or_else(|e| e.into_inner()).take();
    on_signal(
        installed,
        tokio::signal::unix::SignalKind::user_defined1(),
        "cannot listen for SIGUSR1: the admission log cannot be reopened",
        "reopening the admission log",
        stop,
        || app.reopen_audit_log(),
    )
    .await;
}

/// Runs `act` at each signal of `kind` (on the stream the caller
/// installed, if any) until told to stop. A panic in `act` is told and
/// the loop goes on: ended, every later signal would go unheard, and,
/// its handler still installed, would not even kill.
async fn on_signal<F, Fut>(
    installed: Option<tokio::signal::unix::Signal>,
    kind: tokio::signal::unix::SignalKind,
    unheard: &str,
    what: &str,
    mut stop: watch::Receiver<bool>,
    act: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future,
{
    let Some(mut signals) = installed.or_else(|| tokio::signal::unix::signal(kind).ok()) else {
        tracing::warn!("{unheard}");
        return;
    };
    loop {
        tokio::select! {
            _ = signals.recv() => {}
            _ = stop.changed() => return,
        }
        // A stop ends the wait too: a reopen queued behind a write hung
        // on the disk (an NFS share gone) waits for ever, and the
        // shutdown waits for this loop before the last snapshot.
        tokio::select! {
            acted = AssertUnwindSafe(act()).catch_unwind() => if acted.is_err() {
                tracing::error!("{what} panicked (a bug: please report it)");
            },
            _ = stop.changed() => {
                // Said, as its start was: a reload asked for has no
                // outcome line otherwise.
                tracing::warn!("{what} left unfinished: varco is stopping");
                return;
            }
        }
    }
}

async fn snapshot_loop(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(app.config.store.snapshot_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        let app = app.clone();
        // File I/O off the async workers.
        let _ = tokio::task::spawn_blocking(move || app.save()).await;
    }
}

/// Says so when a room's `opens_at` is already past while nobody has
/// ever come: the room is open from now, with no pre-queue and no draw.
/// Right the day after a click day, it is a slip (a year, a month
/// mistyped) before one: people would be admitted now, not at the time
/// announced. A warning, not a refusal: a restart after the opening
/// keeps the date it opened at.
fn warn_if_opened_by_a_past_date(room: &Room, now_ms: u64) {
    let Some(t) = room.config.opens_at_ms.filter(|t| *t <= now_ms) else {
        return;
    };
    // Counters not heard from Redis yet say nothing of who came.
    if !room.heard() {
        return;
    }
    let view = room.view();
    if view.queue == 0 && view.prequeue == 0 {
        tracing::warn!(
            room = %room.name,
            opens_at = %crate::timefmt::rfc3339(t),
            "opens_at is already past and nobody has come yet: the room is open now, with no pre-queue and no draw; if the opening is meant for later, correct the date and reload before anyone comes"
        );
    }
}

/// Refuses `next`'s opening where the queue was run for opening `was`
/// and its pre-queue places are drawn from it (the opening is part of
/// the lottery's seed): any other opening would draw them again once the
/// room has opened; before, one brought nearer than a pre-queue page's
/// slowest poll would call places whose pages have not asked since.
fn drawn_places_kept(
    was: Option<u64>,
    next: &crate::config::RoomConfig,
    view: &crate::store::RoomView,
    now: u64,
) -> Option<ConfigError> {
    if next.opens_at_ms == was {
        return None;
    }
    if was.is_some() && view.opened && view.prequeue > 0 {
        return Some(ConfigError {
            key: format!("rooms.{}.opens_at", next.name),
            reason: format!(
                "the room has opened and its {} pre-queue tickets have their places drawn; a new opening would draw them again. Keep the old value ({})",
                view.prequeue,
                was.map(crate::timefmt::rfc3339).unwrap_or_default()
            ),
        });
    }
    // Before the opening a pre-queue page asks seldom (up to every 5
    // minutes, 1.3 times that with its jitter).
    let earliest = now + crate::page::waiting::PREQUEUE_POLL_MAX_S * 1_300;
    let brought = match (was, next.opens_at_ms) {
        (Some(was), Some(new)) => new < was && new < earliest,
        (Some(_), None) => true,
        _ => false,
    };
    (!view.opened && view.prequeue > 0 && brought).then(|| ConfigError {
        key: format!("rooms.{}.opens_at", next.name),
        reason: format!(
            "{} people wait in the pre-queue, and their pages ask only every few minutes before the opening: brought nearer than {} (or removed), it would call places whose pages have not asked since, and their turns would lapse. Bring it to {} or later",
            view.prequeue,
            crate::timefmt::rfc3339(earliest),
            crate::timefmt::rfc3339(earliest)
        ),
    })
}

/// What a start restoring the queue refuses of the config for rooms the
/// snapshot holds, as a reload would: an opening other than the one the
/// queue was run for (see `drawn_places_kept`), and a room or lane the
/// config no longer has (renamed, or removed) that still holds live
/// sessions or people called. Rooms and lanes left out holding only a
/// line are told; empty ones are forgotten, and leave the snapshot.
fn restored_queue_kept(
    memory: &MemoryStore,
    config: &Config,
    rooms: &[Arc<Room>],
    now: u64,
) -> Vec<ConfigError> {
    let mut errors: Vec<ConfigError> = rooms
        .iter()
        .filter_map(|room| {
            let was = Lane::store_names(&room.config)
                .into_iter()
                .find_map(|name| memory.existing(&name)?.opening_ms())?;
            drawn_places_kept(Some(was), &room.config, &room.view(), now)
        })
        .collect();
    let kept: std::collections::HashSet<String> =
        config.rooms.iter().flat_map(Lane::store_names).collect();
    for (name, view) in memory.others(&kept, now) {
        let key = match name.split_once('#') {
            Some((room, lane)) => format!("rooms.{room}.lanes.{lane}"),
            None => format!("rooms.{name}"),
        };
        let inside = view.active + view.reserved;
        if inside > 0 {
            errors.push(ConfigError {
                key,
                reason: format!(
                    "the snapshot holds {inside} live sessions and people called in it, and {} in line, whose passes and tickets name it: renamed or removed while varco was stopped, they would be sent back to the line mid-flow and lose their places, and a room under another name would let in up to its max_active beside them. Keep it (closed, if nobody more is to come in) until its sessions have ended, then remove it with a reload",
                    view.in_line()
                ),
            });
        } else if view.in_line() > 0 {
            tracing::warn!(%key, in_line = view.in_line(), "the snapshot holds people in line here, but the config has no such room or lane: their places are kept in the store, and wait for it to come back");
        } else {
            memory.forget(&name);
        }
    }
    errors
}

/// An opening still to come for a queue that has already opened. A
/// queue opens once: its pre-queue takes the first places, so a second
/// opening has no places to draw, and the rules (and the Lua script) do
/// not hold back a queue that has opened. Left alone, people would be
/// admitted before the time the waiting page announces; refused, the
/// operator hears it when setting the date, not on the day.
fn not_reopened(
    room: &str,
    opens_at_ms: Option<u64>,
    view: &crate::store::RoomView,
    now_ms: u64,
) -> Result<(), ConfigError> {
    match opens_at_ms {
        Some(t) if view.opened && t > now_ms => Err(ConfigError {
            key: format!("rooms.{room}.opens_at"),
            reason: format!(
                "{} is still to come, but this room's queue has already opened ({} numbers handed out): a queue opens once, and this one would go on admitting before then. Keep the old value, or close the room (mode = \"closed\") until the day; a second opening with its own pre-queue needs a fresh queue (a room of a new name; or a restart with the snapshot moved away, or in cluster mode with another store.prefix)",
                crate::timefmt::rfc3339(t),
                view.queue
            ),
        }),
        _ => Ok(()),
    }
}

/// The refusal of a reload that would remove `what` (a room, a lane)
/// this node has not heard from the shared store since its start: its
/// view reads as empty whatever Redis holds.
fn not_heard(key: String, what: &str) -> ConfigError {
    unheard(key, &format!("whether the {what} still holds people"))
}

/// The refusal of a reload whose check needs what this node has not
/// heard from the shared store since its start: `whether` it cannot tell.
fn unheard(key: String, whether: &str) -> ConfigError {
    ConfigError {
        key,
        reason: format!("{whether} cannot be told: the store has not answered since the start. Reload again once it does"),
    }
}

/// Refuses a key file that gives a key id in force another secret: every
/// ticket, pass and receipt code signed under that id would stop
/// verifying (every place lost, every session sent back to the line
/// mid-flow) while the store still counts them, and a lottery drawn with
/// it would be drawn again. Tokens are voided on purpose by removing the
/// id; a new secret goes under a new id.
fn keeps_key_secrets(new: &Config, running: &Keyring) -> Result<(), ReloadError> {
    if new.raw.secrets.keys_made_up() {
        return Ok(());
    }
    let source = key_source(new);
    let errors = running
        .ids()
        .filter(|id| {
            let (Some(was), Some(now)) = (running.key(id), new.keys.key(id)) else {
                return false;
            };
            !crate::gate::constant_time_eq(&was.secret, &now.secret)
        })
        .map(|id| ConfigError {
            key: source.into(),
            reason: format!(
                "key id \"{id}\" now holds another secret: every ticket, pass and receipt it signed would stop verifying (places lost, people sent back to the line mid-flow). Give the new secret a new id, listed last so it signs, and keep \"{id}\" until what it signed has lapsed; to void what it signed, remove it"
            ),
        })
        .collect();
    refused(errors)
}

/// Where a config's keys come from, to name in a refusal.
fn key_source(config: &Config) -> &'static str {
    if config.raw.secrets.key_file.is_some() {
        "secrets.key_file"
    } else {
        "secrets.key_env"
    }
}

/// The error for a room whose pre-queue lottery is drawn with key `kid`
/// while its draw still matters (until the opening plus `ticket_ttl`),
/// when `keys` lacks that key: the draw would fall back to another key
/// (`Room::draw`), its published commitment change, and every pre-queue
/// place be drawn again.
fn lottery_key_missing(
    room: &crate::config::RoomConfig,
    kid: &str,
    ticket_ttl: std::time::Duration,
    keys: (&Keyring, &'static str),
    now_ms: u64,
) -> Option<ConfigError> {
    let (keys, source) = keys;
    let opens = room.opens_at_ms?;
    let drawn_for = opens.saturating_add(ticket_ttl.as_millis() as u64);
    (now_ms < drawn_for && keys.key(kid).is_none()).then(|| ConfigError {
        key: source.into(),
        reason: format!(
            "key \"{kid}\" draws room {}'s pre-queue lottery, whose commitment is published: without it every pre-queue place would be drawn again. Keep it among the keys until {} (the opening plus the longest ticket_ttl its tickets were signed with)",
            room.name,
            crate::timefmt::rfc3339(drawn_for)
        ),
    })
}

/// Serves with the system clock until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let app = Arc::new(App::new(config, clock::system()).await?);
    app.serve(listeners, shutdown, true).await
}

/// The app `varco run` and `varco demo` serve, with the system clock:
/// `path`, if any, is what SIGHUP and the admin API reload; `hangup`
/// and `reopen` are SIGHUP's and SIGUSR1's streams, installed by the
/// caller before it said it listens (a SIGHUP without a file is told
/// and counted as refused, not the default action that kills).
pub async fn prepare(
    config: Config,
    path: Option<PathBuf>,
    hangup: tokio::signal::unix::Signal,
    reopen: Option<tokio::signal::unix::Signal>,
) -> Result<Arc<App>, AppError> {
    let mut app = App::new(config, clock::system()).await?;
    if let Some(path) = path {
        app = app.with_config_path(path);
    }
    *app.hangup.lock().unwrap_or_else(|e| e.into_inner()) = Some(hangup);
    *app.reopen.lock().unwrap_or_else(|e| e.into_inner()) = reopen;
    Ok(Arc::new(app))
}

/// A reload refused for `errors`, if there are any.
fn refused(errors: Vec<ConfigError>) -> Result<(), ReloadError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ReloadError::Invalid(ConfigErrors(errors)))
    }
}

/// Compares two config tables by their TOML form.
fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    toml::to_string(a).ok() != toml::to_string(b).ok()
}

/// Tells the log and the metrics which certificates are in force and
/// until when, warning for one that has expired (browsers, or a portal
/// that asks for varco's, refuse it): `served` to citizens (a reload's),
/// and the client certificate `running` shows https upstreams (read at
/// start only).
fn certificates_in_force(
    metrics: &Metrics,
    running: &Config,
    served: Option<&TlsConfig>,
    now_ms: u64,
) {
    let mut expiries = Vec::new();
    let served = served.iter().flat_map(|t| t.certificates.iter());
    for c in served.chain(running.upstream.tls_client.as_ref()) {
        let cert = c.cert.display().to_string();
        let names = c.names.join(" ");
        let Some(until) = tls::expires_at(&c.certified) else {
            tracing::warn!(%cert, %names, "TLS certificate in force, but its validity cannot be read: varco_tls_certificate_expiry_timestamp_seconds cannot warn before it expires");
            continue;
        };
        let valid_until = crate::timefmt::rfc3339(until.saturating_mul(1000));
        if until.saturating_mul(1000) <= now_ms {
            tracing::warn!(%cert, %names, %valid_until, "a TLS certificate in force has expired: browsers refuse it");
        } else {
            tracing::info!(%cert, %names, %valid_until, "TLS certificate in force for new connections");
        }
        expiries.push((cert, until));
    }
    metrics.certificates_expire(&expiries);
}

/// Whether `[server]` changed in a way that waits for a restart: the
/// certificate's files may change (a reload reads them), TLS turned on or
/// off may not (the listener speaks one or the other).
fn differs_but_certificate(a: &RawServer, b: &RawServer) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    if a.tls.is_some() && b.tls.is_some() {
        (a.tls, b.tls) = (None, None);
    }
    differs(&a, &b)
}

/// This machine's name, for the admission log's `node` field.
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "varco".into())
}

/// Where the rooms' counters live.
enum Stores {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisStore>),
}

impl Stores {
    /// A start refused after the store opened: see `MemoryStore::abandon`.
    fn abandon(&self) {
        if let Stores::Memory(m) = self {
            m.abandon();
        }
    }
}

/// A room per config table; each keeps its store (places, sessions) by
/// name across reloads.
/// The rooms of `config`, with the `[store]` and `[upstream]` settings of
/// `running` (changes there wait for a restart: the tick loop, the Redis
/// store and the client keep what they started with); `old` finds a room
/// of the same name from before a reload, whose requests in flight keep
/// counting.
fn build_rooms(
    config: &Config,
    running: &Config,
    keys: &Keyring,
    stores: &Stores,
    metrics: &Metrics,
    now_ms: u64,
    old: &dyn Fn(&str) -> Option<Arc<Room>>,
) -> Vec<Arc<Room>> {
    let tick = running.store.tick;
    config
        .rooms
        .iter()
        .map(|r| {
            let store_for = |name: &str| -> Arc<dyn RoomStore> {
                match stores {
                    Stores::Memory(m) => {
                        m.room(name, &limits_of(r, tick.as_millis() as u64), now_ms)
                    }
                    Stores::Redis(redis) => redis.room(name),
                }
            };
            let store = store_for(&r.name);
            Arc::new(
                Room::new(
                    r.clone(),
                    PassiveHealth {
                        max_fails: running.upstream.max_fails,
                        cooldown: running.upstream.fail_cooldown,
                    },
                    metrics,
                    store,
                    keys.clone(),
                    tick,
                )
                .with_arrival_key(config.arrival_key.as_deref())
                .with_lanes(&store_for)
                .with_in_flight_of(old(&r.name).as_deref())
                .with_adaptive_of(old(&r.name).as_deref())
                .with_in_force_of(old(&r.name).as_deref())
                .with_retired_lanes_of(old(&r.name).as_deref())
                .with_undelivered_of(old(&r.name).as_deref())
                .with_ticket_ttl_of(old(&r.name).as_deref()),
            )
        })
        .collect()
}
