//! The real binary: first start on the embedded default, keys made by the
//! CLI in another process, and no secret in any log line or error body.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use tollgate_mock::{MockConfig, MockServer};

const ADMIN_KEY: &str = "admin-secret-9f8e7d6c5b4a";
const PROVIDER_KEY: &str = "sk-provider-secret-0a1b2c3d4e5f";

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// A running `tollgate serve`, its banner, and its log file.
struct Served {
    child: Child,
    url: String,
    banner: Vec<String>,
    stdout_rest: mpsc::Receiver<String>,
}

fn serve(dir: &Path, args: &[&str], log_file: &Path) -> Served {
    let mut child = tollgate()
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "debug")
        .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
        .env("UPSTREAM_KEY", PROVIDER_KEY)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log_file).expect("log file"))
        .spawn()
        .expect("tollgate starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("serve prints its banner");
        let done = line.starts_with("tollgate listening on ");
        banner.push(line);
        if done {
            break;
        }
    }
    let url = banner
        .last()
        .and_then(|l| l.strip_prefix("tollgate listening on "))
        .and_then(|l| l.split_whitespace().next())
        .expect("url")
        .to_owned();
    Served {
        child,
        url,
        banner,
        stdout_rest: rx,
    }
}

fn stop(mut s: Served) -> String {
    let ok = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "SIGTERM sent");
    let status = s.child.wait().expect("exits");
    assert!(status.success(), "graceful exit on SIGTERM: {status:?}");
    s.stdout_rest.try_iter().collect::<Vec<_>>().join("\n")
}

fn dev_key(banner: &[String]) -> String {
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("tg-").map(|k| format!("tg-{k}")))
        .expect("the first start prints a key")
}

fn http() -> reqwest::Client {
    // The workspace builds reqwest without a default crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn chat(url: &str, key: &str, fault: Option<&str>) -> (u16, String) {
    let mut req = http()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#);
    if let Some(f) = fault {
        req = req.header("x-mock-fault", f);
    }
    let resp = req.send().await.expect("sent");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

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

    stop(s);
    let logs = std::fs::read_to_string(&log).expect("logs");
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    }
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
