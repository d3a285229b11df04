//! Benchmark client for agent tunnels (`bench/agent-connect.sh`, `bench/agent-tunnel.sh`):
//! connect-to-first-byte latency over sequential connects, throughput of a fixed byte count,
//! and the echo service the far agent exposes. One client drives every path (the echo service
//! direct, a bare relay session, a brokered and encrypted tunnel), so its cost is the same on
//! each. Its pumps follow `crates/relay/examples/relay_load.rs` (blocking thread per socket
//! end, 128 KiB writes), which is time-bound rather than byte-bound.
//!
//! ```text
//! tunnel_load echo --listen ADDR
//! tunnel_load latency direct|tunnel --target ADDR [--count N] [--gap-ms MS]
//! tunnel_load latency relay --target RELAY_TCP --seed HEX --relay-id ID [--count N]
//! tunnel_load throughput direct|tunnel|relay --streams N --bytes TOTAL [--buf BYTES]
//!            [--target ADDR] [--sink ADDR] [--seed HEX --relay-id ID] [--pids name=PID,…]
//! ```
//!
//! * `echo`: a TCP echo service (one thread per connection, half-close passed on) until killed.
//!   It is the service behind the far agent and the floor of the latency benchmark.
//! * `latency direct|tunnel`: `--count` sequential connects to `--target` (the echo service
//!   itself, or a `steelyard connect` listener in front of it); each connect writes one byte and
//!   waits for it to come back. The time is taken from just before `connect` to the echoed byte.
//! * `latency relay`: the same through a bare relay, without broker or encryption: per connect,
//!   a fresh pair of tickets signed by `--seed` for `--relay-id`; side A dials the relay while
//!   side B dials it at the same moment (as the far agent does after the broker's offer), and
//!   B echoes the byte. The time is taken from just before A's dial to the echoed byte.
//!
//! * `throughput`: `--streams` sender → receiver pairs move `--bytes` in all (split evenly),
//!   one direction, `--buf`-byte writes, one blocking thread per socket end; each sender then
//!   half-closes and each receiver reads to the end and checks it got every byte. `direct`:
//!   the receiver's listener is the target. `tunnel`: the sender connects to `--target` (a
//!   `steelyard connect` listener) and the receiver is accepted on `--sink` (the service address
//!   the far agent connects to). `relay`: both sides dial the relay with tickets, as above.
//!   The time runs from the first write to the last byte received; `--pids` names processes
//!   whose CPU seconds over that window are reported (from `/proc/PID/stat`).
//!
//! Each mode prints one JSON line. Every connect has a 10 s limit; a failed latency connect is
//! counted and the run goes on; a throughput run that does not finish within 300 s exits 1.
//! Tickets signed from a seed are for benchmarks only; real deployments get them from the
//! broker.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
use steelyard_relay::client::dial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(10);

fn die(msg: &str) -> ! {
    eprintln!("tunnel_load: {msg}");
    std::process::exit(2)
}

fn opts() -> (Vec<String>, HashMap<String, String>) {
    let (mut pos, mut opt) = (Vec::new(), HashMap::new());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(k) => {
                let v = it
                    .next()
                    .unwrap_or_else(|| die(&format!("--{k} needs a value")));
                opt.insert(k.to_owned(), v);
            }
            None => pos.push(a),
        }
    }
    (pos, opt)
}

fn get<T: std::str::FromStr>(opt: &HashMap<String, String>, k: &str, default: Option<T>) -> T {
    match opt.get(k) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| die(&format!("bad --{k} {v:?}"))),
        None => default.unwrap_or_else(|| die(&format!("--{k} is required"))),
    }
}

/// Echoes every connection until killed.
fn echo(listen: SocketAddr) {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| die(&format!("bind {listen}: {e}")));
    println!("echo listening {}", l.local_addr().expect("addr"));
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// One connect to `target`: one byte out, the same byte back.
fn one_tcp(target: SocketAddr, byte: u8) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, LIMIT).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(LIMIT)).map_err(|e| e.to_string())?;
    s.write_all(&[byte]).map_err(|e| format!("write: {e}"))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
    let took = t.elapsed();
    if b[0] != byte {
        return Err(format!("sent {byte}, got {} back", b[0]));
    }
    Ok(took)
}

fn signer(opt: &HashMap<String, String>) -> (TicketSigner, String) {
    let seed: String = get(opt, "seed", None);
    let seed: [u8; 32] = steelyard_proto::hex::decode(&seed).unwrap_or_else(|_| die("bad --seed"));
    (TicketSigner::from_seed(seed), get(opt, "relay-id", None))
}

fn tickets(signer: &TicketSigner, relay_id: &str) -> (Vec<u8>, Vec<u8>) {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .unwrap_or_else(|e| die(&format!("/dev/urandom: {e}")));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let t = |side| {
        signer
            .sign(&Ticket {
                key_id: signer.key_id(),
                session_id: SessionId(id),
                relay_id: relay_id.to_owned(),
                side,
                peer_id: "bench".into(),
                issued_at: now - 1,
                expires_at: now + 600,
                limits: TicketLimits::default(),
                transport: Transport::Tcp,
            })
            .unwrap_or_else(|e| die(&format!("sign: {e}")))
    };
    (t(Side::A), t(Side::B))
}

/// One session through a bare relay: A and B dial at once, B echoes one byte.
async fn one_relay(relay: SocketAddr, ta: &[u8], tb: &[u8], byte: u8) -> Result<Duration, String> {
    let t = Instant::now();
    let a = async {
        let mut s = dial(relay, ta, LIMIT)
            .await
            .map_err(|e| format!("dial A: {e}"))?;
        s.write_all(&[byte]).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((b[0], t.elapsed()))
    };
    let b = async {
        let mut s = dial(relay, tb, LIMIT)
            .await
            .map_err(|e| format!("dial B: {e}"))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        s.write_all(&b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    };
    let (a, b) = tokio::time::timeout(LIMIT, async { tokio::join!(a, b) })
        .await
        .map_err(|_| "no echo within 10 s".to_owned())?;
    let _keep_b_open_until_a_has_read = b?;
    let (got, took) = a?;
    if got != byte {
        return Err(format!("sent {byte}, got {got} back"));
    }
    Ok(took)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn latency(mode: &str, opt: &HashMap<String, String>) {
    let count: usize = get(opt, "count", Some(1000));
    let gap = Duration::from_millis(get(opt, "gap-ms", Some(0)));
    let target: SocketAddr = get(opt, "target", None);
    let mut times = Vec::with_capacity(count);
    let mut failures = Vec::new();
    let started = Instant::now();
    let mut record = |i: usize, r: Result<Duration, String>| match r {
        Ok(d) => times.push(d.as_secs_f64() * 1000.0),
        Err(e) => {
            if failures.len() < 5 {
                eprintln!("tunnel_load: connect {i}: {e}");
            }
            failures.push(e);
        }
    };
    match mode {
        "direct" | "tunnel" => {
            for i in 0..count {
                record(i, one_tcp(target, (i % 251) as u8 + 1));
                std::thread::sleep(gap);
            }
        }
        "relay" => {
            let (signer, relay_id) = signer(opt);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            for i in 0..count {
                let (ta, tb) = tickets(&signer, &relay_id);
                record(
                    i,
                    rt.block_on(one_relay(target, &ta, &tb, (i % 251) as u8 + 1)),
                );
                std::thread::sleep(gap);
            }
        }
        _ => die("latency mode must be direct, tunnel or relay"),
    }
    let wall = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!(
        "{{\"kind\":\"latency\",\"mode\":\"{mode}\",\"count\":{count},\"ok\":{},\"failures\":{},\
         \"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\"mean_ms\":{mean:.3},\"wall_s\":{wall:.2}}}",
        times.len(),
        failures.len(),
        percentile(&times, 50.0),
        percentile(&times, 90.0),
        percentile(&times, 99.0),
        times.last().copied().unwrap_or(f64::NAN),
    );
    if times.is_empty() {
        die("every connect failed");
    }
}

/// CPU seconds (user + system) used so far by process `pid` ("self" for this one).
fn cpu_secs(pid: &str, hz: f64) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 2..]) else {
        return f64::NAN;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / hz
}

/// Opens `n` connected (sender, receiver) pairs on the path `mode`.
fn open_pairs(mode: &str, opt: &HashMap<String, String>, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let mut out = Vec::with_capacity(n);
    match mode {
        "direct" | "tunnel" => {
            let sink: SocketAddr = get(opt, "sink", Some("127.0.0.1:0".parse().expect("addr")));
            let l = TcpListener::bind(sink).unwrap_or_else(|e| die(&format!("bind {sink}: {e}")));
            let target = if mode == "direct" {
                l.local_addr().expect("addr")
            } else {
                get(opt, "target", None)
            };
            for _ in 0..n {
                let s = TcpStream::connect_timeout(&target, LIMIT)
                    .unwrap_or_else(|e| die(&format!("connect {target}: {e}")));
                let (r, _) = l.accept().unwrap_or_else(|e| die(&format!("accept: {e}")));
                let _ = s.set_nodelay(true);
                let _ = r.set_nodelay(true);
                out.push((s, r));
            }
        }
        "relay" => {
            let target: SocketAddr = get(opt, "target", None);
            let (signer, relay_id) = signer(opt);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            for _ in 0..n {
                let (ta, tb) = tickets(&signer, &relay_id);
                let (x, y) = rt.block_on(async {
                    tokio::join!(dial(target, &ta, LIMIT), dial(target, &tb, LIMIT))
                });
                let x = x.unwrap_or_else(|e| die(&format!("dial A: {e}")));
                let y = y.unwrap_or_else(|e| die(&format!("dial B: {e}")));
                let (x, y) = (x.into_std().expect("std"), y.into_std().expect("std"));
                x.set_nonblocking(false).expect("blocking");
                y.set_nonblocking(false).expect("blocking");
                out.push((x, y));
            }
        }
        _ => die("throughput mode must be direct, tunnel or relay"),
    }
    out
}

fn throughput(mode: &str, opt: &HashMap<String, String>) {
    let streams: usize = get(opt, "streams", Some(1));
    let total: u64 = get(opt, "bytes", Some(1 << 30));
    let size: usize = get(opt, "buf", Some(128 * 1024));
    let hz: f64 = get(opt, "hz", Some(100.0));
    let pids: Vec<(String, String)> = opt
        .get("pids")
        .map(|p| {
            p.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| match x.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => die("--pids takes name=PID,…"),
                })
                .collect()
        })
        .unwrap_or_default();
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(300));
        eprintln!("tunnel_load: the throughput run did not finish within 300 s; exiting");
        std::process::exit(1);
    });
    let per = total / streams as u64;
    let pairs = open_pairs(mode, opt, streams);
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_secs(p, hz)).collect();
    let own0 = cpu_secs("self", hz);
    let t0 = Instant::now();
    let mut hs = Vec::new();
    for (mut s, mut r) in pairs {
        hs.push(std::thread::spawn(move || {
            let buf = vec![0x5au8; size];
            let mut left = per;
            while left > 0 {
                let k = left.min(size as u64) as usize;
                s.write_all(&buf[..k])
                    .unwrap_or_else(|e| die(&format!("write: {e}")));
                left -= k as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            s
        }));
        hs.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; size];
            let mut got = 0u64;
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got += n as u64,
                    Err(e) => die(&format!("read after {got} bytes: {e}")),
                }
            }
            if got != per {
                die(&format!("a receiver got {got} bytes of {per}"));
            }
            r
        }));
    }
    let _ends: Vec<TcpStream> = hs.into_iter().map(|h| h.join().expect("pump")).collect();
    let secs = t0.elapsed().as_secs_f64();
    let own = cpu_secs("self", hz) - own0;
    let cpu: Vec<String> = pids
        .iter()
        .zip(cpu0)
        .map(|((name, p), c0)| format!("\"{name}\":{:.3}", cpu_secs(p, hz) - c0))
        .collect();
    let moved = per * streams as u64;
    println!(
        "{{\"kind\":\"throughput\",\"mode\":\"{mode}\",\"streams\":{streams},\"bytes\":{moved},\"secs\":{secs:.3},\
         \"gbps\":{:.3},\"cpu_s\":{{{}}},\"client_cpu_s\":{own:.3}}}",
        moved as f64 * 8.0 / secs / 1e9,
        cpu.join(",")
    );
}

fn main() {
    let (pos, opt) = opts();
    match pos.first().map(String::as_str) {
        Some("echo") => echo(get(&opt, "listen", None)),
        Some("latency") => latency(pos.get(1).map_or("", String::as_str), &opt),
        Some("throughput") => throughput(pos.get(1).map_or("", String::as_str), &opt),
        _ => die("usage: tunnel_load echo|latency|throughput … (see the source)"),
    }
}
