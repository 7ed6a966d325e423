//! The SQLite ledger's journal: a request's usage row is durable once it
//! is appended to a file beside the database, by its own serving thread,
//! in one `write(2)` with the rows that thread settled in the same turn;
//! the writer thread commits it to SQLite afterwards, in batches as large
//! as the load makes them. A request therefore never waits on a thread
//! hand-off or a commit, which on a 2-core VM were most of its added
//! latency at low rates.
//!
//! The guarantee is SQLite's own with `synchronous = NORMAL` (WAL): what
//! reached the file survives the process being killed; only an operating
//! system crash can lose the last writes.
//!
//! Rows go to numbered segments (`tollgate.db-ledger.7`). The writer starts
//! a new segment once the current one is large, and deletes the old one as
//! soon as every row in it is committed. At start, rows of leftover
//! segments that SQLite lacks are committed, then the segments deleted.
//! A segment stays locked (`flock`) while its gateway may still commit
//! from it, so that a second gateway on the same file (a restart that
//! overlaps the old process) never takes a live segment for a leftover.

use super::UsageRow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// A segment is retired once it holds this many bytes (about 50k rows).
pub(super) const SEGMENT_BYTES: u64 = 16 << 20;

/// The journal requests append to.
#[derive(Debug)]
pub(super) struct Journal {
    /// `<database file>-ledger`; segments are `<base>.<number>`.
    base: PathBuf,
    /// The open segment. Appenders hold the read lock from their write until
    /// their row is queued for the writer, so that once a rotation holds the
    /// write lock, every row of the old segment is queued.
    current: RwLock<Segment>,
    /// Bytes in the open segment.
    bytes: AtomicU64,
    /// Past this many bytes, the open segment is due to be retired.
    segment_bytes: u64,
    /// Writes made, for tests of the grouping.
    #[cfg(test)]
    writes: AtomicU64,
}

/// A row is in the journal; the segment cannot rotate while this lives.
pub(super) struct Appended<'a> {
    _rotation_held_off: RwLockReadGuard<'a, Segment>,
}

#[derive(Debug)]
struct Segment {
    file: File,
    number: u64,
}

impl Journal {
    /// Opens a fresh segment numbered after every segment already there
    /// (which [`leftover_segments`] lists for recovery).
    pub(super) fn open(database: &Path, segment_bytes: u64) -> std::io::Result<Self> {
        let base = base_of(database);
        let next = leftover_segments(&base)?
            .last()
            .map_or(0, |(number, _)| number + 1);
        let file = open_segment(&base, next)?;
        file.try_lock()?;
        Ok(Self {
            base,
            current: RwLock::new(Segment { file, number: next }),
            bytes: AtomicU64::new(0),
            segment_bytes,
            #[cfg(test)]
            writes: AtomicU64::new(0),
        })
    }

    /// Where segments live.
    pub(super) fn base(&self) -> &Path {
        &self.base
    }

    /// The open segment's path.
    pub(super) fn current_path(&self) -> PathBuf {
        let number = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .number;
        segment_path(&self.base, number)
    }

    /// Appends `rows` in one `write(2)`. The returned guard holds off a
    /// rotation: queue the rows for the writer before dropping it.
    pub(super) fn append<'r>(
        &self,
        rows: impl ExactSizeIterator<Item = &'r UsageRow>,
    ) -> std::io::Result<Appended<'_>> {
        // A row's line is 300-500 bytes: one allocation for all of them.
        let mut lines = Vec::with_capacity(512 * rows.len());
        for row in rows {
            write_line(&mut lines, row);
        }
        // A poisoned lock only means another appender panicked; the file
        // handle is still good.
        let segment = self.current.read().unwrap_or_else(|e| e.into_inner());
        // O_APPEND: concurrent appenders never interleave within a write.
        (&segment.file).write_all(&lines)?;
        self.bytes.fetch_add(lines.len() as u64, Ordering::Relaxed);
        #[cfg(test)]
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(Appended {
            _rotation_held_off: segment,
        })
    }

    /// How many writes appended rows so far.
    #[cfg(test)]
    pub(super) fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Reopens the open segment read-only, so that every append fails as
    /// a write to a full or broken disk does (an error from `write(2)`).
    #[cfg(test)]
    pub(super) fn refuse_appends(&self) -> std::io::Result<()> {
        let mut segment = self.current.write().unwrap_or_else(|e| e.into_inner());
        segment.file = File::open(segment_path(&self.base, segment.number))?;
        Ok(())
    }

    /// Whether the open segment is due to be retired.
    pub(super) fn is_full(&self) -> bool {
        self.bytes.load(Ordering::Relaxed) >= self.segment_bytes
    }

    /// Starts a new segment and returns the old one, still locked: it may
    /// be deleted once every row queued so far is committed.
    pub(super) fn rotate(&self) -> std::io::Result<Retired> {
        let mut segment = self.current.write().unwrap_or_else(|e| e.into_inner());
        let number = segment.number + 1;
        let file = open_segment(&self.base, number)?;
        file.try_lock()?;
        let old = std::mem::replace(&mut *segment, Segment { file, number });
        self.bytes.store(0, Ordering::Relaxed);
        Ok(Retired {
            path: segment_path(&self.base, old.number),
            _lock: old.file,
        })
    }
}

/// A segment no longer appended to, locked until it is deleted.
#[derive(Debug)]
pub(super) struct Retired {
    pub(super) path: PathBuf,
    _lock: File,
}

/// Locks a leftover segment for recovery; `None` while another process
/// (a gateway still running on the same database) holds it.
pub(super) fn claim(segment: &Path) -> std::io::Result<Option<File>> {
    let file = File::open(segment)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// `<database file>-ledger`.
pub(super) fn base_of(database: &Path) -> PathBuf {
    let mut base = database.as_os_str().to_owned();
    base.push("-ledger");
    PathBuf::from(base)
}

fn segment_path(base: &Path, number: u64) -> PathBuf {
    let mut path = base.as_os_str().to_owned();
    path.push(format!(".{number}"));
    PathBuf::from(path)
}

fn open_segment(base: &Path, number: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(base, number))
}

/// The segments under `base`, oldest first.
pub(super) fn leftover_segments(base: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let (Some(dir), Some(prefix)) = (base.parent(), base.file_name()) else {
        return Ok(Vec::new());
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let mut prefix = prefix.to_owned();
    prefix.push(".");
    let prefix = prefix.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        found.push((number, entry.path()));
    }
    found.sort_unstable();
    Ok(found)
}

/// `row` as a JSON object and a newline, as serde would write it less
/// the fields that are `None` (read back as `None`). By hand: serde_json,
/// escaping every field name and value through its generic serializer,
/// spent 5k instructions a row, a quarter of what the ledger costs a
/// request; this spends about a fifth of that.
fn write_line(out: &mut Vec<u8>, row: &UsageRow) {
    fn text(out: &mut Vec<u8>, name: &str, value: &str) {
        out.extend_from_slice(name.as_bytes());
        if !tollgate_core::json::needs_escape(value.as_bytes()) {
            out.push(b'"');
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        } else {
            // What needs escaping, serde_json escapes (into a Vec: infallible).
            let _ = serde_json::to_writer(&mut *out, value);
        }
    }
    fn optional(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
        if let Some(value) = value {
            text(out, name, value);
        }
    }
    fn number(out: &mut Vec<u8>, name: &str, value: impl itoa::Integer) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
    text(out, "{\"request_id\":", &row.request_id);
    number(out, ",\"at\":", row.at);
    optional(out, ",\"key_id\":", row.key_id.as_deref());
    optional(out, ",\"key_name\":", row.key_name.as_deref());
    optional(out, ",\"user\":", row.user.as_deref());
    optional(out, ",\"team\":", row.team.as_deref());
    optional(out, ",\"account\":", row.account.as_deref());
    text(out, ",\"model\":", &row.model);
    optional(out, ",\"served_model\":", row.served_model.as_deref());
    optional(out, ",\"deployment\":", row.deployment.as_deref());
    number(out, ",\"input_tokens\":", row.input_tokens);
    number(out, ",\"cached_tokens\":", row.cached_tokens);
    number(out, ",\"output_tokens\":", row.output_tokens);
    number(out, ",\"cost\":", row.cost);
    number(out, ",\"status\":", row.status);
    number(out, ",\"latency_ms\":", row.latency_ms);
    out.extend_from_slice(if row.streamed {
        b",\"streamed\":true}\n"
    } else {
        b",\"streamed\":false}\n"
    });
}

/// Every row in `segment`. A torn last line (an OS crash mid-write) is
/// skipped and logged: that row was never acknowledged.
pub(super) fn read_segment(segment: &Path) -> std::io::Result<Vec<UsageRow>> {
    let mut rows = Vec::new();
    for line in BufReader::new(File::open(segment)?).split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice(&line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                tracing::warn!(segment = %segment.display(), error = %e, "skipping an unreadable ledger journal line");
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn name() -> impl Strategy<Value = Option<String>> {
        // Any text: quotes, backslashes, control characters, newlines and
        // characters beyond ASCII included.
        proptest::option::of(any::<String>())
    }

    fn rows() -> impl Strategy<Value = UsageRow> {
        (
            (
                any::<String>(),
                any::<i64>(),
                name(),
                name(),
                name(),
                name(),
            ),
            (name(), any::<String>(), name(), name()),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<i64>()),
            (any::<u16>(), any::<u64>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (request_id, at, key_id, key_name, user, team),
                    (account, model, served_model, deployment),
                    (input_tokens, cached_tokens, output_tokens, cost),
                    (status, latency_ms, streamed),
                )| UsageRow {
                    request_id,
                    at,
                    key_id: key_id.map(Arc::from),
                    key_name: key_name.map(Arc::from),
                    user,
                    team: team.map(Arc::from),
                    account: account.map(Arc::from),
                    model: Arc::from(model),
                    served_model,
                    deployment: deployment.map(Arc::from),
                    input_tokens,
                    cached_tokens,
                    output_tokens,
                    cost,
                    status,
                    latency_ms,
                    streamed,
                    held: false,
                },
            )
    }

    proptest! {
        /// A line is one line, reads back as the row it was written from,
        /// and holds what serde writes for the row, less its nulls.
        #[test]
        fn a_line_reads_back_as_its_row(row in rows()) {
            let mut line = Vec::new();
            write_line(&mut line, &row);
            prop_assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1));
            let read: UsageRow = serde_json::from_slice(&line).expect("a JSON row");
            prop_assert_eq!(&read, &row);
            let mut by_serde = serde_json::to_value(&row).expect("serde");
            by_serde
                .as_object_mut()
                .expect("an object")
                .retain(|_, v| !v.is_null());
            let written: serde_json::Value = serde_json::from_slice(&line).expect("JSON");
            prop_assert_eq!(written, by_serde);
        }
    }
}
