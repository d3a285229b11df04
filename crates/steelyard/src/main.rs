//! `steelyard`: one thin binary with a subcommand per role. Each subcommand parses its flags and
//! hands over to a library crate; no logic lives here beyond wiring and printing.

mod agent;
mod broker;
mod connect;
mod demo;
mod logging;
mod measure;
mod relay;
mod scenario;

use clap::{Parser, Subcommand};

/// Steelyard: picks, for every new connection, the relay that should carry it, from the relays'
/// workload and the quality of the paths that lead to them.
#[derive(Debug, Parser)]
#[command(name = "steelyard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the real system on loopback (broker, three relays, two agents), explain the broker's
    /// decision, move data through a tunnel, stop the chosen relay and show the next decision.
    /// `--offline` / `--scenario FILE` run only the selection engine on a scenario.
    Demo(demo::DemoArgs),
    /// Start the demo's local system (broker, relays, agents) and keep it running; prints how to
    /// connect to it.
    Dev(demo::DevArgs),
    /// Run the broker: registry, reports, connection brokering with signed tickets.
    Broker(broker::BrokerArgs),
    /// Measure the paths from this machine to relays, once, as the agent does each cycle.
    Measure(measure::MeasureArgs),
    /// Run a relay: pair brokered sessions by ticket and forward their traffic.
    Relay(relay::RelayArgs),
    /// Run a peer's agent: broker channel, scheduled measurements, offers into local services.
    Agent(agent::AgentArgs),
    /// Listen locally and tunnel every connection to a service on another peer, through the
    /// running agent.
    Connect(connect::ConnectArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo(args) => demo::run(args),
        Command::Dev(args) => demo::dev(args),
        Command::Broker(args) => broker::run(args),
        Command::Measure(args) => measure::run(args),
        Command::Relay(args) => relay::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Connect(args) => connect::run(args),
    }
}
