//! The request path in one canonical form before anything matches on it.
//!
//! Routing, `exempt_paths` and `flow_paths` compare path prefixes; the
//! portal behind varco resolves the path its own way. Without one form
//! for both, `/static/../apply` matches the exempt `/static/` here and is
//! `/apply` there: the queue skipped. So, as Envoy's `normalize_path` and
//! `merge_slashes` do, before routing:
//!
//! - escapes of unreserved characters are decoded (`%2e` is `.`, `%41`
//!   is `A`), other escapes keep their meaning in upper case (`%2f` is
//!   `%2F`);
//! - repeated slashes are merged (`//apply` is `/apply`);
//! - `.` and `..` segments are resolved (RFC 3986, 5.2.4).
//!
//! The normalised path is the one routed, matched, remembered for after
//! admission, logged and forwarded, so varco and the portal see the same
//! thing. Refused with a 400 (as nginx refuses them): a malformed escape,
//! an escaped NUL,
//! a `..` above the root, and a `.` or `..` hidden behind an escaped slash
//! or a backslash (`/static/..%2Fapply`), which some servers decode or
//! treat as a separator after varco has matched, or behind a path
//! parameter (`/static/..;/apply`), which Java servers strip before they
//! resolve dot segments. Browsers send none of these: they resolve dot
//! segments themselves.

use http::{Request, Uri};
use thiserror::Error;

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BadPath {
    #[error("a % in the path is not followed by two hex digits")]
    BadEscape,
    #[error("the path climbs above the root with ..")]
    AboveRoot,
    #[error(
        "the path hides a . or .. segment behind an escaped slash, a backslash or a ;parameter"
    )]
    HiddenDotSegment,
    #[error("the path holds an escaped NUL (%00)")]
    Nul,
    #[error("the normalised path does not parse")]
    Malformed,
}

/// Puts `req`'s path in canonical form, the query as sent.
pub fn canonicalise<B>(req: &mut Request<B>) -> Result<(), BadPath> {
    let Some(path) = normalise(req.uri().path())? else {
        return Ok(());
    };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| BadPath::Malformed)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| BadPath::Malformed)?;
    Ok(())
}

/// The canonical form of `path`, or None when it already is canonical
/// (the usual case: one scan, nothing allocated). A path that does not
/// start with `/` (`*` of `OPTIONS *`) is left as it is.
pub fn normalise(path: &str) -> Result<Option<String>, BadPath> {
    if !path.starts_with('/') || is_canonical(path.as_bytes()) {
        return Ok(None);
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    let mut segments: Vec<&str> = Vec::new();
    // A path ending in `/`, `/.` or `/..` names a directory: it keeps its
    // trailing slash.
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                let popped = segments.pop().ok_or(BadPath::AboveRoot)?;
                // `/static/;x/../apply`: a Java server strips `;x`, merges
                // the slashes and takes `..` past `static` (`/apply`);
                // here it would take `;x` (`/static/apply`).
                if segment_name(popped).is_empty() {
                    return Err(BadPath::HiddenDotSegment);
                }
            }
            s => {
                if hides_dot_segment(s) {
                    return Err(BadPath::HiddenDotSegment);
                }
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok((out != path).then_some(out))
}

/// No escape, backslash, path parameter, repeated slash, `.` or `..`
/// segment: nothing to do. One pass, since every request is asked; `path`
/// starts with `/`.
fn is_canonical(path: &[u8]) -> bool {
    // The segment so far: its length, and whether it is all dots.
    let (mut len, mut dots) = (0usize, true);
    for &b in &path[1..] {
        match b {
            b'%' | b'\\' | b';' => return false,
            b'/' => {
                // The segment ending here is empty (`//`), `.` or `..`.
                if len == 0 || (dots && len <= 2) {
                    return false;
                }
                (len, dots) = (0, true);
            }
            _ => {
                len += 1;
                dots &= b == b'.';
            }
        }
    }
    // The last segment may be empty (a trailing slash), not `.` or `..`.
    !(dots && (1..=2).contains(&len))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The byte `%XX` at `at` stands for; None unless two hex digits follow.
pub fn escaped_byte(text: &[u8], at: usize) -> Option<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let hi = text.get(at + 1).copied().and_then(hex)?;
    let lo = text.get(at + 2).copied().and_then(hex)?;
    Some(hi << 4 | lo)
}

/// `text` with each `%XX` decoded to its byte, a `%` without two hex
/// digits after it kept as it is; and whether every `%` was an escape.
pub fn unescaped(text: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(text.len());
    let mut whole = true;
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            if let Some(b) = escaped_byte(text, i) {
                out.push(b);
                i += 3;
                continue;
            }
            whole = false;
        }
        out.push(text[i]);
        i += 1;
    }
    (out, whole)
}

/// Escapes of unreserved characters decoded, the rest upper-cased.
fn decode_unreserved(path: &[u8]) -> Result<String, BadPath> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] != b'%' {
            out.push(path[i]);
            i += 1;
            continue;
        }
        let b = escaped_byte(path, i).ok_or(BadPath::BadEscape)?;
        // A NUL ends the path early in C-string code (old Jetty resolved
        // `/static/.%00/apply` out of `/static/`); nginx refuses it too.
        if b == 0 {
            return Err(BadPath::Nul);
        }
        if is_unreserved(b) {
            out.push(b);
        } else {
            out.push(b'%');
            out.push(path[i + 1].to_ascii_uppercase());
            out.push(path[i + 2].to_ascii_uppercase());
        }
        i += 3;
    }
    // Only ASCII went in (a URI has no other bytes) and only ASCII was
    // written.
    String::from_utf8(out).map_err(|_| BadPath::BadEscape)
}

/// A segment that becomes `.` or `..` wherever `%2F`, `%5C` or `\` is
/// taken for a slash, or once its `;parameters` are stripped (Tomcat,
/// Jetty and WebLogic resolve `/static/..;/apply` to `/apply`).
fn hides_dot_segment(segment: &str) -> bool {
    if !segment.contains(['%', '\\', ';']) {
        return false;
    }
    segment
        .replace("%2F", "/")
        .replace("%5C", "/")
        .replace('\\', "/")
        .split('/')
        .map(segment_name)
        .any(|name| name == "." || name == "..")
}

/// A segment as Java servers read it: its `;parameters` taken off
/// (`..;x` is `..`, `bonus;jsessionid=1` is `bonus`).
pub fn segment_name(segment: &str) -> &str {
    segment.split(';').next().unwrap_or(segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> Result<String, BadPath> {
        normalise(path).map(|p| p.unwrap_or_else(|| path.to_string()))
    }

    #[test]
    fn canonical_paths_are_left_alone() {
        for p in [
            "/",
            "/apply",
            "/static/app.css",
            "/a/b/",
            "/a/.../b",
            "/a.b/c",
            "*",
        ] {
            assert_eq!(normalise(p), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_resolved() {
        assert_eq!(n("/static/../apply"), Ok("/apply".into()));
        assert_eq!(n("/a/./b"), Ok("/a/b".into()));
        assert_eq!(n("/a/b/."), Ok("/a/b/".into()));
        assert_eq!(n("/a/b/.."), Ok("/a/".into()));
        assert_eq!(n("/a/.."), Ok("/".into()));
        assert_eq!(n("/."), Ok("/".into()));
        assert_eq!(n("/a/b/../../c/./d"), Ok("/c/d".into()));
    }

    #[test]
    fn escaped_dots_are_dots() {
        assert_eq!(n("/static/%2e%2e/apply"), Ok("/apply".into()));
        assert_eq!(n("/static/%2E%2e/apply"), Ok("/apply".into()));
        assert_eq!(n("/static/.%2e/apply"), Ok("/apply".into()));
        assert_eq!(n("/%2e/apply"), Ok("/apply".into()));
    }

    #[test]
    fn slashes_are_merged() {
        assert_eq!(n("//apply"), Ok("/apply".into()));
        assert_eq!(n("/a//b///c"), Ok("/a/b/c".into()));
        assert_eq!(n("/a/b//"), Ok("/a/b/".into()));
        assert_eq!(n("//"), Ok("/".into()));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_upper_cased() {
        assert_eq!(n("/%41pply"), Ok("/Apply".into()));
        assert_eq!(n("/%7euser"), Ok("/~user".into()));
        assert_eq!(n("/a%2fb"), Ok("/a%2Fb".into()));
        assert_eq!(n("/caf%c3%a9"), Ok("/caf%C3%A9".into()));
        assert_eq!(n("/group%2Fproject"), Ok("/group%2Fproject".into()));
        assert_eq!(normalise("/group%2Fproject"), Ok(None));
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        assert_eq!(normalise("/.."), Err(BadPath::AboveRoot));
        assert_eq!(normalise("/a/../../b"), Err(BadPath::AboveRoot));
        assert_eq!(normalise("/%2e%2e/b"), Err(BadPath::AboveRoot));
    }

    #[test]
    fn dot_segments_behind_escaped_slashes_are_refused() {
        for p in [
            "/static/..%2Fapply",
            "/static/..%2fapply",
            "/static/..%5Capply",
            "/static/..\\apply",
            "/static/%2e%2e%2fapply",
            "/static/x%2F..%2F..%2Fapply",
            "/static/.%2Fapply",
            "/static/..;/apply",
            "/static/..;jsessionid=x/apply",
            "/static/.;/../apply",
            "/static/%2e%2e;/apply",
            "/oidc/callback/..;x=1/apply",
            "/static/;x/../bonus/apply",
        ] {
            assert_eq!(normalise(p), Err(BadPath::HiddenDotSegment), "{p}");
        }
        // A backslash or escaped slash with no dot segment behind it is
        // only a character.
        assert_eq!(n("/a%2Fb..c"), Ok("/a%2Fb..c".into()));
        assert_eq!(n("/a\\b"), Ok("/a\\b".into()));
        // Nor is a path parameter on any other segment.
        assert_eq!(normalise("/cart;jsessionid=ab12/view"), Ok(None));
        assert_eq!(n("/a;x/./b"), Ok("/a;x/b".into()));
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for p in ["/a%", "/a%2", "/a%zz", "/a%g0"] {
            assert_eq!(normalise(p), Err(BadPath::BadEscape), "{p}");
        }
    }

    #[test]
    fn a_request_keeps_its_query_and_authority() {
        let mut req = Request::get("http://portal.example/static/%2e%2e/apply?x=/../y")
            .body(())
            .unwrap();
        canonicalise(&mut req).unwrap();
        assert_eq!(req.uri(), "http://portal.example/apply?x=/../y");
        let mut req = Request::get("/a//b").body(()).unwrap();
        canonicalise(&mut req).unwrap();
        assert_eq!(req.uri(), "/a/b");
        let mut req = Request::get("/static/..%2Fapply").body(()).unwrap();
        assert_eq!(canonicalise(&mut req), Err(BadPath::HiddenDotSegment));
        assert_eq!(req.uri(), "/static/..%2Fapply");
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_definition() {
        let slow = |p: &[u8]| {
            !p.iter().any(|&b| b == b'%' || b == b'\\' || b == b';')
                && !p.windows(2).any(|w| w == b"//")
                && !p.split(|&b| b == b'/').any(|s| s == b"." || s == b"..")
        };
        let parts = ["", "/", ".", "..", "...", "a", "%2e", "\\", "a.b", ";"];
        for a in parts {
            for b in parts {
                for c in parts {
                    let path = format!("/{a}{b}{c}");
                    assert_eq!(
                        is_canonical(path.as_bytes()),
                        slow(path.as_bytes()),
                        "{path}"
                    );
                }
            }
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for p in [
            "/static/../apply",
            "//a/./b/%2e%2e/c/",
            "/%41%2f%7e",
            "/a/b/..",
        ] {
            let once = n(p).unwrap();
            assert_eq!(normalise(&once), Ok(None), "{p} -> {once}");
        }
    }
}
