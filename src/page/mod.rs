//! Pages varco itself answers with. Every one is marked uncacheable:
//! varco's own responses must never be stored and shown to someone else.

pub mod waiting;

use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{full, Body};

pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store, private");

/// The operator page the admin listener serves at `/status`: one file,
/// no external assets, drawing from `/api/rooms` and `/api/history`.
pub const OPERATOR_PAGE: &str = include_str!("operator.html");

/// True when the client asked for JSON rather than a page (API clients,
/// the waiting page's own polling).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/html"))
}

/// A small error page (or JSON) for a status varco decided itself.
pub fn error(status: StatusCode, message: &str, json: bool) -> Response<Body> {
    error_with_reference(status, message, json, None)
}

/// The same page for a request that was on its way to the portal, with
/// its request ID as a reference a person can read out to a help desk,
/// and an operator can find in the access log and the portal's own logs.
pub fn error_with_reference(
    status: StatusCode,
    message: &str,
    json: bool,
    reference: Option<&HeaderValue>,
) -> Response<Body> {
    let reference = reference.and_then(|r| r.to_str().ok());
    let (content_type, body) = if json {
        ("application/json", error_json(status, message, reference))
    } else {
        (
            "text/html; charset=utf-8",
            error_html(status, message, reference),
        )
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, NO_STORE);
    resp
}

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

fn error_html(status: StatusCode, message: &str, reference: Option<&str>) -> String {
    let code = status.as_u16();
    let reason = status.canonical_reason().unwrap_or("Error");
    let reference = reference
        .map(|r| {
            format!(
                "<p>If you contact the help desk about this, give them this reference: \
<code>{}</code></p>",
                escape(r)
            )
        })
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{code} {reason}</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}\
code{{overflow-wrap:anywhere}}</style>\
</head><body><main><h1>{code} {reason}</h1><p>{}</p>\
<p>Please try again in a moment.</p>{reference}</main></body></html>\n",
        escape(message)
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
    fn json_only_when_asked() {
        let mut h = HeaderMap::new();
        assert!(!wants_json(&h));
        h.insert(ACCEPT, "application/json".parse().unwrap());
        assert!(wants_json(&h));
        h.insert(ACCEPT, "text/html,application/json;q=0.9".parse().unwrap());
        assert!(!wants_json(&h));
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

    #[test]
    fn pages_are_uncacheable_and_escaped() {
        let r = error(StatusCode::BAD_GATEWAY, "<script>", false);
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store, private");
        assert_eq!(r.status(), 502);
        let html = error_html(StatusCode::BAD_GATEWAY, "<script>", None);
        assert!(html.contains("&lt;script&gt;") && !html.contains("<script>"));
        assert!(!html.contains("reference"));
    }

    #[test]
    fn a_reference_is_shown_escaped_and_sent_in_json() {
        let html = error_html(StatusCode::BAD_GATEWAY, "down", Some("ab<c"));
        assert!(
            html.contains("this reference: <code>ab&lt;c</code>"),
            "{html}"
        );
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
}
