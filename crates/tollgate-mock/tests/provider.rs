//! The simulated provider answers like OpenAI: limits and their headers,
//! 429 wording, usage, stream shape, faults.

use serde_json::Value;
use std::net::SocketAddr;
use tollgate_mock::{MockConfig, MockServer};

async fn start(config: MockConfig) -> (MockServer, reqwest::Client) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = MockServer::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("starts");
    (server, reqwest::Client::new())
}

async fn chat(m: &MockServer, http: &reqwest::Client, key: &str, body: &str) -> reqwest::Response {
    http.post(format!("{}/chat/completions", m.base_url()))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("sent")
}

const HELLO: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}],"max_tokens":4}"#;

#[tokio::test]
async fn rpm_limit_counts_down_then_refuses_like_openai() {
    let (m, http) = start(MockConfig {
        rpm: Some(3),
        ..MockConfig::default()
    })
    .await;
    for remaining in ["2", "1", "0"] {
        let r = chat(&m, &http, "sk-a", HELLO).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], remaining);
        assert!(
            r.headers()["x-ratelimit-reset-requests"]
                .to_str()
                .unwrap_or_default()
                .ends_with('s')
        );
    }
    let r = chat(&m, &http, "sk-a", HELLO).await;
    assert_eq!(r.status(), 429);
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap_or_default()
        .parse()
        .expect("whole seconds");
    assert!((1..=20).contains(&after), "{after}");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(
            "on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in"
        ),
        "{msg}"
    );
    // Limits are per API key.
    assert_eq!(chat(&m, &http, "sk-b", HELLO).await.status(), 200);
    assert_eq!(m.stats().snapshot().rate_limited, 1);
}

#[tokio::test]
async fn tpm_counts_max_tokens_up_front_and_refuses_what_can_never_fit() {
    let (m, http) = start(MockConfig {
        tpm: Some(100),
        ..MockConfig::default()
    })
    .await;
    // 9 prompt tokens + 4 max_tokens.
    let r = chat(&m, &http, "sk", HELLO).await;
    assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "87");
    let big = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}],"max_tokens":500}"#;
    let r = chat(&m, &http, "sk", big).await;
    assert_eq!(r.status(), 429);
    assert!(
        r.headers().get("retry-after").is_none(),
        "waiting will not help"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Request too large")
    );
}

#[tokio::test]
async fn usage_is_counted_with_the_tokenizer_and_reply_follows_max_tokens() {
    let (m, http) = start(MockConfig::default()).await;
    let body: Value = chat(&m, &http, "sk", HELLO)
        .await
        .json()
        .await
        .expect("json");
    // OpenAI's chat accounting: 3 per message + role + content, 3 to prime the reply.
    assert_eq!(body["usage"]["prompt_tokens"], 3 + 1 + 2 + 3);
    assert_eq!(body["usage"]["completion_tokens"], 4);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "the quick brown fox"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let no_cap: Value = chat(&m, &http, "sk", r#"{"model":"gpt-4o","messages":[]}"#)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(no_cap["usage"]["completion_tokens"], 16);
    assert_eq!(no_cap["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn stream_chunks_carry_usage_null_only_when_usage_was_asked_for() {
    let (m, http) = start(MockConfig::default()).await;
    for include in [true, false] {
        let body = format!(
            r#"{{"model":"gpt-4o","messages":[],"max_tokens":3,"stream":true,"stream_options":{{"include_usage":{include}}}}}"#
        );
        let text = chat(&m, &http, "sk", &body)
            .await
            .text()
            .await
            .expect("text");
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(*events.last().expect("events"), "data: [DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e.trim_start_matches("data: ")).expect("json"))
            .collect();
        // role chunk, 3 words, finish chunk, and the usage chunk when asked for.
        assert_eq!(chunks.len(), if include { 6 } else { 5 });
        for c in &chunks[..5] {
            assert_eq!(c.get("usage").is_some(), include, "{c}");
            assert!(c["usage"].is_null());
        }
        if include {
            assert_eq!(chunks[5]["choices"], Value::Array(vec![]));
            assert_eq!(chunks[5]["usage"]["completion_tokens"], 3);
        }
    }
}

#[tokio::test]
async fn requests_without_a_key_and_unknown_models_are_refused() {
    let (m, http) = start(MockConfig::default()).await;
    let r = http
        .post(format!("{}/chat/completions", m.base_url()))
        .body(HELLO)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 401);
    let r = chat(&m, &http, "sk", r#"{"model":"gpt-9","messages":[]}"#).await;
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn injected_reset_breaks_the_connection_and_process_faults_hit_every_request() {
    let (m, http) = start(MockConfig::default()).await;
    let r = http
        .post(format!("{}/chat/completions", m.base_url()))
        .bearer_auth("sk")
        .header("x-mock-fault", "reset")
        .body(HELLO)
        .send()
        .await;
    assert!(r.is_err(), "no response, only a broken connection");

    let faulty = MockConfig {
        fault: "503".parse().ok(),
        ..MockConfig::default()
    };
    let (m, http) = start(faulty).await;
    for _ in 0..3 {
        assert_eq!(chat(&m, &http, "sk", HELLO).await.status(), 503);
    }
    let stats: Value = http
        .get(format!("http://{}/mock/stats", m.addr()))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["faulted"], 3);
}

#[tokio::test]
async fn azure_routes_want_an_api_version_and_an_api_key() {
    let (m, http) = start(MockConfig::default()).await;
    let url = format!(
        "{}/openai/deployments/gpt4o-prod/chat/completions",
        m.base_url().trim_end_matches("/v1")
    );
    let send = |query: &'static str, header: (&'static str, &'static str)| {
        http.post(format!("{url}{query}"))
            .header(header.0, header.1)
            .header("content-type", "application/json")
            .body(HELLO)
            .send()
    };
    let no_version = send("", ("api-key", "k")).await.expect("sent");
    assert_eq!(no_version.status(), 404);
    let bearer = send("?api-version=2024-10-21", ("authorization", "Bearer k"))
        .await
        .expect("sent");
    assert_eq!(bearer.status(), 401);
    let right = send("?api-version=2024-10-21", ("api-key", "k"))
        .await
        .expect("sent");
    assert_eq!(right.status(), 200);
    let body: Value = right.json().await.expect("JSON");
    assert_eq!(body["object"], "chat.completion");
}
