//! Token estimation: a chat prompt of about 1k tokens and one of about 50k.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use tollgate_core::openai::ChatRequest;
use tollgate_core::tokens::{Encoding, Estimator};

/// English-like prose of roughly `tokens` o200k tokens.
fn prompt(tokens: usize) -> String {
    let words = [
        "the",
        "gateway",
        "counts",
        "every",
        "token",
        "before",
        "it",
        "calls",
        "upstream,",
        "and",
        "settles",
        "with",
        "real",
        "usage",
        "afterwards.",
        "Limits",
        "are",
        "exact.",
    ];
    (0..tokens)
        .map(|i| words[i % words.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn body(tokens: usize) -> String {
    body_with(0, tokens)
}

/// [`body`] whose prompt starts with `run`, so that each run's is new.
fn body_with(run: u64, tokens: usize) -> String {
    serde_json::json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": format!("{run} {}", prompt(tokens))},
        ],
        "max_tokens": 256,
    })
    .to_string()
}

fn estimate(c: &mut Criterion) {
    let est = Estimator {
        fallback: Encoding::O200k,
        default_output: 256,
    };
    // The overhead benchmark's one short message, as one never seen before
    // (a number makes each run's new) and as one sent again.
    let short = |run: u64| {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hello {run}, how are you?"}}],"max_tokens":16}}"#
        )
    };
    let mut run = 0u64;
    c.bench_function("estimate chat prompt: one short message, new", |b| {
        b.iter_batched(
            || {
                run += 1;
                short(run)
            },
            |text| {
                let req: ChatRequest<'_> = serde_json::from_str(&text).expect("valid");
                black_box(est.chat("gpt-4o-mini", black_box(&req)));
            },
            BatchSize::SmallInput,
        )
    });
    let text = short(0);
    let req: ChatRequest<'_> = serde_json::from_str(&text).expect("valid");
    c.bench_function("estimate chat prompt: one short message, repeated", |b| {
        b.iter(|| black_box(est.chat("gpt-4o-mini", black_box(&req))))
    });
    let mut group = c.benchmark_group("estimate chat prompt");
    for tokens in [1_000, 50_000] {
        let counted = {
            let text = body(tokens);
            let req: ChatRequest<'_> = serde_json::from_str(&text).expect("valid");
            est.chat("gpt-4o", &req).prompt
        };
        group.throughput(Throughput::Elements(counted));
        // A prompt never seen before: every run's text differs (by its
        // first word), so it is counted, not found in the cache.
        let mut run = 0u64;
        group.bench_function(format!("{counted} prompt tokens, new"), |b| {
            b.iter_batched(
                || {
                    run += 1;
                    body_with(run, tokens)
                },
                |text| {
                    let req: ChatRequest<'_> = serde_json::from_str(&text).expect("valid");
                    black_box(est.chat("gpt-4o", black_box(&req)));
                },
                BatchSize::LargeInput,
            )
        });
        // The same prompt again (a system prompt sent with every call).
        let text = body(tokens);
        let req: ChatRequest<'_> = serde_json::from_str(&text).expect("valid");
        group.bench_function(format!("{counted} prompt tokens, repeated"), |b| {
            b.iter(|| black_box(est.chat("gpt-4o", black_box(&req))))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(20);
    targets = estimate
}
criterion_main!(benches);
