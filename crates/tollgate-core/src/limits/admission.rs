//! The admission decision: every limit of every subject at once, and the
//! correction once the real usage is known.

use super::calendar::{DAY_NS, used_today, utc_day};
use super::gcra::{Gcra, Refused};
use super::{Dimension, LimitKind, LimitSet, SubjectState, slot};
use std::time::Duration;

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Always 1 for a request; a parameter so tests can weigh freely.
    pub requests: u64,
    /// Estimated input plus output tokens.
    pub tokens: u64,
}

impl Cost {
    fn of(&self, dimension: Dimension) -> u64 {
        match dimension {
            Dimension::Requests => self.requests,
            Dimension::Tokens => self.tokens,
        }
    }
}

/// One subject's part in a decision: its limits and a copy of its stored
/// state, changed only when the whole request is admitted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// The amounts that apply to this subject.
    pub limits: LimitSet,
    /// Its state.
    pub state: SubjectState,
    /// The state the charge would leave, committed only if all admit.
    next: SubjectState,
}

impl Check {
    /// A subject with `limits` and its stored `state`.
    pub fn new(limits: LimitSet, state: SubjectState) -> Self {
        Self {
            limits,
            state,
            next: state,
        }
    }
}

/// Where one limit stands, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Which limit.
    pub kind: LimitKind,
    /// Index of its subject among the checks.
    pub subject: usize,
    /// Its amount.
    pub limit: u64,
    /// Whole units left.
    pub remaining: u64,
    /// Time until it is whole again.
    pub reset: Duration,
}

/// The tightest request limit and the tightest token limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    /// The request limit with the fewest units left.
    pub requests: Option<Reading>,
    /// The token limit with the fewest units left.
    pub tokens: Option<Reading>,
}

/// Why a limit refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// A rolling limit: this request fits after the wait, if nothing else
    /// is admitted meanwhile.
    Wait(Duration),
    /// A calendar cap: nothing before the next UTC midnight, this long away.
    DailyCap(Duration),
    /// The request is larger than the limit's whole capacity.
    NeverFits,
}

/// A refused request; no state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// Index of the subject whose limit refused.
    pub subject: usize,
    /// The limit that refused: of all refusing limits, the one a client
    /// must wait longest for (never-fits first, then daily caps).
    pub kind: LimitKind,
    /// Why.
    pub why: RefusalKind,
    /// The limit's amount.
    pub limit: u64,
    /// Units of it already used.
    pub used: u64,
    /// Units this request asked for.
    pub requested: u64,
    /// Where the tightest limits stand now (nothing was charged).
    pub standing: Grant,
}

impl Refusal {
    /// When this request would be admitted if nothing else arrived; `None`
    /// when waiting cannot help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.why {
            RefusalKind::Wait(d) | RefusalKind::DailyCap(d) => Some(d),
            RefusalKind::NeverFits => None,
        }
    }

    /// Whether a client should retry on its own (rolling limits only).
    pub fn should_retry(&self) -> bool {
        matches!(self.why, RefusalKind::Wait(_))
    }

    fn severity(&self) -> (u8, Duration) {
        match self.why {
            RefusalKind::NeverFits => (2, Duration::MAX),
            RefusalKind::DailyCap(d) => (1, d),
            RefusalKind::Wait(d) => (0, d),
        }
    }
}

/// The clock readings every limit of one decision shares (computed once:
/// each is a 64-bit division).
struct At {
    now: u64,
    today: u64,
    until_midnight: Duration,
}

impl At {
    fn new(now: u64) -> Self {
        let today = utc_day(now);
        Self {
            now,
            today,
            until_midnight: Duration::from_nanos((today + 1) * DAY_NS - now),
        }
    }
}

fn reading(
    subject: usize,
    kind: LimitKind,
    limit: u64,
    remaining: u64,
    reset: Duration,
) -> Reading {
    Reading {
        kind,
        subject,
        limit,
        remaining,
        reset,
    }
}

/// Charges one limit of `amount` into `next` (a copy of the stored state);
/// returns the standing after the charge, or why it does not fit.
fn charge(
    subject: usize,
    kind: LimitKind,
    amount: u64,
    next: &mut SubjectState,
    cost: u64,
    at: &At,
) -> Result<Reading, RefusalKind> {
    let s = slot(kind.dimension());
    if kind.is_daily() {
        if next.day != at.today {
            next.day = at.today;
            next.used = [0, 0];
        }
        let used = next.used[s];
        if cost > amount {
            return Err(RefusalKind::NeverFits);
        }
        if used + cost > amount {
            return Err(RefusalKind::DailyCap(at.until_midnight));
        }
        next.used[s] = used + cost;
        Ok(reading(
            subject,
            kind,
            amount,
            amount - used - cost,
            at.until_midnight,
        ))
    } else {
        let gcra = Gcra::new(amount, LimitKind::MINUTE);
        let tat = next.tat_for(s, amount, at.now);
        match gcra.charge(tat, at.now, cost) {
            Ok(a) => {
                next.tat[s] = a.tat;
                next.rate[s] = amount;
                Ok(reading(subject, kind, amount, a.remaining, a.reset))
            }
            Err(Refused::NotUntil { wait, .. }) => Err(RefusalKind::Wait(wait)),
            Err(Refused::NeverFits) => Err(RefusalKind::NeverFits),
        }
    }
}

/// Where one limit stands in `state`, without charging.
fn standing(
    subject: usize,
    kind: LimitKind,
    amount: u64,
    state: &SubjectState,
    at: &At,
) -> Reading {
    let s = slot(kind.dimension());
    if kind.is_daily() {
        let used = used_today(state.day, state.used[s], at.now);
        reading(
            subject,
            kind,
            amount,
            amount.saturating_sub(used),
            at.until_midnight,
        )
    } else {
        let gcra = Gcra::new(amount, LimitKind::MINUTE);
        let tat = state.tat_for(s, amount, at.now);
        reading(
            subject,
            kind,
            amount,
            gcra.remaining(tat, at.now),
            gcra.reset(tat, at.now),
        )
    }
}

/// Keeps the reading with the fewest units left (on a tie, the later reset).
pub fn tightest(current: &mut Option<Reading>, candidate: Reading) {
    let tighter = match current {
        None => true,
        Some(c) => {
            (candidate.remaining, std::cmp::Reverse(candidate.reset))
                < (c.remaining, std::cmp::Reverse(c.reset))
        }
    };
    if tighter {
        *current = Some(candidate);
    }
}

fn note(grant: &mut Grant, r: Reading) {
    match r.kind.dimension() {
        Dimension::Requests => tightest(&mut grant.requests, r),
        Dimension::Tokens => tightest(&mut grant.tokens, r),
    }
}

/// Charges `cost` against every limit of every check at `now`, or against
/// none of them: charges go to a scratch copy of each state, committed only
/// when every limit admitted.
#[allow(clippy::result_large_err)] // by value: a refusal storm allocates nothing
pub fn admit(checks: &mut [Check], cost: Cost, now: u64) -> Result<Grant, Refusal> {
    let at = At::new(now);
    let mut refusal: Option<Refusal> = None;
    let mut grant = Grant::default();
    for (i, check) in checks.iter_mut().enumerate() {
        check.next = check.state;
        for kind in LimitKind::ALL {
            let Some(amount) = check.limits.get(kind) else {
                continue;
            };
            let requested = cost.of(kind.dimension());
            match charge(i, kind, amount, &mut check.next, requested, &at) {
                Ok(after) => note(&mut grant, after),
                Err(why) => {
                    let before = standing(i, kind, amount, &check.state, &at);
                    let r = Refusal {
                        subject: i,
                        kind,
                        why,
                        limit: amount,
                        used: amount - before.remaining.min(amount),
                        requested,
                        standing: Grant::default(),
                    };
                    if refusal.is_none_or(|worst| r.severity() > worst.severity()) {
                        refusal = Some(r);
                    }
                }
            }
        }
    }
    if let Some(mut r) = refusal {
        for (i, check) in checks.iter().enumerate() {
            for kind in LimitKind::ALL {
                if let Some(amount) = check.limits.get(kind) {
                    note(
                        &mut r.standing,
                        standing(i, kind, amount, &check.state, &at),
                    );
                }
            }
        }
        return Err(r);
    }
    for check in checks.iter_mut() {
        check.state = check.next;
    }
    Ok(grant)
}

/// Corrects the token charge of a request admitted at `admitted_at` by
/// `delta` (real minus estimated tokens; negative refunds), on every token
/// limit it was charged on. Never refuses: the tokens are spent already.
///
/// Rolling limits shift their bucket by exactly `delta` units, so the state
/// is the one that charging the real usage at admission would have left.
pub fn reconcile(checks: &mut [Check], delta: i64, admitted_at: u64) {
    if delta == 0 {
        return;
    }
    let s = slot(Dimension::Tokens);
    let day = utc_day(admitted_at);
    for check in checks.iter_mut() {
        if let Some(amount) = check.limits.tpm {
            let interval = Gcra::new(amount, LimitKind::MINUTE).interval_ns();
            let shift = delta.unsigned_abs().saturating_mul(interval);
            let tat = check.state.tat_for(s, amount, admitted_at);
            check.state.tat[s] = if delta > 0 {
                // A state evicted meanwhile reads 0: the extra tokens were
                // spent at admission, so that is where they are charged.
                tat.max(admitted_at).saturating_add(shift)
            } else {
                tat.saturating_sub(shift)
            };
            check.state.rate[s] = amount;
        }
        // A counter of another day is not this request's to correct.
        if check.limits.tpd.is_some() && check.state.day == day {
            let used = &mut check.state.used[s];
            *used = if delta > 0 {
                used.saturating_add(delta.unsigned_abs())
            } else {
                used.saturating_sub(delta.unsigned_abs())
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::calendar::DAY_NS;

    const S: u64 = 1_000_000_000;

    #[allow(clippy::result_large_err)]
    fn one(
        limits: &LimitSet,
        state: &mut SubjectState,
        cost: Cost,
        now: u64,
    ) -> Result<Grant, Refusal> {
        let mut c = [Check::new(*limits, *state)];
        let r = admit(&mut c, cost, now);
        *state = c[0].state;
        r
    }

    fn fix(limits: &LimitSet, state: &mut SubjectState, delta: i64, at: u64) {
        let mut c = [Check::new(*limits, *state)];
        reconcile(&mut c, delta, at);
        *state = c[0].state;
    }

    #[test]
    fn a_refusal_by_one_subject_charges_no_other() {
        let roomy = LimitSet {
            rpm: Some(100),
            tpm: Some(10_000),
            ..LimitSet::default()
        };
        let tight = LimitSet {
            tpm: Some(100),
            ..LimitSet::default()
        };
        let now = 1_000 * S;
        let cost = Cost {
            requests: 1,
            tokens: 60,
        };
        let mut checks = [
            Check::new(roomy, SubjectState::default()),
            Check::new(tight, SubjectState::default()),
        ];
        admit(&mut checks, cost, now).expect("first fits");
        let before = checks.map(|c| c.state);
        let r = admit(&mut checks, cost, now).expect_err("second does not");
        assert_eq!((r.subject, r.kind), (1, LimitKind::TokensPerMinute));
        assert_eq!((r.limit, r.used, r.requested), (100, 60, 60));
        assert_eq!(before, checks.map(|c| c.state));
        // 20 of the missing tokens refill in 12 s at 100 per minute.
        assert_eq!(r.retry_after(), Some(Duration::from_secs(12)));
    }

    #[test]
    fn the_longest_wait_names_the_refusal() {
        let limits = LimitSet {
            rpm: Some(1),
            tpm: Some(1_000),
            ..LimitSet::default()
        };
        let mut st = SubjectState::default();
        let now = 1_000 * S;
        one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 1_000,
            },
            now,
        )
        .expect("fits");
        let r = one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 10,
            },
            now,
        )
        .expect_err("full");
        // Both refuse; one request refills in 60 s, ten tokens in 0.6 s.
        assert_eq!(r.kind, LimitKind::RequestsPerMinute);
        assert_eq!(r.retry_after(), Some(Duration::from_secs(60)));
        assert!(r.should_retry());
    }

    #[test]
    fn daily_caps_wait_for_midnight_and_reset_there() {
        let limits = LimitSet {
            tpd: Some(100),
            ..LimitSet::default()
        };
        let mut st = SubjectState::default();
        let evening = 20_000 * DAY_NS + 23 * 3600 * S;
        one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 100,
            },
            evening,
        )
        .expect("fits");
        let r = one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 1,
            },
            evening,
        )
        .expect_err("capped");
        assert_eq!(r.why, RefusalKind::DailyCap(Duration::from_secs(3600)));
        assert!(!r.should_retry());
        let g = one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 100,
            },
            20_001 * DAY_NS,
        )
        .expect("a new day");
        assert_eq!(g.tokens.map(|t| t.remaining), Some(0));
    }

    #[test]
    fn larger_than_capacity_never_fits_and_outranks_waits() {
        let limits = LimitSet {
            rpm: Some(1),
            tpm: Some(50),
            ..LimitSet::default()
        };
        let mut st = SubjectState::default();
        one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 1,
            },
            0,
        )
        .expect("fits");
        let r = one(
            &limits,
            &mut st,
            Cost {
                requests: 1,
                tokens: 51,
            },
            0,
        )
        .expect_err("too big");
        assert_eq!(
            (r.kind, r.why),
            (LimitKind::TokensPerMinute, RefusalKind::NeverFits)
        );
        assert_eq!(r.retry_after(), None);
    }

    #[test]
    fn headers_follow_the_tightest_limit() {
        let a = LimitSet {
            rpm: Some(10),
            tpm: Some(1_000),
            ..LimitSet::default()
        };
        let b = LimitSet {
            rpm: Some(3),
            ..LimitSet::default()
        };
        let g = admit(
            &mut [
                Check::new(a, SubjectState::default()),
                Check::new(b, SubjectState::default()),
            ],
            Cost {
                requests: 1,
                tokens: 100,
            },
            0,
        )
        .expect("fits");
        let req = g.requests.expect("a request limit");
        assert_eq!((req.subject, req.limit, req.remaining), (1, 3, 2));
        assert_eq!(req.reset, Duration::from_secs(20));
        let tok = g.tokens.expect("a token limit");
        assert_eq!((tok.limit, tok.remaining), (1_000, 900));
    }

    #[test]
    fn an_edited_limit_keeps_what_is_outstanding_in_units() {
        let mut st = SubjectState::default();
        let now = 1_000 * S;
        let one_rpm = LimitSet {
            rpm: Some(1),
            ..LimitSet::default()
        };
        one(
            &one_rpm,
            &mut st,
            Cost {
                requests: 1,
                tokens: 0,
            },
            now,
        )
        .expect("fits");
        // Raised to 5 per minute: one of five is used, four remain.
        let five = LimitSet {
            rpm: Some(5),
            ..LimitSet::default()
        };
        let g = one(
            &five,
            &mut st,
            Cost {
                requests: 1,
                tokens: 0,
            },
            now,
        )
        .expect("fits");
        assert_eq!(g.requests.map(|r| r.remaining), Some(3));
    }

    #[test]
    fn reconcile_refunds_and_charges_exactly() {
        let limits = LimitSet {
            tpm: Some(600),
            tpd: Some(10_000),
            ..LimitSet::default()
        };
        let now = 1_000 * S;
        let (mut est, mut real) = (SubjectState::default(), SubjectState::default());
        one(
            &limits,
            &mut est,
            Cost {
                requests: 1,
                tokens: 300,
            },
            now,
        )
        .expect("fits");
        fix(&limits, &mut est, -250, now);
        one(
            &limits,
            &mut real,
            Cost {
                requests: 1,
                tokens: 50,
            },
            now,
        )
        .expect("fits");
        assert_eq!(est, real);
        fix(&limits, &mut est, 70, now);
        one(
            &limits,
            &mut real,
            Cost {
                requests: 0,
                tokens: 70,
            },
            now,
        )
        .expect("fits");
        assert_eq!(est.tat, real.tat);
        assert_eq!(est.used, [0, 120]);
    }
}
