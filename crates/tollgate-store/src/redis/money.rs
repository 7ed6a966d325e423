//! Budgets' spend and accounts' funds in Redis, shared by every replica:
//! one script call to reserve a request's estimated cost on all its budgets
//! and its account (or on none), one to settle it.
//!
//! Redis holds the live counts; the database stays the truth. A count Redis
//! does not have (first use, expiry, a Redis that restarted empty) is
//! reported as [`Reserve::Unknown`], and the caller seeds it from the ledger
//! and retries. Seeding never overwrites: a replica that starts late cannot
//! reset what the others counted.
//!
//! **Placement for Redis Cluster**: money keys share the hash tag `{money}`,
//! because one budget (the org's, a team's) spans every key and one account
//! spans its keys and teams: a request's budgets and account must sit in one
//! slot to be decided atomically. Money decisions therefore go to one shard.

use super::RedisConn;
use crate::Error;
use crate::book::{BudgetCharge, MoneyAlert, MoneyRefusal, Remaining};
use crate::shared::RedisHealth;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::money::{Micros, Window};

const MONEY: &str = concat!(include_str!("reserve.lua"), include_str!("money.lua"));

/// A lifetime budget's count is forgotten after this long idle (and summed
/// from the ledger again if the budget is used after that).
const LIFETIME_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// What a reservation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Decided: reserved everywhere, or refused (and nothing changed).
    Done(Result<Remaining, MoneyRefusal>),
    /// Redis does not know these counts yet: seed them and ask again.
    Unknown(Vec<Unknown>),
}

/// A count Redis does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// The spend of the budget at this index of the request's budgets.
    Budget(usize),
    /// The account's funds.
    Account,
}

/// Money counts in Redis.
#[derive(Clone)]
pub struct RedisMoney {
    conn: RedisConn,
    script: redis::Script,
    prefix: String,
    health: Option<Arc<RedisHealth>>,
}

impl std::fmt::Debug for RedisMoney {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMoney")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn ms(ns: u64) -> i64 {
    (ns / 1_000_000) as i64
}

/// How long a budget's count may sit idle: past its window's end (plus a
/// day, so a late settlement still finds it).
fn budget_ttl_ms(window: Window, now_ns: u64) -> i64 {
    let ttl = window.end(now_ns).map_or(LIFETIME_TTL, |end| {
        Duration::from_nanos(end.saturating_sub(now_ns)) + Duration::from_secs(24 * 3600)
    });
    ttl.as_millis() as i64
}

impl RedisMoney {
    pub(crate) fn new(conn: RedisConn, prefix: &str) -> Self {
        Self {
            conn,
            script: redis::Script::new(MONEY),
            prefix: prefix.to_owned(),
            health: None,
        }
    }

    /// Shares what the limiter's heartbeat knows of Redis: while it is
    /// down, money calls fail at once instead of waiting on a connection.
    pub fn with_health(mut self, health: Arc<RedisHealth>) -> Self {
        self.health = Some(health);
        self
    }

    fn budget_key(&self, scope: &str, window: Window) -> String {
        budget_key(&self.prefix, scope, window)
    }

    fn account_key(&self, account: &str) -> String {
        account_key(&self.prefix, account)
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, Error> {
        if self.health.as_ref().is_some_and(|h| !h.is_up()) {
            return Err(Error::RedisDown);
        }
        let started = std::time::Instant::now();
        let reply = invocation.invoke_async(&mut self.conn.clone()).await;
        metrics::histogram!("tollgate_redis_seconds", "op" => op).record(started.elapsed());
        reply.map_err(|e| {
            metrics::counter!("tollgate_redis_errors_total").increment(1);
            let e = Error::Redis(e);
            if let Some(h) = &self.health {
                h.mark_down(&e);
            }
            e
        })
    }

    /// Reserves the charge's amount on every budget and the account, or
    /// on none.
    pub async fn reserve(&self, charge: MoneyCharge<'_>) -> Result<Reserve, Error> {
        let mut call = self.script.prepare_invoke();
        call.arg("reserve");
        charge.add_to(&mut call, &self.prefix);
        let v: Vec<i64> = self.call("money_reserve", call).await?;
        match v.split_first() {
            Some((0, left)) => left_of(left)
                .map(|r| Reserve::Done(Ok(r)))
                .ok_or_else(|| Error::Redis(unexpected(&v))),
            _ => charge.refusal(&v),
        }
    }

    /// Replaces a reservation of `reserved` with the real cost `actual`;
    /// returns what is left and the thresholds crossed.
    pub async fn settle(
        &self,
        budgets: &[BudgetCharge],
        account: Option<&Arc<str>>,
        reserved: Micros,
        actual: Micros,
        now_ns: u64,
    ) -> Result<(Remaining, Vec<MoneyAlert>), Error> {
        let mut call = self.script.prepare_invoke();
        for b in budgets {
            call.key(self.budget_key(&b.scope, b.budget.window));
        }
        if let Some(a) = account {
            call.key(self.account_key(a));
        }
        call.arg("settle")
            .arg(reserved)
            .arg(actual)
            .arg(u8::from(account.is_some()));
        for b in budgets {
            let w = b.budget.window;
            call.arg(b.budget.cap)
                .arg(ms(w.start(now_ns)))
                .arg(budget_ttl_ms(w, now_ns))
                .arg(b.budget.alert_percent.map_or(-1, i64::from));
        }
        let v: Vec<i64> = self.call("money_settle", call).await?;
        if v.len() < 7 || v.len().is_multiple_of(2) {
            return Err(Error::Redis(unexpected(&v)));
        }
        let remaining = Remaining {
            budget: (v[0] == 1).then_some(v[1]),
            credits: (v[2] == 1).then_some(v[3]),
        };
        let mut alerts = Vec::new();
        for pair in v[7..].chunks_exact(2) {
            let Some(b) = usize::try_from(pair[0] - 1)
                .ok()
                .and_then(|i| budgets.get(i))
            else {
                continue;
            };
            alerts.push(MoneyAlert::BudgetThreshold {
                scope: b.scope.clone(),
                window: b.budget.window,
                cap: b.budget.cap,
                spent: pair[1],
                percent: b.budget.alert_percent.unwrap_or(100),
            });
        }
        if let (1, Some(a)) = (v[4], account) {
            alerts.push(MoneyAlert::LowBalance {
                account: a.clone(),
                balance: v[5],
                threshold: v[6],
            });
        }
        Ok((remaining, alerts))
    }

    /// Sets the spend of `scope` in the window holding `now_ns`, unless
    /// Redis already counts it.
    pub async fn seed_budget(
        &self,
        scope: &str,
        window: Window,
        spent: Micros,
        now_ns: u64,
    ) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.budget_key(scope, window))
            .arg("seed_budget")
            .arg(ms(window.start(now_ns)))
            .arg(spent)
            .arg(budget_ttl_ms(window, now_ns));
        self.call::<i64>("money_seed", call).await.map(drop)
    }

    /// Sets an account's funds as the database has them (`balance` with
    /// every credit entry up to `last_entry`), unless Redis already has it.
    pub async fn seed_account(
        &self,
        account: &str,
        balance: Micros,
        low_balance: Option<Micros>,
        last_entry: i64,
    ) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.account_key(account))
            .arg("seed_account")
            .arg(balance)
            .arg(low_balance.unwrap_or(-1))
            .arg(last_entry);
        self.call::<i64>("money_seed", call).await.map(drop)
    }

    /// Adds credit entry `entry` (once, whichever replica sees it first).
    pub async fn credit(&self, account: &str, entry: i64, amount: Micros) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.account_key(account))
            .arg("credit")
            .arg(entry)
            .arg(amount);
        self.call::<i64>("money_credit", call).await.map(drop)
    }

    /// Changes an account's low-balance mark.
    pub async fn set_low_balance(&self, account: &str, low: Option<Micros>) -> Result<(), Error> {
        let mut call = self.script.prepare_invoke();
        call.key(self.account_key(account))
            .arg("set_low")
            .arg(low.unwrap_or(-1));
        self.call::<i64>("money_credit", call).await.map(drop)
    }

    async fn read(&self, key: String, start_ms: i64) -> Result<Option<(Micros, Micros)>, Error> {
        let mut call = self.script.prepare_invoke();
        call.key(key).arg("read").arg(start_ms);
        let v: Vec<i64> = self.call("money_read", call).await?;
        match v.as_slice() {
            [0, ..] => Ok(None),
            [1, a, b] => Ok(Some((*a, *b))),
            _ => Err(Error::Redis(unexpected(&v))),
        }
    }

    /// A budget scope's (spent, reserved) in its current window, if known.
    pub async fn spend(
        &self,
        scope: &str,
        window: Window,
        now_ns: u64,
    ) -> Result<Option<(Micros, Micros)>, Error> {
        self.read(self.budget_key(scope, window), ms(window.start(now_ns)))
            .await
    }

    /// An account's (balance, held), if known.
    pub async fn funds(&self, account: &str) -> Result<Option<(Micros, Micros)>, Error> {
        self.read(self.account_key(account), 0).await
    }
}

fn budget_key(prefix: &str, scope: &str, window: Window) -> String {
    format!("{prefix}:{{money}}:b:{}:{scope}", window.as_str())
}

fn account_key(prefix: &str, account: &str) -> String {
    format!("{prefix}:{{money}}:a:{account}")
}

/// What one request would reserve: its estimated cost on its budgets and
/// account. Decided on its own ([`RedisMoney::reserve`]) or inside the
/// admission call ([`super::RedisLimiter::admit`]).
#[derive(Debug, Clone, Copy)]
pub struct MoneyCharge<'a> {
    /// The budgets it counts against.
    pub budgets: &'a [BudgetCharge],
    /// The account it draws on.
    pub account: Option<&'a Arc<str>>,
    /// The estimate, micro-USD.
    pub amount: Micros,
    /// Now, on the gateway's clock: which window each budget is in.
    pub now_ns: u64,
}

impl MoneyCharge<'_> {
    /// Appends the charge's keys and arguments (see `money_args` in
    /// reserve.lua).
    pub(crate) fn add_to(&self, call: &mut redis::ScriptInvocation<'_>, prefix: &str) {
        for b in self.budgets {
            call.key(budget_key(prefix, &b.scope, b.budget.window));
        }
        if let Some(a) = self.account {
            call.key(account_key(prefix, a));
        }
        call.arg(self.amount)
            .arg(u8::from(self.account.is_some()))
            .arg(self.budgets.len());
        for b in self.budgets {
            let w = b.budget.window;
            call.arg(b.budget.cap)
                .arg(ms(w.start(self.now_ns)))
                .arg(budget_ttl_ms(w, self.now_ns));
        }
    }

    /// A refusal of `money_check` (1: unknown counts, 2: a budget, 3: the
    /// account) as a [`Reserve`].
    pub(crate) fn refusal(&self, v: &[i64]) -> Result<Reserve, Error> {
        let bad = || Error::Redis(unexpected(v));
        let index = |n: i64| usize::try_from(n - 1).map_err(|_| bad());
        let now_ns = self.now_ns;
        Ok(match v.first() {
            Some(1) => Reserve::Unknown(
                v[1..]
                    .iter()
                    .map(|&i| {
                        let i = index(i)?;
                        Ok(if i < self.budgets.len() {
                            Unknown::Budget(i)
                        } else {
                            Unknown::Account
                        })
                    })
                    .collect::<Result<_, Error>>()?,
            ),
            Some(2) if v.len() == 3 => {
                let b = self.budgets.get(index(v[1])?).ok_or_else(bad)?;
                let w = b.budget.window;
                Reserve::Done(Err(MoneyRefusal::Budget {
                    scope: b.scope.clone(),
                    window: w,
                    cap: b.budget.cap,
                    spent: v[2],
                    requested: self.amount,
                    resets_at: w.end(now_ns),
                    resets_in: w
                        .end(now_ns)
                        .map(|end| Duration::from_nanos(end.saturating_sub(now_ns))),
                }))
            }
            Some(3) if v.len() == 3 => Reserve::Done(Err(MoneyRefusal::Credits {
                account: self.account.cloned().ok_or_else(bad)?,
                balance: v[1],
                held: v[2],
                requested: self.amount,
            })),
            _ => return Err(bad()),
        })
    }
}

/// `{has budget, budget left, has credits, credits left}` as [`Remaining`].
pub(crate) fn left_of(v: &[i64]) -> Option<Remaining> {
    match v {
        [has_budget, budget, has_credits, credits] => Some(Remaining {
            budget: (*has_budget == 1).then_some(*budget),
            credits: (*has_credits == 1).then_some(*credits),
        }),
        _ => None,
    }
}

fn unexpected(reply: &[i64]) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "the money script answered an unexpected shape",
        format!("{reply:?}"),
    ))
}
