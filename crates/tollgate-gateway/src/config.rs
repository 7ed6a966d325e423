//! `tollgate.toml`, with every field overridable by a `TOLLGATE_*` variable.
//!
//! The file is parsed straight into [`Config`] first, so a mistake in it is
//! reported with its line, column and field. Environment overrides
//! (`TOLLGATE_SECTION__FIELD`, `__` between levels, a number to index an
//! array) are then laid over it and the result is parsed again, naming the
//! path of any field that does not fit. Unknown fields are refused, so a
//! typo never silently falls back to a default. Secrets are never in the
//! file: a deployment names the environment variable holding its key.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tollgate_core::limits::{KeyLimits, LimitSet};
use tollgate_core::money::PriceText;
use tollgate_core::tokens::Encoding;
use tollgate_store::shared::OutagePolicy;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP server.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where keys and the ledger live.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Upstream endpoints; empty means the embedded default.
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
    /// How limits are estimated and enforced.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Named bundles of limits that keys start from (`[presets.dev]`).
    #[serde(default)]
    pub presets: BTreeMap<String, KeyLimits>,
    /// Teams: limits shared by every key of the team, and the account its
    /// keys draw from (`[teams.search]`).
    #[serde(default)]
    pub teams: BTreeMap<String, TeamConfig>,
    /// Budgets, credits and the ledger.
    #[serde(default)]
    pub money: MoneyConfig,
    /// Retries over a model's deployments.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[state]`: where limit state lives (this process, or Redis).
    #[serde(default)]
    pub state: StateConfig,
    /// Prices over the shipped table (`[prices."my-model"]`).
    #[serde(default)]
    pub prices: BTreeMap<String, PriceText>,
}

/// A failure class that moves a request down its model's fallback chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackTrigger {
    /// Every deployment answered 429 or is cooling down.
    RateLimit,
    /// The provider is overloaded (529, `overloaded_error`).
    Overload,
    /// The upstream did not answer in time.
    Timeout,
    /// 5xx, resets, invalid answers, open circuits.
    ServerError,
    /// The prompt is longer than the model's context (`context_length_exceeded`).
    ContextLength,
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Models to try, in order, when a model's every route failed:
    /// `fallbacks = { "gpt-4o" = ["gpt-4o-mini", "claude-sonnet-4-5"] }`.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Which failures walk the fallback chain (default: all of them).
    pub fallback_on: Vec<FallbackTrigger>,
    /// Upstream calls per request at most, failovers included.
    pub max_attempts: u32,
    /// First backoff ceiling between passes over a model's deployments.
    #[serde(deserialize_with = "duration")]
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    #[serde(deserialize_with = "duration")]
    pub backoff_cap: Duration,
    /// No retry starts later than this after the first call.
    #[serde(deserialize_with = "duration")]
    pub retry_budget: Duration,
    /// Failures in a row that open a deployment's circuit (0: never).
    pub circuit_failures: u32,
    /// How long an open circuit keeps a deployment out, before one probe.
    #[serde(deserialize_with = "duration")]
    pub circuit_open_for: Duration,
    /// Longest a request waits for room under its deployments' provider
    /// limits before the client hears 429.
    #[serde(deserialize_with = "duration")]
    pub max_pace_wait: Duration,
    /// Longest timeout a request may ask for with `x-tollgate-timeout` or
    /// `x-tollgate-first-byte-timeout`.
    #[serde(deserialize_with = "duration")]
    pub max_request_timeout: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallbacks: BTreeMap::new(),
            fallback_on: vec![
                FallbackTrigger::RateLimit,
                FallbackTrigger::Overload,
                FallbackTrigger::Timeout,
                FallbackTrigger::ServerError,
                FallbackTrigger::ContextLength,
            ],
            max_attempts: 3,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(2),
            retry_budget: Duration::from_secs(30),
            circuit_failures: 5,
            circuit_open_for: Duration::from_secs(30),
            max_pace_wait: Duration::from_secs(10),
            max_request_timeout: Duration::from_secs(600),
        }
    }
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Redis for limit state shared by every replica (`redis://host:6379`);
    /// unset, limits live in this process.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so that gateways can share a Redis.
    pub redis_prefix: String,
    /// `redis_url` names a Redis Cluster: seed nodes separated by commas.
    pub redis_cluster: bool,
    /// The database of keys, budgets, credits and the ledger, when it is
    /// shared (`postgres://…`); overrides `[database] url`.
    pub database_url: Option<String>,
    /// While Redis cannot be reached: `fail_closed` (503, retry) or
    /// `fail_open` (each replica decides alone with its share of every
    /// limit). Budgets and credits always fail closed.
    pub on_redis_outage: OutagePolicy,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_prefix: "tollgate".into(),
            redis_cluster: false,
            database_url: None,
            on_redis_outage: OutagePolicy::FailClosed,
        }
    }
}

/// `[teams.NAME]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamConfig {
    /// Requests per minute, shared by the team's keys.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// Requests per UTC day.
    pub rpd: Option<u64>,
    /// Tokens per UTC day.
    pub tpd: Option<u64>,
    /// The prepaid account the team's keys draw from (unless a key names its own).
    pub account: Option<String>,
}

impl TeamConfig {
    /// The team's limits.
    pub fn limits(&self) -> LimitSet {
        LimitSet {
            rpm: self.rpm,
            tpm: self.tpm,
            rpd: self.rpd,
            tpd: self.tpd,
        }
    }
}

/// What to do with a request for a model the price table does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnpricedModels {
    /// Refuse it when a budget or account would be charged (the default:
    /// spend that cannot be priced cannot be capped).
    #[default]
    Refuse,
    /// Charge nothing, with a warning in the log once per model.
    Free,
}

/// `[money]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoneyConfig {
    /// Write a usage row for every served request.
    pub ledger: bool,
    /// Models without a price.
    pub unpriced_models: UnpricedModels,
    /// Budget thresholds and low balances are POSTed here as JSON.
    pub webhook_url: Option<String>,
    /// How often a failed webhook call is retried.
    pub webhook_retries: u32,
}

impl Default for MoneyConfig {
    fn default() -> Self {
        Self {
            ledger: true,
            unpriced_models: UnpricedModels::Refuse,
            webhook_url: None,
            webhook_retries: 5,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Output tokens assumed for a request that sets no `max_tokens`.
    pub default_output_tokens: u64,
    /// Tokenizer for models tiktoken does not know: `o200k` or `cl100k`.
    pub fallback_encoding: EncodingName,
    /// Limits of each end user (the request's `user` or `x-tollgate-user`)
    /// of keys that set none themselves.
    pub users: Option<LimitSet>,
    /// The longest any request may queue, whatever it or its key asks for.
    #[serde(deserialize_with = "duration")]
    pub max_queue_wait: Duration,
    /// How often idle limiter state and ended budget counts are dropped
    /// from memory.
    #[serde(deserialize_with = "duration")]
    pub evict_every: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            default_output_tokens: 256,
            fallback_encoding: EncodingName::O200k,
            users: None,
            max_queue_wait: Duration::from_secs(60),
            evict_every: Duration::from_secs(10),
        }
    }
}

/// A tokenizer, by the name people write in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingName {
    /// gpt-4o family.
    O200k,
    /// gpt-4 / gpt-3.5 family.
    Cl100k,
}

impl From<EncodingName> for Encoding {
    fn from(e: EncodingName) -> Self {
        match e {
            EncodingName::O200k => Encoding::O200k,
            EncodingName::Cl100k => Encoding::Cl100k,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams may run on after a shutdown signal.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Environment variable holding the admin API key; unset disables `/admin`.
    pub admin_key_env: String,
    /// How often keys, budgets and credits are checked for changes made
    /// elsewhere (CLI, other replicas); twice a second, so a change reaches
    /// every replica within one.
    #[serde(deserialize_with = "duration")]
    pub key_refresh: Duration,
    /// How long an answer is kept for repeats of its `Idempotency-Key`.
    #[serde(deserialize_with = "duration")]
    pub idempotency_ttl: Duration,
    /// Threads serving connections; 0 (the default) means one per CPU.
    pub threads: usize,
    /// How long a client may take to send a request's headers, or pause
    /// while sending its body; an idle keep-alive connection is closed
    /// after it too.
    #[serde(deserialize_with = "duration")]
    pub read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 8 << 20,
            shutdown_grace: Duration::from_secs(30),
            admin_key_env: "TOLLGATE_ADMIN_KEY".into(),
            key_refresh: Duration::from_millis(500),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            threads: 0,
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// `[database]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing) or `postgres://USER@HOST/DB`.
    pub url: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://tollgate.db".into(),
        }
    }
}

/// What kind of endpoint a deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// api.openai.com.
    Openai,
    /// Any server speaking OpenAI's API (vLLM, llama.cpp, …).
    OpenaiCompatible,
    /// Azure OpenAI: `base_url` is the deployment's URL
    /// (`https://RESOURCE.openai.azure.com/openai/deployments/NAME`), the key
    /// goes in an `api-key` header, and every call names an `api_version`.
    Azure,
    /// The simulated provider, run inside the gateway's process.
    Mock,
}

/// `[[deployments]]`: one upstream endpoint and credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    /// Unique name; appears in headers, logs and metrics.
    pub name: String,
    /// Endpoint kind.
    pub provider: Provider,
    /// Base URL including `/v1` (default for `openai`: `https://api.openai.com/v1`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable holding the provider key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model names this deployment serves.
    pub models: Vec<String>,
    /// TCP + TLS connect timeout.
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Whole-request timeout, streams included.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Azure's `api-version` (default `2024-10-21`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Time to the response's first byte (its headers); past it the
    /// request moves to the next route. Unset: only `timeout` applies
    /// (reasoning models may think for minutes before a body answer).
    #[serde(default, deserialize_with = "opt_duration")]
    pub first_byte_timeout: Option<Duration>,
    /// The provider's requests-per-minute limit on this deployment's key;
    /// unset, it is learned from the provider's `x-ratelimit-*` headers.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// The provider's tokens-per-minute limit, likewise.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Settings of an in-process mock (`provider = "mock"` only).
    #[serde(default)]
    pub mock: Option<MockSettings>,
}

/// Behaviour of an in-process mock deployment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockSettings {
    /// Requests per minute per provider key.
    pub rpm: Option<u64>,
    /// Tokens per minute per provider key.
    pub tpm: Option<u64>,
    /// Time to first token.
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttft: Option<Duration>,
    /// Output speed.
    pub tokens_per_second: Option<u32>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(600)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration like \"30s\" or \"5m\": {e}"
        ))
    })
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a field has the wrong shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, with line, column and the offending field.
        message: String,
    },
    /// An environment override does not fit.
    #[error("environment override {var}: {message}")]
    Env {
        /// The variable, or the path of the field it set.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// The database URL: `[state] database_url` when set, else `[database] url`.
    pub fn database_url(&self) -> &str {
        self.state
            .database_url
            .as_deref()
            .unwrap_or(&self.database.url)
    }

    /// Loads `path` (if given) and applies `TOLLGATE_*__*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (source, text) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                (p.display().to_string(), text)
            }
            None => ("(defaults)".to_owned(), String::new()),
        };
        let parsed: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: source.clone(),
            message: e.to_string(),
        })?;
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOLLGATE_") && k.contains("__"))
            .collect();
        let config = if overrides.is_empty() {
            parsed
        } else {
            let mut tree: toml::Value = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: source,
                message: e.to_string(),
            })?;
            for (var, raw) in &overrides {
                apply_override(&mut tree, var, raw)?;
            }
            serde_path_to_error::deserialize(tree).map_err(|e| ConfigError::Env {
                var: e.path().to_string(),
                message: e.inner().to_string(),
            })?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for d in &self.deployments {
            if !names.insert(d.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two deployments are named `{}`",
                    d.name
                )));
            }
            if d.models.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}` serves no models",
                    d.name
                )));
            }
            if d.provider == Provider::Azure && d.base_url.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}` (azure) needs a base_url: https://RESOURCE.openai.azure.com/openai/deployments/NAME",
                    d.name
                )));
            }
            if d.api_version.is_some() && d.provider != Provider::Azure {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}` sets api_version, which only Azure uses",
                    d.name
                )));
            }
            if d.provider == Provider::OpenaiCompatible && d.base_url.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}` (openai_compatible) needs a base_url",
                    d.name
                )));
            }
            if d.mock.is_some() && d.provider != Provider::Mock {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}` has mock settings but is not a mock",
                    d.name
                )));
            }
        }
        if self.teams.contains_key("-") {
            // Reports and rollups write `-` for "no team".
            return Err(ConfigError::Invalid(
                "a team may not be named `-`: it stands for \"no team\" in usage reports".into(),
            ));
        }
        if let Err(e) = tollgate_core::money::PriceTable::with_overrides(&self.prices) {
            return Err(ConfigError::Invalid(e.to_string()));
        }
        if self.server.max_body_bytes == 0 {
            return Err(ConfigError::Invalid(
                "server.max_body_bytes must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Sets the field named by `TOLLGATE_A__B__0__C` in `tree`.
fn apply_override(tree: &mut toml::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var["TOLLGATE_".len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    let err = |message: &str| ConfigError::Env {
        var: var.to_owned(),
        message: message.to_owned(),
    };
    // A value that reads as TOML (number, bool, array) is taken as such;
    // anything else is a string, so `TOLLGATE_SERVER__LISTEN=0.0.0.0:80` works unquoted.
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
    let mut node = tree;
    for (i, part) in path.iter().enumerate() {
        let last = i + 1 == path.len();
        node = match node {
            toml::Value::Table(t) => {
                if last {
                    t.insert(part.clone(), value);
                    return Ok(());
                }
                let next_is_index = path[i + 1].parse::<usize>().is_ok();
                t.entry(part.clone()).or_insert_with(|| {
                    if next_is_index {
                        toml::Value::Array(Vec::new())
                    } else {
                        toml::Value::Table(toml::Table::new())
                    }
                })
            }
            toml::Value::Array(a) => {
                let idx: usize = part.parse().map_err(|_| err("expected an array index"))?;
                if idx > a.len() {
                    return Err(err("array index skips entries"));
                }
                if idx == a.len() {
                    a.push(toml::Value::Table(toml::Table::new()));
                }
                if last {
                    a[idx] = value;
                    return Ok(());
                }
                &mut a[idx]
            }
            _ => return Err(err("sets a field inside a value that is not a table")),
        };
    }
    Err(err("names no field"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn defaults_without_a_file() -> Result<(), ConfigError> {
        let c = Config::load(None, [])?;
        assert_eq!(c.server.listen.port(), 8080);
        assert!(c.deployments.is_empty());
        Ok(())
    }

    #[test]
    fn a_typo_names_line_and_field() {
        let f = write("[server]\nlisten = \"127.0.0.1:1\"\nshutdown_grase = \"5s\"\n");
        let e = Config::load(Some(f.path()), [])
            .expect_err("typo refused")
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("shutdown_grase"), "{e}");
    }

    #[test]
    fn a_bad_duration_names_the_field() {
        let f = write("[server]\nshutdown_grace = \"soon\"\n");
        let e = Config::load(Some(f.path()), [])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("soon") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn environment_overrides_file_values() -> Result<(), ConfigError> {
        let f = write(
            "[server]\nlisten = \"127.0.0.1:1\"\n[[deployments]]\nname = \"a\"\nprovider = \"mock\"\nmodels = [\"gpt-4o\"]\n",
        );
        let env = [
            (
                "TOLLGATE_SERVER__LISTEN".to_owned(),
                "0.0.0.0:9000".to_owned(),
            ),
            (
                "TOLLGATE_SERVER__MAX_BODY_BYTES".to_owned(),
                "1024".to_owned(),
            ),
            (
                "TOLLGATE_DEPLOYMENTS__0__TIMEOUT".to_owned(),
                "7s".to_owned(),
            ),
            (
                "TOLLGATE_ADMIN_KEY".to_owned(),
                "not-an-override".to_owned(),
            ),
        ];
        let c = Config::load(Some(f.path()), env)?;
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.server.max_body_bytes, 1024);
        assert_eq!(c.deployments[0].timeout, Duration::from_secs(7));
        Ok(())
    }

    #[test]
    fn a_bad_override_names_its_path() {
        let env = [(
            "TOLLGATE_SERVER__MAX_BODY_BYTES".to_owned(),
            "lots".to_owned(),
        )];
        let e = Config::load(None, env).expect_err("refused").to_string();
        assert!(e.contains("server.max_body_bytes"), "{e}");
    }

    #[test]
    fn a_team_named_none_is_refused() {
        let f = write("[teams.\"-\"]\nrpm = 10\n");
        let e = Config::load(Some(f.path()), [])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("no team"), "{e}");
    }
}
