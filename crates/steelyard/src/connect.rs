//! `steelyard connect <peer> <service> --listen ADDR`: a local listener whose every accepted
//! connection becomes a tunnel to `service` on `peer`, through the running agent.
//!
//! The work happens in the agent (`steelyard_agent::daemon`): this command asks the agent's
//! loopback control endpoint for each tunnel, then copies bytes between the local client and
//! the agent. The identity key never leaves the agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use steelyard_agent::config::{AgentConfig, DEFAULT_CONTROL};
use steelyard_agent::daemon::open_via_agent;

/// Flags of `steelyard connect`.
#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// The peer to reach.
    pub peer: String,
    /// The service on that peer (a name from its `[services]`).
    pub service: String,
    /// Where to listen for local clients.
    #[arg(long, env = "STEELYARD_CONNECT_LISTEN")]
    pub listen: SocketAddr,
    /// The agent's control address (default: from `--config`, else 127.0.0.1:7450).
    #[arg(long, env = "STEELYARD_AGENT_CONTROL")]
    pub control: Option<SocketAddr>,
    /// The agent's TOML config, to read its control address from.
    #[arg(long, short, env = "STEELYARD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Listens and tunnels until interrupted.
pub fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let control = match (args.control, &args.config) {
        (Some(c), _) => c,
        (None, Some(path)) => AgentConfig::from_file(path)?.control,
        (None, None) => DEFAULT_CONTROL.parse()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}; pick a free port", args.listen))?;
        println!(
            "connect {} {} listening={} control={control}",
            args.peer,
            args.service,
            listener.local_addr()?
        );
        loop {
            let (mut local, from) = listener.accept().await?;
            let (peer, service) = (args.peer.clone(), args.service.clone());
            tokio::spawn(async move {
                let _ = local.set_nodelay(true);
                match open_via_agent(control, &peer, &service).await {
                    Ok((mut tunnel, reply)) => {
                        log(&format!(
                            "{from}: tunnel {} via relay {}",
                            reply.session_id.unwrap_or_default(),
                            reply.relay.unwrap_or_default()
                        ));
                        let _ = tokio::io::copy_bidirectional(&mut local, &mut tunnel).await;
                    }
                    Err(e) => log(&format!("{from}: {e}")),
                }
            });
        }
    })
}

fn log(line: &str) {
    eprintln!("steelyard connect: {line}");
}
