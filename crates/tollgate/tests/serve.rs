//! The real binary: first start on the embedded default, keys made by the
//! CLI in another process, and no secret in any log line or error body.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate_mock::{MockConfig, MockServer};

#[tokio::test(flavor = "multi_thread")]
async fn first_start_on_the_embedded_default_prints_a_working_key() {
    let dir = tempfile::tempdir().expect("dir");
    let s = serve(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0"],
        &dir.path().join("log"),
    );
    let text = s.banner.join("\n");
    assert!(text.contains("built-in simulated provider"), "{text}");
    assert!(
        text.contains("curl ") && text.contains("from openai import OpenAI"),
        "{text}"
    );
    assert!(
        dir.path().join("tollgate.db").exists(),
        "SQLite file in the working directory"
    );
    let key = dev_key(&s.banner);
    let (status, body) = chat(&s.url, &key, None).await;
    assert_eq!(status, 200, "{body}");
    stop(s);

    // A second start keeps the keys and creates no new one.
    let s = serve(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0"],
        &dir.path().join("log2"),
    );
    assert!(
        !s.banner.iter().any(|l| l.trim().starts_with("tg-")),
        "no second dev key"
    );
    assert_eq!(chat(&s.url, &key, None).await.0, 200);
    stop(s);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_a_log_line_or_an_error_body() {
    let mock = MockServer::start(MockConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[[deployments]]\nname = \"up\"\nprovider = \"openai_compatible\"\nbase_url = \"{}\"\napi_key_env = \"UPSTREAM_KEY\"\nmodels = [\"gpt-4o\"]\n",
            mock.base_url()
        ),
    )
    .expect("config");
    let log = dir.path().join("log.jsonl");
    let s = serve(dir.path(), &["serve", "--log-format", "json"], &log);
    let dev = dev_key(&s.banner);
    let wrong = format!("tg-{}", "ab".repeat(32));

    // Every path that handles a secret: success, bad key, admin calls, a key
    // made by the CLI in another process, a revoked key, an upstream error.
    let mut bodies = Vec::new();
    let (status, body) = chat(&s.url, &dev, None).await;
    assert_eq!(status, 200, "{body}");
    bodies.push(body);
    bodies.push(chat(&s.url, &wrong, None).await.1);
    bodies.push(chat(&s.url, &dev, Some("500")).await.1);
    let http = http();
    let created: serde_json::Value = http
        .post(format!("{}/admin/keys", s.url))
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"name": "web"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let web = created["secret"].as_str().expect("secret").to_owned();
    for admin_key in [ADMIN_KEY, wrong.as_str()] {
        let resp = http
            .get(format!("{}/admin/keys", s.url))
            .bearer_auth(admin_key)
            .send()
            .await;
        bodies.push(resp.expect("sent").text().await.expect("text"));
    }
    let out = tollgate()
        .args(["keys", "create", "--name", "cli"])
        .current_dir(dir.path())
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("tg-"))
        .expect("printed once")
        .to_owned();
    assert_eq!(
        chat(&s.url, &cli, None).await.0,
        200,
        "a key made by the CLI works at once"
    );
    let out = tollgate()
        .args(["keys", "revoke", "web"])
        .current_dir(dir.path())
        .output()
        .expect("keys revoke");
    assert!(out.status.success());
    let list = tollgate()
        .args(["keys", "list"])
        .current_dir(dir.path())
        .output()
        .expect("keys list");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("revoked") && list.contains("cli"), "{list}");
    // The gateway sees the CLI's revocation within its refresh interval.
    let mut refused = false;
    for _ in 0..50 {
        let (status, body) = chat(&s.url, &web, None).await;
        if status == 401 {
            assert!(body.contains("key_revoked"), "{body}");
            bodies.push(body);
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "a revoked key is refused within 5 s");
    // Last, as it takes the deployment out of service: the alert logged
    // while serving it carries the request's id.
    let quota = http
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(&dev)
        .header("x-request-id", "req_out_of_quota")
        .header("x-mock-fault", "insufficient_quota")
        .json(&serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(quota.status(), 429);
    bodies.push(quota.text().await.expect("text"));

    stop(s);
    let logs = std::fs::read_to_string(&log).expect("logs");
    let mut alerts = Vec::new();
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "tollgate::alert" {
            alerts.push(v);
        }
    }
    let request = serde_json::json!({"request_id": "req_out_of_quota", "name": "request"});
    assert_eq!(alerts.len(), 1, "{logs}");
    assert_eq!(alerts[0]["span"], request);
    assert_eq!(alerts[0]["spans"], serde_json::json!([request]));
    assert!(
        logs.contains("\"key\":\"dev\""),
        "the access log names keys by name"
    );
    let secrets = [dev.as_str(), &wrong, &web, &cli, ADMIN_KEY, PROVIDER_KEY];
    for secret in secrets {
        let tail = &secret[secret.len() - 16..];
        assert!(
            !logs.contains(tail),
            "a secret ending {tail} is in the logs"
        );
        assert!(
            !list.contains(tail),
            "a secret ending {tail} is in `keys list`"
        );
        for b in &bodies {
            assert!(
                !b.contains(tail),
                "a secret ending {tail} is in a response: {b}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_the_environment_proxies_is_reached_through_the_proxy() {
    // The simulated provider stands in for the proxy: it routes on the
    // path of the absolute URL a proxy is sent. The deployment's own host
    // can never resolve (`.invalid`), so an answer came through the proxy.
    let mock = MockServer::start(MockConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock");
    let proxy = mock.base_url().trim_end_matches("/v1").to_owned();
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("tollgate.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[deployments]]\nname = \"up\"\nprovider = \"openai_compatible\"\nbase_url = \"http://provider.invalid/v1\"\napi_key_env = \"UPSTREAM_KEY\"\nmodels = [\"gpt-4o\"]\n",
    )
    .expect("config");
    let s = serve_with_env(
        dir.path(),
        &["serve"],
        &dir.path().join("log"),
        &[("HTTP_PROXY", &proxy), ("NO_PROXY", "")],
    );
    let key = dev_key(&s.banner);
    let (status, body) = chat(&s.url, &key, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"usage\""), "{body}");
    stop(s);
}

#[tokio::test(flavor = "multi_thread")]
async fn top_shows_live_traffic_per_key() {
    let dir = tempfile::tempdir().expect("dir");
    let s = serve(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0"],
        &dir.path().join("log"),
    );
    let key = dev_key(&s.banner);
    // The key's counters exist before top's first scrape; then traffic
    // keeps flowing until top has taken its two frames.
    assert_eq!(chat(&s.url, &key, None).await.0, 200);
    let url = s.url.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let done = done.clone();
        async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(chat(&url, &key, None).await.0, 200);
            }
        }
    });
    let top = tokio::task::spawn_blocking({
        let url = s.url.clone();
        move || {
            tollgate()
                .args([
                    "top",
                    "--url",
                    &url,
                    "--every",
                    "200ms",
                    "--iterations",
                    "2",
                ])
                .output()
                .expect("top runs")
        }
    })
    .await
    .expect("top joined");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.await.expect("traffic");
    stop(s);
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let out = String::from_utf8_lossy(&top.stdout);
    assert!(
        out.contains("REQ/S") && out.contains("SPEND (USD)"),
        "{out}"
    );
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("dev"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "one row per frame: {out}");
    let rate: f64 = rows[0][1].parse().expect("req/s");
    assert!(rate > 0.0, "requests were flowing: {out}");
}
