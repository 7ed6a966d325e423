//! Pools: the deployments that serve one model, and the health of each.
//!
//! A request goes to the healthy deployment of its model's pool with the
//! most headroom under its provider limits (see [`crate::headroom`]), in
//! turn among equals; when none has room, it waits for the first that will
//! rather than earn a 429. A deployment that answers 429 cools down for the provider's
//! `Retry-After` and the request moves on at once, unseen by the client; one
//! that fails (5xx, timeout, reset, garbage) counts a failure, and after
//! `circuit_failures` in a row its circuit opens for `circuit_open_for`,
//! then lets one probe through. When every deployment failed, the pool is
//! tried again after a full-jitter backoff, within the attempts and time
//! budget of `[routing]`. When every deployment is cooling down the client
//! hears 429 with the true time the first one reopens.

use crate::config::{FallbackTrigger, RoutingConfig};
use crate::error::Error;
use crate::headroom::Fit;
use crate::upstream::{Call, Deployment, Outcome};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tollgate_core::backoff::full_jitter;
use tollgate_core::limits::Cost;

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

/// An upstream call's outcome as the `outcome` label says it.
fn outcome_label(result: &Result<Outcome, Error>) -> &'static str {
    match result {
        Ok(Outcome::Success(_)) => "ok",
        Ok(Outcome::Throttled { .. }) => "throttled",
        Ok(Outcome::CallerError { .. }) => "caller_error",
        Err(Error::UpstreamTimeout { .. }) => "timeout",
        Err(Error::UpstreamUnreachable { .. }) => "unreachable",
        Err(Error::UpstreamInvalid { .. }) => "invalid",
        Err(Error::UpstreamAuth { .. }) => "auth",
        Err(_) => "server_error",
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

    /// Sends `call` to the pool's healthy deployments, the one with the
    /// most headroom first, until one answers, a throttled one moving the
    /// request on at once. When none has room for it under its provider
    /// limits, waits until one has (up to `max_pace_wait`). When every
    /// deployment failed, waits a full-jitter backoff and goes round again,
    /// within `retry`'s attempts and time budget.
    pub async fn send(
        &self,
        now: impl Fn() -> u64,
        retry: &RoutingConfig,
        call: &Call<'_>,
    ) -> Result<Sent, Failed> {
        let started = Instant::now();
        let mut attempts = 0;
        let mut backoffs = 0;
        let mut failed: Option<(Arc<Deployment>, Error)> = None;
        let mut not_before: Option<Duration> = None;
        let mut too_large: Option<u64> = None;
        loop {
            match self.pass(&now, retry, call, &mut attempts).await {
                Pass::Done(result) => return result,
                Pass::AllFailed(d, e) => failed = Some((d, e)),
                Pass::Paced(wait) => {
                    // Pacing is not a failure: the request waits its turn
                    // instead of earning the provider's 429.
                    if started.elapsed() + wait <= retry.max_pace_wait {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    not_before = Some(wait);
                    break;
                }
                Pass::TooLarge(limit) => {
                    too_large = Some(limit);
                    break;
                }
                Pass::NoneAvailable => {}
            }
            backoffs += 1;
            let wait = full_jitter(
                retry.backoff_base,
                retry.backoff_cap,
                backoffs,
                fastrand::f64(),
            );
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
        let error = if let Some(limit) = too_large {
            Error::TooLargeForRoutes {
                limit,
                requested: call.cost.tokens,
            }
        } else {
            // Nothing could be tried: every deployment is at its provider
            // limits or cooling down after a 429 (the client hears 429), or
            // has its circuit open (503).
            let reopens = Duration::from_nanos(self.reopens_at().saturating_sub(now()));
            let cooling = self
                .deployments
                .iter()
                .any(|d| d.health.cooling_until.load(Ordering::Relaxed) > now());
            match not_before {
                Some(wait) => Error::RoutesCooling {
                    retry_after: if cooling { wait.min(reopens) } else { wait },
                },
                None if cooling => Error::RoutesCooling {
                    retry_after: reopens,
                },
                None => Error::RoutesDown {
                    retry_after: reopens,
                },
            }
        };
        Err(Failed {
            error,
            deployment: None,
            attempts,
        })
    }

    /// The available deployments, the most headroom for `cost` first (in
    /// turn among equals); the shortest wait for one that has none, and
    /// the provider limit of one the request can never fit.
    fn candidates(&self, now: u64, cost: Cost) -> (Candidates, Option<Duration>, Option<u64>) {
        let n = self.deployments.len();
        let start = if n > 1 {
            self.next.fetch_add(1, Ordering::Relaxed) % n
        } else {
            0
        };
        let mut order = Candidates::new();
        let (mut wait, mut never) = (None::<Duration>, None);
        for i in (0..n).map(|i| (start + i) % n) {
            let d = &self.deployments[i];
            if !d.health.available(now) {
                continue;
            }
            match d.headroom.fit(cost, now) {
                Fit::Leaves(share) => order.push((share, i)),
                Fit::After(w) => wait = Some(wait.map_or(w, |v| v.min(w))),
                Fit::Never { limit } => never = Some(limit),
            }
        }
        // Stable: among equal headroom the turn order stands.
        order.sort_by_key(|(share, _)| std::cmp::Reverse(*share));
        (order, wait, never)
    }

    /// One pass over the available deployments.
    async fn pass(
        &self,
        now: &impl Fn() -> u64,
        retry: &RoutingConfig,
        call: &Call<'_>,
        attempts: &mut u32,
    ) -> Pass {
        let (order, mut paced, never) = self.candidates(now(), call.cost);
        // The last throttled answer: its deployment, body and whether the
        // provider said the quota (not the rate) is exhausted.
        let mut throttled: Option<(Arc<Deployment>, Bytes, bool)> = None;
        let mut failed: Option<(Arc<Deployment>, Error)> = None;
        for (_, i) in order {
            let d = &self.deployments[i];
            if !d.health.available(now()) || *attempts >= retry.max_attempts.max(1) {
                continue;
            }
            let reservation = match d.headroom.reserve(call.cost, now()) {
                Ok(r) => r,
                // Another request took the room since the candidates were read.
                Err(Fit::After(w)) => {
                    paced = Some(paced.map_or(w, |v| v.min(w)));
                    continue;
                }
                Err(_) => continue,
            };
            *attempts += 1;
            let attempts = *attempts;
            let result = d.send(call, reservation, now).await;
            crate::metrics::attempt(&d.name, outcome_label(&result));
            match result {
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
        match (failed, paced, never) {
            (Some((d, e)), _, _) => Pass::AllFailed(d, e),
            (None, Some(wait), _) => Pass::Paced(wait),
            (None, None, Some(limit)) => Pass::TooLarge(limit),
            (None, None, None) => Pass::NoneAvailable,
        }
    }
}

/// A pass's deployments (headroom ‰, index), on the stack for small pools.
type Candidates = smallvec::SmallVec<[(u32, usize); 4]>;

/// How one pass over a pool ended.
enum Pass {
    /// An answer (or an error another route cannot help).
    Done(Result<Sent, Failed>),
    /// Every deployment tried failed; the last failure.
    AllFailed(Arc<Deployment>, Error),
    /// No deployment has room under its provider limits for this long.
    Paced(Duration),
    /// The request exceeds every deployment's whole provider token limit.
    TooLarge(u64),
    /// No deployment could be tried.
    NoneAvailable,
}
