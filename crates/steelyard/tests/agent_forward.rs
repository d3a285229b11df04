//! Forwards with real processes: `steelyard connect --listen` asks alice's agent to listen
//! itself, so a local client's bytes go client → agent → relay → bob's agent → service with no
//! `steelyard connect` process in between. Checked: tunnels through the forward echo data both
//! ways intact (checksummed); a tunnel accepted before `steelyard connect` is killed keeps
//! flowing after it (only possible when the agent owns the connection), while the listener
//! closes and its port can be bound again; a `[[forwards]]` entry in alice's config works the
//! same without any `steelyard connect`; a non-loopback listen address and a port in use are
//! refused with errors that say what to do, and `steelyard connect` exits with them; forwards
//! beyond `MAX_FORWARDS` are refused until one closes; when the agent stops, `steelyard
//! connect` exits with an error.
//!
//! Broker, relay and relay load feeding as in `agent_e2e.rs`.

mod broker_support;

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use broker_support::*;
use steelyard_agent::daemon::{forward_via_agent, MAX_FORWARDS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pattern(i: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|k| (k as u32).wrapping_mul(2654435761).wrapping_add(i) as u8)
        .collect()
}

/// Sends `len` bytes through `addr` (an echo service behind it) and returns the checksums of
/// what went and what came back, and how much came back.
async fn echo_round(addr: SocketAddr, i: u32, len: usize) -> std::io::Result<(u64, u64, usize)> {
    let data = pattern(i, len);
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let sent = fnv(&data);
    let writer = async move {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let reader = async move {
        let mut back = Vec::with_capacity(len);
        r.read_to_end(&mut back).await.map(|_| back)
    };
    let (w, back) = tokio::join!(writer, reader);
    w?;
    let back = back?;
    Ok((sent, fnv(&back), back.len()))
}

/// Writes `chunk` on `s` and reads the same number of bytes back; true when they match.
async fn echo_on(s: &mut TcpStream, chunk: &[u8]) -> bool {
    let (mut r, mut w) = s.split();
    let mut back = vec![0u8; chunk.len()];
    let (wr, rd) = tokio::join!(w.write_all(chunk), r.read_exact(&mut back));
    wr.is_ok() && rd.is_ok() && back == chunk
}

/// Waits at most 20 s for `child` (stderr piped) to exit; its exit status and stderr. Kills it
/// and panics with `late` when it still runs.
async fn exit_and_stderr(child: &mut Child, late: &str) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{late}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

/// Runs `steelyard connect` expecting it to fail: its stderr.
async fn connect_fails(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .arg("connect")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, err) = exit_and_stderr(
        &mut child,
        &format!("steelyard connect {args:?} was expected to fail but still runs after 20 s"),
    )
    .await;
    assert!(!status.success(), "steelyard connect {args:?} succeeded");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_run_in_the_agent() {
    let dir = temp_dir("agent-forward");
    // Broker, relay r1 and r1's load feed as in `agent_e2e.rs`.
    let bed = BrokerWithRelay::start(&dir).await;
    let addr = bed.broker.addr;

    let echo = echo_service().await;
    let static_port = free_port();
    let (alice, ctl_a) = start_agent(
        &dir,
        addr,
        "alice",
        &format!(
            "[[forwards]]\nlisten = \"127.0.0.1:{static_port}\"\npeer = \"bob\"\nservice = \"echo\"\n"
        ),
    );
    let (_bob, _) = start_agent(
        &dir,
        addr,
        "bob",
        &format!("[services]\necho = \"{echo}\"\n[offers]\nallow = [\"alice\"]\n"),
    );

    let ctl = ctl_a.to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (connect, line) = start(&[
        "connect",
        "bob",
        "echo",
        "--listen",
        &listen,
        "--control",
        &ctl,
    ]);
    assert!(line.contains(&format!("listening={listen}")), "{line}");
    let fwd: SocketAddr = listen.parse().unwrap();

    // Until both agents have reported, the broker has no common relay: retry for up to 30 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match echo_round(fwd, 0, 1000).await {
            Ok((a, b, 1000)) if a == b => break,
            other => assert!(
                Instant::now() < deadline,
                "no echo through the forward within 30 s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Data both ways, several tunnels at once, checksummed; the config's forward likewise.
    let len = 1 << 20;
    let static_fwd: SocketAddr = format!("127.0.0.1:{static_port}").parse().unwrap();
    let rounds: Vec<_> = (1..=8u32)
        .map(|i| {
            tokio::spawn(echo_round(
                if i % 2 == 0 { static_fwd } else { fwd },
                i,
                len,
            ))
        })
        .collect();
    for (i, r) in rounds.into_iter().enumerate() {
        let (sent, back, n) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("tunnel finished within 60 s")
            .unwrap()
            .unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
        assert_eq!((n, back), (len, sent), "tunnel {i}: length and checksum");
    }

    // A live tunnel, then `steelyard connect` killed: the listener closes (the port binds
    // again), and the tunnel the agent accepted keeps carrying bytes.
    let mut live = TcpStream::connect(fwd).await.unwrap();
    let chunk = pattern(99, 64 * 1024);
    assert!(echo_on(&mut live, &chunk).await, "live tunnel echoes");
    drop(connect); // kill + wait
    let deadline = Instant::now() + Duration::from_secs(10);
    let rebound = loop {
        match tokio::net::TcpListener::bind(fwd).await {
            Ok(l) => break l,
            Err(e) => assert!(
                Instant::now() < deadline,
                "port {port} still taken 10 s after `steelyard connect` was killed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(rebound);
    for i in 0..4 {
        let chunk = pattern(100 + i, 64 * 1024);
        let ok = tokio::time::timeout(Duration::from_secs(20), echo_on(&mut live, &chunk)).await;
        assert_eq!(
            ok,
            Ok(true),
            "round {i}: the tunnel accepted by the agent carries on after `steelyard connect` exits"
        );
    }
    drop(live);

    // Refusals: not loopback, port in use; `steelyard connect` exits with the agent's reason.
    let err = connect_fails(&[
        "bob",
        "echo",
        "--listen",
        &format!("0.0.0.0:{}", free_port()),
        "--control",
        &ctl,
    ])
    .await;
    assert!(
        err.contains("is not a loopback address") && err.contains("allow_remote_forwards"),
        "{err}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let err = connect_fails(&["bob", "echo", "--listen", &taken_addr, "--control", &ctl]).await;
    assert!(
        err.contains(&format!("cannot listen on {taken_addr}")) && err.contains("pick a free port"),
        "{err}"
    );
    drop(taken);

    // At most MAX_FORWARDS at once (the config's forwards aside); one closed makes room.
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut held = Vec::new();
    for i in 0..MAX_FORWARDS {
        let f = forward_via_agent(ctl_a, "bob", "echo", any)
            .await
            .unwrap_or_else(|e| panic!("forward {i}: {e}"));
        assert_ne!(f.listening.port(), 0);
        held.push(f);
    }
    let e = forward_via_agent(ctl_a, "bob", "echo", any)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("runs {MAX_FORWARDS} forwards already")),
        "{e}"
    );
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = forward_via_agent(ctl_a, "bob", "echo", any).await {
        assert!(
            Instant::now() < deadline,
            "no forward 10 s after one was closed: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);

    // The agent stops: `steelyard connect` exits with an error that says so.
    let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args([
            "connect",
            "bob",
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--control",
            &ctl,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.contains("listening=127.0.0.1:"), "{line}");
    drop(alice); // kill + wait
    let (status, err) = exit_and_stderr(
        &mut child,
        "steelyard connect still runs 20 s after its agent was killed",
    )
    .await;
    assert!(!status.success(), "{err}");
    assert!(err.contains("ended the forward"), "{err}");

    bed.stop();
}
