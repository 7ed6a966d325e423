//! `tollgate batch`, the real binary, against the simulated provider with
//! its own RPM limit: paced to zero 429s, and resumable after a SIGKILL
//! with every `custom_id` exactly once in the results; and through the
//! gateway into a budget cap, which stops it cleanly until the cap is raised.

mod common;

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

/// Sets `key:NAME`'s lifetime budget through the admin API.
async fn set_lifetime_budget(url: &str, key: &str, cap: i64) {
    let resp = common::http()
        .put(format!("{url}/admin/budgets"))
        .bearer_auth(common::ADMIN_KEY)
        .json(&serde_json::json!({
            "scope": format!("key:{key}"),
            "window": "lifetime",
            "cap_usd": tollgate_core::money::Usd(cap).to_string(),
        }))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_cap_at_request_700_stops_the_batch_until_it_is_raised() {
    const N: usize = 2000;
    const CAP_AT: i64 = 700;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("tollgate.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[deployments]]\nname = \"sim\"\nprovider = \"mock\"\nmodels = [\"gpt-4o-mini\"]\n",
    )
    .expect("config");
    let key = |name: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["keys", "create", "--name", name, "--json"])
            .current_dir(dir.path())
            .output()
            .expect("keys create");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("key JSON");
        v["secret"].as_str().expect("secret").to_owned()
    };
    let (batch_key, probe_key) = (key("batch"), key("probe"));
    let served = common::serve(dir.path(), &["serve"], &dir.path().join("serve.log"));
    let url = served.url.clone();

    // Every line asks the same, so each costs what one probe costs.
    let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "the same question"}], "max_tokens": 20});
    let probe = common::http()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&probe_key)
        .json(&body)
        .send()
        .await
        .expect("probe");
    let cost = tollgate_core::money::parse_usd(
        probe.headers()["x-tollgate-cost-usd"]
            .to_str()
            .expect("text"),
    )
    .expect("dollars");
    assert!(cost > 0);
    set_lifetime_budget(&url, "batch", CAP_AT * cost).await;
    let lines: Vec<String> = (0..N)
        .map(|i| {
            serde_json::json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body})
                .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("requests.jsonl"), lines.join("\n") + "\n").expect("input");

    let run = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        c.current_dir(dir.path())
            .args([
                "batch",
                "requests.jsonl",
                "-o",
                "results.jsonl",
                "--concurrency",
                "32",
                "--json",
            ])
            .args(["--base-url", &format!("{url}/v1")])
            .env("TOLLGATE_API_KEY", &batch_key);
        tokio::task::spawn_blocking(move || c.output().expect("batch runs"))
    };
    let out = run().await.expect("joined");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "budget cap exit code; {stderr}");
    assert!(stderr.contains("key:batch"), "names the scope: {stderr}");
    assert!(stderr.contains("resume with the same command"), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["succeeded"], CAP_AT, "{summary}");
    // It stops within one in-flight window (2 × concurrency) of the cap.
    let sent = summary["sent"].as_i64().expect("sent");
    assert!(sent <= CAP_AT + 64, "{summary}");
    assert_eq!(
        result_counts(&dir.path().join("results.jsonl")).len(),
        CAP_AT as usize
    );

    set_lifetime_budget(&url, "batch", N as i64 * cost).await;
    let out = run().await.expect("joined");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(summary["already_done"], CAP_AT, "{summary}");
    let counts = result_counts(&dir.path().join("results.jsonl"));
    assert_eq!(counts.len(), N, "every request has a result");
    assert!(counts.values().all(|n| *n == 1), "none twice");
    common::stop(served);
}
