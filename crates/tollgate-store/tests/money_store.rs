//! One suite of money decisions (budgets' windowed spend, account holds,
//! thresholds), run unchanged on the in-memory book and on the real Redis
//! on this machine (127.0.0.1:6379, or `TOLLGATE_TEST_REDIS_URL`). A Redis
//! that cannot be reached fails its half loudly.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_core::limits::calendar::DAY_NS;
use tollgate_core::money::{Budget, Micros, Window};
use tollgate_store::book::{BudgetCharge, MoneyAlert, MoneyRefusal, Remaining};
use tollgate_store::redis::{MoneyCharge, RedisLimiter, Reserve};
use tollgate_store::{MoneyBook, MoneyStore};

fn memory() -> MoneyStore {
    MoneyStore::Memory(MoneyBook::new())
}

async fn redis() -> MoneyStore {
    let url = std::env::var("TOLLGATE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // A prefix of this test's own: Redis keeps state between runs.
    let prefix = format!("tollgate-test-money-{nanos}-{}", std::process::id());
    let redis = RedisLimiter::connect(&url, &prefix)
        .await
        .unwrap_or_else(|e| panic!("the Redis half of this suite needs Redis at {url}: {e}"));
    MoneyStore::Redis(redis.money())
}

/// Noon UTC on a fixed day.
const NOON: u64 = 20_000 * DAY_NS + DAY_NS / 2;

fn day_budget(scope: &str, cap: Micros) -> BudgetCharge {
    BudgetCharge {
        scope: Arc::from(scope),
        budget: Budget {
            scope: Arc::from(scope),
            window: Window::Day,
            cap,
            alert_percent: Some(80),
        },
    }
}

/// Reserves, seeding at zero whatever the store does not know yet (as the
/// gateway seeds from an empty ledger).
async fn reserve(
    store: &MoneyStore,
    budgets: &[BudgetCharge],
    account: Option<&Arc<str>>,
    amount: Micros,
    now: u64,
) -> Result<Remaining, MoneyRefusal> {
    for _ in 0..2 {
        match store
            .reserve(MoneyCharge {
                budgets,
                account,
                amount,
                now_ns: now,
            })
            .await
            .expect("store answers")
        {
            Reserve::Done(r) => return r,
            Reserve::Unknown(_) => {
                for b in budgets {
                    store
                        .seed_budget(&b.scope, b.budget.window, 0, now)
                        .await
                        .expect("seeded");
                }
            }
        }
    }
    panic!("still unknown after seeding")
}

async fn settle(
    store: &MoneyStore,
    budgets: &[BudgetCharge],
    account: Option<&Arc<str>>,
    reserved: Micros,
    actual: Micros,
    now: u64,
) -> (Remaining, Vec<MoneyAlert>) {
    store
        .settle(budgets, account, reserved, actual, now)
        .await
        .expect("store answers")
}

async fn a_budget_admits_exactly_what_fits_and_a_new_day_starts_at_zero(store: &MoneyStore) {
    let b = [day_budget("team:a", 1_000)];
    for _ in 0..4 {
        reserve(store, &b, None, 250, NOON).await.expect("fits");
    }
    let refused = reserve(store, &b, None, 1, NOON).await.expect_err("full");
    assert!(matches!(refused, MoneyRefusal::Budget { spent: 1_000, .. }));
    // Settling cheaper than reserved frees the difference.
    let (left, _) = settle(store, &b, None, 250, 100, NOON).await;
    assert_eq!(left.budget, Some(150));
    reserve(store, &b, None, 150, NOON)
        .await
        .expect("fits again");
    // A new day starts from zero spent; the 900 still in flight count.
    let tomorrow = NOON + DAY_NS;
    let left = reserve(store, &b, None, 100, tomorrow).await.expect("fits");
    assert_eq!(left.budget, Some(0));
    assert_eq!(
        store
            .spend("team:a", Window::Day, tomorrow)
            .await
            .expect("read"),
        Some((0, 1_000))
    );
}

async fn a_refusal_by_the_account_reserves_nothing_anywhere(store: &MoneyStore) {
    let acct: Arc<str> = Arc::from("acme");
    store
        .seed_account("acme", 100, None, 0)
        .await
        .expect("seeded");
    let b = [day_budget("key:a", 1_000)];
    assert!(matches!(
        reserve(store, &b, Some(&acct), 101, NOON).await,
        Err(MoneyRefusal::Credits {
            balance: 100,
            held: 0,
            ..
        })
    ));
    assert_eq!(
        store.spend("key:a", Window::Day, NOON).await.expect("read"),
        Some((0, 0))
    );
    assert_eq!(store.funds("acme").await.expect("read"), Some((100, 0)));
}

async fn a_refusal_by_a_later_budget_reserves_nothing_on_the_earlier_ones(store: &MoneyStore) {
    let acct: Arc<str> = Arc::from("acme");
    store
        .seed_account("acme", 10_000, None, 0)
        .await
        .expect("seeded");
    let b = [
        day_budget("key:a", 1_000),
        day_budget("user:u", 1_000),
        day_budget("team:t", 300),
    ];
    reserve(store, &b, Some(&acct), 200, NOON)
        .await
        .expect("fits");
    assert!(matches!(
        reserve(store, &b, Some(&acct), 101, NOON).await,
        Err(MoneyRefusal::Budget { spent: 200, cap: 300, ref scope, .. }) if &**scope == "team:t"
    ));
    for scope in ["key:a", "user:u", "team:t"] {
        assert_eq!(
            store.spend(scope, Window::Day, NOON).await.expect("read"),
            Some((0, 200)),
            "{scope}"
        );
    }
    assert_eq!(
        store.funds("acme").await.expect("read"),
        Some((10_000, 200))
    );
    // What does fit still fits on all three.
    let left = reserve(store, &b, Some(&acct), 100, NOON)
        .await
        .expect("fits");
    assert_eq!(left.budget, Some(0));
}

async fn thresholds_alert_once_per_crossing(store: &MoneyStore) {
    let acct: Arc<str> = Arc::from("acme");
    store
        .seed_account("acme", 1_000, Some(500), 0)
        .await
        .expect("seeded");
    let b = [day_budget("org", 1_000)];
    reserve(store, &b, Some(&acct), 800, NOON)
        .await
        .expect("fits");
    let (_, alerts) = settle(store, &b, Some(&acct), 800, 800, NOON).await;
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(alerts.contains(&MoneyAlert::LowBalance {
        account: acct.clone(),
        balance: 200,
        threshold: 500,
    }));
    reserve(store, &b, Some(&acct), 100, NOON)
        .await
        .expect("fits");
    let (_, alerts) = settle(store, &b, Some(&acct), 100, 100, NOON).await;
    assert!(alerts.is_empty(), "{alerts:?}");
    // A top-up above the mark re-arms the low-balance alert; an entry
    // counts once however often it is applied.
    store.credit("acme", 7, 1_000).await.expect("credited");
    store.credit("acme", 7, 1_000).await.expect("credited");
    if let MoneyStore::Redis(_) = store {
        assert_eq!(store.funds("acme").await.expect("read"), Some((1_100, 0)));
    }
}

macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod in_memory {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(&super::memory()).await
            })*
        }
        mod in_redis {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(&super::redis().await).await
            })*
        }
    };
}

on_both_stores!(
    a_budget_admits_exactly_what_fits_and_a_new_day_starts_at_zero,
    a_refusal_by_the_account_reserves_nothing_anywhere,
    a_refusal_by_a_later_budget_reserves_nothing_on_the_earlier_ones,
    thresholds_alert_once_per_crossing,
);
