//! The times of Kafka messages as text: RFC 3339 in UTC, exactly as chrono's `Serialize`
//! writes them (`2026-12-07T03:54:39.006089Z`, the fraction in 0, 3, 6 or 9 digits), written
//! into a stack buffer. chrono goes through `fmt` a character at a time, which was 5% of the
//! collector's CPU at four times an event (docs/benchmarks.md).

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Serialize, Serializer};

/// `#[serde(serialize_with)]` of a time.
pub(super) fn write<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0; LONGEST];
    match format(t, &mut buf) {
        Some(text) => s.serialize_str(text),
        // Years outside 0-9999 take a sign and more digits: chrono's own path, never taken
        // by the times the collector accepts.
        None => t.serialize(s),
    }
}

/// `#[serde(serialize_with)]` of an optional time.
pub(super) fn write_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    struct Time<'a>(&'a DateTime<Utc>);
    impl Serialize for Time<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            write(self.0, s)
        }
    }
    match t {
        Some(t) => s.serialize_some(&Time(t)),
        None => s.serialize_none(),
    }
}

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
const LONGEST: usize = 30;

/// The text of `t` in `buf`, or `None` when its year is outside 0-9999.
fn format<'b>(t: &DateTime<Utc>, buf: &'b mut [u8; LONGEST]) -> Option<&'b str> {
    // The UTC fields read off the naive time: each read through `DateTime<Utc>` adds the zero
    // offset again (chrono's `naive_local`), six times a time.
    let t = t.naive_utc();
    let year = u32::try_from(t.year()).ok().filter(|y| *y <= 9999)?;
    let mut nanos = t.nanosecond();
    let mut second = t.second();
    // chrono keeps a leap second as a second's worth of extra nanoseconds: written as :60.
    if nanos >= 1_000_000_000 {
        second += 1;
        nanos -= 1_000_000_000;
    }
    let mut at = 0;
    let mut put = |digits: usize, value: u32, sep: Option<u8>| {
        let mut v = value;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        at += digits;
        if let Some(sep) = sep {
            buf[at] = sep;
            at += 1;
        }
    };
    put(4, year, Some(b'-'));
    put(2, t.month(), Some(b'-'));
    put(2, t.day(), Some(b'T'));
    put(2, t.hour(), Some(b':'));
    put(2, t.minute(), Some(b':'));
    match nanos {
        0 => put(2, second, None),
        n if n % 1_000_000 == 0 => {
            put(2, second, Some(b'.'));
            put(3, n / 1_000_000, None);
        }
        n if n % 1_000 == 0 => {
            put(2, second, Some(b'.'));
            put(6, n / 1_000, None);
        }
        n => {
            put(2, second, Some(b'.'));
            put(9, n, None);
        }
    }
    buf[at] = b'Z';
    // Only ASCII digits and separators were written.
    std::str::from_utf8(&buf[..=at]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, TimeZone};

    #[test]
    fn writes_what_chrono_writes() {
        let day = |y, mo, d| NaiveDate::from_ymd_opt(y, mo, d).unwrap();
        let mut times = Vec::new();
        for date in [
            day(2026, 12, 7),
            day(0, 1, 1),
            day(9999, 12, 31),
            day(1970, 1, 1),
        ] {
            for (h, mi, s) in [(0, 0, 0), (3, 54, 39), (23, 59, 59)] {
                for nanos in [
                    0,
                    1,
                    6_000_000,
                    6_089_000,
                    6_089_123,
                    999_999_999,
                    100_000_000,
                    1_000_000_000, // a leap second
                    1_500_000_000,
                ] {
                    let Some(t) = date.and_hms_nano_opt(h, mi, s, nanos) else {
                        continue;
                    };
                    times.push(Utc.from_utc_datetime(&t));
                }
            }
        }
        for y in [-1, 10_000, -262_000] {
            times.push(Utc.from_utc_datetime(&day(y, 6, 1).and_hms_opt(1, 2, 3).unwrap()));
        }
        times.push(Utc::now());
        for t in times {
            let ours = serde_json::to_string(&Wrapped(t)).unwrap();
            assert_eq!(ours, serde_json::to_string(&t).unwrap(), "{t:?}");
        }
        #[derive(Serialize)]
        struct Opt(#[serde(serialize_with = "write_opt")] Option<DateTime<Utc>>);
        assert_eq!(serde_json::to_string(&Opt(None)).unwrap(), "null");
        let t = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(
            serde_json::to_string(&Opt(Some(t))).unwrap(),
            r#""2026-01-02T03:04:05Z""#
        );
    }

    #[derive(Serialize)]
    struct Wrapped(#[serde(serialize_with = "write")] DateTime<Utc>);
}
