//! Time as an input. Limit decisions take "now" in nanoseconds from a
//! [`Clock`], so production reads the system clock and tests drive a
//! [`FakeClock`] forward by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of "now" in nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since 1970-01-01T00:00:00Z.
    fn now_ns(&self) -> u64;
}

/// The real clock: wall time at start, then monotonic, so a step of the
/// system clock (NTP) never makes a limiter run backwards.
#[derive(Debug, Clone)]
pub struct SystemClock {
    origin_ns: u64,
    origin: Instant,
}

impl SystemClock {
    /// Anchors the monotonic clock at the current wall time.
    pub fn new() -> Self {
        let origin_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            origin_ns,
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        self.origin_ns + self.origin.elapsed().as_nanos() as u64
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    /// A fake clock reading `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_ns)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }

    /// Sets the clock to `ns`.
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}
