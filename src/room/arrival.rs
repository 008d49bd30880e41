//! `X-Varco-Arrival`: what varco tells the portal about an admitted
//! person's place in the order of arrival, signed so the portal can rely
//! on it (a portal that must honour first-come-first-served decides from
//! this, not from when the request happened to reach it).
//!
//! `X-Varco-Arrival: room=portal; n=1234; at=1795534878338; sig=<base64url>`
//!
//! `sig` is HMAC-SHA256, under the arrival key (`secrets.arrival_key_*`,
//! shared with the portal), of everything before `; sig=`. `n` is the
//! ticket number the person was admitted with, `at` their arrival in unix
//! milliseconds. varco removes any such header a client sends.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use http::{HeaderName, HeaderValue};

pub const HEADER: HeaderName = HeaderName::from_static("x-varco-arrival");

/// The header's value for one request, carried in the request's extensions
/// to the forwarder, which adds it after the client's hop-by-hop headers
/// are gone.
#[derive(Debug, Clone)]
pub struct Stamp(pub HeaderValue);

/// What the header says, once its signature is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub room: String,
    pub n: u64,
    pub at_ms: u64,
}

pub fn key(secret: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)
}

pub fn header(key: &ring::hmac::Key, a: &Arrival) -> HeaderValue {
    let signed = format!("room={}; n={}; at={}", a.room, a.n, a.at_ms);
    let tag = ring::hmac::sign(key, signed.as_bytes());
    let value = format!("{signed}; sig={}", B64.encode(tag.as_ref()));
    // Room names are config keys ([A-Za-z0-9_-]); the rest is digits and
    // base64url: always a valid header value.
    HeaderValue::from_str(&value).expect("an arrival header is visible ASCII")
}

/// What a portal does: check the signature, then read the fields.
pub fn verify(key: &ring::hmac::Key, value: &str) -> Option<Arrival> {
    let (signed, sig) = value.rsplit_once("; sig=")?;
    let sig = B64.decode(sig.trim()).ok()?;
    ring::hmac::verify(key, signed.as_bytes(), &sig).ok()?;
    let mut room = None;
    let (mut n, mut at_ms) = (None, None);
    for field in signed.split("; ") {
        match field.split_once('=')? {
            ("room", v) => room = Some(v.to_string()),
            ("n", v) => n = v.parse().ok(),
            ("at", v) => at_ms = v.parse().ok(),
            _ => {}
        }
    }
    Some(Arrival {
        room: room?,
        n: n?,
        at_ms: at_ms?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_by_the_key_and_nothing_else() {
        let k = key(&[7; 32]);
        let a = Arrival {
            room: "portal".into(),
            n: 1234,
            at_ms: 1_795_534_878_338,
        };
        let h = header(&k, &a);
        let text = h.to_str().unwrap();
        assert!(text.starts_with("room=portal; n=1234; at=1795534878338; sig="));
        assert_eq!(verify(&k, text), Some(a));
        assert_eq!(verify(&key(&[8; 32]), text), None);
        assert_eq!(verify(&k, &text.replace("n=1234", "n=1")), None);
        assert_eq!(verify(&k, "room=portal; n=1; at=2"), None);
    }
}
