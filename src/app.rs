//! Wires one varco: rooms, router, upstream client, listeners, admin, and
//! the bounded graceful shutdown. `run` takes already-bound listeners so
//! tests can bind port 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::config::{Config, ServerConfig};
use crate::gateway::Gateway;
use crate::listener::{self, ListenerSettings};
use crate::metrics::Metrics;
use crate::proxy::{client, Forwarder};
use crate::room::Room;
use crate::router::Router;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Tls(String),
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

/// Serves until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish within `server.shutdown_grace`, and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let tls = config
        .server
        .tls
        .as_ref()
        .map(tls::acceptor)
        .transpose()
        .map_err(AppError::Tls)?;
    let metrics = Arc::new(Metrics::new());
    let rooms: Vec<Arc<Room>> = config
        .rooms
        .iter()
        .map(|r| {
            Arc::new(Room::new(
                r.clone(),
                config.upstream.fail_cooldown,
                &metrics,
            ))
        })
        .collect();
    let forwarder = Forwarder::new(
        client::build(&config.upstream),
        config.upstream.response_timeout,
        config.server.max_body_size,
        config.server.trusted_proxies.clone(),
    );
    let gateway = Arc::new(Gateway::new(
        Router::new(&rooms),
        forwarder,
        metrics.clone(),
        config.log.access,
    ));
    let ready = Arc::new(AtomicBool::new(true));
    let admin = Arc::new(Admin::new(metrics.clone(), ready.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
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
        Some(metrics.open_connections.clone()),
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
    tracing::info!("stopped");
    Ok(())
}
