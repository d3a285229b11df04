//! The broker ↔ agent protocol where it used to leave an agent waiting or guessing, against a
//! real broker process with real WebSocket clients:
//!
//! * a message dropped for the message rate is refused with an error that names its
//!   `request_id`, and the welcome states the channel's limits;
//! * an acceptor that goes offline (its socket closes, or another connection replaces it)
//!   with an offer pending: the initiator is told at once (`peer_offline`), not after the
//!   offer timeout, and the pending load is released;
//! * `/v1/explain` shows the reported figures (5.3 + 2.1 ms is 7.4, not 7.400000095367432).

mod broker_support;

use std::net::SocketAddr;

use broker_support::*;
use steelyard_proto::api::{
    AgentMessage, AgentReport, BrokerMessage, ChannelLimits, ErrorCode, PathReport,
};

fn config(dir: &std::path::Path, limits: &str) -> String {
    r1_config(dir, 1000) + &format!("\n[limits]\n{limits}\n")
}

/// An agent (not auto-accepting) that reported r1 with `rtt_ms` and `loss`.
async fn agent_reporting(addr: SocketAddr, id: &str, n: u8, rtt_ms: f64, loss: f64) -> Ws {
    let (mut ws, v) = agent(addr, id, &key(n), Some(AGENT_TOKEN), false).await;
    v.unwrap();
    let path = PathReport {
        rtt_ms,
        loss,
        ..path_report("r1")
    };
    report_paths(&mut ws, vec![path]).await;
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_errors_name_the_refused_request() {
    let dir = temp_dir("broker-protocol-rate");
    let broker = BrokerProcess::start(
        &dir,
        &config(&dir, "messages_per_sec = 1\nmessage_burst = 2"),
    );
    let (mut alice, welcome) = agent(broker.addr, "alice", &key(1), Some(AGENT_TOKEN), false).await;
    assert_eq!(
        welcome.unwrap().limits,
        Some(ChannelLimits {
            messages_per_sec: 1,
            message_burst: 2,
            max_pending_connects: 16,
        }),
        "the welcome states the channel's limits"
    );
    // Five connects at once against a burst of two: each is answered by its own error, the
    // ones over the rate with `rate_limited` and their request id.
    for id in 1..=5 {
        send_connect(&mut alice, id, "nobody").await;
    }
    let mut answered = Vec::new();
    let mut limited = 0;
    for _ in 1..=5 {
        let e = recv_error(&mut alice).await;
        let id = e
            .request_id
            .unwrap_or_else(|| panic!("the error names no request: {e}"));
        match e.code {
            ErrorCode::UnknownPeer => {}
            ErrorCode::RateLimited => {
                limited += 1;
                assert!(e.message.contains("messages_per_sec"), "{e}");
            }
            other => panic!("unexpected {other}: {e}"),
        }
        answered.push(id);
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3, 4, 5], "every request answered once");
    assert!(limited >= 2, "a burst of 2 let {} through", 5 - limited);
    // A dropped message without a request id gets an error without one.
    send_json(
        &mut alice,
        &AgentMessage::Report(AgentReport {
            location: None,
            paths: Vec::new(),
        }),
    )
    .await;
    let e = recv_error(&mut alice).await;
    assert_eq!(
        (e.code, e.request_id),
        (ErrorCode::RateLimited, None),
        "{e}"
    );
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptor_going_offline_fails_its_pending_offers_at_once() {
    let dir = temp_dir("broker-protocol-offline");
    // The offer timeout is far beyond the 5 s each receive waits: only the fix answers in time.
    let broker = BrokerProcess::start(&dir, &config(&dir, "offer_timeout_ms = 120000"));
    let addr = broker.addr;
    let _r1 = relay_up(addr).await;
    let mut alice = agent_reporting(addr, "alice", 1, 5.0, 0.0).await;
    let bob = agent_reporting(addr, "bob", 2, 5.0, 0.0).await;

    // Bob's socket closes with an offer pending.
    send_connect(&mut alice, 7, "bob").await;
    let mut bob = bob;
    recv_where(&mut bob, |m| {
        matches!(m, BrokerMessage::Offer(_)).then_some(())
    })
    .await;
    assert_eq!(metric(addr, "steelyard_broker_pending_offers").await, 1.0);
    drop(bob);
    let e = recv_error(&mut alice).await;
    assert_eq!(
        (e.code, e.request_id),
        (ErrorCode::PeerOffline, Some(7)),
        "{e}"
    );
    assert!(
        e.message.contains("bob went offline before answering"),
        "{e}"
    );
    assert_eq!(metric(addr, "steelyard_broker_pending_offers").await, 0.0);
    let (_, peers) = admin_get_json(addr, "/v1/admin/peers").await;
    let a = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "alice")
        .unwrap();
    assert_eq!(a["pending_connects"], 0, "{peers}");

    // Bob back; another connection of bob replaces the one that got the next offer.
    let mut bob = agent_reporting(addr, "bob", 2, 5.0, 0.0).await;
    send_connect(&mut alice, 8, "bob").await;
    recv_where(&mut bob, |m| {
        matches!(m, BrokerMessage::Offer(_)).then_some(())
    })
    .await;
    let (mut bob2, v) = agent(addr, "bob", &key(2), None, false).await;
    v.unwrap();
    let e = recv_error(&mut alice).await;
    assert_eq!(
        (e.code, e.request_id),
        (ErrorCode::PeerOffline, Some(8)),
        "{e}"
    );
    assert_eq!(metric(addr, "steelyard_broker_pending_offers").await, 0.0);
    // The new connection takes offers as usual.
    send_connect(&mut alice, 9, "bob").await;
    let offer = recv_where(&mut bob2, |m| match m {
        BrokerMessage::Offer(o) => Some(o.clone()),
        _ => None,
    })
    .await;
    assert_eq!(offer.from, "alice");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_the_figures_as_reported() {
    let dir = temp_dir("broker-protocol-explain");
    let broker = BrokerProcess::start(&dir, &config(&dir, ""));
    let addr = broker.addr;
    let _r1 = relay_up(addr).await;
    let _alice = agent_reporting(addr, "alice", 1, 5.3, 0.05).await;
    let _bob = agent_reporting(addr, "bob", 2, 2.1, 0.0).await;
    let (status, body) = admin_get(addr, "/v1/explain?from=alice&to=bob").await;
    assert_eq!(status, 200, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    let path = &d["ranked"][0]["path"];
    assert_eq!(path["source"], "legs", "{body}");
    assert_eq!(path["rtt_ms"].as_f64(), Some(7.4), "{body}");
    assert_eq!(path["loss"].as_f64(), Some(0.05), "{body}");
    assert!(body.contains(r#""rtt_ms":7.4,"#), "{body}");
    broker.stop();
}
