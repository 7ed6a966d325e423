//! One admission decision in memory: four limits on one subject, two limits
//! on each of four subjects, and one hot key hammered from both cores.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tollgate_core::limits::{Cost, LimitSet, Subject};
use tollgate_store::MemoryLimiter;

/// Limits so large that every decision admits: the common, charging path.
const ROOMY: LimitSet = LimitSet {
    rpm: Some(u32::MAX as u64),
    tpm: Some(u32::MAX as u64),
    rpd: Some(u64::MAX / 4),
    tpd: Some(u64::MAX / 4),
};
const COST: Cost = Cost {
    requests: 1,
    tokens: 120,
};
const START: u64 = 1_700_000_000_000_000_000;

fn four_limits_one_subject(c: &mut Criterion) {
    let limiter = MemoryLimiter::new();
    let one_key = [(Subject::Key("key_0123456789abcdef01234567".into()), ROOMY)];
    let mut now = START;
    c.bench_function("admit: 4 limits (rpm, tpm, rpd, tpd) on one key", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(limiter.admit(&one_key, COST, now)).ok()
        })
    });
}

fn two_limits_four_subjects(c: &mut Criterion) {
    let limiter = MemoryLimiter::new();
    let id: Arc<str> = "key_0123456789abcdef01234567".into();
    let two = LimitSet {
        rpd: None,
        tpd: None,
        ..ROOMY
    };
    let subjects = [
        Subject::Key(id.clone()),
        Subject::KeyModel(id.clone(), "gpt-4o-mini".into()),
        Subject::KeyUser(id, "user-42".into()),
        Subject::Team("search".into()),
    ];
    let plan: Vec<_> = subjects.into_iter().map(|s| (s, two)).collect();
    let mut now = START;
    c.bench_function("admit: rpm+tpm on key, key×model, key×user, team", |b| {
        b.iter(|| {
            now += 1_000;
            black_box(limiter.admit(&plan, COST, now)).ok()
        })
    });
}

fn hot_key_on_both_cores(c: &mut Criterion) {
    let limiter = Arc::new(MemoryLimiter::new());
    let hot = [(Subject::Key("hot".into()), ROOMY)];
    c.bench_function(
        "admit: 4 limits, one hot key, a second core hammering it",
        |b| {
            b.iter_custom(|iters| {
                let stop = Arc::new(AtomicBool::new(false));
                let rival = {
                    let (limiter, hot, stop) = (limiter.clone(), hot.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut now = START;
                        while !stop.load(Ordering::Relaxed) {
                            now += 1_000;
                            black_box(limiter.admit(&hot, COST, now)).ok();
                        }
                    })
                };
                let mut now = START;
                let started = Instant::now();
                for _ in 0..iters {
                    now += 1_000;
                    black_box(limiter.admit(&hot, COST, now)).ok();
                }
                let took = started.elapsed();
                stop.store(true, Ordering::Relaxed);
                rival.join().ok();
                took
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = four_limits_one_subject, two_limits_four_subjects, hot_key_on_both_cores
}
criterion_main!(benches);
