//! Parsing of the human units the config file uses: durations ("30s",
//! "5m", "250ms") and sizes ("32KiB", "1MiB", "100MB", or plain bytes).

use std::time::Duration;

/// Parses a duration as humantime does ("30s", "5m", "1h 30m", "250ms").
/// A bare number is refused: "30" could mean seconds or milliseconds, and
/// guessing wrong on a timeout is an outage.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "\"{text}\" has no unit: write e.g. \"{text}s\" or \"{text}ms\""
        ));
    }
    let d = humantime::parse_duration(text).map_err(|e| {
        format!("\"{text}\" is not a duration ({e}): write e.g. \"30s\", \"5m\" or \"250ms\"")
    })?;
    // Far past any window varco keeps, and short of the arithmetic on
    // times overflowing.
    if d > MAX_DURATION {
        return Err(format!("\"{text}\" is longer than ten years"));
    }
    Ok(d)
}

/// The longest duration any key accepts: ten of humantime's years (365.25
/// days each), so that "10y" itself is in.
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Formats a duration the way the config file accepts it.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Parses a byte size: a plain integer is bytes; suffixes B, KB, MB, GB are
/// powers of 1000 and KiB, MiB, GiB powers of 1024 (as the names say).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits.parse().map_err(|_| {
        format!("\"{text}\" is not a size: write e.g. \"32KiB\", \"1MiB\" or a number of bytes")
    })?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "\"{text}\": unknown unit \"{other}\" (use B, KB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("soon").is_err());
        // Twice this overflowed a Duration: a panic at start.
        assert!(parse_duration("18000000000000000000s")
            .unwrap_err()
            .contains("ten years"));
        assert!(parse_duration("3650d").is_ok());
        // "At most ten years", as README says, written the shortest way.
        assert_eq!(
            parse_duration("10y").unwrap(),
            Duration::from_secs(10 * 31_557_600)
        );
        assert!(parse_duration("10y 1s").unwrap_err().contains("ten years"));
        assert_eq!(format_duration(Duration::from_secs(90)), "1m 30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32KiB").unwrap(), 32 * 1024);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
