//! The usage ledger: one row per served request, written by one task in
//! group-committed batches. Whatever arrives while a batch commits goes
//! into the next one, so under load a single transaction carries hundreds
//! of rows and the write costs no throughput; a request can still wait for
//! its own row to be durable before its last byte goes out.
//!
//! Holds of in-flight requests ride the same batches. A request that starts
//! and settles within one batch never writes its hold at all.

use crate::{Database, Error};
use serde::Serialize;
use sqlx::{QueryBuilder, Row, Sqlite};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tollgate_core::money::Micros;

/// One served request, as the ledger keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
    /// Whether a hold was placed for it (and must be cleared).
    #[serde(skip)]
    pub held: bool,
}

/// Credit held for a request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRow {
    /// The request.
    pub request_id: String,
    /// The account.
    pub account: String,
    /// Micro-USD.
    pub amount: Micros,
    /// Unix milliseconds.
    pub at: i64,
}

// Nearly every entry is a usage row: boxing it to shrink the rare ones would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Hold(HoldRow),
    Release(String),
    Usage(UsageRow, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
}

/// Resolves once a row is durable (or the ledger gave up on it, which it
/// logs).
#[derive(Debug)]
pub struct Durable(Option<oneshot::Receiver<()>>);

impl Durable {
    /// Waits for the row's batch to commit.
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
}

/// Most rows in one transaction.
const MAX_BATCH: usize = 2048;
/// Rows per INSERT statement (SQLite allows 32,766 bound values).
const ROWS_PER_INSERT: usize = 256;

impl Ledger {
    /// Starts the writer on `db`. The task ends, after writing everything
    /// queued, when every handle is dropped.
    pub fn start(db: Database) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_loop(db, rx));
        (Self { tx }, task)
    }

    /// Records a hold (not waited for: a hold only matters after a crash).
    pub fn hold(&self, hold: HoldRow) {
        let _ = self.tx.send(Entry::Hold(hold));
    }

    /// Clears the hold of a request that was refused after all (no row).
    pub fn release(&self, request_id: &str) {
        let _ = self.tx.send(Entry::Release(request_id.to_owned()));
    }

    /// Records a served request; the returned [`Durable`] resolves when
    /// its row is committed.
    pub fn record(&self, row: UsageRow) -> Durable {
        let (done, rx) = oneshot::channel();
        match self.tx.send(Entry::Usage(row, Some(done))) {
            Ok(()) => Durable(Some(rx)),
            Err(e) => {
                tracing::error!(request_id = %entry_id(&e.0), "the ledger writer has stopped; usage row lost");
                Durable(None)
            }
        }
    }

    /// Records a served request without waiting for it.
    pub fn record_detached(&self, row: UsageRow) {
        if let Err(e) = self.tx.send(Entry::Usage(row, None)) {
            tracing::error!(request_id = %entry_id(&e.0), "the ledger writer has stopped; usage row lost");
        }
    }

    /// Waits until everything recorded so far is committed.
    pub async fn flush(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Entry::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn entry_id(e: &Entry) -> &str {
    match e {
        Entry::Hold(h) => &h.request_id,
        Entry::Release(id) => id,
        Entry::Usage(u, _) => &u.request_id,
        Entry::Flush(_) => "",
    }
}

async fn write_loop(db: Database, mut rx: mpsc::UnboundedReceiver<Entry>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut holds = Vec::new();
        let mut released = Vec::new();
        let mut rows = Vec::new();
        let mut waiters = Vec::new();
        for entry in batch.drain(..) {
            match entry {
                Entry::Hold(h) => holds.push(h),
                Entry::Release(id) => released.push(id),
                Entry::Usage(row, done) => {
                    waiters.extend(done);
                    rows.push(row);
                }
                Entry::Flush(done) => waiters.push(done),
            }
        }
        let mut attempt = 0;
        loop {
            match write_batch(&db, &holds, &released, &rows).await {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, rows = rows.len(), "ledger batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, rows = rows.len(), "ledger batch failed for good; its usage rows are lost");
                    break;
                }
            }
        }
        for done in waiters {
            let _ = done.send(());
        }
    }
}

async fn write_batch(
    db: &Database,
    holds: &[HoldRow],
    released: &[String],
    rows: &[UsageRow],
) -> Result<(), Error> {
    let settled: HashSet<&str> = rows
        .iter()
        .map(|r| r.request_id.as_str())
        .chain(released.iter().map(String::as_str))
        .collect();
    let mut tx = db.pool.begin().await?;
    let open: Vec<&HoldRow> = holds
        .iter()
        .filter(|h| !settled.contains(h.request_id.as_str()))
        .collect();
    for chunk in open.chunks(ROWS_PER_INSERT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT OR REPLACE INTO holds (request_id, account, amount_micros, at) ",
        );
        q.push_values(chunk, |mut b, h| {
            b.push_bind(&h.request_id)
                .push_bind(&h.account)
                .push_bind(h.amount)
                .push_bind(h.at);
        });
        q.build().execute(&mut *tx).await?;
    }
    let in_batch: HashSet<&str> = holds.iter().map(|h| h.request_id.as_str()).collect();
    for id in released.iter().filter(|id| !in_batch.contains(id.as_str())) {
        sqlx::query("DELETE FROM holds WHERE request_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    let mut charged: HashMap<&str, Micros> = HashMap::new();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage (request_id, at, key_id, key_name, end_user, team, account, model, served_model, deployment, input_tokens, cached_tokens, output_tokens, cost_micros, status, latency_ms, streamed) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.request_id)
                .push_bind(r.at)
                .push_bind(r.key_id.as_deref())
                .push_bind(r.key_name.as_deref())
                .push_bind(&r.user)
                .push_bind(r.team.as_deref())
                .push_bind(r.account.as_deref())
                .push_bind(&*r.model)
                .push_bind(&r.served_model)
                .push_bind(r.deployment.as_deref())
                .push_bind(r.input_tokens as i64)
                .push_bind(r.cached_tokens as i64)
                .push_bind(r.output_tokens as i64)
                .push_bind(r.cost)
                .push_bind(i64::from(r.status))
                .push_bind(r.latency_ms as i64)
                .push_bind(r.streamed);
        });
        q.build().execute(&mut *tx).await?;
    }
    for r in rows {
        if let Some(a) = &r.account {
            *charged.entry(&**a).or_default() += r.cost;
        }
        if r.held && !in_batch.contains(r.request_id.as_str()) {
            sqlx::query("DELETE FROM holds WHERE request_id = ?")
                .bind(&r.request_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    for (account, cost) in charged {
        sqlx::query("UPDATE accounts SET balance_micros = balance_micros - ? WHERE name = ?")
            .bind(cost)
            .bind(account)
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
    fn expr(self) -> &'static str {
        match self {
            Self::Key => "COALESCE(key_name, '-')",
            Self::Team => "COALESCE(team, '-')",
            Self::User => "COALESCE(end_user, '-')",
            Self::Model => "model",
            Self::Account => "COALESCE(account, '-')",
            Self::Day => "strftime('%Y-%m-%d', at / 1000, 'unixepoch')",
        }
    }
}

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

impl Database {
    /// Usage between `since_ms` (inclusive) and `until_ms` (exclusive),
    /// grouped, most expensive first.
    pub async fn usage_report(
        &self,
        by: GroupBy,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<UsageLine>, Error> {
        let sql = format!(
            "SELECT {g} AS grp, COUNT(*) AS requests, SUM(input_tokens) AS input, SUM(cached_tokens) AS cached,
                    SUM(output_tokens) AS output, SUM(cost_micros) AS cost
             FROM usage WHERE at >= ? AND at < ? GROUP BY grp ORDER BY cost DESC, grp",
            g = by.expr()
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(&self.pool)
            .await?;
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

    /// Every usage row, oldest first (for audits and tests).
    pub async fn usage_rows(&self) -> Result<Vec<UsageRow>, Error> {
        let rows = sqlx::query(
            "SELECT request_id, at, key_id, key_name, end_user, team, account, model, served_model, deployment,
                    input_tokens, cached_tokens, output_tokens, cost_micros, status, latency_ms, streamed
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
                    streamed: r.try_get("streamed")?,
                    held: false,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_commit_rows_holds_and_balances_together() -> Result<(), Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Random(e.to_string()))?;
        let db = Database::open(&dir.path().join("l.db").to_string_lossy()).await?;
        db.add_credits("acme", 1_000, "test", "seed").await?;
        let (ledger, task) = Ledger::start(db.clone());
        let hold = |id: &str| HoldRow {
            request_id: id.into(),
            account: "acme".into(),
            amount: 100,
            at: 1,
        };
        let row = |id: &str, cost| UsageRow {
            request_id: id.into(),
            at: 2,
            account: Some(Arc::from("acme")),
            model: Arc::from("gpt-4o-mini"),
            cost,
            status: 200,
            held: true,
            ..UsageRow::default()
        };
        // `a` settles in a later batch than its hold; `b` is still in flight.
        ledger.hold(hold("a"));
        ledger.hold(hold("b"));
        ledger.flush().await;
        ledger.record(row("a", 40)).wait().await;
        // `c` holds and settles within one batch (or two: either is right).
        ledger.hold(hold("c"));
        ledger.record(row("c", 60)).wait().await;
        assert_eq!(db.find_account("acme").await?.balance, 900);
        let rows = db.usage_rows().await?;
        assert_eq!(rows.len(), 2);
        let stale = db.release_stale_holds().await?;
        assert_eq!(
            stale
                .iter()
                .map(|h| h.request_id.as_str())
                .collect::<Vec<_>>(),
            ["b"]
        );
        drop(ledger);
        task.await.map_err(|e| Error::Random(e.to_string()))?;
        Ok(())
    }
}
