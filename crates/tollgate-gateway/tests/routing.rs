//! Pools of deployments over several simulated providers with scripted
//! faults: a throttled deployment cools down and the request moves on
//! unseen; a failing one opens its circuit; when all are cooling, the client
//! hears the true reopening time.

mod common;

use common::{Harness, deployment, error_of, localhost};
use std::time::Duration;
use tollgate_core::clock::FakeClock;
use tollgate_core::limits::calendar::DAY_NS;
use tollgate_gateway::config::{FallbackTrigger, RoutingConfig};
use tollgate_mock::{Fault, MockConfig, MockServer};

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"route me"}],"max_tokens":2}"#;

async fn faulty(fault: Fault) -> MockServer {
    MockServer::start(
        MockConfig {
            fault: Some(fault),
            fault_rate: 1.0,
            ..MockConfig::default()
        },
        localhost(),
    )
    .await
    .expect("mock starts")
}

/// The harness's own mock (`mock-a`, healthy) after `first` (`mock-0`) in
/// the pool of gpt-4o-mini; `first` is tried first on the first request.
async fn pool_behind(first: &MockServer, clock: FakeClock) -> Harness {
    let url = first.base_url();
    Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments
                .insert(0, deployment("mock-0", url, &["gpt-4o-mini"]));
        },
        clock,
    )
    .await
}

fn noon() -> FakeClock {
    FakeClock::new(20_000 * DAY_NS + DAY_NS / 2)
}

#[tokio::test]
async fn a_throttled_deployment_cools_down_and_the_other_serves() {
    let clock = noon();
    let throttled = faulty(Fault::RateLimited(Duration::from_secs(2))).await;
    let h = pool_behind(&throttled, clock.clone()).await;
    for i in 0..20 {
        let resp = h.post("/v1/chat/completions", BODY).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.headers()["x-tollgate-deployment"], "mock-a");
    }
    // Asked once; then left alone for its retry-after.
    assert_eq!(throttled.stats().snapshot().received, 1);
    assert_eq!(h.mock.stats().snapshot().completed, 20);

    clock.advance(Duration::from_secs(2));
    // Its turn comes again: tried (still throttling), and the other serves.
    for _ in 0..2 {
        assert_eq!(h.post("/v1/chat/completions", BODY).await.status(), 200);
    }
    assert_eq!(throttled.stats().snapshot().received, 2);
}

#[tokio::test]
async fn a_failing_deployment_opens_its_circuit() {
    let clock = noon();
    let broken = faulty(Fault::Status(503)).await;
    let h = pool_behind(&broken, clock.clone()).await;
    let mut attempts = Vec::new();
    for _ in 0..30 {
        let resp = h.post("/v1/chat/completions", BODY).await;
        assert_eq!(resp.status(), 200, "the healthy deployment serves");
        attempts.push(
            resp.headers()["x-tollgate-attempts"]
                .to_str()
                .expect("n")
                .to_owned(),
        );
    }
    let open_after = u64::from(RoutingConfig::default().circuit_failures);
    assert_eq!(broken.stats().snapshot().received, open_after);
    assert!(attempts.iter().any(|a| a == "2"), "{attempts:?}");
    let shown = h.admin_json("/admin/deployments").await;
    let mock0 = &shown["data"][0];
    assert_eq!(mock0["name"], "mock-0");
    assert_eq!(mock0["circuit"], "open");
    assert_eq!(mock0["available"], false);
    assert_eq!(shown["data"][1]["circuit"], "closed");
    // Open for 30 s, then one probe.
    clock.advance(RoutingConfig::default().circuit_open_for);
    for _ in 0..4 {
        assert_eq!(h.post("/v1/chat/completions", BODY).await.status(), 200);
    }
    assert_eq!(broken.stats().snapshot().received, open_after + 1);
}

#[tokio::test]
async fn when_every_deployment_is_throttled_the_client_hears_the_first_reopening() {
    let clock = noon();
    let soon = faulty(Fault::RateLimited(Duration::from_secs(3))).await;
    let later = faulty(Fault::RateLimited(Duration::from_secs(7))).await;
    let (soon_url, later_url) = (soon.base_url(), later.base_url());
    let h = Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments = vec![
                deployment("soon", soon_url, &["gpt-4o-mini"]),
                deployment("later", later_url, &["gpt-4o-mini"]),
            ];
        },
        clock.clone(),
    )
    .await;
    let first = h.post("/v1/chat/completions", BODY).await;
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["x-tollgate-attempts"], "2");
    assert_eq!(first.headers()["retry-after"], "3");
    assert_eq!(first.headers()["x-should-retry"], "true");

    // One second on, nothing is tried: the answer is the time left.
    clock.advance(Duration::from_secs(1));
    let (status, code, retry, _) = error_of(h.post("/v1/chat/completions", BODY).await).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (429, "upstream_rate_limited", "true")
    );
    assert_eq!(
        soon.stats().snapshot().received + later.stats().snapshot().received,
        2
    );
    let again = h.post("/v1/chat/completions", BODY).await;
    assert_eq!(again.headers()["retry-after"], "2");
    assert_eq!(again.headers()["retry-after-ms"], "2000");
}

#[tokio::test]
async fn a_caller_error_is_passed_through_and_never_retried_elsewhere() {
    let other = MockServer::start(MockConfig::default(), localhost())
        .await
        .expect("mock");
    let other_url = other.base_url();
    // Both deployments list a model the providers do not have: each answers
    // 404, which is the caller's to hear, from the first deployment asked.
    let h = Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments[0].models.push("gpt-ghost".into());
            c.deployments
                .push(deployment("other", other_url, &["gpt-ghost"]));
        },
        noon(),
    )
    .await;
    let body = BODY.replace("gpt-4o-mini", "gpt-ghost");
    let (status, code, retry, _) = error_of(h.post("/v1/chat/completions", &body).await).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (404, "model_not_found", "false")
    );
    let seen = other.stats().snapshot().received + h.mock.stats().snapshot().received;
    assert_eq!(seen, 1, "a 4xx is never retried on another deployment");
}

/// `broken` as the model's only deployment, retried under `routing`.
async fn alone(broken: &MockServer, routing: RoutingConfig) -> Harness {
    let url = broken.base_url();
    Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments = vec![deployment("only", url, &["gpt-4o-mini"])];
            c.routing = routing;
        },
        noon(),
    )
    .await
}

#[tokio::test]
async fn a_5xx_storm_is_retried_a_bounded_number_of_times() {
    let broken = faulty(Fault::Status(503)).await;
    let h = alone(
        &broken,
        RoutingConfig {
            max_attempts: 4,
            backoff_base: Duration::from_millis(5),
            backoff_cap: Duration::from_millis(20),
            circuit_failures: 0,
            ..RoutingConfig::default()
        },
    )
    .await;
    let resp = h.post("/v1/chat/completions", BODY).await;
    assert_eq!(resp.headers()["x-tollgate-attempts"], "4");
    let (status, _, retry, _) = error_of(resp).await;
    assert_eq!((status, retry.as_str()), (503, "true"));
    assert_eq!(broken.stats().snapshot().received, 4);
}

#[tokio::test]
async fn no_retry_starts_past_the_time_budget() {
    let broken = faulty(Fault::Status(500)).await;
    let h = alone(
        &broken,
        RoutingConfig {
            max_attempts: 50,
            retry_budget: Duration::ZERO,
            circuit_failures: 0,
            ..RoutingConfig::default()
        },
    )
    .await;
    let resp = h.post("/v1/chat/completions", BODY).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(broken.stats().snapshot().received, 1);
}

#[test]
fn retry_delays_are_spread_by_full_jitter() {
    use tollgate_core::backoff::full_jitter;
    let (base, cap) = (Duration::from_millis(100), Duration::from_secs(2));
    // After the third failure the ceiling is 400 ms.
    let waits: Vec<Duration> = (0..100)
        .map(|_| full_jitter(base, cap, 3, fastrand::f64()))
        .collect();
    assert!(waits.iter().all(|w| *w <= Duration::from_millis(400)));
    let (lo, hi) = (
        waits.iter().min().copied().unwrap_or_default(),
        waits.iter().max().copied().unwrap_or_default(),
    );
    assert!(hi - lo > Duration::from_millis(200), "{lo:?}..{hi:?}");
    let distinct: std::collections::HashSet<_> = waits.iter().collect();
    assert!(distinct.len() > 90, "retries must not move in lockstep");
}

#[tokio::test]
async fn the_gateways_retries_are_jittered_end_to_end() {
    let broken = faulty(Fault::Status(503)).await;
    let ceiling = Duration::from_millis(40);
    let h = alone(
        &broken,
        RoutingConfig {
            max_attempts: 2,
            backoff_base: ceiling,
            backoff_cap: ceiling,
            circuit_failures: 0,
            ..RoutingConfig::default()
        },
    )
    .await;
    // Each run is two calls and one backoff drawn from [0, 40 ms): a fixed
    // delay would put every run above 40 ms, lockstep ones all together.
    let mut took = Vec::new();
    for _ in 0..100 {
        let started = std::time::Instant::now();
        let resp = h.post("/v1/chat/completions", BODY).await;
        took.push(started.elapsed());
        assert_eq!(resp.headers()["x-tollgate-attempts"], "2");
    }
    assert_eq!(broken.stats().snapshot().received, 200);
    let half = ceiling / 2;
    let quick = took.iter().filter(|t| **t < half).count();
    let slow = took.iter().filter(|t| **t >= half).count();
    assert!(
        quick >= 10 && slow >= 10,
        "{quick} runs under {half:?}, {slow} over: {took:?}"
    );
}

/// gpt-4o on a throttled provider, gpt-4o-mini on a healthy one, and a
/// fallback chain from the first to the second.
async fn chain(throttled: &MockServer, fallback_on: Option<Vec<FallbackTrigger>>) -> Harness {
    let url = throttled.base_url();
    Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments[0].models = vec!["gpt-4o-mini".into()];
            c.deployments.push(deployment("busy", url, &["gpt-4o"]));
            c.routing
                .fallbacks
                .insert("gpt-4o".into(), vec!["gpt-4o-mini".into()]);
            if let Some(on) = fallback_on {
                c.routing.fallback_on = on;
            }
        },
        noon(),
    )
    .await
}

#[tokio::test]
async fn a_throttled_model_falls_back_and_says_so() {
    let busy = faulty(Fault::RateLimited(Duration::from_secs(5))).await;
    let h = chain(&busy, None).await;
    let body = BODY.replace("gpt-4o-mini", "gpt-4o");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-fallback"], "gpt-4o>gpt-4o-mini");
    assert_eq!(resp.headers()["x-tollgate-model"], "gpt-4o-mini");
    assert_eq!(resp.headers()["x-tollgate-attempts"], "2");
    let answer: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(answer["model"], "gpt-4o-mini");

    // A stream falls back the same way: nothing had reached the client.
    let stream = body.replace(r#""max_tokens":2"#, r#""max_tokens":2,"stream":true"#);
    let resp = h.post("/v1/chat/completions", &stream).await;
    assert_eq!(resp.headers()["x-tollgate-fallback"], "gpt-4o>gpt-4o-mini");
    let (content, _, done, _) = common::parse_sse(&resp.text().await.expect("stream"));
    assert!(done && !content.is_empty());
    // The throttled provider was asked once; then it cooled down.
    assert_eq!(busy.stats().snapshot().received, 1);
}

#[tokio::test]
async fn fallbacks_follow_only_the_configured_failures() {
    let busy = faulty(Fault::RateLimited(Duration::from_secs(5))).await;
    let h = chain(&busy, Some(vec![FallbackTrigger::ServerError])).await;
    let body = BODY.replace("gpt-4o-mini", "gpt-4o");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 429);
    assert!(!resp.headers().contains_key("x-tollgate-fallback"));
    assert_eq!(h.mock.stats().snapshot().received, 0);
}

#[tokio::test]
async fn a_hanging_upstream_times_out_at_first_byte_and_the_next_serves() {
    let hung = faulty(Fault::Hang).await;
    let url = hung.base_url();
    let h = Harness::with_clock(
        MockConfig::default(),
        move |c| {
            let mut d = deployment("hung", url, &["gpt-4o-mini"]);
            d.first_byte_timeout = Some(Duration::from_millis(200));
            c.deployments.insert(0, d);
        },
        noon(),
    )
    .await;
    let resp = h.post("/v1/chat/completions", BODY).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-deployment"], "mock-a");
    assert_eq!(resp.headers()["x-tollgate-attempts"], "2");
    assert_eq!(hung.stats().snapshot().received, 1);
}

/// POSTs [`BODY`] with the request's own timeout header.
async fn post_with(h: &Harness, header: &str, value: &str) -> reqwest::Response {
    h.http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth(&h.key)
        .header("content-type", "application/json")
        .header(header, value)
        .body(BODY)
        .send()
        .await
        .expect("sent")
}

#[tokio::test]
async fn a_request_sets_its_own_timeouts_within_the_gateways_bounds() {
    let hung = faulty(Fault::Hang).await;
    let url = hung.base_url();
    let h = Harness::with_clock(
        MockConfig::default(),
        move |c| {
            c.deployments
                .insert(0, deployment("hung", url, &["gpt-4o-mini"]));
            c.routing.max_request_timeout = Duration::from_secs(60);
        },
        noon(),
    )
    .await;
    // No first-byte timeout configured: the request's own moves it on.
    let resp = post_with(&h, "x-tollgate-first-byte-timeout", "200ms").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-deployment"], "mock-a");
    assert_eq!(resp.headers()["x-tollgate-attempts"], "2");
    assert_eq!(hung.stats().snapshot().received, 1);

    for (header, value) in [
        ("x-tollgate-timeout", "61s"),
        ("x-tollgate-first-byte-timeout", "0s"),
        ("x-tollgate-timeout", "soon"),
    ] {
        let (status, code, _, body) = error_of(post_with(&h, header, value).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_header"),
            "{header}: {value}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(header),
            "{body}"
        );
    }
}

#[tokio::test]
async fn a_requests_total_timeout_bounds_a_hung_call() {
    let hung = faulty(Fault::Hang).await;
    let h = alone(
        &hung,
        RoutingConfig {
            max_attempts: 1,
            ..RoutingConfig::default()
        },
    )
    .await;
    let (status, code, retry, _) =
        error_of(post_with(&h, "x-tollgate-timeout", "300ms").await).await;
    assert_eq!(
        (status, code.as_str(), retry.as_str()),
        (504, "upstream_timeout", "true")
    );
}

#[tokio::test]
async fn an_azure_deployment_gets_its_url_shape_and_api_key_header() {
    let azure = MockServer::start(MockConfig::default(), localhost())
        .await
        .expect("mock");
    let base = format!(
        "{}/openai/deployments/gpt4o-prod",
        azure.base_url().trim_end_matches("/v1")
    );
    let h = Harness::with_clock(
        MockConfig::default(),
        move |c| {
            let mut d = deployment("azure-east", base, &["gpt-4o"]);
            d.provider = tollgate_gateway::config::Provider::Azure;
            c.deployments = vec![d];
        },
        noon(),
    )
    .await;
    let resp = h
        .post(
            "/v1/chat/completions",
            &BODY.replace("gpt-4o-mini", "gpt-4o"),
        )
        .await;
    // The simulated Azure answers only with a key it can read (`api-key`).
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert_eq!(azure.stats().snapshot().completed, 1);
}
