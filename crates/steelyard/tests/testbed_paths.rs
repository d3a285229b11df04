//! Selection proven on a network that differs (issue "network test bed"): two peers and three
//! real relays (`steelyard relay` processes) in network namespaces around a core router; one
//! relay is handicapped by extra routers, a slow link, loss or delay. Each peer measures the
//! relays with `steelyard measure` (the agent's measurement), the figures must match the
//! topology, and the selection engine fed with both peers' reports must not pick the
//! handicapped relay.
//!
//! Needs root for namespaces: outside CI without root the tests say SKIPPED loudly; under CI
//! they fail instead.

mod testbed_support;

use steelyard_select::{
    Capacity, Decision, PathMetrics, PeerId, PeerReport, Policy, RelayId, RelayInfo, RelayLoad,
    Request, Selector, Timestamp,
};
use steelyard_testbed::LinkSpec;
use testbed_support::{build, Net, BIN, RELAYS};

/// What `peer` measures towards every relay (`steelyard measure --json`).
fn measure(net: &Net, peer: usize, extra: &[&str]) -> Vec<(RelayId, PathMetrics)> {
    let mut args = vec!["measure".to_string(), "--json".to_string()];
    for r in &net.relays {
        args.push("--relay".into());
        args.push(format!("{}={}:7400,{}:7402", r.id, r.addr, r.addr));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = net.tb.run(net.peers[peer], BIN, &args).unwrap();
    serde_json::from_slice(&out.stdout).expect("measure prints JSON")
}

fn metrics<'a>(paths: &'a [(RelayId, PathMetrics)], relay: &str) -> &'a PathMetrics {
    &paths
        .iter()
        .find(|(id, _)| id.as_str() == relay)
        .unwrap_or_else(|| panic!("{relay} not reached: {paths:?}"))
        .1
}

/// The engine's decision for pa → pb over both peers' measurements, all relays idle and equal.
fn decide(net: &Net, a: Vec<(RelayId, PathMetrics)>, b: Vec<(RelayId, PathMetrics)>) -> Decision {
    let now = a
        .iter()
        .chain(&b)
        .map(|(_, m)| m.measured_at)
        .max()
        .unwrap_or(Timestamp::from_millis(0));
    let mut s = Selector::new(Policy::default()).unwrap();
    for r in &net.relays {
        let id = &r.id;
        s.upsert_relay(RelayInfo {
            id: RelayId::new(id),
            location: None,
            tier: 0,
            weight: 1.0,
            capacity: Capacity {
                max_sessions: 100,
                max_bandwidth_kbps: 0,
            },
        })
        .unwrap();
        s.relay_report(id, RelayLoad::default(), now).unwrap();
    }
    for (peer, paths) in [("pa", a), ("pb", b)] {
        s.peer_report(PeerReport {
            peer: PeerId::new(peer),
            location: None,
            paths,
        })
        .unwrap();
    }
    s.decide(&Request::new("pa", "pb"), now).unwrap()
}

/// Median round-trip time from `peer` to `relay` by `ping` (20 echoes, 20 ms apart).
fn ping_median_ms(net: &Net, peer: usize, relay: &str) -> f64 {
    let addr = net
        .relays
        .iter()
        .find(|r| r.id == relay)
        .expect("relay in topology")
        .addr
        .to_string();
    let out = net
        .tb
        .run(
            net.peers[peer],
            "ping",
            &["-n", "-c", "20", "-i", "0.02", "-W", "2", &addr],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(times.len() >= 15, "ping {addr} from peer {peer}: {text}");
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn assert_loses(d: &Decision, relay: &str) {
    assert_ne!(d.winner.as_str(), relay, "{d}");
    assert_eq!(d.rank_of(relay), Some(RELAYS - 1), "{d}");
}

#[test]
fn relay_behind_two_extra_routers_loses_on_hops() {
    let Some(net) = build("relay_behind_two_extra_routers_loses_on_hops", |i| {
        (LinkSpec::default(), if i == 2 { 2 } else { 0 })
    }) else {
        return;
    };
    let no_burst = ["--burst-packets", "0"];
    let (a, b) = (measure(&net, 0, &no_burst), measure(&net, 1, &no_burst));
    for paths in [&a, &b] {
        // peer -> core -> relay: one router; two more in front of r2.
        assert_eq!(metrics(paths, "r0").hops, 1);
        assert_eq!(metrics(paths, "r1").hops, 1);
        assert_eq!(metrics(paths, "r2").hops, 3);
    }
    let d = decide(&net, a, b);
    assert_loses(&d, "r2");
    println!("{d}");
}

#[test]
fn relay_on_a_slow_link_loses_on_bandwidth() {
    let Some(net) = build("relay_on_a_slow_link_loses_on_bandwidth", |i| {
        let spec = LinkSpec {
            bandwidth_kbit: (i == 1).then_some(2_000),
            ..LinkSpec::default()
        };
        (spec, 0)
    }) else {
        return;
    };
    let (a, b) = (measure(&net, 0, &[]), measure(&net, 1, &[]));
    for paths in [&a, &b] {
        let slow = metrics(paths, "r1")
            .bandwidth_kbps
            .expect("bandwidth measured");
        assert!(
            (1_400..=2_600).contains(&slow),
            "measured {slow} kbit/s on a 2000 kbit/s link (30 % allowed)"
        );
        for fast in ["r0", "r2"] {
            let bw = metrics(paths, fast)
                .bandwidth_kbps
                .expect("bandwidth measured");
            assert!(
                bw > 10 * slow,
                "{fast}: {bw} kbit/s vs the slow link's {slow}"
            );
        }
    }
    let d = decide(&net, a, b);
    assert_loses(&d, "r1");
    println!("{d}");
}

#[test]
fn relay_on_a_lossy_path_loses_on_loss() {
    // 5 % of round trips lost: each way drops 1 - sqrt(0.95).
    let each_way = 1.0 - 0.95f64.sqrt();
    let Some(net) = build("relay_on_a_lossy_path_loses_on_loss", move |i| {
        let spec = LinkSpec {
            loss_each_way: (i == 0).then_some(each_way),
            ..LinkSpec::default()
        };
        (spec, 0)
    }) else {
        return;
    };
    // 1,500 probes: the binomial standard deviation at 5 % is 0.56 points.
    let train = [
        "--burst-packets",
        "0",
        "--probes",
        "1500",
        "--spacing-ms",
        "1",
    ];
    let (a, b) = (measure(&net, 0, &train), measure(&net, 1, &train));
    for paths in [&a, &b] {
        let loss = metrics(paths, "r0").loss;
        assert!(
            (0.03..=0.07).contains(&loss),
            "measured loss {loss}, want 0.05 ± 0.02"
        );
        assert_eq!(metrics(paths, "r1").loss, 0.0);
    }
    let d = decide(&net, a, b);
    assert_loses(&d, "r0");
    println!("{d}");
}

#[test]
fn relay_behind_a_delayed_path_loses_on_rtt() {
    let Some(net) = build("relay_behind_a_delayed_path_loses_on_rtt", |i| {
        let spec = LinkSpec {
            delay_ms_each_way: (i == 2).then_some(20),
            ..LinkSpec::default()
        };
        (spec, 0)
    }) else {
        return;
    };
    let no_burst = ["--burst-packets", "0"];
    for peer in 0..2 {
        // The truth is what the network does, measured independently right after: the user-space
        // delay emulator adds its 40 ms and, on a loaded machine, a few more; never less. A
        // load spike can hit the agent's train and not the ping after it (once: 67 ms against
        // 40.7), so a disagreement is measured again, up to three times in all; an agent that
        // measures wrong disagrees every time.
        let mut attempts = Vec::new();
        for _ in 0..3 {
            let paths = measure(&net, peer, &no_burst);
            let extra = metrics(&paths, "r2").rtt_ms - metrics(&paths, "r0").rtt_ms;
            let truth = ping_median_ms(&net, peer, "r2") - ping_median_ms(&net, peer, "r0");
            assert!(
                truth >= 38.0,
                "the emulator added only {truth} ms, want ≥ 40"
            );
            attempts.push((extra, truth));
            if (extra - truth).abs() <= 5.0 {
                break;
            }
        }
        let (extra, truth) = *attempts.last().unwrap();
        assert!(
            (extra - truth).abs() <= 5.0,
            "peer {peer}: r2 measured slower by {attempts:?} ms (agent, ping) in three tries: \
             want within 5 ms of ping (last: {extra} vs {truth})"
        );
    }
    let (a, b) = (measure(&net, 0, &no_burst), measure(&net, 1, &no_burst));
    let d = decide(&net, a, b);
    assert_loses(&d, "r2");
    println!("{d}");
}
