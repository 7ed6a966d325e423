//! The official `openai` Python package against the gateway: if the SDK does
//! the wrong thing against us, we are wrong. The test setup builds a venv
//! with the package from PyPI (once, reused across runs) and fails loudly if
//! it cannot.

mod common;

use common::Harness;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;
use tollgate_core::limits::KeyLimits;

/// The gateway's access log as JSON lines, captured for this test binary.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn access_log() -> &'static LogBuffer {
    static LOG: OnceLock<LogBuffer> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = LogBuffer::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new("tollgate::access=info"))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        buf
    })
}

/// (time, status) of every access-log line of key `name`.
fn requests_of(log: &LogBuffer, name: &str) -> Vec<(SystemTime, u64)> {
    let bytes = log.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["key"] == name)
        .map(|v| {
            let at = humantime::parse_rfc3339(v["timestamp"].as_str().expect("timestamp"))
                .expect("RFC 3339");
            (at, v["status"].as_u64().expect("status"))
        })
        .collect()
}

/// A Python with `openai` installed, in a venv under the target directory.
fn python_with_openai() -> PathBuf {
    // The tests of this binary run in parallel: one builds, the others wait.
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(build_python_with_openai).clone()
}

fn build_python_with_openai() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join("openai-venv");
    let python = venv.join("bin").join("python");
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&python) {
        return python;
    }
    // Build beside and rename into place, so concurrent test processes never
    // see a half-built venv.
    let staging = root.join(format!("openai-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&staging)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 -m venv failed: the OpenAI SDK tests need Python 3 with venv"
    );
    let pip = staging.join("bin").join("pip");
    let ok = Command::new(&pip)
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "openai>=1.40,<3",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "pip install openai failed: the OpenAI SDK tests need PyPI"
    );
    if std::fs::rename(&staging, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        works(&python),
        "the venv at {} has no working openai package",
        venv.display()
    );
    python
}

async fn run_scenario(h: &Harness, scenario: &str) -> String {
    run_scenario_as(h, &h.key, scenario, &[]).await
}

/// Runs one scenario of `sdk_checks.py` with `key` and `env`; returns its stdout.
async fn run_scenario_as(h: &Harness, key: &str, scenario: &str, env: &[(&str, &str)]) -> String {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("venv built");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_checks.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(scenario)
        .env("TOLLGATE_URL", h.gateway.url())
        .env("TOLLGATE_KEY", key)
        .envs(env.iter().copied())
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scenario {scenario} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(&format!("{scenario}: ok")), "{stdout}");
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_chats_streams_embeds_and_lists_models() {
    let h = Harness::start().await;
    run_scenario(&h, "basic").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_raises_the_right_exceptions() {
    let h = Harness::start().await;
    run_scenario(&h, "errors").await;
    // 401, 404 and 400 carry x-should-retry: false, so the SDK (max_retries=2)
    // sent each once; only the cut stream reached the provider.
    assert_eq!(h.mock.stats().snapshot().received, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_waits_what_the_gateway_says_at_a_rate_limit() {
    let log = access_log();
    let h = Harness::start().await;
    let key = h
        .key("sdk-at-limit", |k| {
            k.limits = KeyLimits {
                // One slot per 10 s: still empty when Python has started.
                rpm: Some(6),
                ..KeyLimits::default()
            }
        })
        .await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#;
    let burst = (0..6).map(|_| h.post_as(&key, "/v1/chat/completions", body));
    let statuses: Vec<u16> = futures_util::future::join_all(burst)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(statuses, [200; 6], "the burst uses up the key");

    let stdout = run_scenario_as(&h, &key, "at_limit", &[]).await;
    let seen: Vec<serde_json::Value> =
        serde_json::from_str(stdout.lines().next().expect("events")).expect("JSON");
    let advised: f64 = seen[0]["retry_after_ms"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the 429 carried retry-after-ms");

    // The gateway's own log: the SDK's 429, then its retry no earlier than advised.
    let lines = requests_of(log, "sdk-at-limit");
    let sdk = &lines[lines.len() - seen.len()..];
    assert_eq!(sdk.first().map(|l| l.1), Some(429), "{lines:?}");
    assert_eq!(sdk.last().map(|l| l.1), Some(200), "{lines:?}");
    let gap = sdk[1].0.duration_since(sdk[0].0).expect("in order");
    assert!(
        gap.as_secs_f64() * 1000.0 >= advised,
        "the SDK came back after {gap:?}, advised {advised} ms"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_sends_one_request_at_a_spent_budget_or_an_empty_account() {
    let log = access_log();
    let h = Harness::start().await;
    let capped = h.key("sdk-budget", |_| {}).await;
    let empty = h
        .key("sdk-empty", |k| k.account = Some("empty".into()))
        .await;
    h.gw()
        .db
        .set_budget(&tollgate_core::money::Budget {
            scope: "key:sdk-budget".into(),
            window: tollgate_core::money::Window::Lifetime,
            cap: 0,
            alert_percent: None,
        })
        .await
        .expect("budget");
    h.gw().money.sync().await.expect("synced");

    run_scenario_as(
        &h,
        &capped,
        "money",
        &[("TOLLGATE_KEY_EMPTY_ACCOUNT", empty.as_str())],
    )
    .await;
    // The gateway saw one request of each, and the provider none.
    let statuses = |name| {
        requests_of(log, name)
            .into_iter()
            .map(|l| l.1)
            .collect::<Vec<_>>()
    };
    assert_eq!(statuses("sdk-budget"), [429]);
    assert_eq!(statuses("sdk-empty"), [402]);
    assert_eq!(h.mock.stats().snapshot().received, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn official_sdk_retrying_a_lost_answer_executes_and_charges_once() {
    let h = Harness::with(
        tollgate_mock::MockConfig {
            // Longer than the SDK's timeout: its first attempt gives up.
            ttft: std::time::Duration::from_millis(600),
            ..tollgate_mock::MockConfig::default()
        },
        |_| {},
    )
    .await;
    let key = h.key("sdk-idem", |k| k.account = Some("acme".into())).await;
    h.fund("acme", 1_000_000).await;
    run_scenario_as(&h, &key, "idempotent", &[]).await;
    assert_eq!(
        h.mock.stats().snapshot().received,
        1,
        "one upstream execution"
    );
    let (rows, balance) = h.ledger("acme").await;
    assert_eq!(rows.len(), 1, "one charge");
    assert_eq!(balance, 1_000_000 - rows[0].cost);
}
