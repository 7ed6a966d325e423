//! Who is calling: bearer keys checked against an in-memory copy of the key
//! table, so the hot path never waits on the database. The copy is refreshed
//! when the table changes (CLI, admin API, another replica) and on a miss.

use crate::config::Config;
use crate::error::Error;
use crate::limits::KeyPolicy;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_store::keys::KeysVersion;
use tollgate_store::{Database, KeyRecord, SecretHash};

/// The key table, in memory.
#[derive(Debug)]
pub struct KeyCache {
    db: Database,
    /// Presets, teams and default user limits that keys resolve against.
    config: Config,
    keys: RwLock<Arc<Snapshot>>,
}

#[derive(Debug, Default)]
struct Snapshot {
    version: KeysVersion,
    /// foldhash, seeded per process like std's SipHash and cheaper a lookup
    /// (a key's SHA-256 took SipHash 270 instructions).
    by_hash: HashMap<SecretHash, Arc<Caller>, foldhash::fast::RandomState>,
}

/// An authenticated key, with its limits resolved.
#[derive(Debug)]
pub struct Caller {
    /// The stored key.
    pub record: KeyRecord,
    /// Its id, shared by the limiter's subjects.
    pub id: Arc<str>,
    /// Its name, shared by log lines.
    pub name: Arc<str>,
    /// Its limits.
    pub policy: KeyPolicy,
    /// `key:NAME`, the scope its budgets are set on.
    pub key_scope: Arc<str>,
    /// Its team.
    pub team: Option<Arc<str>>,
    /// `team:T`, when it has a team.
    pub team_scope: Option<Arc<str>>,
    /// The account it draws from: its own, else its team's.
    pub account: Option<Arc<str>>,
}

impl Caller {
    fn new(record: KeyRecord, config: &Config) -> Self {
        let account = record.account.clone().or_else(|| {
            let team = config.teams.get(record.team.as_deref()?)?;
            team.account.clone()
        });
        Self {
            id: record.id.as_str().into(),
            name: record.name.as_str().into(),
            policy: KeyPolicy::resolve(&record, config),
            key_scope: format!("key:{}", record.name).into(),
            team: record.team.as_deref().map(Arc::from),
            team_scope: record.team.as_ref().map(|t| format!("team:{t}").into()),
            account: account.map(Arc::from),
            record,
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The bearer token of a request, if it has one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl KeyCache {
    /// Loads every key from `db`.
    pub async fn load(db: Database, config: Config) -> Result<Self, Error> {
        let cache = Self {
            db,
            config,
            keys: RwLock::new(Arc::default()),
        };
        cache.reload().await?;
        Ok(cache)
    }

    /// Re-reads the whole table.
    pub async fn reload(&self) -> Result<(), Error> {
        let version = self.db.keys_version().await?;
        let by_hash = self
            .db
            .list_keys()
            .await?
            .into_iter()
            .map(|k| (k.secret_hash, Arc::new(Caller::new(k, &self.config))))
            .collect();
        let snapshot = Arc::new(Snapshot { version, by_hash });
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
        Ok(())
    }

    /// Re-reads the table if it changed since the last read.
    pub async fn refresh_if_changed(&self) -> Result<bool, Error> {
        let version = self.db.keys_version().await?;
        if version == self.snapshot().version {
            return Ok(false);
        }
        self.reload().await?;
        Ok(true)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The live, unexpired key the request presents.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Arc<Caller>, Error> {
        let token = bearer(headers).ok_or(Error::MissingKey)?;
        let hash = SecretHash::of(token);
        let cached = self.snapshot().by_hash.get(&hash).cloned();
        let key = match cached {
            Some(k) => k,
            // A key created a moment ago by another process: look it up once.
            None => match self.db.find_key_by_hash(&hash).await? {
                Some(k) => {
                    let k = Arc::new(Caller::new(k, &self.config));
                    let mut guard = self.keys.write().unwrap_or_else(|e| e.into_inner());
                    let mut next = Snapshot {
                        version: guard.version,
                        by_hash: guard.by_hash.clone(),
                    };
                    next.by_hash.insert(hash, k.clone());
                    *guard = Arc::new(next);
                    k
                }
                None => return Err(Error::InvalidKey),
            },
        };
        // The map lookup matched on the hash; compare again in constant time
        // so no timing difference depends on how much of it matched.
        let record = &key.record;
        if !record.secret_hash.ct_eq(&hash) {
            return Err(Error::InvalidKey);
        }
        if record.revoked_at.is_some() {
            return Err(Error::KeyRevoked(record.name.clone()));
        }
        if record.expired_at(unix_now()) {
            return Err(Error::KeyExpired(record.name.clone()));
        }
        Ok(key)
    }
}
