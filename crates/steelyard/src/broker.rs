//! `steelyard broker`: runs the broker. Reads the TOML config, applies flags and environment
//! overrides, starts a tokio runtime and hands over to `steelyard_broker`; stops on Ctrl-C or
//! SIGTERM, closing connections and flushing the store. No broker logic lives here.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use steelyard_broker::config::{StoreKind, TokenConfig};
use steelyard_broker::BrokerConfig;

/// Flags of `steelyard broker`. Flags win over the environment, which wins over the file.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Path of the broker's TOML config (defaults apply without one).
    #[arg(long, short, env = "STEELYARD_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (`127.0.0.1:0` picks a free port; the address is printed).
    #[arg(long, env = "STEELYARD_BROKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory (signing key, SQLite database).
    #[arg(long, env = "STEELYARD_BROKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store backend: memory or sqlite.
    #[arg(long, env = "STEELYARD_BROKER_STORE", value_parser = parse_store)]
    pub store: Option<StoreKind>,
    /// Admin API bearer token (at least 16 characters).
    #[arg(long, env = "STEELYARD_BROKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// An extra agent enrollment token (at least 16 characters), named `cli`.
    #[arg(long, env = "STEELYARD_BROKER_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// Serve plain HTTP without TLS. For local demos and tests only.
    #[arg(long)]
    pub insecure_http: bool,
    /// Print the effective config (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
}

fn parse_store(s: &str) -> Result<StoreKind, String> {
    match s {
        "memory" => Ok(StoreKind::Memory),
        "sqlite" => Ok(StoreKind::Sqlite),
        other => Err(format!("unknown store {other:?}: use memory or sqlite")),
    }
}

fn effective_config(args: &BrokerArgs) -> Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str::<BrokerConfig>(&text)
                .with_context(|| format!("config {}", path.display()))?
        }
        None => BrokerConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(store) = args.store {
        config.store = store;
    }
    if let Some(token) = &args.admin_token {
        config.admin_token = Some(token.clone());
    }
    if let Some(token) = &args.enroll_token {
        config.enroll_tokens.push(TokenConfig {
            name: "cli".into(),
            token: token.clone(),
            role: steelyard_proto::api::Role::Agent,
        });
    }
    if args.insecure_http {
        config.listen_plain = true;
    }
    config.validate()?;
    Ok(config)
}

/// Runs the broker until it is told to stop.
pub fn run(args: BrokerArgs) -> Result<()> {
    let config = effective_config(&args)?;
    if args.print_config {
        let mut shown = config.clone();
        shown.admin_token = shown.admin_token.map(|_| "***".into());
        for t in &mut shown.enroll_tokens {
            t.token = "***".into();
        }
        println!("{}", toml::to_string_pretty(&shown)?);
        return Ok(());
    }
    crate::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let plain = config.listen_plain;
        let broker = steelyard_broker::start(config)
            .await
            .context("cannot start the broker")?;
        let scheme = if plain { "http" } else { "https" };
        println!(
            "steelyard broker listening on {scheme}://{}",
            broker.local_addr()
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        wait_for_signal().await?;
        tracing::info!("stopping: closing connections and flushing the store");
        broker.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C"),
        _ = term.recv() => Ok(()),
    }
}
