//! Limit state in process memory: one [`SubjectState`] per subject in a
//! sharded map, decided under the locks of exactly the shards a request
//! touches, taken in shard order so concurrent decisions never deadlock.
//!
//! No lock is held across an await: a decision is a few hundred nanoseconds
//! of arithmetic on copies of the states, written back only when admitted.

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tollgate_core::limits::{
    Check, Cost, Grant, LimitSet, Refusal, Subject, SubjectState, admit, reconcile,
};

/// The most subjects one decision may span (key, key × model, key × user,
/// team, and room for the deployment and global limits of routing).
pub const MAX_SUBJECTS: usize = 6;

const SHARDS: usize = 64;

/// Subjects are hashed once per decision: the hash picks the shard and
/// finds the entry in it. foldhash is seeded per process, so user ids
/// chosen by clients cannot aim at one bucket.
type Shard = HashTable<(Subject, SubjectState)>;

/// Rolling limits and daily counters of every subject, in memory.
#[derive(Debug)]
pub struct MemoryLimiter {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl Default for MemoryLimiter {
    fn default() -> Self {
        Self::new()
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: RandomState::default(),
        }
    }

    /// Middle bits pick the shard: the table itself uses the low bits for
    /// the bucket and the top seven as tags.
    fn shard_of(hash: u64) -> usize {
        ((hash >> 32) as usize) % SHARDS
    }

    /// Locks the shards of `subjects` in ascending order and hands `f` each
    /// subject's state (a default one if it has none); when `f` says it
    /// changed them, writes them back: removed when idle, else stored.
    fn with_states<R>(
        &self,
        subjects: &[(Subject, LimitSet)],
        now: u64,
        f: impl FnOnce(&mut [Check]) -> (R, bool),
    ) -> R {
        let n = subjects.len();
        assert!(
            n <= MAX_SUBJECTS,
            "a decision spans at most {MAX_SUBJECTS} subjects"
        );
        if let [(subject, limits)] = subjects {
            return self.with_one_state(subject, limits, now, f);
        }
        let mut hash = [0u64; MAX_SUBJECTS];
        let mut order = [usize::MAX; MAX_SUBJECTS];
        for (i, (s, _)) in subjects.iter().enumerate() {
            hash[i] = self.hasher.hash_one(s);
            order[i] = Self::shard_of(hash[i]);
        }
        order[..n].sort_unstable();
        let mut guards: [Option<MutexGuard<'_, Shard>>; MAX_SUBJECTS] = Default::default();
        for (slot, &s) in order[..n].iter().enumerate() {
            if slot == 0 || order[slot - 1] != s {
                guards[slot] = Some(lock(&self.shards[s]));
            }
        }
        // The guard of a shard sits at the first slot of that shard in `order`.
        let guard_slot = |h: u64| {
            let s = Self::shard_of(h);
            order[..n].iter().position(|&o| o == s).unwrap_or_default()
        };

        let mut checks = [Check::default(); MAX_SUBJECTS];
        for (i, (s, limits)) in subjects.iter().enumerate() {
            let state = guards[guard_slot(hash[i])]
                .as_ref()
                .and_then(|g| g.find(hash[i], |(k, _)| k == s))
                .map(|(_, state)| *state)
                .unwrap_or_default();
            checks[i] = Check::new(*limits, state);
        }
        let (result, changed) = f(&mut checks[..n]);
        if !changed {
            return result;
        }
        for (i, (s, _)) in subjects.iter().enumerate() {
            let state = checks[i].state;
            let Some(g) = &mut guards[guard_slot(hash[i])] else {
                continue;
            };
            let idle = state.is_idle(now);
            match g.find_entry(hash[i], |(k, _)| k == s) {
                Ok(entry) if idle => {
                    entry.remove();
                }
                Ok(mut entry) => entry.get_mut().1 = state,
                Err(_) if idle => {}
                Err(_) => {
                    g.insert_unique(hash[i], (s.clone(), state), |(k, _)| {
                        self.hasher.hash_one(k)
                    });
                }
            }
        }
        result
    }

    /// [`Self::with_states`] for the common decision that spans one
    /// subject: one lock, no ordering, no arrays to fill.
    fn with_one_state<R>(
        &self,
        subject: &Subject,
        limits: &LimitSet,
        now: u64,
        f: impl FnOnce(&mut [Check]) -> (R, bool),
    ) -> R {
        let hash = self.hasher.hash_one(subject);
        let mut g = lock(&self.shards[Self::shard_of(hash)]);
        let entry = g.find_entry(hash, |(k, _)| k == subject);
        let state = entry.as_ref().map(|e| e.get().1).unwrap_or_default();
        let mut check = [Check::new(*limits, state)];
        let (result, changed) = f(&mut check);
        if changed {
            let state = check[0].state;
            let idle = state.is_idle(now);
            match entry {
                Ok(e) if idle => {
                    e.remove();
                }
                Ok(mut e) => e.get_mut().1 = state,
                Err(_) if idle => {}
                Err(absent) => {
                    absent
                        .into_table()
                        .insert_unique(hash, (subject.clone(), state), |(k, _)| {
                            self.hasher.hash_one(k)
                        });
                }
            }
        }
        result
    }

    /// Charges `cost` on every limit of every subject, or on none.
    #[allow(clippy::result_large_err)] // by value: a refusal storm allocates nothing
    pub fn admit(
        &self,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
        now: u64,
    ) -> Result<Grant, Refusal> {
        self.with_states(subjects, now, |checks| {
            let decision = admit(checks, cost, now);
            let admitted = decision.is_ok();
            (decision, admitted)
        })
    }

    /// Corrects the token charge of a request admitted at `admitted_at`.
    pub fn reconcile(
        &self,
        subjects: &[(Subject, LimitSet)],
        delta: i64,
        admitted_at: u64,
        now: u64,
    ) {
        self.with_states(subjects, now, |checks| {
            reconcile(checks, delta, admitted_at);
            ((), delta != 0)
        });
    }

    /// Forgets every subject whose state is idle at `now` (full buckets, no
    /// usage today); returns how many were dropped.
    pub fn evict_idle(&self, now: u64) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut g = lock(shard);
            let before = g.len();
            g.retain(|(_, s)| !s.is_idle(now));
            dropped += before - g.len();
        }
        dropped
    }

    /// Subjects currently tracked.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no subject is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const S: u64 = 1_000_000_000;

    #[test]
    fn threads_racing_on_one_key_get_exactly_its_capacity() {
        let limiter = Arc::new(MemoryLimiter::new());
        let key = Subject::Key("k".into());
        let limits = LimitSet {
            rpm: Some(1_000),
            ..LimitSet::default()
        };
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (limiter, key, admitted) = (limiter.clone(), key.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for i in 0..1_000u64 {
                        let user = Subject::KeyUser("k".into(), format!("u{t}-{i}").into());
                        let subjects = [(key.clone(), limits), (user, LimitSet::default())];
                        let cost = Cost {
                            requests: 1,
                            tokens: 0,
                        };
                        if limiter.admit(&subjects, cost, 100 * S).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    }

    #[test]
    fn idle_subjects_are_evicted_and_behave_as_fresh() {
        let limiter = MemoryLimiter::new();
        let limits = LimitSet {
            rpm: Some(60),
            ..LimitSet::default()
        };
        for u in 0..100 {
            let s = Subject::KeyUser("k".into(), format!("{u}").into());
            limiter
                .admit(
                    &[(s, limits)],
                    Cost {
                        requests: 1,
                        tokens: 0,
                    },
                    10 * S,
                )
                .expect("fits");
        }
        assert_eq!(limiter.len(), 100);
        assert_eq!(
            limiter.evict_idle(10 * S + S / 2),
            0,
            "buckets still refilling"
        );
        assert_eq!(limiter.evict_idle(11 * S), 100);
        assert!(limiter.is_empty());
    }

    #[test]
    fn a_refused_request_leaves_every_subject_untouched() {
        let limiter = MemoryLimiter::new();
        let (a, b) = (Subject::Key("a".into()), Subject::Team("t".into()));
        let roomy = LimitSet {
            rpm: Some(100),
            ..LimitSet::default()
        };
        let tight = LimitSet {
            rpm: Some(1),
            ..LimitSet::default()
        };
        let cost = Cost {
            requests: 1,
            tokens: 0,
        };
        limiter
            .admit(&[(a.clone(), roomy), (b.clone(), tight)], cost, S)
            .expect("fits");
        let r = limiter
            .admit(&[(a.clone(), roomy), (b.clone(), tight)], cost, S)
            .expect_err("team is full");
        assert_eq!(r.subject, 1);
        // Key `a` alone still has 99 of its 100.
        let g = limiter.admit(&[(a, roomy)], cost, S).expect("fits");
        assert_eq!(g.requests.map(|r| r.remaining), Some(98));
    }
}
