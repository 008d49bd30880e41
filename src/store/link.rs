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
//! worked. A connection with three calls in a row unanswered and no
//! answer for three timeouts, or one READONLY, is replaced; the next call
//! connects afresh. At most one replacement a second: an address that
//! still leads to a replica (a DNS name not yet moved) gets a new try
//! each second, not one per call.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::StoreError;

/// Calls left unanswered in a row on one connection before it may be
/// replaced: one is a slow Redis; several at once are one stall.
const UNANSWERED_BEFORE_REPLACING: u32 = 3;

/// The least time between two replacements.
const REPLACED_AT_MOST_EVERY: Duration = Duration::from_secs(1);

pub struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: RwLock<Arc<Connection>>,
    /// How long a connection must go without an answer, besides its
    /// unanswered calls, before it is replaced: three of the store's
    /// timeouts, so calls that all time out in one stall of Redis do not
    /// replace a connection that is fine.
    quiet: Duration,
    started: Instant,
    /// When the last replacement was made (ms since `started`; 0: none).
    replaced_ms: AtomicU64,
    /// `varco_store_connections_replaced_total`, by reason.
    replaced: OnceLock<prometheus::IntCounterVec>,
}

/// One connection and what it has shown: a call's outcome counts against
/// the connection it was made on, never a newer one.
struct Connection {
    number: u64,
    conn: ConnectionManager,
    unanswered: AtomicU32,
    /// When it last answered, or was made (ms since the link started).
    answered_ms: AtomicU64,
}

impl Connection {
    /// Connection `number`, made at `now_ms`: it connects on its first call.
    fn lazy(
        client: &redis::Client,
        config: &ConnectionManagerConfig,
        number: u64,
        now_ms: u64,
    ) -> redis::RedisResult<Connection> {
        Ok(Connection {
            number,
            conn: ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
            unanswered: AtomicU32::new(0),
            answered_ms: AtomicU64::new(now_ms),
        })
    }
}

/// A connection lent for one call.
pub struct Lent {
    pub conn: ConnectionManager,
    of: Arc<Connection>,
}

/// An error Redis answered about what it was asked (a key of the wrong
/// type, a script error, a reply of another shape): quick, and about one
/// room's state. Not one that says the server cannot serve anyone now:
/// a replica's READONLY (which replaces the connection), out of memory,
/// a failing disk, a busy script; before Redis 7 those come inside a
/// script's error, whose code is ERR.
fn about_the_request(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    const SERVER_WIDE: [&str; 5] = ["OOM", "MISCONF", "NOAUTH", "BUSY", "NOREPLICAS"];
    if read_only(e) {
        return false;
    }
    let says_server_wide = |text: &str| {
        SERVER_WIDE
            .iter()
            .any(|c| text.starts_with(c) || text.contains(&format!("-{c} ")))
    };
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) | ErrorKind::UnexpectedReturnType => {
            !says_server_wide(&e.to_string())
        }
        ErrorKind::Extension => !e.code().is_some_and(|c| SERVER_WIDE.contains(&c)),
        _ => false,
    }
}

/// Whether Redis refused a write as a replica: READONLY itself, or (before
/// Redis 7) inside a script's error, whose code is ERR.
fn read_only(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || e.to_string().contains("READONLY")
}

impl Link {
    /// Prepares the connection without connecting: that happens on the
    /// first call. `timeout`: how long one call may take.
    pub fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
        timeout: Duration,
    ) -> Result<Link, String> {
        let first =
            Connection::lazy(&client, &config, 0, 0).map_err(|e| format!("store.url: {e}"))?;
        Ok(Link {
            client,
            config,
            current: RwLock::new(Arc::new(first)),
            quiet: 3 * timeout,
            started: Instant::now(),
            replaced_ms: AtomicU64::new(0),
            replaced: OnceLock::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn lend(&self) -> Lent {
        let of = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Lent {
            conn: of.conn.clone(),
            of,
        }
    }

    /// The outcome of a call made on `lent`, as the store sees it; keeps
    /// count of what says the connection is of no more use.
    pub fn outcome<T>(&self, lent: &Lent, r: redis::RedisResult<T>) -> Result<T, StoreError> {
        let of = &lent.of;
        match r {
            Ok(v) => {
                of.unanswered.store(0, Ordering::Relaxed);
                of.answered_ms.store(self.now_ms(), Ordering::Relaxed);
                Ok(v)
            }
            Err(e) if e.is_timeout() => {
                let in_a_row = of.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
                let silent_ms = self
                    .now_ms()
                    .saturating_sub(of.answered_ms.load(Ordering::Relaxed));
                if in_a_row >= UNANSWERED_BEFORE_REPLACING
                    && silent_ms >= self.quiet.as_millis() as u64
                {
                    self.replace(of.number, "unanswered");
                }
                Err(StoreError::Unanswered(e.to_string()))
            }
            Err(e) if about_the_request(&e) => {
                of.unanswered.store(0, Ordering::Relaxed);
                of.answered_ms.store(self.now_ms(), Ordering::Relaxed);
                Err(StoreError::Refused(e.to_string()))
            }
            Err(e) => {
                if read_only(&e) {
                    self.replace(of.number, "read_only");
                }
                if answer_lost(&e) {
                    Err(StoreError::Unanswered(e.to_string()))
                } else {
                    Err(StoreError::Unavailable(e.to_string()))
                }
            }
        }
    }

    /// Puts a new connection in place of connection `number`, unless it
    /// was already replaced (by another call that failed on it), or the
    /// last replacement is less than a second old.
    fn replace(&self, number: u64, why: &'static str) {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms().max(1);
        let last = self.replaced_ms.load(Ordering::Relaxed);
        let paced = last != 0 && now < last + REPLACED_AT_MOST_EVERY.as_millis() as u64;
        if current.number != number || paced {
            return;
        }
        match Connection::lazy(&self.client, &self.config, number + 1, now) {
            Ok(next) => {
                *current = Arc::new(next);
                self.replaced_ms.store(now, Ordering::Relaxed);
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

/// Whether the connection went while the call may have been on it (a
/// primary that crashed mid-script, a reset on the way): Redis may have
/// run it and only its answer be lost, as after a timeout. redis-rs says
/// the same of a call made on a connection already gone (a broken pipe):
/// taken as maybe done too, which costs the caller only the check it
/// makes after a late answer. A refused connection ran nothing.
fn answer_lost(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() && !e.is_connection_refusal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_went_mid_call_may_have_run_it() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::BrokenPipe,
            ErrorKind::ConnectionReset,
            ErrorKind::ConnectionAborted,
            ErrorKind::UnexpectedEof,
        ] {
            assert!(answer_lost(&Error::from(kind).into()), "{kind:?}");
        }
        assert!(!answer_lost(
            &Error::from(ErrorKind::ConnectionRefused).into()
        ));
        let refused: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "Error running script",
        )
            .into();
        assert!(!answer_lost(&refused));
    }

    #[test]
    fn a_read_only_refusal_is_known_inside_a_scripts_error_too() {
        let plain: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "You can't write against a read only replica.",
        )
            .into();
        assert!(read_only(&plain));
        // Redis 6.2: a write refused inside a script comes back as ERR.
        let scripted: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "Error running script",
            "(call to f_0123): @user_script:2: -READONLY You can't write against a read only replica.".to_string(),
        )
            .into();
        assert!(read_only(&scripted), "{scripted}");
        let other: redis::RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "Error running script",
        )
            .into();
        assert!(!read_only(&other));
        // Not one room's trouble: the connection must still be replaced.
        assert!(!about_the_request(&plain));
        assert!(!about_the_request(&scripted), "{scripted}");
    }

    /// What one room's state makes Redis answer is that room's; what says
    /// the server cannot serve now is everyone's, in a script's error too.
    #[test]
    fn a_rooms_own_error_is_told_from_the_servers() {
        let script = |detail: &str| -> redis::RedisError {
            (
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "Error running script",
                format!("(call to f_0123): @user_script:9: {detail}"),
            )
                .into()
        };
        let wrong_type = redis::make_extension_error(
            "WRONGTYPE".into(),
            Some("Operation against a key holding the wrong kind of value".into()),
        );
        assert!(about_the_request(&wrong_type));
        assert!(about_the_request(&script(
            "-WRONGTYPE Operation against a key"
        )));
        assert!(about_the_request(&script(
            "attempt to compare nil with number"
        )));
        let oom = redis::make_extension_error("OOM".into(), Some("command not allowed".into()));
        assert!(!about_the_request(&oom));
        assert!(!about_the_request(&script(
            "-OOM command not allowed when used memory > 'maxmemory'."
        )));
        assert!(!about_the_request(&script(
            "-MISCONF Redis is configured to save RDB snapshots"
        )));
        let io: redis::RedisError = std::io::Error::other("connection reset").into();
        assert!(!about_the_request(&io));
    }
}
