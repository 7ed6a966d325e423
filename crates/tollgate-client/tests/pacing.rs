//! Against the simulated provider with its own RPM limit: a client that
//! knows the limit never hears a 429, and one that does not (retrying on
//! 429 only) gets there too, but through a storm of refusals.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tollgate_client::{Client, ClientConfig, RetryPolicy};
use tollgate_mock::{MockConfig, MockServer};

const REQUESTS: usize = 620;
const RPM: u64 = 600;

async fn run(paced: bool) -> (Arc<Client>, tollgate_mock::StatsSnapshot) {
    let mock = MockServer::start(
        MockConfig {
            rpm: Some(RPM),
            ..MockConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .expect("mock starts");
    let mut config = ClientConfig::new(mock.base_url(), "sk-client-test");
    config.concurrency = 32;
    config.rpm = paced.then_some(RPM);
    config.retry = RetryPolicy {
        max_attempts: 50,
        ..RetryPolicy::default()
    };
    let client = Arc::new(Client::new(config).expect("client"));
    let body = Bytes::from_static(
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":1}"#,
    );
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let (client, body) = (client.clone(), body.clone());
            tokio::spawn(async move { client.post_json("/chat/completions", body).await })
        })
        .collect();
    for t in tasks {
        let answer = t.await.expect("joined").expect("every request succeeds");
        assert_eq!(answer.status, 200);
    }
    (client, mock.stats().snapshot())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paced_client_never_hears_a_429() {
    let (client, stats) = run(true).await;
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(client.counters.throttled.load(Ordering::Relaxed), 0);
    assert_eq!(
        client.counters.sent.load(Ordering::Relaxed),
        REQUESTS as u64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unpaced_client_gets_there_through_refusals() {
    let (client, stats) = run(false).await;
    let throttled = client.counters.throttled.load(Ordering::Relaxed);
    assert!(throttled > 0, "the mock refused some: {stats:?}");
    assert_eq!(stats.rate_limited, throttled);
    assert_eq!(
        client.counters.sent.load(Ordering::Relaxed),
        REQUESTS as u64 + throttled
    );
}
