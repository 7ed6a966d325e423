//! Admission: which limits apply to a request, charging them all at once,
//! queueing when the caller asked to wait, and correcting the charge with
//! the real usage afterwards.
//!
//! A key's limits are resolved once, when the key table is loaded
//! ([`KeyPolicy`]); a request then only picks the subjects it touches (the
//! key, the key on this model, the key's end user, the key's team) and asks
//! the limiter for one decision over all of them.

use crate::config::Config;
use crate::error::Error;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tollgate_core::clock::Clock;
use tollgate_core::limits::{Cost, Grant, LimitSet, Refusal, Subject};
use tollgate_store::book::Remaining;
use tollgate_store::redis::{Admitted, MoneyCharge, Reserve, Stamp};
use tollgate_store::shared::SharedLimiter;
use tollgate_store::{KeyRecord, LimitStore};

/// A key's limits with its preset and team resolved.
#[derive(Debug, Clone, Default)]
pub struct KeyPolicy {
    /// The key's own limits (preset, then the key's settings).
    pub own: LimitSet,
    /// Limits per model (foldhash, seeded per process: looked up on every
    /// request of a key that has any).
    pub models: HashMap<String, LimitSet, foldhash::fast::RandomState>,
    /// Limits of each end user of the key.
    pub users: LimitSet,
    /// The key's team and its limits.
    pub team: Option<(Arc<str>, LimitSet)>,
    /// How long the key's requests may queue by default.
    pub max_wait: Option<Duration>,
    /// Whether any of these counts tokens (else estimates are skipped).
    pub counts_tokens: bool,
}

impl KeyPolicy {
    /// Resolves `key`'s preset and team against `config`. A preset or team
    /// the config does not define contributes nothing (and is logged).
    pub fn resolve(key: &KeyRecord, config: &Config) -> Self {
        let preset = key.preset.as_deref().and_then(|p| {
            let found = config.presets.get(p);
            if found.is_none() {
                tracing::warn!(key = %key.name, preset = p, "the key's preset is not in the config; ignoring it");
            }
            found
        });
        let limits = preset.map_or_else(|| key.limits.clone(), |p| p.overlaid(&key.limits));
        let team = key.team.as_deref().map(|t| {
            let found = config.teams.get(t).map(crate::config::TeamConfig::limits);
            if found.is_none() {
                tracing::warn!(key = %key.name, team = t, "the key's team is not in the config; it has no team limits");
            }
            (Arc::<str>::from(t), found.unwrap_or_default())
        });
        let users = config
            .limits
            .users
            .unwrap_or_default()
            .overlaid(&limits.users.unwrap_or_default());
        let models: HashMap<_, _, _> = limits.models.clone().into_iter().collect();
        let counts_tokens = limits.own().counts_tokens()
            || users.counts_tokens()
            || models.values().any(LimitSet::counts_tokens)
            || team.as_ref().is_some_and(|(_, l)| l.counts_tokens());
        Self {
            own: limits.own(),
            models,
            users,
            team,
            max_wait: limits.max_wait,
            counts_tokens,
        }
    }
}

/// Checks that a preset and team a key names exist in `config`.
pub fn check_names(
    config: &Config,
    preset: Option<&str>,
    team: Option<&str>,
) -> Result<(), String> {
    if let Some(p) = preset.filter(|p| !config.presets.contains_key(*p)) {
        let known: Vec<&str> = config.presets.keys().map(String::as_str).collect();
        return Err(format!(
            "no preset named `{p}` in the config (presets: {known:?})"
        ));
    }
    if let Some(t) = team.filter(|t| !config.teams.contains_key(*t)) {
        let known: Vec<&str> = config.teams.keys().map(String::as_str).collect();
        return Err(format!(
            "no team named `{t}` in the config (teams: {known:?})"
        ));
    }
    Ok(())
}

/// The subjects one request is checked against, with their limits.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    entries: Vec<(Subject, LimitSet)>,
    /// Where their state lives together in a Redis Cluster: the key's team
    /// when it has one, else the key.
    placement: Arc<str>,
}

impl Plan {
    /// The subjects of a request by key `key_id` for `model`, by `user` if named.
    pub fn new(
        key_id: &Arc<str>,
        policy: &KeyPolicy,
        model: &Arc<str>,
        user: Option<&str>,
    ) -> Self {
        let mut entries = Vec::with_capacity(4);
        if !policy.own.is_empty() {
            entries.push((Subject::Key(key_id.clone()), policy.own));
        }
        if let Some(l) = policy.models.get(&**model).filter(|l| !l.is_empty()) {
            entries.push((Subject::KeyModel(key_id.clone(), model.clone()), *l));
        }
        if let Some(u) = user.filter(|_| !policy.users.is_empty()) {
            entries.push((Subject::KeyUser(key_id.clone(), u.into()), policy.users));
        }
        if let Some((team, l)) = policy.team.as_ref().filter(|(_, l)| !l.is_empty()) {
            entries.push((Subject::Team(team.clone()), *l));
        }
        let placement = match &policy.team {
            Some((team, _)) => team.clone(),
            None => key_id.clone(),
        };
        Self { entries, placement }
    }

    /// No limit applies.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a limit counts tokens (only those are reconciled).
    pub fn counts_tokens(&self) -> bool {
        self.entries.iter().any(|(_, l)| l.counts_tokens())
    }

    /// The kind of subject `index` is, as metrics label it.
    pub fn kind(&self, index: usize) -> &'static str {
        match self.entries.get(index).map(|(s, _)| s) {
            Some(Subject::Key(_)) | None => "key",
            Some(Subject::KeyModel(..)) => "key_model",
            Some(Subject::KeyUser(..)) => "key_user",
            Some(Subject::Team(_)) => "team",
        }
    }

    /// `key:NAME`, `key:NAME/model:M`, `key:NAME/user:U` or `team:T`: the
    /// scope a refusal names.
    pub fn scope(&self, index: usize, key_name: &str) -> String {
        match self.entries.get(index).map(|(s, _)| s) {
            Some(Subject::Key(_)) | None => format!("key:{key_name}"),
            Some(Subject::KeyModel(_, m)) => format!("key:{key_name}/model:{m}"),
            Some(Subject::KeyUser(_, u)) => format!("key:{key_name}/user:{u}"),
            Some(Subject::Team(t)) => format!("team:{t}"),
        }
    }
}

/// A refused request, with what the client needs to hear about it.
#[derive(Debug, Clone)]
pub struct RateLimited {
    /// The decision.
    pub refusal: Refusal,
    /// The scope that refused (`key:prod-web`).
    pub scope: String,
}

/// One decision: the limits' answer, where it was made, and what a money
/// charge decided with it has left.
type Decided = (Result<Grant, Refusal>, Stamp, Option<Remaining>);

/// Every limit decision of the gateway.
pub struct Limits {
    store: Arc<LimitStore>,
    clock: Arc<dyn Clock>,
    max_queue_wait: Duration,
    /// One FIFO per key: a queued request holds its key's turn while it
    /// waits, so a key's backlog is served in order and never blocks others.
    queues: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// An admitted request's charge, to be corrected once its usage is known.
#[derive(Debug)]
pub struct Admission {
    limits: Arc<Limits>,
    plan: Plan,
    /// Tokens charged at admission.
    pub estimate: u64,
    stamp: Stamp,
    /// The tightest limits after the charge, for the response headers.
    pub grant: Grant,
    /// How long the request queued.
    pub waited: Duration,
    /// With a money charge decided in the same call: what its budgets and
    /// account have left.
    pub money: Option<Remaining>,
}

impl Admission {
    /// Replaces the estimate with the real token count on every limit
    /// (in the background when the state is remote: the answer is not held
    /// up for it).
    pub fn settle(self, actual_tokens: u64) {
        let delta = actual_tokens as i64 - self.estimate as i64;
        if delta != 0 && self.plan.counts_tokens() {
            self.limits.store.reconcile_detached(
                self.plan.placement.clone(),
                self.plan.entries.clone(),
                delta,
                self.stamp,
            );
        }
    }
}

impl Limits {
    /// Limits kept in `store`; `clock` times queues and evictions.
    pub fn new(store: LimitStore, clock: Arc<dyn Clock>, config: &Config) -> Self {
        Self {
            store: Arc::new(store),
            clock,
            max_queue_wait: config.limits.max_queue_wait,
            queues: Mutex::default(),
        }
    }

    /// The clock decisions are made on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Where limit state lives and whether it answers (for `/readyz`).
    pub async fn check_store(&self) -> (&'static str, bool) {
        let (backend, answer) = self.store.check().await;
        (backend, answer.is_ok())
    }

    /// The shared limiter, when limits are in Redis.
    pub fn shared(&self) -> Option<&Arc<SharedLimiter>> {
        self.store.shared()
    }

    /// Subjects with live state in this process (Redis keeps its own).
    pub fn tracked(&self) -> usize {
        self.store.tracked()
    }

    /// Drops idle state; returns how many subjects went.
    pub fn evict_idle(&self) -> usize {
        let dropped = self.store.evict_idle(self.clock.now_ns());
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, q| Arc::strong_count(q) > 1);
        dropped
    }

    /// Whether a request's money charge goes into its admission call
    /// (limits and money in one Redis): then [`Limits::admit`] takes it.
    pub fn decides_money(&self) -> bool {
        self.store.decides_money()
    }

    async fn decide(
        &self,
        plan: &Plan,
        cost: Cost,
        money: Option<MoneyCharge<'_>>,
    ) -> Result<Decided, Error> {
        let admitted = self
            .store
            .admit(&plan.placement, &plan.entries, cost, money)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "shared state unavailable; refusing (fail closed)");
                if money.is_some() {
                    Error::MoneyUnavailable
                } else {
                    Error::LimitsUnavailable
                }
            })?;
        match admitted {
            Admitted::Decided(d) => Ok((d.result, d.stamp(), d.money)),
            Admitted::Money(Reserve::Done(Err(refusal))) => Err(Error::Money(Box::new(refusal))),
            Admitted::Money(Reserve::Unknown(unknown)) => Err(Error::MoneyUnseeded(unknown)),
            Admitted::Money(Reserve::Done(Ok(_))) => Err(Error::Internal(
                "a money charge was reserved without a limit decision".into(),
            )),
        }
    }

    /// Charges `cost` on every limit of `plan`. With a `max_wait`, a request
    /// refused by a rolling limit waits in its key's queue until it fits,
    /// if it can within that time; otherwise, and for daily caps and
    /// requests that can never fit, it is refused at once. A `money` charge
    /// (where [`Limits::decides_money`]) is decided first in each call and
    /// reserved only with an admission.
    pub async fn admit(
        self: &Arc<Self>,
        plan: Plan,
        cost: Cost,
        key_id: &Arc<str>,
        key_name: &str,
        max_wait: Option<Duration>,
        money: Option<MoneyCharge<'_>>,
    ) -> Result<Admission, Error> {
        let outcome = if plan.is_empty() && money.is_none() {
            let stamp = Stamp {
                at: self.clock.now_ns(),
                local: true,
            };
            Ok((Grant::default(), stamp, None, Duration::ZERO))
        } else {
            match self.decide(&plan, cost, money).await? {
                (Ok(grant), stamp, left) => Ok((grant, stamp, left, Duration::ZERO)),
                (Err(refusal), _, _) => {
                    let started = tokio::time::Instant::now();
                    let budget = max_wait.unwrap_or_default().min(self.max_queue_wait);
                    self.queue(&plan, cost, money, key_id, refusal, budget)
                        .await?
                        .map(|(grant, stamp, left)| (grant, stamp, left, started.elapsed()))
                }
            }
        };
        match outcome {
            Ok((grant, stamp, left, waited)) => {
                crate::metrics::admitted(&plan, &grant, waited);
                Ok(Admission {
                    limits: self.clone(),
                    plan,
                    estimate: cost.tokens,
                    stamp,
                    grant,
                    waited,
                    money: left,
                })
            }
            Err(refusal) => Err(Error::RateLimited(Box::new(RateLimited {
                scope: plan.scope(refusal.subject, key_name),
                refusal,
            }))),
        }
    }

    /// Waits in the key's queue for as long as the limiter says this request
    /// needs, re-deciding after each wait, within `budget`. A refusal that
    /// waiting cannot cure within the budget is returned at once.
    async fn queue(
        &self,
        plan: &Plan,
        cost: Cost,
        money: Option<MoneyCharge<'_>>,
        key_id: &Arc<str>,
        mut refusal: Refusal,
        budget: Duration,
    ) -> Result<Result<(Grant, Stamp, Option<Remaining>), Refusal>, Error> {
        let curable = |r: &Refusal, left: Duration| {
            r.should_retry() && r.retry_after().is_some_and(|w| w <= left)
        };
        if !curable(&refusal, budget) {
            return Ok(Err(refusal));
        }
        let deadline = tokio::time::Instant::now() + budget;
        let _waiting = crate::metrics::QueuedRequest::enter();
        let queue = self
            .queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key_id.clone())
            .or_default()
            .clone();
        // Holding the key's turn keeps its waiting requests in arrival order.
        let _turn = tokio::time::timeout_at(deadline, queue.lock()).await;
        loop {
            match self.decide(plan, cost, money).await? {
                (Ok(grant), stamp, left) => return Ok(Ok((grant, stamp, left))),
                (Err(r), _, _) => refusal = r,
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !curable(&refusal, left) {
                return Ok(Err(refusal));
            }
            if let Some(wait) = refusal.retry_after() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}
