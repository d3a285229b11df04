//! Hostile input against a real broker process: malformed JSON, unknown message types and
//! fields, oversized frames, binary frames, messages before authentication, idle
//! unauthenticated sockets, too many unauthenticated sockets from one address, and a flood of
//! connects. Each gets a clear error (and a metric); nothing crashes; a well-behaved pair of
//! agents keeps working throughout. Pings get pongs, before authentication too.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use futures_util::{SinkExt, StreamExt};
use steelyard_proto::api::{
    self, AgentHello, AgentMessage, BrokerMessage, ConnectRequest, ErrorCode, Role, TransportKind,
    API_VERSION,
};
use tokio_tungstenite::tungstenite::Message;

/// Alice asks for Bob and gets a relay: the well-behaved path still works.
async fn still_works(alice: &mut Ws, request_id: u64) {
    send_json(
        alice,
        &AgentMessage::Connect(ConnectRequest {
            request_id,
            to: "bob".into(),
            transport: TransportKind::Tcp,
            service: String::new(),
            avoid: Vec::new(),
        }),
    )
    .await;
    let answer = recv_where(alice, |m| match m {
        BrokerMessage::ConnectAnswer(a) if a.request_id == request_id => Some(a.clone()),
        BrokerMessage::Error(e) => panic!("good agent got {e}"),
        _ => None,
    })
    .await;
    assert_eq!(answer.relay_id, "r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_errors_and_harms_nobody() {
    let dir = temp_dir("hostile");
    let config = r1_config(&dir, 100_000)
        + r#"
[limits]
max_message_bytes = 4096
messages_per_sec = 20
message_burst = 20
max_unauthenticated_per_ip = 8
auth_timeout_secs = 1
"#;
    let mut broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let _r1 = relay_up(addr).await;
    let mut alice = reported_agent(addr, "alice", 1, false).await;
    let mut bob = reported_agent(addr, "bob", 2, true).await;
    still_works(&mut alice, 1).await;

    // Before authentication: garbage, a message other than hello, a binary frame.
    let mut ws1 = ws(addr, "/v1/agent").await;
    ws1.send(Message::Text("{not json".into())).await.unwrap();
    expect_error(&mut ws1, ErrorCode::BadMessage).await;
    assert!(recv(&mut ws1).await.is_none(), "closed after a bad hello");
    let mut ws2 = ws(addr, "/v1/agent").await;
    send_connect(&mut ws2, 1, "bob").await;
    expect_error(&mut ws2, ErrorCode::Unauthenticated).await;
    let mut ws3 = ws(addr, "/v1/relay").await;
    ws3.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    expect_error(&mut ws3, ErrorCode::BadMessage).await;

    // Too many unauthenticated sockets from one address: the upgrade is refused with 429.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(ws(addr, "/v1/agent").await);
    }
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/agent")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 429),
        other => panic!("expected HTTP 429, got {other:?}"),
    }
    // Idle sockets are closed after the auth timeout, with a clear error; the slots free up.
    for ws in &mut idle {
        let e = expect_error(ws, ErrorCode::Unauthenticated).await;
        assert!(e.message.contains("within 1 s"), "{e}");
    }
    drop(idle);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, v) = agent(addr, "carol", &key(3), Some(AGENT_TOKEN), false).await;
    v.unwrap();
    still_works(&mut alice, 2).await;

    // After authentication: errors are answered and the connection stays usable.
    let mut mallory = reported_agent(addr, "mallory", 9, false).await;
    for (raw, code) in [
        ("{not json".to_owned(), ErrorCode::BadMessage),
        (r#"{"type":"launch_missiles"}"#.to_owned(), ErrorCode::BadMessage),
        (r#"{"type":"connect","request_id":1,"to":"bob","sneaky":true}"#.to_owned(), ErrorCode::BadMessage),
        (format!(r#"{{"type":"connect","request_id":1,"to":"{}"}}"#, "x".repeat(5_000)), ErrorCode::TooLarge),
        (r#"{"type":"hello","version":1,"peer_id":"x","public_key":"00"}"#.to_owned(), ErrorCode::BadMessage),
        (r#"{"type":"offer_reply","session_id":"zz","accept":true}"#.to_owned(), ErrorCode::BadMessage),
        (r#"{"type":"offer_reply","session_id":"00000000000000000000000000000000","accept":true}"#.to_owned(), ErrorCode::UnknownSession),
        (r#"{"type":"report","paths":[{"relay":"r1","rtt_ms":1e400}]}"#.to_owned(), ErrorCode::BadMessage),
        (r#"{"type":"report","paths":[{"relay":"r1","rtt_ms":1,"loss":7}]}"#.to_owned(), ErrorCode::InvalidReport),
    ] {
        mallory.send(Message::Text(raw.clone().into())).await.unwrap();
        let e = expect_error(&mut mallory, code).await;
        assert!(!e.message.is_empty(), "{raw}");
    }
    report_paths(&mut mallory, vec![path_report("r1")]).await;

    // A flood of connects: the first burst is served, the rest are rate limited, each answered.
    tokio::time::sleep(Duration::from_millis(1_100)).await; // let the bucket refill to its burst
    let flood = 200u64;
    for i in 0..flood {
        send_json(
            &mut mallory,
            &AgentMessage::Connect(ConnectRequest {
                request_id: 1000 + i,
                to: "bob".into(),
                transport: TransportKind::Tcp,
                service: String::new(),
                avoid: Vec::new(),
            }),
        )
        .await;
    }
    let (mut answered, mut limited) = (0, 0);
    while answered + limited < flood {
        match recv(&mut mallory).await.expect("mallory still connected") {
            BrokerMessage::ConnectAnswer(_) => answered += 1,
            BrokerMessage::Error(e) if e.code == ErrorCode::RateLimited => limited += 1,
            BrokerMessage::Error(e) => panic!("unexpected {e}"),
            _ => {}
        }
    }
    assert!(
        (20..100).contains(&answered),
        "answered {answered}, limited {limited}"
    );
    assert!(limited >= 100, "answered {answered}, limited {limited}");
    still_works(&mut alice, 3).await;

    // A frame beyond the hard limit ends that connection only.
    mallory
        .send(Message::Text("y".repeat(20_000).into()))
        .await
        .unwrap();
    loop {
        match recv(&mut mallory).await {
            None => break,
            Some(BrokerMessage::Error(e)) => assert_eq!(e.code, ErrorCode::TooLarge, "{e}"),
            Some(_) => {}
        }
    }
    still_works(&mut alice, 4).await;
    // Bob saw the offers and is still fine.
    recv_where(&mut bob, |m| {
        matches!(m, BrokerMessage::Offer(_)).then_some(())
    })
    .await;

    assert!(broker.alive());
    let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
    for needle in [
        "code=\"rate_limited\"}",
        "code=\"too_large\"}",
        "code=\"too_many_connections\"}",
        "code=\"unauthenticated\"}",
    ] {
        let line = metrics.lines().find(|l| l.contains(needle)).unwrap();
        assert!(!line.ends_with(" 0"), "{line}");
    }
    assert!(
        metrics.contains("steelyard_broker_unauthenticated_limit_total 1"),
        "{metrics}"
    );
    broker.stop();
}

/// The next frame, which must be a pong (a text message first is returned as such).
async fn next_pong_or_text(ws: &mut Ws) -> Result<Vec<u8>, BrokerMessage> {
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer within 5 s (well before the 10 s auth timeout)");
    match next {
        Some(Ok(Message::Pong(p))) => Ok(p.to_vec()),
        Some(Ok(Message::Text(t))) => Err(api::decode_broker(&t, usize::MAX).unwrap()),
        other => panic!("expected a pong, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_get_pongs_before_and_after_authentication() {
    let dir = temp_dir("pings");
    let broker = BrokerProcess::start(&dir, &base_config(&dir));
    let addr = broker.addr;
    // RFC 6455 §5.5.2: a ping gets a pong with its payload, whatever the state of the API.
    let mut relay = ws(addr, "/v1/relay").await;
    relay
        .send(Message::Ping(b"r".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(next_pong_or_text(&mut relay).await.unwrap(), b"r");

    let (k, id) = (key(1), "alice");
    let mut alice = ws(addr, "/v1/agent").await;
    alice
        .send(Message::Ping(b"before hello".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_pong_or_text(&mut alice).await.unwrap(),
        b"before hello"
    );
    send_json(
        &mut alice,
        &AgentMessage::Hello(AgentHello {
            version: API_VERSION,
            peer_id: id.into(),
            public_key: api::public_key_hex(&k.verifying_key()),
            enroll_token: Some(AGENT_TOKEN.into()),
            auto_accept: false,
        }),
    )
    .await;
    alice
        .send(Message::Ping(b"before auth".to_vec().into()))
        .await
        .unwrap();
    let Err(BrokerMessage::Challenge(c)) = next_pong_or_text(&mut alice).await else {
        panic!("the challenge comes first")
    };
    assert_eq!(next_pong_or_text(&mut alice).await.unwrap(), b"before auth");
    // The handshake carries on as if nothing happened.
    let proof = api::sign_auth(&k, Role::Agent, id, &c.nonce).unwrap();
    send_json(&mut alice, &AgentMessage::Auth(proof)).await;
    let Err(BrokerMessage::Welcome(_)) = next_pong_or_text(&mut alice).await else {
        panic!("welcome expected")
    };
    alice
        .send(Message::Ping(b"after auth".to_vec().into()))
        .await
        .unwrap();
    loop {
        // The rest of the relay map may come first.
        if let Ok(p) = next_pong_or_text(&mut alice).await {
            assert_eq!(p, b"after auth");
            break;
        }
    }
}
