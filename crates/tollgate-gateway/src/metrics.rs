//! Prometheus metrics: the `metrics` facade, recorded where things happen,
//! rendered by `/metrics`.
//!
//! Labels are bounded: key *names* (never secrets), configured model and
//! deployment names, status codes and fixed words. No end user, request id
//! or client-chosen string ever becomes a label: a model the gateway does
//! not serve is counted as `other`.

use crate::Gateway;
use crate::limits::Plan;
use hashbrown::Equivalent;
use metrics::{Counter, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::RefCell;
use std::hash::Hash;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;
use thread_local::ThreadLocal;
use tollgate_core::limits::Grant;

/// What the gateway decided about a request, as the `decision` label says it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Decision {
    /// Turned away before admission: bad input, unknown model, no key.
    #[default]
    Rejected,
    /// Admitted at once.
    Admitted,
    /// Admitted after waiting in its key's queue.
    Queued,
    /// Refused by a rate limit or daily cap.
    RateLimited,
    /// Refused by a spent budget.
    BudgetExceeded,
    /// Refused for lack of credit.
    InsufficientCredits,
    /// Answered from the idempotency store, not executed again.
    Replayed,
}

impl Decision {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Rejected => "rejected",
            Decision::Admitted => "admitted",
            Decision::Queued => "queued",
            Decision::RateLimited => "rate_limited",
            Decision::BudgetExceeded => "budget_exceeded",
            Decision::InsufficientCredits => "insufficient_credits",
            Decision::Replayed => "replayed",
        }
    }
}

/// The process's Prometheus recorder, installed once: metrics are process-
/// wide, like the port a gateway listens on.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ];
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("tollgate_ledger_batch_rows".into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("tollgate_limit_utilization_ratio".into()),
                    &[0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            // Only an empty bucket list fails, and these are constants.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "another metrics recorder is installed; /metrics shows only what reaches this one"
            );
        }
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tollgate_requests_total",
        "API requests by key name, model, status and admission decision"
    );
    describe_counter!(
        "tollgate_tokens_total",
        "Tokens settled, by key name, model and direction (input, output)"
    );
    describe_counter!(
        "tollgate_cost_micro_usd_total",
        "Spend settled in micro-USD, by key name and model"
    );
    describe_histogram!(
        "tollgate_limit_utilization_ratio",
        "Share of the tightest limit used after an admission, by subject kind and dimension"
    );
    describe_gauge!(
        "tollgate_queue_depth",
        "Requests waiting in a key's queue for a limit"
    );
    describe_histogram!(
        "tollgate_queue_wait_seconds",
        "Time admitted requests spent queued"
    );
    describe_histogram!(
        "tollgate_upstream_first_byte_seconds",
        "Time to the upstream's response headers, by deployment"
    );
    describe_histogram!(
        "tollgate_upstream_seconds",
        "Time waiting on the upstream (whole body, or headers for a stream), by deployment"
    );
    describe_counter!(
        "tollgate_upstream_attempts_total",
        "Upstream calls by deployment and outcome (ok, throttled, caller_error, timeout, unreachable, invalid, server_error, auth)"
    );
    describe_counter!(
        "tollgate_fallbacks_total",
        "Requests moved down a fallback chain, by model asked for and fallback"
    );
    describe_gauge!(
        "tollgate_deployment_circuit_open",
        "1 while a deployment's circuit is open"
    );
    describe_gauge!(
        "tollgate_deployment_available",
        "1 while a deployment takes traffic (not cooling down, circuit closed)"
    );
    describe_gauge!(
        "tollgate_deployment_headroom_ratio",
        "Share of a deployment's provider limit left, by dimension"
    );
    describe_histogram!(
        "tollgate_redis_seconds",
        "Round trip of one limit script call to Redis, by op (admit, reconcile)"
    );
    describe_counter!(
        "tollgate_redis_errors_total",
        "Limit script calls to Redis that failed"
    );
    describe_gauge!(
        "tollgate_limit_store_available",
        "1 while limit decisions reach their store; 0 while Redis is down (the replica fails closed, or decides alone with its share when failing open)"
    );
    describe_gauge!(
        "tollgate_live_replicas",
        "Gateway replicas announcing themselves through Redis (the divisor of each replica's share while Redis is down)"
    );
    describe_counter!(
        "tollgate_limit_local_decisions_total",
        "Limit decisions a replica made alone, with its share, while Redis was down (fail_open)"
    );
    describe_histogram!(
        "tollgate_ledger_commit_seconds",
        "Time to commit one batch of usage rows"
    );
    describe_histogram!("tollgate_ledger_batch_rows", "Usage rows per ledger commit");
}

/// Drains histogram samples into their buckets every few seconds, so that
/// memory stays flat between scrapes.
pub async fn upkeep(handle: &'static PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// The label for a model: its name when the gateway serves it, else `other`.
pub fn model_label<'a>(gw: &Gateway, model: Option<&'a Arc<str>>) -> &'a Arc<str> {
    static OTHER: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("other"));
    match model {
        Some(m) if gw.routes.contains_key(&**m) => m,
        _ => &OTHER,
    }
}

/// The label for a request without a key.
pub fn no_key() -> &'static Arc<str> {
    static NONE: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from("-"));
    &NONE
}

/// Handles of the series a label set records into on every request,
/// registered on each thread's first request with them: looking a series
/// up by name and labels costs more than the rest of recording (a key
/// built, hashed and compared, several times a request). Each thread
/// keeps handles of its own: one map shared by the serving threads took
/// a contended lock and a shared reference count five times a request
/// (0.3 µs at full speed on two cores, with threads put to sleep on the
/// lock). The series themselves are the registry's, one for all threads.
struct SeriesCache<K: Send, V: Send + Sync>(LazyLock<ThreadLocal<RefCell<SeriesMap<K, V>>>>);

type SeriesMap<K, V> = hashbrown::HashMap<K, Arc<V>, foldhash::fast::RandomState>;

impl<K: Eq + Hash + Send, V: Send + Sync> SeriesCache<K, V> {
    const fn new() -> Self {
        Self(LazyLock::new(ThreadLocal::new))
    }

    /// The series of `labels`, registered with the labels `K` makes of
    /// them on this thread's first use.
    fn get<Q>(&self, labels: &Q, register: impl FnOnce(&Q) -> (K, V)) -> Arc<V>
    where
        Q: Hash + Equivalent<K> + ?Sized,
    {
        let mut map = self.0.get_or_default().borrow_mut();
        if let Some(series) = map.get(labels) {
            return series.clone();
        }
        // Registered against the gateway's recorder, never the no-op one
        // that stands in before it is installed.
        handle();
        let (key, series) = register(labels);
        let series = Arc::new(series);
        map.insert(key, series.clone());
        series
    }
}

/// A key and a model, looked up without cloning either.
#[derive(Hash)]
struct KeyModel<'a>(&'a Arc<str>, &'a Arc<str>);

impl Equivalent<(Arc<str>, Arc<str>)> for KeyModel<'_> {
    fn equivalent(&self, (key, model): &(Arc<str>, Arc<str>)) -> bool {
        **self.0 == **key && **self.1 == **model
    }
}

/// A key's series for one model, each registered when first recorded to:
/// a series that never counted anything does not show.
struct KeyModelSeries {
    key: Arc<str>,
    model: Arc<str>,
    served: OnceLock<Counter>,
    tokens: OnceLock<[Counter; 2]>,
    cost: OnceLock<Counter>,
}

static KEY_MODEL: SeriesCache<(Arc<str>, Arc<str>), KeyModelSeries> = SeriesCache::new();

fn key_model(key: &Arc<str>, model: &Arc<str>) -> Arc<KeyModelSeries> {
    KEY_MODEL.get(&KeyModel(key, model), |KeyModel(key, model)| {
        let series = KeyModelSeries {
            key: Arc::clone(key),
            model: Arc::clone(model),
            served: OnceLock::new(),
            tokens: OnceLock::new(),
            cost: OnceLock::new(),
        };
        ((Arc::clone(key), Arc::clone(model)), series)
    })
}

/// A deployment's series, registered as `KeyModelSeries`' are.
struct DeploymentSeries {
    name: Arc<str>,
    first_byte: OnceLock<Histogram>,
    upstream: OnceLock<Histogram>,
    ok: OnceLock<Counter>,
}

static DEPLOYMENT: SeriesCache<Arc<str>, DeploymentSeries> = SeriesCache::new();

fn deployment(name: &Arc<str>) -> Arc<DeploymentSeries> {
    DEPLOYMENT.get(&**name, |_| {
        let series = DeploymentSeries {
            name: name.clone(),
            first_byte: OnceLock::new(),
            upstream: OnceLock::new(),
            ok: OnceLock::new(),
        };
        (name.clone(), series)
    })
}

/// One API request answered.
pub fn request(key: &Arc<str>, model: &Arc<str>, status: u16, decision: Decision) {
    if status == 200 && decision == Decision::Admitted {
        let series = key_model(key, model);
        series
            .served
            .get_or_init(|| {
                request_counter(series.key.clone(), series.model.clone(), 200, decision)
            })
            .increment(1);
    } else {
        request_counter(key.clone(), model.clone(), status, decision).increment(1);
    }
}

fn request_counter(key: Arc<str>, model: Arc<str>, status: u16, decision: Decision) -> Counter {
    counter!(
        "tollgate_requests_total",
        "key" => key,
        "model" => model,
        "status" => status_label(status),
        "decision" => decision.as_str(),
    )
}

/// A status code as a label, without allocating for the common ones.
fn status_label(status: u16) -> metrics::SharedString {
    match status {
        200 => "200".into(),
        400 => "400".into(),
        401 => "401".into(),
        402 => "402".into(),
        403 => "403".into(),
        404 => "404".into(),
        429 => "429".into(),
        499 => "499".into(),
        500 => "500".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        other => other.to_string().into(),
    }
}

/// Tokens and spend of one settled request.
pub fn settled(key: &Arc<str>, model: &Arc<str>, input: u64, output: u64, cost: i64) {
    let series = key_model(key, model);
    let (key, model) = (&series.key, &series.model);
    let [input_tokens, output_tokens] = series.tokens.get_or_init(|| {
        ["input", "output"].map(|direction| {
            counter!("tollgate_tokens_total", "key" => key.clone(), "model" => model.clone(), "direction" => direction)
        })
    });
    input_tokens.increment(input);
    output_tokens.increment(output);
    if cost > 0 {
        series
            .cost
            .get_or_init(|| counter!("tollgate_cost_micro_usd_total", "key" => key.clone(), "model" => model.clone()))
            .increment(cost as u64);
    }
}

/// The time an upstream took, by deployment.
pub fn upstream(deployment_name: &Arc<str>, waited: Duration) {
    let series = deployment(deployment_name);
    series
        .upstream
        .get_or_init(
            || histogram!("tollgate_upstream_seconds", "deployment" => series.name.clone()),
        )
        .record(waited);
}

/// `tollgate_limit_utilization_ratio` by subject kind and dimension.
static UTILIZATION: SeriesCache<(&'static str, &'static str), Histogram> = SeriesCache::new();

/// An admitted request: how full its tightest limits are now, and how long
/// it queued.
pub fn admitted(plan: &Plan, grant: &Grant, waited: Duration) {
    for (dimension, reading) in [("requests", grant.requests), ("tokens", grant.tokens)] {
        if let Some(r) = reading.filter(|r| r.limit > 0) {
            let used = r.limit.saturating_sub(r.remaining) as f64 / r.limit as f64;
            let labels = (plan.kind(r.subject), dimension);
            UTILIZATION
                .get(&labels, |&(subject, dimension)| {
                    let series = histogram!("tollgate_limit_utilization_ratio", "subject" => subject, "dimension" => dimension);
                    ((subject, dimension), series)
                })
                .record(used);
        }
    }
    if !waited.is_zero() {
        histogram!("tollgate_queue_wait_seconds").record(waited);
    }
}

/// A request waiting in a key's queue: counted in `tollgate_queue_depth`
/// while it lives.
#[derive(Debug)]
pub struct QueuedRequest(());

impl QueuedRequest {
    /// Counts one more waiting request.
    pub fn enter() -> Self {
        gauge!("tollgate_queue_depth").increment(1.0);
        Self(())
    }
}

impl Drop for QueuedRequest {
    fn drop(&mut self) {
        gauge!("tollgate_queue_depth").decrement(1.0);
    }
}

/// Whether the last limit decision could reach the limit store (Redis).
pub fn limit_store_available(up: bool) {
    gauge!("tollgate_limit_store_available").set(f64::from(u8::from(up)));
}

/// One upstream call and how it ended.
pub fn attempt(deployment_name: &Arc<str>, outcome: &'static str) {
    if outcome == "ok" {
        let series = deployment(deployment_name);
        series
            .ok
            .get_or_init(|| attempt_counter(series.name.clone(), "ok"))
            .increment(1);
    } else {
        attempt_counter(deployment_name.clone(), outcome).increment(1);
    }
}

fn attempt_counter(deployment_name: Arc<str>, outcome: &'static str) -> Counter {
    counter!("tollgate_upstream_attempts_total", "deployment" => deployment_name, "outcome" => outcome)
}

/// The time to an upstream's response headers.
pub fn first_byte(deployment_name: &Arc<str>, waited: Duration) {
    let series = deployment(deployment_name);
    series
        .first_byte
        .get_or_init(|| histogram!("tollgate_upstream_first_byte_seconds", "deployment" => series.name.clone()))
        .record(waited);
}

/// A request moved down its model's fallback chain.
pub fn fallback(from: Arc<str>, to: Arc<str>) {
    counter!("tollgate_fallbacks_total", "from" => from, "to" => to).increment(1);
}

/// Refreshes the gauges that are read off live state, then renders.
pub fn render(gw: &Gateway) -> String {
    let now = gw.limits.clock().now_ns();
    for d in &gw.deployments {
        let name = d.name.clone();
        gauge!("tollgate_deployment_circuit_open", "deployment" => name.clone())
            .set(f64::from(u8::from(d.health.circuit_open(now))));
        gauge!("tollgate_deployment_available", "deployment" => name.clone())
            .set(f64::from(u8::from(d.health.reopens_at() <= now)));
        for (dimension, share) in d.headroom.shares(now) {
            gauge!("tollgate_deployment_headroom_ratio", "deployment" => name.clone(), "dimension" => dimension)
                .set(share);
        }
    }
    handle().render()
}
