//! Budget windows on UTC calendar boundaries: day, ISO week (from Monday),
//! month, or the whole lifetime.

use crate::limits::calendar::DAY_NS;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The period a budget's spend is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// From UTC midnight to the next.
    Day,
    /// From Monday 00:00 UTC to the next Monday.
    Week,
    /// From the first of the month 00:00 UTC to the first of the next.
    Month,
    /// Never resets.
    Lifetime,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 4] = [Window::Day, Window::Week, Window::Month, Window::Lifetime];

    /// Its name in config, CLI and error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Day => "day",
            Window::Week => "week",
            Window::Month => "month",
            Window::Lifetime => "lifetime",
        }
    }

    /// When the window holding `now_ns` began (ns since the Unix epoch).
    pub fn start(self, now_ns: u64) -> u64 {
        let day = (now_ns / DAY_NS) as i64;
        let start_day = match self {
            Window::Day => day,
            // 1970-01-01 was a Thursday: Monday is 3 days before it.
            Window::Week => day - (day + 3).rem_euclid(7),
            Window::Month => {
                let (y, m, _) = civil_from_days(day);
                days_from_civil(y, m, 1)
            }
            Window::Lifetime => return 0,
        };
        start_day.max(0) as u64 * DAY_NS
    }

    /// When the window holding `now_ns` ends; `None` for a lifetime.
    pub fn end(self, now_ns: u64) -> Option<u64> {
        let start_day = (self.start(now_ns) / DAY_NS) as i64;
        let end_day = match self {
            Window::Day => start_day + 1,
            Window::Week => start_day + 7,
            Window::Month => {
                let (y, m, _) = civil_from_days(start_day);
                let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(y, m, 1)
            }
            Window::Lifetime => return None,
        };
        Some(end_day as u64 * DAY_NS)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "day" | "daily" => Ok(Window::Day),
            "week" | "weekly" => Ok(Window::Week),
            "month" | "monthly" => Ok(Window::Month),
            "lifetime" | "total" => Ok(Window::Lifetime),
            other => Err(format!(
                "`{other}` is not a budget window (day, week, month or lifetime)"
            )),
        }
    }
}

/// `2026-11-24T00:00:00Z`: a UTC instant (ns since the epoch), to the second.
pub fn format_utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Reads `2026-11-24` as that day's UTC midnight (ns since the epoch).
pub fn parse_utc_date(text: &str) -> Option<u64> {
    let mut parts = text.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || !(1970..=9999).contains(&y) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // 2026-02-31 would silently become March 3rd: refuse it.
    (civil_from_days(days) == (y, m, d)).then_some(days as u64 * DAY_NS)
}

// Howard Hinnant's civil-calendar algorithms (proleptic Gregorian): a dozen
// lines of integer arithmetic, where a date crate would add a dependency
// for two functions.

/// Days since 1970-01-01 of year `y`, month `m` (1-12), day `d`.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of `days` since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i64, m: u32, d: u32, hour: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * DAY_NS + hour * 3_600_000_000_000
    }

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for day in [0, 59, 365, 11_016, 19_000, 20_000, 20_454, 40_000] {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
    }

    #[test]
    fn windows_start_and_end_on_utc_boundaries() {
        // 2026-11-23 is a Monday.
        let mon = at(2026, 11, 23, 15);
        assert_eq!(Window::Day.start(mon), at(2026, 11, 23, 0));
        assert_eq!(Window::Day.end(mon), Some(at(2026, 11, 24, 0)));
        assert_eq!(Window::Week.start(mon), at(2026, 11, 23, 0));
        let sun = at(2026, 11, 29, 23);
        assert_eq!(Window::Week.start(sun), at(2026, 11, 23, 0));
        assert_eq!(Window::Week.end(sun), Some(at(2026, 11, 30, 0)));
        assert_eq!(Window::Month.start(mon), at(2026, 11, 1, 0));
        assert_eq!(Window::Month.end(mon), Some(at(2026, 12, 1, 0)));
        let dec = at(2026, 12, 31, 23);
        assert_eq!(Window::Month.end(dec), Some(at(2027, 1, 1, 0)));
        let leap = at(2028, 2, 10, 0);
        assert_eq!(Window::Month.end(leap), Some(at(2028, 3, 1, 0)));
        assert_eq!(Window::Lifetime.start(mon), 0);
        assert_eq!(Window::Lifetime.end(mon), None);
    }

    #[test]
    fn formats_utc() {
        assert_eq!(format_utc(at(2026, 11, 24, 0)), "2026-11-24T00:00:00Z");
        assert_eq!(
            format_utc(at(2000, 2, 29, 13) + 61_000_000_000),
            "2000-02-29T13:01:01Z"
        );
    }

    #[test]
    fn parses_dates() {
        assert_eq!(parse_utc_date("2026-11-24"), Some(at(2026, 11, 24, 0)));
        assert_eq!(parse_utc_date("2026-02-31"), None);
        assert_eq!(parse_utc_date("yesterday"), None);
    }

    #[test]
    fn names_parse() {
        assert_eq!("daily".parse(), Ok(Window::Day));
        assert_eq!("Month".parse(), Ok(Window::Month));
        assert!("fortnight".parse::<Window>().is_err());
    }
}
