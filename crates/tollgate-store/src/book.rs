//! The money book in memory: spend per budget window and funds per account,
//! with what in-flight requests reserved. Admission and settlement are one
//! short critical section each, never held across an await; the ledger
//! makes the same changes durable behind it.

use foldhash::fast::RandomState;
use hashbrown::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tollgate_core::money::{Budget, Micros, Window};

/// Spend of one scope over one window.
#[derive(Debug, Clone, Copy, Default)]
struct Spend {
    window_start: u64,
    /// Where the window `window_start` opened ends (`u64::MAX`: never; 0
    /// until known).
    window_end: u64,
    spent: Micros,
    reserved: Micros,
    alerted: bool,
}

impl Spend {
    /// Starts a new window's count when `now_ns` has left the old one.
    fn roll(&mut self, window: Window, now_ns: u64) {
        // Nearly every call falls in the window already known: no calendar
        // arithmetic (a month's start converts the date to and fro).
        if (self.window_start..self.window_end).contains(&now_ns) {
            return;
        }
        let start = window.start(now_ns);
        if start != self.window_start {
            self.window_start = start;
            self.spent = 0;
            self.alerted = false;
        }
        self.window_end = window.end(now_ns).unwrap_or(u64::MAX);
    }
}

/// An account's prepaid funds.
#[derive(Debug, Clone, Copy, Default)]
struct Funds {
    balance: Micros,
    held: Micros,
    low_balance: Option<Micros>,
    low_alerted: bool,
}

/// A budget as one request meets it: the counter it charges (`user:alice`
/// for the `user:*` rule) and the rule.
#[derive(Debug, Clone)]
pub struct BudgetCharge {
    /// The scope whose spend is counted.
    pub scope: Arc<str>,
    /// The cap.
    pub budget: Budget,
}

/// Why money refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyRefusal {
    /// A budget cannot take the request's estimated cost.
    Budget {
        /// The scope whose cap is reached.
        scope: Arc<str>,
        /// The window.
        window: Window,
        /// The cap.
        cap: Micros,
        /// Spent in this window, in-flight reservations included.
        spent: Micros,
        /// The request's estimated cost.
        requested: Micros,
        /// When the window resets (ns since the epoch); `None` for lifetime.
        resets_at: Option<u64>,
        /// How long until then.
        resets_in: Option<Duration>,
    },
    /// The account's balance minus holds cannot cover the estimate.
    Credits {
        /// The account.
        account: Arc<str>,
        /// Its balance.
        balance: Micros,
        /// Held for requests in flight.
        held: Micros,
        /// The request's estimated cost.
        requested: Micros,
    },
}

/// What is left after a reservation or settlement, for the response headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remaining {
    /// The tightest budget's cap minus spend and reservations.
    pub budget: Option<Micros>,
    /// The account's balance minus holds.
    pub credits: Option<Micros>,
}

/// A threshold crossed by a settlement, to be announced once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyAlert {
    /// A budget's spend reached its alert share.
    BudgetThreshold {
        /// The scope.
        scope: Arc<str>,
        /// The window.
        window: Window,
        /// The cap.
        cap: Micros,
        /// Spent in the window.
        spent: Micros,
        /// The alert share crossed.
        percent: u8,
    },
    /// An account's balance fell below its low-balance mark.
    LowBalance {
        /// The account.
        account: Arc<str>,
        /// Its balance.
        balance: Micros,
        /// The mark.
        threshold: Micros,
    },
}

#[derive(Debug)]
struct State {
    // foldhash: these are looked up twice per request; SipHash's DoS
    // resistance is not needed for names the operator configured, and
    // foldhash is seeded per process anyway. Looked up by `&str`
    // (hashbrown's `entry_ref`): a cloned `Arc` for the key would write
    // its count, a cache line every serving thread shares, twice a lookup.
    spend: HashMap<(Arc<str>, Window), Spend, RandomState>,
    accounts: HashMap<Arc<str>, Funds, RandomState>,
    /// No count's window ends before this: until then there is nothing to
    /// forget, and the sweep (a pass over every count, holding the lock
    /// requests take) is skipped.
    first_end: u64,
}

/// A `spend` key borrowed: it hashes as the owned tuple does.
#[derive(Hash)]
struct ScopeWindow<'a>(&'a str, Window);

impl hashbrown::Equivalent<(Arc<str>, Window)> for ScopeWindow<'_> {
    fn equivalent(&self, key: &(Arc<str>, Window)) -> bool {
        *key.0 == *self.0 && key.1 == self.1
    }
}

impl From<&ScopeWindow<'_>> for (Arc<str>, Window) {
    fn from(key: &ScopeWindow<'_>) -> Self {
        (Arc::from(key.0), key.1)
    }
}

impl Default for State {
    fn default() -> Self {
        Self {
            spend: HashMap::default(),
            accounts: HashMap::default(),
            first_end: u64::MAX,
        }
    }
}

impl State {
    /// The count of `scope` in the `window` that holds `now_ns`, made on
    /// first use.
    fn spend_mut(&mut self, scope: &str, window: Window, now_ns: u64) -> &mut Spend {
        let s = self
            .spend
            .entry_ref(&ScopeWindow(scope, window))
            .or_default();
        s.roll(window, now_ns);
        self.first_end = self.first_end.min(s.window_end);
        s
    }

    /// Takes `amount` back from the reservations of `budgets`.
    fn release(&mut self, budgets: &[BudgetCharge], amount: Micros, now_ns: u64) {
        for b in budgets {
            self.spend_mut(&b.scope, b.budget.window, now_ns).reserved -= amount;
        }
    }

    /// `account`'s funds, made on first use.
    fn funds_mut(&mut self, account: &str) -> &mut Funds {
        self.accounts.entry_ref(account).or_default()
    }
}

/// Spend and funds in memory.
#[derive(Debug, Default)]
pub struct MoneyBook {
    state: Mutex<State>,
}

impl MoneyBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `amount` on every budget and the account, or on none: a
    /// refusal changes nothing.
    pub fn reserve(
        &self,
        budgets: &[BudgetCharge],
        account: Option<&Arc<str>>,
        amount: Micros,
        now_ns: u64,
    ) -> Result<Remaining, MoneyRefusal> {
        let mut st = self.state();
        let mut remaining = Remaining::default();
        // One lookup per budget on the way in: each is reserved as it is
        // checked, and a refusal takes back what was reserved before it.
        for (i, b) in budgets.iter().enumerate() {
            let s = st.spend_mut(&b.scope, b.budget.window, now_ns);
            let committed = s.spent + s.reserved;
            if committed + amount > b.budget.cap {
                st.release(&budgets[..i], amount, now_ns);
                let resets_at = b.budget.window.end(now_ns);
                return Err(MoneyRefusal::Budget {
                    scope: b.scope.clone(),
                    window: b.budget.window,
                    cap: b.budget.cap,
                    spent: committed,
                    requested: amount,
                    resets_at,
                    resets_in: resets_at
                        .map(|end| Duration::from_nanos(end.saturating_sub(now_ns))),
                });
            }
            s.reserved += amount;
            let left = b.budget.cap - committed - amount;
            remaining.budget = Some(remaining.budget.map_or(left, |r: Micros| r.min(left)));
        }
        if let Some(a) = account {
            let f = st.funds_mut(a);
            if f.balance - f.held < amount {
                let refusal = MoneyRefusal::Credits {
                    account: a.clone(),
                    balance: f.balance,
                    held: f.held,
                    requested: amount,
                };
                st.release(budgets, amount, now_ns);
                return Err(refusal);
            }
            f.held += amount;
            remaining.credits = Some(f.balance - f.held);
        }
        Ok(remaining)
    }

    /// Replaces a reservation of `reserved` with the real cost `actual`
    /// (zero for a failed call: the reservation is simply released).
    /// Returns what is left and any threshold the spend crossed.
    pub fn settle(
        &self,
        budgets: &[BudgetCharge],
        account: Option<&Arc<str>>,
        reserved: Micros,
        actual: Micros,
        now_ns: u64,
    ) -> (Remaining, Vec<MoneyAlert>) {
        let mut st = self.state();
        let mut remaining = Remaining::default();
        let mut alerts = Vec::new();
        for b in budgets {
            let s = st.spend_mut(&b.scope, b.budget.window, now_ns);
            s.reserved = (s.reserved - reserved).max(0);
            s.spent += actual;
            let left = b.budget.cap - s.spent - s.reserved;
            remaining.budget = Some(remaining.budget.map_or(left, |r: Micros| r.min(left)));
            if let Some(pct) = b.budget.alert_percent
                && !s.alerted
                && i128::from(s.spent) * 100 >= i128::from(b.budget.cap) * i128::from(pct)
            {
                s.alerted = true;
                alerts.push(MoneyAlert::BudgetThreshold {
                    scope: b.scope.clone(),
                    window: b.budget.window,
                    cap: b.budget.cap,
                    spent: s.spent,
                    percent: pct,
                });
            }
        }
        if let Some(a) = account {
            let f = st.funds_mut(a);
            f.held = (f.held - reserved).max(0);
            f.balance -= actual;
            remaining.credits = Some(f.balance - f.held);
            if let Some(low) = f.low_balance
                && f.balance < low
                && !f.low_alerted
            {
                f.low_alerted = true;
                alerts.push(MoneyAlert::LowBalance {
                    account: a.clone(),
                    balance: f.balance,
                    threshold: low,
                });
            }
        }
        (remaining, alerts)
    }

    /// Sets an account's balance and low-balance mark as the database has
    /// them (at start, and when an account first appears).
    pub fn set_account(&self, account: &str, balance: Micros, low_balance: Option<Micros>) {
        let mut st = self.state();
        let f = st.funds_mut(account);
        f.balance = balance;
        f.low_balance = low_balance;
        f.low_alerted = low_balance.is_some_and(|l| balance < l);
    }

    /// Adds a credit entry (a top-up, or a negative adjustment).
    pub fn credit(&self, account: &str, amount: Micros) {
        let mut st = self.state();
        let f = st.funds_mut(account);
        f.balance += amount;
        if f.low_balance.is_none_or(|l| f.balance >= l) {
            f.low_alerted = false;
        }
    }

    /// Changes an account's low-balance mark.
    pub fn set_low_balance(&self, account: &str, low_balance: Option<Micros>) {
        let mut st = self.state();
        let f = st.funds_mut(account);
        f.low_balance = low_balance;
    }

    /// An account's balance and holds.
    pub fn funds(&self, account: &str) -> Option<(Micros, Micros)> {
        self.state()
            .accounts
            .get(account)
            .map(|f| (f.balance, f.held))
    }

    /// Sets the spend of `scope` in the window holding `now_ns`, as the
    /// ledger sums it (at start, and when a budget is added).
    pub fn set_spend(&self, scope: &str, window: Window, spent: Micros, now_ns: u64) {
        let mut st = self.state();
        let s = st.spend_mut(scope, window, now_ns);
        s.spent = spent;
        s.alerted = false;
    }

    /// Forgets the counts whose window has ended with nothing reserved, so
    /// that a `user:*` budget does not keep every end user it ever met: the
    /// scope's next request starts its new window from nothing, as a kept
    /// count would. Lifetime counts never end. Returns how many went.
    pub fn forget_ended(&self, now_ns: u64) -> usize {
        // The ended names leave the lock and are freed after it: freeing a
        // day's million end users takes 0.1 s.
        let ended: Vec<Arc<str>> = {
            let mut st = self.state();
            if now_ns < st.first_end {
                return 0;
            }
            let mut first_end = u64::MAX;
            let ended = st
                .spend
                .extract_if(|_, s| {
                    let ended = s.reserved == 0 && now_ns >= s.window_end;
                    if !ended {
                        first_end = first_end.min(s.window_end);
                    }
                    ended
                })
                .map(|((scope, _), _)| scope)
                .collect();
            st.first_end = first_end;
            ended
        };
        ended.len()
    }

    /// Spend of `scope` in the current window: (spent, reserved).
    pub fn spend(&self, scope: &str, window: Window, now_ns: u64) -> (Micros, Micros) {
        let mut st = self.state();
        match st.spend.get_mut(&ScopeWindow(scope, window)) {
            Some(s) => {
                s.roll(window, now_ns);
                (s.spent, s.reserved)
            }
            None => (0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_NS: u64 = 86_400 * 1_000_000_000;

    /// The borrowed key hashes as the stored one: a map that grows rehashes
    /// its keys and must still find each by name.
    #[test]
    fn counts_are_found_by_name_across_growth() {
        use std::hash::BuildHasher;
        let mut st = State::default();
        let owned: (Arc<str>, Window) = (Arc::from("team:a"), Window::Month);
        assert_eq!(
            st.spend.hasher().hash_one(&owned),
            st.spend
                .hasher()
                .hash_one(ScopeWindow("team:a", Window::Month))
        );
        for i in 0..1_000 {
            for w in Window::ALL {
                st.spend_mut(&format!("user:{i}"), w, 0).spent = i;
            }
        }
        assert_eq!(st.spend.len(), 4_000);
        for i in 0..1_000 {
            for w in Window::ALL {
                assert_eq!(st.spend_mut(&format!("user:{i}"), w, 0).spent, i);
            }
        }
        assert_eq!(st.spend.len(), 4_000);
    }

    /// A month's count stays through the month's last nanosecond, restarts
    /// at the next, and restarts again when the clock is set back.
    #[test]
    fn a_month_count_restarts_exactly_at_the_month_boundary() {
        let mid_january = 20_468 * DAY_NS + DAY_NS / 2; // 2026-01-15 12:00 UTC
        let february = 20_485 * DAY_NS; // 2026-02-01 00:00 UTC
        let mut s = Spend::default();
        s.roll(Window::Month, mid_january);
        s.spent = 5;
        s.roll(Window::Month, february - 1);
        assert_eq!(s.spent, 5);
        s.roll(Window::Month, february);
        assert_eq!((s.spent, s.window_start), (0, february));
        s.spent = 7;
        s.roll(Window::Month, february + 27 * DAY_NS);
        assert_eq!(s.spent, 7);
        s.roll(Window::Month, mid_january);
        assert_eq!(s.spent, 0);
    }

    /// Counts of ended windows go unless a reservation is still in them;
    /// lifetime and running windows stay; a forgotten scope's next request
    /// meets its whole cap, as a kept count rolled to the new window would.
    #[test]
    fn ended_counts_are_forgotten_and_behave_as_fresh() {
        let charge = |scope: &str, window: Window| BudgetCharge {
            scope: Arc::from(scope),
            budget: Budget {
                scope: Arc::from("user:*"),
                window,
                cap: 1_000,
                alert_percent: None,
            },
        };
        let book = MoneyBook::new();
        let thursday = 20_454 * DAY_NS + DAY_NS / 2; // 2026-01-01 12:00 UTC
        for i in 0..100 {
            let day = [charge(&format!("user:{i}"), Window::Day)];
            assert!(book.reserve(&day, None, 10, thursday).is_ok());
            book.settle(&day, None, 10, 10, thursday);
        }
        let in_flight = [charge("user:slow", Window::Day)];
        assert!(book.reserve(&in_flight, None, 30, thursday).is_ok());
        let kept = [
            charge("user:0", Window::Lifetime),
            charge("user:0", Window::Week),
        ];
        assert!(book.reserve(&kept, None, 10, thursday).is_ok());
        book.settle(&kept, None, 10, 10, thursday);

        assert_eq!(book.forget_ended(thursday + DAY_NS / 2 - 1), 0);
        let friday = thursday + DAY_NS / 2;
        assert_eq!(book.forget_ended(friday), 100);
        assert_eq!(book.spend("user:slow", Window::Day, thursday), (0, 30));
        assert_eq!(book.spend("user:0", Window::Lifetime, friday), (10, 0));
        assert_eq!(book.spend("user:0", Window::Week, friday), (10, 0));

        let day = [charge("user:7", Window::Day)];
        assert_eq!(
            book.reserve(&day, None, 100, friday).map(|r| r.budget),
            Ok(Some(900))
        );
        book.settle(&day, None, 100, 100, friday);
        // The late settlement lands in the new window; then it can go too.
        book.settle(&in_flight, None, 30, 25, friday);
        assert_eq!(book.spend("user:slow", Window::Day, friday), (25, 0));
        assert_eq!(book.forget_ended(friday + DAY_NS), 2);
    }
}
