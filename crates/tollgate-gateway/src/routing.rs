//! Pools: the deployments that serve one model, and the health of each.
//!
//! A request goes to the next healthy deployment of its model's pool, in
//! turn. A deployment that answers 429 cools down for the provider's
//! `Retry-After` and the request moves on at once, unseen by the client; one
//! that fails (5xx, timeout, reset, garbage) counts a failure, and after
//! [`OPEN_AFTER`] in a row its circuit opens for [`OPEN_FOR`], then lets one
//! probe through. When every deployment is cooling down the client hears
//! 429 with the true time the first one reopens.

use crate::error::Error;
use crate::upstream::{Deployment, Endpoint, Outcome};
use bytes::Bytes;
use http::HeaderMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Consecutive failures that open a deployment's circuit.
pub const OPEN_AFTER: u32 = 5;
/// How long an open circuit stays open before a probe.
pub const OPEN_FOR: Duration = Duration::from_secs(30);
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

    fn failed(&self, now: u64) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let opens = n >= OPEN_AFTER;
        if opens {
            let until = now.saturating_add(OPEN_FOR.as_nanos() as u64);
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
    /// answers, a throttled one moving the request on at once.
    pub async fn send(
        &self,
        now: impl Fn() -> u64,
        endpoint: Endpoint,
        body: &Bytes,
        passthrough: &HeaderMap,
    ) -> Result<Sent, Failed> {
        let n = self.deployments.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let mut attempts = 0;
        // The last throttled answer: its deployment, body and whether the
        // provider said the quota (not the rate) is exhausted.
        let mut throttled: Option<(Arc<Deployment>, Bytes, bool)> = None;
        let mut failed: Option<(Arc<Deployment>, Error)> = None;
        for i in 0..n {
            let d = &self.deployments[(start + i) % n];
            if !d.health.available(now()) {
                continue;
            }
            attempts += 1;
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
                    return Ok(Sent {
                        deployment: d.clone(),
                        outcome,
                        attempts,
                    });
                }
                Err(e) if worth_another_route(&e) => {
                    if d.health.failed(now()) {
                        tracing::warn!(deployment = %d.name, failures = OPEN_AFTER, "circuit opened: the deployment gets no traffic for 30 s, then one probe");
                    }
                    tracing::debug!(deployment = %d.name, error = %e, "upstream failed; trying the next route");
                    failed = Some((d.clone(), e));
                }
                Err(e) => {
                    return Err(Failed {
                        error: e,
                        deployment: Some(d.clone()),
                        attempts,
                    });
                }
            }
        }
        // Throttling is the honest answer when it happened: it says when
        // to come back, which is the earliest reopening in the pool.
        if let Some((deployment, body, quota_exhausted)) = throttled {
            let wait = Duration::from_nanos(self.reopens_at().saturating_sub(now()));
            return Ok(Sent {
                deployment,
                outcome: Outcome::Throttled {
                    body,
                    retry_after: Some(wait),
                    quota_exhausted,
                },
                attempts,
            });
        }
        if let Some((deployment, error)) = failed {
            return Err(Failed {
                error,
                deployment: Some(deployment),
                attempts,
            });
        }
        // Nothing was tried: every deployment is cooling down or open.
        let wait = Duration::from_nanos(self.reopens_at().saturating_sub(now()));
        Err(Failed {
            error: Error::RoutesCooling { retry_after: wait },
            deployment: None,
            attempts,
        })
    }
}
