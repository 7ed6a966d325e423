//! How the ledger's writer thread competes for the CPU.
//!
//! On SQLite no request waits for a commit (its row is durable once in the
//! journal), so the writer can take only the CPU no other thread wants:
//! Linux's `SCHED_IDLE`. At its normal priority, its commit (a few
//! milliseconds of SQLite every 25 ms at full speed) took a core from a
//! serving thread, and on two cores the closed loop of load generator,
//! gateway and provider left the other core idle meanwhile: 9–10 % of the
//! two cores idle against 6–7 % without the ledger, back to 6 % with the
//! writer yielding, for 4 % more requests a second at full speed
//! (BENCHMARKS.md, stop 32). `nice 19` and `SCHED_BATCH` left the idle
//! as it was.
//!
//! A writer that yields to everything could fall behind on a host kept busy
//! by others, so it yields only while it keeps up: a batch cut off at its
//! largest size, or a flush waiting for the commit, takes it back to the
//! normal policy. Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` (or
//! `RLIMIT_NICE` of 20), so a probe thread tries the round trip first, and
//! where it fails the writer never yields.

/// The writer thread's scheduling policy, changed only when it must.
#[derive(Debug)]
pub(super) struct WriterPriority {
    /// Whether the writer may yield, and can come back.
    can_yield: bool,
    /// Whether it yields now.
    yielding: bool,
}

impl WriterPriority {
    /// A writer that never yields, or (`may_yield`) one that yields where
    /// this process can take it back to the normal policy.
    pub(super) fn new(may_yield: bool) -> Self {
        let can_yield = may_yield && can_return_from_idle();
        if may_yield && !can_yield {
            tracing::info!(
                "the ledger writer keeps the normal CPU policy: yielding to requests (SCHED_IDLE) needs CAP_SYS_NICE or an RLIMIT_NICE of 20 to come back"
            );
        }
        Self {
            can_yield,
            yielding: false,
        }
    }

    /// Makes the calling thread yield the CPU to every other thread, or
    /// stop yielding.
    pub(super) fn yield_cpu(&mut self, yielding: bool) {
        if !self.can_yield || self.yielding == yielding {
            return;
        }
        match set_policy(yielding) {
            Ok(()) => self.yielding = yielding,
            Err(e) => {
                tracing::warn!(error = %e, yielding, "cannot change the ledger writer's scheduling policy; it stays as it is");
                self.can_yield = false;
            }
        }
    }
}

/// Tries `SCHED_IDLE` and back on a thread of its own (which may end in
/// `SCHED_IDLE` without harm).
fn can_return_from_idle() -> bool {
    std::thread::Builder::new()
        .name("tollgate-probe".into())
        .spawn(|| set_policy(true).is_ok() && set_policy(false).is_ok())
        .ok()
        .and_then(|probe| probe.join().ok())
        .unwrap_or(false)
}

#[cfg(target_os = "linux")]
fn set_policy(idle: bool) -> Result<(), thread_priority::Error> {
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id,
    };
    use thread_priority::{ThreadPriority, ThreadPriorityOsValue};
    let policy = if idle {
        NormalThreadSchedulePolicy::Idle
    } else {
        NormalThreadSchedulePolicy::Other
    };
    // The crate also sets the nice value: 0, the default. A process
    // started niced cannot lower it unprivileged, so the probe fails and
    // the writer keeps the policy it has.
    set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Os(ThreadPriorityOsValue::default()),
        ThreadSchedulePolicy::Normal(policy),
    )
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_idle: bool) -> Result<(), std::io::Error> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, thread_schedule_policy,
    };

    fn policy() -> ThreadSchedulePolicy {
        thread_schedule_policy().expect("the thread's policy")
    }

    /// A writer that may yield runs under `SCHED_IDLE` while it yields and
    /// under the normal policy otherwise, where the process can come back
    /// from it (the tests run as root in CI); where it cannot, and for a
    /// writer that may not yield, the policy never changes.
    #[test]
    fn the_writer_yields_only_where_it_can_come_back() {
        std::thread::spawn(|| {
            let normal = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other);
            assert_eq!(policy(), normal);
            let mut fixed = WriterPriority::new(false);
            fixed.yield_cpu(true);
            assert_eq!(policy(), normal, "a writer that may not yield never does");

            let mut writer = WriterPriority::new(true);
            writer.yield_cpu(true);
            if can_return_from_idle() {
                assert_eq!(
                    policy(),
                    ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle)
                );
            } else {
                assert_eq!(policy(), normal, "no yielding without a way back");
            }
            writer.yield_cpu(false);
            assert_eq!(policy(), normal);
        })
        .join()
        .expect("the policies as asserted");
    }
}
