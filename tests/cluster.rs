//! Cluster mode: three varco nodes and a real Redis behave as one waiting
//! room: one queue, one cap, one rate, one leader at a time.

mod common;

use common::gated::{advance_all as advance, Citizen, Gated};
use common::redis::RedisServer;
use common::relay::Relay;
use common::upstream;

const KEYS: &str = "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn cluster_config(
    redis: &RedisServer,
    up: std::net::SocketAddr,
    room: &str,
    store: &str,
) -> String {
    cluster_config_at(&redis.url(), up, room, store)
}

/// As `cluster_config`, over the Redis at `url`.
fn cluster_config_at(url: &str, up: std::net::SocketAddr, room: &str, store: &str) -> String {
    std::env::set_var("VARCO_TEST_CLUSTER_KEYS", KEYS);
    format!(
        "[secrets]\nkey_env = \"VARCO_TEST_CLUSTER_KEYS\"\n\
         [store]\nkind = \"redis\"\nurl = \"{url}\"\nprefix = \"t:\"\n{store}\n\
         [rooms.portal]\nupstreams = [\"http://{up}\"]\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n{room}\n"
    )
}

/// A room (`room` besides) that opens ten minutes after the nodes'
/// clock starts, over `redis` with a 3 s lease.
fn opening_later(redis: &RedisServer, up: std::net::SocketAddr, room: &str) -> String {
    let opens = common::gated::T0 + 10 * 60_000;
    let room = format!("{room}\nopens_at = \"{}\"", varco::timefmt::rfc3339(opens));
    cluster_config(redis, up, &room, "lease = \"3s\"")
}

async fn nodes(cfg: &str, n: usize) -> Vec<Gated> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Gated::start(cfg).await);
    }
    v
}

/// `n` nodes over `redis` (with `store` settings) for a room with the
/// keys `room`, and its upstream.
async fn room_over(
    redis: &RedisServer,
    room: &str,
    store: &str,
    n: usize,
) -> (upstream::Upstream, Vec<Gated>) {
    let up = upstream::spawn().await;
    let cfg = cluster_config(redis, up.addr, room, store);
    (up, nodes(&cfg, n).await)
}

/// `n` nodes over `redis` (with `store` settings) for a room of one slot
/// whose sessions lapse after a minute idle, and its upstream.
async fn one_slot(redis: &RedisServer, store: &str, n: usize) -> (upstream::Upstream, Vec<Gated>) {
    room_over(redis, "max_active = 1\nsession_idle = \"1m\"", store, n).await
}

/// Ticks the nodes until `node` says it is ready again (Redis answered),
/// failing after 15 s.
async fn until_recovered(nodes: &[Gated], node: usize) {
    let readyz = format!("http://{}/readyz", nodes[node].admin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        advance(nodes, 1000).await;
        if common::client::get(&readyz).await.text() == "ready\n" {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no recovery");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A Redis on a port of the test's own (so the test can kill it and
/// start another there; with `dir`, one that keeps its data), `n` nodes
/// with a 3 s lease for a room with `room`, their upstream; ticked once.
struct OverRedis {
    redis: RedisServer,
    port: u16,
    up: upstream::Upstream,
    nodes: Vec<Gated>,
}

async fn over_a_redis_to_kill(room: &str, n: usize, dir: Option<&std::path::Path>) -> OverRedis {
    let port = common::dead_addr().port();
    let redis = RedisServer::start_with(port, dir);
    let up = upstream::spawn().await;
    let cfg = cluster_config(&redis, up.addr, room, "lease = \"3s\"");
    let nodes = nodes(&cfg, n).await;
    advance(&nodes, 1000).await;
    OverRedis {
        redis,
        port,
        up,
        nodes,
    }
}

/// An empty folder of this test process, for Redis's data.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("varco-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// admission.lua measures the line's pace as the memory store does: the
/// wait told after the room filled at once is the line's (see
/// tests/operations.rs, `the_wait_is_told_from_the_lines_pace_not_the_rooms_filling`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_is_told_from_the_lines_pace_in_cluster_mode_too() {
    for mode in ["queue", "queue_all"] {
        let redis = RedisServer::start();
        let up = upstream::spawn().await;
        let room = format!("max_active = 4\nadmission_per_minute = 120\nmode = \"{mode}\"");
        let cfg = cluster_config(&redis, up.addr, &room, "lease = \"3s\"");
        let nodes = nodes(&cfg, 1).await;
        let mut last = common::gated::fill_then_move_one_every_ten_seconds(&nodes).await;
        let s = last.status("portal").await;
        assert_eq!(s["position"], 4, "{mode}: {s}");
        assert_eq!(
            s["eta_seconds"], 40,
            "{mode}: four places at one per 10 s {s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_queue_and_one_cap() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 3\nsession_idle = \"5m\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 3).await;
    advance(&nodes, 1000).await;
    let mut people: Vec<Citizen> = (0..9).map(|i| nodes[i % 3].citizen()).collect();
    for (i, c) in people.iter_mut().enumerate() {
        let got = c.get("/").await;
        assert_eq!(
            got.reached_upstream(),
            i < 3,
            "citizen {i} via node {}",
            i % 3
        );
    }
    assert_eq!(up.hits(), 3, "the cap holds across nodes");
    // Places are global: the sixth arrival is third in line on any node.
    for (i, c) in people.iter_mut().enumerate().skip(3) {
        assert_eq!(c.status("portal").await["position"], (i - 2) as u64);
    }
    // A pass made on one node works on another.
    let mut moved = Citizen::new(nodes[1].addr);
    moved.jar = people[0].jar.clone();
    assert!(moved.get("/again").await.reached_upstream());

    // Sessions end (5 min after their last request); the next three are
    // called, in order, on any node.
    advance(&nodes, 5 * 60_000 + 5_000).await;
    advance(&nodes, 1000).await;
    for (i, c) in people.iter_mut().enumerate().skip(3) {
        let mut elsewhere = Citizen::new(nodes[(i + 1) % 3].addr);
        elsewhere.jar = c.jar.clone();
        let s = elsewhere.status("portal").await;
        let expect = if i < 6 { "admitted" } else { "waiting" };
        assert_eq!(s["state"], expect, "citizen {i}: {s}");
    }
    for (i, c) in people.iter_mut().enumerate().skip(3).take(3) {
        let mut elsewhere = Citizen::new(nodes[(i + 2) % 3].addr);
        elsewhere.jar = c.jar.clone();
        assert!(
            elsewhere.get("/").await.reached_upstream(),
            "citizen {i} claims on another node"
        );
    }
    assert_eq!(up.hits(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_holds_across_nodes() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 60\nmode = \"queue_all\"\nclaim_window = \"5m\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 3).await;
    let mut people: Vec<Citizen> = (0..150).map(|i| nodes[i % 3].citizen()).collect();
    for c in people.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    for _ in 0..60 {
        advance(&nodes, 1000).await;
    }
    let view = nodes[2].app.room("portal").unwrap().store.view();
    assert!(
        (59..=61).contains(&view.serving),
        "a minute at 60/min across 3 nodes called {}",
        view.serving
    );
    // Counted at the upstream: everyone tries once, on another node than
    // the one that gave the ticket; only those called get through.
    for (i, c) in people.iter().enumerate() {
        let mut elsewhere = Citizen::new(nodes[(i + 1) % 3].addr);
        elsewhere.jar = c.jar.clone();
        elsewhere.get("/").await;
    }
    assert!(
        (59..=61).contains(&up.hits()),
        "{} new sessions reached the upstream in a minute at 60/min",
        up.hits()
    );
    let leaders = nodes
        .iter()
        .filter(|g| g.app.room("portal").unwrap().store.leads())
        .count();
    assert_eq!(leaders, 1, "exactly one node advances the counters");
    let mut exported = Vec::new();
    for g in &nodes {
        let leads = common::client::metric(g.admin, "varco_room_leader", "room=\"portal\"").await;
        exported.push(leads.expect("exported by every node"));
    }
    assert_eq!(
        exported.iter().sum::<f64>(),
        1.0,
        "varco_room_leader names that node: {exported:?}"
    );
}

/// A leader cut off from Redis cannot renew its lease, which another node
/// takes once it lapses: it no longer says it leads (`varco_room_leader`)
/// once the lease would have lapsed, or two nodes would say so, and the
/// floor alert fire on the one whose rate is not in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_redis_stops_saying_it_leads() {
    let mut redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 60",
        // A lease that lapses in real time, still two ticks long.
        "lease = \"300ms\"\ntick = \"100ms\"",
    );
    let nodes = nodes(&cfg, 2).await;
    advance(&nodes, 1000).await;
    let leader = nodes
        .iter()
        .position(|g| g.app.room("portal").unwrap().store.leads())
        .expect("a leader");
    let says = async |g: &Gated| {
        common::client::metric(g.admin, "varco_room_leader", "room=\"portal\"").await
    };
    assert_eq!(says(&nodes[leader]).await, Some(1.0));
    redis.kill();
    advance(&nodes, 1000).await;
    common::client::until(
        "the cut-off leader no longer says it leads",
        std::time::Duration::from_secs(5),
        async || says(&nodes[leader]).await == Some(0.0),
    )
    .await;
    assert!(
        nodes[leader].app.room("portal").unwrap().store.leads(),
        "its last word from Redis was the lease: what the metric no longer trusts"
    );
}

/// A session renewed on a node in its last moments, just before the
/// leader's tick drops it as lapsed, is renewed in Redis at once: the
/// node's report at its own next tick would bring it back after its slot
/// went to the next person, and the room would hold max_active + 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_renewed_in_its_last_moment_never_passes_the_cap() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "", 2).await;
    advance(&nodes, 1000).await; // node 0 ticks first: it holds the lease
    let mut holder = nodes[1].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut next = nodes[1].citizen();
    assert!(next.get("/").await.is_waiting_page());
    // 0.3 s before the holder's minute of idle time runs out, a click on
    // node 1; the leader ticks just after the minute, node 1 after it.
    advance(&nodes, 59_000).await;
    let on = |ms: u64| {
        for g in &nodes {
            g.clock.advance_ms(ms);
        }
    };
    on(700);
    assert!(holder.get("/").await.reached_upstream(), "still in");
    on(400);
    nodes[0].app.tick().await;
    nodes[1].app.tick().await;
    nodes[0].app.tick().await;
    assert_eq!(
        next.status("portal").await["state"],
        "waiting",
        "the holder's slot is still the holder's"
    );
    let v = nodes[0].app.room("portal").unwrap().store.view();
    assert!(
        v.active + v.reserved <= 1,
        "{} live, {} called",
        v.active,
        v.reserved
    );
}

/// A room whose tick keeps failing (its state in Redis unreadable: here a
/// key of the wrong type) does not stop the rooms after it: the ticks
/// start from another room each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_tick_keeps_failing_does_not_stop_the_others() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = format!(
        "[secrets]\nkey_env = \"VARCO_TEST_CLUSTER_KEYS\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"t:\"\n\
         [rooms.a]\nupstreams = [\"http://{up}\"]\npaths = [\"/a\"]\nmax_active = 1\n\
         [rooms.b]\nupstreams = [\"http://{up}\"]\npaths = [\"/b\"]\nmax_active = 1\n\
         mode = \"queue_all\"\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n",
        redis.url(),
        up = up.addr
    );
    std::env::set_var("VARCO_TEST_CLUSTER_KEYS", KEYS);
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    let mut waiting = nodes[0].citizen();
    assert!(waiting.get("/b").await.is_waiting_page());
    assert!(redis.command("SET t:{a}:state broken").starts_with("+OK"));
    for _ in 0..4 {
        advance(&nodes, 1000).await;
    }
    assert_eq!(
        waiting.status("b").await["state"],
        "admitted",
        "room b was never ticked after room a failed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_moves_when_its_holder_dies_and_places_survive_restarts() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 60\nmode = \"queue_all\"",
        // A lease that lapses in real time, still two ticks long.
        "lease = \"300ms\"\ntick = \"100ms\"",
    );
    let mut nodes = nodes(&cfg, 3).await;
    advance(&nodes, 1000).await;
    let leader = nodes
        .iter()
        .position(|g| g.app.room("portal").unwrap().store.leads())
        .expect("a leader");
    let mut people: Vec<Citizen> = (0..5).map(|i| nodes[i % 3].citizen()).collect();
    for c in people.iter_mut() {
        c.get("/").await;
    }
    let gone = nodes.remove(leader);
    gone.stop().await;
    // The lease lapses in real time; a survivor takes it at its next tick.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        advance(&nodes, 1000).await;
        if nodes
            .iter()
            .any(|g| g.app.room("portal").unwrap().store.leads())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nobody took the lease over"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The nodes tick in turn: when the lease went to a node after the
    // first, the first read the line before the new leader called anyone.
    // One more round of ticks and every node has seen it.
    advance(&nodes, 1000).await;
    let serving = nodes[0].app.room("portal").unwrap().store.view().serving;
    assert!(serving >= 1, "the new leader calls people");

    // Every node restarts: places are where they were.
    let mut before = Vec::new();
    for c in people.iter() {
        let mut survivor = Citizen::new(nodes[0].addr);
        survivor.jar = c.jar.clone();
        let s = survivor.status("portal").await;
        assert!(s["ticket"].is_u64(), "{s}");
        before.push(s["ticket"].clone());
    }
    for g in nodes.drain(..) {
        g.stop().await;
    }
    let nodes = self::nodes(&cfg, 3).await;
    for (i, c) in people.iter().enumerate() {
        let mut again = Citizen::new(nodes[(i + 1) % 3].addr);
        again.jar = c.jar.clone();
        assert_eq!(
            again.status("portal").await["ticket"],
            before[i],
            "ticket {i} kept"
        );
    }
}

/// Provisional tickets handed out before a scheduled opening take no
/// place of the pre-queue's: their block waits for the opening and goes
/// behind the places drawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_before_the_opening_places_its_tickets_behind_the_prequeue() {
    let dir = fresh_dir("redis-open");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_with(port, Some(&dir));
    let up = upstream::spawn().await;
    let cfg = opening_later(
        &redis,
        up.addr,
        "max_active = 100\nadmission_per_minute = 60",
    );
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    let mut early: Vec<Citizen> = (0..5).map(|_| nodes[0].citizen()).collect();
    for c in early.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    redis.kill();
    advance(&nodes, 1000).await;
    let mut during: Vec<Citizen> = (0..3).map(|_| nodes[0].citizen()).collect();
    for c in during.iter_mut() {
        let got = c.get("/").await;
        assert!(got.is_waiting_page(), "{} {}", got.status, got.text());
    }
    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    for c in during.iter_mut() {
        let s = c.status("portal").await;
        assert!(s["ticket"].is_null(), "placed before the opening: {s}");
    }
    advance(&nodes, 10 * 60_000).await; // the opening
    let mut drawn = Vec::new();
    for c in early.iter_mut() {
        drawn.push(
            c.status("portal").await["ticket"]
                .as_u64()
                .expect("a place"),
        );
    }
    let mut behind = Vec::new();
    for c in during.iter_mut() {
        behind.push(
            c.status("portal").await["ticket"]
                .as_u64()
                .expect("a place"),
        );
    }
    drawn.sort();
    assert_eq!(
        drawn,
        vec![1, 2, 3, 4, 5],
        "the pre-queue has the first places"
    );
    assert_eq!(
        behind,
        vec![6, 7, 8],
        "the outage's block behind it, in order"
    );
}

/// A turn called just before Redis went away is still there when it
/// returns, however long that took: nobody could claim it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_called_before_a_long_redis_outage_is_still_there_after() {
    let dir = fresh_dir("redis-gap");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill(
        "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"60s\"",
        2,
        Some(&dir),
    )
    .await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut called = nodes[1].citizen();
    assert!(called.get("/").await.is_waiting_page());
    let mut behind = nodes[1].citizen();
    assert!(behind.get("/").await.is_waiting_page());
    // The holder's session ends; a tick calls the next person.
    advance(&nodes, 61_000).await;
    advance(&nodes, 1000).await;
    assert_eq!(called.status("portal").await["state"], "admitted");

    // Redis is away for five minutes (of the nodes' clock), far longer
    // than the claim window, and comes back with its data.
    redis.kill();
    for _ in 0..5 {
        advance(&nodes, 60_000).await;
    }
    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 1).await;
    let got = called.get("/apply").await;
    assert!(
        got.reached_upstream(),
        "the called turn survived the outage: {}",
        got.status
    );
    assert_eq!(behind.status("portal").await["position"], 1);
    // And the window still closes on a turn nobody takes: once `called`
    // has been idle a minute, `behind` is called and never comes.
    advance(&nodes, 61_000).await;
    advance(&nodes, 1000).await;
    assert_eq!(behind.status("portal").await["state"], "admitted");
    let abandoned = || nodes[0].app.room("portal").unwrap().view().abandoned_total;
    assert_eq!(abandoned(), 0, "no turn lapsed over the outage");
    for _ in 0..62 {
        advance(&nodes, 1000).await;
    }
    assert_eq!(abandoned(), 1, "a turn nobody took lapsed");
}

/// A node whose clock runs ahead of the ticker's (here by 10 s, ten
/// ticks) must not keep a called turn's claim window open: the turn lapses
/// on the ticker's clock, and the next person is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_runs_ahead_does_not_hold_turns_open() {
    let redis = RedisServer::start();
    let room = "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"15s\"";
    let (_up, nodes) = room_over(&redis, room, "", 2).await;
    advance(&nodes, 1000).await; // node 0 ticks first: it holds the lease
    nodes[1].clock.advance_ms(10_000);
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut leaver = nodes[1].citizen();
    assert!(leaver.get("/").await.is_waiting_page());
    let mut next = nodes[1].citizen();
    assert!(next.get("/").await.is_waiting_page());
    // The holder's session ends (its idle time counted from when the
    // ahead clock first spoke: sessions are shifted once by the gap it
    // seems to open, at most the skew); the leaver is called and never
    // comes.
    for _ in 0..72 {
        advance(&nodes, 1000).await;
    }
    assert_eq!(leaver.status("portal").await["state"], "admitted");
    let abandoned = || nodes[0].app.room("portal").unwrap().view().abandoned_total;
    // 15 s of window, and a tick more.
    for _ in 0..30 {
        advance(&nodes, 1000).await;
        if abandoned() > 0 {
            break;
        }
    }
    assert_eq!(abandoned(), 1, "the leaver's turn lapsed");
    assert_eq!(next.status("portal").await["state"], "admitted");
    // Its node says so too (the floor comes back from Redis).
    assert_eq!(leaver.status("portal").await["state"], "none");
    assert!(next.get("/").await.reached_upstream());
}

/// Sets every node's clock `ms` back: Redis's host's clock stepped back
/// (NTP, a failover to a replica on a host behind), which every node
/// runs on.
fn step_back(nodes: &[Gated], ms: u64) {
    use varco::clock::Clock;
    for g in nodes {
        g.clock.set_ms(g.clock.now_ms() - ms);
    }
}

/// Ticks `nodes` a second at a time until `citizen` is called, at most
/// `seconds` times.
async fn until_called(nodes: &[Gated], citizen: &mut Citizen, seconds: u32) {
    for _ in 0..seconds {
        advance(nodes, 1000).await;
        if citizen.status("portal").await["state"] == "admitted" {
            return;
        }
    }
}

/// After the clock stepped back 50 s (within the minute a token's `nbf`
/// is allowed), a session stamped before the step with 15 s to live
/// lapses 15 s after it, in Redis and on the node that let it in: the
/// next person is called, and the one who left is not let back in beside
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_holds_no_session_longer() {
    let redis = RedisServer::start();
    let room = "max_active = 1\nsession_idle = \"15s\"";
    let (_up, nodes) = room_over(&redis, room, "", 2).await;
    advance(&nodes, 1000).await; // node 0 ticks first: it holds the lease
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut next = nodes[1].citizen();
    assert!(next.get("/").await.is_waiting_page());
    step_back(&nodes, 50_000);
    until_called(&nodes, &mut next, 30).await;
    assert_eq!(
        next.status("portal").await["state"],
        "admitted",
        "the holder's idle time ran from before the step"
    );
    assert!(next.get("/").await.reached_upstream());
    assert!(
        !holder.get("/").await.reached_upstream(),
        "the holder's node took its lapsed pass for live"
    );
}

/// After the clock stepped back 50 s, a turn called before the step
/// lapses one claim window after it, and a room's rate refills from the
/// step: the next person is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_back_holds_no_turn_and_no_token_longer() {
    let redis = RedisServer::start();
    let room = "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"15s\"\n\
                admission_per_minute = 6";
    let (_up, nodes) = room_over(&redis, room, "", 2).await;
    advance(&nodes, 1000).await; // node 0 ticks first: it holds the lease
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut leaver = nodes[1].citizen();
    assert!(leaver.get("/").await.is_waiting_page());
    let mut next = nodes[1].citizen();
    assert!(next.get("/").await.is_waiting_page());
    // The holder's session lapses; the leaver is called, and never comes.
    until_called(&nodes, &mut leaver, 72).await;
    assert_eq!(leaver.status("portal").await["state"], "admitted");
    step_back(&nodes, 50_000);
    // 15 s of window; six a minute refill the token in 9 s.
    until_called(&nodes, &mut next, 30).await;
    assert_eq!(
        next.status("portal").await["state"],
        "admitted",
        "the leaver's turn, or the rate, held past the step"
    );
    assert!(next.get("/").await.reached_upstream());
}

/// With a slow tick, questions asked between two ticks (a status page
/// asking about a session another node made) are not taken for the end of
/// an outage: a session idle past `session_idle` lapses on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_between_slow_ticks_do_not_stretch_sessions() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"15s\"\ntick = \"5s\"", 2).await;
    advance(&nodes, 5000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut asker = Citizen::new(nodes[1].addr);
    asker.jar = holder.jar.clone();
    // 66 s without a request from the holder; each 5.5 s (a tick running
    // a little late), just before the tick, the status asks Redis whether
    // the session lives.
    for _ in 0..12 {
        for g in &nodes {
            g.clock.advance_ms(5500);
        }
        asker.status("portal").await;
        for g in &nodes {
            g.app.tick().await;
        }
    }
    let mut next = nodes[0].citizen();
    let got = next.get("/").await;
    assert!(
        got.reached_upstream(),
        "a session idle for 66 s still held the only slot ({})",
        got.status
    );
}

/// The lease holder dies: the ticks stop until the lease moves, but the
/// other nodes still reach Redis, so that pause is not an outage for
/// sessions: an idle session lapses on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_moving_does_not_stretch_sessions() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"2s\"", 2).await;
    advance(&nodes, 1000).await; // node 0 ticks first: it holds the lease
    let mut holder = nodes[1].citizen();
    assert!(holder.get("/").await.reached_upstream());
    // Node 0 dies. Node 1 goes on for 10 s of its clock, reaching Redis
    // every tick, while the lease still names node 0.
    let survivor = &nodes[1..];
    advance(survivor, 10_000).await;
    // The lease lapses (in Redis's own time); node 1 takes it over.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while redis::cmd("EXISTS")
        .arg("t:{portal}:lease")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap()
        == 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never lapsed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // 61 s after the holder's only request: the session has lapsed.
    advance(survivor, 51_000).await;
    let mut next = nodes[1].citizen();
    let got = next.get("/").await;
    assert!(
        got.reached_upstream(),
        "a session idle for 61 s still held the only slot ({})",
        got.status
    );
}

/// No node gets its tick through (here: nobody ticks), so nobody reports
/// the sessions it serves, though quick questions still reach Redis: when
/// admissions resume, a session used all along still holds its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_questions_do_not_hide_unreported_sessions() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    let mut asker = Citizen::new(nodes[1].addr);
    asker.jar = holder.jar.clone();
    // 80 s without a tick: the holder keeps working through node 0 (which
    // cannot report it), and node 1 keeps asking Redis about the session.
    for _ in 0..16 {
        for g in &nodes {
            g.clock.advance_ms(5000);
        }
        assert!(holder.get("/next").await.reached_upstream());
        asker.status("portal").await;
    }
    let mut newcomer = nodes[1].citizen();
    let got = newcomer.get("/").await;
    assert!(
        got.is_waiting_page(),
        "admitted beside a session in use: max_active exceeded ({})",
        got.status
    );
}

/// Keeps Redis busy for `ms` with one long script, from another thread;
/// returns once it is (a PING goes unanswered for 100 ms). Join the
/// handle for its end.
async fn keep_busy(redis: &RedisServer, ms: u64) -> std::thread::JoinHandle<()> {
    let mut probe = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let url = redis.url();
    let busy = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let spin = format!(
            "local t = redis.call('TIME') local t0 = t[1] * 1e6 + t[2] \
             repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - t0 > {} return 1",
            ms * 1000
        );
        let _: i64 = redis::cmd("EVAL").arg(spin).arg(0).query(&mut c).unwrap();
    });
    let ping = redis::cmd("PING");
    loop {
        let answer = ping.query_async::<String>(&mut probe);
        if tokio::time::timeout(std::time::Duration::from_millis(100), answer)
            .await
            .is_err()
        {
            return busy;
        }
    }
}

/// Redis runs a claim but answers after the node stopped waiting (500 ms):
/// the node asks whether the session it asked for exists and admits the
/// person, who would otherwise find their ticket used on the next try and
/// be sent to the back of the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_comes_too_late_still_admits() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 1).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut waiter = nodes[0].citizen();
    assert!(waiter.get("/").await.is_waiting_page());
    advance(&nodes, 61_000).await;
    advance(&nodes, 1000).await;
    assert_eq!(waiter.status("portal").await["state"], "admitted");

    // Redis is busy for 0.8 s (a long script): the claim waits in line
    // behind it and its answer comes after the node's 500 ms.
    let busy = keep_busy(&redis, 800).await;
    let got = waiter.get("/apply").await;
    busy.join().unwrap();
    assert!(
        got.reached_upstream(),
        "the claim ran but its holder was turned away: {} {}",
        got.status,
        got.text()
    );
    assert!(
        waiter.get("/next").await.reached_upstream(),
        "the pass holds"
    );
}

/// Redis runs a direct admission but answers after the node stopped
/// waiting, and the node, beyond its own share, gives the newcomer a
/// provisional ticket: the session the script made, which nobody holds,
/// is ended at the next tick, not left to hold the only slot for
/// `session_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_admission_answered_too_late_leaves_no_slot_taken() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    // Twice: each node has seen the other (its share of one slot: none).
    advance(&nodes, 1000).await;
    advance(&nodes, 1000).await;
    let busy = keep_busy(&redis, 800).await;
    let got = nodes[0].citizen().get("/").await;
    busy.join().unwrap();
    assert!(got.is_waiting_page(), "{}", got.status);
    // The script, queued behind the busy one, made the session.
    common::client::until(
        "the session made",
        std::time::Duration::from_secs(5),
        async || redis.command("ZCARD t:{portal}:sessions") == ":1",
    )
    .await;
    advance(&nodes, 1000).await;
    assert_eq!(
        redis.command("ZCARD t:{portal}:sessions"),
        ":0",
        "a session nobody holds takes the slot"
    );
}

/// Redis that did not answer one room's tick is not asked for the next
/// rooms' in the same tick: each would wait the store's timeout. Counted
/// by the script calls Redis runs once it is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_waits_once_for_a_store_that_does_not_answer() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let mut cfg = cluster_config(&redis, up.addr, "max_active = 5", "");
    for room in ["b", "c", "d"] {
        cfg += &format!(
            "[rooms.{room}]\nupstreams = [\"http://{}\"]\npaths = [\"/{room}\"]\nmax_active = 5\n",
            up.addr
        );
    }
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    let mut stats = redis.connection();
    let mut calls = || {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut stats)
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse::<u64>().unwrap())
    };
    let before = calls();
    let busy = keep_busy(&redis, 1_500).await;
    advance(&nodes, 1000).await;
    busy.join().unwrap();
    let during = calls() - before;
    assert!(
        during <= 2,
        "{during} script calls for one tick of a store that did not answer"
    );
    // And once it answers, every room ticks again.
    advance(&nodes, 1000).await;
    let after = calls() - before - during;
    assert!(after >= 4, "{during} then {after} script calls");
}

/// A session used through an outage longer than its idle time still
/// counts when Redis returns: its node could not report the activity, so
/// neither the first request Redis answers nor the node's late report may
/// leave the slot free for somebody else.
/// One node over `redis` for a room of one slot; a person called, whose
/// claim Redis (busy for 1.5 s) answers neither in time nor when asked
/// about after: the "try again", with the pass of the claim's session.
async fn a_claim_left_unanswered(redis: &RedisServer) -> (upstream::Upstream, Vec<Gated>, Citizen) {
    let (up, nodes) = one_slot(redis, "lease = \"3s\"", 1).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut waiter = nodes[0].citizen();
    assert!(waiter.get("/").await.is_waiting_page());
    advance(&nodes, 61_000).await;
    advance(&nodes, 1000).await;
    assert_eq!(waiter.status("portal").await["state"], "admitted");

    let busy = keep_busy(redis, 1_500).await;
    let got = waiter.get("/apply").await;
    busy.join().unwrap();
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(
        waiter.cookie("varco_pass_portal").is_some(),
        "the pass of the session the claim made"
    );
    assert!(
        waiter.cookie("varco_ticket_portal").is_some(),
        "the ticket is kept, should the claim not have been made"
    );
    (up, nodes, waiter)
}

/// Redis is busy for longer: neither the claim's answer nor the question
/// after it comes in time. The "try again" brings the pass of the session
/// the claim made, and the next try gets in with it, instead of finding
/// the ticket used and going to the back of the line; the ticket goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_nobody_could_confirm_keeps_its_turn() {
    let redis = RedisServer::start();
    let (_up, nodes, mut waiter) = a_claim_left_unanswered(&redis).await;
    let waits = || common::client::metric(nodes[0].admin, "varco_wait_seconds_count", "");
    let counted = waits().await.unwrap_or(0.0);
    let again = waiter.get("/apply").await;
    assert!(
        again.reached_upstream(),
        "the claim ran but its holder was sent away: {} {}",
        again.status,
        again.text()
    );
    assert_eq!(
        nodes[0].app.room("portal").unwrap().view().admitted_total,
        2,
        "one admission, not a second claim"
    );
    assert!(
        waiter.cookie("varco_ticket_portal").is_none(),
        "the claim is confirmed: its ticket is used"
    );
    assert!(
        waiter.get("/next").await.reached_upstream(),
        "the pass holds"
    );
    assert_eq!(
        waits().await,
        Some(counted + 1.0),
        "its wait is counted, once"
    );
}

/// Such a pass is good only once Redis confirms its session: with Redis
/// gone, it is not taken at its word as a confirmed one would be (the
/// claim may never have been made, and its ticket could claim again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pass_of_an_unconfirmed_claim_is_not_taken_at_its_word() {
    let mut redis = RedisServer::start();
    let (_up, _nodes, mut waiter) = a_claim_left_unanswered(&redis).await;
    redis.kill();
    let again = waiter.get("/apply").await;
    assert_eq!(again.status, 503, "{}", again.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_used_through_a_redis_outage_still_holds_its_slot() {
    let dir = fresh_dir("redis-sessions");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_with(port, Some(&dir));
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;

    // Two minutes without Redis; the holder keeps working through node 0.
    redis.kill();
    for _ in 0..4 {
        advance(&nodes, 30_000).await;
        assert!(holder.get("/next").await.reached_upstream());
    }
    let _redis = RedisServer::start_with(port, Some(&dir));
    // Node 1, which never saw the session, is the first to reach Redis.
    until_recovered(&nodes[1..], 0).await;
    let mut newcomer = nodes[1].citizen();
    let got = newcomer.get("/").await;
    assert!(
        got.is_waiting_page(),
        "admitted beside a live session: max_active exceeded ({})",
        got.status
    );
    // Node 0 reports the activity; the session is alive for every node.
    advance(&nodes, 1000).await;
    let mut elsewhere = Citizen::new(nodes[1].addr);
    elsewhere.jar = holder.jar.clone();
    assert!(elsewhere.get("/next").await.reached_upstream());
    assert_eq!(
        nodes[1].app.room("portal").unwrap().view().active,
        1,
        "one live session, counted once"
    );
    assert!(newcomer.get("/").await.is_waiting_page());
}

/// A session this node holds, asked about in Redis only because it is
/// about to lapse, is still served when Redis does not answer: its pass
/// was signed longer than an idle time ago (a pass is signed again only
/// past half its life), yet it is live here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_about_to_lapse_is_served_through_a_redis_outage() {
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_with(port, None);
    let (_up, nodes) = one_slot(&redis, "", 1).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    // Used at 54 s (the pass, good for two minutes, is not signed again),
    // then idle until 0.3 s before the minute from then runs out.
    advance(&nodes, 54_000).await;
    assert!(holder.get("/next").await.reached_upstream());
    advance(&nodes, 1000).await;
    redis.kill();
    nodes[0].clock.advance_ms(58_700);
    let got = holder.get("/next").await;
    assert!(got.reached_upstream(), "{}", got.status);
}

/// Sessions the portal ends while Redis is away free their slots when it
/// returns: one Redis admitted (whose end could not be sent), and one a
/// node admitted on its own share, ended through the other node (which
/// took the pass at its word): handed over later, it must not come back
/// alive. Before, both held a slot for another `session_idle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_ended_while_redis_is_away_free_their_slots_when_it_returns() {
    let dir = fresh_dir("redis-ended");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 4\nsession_idle = \"5m\"", 2, Some(&dir)).await;
    let mut before = nodes[0].citizen();
    assert!(before.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;

    redis.kill();
    advance(&nodes, 1000).await;
    let mut during = nodes[0].citizen();
    assert!(
        during.get("/").await.reached_upstream(),
        "admitted on node 0's own share"
    );
    let mut moved = Citizen::new(nodes[1].addr);
    moved.jar = during.jar.clone();
    let mut copy = Citizen::new(nodes[0].addr);
    copy.jar = before.jar.clone();
    assert_eq!(before.get("/release").await.status, 200);
    assert_eq!(moved.get("/release").await.status, 200);
    // A copy of a pass this node ended is not taken at its word.
    assert!(!copy.get("/").await.reached_upstream());
    let _redis = RedisServer::start_with(port, Some(&dir));
    // The end reaches Redis before the session it ends is handed over.
    until_recovered(&nodes[1..], 0).await;
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    assert_eq!(
        nodes[0].app.room("portal").unwrap().view().active,
        0,
        "ended sessions still hold slots"
    );
}

/// More ends than one call hands over (200), sent in several when Redis
/// returns: each of their slots is free. (In one call, an outage's worth
/// ran past the store's timeout and was sent again at every tick.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_ended_while_redis_is_away_are_handed_over_in_parts() {
    let dir = fresh_dir("redis-many-ended");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 500\nsession_idle = \"1h\"", 1, Some(&dir)).await;
    // Their cookies only: each citizen's own connection, kept, would pass
    // the connections one address may hold.
    let mut people = Vec::new();
    for _ in 0..250 {
        let mut c = nodes[0].citizen();
        assert!(c.get("/").await.reached_upstream());
        people.push(c.jar.clone());
    }
    advance(&nodes, 1000).await;
    assert_eq!(nodes[0].app.room("portal").unwrap().view().active, 250);
    redis.kill();
    advance(&nodes, 1000).await;
    // At once, a hundred at a time: each waits out the store's timeout.
    for part in people.chunks(100) {
        let releases = part.iter().map(|jar| {
            let mut c = nodes[0].citizen();
            c.jar = jar.clone();
            async move { c.get("/release").await.status }
        });
        for status in futures_util::future::join_all(releases).await {
            assert_eq!(status, 200);
        }
    }
    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    assert_eq!(
        nodes[0].app.room("portal").unwrap().view().active,
        0,
        "ended sessions still hold slots"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pass a node took at its word while Redis was away is kept as seen
/// there: when Redis returns, that node reports the session, so the person
/// carries on even if the node that admitted them (on its own share, in
/// the outage) is gone by then and never handed it over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_taken_at_its_word_is_reported_by_the_node_that_took_it() {
    let OverRedis {
        mut redis,
        port,
        up: _up,
        mut nodes,
    } = over_a_redis_to_kill("max_active = 2\nsession_idle = \"5m\"", 2, None).await;
    redis.kill();
    advance(&nodes, 1000).await;
    let mut admitted = nodes[0].citizen();
    assert!(
        admitted.get("/").await.reached_upstream(),
        "admitted on node 0's own share"
    );
    let mut moved = Citizen::new(nodes[1].addr);
    moved.jar = admitted.jar.clone();
    assert!(moved.get("/form").await.reached_upstream(), "at its word");
    nodes.remove(0).stop().await;

    let _redis = RedisServer::start_on(port);
    until_recovered(&nodes, 0).await;
    // A Redis without the data (a new one): nobody is admitted until the
    // nodes have reported their sessions again (five seconds).
    advance(&nodes, 5000).await;
    // Newcomers take what Redis says is free: one slot, not two.
    let mut newcomers = 0;
    while nodes[0].citizen().get("/").await.reached_upstream() {
        newcomers += 1;
        assert!(newcomers <= 2, "max_active passed");
    }
    assert_eq!(newcomers, 1, "the moved person's session was not counted");
    let got = moved.get("/form").await;
    assert!(
        got.reached_upstream(),
        "sent back to the line mid-flow: {}",
        got.status
    );
}

/// The gate's own "try again" when Redis fails at a turn carries a
/// reference, as the portal's failures do: in its header, on the page and
/// in the log, so a help desk can find what happened to this person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_redis_cannot_confirm_gets_a_try_again_with_a_reference() {
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_on(port);
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 1).await;
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.is_waiting_page());
    assert_eq!(holder.get("/release").await.status, 200);
    advance(&nodes, 1000).await;
    assert_eq!(next.status("portal").await["state"], "admitted");

    let errors = async || {
        common::client::metric(
            nodes[0].admin,
            "varco_store_errors_total",
            "room=\"portal\"",
        )
        .await
    };
    assert_eq!(errors().await, Some(0.0), "there before the first");
    redis.kill();
    let got = next.get("/").await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(errors().await, Some(1.0), "the gate's failure is counted");
    assert_eq!(
        got.headers["refresh"], "10",
        "a browser asks again by itself"
    );
    let reference = got.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(reference.len(), 32, "{reference}");
    assert!(
        got.text().contains(&format!("<code>{reference}</code>")),
        "the page names the same reference: {}",
        got.text()
    );
    let api = next.get_json("/").await;
    assert_eq!(api.status, 503);
    assert!(
        api.headers.get("refresh").is_none(),
        "a program reads Retry-After"
    );
    assert_eq!(
        api.json()["request_id"].as_str(),
        api.headers["x-request-id"].to_str().ok(),
        "the JSON names it too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_fails_nodes_degrade_without_opening_the_gates_and_recover() {
    let dir = fresh_dir("redis");
    let OverRedis {
        mut redis,
        port,
        up,
        nodes,
    } = over_a_redis_to_kill("max_active = 2\nsession_idle = \"5m\"", 2, Some(&dir)).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut other = nodes[1].citizen();
    assert!(other.get("/").await.reached_upstream());
    let mut waiting = nodes[1].citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    let readyz = |g: &Gated| format!("http://{}/readyz", g.admin);
    advance(&nodes, 1000).await; // every node has seen the counters

    redis.kill();
    advance(&nodes, 1000).await;
    let r = common::client::get(&readyz(&nodes[0])).await;
    assert_eq!(r.status, 200, "degraded is still ready");
    assert!(r.text().starts_with("degraded:"), "{}", r.text());
    // Admitted people carry on; nobody new gets in (people were waiting),
    // but newcomers get provisional tickets, in their order.
    assert!(holder.get("/next").await.reached_upstream());
    // ...on a node that never saw their session too (their phone changed
    // network, the balancer sent them elsewhere): the pass at its word.
    let mut moved = Citizen::new(nodes[1].addr);
    moved.jar = holder.jar.clone();
    let got = moved.get("/next").await;
    assert!(got.reached_upstream(), "{}: {}", got.status, got.text());
    // Someone already in line reloads: the counters in hand say where
    // they stand, with no store to ask.
    let again = waiting.get("/").await;
    assert!(again.is_waiting_page(), "{}", again.status);
    assert!(
        again.text().contains("id=\"position\">1<"),
        "place 1 on the page"
    );
    let hits = up.hits();
    let mut late: Vec<Citizen> = (0..3).map(|_| nodes[0].citizen()).collect();
    for c in late.iter_mut() {
        let got = c.get("/").await;
        assert!(!got.reached_upstream());
        assert!(got.is_waiting_page(), "{}", got.status);
        assert!(got.headers.contains_key("retry-after"));
        let s = c.status("portal").await;
        assert!(
            s["position"].is_null(),
            "no place yet while Redis is away: {s}"
        );
    }
    assert_eq!(up.hits(), hits, "no admission while the store is down");
    let errors = common::client::metric(
        nodes[0].admin,
        "varco_store_errors_total",
        "room=\"portal\"",
    )
    .await;
    assert!(errors.is_some_and(|e| e >= 1.0), "{errors:?}");

    // Redis returns (with its data); the nodes recover by themselves.
    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 1).await;
    assert_eq!(
        waiting.status("portal").await["position"],
        1,
        "the place in line survived"
    );
    for (i, c) in late.iter().enumerate() {
        let mut elsewhere = Citizen::new(nodes[1].addr);
        elsewhere.jar = c.jar.clone();
        let s = elsewhere.status("portal").await;
        assert_eq!(
            s["position"],
            2 + i as u64,
            "provisional tickets placed in their order: {s}"
        );
    }
    let mut newcomer = nodes[0].citizen();
    assert!(newcomer.get("/").await.is_waiting_page());
    assert_eq!(
        newcomer.status("portal").await["position"],
        5,
        "newcomers queue behind"
    );
}

/// A node over `relay` for a room of one slot, ticked until it is ready,
/// and its upstream; someone is in, so the next comes to wait.
async fn one_slot_over(relay: &Relay) -> (upstream::Upstream, Vec<Gated>) {
    let up = upstream::spawn().await;
    let room = "max_active = 1\nsession_idle = \"1m\"";
    let nodes = nodes(&cluster_config_at(&relay.url(), up.addr, room, ""), 1).await;
    until_recovered(&nodes, 0).await;
    let got = nodes[0].citizen().get("/").await;
    assert!(got.reached_upstream(), "{}: {}", got.status, got.text());
    (up, nodes)
}

/// Ticks `node` until its readiness no longer says "ready" (a tick found
/// Redis away), failing after 15 s.
async fn until_degraded(nodes: &[Gated]) {
    let readyz = format!("http://{}/readyz", nodes[0].admin);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while common::client::get(&readyz).await.text() == "ready\n" {
        assert!(std::time::Instant::now() < deadline, "never degraded");
        advance(nodes, 1000).await;
    }
}

async fn replaced(g: &Gated, reason: &str) -> Option<f64> {
    common::client::metric(
        g.admin,
        "varco_store_connections_replaced_total",
        &format!("reason=\"{reason}\""),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_on_the_way_is_replaced() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let (_up, nodes) = one_slot_over(&relay).await;
    assert_eq!(replaced(&nodes[0], "unanswered").await, Some(0.0));

    // The network forgets the connection: no reset, no answer, ever.
    relay.cut();
    until_degraded(&nodes).await;
    // A new connection gets through.
    until_recovered(&nodes, 0).await;
    assert_eq!(replaced(&nodes[0], "unanswered").await, Some(1.0));
    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.is_waiting_page());
    assert_eq!(
        next.status("portal").await["position"],
        1,
        "Redis placed the newcomer"
    );
}

/// Over a relay to `redis`, one node for a `queue_all` room with `room`:
/// a person arrives while Redis's answers are lost (Redis slower than the
/// node's timeout), and is handed a provisional ticket; Redis, which ran
/// the issue, took number 1 for it, which nobody holds. Then the answers
/// come again, and the node ticks until it hears Redis. The node, and the
/// person, whose ticket was placed after number 1.
async fn an_answer_lost(
    redis: &RedisServer,
    relay: &Relay,
    up: std::net::SocketAddr,
    room: &str,
) -> (Vec<Gated>, Citizen) {
    let room = format!("{room}\nmode = \"queue_all\"");
    let nodes = nodes(&cluster_config_at(&relay.url(), up, &room, ""), 1).await;
    until_recovered(&nodes, 0).await;
    let mut c = redis.connection();
    let mut queue = || -> u64 {
        redis::cmd("HGET")
            .arg("t:{portal}:state")
            .arg("queue")
            .query(&mut c)
            .unwrap()
    };
    assert_eq!(queue(), 0);
    relay.cut_replies();
    let mut lost = nodes[0].citizen();
    assert!(lost.get("/").await.is_waiting_page());
    assert_eq!(queue(), 1, "Redis took a number for it, unanswered");
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    (nodes, lost)
}

/// The number of a ticket whose answer was lost is given back: called, it
/// holds no slot for the claim window, and the next person is called in
/// its stead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_whose_answer_was_lost_holds_no_slot() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let up = upstream::spawn().await;
    let (nodes, mut lost) = an_answer_lost(&redis, &relay, up.addr, "max_active = 2").await;
    // Its holder has its place, the block's: number 2, called.
    assert_eq!(lost.status("portal").await["state"], "admitted");
    let v = nodes[0].app.room("portal").unwrap().store.view();
    assert_eq!((v.serving, v.reserved), (2, 1), "number 1 holds nothing");

    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.is_waiting_page());
    advance(&nodes, 1000).await;
    assert_eq!(next.status("portal").await["state"], "admitted");
    assert!(lost.get("/").await.reached_upstream());
    assert!(next.get("/").await.reached_upstream());
}

/// Nor any of the rate: with one call's worth of it, the number given
/// back is called past and the person behind it called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_whose_answer_was_lost_costs_no_rate() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let up = upstream::spawn().await;
    // One token to start with, and next to none after.
    let room = "admission_per_minute = 0.01";
    let (nodes, mut lost) = an_answer_lost(&redis, &relay, up.addr, room).await;
    assert_eq!(lost.status("portal").await["state"], "admitted");
    let v = nodes[0].app.room("portal").unwrap().store.view();
    assert_eq!((v.serving, v.reserved), (2, 1));
}

/// Giving back a lost answer's number decides nothing about the opening:
/// sent first after Redis lost its data, before a scheduled opening, it
/// opened the room at once, the pre-queue never drawn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_given_back_after_a_data_loss_does_not_open_the_room() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let up = upstream::spawn().await;
    let opens = common::gated::T0 + 10 * 60_000;
    let room = format!("opens_at = \"{}\"", varco::timefmt::rfc3339(opens));
    let nodes = nodes(&cluster_config_at(&relay.url(), up.addr, &room, ""), 1).await;
    until_recovered(&nodes, 0).await;
    relay.cut_replies();
    let mut lost = nodes[0].citizen();
    assert!(lost.get("/").await.is_waiting_page());
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    assert!(!nodes[0].app.room("portal").unwrap().store.view().opened);
    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.is_waiting_page());
    let s = next.status("portal").await;
    assert_eq!(s["prequeue"], true, "a ticket for the draw: {s}");
}

/// As above, the lost number called (by another node) before its node
/// hears from Redis again: given back then, it counts as claimed in its
/// batch, and its slot is free at once rather than after the claim
/// window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_number_called_before_it_is_given_back_frees_its_slot() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let up = upstream::spawn().await;
    let room = "max_active = 2\nmode = \"queue_all\"";
    let nodes = vec![
        Gated::start(&cluster_config(&redis, up.addr, room, "")).await,
        Gated::start(&cluster_config_at(&relay.url(), up.addr, room, "")).await,
    ];
    advance(&nodes, 1000).await;
    assert!(nodes[0].app.room("portal").unwrap().store.leads());

    relay.cut_replies();
    let mut lost = nodes[1].citizen();
    assert!(lost.get("/").await.is_waiting_page());
    // The leader calls number 1, which nobody holds.
    for g in &nodes {
        g.clock.advance_ms(1000);
    }
    nodes[0].app.tick().await;
    let view = || nodes[0].app.room("portal").unwrap().store.view();
    assert_eq!((view().serving, view().reserved), (1, 1));
    until_recovered(&nodes, 1).await;
    advance(&nodes, 1000).await;
    assert_eq!(lost.status("portal").await["state"], "admitted");
    assert_eq!(
        (view().serving, view().reserved),
        (2, 1),
        "number 1 holds nothing"
    );
    assert!(lost.get("/").await.reached_upstream());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_a_node_leaves_the_demoted_redis() {
    let old = RedisServer::start();
    let relay = Relay::to(old.port).await;
    let (_up, nodes) = one_slot_over(&relay).await;

    // A replica takes the data, is promoted, and the old primary is
    // demoted; the address (the relay) now leads to the new one.
    let new = RedisServer::start();
    new.command(&format!("REPLICAOF 127.0.0.1 {}", old.port));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while new.command("EXISTS t:{portal}:state") != ":1" {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never synced"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    new.command("REPLICAOF NO ONE");
    old.command(&format!("REPLICAOF 127.0.0.1 {}", new.port));
    relay.send_to(new.port);

    until_degraded(&nodes).await;
    until_recovered(&nodes, 0).await;
    assert_eq!(replaced(&nodes[0], "read_only").await, Some(1.0));
    let mut next = nodes[0].citizen();
    assert!(
        next.get("/").await.is_waiting_page(),
        "the slot is still held"
    );
    assert_eq!(next.status("portal").await["position"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_its_data_the_nodes_take_its_new_counters_and_tickets() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 1\nsession_idle = \"5m\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 2).await;
    advance(&nodes, 1000).await;
    let mut first = nodes[0].citizen();
    assert!(first.get("/").await.reached_upstream());
    let mut line: Vec<Citizen> = (0..5).map(|i| nodes[i % 2].citizen()).collect();
    for c in line.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    advance(&nodes, 1000).await;
    assert_eq!(line[4].status("portal").await["queue_length"], 5);

    // Each node keeps the highest counters it has seen, so that a late
    // reply cannot move the line back; that must not outlive the state
    // those counters belonged to.
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    // Node 0 hears of the new state first; node 1 has not asked since.
    for g in &nodes {
        g.clock.advance_ms(1000);
    }
    nodes[0].app.tick().await;
    // The new state is empty, but the room is not: the first person's
    // session, on node 0, is not reported to it yet. Nobody is admitted
    // until it is, rather than a second person into a room of one.
    let mut newcomer = nodes[0].citizen();
    assert!(
        newcomer.get("/").await.is_waiting_page(),
        "admitted into a full room: its session was lost with the state"
    );
    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.is_waiting_page());
    let mut elsewhere = Citizen::new(nodes[1].addr);
    elsewhere.jar = next.jar.clone();
    let s = elsewhere.status("portal").await;
    assert_eq!(
        s["state"], "waiting",
        "a ticket of a state node 1 has not heard of yet holds its place there: {s}"
    );
    // Past the hold, the first person's session (reported again) still
    // fills the room.
    advance(&nodes, 6000).await;
    for (i, g) in nodes.iter().enumerate() {
        let mut c = Citizen::new(g.addr);
        c.jar = line[0].jar.clone();
        let s = c.status("portal").await;
        assert_eq!(s["queue_length"], 2, "node {i} follows the new state: {s}");
        // Its number 1 is the newcomer's now.
        assert_eq!(
            s["state"], "none",
            "node {i}: a ticket of the lost state holds no place: {s}"
        );
        c.jar = newcomer.jar.clone();
        let s = c.status("portal").await;
        assert_eq!(s["state"], "waiting", "node {i}: the room is full: {s}");
        assert_eq!(s["position"], 1, "node {i}: {s}");
        c.jar = next.jar.clone();
        let s = c.status("portal").await;
        assert_eq!(s["position"], 2, "node {i}: {s}");
    }
    // The first person's session ends: the newcomer's turn.
    assert_eq!(first.get("/release").await.status, 200);
    advance(&nodes, 1000).await;
    assert!(newcomer.get("/").await.reached_upstream());
}

/// Redis loses its data: the leader's first tick of the new run past the
/// hold for the nodes' sessions admits its first arrivals, and the
/// admission log has them from number 1 (not from where that tick left
/// the new counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_redis_starts_again_is_logged_from_its_first_number() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let dir = fresh_dir("cluster-audit-run");
    let log = dir.join("admissions.log");
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 100\nadmission_per_minute = 600\nmode = \"queue_all\"",
        "lease = \"3s\"",
    ) + &format!("[audit]\nlog = \"{}\"\n", log.display());
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    let join = |n: usize| {
        let g = &nodes[0];
        async move {
            for _ in 0..n {
                assert!(g.citizen().get("/").await.is_waiting_page());
            }
        }
    };
    join(5).await;
    advance(&nodes, 1000).await;
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    join(2).await;
    advance(&nodes, 5000).await;
    nodes[0].app.audit_settled().await;
    let ranges = common::logged_ranges(&log);
    assert_eq!(ranges, [(1, 5), (1, 2)]);
    // The new run's totals begin again at 0: its two are new, and the
    // counter never moves back (a reset to Prometheus, counting again).
    assert_eq!(
        common::client::metric(
            nodes[0].admin,
            "varco_tickets_issued_total",
            "room=\"portal\""
        )
        .await,
        Some(7.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The node that takes the lease over logs from where the room stood
/// before its first tick as leader: that tick's admissions are in its
/// log, and the two logs together leave nobody out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_logs_the_new_leaders_first_admissions() {
    lease_handover_logged("cluster-audit-lease", false).await;
}

/// The same in a room that lets people in straight away: those another
/// node let in after the old leader's last record, while the lease
/// lapsed, are in the new leader's log, though its own view of the
/// counters already counted them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_logs_who_came_in_straight_away_meanwhile() {
    lease_handover_logged("cluster-audit-direct", true).await;
}

/// Two nodes, each with its admission log: three people come to the node
/// that does not lead, and the leader logs them (1 to 3); it stops, three
/// more come to the survivor, which takes the lease over in real time:
/// its log has them (4 to 6). `straight_in`: a room that lets them in at
/// once (else `queue_all`, and a tick calls them).
async fn lease_handover_logged(name: &str, straight_in: bool) {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let dir = fresh_dir(name);
    let log = |i: usize| dir.join(format!("node{i}.log"));
    // Enough a tick of 100 ms to call everyone waiting at once.
    let room = if straight_in {
        "max_active = 100\nadmission_per_minute = 60000"
    } else {
        "max_active = 100\nadmission_per_minute = 60000\nmode = \"queue_all\""
    };
    let mut nodes = Vec::new();
    for i in 0..2 {
        let cfg = cluster_config(
            &redis,
            up.addr,
            room,
            // A lease that lapses in real time, still two ticks long.
            "lease = \"300ms\"\ntick = \"100ms\"",
        ) + &format!("[audit]\nlog = \"{}\"\n", log(i).display());
        nodes.push(Gated::start(&cfg).await);
    }
    let came = |got: common::client::Got| {
        if straight_in {
            got.reached_upstream()
        } else {
            got.is_waiting_page()
        }
    };
    advance(&nodes, 1000).await;
    let leader = nodes
        .iter()
        .position(|g| g.app.room("portal").unwrap().store.leads())
        .expect("a leader");
    let other = 1 - leader;
    for _ in 0..3 {
        assert!(came(nodes[other].citizen().get("/").await));
    }
    advance(&nodes, 1000).await;
    nodes[leader].app.audit_settled().await;
    assert_eq!(common::logged_ranges(&log(leader)), [(1, 3)]);

    let survivor = nodes.remove(other);
    nodes.pop().unwrap().stop().await;
    for _ in 0..3 {
        assert!(came(survivor.citizen().get("/").await));
    }
    // The lease lapses in real time; the survivor takes it at a tick (and
    // in `queue_all` calls the three in that same tick).
    let survivor = [survivor];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !survivor[0].app.room("portal").unwrap().store.leads() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never moved"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        advance(&survivor, 1000).await;
    }
    survivor[0].app.audit_settled().await;
    assert_eq!(common::logged_ranges(&log(other)), [(4, 6)]);
    // One more after the handover: the two logs, merged, leave nobody
    // out (4 to 6 missing would be a gap before 7).
    assert!(came(survivor[0].citizen().get("/").await));
    advance(&survivor, 1000).await;
    survivor[0].app.audit_settled().await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_varco"))
        .args(["audit", "ranges"])
        .args([log(0), log(1)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("portal: 1 to 7 in 3 records"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// In a `queue_all` room over `nodes` (node 0 leading): a ticket taken on
/// node `on` and called on both nodes' views; then Redis loses its data,
/// and node 0 alone hears of it, gives a newcomer the new run's number 1
/// and calls it once the hold for the nodes' sessions (five seconds) is
/// over. The old ticket's holder and the newcomer.
async fn a_run_lost_under_a_called_ticket(
    redis: &RedisServer,
    nodes: &[Gated],
    on: usize,
) -> (Citizen, Citizen) {
    advance(nodes, 1000).await;
    let mut old = nodes[on].citizen();
    assert!(old.get("/").await.is_waiting_page());
    // Called, on both nodes' views (whichever leads ticks first).
    advance(nodes, 1000).await;
    advance(nodes, 1000).await;

    assert_eq!(redis.command("FLUSHALL"), "+OK");
    for g in nodes {
        g.clock.advance_ms(1000);
    }
    nodes[0].app.tick().await;
    let mut newcomer = nodes[0].citizen();
    assert!(newcomer.get("/").await.is_waiting_page());
    for g in nodes {
        g.clock.advance_ms(5000);
    }
    // Number 1 of the new run is called; node 1 has not asked since.
    nodes[0].app.tick().await;
    (old, newcomer)
}

/// A node that has not heard yet that Redis lost its data still sees the
/// old run's counters: a ticket of that run it thinks called goes to
/// claim. Redis, which knows the run, refuses it: its number is a
/// newcomer's in the new run, whose turn it would take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_of_a_lost_run_claims_nobodys_turn_in_the_new_one() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 10\nmode = \"queue_all\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 2).await;
    let (mut old, mut newcomer) = a_run_lost_under_a_called_ticket(&redis, &nodes, 1).await;
    assert_eq!(newcomer.status("portal").await["ticket"], 1);

    let got = old.get("/").await;
    assert!(
        !got.reached_upstream(),
        "the old run's number 1 let in on the new run's turn"
    );
    assert!(got.is_waiting_page(), "{}", got.text());
    let s = old.status("portal").await;
    assert_eq!(s["ticket"], 2, "a new place, behind the newcomer: {s}");
    assert!(
        newcomer.get("/").await.reached_upstream(),
        "the newcomer's turn is still theirs"
    );
    let missed = common::client::metric(
        nodes[1].admin,
        "varco_missed_turns_total",
        "room=\"portal\"",
    )
    .await;
    assert_eq!(missed, Some(0.0), "no turn was missed: there was none");
}

/// The same on a node whose room is closed: a called turn goes on to its
/// claim there, and one of the lost run gets the closed page as anyone
/// new does, not one that shows its old number as a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_of_a_lost_run_gets_the_plain_closed_page() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let open = cluster_config(
        &redis,
        up.addr,
        "max_active = 10\nmode = \"queue_all\"",
        "lease = \"3s\"",
    );
    let closed = open.replace("mode = \"queue_all\"", "mode = \"closed\"");
    // The open node first: it takes the lease and calls the turns.
    let nodes = vec![Gated::start(&open).await, Gated::start(&closed).await];
    let (old, mut newcomer) = a_run_lost_under_a_called_ticket(&redis, &nodes, 0).await;

    let mut there = Citizen::new(nodes[1].addr);
    there.jar = old.jar.clone();
    let got = there.get_json("/").await;
    let j = got.json();
    assert_eq!(j["state"], "closed", "{j}");
    assert!(j["ticket"].is_null(), "the lost run's number shown: {j}");
    assert!(newcomer.get("/").await.reached_upstream());
}

/// Redis comes back without its last writes (a restart from its last
/// save): the same state, its queue counter behind two tickets already
/// handed out. The node that saw them raises it again: a newcomer queues
/// behind them, not on one of their numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_its_last_writes_no_number_is_handed_out_twice() {
    let dir = fresh_dir("redis-saved");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_saved(port, &dir);
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 1).await;
    advance(&nodes, 1000).await;
    assert!(nodes[0].citizen().get("/").await.reached_upstream());
    let mut first = nodes[0].citizen();
    assert!(first.get("/").await.is_waiting_page());
    assert_eq!(redis.command("SAVE"), "+OK");
    let mut lost: Vec<Citizen> = (0..2).map(|_| nodes[0].citizen()).collect();
    for c in lost.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    let mut numbers = vec![first.status("portal").await["ticket"].as_u64().unwrap()];
    for c in lost.iter_mut() {
        numbers.push(c.status("portal").await["ticket"].as_u64().unwrap());
    }
    assert_eq!(numbers, [2, 3, 4]);

    redis.kill();
    let redis = RedisServer::start_saved(port, &dir);
    let mut c = redis.connection();
    let queue: String = redis::cmd("HGET")
        .arg("t:{portal}:state")
        .arg("queue")
        .query(&mut c)
        .unwrap();
    assert_eq!(queue, "2", "Redis is back as of the save");
    until_recovered(&nodes, 0).await;
    let mut newcomer = nodes[0].citizen();
    assert!(newcomer.get("/").await.is_waiting_page());
    let s = newcomer.status("portal").await;
    assert_eq!(s["ticket"], 5, "behind every number handed out: {s}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same before a scheduled opening: the pre-queue counter is raised
/// again, so no pre-queue number is handed out twice and the draw at the
/// opening is over everyone who holds one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_its_last_writes_before_the_opening_no_prequeue_number_repeats() {
    let dir = fresh_dir("redis-saved-pre");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_saved(port, &dir);
    let up = upstream::spawn().await;
    let cfg = opening_later(&redis, up.addr, "max_active = 100");
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    let mut early: Vec<Citizen> = (0..3).map(|_| nodes[0].citizen()).collect();
    assert!(early[0].get("/").await.is_waiting_page());
    assert_eq!(redis.command("SAVE"), "+OK");
    for c in early.iter_mut().skip(1) {
        assert!(c.get("/").await.is_waiting_page());
    }
    assert_eq!(early[2].status("portal").await["ticket"], 3);
    redis.kill();
    let _redis = RedisServer::start_saved(port, &dir);
    until_recovered(&nodes, 0).await;
    let mut newcomer = nodes[0].citizen();
    assert!(newcomer.get("/").await.is_waiting_page());
    let s = newcomer.status("portal").await;
    assert_eq!(s["ticket"], 4, "a pre-queue number nobody holds: {s}");
    advance(&nodes, 10 * 60_000).await;
    let s = newcomer.status("portal").await;
    assert_eq!(s["lottery"]["size"], 4, "drawn over all four: {s}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis comes back from a save taken before the opening (a restart, a
/// failover to a replica behind), after numbers past it were handed out:
/// the first call after it opens the queue again from the pre-queue, and
/// must not hand those numbers out again. (The state hash is set back as
/// such a save has it, on the same connection: the node's next call is
/// then an arrival, as it can be after a real restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_loses_the_opening_no_number_after_it_repeats() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = opening_later(&redis, up.addr, "max_active = 100\nmode = \"queue_all\"");
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    for _ in 0..3 {
        assert!(nodes[0].citizen().get("/").await.is_waiting_page());
    }
    advance(&nodes, 10 * 60_000).await;
    let mut after: Vec<Citizen> = (0..2).map(|_| nodes[0].citizen()).collect();
    for c in after.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    assert_eq!(after[1].status("portal").await["ticket"], 5);
    // As the save before the opening has it: same run, not opened.
    assert_eq!(
        redis.command("HSET t:{portal}:state opened 0 queue 0 serving 0 prequeue 3"),
        ":0"
    );
    let mut newcomer = nodes[0].citizen();
    assert!(newcomer.get("/").await.is_waiting_page());
    let s = newcomer.status("portal").await;
    assert_eq!(s["ticket"], 6, "a number already handed out: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_node_admits_only_its_share_of_what_was_free() {
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 10\nsession_idle = \"5m\"", 2, None).await;
    for g in &nodes {
        assert!(g.citizen().get("/").await.reached_upstream());
    }
    advance(&nodes, 1000).await; // both nodes have seen each other and the counters
    redis.kill();
    advance(&nodes, 1000).await;
    // 8 slots were free when Redis went away; two nodes: 4 each, at most.
    let mut admitted = 0;
    for g in &nodes {
        let mut mine = 0;
        for _ in 0..8 {
            let mut c = g.citizen();
            let got = c.get("/").await;
            if got.reached_upstream() {
                mine += 1;
                assert!(
                    c.get("/again").await.reached_upstream(),
                    "a pass made without Redis works"
                );
            } else {
                // Beyond the share: a provisional ticket, a place in line.
                assert!(got.is_waiting_page(), "{}", got.status);
                assert!(c.cookie("varco_ticket_portal").is_some());
            }
        }
        assert_eq!(mine, 4, "a node's share");
        admitted += mine;
    }
    assert_eq!(admitted + 2, 10, "together within max_active");
    // Redis returns (empty: this one kept no data); the sessions admitted
    // meanwhile are handed over and count against the cap.
    let _redis = RedisServer::start_on(port);
    until_recovered(&nodes, 0).await;
    advance(&nodes, 1000).await;
    let active = nodes[0].app.room("portal").unwrap().store.view().active;
    assert!(
        active >= 8,
        "sessions admitted without Redis were handed over: {active}"
    );
}

/// How many of 8 newcomers `g` lets in while Redis is away.
async fn let_in_on_its_own(g: &Gated) -> usize {
    let mut mine = 0;
    for _ in 0..8 {
        if g.citizen().get("/").await.reached_upstream() {
            mine += 1;
        }
    }
    mine
}

/// A node back first from an outage longer than three leases finds the
/// other nodes' marks gone until they tick again. Should Redis go away
/// again at once, its share of the free slots is still half of them, not
/// all: by its own count, each node back first took the whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_first_from_an_outage_takes_no_more_than_its_share() {
    let dir = fresh_dir("back-first");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 10\nsession_idle = \"1h\"", 2, Some(&dir)).await;
    for g in &nodes {
        assert!(g.citizen().get("/").await.reached_upstream());
    }
    advance(&nodes, 1000).await;
    redis.kill();
    advance(&nodes, 12_000).await;
    let mut redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes[..1], 0).await;
    redis.kill();
    advance(&nodes[..1], 1000).await;
    assert_eq!(
        let_in_on_its_own(&nodes[0]).await,
        4,
        "half of the 8 slots free"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Redis back empty, then gone again before the nodes reported their
/// sessions anew: its counts say nobody is in. A node's share is still
/// of the slots free before the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_taken_just_after_a_data_loss_counts_the_sessions_before_it() {
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 11\nsession_idle = \"1h\"", 2, None).await;
    for g in &nodes {
        assert!(g.citizen().get("/").await.reached_upstream());
    }
    advance(&nodes, 1000).await;
    redis.kill();
    advance(&nodes, 1000).await;
    let mut redis = RedisServer::start_on(port);
    until_recovered(&nodes[..1], 0).await;
    redis.kill();
    advance(&nodes[..1], 1000).await;
    // 9 slots were free: 4 each (not 5 of an empty room's 11).
    assert_eq!(let_in_on_its_own(&nodes[0]).await, 4);
}

/// Without Redis a node admits newcomers on its own share only while
/// nobody waits on a provisional ticket from it: once someone does, a
/// newcomer whose token refilled meanwhile queues behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_newcomer_never_passes_a_provisional_ticket() {
    let OverRedis {
        mut redis,
        up: _up,
        nodes,
        ..
    } = over_a_redis_to_kill("admission_per_minute = 60\nsession_idle = \"5m\"", 1, None).await;
    redis.kill();
    advance(&nodes, 1000).await;
    let g = &nodes[0];
    assert!(
        g.citizen().get("/").await.reached_upstream(),
        "the node's own share: one admission a second"
    );
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page(), "no token left");
    assert!(waiting.cookie("varco_ticket_portal").is_some());
    advance(&nodes, 5000).await; // tokens for five more
    let got = g.citizen().get("/").await;
    assert!(
        got.is_waiting_page(),
        "behind the one waiting: {}",
        got.status
    );
}

/// A block of provisional tickets stays placed in Redis as long as any
/// ticket of it is good, and is forgotten after (Redis and the node's
/// own copy): outages do not make the hash, and the answers that carry
/// it, grow for ever. Redis comes back with its data, so the block is
/// placed in the state its tickets were handed out in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_of_provisional_tickets_is_forgotten_once_they_all_expire() {
    let dir = fresh_dir("redis-blocks");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill(
        "max_active = 1\nsession_idle = \"1h\"\nticket_ttl = \"10m\"",
        1,
        Some(&dir),
    )
    .await;
    let g = &nodes[0];
    assert!(g.citizen().get("/").await.reached_upstream());
    redis.kill();
    advance(&nodes, 1000).await;
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    let claims = waiting.claims("varco_ticket_portal").unwrap();
    let epoch = claims["dg"].as_str().expect("a provisional ticket");
    let epoch = u64::from_str_radix(epoch.split(':').next().unwrap(), 16).unwrap();
    let placed = || {
        g.app.room("portal").unwrap().lanes[0]
            .store
            .provisional_base(epoch)
            .map(|(base, _)| base)
    };

    let redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    let kept = || redis.command("HLEN t:{portal}:provisional");
    assert_eq!(kept(), ":2", "the block, and when to forget it");
    assert_eq!(placed(), Some(1));
    assert_eq!(waiting.status("portal").await["position"], 1);
    advance(&nodes, 9 * 60_000).await;
    assert_eq!(kept(), ":2", "its ticket is still good");
    assert_eq!(waiting.status("portal").await["position"], 1);
    advance(&nodes, 2 * 60_000).await;
    assert_eq!(kept(), ":0");
    assert_eq!(placed(), None);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reload that shortens `ticket_ttl` while Redis is away does not
/// shorten the life of the block placed when it returns: its tickets were
/// signed for the longer time, and their holders keep their place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_outlives_a_reload_that_shortens_ticket_ttl() {
    let dir = fresh_dir("redis-blocks-reload");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_with(port, Some(&dir));
    let up = upstream::spawn().await;
    let file = dir.join("varco.toml");
    let write = |ttl: &str, redis: &RedisServer| {
        let room = format!("max_active = 1\nsession_idle = \"1h\"\nticket_ttl = \"{ttl}\"");
        std::fs::write(
            &file,
            cluster_config(redis, up.addr, &room, "lease = \"3s\""),
        )
        .unwrap();
    };
    write("10m", &redis);
    let nodes = [Gated::start_file(&file).await];
    advance(&nodes, 1000).await;
    let g = &nodes[0];
    assert!(g.citizen().get("/").await.reached_upstream());
    redis.kill();
    advance(&nodes, 1000).await;
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    write("2m", &redis);
    g.app.reload().await.expect("reload");

    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    assert_eq!(waiting.status("portal").await["position"], 1);
    advance(&nodes, 9 * 60_000).await;
    assert_eq!(
        waiting.status("portal").await["position"],
        1,
        "signed for 10m, its place is kept"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A provisional ticket takes the place its block gets in whatever state
/// Redis comes back with: one that lost its data too (a new generation),
/// where a ticket of the old state holds no place, places the block anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisional_ticket_is_placed_in_a_redis_that_came_back_empty() {
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 1\nsession_idle = \"1h\"", 1, None).await;
    let g = &nodes[0];
    assert!(g.citizen().get("/").await.reached_upstream());
    let mut before = g.citizen();
    assert!(before.get("/").await.is_waiting_page());
    redis.kill();
    advance(&nodes, 1000).await;
    let mut during = g.citizen();
    assert!(during.get("/").await.is_waiting_page());
    assert!(
        during.status("portal").await["ticket"].is_null(),
        "not placed yet"
    );

    let _redis = RedisServer::start_on(port);
    until_recovered(&nodes, 0).await;
    let s = during.status("portal").await;
    assert_eq!(s["ticket"], 1, "the first place of the new state: {s}");
    assert_ne!(s["state"], "none", "{s}");
    let s = before.status("portal").await;
    assert_eq!(s["state"], "none", "the old state's number 2: {s}");
}

/// A block placed, and then Redis loses its data again: the block's
/// place went with it, and its tickets count as none (their holders join
/// the new line), rather than waiting for a place that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisional_ticket_whose_placed_block_redis_lost_holds_no_place() {
    let OverRedis {
        mut redis,
        port,
        up: _up,
        nodes,
    } = over_a_redis_to_kill("max_active = 1\nsession_idle = \"1h\"", 1, None).await;
    let g = &nodes[0];
    assert!(g.citizen().get("/").await.reached_upstream());
    redis.kill();
    advance(&nodes, 1000).await;
    let mut during = g.citizen();
    assert!(during.get("/").await.is_waiting_page());
    let redis = RedisServer::start_on(port);
    until_recovered(&nodes, 0).await;
    assert_eq!(during.status("portal").await["ticket"], 1, "placed");

    assert_eq!(redis.command("FLUSHALL"), "+OK");
    advance(&nodes, 1000).await;
    let s = during.status("portal").await;
    assert_eq!(s["state"], "none", "{s}");
    // A newcomer to the new state, which the first person's session
    // fills once the node has reported it again: in line, first.
    assert!(during.get("/").await.is_waiting_page());
    advance(&nodes, 6000).await;
    let s = during.status("portal").await;
    assert_eq!(
        (&s["state"], &s["position"]),
        (&"waiting".into(), &1.into()),
        "{s}"
    );
}

/// And an error Redis answers about one room's state is that room's: every
/// other room is ticked at every tick, whichever room the tick starts
/// from. (Skipped after it, a room would be ticked once in so many ticks,
/// and such gaps look like outages to admission.lua, which then holds
/// every session and called turn open longer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_whose_tick_fails_holds_up_no_other_room_at_any_tick() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let rooms: String = ["a", "b", "c"]
        .iter()
        .map(|r| {
            format!(
                "[rooms.{r}]\nupstreams = [\"http://{}\"]\npaths = [\"/{r}\"]\nmax_active = 1\n",
                up.addr
            )
        })
        .collect();
    let cfg = format!(
        "[secrets]\nkey_env = \"VARCO_TEST_CLUSTER_KEYS\"\n\
         [store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"t:\"\n{rooms}",
        redis.url()
    );
    std::env::set_var("VARCO_TEST_CLUSTER_KEYS", KEYS);
    let nodes = nodes(&cfg, 1).await;
    advance(&nodes, 1000).await;
    assert!(redis.command("SET t:{b}:state broken").starts_with("+OK"));
    let mut c = redis.connection();
    for tick in 0..3 {
        advance(&nodes, 1000).await;
        let now = varco::clock::Clock::now_ms(&nodes[0].clock);
        for room in ["a", "c"] {
            let ticked: u64 = redis::cmd("HGET")
                .arg(format!("t:{{{room}}}:state"))
                .arg("ticked")
                .query(&mut c)
                .unwrap();
            assert_eq!(ticked, now, "room {room} at tick {tick}");
        }
    }

    // The same for the live changes every node follows: room b's
    // unreadable, room c's are followed at every tick.
    assert!(redis.command("SET t:{b}:live broken").starts_with("+OK"));
    let room_c = nodes[0].app.room("c").unwrap();
    for (version, mode) in [(1, "paused"), (2, "queue"), (3, "paused"), (4, "queue")] {
        let _: () = redis::cmd("HSET")
            .arg("t:{c}:live")
            .arg("version")
            .arg(version)
            .arg("mode")
            .arg(mode)
            .query(&mut c)
            .unwrap();
        advance(&nodes, 1000).await;
        assert_eq!(room_c.mode().as_str(), mode, "version {version}");
    }
}

/// A node asking Redis about a session it has not seen (its pass brought
/// to it) renews it, but never shortens what another node reported: here
/// the longer life given to a session used through an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asking_about_a_session_never_shortens_it() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    advance(&nodes, 1000).await;
    let mut p = nodes[0].citizen();
    assert!(p.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    let mut c = redis.connection();
    let key = "t:{portal}:sessions";
    let sessions: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(&mut c)
        .unwrap();
    let [(sid, reported)] = sessions.as_slice() else {
        panic!("one session: {sessions:?}");
    };
    let longer = reported + 3_600_000;
    let _: () = redis::cmd("ZADD")
        .arg(key)
        .arg(longer)
        .arg(sid)
        .query(&mut c)
        .unwrap();
    let mut on_b = nodes[1].citizen();
    on_b.jar = p.jar.clone();
    assert!(on_b.get("/next").await.reached_upstream());
    let now: u64 = redis::cmd("ZSCORE")
        .arg(key)
        .arg(sid)
        .query(&mut c)
        .unwrap();
    assert_eq!(now, longer);
}

/// What Redis loses.
enum Loss {
    /// Everything: a restart with no save.
    Data,
    /// What it wrote since its last save: a restart from it.
    LastWrites,
}

/// A person admitted through one node, reading a long form, and their
/// session then lost in Redis; the form is sent through another node.
/// The node that admitted them reports every session it holds again once
/// it sees the loss, so the form reaches the portal (a POST without a
/// live session never would: a newcomer's body is held back) and the
/// session holds its slot again.
async fn a_form_sent_through_another_node_after(loss: Loss, name: &str) {
    let dir = fresh_dir(name);
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_saved(port, &dir);
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    advance(&nodes, 1000).await;
    assert_eq!(redis.command("SAVE"), "+OK");
    let mut p = nodes[0].citizen();
    assert!(p.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    let _redis = match loss {
        Loss::Data => {
            assert_eq!(redis.command("FLUSHALL"), "+OK");
            redis
        }
        Loss::LastWrites => {
            redis.kill();
            RedisServer::start_saved(port, &dir)
        }
    };
    until_recovered(&nodes, 0).await;
    until_recovered(&nodes, 1).await;
    // One tick sees the loss, the next reports the sessions.
    advance(&nodes, 1000).await;
    let mut on_b = nodes[1].citizen();
    on_b.jar = p.jar.clone();
    let sent = on_b.post_form(&[]).await;
    assert!(sent.reached_upstream(), "{} {}", sent.status, sent.text());
    assert!(
        nodes[1].citizen().get("/").await.is_waiting_page(),
        "the session holds the one slot again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_a_redis_that_lost_its_data() {
    a_form_sent_through_another_node_after(Loss::Data, "lost-data").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_outlives_a_redis_that_lost_its_last_writes() {
    a_form_sent_through_another_node_after(Loss::LastWrites, "lost-writes").await;
}

/// The node that handed out provisional tickets stops during the outage
/// (a restart, a scale-down): their block, in its memory only, will never
/// be placed. Once every node alive has had time to tick since Redis came
/// back, another node counts such a ticket as none: its holder takes a
/// place in the line, instead of waiting, told nothing, until the ticket
/// expires a day later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisional_ticket_of_a_node_gone_in_the_outage_is_not_stranded() {
    let dir = fresh_dir("gone-in-outage");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        mut nodes,
    } = over_a_redis_to_kill("max_active = 1\nsession_idle = \"1h\"", 2, Some(&dir)).await;
    assert!(nodes[0].citizen().get("/").await.reached_upstream());
    redis.kill();
    advance(&nodes, 1000).await;
    let mut p = nodes[0].citizen();
    assert!(p.get("/").await.is_waiting_page());
    nodes.remove(0).stop().await;

    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    let mut at_b = nodes[0].citizen();
    at_b.jar = p.jar.clone();
    let s = at_b.status("portal").await;
    assert_eq!(s["state"], "waiting", "its node may still place it: {s}");
    assert!(s["ticket"].is_null(), "{s}");
    // Three leases (3 s each) and two ticks.
    advance(&nodes, 11_000).await;
    let s = at_b.status("portal").await;
    assert_eq!(s["state"], "none", "{s}");
    assert!(at_b.get("/").await.is_waiting_page());
    let s = at_b.status("portal").await;
    assert_eq!(s["state"], "waiting", "{s}");
    assert_eq!(s["ticket"], 2, "the next place in the line: {s}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A person a node admitted on its own share while Redis was away, that
/// node stopping before it could hand the session over: their next
/// request, through another node once Redis is back, finds no session in
/// Redis. A pass renewed within an idle time cannot have lapsed, so it is
/// taken at its word and reported: the form reaches the portal, and the
/// session counts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_admitted_by_a_node_gone_in_the_outage_carries_on() {
    let dir = fresh_dir("admitted-gone");
    let OverRedis {
        mut redis,
        port,
        up: _up,
        mut nodes,
    } = over_a_redis_to_kill("max_active = 10\nsession_idle = \"1h\"", 2, Some(&dir)).await;
    redis.kill();
    advance(&nodes, 1000).await;
    let mut p = nodes[0].citizen();
    assert!(p.get("/").await.reached_upstream(), "its own share");
    nodes.remove(0).stop().await;

    let redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    let mut at_b = nodes[0].citizen();
    at_b.jar = p.jar.clone();
    let sent = at_b.post_form(&[]).await;
    assert!(sent.reached_upstream(), "{} {}", sent.status, sent.text());
    advance(&nodes, 1000).await;
    assert_eq!(
        redis.command("ZCARD t:{portal}:sessions"),
        ":1",
        "reported, and counted again"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A person whose session lapsed and who queued again carries the old
/// pass beside the ticket (its cookie outlives the session). With Redis
/// away, a node that never saw that pass cannot ask about it; the ticket,
/// taken since the pass was last renewed, says the gate found its session
/// gone: the person waits with their place, on the page and in the
/// status, instead of a "try again" for as long as Redis is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_older_than_its_holders_ticket_waits_out_a_redis_outage_in_line() {
    let OverRedis {
        mut redis,
        up: _up,
        nodes,
        ..
    } = over_a_redis_to_kill("max_active = 1\nsession_idle = \"1m\"", 2, None).await;
    let mut person = nodes[0].citizen();
    assert!(person.get("/").await.reached_upstream());
    advance(&nodes, 61_000).await; // the session idles out
    let mut other = nodes[0].citizen();
    assert!(other.get("/").await.reached_upstream());
    let queued = person.get("/").await;
    assert!(queued.is_waiting_page(), "{}", queued.status);
    assert!(person.cookie("varco_pass_portal").is_some(), "the old pass");
    advance(&nodes, 1000).await; // every node has seen the counters

    redis.kill();
    advance(&nodes, 1000).await;
    let mut moved = Citizen::new(nodes[1].addr);
    moved.jar = person.jar.clone();
    let again = moved.get("/").await;
    assert!(
        again.is_waiting_page(),
        "{}: {}",
        again.status,
        again.text()
    );
    assert!(
        again.text().contains("id=\"position\">1<"),
        "place 1 on the page: {}",
        again.text()
    );
    assert_eq!(moved.status("portal").await["state"], "waiting");
}

/// But a session the portal ended is not taken back: a copy of its pass,
/// recent as it is, brought to a node that never saw it, gets no further.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_ended_pass_is_not_taken_at_its_word() {
    let redis = RedisServer::start();
    let (_up, nodes) = one_slot(&redis, "lease = \"3s\"", 2).await;
    advance(&nodes, 1000).await;
    let mut owner = nodes[0].citizen();
    assert!(owner.get("/").await.reached_upstream());
    let pass = owner.jar.clone();
    assert_eq!(owner.get("/release").await.status, 200);
    let mut copy = nodes[1].citizen();
    copy.jar = pass;
    let sent = copy.post_form(&[]).await;
    assert!(!sent.reached_upstream(), "{} {}", sent.status, sent.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_a_room_over_tls_to_redis_and_refuse_an_untrusted_one() {
    varco::tls::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("varco-redis-tls-{}", std::process::id()));
    let (redis, ca) = RedisServer::start_tls(&dir);
    let up = upstream::spawn().await;
    std::env::set_var("VARCO_TEST_CLUSTER_KEYS", KEYS);
    let cfg = |tls_ca: &str| {
        format!(
            "[secrets]\nkey_env = \"VARCO_TEST_CLUSTER_KEYS\"\n\
             [store]\nkind = \"redis\"\nurl = \"{}\"\n{tls_ca}\n\
             [rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 1\n",
            redis.tls_url(),
            up.addr
        )
    };
    let trusted = cfg(&format!("tls_ca = \"{}\"", ca.display()));
    let nodes = nodes(&trusted, 2).await;
    advance(&nodes, 1000).await;
    assert_eq!(
        common::client::get(&format!("http://{}/readyz", nodes[0].admin))
            .await
            .text(),
        "ready\n"
    );
    assert!(nodes[0].citizen().get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    assert!(
        nodes[1].citizen().get("/").await.is_waiting_page(),
        "one cap across nodes, over TLS"
    );

    // Without the CA, the server's certificate is not trusted: the node
    // starts degraded instead of talking to it.
    // It says so from the start, before its first tick.
    let untrusted = Gated::start(&cfg("")).await;
    let readyz = format!("http://{}/readyz", untrusted.admin);
    let r = common::client::get(&readyz).await.text();
    assert!(r.starts_with("degraded:"), "{r}");
    untrusted.app.tick().await;
    let r = common::client::get(&readyz).await.text();
    assert!(r.starts_with("degraded:"), "{r}");
}

/// A node connects to Redis before it serves: otherwise its first visitor
/// waits for the connection inside the store's timeout, and on a busy
/// host gets the 503 of a store away instead of a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_connects_to_redis_before_it_serves() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    // Redis may not yet have seen its readiness probe's connection close.
    let settles_at = |n: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = redis.connected_clients();
            if now == n || std::time::Instant::now() > deadline {
                return now;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    assert_eq!(settles_at(1), 1, "only the question's own");
    let node = Gated::start(&cluster_config(&redis, up.addr, "max_active = 1", "")).await;
    assert_eq!(
        settles_at(2),
        2,
        "the node is connected before any request or tick"
    );
    let r = common::client::get(&format!("http://{}/readyz", node.admin)).await;
    assert_eq!(r.text(), "ready\n");
    assert!(node.citizen().get("/").await.reached_upstream());
}

/// Issue 10 in cluster mode: a turn kept after a portal failure and a
/// login detour are honoured by any node, a pass the portal ended comes
/// back on none, only the node advancing the counters writes the
/// admission log, and every node publishes the same lottery commitment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_kept_detours_and_the_admission_log_across_nodes() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-cluster-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let room = "max_active = 1\nsession_idle = \"1m\"\nfailure_grace = \"2m\"\n\
                flow_paths = [\"/oidc/callback\"]\nopens_at = \"2020-01-01T00:00:00Z\"";
    let mut nodes = Vec::new();
    for i in 0..2 {
        let log = dir.join(format!("node{i}.log"));
        let _ = std::fs::remove_file(&log);
        let cfg = cluster_config(&redis, up.addr, room, "lease = \"3s\"")
            + &format!("[audit]\nlog = \"{}\"\n", log.display());
        nodes.push(Gated::start(&cfg).await);
    }
    advance(&nodes, 1000).await;
    assert!(nodes[0].app.room("portal").unwrap().store.leads());

    // a, admitted on node 0, fails on node 1 and comes back on node 0
    // after the extended session lapsed, ahead of b.
    let mut a = nodes[0].citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = nodes[1].citizen();
    assert!(b.get("/").await.is_waiting_page());
    let mut a1 = Citizen::new(nodes[1].addr);
    a1.jar = a.jar.clone();
    assert_eq!(a1.get("/fail").await.status, 500);
    // Activity reaches Redis at each node's next tick (once a second).
    advance(&nodes, 1000).await;
    advance(&nodes, 60_000 + 30_000).await;
    assert_eq!(b.status("portal").await["state"], "waiting", "extended");
    advance(&nodes, 3 * 60_000).await;
    let mut a0 = Citizen::new(nodes[0].addr);
    a0.jar = a1.jar.clone();
    assert!(
        a0.get("/").await.reached_upstream(),
        "back ahead of the line"
    );

    // A login detour: the lapsed pass comes back through the other node.
    advance(&nodes, 3 * 60_000).await;
    let mut a1 = Citizen::new(nodes[1].addr);
    a1.jar = a0.jar.clone();
    a1.jar.retain(|k, _| k == "varco_pass_portal");
    assert!(a1.get("/oidc/callback?code=1").await.reached_upstream());
    // Released on node 1: the same pass does not come back on node 0.
    let kept = a1.jar.clone();
    a1.get("/release").await;
    let mut c = nodes[1].citizen();
    assert!(c.get("/").await.reached_upstream(), "the released slot");
    let mut replay = Citizen::new(nodes[0].addr);
    replay.jar = kept;
    assert!(!replay.get("/oidc/callback?code=2").await.reached_upstream());

    // The leader logged the admissions; the other node wrote nothing.
    advance(&nodes, 1000).await;
    for g in &nodes {
        g.app.audit_settled().await;
    }
    let log0 = std::fs::read_to_string(dir.join("node0.log")).unwrap();
    let log1 = std::fs::read_to_string(dir.join("node1.log")).unwrap();
    let summary = varco::audit::verify(log0.as_bytes()).expect("an intact chain");
    assert!(summary.records >= 1, "{log0}");
    assert!(log1.is_empty(), "{log1}");

    // One lottery, one commitment, on every node.
    let c0 = a0.status("portal").await["lottery"].clone();
    let c1 = a1.status("portal").await["lottery"].clone();
    assert_eq!(c0["commitment"], c1["commitment"]);
    assert!(c0["seed"].is_string(), "the opening has passed: {c0}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_asks_redis_about_a_session_another_node_made() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 3\nsession_idle = \"1m\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 2).await;
    advance(&nodes, 1000).await;
    let mut a = nodes[0].citizen();
    assert!(a.get("/").await.reached_upstream());
    // The same browser asks the other node, which has never seen this
    // session: Redis answers.
    let mut b = Citizen::new(nodes[1].addr);
    b.jar = a.jar.clone();
    advance(&nodes, 30_000).await;
    assert_eq!(b.status("portal").await["state"], "admitted");
    // Asking renewed nothing: a minute after its last request the session
    // is over, on both nodes.
    advance(&nodes, 31_000).await;
    assert_eq!(b.status("portal").await["state"], "none");
    assert_eq!(a.status("portal").await["state"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_redis_is_away_keeps_what_the_node_holds() {
    let dir = fresh_dir("redis-reload");
    let port = common::dead_addr().port();
    let mut redis = RedisServer::start_with(port, Some(&dir));
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 1\nsession_idle = \"5m\"\nadmission_per_minute = 60",
        "lease = \"3s\"",
    );
    let file = dir.join("varco.toml");
    std::fs::write(&file, &cfg).unwrap();
    let node = Gated::start_file(&file).await;
    let nodes = [node];
    advance(&nodes, 1000).await;
    let mut holder = nodes[0].citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut waiting = nodes[0].citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    advance(&nodes, 1000).await;

    redis.kill();
    advance(&nodes, 1000).await;
    let mut late = nodes[0].citizen();
    assert!(late.get("/").await.is_waiting_page());
    assert!(late.status("portal").await["position"].is_null());
    // The operator lowers the rate by a reload in the middle of it.
    std::fs::write(
        &file,
        cfg.replace("admission_per_minute = 60", "admission_per_minute = 30"),
    )
    .unwrap();
    nodes[0].app.reload().await.expect("reload");
    // What the node held for the room is still there: the admitted person
    // goes on without asking Redis, the provisional ticket is kept.
    assert!(
        holder.get("/next").await.reached_upstream(),
        "the admitted person carries on"
    );

    let _redis = RedisServer::start_with(port, Some(&dir));
    until_recovered(&nodes, 0).await;
    assert_eq!(waiting.status("portal").await["position"], 1);
    let s = late.status("portal").await;
    assert_eq!(s["position"], 2, "the provisional ticket was placed: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_portal_ends_ends_on_every_node() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "max_active = 1\nsession_idle = \"5m\"",
        "lease = \"3s\"",
    );
    let nodes = nodes(&cfg, 2).await;
    advance(&nodes, 1000).await;
    let mut owner = nodes[0].citizen();
    assert!(owner.get("/").await.reached_upstream());
    // A copy of the pass, used through the other node, which caches it.
    let mut copy = Citizen::new(nodes[1].addr);
    copy.jar = owner.jar.clone();
    assert!(copy.get("/").await.reached_upstream());
    // The portal ends the session through the first node, and the slot
    // goes to the next person. The other node learns of the end when it
    // next reports the copy's activity, at its tick.
    assert_eq!(owner.get("/release").await.status, 200);
    let mut next = nodes[0].citizen();
    assert!(next.get("/").await.reached_upstream(), "the slot went on");
    copy.get("/").await;
    advance(&nodes, 1000).await;
    let got = copy.get("/").await;
    assert!(
        got.is_waiting_page(),
        "the copy outlived the session on the other node"
    );
    assert!(next.get("/").await.reached_upstream());
}

/// A room an operator ungates for a while (passthrough) lets the sessions
/// of its gated time run out meanwhile: gated again, it admits the next
/// person, rather than taking the quiet for an outage and keeping every
/// old session alive for one more idle time (as the memory store never
/// did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_out_while_a_room_is_not_gated() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let file = with_admin_api(
        "ungated",
        &redis,
        up.addr,
        "max_active = 1\nsession_idle = \"10s\"",
    );
    let nodes = vec![Gated::start_file(&file).await];
    advance(&nodes, 1000).await;
    let mut left = nodes[0].citizen();
    assert!(left.get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    let got = api(&nodes[0], "POST", "/api/rooms/portal/passthrough").await;
    assert_eq!(got.status, 200, "{}", got.text());
    // Half a minute ungated, a tick a second as on a real node.
    for _ in 0..30 {
        advance(&nodes, 1000).await;
    }
    let got = api(&nodes[0], "POST", "/api/rooms/portal/resume").await;
    assert_eq!(got.status, 200, "{}", got.text());
    advance(&nodes, 1000).await;
    let got = api(&nodes[0], "GET", "/api/rooms/portal").await.json();
    assert_eq!(got["active_sessions"], 0, "{got}");
    assert!(nodes[0].citizen().get("/").await.reached_upstream());
}

/// The admin API of one node of the cluster, with the test's token.
async fn api(g: &Gated, method: &str, path: &str) -> common::client::Got {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", g.admin))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(varco::body::empty())
        .unwrap();
    common::client::send(req).await
}

const ADMIN_TOKEN: &str = "cluster-admin-token-0123456789";

/// A cluster config file for `room` whose admin API takes `ADMIN_TOKEN`.
fn with_admin_api(
    name: &str,
    redis: &RedisServer,
    up: std::net::SocketAddr,
    room: &str,
) -> std::path::PathBuf {
    std::env::set_var("VARCO_TEST_CLUSTER_ADMIN", format!("ops:{ADMIN_TOKEN}"));
    let cfg = format!(
        "[admin]\ntokens_env = \"VARCO_TEST_CLUSTER_ADMIN\"\n{}",
        cluster_config(redis, up, room, "")
    );
    let file = fresh_dir(name).join("varco.toml");
    std::fs::write(&file, &cfg).unwrap();
    file
}

/// A Redis password rotated in `url_file` (the same file, new contents)
/// is taken only at a restart, as every `[store]` change: a reload says
/// so, rather than "nothing waits" while the node keeps the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_says_a_redis_url_rewritten_in_its_file_waits_for_a_restart() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let file = with_admin_api("url-file", &redis, up.addr, "max_active = 1");
    let url_file = file.parent().unwrap().join("redis-url");
    std::fs::write(&url_file, redis.url() + "\n").unwrap();
    let cfg = std::fs::read_to_string(&file).unwrap().replace(
        &format!("url = \"{}\"", redis.url()),
        "url_file = \"redis-url\"",
    );
    assert!(cfg.contains("url_file"), "{cfg}");
    std::fs::write(&file, &cfg).unwrap();
    let node = Gated::start_file(&file).await;
    let reload = || async {
        let got = api(&node, "POST", "/api/reload").await;
        assert_eq!(got.status, 200, "{}", got.text());
        got.json()["restart_needed"].clone()
    };
    assert_eq!(reload().await, serde_json::json!([]), "nothing changed");
    std::fs::write(&url_file, format!("{}1\n", redis.url())).unwrap();
    assert_eq!(reload().await, serde_json::json!(["store"]));
    std::fs::write(&url_file, redis.url() + "\n").unwrap();
    assert_eq!(reload().await, serde_json::json!([]), "back as it runs");
}

/// Two nodes over `redis` started from one file with the admin API (see
/// `with_admin_api`), for a room of five places at 600 a minute; and the
/// file, for a node started later.
async fn two_nodes_with_the_api(
    name: &str,
    redis: &RedisServer,
    up: std::net::SocketAddr,
) -> (std::path::PathBuf, Vec<Gated>) {
    let file = with_admin_api(
        name,
        redis,
        up,
        "max_active = 5\nadmission_per_minute = 600",
    );
    let nodes = vec![
        Gated::start_file(&file).await,
        Gated::start_file(&file).await,
    ];
    (file, nodes)
}

/// An operator's change that reaches Redis after it lost its data, before
/// any node put the cluster's live settings back, puts them back with it:
/// a pause does not lift a lowered max_active on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_just_after_redis_lost_its_data_keeps_the_others() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let (_, nodes) = two_nodes_with_the_api("live-lost", &redis, up.addr).await;
    let got = api(&nodes[0], "POST", "/api/rooms/portal/max_active?value=1").await;
    assert_eq!(got.status, 200, "{}", got.text());
    advance(&nodes, 1000).await;
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    let got = api(&nodes[0], "POST", "/api/rooms/portal/pause").await;
    assert_eq!(got.status, 200, "{}", got.text());
    advance(&nodes, 1000).await;
    for g in &nodes {
        let v = api(g, "GET", "/api/rooms/portal").await.json();
        assert_eq!(
            (v["mode"].as_str(), v["max_active"].as_u64()),
            (Some("paused"), Some(1)),
            "the brake held"
        );
    }
}

/// An operator's change through any node reaches every node at its next
/// tick, a node started later too; a reset through any node takes every
/// node back to its config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_change_through_one_node_reaches_every_node() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let (file, nodes) = two_nodes_with_the_api("live", &redis, up.addr).await;
    let live = |v: serde_json::Value| {
        (
            v["mode"].as_str().unwrap_or_default().to_string(),
            v["admission_per_minute"].as_f64(),
            v["max_active"].as_u64(),
        )
    };
    let got = api(&nodes[0], "POST", "/api/rooms/portal/pause").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()).0,
        "queue",
        "the other node learns it at its tick"
    );
    advance(&nodes, 1000).await;
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("paused".to_string(), Some(600.0), Some(5))
    );
    let mut first = Citizen::new(nodes[1].addr);
    assert!(
        first.get("/").await.is_waiting_page(),
        "paused on the node that was not asked too"
    );

    for change in ["rate?value=120", "max_active?value=2"] {
        let got = api(&nodes[1], "POST", &format!("/api/rooms/portal/{change}")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    advance(&nodes, 1000).await;
    let changed = ("paused".to_string(), Some(120.0), Some(2));
    assert_eq!(
        live(api(&nodes[0], "GET", "/api/rooms/portal").await.json()),
        changed
    );
    let late = Gated::start(&std::fs::read_to_string(&file).unwrap()).await;
    late.app.tick().await;
    assert_eq!(
        live(api(&late, "GET", "/api/rooms/portal").await.json()),
        changed,
        "a node started later follows the cluster, not its file"
    );

    let got = api(&late, "POST", "/api/rooms/portal/reset").await;
    assert_eq!(got.status, 200, "{}", got.text());
    advance(&nodes, 1000).await;
    for g in nodes.iter().chain([&late]) {
        assert_eq!(
            live(api(g, "GET", "/api/rooms/portal").await.json()),
            ("queue".to_string(), Some(600.0), Some(5)),
            "back to the config"
        );
    }
    assert!(
        first.get("/").await.reached_upstream(),
        "the line moves again"
    );

    // A reset and a change within one tick: the version only moves up,
    // so no node takes the new change for one it already followed.
    api(&nodes[0], "POST", "/api/rooms/portal/rate?value=300").await;
    advance(&nodes, 1000).await;
    for action in ["reset", "rate?value=240"] {
        let got = api(&nodes[0], "POST", &format!("/api/rooms/portal/{action}")).await;
        assert_eq!(got.status, 200, "{}", got.text());
    }
    advance(&nodes, 1000).await;
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("queue".to_string(), Some(240.0), Some(5))
    );
    // A change of one field leaves the others as each node has them (an
    // adaptive rate, say).
    nodes[1]
        .app
        .room("portal")
        .unwrap()
        .set_per_minute(Some(999.0));
    api(&nodes[0], "POST", "/api/rooms/portal/max_active?value=3").await;
    advance(&nodes, 1000).await;
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("queue".to_string(), Some(999.0), Some(3))
    );
    // A reload keeps what the cluster shares, at once, as it is in force
    // (the rate moved since, as an adaptive one does).
    let got = api(&nodes[1], "POST", "/api/reload").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("queue".to_string(), Some(999.0), Some(3)),
        "the shared rate and cap, not the file's"
    );
    // And the next tick does not take it for a new shared change.
    advance(&nodes, 1000).await;
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("queue".to_string(), Some(999.0), Some(3))
    );
    // Redis loses its data: what is in force stays (a pause would not lift
    // itself), and the next change is followed again.
    api(&nodes[0], "POST", "/api/rooms/portal/pause").await;
    advance(&nodes, 1000).await;
    let version = || -> Option<u64> {
        redis::cmd("HGET")
            .arg("t:{portal}:live")
            .arg("version")
            .query(&mut redis.connection())
            .unwrap()
    };
    let before = version().expect("shared");
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    // Node 1 first: it puts back the rate the operator shared, not the one
    // in force there (its own, as an adaptive one).
    nodes[1].app.tick().await;
    let rate: Option<String> = redis::cmd("HGET")
        .arg("t:{portal}:live")
        .arg("rate")
        .query(&mut redis.connection())
        .unwrap();
    assert_eq!(rate.as_deref(), Some("240"));
    advance(&nodes, 1000).await;
    // Put back past the version the nodes followed: one that never saw
    // the loss takes no later reset for one it followed.
    assert!(version().expect("put back") > before);
    for g in &nodes {
        assert_eq!(
            live(api(g, "GET", "/api/rooms/portal").await.json()).0,
            "paused"
        );
    }
    // Nor for a node started since (a crash, a rolling restart): the
    // nodes put back what they hold, or it came up with the file's mode
    // and let the line in.
    let late = Gated::start_file(&file).await;
    late.advance(1000).await;
    // (The operator's rate: 999 is node 1's own, as an adaptive one.)
    assert_eq!(
        live(api(&late, "GET", "/api/rooms/portal").await.json()),
        ("paused".to_string(), Some(240.0), Some(3)),
        "a node started after the loss"
    );
    drop(late);
    api(&nodes[0], "POST", "/api/rooms/portal/resume").await;
    advance(&nodes, 1000).await;
    assert_eq!(
        live(api(&nodes[1], "GET", "/api/rooms/portal").await.json()),
        ("queue".to_string(), Some(999.0), Some(3))
    );
}

/// A reset is told from one a node followed by more than its version:
/// after Redis lost its data the versions start again, and a node that
/// missed the loss (a change made through another node at once) took a
/// reset of a number it had followed for that one, and went on with the
/// shared changes the reset dropped.
#[tokio::test]
async fn a_reset_after_a_data_loss_is_not_taken_for_one_followed_before() {
    use varco::store::RoomStore;
    let redis = RedisServer::start();
    let store = bare_store(&redis).await;
    let room = store.room("portal");
    room.reset_live().await.unwrap();
    let before = room.shared_live().await.unwrap().expect("reset");
    assert_eq!(redis.command("FLUSHALL"), "+OK");
    room.reset_live().await.unwrap();
    let after = room.shared_live().await.unwrap().expect("reset");
    assert_eq!(after.version, before.version, "the versions started again");
    assert!(!after.reset.is_empty());
    assert_ne!(after.reset, before.reset, "yet the resets differ");
}

/// A room's limits with none set: a queue, a minute's claim window, a
/// second's tick, a day's tickets; for a test that calls the store itself.
fn unlimited_queue() -> varco::room::admission::Limits {
    varco::room::admission::Limits {
        per_minute: None,
        max_active: None,
        claim_window_ms: 60_000,
        tick_ms: 1_000,
        opens_at_ms: None,
        mode: varco::room::admission::Mode::Queue,
        ticket_ttl_ms: 86_400_000,
        session_idle_ms: 300_000,
    }
}

/// A store over `redis` with no node around it (prefix "t:", a 3 s lease,
/// a 1 s tick), for a test that calls the room's store itself.
async fn bare_store(redis: &RedisServer) -> varco::store::redis::RedisStore {
    bare_store_at(&redis.url()).await
}

/// As `bare_store`, over the Redis at `url` (a relay's).
async fn bare_store_at(url: &str) -> varco::store::redis::RedisStore {
    varco::store::redis::RedisStore::connect(
        url,
        "t:",
        std::time::Duration::from_secs(3),
        std::time::Duration::from_secs(1),
        None,
    )
    .await
    .unwrap()
}

/// Questions about one session (a status poll with a pass, a release, a
/// pass coming back) are sent without the room's opening: one that finds
/// no state in Redis (Redis lost its data before a scheduled opening)
/// must not open the room, or arrivals would get places at once and the
/// pre-queue would never be drawn.
#[tokio::test]
async fn a_question_about_a_session_does_not_open_a_scheduled_room() {
    use varco::room::admission::{Issued, Limits, Mode};
    use varco::store::RoomStore;
    let redis = RedisServer::start();
    let store = bare_store(&redis).await;
    let room = store.room("portal");
    let now = common::gated::T0;
    assert!(!room.peek(42, now).await.unwrap());
    assert_eq!(
        room.check_session(42, now, 60_000).await.unwrap(),
        varco::store::Checked::Unheard
    );
    room.end_session(42, now, 3_600_000).await.unwrap();
    assert!(
        !room.view().opened,
        "the node's view must not say so either"
    );
    let limits = Limits {
        per_minute: Some(60.0),
        max_active: None,
        claim_window_ms: 60_000,
        tick_ms: 1_000,
        opens_at_ms: Some(now + 3_600_000),
        mode: Mode::Queue,
        ticket_ttl_ms: 86_400_000,
        session_idle_ms: 300_000,
    };
    assert_eq!(room.issue(limits, now).await.unwrap(), Issued::PreQueue(1));
    let opening = now + 3_600_000;
    assert_eq!(
        room.issue(limits, opening).await.unwrap(),
        Issued::Number(2),
        "at the opening the line starts behind the pre-queue"
    );
}

/// A queue opens once (as with the memory store's snapshot): a node
/// started with an opening still to come for a room whose shared queue
/// has already opened would announce the opening while the cluster goes
/// on admitting. It refuses to start, naming the key.
#[tokio::test]
async fn a_node_will_not_start_announcing_an_opening_for_an_open_queue() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let open = cluster_config(&redis, up.addr, "admission_per_minute = 60", "");
    let running = nodes(&open, 1).await;
    assert!(running[0].citizen().get("/").await.reached_upstream());
    // T0 is 08:00Z: an opening an hour later.
    let announced = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 60\nopens_at = \"2027-01-15T09:00:00Z\"",
        "",
    );
    let cfg = varco::config::Config::from_toml(&announced, std::path::Path::new(".")).unwrap();
    let clock = varco::clock::ManualClock::new(common::gated::T0);
    let refused = varco::app::App::new(cfg, std::sync::Arc::new(clock)).await;
    let err = refused
        .err()
        .expect("a node announcing an opening the queue cannot keep");
    assert!(err.to_string().contains("rooms.portal.opens_at"), "{err}");
}

/// People admitted at once when the nodes come back after a long
/// silence (every node down), before their first tick: their batch is
/// not taken for one called before the gap and pushed past it, which
/// would hold every turn called after it open for as long as the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_after_a_long_silence_do_not_hold_later_turns_open() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 60\nclaim_window = \"60s\"",
        "",
    );
    let nodes = nodes(&cfg, 2).await;
    advance(&nodes, 1000).await;
    // Ten minutes without a tick; then someone comes before the first.
    for g in &nodes {
        g.clock.advance_ms(600_000);
    }
    assert!(nodes[0].citizen().get("/").await.reached_upstream());
    advance(&nodes, 1000).await;
    // A crowd: the rate calls them a second apart, and nobody comes.
    let mut waited = 0;
    for _ in 0..5 {
        waited += nodes[1].citizen().get("/").await.is_waiting_page() as u64;
    }
    assert!(waited >= 3, "{waited} of 5 in line");
    let abandoned = || nodes[0].app.room("portal").unwrap().view().abandoned_total;
    for _ in 0..70 {
        advance(&nodes, 1000).await;
    }
    assert_eq!(
        abandoned(),
        waited,
        "every turn nobody took lapsed after its window"
    );
}

/// A room without `max_active` still forgets its lapsed sessions in
/// Redis (which must not evict): the set does not grow with everyone
/// ever admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_sessions_leave_redis_without_max_active() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(
        &redis,
        up.addr,
        "admission_per_minute = 6000\nsession_idle = \"1m\"",
        "",
    );
    let nodes = nodes(&cfg, 1).await;
    // The leader's first tick makes the room's state; the next fills
    // its bucket.
    advance(&nodes, 1000).await;
    advance(&nodes, 1000).await;
    for i in 0..20 {
        let got = nodes[0].citizen().get("/").await;
        assert!(got.reached_upstream(), "{i}: {}", got.status);
    }
    let live = || redis.command("ZCARD t:{portal}:sessions");
    assert_eq!(live(), ":20");
    advance(&nodes, 120_000).await;
    assert_eq!(live(), ":0", "lapsed sessions forgotten");
}

/// Every node counts the cluster's admissions from its own start, from
/// 0: a node that just started, whether Redis has answered it yet or not,
/// never shows the cluster's count as that many admissions at once. The
/// nodes' counters then rise together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_counts_the_clusters_admissions_from_its_start() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(&redis, up.addr, "max_active = 10", "");
    let first = Gated::start(&cfg).await;
    let come_in = async |g: &Gated, n: usize| {
        for _ in 0..n {
            assert!(g.citizen().get("/").await.reached_upstream());
        }
    };
    let admitted = async |g: &Gated| {
        common::client::metric(g.admin, "varco_admitted_total", "room=\"portal\"").await
    };
    come_in(&first, 3).await;
    advance(std::slice::from_ref(&first), 1_000).await;
    assert_eq!(admitted(&first).await, Some(3.0));
    let second = Gated::start(&cfg).await;
    assert_eq!(admitted(&second).await, Some(0.0), "at its start");
    let both = [first, second];
    advance(&both, 1_000).await;
    assert_eq!(
        admitted(&both[1]).await,
        Some(0.0),
        "the cluster's 3 are before"
    );
    come_in(&both[0], 2).await;
    advance(&both, 1_000).await;
    assert_eq!(admitted(&both[0]).await, Some(5.0));
    assert_eq!(admitted(&both[1]).await, Some(2.0));
}

/// A page's requests sent at once with a lapsed pass on its login
/// callback's path (each a return): one return, one new session, not one
/// each holding a slot for nobody. Over Redis, where every store call is
/// a round trip and the requests interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_sent_at_once_make_one_session() {
    returns_sent_at_once(1).await;
}

/// The same through two nodes (a balancer sending a page's requests
/// round robin): the store tells the second node's return from a new
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_sent_at_once_through_two_nodes_make_one_session() {
    returns_sent_at_once(2).await;
}

/// Sends eight copies of a lapsed pass at once, on its login callback's
/// path, round robin through `n` nodes of a one-slot room whose slot went
/// on meanwhile: each gets through with one return's pass, and one
/// session came of them.
async fn returns_sent_at_once(n: usize) {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let room =
        "max_active = 1\nsession_idle = \"1m\"\nflow_paths = [\"/slow\"]\nflow_window = \"10m\"";
    let nodes = nodes(&cluster_config(&redis, up.addr, room, "lease = \"3s\""), n).await;
    advance(&nodes, 1000).await;
    let mut d = nodes[0].citizen();
    assert!(d.get("/").await.reached_upstream());
    // d's session lapses at a tick (a second at a time: a longer gap is
    // an outage's, which counts against nobody's idle time); its pass is
    // good until 2m.
    for _ in 0..85 {
        advance(&nodes, 1000).await;
    }
    let mut e = nodes[0].citizen();
    assert!(e.get("/").await.reached_upstream(), "d's slot went on");
    let returns: Vec<_> = (0..8)
        .map(|i| {
            let mut copy = Citizen::new(nodes[i % n].addr);
            copy.jar = d.jar.clone();
            // Answered slowly, so all are in before any answer is out.
            tokio::spawn(async move { copy.get(&format!("/slow?ms=500&code={i}")).await })
        })
        .collect();
    let mut passes = std::collections::HashSet::new();
    for r in returns {
        let got = r.await.unwrap();
        assert_eq!(got.text(), "slow done", "{}", got.status);
        let set = got.headers["set-cookie"].to_str().unwrap();
        passes.insert(set.split(';').next().unwrap().to_string());
    }
    assert_eq!(passes.len(), 1, "one return's pass for all: {passes:?}");
    advance(&nodes, 1000).await;
    for g in &nodes {
        assert_eq!(
            g.app.room("portal").unwrap().view().active,
            2,
            "e and d's one returned session"
        );
    }
}

/// A node whose clock is off from the others' is seen, on the metric and
/// in the log: the cluster counts sessions and windows on the nodes'
/// clocks, and nothing else says why `max_active` was passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_off_is_measured_against_redis() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(&redis, up.addr, "max_active = 1", "");
    let now = varco::clock::system().now_ms();
    let in_step = Gated::start_at(&cfg, now, std::path::Path::new(".")).await;
    let behind = Gated::start_at(&cfg, now - 600_000, std::path::Path::new(".")).await;
    let offset = async |g: &Gated| {
        common::client::metric(g.admin, "varco_store_clock_offset_seconds", "").await
    };
    assert!(offset(&in_step).await.is_some(), "measured at the start");
    let before = varco::clock::system().now_ms();
    in_step.app.tick().await;
    behind.app.tick().await;
    let after = varco::clock::system().now_ms();
    let (in_step, behind) = (
        offset(&in_step).await.unwrap(),
        offset(&behind).await.unwrap(),
    );
    // The nodes' clocks stand still at `now` (and 10 minutes before);
    // Redis read its own between `before` and `after`, and the node adds
    // half its call's round trip. A millisecond each way for rounding.
    let within = |x: f64, shift: i64| {
        let (now, before, after) = (now as i64 + shift, before as i64, after as i64);
        let low = now - after - 1;
        let high = now - before + (after - before) / 2 + 1;
        (low as f64 / 1000.0..=high as f64 / 1000.0).contains(&x)
    };
    assert!(within(in_step, 0), "{in_step}: {before}..{after}");
    assert!(within(behind, -600_000), "{behind}: {before}..{after}");
}

/// A real clock set off by some milliseconds, which the test can step.
struct Off(std::sync::atomic::AtomicI64);

impl Off {
    fn by(ms: i64) -> std::sync::Arc<Off> {
        std::sync::Arc::new(Off(ms.into()))
    }

    fn step_to(&self, ms: i64) {
        self.0.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl varco::clock::Clock for Off {
    fn now_ms(&self) -> u64 {
        varco::clock::system()
            .now_ms()
            .saturating_add_signed(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Redis's time (ms), and a second's leeway for a node's measure of it
/// (half a round trip, on a busy host): no time a node sent may pass it.
fn redis_now_with_leeway(c: &mut redis::Connection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(c).unwrap();
    secs * 1000 + micros / 1000 + 1000
}

/// The portal room's sessions in Redis, each with when it ends (ms).
fn sessions_in_redis(c: &mut redis::Connection) -> Vec<(String, u64)> {
    redis::cmd("ZRANGE")
        .arg("t:{portal}:sessions")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(c)
        .unwrap()
}

/// Over a Redis of their own, for a room of one (`session_idle` 5 m): a
/// node on the system clock, and one whose clock is `offset` ms off.
async fn in_step_and_off(offset: i64) -> (RedisServer, upstream::Upstream, Gated, Gated) {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let room = "max_active = 1\nsession_idle = \"5m\"";
    let cfg = cluster_config(&redis, up.addr, room, "");
    let in_step = Gated::start_on(&cfg, varco::clock::system()).await;
    let off = Gated::start_on(&cfg, Off::by(offset)).await;
    (redis, up, in_step, off)
}

/// Every node counts on Redis's clock, not its own: a node whose clock is
/// off had its sessions lapse early in Redis (behind) or dropped the
/// others' early (ahead), and a room of one let a second person in.
#[tokio::test]
async fn a_node_whose_clock_is_off_still_keeps_max_active() {
    for offset in [-600_000, 600_000] {
        let (_redis, _up, in_step, off) = in_step_and_off(offset).await;
        // The first session ends, in a node's count, five minutes after
        // the earlier clock's now: the later clock is past it.
        let (early, late) = if offset < 0 {
            (&off, &in_step)
        } else {
            (&in_step, &off)
        };
        off.app.tick().await;
        in_step.app.tick().await;
        let mut first = Citizen::new(early.addr);
        assert!(first.get("/").await.reached_upstream(), "{offset}");
        off.app.tick().await;
        in_step.app.tick().await;
        let mut second = Citizen::new(late.addr);
        assert!(
            second.get("/").await.is_waiting_page(),
            "{offset}: the one slot is taken"
        );
        assert_eq!(second.status("portal").await["position"], 1, "{offset}");
        for g in [&off, &in_step] {
            g.app.tick().await;
            let v = g.app.room("portal").unwrap().store.view();
            assert_eq!((v.active, v.serving), (1, 1), "{offset}");
        }
    }
}

/// A node counts on Redis's clock from its start, before its first tick:
/// a node ten minutes ahead lets nobody in beside the one person a room
/// of one holds.
#[tokio::test]
async fn a_node_ahead_keeps_max_active_before_its_first_tick() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let room = "max_active = 1\nsession_idle = \"5m\"";
    let cfg = cluster_config(&redis, up.addr, room, "");
    let in_step = Gated::start_on(&cfg, varco::clock::system()).await;
    let ahead = Gated::start_on(&cfg, Off::by(600_000)).await;
    let mut first = Citizen::new(in_step.addr);
    assert!(first.get("/").await.reached_upstream());
    let mut second = Citizen::new(ahead.addr);
    assert!(
        second.get("/").await.is_waiting_page(),
        "the one slot is taken"
    );
}

/// A step of a node's clock between two of its measures moves nothing in
/// Redis: Redis's time runs on from the last measure by the monotonic
/// clock. Taken at the last measure's offset, a step of ten minutes put
/// the rate's refill ten minutes ahead (no admission for as long) and a
/// session ten minutes past its idle time.
#[tokio::test]
async fn a_step_of_a_nodes_clock_between_ticks_puts_no_time_ahead_in_redis() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let room = "admission_per_minute = 6000\nsession_idle = \"5m\"";
    let cfg = cluster_config(&redis, up.addr, room, "");
    let clock = Off::by(0);
    let node = Gated::start_on(&cfg, clock.clone()).await;
    node.app.tick().await;
    clock.step_to(600_000);
    assert!(Citizen::new(node.addr).get("/").await.reached_upstream());
    let mut c = redis.connection();
    // The step is ten minutes.
    let redis_now = redis_now_with_leeway(&mut c);
    let refilled: u64 = redis::cmd("HGET")
        .arg("t:{portal}:state")
        .arg("refilled")
        .query(&mut c)
        .unwrap();
    assert!(refilled <= redis_now, "{refilled} > {redis_now}");
    let sessions = sessions_in_redis(&mut c);
    assert_eq!(sessions.len(), 1);
    assert!(
        sessions[0].1 <= redis_now + 300_000,
        "{} > {redis_now} + 5 m",
        sessions[0].1
    );
}

/// A ticket of a run of the memory store (a node moved to cluster mode,
/// its keys kept) holds no place in Redis's line, as one of another run
/// of the memory store holds none in it: its holder takes a place at
/// once, not its old number as a place in the new line (and the back of
/// it once that number is called).
#[tokio::test]
async fn a_ticket_of_the_memory_store_holds_no_place_in_redis() {
    let redis = RedisServer::start();
    let up = upstream::spawn().await;
    let cfg = cluster_config(&redis, up.addr, "max_active = 1", "");
    let store = format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"t:\"\n\n",
        redis.url()
    );
    assert_eq!(cfg.matches(&store).count(), 1);
    let single = Gated::start(&cfg.replace(&store, "")).await;
    assert!(single.citizen().get("/").await.reached_upstream());
    let mut last = single.citizen();
    for _ in 0..5 {
        last = single.citizen();
        assert!(last.get("/").await.is_waiting_page());
    }
    assert_eq!(last.status("portal").await["position"], 5);
    single.stop().await;

    let node = Gated::start(&cfg).await;
    assert!(node.citizen().get("/").await.reached_upstream());
    let mut moved = node.citizen();
    moved.jar = last.jar.clone();
    assert!(moved.get("/").await.is_waiting_page());
    assert_eq!(
        moved.status("portal").await["position"],
        1,
        "the one in line, not the memory run's fifth"
    );
}

/// A direct admission for a session already ended makes none: the end
/// of a session a node refused (its answer lost) can overtake the script
/// on a connection made since, and the session, made after its end,
/// would hold a slot nobody holds for `session_idle`.
#[tokio::test]
async fn a_direct_admission_after_its_end_makes_no_session() {
    use varco::store::{NewSession, RoomStore};
    let redis = RedisServer::start();
    let store = bare_store(&redis).await;
    let room = store.room("portal");
    let limits = unlimited_queue();
    let now = common::gated::T0;
    room.refresh(limits, now).await.unwrap();
    let session = |sid| NewSession {
        sid,
        expires_ms: now + 300_000,
    };
    room.end_session(7, now, 60_000).await.unwrap();
    assert_eq!(
        room.admit_directly(limits, session(7), now).await.unwrap(),
        None
    );
    assert_eq!(redis.command("ZCARD t:{portal}:sessions"), ":0");
    assert!(
        room.admit_directly(limits, session(8), now)
            .await
            .unwrap()
            .is_some(),
        "another session is let in"
    );
}

/// The admission log's mark in Redis moves only forward, and only in the
/// run the room's state is in: a late write from a leader that lost the
/// lease, or from before Redis lost its data, would have the next leader
/// log from too far on.
#[tokio::test]
async fn the_admission_logs_mark_never_goes_back_nor_to_another_run() {
    use varco::store::RoomStore;
    let redis = RedisServer::start();
    let store = bare_store(&redis).await;
    let room = store.room("portal");
    assert_eq!(room.audited().await.unwrap(), None);
    let limits = unlimited_queue();
    room.refresh(limits, common::gated::T0).await.unwrap();
    let run = room.generation();
    assert_ne!(run, 0, "the state's run is known");
    room.set_audited(run, 5).await.unwrap();
    assert_eq!(room.audited().await.unwrap(), Some((run, 5)));
    room.set_audited(run, 3).await.unwrap();
    assert_eq!(room.audited().await.unwrap(), Some((run, 5)), "not back");
    room.set_audited(run + 1, 9).await.unwrap();
    assert_eq!(
        room.audited().await.unwrap(),
        Some((run, 5)),
        "not another run's"
    );
    room.set_audited(run, 8).await.unwrap();
    assert_eq!(room.audited().await.unwrap(), Some((run, 8)));
}

/// Every node signs and checks tickets and passes on Redis's clock: a
/// node twenty minutes behind took an in-step node's pass for one not
/// yet good (a minute of leeway) and its ticket for none, and one twenty
/// minutes ahead took the pass for lapsed; either sent an admitted
/// person back to the line, where the one slot was theirs already. So
/// did an in-step node with the passes a node off signed.
#[tokio::test]
async fn a_pass_and_a_ticket_hold_on_a_node_whose_clock_is_off() {
    for (offset, signed_off) in [
        (-1_200_000, false),
        (1_200_000, false),
        (-1_200_000, true),
        (1_200_000, true),
    ] {
        let case = format!("offset {offset}, signed by the node off: {signed_off}");
        let (_redis, _up, in_step, off) = in_step_and_off(offset).await;
        let (from, to) = if signed_off {
            (&off, &in_step)
        } else {
            (&in_step, &off)
        };
        let mut admitted = Citizen::new(from.addr);
        assert!(admitted.get("/").await.reached_upstream(), "{case}");
        let mut waiting = Citizen::new(from.addr);
        assert!(waiting.get("/").await.is_waiting_page(), "{case}");
        let mut moved = Citizen::new(to.addr);
        moved.jar = admitted.jar.clone();
        assert!(
            moved.get("/").await.reached_upstream(),
            "{case}: the pass holds on the other node"
        );
        let mut moved = Citizen::new(to.addr);
        moved.jar = waiting.jar.clone();
        assert_eq!(
            moved.status("portal").await["position"],
            1,
            "{case}: the ticket holds its place on the other node"
        );
    }
}

/// A node started with Redis away runs on its own clock until Redis first
/// answers, and sends Redis no time of it: a request's between Redis's
/// return and the node's next tick goes to the node's own share, and that
/// tick measures first. Sent as the node's own, its time stood the room's
/// refill ahead by as much as the node's clock is (nobody in for as long)
/// and the sessions' ends with it. (Less than the minute a ticket's start
/// is checked with: the provisional ticket signed before the measure is
/// on the node's clock, and one further ahead would be no ticket.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_with_redis_away_sends_it_no_time_of_its_own() {
    let redis = RedisServer::start();
    let relay = Relay::to(common::dead_addr().port()).await;
    let up = upstream::spawn().await;
    let room = "admission_per_minute = 6000\nsession_idle = \"5m\"";
    let cfg = cluster_config_at(&relay.url(), up.addr, room, "");
    let node = Gated::start_on(&cfg, Off::by(50_000)).await;
    node.app.tick().await;
    relay.send_to(redis.port);
    let mut early = Citizen::new(node.addr);
    assert!(
        early.get("/").await.is_waiting_page(),
        "a provisional ticket"
    );
    let mut c = redis.connection();
    let refilled = |c: &mut redis::Connection| -> Option<u64> {
        redis::cmd("HGET")
            .arg("t:{portal}:state")
            .arg("refilled")
            .query(c)
            .unwrap()
    };
    assert_eq!(refilled(&mut c), None, "nothing sent before the tick");
    until_recovered(std::slice::from_ref(&node), 0).await;
    // Placed, called and in.
    node.app.tick().await;
    assert!(early.get("/").await.reached_upstream());
    // The offset is fifty seconds.
    let redis_now = redis_now_with_leeway(&mut c);
    let refilled = refilled(&mut c).expect("the state written");
    assert!(refilled <= redis_now, "{refilled} > {redis_now}");
    let sessions = sessions_in_redis(&mut c);
    assert!(!sessions.is_empty());
    for (sid, exp) in &sessions {
        assert!(
            *exp <= redis_now + 300_000,
            "{sid}: {exp} > {redis_now} + 5 m"
        );
    }
}

/// What a node started with Redis away put by for Redis meanwhile (a
/// session taken at its pass's word) goes to Redis moved onto Redis's
/// clock at the first measure: as the node's own, twenty minutes ahead,
/// it held a slot twenty minutes past its end.
#[tokio::test]
async fn what_a_node_put_by_before_redis_answered_goes_on_rediss_clock() {
    use varco::store::RoomStore;
    let redis = RedisServer::start();
    let relay = Relay::to(common::dead_addr().port()).await;
    let store = bare_store_at(&relay.url()).await;
    let gauge = prometheus::GaugeVec::new(prometheus::Opts::new("g", "g"), &[]).unwrap();
    let clock = store.watch_clock(Off::by(1_200_000), gauge);
    assert!(store.reach().await.is_err());
    assert!(!store.clock_ready());
    let room = store.room("portal");
    let node_now = clock.now_ms();
    assert!(room.take_at_its_word(7, node_now + 300_000));
    relay.send_to(redis.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while store.reach().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "Redis never answered");
    }
    assert!(clock.now_ms() + 600_000 < node_now, "on Redis's clock");
    let limits = unlimited_queue();
    room.tick(limits, clock.now_ms()).await.unwrap();
    let mut c = redis.connection();
    let redis_now = redis_now_with_leeway(&mut c);
    let exp: Option<u64> = redis::cmd("ZSCORE")
        .arg("t:{portal}:sessions")
        .arg(format!("{:032x}", 7))
        .query(&mut c)
        .unwrap();
    let exp = exp.expect("the session reported");
    assert!(exp <= redis_now + 300_000, "{exp} > {redis_now} + 5 m");
}

/// A reload that brings a room with an opening still to come is refused
/// while Redis does not answer, naming the key: whether the queue Redis
/// keeps for that name has opened (the room removed by an earlier reload,
/// its queue open) cannot be checked. Taken unchecked, that queue admitted
/// before the time the page tells, and the next start refused the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_with_an_opening_is_not_added_unchecked_while_redis_is_away() {
    let redis = RedisServer::start();
    let relay = Relay::to(redis.port).await;
    let up = upstream::spawn().await;
    let cfg = cluster_config_at(&relay.url(), up.addr, "", "");
    let (node, file) = Gated::start_written("opening-unchecked", &cfg).await;
    let opens = varco::timefmt::rfc3339(common::gated::T0 + 600_000);
    let more = format!(
        "{cfg}[rooms.later]\nupstreams = [\"http://{}\"]\npaths = [\"/later\"]\nopens_at = \"{opens}\"\n",
        up.addr
    );
    std::fs::write(&file, &more).unwrap();
    relay.send_to(common::dead_addr().port());
    relay.cut();
    let refused = node.app.reload().await.expect_err("taken unchecked");
    assert!(
        refused.to_string().contains("rooms.later.opens_at"),
        "{refused}"
    );
    assert!(node.app.room("later").is_none());
    relay.send_to(redis.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while let Err(e) = node.app.reload().await {
        assert!(std::time::Instant::now() < deadline, "{e}");
        node.advance(1000).await;
    }
    assert!(node.app.room("later").is_some(), "checked, and taken");
}

/// A node that has not heard from Redis since its start reads its rooms
/// as queues that never opened and drew no lottery: a reload that moves
/// an opening, or drops a key that may draw the lottery, cannot be
/// checked, and is refused, naming the key, until Redis answers. Taken
/// unchecked, a cluster's open queue went on admitting before the new
/// time its page announced, and this node drew the pre-queue's places
/// apart from the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_an_opening_or_drops_a_key_waits_for_redis() {
    let redis = RedisServer::start();
    let relay = Relay::to(common::dead_addr().port()).await;
    let up = upstream::spawn().await;
    let opens = |min: u64| {
        let at = varco::timefmt::rfc3339(common::gated::T0 + min * 60_000);
        format!("opens_at = \"{at}\"")
    };
    let cfg = cluster_config_at(&relay.url(), up.addr, &opens(10), "");
    let (node, file) = Gated::start_written("unheard-reload", &cfg).await;
    std::env::set_var(
        "VARCO_TEST_UNHEARD_KEYS",
        "k2:ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=",
    );
    let later = cfg.replace(&opens(10), &opens(20));
    for (edited, key) in [
        (later.clone(), "rooms.portal.opens_at"),
        (
            cfg.replace("VARCO_TEST_CLUSTER_KEYS", "VARCO_TEST_UNHEARD_KEYS"),
            "secrets.key_env",
        ),
    ] {
        std::fs::write(&file, &edited).unwrap();
        let said = node
            .app
            .reload()
            .await
            .expect_err("taken unchecked")
            .to_string();
        assert!(
            said.contains(key) && said.contains("has not answered since the start"),
            "{said}"
        );
    }
    // Heard, the opening is checked against what Redis holds: nothing
    // opened, nobody in the pre-queue; it may move.
    std::fs::write(&file, &later).unwrap();
    relay.send_to(redis.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while let Err(e) = node.app.reload().await {
        assert!(std::time::Instant::now() < deadline, "{e}");
        node.advance(1000).await;
    }
}
