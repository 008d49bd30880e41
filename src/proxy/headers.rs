//! Header rules at the proxy boundary: hop-by-hop removal (RFC 9110
//! §7.6.1), X-Forwarded-* from trusted proxies only, and the client's real
//! address.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Removes hop-by-hop headers and every header `Connection` names. A
/// request's (`request`) `TE: trailers` survives, since gRPC needs it end
/// to end; TE is a request's field only, and goes from an answer.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, request: bool) {
    // Runs twice per proxied request, and most messages carry none of
    // these or only Connection: the names present are found by one walk
    // over the map, and only they are removed (each removal hashes its
    // name; removing all nine blindly was 8% of a proxied request).
    // A request's `Connection` may not name the headers a trusted
    // balancer says the client in: removed here, a client would take its
    // own address out of the chain the portal reads, after varco read it
    // (Apache's CVE-2022-31813). varco writes them again below anyway.
    let listed: Vec<HeaderName> = if headers.contains_key(header::CONNECTION) {
        connection_tokens(headers)
            .filter(|t| !(request && says_the_client(t)))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name.as_str()) || listed.contains(name))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    let wants_trailers = request
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in &doomed {
        headers.remove(name);
    }
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A header that names the client or how it came, as a balancer writes
/// it (those a trusted one's are passed on in), by its name in lower case.
fn says_the_client(name: &str) -> bool {
    matches!(name, "x-forwarded-for" | "x-forwarded-proto") || is_claimed_by_a_proxy(name)
}

/// A header that describes one connection, never the message (RFC 9110
/// 7.6.1, with the proxy ones), told by its text: a length and a few bytes
/// to look at, where comparing `HeaderName`s one by one was most of the
/// walk.
fn is_hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Fields that may not come as trailers (RFC 9110 6.5.1: those that frame,
/// route, authorise or set up the message; hyper's HTTP/1.1 list) or that
/// are not the portal's to pass on there: hop-by-hop ones, and varco's own
/// release, which is read from the answer's head only. An HTTP/2 client
/// merging such a trailer into the head would be misled, and one naming
/// the release would reach the person as if varco had acted on it.
fn barred_from_trailers(name: &str) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name,
            "authorization"
                | "cache-control"
                | "content-encoding"
                | "content-length"
                | "content-range"
                | "content-type"
                | "host"
                | "max-forwards"
                | "set-cookie"
                | crate::gate::RELEASE_HEADER
        )
}

/// The upstream's trailers as the client gets them: without the fields
/// [`barred_from_trailers`] names.
pub fn filter_trailers(trailers: &mut HeaderMap) {
    remove_where(trailers, |name| barred_from_trailers(name.as_str()));
}

/// The answer's `Trailer` (which fields will follow the body), less those
/// that will not: the value to send on, if any field is left. hyper sends
/// an HTTP/1.1 client only the trailers it names, and only to one that
/// asked with `TE: trailers`.
pub fn announced_trailers(headers: &HeaderMap) -> Option<HeaderValue> {
    let kept: Vec<String> = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !barred_from_trailers(t))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// The comma-separated tokens of every `Connection` header, lowercased.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// An HTTP/1.1 upgrade to WebSocket: the one protocol varco tunnels. Any
/// other upgrade goes out as an ordinary request, its `Upgrade` removed
/// with the other hop-by-hop headers: above all h2c, whose tunnel would
/// speak HTTP/2 to the portal and carry any request past the gate.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    connection_tokens(headers).any(|t| t == "upgrade")
        && headers
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| {
                // `websocket`, or with a version: `websocket/13`.
                let name = p.trim().split('/').next().unwrap_or("");
                name.eq_ignore_ascii_case("websocket")
            })
}

/// Whether a 101 answer is the WebSocket handshake the client asked for
/// (RFC 6455 4.2.2): `Upgrade: websocket`, and `Sec-WebSocket-Accept` the
/// client's key hashed with the protocol's GUID, which only a server that
/// read the key as a WebSocket's can send. Else the tunnel varco would
/// open is a raw pipe to the portal (a page tricked into answering 101),
/// for requests past the in-flight cap, after the pass has ended.
pub fn accepts_websocket(answer: &HeaderMap, key: Option<&http::HeaderValue>) -> bool {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let Some(key) = key else {
        return false;
    };
    let upgrade = answer
        .get(header::UPGRADE)
        .is_some_and(|u| u.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes().trim_ascii());
    ctx.update(GUID);
    let expected = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(ctx.finish())
    };
    upgrade
        && answer
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|a| a.as_bytes().trim_ascii() == expected.as_bytes())
}

pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|net| net.contains(&peer))
}

/// An IPv4 peer on a dual-stack socket arrives as `::ffff:a.b.c.d`.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// RFC 7239 `Forwarded`'s elements, one per hop, in order.
pub fn forwarded_elements(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter(|e| !e.trim_ascii().is_empty())
}

/// One parameter of a `Forwarded` element (`for`, `proto`, `host`), its
/// quotes taken off.
pub fn forwarded_param<'a>(element: &'a [u8], name: &str) -> Option<&'a [u8]> {
    element.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        if !pair[..eq]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
        {
            return None;
        }
        let value = pair[eq + 1..].trim_ascii();
        Some(
            value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value),
        )
    })
}

/// Whether a trusted proxy's `Forwarded` says the browser spoke HTTPS,
/// for a balancer that sends only that (HAProxy's `option forwarded`):
/// the first element's `proto`, as of `X-Forwarded-Proto`'s list (each
/// proxy of a chain adds the scheme it was reached by). A client that
/// writes its own first element there only makes its cookies stricter,
/// and the portal reads what a chain's `X-Forwarded-Proto` would say.
pub fn forwarded_says_https(headers: &HeaderMap) -> bool {
    forwarded_elements(headers)
        .next()
        .and_then(|e| forwarded_param(e, "proto"))
        .is_some_and(|p| p.eq_ignore_ascii_case(b"https"))
}

/// The first element of a list header (`https, http`: the one the proxy
/// nearest the browser wrote), trimmed.
pub fn first_element(v: &HeaderValue) -> &[u8] {
    v.as_bytes()
        .split(|&b| b == b',')
        .next()
        .unwrap_or(b"")
        .trim_ascii()
}

/// The address each `Forwarded` element names in `for=`; none for one
/// that names none (an obfuscated name, `unknown`).
fn forwarded_addresses(headers: &HeaderMap) -> impl Iterator<Item = Option<IpAddr>> + '_ {
    forwarded_elements(headers).map(|e| {
        forwarded_param(e, "for")
            .and_then(|f| std::str::from_utf8(f).ok())
            .and_then(hop_address)
    })
}

/// Each hop's address in a `Forwarded` (`for=`), as an X-Forwarded-For
/// entry: `unknown` for one that names none, so a walk from the right
/// stops there.
fn forwarded_hops(headers: &HeaderMap) -> Vec<String> {
    forwarded_addresses(headers)
        .map(|a| a.map_or_else(|| "unknown".to_string(), address_text))
        .collect()
}

/// Sets X-Forwarded-For, -Proto and -Host. From a trusted proxy, the chain
/// it sent is kept and the peer appended; from anyone else, whatever the
/// client claimed is replaced, so nobody can forge an address or scheme.
/// `X-Forwarded-Host` is always the host varco routed and gated by, and a
/// trusted proxy's `Forwarded` is written again from what the others say:
/// a portal reading any of them reads what varco read.
/// Which header a trusted balancer names the client in
/// (`server.client_address_header`, as nginx's `real_ip_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientHeader {
    /// `X-Forwarded-For` (and `-Proto`); RFC 7239's `Forwarded` only when
    /// the balancer sends no `X-Forwarded-For`.
    #[default]
    XForwardedFor,
    /// RFC 7239's `Forwarded` alone: a balancer that writes it and passes
    /// the client's own `X-Forwarded-For` and `-Proto` on as they came
    /// (HAProxy's `option forwarded`), which are then replaced.
    Forwarded,
}

pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    set_forwarded_from(
        headers,
        peer,
        trusted_peer,
        &[],
        proto,
        host,
        ClientHeader::XForwardedFor,
    )
}

/// [`set_forwarded`], reading a trusted balancer's word from `from`;
/// `trusted`: the proxies before it that varco trusts too
/// (`server.trusted_proxies`), skipped as varco skips them to find the
/// client.
pub fn set_forwarded_from(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    trusted: &[IpNet],
    proto: &'static str,
    host: Option<&HeaderValue>,
    from: ClientHeader,
) {
    let peer_ip = canonical(peer);
    let peer = address_text(peer_ip);
    // From every peer: a balancer in front passes the client's own on.
    remove_where(headers, |name| {
        is_a_rewritten_path(name.as_str()) || is_httpoxy(name.as_str())
    });
    if trusted_peer {
        remove_where(headers, is_underscore_twin);
        if from == ClientHeader::Forwarded {
            // The client's own, passed on beside the balancer's word.
            headers.remove(&X_FORWARDED_FOR);
            headers.remove(&X_FORWARDED_PROTO);
        }
        // As sent, bytes past ASCII too: a line dropped for one of them
        // would drop the addresses the proxies added after it.
        let mut chain: Vec<u8> = Vec::new();
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if !v.as_bytes().trim_ascii().is_empty() {
                chain.extend_from_slice(v.as_bytes());
                chain.extend_from_slice(b", ");
            }
        }
        let forwarded = headers.contains_key(header::FORWARDED);
        let from_xff = !chain.is_empty();
        if !from_xff && forwarded {
            // A balancer that sends only RFC 7239's header.
            for hop in forwarded_hops(headers) {
                chain.extend_from_slice(hop.as_bytes());
                chain.extend_from_slice(b", ");
            }
        }
        chain.extend_from_slice(peer.as_bytes());
        match HeaderValue::from_bytes(&chain) {
            Ok(v) => {
                headers.insert(X_FORWARDED_FOR, v);
            }
            // Never: what headers held, joined by ", ", is a header. But the
            // peer is the one address that must be there.
            Err(_) => set(headers, X_FORWARDED_FOR, &peer),
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            let proto = if proto == "https" || forwarded_says_https(headers) {
                "https"
            } else {
                "http"
            };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        // The client's own, passed on by a balancer, would name a host
        // varco did not route by: another room's, past this one's line.
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
        if forwarded {
            rewrite_forwarded(headers, peer_ip, from_xff, trusted);
        }
    } else {
        remove_where(headers, |name| {
            is_claimed_by_a_proxy(name.as_str()) || is_underscore_twin(name)
        });
        set(headers, X_FORWARDED_FOR, &peer);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        if let Some(h) = host {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
    }
}

/// A trusted proxy's `Forwarded`, written again once X-Forwarded-For,
/// -Proto and -Host are set: the hops varco read the client from (the
/// X-Forwarded-For chain when the balancer sent one, `from_xff`, else the
/// `Forwarded` one's own `for=` hops) and varco's peer, the first with the
/// scheme and the host varco decided by. A balancer that writes
/// X-Forwarded-For passes a client's `Forwarded` on as it came: its hops,
/// `host=` and `proto=` could be anyone's. The hops start at the client
/// varco found (walking from the right past `trusted` proxies, as
/// `client_ip_from`): frameworks take the first `for=` as the client, and
/// what a client wrote on the left of it is its own word.
fn rewrite_forwarded(headers: &mut HeaderMap, peer: IpAddr, from_xff: bool, trusted: &[IpNet]) {
    let proto = match headers.get(&X_FORWARDED_PROTO).map(first_element) {
        Some(p) if p.eq_ignore_ascii_case(b"https") => "https",
        _ => "http",
    };
    let mut out = String::new();
    let addresses: Vec<Option<IpAddr>> = if from_xff {
        // Ends with the peer, appended above.
        xff_entries(headers).map(entry_address).collect()
    } else {
        forwarded_addresses(headers)
            .chain(std::iter::once(Some(peer)))
            .collect()
    };
    // The peer, last, is trusted (this runs only for a trusted one); the
    // walk found none before it: the peer is the client.
    let last = addresses.len().saturating_sub(1);
    let first = client_hop(addresses[..last].iter().copied(), trusted)
        .map_or(last, |(right_of_it, _)| last - 1 - right_of_it);
    let hops: Vec<String> = addresses[first..]
        .iter()
        .map(|hop| match *hop {
            Some(IpAddr::V6(v6)) => format!("\"[{v6}]\""),
            Some(v4) => v4.to_string(),
            None => "unknown".to_string(),
        })
        .collect();
    for (i, hop) in hops.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str("for=");
        out.push_str(hop);
        if i == 0 {
            out.push_str(";proto=");
            out.push_str(proto);
            // A host that needs no escaping in a quoted string; any other
            // is left out rather than passed on as sent.
            if let Some(h) = headers
                .get(&X_FORWARDED_HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| !h.contains(['"', '\\']))
            {
                out.push_str(";host=\"");
                out.push_str(h);
                out.push('"');
            }
        }
    }
    match HeaderValue::from_str(&out) {
        Ok(v) if !hops.is_empty() => {
            headers.insert(header::FORWARDED, v);
        }
        _ => {
            headers.remove(header::FORWARDED);
        }
    }
}

/// Whether a message's `Transfer-Encoding` is anything but `chunked`
/// alone (gzip, chunked; chunked twice; an empty element). hyper takes
/// the chunks off and leaves the rest, and the field goes as hop-by-hop:
/// the receiver would read coded bytes as plain ones. Refused both ways,
/// as nginx does: a request with 501, an answer with 502.
pub fn has_unknown_coding(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (None, _) => false,
        (Some(only), None) => !only.eq_ignore_ascii_case(b"chunked"),
        _ => true,
    }
}

/// Headers that only a proxy in front of the portal may set: the client's
/// address, scheme, port or path prefix as the portal's frameworks read
/// them (nginx's X-Real-IP, CDNs' client-IP headers, Rails' X-Forwarded-Ssl,
/// Spring's X-Forwarded-Prefix, PHP's HTTP_CLIENT_IP read before
/// X-Forwarded-For by the usual "real IP" snippet...). From anyone else
/// they are forgeries, and a portal that logs or rate-limits by them would
/// be fooled. So are the client certificate a TLS-terminating proxy
/// checked (Envoy's XFCC, nginx's and Traefik's, IIS ARR's, AWS's): varco
/// asks for none, and a portal that signs people in by a smart card's
/// certificate would take the client's word for whose it is. (X-Forwarded-For
/// and -Proto are replaced by varco's own.)
fn is_claimed_by_a_proxy(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-server"
            | "x-forwarded-ssl"
            | "x-forwarded-scheme"
            | "x-forwarded"
            | "forwarded-for"
            | "x-url-scheme"
            | "front-end-https"
            | "x-real-ip"
            | "x-client-ip"
            | "client-ip"
            | "true-client-ip"
            | "x-cluster-client-ip"
            | "cf-connecting-ip"
            | "fastly-client-ip"
            | "x-original-host"
            | "x-host"
            | "x-forwarded-client-cert"
            | "x-forwarded-tls-client-cert"
            | "x-forwarded-tls-client-cert-info"
            | "x-ssl-client-cert"
            | "x-ssl-cert"
            | "ssl-client-cert"
            | "x-client-cert"
            | "x-client-verify"
            | "x-ssl-client-verify"
            | "ssl-client-verify"
            | "x-client-dn"
            | "x-ssl-client-dn"
            | "x-ssl-client-s-dn"
            | "x-arr-ssl"
            | "x-arr-clientcert"
            | "x-amzn-mtls-clientcert"
    )
}

/// The path a rewriting proxy saw (IIS's X-Original-URL and X-Rewrite-URL,
/// read over the request line by Symfony and Zend before their fixes, and
/// by some IIS rewrite set-ups): varco gates the path in the request line,
/// an exempt one, and the portal would serve this one, past the queue.
/// So is X-Script-Name, from which the "reverse proxied" middleware of
/// Flask and other WSGI portals sets SCRIPT_NAME and cuts that prefix
/// off the path: `/static/apply` with `X-Script-Name: /static` is
/// gated as an exempt asset and served as `/apply`.
/// Taken from every peer: no proxy in front of varco rewrites for the
/// portal behind it, and balancers pass the client's copy on.
/// (Their underscore twins are `is_underscore_twin`'s, from every peer.)
fn is_a_rewritten_path(name: &str) -> bool {
    matches!(
        name,
        "x-original-url" | "x-original-uri" | "x-rewrite-url" | "x-forwarded-uri" | "x-script-name"
    )
}

/// `Proxy`, which no HTTP standard defines: a portal served CGI-style
/// (PHP-FPM, CGI, WSGI under CGI) reads it as `HTTP_PROXY`, which many
/// HTTP clients take for the proxy of the portal's own outgoing calls (to
/// the identity provider, a payment service), so one request could send
/// them through the sender's machine ("httpoxy", CVE-2016-5385 and
/// others). nginx's and Apache's advice: drop it before the portal.
fn is_httpoxy(name: &str) -> bool {
    name == "proxy"
}

/// `X_Real_IP`, `X_Forwarded_For`, `X_Request_Id`, `X_Varco_Arrival`:
/// servers that hand headers to the application CGI-style (gunicorn
/// before 22, PHP-FPM behind some gateways) read them as `X-Real-IP`,
/// `X-Forwarded-For`, `X-Request-Id` and `X-Varco-Arrival`, beside or over
/// varco's own (an arrival replayed from another person, or one blanking
/// the real one). Never sent by a legitimate proxy; nginx drops every
/// header with an underscore by default.
fn is_underscore_twin(name: &HeaderName) -> bool {
    let name = name.as_str();
    if !name.contains('_') {
        return false;
    }
    let dashed = name.replace('_', "-");
    matches!(
        dashed.as_str(),
        "x-forwarded-for" | "x-forwarded-proto" | "x-request-id" | "x-varco-arrival"
    ) || is_claimed_by_a_proxy(&dashed)
        || is_a_rewritten_path(&dashed)
}

fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in &names {
        headers.remove(name);
    }
}

/// An address as X-Forwarded-For writes it; IPv4 by hand, since the
/// formatter's general path cost a proxied request more than everything
/// else these headers do.
fn address_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
    out
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The address of the person behind the request: the peer, or, when the
/// peer is a trusted proxy, the right-most address in X-Forwarded-For that
/// is not itself a trusted proxy. The walk stops at the first entry it
/// cannot read (`unknown`, an obfuscated name): everything left of it was
/// written by whoever sent the request, so reading past it would let a
/// client choose its own address (a bypass range, a lane, a fresh per-IP
/// budget). Then, as nginx's realip does, the peer stands. Entries with a
/// port (`192.0.2.7:50123`, `[2001:db8::1]:443`), as some load balancers
/// write them, are read without it.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    client_ip_from(headers, peer, trusted, ClientHeader::XForwardedFor)
}

/// [`client_ip`], reading a trusted balancer's word from `from`.
pub fn client_ip_from(
    headers: &HeaderMap,
    peer: IpAddr,
    trusted: &[IpNet],
    from: ClientHeader,
) -> IpAddr {
    if !is_trusted(peer, trusted) {
        return canonical(peer);
    }
    let hops: Vec<&[u8]> = match from {
        ClientHeader::XForwardedFor => xff_entries(headers).collect(),
        ClientHeader::Forwarded => Vec::new(),
    };
    // A balancer that sends only RFC 7239's `Forwarded` (HAProxy's
    // `option forwarded`): its `for=` hops, read the same way, or every
    // person would share the balancer's per-address budget.
    let found = if hops.is_empty() && headers.contains_key(header::FORWARDED) {
        let addresses: Vec<Option<IpAddr>> = forwarded_addresses(headers).collect();
        client_hop(addresses.into_iter(), trusted)
    } else {
        client_hop(hops.into_iter().map(entry_address), trusted)
    };
    found.map_or_else(|| canonical(peer), |(_, ip)| ip)
}

/// X-Forwarded-For's entries, split as bytes: a byte past ASCII spoils
/// its own entry (where a walk stops), not the line a balancer extended
/// with the real address. Empty elements are no entry (RFC 9110, 5.6.1):
/// `a, b,` is `a, b`.
fn xff_entries(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter(|hop| !hop.trim_ascii().is_empty())
}

/// An X-Forwarded-For entry's address; None for one it cannot read.
fn entry_address(hop: &[u8]) -> Option<IpAddr> {
    std::str::from_utf8(hop)
        .ok()
        .and_then(|hop| hop_address(hop.trim()))
}

/// Walking `hops` from the right past `trusted` proxies: the client, with
/// how many hops stand right of it. None: the walk passed them all, or
/// stopped at one it cannot read (what stands left of that is anyone's
/// word).
fn client_hop(
    hops: impl DoubleEndedIterator<Item = Option<IpAddr>>,
    trusted: &[IpNet],
) -> Option<(usize, IpAddr)> {
    for (right_of_it, hop) in hops.rev().enumerate() {
        let ip = hop?;
        if !is_trusted(ip, trusted) {
            return Some((right_of_it, ip));
        }
    }
    None
}

/// What a per-address limit counts by: an IPv4 address, or an IPv6
/// address's /64. One IPv6 subscriber (a phone, a home) is handed a whole
/// /64 and may take a fresh source address for every connection, so
/// counting each address would give a bot as many ticket budgets as it
/// cares to make. Providers hand out no less than a /64 to anyone. An
/// IPv4 client of a dual-stack listener counts as its IPv4 address, not
/// as the /64 every such client shares (`::ffff:0:0/96`).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// One X-Forwarded-For entry: an address, bare or with a port.
fn hop_address(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = hop.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || is_port(after.strip_prefix(':')?)) {
            return None;
        }
        return inside
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|v6| canonical(IpAddr::V6(v6)));
    }
    // `v4:port`; a bare v6 has more than one colon and parsed above.
    let (addr, port) = hop.split_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(text: &str) -> bool {
    text.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_websocket_handshake_is_the_one_the_key_asked_for() {
        // RFC 6455's own example.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        let answer = |upgrade: &str, accept: &str| {
            map(&[("upgrade", upgrade), ("sec-websocket-accept", accept)])
        };
        let right = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert!(accepts_websocket(&answer("websocket", right), Some(&key)));
        assert!(accepts_websocket(&answer("WebSocket", right), Some(&key)));
        assert!(!accepts_websocket(&answer("h2c", right), Some(&key)));
        assert!(!accepts_websocket(&answer("websocket", "AAAA"), Some(&key)));
        assert!(!accepts_websocket(
            &map(&[("upgrade", "websocket")]),
            Some(&key)
        ));
        assert!(!accepts_websocket(&answer("websocket", right), None));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_listed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers, deflate"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        let mut answer = h.clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["te"], "trailers");
        strip_hop_by_hop(&mut answer, false);
        assert_eq!(answer.len(), 1, "{answer:?}");
        assert_eq!(answer["x-kept"], "yes");
    }

    #[test]
    fn the_hop_by_hop_names_are_the_list() {
        let hop_by_hop = [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
            header::PROXY_AUTHORIZATION,
            header::PROXY_AUTHENTICATE,
        ];
        for name in hop_by_hop {
            assert!(is_hop_by_hop(name.as_str()), "{name}");
        }
        for name in ["x-kept", "host", "cookie", "tee", "connections"] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn trailers_keep_only_what_may_follow_a_body() {
        let mut t = map(&[
            ("x-checksum", "abc"),
            ("grpc-status", "0"),
            ("x-varco-release", "1"),
            ("set-cookie", "s=1"),
            ("content-length", "9"),
            ("connection", "close"),
        ]);
        filter_trailers(&mut t);
        let mut kept: Vec<&str> = t.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["grpc-status", "x-checksum"]);

        let announced = map(&[
            ("trailer", "X-Checksum, X-Varco-Release"),
            ("trailer", "set-cookie,grpc-status"),
        ]);
        assert_eq!(
            announced_trailers(&announced).unwrap(),
            "x-checksum, grpc-status"
        );
        let only_barred = map(&[("trailer", "x-varco-release, content-type")]);
        assert_eq!(announced_trailers(&only_barred), None);
        assert_eq!(announced_trailers(&HeaderMap::new()), None);
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for ip in [
            "0.0.0.0",
            "192.0.2.1",
            "255.255.255.255",
            "10.20.3.40",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_text(ip), ip.to_string());
        }
    }

    #[test]
    fn forwarded_from_untrusted_peer_is_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            ("x-original-url", "/servizi/bonus/apply"),
            ("x-rewrite-url", "/servizi/bonus/apply"),
            ("x-script-name", "/static"),
            ("client-ip", "6.6.6.6"),
            ("x-forwarded", "for=6.6.6.6"),
            ("forwarded-for", "6.6.6.6"),
            (
                "x-forwarded-client-cert",
                "Hash=ab;Subject=\"CN=someone else\"",
            ),
            ("x-ssl-client-cert", "-----BEGIN CERTIFICATE-----"),
            ("x-arr-clientcert", "MIIB"),
            ("x-original-host", "other.example"),
        ]);
        h.insert("x_real_ip", "6.6.6.6".parse().unwrap());
        h.insert("x_script_name", "/static".parse().unwrap());
        h.insert("x_original_url", "/servizi/bonus/apply".parse().unwrap());
        h.insert("x_forwarded_for", "6.6.6.6".parse().unwrap());
        h.insert("x_request_id", "forged".parse().unwrap());
        h.insert("x_varco_arrival", "replayed".parse().unwrap());
        h.insert("x_portal_token", "kept".parse().unwrap());
        set_forwarded(&mut h, "192.0.2.1".parse().unwrap(), false, "http", None);
        assert!(
            h.get("x_varco_arrival").is_none(),
            "a twin of varco's signed arrival"
        );
        assert!(h.get("x-real-ip").is_none() && h.get("true-client-ip").is_none());
        assert!(
            h.get("client-ip").is_none()
                && h.get("x-forwarded").is_none()
                && h.get("forwarded-for").is_none(),
            "PHP's HTTP_CLIENT_IP and the rest"
        );
        for cert in [
            "x-forwarded-client-cert",
            "x-ssl-client-cert",
            "x-arr-clientcert",
            "x-original-host",
        ] {
            assert!(h.get(cert).is_none(), "{cert}");
        }
        assert!(
            h.get("x-script-name").is_none() && h.get("x_script_name").is_none(),
            "a prefix a WSGI portal cuts off the path gated"
        );
        assert!(
            h.get("x-original-url").is_none()
                && h.get("x-rewrite-url").is_none()
                && h.get("x_original_url").is_none(),
            "a path past the gate"
        );
        assert!(h.get("x_real_ip").is_none() && h.get("x_forwarded_for").is_none());
        assert!(
            h.get("x_request_id").is_none(),
            "a twin of varco's request ID"
        );
        assert_eq!(
            h["x_portal_token"], "kept",
            "other underscores are the portal's"
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn forwarded_from_trusted_peer_is_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-proto", "https"),
        ]);
        h.insert("x_forwarded_for", "6.6.6.6".parse().unwrap());
        h.insert("x-original-url", "/servizi/bonus/apply".parse().unwrap());
        h.insert("x-script-name", "/static".parse().unwrap());
        set_forwarded(&mut h, "10.0.0.2".parse().unwrap(), true, "http", None);
        assert!(
            h.get("x-original-url").is_none() && h.get("x-script-name").is_none(),
            "a balancer passes the client's on"
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.9, 10.0.0.2");
        assert!(h.get("x_forwarded_for").is_none());
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn client_ip_skips_trusted_hops() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let h = map(&[("x-forwarded-for", "6.6.6.6, 198.51.100.9, 10.1.1.1")]);
        let peer = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(&h, peer, &trusted),
            "198.51.100.9".parse::<IpAddr>().unwrap()
        );
        let outsider = "192.0.2.1".parse().unwrap();
        assert_eq!(client_ip(&h, outsider, &trusted), outsider);
    }

    #[test]
    fn a_balancer_sending_only_forwarded_names_the_client() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let peer = "10.0.0.2".parse().unwrap();
        let ip = |f: &str| client_ip(&map(&[("forwarded", f)]), peer, &trusted);
        assert_eq!(
            ip("for=198.51.100.7;proto=https"),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            ip("for=6.6.6.6, For=\"[2001:db8::7]:4711\", for=10.1.1.1"),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(ip("for=6.6.6.6, for=_hidden"), peer, "unreadable: stop");
        // X-Forwarded-For, when sent, is the one read.
        let h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        assert_eq!(
            client_ip(&h, peer, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_trusted_forwarded_is_written_again_as_varco_reads_it() {
        let host = HeaderValue::from_static("www.example.org");
        let mut h = map(&[
            (
                "forwarded",
                "for=198.51.100.7;proto=https;host=bonus.example.org",
            ),
            ("forwarded", "for=\"[2001:db8::9]\";proto=http"),
            ("x-forwarded-host", "bonus.example.org"),
        ]);
        let mut untrusting = h.clone();
        // The proxy at 2001:db8::9 trusted too: the client is before it.
        let trusted = ["2001:db8::/32".parse().unwrap()];
        set_forwarded_from(
            &mut h,
            "10.0.0.2".parse().unwrap(),
            true,
            &trusted,
            "http",
            Some(&host),
            ClientHeader::XForwardedFor,
        );
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 2001:db8::9, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "www.example.org");
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7;proto=https;host=\"www.example.org\", for=\"[2001:db8::9]\", for=10.0.0.2"
        );
        // Not trusted, it is the client varco reads, and the first hop.
        set_forwarded(
            &mut untrusting,
            "10.0.0.2".parse().unwrap(),
            true,
            "http",
            Some(&host),
        );
        assert_eq!(
            untrusting["forwarded"],
            "for=\"[2001:db8::9]\";proto=https;host=\"www.example.org\", for=10.0.0.2"
        );
        // A balancer writing X-Forwarded-For (the default's) passed a
        // client's Forwarded on: it names the addresses varco read, not
        // the client's own, and none the client wrote on their left.
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6;proto=https"),
        ]);
        set_forwarded(
            &mut h,
            "10.0.0.2".parse().unwrap(),
            true,
            "http",
            Some(&host),
        );
        assert_eq!(
            h["forwarded"],
            "for=198.51.100.7;proto=https;host=\"www.example.org\", for=10.0.0.2"
        );
        // A hop it cannot read ends the walk, as for varco's own reading:
        // the balancer is the client.
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.7, unknown"),
            ("forwarded", "for=x"),
        ]);
        set_forwarded(&mut h, "10.0.0.2".parse().unwrap(), true, "http", None);
        assert_eq!(h["forwarded"], "for=10.0.0.2;proto=http");
        // A balancer writing Forwarded beside a client's X-Forwarded-For
        // is read in the `forwarded` mode: its hops stay.
        let mut h = map(&[
            ("x-forwarded-for", "10.9.9.9"),
            ("forwarded", "for=203.0.113.5;proto=https"),
        ]);
        set_forwarded_from(
            &mut h,
            "10.0.0.2".parse().unwrap(),
            true,
            &[],
            "http",
            Some(&host),
            ClientHeader::Forwarded,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.5, 10.0.0.2");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.5;proto=https;host=\"www.example.org\", for=10.0.0.2"
        );
    }

    #[test]
    fn limits_count_an_ipv6_subscriber_by_its_64() {
        let key = |s: &str| limit_key(s.parse().unwrap()).to_string();
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:ffff:ffff:ffff:ffff"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:3::1"), "2001:db8:1:3::");
        assert_eq!(key("198.51.100.7"), "198.51.100.7");
        assert_eq!(key("::ffff:198.51.100.7"), "198.51.100.7");
    }

    #[test]
    fn client_ip_stops_at_an_entry_it_cannot_read() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let ip = |xff: &str| client_ip(&map(&[("x-forwarded-for", xff)]), peer, &trusted);
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        // What the client wrote on the left is never reached past garbage.
        assert_eq!(ip("192.0.2.66, unknown"), peer);
        assert_eq!(ip("192.0.2.66, _hidden, 10.1.1.1"), peer);
        assert_eq!(ip("192.0.2.66, 198.51.100.7:"), peer);
        assert_eq!(ip("192.0.2.66, 198.51.100.7:99999"), peer);
        assert_eq!(ip("192.0.2.66, [2001:db8::1]x"), peer);
        // Ports, as Azure Application Gateway and IIS ARR write them.
        assert_eq!(ip("192.0.2.66, 198.51.100.7:50123"), v4("198.51.100.7"));
        assert_eq!(ip("192.0.2.66, [2001:db8::1]:443"), v4("2001:db8::1"));
        assert_eq!(ip("192.0.2.66, [2001:db8::1]"), v4("2001:db8::1"));
        assert_eq!(ip("192.0.2.66, 2001:db8::1"), v4("2001:db8::1"));
        // A mapped address is the IPv4 one, as the peer's is.
        assert_eq!(ip("192.0.2.66, ::ffff:198.51.100.8"), v4("198.51.100.8"));
        // Trusted hops with ports are still skipped.
        assert_eq!(ip("198.51.100.9, 10.1.1.1:8080"), v4("198.51.100.9"));
    }

    /// A byte past ASCII the client wrote on the left of the line its
    /// balancer extended is that entry's problem, not the line's: the
    /// address the balancer added still stands, and goes to the portal.
    #[test]
    fn a_byte_past_ascii_spoils_only_its_own_entry() {
        let trusted = vec!["10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 203.0.113.7").unwrap(),
        );
        let seen = client_ip(&h, peer, &trusted);
        assert_eq!(seen, "203.0.113.7".parse::<IpAddr>().unwrap());
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"203.0.113.7, \xff").unwrap(),
        );
        assert_eq!(client_ip(&h, peer, &trusted), peer, "unreadable: stop");
        h.insert(X_FORWARDED_FOR, "203.0.113.7, ".parse().unwrap());
        h.append(X_FORWARDED_FOR, " ".parse().unwrap());
        let seen = client_ip(&h, peer, &trusted);
        assert_eq!(
            seen,
            "203.0.113.7".parse::<IpAddr>().unwrap(),
            "empty: none"
        );
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 203.0.113.7").unwrap(),
        );
        set_forwarded(&mut h, peer, true, "http", None);
        assert_eq!(
            h["x-forwarded-for"].as_bytes(),
            b"\xff, 203.0.113.7, 10.0.0.2",
            "the chain goes on as sent"
        );
    }
}
