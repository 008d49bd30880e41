//! A room at run time: its config and its upstreams. Admission state joins
//! it here as the waiting room grows.

use std::time::Duration;

use crate::config::RoomConfig;
use crate::proxy::upstreams::UpstreamPool;

pub struct Room {
    pub name: String,
    pub config: RoomConfig,
    pub upstreams: UpstreamPool,
}

impl Room {
    pub fn new(config: RoomConfig, fail_cooldown: Duration) -> Self {
        Room {
            name: config.name.clone(),
            upstreams: UpstreamPool::new(&config.upstreams, fail_cooldown),
            config,
        }
    }
}
