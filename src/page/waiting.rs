//! The waiting page and its status JSON. Server-rendered, no external
//! assets, under 30 KiB; Italian or English; polls `/.varco/status` with
//! jitter and moves on by itself when the person is admitted; without
//! JavaScript a meta refresh does the same.

use http::header::{HeaderValue, CONTENT_SECURITY_POLICY, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use serde::Serialize;

use super::{escape_into, mark_own};
use crate::body::{full, Body};
use crate::config::Language;

/// What the page and the JSON say about one person's place. Borrowed and
/// with its times as numbers: one is made for every waiting page and
/// every status poll, and each is written straight into the page or the
/// JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Status<'a> {
    pub room: &'a str,
    /// "waiting", "admitted", "closed" or "none" (no ticket).
    pub state: &'static str,
    pub position: Option<u64>,
    pub ahead: Option<u64>,
    pub eta_seconds: Option<u64>,
    pub eta_low_seconds: Option<u64>,
    pub eta_high_seconds: Option<u64>,
    pub queue_length: u64,
    /// True for a pre-queue ticket before the opening.
    pub prequeue: bool,
    /// When a scheduled opening is ahead (unix ms; RFC 3339 in JSON).
    #[serde(serialize_with = "opt_rfc3339")]
    pub opens_at: Option<u64>,
    /// The offset the operator wrote the opening with, for the page (not
    /// part of the JSON, which says it in UTC).
    #[serde(skip)]
    pub opens_offset_s: i32,
    /// When this was computed (unix ms; RFC 3339, UTC, in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub updated: u64,
    /// Ticket number (its arrival order), for the person's own record.
    pub ticket: Option<u64>,
    pub paused: bool,
    /// The person's queue receipt (`room-number-time-code`), to keep.
    pub receipt: Option<String>,
    /// When the ticket was first issued (unix ms; RFC 3339 in JSON).
    #[serde(serialize_with = "opt_rfc3339")]
    pub arrived: Option<u64>,
    /// The pre-queue draw, for a room with a scheduled opening.
    pub lottery: Option<LotteryInfo>,
    /// This ticket is new because the person's turn came and its claim
    /// window passed before they were back (a closed tab, a phone asleep):
    /// the page says so, rather than showing a later place unexplained.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missed_turn: bool,
    /// The room's claim window, which bounds how long the page may wait
    /// between polls (not part of the JSON).
    #[serde(skip)]
    pub claim_window_seconds: u64,
    /// The page answers a form the person sent (a POST after their
    /// session lapsed): it was not sent on, and the page says so, or they
    /// would take it for received (not part of the JSON, whose 429 says
    /// as much to a program).
    #[serde(skip)]
    pub unsent: bool,
    /// No ticket, and the request carried none of the room's cookies at
    /// all: a page that was given a ticket loads afresh once (its cookie
    /// may have run out with the ticket), and at a second time says the
    /// browser keeps no cookies rather than take a new place every time.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_cookie: bool,
}

fn rfc3339<S: serde::Serializer>(ms: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::timefmt::rfc3339(*ms))
}

fn opt_rfc3339<S: serde::Serializer>(ms: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => rfc3339(ms, s),
        None => s.serialize_none(),
    }
}

/// The pre-queue draw, published so anyone can check it: before the
/// opening only the SHA-256 of the seed (varco is bound to it); from the
/// opening the seed and the number of pre-queue tickets, so
/// `varco lottery verify` recomputes every place.
#[derive(Debug, Clone, Serialize)]
pub struct LotteryInfo {
    pub commitment: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// The shortest `claim_window` a room may have: two of the page's
/// soonest polls, jitter included, and some margin for a slow phone.
pub const MIN_CLAIM_WINDOW: std::time::Duration = std::time::Duration::from_secs(15);

/// The longest a pre-queue page waits between polls, long before the
/// opening.
pub const PREQUEUE_POLL_MAX_S: u64 = 300;

impl Status<'_> {
    /// What the page's message says: `closed`, `prequeue`, `paused` or
    /// `waiting` (a missed turn's note is a waiting page's). The script
    /// works it out of each status answer as here, and loads the page
    /// afresh when it changes, so the message never goes stale.
    pub fn situation(&self) -> &'static str {
        if self.state == "closed" {
            "closed"
        } else if self.prequeue {
            "prequeue"
        } else if self.paused {
            "paused"
        } else {
            "waiting"
        }
    }

    /// The longest a page in line may wait between polls (see
    /// [`Status::poll_seconds`]): the page holds a failed poll's wait to
    /// it, whatever the refusal asked, or a page that polls seldom (a
    /// pre-queue's, before the opening) slept through its turn.
    pub fn poll_cap_seconds(&self) -> u64 {
        (self.claim_window_seconds * 10 / 26).clamp(5, 30)
    }

    /// Seconds the page should wait before asking again: sooner when the
    /// turn is near, never under 5 (a stampede), at most 30, and at most
    /// the claim window over 2.6: the page waits up to 1.3 times this, so
    /// two polls fall inside the window and an estimate that was too long
    /// (or a rate raised meanwhile) cannot call and lapse an open page's
    /// turn.
    ///
    /// Before a scheduled opening, half the time left, up to 5 minutes:
    /// no turn can come before it, and a pre-queue taken days ahead, at
    /// one poll every 20 s, was thousands of status answers a second,
    /// each signing a receipt, for nothing. Half, so the page (at most 1.3
    /// times that later) still asks before the opening, and at 20 s from
    /// 40 s before it.
    pub fn poll_seconds(&self) -> u64 {
        let cap = self.poll_cap_seconds();
        let usual = cap.min(20);
        match (self.state, self.eta_seconds) {
            ("admitted", _) => 1,
            _ if self.prequeue => {
                let left_s = self
                    .opens_at
                    .map_or(0, |t| t.saturating_sub(self.updated) / 1000);
                (left_s / 2).clamp(usual, PREQUEUE_POLL_MAX_S)
            }
            (_, Some(eta)) => (eta / 4).clamp(5, cap),
            _ => usual,
        }
    }
}

/// Picks Italian or English from Accept-Language, else the room default.
pub fn language(headers: &HeaderMap, default: Language) -> Language {
    language_of(headers.get(http::header::ACCEPT_LANGUAGE), default)
}

/// [`language`] from the Accept-Language value alone, kept where the
/// request itself is gone.
pub fn language_of(accept: Option<&HeaderValue>, default: Language) -> Language {
    let Some(accept) = accept else {
        return default;
    };
    // Every browser sends this header on every reload: it is read as
    // bytes in place, q-values as whole thousandths.
    let mut best: Option<(u16, Language)> = None;
    // Named with q=0: "not this one", the default included.
    let mut refused = [false; 2];
    for part in accept.as_bytes().split(|b| *b == b',') {
        let mut it = part.split(|b| *b == b';');
        let tag = it.next().unwrap_or_default().trim_ascii();
        // `it`, `it-CH`, `it_IT` (some in-app browsers and Java
        // clients), not `ita` or `enm`.
        if tag.len() > 2 && tag[2] != b'-' && tag[2] != b'_' {
            continue;
        }
        let lang = match tag.get(..2) {
            Some(p) if p.eq_ignore_ascii_case(b"it") => Language::It,
            Some(p) if p.eq_ignore_ascii_case(b"en") => Language::En,
            _ => continue,
        };
        let q = it
            .find_map(|p| match p.trim_ascii() {
                // The parameter's name is case-insensitive (RFC 9110 12.4.2).
                [b'q' | b'Q', b'=', v @ ..] => Some(v),
                _ => None,
            })
            .map_or(1000, qvalue);
        if q == 0 {
            // `en-US;q=0` refuses one variety, not English.
            if tag.len() == 2 {
                refused[lang_index(lang)] = true;
            }
        } else if best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, lang));
        }
    }
    if let Some((_, l)) = best {
        return l;
    }
    let other = match default {
        Language::It => Language::En,
        Language::En => Language::It,
    };
    if refused[lang_index(default)] && !refused[lang_index(other)] {
        other
    } else {
        default
    }
}

/// An Accept-Language q-value in thousandths (RFC 9110: `0`, `0.` and up
/// to three digits, or `1`); anything else counts as 1, as an absent one
/// does.
pub(super) fn qvalue(v: &[u8]) -> u16 {
    let v = v.trim_ascii();
    let fraction = match v {
        [b'0'] => return 0,
        [b'0', b'.', rest @ ..] if rest.len() <= 3 => rest,
        _ => return 1000,
    };
    let mut q = 0u16;
    for i in 0..3 {
        match fraction.get(i) {
            Some(d) if d.is_ascii_digit() => q = q * 10 + u16::from(d - b'0'),
            None => q *= 10,
            Some(_) => return 1000,
        }
    }
    q
}

struct Strings {
    language: Language,
    /// How the language groups the thousands of a figure, as the page's
    /// script does with `Intl.NumberFormat` (CLDR): the separator, and
    /// the smallest figure grouped (Italian leaves four digits whole:
    /// `1234`, `12.345`).
    thousands: char,
    group_from: u64,
    months: [&'static str; 12],
    title: &'static str,
    title_closed: &'static str,
    intro: &'static str,
    /// Before a scheduled opening: places are drawn, not by arrival.
    intro_prequeue: &'static str,
    intro_closed: &'static str,
    /// Before the message, when the page answers a form.
    unsent: &'static str,
    position: &'static str,
    ahead: &'static str,
    eta: &'static str,
    eta_unknown: &'static str,
    eta_range: &'static str,
    /// When the range collapses to one figure.
    eta_about: &'static str,
    /// When the turn is less than a minute away.
    eta_soon: &'static str,
    /// The same two, in hours, for waits over two hours.
    eta_hours_range: &'static str,
    eta_hours_about: &'static str,
    updated: &'static str,
    keep_open: &'static str,
    prequeue: &'static str,
    paused: &'static str,
    /// "{w}": the claim window in words.
    missed_turn: &'static str,
    /// "{n}": seconds, minutes.
    seconds: &'static str,
    minutes: &'static str,
    closed: &'static str,
    ticket: &'static str,
    receipt: &'static str,
    arrived: &'static str,
    /// "{c}": the commitment.
    lottery_committed: &'static str,
    /// "{s}", "{n}", "{c}": seed, pre-queue size, commitment.
    lottery_revealed: &'static str,
    /// The browser sent back none of the room's cookies.
    no_cookie: &'static str,
}

const IT: Strings = Strings {
    language: Language::It,
    thousands: '.',
    group_from: 10_000,
    months: [
        "gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto",
        "settembre", "ottobre", "novembre", "dicembre",
    ],
    title: "Sei in coda",
    title_closed: "Servizio chiuso",
    intro: "Il servizio è molto richiesto in questo momento. Ti faremo entrare appena è il tuo turno, nell'ordine di arrivo.",
    intro_prequeue: "Il servizio non è ancora aperto. All'apertura entrerai al tuo turno, nell'ordine del sorteggio.",
    intro_closed: "Il servizio non accetta nuovi accessi in questo momento.",
    unsent: "Il modulo che hai inviato NON è stato ricevuto. Quando entrerai tornerai alla pagina da cui venivi: invialo di nuovo da lì.",
    position: "Il tuo posto in coda",
    ahead: "Persone davanti a te",
    eta: "Attesa stimata",
    eta_unknown: "non ancora stimabile",
    eta_range: "tra {lo} e {hi} minuti",
    eta_about: "circa {n} minuti",
    eta_soon: "meno di un minuto",
    eta_hours_range: "tra {lo} e {hi} ore",
    eta_hours_about: "circa {n} ore",
    updated: "Ultimo aggiornamento",
    keep_open: "Tieni aperta questa pagina: entrerai automaticamente. Ricaricarla non ti fa perdere il posto.",
    prequeue: "Il servizio apre {day} alle {time} ({zone}). Chi arriva prima dell'apertura riceve un posto estratto a sorte all'apertura: arrivare prima non dà vantaggi.",
    paused: "L'accesso è sospeso per ora. Il tuo posto è conservato: la coda ripartirà da qui.",
    missed_turn: "Il tuo turno era arrivato, ma entro {w} nessuno è tornato su questa pagina per entrare (una scheda chiusa, un telefono in standby), e il posto è passato al successivo. Questo è un nuovo posto in coda: tieni aperta questa pagina per non perderlo.",
    seconds: "{n} secondi",
    minutes: "{n} minuti",
    closed: "Il servizio è chiuso. Il tuo posto, se ne hai uno, è conservato.",
    ticket: "Biglietto numero",
    receipt: "Ricevuta",
    arrived: "arrivo",
    lottery_committed: "Sorteggio della pre-coda: varco si è impegnato sul seme, di cui questo è lo SHA-256: {c}",
    lottery_revealed: "Sorteggio della pre-coda: seme {s} su {n} biglietti (SHA-256 pubblicato prima: {c}). Verificalo con varco lottery verify.",
    no_cookie: "Il tuo browser non ha conservato il cookie della coda, e senza di esso il posto non si può tenere. Consenti i cookie per questo sito, poi ricarica la pagina.",
};

const EN: Strings = Strings {
    language: Language::En,
    thousands: ',',
    group_from: 1_000,
    months: [
        "January", "February", "March", "April", "May", "June", "July", "August", "September",
        "October", "November", "December",
    ],
    title: "You are in line",
    title_closed: "Service closed",
    intro: "The service is very busy right now. You will be let in as soon as it is your turn, in order of arrival.",
    intro_prequeue: "The service is not open yet. From the opening you will be let in at your turn, in the order of the draw.",
    intro_closed: "The service is taking no one new right now.",
    unsent: "The form you sent was NOT received. When you get in you will be back on the page you came from: send it again there.",
    position: "Your place in line",
    ahead: "People ahead of you",
    eta: "Estimated wait",
    eta_unknown: "not yet known",
    eta_range: "between {lo} and {hi} minutes",
    eta_about: "about {n} minutes",
    eta_soon: "under a minute",
    eta_hours_range: "between {lo} and {hi} hours",
    eta_hours_about: "about {n} hours",
    updated: "Last updated",
    keep_open: "Keep this page open: you will get in automatically. Reloading does not lose your place.",
    prequeue: "The service opens on {day} at {time} ({zone}). Everyone who arrives before the opening gets a place drawn by lot at the opening: arriving earlier gives no advantage.",
    paused: "Entry is paused for now. Your place is kept: the line will move on from here.",
    missed_turn: "Your turn came, but nobody came back to this page to go in within {w} (a closed tab, a phone asleep), and the place went to the next person. This is a new place in line: keep this page open so you do not miss it.",
    seconds: "{n} seconds",
    minutes: "{n} minutes",
    closed: "The service is closed. Your place, if you have one, is kept.",
    ticket: "Ticket number",
    receipt: "Receipt",
    arrived: "arrived",
    lottery_committed: "Pre-queue draw: varco is bound to a seed whose SHA-256 is {c}",
    lottery_revealed: "Pre-queue draw: seed {s} over {n} tickets (SHA-256 published before: {c}). Check it with varco lottery verify.",
    no_cookie: "Your browser did not keep the line's cookie, and without it your place cannot be kept. Allow cookies for this site, then reload this page.",
};

fn strings(l: Language) -> &'static Strings {
    match l {
        Language::It => &IT,
        Language::En => &EN,
    }
}

/// The estimated wait in words, appended: a range of minutes, one figure
/// when the range collapses, or "under a minute"; in hours once the wait
/// may pass two hours and is surely over one ("between 150 and 200
/// minutes" asks people to divide). The low end is rounded down (to a
/// minute at least): a person told too long a wait may leave and miss
/// the turn.
/// `waiting.html`'s script says the same from the status answers.
fn push_minutes_range(out: &mut String, s: &Strings, status: &Status) {
    let (Some(lo), Some(hi)) = (status.eta_low_seconds, status.eta_high_seconds) else {
        out.push_str(s.eta_unknown);
        return;
    };
    let (lo, hi) = ((lo / 60).max(1), hi.div_ceil(60).max(1));
    if hi <= 1 {
        out.push_str(s.eta_soon);
        return;
    }
    let (lo, hi, about, range) = if hi > 120 && lo >= 60 {
        (
            lo / 60,
            hi.div_ceil(60),
            s.eta_hours_about,
            s.eta_hours_range,
        )
    } else {
        (lo, hi, s.eta_about, s.eta_range)
    };
    let (format, figures): (&str, &[(&str, u64)]) = if lo >= hi {
        (about, &[("{n}", hi)])
    } else {
        (range, &[("{lo}", lo), ("{hi}", hi)])
    };
    // Each format holds its placeholders once, in this order.
    let mut rest = format;
    for &(name, v) in figures {
        if let Some(at) = rest.find(name) {
            out.push_str(&rest[..at]);
            push_figure(out, s, v);
            rest = &rest[at + name.len()..];
        }
    }
    out.push_str(rest);
}

/// A figure a person reads (a place in line, people ahead, a wait), with
/// its thousands grouped as the language writes them: `12.345` in
/// Italian, where `12345` reads as a code. Never for a figure a program
/// reads (a poll's delay) or one to be quoted (a ticket number).
fn push_figure(out: &mut String, s: &Strings, v: u64) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v);
    if v < s.group_from {
        out.push_str(digits);
        return;
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(s.thousands);
        }
        out.push(d);
    }
}

#[cfg(test)]
fn minutes_range(s: &Strings, status: &Status) -> String {
    let mut out = String::new();
    push_minutes_range(&mut out, s, status);
    out
}

/// The default template. `{{name}}` is replaced by a variable (escaped);
/// the README lists them all for operators who bring their own. Its
/// script carries no comments (every person in line downloads them), so
/// here: it polls when the page comes back into view, from the
/// back-forward cache, or online, because browsers hold a hidden page's
/// timers back for a minute or more while its turn comes and the claim
/// window runs; the poll pending then is cancelled, so two never chain.
/// What must outlive a reload (it loads afresh at most once a minute,
/// and at most once for a missing cookie) is kept in the tab's
/// `sessionStorage`, or where it may keep nothing there (an Android
/// WebView keeps no DOM storage unless its app allows it) in the tab's
/// `window.name`: without either, a page whose ticket lapsed stayed
/// stale for as long as it was open. A `window.name` that is not varco's
/// is the portal's and left alone; varco's is emptied when the turn comes.
/// Where neither may be used, in the page's own memory: a reload within
/// the minute is then not known, but it is only one a poll (a fresh page
/// finds its ticket again, or its new situation); not for a missing
/// cookie, which would take a new place at every poll: said at once.
pub const DEFAULT_TEMPLATE: &str = include_str!("waiting.html");

/// Every variable a template may use, in the order `render` fills them.
pub const VARIABLES: [&str; 36] = [
    "lang",
    "title",
    "intro",
    "label_position",
    "label_ahead",
    "label_eta",
    "label_updated",
    "label_ticket",
    "eta_range_format",
    "eta_unknown",
    "message",
    "room",
    "position",
    "ahead",
    "eta",
    "updated",
    "ticket",
    "queue_length",
    "status_url",
    "next_url",
    "poll_seconds",
    "refresh_seconds",
    "updated_time",
    "eta_about_format",
    "eta_soon",
    "label_receipt",
    "receipt",
    "receipt_code",
    "arrived_time",
    "lottery",
    "situation",
    "eta_hours_range_format",
    "eta_hours_about_format",
    "no_cookie_message",
    "arrived",
    "poll_cap_seconds",
];

enum Part {
    Text(Box<str>),
    Var(usize),
}

/// A template split once into text and variables, so rendering a page is
/// a run of copies (the waiting page is served to every person in line on
/// every reload: it is varco's second hot path). Each language's own
/// strings are put in place at compile time, so a page copies them as
/// part of the text around them.
pub struct Template {
    /// The parts for each language, indexed by `lang_index`.
    /// By language, then situation.
    baked: [[Vec<Part>; 4]; 2],
    text_len: usize,
    /// The page's Content-Security-Policy: varco's own page only.
    policy: Option<HeaderValue>,
}

fn lang_index(l: Language) -> usize {
    match l {
        Language::It => 0,
        Language::En => 1,
    }
}

/// The situations a page is baked for, as [`Status::situation`] names
/// them: its title and opening line are the situation's.
const SITUATIONS: [&str; 4] = ["waiting", "prequeue", "paused", "closed"];

fn situation_index(situation: &str) -> usize {
    SITUATIONS.iter().position(|s| *s == situation).unwrap_or(0)
}

/// The value of a variable that depends on the language and the
/// situation alone (escaped when the template is compiled, like every
/// other value).
fn language_constant(name: &str, s: &Strings, situation: &str) -> Option<&'static str> {
    Some(match name {
        "lang" => s.language.tag(),
        "title" if situation == "closed" => s.title_closed,
        "title" => s.title,
        "intro" => match situation {
            "prequeue" => s.intro_prequeue,
            "closed" => s.intro_closed,
            _ => s.intro,
        },
        "label_position" => s.position,
        "label_ahead" => s.ahead,
        "label_eta" => s.eta,
        "label_updated" => s.updated,
        "label_ticket" => s.ticket,
        "label_receipt" => s.receipt,
        "eta_range_format" => s.eta_range,
        "eta_about_format" => s.eta_about,
        "eta_unknown" => s.eta_unknown,
        "eta_soon" => s.eta_soon,
        "eta_hours_range_format" => s.eta_hours_range,
        "eta_hours_about_format" => s.eta_hours_about,
        "no_cookie_message" => s.no_cookie,
        _ => return None,
    })
}

impl Template {
    /// Unknown `{{names}}` stay in the page as written (the config
    /// refuses a plain one: [`super::unknown_variables`]).
    pub fn compile(text: &str) -> Template {
        let parts: Vec<Part> = super::cut_template_outside_scripts(text, |name| {
            VARIABLES.iter().position(|v| *v == name)
        })
        .into_iter()
        .map(|p| match p {
            super::Piece::Text(t) => Part::Text(t.into()),
            super::Piece::Var(i) => Part::Var(i),
        })
        .collect();
        Template {
            text_len: text.len(),
            policy: (text == DEFAULT_TEMPLATE).then(|| super::own_page_policy(text)),
            baked: [&IT, &EN].map(|s| SITUATIONS.map(|situation| bake(&parts, s, situation))),
        }
    }

    pub fn default_template() -> &'static Template {
        static DEFAULT: std::sync::OnceLock<Template> = std::sync::OnceLock::new();
        DEFAULT.get_or_init(|| Template::compile(DEFAULT_TEMPLATE))
    }
}

/// `parts` with the language's strings written into the text, adjacent
/// texts joined.
fn bake(parts: &[Part], s: &Strings, situation: &str) -> Vec<Part> {
    let mut baked = Vec::new();
    let mut literal = String::new();
    for part in parts {
        match part {
            Part::Text(t) => literal.push_str(t),
            Part::Var(i) => match language_constant(VARIABLES[*i], s, situation) {
                Some(text) => escape_into(&mut literal, text),
                None => {
                    if !literal.is_empty() {
                        baked.push(Part::Text(std::mem::take(&mut literal).into()));
                    }
                    baked.push(Part::Var(*i));
                }
            },
        }
    }
    if !literal.is_empty() {
        baked.push(Part::Text(literal.into()));
    }
    baked
}

/// The page for `status`, rendered from `template`; every value escaped
/// (the figures varco writes itself need none).
pub fn render(template: &Template, status: &Status, lang: Language, next_url: &str) -> String {
    use std::borrow::Cow;
    let s = strings(lang);
    // The message is the situation's, so the page and its script read
    // the same state off a status answer.
    let situation = status.situation();
    let message: Cow<str> = if situation == "closed" {
        s.closed.into()
    } else if situation == "prequeue" {
        let (day, time, zone) = match status
            .opens_at
            .and_then(|t| crate::timefmt::opening(t, status.opens_offset_s))
        {
            // "1 December 2026", as a person writes a date: an ISO
            // date reads as a code to most. Italian puts the article in
            // it, as it is said: "il 1º", "l'8", "l'11", "il 30".
            Some(((y, mo, d), time, zone)) => {
                let month = s.months[(mo as usize).clamp(1, 12) - 1];
                let day = match (lang, d) {
                    (Language::En, _) => format!("{d} {month} {y}"),
                    (Language::It, 1) => format!("il 1º {month} {y}"),
                    (Language::It, 8 | 11) => format!("l'{d} {month} {y}"),
                    (Language::It, _) => format!("il {d} {month} {y}"),
                };
                (day, time, zone)
            }
            None => ("?".into(), "?".into(), "UTC".into()),
        };
        s.prequeue
            .replace("{day}", &day)
            .replace("{time}", &time)
            .replace("{zone}", &zone)
            .into()
    } else if situation == "paused" {
        s.paused.into()
    } else if status.missed_turn {
        let w = status.claim_window_seconds;
        let window = if w >= 120 && w.is_multiple_of(60) {
            s.minutes.replace("{n}", &(w / 60).to_string())
        } else {
            s.seconds.replace("{n}", &w.to_string())
        };
        s.missed_turn.replace("{w}", &window).into()
    } else {
        s.keep_open.into()
    };
    let message: Cow<str> = if status.unsent {
        format!("{} {message}", s.unsent).into()
    } else {
        message
    };
    let poll = status.poll_seconds();
    let lottery: Cow<str> = match &status.lottery {
        None => "".into(),
        Some(LotteryInfo {
            commitment,
            seed: Some(seed),
            size,
        }) => s
            .lottery_revealed
            .replace("{s}", seed)
            .replace("{n}", &{
                let mut n = String::new();
                push_figure(&mut n, s, size.unwrap_or(0));
                n
            })
            .replace("{c}", commitment)
            .into(),
        Some(l) => s.lottery_committed.replace("{c}", &l.commitment).into(),
    };
    let receipt = status.receipt.as_deref().unwrap_or("–");
    // The figures are written once into one scratch string and referred
    // to by range: the page is rendered for every person on every reload,
    // and a string per figure was a good part of its cost. Only varco
    // writes there (digits, times, its own strings; the room's name
    // escaped on the way in), so nothing in it is escaped again.
    let mut scratch = String::with_capacity(256);
    let mut add = |f: &dyn Fn(&mut String)| {
        let start = scratch.len();
        f(&mut scratch);
        Value::Scratch(start..scratch.len())
    };
    let number = |v: Option<u64>| {
        move |out: &mut String| match v {
            Some(n) => crate::timefmt::push_number(out, n),
            None => out.push('–'),
        }
    };
    let figure = |v: Option<u64>| {
        move |out: &mut String| match v {
            Some(n) => push_figure(out, s, n),
            None => out.push('–'),
        }
    };
    let position = add(&figure(status.position));
    let ahead = add(&figure(status.ahead));
    // Quoted, as the receipt has it: not grouped.
    let ticket = add(&number(status.ticket));
    let queue_length = add(&figure(Some(status.queue_length)));
    let status_url = add(&|out: &mut String| {
        out.push_str("/.varco/status?room=");
        escape_into(out, status.room);
    });
    let poll_text = add(&number(Some(poll)));
    // Without JavaScript: reload a little later than the script would.
    let refresh = add(&number(Some(poll + 5)));
    let poll_cap = add(&number(Some(status.poll_cap_seconds())));
    let updated = add(&|out: &mut String| crate::timefmt::push_rfc3339(out, status.updated));
    // "12:00:59 UTC": readable; the script shows local time instead.
    let updated_time = add(&|out: &mut String| {
        crate::timefmt::push_time_of_day(out, status.updated);
        out.push_str(" UTC");
    });
    let arrived = add(&|out: &mut String| {
        if let Some(a) = status.arrived {
            crate::timefmt::push_rfc3339(out, a);
        }
    });
    // A place in a pre-queue may be taken days before the opening: its
    // time alone would read as today's.
    let arrived_time = add(&|out: &mut String| {
        if let Some(a) = status.arrived {
            out.push_str(s.arrived);
            out.push(' ');
            if a / 86_400_000 != status.updated / 86_400_000 {
                crate::timefmt::push_day(out, a);
                out.push(' ');
            }
            crate::timefmt::push_time_of_day(out, a);
            out.push_str(" UTC");
        }
    });
    let eta = add(&|out: &mut String| push_minutes_range(out, s, status));
    // Indexed like VARIABLES; the language's own strings are in the baked
    // template already (`language_constant`).
    let values: [Value; 36] = [
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Escaped(&message),
        Value::Escaped(status.room),
        position,
        ahead,
        eta,
        updated,
        ticket,
        queue_length,
        status_url,
        Value::Escaped(next_url),
        poll_text,
        refresh,
        updated_time,
        Value::Baked,
        Value::Baked,
        Value::Baked,
        Value::Escaped(receipt),
        Value::Escaped(receipt.rsplit('-').next().unwrap_or("–")),
        arrived_time,
        Value::Escaped(&lottery),
        Value::Escaped(situation),
        Value::Baked,
        Value::Baked,
        Value::Baked,
        arrived,
        poll_cap,
    ];
    let mut out = String::with_capacity(template.text_len + 512);
    for part in &template.baked[lang_index(lang)][situation_index(situation)] {
        match part {
            Part::Text(t) => out.push_str(t),
            Part::Var(i) => match &values[*i] {
                Value::Escaped(t) => escape_into(&mut out, t),
                Value::Scratch(r) => out.push_str(scratch.get(r.clone()).unwrap_or("")),
                Value::Baked => {}
            },
        }
    }
    out
}

/// A variable's value: text, escaped as it goes into the page; a range of
/// the render's scratch; or a language's string, which `bake` wrote into
/// the template, so no part asks for it.
enum Value<'a> {
    Escaped(&'a str),
    Scratch(std::ops::Range<usize>),
    Baked,
}

/// The waiting page (HTML, 200) or, for API clients, the status JSON with
/// 429 and Retry-After. Never cacheable.
pub fn respond(
    template: &Template,
    status: &Status,
    lang: Language,
    next_url: &str,
    json: bool,
) -> Response<Body> {
    let retry = status.poll_seconds();
    let (code, content_type, body) = if json {
        let code = if status.state == "closed" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::TOO_MANY_REQUESTS
        };
        (code, "application/json", to_json(status))
    } else {
        let code = if status.state == "closed" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (
            code,
            "text/html; charset=utf-8",
            render(template, status, lang, next_url).into_bytes(),
        )
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    mark_own(h);
    h.insert(RETRY_AFTER, seconds(retry));
    if let (false, Some(policy)) = (json, &template.policy) {
        h.insert(CONTENT_SECURITY_POLICY, policy.clone());
    }
    r
}

/// A number of seconds as a header value; the poll delays a page gives
/// (1 to 35) are made once, not on every page.
fn seconds(secs: u64) -> HeaderValue {
    static SMALL: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
    let small = SMALL.get_or_init(|| (0..=60u64).map(HeaderValue::from).collect());
    usize::try_from(secs)
        .ok()
        .and_then(|i| small.get(i))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(secs))
}

/// The status as JSON, written into a buffer sized for the usual answer
/// (~500 bytes), not grown to it.
fn to_json(status: &Status) -> Vec<u8> {
    let mut json = Vec::with_capacity(640);
    if serde_json::to_writer(&mut json, status).is_err() {
        json.clear();
    }
    json
}

/// The JSON answer of `/.varco/status`. Retry-After says when to ask
/// again: the waiting page's script follows it, so the claim window's cap
/// holds for every poll, not only the first.
pub fn status_json(status: &Status) -> Response<Body> {
    let mut r = Response::new(full(to_json(status)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    mark_own(h);
    h.insert(RETRY_AFTER, seconds(status.poll_seconds()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status<'static> {
        Status {
            room: "portal",
            state: "waiting",
            position: Some(42),
            ahead: Some(41),
            eta_seconds: Some(300),
            eta_low_seconds: Some(240),
            eta_high_seconds: Some(450),
            queue_length: 100,
            prequeue: false,
            opens_at: None,
            opens_offset_s: 0,
            // 2026-12-01T08:00:00Z
            updated: 1_796_112_000_000,
            ticket: Some(142),
            paused: false,
            receipt: Some("portal-142-20261201T075500Z-K7QX9M2A".into()),
            // 2026-12-01T07:55:00Z
            arrived: Some(1_796_111_700_000),
            lottery: None,
            missed_turn: false,
            claim_window_seconds: 60,
            unsent: false,
            no_cookie: false,
        }
    }

    #[test]
    fn an_arrival_on_another_day_is_told_with_its_day() {
        let mut st = status();
        // 2026-11-29T07:55:00Z, a pre-queue place taken two days before.
        st.arrived = Some(1_796_111_700_000 - 2 * 86_400_000);
        let html = render(Template::default_template(), &st, Language::En, "/");
        assert!(
            html.contains(">arrived 2026-11-29 07:55:00 UTC<"),
            "{}",
            &html[html.find("id=\"arrived\"").unwrap()..][..80]
        );
    }

    #[test]
    fn the_opening_is_told_in_the_zone_it_was_set_in() {
        let mut st = status();
        st.prequeue = true;
        // 2026-12-01T08:00:00Z, set as 09:00+01:00.
        st.opens_at = Some(1_796_112_000_000);
        st.opens_offset_s = 3600;
        let page = |st: &Status, lang| render(Template::default_template(), st, lang, "/");
        assert!(
            page(&st, Language::It).contains("apre il 1º dicembre 2026 alle 09:00 (UTC+01:00).")
        );
        assert!(page(&st, Language::En).contains("opens on 1 December 2026 at 09:00 (UTC+01:00)."));
        st.opens_offset_s = 0;
        assert!(page(&st, Language::En).contains("opens on 1 December 2026 at 08:00 (UTC)."));
        st.opens_offset_s = -5 * 3600 - 1800;
        assert!(page(&st, Language::En).contains("opens on 1 December 2026 at 02:30 (UTC-05:30)."));
        // The day before, in its zone.
        st.opens_offset_s = -9 * 3600;
        assert!(
            page(&st, Language::It).contains("apre il 30 novembre 2026 alle 23:00 (UTC-09:00).")
        );
        // Each month by its name.
        st.opens_offset_s = 0;
        st.opens_at = Some(1_767_225_600_000); // 2026-01-01T00:00:00Z
        assert!(page(&st, Language::It).contains("apre il 1º gennaio 2026 alle 00:00"));
        assert!(page(&st, Language::En).contains("opens on 1 January 2026 at 00:00"));
        // The article as it is said: "l'8", "l'11" ("il 8" is not Italian).
        for (day, it) in [
            (8, "l&#39;8 gennaio"),
            (11, "l&#39;11 gennaio"),
            (2, "il 2 gennaio"),
        ] {
            st.opens_at = Some(1_767_225_600_000 + (day - 1) * 86_400_000);
            let text = page(&st, Language::It);
            assert!(
                text.contains(&format!("apre {it} 2026 alle 00:00")),
                "{day}"
            );
            let en = format!("opens on {day} January 2026");
            assert!(page(&st, Language::En).contains(&en), "{day}");
        }
    }

    #[test]
    fn the_title_and_opening_line_are_the_situations() {
        let page = |st: &Status, lang| render(Template::default_template(), st, lang, "/");
        let mut st = status();
        for (lang, arrival) in [
            (Language::En, "order of arrival"),
            (Language::It, "ordine di arrivo"),
        ] {
            assert!(page(&st, lang).contains(arrival));
        }
        st.prequeue = true;
        for (lang, arrival, draw) in [
            (Language::En, "order of arrival", "in the order of the draw"),
            (
                Language::It,
                "ordine di arrivo",
                "nell&#39;ordine del sorteggio",
            ),
        ] {
            let p = page(&st, lang);
            assert!(!p.contains(arrival), "a draw is no order of arrival: {p}");
            assert!(p.contains(draw), "{p}");
        }
        st.prequeue = false;
        st.state = "closed";
        let p = page(&st, Language::En);
        assert!(p.contains("<title>Service closed</title>"), "{p}");
        assert!(!p.contains("You are in line"), "{p}");
        st.state = "waiting";
        st.paused = true;
        assert!(!page(&st, Language::En).contains("a few minutes"));
        st.paused = false;
        st.unsent = true;
        let p = page(&st, Language::En);
        assert!(p.contains("The form you sent was NOT received."), "{p}");
        assert!(p.contains("Keep this page open"), "and what to do now");
        let json = String::from_utf8(to_json(&st)).unwrap();
        assert!(!json.contains("unsent"), "{json}");
    }

    #[test]
    fn a_missed_turn_is_told_in_the_window_s_own_unit() {
        let mut st = status();
        st.missed_turn = true;
        st.claim_window_seconds = 300;
        let page = |st: &Status, lang| render(Template::default_template(), st, lang, "/");
        assert!(page(&st, Language::It).contains("entro 5 minuti nessuno"));
        assert!(page(&st, Language::En).contains("within 5 minutes (a closed tab"));
        st.claim_window_seconds = 90;
        assert!(page(&st, Language::En).contains("within 90 seconds"));
        st.paused = true;
        assert!(
            !page(&st, Language::En).contains("Your turn came"),
            "a pause says what matters now"
        );
        st.paused = false;
        st.missed_turn = false;
        assert!(!page(&st, Language::En).contains("Your turn came"));
        let json = |st: &Status| String::from_utf8(to_json(st)).unwrap();
        assert!(!json(&st).contains("missed_turn"), "{}", json(&st));
        st.missed_turn = true;
        assert!(json(&st).contains("\"missed_turn\":true"));
    }

    #[test]
    fn page_is_small_localised_and_complete() {
        for (lang, word) in [(Language::It, "Il tuo posto"), (Language::En, "Your place")] {
            let html = render(
                Template::default_template(),
                &status(),
                lang,
                "/apply?x=<1>",
            );
            assert!(html.len() < 30 * 1024, "{} bytes", html.len());
            assert!(html.contains(word));
            assert!(html.contains(">42<"), "position shown");
            assert!(
                html.contains("portal-142-20261201T075500Z-K7QX9M2A"),
                "receipt shown"
            );
            assert!(html.contains(">K7QX9M2A<"), "receipt code shown");
            assert!(html.contains(" 07:55:00 UTC"), "arrival shown");
            assert!(
                !html.contains("2026-12-01 07:55"),
                "today's without its day"
            );
            assert!(
                html.contains(r#"datetime="2026-12-01T08:00:00Z">08:00:00 UTC<"#),
                "last update shown"
            );
            assert!(
                html.contains(">tra 4 e 8 minuti<") || html.contains(">between 4 and 8 minutes<")
            );
            assert!(html.contains("aria-live"));
            assert!(!html.contains("{{"), "unfilled variable");
            assert!(html.contains("/apply?x=&lt;1&gt;"), "escaped");
            assert!(
                !html.contains("http://") && !html.contains("https://"),
                "no external assets"
            );
        }
    }

    /// The language's strings are written into the template when it is
    /// compiled: each language gets its own, next to the per-request
    /// values, and unknown names stay as written.
    #[test]
    fn an_operator_template_gets_each_languages_strings() {
        let t = Template::compile(
            "{{lang}}|{{ title }}|{{room}}|{{label_receipt}}{{eta_soon}}|{{nope}}|{{position}}|{{next_url}}|{{updated_time}}",
        );
        let mut st = status();
        st.room = "a<b";
        assert_eq!(
            render(&t, &st, Language::It, "/x?a=1&b=2"),
            "it|Sei in coda|a&lt;b|Ricevutameno di un minuto|{{nope}}|42|/x?a=1&amp;b=2|08:00:00 UTC"
        );
        assert_eq!(
            render(&t, &st, Language::En, "/"),
            "en|You are in line|a&lt;b|Receiptunder a minute|{{nope}}|42|/|08:00:00 UTC"
        );
        // Escaped too, so every value is safe in a single-quoted attribute.
        let t = Template::compile("{{intro}}|{{message}}");
        st.prequeue = true;
        let page = render(&t, &st, Language::It, "/");
        assert!(
            page.contains("nell&#39;ordine") && page.contains("dell&#39;apertura"),
            "{page}"
        );
    }

    #[test]
    fn json_times_are_rfc3339() {
        let mut st = status();
        st.opens_at = Some(1_796_112_000_250);
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(v["updated"], "2026-12-01T08:00:00Z");
        assert_eq!(v["arrived"], "2026-12-01T07:55:00Z");
        assert_eq!(v["opens_at"], "2026-12-01T08:00:00.25Z");
        assert_eq!(v["room"], "portal");
        st.arrived = None;
        st.opens_at = None;
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert!(v["arrived"].is_null() && v["opens_at"].is_null());
    }

    /// Grouped as the browser's `Intl.NumberFormat` groups them (the
    /// browser test checks the script's own figures against these).
    #[test]
    fn figures_are_grouped_as_each_language_writes_them() {
        let figure = |s: &Strings, v| {
            let mut out = String::new();
            push_figure(&mut out, s, v);
            out
        };
        for (v, it, en) in [
            (0, "0", "0"),
            (999, "999", "999"),
            (1234, "1234", "1,234"),
            (9999, "9999", "9,999"),
            (12345, "12.345", "12,345"),
            (123456, "123.456", "123,456"),
            (1234567, "1.234.567", "1,234,567"),
            (
                u64::MAX,
                "18.446.744.073.709.551.615",
                "18,446,744,073,709,551,615",
            ),
        ] {
            assert_eq!((figure(&IT, v).as_str(), figure(&EN, v).as_str()), (it, en));
        }
        let mut st = status();
        (st.position, st.ahead, st.queue_length, st.ticket) =
            (Some(12345), Some(12344), 20000, Some(13000));
        let page = render(Template::default_template(), &st, Language::It, "/");
        for shown in [
            ">12.345</dd>",
            ">12.344</dd>",
            "<span id=\"ticket\">13000</span>",
        ] {
            assert!(page.contains(shown), "{shown} not in the page");
        }
        let page = render(Template::default_template(), &st, Language::En, "/");
        assert!(page.contains(">12,345</dd>"), "English groups with a comma");
    }

    #[test]
    fn the_wait_reads_naturally() {
        let mut st = status();
        let eta = |st: &Status| minutes_range(&IT, st);
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(240), Some(450));
        assert_eq!(eta(&st), "tra 4 e 8 minuti");
        // 61 s is a minute, not two: the low end rounded down.
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(61), Some(100));
        assert_eq!(eta(&st), "tra 1 e 2 minuti");
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(120), Some(120));
        assert_eq!(eta(&st), "circa 2 minuti");
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(10), Some(40));
        assert_eq!(eta(&st), "meno di un minuto");
        (st.eta_low_seconds, st.eta_high_seconds) = (None, None);
        assert_eq!(eta(&st), "non ancora stimabile");
        // Hours once the wait may pass two hours and is surely over one;
        // the low end rounded down. The browser test checks the page's
        // script says the same.
        for (lo, hi, it, en) in [
            (9600, 14400, "tra 2 e 4 ore", "between 2 and 4 hours"),
            (10800, 10800, "circa 3 ore", "about 3 hours"),
            (
                1800,
                12000,
                "tra 30 e 200 minuti",
                "between 30 and 200 minutes",
            ),
            (
                3600,
                7200,
                "tra 60 e 120 minuti",
                "between 60 and 120 minutes",
            ),
            (3600, 7201, "tra 1 e 3 ore", "between 1 and 3 hours"),
        ] {
            (st.eta_low_seconds, st.eta_high_seconds) = (Some(lo), Some(hi));
            assert_eq!(
                (eta(&st).as_str(), minutes_range(&EN, &st).as_str()),
                (it, en)
            );
        }
    }

    /// Operators write their own templates from the README's table.
    #[test]
    fn every_variable_is_in_the_readme() {
        let readme = include_str!("../../README.md");
        for v in VARIABLES {
            assert!(readme.contains(&format!("`{{{{{v}}}}}`")), "{v}");
        }
    }

    #[test]
    fn language_strings_are_html_safe() {
        for s in [&IT, &EN] {
            for text in [
                s.language.tag(),
                s.title,
                s.intro,
                s.position,
                s.ahead,
                s.eta,
                s.eta_unknown,
                s.eta_range,
                s.updated,
                s.keep_open,
                s.prequeue,
                s.paused,
                s.closed,
                s.ticket,
                s.eta_about,
                s.eta_soon,
                s.eta_hours_range,
                s.eta_hours_about,
                s.receipt,
                s.arrived,
                s.lottery_committed,
                s.lottery_revealed,
            ] {
                assert!(!text.contains(['<', '>', '&', '"']), "{text}");
            }
        }
    }

    #[test]
    fn language_follows_accept_language() {
        let mut h = HeaderMap::new();
        assert_eq!(language(&h, Language::It), Language::It);
        h.insert(
            http::header::ACCEPT_LANGUAGE,
            "en-GB,en;q=0.9,it;q=0.8".parse().unwrap(),
        );
        assert_eq!(language(&h, Language::It), Language::En);
        h.insert(
            http::header::ACCEPT_LANGUAGE,
            "de-DE, it;q=0.5".parse().unwrap(),
        );
        assert_eq!(language(&h, Language::En), Language::It);
        let pick = |accept: &[u8], default| {
            let mut h = HeaderMap::new();
            let v = http::HeaderValue::from_bytes(accept).unwrap();
            h.insert(http::header::ACCEPT_LANGUAGE, v);
            language(&h, default)
        };
        assert_eq!(pick(b"en;q=0", Language::It), Language::It, "q=0 refuses");
        assert_eq!(
            pick(b"it;q=0", Language::It),
            Language::En,
            "the default too"
        );
        assert_eq!(pick(b"de, it;q=0", Language::It), Language::En);
        assert_eq!(pick(b"it;q=0, en;q=0", Language::It), Language::It);
        assert_eq!(pick(b"it;q=0.000, en;q=0.001", Language::It), Language::En);
        assert_eq!(pick(b"it;q=0.5,en;q=0.55", Language::It), Language::En);
        assert_eq!(pick(b"en;q=0.9,it", Language::En), Language::It);
        assert_eq!(
            pick(b"EN-us;Q=0.1 , IT ; q=0.2", Language::En),
            Language::It
        );
        assert_eq!(pick(b"it;q=0.2,en;q=bogus", Language::It), Language::En);
        assert_eq!(pick(b"en-US;q=0", Language::En), Language::En);
        assert_eq!(
            pick(b"enm, itx", Language::It),
            Language::It,
            "not en, not it"
        );
        assert_eq!(pick(b"it-CH", Language::En), Language::It);
        assert_eq!(pick(b"it_IT", Language::En), Language::It);
        assert_eq!(pick(b"en_GB, it;q=0.5", Language::It), Language::En);
        assert_eq!(
            pick(b"fr-CA,\xe9t;q=0.3,en;q=0.3", Language::It),
            Language::En
        );
    }

    #[test]
    fn q_values_read_as_thousandths() {
        for (v, q) in [
            ("0", 0),
            ("0.", 0),
            ("0.5", 500),
            ("0.05", 50),
            ("0.999", 999),
            (" 0.25 ", 250),
            (".5", 1000),
            (".", 1000),
            ("1", 1000),
            ("1.000", 1000),
            ("0.1234", 1000),
            ("0.x", 1000),
            ("", 1000),
        ] {
            assert_eq!(qvalue(v.as_bytes()), q, "{v:?}");
        }
    }

    #[test]
    fn seconds_headers_read_as_numbers() {
        for v in [0, 1, 20, 35, 60, 61, 3600] {
            assert_eq!(seconds(v), v.to_string().as_str());
        }
    }

    #[test]
    fn polls_are_never_immediate() {
        let mut s = status();
        s.eta_seconds = Some(0);
        assert!(s.poll_seconds() >= 5);
        s.eta_seconds = None;
        assert!(s.poll_seconds() >= 5);
    }

    #[test]
    fn a_prequeue_page_asks_seldom_long_before_the_opening_and_never_past_it() {
        let mut s = status();
        s.state = "waiting";
        s.prequeue = true;
        s.eta_seconds = None;
        s.updated = 1_796_112_000_000;
        for window in [15, 60, 300] {
            s.claim_window_seconds = window;
            let usual = (window * 10 / 26).clamp(5, 30).min(20);
            for left_s in [0, 10, 40, 41, 100, 600, 3_600, 3 * 86_400] {
                s.opens_at = Some(s.updated + left_s * 1000);
                let poll = s.poll_seconds();
                assert!(poll >= usual, "{window}s window, {left_s}s left: {poll}");
                assert!(poll <= 300, "{left_s}s left: {poll}");
                // The page waits up to 1.3 times the delay: it still asks
                // before the opening while that is further than the usual
                // delay.
                if left_s >= 2 * usual {
                    assert!(poll as f64 * 1.3 < left_s as f64, "{left_s}s left: {poll}");
                }
            }
        }
        s.claim_window_seconds = 60;
        s.opens_at = Some(s.updated + 3 * 86_400_000);
        assert_eq!(s.poll_seconds(), 300, "days ahead");
        s.opens_at = Some(s.updated + 600_000);
        assert_eq!(s.poll_seconds(), 300);
        s.opens_at = Some(s.updated + 100_000);
        assert_eq!(s.poll_seconds(), 50);
        s.opens_at = Some(s.updated + 10_000);
        assert_eq!(s.poll_seconds(), 20, "as near the opening as ever");
        s.prequeue = false;
        s.opens_at = None;
        assert_eq!(s.poll_seconds(), 20, "not a pre-queue: as ever");
    }

    #[test]
    fn two_polls_fit_in_the_claim_window() {
        let mut s = status();
        for window in [15, 20, 30, 60, 300] {
            s.claim_window_seconds = window;
            for eta in [None, Some(0), Some(40), Some(120), Some(100_000)] {
                s.eta_seconds = eta;
                // The page waits up to 1.3 times the poll delay.
                let longest = s.poll_seconds() as f64 * 1.3;
                assert!(
                    2.0 * longest <= window as f64 + 0.01,
                    "window {window}s, eta {eta:?}: polls {longest}s apart"
                );
                assert!(s.poll_seconds() >= 5);
            }
        }
        // Far from the turn a long window still lets the page rest.
        s.claim_window_seconds = 300;
        s.eta_seconds = Some(100_000);
        assert_eq!(s.poll_seconds(), 30);
    }
}
