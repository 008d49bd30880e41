//! Lanes: a room's rate split by weight between FIFO lines chosen by a
//! secret header, a signed header or an address range, under one shared
//! `max_active`; single node and cluster (real Redis).

mod common;

use common::client::metric;
use common::gated::{Citizen, Gated};
use common::redis::RedisServer;
use common::upstream;

const SECRET: &str = "intermediaries-only-0123456789";
/// Everyone queued, 60 a minute, called tickets kept long enough to count.
const SIXTY_A_MINUTE: &str =
    "admission_per_minute = 60\nmax_active = 1000\nmode = \"queue_all\"\nclaim_window = \"10m\"";

fn lanes_room(up: std::net::SocketAddr, room: &str, signed: bool) -> String {
    std::env::set_var("VARCO_TEST_LANE_SECRET", SECRET);
    format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{up}\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n{room}\n\
         [rooms.portal.lanes.citizens]\nweight = 0.8\n\
         [rooms.portal.lanes.intermediaries]\nweight = 0.2\nheader = \"X-Intermediary\"\n\
         secret_env = \"VARCO_TEST_LANE_SECRET\"\nsigned = {signed}\n"
    )
}

fn intermediary(addr: std::net::SocketAddr, value: &str) -> Citizen {
    let mut c = Citizen::new(addr);
    c.headers.push(("x-intermediary".into(), value.into()));
    c
}

/// How many of `people` have been called, and whether exactly the first
/// ones (in arrival order) were.
async fn called(people: &mut [Citizen]) -> (usize, bool) {
    let mut states = Vec::new();
    for p in people.iter_mut() {
        states.push(p.status("portal").await["state"] == "admitted");
    }
    let n = states.iter().filter(|s| **s).count();
    let fifo = states.iter().take(n).all(|s| *s);
    (n, fifo)
}

#[tokio::test]
async fn the_rate_is_split_by_weight_and_each_lane_is_fifo() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(up.addr, SIXTY_A_MINUTE, false)).await;
    let mut citizens: Vec<Citizen> = (0..80).map(|_| g.citizen()).collect();
    let mut brokers: Vec<Citizen> = (0..40).map(|_| intermediary(g.addr, SECRET)).collect();
    for i in 0..80 {
        assert!(citizens[i].get("/").await.is_waiting_page());
        if i % 2 == 0 {
            assert!(brokers[i / 2].get("/").await.is_waiting_page());
        }
    }
    // Each lane counts its own places.
    let s = brokers[39].status("portal").await;
    assert_eq!(s["position"], 40, "{s}");
    assert!(s["receipt"]
        .as_str()
        .unwrap()
        .starts_with("portal#intermediaries-40-"));
    let s = citizens[79].status("portal").await;
    assert_eq!(s["position"], 80, "{s}");
    // A wrong secret is just a citizen.
    let mut pretender = intermediary(g.addr, "intermediaries-only-guess-000000");
    pretender.get("/").await;
    assert_eq!(pretender.status("portal").await["position"], 81);

    for _ in 0..60 {
        g.advance(1000).await;
    }
    let (c, c_fifo) = called(&mut citizens).await;
    let (b, b_fifo) = called(&mut brokers).await;
    assert!(c_fifo && b_fifo, "each lane in arrival order");
    assert!((46..=50).contains(&c), "citizens called in a minute: {c}");
    assert!(
        (10..=14).contains(&b),
        "intermediaries called in a minute: {b}"
    );
    let labels = "lane=\"intermediaries\",room=\"portal\"";
    assert_eq!(
        metric(g.admin, "varco_lane_admission_rate_per_minute", labels).await,
        Some(12.0)
    );
    assert_eq!(
        metric(g.admin, "varco_lane_queue_length", labels).await,
        Some((40 - b) as f64)
    );
    // The room's own series add the lanes up.
    assert_eq!(
        metric(g.admin, "varco_room_queue_length", "room=\"portal\"").await,
        Some((120 + 1 - c - b) as f64)
    );
    let api = common::client::get(&format!("http://{}/metrics", g.admin)).await;
    assert!(api.text().contains("varco_lane_admitted_total"));
    // Called, the intermediary reaches the portal without its lane's
    // secret: that stays with varco, out of the portal's logs.
    let got = brokers[0].get("/").await;
    assert!(got.reached_upstream());
    let seen: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert!(seen["headers"].get("x-intermediary").is_none(), "{seen}");
}

/// A lane whose tick empties its line does not hand the time it was paid
/// for to the lanes ticking after it: with a citizen coming every two
/// seconds and a long line of intermediaries, the room calls its 60 a
/// minute, not the citizens' share and then the whole rate again.
#[tokio::test]
async fn a_lane_emptied_by_its_tick_pays_no_time_twice() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(up.addr, SIXTY_A_MINUTE, false)).await;
    let mut brokers: Vec<Citizen> = (0..130).map(|_| intermediary(g.addr, SECRET)).collect();
    for b in brokers.iter_mut() {
        assert!(b.get("/").await.is_waiting_page());
    }
    let mut citizens = Vec::new();
    for t in 1..=120 {
        if t % 2 == 0 {
            let mut c = g.citizen();
            assert!(c.get("/").await.is_waiting_page());
            citizens.push(c);
        }
        g.advance(1000).await;
    }
    let (c, _) = called(&mut citizens).await;
    let (b, _) = called(&mut brokers).await;
    assert!(
        c + b <= 125,
        "two minutes at 60 a minute: {c} citizens and {b} intermediaries called"
    );
    assert!(
        c >= 55,
        "the citizens, within their share, wait no longer: {c}"
    );
}

/// `cfg` with a key shared by every node and its store in `redis`.
fn over_redis(cfg: &str, redis: &RedisServer) -> String {
    std::env::set_var(
        "VARCO_TEST_LANE_KEYS",
        "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
    cfg.replace(
        "[secrets]\nephemeral = true\n",
        &format!(
            "[secrets]\nkey_env = \"VARCO_TEST_LANE_KEYS\"\n[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"lanes:\"\nlease = \"3s\"\n",
            redis.url()
        ),
    )
}

/// In a room that lets people in straight away, a lane with nobody
/// waiting has no share of the rate until its next tick. A citizen who
/// comes between two ticks, and finds no token, costs the lane none of
/// the time before: the room calls its rate, in memory and over Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_woken_between_ticks_is_paid_its_whole_tick() {
    let up = upstream::spawn().await;
    let room = "admission_per_minute = 60\nmax_active = 1000\nclaim_window = \"10m\"";
    let cfg = lanes_room(up.addr, room, false);
    calls_its_rate_with_citizens_between_ticks(&Gated::start(&cfg).await).await;
    let redis = RedisServer::start();
    calls_its_rate_with_citizens_between_ticks(&Gated::start(&over_redis(&cfg, &redis)).await)
        .await;
}

/// 130 intermediaries waiting, then a citizen every two seconds, half
/// way between two ticks: two minutes call 60 a minute.
async fn calls_its_rate_with_citizens_between_ticks(g: &Gated) {
    let mut brokers: Vec<Citizen> = (0..130).map(|_| intermediary(g.addr, SECRET)).collect();
    for b in brokers.iter_mut() {
        b.get("/").await;
    }
    let mut citizens = Vec::new();
    for t in 1..=120 {
        if t % 2 == 0 {
            g.clock.advance_ms(500);
            let mut c = g.citizen();
            c.get("/").await;
            citizens.push(c);
            g.advance(500).await;
        } else {
            g.advance(1000).await;
        }
    }
    let (c, _) = called(&mut citizens).await;
    let (b, _) = called(&mut brokers).await;
    assert!(
        (114..=125).contains(&(c + b)),
        "two minutes at 60 a minute: {c} citizens and {b} intermediaries called"
    );
}

#[tokio::test]
async fn an_empty_lane_gives_its_share_to_the_others() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(up.addr, SIXTY_A_MINUTE, false)).await;
    let mut citizens: Vec<Citizen> = (0..100).map(|_| g.citizen()).collect();
    for c in citizens.iter_mut() {
        c.get("/").await;
    }
    for _ in 0..60 {
        g.advance(1000).await;
    }
    let (c, fifo) = called(&mut citizens).await;
    assert!(fifo);
    assert!((58..=62).contains(&c), "the whole rate: {c}");
}

#[tokio::test]
async fn lanes_share_one_max_active_and_a_signed_header_chooses_one() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(
        up.addr,
        "admission_per_minute = 600\nmax_active = 5\nmode = \"queue_all\"",
        true,
    ))
    .await;
    use jsonwebtoken::{encode, EncodingKey, Header};
    let token = |aud: &str, secret: &str, exp: u64| {
        encode(
            &Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({ "aud": aud, "exp": exp }),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let far = 4_000_000_000;
    let good = token("varco:lane:portal:intermediaries", SECRET, far);
    let mut brokers: Vec<Citizen> = (0..6).map(|_| intermediary(g.addr, &good)).collect();
    for b in brokers.iter_mut() {
        b.get("/").await;
        let r = b.status("portal").await["receipt"].clone();
        assert!(
            r.as_str().unwrap().starts_with("portal#intermediaries-"),
            "{r}"
        );
    }
    // The secret itself, another lane's audience, another key, or an
    // expired token: the default lane.
    let mut citizens: Vec<Citizen> = Vec::new();
    for bad in [
        SECRET.to_string(),
        token("varco:lane:portal:citizens", SECRET, far),
        token(
            "varco:lane:portal:intermediaries",
            "another-secret-0123456789",
            far,
        ),
        token("varco:lane:portal:intermediaries", SECRET, 1_000),
    ] {
        let mut c = intermediary(g.addr, &bad);
        c.get("/").await;
        let r = c.status("portal").await["receipt"].clone();
        assert!(r.as_str().unwrap().starts_with("portal-"), "{bad}: {r}");
        citizens.push(c);
    }
    for _ in 0..6 {
        let mut c = g.citizen();
        c.get("/").await;
        citizens.push(c);
    }
    for _ in 0..5 {
        g.advance(1000).await;
    }
    let (c, _) = called(&mut citizens).await;
    let (b, _) = called(&mut brokers).await;
    // 5 x 0.8 and 5 x 0.2: each lane waiting keeps its share of the cap.
    assert_eq!((c, b), (4, 1), "one cap for all lanes, shared by weight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_hold_across_a_cluster() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = over_redis(&lanes_room(up.addr, SIXTY_A_MINUTE, false), &redis);
    let nodes = [Gated::start(&cfg).await, Gated::start(&cfg).await];
    let mut citizens: Vec<Citizen> = (0..40).map(|i| nodes[i % 2].citizen()).collect();
    let mut brokers: Vec<Citizen> = (0..20)
        .map(|i| intermediary(nodes[i % 2].addr, SECRET))
        .collect();
    for c in citizens.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    for b in brokers.iter_mut() {
        assert!(b.get("/").await.is_waiting_page());
    }
    assert_eq!(brokers[19].status("portal").await["position"], 20);
    for _ in 0..30 {
        for n in &nodes {
            n.clock.advance_ms(1000);
        }
        for n in &nodes {
            n.app.tick().await;
        }
    }
    let (c, c_fifo) = called(&mut citizens).await;
    let (b, b_fifo) = called(&mut brokers).await;
    assert!(c_fifo && b_fifo);
    assert!((22..=26).contains(&c), "citizens: {c}");
    assert!((5..=8).contains(&b), "intermediaries: {b}");
}

#[tokio::test]
async fn lanes_admitting_at_once_never_pass_max_active() {
    let up = upstream::spawn().await;
    // Two lanes of equal weight, direct admission, no rate: only
    // max_active holds the crowd back.
    let toml = lanes_room(up.addr, "max_active = 10", false)
        .replace("weight = 0.8", "weight = 0.5")
        .replace("weight = 0.2", "weight = 0.5");
    let g = Gated::start(&toml).await;
    let admitted = |got: common::client::Got| usize::from(got.reached_upstream());
    let mut early = 0;
    for _ in 0..3 {
        early += admitted(g.citizen().get("/").await);
    }
    assert_eq!(early, 3, "an empty room lets people in");
    g.advance(1000).await;
    // Both lanes at the same moment, before the next tick: each may use
    // only its part of the 7 places left, not all 7.
    let (mut citizens, mut brokers) = (0, 0);
    for _ in 0..10 {
        citizens += admitted(g.citizen().get("/").await);
        brokers += admitted(intermediary(g.addr, SECRET).get("/").await);
    }
    let room = g.app.room("portal").unwrap();
    let active = room.view().active;
    assert!(
        early + citizens + brokers <= 10 && active <= 10,
        "max_active passed: {citizens} citizens and {brokers} intermediaries after {early}, {active} live"
    );
    assert!(brokers >= 3, "the other lane got its part: {brokers}");
    g.advance(1000).await;
    assert!(room.view().active <= 10);
}

/// `people` of one lane, the others empty, come in: over three ticks,
/// until every one of them holds a pass.
async fn fill(g: &Gated, people: &mut [Citizen]) {
    for _ in 0..3 {
        for p in people.iter_mut() {
            p.get("/").await;
        }
        g.advance(1000).await;
    }
    for p in people.iter_mut() {
        assert!(p.get("/").await.reached_upstream());
    }
}

/// A lane with people waiting is kept its weight's share of `max_active`,
/// but only out of places nobody holds: a release by the portal, before
/// the next tick, calls no more than the places free, though the other
/// lane filled the room while this one was empty.
#[tokio::test]
async fn a_release_calls_no_more_than_the_places_free() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(up.addr, "max_active = 10", false)).await;
    let room = g.app.room("portal").unwrap();
    let held = || {
        let v = room.view();
        v.active + v.reserved
    };
    // The citizens' lane is empty: the intermediaries fill 9 places.
    let mut brokers: Vec<Citizen> = (0..9).map(|_| intermediary(g.addr, SECRET)).collect();
    fill(&g, &mut brokers).await;
    let mut first = g.citizen();
    assert!(first.get("/").await.reached_upstream(), "the tenth place");
    let mut waiting: Vec<Citizen> = (0..5).map(|_| g.citizen()).collect();
    for c in waiting.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    g.advance(1000).await;
    assert_eq!(held(), 10);
    // The portal ends the first citizen's session: one place is free.
    assert_eq!(first.get("/release").await.json()["upstream"], "released");
    assert!(held() <= 10, "max_active passed: {} held", held());
    let (n, fifo) = called(&mut waiting).await;
    assert_eq!((n, fifo), (1, true), "the one free place, to the first");
}

/// A lane whose share of `max_active` is under one place (0.2 of 4) is
/// still kept one: the heavier lane ticks first, and once took every
/// place that freed while it had a line, the light lane never called.
#[tokio::test]
async fn a_lane_with_a_share_under_one_place_is_still_called() {
    let up = upstream::spawn().await;
    let g = Gated::start(&lanes_room(up.addr, "max_active = 4", false)).await;
    let mut holders: Vec<Citizen> = (0..4).map(|_| g.citizen()).collect();
    fill(&g, &mut holders).await;
    let mut citizens: Vec<Citizen> = (0..3).map(|_| g.citizen()).collect();
    let mut brokers: Vec<Citizen> = (0..2).map(|_| intermediary(g.addr, SECRET)).collect();
    for c in citizens.iter_mut().chain(brokers.iter_mut()) {
        assert!(c.get("/").await.is_waiting_page());
    }
    g.advance(1000).await;
    assert_eq!(
        called(&mut citizens).await.0 + called(&mut brokers).await.0,
        0
    );
    // Places free one by one, a tick after each: the intermediaries' lane
    // gets the first, the citizens' the next ones.
    for (i, expect) in [(0, (0, 1)), (1, (1, 1)), (2, (2, 1))] {
        assert_eq!(
            holders[i].get("/release").await.json()["upstream"],
            "released"
        );
        g.advance(1000).await;
        let now = (called(&mut citizens).await.0, called(&mut brokers).await.0);
        assert_eq!(
            now,
            expect,
            "after {} places freed (citizens, intermediaries)",
            i + 1
        );
    }
}

/// Lanes kept their shares while another lane holds more than its own
/// (it filled the room while they were empty): the places still free go
/// to them by weight, rather than stand empty until that lane drains.
#[tokio::test]
async fn shares_kept_beyond_the_room_leave_no_place_empty() {
    let up = upstream::spawn().await;
    std::env::set_var("VARCO_TEST_LANE_B", "lane-b-secret-0123456789");
    std::env::set_var("VARCO_TEST_LANE_C", "lane-c-secret-0123456789");
    let toml = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n\
         max_active = 9\nclaim_window = \"10m\"\n\
         [rooms.portal.lanes.a]\nweight = 0.4\n\
         [rooms.portal.lanes.b]\nweight = 0.4\nheader = \"X-B\"\nsecret_env = \"VARCO_TEST_LANE_B\"\n\
         [rooms.portal.lanes.c]\nweight = 0.2\nheader = \"X-C\"\nsecret_env = \"VARCO_TEST_LANE_C\"\n",
        up.addr
    );
    let g = Gated::start(&toml).await;
    let room = g.app.room("portal").unwrap();
    let held = || {
        let v = room.view();
        v.active + v.reserved
    };
    let in_lane = |header: &str, secret: &str| {
        let mut c = Citizen::new(g.addr);
        c.headers.push((header.into(), secret.into()));
        c
    };
    // Lane c alone: it fills 6 places.
    let mut cs: Vec<Citizen> = (0..6)
        .map(|_| in_lane("x-c", "lane-c-secret-0123456789"))
        .collect();
    fill(&g, &mut cs).await;
    // Then a and b, three each: each kept 4 places, 8 with c's 6 for 9.
    let mut others: Vec<Citizen> = Vec::new();
    for _ in 0..3 {
        others.push(g.citizen());
        others.push(in_lane("x-b", "lane-b-secret-0123456789"));
    }
    for c in others.iter_mut() {
        c.get("/").await;
    }
    for _ in 0..3 {
        g.advance(1000).await;
    }
    assert_eq!(held(), 9, "every place in use while people wait");
}

/// A lane's receipt (`portal#intermediaries-1-...`, its `#` sent as `%23`)
/// and a lane's ticket are checked by the admin API against the lane's own
/// line, not the default one.
#[tokio::test]
async fn a_lane_receipt_is_checked_through_the_admin_api() {
    const TOKEN: &str = "lane-admin-token-0123456789";
    std::env::set_var("VARCO_TEST_LANE_ADMIN", format!("anna:{TOKEN}"));
    let up = upstream::spawn().await;
    let cfg = format!(
        "[admin]\ntokens_env = \"VARCO_TEST_LANE_ADMIN\"\n{}",
        lanes_room(up.addr, SIXTY_A_MINUTE, false)
    );
    let g = Gated::start(&cfg).await;
    let mut broker = intermediary(g.addr, SECRET);
    assert!(broker.get("/").await.is_waiting_page());
    let receipt = broker.status("portal").await["receipt"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(receipt.starts_with("portal#intermediaries-1-"), "{receipt}");
    let ticket = broker.cookie("varco_ticket_portal").unwrap().to_string();
    let check = |what: String| async move {
        let req = http::Request::get(format!("http://{}/api/receipts/{what}", g.admin))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(varco::body::empty())
            .unwrap();
        common::client::send(req).await.json()
    };
    for what in [receipt.replace('#', "%23"), ticket] {
        let v = check(what).await;
        assert_eq!(v["genuine"], true, "{v}");
        assert_eq!(v["room"], "portal#intermediaries", "{v}");
        assert_eq!(v["number"], "1", "{v}");
    }
}

/// Writes `with` without its intermediaries' lane to `file` (there for
/// the test's next reload) and reloads: refused, naming the lane.
async fn removing_the_lane_is_refused(g: &Gated, file: &std::path::Path, with: &str) {
    let without = with
        .split("[rooms.portal.lanes.intermediaries]")
        .next()
        .unwrap();
    std::fs::write(file, without).unwrap();
    let refused = g.app.reload().await.expect_err("a lane in use removed");
    assert!(
        refused
            .to_string()
            .contains("rooms.portal.lanes.intermediaries"),
        "{refused}"
    );
}

/// A reload that removes a lane keeps the room's counters going up: they
/// add the lanes up, and a drop would read to Prometheus as a restart
/// (`rate()` and `increase()` counting the whole total again). The lane
/// brought back counts once, not twice.
#[tokio::test]
async fn removing_a_lane_never_moves_the_room_counters_back() {
    let up = upstream::spawn().await;
    let with = lanes_room(up.addr, SIXTY_A_MINUTE, false);
    let (g, file) = Gated::start_written("lane-removed", &with).await;
    let mut brokers: Vec<Citizen> = (0..4).map(|_| intermediary(g.addr, SECRET)).collect();
    let mut citizens: Vec<Citizen> = (0..4).map(|_| g.citizen()).collect();
    for c in brokers.iter_mut().chain(citizens.iter_mut()) {
        assert!(c.get("/").await.is_waiting_page());
    }
    for _ in 0..10 {
        g.advance(1000).await;
    }
    for c in brokers.iter_mut().chain(citizens.iter_mut()) {
        c.get("/").await;
    }
    let room = "room=\"portal\"";
    let counters = || async {
        let mut got = Vec::new();
        for name in [
            "varco_tickets_issued_total",
            "varco_admitted_total",
            "varco_abandoned_total",
        ] {
            got.push(metric(g.admin, name, room).await.expect(name));
        }
        got
    };
    let lane = "lane=\"intermediaries\",room=\"portal\"";
    let in_lane = metric(g.admin, "varco_lane_admitted_total", lane)
        .await
        .unwrap();
    assert!(in_lane >= 1.0, "the lane admitted someone: {in_lane}");

    // Not while it holds people: their passes and tickets name it.
    removing_the_lane_is_refused(&g, &file, &with).await;
    let mut broker = brokers.pop().unwrap();
    assert!(
        broker.get("/").await.reached_upstream(),
        "an intermediary sent back to the line by a reload"
    );
    // Emptied (every session idle past session_idle, every turn past its
    // claim window), it may go.
    for _ in 0..12 {
        g.advance(60_000).await;
    }
    let before = counters().await;
    assert_eq!(before[0], 8.0, "{before:?}");
    g.app.reload().await.expect("reload");
    assert_eq!(counters().await, before, "the removed lane still counts");
    // And across a reload that keeps it removed.
    g.app.reload().await.expect("reload");
    assert_eq!(counters().await, before, "carried on");
    std::fs::write(&file, &with).unwrap();
    g.app.reload().await.expect("reload");
    assert_eq!(counters().await, before, "the lane back counts once");
}

/// Nor while a lane holds people called and not yet in, or a pre-queue:
/// neither is "waiting" (the called have left the line; the pre-queue is
/// no line before the draw), and each one's ticket names the lane. Taken,
/// the reload sent the called to the back of another lane, their turn
/// gone, and the pre-queue with them.
#[tokio::test]
async fn a_lane_with_people_called_or_in_its_prequeue_is_not_removed() {
    let up = upstream::spawn().await;
    let opens = common::gated::T0 + 600_000;
    for prequeue in [false, true] {
        let room = if prequeue {
            format!(
                "{SIXTY_A_MINUTE}\nopens_at = \"{}\"",
                varco::timefmt::rfc3339(opens)
            )
        } else {
            SIXTY_A_MINUTE.to_string()
        };
        let with = lanes_room(up.addr, &room, false);
        let (g, file) = Gated::start_written(&format!("lane-called-{prequeue}"), &with).await;
        let mut broker = intermediary(g.addr, SECRET);
        assert!(broker.get("/").await.is_waiting_page());
        if !prequeue {
            g.advance(1000).await;
            assert_eq!(broker.status("portal").await["state"], "admitted");
        }
        let v = g.app.room("portal").unwrap().lanes[1].store.view();
        assert_eq!((v.active, v.waiting), (0, 0), "{prequeue}: {v:?}");
        removing_the_lane_is_refused(&g, &file, &with).await;
        if prequeue {
            g.clock.set_ms(opens);
            for _ in 0..3 {
                g.advance(1000).await;
            }
        }
        assert!(
            broker.get("/").await.reached_upstream(),
            "{prequeue}: the turn kept"
        );
    }
}

/// An operator's change is what the lanes share from the next request,
/// not from the next tick: `max_active` cut from 100 to 4 during an
/// overload let each lane go on admitting its half of 100 for up to a
/// tick (`store.tick`, up to 5 s).
#[tokio::test]
async fn the_lanes_share_an_operators_change_at_once() {
    lanes_share_an_operators_cap_of_4(false).await;
}

/// An operator's `max_active`, kept by a reload, is what the lanes share
/// at once, not the file's until the next tick: lanes admitting at once
/// after a certificate renewal's reload must not pass the operator's cap.
#[tokio::test]
async fn after_a_reload_the_lanes_share_the_operators_cap() {
    lanes_share_an_operators_cap_of_4(true).await;
}

/// Two lanes of equal weight under `max_active = 100`, cut to 4 by the
/// operator (and a reload after, with `reload`): twenty arrivals at once,
/// before any tick, and no more than 4 let in.
async fn lanes_share_an_operators_cap_of_4(reload: bool) {
    let up = upstream::spawn().await;
    let toml = lanes_room(up.addr, "max_active = 100", false)
        .replace("weight = 0.8", "weight = 0.5")
        .replace("weight = 0.2", "weight = 0.5");
    let (g, _path) = Gated::start_written(&format!("lanes-cap-{reload}"), &toml).await;
    g.app
        .change_live(
            "portal",
            Some(varco::store::LiveChange::MaxActive(Some(4))),
            |_, _| {},
        )
        .await
        .unwrap()
        .2
        .unwrap();
    if reload {
        g.app.reload().await.unwrap();
    }
    let admitted = |got: common::client::Got| usize::from(got.reached_upstream());
    let mut n = 0;
    for _ in 0..10 {
        n += admitted(g.citizen().get("/").await);
        n += admitted(intermediary(g.addr, SECRET).get("/").await);
    }
    assert!(n <= 4, "{n} admitted under the operator's max_active of 4");
    assert!(n >= 2, "each lane its part: {n}");
}
