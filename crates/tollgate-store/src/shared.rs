//! Limits shared through Redis, and what a replica does when Redis is gone.
//!
//! Every replica announces itself with a heartbeat, so each knows how many
//! are alive. When Redis cannot be reached, a replica either refuses what
//! it cannot check ([`OutagePolicy::FailClosed`]) or decides alone with its
//! share of every limit, the limit divided by the replicas alive when
//! Redis was last seen ([`OutagePolicy::FailOpen`]): together the replicas
//! still admit no more than one limit. While Redis is down, requests do not
//! wait on it: the heartbeat probes it and brings the replica back.
//!
//! If Redis comes back without its state (restarted empty, flushed), the
//! buckets it forgot start empty for one minute and refill at their rate,
//! instead of opening wide on top of what the replicas admitted alone.

use crate::Error;
use crate::limiter::MemoryLimiter;
use crate::redis::{Admitted, Beat, Decision, MoneyCharge, RedisLimiter, Stamp};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tollgate_core::clock::Clock;
use tollgate_core::limits::{Cost, LimitSet, Subject};

/// What a replica does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Refuse with 503 (`x-should-retry: true`): never more than a limit.
    #[default]
    FailClosed,
    /// Decide alone with this replica's share of every limit.
    FailOpen,
}

impl OutagePolicy {
    /// `fail_closed` or `fail_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "fail_closed",
            Self::FailOpen => "fail_open",
        }
    }
}

/// How often a replica announces itself while Redis is up.
const BEAT_EVERY: Duration = Duration::from_secs(1);
/// How often a replica probes Redis while it is down.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A replica silent this long no longer counts as alive.
const ALIVE_FOR: Duration = Duration::from_secs(5);
/// How long forgotten buckets start empty after Redis lost its state: the
/// longest rolling period (a minute), after which they would be full anyway.
const DRAIN_FOR: Duration = Duration::from_secs(60);

/// What this replica knows of Redis.
#[derive(Debug)]
pub struct RedisHealth {
    up: AtomicBool,
    live: AtomicU64,
    drained_until_us: AtomicU64,
    epoch: Mutex<Option<String>>,
    replica: String,
}

impl RedisHealth {
    /// Whether Redis answered last time.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Replicas alive when Redis was last seen (at least this one).
    pub fn live_replicas(&self) -> u64 {
        self.live.load(Ordering::Relaxed).max(1)
    }

    /// Whether forgotten buckets currently start empty (on Redis's clock as
    /// last seen, so only roughly).
    pub fn draining(&self) -> bool {
        self.drained_until_us.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn mark_down(&self, error: &Error) {
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!("tollgate_limit_store_available").set(0.0);
            tracing::error!(%error, "Redis is unreachable; limit state is not shared until it returns");
        }
    }

    /// Takes in a heartbeat's news.
    fn beat(&self, beat: &Beat) {
        self.live.store(beat.live, Ordering::Relaxed);
        metrics::gauge!("tollgate_live_replicas").set(beat.live as f64);
        let mut known = self.epoch.lock().unwrap_or_else(PoisonError::into_inner);
        // Seen before and now another (or just set again): Redis lost the
        // state it held. At first sight there is nothing to compare with.
        if known.as_ref().is_some_and(|k| *k != beat.epoch) {
            let until = beat.now_us + DRAIN_FOR.as_micros() as u64;
            self.drained_until_us.store(until, Ordering::Relaxed);
            tracing::warn!(
                "Redis came back without its limit state: forgotten buckets start empty and refill at their rate for {DRAIN_FOR:?}"
            );
        } else if self.drained_until_us.load(Ordering::Relaxed) <= beat.now_us {
            self.drained_until_us.store(0, Ordering::Relaxed);
        }
        *known = Some(beat.epoch.clone());
        drop(known);
        if !self.up.swap(true, Ordering::Relaxed) {
            metrics::gauge!("tollgate_limit_store_available").set(1.0);
            tracing::info!(
                live_replicas = beat.live,
                "Redis answers again; limit state is shared"
            );
        }
    }
}

/// Limits in Redis, with this replica's fallback for when it is gone.
pub struct SharedLimiter {
    redis: RedisLimiter,
    policy: OutagePolicy,
    fallback: MemoryLimiter,
    clock: Arc<dyn Clock>,
    health: Arc<RedisHealth>,
    /// The runtime that built it, which outlives the threads serving
    /// requests: where writes that land after their request run.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("redis", &self.redis)
            .field("policy", &self.policy)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

fn random_token() -> Result<String, Error> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

impl SharedLimiter {
    /// Limits in `redis`; `clock` decides alone during an outage. The
    /// first heartbeat runs here, so the replica counts from the start.
    pub async fn new(
        redis: RedisLimiter,
        policy: OutagePolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let health = Arc::new(RedisHealth {
            up: AtomicBool::new(true),
            live: AtomicU64::new(1),
            drained_until_us: AtomicU64::new(0),
            epoch: Mutex::new(None),
            replica: random_token()?,
        });
        let shared = Self {
            redis,
            policy,
            fallback: MemoryLimiter::new(),
            clock,
            health,
            runtime: tokio::runtime::Handle::current(),
        };
        let beat = shared.beat_once().await?;
        shared.health.beat(&beat);
        Ok(shared)
    }

    /// Runs `task` on the runtime that built the limiter, so that a write
    /// due after its request is done survives the request's serving thread.
    pub fn spawn_detached(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.runtime.spawn(task);
    }

    /// What this replica knows of Redis.
    pub fn health(&self) -> &Arc<RedisHealth> {
        &self.health
    }

    /// The outage policy.
    pub fn policy(&self) -> OutagePolicy {
        self.policy
    }

    /// Whether a money charge can be decided with the limits, in one call.
    pub fn decides_money(&self) -> bool {
        self.redis.decides_money()
    }

    /// The Redis limiter itself.
    pub fn redis(&self) -> &RedisLimiter {
        &self.redis
    }

    async fn beat_once(&self) -> Result<Beat, Error> {
        let token = random_token()?;
        self.redis
            .heartbeat(&self.health.replica, &token, ALIVE_FOR)
            .await
    }

    /// Announces this replica every second while Redis is up and probes
    /// it four times a second while it is down; runs until dropped.
    pub async fn run_heartbeat(self: Arc<Self>) {
        loop {
            let every = if self.health.is_up() {
                BEAT_EVERY
            } else {
                PROBE_EVERY
            };
            tokio::time::sleep(every).await;
            match self.beat_once().await {
                Ok(beat) => self.health.beat(&beat),
                Err(e) => self.health.mark_down(&e),
            }
        }
    }

    /// Charges `cost` on every limit of every subject, or on none: in
    /// Redis, else (Redis down, failing open) with this replica's share.
    /// A money charge is decided in the same call; money never fails open.
    pub async fn admit(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
        money: Option<MoneyCharge<'_>>,
    ) -> Result<Admitted, Error> {
        let charged = money.is_some();
        if self.health.is_up() {
            let drained = self.health.drained_until_us.load(Ordering::Relaxed);
            match self
                .redis
                .admit(placement, subjects, cost, drained, money)
                .await
            {
                Ok(d) => return Ok(d),
                Err(e) => self.health.mark_down(&e),
            }
        }
        match self.policy {
            _ if charged => Err(Error::RedisDown),
            OutagePolicy::FailClosed => Err(Error::RedisDown),
            OutagePolicy::FailOpen => {
                metrics::counter!("tollgate_limit_local_decisions_total").increment(1);
                let shares = shares(subjects, self.health.live_replicas());
                let at = self.clock.now_ns();
                Ok(Admitted::Decided(Decision {
                    result: self.fallback.admit(&shares, cost, at),
                    at,
                    local: true,
                    money: None,
                }))
            }
        }
    }

    /// Corrects a charge where it was made.
    pub async fn reconcile(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        delta: i64,
        stamp: Stamp,
    ) -> Result<(), Error> {
        if stamp.local {
            let shares = shares(subjects, self.health.live_replicas());
            self.fallback
                .reconcile(&shares, delta, stamp.at, self.clock.now_ns());
            return Ok(());
        }
        self.redis
            .reconcile(placement, subjects, delta, stamp.at)
            .await
    }

    /// The fallback's subjects (kept only while they matter).
    pub fn fallback(&self) -> &MemoryLimiter {
        &self.fallback
    }

    /// The clock local decisions are made on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// Each limit divided by `replicas` (rounded down, but at least 1: a limit
/// smaller than the replica count lets each replica one).
fn shares(subjects: &[(Subject, LimitSet)], replicas: u64) -> Vec<(Subject, LimitSet)> {
    let share = |l: Option<u64>| l.map(|l| (l / replicas).max(1));
    subjects
        .iter()
        .map(|(s, l)| {
            (
                s.clone(),
                LimitSet {
                    rpm: share(l.rpm),
                    tpm: share(l.tpm),
                    rpd: share(l.rpd),
                    tpd: share(l.tpd),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_divide_every_limit_and_never_reach_zero() {
        let subjects = [(
            Subject::Key(Arc::from("k")),
            LimitSet {
                rpm: Some(60),
                tpm: Some(1_000),
                rpd: Some(2),
                tpd: None,
            },
        )];
        let s = shares(&subjects, 3);
        assert_eq!(
            s[0].1,
            LimitSet {
                rpm: Some(20),
                tpm: Some(333),
                rpd: Some(1),
                tpd: None,
            }
        );
    }
}
