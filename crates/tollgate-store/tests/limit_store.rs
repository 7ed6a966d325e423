//! One suite of limit decisions, run unchanged against the in-memory store,
//! against the real Redis on this machine (127.0.0.1:6379, or
//! `TOLLGATE_TEST_REDIS_URL`) and against a three-node Redis Cluster each
//! test starts of its own (`redis-server` in cluster mode). A Redis that
//! cannot be reached fails its part loudly; nothing is skipped.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::limits::{Cost, LimitKind, LimitSet, RefusalKind, Subject};
use tollgate_store::redis::{Admitted, Decision, RedisLimiter};
use tollgate_store::shared::{OutagePolicy, SharedLimiter};
use tollgate_store::{LimitStore, MemoryLimiter};

/// One limit decision, without money.
trait Decide {
    async fn decide(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
    ) -> Result<Decision, tollgate_store::Error>;
}

impl Decide for LimitStore {
    async fn decide(
        &self,
        placement: &str,
        subjects: &[(Subject, LimitSet)],
        cost: Cost,
    ) -> Result<Decision, tollgate_store::Error> {
        match self.admit(placement, subjects, cost, None).await? {
            Admitted::Decided(d) => Ok(d),
            Admitted::Money(m) => panic!("no money was charged, yet: {m:?}"),
        }
    }
}

/// Every scenario's subjects share one placement, as a key's always do.
const PLACE: &str = "team-of-the-test";

fn memory() -> LimitStore {
    LimitStore::Memory(MemoryLimiter::new(), Arc::new(SystemClock::new()))
}

async fn redis() -> LimitStore {
    let url = std::env::var("TOLLGATE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    redis_at(&url, false).await
}

async fn redis_at(url: &str, cluster: bool) -> LimitStore {
    let limiter = RedisLimiter::connect_to(url, cluster, "tollgate-test")
        .await
        .unwrap_or_else(|e| panic!("the Redis part of this suite needs Redis at {url}: {e}"));
    let shared = SharedLimiter::new(
        limiter,
        OutagePolicy::FailClosed,
        Arc::new(SystemClock::new()),
    )
    .await
    .expect("first heartbeat");
    LimitStore::Redis(Arc::new(shared))
}

/// A key id no earlier run used (Redis keeps state between runs).
fn unique(name: &str) -> Arc<str> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Arc::from(format!("{name}-{nanos}-{}", std::process::id()).as_str())
}

fn key(id: &Arc<str>, limits: LimitSet) -> (Subject, LimitSet) {
    (Subject::Key(id.clone()), limits)
}

fn requests(n: u64) -> Cost {
    Cost {
        requests: n,
        tokens: 0,
    }
}

fn tokens(n: u64) -> Cost {
    Cost {
        requests: 1,
        tokens: n,
    }
}

async fn a_bucket_admits_its_capacity_then_says_how_long_to_wait(store: &LimitStore) {
    let k = unique("capacity");
    let subjects = [key(
        &k,
        LimitSet {
            rpm: Some(5),
            ..LimitSet::default()
        },
    )];
    for i in 0..5 {
        let d = store
            .decide(PLACE, &subjects, requests(1))
            .await
            .expect("decided");
        let grant = d.result.expect("within capacity");
        assert_eq!(grant.requests.map(|r| r.remaining), Some(4 - i));
    }
    let refusal = store
        .decide(PLACE, &subjects, requests(1))
        .await
        .expect("decided")
        .result
        .expect_err("over capacity");
    assert_eq!(refusal.kind, LimitKind::RequestsPerMinute);
    assert_eq!((refusal.limit, refusal.used, refusal.requested), (5, 5, 1));
    match refusal.why {
        RefusalKind::Wait(w) => {
            assert!(w > Duration::ZERO && w <= Duration::from_secs(12), "{w:?}")
        }
        other => panic!("a rolling limit waits: {other:?}"),
    }
}

async fn a_refusal_by_one_subject_charges_none(store: &LimitStore) {
    let k = unique("all-or-nothing");
    let team: Arc<str> = unique("team");
    let both = [
        key(
            &k,
            LimitSet {
                tpm: Some(100),
                ..LimitSet::default()
            },
        ),
        (
            Subject::Team(team),
            LimitSet {
                tpm: Some(50),
                ..LimitSet::default()
            },
        ),
    ];
    assert!(
        store
            .decide(PLACE, &both, tokens(30))
            .await
            .expect("decided")
            .result
            .is_ok()
    );
    let refusal = store
        .decide(PLACE, &both, tokens(30))
        .await
        .expect("decided")
        .result
        .expect_err("the team has 20 left");
    assert_eq!(
        (refusal.subject, refusal.kind),
        (1, LimitKind::TokensPerMinute)
    );
    // The key was charged 30 once, not twice: 70 fit, then nothing.
    let alone = [both[0].clone()];
    assert!(
        store
            .decide(PLACE, &alone, tokens(70))
            .await
            .expect("decided")
            .result
            .is_ok()
    );
    assert!(
        store
            .decide(PLACE, &alone, tokens(1))
            .await
            .expect("decided")
            .result
            .is_err()
    );
}

async fn too_large_never_fits_and_a_daily_cap_waits_for_midnight(store: &LimitStore) {
    let k = unique("caps");
    let subjects = [key(
        &k,
        LimitSet {
            tpm: Some(100),
            rpd: Some(3),
            ..LimitSet::default()
        },
    )];
    let r = store
        .decide(PLACE, &subjects, tokens(101))
        .await
        .expect("decided")
        .result;
    assert_eq!(r.expect_err("too large").why, RefusalKind::NeverFits);
    for _ in 0..3 {
        assert!(
            store
                .decide(PLACE, &subjects, tokens(1))
                .await
                .expect("decided")
                .result
                .is_ok()
        );
    }
    let refusal = store
        .decide(PLACE, &subjects, tokens(1))
        .await
        .expect("decided")
        .result
        .expect_err("daily cap");
    assert_eq!(refusal.kind, LimitKind::RequestsPerDay);
    match refusal.why {
        RefusalKind::DailyCap(d) => assert!(d <= Duration::from_secs(86_400)),
        other => panic!("{other:?}"),
    }
    assert!(!refusal.should_retry());
}

async fn reconciliation_refunds_and_charges_the_difference(store: &LimitStore) {
    let k = unique("reconcile");
    let subjects = [key(
        &k,
        LimitSet {
            tpm: Some(100),
            tpd: Some(1_000),
            ..LimitSet::default()
        },
    )];
    let first = store
        .decide(PLACE, &subjects, tokens(80))
        .await
        .expect("decided");
    assert!(first.result.is_ok());
    // It used 20 of the 80 estimated.
    store
        .reconcile(PLACE, &subjects, -60, first.stamp())
        .await
        .expect("reconciled");
    let second = store
        .decide(PLACE, &subjects, tokens(80))
        .await
        .expect("decided");
    let grant = second.result.expect("the refund made room");
    assert_eq!(
        grant.tokens.map(|r| (r.kind, r.remaining)),
        Some((LimitKind::TokensPerMinute, 0))
    );
    // It used 90: ten more are charged, and the day counter holds 110.
    store
        .reconcile(PLACE, &subjects, 10, second.stamp())
        .await
        .expect("reconciled");
    let refusal = store
        .decide(PLACE, &subjects, tokens(1))
        .await
        .expect("decided")
        .result
        .expect_err("in debt by ten");
    assert_eq!(refusal.used, 100);
    let day = refusal
        .standing
        .tokens
        .filter(|r| r.kind == LimitKind::TokensPerDay);
    assert!(day.is_none() || day.is_some_and(|r| r.remaining == 890));
}

async fn concurrent_admissions_get_exactly_the_capacity(store: Arc<LimitStore>) {
    let k = unique("race");
    let subjects = Arc::new([key(
        &k,
        LimitSet {
            rpd: Some(50),
            ..LimitSet::default()
        },
    )]);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (store, subjects) = (store.clone(), subjects.clone());
            tokio::spawn(async move {
                store
                    .decide(PLACE, &subjects[..], requests(1))
                    .await
                    .expect("decided")
                    .result
                    .is_ok()
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += u32::from(t.await.expect("task"));
    }
    assert_eq!(admitted, 50);
}

macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod in_memory {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(&super::memory()).await
            })*
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_admissions_get_exactly_the_capacity() {
                super::concurrent_admissions_get_exactly_the_capacity(std::sync::Arc::new(super::memory())).await
            }
        }
        mod in_redis_cluster {
            $(#[tokio::test]
            async fn $scenario() {
                let cluster = tollgate_store::redis::scratch::cluster();
                super::$scenario(&super::redis_at(&cluster.url, true).await).await
            })*
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_admissions_get_exactly_the_capacity() {
                let cluster = tollgate_store::redis::scratch::cluster();
                let store = super::redis_at(&cluster.url, true).await;
                super::concurrent_admissions_get_exactly_the_capacity(std::sync::Arc::new(store)).await
            }
        }
        mod in_redis {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(&super::redis().await).await
            })*
            #[tokio::test(flavor = "multi_thread")]
            async fn concurrent_admissions_get_exactly_the_capacity() {
                super::concurrent_admissions_get_exactly_the_capacity(std::sync::Arc::new(super::redis().await)).await
            }
        }
    };
}

on_both_stores!(
    a_bucket_admits_its_capacity_then_says_how_long_to_wait,
    a_refusal_by_one_subject_charges_none,
    too_large_never_fits_and_a_daily_cap_waits_for_midnight,
    reconciliation_refunds_and_charges_the_difference,
);

/// On one Redis a request's budget and account ride in its admission call:
/// all charged, or nothing anywhere, whichever refuses.
#[tokio::test]
async fn a_money_charge_is_decided_with_the_limits_in_one_call() {
    use tollgate_core::money::{Budget, Window};
    use tollgate_store::book::{BudgetCharge, MoneyRefusal};
    use tollgate_store::redis::{MoneyCharge, Reserve, Unknown};
    let url = std::env::var("TOLLGATE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("tollgate-test-money-{}", unique("p"));
    let redis = RedisLimiter::connect(&url, &prefix).await.expect("Redis");
    assert!(redis.decides_money());
    let money = redis.money();
    let now = SystemClock::new().now_ns();
    let budgets = [BudgetCharge {
        scope: Arc::from("key:k"),
        budget: Budget {
            scope: Arc::from("key:k"),
            window: Window::Day,
            cap: 100,
            alert_percent: None,
        },
    }];
    let account: Arc<str> = Arc::from("acme");
    let charge = |amount| MoneyCharge {
        budgets: &budgets,
        account: Some(&account),
        amount,
        now_ns: now,
    };
    let k = unique("money");
    let subjects = [key(
        &k,
        LimitSet {
            rpm: Some(2),
            ..LimitSet::default()
        },
    )];
    let admit = |amount| redis.admit(PLACE, &subjects, requests(1), 0, Some(charge(amount)));

    // Counts Redis does not hold are reported, not taken for zero.
    match admit(10).await.expect("decided") {
        Admitted::Money(Reserve::Unknown(u)) => {
            assert_eq!(u, [Unknown::Budget(0), Unknown::Account])
        }
        other => panic!("{other:?}"),
    }
    money
        .seed_budget("key:k", Window::Day, 0, now)
        .await
        .expect("seeded");
    money
        .seed_account("acme", 50, None, 0)
        .await
        .expect("seeded");

    // Admitted: both reserved, what is left reported.
    match admit(30).await.expect("decided") {
        Admitted::Decided(d) => {
            assert!(d.result.is_ok());
            let left = d.money.expect("money decided too");
            assert_eq!((left.budget, left.credits), (Some(70), Some(20)));
        }
        other => panic!("{other:?}"),
    }
    // The account refuses: the limit is not charged either.
    match admit(30).await.expect("decided") {
        Admitted::Money(Reserve::Done(Err(MoneyRefusal::Credits { held: 30, .. }))) => {}
        other => panic!("{other:?}"),
    }
    // The limit refuses (rpm 2, one left, so take it, then one more): the
    // money is not reserved.
    assert!(matches!(admit(10).await, Ok(Admitted::Decided(ref d)) if d.result.is_ok()));
    assert!(matches!(admit(10).await, Ok(Admitted::Decided(ref d)) if d.result.is_err()));
    assert_eq!(money.funds("acme").await.expect("read"), Some((50, 40)));
    assert_eq!(
        money.spend("key:k", Window::Day, now).await.expect("read"),
        Some((0, 40))
    );
}
