//! One named test per required behaviour of DESIGN §5 (and the rules around them). Each test
//! sets up peers and relays that differ in one way and checks the decision follows.

mod common;

use common::*;
use steelyard_select::{
    EndToEnd, NoChoice, PathSource, PeerId, Pin, Policy, RejectReason, RelayId, RelayLoad, Request,
    Resource, Selector, Side, Timestamp, Transport, Why,
};

const RELAYS: [&str; 3] = ["r1", "r2", "r3"];

fn decide(s: &Selector) -> steelyard_select::Decision {
    s.decide(&Request::new("a", "b"), NOW).expect("a decision")
}

fn winner(s: &Selector) -> String {
    decide(s).winner.to_string()
}

// --- all else equal, the better metric wins -------------------------------------------------

#[test]
fn lower_rtt_wins() {
    let mut s = world(&RELAYS);
    tweak(&mut s, "b", "r2", |m| m.rtt_ms = 3.0);
    assert_eq!(winner(&s), "r2");
    tweak(&mut s, "a", "r3", |m| m.rtt_ms = 1.0);
    tweak(&mut s, "b", "r3", |m| m.rtt_ms = 1.0);
    assert_eq!(winner(&s), "r3");
}

#[test]
fn fewer_hops_wins() {
    let mut s = world(&RELAYS);
    tweak(&mut s, "a", "r3", |m| m.hops = 2);
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3");
    assert_eq!(d.chosen().path.hops, 2 + 4);
}

#[test]
fn less_loss_wins() {
    let mut s = world(&RELAYS);
    for r in RELAYS {
        tweak(&mut s, "a", r, |m| m.loss = 0.05);
    }
    tweak(&mut s, "b", "r1", |m| m.loss = 0.01);
    tweak(&mut s, "b", "r3", |m| m.loss = 0.02);
    tweak(&mut s, "a", "r2", |m| m.loss = 0.0);
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    // Loss compounds over the two legs: 1 - (1 - 0.05)(1 - 0.01).
    let r1 = &d.ranked[d.rank_of("r1").expect("r1 is a candidate")];
    assert!((r1.path.loss - 0.0595).abs() < 1e-9, "{}", r1.path.loss);
    assert_eq!(d.rank_of("r3"), Some(2));
}

#[test]
fn more_bandwidth_wins() {
    let mut s = world(&RELAYS);
    for r in RELAYS {
        tweak(&mut s, "a", r, |m| m.bandwidth_kbps = Some(5_000));
    }
    tweak(&mut s, "a", "r1", |m| m.bandwidth_kbps = Some(50_000));
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r1");
    // Bandwidth of the path is the smaller leg.
    assert_eq!(d.chosen().path.bandwidth_kbps, Some(50_000));
}

#[test]
fn less_load_wins() {
    let mut s = world(&RELAYS);
    s.relay_report("r1", sessions(30), NOW).unwrap();
    s.relay_report("r2", sessions(10), NOW).unwrap();
    s.relay_report("r3", sessions(20), NOW).unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    let order: Vec<_> = d.ranked.iter().map(|c| c.relay.to_string()).collect();
    assert_eq!(order, ["r2", "r3", "r1"]);
}

#[test]
fn bandwidth_and_cpu_count_as_load() {
    let mut s = world(&RELAYS);
    let mut info = relay("r1", 100);
    info.capacity.max_bandwidth_kbps = 1_000_000;
    s.upsert_relay(info).unwrap();
    s.relay_report(
        "r1",
        RelayLoad {
            bandwidth_kbps: 800_000,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    s.relay_report(
        "r2",
        RelayLoad {
            cpu: 0.5,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3");
    let r1 = &d.ranked[d.rank_of("r1").unwrap()].load;
    assert_eq!(r1.bound_by, Resource::Bandwidth);
    assert!((r1.utilisation - 0.8).abs() < 1e-9);
    assert_eq!(
        d.ranked[d.rank_of("r2").unwrap()].load.bound_by,
        Resource::Cpu
    );
}

#[test]
fn shorter_distance_wins() {
    let mut s = world(&RELAYS);
    locate(&mut s, "a", loc(48.85, 2.35, "eu")); // Paris
    locate(&mut s, "b", loc(52.52, 13.40, "eu")); // Berlin
    for (id, l) in [
        ("r1", loc(40.71, -74.0, "us")),  // New York
        ("r2", loc(50.11, 8.68, "eu")),   // Frankfurt
        ("r3", loc(35.68, 139.69, "ap")), // Tokyo
    ] {
        let mut info = relay(id, 100);
        info.location = Some(l);
        s.upsert_relay(info).unwrap();
    }
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    let km = d.chosen().path.distance_km.expect("all locations known");
    assert!(
        (900.0..1100.0).contains(&km),
        "Paris-Frankfurt-Berlin is ~1000 km, got {km}"
    );
    assert_eq!(d.rank_of("r3"), Some(2));
}

// --- load near capacity ----------------------------------------------------------------------

#[test]
fn load_penalty_grows_steeply_near_capacity() {
    let mut s = world(&["r1"]);
    let penalty_at = |s: &mut Selector, n: u32| {
        s.relay_report("r1", sessions(n), NOW).unwrap();
        decide(s).chosen().score.load
    };
    let p10 = penalty_at(&mut s, 10);
    let p20 = penalty_at(&mut s, 20);
    let p80 = penalty_at(&mut s, 80);
    let p90 = penalty_at(&mut s, 90);
    let p99 = penalty_at(&mut s, 99);
    // The step from 80 % to 90 % costs far more than the step from 10 % to 20 %.
    assert!(p90 - p80 > 10.0 * (p20 - p10), "{p10} {p20} {p80} {p90}");
    assert!(p99 > 50.0 * p20, "{p99} vs {p20}");
}

#[test]
fn full_relay_is_never_chosen() {
    let mut s = world(&RELAYS);
    // r1 has by far the best path but no free slot.
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 0.1);
    tweak(&mut s, "b", "r1", |m| m.rtt_ms = 0.1);
    s.relay_report("r1", sessions(100), NOW).unwrap();
    let d = decide(&s);
    assert_ne!(d.winner.as_str(), "r1");
    assert!(d.rejected.iter().any(|r| r.relay.as_str() == "r1"
        && r.reason
            == RejectReason::Full {
                resource: Resource::Sessions
            }));

    // One slot left: usable, but only by one more session (counting the pending assignment).
    let mut s = world(&["r1"]);
    s.relay_report("r1", sessions(99), NOW).unwrap();
    assert_eq!(winner(&s), "r1");
    s.record_assignment("r1", NOW).unwrap();
    let err = s.decide(&Request::new("a", "b"), NOW).unwrap_err();
    assert!(matches!(err, NoChoice::NoUsableRelay { .. }), "{err}");
}

#[test]
fn relay_over_cpu_or_bandwidth_limit_is_full() {
    let mut s = world(&RELAYS);
    s.relay_report(
        "r1",
        RelayLoad {
            cpu: 0.97,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    let mut info = relay("r2", 100);
    info.capacity.max_bandwidth_kbps = 1_000;
    s.upsert_relay(info).unwrap();
    s.relay_report(
        "r2",
        RelayLoad {
            bandwidth_kbps: 1_000,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3");
    let reason = |id: &str| {
        d.rejected
            .iter()
            .find(|r| r.relay.as_str() == id)
            .unwrap()
            .reason
            .clone()
    };
    assert_eq!(
        reason("r1"),
        RejectReason::Full {
            resource: Resource::Cpu
        }
    );
    assert_eq!(
        reason("r2"),
        RejectReason::Full {
            resource: Resource::Bandwidth
        }
    );
}

// --- herding ---------------------------------------------------------------------------------

/// 1,000 decisions with no load report in between, over five relays equal but for capacity:
/// sessions land in proportion to capacity (max/mean of sessions per capacity ≤ 1.2).
#[test]
fn burst_spreads_in_proportion_to_capacity_without_herding() {
    let ids = ["r1", "r2", "r3", "r4", "r5"];
    let caps = [100u32, 200, 300, 400, 600];
    let mut s = world(&ids);
    for (id, cap) in ids.iter().zip(caps) {
        s.upsert_relay(relay(id, cap)).unwrap();
    }
    let mut counts = [0u32; 5];
    for i in 0..1000u64 {
        let now = NOW.plus_ms(i); // one second of connects: inside one report interval
        let d = s.decide(&Request::new("a", "b"), now).expect("a relay");
        s.record_assignment(d.winner.as_str(), now).unwrap();
        let at = ids.iter().position(|r| *r == d.winner.as_str()).unwrap();
        counts[at] += 1;
    }
    let per_capacity: Vec<f64> = counts
        .iter()
        .zip(caps)
        .map(|(n, cap)| f64::from(*n) / f64::from(cap))
        .collect();
    let mean = per_capacity.iter().sum::<f64>() / 5.0;
    let max = per_capacity.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "sessions per relay {counts:?}, max/mean per capacity {:.3}",
        max / mean
    );
    assert!(
        max / mean <= 1.2,
        "counts {counts:?}, max/mean {}",
        max / mean
    );
    assert!(
        per_capacity.iter().all(|x| *x > 0.0),
        "every relay got sessions: {counts:?}"
    );
}

#[test]
fn burst_spreads_over_near_equal_relays() {
    let mut s = world(&RELAYS);
    // r1 is 1 ms better than the others: it should get more, but not everything.
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 9.0);
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..60 {
        let now = NOW.plus_ms(i);
        let d = s.decide(&Request::new("a", "b"), now).unwrap();
        s.record_assignment(d.winner.as_str(), now).unwrap();
        *counts.entry(d.winner.to_string()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts["r1"] > counts["r2"] && counts["r1"] < 40,
        "{counts:?}"
    );
}

#[test]
fn pending_assignments_clear_when_the_relay_reports_them() {
    let mut s = world(&["r1"]);
    for _ in 0..10 {
        s.record_assignment("r1", NOW).unwrap();
    }
    assert_eq!(decide(&s).chosen().load.pending, 10);
    // A report inside the grace period may not include them yet: they stay pending.
    s.relay_report("r1", sessions(4), NOW.plus_ms(500)).unwrap();
    let d = s.decide(&Request::new("a", "b"), NOW.plus_ms(500)).unwrap();
    assert_eq!(d.chosen().load.pending, 10);
    // A later report includes them.
    let later = NOW.plus_ms(1500);
    s.relay_report("r1", sessions(10), later).unwrap();
    let d = s.decide(&Request::new("a", "b"), later).unwrap();
    assert_eq!((d.chosen().load.sessions, d.chosen().load.pending), (10, 0));
}

#[test]
fn pending_assignments_expire_on_their_own() {
    let mut s = world(&["r1"]);
    s.record_assignment("r1", NOW).unwrap();
    let expire = s.policy().freshness.pending_expire_ms;
    let later = NOW.plus_ms(expire);
    s.relay_report("r1", idle(), NOW).unwrap(); // keep the relay alive, inside the grace
    let d = s.decide(&Request::new("a", "b"), NOW).unwrap();
    assert_eq!(d.chosen().load.pending, 1);
    s.relay_report("r1", idle(), later.plus_ms(0).plus_ms(0))
        .unwrap();
    let d = s.decide(&Request::new("a", "b"), later).unwrap();
    assert_eq!(d.chosen().load.pending, 0);
}

// --- staleness -------------------------------------------------------------------------------

#[test]
fn stale_reports_count_less() {
    let mut s = world(&["r1", "r2"]);
    let fresh_secs = s.policy().freshness.path_fresh_secs;
    // Same figures, but r1's measurement by b is older than the fresh limit.
    tweak(&mut s, "b", "r1", |m| {
        m.measured_at = Timestamp::from_millis(NOW.millis() - (fresh_secs + 60) * 1000)
    });
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    let stale = &d.ranked[1];
    assert_eq!(stale.relay.as_str(), "r1");
    assert!(stale.score.staleness > 0.0);
    assert_eq!(d.ranked[0].score.staleness, 0.0);
    // Within the fresh limit, age costs nothing.
    tweak(&mut s, "b", "r1", |m| {
        m.measured_at = Timestamp::from_millis(NOW.millis() - (fresh_secs - 1) * 1000)
    });
    assert_eq!(
        decide(&s)
            .ranked
            .iter()
            .map(|c| c.score.staleness)
            .sum::<f64>(),
        0.0
    );
}

#[test]
fn expired_reports_leave_the_candidate_set() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0); // r1 would be best
    let expire = s.policy().freshness.path_expire_secs;
    tweak(&mut s, "a", "r1", |m| {
        m.measured_at = Timestamp::from_millis(NOW.millis() - (expire + 1) * 1000)
    });
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    assert!(matches!(
        d.rejected[0].reason,
        RejectReason::PathExpired { side: Side::A, .. }
    ));
}

#[test]
fn relay_that_stops_reporting_leaves_the_candidate_set() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0);
    let timeout_ms = s.policy().freshness.relay_timeout_secs * 1000;
    let later = NOW.plus_ms(timeout_ms + 1);
    s.relay_report("r2", idle(), later).unwrap(); // r2 keeps reporting, r1 does not
    let d = s.decide(&Request::new("a", "b"), later).unwrap();
    assert_eq!(d.winner.as_str(), "r2");
    assert_eq!(
        d.rejected[0].reason,
        RejectReason::Silent {
            age_ms: timeout_ms + 1
        }
    );
    // A relay that never reported is not a candidate either.
    s.upsert_relay(relay("r9", 100)).unwrap();
    report(
        &mut s,
        "a",
        vec![("r9".into(), path(1.0)), ("r2".into(), path(10.0))],
    );
    report(
        &mut s,
        "b",
        vec![("r9".into(), path(1.0)), ("r2".into(), path(10.0))],
    );
    let d = s.decide(&Request::new("a", "b"), later).unwrap();
    assert!(d
        .rejected
        .iter()
        .any(|r| r.reason == RejectReason::NeverReported));
}

#[test]
fn draining_relay_is_not_a_candidate() {
    let mut s = world(&RELAYS);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0);
    s.relay_report(
        "r1",
        RelayLoad {
            draining: true,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    let d = decide(&s);
    assert_ne!(d.winner.as_str(), "r1");
    assert!(d
        .rejected
        .iter()
        .any(|r| r.reason == RejectReason::Draining));
}

// --- hysteresis ------------------------------------------------------------------------------

#[test]
fn small_gain_does_not_move_a_live_session() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r2", |m| m.rtt_ms = 8.0); // r2 is 2 ms better: below both margins
    let mut req = Request::new("a", "b");
    req.current = Some(RelayId::new("r1"));
    let d = s.decide(&req, NOW).unwrap();
    assert_eq!(d.winner.as_str(), "r1");
    assert!(matches!(d.why, Why::KeptCurrent { ref best, .. } if best.as_str() == "r2"));
    // A new session takes the better relay.
    assert_eq!(winner(&s), "r2");
}

#[test]
fn large_gain_moves_a_live_session() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 80.0); // r1 became much worse
    let mut req = Request::new("a", "b");
    req.current = Some(RelayId::new("r1"));
    assert_eq!(s.decide(&req, NOW).unwrap().winner.as_str(), "r2");
}

#[test]
fn live_session_on_a_full_relay_already_holds_its_slot() {
    let mut s = world(&["r1", "r2"]);
    s.relay_report("r1", sessions(100), NOW).unwrap();
    let mut req = Request::new("a", "b");
    req.current = Some(RelayId::new("r1"));
    // The session is one of r1's 100: r1 stays a candidate for it, compared on the load of the
    // other 99 (as r2 is compared on its load without the session).
    let d = s.decide(&req, NOW).unwrap();
    let r1 = &d.ranked[d.rank_of("r1").expect("r1 is a candidate")];
    assert!(
        (r1.load.utilisation - 0.99).abs() < 1e-9,
        "{}",
        r1.load.utilisation
    );
    assert!(decide(&s).rank_of("r1").is_none());
}

// --- operator policy ---------------------------------------------------------------------------

#[test]
fn operator_weight_applies() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 5.0); // r1 better by 5 ms
    assert_eq!(winner(&s), "r1");
    let mut heavy = relay("r2", 100);
    heavy.weight = 2.0;
    s.upsert_relay(heavy).unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    assert_eq!(d.chosen().score.weight, 2.0);

    let mut bad = relay("r2", 100);
    bad.weight = 0.0;
    let err = s.upsert_relay(bad).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
}

#[test]
fn deny_and_allow_lists_apply() {
    let mut policy = Policy::default();
    policy.deny_relays.insert("r1".into());
    let mut s = world_with(policy.clone(), &RELAYS);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0);
    let d = decide(&s);
    assert_ne!(d.winner.as_str(), "r1");
    assert!(d
        .rejected
        .iter()
        .any(|r| r.relay.as_str() == "r1" && r.reason == RejectReason::Denied));

    policy.deny_relays.clear();
    policy.allow_relays.insert("r3".into());
    s.set_policy(policy).unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3");
    assert_eq!(d.ranked.len(), 1);
    assert_eq!(
        d.rejected
            .iter()
            .filter(|r| r.reason == RejectReason::NotAllowed)
            .count(),
        2
    );
}

#[test]
fn region_rules_allow_and_prefer() {
    use steelyard_select::policy::RegionRule;
    let mut s = world(&RELAYS);
    locate(&mut s, "a", loc(48.85, 2.35, "eu-west"));
    locate(&mut s, "b", loc(48.85, 2.35, "eu-west"));
    for (id, region) in [("r1", "us-east"), ("r2", "eu-central"), ("r3", "eu-west")] {
        let mut info = relay(id, 100);
        info.location = Some(loc(48.85, 2.35, region)); // same place: only the rule differs
        s.upsert_relay(info).unwrap();
    }
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0); // r1 has the best path
    tweak(&mut s, "a", "r2", |m| m.rtt_ms = 5.0); // r2 next
    let mut policy = Policy::default();
    policy.region_rules.push(RegionRule {
        peer_region: "eu-west".into(),
        allow_relay_regions: ["eu-west".to_string(), "eu-central".to_string()].into(),
        prefer_relay_regions: ["eu-west".to_string()].into(),
        outside_preferred_ms: 50.0,
    });
    s.set_policy(policy).unwrap();
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3", "{d}");
    assert!(matches!(
        &d.rejected[0].reason,
        RejectReason::RegionNotAllowed { relay_region, .. } if relay_region == "us-east"
    ));
    let r2 = &d.ranked[d.rank_of("r2").unwrap()];
    assert_eq!(
        r2.score.region, 100.0,
        "both sides prefer eu-west: 2 × 50 ms"
    );
}

#[test]
fn strict_tiers_use_backups_only_when_primaries_are_gone() {
    let mut s = world(&["r1", "r2"]);
    let mut backup = relay("r2", 100);
    backup.tier = 1;
    s.upsert_relay(backup).unwrap();
    tweak(&mut s, "a", "r2", |m| m.rtt_ms = 1.0); // the backup has the better path
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r1");
    assert_eq!(d.why, Why::LowerTier { tier: 0 });
    s.relay_report("r1", sessions(100), NOW).unwrap();
    assert_eq!(winner(&s), "r2");
    s.set_policy(Policy {
        strict_tiers: false,
        ..Policy::default()
    })
    .unwrap();
    s.relay_report("r1", idle(), NOW).unwrap();
    assert_eq!(winner(&s), "r2");
}

#[test]
fn per_peer_pins_apply() {
    let mut policy = Policy::default();
    policy.pins.insert(
        PeerId::new("b"),
        Pin {
            relay: "r3".into(),
            strict: false,
        },
    );
    let mut s = world_with(policy.clone(), &RELAYS);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 1.0);
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r3");
    assert_eq!(d.why, Why::Pinned { peer: "b".into() });
    // The pinned relay is full: a loose pin falls back to normal selection ...
    s.relay_report("r3", sessions(100), NOW).unwrap();
    assert_eq!(winner(&s), "r1");
    // ... a strict pin fails with the reason.
    policy.pins.get_mut("b").unwrap().strict = true;
    s.set_policy(policy).unwrap();
    let err = s.decide(&Request::new("a", "b"), NOW).unwrap_err();
    assert!(matches!(err, NoChoice::PinUnavailable { .. }));
    assert!(err.to_string().contains("full"), "{err}");
}

// --- explanations and errors -------------------------------------------------------------------

#[test]
fn every_decision_is_explained() {
    let mut s = world(&RELAYS);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 4.0);
    s.relay_report("r2", sessions(50), NOW).unwrap();
    s.relay_report("r3", sessions(100), NOW).unwrap();
    let d = decide(&s);
    assert_eq!(d.ranked.len(), 2);
    assert_eq!(d.rejected.len(), 1);
    for c in &d.ranked {
        let parts: f64 = c.score.named().iter().map(|(_, v)| v).sum();
        assert!((parts / c.score.weight - c.score.total).abs() < 1e-9);
    }
    let Why::BestScore {
        runner_up,
        margin_ms,
        differences,
    } = &d.why
    else {
        panic!("expected BestScore, got {:?}", d.why)
    };
    assert_eq!(runner_up.as_str(), "r2");
    assert!((margin_ms - (d.ranked[1].score.total - d.ranked[0].score.total)).abs() < 1e-9);
    // The largest difference is load (r2 at 50 %: 20 ms), then RTT (6 ms).
    assert_eq!(differences[0].0, "load");
    assert!((differences[0].1 + 20.0).abs() < 1e-9, "{differences:?}");
    assert_eq!(differences[1], ("rtt".to_string(), -6.0));

    let table = d.to_string();
    for needle in [
        "r1",
        "r2",
        "r3",
        "won on load by 20.0 ms",
        "full (Sessions)",
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["winner"], "r1");
    assert_eq!(json["ranked"][0]["score"]["load"], 0.0);
}

#[test]
fn no_common_relay_says_which_side_reaches_what() {
    let mut s = world(&RELAYS);
    report(&mut s, "a", vec![("r1".into(), path(5.0))]);
    report(
        &mut s,
        "b",
        vec![("r2".into(), path(5.0)), ("r3".into(), path(5.0))],
    );
    let err = s.decide(&Request::new("a", "b"), NOW).unwrap_err();
    assert_eq!(
        err,
        NoChoice::NoCommonRelay {
            from: "a".into(),
            to: "b".into(),
            transport: Transport::Tcp,
            from_reaches: vec!["r1".into()],
            to_reaches: vec!["r2".into(), "r3".into()],
        }
    );
    assert_eq!(
        err.to_string(),
        "no common relay: a reaches [r1] and b reaches [r2, r3] over tcp"
    );
}

#[test]
fn all_common_relays_unusable_is_a_clear_error() {
    let mut s = world(&["r1", "r2"]);
    s.relay_report("r1", sessions(100), NOW).unwrap();
    s.relay_report(
        "r2",
        RelayLoad {
            draining: true,
            ..RelayLoad::default()
        },
        NOW,
    )
    .unwrap();
    let err = s.decide(&Request::new("a", "b"), NOW).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no usable relay among the common ones: r1 (full (Sessions)); r2 (draining)"
    );
}

#[test]
fn unknown_or_same_peer_is_a_clear_error() {
    let s = world(&RELAYS);
    let err = s.decide(&Request::new("a", "zed"), NOW).unwrap_err();
    assert_eq!(err, NoChoice::UnknownPeer { peer: "zed".into() });
    assert!(err.to_string().contains("zed"));
    assert_eq!(
        s.decide(&Request::new("a", "a"), NOW).unwrap_err(),
        NoChoice::SamePeer { peer: "a".into() }
    );
}

#[test]
fn transport_reachability_is_per_protocol() {
    let mut s = world(&["r1", "r2"]);
    // b's network blocks UDP: it reaches r1 and r2 by TCP only; r1 is better.
    for r in ["r1", "r2"] {
        tweak(&mut s, "b", r, |m| m.udp = false);
    }
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 2.0);
    assert_eq!(winner(&s), "r1");
    let mut udp = Request::new("a", "b");
    udp.transport = Transport::Udp;
    let err = s.decide(&udp, NOW).unwrap_err();
    assert!(matches!(err, NoChoice::NoCommonRelay { ref to_reaches, .. } if to_reaches.is_empty()));
    // If only one relay is reached by UDP by both, a UDP session uses it.
    tweak(&mut s, "b", "r2", |m| m.udp = true);
    let d = s.decide(&udp, NOW).unwrap();
    assert_eq!(d.winner.as_str(), "r2");
    assert!(matches!(
        d.rejected[0].reason,
        RejectReason::NoTransport {
            side: Side::B,
            transport: Transport::Udp
        }
    ));
}

#[test]
fn fresh_end_to_end_metrics_win_over_the_estimate() {
    let mut s = world(&["r1", "r2"]);
    tweak(&mut s, "a", "r1", |m| m.rtt_ms = 5.0); // legs say r1 is better
    assert_eq!(winner(&s), "r1");
    let (a, b) = (PeerId::new("a"), PeerId::new("b"));
    let measured = EndToEnd {
        rtt_ms: 60.0, // ... but the tunnel through r1 measured much slower
        loss: 0.0,
        bandwidth_kbps: Some(100_000),
        measured_at: NOW,
    };
    s.end_to_end(&b, &a, &"r1".into(), measured.clone())
        .unwrap(); // pair order does not matter
    let d = decide(&s);
    assert_eq!(d.winner.as_str(), "r2");
    let r1 = &d.ranked[1];
    assert_eq!(
        (r1.path.source, r1.path.rtt_ms),
        (PathSource::EndToEnd, 60.0)
    );
    // Once stale, the end-to-end figure no longer counts.
    let old = s.policy().freshness.end_to_end_fresh_secs * 1000 + 1;
    s.end_to_end(
        &a,
        &b,
        &"r1".into(),
        EndToEnd {
            measured_at: Timestamp::from_millis(NOW.millis() - old),
            ..measured
        },
    )
    .unwrap();
    assert_eq!(winner(&s), "r1");
}

#[test]
fn end_to_end_goodput_is_a_floor_for_the_bandwidth_not_a_ceiling() {
    let mut s = world(&["r1", "r2"]);
    let (a, b) = (PeerId::new("a"), PeerId::new("b"));
    // An idle or application-limited tunnel through r1 moved only 300 kbit/s; the legs were
    // measured at 100 Mbit/s. The slow tunnel says nothing about the path's capacity.
    let slow = EndToEnd {
        rtt_ms: 20.0,
        loss: 0.0,
        bandwidth_kbps: Some(300),
        measured_at: NOW,
    };
    s.end_to_end(&a, &b, &"r1".into(), slow.clone()).unwrap();
    let d = decide(&s);
    let r1 = &d.ranked[d.rank_of("r1").expect("r1 is a candidate")];
    assert_eq!(r1.path.source, PathSource::EndToEnd);
    assert_eq!(r1.path.bandwidth_kbps, Some(100_000));
    // A tunnel that moved more than the legs' estimate raises it.
    let fast = EndToEnd {
        bandwidth_kbps: Some(400_000),
        ..slow
    };
    s.end_to_end(&a, &b, &"r1".into(), fast).unwrap();
    let d = decide(&s);
    let r1 = &d.ranked[d.rank_of("r1").expect("r1 is a candidate")];
    assert_eq!(r1.path.bandwidth_kbps, Some(400_000));
}

#[test]
fn bad_reports_are_refused_with_the_field_named() {
    let mut s = world(&RELAYS);
    let mut bad = path(5.0);
    bad.loss = 1.5;
    let err = s
        .peer_report(steelyard_select::PeerReport {
            peer: "a".into(),
            location: None,
            paths: vec![("r1".into(), bad)],
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer a's path to r1: field `loss` is 1.5, expected a share in 0..=1"
    );
    // The previous report is kept.
    assert_eq!(s.peer_report_of("a").unwrap().paths.len(), 3);
    let err = s.relay_report("nope", idle(), NOW).unwrap_err();
    assert!(err.to_string().contains("not registered"));
}

#[test]
fn released_assignments_stop_counting() {
    let mut s = world(&["r1"]);
    let later = NOW.plus_ms(5);
    s.record_assignment("r1", NOW).unwrap();
    s.record_assignment("r1", later).unwrap();
    assert_eq!(decide(&s).chosen().load.pending, 2);
    // B refused the session assigned at `later`: it will never reach the relay.
    assert!(s.release_assignment("r1", later));
    assert_eq!(decide(&s).chosen().load.pending, 1);
    assert!(!s.release_assignment("r1", later), "already released");
    assert!(!s.release_assignment("nope", NOW));
    assert_eq!(s.peer_path_count("a"), Some(1));
    assert_eq!(s.peer_path_count("zed"), None);
}

/// Every way of having no choice serialises (the broker's explain API sends it as JSON) and
/// reads back.
#[test]
fn every_no_choice_serialises() {
    let mut s = world(&["r1"]);
    s.relay_report("r1", sessions(100), NOW).unwrap();
    let mut errors = vec![
        s.decide(&Request::new("a", "a"), NOW).unwrap_err(),
        s.decide(&Request::new("a", "zed"), NOW).unwrap_err(),
        s.decide(&Request::new("a", "b"), NOW).unwrap_err(),
    ];
    report(&mut s, "b", vec![]);
    errors.push(s.decide(&Request::new("a", "b"), NOW).unwrap_err());
    errors.push(NoChoice::PinUnavailable {
        peer: "a".into(),
        relay: "r1".into(),
        reason: "full".into(),
    });
    for err in errors {
        let json = serde_json::to_string(&err).unwrap_or_else(|e| panic!("{err:?}: {e}"));
        let back: NoChoice = serde_json::from_str(&json).unwrap();
        assert_eq!(back, err, "{json}");
    }
}
