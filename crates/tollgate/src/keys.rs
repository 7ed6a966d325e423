//! `tollgate keys`: manage virtual keys directly in the database. A running
//! gateway sees the change within its key-refresh interval (1 s by default).

use clap::Subcommand;
use tollgate_store::{Database, KeyRecord, NewKey};

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
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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

fn print_table(keys: &[KeyRecord]) {
    println!(
        "{:<26} {:<20} {:<13} {:<8} {:<21} {:<21} MODELS",
        "ID", "NAME", "PREFIX", "STATE", "CREATED", "EXPIRES"
    );
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
        println!(
            "{:<26} {:<20} {:<13} {:<8} {:<21} {:<21} {}",
            k.id,
            k.name,
            k.prefix,
            state,
            fmt_time(Some(k.created_at)),
            fmt_time(k.expires_at),
            models
        );
    }
}

/// Runs one key command against the configured database.
pub async fn run(config: Option<&std::path::Path>, cmd: KeysCommand) -> anyhow::Result<()> {
    let config = crate::load_config(config)?;
    let db = Database::open(&config.database.url).await?;
    match cmd {
        KeysCommand::Create {
            name,
            models,
            expires,
            json,
        } => {
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
                })
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"key": key, "secret": secret.expose()})
                );
            } else {
                println!("created key '{}' ({})", key.name, key.id);
                println!("secret (shown once, store it now): {}", secret.expose());
            }
        }
        KeysCommand::List { json } => {
            let keys = db.list_keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print_table(&keys);
            }
        }
        KeysCommand::Revoke { key } => {
            let k = db.revoke_key(&key).await?;
            println!("revoked key '{}' ({})", k.name, k.id);
        }
        KeysCommand::Rotate { key } => {
            let (k, secret) = db.rotate_key(&key).await?;
            println!(
                "rotated key '{}' ({}); the old secret no longer works",
                k.name, k.id
            );
            println!("new secret (shown once, store it now): {}", secret.expose());
        }
    }
    db.close().await;
    Ok(())
}
