//! A request ID for every request let through to the portal (nginx's
//! `$request_id`, Envoy's `x-request-id`; `server.request_id`): sent to
//! the upstream and back to the client in `X-Request-Id`, and written in
//! the access line and in the warning when it fails upstream, so an
//! operator can follow one request from varco's log to the portal's, and
//! a person who met an error page can quote it. A trusted proxy's own ID
//! is kept (the load balancer's log names it); anyone else's is replaced:
//! a client choosing IDs could make its requests look like another
//! person's in the logs.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::room::token::random_bytes;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The ID chosen for a request, set in its headers by the forwarder after
/// the client's hop-by-hop headers are gone: a client naming
/// `X-Request-Id` in `Connection` cannot keep it from the portal.
#[derive(Clone)]
pub struct Stamp(pub HeaderValue);

/// The longest ID kept from a trusted proxy.
const MAX_LEN: usize = 128;

pub struct RequestIds {
    /// Random per process: IDs from two varco nodes (practically) never
    /// meet.
    prefix: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        let [prefix, start] = [random_bytes::<8>(), random_bytes::<8>()].map(u64::from_le_bytes);
        RequestIds {
            prefix,
            next: AtomicU64::new(start),
        }
    }

    /// The request's ID: the one a trusted proxy sent, if it is a plain
    /// token, else a new one. Of several, the last: a proxy that adds its
    /// own after what the client sent is the one believed (as the
    /// right-most hop of X-Forwarded-For).
    pub fn choose(&self, headers: &HeaderMap, from_trusted_proxy: bool) -> HeaderValue {
        let kept = from_trusted_proxy
            .then(|| headers.get_all(&HEADER).iter().next_back())
            .flatten()
            .filter(|v| is_plain(v));
        kept.cloned().unwrap_or_else(|| self.make())
    }

    /// 32 hex digits: the prefix, then the counter through a bijective
    /// mix, so never the same twice in a process. By hand, with no system
    /// call and no formatter: it is made for every request to the portal
    /// (`format!` measured about 100 ns more in `headers/request_id`).
    fn make(&self) -> HeaderValue {
        let n = mix(self.next.fetch_add(1, Ordering::Relaxed));
        let mut out = [0u8; 32];
        for (i, byte) in self
            .prefix
            .to_be_bytes()
            .into_iter()
            .chain(n.to_be_bytes())
            .enumerate()
        {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out[2 * i] = HEX[(byte >> 4) as usize];
            out[2 * i + 1] = HEX[(byte & 15) as usize];
        }
        HeaderValue::from_bytes(&out).expect("hex digits are a header value")
    }
}

/// SplitMix64's finaliser: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a log line and a portal can take as it is: 1 to 128 letters,
/// digits and `-_.:+/=` (hex, UUIDs, base64, AWS's `Root=1-...`).
fn is_plain(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    (1..=MAX_LEN).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.:+/=".contains(c))
}

/// The ID as a log field.
pub fn text(id: Option<&HeaderValue>) -> &str {
    id.and_then(|v| v.to_str().ok()).unwrap_or("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_str(id).unwrap());
        h
    }

    #[test]
    fn a_new_id_is_32_hex_digits_and_never_repeats() {
        let ids = RequestIds::new();
        let made: std::collections::HashSet<String> = (0..10_000)
            .map(|_| {
                let id = ids.choose(&HeaderMap::new(), false);
                let s = id.to_str().unwrap().to_string();
                assert_eq!(s.len(), 32);
                assert!(s.bytes().all(|c| c.is_ascii_hexdigit()), "{s}");
                s
            })
            .collect();
        assert_eq!(made.len(), 10_000);
        // Two processes (here, two sets) do not share a prefix.
        let other = RequestIds::new().choose(&HeaderMap::new(), false);
        assert!(!made.contains(other.to_str().unwrap()));
    }

    #[test]
    fn only_a_trusted_proxys_plain_id_is_kept() {
        let ids = RequestIds::new();
        let aws = "Root=1-67891233-abcdef012345678912345678";
        assert_eq!(ids.choose(&with(aws), true), aws);
        assert_ne!(
            ids.choose(&with(aws), false),
            aws,
            "a client's own is replaced"
        );

        for odd in ["a b", "<script>", "x\"y", &"a".repeat(MAX_LEN + 1)] {
            assert_ne!(ids.choose(&with(odd), true), odd, "{odd} kept");
        }
        // A client's, then the proxy's own added after it.
        let mut h = with("the-clients");
        h.append(HEADER, HeaderValue::from_static("the-proxys"));
        assert_eq!(ids.choose(&h, true), "the-proxys");
    }
}
