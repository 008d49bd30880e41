//! Micro-benchmarks for the waiting room's own work:
//!
//! - `token/*`: what signing and verifying a ticket or pass costs (the
//!   pass check is on every admitted person's request: is HS256 JWT cheap
//!   enough for the hot path?).
//! - `admission/*`: one admission decision in the state machine: a claim,
//!   a direct admission, a ticket issued, a tick with a long queue (is a
//!   mutex-guarded state fast enough, or does it need atomics?).
//! - `store/issue_ticket*`: a ticket issued through the memory store,
//!   without a snapshot file and with one (each number covered by a mark
//!   on disk first: what writing ahead costs, its fsyncs included).
//! - `lottery/place`: drawing one pre-queue place in a pre-queue of a
//!   million (cycle-walking cost).
//! - `page/render`: rendering the waiting page.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use varco::config::Language;
use varco::page::waiting::{render, Status, Template};
use varco::room::admission::{AdmissionState, Limits, Mode};
use varco::room::lottery::Lottery;
use varco::room::token::{audience, Keyring, PassClaims, SigningKey, TicketClaims};
use varco::store::memory::MemoryStore;
use varco::store::RoomStore;

const NOW: u64 = 1_800_000_000_000;

fn keys() -> Keyring {
    Keyring::new(vec![
        SigningKey {
            id: "2026-10".into(),
            secret: vec![7; 32],
        },
        SigningKey {
            id: "2026-11".into(),
            secret: vec![9; 32],
        },
    ])
}

fn tokens(c: &mut Criterion) {
    let k = keys();
    let mut ticket = TicketClaims::new("portal", 123_456, 0, NOW, 86_400_000, "/apply?step=2");
    // As the gate signs it: with the queue's generation (random, so long).
    ticket.g = 0x9e37_79b9_7f4a_7c15;
    c.bench_function("token/sign_ticket", |b| {
        b.iter(|| k.sign(black_box(&ticket)))
    });
    let pass = k.sign(&PassClaims::new("portal", 0xdead_beef, 17, NOW, 600_000));
    let aud = audience("pass", "portal");
    c.bench_function("token/verify_pass", |b| {
        b.iter(|| {
            k.verify::<PassClaims>(black_box(&pass), &aud, NOW)
                .expect("valid")
        })
    });
    let garbage = "x".repeat(4000);
    c.bench_function("token/reject_garbage", |b| {
        b.iter(|| k.verify::<PassClaims>(black_box(&garbage), &aud, NOW))
    });
}

fn limits() -> Limits {
    Limits {
        per_minute: Some(6000.0),
        max_active: Some(10_000),
        claim_window_ms: 60_000,
        tick_ms: 1_000,
        opens_at_ms: None,
        mode: Mode::Queue,
        ticket_ttl_ms: 86_400_000,
        session_idle_ms: 300_000,
    }
}

fn admission(c: &mut Criterion) {
    let l = limits();
    c.bench_function("admission/issue_ticket", |b| {
        let mut s = AdmissionState::new(&l, NOW);
        b.iter(|| s.issue(&l, NOW))
    });
    c.bench_function("admission/admit_directly", |b| {
        b.iter_batched(
            || AdmissionState::new(&l, NOW),
            |mut s| s.admit_directly(&l, 10, NOW + 1_000),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("admission/claim_in_a_window_of_100", |b| {
        b.iter_batched(
            || {
                let mut s = AdmissionState::new(&l, NOW);
                for _ in 0..10_000 {
                    s.issue(&l, NOW);
                }
                s.tick(&l, 0, NOW + 1_000);
                s
            },
            |mut s| s.claim(black_box(57), &l, NOW + 1_500),
            BatchSize::LargeInput,
        )
    });
    c.bench_function("admission/tick_with_a_million_waiting", |b| {
        let mut s = AdmissionState::new(&l, NOW);
        s.queue = 1_000_000;
        let mut now = NOW;
        b.iter(|| {
            now += 1_000;
            s.tick(&l, 5_000, now)
        })
    });
}

fn store(c: &mut Criterion) {
    let l = limits();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let plain = MemoryStore::open(None, NOW).expect("store");
    let room = plain.room("portal", &l, NOW);
    c.bench_function("store/issue_ticket", |b| {
        b.iter(|| rt.block_on(room.issue(l, NOW)).expect("issued"))
    });
    let dir = std::env::temp_dir().join(format!("varco-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("folder");
    let ahead = MemoryStore::open(Some(dir.join("state.json")), NOW).expect("store");
    let room = ahead.room("portal", &l, NOW);
    c.bench_function("store/issue_ticket_written_ahead", |b| {
        b.iter(|| rt.block_on(room.issue(l, NOW)).expect("issued"))
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn lottery(c: &mut Criterion) {
    let l = Lottery::new(b"seed", 1_000_000);
    let mut p = 0u64;
    c.bench_function("lottery/place_in_a_million", |b| {
        b.iter(|| {
            p = p % 1_000_000 + 1;
            l.place(p)
        })
    });
}

fn page(c: &mut Criterion) {
    let s = Status {
        room: "portal",
        state: "waiting",
        position: Some(4321),
        ahead: Some(4320),
        eta_seconds: Some(600),
        eta_low_seconds: Some(480),
        eta_high_seconds: Some(900),
        queue_length: 9000,
        prequeue: false,
        opens_at: None,
        opens_offset_s: 0,
        // 2026-12-01T08:00:00Z
        updated: 1_796_112_000_000,
        ticket: Some(12_345),
        paused: false,
        receipt: Some("portal-12345-20261201T075500Z-K7QX9M2A".into()),
        // 2026-12-01T07:55:00Z
        arrived: Some(1_796_111_700_000),
        lottery: None,
        missed_turn: false,
        claim_window_seconds: 60,
        unsent: false,
        no_cookie: false,
    };
    c.bench_function("page/render_waiting_page", |b| {
        b.iter(|| {
            render(
                Template::default_template(),
                black_box(&s),
                Language::It,
                "/apply",
            )
        })
    });
}

criterion_group!(benches, tokens, admission, store, lottery, page);
criterion_main!(benches);
