//! Micro-benchmarks for the per-request work varco adds before the proxy:
//!
//! - `route/*`: is a linear scan over routes sorted by specificity fast
//!   enough, or does routing need a trie? (Answer in BENCHMARKS.md: with
//!   the tens of routes a portal has, the scan costs well under a
//!   microsecond.)
//! - `headers/*`: what hop-by-hop stripping and X-Forwarded-* cost on a
//!   browser-sized header set, what taking varco's cookies out of it
//!   costs, and what a request's `X-Request-Id` costs (all paid by every
//!   request let through to the portal).
//! - `gate/*`: the whole gate for someone turned away, response included:
//!   a new arrival (a ticket signed, the page rendered) and a reload by
//!   someone already in line (the ticket verified, the page rendered).
//!   This is varco's share of the waiting-page rate in `benches/load.sh`.
//!   And a new arrival before a scheduled opening (a pre-queue ticket;
//!   the page publishes the draw's commitment).
//! - `upstreams/*`: choosing an upstream for a request, with weights,
//!   every upstream in rotation (the wheel's slot) and one out (its turn
//!   shared out by weight).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use varco::config::Config;
use varco::proxy::headers::{set_forwarded, strip_hop_by_hop};
use varco::request_id::RequestIds;
use varco::room::Room;
use varco::router::Router;

fn router_with(rooms: usize) -> Router {
    let mut toml = String::new();
    for i in 0..rooms {
        toml.push_str(&format!(
            "[rooms.r{i}]\nupstreams = [\"http://127.0.0.1:{}\"]\nhosts = [\"site{i}.example.org\", \"*.site{i}.example.net\"]\npaths = [\"/\", \"/area{i}\", \"/area{i}/login\"]\n",
            10000 + i
        ));
    }
    let cfg = Config::from_toml(&toml, Path::new(".")).expect("valid");
    let rooms: Vec<Arc<Room>> = cfg
        .rooms
        .into_iter()
        .map(|r| Arc::new(Room::standalone(r)))
        .collect();
    Router::new(&rooms)
}

fn route(c: &mut Criterion) {
    for n in [1, 10, 50] {
        let r = router_with(n);
        let host = format!("www.site{}.example.net:443", n - 1);
        c.bench_function(&format!("route/{n}_rooms_worst_case"), |b| {
            b.iter(|| {
                black_box(r.route(Some(black_box(&host)), black_box("/area0/login/callback")))
            })
        });
    }
}

fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "portal.example.org"),
        (
            "user-agent",
            "Mozilla/5.0 (Linux; Android 14) AppleWebKit/537.36 Chrome/126 Mobile Safari/537.36",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "it-IT,it;q=0.9,en;q=0.8"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        (
            "cookie",
            "citizen=RSSMRA80A01H501U; varco_pass_portal=eyJhbGciOiJIUzI1NiJ9.eyJyb29tIjoicG9ydGFsIn0.sig",
        ),
        ("upgrade-insecure-requests", "1"),
        ("x-forwarded-for", "203.0.113.9"),
    ] {
        h.insert(k, v.parse().unwrap());
    }
    h
}

fn headers(c: &mut Criterion) {
    let base = browser_headers();
    let peer = "198.51.100.4".parse().unwrap();
    let host = base.get("host").cloned();
    c.bench_function("headers/strip_and_forward", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h, true);
                set_forwarded(&mut h, peer, false, "https", host.as_ref());
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    // Paid by every request let through to the portal: one with a pass
    // (every admitted person's) and one with the portal's cookies only.
    let mut portal_only = base.clone();
    portal_only.insert(
        "cookie",
        "citizen=RSSMRA80A01H501U; lang=it".parse().unwrap(),
    );
    for (name, headers) in [
        ("headers/strip_own_cookies", &base),
        ("headers/strip_own_cookies_none", &portal_only),
    ] {
        c.bench_function(name, |b| {
            b.iter_batched(
                || headers.clone(),
                |mut h| {
                    varco::cookies::strip_own(&mut h);
                    h
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    // Paid by the waiting page on every reload, and by varco's own page
    // for a request that fails.
    c.bench_function("headers/reader", |b| {
        b.iter(|| varco::page::Reader::of(black_box(&base), false, varco::config::Language::It))
    });
    let ids = RequestIds::new();
    c.bench_function("headers/request_id", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                let id = ids.choose(&h, false);
                h.insert(varco::request_id::HEADER, black_box(id));
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn gate(c: &mut Criterion) {
    use varco::gate::{admit, Gate, GateRequest};
    let cfg = Config::from_toml(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:9\"]\nmode = \"queue_all\"\nadmission_per_minute = 1\nper_ip = { tickets_per_minute = 100000000 }\n",
        Path::new("."),
    )
    .expect("valid");
    let room = Room::standalone(cfg.rooms.into_iter().next().expect("one room"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut h = browser_headers();
    h.remove("cookie");
    let method = http::Method::GET;
    let now = 1_795_000_000_000;
    let request = |headers| GateRequest {
        headers,
        method: &method,
        path_and_query: "/apply?step=1",
        host: Some("portal.example.org"),
        client_ip: "198.51.100.4".parse().unwrap(),
        client_named: true,
        tls: true,
        json: false,
        now_ms: now,
    };
    let page = |g: Gate| match g {
        Gate::Respond(r) => r,
        Gate::Proxy { .. } => panic!("a queue_all room admitted someone"),
    };
    c.bench_function("gate/new_arrival_page", |b| {
        b.iter(|| page(rt.block_on(admit(&room, &request(black_box(&h)))).unwrap()))
    });
    // Someone already in line reloads: the ticket from a first visit.
    let first = page(rt.block_on(admit(&room, &request(&h))).unwrap());
    let ticket = first.headers()["set-cookie"].to_str().unwrap();
    let mut again = h.clone();
    again.insert("cookie", ticket.split(';').next().unwrap().parse().unwrap());
    c.bench_function("gate/reload_page", |b| {
        b.iter(|| {
            page(
                rt.block_on(admit(&room, &request(black_box(&again))))
                    .unwrap(),
            )
        })
    });
    // Before a scheduled opening: a pre-queue ticket, and the page
    // publishes the draw's commitment.
    let cfg = Config::from_toml(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:9\"]\nadmission_per_minute = 1\nopens_at = \"2026-12-01T09:00:00+01:00\"\nper_ip = { tickets_per_minute = 100000000 }\n",
        Path::new("."),
    )
    .expect("valid");
    let room = Room::standalone(cfg.rooms.into_iter().next().expect("one room"));
    c.bench_function("gate/prequeue_arrival_page", |b| {
        b.iter(|| page(rt.block_on(admit(&room, &request(black_box(&h)))).unwrap()))
    });
}

fn upstreams(c: &mut Criterion) {
    let toml = "[rooms.portal]\nupstreams = [{ url = \"http://127.0.0.1:9001\", weight = 2 }, \"http://127.0.0.1:9002\", \"http://127.0.0.1:9003\"]\n";
    let cfg = Config::from_toml(toml, Path::new(".")).expect("valid");
    let room = Room::standalone(cfg.rooms.into_iter().next().expect("one room"));
    c.bench_function("upstreams/pick_all_in", |b| {
        b.iter(|| black_box(room.upstreams.pick_or_probe(black_box(&[]))))
    });
    room.upstreams
        .take_out("127.0.0.1:9001", true, true)
        .expect("taken out");
    c.bench_function("upstreams/pick_one_out", |b| {
        b.iter(|| black_box(room.upstreams.pick_or_probe(black_box(&[]))))
    });
}

criterion_group!(benches, route, headers, gate, upstreams);
criterion_main!(benches);
