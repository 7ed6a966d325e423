//! The real `tollgate serve` in a child process, for the binary's tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const ADMIN_KEY: &str = "admin-secret-9f8e7d6c5b4a";
pub const PROVIDER_KEY: &str = "sk-provider-secret-0a1b2c3d4e5f";

pub fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

/// A running `tollgate serve`, its banner, and its log file.
pub struct Served {
    pub child: Child,
    pub url: String,
    pub banner: Vec<String>,
    pub stdout_rest: mpsc::Receiver<String>,
}

pub fn serve(dir: &Path, args: &[&str], log_file: &Path) -> Served {
    serve_with_env(dir, args, log_file, &[])
}

/// `serve` with more environment variables.
pub fn serve_with_env(dir: &Path, args: &[&str], log_file: &Path, env: &[(&str, &str)]) -> Served {
    let mut child = tollgate()
        .args(args)
        .envs(env.iter().copied())
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

pub fn stop(mut s: Served) -> String {
    let ok = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .is_ok_and(|st| st.success());
    assert!(ok, "SIGTERM sent");
    let status = s.child.wait().expect("exits");
    assert!(status.success(), "graceful exit on SIGTERM: {status:?}");
    s.stdout_rest.try_iter().collect::<Vec<_>>().join("\n")
}

pub fn dev_key(banner: &[String]) -> String {
    banner
        .iter()
        .find_map(|l| l.trim().strip_prefix("tg-").map(|k| format!("tg-{k}")))
        .expect("the first start prints a key")
}

pub fn http() -> reqwest::Client {
    // The workspace builds reqwest without a default crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

pub async fn chat(url: &str, key: &str, fault: Option<&str>) -> (u16, String) {
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
