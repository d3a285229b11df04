//! `steelyard demo`: the main job on loopback, in one command, with embedded defaults. It starts
//! the real system as child processes of this binary (a broker, three relays, two agents), prints
//! the broker's explained decision, moves data through a tunnel, stops the chosen relay and shows
//! the next decision, the live tunnel resuming on another relay without losing a byte, and a new
//! tunnel through the new winner; then it tears everything down.
//!
//! `steelyard demo --offline` (or `--scenario FILE`) runs only the selection engine on a
//! scenario, without processes ([`offline`]). `steelyard dev` starts the same local system as the
//! demo and keeps it running ([`live::dev`]).

mod live;
mod offline;

use std::path::PathBuf;

use anyhow::Result;
use steelyard_select::Transport;

pub use live::DevArgs;

/// Flags of `steelyard demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// MiB to move through the tunnel (end-to-end demo).
    #[arg(long, default_value_t = 64)]
    mib: u64,
    /// Run only the selection engine on the built-in scenario, without starting processes.
    #[arg(long)]
    offline: bool,
    /// Run only the selection engine on this scenario file (TOML); implies `--offline`.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Offline only: the initiating peer (default: the scenario's first peer).
    #[arg(long)]
    from: Option<String>,
    /// Offline only: the peer asked for (default: the scenario's second peer).
    #[arg(long)]
    to: Option<String>,
    /// Offline only: the transport the session needs.
    #[arg(long, default_value = "tcp", value_parser = parse_transport)]
    transport: Transport,
    /// Offline only: connects in the burst.
    #[arg(long, default_value_t = 500)]
    burst: u32,
    /// Offline only: print the first decision as JSON (as the broker's explain API does) and
    /// stop. Implies `--offline`.
    #[arg(long)]
    json: bool,
}

fn parse_transport(s: &str) -> Result<Transport, String> {
    match s {
        "tcp" => Ok(Transport::Tcp),
        "udp" => Ok(Transport::Udp),
        other => Err(format!("unknown transport {other:?}: use tcp or udp")),
    }
}

/// Runs the demo: end to end with real processes, or the engine alone with `--offline`.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.offline || args.scenario.is_some() || args.json {
        offline::run(args)
    } else {
        live::demo(args.mib)
    }
}

/// Runs `steelyard dev`: the demo's local system, kept running until Ctrl-C.
pub fn dev(args: DevArgs) -> Result<()> {
    live::dev(args)
}
