//! The mock's own RPM and TPM limits per API key, with OpenAI's semantics:
//! a continuous bucket, tokens charged as prompt + `max_tokens` up front,
//! both limits checked before either is charged.

use crate::config::MockConfig;
use http::HeaderMap;
use http::header::HeaderValue;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::duration::format_reset;
use tollgate_core::limits::{Gcra, Refused};

/// Per-key limiter state: one theoretical arrival time per limit.
#[derive(Debug, Default, Clone, Copy)]
struct KeyState {
    requests_tat: u64,
    tokens_tat: u64,
}

/// The limits of one mock.
#[derive(Debug)]
pub(crate) struct ProviderLimits {
    rpm: Option<Gcra>,
    tpm: Option<Gcra>,
    keys: Mutex<HashMap<String, KeyState>>,
    clock: SystemClock,
}

/// Which limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dimension {
    Requests,
    Tokens,
}

/// A refusal, worded by the handler.
#[derive(Debug)]
pub(crate) enum LimitRefusal {
    /// Over a limit for now; clears after `wait`.
    Wait {
        dimension: Dimension,
        limit: u64,
        used: u64,
        requested: u64,
        wait: Duration,
    },
    /// Larger than the whole TPM limit.
    TooLarge { limit: u64, requested: u64 },
}

/// Remaining and reset of both limits after a decision, for the headers.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LimitStatus {
    requests: Option<(u64, u64, Duration)>,
    tokens: Option<(u64, u64, Duration)>,
}

impl ProviderLimits {
    pub(crate) fn new(config: &MockConfig) -> Self {
        let minute = Duration::from_secs(60);
        Self {
            rpm: config.rpm.map(|n| Gcra::new(n, minute)),
            tpm: config.tpm.map(|n| Gcra::new(n, minute)),
            keys: Mutex::new(HashMap::new()),
            clock: SystemClock::new(),
        }
    }

    /// Charges one request of `tokens` to `key`, or refuses without charging.
    pub(crate) fn admit(&self, key: &str, tokens: u64) -> (LimitStatus, Option<LimitRefusal>) {
        if self.rpm.is_none() && self.tpm.is_none() {
            return (LimitStatus::default(), None);
        }
        let now = self.clock.now_ns();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let state = keys.entry(key.to_owned()).or_default();
        let req = self.rpm.map(|g| (g, g.charge(state.requests_tat, now, 1)));
        let tok = self
            .tpm
            .map(|g| (g, g.charge(state.tokens_tat, now, tokens)));
        let mut status = LimitStatus {
            requests: self.rpm.map(|g| {
                (
                    g.capacity(),
                    g.remaining(state.requests_tat, now),
                    g.reset(state.requests_tat, now),
                )
            }),
            tokens: self.tpm.map(|g| {
                (
                    g.capacity(),
                    g.remaining(state.tokens_tat, now),
                    g.reset(state.tokens_tat, now),
                )
            }),
        };
        let refusal = |dimension, g: Gcra, r: Refused, requested| match r {
            Refused::NeverFits => LimitRefusal::TooLarge {
                limit: g.capacity(),
                requested,
            },
            Refused::NotUntil { wait, remaining } => LimitRefusal::Wait {
                dimension,
                limit: g.capacity(),
                used: g.capacity() - remaining,
                requested,
                wait,
            },
        };
        if let Some((g, Err(r))) = req {
            return (status, Some(refusal(Dimension::Requests, g, r, 1)));
        }
        if let Some((g, Err(r))) = tok {
            return (status, Some(refusal(Dimension::Tokens, g, r, tokens)));
        }
        if let Some((g, Ok(a))) = req {
            state.requests_tat = a.tat;
            status.requests = Some((g.capacity(), a.remaining, a.reset));
        }
        if let Some((g, Ok(a))) = tok {
            state.tokens_tat = a.tat;
            status.tokens = Some((g.capacity(), a.remaining, a.reset));
        }
        (status, None)
    }
}

impl LimitStatus {
    /// Writes OpenAI's six `x-ratelimit-*` headers for the limits that exist.
    pub(crate) fn write_headers(&self, headers: &mut HeaderMap) {
        let mut put = |name: &'static str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(name, v);
            }
        };
        if let Some((limit, remaining, reset)) = self.requests {
            put("x-ratelimit-limit-requests", limit.to_string());
            put("x-ratelimit-remaining-requests", remaining.to_string());
            put("x-ratelimit-reset-requests", format_reset(reset));
        }
        if let Some((limit, remaining, reset)) = self.tokens {
            put("x-ratelimit-limit-tokens", limit.to_string());
            put("x-ratelimit-remaining-tokens", remaining.to_string());
            put("x-ratelimit-reset-tokens", format_reset(reset));
        }
    }
}
