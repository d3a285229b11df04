//! The agent's TTL scan (`IP_RECVERR`) against a real relay behind real routers: a peer and a
//! `steelyard relay` in network namespaces with two routers between them. `steelyard measure
//! --ttl-scan` counts the hops from the scan alone; it must agree with the hop count from the
//! TTL the relay observed, and with the topology.
//!
//! Needs root for namespaces: outside CI without root the test says SKIPPED loudly; under CI it
//! fails instead.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use steelyard_proto::ticket::TicketSigner;
use steelyard_select::{PathMetrics, RelayId};
use steelyard_testbed::{LinkSpec, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_steelyard");

#[test]
fn ttl_scan_counts_the_routers_to_the_relay() {
    let test = "ttl_scan_counts_the_routers_to_the_relay";
    let Some(mut tb) = Testbed::new_or_skip(test).unwrap_or_else(|e| panic!("{e}")) else {
        return;
    };
    let peer = tb.host("p").unwrap();
    let r1 = tb.router("x1").unwrap();
    let r2 = tb.router("x2").unwrap();
    let relay = tb.host("r").unwrap();
    tb.link(peer, r1, LinkSpec::default()).unwrap();
    tb.link(r1, r2, LinkSpec::default()).unwrap();
    let link = tb.link(r2, relay, LinkSpec::default()).unwrap();
    tb.route().unwrap();
    let broker_key =
        steelyard_proto::hex::encode(TicketSigner::from_seed([9; 32]).public_key().as_bytes());
    let mut cmd = tb.command(relay, BIN);
    cmd.args([
        "relay",
        "--relay-id",
        "r",
        "--broker-key",
        &broker_key,
        "--tcp",
        "0.0.0.0:7400",
        "--probe",
        "0.0.0.0:7402",
        "--http",
        "127.0.0.1:7480",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("relay listening"), "relay said {line:?}");
    tb.adopt(child);

    let target = format!("r={0}:7400,{0}:7402", link.b_addr);
    let measure = |extra: &[&str]| -> PathMetrics {
        let mut args = vec![
            "measure",
            "--json",
            "--burst-packets",
            "0",
            "--relay",
            &target,
        ];
        args.extend_from_slice(extra);
        let out = tb.run(peer, BIN, &args).unwrap();
        let paths: Vec<(RelayId, PathMetrics)> =
            serde_json::from_slice(&out.stdout).expect("measure prints JSON");
        paths
            .into_iter()
            .find(|(id, _)| id.as_str() == "r")
            .unwrap_or_else(|| panic!("the relay was not reached: {out:?}"))
            .1
    };
    let t0 = std::time::Instant::now();
    let observed = measure(&[]);
    let t1 = std::time::Instant::now();
    let scanned = measure(&["--ttl-scan"]);
    let (plain, with_scan) = (t1 - t0, t1.elapsed());
    // peer -> x1 -> x2 -> relay: two routers.
    assert_eq!(observed.hops, 2, "{observed:?}");
    assert_eq!(scanned.hops, 2, "{scanned:?}");
    println!(
        "hops: {} from the observed TTL ({plain:?}), {} from the TTL scan ({with_scan:?}; the scan \
         ends early once the routers' time-exceeded errors for the lower TTLs are in)",
        observed.hops, scanned.hops
    );
}
