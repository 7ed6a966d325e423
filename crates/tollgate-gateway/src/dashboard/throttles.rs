//! Who was refused and why, counted per minute for the last hour and per
//! hour for the last month: the dashboard's "top throttled subjects".
//!
//! Refusals leave no usage row (nothing was served), so they are counted
//! here, in memory: a restart forgets them. Each bucket keeps at most
//! [`SUBJECTS_PER_BUCKET`] distinct subjects and counts the rest as one
//! `other`, so a storm of distinct end users cannot grow it without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
/// Distinct (subject, reason) pairs one bucket keeps.
pub const SUBJECTS_PER_BUCKET: usize = 200;

/// Refusals per subject and reason over time.
#[derive(Debug, Default)]
pub struct ThrottleLog {
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// The last 60 minutes.
    minutes: VecDeque<Bucket>,
    /// The last 31 days.
    hours: VecDeque<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    start_ms: i64,
    counts: HashMap<(Arc<str>, &'static str), u64>,
    /// Refusals of subjects past the bucket's capacity.
    other: u64,
}

/// One line of the top list.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Throttled {
    /// `key:NAME`, `team:T`, `account:A`, … or `other`.
    pub scope: Arc<str>,
    /// Which limit: `requests_per_minute`, `budget_day`, `credits`, …
    pub reason: &'static str,
    /// Refusals in the window.
    pub count: u64,
}

fn add(
    buckets: &mut VecDeque<Bucket>,
    width: i64,
    keep: usize,
    at_ms: i64,
    key: (Arc<str>, &'static str),
) {
    let start_ms = at_ms - at_ms.rem_euclid(width);
    if buckets.back().is_none_or(|b| b.start_ms < start_ms) {
        buckets.push_back(Bucket {
            start_ms,
            counts: HashMap::new(),
            other: 0,
        });
        while buckets.len() > keep {
            buckets.pop_front();
        }
    }
    // A clock that stepped back lands in the newest bucket.
    let Some(bucket) = buckets.back_mut() else {
        return;
    };
    if let Some(n) = bucket.counts.get_mut(&key) {
        *n += 1;
    } else if bucket.counts.len() < SUBJECTS_PER_BUCKET {
        bucket.counts.insert(key, 1);
    } else {
        bucket.other += 1;
    }
}

impl ThrottleLog {
    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one refusal of `scope` for `reason` at `at_ms`.
    pub fn record(&self, scope: Arc<str>, reason: &'static str, at_ms: i64) {
        let mut b = self.buckets();
        add(
            &mut b.minutes,
            MINUTE_MS,
            60,
            at_ms,
            (scope.clone(), reason),
        );
        add(&mut b.hours, HOUR_MS, 31 * 24, at_ms, (scope, reason));
    }

    /// The `limit` subjects refused most since `since_ms`, most first.
    /// Windows up to an hour read minutes, longer ones whole hours.
    pub fn top(&self, since_ms: i64, now_ms: i64, limit: usize) -> Vec<Throttled> {
        let b = self.buckets();
        let (buckets, width) = if now_ms - since_ms <= HOUR_MS {
            (&b.minutes, MINUTE_MS)
        } else {
            (&b.hours, HOUR_MS)
        };
        let mut sum: HashMap<(Arc<str>, &'static str), u64> = HashMap::new();
        let mut other = 0;
        for bucket in buckets.iter().filter(|x| x.start_ms + width > since_ms) {
            for (k, n) in &bucket.counts {
                *sum.entry(k.clone()).or_default() += n;
            }
            other += bucket.other;
        }
        let mut top: Vec<Throttled> = sum
            .into_iter()
            .map(|((scope, reason), count)| Throttled {
                scope,
                reason,
                count,
            })
            .collect();
        if other > 0 {
            top.push(Throttled {
                scope: Arc::from("other"),
                reason: "many subjects",
                count: other,
            });
        }
        top.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.scope.cmp(&b.scope)));
        top.truncate(limit);
        top
    }

    /// Refusals since `since_ms`.
    pub fn total(&self, since_ms: i64, now_ms: i64) -> u64 {
        self.top(since_ms, now_ms, usize::MAX)
            .iter()
            .map(|t| t.count)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn counts_per_subject_and_reason_within_the_window() {
        let log = ThrottleLog::default();
        let key: Arc<str> = Arc::from("key:a");
        // Two hours before: outside the last hour, inside the last day.
        log.record(key.clone(), "tokens_per_day", T0 - 2 * HOUR_MS);
        for _ in 0..3 {
            log.record(key.clone(), "requests_per_minute", T0);
        }
        log.record(Arc::from("team:t"), "budget_day", T0 + MINUTE_MS);
        let now = T0 + MINUTE_MS;
        let hour = log.top(now - HOUR_MS, now, 10);
        assert_eq!(hour.len(), 2);
        assert_eq!(
            (hour[0].scope.as_ref(), hour[0].reason, hour[0].count),
            ("key:a", "requests_per_minute", 3)
        );
        assert_eq!(log.total(now - 24 * HOUR_MS, now), 5);
    }

    #[test]
    fn a_storm_of_distinct_subjects_is_bounded() {
        let log = ThrottleLog::default();
        for i in 0..1_000 {
            log.record(
                Arc::from(format!("key:k/user:{i}").as_str()),
                "requests_per_minute",
                T0,
            );
        }
        let top = log.top(T0 - MINUTE_MS, T0, usize::MAX);
        assert_eq!(top.len(), SUBJECTS_PER_BUCKET + 1);
        assert_eq!(top[0].scope.as_ref(), "other");
        assert_eq!(top[0].count, 1_000 - SUBJECTS_PER_BUCKET as u64);
        assert_eq!(log.total(T0 - MINUTE_MS, T0), 1_000);
    }
}
