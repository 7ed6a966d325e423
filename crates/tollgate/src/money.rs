//! `tollgate credits`, `tollgate budgets` and `tollgate usage`: money
//! operations straight on the database. A running gateway picks changes up
//! within its refresh interval (1 s by default).

use clap::{Args, Subcommand, ValueEnum};
use tollgate_core::money::{Usd, parse_usd};
use tollgate_gateway::admin::{budget_from_text, report_range};
use tollgate_store::Database;
use tollgate_store::ledger::GroupBy;

/// Prepaid credit operations.
#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits to an account (created on its first top-up), e.g.
    /// `tollgate credits add acme 25.00 --why "invoice 1042"`.
    Add {
        /// The account.
        account: String,
        /// Dollars, e.g. 25.00 (negative for a correction).
        #[arg(allow_hyphen_values = true)]
        amount: String,
        /// Why (kept in the ledger entry).
        #[arg(long)]
        why: String,
        /// Who (default: $USER).
        #[arg(long)]
        who: Option<String>,
        /// Call the low-balance webhook when the balance falls below this.
        #[arg(long)]
        alert_below: Option<String>,
    },
    /// An account's balance and the entries behind it.
    Show {
        /// The account.
        account: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every account and its balance.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Budget operations.
#[derive(Debug, Subcommand)]
pub enum BudgetsCommand {
    /// Set (or replace) a spend cap, e.g.
    /// `tollgate budgets set team:search --window day --cap 10.00 --alert-at 80`.
    Set {
        /// `org`, `team:NAME`, `key:NAME`, `user:ID` or `user:*`.
        scope: String,
        /// day, week, month or lifetime.
        #[arg(long)]
        window: String,
        /// Dollars.
        #[arg(long)]
        cap: String,
        /// Percent of the cap at which an alert fires once per window.
        #[arg(long)]
        alert_at: Option<u8>,
    },
    /// Remove a budget.
    Remove {
        /// The scope.
        scope: String,
        /// Its window.
        #[arg(long)]
        window: String,
    },
    /// Every budget.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Output of `tollgate usage`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    /// An aligned table.
    Table,
    /// A JSON array.
    Json,
    /// CSV with a header line.
    Csv,
}

/// `tollgate usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// key, team, user, model, account or day.
    #[arg(long, default_value = "key")]
    by: String,
    /// First UTC day included (2026-11-01).
    #[arg(long)]
    since: Option<String>,
    /// Last UTC day included.
    #[arg(long)]
    until: Option<String>,
    /// Shorthand for `--format json`.
    #[arg(long, conflicts_with_all = ["csv", "format"])]
    json: bool,
    /// Shorthand for `--format csv`.
    #[arg(long, conflicts_with = "format")]
    csv: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    format: ReportFormat,
}

async fn open(config: Option<&std::path::Path>) -> anyhow::Result<Database> {
    let config = crate::load_config(config)?;
    Ok(Database::open(config.database_url()).await?)
}

fn fmt_ms(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// Runs one credits command.
pub async fn credits(config: Option<&std::path::Path>, cmd: CreditsCommand) -> anyhow::Result<()> {
    let db = open(config).await?;
    match cmd {
        CreditsCommand::Add {
            account,
            amount,
            why,
            who,
            alert_below,
        } => {
            let amount = parse_usd(&amount)?;
            let who = who
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "cli".into());
            if why.trim().is_empty() {
                anyhow::bail!("say why: --why is kept in the ledger entry");
            }
            let entry = db.add_credits(&account, amount, &who, &why).await?;
            if let Some(mark) = alert_below {
                db.set_low_balance(&account, Some(parse_usd(&mark)?))
                    .await?;
            }
            let balance = db.find_account(&account).await?.balance;
            out!(
                "added ${} to '{account}' (entry {}, by {who}); balance ${}",
                Usd(amount),
                entry.id,
                Usd(balance)
            )?;
        }
        CreditsCommand::Show { account, json } => {
            let a = db.find_account(&account).await?;
            let entries = db.credit_entries(Some(&account), 0).await?;
            let credited: i64 = entries.iter().map(|e| e.amount).sum();
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "account": a.name, "balance_usd": Usd(a.balance).to_string(),
                        "credited_usd": Usd(credited).to_string(),
                        "spent_usd": Usd(credited - a.balance).to_string(),
                        "low_balance_usd": a.low_balance.map(|l| Usd(l).to_string()),
                        "entries": entries,
                    }))?
                )?;
            } else {
                out!("account '{}': balance ${}", a.name, Usd(a.balance))?;
                out!(
                    "credited ${}, spent ${}",
                    Usd(credited),
                    Usd(credited - a.balance)
                )?;
                if let Some(l) = a.low_balance {
                    out!("low-balance alert below ${}", Usd(l))?;
                }
                out!(
                    "{:<6} {:<21} {:>14} {:<12} WHY",
                    "ID",
                    "AT",
                    "AMOUNT",
                    "WHO"
                )?;
                for e in entries {
                    out!(
                        "{:<6} {:<21} {:>14} {:<12} {}",
                        e.id,
                        fmt_ms(e.at),
                        Usd(e.amount).to_string(),
                        e.who,
                        e.why
                    )?;
                }
            }
        }
        CreditsCommand::List { json } => {
            let accounts = db.list_accounts().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&accounts)?)?;
            } else {
                out!("{:<24} {:>16}", "ACCOUNT", "BALANCE")?;
                for a in accounts {
                    out!("{:<24} {:>16}", a.name, Usd(a.balance).to_string())?;
                }
            }
        }
    }
    db.close().await;
    Ok(())
}

/// Runs one budgets command.
pub async fn budgets(config: Option<&std::path::Path>, cmd: BudgetsCommand) -> anyhow::Result<()> {
    let db = open(config).await?;
    match cmd {
        BudgetsCommand::Set {
            scope,
            window,
            cap,
            alert_at,
        } => {
            let b =
                budget_from_text(&scope, &window, &cap, alert_at).map_err(anyhow::Error::msg)?;
            db.set_budget(&b).await?;
            out!("{} budget of {} set to ${}", b.window, b.scope, Usd(b.cap))?;
        }
        BudgetsCommand::Remove { scope, window } => {
            let window = window.parse().map_err(anyhow::Error::msg)?;
            if !db.remove_budget(&scope, window).await? {
                anyhow::bail!("no {window} budget on `{scope}`");
            }
            out!("removed the {window} budget of {scope}")?;
        }
        BudgetsCommand::List { json } => {
            let budgets = db.list_budgets().await?;
            if json {
                out!("{}", serde_json::to_string_pretty(&budgets)?)?;
            } else {
                out!("{:<32} {:<9} {:>14} ALERT", "SCOPE", "WINDOW", "CAP")?;
                for b in budgets {
                    out!(
                        "{:<32} {:<9} {:>14} {}",
                        b.scope,
                        b.window,
                        Usd(b.cap).to_string(),
                        b.alert_percent.map_or("-".into(), |p| format!("{p}%"))
                    )?;
                }
            }
        }
    }
    db.close().await;
    Ok(())
}

/// Runs `tollgate usage`.
pub async fn usage(config: Option<&std::path::Path>, args: UsageArgs) -> anyhow::Result<()> {
    let db = open(config).await?;
    let by: GroupBy = args.by.parse().map_err(anyhow::Error::msg)?;
    let (since, until) =
        report_range(args.since.as_deref(), args.until.as_deref()).map_err(anyhow::Error::msg)?;
    let lines = db.usage_report(by, since, until).await?;
    let format = if args.json {
        ReportFormat::Json
    } else if args.csv {
        ReportFormat::Csv
    } else {
        args.format
    };
    match format {
        ReportFormat::Json => {
            let out: Vec<_> = lines
                .iter()
                .map(|l| serde_json::json!({
                    args.by.as_str(): l.group, "requests": l.requests, "input_tokens": l.input_tokens,
                    "cached_tokens": l.cached_tokens, "output_tokens": l.output_tokens,
                    "cost_usd": Usd(l.cost).to_string(), "cost_micros": l.cost,
                }))
                .collect();
            out!("{}", serde_json::to_string_pretty(&out)?)?;
        }
        ReportFormat::Csv => {
            out!(
                "{},requests,input_tokens,cached_tokens,output_tokens,cost_usd",
                args.by
            )?;
            for l in &lines {
                out!(
                    "{},{},{},{},{},{}",
                    csv_field(&l.group),
                    l.requests,
                    l.input_tokens,
                    l.cached_tokens,
                    l.output_tokens,
                    Usd(l.cost)
                )?;
            }
        }
        ReportFormat::Table => {
            out!(
                "{:<28} {:>9} {:>12} {:>10} {:>12} {:>14}",
                args.by.to_uppercase(),
                "REQUESTS",
                "INPUT",
                "CACHED",
                "OUTPUT",
                "COST USD"
            )?;
            let mut total = 0;
            for l in &lines {
                total += l.cost;
                out!(
                    "{:<28} {:>9} {:>12} {:>10} {:>12} {:>14}",
                    l.group,
                    l.requests,
                    l.input_tokens,
                    l.cached_tokens,
                    l.output_tokens,
                    Usd(l.cost).to_string()
                )?;
            }
            out!("{:<28} {:>60}", "TOTAL", Usd(total).to_string())?;
        }
    }
    db.close().await;
    Ok(())
}

/// Quotes a CSV field when it needs it.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
