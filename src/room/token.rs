//! Tickets and passes as signed JWTs (HS256, algorithm pinned, `kid` for
//! key rotation: the newest key signs, every key verifies). Anything that
//! fails to verify, for whatever reason, is simply no token: the caller
//! sees `None`, never an error it could turn into a 5xx.
//!
//! The HMAC runs on ring (already in the tree for rustls): directly, with
//! each key's schedule computed once, for the tokens varco writes (every
//! arrival signs one; every reload and status poll verifies one), and
//! through jsonwebtoken's `CryptoProvider` for a header in any other form.
//! Tests hold the direct path to jsonwebtoken's bytes and answers. So
//! neither aws-lc nor the RustCrypto RSA crate (an open advisory) is
//! pulled in.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Clock skew tolerated between nodes when checking `exp` (jsonwebtoken's
/// default is 60 s; a pass that outlives its idle timeout by a minute is
/// too generous for a waiting room).
pub const LEEWAY_MS: u64 = 5_000;

/// Clock skew tolerated when checking `nbf`: jsonwebtoken's minute. Only
/// varco signs its tokens, so one "from the future" is one signed by a
/// clock ahead of this one (another node's, or this one's before NTP
/// stepped it back), not a forgery; at `exp`'s 5 s a step back of 10 s
/// made every pass and ticket signed in those 10 s no pass and no ticket:
/// a form sent back to the line, a place lost.
pub const NBF_LEEWAY_MS: u64 = 60_000;
const ISSUER: &str = "varco";

/// One signing key with its id.
#[derive(Clone)]
pub struct SigningKey {
    pub id: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, {} bytes)", self.id, self.secret.len())
    }
}

/// The id of the key made at start (`secrets.ephemeral`): it lives and
/// dies with its process.
pub const EPHEMERAL_KEY_ID: &str = "ephemeral";

/// The keys varco knows; the last one signs.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Arc<Vec<(SigningKey, DecodingKey)>>,
    /// Each key's HMAC key schedule, computed once (same order as
    /// `keys`; the last signs tickets, passes and receipt codes):
    /// jsonwebtoken rebuilds it on every call, and a click day signs a
    /// ticket per arrival and verifies one per reload and status poll.
    hmacs: Arc<Vec<ring::hmac::Key>>,
    /// Each key's encoded JWT header, as varco writes it (same order as
    /// `keys`): a token's key is found by comparing bytes, without
    /// decoding its header.
    headers: Arc<Vec<String>>,
}

/// `base64url` of the JWT header varco writes for key `kid`: what
/// `jsonwebtoken::encode` writes too.
fn encoded_header(kid: &str) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.to_string());
    B64.encode(serde_json::to_vec(&header).expect("a JWT header serialises"))
}

/// What a ticket says: the room, the place in line and when it was issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    pub iss: String,
    pub aud: String,
    /// Ticket number (effective place), or 0 for a pre-queue ticket.
    pub n: u64,
    /// Pre-queue number, drawn by lot at opening; 0 after opening.
    #[serde(default)]
    pub pre: u64,
    /// Arrival: when the ticket was first issued, unix ms.
    pub at: u64,
    pub nbf: u64,
    pub exp: u64,
    /// Where the person wanted to go (a path), so admission lands there.
    #[serde(default)]
    pub u: String,
    /// A provisional ticket ("epoch:seq" in hex and decimal), handed out
    /// while the shared store was away; empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dg: String,
    /// The lane it waits in; empty: the room's default lane.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub l: String,
    /// The run of the queue it was issued in (`RoomStore::generation`);
    /// 0: not known.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub g: u64,
}

/// What a pass says: the room, a session id and when it stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassClaims {
    pub iss: String,
    pub aud: String,
    /// Session id (hex of 128 random bits).
    pub sid: String,
    /// The ticket number it was admitted with.
    #[serde(default)]
    pub n: u64,
    /// When the session began, unix ms.
    pub at: u64,
    pub nbf: u64,
    pub exp: u64,
    /// When the person first arrived (their ticket's `at`), unix ms: what
    /// the portal gets in `X-Varco-Arrival`.
    #[serde(default)]
    pub arr: u64,
    /// When the portal last failed this person (5xx or no answer), unix
    /// ms; 0: never. Lets them back in at the head of the line.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub f: u64,
    /// Re-entries after a portal failure already used.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub re: u64,
    /// Returns by a login callback already used.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fr: u64,
    /// The lane it was admitted from; empty: the default lane.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub l: String,
    /// 1: handed out with the "try again" of a claim whose answer never
    /// came, for the session the claim would have made. Good only once
    /// the store confirms the session: never taken at its word.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uc: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

pub fn audience(kind: &str, room: &str) -> String {
    let mut aud = String::with_capacity(7 + kind.len() + room.len());
    aud.push_str("varco:");
    aud.push_str(kind);
    aud.push(':');
    aud.push_str(room);
    aud
}

impl Keyring {
    pub fn new(keys: Vec<SigningKey>) -> Self {
        install_provider();
        let keys: Vec<_> = keys
            .into_iter()
            .map(|k| {
                let d = DecodingKey::from_secret(&k.secret);
                (k, d)
            })
            .collect();
        assert!(!keys.is_empty(), "a keyring has at least one key");
        Keyring {
            headers: Arc::new(keys.iter().map(|(k, _)| encoded_header(&k.id)).collect()),
            hmacs: Arc::new(
                keys.iter()
                    .map(|(k, _)| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k.secret))
                    .collect(),
            ),
            keys: Arc::new(keys),
        }
    }

    /// A fresh random key that lives as long as the process (the demo).
    pub fn ephemeral() -> Self {
        Keyring::new(vec![SigningKey {
            id: EPHEMERAL_KEY_ID.into(),
            secret: random_bytes::<32>().to_vec(),
        }])
    }

    /// This keyring, with `older` verifying too (not signing).
    pub fn verifying_also(&self, older: &SigningKey) -> Keyring {
        let keys = std::iter::once(older.clone())
            .chain(self.keys.iter().map(|(k, _)| k.clone()))
            .collect();
        Keyring::new(keys)
    }

    pub fn signing_key(&self) -> &SigningKey {
        &self.keys.last().expect("a keyring has at least one key").0
    }

    /// Whether `secret` is one of this keyring's keys.
    pub fn holds_secret(&self, secret: &[u8]) -> bool {
        self.keys.iter().any(|(k, _)| k.secret == secret)
    }

    /// The ids of the keys, oldest first (the last signs).
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(k, _)| k.id.as_str())
    }

    pub fn key(&self, id: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|(k, _)| k.id == id).map(|(k, _)| k)
    }

    /// A compact JWT (RFC 7519) signed HS256 with the newest key: what
    /// `jsonwebtoken::encode` produces, and what `verify` (through
    /// jsonwebtoken) accepts.
    pub fn sign<T: Claims>(&self, claims: &T) -> String {
        let mut token = String::with_capacity(384);
        self.sign_into(claims, &mut token);
        token
    }

    /// `sign`, appended to `out` (a Set-Cookie being written).
    pub fn sign_into<T: Claims>(&self, claims: &T, out: &mut String) {
        // A ticket (signed for every new arrival) writes its JSON on the
        // stack; anything else, or a ticket that declines, goes through
        // serde_json: passes are signed once per admission or renewal.
        let mut stack = [0u8; 768];
        let heap;
        let payload: &[u8] = match claims.write_json(&mut stack) {
            Some(n) => &stack[..n],
            None => {
                heap = serde_json::to_vec(claims).expect("claims serialise");
                &heap
            }
        };
        // The newest key signs: its header is the last.
        let header = self.headers.last().expect("a keyring has at least one key");
        let start = out.len();
        out.reserve(header.len() + payload.len() * 4 / 3 + 48);
        out.push_str(header);
        out.push('.');
        B64.encode_string(payload, out);
        let tag = ring::hmac::sign(self.signing_hmac(), &out.as_bytes()[start..]);
        out.push('.');
        B64.encode_string(tag.as_ref(), out);
    }

    /// The HMAC key for receipt codes (one on every waiting page): the
    /// signing key's.
    pub fn receipt_key(&self) -> &ring::hmac::Key {
        self.signing_hmac()
    }

    fn signing_hmac(&self) -> &ring::hmac::Key {
        self.hmacs.last().expect("a keyring has at least one key")
    }

    /// Every key, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &SigningKey> {
        self.keys.iter().map(|(k, _)| k)
    }

    /// A ticket's claims and the id of the key that signed it, whatever
    /// its room and however old: for checking a receipt after the fact,
    /// never for admission.
    pub fn verify_ticket_any_time(&self, token: &str) -> Option<(TicketClaims, String)> {
        let (claims, i) =
            self.decode::<TicketClaims>(token, |aud| aud.starts_with("varco:ticket:"))?;
        Some((claims, self.keys[i].0.id.clone()))
    }

    /// Verifies signature, algorithm, key id, issuer, audience and the
    /// time claims against `now_ms`. Any failure is `None`.
    pub fn verify<T: Claims + DeserializeOwned + RegisteredClaims>(
        &self,
        token: &str,
        aud: &str,
        now_ms: u64,
    ) -> Option<T> {
        self.verify_lapsed(token, aud, now_ms, 0)
    }

    /// `verify`, but a token that expired less than `grace_ms` ago still
    /// counts: for a pass that may come back after a portal failure or a
    /// login detour. Everything else is checked as strictly.
    pub fn verify_lapsed<T: Claims + DeserializeOwned + RegisteredClaims>(
        &self,
        token: &str,
        aud: &str,
        now_ms: u64,
        grace_ms: u64,
    ) -> Option<T> {
        let (c, _) = self.decode::<T>(token, |a| a == aud)?;
        if c.exp_ms() + LEEWAY_MS + grace_ms <= now_ms || c.nbf_ms() > now_ms + NBF_LEEWAY_MS {
            return None;
        }
        Some(c)
    }

    /// A token's claims and the index of the key that signed it, if the
    /// signature, the algorithm, the issuer and the audience hold (time
    /// is the caller's). `exp`, `nbf`, `aud` and `iss` are required: the
    /// claim types have no default for them.
    fn decode<T: Claims + DeserializeOwned + RegisteredClaims>(
        &self,
        token: &str,
        aud_ok: impl Fn(&str) -> bool,
    ) -> Option<(T, usize)> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let (claims, i): (T, usize) = match self.decode_own(token) {
            Own::Claims(c, i) => (c, i),
            Own::Refused => return None,
            Own::OtherHeader => self.decode_by_library(token)?,
        };
        (claims.issuer() == ISSUER && aud_ok(claims.audience())).then_some((claims, i))
    }

    /// Every token varco wrote starts with one of its own headers, byte
    /// for byte: then the key is known without parsing the header, and
    /// the signature is checked with the key schedule computed once.
    /// What this accepts, `decode_by_library` accepts too (a test holds
    /// the two to the same answers).
    fn decode_own<T: Claims + DeserializeOwned>(&self, token: &str) -> Own<T> {
        let mut parts = token.splitn(3, '.');
        let (Some(header), Some(payload), Some(signature)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Own::Refused;
        };
        let Some(i) = self.headers.iter().position(|h| h == header) else {
            return Own::OtherHeader;
        };
        // A dot left in the signature (jsonwebtoken splits from the right)
        // is not base64: refused here as there.
        let mut tag = [0u8; 64];
        let Ok(n) = B64.decode_slice(signature, &mut tag) else {
            return Own::Refused;
        };
        let message = &token[..header.len() + 1 + payload.len()];
        if ring::hmac::verify(&self.hmacs[i], message.as_bytes(), &tag[..n]).is_err() {
            return Own::Refused;
        }
        // varco's claims are a few hundred bytes: on the stack, where the
        // buffer is zeroed on every call, so no larger than that; anything
        // longer (at most MAX_TOKEN) on the heap.
        let mut stack = [0u8; 512];
        let mut heap = Vec::new();
        let buf = if payload.len() <= stack.len() / 3 * 4 {
            &mut stack[..]
        } else {
            heap.resize(payload.len() / 4 * 3 + 3, 0);
            &mut heap[..]
        };
        let Ok(n) = B64.decode_slice(payload, buf) else {
            return Own::Refused;
        };
        let json = &buf[..n];
        match T::read_json(json).or_else(|| serde_json::from_slice(json).ok()) {
            Some(c) => Own::Claims(c, i),
            None => Own::Refused,
        }
    }

    /// A token under a header varco did not write byte for byte (another
    /// field order): jsonwebtoken reads the header and checks the rest.
    fn decode_by_library<T: DeserializeOwned>(&self, token: &str) -> Option<(T, usize)> {
        let header = jsonwebtoken::decode_header(token).ok()?;
        if header.alg != Algorithm::HS256 {
            return None;
        }
        let kid = header.kid?;
        let i = self.keys.iter().position(|(k, _)| k.id == kid)?;
        let data = jsonwebtoken::decode::<T>(token, &self.keys[i].1, &validation()).ok()?;
        Some((data.claims, i))
    }
}

/// Longer than any token varco writes by far: anything longer is refused
/// unread.
const MAX_TOKEN: usize = 4096;

enum Own<T> {
    Claims(T, usize),
    Refused,
    OtherHeader,
}

/// HS256 only, issuer varco, the claims varco requires present. The
/// audience is checked by `Keyring::decode`, time by its callers against
/// varco's clock (in ms), not the library's.
fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.algorithms = vec![Algorithm::HS256];
    v.set_issuer(&[ISSUER]);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "nbf", "aud", "iss"]);
    v
}

/// What varco signs. `write_json` may write the claims' JSON itself,
/// byte for byte what `serde_json` writes (a test pins it), or decline;
/// `read_json` may read it back, to what serde_json reads (a test pins
/// that too), or decline.
pub trait Claims: Serialize + Sized {
    /// The JSON's length in `out`, or None: serde_json writes it.
    fn write_json(&self, _out: &mut [u8]) -> Option<usize> {
        None
    }

    /// The claims in `json`, or None: serde_json reads it.
    fn read_json(_json: &[u8]) -> Option<Self> {
        None
    }
}

impl Claims for PassClaims {
    /// Every request of an admitted person reads a pass. Reads exactly
    /// what serde_json writes for one without escapes; declines anything
    /// else.
    fn read_json(json: &[u8]) -> Option<Self> {
        let mut r = JsonReader { rest: json };
        let iss = r.string_at(b"{\"iss\":")?;
        let aud = r.string_at(b",\"aud\":")?;
        let sid = r.string_at(b",\"sid\":")?;
        let n = r.number_at(b",\"n\":")?;
        let at = r.number_at(b",\"at\":")?;
        let nbf = r.number_at(b",\"nbf\":")?;
        let exp = r.number_at(b",\"exp\":")?;
        let arr = r.number_at(b",\"arr\":")?;
        let f = r.optional_number_at(b",\"f\":")?;
        let re = r.optional_number_at(b",\"re\":")?;
        let fr = r.optional_number_at(b",\"fr\":")?;
        let l = r.optional_string_at(b",\"l\":")?;
        let uc = r.optional_number_at(b",\"uc\":")?;
        r.end()?;
        Some(PassClaims {
            iss,
            aud,
            sid,
            n,
            at,
            nbf,
            exp,
            arr,
            f,
            re,
            fr,
            l,
            uc,
        })
    }
}

impl Claims for TicketClaims {
    /// A ticket is signed for every new arrival on a click day, and
    /// serde_json's general path was a tenth of that arrival's cost.
    /// Declines when a string would need escaping.
    fn write_json(&self, out: &mut [u8]) -> Option<usize> {
        let mut w = JsonWriter { out, len: 0 };
        w.raw(b"{\"iss\":")?;
        w.string(&self.iss)?;
        w.raw(b",\"aud\":")?;
        w.string(&self.aud)?;
        w.raw(b",\"n\":")?;
        w.number(self.n)?;
        w.raw(b",\"pre\":")?;
        w.number(self.pre)?;
        w.raw(b",\"at\":")?;
        w.number(self.at)?;
        w.raw(b",\"nbf\":")?;
        w.number(self.nbf)?;
        w.raw(b",\"exp\":")?;
        w.number(self.exp)?;
        w.raw(b",\"u\":")?;
        w.string(&self.u)?;
        if !self.dg.is_empty() {
            w.raw(b",\"dg\":")?;
            w.string(&self.dg)?;
        }
        if !self.l.is_empty() {
            w.raw(b",\"l\":")?;
            w.string(&self.l)?;
        }
        if self.g != 0 {
            w.raw(b",\"g\":")?;
            w.number(self.g)?;
        }
        w.raw(b"}")?;
        Some(w.len)
    }

    /// Every reload and status poll of a waiting crowd reads a ticket,
    /// and serde_json's general path was nearly half of that read. Reads
    /// exactly what `write_json` writes; declines anything else.
    fn read_json(json: &[u8]) -> Option<Self> {
        let mut r = JsonReader { rest: json };
        let iss = r.string_at(b"{\"iss\":")?;
        let aud = r.string_at(b",\"aud\":")?;
        let n = r.number_at(b",\"n\":")?;
        let pre = r.number_at(b",\"pre\":")?;
        let at = r.number_at(b",\"at\":")?;
        let nbf = r.number_at(b",\"nbf\":")?;
        let exp = r.number_at(b",\"exp\":")?;
        let u = r.string_at(b",\"u\":")?;
        let dg = r.optional_string_at(b",\"dg\":")?;
        let l = r.optional_string_at(b",\"l\":")?;
        let g = r.optional_number_at(b",\"g\":")?;
        r.end()?;
        Some(TicketClaims {
            iss,
            aud,
            n,
            pre,
            at,
            nbf,
            exp,
            u,
            dg,
            l,
            g,
        })
    }
}

/// The counterpart of `JsonWriter`: compact JSON in a fixed field order,
/// strings without escapes; None at the first byte off that form.
struct JsonReader<'a> {
    rest: &'a [u8],
}

impl JsonReader<'_> {
    fn raw(&mut self, bytes: &[u8]) -> Option<()> {
        self.rest = self.rest.strip_prefix(bytes)?;
        Some(())
    }

    /// Digits without a leading zero (serde_json refuses one) that fit
    /// in a u64.
    fn number(&mut self) -> Option<u64> {
        let len = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (digits, rest) = self.rest.split_at(len);
        if digits.is_empty() || (digits[0] == b'0' && len > 1) {
            return None;
        }
        let mut v: u64 = 0;
        for &d in digits {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        self.rest = rest;
        Some(v)
    }

    fn number_at(&mut self, key: &[u8]) -> Option<u64> {
        self.raw(key)?;
        self.number()
    }

    fn string_at(&mut self, key: &[u8]) -> Option<String> {
        self.raw(key)?;
        self.string()
    }

    /// A field serde skips when it is zero: 0 if `key` is not next.
    fn optional_number_at(&mut self, key: &[u8]) -> Option<u64> {
        match self.raw(key) {
            Some(()) => self.number(),
            None => Some(0),
        }
    }

    /// A field serde skips when it is empty: "" if `key` is not next.
    fn optional_string_at(&mut self, key: &[u8]) -> Option<String> {
        match self.raw(key) {
            Some(()) => self.string(),
            None => Some(String::new()),
        }
    }

    /// The closing brace and nothing after it (whitespace is allowed by
    /// serde_json, anything else not: its call).
    fn end(mut self) -> Option<()> {
        self.raw(b"}")?;
        self.rest.is_empty().then_some(())
    }

    /// A string with nothing escaped and no control character.
    fn string(&mut self) -> Option<String> {
        let body = self.rest.strip_prefix(b"\"")?;
        let len = body
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if body[len] != b'"' {
            return None;
        }
        let s = std::str::from_utf8(&body[..len]).ok()?;
        self.rest = &body[len + 1..];
        Some(s.to_owned())
    }
}

/// Compact JSON into a fixed buffer; None when it is full or a string
/// needs escaping (serde_json then writes the whole).
struct JsonWriter<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl JsonWriter<'_> {
    fn raw(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.len.checked_add(bytes.len())?;
        self.out.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(())
    }

    fn number(&mut self, v: u64) -> Option<()> {
        self.raw(itoa::Buffer::new().format(v).as_bytes())
    }

    /// serde_json escapes `"`, `\` and control characters, nothing else.
    fn string(&mut self, s: &str) -> Option<()> {
        if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            return None;
        }
        self.raw(b"\"")?;
        self.raw(s.as_bytes())?;
        self.raw(b"\"")
    }
}

/// The registered claims varco checks: issuer, audience, and time in
/// unix milliseconds.
pub trait RegisteredClaims {
    fn issuer(&self) -> &str;
    fn audience(&self) -> &str;
    fn exp_ms(&self) -> u64;
    fn nbf_ms(&self) -> u64;
}

impl RegisteredClaims for TicketClaims {
    fn issuer(&self) -> &str {
        &self.iss
    }
    fn audience(&self) -> &str {
        &self.aud
    }
    fn exp_ms(&self) -> u64 {
        self.exp * 1000
    }
    fn nbf_ms(&self) -> u64 {
        self.nbf * 1000
    }
}

impl RegisteredClaims for PassClaims {
    fn issuer(&self) -> &str {
        &self.iss
    }
    fn audience(&self) -> &str {
        &self.aud
    }
    fn exp_ms(&self) -> u64 {
        self.exp * 1000
    }
    fn nbf_ms(&self) -> u64 {
        self.nbf * 1000
    }
}

impl TicketClaims {
    pub fn new(room: &str, n: u64, pre: u64, now_ms: u64, ttl_ms: u64, url: &str) -> Self {
        TicketClaims {
            iss: ISSUER.into(),
            aud: audience("ticket", room),
            n,
            pre,
            at: now_ms,
            nbf: now_ms / 1000,
            exp: (now_ms + ttl_ms) / 1000,
            u: url.into(),
            dg: String::new(),
            l: String::new(),
            g: 0,
        }
    }
}

impl PassClaims {
    pub fn new(room: &str, sid: u128, n: u64, now_ms: u64, valid_ms: u64) -> Self {
        PassClaims {
            iss: ISSUER.into(),
            aud: audience("pass", room),
            sid: format!("{sid:032x}"),
            n,
            at: now_ms,
            nbf: now_ms / 1000,
            exp: (now_ms + valid_ms).div_ceil(1000),
            arr: now_ms,
            f: 0,
            re: 0,
            fr: 0,
            l: String::new(),
            uc: 0,
        }
    }

    pub fn session_id(&self) -> Option<u128> {
        if self.sid.len() != 32 {
            return None;
        }
        u128::from_str_radix(&self.sid, 16).ok()
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("the OS random source works");
    b
}

pub fn random_u128() -> u128 {
    u128::from_le_bytes(random_bytes::<16>())
}

struct RingHs256(ring::hmac::Key);

impl signature::Signer<Vec<u8>> for RingHs256 {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(ring::hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl JwtSigner for RingHs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl signature::Verifier<Vec<u8>> for RingHs256 {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        // Constant-time comparison inside ring.
        ring::hmac::verify(&self.0, msg, sig).map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingHs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: |alg, key| match alg {
        Algorithm::HS256 => Ok(Box::new(RingHs256(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.try_get_hmac_secret()?,
        )))),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    },
    verifier_factory: |alg, key| match alg {
        Algorithm::HS256 => Ok(Box::new(RingHs256(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.try_get_hmac_secret()?,
        )))),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    },
    jwk_utils: JwkUtils::new_unimplemented(),
};

/// jsonwebtoken panics without a provider; this one is HS256 only.
pub fn install_provider() {
    let _ = PROVIDER.install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring2() -> Keyring {
        Keyring::new(vec![
            SigningKey {
                id: "old".into(),
                secret: vec![1; 32],
            },
            SigningKey {
                id: "new".into(),
                secret: vec![2; 32],
            },
        ])
    }

    #[test]
    fn sign_verify_round_trip_with_the_newest_key() {
        let k = ring2();
        let now = 1_800_000_000_000;
        let t = TicketClaims::new("portal", 7, 0, now, 3_600_000, "/apply");
        let token = k.sign(&t);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("new"));
        let back: TicketClaims = k
            .verify(&token, &audience("ticket", "portal"), now)
            .unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn signing_matches_jsonwebtoken_byte_for_byte() {
        // The signer skips jsonwebtoken's per-call key setup; its output
        // must stay exactly the library's, so any JWT tool reads it.
        let k = ring2();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("new".into());
        let library = |c: &TicketClaims| {
            jsonwebtoken::encode(
                &header,
                c,
                &jsonwebtoken::EncodingKey::from_secret(&[2; 32]),
            )
            .unwrap()
        };
        let ticket = |url: &str| TicketClaims::new("portal", 7, 3, 1_800_000_000_000, 60_000, url);
        // Claims that write their own JSON, claims whose quote leaves it
        // to serde_json, claims too long for the stack buffer: same bytes.
        for url in ["/apply?step=1", "/a?b=\"c\"", &"/x".repeat(600)] {
            let t = ticket(url);
            assert_eq!(k.sign(&t), library(&t), "{url}");
        }
        // With every field serde may skip.
        let mut t = ticket("/apply");
        (t.dg, t.l, t.g) = ("00000000000000ff:3".into(), "residents".into(), u64::MAX);
        assert_eq!(k.sign(&t), library(&t));
        // Appended after a cookie's name, the same token.
        let t = ticket("/apply");
        let mut cookie = String::from("varco_ticket_portal=");
        k.sign_into(&t, &mut cookie);
        assert_eq!(cookie, format!("varco_ticket_portal={}", library(&t)));
    }

    #[test]
    fn old_keys_still_verify_and_unknown_keys_do_not() {
        let old = Keyring::new(vec![SigningKey {
            id: "old".into(),
            secret: vec![1; 32],
        }]);
        let now = 1_800_000_000_000;
        let token = old.sign(&TicketClaims::new("portal", 1, 0, now, 60_000, "/"));
        let aud = audience("ticket", "portal");
        assert!(ring2().verify::<TicketClaims>(&token, &aud, now).is_some());
        let other = Keyring::new(vec![SigningKey {
            id: "x".into(),
            secret: vec![1; 32],
        }]);
        assert!(
            other.verify::<TicketClaims>(&token, &aud, now).is_none(),
            "unknown kid"
        );
    }

    /// Keys are found by comparing the header's bytes with varco's own;
    /// an HS256 header written otherwise (another field order) is still
    /// read and checked.
    #[test]
    fn a_header_in_another_form_still_verifies() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let k = ring2();
        let now = 1_800_000_000_000;
        let claims = TicketClaims::new("portal", 3, 0, now, 60_000, "/");
        let header = b64(br#"{"kid":"new","alg":"HS256"}"#);
        assert_ne!(header, k.headers[1]);
        let input = format!("{header}.{}", b64(&serde_json::to_vec(&claims).unwrap()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[2; 32]);
        let token = format!(
            "{input}.{}",
            b64(ring::hmac::sign(&key, input.as_bytes()).as_ref())
        );
        let aud = audience("ticket", "portal");
        assert_eq!(k.verify::<TicketClaims>(&token, &aud, now), Some(claims));
        // Under the wrong key's header (byte for byte "old"'s), refused.
        let as_old = token.replacen(&header, &k.headers[0], 1);
        assert!(k.verify::<TicketClaims>(&as_old, &aud, now).is_none());
    }

    #[test]
    fn wrong_room_expired_not_yet_valid_and_tampered_are_none() {
        let k = ring2();
        let now = 1_800_000_000_000;
        let token = k.sign(&TicketClaims::new("portal", 1, 0, now, 60_000, "/"));
        let aud = audience("ticket", "portal");
        assert!(k
            .verify::<TicketClaims>(&token, &audience("ticket", "login"), now)
            .is_none());
        assert!(k
            .verify::<TicketClaims>(&token, &audience("pass", "portal"), now)
            .is_none());
        assert!(k
            .verify::<TicketClaims>(&token, &aud, now + 60_000 + LEEWAY_MS)
            .is_none());
        assert!(k
            .verify::<TicketClaims>(&token, &aud, now - NBF_LEEWAY_MS - 1_000)
            .is_none());
        // Signed by a clock up to a minute ahead: another node's, or this
        // one's before it was stepped back.
        assert!(k
            .verify::<TicketClaims>(&token, &aud, now - 30_000)
            .is_some());
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let forged = TicketClaims::new("portal", 0, 0, now, 60_000, "/");
        parts[1] = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&forged).unwrap(),
        );
        assert!(k
            .verify::<TicketClaims>(&parts.join("."), &aud, now)
            .is_none());
    }

    /// `decode_own` skips jsonwebtoken for varco's own headers; on every
    /// token under such a header, signed or not, well formed or not, it
    /// must answer as jsonwebtoken does.
    #[test]
    fn the_own_header_path_answers_as_jsonwebtoken_does() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let b64 = |b: &[u8]| B64.encode(b);
        let k = ring2();
        let sign = |key: &[u8], input: &str| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
            b64(ring::hmac::sign(&key, input.as_bytes()).as_ref())
        };
        let token = |header: &str, json: &str, key: &[u8]| {
            let input = format!("{header}.{}", b64(json.as_bytes()));
            format!("{input}.{}", sign(key, &input))
        };
        let accepted = std::cell::Cell::new(0);
        let agree = |t: &str| {
            assert!(!matches!(k.decode_own::<TicketClaims>(t), Own::OtherHeader));
            let ticket = |a: &str| a == "varco:ticket:p";
            let own = k.decode::<TicketClaims>(t, ticket);
            let library = k.decode_by_library::<TicketClaims>(t);
            assert_eq!(own, library.filter(|(c, _)| ticket(&c.aud)), "ticket {t}");
            let pass = |a: &str| a == "varco:pass:p";
            let own_pass = k.decode::<PassClaims>(t, pass);
            let library = k.decode_by_library::<PassClaims>(t);
            assert_eq!(own_pass, library.filter(|(c, _)| pass(&c.aud)), "pass {t}");
            accepted.set(accepted.get() + own.is_some() as u32 + own_pass.is_some() as u32);
        };
        let now = 1_800_000_000_000;
        let ticket = serde_json::to_string(&TicketClaims::new("p", 1, 0, now, 9, "/")).unwrap();
        let pass = serde_json::to_string(&PassClaims::new("p", 7, 1, now, 9)).unwrap();
        let mut returned = PassClaims::new("p", 7, 1, now, 9);
        (returned.f, returned.re, returned.fr) = (now, 1, 2);
        let returned = serde_json::to_string(&returned).unwrap();
        let mut of_a_run = TicketClaims::new("p", 1, 0, now, 9, "/");
        (of_a_run.l, of_a_run.g) = ("l".into(), 12_345);
        let of_a_run = serde_json::to_string(&of_a_run).unwrap();
        // Long enough to be decoded on the heap.
        let long = TicketClaims::new("p", 1, 0, now, 9, &"/x".repeat(600));
        let claims = [
            ticket.clone(),
            pass.clone(),
            serde_json::to_string(&long).unwrap(),
            ticket.replace(r#""iss":"varco""#, r#""iss":"other""#),
            ticket.replace(r#""iss":"varco""#, r#""iss":["varco"]"#),
            ticket.replace(r#""aud":"varco:ticket:p""#, r#""aud":["varco:ticket:p"]"#),
            ticket.replace(r#""aud":"varco:ticket:p","#, ""),
            ticket.replace(r#""iss":"varco","#, ""),
            ticket.replace(r#","exp":"#, r#","old_exp":"#),
            ticket.replace(r#","nbf":"#, r#","nbf":null,"x":"#),
            ticket.replace(r#","exp":"#, r#","exp":1.5,"x":"#),
            ticket.replace(r#","exp":"#, r#","exp":"9","x":"#),
            ticket.replace(r#","exp":"#, r#","exp":-1,"x":"#),
            ticket.replace(r#","n":1"#, r#","n":1,"n":2"#),
            ticket.replace(r#""u":"/""#, r#""u":"/\u00e9","sub":5"#),
            of_a_run.clone(),
            of_a_run.replace(r#","g":12345"#, r#","g":012345"#),
            of_a_run.replace(r#","g":12345"#, r#","g":-1"#),
            of_a_run.replace(r#","l":"l""#, ""),
            pass.replace(r#","sid":"#, r#","sid":7,"x":"#),
            pass.replace('}', r#","uc":1}"#),
            pass.replace('}', r#","uc":1,"l":"x"}"#),
            returned.clone(),
            returned.replace(r#","fr":2"#, ""),
            "[]".into(),
            "{".into(),
            "".into(),
            "null".into(),
        ];
        for (i, header) in k.headers.iter().enumerate() {
            let key = [i as u8 + 1; 32];
            for json in &claims {
                let t = token(header, json, &key);
                agree(&t);
                // The other key, a dot more, a padded or cut signature.
                agree(&token(header, json, &[9; 32]));
                agree(&format!("{t}.x"));
                agree(&format!("{t}="));
                agree(&t[..t.len() - 1]);
                let (input, _) = t.rsplit_once('.').unwrap();
                agree(&format!("{input}."));
                agree(input);
                // Padding and trailing bits in the payload, re-signed.
                let (h, p) = input.split_once('.').unwrap();
                for p in [format!("{p}="), format!("{p}A"), format!("{p}.")] {
                    let input = format!("{h}.{p}");
                    agree(&format!("{input}.{}", sign(&key, &input)));
                }
            }
        }
        // Any byte changed anywhere in a good token, or anything at all
        // after our header, signed with our key: the same answers.
        let good = token(&k.headers[1], &ticket, &[2; 32]);
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            ..Config::default()
        });
        let strategy = (0..good.len(), any::<u8>(), ".*");
        runner
            .run(&strategy, |(at, byte, rest)| {
                let mut bytes = good.clone().into_bytes();
                bytes[at] = byte;
                if let Ok(t) = String::from_utf8(bytes) {
                    if t.starts_with(&*k.headers[1]) {
                        agree(&t);
                    }
                }
                let input = format!("{}.{rest}", k.headers[1]);
                agree(&format!("{input}.{}", sign(&[2; 32], &input)));
                agree(&format!("{}.{rest}", k.headers[1]));
                Ok(())
            })
            .unwrap();
        // Not vacuous: each key's good ticket and pass, and every intact
        // copy of the good token among the mutations, got through.
        assert!(accepted.get() >= 4, "{}", accepted.get());
    }

    /// Algorithm confusion: a token correctly signed with the room's own
    /// secret, but under another algorithm the header names (HS384,
    /// HS512), or under "none", is refused: the algorithm is pinned.
    #[test]
    fn another_algorithm_with_the_right_key_is_refused() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let k = ring2();
        let now = 1_800_000_000_000;
        let claims = PassClaims::new("portal", 42, 1, now, 600_000);
        let payload = b64(&serde_json::to_vec(&claims).unwrap());
        let aud = audience("pass", "portal");
        for (alg, hmac) in [
            ("HS384", Some(ring::hmac::HMAC_SHA384)),
            ("HS512", Some(ring::hmac::HMAC_SHA512)),
            ("none", None),
        ] {
            let header =
                b64(format!("{{\"alg\":\"{alg}\",\"kid\":\"new\",\"typ\":\"JWT\"}}").as_bytes());
            let signing_input = format!("{header}.{payload}");
            let sig = match hmac {
                Some(a) => b64(ring::hmac::sign(
                    &ring::hmac::Key::new(a, &[2; 32]),
                    signing_input.as_bytes(),
                )
                .as_ref()),
                None => String::new(),
            };
            let token = format!("{signing_input}.{sig}");
            assert!(
                k.verify::<PassClaims>(&token, &aud, now).is_none(),
                "{alg} accepted"
            );
        }
        // The same claims signed as varco signs them do verify: the
        // refusals above are about the algorithm, not the claims.
        assert_eq!(
            k.verify::<PassClaims>(&k.sign(&claims), &aud, now),
            Some(claims)
        );
    }
}
