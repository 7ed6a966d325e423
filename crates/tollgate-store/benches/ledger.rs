//! Rows per second the ledger gets into SQLite (WAL, synchronous=NORMAL):
//! N rows recorded as fast as a caller can, then one flush (every row
//! committed); the time until one row is durable (appended to the journal)
//! for a caller recording one at a time; and 64 callers in parallel, each
//! awaiting its row's durability as a request does before its last byte,
//! then the flush that commits them all. The callers run on one
//! current-thread runtime, as on one of the gateway's serving threads.

use std::sync::Arc;
use std::time::Instant;
use tollgate_store::{Database, Ledger, UsageRow};

fn row(i: usize) -> UsageRow {
    UsageRow {
        request_id: format!("req_{i:032x}"),
        at: 1_700_000_000_000 + i as i64,
        key_id: Some(Arc::from("key_0123456789abcdef01234567")),
        key_name: Some(Arc::from("bench")),
        account: Some(Arc::from("bench")),
        model: Arc::from("gpt-4o-mini"),
        served_model: Some("gpt-4o-mini-2024-07-18".into()),
        deployment: Some(Arc::from("mock")),
        input_tokens: 12,
        output_tokens: 16,
        cost: 12,
        status: 200,
        latency_ms: 1,
        ..UsageRow::default()
    }
}

/// This process's CPU time (user + system, all threads), in seconds.
fn cpu_time() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let db = Database::open(&dir.path().join("bench.db").to_string_lossy())
            .await
            .expect("db");
        db.add_credits("bench", 1_000_000_000, "bench", "seed")
            .await
            .expect("credits");
        let ledger = Ledger::start(&db).expect("ledger writer");

        let n = 200_000;
        let started = Instant::now();
        let cpu = cpu_time();
        for i in 0..n {
            ledger.record_detached(row(i));
        }
        ledger.flush().await;
        let secs = started.elapsed().as_secs_f64();
        let cpu_us = (cpu_time() - cpu) * 1e6 / n as f64;
        println!(
            "fire-and-forget: {n} rows in {secs:.2} s = {:.0} rows/s, {cpu_us:.1} µs of CPU per row (all threads)",
            n as f64 / secs
        );

        let single = 2_000;
        let started = Instant::now();
        for i in 0..single {
            ledger.record(row(n + 1_000_000 + i)).wait().await;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "one caller, one row at a time: {:.1} µs until durable",
            secs * 1e6 / single as f64
        );

        let per_caller = 2_000;
        let callers = 64;
        let started = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let ledger = ledger.clone();
                tokio::spawn(async move {
                    for i in 0..per_caller {
                        ledger.record(row(n + c * per_caller + i)).wait().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("caller");
        }
        let total = callers * per_caller;
        let durable = started.elapsed().as_secs_f64();
        ledger.flush().await;
        let committed = started.elapsed().as_secs_f64();
        println!(
            "awaited by {callers} callers: {total} rows durable in {durable:.2} s = {:.0} rows/s, committed in {committed:.2} s = {:.0} rows/s",
            total as f64 / durable,
            total as f64 / committed
        );
        let rows = db.usage_rows().await.expect("rows").len();
        assert_eq!(rows, n + single + total, "every row landed");
    });
}
