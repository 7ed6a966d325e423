//! When to try again: the server's advice when it gave one, otherwise full
//! jitter (`random(0, min(cap, base · 2^n))`, the variant that finished
//! contended work with the fewest calls in Brooker's comparison), within a
//! number of attempts and a total time budget.

use crate::classify::Disposition;
use std::time::Duration;

/// Bounds and shape of retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff ceiling.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Time from the first attempt after which nothing is retried.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    /// The official SDKs' base and cap (0.5 s, 8 s), five attempts, one minute.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            max_attempts: 5,
            budget: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempts + 1`, after `attempts` attempts and
    /// `elapsed` since the first, given the last answer's disposition;
    /// `None` to stop. `unit` is a uniform random number in `[0, 1)`.
    pub fn next_delay(
        &self,
        attempts: u32,
        last: &Disposition,
        elapsed: Duration,
        unit: f64,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let wait = match last {
            Disposition::RetryAfter(d) => *d,
            Disposition::Backoff => {
                tollgate_core::backoff::full_jitter(self.base, self.cap, attempts, unit)
            }
            _ => return None,
        };
        (elapsed.saturating_add(wait) <= self.budget).then_some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_advice_wins_over_the_formula() {
        let p = RetryPolicy::default();
        let d = Disposition::RetryAfter(Duration::from_millis(1234));
        assert_eq!(
            p.next_delay(1, &d, Duration::ZERO, 0.99),
            Some(Duration::from_millis(1234))
        );
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let p = RetryPolicy::default();
        let b = Disposition::Backoff;
        assert_eq!(
            p.next_delay(1, &b, Duration::ZERO, 0.5),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            p.next_delay(3, &b, Duration::ZERO, 0.5),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.next_delay(4, &b, Duration::ZERO, 0.0),
            Some(Duration::ZERO)
        );
        let capped = RetryPolicy {
            max_attempts: 20,
            ..p
        };
        assert_eq!(
            capped.next_delay(10, &b, Duration::ZERO, 0.5),
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn stops_at_the_attempt_limit_the_budget_and_on_final_answers() {
        let p = RetryPolicy::default();
        let b = Disposition::Backoff;
        assert_eq!(p.next_delay(5, &b, Duration::ZERO, 0.5), None);
        let late = Disposition::RetryAfter(Duration::from_secs(10));
        assert_eq!(p.next_delay(1, &late, Duration::from_secs(55), 0.5), None);
        assert_eq!(
            p.next_delay(1, &Disposition::FailFast, Duration::ZERO, 0.5),
            None
        );
        let budget = Disposition::StopBudget {
            scope: None,
            resets_in: None,
        };
        assert_eq!(p.next_delay(1, &budget, Duration::ZERO, 0.5), None);
    }
}
