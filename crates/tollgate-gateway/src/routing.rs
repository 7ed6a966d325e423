//! Pools: the deployments that serve one model, and the health of each.
//!
//! A request goes to the next healthy deployment of its model's pool, in
//! turn. A deployment that answers 429 cools down for the provider's
//! `Retry-After` and the request moves on at once, unseen by the client; one
//! that fails (5xx, timeout, reset, garbage) counts a failure, and after
//! `circuit_failures` in a row its circuit opens for `circuit_open_for`,
//! then lets one probe through. When every deployment failed, the pool is
//! tried again after a full-jitter backoff, within the attempts and time
//! budget of `[routing]`. When every deployment is cooling down the client
//! hears 429 with the true time the first one reopens.

use crate::config::{FallbackTrigger, RoutingConfig};
use crate::error::Error;
use crate::upstream::{Deployment, Endpoint, Outcome};
use bytes::Bytes;
use http::HeaderMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tollgate_core::backoff::full_jitter;

/// Cool-down after a 429 without retry advice.
const DEFAULT_COOL_DOWN: Duration = Duration::from_secs(1);
/// Cool-down after `insufficient_quota`: billing, not load; it needs a human.
const QUOTA_COOL_DOWN: Duration = Duration::from_secs(600);

/// One deployment's health, shared by every pool it serves in.
#[derive(Debug, Default)]
pub struct Health {
    /// Refuses traffic until this time (ns on the gateway's clock): a 429.
    cooling_until: AtomicU64,
    /// Failures in a row.
    failures: AtomicU32,
    /// Circuit open until this time (ns).
    open_until: AtomicU64,
}

impl Health {
    /// When it takes traffic again (ns); `now` or earlier means now.
    pub fn reopens_at(&self) -> u64 {
        self.cooling_until
            .load(Ordering::Relaxed)
            .max(self.open_until.load(Ordering::Relaxed))
    }

    fn available(&self, now: u64) -> bool {
        self.reopens_at() <= now
    }

    fn cool_down(&self, now: u64, wait: Duration) {
        let until = now.saturating_add(wait.as_nanos() as u64);
        self.cooling_until.fetch_max(until, Ordering::Relaxed);
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    fn failed(&self, now: u64, config: &RoutingConfig) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let opens = config.circuit_failures > 0 && n >= config.circuit_failures;
        if opens {
            let until = now.saturating_add(config.circuit_open_for.as_nanos() as u64);
            self.open_until.store(until, Ordering::Relaxed);
        }
        opens
    }

    /// Whether the circuit is open at `now`.
    pub fn circuit_open(&self, now: u64) -> bool {
        self.open_until.load(Ordering::Relaxed) > now
    }

    /// What `/admin/deployments` shows.
    pub fn view(&self, now: u64) -> serde_json::Value {
        let ms = |until: u64| until.saturating_sub(now) / 1_000_000;
        serde_json::json!({
            "available": self.available(now),
            "cooling_down_ms": ms(self.cooling_until.load(Ordering::Relaxed)),
            "circuit": if self.circuit_open(now) { "open" } else { "closed" },
            "circuit_open_ms": ms(self.open_until.load(Ordering::Relaxed)),
            "consecutive_failures": self.failures.load(Ordering::Relaxed),
        })
    }
}

/// The deployments that serve one model.
#[derive(Debug)]
pub struct Pool {
    /// In configuration order.
    pub deployments: Vec<Arc<Deployment>>,
    next: AtomicUsize,
}

/// What a pool's attempts came to.
#[derive(Debug)]
pub struct Sent {
    /// The deployment whose answer this is.
    pub deployment: Arc<Deployment>,
    /// Its answer.
    pub outcome: Outcome,
    /// Deployments tried.
    pub attempts: u32,
}

/// Every route failed.
#[derive(Debug)]
pub struct Failed {
    /// The last error.
    pub error: Error,
    /// The deployment that gave it, if any was tried.
    pub deployment: Option<Arc<Deployment>>,
    /// Deployments tried.
    pub attempts: u32,
}

/// The fallback class of a pool's result, if it has one.
pub fn trigger_of(result: &Result<Sent, Failed>) -> Option<FallbackTrigger> {
    match result {
        Ok(Sent {
            outcome: Outcome::Throttled { .. },
            ..
        }) => Some(FallbackTrigger::RateLimit),
        Ok(Sent {
            outcome: Outcome::CallerError { status, body, .. },
            ..
        }) if status.as_u16() == 400
            && body
                .windows(b"context_length_exceeded".len())
                .any(|w| w == b"context_length_exceeded") =>
        {
            Some(FallbackTrigger::ContextLength)
        }
        Ok(_) => None,
        Err(f) => match &f.error {
            Error::RoutesCooling { .. } => Some(FallbackTrigger::RateLimit),
            Error::UpstreamTimeout { .. } => Some(FallbackTrigger::Timeout),
            Error::UpstreamStatus { status, code, .. }
                if *status == 529 || code.as_deref().is_some_and(|c| c.contains("overloaded")) =>
            {
                Some(FallbackTrigger::Overload)
            }
            Error::UpstreamStatus { .. }
            | Error::UpstreamUnreachable { .. }
            | Error::UpstreamInvalid { .. }
            | Error::UpstreamAuth { .. }
            | Error::RoutesDown { .. } => Some(FallbackTrigger::ServerError),
            _ => None,
        },
    }
}

fn worth_another_route(e: &Error) -> bool {
    matches!(
        e,
        Error::UpstreamStatus { .. }
            | Error::UpstreamTimeout { .. }
            | Error::UpstreamUnreachable { .. }
            | Error::UpstreamInvalid { .. }
            | Error::UpstreamAuth { .. }
    )
}

impl Pool {
    /// A pool of `deployments`.
    pub fn new(deployments: Vec<Arc<Deployment>>) -> Self {
        Self {
            deployments,
            next: AtomicUsize::new(0),
        }
    }

    /// The earliest time any deployment takes traffic again (ns).
    pub fn reopens_at(&self) -> u64 {
        self.deployments
            .iter()
            .map(|d| d.health.reopens_at())
            .min()
            .unwrap_or(0)
    }

    /// Sends `body` to the pool's healthy deployments in turn until one
    /// answers, a throttled one moving the request on at once. When every
    /// deployment failed, waits a full-jitter backoff and goes round again,
    /// within `retry`'s attempts and time budget.
    pub async fn send(
        &self,
        now: impl Fn() -> u64,
        retry: &RoutingConfig,
        endpoint: Endpoint,
        body: &Bytes,
        passthrough: &HeaderMap,
    ) -> Result<Sent, Failed> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut failed: Option<(Arc<Deployment>, Error)> = None;
        for pass in 1.. {
            match self
                .pass(&now, retry, endpoint, body, passthrough, &mut attempts)
                .await
            {
                Pass::Done(result) => return result,
                Pass::AllFailed(d, e) => failed = Some((d, e)),
                Pass::NoneAvailable => {}
            }
            let wait = full_jitter(retry.backoff_base, retry.backoff_cap, pass, fastrand::f64());
            let in_budget = started.elapsed() + wait <= retry.retry_budget;
            if failed.is_none() || attempts >= retry.max_attempts || !in_budget {
                break;
            }
            tracing::debug!(
                attempts,
                ?wait,
                "every route failed; backing off before another pass"
            );
            tokio::time::sleep(wait).await;
        }
        if let Some((deployment, error)) = failed {
            return Err(Failed {
                error,
                deployment: Some(deployment),
                attempts,
            });
        }
        // Nothing could be tried: every deployment is cooling down after a
        // 429 (the client hears 429) or has its circuit open (503).
        let wait = Duration::from_nanos(self.reopens_at().saturating_sub(now()));
        let cooling = self
            .deployments
            .iter()
            .any(|d| d.health.cooling_until.load(Ordering::Relaxed) > now());
        let error = if cooling {
            Error::RoutesCooling { retry_after: wait }
        } else {
            Error::RoutesDown { retry_after: wait }
        };
        Err(Failed {
            error,
            deployment: None,
            attempts,
        })
    }

    /// One pass over the available deployments.
    async fn pass(
        &self,
        now: &impl Fn() -> u64,
        retry: &RoutingConfig,
        endpoint: Endpoint,
        body: &Bytes,
        passthrough: &HeaderMap,
        attempts: &mut u32,
    ) -> Pass {
        let n = self.deployments.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        // The last throttled answer: its deployment, body and whether the
        // provider said the quota (not the rate) is exhausted.
        let mut throttled: Option<(Arc<Deployment>, Bytes, bool)> = None;
        let mut failed: Option<(Arc<Deployment>, Error)> = None;
        for i in 0..n {
            let d = &self.deployments[(start + i) % n];
            if !d.health.available(now()) || *attempts >= retry.max_attempts.max(1) {
                continue;
            }
            *attempts += 1;
            let attempts = *attempts;
            match d.send(endpoint, body.clone(), passthrough).await {
                Ok(Outcome::Throttled {
                    body,
                    retry_after,
                    quota_exhausted,
                }) => {
                    let wait = if quota_exhausted {
                        tracing::error!(target: "tollgate::alert", deployment = %d.name, "the provider says this deployment is out of quota (insufficient_quota); it takes no traffic for 10 minutes");
                        QUOTA_COOL_DOWN
                    } else {
                        retry_after.unwrap_or(DEFAULT_COOL_DOWN)
                    };
                    d.health.cool_down(now(), wait);
                    throttled = Some((d.clone(), body, quota_exhausted));
                }
                Ok(outcome) => {
                    d.health.succeeded();
                    return Pass::Done(Ok(Sent {
                        deployment: d.clone(),
                        outcome,
                        attempts,
                    }));
                }
                Err(e) if worth_another_route(&e) => {
                    if d.health.failed(now(), retry) {
                        tracing::warn!(deployment = %d.name, failures = retry.circuit_failures, open_for = ?retry.circuit_open_for, "circuit opened: the deployment gets no traffic for a while, then one probe");
                    }
                    tracing::debug!(deployment = %d.name, error = %e, "upstream failed; trying the next route");
                    failed = Some((d.clone(), e));
                }
                Err(e) => {
                    return Pass::Done(Err(Failed {
                        error: e,
                        deployment: Some(d.clone()),
                        attempts,
                    }));
                }
            }
        }
        // Throttling is the honest answer when it happened: it says when
        // to come back, which is the earliest reopening in the pool.
        if let Some((deployment, body, quota_exhausted)) = throttled {
            let wait = Duration::from_nanos(self.reopens_at().saturating_sub(now()));
            return Pass::Done(Ok(Sent {
                deployment,
                outcome: Outcome::Throttled {
                    body,
                    retry_after: Some(wait),
                    quota_exhausted,
                },
                attempts: *attempts,
            }));
        }
        match failed {
            Some((d, e)) => Pass::AllFailed(d, e),
            None => Pass::NoneAvailable,
        }
    }
}

/// How one pass over a pool ended.
enum Pass {
    /// An answer (or an error another route cannot help).
    Done(Result<Sent, Failed>),
    /// Every deployment tried failed; the last failure.
    AllFailed(Arc<Deployment>, Error),
    /// No deployment could be tried.
    NoneAvailable,
}
