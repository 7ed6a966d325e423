//! The client itself: pace, send, classify, retry, settle, with one
//! `Idempotency-Key` per logical request kept across its retries.

use crate::classify::{Disposition, classify};
use crate::error::Error;
use crate::pacer::Pacer;
use crate::retry::RetryPolicy;
use bytes::Bytes;
use http::HeaderMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tollgate_core::openai::{
    ChatRequest, CompletionRequest, EmbeddingRequest, UsageOnly, with_model,
};
use tollgate_core::tokens::{Encoding, Estimator};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL including `/v1` (`https://api.openai.com/v1`, a Tollgate's `http://…/v1`).
    pub base_url: String,
    /// API keys, used in turn; each is paced on its own.
    pub keys: Vec<String>,
    /// Requests per minute allowed per key, if known.
    pub rpm: Option<u64>,
    /// Tokens per minute allowed per key, if known.
    pub tpm: Option<u64>,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Retries.
    pub retry: RetryPolicy,
    /// How tokens are estimated for TPM pacing.
    pub estimator: Estimator,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// Models to try, in order, when a request's own model gives up (its
    /// retries ran out) or does not exist; empty means no fallback.
    pub fallback_models: Vec<String>,
}

impl ClientConfig {
    /// A config for one key at `base_url`, unpaced, 16 in flight.
    pub fn new(base_url: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            keys: vec![key.into()],
            rpm: None,
            tpm: None,
            concurrency: 16,
            retry: RetryPolicy::default(),
            estimator: Estimator {
                fallback: Encoding::O200k,
                default_output: 256,
            },
            timeout: Duration::from_secs(600),
            fallback_models: Vec::new(),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status (2xx).
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response body.
    pub body: Bytes,
    /// Attempts it took.
    pub attempts: u32,
    /// Tokens it used (from `usage`), if reported.
    pub tokens: Option<u64>,
    /// The fallback model that answered, when the request's own did not.
    pub fallback_model: Option<String>,
}

/// What the client has seen so far, for reports.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests sent, retries included.
    pub sent: AtomicU64,
    /// 429 answers received.
    pub throttled: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
}

struct KeySlot {
    secret: String,
    pacer: Mutex<Pacer>,
}

/// An OpenAI-compatible client that paces, classifies and retries.
pub struct Client {
    http: reqwest::Client,
    base: String,
    keys: Vec<KeySlot>,
    permits: Semaphore,
    retry: RetryPolicy,
    estimator: Estimator,
    fallback_models: Vec<String>,
    origin: Instant,
    next_key: AtomicU64,
    /// What it has seen.
    pub counters: Counters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// Pacing runs 1 % under the stated limit: the server counts arrivals, and
/// network jitter would otherwise push an exactly paced request a hair
/// early now and then.
fn with_margin(per_minute: u64) -> u64 {
    (per_minute - per_minute / 100).max(1)
}

fn random_id() -> String {
    format!("tg-idem-{:032x}", fastrand::u128(..))
}

impl Client {
    /// A client for `config`.
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if config.keys.is_empty() {
            return Err(Error::Config("at least one API key is needed".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .pool_max_idle_per_host(config.concurrency.max(1))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: config.base_url.trim_end_matches('/').to_owned(),
            keys: config
                .keys
                .into_iter()
                .map(|secret| KeySlot {
                    secret,
                    pacer: Mutex::new(Pacer::new(
                        config.rpm.map(with_margin),
                        config.tpm.map(with_margin),
                    )),
                })
                .collect(),
            permits: Semaphore::new(config.concurrency.max(1)),
            retry: config.retry,
            estimator: config.estimator,
            fallback_models: config.fallback_models,
            origin: Instant::now(),
            next_key: AtomicU64::new(0),
            counters: Counters::default(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    /// Estimated tokens of a request body for `path`.
    fn estimate(&self, path: &str, body: &[u8]) -> u64 {
        let e = &self.estimator;
        let est = if path.ends_with("/chat/completions") {
            serde_json::from_slice::<ChatRequest<'_>>(body)
                .ok()
                .map(|r| e.chat(r.model.as_deref().unwrap_or_default(), &r))
        } else if path.ends_with("/completions") {
            serde_json::from_slice::<CompletionRequest<'_>>(body)
                .ok()
                .map(|r| e.completion(r.model.as_deref().unwrap_or_default(), &r))
        } else if path.ends_with("/embeddings") {
            serde_json::from_slice::<EmbeddingRequest<'_>>(body)
                .ok()
                .map(|r| e.embedding(r.model.as_deref().unwrap_or_default(), &r))
        } else {
            None
        };
        est.map_or(0, |e| e.total())
    }

    /// Takes a slot on the first key with room now, waiting as long as the
    /// soonest key needs when none has. Keys are tried from a rotating start
    /// so their load evens out.
    async fn take_slot(&self, tokens: u64) -> usize {
        loop {
            let now = self.now_ns();
            let start = self.next_key.fetch_add(1, Ordering::Relaxed) as usize;
            let mut soonest = Duration::MAX;
            for offset in 0..self.keys.len() {
                let i = (start + offset) % self.keys.len();
                let taken = self.keys[i]
                    .pacer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_take(tokens, now);
                match taken {
                    Ok(()) => return i,
                    Err(wait) => soonest = soonest.min(wait),
                }
            }
            tokio::time::sleep(soonest).await;
        }
    }

    /// POSTs a JSON `body` to `path` (`/chat/completions`, …), pacing,
    /// retrying what may be retried, and failing with what to do next.
    pub async fn post_json(&self, path: &str, body: Bytes) -> Result<Answer, Error> {
        self.post_json_idempotent(path, body, random_id()).await
    }

    /// [`Client::post_json`] under a caller-chosen `Idempotency-Key`, so a
    /// request resent after a crash is recognisable as the same one. When
    /// its model gives up, the fallback models are tried in turn, each as
    /// its own logical request (`KEY/MODEL`).
    pub async fn post_json_idempotent(
        &self,
        path: &str,
        body: Bytes,
        idempotency_key: String,
    ) -> Result<Answer, Error> {
        let mut result = self
            .send_with_retries(path, body.clone(), &idempotency_key)
            .await;
        for model in &self.fallback_models {
            match &result {
                Err(e) if e.model_may_fall_back() => {}
                _ => break,
            }
            let Some(fallback) = with_model(&body, model).map(Bytes::from) else {
                break;
            };
            let key = format!("{idempotency_key}/{model}");
            result = self
                .send_with_retries(path, fallback, &key)
                .await
                .map(|answer| Answer {
                    fallback_model: Some(model.clone()),
                    ..answer
                });
        }
        result
    }

    /// One logical request: paced, sent, classified and retried.
    async fn send_with_retries(
        &self,
        path: &str,
        body: Bytes,
        idempotency_key: &str,
    ) -> Result<Answer, Error> {
        let url = format!("{}{path}", self.base);
        let estimate = self.estimate(path, &body);
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            let _permit = self
                .permits
                .acquire()
                .await
                .map_err(|_| Error::Config("client closed".into()))?;
            let key = self.take_slot(estimate).await;
            attempts += 1;
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .http
                .post(&url)
                .bearer_auth(&self.keys[key].secret)
                .header("content-type", "application/json")
                .header("idempotency-key", idempotency_key)
                .body(body.clone())
                .send()
                .await;
            let (disposition, failure) = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let headers = resp.headers().clone();
                    let bytes = resp.bytes().await.unwrap_or_default();
                    self.keys[key]
                        .pacer
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .observe(&headers, self.now_ns());
                    let d = classify(status, &headers, &bytes, SystemTime::now());
                    if d == Disposition::Done {
                        let tokens = serde_json::from_slice::<UsageOnly>(&bytes)
                            .ok()
                            .and_then(|u| u.usage)
                            .map(|u| u.tokens());
                        if let Some(actual) = tokens {
                            self.keys[key]
                                .pacer
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .settle(estimate, actual);
                        }
                        return Ok(Answer {
                            status,
                            headers,
                            body: bytes,
                            attempts,
                            tokens,
                            fallback_model: None,
                        });
                    }
                    if status == 429 {
                        self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(e) = Error::from_disposition(&d, status, &bytes, SystemTime::now())
                    {
                        return Err(e);
                    }
                    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                        .ok()
                        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    (d, (status, message))
                }
                Err(e) => (Disposition::Backoff, (0, e.without_url().to_string())),
            };
            drop(_permit);
            match self
                .retry
                .next_delay(attempts, &disposition, started.elapsed(), fastrand::f64())
            {
                Some(delay) => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(Error::GaveUp {
                        attempts,
                        elapsed: started.elapsed(),
                        status: failure.0,
                        message: failure.1,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_model_failures_fall_back() {
        let gave_up = Error::GaveUp {
            attempts: 3,
            elapsed: Duration::from_secs(1),
            status: 503,
            message: String::new(),
        };
        assert!(gave_up.model_may_fall_back());
        let missing = Error::Rejected {
            status: 404,
            code: "model_not_found".into(),
            message: String::new(),
        };
        assert!(missing.model_may_fall_back());
        let bad = Error::Rejected {
            status: 400,
            code: "invalid_value".into(),
            message: String::new(),
        };
        assert!(!bad.model_may_fall_back());
        let budget = Error::BudgetExhausted {
            scope: "team:a".into(),
            until: None,
        };
        assert!(!budget.model_may_fall_back());
    }
}
