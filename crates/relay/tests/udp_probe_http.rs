//! UDP sessions, the probe responder and the HTTP endpoints of an in-process relay over real
//! loopback sockets.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use steelyard_proto::ticket::{TicketLimits, Transport};
use steelyard_relay::client::udp_bind;
use steelyard_relay::wire::{self, Probe, StatusCode, UdpKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const COUNT: u32 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_exchanges_100k_datagrams_and_never_forwards_a_third_address() {
    let (addrs, handle, _t) = start(config()).await;
    let relay = addrs.udp.unwrap();
    let (sid, ta, tb) = pair(Transport::Udp, TicketLimits::default());
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let x = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    assert_eq!(
        udp_bind(&a, relay, sid, &ta, WAIT).await.unwrap(),
        StatusCode::Waiting
    );
    assert_eq!(
        udp_bind(&b, relay, sid, &tb, WAIT).await.unwrap(),
        StatusCode::Paired
    );
    // A learns it is paired too.
    let mut buf = [0u8; 2048];
    let (n, _) = a.recv_from(&mut buf).await.unwrap();
    assert_eq!(
        wire::decode_udp(&buf[..n]).unwrap().body,
        [StatusCode::Paired.to_wire()]
    );
    // A stolen ticket from a third address is refused.
    assert_eq!(
        udp_bind(&x, relay, sid, &ta, WAIT).await.unwrap(),
        StatusCode::Reused
    );

    // Windowed ping-pong in both directions at once: each side sends numbered datagrams with
    // at most WINDOW unacknowledged (so loopback buffers never overflow); the third address
    // sprays data for the same session the whole time.
    const WINDOW: u32 = 256;
    let started = Instant::now();
    let spray = tokio::spawn(async move {
        let mut sent = 0u64;
        let d = wire::encode_udp(UdpKind::Data, sid, b"intruder!");
        while started.elapsed() < Duration::from_millis(1500) {
            for _ in 0..64 {
                let _ = x.send_to(&d, relay).await;
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (x, sent)
    });
    async fn side(
        me: UdpSocket,
        relay: SocketAddr,
        sid: steelyard_proto::ticket::SessionId,
        tag: u8,
    ) -> (u32, u32) {
        let mut next_send = 0u32;
        let mut received = 0u32;
        let mut lost = 0u32;
        let mut foreign = 0u32;
        let mut buf = [0u8; 2048];
        let mut payload = vec![tag; 200];
        let deadline = Instant::now() + Duration::from_secs(60);
        while received + lost < COUNT && Instant::now() < deadline {
            while next_send < COUNT && next_send < received + lost + WINDOW {
                payload[..4].copy_from_slice(&next_send.to_be_bytes());
                me.send_to(&wire::encode_udp(UdpKind::Data, sid, &payload), relay)
                    .await
                    .unwrap();
                next_send += 1;
            }
            match tokio::time::timeout(Duration::from_millis(100), me.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    let p = wire::decode_udp(&buf[..n]).unwrap();
                    if p.kind == UdpKind::Data {
                        if p.body.get(4) == Some(&(tag ^ 1)) {
                            received += 1;
                        } else {
                            foreign += 1;
                        }
                    }
                }
                // Nothing for 100 ms: the peer's outstanding datagrams are lost (or the peer
                // is done sending); count them so the window reopens and the test stays bounded.
                _ => lost = next_send.max(received) - received,
            }
        }
        (received, foreign)
    }
    let (ra, rb) = tokio::join!(
        tokio::spawn(side(a, relay, sid, 0xA0)),
        tokio::spawn(side(b, relay, sid, 0xA1))
    );
    let ((ra, fa), (rb, fb)) = (ra.unwrap(), rb.unwrap());
    let secs = started.elapsed().as_secs_f64();
    let (_x, sprayed) = spray.await.unwrap();
    eprintln!("udp: A got {ra}, B got {rb} in {secs:.2} s; intruder sent {sprayed}");
    assert_eq!(
        (fa, fb),
        (0, 0),
        "a datagram from the third address was forwarded"
    );
    assert!(
        ra as f64 >= COUNT as f64 * 0.99 && rb as f64 >= COUNT as f64 * 0.99,
        "loss too high: {ra} {rb}"
    );
    let m = handle.metrics();
    assert!(
        m.udp_dropped[steelyard_relay::udp_core::DropReason::UnknownAddress.index()].load(Relaxed)
            >= sprayed.min(1)
    );
    assert_eq!(m.udp_active.load(Relaxed), 1);
}

/// Bursts of datagrams of mixed sizes arrive byte for byte and in order, whether the relay
/// sends them as GSO groups (runs of equal size, a shorter one closing a run) or one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_bursts_of_mixed_sizes_arrive_intact_and_in_order() {
    let (addrs, handle, _t) = start(config()).await;
    let relay = addrs.udp.unwrap();
    let (sid, ta, tb) = pair(Transport::Udp, TicketLimits::default());
    let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a_tokio = UdpSocket::from_std({
        a.set_nonblocking(true).unwrap();
        a.try_clone().unwrap()
    })
    .unwrap();
    udp_bind(&a_tokio, relay, sid, &ta, WAIT).await.unwrap();
    udp_bind(&b, relay, sid, &tb, WAIT).await.unwrap();
    a.set_nonblocking(false).unwrap();
    // B reads while A sends, so its receive buffer never fills.
    let total = 8 * 24;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < total {
            match tokio::time::timeout(Duration::from_secs(2), b.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    if wire::decode_udp(&buf[..n]).unwrap().kind == UdpKind::Data {
                        got.push(buf[..n].to_vec());
                    }
                }
                _ => break,
            }
        }
        got
    });
    // 8 bursts of 24 datagrams, sent back to back from a blocking socket so the relay reads
    // several per call: sizes in runs (equal, then a shorter one), up to 1400 bytes.
    let sizes = [200usize, 200, 200, 120, 200, 1400, 1400, 1400, 30, 1, 200];
    let mut sent = Vec::new();
    for burst in 0..8u32 {
        for k in 0..24u32 {
            let len = sizes[(k as usize + burst as usize) % sizes.len()];
            let mut body = vec![(k as u8) ^ 0x5a; len];
            let n = burst * 24 + k;
            body[..4.min(len)].copy_from_slice(&n.to_be_bytes()[..4.min(len)]);
            let d = wire::encode_udp(UdpKind::Data, sid, &body);
            a.send_to(&d, relay).unwrap();
            sent.push(d);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = reader.await.unwrap();
    assert_eq!(got.len(), sent.len(), "datagrams lost on loopback");
    for (i, (g, s)) in got.iter().zip(&sent).enumerate() {
        assert!(
            g == s,
            "datagram {i}: got {} bytes, sent {}",
            g.len(),
            s.len()
        );
    }
    // Some runs went out as GSO sends (loopback supports UDP GSO).
    assert!(handle.metrics().udp_gso_sends.load(Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_expire_when_idle() {
    let mut cfg = config();
    cfg.limits.udp_idle_timeout_secs = 1;
    let (addrs, handle, _t) = start(cfg).await;
    let relay = addrs.udp.unwrap();
    let (sid, ta, tb) = pair(Transport::Udp, TicketLimits::default());
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_bind(&a, relay, sid, &ta, WAIT).await.unwrap();
    udp_bind(&b, relay, sid, &tb, WAIT).await.unwrap();
    assert_eq!(handle.metrics().udp_sessions.load(Relaxed), 1);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(handle.metrics().udp_sessions.load(Relaxed), 0);
    // Data for the expired session goes nowhere.
    a.send_to(&wire::encode_udp(UdpKind::Data, sid, b"late"), relay)
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_millis(300), b.recv_from(&mut buf)).await;
    assert!(
        r.is_err()
            || wire::decode_udp(&buf[..r.unwrap().unwrap().0])
                .unwrap()
                .kind
                != UdpKind::Data
    );
}

/// On IPv6 the responder reports the hop limit it observed (`IPV6_RECVHOPLIMIT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_echo_reports_the_ipv6_hop_limit() {
    let mut cfg = config();
    cfg.listen.probe = Some("[::1]:0".parse().unwrap());
    let (addrs, _h, _t) = start(cfg).await;
    let relay = addrs.probe.unwrap();
    let s = UdpSocket::bind("[::1]:0").await.unwrap();
    for hops in [64u32, 7] {
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6Ttl, &(hops as i32))
            .unwrap();
        let req = wire::encode_probe(&Probe::EchoRequest {
            seq: hops,
            client_ts: 1,
            len: wire::ECHO_LEN,
        });
        s.send_to(&req, relay).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        match wire::decode_probe(&buf[..n]).unwrap() {
            Probe::EchoReply { seq, ttl, .. } => {
                assert_eq!((seq, u32::from(ttl)), (hops, hops), "hop limit seen on ::1");
            }
            p => panic!("{p:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_echo_reports_ttl_and_is_never_larger_than_the_request() {
    let (addrs, _h, _t) = start(config()).await;
    let relay = addrs.probe.unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = [0u8; 2048];
    for (seq, len) in [(1u32, wire::ECHO_LEN), (2, 100), (3, 1200)] {
        let req = wire::encode_probe(&Probe::EchoRequest {
            seq,
            client_ts: 42,
            len,
        });
        s.send_to(&req, relay).await.unwrap();
        let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n <= req.len());
        match wire::decode_probe(&buf[..n]).unwrap() {
            Probe::EchoReply {
                seq: s2,
                client_ts,
                ttl,
                load,
                draining,
                ..
            } => {
                assert_eq!((s2, client_ts, draining), (seq, 42, false));
                assert_eq!(ttl, 64, "loopback TTL as seen via IP_RECVTTL");
                assert!(load <= 100);
            }
            p => panic!("{p:?}"),
        }
    }
    // Too short: no answer at all.
    s.send_to(b"SYP\x01\0\0\0\x09", relay).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf))
            .await
            .is_err()
    );
    // Burst: cookie first, then a capped burst.
    let ask = |cookie| {
        wire::encode_probe(&Probe::BurstRequest {
            seq: 7,
            cookie,
            packets: 10,
            packet_len: 1000,
        })
    };
    s.send_to(&ask([0; 16]), relay).await.unwrap();
    let (n, _) = tokio::time::timeout(WAIT, s.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let Ok(Probe::BurstCookie { cookie, .. }) = wire::decode_probe(&buf[..n]) else {
        panic!()
    };
    assert!(n <= ask(cookie).len());
    s.send_to(&ask(cookie), relay).await.unwrap();
    let mut got = 0;
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
    {
        assert!(matches!(
            wire::decode_probe(&buf[..n]),
            Ok(Probe::BurstData { count: 10, .. })
        ));
        assert_eq!(n, 1000);
        got += 1;
    }
    assert_eq!(got, 10);
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_report_load_and_draining() {
    let (addrs, handle, task) = start(config()).await;
    let http = addrs.http.unwrap();
    let (sid, ta, tb) = pair(Transport::Udp, TicketLimits::default());
    let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp_bind(&a, addrs.udp.unwrap(), sid, &ta, WAIT)
        .await
        .unwrap();
    udp_bind(&b, addrs.udp.unwrap(), sid, &tb, WAIT)
        .await
        .unwrap();
    let body = http_get(http, "/status").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(json["relay_id"], RELAY_ID);
    assert_eq!(json["active_sessions"], 1);
    assert_eq!(json["draining"], false);
    assert!(json["cpu_seconds_total"].is_number());
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.contains("steelyard_relay_active_sessions 1"),
        "{metrics}"
    );
    assert!(metrics.contains("steelyard_relay_max_sessions 10000"));
    handle.drain();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let json = http_get(http, "/status").await;
    assert!(json.contains("\"draining\":true"), "{json}");
    // The live UDP session keeps the relay up until the 2 s grace ends, then it exits.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}

/// The UDP thread ends with the relay, also when the relay's future is dropped (its task
/// aborted): the UDP port is free again soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_relay_frees_its_udp_port() {
    let relay = steelyard_relay::Relay::bind(config()).await.unwrap();
    let udp = relay.addrs().udp.unwrap();
    let task = tokio::spawn(relay.run());
    tokio::time::sleep(Duration::from_millis(100)).await;
    task.abort();
    let _ = task.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::UdpSocket::bind(udp) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "UDP port still held: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
