//! Property tests of the admission decision against a simple reference
//! model: independent token buckets that hold credit in nanoseconds and
//! daily counters, driven by a fake clock over random arrivals, costs and
//! limit sets.

use proptest::prelude::*;
use tollgate_core::limits::calendar::{DAY_NS, utc_day};
use tollgate_core::limits::{
    Check, Cost, Gcra, LimitKind, LimitSet, SubjectState, admit, reconcile,
};

const MINUTE: std::time::Duration = std::time::Duration::from_secs(60);

/// One limit of the reference model.
#[derive(Debug, Clone)]
enum Bucket {
    /// Credit in ns, at most `tau`; a unit costs `interval` ns of it.
    Rolling {
        interval: u64,
        tau: u64,
        credit: u64,
        at: u64,
    },
    /// Units used on `day`.
    Daily { amount: u64, day: u64, used: u64 },
}

impl Bucket {
    fn new(kind: LimitKind, amount: u64) -> Self {
        if kind.is_daily() {
            Bucket::Daily {
                amount,
                day: 0,
                used: 0,
            }
        } else {
            let interval = Gcra::new(amount, MINUTE).interval_ns();
            Bucket::Rolling {
                interval,
                tau: amount * interval,
                credit: amount * interval,
                at: 0,
            }
        }
    }

    fn refill(&mut self, now: u64) {
        match self {
            Bucket::Rolling {
                tau, credit, at, ..
            } => {
                *credit = (*credit + (now - *at)).min(*tau);
                *at = now;
            }
            Bucket::Daily { day, used, .. } => {
                if utc_day(now) != *day {
                    *day = utc_day(now);
                    *used = 0;
                }
            }
        }
    }

    fn fits(&self, cost: u64) -> bool {
        match self {
            Bucket::Rolling {
                interval, credit, ..
            } => cost * interval <= *credit,
            Bucket::Daily { amount, used, .. } => used + cost <= *amount,
        }
    }

    fn take(&mut self, cost: u64) {
        match self {
            Bucket::Rolling {
                interval, credit, ..
            } => *credit -= cost * *interval,
            Bucket::Daily { used, .. } => *used += cost,
        }
    }
}

fn limit_set() -> impl Strategy<Value = LimitSet> {
    (
        proptest::option::of(1u64..50),
        proptest::option::of(10u64..5_000),
        proptest::option::of(1u64..200),
        proptest::option::of(100u64..20_000),
    )
        .prop_map(|(rpm, tpm, rpd, tpd)| LimitSet { rpm, tpm, rpd, tpd })
}

/// Arrivals: (gap since the previous one in ms, tokens, which subjects).
fn arrivals() -> impl Strategy<Value = Vec<(u64, u64, bool)>> {
    proptest::collection::vec((0u64..3_000, 0u64..800, any::<bool>()), 1..200)
}

fn cost_of(kind: LimitKind, tokens: u64) -> u64 {
    match kind.dimension() {
        tollgate_core::limits::Dimension::Requests => 1,
        tollgate_core::limits::Dimension::Tokens => tokens,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// (2) and (3): the decision equals the reference's (a request that fits
    /// is admitted, one that does not is refused), and a refusal changes no
    /// state of any subject.
    #[test]
    fn decides_like_the_reference_and_refusals_change_nothing(
        sets in proptest::collection::vec(limit_set(), 2),
        arrivals in arrivals(),
        start_day in 19_000u64..21_000,
    ) {
        let mut states = [SubjectState::default(); 2];
        let mut model: Vec<Vec<(LimitKind, Bucket)>> = sets
            .iter()
            .map(|s| LimitKind::ALL.iter().filter_map(|k| s.get(*k).map(|a| (*k, Bucket::new(*k, a)))).collect())
            .collect();
        // Start late in a day so some runs cross midnight.
        let mut now = start_day * DAY_NS + DAY_NS - 120 * 1_000_000_000;
        for (gap_ms, tokens, both) in arrivals {
            now += gap_ms * 1_000_000;
            let n = if both { 2 } else { 1 };
            for buckets in model.iter_mut().take(n) {
                for (_, b) in buckets.iter_mut() { b.refill(now); }
            }
            let expect = model.iter().take(n).flatten().all(|(k, b)| b.fits(cost_of(*k, tokens)));
            let before = states;
            let mut checks = [0, 1].map(|i| Check::new(sets[i], states[i]));
            let got = admit(&mut checks[..n], Cost { requests: 1, tokens }, now);
            states = checks.map(|c| c.state);
            prop_assert_eq!(got.is_ok(), expect, "at {} cost {}", now, tokens);
            if expect {
                for buckets in model.iter_mut().take(n) {
                    for (k, b) in buckets.iter_mut() { b.take(cost_of(*k, tokens)); }
                }
            } else {
                prop_assert_eq!(before, states);
            }
        }
    }

    /// (1): over any interval of length t, admitted tokens never exceed
    /// capacity + rate · t.
    #[test]
    fn admitted_cost_is_bounded_on_every_interval(
        tpm in 10u64..5_000,
        arrivals in arrivals(),
    ) {
        let limits = LimitSet { tpm: Some(tpm), ..LimitSet::default() };
        let mut check = [Check::new(limits, SubjectState::default())];
        let mut now = 1_000 * DAY_NS;
        let mut admitted: Vec<(u64, u64)> = Vec::new();
        for (gap_ms, tokens, _) in arrivals {
            now += gap_ms * 1_000_000;
            if admit(&mut check, Cost { requests: 1, tokens }, now).is_ok() {
                admitted.push((now, tokens));
            }
        }
        let window = MINUTE.as_nanos();
        for i in 0..admitted.len() {
            let mut sum = 0u128;
            for j in i..admitted.len() {
                sum += u128::from(admitted[j].1);
                let t = u128::from(admitted[j].0 - admitted[i].0);
                prop_assert!(sum * window <= u128::from(tpm) * window + u128::from(tpm) * t,
                    "{} tokens in {} ns with tpm {}", sum, t, tpm);
            }
        }
    }

    /// (4): admitting an estimate and reconciling to the actual leaves the
    /// state that admitting the actual would have left, even when other
    /// requests arrive in between.
    #[test]
    fn reconcile_equals_charging_the_actual(
        limits in limit_set(),
        estimate in 0u64..3_000,
        actual in 0u64..3_000,
        later in proptest::collection::vec((0u64..2_000, 0u64..500), 0..10),
    ) {
        let admitted_at = 5_000 * DAY_NS + 1_000_000_000;
        let mut est = [Check::new(limits, SubjectState::default())];
        let mut real = est;
        let ok_est = admit(&mut est, Cost { requests: 1, tokens: estimate }, admitted_at).is_ok();
        let ok_real = admit(&mut real, Cost { requests: 1, tokens: actual }, admitted_at).is_ok();
        prop_assume!(ok_est && ok_real);
        // Others arrive on both timelines while the call runs.
        let mut now = admitted_at;
        for (gap_ms, tokens) in &later {
            now += gap_ms * 1_000_000;
            let a = admit(&mut est, Cost { requests: 1, tokens: *tokens }, now).is_ok();
            let b = admit(&mut real, Cost { requests: 1, tokens: *tokens }, now).is_ok();
            prop_assume!(a == b);
        }
        reconcile(&mut est, actual as i64 - estimate as i64, admitted_at);
        let (est, real) = (est[0].state, real[0].state);
        if limits.tpm.is_some() {
            // A bucket cannot be fuller than full: where one timeline's
            // bucket refilled to the brim while the other's did not, the two
            // differ by at most the refill in between, and not at all when
            // nothing arrived meanwhile.
            let drift = est.tat[1].abs_diff(real.tat[1]);
            prop_assert!(drift <= now - admitted_at, "drift {} ns after {} ns", drift, now - admitted_at);
            if later.is_empty() {
                prop_assert_eq!(est.tat, real.tat);
            }
        }
        if limits.tpd.is_some() {
            prop_assert_eq!(est.used[1], real.used[1]);
        }
    }
}
