//! Property tests (proptest; cargo-fuzz needs a nightly toolchain): the
//! token verifier, the cookie reader, the config parser and the admission
//! state machine against generated input. Each run tries 256 cases per
//! property; for a long run: PROPTEST_CASES=100000 cargo test --test properties

use std::collections::BTreeSet;

use http::header::{HeaderMap, HeaderValue, COOKIE};
use proptest::prelude::*;
use varco::config::Config;
use varco::cookies;
use varco::room::admission::{AdmissionState, Claim, Issued, Limits, Mode};
use varco::room::token::{audience, Claims, Keyring, PassClaims, TicketClaims};

const NOW: u64 = 1_800_000_000_000;

fn keys() -> Keyring {
    // One fixed key per run is enough: the verifier is what is tested.
    static KEYS: std::sync::OnceLock<Keyring> = std::sync::OnceLock::new();
    KEYS.get_or_init(Keyring::ephemeral).clone()
}

/// `json` with one byte changed (edit 0), cut (1) or inserted (2) at `at`.
fn edited(json: &[u8], at: prop::sample::Index, byte: u8, edit: u8) -> Vec<u8> {
    let mut changed = json.to_vec();
    let i = at.index(changed.len());
    match edit {
        0 => changed[i] = byte,
        1 => {
            changed.remove(i);
        }
        _ => changed.insert(i, byte),
    }
    changed
}

/// The claims' own reader declines `json` or reads what serde_json reads.
fn reads_as_serde_does<T>(json: &[u8]) -> bool
where
    T: Claims + serde::de::DeserializeOwned + PartialEq,
{
    T::read_json(json).is_none_or(|own| serde_json::from_slice::<T>(json).ok() == Some(own))
}

proptest! {
    /// A ticket writes its own JSON on the hot path: whenever it does, the
    /// bytes are serde_json's, whatever its strings hold (quotes, escapes,
    /// control characters, any script); and the signed token verifies to
    /// the same claims.
    #[test]
    fn a_tickets_own_json_is_serde_jsons(
        room in "\\PC{0,30}|[a-z]{1,12}",
        url in "\\PC{0,60}|/[a-z/?=&]{0,40}|.{0,20}",
        lane in "|[a-z]{1,8}|\\PC{0,6}",
        n in any::<u64>(),
        pre in any::<u64>(),
        at in 0u64..4_102_444_800_000,
    ) {
        let mut t = TicketClaims::new(&room, n, pre, at, 60_000, &url);
        t.l = lane;
        let mut buf = [0u8; 1024];
        let expected = serde_json::to_vec(&t).unwrap();
        if let Some(len) = t.write_json(&mut buf) {
            prop_assert_eq!(&buf[..len], expected.as_slice());
        }
        let k = keys();
        let token = k.sign(&t);
        let back = k.verify::<TicketClaims>(&token, &audience("ticket", &room), at);
        prop_assert_eq!(back, Some(t));
    }

    /// A ticket reads its own JSON on the hot path too: what it writes it
    /// reads back, and on anything else (a byte changed, cut or inserted
    /// anywhere in a ticket's JSON, serde_json's escapes included) it
    /// either declines or reads what serde_json reads.
    #[test]
    fn a_tickets_own_reading_is_serde_jsons(
        room in "\\PC{0,30}|[a-z]{1,12}",
        url in "\\PC{0,40}|/[a-z/?=&]{0,40}",
        dg in "|[0-9a-f]{16}:[0-9]{1,3}",
        n in any::<u64>(),
        at in 0u64..4_102_444_800_000,
        at_byte in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"0123456789-.e\"\\,:{}[] \x01a\xc3\xa9".to_vec()),
        edit in 0..3u8,
    ) {
        let mut t = TicketClaims::new(&room, n, n / 2, at, 60_000, &url);
        t.dg = dg;
        let json = serde_json::to_vec(&t).unwrap();
        let mut buf = [0u8; 1024];
        if let Some(len) = t.write_json(&mut buf) {
            prop_assert_eq!(TicketClaims::read_json(&buf[..len]), Some(t.clone()));
        }
        let changed = edited(&json, at_byte, byte, edit);
        prop_assert!(reads_as_serde_does::<TicketClaims>(&json));
        prop_assert!(reads_as_serde_does::<TicketClaims>(&changed));
    }

    /// A pass is read by the same kind of reader on every admitted
    /// request: it reads serde_json's own output back whenever no string
    /// needed escaping, and on anything edited it declines or agrees with
    /// serde_json.
    #[test]
    fn a_passs_own_reading_is_serde_jsons(
        room in "\\PC{0,30}|[a-z]{1,12}",
        lane in "|[a-z]{1,8}|\\PC{0,6}",
        sid in any::<u128>(),
        n in any::<u64>(),
        at in 0u64..4_102_444_800_000,
        f in prop::option::of(any::<u64>()),
        re in 0u64..4,
        at_byte in any::<prop::sample::Index>(),
        byte in prop::sample::select(b"0123456789-.e\"\\,:{}[] \x01a\xc3\xa9".to_vec()),
        edit in 0..3u8,
    ) {
        let mut p = PassClaims::new(&room, sid, n, at, 600_000);
        p.f = f.unwrap_or(0);
        p.re = re;
        p.l = lane;
        let json = serde_json::to_vec(&p).unwrap();
        let plain = |s: &str| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
        if plain(&p.aud) && plain(&p.l) {
            prop_assert_eq!(PassClaims::read_json(&json), Some(p.clone()));
        }
        let changed = edited(&json, at_byte, byte, edit);
        prop_assert!(reads_as_serde_does::<PassClaims>(&json));
        prop_assert!(reads_as_serde_does::<PassClaims>(&changed));
    }

    /// Any string of any size up to the header limit: never a panic, never
    /// a pass or a ticket.
    #[test]
    fn garbage_never_verifies(s in "\\PC{0,200}|[A-Za-z0-9_.=-]{0,33000}") {
        let k = keys();
        prop_assert!(k.verify::<PassClaims>(&s, &audience("pass", "portal"), NOW).is_none());
        prop_assert!(k.verify::<TicketClaims>(&s, &audience("ticket", "portal"), NOW).is_none());
    }

    /// A signed pass with any one byte changed is refused, or (when the
    /// change decodes to the same bytes) says exactly what it said before:
    /// an edit never yields a different session, number or room.
    #[test]
    fn an_edited_pass_never_means_something_else(at in 0usize..400, byte in any::<u8>()) {
        let k = keys();
        let claims = PassClaims::new("portal", 0xfeed, 7, NOW, 600_000);
        let token = k.sign(&claims);
        let mut bytes = token.clone().into_bytes();
        let i = at % bytes.len();
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        let Ok(edited) = String::from_utf8(bytes) else { return Ok(()) };
        match k.verify::<PassClaims>(&edited, &audience("pass", "portal"), NOW) {
            None => {}
            Some(c) => prop_assert_eq!(c, claims),
        }
        // Never a pass for another room, nor a ticket.
        prop_assert!(k.verify::<PassClaims>(&edited, &audience("pass", "other"), NOW).is_none());
        prop_assert!(k.verify::<TicketClaims>(&edited, &audience("ticket", "portal"), NOW).is_none());
    }

    /// Any Cookie header: the reader never panics, and what it returns is
    /// a non-empty piece of that header, at most 4 KiB.
    #[test]
    fn the_cookie_reader_takes_only_what_is_there(raw in "[ -~]{0,600}", name in "[a-z_]{1,20}") {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&raw) {
            h.append(COOKIE, v);
        }
        // The first, and every one the gate tries.
        for v in cookies::get(&h, &name).into_iter().chain(cookies::each(&h, &name)) {
            prop_assert!(!v.is_empty() && v.len() <= 4096);
            prop_assert!(raw.contains(v));
        }
    }

    /// Any text as a config file: an error or a config, never a panic;
    /// an error names at least one key or the TOML problem.
    #[test]
    fn any_text_is_a_config_or_a_named_error(text in "\\PC{0,300}") {
        if let Err(e) = Config::from_toml(&text, std::path::Path::new(".")) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    /// Room tables built from real keys with wild values: never a panic,
    /// and every refusal names a `rooms.portal.` key or `secrets`.
    #[test]
    fn wild_room_values_are_refused_by_key(
        values in prop::collection::vec(
            (prop::sample::select(vec![
                "admission_per_minute", "max_active", "session_idle", "claim_window",
                "ticket_ttl", "mode", "opens_at", "language", "paths", "hosts",
            ]),
            prop::sample::select(vec![
                "0", "-1", "1e309", "600", "\"5m\"", "\"0s\"", "\"forever\"", "\"queue\"",
                "\"nonsense\"", "[\"/\"]", "[\"no-slash\"]", "true", "\"2026-12-01T09:00:00+01:00\"",
                "\"it\"", "\"xx\"", "[\"*\"]", "[]",
            ])),
            0..6,
        )
    ) {
        let mut seen = BTreeSet::new();
        let mut toml = String::from(
            "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:1\"]\n",
        );
        for (k, v) in values {
            if seen.insert(k) {
                toml.push_str(&format!("{k} = {v}\n"));
            }
        }
        if let Err(e) = Config::from_toml(&toml, std::path::Path::new(".")) {
            let text = e.to_string();
            prop_assert!(
                text.contains("rooms.portal") || text.contains("secrets") || text.contains("TOML"),
                "{}", text
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Arrive,
    Direct,
    Tick,
    Claim(usize),
    Leave(usize),
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Arrive),
        2 => Just(Op::Direct),
        3 => Just(Op::Tick),
        4 => any::<usize>().prop_map(Op::Claim),
        2 => any::<usize>().prop_map(Op::Leave),
        1 => (1u64..120_000).prop_map(Op::Wait),
    ]
}

proptest! {
    /// The admission rules under any sequence of arrivals, direct
    /// admissions, ticks, claims, departures and pauses in time:
    /// - never more live sessions plus reserved slots than max_active;
    /// - the serving counter never passes the queue counter, never goes back;
    /// - a number is admitted at most once, only once called, and never
    ///   after it lapsed;
    /// - no 60 s window admits more than the rate plus one tick's worth.
    #[test]
    fn admission_keeps_its_promises(
        max_active in prop::option::of(1u64..20),
        per_minute in prop::option::of(1.0f64..600.0),
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let limits = Limits {
            per_minute,
            max_active,
            claim_window_ms: 30_000,
            tick_ms: 1_000,
            opens_at_ms: None,
            mode: Mode::Queue,
            ticket_ttl_ms: 86_400_000,
            session_idle_ms: 300_000,
        };
        let mut now = NOW;
        let mut s = AdmissionState::new(&limits, now);
        let mut tickets: Vec<u64> = Vec::new();
        let mut active: Vec<u64> = Vec::new();
        let mut admitted = BTreeSet::new();
        let mut expired = BTreeSet::new();
        // (time, admissions so far) at every admission.
        let mut log: Vec<(u64, u64)> = Vec::new();
        let mut serving = 0;
        for op in ops {
            match op {
                Op::Arrive => match s.issue(&limits, now) {
                    Issued::Number(n) => tickets.push(n),
                    other => prop_assert!(false, "no opening, yet {:?}", other),
                },
                Op::Direct => {
                    if let Some(n) = s.admit_directly(&limits, active.len() as u64, now) {
                        prop_assert!(admitted.insert(n), "{} admitted twice", n);
                        active.push(n);
                        log.push((now, admitted.len() as u64));
                    }
                }
                Op::Tick => {
                    now += limits.tick_ms;
                    s.tick(&limits, active.len() as u64, now);
                }
                Op::Claim(i) if !tickets.is_empty() => {
                    let n = tickets[i % tickets.len()];
                    match s.claim(n, &limits, now) {
                        Claim::Admitted => {
                            prop_assert!(n <= s.serving, "{} admitted before being called", n);
                            prop_assert!(!expired.contains(&n), "{} admitted after it lapsed", n);
                            prop_assert!(admitted.insert(n), "{} admitted twice", n);
                            active.push(n);
                            log.push((now, admitted.len() as u64));
                        }
                        Claim::AlreadyClaimed => prop_assert!(admitted.contains(&n)),
                        Claim::NotYet { position } => prop_assert_eq!(position, n - s.serving),
                        // Lapsed (or used and its window long gone): it
                        // admits nobody, ever again.
                        Claim::Expired => {
                            expired.insert(n);
                        }
                        // The state is one run: only a store tells runs
                        // apart.
                        Claim::OtherRun => prop_assert!(false, "{} of another run", n),
                    }
                }
                Op::Leave(i) if !active.is_empty() => {
                    active.swap_remove(i % active.len());
                }
                Op::Wait(ms) => now += ms,
                _ => {}
            }
            prop_assert!(s.serving <= s.queue);
            prop_assert!(s.serving >= serving, "the serving counter went back");
            serving = s.serving;
            if let Some(max) = max_active {
                prop_assert!(
                    active.len() as u64 + s.reserved() <= max,
                    "{} live + {} reserved > max_active {}", active.len(), s.reserved(), max
                );
            }
        }
        if let Some(rate) = per_minute {
            let allowance = (rate + (rate * limits.tick_ms as f64 / 60_000.0).max(1.0)).ceil() as u64;
            for (i, (t0, c0)) in log.iter().enumerate() {
                let in_window = log[i..]
                    .iter()
                    .take_while(|(t, _)| *t < t0 + 60_000)
                    .last()
                    .map(|(_, c)| c - c0 + 1)
                    .unwrap_or(1);
                prop_assert!(
                    in_window <= allowance,
                    "{} admitted within 60 s at {}/min", in_window, rate
                );
            }
        }
    }
}
