//! The whole main job with real processes: a `steelyard broker`, a `steelyard relay` that
//! trusts the broker's published ticket key, two `steelyard agent`s (alice and bob) and
//! `steelyard connect` on alice's side. A real HTTP request through alice's listener gets the
//! answer of the HTTP server behind bob; then 100 concurrent tunnels each move 256 KiB through
//! an echo service behind bob and get it back intact (checksummed), under the broker's default
//! limits; the broker's session history shows every session ended with an end-to-end RTT. A
//! UDP service behind bob (`udp:` in bob's `[services]`, `steelyard connect --udp` on alice's
//! side) echoes datagrams from two client sockets, each its own flow, up to a 60,000-byte
//! datagram, every one intact.
//!
//! Relay load: the relay process is started without a broker link; the test feeds the broker
//! the relay's load over the relay WebSocket under the relay's pre-registered identity, as
//! `broker_connect.rs` does.

mod broker_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use broker_support::*;
use steelyard_agent::daemon::open_via_agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tiny HTTP/1.1 responder: reads the request head, answers a fixed body, closes.
async fn http_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "hello from bob's HTTP service";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A UDP echo service; counts the datagrams it answered.
async fn udp_echo_service() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    (addr, count)
}

async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bob\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn echo_round(addr: SocketAddr, i: u32, len: usize) -> (u64, u64, usize) {
    let data: Vec<u8> = (0..len)
        .map(|k| (k as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
        .collect();
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = fnv(&data);
    let writer = async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut back = Vec::with_capacity(len);
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(writer, reader);
    (sent, fnv(&back), back.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_concurrent_tunnels_through_broker_relay_and_agents() {
    let t0 = Instant::now();
    let dir = temp_dir("agent-e2e");
    // Broker, relay r1 and r1's load feed (see the module docs).
    let bed = BrokerWithRelay::start(&dir).await;
    let addr = bed.broker.addr;

    let http = http_service().await;
    let echo = echo_service().await;
    let (udp_echo, udp_answered) = udp_echo_service().await;
    let (_alice, ctl_a) = start_agent(&dir, addr, "alice", "");
    let (_bob, _) = start_agent(
        &dir,
        addr,
        "bob",
        &format!(
            "[services]\nhttp = \"{http}\"\necho = \"{echo}\"\ndns = \"udp:{udp_echo}\"\n\
             [offers]\nallow = [\"alice\"]\n"
        ),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("bob.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the identity key is private");
    }

    let (http_port, echo_port) = (free_port(), free_port());
    let ctl = ctl_a.to_string();
    let (_c1, line) = start(&[
        "connect",
        "bob",
        "http",
        "--listen",
        &format!("127.0.0.1:{http_port}"),
        "--control",
        &ctl,
    ]);
    assert!(line.contains("listening="), "{line}");
    let (_c2, _) = start(&[
        "connect",
        "bob",
        "echo",
        "--listen",
        &format!("127.0.0.1:{echo_port}"),
        "--control",
        &ctl,
    ]);

    // Until both agents have reported, the broker has no common relay: retry for up to 30 s.
    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let response = loop {
        match http_get(http_addr).await {
            Ok(r) if r.contains("200 OK") => break r,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "no HTTP response through the tunnel within 30 s: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(
        response.ends_with("hello from bob's HTTP service"),
        "{response}"
    );
    let first = t0.elapsed();

    // UDP: two client sockets, each its own flow and tunnel; every datagram echoed intact.
    let udp_port = free_udp_port();
    let (_c3, line) = start(&[
        "connect",
        "bob",
        "dns",
        "--udp",
        "--listen",
        &format!("127.0.0.1:{udp_port}"),
        "--control",
        &ctl,
    ]);
    assert!(line.contains("listening=udp:"), "{line}");
    let mut clients = Vec::new();
    for _ in 0..2 {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(("127.0.0.1", udp_port)).await.unwrap();
        clients.push(c);
    }
    let mut buf = vec![0u8; 65536];
    let mut sent = 0u64;
    for i in 0..40usize {
        let c = &clients[i % 2];
        let len = if i == 39 { 60_000 } else { 1 + i * 97 };
        let d: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
        c.send(&d).await.unwrap();
        sent += 1;
        let n = tokio::time::timeout(Duration::from_secs(15), c.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no echo of UDP datagram {i} ({len} bytes) within 15 s"))
            .unwrap();
        assert!(
            buf[..n] == d[..],
            "UDP datagram {i} came back altered ({n} of {len} bytes)"
        );
    }
    assert_eq!(
        udp_answered.load(std::sync::atomic::Ordering::Relaxed),
        sent,
        "bob's UDP service answered every datagram once"
    );

    // 100 concurrent tunnels, 256 KiB each way, checksummed, under the broker's default limits
    // (16 pending connects, 100 messages/s, burst 200 per agent): 100 connects at once from
    // one agent, each with an offer reply and two session ends. The agents pace their messages
    // and queue connects beyond the pending limit instead of having them refused.
    let echo_addr: SocketAddr = format!("127.0.0.1:{echo_port}").parse().unwrap();
    let t1 = Instant::now();
    let len = 256 * 1024;
    let rounds: Vec<_> = (0..100)
        .map(|i| tokio::spawn(echo_round(echo_addr, i, len)))
        .collect();
    for (i, r) in rounds.into_iter().enumerate() {
        let (sent, back, n) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("tunnel finished within 60 s")
            .unwrap();
        assert_eq!(n, len, "tunnel {i} returned {n} bytes");
        assert_eq!(sent, back, "tunnel {i} checksum");
    }
    let concurrent = t1.elapsed();

    // Refusals are clear: a service bob does not expose, and a peer not in bob's allow list.
    let e = open_via_agent(ctl_a, "bob", "ssh").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("exposes no service \"ssh\" (it exposes: dns, echo, http)"),
        "{e}"
    );
    let (_carol, ctl_c) = start_agent(&dir, addr, "carol", "");
    let deadline = Instant::now() + Duration::from_secs(30);
    let e = loop {
        let e = open_via_agent(ctl_c, "bob", "http").await.unwrap_err();
        if e.to_string().contains("offers.allow") || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(
        e.to_string()
            .contains("peer carol is not in bob's offers.allow list"),
        "{e}"
    );
    let e = open_via_agent(ctl_a, "nobody", "http").await.unwrap_err();
    assert!(e.to_string().contains("unknown_peer"), "{e}");

    // The sessions end at the broker with the bytes and alice's end-to-end RTT. A generous
    // deadline: the reports are paced under the broker's message rate, and once (busy machine,
    // about 1 run in 30) 10 s was not enough; what is checked is that none is lost.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = admin_get_json(addr, "/v1/admin/sessions?limit=1000").await;
        let ended = s["history"]
            .as_array()
            .map(|h| {
                h.iter()
                    .filter(|r| {
                        r["state"] == "ended"
                            && r["relay"] == "r1"
                            && r["end_to_end_rtt_ms"].as_f64().is_some()
                    })
                    .inspect(|r| {
                        // Reported in whole microseconds, and shown so.
                        let rtt = r["end_to_end_rtt_ms"].to_string();
                        let decimals = rtt.split_once('.').map_or(0, |(_, d)| d.len());
                        assert!(decimals <= 3, "end-to-end RTT {rtt} ms in {r}");
                    })
                    .count()
            })
            .unwrap_or(0);
        // The HTTP request and the 100 echo tunnels (the UDP flows are still open): none of
        // their ends dropped.
        if ended >= 101 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ended} ended sessions with an end-to-end RTT: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "agent_e2e: first HTTP answer after {first:?} (start-up and first reports included); \
         100 x 256 KiB echoed in {concurrent:?}"
    );
    bed.stop();
}

/// The agent reaches a TLS broker with `wss://` and a `ca_file`, and refuses one whose
/// certificate its CA did not sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_connects_over_wss_with_its_ca_file() {
    let dir = temp_dir("agent-wss");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("other.pem"), other.cert.pem()).unwrap();
    let (_certified, config) = tls_config(&dir);
    let broker = BrokerProcess::start(&dir, &config);
    let port = broker.addr.port();
    let agent = |peer: &str, ca: &str| {
        let control = free_port();
        let path = dir.join(format!("{peer}.toml"));
        std::fs::write(
            &path,
            format!(
                "broker = \"wss://localhost:{port}\"\nca_file = \"{}\"\nenroll_token = \"{AGENT_TOKEN}\"\n\
                 peer_id = \"{peer}\"\nkey_file = \"{}\"\ncontrol = \"127.0.0.1:{control}\"\n",
                dir.join(ca).display(),
                dir.join(format!("{peer}.key")).display()
            ),
        )
        .unwrap();
        let (proc, _) = start(&["agent", "--config", path.to_str().unwrap()]);
        let ctl: SocketAddr = format!("127.0.0.1:{control}").parse().unwrap();
        (proc, ctl)
    };
    let (_good, good) = agent("alice", "cert.pem");
    let (_bad, bad) = agent("mallory", "other.pem");
    // Connected agents get the broker's verdict on an unknown peer; unconnected ones say so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let e = open_via_agent(good, "nobody", "x").await.unwrap_err();
        if e.to_string().contains("unknown_peer") {
            break;
        }
        assert!(Instant::now() < deadline, "alice never connected: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = open_via_agent(bad, "nobody", "x").await.unwrap_err();
    assert!(e.to_string().contains("not connected to the broker"), "{e}");
    broker.stop();
}
