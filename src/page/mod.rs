//! Pages varco itself answers with. Every one is marked uncacheable:
//! varco's own responses must never be stored and shown to someone else.

pub mod waiting;

use base64::Engine;
use http::header::{
    HeaderValue, ACCEPT, ACCEPT_LANGUAGE, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE,
    REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{full, Body};
use crate::config::Language;

pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store, private");

/// What varco's own answers carry: never stored (above), and never
/// rewritten by a proxy or CDN in front (`no-transform`): an optimiser
/// that retypes or minifies the waiting page's script breaks the digest
/// its Content-Security-Policy allows, and the script never runs; with
/// scripts on, its `<noscript>` refresh does not either, and the page
/// would show the same place for ever.
pub const OWN_CACHE_CONTROL: HeaderValue =
    HeaderValue::from_static("no-store, private, no-transform");

/// The headers every answer varco writes itself carries: never stored
/// (see above); read as the type it says it is, so a JSON answer or a
/// text one is never run as a page (`nosniff`); and the address of a
/// page that may hold the portal's path and query (an application
/// number, a fiscal code) is not told to another site a person goes to
/// from it.
pub fn mark_own(h: &mut HeaderMap) {
    h.insert(CACHE_CONTROL, OWN_CACHE_CONTROL);
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
}

/// The Content-Security-Policy of a page varco wrote all of itself: its
/// inline scripts and styles by their SHA-256 digests, requests to its
/// own origin (the status poll) and nothing else. No script injected
/// into it, nor any other site's, runs in it, and only its own origin
/// may frame it. An operator's template gets none: varco cannot know
/// what it loads (its own `<meta http-equiv>` can say).
pub fn own_page_policy(html: &str) -> HeaderValue {
    let digests = |tag: &str| {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        let mut out = String::new();
        let mut rest = html;
        while let Some(start) = rest.find(&open) {
            let body = &rest[start + open.len()..];
            let Some(end) = body.find(&close) else { break };
            // A browser's parser turns each CR LF, and each lone CR, into
            // LF before it hashes (a template saved on Windows, a checkout
            // with autocrlf): so is the text hashed here.
            let text = body[..end].replace("\r\n", "\n").replace('\r', "\n");
            let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            out.push_str(" 'sha256-");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(digest));
            out.push('\'');
            rest = &body[end..];
        }
        if out.is_empty() {
            " 'none'".to_string()
        } else {
            // For browsers of CSP level 1 (Safari 9, the last of the
            // oldest iPads; Edge 12 to 14), which know no digests: without
            // it the page's script is blocked, and with scripts on, its
            // <noscript> refresh never runs either, so the page stands
            // still. Any browser that knows digests ignores it beside them.
            out + " 'unsafe-inline'"
        }
    };
    let policy = format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'self'",
        digests("script"),
        digests("style"),
    );
    HeaderValue::try_from(policy).expect("a policy of digests is a valid header value")
}

/// A `Retry-After` for `wait`: whole seconds rounded up (a client that
/// waits 1 s for a 1.9 s wait is refused again), a second at least.
pub fn retry_after(wait: std::time::Duration) -> HeaderValue {
    HeaderValue::from(wait.as_micros().div_ceil(1_000_000).max(1) as u64)
}

/// The operator page the admin listener serves at `/status`: one file,
/// no external assets, drawing from `/api/rooms` and `/api/history`.
pub const OPERATOR_PAGE: &str = include_str!("operator.html");

/// True when a program reads the answer rather than a person: the client
/// asked for JSON (API clients, the waiting page's own polling), or a
/// page's script sent the request (`Sec-Fetch-Dest` other than a page,
/// `X-Requested-With: XMLHttpRequest`). Such a request gets a status that
/// says it was not served (429, 503) with JSON: a `fetch()` that posts a
/// form in the background would take a waiting page's 200 for success,
/// and tell the person their application was sent.
pub fn wants_json(headers: &HeaderMap) -> bool {
    let asked_for_json = headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(prefers_json);
    let from_a_script = loads_a_page(headers) == Some(false)
        || headers
            .get("x-requested-with")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"xmlhttprequest"));
    asked_for_json || from_a_script
}

/// Whether an Accept value ranks `application/json` above `text/html`
/// (by their q-values; one not named ranks 0): a client that takes HTML
/// only at `q=0.1` asked for JSON, and one that names both alike is
/// taken for a browser.
fn prefers_json(accept: &str) -> bool {
    // Nearly every request: a browser's Accept, which names no JSON.
    if !accept
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"json"))
    {
        return false;
    }
    let (mut json, mut html) = (0, 0);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or_default().trim();
        let q = parts
            .find_map(|p| match p.trim().as_bytes() {
                [b'q' | b'Q', b'=', v @ ..] => Some(waiting::qvalue(v)),
                _ => None,
            })
            .unwrap_or(1000);
        // `application/vnd.api+json`, `application/problem+json`: JSON
        // by another name (RFC 6839).
        let is_json = kind.eq_ignore_ascii_case("application/json")
            || kind
                .get(kind.len().saturating_sub(5)..)
                .is_some_and(|end| end.eq_ignore_ascii_case("+json"));
        if is_json {
            json = json.max(q);
        } else if kind.eq_ignore_ascii_case("text/html") {
            html = html.max(q);
        }
    }
    json > html
}

/// What `Sec-Fetch-Dest` says of a request, where the browser sends it:
/// whether it loads a page (a document, or one in a frame) rather than
/// something for one (an image, a script's request).
pub fn loads_a_page(headers: &HeaderMap) -> Option<bool> {
    headers
        .get("sec-fetch-dest")
        .map(|d| matches!(d.as_bytes(), b"document" | b"iframe" | b"frame"))
}

/// Whether the browser says the request fetches something a page shows
/// or runs: an image, a script, a style sheet, a font, a media file.
/// Not a page (a document, a frame, an embedded object), nor a script's
/// own request (`empty`, `websocket`: it may stand for the person, a
/// page's background request that meets the gate first), nor anything
/// the browser names otherwise.
pub fn loads_for_a_page(headers: &HeaderMap) -> bool {
    headers.get("sec-fetch-dest").is_some_and(|d| {
        matches!(
            d.as_bytes(),
            b"image" | b"script" | b"style" | b"font" | b"audio" | b"video" | b"track"
        )
    })
}

/// For a person's GET or HEAD, a `Refresh` as long as the answer's
/// `Retry-After`: browsers ignore Retry-After, and a page that says "try
/// again" left the person to find out when, or to sit on it. Not for a
/// program (it reads Retry-After), nor for a request with a body (a
/// refresh would not send it again).
pub fn refresh_for_a_person(resp: &mut Response<Body>, method: &http::Method, program: bool) {
    if program || !matches!(*method, http::Method::GET | http::Method::HEAD) {
        return;
    }
    if let Some(after) = resp.headers().get(http::header::RETRY_AFTER).cloned() {
        resp.headers_mut().insert("refresh", after);
    }
}

/// Who reads an answer varco makes itself: a program (JSON, whose
/// `message` is in English, the API's one language), or a person, in the
/// language the waiting page would speak to them.
/// A person's page is the room's `error_template` when it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader<'a> {
    Program,
    Person(Language, Option<&'a ErrorTemplate>),
}

impl<'a> Reader<'a> {
    /// A program when `json` (see [`wants_json`]), else a person in the
    /// language of Accept-Language, `default` when it names neither.
    pub fn of(headers: &HeaderMap, json: bool, default: Language) -> Reader<'a> {
        Reader::of_value(headers.get(ACCEPT_LANGUAGE), json, default)
    }

    /// The same from the Accept-Language value alone.
    pub fn of_value(accept: Option<&HeaderValue>, json: bool, default: Language) -> Reader<'a> {
        if json {
            Reader::Program
        } else {
            Reader::Person(waiting::language_of(accept, default), None)
        }
    }

    /// A person's page made with the operator's `template`.
    pub fn with(self, template: Option<&'a ErrorTemplate>) -> Reader<'a> {
        match self {
            Reader::Person(lang, _) => Reader::Person(lang, template),
            Reader::Program => Reader::Program,
        }
    }
}

/// An operator's own error page (a room's `error_template`): each
/// `{{name}}` is replaced by its value, HTML-escaped; an unknown name is
/// left as written, as in the waiting page's template (the config refuses
/// a plain one: [`unknown_variables`]).
#[derive(Debug, PartialEq, Eq)]
pub struct ErrorTemplate {
    parts: Vec<Piece<ErrorVar>>,
}

/// A piece of a template: text as written, or a variable.
#[derive(Debug, PartialEq, Eq)]
enum Piece<T> {
    Text(String),
    Var(T),
}

/// A template's text cut at its `{{name}}`s, for the waiting page's
/// template and the error pages' alike: `lookup` says which names are
/// variables; any other `{{...}}`, and a `{{` never closed, stays as
/// written.
fn cut_template<T>(text: &str, mut lookup: impl FnMut(&str) -> Option<T>) -> Vec<Piece<T>> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            literal.push_str(&rest[start..]);
            rest = "";
            break;
        };
        match lookup(after[..end].trim()) {
            Some(var) => {
                parts.push(Piece::Text(std::mem::take(&mut literal)));
                parts.push(Piece::Var(var));
            }
            None => literal.push_str(&rest[start..start + end + 4]),
        }
        rest = &after[end + 2..];
    }
    literal.push_str(rest);
    parts.push(Piece::Text(literal));
    parts
}

/// The plain `{{name}}`s of an operator's template that name none of
/// `known`, each once: a typo would show its braces to every person in
/// line, so the config refuses it. Only a plain name counts (letters,
/// digits, `_`): `{{ a + b }}` and the like stay text. Nor inside a
/// `<script>` or `<style>`: a client-side template there (`{{ user }}`)
/// is the page's own, and HTML's `&#123;` would not hide it.
pub fn unknown_variables(text: &str, known: &[&str]) -> Vec<String> {
    let mut unknown: Vec<String> = Vec::new();
    cut_template(&outside_scripts(text), |name| {
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if plain && !known.contains(&name) && !unknown.iter().any(|u| u == name) {
            unknown.push(name.to_string());
        }
        None::<()>
    });
    unknown
}

/// `text` without what its `<script>` and `<style>` elements hold (an
/// element never closed: to the end).
fn outside_scripts(text: &str) -> String {
    script_regions(text)
        .into_iter()
        .filter(|(inside, _)| !inside)
        .map(|(_, piece)| piece)
        .collect()
}

/// `text` cut where a `<script>` or `<style>` element begins and ends,
/// in order: `(true, piece)` from its opening tag to its closing one
/// (which is outside again), to the end if it is never closed. A tag in
/// an HTML comment (`<!-- the <script> we dropped -->`) opens nothing: it
/// took every variable after it, to the next `</script`, out of the
/// page, and out of the config's check.
fn script_regions(text: &str) -> Vec<(bool, &str)> {
    // ASCII lowering keeps every byte where it was.
    let lower = text.to_ascii_lowercase();
    let mut regions = Vec::new();
    let mut at = 0;
    loop {
        let next = ["<script", "<style"]
            .into_iter()
            .filter_map(|tag| tag_at(&lower, at, tag).map(|i| (i, tag)))
            .min();
        let comment = lower[at..].find("<!--").map(|i| at + i);
        if let Some(c) = comment.filter(|c| next.is_none_or(|(start, _)| *c < start)) {
            // Unclosed, a comment runs to the end, as a browser reads it.
            let end = lower[c + 4..]
                .find("-->")
                .map_or(text.len(), |e| c + 4 + e + 3);
            regions.push((false, &text[at..end]));
            at = end;
            continue;
        }
        let Some((start, tag)) = next else {
            regions.push((false, &text[at..]));
            return regions;
        };
        regions.push((false, &text[at..start]));
        match lower[start..].find(&format!("</{}", &tag[1..])) {
            Some(end) => {
                regions.push((true, &text[start..start + end]));
                at = start + end;
            }
            None => {
                regions.push((true, &text[start..]));
                return regions;
            }
        }
    }
}

/// Where the element `tag` (`<script`) opens in `lower` from `at`: the
/// name whole (`<style-box>`, a custom element, is another one).
fn tag_at(lower: &str, mut at: usize, tag: &str) -> Option<usize> {
    loop {
        let i = at + lower[at..].find(tag)?;
        let after = lower.as_bytes().get(i + tag.len());
        if after.is_none_or(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/') {
            return Some(i);
        }
        at = i + tag.len();
    }
}

/// As [`cut_template`], leaving what is inside a `<script>` or `<style>`
/// as written: a client-side template's `{{ title }}` there is the
/// page's own, and an HTML-escaped value in a script would be read with
/// its entities (`&amp;` in a URL) and nothing escaped for a script.
fn cut_template_outside_scripts<T>(
    text: &str,
    mut lookup: impl FnMut(&str) -> Option<T>,
) -> Vec<Piece<T>> {
    let mut parts = Vec::new();
    for (inside, piece) in script_regions(text) {
        if inside {
            parts.push(Piece::Text(piece.to_string()));
        } else {
            parts.extend(cut_template(piece, &mut lookup));
        }
    }
    parts
}

/// The variable of `known` a mistyped `name` most likely meant: within
/// two edits, or a third of the name for a long one.
pub fn meant(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let within = (name.len() / 3).max(2);
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, _)| *d <= within)
        .min()
        .map(|(_, k)| k)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorVar {
    Lang,
    Status,
    Heading,
    Message,
    ReferenceLabel,
    Reference,
}

/// The variables an error template may use (README: "Customising the
/// error pages").
const ERROR_VARIABLES: [(&str, ErrorVar); 6] = [
    ("lang", ErrorVar::Lang),
    ("status", ErrorVar::Status),
    ("heading", ErrorVar::Heading),
    ("message", ErrorVar::Message),
    ("reference_label", ErrorVar::ReferenceLabel),
    ("reference", ErrorVar::Reference),
];

/// The names an error template may use.
pub fn error_variable_names() -> [&'static str; 6] {
    ERROR_VARIABLES.map(|(n, _)| n)
}

impl ErrorTemplate {
    pub fn compile(text: &str) -> ErrorTemplate {
        ErrorTemplate {
            parts: cut_template_outside_scripts(text, |name| {
                ERROR_VARIABLES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| *v)
            }),
        }
    }

    fn render(
        &self,
        status: StatusCode,
        said: &Said,
        lang: Language,
        reference: Option<&str>,
    ) -> String {
        let mut out = String::with_capacity(4096);
        for part in &self.parts {
            match part {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => {
                    let code;
                    let value = match v {
                        ErrorVar::Lang => lang.tag(),
                        ErrorVar::Status => {
                            code = status.as_u16().to_string();
                            &code
                        }
                        ErrorVar::Heading => heading(status, lang),
                        ErrorVar::Message => said.in_language(lang),
                        ErrorVar::ReferenceLabel => match reference {
                            Some(_) => REFERENCE.in_language(lang),
                            None => "",
                        },
                        ErrorVar::Reference => reference.unwrap_or(""),
                    };
                    escape_into(&mut out, value);
                }
            }
        }
        out
    }
}

/// Something varco says to a person itself, in each language the
/// waiting page speaks.
pub struct Said {
    pub en: &'static str,
    pub it: &'static str,
}

impl Said {
    pub fn in_language(&self, lang: Language) -> &'static str {
        match lang {
            Language::It => self.it,
            Language::En => self.en,
        }
    }
}

/// No room, and none of varco's own paths, serves the address.
pub const NOTHING_HERE: Said = Said {
    en: "Nothing is served at this address.",
    it: "A questo indirizzo non c'è nessun servizio.",
};

/// A small error page (or JSON) for a status varco decided itself.
pub fn error(status: StatusCode, said: &Said, reader: Reader) -> Response<Body> {
    error_with_reference(status, said, reader, None)
}

/// The same page for a request that was on its way to the portal, with
/// its request ID as a reference a person can read out to a help desk,
/// and an operator can find in the access log and the portal's own logs.
pub fn error_with_reference(
    status: StatusCode,
    said: &Said,
    reader: Reader,
    reference: Option<&HeaderValue>,
) -> Response<Body> {
    let reference = reference.and_then(|r| r.to_str().ok());
    let own_page = matches!(reader, Reader::Person(_, None));
    let (content_type, body) = match reader {
        Reader::Program => ("application/json", error_json(status, said.en, reference)),
        Reader::Person(lang, None) => (
            "text/html; charset=utf-8",
            error_html(status, said, lang, reference),
        ),
        Reader::Person(lang, Some(template)) => (
            "text/html; charset=utf-8",
            template.render(status, said, lang, reference),
        ),
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    mark_own(h);
    if own_page {
        static POLICY: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
        let policy =
            POLICY.get_or_init(|| own_page_policy(&format!("<style>{ERROR_STYLE}</style>")));
        h.insert(CONTENT_SECURITY_POLICY, policy.clone());
    }
    resp
}

/// The style of varco's own error page, the one inline part its policy
/// allows.
const ERROR_STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;\
padding:0 1rem;line-height:1.5}code{overflow-wrap:anywhere}";

fn error_json(status: StatusCode, message: &str, reference: Option<&str>) -> String {
    let mut v = serde_json::json!({
        "status": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("error"),
        "message": message,
    });
    if let Some(r) = reference {
        v["request_id"] = r.into();
    }
    v.to_string()
}

/// The page's heading: the status in the reader's words.
fn heading(status: StatusCode, lang: Language) -> &'static str {
    let english = status.canonical_reason().unwrap_or("Error");
    match lang {
        Language::En => english,
        Language::It => match status.as_u16() {
            400 => "Richiesta non valida",
            404 => "Pagina non trovata",
            408 => "Richiesta scaduta",
            413 => "Richiesta troppo grande",
            429 => "Troppe richieste",
            502 => "Servizio non raggiungibile",
            503 => "Servizio non disponibile",
            504 => "Il servizio non ha risposto",
            _ => "Errore",
        },
    }
}

const REFERENCE: Said = Said {
    en: "If you contact the help desk about this, give them this reference:",
    it: "Se contatti l'assistenza per questo problema, comunica questo codice di riferimento:",
};

fn error_html(status: StatusCode, said: &Said, lang: Language, reference: Option<&str>) -> String {
    let code = status.as_u16();
    let heading = heading(status, lang);
    let lang_tag = lang.tag();
    let reference = reference
        .map(|r| {
            format!(
                "<p>{} <code>{}</code></p>",
                escape(REFERENCE.in_language(lang)),
                escape(r)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"{lang_tag}\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{code} {heading}</title>\
<style>{ERROR_STYLE}</style>\
</head><body><main><h1>{code} {heading}</h1><p>{}</p>{reference}</main></body></html>\n",
        escape(said.in_language(lang)),
    )
}

/// Minimal HTML escaping for text placed in an element or attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_into(&mut out, text);
    out
}

pub fn escape_into(out: &mut String, text: &str) {
    // Almost nothing on a waiting page needs escaping: the scan runs a
    // chunk at a time, without an early exit, so it compiles to vector
    // compares rather than a branch per byte.
    let special = |b: &u8| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\'');
    if !text
        .as_bytes()
        .chunks(32)
        .any(|c| c.iter().fold(false, |any, b| any | special(b)))
    {
        out.push_str(text);
        return;
    }
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_templates_unknown_plain_names_are_found_once_and_what_they_meant() {
        let known = ["position", "ahead", "lang"];
        let text = "{{postion}} {{ ahead }} {{x1}} {{ a + b }} {{}} {{postion}} \
            <SCRIPT type=\"text/x-template\">{{ user }}</script> {{x2}} \
            <style>{{css}}</style> {{lang";
        assert_eq!(unknown_variables(text, &known), ["postion", "x1", "x2"]);
        assert_eq!(
            unknown_variables("a <script>{{ user }}", &known),
            Vec::<String>::new()
        );
        // A custom element whose name begins as one is no script.
        assert_eq!(
            unknown_variables("<style-box>{{postion}}</style-box>", &known),
            ["postion"]
        );
        // Nor is a tag in a comment; a script after one still is.
        assert_eq!(
            unknown_variables(
                "<!-- we dropped the <script> for analytics --> {{postion}} \
                 <!----><script>{{ user }}</script> {{x3}} <!-- <style>",
                &known
            ),
            ["postion", "x3"]
        );
        assert_eq!(meant("postion", &known), Some("position"));
        assert_eq!(meant("x1", &known), None);
        assert_eq!(
            unknown_variables(waiting::DEFAULT_TEMPLATE, &waiting::VARIABLES),
            Vec::<String>::new()
        );
    }

    /// Hashed as a browser hashes it: after its parser made every CR LF,
    /// and every lone CR, an LF (a template saved on Windows).
    #[test]
    fn a_page_saved_with_crlf_has_the_digests_a_browser_computes() {
        let lf = own_page_policy("<style>a\nb\nc</style><script>x\ny</script>");
        let crlf = own_page_policy("<style>a\r\nb\rc</style><script>x\r\ny</script>");
        assert_eq!(lf, crlf);
        assert_ne!(
            lf,
            own_page_policy("<style>a b c</style><script>x y</script>")
        );
    }

    #[test]
    fn json_only_when_asked() {
        let mut h = HeaderMap::new();
        assert!(!wants_json(&h));
        h.insert(ACCEPT, "application/json".parse().unwrap());
        assert!(wants_json(&h));
        h.insert(ACCEPT, "text/html,application/json;q=0.9".parse().unwrap());
        assert!(!wants_json(&h));
        // By q-values, not by what is named.
        for (accept, json) in [
            ("application/json, text/html;q=0.1", true),
            ("text/html;q=0, application/json", true),
            ("APPLICATION/JSON;Q=0.8, */*;q=0.1", true),
            ("application/json, text/html", false),
            ("application/json;q=0.5, text/html;q=0.9", false),
            ("application/json;q=0", false),
            ("Application/Json", true),
            ("application/vnd.api+json", true),
            ("application/problem+JSON, text/html;q=0.5", true),
            ("text/html, application/ld+json;q=0.5", false),
            (
                "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
                false,
            ),
        ] {
            h.insert(ACCEPT, accept.parse().unwrap());
            assert_eq!(wants_json(&h), json, "{accept}");
        }
    }

    #[test]
    fn escapes_wherever_the_character_falls() {
        for len in [0, 1, 31, 32, 33, 64, 70] {
            for at in 0..=len {
                let mut text = "a".repeat(len);
                text.insert(at, '<');
                let mut out = String::new();
                escape_into(&mut out, &text);
                assert_eq!(out, text.replace('<', "&lt;"), "{len} {at}");
            }
        }
        assert_eq!(escape("plain text"), "plain text");
        assert_eq!(escape("a&b\"c'd>"), "a&amp;b&quot;c&#39;d&gt;");
    }

    const SAID: Said = Said {
        en: "<script>",
        it: "non <b>qui</b>",
    };

    #[test]
    fn pages_are_uncacheable_and_escaped() {
        let r = error(
            StatusCode::BAD_GATEWAY,
            &SAID,
            Reader::Person(Language::En, None),
        );
        assert_eq!(
            r.headers()[CACHE_CONTROL],
            "no-store, private, no-transform"
        );
        assert_eq!(r.status(), 502);
        let html = error_html(StatusCode::BAD_GATEWAY, &SAID, Language::En, None);
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
        assert!(!html.contains("reference"));
    }

    #[test]
    fn a_person_reads_the_page_in_their_language() {
        let it = error_html(StatusCode::SERVICE_UNAVAILABLE, &SAID, Language::It, None);
        assert!(it.contains("<html lang=\"it\">"), "{it}");
        assert!(it.contains("<h1>503 Servizio non disponibile</h1>"), "{it}");
        assert!(it.contains("<p>non &lt;b&gt;qui&lt;/b&gt;</p>"), "{it}");
        let en = error_html(StatusCode::SERVICE_UNAVAILABLE, &SAID, Language::En, None);
        assert!(en.contains("<html lang=\"en\">"), "{en}");
        assert!(en.contains("<h1>503 Service Unavailable</h1>"), "{en}");
        let mut h = HeaderMap::new();
        h.insert(ACCEPT_LANGUAGE, "en-GB,en;q=0.9".parse().unwrap());
        assert_eq!(
            Reader::of(&h, false, Language::It),
            Reader::Person(Language::En, None)
        );
        assert_eq!(Reader::of(&h, true, Language::It), Reader::Program);
        assert_eq!(
            Reader::of(&HeaderMap::new(), false, Language::It),
            Reader::Person(Language::It, None)
        );
    }

    #[test]
    fn a_reference_is_shown_escaped_and_sent_in_json() {
        let html = error_html(StatusCode::BAD_GATEWAY, &SAID, Language::En, Some("ab<c"));
        assert!(
            html.contains("this reference: <code>ab&lt;c</code>"),
            "{html}"
        );
        let it = error_html(StatusCode::BAD_GATEWAY, &SAID, Language::It, Some("ab"));
        assert!(
            it.contains("questo codice di riferimento: <code>ab</code>"),
            "{it}"
        );
        let none = error_html(StatusCode::BAD_GATEWAY, &SAID, Language::It, None);
        assert!(!none.contains("<code>"), "{none}");
        let json = |reference| {
            let text = error_json(StatusCode::GATEWAY_TIMEOUT, "m", reference);
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        };
        let v = json(Some("a1b2"));
        assert_eq!(
            (v["request_id"].as_str(), v["status"].as_u64()),
            (Some("a1b2"), Some(504))
        );
        assert!(json(None).get("request_id").is_none());
    }

    #[test]
    fn an_operators_template_gets_each_value_escaped() {
        let t = ErrorTemplate::compile(
            "<html lang=\"{{lang}}\"><h1>{{ status }} {{heading}}</h1><p>{{message}}</p>\
<p>{{reference_label}} {{reference}}</p>{{unknown}} {{ open",
        );
        let it = t.render(StatusCode::TOO_MANY_REQUESTS, &SAID, Language::It, None);
        assert_eq!(
            it,
            "<html lang=\"it\"><h1>429 Troppe richieste</h1><p>non &lt;b&gt;qui&lt;/b&gt;</p>\
<p> </p>{{unknown}} {{ open"
        );
        let en = t.render(StatusCode::BAD_GATEWAY, &SAID, Language::En, Some("a<b"));
        assert!(
            en.contains(
                "<p>If you contact the help desk about this, give them this reference: a&lt;b</p>"
            ),
            "{en}"
        );
        let reader = Reader::Person(Language::En, None).with(Some(&t));
        assert_eq!(reader, Reader::Person(Language::En, Some(&t)));
        assert_eq!(Reader::Program.with(Some(&t)), Reader::Program);
    }
}
