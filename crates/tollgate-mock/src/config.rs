//! How the simulated provider behaves: models, limits, latency and faults.

use crate::fault::Fault;
use std::time::Duration;

/// Settings of one simulated provider.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Models it serves; any other gets OpenAI's 404 `model_not_found`.
    pub models: Vec<String>,
    /// Requests per minute per API key (`None`: unlimited, no headers).
    pub rpm: Option<u64>,
    /// Tokens per minute per API key, charged as prompt + `max_tokens` up front.
    pub tpm: Option<u64>,
    /// Answer every request with `insufficient_quota`.
    pub insufficient_quota: bool,
    /// Time to first token.
    pub ttft: Duration,
    /// Output speed; `None` means instantly.
    pub tokens_per_second: Option<u32>,
    /// Reply length when the request sets no `max_tokens`.
    pub default_completion_tokens: u64,
    /// A fault applied to a share of all requests.
    pub fault: Option<Fault>,
    /// The share of requests (0.0–1.0) that get `fault`.
    pub fault_rate: f64,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            models: DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect(),
            rpm: None,
            tpm: None,
            insufficient_quota: false,
            ttft: Duration::ZERO,
            tokens_per_second: None,
            default_completion_tokens: 16,
            fault: None,
            fault_rate: 1.0,
        }
    }
}

/// The models a default mock serves.
pub const DEFAULT_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
    "text-embedding-3-large",
];
