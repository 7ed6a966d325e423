//! Log lines gathered in memory and written to stderr in batches.
//!
//! tracing-appender's writer thread takes one channel message per line, so
//! under load every access line woke that thread (a futex wake, a context
//! switch and a spinning receiver: a sixth of the gateway's CPU per request
//! on two cores). Here a line costs a copy under a lock held for that copy
//! alone; the writer thread writes [`FLUSH_EVERY`] after a line came, or
//! sooner when [`FLUSH_AT`] bytes wait, like nginx's `access_log …
//! buffer= flush=`. With nothing waiting it sleeps until a line comes: an
//! idle gateway's writer would otherwise wake twenty times a second.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest a line waits before it is written.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Bytes waiting that wake the writer before its time.
const FLUSH_AT: usize = 64 << 10;
/// Bytes waiting beyond which a logging thread waits for the writer: when
/// stderr stalls, requests slow down rather than memory growing or lines
/// vanishing.
const HOLD_AT: usize = 8 << 20;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer thread (a first line, bytes past [`FLUSH_AT`], or
    /// closing).
    wake: Condvar,
    /// Wakes loggers held at [`HOLD_AT`] once the writer took the bytes.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while copying bytes leaves them whole enough to write.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The [`tracing_subscriber::fmt::MakeWriter`] of the batched log.
pub struct LogBuffer(Arc<Shared>);

/// Writes what is left and stops the writer thread when dropped.
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread that moves batched lines to `out`.
pub fn start(mut out: impl Write + Send + 'static) -> std::io::Result<(LogBuffer, FlushOnDrop)> {
    let shared = Arc::new(Shared::default());
    let writer = shared.clone();
    let thread = std::thread::Builder::new()
        .name("tollgate-log".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(FLUSH_AT);
            loop {
                let closed = {
                    let mut pending = writer.lock();
                    while pending.bytes.is_empty() && !pending.closed {
                        pending = writer
                            .wake
                            .wait(pending)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                    if pending.bytes.len() < FLUSH_AT && !pending.closed {
                        pending = writer
                            .wake
                            .wait_timeout(pending, FLUSH_EVERY)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                    }
                    std::mem::swap(&mut pending.bytes, &mut batch);
                    pending.closed
                };
                writer.drained.notify_all();
                if !batch.is_empty() {
                    // Nowhere to report a failed write of the log itself.
                    let _ = out.write_all(&batch).and_then(|()| out.flush());
                    batch.clear();
                }
                if closed {
                    return;
                }
            }
        })?;
    Ok((
        LogBuffer(shared.clone()),
        FlushOnDrop {
            shared,
            thread: Some(thread),
        },
    ))
}

// On a shared reference, so that the subscriber lends the buffer to each
// line instead of cloning its `Arc`.
impl Write for &LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.0.lock();
        while pending.bytes.len() >= HOLD_AT && !pending.closed {
            pending = self
                .0
                .drained
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let was = pending.bytes.len();
        pending.bytes.extend_from_slice(buf);
        // The writer sleeps while nothing waits, and need not hear of each
        // line after the first: a wake is a system call.
        let first = was == 0 && !buf.is_empty();
        let crossed = was < FLUSH_AT && pending.bytes.len() >= FLUSH_AT;
        drop(pending);
        if first || crossed {
            self.0.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuffer {
    type Writer = &'a LogBuffer;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Collects what the writer thread writes, and says when it flushed.
    struct Sink(Arc<Mutex<Vec<u8>>>, mpsc::Sender<()>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let _ = self.1.send(());
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_once_in_order_and_the_rest_at_drop() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (flushed, _rx) = mpsc::channel();
        let (log, guard) = start(Sink(out.clone(), flushed)).expect("started");
        let mut expected = Vec::new();
        // Past FLUSH_AT more than once, so early flushes happen too.
        for i in 0..20_000 {
            let line = format!("line {i}\n");
            (&log).write_all(line.as_bytes()).expect("write");
            expected.extend_from_slice(line.as_bytes());
        }
        drop(guard);
        assert_eq!(*out.lock().expect("sink"), expected);
    }

    #[test]
    fn a_line_is_written_without_more_lines_behind_it() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let (flushed, rx) = mpsc::channel();
        let (log, _guard) = start(Sink(out.clone(), flushed)).expect("started");
        // The writer's timer, not a later line or the guard, writes each.
        // The second comes after the first was written, by when the writer
        // has nearly always gone back to sleep on an empty buffer: only
        // the line's own wake brings it out.
        for (line, written) in [
            (&b"alone\n"[..], &b"alone\n"[..]),
            (b"again\n", b"alone\nagain\n"),
        ] {
            (&log).write_all(line).expect("write");
            while out.lock().expect("sink").len() < written.len() {
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("flushed within its interval");
            }
            assert_eq!(*out.lock().expect("sink"), written);
        }
    }
}
