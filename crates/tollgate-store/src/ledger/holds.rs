//! Holds of requests in flight, kept by the serving thread that placed
//! them. Most requests settle within [`super::HOLD_PERSIST_AFTER`] and
//! their holds never reach the disk, so a hold costs its request no
//! message to the writer: the writer looks through every thread's holds
//! at each batch and writes the ones that have aged. Sending each hold to
//! the writer (and each settlement to clear it) took the shared channel's
//! contended send a second time a request and a map of open holds on the
//! writer's thread, about 0.2 µs a charged request on two cores.

use super::{Entry, HoldRow};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thread_local::ThreadLocal;
use tokio::sync::mpsc;

/// Every serving thread's open holds.
#[derive(Debug)]
pub(super) struct OpenHolds {
    threads: ThreadLocal<Arc<ThreadHolds>>,
    /// The writer's channel, to wake it when holds appear and to clear a
    /// written hold whose request was refused after all (weak: the writer
    /// reads these holds and must not keep its own channel open).
    tx: mpsc::WeakUnboundedSender<Entry>,
}

/// One thread's open holds.
#[derive(Debug)]
struct ThreadHolds {
    slots: Mutex<Slots>,
    tx: mpsc::WeakUnboundedSender<Entry>,
}

/// Holds by slot; a settled hold's slot is reused.
#[derive(Debug, Default)]
struct Slots {
    held: Vec<Option<OpenHold>>,
    free: Vec<usize>,
}

#[derive(Debug)]
struct OpenHold {
    hold: HoldRow,
    since: Instant,
    /// Given to the writer to commit.
    written: bool,
}

/// A request's open hold: settle it with its usage row, or drop it to
/// release it (the request was refused after all, or never ran).
#[derive(Debug)]
pub struct HoldTicket {
    thread: Arc<ThreadHolds>,
    /// `None` once settled.
    slot: Option<usize>,
}

impl OpenHolds {
    pub(super) fn new(tx: mpsc::WeakUnboundedSender<Entry>) -> Self {
        Self {
            threads: ThreadLocal::new(),
            tx,
        }
    }

    /// Keeps `hold` on this thread until its request settles.
    pub(super) fn open(&self, hold: HoldRow) -> HoldTicket {
        let thread = self.threads.get_or(|| {
            Arc::new(ThreadHolds {
                slots: Mutex::default(),
                tx: self.tx.clone(),
            })
        });
        let (slot, first) = {
            let mut slots = thread.lock();
            let first = slots.free.len() == slots.held.len();
            let open = Some(OpenHold {
                hold,
                since: Instant::now(),
                written: false,
            });
            let slot = match slots.free.pop() {
                Some(slot) => {
                    slots.held[slot] = open;
                    slot
                }
                None => {
                    slots.held.push(open);
                    slots.held.len() - 1
                }
            };
            (slot, first)
        };
        if first {
            // The writer sleeps without a deadline while no thread has a
            // hold open: tell it one is.
            if let Some(tx) = self.tx.upgrade() {
                let _ = tx.send(Entry::Wake);
            }
        }
        HoldTicket {
            thread: thread.clone(),
            slot: Some(slot),
        }
    }

    /// Marks the holds open `after` or longer as written and returns them;
    /// also whether any hold is open (the writer must look again later).
    pub(super) fn age(&self, after: Duration) -> (Vec<HoldRow>, bool) {
        let now = Instant::now();
        let mut aged = Vec::new();
        let mut any_open = false;
        for thread in self.threads.iter() {
            let mut slots = thread.lock();
            for h in slots.held.iter_mut().flatten() {
                any_open = true;
                if !h.written && now.duration_since(h.since) >= after {
                    h.written = true;
                    aged.push(h.hold.clone());
                }
            }
        }
        (aged, any_open)
    }
}

impl ThreadHolds {
    fn lock(&self) -> MutexGuard<'_, Slots> {
        // A poisoned lock only means a thread panicked while holding it;
        // the slots are whole.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HoldTicket {
    /// Closes the hold as its request settles: true when it was written,
    /// so that the request's usage row must clear it.
    pub fn settle(mut self) -> bool {
        self.take().is_some_and(|h| h.written)
    }

    fn take(&mut self) -> Option<OpenHold> {
        let slot = self.slot.take()?;
        let mut slots = self.thread.lock();
        let open = slots.held.get_mut(slot)?.take();
        slots.free.push(slot);
        open
    }
}

impl Drop for HoldTicket {
    /// Releases a hold left unsettled: no row will clear it, so a written
    /// one is cleared on its own.
    fn drop(&mut self) {
        if let Some(open) = self.take().filter(|h| h.written)
            && let Some(tx) = self.thread.tx.upgrade()
        {
            let _ = tx.send(Entry::Release(open.hold.request_id));
        }
    }
}
