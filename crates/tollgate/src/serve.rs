//! `tollgate serve`: resolve the embedded default, start in-process mocks,
//! create a first key, print how to call it, serve until a signal.

use clap::Args;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tollgate_gateway::config::{DeploymentConfig, MockSettings, Provider};
use tollgate_gateway::{Config, Gateway};
use tollgate_mock::{MockConfig, MockServer};
use tollgate_store::NewKey;

/// Options of `tollgate serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listening address (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

/// Models offered by the default OpenAI deployment.
const OPENAI_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
];

fn deployment(name: &str, provider: Provider, models: Vec<String>) -> DeploymentConfig {
    DeploymentConfig {
        name: name.into(),
        provider,
        base_url: None,
        api_key_env: None,
        models,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(600),
        first_byte_timeout: None,
        rpm: None,
        tpm: None,
        api_version: None,
        mock: None,
    }
}

/// With no deployments configured: OpenAI if its key is in the environment,
/// else the simulated provider in-process. Says which.
fn embedded_default(config: &mut Config) -> std::io::Result<()> {
    if !config.deployments.is_empty() {
        return Ok(());
    }
    if std::env::var("OPENAI_API_KEY").is_ok_and(|k| !k.is_empty()) {
        let mut d = deployment(
            "openai",
            Provider::Openai,
            OPENAI_MODELS.iter().map(|m| (*m).to_owned()).collect(),
        );
        d.api_key_env = Some("OPENAI_API_KEY".into());
        config.deployments.push(d);
        out!(
            "no deployments configured: OPENAI_API_KEY is set, forwarding to https://api.openai.com/v1"
        )?;
    } else {
        let mut d = deployment(
            "mock",
            Provider::Mock,
            tollgate_mock::MockConfig::default().models,
        );
        d.mock = Some(MockSettings {
            rpm: Some(10_000),
            tpm: Some(10_000_000),
            ttft: None,
            tokens_per_second: None,
        });
        config.deployments.push(d);
        out!(
            "no deployments configured and no OPENAI_API_KEY: serving the built-in simulated provider"
        )?;
    }
    Ok(())
}

/// Starts every `provider = "mock"` deployment in this process and points
/// the deployment at it.
async fn start_mocks(config: &mut Config) -> anyhow::Result<Vec<MockServer>> {
    let mut mocks = Vec::new();
    for d in config
        .deployments
        .iter_mut()
        .filter(|d| d.provider == Provider::Mock)
    {
        let s = d.mock.clone().unwrap_or_default();
        let mock_config = MockConfig {
            models: d.models.clone(),
            rpm: s.rpm,
            tpm: s.tpm,
            ttft: s.ttft.unwrap_or_default(),
            tokens_per_second: s.tokens_per_second,
            ..MockConfig::default()
        };
        let server = MockServer::start(mock_config, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        d.base_url = Some(server.base_url());
        out!(
            "deployment '{}': simulated provider at {}",
            d.name,
            server.base_url()
        )?;
        mocks.push(server);
    }
    Ok(mocks)
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that arrives right
/// after the "listening" line must already find them.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    })
}

fn print_quickstart(url: &str, secret: &str, model: &str) -> std::io::Result<()> {
    out!()?;
    out!("created a first API key 'dev' (shown once, store it now):")?;
    out!("  {secret}")?;
    out!()?;
    out!("try it with curl:")?;
    out!("  curl {url}/v1/chat/completions \\")?;
    out!("    -H \"Authorization: Bearer {secret}\" -H 'Content-Type: application/json' \\")?;
    out!(
        "    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
    )?;
    out!()?;
    out!("or with the official OpenAI Python SDK (pip install openai):")?;
    out!("  from openai import OpenAI")?;
    out!("  client = OpenAI(base_url=\"{url}/v1\", api_key=\"{secret}\")")?;
    out!(
        "  print(client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello\"}}]).choices[0].message.content)"
    )?;
    out!()?;
    Ok(())
}

/// Runs the gateway until SIGINT or SIGTERM.
pub async fn run(config_file: Option<&Path>, args: ServeArgs) -> anyhow::Result<()> {
    let path = crate::config_path(config_file);
    let mut config = crate::load_config(config_file)?;
    match &path {
        Some(p) => out!("config: {}", p.display())?,
        None => out!("config: none found, using built-in defaults (see README for tollgate.toml)")?,
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    embedded_default(&mut config)?;
    let _mocks = start_mocks(&mut config).await?;
    out!(
        "database: {}",
        tollgate_store::database::redact(config.database_url())
    )?;
    let listen = config.server.listen;
    let gateway = Gateway::build(config, |name| std::env::var(name).ok()).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    if gateway.db.list_keys().await?.is_empty() {
        let (_, secret) = gateway
            .db
            .create_key(NewKey {
                name: "dev".into(),
                ..NewKey::default()
            })
            .await?;
        gateway.keys.reload().await?;
        let model = gateway
            .model_names
            .iter()
            .find(|m| !m.contains("embedding"))
            .cloned()
            .unwrap_or_default();
        print_quickstart(&url, secret.expose(), &model)?;
    } else {
        out!("keys: create one with `tollgate keys create --name NAME`")?;
    }
    if gateway.admin_enabled() {
        out!(
            "admin API: {url}/admin (Bearer ${})",
            gateway.config.server.admin_key_env
        )?;
    } else {
        out!(
            "admin API: disabled (set {} to enable it)",
            gateway.config.server.admin_key_env
        )?;
    }
    let shutdown = shutdown_signal()?;
    out!("tollgate listening on {url}  (OpenAI base URL: {url}/v1)")?;
    tollgate_gateway::server::serve(gateway.clone(), listener, shutdown).await?;
    // Every usage row of a served request is durable before the exit.
    gateway.money.close().await;
    Ok(())
}
