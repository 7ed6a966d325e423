//! What the mock saw, for tests that must prove what reached the provider
//! (a cancelled stream, one execution of an idempotent request).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Live counters; every change wakes [`MockStats::wait_until`].
#[derive(Debug, Default)]
pub struct MockStats {
    received: AtomicU64,
    completed: AtomicU64,
    cancelled: AtomicU64,
    rate_limited: AtomicU64,
    faulted: AtomicU64,
    completion_tokens: AtomicU64,
    changed: Notify,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Requests that reached a handler.
    pub received: u64,
    /// Responses delivered in full (bodies and streams to `[DONE]`).
    pub completed: u64,
    /// Streams the client hung up on before the end.
    pub cancelled: u64,
    /// 429s for the mock's own limits.
    pub rate_limited: u64,
    /// Requests that got an injected fault.
    pub faulted: u64,
    /// Completion tokens delivered (streams: only what was sent).
    pub completion_tokens: u64,
}

/// Which counter moved.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    Received,
    Completed,
    Cancelled,
    RateLimited,
    Faulted,
}

impl MockStats {
    pub(crate) fn record(&self, event: Event) {
        let counter = match event {
            Event::Received => &self.received,
            Event::Completed => &self.completed,
            Event::Cancelled => &self.cancelled,
            Event::RateLimited => &self.rate_limited,
            Event::Faulted => &self.faulted,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub(crate) fn add_completion_tokens(&self, n: u64) {
        self.completion_tokens.fetch_add(n, Ordering::SeqCst);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.load(Ordering::SeqCst),
            completed: self.completed.load(Ordering::SeqCst),
            cancelled: self.cancelled.load(Ordering::SeqCst),
            rate_limited: self.rate_limited.load(Ordering::SeqCst),
            faulted: self.faulted.load(Ordering::SeqCst),
            completion_tokens: self.completion_tokens.load(Ordering::SeqCst),
        }
    }

    /// Waits until `pred` holds for the counters, or `timeout` passes;
    /// returns the last snapshot either way.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&StatsSnapshot) -> bool,
    ) -> StatsSnapshot {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let snap = self.snapshot();
            if pred(&snap) {
                return snap;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.snapshot();
            }
        }
    }
}
