//! The waiting page and its status JSON. Server-rendered, no external
//! assets, under 30 KiB; Italian or English; polls `/.varco/status` with
//! jitter and moves on by itself when the person is admitted; without
//! JavaScript a meta refresh does the same.

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Response, StatusCode};
use serde::Serialize;

use super::{escape, NO_STORE};
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
        let tag = it.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = it
            .find_map(|p| p.trim().strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let lang = if tag.starts_with("it") {
            Language::It
        } else if tag.starts_with("en") {
            Language::En
        } else {
            continue;
        };
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
    updated: &'static str,
    keep_open: &'static str,
    prequeue: &'static str,
    paused: &'static str,
    closed: &'static str,
    ticket: &'static str,
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
    updated: "Ultimo aggiornamento",
    keep_open: "Tieni aperta questa pagina: entrerai automaticamente. Ricaricarla non ti fa perdere il posto.",
    prequeue: "Il servizio apre alle {opens}. Chi arriva prima dell'apertura riceve un posto estratto a sorte all'apertura: arrivare prima non dà vantaggi.",
    paused: "L'accesso è sospeso per qualche minuto. Il tuo posto è conservato.",
    closed: "Il servizio è chiuso. Il tuo posto, se ne hai uno, è conservato.",
    ticket: "Biglietto numero",
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
    updated: "Last updated",
    keep_open: "Keep this page open: you will get in automatically. Reloading does not lose your place.",
    prequeue: "The service opens at {opens}. Everyone who arrives before the opening gets a place drawn by lot at the opening: arriving earlier gives no advantage.",
    paused: "Entry is paused for a few minutes. Your place is kept.",
    closed: "The service is closed. Your place, if you have one, is kept.",
    ticket: "Ticket number",
};

fn strings(l: Language) -> &'static Strings {
    match l {
        Language::It => &IT,
        Language::En => &EN,
    }
}

fn minutes_range(s: &Strings, status: &Status) -> String {
    match (status.eta_low_seconds, status.eta_high_seconds) {
        (Some(lo), Some(hi)) => s
            .eta_range
            .replace("{lo}", &lo.div_ceil(60).to_string())
            .replace("{hi}", &hi.div_ceil(60).max(1).to_string()),
        _ => s.eta_unknown.to_string(),
    }
}

/// The default template. `{{name}}` is replaced by a variable (escaped);
/// the README lists them all for operators who bring their own.
pub const DEFAULT_TEMPLATE: &str = include_str!("waiting.html");

/// The page for `status`, rendered from `template`.
pub fn render(template: &str, status: &Status, lang: Language, next_url: &str) -> String {
    let s = strings(lang);
    let message = if status.state == "closed" {
        s.closed.to_string()
    } else if status.prequeue {
        s.prequeue
            .replace("{opens}", status.opens_at.as_deref().unwrap_or("?"))
    } else if status.paused {
        s.paused.to_string()
    } else {
        s.keep_open.to_string()
    };
    let show = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_else(|| "–".into());
    let poll = status.poll_seconds();
    let vars: [(&str, String); 22] = [
        ("lang", s.lang.into()),
        ("title", s.title.into()),
        ("intro", s.intro.into()),
        ("label_position", s.position.into()),
        ("label_ahead", s.ahead.into()),
        ("label_eta", s.eta.into()),
        ("label_updated", s.updated.into()),
        ("label_ticket", s.ticket.into()),
        ("eta_range_format", s.eta_range.into()),
        ("eta_unknown", s.eta_unknown.into()),
        ("message", message),
        ("room", status.room.clone()),
        ("position", show(status.position)),
        ("ahead", show(status.ahead)),
        ("eta", minutes_range(s, status)),
        ("updated", status.updated.clone()),
        ("ticket", show(status.ticket)),
        ("queue_length", status.queue_length.to_string()),
        ("status_url", format!("/.varco/status?room={}", status.room)),
        ("next_url", next_url.to_string()),
        ("poll_seconds", poll.to_string()),
        // Without JavaScript: reload a little later than the script would.
        ("refresh_seconds", (poll + 5).to_string()),
    ];
    let mut out = String::with_capacity(template.len() + 512);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let name = after[..end].trim();
                match vars.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => out.push_str(&escape(v)),
                    None => out.push_str(&rest[start..start + 2 + end + 2]),
                }
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The waiting page (HTML, 200) or, for API clients, the status JSON with
/// 429 and Retry-After. Never cacheable.
pub fn respond(
    template: &str,
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
        }
    }

    #[test]
    fn page_is_small_localised_and_complete() {
        for (lang, word) in [(Language::It, "Il tuo posto"), (Language::En, "Your place")] {
            let html = render(DEFAULT_TEMPLATE, &status(), lang, "/apply?x=<1>");
            assert!(html.len() < 30 * 1024, "{} bytes", html.len());
            assert!(html.contains(word));
            assert!(html.contains(">42<"), "position shown");
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
