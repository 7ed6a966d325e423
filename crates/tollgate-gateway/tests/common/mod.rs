//! A gateway in front of a mock provider, both on ephemeral ports, with a
//! fresh SQLite file and one key.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tollgate_core::clock::{Clock, FakeClock, SystemClock};
use tollgate_gateway::config::{DeploymentConfig, Provider};
use tollgate_gateway::{Config, Gateway, RunningGateway};
use tollgate_mock::{MockConfig, MockServer};
use tollgate_store::NewKey;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const PROVIDER_KEY: &str = "sk-provider-secret-abcdef0123456789";

pub fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// One call to `url` through `transport` (a deployment's), up to its
/// answer's head, which must say 200.
pub async fn call_upstream(
    transport: &tollgate_gateway::transport::Transport,
    url: &str,
) -> http::Response<tollgate_gateway::transport::UpstreamBody> {
    let request = http::Request::post(url)
        .body(bytes::Bytes::from_static(b"{}"))
        .expect("request");
    let far = tokio::time::Instant::now() + Duration::from_secs(10);
    let response = transport
        .send(0, request, far, far)
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    response
}

/// A provider of a test's own on an ephemeral port of 127.0.0.1: each
/// connection it accepts goes to `serve`, run on a task of its own.
/// Returns its chat completions URL, with `scheme`.
pub async fn own_provider<F, Fut>(scheme: &str, serve: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(localhost())
        .await
        .expect("bind");
    let url = format!(
        "{scheme}://{}/v1/chat/completions",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(serve(socket));
        }
    });
    url
}

pub struct Harness {
    pub mock: MockServer,
    pub gateway: RunningGateway,
    pub key: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A mock started as `mock` and a config with one deployment of it
/// (`mock-a`, serving `models`) over a SQLite file in a fresh directory
/// (kept alive by the returned guard).
pub async fn mock_and_config(
    mock: MockConfig,
    models: &[&str],
) -> (MockServer, tempfile::TempDir, Config) {
    let mock = MockServer::start(mock, localhost())
        .await
        .expect("mock starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Config::default();
    config.database.url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
    config
        .deployments
        .push(deployment("mock-a", mock.base_url(), models));
    (mock, dir, config)
}

pub fn deployment(name: &str, base_url: String, models: &[&str]) -> DeploymentConfig {
    DeploymentConfig {
        name: name.into(),
        provider: Provider::OpenaiCompatible,
        base_url: Some(base_url),
        api_key_env: Some("PROVIDER_KEY".into()),
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(30),
        first_byte_timeout: None,
        rpm: None,
        tpm: None,
        api_version: None,
        mock: None,
    }
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(MockConfig::default(), |_| {}).await
    }

    /// A gateway over a mock configured by `mock`; `tweak` edits the gateway config.
    pub async fn with(mock: MockConfig, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::build(mock, tweak, Arc::new(SystemClock::new())).await
    }

    /// [`Harness::with`], deciding limits on `clock`.
    pub async fn with_clock(
        mock: MockConfig,
        tweak: impl FnOnce(&mut Config),
        clock: FakeClock,
    ) -> Self {
        Self::build(mock, tweak, Arc::new(clock)).await
    }

    async fn build(
        mock: MockConfig,
        tweak: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> Self {
        let (mock, dir, mut config) = mock_and_config(
            mock,
            &[
                "gpt-4o",
                "gpt-4o-mini",
                "gpt-3.5-turbo-instruct",
                "text-embedding-3-small",
            ],
        )
        .await;
        config.server.shutdown_grace = Duration::from_secs(10);
        tweak(&mut config);
        let gw = Gateway::build_with_clock(config, secrets, clock)
            .await
            .expect("gateway builds");
        let (_, secret) = gw
            .db
            .create_key(NewKey {
                name: "test".into(),
                ..NewKey::default()
            })
            .await
            .expect("key");
        gw.keys.reload().await.expect("reload");
        let gateway = RunningGateway::start(gw, localhost())
            .await
            .expect("gateway starts");
        Self {
            mock,
            gateway,
            key: secret.expose().to_owned(),
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn gw(&self) -> &Arc<Gateway> {
        self.gateway.gateway()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.gateway.url())
    }

    /// POSTs `body` as JSON text with the harness key.
    pub async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.post_as(&self.key, path, body).await
    }

    /// POSTs `body` as JSON text with `key`.
    pub async fn post_as(&self, key: &str, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("request sent")
    }

    /// GETs an admin path with the admin key; its JSON body.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        self.http
            .get(self.url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("admin request sent")
            .json()
            .await
            .expect("admin answer is JSON")
    }

    /// Creates a key named `name` shaped by `edit`; returns its secret.
    pub async fn key(&self, name: &str, edit: impl FnOnce(&mut NewKey)) -> String {
        let mut new = NewKey {
            name: name.into(),
            ..NewKey::default()
        };
        edit(&mut new);
        let (_, secret) = self.gw().db.create_key(new).await.expect("key");
        self.gw().keys.reload().await.expect("reload");
        secret.expose().to_owned()
    }
}

impl Harness {
    /// Adds `micros` of credit to `account` and lets the gateway see it.
    pub async fn fund(&self, account: &str, micros: i64) {
        self.gw()
            .db
            .add_credits(account, micros, "test", "seed")
            .await
            .expect("credits");
        self.gw().money.sync().await.expect("synced");
    }

    /// Every usage row once the ledger is flushed, and `account`'s balance
    /// as the database has it.
    pub async fn ledger(&self, account: &str) -> (Vec<tollgate_store::UsageRow>, i64) {
        self.gw().money.flush().await;
        let rows = self.gw().db.usage_rows().await.expect("rows");
        let balance = self
            .gw()
            .db
            .find_account(account)
            .await
            .expect("account")
            .balance;
        (rows, balance)
    }
}

pub fn secrets(name: &str) -> Option<String> {
    match name {
        "PROVIDER_KEY" => Some(PROVIDER_KEY.to_owned()),
        "TOLLGATE_ADMIN_KEY" => Some(ADMIN_KEY.to_owned()),
        _ => None,
    }
}

/// The `error` object of an OpenAI-shaped body.
pub async fn error_of(resp: reqwest::Response) -> (u16, String, String, serde_json::Value) {
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, retry, body)
}

/// Content and usage of an SSE chat stream.
pub fn parse_sse(
    text: &str,
) -> (
    String,
    Option<serde_json::Value>,
    bool,
    Vec<serde_json::Value>,
) {
    let mut content = String::new();
    let mut usage = None;
    let mut done = false;
    let mut events = Vec::new();
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(data).expect("each event is JSON");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
        events.push(v);
    }
    (content, usage, done, events)
}
