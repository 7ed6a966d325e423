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
use std::path::Path;
use std::time::Duration;

/// How long a commit waits for another connection's write lock (a key
/// created, credits added) before it fails and the batch is retried.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection to the SQLite file, used only by the ledger writer.
pub(super) struct SqliteWriter {
    conn: Connection,
}

impl SqliteWriter {
    /// Opens the file the pool uses, set up as the pool's connections are.
    pub(super) fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(SQLITE_SETUP)?;
        Ok(Self { conn })
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
        if !batch.rows.is_empty() {
            let mut insert = tx.prepare_cached(
                "INSERT INTO usage (request_id, at, key_id, key_name, end_user, team, account, model, \
                 served_model, deployment, input_tokens, cached_tokens, output_tokens, cost_micros, status, \
                 latency_ms, streamed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?;
            for r in &batch.rows {
                insert.execute(params![
                    r.request_id,
                    r.at,
                    r.key_id.as_deref(),
                    r.key_name.as_deref(),
                    r.user.as_deref(),
                    r.team.as_deref(),
                    r.account.as_deref(),
                    &*r.model,
                    r.served_model.as_deref(),
                    r.deployment.as_deref(),
                    r.input_tokens as i64,
                    r.cached_tokens as i64,
                    r.output_tokens as i64,
                    r.cost,
                    r.status,
                    r.latency_ms as i64,
                    r.streamed,
                ])?;
            }
        }
        for (table, width) in [("usage_minutes", MINUTE_MS), ("usage_hours", HOUR_MS)] {
            let groups = rollup(&batch.rows, width);
            if groups.is_empty() {
                continue;
            }
            let mut upsert = tx.prepare_cached(&format!(
                "INSERT INTO {table} (at, key_name, team, model, requests, input_tokens, output_tokens, cost_micros) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (at, key_name, team, model) DO UPDATE SET requests = requests + excluded.requests, \
                 input_tokens = input_tokens + excluded.input_tokens, \
                 output_tokens = output_tokens + excluded.output_tokens, \
                 cost_micros = cost_micros + excluded.cost_micros"
            ))?;
            for ((at, key, team, model), s) in groups {
                upsert.execute(params![
                    at,
                    key,
                    team,
                    model,
                    s.requests,
                    s.input_tokens,
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
