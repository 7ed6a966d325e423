//! Memory per tracked end user: one million distinct users of one key each
//! make a request, and the process's resident set grows by this much each.
//! Then idle state is evicted and the subjects are gone. The same for the
//! counts of a `user:*` day budget, forgotten once the day has ended.
//!
//! `cargo bench -p tollgate-store --bench subject_memory`

use std::sync::Arc;
use tollgate_core::limits::{Cost, LimitSet, Subject};
use tollgate_core::money::{Budget, Window};
use tollgate_store::book::BudgetCharge;
use tollgate_store::{MemoryLimiter, MoneyBook};

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    const USERS: u64 = 1_000_000;
    let limiter = MemoryLimiter::new();
    let key: std::sync::Arc<str> = "key_0123456789abcdef01234567".into();
    let limits = LimitSet {
        rpm: Some(60),
        tpm: Some(100_000),
        ..LimitSet::default()
    };
    let cost = Cost {
        requests: 1,
        tokens: 500,
    };
    let now = 1_700_000_000_000_000_000;
    let before = resident_bytes();
    for u in 0..USERS {
        let user = Subject::KeyUser(key.clone(), format!("user-{u:08}").into());
        limiter.admit(&[(user, limits)], cost, now).ok();
    }
    let after = resident_bytes();
    println!(
        "{} subjects tracked: {:.0} bytes each (resident set {} -> {} MiB)",
        limiter.len(),
        (after - before) as f64 / USERS as f64,
        before >> 20,
        after >> 20
    );
    let evicted = limiter.evict_idle(now + 61_000_000_000);
    println!(
        "after a minute idle: {evicted} evicted, {} left",
        limiter.len()
    );

    let book = MoneyBook::new();
    let budget = Budget {
        scope: Arc::from("user:*"),
        window: Window::Day,
        cap: 1_000_000,
        alert_percent: None,
    };
    let before = resident_bytes();
    for u in 0..USERS {
        let charge = [BudgetCharge {
            scope: format!("user:user-{u:08}").into(),
            budget: budget.clone(),
        }];
        if book.reserve(&charge, None, 10, now).is_ok() {
            book.settle(&charge, None, 10, 7, now);
        }
    }
    let after = resident_bytes();
    println!(
        "{USERS} user:* day-budget counts: {:.0} bytes each (resident set {} -> {} MiB)",
        (after - before) as f64 / USERS as f64,
        before >> 20,
        after >> 20
    );
    // The sweep holds the lock every reservation takes: within the day it
    // must not walk the counts.
    let started = std::time::Instant::now();
    let forgotten = book.forget_ended(now + 1);
    println!(
        "a sweep within the day: {forgotten} forgotten in {:?}",
        started.elapsed()
    );
    // Meanwhile a request's reservation waits for the lock at most this long.
    let book = Arc::new(book);
    let sweeping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let started_reserving = Arc::new(std::sync::Barrier::new(2));
    let longest = std::thread::spawn({
        let (book, sweeping) = (book.clone(), sweeping.clone());
        let started_reserving = started_reserving.clone();
        let charge = [BudgetCharge {
            scope: Arc::from("user:late"),
            budget: budget.clone(),
        }];
        move || {
            started_reserving.wait();
            let mut longest = std::time::Duration::ZERO;
            while sweeping.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let _ = book.reserve(&charge, None, 0, now + 86_400_000_000_000);
                longest = longest.max(started.elapsed());
            }
            longest
        }
    });
    started_reserving.wait();
    let started = std::time::Instant::now();
    let forgotten = book.forget_ended(now + 86_400_000_000_000);
    let took = started.elapsed();
    sweeping.store(false, std::sync::atomic::Ordering::Relaxed);
    println!(
        "the sweep after the day: {forgotten} forgotten in {took:?}; a reservation meanwhile waited at most {:?}",
        longest.join().unwrap_or_default()
    );
}
