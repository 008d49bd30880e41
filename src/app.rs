//! Wires one varco: store, rooms, router, upstream client, listeners,
//! admin, the admission ticker, snapshots, and the bounded graceful
//! shutdown. `run` takes already-bound listeners so tests can bind port 0;
//! [`App`] lets tests drive the clock and the ticks themselves.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::clock::{self, SharedClock};
use crate::config::{Config, ServerConfig};
use crate::gateway::Gateway;
use crate::listener::{self, ListenerSettings};
use crate::metrics::Metrics;
use crate::proxy::{client, Forwarder};
use crate::room::{limits_of, Room};
use crate::router::Router;
use crate::store::memory::MemoryStore;
use crate::store::RoomStore;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Store(String),
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
    config: Config,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    memory: Arc<MemoryStore>,
    rooms: Vec<Arc<Room>>,
}

impl App {
    pub fn new(config: Config, clock: SharedClock) -> Result<App, AppError> {
        let metrics = Arc::new(Metrics::new());
        let memory =
            Arc::new(MemoryStore::open(config.store.snapshot.clone()).map_err(AppError::Store)?);
        let tick = config.store.tick;
        let now = clock.now_ms();
        let rooms = config
            .rooms
            .iter()
            .map(|r| {
                let store: Arc<dyn RoomStore> =
                    memory.room(&r.name, &limits_of(r, tick.as_millis() as u64), now);
                Arc::new(Room::new(
                    r.clone(),
                    config.upstream.fail_cooldown,
                    &metrics,
                    store,
                    config.keys.clone(),
                    tick,
                ))
            })
            .collect();
        Ok(App {
            config,
            clock,
            metrics,
            memory,
            rooms,
        })
    }

    pub fn rooms(&self) -> &[Arc<Room>] {
        &self.rooms
    }

    pub fn room(&self, name: &str) -> Option<&Arc<Room>> {
        self.rooms.iter().find(|r| r.name == name)
    }

    /// One admission tick for every gated room.
    pub async fn tick(&self) {
        let now = self.clock.now_ms();
        for room in self.rooms.iter().filter(|r| r.is_gated()) {
            if let Err(e) = room.store.tick(room.limits(), now).await {
                tracing::warn!(room = %room.name, error = %e, "admission tick failed");
            }
        }
    }

    pub fn save(&self) {
        if let Err(e) = self.memory.save(self.clock.now_ms()) {
            tracing::error!(error = %e, "cannot write the snapshot; the queue would not survive a restart");
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
        let tls = config
            .server
            .tls
            .as_ref()
            .map(tls::acceptor)
            .transpose()
            .map_err(AppError::Tls)?;
        let forwarder = Forwarder::new(
            client::build(&config.upstream),
            config.upstream.response_timeout,
            config.server.max_body_size,
            config.server.trusted_proxies.clone(),
        );
        let gateway = Arc::new(Gateway::new(
            Router::new(&self.rooms),
            self.rooms.clone(),
            forwarder,
            self.metrics.clone(),
            self.clock.clone(),
            config.server.trusted_proxies.clone(),
            config.log.access,
        ));
        let ready = Arc::new(AtomicBool::new(true));
        let admin = Arc::new(Admin::new(self.metrics.clone(), ready.clone()));

        let (stop_tx, stop_rx) = watch::channel(false);
        let background = TaskTracker::new();
        if auto_tick {
            background.spawn(tick_loop(self.clone(), stop_rx.clone()));
        }
        if config.store.snapshot.is_some() {
            background.spawn(snapshot_loop(self.clone(), stop_rx.clone()));
        }
        let settings = ListenerSettings::from_server(&config.server);
        let connections = TaskTracker::new();
        let admin_connections = TaskTracker::new();
        let public = tokio::spawn(listener::serve(
            listeners.proxy,
            tls,
            gateway,
            settings.clone(),
            stop_rx.clone(),
            connections.clone(),
            Some(self.metrics.open_connections.clone()),
        ));
        let private = tokio::spawn(listener::serve(
            listeners.admin,
            None,
            admin,
            settings,
            stop_rx,
            admin_connections.clone(),
            None,
        ));

        shutdown.await;
        tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: no new connections, draining the open ones");
        ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        let _ = public.await;
        let _ = private.await;
        connections.close();
        admin_connections.close();
        background.close();
        let grace = config.server.shutdown_grace;
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = connections.len(),
                "grace period over; closing the remaining connections"
            );
        }
        let _ = tokio::time::timeout(grace, admin_connections.wait()).await;
        background.wait().await;
        self.save();
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
        app.tick().await;
        ticks += 1;
        // About once a minute, forget addresses no limiter is holding back.
        if ticks % 60 == 0 {
            for room in app.rooms() {
                room.forget_idle_addresses();
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

/// Serves with the system clock until `shutdown` completes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let app = Arc::new(App::new(config, clock::system())?);
    app.serve(listeners, shutdown, true).await
}
