//! A real broker process under its total connection limit, withdrawing offers that will not
//! be answered, and counting connect latencies in `/metrics`.

mod broker_support;

use std::time::Duration;

use broker_support::*;
use steelyard_proto::api::{AgentMessage, BrokerMessage, ErrorCode, OfferReply, WithdrawReason};

fn config(dir: &std::path::Path, limits: &str) -> String {
    r1_config(dir, 100_000) + &format!("\n[limits]\n{limits}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_connection_limit_refuses_upgrades_with_503_and_spares_connected_agents() {
    let dir = temp_dir("conn-limit");
    let mut broker = BrokerProcess::start(
        &dir,
        &config(&dir, "max_connections = 4\nauth_timeout_secs = 30"),
    );
    let addr = broker.addr;
    let _r1 = relay_up(addr).await;
    let mut alice = reported_agent(addr, "alice", 1, true).await;
    let _bob = reported_agent(addr, "bob", 2, true).await;
    // The fourth slot goes to a socket that never authenticates.
    let unauthenticated = ws(addr, "/v1/agent").await;
    assert_eq!(metric(addr, "steelyard_broker_websockets_open").await, 4.0);

    for path in ["/v1/agent", "/v1/relay"] {
        match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 503, "{path}");
                assert!(r.headers().contains_key("retry-after"), "{path}");
                let body: serde_json::Value =
                    serde_json::from_slice(r.body().as_deref().expect("a body")).unwrap();
                assert_eq!(body["code"], "too_many_connections", "{body}");
                let message = body["message"].as_str().unwrap();
                assert!(
                    message.contains("limits.max_connections = 4") && message.contains("retry"),
                    "{message}"
                );
            }
            other => panic!("expected HTTP 503 on {path}, got {other:?}"),
        }
    }
    assert_eq!(
        metric(addr, "steelyard_broker_connection_limit_total").await,
        2.0
    );
    // Connected agents are unaffected: Alice still gets relays for Bob.
    send_connect(&mut alice, 7, "bob").await;
    assert_eq!(recv_answer(&mut alice).await.relay_id, "r1");

    // A closed socket frees its slot.
    drop(unauthenticated);
    let mut freed = false;
    for _ in 0..50 {
        if metric(addr, "steelyard_broker_websockets_open").await == 3.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(freed, "the closed socket's slot was not released");
    let (_carol, v) = agent(addr, "carol", &key(3), Some(AGENT_TOKEN), true).await;
    v.unwrap();
    assert!(broker.alive());
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_offers_are_withdrawn_from_b_and_latencies_are_counted() {
    let dir = temp_dir("withdraw");
    let mut broker = BrokerProcess::start(&dir, &config(&dir, "offer_timeout_ms = 2000"));
    let addr = broker.addr;
    let _r1 = relay_up(addr).await;
    let mut alice = reported_agent(addr, "alice", 1, false).await;
    let mut bob = reported_agent(addr, "bob", 2, false).await;
    let _carol = reported_agent(addr, "carol", 3, true).await;
    let count = "steelyard_broker_connect_latency_seconds_count";
    let round_trips = "steelyard_broker_offer_round_trip_seconds_count";
    assert_eq!(metric(addr, count).await, 0.0);

    // An auto-accepted connect is answered at once and counted.
    send_connect(&mut alice, 1, "carol").await;
    recv_answer(&mut alice).await;
    assert_eq!(metric(addr, count).await, 1.0);
    assert_eq!(
        metric(
            addr,
            "steelyard_broker_connect_latency_seconds_bucket{le=\"+Inf\"}"
        )
        .await,
        1.0
    );

    // Bob does not answer: Alice gets `timeout`, Bob gets the withdrawal of that offer.
    send_connect(&mut alice, 2, "bob").await;
    let offered = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.session_id.clone()),
        _ => None,
    })
    .await;
    let e = recv_error(&mut alice).await;
    assert_eq!((e.code, e.request_id), (ErrorCode::Timeout, Some(2)));
    let withdrawn = recv_where(&mut bob, |m| match m {
        BrokerMessage::OfferWithdrawn(w) => Some(w.clone()),
        _ => None,
    })
    .await;
    assert_eq!(withdrawn.session_id, offered);
    assert_eq!(withdrawn.reason, WithdrawReason::Timeout);
    // A late reply finds nothing to answer.
    send_json(
        &mut bob,
        &AgentMessage::OfferReply(OfferReply {
            session_id: offered,
            accept: true,
            reason: None,
        }),
    )
    .await;
    assert_eq!(recv_error(&mut bob).await.code, ErrorCode::UnknownSession);

    // Bob answers in time: the offer round trip and the connect latency are counted.
    send_connect(&mut alice, 3, "bob").await;
    let offered = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.session_id.clone()),
        _ => None,
    })
    .await;
    send_json(
        &mut bob,
        &AgentMessage::OfferReply(OfferReply {
            session_id: offered,
            accept: true,
            reason: None,
        }),
    )
    .await;
    recv_answer(&mut alice).await;
    assert_eq!(metric(addr, round_trips).await, 1.0);
    assert_eq!(metric(addr, count).await, 2.0);

    // Alice gives up (disconnects) with an offer in flight: Bob is told at once.
    send_connect(&mut alice, 4, "bob").await;
    let offered = recv_where(&mut bob, |m| match m {
        BrokerMessage::Offer(o) => Some(o.session_id.clone()),
        _ => None,
    })
    .await;
    drop(alice);
    let withdrawn = recv_where(&mut bob, |m| match m {
        BrokerMessage::OfferWithdrawn(w) => Some(w.clone()),
        _ => None,
    })
    .await;
    assert_eq!(withdrawn.session_id, offered);
    assert_eq!(withdrawn.reason, WithdrawReason::InitiatorGone);
    assert_eq!(metric(addr, "steelyard_broker_pending_offers").await, 0.0);
    assert!(broker.alive());
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_pipelined_frames_and_plain_requests_to_websocket_paths() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = temp_dir("ws-basics");
    let mut broker = BrokerProcess::start(&dir, &config(&dir, ""));
    let addr = broker.addr;
    let (status, body) = http_json(addr, "GET", "/v1/agent", None, None).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("Upgrade: websocket"),
        "{body}"
    );
    // A client that sends its first frame right behind the upgrade request, before the 101.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut bytes = format!(
            "GET /v1/agent HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes();
        let payload = b"{not json";
        bytes.extend([0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0]); // zero mask
        bytes.extend(payload);
        tcp.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        let text = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let mut chunk = [0u8; 1024];
                let n = tcp.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend(&chunk[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if text.contains("bad_message") {
                    return text;
                }
            }
        })
        .await
        .expect("an answer within 5 s");
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(
            text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {text}"
        );
    }
    let (mut alice, v) = agent(addr, "alice", &key(1), Some(AGENT_TOKEN), true).await;
    v.unwrap();
    alice
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match alice.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(_)) => continue,
                other => panic!("expected a pong, got {other:?}"),
            }
        }
    })
    .await
    .expect("a pong within 5 s");
    assert_eq!(&pong[..], b"are you there");
    // A clean close is answered with a close.
    alice.close(None).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), alice.next())
        .await
        .expect("the broker closes within 5 s");
    assert!(matches!(end, None | Some(Ok(Message::Close(_)))), "{end:?}");
    assert!(broker.alive());
    broker.stop();
}
