//! A relay that goes silent (forwards nothing, closes nothing) under an idle resumable tunnel:
//! the keepalives notice within `dead_after`, both sides resume on a new tunnel, and the bytes
//! sent afterwards arrive exactly once. Idle periods longer than `dead_after` on a healthy
//! tunnel do not count as failures (the keepalives keep it alive). Real loopback sockets; the
//! "relay" is a forwarding task that can be told to swallow everything.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use steelyard_agent::resume::{resumable_bridge, ResumeConfig, ResumeStats};
use steelyard_agent::tunnel::{Role, StaticKeypair, Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// Copies `from` to `to` until `silent` turns true; from then on reads and drops everything
/// (no FIN, no RST: a relay or a path gone silent).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !*silent.borrow() && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A tunnel pair through a forwarder that goes silent when `silent` says so.
async fn through_silenceable_relay(
    silent: &watch::Receiver<bool>,
) -> (TcpStream, TcpStream, Vec<tokio::task::JoinHandle<()>>) {
    let (a, ra) = tcp_pair().await;
    let (rb, b) = tcp_pair().await;
    let (ra_r, ra_w) = ra.into_split();
    let (rb_r, rb_w) = rb.into_split();
    let tasks = vec![
        tokio::spawn(forward(ra_r, rb_w, silent.clone())),
        tokio::spawn(forward(rb_r, ra_w, silent.clone())),
    ];
    (a, b, tasks)
}

fn cfg(role: Role, local: &StaticKeypair, remote: &StaticKeypair) -> TunnelConfig {
    TunnelConfig {
        role,
        local: local.clone(),
        remote_public: remote.public,
        binding: b"keepalive".to_vec(),
        handshake_timeout: Duration::from_secs(10),
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_relay_under_an_idle_tunnel_is_noticed_and_the_tunnel_resumes() {
    let rcfg = ResumeConfig {
        keepalive: Duration::from_millis(100),
        dead_after: Duration::from_millis(600),
        ..ResumeConfig::default()
    };
    let (a_key, b_key) = (
        StaticKeypair::generate().unwrap(),
        StaticKeypair::generate().unwrap(),
    );
    let (ca, cb) = (
        cfg(Role::Initiator, &a_key, &b_key),
        cfg(Role::Responder, &b_key, &a_key),
    );
    let (silent_tx, silent) = watch::channel(false);
    let (ta, tb, _fwd) = through_silenceable_relay(&silent).await;
    // The second "relay": a plain loopback listener B accepts on and A dials.
    let second = Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
    let second_addr: SocketAddr = second.local_addr().unwrap();

    let (app, a_local) = tcp_pair().await;
    let (b_local, service) = tcp_pair().await;
    let (ca2, cb2) = (ca.clone(), cb.clone());
    let (ra, rb) = (rcfg.clone(), rcfg.clone());
    let agent_a = tokio::spawn(async move {
        let first = Tunnel::handshake(ta, &ca).await.unwrap();
        let reconnect = move |_| {
            let c = ca2.clone();
            async move { Tunnel::handshake(TcpStream::connect(second_addr).await?, &c).await }
        };
        resumable_bridge(a_local, first, reconnect, &ra).await
    });
    let agent_b = tokio::spawn(async move {
        let first = Tunnel::handshake(tb, &cb).await.unwrap();
        let reconnect = move |_| {
            let (l, c) = (second.clone(), cb2.clone());
            async move { Tunnel::handshake(l.accept().await?.0, &c).await }
        };
        resumable_bridge(b_local, first, reconnect, &rb).await
    });

    let (first_part, second_part) = (data(64 * 1024, 1), data(64 * 1024, 2));
    let (mut app_r, mut app_w) = app.into_split();
    let (mut svc_r, mut svc_w) = service.into_split();
    let run = async {
        app_w.write_all(&first_part).await.unwrap();
        let mut got = vec![0u8; first_part.len()];
        svc_r.read_exact(&mut got).await.unwrap();
        assert!(got == first_part);
        // Idle for 3 × dead_after on a healthy tunnel: keepalives, no failure.
        tokio::time::sleep(rcfg.dead_after * 3).await;
        // The relay goes silent while the tunnel idles; then the application sends more.
        silent_tx.send(true).unwrap();
        app_w.write_all(&second_part).await.unwrap();
        app_w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        svc_r.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest == second_part,
            "the bytes after the cut arrive once, in order"
        );
        svc_w.write_all(b"done").await.unwrap();
        svc_w.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app_r.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the stream did not complete within 30 s of a silent relay (no keepalive?)");
    let sa: ResumeStats = agent_a.await.unwrap().unwrap();
    let sb: ResumeStats = agent_b.await.unwrap().unwrap();
    assert_eq!(
        (sa.resumes, sb.resumes),
        (1, 1),
        "exactly one resume each: the silent relay, not the idle time"
    );
    assert_eq!(
        (sa.sent, sa.received, sb.sent, sb.received),
        (128 * 1024, 4, 4, 128 * 1024)
    );
}
