//! `steelyard measure`: measures paths to relays from this machine, once, the way the agent does
//! each report cycle (probe train, TCP connect, bandwidth burst), and prints what it would report.
//! For operators checking a machine's view of the relays, and for the network test bed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use steelyard_agent::measure::{measure_all, MeasureConfig, RelayTarget, TtlScan};
use steelyard_select::RelayId;

/// Flags of `steelyard measure`.
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// A relay to measure: `ID=TCP_ADDR[,PROBE_ADDR]` (e.g. `fra-1=192.0.2.7:7400,192.0.2.7:7402`);
    /// repeat for several.
    #[arg(long = "relay", required = true, value_parser = parse_target)]
    relays: Vec<RelayTarget>,
    /// Echo requests per probe train (more gives finer loss figures).
    #[arg(long, default_value_t = MeasureConfig::default().probes)]
    probes: u16,
    /// Milliseconds between two echo requests.
    #[arg(long, default_value_t = 20)]
    spacing_ms: u64,
    /// Packets in the bandwidth burst (0 skips the bandwidth measurement).
    #[arg(long, default_value_t = MeasureConfig::default().burst_packets)]
    burst_packets: u16,
    /// Count hops with a TTL scan only (one echo request per TTL, `IP_RECVERR`; Linux, IPv4),
    /// ignoring the TTL the relay observed; without it the scan runs only when the relay
    /// observed none.
    #[arg(long)]
    ttl_scan: bool,
    /// Print JSON (relay id and path metrics per reachable relay) instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_target(s: &str) -> Result<RelayTarget, String> {
    let err =
        || format!("{s:?} is not ID=TCP_ADDR[,PROBE_ADDR] (e.g. r1=10.0.0.1:7400,10.0.0.1:7402)");
    let (id, addrs) = s.split_once('=').ok_or_else(err)?;
    let mut parts = addrs.split(',');
    let tcp: SocketAddr = parts.next().ok_or_else(err)?.parse().map_err(|_| err())?;
    let probe = match parts.next() {
        Some(p) => Some(p.parse::<SocketAddr>().map_err(|_| err())?),
        None => None,
    };
    if id.is_empty() || parts.next().is_some() {
        return Err(err());
    }
    Ok(RelayTarget {
        id: RelayId::new(id),
        probe,
        tcp,
    })
}

/// Runs one measurement cycle and prints it.
pub fn run(args: MeasureArgs) -> Result<()> {
    let cfg = MeasureConfig {
        probes: args.probes,
        spacing: Duration::from_millis(args.spacing_ms),
        burst_packets: args.burst_packets,
        ttl_scan: if args.ttl_scan {
            TtlScan::Only
        } else {
            TtlScan::Fallback
        },
        ..MeasureConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime
        .block_on(measure_all(&args.relays, &cfg))
        .context("invalid measurement settings")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.paths)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>9} {:>5} {:>7} {:>10} {:>4} {:>4}",
        "relay", "rtt ms", "hops", "loss %", "bw Mbit/s", "udp", "tcp"
    );
    for (id, m) in &report.paths {
        let bw = m
            .bandwidth_kbps
            .map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1000.0));
        println!(
            "{:<16} {:>9.2} {:>5} {:>7.2} {:>10} {:>4} {:>4}",
            id.as_str(),
            m.rtt_ms,
            m.hops,
            m.loss * 100.0,
            bw,
            if m.udp { "yes" } else { "no" },
            if m.tcp { "yes" } else { "no" }
        );
    }
    for target in &args.relays {
        if !report.paths.iter().any(|(id, _)| id == &target.id) {
            println!("{:<16} unreachable over UDP and TCP", target.id.as_str());
        }
    }
    let t = report.traffic;
    eprintln!(
        "traffic: {} B sent, {} B received over UDP, {} TCP connects",
        t.udp_sent, t.udp_received, t.tcp_connects
    );
    if report.paths.is_empty() {
        bail!("no relay was reachable");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_the_format() {
        let t = parse_target("r1=127.0.0.1:7400,127.0.0.1:7402").unwrap();
        assert_eq!(t.id.as_str(), "r1");
        assert_eq!(t.probe, Some("127.0.0.1:7402".parse().unwrap()));
        assert_eq!(parse_target("r1=127.0.0.1:7400").unwrap().probe, None);
        for bad in [
            "r1",
            "=127.0.0.1:1",
            "r1=nope",
            "r1=127.0.0.1:1,x",
            "r1=1.1.1.1:1,1.1.1.1:2,3",
        ] {
            assert!(
                parse_target(bad).unwrap_err().contains("ID=TCP_ADDR"),
                "{bad}"
            );
        }
    }
}
