//! End-to-end encrypted tunnels through a real in-process relay on loopback, with a test-only
//! TCP man-in-the-middle between agent A and the relay that records (and may alter) every byte
//! the relay receives from A and forwards to A.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use steelyard_agent::tunnel::{bridge, Role, StaticKeypair, Tunnel, TunnelConfig, TunnelError};
use steelyard_relay::client::dial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MARKER: &[u8] = b"STEELYARD-PLAINTEXT-MARKER";

/// Which direction a MITM alters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToRelay,
}

struct Mitm {
    addr: SocketAddr,
    to_relay: Arc<Mutex<Vec<u8>>>,
    from_relay: Arc<Mutex<Vec<u8>>>,
}

/// Accepts one connection and pipes it to `relay`, recording both directions; flips the low
/// bit of the byte at `flip.1` in direction `flip.0`.
async fn mitm(relay: SocketAddr, flip: Option<(Dir, usize)>) -> Mitm {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let to_relay = Arc::new(Mutex::new(Vec::new()));
    let from_relay = Arc::new(Mutex::new(Vec::new()));
    let (tr, fr) = (to_relay.clone(), from_relay.clone());
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let upstream = TcpStream::connect(relay).await.unwrap();
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let f = flip.filter(|(d, _)| *d == Dir::ToRelay).map(|(_, at)| at);
        tokio::join!(pipe(cr, uw, tr, f), pipe(ur, cw, fr, None));
    });
    Mitm {
        addr,
        to_relay,
        from_relay,
    }
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    log: Arc<Mutex<Vec<u8>>>,
    flip_at: Option<usize>,
) {
    let mut buf = vec![0u8; 65536];
    let mut offset = 0usize;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip_at {
            if (offset..offset + n).contains(&at) {
                buf[at - offset] ^= 1;
            }
        }
        log.lock().unwrap().extend_from_slice(&buf[..n]);
        offset += n;
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

fn configs() -> (TunnelConfig, TunnelConfig) {
    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let cfg = |role, local: &StaticKeypair, remote: &StaticKeypair| TunnelConfig {
        role,
        local: local.clone(),
        remote_public: remote.public,
        binding: b"test-session".to_vec(),
        handshake_timeout: common::WAIT,
    };
    (cfg(Role::Initiator, &a, &b), cfg(Role::Responder, &b, &a))
}

/// Both sides dial the relay (A through `a_via`) and wait until paired.
async fn relayed_pair(a_via: SocketAddr, relay: SocketAddr) -> (TcpStream, TcpStream) {
    let (_, ta, tb) = common::tcp_pair();
    let (a, b) = tokio::join!(
        dial(a_via, &ta, common::WAIT),
        dial(relay, &tb, common::WAIT)
    );
    (a.unwrap(), b.unwrap())
}

/// `len` bytes of pseudo-random data with [`MARKER`] every 1000 bytes.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for at in (0..len.saturating_sub(MARKER.len())).step_by(1000) {
        v[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes `data` then half-closes, while reading everything until EOF; returns the checksum
/// of what was read and its length.
async fn exchange(s: TcpStream, data: Vec<u8>) -> (u64, usize) {
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        for c in data.chunks(50_000) {
            w.write_all(c).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut buf = vec![0u8; 65536];
        let (mut h, mut total) = (0xcbf29ce484222325u64, 0usize);
        let mut carry = Vec::new();
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
            carry.extend_from_slice(&buf[..n]);
            let whole = carry.len() / 8 * 8;
            h = common::mix(h, &carry[..whole]);
            carry.drain(..whole);
        }
        (common::mix(h, &carry), total)
    };
    tokio::join!(writer, reader).1
}

fn checksum(data: &[u8]) -> u64 {
    common::mix(0xcbf29ce484222325, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_tunnel_moves_mib_both_ways_intact_and_relay_sees_only_ciphertext() {
    // 3 MiB each way; `STEELYARD_TUNNEL_TEST_MIB` (1..=256) changes it for a throughput run.
    let mib = std::env::var("STEELYARD_TUNNEL_TEST_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(3)
        .clamp(1, 256);
    let (up_len, down_len) = (mib << 20, mib << 20);
    let (addrs, _handle, _task) = common::start(common::config(false)).await;
    let m = mitm(addrs.tcp, None).await;
    let (ca, cb) = configs();
    let up = payload(up_len, 1);
    let down = payload(down_len, 2);
    let (up_sum, down_sum) = (checksum(&up), checksum(&down));
    assert!(contains(&up, MARKER) && contains(&down, MARKER));

    // B's service: reads everything, sends `down`, half-closes.
    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    let service_task = tokio::spawn(async move {
        let (s, _) = service.accept().await.unwrap();
        exchange(s, down).await
    });
    // A's local listener, where the user's app connects.
    let listen = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen_addr = listen.local_addr().unwrap();
    let app_task = tokio::spawn(async move {
        let s = TcpStream::connect(listen_addr).await.unwrap();
        exchange(s, up).await
    });

    let t0 = Instant::now();
    let (ra, rb) = relayed_pair(m.addr, addrs.tcp).await;
    let agent_a = tokio::spawn(async move {
        let (local, _) = listen.accept().await.unwrap();
        let t = Tunnel::handshake(ra, &ca).await.unwrap();
        bridge(local, t).await
    });
    let agent_b = tokio::spawn(async move {
        let local = TcpStream::connect(service_addr).await.unwrap();
        let t = Tunnel::handshake(rb, &cb).await.unwrap();
        bridge(local, t).await
    });
    let limit = Duration::from_secs(120);
    let (got_at_service, got_at_app) = tokio::time::timeout(limit, async {
        (service_task.await.unwrap(), app_task.await.unwrap())
    })
    .await
    .expect("transfer finished in time");
    let elapsed = t0.elapsed();
    let sa = agent_a.await.unwrap().unwrap();
    let sb = agent_b.await.unwrap().unwrap();
    assert_eq!(got_at_service, (up_sum, up_len));
    assert_eq!(got_at_app, (down_sum, down_len));
    assert_eq!((sa.sent, sa.received), (up_len as u64, down_len as u64));
    assert_eq!((sb.sent, sb.received), (down_len as u64, up_len as u64));
    eprintln!(
        "tunnel ({} build, through a test proxy): {} MiB each way at once in {:?} = {:.1} MiB/s total",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        up_len >> 20,
        elapsed,
        (up_len + down_len) as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
    );

    // What the relay received from A and forwarded to A: ciphertext only.
    let to_relay = m.to_relay.lock().unwrap();
    let from_relay = m.from_relay.lock().unwrap();
    assert!(
        to_relay.len() > up_len && from_relay.len() > down_len,
        "capture saw the transfer"
    );
    assert!(
        !contains(&to_relay, MARKER),
        "plaintext marker reached the relay"
    );
    assert!(!contains(&from_relay, MARKER), "relay forwarded plaintext");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_ends_the_tunnel_with_authentication_failed() {
    let (addrs, _handle, _task) = common::start(common::config(false)).await;
    // Past the hello (< 300 B) and the handshake (< 200 B): inside the data frames.
    let m = mitm(addrs.tcp, Some((Dir::ToRelay, 100_000))).await;
    let (ca, cb) = configs();
    let (ra, rb) = relayed_pair(m.addr, addrs.tcp).await;
    let (ta, tb) = tokio::join!(Tunnel::handshake(ra, &ca), Tunnel::handshake(rb, &cb));
    let (_ra, mut wa) = ta.unwrap().split();
    let (mut rb, _wb) = tb.unwrap().split();
    let sender = tokio::spawn(async move {
        let data = payload(1 << 20, 3);
        // The write may fail once B gives up; either way it ends.
        let _ = wa.send(&data).await;
        let _ = wa.finish().await;
    });
    let mut got = 0usize;
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rb.recv().await {
                Ok(Some(d)) => got += d.len(),
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("receiver finished in time")
    .expect("tampering must be detected");
    assert!(matches!(err, TunnelError::AuthenticationFailed), "{err}");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    assert!(
        got < 100_000,
        "nothing after the altered frame is delivered ({got})"
    );
    drop(rb);
    drop(_wb);
    let _ = tokio::time::timeout(Duration::from_secs(10), sender).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_static_key_fails_the_handshake_on_both_sides() {
    let (addrs, _handle, _task) = common::start(common::config(false)).await;
    let (ca, mut cb) = configs();
    // B expects someone else's key for A.
    cb.remote_public = StaticKeypair::generate().unwrap().public;
    let (ra, rb) = relayed_pair(addrs.tcp, addrs.tcp).await;
    let t0 = Instant::now();
    let (ta, tb) = tokio::join!(Tunnel::handshake(ra, &ca), Tunnel::handshake(rb, &cb));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "fails fast, not by timeout"
    );
    let eb = tb.unwrap_err();
    assert!(
        matches!(&eb, TunnelError::Handshake(m) if m.contains("did not verify")),
        "{eb}"
    );
    let ea = ta.unwrap_err();
    assert!(matches!(&ea, TunnelError::Handshake(_)), "{ea}");
    assert!(ea.to_string().starts_with("handshake failed"), "{ea}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cuts_the_stream_is_reported_as_truncation() {
    let (addrs, handle, task) = common::start(common::config(false)).await;
    let (ca, cb) = configs();
    let (ra, rb) = relayed_pair(addrs.tcp, addrs.tcp).await;
    let (ta, tb) = tokio::join!(Tunnel::handshake(ra, &ca), Tunnel::handshake(rb, &cb));
    let (_ra, mut wa) = ta.unwrap().split();
    let (mut rb, _wb) = tb.unwrap().split();
    wa.send(b"first").await.unwrap();
    assert_eq!(rb.recv().await.unwrap(), Some(&b"first"[..]));
    // The relay goes away (drain with a 1 s grace, then cut) while the tunnel is open.
    handle.drain();
    let err = tokio::time::timeout(Duration::from_secs(10), rb.recv())
        .await
        .expect("cut seen in time")
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Truncated | TunnelError::Io(_)),
        "{err}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
