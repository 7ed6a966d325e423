//! The opt-in model fallback list against the simulated provider: a model
//! the server does not have, or one whose retries run out, hands the request
//! to the next model; anything else does not.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tollgate_client::{Client, ClientConfig, Error, RetryPolicy};
use tollgate_mock::{Fault, MockConfig, MockServer};

async fn mock(config: MockConfig) -> MockServer {
    MockServer::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("mock starts")
}

fn client(mock: &MockServer, fallback: &[&str]) -> Client {
    let mut config = ClientConfig::new(mock.base_url(), "sk-fallback-test");
    config.fallback_models = fallback.iter().map(|m| (*m).to_owned()).collect();
    config.retry = RetryPolicy {
        base: Duration::from_millis(1),
        cap: Duration::from_millis(5),
        max_attempts: 3,
        ..RetryPolicy::default()
    };
    Client::new(config).expect("client")
}

fn chat(model: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#
    ))
}

#[tokio::test]
async fn a_missing_model_falls_back_to_the_next_one() {
    let mock = mock(MockConfig {
        models: vec!["gpt-4o-mini".into()],
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock, &["gpt-4o-mini"]);
    let answer = c
        .post_json("/chat/completions", chat("gpt-retired"))
        .await
        .expect("the fallback answers");
    assert_eq!(answer.fallback_model.as_deref(), Some("gpt-4o-mini"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(c.counters.sent.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn without_a_list_a_missing_model_fails_fast() {
    let mock = mock(MockConfig::default()).await;
    let c = client(&mock, &[]);
    let e = c
        .post_json("/chat/completions", chat("gpt-retired"))
        .await
        .expect_err("no fallback");
    assert!(matches!(e, Error::Rejected { status: 404, .. }), "{e}");
    assert_eq!(c.counters.sent.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn each_model_gets_its_own_retries_when_the_server_is_down() {
    let mock = mock(MockConfig {
        fault: Some(Fault::Status(503)),
        fault_rate: 1.0,
        ..MockConfig::default()
    })
    .await;
    let c = client(&mock, &["gpt-4o-mini"]);
    let e = c
        .post_json("/chat/completions", chat("gpt-4o"))
        .await
        .expect_err("every model is down");
    assert!(matches!(e, Error::GaveUp { status: 503, .. }), "{e}");
    // Three attempts on gpt-4o, then three on the fallback.
    assert_eq!(c.counters.sent.load(Ordering::Relaxed), 6);
}
