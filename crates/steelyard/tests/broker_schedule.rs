//! The report schedule against a real broker process: agents get the configured schedule; an
//! agent that stops reporting is asked for a fresh report (early-report request) and, once its
//! measurements expire, its paths stop being candidates.

mod broker_support;

use std::time::{Duration, Instant};

use broker_support::*;
use steelyard_proto::api::BrokerMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agents_are_asked_then_expire() {
    let dir = temp_dir("schedule");
    let config = r1_config(&dir, 10)
        + r#"
[schedule]
interval_ms = 400
jitter_ms = 100
stale_after_ms = 1000

[policy.freshness]
path_fresh_secs = 1
path_expire_secs = 2
relay_timeout_secs = 30
"#;
    let broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let _relay_ws = relay_up(addr).await;

    let mut agents = Vec::new();
    for (i, id) in ["alice", "bob"].iter().enumerate() {
        let (mut ws, v) = agent(addr, id, &key(1 + i as u8), Some(AGENT_TOKEN), true).await;
        let w = v.unwrap();
        assert_eq!((w.schedule.interval_ms, w.schedule.jitter_ms), (400, 100));
        report_paths(&mut ws, vec![path_report("r1")]).await;
        agents.push(ws);
    }
    let reported = Instant::now();
    let (status, _) = admin_get(addr, "/v1/explain?from=alice&to=bob").await;
    assert_eq!(status, 200);

    // Both go silent: the broker asks for a report once it is stale (after ~1 s), not before.
    for ws in &mut agents {
        recv_where(ws, |m| {
            matches!(m, BrokerMessage::ReportNow(r) if r.reason == "stale").then_some(())
        })
        .await;
    }
    let asked_after = reported.elapsed();
    assert!(
        asked_after >= Duration::from_millis(900),
        "asked after {asked_after:?}"
    );

    // After path_expire_secs the paths are no longer candidates.
    tokio::time::sleep(Duration::from_millis(2_300).saturating_sub(reported.elapsed())).await;
    let (status, body) = admin_get_json(addr, "/v1/explain?from=alice&to=bob").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "no_common_relay");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("alice reaches []"),
        "{body}"
    );

    let (_, peers) = admin_get_json(addr, "/v1/admin/peers").await;
    assert!(peers["peers"][0]["report_age_ms"].as_u64().unwrap() >= 2_000);
    let (_, metrics) = http(addr, "GET", "/metrics", None, None).await;
    assert!(
        !metrics.contains("steelyard_broker_report_requests_total 0\n"),
        "{metrics}"
    );
    broker.stop();
}
