//! A room at run time: its config, upstreams, metrics, and the waiting
//! room around them: the store holding its counters ([`admission`]),
//! tickets and passes ([`token`]), the pre-queue draw ([`lottery`]), and
//! the per-address abuse limits.

pub mod admission;
pub mod lottery;
pub mod token;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::RoomConfig;
use crate::metrics::{Metrics, RoomMetrics, UpstreamMetrics};
use crate::page::waiting::Template;
use crate::proxy::upstreams::UpstreamPool;
use crate::store::RoomStore;
use admission::Limits;
use token::Keyring;

/// A room's config as the admission rules read it.
pub fn limits_of(config: &RoomConfig, tick_ms: u64) -> Limits {
    Limits {
        per_minute: config.admission_per_minute,
        max_active: config.max_active,
        claim_window_ms: config.claim_window.as_millis() as u64,
        tick_ms,
        opens_at_ms: config.opens_at_ms,
        mode: config.mode,
    }
}

pub type IpLimiter = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

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
    /// The waiting page: the operator's template or the built-in one.
    pub template: Arc<Template>,
    tick_ms: u64,
}

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
        fail_cooldown: Duration,
        metrics: &Metrics,
        store: Arc<dyn RoomStore>,
        keys: Keyring,
        tick: Duration,
    ) -> Self {
        let upstreams = UpstreamPool::new(&config.upstreams, fail_cooldown);
        let upstream_metrics = upstreams
            .all()
            .iter()
            .map(|u| UpstreamMetrics::new(metrics, &config.name, &u.label))
            .collect();
        Room {
            name: config.name.clone(),
            metrics: RoomMetrics::new(metrics, &config.name),
            upstream_metrics,
            upstreams,
            store,
            keys,
            ticket_cookie: format!("varco_ticket_{}", config.name),
            pass_cookie: format!("varco_pass_{}", config.name),
            ticket_limiter: RateLimiter::keyed(per_minute(config.tickets_per_ip_per_minute)),
            status_limiter: RateLimiter::keyed(per_minute(config.status_per_ip_per_minute)),
            tick_ms: tick.as_millis() as u64,
            template: match &config.page_template {
                Some(text) => Arc::new(Template::compile(text)),
                None => Arc::new(Template::compile(crate::page::waiting::DEFAULT_TEMPLATE)),
            },
            config,
        }
    }

    /// A room with a private memory store and a fresh key: for tests and
    /// benchmarks that need a room outside a running varco.
    pub fn standalone(config: RoomConfig) -> Self {
        let tick = Duration::from_secs(1);
        let store = crate::store::memory::MemoryStore::open(None)
            .expect("no snapshot to read")
            .room(&config.name, &limits_of(&config, 1000), 0);
        Room::new(
            config,
            Duration::from_secs(10),
            &Metrics::new(),
            store,
            Keyring::ephemeral(),
            tick,
        )
    }

    pub fn limits(&self) -> Limits {
        limits_of(&self.config, self.tick_ms)
    }

    pub fn is_gated(&self) -> bool {
        self.config.is_gated()
    }

    /// The seed of this room's pre-queue lottery: secret (derived from a
    /// signing key) and the same on every node.
    pub fn lottery_seed(&self) -> Vec<u8> {
        let kid = match self.store.lottery_key_id() {
            Some(k) => k,
            None => {
                let k = self.keys.signing_key().id.clone();
                self.store.set_lottery_key_id(&k);
                self.store.lottery_key_id().unwrap_or(k)
            }
        };
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
        ring::hmac::sign(&key, label.as_bytes()).as_ref().to_vec()
    }

    /// Drops per-address limiter state that no longer limits anyone, so
    /// the limiters do not grow with the number of addresses ever seen.
    pub fn forget_idle_addresses(&self) {
        self.ticket_limiter.retain_recent();
        self.ticket_limiter.shrink_to_fit();
        self.status_limiter.retain_recent();
        self.status_limiter.shrink_to_fit();
    }
}
