//! Routes a request to its room by host and path prefix: the longest
//! prefix wins; between equal prefixes, an exact host beats `*.suffix`
//! (the longest suffix first) beats `*`.

use std::sync::Arc;

use crate::config::HostPattern;
use crate::room::Room;

struct Route {
    host: HostPattern,
    /// In the form requests are matched in; in lower case when
    /// `ignore_case`.
    prefix: String,
    ignore_case: bool,
    room: Arc<Room>,
}

pub struct Router {
    /// Sorted so the first match is the most specific.
    routes: Vec<Route>,
}

/// The rooms and the router over them: replaced whole on a reload, so a
/// request sees either the old set or the new one, never a mix.
pub struct Routing {
    pub router: Router,
    pub rooms: Vec<Arc<Room>>,
}

impl Routing {
    pub fn new(rooms: Vec<Arc<Room>>) -> Self {
        Routing {
            router: Router::new(&rooms),
            rooms,
        }
    }

    pub fn room(&self, name: &str) -> Option<&Arc<Room>> {
        self.rooms.iter().find(|r| r.name == name)
    }
}

pub type SharedRouting = Arc<arc_swap::ArcSwap<Routing>>;

impl Router {
    pub fn new(rooms: &[Arc<Room>]) -> Self {
        let mut routes: Vec<Route> = rooms
            .iter()
            .flat_map(|room| {
                let ignore_case = room.config.paths_ignore_case;
                room.config.hosts.iter().flat_map(move |h| {
                    room.config.paths.iter().map(move |p| Route {
                        host: h.clone(),
                        prefix: folded(as_matched(p), ignore_case).into_owned(),
                        ignore_case,
                        room: room.clone(),
                    })
                })
            })
            .collect();
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(b.host.specificity().cmp(&a.host.specificity()))
        });
        Router { routes }
    }

    /// `host` may carry a port and any case; `path` is the request path.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Room>> {
        let host = host.map(normalise_host).unwrap_or_default();
        let path = as_matched(path);
        // Lowered once, for the first room that ignores case, if any.
        let lower = std::cell::OnceCell::new();
        self.routes
            .iter()
            .find(|r| {
                r.host.matches(&host)
                    && match r.ignore_case {
                        true => {
                            prefix_matches(&r.prefix, lower.get_or_init(|| path.to_lowercase()))
                        }
                        false => prefix_matches(&r.prefix, &path),
                    }
            })
            .map(|r| &r.room)
    }

    /// The room whose site `path` is on, for a page varco makes outside
    /// any room's paths (`/.varco/...`): the room the path routes to, else
    /// the one serving the most of the host (the shortest prefix, then the
    /// host named most exactly).
    pub fn site(&self, host: Option<&str>, path: &str) -> Option<&Arc<Room>> {
        self.route(host, path).or_else(|| {
            let host = host.map(normalise_host).unwrap_or_default();
            self.routes
                .iter()
                .filter(|r| r.host.matches(&host))
                .min_by_key(|r| (r.prefix.len(), std::cmp::Reverse(r.host.specificity())))
                .map(|r| &r.room)
        })
    }
}

/// `path` with each segment's `;parameters` taken off, as Java servers
/// read it (rooms are matched on this, the portal gets the path as sent): `/servizi;x/bonus/apply` is in `/servizi/bonus`, or it would
/// reach another room (or none) and the portal as that room's path. A
/// segment that was only parameters goes (`/servizi/;x/bonus` is
/// `/servizi/bonus` once the server merges the slashes). Borrowed when
/// there is no `;` (nearly always).
pub fn without_parameters(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return path.into();
    }
    let mut out = String::with_capacity(path.len());
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let name = crate::request_path::segment_name(segment);
        let last = i + 1 == segments.len();
        if name.is_empty() && !segment.is_empty() && !last {
            continue;
        }
        out.push('/');
        out.push_str(name);
    }
    if out.is_empty() {
        out.push('/');
    }
    out.into()
}

/// The path rooms are matched on: `as_read`, then every escape decoded,
/// as nginx, Tomcat and Go decode before they route: `/caf%C3%A8` and
/// `/café` (raw UTF-8 is a valid request path too), `/bonus%282024%29`
/// and `/bonus(2024)` are each one path to the portal, so one room here;
/// else one spelling reaches another room (ungated, say) and the portal
/// as the gated room's path. Decoded once, as those servers do (`%252F`
/// is `%2F`). An escaped byte that decodes to no UTF-8 stays escaped (in
/// upper case), alone: raw, such bytes are refused before routing. Room
/// paths are matched in this form too. The portal still gets the path as
/// sent.
pub fn as_matched(path: &str) -> std::borrow::Cow<'_, str> {
    let read = as_read(path);
    if !read.contains('%') {
        return read;
    }
    let (decoded, _) = crate::request_path::unescaped(read.as_bytes());
    // Each byte that decodes to no UTF-8 stays escaped, the rest of the
    // path decoded all the same: one `%FF` at its end must not keep a
    // whole path from its room.
    let mut out = String::with_capacity(decoded.len());
    for chunk in decoded.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.into()
}

/// The path as servers read its separators: without `;parameters`
/// (`without_parameters`), and with escaped slashes and backslashes read
/// as slashes, repeats merged, as nginx, WSGI servers and IIS read them
/// before they route: `/servizi%2Fbonus/apply` is in `/servizi/bonus`,
/// or it would reach another room (ungated, say) and the portal as the
/// bonus room's path.
pub fn as_read(path: &str) -> std::borrow::Cow<'_, str> {
    let path = without_parameters(path);
    let escaped = |p: &str| {
        p.contains('\\')
            || p.contains("%2F")
            || p.contains("%2f")
            || p.contains("%5C")
            || p.contains("%5c")
    };
    if !escaped(&path) {
        return path;
    }
    // Bytes, not chars: what follows a `%` may be anything.
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 3);
        let len = match bytes[i] {
            b'/' | b'\\' => 1,
            b'%' if escape.is_some_and(|e| {
                e.eq_ignore_ascii_case(b"2f") || e.eq_ignore_ascii_case(b"5c")
            }) =>
            {
                3
            }
            b => {
                out.push(b);
                i += 1;
                continue;
            }
        };
        if out.last() != Some(&b'/') {
            out.push(b'/');
        }
        i += len;
    }
    // Only ASCII bytes were replaced, by ASCII; the parameters went
    // before, and decoding slashes makes none.
    String::from_utf8(out).unwrap_or_default().into()
}

/// Whether `host` is a Host (or :authority) varco and the portal can only
/// read one way: a name of letters, digits and `-._~` (a DNS name, or an
/// intranet name with an underscore) or an IP literal in brackets, then
/// at most a port of digits. Anything else (a second colon, a path,
/// userinfo, bytes past ASCII, RFC 3986's sub-delims: `a.org,b.org` is
/// a list to a framework reading X-Forwarded-Host) is read one way here
/// and another by the portal (nginx keeps what comes before the first
/// colon; this router what comes before the last): routed to one room,
/// served as another, past its gate.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = match host.first() {
        Some(b'[') => {
            let Some(end) = host.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&host[1..end]).ok();
            if literal
                .and_then(|l| l.parse::<std::net::Ipv6Addr>().ok())
                .is_none()
            {
                return false;
            }
            match &host[end + 1..] {
                [] => return true,
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        _ => match host.iter().position(|&b| b == b':') {
            Some(colon) => (&host[..colon], &host[colon + 1..]),
            None => (host, &b"0"[..]),
        },
    };
    let name_ok = name
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
    name_ok && port.len() <= 5 && port.iter().all(u8::is_ascii_digit)
}

/// Lowercase, without port; IPv6 literals keep their brackets.
pub fn normalise_host(host: &str) -> String {
    let h = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `path`, as matched (`as_matched`), is under the configured
/// prefix `written`, matched in the same form.
pub fn on_prefix(written: &str, path: &str) -> bool {
    prefix_matches(&as_matched(written), path)
}

/// `path` as a room with `paths_ignore_case` matches it (lowered), else
/// as it is.
pub fn folded(path: std::borrow::Cow<'_, str>, ignore_case: bool) -> std::borrow::Cow<'_, str> {
    match ignore_case {
        true => path.to_lowercase().into(),
        false => path,
    }
}

/// "/app" covers "/app" and "/app/..." but not "/apple": prefixes match
/// whole path segments (of the path as matched: see `as_matched`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_slashes_are_matched_as_slashes() {
        for (sent, matched) in [
            ("/servizi/bonus/apply", "/servizi/bonus/apply"),
            ("/servizi%2Fbonus/apply", "/servizi/bonus/apply"),
            ("/servizi%2fbonus/apply", "/servizi/bonus/apply"),
            ("/servizi%5Cbonus/apply", "/servizi/bonus/apply"),
            ("/servizi\\bonus/apply", "/servizi/bonus/apply"),
            ("/servizi%2F%2Fbonus", "/servizi/bonus"),
            ("/servizi%2F;x/bonus", "/servizi/bonus"),
            ("/caf%C3%A8/%2", "/caf\u{e8}/%2"),
        ] {
            assert_eq!(as_matched(sent), matched, "{sent}");
        }
    }

    /// Every spelling the portal reads as one path is one path here.
    #[test]
    fn escapes_are_matched_decoded_once() {
        for (sent, matched) in [
            ("/caf%C3%A8/apply", "/caf\u{e8}/apply"),
            ("/caf\u{e8}/apply", "/caf\u{e8}/apply"),
            ("/bonus%282024%29/apply", "/bonus(2024)/apply"),
            ("/a%252F", "/a%2F"),
            ("/a%25", "/a%"),
            // No UTF-8 once decoded: that byte as it was, the rest decoded.
            ("/x%FF/y", "/x%FF/y"),
            ("/bonus%282024%29/apply/%ff", "/bonus(2024)/apply/%FF"),
            ("/%C3%A8%C3/x", "/\u{e8}%C3/x"),
        ] {
            assert_eq!(as_matched(sent), matched, "{sent}");
        }
    }

    #[test]
    fn a_host_reads_one_way_or_not_at_all() {
        for good in [
            "portal.example.org",
            "PORTAL.example.org.:8443",
            "10.0.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "intranet_host",
            "portal.example.org:",
            "",
        ] {
            assert!(valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "portal.example.org:1:2",
            "portal.example.org:80x",
            "portal.example.org:123456",
            "user@portal.example.org",
            "portal.example.org/apply",
            "portal.example.org\\x",
            "portäl.example.org",
            "[::1",
            "[not-an-ip]",
            "[::1]x",
            "a b",
            "bonus.example.org,www.example.org",
            "bonus.example.org;x",
            "bonus%2eexample.org",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad}");
        }
    }
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let cfg = Config::from_toml(toml, std::path::Path::new(".")).unwrap();
        let rooms: Vec<Arc<Room>> = cfg
            .rooms
            .into_iter()
            .map(|r| Arc::new(Room::standalone(r)))
            .collect();
        Router::new(&rooms)
    }

    #[test]
    fn longest_prefix_then_most_specific_host() {
        let r = router(
            r#"
            [rooms.main]
            upstreams = ["http://127.0.0.1:1"]
            [rooms.login]
            upstreams = ["http://127.0.0.1:2"]
            paths = ["/login"]
            [rooms.other]
            upstreams = ["http://127.0.0.1:3"]
            hosts = ["other.example.org", "*.example.net"]
            "#,
        );
        let name = |h: &str, p: &str| r.route(Some(h), p).map(|r| r.name.clone());
        assert_eq!(name("a.example.org", "/x").as_deref(), Some("main"));
        assert_eq!(name("a.example.org", "/login/cb").as_deref(), Some("login"));
        assert_eq!(name("a.example.org", "/loginx").as_deref(), Some("main"));
        assert_eq!(
            name("a.example.org", "/login;jsessionid=1").as_deref(),
            Some("login"),
            "a path parameter does not take a request out of its room"
        );
        assert_eq!(
            name("a.example.org", "/login;x/cb").as_deref(),
            Some("login")
        );
        assert_eq!(
            name("Other.Example.org:8080", "/x").as_deref(),
            Some("other")
        );
        assert_eq!(name("www.example.net", "/").as_deref(), Some("other"));
        assert_eq!(
            name("other.example.org", "/login").as_deref(),
            Some("login")
        );
    }

    #[test]
    fn a_path_outside_every_room_is_on_the_site_of_the_room_serving_most_of_its_host() {
        let r = router(
            r#"
            [rooms.bonus]
            upstreams = ["http://127.0.0.1:1"]
            hosts = ["bonus.example.org"]
            paths = ["/bonus"]
            [rooms.login]
            upstreams = ["http://127.0.0.1:2"]
            hosts = ["bonus.example.org"]
            paths = ["/login/callback"]
            [rooms.any]
            upstreams = ["http://127.0.0.1:3"]
            hosts = ["*.example.net"]
            paths = ["/app"]
            [rooms.exact]
            upstreams = ["http://127.0.0.1:4"]
            hosts = ["www.example.net"]
            paths = ["/api"]
            "#,
        );
        let site = |h: &str, p: &str| r.site(Some(h), p).map(|r| r.name.clone());
        assert!(r.route(Some("bonus.example.org"), "/.varco/x").is_none());
        assert_eq!(
            site("bonus.example.org", "/.varco/x").as_deref(),
            Some("bonus")
        );
        assert_eq!(
            site("bonus.example.org", "/login/callback").as_deref(),
            Some("login"),
            "a path a room serves stays that room's"
        );
        assert_eq!(
            site("www.example.net", "/.varco/x").as_deref(),
            Some("exact"),
            "prefixes alike: the host named exactly"
        );
        assert_eq!(site("elsewhere.example.com", "/.varco/x"), None::<String>);
    }

    #[test]
    fn path_parameters_inside_a_room_s_prefix_keep_the_request_there() {
        let r = router(
            r#"
            [rooms.main]
            upstreams = ["http://127.0.0.1:1"]
            [rooms.bonus]
            upstreams = ["http://127.0.0.1:2"]
            paths = ["/servizi/bonus", "/app/"]
            "#,
        );
        let name = |p: &str| r.route(Some("x"), p).map(|r| r.name.clone());
        for p in [
            "/servizi;x/bonus/apply",
            "/servizi/bonus;jsessionid=1",
            "/app;x/form",
            "/servizi/;x/bonus/apply",
            "/;x/servizi/bonus/apply",
        ] {
            assert_eq!(name(p).as_deref(), Some("bonus"), "{p}");
        }
        assert_eq!(name("/servizi;x/other").as_deref(), Some("main"));
    }

    #[test]
    fn the_longest_host_suffix_wins_whatever_the_rooms_are_called() {
        let r = router(
            r#"
            [rooms.a_main]
            upstreams = ["http://127.0.0.1:1"]
            hosts = ["*.example.org"]
            [rooms.z_apply]
            upstreams = ["http://127.0.0.1:2"]
            hosts = ["*.apply.example.org"]
            "#,
        );
        let name = |h: &str| r.route(Some(h), "/").map(|r| r.name.clone());
        assert_eq!(name("www.apply.example.org").as_deref(), Some("z_apply"));
        assert_eq!(name("www.example.org").as_deref(), Some("a_main"));
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let r = router(
            r#"
            [rooms.only]
            upstreams = ["http://127.0.0.1:1"]
            hosts = ["portal.example.org"]
            "#,
        );
        assert!(r.route(Some("evil.example.org"), "/").is_none());
        assert!(r.route(None, "/").is_none());
        assert!(r.route(Some("[::1]:80"), "/").is_none());
    }
}
