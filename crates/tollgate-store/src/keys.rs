//! Virtual API keys: create, list, revoke, rotate, look up by hash.

use crate::secret::{SecretHash, SecretKey};
use crate::{Database, Error};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::time::{SystemTime, UNIX_EPOCH};
use tollgate_core::limits::KeyLimits;

/// A stored key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRecord {
    /// Stable id (`key_…`).
    pub id: String,
    /// Human name, unique among live keys; appears in logs and metrics.
    pub name: String,
    /// SHA-256 of the secret.
    #[serde(skip)]
    pub secret_hash: SecretHash,
    /// First characters of the secret, for display.
    pub prefix: String,
    /// Models this key may use; `None` means all.
    pub models: Option<Vec<String>>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    /// Unix seconds at which the key was revoked.
    pub revoked_at: Option<i64>,
    /// The preset its limits start from.
    pub preset: Option<String>,
    /// The team it shares team limits with.
    pub team: Option<String>,
    /// Its own limits, over the preset's.
    pub limits: KeyLimits,
    /// The prepaid account its spend is drawn from.
    pub account: Option<String>,
}

impl KeyRecord {
    /// Whether the key may call `model`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }

    /// Whether the key has expired at `now` (unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| now >= t)
    }
}

/// What a new key is made of.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Human name.
    pub name: String,
    /// Allowed models (`None`: all).
    pub models: Option<Vec<String>>,
    /// Unix seconds of expiry.
    pub expires_at: Option<i64>,
    /// Preset to start from.
    pub preset: Option<String>,
    /// Team to belong to.
    pub team: Option<String>,
    /// Its own limits.
    pub limits: KeyLimits,
    /// Prepaid account to draw from.
    pub account: Option<String>,
}

/// A change to a key's limits; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct LimitsUpdate {
    /// New preset (`Some(None)` removes it).
    pub preset: Option<Option<String>>,
    /// New team (`Some(None)` removes it).
    pub team: Option<Option<String>>,
    /// New own limits, replacing the old ones whole.
    pub limits: Option<KeyLimits>,
    /// New account (`Some(None)` removes it).
    pub account: Option<Option<String>>,
}

/// A marker that changes whenever any key changes; cheap to poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeysVersion {
    count: i64,
    last_update_ms: i64,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn random_id() -> Result<String, Error> {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).map_err(|e| Error::Random(e.to_string()))?;
    Ok(format!("key_{}", hex::encode(b)))
}

/// `SELECT <every key column> FROM api_keys <tail>`, as a static string.
macro_rules! select_keys {
    ($tail:literal) => {
        concat!(
            "SELECT id, name, secret_hash, prefix, models, created_at, expires_at, revoked_at, preset, team, limits, account FROM api_keys ",
            $tail
        )
    };
}

/// `updated_at = ` the time bound as `$n`, but always past the table's
/// latest, so two edits within one millisecond still move [`KeysVersion`].
/// (Written with CASE: SQLite's two-argument MAX is PostgreSQL's GREATEST.)
macro_rules! next_version {
    ($n:literal) => {
        concat!(
            "updated_at = (SELECT CASE WHEN MAX(updated_at) >= $",
            $n,
            " THEN MAX(updated_at) + 1 ELSE $",
            $n,
            " END FROM api_keys)"
        )
    };
}

fn from_row(row: &AnyRow) -> Result<KeyRecord, Error> {
    let hash: String = row.try_get("secret_hash")?;
    let models: Option<String> = row.try_get("models")?;
    Ok(KeyRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        secret_hash: SecretHash::from_hex(&hash).ok_or_else(|| {
            Error::Query(sqlx::Error::Decode(
                "secret_hash is not 64 hex digits".into(),
            ))
        })?,
        prefix: row.try_get("prefix")?,
        models: models.and_then(|m| serde_json::from_str(&m).ok()),
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
        preset: row.try_get("preset")?,
        team: row.try_get("team")?,
        limits: serde_json::from_str(&row.try_get::<String, _>("limits")?)
            .map_err(|e| Error::Query(sqlx::Error::Decode(format!("limits column: {e}").into())))?,
        account: row.try_get("account")?,
    })
}

fn limits_json(limits: &KeyLimits) -> String {
    // A struct of integers, strings and maps always serializes.
    serde_json::to_string(limits).unwrap_or_else(|_| "{}".to_owned())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

impl Database {
    /// Creates a key; the secret is returned once and never stored.
    pub async fn create_key(&self, new: NewKey) -> Result<(KeyRecord, SecretKey), Error> {
        let secret = SecretKey::generate()?;
        let now = now_ms();
        let record = KeyRecord {
            id: random_id()?,
            name: new.name,
            secret_hash: secret.hash(),
            prefix: secret.display_prefix(),
            models: new.models,
            created_at: now / 1000,
            expires_at: new.expires_at,
            revoked_at: None,
            preset: new.preset,
            team: new.team,
            limits: new.limits,
            account: new.account,
        };
        let models = record
            .models
            .as_ref()
            .and_then(|m| serde_json::to_string(m).ok());
        let result = sqlx::query(
            "INSERT INTO api_keys (id, name, secret_hash, prefix, models, created_at, expires_at, revoked_at, updated_at, preset, team, limits, account)
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9, $10, $11, $12)",
        )
        .bind(&record.id)
        .bind(&record.name)
        .bind(record.secret_hash.to_hex())
        .bind(&record.prefix)
        .bind(models)
        .bind(record.created_at)
        .bind(record.expires_at)
        .bind(now)
        .bind(&record.preset)
        .bind(&record.team)
        .bind(limits_json(&record.limits))
        .bind(&record.account)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok((record, secret)),
            Err(e) if is_unique_violation(&e) => Err(Error::DuplicateName(record.name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key, newest first, revoked ones included.
    pub async fn list_keys(&self) -> Result<Vec<KeyRecord>, Error> {
        let rows = sqlx::query(select_keys!("ORDER BY created_at DESC, name"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// The key whose secret hashes to `hash`, revoked or not.
    pub async fn find_key_by_hash(&self, hash: &SecretHash) -> Result<Option<KeyRecord>, Error> {
        let row = sqlx::query(select_keys!("WHERE secret_hash = $1"))
            .bind(hash.to_hex())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The live key with this id or name (a revoked one only by id).
    pub async fn find_key(&self, id_or_name: &str) -> Result<KeyRecord, Error> {
        let row = sqlx::query(select_keys!(
            "WHERE id = $1 OR (name = $1 AND revoked_at IS NULL)"
        ))
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(from_row)
            .transpose()?
            .ok_or_else(|| Error::KeyNotFound(id_or_name.to_owned()))
    }

    /// Revokes a key; it is refused from then on.
    pub async fn revoke_key(&self, id_or_name: &str) -> Result<KeyRecord, Error> {
        let mut key = self.find_key(id_or_name).await?;
        if key.revoked_at.is_some() {
            return Ok(key);
        }
        let now = now_ms();
        sqlx::query(concat!(
            "UPDATE api_keys SET revoked_at = $1, ",
            next_version!(2),
            " WHERE id = $3"
        ))
        .bind(now / 1000)
        .bind(now)
        .bind(&key.id)
        .execute(&self.pool)
        .await?;
        key.revoked_at = Some(now / 1000);
        Ok(key)
    }

    /// Gives a key a new secret; the old secret stops working at once.
    pub async fn rotate_key(&self, id_or_name: &str) -> Result<(KeyRecord, SecretKey), Error> {
        let mut key = self.find_key(id_or_name).await?;
        if key.revoked_at.is_some() {
            return Err(Error::KeyNotFound(id_or_name.to_owned()));
        }
        let secret = SecretKey::generate()?;
        sqlx::query(concat!(
            "UPDATE api_keys SET secret_hash = $1, prefix = $2, ",
            next_version!(3),
            " WHERE id = $4"
        ))
        .bind(secret.hash().to_hex())
        .bind(secret.display_prefix())
        .bind(now_ms())
        .bind(&key.id)
        .execute(&self.pool)
        .await?;
        key.secret_hash = secret.hash();
        key.prefix = secret.display_prefix();
        Ok((key, secret))
    }

    /// Changes a key's preset, team or limits.
    pub async fn update_key_limits(
        &self,
        id_or_name: &str,
        update: LimitsUpdate,
    ) -> Result<KeyRecord, Error> {
        let mut key = self.find_key(id_or_name).await?;
        if let Some(p) = update.preset {
            key.preset = p;
        }
        if let Some(t) = update.team {
            key.team = t;
        }
        if let Some(l) = update.limits {
            key.limits = l;
        }
        if let Some(a) = update.account {
            key.account = a;
        }
        sqlx::query(concat!(
            "UPDATE api_keys SET preset = $1, team = $2, limits = $3, account = $4, ",
            next_version!(5),
            " WHERE id = $6"
        ))
        .bind(&key.preset)
        .bind(&key.team)
        .bind(limits_json(&key.limits))
        .bind(&key.account)
        .bind(now_ms())
        .bind(&key.id)
        .execute(&self.pool)
        .await?;
        Ok(key)
    }

    /// A marker that moves whenever a key is created, revoked or rotated.
    pub async fn keys_version(&self) -> Result<KeysVersion, Error> {
        let row =
            sqlx::query("SELECT COUNT(*) AS n, COALESCE(MAX(updated_at), 0) AS t FROM api_keys")
                .fetch_one(&self.pool)
                .await?;
        Ok(KeysVersion {
            count: row.try_get("n")?,
            last_update_ms: row.try_get("t")?,
        })
    }
}
