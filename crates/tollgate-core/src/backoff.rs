//! Full-jitter exponential backoff, `random(0, min(cap, base · 2^(n-1)))`:
//! the variant that finished contended work with the fewest calls in
//! Brooker's comparison. Both halves of the playbook use it: the gateway
//! between passes over a model's deployments, the client between attempts.

use std::time::Duration;

/// The wait after the `n`-th failed try (`n` ≥ 1), given a uniform random
/// `unit` in `[0, 1)`.
pub fn full_jitter(base: Duration, cap: Duration, n: u32, unit: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << n.saturating_sub(1).min(30));
    ceiling.min(cap).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(1));
        let almost_one = 1.0 - f64::EPSILON;
        assert_eq!(full_jitter(base, cap, 1, 0.0), Duration::ZERO);
        assert!(full_jitter(base, cap, 1, almost_one) <= base);
        assert!(full_jitter(base, cap, 3, almost_one) > Duration::from_millis(399));
        assert!(full_jitter(base, cap, 30, almost_one) <= cap);
        assert_eq!(full_jitter(base, cap, 2, 0.5), Duration::from_millis(100));
    }
}
