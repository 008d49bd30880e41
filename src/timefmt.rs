//! Writing times for people and for JSON, fast: the waiting page shows two
//! or three on every request, and the general-purpose formatter cost more
//! than the rest of the page (BENCHMARKS.md). Unix time in, UTC out; the
//! `time` crate remains the reference (a test compares them).

/// (year, month, day) of a day counted from 1970-01-01: Howard Hinnant's
/// `civil_from_days`.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe as i64 + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn push_digits(out: &mut String, v: u64, width: usize) {
    // Most calls are the two-digit fields of a time.
    if v < 100 && width == 2 {
        out.push(char::from(b'0' + (v / 10) as u8));
        out.push(char::from(b'0' + (v % 10) as u8));
        return;
    }
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Date and time parts, or None past year 9999 (no 4-digit year).
fn parts(secs: u64) -> Option<(i64, u32, u32, u64, u64, u64)> {
    let (y, m, d) = civil((secs / 86_400) as i64);
    let s = secs % 86_400;
    (y <= 9999).then_some((y, m, d, s / 3600, s / 60 % 60, s % 60))
}

/// RFC 3339 in UTC, with milliseconds when there are any (trailing zeros
/// dropped): `2026-11-24T09:00:03Z`, `2026-11-24T09:00:03.25Z`.
pub fn rfc3339(ms: u64) -> String {
    let mut out = String::with_capacity(24);
    push_rfc3339(&mut out, ms);
    out
}

/// `rfc3339`, appended: the waiting page writes its times into the page
/// itself rather than into strings of their own. Nothing past year 9999.
pub fn push_rfc3339(out: &mut String, ms: u64) {
    let Some((y, mo, d, h, mi, s)) = parts(ms / 1000) else {
        return;
    };
    push_date(out, y, mo, d);
    out.push('T');
    push_clock(out, h, mi, s);
    let mut frac = ms % 1000;
    if frac > 0 {
        let mut width = 3;
        while frac.is_multiple_of(10) {
            frac /= 10;
            width -= 1;
        }
        out.push('.');
        push_digits(out, frac, width);
    }
    out.push('Z');
}

/// An opening for people: `ms` in the zone of `offset_s` (the offset the
/// operator wrote in `opens_at`) as its day (year, month 1-12, day), its
/// time (`09:00`) and the zone (`UTC+01:00`, or `UTC`), so a page need
/// not leave a citizen to convert from UTC. None past year 9999.
pub fn opening(ms: u64, offset_s: i32) -> Option<((i64, u32, u32), String, String)> {
    let local = (ms / 1000).saturating_add_signed(i64::from(offset_s));
    let (y, mo, d, h, mi, _) = parts(local)?;
    let mut time = String::with_capacity(5);
    push_digits(&mut time, h, 2);
    time.push(':');
    push_digits(&mut time, mi, 2);
    let mut zone = String::from("UTC");
    if offset_s != 0 {
        let a = offset_s.unsigned_abs() / 60;
        zone.push(if offset_s < 0 { '-' } else { '+' });
        push_digits(&mut zone, u64::from(a / 60), 2);
        zone.push(':');
        push_digits(&mut zone, u64::from(a % 60), 2);
    }
    Some(((y, mo, d), time, zone))
}

/// `YYYY-MM-DD`, appended.
fn push_date(out: &mut String, y: i64, mo: u32, d: u32) {
    push_digits(out, y as u64, 4);
    out.push('-');
    push_digits(out, u64::from(mo), 2);
    out.push('-');
    push_digits(out, u64::from(d), 2);
}

/// The day of `ms`, `YYYY-MM-DD` (UTC), appended. Nothing past year 9999.
pub fn push_day(out: &mut String, ms: u64) {
    if let Some((y, mo, d, ..)) = parts(ms / 1000) {
        push_date(out, y, mo, d);
    }
}

/// The time of day of `ms`, `HH:MM:SS` (UTC), appended.
pub fn push_time_of_day(out: &mut String, ms: u64) {
    let s = ms / 1000 % 86_400;
    push_clock(out, s / 3600, s / 60 % 60, s % 60);
}

fn push_clock(out: &mut String, h: u64, mi: u64, s: u64) {
    push_digits(out, h, 2);
    out.push(':');
    push_digits(out, mi, 2);
    out.push(':');
    push_digits(out, s, 2);
}

/// ISO 8601 basic, to the second: `20261124T090003Z`.
pub fn compact(secs: u64) -> String {
    let mut out = String::with_capacity(16);
    push_compact(&mut out, secs);
    out
}

/// `compact`, appended.
pub fn push_compact(out: &mut String, secs: u64) {
    let Some((y, mo, d, h, mi, s)) = parts(secs) else {
        return;
    };
    push_digits(out, y as u64, 4);
    push_digits(out, mo as u64, 2);
    push_digits(out, d as u64, 2);
    out.push('T');
    push_digits(out, h, 2);
    push_digits(out, mi, 2);
    push_digits(out, s, 2);
    out.push('Z');
}

/// Decimal digits of `v`, appended.
pub fn push_number(out: &mut String, v: u64) {
    push_digits(out, v, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(ms: u64) -> String {
        time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    }

    #[test]
    fn the_same_as_the_time_crate() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut samples = vec![
            0,
            1,
            999,
            1000,
            951_782_400_000,
            1_795_534_878_338,
            4_102_444_799_999,
        ];
        for _ in 0..20_000 {
            // xorshift: spread over 1970..2100, with every millisecond kind.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x % 4_102_444_800_000);
        }
        for ms in samples {
            assert_eq!(rfc3339(ms), reference(ms), "{ms}");
            let r = reference(ms / 1000 * 1000);
            let expected: String = r.chars().filter(|c| *c != '-' && *c != ':').collect();
            assert_eq!(compact(ms / 1000), expected, "{ms}");
            let mut clock = String::new();
            push_time_of_day(&mut clock, ms);
            assert_eq!(clock, r[11..19], "{ms}");
        }
    }

    #[test]
    fn numbers() {
        for v in [0, 7, 10, 42, 99, 100, 1234, u64::MAX] {
            let mut s = String::new();
            push_number(&mut s, v);
            assert_eq!(s, v.to_string());
        }
    }
}
