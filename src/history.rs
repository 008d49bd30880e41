//! The last hour of each room, sampled on the admission tick, for the
//! operator page's chart (`/api/history`): Prometheus keeps the long
//! record, this is what a screen on the wall needs without one.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::room::Room;

/// One sample every 10 s...
pub const STEP_MS: u64 = 10_000;
/// ...for an hour.
pub const KEEP: usize = 360;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t_ms: u64,
    pub queue_length: u64,
    pub active_sessions: u64,
    /// Admissions a minute actually observed (not the configured rate).
    pub admitted_per_minute: f64,
    /// The admission rate in force; None: unlimited.
    pub rate_per_minute: Option<f64>,
}

#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last_ms: Option<u64>,
    rooms: HashMap<String, VecDeque<Sample>>,
}

impl History {
    /// Takes a sample of every room if a step has passed since the last.
    pub fn sample(&self, rooms: &[std::sync::Arc<Room>], now_ms: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner
            .last_ms
            .is_some_and(|t| (t..t + STEP_MS).contains(&now_ms))
        {
            return;
        }
        // The clock stepped back (NTP, an operator): waiting for it to
        // pass the last sample again would leave the chart still for as
        // long as the step. The samples now in its future go instead.
        if inner.last_ms.is_some_and(|t| now_ms < t) {
            for series in inner.rooms.values_mut() {
                series.retain(|s| s.t_ms < now_ms);
            }
        }
        inner.last_ms = Some(now_ms);
        // A room removed by a reload leaves the chart with it.
        inner
            .rooms
            .retain(|name, _| rooms.iter().any(|r| &r.name == name));
        for room in rooms {
            let v = room.view();
            let series = inner.rooms.entry(room.name.clone()).or_default();
            if series.len() == KEEP {
                series.pop_front();
            }
            series.push_back(Sample {
                t_ms: now_ms,
                queue_length: v.in_line(),
                active_sessions: v.active,
                admitted_per_minute: v.observed_rate * 60.0,
                rate_per_minute: room.per_minute(),
            });
        }
    }

    pub fn series(&self, room: &str) -> Vec<Sample> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .rooms
            .get(room)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// `{"step_seconds": 10, "rooms": {"NAME": [{"t": ms, ...}, ...]}}`
    pub fn to_json(&self) -> Value {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rooms: serde_json::Map<String, Value> = inner
            .rooms
            .iter()
            .map(|(name, series)| {
                let points: Vec<Value> = series
                    .iter()
                    .map(|s| {
                        json!({
                            "t": s.t_ms,
                            "queue_length": s.queue_length,
                            "active_sessions": s.active_sessions,
                            "admitted_per_minute": s.admitted_per_minute,
                            "rate_per_minute": s.rate_per_minute,
                        })
                    })
                    .collect();
                (name.clone(), Value::Array(points))
            })
            .collect();
        json!({ "step_seconds": STEP_MS / 1000, "rooms": rooms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn room() -> std::sync::Arc<Room> {
        let cfg = Config::from_toml(
            "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:1\"]\nadmission_per_minute = 60\n",
            std::path::Path::new("."),
        )
        .unwrap();
        std::sync::Arc::new(Room::standalone(cfg.rooms[0].clone()))
    }

    #[test]
    fn one_sample_a_step_for_an_hour() {
        let h = History::default();
        let rooms = vec![room()];
        h.sample(&rooms, 0);
        h.sample(&rooms, STEP_MS - 1);
        assert_eq!(h.series("portal").len(), 1, "within the step");
        for i in 1..=(KEEP as u64 + 5) {
            h.sample(&rooms, i * STEP_MS);
        }
        let s = h.series("portal");
        assert_eq!(s.len(), KEEP, "an hour, no more");
        assert_eq!(s.last().unwrap().t_ms, (KEEP as u64 + 5) * STEP_MS);
        assert_eq!(s[0].rate_per_minute, Some(60.0));
        // The clock steps back 1.5 steps: sampled at once, the samples
        // after the new time gone.
        let last = (KEEP as u64 + 5) * STEP_MS;
        h.sample(&rooms, last - STEP_MS - STEP_MS / 2);
        let s = h.series("portal");
        assert_eq!(s.len(), KEEP - 1);
        assert_eq!(s.last().unwrap().t_ms, last - STEP_MS - STEP_MS / 2);
        assert_eq!(s[s.len() - 2].t_ms, last - 2 * STEP_MS);
        // A reload without the room drops its series.
        h.sample(&[], (KEEP as u64 + 6) * STEP_MS);
        assert!(h.series("portal").is_empty());
        assert_eq!(h.to_json()["step_seconds"], 10);
    }
}
