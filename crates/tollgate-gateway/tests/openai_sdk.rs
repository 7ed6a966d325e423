//! The official `openai` Python package against the gateway: if the SDK does
//! the wrong thing against us, we are wrong. The test setup builds a venv
//! with the package from PyPI (once, reused across runs) and fails loudly if
//! it cannot.

mod common;

use common::Harness;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Python with `openai` installed, in a venv under the target directory.
fn python_with_openai() -> PathBuf {
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

async fn run_scenario(h: &Harness, scenario: &str) {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .expect("venv built");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_checks.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(scenario)
        .env("TOLLGATE_URL", h.gateway.url())
        .env("TOLLGATE_KEY", &h.key)
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
