//! `steelyard relay`: runs a relay. Reads the TOML config, applies flag and environment
//! overrides, starts a tokio runtime and hands over to the `steelyard-relay` crate; drains
//! gracefully on SIGTERM or SIGINT (a second signal exits at once).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use steelyard_relay::{Relay, RelayConfig};

/// Flags of `steelyard relay`. Each flag overrides the config file and can also be set by the
/// environment variable named in its help.
#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// Path of the relay's TOML config.
    #[arg(long, short, env = "STEELYARD_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This relay's id, as the broker writes it into tickets.
    #[arg(long, env = "STEELYARD_RELAY_ID")]
    pub relay_id: Option<String>,
    /// A trusted broker public key (64 hex digits); repeat for several. Replaces the config's.
    #[arg(
        long = "broker-key",
        env = "STEELYARD_RELAY_BROKER_KEYS",
        value_delimiter = ','
    )]
    pub broker_keys: Vec<String>,
    /// TCP listen address for relayed sessions.
    #[arg(long, env = "STEELYARD_RELAY_TCP")]
    pub tcp: Option<SocketAddr>,
    /// UDP listen address for relayed sessions.
    #[arg(long, env = "STEELYARD_RELAY_UDP")]
    pub udp: Option<SocketAddr>,
    /// UDP listen address of the probe responder.
    #[arg(long, env = "STEELYARD_RELAY_PROBE")]
    pub probe: Option<SocketAddr>,
    /// Listen address of `/status` and `/metrics`.
    #[arg(long, env = "STEELYARD_RELAY_HTTP")]
    pub http: Option<SocketAddr>,
    /// Most sessions at once.
    #[arg(long, env = "STEELYARD_RELAY_MAX_SESSIONS")]
    pub max_sessions: Option<u32>,
    /// Seconds live sessions get to finish after SIGTERM.
    #[arg(long, env = "STEELYARD_RELAY_DRAIN_GRACE_SECS")]
    pub drain_grace_secs: Option<u64>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

fn effective_config(args: &RelayArgs) -> anyhow::Result<RelayConfig> {
    let mut cfg = match &args.config {
        Some(path) => RelayConfig::from_file(path)?,
        None => RelayConfig::default(),
    };
    if let Some(v) = &args.relay_id {
        cfg.relay_id = v.clone();
    }
    if !args.broker_keys.is_empty() {
        cfg.broker_keys = args.broker_keys.clone();
    }
    if let Some(v) = args.tcp {
        cfg.listen.tcp = v;
    }
    if args.udp.is_some() {
        cfg.listen.udp = args.udp;
    }
    if args.probe.is_some() {
        cfg.listen.probe = args.probe;
    }
    if args.http.is_some() {
        cfg.listen.http = args.http;
    }
    if let Some(v) = args.max_sessions {
        cfg.capacity.max_sessions = v;
    }
    if let Some(v) = args.drain_grace_secs {
        cfg.drain.grace_secs = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the relay until it is told to stop.
pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        println!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    if let Some(n) = steelyard_relay::server::raise_nofile_limit() {
        let _ = n;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let relay = Relay::bind(cfg).await?;
        let addrs = relay.addrs();
        // One line on stdout so scripts and tests can find the ports.
        println!(
            "relay listening tcp={} udp={} probe={} http={}",
            addrs.tcp,
            addrs.udp.map_or("-".into(), |a| a.to_string()),
            addrs.probe.map_or("-".into(), |a| a.to_string()),
            addrs.http.map_or("-".into(), |a| a.to_string()),
        );
        let handle = relay.handle();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            handle.drain();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            eprintln!("second signal: exiting without waiting for live sessions");
            std::process::exit(1);
        });
        relay.run().await?;
        anyhow::Ok(())
    })
}
