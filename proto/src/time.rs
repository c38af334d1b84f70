//! A wall-clock timestamp as nanoseconds since the Unix epoch, shown and
//! parsed as RFC 3339 in UTC. Pure: callers read the clock and pass it in.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    pub fn nanos(self) -> u64 {
        self.0
    }

    pub fn seconds_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_suffix('Z')?;
        let (date, time) = s.split_once('T')?;
        let mut d = date.splitn(3, '-');
        let y: i64 = d.next()?.parse().ok()?;
        let m: u32 = d.next()?.parse().ok()?;
        let day: u32 = d.next()?.parse().ok()?;
        let (hms, frac) = match time.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (time, None),
        };
        let mut t = hms.splitn(3, ':');
        let hh: u64 = t.next()?.parse().ok()?;
        let mm: u64 = t.next()?.parse().ok()?;
        let ss: u64 = t.next()?.parse().ok()?;
        // RFC 3339 years have four digits; this also keeps the arithmetic
        // below far from overflow.
        if !(1970..=9999).contains(&y)
            || !(1..=12).contains(&m)
            || !(1..=31).contains(&day)
            || hh > 23
            || mm > 59
            || ss > 60
        {
            return None;
        }
        let nanos_frac = match frac {
            None => 0,
            Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
                f.parse::<u64>().ok()? * 10u64.pow(9 - f.len() as u32)
            }
            Some(_) => return None,
        };
        let days = days_from_civil(y, m, day);
        if days < 0 {
            return None;
        }
        let secs = days as u64 * 86_400 + hh * 3600 + mm * 60 + ss;
        Some(Self(
            secs.checked_mul(1_000_000_000)?.checked_add(nanos_frac)?,
        ))
    }
}

// Howard Hinnant's days-from-civil and its inverse (public-domain algorithms).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1_000_000_000;
        let nanos = self.0 % 1_000_000_000;
        let (y, m, d) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
            rem / 3600,
            (rem / 60) % 60,
            rem % 60
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad timestamp {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000000Z");
        let t = Timestamp(1_795_000_000_123_456_789);
        assert_eq!(t.to_string(), "2026-11-18T11:06:40.123456789Z");
        assert_eq!(
            Timestamp::parse("2000-02-29T23:59:59Z"),
            Some(Timestamp(951_868_799_000_000_000))
        );
        assert_eq!(
            Timestamp::parse("2000-02-29T23:59:59.5Z"),
            Some(Timestamp(951_868_799_500_000_000))
        );
        assert_eq!(Timestamp::parse("garbage"), None);
        assert_eq!(Timestamp::parse("2000-13-01T00:00:00Z"), None);
        assert_eq!(Timestamp::parse("9999999999999-01-01T00:00:00Z"), None);
        assert_eq!(Timestamp::parse("-5-01-01T00:00:00Z"), None);
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(n in 0u64..4_000_000_000_000_000_000) {
            let t = Timestamp(n);
            prop_assert_eq!(Timestamp::parse(&t.to_string()), Some(t));
        }
    }
}
