//! Tollgate's state: virtual keys, budgets, credits and the usage ledger in
//! the database; limiter state in memory or in Redis ([`LimitStore`]), and
//! money books in memory. The embedded backend is one SQLite file in WAL
//! mode; the gateway never sees which backend it runs on.

pub mod book;
pub mod database;
pub mod keys;
pub mod ledger;
pub mod limiter;
pub mod money;
pub mod redis;
pub mod secret;
pub mod shared;
pub mod state;

pub use book::MoneyBook;
pub use database::Database;
pub use keys::{KeyRecord, LimitsUpdate, NewKey};
pub use ledger::{Ledger, UsageRow};
pub use limiter::MemoryLimiter;
pub use secret::{SecretHash, SecretKey};
pub use state::{LimitStore, MoneyStore};

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be opened or migrated.
    #[error("cannot open database {url}: {source}")]
    Open {
        /// The URL, without credentials.
        url: String,
        /// Cause.
        source: sqlx::Error,
    },
    /// A schema migration failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    /// The ledger writer's SQLite commit failed.
    #[error("ledger commit failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// No key has that id or name.
    #[error("no key named or with id `{0}`")]
    KeyNotFound(String),
    /// A live key already has that name.
    #[error("a live key named `{0}` already exists")]
    DuplicateName(String),
    /// The ledger writer could not be started.
    #[error("cannot start the ledger writer: {0}")]
    Writer(String),
    /// No account has that name.
    #[error("no account named `{0}`")]
    AccountNotFound(String),
    /// The operating system's random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
    /// Redis refused, failed or could not be reached.
    #[error("redis: {0}")]
    Redis(::redis::RedisError),
    /// Redis was unreachable at the last try; the heartbeat is probing it.
    #[error("redis is down")]
    RedisDown,
}
