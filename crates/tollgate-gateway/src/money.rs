//! Money at the gate: which budgets and account a request is charged to,
//! reserving its estimated cost at admission, settling the real cost into
//! the ledger afterwards, and announcing thresholds it crosses.
//!
//! The decisions run on a [`MoneyStore`]: this process's memory, or Redis
//! shared by every replica. The database is the truth the store is seeded
//! from: read at start, polled for changes made elsewhere (CLI top-ups,
//! budgets set on another replica), summed again for a count Redis lost,
//! and written only through the group-committed [`Ledger`].

use crate::auth::Caller;
use crate::config::{Config, UnpricedModels};
use crate::error::Error;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};
use thread_local::ThreadLocal;
use tokio::sync::mpsc;
use tollgate_core::clock::Clock;
use tollgate_core::money::{
    Budget, EVERY_USER, Micros, Price, PriceTable, TokenUsage, Usd, Window,
};
use tollgate_core::tokens::Estimate;
use tollgate_store::book::{BudgetCharge, MoneyAlert, Remaining};
use tollgate_store::ledger::{Durable, HoldRow, HoldTicket};
use tollgate_store::money::{BudgetsVersion, SpendColumn};
use tollgate_store::redis::{MoneyCharge, Reserve, Unknown};
use tollgate_store::{Database, Ledger, MoneyStore, UsageRow};

/// Budgets by scope, as the database holds them.
#[derive(Debug, Default)]
struct BudgetRules {
    /// foldhash, seeded per process: looked up for each scope of every
    /// charged request, where SipHash cost 180 instructions a lookup.
    scoped: HashMap<Arc<str>, Vec<Budget>, foldhash::fast::RandomState>,
    every_user: Vec<Budget>,
}

impl BudgetRules {
    fn new(budgets: Vec<Budget>) -> Self {
        let mut rules = Self::default();
        for b in budgets {
            if &*b.scope == EVERY_USER {
                rules.every_user.push(b);
            } else {
                rules.scoped.entry(b.scope.clone()).or_default().push(b);
            }
        }
        rules
    }

    fn is_empty(&self) -> bool {
        self.scoped.is_empty() && self.every_user.is_empty()
    }

    /// The same rules in allocations of their own (see [`Money::with_rules`]).
    fn private_copy(&self) -> Self {
        let own = |b: &Budget| Budget {
            scope: Arc::from(&*b.scope),
            ..b.clone()
        };
        Self::new(
            self.scoped
                .values()
                .flatten()
                .chain(&self.every_user)
                .map(own)
                .collect(),
        )
    }

    /// The budgets a request by `caller` for end user `user` is charged to.
    fn charges(&self, caller: &Caller, user: Option<&str>) -> Vec<BudgetCharge> {
        let mut out = Vec::new();
        if self.is_empty() {
            return out;
        }
        let mut add = |scope: &Arc<str>, rules: &[Budget]| {
            out.extend(rules.iter().map(|b| BudgetCharge {
                scope: scope.clone(),
                budget: b.clone(),
            }));
        };
        for scope in [Some(&caller.key_scope), caller.team_scope.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(rules) = self.scoped.get(scope) {
                add(scope, rules);
            }
        }
        if let Some((scope, rules)) = self.scoped.get_key_value("org") {
            add(scope, rules);
        }
        if let Some(user) = user {
            let scope: Arc<str> = Arc::from(format!("user:{user}"));
            // A user's own budget of a window replaces the every-user one.
            let own = self.scoped.get(&scope);
            if let Some(rules) = own {
                add(&scope, rules);
            }
            let every: Vec<Budget> = self
                .every_user
                .iter()
                .filter(|b| own.is_none_or(|o| o.iter().all(|x| x.window != b.window)))
                .cloned()
                .collect();
            add(&scope, &every);
        }
        out
    }
}

/// What the poller last saw of the database.
#[derive(Debug, Default)]
struct Seen {
    budgets: BudgetsVersion,
    last_entry: i64,
    /// Budget scopes (rule scope, window) whose spend has been summed.
    loaded: HashSet<(Arc<str>, Window)>,
    /// Each account's low-balance mark as last handed to the book.
    marks: HashMap<String, Option<Micros>>,
}

/// Budgets, credits, prices and the ledger.
pub struct Money {
    book: Arc<MoneyStore>,
    /// Whether a request's reservation is made by its admission call (money
    /// and limits in one Redis) instead of by [`Money::open`].
    with_limits: bool,
    prices: PriceTable,
    rules: RwLock<BudgetRules>,
    /// Bumped each time `rules` changes.
    rules_version: AtomicU64,
    /// Each serving thread's copy of `rules`, and the version it copied.
    thread_rules: ThreadLocal<RefCell<(u64, BudgetRules)>>,
    /// Whether `rules` holds any budget (read without the lock).
    any_budget: AtomicBool,
    ledger: Option<Ledger>,
    unpriced: UnpricedModels,
    warned_unpriced: Mutex<HashSet<String>>,
    alerts: Option<mpsc::UnboundedSender<serde_json::Value>>,
    clock: Arc<dyn Clock>,
    db: Database,
    seen: tokio::sync::Mutex<Seen>,
    /// The runtime it was loaded on, which outlives the threads serving
    /// requests: where settlements due after their request run.
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Money")
            .field("prices", &self.prices.len())
            .field("ledger", &self.ledger.is_some())
            .finish_non_exhaustive()
    }
}

/// The money side of one request: its budgets, account and price.
#[derive(Debug, Default)]
pub struct MoneyPlan {
    budgets: Vec<BudgetCharge>,
    account: Option<Arc<str>>,
    price: Option<Price>,
}

impl MoneyPlan {
    /// `amount` charged on the plan's budgets and account at `now_ns`.
    fn charge(&self, amount: Micros, now_ns: u64) -> MoneyCharge<'_> {
        MoneyCharge {
            budgets: &self.budgets,
            account: self.account.as_ref(),
            amount,
            now_ns,
        }
    }
}

/// A request's bill from admission to settlement: what it reserved, and
/// the usage row it will leave.
#[derive(Debug)]
pub struct Bill {
    money: Arc<Money>,
    plan: MoneyPlan,
    reserved: Micros,
    /// The reservation is still to be made by the admission call.
    pending: bool,
    /// When the bill opened (ns): the budgets' windows it falls in.
    opened_at: u64,
    /// What was left after the reservation.
    pub remaining: Remaining,
    row: Option<UsageRow>,
    /// The account's hold in the ledger; dropped unsettled, it is released.
    hold: Option<HoldTicket>,
    started: Instant,
}

/// A settled bill.
#[derive(Debug)]
pub struct Settled {
    /// The request's cost.
    pub cost: Micros,
    /// What is left after it.
    pub remaining: Remaining,
    /// Resolves when its usage row is durable.
    pub durable: Option<Durable>,
}

impl Money {
    /// Reads prices, accounts, budgets and their spend; releases the holds
    /// a previous run left; starts the ledger writer.
    pub async fn load(
        db: Database,
        config: &Config,
        clock: Arc<dyn Clock>,
        book: MoneyStore,
        with_limits: bool,
    ) -> Result<Self, Error> {
        let prices = tollgate_core::money::PriceTable::with_overrides(&config.prices)
            .map_err(|e| Error::Config(crate::config::ConfigError::Invalid(e.to_string())))?;
        let stale = db.release_stale_holds().await?;
        if !stale.is_empty() {
            let total: Micros = stale.iter().map(|h| h.amount).sum();
            for h in &stale {
                tracing::warn!(request_id = %h.request_id, account = %h.account, held_usd = %Usd(h.amount), "released a hold left by the previous run: its request never settled and was not charged");
            }
            tracing::warn!(holds = stale.len(), total_usd = %Usd(total), "released the previous run's open holds");
        }
        let ledger = if config.money.ledger {
            Some(Ledger::start(&db)?)
        } else {
            None
        };
        let alerts = config.money.webhook_url.clone().map(|url| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(deliver_alerts(url, config.money.webhook_retries, rx));
            tx
        });
        let money = Self {
            book: Arc::new(book),
            with_limits,
            prices,
            rules: RwLock::default(),
            rules_version: AtomicU64::new(0),
            thread_rules: ThreadLocal::new(),
            any_budget: AtomicBool::new(false),
            ledger,
            unpriced: config.money.unpriced_models,
            warned_unpriced: Mutex::default(),
            alerts,
            clock,
            db,
            seen: tokio::sync::Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
        };
        let (accounts, last_entry) = money.db.accounts_snapshot(None).await?;
        for a in accounts {
            money
                .book
                .seed_account(&a.name, a.balance, a.low_balance, last_entry)
                .await
                .map_err(unavailable)?;
        }
        money.seen.lock().await.last_entry = last_entry;
        money.sync().await?;
        Ok(money)
    }

    /// Logs, once each, the served models that have no price.
    pub fn warn_unpriced<'a>(&self, models: impl IntoIterator<Item = &'a String>) {
        let unpriced: Vec<&str> = models
            .into_iter()
            .filter(|m| self.prices.get(m).is_none())
            .map(String::as_str)
            .collect();
        if !unpriced.is_empty() {
            let policy = match self.unpriced {
                UnpricedModels::Refuse => "requests charged to a budget or account are refused",
                UnpricedModels::Free => "they are charged nothing",
            };
            tracing::warn!(models = ?unpriced, "these models have no price ({policy}); add them under [prices] in the config");
        }
    }

    /// Whether every served request leaves a usage row.
    pub fn keeps_ledger(&self) -> bool {
        self.ledger.is_some()
    }

    /// Whether a request by `caller` may be charged (so its cost must be
    /// estimated).
    pub fn may_charge(&self, caller: &Caller) -> bool {
        caller.account.is_some() || self.any_budget.load(Ordering::Relaxed)
    }

    /// Runs `f` on this thread's copy of the budget rules. A request's
    /// charges clone the rules' scopes; cloned from one copy shared by the
    /// serving threads, each clone (and the lock and `Arc` taken to reach
    /// the copy) moved a counter's cache line between cores, 0.09 µs a
    /// charged request on two cores.
    fn with_rules<R>(&self, f: impl FnOnce(&BudgetRules) -> R) -> R {
        let version = self.rules_version.load(Ordering::Acquire);
        let mut local = self.thread_rules.get_or_default().borrow_mut();
        if local.0 != version {
            let shared = self.rules.read().unwrap_or_else(PoisonError::into_inner);
            // Rules newer than `version` are copied again next time.
            *local = (version, shared.private_copy());
        }
        f(&local.1)
    }

    /// The budgets, account and price of a request.
    pub fn plan(
        &self,
        caller: &Caller,
        user: Option<&str>,
        model: &str,
    ) -> Result<MoneyPlan, Error> {
        let budgets = if self.any_budget.load(Ordering::Relaxed) {
            self.with_rules(|rules| rules.charges(caller, user))
        } else {
            Vec::new()
        };
        let account = caller.account.clone();
        let charged = !budgets.is_empty() || account.is_some();
        let price = match self.prices.get(model) {
            Some(p) => Some(p),
            None if charged && self.unpriced == UnpricedModels::Refuse => {
                return Err(Error::UnpricedModel(model.to_owned()));
            }
            None => {
                let mut warned = self
                    .warned_unpriced
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if warned.len() < 1024 && warned.insert(model.to_owned()) {
                    tracing::warn!(
                        model,
                        "no price for this model: its requests cost 0 in the ledger"
                    );
                }
                None
            }
        };
        Ok(MoneyPlan {
            budgets,
            account,
            price,
        })
    }

    /// Reserves the estimated cost of a request on its budgets and account,
    /// or refuses it. `row` is its usage row so far.
    pub async fn open(
        self: &Arc<Self>,
        plan: MoneyPlan,
        estimate: Option<Estimate>,
        mut row: UsageRow,
    ) -> Result<Bill, Error> {
        let reserved = match (plan.price, estimate) {
            (Some(p), Some(e)) => p.cost(TokenUsage {
                input: e.prompt,
                cached_input: 0,
                output: e.output,
            }),
            _ => 0,
        };
        let mut remaining = Remaining::default();
        let now = self.clock.now_ns();
        let charged = !plan.budgets.is_empty() || plan.account.is_some();
        let pending = charged && self.with_limits;
        let mut hold = None;
        if charged {
            if !pending {
                remaining = self.reserve(&plan, reserved, now).await?;
            }
            if let (Some(account), Some(ledger)) = (&plan.account, &self.ledger) {
                hold = Some(ledger.hold(HoldRow {
                    request_id: row.request_id.clone(),
                    account: account.clone(),
                    amount: reserved,
                    at: (now / 1_000_000) as i64,
                }));
            }
        }
        row.account = plan.account.clone();
        Ok(Bill {
            money: self.clone(),
            plan,
            reserved,
            pending,
            opened_at: now,
            remaining,
            row: Some(row),
            hold,
            started: Instant::now(),
        })
    }

    /// Reserves `amount` on the plan's budgets and account, seeding from the
    /// database whatever count the store does not know yet.
    async fn reserve(
        &self,
        plan: &MoneyPlan,
        amount: Micros,
        now: u64,
    ) -> Result<Remaining, Error> {
        // Counts still missing after two seedings mean Redis keeps losing
        // them: give up rather than spin.
        for _ in 0..3 {
            let decided = self
                .book
                .reserve(plan.charge(amount, now))
                .await
                .map_err(unavailable)?;
            match decided {
                Reserve::Done(r) => return r.map_err(|r| Error::Money(Box::new(r))),
                Reserve::Unknown(unknown) => self.seed(plan, &unknown, now).await?,
            }
        }
        Err(Error::MoneyUnavailable)
    }

    /// Seeds the counts an admission call found missing for `bill`.
    pub async fn seed_for(&self, bill: &Bill, unknown: &[Unknown]) -> Result<(), Error> {
        self.seed(&bill.plan, unknown, bill.opened_at).await
    }

    /// Sums what the store does not know from the database.
    async fn seed(&self, plan: &MoneyPlan, unknown: &[Unknown], now: u64) -> Result<(), Error> {
        // This replica's settled rows must be in the sums.
        self.flush().await;
        for u in unknown {
            match *u {
                Unknown::Budget(i) => {
                    if let Some(b) = plan.budgets.get(i) {
                        let spent = self.ledger_spend(&b.scope, b.budget.window, now).await?;
                        self.book
                            .seed_budget(&b.scope, b.budget.window, spent, now)
                            .await
                            .map_err(unavailable)?;
                    }
                }
                Unknown::Account => {
                    let Some(name) = &plan.account else { continue };
                    let (found, last_entry) = self.db.accounts_snapshot(Some(name)).await?;
                    let (balance, low) = found
                        .first()
                        .map_or((0, None), |a| (a.balance, a.low_balance));
                    self.book
                        .seed_account(name, balance, low, last_entry)
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        tracing::debug!(
            unknown = unknown.len(),
            "seeded shared money counts from the ledger"
        );
        Ok(())
    }

    /// The ledger's spend of one budget scope (`user:alice`) in the window
    /// holding `now_ns`.
    async fn ledger_spend(
        &self,
        scope: &str,
        window: Window,
        now_ns: u64,
    ) -> Result<Micros, Error> {
        let Some((column, name)) = SpendColumn::of_scope(scope) else {
            return Ok(0);
        };
        let since_ms = (window.start(now_ns) / 1_000_000) as i64;
        let sums = self.db.spend_since(column, name, since_ms).await?;
        Ok(sums.first().map_or(0, |(_, spent)| *spent))
    }

    /// Picks up changes made outside this process: budgets set or removed,
    /// credit entries added, low-balance marks changed.
    pub async fn sync(&self) -> Result<(), Error> {
        let mut seen = self.seen.lock().await;
        // Entries first: an entry's account was created before it, so the
        // account list read next knows every account they name.
        let entries = self.db.credit_entries(None, seen.last_entry).await?;
        // Every time, not only with new entries: a mark set elsewhere (the
        // CLI, another replica) comes without one.
        let mut known = HashSet::new();
        for a in self.db.list_accounts().await? {
            if seen.marks.get(&a.name) != Some(&a.low_balance) {
                self.book
                    .set_low_balance(&a.name, a.low_balance)
                    .await
                    .map_err(unavailable)?;
                seen.marks.insert(a.name.clone(), a.low_balance);
            }
            known.insert(a.name);
        }
        for e in &entries {
            if known.contains(&e.account) {
                self.book
                    .credit(&e.account, e.id, e.amount)
                    .await
                    .map_err(unavailable)?;
            }
            seen.last_entry = seen.last_entry.max(e.id);
        }
        let version = self.db.budgets_version().await?;
        if version != seen.budgets {
            let budgets = self.db.list_budgets().await?;
            let now = self.clock.now_ns();
            // A budget removed and set again starts from the ledger's sum.
            seen.loaded.retain(|(scope, window)| {
                budgets
                    .iter()
                    .any(|b| &b.scope == scope && b.window == *window)
            });
            let fresh: Vec<&Budget> = budgets
                .iter()
                .filter(|b| !seen.loaded.contains(&(b.scope.clone(), b.window)))
                .collect();
            if !fresh.is_empty() {
                // The sums must include every row settled so far.
                self.flush().await;
            }
            for b in fresh {
                self.load_spend(b, now).await?;
                seen.loaded.insert((b.scope.clone(), b.window));
            }
            let rules = BudgetRules::new(budgets);
            self.any_budget.store(!rules.is_empty(), Ordering::Relaxed);
            *self.rules.write().unwrap_or_else(PoisonError::into_inner) = rules;
            self.rules_version.fetch_add(1, Ordering::Release);
            seen.budgets = version;
        }
        Ok(())
    }

    /// Sums the ledger's spend of a new budget's scope in its current window.
    async fn load_spend(&self, b: &Budget, now_ns: u64) -> Result<(), Error> {
        let Some((column, name)) = SpendColumn::of_scope(&b.scope) else {
            return Ok(());
        };
        let since_ms = (b.window.start(now_ns) / 1_000_000) as i64;
        let sums = self.db.spend_since(column, name, since_ms).await?;
        if name.is_some() && sums.is_empty() {
            self.book
                .seed_budget(&b.scope, b.window, 0, now_ns)
                .await
                .map_err(unavailable)?;
        }
        for (scope, spent) in sums {
            self.book
                .seed_budget(&scope, b.window, spent, now_ns)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// A budget scope's spend and reservations in its current window
    /// (zeros when no request has met it yet).
    pub async fn spend(
        &self,
        scope: &str,
        window: Window,
        now_ns: u64,
    ) -> Result<(Micros, Micros), Error> {
        let known = self
            .book
            .spend(scope, window, now_ns)
            .await
            .map_err(unavailable)?;
        Ok(known.unwrap_or_default())
    }

    /// An account's balance and holds, as the store counts them.
    pub async fn funds(&self, account: &str) -> Result<Option<(Micros, Micros)>, Error> {
        self.book.funds(account).await.map_err(unavailable)
    }

    /// Forgets budget counts whose window has ended with nothing reserved
    /// (end users of a `user:*` budget met once); returns how many went.
    pub fn forget_ended(&self) -> usize {
        self.book.forget_ended(self.clock.now_ns())
    }

    /// Waits until every usage row recorded so far is durable.
    pub async fn flush(&self) {
        if let Some(l) = &self.ledger {
            l.flush().await;
        }
    }

    /// Makes every usage row durable (at shutdown; the writer thread ends
    /// with the last handle).
    pub async fn close(&self) {
        self.flush().await;
    }

    /// Logs an alert and hands it to the webhook, in one shape for both.
    fn alert(&self, alert: MoneyAlert) {
        let event = alert_json(&alert);
        tracing::warn!(target: "tollgate::alert", %event, "money alert");
        if let Some(tx) = &self.alerts {
            let _ = tx.send(event);
        }
    }
}

impl Bill {
    /// Settles on the real usage (`None`: the call failed, nothing is
    /// charged) and records the usage row with the status sent.
    pub fn settle(
        mut self,
        usage: Option<TokenUsage>,
        status: u16,
        served_model: Option<String>,
    ) -> Settled {
        let cost = match (usage, self.plan.price) {
            (Some(u), Some(p)) => p.cost(u),
            _ => 0,
        };
        self.finish(usage, cost, status, served_model, true)
    }

    /// Prices the request as `model` (a fallback serves it); a model
    /// without a price keeps the one asked for.
    pub fn reprice(&mut self, model: &str) {
        if let Some(p) = self.money.prices.get(model) {
            self.plan.price = Some(p);
        }
    }

    /// Names the deployment that served (or last failed) the request.
    pub fn set_deployment(&mut self, deployment: Arc<str>) {
        if let Some(row) = &mut self.row {
            row.deployment = Some(deployment);
        }
    }

    /// The reservation for the admission call to make, while it is pending.
    pub fn deferred(&self) -> Option<MoneyCharge<'_>> {
        self.pending
            .then(|| self.plan.charge(self.reserved, self.opened_at))
    }

    /// Records that the admission call made the reservation, leaving
    /// `left` (when it was pending).
    pub fn admitted(&mut self, left: Option<Remaining>) {
        if self.pending {
            self.pending = false;
            self.remaining = left.unwrap_or_default();
        }
    }

    /// Undoes the reservation of a request refused after it was made (by a
    /// rate limit): no row, no charge.
    pub fn cancel(mut self) {
        self.row = None;
        self.hold = None;
        if self.reserved_in_store() {
            self.settle_store(0, self.money.clock.now_ns());
        }
    }

    fn finish(
        &mut self,
        usage: Option<TokenUsage>,
        cost: Micros,
        status: u16,
        served_model: Option<String>,
        wait: bool,
    ) -> Settled {
        let now = self.money.clock.now_ns();
        let remaining = if self.reserved_in_store() {
            self.settle_store(cost, now)
        } else {
            Remaining::default()
        };
        if let Some(row) = &self.row {
            let u = usage.unwrap_or_default();
            let key = row
                .key_name
                .as_ref()
                .unwrap_or_else(|| crate::metrics::no_key());
            crate::metrics::settled(key, &row.model, u.input, u.output, cost);
        }
        let durable = match (self.row.take(), &self.money.ledger) {
            (Some(mut row), Some(ledger)) => {
                let u = usage.unwrap_or_default();
                row.at = (now / 1_000_000) as i64;
                row.input_tokens = u.input;
                row.cached_tokens = u.cached_input;
                row.output_tokens = u.output;
                row.cost = cost;
                row.status = status;
                row.latency_ms = self.started.elapsed().as_millis() as u64;
                row.served_model = served_model;
                row.held = self.hold.take().is_some_and(HoldTicket::settle);
                if wait {
                    Some(ledger.record(row))
                } else {
                    ledger.record_detached(row);
                    None
                }
            }
            _ => None,
        };
        Settled {
            cost,
            remaining,
            durable,
        }
    }
}

impl Bill {
    /// Whether the request holds a reservation on any budget or account.
    fn reserved_in_store(&self) -> bool {
        !self.pending && (!self.plan.budgets.is_empty() || self.plan.account.is_some())
    }

    /// Replaces the reservation with `cost` in the store at `now` (ns) and
    /// returns what is left. In memory that is immediate. In Redis the call
    /// goes out on a task (a settlement also runs from `Drop`), retried a
    /// few times, and what is left is the reservation's remainder moved by
    /// the difference, which is exact unless other requests settled
    /// meanwhile.
    fn settle_store(&self, cost: Micros, now: u64) -> Remaining {
        let money = &self.money;
        let (budgets, account) = (&self.plan.budgets, self.plan.account.as_ref());
        if let MoneyStore::Memory(book) = &*money.book {
            let (remaining, alerts) = book.settle(budgets, account, self.reserved, cost, now);
            for a in alerts {
                money.alert(a);
            }
            return remaining;
        }
        let moved = self.reserved - cost;
        let remaining = Remaining {
            budget: self.remaining.budget.map(|b| b + moved),
            credits: self.remaining.credits.map(|c| c + moved),
        };
        let (money, budgets, account) = (money.clone(), budgets.clone(), account.cloned());
        let reserved = self.reserved;
        let runtime = money.runtime.clone();
        runtime.spawn(async move {
            use backon::{ExponentialBuilder, Retryable};
            let settle = || {
                money
                    .book
                    .settle(&budgets, account.as_ref(), reserved, cost, now)
            };
            let settled = settle
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(50))
                        .with_max_times(3)
                        .with_jitter(),
                )
                .await;
            match settled {
                Ok((_, alerts)) => alerts.into_iter().for_each(|a| money.alert(a)),
                // The reservation stays counted until its count expires or
                // is seeded again: the side that never overspends.
                Err(e) => {
                    tracing::error!(error = %e, reserved_usd = %Usd(reserved), cost_usd = %Usd(cost), "could not settle in the shared money state")
                }
            }
        });
        remaining
    }
}

/// Maps a store failure to the 503 that says money cannot be checked.
fn unavailable(e: tollgate_store::Error) -> Error {
    tracing::warn!(error = %e, "shared budget and credit state unavailable");
    Error::MoneyUnavailable
}

impl Drop for Bill {
    /// A bill dropped unsettled belongs to a request whose client went away
    /// while the upstream was working: the provider bills for that work, so
    /// the estimate is charged (status 499, as proxies log a client that
    /// closed the connection).
    fn drop(&mut self) {
        if self.pending {
            // Never admitted (the client left while it was decided or
            // queued): nothing was reserved, nothing ran, and the hold goes
            // with the bill.
            return;
        }
        if self.row.is_some() {
            self.finish(None, self.reserved, 499, None, false);
        }
    }
}

/// POSTs each alert as JSON to the webhook, retrying with backoff.
async fn deliver_alerts(
    url: String,
    retries: u32,
    mut rx: mpsc::UnboundedReceiver<serde_json::Value>,
) {
    use backon::{ExponentialBuilder, Retryable};
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; alerts go to the log only");
            return;
        }
    };
    while let Some(body) = rx.recv().await {
        let send = || async {
            client
                .post(&url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string())
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                // Webhook URLs often carry a token: keep them out of logs.
                .map_err(reqwest::Error::without_url)
        };
        let sent = send
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(30))
                    .with_max_times(retries as usize)
                    .with_jitter(),
            )
            .notify(|e, after| tracing::warn!(error = %e, retry_in = ?after, "webhook call failed; retrying"))
            .await;
        if let Err(e) = sent {
            tracing::error!(error = %e, event = %body["event"], "webhook call failed for good");
        }
    }
}

fn alert_json(alert: &MoneyAlert) -> serde_json::Value {
    match alert {
        MoneyAlert::BudgetThreshold {
            scope,
            window,
            cap,
            spent,
            percent,
        } => serde_json::json!({
            "event": "budget_threshold", "scope": &**scope, "window": window.as_str(),
            "cap_usd": Usd(*cap).to_string(), "spent_usd": Usd(*spent).to_string(), "percent": percent,
        }),
        MoneyAlert::LowBalance {
            account,
            balance,
            threshold,
        } => serde_json::json!({
            "event": "low_balance", "account": &**account,
            "balance_usd": Usd(*balance).to_string(), "threshold_usd": Usd(*threshold).to_string(),
        }),
    }
}
