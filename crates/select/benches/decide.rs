//! One decision over 10, 100 and 1,000 common candidates (each peer also reaches 10 % relays the
//! other does not), with locations, bandwidth and a varied load, so every score part is computed.
//!
//! Run: `cargo bench -p steelyard-select --bench decide` (or `bench/run selection`).

#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use steelyard_select::{
    Capacity, Location, PathMetrics, PeerId, PeerReport, Policy, RelayId, RelayInfo, RelayLoad,
    Request, Selector, Timestamp,
};

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

fn world(common: usize) -> Selector {
    let mut s = Selector::new(Policy::default()).expect("default policy");
    let extra = common / 10;
    let relay_name = |i: usize| RelayId::new(format!("relay-{i:05}"));
    for i in 0..common + 2 * extra {
        let id = relay_name(i);
        s.upsert_relay(RelayInfo {
            id: id.clone(),
            location: Some(Location {
                lat: (i % 90) as f64,
                lon: (i % 180) as f64,
                region: format!("region-{}", i % 7),
            }),
            tier: 0,
            weight: 1.0,
            capacity: Capacity {
                max_sessions: 10_000,
                max_bandwidth_kbps: 10_000_000,
            },
        })
        .expect("relay");
        let load = RelayLoad {
            sessions: (i * 37 % 5_000) as u32,
            bandwidth_kbps: (i * 7919 % 5_000_000) as u64,
            cpu: (i % 50) as f64 / 100.0,
            draining: false,
        };
        s.relay_report(id.as_str(), load, NOW).expect("load");
    }
    let path = |i: usize, salt: usize| PathMetrics {
        rtt_ms: ((i * 13 + salt) % 200) as f64 + 1.0,
        hops: ((i + salt) % 20) as u32,
        loss: ((i * 7 + salt) % 10) as f64 / 1000.0,
        bandwidth_kbps: Some(((i * 101 + salt) % 1000 + 1) as u64 * 1000),
        udp: true,
        tcp: true,
        measured_at: NOW,
    };
    let a_paths = (0..common + extra)
        .map(|i| (relay_name(i), path(i, 3)))
        .collect();
    let b_paths = (0..common)
        .chain(common + extra..common + 2 * extra)
        .map(|i| (relay_name(i), path(i, 11)))
        .collect();
    for (peer, paths, lat) in [("a", a_paths, 10.0), ("b", b_paths, 40.0)] {
        s.peer_report(PeerReport {
            peer: PeerId::new(peer),
            location: Some(Location {
                lat,
                lon: lat,
                region: "region-1".into(),
            }),
            paths,
        })
        .expect("report");
    }
    s
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    for common in [10usize, 100, 1_000] {
        let s = world(common);
        let request = Request::new("a", "b");
        let d = s.decide(&request, NOW).expect("a decision");
        assert_eq!(d.ranked.len(), common);
        group.bench_with_input(BenchmarkId::from_parameter(common), &s, |b, s| {
            b.iter(|| s.decide(black_box(&request), NOW).expect("a decision"))
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
