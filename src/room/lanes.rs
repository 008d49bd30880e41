//! Lanes: a room's admission rate split by weight between separate lines
//! (citizens 0.8, registered intermediaries 0.2), each FIFO with its own
//! counters in the store, all under the room's one `max_active`. A request
//! joins the first lane whose selector it matches (an address range, a
//! header carrying the lane's secret, or a header carrying a token signed
//! with it); everyone else joins the default lane.
//!
//! Each tick gives every lane its share of the rate: weight over the sum
//! of the weights of lanes with someone waiting, so an empty lane's share
//! goes to the others rather than to waste. Capacity is shared the same
//! way: each lane with people waiting is kept its weight's share of
//! `max_active`, and may fill what the other lanes leave unused: in a
//! tick, all of it; between ticks (direct admissions), its weight's part,
//! so that lanes admitting at the same moment never pass `max_active`
//! (on one node: in a cluster each node splits from its own view, a tick
//! old at most, so nodes' shares can overlap by what changed in a tick).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::HeaderMap;
use serde::Deserialize;

use super::admission::Limits;
use crate::config::{Bypass, LaneConfig};
use crate::store::{RoomStore, RoomView};

const UNLIMITED: u64 = u64::MAX;

pub struct Lane {
    /// Empty for a room without lanes.
    pub name: String,
    pub weight: f64,
    /// Who belongs; empty for the default lane.
    selector: Bypass,
    signed: bool,
    pub store: Arc<dyn RoomStore>,
    /// The share of the rate this lane may use now (f64 bits; NaN: all).
    rate: AtomicU64,
    /// The sessions this lane may hold now (u64::MAX: the room's cap).
    max_active: AtomicU64,
}

/// What a signed lane header must hold.
#[derive(Deserialize)]
struct LaneClaims {
    #[allow(dead_code)]
    exp: u64,
}

impl Lane {
    pub fn new(config: Option<&LaneConfig>, store: Arc<dyn RoomStore>) -> Lane {
        Lane {
            name: config.map(|c| c.name.clone()).unwrap_or_default(),
            weight: config.map(|c| c.weight).unwrap_or(1.0),
            selector: config.map(|c| c.selector.clone()).unwrap_or_default(),
            signed: config.is_some_and(|c| c.signed),
            store,
            rate: AtomicU64::new(f64::NAN.to_bits()),
            max_active: AtomicU64::new(UNLIMITED),
        }
    }

    /// The store's name for a lane's counters: the room's own for the
    /// default lane (its places survive turning lanes on), `room#lane`
    /// for the others.
    pub fn store_name(room: &str, lane: &LaneConfig) -> String {
        if lane.is_default() {
            room.to_string()
        } else {
            format!("{room}#{}", lane.name)
        }
    }

    /// The store's names of `room`'s lines: its own (the default lane's)
    /// and `room#lane` for each other lane.
    pub fn store_names(room: &crate::config::RoomConfig) -> Vec<String> {
        std::iter::once(room.name.clone())
            .chain(
                room.lanes
                    .iter()
                    .filter(|l| !l.is_default())
                    .map(|l| Self::store_name(&room.name, l)),
            )
            .collect()
    }

    pub fn is_default(&self) -> bool {
        self.selector.cidrs.is_empty() && self.selector.header.is_none()
    }

    /// Does this request belong here? (Never asked of the default lane.)
    pub fn selects(&self, room: &str, headers: &HeaderMap, ip: Option<IpAddr>) -> bool {
        if ip.is_some_and(|ip| self.selector.cidrs.iter().any(|n| n.contains(&ip))) {
            return true;
        }
        let Some((name, secret)) = &self.selector.header else {
            return false;
        };
        // Any of its fields, as for the bypass: a balancer appends.
        if !self.signed {
            return crate::gate::carries_secret(headers, name, secret);
        }
        let Some(value) = headers.get(name) else {
            return false;
        };
        let Ok(token) = value.to_str() else {
            return false;
        };
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.algorithms = vec![jsonwebtoken::Algorithm::HS256];
        v.set_audience(&[format!("varco:lane:{room}:{}", self.name)]);
        v.set_required_spec_claims(&["exp", "aud"]);
        v.leeway = 5;
        token.len() <= 4096
            && jsonwebtoken::decode::<LaneClaims>(
                token,
                &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
                &v,
            )
            .is_ok()
    }

    /// The room's limits narrowed to this lane's share.
    pub fn limits(&self, room: Limits) -> Limits {
        let rate = f64::from_bits(self.rate.load(Ordering::Relaxed));
        let max = self.max_active.load(Ordering::Relaxed);
        Limits {
            per_minute: if rate.is_nan() {
                room.per_minute
            } else {
                Some(rate)
            },
            max_active: if max == UNLIMITED {
                room.max_active
            } else {
                Some(max)
            },
            ..room
        }
    }
}

/// Sets every lane's share until the next tick from what each holds now,
/// and returns what each lane may hold if it ticked now, in lane order
/// (empty for a room without lanes).
///
/// Between ticks every lane admits on its own (directly, or on a release
/// by the portal), so the capacity nobody holds is split between the
/// lanes by weight: together they can never pass `max_active`. A tick is
/// taken one lane at a time, shares recomputed before each (`ticking`: the
/// lane about to tick), so the lane ticking may take all of it; meanwhile
/// the others admit only into places their own counts already hold, or a
/// direct admission in another lane, at the moment of that tick, took a
/// part the tick was taking too.
///
/// The rate's shares are set before the first lane ticks and between
/// ticks, never between lanes: each lane's tick is paid the time since its
/// last at the share in force, so one recomputed after a lane emptied its
/// line (the others' share grows to the whole rate) paid that same time
/// twice, and the room admitted up to 1.8 times its rate.
pub fn share(lanes: &[Lane], room: &Limits, ticking: Option<usize>) -> Vec<u64> {
    if lanes.len() < 2 {
        return Vec::new();
    }
    let views: Vec<RoomView> = lanes.iter().map(|l| l.store.view()).collect();
    let waiting: f64 = lanes
        .iter()
        .zip(&views)
        .filter(|(_, v)| v.waiting > 0)
        .map(|(l, _)| l.weight)
        .sum();
    let weights: Vec<f64> = lanes.iter().map(|l| l.weight).collect();
    let all: f64 = weights.iter().sum();
    // Under contention each lane with people waiting is kept its weight's
    // share of max_active (`kept`); what a lane leaves unused, the
    // others may fill. Nobody is pre-empted: a lane that filled more while
    // the others were empty keeps its sessions until they end.
    let used: Vec<u64> = views.iter().map(|v| v.active + v.reserved).collect();
    let waiting_weights: Vec<f64> = lanes
        .iter()
        .zip(&views)
        .map(|(l, v)| if v.waiting > 0 { l.weight } else { 0.0 })
        .collect();
    let kept = match room.max_active {
        Some(m) if waiting > 0.0 => kept(m, &waiting_weights),
        _ => vec![0; lanes.len()],
    };
    let mut held: Vec<u64> = used.iter().zip(&kept).map(|(u, k)| *u.max(k)).collect();
    // Shares kept beyond the room (a lane holds more than its own: it
    // filled the room while the others were empty) are kept out of the
    // places free, by weight: kept whole, each lane would count the
    // others' against itself, and places would stand empty while people
    // wait until that lane drains.
    // A lane over its kept share then gets no place back that it frees
    // (capped at its share): those are owed to the lanes short of theirs,
    // or a heavier lane, ticking first and refilling at every release,
    // kept them waiting for as long as it had a line.
    let mut cap = vec![UNLIMITED; lanes.len()];
    if let Some(m) = room.max_active {
        if held.iter().sum::<u64>() > m {
            let free = m.saturating_sub(used.iter().sum());
            let short: Vec<u64> = held.iter().zip(&used).map(|(h, u)| h - u).collect();
            let given = within(free, &short, &weights);
            held = used.iter().zip(given).map(|(u, g)| u + g).collect();
            for ((c, u), k) in cap.iter_mut().zip(&used).zip(&kept) {
                if u > k {
                    *c = *k;
                }
            }
        }
    }
    let held_all: u64 = held.iter().sum();
    let parts = room
        .max_active
        .map(|m| split(m.saturating_sub(held_all), &weights));
    let mut for_tick = Vec::with_capacity(lanes.len());
    for (i, ((lane, v), own)) in lanes.iter().zip(&views).zip(&held).enumerate() {
        // With nobody waiting anywhere, the shares are the weights.
        let of = if waiting > 0.0 { waiting } else { all };
        let rate = match room.per_minute {
            Some(r) if v.waiting > 0 || waiting == 0.0 => r * lane.weight / of,
            Some(_) => 0.0,
            None => f64::NAN,
        };
        if ticking.is_none_or(|t| t == 0) {
            lane.rate.store(rate.to_bits(), Ordering::Relaxed);
        }
        // What the other lanes hold (or are kept) is not this lane's; what
        // nobody holds is this lane's in a tick, its weight's part of it
        // until then. Never more than a tick would give it: while the
        // lanes together hold more than max_active (re-entries may pass
        // it), its own share would still let a release or a direct
        // admission call past it.
        let (now, until_next) = match (room.max_active, &parts) {
            (Some(m), Some(parts)) => {
                let now = m.saturating_sub(held_all - own).min(cap[i]);
                let until_next = match ticking {
                    None => own + parts[i],
                    Some(t) if t == i => now,
                    Some(_) => *own,
                };
                (now, until_next.min(now))
            }
            _ => (UNLIMITED, UNLIMITED),
        };
        lane.max_active.store(until_next, Ordering::Relaxed);
        for_tick.push(now);
    }
    for_tick
}

/// The places of `max_active` kept for each lane with people waiting
/// (weight above 0): its weight's share in whole places, by largest
/// remainder, and at least one while there are places enough. Rounded
/// down alone, a lane whose share is under one place (0.2 of 4) was kept
/// none: the heavier lane ticks first and takes every place that frees,
/// and the light lane waited for as long as the other had a line.
fn kept(max_active: u64, waiting_weights: &[f64]) -> Vec<u64> {
    let mut kept = split(max_active, waiting_weights);
    for i in 0..kept.len() {
        if waiting_weights[i] <= 0.0 || kept[i] > 0 {
            continue;
        }
        // One place from the lane kept the most, while it keeps one.
        let Some(most) = (0..kept.len()).max_by_key(|&j| (kept[j], std::cmp::Reverse(j))) else {
            break;
        };
        if kept[most] < 2 {
            break;
        }
        kept[most] -= 1;
        kept[i] += 1;
    }
    kept
}

/// `free` places split by weight among the lanes `short` of places, none
/// given more than it is short: what one cannot take goes to the others.
fn within(free: u64, short: &[u64], weights: &[f64]) -> Vec<u64> {
    let mut given = vec![0; short.len()];
    let mut left = free;
    while left > 0 {
        let open: Vec<f64> = weights
            .iter()
            .zip(short.iter().zip(&given))
            .map(|(w, (s, g))| if g < s { *w } else { 0.0 })
            .collect();
        if open.iter().all(|w| *w <= 0.0) {
            break;
        }
        let mut gave = 0;
        for (i, part) in split(left, &open).into_iter().enumerate() {
            let g = part.min(short[i] - given[i]);
            given[i] += g;
            gave += g;
        }
        if gave == 0 {
            break;
        }
        left -= gave;
    }
    given
}

/// `free` places split by weight, whole places only, adding up to `free`:
/// each lane its share rounded down, then one more to each of the lanes
/// with the largest remainders (the first of equal ones). One free place
/// goes to the heaviest lane rather than to nobody.
fn split(free: u64, weights: &[f64]) -> Vec<u64> {
    let all: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| free as f64 * w / all).collect();
    let mut parts: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let given: u64 = parts.iter().sum();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in by_remainder
        .iter()
        .take(free.saturating_sub(given) as usize)
    {
        parts[i] += 1;
    }
    // Rounding in the float division must never hand out a place more.
    let mut excess = given.saturating_sub(free);
    for p in parts.iter_mut().rev() {
        let d = excess.min(*p);
        *p -= d;
        excess -= d;
    }
    parts
}

/// A line's counters, as Prometheus reads them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counted {
    /// Numbers handed out (tickets, pre-queue tickets, direct admissions).
    pub issued: u64,
    pub admitted: u64,
    pub abandoned: u64,
}

impl Counted {
    pub fn of(v: &RoomView) -> Counted {
        Counted {
            issued: v.queue.max(v.prequeue),
            admitted: v.admitted_total,
            abandoned: v.abandoned_total,
        }
    }

    pub fn plus(self, o: &Counted) -> Counted {
        Counted {
            issued: self.issued + o.issued,
            admitted: self.admitted + o.admitted,
            abandoned: self.abandoned + o.abandoned,
        }
    }
}

/// The room as a whole: the lanes' counts added up (numbers are per lane,
/// so the counters become how many were handed out and called in all).
pub fn total(lanes: &[Lane]) -> RoomView {
    let mut views = lanes.iter().map(|l| l.store.view());
    let first = views.next().unwrap_or_default();
    let total = views.fold(first, |mut t, v| {
        t.queue += v.queue;
        t.serving += v.serving;
        t.waiting += v.waiting;
        t.active += v.active;
        t.reserved += v.reserved;
        t.prequeue += v.prequeue;
        t.observed_rate += v.observed_rate;
        t.pace += v.pace;
        t.admitted_total += v.admitted_total;
        t.abandoned_total += v.abandoned_total;
        t
    });
    // Numbers are a lane's own: a floor of the room says nothing.
    RoomView { floor: 0, ..total }
}

#[cfg(test)]
mod tests {
    use super::{kept, share, split, within, Lane};
    use crate::room::admission::{Limits, Mode};

    /// A room of ten places, no rate.
    fn ten_places() -> Limits {
        Limits {
            per_minute: None,
            max_active: Some(10),
            claim_window_ms: 60_000,
            tick_ms: 1_000,
            opens_at_ms: None,
            mode: Mode::Queue,
            ticket_ttl_ms: 0,
            session_idle_ms: 300_000,
        }
    }

    /// An unsigned lane's secret counts in any field of its header, as the
    /// bypass's does: a balancer that adds it appends it after the
    /// client's own.
    #[test]
    fn a_lane_secret_appended_after_the_clients_field_selects() {
        let room = ten_places();
        let store = crate::store::memory::MemoryStore::open(None, 0).unwrap();
        let name = http::HeaderName::from_static("x-b");
        let config = crate::config::LaneConfig {
            name: "b".into(),
            weight: 0.5,
            selector: crate::config::Bypass {
                cidrs: vec![],
                header: Some((name.clone(), "lane-b-secret".into())),
            },
            signed: false,
        };
        let lane = Lane::new(Some(&config), store.room("p#b", &room, 0));
        let ip = Some(std::net::IpAddr::from([192, 0, 2, 1]));
        let mut headers = http::HeaderMap::new();
        headers.append(&name, "the-clients-own".parse().unwrap());
        assert!(!lane.selects("p", &headers, ip));
        headers.append(&name, "lane-b-secret".parse().unwrap());
        assert!(lane.selects("p", &headers, ip));
    }

    /// While one lane ticks, the others admit only into what they hold:
    /// their part of the places free is what the tick is taking.
    #[test]
    fn while_one_lane_ticks_the_others_keep_to_what_they_hold() {
        let room = ten_places();
        let store = crate::store::memory::MemoryStore::open(None, 0).unwrap();
        let lanes = [
            Lane::new(None, store.room("a", &room, 0)),
            Lane::new(None, store.room("b", &room, 0)),
        ];
        let caps = |lanes: &[Lane; 2]| lanes.each_ref().map(|l| l.limits(room).max_active);
        assert_eq!(share(&lanes, &room, None), [10, 10]);
        assert_eq!(caps(&lanes), [Some(5), Some(5)], "between ticks: halves");
        share(&lanes, &room, Some(0));
        assert_eq!(
            caps(&lanes),
            [Some(10), Some(0)],
            "a ticks: b holds nothing"
        );
        share(&lanes, &room, Some(1));
        assert_eq!(caps(&lanes), [Some(0), Some(10)]);
    }

    #[test]
    fn every_lane_waiting_is_kept_a_place_while_there_are_enough() {
        assert_eq!(kept(4, &[0.8, 0.2]), [3, 1]);
        assert_eq!(kept(50, &[0.99, 0.01]), [49, 1]);
        assert_eq!(kept(10, &[0.8, 0.0]), [10, 0], "a lane with nobody waiting");
        assert_eq!(kept(3, &[0.9, 0.05, 0.05]), [1, 1, 1]);
        // Fewer places than lanes: what there is, by weight.
        assert_eq!(kept(1, &[0.8, 0.2]), [1, 0]);
        for m in 0..60 {
            for w in [[0.98, 0.01, 0.01], [0.5, 0.0, 0.5], [0.6, 0.3, 0.1]] {
                let k = kept(m, &w);
                assert_eq!(k.iter().sum::<u64>(), m, "{m} {w:?} {k:?}");
                let lanes = w.iter().filter(|w| **w > 0.0).count() as u64;
                if m >= lanes {
                    assert!(
                        k.iter().zip(w).all(|(k, w)| w <= 0.0 || *k > 0),
                        "{m} {w:?} {k:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn places_within_what_each_lane_is_short_go_to_the_others() {
        assert_eq!(within(3, &[4, 4, 0], &[0.4, 0.4, 0.2]), [2, 1, 0]);
        assert_eq!(within(3, &[1, 4, 0], &[0.4, 0.4, 0.2]), [1, 2, 0]);
        assert_eq!(within(10, &[1, 2, 0], &[0.4, 0.4, 0.2]), [1, 2, 0]);
        assert_eq!(within(0, &[4, 4, 0], &[0.4, 0.4, 0.2]), [0, 0, 0]);
        for free in 0..50 {
            let short = [7, 0, 3, 12];
            let given = within(free, &short, &[0.1, 0.5, 0.3, 0.1]);
            let all: u64 = given.iter().sum();
            assert_eq!(all, free.min(22), "{free}: {given:?}");
            assert!(given.iter().zip(short).all(|(g, s)| *g <= s), "{given:?}");
        }
    }

    #[test]
    fn free_places_are_split_whole_and_all_given() {
        assert_eq!(split(1, &[0.8, 0.2]), [1, 0]);
        assert_eq!(split(7, &[0.5, 0.5]), [4, 3]);
        assert_eq!(split(0, &[0.5, 0.5]), [0, 0]);
        assert_eq!(split(10, &[1.0, 1.0, 1.0]), [4, 3, 3]);
        assert_eq!(split(5, &[0.2, 0.8]), [1, 4]);
        for free in 0..200 {
            for weights in [[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [1.0, 3.0, 7.0]] {
                let parts = split(free, &weights);
                assert_eq!(parts.iter().sum::<u64>(), free, "{free} {weights:?}");
                for (p, w) in parts.iter().zip(weights) {
                    let exact = free as f64 * w / weights.iter().sum::<f64>();
                    assert!(
                        (*p as f64 - exact).abs() < 1.0,
                        "{free} {weights:?} {parts:?}"
                    );
                }
            }
        }
    }
}
