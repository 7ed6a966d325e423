//! `kill -9` under load: every answer a client received in full has its
//! usage row, no row is written twice, and the account's balance equals its
//! top-ups minus the settled costs, to the micro-dollar.

mod common;

use common::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tollgate_store::Database;

const CREDITS: i64 = 100_000_000; // $100: the load never runs out
/// Answers received in full before the kill.
const KILL_AFTER: usize = 400;

/// Answers received so far, and a signal when there are enough.
#[derive(Default)]
struct Progress {
    count: AtomicUsize,
    reached: tokio::sync::Notify,
}

fn cli(dir: &std::path::Path, args: &[&str]) -> String {
    let out = tollgate()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("tollgate runs");
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends requests until the gateway dies; returns the ids of the answers
/// received in full (a whole JSON body, or a stream through `[DONE]`).
async fn load(url: String, key: String, i: usize, done: Arc<Progress>) -> Vec<String> {
    let http = http();
    let stream = i % 2 == 1;
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": format!("client {i}")}],
        "max_tokens": 8 + i,
        "stream": stream,
    })
    .to_string();
    let mut complete = Vec::new();
    loop {
        let Ok(resp) = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
        else {
            return complete;
        };
        assert_eq!(resp.status(), 200, "the load stays within every limit");
        let id = resp.headers()["x-request-id"]
            .to_str()
            .expect("id")
            .to_owned();
        let Ok(text) = resp.text().await else {
            return complete;
        };
        let whole = if stream {
            text.contains("data: [DONE]")
        } else {
            serde_json::from_str::<serde_json::Value>(&text).is_ok()
        };
        if whole {
            complete.push(id);
            if done.count.fetch_add(1, Ordering::Relaxed) + 1 == KILL_AFTER {
                done.reached.notify_one();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_dash_nine_loses_no_row_and_writes_none_twice() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("tollgate.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[deployments]]\nname = \"sim\"\nprovider = \"mock\"\nmodels = [\"gpt-4o-mini\"]\nmock = { ttft = \"2ms\", tokens_per_second = 2000 }\n",
    )
    .expect("config");
    cli(
        dir.path(),
        &["credits", "add", "acme", "100.00", "--why", "crash test"],
    );
    let created: serde_json::Value = serde_json::from_str(&cli(
        dir.path(),
        &[
            "keys",
            "create",
            "--name",
            "load",
            "--account",
            "acme",
            "--json",
        ],
    ))
    .expect("key JSON");
    let key = created["secret"].as_str().expect("secret").to_owned();

    let log = dir.path().join("first.log");
    let mut first = serve(dir.path(), &["serve"], &log);
    let done = Arc::new(Progress::default());
    let clients: Vec<_> = (0..16)
        .map(|i| tokio::spawn(load(first.url.clone(), key.clone(), i, done.clone())))
        .collect();
    // Kill mid-run, once a good number of answers went out.
    done.reached.notified().await;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    let mut complete = Vec::new();
    for c in clients {
        complete.extend(c.await.expect("client"));
    }
    assert!(complete.len() >= KILL_AFTER);

    // Restart on the same database: the holds of the cut requests go.
    let log2 = dir.path().join("second.log");
    let second = serve(dir.path(), &["serve"], &log2);
    stop(second);

    let db = Database::open(&dir.path().join("tollgate.db").to_string_lossy())
        .await
        .expect("db");
    let rows = db.usage_rows().await.expect("rows");
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "a usage row was written twice");
    let missing: Vec<&String> = complete
        .iter()
        .filter(|id| !ids.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answers received in full have no usage row: {:?}",
        missing.len(),
        complete.len(),
        &missing[..missing.len().min(5)]
    );
    let spent: i64 = rows.iter().map(|r| r.cost).sum();
    let account = db.find_account("acme").await.expect("account");
    assert_eq!(
        account.balance,
        CREDITS - spent,
        "balance = top-ups − settled costs"
    );
    assert!(spent > 0);
    assert!(
        db.release_stale_holds().await.expect("holds").is_empty(),
        "the restart released every hold"
    );
}
