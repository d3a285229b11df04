//! Benchmark helper: runs a relay from a TOML config file exactly as `steelyard relay` does
//! (default multi-thread tokio runtime, soft open-files limit raised to the hard limit), without
//! the `steelyard` binary's other subcommands. Prints the same "relay listening …" line.
//!
//! `relay_server CONFIG.toml`

use steelyard_relay::{Relay, RelayConfig};

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: relay_server CONFIG.toml");
        std::process::exit(2)
    });
    let cfg = RelayConfig::from_file(std::path::Path::new(&path)).unwrap_or_else(|e| {
        eprintln!("relay_server: {e}");
        std::process::exit(2)
    });
    let _ = steelyard_relay::server::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let relay = Relay::bind(cfg).await.expect("bind");
        let a = relay.addrs();
        println!(
            "relay listening tcp={} udp={}",
            a.tcp,
            a.udp.map_or("-".into(), |u| u.to_string())
        );
        relay.run().await.expect("run");
    });
}
