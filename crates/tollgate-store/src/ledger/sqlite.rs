//! The ledger's commits to SQLite, made on the writer's own thread through
//! rusqlite. sqlx runs every SQLite connection on a worker thread of its
//! own, so each commit through it costs two more thread hand-offs (four
//! context switches); with a few rows per batch, as at 32 connections,
//! those cost more than the commit itself. The writer's thread does
//! nothing but commit, so blocking it on SQLite stalls nothing else.

use super::{Batch, HOUR_MS, MINUTE_MS, UsageRow, rollup};
use crate::database::SQLITE_SETUP;
use rusqlite::{Connection, params};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// How long a commit waits for another connection's write lock (a key
/// created, credits added) before it fails and the batch is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most usage rows one INSERT carries. Its texts are copied at binding
/// into blocks the system allocator hands out; past 16 rows a statement
/// they outgrow its per-size caches, and 32 rows cost more than 16.
const ROWS_PER_INSERT: usize = 16;

/// One connection to the SQLite file, used only by the ledger writer.
pub(super) struct SqliteWriter {
    conn: Connection,
    /// `usage_inserts[k]` inserts 2^k rows: a batch goes in as its binary
    /// decomposition, so a handful of statements, each prepared once, take
    /// any number of rows.
    usage_inserts: Vec<String>,
    /// `route_inserts[k]` inserts 2^k rows of one route, its texts bound
    /// once for all of them.
    route_inserts: Vec<String>,
}

impl SqliteWriter {
    /// Opens the file the pool uses, set up as the pool's connections are.
    pub(super) fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(SQLITE_SETUP)?;
        let sizes = 0..=ROWS_PER_INSERT.ilog2();
        let usage_inserts: Vec<String> = sizes.clone().map(|k| usage_insert(1 << k)).collect();
        let route_inserts: Vec<String> = sizes.map(|k| route_insert(1 << k)).collect();
        // Every statement the writer runs stays prepared.
        conn.set_prepared_statement_cache_capacity(2 * usage_inserts.len() + 16);
        Ok(Self {
            conn,
            usage_inserts,
            route_inserts,
        })
    }

    /// Commits a batch in one transaction, with statements prepared once
    /// per connection and executed once per row.
    pub(super) fn write(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        // IMMEDIATE takes the write lock up front: a deferred transaction
        // that must upgrade behind another writer fails without waiting.
        // (Cached, like COMMIT: rusqlite's `Transaction` parses both anew
        // each time, a tenth of a one-row commit's instructions.)
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let written = self
            .write_rows(batch)
            .and_then(|()| self.conn.prepare_cached("COMMIT")?.execute([]));
        if written.is_err() {
            // Whatever part ran is undone; the batch is retried whole.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        written.map(drop)
    }

    /// Commits the rows SQLite does not have yet (a journal's, after a
    /// crash) and returns how many that was. A row is known by its request
    /// id and time.
    pub(super) fn commit_missing(&mut self, rows: Vec<UsageRow>) -> rusqlite::Result<usize> {
        let Some(since) = rows.iter().map(|r| r.at).min() else {
            return Ok(0);
        };
        let mut known = HashSet::new();
        {
            let mut query = self
                .conn
                .prepare("SELECT request_id, at FROM usage WHERE at >= ?1")?;
            let mut found = query.query([since])?;
            while let Some(r) = found.next()? {
                known.insert((r.get::<_, String>(0)?, r.get::<_, i64>(1)?));
            }
        }
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| !known.contains(&(r.request_id.clone(), r.at)))
            .collect();
        let added = rows.len();
        if added > 0 {
            self.write(&Batch {
                rows,
                ..Batch::default()
            })?;
        }
        Ok(added)
    }

    /// Inserts usage rows many to a statement: a statement's own work
    /// (setting up, opening the table and index, finishing) was a quarter
    /// of a one-row INSERT's; 16 to a statement take 1.8k instructions a
    /// row off the ledger's 24k.
    ///
    /// A chunk whose rows all came by one route (key, team, account, model,
    /// deployment: at full speed nearly every chunk) binds those texts once.
    /// SQLite copies each text it is bound; binding all 17 values a row
    /// was 3k of the 10k instructions SQLite spent a row, and this takes
    /// 0.9k off them.
    fn insert_usage(&self, rows: &[UsageRow]) -> rusqlite::Result<()> {
        // The statement of the chunk before, kept while chunks take the
        // same one: the cache hashes a statement's whole text to find it.
        let mut prepared = None;
        let mut rest = rows;
        while !rest.is_empty() {
            let k = rest.len().min(ROWS_PER_INSERT).ilog2() as usize;
            let (chunk, tail) = rest.split_at(1 << k);
            let by_route = chunk.iter().all(|r| same_route(r, &chunk[0]));
            let statement = match prepared.take() {
                Some(kept @ (size, route, _)) if size == k && route == by_route => kept,
                _ => {
                    let sql = if by_route {
                        &self.route_inserts[k]
                    } else {
                        &self.usage_inserts[k]
                    };
                    (k, by_route, self.conn.prepare_cached(sql)?)
                }
            };
            let (_, _, insert) = prepared.insert(statement);
            if by_route {
                bind_route(insert, chunk)?;
            } else {
                bind_usage(insert, chunk)?;
            }
            insert.raw_execute()?;
            rest = tail;
        }
        Ok(())
    }

    fn write_rows(&self, batch: &Batch) -> rusqlite::Result<()> {
        let tx = &self.conn;
        if !batch.new_holds.is_empty() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO holds (request_id, account, amount_micros, at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (request_id) DO UPDATE SET amount_micros = excluded.amount_micros, at = excluded.at",
            )?;
            for h in &batch.new_holds {
                insert.execute(params![h.request_id, &*h.account, h.amount, h.at])?;
            }
        }
        if !batch.cleared_holds.is_empty() {
            let mut delete = tx.prepare_cached("DELETE FROM holds WHERE request_id = ?1")?;
            for id in &batch.cleared_holds {
                delete.execute([id])?;
            }
        }
        self.insert_usage(&batch.rows)?;
        for (table, width) in [("usage_minutes", MINUTE_MS), ("usage_hours", HOUR_MS)] {
            let groups = rollup(&batch.rows, width);
            if groups.is_empty() {
                continue;
            }
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT INTO {table} (at, key_name, team, account, model, requests, input_tokens, cached_tokens, output_tokens, cost_micros) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (at, key_name, team, account, model) DO UPDATE SET requests = requests + excluded.requests, \
                 input_tokens = input_tokens + excluded.input_tokens, \
                 cached_tokens = cached_tokens + excluded.cached_tokens, \
                 output_tokens = output_tokens + excluded.output_tokens, \
                 cost_micros = cost_micros + excluded.cost_micros"
            ))?;
            for ((at, key, team, account, model), s) in groups {
                upsert.execute(params![
                    at,
                    key,
                    team,
                    account,
                    model,
                    s.requests,
                    s.input_tokens,
                    s.cached_tokens,
                    s.output_tokens,
                    s.cost
                ])?;
            }
        }
        let charged = super::charged_accounts(&batch.rows);
        if !charged.is_empty() {
            let mut debit = tx.prepare_cached(
                "UPDATE accounts SET balance_micros = balance_micros - ?1 WHERE name = ?2",
            )?;
            for (account, cost) in charged {
                debit.execute(params![cost, account])?;
            }
        }
        Ok(())
    }
}

/// Binds the values in turn, numbering them on from `at`. Each by its own
/// type: through `&dyn ToSql` every one of the 17 a row took a virtual call
/// and an enum's match, 1.3k instructions a row.
macro_rules! bind {
    ($insert:ident, $at:ident, $($value:expr),+ $(,)?) => {
        $( $at += 1; $insert.raw_bind_parameter($at, $value)?; )+
    };
}

/// Binds `rows` to an INSERT made by [`usage_insert`] for as many.
fn bind_usage(insert: &mut rusqlite::Statement<'_>, rows: &[UsageRow]) -> rusqlite::Result<()> {
    let mut at = 0;
    for r in rows {
        bind!(
            insert,
            at,
            &r.request_id,
            r.at,
            r.key_id.as_deref(),
            r.key_name.as_deref(),
            r.user.as_deref(),
            r.team.as_deref(),
            r.account.as_deref(),
            &*r.model,
            r.served_model.as_deref(),
            r.deployment.as_deref(),
        );
        at = bind_counts(insert, at, r)?;
    }
    Ok(())
}

/// The texts a row shares with the other rows of its route (all but the
/// request id and the end user), in the order [`route_insert`] numbers them.
fn route_texts(r: &UsageRow) -> [Option<&str>; ROUTE_COLUMNS] {
    [
        r.key_id.as_deref(),
        r.key_name.as_deref(),
        r.team.as_deref(),
        r.account.as_deref(),
        Some(&*r.model),
        r.served_model.as_deref(),
        r.deployment.as_deref(),
    ]
}

/// Whether `a` and `b` came by one route.
fn same_route(a: &UsageRow, b: &UsageRow) -> bool {
    route_texts(a) == route_texts(b)
}

/// Binds `rows`, all of one route, to an INSERT made by [`route_insert`].
fn bind_route(insert: &mut rusqlite::Statement<'_>, rows: &[UsageRow]) -> rusqlite::Result<()> {
    let mut at = 0;
    for text in route_texts(&rows[0]) {
        bind!(insert, at, text);
    }
    for r in rows {
        bind!(insert, at, &r.request_id, r.at, r.user.as_deref());
        at = bind_counts(insert, at, r)?;
    }
    Ok(())
}

/// Binds a row's counts, the last seven values of its row in either
/// INSERT, numbering them on from `at`; returns the last number bound.
fn bind_counts(
    insert: &mut rusqlite::Statement<'_>,
    mut at: usize,
    r: &UsageRow,
) -> rusqlite::Result<usize> {
    bind!(
        insert,
        at,
        r.input_tokens as i64,
        r.cached_tokens as i64,
        r.output_tokens as i64,
        r.cost,
        r.status,
        r.latency_ms as i64,
        r.streamed,
    );
    Ok(at)
}

/// Values a usage row binds.
const USAGE_COLUMNS: usize = 17;
/// Texts a route's rows share: key id and name, team, account, model,
/// served model, deployment.
const ROUTE_COLUMNS: usize = 7;

/// What every usage INSERT starts with.
const USAGE_INSERT: &str = "INSERT OR ROLLBACK INTO usage (request_id, at, key_id, key_name, end_user, team, \
    account, model, served_model, deployment, input_tokens, cached_tokens, output_tokens, cost_micros, \
    status, latency_ms, streamed) VALUES ";

/// `INSERT OR ROLLBACK INTO usage … VALUES (…), (…)` for `rows` rows.
///
/// `OR ROLLBACK`: a statement that writes several rows and may fail
/// half-way (a `NOT NULL`) otherwise keeps a statement journal, copying
/// each page it changes so as to undo itself alone, about 400
/// instructions a row; a failed batch is rolled back and retried whole
/// anyway, so the statement may take the transaction with it.
fn usage_insert(rows: usize) -> String {
    let mut sql = String::from(USAGE_INSERT);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..USAGE_COLUMNS {
            if column > 0 {
                sql.push_str(", ");
            }
            // Numbered, as `raw_bind_parameter` counts them.
            let _ = write!(sql, "?{}", row * USAGE_COLUMNS + column + 1);
        }
        sql.push(')');
    }
    sql
}

/// [`usage_insert`] for `rows` rows of one route: its texts are `?1` to
/// `?7` in every row, then each row's own values.
fn route_insert(rows: usize) -> String {
    let mut sql = String::from(USAGE_INSERT);
    let own = USAGE_COLUMNS - ROUTE_COLUMNS;
    for row in 0..rows {
        let n = |i: usize| ROUTE_COLUMNS + row * own + i;
        let _ = write!(
            sql,
            "{}(?{}, ?{}, ?1, ?2, ?{}, ?3, ?4, ?5, ?6, ?7, ?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
            if row == 0 { "" } else { ", " },
            n(1),
            n(2),
            n(3),
            n(4),
            n(5),
            n(6),
            n(7),
            n(8),
            n(9),
            n(10),
        );
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Database, Error};
    use std::sync::Arc;

    fn row(i: usize) -> UsageRow {
        // Every column differs from row to row and from its neighbours, so
        // a value bound to the wrong place shows.
        let n = i as u64;
        UsageRow {
            request_id: format!("r{i}"),
            at: 1_000 + i as i64,
            key_id: Some(Arc::from(format!("k{i}"))),
            key_name: (!i.is_multiple_of(3)).then(|| Arc::from(format!("name{i}"))),
            user: (i.is_multiple_of(2)).then(|| format!("u{i}")),
            team: Some(Arc::from(format!("t{i}"))),
            account: (!i.is_multiple_of(5)).then(|| Arc::from(format!("a{i}"))),
            model: Arc::from(format!("m{i}")),
            served_model: Some(format!("s{i}")),
            deployment: Some(Arc::from(format!("d{i}"))),
            input_tokens: 10 * n + 1,
            cached_tokens: 10 * n + 2,
            output_tokens: 10 * n + 3,
            cost: 10 * i as i64 + 4,
            status: 200 + i as u16,
            latency_ms: 10 * n + 5,
            streamed: !i.is_multiple_of(2),
            held: false,
        }
    }

    /// `row(i)` on the route of `row(i / run)`: runs of `run` rows share
    /// their route, their own values still differ.
    fn routed(i: usize, run: usize) -> UsageRow {
        let route = row(i / run);
        UsageRow {
            key_id: route.key_id,
            key_name: route.key_name,
            team: route.team,
            account: route.account,
            model: route.model,
            served_model: route.served_model,
            deployment: route.deployment,
            ..row(i)
        }
    }

    /// Batches of every size around the statements' (a full statement,
    /// one row more and less, several and a remainder of each smaller
    /// size) land whole, each value in its own column: rows of a route
    /// each their own, of one route all, and routes changing every five
    /// rows, so that some chunks of a batch are of one route and others not.
    #[tokio::test]
    async fn batches_of_any_size_land_row_for_row() -> Result<(), Error> {
        for run in [1, 5, usize::MAX] {
            let dir = tempfile::tempdir().map_err(|e| Error::Writer(e.to_string()))?;
            let path = dir.path().join("t.db");
            let db = Database::open(&path.to_string_lossy()).await?;
            let mut writer = SqliteWriter::open(&path)?;
            let mut written = Vec::new();
            for size in [1, 2, 3, 15, 16, 17, 31, 2 * ROWS_PER_INSERT + 15, 0, 100] {
                let rows: Vec<_> = (written.len()..written.len() + size)
                    .map(|i| routed(i, run))
                    .collect();
                writer.write(&Batch {
                    rows: rows.clone(),
                    ..Batch::default()
                })?;
                written.extend(rows);
            }
            assert_eq!(db.usage_rows().await?, written, "routes of {run} rows");
        }
        Ok(())
    }
}
