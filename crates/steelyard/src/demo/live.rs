//! The end-to-end demo and `steelyard dev`: the real system on loopback, as child processes of
//! this binary (`std::env::current_exe()`), in a temporary directory with free ports and
//! generated tokens.
//!
//! * a broker (plain HTTP, in-memory store, 1 s report schedule);
//! * three relays that differ in capacity and location, each enrolling with the broker and
//!   reporting its load over the broker link;
//! * two agents, alice and bob; bob exposes two services the demo runs in-process: `sink`
//!   (reads everything, answers with the byte count and a checksum) and `echo`.
//!
//! Every child is killed when the [`System`] is dropped: on success, on error, on panic and on
//! Ctrl-C / SIGTERM (the run is cancelled, which drops it). Child logs (`RUST_LOG=warn`) go to
//! `<name>.log` in the temporary directory.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use steelyard_agent::daemon::open_via_agent;
use steelyard_select::Decision;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Flags of `steelyard dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {}

/// One relay of the demo: id, capacity, location and why it is there.
struct RelaySpec {
    id: &'static str,
    max_sessions: u32,
    lat: f64,
    lon: f64,
    region: &'static str,
    note: &'static str,
}

const RELAYS: [RelaySpec; 3] = [
    RelaySpec {
        id: "fra-1",
        max_sessions: 1000,
        lat: 50.11,
        lon: 8.68,
        region: "eu-central",
        note: "Frankfurt, near both peers, 1000 sessions",
    },
    RelaySpec {
        id: "vie-1",
        max_sessions: 2,
        lat: 48.21,
        lon: 16.37,
        region: "eu-central",
        note: "Vienna, next to bob, but only 2 sessions (one session = 50 % busy)",
    },
    RelaySpec {
        id: "nyc-1",
        max_sessions: 10_000,
        lat: 40.71,
        lon: -74.00,
        region: "us-east",
        note: "New York, idle and large, but across the Atlantic",
    },
];

/// A child process of the demo.
struct Proc {
    name: String,
    child: Child,
}

/// The running local system. Dropping it kills every child and removes the directory.
struct System {
    dir: PathBuf,
    procs: Vec<Proc>,
    broker: SocketAddr,
    admin: String,
    agent_token: String,
    alice_ctl: SocketAddr,
    bob_services: (SocketAddr, SocketAddr),
}

impl Drop for System {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.start_kill();
        }
        for p in &mut self.procs {
            for _ in 0..50 {
                if !matches!(p.child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `fut` on a fresh runtime, cancelled (and so torn down) by Ctrl-C or SIGTERM.
fn run_until_signal<F>(fut: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
        tokio::select! {
            r = fut => r,
            _ = term.recv() => Err(anyhow!("stopped by SIGTERM; every process the demo started was killed")),
            _ = int.recv() => Err(anyhow!("interrupted; every process the demo started was killed")),
        }
    })
}

/// The end-to-end demo; moves `mib` MiB through the first tunnel.
pub fn demo(mib: u64) -> Result<()> {
    run_until_signal(demo_steps(mib))
}

/// `steelyard dev`: starts the local system, prints how to use it, runs until Ctrl-C.
pub fn dev(_args: DevArgs) -> Result<()> {
    let r = run_until_signal(async {
        let sys = System::start().await?;
        let d = sys.wait_ready().await?;
        println!(
            "The local system is up (broker picks {} for alice -> bob). Try:\n",
            d.winner
        );
        println!(
            "  steelyard connect bob echo --listen 127.0.0.1:9000 --control {}",
            sys.alice_ctl
        );
        println!("  nc 127.0.0.1 9000                       # type a line, bob's echo answers");
        println!(
            "  curl -H 'Authorization: Bearer {}' 'http://{}/v1/explain?from=alice&to=bob'",
            sys.admin, sys.broker
        );
        println!(
            "  curl -H 'Authorization: Bearer {}' http://{}/v1/admin/relays",
            sys.admin, sys.broker
        );
        println!(
            "\nbroker http://{}  admin token {}  agent enroll token {}",
            sys.broker, sys.admin, sys.agent_token
        );
        println!(
            "bob's services: sink={} echo={}  logs: {}",
            sys.bob_services.0,
            sys.bob_services.1,
            sys.dir.display()
        );
        println!("\nCtrl-C stops everything.");
        std::future::pending::<Result<()>>().await
    });
    match r {
        Err(e) if e.to_string().starts_with("interrupted") => {
            println!("stopped: every process was killed");
            Ok(())
        }
        other => other,
    }
}

async fn demo_steps(mib: u64) -> Result<()> {
    let sys = System::start().await?;

    println!("\n== 1. alice asks for bob: the broker's explained decision (GET /v1/explain)");
    let first = sys.wait_ready().await?;
    println!("{first}");

    println!("== 2. {mib} MiB from alice through the tunnel to bob's sink service\n");
    let (mut live, relay, bytes, took) = transfer(sys.alice_ctl, mib).await?;
    let rate = bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64().max(1e-9);
    println!(
        "throughput: {:.1} MiB in {:.2} s = {rate:.1} MiB/s via relay {relay}, checksum ok",
        bytes as f64 / (1024.0 * 1024.0),
        took.as_secs_f64()
    );
    if relay != first.winner.as_str() {
        println!(
            "(the broker's load view changed between explain and connect: {relay} carried it)"
        );
    }

    // The tunnel stays open: bob's sink echoes from here on.
    let live_relay = relay;
    roundtrip(&mut live, b"ping").await?;
    println!("the tunnel stays open and answers (bob's service echoes after the transfer)");

    println!("\n== 3. {live_relay} is stopped (SIGTERM: it drains, then exits)\n");
    sys.stop_relay(&live_relay)?;
    let second = sys.wait_winner_not(&live_relay).await?;
    println!("{second}");
    match second
        .rejected
        .iter()
        .find(|r| r.relay.as_str() == live_relay)
    {
        Some(r) => println!("{live_relay} is rejected: {}", r.reason),
        None => println!("{live_relay} is no longer a candidate"),
    }
    if second.winner.as_str() == live_relay {
        bail!("the broker still picks the stopped relay {live_relay}");
    }
    println!("new winner: {}\n", second.winner);

    // The live tunnel keeps answering: when the relay exits, both agents resume it on the
    // next relay and retransmit what the dead one lost.
    let signalled = Instant::now();
    let mut pings = 0u32;
    let resumed_on = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            roundtrip(&mut live, b"ping").await?;
            pings += 1;
            if let Some(r) = sys.live_relay_other_than(&live_relay).await? {
                return Ok::<_, anyhow::Error>(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .map_err(|_| anyhow!("the live tunnel did not move off {live_relay} within 30 s"))?
    .context("the live tunnel through the stopped relay")?;
    let mut big = vec![0u8; 256 * 1024];
    pattern(3, &mut big);
    roundtrip(&mut live, &big).await?;
    println!(
        "the live tunnel resumed on relay {resumed_on} {:.1} s after the signal: {pings} pings \
         answered on the way, then 256 KiB echoed intact, not a byte lost or repeated",
        signalled.elapsed().as_secs_f64()
    );

    let (mut fresh, reply) = open_via_agent(sys.alice_ctl, "bob", "echo")
        .await
        .context("opening a new tunnel after the relay stopped")?;
    let new_relay = reply.relay.unwrap_or_default();
    let n = echo_check(&mut fresh, 1024 * 1024).await?;
    println!("a new tunnel via relay {new_relay}: {n} bytes echoed back, checksum ok");
    if new_relay == live_relay {
        bail!("the new tunnel went through the stopped relay {live_relay}");
    }

    println!("\n== 4. stopping the broker, the relays and the agents");
    let n = sys.procs.len();
    drop(sys);
    println!("stopped {n} processes; demo done");
    Ok(())
}

impl System {
    /// Starts the broker, the relays, bob's services and the agents.
    async fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("steelyard-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut sys = System {
            dir,
            procs: Vec::new(),
            broker: "127.0.0.1:0".parse()?,
            admin: token()?,
            agent_token: token()?,
            alice_ctl: "127.0.0.1:0".parse()?,
            bob_services: ("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?),
        };
        let relay_token = token()?;
        println!(
            "Starting a local Steelyard on loopback (files and logs in {})",
            sys.dir.display()
        );

        // Broker.
        let config = format!(
            "listen = \"127.0.0.1:0\"\nlisten_plain = true\nstore = \"memory\"\ndata_dir = \"{}\"\n\
             admin_token = \"{}\"\n\n[[enroll_tokens]]\nname = \"agents\"\ntoken = \"{}\"\n\n\
             [[enroll_tokens]]\nname = \"relays\"\ntoken = \"{relay_token}\"\nrole = \"relay\"\n\n\
             [schedule]\ninterval_ms = 1000\njitter_ms = 100\nrelay_load_interval_ms = 250\n",
            sys.dir.display(),
            sys.admin,
            sys.agent_token
        );
        let path = sys.write("broker.toml", &config)?;
        let line = sys
            .spawn("broker", &["broker", "--config", &path], |l| {
                l.contains("://")
            })
            .await?;
        sys.broker = line
            .split("://")
            .nth(1)
            .and_then(|a| a.trim().parse().ok())
            .ok_or_else(|| anyhow!("no broker address in {line:?}"))?;
        println!("  broker   http://{} (in-memory store)", sys.broker);
        let (status, body) = http_get(sys.broker, "/v1/keys", None).await?;
        let keys: serde_json::Value = serde_json::from_str(&body)?;
        let ticket_key = keys["keys"][0]["public_key"]
            .as_str()
            .ok_or_else(|| anyhow!("GET /v1/keys answered {status}: {body}"))?
            .to_owned();

        // Relays.
        for r in &RELAYS {
            let probe = free_udp_port()?;
            let config = format!(
                "relay_id = \"{id}\"\nbroker_keys = [\"{ticket_key}\"]\n\n[listen]\n\
                 tcp = \"127.0.0.1:0\"\nprobe = \"127.0.0.1:{probe}\"\n\n[capacity]\n\
                 max_sessions = {max}\n\n[location]\nlat = {lat}\nlon = {lon}\nregion = \"{region}\"\n\n\
                 [drain]\ngrace_secs = 2\n\n[broker]\nurl = \"ws://{broker}/v1/relay\"\n\
                 identity_key_file = \"{key}\"\nenroll_token = \"{relay_token}\"\n\
                 advertise_udp = \"127.0.0.1:{probe}\"\n",
                id = r.id,
                max = r.max_sessions,
                lat = r.lat,
                lon = r.lon,
                region = r.region,
                broker = sys.broker,
                key = sys.dir.join(format!("{}.key", r.id)).display(),
            );
            let path = sys.write(&format!("{}.toml", r.id), &config)?;
            let line = sys
                .spawn(r.id, &["relay", "--config", &path], |l| {
                    l.starts_with("relay listening")
                })
                .await?;
            let tcp = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("tcp="))
                .unwrap_or("?");
            println!("  relay    {:<6} tcp={tcp:<16} {}", r.id, r.note);
        }

        // Bob's services, in this process.
        sys.bob_services = (sink_service().await?, echo_service().await?);

        // Agents.
        for (peer, lat, lon, extra) in [
            ("alice", 48.14, 11.58, String::new()),
            (
                "bob",
                48.21,
                16.37,
                format!(
                    "[services]\nsink = \"{}\"\necho = \"{}\"\n\n[offers]\nallow = [\"alice\"]\n",
                    sys.bob_services.0, sys.bob_services.1
                ),
            ),
        ] {
            let control = free_tcp_port()?;
            let config = format!(
                "broker = \"ws://{}\"\nenroll_token = \"{}\"\npeer_id = \"{peer}\"\nkey_file = \"{}\"\n\
                 control = \"127.0.0.1:{control}\"\n\n[location]\nlat = {lat}\nlon = {lon}\n\
                 region = \"eu-central\"\n\n{extra}",
                sys.broker,
                sys.agent_token,
                sys.dir.join(format!("{peer}.key")).display()
            );
            let path = sys.write(&format!("{peer}.toml"), &config)?;
            sys.spawn(peer, &["agent", "--config", &path], |l| {
                l.starts_with("agent ")
            })
            .await?;
            if peer == "alice" {
                sys.alice_ctl = format!("127.0.0.1:{control}").parse()?;
                println!("  agent    alice  control={}", sys.alice_ctl);
            } else {
                println!(
                    "  agent    bob    exposes sink={} echo={} to alice",
                    sys.bob_services.0, sys.bob_services.1
                );
            }
        }
        Ok(sys)
    }

    fn write(&self, name: &str, text: &str) -> Result<String> {
        let path = self.dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path.display().to_string())
    }

    /// Starts `steelyard <args>` and waits (30 s at most) for the stdout line `ready` accepts.
    async fn spawn(
        &mut self,
        name: &str,
        args: &[&str],
        ready: fn(&str) -> bool,
    ) -> Result<String> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(exe)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
        });
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if ready(&line) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => {
                // Keep draining stdout so the child never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                Ok(line)
            }
            _ => {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(10).collect();
                bail!(
                    "{name} did not start within 30 s; last lines of {}:\n{}",
                    log_path.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            }
        }
    }

    /// `GET /v1/explain?from=alice&to=bob` as a decision, or what the broker said instead.
    async fn explain(&self) -> Result<std::result::Result<Decision, String>> {
        let (status, body) = http_get(
            self.broker,
            "/v1/explain?from=alice&to=bob",
            Some(&self.admin),
        )
        .await?;
        if status != 200 {
            return Ok(Err(format!("{status}: {body}")));
        }
        let d = serde_json::from_str(&body)
            .with_context(|| format!("the explain answer is not a decision: {body}"))?;
        Ok(Ok(d))
    }

    /// Waits (60 s at most) until both agents have measured every relay and the relays have
    /// reported; returns the decision.
    async fn wait_ready(&self) -> Result<Decision> {
        let started = Instant::now();
        let mut last = String::new();
        // Ask for an explanation only once both peers have reported every relay: the broker's
        // explain endpoint fails to answer when a peer has not reported yet.
        while started.elapsed() < Duration::from_secs(60) {
            if self.peers_reported().await? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        while started.elapsed() < Duration::from_secs(60) {
            match self.explain().await? {
                Ok(d) if d.ranked.len() == RELAYS.len() => {
                    println!(
                        "(both agents reported paths to all {} relays after {:.1} s)\n",
                        RELAYS.len(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(d);
                }
                Ok(d) => last = format!("{} candidates so far", d.ranked.len()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("the agents did not report paths to every relay within 60 s; last answer: {last}")
    }

    /// Whether the broker's admin view shows alice and bob online with a report that covers
    /// every relay.
    async fn peers_reported(&self) -> Result<bool> {
        let (status, body) = http_get(self.broker, "/v1/admin/peers", Some(&self.admin)).await?;
        if status != 200 {
            bail!("GET /v1/admin/peers answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let ok = |peer: &str| {
            v["peers"].as_array().is_some_and(|a| {
                a.iter().any(|p| {
                    p["id"] == peer
                        && p["online"] == true
                        && p["paths"].as_u64() == Some(RELAYS.len() as u64)
                })
            })
        };
        Ok(ok("alice") && ok("bob"))
    }

    /// Waits (30 s at most) until the broker lists `relay` as rejected (draining, gone).
    async fn wait_winner_not(&self, relay: &str) -> Result<Decision> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(30) {
            match self.explain().await? {
                Ok(d) if d.rejected.iter().any(|r| r.relay.as_str() == relay) => {
                    println!(
                        "(the broker stopped offering {relay} {:.1} s after the signal)\n",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(d);
                }
                Ok(d) => last = format!("picks {} and still considers {relay}", d.winner),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the broker kept offering {relay} for 30 s; last answer: {last}")
    }

    /// The relay of a live alice → bob session that is not `relay`, if the broker has one.
    async fn live_relay_other_than(&self, relay: &str) -> Result<Option<String>> {
        let (status, body) = http_get(
            self.broker,
            "/v1/admin/sessions?limit=100",
            Some(&self.admin),
        )
        .await?;
        if status != 200 {
            bail!("GET /v1/admin/sessions answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v["live"].as_array().and_then(|live| {
            live.iter()
                .find(|s| {
                    s["from"] == "alice"
                        && s["to"] == "bob"
                        && s["state"] != "ended"
                        && s["relay"].as_str().is_some_and(|r| r != relay)
                })
                .and_then(|s| s["relay"].as_str().map(str::to_owned))
        }))
    }

    /// Sends SIGTERM to relay `id`.
    fn stop_relay(&self, id: &str) -> Result<()> {
        let p = self
            .procs
            .iter()
            .find(|p| p.name == id)
            .ok_or_else(|| anyhow!("no relay named {id:?} was started by the demo"))?;
        let pid = p.child.id().context("the relay has already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }
}

/// 32 hex digits from the OS's randomness.
fn token() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A minimal HTTP/1.1 GET; the status and the body.
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("GET {path}: no answer within 10 s"))?
        .with_context(|| format!("GET {path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {path}: not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    Ok((status, body))
}

/// FNV-1a over a stream of bytes.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Bob's sink: reads an 8-byte length (BE) and that many bytes, answers with the byte count
/// and checksum (16 bytes, BE), then echoes whatever comes next.
async fn sink_service() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(len);
                let (mut n, mut h) = (0u64, Fnv::new());
                let mut buf = vec![0u8; 256 * 1024];
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            n += k as u64;
                            left -= k as u64;
                            h.update(&buf[..k]);
                        }
                    }
                }
                let mut reply = [0u8; 16];
                reply[..8].copy_from_slice(&n.to_be_bytes());
                reply[8..].copy_from_slice(&h.0.to_be_bytes());
                if s.write_all(&reply).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Bob's echo service, with half-close.
async fn echo_service() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// One megabyte of the test pattern, chunk `i`.
fn pattern(i: u64, out: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03);
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Moves `mib` MiB through a new tunnel to bob's sink with a progress line on stderr; checks
/// the count and checksum bob saw. Returns the still open tunnel, its relay, the bytes and the
/// time taken.
async fn transfer(ctl: SocketAddr, mib: u64) -> Result<(TcpStream, String, u64, Duration)> {
    let (tunnel, reply) = open_via_agent(ctl, "bob", "sink")
        .await
        .context("opening the tunnel to bob's sink")?;
    let relay = reply.relay.unwrap_or_default();
    println!(
        "tunnel {} via relay {relay}",
        reply.session_id.unwrap_or_default()
    );
    let total = mib * 1024 * 1024;
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (mut r, mut w) = tunnel.into_split();
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        let mut h = Fnv::new();
        let mut chunk = vec![0u8; 1024 * 1024];
        w.write_all(&(mib * 1024 * 1024).to_be_bytes()).await?;
        for i in 0..mib {
            pattern(i, &mut chunk);
            h.update(&chunk);
            w.write_all(&chunk).await?;
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        std::io::Result::Ok((h.0, w))
    });
    let progress = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            show_progress(sent.load(Ordering::Relaxed), total, started.elapsed());
        }
    });
    let result = tokio::time::timeout(Duration::from_secs(300), async {
        let mut reply = [0u8; 16];
        r.read_exact(&mut reply).await?;
        std::io::Result::Ok(reply)
    })
    .await;
    progress.abort();
    let took = started.elapsed();
    let reply = match result {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => bail!("the tunnel broke during the transfer: {e}"),
        Err(_) => bail!("the transfer did not finish within 300 s"),
    };
    let (sent_hash, w) = writer.await?.context("writing into the tunnel")?;
    show_progress(total, total, took);
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let n = u64::from_be_bytes(reply[..8].try_into()?);
    let h = u64::from_be_bytes(reply[8..].try_into()?);
    if n != total || h != sent_hash {
        bail!("bob received {n} bytes with checksum {h:016x}; alice sent {total} with {sent_hash:016x}");
    }
    println!("bob received {n} bytes, FNV-1a checksum {h:016x} matches alice's");
    let tunnel = r.reunite(w).context("rejoining the tunnel's halves")?;
    Ok((tunnel, relay, total, took))
}

/// A self-updating progress line on stderr, when stderr is a terminal.
fn show_progress(done: u64, total: u64, elapsed: Duration) {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return;
    }
    let width = 30;
    let filled = (done * width / total.max(1)) as usize;
    let rate = done as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9);
    let mut err = std::io::stderr().lock();
    let _ = write!(
        err,
        "\r  [{}{}] {:>6.1} / {:.1} MiB  {rate:>7.1} MiB/s",
        "#".repeat(filled),
        ".".repeat(width as usize - filled),
        done as f64 / (1024.0 * 1024.0),
        total as f64 / (1024.0 * 1024.0),
    );
    let _ = err.flush();
}

/// Writes `msg` and reads it back (5 s at most).
async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .map_err(|_| anyhow!("no echo within 5 s"))??;
    if back != msg {
        bail!("the echo answered {back:?}");
    }
    Ok(())
}

/// Sends `len` bytes to an echo tunnel, half-closes, checks what comes back.
async fn echo_check(s: &mut TcpStream, len: usize) -> Result<usize> {
    let mut data = vec![0u8; len];
    pattern(7, &mut data);
    let mut sent = Fnv::new();
    sent.update(&data);
    let (mut r, mut w) = s.split();
    let writer = async {
        w.write_all(&data).await?;
        w.shutdown().await
    };
    let reader = async {
        let mut back = Vec::with_capacity(len);
        r.read_to_end(&mut back).await?;
        std::io::Result::Ok(back)
    };
    let (wrote, back) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(writer, reader)
    })
    .await
    .map_err(|_| anyhow!("the echo did not answer within 30 s"))?;
    wrote?;
    let back = back?;
    let mut got = Fnv::new();
    got.update(&back);
    if back.len() != len || got.0 != sent.0 {
        bail!(
            "the echo returned {} of {len} bytes, checksum mismatch",
            back.len()
        );
    }
    Ok(back.len())
}
