//! A resumable tunnel survives the death of its relay: the relay is killed mid-transfer, both
//! agents move to a second relay, and every byte arrives exactly once; a newer tunnel replaces
//! one that still looks alive on the accepting side; a failed reconnect is a clear error; a
//! local reset on one side ends the other at once.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use steelyard_agent::resume::{resumable_bridge, ResumeConfig};
use steelyard_agent::tunnel::{Role, StaticKeypair, Tunnel, TunnelConfig, TunnelError};
use steelyard_relay::client::dial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes the first half of `data`, waits for `gate`, writes the rest and half-closes, while
/// reading to EOF; counts bytes read in `progress`.
async fn exchange(
    s: TcpStream,
    data: Vec<u8>,
    progress: Arc<AtomicU64>,
    mut gate: watch::Receiver<bool>,
) -> (u64, usize) {
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        let (first, second) = data.split_at(data.len() / 2);
        w.write_all(first).await.unwrap();
        gate.wait_for(|open| *open).await.unwrap();
        for c in second.chunks(32 * 1024) {
            w.write_all(c).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let reader = async move {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            progress.fetch_add(n as u64, Relaxed);
        }
        (common::mix(0xcbf29ce484222325, &all), all.len())
    };
    tokio::join!(writer, reader).1
}

async fn dial_and_handshake(
    relay: SocketAddr,
    ticket: Vec<u8>,
    cfg: TunnelConfig,
) -> Result<Tunnel<TcpStream>, TunnelError> {
    let s = dial(relay, &ticket, common::WAIT)
        .await
        .map_err(|e| TunnelError::Io(std::io::Error::other(e.to_string())))?;
    Tunnel::handshake(s, &cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_resumes_on_a_second_relay_without_losing_a_byte() {
    const UP: usize = 2 << 20;
    const DOWN: usize = 2 << 20;
    let mut c1 = common::config(false);
    c1.drain.grace_secs = 0;
    let (r1, h1, t1) = common::start(c1).await;
    let (r2, _h2, _t2) = common::start(common::config(false)).await;

    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let tcfg = |role, local: &StaticKeypair, remote: &StaticKeypair| TunnelConfig {
        role,
        local: local.clone(),
        remote_public: remote.public,
        binding: b"resumable-session".to_vec(),
        handshake_timeout: common::WAIT,
    };
    let (ca, cb) = (tcfg(Role::Initiator, &a, &b), tcfg(Role::Responder, &b, &a));
    let (_, ta1, tb1) = common::tcp_pair();
    let (_, ta2, tb2) = common::tcp_pair();

    let up = payload(UP, 5);
    let down = payload(DOWN, 6);
    let (up_sum, down_sum) = (
        common::mix(0xcbf29ce484222325, &up),
        common::mix(0xcbf29ce484222325, &down),
    );
    let app_progress = Arc::new(AtomicU64::new(0));
    let service_progress = Arc::new(AtomicU64::new(0));

    let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = service.local_addr().unwrap();
    let (gate_tx, gate) = watch::channel(false);
    let sp = service_progress.clone();
    let g = gate.clone();
    let service_task = tokio::spawn(async move {
        let (s, _) = service.accept().await.unwrap();
        exchange(s, down, sp, g).await
    });
    let listen = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listen_addr = listen.local_addr().unwrap();
    let ap = app_progress.clone();
    let app_task = tokio::spawn(async move {
        let s = TcpStream::connect(listen_addr).await.unwrap();
        exchange(s, up, ap, gate).await
    });

    let rcfg = ResumeConfig {
        max_replay: 256 << 10,
        ack_every: 32 << 10,
        max_resumes: 2,
        ..ResumeConfig::default()
    };
    let (rcfg_a, rcfg_b) = (rcfg.clone(), rcfg);
    let (ca2, cb2) = (ca.clone(), cb.clone());
    let agent_a = tokio::spawn(async move {
        let (local, _) = listen.accept().await.unwrap();
        let t = dial_and_handshake(r1.tcp, ta1, ca).await.unwrap();
        let reconnect = move |_attempt| dial_and_handshake(r2.tcp, ta2.clone(), ca2.clone());
        resumable_bridge(local, t, reconnect, &rcfg_a).await
    });
    let agent_b = tokio::spawn(async move {
        let local = TcpStream::connect(service_addr).await.unwrap();
        let t = dial_and_handshake(r1.tcp, tb1, cb).await.unwrap();
        let reconnect = move |_attempt| dial_and_handshake(r2.tcp, tb2.clone(), cb2.clone());
        resumable_bridge(local, t, reconnect, &rcfg_b).await
    });

    // Kill relay 1 once some data has moved both ways; the second half of each direction is
    // only sent after it is dead, so the tunnel must move to relay 2 to finish.
    let t0 = Instant::now();
    while app_progress.load(Relaxed) < 256 << 10 || service_progress.load(Relaxed) < 256 << 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no progress through relay 1"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (at_kill_app, at_kill_service) =
        (app_progress.load(Relaxed), service_progress.load(Relaxed));
    h1.drain();
    tokio::time::timeout(Duration::from_secs(10), t1)
        .await
        .expect("relay 1 stopped")
        .unwrap();
    assert!(at_kill_app <= DOWN as u64 / 2 && at_kill_service <= UP as u64 / 2);
    gate_tx.send(true).unwrap();

    let limit = Duration::from_secs(120);
    let (got_service, got_app) = tokio::time::timeout(limit, async {
        (service_task.await.unwrap(), app_task.await.unwrap())
    })
    .await
    .expect("transfer finished in time");
    let sa = agent_a.await.unwrap().unwrap();
    let sb = agent_b.await.unwrap().unwrap();
    assert_eq!(
        got_service,
        (up_sum, UP),
        "service got every byte once, in order"
    );
    assert_eq!(
        got_app,
        (down_sum, DOWN),
        "app got every byte once, in order"
    );
    assert_eq!((sa.sent, sa.received), (UP as u64, DOWN as u64));
    assert_eq!((sb.sent, sb.received), (DOWN as u64, UP as u64));
    assert_eq!((sa.resumes, sb.resumes), (1, 1));
    eprintln!(
        "killed relay 1 after {at_kill_app} B down / {at_kill_service} B up; resumed on relay 2; \
         retransmitted A {} B, B {} B; total {:?}",
        sa.retransmitted,
        sb.retransmitted,
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reconnect_is_a_clear_error() {
    let mut c1 = common::config(false);
    c1.drain.grace_secs = 0;
    let (r1, h1, _t1) = common::start(c1).await;
    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let ca = TunnelConfig {
        role: Role::Initiator,
        local: a.clone(),
        remote_public: b.public,
        binding: vec![1],
        handshake_timeout: common::WAIT,
    };
    let cb = TunnelConfig {
        role: Role::Responder,
        local: b,
        remote_public: a.public,
        binding: vec![1],
        handshake_timeout: common::WAIT,
    };
    let (_, ta, tb) = common::tcp_pair();
    let (ta, tb) = tokio::join!(
        dial_and_handshake(r1.tcp, ta, ca),
        dial_and_handshake(r1.tcp, tb, cb)
    );
    let (ta, _tb) = (ta.unwrap(), tb.unwrap());
    // A local connection that stays open, and a relay that dies; no relay to move to.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (local, _) = l.accept().await.unwrap();
    let dead = common::dead_addr().await;
    let (_, ticket, _) = common::tcp_pair();
    let bridge = tokio::spawn(async move {
        let reconnect = move |_| {
            let cfg = TunnelConfig {
                role: Role::Initiator,
                local: a.clone(),
                remote_public: [0; 32],
                binding: vec![1],
                handshake_timeout: Duration::from_secs(1),
            };
            dial_and_handshake(dead, ticket.clone(), cfg)
        };
        resumable_bridge(local, ta, reconnect, &ResumeConfig::default()).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    h1.drain();
    let err = tokio::time::timeout(Duration::from_secs(10), bridge)
        .await
        .expect("bridge ended in time")
        .unwrap()
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("reconnect after a tunnel failure failed"),
        "{err}"
    );
    drop(app);
}

/// A relay that stops forwarding may close the opening side's connection and leave the
/// accepting side's open: the accepting side still sees a live tunnel when the opening side has
/// moved on. The new tunnel, offered through `preempt`, replaces the old one, and the stream
/// completes with every byte once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tunnel_preempts_one_that_still_looks_alive() {
    use steelyard_agent::resume::resumable_bridge_preemptible;
    use tokio::io::DuplexStream;
    const LEN: usize = 1 << 20;

    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let tcfg = |role, local: &StaticKeypair, remote: &StaticKeypair| TunnelConfig {
        role,
        local: local.clone(),
        remote_public: remote.public,
        binding: b"preempt".to_vec(),
        handshake_timeout: common::WAIT,
    };
    let (ca, cb) = (tcfg(Role::Initiator, &a, &b), tcfg(Role::Responder, &b, &a));

    // Tunnel 1 through a "relay" that forwards until `stop`; then it closes A's side and keeps
    // B's side open without forwarding anything.
    let (a1, relay_a) = tokio::io::duplex(1 << 16);
    let (b1, relay_b) = tokio::io::duplex(1 << 16);
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let (mut ar, mut aw) = tokio::io::split(relay_a);
        let (mut br, mut bw) = tokio::io::split(relay_b);
        let forward = async {
            tokio::join!(
                tokio::io::copy(&mut ar, &mut bw),
                tokio::io::copy(&mut br, &mut aw)
            )
        };
        let mut stop = stop;
        tokio::select! {
            _ = forward => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        drop((ar, aw));
        let _keep_b_open = (br, bw);
        std::future::pending::<()>().await;
    });
    let (ta1, tb1) = tokio::join!(Tunnel::handshake(a1, &ca), Tunnel::handshake(b1, &cb));
    let (ta1, tb1) = (ta1.unwrap(), tb1.unwrap());

    // Tunnel 2, direct; B's end is handed to its bridge through the preempt channel as soon as
    // A's handshake arrives.
    let (a2, b2) = tokio::io::duplex(1 << 16);
    let (newer_tx, newer_rx) = tokio::sync::mpsc::channel::<Tunnel<DuplexStream>>(1);
    let cb2 = cb.clone();
    tokio::spawn(async move {
        let t = Tunnel::handshake(b2, &cb2).await.unwrap();
        newer_tx.send(t).await.unwrap();
    });
    let a2 = Arc::new(std::sync::Mutex::new(Some(a2)));

    let (app, a_local) = tokio::io::duplex(1 << 16);
    let (service, b_local) = tokio::io::duplex(1 << 16);
    let cfg = ResumeConfig {
        max_replay: 128 << 10,
        ack_every: 16 << 10,
        max_resumes: 2,
        ..ResumeConfig::default()
    };
    let cfg_a = cfg.clone();
    let agent_a = tokio::spawn(async move {
        let reconnect = move |_| {
            let (s, ca) = (a2.lock().unwrap().take(), ca.clone());
            async move {
                let s = s.ok_or(TunnelError::Resume("A reconnects only once".into()))?;
                Tunnel::handshake(s, &ca).await
            }
        };
        resumable_bridge(a_local, ta1, reconnect, &cfg_a).await
    });
    let newer_rx = Arc::new(tokio::sync::Mutex::new(newer_rx));
    let agent_b = tokio::spawn(async move {
        let reconnect = |_| async { Err(TunnelError::Resume("B's old tunnel never fails".into())) };
        let preempt = move || {
            let rx = newer_rx.clone();
            async move {
                match rx.lock().await.recv().await {
                    Some(t) => t,
                    None => std::future::pending().await,
                }
            }
        };
        resumable_bridge_preemptible(b_local, tb1, reconnect, preempt, &cfg).await
    });
    // The service echoes.
    tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(service);
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });

    let data = payload(LEN, 9);
    let sum = common::mix(0xcbf29ce484222325, &data);
    let progress = Arc::new(AtomicU64::new(0));
    let (mut ar, mut aw) = tokio::io::split(app);
    let writer = tokio::spawn(async move {
        for c in data.chunks(16 << 10) {
            aw.write_all(c).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        aw.shutdown().await.unwrap();
    });
    let p = progress.clone();
    let reader = tokio::spawn(async move {
        let mut back = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = ar.read(&mut buf).await.unwrap();
            if n == 0 {
                break back;
            }
            back.extend_from_slice(&buf[..n]);
            p.fetch_add(n as u64, Relaxed);
        }
    });
    let t0 = Instant::now();
    while progress.load(Relaxed) < (LEN / 4) as u64 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop_tx.send(true).unwrap();
    let back = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the stream completed after the preemption")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), LEN);
    assert_eq!(common::mix(0xcbf29ce484222325, &back), sum);
    let (sa, sb) = (
        agent_a.await.unwrap().unwrap(),
        agent_b.await.unwrap().unwrap(),
    );
    assert_eq!((sa.resumes, sb.resumes), (1, 1));
    assert_eq!((sa.sent, sb.received), (LEN as u64, LEN as u64));
}

/// A local connection that fails (reset) on one side ends the stream on both at once: the
/// failing side sends an abort, and the other closes its local connection instead of waiting
/// for a resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_reset_aborts_the_peer_at_once() {
    use steelyard_agent::resume::ResumeError;
    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let tcfg = |role, local: &StaticKeypair, remote: &StaticKeypair| TunnelConfig {
        role,
        local: local.clone(),
        remote_public: remote.public,
        binding: b"abort".to_vec(),
        handshake_timeout: common::WAIT,
    };
    let (sa, sb) = tokio::io::duplex(1 << 16);
    let (ca, cb) = (tcfg(Role::Initiator, &a, &b), tcfg(Role::Responder, &b, &a));
    let (ta, tb) = tokio::join!(Tunnel::handshake(sa, &ca), Tunnel::handshake(sb, &cb));
    let (ta, tb) = (ta.unwrap(), tb.unwrap());

    // A's local side: a TCP connection the app resets.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (a_local, _) = l.accept().await.unwrap();
    // B's local side: the service, which must see its connection end.
    let (mut service, b_local) = tokio::io::duplex(1 << 16);
    let cfg = ResumeConfig::default();
    let cfg_b = cfg.clone();
    let never = |_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err::<Tunnel<tokio::io::DuplexStream>, _>(TunnelError::Resume("no resume".into()))
    };
    let agent_a = tokio::spawn(async move { resumable_bridge(a_local, ta, never, &cfg).await });
    let agent_b = tokio::spawn(async move { resumable_bridge(b_local, tb, never, &cfg_b).await });

    app.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    service.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    app.set_zero_linger().unwrap();
    drop(app);

    let t0 = Instant::now();
    let eb = tokio::time::timeout(Duration::from_secs(10), agent_b)
        .await
        .expect("B ended without waiting for a resume")
        .unwrap()
        .unwrap_err();
    assert!(matches!(eb, ResumeError::PeerAborted(_)), "{eb}");
    assert!(
        eb.to_string()
            .starts_with("the peer aborted the stream: its local connection failed"),
        "{eb}"
    );
    let ea = agent_a.await.unwrap().unwrap_err();
    assert!(matches!(ea, ResumeError::Local(_)), "{ea}");
    // The service's connection ended too (no half-close pretending the stream was complete:
    // it was dropped).
    let mut rest = Vec::new();
    let _ = service.read_to_end(&mut rest).await;
    eprintln!("abort reached B after {:?}: {eb}", t0.elapsed());
}
