//! The waiting page and its status JSON. Server-rendered, no external
//! assets, under 30 KiB; Italian or English; polls `/.varco/status` with
//! jitter and moves on by itself when the person is admitted; without
//! JavaScript a meta refresh does the same.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use serde::Serialize;

use super::{escape_into, NO_STORE};
use crate::body::{full, Body};
use crate::config::Language;

/// What the page and the JSON say about one person's place.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub room: String,
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
    /// RFC 3339, when a scheduled opening is ahead.
    pub opens_at: Option<String>,
    /// When this was computed (RFC 3339, UTC).
    pub updated: String,
    /// Ticket number (its arrival order), for the person's own record.
    pub ticket: Option<u64>,
    pub paused: bool,
    /// The person's queue receipt (`room-number-time-code`), to keep.
    pub receipt: Option<String>,
    /// When the ticket was first issued (RFC 3339, UTC).
    pub arrived: Option<String>,
    /// The pre-queue draw, for a room with a scheduled opening.
    pub lottery: Option<LotteryInfo>,
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

impl Status {
    /// Seconds the page should wait before asking again: sooner when the
    /// turn is near, never 0 (a stampede), at most 30.
    pub fn poll_seconds(&self) -> u64 {
        match (self.state, self.eta_seconds) {
            ("admitted", _) => 1,
            (_, Some(eta)) => (eta / 4).clamp(5, 30),
            _ => 20,
        }
    }
}

/// Picks Italian or English from Accept-Language, else the room default.
pub fn language(headers: &HeaderMap, default: Language) -> Language {
    let Some(accept) = headers
        .get(http::header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return default;
    };
    let mut best: Option<(f32, Language)> = None;
    for part in accept.split(',') {
        let mut it = part.trim().split(';');
        // Every browser sends this header on every reload: the tag is
        // matched in place rather than lower-cased into a new string.
        let tag = it.next().unwrap_or("").trim().as_bytes();
        let lang = match tag.get(..2) {
            Some(p) if p.eq_ignore_ascii_case(b"it") => Language::It,
            Some(p) if p.eq_ignore_ascii_case(b"en") => Language::En,
            _ => continue,
        };
        let q = it
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        if best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, lang));
        }
    }
    best.map(|(_, l)| l).unwrap_or(default)
}

struct Strings {
    lang: &'static str,
    title: &'static str,
    intro: &'static str,
    position: &'static str,
    ahead: &'static str,
    eta: &'static str,
    eta_unknown: &'static str,
    eta_range: &'static str,
    /// When the range collapses to one figure.
    eta_about: &'static str,
    /// When the turn is less than a minute away.
    eta_soon: &'static str,
    updated: &'static str,
    keep_open: &'static str,
    prequeue: &'static str,
    paused: &'static str,
    closed: &'static str,
    ticket: &'static str,
    receipt: &'static str,
    arrived: &'static str,
    /// "{c}": the commitment.
    lottery_committed: &'static str,
    /// "{s}", "{n}", "{c}": seed, pre-queue size, commitment.
    lottery_revealed: &'static str,
}

const IT: Strings = Strings {
    lang: "it",
    title: "Sei in coda",
    intro: "Il servizio è molto richiesto in questo momento. Ti faremo entrare appena è il tuo turno, nell'ordine di arrivo.",
    position: "Il tuo posto in coda",
    ahead: "Persone davanti a te",
    eta: "Attesa stimata",
    eta_unknown: "non ancora stimabile",
    eta_range: "tra {lo} e {hi} minuti",
    eta_about: "circa {n} minuti",
    eta_soon: "meno di un minuto",
    updated: "Ultimo aggiornamento",
    keep_open: "Tieni aperta questa pagina: entrerai automaticamente. Ricaricarla non ti fa perdere il posto.",
    prequeue: "Il servizio apre alle {opens}. Chi arriva prima dell'apertura riceve un posto estratto a sorte all'apertura: arrivare prima non dà vantaggi.",
    paused: "L'accesso è sospeso per qualche minuto. Il tuo posto è conservato.",
    closed: "Il servizio è chiuso. Il tuo posto, se ne hai uno, è conservato.",
    ticket: "Biglietto numero",
    receipt: "Ricevuta",
    arrived: "arrivo",
    lottery_committed: "Sorteggio della pre-coda: varco si è impegnato sul seme, di cui questo è lo SHA-256: {c}",
    lottery_revealed: "Sorteggio della pre-coda: seme {s} su {n} biglietti (SHA-256 pubblicato prima: {c}). Verificalo con varco lottery verify.",
};

const EN: Strings = Strings {
    lang: "en",
    title: "You are in line",
    intro: "The service is very busy right now. You will be let in as soon as it is your turn, in order of arrival.",
    position: "Your place in line",
    ahead: "People ahead of you",
    eta: "Estimated wait",
    eta_unknown: "not yet known",
    eta_range: "between {lo} and {hi} minutes",
    eta_about: "about {n} minutes",
    eta_soon: "under a minute",
    updated: "Last updated",
    keep_open: "Keep this page open: you will get in automatically. Reloading does not lose your place.",
    prequeue: "The service opens at {opens}. Everyone who arrives before the opening gets a place drawn by lot at the opening: arriving earlier gives no advantage.",
    paused: "Entry is paused for a few minutes. Your place is kept.",
    closed: "The service is closed. Your place, if you have one, is kept.",
    ticket: "Ticket number",
    receipt: "Receipt",
    arrived: "arrived",
    lottery_committed: "Pre-queue draw: varco is bound to a seed whose SHA-256 is {c}",
    lottery_revealed: "Pre-queue draw: seed {s} over {n} tickets (SHA-256 published before: {c}). Check it with varco lottery verify.",
};

fn strings(l: Language) -> &'static Strings {
    match l {
        Language::It => &IT,
        Language::En => &EN,
    }
}

fn minutes_range(s: &Strings, status: &Status) -> String {
    match (status.eta_low_seconds, status.eta_high_seconds) {
        (Some(lo), Some(hi)) => {
            let (lo, hi) = (lo.div_ceil(60), hi.div_ceil(60).max(1));
            if hi <= 1 {
                s.eta_soon.to_string()
            } else if lo >= hi {
                s.eta_about.replace("{n}", &hi.to_string())
            } else {
                s.eta_range
                    .replace("{lo}", &lo.to_string())
                    .replace("{hi}", &hi.to_string())
            }
        }
        _ => s.eta_unknown.to_string(),
    }
}

/// The default template. `{{name}}` is replaced by a variable (escaped);
/// the README lists them all for operators who bring their own.
pub const DEFAULT_TEMPLATE: &str = include_str!("waiting.html");

/// Every variable a template may use, in the order `render` fills them.
pub const VARIABLES: [&str; 30] = [
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
];

enum Part {
    Text(Box<str>),
    Var(usize),
}

/// A template split once into text and variables, so rendering a page is
/// a run of copies (the waiting page is served to every person in line on
/// every reload: it is varco's second hot path).
pub struct Template {
    parts: Vec<Part>,
    text_len: usize,
}

impl Template {
    /// Unknown `{{names}}` stay in the page as written.
    pub fn compile(text: &str) -> Template {
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(start) = rest.find("{{") {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find("}}") else {
                literal.push_str(&rest[start..]);
                rest = "";
                break;
            };
            match VARIABLES.iter().position(|v| *v == after[..end].trim()) {
                Some(i) => {
                    parts.push(Part::Text(std::mem::take(&mut literal).into()));
                    parts.push(Part::Var(i));
                }
                None => literal.push_str(&rest[start..start + end + 4]),
            }
            rest = &after[end + 2..];
        }
        literal.push_str(rest);
        parts.push(Part::Text(literal.into()));
        Template {
            text_len: text.len(),
            parts,
        }
    }

    pub fn default_template() -> &'static Template {
        static DEFAULT: std::sync::OnceLock<Template> = std::sync::OnceLock::new();
        DEFAULT.get_or_init(|| Template::compile(DEFAULT_TEMPLATE))
    }
}

/// The page for `status`, rendered from `template`; every value escaped.
pub fn render(template: &Template, status: &Status, lang: Language, next_url: &str) -> String {
    use std::borrow::Cow;
    let s = strings(lang);
    let message: Cow<str> = if status.state == "closed" {
        s.closed.into()
    } else if status.prequeue {
        s.prequeue
            .replace("{opens}", status.opens_at.as_deref().unwrap_or("?"))
            .into()
    } else if status.paused {
        s.paused.into()
    } else {
        s.keep_open.into()
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
            .replace("{n}", &size.unwrap_or(0).to_string())
            .replace("{c}", commitment)
            .into(),
        Some(l) => s.lottery_committed.replace("{c}", &l.commitment).into(),
    };
    let receipt = status.receipt.as_deref().unwrap_or("–");
    // The figures are written once into one scratch string and referred
    // to by range: the page is rendered for every person on every reload,
    // and a string per figure was a good part of its cost.
    let mut scratch = String::with_capacity(160);
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
    let position = add(&number(status.position));
    let ahead = add(&number(status.ahead));
    let ticket = add(&number(status.ticket));
    let queue_length = add(&number(Some(status.queue_length)));
    let status_url = add(&|out: &mut String| {
        out.push_str("/.varco/status?room=");
        out.push_str(&status.room);
    });
    let poll_text = add(&number(Some(poll)));
    // Without JavaScript: reload a little later than the script would.
    let refresh = add(&number(Some(poll + 5)));
    // "12:00:59 UTC": readable; the script shows local time instead.
    let updated_time = add(&|out: &mut String| match status.updated.get(11..19) {
        Some(t) => {
            out.push_str(t);
            out.push_str(" UTC");
        }
        None => out.push_str(&status.updated),
    });
    let arrived_time = add(&|out: &mut String| {
        if let Some(a) = &status.arrived {
            out.push_str(s.arrived);
            out.push(' ');
            out.push_str(a.get(11..19).unwrap_or(a));
            out.push_str(" UTC");
        }
    });
    let eta = minutes_range(s, status);
    let values: [Value; 30] = [
        Value::Text(s.lang),
        Value::Text(s.title),
        Value::Text(s.intro),
        Value::Text(s.position),
        Value::Text(s.ahead),
        Value::Text(s.eta),
        Value::Text(s.updated),
        Value::Text(s.ticket),
        Value::Text(s.eta_range),
        Value::Text(s.eta_unknown),
        Value::Text(&message),
        Value::Text(&status.room),
        position,
        ahead,
        Value::Text(&eta),
        Value::Text(&status.updated),
        ticket,
        queue_length,
        status_url,
        Value::Text(next_url),
        poll_text,
        refresh,
        updated_time,
        Value::Text(s.eta_about),
        Value::Text(s.eta_soon),
        Value::Text(s.receipt),
        Value::Text(receipt),
        Value::Text(receipt.rsplit('-').next().unwrap_or("–")),
        arrived_time,
        Value::Text(&lottery),
    ];
    let mut out = String::with_capacity(template.text_len + 512);
    for part in &template.parts {
        match part {
            Part::Text(t) => out.push_str(t),
            // The language strings are varco's own and HTML-safe (a test
            // pins it); everything else is escaped.
            Part::Var(i) if *i < TRUSTED_VARIABLES => out.push_str(values[*i].get(&scratch)),
            Part::Var(i) => escape_into(&mut out, values[*i].get(&scratch)),
        }
    }
    out
}

/// The first variables come from the `Strings` tables, not from requests.
const TRUSTED_VARIABLES: usize = 10;

/// A variable's value: borrowed text, or a range of the render's scratch.
enum Value<'a> {
    Text(&'a str),
    Scratch(std::ops::Range<usize>),
}

impl<'a> Value<'a> {
    fn get<'b>(&'b self, scratch: &'b str) -> &'b str
    where
        'a: 'b,
    {
        match self {
            Value::Text(t) => t,
            Value::Scratch(r) => scratch.get(r.clone()).unwrap_or(""),
        }
    }
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
        (
            code,
            "application/json",
            serde_json::to_string(status).unwrap_or_default(),
        )
    } else {
        let code = if status.state == "closed" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (
            code,
            "text/html; charset=utf-8",
            render(template, status, lang, next_url),
        )
    };
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, NO_STORE);
    h.insert(RETRY_AFTER, HeaderValue::from(retry));
    r
}

/// The JSON answer of `/.varco/status`.
pub fn status_json(status: &Status) -> Response<Body> {
    let mut r = Response::new(full(serde_json::to_string(status).unwrap_or_default()));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, NO_STORE);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            room: "portal".into(),
            state: "waiting",
            position: Some(42),
            ahead: Some(41),
            eta_seconds: Some(300),
            eta_low_seconds: Some(240),
            eta_high_seconds: Some(450),
            queue_length: 100,
            prequeue: false,
            opens_at: None,
            updated: "2026-12-01T08:00:00Z".into(),
            ticket: Some(142),
            paused: false,
            receipt: Some("portal-142-20261201T075500Z-K7QX9M2A".into()),
            arrived: Some("2026-12-01T07:55:00Z".into()),
            lottery: None,
        }
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
            assert!(html.contains("07:55:00 UTC"), "arrival shown");
            assert!(html.contains("aria-live"));
            assert!(!html.contains("{{"), "unfilled variable");
            assert!(html.contains("/apply?x=&lt;1&gt;"), "escaped");
            assert!(
                !html.contains("http://") && !html.contains("https://"),
                "no external assets"
            );
        }
    }

    #[test]
    fn the_wait_reads_naturally() {
        let mut st = status();
        let eta = |st: &Status| minutes_range(&IT, st);
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(240), Some(450));
        assert_eq!(eta(&st), "tra 4 e 8 minuti");
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(61), Some(100));
        assert_eq!(eta(&st), "circa 2 minuti");
        (st.eta_low_seconds, st.eta_high_seconds) = (Some(10), Some(40));
        assert_eq!(eta(&st), "meno di un minuto");
        (st.eta_low_seconds, st.eta_high_seconds) = (None, None);
        assert_eq!(eta(&st), "non ancora stimabile");
    }

    #[test]
    fn language_strings_are_html_safe() {
        for s in [&IT, &EN] {
            for text in [
                s.lang,
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
                s.receipt,
                s.arrived,
                s.lottery_committed,
                s.lottery_revealed,
            ] {
                assert!(!text.contains(['<', '>', '&', '"']), "{text}");
            }
        }
        assert_eq!(VARIABLES[TRUSTED_VARIABLES - 1], "eta_unknown");
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
    }

    #[test]
    fn polls_are_never_immediate() {
        let mut s = status();
        s.eta_seconds = Some(0);
        assert!(s.poll_seconds() >= 5);
        s.eta_seconds = None;
        assert!(s.poll_seconds() >= 5);
    }
}
