//! Wall-clock helpers (the spool and events record unix milliseconds).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// algorithm).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01, proleptic Gregorian (the inverse of
/// [`civil_from_days`]).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-24T08:43:45Z` (RFC 3339, UTC, whole seconds).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `2026-11-24T08:43:45.123Z` (RFC 3339, UTC, milliseconds).
pub fn rfc3339_millis(unix_ms: u64) -> String {
    let whole = rfc3339(unix_ms);
    format!("{}.{:03}Z", &whole[..whole.len() - 1], unix_ms % 1000)
}

/// Parses RFC 3339 with `Z` or an offset (`+01:00`, `+0100`, `+01`), seconds
/// optional (`2026-11-24T10:00Z`), into unix milliseconds; None for anything else,
/// a time before 1970, or a year past 9999 (which would overflow the arithmetic).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    u64::try_from(parse_rfc3339_signed(text)?).ok()
}

/// [`parse_rfc3339`], times before 1970 (years 0 to 1969) included: negative.
pub fn parse_rfc3339_signed(text: &str) -> Option<i64> {
    let (date, rest) = text.trim().split_once(['T', ' '])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some()
        || !(0..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
    {
        return None;
    }
    let (clock, offset_secs) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, 0)
    } else {
        let split = rest.rfind(['+', '-'])?;
        let (clock, offset) = rest.split_at(split);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        // The sign is one ASCII byte.
        let digits = &offset[1..];
        let (oh, om) = match digits.split_once(':') {
            Some(parts) => parts,
            None if digits.len() == 4 => digits.split_at_checked(2)?,
            None => (digits, "0"),
        };
        let oh: i64 = oh.parse().ok().filter(|h| (0..24).contains(h))?;
        let om: i64 = om.parse().ok().filter(|m| (0..60).contains(m))?;
        (clock, sign * (oh * 3600 + om * 60))
    };
    let mut c = clock.split(':');
    let h: i64 = c.next()?.parse().ok()?;
    let min: i64 = c.next()?.parse().ok()?;
    let sec: f64 = c.next().unwrap_or("0").parse().ok()?;
    if c.next().is_some()
        || !(0..24).contains(&h)
        || !(0..60).contains(&min)
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    let days = days_from_civil(y, m as u32, day as u32);
    let secs = days * 86_400 + h * 3600 + min * 60 - offset_secs;
    Some(secs * 1000 + (sec * 1000.0) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses_and_out_of_range_times_are_refused_not_overflowed() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(parse_rfc3339("1970-01-01T00:01Z"), Some(60_000));
        assert_eq!(
            parse_rfc3339("2026-11-24T10:00:00+01:00"),
            parse_rfc3339("2026-11-24T09:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-11-24T10:30:00+0130"),
            parse_rfc3339("2026-11-24T09:00:00Z")
        );
        for bad in [
            "99999999999999-01-01T00:00:00Z",
            "2026-01-01T00:00:00+99999999999999:00",
            "2026-01-01T00:00:00+01:99999999999999",
            "2026-13-01T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-01-01",
            "",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-719_468, -1, 0, 1, 10_957, 20_781, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(rfc3339(1_795_509_825_000), "2026-11-24T08:43:45Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_millis(1_795_509_825_042),
            "2026-11-24T08:43:45.042Z"
        );
    }
}
