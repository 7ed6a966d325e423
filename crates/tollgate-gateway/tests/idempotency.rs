//! `Idempotency-Key` through the gateway: at most one upstream execution
//! and one charge per key, whatever the client does.

mod common;

use common::{Harness, error_of, parse_sse};
use std::time::Duration;
use tollgate_mock::MockConfig;

fn slow_mock() -> MockConfig {
    MockConfig {
        ttft: Duration::from_millis(300),
        ..MockConfig::default()
    }
}

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"once"}],"max_tokens":6}"#;

async fn post_idem(h: &Harness, key: &str, idem: &str, body: &str) -> reqwest::Response {
    h.http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .header("idempotency-key", idem)
        .body(body.to_owned())
        .send()
        .await
        .expect("sent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_duplicates_execute_and_charge_once() {
    let h = Harness::with(slow_mock(), |_| {}).await;
    let key = h.key("idem", |k| k.account = Some("acme".into())).await;
    h.fund("acme", 1_000_000).await;

    let sends = (0..20).map(|_| post_idem(&h, &key, "order-1042", BODY));
    let mut bodies = Vec::new();
    let mut replays = 0;
    for resp in futures_util::future::join_all(sends).await {
        assert_eq!(resp.status(), 200);
        replays += usize::from(resp.headers().contains_key("x-tollgate-idempotent-replay"));
        bodies.push(resp.text().await.expect("body"));
    }
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every duplicate gets the same answer"
    );
    assert_eq!(replays, 19);
    assert_eq!(
        h.mock.stats().snapshot().received,
        1,
        "one upstream execution"
    );
    let (rows, balance) = h.ledger("acme").await;
    assert_eq!(rows.len(), 1, "billed once");
    assert_eq!(balance, 1_000_000 - rows[0].cost);
}

#[tokio::test]
async fn a_key_reused_for_another_body_is_refused() {
    let h = Harness::start().await;
    assert_eq!(post_idem(&h, &h.key, "k-1", BODY).await.status(), 200);
    let other = BODY.replace("once", "twice");
    let (status, code, retry, _) = error_of(post_idem(&h, &h.key, "k-1", &other).await).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (422, "idempotency_key_reused", "false")
    );
    // Keys are per API key: another key may use the same idempotency key.
    let second = h.key("second", |_| {}).await;
    assert_eq!(post_idem(&h, &second, "k-1", &other).await.status(), 200);
    assert_eq!(h.mock.stats().snapshot().received, 2);
}

#[tokio::test]
async fn a_failed_attempt_is_not_kept() {
    let h = Harness::start().await;
    let failed = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("content-type", "application/json")
        .header("idempotency-key", "retry-me")
        .header("x-mock-fault", "500")
        .body(BODY)
        .send()
        .await
        .expect("sent");
    assert!(failed.status().is_server_error());
    let again = post_idem(&h, &h.key, "retry-me", BODY).await;
    assert_eq!(again.status(), 200);
    assert!(!again.headers().contains_key("x-tollgate-idempotent-replay"));
    // The gateway's own retries of the failed one, then the new execution.
    let retries = tollgate_gateway::config::RoutingConfig::default().max_attempts;
    assert_eq!(h.mock.stats().snapshot().received, u64::from(retries) + 1);
}

#[tokio::test]
async fn a_stream_is_replayed_as_a_stream() {
    let h = Harness::start().await;
    let body = BODY.replace(r#""max_tokens":6"#, r#""max_tokens":6,"stream":true"#);
    let first = post_idem(&h, &h.key, "stream-1", &body).await;
    assert_eq!(first.status(), 200);
    let first = first.text().await.expect("stream");
    let again = post_idem(&h, &h.key, "stream-1", &body).await;
    assert_eq!(again.headers()["x-tollgate-idempotent-replay"], "true");
    assert!(
        again.headers()["content-type"]
            .to_str()
            .is_ok_and(|ct| ct.starts_with("text/event-stream"))
    );
    let again = again.text().await.expect("stream");
    assert_eq!(first, again);
    let (content, _, done, _) = parse_sse(&again);
    assert!(done && !content.is_empty());
    assert_eq!(h.mock.stats().snapshot().received, 1);
}

#[tokio::test]
async fn a_client_that_hangs_up_and_retries_gets_the_first_execution() {
    let h = Harness::with(slow_mock(), |_| {}).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .expect("client");
    let lost = impatient
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("content-type", "application/json")
        .header("idempotency-key", "lost-answer")
        .body(BODY)
        .send()
        .await;
    assert!(lost.is_err(), "the first answer is lost");
    // The retry waits for the execution the first attempt started.
    let retry = post_idem(&h, &h.key, "lost-answer", BODY).await;
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["x-tollgate-idempotent-replay"], "true");
    let stats = h.mock.stats().snapshot();
    assert_eq!((stats.received, stats.completed), (1, 1), "{stats:?}");
}
