//! The waiting room end to end: real varco, real upstream, citizens with
//! their own cookies, and a clock the test moves (no real minutes pass).

mod common;

use common::gated::{gated_config, Citizen, Gated, T0};
use common::upstream;
use varco::body;

const MIN: u64 = 60_000;

#[tokio::test]
async fn admits_up_to_max_active_then_queues_in_arrival_order() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 3")).await;
    let mut people: Vec<Citizen> = (0..8).map(|_| g.citizen()).collect();
    for (i, c) in people.iter_mut().enumerate() {
        let got = c.get("/home").await;
        if i < 3 {
            assert!(
                got.reached_upstream(),
                "citizen {i} admitted directly: {}",
                got.text()
            );
            assert!(c.cookie("varco_pass_portal").is_some());
        } else {
            assert!(got.is_waiting_page(), "citizen {i} waits");
            assert_eq!(
                got.headers["cache-control"],
                "no-store, private, no-transform"
            );
            assert!(c.cookie("varco_ticket_portal").is_some());
        }
    }
    for (i, c) in people.iter_mut().enumerate().skip(3) {
        let s = c.status("portal").await;
        assert_eq!(s["state"], "waiting");
        assert_eq!(s["position"], (i - 2) as u64, "{s}");
        assert_eq!(s["ahead"], (i - 3) as u64);
        assert_eq!(s["queue_length"], 5);
    }
    // Admitted people keep going without touching the queue.
    for c in people.iter_mut().take(3) {
        assert!(c.get("/apply").await.reached_upstream());
    }
    assert_eq!(up.hits(), 6);
}

/// Another site's page showing the portal's image (or framing it, or
/// fetching from it) keeps no SameSite=Lax cookie: it gets neither a
/// session, which would hold a place for `session_idle`, nor a ticket,
/// which would hold one in line for nobody. A link from another site,
/// followed, is a navigation and comes in.
#[tokio::test]
async fn another_sites_page_takes_no_place_of_the_room() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let from_another_site = |mode: &'static str, dest: &'static str| {
        [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", mode),
            ("sec-fetch-dest", dest),
        ]
    };
    for (mode, dest) in [
        ("no-cors", "image"),
        ("navigate", "iframe"),
        ("cors", "empty"),
    ] {
        let mut hotlink = g.citizen();
        let got = hotlink
            .request(
                "GET",
                "/logo.png",
                body::empty(),
                &from_another_site(mode, dest),
            )
            .await;
        assert_eq!(got.status, 403, "{mode} {dest}: {}", got.text());
        assert!(got.headers.get("set-cookie").is_none(), "{mode} {dest}");
    }
    // A search page's prefetch of a link: not followed yet, maybe never.
    let mut prefetch = g.citizen();
    let mut headers = from_another_site("navigate", "document").to_vec();
    headers.push(("sec-purpose", "prefetch"));
    let got = prefetch
        .request("GET", "/apply", body::empty(), &headers)
        .await;
    assert_eq!(got.status, 403, "a prefetch: {}", got.text());
    assert_eq!(up.hits(), 0);
    let mut linked = g.citizen();
    let got = linked
        .request(
            "GET",
            "/apply",
            body::empty(),
            &from_another_site("navigate", "document"),
        )
        .await;
    assert!(
        got.reached_upstream(),
        "the one place was free: {}",
        got.text()
    );
    let rejected = common::client::metric(
        g.admin,
        "varco_rejected_total",
        "reason=\"cross_site\",room=\"portal\"",
    )
    .await;
    assert_eq!(rejected, Some(4.0));
    // SameSite=None is written under HTTPS only: over plain HTTP the
    // cookies are Lax, and a hot-linked image would keep none.
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\ncookie_same_site = \"none\"",
    ))
    .await;
    let got = g
        .citizen()
        .request(
            "GET",
            "/logo.png",
            body::empty(),
            &from_another_site("no-cors", "image"),
        )
        .await;
    assert_eq!(got.status, 403, "{}", got.text());
}

/// A form another site's page posts comes without the person's
/// SameSite=Lax cookies (browsers send none with a cross-site POST), yet
/// a cookie its answer sets is kept: a new ticket there replaced the
/// person's own, and sent them to the back of the line. It is a 303 to
/// the room's page now, which a GET reaches with the cookies.
#[tokio::test]
async fn a_form_posted_from_another_site_keeps_the_persons_place() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut inside = g.citizen();
    assert!(inside.get("/home").await.reached_upstream());
    let mut waiting = g.citizen();
    assert!(waiting.get("/home").await.is_waiting_page());
    // Their browser posts a form from another site: none of its cookies go.
    let mut posting = g.citizen();
    let got = posting
        .request(
            "POST",
            "/apply",
            body::full("iban=IT00"),
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
        )
        .await;
    assert_eq!(got.status, 303, "{}", got.text());
    assert_eq!(got.headers["location"], "/");
    assert!(got.headers.get("set-cookie").is_none(), "{:?}", got.headers);
    assert_eq!(
        got.headers["cache-control"],
        "no-store, private, no-transform"
    );
    // The GET it leads to, with the cookies: the same place (the ticket
    // remembers the new page).
    let page = waiting.get("/").await;
    assert!(page.is_waiting_page(), "{}", page.text());
    let s = waiting.status("portal").await;
    assert_eq!(
        (s["position"].as_u64(), s["queue_length"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    // The same form from the portal's own page waits for its turn, with a ticket.
    let got = posting
        .request(
            "POST",
            "/apply",
            body::full("iban=IT00"),
            &[("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert!(posting.cookie("varco_ticket_portal").is_some());
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn sessions_expire_and_the_queue_moves_in_order() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 2\nsession_idle = \"5m\"",
    ))
    .await;
    let mut first: Vec<Citizen> = (0..2).map(|_| g.citizen()).collect();
    for c in first.iter_mut() {
        assert!(c.get("/").await.reached_upstream());
    }
    let mut waiting: Vec<Citizen> = (0..4).map(|_| g.citizen()).collect();
    for c in waiting.iter_mut() {
        assert!(c.get("/").await.is_waiting_page());
    }
    // One of the first two keeps working; the other goes idle.
    g.advance(4 * MIN).await;
    assert!(first[0].get("/more").await.reached_upstream());
    g.advance(2 * MIN).await; // 6 min: the idle one expired
    let s = waiting[0].status("portal").await;
    assert_eq!(s["state"], "admitted", "the first in line is called: {s}");
    assert_eq!(waiting[1].status("portal").await["state"], "waiting");
    let got = waiting[0].get("/").await;
    assert!(got.reached_upstream(), "{}", got.text());
    assert!(
        waiting[0].cookie("varco_ticket_portal").is_none(),
        "ticket spent"
    );
    // The expired pass no longer works: its holder is back in line.
    assert!(first[1].get("/").await.is_waiting_page());
    // The active one times out too; next in order is number 2 in line.
    g.advance(6 * MIN).await;
    assert_eq!(waiting[1].status("portal").await["state"], "admitted");
    assert_eq!(waiting[2].status("portal").await["state"], "admitted");
    assert_eq!(waiting[3].status("portal").await["state"], "waiting");
}

#[tokio::test]
async fn rate_limits_new_sessions_per_minute_in_order() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "admission_per_minute = 6")).await;
    let mut people: Vec<Citizen> = (0..40).map(|_| g.citizen()).collect();
    let mut admitted_at: Vec<Option<u64>> = vec![None; people.len()];
    for c in people.iter_mut() {
        c.get("/").await;
    }
    for minute in 0..6u64 {
        for _ in 0..60 {
            g.advance(1000).await;
            for (i, c) in people.iter_mut().enumerate() {
                if admitted_at[i].is_none() && c.status("portal").await["state"] == "admitted" {
                    assert!(c.get("/").await.reached_upstream());
                    admitted_at[i] = Some(minute);
                }
            }
        }
    }
    let per_minute: Vec<usize> = (0..6)
        .map(|m| admitted_at.iter().filter(|a| **a == Some(m)).count())
        .collect();
    // One direct admission at the start, then 6 a minute, one tick's
    // worth (here 1) of tolerance.
    assert!(per_minute.iter().all(|&n| n <= 7), "{per_minute:?}");
    assert!(per_minute.iter().skip(1).all(|&n| n >= 5), "{per_minute:?}");
    // FIFO: whoever came earlier was admitted no later.
    let order: Vec<u64> = admitted_at.iter().map(|a| a.unwrap_or(u64::MAX)).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
}

/// A missed turn is counted once, when its holder is back in: the
/// requests refused meanwhile with the lapsed ticket (here the page's
/// images, which take no place) each counted one more.
#[tokio::test]
async fn a_missed_turn_is_counted_once_whatever_was_refused_before() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nclaim_window = \"15s\"\nsession_idle = \"1m\"",
    ))
    .await;
    assert!(g.citizen().get("/").await.reached_upstream());
    let mut leaver = g.citizen();
    assert!(leaver.get("/").await.is_waiting_page());
    g.advance(61_000).await;
    assert_eq!(leaver.status("portal").await["state"], "admitted");
    // Two more behind: one called next, one still waiting, so nobody is
    // let in straight away.
    for _ in 0..2 {
        assert!(g.citizen().get("/").await.is_waiting_page());
    }
    g.advance(16_000).await;
    assert_eq!(leaver.status("portal").await["state"], "none");
    for _ in 0..3 {
        let got = leaver
            .request(
                "GET",
                "/logo.png",
                body::empty(),
                &[("sec-fetch-dest", "image")],
            )
            .await;
        assert_eq!(got.status, 503);
    }
    let missed = || common::client::metric(g.admin, "varco_missed_turns_total", "room=\"portal\"");
    assert_eq!(missed().await, Some(0.0));
    assert!(leaver.get("/").await.is_waiting_page());
    assert_eq!(missed().await, Some(1.0));
}

#[tokio::test]
async fn an_abandoned_eligible_ticket_gives_its_slot_back() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nclaim_window = \"60s\"\nsession_idle = \"1m\"",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut leaver = g.citizen();
    let mut stayer = g.citizen();
    assert!(leaver.get("/").await.is_waiting_page());
    assert!(stayer.get("/").await.is_waiting_page());
    g.advance(61_000).await; // a's session ends; the leaver is called
    assert_eq!(leaver.status("portal").await["state"], "admitted");
    assert_eq!(stayer.status("portal").await["state"], "waiting");
    // The leaver never comes back: after the claim window the slot moves on.
    g.advance(30_000).await;
    assert_eq!(
        stayer.status("portal").await["state"],
        "waiting",
        "slot still reserved"
    );
    g.advance(31_000).await;
    assert_eq!(stayer.status("portal").await["state"], "admitted");
    // The leaver's turn is gone: its status says so, not "admitted".
    let s = leaver.status("portal").await;
    assert_eq!(s["state"], "none", "{s}");
    assert_eq!(s["position"], serde_json::Value::Null, "{s}");
    assert!(stayer.get("/").await.reached_upstream());
    // Too late: the leaver's ticket no longer admits; a new ticket does,
    // and the page says why the place is later than the one held.
    let before = leaver.cookie("varco_ticket_portal").unwrap().to_string();
    let got = leaver
        .request("GET", "/", body::empty(), &[("accept-language", "en")])
        .await;
    assert!(got.is_waiting_page());
    assert_ne!(leaver.cookie("varco_ticket_portal").unwrap(), before);
    let page = got.text();
    assert!(
        page.contains(
            "Your turn came, but nobody came back to this page to go in within 60 seconds"
        ),
        "{page}"
    );
    assert_eq!(
        common::client::metric(g.admin, "varco_missed_turns_total", "room=\"portal\"").await,
        Some(1.0)
    );
    // Only that once: the new ticket's page is the usual one.
    let got = leaver.get("/").await;
    assert!(
        !got.text().contains("Il tuo turno era arrivato"),
        "{}",
        got.text()
    );
    assert!(got.text().contains("Tieni aperta questa pagina"));
    // An API client is told in the JSON.
    let mut api = g.citizen();
    api.get("/").await;
    let s = api.status("portal").await;
    assert!(s.get("missed_turn").is_none(), "absent unless true: {s}");
    let mut behind = g.citizen();
    assert!(behind.get("/").await.is_waiting_page());
    g.advance(61_000).await; // stayer's session ends; the leaver's new turn
    g.advance(61_000).await; // it lapses too; api's turn
    assert_eq!(api.status("portal").await["state"], "admitted");
    g.advance(61_000).await; // and api's lapses
    assert_eq!(api.status("portal").await["state"], "none");
    let got = api.get_json("/").await;
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["missed_turn"], true, "{}", got.text());
}

#[tokio::test]
async fn a_ticket_admits_only_once() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    ))
    .await;
    let mut a = g.citizen();
    a.get("/").await;
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let ticket = b.cookie("varco_ticket_portal").unwrap().to_string();
    g.advance(61_000).await;
    assert!(b.get("/").await.reached_upstream());
    // Someone replays b's ticket (copied before admission).
    let mut replay = g.citizen();
    replay.jar.insert("varco_ticket_portal".into(), ticket);
    let got = replay.get("/").await;
    assert!(got.is_waiting_page(), "replayed ticket must not admit");
    assert_eq!(up.hits(), 2);
}

/// A claim whose answer never reaches the person (they give up on a slow
/// portal and reload; the connection drops) does not cost their place:
/// the same ticket fetches the same session's pass again, rather than a
/// new ticket at the back while the session made for them holds the slot
/// for nobody. Once an answer with the pass has gone out, the ticket
/// admits nobody any more.
#[tokio::test]
async fn a_claim_whose_answer_is_lost_does_not_lose_the_place() {
    lost_claim(0).await;
}

/// The same after the turn's claim window has passed (the portal took
/// its time, the person came back later): not a missed turn.
#[tokio::test]
async fn a_lost_claim_is_kept_past_the_claim_window() {
    lost_claim(61_000).await;
}

/// The same in a room closed since, past the claim window: the turn was
/// claimed before the close, and its pass is the person's, as a pass that
/// reached them would be.
#[tokio::test]
async fn a_lost_claim_is_kept_in_a_room_closed_since() {
    lost_claim_in(61_000, true).await;
}

async fn lost_claim(later_ms: u64) {
    lost_claim_in(later_ms, false).await;
}

/// A claim whose connection is dropped while the portal thinks; the
/// person comes back `later_ms` and a tick after (the room closed
/// meanwhile, if `closed`).
async fn lost_claim_in(later_ms: u64, closed: bool) {
    use tokio::io::AsyncWriteExt;
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"5m\"\nclaim_window = \"60s\"",
    ))
    .await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    assert_eq!(holder.get("/release").await.status, 200);
    g.advance(1_000).await;
    assert_eq!(b.status("portal").await["state"], "admitted");
    let ticket = b.cookie("varco_ticket_portal").unwrap().to_string();

    // The claim goes to a portal that takes its time; b gives up on it.
    let mut tcp = tokio::net::TcpStream::connect(g.addr).await.unwrap();
    let claim = format!(
        "GET /slow?ms=30000 HTTP/1.1\r\nhost: localhost\r\ncookie: varco_ticket_portal={ticket}\r\n\r\n"
    );
    tcp.write_all(claim.as_bytes()).await.unwrap();
    let forwarding = async |n: f64| {
        common::client::metric(g.admin, "varco_upstream_in_flight", "room=\"portal\"").await
            == Some(n)
    };
    let wait = std::time::Duration::from_secs(10);
    common::client::until("the claim at the portal", wait, async || {
        forwarding(1.0).await
    })
    .await;
    drop(tcp);
    // varco sees the person gone and drops the request: no answer left
    // to deliver the pass.
    common::client::until("the claim dropped", wait, async || forwarding(0.0).await).await;
    if closed {
        let room = g.app.room("portal").unwrap();
        room.change_live(varco::store::LiveChange::Mode(
            varco::room::admission::Mode::Closed,
        ))
        .await
        .unwrap();
    }
    // A tick too: the turn's claim window is seen to pass.
    g.advance(later_ms).await;

    // The page's poll says what a reload does: "closed" or "none" (a
    // turn missed) would stop a program, or show a page its end.
    assert_eq!(b.status("portal").await["state"], "admitted");
    let got = b.get("/").await;
    assert!(got.reached_upstream(), "sent to the back: {}", got.status);
    assert!(b.cookie("varco_pass_portal").is_some());
    assert_eq!(
        g.app.room("portal").unwrap().view().active,
        1,
        "the same session, not a second one"
    );
    // The pass reached b: a copy of the ticket admits nobody.
    let mut replay = g.citizen();
    replay.jar.insert("varco_ticket_portal".into(), ticket);
    let got = replay.get("/").await;
    if closed {
        assert_eq!(got.status, 503, "the closed page");
    } else {
        assert!(got.is_waiting_page());
    }
}

#[tokio::test]
async fn bad_tokens_never_admit_and_never_error() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let pass = holder.cookie("varco_pass_portal").unwrap().to_string();
    let mut parts: Vec<&str> = pass.split('.').collect();
    let garbage = "x".repeat(3000);
    let none_alg = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
    let flipped_sig = format!("{}.{}.{}", parts[0], parts[1], "AAAA".repeat(10));
    parts[1] = "eyJpc3MiOiJ2YXJjbyJ9";
    let edited = parts.join(".");
    for (name, value) in [
        ("varco_pass_portal", garbage.as_str()),
        ("varco_pass_portal", none_alg.as_str()),
        ("varco_pass_portal", flipped_sig.as_str()),
        ("varco_pass_portal", edited.as_str()),
        ("varco_ticket_portal", garbage.as_str()),
        ("varco_ticket_portal", "a.b.c"),
        ("varco_ticket_portal", ""),
    ] {
        let mut forger = g.citizen();
        forger.jar.insert(name.into(), value.into());
        let got = forger.get("/").await;
        assert!(got.status < 500, "{name}={value:.30}: {}", got.status);
        assert!(!got.reached_upstream(), "{name}={value:.30} admitted");
    }
    // Garbage of every size up to past the header limit (32 KiB): a page
    // or a 431, never a pass and never a 5xx.
    for size in [1, 100, 1000, 4095, 4097, 8000, 16_000, 32_000, 40_000] {
        for name in ["varco_pass_portal", "varco_ticket_portal"] {
            let mut forger = g.citizen();
            forger.jar.insert(
                name.into(),
                "A.b-_".repeat(size / 5 + 1)[..size].to_string(),
            );
            let got = forger.get("/").await;
            assert!(got.status < 500, "{name} of {size} bytes: {}", got.status);
            assert!(!got.reached_upstream(), "{name} of {size} bytes admitted");
        }
    }
    assert_eq!(up.hits(), 1);
}

/// A cookie of the same name sent first (one a sibling subdomain set for
/// the parent domain on a longer path, a stale one) does not hide the
/// person's own: the first that verifies counts, for the pass and the
/// ticket, at the gate and at the status endpoint.
#[tokio::test]
async fn a_junk_cookie_of_the_same_name_does_not_hide_the_real_one() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let pass = holder.cookie("varco_pass_portal").unwrap().to_string();
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    let ticket = waiting.cookie("varco_ticket_portal").unwrap().to_string();

    let shadowed = |name: &str, value: &str| format!("{name}=junk.junk.junk; {name}={value}");
    let mut fresh = Citizen::new(g.addr);
    let cookie = shadowed("varco_pass_portal", &pass);
    let got = fresh
        .request("GET", "/", body::empty(), &[("cookie", &cookie)])
        .await;
    assert!(
        got.reached_upstream(),
        "the pass behind the junk: {}",
        got.status
    );

    let cookie = shadowed("varco_ticket_portal", &ticket);
    let mut fresh = Citizen::new(g.addr);
    let got = fresh
        .request("GET", "/", body::empty(), &[("cookie", &cookie)])
        .await;
    assert!(got.is_waiting_page());
    assert!(
        got.text().contains("id=\"position\">1<"),
        "still first in line, not a new ticket at the back"
    );
    let mut fresh = Citizen::new(g.addr);
    let got = fresh
        .request(
            "GET",
            "/.varco/status?room=portal",
            body::empty(),
            &[("cookie", &cookie), ("accept", "application/json")],
        )
        .await;
    assert_eq!(got.json()["position"], 1, "{}", got.text());
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn api_clients_get_json_with_429_and_retry_after() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    g.citizen().get("/").await;
    let mut api = g.citizen();
    let got = api.get_json("/api/x").await;
    assert_eq!(got.status, 429);
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let j = got.json();
    for k in [
        "room",
        "state",
        "position",
        "ahead",
        "eta_seconds",
        "queue_length",
    ] {
        assert!(j.get(k).is_some(), "{k} missing: {j}");
    }
    assert_eq!(j["state"], "waiting");
    assert_eq!(j["position"], 1);
}

#[tokio::test]
async fn a_post_without_a_pass_never_reaches_the_upstream() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 5")).await;
    let mut bot = g.citizen();
    let got = bot.post_form(&[("accept-language", "en")]).await;
    assert!(!got.reached_upstream());
    assert!(got.is_page_for_an_unsent_form(), "{}", got.text());
    // A person's form, met by the waiting page (their session lapsed
    // while they filled it in), is said not to have been sent.
    assert!(
        got.text().contains("The form you sent was NOT received."),
        "{}",
        got.text()
    );
    let again = bot
        .request("GET", "/apply", body::empty(), &[("accept-language", "en")])
        .await;
    assert!(
        again.text().contains("Keep this page open"),
        "{}",
        again.text()
    );
    assert!(!again.text().contains("NOT received"));
    assert_eq!(up.hits(), 0);
    // The POST took a ticket, so it holds a place; once it is called, a
    // newcomer finds nobody waiting and enters, and a POST with a pass
    // goes through.
    g.advance(1000).await;
    let mut person = g.citizen();
    assert!(person.get("/apply").await.reached_upstream());
    let got = person.post_form(&[]).await;
    assert!(got.reached_upstream());
    assert_eq!(got.json()["body"], "iban=IT00");
}

/// An API client whose turn comes while it POSTs: the body is still not
/// forwarded on a ticket, but the turn is claimed and the answer carries
/// the pass, so the POST sent again goes through. A turn left to lapse
/// is told as such, with a new place, not "admitted" for ever.
#[tokio::test]
async fn a_post_at_its_turn_takes_the_pass_for_the_next_try() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"60s\"",
    ))
    .await;
    let mut first = g.citizen();
    assert!(first.get("/").await.reached_upstream());
    let json = [("accept", "application/json")];
    let (mut api, mut late) = (g.citizen(), g.citizen());
    for c in [&mut api, &mut late] {
        let got = c.request("GET", "/apply", body::empty(), &json).await;
        assert_eq!(got.json()["state"], "waiting", "{}", got.text());
    }
    g.advance(61_000).await; // first's session ends; api's turn
    let got = post_json(&mut api).await;
    assert!(!got.reached_upstream(), "no body forwarded on a ticket");
    assert_eq!(got.status, 429);
    assert_eq!(got.json()["state"], "admitted", "{}", got.text());
    assert!(api.cookie("varco_pass_portal").is_some(), "the pass came");
    assert!(api.cookie("varco_ticket_portal").is_none(), "ticket spent");
    let got = post_json(&mut api).await;
    assert!(got.reached_upstream(), "{}", got.text());
    assert_eq!(got.json()["body"], "iban=IT00");
    assert_eq!(up.hits(), 2);

    g.advance(61_000).await; // api's session ends; late's turn
    assert_eq!(late.status("portal").await["state"], "admitted");
    g.advance(61_000).await; // and it lapses unclaimed
    let got = post_json(&mut late).await;
    assert_eq!(got.status, 429);
    let j = got.json();
    assert_eq!(j["state"], "waiting", "{j}");
    assert_eq!(j["missed_turn"], true, "{j}");
    assert!(late.cookie("varco_pass_portal").is_none());
    assert_eq!(up.hits(), 2);
}

/// A portal page's script posts a form in the background after the
/// person's session lapsed (`fetch()` sends `Accept: */*`): the answer
/// must not be a 200, which the script would take for "sent".
#[tokio::test]
async fn a_post_from_a_page_script_without_a_pass_is_not_answered_as_a_success() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    let scripts: [&[(&str, &str)]; 2] = [
        &[
            ("accept", "*/*"),
            ("sec-fetch-dest", "empty"),
            ("sec-fetch-mode", "cors"),
        ],
        &[("accept", "*/*"), ("x-requested-with", "XMLHttpRequest")],
    ];
    for headers in scripts {
        let mut c = g.citizen();
        let got = c.post_form(headers).await;
        assert!(!got.reached_upstream());
        assert_eq!(got.status, 429, "{headers:?}: {}", got.text());
        assert_eq!(got.json()["state"], "waiting");
        assert!(got.headers.contains_key("retry-after"));
    }
    // A program that names no JSON and sends no `Sec-Fetch-*` (a
    // server-side integration, an older browser's script) cannot be told
    // from a person: it gets the page, as a 429 all the same.
    let mut program = g.citizen();
    let got = program.post_form(&[("accept", "*/*")]).await;
    assert!(got.is_page_for_an_unsent_form(), "{}", got.status);
    // JSON by another name (RFC 6839) is JSON.
    let mut program = g.citizen();
    let got = program
        .post_form(&[("accept", "application/vnd.api+json")])
        .await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert_eq!(got.json()["state"], "waiting");
    // The same form posted by the browser itself gets the page.
    let mut person = g.citizen();
    let got = person
        .post_form(&[("accept", "*/*"), ("sec-fetch-dest", "document")])
        .await;
    assert!(got.is_page_for_an_unsent_form(), "{}", got.status);
    assert_eq!(up.hits(), 1);
}

/// A page's script asks for data in the background and is the first to
/// meet the gate: the ticket it takes remembers the page the person is
/// on (its Referer), not the data's address, where admission would land
/// them on raw JSON.
#[tokio::test]
async fn a_scripts_request_is_not_where_admission_lands() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    let mut c = g.citizen();
    let form = format!("http://{}/apply/form", g.addr);
    let got = c
        .request(
            "GET",
            "/api/profile",
            body::empty(),
            &[("sec-fetch-dest", "empty"), ("referer", form.as_str())],
        )
        .await;
    assert_eq!(got.status, 429, "{}", got.text());
    assert!(c.cookie("varco_ticket_portal").is_some(), "a place taken");
    let got = c.post_form(&[]).await;
    assert!(
        got.text().contains("data-next=\"/apply/form\""),
        "{}",
        got.text()
    );
}

async fn post_json(c: &mut Citizen) -> common::client::Got {
    let json = [("accept", "application/json")];
    c.post_form(&json).await
}

/// A form posted after the session lapsed: the POST is not replayed, so
/// admission lands on the page the form was on (its Referer), or else on
/// the room's own path, never on `/`, which may be another room's.
#[tokio::test]
async fn a_post_without_a_pass_lands_back_in_its_room() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "paths = [\"/bonus\"]\nmax_active = 1",
    ))
    .await;
    assert!(g.citizen().get("/bonus").await.reached_upstream());
    // The page's landing (data-next) for a POST with this Referer.
    let landing = |referer: Option<String>| {
        let mut c = g.citizen();
        async move {
            let headers: Vec<(&str, &str)> =
                referer.iter().map(|r| ("referer", r.as_str())).collect();
            let got = c
                .request("POST", "/bonus/submit", body::full("iban=IT00"), &headers)
                .await;
            assert!(got.is_page_for_an_unsent_form(), "{}", got.text());
            let text = got.text();
            let next = text.split("data-next=\"").nth(1).expect("data-next");
            next.split('"').next().unwrap().to_string()
        }
    };
    let form = format!("http://{}/bonus/form?step=2", g.addr);
    assert_eq!(landing(Some(form)).await, "/bonus/form?step=2");
    // The same host without the port the request's Host carries.
    let bare = "http://127.0.0.1/bonus/form".to_string();
    assert_eq!(landing(Some(bare)).await, "/bonus/form");
    assert_eq!(landing(None).await, "/bonus");
    // A Referer outside the room or from another site, or one varco
    // would not route as written, is not a landing.
    let outside = format!("http://{}/other", g.addr);
    assert_eq!(landing(Some(outside)).await, "/bonus");
    let elsewhere = "http://elsewhere.example/bonus/form".to_string();
    assert_eq!(landing(Some(elsewhere)).await, "/bonus");
    let dotted = format!("http://{}/bonus/../other", g.addr);
    assert_eq!(landing(Some(dotted)).await, "/bonus");
}

/// With `paths_ignore_case`, a page of the room spelled in capitals is
/// the room's own: the person lands back on it.
#[tokio::test]
async fn a_post_lands_back_on_its_page_in_any_case_where_case_is_ignored() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "paths = [\"/bonus\"]\npaths_ignore_case = true\nmax_active = 1",
    ))
    .await;
    assert!(g.citizen().get("/bonus").await.reached_upstream());
    let mut c = g.citizen();
    let form = format!("http://{}/BONUS/Form?step=2", g.addr);
    let got = c
        .request(
            "POST",
            "/Bonus/submit",
            body::full("iban=IT00"),
            &[("referer", form.as_str())],
        )
        .await;
    assert!(got.is_page_for_an_unsent_form(), "{}", got.text());
    assert!(
        got.text().contains("data-next=\"/BONUS/Form?step=2\""),
        "{}",
        got.text()
    );
}

#[tokio::test]
async fn the_waiting_page_lands_where_the_person_was_going() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    ))
    .await;
    g.citizen().get("/").await;
    let mut c = g.citizen();
    let got = c.get("/apply?step=2").await;
    assert!(
        got.text().contains("data-next=\"/apply?step=2\""),
        "{}",
        got.text()
    );
    assert!(
        got.text().contains("url=/apply?step=2"),
        "meta refresh without JavaScript"
    );
    // The icon the browser fetches for the page is not where the person
    // was going: a form posted later still lands on the page.
    let icon = c
        .request(
            "GET",
            "/favicon.ico",
            body::empty(),
            &[
                ("accept", "image/avif,image/webp,*/*"),
                ("sec-fetch-dest", "image"),
            ],
        )
        .await;
    assert_eq!(icon.status, 429, "no page for an image: JSON, not served");
    let got = c.post_form(&[]).await;
    assert!(
        got.text().contains("data-next=\"/apply?step=2\""),
        "{}",
        got.text()
    );
    g.advance(61_000).await;
    let got = c.get("/apply?step=2").await;
    assert_eq!(got.json()["uri"], "/apply?step=2");
}

#[tokio::test]
async fn the_portal_releases_a_session_and_the_next_gets_in_at_once() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let got = a.get("/release").await;
    assert_eq!(got.status, 200);
    assert!(
        got.headers.get("x-varco-release").is_none(),
        "header stripped"
    );
    assert!(a.cookie("varco_pass_portal").is_none(), "pass cleared");
    // No clock movement: the release itself ticked.
    assert_eq!(b.status("portal").await["state"], "admitted");
    assert!(b.get("/").await.reached_upstream());
}

/// What a page shows or runs (the browser says so in `Sec-Fetch-Dest`),
/// holding no place while people wait, takes none: a page's assets
/// loaded in parallel after its ticket lapsed, or an exempt page's, each
/// took a number, and the browser kept one cookie; the rest were places
/// nobody held. The page itself takes the place; a script's own request
/// (`a_scripts_request_is_not_where_admission_lands`) and an API client,
/// which says nothing of it, as ever.
#[tokio::test]
async fn what_a_page_loads_takes_no_place_in_line() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    for dest in ["image", "script", "style"] {
        let got = b
            .request(
                "GET",
                "/logo.png",
                varco::body::empty(),
                &[("sec-fetch-dest", dest)],
            )
            .await;
        assert_eq!(got.status, 503, "{dest}: {}", got.text());
        assert!(got.headers.contains_key("retry-after"));
        assert!(got.headers.get("set-cookie").is_none(), "{dest}: no ticket");
    }
    assert_eq!(
        b.status("portal").await["queue_length"],
        0,
        "no place taken"
    );
    assert_eq!(
        common::client::metric(g.admin, "varco_rejected_total", "reason=\"not_a_page\"").await,
        Some(3.0)
    );
    let got = b
        .request(
            "GET",
            "/",
            varco::body::empty(),
            &[("sec-fetch-dest", "document")],
        )
        .await;
    assert!(got.is_waiting_page(), "the page takes the place");
    assert_eq!(b.status("portal").await["queue_length"], 1);
    let mut api = g.citizen();
    assert_eq!(
        api.get_json("/api/apply").await.status,
        429,
        "an API client queues"
    );
    assert_eq!(api.status("portal").await["queue_length"], 2);
}

/// While people wait, the assets a page loads are not charged to the
/// address's share of new places: a page of them would use it up, and
/// the person's own page, the one that takes the place, be refused.
#[tokio::test]
async fn assets_do_not_use_up_the_addresss_share() {
    let up = upstream::spawn().await;
    // A burst of three: the one let in first, one in line, and the page
    // below.
    let g = Gated::start(&format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\n\
         per_ip = {{ tickets_per_minute = 12, status_per_minute = 1000000 }}\nmax_active = 1\n",
        up.addr
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    assert!(g.citizen().get("/").await.is_waiting_page());
    let mut b = g.citizen();
    for _ in 0..5 {
        let got = b
            .request(
                "GET",
                "/app.js",
                varco::body::empty(),
                &[("sec-fetch-dest", "script")],
            )
            .await;
        assert_eq!(got.status, 503, "{}", got.text());
    }
    let got = b
        .request(
            "GET",
            "/",
            varco::body::empty(),
            &[("sec-fetch-dest", "document")],
        )
        .await;
    assert!(got.is_waiting_page(), "{} {}", got.status, got.text());
    assert_eq!(
        common::client::metric(g.admin, "varco_rejected_total", "reason=\"ip_limit\"").await,
        Some(0.0)
    );
}

/// The status polls, the bulk of a click day's requests, are timed as a
/// room's requests are (room `-`): a slow answer to them shows.
#[tokio::test]
async fn the_status_polls_are_timed() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    for _ in 0..3 {
        a.status("portal").await;
    }
    assert_eq!(
        common::client::metric(
            g.admin,
            "varco_request_duration_seconds_count",
            "room=\"-\""
        )
        .await,
        Some(3.0)
    );
}

/// A release in any field of the header, or any item of one: a `0`
/// sent before it, or two folded into one field by a framework.
#[tokio::test]
async fn a_release_among_other_values_ends_the_session() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let got = a.get("/release?values=0").await;
    assert!(got.headers.get("x-varco-release").is_none(), "stripped");
    assert_eq!(b.status("portal").await["state"], "waiting", "a 0 is none");
    let got = a.get("/release?values=0.1").await;
    assert!(got.headers.get("x-varco-release").is_none(), "every field");
    assert_eq!(b.status("portal").await["state"], "admitted");
    assert!(b.get("/").await.reached_upstream());
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    assert_eq!(b.get("/release?values=0,%201").await.status, 200);
    assert_eq!(c.status("portal").await["state"], "admitted");
}

/// A logout page that has the browser delete the site's cookies
/// (`Clear-Site-Data: "cookies"`) deletes varco's pass with them: its slot
/// goes to the next in line at once, as on a release, not when the
/// session idles out. Over plain HTTP browsers ignore the header, and the
/// pass lives on.
#[tokio::test]
async fn a_logout_that_clears_the_sites_cookies_frees_the_slot() {
    let up = upstream::spawn().await;
    let g = Gated::start(
        &(gated_config(up.addr, "max_active = 1")
            + "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"),
    )
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    // Over plain HTTP: nothing happens to the pass.
    let got = a.get("/logout").await;
    assert!(got.reached_upstream());
    assert_eq!(b.status("portal").await["state"], "waiting");
    assert!(a.get("/").await.reached_upstream(), "the pass still works");
    // Over HTTPS (the balancer says so): the browser deletes the pass.
    a.headers.push(("x-forwarded-proto".into(), "https".into()));
    let got = a.get("/logout").await;
    assert!(got.reached_upstream());
    assert!(
        got.headers.get("clear-site-data").is_some(),
        "the portal's header goes to the browser"
    );
    assert_eq!(
        b.status("portal").await["state"],
        "admitted",
        "the slot of a deleted pass is held"
    );
}

/// The browser deletes every room's pass of the site on such a logout,
/// not only the room whose page it was: each of their sessions ends. A
/// portal's `X-Varco-Release` stays its own room's.
#[tokio::test]
async fn a_logout_that_clears_the_sites_cookies_frees_every_rooms_slot() {
    let up = upstream::spawn().await;
    let g = Gated::start(
        &(gated_config(up.addr, "paths = [\"/bonus\"]\nmax_active = 1")
            + &format!(
                "[rooms.main]\nupstreams = [\"http://{}\"]\nmax_active = 1\n\
                 [server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
                up.addr
            )),
    )
    .await;
    let mut a = g.citizen();
    a.headers.push(("x-forwarded-proto".into(), "https".into()));
    assert!(a.get("/bonus").await.reached_upstream());
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/bonus").await.is_waiting_page());
    assert!(a.get("/release").await.reached_upstream());
    g.advance(1_000).await;
    assert_eq!(
        b.status("portal").await["state"],
        "waiting",
        "another room's release is its own"
    );
    assert!(a.get("/logout").await.reached_upstream());
    assert_eq!(
        b.status("portal").await["state"],
        "admitted",
        "the slot of the other room's deleted pass is held"
    );
}

/// The same when the portal's answer comes on a path the gate lets
/// through without looking at the pass (an exempt logout page): the
/// pass the request carried is the session that ends.
#[tokio::test]
async fn a_release_on_an_exempt_path_ends_the_session_too() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nexempt_paths = [\"/release\"]",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let pass = a.cookie("varco_pass_portal").unwrap().to_string();
    assert_eq!(a.get("/release").await.status, 200);
    assert!(a.cookie("varco_pass_portal").is_none(), "pass cleared");
    assert_eq!(b.status("portal").await["state"], "admitted");
    assert!(b.get("/").await.reached_upstream());
    // A kept copy of the released pass lets nobody in.
    let mut copy = g.citizen();
    copy.jar.insert("varco_pass_portal".into(), pass);
    assert!(!copy.get("/").await.reached_upstream());
}

/// The portal gets its own cookies, never varco's: a pass in its logs
/// would let whoever reads them skip the queue, as the bypass secret
/// would. Every room's tickets and passes are taken out.
#[tokio::test]
async fn the_portal_never_sees_varcos_cookies() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    assert!(a.cookie("varco_pass_portal").is_some());
    a.jar.insert("sid".into(), "7".into());
    a.jar.insert("varco_ticket_other".into(), "t".into());
    let got = a.get("/echo").await;
    assert!(got.reached_upstream(), "{}", got.text());
    let cookies = got.json()["headers"]["cookie"].clone();
    let cookies: Vec<&str> = cookies
        .as_array()
        .expect("a Cookie reached the portal")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let mut pairs: Vec<&str> = cookies[0].split("; ").collect();
    pairs.sort();
    assert_eq!(pairs, ["sid=7"]);
}

#[tokio::test]
async fn each_mode_behaves() {
    let up = upstream::spawn().await;
    // queue_all: nobody enters directly, even with room to spare.
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 10\nmode = \"queue_all\"",
    ))
    .await;
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    g.advance(1000).await;
    assert!(c.get("/").await.reached_upstream());
    drop(g);

    // paused: tickets, no admission.
    let g = Gated::start(&gated_config(up.addr, "max_active = 10\nmode = \"paused\"")).await;
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    g.advance(60_000).await;
    let got = c.get("/").await;
    assert!(got.is_waiting_page());
    assert!(got.text().contains("sospeso"), "the page says it is paused");
    drop(g);

    // closed: no tickets, a closed page.
    let g = Gated::start(&gated_config(up.addr, "max_active = 10\nmode = \"closed\"")).await;
    let mut c = g.citizen();
    let got = c.get("/").await;
    assert_eq!(got.status, 503);
    assert!(c.cookie("varco_ticket_portal").is_none());
    drop(g);

    // passthrough: a plain proxy.
    let before = up.hits();
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nmode = \"passthrough\"",
    ))
    .await;
    for _ in 0..3 {
        let mut c = g.citizen();
        assert!(c.get("/").await.reached_upstream());
        assert!(c.jar.is_empty(), "no cookies in passthrough");
        // A page left open from before the gate was lifted moves on.
        assert_eq!(c.status("portal").await["state"], "admitted");
    }
    assert_eq!(up.hits(), before + 3);
}

/// One room's bypass secret reaches no room's portal: a balancer adding
/// it to all its staff's traffic sends it to every room.
#[tokio::test]
async fn a_rooms_bypass_secret_reaches_no_other_rooms_portal() {
    let up = upstream::spawn().await;
    let cms = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-bypass-rooms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bypass.secret"), "correct-horse-battery-staple\n").unwrap();
    let cfg = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\n\
         paths = [\"/apply\"]\nmax_active = 1\n\
         bypass = {{ header = \"X-Staff\", secret_file = \"bypass.secret\" }}\n\
         [rooms.cms]\nupstreams = [\"http://{}\"]\npaths = [\"/\"]\n",
        up.addr, cms.addr
    );
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    let got = g
        .citizen()
        .request(
            "GET",
            "/news",
            body::empty(),
            &[
                ("x-staff", "correct-horse-battery-staple"),
                ("x-staff", "the-cms-own"),
            ],
        )
        .await;
    assert!(got.reached_upstream(), "{}", got.status);
    assert_eq!(cms.hits(), 1);
    let seen: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        seen["headers"]["x-staff"],
        serde_json::json!(["the-cms-own"]),
        "{seen}"
    );
}

#[tokio::test]
async fn bypass_by_address_or_secret_header_and_exempt_paths() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-bypass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bypass.secret"), "correct-horse-battery-staple\n").unwrap();
    let cfg = gated_config(
        up.addr,
        "max_active = 1\nmode = \"closed\"\nexempt_paths = [\"/static/\"]\n\
         bypass = { header = \"X-Varco-Bypass\", secret_file = \"bypass.secret\" }",
    );
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    let mut op = g.citizen();
    let got = op
        .request(
            "GET",
            "/",
            body::empty(),
            &[("x-varco-bypass", "correct-horse-battery-staple")],
        )
        .await;
    assert!(got.reached_upstream());
    // The secret stays with varco: not in the portal's logs.
    let seen: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert!(seen["headers"].get("x-varco-bypass").is_none(), "{seen}");
    let got = op
        .request(
            "GET",
            "/",
            body::empty(),
            &[("x-varco-bypass", "wrong-horse")],
        )
        .await;
    assert_eq!(got.status, 503);
    // Appended by a balancer after the client's own field: the secret
    // counts, and only it is taken out.
    let got = op
        .request(
            "GET",
            "/",
            body::empty(),
            &[
                ("x-varco-bypass", "the-clients-own"),
                ("x-varco-bypass", "correct-horse-battery-staple"),
            ],
        )
        .await;
    assert!(got.reached_upstream(), "{}", got.status);
    let seen: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        seen["headers"]["x-varco-bypass"],
        serde_json::json!(["the-clients-own"]),
        "{seen}"
    );
    assert!(g.citizen().get("/static/app.css").await.reached_upstream());
    drop(g);

    // Exempt paths match whole segments of the path, the query aside:
    // `/static` is not `/static-admin/`.
    let cfg = gated_config(
        up.addr,
        "max_active = 1\nmode = \"closed\"\nexempt_paths = [\"/static\", \"/ping\", \"/img/\"]",
    );
    let g = Gated::start(&cfg).await;
    for open in [
        "/static",
        "/static/app.css?v=2",
        "/ping",
        "/ping?full=1",
        "/img/logo.png",
    ] {
        assert!(g.citizen().get(open).await.reached_upstream(), "{open}");
    }
    for gated in [
        "/static-admin/apply",
        "/staticapply",
        "/ping2",
        "/static%2Fapp.css",
        // An entry ending in `/` covers what lies under it, not itself.
        "/img",
    ] {
        assert_eq!(g.citizen().get(gated).await.status, 503, "{gated}");
    }
    // A header of that name with another value is the portal's business.
    let got = g
        .citizen()
        .request(
            "GET",
            "/static/app.css",
            body::empty(),
            &[("x-varco-bypass", "for-the-portal")],
        )
        .await;
    let seen: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(
        seen["headers"]["x-varco-bypass"][0], "for-the-portal",
        "{seen}"
    );
    drop(g);

    let cfg = gated_config(
        up.addr,
        "max_active = 1\nmode = \"closed\"\nbypass = { cidrs = [\"127.0.0.0/8\"] }",
    );
    let g = Gated::start(&cfg).await;
    assert!(g.citizen().get("/").await.reached_upstream());
}

/// A room of one slot behind a balancer trusted at 127.0.0.0/8, with a
/// per-address budget of 8 new tickets a minute (bursts of 2).
fn behind_a_balancer(up: std::net::SocketAddr) -> String {
    format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{up}\"]\nmax_active = 1\n\
         per_ip = {{ tickets_per_minute = 8, status_per_minute = 8 }}\n\
         [server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n"
    )
}

/// A new citizen's `GET /`, as the balancer forwards it for `who`.
async fn get_forwarded_for(g: &Gated, who: &str) -> common::client::Got {
    g.citizen()
        .request("GET", "/", body::empty(), &[("x-forwarded-for", who)])
        .await
}

/// Behind a trusted load balancer that writes `address:port` into
/// X-Forwarded-For, what the client wrote to the left of that entry must
/// not choose its address: not a bypass range, not a fresh per-IP budget.
#[tokio::test]
async fn a_forwarded_address_left_of_one_varco_cannot_read_is_the_clients_own_claim() {
    let up = upstream::spawn().await;
    let cfg = gated_config(
        up.addr,
        "max_active = 1\nmode = \"closed\"\nbypass = { cidrs = [\"10.9.0.0/16\"] }",
    ) + "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let g = Gated::start(&cfg).await;
    let post_from = |forwarded_for: &'static str| {
        let mut c = g.citizen();
        async move {
            c.request(
                "POST",
                "/apply",
                body::empty(),
                &[("x-forwarded-for", forwarded_for)],
            )
            .await
        }
    };
    // The balancer's own entry for a bypassed address lets it through...
    let got = post_from("10.9.0.1:50123").await;
    assert!(got.reached_upstream(), "{}", got.status);
    // ...but a forged one to its left does not.
    let got = post_from("10.9.0.1, unknown").await;
    assert!(!got.reached_upstream());
    assert_eq!(got.status, 503, "the closed page");
    drop(g);

    // Three people behind the balancer, each with their own address and
    // port: three budgets, not one shared by everyone behind it.
    let g = Gated::start(&behind_a_balancer(up.addr)).await;
    g.citizen().get("/").await; // admitted directly, no ticket
    for who in [
        "198.51.100.1:5000",
        "198.51.100.2:5000",
        "[2001:db8::3]:5000",
    ] {
        for _ in 0..2 {
            let got = get_forwarded_for(&g, who).await;
            assert!(got.is_waiting_page(), "{who}: {}", got.status);
        }
        // A burst of 2 (8/min / 4) each, then that address is limited.
        assert_eq!(get_forwarded_for(&g, who).await.status, 429, "{who}");
    }
}

/// An IPv6 subscriber holds a whole /64: fresh addresses from it share
/// one budget of new tickets; a neighbouring /64 has its own.
#[tokio::test]
async fn new_tickets_are_counted_per_ipv6_64_not_per_address() {
    let up = upstream::spawn().await;
    let g = Gated::start(&behind_a_balancer(up.addr)).await;
    g.citizen().get("/").await; // admitted directly, no ticket
    let from = |who: &'static str| {
        let g = &g;
        async move { get_forwarded_for(g, who).await.status }
    };
    // A burst of 2 (8/min / 4), then the same /64 is limited, whatever
    // address within it asks.
    assert_eq!(from("2001:db8:7:1::1").await, 200);
    assert_eq!(from("2001:db8:7:1:dead:beef:0:2").await, 200);
    assert_eq!(from("2001:db8:7:1:ffff::3").await, 429);
    assert_eq!(from("2001:db8:7:2::1").await, 200, "another /64");
}

#[tokio::test]
async fn too_many_tickets_from_one_address_get_429_and_keep_their_ticket() {
    let up = upstream::spawn().await;
    let cfg = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 1\n\
         per_ip = {{ tickets_per_minute = 8, status_per_minute = 8 }}\n",
        up.addr
    );
    let g = Gated::start(&cfg).await;
    g.citizen().get("/").await; // admitted directly, no ticket
    let mut people: Vec<Citizen> = (0..6).map(|_| g.citizen()).collect();
    let mut statuses = Vec::new();
    for c in people.iter_mut() {
        statuses.push(c.get("/").await.status);
    }
    // A burst of 2 (8/min / 4), the direct admission's included.
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(statuses[1..].iter().all(|s| *s == 429), "{statuses:?}");
    let got = people[5].get("/").await;
    assert_eq!(got.status, 429);
    assert!(
        got.text().contains("<html lang=\"it\">")
            && got
                .text()
                .contains("Troppe richieste dal tuo indirizzo di rete"),
        "in the room's language: {}",
        got.text()
    );
    assert!(
        !got.text().contains("<code>") && got.headers.get("x-request-id").is_none(),
        "the gate's own answer has no request ID to give as a reference"
    );
    assert!(
        got.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        got.headers.get("refresh"),
        got.headers.get("retry-after"),
        "a person's page asks again by itself"
    );
    assert!(people[5].cookie("varco_ticket_portal").is_none());
    // Someone who already holds a ticket keeps it and its place.
    let got = people[0].get("/").await;
    assert!(got.is_waiting_page(), "{}", got.status);
    assert!(people[0].cookie("varco_ticket_portal").is_some());
}

#[tokio::test]
async fn prequeue_order_is_drawn_by_lot_at_the_opening() {
    let up = upstream::spawn().await;
    let opens = common::gated::T0 + 10 * MIN;
    let opens_text = varco::timefmt::rfc3339(opens);
    let g = Gated::start(&gated_config(
        up.addr,
        &format!("max_active = 100\nadmission_per_minute = 60\nopens_at = \"{opens_text}\""),
    ))
    .await;
    let mut early: Vec<Citizen> = (0..20).map(|_| g.citizen()).collect();
    for c in early.iter_mut() {
        let got = c.get("/").await;
        assert!(got.is_waiting_page(), "nobody enters before the opening");
        let s = c.status("portal").await;
        assert_eq!(s["prequeue"], true);
        assert!(s["position"].is_null(), "no position before the draw: {s}");
    }
    assert_eq!(up.hits(), 0);
    // The time of the opening has come, the draw not yet (at the tick):
    // still a pre-queue, which still says when it opens.
    g.clock.advance_ms(10 * MIN);
    let s = early[0].status("portal").await;
    assert_eq!(
        (&s["prequeue"], &s["opens_at"]),
        (&true.into(), &opens_text.clone().into()),
        "{s}"
    );
    let page = early[0].get("/").await.text();
    assert!(
        page.contains(&opens_text[11..16]) && !page.contains(" ? "),
        "{page}"
    );
    g.advance(0).await; // the opening
    let mut late = g.citizen();
    late.get("/").await;
    let mut positions = Vec::new();
    for c in early.iter_mut() {
        let s = c.status("portal").await;
        assert_eq!(s["prequeue"], false);
        // The place drawn (the ticket's number in line): distinct even for
        // those the opening tick already called.
        positions.push(s["ticket"].as_u64().unwrap());
    }
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        20,
        "every early arrival has its own place: {positions:?}"
    );
    assert_ne!(
        positions,
        (1..=20).collect::<Vec<u64>>(),
        "not arrival order"
    );
    // The one who came after the opening is behind the whole pre-queue.
    let s = late.status("portal").await;
    assert!(s["position"].as_u64().unwrap() >= 20 - 1, "{s}");
    // The wait of those admitted counts from the opening, not from their
    // arrival ten minutes before it: the panel shows the line moving.
    g.advance(5_000).await;
    let mut admitted = 0;
    for c in early.iter_mut() {
        if c.status("portal").await["state"] == "admitted" {
            assert!(c.get("/").await.reached_upstream());
            admitted += 1;
        }
    }
    assert!(admitted > 0);
    let of = "room=\"portal\"";
    assert_eq!(
        common::client::metric(g.admin, "varco_wait_seconds_count", of).await,
        Some(admitted as f64)
    );
    let waited = common::client::metric(g.admin, "varco_wait_seconds_sum", of).await;
    assert!(
        waited.is_some_and(|w| w <= 5.0 * admitted as f64),
        "{waited:?} for {admitted}"
    );
}

/// A folder with a fixed key and no snapshot yet, and a config whose
/// memory store snapshots there: what a restart needs to keep places.
fn snapshotted_room(
    name: &str,
    up: std::net::SocketAddr,
    room_keys: &str,
) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("varco-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("state.json"));
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n",
    )
    .unwrap();
    let cfg = format!(
        "[secrets]\nkey_file = \"keys.toml\"\n[store]\nsnapshot = \"state.json\"\n\
         [rooms.portal]\nupstreams = [\"http://{up}\"]\n{room_keys}\n\
         per_ip = {{ tickets_per_minute = 100000, status_per_minute = 100000 }}\n"
    );
    (dir, cfg)
}

/// A snapshot that cannot be written (its folder became a file after the
/// start: even root cannot) is counted for the operator's alert, and never
/// stops the queue: the numbers are handed out all the same.
#[tokio::test]
async fn a_snapshot_that_cannot_be_written_is_counted_and_the_queue_goes_on() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("unwritable", up.addr, "max_active = 1");
    let folder = dir.join("state");
    let _ = std::fs::remove_file(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let cfg = cfg.replace(
        "snapshot = \"state.json\"",
        "snapshot = \"state/state.json\"",
    );
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    // The snapshot written at start, before the folder goes: one late
    // would be a second error counted below. (Its time is set from the
    // start, so the file, renamed into place whole, is the signal.)
    let written = folder.join("state.json");
    common::client::until(
        "the first snapshot",
        std::time::Duration::from_secs(10),
        async || written.exists(),
    )
    .await;
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, "").unwrap();
    let errors = |kind: &'static str| {
        let admin = g.admin;
        async move {
            common::client::metric(
                admin,
                "varco_state_write_errors_total",
                &format!("kind=\"{kind}\""),
            )
            .await
            .unwrap_or(0.0)
        }
    };
    assert!(g.citizen().get("/").await.reached_upstream());
    for expect in 1..=3 {
        let mut c = g.citizen();
        assert!(c.get("/").await.is_waiting_page());
        assert_eq!(c.status("portal").await["position"], expect);
    }
    // The marks go to disk from a writer of their own: its failure is
    // counted once it has tried.
    common::client::until(
        "the marks not written, counted",
        std::time::Duration::from_secs(10),
        async || errors("marks").await >= 1.0,
    )
    .await;
    let before = errors("snapshot").await;
    g.app.save();
    assert_eq!(errors("snapshot").await, before + 1.0);
}

/// A first snapshot whose write hangs (a stuck disk raises no error) ages
/// the snapshot's time from the start, so `VarcoQueueStateStale` can fire:
/// a series that appeared only with the first write would stay absent,
/// and the alert silent, for as long as the write hung.
#[tokio::test]
async fn a_first_snapshot_that_hangs_ages_the_time_of_the_last_one() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("first-hangs", up.addr, "max_active = 1");
    let cfg = cfg.replace(
        "snapshot = \"state.json\"",
        "snapshot = \"state.json\"\nsnapshot_interval = \"100ms\"",
    );
    // A FIFO where the write goes first: opening it to write waits for a
    // reader, as a write to a stuck disk waits.
    let fifo = dir.join("state.json.tmp");
    common::fifo_at(&fifo);
    let stuck = dir.join("stuck.fifo");
    let _unstick = Unstick(vec![fifo.clone(), stuck.clone()]);
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let at = || async {
        common::client::metric(g.admin, "varco_state_snapshot_timestamp_seconds", "").await
    };
    assert_eq!(at().await, Some((T0 / 1000) as f64), "set at the start");
    g.advance(600_000).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    assert_eq!(at().await, Some((T0 / 1000) as f64), "ten minutes stale");
    assert!(!dir.join("state.json").exists(), "the write hangs");
    // The writer is at the FIFO before it is moved aside (its first bytes
    // come once a reader opens it): on a loaded machine it may not have
    // reached it yet, and a reader of a FIFO no writer will open again
    // waits for ever.
    let stuck_write = tokio::net::unix::pipe::OpenOptions::new()
        .open_receiver(&fifo)
        .unwrap();
    let mut bytes = Vec::new();
    common::client::until(
        "the stuck write's first bytes",
        std::time::Duration::from_secs(10),
        async || {
            // Ok(0): no writer yet; WouldBlock: one, nothing written yet.
            let _ = stuck_write.try_read_buf(&mut bytes);
            !bytes.is_empty()
        },
    )
    .await;
    // The disk comes back: the writes after this one go to a plain file,
    // stamped now; the stuck one, moved aside with its FIFO, ends (a FIFO
    // cannot be synced: one error).
    std::fs::rename(&fifo, &stuck).unwrap();
    loop {
        stuck_write.readable().await.unwrap();
        match stuck_write.try_read_buf(&mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("reading the stuck write: {e}"),
        }
    }
    assert!(!bytes.is_empty(), "the stuck write held the snapshot");
    std::fs::remove_file(&stuck).unwrap();
    common::client::until(
        "a snapshot written at the moved clock",
        std::time::Duration::from_secs(10),
        async || at().await == Some((T0 / 1000 + 600) as f64),
    )
    .await;
    assert!(dir.join("state.json").exists());
}

/// Reads the FIFOs left on drop, so that a failed test does not leave
/// varco's writers waiting on them for ever (the runtime waits for them).
struct Unstick(Vec<std::path::PathBuf>);

impl Drop for Unstick {
    fn drop(&mut self) {
        use std::os::unix::fs::FileTypeExt;
        for path in self.0.drain(..) {
            std::thread::spawn(move || {
                while std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) {
                    let _ = std::fs::read(&path);
                }
            });
        }
    }
}

/// A restart onto a config whose opening is still to come, over a queue
/// the snapshot shows already admitting, is refused: the queue would go
/// on admitting before the time the page announces.
#[tokio::test]
async fn a_restart_refuses_an_opening_to_come_for_a_queue_that_has_opened() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("reopen", up.addr, "max_active = 1");
    let g = Gated::start_at(&cfg, T0, &dir).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    g.stop().await;
    let later = varco::timefmt::rfc3339(T0 + 24 * 3_600_000);
    let cfg = cfg.replace(
        "max_active = 1",
        &format!("max_active = 1\nopens_at = \"{later}\""),
    );
    let config = varco::config::Config::from_toml(&cfg, &dir).expect("a valid file");
    let clock = std::sync::Arc::new(varco::clock::ManualClock::new(T0 + 5_000));
    let err = match varco::app::App::new(config, clock).await {
        Ok(_) => panic!("started over a queue that has opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("rooms.portal.opens_at") && err.contains("already opened"),
        "{err}"
    );
    assert!(dir.join("state.json").exists(), "the snapshot is kept");
}

/// A restart whose key file lost the key a scheduled opening's lottery is
/// drawn with is refused while the draw matters, as a reload is: the
/// draw would fall back to another key, and every pre-queue place would
/// be drawn again under another published commitment.
#[tokio::test]
async fn a_restart_keeps_the_key_of_a_lottery_in_use() {
    let up = upstream::spawn().await;
    let opens = varco::timefmt::rfc3339(T0 + 10 * 60_000);
    let (dir, cfg) = snapshotted_room(
        "lottery-restart",
        up.addr,
        &format!("max_active = 1\nopens_at = \"{opens}\""),
    );
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    assert!(early.status("portal").await["lottery"]["commitment"].is_string());
    g.stop().await;
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k2\"\nsecret = \"ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=\"\n",
    )
    .unwrap();
    let err = restart(&cfg, &dir, T0 + 5_000)
        .await
        .expect_err("started without the lottery's key");
    assert!(
        err.contains("secrets.key_file") && err.contains("\"k1\""),
        "{err}"
    );
    // Keys from the environment: the error names where they come from.
    std::env::set_var(
        "VARCO_TEST_LOTTERY_KEYS",
        "k2:ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=",
    );
    let from_env = cfg.replace(
        "key_file = \"keys.toml\"",
        "key_env = \"VARCO_TEST_LOTTERY_KEYS\"",
    );
    let err = restart(&from_env, &dir, T0 + 5_000)
        .await
        .expect_err("started without the lottery's key");
    assert!(
        err.contains("secrets.key_env") && err.contains("\"k1\""),
        "{err}"
    );
    // Once the last pre-queue ticket has expired, the draw matters no more.
    assert!(restart(&cfg, &dir, T0 + 10 * 60_000 + 86_400_000 + 1_000)
        .await
        .is_ok());
    // A key an earlier run made up is in no file to keep: its tickets
    // went with it, and nothing holds the start back.
    std::fs::remove_file(dir.join("state.json")).unwrap();
    let made_up = cfg.replace("key_file = \"keys.toml\"", "ephemeral = true");
    let g = Gated::start_at(&made_up, T0, &dir).await;
    assert!(g.citizen().get("/").await.is_waiting_page());
    g.stop().await;
    assert!(
        restart(&cfg, &dir, T0 + 5_000).await.is_ok(),
        "refused over a made-up key"
    );
}

/// A pre-queue ticket follows its holder to the last page asked for, as
/// a ticket in line does: a form posted later, and the turn, land there.
/// It kept the first page for good; an image fetched meanwhile does not
/// move it.
#[tokio::test]
async fn a_prequeue_ticket_lands_on_the_last_page_asked_for() {
    let up = upstream::spawn().await;
    let opens = varco::timefmt::rfc3339(T0 + 10 * 60_000);
    let g = Gated::start(&gated_config(
        up.addr,
        &format!("max_active = 1\nopens_at = \"{opens}\""),
    ))
    .await;
    let mut early = g.citizen();
    assert!(early.get("/").await.is_waiting_page());
    let landing = |c: &Citizen| c.claims("varco_ticket_portal").unwrap()["u"].clone();
    assert_eq!(landing(&early), "/");
    assert!(early.get("/domanda").await.is_waiting_page());
    assert_eq!(landing(&early), "/domanda");
    early
        .request(
            "GET",
            "/logo.png",
            body::empty(),
            &[("sec-fetch-dest", "image")],
        )
        .await;
    assert_eq!(landing(&early), "/domanda");
}

/// Starts varco on `toml` (paths from `dir`) at `now`, and stops it at
/// once: what a restart makes of the snapshot there.
async fn restart(toml: &str, dir: &std::path::Path, now: u64) -> Result<(), String> {
    let config = varco::config::Config::from_toml(toml, dir).expect("a valid file");
    varco::app::App::new(
        config,
        std::sync::Arc::new(varco::clock::ManualClock::new(now)),
    )
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// A restart under another opening is refused once the pre-queue's
/// places are drawn from the one the queue opened at, as a reload is:
/// the opening is part of the lottery's seed, and every place would be
/// drawn again. Before the opening, one brought nearer than a pre-queue
/// page's slowest poll, or removed, is refused too. Restarts took all of
/// these.
#[tokio::test]
async fn a_restart_under_another_opening_keeps_the_drawn_places() {
    let up = upstream::spawn().await;
    let opening = T0 + 60 * 60_000;
    let at = |ms: u64| format!("opens_at = \"{}\"", varco::timefmt::rfc3339(ms));
    let (dir, cfg) = snapshotted_room(
        "opening-restart",
        up.addr,
        &format!("max_active = 1\n{}", at(opening)),
    );
    let moved = |to: &str| cfg.replace(&at(opening), to);
    let g = Gated::start_at(&cfg, T0, &dir).await;
    for _ in 0..2 {
        assert!(g.citizen().get("/").await.is_waiting_page());
    }
    g.stop().await;
    for nearer in [at(T0 + 2 * 60_000), String::new()] {
        let err = restart(&moved(&nearer), &dir, T0 + 60_000)
            .await
            .expect_err("an opening brought nearer");
        assert!(
            err.contains("rooms.portal.opens_at") && err.contains("2 people wait in the pre-queue"),
            "{err}"
        );
    }
    // The opening, under the file it was set for.
    let g = Gated::start_at(&cfg, opening, &dir).await;
    g.advance(1_000).await;
    let view = g.app.room("portal").unwrap().view();
    assert!(view.opened && view.prequeue == 2, "{view:?}");
    g.stop().await;
    for other in [at(opening - 5 * 60_000), String::new()] {
        let err = restart(&moved(&other), &dir, opening + 5_000)
            .await
            .expect_err("another opening after the draw");
        assert!(
            err.contains("rooms.portal.opens_at")
                && err.contains("2 pre-queue tickets have their places drawn"),
            "{err}"
        );
    }
    restart(&cfg, &dir, opening + 5_000).await.unwrap();
}

/// A restart whose config no longer has a room (renamed, or removed)
/// holding live sessions is refused, as a reload is: its people would be
/// sent back to the line mid-flow, and a room under the new name would
/// let in its max_active beside them. An empty one leaves the snapshot.
/// Restarts took the first silently, and kept the second for ever.
#[tokio::test]
async fn a_restart_without_a_room_in_use_is_refused() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("renamed-restart", up.addr, "max_active = 2");
    let with_spare = format!(
        "{cfg}[rooms.spare]\nupstreams = [\"http://{}\"]\npaths = [\"/spare\"]\nmax_active = 2\n",
        up.addr
    );
    let g = Gated::start_at(&with_spare, T0, &dir).await;
    assert!(g.citizen().get("/").await.reached_upstream());
    g.stop().await;
    let err = restart(
        &with_spare.replace("[rooms.portal]", "[rooms.bonus]"),
        &dir,
        T0 + 1_000,
    )
    .await
    .expect_err("a room renamed under its live sessions");
    assert!(
        err.contains("rooms.portal: ") && err.contains("1 live sessions"),
        "{err}"
    );
    let g = Gated::start_at(&cfg, T0 + 2_000, &dir).await;
    g.stop().await;
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert!(
        saved["rooms"]["portal"].is_object() && saved["rooms"].get("spare").is_none(),
        "{saved}"
    );
    // An hour later its sessions have ended, restored or not: renamed
    // then, the room holds nobody, and the start goes ahead.
    restart(
        &with_spare.replace("[rooms.portal]", "[rooms.bonus]"),
        &dir,
        T0 + 3_600_000,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_restart_keeps_every_place_and_every_pass() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("snap", up.addr, "max_active = 2");
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    // The error counter is there from the start, at 0, so an alert on
    // increase() sees the first failure.
    assert_eq!(
        common::client::metric(
            g.admin,
            "varco_state_write_errors_total",
            "kind=\"snapshot\""
        )
        .await,
        Some(0.0)
    );
    let mut people: Vec<Citizen> = (0..6).map(|_| g.citizen()).collect();
    for c in people.iter_mut() {
        c.get("/").await;
    }
    let mut before = Vec::new();
    for c in people.iter_mut().skip(2) {
        before.push(c.status("portal").await["position"].clone());
    }
    let jars: Vec<_> = people.iter().map(|c| c.jar.clone()).collect();
    g.stop().await;

    let g = Gated::start_at(&cfg, common::gated::T0 + 5_000, &dir).await;
    let mut people: Vec<Citizen> = jars
        .into_iter()
        .map(|jar| {
            let mut c = g.citizen();
            c.jar = jar;
            c
        })
        .collect();
    for c in people.iter_mut().take(2) {
        assert!(
            c.get("/").await.reached_upstream(),
            "passes survive the restart"
        );
    }
    let mut after = Vec::new();
    for c in people.iter_mut().skip(2) {
        after.push(c.status("portal").await["position"].clone());
    }
    assert_eq!(before, after, "every place in line kept");
    let mut newcomer = g.citizen();
    newcomer.get("/").await;
    assert_eq!(
        newcomer.status("portal").await["position"],
        5,
        "numbering continues"
    );
}

/// After a crash the memory store comes back from its last snapshot,
/// older than the last scrape. Its totals moved back, which Prometheus
/// takes for a restart and counts whole again: a burst of admissions on
/// the dashboard. The counters start at 0 with the process instead, and
/// rise by what happens after it; the totals stay in the admin API.
#[tokio::test]
async fn after_a_crash_the_counters_rise_only_by_what_comes_after() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("crash-counters", up.addr, "max_active = 10");
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let come_in = async |g: &Gated, n: usize| {
        for _ in 0..n {
            assert!(g.citizen().get("/").await.reached_upstream());
        }
    };
    let admitted = async |g: &Gated| {
        common::client::metric(g.admin, "varco_admitted_total", "room=\"portal\"").await
    };
    come_in(&g, 4).await;
    g.app.save();
    let last_snapshot = std::fs::read(dir.join("state.json")).unwrap();
    come_in(&g, 3).await;
    assert_eq!(admitted(&g).await, Some(7.0));
    g.stop().await;
    // The crash: the state is the last snapshot's, not the one a stop
    // writes.
    std::fs::write(dir.join("state.json"), last_snapshot).unwrap();

    let g = Gated::start_at(&cfg, T0 + 5_000, &dir).await;
    let room = g.app.room("portal").unwrap();
    assert_eq!(room.view().admitted_total, 4, "the last snapshot's");
    assert_eq!(
        admitted(&g).await,
        Some(0.0),
        "restored totals are no admissions"
    );
    come_in(&g, 2).await;
    assert_eq!(admitted(&g).await, Some(2.0));
    assert_eq!(
        common::client::metric(g.admin, "varco_tickets_issued_total", "room=\"portal\"").await,
        Some(2.0)
    );
    assert_eq!(room.view().admitted_total, 6);
}

/// A start without the snapshot begins the queue again, and a ticket
/// from the run before holds no place in it: its number is somebody
/// else's now. It counts as no ticket, and its holder joins the new line
/// behind whoever came first (the ticket still verifies: same key).
#[tokio::test]
async fn a_ticket_from_an_earlier_queue_holds_no_place_in_the_new_one() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room("earlier", up.addr, "max_active = 1");
    let cfg = cfg.replace("[store]\nsnapshot = \"state.json\"\n", "");
    assert!(!cfg.contains("snapshot"), "{cfg}");
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    let mut first = g.citizen();
    assert!(first.get("/").await.reached_upstream());
    let mut earlier = g.citizen();
    assert!(earlier.get("/").await.is_waiting_page());
    assert_eq!(earlier.status("portal").await["position"], 1);
    let old = earlier.cookie("varco_ticket_portal").unwrap().to_string();
    g.stop().await;

    let g = Gated::start_at(&cfg, common::gated::T0 + 5_000, &dir).await;
    let mut newcomers: Vec<Citizen> = (0..2).map(|_| g.citizen()).collect();
    assert!(newcomers[0].get("/").await.reached_upstream());
    assert!(newcomers[1].get("/").await.is_waiting_page());
    assert_eq!(newcomers[1].status("portal").await["position"], 1);
    let mut back = g.citizen();
    back.jar = earlier.jar.clone();
    let s = back.status("portal").await;
    assert_eq!(
        s["state"], "none",
        "the old number 1 is not this queue's: {s}"
    );
    assert!(back.get("/").await.is_waiting_page());
    let new = back.cookie("varco_ticket_portal").unwrap();
    assert_ne!(new, old, "a ticket of the new queue");
    assert_eq!(back.status("portal").await["position"], 2);
    assert_eq!(
        newcomers[1].status("portal").await["position"],
        1,
        "the first in the new line stays first"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_operators_template_replaces_the_page() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("page.html"),
        "<!doctype html><html lang=\"{{lang}}\"><title>Comune</title>\
         <p id=\"position\">{{position}}</p><p>{{ahead}} before you; ticket {{ticket}}; {{ a + b }}</p></html>",
    )
    .unwrap();
    let cfg = gated_config(up.addr, "max_active = 1\npage_template = \"page.html\"");
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    g.citizen().get("/").await;
    let mut c = g.citizen();
    let got = c
        .request(
            "GET",
            "/",
            body::empty(),
            &[("accept-language", "en-US,en;q=0.9")],
        )
        .await;
    let page = got.text();
    assert!(page.contains("<title>Comune</title>"), "{page}");
    assert!(page.contains("lang=\"en\""));
    assert!(page.contains("<p id=\"position\">1</p>"), "{page}");
    assert!(page.contains("0 before you; ticket 2;"), "{page}");
    assert!(
        page.contains("{{ a + b }}"),
        "braces around anything but a variable's name stay as written"
    );
    assert!(
        !got.headers.contains_key("content-security-policy"),
        "varco cannot know what an operator's page loads"
    );
    assert_eq!(got.headers["x-content-type-options"], "nosniff");
}

/// In an operator's template, a script's or style's `{{name}}` is left
/// as written (the page's own client-side template), and the address
/// first asked for, put in an event handler, cannot close its quotes.
#[tokio::test]
async fn an_operators_template_fills_nothing_in_its_scripts() {
    let up = upstream::spawn().await;
    let dir = std::env::temp_dir().join(format!("varco-template-js-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("page.html"),
        "<!doctype html><html lang=\"{{lang}}\"><title>{{title}}</title>\
         <script type=\"text/x-template\">var n=\"{{next_url}}\"; {{ title }}</script>\
         <style>/* {{room}} */</style>\
         <button onclick=\"location.replace('{{next_url}}')\">{{position}}</button></html>",
    )
    .unwrap();
    let cfg = gated_config(up.addr, "max_active = 1\npage_template = \"page.html\"");
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    g.citizen().get("/").await;
    let mut c = g.citizen();
    let got = c.get("/x');alert(1);('").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let page = got.text();
    assert!(
        page.contains("var n=\"{{next_url}}\"; {{ title }}</script>"),
        "{page}"
    );
    assert!(page.contains("/* {{room}} */"), "{page}");
    assert!(
        page.contains("location.replace('/x%27);alert(1);(%27')"),
        "{page}"
    );
    assert!(!page.contains("&#39;);alert"), "{page}");
    // Encoded, a path of 400 quotes is past what a ticket remembers: it
    // lands on the room's first page instead.
    let quotes = format!("/{}", "'".repeat(400));
    let page = g.citizen().get(&quotes).await.text();
    assert!(page.contains("location.replace('/')"), "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// varco's own waiting page runs its own inline script and style and
/// nothing else; its answers are taken as the type they say.
#[tokio::test]
async fn varcos_own_pages_say_what_may_run_in_them() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    g.citizen().get("/").await;
    let mut c = g.citizen();
    let got = c.get("/").await;
    assert!(got.is_waiting_page());
    let policy = got.headers["content-security-policy"].to_str().unwrap();
    let page = got.text();
    let digest_of = |tag: &str| digest_of_inline(&page, tag);
    // The digests of the page as served, the page's variables filled in;
    // 'unsafe-inline' only beside them, for browsers that know no digests
    // (any that does ignores it there).
    assert!(
        policy.contains(&format!(
            "script-src 'sha256-{}' 'unsafe-inline';",
            digest_of("script")
        )),
        "{policy}"
    );
    assert!(
        policy.contains(&format!(
            "style-src 'sha256-{}' 'unsafe-inline';",
            digest_of("style")
        )),
        "{policy}"
    );
    assert_eq!(policy.matches("unsafe").count(), 2, "{policy}");
    assert!(policy.starts_with("default-src 'none';"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "the status poll");
    assert!(policy.contains("frame-ancestors 'self'"), "{policy}");
    assert_eq!(got.headers["x-content-type-options"], "nosniff");
    assert_eq!(got.headers["referrer-policy"], "same-origin");

    let status = c
        .request("GET", "/.varco/status?room=portal", body::empty(), &[])
        .await;
    assert_eq!(status.status, 200);
    assert_eq!(status.headers["x-content-type-options"], "nosniff");
    let json = c
        .request("GET", "/", body::empty(), &[("accept", "application/json")])
        .await;
    assert_eq!(json.status, 429);
    assert_eq!(json.headers["x-content-type-options"], "nosniff");
    let missing = c.get("/.varco/nowhere").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.headers["x-content-type-options"], "nosniff");
    let policy = missing.headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'none'"), "{policy}");
    let style = digest_of_inline(&missing.text(), "style");
    assert!(
        policy.contains(&format!("style-src 'sha256-{style}' 'unsafe-inline'")),
        "{policy}"
    );
}

/// The status says when a request carried none of the room's cookies:
/// the page given a ticket then knows the browser keeps none. A cookie
/// that came back and is no good (lapsed, tampered) is not that.
#[tokio::test]
async fn the_status_tells_a_browser_that_kept_no_cookie() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    g.citizen().get("/").await;
    let mut c = g.citizen();
    assert!(c.get("/").await.is_waiting_page());
    let held = c.status("portal").await;
    assert_eq!(held["state"], "waiting");
    assert!(held.get("no_cookie").is_none(), "{held}");

    let kept = std::mem::take(&mut c.jar);
    let bare = c.status("portal").await;
    assert_eq!(bare["state"], "none");
    assert_eq!(bare["no_cookie"], true, "{bare}");

    c.jar = kept
        .into_iter()
        .map(|(k, v)| (k, v.replace('.', ".x")))
        .collect();
    let tampered = c.status("portal").await;
    assert_eq!(tampered["state"], "none");
    assert!(tampered.get("no_cookie").is_none(), "{tampered}");
}

/// The CSP digest of the first `<tag>` element's text in `page`.
fn digest_of_inline(page: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let start = page.find(&open).unwrap() + open.len();
    let end = start + page[start..].find(&close).unwrap();
    let d = ring::digest::digest(&ring::digest::SHA256, &page.as_bytes()[start..end]);
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d)
}

/// A room's `error_template` makes varco's own pages for it: the portal
/// failing an admitted person (with the request's reference), and the
/// gate's 429, each in the person's language.
#[tokio::test]
async fn an_operators_error_template_makes_the_rooms_error_pages() {
    let dir = std::env::temp_dir().join(format!("varco-error-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("error.html"),
        "<!doctype html><html lang=\"{{lang}}\"><title>Comune: {{status}}</title>\
         <h1>{{heading}}</h1><p>{{message}}</p><p>{{reference_label}} <b>{{reference}}</b></p></html>",
    )
    .unwrap();
    let cfg = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\n\
         max_active = 1\nerror_template = \"error.html\"\n\
         per_ip = {{ tickets_per_minute = 8, status_per_minute = 100 }}\n",
        common::dead_addr()
    );
    let g = Gated::start_at(&cfg, common::gated::T0, &dir).await;
    let english = [("accept-language", "en-GB,en;q=0.9")];
    let failed = g
        .citizen()
        .request("GET", "/", body::empty(), &english)
        .await;
    assert_eq!(failed.status, 502, "admitted, and the portal is down");
    let id = failed.headers["x-request-id"].to_str().unwrap().to_string();
    let page = failed.text();
    assert!(
        page.starts_with("<!doctype html><html lang=\"en\"><title>Comune: 502</title>"),
        "{page}"
    );
    assert!(page.contains("<h1>Bad Gateway</h1>"), "{page}");
    assert!(
        page.contains("The service is not reachable right now."),
        "{page}"
    );
    assert!(
        page.contains(&format!("this reference: <b>{id}</b>")),
        "{page}"
    );
    assert!(!failed.headers.contains_key("content-security-policy"));
    // New arrivals from one address: a burst of two, the direct
    // admission above one of them; one ticket, then 429.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let got = g.citizen().get("/").await;
        statuses.push(got.status);
        if got.status == 429 {
            let page = got.text();
            assert!(page.contains("<title>Comune: 429</title>"), "{page}");
            assert!(page.contains("<h1>Troppe richieste</h1>"), "{page}");
            assert!(page.contains("<p> <b></b></p>"), "no reference: {page}");
        }
    }
    assert_eq!(statuses, [200, 429, 429], "a burst of one ticket");
    // varco's own paths on the room's site too.
    let unknown = g.citizen().get("/.varco/nowhere").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.text().contains("<title>Comune: 404</title>"),
        "{}",
        unknown.text()
    );
}

#[tokio::test]
async fn status_polls_are_limited_per_address() {
    let up = upstream::spawn().await;
    let cfg = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 1\n\
         per_ip = {{ tickets_per_minute = 100, status_per_minute = 8 }}\n",
        up.addr
    );
    let g = Gated::start(&cfg).await;
    let mut c = g.citizen();
    c.get("/").await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let got = c
            .request("GET", "/.varco/status?room=portal", body::empty(), &[])
            .await;
        codes.push(got.status);
        if got.status == 429 {
            assert!(got.headers.contains_key("retry-after"));
            assert_eq!(
                got.headers["cache-control"],
                "no-store, private, no-transform"
            );
        }
    }
    assert_eq!(codes, [200, 200, 429, 429], "a burst of 8/4 = 2 polls");
}

/// Two tabs at the moment of a turn: one claims it and gets the pass, the
/// other's request, sent before that answer came, takes a new ticket. The
/// browser then holds both; the first request with the live pass clears
/// the ticket (a place nobody needs, which would make the pass look
/// lapsed with the store away).
#[tokio::test]
async fn a_ticket_beside_a_live_pass_is_cleared() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut person = g.citizen();
    assert!(person.get("/").await.reached_upstream());
    let mut other_tab = g.citizen();
    assert!(other_tab.get("/").await.is_waiting_page());
    let ticket = other_tab.cookie("varco_ticket_portal").expect("a ticket");
    person
        .jar
        .insert("varco_ticket_portal".into(), ticket.to_string());
    assert!(person.get("/form").await.reached_upstream());
    assert!(person.cookie("varco_ticket_portal").is_none(), "cleared");
    assert!(
        person.cookie("varco_pass_portal").is_some(),
        "the pass kept"
    );
}

/// A pass is a bearer credential: copied into another browser it lets the
/// copy in, but it is still one session. It takes no second slot, a third
/// person still waits, and when the session ends it ends for both.
#[tokio::test]
async fn a_copied_pass_is_one_session_not_two() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    let mut owner = g.citizen();
    assert!(owner.get("/").await.reached_upstream());
    let mut copy = g.citizen();
    copy.jar.insert(
        "varco_pass_portal".into(),
        owner.cookie("varco_pass_portal").unwrap().to_string(),
    );
    assert!(copy.get("/").await.reached_upstream(), "the copy is let in");
    let mut third = g.citizen();
    assert!(
        third.get("/").await.is_waiting_page(),
        "the copy took no second slot"
    );
    let room = g.app.room("portal").unwrap();
    assert_eq!(room.store.view().active, 1, "one session, two browsers");
    // The portal ends the session through the owner: the copy is out too.
    assert_eq!(owner.get("/release").await.status, 200);
    let after = copy.get("/").await;
    assert!(
        !after.reached_upstream(),
        "the copied pass outlived its session"
    );
    assert!(third.get("/").await.reached_upstream(), "the slot went on");
}

#[tokio::test]
async fn a_dot_segment_cannot_walk_out_of_an_exempt_path() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nmode = \"queue_all\"\nexempt_paths = [\"/static/\"]",
    ))
    .await;
    let mut asset = g.citizen();
    let got = asset.get("/static/app.css").await;
    assert!(got.reached_upstream(), "{}", got.text());
    // The portal is given the path varco matched: no dot segment, no
    // repeated slash, escapes of unreserved characters decoded.
    let got = asset.get("/static/./img//logo.png").await;
    assert!(got.reached_upstream());
    assert_eq!(got.json()["uri"], "/static/img/logo.png");
    for skip in [
        "/static/../apply",
        "/static/%2e%2e/apply",
        "/static/.%2E/apply?x=1",
        "/static/img/../../apply",
    ] {
        let mut c = g.citizen();
        let got = c.get(skip).await;
        assert!(
            got.is_waiting_page(),
            "{skip} skipped the queue: {}",
            got.text()
        );
        assert!(c.cookie("varco_ticket_portal").is_some(), "{skip}");
    }
    // What varco cannot resolve the way every portal would is refused.
    for bad in [
        "/static/..%2Fapply",
        "/static/..%5Capply",
        "/static/..;/apply",
        "/static/%2e%2e;jsessionid=1/apply",
        "/static/%zz",
        "/static/.%00/apply",
        "/../apply",
    ] {
        let got = g.citizen().get(bad).await;
        assert_eq!(got.status, 400, "{bad}: {}", got.text());
    }
    let hits = up.hits();
    assert_eq!(hits, 2, "only the two assets reached the portal");
    // A person sent to the page from a dot-segment path lands on the
    // path the portal will serve.
    let mut c = g.citizen();
    let got = c.get("/static/../apply/./form").await;
    assert!(
        got.text().contains("data-next=\"/apply/form\""),
        "{}",
        got.text()
    );
}

/// A slash escaped (`%2F`, `%5C`) or written as a backslash does not take
/// a request out of a gated room on a sub-path: nginx, WSGI servers and
/// IIS read them as slashes before they route, so the portal would serve
/// the gated path to someone the site's other room let through.
#[tokio::test]
async fn an_escaped_slash_does_not_walk_out_of_a_gated_room() {
    stays_in_the_gated_room(
        "[\"/servizi/bonus\"]",
        "/servizi/altro",
        &[
            "/servizi%2Fbonus/apply",
            "/servizi%2fbonus/apply",
            "/servizi%5Cbonus/apply",
            "/servizi%2F%2Fbonus/apply",
            "/servizi%2F;x/bonus/apply",
        ],
    )
    .await;
}

/// Each of `sneaks` reaches the gated room `bonus` (on `paths`, everyone
/// queued) beside a catch-all room: the waiting page and a ticket, the
/// portal untouched; `elsewhere` reaches the portal through the other room.
async fn stays_in_the_gated_room(paths: &str, elsewhere: &str, sneaks: &[&str]) {
    let up = upstream::spawn().await;
    let toml = format!(
        "[secrets]\nephemeral = true\n\
         [rooms.bonus]\nupstreams = [\"http://{up}\"]\npaths = {paths}\n\
         max_active = 1\nmode = \"queue_all\"\n\
         per_ip = {{ tickets_per_minute = 1000000, status_per_minute = 1000000 }}\n\
         [rooms.main]\nupstreams = [\"http://{up}\"]\n",
        up = up.addr
    );
    let g = Gated::start(&toml).await;
    assert!(g.citizen().get(elsewhere).await.reached_upstream());
    for sneak in sneaks {
        let mut c = g.citizen();
        let got = c.get(sneak).await;
        assert!(
            got.is_waiting_page(),
            "{sneak} skipped the queue: {}",
            got.text()
        );
        assert!(c.cookie("varco_ticket_bonus").is_some(), "{sneak}");
    }
    assert_eq!(
        up.hits(),
        1,
        "only the other room's page reached the portal"
    );
}

/// A room's path spelled another way (escaped where the config has it
/// raw, raw UTF-8 where the config has it escaped, an escaped
/// parenthesis) is the same path to the portal, which decodes before it
/// routes, so the same room here: not another room's way in.
#[tokio::test]
async fn a_room_path_spelled_another_way_is_the_same_room() {
    stays_in_the_gated_room(
        "[\"/caf%C3%A8\", \"/universit\u{e0}\", \"/bonus(2024)\"]",
        "/altro",
        &[
            "/caf\u{e8}/apply",
            "/caf%c3%a8/apply",
            "/universit%C3%A0/apply",
            "/bonus%282024%29/apply",
            "/bonus%282024%29/apply/%FF",
        ],
    )
    .await;
}

/// A chain of proxies in front adds a scheme each (`https, http`: the
/// browser spoke HTTPS to the first, which spoke HTTP to the next): the
/// first is the browser's, and the cookies are Secure `__Host-` ones. So
/// for RFC 7239's `Forwarded` alone.
#[tokio::test]
async fn a_chain_of_proxies_saying_https_first_gets_secure_cookies() {
    let up = upstream::spawn().await;
    let cfg =
        gated_config(up.addr, "max_active = 1") + "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let g = Gated::start(&cfg).await;
    for (header, proto, secure) in [
        ("x-forwarded-proto", "https, http", true),
        ("x-forwarded-proto", "HTTPS ,http", true),
        ("x-forwarded-proto", "http, https", false),
        // RFC 7239, from a balancer that sends only that.
        (
            "forwarded",
            "for=192.0.2.60;proto=https, for=10.0.0.1;proto=http",
            true,
        ),
        ("forwarded", "for=192.0.2.60; proto=\"HTTPS\"", true),
        ("forwarded", "for=192.0.2.60;proto=http", false),
    ] {
        let mut c = g.citizen();
        let got = c
            .request("GET", "/", body::empty(), &[(header, proto)])
            .await;
        let set = got.headers["set-cookie"].to_str().unwrap();
        assert_eq!(
            (
                set.starts_with("__Host-varco_pass_portal="),
                set.contains("; Secure")
            ),
            (secure, secure),
            "{proto}: {set}"
        );
        // The one place goes back for the next.
        assert_eq!(c.get("/release").await.status, 200);
    }
}

/// Under HTTPS varco's cookies are `__Host-` ones, which a sibling site
/// under the same parent domain cannot set: the cookies such a site sets
/// under varco's plain names, sent first, hide neither the ticket nor the
/// pass; and admission deletes the ticket under both names. The portal
/// sees none of them.
#[tokio::test]
async fn cookies_a_sibling_site_sets_hide_nothing_under_https() {
    let up = upstream::spawn().await;
    let cfg =
        gated_config(up.addr, "max_active = 1") + "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let g = Gated::start(&cfg).await;
    let https = [("x-forwarded-proto", "https")];
    let mut holder = g.citizen();
    let got = holder.request("GET", "/", body::empty(), &https).await;
    assert!(got.reached_upstream());
    let mut c = g.citizen();
    let got = c.request("GET", "/", body::empty(), &https).await;
    assert!(got.is_waiting_page());
    let set = got.headers["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("__Host-varco_ticket_portal="), "{set}");
    let ticket = c.cookie("__Host-varco_ticket_portal").unwrap().to_string();
    // The sibling's cookies (well formed, signed by nobody) come first.
    let junk = "varco_ticket_portal=e30.e30.sig; varco_pass_portal=e30.e30.sig; ".repeat(5);
    let sent = format!("{junk}__Host-varco_ticket_portal={ticket}");
    let mut bare = Citizen::new(g.addr);
    let h = [
        ("x-forwarded-proto", "https"),
        ("accept", "application/json"),
        ("cookie", sent.as_str()),
    ];
    let s = bare
        .request("GET", "/.varco/status?room=portal", body::empty(), &h)
        .await
        .json();
    assert_eq!(
        (&s["state"], &s["position"]),
        (&"waiting".into(), &1.into()),
        "{s}"
    );

    // The slot frees: the turn is claimed through the sibling's cookies,
    // and the ticket is deleted under both its names.
    holder
        .request("GET", "/release", body::empty(), &https)
        .await;
    g.advance(1000).await;
    let mut through = Citizen::new(g.addr);
    let h = [("x-forwarded-proto", "https"), ("cookie", sent.as_str())];
    let got = through.request("GET", "/echo", body::empty(), &h).await;
    assert!(got.reached_upstream(), "{}", got.text());
    let set: Vec<&str> = got
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        set.iter()
            .any(|c| c.starts_with("__Host-varco_pass_portal=")),
        "{set:?}"
    );
    for name in ["__Host-varco_ticket_portal=;", "varco_ticket_portal=;"] {
        assert!(
            set.iter()
                .any(|c| c.starts_with(name) && c.contains("Max-Age=0")),
            "{name} {set:?}"
        );
    }
    let seen = got.json()["headers"]["cookie"].clone();
    assert!(seen.is_null(), "the portal got {seen}");
}

/// `cookie_same_site = "none"`: an identity provider's POST back from its
/// own site carries varco's cookies. Browsers accept that only with
/// Secure, so over plain HTTP the cookies stay Lax.
#[tokio::test]
async fn a_room_for_a_cross_site_login_sets_cookies_that_cross_sites() {
    let up = upstream::spawn().await;
    let cfg = gated_config(up.addr, "max_active = 1\ncookie_same_site = \"none\"")
        + "[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n";
    let g = Gated::start(&cfg).await;
    let https = [("x-forwarded-proto", "https")];
    let mut a = g.citizen();
    let got = a.request("GET", "/", body::empty(), &https).await;
    assert!(got.reached_upstream());
    let pass = got.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(pass.starts_with("__Host-varco_pass_portal="), "{pass}");
    assert!(
        pass.ends_with("; HttpOnly; SameSite=None; Secure"),
        "{pass}"
    );
    let mut b = g.citizen();
    let got = b.request("GET", "/", body::empty(), &https).await;
    assert!(got.is_waiting_page());
    let ticket = got.headers["set-cookie"].to_str().unwrap();
    assert!(ticket.ends_with("; SameSite=None; Secure"), "{ticket}");
    let got = g.citizen().get("/").await;
    let plain = got.headers["set-cookie"].to_str().unwrap();
    assert!(plain.ends_with("; HttpOnly; SameSite=Lax"), "{plain}");
}

#[tokio::test]
async fn a_response_that_sets_a_pass_is_never_cacheable() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 5")).await;
    let mut c = g.citizen();
    // Admitted directly on a request for an asset the portal marks public:
    // a cache in front of varco must not keep this response, or the next
    // person would get the pass with it.
    let got = c.get("/cacheable").await;
    assert!(got.reached_upstream(), "{}", got.text());
    assert!(got.headers.get("set-cookie").is_some());
    assert_eq!(got.headers["cache-control"], "no-store, private");
    assert!(got.headers.get("expires").is_none());
    // Nor a CDN that reads its own header instead of Cache-Control.
    for cdn in ["cdn-cache-control", "surrogate-control", "x-accel-expires"] {
        assert!(got.headers.get(cdn).is_none(), "{cdn}");
    }
    // With the pass in hand and nothing set, the portal's own caching
    // stands.
    let got = c.get("/cacheable").await;
    assert!(got.headers.get("set-cookie").is_none());
    assert_eq!(got.headers["cache-control"], "public, max-age=3600");
    assert_eq!(got.headers["surrogate-control"], "max-age=3600");
}

#[tokio::test]
async fn the_status_of_a_lapsed_pass_is_not_admitted() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    ))
    .await;
    let mut idle = g.citizen();
    assert!(idle.get("/").await.reached_upstream());
    assert_eq!(idle.status("portal").await["state"], "admitted");
    // Idle past session_idle: the session ends (the pass cookie lives on,
    // twice as long) and its slot goes to someone else.
    g.advance(MIN + 1_000).await;
    let mut next = g.citizen();
    assert!(next.get("/").await.reached_upstream());
    let got = idle.get("/").await;
    assert!(got.is_waiting_page(), "back in line: {}", got.text());
    assert!(
        idle.cookie("varco_pass_portal").is_some(),
        "the cookie lives on"
    );
    // The page's script follows "admitted" to the portal: it must say
    // where the person really stands, or the page reloads in a loop.
    let s = idle.status("portal").await;
    assert_eq!(s["state"], "waiting", "{s}");
    assert_eq!(s["position"], 1, "{s}");
    // Polling keeps nobody's session alive: `next` came in a minute and a
    // second after the start, and polls without going to the portal.
    assert_eq!(next.status("portal").await["state"], "admitted");
    g.clock.advance_ms(40_000);
    assert_eq!(next.status("portal").await["state"], "admitted");
    g.advance(21_000).await;
    assert_eq!(next.status("portal").await["state"], "none");
}

#[tokio::test]
async fn a_turn_called_before_a_long_restart_is_still_there_after() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room(
        "gap",
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"60s\"",
    );
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut called = g.citizen();
    assert!(called.get("/").await.is_waiting_page());
    let mut behind = g.citizen();
    assert!(behind.get("/").await.is_waiting_page());
    // The holder's session ends; the next tick calls the second person.
    g.advance(MIN + 1_000).await;
    assert_eq!(called.status("portal").await["state"], "admitted");
    let jars = [called.jar.clone(), behind.jar.clone()];
    g.stop().await;

    // varco is down for five minutes, far longer than the claim window:
    // nobody could come in meanwhile, so the turn is still there.
    let g = Gated::start_at(&cfg, T0 + MIN + 1_000 + 5 * MIN, &dir).await;
    g.advance(1_000).await;
    let mut called = g.citizen();
    called.jar = jars[0].clone();
    let got = called.get("/apply").await;
    assert!(
        got.reached_upstream(),
        "the called turn survived: {}",
        got.text()
    );
    let mut behind = g.citizen();
    behind.jar = jars[1].clone();
    assert_eq!(behind.status("portal").await["position"], 1);
    // Down again, for a minute and a half: the session it became (idle
    // for a minute at most) is still there too, within the pass cookie's
    // own life (twice session_idle).
    let jars = [called.jar.clone(), behind.jar.clone()];
    g.stop().await;
    let restart = T0 + MIN + 1_000 + 5 * MIN + 1_000 + 90_000;
    let g = Gated::start_at(&cfg, restart, &dir).await;
    let mut called = g.citizen();
    called.jar = jars[0].clone();
    let mut behind = g.citizen();
    behind.jar = jars[1].clone();
    assert!(
        called.get("/apply").await.reached_upstream(),
        "the session survived"
    );
    // And the window still closes for a turn nobody takes, once called:
    // when `called` has been idle a minute, `behind` is called and never
    // comes.
    g.advance(MIN + 1_000).await;
    assert_eq!(behind.status("portal").await["state"], "admitted");
    let room = g.app.room("portal").unwrap();
    assert_eq!(room.view().abandoned_total, 0);
    g.advance(MIN + 1_000).await;
    assert_eq!(room.view().abandoned_total, 1, "a turn nobody took lapsed");
}

/// Direct admissions count against the address's share as tickets do:
/// a script without a cookie jar, in a quiet hour, cannot take a session
/// a request.
#[tokio::test]
async fn direct_admissions_count_against_the_addresss_share() {
    let up = upstream::spawn().await;
    let g = Gated::start(
        &gated_config(up.addr, "max_active = 100")
            .replace("tickets_per_minute = 1000000", "tickets_per_minute = 4"),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let got = g.citizen().get("/").await;
        statuses.push(if got.reached_upstream() {
            200
        } else {
            got.status
        });
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (1..=2).contains(&admitted),
        "a session a request: {statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    let active = g.app.room("portal").unwrap().view().active;
    assert_eq!(active, admitted as u64);
}

/// A clock stepped back (NTP after a drift; or, in a cluster, a node
/// behind the one that signed) makes passes and tickets signed in the
/// last seconds look as if from the future: they still count, or a form
/// goes back to the line and a place in it is lost.
#[tokio::test]
async fn a_clock_stepped_back_keeps_every_pass_and_place() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(up.addr, "max_active = 1")).await;
    g.advance(20_000).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    g.clock.set_ms(T0 + 10_000);
    assert!(
        a.post_form(&[]).await.reached_upstream(),
        "a form sent back to the line"
    );
    let s = b.status("portal").await;
    assert_eq!(
        (&s["state"], &s["position"]),
        (&"waiting".into(), &1.into()),
        "{s}"
    );
}

/// After a stop longer than any pass lives, the sessions saved are of
/// passes no request can renew: their slots go to the line at once, not
/// one idle time after the start.
#[tokio::test]
async fn slots_of_passes_that_lapsed_during_a_long_stop_go_to_the_line() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room(
        "overnight",
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"60s\"",
    );
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let mut holder = g.citizen();
    assert!(holder.get("/").await.reached_upstream());
    let mut next = g.citizen();
    assert!(next.get("/").await.is_waiting_page());
    let jars = [holder.jar.clone(), next.jar.clone()];
    g.stop().await;

    // Down ten minutes: the holder's pass (two idle times) lapsed meanwhile.
    let g = Gated::start_at(&cfg, T0 + 10 * MIN, &dir).await;
    let mut holder = g.citizen();
    holder.jar = jars[0].clone();
    let mut next = g.citizen();
    next.jar = jars[1].clone();
    assert_eq!(next.status("portal").await["state"], "waiting");
    g.advance(1_000).await;
    assert_eq!(
        next.status("portal").await["state"],
        "admitted",
        "the slot of a pass that can no longer come back is held"
    );
    assert!(next.get("/apply").await.reached_upstream());
    assert!(
        !holder.get("/").await.reached_upstream(),
        "the lapsed pass came back past max_active"
    );
}

#[tokio::test]
async fn a_pass_the_portal_ended_stays_ended_across_a_restart() {
    let up = upstream::spawn().await;
    let (dir, cfg) = snapshotted_room(
        "ended",
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nflow_paths = [\"/oidc/callback\"]\nflow_window = \"10m\"",
    );
    let g = Gated::start_at(&cfg, T0, &dir).await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let kept = a.jar.clone();
    a.get("/release").await;
    assert!(b.get("/").await.reached_upstream(), "b took the freed slot");
    // The control: before the restart, the kept copy cannot come back.
    let mut replay = g.citizen();
    replay.jar = kept.clone();
    assert!(!replay.get("/oidc/callback?code=1").await.reached_upstream());
    g.stop().await;

    let g = Gated::start_at(&cfg, T0 + 5_000, &dir).await;
    let mut replay = g.citizen();
    replay.jar = kept;
    let got = replay.get("/oidc/callback?code=2").await;
    assert!(
        !got.reached_upstream() && got.is_waiting_page(),
        "a released pass came back after a restart: {}",
        got.status
    );
    g.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_short_claim_window_makes_the_page_ask_sooner() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nclaim_window = \"20s\"",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    let page = b.get("/").await;
    assert!(page.is_waiting_page());
    let html = page.text();
    let poll: u64 = html
        .split("data-poll=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .expect("the page says how often it polls");
    // The page waits up to 1.3 times this: two polls inside 20 s.
    assert!((5..=7).contains(&poll), "polls every {poll}s");
    let got = b.get_json("/").await;
    assert_eq!(got.status, 429);
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..=7).contains(&retry), "Retry-After {retry}");
    // Every later poll too: the status answer says when to ask again, and
    // the page's script follows it (tests/browser checks that part).
    let got = b
        .request("GET", "/.varco/status?room=portal", body::empty(), &[])
        .await;
    assert_eq!(got.status, 200);
    assert!(got.json()["eta_seconds"].is_null(), "{}", got.text());
    let retry: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..=7).contains(&retry), "status Retry-After {retry}");
}

/// A script holding a pass could take the portal's capacity from
/// everyone admitted with it: `per_session` caps each pass's requests.
/// Past it, 429 with Retry-After; the session and everyone else's carry on.
#[tokio::test]
async fn a_pass_holder_over_its_request_budget_gets_429_and_keeps_the_pass() {
    let up = upstream::spawn().await;
    let cfg = format!(
        "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://{}\"]\nmax_active = 2\n\
         per_session = {{ requests_per_second = 1, burst = 3 }}\n",
        up.addr
    );
    let g = Gated::start(&cfg).await;
    let mut script = g.citizen();
    assert!(script.get("/").await.reached_upstream(), "admitted");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(script.get("/echo").await.status);
    }
    assert_eq!(
        &statuses[..3],
        &[200, 200, 200],
        "a burst of 3: {statuses:?}"
    );
    assert_eq!(&statuses[3..], &[429, 429], "{statuses:?}");
    let refused = script.get("/echo").await;
    assert_eq!(refused.status, 429);
    assert!(refused.headers.get("retry-after").is_some());
    assert!(
        script.cookie("varco_pass_portal").is_some(),
        "the pass is kept"
    );
    assert!(
        !refused.text().contains("id=\"position\""),
        "not sent back to the line"
    );
    let mut other = g.citizen();
    assert!(other.get("/").await.reached_upstream());
    assert_eq!(
        other.get("/echo").await.status,
        200,
        "another session's budget"
    );
    assert_eq!(
        common::client::metric(g.admin, "varco_rejected_total", "reason=\"session_limit\"").await,
        Some(3.0)
    );
}

/// Adaptive admission raises the rate only where a higher rate is
/// tested: not in a paused room (nobody is admitted, and `resume` would
/// start at the ceiling), nor in a full one (the tick admits nobody
/// whatever the rate, and places freed at once, a cohort idling out or
/// `max_active` raised, would be filled at a rate nobody tried).
#[tokio::test]
async fn adaptive_admission_raises_no_rate_nobody_tests() {
    for paused in [true, false] {
        let up = upstream::spawn().await;
        let g = Gated::start(&gated_config(
            up.addr,
            &format!(
                "max_active = {}\nsession_idle = \"1h\"\n\
                 adaptive = {{ min_per_minute = 60, max_per_minute = 600, target_latency = \"500ms\", interval = \"1s\", step_per_minute = 60 }}",
                if paused { 100 } else { 1 }
            ),
        ))
        .await;
        let mut holder = g.citizen();
        assert!(holder.get("/").await.reached_upstream());
        let room = g.app.room("portal").unwrap();
        let start = room.per_minute();
        if paused {
            room.change_live(varco::store::LiveChange::Mode(
                varco::room::admission::Mode::Paused,
            ))
            .await
            .unwrap();
        }
        assert!(g.citizen().get("/").await.is_waiting_page());
        // The admitted go on using the portal, quickly answered; people
        // wait.
        for _ in 0..5 {
            assert!(holder.get("/echo").await.reached_upstream());
            g.advance(1000).await;
        }
        assert_eq!(room.per_minute(), start, "paused: {paused}");
    }
}

/// A turn called before the room closes is still its holder's: closed
/// means nobody new gets in or in line, and the slot was held for them.
/// (They got the closed page until their claim window lapsed, and a new
/// place at the back once the room opened: "your place is kept" was
/// false.) Anyone else still gets the closed page, and no ticket.
#[tokio::test]
async fn a_turn_called_before_a_close_can_still_be_claimed() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"",
    ))
    .await;
    let mut first = g.citizen();
    assert!(first.get("/").await.reached_upstream());
    let mut called = g.citizen();
    assert!(called.get("/").await.is_waiting_page());
    let mut waiting = g.citizen();
    assert!(waiting.get("/").await.is_waiting_page());
    // The first session idles out and the next in line is called.
    g.advance(61_000).await;
    assert_eq!(called.status("portal").await["state"], "admitted");

    let room = g.app.room("portal").unwrap();
    room.change_live(varco::store::LiveChange::Mode(
        varco::room::admission::Mode::Closed,
    ))
    .await
    .unwrap();
    assert_eq!(called.status("portal").await["state"], "admitted");
    assert!(
        called.get("/").await.reached_upstream(),
        "the called turn comes in"
    );
    // In, with a live pass: a page of theirs still open (another tab)
    // moves on, as the gate lets them through.
    assert_eq!(called.status("portal").await["state"], "admitted");
    assert!(called.get("/next").await.reached_upstream());
    // Not yet called: the closed page, the place kept.
    assert_eq!(waiting.status("portal").await["state"], "closed");
    let got = waiting.get("/").await;
    assert_eq!(got.status, 503);
    let mut newcomer = g.citizen();
    assert_eq!(newcomer.get("/").await.status, 503);
    assert!(newcomer.cookie("varco_ticket_portal").is_none());
}

/// In front of a portal that reads paths whatever their case (IIS), a
/// gated sub-path spelled in capitals is still the gated room's with
/// `paths_ignore_case`; without it, it goes to the site's `/` room, and
/// the portal, reading `/bonus`, serves it ungated.
#[tokio::test]
async fn paths_ignore_case_keeps_capitals_in_the_gated_room() {
    let up = upstream::spawn().await;
    for ignore_case in [true, false] {
        let cfg = format!(
            "[secrets]\nephemeral = true\n\
             [rooms.bonus]\nupstreams = [\"http://{up}\"]\npaths = [\"/Servizi/bonus\"]\n\
             paths_ignore_case = {ignore_case}\nmode = \"queue_all\"\n\
             [rooms.site]\nupstreams = [\"http://{up}\"]\n",
            up = up.addr
        );
        let g = Gated::start(&cfg).await;
        for path in [
            "/servizi/bonus/apply",
            "/SERVIZI/BONUS",
            "/Servizi/Bonus%2Fapply",
        ] {
            let got = g.citizen().get(path).await;
            if ignore_case {
                assert!(got.is_waiting_page(), "{path}: {}", got.text());
            } else {
                assert!(got.reached_upstream(), "{path}: {}", got.text());
            }
        }
        // As written, either way.
        assert!(g
            .citizen()
            .get("/Servizi/bonus/apply")
            .await
            .is_waiting_page());
        // Other paths are the site's.
        assert!(g.citizen().get("/servizi/other").await.reached_upstream());
    }
}

/// In a room closed since, a used ticket whose claim window is still
/// open (a copy, a second tab) gets the closed page and loses the ticket:
/// kept, the status poll (which cannot know it was used) said "admitted",
/// and the page reloaded into the closed page at every poll.
#[tokio::test]
async fn a_used_ticket_in_a_closed_room_sends_no_page_round_in_a_loop() {
    let up = upstream::spawn().await;
    let g = Gated::start(&gated_config(
        up.addr,
        "max_active = 1\nsession_idle = \"1m\"\nclaim_window = \"60s\"",
    ))
    .await;
    let mut a = g.citizen();
    assert!(a.get("/").await.reached_upstream());
    let mut b = g.citizen();
    assert!(b.get("/").await.is_waiting_page());
    let ticket = b.cookie("varco_ticket_portal").unwrap().to_string();
    assert_eq!(a.get("/release").await.status, 200);
    g.advance(1_000).await;
    assert!(b.get("/").await.reached_upstream());
    let room = g.app.room("portal").unwrap();
    room.change_live(varco::store::LiveChange::Mode(
        varco::room::admission::Mode::Closed,
    ))
    .await
    .unwrap();
    let mut copy = g.citizen();
    copy.jar.insert("varco_ticket_portal".into(), ticket);
    assert_eq!(
        copy.status("portal").await["state"],
        "admitted",
        "not knowable yet"
    );
    assert_eq!(copy.get("/").await.status, 503, "the closed page");
    assert_eq!(copy.status("portal").await["state"], "closed");
    assert_eq!(
        up.hits(),
        3,
        "a's visit and release, b's claim: not the copy"
    );
}
