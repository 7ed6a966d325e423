//! The SQLite ledger's journal: a request's usage row is durable once it
//! is appended, one `write(2)` from the request's own task, to a file
//! beside the database; the writer thread commits it to SQLite afterwards,
//! in batches as large as the load makes them. A request therefore never
//! waits on a thread hand-off or a commit, which on a 2-core VM were most
//! of its added latency at low rates.
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

    /// Appends `row`. The returned guard holds off a rotation: queue the
    /// row for the writer before dropping it.
    pub(super) fn append(&self, row: &UsageRow) -> std::io::Result<Appended<'_>> {
        // A row's line is 300-500 bytes: one allocation, not three.
        let mut line = Vec::with_capacity(512);
        serde_json::to_writer(&mut line, row)?;
        line.push(b'\n');
        // A poisoned lock only means another appender panicked; the file
        // handle is still good.
        let segment = self.current.read().unwrap_or_else(|e| e.into_inner());
        // O_APPEND: concurrent appenders never interleave within a line.
        (&segment.file).write_all(&line)?;
        self.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        Ok(Appended {
            _rotation_held_off: segment,
        })
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
