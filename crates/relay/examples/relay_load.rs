//! Benchmark load generator: one program drives the direct path, HAProxy and the relay, so the
//! client's cost is the same on every path.
//!
//! ```text
//! relay_load pubkey SEED_HEX
//! relay_load direct|haproxy|relay [--streams N] [--secs T] [--buf BYTES] [--both]
//!            [--target ADDR] [--listen ADDR] [--seed HEX --relay-id ID] [--pid PID]
//!            [--io threads|tokio] [--warmup-ms MS] [--congestion NAME]
//! relay_load udp --target RELAY_UDP --seed HEX --relay-id ID [--secs T] [--payload 200]
//!            [--max-datagrams N] [--pid PID] [--rate PER_SIDE [--burst N [--session-bursts K]]]
//!            [--sessions N]
//! relay_load idle relay|haproxy --sessions N --target ADDR [--listen ADDR] [--seed ...]
//!            [--ready-file PATH] [--hold SECS]
//! relay_load idle udp --sessions N --target RELAY_UDP --seed HEX --relay-id ID
//!            [--ready-file PATH] [--hold SECS]
//! ```
//!
//! * TCP: N streams, each a sender → receiver pair. `direct`: the receiver listens, the sender
//!   connects to it. `haproxy`: the sender connects to HAProxy's frontend (`--target`), which
//!   forwards to our listener (`--listen`, the backend HAProxy was configured with). `relay`:
//!   both sides dial the relay (`--target`) with tickets signed by `--seed` for `--relay-id`.
//!   Each sender writes `--buf`-byte buffers for `--secs` seconds after a warm-up (`--both`:
//!   the receivers send as well). Prints one JSON line: goodput over the measured window and,
//!   with `--pid`, the CPU seconds that process used in the window (`/proc/PID/stat`, 10 ms
//!   ticks; `path_run_s`: the same from `/proc/PID/task/*/schedstat`, in nanoseconds).
//!   `--congestion NAME` sets `TCP_CONGESTION` on every socket of the client before the data.
//! * `udp`: `--sessions` relay sessions (1; each its own pair of tickets and its own side A and
//!   side B sockets) carry `--payload`-byte datagrams between their sides for `--secs` seconds
//!   (at most `--max-datagrams` sent per side in all); prints the datagrams delivered per
//!   second, the relay's CPU seconds and every socket's port. Offered load, per side over all
//!   its sessions in turn: flat out (`--rate 0`), paced (`--rate R`: each side tops up to R/s
//!   every millisecond), or bursts (`--rate R --burst N`: side A sends N back to back every
//!   N/R s, and side B echoes each datagram on the socket it came in on, as turnutils_peer
//!   does). Which sessions a burst uses: by default datagram i of each burst goes on session
//!   i mod sessions (with N = sessions, one datagram per session per burst); with
//!   `--session-bursts K`, each whole burst goes on one session and the sessions take turns, K
//!   bursts each, which is what turnutils_uclient (`-m` allocations, `-n` messages each) was
//!   seen to do on the wire: K = n / N. Each side
//!   receives (and echoes) on all its sockets in one event loop, as those two programs do;
//!   sending is one blocking thread per side.
//! * `idle`: opens N paired sessions (through the relay, or through HAProxy to our listener),
//!   writes `--ready-file` when all are open, holds them `--hold` seconds, then exits. `idle
//!   udp`: N paired UDP relay sessions, all bound from one side A socket and one side B socket
//!   (a relay session is keyed by its id, so two sockets carry any number; the relay holds no
//!   descriptor per UDP session), counted open when the relay answered `paired` to both sides.
//!
//! `--io threads` (default) pumps with one blocking OS thread per socket end; `--io tokio` uses
//! one current-thread tokio runtime for all streams. Tickets signed from a seed are for
//! benchmarks only; real deployments get them from the broker.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
use steelyard_relay::client::{dial, udp_bind};
use steelyard_relay::wire::{self, StatusCode, UdpKind};

fn die(msg: &str) -> ! {
    eprintln!("relay_load: {msg}");
    std::process::exit(2)
}

struct Args {
    pos: Vec<String>,
    opt: HashMap<String, String>,
}

impl Args {
    fn parse() -> Self {
        let mut pos = Vec::new();
        let mut opt = HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                if k == "both" {
                    opt.insert(k.to_string(), "1".into());
                } else {
                    let v = it
                        .next()
                        .unwrap_or_else(|| die(&format!("--{k} needs a value")));
                    opt.insert(k.to_string(), v);
                }
            } else {
                pos.push(a);
            }
        }
        Self { pos, opt }
    }
    fn get<T: std::str::FromStr>(&self, k: &str, default: T) -> T {
        match self.opt.get(k) {
            Some(v) => v.parse().unwrap_or_else(|_| die(&format!("bad --{k}"))),
            None => default,
        }
    }
    fn req<T: std::str::FromStr>(&self, k: &str) -> T {
        let v = self
            .opt
            .get(k)
            .unwrap_or_else(|| die(&format!("--{k} is required")));
        v.parse().unwrap_or_else(|_| die(&format!("bad --{k}")))
    }
}

/// CPU seconds (user + system) used so far by process `pid` ("self" for this one).
fn cpu_secs(pid: &str) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

/// On-CPU seconds of every live thread of process `pid` from `/proc/PID/task/*/schedstat`
/// (nanoseconds, where `/proc/PID/stat` counts 10 ms ticks); time of exited threads is lost.
fn run_secs(pid: &str) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let s = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

struct Tickets {
    signer: TicketSigner,
    relay_id: String,
}

impl Tickets {
    fn from_args(a: &Args) -> Self {
        let seed: String = a.req("seed");
        let seed: [u8; 32] =
            steelyard_proto::hex::decode(&seed).unwrap_or_else(|_| die("bad --seed"));
        Self {
            signer: TicketSigner::from_seed(seed),
            relay_id: a.req("relay-id"),
        }
    }
    fn pair(&self, transport: Transport) -> (SessionId, Vec<u8>, Vec<u8>) {
        let mut id = [0u8; 16];
        getrandom::getrandom(&mut id).expect("randomness");
        let sid = SessionId(id);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let t = |side| {
            self.signer
                .sign(&Ticket {
                    key_id: self.signer.key_id(),
                    session_id: sid,
                    relay_id: self.relay_id.clone(),
                    side,
                    peer_id: "bench".into(),
                    issued_at: now - 1,
                    expires_at: now + 3600,
                    limits: TicketLimits::default(),
                    transport,
                })
                .expect("sign")
        };
        (sid, t(Side::A), t(Side::B))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Opens `n` connected (sender, receiver) pairs on the given path, at most `par` at once.
fn open_pairs(mode: &str, a: &Args, n: usize, par: usize) -> Vec<(TcpStream, TcpStream)> {
    let wait = Duration::from_secs(20);
    let mut out = Vec::with_capacity(n);
    match mode {
        "direct" | "haproxy" => {
            let listen: SocketAddr = a.get("listen", "127.0.0.1:0".parse().expect("addr"));
            let l = TcpListener::bind(listen).unwrap_or_else(|e| die(&format!("bind: {e}")));
            let target = if mode == "direct" {
                l.local_addr().expect("addr")
            } else {
                a.req("target")
            };
            for _ in 0..n {
                let s = TcpStream::connect_timeout(&target, wait)
                    .unwrap_or_else(|e| die(&format!("connect {target}: {e}")));
                let (r, _) = l.accept().unwrap_or_else(|e| die(&format!("accept: {e}")));
                let _ = s.set_nodelay(true);
                let _ = r.set_nodelay(true);
                out.push((s, r));
            }
        }
        "relay" => {
            let target: SocketAddr = a.req("target");
            let tickets = Tickets::from_args(a);
            rt().block_on(async {
                let mut left = n;
                while left > 0 {
                    let k = left.min(par);
                    let mut set = tokio::task::JoinSet::new();
                    for i in 0..k {
                        let (_, ta, tb) = tickets.pair(Transport::Tcp);
                        set.spawn(async move {
                            let (x, y) =
                                tokio::join!(dial(target, &ta, wait), dial(target, &tb, wait));
                            let x = x.unwrap_or_else(|e| die(&format!("dial A: {e}")));
                            let y = y.unwrap_or_else(|e| die(&format!("dial B: {e}")));
                            (i, x.into_std().expect("std"), y.into_std().expect("std"))
                        });
                    }
                    let mut got: Vec<_> = set.join_all().await;
                    got.sort_by_key(|g| g.0);
                    for (_, x, y) in got {
                        x.set_nonblocking(false).expect("blocking");
                        y.set_nonblocking(false).expect("blocking");
                        out.push((x, y));
                    }
                    left -= k;
                }
            });
        }
        _ => die("mode must be direct, haproxy or relay"),
    }
    if let Some(cc) = a.opt.get("congestion") {
        // Before any data: the sending ends' congestion control is the one that acts.
        for (x, y) in &out {
            for sock in [x, y] {
                nix::sys::socket::setsockopt(
                    sock,
                    nix::sys::socket::sockopt::TcpCongestion,
                    &std::ffi::OsString::from(cc),
                )
                .unwrap_or_else(|e| die(&format!("--congestion {cc}: {e}")));
            }
        }
    }
    out
}

struct Snap {
    t: Instant,
    bytes: u64,
    cpu: f64,
    own: f64,
    run: Option<f64>,
    switches: Option<u64>,
}

/// Context switches (voluntary and not) of every thread of process `pid` so far: how often
/// it went to sleep and was woken, or was preempted.
fn context_switches(pid: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let status = std::fs::read_to_string(task.ok()?.path().join("status")).ok()?;
        for line in status.lines() {
            if line.starts_with("voluntary_ctxt_switches:")
                || line.starts_with("nonvoluntary_ctxt_switches:")
            {
                total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
            }
        }
    }
    Some(total)
}

fn snap(bytes: &AtomicU64, pid: &Option<String>) -> Snap {
    Snap {
        t: Instant::now(),
        bytes: bytes.load(Relaxed),
        cpu: pid.as_deref().map_or(f64::NAN, cpu_secs),
        own: cpu_secs("self"),
        run: pid.as_deref().and_then(run_secs),
        switches: pid.as_deref().and_then(context_switches),
    }
}

fn report(kind: &str, mode: &str, extra: &str, s0: &Snap, s1: &Snap, unit: &str) {
    let secs = (s1.t - s0.t).as_secs_f64();
    let n = (s1.bytes - s0.bytes) as f64;
    let cpu = s1.cpu - s0.cpu;
    let cpu_json = if cpu.is_nan() {
        "null".to_string()
    } else {
        format!("{cpu:.3}")
    };
    let run = match (s0.run, s1.run) {
        (Some(a), Some(b)) => format!("{:.4}", b - a),
        _ => "null".into(),
    };
    let switches = match (s0.switches, s1.switches) {
        (Some(a), Some(b)) => (b - a).to_string(),
        _ => "null".into(),
    };
    println!(
        "{{\"kind\":\"{kind}\",\"mode\":\"{mode}\",{extra}\"secs\":{secs:.3},\"{unit}\":{n},\"per_sec\":{:.1},\"path_cpu_s\":{cpu_json},\"path_run_s\":{run},\"path_switches\":{switches},\"client_cpu_s\":{:.3}}}",
        n / secs,
        s1.own - s0.own
    );
}

fn pump_write<W: Write>(mut w: W, stop: &AtomicBool, size: usize) -> W {
    let buf = vec![0x5au8; size];
    while !stop.load(Relaxed) {
        if w.write_all(&buf).is_err() {
            break;
        }
    }
    w
}

fn pump_read<R: Read>(mut r: R, bytes: &AtomicU64, size: usize) {
    let mut buf = vec![0u8; size];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

fn tcp(mode: &str, a: &Args) {
    let streams: usize = a.get("streams", 1);
    let secs: f64 = a.get("secs", 5.0);
    let size: usize = a.get("buf", 128 * 1024);
    let warmup = Duration::from_millis(a.get("warmup-ms", 500));
    let both = a.opt.contains_key("both");
    let io: String = a.get("io", "threads".to_string());
    let pid: Option<String> = a.opt.get("pid").cloned();
    let pairs = open_pairs(mode, a, streams, 16);
    let bytes = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let extra = format!("\"streams\":{streams},\"both\":{both},\"io\":\"{io}\",");
    let measure = |bytes: &AtomicU64| {
        std::thread::sleep(warmup);
        let s0 = snap(bytes, &pid);
        std::thread::sleep(Duration::from_secs_f64(secs));
        let s1 = snap(bytes, &pid);
        (s0, s1)
    };
    let hard_deadline = Duration::from_secs_f64(secs) + warmup + Duration::from_secs(30);
    std::thread::spawn(move || {
        std::thread::sleep(hard_deadline);
        eprintln!("relay_load: streams did not finish in time; exiting");
        std::process::exit(1);
    });
    match io.as_str() {
        "threads" => {
            let mut hs = Vec::new();
            for (s, r) in pairs {
                let ends = if both {
                    vec![
                        (s.try_clone().expect("clone"), r.try_clone().expect("clone")),
                        (r, s),
                    ]
                } else {
                    vec![(s, r)]
                };
                for (w, rd) in ends {
                    let (stop, bytes) = (stop.clone(), bytes.clone());
                    hs.push(std::thread::spawn(move || {
                        let w = pump_write(w, &stop, size);
                        let _ = w.shutdown(Shutdown::Write);
                    }));
                    hs.push(std::thread::spawn(move || pump_read(rd, &bytes, size)));
                }
            }
            let (s0, s1) = measure(&bytes);
            stop.store(true, Relaxed);
            report("tcp", mode, &extra, &s0, &s1, "bytes");
            for h in hs {
                let _ = h.join();
            }
        }
        "tokio" => {
            let rt = rt();
            let (s0, s1) = rt.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut set = tokio::task::JoinSet::new();
                for (s, r) in pairs {
                    s.set_nonblocking(true).expect("nonblocking");
                    r.set_nonblocking(true).expect("nonblocking");
                    let s = tokio::net::TcpStream::from_std(s).expect("tokio");
                    let r = tokio::net::TcpStream::from_std(r).expect("tokio");
                    let (sr, sw) = s.into_split();
                    let (rr, rw) = r.into_split();
                    let mut ends = vec![(sw, rr)];
                    if both {
                        ends.push((rw, sr));
                    }
                    for (mut w, mut rd) in ends {
                        let (stop, bytes) = (stop.clone(), bytes.clone());
                        set.spawn(async move {
                            let buf = vec![0x5au8; size];
                            while !stop.load(Relaxed) {
                                if w.write_all(&buf).await.is_err() {
                                    break;
                                }
                            }
                            let _ = w.shutdown().await;
                        });
                        set.spawn(async move {
                            let mut buf = vec![0u8; size];
                            while let Ok(n) = rd.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                bytes.fetch_add(n as u64, Relaxed);
                            }
                        });
                    }
                }
                tokio::time::sleep(warmup).await;
                let s0 = snap(&bytes, &pid);
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                let s1 = snap(&bytes, &pid);
                stop.store(true, Relaxed);
                while set.join_next().await.is_some() {}
                (s0, s1)
            });
            report("tcp", mode, &extra, &s0, &s1, "bytes");
        }
        _ => die("--io must be threads or tokio"),
    }
}

fn udp(a: &Args) {
    let target: SocketAddr = a.req("target");
    let secs: f64 = a.get("secs", 5.0);
    let payload: usize = a.get("payload", 200);
    let max: u64 = a.get("max-datagrams", 50_000_000);
    // Relay sessions, each with its own pair of tickets and of sockets (side A, side B).
    let sessions: usize = a.get("sessions", 1);
    if !(1..=MAX_UDP_SESSIONS).contains(&sessions) {
        die(&format!(
            "--sessions must be 1 to {MAX_UDP_SESSIONS} (each takes two sockets)"
        ));
    }
    // Datagrams per second per side; 0 = as fast as possible.
    let rate: u64 = a.get("rate", 0);
    // Datagrams per burst (0 = paced: each side tops up to the rate every millisecond).
    let burst: u64 = a.get("burst", 0);
    if burst > 0 && rate == 0 {
        die("--burst needs --rate: bursts of --burst datagrams every burst/rate seconds");
    }
    // Bursts per session in turn, each whole burst on one session (0: every burst spread over
    // the sessions, one datagram each in turn).
    let session_bursts: u64 = a.get("session-bursts", 0);
    if session_bursts > 0 && burst == 0 {
        die("--session-bursts needs --burst (and --rate)");
    }
    let warmup = Duration::from_millis(a.get("warmup-ms", 300));
    let pid: Option<String> = a.opt.get("pid").cloned();
    let tickets = Tickets::from_args(a);
    // (side A socket, side B socket, a data datagram of this session), per session.
    let socks: Vec<(std::net::UdpSocket, std::net::UdpSocket, Vec<u8>)> = rt().block_on(async {
        let mut out = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let (sid, ta, tb) = tickets.pair(Transport::Udp);
            let bind = || async {
                tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .unwrap_or_else(|e| die(&format!("bind a UDP socket on 127.0.0.1: {e}")))
            };
            let (sa, sb) = (bind().await, bind().await);
            let w = Duration::from_secs(10);
            let ca = udp_bind(&sa, target, sid, &ta, w).await;
            let cb = udp_bind(&sb, target, sid, &tb, w).await;
            for c in [&ca, &cb] {
                match c {
                    Ok(StatusCode::Waiting | StatusCode::Paired) => {}
                    other => die(&format!(
                        "udp bind of session {} of {sessions}: {other:?} (is the relay at \
                         {target} up, with --broker-key of this --seed and this --relay-id?)",
                        out.len() + 1
                    )),
                }
            }
            let dgram = wire::encode_udp(UdpKind::Data, sid, &vec![0x5au8; payload]);
            out.push((
                sa.into_std().expect("std"),
                sb.into_std().expect("std"),
                dgram,
            ));
        }
        out
    });
    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let port = |s: &std::net::UdpSocket| s.local_addr().expect("addr").port().to_string();
    let list = |v: Vec<String>| v.join(",");
    let ports = format!(
        "\"sessions\":{sessions},\"ports_a\":[{}],\"ports_b\":[{}],",
        list(socks.iter().map(|s| port(&s.0)).collect()),
        list(socks.iter().map(|s| port(&s.1)).collect())
    );
    let mut hs = Vec::new();
    for side in 0..2 {
        // (this side's socket, the other side's socket, the session's datagram), per session.
        let ends: Vec<_> = socks
            .iter()
            .map(|(sa, sb, d)| {
                let (tx, rx) = if side == 0 { (sa, sb) } else { (sb, sa) };
                (
                    tx.try_clone().expect("clone"),
                    rx.try_clone().expect("clone"),
                    d.clone(),
                )
            })
            .collect();
        // Burst mode: side B echoes every datagram it gets on the socket it got it on, as
        // turnutils_peer does, and so only side A originates.
        let echo = burst > 0 && side == 0;
        let rxs = ends
            .iter()
            .map(|(_, rx, d)| (rx.try_clone().expect("clone"), echo.then(|| d.clone())))
            .collect();
        hs.push(recv_side(rxs, target, got.clone(), stop.clone()));
        if burst == 0 || side == 0 {
            let stop = stop.clone();
            let txs: Vec<_> = ends.into_iter().map(|(tx, _, d)| (tx, d)).collect();
            hs.push(std::thread::spawn(move || {
                send_loop(&txs, target, max, rate, (burst, session_bursts), &stop);
            }));
        }
    }
    std::thread::sleep(warmup);
    let s0 = snap(&got, &pid);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let s1 = snap(&got, &pid);
    stop.store(true, Relaxed);
    report(
        "udp",
        "relay",
        &format!(
            "\"payload\":{payload},\"rate_per_side\":{rate},\"burst\":{burst},\
             \"session_bursts\":{session_bursts},{ports}"
        ),
        &s0,
        &s1,
        "datagrams",
    );
    for h in hs {
        let _ = h.join();
    }
}

/// Receives on all of one side's sockets in one thread, one event loop (as turnutils_peer and
/// turnutils_uclient each do), counting datagrams into `got`; a socket given a datagram echoes
/// that datagram to `target` for each one it gets. Returns when `stop` is set (within 100 ms).
fn recv_side(
    socks: Vec<(std::net::UdpSocket, Option<Vec<u8>>)>,
    target: SocketAddr,
    got: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        rt().block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (sock, echo) in socks {
                // The senders share this socket's file description and so become non-blocking
                // too; send_loop retries when a send would block.
                sock.set_nonblocking(true).expect("nonblocking");
                let sock = tokio::net::UdpSocket::from_std(sock).expect("tokio socket");
                let (got, stop) = (got.clone(), stop.clone());
                set.spawn(async move {
                    let mut buf = [0u8; 2048];
                    let tick = Duration::from_millis(100);
                    while !stop.load(Relaxed) {
                        if let Ok(Ok(_)) =
                            tokio::time::timeout(tick, sock.recv_from(&mut buf)).await
                        {
                            got.fetch_add(1, Relaxed);
                            if let Some(d) = &echo {
                                let _ = sock.send_to(d, target).await;
                            }
                        }
                    }
                });
            }
            while set.join_next().await.is_some() {}
        })
    })
}

/// Most `--sessions` of `relay_load udp`: each takes two sockets.
const MAX_UDP_SESSIONS: usize = 1000;

/// Sends each socket's datagram to `target` until `stop` or `max` datagrams in all. `rate` 0:
/// flat out. `burst` 0: paced, topping up to `rate` every millisecond (a few datagrams per
/// tick). In both, datagram k goes out socket k mod n. `burst` (N, K), N > 0: N datagrams back
/// to back every N / `rate` seconds, catching up at once when late; K = 0: datagram i of each
/// burst out socket i mod n; K > 0: burst b all out socket (b / K) mod n, so the sockets
/// (sessions) take turns, K bursts each, as turnutils_uclient's allocations do.
fn send_loop(
    txs: &[(std::net::UdpSocket, Vec<u8>)],
    target: SocketAddr,
    max: u64,
    rate: u64,
    (burst, session_bursts): (u64, u64),
    stop: &AtomicBool,
) {
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut bursts = 0u64;
    let start = Instant::now();
    while sent < max && !stop.load(Relaxed) {
        if rate > 0 {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if burst > 0 {
                // Burst k is due at k * burst / rate; sleep until the next one.
                if sent > due {
                    let next = Duration::from_secs_f64(sent as f64 / rate as f64);
                    std::thread::sleep(next.saturating_sub(start.elapsed()));
                    continue;
                }
                let first = match session_bursts {
                    0 => 0,
                    k => ((bursts / k) % txs.len() as u64) as usize,
                };
                let step = usize::from(session_bursts == 0);
                for i in 0..burst as usize {
                    let (tx, d) = &txs[(first + i * step) % txs.len()];
                    if send(tx, d, target) {
                        sent += 1;
                    }
                }
                bursts += 1;
                continue;
            }
            if sent >= due {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        let (tx, d) = &txs[next];
        next = (next + 1) % txs.len();
        if send(tx, d, target) {
            sent += 1;
        }
    }
}

/// Sends one datagram on a socket that may be non-blocking, retrying while it would block
/// (as a blocking send would wait); false if the send failed otherwise.
fn send(tx: &std::net::UdpSocket, d: &[u8], target: SocketAddr) -> bool {
    loop {
        match tx.send_to(d, target) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(_) => return false,
        }
    }
}

/// Binds `n` UDP sessions at the relay from one side A and one side B socket, `WINDOW` at a
/// time, resending the binds of a window's unfinished sessions every 200 ms (binds from the
/// same address are idempotent). Returns the sockets (the sessions live while they do, until
/// the relay's UDP idle timeout) and how many sessions were paired on both sides.
/// A session being bound: side A's and side B's bind datagrams, and which side heard `paired`.
type Binding = (Vec<u8>, Vec<u8>, [bool; 2]);

fn open_udp_sessions(a: &Args, n: usize) -> (std::net::UdpSocket, std::net::UdpSocket, usize) {
    const WINDOW: usize = 256;
    let target: SocketAddr = a.req("target");
    let tickets = Tickets::from_args(a);
    let bind = || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP socket");
        s.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("read timeout");
        s
    };
    let (sa, sb) = (bind(), bind());
    let mut paired = 0;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    while done < n && Instant::now() < deadline {
        let w = WINDOW.min(n - done);
        // Per session of the window: its binds, and whether each side has heard `paired`.
        let mut win: HashMap<SessionId, Binding> = (0..w)
            .map(|_| {
                let (sid, ta, tb) = tickets.pair(Transport::Udp);
                (
                    sid,
                    (
                        wire::encode_udp(UdpKind::Bind, sid, &ta),
                        wire::encode_udp(UdpKind::Bind, sid, &tb),
                        [false; 2],
                    ),
                )
            })
            .collect();
        let mut left = w;
        while left > 0 && Instant::now() < deadline {
            for (ba, bb, got) in win.values() {
                if !got[0] {
                    let _ = sa.send_to(ba, target);
                }
                if !got[1] {
                    let _ = sb.send_to(bb, target);
                }
            }
            let until = Instant::now() + Duration::from_millis(200);
            while left > 0 && Instant::now() < until {
                for (k, s) in [&sa, &sb].into_iter().enumerate() {
                    while let Ok((len, _)) = s.recv_from(&mut buf) {
                        let Ok(p) = wire::decode_udp(&buf[..len]) else {
                            continue;
                        };
                        let code = p.body.first().and_then(|c| StatusCode::from_wire(*c));
                        if p.kind != UdpKind::Status || code != Some(StatusCode::Paired) {
                            continue;
                        }
                        if let Some((_, _, got)) = win.get_mut(&p.session_id) {
                            if !got[k] {
                                got[k] = true;
                                if got[0] && got[1] {
                                    left -= 1;
                                    paired += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        done += w;
    }
    (sa, sb, paired)
}

fn idle(a: &Args) {
    let mode = a.pos.get(1).map_or("relay", String::as_str);
    if mode == "udp" {
        let n: usize = a.req("sessions");
        let t0 = Instant::now();
        let (sa, sb, paired) = open_udp_sessions(a, n);
        eprintln!(
            "relay_load: {paired} of {n} idle UDP sessions paired in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        if let Some(p) = a.opt.get("ready-file") {
            std::fs::write(p, format!("{paired}\n")).expect("ready file");
        }
        std::thread::sleep(Duration::from_secs_f64(a.get("hold", 30.0)));
        drop((sa, sb));
        return;
    }
    let n: usize = a.req("sessions");
    let hold: f64 = a.get("hold", 30.0);
    let t0 = Instant::now();
    let pairs = open_pairs(mode, a, n, 16);
    eprintln!(
        "relay_load: {} idle {mode} sessions open in {:.1} s",
        pairs.len(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(p) = a.opt.get("ready-file") {
        std::fs::write(p, format!("{}\n", pairs.len())).expect("ready file");
    }
    std::thread::sleep(Duration::from_secs_f64(hold));
    drop(pairs);
}

fn main() {
    let a = Args::parse();
    match a.pos.first().map(String::as_str) {
        Some("pubkey") => {
            let seed = a.pos.get(1).unwrap_or_else(|| die("pubkey SEED_HEX"));
            let seed: [u8; 32] =
                steelyard_proto::hex::decode(seed).unwrap_or_else(|_| die("bad seed"));
            let key = TicketSigner::from_seed(seed).public_key();
            println!("{}", steelyard_proto::hex::encode(key.as_bytes()));
        }
        Some(m @ ("direct" | "haproxy" | "relay")) => tcp(m, &a),
        Some("udp") => udp(&a),
        Some("idle") => idle(&a),
        _ => die("usage: relay_load pubkey|direct|haproxy|relay|udp|idle … (see the source)"),
    }
}
