//! The usage ledger: one row per served request, written by one thread in
//! group-committed batches. Whatever arrives while a batch commits goes
//! into the next one, so under load a single transaction carries hundreds
//! of rows and the write costs little throughput. A request's row is
//! durable before its last byte goes out: on SQLite once it is appended
//! to the journal (the `journal` module), on PostgreSQL once committed.
//! Journal appends are grouped too: the rows a serving thread settles in
//! one turn of its event loop go to the file in one `write(2)`.
//!
//! Holds of in-flight requests ride the same batches, but only once a
//! request has been in flight for [`HOLD_PERSIST_AFTER`]: the many that
//! settle sooner never write a hold, and a crash still leaves a record of
//! every long-running request it cut off.

mod holds;
mod journal;
mod priority;
mod sqlite;

use crate::database::Backend;
use crate::{Database, Error};
pub use holds::HoldTicket;
use holds::OpenHolds;
use journal::Journal;
use priority::WriterPriority;
use serde::{Deserialize, Serialize};
use sqlite::SqliteWriter;
use sqlx::AnyConnection;
use sqlx::any::AnyArguments;
use sqlx::{Acquire, Any, Arguments, Encode, Row, Type};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thread_local::ThreadLocal;
use tokio::sync::{mpsc, oneshot};
use tollgate_core::money::Micros;

/// One served request, as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The gateway's request id (`x-request-id`).
    pub request_id: String,
    /// Unix milliseconds at settlement.
    pub at: i64,
    /// The key's id.
    pub key_id: Option<Arc<str>>,
    /// The key's name.
    pub key_name: Option<Arc<str>>,
    /// The end user.
    pub user: Option<String>,
    /// The key's team.
    pub team: Option<Arc<str>>,
    /// The account charged.
    pub account: Option<Arc<str>>,
    /// The model asked for.
    pub model: Arc<str>,
    /// The model the provider says answered.
    pub served_model: Option<String>,
    /// The deployment called.
    pub deployment: Option<Arc<str>>,
    /// Input tokens (cached included).
    pub input_tokens: u64,
    /// Input tokens served from cache.
    pub cached_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Cost, micro-USD.
    pub cost: Micros,
    /// HTTP status returned to the client.
    pub status: u16,
    /// Milliseconds from arrival to settlement.
    pub latency_ms: u64,
    /// Whether the answer was streamed.
    pub streamed: bool,
    /// Whether its request's hold was written (and must be cleared).
    #[serde(skip)]
    pub held: bool,
}

/// Credit held for a request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRow {
    /// The request.
    pub request_id: String,
    /// The account.
    pub account: Arc<str>,
    /// Micro-USD.
    pub amount: Micros,
    /// Unix milliseconds.
    pub at: i64,
}

// On PostgreSQL nearly every entry is a usage row: boxing it to shrink the
// rare ones would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Entry {
    /// Holds are open: look at them in time to write the ones that age.
    Wake,
    /// Clear a written hold whose request left no row.
    Release(String),
    Usage(UsageRow, Option<oneshot::Sender<()>>),
    /// The rows of one thread's journal write: one message for all of
    /// them, where a message each cost its thread a contended send (0.07
    /// µs a request at full speed).
    Rows(Vec<UsageRow>),
    Flush(oneshot::Sender<()>),
    /// A journal segment whose rows all came before this entry: deleted once
    /// they are committed.
    Retire(journal::Retired),
}

/// Resolves once a row is durable (or the ledger gave up on it, which it
/// logs).
#[derive(Debug)]
pub struct Durable(Option<oneshot::Receiver<()>>);

impl Durable {
    /// Waits until the row is durable.
    pub async fn wait(self) {
        if let Some(rx) = self.0 {
            let _ = rx.await;
        }
    }
}

/// The handle requests write through.
#[derive(Debug, Clone)]
pub struct Ledger {
    tx: mpsc::UnboundedSender<Entry>,
    /// On SQLite, where a row is durable before it is committed.
    journal: Option<Arc<Journal>>,
    /// Rows waiting for their thread's next journal write.
    groups: Arc<ThreadLocal<Arc<Mutex<Group>>>>,
    /// Holds of requests in flight, by the thread that placed them.
    holds: Arc<OpenHolds>,
}

/// Rows one thread recorded since its last journal write, and whoever
/// waits for them to be durable.
#[derive(Debug, Default)]
struct Group {
    rows: Vec<UsageRow>,
    waiters: Vec<oneshot::Sender<()>>,
}

/// Writes a thread's group to the journal: run as a task queued behind
/// the tasks that were ready when the group's first row came, so that the
/// rows they settle join it. Dropped unrun (its runtime shutting down), it
/// writes the group all the same.
struct GroupWrite {
    group: Arc<Mutex<Group>>,
    journal: Arc<Journal>,
    tx: mpsc::UnboundedSender<Entry>,
}

impl Drop for GroupWrite {
    fn drop(&mut self) {
        append(&self.journal, &self.tx, take(&self.group));
    }
}

/// Most rows in one transaction.
const MAX_BATCH: usize = 2048;
/// Rows per PostgreSQL INSERT statement (it allows 65,535 bound values in
/// one statement).
const ROWS_PER_INSERT: usize = 256;
/// On SQLite, how long the writer lets journaled rows gather before it
/// commits them. Each commit rewrites the same tree and index pages
/// whatever its size: at 20k rows/s, 25 ms rather than 5 ms took the
/// writer from 6 % to 4.3 % of the gateway's CPU (longer gained nothing).
const GATHER_FOR: Duration = Duration::from_millis(25);
/// A hold is written once its request has been in flight this long: most
/// requests settle sooner, and their holds never touch the disk.
pub const HOLD_PERSIST_AFTER: Duration = Duration::from_millis(200);

impl Ledger {
    /// Starts the writer on `db`, on a thread and connection of its own so
    /// that a commit never queues behind request tasks. The writer ends,
    /// after writing everything queued, when every handle is dropped.
    pub fn start(db: &Database) -> Result<Self, Error> {
        Self::start_with(db, HOLD_PERSIST_AFTER)
    }

    /// [`Ledger::start`], writing holds open longer than `persist_holds_after`.
    pub fn start_with(db: &Database, persist_holds_after: Duration) -> Result<Self, Error> {
        Self::spawn(db, persist_holds_after, journal::SEGMENT_BYTES)
    }

    fn spawn(
        db: &Database,
        persist_holds_after: Duration,
        segment_bytes: u64,
    ) -> Result<Self, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let db = db.clone();
        let mut runtime = tokio::runtime::Builder::new_current_thread();
        // SQLite needs no sockets; without an I/O driver an idle writer
        // parks on a futex, which is cheaper to wake than epoll.
        match db.backend {
            Backend::Sqlite => runtime.enable_time(),
            Backend::Postgres => runtime.enable_all(),
        };
        let runtime = runtime.build().map_err(|e| Error::Writer(e.to_string()))?;
        let journal = match &db.sqlite_path {
            Some(path) => Some(Arc::new(Journal::open(path, segment_bytes).map_err(
                |e| Error::Writer(format!("cannot open the ledger journal: {e}")),
            )?)),
            None => None,
        };
        let holds = Arc::new(OpenHolds::new(tx.downgrade()));
        let writer = Writer {
            db,
            journal: journal.clone(),
            retire: tx.downgrade(),
            holds: holds.clone(),
            persist_holds_after,
        };
        std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || runtime.block_on(writer.run(rx)))
            .map_err(|e| Error::Writer(e.to_string()))?;
        Ok(Self {
            tx,
            journal,
            groups: Arc::default(),
            holds,
        })
    }

    /// Opens a hold for a request in flight, written only if the request
    /// is still in flight after [`HOLD_PERSIST_AFTER`] (a hold only matters
    /// after a crash). Settle the ticket with the request's usage row, or
    /// drop it to release the hold.
    pub fn hold(&self, hold: HoldRow) -> HoldTicket {
        self.holds.open(hold)
    }

    /// Records a served request; the returned [`Durable`] resolves when
    /// its row is durable: once appended to the journal on SQLite, once
    /// committed on PostgreSQL.
    pub fn record(&self, row: UsageRow) -> Durable {
        let (done, rx) = oneshot::channel();
        Durable(self.queue(row, Some(done)).then_some(rx))
    }

    /// Records a served request without waiting for it.
    pub fn record_detached(&self, row: UsageRow) {
        self.queue(row, None);
    }

    /// Journals `row` on SQLite, queues it for commit on PostgreSQL; false
    /// when the writer has stopped and the row is lost.
    fn queue(&self, row: UsageRow, done: Option<oneshot::Sender<()>>) -> bool {
        if let Some(journal) = &self.journal {
            self.journaled(journal, row, done);
            return true;
        }
        match self.tx.send(Entry::Usage(row, done)) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(request_id = %entry_id(&e.0), "the ledger writer has stopped; usage row lost");
                false
            }
        }
    }

    /// Adds `row` to this thread's journal group, whose write task resolves
    /// `done`; outside a tokio runtime, appends it at once.
    fn journaled(&self, journal: &Arc<Journal>, row: UsageRow, done: Option<oneshot::Sender<()>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let group = Group {
                rows: vec![row],
                waiters: done.into_iter().collect(),
            };
            append(journal, &self.tx, group);
            return;
        };
        let group = self.groups.get_or_default();
        let first = {
            let mut group = group.lock().unwrap_or_else(|e| e.into_inner());
            group.rows.push(row);
            group.waiters.extend(done);
            group.rows.len() == 1
        };
        if first {
            let write = GroupWrite {
                group: group.clone(),
                journal: journal.clone(),
                tx: self.tx.clone(),
            };
            runtime.spawn(async move { drop(write) });
        }
    }

    /// Appends every thread's waiting rows to the journal now.
    fn append_groups(&self) {
        let Some(journal) = &self.journal else { return };
        for group in self.groups.iter() {
            append(journal, &self.tx, take(group));
        }
    }

    /// Waits until everything recorded so far is committed.
    pub async fn flush(&self) {
        self.append_groups();
        let (done, rx) = oneshot::channel();
        if self.tx.send(Entry::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Empties `group`, handing back its rows. A poisoned lock only means a
/// thread panicked while pushing; the rows in it are whole.
fn take(group: &Mutex<Group>) -> Group {
    std::mem::take(&mut *group.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Appends a group's rows to the journal in one write and queues them for
/// commit, then tells their waiters they are durable; when the append
/// fails, they wait for the commit instead.
fn append(journal: &Journal, tx: &mpsc::UnboundedSender<Entry>, group: Group) {
    let Group { rows, waiters } = group;
    if rows.is_empty() {
        return;
    }
    let count = rows.len();
    match journal.append(rows.iter()) {
        Ok(appended) => {
            if let Err(e) = tx.send(Entry::Rows(rows)) {
                tracing::error!(request_id = %entry_id(&e.0), rows = count, "the ledger writer has stopped; the rows stay in the journal until the next start");
            }
            drop(appended);
            for done in waiters {
                let _ = done.send(());
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, journal = %journal.base().display(), rows = count, "cannot append to the ledger journal; waiting for the commit instead");
            // Each waiter's flush follows the rows: it resolves once they
            // are committed.
            let queued = tx.send(Entry::Rows(rows)).is_ok()
                && waiters
                    .into_iter()
                    .all(|done| tx.send(Entry::Flush(done)).is_ok());
            if !queued {
                tracing::error!(
                    rows = count,
                    "the ledger writer has stopped; usage rows lost"
                );
            }
        }
    }
}

impl Entry {
    /// Whether someone waits for this entry's commit.
    fn is_awaited(&self) -> bool {
        matches!(self, Entry::Flush(_) | Entry::Usage(_, Some(_)))
    }
}

fn entry_id(e: &Entry) -> &str {
    match e {
        Entry::Release(id) => id,
        Entry::Usage(u, _) => &u.request_id,
        Entry::Rows(rows) => rows.first().map_or("", |r| &r.request_id),
        Entry::Wake | Entry::Flush(_) | Entry::Retire(_) => "",
    }
}

/// One transaction's worth of changes.
#[derive(Default)]
struct Batch {
    rows: Vec<UsageRow>,
    new_holds: Vec<HoldRow>,
    cleared_holds: Vec<String>,
}

impl Batch {
    /// Adds a usage row, and the clearing of its hold if that was written.
    fn push(&mut self, row: UsageRow) {
        if row.held {
            self.cleared_holds.push(row.request_id.clone());
        }
        self.rows.push(row);
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.new_holds.is_empty() && self.cleared_holds.is_empty()
    }
}

/// The writer thread's state.
struct Writer {
    db: Database,
    journal: Option<Arc<Journal>>,
    /// Queues a [`Entry::Retire`] behind the rows of a rotated segment
    /// (weak: the writer must not keep its own channel open).
    retire: mpsc::WeakUnboundedSender<Entry>,
    holds: Arc<OpenHolds>,
    persist_holds_after: Duration,
}

impl Writer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Entry>) {
        let mut sink = Sink::open(&self.db).await;
        if let (Some(journal), Sink::Sqlite(w)) = (&self.journal, &mut sink) {
            recover(journal, w);
        }
        let mut priority = WriterPriority::new(self.journal.is_some());
        let mut entries = Vec::with_capacity(MAX_BATCH);
        // Whether a thread had a hold open when the writer last looked.
        let mut holds_open = false;
        // Set when a batch could not be committed: its rows are still in the
        // journal, which must then stay for the next start to commit.
        let mut lost = false;
        loop {
            // With holds open, wake up in time to write the ones that age.
            let received = if holds_open {
                tokio::time::timeout(
                    self.persist_holds_after,
                    rx.recv_many(&mut entries, MAX_BATCH),
                )
                .await
                .ok()
            } else {
                Some(rx.recv_many(&mut entries, MAX_BATCH).await)
            };
            let awaited = entries.iter().any(Entry::is_awaited);
            if received != Some(0)
                && self.journal.is_some()
                && entries.len() < MAX_BATCH
                && !awaited
            {
                // Journaled rows are durable already and nothing waits for
                // their commit: let rows gather into fewer, larger commits,
                // while senders need not wake a sleeping writer. (A flush or
                // a row waiting for its commit that arrives meanwhile waits
                // for the gathering to end.)
                tokio::time::sleep(GATHER_FOR).await;
                while entries.len() < MAX_BATCH {
                    let Ok(entry) = rx.try_recv() else { break };
                    entries.push(entry);
                }
            }
            // Nothing waits for journaled rows' commit: it takes only CPU no
            // request thread wants, unless the writer falls behind (its
            // batch cut off at the largest size) or a flush waits.
            let awaited = awaited || entries.iter().any(Entry::is_awaited);
            priority.yield_cpu(!awaited && entries.len() < MAX_BATCH);
            if received == Some(0) {
                // Every handle is gone and everything queued is committed.
                if let Some(journal) = &self.journal
                    && !lost
                {
                    retire(&journal.current_path());
                }
                return;
            }
            let mut batch = Batch::default();
            let mut waiters = Vec::new();
            let mut retired = Vec::new();
            for entry in entries.drain(..) {
                match entry {
                    Entry::Wake => {}
                    Entry::Release(id) => batch.cleared_holds.push(id),
                    Entry::Usage(row, done) => {
                        waiters.extend(done);
                        batch.push(row);
                    }
                    Entry::Rows(rows) => rows.into_iter().for_each(|row| batch.push(row)),
                    Entry::Flush(done) => waiters.push(done),
                    Entry::Retire(segment) => retired.push(segment),
                }
            }
            // After the entries: a row that clears a hold written here was
            // settled after this look, so it comes in a later batch.
            (batch.new_holds, holds_open) = self.holds.age(self.persist_holds_after);
            if !batch.is_empty() {
                lost |= !self.commit(&mut sink, &batch).await;
            }
            if !lost {
                retired.iter().for_each(|s| retire(&s.path));
            }
            // Before the waiters wake: a flush that follows finds the
            // retirement queued ahead of it.
            self.rotate_if_full();
            for done in waiters {
                let _ = done.send(());
            }
        }
    }

    /// Commits `batch`, retrying; false when it gave up.
    async fn commit(&self, sink: &mut Sink, batch: &Batch) -> bool {
        let mut attempt = 0;
        let started = std::time::Instant::now();
        loop {
            match sink.write(batch).await {
                Ok(()) => {
                    metrics::histogram!("tollgate_ledger_commit_seconds").record(started.elapsed());
                    metrics::histogram!("tollgate_ledger_batch_rows")
                        .record(batch.rows.len() as f64);
                    return true;
                }
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, rows = batch.rows.len(), "ledger batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                    if matches!(
                        e,
                        Error::Query(sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
                    ) {
                        *sink = Sink::open(&self.db).await;
                    }
                }
                Err(e) if self.journal.is_some() => {
                    tracing::error!(error = %e, rows = batch.rows.len(), "ledger batch failed for good; its usage rows stay in the journal and are committed at the next start");
                    return false;
                }
                Err(e) => {
                    tracing::error!(error = %e, rows = batch.rows.len(), "ledger batch failed for good; its usage rows are lost");
                    return true;
                }
            }
        }
    }

    /// Starts a new journal segment once the current one is full; the old
    /// one goes once the rows queued before the switch are committed.
    fn rotate_if_full(&self) {
        let Some(journal) = self.journal.as_ref().filter(|j| j.is_full()) else {
            return;
        };
        match journal.rotate() {
            Ok(old) => {
                if let Some(tx) = self.retire.upgrade() {
                    let _ = tx.send(Entry::Retire(old));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a new ledger journal segment; appending to the old one")
            }
        }
    }
}

/// Deletes a journal segment whose rows are all committed.
fn retire(segment: &std::path::Path) {
    if let Err(e) = std::fs::remove_file(segment)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(segment = %segment.display(), error = %e, "cannot delete a committed ledger journal segment");
    }
}

/// Commits the rows of journal segments a previous run left (it was
/// killed, or could not commit) that SQLite lacks, then deletes them.
fn recover(journal: &Journal, writer: &mut SqliteWriter) {
    let segments = match journal::leftover_segments(journal.base()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the ledger journal; its rows are not recovered");
            return;
        }
    };
    let current = journal.current_path();
    for (_, segment) in segments.iter().filter(|(_, p)| *p != current) {
        let _claimed = match journal::claim(segment) {
            Ok(Some(lock)) => lock,
            // Another gateway on this database still commits from it.
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(segment = %segment.display(), error = %e, "cannot open a ledger journal segment; it is kept for the next start");
                continue;
            }
        };
        let recovered = journal::read_segment(segment).and_then(|rows| {
            writer
                .commit_missing(rows)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        match recovered {
            Ok(added) => {
                if added > 0 {
                    tracing::warn!(segment = %segment.display(), rows = added, "committed usage rows the last run had journaled but not committed");
                }
                retire(segment);
            }
            Err(e) => {
                tracing::error!(segment = %segment.display(), error = %e, "cannot recover a ledger journal segment; it is kept for the next start");
            }
        }
    }
}

/// Where the writer commits: SQLite directly on the writer's thread,
/// PostgreSQL through sqlx.
enum Sink {
    Sqlite(SqliteWriter),
    Postgres(AnyConnection),
}

impl Sink {
    /// The writer's own connection, retried until the database answers.
    async fn open(db: &Database) -> Self {
        let mut wait = Duration::from_millis(50);
        loop {
            let opened = match &db.sqlite_path {
                Some(path) => SqliteWriter::open(path)
                    .map(Self::Sqlite)
                    .map_err(Error::from),
                None => db.connect().await.map(Self::Postgres).map_err(Error::from),
            };
            match opened {
                Ok(sink) => return sink,
                Err(e) => {
                    tracing::error!(error = %e, "the ledger writer cannot open the database; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Commits a batch in one transaction.
    async fn write(&mut self, batch: &Batch) -> Result<(), Error> {
        match self {
            Self::Sqlite(w) => w.write(batch).map_err(Error::from),
            Self::Postgres(conn) => write_postgres(conn, batch).await,
        }
    }
}

const MINUTE_MS: i64 = 60_000;
pub(crate) const HOUR_MS: i64 = 60 * MINUTE_MS;
/// What the rollups hold for a row without a key name, team or account
/// (their key columns cannot be NULL), and what reports show for any "none".
pub(crate) const NONE_IN_ROLLUPS: &str = "-";

/// A rollup group: bucket start, key name, team, account, model.
type RollupKey<'a> = (i64, &'a str, &'a str, &'a str, &'a str);

/// A batch's rows summed per `width` bucket, key, team, account and model
/// (usually one or two groups for a whole batch).
fn rollup(rows: &[UsageRow], width: i64) -> Vec<(RollupKey<'_>, UsagePoint)> {
    let mut sums = sums_by(
        rows,
        |r| Some(rollup_key(r, width)),
        |s: &mut UsagePoint, r| {
            s.requests += 1;
            s.input_tokens += r.input_tokens as i64;
            s.cached_tokens += r.cached_tokens as i64;
            s.output_tokens += r.output_tokens as i64;
            s.cost += r.cost;
        },
    );
    // A stable order keeps the statement text, and so its cache entry, the same.
    sums.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    sums
}

/// The group of `r` in rollups of `width` buckets.
fn rollup_key(r: &UsageRow, width: i64) -> RollupKey<'_> {
    (
        r.at - r.at.rem_euclid(width),
        r.key_name.as_deref().unwrap_or(NONE_IN_ROLLUPS),
        r.team.as_deref().unwrap_or(NONE_IN_ROLLUPS),
        r.account.as_deref().unwrap_or(NONE_IN_ROLLUPS),
        &*r.model,
    )
}

/// `rows` summed per `key` (rows without one left out), in the order the
/// keys first come. A row with the key of the row before adds to that sum
/// without hashing: a batch is mostly runs of one route and minute, and
/// hashing every row's key texts was 6 % of the writer's instructions.
fn sums_by<'r, K, S>(
    rows: &'r [UsageRow],
    key: impl Fn(&'r UsageRow) -> Option<K>,
    add: impl Fn(&mut S, &UsageRow),
) -> Vec<(K, S)>
where
    K: Copy + Eq + std::hash::Hash,
    S: Default,
{
    let mut sums: Vec<(K, S)> = Vec::new();
    let mut index: HashMap<K, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut last = usize::MAX;
    for r in rows {
        let Some(k) = key(r) else { continue };
        if sums.get(last).is_none_or(|(seen, _)| *seen != k) {
            last = *index.entry(k).or_insert_with(|| {
                sums.push((k, S::default()));
                sums.len() - 1
            });
        }
        if let Some((_, sum)) = sums.get_mut(last) {
            add(sum, r);
        }
    }
    sums
}

/// One PostgreSQL statement's text with its `$N` arguments. (sqlx's
/// `QueryBuilder<Any>` writes `?`, which PostgreSQL does not take.)
#[derive(Default)]
struct Statement {
    sql: String,
    args: AnyArguments,
    bound: usize,
}

impl Statement {
    fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    fn bind<'q, T: Encode<'q, Any> + Type<Any> + 'q>(&mut self, value: T) -> &mut Self {
        self.bound += 1;
        let _ = write!(self.sql, "${}", self.bound);
        // Encoding an integer, string or bool into `Any` cannot fail.
        let _ = self.args.add(value);
        self
    }

    /// `(…), (…)` with one parenthesised tuple per item.
    fn values<I>(&mut self, items: I, mut row: impl FnMut(&mut Self, I::Item))
    where
        I: IntoIterator,
    {
        self.sql.push_str("VALUES ");
        for (i, item) in items.into_iter().enumerate() {
            self.sql.push_str(if i == 0 { "(" } else { ", (" });
            row(self, item);
            self.sql.push(')');
        }
    }

    fn comma(&mut self) -> &mut Self {
        self.push(", ")
    }
}

/// The accounts a batch's rows draw on, with what each owes, in name
/// order: concurrent writers (replicas on PostgreSQL) then take the
/// accounts' row locks in the same order and cannot deadlock.
fn charged_accounts(rows: &[UsageRow]) -> Vec<(&str, Micros)> {
    let mut charged = sums_by(rows, |r| r.account.as_deref(), |c, r| *c += r.cost);
    charged.sort_unstable();
    charged
}

/// Commits a batch to PostgreSQL in one transaction, with multi-row
/// statements: each is a round trip to the server.
async fn write_postgres(conn: &mut AnyConnection, batch: &Batch) -> Result<(), Error> {
    let mut statements = Vec::new();
    for chunk in batch.new_holds.chunks(ROWS_PER_INSERT) {
        let mut q = Statement::default();
        q.push("INSERT INTO holds (request_id, account, amount_micros, at) ");
        q.values(chunk, |q, h| {
            q.bind(h.request_id.as_str())
                .comma()
                .bind(&*h.account)
                .comma()
                .bind(h.amount)
                .comma()
                .bind(h.at);
        });
        q.push(
            " ON CONFLICT (request_id) DO UPDATE SET amount_micros = excluded.amount_micros, at = excluded.at",
        );
        statements.push(q);
    }
    for chunk in batch.cleared_holds.chunks(ROWS_PER_INSERT) {
        let mut q = Statement::default();
        q.push("DELETE FROM holds WHERE request_id IN (");
        for (i, id) in chunk.iter().enumerate() {
            if i > 0 {
                q.comma();
            }
            q.bind(id.as_str());
        }
        q.push(")");
        statements.push(q);
    }
    for chunk in batch.rows.chunks(ROWS_PER_INSERT) {
        let mut q = Statement::default();
        q.push("INSERT INTO usage (request_id, at, key_id, key_name, end_user, team, account, model, served_model, deployment, input_tokens, cached_tokens, output_tokens, cost_micros, status, latency_ms, streamed) ");
        q.values(chunk, |q, r| {
            q.bind(r.request_id.as_str()).comma();
            q.bind(r.at).comma();
            q.bind(r.key_id.as_deref()).comma();
            q.bind(r.key_name.as_deref()).comma();
            q.bind(r.user.as_deref()).comma();
            q.bind(r.team.as_deref()).comma();
            q.bind(r.account.as_deref()).comma();
            q.bind(&*r.model).comma();
            q.bind(r.served_model.as_deref()).comma();
            q.bind(r.deployment.as_deref()).comma();
            q.bind(r.input_tokens as i64).comma();
            q.bind(r.cached_tokens as i64).comma();
            q.bind(r.output_tokens as i64).comma();
            q.bind(r.cost).comma();
            q.bind(i64::from(r.status)).comma();
            q.bind(r.latency_ms as i64).comma();
            q.bind(r.streamed);
        });
        statements.push(q);
    }
    for (table, width) in [("usage_minutes", MINUTE_MS), ("usage_hours", HOUR_MS)] {
        let sums = rollup(&batch.rows, width);
        for chunk in sums.chunks(ROWS_PER_INSERT) {
            let mut q = Statement::default();
            q.push("INSERT INTO ").push(table).push(
                " (at, key_name, team, account, model, requests, input_tokens, cached_tokens, output_tokens, cost_micros) ",
            );
            q.values(chunk, |q, ((at, key, team, account, model), s)| {
                q.bind(*at).comma();
                q.bind(*key).comma();
                q.bind(*team).comma();
                q.bind(*account).comma();
                q.bind(*model).comma();
                q.bind(s.requests).comma();
                q.bind(s.input_tokens).comma();
                q.bind(s.cached_tokens).comma();
                q.bind(s.output_tokens).comma();
                q.bind(s.cost);
            });
            // PostgreSQL wants the target's columns qualified here.
            let _ = write!(
                q.sql,
                " ON CONFLICT (at, key_name, team, account, model) DO UPDATE SET requests = {table}.requests + excluded.requests, \
                 input_tokens = {table}.input_tokens + excluded.input_tokens, \
                 cached_tokens = {table}.cached_tokens + excluded.cached_tokens, \
                 output_tokens = {table}.output_tokens + excluded.output_tokens, \
                 cost_micros = {table}.cost_micros + excluded.cost_micros"
            );
            statements.push(q);
        }
    }
    for (account, cost) in charged_accounts(&batch.rows) {
        let mut q = Statement::default();
        q.push("UPDATE accounts SET balance_micros = balance_micros - ")
            .bind(cost)
            .push(" WHERE name = ")
            .bind(account);
        statements.push(q);
    }
    // The SQL depends only on the batch's shape (rows, holds, accounts), so
    // the connection's statement cache keeps the common ones parsed.
    let mut tx = conn.begin().await?;
    for Statement { sql, args, .. } in statements {
        sqlx::query_with(sqlx::AssertSqlSafe(sql), args)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// What a usage report groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Key name.
    Key,
    /// Team.
    Team,
    /// End user.
    User,
    /// Model asked for.
    Model,
    /// Account.
    Account,
    /// UTC day.
    Day,
}

impl std::str::FromStr for GroupBy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "key" => Self::Key,
            "team" => Self::Team,
            "user" => Self::User,
            "model" => Self::Model,
            "account" => Self::Account,
            "day" => Self::Day,
            other => {
                return Err(format!(
                    "cannot group usage by `{other}` (key, team, user, model, account or day)"
                ));
            }
        })
    }
}

impl GroupBy {
    /// The group of a usage row.
    fn row_expr(self, backend: Backend) -> std::borrow::Cow<'static, str> {
        // Reports from the rows name "none" as the rollups do.
        let column = match self {
            Self::Key => "key_name",
            Self::Team => "team",
            Self::User => "end_user",
            Self::Account => "account",
            Self::Model => return "model".into(),
            Self::Day => return backend.utc_day("at").into(),
        };
        format!("COALESCE({column}, '{NONE_IN_ROLLUPS}')").into()
    }

    /// The group of a rollup bucket, when the rollups are kept by it.
    fn rollup_expr(self, backend: Backend) -> Option<std::borrow::Cow<'static, str>> {
        match self {
            Self::Key => Some("key_name".into()),
            Self::Team => Some("team".into()),
            Self::Account => Some("account".into()),
            Self::Model => Some("model".into()),
            // An hour's bucket lies within one UTC day.
            Self::Day => Some(backend.utc_day("at").into()),
            // End users are too many to keep rollups by.
            Self::User => None,
        }
    }
}

/// Where a report over `[since, until)` reads what: the rows for the
/// ragged minutes at either end, the per-minute rollups up to whole hours,
/// the per-hour rollups in between. Returns `[since, m1, h1, h2, m2, until]`:
/// rows over `[since, m1)` and `[m2, until)`, minutes over `[m1, h1)` and
/// `[h2, m2)`, hours over `[h1, h2)`; every range may be empty.
fn report_edges(since: i64, until: i64) -> [i64; 6] {
    let up = |t: i64, width: i64| t.saturating_add((width - t.rem_euclid(width)) % width);
    let down = |t: i64, width: i64| t - t.rem_euclid(width);
    let (mut m1, mut m2) = (up(since, MINUTE_MS), down(until, MINUTE_MS));
    if m1 >= m2 {
        (m1, m2) = (until, until);
    }
    let (mut h1, mut h2) = (up(m1, HOUR_MS), down(m2, HOUR_MS));
    if h1 >= h2 {
        (h1, h2) = (m2, m2);
    }
    [since, m1, h1, h2, m2, until]
}

/// The token and cost sums every report reads, as `input`, `cached`,
/// `output`, `cost` (cast: PostgreSQL sums BIGINT into NUMERIC).
const SUMS: &str = "CAST(SUM(input_tokens) AS BIGINT) AS input, \
    CAST(SUM(cached_tokens) AS BIGINT) AS cached, \
    CAST(SUM(output_tokens) AS BIGINT) AS output, CAST(SUM(cost_micros) AS BIGINT) AS cost";

/// One line of a usage report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageLine {
    /// The group's value (key name, model, day, …).
    pub group: String,
    /// Requests served.
    pub requests: i64,
    /// Input tokens.
    pub input_tokens: i64,
    /// Cached input tokens.
    pub cached_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Cost, micro-USD.
    pub cost: Micros,
}

/// The rollup a bucket of `bucket_ms` is read from: hours when it is a
/// whole number of them, else minutes.
fn rollup_table(bucket_ms: i64) -> &'static str {
    if bucket_ms % HOUR_MS == 0 {
        "usage_hours"
    } else {
        "usage_minutes"
    }
}

/// Usage in one time bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UsagePoint {
    /// The bucket's start, Unix milliseconds.
    pub at: i64,
    /// Requests served.
    pub requests: i64,
    /// Input tokens.
    pub input_tokens: i64,
    /// Cached input tokens (of the input tokens).
    pub cached_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Cost, micro-USD.
    pub cost: Micros,
}

impl Database {
    /// Usage between `since_ms` (inclusive) and `until_ms` (exclusive),
    /// grouped, most expensive first.
    ///
    /// By key, team, account, model or day, whole minutes and hours are
    /// read from the rollups and only a ragged minute at either end from
    /// the rows (`report_edges`): a month of a busy gateway in
    /// milliseconds, where summing its rows took seconds. By end user,
    /// from the rows.
    pub async fn usage_report(
        &self,
        by: GroupBy,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<UsageLine>, Error> {
        let part = |group: &str, requests: &str, table: &str, from: u8, to: u8| {
            format!(
                "SELECT {group} AS grp, {requests} AS requests, SUM(input_tokens) AS input_tokens, \
                 SUM(cached_tokens) AS cached_tokens, SUM(output_tokens) AS output_tokens, \
                 SUM(cost_micros) AS cost_micros FROM {table} WHERE at >= ${from} AND at < ${to} GROUP BY grp"
            )
        };
        let rows = by.row_expr(self.backend);
        let (parts, bounds) = match by.rollup_expr(self.backend) {
            None => (
                vec![part(&rows, "COUNT(*)", "usage", 1, 2)],
                vec![since_ms, until_ms],
            ),
            Some(rolled) => (
                vec![
                    part(&rows, "COUNT(*)", "usage", 1, 2),
                    part(&rolled, "SUM(requests)", "usage_minutes", 2, 3),
                    part(&rolled, "SUM(requests)", "usage_hours", 3, 4),
                    part(&rolled, "SUM(requests)", "usage_minutes", 4, 5),
                    part(&rows, "COUNT(*)", "usage", 5, 6),
                ],
                report_edges(since_ms, until_ms).to_vec(),
            ),
        };
        let sql = format!(
            "SELECT grp, CAST(SUM(requests) AS BIGINT) AS requests, {SUMS}
             FROM ({}) AS parts GROUP BY grp ORDER BY cost DESC, grp",
            parts.join(" UNION ALL ")
        );
        self.usage_lines(sql, &bounds).await
    }

    /// Runs a report query (`grp`, `requests`, `input`, `cached`, `output`,
    /// `cost`) with `bounds` as `$1`, `$2`, ….
    async fn usage_lines(&self, sql: String, bounds: &[i64]) -> Result<Vec<UsageLine>, Error> {
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for bound in bounds {
            query = query.bind(*bound);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(UsageLine {
                    group: r.try_get("grp")?,
                    requests: r.try_get("requests")?,
                    input_tokens: r.try_get("input")?,
                    cached_tokens: r.try_get("cached")?,
                    output_tokens: r.try_get("output")?,
                    cost: r.try_get("cost")?,
                })
            })
            .collect()
    }

    /// Usage between `since_ms` and `until_ms` in buckets of `bucket_ms` (a
    /// whole number of minutes), oldest first; buckets without traffic are
    /// absent. Read from the per-minute or per-hour rollups, not the rows.
    pub async fn usage_series(
        &self,
        since_ms: i64,
        until_ms: i64,
        bucket_ms: i64,
    ) -> Result<Vec<UsagePoint>, Error> {
        let sql = format!(
            "SELECT (at / $1) * $1 AS t, CAST(SUM(requests) AS BIGINT) AS requests, {SUMS}
             FROM {} WHERE at >= $2 AND at < $3 GROUP BY t ORDER BY t",
            rollup_table(bucket_ms),
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(bucket_ms.max(MINUTE_MS))
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(UsagePoint {
                    at: r.try_get("t")?,
                    requests: r.try_get("requests")?,
                    input_tokens: r.try_get("input")?,
                    cached_tokens: r.try_get("cached")?,
                    output_tokens: r.try_get("output")?,
                    cost: r.try_get("cost")?,
                })
            })
            .collect()
    }

    /// The usage rows in the SQLite ledger's journal, committed or not:
    /// what is durable so far (for tests; empty on PostgreSQL).
    pub fn journaled_rows(&self) -> Result<Vec<UsageRow>, Error> {
        let Some(path) = &self.sqlite_path else {
            return Ok(Vec::new());
        };
        let mut rows = Vec::new();
        let segments = journal::leftover_segments(&journal::base_of(path))
            .map_err(|e| Error::Writer(e.to_string()))?;
        for (_, segment) in segments {
            match journal::read_segment(&segment) {
                Ok(r) => rows.extend(r),
                // Retired meanwhile: its rows are committed.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::Writer(e.to_string())),
            }
        }
        Ok(rows)
    }

    /// Every usage row, oldest first (for audits and tests).
    pub async fn usage_rows(&self) -> Result<Vec<UsageRow>, Error> {
        let rows = sqlx::query(
            "SELECT request_id, at, key_id, key_name, end_user, team, account, model, served_model, deployment,
                    input_tokens, cached_tokens, output_tokens, cost_micros, status, latency_ms,
                    CAST(streamed AS INTEGER) AS streamed
             FROM usage ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(UsageRow {
                    request_id: r.try_get("request_id")?,
                    at: r.try_get("at")?,
                    key_id: r.try_get::<Option<String>, _>("key_id")?.map(Arc::from),
                    key_name: r.try_get::<Option<String>, _>("key_name")?.map(Arc::from),
                    user: r.try_get("end_user")?,
                    team: r.try_get::<Option<String>, _>("team")?.map(Arc::from),
                    account: r.try_get::<Option<String>, _>("account")?.map(Arc::from),
                    model: Arc::from(r.try_get::<String, _>("model")?),
                    served_model: r.try_get("served_model")?,
                    deployment: r.try_get::<Option<String>, _>("deployment")?.map(Arc::from),
                    input_tokens: r.try_get::<i64, _>("input_tokens")? as u64,
                    cached_tokens: r.try_get::<i64, _>("cached_tokens")? as u64,
                    output_tokens: r.try_get::<i64, _>("output_tokens")? as u64,
                    cost: r.try_get("cost_micros")?,
                    status: r.try_get::<i64, _>("status")? as u16,
                    latency_ms: r.try_get::<i64, _>("latency_ms")? as u64,
                    streamed: r.try_get::<i64, _>("streamed")? != 0,
                    held: false,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: i64) -> UsageRow {
        UsageRow {
            request_id: format!("r{i}"),
            at: i,
            model: Arc::from("gpt-4o-mini"),
            status: 200,
            ..UsageRow::default()
        }
    }

    async fn scratch() -> Result<(tempfile::TempDir, Database), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Writer(e.to_string()))?;
        let db = Database::open(&dir.path().join("t.db").to_string_lossy()).await?;
        Ok((dir, db))
    }

    fn ids(rows: &[UsageRow]) -> Vec<&str> {
        let mut ids: Vec<_> = rows.iter().map(|r| r.request_id.as_str()).collect();
        ids.sort_unstable();
        ids
    }

    /// Rows that tasks of one thread settle in the same turn go to the
    /// journal in one write, and each is there once its caller is told so.
    #[tokio::test]
    async fn rows_settled_in_one_turn_share_one_journal_write() -> Result<(), Error> {
        let (_dir, db) = scratch().await?;
        let ledger = Ledger::start(&db)?;
        let journal = ledger.journal.clone().expect("SQLite journals");
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (ledger, db) = (ledger.clone(), db.clone());
                tokio::spawn(async move {
                    ledger.record(row(i)).wait().await;
                    db.journaled_rows()
                        .map(|rows| rows.iter().any(|r| r.request_id == format!("r{i}")))
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.expect("no panic")?, "durable means journaled");
        }
        assert_eq!(journal.writes(), 1, "twenty rows, one write");
        // A row settled later starts a group of its own.
        ledger.record(row(20)).wait().await;
        assert_eq!(journal.writes(), 2);
        assert_eq!(db.journaled_rows()?.len(), 21);
        Ok(())
    }

    /// When the journal cannot be appended to, a row is durable once it is
    /// committed instead: its caller waits for the commit, and nothing is
    /// lost.
    #[tokio::test]
    async fn a_failed_journal_append_waits_for_the_commit() -> Result<(), Error> {
        let (_dir, db) = scratch().await?;
        let ledger = Ledger::start(&db)?;
        let journal = ledger.journal.clone().expect("SQLite journals");
        ledger.record(row(1)).wait().await;
        journal
            .refuse_appends()
            .map_err(|e| Error::Writer(e.to_string()))?;
        let tasks: Vec<_> = (2..6)
            .map(|i| {
                let (ledger, db) = (ledger.clone(), db.clone());
                tokio::spawn(async move {
                    ledger.record(row(i)).wait().await;
                    let committed = db.usage_rows().await?;
                    Ok::<_, Error>(committed.iter().any(|r| r.request_id == format!("r{i}")))
                })
            })
            .collect();
        for task in tasks {
            assert!(task.await.expect("no panic")?, "durable means committed");
        }
        assert_eq!(journal.writes(), 1, "only the first row was journaled");
        assert_eq!(ids(&db.journaled_rows()?), ["r1"]);
        ledger.flush().await;
        assert_eq!(ids(&db.usage_rows().await?), ["r1", "r2", "r3", "r4", "r5"]);
        Ok(())
    }

    /// A row recorded without waiting is written even when its runtime
    /// ends before the group's write task ran, and a flush commits rows
    /// still waiting in a group.
    #[test]
    fn grouped_rows_are_never_left_behind() -> Result<(), Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Writer(e.to_string()))?;
        let (_dir, db) = runtime.block_on(scratch())?;
        let ledger = Ledger::start(&db)?;
        runtime.block_on(async { ledger.record_detached(row(1)) });
        drop(runtime);
        assert_eq!(ids(&db.journaled_rows()?), ["r1"]);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Writer(e.to_string()))?;
        runtime.block_on(async {
            ledger.record_detached(row(2));
            ledger.flush().await;
            assert_eq!(ids(&db.usage_rows().await?), ["r1", "r2"]);
            Ok(())
        })
    }

    /// Segments fill, rotate and go once their rows are committed: after a
    /// flush, every row is in SQLite once and only the open segment is left.
    #[tokio::test]
    async fn full_segments_are_deleted_once_their_rows_are_committed() -> Result<(), Error> {
        let (dir, db) = scratch().await?;
        // About three rows a segment.
        let ledger = Ledger::spawn(&db, HOLD_PERSIST_AFTER, 600)?;
        for i in 0..50 {
            ledger.record(row(i)).wait().await;
            // Let some rotations happen between rows, not all at the end.
            if i % 10 == 9 {
                ledger.flush().await;
            }
        }
        ledger.flush().await;
        // A rotation the last commit made is retired with the next batch.
        ledger.flush().await;
        let rows = db.usage_rows().await?;
        assert_eq!(rows.len(), 50);
        let segments = journal::leftover_segments(&journal::base_of(&dir.path().join("t.db")))
            .map_err(|e| Error::Writer(e.to_string()))?;
        assert_eq!(
            segments.len(),
            1,
            "only the open segment is left: {segments:?}"
        );
        assert!(
            db.journaled_rows()?.len() < 50,
            "committed segments are gone"
        );
        drop(ledger);
        Ok(())
    }

    proptest::proptest! {
        /// A batch's rollups and charges are its rows' sums per group and
        /// account, whatever runs and interleavings of routes it holds.
        #[test]
        fn batches_sum_per_group_and_account(
            picks in proptest::collection::vec((0_usize..3, 0_usize..3, 0_i64..200_000, 0_i64..50), 0..60),
        ) {
            let names = [None, Some("a"), Some("b")];
            let rows: Vec<UsageRow> = picks
                .iter()
                .enumerate()
                .map(|(i, &(account, key, at, cost))| UsageRow {
                    account: names[account].map(Arc::from),
                    key_name: names[key].map(Arc::from),
                    cost,
                    input_tokens: i as u64,
                    ..row(at)
                })
                .collect();
            let mut groups = std::collections::BTreeMap::<_, (i64, i64, Micros)>::new();
            let mut accounts = std::collections::BTreeMap::<&str, Micros>::new();
            for r in &rows {
                let g = groups.entry(rollup_key(r, MINUTE_MS)).or_default();
                *g = (g.0 + 1, g.1 + r.input_tokens as i64, g.2 + r.cost);
                if let Some(a) = r.account.as_deref() {
                    *accounts.entry(a).or_default() += r.cost;
                }
            }
            let rolled: Vec<_> = rollup(&rows, MINUTE_MS)
                .into_iter()
                .map(|(k, s)| (k, (s.requests, s.input_tokens, s.cost)))
                .collect();
            proptest::prop_assert_eq!(rolled, groups.into_iter().collect::<Vec<_>>());
            proptest::prop_assert_eq!(charged_accounts(&rows), accounts.into_iter().collect::<Vec<_>>());
        }

        /// A report's window is cut so that the rows are read for less
        /// than a minute at either end, the minutes for less than an hour,
        /// and every rollup range is whole buckets: what makes a month's
        /// report cost its hours, not its rows.
        #[test]
        fn report_edges_leave_the_rows_only_ragged_minutes(
            since in -1_i64 << 50..1 << 50,
            length in 0_i64..1 << 40,
        ) {
            let until = since + length;
            let [s, m1, h1, h2, m2, u] = report_edges(since, until);
            proptest::prop_assert_eq!((s, u), (since, until));
            proptest::prop_assert!(s <= m1 && m1 <= h1 && h1 <= h2 && h2 <= m2 && m2 <= u);
            proptest::prop_assert!(m1 - s < MINUTE_MS && u - m2 < MINUTE_MS || m1 == u);
            proptest::prop_assert!(h1 - m1 < HOUR_MS && m2 - h2 < HOUR_MS || h1 == m2);
            for (a, b, width) in [(m1, h1, MINUTE_MS), (h2, m2, MINUTE_MS), (h1, h2, HOUR_MS)] {
                proptest::prop_assert!(a == b || a % width == 0 && b % width == 0);
            }
        }
    }
}
