//! Builders shared by the selection tests: a world of peers and relays in a few lines.
#![allow(dead_code)]

use steelyard_select::{
    Capacity, Location, PathMetrics, PeerId, PeerReport, Policy, RelayId, RelayInfo, RelayLoad,
    Selector, Timestamp,
};

/// The "now" every test starts at.
pub const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

/// A healthy path measured at `NOW`.
pub fn path(rtt_ms: f64) -> PathMetrics {
    PathMetrics {
        rtt_ms,
        hops: 4,
        loss: 0.0,
        bandwidth_kbps: Some(100_000),
        udp: true,
        tcp: true,
        measured_at: NOW,
    }
}

/// A relay with `max_sessions` and no location.
pub fn relay(id: &str, max_sessions: u32) -> RelayInfo {
    RelayInfo {
        id: RelayId::new(id),
        location: None,
        tier: 0,
        weight: 1.0,
        capacity: Capacity {
            max_sessions,
            max_bandwidth_kbps: 0,
        },
    }
}

/// An idle load report.
pub fn idle() -> RelayLoad {
    RelayLoad::default()
}

/// A load report with `sessions` sessions.
pub fn sessions(n: u32) -> RelayLoad {
    RelayLoad {
        sessions: n,
        ..RelayLoad::default()
    }
}

pub fn loc(lat: f64, lon: f64, region: &str) -> Location {
    Location {
        lat,
        lon,
        region: region.to_string(),
    }
}

/// A selector with the default policy, the given relays (each reported idle at `NOW`), and peers
/// "a" and "b" that both reach every relay with a 10 ms path.
pub fn world(relays: &[&str]) -> Selector {
    world_with(Policy::default(), relays)
}

pub fn world_with(policy: Policy, relays: &[&str]) -> Selector {
    let mut s = Selector::new(policy).expect("valid policy");
    for id in relays {
        s.upsert_relay(relay(id, 100)).expect("relay");
        s.relay_report(id, idle(), NOW).expect("report");
    }
    let paths: Vec<_> = relays
        .iter()
        .map(|r| (RelayId::new(r), path(10.0)))
        .collect();
    report(&mut s, "a", paths.clone());
    report(&mut s, "b", paths);
    s
}

pub fn report(s: &mut Selector, peer: &str, paths: Vec<(RelayId, PathMetrics)>) {
    s.peer_report(PeerReport {
        peer: PeerId::new(peer),
        location: None,
        paths,
    })
    .expect("peer report");
}

/// Changes peer `peer`'s path to `relay` in place (the rest of its report stays).
pub fn tweak(s: &mut Selector, peer: &str, relay: &str, f: impl Fn(&mut PathMetrics)) {
    let mut r = s.peer_report_of(peer).expect("peer has reported");
    for (id, m) in &mut r.paths {
        if id.as_str() == relay {
            f(m);
        }
    }
    s.peer_report(r).expect("peer report");
}

/// Sets peer `peer`'s location (the rest of its report stays).
pub fn locate(s: &mut Selector, peer: &str, location: Location) {
    let mut r = s.peer_report_of(peer).expect("peer has reported");
    r.location = Some(location);
    s.peer_report(r).expect("peer report");
}
