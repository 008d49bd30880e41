//! A room at run time: its config and its upstreams. Admission state joins
//! it here as the waiting room grows.

use std::time::Duration;

use crate::config::RoomConfig;
use crate::metrics::{Metrics, RoomMetrics, UpstreamMetrics};
use crate::proxy::upstreams::UpstreamPool;

pub struct Room {
    pub name: String,
    pub config: RoomConfig,
    pub upstreams: UpstreamPool,
    pub metrics: RoomMetrics,
    /// Indexed like `upstreams`.
    pub upstream_metrics: Vec<UpstreamMetrics>,
}

impl Room {
    pub fn new(config: RoomConfig, fail_cooldown: Duration, metrics: &Metrics) -> Self {
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
            config,
        }
    }
}
