//! Opening the database: a SQLite file in WAL mode (embedded) or PostgreSQL
//! (distributed), migrated on open. Both sit behind sqlx's `Any` driver, so
//! every query is written once; where the two dialects differ, [`Backend`]
//! says which text to use. The one exception is the ledger's SQLite writer,
//! which commits on its own thread without sqlx (see `ledger::sqlite`).

use crate::Error;
use sqlx::AnyPool;
use sqlx::SqlSafeStr;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{ConnectOptions, Executor};
use std::borrow::Cow;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A schema, versioned; embedded so the binary needs no files.
type Migrations = &'static [(i64, &'static str, &'static str)];

const SQLITE_MIGRATIONS: Migrations = &[
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
    (
        5,
        "rollups by account, with cached tokens",
        include_str!("../migrations/sqlite/0005_rollups_by_account.sql"),
    ),
];

/// PostgreSQL starts at the SQLite schema's fourth version in one step.
const POSTGRES_MIGRATIONS: Migrations = &[
    (
        4,
        "schema",
        include_str!("../migrations/postgres/0004_schema.sql"),
    ),
    (
        5,
        "rollups by account, with cached tokens",
        include_str!("../migrations/postgres/0005_rollups_by_account.sql"),
    ),
];

/// Which database a [`Database`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One SQLite file in WAL mode.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// `url`'s backend: `postgres://` or `postgresql://`, else SQLite.
    pub fn of_url(url: &str) -> Self {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }

    /// A Unix-milliseconds expression as a `YYYY-MM-DD` UTC day.
    pub(crate) fn utc_day(self, ms: &str) -> String {
        match self {
            Self::Sqlite => format!("strftime('%Y-%m-%d', {ms} / 1000, 'unixepoch')"),
            Self::Postgres => {
                format!("to_char(to_timestamp({ms} / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
            }
        }
    }
}

/// A connection pool to Tollgate's database.
#[derive(Debug, Clone)]
pub struct Database {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// How to open another connection (the ledger writer has its own).
    pub(crate) options: AnyConnectOptions,
    /// The SQLite file, as SQLite resolved it (the ledger writer opens it
    /// without sqlx).
    pub(crate) sqlite_path: Option<PathBuf>,
}

/// `Any` dispatches to the drivers installed here (once per process).
fn install_drivers() {
    sqlx::any::install_default_drivers();
}

/// What every SQLite connection runs first: WAL + NORMAL is durable
/// against process crashes (kill -9); only an OS crash can lose the last
/// transactions. (`Any` takes its options from the URL alone.)
pub(crate) const SQLITE_SETUP: &str =
    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;";

impl Database {
    /// Opens the database at `url` (`postgres://…`, `sqlite://PATH` or a
    /// plain path, created if missing) and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, Error> {
        install_drivers();
        let backend = Backend::of_url(url);
        let open_err = |source| Error::Open {
            url: redact(url),
            source,
        };
        let url_form = match backend {
            Backend::Postgres => url.to_owned(),
            Backend::Sqlite => sqlite_url(url),
        };
        let options = AnyConnectOptions::from_str(&url_form).map_err(open_err)?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 8,
            })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        conn.execute(SQLITE_SETUP).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(open_err)?;
        let migrations = match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS,
            Backend::Postgres => POSTGRES_MIGRATIONS,
        };
        let migrations = migrations
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
        let sqlite_path = match backend {
            Backend::Sqlite => {
                let file: String =
                    sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
                        .fetch_one(&pool)
                        .await?;
                // An in-memory database is one per connection: the ledger
                // writer's rows would never reach the pool's.
                if file.is_empty() {
                    return Err(open_err(sqlx::Error::Configuration(
                        "an in-memory SQLite database cannot be shared; name a file".into(),
                    )));
                }
                Some(PathBuf::from(file))
            }
            Backend::Postgres => None,
        };
        Ok(Self {
            pool,
            backend,
            options,
            sqlite_path,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// SQLite's journal mode and `synchronous` level on a pooled connection
    /// (for checks; PostgreSQL has neither).
    pub async fn sqlite_settings(&self) -> Result<(String, i64), Error> {
        use sqlx::Row;
        let mode = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await?;
        let sync = sqlx::query("PRAGMA synchronous")
            .fetch_one(&self.pool)
            .await?;
        Ok((mode.try_get(0)?, sync.try_get(0)?))
    }

    /// Closes every connection, waiting for running queries.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Opens one more connection, set up like the pool's.
    pub(crate) async fn connect(&self) -> Result<sqlx::AnyConnection, sqlx::Error> {
        let mut conn = self.options.connect().await?;
        if self.backend == Backend::Sqlite {
            conn.execute(SQLITE_SETUP).await?;
        }
        Ok(conn)
    }
}

/// A SQLite URL or plain path as the URL `Any` parses, created if missing.
/// The `sqlite:PATH` form (no `//`) keeps the path's case: after `//` it
/// would be a host name, and lower-cased.
fn sqlite_url(url: &str) -> String {
    match url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        Some(rest) if rest.contains('?') => format!("sqlite:{rest}"),
        Some(rest) => format!("sqlite:{rest}?mode=rwc"),
        None => {
            let path = url
                .replace('%', "%25")
                .replace('?', "%3F")
                .replace('#', "%23");
            format!("sqlite:{path}?mode=rwc")
        }
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://tg:s3cret@db:5432/tollgate"),
            "postgres://tg:***@db:5432/tollgate"
        );
        assert_eq!(redact("postgres://tg@db/x"), "postgres://tg@db/x");
        assert_eq!(redact("tollgate.db"), "tollgate.db");
    }
}

/// Scratch PostgreSQL databases for tests: each test gets a database of its
/// own, so tests run in parallel and leave nothing in each other's way.
#[doc(hidden)]
pub mod scratch {
    use super::install_drivers;
    use sqlx::{Connection, Executor, Row};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    /// The server tests use: `TOLLGATE_TEST_POSTGRES_URL`, else this machine's.
    pub fn server_url() -> String {
        std::env::var("TOLLGATE_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
    }

    /// Creates an empty database on [`server_url`]'s server and returns its
    /// URL. Scratch databases older than an hour (earlier runs) are dropped
    /// on the way. Panics, loudly, when PostgreSQL cannot be reached.
    pub async fn postgres() -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        install_drivers();
        let server = server_url();
        let mut conn = sqlx::AnyConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("these tests need PostgreSQL at {server}: {e}"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let old = conn
            .fetch_all("SELECT datname FROM pg_database WHERE datname LIKE 'tollgate_scratch_%'")
            .await
            .unwrap_or_default();
        for row in old {
            let name: String = row.try_get("datname").unwrap_or_default();
            let born = name
                .split('_')
                .nth(2)
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(now);
            if now.saturating_sub(born) > 3600 {
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = conn.execute(sqlx::AssertSqlSafe(drop)).await;
            }
        }
        let name = format!(
            "tollgate_scratch_{now}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name} at {server}: {e}"));
        let base = server.split('?').next().unwrap_or(&server);
        let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
        format!("{base}/{name}")
    }
}
