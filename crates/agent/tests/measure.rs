//! Measurement against real in-process relays on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use steelyard_agent::measure::{measure_all, MeasureConfig, RelayTarget};
use steelyard_select::RelayId;
use tokio::net::UdpSocket;

fn fast() -> MeasureConfig {
    MeasureConfig {
        spacing: Duration::from_millis(5),
        timeout: Duration::from_millis(500),
        ..MeasureConfig::default()
    }
}

#[tokio::test]
async fn loopback_relay_rtt_finite_loss_zero_hops_zero_bandwidth_and_exact_traffic() {
    let (addrs, handle, _task) = common::start(common::config(true)).await;
    let target = RelayTarget {
        id: RelayId::new("r1"),
        probe: addrs.probe,
        tcp: addrs.tcp,
    };
    let cfg = fast();
    let t0 = Instant::now();
    let report = measure_all(std::slice::from_ref(&target), &cfg)
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(report.paths.len(), 1, "{report:?}");
    let (id, p) = &report.paths[0];
    assert_eq!(id.as_str(), "r1");
    assert!(
        p.rtt_ms.is_finite() && p.rtt_ms > 0.0 && p.rtt_ms < 50.0,
        "{p:?}"
    );
    assert_eq!(p.loss, 0.0);
    assert_eq!(p.hops, 0, "loopback TTL 64 observed, guessed initial 64");
    assert!(p.udp && p.tcp);
    let bw = p.bandwidth_kbps.expect("burst measured");
    assert!(bw > 1_000, "loopback bandwidth {bw} kbit/s");
    // Every reply came back, so the traffic is exactly the configured budget.
    let budget = cfg.udp_budget();
    assert_eq!(report.traffic, budget);
    // The relay counts every single-datagram reply: the echoes and the one burst cookie.
    assert_eq!(
        handle.metrics().probe_echo.load(Relaxed),
        u64::from(cfg.probes) + 1
    );
    assert_eq!(
        handle.metrics().probe_burst_packets.load(Relaxed),
        u64::from(cfg.burst_packets)
    );
    eprintln!(
        "one relay, one cycle: sent {} B, received {} B of UDP payload, {} TCP connect; \
         rtt {:.3} ms, bandwidth {} kbit/s; took {:?}",
        budget.udp_sent, budget.udp_received, budget.tcp_connects, p.rtt_ms, bw, took
    );
    // Default settings: 10 × 64 B probes both ways, 2 burst requests, 1 cookie, 32 × 1200 B.
    let d = MeasureConfig::default().udp_budget();
    assert_eq!((d.udp_sent, d.udp_received), (696, 39_064));
}

#[tokio::test]
async fn udp_blocked_relay_is_reported_tcp_only() {
    // The relay has no probe responder, and the probe address the agent is given is a socket
    // that swallows everything (as behind a UDP-blocking firewall).
    let (addrs, _handle, _task) = common::start(common::config(false)).await;
    assert!(addrs.probe.is_none());
    let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = RelayTarget {
        id: RelayId::new("tcp-only"),
        probe: Some(sink.local_addr().unwrap()),
        tcp: addrs.tcp,
    };
    let mut cfg = fast();
    cfg.timeout = Duration::from_millis(200);
    let report = measure_all(&[target], &cfg).await.unwrap();
    assert_eq!(report.paths.len(), 1, "{report:?}");
    let p = &report.paths[0].1;
    assert!(!p.udp && p.tcp, "{p:?}");
    assert!(p.rtt_ms.is_finite() && p.rtt_ms >= 0.0 && p.rtt_ms < 1000.0);
    assert_eq!(p.bandwidth_kbps, None);
    assert_eq!(p.hops, cfg.unknown_hops);
    let m = &report.measurements[0];
    assert_eq!(m.train.as_ref().unwrap().loss, 1.0);
    // The sink really received the whole train and nothing came back.
    let mut buf = [0u8; 2048];
    let mut got = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(50), sink.recv_from(&mut buf)).await
    {
        got += 1;
    }
    assert_eq!(got, cfg.probes);
}

#[tokio::test]
async fn dead_relay_is_absent_and_live_one_is_present() {
    let (addrs, _handle, _task) = common::start(common::config(true)).await;
    let dead_udp = {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.local_addr().unwrap()
    };
    let targets = [
        RelayTarget {
            id: RelayId::new("dead"),
            probe: Some(dead_udp),
            tcp: common::dead_addr().await,
        },
        RelayTarget {
            id: RelayId::new("live"),
            probe: addrs.probe,
            tcp: addrs.tcp,
        },
    ];
    let mut cfg = fast();
    cfg.timeout = Duration::from_millis(200);
    cfg.parallel = 1; // one after the other
    let t0 = Instant::now();
    let report = measure_all(&targets, &cfg).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let ids: Vec<_> = report.paths.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["live"]);
    assert_eq!(report.measurements.len(), 2);
    let dead = &report.measurements[0];
    assert_eq!(dead.relay.as_str(), "dead");
    assert!(!dead.udp() && dead.tcp_connect_ms.is_none());
    assert_eq!(dead.path_metrics(16), None);
}

/// A UDP forwarder between the agent and the relay's probe port that drops every other echo
/// request (kind 1) and forwards everything else.
async fn lossy_proxy(relay: SocketAddr) -> SocketAddr {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(relay).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let mut echo = 0u32;
        let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut a) => {
                    client = Some(from);
                    if n > 3 && a[3] == 1 {
                        echo += 1;
                        if echo.is_multiple_of(2) {
                            continue;
                        }
                    }
                    let _ = back.send(&a[..n]).await;
                }
                Ok(n) = back.recv(&mut b) => {
                    if let Some(c) = client {
                        let _ = front.send_to(&b[..n], c).await;
                    }
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn lossy_path_reports_its_loss_within_one_cycle() {
    let (addrs, _handle, _task) = common::start(common::config(true)).await;
    let proxy = lossy_proxy(addrs.probe.unwrap()).await;
    let target = RelayTarget {
        id: RelayId::new("lossy"),
        probe: Some(proxy),
        tcp: addrs.tcp,
    };
    let mut cfg = fast();
    cfg.timeout = Duration::from_millis(300);
    let report = measure_all(&[target], &cfg).await.unwrap();
    let p = &report.paths[0].1;
    assert_eq!(p.loss, 0.5, "{p:?}");
    assert!(p.udp && p.rtt_ms.is_finite());
    assert!(
        p.bandwidth_kbps.is_some(),
        "the burst is not dropped by this proxy"
    );
}
