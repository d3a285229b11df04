//! `steelyard agent`: runs a peer's agent. Reads the TOML config, applies flag and environment
//! overrides, and hands over to `steelyard_agent::daemon`; stops on SIGTERM or SIGINT.
//!
//! On start it prints one line on stdout, `agent <peer> control=<addr> key=<hex>`, so scripts
//! and tests can find the control endpoint and the public key the broker will record.

use std::path::PathBuf;

use anyhow::Context as _;
use steelyard_agent::config::AgentConfig;
use steelyard_agent::daemon::Agent;

/// Flags of `steelyard agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Path of the agent's TOML config.
    #[arg(long, short, env = "STEELYARD_AGENT_CONFIG")]
    pub config: PathBuf,
    /// The broker's URL (`ws://`, `wss://`, `http://`, `https://`); replaces the config's.
    #[arg(long, env = "STEELYARD_AGENT_BROKER")]
    pub broker: Option<String>,
    /// Enrollment token for the first contact; replaces the config's.
    #[arg(long, env = "STEELYARD_AGENT_ENROLL_TOKEN")]
    pub enroll_token: Option<String>,
}

/// Runs the agent until it is told to stop.
pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let mut cfg = AgentConfig::from_file(&args.config)?;
    if let Some(b) = args.broker {
        cfg.broker = b;
    }
    if args.enroll_token.is_some() {
        cfg.enroll_token = args.enroll_token;
    }
    crate::logging::init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let peer = cfg.peer_id.clone();
        let agent = Agent::bind(cfg).await?;
        println!(
            "agent {peer} control={} key={}",
            agent.control_addr()?,
            agent.public_key_hex()
        );
        for (listen, peer, service) in agent.forward_addrs() {
            println!("forward listening={listen} peer={peer} service={service}");
        }
        agent
            .run(async {
                use tokio::signal::unix::{signal, SignalKind};
                match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(mut t), Ok(mut i)) => {
                        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                    }
                    _ => std::future::pending().await,
                }
            })
            .await;
        anyhow::Ok(())
    })
}
