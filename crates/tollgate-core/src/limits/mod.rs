//! Limits: what a subject may use, and the decision that charges a request
//! against every limit that applies to it at once.
//!
//! Rolling limits (per minute) are GCRA buckets ([`gcra`]); calendar caps
//! (per UTC day) are plain counters keyed by the day ([`calendar`]). The
//! state of one subject is a [`SubjectState`]; [`admit`] and [`reconcile`]
//! are pure functions over those states, so the in-memory store and the
//! Redis script of the distributed store make the same decisions.

mod admission;
pub mod calendar;
pub mod gcra;

pub use admission::{
    Check, Cost, Grant, Reading, Refusal, RefusalKind, admit, reconcile, tightest,
};
pub use gcra::{Admitted, Gcra, Refused};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    /// One per request.
    Requests,
    /// Input plus output tokens.
    Tokens,
}

/// The limits a subject can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// Requests per minute, rolling.
    RequestsPerMinute,
    /// Tokens per minute, rolling.
    TokensPerMinute,
    /// Requests per UTC day.
    RequestsPerDay,
    /// Tokens per UTC day.
    TokensPerDay,
}

impl LimitKind {
    /// Every kind, in the order limits are checked and reported.
    pub const ALL: [LimitKind; 4] = [
        LimitKind::RequestsPerMinute,
        LimitKind::TokensPerMinute,
        LimitKind::RequestsPerDay,
        LimitKind::TokensPerDay,
    ];

    /// The name in error bodies (`"limit": "tokens_per_minute"`).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests_per_minute",
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::RequestsPerDay => "requests_per_day",
            LimitKind::TokensPerDay => "tokens_per_day",
        }
    }

    /// How OpenAI's messages name it ("tokens per min (TPM)").
    pub fn describe(self) -> &'static str {
        match self {
            LimitKind::RequestsPerMinute => "requests per min (RPM)",
            LimitKind::TokensPerMinute => "tokens per min (TPM)",
            LimitKind::RequestsPerDay => "requests per day (RPD)",
            LimitKind::TokensPerDay => "tokens per day (TPD)",
        }
    }

    /// What it counts.
    pub fn dimension(self) -> Dimension {
        match self {
            LimitKind::RequestsPerMinute | LimitKind::RequestsPerDay => Dimension::Requests,
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay => Dimension::Tokens,
        }
    }

    /// Whether it is a calendar cap (resets at UTC midnight).
    pub fn is_daily(self) -> bool {
        matches!(self, LimitKind::RequestsPerDay | LimitKind::TokensPerDay)
    }

    /// The rolling window of a per-minute limit.
    const MINUTE: Duration = Duration::from_secs(60);
}

/// The amounts of the limits one subject carries; `None` is unlimited.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// Tokens per UTC day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
}

impl LimitSet {
    /// The amount of one kind, if limited.
    pub fn get(&self, kind: LimitKind) -> Option<u64> {
        match kind {
            LimitKind::RequestsPerMinute => self.rpm,
            LimitKind::TokensPerMinute => self.tpm,
            LimitKind::RequestsPerDay => self.rpd,
            LimitKind::TokensPerDay => self.tpd,
        }
    }

    /// No limit at all.
    pub fn is_empty(&self) -> bool {
        LimitKind::ALL.iter().all(|k| self.get(*k).is_none())
    }

    /// Whether any limit counts tokens (then the request needs an estimate).
    pub fn counts_tokens(&self) -> bool {
        self.tpm.is_some() || self.tpd.is_some()
    }

    /// `self` with every amount that `over` sets replaced by `over`'s.
    pub fn overlaid(self, over: &LimitSet) -> LimitSet {
        LimitSet {
            rpm: over.rpm.or(self.rpm),
            tpm: over.tpm.or(self.tpm),
            rpd: over.rpd.or(self.rpd),
            tpd: over.tpd.or(self.tpd),
        }
    }
}

/// The stored state of one subject's limits: 56 bytes whatever it carries.
///
/// A state equal to what [`SubjectState::is_idle`] accepts behaves exactly
/// like a fresh one, so the store may drop it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubjectState {
    /// GCRA theoretical arrival times (ns) of the requests and token buckets.
    pub tat: [u64; 2],
    /// The per-minute amounts those times were computed for, so that a
    /// limit edited meanwhile rescales what is outstanding instead of
    /// misreading it.
    pub rate: [u64; 2],
    /// The UTC day (days since the epoch) the daily counters belong to.
    pub day: u64,
    /// Requests and tokens used on `day`.
    pub used: [u64; 2],
}

impl SubjectState {
    /// True when forgetting this state changes no future decision: both
    /// buckets are full and the daily counters are from a past day or zero.
    pub fn is_idle(&self, now_ns: u64) -> bool {
        self.tat.iter().all(|t| *t <= now_ns)
            && (self.day < calendar::utc_day(now_ns) || self.used == [0, 0])
    }
}

impl SubjectState {
    /// The bucket's `tat` for a limit of `amount` per minute: what is
    /// outstanding stays the same number of units when the amount changed.
    /// `slot` is 0 for requests, 1 for tokens.
    pub fn tat_for(&self, slot: usize, amount: u64, now: u64) -> u64 {
        let (tat, old) = (self.tat[slot], self.rate[slot]);
        if old == 0 || old == amount || tat <= now {
            return tat;
        }
        let old_interval = Gcra::new(old, LimitKind::MINUTE).interval_ns();
        let new_interval = Gcra::new(amount, LimitKind::MINUTE).interval_ns();
        let units = u128::from(tat - now).div_ceil(u128::from(old_interval));
        now.saturating_add((units * u128::from(new_interval)).min(u128::from(u64::MAX)) as u64)
    }
}

fn slot(dimension: Dimension) -> usize {
    match dimension {
        Dimension::Requests => 0,
        Dimension::Tokens => 1,
    }
}

/// The limits a key carries, or a preset bundles: its own, per model, per
/// end user of the key, and whether its requests may queue.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    /// Requests per minute of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests per UTC day of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpd: Option<u64>,
    /// Tokens per UTC day of the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpd: Option<u64>,
    /// Limits per model, on top of the key's own.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, LimitSet>,
    /// Limits for each end user of the key (the request's `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<LimitSet>,
    /// Longest a request may queue for its limits instead of being refused.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::duration::opt_humantime"
    )]
    pub max_wait: Option<Duration>,
}

impl KeyLimits {
    /// The key's own amounts.
    pub fn own(&self) -> LimitSet {
        LimitSet {
            rpm: self.rpm,
            tpm: self.tpm,
            rpd: self.rpd,
            tpd: self.tpd,
        }
    }

    /// `self` (a preset) with everything `over` (the key) sets replacing it;
    /// model and user limits merge amount by amount.
    pub fn overlaid(&self, over: &KeyLimits) -> KeyLimits {
        let own = self.own().overlaid(&over.own());
        let mut models = self.models.clone();
        for (m, l) in &over.models {
            let merged = models.get(m).copied().unwrap_or_default().overlaid(l);
            models.insert(m.clone(), merged);
        }
        let users = match (self.users, over.users) {
            (Some(a), Some(b)) => Some(a.overlaid(&b)),
            (a, b) => b.or(a),
        };
        KeyLimits {
            rpm: own.rpm,
            tpm: own.tpm,
            rpd: own.rpd,
            tpd: own.tpd,
            models,
            users,
            max_wait: over.max_wait.or(self.max_wait),
        }
    }
}

/// Who a set of limits applies to: the identity its state is kept under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// A virtual key, by id.
    Key(Arc<str>),
    /// One model used through a key (key id, model).
    KeyModel(Arc<str>, Arc<str>),
    /// One end user of a key (key id, user).
    KeyUser(Arc<str>, Arc<str>),
    /// A team, by name.
    Team(Arc<str>),
}
