//! Sans-I/O tests of the broker core on a virtual clock: enrollment and authentication rules,
//! reports, connect decisions and tickets, offers, staleness and early-report requests.

use ed25519_dalek::SigningKey;
use steelyard_broker::config::{BrokerConfig, RelayConfig, TokenConfig};
use steelyard_broker::core::{Core, Effects, OfferAnswered, Persist};
use steelyard_proto::api::{
    self, AgentHello, AgentReport, BrokerMessage, ConnectRequest, ErrorCode, LoadReport,
    OfferReply, PathReport, Role, SessionEnded, TransportKind, WithdrawReason, API_VERSION,
};
use steelyard_proto::hex;
use steelyard_proto::ticket::{KeyId, SessionId, Side};
use steelyard_select::Timestamp;
use steelyard_store::SessionState;

const TOKEN: &str = "enroll-token-0123456789";
const T0: u64 = 1_700_000_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn config() -> BrokerConfig {
    let mut c = BrokerConfig {
        listen_plain: true,
        ..BrokerConfig::default()
    };
    c.enroll_tokens.push(TokenConfig {
        name: "test".into(),
        token: TOKEN.into(),
        role: Role::Agent,
    });
    for (i, id) in ["r1", "r2"].iter().enumerate() {
        c.relays.push(RelayConfig {
            id: (*id).into(),
            public_key: api::public_key_hex(&key(100 + i as u8).verifying_key()),
            tcp_addr: Some(format!("127.0.0.1:{}", 7000 + i)),
            udp_addr: None,
            location: None,
            max_sessions: 100,
            max_bandwidth_kbps: 0,
            tier: 0,
            weight: 1.0,
        });
    }
    c.schedule.interval_ms = 1_000;
    c.schedule.stale_after_ms = 2_000;
    c.limits.offer_timeout_ms = 500;
    c.limits.max_pending_connects = 2;
    c
}

fn core() -> Core {
    Core::new(
        &config(),
        vec![],
        vec![],
        None,
        KeyId([7; 8]),
        Timestamp(T0),
    )
    .unwrap()
}

fn auth(core: &mut Core, id: &str, k: &SigningKey, token: Option<&str>) -> Result<bool, ErrorCode> {
    let nonce = [5u8; api::NONCE_LEN];
    let hello = AgentHello {
        version: API_VERSION,
        peer_id: id.into(),
        public_key: api::public_key_hex(&k.verifying_key()),
        enroll_token: token.map(Into::into),
        auto_accept: false,
    };
    let proof = api::sign_auth(k, Role::Agent, id, &hex::encode(&nonce)).unwrap();
    core.authenticate_agent(&hello, &nonce, &proof, Timestamp(T0))
        .map_err(|e| e.code)
}

fn path(relay: &str, rtt: f64) -> PathReport {
    PathReport {
        relay: relay.into(),
        rtt_ms: rtt,
        hops: 3,
        loss: 0.0,
        bandwidth_kbps: None,
        tcp: true,
        udp: true,
        age_ms: 0,
    }
}

fn load(core: &mut Core, now: u64) {
    for r in ["r1", "r2"] {
        core.relay_load(
            r,
            LoadReport {
                sessions: 1,
                ..LoadReport::default()
            },
            Timestamp(now),
        )
        .unwrap();
    }
}

fn online_pair(core: &mut Core, b_auto: bool) {
    auth(core, "alice", &key(1), Some(TOKEN)).unwrap();
    auth(core, "bob", &key(2), Some(TOKEN)).unwrap();
    core.agent_online("alice", 1, false, Timestamp(T0));
    core.agent_online("bob", 2, b_auto, Timestamp(T0));
    load(core, T0);
    for (peer, rtt) in [("alice", 10.0), ("bob", 20.0)] {
        let report = AgentReport {
            location: None,
            paths: vec![path("r1", rtt), path("r2", rtt + 30.0)],
        };
        assert_eq!(core.agent_report(peer, report, Timestamp(T0)).unwrap(), 2);
    }
    core.take_effects();
}

#[test]
fn enrollment_then_key_rules() {
    let mut c = core();
    c.take_effects();
    assert_eq!(
        auth(&mut c, "alice", &key(1), None),
        Err(ErrorCode::BadToken)
    );
    assert_eq!(
        auth(&mut c, "alice", &key(1), Some("wrong-token-0123456789")),
        Err(ErrorCode::BadToken)
    );
    assert_eq!(auth(&mut c, "alice", &key(1), Some(TOKEN)), Ok(true));
    let effects = c.take_effects();
    assert!(
        matches!(&effects.persist[..], [Persist::Peer(p)] if p.id == "alice" && p.token_name == "test")
    );
    assert_eq!(auth(&mut c, "alice", &key(1), None), Ok(false));
    assert_eq!(
        auth(&mut c, "alice", &key(9), Some(TOKEN)),
        Err(ErrorCode::AuthFailed)
    );
    // A signature by another key than the one in the hello fails before anything else.
    let nonce = [5u8; api::NONCE_LEN];
    let hello = AgentHello {
        version: API_VERSION,
        peer_id: "alice".into(),
        public_key: api::public_key_hex(&key(1).verifying_key()),
        enroll_token: None,
        auto_accept: false,
    };
    let forged = api::sign_auth(&key(9), Role::Agent, "alice", &hex::encode(&nonce)).unwrap();
    assert_eq!(
        c.authenticate_agent(&hello, &nonce, &forged, Timestamp(T0))
            .unwrap_err()
            .code,
        ErrorCode::AuthFailed
    );
    c.agent_online("alice", 1, false, Timestamp(T0));
    c.revoke_peer("alice", Timestamp(T0)).unwrap();
    let effects = c.take_effects();
    assert_eq!(effects.close.len(), 1);
    assert_eq!(effects.close[0].1.code, ErrorCode::Revoked);
    assert_eq!(
        auth(&mut c, "alice", &key(1), None),
        Err(ErrorCode::Revoked)
    );
    let mut old = hello.clone();
    old.version = 0;
    let proof = api::sign_auth(&key(1), Role::Agent, "alice", &hex::encode(&nonce)).unwrap();
    assert_eq!(
        c.authenticate_agent(&old, &nonce, &proof, Timestamp(T0))
            .unwrap_err()
            .code,
        ErrorCode::UnsupportedVersion
    );
}

#[test]
fn reports_are_validated() {
    let mut c = core();
    online_pair(&mut c, true);
    let bad_relay = AgentReport {
        location: None,
        paths: vec![path("nope", 1.0)],
    };
    assert_eq!(
        c.agent_report("alice", bad_relay, Timestamp(T0))
            .unwrap_err()
            .code,
        ErrorCode::InvalidReport
    );
    let mut negative = path("r1", -1.0);
    negative.loss = 0.0;
    let e = c
        .agent_report(
            "alice",
            AgentReport {
                location: None,
                paths: vec![negative],
            },
            Timestamp(T0),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidReport);
    assert!(e.message.contains("rtt_ms"), "{e}");
    let twice = AgentReport {
        location: None,
        paths: vec![path("r1", 1.0), path("r1", 2.0)],
    };
    assert!(c.agent_report("alice", twice, Timestamp(T0)).is_err());
    let too_many = AgentReport {
        location: None,
        paths: (0..=api::MAX_REPORT_PATHS)
            .map(|_| path("r1", 1.0))
            .collect(),
    };
    assert!(c.agent_report("alice", too_many, Timestamp(T0)).is_err());
    // The good report from before is still in force.
    assert_eq!(c.peers(Timestamp(T0))[0].paths, 2);
}

#[test]
fn connect_follows_the_selector_and_issues_both_tickets() {
    let mut c = core();
    online_pair(&mut c, true);
    let expected = c
        .explain("alice", "bob", TransportKind::Tcp, Timestamp(T0 + 10))
        .unwrap()
        .winner;
    assert_eq!(expected.as_str(), "r1");
    let req = ConnectRequest {
        request_id: 9,
        to: "bob".into(),
        transport: TransportKind::Tcp,
        service: String::new(),
        avoid: Vec::new(),
    };
    let plan = c
        .connect("alice", 1, &req, SessionId([3; 16]), Timestamp(T0 + 10))
        .unwrap();
    assert_eq!(plan.ticket_a.relay_id, "r1");
    assert_eq!((plan.ticket_a.side, plan.ticket_b.side), (Side::A, Side::B));
    assert_eq!(
        (
            plan.ticket_a.peer_id.as_str(),
            plan.ticket_b.peer_id.as_str()
        ),
        ("alice", "bob")
    );
    assert_eq!(plan.ticket_a.session_id, plan.ticket_b.session_id);
    assert_eq!(plan.ticket_a.expires_at - plan.ticket_a.issued_at, 60);
    assert_eq!(plan.b_conn, 2);
    assert!(!plan.reply_expected);
    assert_eq!(plan.relay_tcp_addr.as_deref(), Some("127.0.0.1:7000"));
    let effects = c.take_effects();
    assert!(effects
        .persist
        .iter()
        .any(|p| matches!(p, Persist::Session(s) if s.state == SessionState::Active)));

    // The assignment counts as load: a burst spreads to r2 eventually.
    let mut winners = std::collections::BTreeMap::new();
    for i in 0..90u8 {
        let plan = c
            .connect("alice", 1, &req, SessionId([i; 16]), Timestamp(T0 + 20))
            .unwrap();
        *winners.entry(plan.ticket_a.relay_id).or_insert(0) += 1;
    }
    assert!(winners.contains_key("r2"), "{winners:?}");

    c.session_ended(
        "alice",
        &SessionEnded {
            session_id: SessionId([3; 16]).to_string(),
            bytes_sent: 10,
            bytes_received: 20,
            end_to_end: Some(api::EndToEndReport {
                rtt_ms: 500.0,
                loss: 0.0,
                bandwidth_kbps: None,
                age_ms: 0,
            }),
        },
        Timestamp(T0 + 30),
    )
    .unwrap();
    let d = c
        .explain("alice", "bob", TransportKind::Tcp, Timestamp(T0 + 40))
        .unwrap();
    let r1 = &d.ranked[d.rank_of("r1").unwrap()];
    assert_eq!(
        r1.path.rtt_ms, 500.0,
        "the end-to-end measurement replaces the estimate"
    );
}

#[test]
fn connect_errors_are_clear() {
    let mut c = core();
    online_pair(&mut c, true);
    let req = |to: &str| ConnectRequest {
        request_id: 1,
        to: to.into(),
        transport: TransportKind::Tcp,
        service: String::new(),
        avoid: Vec::new(),
    };
    let code = |c: &mut Core, to: &str| {
        c.connect("alice", 1, &req(to), SessionId([1; 16]), Timestamp(T0))
            .unwrap_err()
            .code
    };
    assert_eq!(code(&mut c, "nobody"), ErrorCode::UnknownPeer);
    assert_eq!(code(&mut c, "alice"), ErrorCode::BadMessage);
    assert_eq!(code(&mut c, "bad id!"), ErrorCode::BadMessage);
    c.agent_offline("bob", 2, Timestamp(T0));
    assert_eq!(code(&mut c, "bob"), ErrorCode::PeerOffline);
    c.agent_online("bob", 3, true, Timestamp(T0));
    c.agent_report(
        "bob",
        AgentReport {
            location: None,
            paths: vec![],
        },
        Timestamp(T0),
    )
    .unwrap();
    let e = c
        .connect("alice", 1, &req("bob"), SessionId([1; 16]), Timestamp(T0))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NoCommonRelay);
    assert_eq!(e.request_id, Some(1));
    assert!(e.message.contains("alice reaches [r1, r2]"), "{e}");
}

/// Sessions assigned to relays and not yet in their load reports, over every candidate.
fn pending(c: &Core, now: u64) -> u32 {
    let d = c
        .explain("alice", "bob", TransportKind::Tcp, Timestamp(now))
        .expect("a decision");
    d.ranked.iter().map(|r| r.load.pending).sum()
}

#[test]
fn offers_wait_for_b_and_time_out() {
    let mut c = core();
    online_pair(&mut c, false);
    let req = ConnectRequest {
        request_id: 5,
        to: "bob".into(),
        transport: TransportKind::Tcp,
        service: String::new(),
        avoid: Vec::new(),
    };
    let plan = c
        .connect("alice", 1, &req, SessionId([1; 16]), Timestamp(T0))
        .unwrap();
    assert!(plan.reply_expected);
    let answer = api::ConnectAnswer {
        request_id: 5,
        session_id: SessionId([1; 16]).to_string(),
        peer: "bob".into(),
        relay_id: "r1".into(),
        relay_tcp_addr: None,
        relay_udp_addr: None,
        transport: TransportKind::Tcp,
        ticket: "00".into(),
        expires_at: 1,
        peer_key: String::new(),
    };
    c.park_answer(SessionId([1; 16]), answer.clone());
    // Only B may answer.
    let reply = OfferReply {
        session_id: SessionId([1; 16]).to_string(),
        accept: true,
        reason: None,
    };
    assert_eq!(
        c.offer_reply("alice", &reply, Timestamp(T0))
            .unwrap_err()
            .code,
        ErrorCode::UnknownSession
    );
    assert_eq!(
        c.offer_reply("bob", &reply, Timestamp(T0 + 40)).unwrap(),
        OfferAnswered {
            round_trip_ms: 40,
            answer_sent: true
        }
    );
    let effects = c.take_effects();
    assert!(matches!(&effects.send[..], [(1, BrokerMessage::ConnectAnswer(a))] if *a == answer));
    assert_eq!(c.gauges().pending_offers, 0);

    // Refusal.
    c.connect("alice", 1, &req, SessionId([2; 16]), Timestamp(T0))
        .unwrap();
    let refuse = OfferReply {
        session_id: SessionId([2; 16]).to_string(),
        accept: false,
        reason: Some("busy".into()),
    };
    assert_eq!(pending(&c, T0), 2, "the accepted and the offered session");
    assert!(
        !c.offer_reply("bob", &refuse, Timestamp(T0))
            .unwrap()
            .answer_sent
    );
    assert_eq!(
        pending(&c, T0),
        1,
        "a refused session no longer loads its relay"
    );
    let effects = c.take_effects();
    assert!(
        matches!(&effects.send[..], [(1, BrokerMessage::Error(e))] if e.code == ErrorCode::Refused && e.message.contains("busy") && e.request_id == Some(5))
    );

    // Pending limit, then timeout frees it.
    c.connect("alice", 1, &req, SessionId([3; 16]), Timestamp(T0))
        .unwrap();
    c.connect("alice", 1, &req, SessionId([4; 16]), Timestamp(T0))
        .unwrap();
    assert_eq!(
        c.connect("alice", 1, &req, SessionId([5; 16]), Timestamp(T0))
            .unwrap_err()
            .code,
        ErrorCode::TooManyPending
    );
    c.take_effects();
    c.tick(Timestamp(T0 + 600));
    let effects = c.take_effects();
    let timeouts = effects
        .send
        .iter()
        .filter(|(conn, m)| {
            *conn == 1 && matches!(m, BrokerMessage::Error(e) if e.code == ErrorCode::Timeout)
        })
        .count();
    assert_eq!(timeouts, 2);
    let withdrawn = |effects: &Effects, reason| {
        let mut ids: Vec<String> = effects
            .send
            .iter()
            .filter_map(|(conn, m)| match m {
                BrokerMessage::OfferWithdrawn(w) if *conn == 2 && w.reason == reason => {
                    Some(w.session_id.clone())
                }
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        withdrawn(&effects, WithdrawReason::Timeout),
        [
            SessionId([3; 16]).to_string(),
            SessionId([4; 16]).to_string()
        ],
        "B is told that the timed-out offers no longer stand"
    );
    assert_eq!(
        pending(&c, T0 + 600),
        1,
        "timed-out offers no longer load their relay"
    );
    assert!(c
        .connect("alice", 1, &req, SessionId([6; 16]), Timestamp(T0 + 600))
        .is_ok());

    // A goes away with an offer in flight: B is told at once, the relay's load released.
    c.take_effects();
    c.agent_offline("alice", 1, Timestamp(T0 + 700));
    let effects = c.take_effects();
    assert_eq!(
        withdrawn(&effects, WithdrawReason::InitiatorGone),
        [SessionId([6; 16]).to_string()]
    );
    assert_eq!(c.gauges().pending_offers, 0);
    assert_eq!(pending(&c, T0 + 700), 1);
    c.tick(Timestamp(T0 + 10_000));
    assert!(
        withdrawn(&c.take_effects(), WithdrawReason::Timeout).is_empty(),
        "a withdrawn offer does not time out later"
    );
}

#[test]
fn stale_reports_get_an_early_report_request_once_per_interval() {
    let mut c = core();
    online_pair(&mut c, true);
    c.tick(Timestamp(T0 + 1_000));
    assert!(
        c.take_effects().send.is_empty(),
        "fresh reports need no request"
    );
    c.tick(Timestamp(T0 + 2_500));
    let asked: Vec<_> = c
        .take_effects()
        .send
        .into_iter()
        .filter(|(_, m)| matches!(m, BrokerMessage::ReportNow(r) if r.reason == "stale"))
        .map(|(conn, _)| conn)
        .collect();
    assert_eq!(asked.len(), 2);
    c.tick(Timestamp(T0 + 3_000));
    assert!(
        c.take_effects().send.is_empty(),
        "asked at most once per interval"
    );
    c.tick(Timestamp(T0 + 3_600));
    assert_eq!(c.take_effects().send.len(), 2);
}

#[test]
fn draining_a_relay_moves_new_sessions() {
    let mut c = core();
    online_pair(&mut c, true);
    c.drain_relay("r1", true).unwrap();
    let d = c
        .explain("alice", "bob", TransportKind::Tcp, Timestamp(T0 + 1))
        .unwrap();
    assert_eq!(d.winner.as_str(), "r2");
    c.drain_relay("r1", false).unwrap();
    let d = c
        .explain("alice", "bob", TransportKind::Tcp, Timestamp(T0 + 1))
        .unwrap();
    assert_eq!(d.winner.as_str(), "r1");
    assert!(c.drain_relay("nope", true).is_err());
}

#[test]
fn a_peer_that_never_reported_is_asked_only_once_stale_since_it_came_online() {
    let mut c = core();
    auth(&mut c, "carol", &key(3), Some(TOKEN)).unwrap();
    c.agent_online("carol", 7, false, Timestamp(T0));
    c.take_effects();
    c.tick(Timestamp(T0 + 1_500));
    assert!(
        c.take_effects().send.is_empty(),
        "not stale 1.5 s after coming online"
    );
    c.tick(Timestamp(T0 + 2_000));
    let sent = c.take_effects().send;
    assert!(
        matches!(&sent[..], [(7, BrokerMessage::ReportNow(r))] if r.reason == "stale"),
        "{sent:?}"
    );
}

/// Failover: a relay the requester names in `avoid` is skipped for the next-ranked one, an
/// avoid list that leaves nothing falls back to the best relay, and a relay whose channel drops stops being
/// offered at once until it reports again.
#[test]
fn failover_skips_avoided_and_offline_relays() {
    let mut c = core();
    online_pair(&mut c, true);
    let req = |avoid: &[&str]| ConnectRequest {
        request_id: 4,
        to: "bob".into(),
        transport: TransportKind::Tcp,
        service: String::new(),
        avoid: avoid.iter().map(|s| s.to_string()).collect(),
    };
    let at = Timestamp(T0 + 10);
    let relay_of = |c: &mut Core, avoid: &[&str], n: u8| {
        c.connect("alice", 1, &req(avoid), SessionId([n; 16]), at)
            .map(|p| p.ticket_a.relay_id)
    };
    assert_eq!(relay_of(&mut c, &[], 1).unwrap(), "r1");
    assert_eq!(relay_of(&mut c, &["r1"], 2).unwrap(), "r2");
    // Every usable relay avoided: the best one anyway, rather than no tunnel at all.
    assert_eq!(relay_of(&mut c, &["r1", "r2"], 3).unwrap(), "r1");
    assert_eq!(relay_of(&mut c, &["r2", "r1"], 8).unwrap(), "r1");
    let many: Vec<String> = (0..9).map(|i| format!("x{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(
        relay_of(&mut c, &many, 4).unwrap_err().code,
        ErrorCode::BadMessage
    );

    // r1's channel drops: the next connect goes to r2 without anyone reporting anything.
    c.relay_online("r1", 50);
    c.relay_offline("r1", 51); // an older, replaced connection: no effect
    assert_eq!(relay_of(&mut c, &[], 5).unwrap(), "r1");
    c.relay_offline("r1", 50);
    assert_eq!(relay_of(&mut c, &[], 6).unwrap(), "r2");
    let d = c.explain("alice", "bob", TransportKind::Tcp, at).unwrap();
    assert!(d.rejected.iter().any(|r| r.relay.as_str() == "r1"), "{d:?}");
    // It comes back and reports: offered again.
    c.relay_online("r1", 52);
    load(&mut c, T0 + 11);
    assert_eq!(
        relay_of(&mut c, &[], 7).map_err(|e| e.to_string()),
        Ok("r1".to_owned())
    );
}
