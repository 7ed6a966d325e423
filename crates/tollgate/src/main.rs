//! The `tollgate` command: thin wiring of the library crates.

/// `println!` that hands back the write's error instead of panicking on it:
/// `tollgate usage | head` closes the pipe early, and that is no crash.
macro_rules! out {
    ($($line:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($line)*)
    }};
}

mod batch;
mod keys;
mod log_format;
mod log_writer;
mod mock;
mod money;
mod serve;
mod top;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

// The gateway's hot path allocates many small, short-lived buffers across
// threads; mimalloc handles that pattern with a fraction of glibc's cost
// (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tollgate: an OpenAI-compatible LLM gateway that turns rate limits, spend
/// caps and empty balances into exact, explainable decisions.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    /// Config file (default: ./tollgate.toml when it exists, else built-in defaults).
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// For a terminal.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Run the simulated OpenAI-compatible provider.
    Mock(mock::MockArgs),
    /// Manage virtual API keys.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Prepaid credits: add, show, list.
    #[command(subcommand)]
    Credits(money::CreditsCommand),
    /// Spend caps per scope: set, remove, list.
    #[command(subcommand)]
    Budgets(money::BudgetsCommand),
    /// Usage and spend from the ledger, grouped.
    Usage(money::UsageArgs),
    /// Live traffic per key (requests/s, tokens/s, refusals/s, spend),
    /// read from the gateway's /metrics every second.
    Top(top::TopArgs),
    /// Send OpenAI batch-format JSONL through a paced, retrying client;
    /// resumable. Exit codes: 0 done, 3 budget cap, 4 insufficient credits,
    /// 5 daily cap, 1 error.
    Batch(batch::BatchArgs),
}

/// What is logged when `RUST_LOG` is unset. PostgreSQL's notices
/// ("relation _sqlx_migrations already exists, skipping" on every start)
/// are not news. A command run at a terminal does not warn of sqlx's slow
/// statements either: a report over a busy month takes its seconds by
/// design, and the warning printed the whole SQL above the table.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) | Command::Mock(_) => "info,sqlx::postgres::notice=warn",
        _ => "info,sqlx::postgres::notice=warn,sqlx::query=error",
    }
}

/// Logs go to stderr in batches from a writer thread, so a request never
/// waits on the write of its access-log line; the returned guard writes
/// what is left at exit.
fn init_logging(
    format: LogFormat,
    default_filter: &str,
) -> anyhow::Result<log_writer::FlushOnDrop> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let (writer, guard) = log_writer::start(std::io::stderr())?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Human => builder.event_format(log_format::HumanLine).init(),
        // Span fields stored as JSON, which `JsonLine` splices into the line.
        LogFormat::Json => builder
            .fmt_fields(log_format::SpanFields)
            .event_format(log_format::JsonLine)
            .init(),
    }
    Ok(guard)
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let _log_guard = init_logging(cli.log_format, default_log_filter(&cli.command))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ran = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(cli.config.as_deref(), args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Mock(args) => mock::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Keys(cmd) => keys::run(cli.config.as_deref(), cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Credits(cmd) => money::credits(cli.config.as_deref(), cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Budgets(cmd) => money::budgets(cli.config.as_deref(), cmd)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Usage(args) => money::usage(cli.config.as_deref(), args)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Batch(args) => batch::run(args).await,
            Command::Top(args) => top::run(args).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match ran {
        // The reader went away (`| head`): stop quietly, as a process that
        // SIGPIPE ended would, with its status.
        Err(e)
            if e.downcast_ref::<std::io::Error>().map(std::io::Error::kind)
                == Some(std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::from(128 + 13))
        }
        ran => ran,
    }
}

/// The config file to use: the one named, else `./tollgate.toml` if present.
fn config_path(explicit: Option<&std::path::Path>) -> Option<PathBuf> {
    explicit.map(PathBuf::from).or_else(|| {
        let default = PathBuf::from("tollgate.toml");
        default.exists().then_some(default)
    })
}

/// Loads the configuration with environment overrides.
fn load_config(explicit: Option<&std::path::Path>) -> anyhow::Result<tollgate_gateway::Config> {
    let path = config_path(explicit);
    Ok(tollgate_gateway::Config::load(
        path.as_deref(),
        std::env::vars(),
    )?)
}
