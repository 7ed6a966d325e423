//! `tollgate batch`, the real binary, against the simulated provider with
//! its own RPM limit: paced to zero 429s, and resumable after a SIGKILL
//! with every `custom_id` exactly once in the results.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tollgate_mock::{MockConfig, MockServer};

const RPM: u64 = 600;

async fn mock() -> MockServer {
    MockServer::start(
        MockConfig {
            rpm: Some(RPM),
            ..MockConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .expect("mock starts")
}

fn write_requests(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({
                "custom_id": format!("req-{i}"),
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("item {i}")}], "max_tokens": 2},
            })
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").expect("input written");
}

fn batch(dir: &Path, base_url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.current_dir(dir)
        .args(["batch", "requests.jsonl", "-o", "results.jsonl", "--rpm"])
        .arg(RPM.to_string())
        .args([
            "--concurrency",
            "32",
            "--quiet",
            "--json",
            "--base-url",
            base_url,
        ])
        .env("TOLLGATE_API_KEY", "sk-batch-test");
    c
}

/// Runs the batch to its end (off the async workers); returns its JSON summary.
async fn run_to_the_end(dir: &Path, base_url: &str) -> serde_json::Value {
    let mut cmd = batch(dir, base_url);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("batch runs"))
        .await
        .expect("joined");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON summary")
}

/// custom_id → how many result lines carry it.
fn result_counts(path: &Path) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every result line is JSON");
        assert_eq!(v["response"]["status_code"], 200, "{v}");
        *counts
            .entry(v["custom_id"].as_str().expect("custom_id").to_owned())
            .or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paced_batch_finishes_with_zero_429s() {
    let mock = mock().await;
    let dir = tempfile::tempdir().expect("dir");
    write_requests(&dir.path().join("requests.jsonl"), 620);
    let summary = run_to_the_end(dir.path(), &mock.base_url()).await;
    assert_eq!(summary["succeeded"], 620, "{summary}");
    assert_eq!(summary["throttled"], 0, "{summary}");
    assert_eq!(mock.stats().snapshot().rate_limited, 0);
    let counts = result_counts(&dir.path().join("results.jsonl"));
    assert_eq!(counts.len(), 620);
    assert!(counts.values().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_batch_resumes_without_repeating_finished_work() {
    let mock = mock().await;
    let dir = tempfile::tempdir().expect("dir");
    const N: usize = 700;
    write_requests(&dir.path().join("requests.jsonl"), N);
    let results = dir.path().join("results.jsonl");
    for kill_after in [150usize, 450] {
        let mut child = batch(dir.path(), &mock.base_url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("batch starts");
        // Kill it (SIGKILL) once the results file shows progress.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let lines = std::fs::read_to_string(&results).map_or(0, |s| s.lines().count());
            if lines >= kill_after {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no progress");
            assert!(
                child.try_wait().expect("status").is_none(),
                "exited too early"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().expect("killed");
        child.wait().expect("reaped");
    }
    let summary = run_to_the_end(dir.path(), &mock.base_url()).await;
    let counts = result_counts(&results);
    assert_eq!(counts.len(), N, "every request has a result");
    assert!(counts.values().all(|n| *n == 1), "none twice");
    assert!(
        summary["already_done"].as_u64().is_some_and(|n| n >= 450),
        "{summary}"
    );
    // Only requests whose result was not yet written at a kill can have been
    // executed twice: at most the batch's window of tasks (2 × concurrency)
    // per kill. On a busy machine finished tasks do wait in that window.
    let stats = mock.stats().snapshot();
    assert!(stats.completed >= N as u64, "{stats:?}");
    assert!(stats.completed <= (N + 2 * 2 * 32) as u64, "{stats:?}");
}
