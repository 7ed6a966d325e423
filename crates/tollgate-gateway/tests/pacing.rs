//! Provider limits per deployment: declared or learned from the provider's
//! headers, traffic paced below them so that the provider almost never has
//! to say 429, and balanced to the deployment with the most headroom.

mod common;

use common::{Harness, deployment, error_of, localhost};
use std::sync::Arc;
use std::time::Duration;
use tollgate_mock::{MockConfig, MockServer};

/// A second mock limited like `config`, serving gpt-4o-mini.
async fn limited(config: MockConfig) -> MockServer {
    MockServer::start(config, localhost())
        .await
        .expect("mock starts")
}

fn chat(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"pace me"}}],"max_tokens":{max_tokens}}}"#
    )
}

/// The prompt tokens the provider counts for [`chat`].
async fn prompt_tokens(h: &Harness) -> u64 {
    let resp = h.post("/v1/chat/completions", &chat(1)).await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    body["usage"]["prompt_tokens"].as_u64().expect("usage")
}

#[tokio::test]
async fn a_declared_request_limit_is_paced_not_hit() {
    let rpm = 120;
    let h = Harness::with(
        MockConfig {
            rpm: Some(rpm),
            ..MockConfig::default()
        },
        |c| c.deployments[0].rpm = Some(rpm),
    )
    .await;
    let h = Arc::new(h);
    // The whole burst and ten more: those ten wait their turn (half a
    // second each) in the gateway instead of reaching the provider early.
    let tasks: Vec<_> = (0..rpm + 10)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.post("/v1/chat/completions", &chat(1)).await.status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let stats = h.mock.stats().snapshot();
    assert_eq!(stats.rate_limited, 0, "the provider never had to refuse");
    assert_eq!(stats.completed, rpm + 10);
}

#[tokio::test]
async fn a_request_larger_than_every_provider_limit_is_refused_before_sending() {
    let h = Harness::with(MockConfig::default(), |c| {
        c.deployments[0].tpm = Some(1_000);
    })
    .await;
    let (status, code, retry, body) =
        error_of(h.post("/v1/chat/completions", &chat(5_000)).await).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (429, "request_too_large", "false")
    );
    assert_eq!(body["error"]["scope"], "upstream");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("limit 1000"),
        "{body}"
    );
    assert_eq!(h.mock.stats().snapshot().received, 0);
}

#[tokio::test]
async fn a_deployment_at_its_limit_says_when_it_has_room_again() {
    let h = Harness::with(MockConfig::default(), |c| {
        c.deployments[0].rpm = Some(2);
        c.routing.max_pace_wait = Duration::from_millis(100);
    })
    .await;
    for _ in 0..2 {
        assert_eq!(h.post("/v1/chat/completions", &chat(1)).await.status(), 200);
    }
    // Two a minute: the next has room in 30 s, more than it may wait.
    let resp = h.post("/v1/chat/completions", &chat(1)).await;
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    let (status, code, _, _) = error_of(resp).await;
    assert_eq!((status, code.as_str()), (429, "upstream_rate_limited"));
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert_eq!(h.mock.stats().snapshot().received, 2);
}

/// Two deployments whose provider limits the gateway learns from their
/// headers, both drained to empty; then a minute of traffic at 150% of one
/// deployment's token limit: every request succeeds, the provider almost
/// never refuses, and both deployments carry their share.
#[tokio::test]
async fn a_minute_at_150_percent_of_one_deployment_spreads_without_429s() {
    const TPM: u64 = 30_000;
    const LOAD_SECS: u64 = 60;
    let second = limited(MockConfig {
        tpm: Some(TPM),
        ..MockConfig::default()
    })
    .await;
    let url = second.base_url();
    let h = Harness::with(
        MockConfig {
            tpm: Some(TPM),
            ..MockConfig::default()
        },
        move |c| {
            c.deployments
                .push(deployment("mock-b", url, &["gpt-4o-mini"]));
        },
    )
    .await;
    let prompt = prompt_tokens(&h).await;

    // Empty both buckets (the gateway learns each limit from the first
    // answer, then sends the second drain to the other deployment).
    for _ in 0..2 {
        let resp = h.post("/v1/chat/completions", &chat(TPM - prompt)).await;
        assert_eq!(resp.status(), 200);
    }
    let deployments = h.admin_json("/admin/deployments").await;
    for d in deployments["data"].as_array().expect("list") {
        assert_eq!(d["provider_limits"]["tokens"]["limit"], TPM, "{d}");
        assert_eq!(d["provider_limits"]["learned"], true);
    }

    // 150% of one deployment: 750 tokens/s against 500/s each.
    let max_tokens = 50 - prompt;
    let per_request = prompt + max_tokens;
    let per_second = TPM * 3 / 2 / 60 / per_request;
    let total = per_second * LOAD_SECS;
    let h = Arc::new(h);
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second as u32);
    let mut tasks = Vec::new();
    for _ in 0..total {
        tick.tick().await;
        let h = h.clone();
        let body = chat(max_tokens);
        tasks.push(tokio::spawn(async move {
            let resp = h.post("/v1/chat/completions", &body).await;
            let served_by = resp
                .headers()
                .get("x-tollgate-deployment")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (resp.status().as_u16(), served_by)
        }));
    }
    let mut by_deployment = std::collections::HashMap::<String, u64>::new();
    for t in tasks {
        let (status, served_by) = t.await.expect("task");
        assert_eq!(status, 200, "no client-visible error");
        *by_deployment.entry(served_by).or_default() += 1;
    }
    let throttled = h.mock.stats().snapshot().rate_limited + second.stats().snapshot().rate_limited;
    eprintln!("{total} requests, {throttled} upstream 429s, served by {by_deployment:?}");
    assert!(
        throttled * 100 < total,
        "{throttled} upstream 429s in {total} requests"
    );
    // One deployment alone refills 500 tokens/s: it cannot have carried
    // more than its refill plus nothing (it started empty), so both served.
    let most = by_deployment.values().copied().max().unwrap_or(0);
    let one_alone = (TPM / 60 * (LOAD_SECS + 1)) / per_request;
    assert!(most <= one_alone, "{by_deployment:?}");
}
