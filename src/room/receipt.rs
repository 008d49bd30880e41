//! Queue receipts: what a person can keep to show when and where they
//! joined the line. A receipt names the room, the ticket number (`P17`
//! for the 17th pre-queue ticket, placed by the lottery at the opening)
//! and the arrival second, and ends in an 8-character code: an HMAC of
//! those three under the signing key, in Crockford base32 (no I, L, O,
//! U: easy to read aloud and to type).
//!
//! `portal-1234-20261124T090003Z-K7QX9M2A`
//!
//! Anyone holding the receipt can ask varco (`varco receipt verify`, or
//! the admin API) whether it is genuine; the full ticket (the cookie)
//! verifies too, since it is signed.

use std::fmt;

use super::token::{Keyring, TicketClaims};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const CODE_LEN: usize = 8;

/// Which counter a ticket's number comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A place in line (after the opening).
    Queue,
    /// A pre-queue number (before a scheduled opening).
    PreQueue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub room: String,
    pub kind: Kind,
    pub number: u64,
    /// Unix seconds.
    pub arrived: u64,
}

impl Receipt {
    /// The receipt of a ticket; None for a provisional one (handed out
    /// while the shared store was away: its number is not known yet).
    pub fn of(room: &str, t: &TicketClaims) -> Option<Receipt> {
        let (kind, number) = kind_and_number(t)?;
        Some(Receipt {
            room: room.to_string(),
            kind,
            number,
            arrived: t.at / 1000,
        })
    }

    /// `17` or `P17`.
    pub fn number_label(&self) -> String {
        let mut out = String::with_capacity(12);
        push_number_label(&mut out, self.kind, self.number);
        out
    }

    /// The code under one key's secret.
    pub fn code_with(&self, secret: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        self.code_under(&key)
    }

    /// The code under the key that signs now (its key schedule cached).
    pub fn code(&self, keys: &Keyring) -> String {
        self.code_under(keys.receipt_key())
    }

    fn code_under(&self, key: &ring::hmac::Key) -> String {
        let code = code(key, &self.room, self.kind, self.number, self.arrived);
        code.iter().map(|&b| char::from(b)).collect()
    }

    /// The whole receipt as printed on the waiting page.
    pub fn to_text(&self, keys: &Keyring) -> String {
        text(
            keys.receipt_key(),
            &self.room,
            self.kind,
            self.number,
            self.arrived,
        )
    }
}

/// The text of a ticket's receipt in `room` (what `Receipt::of` then
/// `to_text` give), written without the intermediate receipt: one is
/// printed on every waiting page served.
pub fn text_of(room: &str, t: &TicketClaims, keys: &Keyring) -> Option<String> {
    let (kind, number) = kind_and_number(t)?;
    Some(text(keys.receipt_key(), room, kind, number, t.at / 1000))
}

fn kind_and_number(t: &TicketClaims) -> Option<(Kind, u64)> {
    match (t.n, t.pre) {
        _ if !t.dg.is_empty() => None,
        (0, 0) => None,
        (0, p) => Some((Kind::PreQueue, p)),
        (n, _) => Some((Kind::Queue, n)),
    }
}

fn push_number_label(out: &mut String, kind: Kind, number: u64) {
    if kind == Kind::PreQueue {
        out.push('P');
    }
    crate::timefmt::push_number(out, number);
}

/// `room-number-time-code`.
fn text(key: &ring::hmac::Key, room: &str, kind: Kind, number: u64, arrived: u64) -> String {
    let mut out = String::with_capacity(room.len() + 48);
    out.push_str(room);
    out.push('-');
    push_number_label(&mut out, kind, number);
    out.push('-');
    crate::timefmt::push_compact(&mut out, arrived);
    out.push('-');
    let code = code(key, room, kind, number, arrived);
    out.extend(code.iter().map(|&b| char::from(b)));
    out
}

/// The HMAC of `varco-receipt/v1\n{room}\n{number label}\n{arrived}`,
/// its first 40 bits in Crockford base32. The message is fed to the HMAC
/// in pieces rather than built first.
fn code(
    key: &ring::hmac::Key,
    room: &str,
    kind: Kind,
    number: u64,
    arrived: u64,
) -> [u8; CODE_LEN] {
    let mut digits = itoa::Buffer::new();
    let mut mac = ring::hmac::Context::with_key(key);
    mac.update(b"varco-receipt/v1\n");
    mac.update(room.as_bytes());
    mac.update(b"\n");
    if kind == Kind::PreQueue {
        mac.update(b"P");
    }
    mac.update(digits.format(number).as_bytes());
    mac.update(b"\n");
    mac.update(digits.format(arrived).as_bytes());
    base32_40(mac.sign().as_ref())
}

impl fmt::Display for Receipt {
    /// Everything but the code: `portal-1234-20261124T090003Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}-{}-{}",
            self.room,
            self.number_label(),
            compact_time(self.arrived)
        )
    }
}

/// The first 40 bits in Crockford base32.
fn base32_40(bytes: &[u8]) -> [u8; CODE_LEN] {
    let mut v: u64 = 0;
    for b in &bytes[..5] {
        v = (v << 8) | *b as u64;
    }
    let mut out = [0u8; CODE_LEN];
    for (i, c) in out.iter_mut().enumerate() {
        *c = ALPHABET[((v >> ((CODE_LEN - 1 - i) * 5)) & 31) as usize];
    }
    out
}

/// Crockford's reading rules: case does not matter, O is 0, I and L are 1,
/// hyphens and spaces are ignored.
fn normalise_code(code: &str) -> String {
    code.chars()
        .filter(|c| *c != '-' && *c != ' ')
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        })
        .collect()
}

/// `20261124T090003Z`: sortable, no separators that clash with the
/// receipt's own hyphens.
fn compact_time(secs: u64) -> String {
    crate::timefmt::compact(secs)
}

fn parse_compact_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let date = time::Date::from_calendar_date(
        num(0..4)? as i32,
        time::Month::try_from(num(4..6)? as u8).ok()?,
        num(6..8)? as u8,
    )
    .ok()?;
    let t = time::Time::from_hms(num(9..11)? as u8, num(11..13)? as u8, num(13..15)? as u8).ok()?;
    let secs = date.with_time(t).assume_utc().unix_timestamp();
    u64::try_from(secs).ok()
}

/// What `verify` found genuine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub receipt: Receipt,
    /// The id of the key that vouches for it.
    pub key_id: String,
    /// "ticket" or "receipt": what was given.
    pub from: &'static str,
}

impl Verified {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "genuine": true,
            "room": self.receipt.room,
            "number": self.receipt.number_label(),
            "kind": match self.receipt.kind { Kind::Queue => "queue", Kind::PreQueue => "prequeue" },
            "arrived": crate::timefmt::rfc3339(self.receipt.arrived * 1000),
            "arrived_unix": self.receipt.arrived,
            "key_id": self.key_id,
            "checked": self.from,
        })
    }
}

/// Checks a receipt (`room-number-time-code`) or a whole ticket against
/// every key varco knows. The error says why it is not genuine.
pub fn verify(keys: &Keyring, text: &str) -> Result<Verified, String> {
    let text = text.trim();
    if text.len() > 4096 {
        return Err("too long to be a receipt or a ticket".into());
    }
    if text.starts_with("eyJ") && text.matches('.').count() == 2 {
        let (t, kid) = keys
            .verify_ticket_any_time(text)
            .ok_or("not a ticket signed by any key varco has")?;
        let room = t.aud.strip_prefix("varco:ticket:").ok_or("not a ticket")?;
        // A lane's ticket is numbered in its lane's line, as its receipt.
        let room = match t.l.as_str() {
            "" => room.to_string(),
            lane => format!("{room}#{lane}"),
        };
        let receipt =
            Receipt::of(&room, &t).ok_or("a provisional ticket: it has no number of its own")?;
        return Ok(Verified {
            receipt,
            key_id: kid,
            from: "ticket",
        });
    }
    let mut parts = text.rsplitn(4, '-');
    let (Some(code), Some(time), Some(number), Some(room)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(
            "a receipt reads room-number-time-code, e.g. portal-1234-20261124T090003Z-K7QX9M2A"
                .into(),
        );
    };
    let arrived = parse_compact_time(time).ok_or("the time is not like 20261124T090003Z")?;
    let (kind, digits) = match number.strip_prefix(['P', 'p']) {
        Some(d) => (Kind::PreQueue, d),
        None => (Kind::Queue, number),
    };
    let number: u64 = digits.parse().map_err(|_| "the number is not a number")?;
    let receipt = Receipt {
        room: room.to_string(),
        kind,
        number,
        arrived,
    };
    let code = normalise_code(code);
    for k in keys.all() {
        // Constant time: a near-miss says nothing about the right code.
        let expected = receipt.code_with(&k.secret);
        if crate::gate::constant_time_eq(expected.as_bytes(), code.as_bytes()) {
            return Ok(Verified {
                receipt,
                key_id: k.id.clone(),
                from: "receipt",
            });
        }
    }
    Err("the code does not match: this receipt was not issued by this varco (or its key has been retired)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::token::SigningKey;

    fn keys(secret: u8) -> Keyring {
        Keyring::new(vec![SigningKey {
            id: format!("k{secret}"),
            secret: vec![secret; 32],
        }])
    }

    fn ticket(n: u64, pre: u64) -> TicketClaims {
        TicketClaims::new("portal", n, pre, 1_795_534_878_338, 60_000, "/")
    }

    #[test]
    fn a_receipt_verifies_and_an_edited_one_does_not() {
        let k = keys(1);
        let r = Receipt::of("portal", &ticket(1234, 0)).unwrap();
        let text = r.to_text(&k);
        assert!(text.starts_with("portal-1234-20261124T154118Z-"), "{text}");
        assert_eq!(text.len(), "portal-1234-20261124T154118Z-".len() + 8);
        let v = verify(&k, &text).unwrap();
        assert_eq!((v.receipt.number, v.receipt.arrived), (1234, 1_795_534_878));
        // Lower case and Crockford look-alikes read the same.
        let (head, code) = text.rsplit_once('-').unwrap();
        assert!(verify(&k, &format!("{head}-{}", code.to_lowercase())).is_ok());
        for edited in [
            text.replace("-1234-", "-1233-"),
            text.replace("T154118Z", "T154117Z"),
            text.replace("portal-", "other-"),
            text.replace("-1234-", "-P1234-"),
        ] {
            assert!(verify(&k, &edited).is_err(), "{edited} verified");
        }
        assert!(verify(&keys(2), &text).is_err(), "another key verified it");
    }

    #[test]
    fn a_ticket_verifies_after_it_expired_and_gives_its_receipt() {
        let k = keys(1);
        let token = k.sign(&ticket(0, 17));
        let v = verify(&k, &token).unwrap();
        assert_eq!(v.receipt.number_label(), "P17");
        assert_eq!(v.receipt.room, "portal");
        assert_eq!(v.from, "ticket");
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        parts[2] = parts[2].chars().rev().collect();
        assert!(verify(&k, &parts.join(".")).is_err());
        assert!(verify(&keys(2), &token).is_err());
        // A lane's ticket gives its lane's receipt, not the default line's.
        let mut t = ticket(12, 0);
        t.l = "partners".into();
        let v = verify(&k, &k.sign(&t)).unwrap();
        assert_eq!(v.receipt.room, "portal#partners");
        assert_eq!(
            Some(v.receipt.to_text(&k)),
            text_of("portal#partners", &t, &k)
        );
    }

    /// The code is the HMAC of the message the receipt format defines,
    /// whichever way it is fed in: pinned against the message built whole.
    #[test]
    fn the_code_is_the_hmac_of_the_documented_message() {
        let k = keys(5);
        for (n, pre, room) in [(1234, 0, "portal"), (0, 17, "portal#priority"), (7, 0, "x")] {
            let t = ticket(n, pre);
            let r = Receipt::of(room, &t).unwrap();
            let label = if pre > 0 {
                format!("P{pre}")
            } else {
                n.to_string()
            };
            let message = format!("varco-receipt/v1\n{room}\n{label}\n{}", t.at / 1000);
            let tag = ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[5; 32]),
                message.as_bytes(),
            );
            let expected: String = base32_40(tag.as_ref()).iter().map(|&b| b as char).collect();
            assert_eq!(r.code(&k), expected);
            let text = r.to_text(&k);
            assert_eq!(text, format!("{r}-{expected}"));
            assert_eq!(text_of(room, &t, &k).as_deref(), Some(text.as_str()));
        }
        let mut provisional = ticket(0, 0);
        provisional.dg = "1:2".into();
        assert_eq!(text_of("portal", &provisional, &k), None);
    }

    #[test]
    fn the_cached_key_and_the_secret_give_the_same_code() {
        let k = keys(3);
        let r = Receipt::of("portal", &ticket(9, 0)).unwrap();
        assert_eq!(r.code(&k), r.code_with(&[3; 32]));
    }

    #[test]
    fn garbage_is_not_genuine() {
        let k = keys(1);
        for g in [
            "",
            "x",
            "a-b-c-d",
            "portal-1-2026-XXXX",
            "eyJ.eyJ.x",
            &"-".repeat(5000),
        ] {
            assert!(verify(&k, g).is_err(), "{g:?}");
        }
    }

    #[test]
    fn compact_times_round_trip() {
        for s in [0, 1_795_534_878, 4_102_444_799] {
            assert_eq!(parse_compact_time(&compact_time(s)), Some(s));
        }
    }
}
