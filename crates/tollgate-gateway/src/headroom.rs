//! A deployment's provider limits, mirrored on the gateway's side, so that
//! traffic is paced below them instead of discovering them through 429s.
//!
//! The mirror is a [`SubjectState`] charged with the same [`admit`] that
//! decides client limits, with the deployment as the subject: requests and
//! estimated tokens (prompt + `max_tokens`, what OpenAI itself charges up
//! front). Its amounts are declared in the config (`rpm`, `tpm`) or learned
//! from the provider's `x-ratelimit-limit-*` headers. Every answer's
//! `x-ratelimit-remaining-*` pulls the mirror down to what the provider
//! reports minus the gateway's own calls still in flight (which the provider
//! has not counted yet when it answers another), never up: a report can be
//! stale, and other clients of the same provider key only ever use more.

use crate::header_names as names;
use http::{HeaderMap, HeaderName};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tollgate_core::limits::{
    Check, Cost, Dimension, Gcra, LimitSet, RefusalKind, SubjectState, admit,
};

const MINUTE: Duration = Duration::from_secs(60);

/// How much sooner than the gateway a call may be counted by the provider:
/// the provider charges a call when it arrives, later than the gateway
/// reserved it, so an earlier call that is still on its way can land after
/// a later one. A call is sent only if it would have fitted this long ago,
/// which costs 50 ms of refill (under 0.1 % of a per-minute limit).
pub const ARRIVAL_ALLOWANCE: Duration = Duration::from_millis(50);

/// One deployment's provider limits and what the gateway has sent against them.
#[derive(Debug, Default)]
pub struct Headroom {
    /// Limits from the config; learned ones never replace these.
    declared: LimitSet,
    mirror: Mutex<Mirror>,
    /// Requests sent whose answers have not arrived.
    in_flight_requests: AtomicU64,
    /// Their estimated tokens.
    in_flight_tokens: AtomicU64,
    /// Whether a token limit is known: requests then need an estimate.
    counts_tokens: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Mirror {
    limits: LimitSet,
    state: SubjectState,
}

/// Whether a request fits a deployment now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// It fits, leaving this share of the tightest limit (0–1000 ‰); a
    /// deployment with no known limits leaves 1000.
    Leaves(u32),
    /// It fits after this wait, if nothing else is sent meanwhile.
    After(Duration),
    /// It is larger than the provider's whole per-minute token limit.
    Never {
        /// That limit.
        limit: u64,
    },
}

/// A request's charge on a deployment, in flight until its answer arrives
/// (or the call is dropped: a client that hangs up releases it too).
#[derive(Debug)]
pub struct Reservation<'a> {
    headroom: &'a Headroom,
    tokens: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.headroom
            .in_flight_requests
            .fetch_sub(1, Ordering::Relaxed);
        self.headroom
            .in_flight_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

impl Headroom {
    /// A mirror of `declared` (rpm and tpm; daily amounts are ignored).
    pub fn new(declared: LimitSet) -> Self {
        let declared = LimitSet {
            rpm: declared.rpm,
            tpm: declared.tpm,
            rpd: None,
            tpd: None,
        };
        Self {
            declared,
            mirror: Mutex::new(Mirror {
                limits: declared,
                state: SubjectState::default(),
            }),
            counts_tokens: AtomicBool::new(declared.tpm.is_some()),
            ..Self::default()
        }
    }

    fn mirror(&self) -> std::sync::MutexGuard<'_, Mirror> {
        // The guarded data is two plain structs, always consistent.
        self.mirror.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a token limit is known (declared or learned).
    pub fn counts_tokens(&self) -> bool {
        self.counts_tokens.load(Ordering::Relaxed)
    }

    /// The limits known now (declared or learned).
    pub fn limits(&self) -> LimitSet {
        self.mirror().limits
    }

    /// Whether charging `cost` now would fit, without charging: it must
    /// have fitted [`ARRIVAL_ALLOWANCE`] ago already.
    pub fn fit(&self, cost: Cost, now: u64) -> Fit {
        let mut check = {
            let m = self.mirror();
            if m.limits.is_empty() {
                return Fit::Leaves(1000);
            }
            Check::new(m.limits, m.state)
        };
        let earlier = now.saturating_sub(ARRIVAL_ALLOWANCE.as_nanos() as u64);
        fit_of(std::slice::from_mut(&mut check), cost, earlier)
    }

    /// Charges `cost` (at `now`) if it fits by [`Headroom::fit`]; otherwise
    /// says when it would.
    pub fn reserve(&self, cost: Cost, now: u64) -> Result<Reservation<'_>, Fit> {
        {
            let mut m = self.mirror();
            if !m.limits.is_empty() {
                let earlier = now.saturating_sub(ARRIVAL_ALLOWANCE.as_nanos() as u64);
                let mut check = Check::new(m.limits, m.state);
                match fit_of(std::slice::from_mut(&mut check), cost, earlier) {
                    // What fitted earlier fits now: charge it at now.
                    Fit::Leaves(_) => {
                        let mut check = Check::new(m.limits, m.state);
                        fit_of(std::slice::from_mut(&mut check), cost, now);
                        m.state = check.state;
                    }
                    refused => return Err(refused),
                }
            }
        }
        self.in_flight_requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens
            .fetch_add(cost.tokens, Ordering::Relaxed);
        Ok(Reservation {
            headroom: self,
            tokens: cost.tokens,
        })
    }

    /// Reads an answer's `x-ratelimit-*` headers: the call is no longer in
    /// flight, limits not declared are learned, and the mirror is pulled
    /// down to the provider's remaining minus the calls still in flight.
    pub fn observe(&self, headers: &HeaderMap, now: u64, reservation: Reservation<'_>) {
        drop(reservation);
        let read = |name: &HeaderName| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
        };
        let [limit, remaining, _] = &names::RATELIMIT_REQUESTS;
        let requests = (read(limit), read(remaining));
        let [limit, remaining, _] = &names::RATELIMIT_TOKENS;
        let tokens = (read(limit), read(remaining));
        if requests == (None, None) && tokens == (None, None) {
            return;
        }
        let in_flight = [
            self.in_flight_requests.load(Ordering::Relaxed),
            self.in_flight_tokens.load(Ordering::Relaxed),
        ];
        let mut m = self.mirror();
        for (slot, (limit, remaining), declared) in [
            (0, requests, self.declared.rpm),
            (1, tokens, self.declared.tpm),
        ] {
            let amount = match (declared, limit) {
                (Some(d), _) => d,
                (None, Some(l)) if l > 0 => {
                    let learned = if slot == 0 {
                        &mut m.limits.rpm
                    } else {
                        &mut m.limits.tpm
                    };
                    if slot == 1 {
                        self.counts_tokens.store(true, Ordering::Relaxed);
                    }
                    if *learned != Some(l) {
                        let what = if slot == 0 { "requests" } else { "tokens" };
                        tracing::info!(what, limit = l, "learned a provider limit per minute");
                        *learned = Some(l);
                    }
                    l
                }
                _ => continue,
            };
            let Some(remaining) = remaining else { continue };
            let left = remaining.saturating_sub(in_flight[slot]).min(amount);
            let gcra = Gcra::new(amount, MINUTE);
            let tat = now.saturating_add((amount - left).saturating_mul(gcra.interval_ns()));
            let current = m.state.tat_for(slot, amount, now);
            m.state.tat[slot] = current.max(tat);
            m.state.rate[slot] = amount;
        }
    }

    /// The share (0–1) of each known limit left now: `("requests", …)`,
    /// `("tokens", …)`.
    pub fn shares(&self, now: u64) -> impl Iterator<Item = (&'static str, f64)> {
        let m = *self.mirror();
        [("requests", 0, m.limits.rpm), ("tokens", 1, m.limits.tpm)]
            .into_iter()
            .filter_map(move |(name, slot, amount)| {
                let amount = amount.filter(|a| *a > 0)?;
                let tat = m.state.tat_for(slot, amount, now);
                let left = Gcra::new(amount, MINUTE).remaining(tat, now);
                Some((name, left as f64 / amount as f64))
            })
    }

    /// What `/admin/deployments` shows.
    pub fn view(&self, now: u64) -> serde_json::Value {
        let m = *self.mirror();
        let standing = |dimension: Dimension, amount: Option<u64>| {
            amount.map(|a| {
                let slot = dimension as usize;
                let tat = m.state.tat_for(slot, a, now);
                serde_json::json!({
                    "limit": a,
                    "remaining": Gcra::new(a, MINUTE).remaining(tat, now),
                })
            })
        };
        serde_json::json!({
            "requests": standing(Dimension::Requests, m.limits.rpm),
            "tokens": standing(Dimension::Tokens, m.limits.tpm),
            "learned": m.limits != self.declared,
            "in_flight": self.in_flight_requests.load(Ordering::Relaxed),
        })
    }
}

fn fit_of(checks: &mut [Check], cost: Cost, now: u64) -> Fit {
    match admit(checks, cost, now) {
        Ok(grant) => {
            let share = [grant.requests, grant.tokens]
                .into_iter()
                .flatten()
                .map(|r| (r.remaining.min(r.limit) * 1000 / r.limit.max(1)) as u32)
                .min()
                .unwrap_or(1000);
            Fit::Leaves(share)
        }
        Err(r) => match r.why {
            RefusalKind::NeverFits => Fit::Never { limit: r.limit },
            RefusalKind::Wait(d) | RefusalKind::DailyCap(d) => Fit::After(d),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const S: u64 = 1_000_000_000;

    fn cost(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            tokens,
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("ascii"));
        }
        h
    }

    #[test]
    fn unknown_limits_never_pace() {
        let h = Headroom::default();
        assert_eq!(h.fit(cost(1_000_000), 0), Fit::Leaves(1000));
        assert!(h.reserve(cost(1_000_000), 0).is_ok());
    }

    #[test]
    fn declared_tpm_paces_at_the_limit() {
        let h = Headroom::new(LimitSet {
            tpm: Some(600),
            ..LimitSet::default()
        });
        let now = 100 * S;
        let allowance = ARRIVAL_ALLOWANCE.as_nanos() as u64;
        for _ in 0..5 {
            drop(h.reserve(cost(100), now).expect("fits"));
        }
        // The last 100 of the burst must have fitted the allowance ago too.
        assert!(matches!(h.fit(cost(100), now), Fit::After(_)));
        drop(h.reserve(cost(100), now + allowance).expect("fits"));
        // 600 per minute refills 100 every 10 s.
        assert_eq!(
            h.fit(cost(100), now + allowance),
            Fit::After(Duration::from_secs(10))
        );
        assert_eq!(h.fit(cost(601), now), Fit::Never { limit: 600 });
        assert!(matches!(h.fit(cost(100), now + 10 * S), Fit::After(_)));
        assert_eq!(h.fit(cost(100), now + 10 * S + allowance), Fit::Leaves(0));
    }

    #[test]
    fn limits_are_learned_and_the_mirror_follows_the_provider_down() {
        let h = Headroom::default();
        let now = 100 * S;
        let answered = h.reserve(cost(10), now).expect("no limits yet");
        let still_flying = h.reserve(cost(50), now).expect("no limits yet");
        h.observe(
            &headers(&[
                ("x-ratelimit-limit-tokens", "1000"),
                ("x-ratelimit-remaining-tokens", "400"),
            ]),
            now,
            answered,
        );
        assert_eq!(h.limits().tpm, Some(1000));
        // 400 left at the provider, 50 of them already promised (read the
        // arrival allowance later, when what fitted at `now` may be sent).
        let later = now + ARRIVAL_ALLOWANCE.as_nanos() as u64;
        assert_eq!(h.fit(cost(350), later), Fit::Leaves(0));
        assert!(matches!(h.fit(cost(351), later), Fit::After(_)));
        drop(still_flying);
        // A later, higher report does not open the mirror wider.
        let r = h.reserve(cost(0), now).expect("free");
        h.observe(
            &headers(&[("x-ratelimit-remaining-tokens", "1000")]),
            now,
            r,
        );
        assert!(matches!(h.fit(cost(351), later), Fit::After(_)));
    }

    #[test]
    fn a_declared_limit_is_not_replaced_by_a_learned_one() {
        let h = Headroom::new(LimitSet {
            rpm: Some(10),
            ..LimitSet::default()
        });
        let r = h.reserve(cost(1), 0).expect("fits");
        h.observe(&headers(&[("x-ratelimit-limit-requests", "5000")]), 0, r);
        assert_eq!(h.limits().rpm, Some(10));
        assert_eq!(h.limits().tpm, None);
    }
}
