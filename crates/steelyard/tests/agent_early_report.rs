//! Early reports with real processes: a `steelyard broker` with a 20 s report interval, a
//! `steelyard relay` whose advertised probe address is a UDP proxy in this test, and two
//! `steelyard agent`s. Once both have reported, the proxy starts delaying the relay's answers
//! by 60 ms; the agents' watches between reports see the RTT move beyond the broker's
//! `rtt_change_ratio` and report at once, so the broker's view changes well before the next
//! scheduled report.

mod broker_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_support::*;
use tokio::net::UdpSocket;

/// A UDP proxy in front of `relay`: one upstream socket per client; answers go back to the
/// client after `delay_ms` (read at the time of each answer).
async fn delaying_proxy(relay: SocketAddr, delay_ms: Arc<AtomicU64>) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            let up = match upstream.get(&client) {
                Some(u) => u.clone(),
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    u.connect(relay).await.unwrap();
                    upstream.insert(client, u.clone());
                    let (front, delay_ms) = (front.clone(), delay_ms.clone());
                    let back = u.clone();
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 2048];
                        while let Ok(n) = back.recv(&mut b).await {
                            let (front, answer) = (front.clone(), b[..n].to_vec());
                            let delay = Duration::from_millis(delay_ms.load(Relaxed));
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = front.send_to(&answer, client).await;
                            });
                        }
                    });
                    u
                }
            };
            let _ = up.send(&buf[..n]).await;
        }
    });
    addr
}

/// The RTT of the broker's best alice → bob path (both legs), if it can decide.
async fn path_rtt(broker: SocketAddr) -> Option<f64> {
    let (status, d) = admin_get_json(broker, "/v1/explain?from=alice&to=bob").await;
    (status == 200)
        .then(|| d["ranked"][0]["path"]["rtt_ms"].as_f64())
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_change_is_reported_before_the_schedule() {
    const INTERVAL: Duration = Duration::from_secs(20);
    let dir = temp_dir("agent-early-report");
    let config = format!(
        "{}\n[schedule]\ninterval_ms = {}\njitter_ms = 0\nrtt_change_ratio = 0.5\n\
         relay_load_interval_ms = 200\n",
        base_config(&dir),
        INTERVAL.as_millis()
    );
    let broker = BrokerProcess::start(&dir, &config);
    let (_, keys) = http_json(broker.addr, "GET", "/v1/keys", None, None).await;
    let ticket_key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();

    let probe: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let delay_ms = Arc::new(AtomicU64::new(0));
    let proxy = delaying_proxy(probe, delay_ms.clone()).await;
    let relay_cfg = dir.join("r1.toml");
    std::fs::write(
        &relay_cfg,
        format!(
            "relay_id = \"r1\"\nbroker_keys = [\"{ticket_key}\"]\n\n[listen]\n\
             tcp = \"127.0.0.1:0\"\nprobe = \"{probe}\"\n\n[broker]\n\
             url = \"ws://{}/v1/relay\"\nidentity_key_file = \"{}\"\n\
             enroll_token = \"{RELAY_TOKEN}\"\nadvertise_udp = \"{proxy}\"\n",
            broker.addr,
            dir.join("r1.key").display()
        ),
    )
    .unwrap();
    let (_relay, line) = start(&["relay", "--config", relay_cfg.to_str().unwrap()]);
    assert!(line.starts_with("relay listening"), "{line}");
    let (_alice, _) = start(&[
        "agent",
        "--config",
        &agent_config(&dir, broker.addr, "alice", free_port(), ""),
    ]);
    let (_bob, _) = start(&[
        "agent",
        "--config",
        &agent_config(&dir, broker.addr, "bob", free_port(), ""),
    ]);

    // Both agents report r1 (their first report comes at once).
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        if let Some(rtt) = path_rtt(broker.addr).await {
            break rtt;
        }
        assert!(
            Instant::now() < deadline,
            "no decision for alice -> bob within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(before < 50.0, "loopback path RTT {before} ms");

    // The path gets 60 ms slower per leg. The next scheduled reports are about 20 s away.
    delay_ms.store(60, Relaxed);
    let changed = Instant::now();
    let limit = INTERVAL * 3 / 4;
    let after = loop {
        let rtt = path_rtt(broker.addr).await.unwrap_or(before);
        if rtt >= 100.0 {
            break rtt;
        }
        assert!(
            changed.elapsed() < limit,
            "the broker still sees {rtt:.1} ms {limit:?} after the path slowed down (reports are \
             due every {INTERVAL:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "agent_early_report: path RTT {before:.1} ms -> {after:.1} ms seen by the broker {:?} \
         after the change (report interval {INTERVAL:?})",
        changed.elapsed()
    );
    broker.stop();
}
