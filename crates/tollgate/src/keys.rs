//! `tollgate keys`: manage virtual keys directly in the database. A running
//! gateway sees the change within its key-refresh interval (1 s by default).

use clap::{Args, Subcommand};
use std::collections::BTreeMap;
use std::time::Duration;
use tollgate_core::limits::{KeyLimits, LimitSet};
use tollgate_gateway::limits::check_names;
use tollgate_store::{Database, KeyRecord, LimitsUpdate, NewKey};

/// Limit flags shared by `create` and `limits`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Preset from the config to start from.
    #[arg(long)]
    preset: Option<String>,
    /// Team from the config to belong to.
    #[arg(long)]
    team: Option<String>,
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute.
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests per UTC day.
    #[arg(long)]
    rpd: Option<u64>,
    /// Tokens per UTC day.
    #[arg(long)]
    tpd: Option<u64>,
    /// Limits on one model, e.g. `gpt-4o:rpm=10,tpm=20000` (repeatable).
    #[arg(long = "model-limit", value_parser = parse_model_limit)]
    model_limits: Vec<(String, LimitSet)>,
    /// Limits of each end user of the key, e.g. `rpm=5,tpm=10000`.
    #[arg(long = "user-limit", value_parser = parse_limit_set)]
    user_limits: Option<LimitSet>,
    /// How long its requests may queue instead of being refused, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_wait: Option<Duration>,
    /// Prepaid account its spend is drawn from (see `tollgate credits`).
    #[arg(long)]
    account: Option<String>,
}

impl LimitArgs {
    fn limits(&self) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm,
            tpm: self.tpm,
            rpd: self.rpd,
            tpd: self.tpd,
            models: self
                .model_limits
                .iter()
                .cloned()
                .collect::<BTreeMap<_, _>>(),
            users: self.user_limits,
            max_wait: self.max_wait,
        }
    }

    fn sets_limits(&self) -> bool {
        self.limits() != KeyLimits::default()
    }
}

/// `rpm=5,tpm=10000`.
fn parse_limit_set(s: &str) -> Result<LimitSet, String> {
    let mut set = LimitSet::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not NAME=NUMBER"))?;
        let n: u64 = value
            .parse()
            .map_err(|_| format!("`{value}` is not a whole number"))?;
        match name {
            "rpm" => set.rpm = Some(n),
            "tpm" => set.tpm = Some(n),
            "rpd" => set.rpd = Some(n),
            "tpd" => set.tpd = Some(n),
            other => return Err(format!("unknown limit `{other}` (rpm, tpm, rpd, tpd)")),
        }
    }
    Ok(set)
}

/// `gpt-4o:rpm=10,tpm=20000`.
fn parse_model_limit(s: &str) -> Result<(String, LimitSet), String> {
    let (model, limits) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not MODEL:NAME=NUMBER,..."))?;
    Ok((model.to_owned(), parse_limit_set(limits)?))
}

/// Key operations.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create {
        /// Human name (unique among live keys).
        #[arg(long)]
        name: String,
        /// Models it may use (comma-separated; all if unset).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Lifetime, e.g. 30d or 12h.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change a key's preset, team or limits (the limit flags given replace
    /// the key's own limits whole).
    Limits {
        /// Key id or name.
        key: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Remove the key's preset.
        #[arg(long, conflicts_with = "preset")]
        no_preset: bool,
        /// Remove the key from its team.
        #[arg(long, conflicts_with = "team")]
        no_team: bool,
        /// Stop drawing the key's spend from an account.
        #[arg(long, conflicts_with = "account")]
        no_account: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name.
    Revoke {
        /// Key id or name.
        key: String,
    },
    /// Give a key a new secret; the old one stops working.
    Rotate {
        /// Key id or name.
        key: String,
    },
}

fn fmt_time(t: Option<i64>) -> String {
    t.map_or_else(
        || "-".into(),
        |t| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64),
            )
            .to_string()
        },
    )
}

fn print_table(keys: &[KeyRecord]) -> std::io::Result<()> {
    out!(
        "{:<26} {:<20} {:<13} {:<8} {:<21} {:<21} {:<16} MODELS",
        "ID",
        "NAME",
        "PREFIX",
        "STATE",
        "CREATED",
        "EXPIRES",
        "PRESET/TEAM"
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for k in keys {
        let state = if k.revoked_at.is_some() {
            "revoked"
        } else if k.expired_at(now) {
            "expired"
        } else {
            "active"
        };
        let models = k
            .models
            .as_ref()
            .map_or_else(|| "*".into(), |m| m.join(","));
        let group = format!(
            "{}/{}",
            k.preset.as_deref().unwrap_or("-"),
            k.team.as_deref().unwrap_or("-")
        );
        out!(
            "{:<26} {:<20} {:<13} {:<8} {:<21} {:<21} {:<16} {}",
            k.id,
            k.name,
            k.prefix,
            state,
            fmt_time(Some(k.created_at)),
            fmt_time(k.expires_at),
            group,
            models
        )?;
    }
    Ok(())
}

/// Runs one key command against the configured database.
pub async fn run(config: Option<&std::path::Path>, cmd: KeysCommand) -> anyhow::Result<()> {
    let config = crate::load_config(config)?;
    let db = Database::open(config.database_url()).await?;
    match cmd {
        KeysCommand::Create {
            name,
            models,
            expires,
            limits,
            json,
        } => {
            check_names(&config, limits.preset.as_deref(), limits.team.as_deref())
                .map_err(anyhow::Error::msg)?;
            let expires_at = expires
                .as_deref()
                .map(tollgate_gateway::admin::expiry_from_now)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let models = (!models.is_empty()).then_some(models);
            let (key, secret) = db
                .create_key(NewKey {
                    name,
                    models,
                    expires_at,
                    preset: limits.preset.clone(),
                    team: limits.team.clone(),
                    limits: limits.limits(),
                    account: limits.account.clone(),
                })
                .await?;
            if json {
                out!(
                    "{}",
                    serde_json::json!({"key": key, "secret": secret.expose()})
                )?;
            } else {
                out!("created key '{}' ({})", key.name, key.id)?;
                out!("secret (shown once, store it now): {}", secret.expose())?;
            }
        }
        KeysCommand::Limits {
            key,
            limits,
            no_preset,
            no_team,
            no_account,
        } => {
            check_names(&config, limits.preset.as_deref(), limits.team.as_deref())
                .map_err(anyhow::Error::msg)?;
            let update = LimitsUpdate {
                preset: if no_preset {
                    Some(None)
                } else {
                    limits.preset.clone().map(Some)
                },
                team: if no_team {
                    Some(None)
                } else {
                    limits.team.clone().map(Some)
                },
                limits: limits.sets_limits().then(|| limits.limits()),
                account: if no_account {
                    Some(None)
                } else {
                    limits.account.clone().map(Some)
                },
            };
            let k = db.update_key_limits(&key, update).await?;
            out!(
                "key '{}': preset {}, team {}, account {}, limits {}",
                k.name,
                k.preset.as_deref().unwrap_or("-"),
                k.team.as_deref().unwrap_or("-"),
                k.account.as_deref().unwrap_or("-"),
                serde_json::to_string(&k.limits)?
            )?;
        }
        KeysCommand::List { json } => {
            let keys = db.list_keys().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&keys)?)?;
            } else {
                print_table(&keys)?;
            }
        }
        KeysCommand::Revoke { key } => {
            let k = db.revoke_key(&key).await?;
            out!("revoked key '{}' ({})", k.name, k.id)?;
        }
        KeysCommand::Rotate { key } => {
            let (k, secret) = db.rotate_key(&key).await?;
            out!(
                "rotated key '{}' ({}); the old secret no longer works",
                k.name,
                k.id
            )?;
            out!("new secret (shown once, store it now): {}", secret.expose())?;
        }
    }
    db.close().await;
    Ok(())
}
