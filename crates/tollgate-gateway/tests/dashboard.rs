//! The `/ui` dashboard in a real browser: Debian's Chromium driven by
//! Playwright (`playwright-core` from npm, installed by the test setup under
//! the target directory). After scripted traffic, the test signs in through
//! the form, reads the numbers the charts were drawn from, checks them
//! against the ledger, and saves a screenshot under `target/`.

mod common;

use common::{ADMIN_KEY, Harness};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tollgate_core::limits::KeyLimits;
use tollgate_core::money::{Budget, Window};
use tollgate_mock::MockConfig;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Debian's Chromium, installed with apt when missing (the machine's own
/// package, never a browser download).
fn chromium() {
    if Path::new(CHROMIUM).exists() {
        return;
    }
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-qq", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        installed && Path::new(CHROMIUM).exists(),
        "the dashboard test needs Debian's chromium at {CHROMIUM}: apt-get install chromium"
    );
}

/// A directory holding `node_modules/playwright-core` from the lock file.
fn playwright() -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-node");
    if root
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return root;
    }
    // Install beside and rename into place: a concurrent run never sees half.
    let staging = root.with_extension(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("staging dir");
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(source.join(f), staging.join(f)).expect("copy the npm manifest");
    }
    let ok = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&staging)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "npm ci failed: the dashboard test needs Node.js, npm and the npm registry"
    );
    if std::fs::rename(&staging, &root).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    root
}

fn chat(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"chart me"}}],"max_tokens":{max_tokens}}}"#
    )
}

#[tokio::test]
async fn the_dashboard_signs_in_and_charts_the_scripted_traffic() {
    let setup = tokio::task::spawn_blocking(|| {
        chromium();
        playwright()
    });
    let h = Harness::with(MockConfig::default(), |_| {}).await;
    let web = h.key("web", |_| {}).await;
    let batch = h
        .key("batch", |k| {
            k.limits = KeyLimits {
                rpm: Some(2),
                ..KeyLimits::default()
            }
        })
        .await;
    let billing = h.key("billing", |k| k.account = Some("acme".into())).await;
    h.fund("acme", 5_000_000).await;
    h.gw()
        .db
        .set_budget(&Budget {
            scope: Arc::from("key:web"),
            window: Window::Day,
            cap: 1_000_000,
            alert_percent: None,
        })
        .await
        .expect("budget");
    h.gw().money.sync().await.expect("synced");

    for i in 0..5 {
        let resp = h.post_as(&web, "/v1/chat/completions", &chat(10 + i)).await;
        assert_eq!(resp.status(), 200);
    }
    for i in 0..5 {
        let resp = h.post_as(&batch, "/v1/chat/completions", &chat(5)).await;
        assert_eq!(resp.status(), if i < 2 { 200 } else { 429 });
    }
    let resp = h.post_as(&billing, "/v1/chat/completions", &chat(50)).await;
    assert_eq!(resp.status(), 200);
    h.gw().money.flush().await;
    let rows = h.gw().db.usage_rows().await.expect("rows");
    assert_eq!(rows.len(), 8);
    let mut spend_by_key: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        *spend_by_key
            .entry(r.key_name.as_deref().unwrap_or("-").to_owned())
            .or_default() += r.cost;
    }

    // Without a session the data is not served; the page itself is.
    let api = h
        .http
        .get(h.url("/ui/api/summary"))
        .send()
        .await
        .expect("sent");
    assert_eq!(api.status(), 401);
    let page = h.http.get(h.url("/ui")).send().await.expect("sent");
    assert_eq!(page.status(), 200);
    assert!(page.headers().contains_key("content-security-policy"));

    let node_dir = setup.await.expect("browser setup");
    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    // ES modules resolve packages beside the script, so it runs from there.
    let script = node_dir.join("dashboard.mjs");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/dashboard.mjs"),
        &script,
    )
    .expect("copy the browser script");
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .arg(h.url(""))
        .arg(ADMIN_KEY)
        .arg(&screenshot)
        .output()
        .await
        .expect("node runs");
    assert!(
        out.status.success(),
        "the browser script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the script prints JSON");

    let total_cost: i64 = rows.iter().map(|r| r.cost).sum();
    assert_eq!(shown["requests"], 8, "{shown}");
    assert_eq!(
        shown["requests_charted"], 8,
        "the columns add up to the total"
    );
    assert_eq!(shown["spend_micros"], total_cost);
    assert_eq!(shown["throttled"], 3);
    assert!(shown["token_columns"].as_u64().unwrap_or(0) >= 2);
    let bars = |name: &str| -> HashMap<String, i64> {
        shown[name]
            .as_array()
            .expect("bars")
            .iter()
            .map(|b| {
                (
                    b["label"].as_str().unwrap_or_default().to_owned(),
                    b["value"].as_f64().unwrap_or(-1.0) as i64,
                )
            })
            .collect()
    };
    assert_eq!(bars("spend_by_key"), spend_by_key);
    assert_eq!(
        bars("throttled_subjects"),
        HashMap::from([("key:batch".to_owned(), 3)])
    );
    assert!(bars("budgets").contains_key("key:web (day)"), "{shown}");
    let acme = bars("accounts")["acme"];
    assert_eq!(acme, 5_000_000 - spend_by_key["billing"]);
    assert_eq!(shown["deployments"], serde_json::json!(["mock-a"]));
    assert_eq!(shown["login_hidden"], true);
    assert!(
        !shown["url"]
            .as_str()
            .unwrap_or_default()
            .contains(ADMIN_KEY)
    );
    assert_eq!(shown["failed"], serde_json::json!([]), "every asset loaded");
    assert!(screenshot.exists());
    eprintln!(
        "dashboard loaded in {} ms; screenshot at {}",
        shown["load_ms"],
        screenshot.display()
    );
}
