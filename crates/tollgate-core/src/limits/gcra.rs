//! GCRA, the continuous token bucket that OpenAI's own limits follow.
//!
//! The whole state of one limit is one number, the theoretical arrival time
//! (`tat`, nanoseconds): the moment at which the bucket would be full again.
//! A request of cost `c` moves it `c · T` forward, where `T = window / amount`
//! is the refill time of one unit; it is admitted when that leaves the bucket
//! no deeper than `tau = amount · T`, the whole window.
//!
//! `T` is rounded up to the next nanosecond, so the bucket refills at most
//! one nanosecond per unit slower than nominal: never more than the limit.

use std::time::Duration;

/// One rolling limit: `amount` units per `window`, with a burst of `amount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    interval_ns: u64,
    capacity: u64,
}

/// An admitted charge: the new state and what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// The new theoretical arrival time to store.
    pub tat: u64,
    /// Whole units still available right now.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// A refused charge; the stored state must not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Admissible once `wait` has passed, if nothing else is charged meanwhile.
    NotUntil {
        /// How long until this very charge would fit.
        wait: Duration,
        /// Whole units available right now.
        remaining: u64,
    },
    /// The charge exceeds the whole capacity: it can never fit.
    NeverFits,
}

impl Gcra {
    /// `amount` units per `window`. An `amount` of zero refuses everything
    /// with a non-zero cost.
    pub fn new(amount: u64, window: Duration) -> Self {
        let window_ns = window.as_nanos().min(u64::MAX as u128) as u64;
        let interval_ns = if amount == 0 {
            u64::MAX
        } else {
            window_ns.div_ceil(amount).max(1)
        };
        Self {
            interval_ns,
            capacity: amount,
        }
    }

    /// The limit's amount per window: also its burst capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Refill time of one unit, in nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    fn tau(&self) -> u64 {
        self.capacity.saturating_mul(self.interval_ns)
    }

    /// Tries to charge `cost` units at `now` against the stored `tat`.
    pub fn charge(&self, tat: u64, now: u64, cost: u64) -> Result<Admitted, Refused> {
        if cost > self.capacity {
            return Err(Refused::NeverFits);
        }
        let base = tat.max(now);
        let new_tat = base.saturating_add(cost.saturating_mul(self.interval_ns));
        let depth = new_tat - now;
        let tau = self.tau();
        if depth <= tau {
            Ok(Admitted {
                tat: new_tat,
                remaining: (tau - depth) / self.interval_ns,
                reset: Duration::from_nanos(depth),
            })
        } else {
            Err(Refused::NotUntil {
                wait: Duration::from_nanos(depth - tau),
                remaining: self.remaining(tat, now),
            })
        }
    }

    /// Whole units available at `now`, without charging.
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let depth = tat.saturating_sub(now);
        self.tau().saturating_sub(depth) / self.interval_ns
    }

    /// Time until the bucket is full again, without charging.
    pub fn reset(&self, tat: u64, now: u64) -> Duration {
        Duration::from_nanos(tat.saturating_sub(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn full_bucket_admits_exactly_capacity_then_refuses() {
        let g = Gcra::new(60, Duration::from_secs(60));
        let now = 1_000 * S;
        let mut tat = 0;
        for i in 0..60 {
            let a = g.charge(tat, now, 1).expect("fits");
            assert_eq!(a.remaining, 59 - i);
            tat = a.tat;
        }
        match g.charge(tat, now, 1) {
            Err(Refused::NotUntil { wait, remaining }) => {
                assert_eq!(wait, Duration::from_secs(1));
                assert_eq!(remaining, 0);
            }
            other => panic!("expected a wait, got {other:?}"),
        }
        assert!(
            g.charge(tat, now + S, 1).is_ok(),
            "admitted once the wait has passed"
        );
        assert!(
            g.charge(tat, now + S - 1, 1).is_err(),
            "refused a nanosecond early"
        );
    }

    #[test]
    fn a_charge_larger_than_capacity_never_fits() {
        let g = Gcra::new(1000, Duration::from_secs(60));
        assert_eq!(g.charge(0, 0, 1001), Err(Refused::NeverFits));
        assert!(g.charge(0, 0, 1000).is_ok());
    }
}
