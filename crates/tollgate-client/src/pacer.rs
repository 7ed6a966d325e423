//! Staying under a server's limits on purpose: a local GCRA for requests and
//! one for tokens. Each request reserves the moment it fits (possibly in the
//! future) and sleeps until then, so a paced client never hears a 429 from a
//! server whose limits it knows. The server's `x-ratelimit-*` headers
//! correct the local view, only ever towards caution.

use http::HeaderMap;
use std::time::Duration;
use tollgate_core::limits::Gcra;

const MINUTE: Duration = Duration::from_secs(60);

/// One rolling limit as the client sees it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    gcra: Gcra,
    tat: u64,
}

impl Bucket {
    fn new(per_minute: u64) -> Self {
        Self {
            gcra: Gcra::new(per_minute, MINUTE),
            tat: 0,
        }
    }

    /// The earliest moment (ns) at or after `now` at which `cost` fits.
    fn fits_at(&self, cost: u64, now: u64) -> u64 {
        let cost = cost.min(self.gcra.capacity());
        let need = self.tat.max(now) + cost * self.gcra.interval_ns();
        let tau = self.gcra.capacity() * self.gcra.interval_ns();
        need.saturating_sub(tau).max(now)
    }

    fn charge(&mut self, cost: u64, at: u64) {
        let cost = cost.min(self.gcra.capacity());
        self.tat = self.tat.max(at) + cost * self.gcra.interval_ns();
    }

    fn shift(&mut self, delta: i64) {
        let by = delta.unsigned_abs() * self.gcra.interval_ns();
        self.tat = if delta > 0 {
            self.tat.saturating_add(by)
        } else {
            self.tat.saturating_sub(by)
        };
    }

    /// The server says `remaining` units are left and the bucket is full in
    /// `reset`: believe whichever of the two views is emptier.
    fn observe(&mut self, remaining: Option<u64>, reset: Option<Duration>, now: u64) {
        let t = self.gcra.interval_ns();
        if let Some(r) = remaining {
            let depth = self.gcra.capacity().saturating_sub(r) * t;
            self.tat = self.tat.max(now + depth);
        }
        if let Some(d) = reset {
            self.tat = self.tat.max(now + d.as_nanos() as u64);
        }
    }
}

/// Local pacing for one API key.
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// OpenAI's reset format (`20ms`, `1.5s`, `6m0s`, `1h2m3s`).
pub fn parse_reset(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        total += value
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                "us" | "µs" => 0.000_001,
                "ns" => 0.000_000_001,
                _ => return None,
            };
        rest = tail;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total))
}

impl Pacer {
    /// Pacing under `rpm` requests and `tpm` tokens per minute (either optional).
    pub fn new(rpm: Option<u64>, tpm: Option<u64>) -> Self {
        Self {
            requests: rpm.filter(|r| *r > 0).map(Bucket::new),
            tokens: tpm.filter(|t| *t > 0).map(Bucket::new),
        }
    }

    /// The earliest moment (ns) at or after `now` at which a request of
    /// `tokens` fits every bucket.
    fn fits_at(&self, tokens: u64, now: u64) -> u64 {
        [
            self.requests.map(|b| b.fits_at(1, now)),
            self.tokens.map(|b| b.fits_at(tokens, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(now)
    }

    /// Takes a slot for a request of `tokens` estimated tokens if it fits at
    /// `now` (ns); otherwise charges nothing and says how long until it
    /// would. Charging at the moment of sending (not ahead) lets what the
    /// server reports meanwhile push later requests back.
    pub fn try_take(&mut self, tokens: u64, now: u64) -> Result<(), Duration> {
        let at = self.fits_at(tokens, now);
        if at > now {
            return Err(Duration::from_nanos(at - now));
        }
        self.reserve(tokens, now);
        Ok(())
    }

    /// Reserves a request of `tokens` estimated tokens: returns how long to
    /// wait from `now` (ns) before sending it. The reservation is made now,
    /// so concurrent callers queue up behind each other.
    pub fn reserve(&mut self, tokens: u64, now: u64) -> Duration {
        let at = self.fits_at(tokens, now);
        if let Some(b) = &mut self.requests {
            b.charge(1, at);
        }
        if let Some(b) = &mut self.tokens {
            b.charge(tokens, at);
        }
        Duration::from_nanos(at - now)
    }

    /// Corrects the token reservation once the real usage is known.
    pub fn settle(&mut self, estimated: u64, actual: u64) {
        if let Some(b) = &mut self.tokens {
            b.shift(actual as i64 - estimated as i64);
        }
    }

    /// Reads the server's `x-ratelimit-*` headers at `now`.
    pub fn observe(&mut self, headers: &HeaderMap, now: u64) {
        let reset = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_reset)
        };
        if let Some(b) = &mut self.requests {
            b.observe(
                header_u64(headers, "x-ratelimit-remaining-requests"),
                reset("x-ratelimit-reset-requests"),
                now,
            );
        }
        if let Some(b) = &mut self.tokens {
            b.observe(
                header_u64(headers, "x-ratelimit-remaining-tokens"),
                reset("x-ratelimit-reset-tokens"),
                now,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn reads_openai_reset_durations() {
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset(""), None);
    }

    #[test]
    fn a_burst_spreads_out_at_the_rate_after_the_first_window() {
        let mut p = Pacer::new(Some(60), None);
        let now = 100 * S;
        let waits: Vec<_> = (0..62).map(|_| p.reserve(0, now)).collect();
        assert!(waits[..60].iter().all(|w| w.is_zero()));
        assert_eq!(waits[60], Duration::from_secs(1));
        assert_eq!(waits[61], Duration::from_secs(2));
    }

    #[test]
    fn try_take_charges_only_what_fits_now() {
        let mut p = Pacer::new(Some(60), None);
        let now = 100 * S;
        for _ in 0..60 {
            assert_eq!(p.try_take(0, now), Ok(()));
        }
        assert_eq!(p.try_take(0, now), Err(Duration::from_secs(1)));
        assert_eq!(
            p.try_take(0, now),
            Err(Duration::from_secs(1)),
            "nothing was charged"
        );
        assert_eq!(p.try_take(0, now + S), Ok(()));
    }

    #[test]
    fn tokens_pace_and_settle() {
        let mut p = Pacer::new(None, Some(600));
        let now = 100 * S;
        assert!(p.reserve(600, now).is_zero());
        // 100 more tokens refill in 10 s.
        assert_eq!(p.reserve(100, now), Duration::from_secs(10));
        // The first used only 300: the second could have gone 30 s earlier.
        p.settle(600, 300);
        assert!(p.reserve(200, now).is_zero());
    }

    #[test]
    fn server_headers_only_ever_slow_it_down() {
        let mut p = Pacer::new(Some(60), None);
        let now = 100 * S;
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            "0".parse().expect("value"),
        );
        h.insert("x-ratelimit-reset-requests", "1s".parse().expect("value"));
        p.observe(&h, now);
        // Someone else used the key: the next request waits a slot.
        assert_eq!(p.reserve(0, now), Duration::from_secs(1));
        // A roomier report does not undo what is known.
        h.insert(
            "x-ratelimit-remaining-requests",
            "60".parse().expect("value"),
        );
        h.insert("x-ratelimit-reset-requests", "0ms".parse().expect("value"));
        p.observe(&h, now);
        assert_eq!(p.reserve(0, now), Duration::from_secs(2));
    }
}
