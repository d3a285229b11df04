//! Enrollment and identity against a real broker process: enroll with a token, reconnect with
//! the recorded key, a wrong key refused, a revoked peer refused (and disconnected), admin
//! authentication, published ticket keys.

mod broker_support;

use broker_support::*;
use steelyard_proto::api::ErrorCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_reconnect_wrong_key_revoke() {
    let dir = temp_dir("identity");
    let broker = BrokerProcess::start(&dir, &base_config(&dir));
    let addr = broker.addr;

    // Not enrolled, no token / wrong token.
    let (_, v) = agent(addr, "alice", &key(1), None, false).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::BadToken);
    let (_, v) = agent(
        addr,
        "alice",
        &key(1),
        Some("not-the-token-0123456789"),
        false,
    )
    .await;
    assert_eq!(v.unwrap_err().code, ErrorCode::BadToken);
    // A relay token does not enroll agents.
    let (_, v) = agent(addr, "alice", &key(1), Some(RELAY_TOKEN), false).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::BadToken);

    // Enrollment.
    let (ws, v) = agent(addr, "alice", &key(1), Some(AGENT_TOKEN), false).await;
    let welcome = v.unwrap();
    assert!(welcome.enrolled);
    assert_eq!(welcome.peer_id, "alice");
    assert_eq!(welcome.ticket_keys.len(), 1);
    drop(ws);

    // Reconnection with the recorded key, no token needed.
    let (mut alice, v) = agent(addr, "alice", &key(1), None, false).await;
    assert!(!v.unwrap().enrolled);

    // Someone else's key under alice's name: refused, even with a valid token.
    let (_, v) = agent(addr, "alice", &key(2), Some(AGENT_TOKEN), false).await;
    let e = v.unwrap_err();
    assert_eq!(e.code, ErrorCode::AuthFailed);
    assert!(e.message.contains("another key"), "{e}");

    // Admin API needs the token.
    let (status, _) = http(addr, "GET", "/v1/admin/peers", None, None).await;
    assert_eq!(status, 401);
    let (status, _) = http(
        addr,
        "GET",
        "/v1/admin/peers",
        Some("wrong-admin-token-xxxxxxxx"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, peers) = admin_get_json(addr, "/v1/admin/peers").await;
    assert_eq!(status, 200);
    assert_eq!(peers["peers"][0]["id"], "alice");
    assert_eq!(peers["peers"][0]["online"], true);
    assert_eq!(peers["peers"][0]["public_key"], key_hex(1));

    // Revocation closes the live connection with a clear error and refuses reconnection.
    let (status, _) = http(
        addr,
        "POST",
        "/v1/admin/peers/alice/revoke",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let e = expect_error(&mut alice, ErrorCode::Revoked).await;
    assert!(e.message.contains("revoked"), "{e}");
    assert!(
        recv(&mut alice).await.is_none(),
        "the socket is closed after revocation"
    );
    let (_, v) = agent(addr, "alice", &key(1), None, false).await;
    assert_eq!(v.unwrap_err().code, ErrorCode::Revoked);
    let (status, _) = http(
        addr,
        "POST",
        "/v1/admin/peers/nobody/revoke",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The published key is the one in the welcome.
    let (status, keys) = http_json(addr, "GET", "/v1/keys", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(keys["keys"][0]["key_id"], welcome.ticket_keys[0].key_id);
    assert_eq!(keys["keys"][0]["algorithm"], "ed25519");

    // A second connection of the same peer replaces the first.
    let (mut bob1, v) = agent(addr, "bob", &key(3), Some(AGENT_TOKEN), false).await;
    v.unwrap();
    let (_bob2, v) = agent(addr, "bob", &key(3), None, false).await;
    v.unwrap();
    expect_error(&mut bob1, ErrorCode::Replaced).await;

    // The API describes itself.
    let (status, doc) = http_json(addr, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/agent",
        "/v1/relay",
        "/v1/keys",
        "/v1/explain",
        "/v1/admin/policy",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    let (status, health) = http_json(addr, "GET", "/v1/health", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(health["gauges"]["peers_online"], 1, "{health}");

    let (status, metrics) = http(addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("steelyard_broker_errors_total{code=\"revoked\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("steelyard_broker_enrolled_total 2"),
        "{metrics}"
    );
    broker.stop();
}
