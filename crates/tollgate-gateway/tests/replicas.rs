//! Three gateway replicas on different ports sharing the real PostgreSQL
//! (127.0.0.1:5432, a scratch database per test) and the real Redis
//! (127.0.0.1:6379, or `TOLLGATE_TEST_REDIS_URL`) on this machine: a key's
//! limits, a budget and an account hold across all of them as if there
//! were one gateway. The same three replicas with limits in process memory
//! (over one SQLite file) admit three times as much, which is what the
//! shared state is for.

mod common;

use common::{localhost, mock_and_config, secrets};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tollgate_core::clock::{Clock, SystemClock};
use tollgate_core::limits::KeyLimits;
use tollgate_core::money::{Budget, Micros, PriceTable, TokenUsage, Window};
use tollgate_gateway::{Gateway, RunningGateway};
use tollgate_mock::{MockConfig, MockServer};
use tollgate_store::NewKey;
use tollgate_store::database::scratch;
use tollgate_store::shared::OutagePolicy;

const CHAT: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"share me"}],"max_tokens":40}"#;

fn redis_url() -> String {
    std::env::var("TOLLGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

struct Replicas {
    mock: MockServer,
    _dir: tempfile::TempDir,
    gateways: Vec<RunningGateway>,
    http: reqwest::Client,
}

/// `n` gateways over one SQLite file and one mock; limits in Redis when
/// `shared`, else in each process.
async fn replicas(n: usize, shared: bool) -> Replicas {
    replicas_on(
        real_clocks(n),
        shared.then(redis_url),
        OutagePolicy::FailClosed,
    )
    .await
}

/// `n` clocks on real time, one per replica.
fn real_clocks(n: usize) -> Vec<Arc<dyn Clock>> {
    (0..n)
        .map(|_| Arc::new(SystemClock::new()) as Arc<dyn Clock>)
        .collect()
}

/// A clock running `offset` ahead of the real one.
struct AheadClock {
    real: SystemClock,
    offset: Duration,
}

impl Clock for AheadClock {
    fn now_ns(&self) -> u64 {
        self.real.now_ns() + self.offset.as_nanos() as u64
    }
}

/// One replica per clock; with the Redis at `redis` for limits and money
/// and a fresh PostgreSQL database when given, else each process's memory
/// over one SQLite file.
async fn replicas_on(
    clocks: Vec<Arc<dyn Clock>>,
    redis: Option<String>,
    on_outage: OutagePolicy,
) -> Replicas {
    replicas_with(clocks, redis, on_outage, MockConfig::default()).await
}

/// [`replicas_on`] in front of a mock configured as `mock`.
async fn replicas_with(
    clocks: Vec<Arc<dyn Clock>>,
    redis: Option<String>,
    on_outage: OutagePolicy,
    mock: MockConfig,
) -> Replicas {
    let (mock, dir, mut config) = mock_and_config(mock, &["gpt-4o-mini"]).await;
    config.state.on_redis_outage = on_outage;
    if let Some(url) = redis {
        // Several nodes: a Redis Cluster.
        config.state.redis_cluster = url.contains(',');
        config.state.database_url = Some(scratch::postgres().await);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        config.state.redis_url = Some(url);
        // A prefix of this run's own: Redis keeps state between runs.
        config.state.redis_prefix = format!("tollgate-test-{nanos}");
    }
    let mut gateways = Vec::new();
    for clock in clocks {
        let gw = Gateway::build_with_clock(config.clone(), secrets, clock)
            .await
            .unwrap_or_else(|e| panic!("replica builds (Redis at {}?): {e}", redis_url()));
        gateways.push(
            RunningGateway::start(gw, localhost())
                .await
                .expect("replica starts"),
        );
    }
    Replicas {
        mock,
        _dir: dir,
        gateways,
        http: reqwest::Client::new(),
    }
}

impl Replicas {
    /// `/readyz` of the first replica: status and body.
    async fn ready(&self) -> (u16, serde_json::Value) {
        self.ready_of(0).await
    }

    /// `/readyz` of replica `i`.
    async fn ready_of(&self, i: usize) -> (u16, serde_json::Value) {
        let resp = self
            .http
            .get(format!("{}/readyz", self.gateways[i].url()))
            .send()
            .await
            .expect("sent");
        (resp.status().as_u16(), resp.json().await.expect("json"))
    }

    /// Polls every replica's `/readyz` until `limits` satisfies `until`
    /// (the heartbeat announces, probes and recovers once a second or
    /// faster; ten seconds is ample).
    async fn await_limits(&self, what: &str, until: impl Fn(&serde_json::Value) -> bool) {
        for i in 0..self.gateways.len() {
            let mut seen = serde_json::Value::Null;
            for _ in 0..200 {
                seen = self.ready_of(i).await.1;
                if until(&seen["limits"]) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(until(&seen["limits"]), "replica {i} never {what}: {seen}");
        }
    }

    /// A key made on the first replica, then loaded by all.
    async fn key(&self, limits: KeyLimits) -> String {
        self.new_key(NewKey {
            name: "shared".into(),
            limits,
            ..NewKey::default()
        })
        .await
    }

    async fn new_key(&self, new: NewKey) -> String {
        let first = self.gateways[0].gateway();
        let (_, secret) = first.db.create_key(new).await.expect("key");
        for g in &self.gateways {
            g.gateway().keys.reload().await.expect("reload");
        }
        secret.expose().to_owned()
    }

    /// A key drawing on account `acme`, funded with `micros` on the first
    /// replica and picked up by all.
    async fn prepaid_key(&self, name: &str, micros: Micros) -> String {
        let key = self
            .new_key(NewKey {
                name: name.into(),
                account: Some("acme".into()),
                ..NewKey::default()
            })
            .await;
        self.gateways[0]
            .gateway()
            .db
            .add_credits("acme", micros, "test", "seed")
            .await
            .expect("funded");
        self.sync_money().await;
        key
    }

    /// Every replica picks up budgets and credits now (instead of at its
    /// next poll).
    async fn sync_money(&self) {
        for g in &self.gateways {
            g.gateway().money.sync().await.expect("money synced");
        }
    }

    /// Waits for every replica's usage rows to be durable.
    async fn flush(&self) {
        for g in &self.gateways {
            g.gateway().money.flush().await;
        }
    }

    /// A key at `rpm = 60` and 300 requests at once: how many were admitted
    /// and refused, and the most a shared limit may admit (60, plus one for
    /// each second the burst took to refill).
    async fn burst_at_rpm_60(&self) -> (usize, usize, usize) {
        let key = self
            .key(KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            })
            .await;
        let started = std::time::Instant::now();
        let (ok, limited) = self.burst(&key, 300).await;
        (ok, limited, 61 + started.elapsed().as_secs() as usize)
    }

    /// `total` requests at once, spread round-robin; how many were admitted.
    async fn burst(&self, key: &str, total: usize) -> (usize, usize) {
        let (ok, refused) = self.burst_of(key, total, CHAT).await;
        (ok, refused.len())
    }

    /// `total` requests of `body` at once, spread round-robin: how many
    /// were admitted, and the status of each one that was not.
    async fn burst_of(&self, key: &str, total: usize, body: &str) -> (usize, Vec<u16>) {
        let tasks: Vec<_> = (0..total)
            .map(|i| {
                let url = format!(
                    "{}/v1/chat/completions",
                    self.gateways[i % self.gateways.len()].url()
                );
                let (http, key, body) = (self.http.clone(), key.to_owned(), body.to_owned());
                tokio::spawn(async move {
                    http.post(url)
                        .bearer_auth(key)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .expect("sent")
                        .status()
                        .as_u16()
                })
            })
            .collect();
        let (mut ok, mut refused) = (0, Vec::new());
        for t in tasks {
            match t.await.expect("task") {
                200 => ok += 1,
                other @ (402 | 429) => refused.push(other),
                other => panic!("only 200, 402 or 429, got {other}"),
            }
        }
        (ok, refused)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_one_rpm_limit_through_redis() {
    let r = replicas(3, true).await;
    let (ok, limited, most) = r.burst_at_rpm_60().await;
    assert!(
        (60..=most).contains(&ok),
        "{ok} admitted across three replicas"
    );
    assert_eq!(ok + limited, 300);
    eprintln!("shared: {ok} of 300 admitted across 3 replicas");
    // Each decision was one script call, timed (other tests of this binary
    // may have added theirs: at least these 300).
    let metrics = r
        .http
        .get(format!("{}/metrics", r.gateways[0].url()))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let calls: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"tollgate_redis_seconds_count{op="admit"} "#))
        .and_then(|v| v.parse().ok())
        .expect("the admit round trips are measured");
    assert!(calls >= 300.0, "{calls}");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_share_one_token_bucket_through_redis() {
    let r = replicas(3, true).await;
    let key = r
        .key(KeyLimits {
            tpm: Some(1_000),
            ..KeyLimits::default()
        })
        .await;
    let started = std::time::Instant::now();
    let (ok, _) = r.burst(&key, 120).await;
    // Each request is estimated at its prompt plus max_tokens (40): the
    // bucket of 1,000 takes 20 of them, plus the refill of the burst.
    let refill_tokens = 1_000 * started.elapsed().as_millis() as usize / 60_000;
    let estimate = 1_000 / 20;
    assert!(ok >= 18, "{ok}");
    assert!(
        ok * 49 <= 1_000 + refill_tokens + estimate,
        "{ok} admitted: their estimates exceed the bucket"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_spread_over_three_replicas_execute_and_charge_once() {
    let clocks = real_clocks(3);
    // Slow enough that the duplicates arrive while the first one runs.
    let slow = MockConfig {
        ttft: Duration::from_millis(300),
        ..MockConfig::default()
    };
    let r = replicas_with(clocks, Some(redis_url()), OutagePolicy::FailClosed, slow).await;
    let key = r.prepaid_key("idem", 1_000_000).await;
    let db = &r.gateways[0].gateway().db;
    let sends = (0..21).map(|i| {
        r.http
            .post(format!("{}/v1/chat/completions", r.gateways[i % 3].url()))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("idempotency-key", "order-1042")
            .body(CHAT)
            .send()
    });
    let mut bodies = Vec::new();
    let mut replays = 0;
    for resp in futures_util::future::join_all(sends).await {
        let resp = resp.expect("sent");
        assert_eq!(resp.status(), 200);
        replays += usize::from(resp.headers().contains_key("x-tollgate-idempotent-replay"));
        bodies.push(resp.text().await.expect("body"));
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]), "one answer for all");
    assert_eq!(replays, 20);
    assert_eq!(
        r.mock.stats().snapshot().received,
        1,
        "one upstream execution"
    );
    r.flush().await;
    let rows = db.usage_rows().await.expect("rows");
    assert_eq!(rows.len(), 1, "billed once");
    let balance = db.find_account("acme").await.expect("account").balance;
    assert_eq!(balance, 1_000_000 - rows[0].cost);
}

/// The shipped price of gpt-4o-mini.
fn cost(input: u64, output: u64) -> Micros {
    let table = PriceTable::with_overrides(&Default::default()).expect("shipped prices");
    table.get("gpt-4o-mini").expect("priced").cost(TokenUsage {
        input,
        cached_input: 0,
        output,
    })
}

/// CHAT with room for `max_tokens` (the mock writes exactly that many, so
/// a request costs exactly its estimate).
fn chat_of(max_tokens: u64) -> String {
    CHAT.replace("\"max_tokens\":40", &format!("\"max_tokens\":{max_tokens}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_spend_a_shared_budget_to_the_last_request_and_no_further() {
    let r = replicas(3, true).await;
    let key = r
        .new_key(NewKey {
            name: "spender".into(),
            ..NewKey::default()
        })
        .await;
    let cap = 10_000; // $0.01
    r.gateways[0]
        .gateway()
        .db
        .set_budget(&Budget {
            scope: Arc::from("key:spender"),
            window: Window::Day,
            cap,
            alert_percent: None,
        })
        .await
        .expect("budget");
    r.sync_money().await;
    let (ok, refused) = r.burst_of(&key, 300, &chat_of(400)).await;
    r.flush().await;
    let rows = r.gateways[0].gateway().db.usage_rows().await.expect("rows");
    assert_eq!(rows.len(), ok, "one row per served request");
    let each = cost(rows[0].input_tokens, 400);
    assert!(
        rows.iter().all(|r| r.cost == each),
        "every request costs its estimate"
    );
    let spent: Micros = rows.iter().map(|r| r.cost).sum();
    // Exactly what fits: never past the cap, never one refused that fitted.
    assert_eq!(ok as Micros, cap / each, "{ok} served at {each} µ$ each");
    assert!(spent <= cap);
    assert!(refused.iter().all(|&s| s == 429), "{refused:?}");
    eprintln!("budget $0.01 across 3 replicas: {ok} served, {spent} µ$ spent");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_cannot_overdraw_a_shared_account() {
    let r = replicas(3, true).await;
    let credits = 1_000; // $0.001
    let key = r.prepaid_key("prepaid", credits).await;
    let db = &r.gateways[0].gateway().db;
    let (ok, refused) = r.burst_of(&key, 300, CHAT).await;
    r.flush().await;
    let rows = db.usage_rows().await.expect("rows");
    let each = cost(rows[0].input_tokens, 40);
    let spent: Micros = rows.iter().map(|r| r.cost).sum();
    let balance = db.find_account("acme").await.expect("account").balance;
    assert_eq!(rows.len(), ok);
    assert_eq!(
        ok as Micros,
        credits / each,
        "{ok} served at {each} µ$ each"
    );
    assert!(balance >= 0, "overdrawn: {balance}");
    assert_eq!(
        balance,
        credits - spent,
        "balance = top-ups − settled costs"
    );
    assert!(refused.iter().all(|&s| s == 402), "{refused:?}");

    // A top-up on one replica reaches the shared balance once, not once
    // per replica that sees it.
    db.add_credits("acme", 500, "test", "top-up")
        .await
        .expect("topped up");
    r.sync_money().await;
    r.sync_money().await;
    let (again, _) = r.burst_of(&key, 60, CHAT).await;
    assert_eq!(again as Micros, (balance + 500) / each);
    eprintln!("account $0.001 across 3 replicas: {ok} served, balance {balance} µ$");
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_on_a_redis_cluster_share_limits_and_an_account() {
    let cluster = tollgate_store::redis::scratch::cluster();
    let clocks = real_clocks(3);
    let r = replicas_on(clocks, Some(cluster.url.clone()), OutagePolicy::FailClosed).await;
    let (ok, _, most) = r.burst_at_rpm_60().await;
    assert!((60..=most).contains(&ok), "{ok} admitted on the cluster");

    let key = r.prepaid_key("prepaid", 1_000).await;
    let db = &r.gateways[0].gateway().db;
    let (served, _) = r.burst_of(&key, 120, CHAT).await;
    r.flush().await;
    let rows = db.usage_rows().await.expect("rows");
    let each = cost(rows[0].input_tokens, 40);
    assert_eq!(served as Micros, 1_000 / each);
    r.await_limits("counted three replicas", |l| l["live_replicas"] == 3)
        .await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_without_shared_state_admit_three_times_the_limit() {
    let r = replicas(3, false).await;
    let (ok, _, _) = r.burst_at_rpm_60().await;
    assert!((180..=183).contains(&ok), "{ok}: 60 per replica");
    let (status, ready) = r.ready().await;
    assert_eq!(
        (status, &ready["limits"]["store"]),
        (200, &serde_json::json!("memory"))
    );
    eprintln!("per replica: {ok} of 300 admitted across 3 replicas");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_whose_clock_runs_five_seconds_ahead_still_agrees() {
    let ahead: Arc<dyn Clock> = Arc::new(AheadClock {
        real: SystemClock::new(),
        offset: Duration::from_secs(5),
    });
    let clocks = vec![
        Arc::new(SystemClock::new()) as Arc<dyn Clock>,
        ahead,
        Arc::new(SystemClock::new()),
    ];
    let r = replicas_on(clocks, Some(redis_url()), OutagePolicy::FailClosed).await;
    let (ok, _, most) = r.burst_at_rpm_60().await;
    // Decisions run on Redis's clock: the skewed replica's five seconds
    // would otherwise have refilled five more.
    assert!((60..=most).contains(&ok), "{ok} admitted");
}

/// Sends until replica `i` answers `want` (or two seconds pass); how long
/// that took.
async fn until_status(r: &Replicas, i: usize, key: &str, want: u16) -> Duration {
    let started = std::time::Instant::now();
    let mut status = 0;
    while started.elapsed() < Duration::from_secs(2) {
        status = once(r, i, key).await.0;
        if status == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, want, "replica {i} never answered {want}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_made_on_one_replica_reach_the_others_within_a_second() {
    let r = replicas(3, true).await;
    let key = r.key(KeyLimits::default()).await;
    assert_eq!(r.burst(&key, 3).await, (3, 0));
    let first = &r.gateways[0].gateway().db;

    // A limit edit: rpm 1 on every replica (each admits at most one more).
    first
        .update_key_limits(
            "shared",
            tollgate_store::LimitsUpdate {
                limits: Some(KeyLimits {
                    rpm: Some(1),
                    ..KeyLimits::default()
                }),
                ..Default::default()
            },
        )
        .await
        .expect("edited");
    for i in 1..3 {
        let took = until_status(&r, i, &key, 429).await;
        assert!(
            took < Duration::from_secs(1),
            "the edit took {took:?} to reach replica {i}"
        );
    }

    // A revocation: refused everywhere.
    first.revoke_key("shared").await.expect("revoked");
    for i in 1..3 {
        let took = until_status(&r, i, &key, 401).await;
        assert!(
            took < Duration::from_secs(1),
            "the revocation took {took:?} to reach replica {i}"
        );
    }
}

/// A Redis of this test's own on `port` (the machine's is shared by
/// every test running in parallel, so it is never the one stopped).
fn own_redis(port: u16) -> std::process::Child {
    let mut child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts (the Redis tests need the redis-server binary)");
    // Ready when it accepts a connection.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("redis-server did not listen on {port}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One request; its status and `retry-after-ms`.
async fn once(r: &Replicas, i: usize, key: &str) -> (u16, Option<u64>) {
    let resp = r
        .http
        .post(format!("{}/v1/chat/completions", r.gateways[i].url()))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("sent");
    let wait = resp
        .headers()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (resp.status().as_u16(), wait)
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_closed_a_replica_answers_503_only_while_redis_is_down() {
    let port = free_port();
    let mut redis = own_redis(port);
    let r = replicas_on(
        vec![Arc::new(SystemClock::new())],
        Some(format!("redis://127.0.0.1:{port}")),
        OutagePolicy::FailClosed,
    )
    .await;
    let key = r
        .key(KeyLimits {
            rpm: Some(600),
            ..KeyLimits::default()
        })
        .await;
    assert_eq!(r.burst(&key, 5).await, (5, 0));
    let (status, ready) = r.ready().await;
    assert_eq!(status, 200);
    assert_eq!(
        ready["limits"],
        serde_json::json!({"store": "redis", "state": "ok", "on_redis_outage": "fail_closed",
                           "live_replicas": 1, "conservative_refill": false})
    );

    redis.kill().expect("stop redis");
    redis.wait().expect("stopped");
    let resp = r
        .http
        .post(format!("{}/v1/chat/completions", r.gateways[0].url()))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .expect("sent");
    assert_eq!(
        resp.status(),
        503,
        "fail closed: nothing is admitted unchecked"
    );
    assert_eq!(resp.headers()["x-should-retry"], "true");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "limits_unavailable");
    let (status, ready) = r.ready().await;
    assert_eq!(
        (status, &ready["limits"]["state"]),
        (503, &serde_json::json!("unavailable"))
    );

    // Back again, empty: its state was lost. The key's bucket starts empty
    // and refills at its rate (one request per 100 ms) instead of opening
    // wide, and the first refusal says exactly when to come back.
    let mut redis = own_redis(port);
    r.await_limits("recovered", |l| l["state"] == "ok").await;
    let (_, ready) = r.ready().await;
    assert_eq!(ready["limits"]["conservative_refill"], true);
    let (status, wait) = once(&r, 0, &key).await;
    assert_eq!(status, 429, "a forgotten bucket starts empty");
    let wait = wait.expect("retry-after-ms");
    assert!(wait <= 100, "{wait} ms");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (status, _) = once(&r, 0, &key).await;
    let _ = redis.kill();
    let _ = redis.wait();
    assert_eq!(status, 200, "decisions resume once Redis is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_open_replicas_keep_serving_within_their_shares_while_redis_is_down() {
    let port = free_port();
    let mut redis = own_redis(port);
    let clocks = real_clocks(3);
    let r = Arc::new(
        replicas_on(
            clocks,
            Some(format!("redis://127.0.0.1:{port}")),
            OutagePolicy::FailOpen,
        )
        .await,
    );
    // Every replica knows there are three before Redis goes.
    r.await_limits("counted three replicas", |l| l["live_replicas"] == 3)
        .await;
    let steady = r
        .new_key(NewKey {
            name: "steady".into(),
            limits: KeyLimits {
                rpm: Some(60_000),
                ..KeyLimits::default()
            },
            ..NewKey::default()
        })
        .await;
    let bursty = r
        .new_key(NewKey {
            name: "bursty".into(),
            limits: KeyLimits {
                rpm: Some(60),
                ..KeyLimits::default()
            },
            ..NewKey::default()
        })
        .await;

    // Load on every replica from before the outage to after it.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|i| {
            let (r, stop, key) = (r.clone(), stop.clone(), steady.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(once(&r, i, &key).await.0);
                }
                statuses
            })
        })
        .collect();

    redis.kill().expect("stop redis");
    redis.wait().expect("stopped");
    r.await_limits("fell back", |l| l["state"] == "fallback")
        .await;
    let (status, _) = r.ready().await;
    assert_eq!(status, 200, "failing open, a replica stays ready");
    // 300 at once across the three: each admits its share (60 / 3).
    let started = std::time::Instant::now();
    let (alone, refused) = r.burst_of(&bursty, 300, CHAT).await;
    let most = 61 + started.elapsed().as_secs() as usize;
    assert!(
        (60..=most).contains(&alone),
        "{alone} admitted while Redis was down"
    );
    assert!(refused.iter().all(|&s| s == 429));

    // Redis returns empty: decisions are shared again, and the forgotten
    // bucket refills at its rate rather than opening on top of the
    // outage's admissions.
    let mut redis = own_redis(port);
    r.await_limits("recovered", |l| l["state"] == "ok").await;
    let started = std::time::Instant::now();
    let (after, _) = r.burst_of(&bursty, 300, CHAT).await;
    let refill = 1 + started.elapsed().as_secs() as usize;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for task in load {
        let statuses = task.await.expect("load task");
        assert!(
            statuses.iter().all(|&s| s < 500),
            "a 5xx while failing open: {:?}",
            statuses.iter().filter(|&&s| s >= 500).collect::<Vec<_>>()
        );
        served += statuses.len();
    }
    let _ = redis.kill();
    let _ = redis.wait();
    assert!(after <= refill, "{after} admitted right after recovery");
    eprintln!(
        "fail open: {alone} of 300 admitted across 3 replicas during the outage, {after} right after; {served} steady requests, no 5xx"
    );
}
