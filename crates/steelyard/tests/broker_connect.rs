//! Connect end to end against a real broker process: relays authenticate and stream load,
//! two agents report, A asks for B. The chosen relay is what the selection engine decides for
//! the same inputs, both tickets verify with the keys the broker publishes, B gets the offer
//! and its answer reaches A. Also: refusal, B offline, no common relay, explain, session end.

mod broker_support;

use broker_support::*;
use steelyard_proto::api::{
    AgentMessage, BrokerMessage, EndToEndReport, ErrorCode, LoadReport, OfferReply, PathReport,
    RelayMessage, SessionEnded,
};
use steelyard_proto::ticket::{Side, TicketVerifier};
use steelyard_select::{
    Capacity, PathMetrics, PeerReport, Policy, RelayInfo, RelayLoad, Request, Selector, Timestamp,
};

fn config(dir: &std::path::Path) -> String {
    let mut c = base_config(dir);
    for (i, id) in ["r1", "r2", "r3"].iter().enumerate() {
        c.push_str(&format!(
            "\n[[relays]]\nid = \"{id}\"\npublic_key = \"{}\"\ntcp_addr = \"127.0.0.1:{}\"\nmax_sessions = 100\n",
            key_hex(100 + i as u8),
            7001 + i
        ));
    }
    c
}

fn path(relay: &str, rtt: f64) -> PathReport {
    PathReport {
        relay: relay.into(),
        rtt_ms: rtt,
        hops: 4,
        loss: 0.0,
        bandwidth_kbps: Some(50_000),
        tcp: true,
        udp: true,
        age_ms: 0,
    }
}

fn loads() -> Vec<(&'static str, LoadReport)> {
    vec![
        (
            "r1",
            LoadReport {
                sessions: 85,
                pending: 5,
                cpu: 0.3,
                ..LoadReport::default()
            },
        ),
        (
            "r2",
            LoadReport {
                sessions: 10,
                cpu: 0.1,
                bandwidth_in_kbps: 100,
                ..LoadReport::default()
            },
        ),
        (
            "r3",
            LoadReport {
                sessions: 0,
                ..LoadReport::default()
            },
        ),
    ]
}

fn reports() -> Vec<(&'static str, Vec<PathReport>)> {
    vec![
        (
            "alice",
            vec![path("r1", 10.0), path("r2", 30.0), path("r3", 5.0)],
        ),
        ("bob", vec![path("r1", 10.0), path("r2", 30.0)]),
    ]
}

/// What the selection engine decides for the same inputs.
fn expected_winner() -> String {
    let now = Timestamp(1_000_000);
    let mut s = Selector::new(Policy::default()).unwrap();
    for id in ["r1", "r2", "r3"] {
        s.upsert_relay(RelayInfo {
            id: id.into(),
            location: None,
            tier: 0,
            weight: 1.0,
            capacity: Capacity {
                max_sessions: 100,
                max_bandwidth_kbps: 0,
            },
        })
        .unwrap();
    }
    for (id, l) in loads() {
        s.relay_report(
            id,
            RelayLoad {
                sessions: l.sessions + l.pending,
                bandwidth_kbps: l.bandwidth_in_kbps + l.bandwidth_out_kbps,
                cpu: l.cpu,
                draining: l.draining,
            },
            now,
        )
        .unwrap();
    }
    for (peer, paths) in reports() {
        s.peer_report(PeerReport {
            peer: peer.into(),
            location: None,
            paths: paths
                .into_iter()
                .map(|p| {
                    (
                        p.relay.as_str().into(),
                        PathMetrics {
                            rtt_ms: p.rtt_ms,
                            hops: p.hops,
                            loss: p.loss,
                            bandwidth_kbps: p.bandwidth_kbps,
                            udp: p.udp,
                            tcp: p.tcp,
                            measured_at: now,
                        },
                    )
                })
                .collect(),
        })
        .unwrap();
    }
    s.decide(&Request::new("alice", "bob"), now)
        .unwrap()
        .winner
        .to_string()
}

/// The relays of [`loads`] authenticated with their configured keys (100, 101, ...; not
/// enrolled), each having sent its load.
async fn relays_up(addr: std::net::SocketAddr) -> Vec<Ws> {
    let mut relays = Vec::new();
    for (i, (id, load)) in loads().into_iter().enumerate() {
        let (mut ws, v) = relay(addr, relay_hello(id, 100 + i as u8), &key(100 + i as u8)).await;
        let w = v.unwrap();
        assert!(!w.enrolled);
        send_json(&mut ws, &RelayMessage::Load(load)).await;
        relays.push(ws);
    }
    relays
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_end_to_end() {
    let dir = temp_dir("connect");
    let broker = BrokerProcess::start(&dir, &config(&dir));
    let addr = broker.addr;

    // Relays authenticate with their configured keys and stream load.
    let _relays = relays_up(addr).await;
    // A relay with the wrong key is refused.
    let (_, v) = relay(addr, relay_hello("r1", 100), &key(99)).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::AuthFailed);
    let (_, v) = relay(addr, relay_hello("r1", 99), &key(99)).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::AuthFailed);

    let (mut alice, v) = agent(addr, "alice", &key(1), Some(AGENT_TOKEN), false).await;
    let welcome = v.unwrap();
    let ids: Vec<_> = welcome.relays.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2", "r3"]);
    assert_eq!(
        welcome.relays[0].tcp_addr.as_deref(),
        Some("127.0.0.1:7001")
    );
    assert!(welcome.schedule.interval_ms > 0);
    let (mut bob, v) = agent(addr, "bob", &key(2), Some(AGENT_TOKEN), false).await;
    v.unwrap();

    // B is known but has not reported yet: no common relay, and the broker asks it to report.
    send_json(&mut alice, &agent_report(reports()[0].1.clone())).await;
    recv_where(&mut alice, |m| {
        matches!(m, BrokerMessage::ReportAccepted(r) if r.paths == 3).then_some(())
    })
    .await;
    send_connect(&mut alice, 1, "bob").await;
    let e = recv_error(&mut alice).await;
    assert_eq!((e.code, e.request_id), (ErrorCode::NoCommonRelay, Some(1)));
    recv_where(&mut bob, |m| {
        matches!(m, BrokerMessage::ReportNow(r) if r.reason == "connect").then_some(())
    })
    .await;

    report_paths(&mut bob, reports()[1].1.clone()).await;

    // Explain says what the engine says, and changes nothing.
    let expected = expected_winner();
    assert_eq!(
        expected, "r2",
        "the load feed must steer away from the lowest-RTT relay"
    );
    let (status, d) = admin_get_json(addr, "/v1/explain?from=alice&to=bob").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["winner"], expected);
    assert_eq!(d["ranked"].as_array().unwrap().len(), 2);
    assert!(d["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["relay"] == "r3"));

    // A asks for B; B (not auto-accepting) gets the offer and accepts; A gets its answer.
    send_connect(&mut alice, 2, "bob").await;
    let offer = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.clone()),
        _ => None,
    })
    .await;
    assert_eq!(offer.from, "alice");
    assert_eq!(offer.relay_id, expected);
    assert!(offer.reply_expected);
    assert_eq!(offer.relay_tcp_addr.as_deref(), Some("127.0.0.1:7002"));
    send_json(
        &mut bob,
        &AgentMessage::OfferReply(OfferReply {
            session_id: offer.session_id.clone(),
            accept: true,
            reason: None,
        }),
    )
    .await;
    let answer = recv_where(&mut alice, |m| match m {
        BrokerMessage::ConnectAnswer(a) => Some(a.clone()),
        _ => None,
    })
    .await;
    assert_eq!(answer.request_id, 2);
    assert_eq!(answer.relay_id, expected);
    assert_eq!(answer.session_id, offer.session_id);

    // Both tickets verify at that relay with the published keys, and only there.
    let (_, keys) = http_json(addr, "GET", "/v1/keys", None, None).await;
    let verifier = TicketVerifier::new(keys["keys"].as_array().unwrap().iter().map(|k| {
        steelyard_proto::api::parse_public_key(k["public_key"].as_str().unwrap()).unwrap()
    }));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ta = verifier
        .verify(&hex_bytes(&answer.ticket), &expected, now)
        .unwrap();
    let tb = verifier
        .verify(&hex_bytes(&offer.ticket), &expected, now)
        .unwrap();
    assert_eq!((ta.side, ta.peer_id.as_str()), (Side::A, "alice"));
    assert_eq!((tb.side, tb.peer_id.as_str()), (Side::B, "bob"));
    assert_eq!(ta.session_id, tb.session_id);
    assert_eq!(ta.session_id.to_string(), answer.session_id);
    assert!(verifier
        .verify(&hex_bytes(&answer.ticket), "r1", now)
        .is_err());

    // Refusal reaches A with the reason.
    send_connect(&mut alice, 3, "bob").await;
    let offer2 = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.clone()),
        _ => None,
    })
    .await;
    send_json(
        &mut bob,
        &AgentMessage::OfferReply(OfferReply {
            session_id: offer2.session_id,
            accept: false,
            reason: Some("do not disturb".into()),
        }),
    )
    .await;
    let e = recv_error(&mut alice).await;
    assert_eq!((e.code, e.request_id), (ErrorCode::Refused, Some(3)));
    assert!(e.message.contains("do not disturb"), "{e}");

    // Session end with bytes and an end-to-end measurement shows in the history.
    send_json(
        &mut alice,
        &AgentMessage::SessionEnded(SessionEnded {
            session_id: answer.session_id.clone(),
            bytes_sent: 4096,
            bytes_received: 1024,
            end_to_end: Some(EndToEndReport {
                rtt_ms: 70.0,
                loss: 0.0,
                bandwidth_kbps: None,
                age_ms: 0,
            }),
        }),
    )
    .await;
    let mut found = false;
    for _ in 0..50 {
        let (_, s) = admin_get_json(addr, "/v1/admin/sessions?limit=10").await;
        if let Some(rec) = s["history"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == answer.session_id.as_str())
        {
            if rec["state"] == "ended" {
                assert_eq!(rec["bytes_a_to_b"], 4096);
                assert_eq!(rec["end_to_end_rtt_ms"], 70.0);
                assert_eq!(rec["relay"], expected);
                found = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(found, "the ended session reaches the history");
    let (_, d) = admin_get_json(addr, "/v1/explain?from=alice&to=bob").await;
    let r2 = d["ranked"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["relay"] == "r2")
        .unwrap()
        .clone();
    assert_eq!(r2["path"]["rtt_ms"], 70.0, "{r2}");

    // B offline.
    drop(bob);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    send_connect(&mut alice, 4, "bob").await;
    let e = recv_error(&mut alice).await;
    assert_eq!((e.code, e.request_id), (ErrorCode::PeerOffline, Some(4)));

    // Relays as the admin API shows them.
    let (_, r) = admin_get_json(addr, "/v1/admin/relays").await;
    let r1 = &r["relays"][0];
    assert_eq!(
        (
            r1["id"].as_str(),
            r1["online"].as_bool(),
            r1["healthy"].as_bool()
        ),
        (Some("r1"), Some(true), Some(true))
    );
    assert_eq!(r1["load"]["sessions"], 85);
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accept_answers_at_once_and_drain_moves_sessions() {
    let dir = temp_dir("auto");
    let broker = BrokerProcess::start(&dir, &config(&dir));
    let addr = broker.addr;
    let _relays = relays_up(addr).await;
    let (mut alice, v) = agent(addr, "alice", &key(1), Some(AGENT_TOKEN), false).await;
    v.unwrap();
    let (mut bob, v) = agent(addr, "bob", &key(2), Some(AGENT_TOKEN), true).await;
    v.unwrap();
    for (ws, (_, paths)) in [&mut alice, &mut bob].into_iter().zip(reports()) {
        report_paths(ws, paths).await;
    }
    let (status, _) = http(addr, "POST", "/v1/admin/relays/r2/drain", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    send_connect(&mut alice, 1, "bob").await;
    let answer = recv_answer(&mut alice).await;
    assert_eq!(answer.relay_id, "r1", "r2 is drained");
    let offer = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.clone()),
        _ => None,
    })
    .await;
    assert!(!offer.reply_expected);
    assert_eq!(offer.session_id, answer.session_id);
    let (status, _) = http(
        addr,
        "POST",
        "/v1/admin/relays/nope/drain",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 404);
    broker.stop();
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
