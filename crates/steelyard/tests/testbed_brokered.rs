//! Selection proven end to end on a network that differs: everything through a real broker
//! process, three real relays reporting to it, the real agents alice (`pa`) and bob (`pb`) and
//! a `steelyard connect` listener on alice's side, each in its own network namespace. Every
//! scenario checks the broker's explained choice (`GET /v1/explain`) and that a real tunnel's
//! bytes show up on the counters (`/status`) of the relay the broker gave it, and on no other.
//!
//! * a relay behind two extra routers, on a 2 Mbit/s link, on a lossy path, behind 40 ms more
//!   RTT: the broker avoids it;
//! * the best relay at capacity: the next best wins, and wins back when it frees up;
//! * alice behind NAT; bob with UDP blocked (he reports the relays by TCP);
//! * the chosen relay killed, or silently cut off, mid-transfer: new connections go through
//!   another relay (the times are printed); the live tunnel closes (killed) or is stuck (cut
//!   off), which is today's behaviour until the agent daemon resumes tunnels.
//!
//! Needs root for namespaces: outside CI without root the tests say SKIPPED loudly; under CI
//! they fail instead. The direct measurement checks live in `testbed_paths.rs`.

mod testbed_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use steelyard_select::{Decision, RejectReason, Resource};
use steelyard_testbed::LinkSpec;
use testbed_support::{fnv, pattern, topology, Fabric, Shape, FNV_START, RELAYS};

const MIB: usize = 1 << 20;

/// The broker's choice avoids `loser`: another relay wins and `loser` ranks last or is no
/// candidate at all.
fn assert_avoids(d: &Decision, loser: &str) {
    assert_ne!(d.winner.as_str(), loser, "{d}");
    let rejected = d.rejected.iter().any(|r| r.relay.as_str() == loser);
    assert!(
        rejected || d.rank_of(loser) == Some(d.ranked.len() - 1),
        "{loser} should rank last: {d}"
    );
}

/// A candidate's estimated path A → relay → B in a decision.
fn path<'a>(d: &'a Decision, relay: &str) -> &'a steelyard_select::PathEstimate {
    &d.ranked
        .iter()
        .find(|c| c.relay.as_str() == relay)
        .unwrap_or_else(|| panic!("{relay} is no candidate: {d}"))
        .path
}

/// The common part of the four path scenarios: the broker's view of the paths passes `check`
/// (the figures the agents reported, summed over both legs), it avoids `loser`, and two
/// tunnels in a row go through the relay the broker gave them, which is never `loser`.
fn broker_avoids(
    test: &str,
    handicap: impl Fn(usize) -> (LinkSpec, usize) + 'static,
    loser: &str,
    check: impl Fn(&Decision),
) {
    let started = Instant::now();
    let Some(net) = topology(test, &Shape::brokered(handicap)) else {
        return;
    };
    let f = Fabric::start(net, [100; RELAYS]);
    let d = f.explain().unwrap();
    println!("{d}");
    check(&d);
    assert_avoids(&d, loser);
    for _ in 0..2 {
        let relay = f.echo_through_one_relay(MIB);
        assert_ne!(
            relay, loser,
            "the tunnel went through the handicapped relay"
        );
    }
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn broker_avoids_the_relay_behind_two_extra_routers() {
    broker_avoids(
        "broker_avoids_the_relay_behind_two_extra_routers",
        |i| (LinkSpec::default(), if i == 2 { 2 } else { 0 }),
        "r2",
        |d| {
            // Each peer is one router (the core) from r0 and r1, three from r2.
            assert_eq!(path(d, "r0").hops, 2, "{d}");
            assert_eq!(path(d, "r1").hops, 2, "{d}");
            assert_eq!(path(d, "r2").hops, 6, "{d}");
        },
    );
}

#[test]
fn broker_avoids_the_relay_on_a_slow_link() {
    broker_avoids(
        "broker_avoids_the_relay_on_a_slow_link",
        |i| {
            let spec = LinkSpec {
                bandwidth_kbit: (i == 1).then_some(2_000),
                ..LinkSpec::default()
            };
            (spec, 0)
        },
        "r1",
        |d| {
            // The smaller leg's bandwidth, within 30 % of the limit.
            let bw = path(d, "r1").bandwidth_kbps.expect("bandwidth measured");
            assert!((1_400..=2_600).contains(&bw), "r1 at {bw} kbit/s: {d}");
        },
    );
}

#[test]
fn broker_avoids_the_relay_on_a_lossy_path() {
    // The agent sends 10 probes per relay and cycle, and the broker keeps only the latest
    // report: at 5 % (the direct test in testbed_paths.rs) a cycle sees no loss at all 60 % of
    // the time. 20 % each way (36 % per round trip) leaves a cycle without a lost probe on both
    // peers' paths with a chance of about 1 in 10,000.
    broker_avoids(
        "broker_avoids_the_relay_on_a_lossy_path",
        |i| {
            let spec = LinkSpec {
                loss_each_way: (i == 0).then_some(0.2),
                ..LinkSpec::default()
            };
            (spec, 0)
        },
        "r0",
        |d| {
            // Ranked or not (TCP may time out too), r0 is never seen loss-free.
            if d.rank_of("r0").is_some() {
                assert!(path(d, "r0").loss > 0.0, "{d}");
            }
            assert_eq!(path(d, "r1").loss, 0.0, "{d}");
        },
    );
}

#[test]
fn broker_avoids_the_relay_behind_a_delayed_path() {
    broker_avoids(
        "broker_avoids_the_relay_behind_a_delayed_path",
        |i| {
            let spec = LinkSpec {
                delay_ms_each_way: (i == 2).then_some(20),
                ..LinkSpec::default()
            };
            (spec, 0)
        },
        "r2",
        |d| {
            // 20 ms each way on both legs: 80 ms more; a floor only, the machine adds noise.
            let extra = path(d, "r2").rtt_ms - path(d, "r0").rtt_ms;
            assert!(extra >= 60.0, "r2 only {extra} ms slower: {d}");
        },
    );
}

/// Writes `len` bytes and reads them back, leaving the tunnel open.
fn roundtrip(s: &mut TcpStream, len: usize) {
    let data = pattern(len, 3);
    s.write_all(&data).unwrap();
    let mut back = vec![0u8; len];
    s.read_exact(&mut back).unwrap();
    assert!(back == data, "the held tunnel echoed other bytes");
}

#[test]
fn a_relay_at_capacity_yields_to_the_next_best_and_wins_back_when_free() {
    let started = Instant::now();
    let test = "a_relay_at_capacity_yields_to_the_next_best_and_wins_back_when_free";
    // r0 best (one session at most); r1 next, 20 ms more RTT (a margin no measurement noise on
    // a busy machine closes); r2 last, two extra routers and 2 Mbit/s.
    let shape = Shape::brokered(|i| {
        let spec = LinkSpec {
            delay_ms_each_way: (i == 1).then_some(10),
            bandwidth_kbit: (i == 2).then_some(2_000),
            ..LinkSpec::default()
        };
        (spec, if i == 2 { 2 } else { 0 })
    });
    let Some(net) = topology(test, &shape) else {
        return;
    };
    let f = Fabric::start(net, [1, 100, 100]);
    let d = f.explain().unwrap();
    assert_eq!(d.winner.as_str(), "r0", "{d}");
    assert_eq!(d.rank_of("r1"), Some(1), "{d}");

    // Hold one session on r0: it is full. Each tunnel moves 1 MiB each way, enough for the
    // agents to report an end-to-end goodput; through debug-built agents that figure is far
    // below the legs' measured bandwidth, and the broker must take it as a floor for the
    // bandwidth, not as the path's capacity, or r0 would lose on bandwidth instead of capacity.
    let before = f.all_relay_bytes();
    let mut held = f.tunnel();
    roundtrip(&mut held, MIB);
    assert_eq!(f.tunnel_relays(), ["r0"]);
    assert!(f.all_relay_bytes()[0] > before[0], "r0's counters moved");
    let d = f.wait_decision(Duration::from_secs(10), |d| {
        d.rejected.iter().any(|r| {
            r.relay.as_str() == "r0"
                && matches!(
                    r.reason,
                    RejectReason::Full {
                        resource: Resource::Sessions
                    }
                )
        })
    });
    assert_eq!(d.winner.as_str(), "r1", "the next best wins: {d}");
    println!("r0 full:\n{d}");
    for _ in 0..2 {
        assert_eq!(f.echo_through_one_relay(MIB), "r1");
    }
    roundtrip(&mut held, 1024); // still open, still on r0

    // Free it: new sessions return to r0 once its load report shows the slot free.
    drop(held);
    let freed = Instant::now();
    let d = f.wait_decision(Duration::from_secs(15), |d| d.winner.as_str() == "r0");
    eprintln!(
        "r0 won again {:.2} s after its session closed",
        freed.elapsed().as_secs_f64()
    );
    println!("r0 free:\n{d}");
    assert_eq!(f.echo_through_one_relay(MIB), "r0");
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

/// Packets counted by the rules of `chain` in `table` that jump to `target`, in `node`.
fn iptables_packets(
    f: &Fabric,
    node: steelyard_testbed::Node,
    table: &str,
    chain: &str,
    target: &str,
) -> u64 {
    let out = f
        .net
        .tb
        .run(
            node,
            "iptables",
            &["-t", table, "-L", chain, "-v", "-n", "-x"],
        )
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some(target))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_peer_behind_nat_reaches_its_relay_through_the_tunnel() {
    let started = Instant::now();
    let test = "a_peer_behind_nat_reaches_its_relay_through_the_tunnel";
    let shape = Shape {
        nat_a: true,
        ..Shape::brokered(|i| (LinkSpec::default(), if i == 2 { 2 } else { 0 }))
    };
    let Some(net) = topology(test, &shape) else {
        return;
    };
    let nat = net.nat.unwrap();
    let f = Fabric::start(net, [100; RELAYS]);
    let d = f.explain().unwrap();
    assert_avoids(&d, "r2");
    // Alice's path to each relay crosses the NAT router: one hop more than bob's.
    for c in &d.ranked {
        let extra = if c.relay.as_str() == "r2" { 2 } else { 0 };
        assert_eq!(c.path.hops, 3 + 2 * extra, "{d}");
    }
    let masqueraded = iptables_packets(&f, nat, "nat", "POSTROUTING", "MASQUERADE");
    assert!(masqueraded > 0, "nothing went through the NAT");
    let relay = f.echo_through_one_relay(MIB);
    assert_ne!(relay, "r2");
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_peer_with_udp_blocked_reports_by_tcp_and_gets_a_tcp_path() {
    let started = Instant::now();
    let test = "a_peer_with_udp_blocked_reports_by_tcp_and_gets_a_tcp_path";
    let shape = Shape {
        block_udp_b: true,
        ..Shape::brokered(|_| (LinkSpec::default(), 0))
    };
    let Some(net) = topology(test, &shape) else {
        return;
    };
    let pb = net.peers[1];
    // Fabric::start waits until bob's report covers all three relays: by TCP alone.
    let f = Fabric::start(net, [100; RELAYS]);
    let dropped = iptables_packets(&f, pb, "filter", "OUTPUT", "DROP");
    assert!(dropped > 0, "bob never tried UDP");
    let d = f.explain().unwrap();
    assert_eq!(d.ranked.len(), RELAYS, "{d}");
    // Over UDP, alice reaches every relay and bob none.
    let (status, body) = f.broker_http("/v1/explain?from=alice&to=bob&transport=udp");
    assert_eq!(status, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "no_common_relay", "{body}");
    assert_eq!(
        v["detail"]["from_reaches"],
        json!(["r0", "r1", "r2"]),
        "{body}"
    );
    assert_eq!(v["detail"]["to_reaches"], json!([]), "{body}");
    f.echo_through_one_relay(MIB);
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
}

/// What the live tunnel did after its relay was cut off, as the client saw it.
struct LiveOutcome {
    /// Bytes echoed back.
    received: u64,
    /// Bytes the pattern has.
    total: u64,
    /// Whether what came back matches the pattern's checksum in full.
    complete: bool,
    /// How the read side ended: `Ok` at end of stream, or the error.
    end: std::io::Result<()>,
    /// Seconds from the cut to the end of the read side.
    after_kill: f64,
    /// Longest wait between two reads after the cut, seconds: the outage the user saw.
    stall: f64,
    /// The read side had not ended [`LIVE_DEADLINE`] after the cut (the test then shut it).
    stuck: bool,
}

/// How long after the cut the live transfer may take to finish (it resumes within seconds and
/// then moves a few MiB; the bound is for a loaded machine).
const LIVE_DEADLINE: Duration = Duration::from_secs(45);

/// What a user wants when a live tunnel's relay dies, by a crash or by going silent: the
/// transfer continues through another relay and completes, every byte once, in order (the
/// checksum), and alice's agent says where it moved.
fn assert_live_tunnel_resumed_through_another_relay(o: &LiveOutcome, alice_log: &str) {
    assert!(
        !o.stuck,
        "the live tunnel did not finish within {LIVE_DEADLINE:?} of the cut ({} of {} bytes)",
        o.received, o.total
    );
    assert!(
        o.end.is_ok(),
        "the live tunnel ended with {:?} instead of completing",
        o.end
    );
    assert_eq!(o.received, o.total, "bytes echoed back");
    assert!(o.complete, "the echoed bytes differ from what was sent");
    let resumed: Vec<&str> = alice_log
        .lines()
        .filter(|l| l.contains("tunnel resumed"))
        .collect();
    assert!(
        resumed.len() == 1
            && resumed[0].contains("from_relay=r0")
            && !resumed[0].contains("to_relay=r0"),
        "alice's agent does not say the tunnel moved from r0 to another relay once:\n{alice_log}"
    );
    assert!(
        !alice_log.contains('\x1b'),
        "alice's agent log (a file) holds terminal colour codes"
    );
}

/// How a relay is cut off.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// SIGKILL: the kernel closes its connections (a crash).
    Kill,
    /// Every packet to and from it dropped: nobody is told (a dead link).
    Link,
}

/// Moves a paced transfer through a tunnel, cuts its relay off once 1 MiB has gone through it,
/// and measures how long until a new connection works through another relay. Returns the live
/// tunnel's outcome and alice's agent log.
fn failover(test: &str, cut: Cut) -> Option<(LiveOutcome, String)> {
    let started = Instant::now();
    // r0 clearly best, so the broker keeps choosing it until it learns it is gone (the worst
    // case); r1 next with 10 ms more RTT; r2 last, two extra routers and 2 Mbit/s.
    let shape = Shape::brokered(|i| {
        let spec = LinkSpec {
            delay_ms_each_way: (i == 1).then_some(5),
            bandwidth_kbit: (i == 2).then_some(2_000),
            ..LinkSpec::default()
        };
        (spec, if i == 2 { 2 } else { 0 })
    });
    let net = topology(test, &shape)?;
    let f = Fabric::start(net, [100; RELAYS]);
    let d = f.explain().unwrap();
    assert_eq!(d.winner.as_str(), "r0", "{d}");

    // A paced transfer (6 MiB at most ~12 MB/s) through a new tunnel, echoed back.
    let total = 6 * MIB;
    let before = f.all_relay_bytes();
    let live = f.tunnel();
    let control = live.try_clone().unwrap();
    let mut w = live.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let data = pattern(total, 11);
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk)?;
            std::thread::sleep(Duration::from_millis(5));
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let killed_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (mut live, killed_at, received) = (live, killed_at.clone(), received.clone());
        std::thread::spawn(move || {
            let mut h = FNV_START;
            let mut buf = vec![0u8; 64 * 1024];
            let mut stall = Duration::ZERO;
            let mut last = None;
            let end = loop {
                let r = live.read(&mut buf);
                // The longest wait for bytes from the cut on (the wait the cut interrupted
                // counts from the cut).
                if let Some(kill) = *killed_at.lock().unwrap() {
                    let from = last.map_or(kill, |l: Instant| l.max(kill));
                    stall = stall.max(from.elapsed());
                    last = Some(Instant::now());
                }
                match r {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        h = fnv(h, &buf[..n]);
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => break Err(e),
                }
            };
            let after_kill = killed_at
                .lock()
                .unwrap()
                .map_or(0.0, |t| t.elapsed().as_secs_f64());
            (h, end, after_kill, stall.as_secs_f64())
        })
    };
    // Which relay carries it, and kill that relay once 1 MiB has gone through it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let victim = loop {
        if let Some(r) = f.tunnel_relays().first() {
            break f.net.relay_index(r);
        }
        assert!(Instant::now() < deadline, "the tunnel never opened");
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim_id = f.net.relays[victim].id.clone();
    assert_eq!(victim_id, "r0", "the broker's choice carries the transfer");
    // Cut once data flows both ways: 1 MiB through the relay, 256 KiB echoed back.
    while f.relay_bytes(victim).unwrap() - before[victim] < MIB as u64
        || received.load(Ordering::Relaxed) < 256 * 1024
    {
        assert!(
            Instant::now() < deadline,
            "1 MiB through {victim_id} and 256 KiB back did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    match cut {
        Cut::Kill => f.kill_relay(victim),
        Cut::Link => f.cut_off_relay(victim),
    }
    let kill = Instant::now();
    *killed_at.lock().unwrap() = Some(kill);
    let at_kill = received.load(Ordering::Relaxed);

    // Meanwhile: when the broker stops offering the relay at all.
    let (failover, attempts, (dropped, d)) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let d = f.wait_decision(Duration::from_secs(30), |d| d.rank_of(&victim_id).is_none());
            (kill.elapsed(), d)
        });
        // New connections: retried until one goes through; each attempt is a tunnel of its own.
        let mut attempts = 0;
        let failover = loop {
            attempts += 1;
            let n = f.tunnel_relays().len();
            let mut s = f.tunnel();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if testbed_support::echo(&mut s, 64 * 1024, attempts).is_ok() {
                let relays = f.tunnel_relays();
                assert_ne!(relays[n], victim_id, "a tunnel through the cut-off relay");
                break kill.elapsed();
            }
            assert!(
                kill.elapsed() < Duration::from_secs(30),
                "no new tunnel worked within 30 s of cutting {victim_id} off ({cut:?}, \
                 {attempts} attempts)"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (failover, attempts, watcher.join().unwrap())
    });
    eprintln!(
        "failover ({cut:?}): {victim_id} cut off; the broker stopped offering it {:.0} ms later \
         ({}); a new tunnel (attempt {attempts}, 5 s each at most) worked {:.0} ms after the \
         cut; the broker now picks {}",
        dropped.as_secs_f64() * 1000.0,
        d.rejected
            .iter()
            .find(|r| r.relay.as_str() == victim_id)
            .map_or("no longer listed".to_string(), |r| r.reason.to_string()),
        failover.as_secs_f64() * 1000.0,
        d.winner
    );
    // The agent moves a new connection on to another relay by itself (a dead relay refuses, a
    // silent one misses the agent's relay_connect_ms): the first attempt works.
    assert_eq!(
        attempts, 1,
        "the first new connection after the cut failed; the agent left it to the client's timeout"
    );

    // A live tunnel still open LIVE_DEADLINE after the cut is stuck: end it here so the test
    // ends.
    while !reader.is_finished() && kill.elapsed() < LIVE_DEADLINE {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stuck = !reader.is_finished();
    let _ = control.shutdown(std::net::Shutdown::Both);
    let (h, end, after_kill, stall) = reader.join().unwrap();
    let _ = writer.join().unwrap();
    let outcome = LiveOutcome {
        received: received.load(Ordering::Relaxed),
        total: total as u64,
        complete: h == fnv(FNV_START, &pattern(total, 11)),
        end,
        after_kill,
        stall,
        stuck,
    };
    eprintln!(
        "live tunnel: {at_kill} bytes echoed at the cut, {} in all of {total}; its read side \
         ended {:.0} ms after the cut with {:?}{}; it stalled {:.0} ms at most",
        outcome.received,
        outcome.after_kill * 1000.0,
        outcome.end,
        if stuck {
            " (stuck: shut by the test)"
        } else {
            ""
        },
        outcome.stall * 1000.0
    );
    // And new tunnels go through the relay the broker gives them: its counters, no one else's
    // (checked once the live tunnel, which moves bytes through its new relay, is done).
    let relay = f.echo_through_one_relay(MIB);
    assert_ne!(relay, victim_id);
    let alice = f.net.log("alice");
    for line in alice
        .lines()
        .filter(|l| l.contains("tunnel ended") || l.contains("tunnel resumed"))
    {
        eprintln!("alice's agent: {line}");
    }
    eprintln!("{test}: {:.1} s", started.elapsed().as_secs_f64());
    Some((outcome, alice))
}

#[test]
fn a_relay_killed_mid_transfer_new_connections_fail_over() {
    let test = "a_relay_killed_mid_transfer_new_connections_fail_over";
    let Some((outcome, alice)) = failover(test, Cut::Kill) else {
        return;
    };
    assert_live_tunnel_resumed_through_another_relay(&outcome, &alice);
}

#[test]
fn a_relay_cut_off_mid_transfer_new_connections_fail_over() {
    let test = "a_relay_cut_off_mid_transfer_new_connections_fail_over";
    let Some((outcome, alice)) = failover(test, Cut::Link) else {
        return;
    };
    assert_live_tunnel_resumed_through_another_relay(&outcome, &alice);
}
