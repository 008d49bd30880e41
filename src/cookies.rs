//! Reading varco's cookies from a request and writing them back. A
//! malformed cookie is simply absent.
//!
//! Under HTTPS a cookie's name carries the `__Host-` prefix: browsers
//! take such a cookie only from this very host (Secure, `Path=/`, no
//! `Domain`), so a sibling site under the same parent domain cannot set
//! one to shadow the person's ticket or pass. Both names are read, the
//! prefixed first: a cookie set over plain HTTP, or before the prefix,
//! still counts.

use http::header::{HeaderMap, HeaderValue, COOKIE, SET_COOKIE};

/// The value of the first cookie called `name`, if well-formed: visible
/// ASCII, not empty, at most 4 KiB. The header is read as bytes, so
/// another cookie with bytes beyond ASCII (a portal's, a tracker's) does
/// not hide varco's; each request reads it for the pass and the ticket.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    well_formed(all(headers, name).next()?)
}

/// The prefix of a cookie only its own host can set (RFC 6265bis 4.1.3.2).
pub const HOST_PREFIX: &str = "__Host-";

/// Every well-formed cookie called `name`, `__Host-` ones first, each
/// kind in the order sent. A browser sends the cookie of the longest path
/// first, and a sibling subdomain may set one for the parent domain: a
/// reader that takes the first that verifies, not merely the first, is
/// not shadowed by such a cookie, and a sibling can set no `__Host-` one.
pub fn each<'h: 'n, 'n>(
    headers: &'h HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'h str> + 'n {
    // A few of each: each is a signature to check, and a header stuffed
    // with hundreds would make every request pay for them. A sibling may
    // fill the unprefixed four; the prefixed ones are this host's.
    let of = move |host: bool| {
        either(headers, name)
            .filter(move |(prefixed, _)| *prefixed == host)
            .filter_map(|(_, value)| well_formed(value))
            .take(4)
    };
    of(true).chain(of(false))
}

fn well_formed(value: &[u8]) -> Option<&str> {
    // Every byte looked at (no early exit), so the check vectorises.
    let visible = value
        .iter()
        .fold(true, |ok, &b| ok & (b' '..=b'~').contains(&b));
    if !visible || value.is_empty() || value.len() > 4096 {
        return None;
    }
    // Visible ASCII is UTF-8.
    std::str::from_utf8(value).ok()
}

/// Every cookie called `name`, in the order sent, as raw bytes (quotes
/// around a value taken off), whatever else the header holds.
pub fn all<'h: 'n, 'n>(
    headers: &'h HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'h [u8]> + 'n {
    either(headers, name).filter_map(|(host, value)| (!host).then_some(value))
}

/// `all` of `name` and of `__Host-` and `name` together, in the order
/// sent; true for a prefixed one.
fn either<'h: 'n, 'n>(
    headers: &'h HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = (bool, &'h [u8])> + 'n {
    let name = name.as_bytes();
    headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|v| pairs(v.as_bytes()))
        .filter_map(move |pair| {
            let pair = pair.trim_ascii();
            let (host, pair) = match pair.strip_prefix(HOST_PREFIX.as_bytes()) {
                Some(rest) => (true, rest),
                None => (false, pair),
            };
            let value = pair.strip_prefix(name)?.strip_prefix(b"=")?;
            let value = value.strip_prefix(b"\"").unwrap_or(value);
            Some((host, value.strip_suffix(b"\"").unwrap_or(value)))
        })
}

/// The `name=value` pairs of one Cookie header, untrimmed.
fn pairs(header: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b';', header)
        .chain(std::iter::once(header.len()))
        .map(move |end| {
            let pair = &header[start..end];
            start = end + 1;
            pair
        })
}

/// Takes varco's own cookies (every room's tickets and passes) out of the
/// `Cookie` headers before a request goes to the portal. A pass is a
/// bearer credential: in a portal's logs (many log the whole header), or
/// read by its code, whoever saw it could skip the queue, as with the
/// bypass secret. What the portal may know of the person's place in line
/// is in `X-Varco-Arrival` (with an arrival key).
pub fn strip_own(headers: &mut HeaderMap) {
    // A request without varco's cookies (an asset, a room without a
    // gate, the portal's own calls) pays one search per header, and no
    // header is built again.
    let finder = memchr::memmem::Finder::new(OWN_PREFIX);
    if !headers
        .get_all(COOKIE)
        .iter()
        .any(|v| finder.find(v.as_bytes()).is_some())
    {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| {
            let mut out: Vec<u8> = Vec::with_capacity(v.len());
            for pair in pairs(v.as_bytes()) {
                let pair = pair.trim_ascii();
                if pair.is_empty() || is_own(pair) {
                    continue;
                }
                if !out.is_empty() {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(pair);
            }
            // Bytes of a header already, joined by "; ".
            (!out.is_empty())
                .then(|| HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok())
                .flatten()
        })
        .collect();
    headers.remove(COOKIE);
    for v in kept {
        headers.append(COOKIE, v);
    }
}

/// Takes out of the portal's answer any `Set-Cookie` of varco's own
/// names: one from another room's upstream on the same host (a CMS at
/// `/`), or from a portal with a header injection, would delete or
/// overwrite every visitor's ticket, and with it their place in line.
pub fn strip_own_set_cookies(headers: &mut HeaderMap) {
    let finder = memchr::memmem::Finder::new(OWN_PREFIX);
    if !headers.get_all(SET_COOKIE).iter().any(|v| {
        finder
            .find(v.as_bytes())
            .is_some_and(|_| is_own(first_pair(v)))
    }) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter(|v| !is_own(first_pair(v)))
        .cloned()
        .collect();
    tracing::debug!("dropped a Set-Cookie of varco's own names from the portal's answer");
    headers.remove(SET_COOKIE);
    for v in kept {
        headers.append(SET_COOKIE, v);
    }
}

/// Whether the portal's answer tells the browser to delete every cookie
/// of the site (`Clear-Site-Data: "cookies"` or `"*"`): varco's pass and
/// tickets go with the portal's own. Browsers take only the quoted,
/// lower-case values, and only over HTTPS (the caller's to know).
pub fn clears_site_cookies(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::HeaderName::from_static("clear-site-data"))
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|d| matches!(d.trim_ascii(), b"\"cookies\"" | b"\"*\""))
}

/// A Set-Cookie's `name=value`, its attributes aside.
fn first_pair(v: &HeaderValue) -> &[u8] {
    pairs(v.as_bytes()).next().unwrap_or_default()
}

const OWN_PREFIX: &[u8] = b"varco_";

/// A `name=value` pair of a ticket or a pass, of any room, `__Host-` or
/// not.
fn is_own(pair: &[u8]) -> bool {
    let name = pair
        .split(|b| *b == b'=')
        .next()
        .unwrap_or(pair)
        .trim_ascii();
    let name = name.strip_prefix(HOST_PREFIX.as_bytes()).unwrap_or(name);
    name.strip_prefix(OWN_PREFIX)
        .is_some_and(|rest| rest.starts_with(b"ticket_") || rest.starts_with(b"pass_"))
}

/// How a response's cookies are scoped: Secure under HTTPS; sent with
/// cross-site requests too when the room asks (`cookie_same_site =
/// "none"`), which browsers accept only with Secure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attrs {
    pub secure: bool,
    pub cross_site: bool,
}

/// A Set-Cookie for one of varco's tokens: HttpOnly (scripts never need
/// it), SameSite=Lax (survives following a link into the portal; None
/// when the room asks, under HTTPS), Secure and named `__Host-` under
/// HTTPS, Path=/ so every page of the room sees it.
pub fn set(name: &str, value: &str, max_age_secs: u64, attrs: Attrs) -> HeaderValue {
    set_with(name, max_age_secs, attrs, |out| out.push_str(value))
}

/// `set`, with the value written in place by `value` (a token signed
/// straight into the header: every new arrival gets one). A value that
/// is not a valid header gives a cookie that clears itself.
pub fn set_with(
    name: &str,
    max_age_secs: u64,
    attrs: Attrs,
    value: impl FnOnce(&mut String),
) -> HeaderValue {
    let mut text = String::with_capacity(name.len() + 456);
    if attrs.secure {
        text.push_str(HOST_PREFIX);
    }
    text.push_str(name);
    text.push('=');
    value(&mut text);
    text.push_str("; Path=/; Max-Age=");
    crate::timefmt::push_number(&mut text, max_age_secs);
    text.push_str(match (attrs.secure, attrs.cross_site) {
        (true, true) => "; HttpOnly; SameSite=None; Secure",
        (true, false) => "; HttpOnly; SameSite=Lax; Secure",
        (false, _) => "; HttpOnly; SameSite=Lax",
    });
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("varco=; Max-Age=0"))
}

/// The Set-Cookies that delete `name`: under HTTPS the `__Host-` one, and
/// one set without the prefix (over plain HTTP, or by a varco before
/// it), which would otherwise outlive the ticket or pass it held.
pub fn clear(name: &str, attrs: Attrs) -> impl Iterator<Item = HeaderValue> {
    let unprefixed = attrs.secure.then(|| {
        let plain = Attrs {
            secure: false,
            ..attrs
        };
        set(name, "", 0, plain)
    });
    std::iter::once(set(name, "", 0, attrs)).chain(unprefixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_site_data_that_deletes_cookies() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("clear-site-data", HeaderValue::from_str(v).unwrap());
            clears_site_cookies(&h)
        };
        assert!(with("\"cookies\""));
        assert!(with("\"cache\", \"cookies\""));
        assert!(with("\"*\""));
        assert!(!with("\"cache\", \"storage\""));
        // As browsers read it: quoted and lower case only.
        assert!(!with("cookies"));
        assert!(!with("\"Cookies\""));
        assert!(!clears_site_cookies(&HeaderMap::new()));
    }

    #[test]
    fn finds_cookies_and_ignores_garbage() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            "a=1; varco_ticket_portal=abc.def.ghi; b".parse().unwrap(),
        );
        h.append(COOKIE, "c=3".parse().unwrap());
        assert_eq!(get(&h, "varco_ticket_portal"), Some("abc.def.ghi"));
        assert_eq!(get(&h, "c"), Some("3"));
        assert_eq!(get(&h, "b"), None);
        assert_eq!(get(&h, "missing"), None);
        assert_eq!(get(&h, "varco_ticket"), None, "a prefix is not the name");
        assert_eq!(get(&h, "a=1"), None);
        // Quoted, and with spaces around the pair.
        let mut h = HeaderMap::new();
        h.append(COOKIE, "x=\"q.r\" ;  y=2  ".parse().unwrap());
        assert_eq!(get(&h, "x"), Some("q.r"));
        assert_eq!(get(&h, "y"), Some("2"));
        // The first of two with the same name, even when it is empty.
        let mut h = HeaderMap::new();
        h.append(COOKIE, "x=; x=2".parse().unwrap());
        assert_eq!(get(&h, "x"), None);
        // Every well-formed one, in order, across headers: the empty one
        // skipped.
        h.append(COOKIE, "y=1; x=\"3\"".parse().unwrap());
        assert_eq!(each(&h, "x").collect::<Vec<_>>(), ["2", "3"]);
        // Bytes beyond ASCII in another cookie hide nothing; in ours
        // they make it no cookie.
        let mut h = HeaderMap::new();
        let raw = "tracker=caf\u{e9}; varco_pass_portal=p.q.r; other=\u{fc}ber";
        h.append(COOKIE, HeaderValue::from_bytes(raw.as_bytes()).unwrap());
        assert_eq!(get(&h, "varco_pass_portal"), Some("p.q.r"));
        assert_eq!(get(&h, "other"), None);
        let attrs = |secure, cross_site| Attrs { secure, cross_site };
        let c = set("x", "v", 60, attrs(true, false));
        assert_eq!(
            c,
            "__Host-x=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure"
        );
        let c: Vec<_> = clear("x", attrs(false, false)).collect();
        assert_eq!(c, ["x=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"]);
        let c: Vec<_> = clear("x", attrs(true, false)).collect();
        assert_eq!(
            c,
            [
                "__Host-x=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax; Secure",
                "x=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
            ]
        );
        let c = set("x", "v", 60, attrs(true, true));
        assert_eq!(
            c,
            "__Host-x=v; Path=/; Max-Age=60; HttpOnly; SameSite=None; Secure"
        );
        // Browsers refuse SameSite=None without Secure: over plain HTTP
        // the room's cookies stay Lax rather than be dropped.
        let c = set("x", "v", 60, attrs(false, true));
        assert_eq!(c, "x=v; Path=/; Max-Age=60; HttpOnly; SameSite=Lax");
    }

    /// A sibling site under the same parent domain fills the unprefixed
    /// name with cookies of its own (longer paths, sent first): the
    /// `__Host-` one, which only this host can set, is still read, first.
    #[test]
    fn a_host_cookie_is_read_first_whatever_a_sibling_set() {
        let mut h = HeaderMap::new();
        let junk = "varco_pass_portal=j.u.k; ".repeat(6);
        h.append(
            COOKIE,
            format!("{junk}__Host-varco_pass_portal=real; varco_pass_portal_x=no")
                .parse()
                .unwrap(),
        );
        let read: Vec<&str> = each(&h, "varco_pass_portal").collect();
        assert_eq!(read, ["real", "j.u.k", "j.u.k", "j.u.k", "j.u.k"]);
        assert_eq!(
            get(&h, "varco_pass_portal"),
            Some("j.u.k"),
            "get: the name alone"
        );
    }

    #[test]
    fn own_cookies_are_taken_out_and_the_portals_kept() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            "sid=7; varco_pass_portal=p.q.r;lang=it ; varco_ticket_other=\"t\""
                .parse()
                .unwrap(),
        );
        h.append(
            COOKIE,
            "varco_ticket_portal=x; __Host-varco_pass_portal=y; __Host-sid=8"
                .parse()
                .unwrap(),
        );
        h.append(COOKIE, "varco_pref=dark; varco_passes=2".parse().unwrap());
        strip_own(&mut h);
        let left: Vec<&str> = h
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            left,
            [
                "sid=7; lang=it",
                "__Host-sid=8",
                "varco_pref=dark; varco_passes=2"
            ],
            "only tickets and passes go; a header left empty goes too"
        );
        let mut h = HeaderMap::new();
        h.append(COOKIE, "a=1;b=2".parse().unwrap());
        strip_own(&mut h);
        assert_eq!(h[COOKIE], "a=1;b=2", "untouched when there is none");
    }
}
