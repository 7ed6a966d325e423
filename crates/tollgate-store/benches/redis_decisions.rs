//! Admission decisions per second one process gets from one Redis: N
//! concurrent callers, each deciding four limits of a key and its team per
//! call (one EVALSHA each), for a few seconds. Needs Redis at
//! 127.0.0.1:6379 (or `TOLLGATE_BENCH_REDIS_URL`).
//!
//!   cargo bench -p tollgate-store --bench redis_decisions

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tollgate_core::limits::{Cost, LimitSet, Subject};
use tollgate_store::redis::{Admitted, RedisLimiter};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("TOLLGATE_BENCH_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let limiter = Arc::new(
        RedisLimiter::connect(&url, "tollgate-bench")
            .await
            .unwrap_or_else(|e| panic!("the benchmark needs Redis at {url}: {e}")),
    );
    let far = LimitSet {
        rpm: Some(1_000_000_000),
        tpm: Some(1_000_000_000_000),
        rpd: Some(1_000_000_000_000),
        tpd: Some(1_000_000_000_000_000),
    };
    for callers in [1, 16, 64] {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs(3);
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let (limiter, done) = (limiter.clone(), done.clone());
                tokio::spawn(async move {
                    let subjects = [
                        (
                            Subject::Key(Arc::from(format!("bench-key-{}", c % 8).as_str())),
                            far,
                        ),
                        (Subject::Team(Arc::from("bench-team")), far),
                    ];
                    let cost = Cost {
                        requests: 1,
                        tokens: 100,
                    };
                    while Instant::now() < deadline {
                        let d = limiter.admit("bench-team", &subjects, cost, 0, None).await;
                        assert!(
                            matches!(d, Ok(Admitted::Decided(ref d)) if d.result.is_ok()),
                            "admitted"
                        );
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let started = Instant::now();
        for t in tasks {
            t.await.expect("caller");
        }
        let n = done.load(Ordering::Relaxed);
        println!(
            "{{\"callers\":{callers},\"decisions\":{n},\"per_second\":{:.0}}}",
            n as f64 / started.elapsed().as_secs_f64()
        );
    }
}
