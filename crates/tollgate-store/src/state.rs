//! Where limit state lives: in this process, or in Redis shared by every
//! replica. One type with the same calls either way, so the gateway does
//! not know which it runs on.

use crate::Error;
use crate::limiter::MemoryLimiter;
use crate::redis::{Decision, RedisLimiter};
use std::sync::Arc;
use tollgate_core::clock::Clock;
use tollgate_core::limits::{Cost, LimitSet, Subject};

/// Limit state, embedded or distributed.
pub enum LimitStore {
    /// In process memory, on the gateway's clock.
    Memory(MemoryLimiter, Arc<dyn Clock>),
    /// In Redis, on Redis's clock.
    Redis(RedisLimiter),
}

impl std::fmt::Debug for LimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitStore::Memory(limiter, _) => f.debug_tuple("Memory").field(limiter).finish(),
            LimitStore::Redis(redis) => f.debug_tuple("Redis").field(redis).finish(),
        }
    }
}

impl LimitStore {
    /// Charges `cost` on every limit of every subject, or on none.
    /// `placement` keeps a request's state together in Redis Cluster: the
    /// key's team when it has one, else the key's id.
    pub async fn admit(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
    ) -> Result<Decision, Error> {
        match self {
            LimitStore::Memory(limiter, clock) => {
                let at = clock.now_ns();
                Ok(Decision {
                    result: limiter.admit(subjects, cost, at),
                    at,
                })
            }
            LimitStore::Redis(redis) => redis.admit(placement, subjects, cost).await,
        }
    }

    /// [`LimitStore::reconcile`] without waiting: at once in memory, on a
    /// task for Redis (a failure is logged; the bucket then stays charged
    /// with the estimate, the conservative side).
    pub fn reconcile_detached(
        &self,
        placement: Arc<str>,
        subjects: Vec<(Subject, LimitSet)>,
        delta: i64,
        admitted_at: u64,
    ) {
        match self {
            LimitStore::Memory(limiter, clock) => {
                limiter.reconcile(&subjects, delta, admitted_at, clock.now_ns());
            }
            LimitStore::Redis(redis) => {
                let redis = redis.clone();
                tokio::spawn(async move {
                    if let Err(e) = redis
                        .reconcile(&placement, &subjects, delta, admitted_at)
                        .await
                    {
                        tracing::warn!(error = %e, delta, "could not reconcile a request's tokens in Redis");
                    }
                });
            }
        }
    }

    /// Where the state lives, and whether it answers: `"memory"`, or
    /// `"redis"` with Redis's answer to a PING.
    pub async fn check(&self) -> (&'static str, Result<(), Error>) {
        match self {
            LimitStore::Memory(..) => ("memory", Ok(())),
            LimitStore::Redis(redis) => ("redis", redis.ping().await),
        }
    }

    /// Subjects tracked in this process (Redis expires its own: 0).
    pub fn tracked(&self) -> usize {
        match self {
            LimitStore::Memory(limiter, _) => limiter.len(),
            LimitStore::Redis(_) => 0,
        }
    }

    /// Forgets idle in-process state; returns how many subjects went.
    pub fn evict_idle(&self, now: u64) -> usize {
        match self {
            LimitStore::Memory(limiter, _) => limiter.evict_idle(now),
            LimitStore::Redis(_) => 0,
        }
    }

    /// Corrects the token charge of a request admitted at `admitted_at` by
    /// `delta` tokens (real minus estimated).
    pub async fn reconcile(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        delta: i64,
        admitted_at: u64,
    ) -> Result<(), Error> {
        match self {
            LimitStore::Memory(limiter, clock) => {
                limiter.reconcile(subjects, delta, admitted_at, clock.now_ns());
                Ok(())
            }
            LimitStore::Redis(redis) => {
                redis
                    .reconcile(placement, subjects, delta, admitted_at)
                    .await
            }
        }
    }
}
