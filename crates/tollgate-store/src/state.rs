//! Where limit and money state lives: in this process, or in Redis shared
//! by every replica. One type each with the same calls either way, so the
//! gateway does not know which it runs on.

use crate::Error;
use crate::book::{BudgetCharge, MoneyAlert, MoneyBook, Remaining};
use crate::limiter::MemoryLimiter;
use crate::redis::{Admitted, Decision, MoneyCharge, RedisMoney, Reserve, Stamp};
use crate::shared::SharedLimiter;
use std::sync::Arc;
use tollgate_core::clock::Clock;
use tollgate_core::limits::{Cost, LimitSet, Subject};
use tollgate_core::money::{Micros, Window};

/// Limit state, embedded or distributed.
pub enum LimitStore {
    /// In process memory, on the gateway's clock.
    Memory(MemoryLimiter, Arc<dyn Clock>),
    /// In Redis, on Redis's clock (with this replica's fallback).
    Redis(Arc<SharedLimiter>),
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
    /// `money` is decided in the same call; only where
    /// [`LimitStore::decides_money`] (the memory store leaves money to the
    /// money book).
    pub async fn admit(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
        money: Option<MoneyCharge<'_>>,
    ) -> Result<Admitted, Error> {
        match self {
            LimitStore::Memory(limiter, clock) => {
                let at = clock.now_ns();
                Ok(Admitted::Decided(Decision {
                    result: limiter.admit(subjects, cost, at),
                    at,
                    local: true,
                    money: None,
                }))
            }
            LimitStore::Redis(shared) => shared.admit(placement, subjects, cost, money).await,
        }
    }

    /// Whether a request's money charge is decided in its admission call.
    pub fn decides_money(&self) -> bool {
        match self {
            LimitStore::Memory(..) => false,
            LimitStore::Redis(shared) => shared.decides_money(),
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
        stamp: Stamp,
    ) {
        match self {
            LimitStore::Memory(limiter, clock) => {
                limiter.reconcile(&subjects, delta, stamp.at, clock.now_ns());
            }
            LimitStore::Redis(shared) => {
                let task = shared.clone();
                shared.spawn_detached(async move {
                    if let Err(e) = task.reconcile(&placement, &subjects, delta, stamp).await {
                        tracing::warn!(error = %e, delta, "could not reconcile a request's tokens in Redis");
                    }
                });
            }
        }
    }

    /// Where the state lives, and whether it answers: `"memory"`, or
    /// `"redis"` and whether Redis answered last time.
    pub async fn check(&self) -> (&'static str, Result<(), Error>) {
        match self {
            LimitStore::Memory(..) => ("memory", Ok(())),
            // As the last heartbeat (at most a second ago) or decision found
            // it: what decisions go by, and no wait on a Redis that is gone.
            LimitStore::Redis(shared) if shared.health().is_up() => ("redis", Ok(())),
            LimitStore::Redis(_) => ("redis", Err(Error::RedisDown)),
        }
    }

    /// The shared limiter, when limits are in Redis.
    pub fn shared(&self) -> Option<&Arc<SharedLimiter>> {
        match self {
            LimitStore::Memory(..) => None,
            LimitStore::Redis(shared) => Some(shared),
        }
    }

    /// Subjects tracked in this process (Redis expires its own; a
    /// replica's fallback tracks what it decided alone).
    pub fn tracked(&self) -> usize {
        match self {
            LimitStore::Memory(limiter, _) => limiter.len(),
            LimitStore::Redis(shared) => shared.fallback().len(),
        }
    }

    /// Forgets idle in-process state; returns how many subjects went.
    pub fn evict_idle(&self, now: u64) -> usize {
        match self {
            LimitStore::Memory(limiter, _) => limiter.evict_idle(now),
            LimitStore::Redis(shared) => shared.fallback().evict_idle(now),
        }
    }

    /// Corrects the token charge of a request by `delta` tokens (real
    /// minus estimated) where its [`Decision`] was made.
    pub async fn reconcile(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        delta: i64,
        stamp: Stamp,
    ) -> Result<(), Error> {
        match self {
            LimitStore::Memory(limiter, clock) => {
                limiter.reconcile(subjects, delta, stamp.at, clock.now_ns());
                Ok(())
            }
            LimitStore::Redis(shared) => shared.reconcile(placement, subjects, delta, stamp).await,
        }
    }
}

/// Budgets' spend and accounts' funds, embedded or distributed. Either way
/// the database is the truth they are seeded from, and the ledger makes
/// every settlement durable behind them.
#[derive(Debug)]
pub enum MoneyStore {
    /// In process memory.
    Memory(MoneyBook),
    /// In Redis, shared by every replica.
    Redis(RedisMoney),
}

impl MoneyStore {
    /// Reserves the charge's amount on every budget and the account, or
    /// on none.
    pub async fn reserve(&self, charge: MoneyCharge<'_>) -> Result<Reserve, Error> {
        match self {
            MoneyStore::Memory(book) => Ok(Reserve::Done(book.reserve(
                charge.budgets,
                charge.account,
                charge.amount,
                charge.now_ns,
            ))),
            MoneyStore::Redis(redis) => redis.reserve(charge).await,
        }
    }

    /// Replaces a reservation with the real cost; what is left, and the
    /// thresholds crossed.
    pub async fn settle(
        &self,
        budgets: &[BudgetCharge],
        account: Option<&Arc<str>>,
        reserved: Micros,
        actual: Micros,
        now_ns: u64,
    ) -> Result<(Remaining, Vec<MoneyAlert>), Error> {
        match self {
            MoneyStore::Memory(book) => Ok(book.settle(budgets, account, reserved, actual, now_ns)),
            MoneyStore::Redis(redis) => {
                redis
                    .settle(budgets, account, reserved, actual, now_ns)
                    .await
            }
        }
    }

    /// Forgets in-process budget counts whose window has ended (Redis
    /// expires its own); returns how many went.
    pub fn forget_ended(&self, now_ns: u64) -> usize {
        match self {
            MoneyStore::Memory(book) => book.forget_ended(now_ns),
            MoneyStore::Redis(_) => 0,
        }
    }

    /// Sets a budget scope's spend as the ledger sums it. In memory this
    /// replaces the count; in Redis only an unknown count is set, so a
    /// replica that starts late cannot reset what the others counted.
    pub async fn seed_budget(
        &self,
        scope: &str,
        window: Window,
        spent: Micros,
        now_ns: u64,
    ) -> Result<(), Error> {
        match self {
            MoneyStore::Memory(book) => {
                book.set_spend(scope, window, spent, now_ns);
                Ok(())
            }
            MoneyStore::Redis(redis) => redis.seed_budget(scope, window, spent, now_ns).await,
        }
    }

    /// Sets an account's funds as the database has them (every credit
    /// entry up to `last_entry` included); in Redis, only if unknown.
    pub async fn seed_account(
        &self,
        account: &str,
        balance: Micros,
        low_balance: Option<Micros>,
        last_entry: i64,
    ) -> Result<(), Error> {
        match self {
            MoneyStore::Memory(book) => {
                book.set_account(account, balance, low_balance);
                Ok(())
            }
            MoneyStore::Redis(redis) => {
                redis
                    .seed_account(account, balance, low_balance, last_entry)
                    .await
            }
        }
    }

    /// Adds credit entry `entry` to an account's balance, once.
    pub async fn credit(&self, account: &str, entry: i64, amount: Micros) -> Result<(), Error> {
        match self {
            MoneyStore::Memory(book) => {
                book.credit(account, amount);
                Ok(())
            }
            MoneyStore::Redis(redis) => redis.credit(account, entry, amount).await,
        }
    }

    /// Changes an account's low-balance mark.
    pub async fn set_low_balance(&self, account: &str, low: Option<Micros>) -> Result<(), Error> {
        match self {
            MoneyStore::Memory(book) => {
                book.set_low_balance(account, low);
                Ok(())
            }
            MoneyStore::Redis(redis) => redis.set_low_balance(account, low).await,
        }
    }

    /// A budget scope's (spent, reserved) in its current window, if known.
    pub async fn spend(
        &self,
        scope: &str,
        window: Window,
        now_ns: u64,
    ) -> Result<Option<(Micros, Micros)>, Error> {
        match self {
            MoneyStore::Memory(book) => Ok(Some(book.spend(scope, window, now_ns))),
            MoneyStore::Redis(redis) => redis.spend(scope, window, now_ns).await,
        }
    }

    /// An account's (balance, held), if known.
    pub async fn funds(&self, account: &str) -> Result<Option<(Micros, Micros)>, Error> {
        match self {
            MoneyStore::Memory(book) => Ok(book.funds(account)),
            MoneyStore::Redis(redis) => redis.funds(account).await,
        }
    }
}
