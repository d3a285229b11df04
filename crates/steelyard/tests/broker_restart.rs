//! Restart on the same data directory (SQLite store): identities, relays (configured and
//! enrolled), the policy set through the admin API, the session history and the ticket
//! signing key all survive; agents and relays reconnect with their keys alone.

mod broker_support;

use broker_support::*;
use steelyard_proto::api::{ErrorCode, LoadReport, RelayCapacity, RelayMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_everything_durable() {
    let dir = temp_dir("restart");
    // `store` must precede the tables; put it at the top.
    let config = format!("store = \"sqlite\"\n{}", r1_config(&dir, 10));

    let broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let (_, keys_before) = http_json(addr, "GET", "/v1/keys", None, None).await;

    // An enrolled relay (not in the config).
    let mut hello = relay_hello("r9", 109);
    hello.enroll_token = Some(RELAY_TOKEN.into());
    hello.tcp_addr = Some("127.0.0.1:7999".into());
    hello.capacity = Some(RelayCapacity {
        max_sessions: 50,
        max_bandwidth_kbps: 0,
    });
    let (mut r9, v) = relay(addr, hello, &key(109)).await;
    assert!(v.unwrap().enrolled);
    send_json(&mut r9, &RelayMessage::Load(LoadReport::default())).await;
    let r1 = relay_up(addr).await;

    // Agents, a report each, one session.
    let (mut alice, v) = agent(addr, "alice", &key(1), Some(AGENT_TOKEN), false).await;
    let w = v.unwrap();
    assert_eq!(w.relays.len(), 2, "the enrolled relay is in the map");
    let (mut bob, v) = agent(addr, "bob", &key(2), Some(AGENT_TOKEN), true).await;
    v.unwrap();
    for ws in [&mut alice, &mut bob] {
        report_paths(ws, vec![path_report("r9")]).await;
    }
    send_connect(&mut alice, 1, "bob").await;
    let answer = recv_answer(&mut alice).await;
    assert_eq!(answer.relay_id, "r9");

    // A policy change and a drain through the admin API.
    let (status, mut policy) = admin_get_json(addr, "/v1/admin/policy").await;
    assert_eq!(status, 200);
    policy["weights"]["load"] = serde_json::json!(33.0);
    let (status, body) = http_json(
        addr,
        "PUT",
        "/v1/admin/policy",
        Some(ADMIN),
        Some(&policy.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_json(
        addr,
        "PUT",
        "/v1/admin/policy",
        Some(ADMIN),
        Some(r#"{"weights":{"load":-1}}"#),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["message"].as_str().unwrap().contains("weights.load"),
        "{body}"
    );
    let (status, _) = http(
        addr,
        "PUT",
        "/v1/admin/policy",
        Some(ADMIN),
        Some(r#"{"nonsense":1}"#),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(addr, "POST", "/v1/admin/relays/r1/drain", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    let (_, r) = http_json(
        addr,
        "POST",
        "/v1/admin/peers/bob/revoke",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(r["revoked"], "bob");

    drop((alice, bob, r1, r9));
    broker.stop();

    // Same data directory, new process.
    let broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let (_, keys_after) = http_json(addr, "GET", "/v1/keys", None, None).await;
    assert_eq!(keys_before, keys_after, "the signing key survives");

    let (_, v) = agent(addr, "alice", &key(1), None, false).await;
    assert!(!v.unwrap().enrolled, "alice's identity survives");
    let (_, v) = agent(addr, "alice", &key(3), None, false).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::AuthFailed);
    let (_, v) = agent(addr, "bob", &key(2), None, false).await;
    assert_eq!(
        v.unwrap_err().code,
        ErrorCode::Revoked,
        "the revocation survives"
    );
    let (_, v) = relay(addr, relay_hello("r9", 109), &key(109)).await;
    assert!(!v.unwrap().enrolled, "the enrolled relay survives");

    let (_, relays) = admin_get_json(addr, "/v1/admin/relays").await;
    let list = relays["relays"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["id"], "r1");
    assert_eq!(list[0]["draining"], true, "the drain survives");
    assert_eq!(list[1]["id"], "r9");
    assert_eq!(list[1]["tcp_addr"], "127.0.0.1:7999");
    assert_eq!(list[1]["max_sessions"], 50);

    let (_, policy) = admin_get_json(addr, "/v1/admin/policy").await;
    assert_eq!(policy["weights"]["load"], 33.0);

    let (_, sessions) = admin_get_json(addr, "/v1/admin/sessions").await;
    let history = sessions["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|s| s["id"] == answer.session_id.as_str() && s["relay"] == "r9"),
        "{sessions}"
    );
    broker.stop();
}
