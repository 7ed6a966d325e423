//! The gateway relays what the provider says, byte for byte where it matters,
//! over real HTTP on ephemeral ports.

mod common;

use common::{Harness, parse_sse};
use futures_util::StreamExt;
use std::time::Duration;
use tollgate_mock::MockConfig;

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello to the gateway"}],"max_tokens":7}"#;

async fn direct(h: &Harness, path: &str, body: &str) -> reqwest::Response {
    h.http
        .post(format!("{}{path}", h.mock.base_url()))
        .bearer_auth("sk-direct")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("direct call")
}

#[tokio::test]
async fn non_streaming_reply_is_identical_to_the_providers() {
    let h = Harness::start().await;
    let via = h.post("/v1/chat/completions", CHAT).await;
    assert_eq!(via.status(), 200);
    assert_eq!(via.headers()["x-tollgate-model"], "gpt-4o");
    assert_eq!(via.headers()["x-tollgate-deployment"], "mock-a");
    assert!(via.headers().contains_key("x-request-id"));
    let via: serde_json::Value = via.json().await.expect("json");
    let direct: serde_json::Value = direct(&h, "/chat/completions", CHAT)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(via["choices"], direct["choices"]);
    assert_eq!(via["usage"], direct["usage"]);
    assert_eq!(via["usage"]["completion_tokens"], 7);
    assert_eq!(via["object"], "chat.completion");
}

#[tokio::test]
async fn streamed_reply_is_identical_to_the_providers() {
    let h = Harness::start().await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":12,"stream":true,"stream_options":{"include_usage":true}}"#;
    let via = h.post("/v1/chat/completions", body).await;
    assert_eq!(via.status(), 200);
    assert!(
        via.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let (content, usage, done, _) = parse_sse(&via.text().await.expect("text"));
    let (d_content, d_usage, d_done, _) = parse_sse(
        &direct(&h, "/chat/completions", body)
            .await
            .text()
            .await
            .expect("text"),
    );
    assert!(done && d_done, "both streams end with [DONE]");
    assert_eq!(content, d_content);
    assert_eq!(usage, d_usage);
    assert_eq!(usage.expect("usage chunk")["completion_tokens"], 12);
}

#[tokio::test]
async fn completions_and_embeddings_are_relayed() {
    let h = Harness::start().await;
    let c = h
        .post(
            "/v1/completions",
            r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Once upon","max_tokens":4}"#,
        )
        .await;
    assert_eq!(c.status(), 200);
    let c: serde_json::Value = c.json().await.expect("json");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 4);
    let e = h
        .post(
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":["a","b"],"dimensions":8}"#,
        )
        .await;
    assert_eq!(e.status(), 200);
    let e: serde_json::Value = e.json().await.expect("json");
    assert_eq!(e["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(e["data"][0]["embedding"].as_array().map(Vec::len), Some(8));
}

#[tokio::test]
async fn models_lists_what_the_key_may_use() {
    let h = Harness::start().await;
    let (_, limited) = h
        .gw()
        .db
        .create_key(tollgate_store::NewKey {
            name: "limited".into(),
            models: Some(vec!["gpt-4o-mini".into()]),
            ..Default::default()
        })
        .await
        .expect("key");
    let all: serde_json::Value = h
        .http
        .get(h.url("/v1/models"))
        .bearer_auth(&h.key)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(all["data"].as_array().map(Vec::len), Some(4));
    let some: serde_json::Value = h
        .http
        .get(h.url("/v1/models"))
        .bearer_auth(limited.expose())
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = some["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["gpt-4o-mini"]);
}

#[tokio::test]
async fn client_request_id_is_propagated_and_one_is_made_otherwise() {
    let h = Harness::start().await;
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("x-request-id", "trace-abc-123")
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.headers()["x-request-id"], "trace-abc-123");
    let resp = h
        .http
        .get(h.url("/no/such/route"))
        .send()
        .await
        .expect("sent");
    assert!(
        resp.headers()["x-request-id"]
            .to_str()
            .unwrap_or_default()
            .starts_with("req_")
    );
}

#[tokio::test]
async fn client_that_hangs_up_mid_stream_cancels_the_upstream_call() {
    let mock = MockConfig {
        tokens_per_second: Some(50),
        ..MockConfig::default()
    };
    let h = Harness::with(mock, |_| {}).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":500,"stream":true}"#;
    let resp = h.post("/v1/chat/completions", body).await;
    let mut chunks = resp.bytes_stream();
    let first = chunks.next().await.expect("a first chunk").expect("bytes");
    assert!(first.starts_with(b"data: "));
    drop(chunks);
    let stats = h
        .mock
        .stats()
        .wait_until(Duration::from_secs(10), |s| s.cancelled >= 1)
        .await;
    assert_eq!(stats.cancelled, 1, "the mock saw the cancellation");
    assert_eq!(stats.completed, 0);
    assert!(
        stats.completion_tokens < 500,
        "the upstream stopped producing: {}",
        stats.completion_tokens
    );
}

#[tokio::test]
async fn http2_cleartext_is_served() {
    let h = Harness::start().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let resp = client
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_stream_outlasting_the_read_timeout_runs_to_its_end() {
    // 30 tokens at 20 a second: five times the read timeout. The timeout
    // is for the client's request, not for the answer it is reading.
    let mock = MockConfig {
        tokens_per_second: Some(20),
        ..MockConfig::default()
    };
    let h = Harness::with(mock, |c| c.server.read_timeout = Duration::from_millis(300)).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":30,"stream":true}"#;
    let resp = h.post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let (content, _, done, _) = parse_sse(&resp.text().await.expect("stream completes"));
    assert!(done, "the stream ran to [DONE]");
    assert_eq!(tollgate_core::tokens::Encoding::O200k.count(&content), 30);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish() {
    let mock = MockConfig {
        tokens_per_second: Some(100),
        ..MockConfig::default()
    };
    let h = Harness::with(mock, |_| {}).await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":40,"stream":true}"#;
    let resp = h.post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let Harness { gateway, .. } = h;
    let shutdown = tokio::spawn(gateway.shutdown());
    let (content, _, done, _) = parse_sse(&resp.text().await.expect("stream completes"));
    assert!(done, "the stream ran to [DONE] despite the shutdown");
    assert_eq!(tollgate_core::tokens::Encoding::O200k.count(&content), 40);
    shutdown.await.expect("joined").expect("clean shutdown");
}

#[tokio::test]
async fn a_stream_longer_than_the_grace_period_is_cut_and_the_shutdown_ends() {
    let mock = MockConfig {
        // 600 tokens at 20 a second: half a minute, far past the grace.
        tokens_per_second: Some(20),
        ..MockConfig::default()
    };
    let h = Harness::with(mock, |c| {
        c.server.shutdown_grace = Duration::from_millis(200)
    })
    .await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":600,"stream":true}"#;
    let resp = h.post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 200);
    let Harness { gateway, .. } = h;
    let shutdown = tokio::spawn(gateway.shutdown());
    // The client sees its stream end (cut, or an error) long before the
    // mock would have finished it, and the gateway stops.
    let text = resp.text().await.unwrap_or_default();
    let (content, _, done, _) = parse_sse(&text);
    assert!(!done, "the stream was cut at the end of the grace period");
    assert!(
        tollgate_core::tokens::Encoding::O200k.count(&content) < 600,
        "not every token arrived"
    );
    shutdown
        .await
        .expect("joined")
        .expect("shutdown ends after the grace period");
}
