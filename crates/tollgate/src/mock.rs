//! `tollgate mock`: the simulated provider as a standalone server.

use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate_mock::{Fault, MockConfig, MockServer};

/// Options of `tollgate mock`.
#[derive(Debug, Args)]
pub struct MockArgs {
    /// Listening address.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Requests per minute per API key (unlimited if unset).
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens per minute per API key (unlimited if unset).
    #[arg(long)]
    tpm: Option<u64>,
    /// Time to first token, e.g. 200ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    ttft: Duration,
    /// Output speed in tokens per second (instant if unset).
    #[arg(long)]
    tokens_per_second: Option<u32>,
    /// Reply length when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    default_completion_tokens: u64,
    /// A fault for every request (or a share, see --fault-rate): 500, 502, 503,
    /// 429[:DELAY], overload, hang, trickle[:DELAY], reset, truncated,
    /// malformed, cut[:N], insufficient_quota.
    #[arg(long)]
    fault: Option<Fault>,
    /// Share of requests that get --fault, 0.0 to 1.0.
    #[arg(long, default_value_t = 1.0)]
    fault_rate: f64,
    /// Answer everything with insufficient_quota.
    #[arg(long)]
    insufficient_quota: bool,
    /// Models served (comma-separated); default: a current OpenAI set.
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
}

/// Runs the mock until interrupted.
pub async fn run(args: MockArgs) -> anyhow::Result<()> {
    let mut config = MockConfig {
        rpm: args.rpm,
        tpm: args.tpm,
        ttft: args.ttft,
        tokens_per_second: args.tokens_per_second,
        default_completion_tokens: args.default_completion_tokens,
        fault: args.fault,
        fault_rate: args.fault_rate.clamp(0.0, 1.0),
        insufficient_quota: args.insufficient_quota,
        ..MockConfig::default()
    };
    if !args.models.is_empty() {
        config.models = args.models;
    }
    let server = MockServer::start(config, args.listen).await?;
    let shutdown = crate::serve::shutdown_signal()?;
    out!(
        "tollgate mock: simulated OpenAI provider on {}",
        server.base_url()
    )?;
    out!("  per-request faults: send header `x-mock-fault: 503` (or hang, reset, cut:3, …)")?;
    tokio::select! {
        () = server.run_forever() => {}
        () = shutdown => {}
    }
    Ok(())
}
