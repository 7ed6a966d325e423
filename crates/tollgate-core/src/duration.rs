//! OpenAI's rate-limit duration format (`20ms`, `1s`, `1.5s`, `6m0s`,
//! `1h2m3s`), which is Go's `time.Duration` string trimmed to milliseconds.

use std::fmt::Write;
use std::time::Duration;

/// Formats `d` the way OpenAI's `x-ratelimit-reset-*` headers do.
///
/// Below one second it is whole milliseconds (`17ms`, rounded up so a client
/// never comes back early); from one second on, Go style with up to three
/// decimals of seconds (`1.5s`, `6m0s`, `1h2m3s`).
pub fn format_reset(d: Duration) -> String {
    let mut out = String::with_capacity(12);
    write_reset(&mut out, d);
    out
}

/// Appends [`format_reset`] of `d` to `out`, allocation-free when `out` has room.
pub fn write_reset(out: &mut String, d: Duration) {
    let ms = d.as_nanos().div_ceil(1_000_000) as u64;
    if ms < 1000 {
        let _ = write!(out, "{ms}ms");
        return;
    }
    let hours = ms / 3_600_000;
    let minutes = (ms / 60_000) % 60;
    let secs = (ms / 1000) % 60;
    let frac = ms % 1000;
    if hours > 0 {
        let _ = write!(out, "{hours}h{minutes}m");
    } else if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{secs}");
    if frac == 0 {
        // whole seconds: no fraction
    } else if frac.is_multiple_of(100) {
        let _ = write!(out, ".{}", frac / 100);
    } else if frac.is_multiple_of(10) {
        let _ = write!(out, ".{:02}", frac / 10);
    } else {
        let _ = write!(out, ".{frac:03}");
    }
    out.push('s');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_openai_examples() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(format_reset(Duration::from_millis(1234)), "1.234s");
        assert_eq!(format_reset(Duration::from_millis(1050)), "1.05s");
        assert_eq!(format_reset(Duration::from_millis(1005)), "1.005s");
    }

    #[test]
    fn rounds_up_to_the_millisecond() {
        assert_eq!(format_reset(Duration::from_micros(16_001)), "17ms");
        assert_eq!(format_reset(Duration::ZERO), "0ms");
        assert_eq!(format_reset(Duration::from_nanos(999_999_999)), "1s");
    }
}

/// Serde for `Option<Duration>` as a human string (`"30s"`, `"1m 30s"`).
pub mod opt_humantime {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes `"30s"`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    /// Reads `"30s"`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}
