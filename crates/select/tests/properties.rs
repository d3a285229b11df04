//! Property tests: over random worlds, improving one metric of one candidate (all else equal) never
//! makes it rank lower; a full relay is never chosen; a decision is deterministic and its score
//! parts add up; a report read back from the selector's compact storage is what was sent, within
//! the stated tolerances.

use proptest::prelude::*;
use steelyard_select::{
    Capacity, Location, PathMetrics, PeerId, PeerReport, Policy, RelayId, RelayInfo, RelayLoad,
    Request, Selector, Timestamp,
};

const NOW: Timestamp = Timestamp::from_millis(1_700_000_000_000);

#[derive(Clone, Debug)]
struct RelayCase {
    capacity: u32,
    sessions: u32,
    cpu: f64,
    tier: u8,
    location: (f64, f64),
    a: PathCase,
    b: PathCase,
}

#[derive(Clone, Debug)]
struct PathCase {
    rtt_ms: f64,
    hops: u32,
    loss: f64,
    bandwidth_kbps: u64,
    age_secs: u64,
}

#[derive(Clone, Debug)]
struct World {
    relays: Vec<RelayCase>,
    a_at: (f64, f64),
    b_at: (f64, f64),
}

fn path_case() -> impl Strategy<Value = PathCase> {
    (
        0.0..200.0f64,
        0..30u32,
        0.0..0.2f64,
        100..1_000_000u64,
        0..400u64,
    )
        .prop_map(|(rtt_ms, hops, loss, bandwidth_kbps, age_secs)| PathCase {
            rtt_ms,
            hops,
            loss,
            bandwidth_kbps,
            age_secs,
        })
}

fn place() -> impl Strategy<Value = (f64, f64)> {
    (-60.0..60.0f64, -180.0..180.0f64)
}

fn relay_case() -> impl Strategy<Value = RelayCase> {
    (
        10..1000u32,
        0.0..1.1f64,
        0.0..0.99f64,
        0..2u8,
        place(),
        path_case(),
        path_case(),
    )
        .prop_map(|(capacity, used, cpu, tier, location, a, b)| RelayCase {
            capacity,
            sessions: (f64::from(capacity) * used) as u32,
            cpu,
            tier,
            location,
            a,
            b,
        })
}

fn world() -> impl Strategy<Value = World> {
    (prop::collection::vec(relay_case(), 2..8), place(), place())
        .prop_map(|(relays, a_at, b_at)| World { relays, a_at, b_at })
}

fn name(i: usize) -> String {
    format!("r{i}")
}

fn at((lat, lon): (f64, f64)) -> Location {
    Location {
        lat,
        lon,
        region: String::new(),
    }
}

fn metrics(p: &PathCase) -> PathMetrics {
    PathMetrics {
        rtt_ms: p.rtt_ms,
        hops: p.hops,
        loss: p.loss,
        bandwidth_kbps: Some(p.bandwidth_kbps),
        udp: true,
        tcp: true,
        measured_at: Timestamp::from_millis(NOW.millis() - p.age_secs * 1000),
    }
}

fn selector(w: &World) -> Selector {
    let mut s = Selector::new(Policy::default()).expect("default policy");
    for (i, r) in w.relays.iter().enumerate() {
        s.upsert_relay(RelayInfo {
            id: RelayId::new(name(i)),
            location: Some(at(r.location)),
            tier: r.tier,
            weight: 1.0,
            capacity: Capacity {
                max_sessions: r.capacity,
                max_bandwidth_kbps: 0,
            },
        })
        .expect("relay");
        let load = RelayLoad {
            sessions: r.sessions,
            bandwidth_kbps: 0,
            cpu: r.cpu,
            draining: false,
        };
        s.relay_report(&name(i), load, NOW).expect("load");
    }
    for (peer, place, leg) in [("a", w.a_at, 0), ("b", w.b_at, 1)] {
        let paths = w
            .relays
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let p = if leg == 0 { &r.a } else { &r.b };
                (RelayId::new(name(i)), metrics(p))
            })
            .collect();
        s.peer_report(PeerReport {
            peer: PeerId::new(peer),
            location: Some(at(place)),
            paths,
        })
        .expect("report");
    }
    s
}

/// The rank of relay `i` (0 = best), or `usize::MAX` when it is not a candidate.
fn rank(w: &World, i: usize) -> usize {
    match selector(w).decide(&Request::new("a", "b"), NOW) {
        Ok(d) => d.rank_of(&name(i)).unwrap_or(usize::MAX),
        Err(_) => usize::MAX,
    }
}

/// One way to make one relay better, all else equal.
#[derive(Clone, Copy, Debug)]
enum Improve {
    Rtt,
    Hops,
    Loss,
    Bandwidth,
    Sessions,
    Cpu,
    Freshness,
    Distance,
}

fn improve(w: &World, i: usize, how: Improve, leg_b: bool, factor: f64) -> World {
    let mut w = w.clone();
    let a_at = w.a_at;
    let r = &mut w.relays[i];
    let p = if leg_b { &mut r.b } else { &mut r.a };
    match how {
        Improve::Rtt => p.rtt_ms *= factor,
        Improve::Hops => p.hops = (f64::from(p.hops) * factor) as u32,
        Improve::Loss => p.loss *= factor,
        Improve::Bandwidth => {
            p.bandwidth_kbps = (p.bandwidth_kbps as f64 / factor.max(0.01)) as u64
        }
        Improve::Sessions => r.sessions = (f64::from(r.sessions) * factor) as u32,
        Improve::Cpu => r.cpu *= factor,
        Improve::Freshness => p.age_secs = (p.age_secs as f64 * factor) as u64,
        // By the triangle inequality no relay location gives a shorter A → relay → B than A's own.
        Improve::Distance => r.location = a_at,
    }
    w
}

fn improvement() -> impl Strategy<Value = Improve> {
    prop_oneof![
        Just(Improve::Rtt),
        Just(Improve::Hops),
        Just(Improve::Loss),
        Just(Improve::Bandwidth),
        Just(Improve::Sessions),
        Just(Improve::Cpu),
        Just(Improve::Freshness),
        Just(Improve::Distance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn improving_one_metric_never_ranks_a_candidate_lower(
        w in world(),
        pick in any::<prop::sample::Index>(),
        how in improvement(),
        leg_b in any::<bool>(),
        factor in 0.0..1.0f64,
    ) {
        let i = pick.index(w.relays.len());
        let before = rank(&w, i);
        let better = improve(&w, i, how, leg_b, factor);
        let after = rank(&better, i);
        prop_assert!(after <= before, "{how:?} of r{i}: rank {before} -> {after}");
    }

    #[test]
    fn a_full_relay_is_never_chosen_and_parts_add_up(w in world()) {
        let s = selector(&w);
        if let Ok(d) = s.decide(&Request::new("a", "b"), NOW) {
            let i: usize = d.winner.as_str()[1..].parse().expect("relay names are r<i>");
            let r = &w.relays[i];
            prop_assert!(r.sessions < r.capacity, "winner {} is full", d.winner);
            prop_assert!(r.cpu < s.policy().limits.max_cpu);
            prop_assert_eq!(&d.ranked[0].relay, &d.winner);
            for c in &d.ranked {
                let sum: f64 = c.score.named().iter().map(|(_, v)| v).sum();
                prop_assert!((sum / c.score.weight - c.score.total).abs() < 1e-6);
                prop_assert!(c.score.total.is_finite());
            }
            // Deterministic: the same state gives the same decision.
            prop_assert_eq!(s.decide(&Request::new("a", "b"), NOW).ok(), Some(d));
        }
    }

    /// The selector stores paths compactly (RTT, loss and distance as `f32`, bandwidth as `u32`,
    /// times relative to the report's newest). Read back: RTT and loss within 2^-24 relative
    /// (what `f32` rounding gives), hops, transports and times exact, bandwidth exact up to
    /// `u32::MAX - 1` kbit/s and saturated beyond.
    #[test]
    fn a_report_round_trips_through_storage(
        paths in prop::collection::vec(
            (
                prop_oneof![0.0..1e6f64, Just(0.0), 1e30..1e300f64],
                0..=255u32,
                0.0..=1.0f64,
                prop::option::of(prop_oneof![0..10_000_000u64, any::<u64>()]),
                any::<bool>(),
                any::<bool>(),
                0..30 * 86_400_000u64,
            ),
            0..60,
        ),
    ) {
        let mut s = Selector::new(Policy::default()).expect("default policy");
        let mut sent = Vec::new();
        for (i, (rtt_ms, hops, loss, bandwidth_kbps, udp, tcp, age)) in paths.into_iter().enumerate() {
            let id = RelayId::new(format!("r{i:03}"));
            s.upsert_relay(RelayInfo {
                id: id.clone(),
                location: None,
                tier: 0,
                weight: 1.0,
                capacity: Capacity { max_sessions: 10, max_bandwidth_kbps: 0 },
            })
            .expect("relay");
            let measured_at = Timestamp::from_millis(NOW.millis() - age);
            sent.push((id, PathMetrics { rtt_ms, hops, loss, bandwidth_kbps, udp, tcp, measured_at }));
        }
        let report = PeerReport { peer: PeerId::new("a"), location: Some(at((1.0, 2.0))), paths: sent };
        s.peer_report(report.clone()).expect("report");
        let back = s.peer_report_of("a").expect("stored");
        prop_assert_eq!(&back.peer, &report.peer);
        prop_assert_eq!(&back.location, &report.location);
        prop_assert_eq!(back.paths.len(), report.paths.len());
        let tolerance = f64::from(f32::EPSILON) / 2.0;
        for ((id, m), (id_back, b)) in report.paths.iter().zip(&back.paths) {
            prop_assert_eq!(id, id_back);
            let rtt = m.rtt_ms.min(f64::from(f32::MAX));
            prop_assert!((b.rtt_ms - rtt).abs() <= rtt * tolerance, "rtt {} -> {}", m.rtt_ms, b.rtt_ms);
            prop_assert!((b.loss - m.loss).abs() <= m.loss * tolerance, "loss {} -> {}", m.loss, b.loss);
            prop_assert_eq!(b.hops, m.hops);
            prop_assert_eq!((b.udp, b.tcp), (m.udp, m.tcp));
            prop_assert_eq!(b.measured_at, m.measured_at);
            prop_assert_eq!(b.bandwidth_kbps, m.bandwidth_kbps.map(|x| x.min(u64::from(u32::MAX) - 1)));
        }
    }
}
