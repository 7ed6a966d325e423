//! `/metrics` after scripted traffic: every counter has the exact value the
//! script implies, the text parses as Prometheus exposition format, and no
//! secret appears in it.
//!
//! Metrics are process-wide, so this binary holds this one test.

mod common;

use common::{Harness, PROVIDER_KEY, deployment, localhost};
use std::sync::Arc;
use tollgate_core::limits::KeyLimits;
use tollgate_core::money::{Budget, Window};
use tollgate_mock::{Fault, MockConfig, MockServer};

const MINI: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"meter me"}],"max_tokens":7}"#;
const BIG: &str =
    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"meter me"}],"max_tokens":7}"#;

/// The value of the sample `name` whose labels include every pair of `labels`.
fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    let [sample] = matching.as_slice() else {
        panic!(
            "one sample of {name} with {labels:?}, found {}",
            matching.len()
        )
    };
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_count_scripted_traffic_exactly() {
    let busy = MockServer::start(
        MockConfig {
            fault: Some(Fault::RateLimited(std::time::Duration::from_secs(30))),
            ..MockConfig::default()
        },
        localhost(),
    )
    .await
    .expect("mock");
    let busy_url = busy.base_url();
    let h = Harness::with(MockConfig::default(), move |c| {
        c.deployments[0].models = vec!["gpt-4o-mini".into()];
        c.deployments
            .push(deployment("busy", busy_url, &["gpt-4o"]));
        c.routing
            .fallbacks
            .insert("gpt-4o".into(), vec!["gpt-4o-mini".into()]);
    })
    .await;
    let metered = h
        .key("metered", |k| {
            k.limits = KeyLimits {
                rpm: Some(3),
                ..KeyLimits::default()
            }
        })
        .await;
    let capped = h.key("capped", |_| {}).await;
    let broke = h.key("broke", |k| k.account = Some("empty".into())).await;
    h.gw()
        .db
        .set_budget(&Budget {
            scope: Arc::from("key:capped"),
            window: Window::Day,
            cap: 1,
            alert_percent: None,
        })
        .await
        .expect("budget");
    h.fund("empty", 1).await;

    // metered: three admitted, two over its 3 rpm.
    let mut usage = (0, 0);
    for i in 0..5 {
        let resp = h.post_as(&metered, "/v1/chat/completions", MINI).await;
        if i < 3 {
            assert_eq!(resp.status(), 200);
            let body: serde_json::Value = resp.json().await.expect("json");
            usage.0 += body["usage"]["prompt_tokens"].as_u64().expect("usage");
            usage.1 += body["usage"]["completion_tokens"].as_u64().expect("usage");
        } else {
            assert_eq!(resp.status(), 429);
        }
    }
    // capped: a $0.000001 budget; broke: an account holding $0.000001.
    assert_eq!(
        h.post_as(&capped, "/v1/chat/completions", MINI)
            .await
            .status(),
        429
    );
    assert_eq!(
        h.post_as(&broke, "/v1/chat/completions", MINI)
            .await
            .status(),
        402
    );
    // The default key asks for gpt-4o: its only deployment is throttled,
    // so gpt-4o-mini serves.
    let resp = h.post("/v1/chat/completions", BIG).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-fallback"], "gpt-4o>gpt-4o-mini");
    // A model nobody serves is not a label.
    let ghost = MINI.replace("gpt-4o-mini", "ghost-model-9000");
    assert_eq!(h.post("/v1/chat/completions", &ghost).await.status(), 404);

    h.gw().money.flush().await;
    let resp = h.http.get(h.url("/metrics")).send().await.expect("scrape");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.expect("text");
    for secret in [
        metered.as_str(),
        capped.as_str(),
        h.key.as_str(),
        PROVIDER_KEY,
    ] {
        assert!(!text.contains(secret), "a secret leaked into /metrics");
    }
    assert!(!text.contains("ghost-model-9000"));
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");

    let requests = |key: &str, model: &str, status: &str, decision: &str| {
        value(
            &scrape,
            "tollgate_requests_total",
            &[
                ("key", key),
                ("model", model),
                ("status", status),
                ("decision", decision),
            ],
        )
    };
    assert_eq!(requests("metered", "gpt-4o-mini", "200", "admitted"), 3.0);
    assert_eq!(
        requests("metered", "gpt-4o-mini", "429", "rate_limited"),
        2.0
    );
    assert_eq!(
        requests("capped", "gpt-4o-mini", "429", "budget_exceeded"),
        1.0
    );
    assert_eq!(
        requests("broke", "gpt-4o-mini", "402", "insufficient_credits"),
        1.0
    );
    assert_eq!(requests("test", "gpt-4o-mini", "200", "admitted"), 1.0);
    assert_eq!(requests("test", "other", "404", "rejected"), 1.0);

    let tokens = |key: &str, direction: &str| {
        value(
            &scrape,
            "tollgate_tokens_total",
            &[
                ("key", key),
                ("model", "gpt-4o-mini"),
                ("direction", direction),
            ],
        )
    };
    assert_eq!(tokens("metered", "input"), usage.0 as f64);
    assert_eq!(tokens("metered", "output"), usage.1 as f64);
    h.gw().money.flush().await;
    let rows = h.gw().db.usage_rows().await.expect("rows");
    let metered_cost: i64 = rows
        .iter()
        .filter(|r| r.key_name.as_deref() == Some("metered"))
        .map(|r| r.cost)
        .sum();
    assert!(metered_cost > 0);
    assert_eq!(
        value(
            &scrape,
            "tollgate_cost_micro_usd_total",
            &[("key", "metered"), ("model", "gpt-4o-mini")]
        ),
        metered_cost as f64
    );

    assert_eq!(
        value(
            &scrape,
            "tollgate_fallbacks_total",
            &[("from", "gpt-4o"), ("to", "gpt-4o-mini")]
        ),
        1.0
    );
    let attempts = |deployment: &str, outcome: &str| {
        value(
            &scrape,
            "tollgate_upstream_attempts_total",
            &[("deployment", deployment), ("outcome", outcome)],
        )
    };
    assert_eq!(attempts("busy", "throttled"), 1.0);
    assert_eq!(attempts("mock-a", "ok"), 4.0);
    assert_eq!(
        value(
            &scrape,
            "tollgate_deployment_circuit_open",
            &[("deployment", "busy")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &scrape,
            "tollgate_deployment_available",
            &[("deployment", "busy")]
        ),
        0.0,
        "cooling down for the provider's 30 s"
    );
    // Every served request's row went through a ledger batch.
    assert_eq!(
        value(&scrape, "tollgate_ledger_batch_rows_sum", &[]),
        rows.len() as f64
    );
    assert_eq!(rows.len(), 4);
}
