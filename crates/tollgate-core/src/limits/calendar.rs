//! Calendar windows: counters keyed by the UTC day, reset at midnight.

use std::time::Duration;

/// Nanoseconds in a UTC day (leap seconds do not exist in Unix time).
pub const DAY_NS: u64 = 86_400 * 1_000_000_000;

/// The UTC day of `now_ns`, in days since 1970-01-01.
pub fn utc_day(now_ns: u64) -> u64 {
    now_ns / DAY_NS
}

/// Time from `now_ns` to the next UTC midnight.
pub fn until_midnight(now_ns: u64) -> Duration {
    Duration::from_nanos((utc_day(now_ns) + 1) * DAY_NS - now_ns)
}

/// What `used` means today: a counter from a past day counts as zero.
pub fn used_today(day: u64, used: u64, now_ns: u64) -> u64 {
    if day == utc_day(now_ns) { used } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn midnight_is_the_next_day_boundary() {
        let noon = 20_000 * DAY_NS + DAY_NS / 2;
        assert_eq!(until_midnight(noon), Duration::from_secs(12 * 3600));
        assert_eq!(until_midnight(20_001 * DAY_NS), Duration::from_secs(86_400));
        assert_eq!(until_midnight(20_001 * DAY_NS - 1), Duration::from_nanos(1));
    }

    #[test]
    fn yesterdays_counter_is_empty_today() {
        assert_eq!(used_today(5, 100, 5 * DAY_NS + 1), 100);
        assert_eq!(used_today(4, 100, 5 * DAY_NS + 1), 0);
    }
}
