//! The node's link to Redis: one multiplexed connection, replaced when it
//! stops being of use.
//!
//! The connection manager reconnects only when the socket reports an
//! error. Two failures report none:
//! - a connection dropped silently on the way (a firewall or NAT that
//!   forgot the flow, an address moved to another host): every call on it
//!   times out, and the kernel gives up only after about 15 minutes;
//! - a Redis demoted to replica by a failover while the node's address
//!   now leads to the new primary: every write on the old connection is
//!   refused with READONLY, for as long as the connection lives.
//!
//! Either way the node stayed degraded while a new connection would have
//! worked. A few unanswered calls in a row on one connection, or one
//! READONLY, replace it; the next call connects afresh.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, RwLock};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::StoreError;

/// Calls left unanswered in a row on one connection before it is
/// replaced: one is a slow Redis, a few with nothing answered between
/// them (a tick makes one or two calls) is a connection going nowhere.
const UNANSWERED_BEFORE_REPLACING: u32 = 3;

pub struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// The connection and its number: a call's failure counts against the
    /// connection it was made on, not a newer one.
    current: RwLock<(u64, ConnectionManager)>,
    unanswered: AtomicU32,
    /// `varco_store_connections_replaced_total`, by reason.
    replaced: OnceLock<prometheus::IntCounterVec>,
}

/// A connection lent for one call, with the number it is known by.
pub struct Lent {
    pub conn: ConnectionManager,
    number: u64,
}

impl Link {
    /// Prepares the connection without connecting: that happens on the
    /// first call.
    pub fn new(client: redis::Client, config: ConnectionManagerConfig) -> Result<Link, String> {
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| format!("store.url: {e}"))?;
        Ok(Link {
            client,
            config,
            current: RwLock::new((0, conn)),
            unanswered: AtomicU32::new(0),
            replaced: OnceLock::new(),
        })
    }

    pub fn lend(&self) -> Lent {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        Lent {
            number: current.0,
            conn: current.1.clone(),
        }
    }

    /// The outcome of a call made on `lent`, as the store sees it; keeps
    /// count of what says the connection is of no more use.
    pub fn outcome<T>(&self, lent: &Lent, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        match r {
            Ok(v) => {
                if lent.number == self.number() {
                    self.unanswered.store(0, Ordering::Relaxed);
                }
                Ok(v)
            }
            Err(e) => {
                if e.is_timeout() {
                    if lent.number == self.number()
                        && self.unanswered.fetch_add(1, Ordering::Relaxed) + 1
                            >= UNANSWERED_BEFORE_REPLACING
                    {
                        self.replace(lent.number, "unanswered");
                    }
                    Err(StoreError::Unanswered(e.to_string()))
                } else {
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly) {
                        self.replace(lent.number, "read_only");
                    }
                    Err(StoreError::Unavailable(e.to_string()))
                }
            }
        }
    }

    fn number(&self) -> u64 {
        self.current.read().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Puts a new connection in place of connection `number`, unless it
    /// was already replaced (by another call that failed on it).
    fn replace(&self, number: u64, why: &'static str) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 != number {
            return;
        }
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(conn) => {
                *current = (number + 1, conn);
                self.unanswered.store(0, Ordering::Relaxed);
                if let Some(c) = self.replaced.get() {
                    c.with_label_values(&[why]).inc();
                }
                tracing::warn!(why, "store: the connection to Redis is replaced");
            }
            Err(e) => tracing::warn!(%e, "store: the connection to Redis cannot be replaced"),
        }
    }

    /// Counts each replacement into `counter`, by reason (`unanswered`,
    /// `read_only`).
    pub fn count_replacements(&self, counter: prometheus::IntCounterVec) {
        for why in ["unanswered", "read_only"] {
            counter.with_label_values(&[why]);
        }
        let _ = self.replaced.set(counter);
    }
}
