//! `steelyard relay`: runs a relay. Reads the TOML config, applies flag and environment
//! overrides, starts a tokio runtime and hands over to the `steelyard-relay` crate; drains
//! gracefully on SIGTERM or SIGINT (a second signal exits at once). With a broker URL it also
//! runs the broker link (load reports over the broker's WebSocket, and the broker's ticket keys
//! when none are pinned with `--broker-key`); without one the relay runs standalone.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use steelyard_relay::broker_link::BrokerLink;
use steelyard_relay::config::BrokerLinkConfig;
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
    /// Pins the keys: without any, a relay with --broker-url trusts the ticket keys the broker
    /// announces (tickets get `not_ready` until the first welcome).
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
    /// The broker's relay WebSocket (`ws://` or `wss://…/v1/relay`); sets up `[broker]`.
    #[arg(long, env = "STEELYARD_RELAY_BROKER_URL")]
    pub broker_url: Option<String>,
    /// File of the relay's Ed25519 identity (created, mode 0600, on first start).
    #[arg(long, env = "STEELYARD_RELAY_IDENTITY_KEY")]
    pub identity_key: Option<PathBuf>,
    /// A relay enrollment token, for a relay the broker does not know yet.
    #[arg(long, env = "STEELYARD_RELAY_ENROLL_TOKEN", hide_env_values = true)]
    pub enroll_token: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (wss only).
    #[arg(long, env = "STEELYARD_RELAY_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
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
    if let Some(url) = &args.broker_url {
        cfg.broker
            .get_or_insert_with(|| BrokerLinkConfig::new(url.clone()))
            .url = url.clone();
    }
    let broker_flags =
        args.identity_key.is_some() || args.enroll_token.is_some() || args.broker_ca.is_some();
    match cfg.broker.as_mut() {
        Some(b) => {
            if let Some(v) = &args.identity_key {
                b.identity_key_file = v.clone();
            }
            if args.enroll_token.is_some() {
                b.enroll_token = args.enroll_token.clone();
            }
            if args.broker_ca.is_some() {
                b.ca_cert = args.broker_ca.clone();
            }
        }
        None if broker_flags => anyhow::bail!(
            "--identity-key, --enroll-token and --broker-ca need a broker: give --broker-url \
             (STEELYARD_RELAY_BROKER_URL) or a [broker] section"
        ),
        None => {}
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Runs the relay until it is told to stop.
pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        let mut shown = cfg.clone();
        if let Some(t) = shown.broker.as_mut().and_then(|b| b.enroll_token.as_mut()) {
            *t = "***".into();
        }
        println!("{}", toml::to_string_pretty(&shown)?);
        return Ok(());
    }
    crate::logging::init();
    if let Some(n) = steelyard_relay::server::raise_nofile_limit() {
        let _ = n;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let relay = Relay::bind(cfg.clone()).await?;
        let addrs = relay.addrs();
        // The identity key is loaded before the ports are announced: a bad one stops here.
        let link = match &cfg.broker {
            Some(b) => {
                let link = BrokerLink::new(&cfg, &relay.handle(), addrs)
                    .context("cannot start the broker link")?;
                tracing::info!(url = %b.url, identity = %link.public_key_hex(), "reporting to the broker");
                Some(link.spawn())
            }
            None => None,
        };
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
        let result = relay.run().await;
        if let Some(link) = link {
            // A last report (draining) before the process exits.
            link.shutdown(std::time::Duration::from_secs(2)).await;
        }
        result?;
        anyhow::Ok(())
    })
}
