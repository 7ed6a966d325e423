//! Opening the database: a SQLite file in WAL mode, migrated on open.

use crate::Error;
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

/// The SQLite schema, versioned; embedded so the binary needs no files.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "keys",
        include_str!("../migrations/sqlite/0001_keys.sql"),
    ),
    (
        2,
        "key limits",
        include_str!("../migrations/sqlite/0002_key_limits.sql"),
    ),
    (
        3,
        "money",
        include_str!("../migrations/sqlite/0003_money.sql"),
    ),
    (
        4,
        "usage rollups",
        include_str!("../migrations/sqlite/0004_usage_rollups.sql"),
    ),
];

/// A connection pool to Tollgate's database.
#[derive(Debug, Clone)]
pub struct Database {
    pub(crate) pool: SqlitePool,
    /// How to open another connection (the ledger writer has its own).
    pub(crate) options: SqliteConnectOptions,
}

impl Database {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or a
    /// plain path) and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, Error> {
        let open_err = |source| Error::Open {
            url: url.to_owned(),
            source,
        };
        let url_form = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let options = SqliteConnectOptions::from_str(&url_form)
            .map_err(open_err)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL is durable against process crashes (kill -9);
            // only an OS crash can lose the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(open_err)?;
        let migrations = SQLITE_MIGRATIONS
            .iter()
            .map(|(version, name, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*name),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations).run(&pool).await?;
        Ok(Self { pool, options })
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
