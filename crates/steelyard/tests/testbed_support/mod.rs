//! Shared pieces of the test bed scenarios (`testbed_paths.rs`, `testbed_brokered.rs`): the
//! topology (two peers and three relays around a core router, one relay handicapped), real
//! `steelyard` processes started inside its namespaces, and a whole brokered fabric — a broker,
//! three relays reporting to it, the agents alice (in `pa`) and bob (in `pb`), bob's services
//! and `steelyard connect` listeners on alice's side — with the probes the scenarios need: the
//! broker's explained decision, the relays' byte counters, tunnels through the listeners.
//!
//! Everything runs inside the test bed's namespaces; the test process reaches it with sockets
//! it opens inside a node ([`Testbed::in_netns`]). Dropping a [`Fabric`] (or [`Net`]) kills
//! every process and deletes every namespace, also when a test panics; on a panic the last
//! lines of every process's log are printed first.
//!
//! What this module does not do: assert anything about selection (the tests do).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use steelyard_select::Decision;
use steelyard_testbed::{LinkSpec, Node, Testbed};

pub const BIN: &str = env!("CARGO_BIN_EXE_steelyard");
pub const RELAYS: usize = 3;

const BROKER_PORT: u16 = 7700;
const ADMIN: &str = "testbed-admin-token-0123456789";
const AGENT_TOKEN: &str = "testbed-agent-token-0123456789";
const RELAY_TOKEN: &str = "testbed-relay-token-0123456789";
/// Alice's control endpoint, in `pa`.
const CONTROL: &str = "127.0.0.1:7450";
/// Bob's services, in `pb`.
const ECHO_SERVICE: &str = "127.0.0.1:8001";
/// Alice's `steelyard connect bob echo` listener, in `pa`.
pub const ECHO_LISTEN: &str = "127.0.0.1:9001";
/// A relay's `/status` endpoint, on its own loopback.
const RELAY_HTTP: &str = "127.0.0.1:7480";

/// One relay's host.
pub struct RelayHost {
    /// Its id (`r0`, `r1`, `r2`).
    pub id: String,
    /// Its namespace.
    pub node: Node,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// How the network looks.
pub struct Shape {
    /// Relay `i`'s link and how many extra routers sit between the core and it.
    pub handicap: Box<dyn Fn(usize) -> (LinkSpec, usize)>,
    /// A broker host on the core.
    pub broker: bool,
    /// `pa` sits behind a masquerading router `nat`.
    pub nat_a: bool,
    /// `pb` drops all UDP.
    pub block_udp_b: bool,
}

impl Shape {
    /// Two peers, three relays, a broker; relay `i` as `handicap(i)` says.
    pub fn brokered(handicap: impl Fn(usize) -> (LinkSpec, usize) + 'static) -> Self {
        Self {
            handicap: Box::new(handicap),
            broker: true,
            nat_a: false,
            block_udp_b: false,
        }
    }
}

/// A built network with its relays' hosts.
pub struct Net {
    pub tb: Testbed,
    pub peers: [Node; 2],
    pub relays: Vec<RelayHost>,
    /// The broker's host and address.
    pub broker: Option<(Node, Ipv4Addr)>,
    /// The NAT router in front of `pa`.
    pub nat: Option<Node>,
    /// Where the processes' logs go.
    pub dir: PathBuf,
    /// (name, log file) of every process started.
    logs: Vec<(String, PathBuf)>,
    /// (name, pid) of every process started.
    pids: Vec<(String, u32)>,
}

/// Builds pa, pb and relays r0..r2 (and a broker host) around a core router; `None` when the
/// test is skipped (not root, outside CI).
pub fn topology(test: &str, shape: &Shape) -> Option<Net> {
    let mut tb = Testbed::new_or_skip(test).unwrap_or_else(|e| panic!("{e}"))?;
    let core = tb.router("core").unwrap();
    let pa = tb.host("pa").unwrap();
    let mut nat = None;
    if shape.nat_a {
        let n = tb.router("nat").unwrap();
        let inside = tb.link(pa, n, LinkSpec::default()).unwrap();
        tb.link(n, core, LinkSpec::default()).unwrap();
        tb.nat(n, &inside).unwrap();
        nat = Some(n);
    } else {
        tb.link(pa, core, LinkSpec::default()).unwrap();
    }
    let pb = tb.host("pb").unwrap();
    tb.link(pb, core, LinkSpec::default()).unwrap();
    if shape.block_udp_b {
        tb.block_udp(pb).unwrap();
    }
    let broker = if shape.broker {
        let b = tb.host("brk").unwrap();
        let l = tb.link(core, b, LinkSpec::default()).unwrap();
        Some((b, l.b_addr))
    } else {
        None
    };
    let mut relays = Vec::new();
    for i in 0..RELAYS {
        let (spec, extra_routers) = (shape.handicap)(i);
        let mut prev = core;
        for k in 0..extra_routers {
            let x = tb.router(&format!("x{i}{k}")).unwrap();
            tb.link(prev, x, LinkSpec::default()).unwrap();
            prev = x;
        }
        let r = tb.host(&format!("r{i}")).unwrap();
        let link = tb.link(prev, r, spec).unwrap();
        relays.push(RelayHost {
            id: format!("r{i}"),
            node: r,
            addr: link.b_addr,
        });
    }
    tb.route().unwrap();
    let dir = std::env::temp_dir().join(format!("steelyard-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Some(Net {
        tb,
        peers: [pa, pb],
        relays,
        broker,
        nat,
        dir,
        logs: Vec::new(),
        pids: Vec::new(),
    })
}

/// Builds the topology without a broker and starts a standalone relay (probe responder, TCP
/// port) on every relay host, for direct measurements.
pub fn build(test: &str, handicap: impl Fn(usize) -> (LinkSpec, usize) + 'static) -> Option<Net> {
    let shape = Shape {
        broker: false,
        ..Shape::brokered(handicap)
    };
    let mut net = topology(test, &shape)?;
    let broker_key = steelyard_proto::hex::encode(
        steelyard_proto::ticket::TicketSigner::from_seed([9; 32])
            .public_key()
            .as_bytes(),
    );
    for i in 0..RELAYS {
        let (node, id) = (net.relays[i].node, net.relays[i].id.clone());
        net.start(
            node,
            &id,
            &[
                "relay",
                "--relay-id",
                &id,
                "--broker-key",
                &broker_key,
                "--tcp",
                "0.0.0.0:7400",
                "--probe",
                "0.0.0.0:7402",
                "--http",
                RELAY_HTTP,
            ],
            |l| l.starts_with("relay listening"),
        );
    }
    Some(net)
}

impl Net {
    /// Starts `steelyard <args>` inside `node`, logging stderr to `<dir>/<name>.log` (warnings,
    /// and the agent daemon's info lines: tunnels resumed, offers refused), and waits
    /// (30 s at most) for the stdout line `ready` accepts. Returns that line.
    pub fn start(
        &mut self,
        node: Node,
        name: &str,
        args: &[&str],
        ready: fn(&str) -> bool,
    ) -> String {
        let log = self.dir.join(format!("{name}.log"));
        let mut cmd = self.tb.command(node, BIN);
        cmd.args(args)
            .env("RUST_LOG", "warn,steelyard_agent::daemon=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().unwrap();
        self.pids.push((name.to_owned(), child.id()));
        self.logs.push((name.to_owned(), log));
        self.tb.adopt(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && ready(&line) {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{name} did not say it was ready within 30 s"))
    }

    /// The pid of the process started as `name`.
    pub fn pid(&self, name: &str) -> u32 {
        self.pids
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"))
            .1
    }

    /// The log (stderr) of the process started as `name`, so far.
    pub fn log(&self, name: &str) -> String {
        self.logs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| std::fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    /// A relay's index by id.
    pub fn relay_index(&self, id: &str) -> usize {
        self.relays
            .iter()
            .position(|r| r.id == id)
            .unwrap_or_else(|| panic!("no relay {id}"))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, path) in &self.logs {
                let text = std::fs::read_to_string(path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- last lines of {name}'s log:");
                for l in tail.into_iter().rev() {
                    eprintln!("    {l}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.1 exchange from inside `node`; the status and the body.
pub fn http(
    tb: &Testbed,
    node: Node,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let target: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = tb
        .in_netns(node, || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP answer: {text:?}"))?;
    let head_end = text.find("\r\n\r\n").map_or(text.len(), |i| i + 4);
    let head = &text[..head_end];
    let mut body = text[head_end..].to_string();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The running brokered system on a [`Net`] with a broker host.
pub struct Fabric {
    pub net: Net,
    broker_addr: String,
    /// Tells bob's echo service to stop accepting.
    echo_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Stop bob's echo service so its listener does not keep pb's namespace alive: set the
        // flag, then wake its accept.
        self.echo_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let addr: SocketAddr = ECHO_SERVICE.parse().unwrap();
        let _ = self.net.tb.in_netns(self.net.peers[1], || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        });
    }
}

/// Bytes a relay may forward during [`Fabric::echo_through_one_relay`] without carrying the
/// tunnel: held-open, idle tunnels exchange keepalives (a 28-byte frame each way a second per
/// tunnel by default), nothing more.
pub const IDLE_TUNNEL_BYTES: u64 = 8 * 1024;

impl Fabric {
    /// Starts the broker, relay `i` with `max_sessions[i]`, bob's echo service, the agents and
    /// alice's `steelyard connect bob echo` listener; waits until the broker can explain a
    /// decision for alice → bob over all three relays.
    pub fn start(mut net: Net, max_sessions: [u32; RELAYS]) -> Self {
        let (bnode, baddr) = net.broker.expect("a shape with a broker");
        let broker_addr = format!("{baddr}:{BROKER_PORT}");
        let config = format!(
            "listen = \"0.0.0.0:{BROKER_PORT}\"\nlisten_plain = true\nstore = \"memory\"\n\
             data_dir = \"{dir}\"\nadmin_token = \"{ADMIN}\"\n\n[[enroll_tokens]]\nname = \"agents\"\n\
             token = \"{AGENT_TOKEN}\"\n\n[[enroll_tokens]]\nname = \"relays\"\ntoken = \"{RELAY_TOKEN}\"\n\
             role = \"relay\"\n\n[schedule]\ninterval_ms = 1000\njitter_ms = 100\n\
             relay_load_interval_ms = 250\n",
            dir = net.dir.display()
        );
        let path = write(&net.dir, "broker.toml", &config);
        net.start(bnode, "broker", &["broker", "--config", &path], |l| {
            l.contains("://")
        });
        let local = format!("127.0.0.1:{BROKER_PORT}");
        let (status, keys) = http(&net.tb, bnode, &local, "GET", "/v1/keys", None).unwrap();
        assert_eq!(status, 200, "GET /v1/keys: {keys}");
        let keys: serde_json::Value = serde_json::from_str(&keys).unwrap();
        let ticket_key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();

        for (i, max) in max_sessions.into_iter().enumerate() {
            let (node, id, addr) = (
                net.relays[i].node,
                net.relays[i].id.clone(),
                net.relays[i].addr,
            );
            let config = format!(
                "relay_id = \"{id}\"\nbroker_keys = [\"{ticket_key}\"]\n\n[listen]\n\
                 tcp = \"0.0.0.0:7400\"\nprobe = \"0.0.0.0:7402\"\nhttp = \"{RELAY_HTTP}\"\n\n\
                 [capacity]\nmax_sessions = {max}\n\n[drain]\ngrace_secs = 1\n\n[broker]\n\
                 url = \"ws://{broker_addr}/v1/relay\"\nidentity_key_file = \"{key}\"\n\
                 enroll_token = \"{RELAY_TOKEN}\"\nadvertise_tcp = \"{addr}:7400\"\n\
                 advertise_udp = \"{addr}:7402\"\n",
                key = net.dir.join(format!("{id}.key")).display(),
            );
            let path = write(&net.dir, &format!("{id}.toml"), &config);
            net.start(node, &id, &["relay", "--config", &path], |l| {
                l.starts_with("relay listening")
            });
        }

        // Bob's echo service, in pb.
        let listener = net
            .tb
            .in_netns(net.peers[1], || TcpListener::bind(ECHO_SERVICE))
            .unwrap()
            .unwrap();
        let echo_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = echo_stop.clone();
        std::thread::spawn(move || echo_service(listener, &stop));

        for (peer, node, extra) in [
            ("alice", net.peers[0], String::new()),
            (
                "bob",
                net.peers[1],
                format!("[services]\necho = \"{ECHO_SERVICE}\"\n\n[offers]\nallow = [\"alice\"]\n"),
            ),
        ] {
            let config = format!(
                "broker = \"ws://{broker_addr}\"\nenroll_token = \"{AGENT_TOKEN}\"\npeer_id = \"{peer}\"\n\
                 key_file = \"{}\"\ncontrol = \"{CONTROL}\"\n\n{extra}",
                net.dir.join(format!("{peer}.key")).display()
            );
            let path = write(&net.dir, &format!("{peer}.toml"), &config);
            net.start(node, peer, &["agent", "--config", &path], |l| {
                l.starts_with("agent ")
            });
        }
        let pa = net.peers[0];
        net.start(
            pa,
            "connect",
            &[
                "connect",
                "bob",
                "echo",
                "--listen",
                ECHO_LISTEN,
                "--control",
                CONTROL,
            ],
            |l| l.contains("listening="),
        );
        let fabric = Self {
            net,
            broker_addr,
            echo_stop,
        };
        fabric.wait_ready();
        fabric
    }

    /// A broker HTTP exchange with the admin token, from inside the broker's host.
    pub fn broker_http(&self, path: &str) -> (u16, String) {
        let (node, _) = self.net.broker.unwrap();
        http(
            &self.net.tb,
            node,
            &format!("127.0.0.1:{BROKER_PORT}"),
            "GET",
            path,
            Some(ADMIN),
        )
        .unwrap_or_else(|e| panic!("broker {path}: {e}"))
    }

    /// `GET /v1/explain?from=alice&to=bob`: the decision, or what the broker said instead.
    pub fn explain(&self) -> Result<Decision, String> {
        let (status, body) = self.broker_http("/v1/explain?from=alice&to=bob");
        if status != 200 {
            return Err(format!("{status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("not a decision ({e}): {body}"))
    }

    /// Waits (60 s at most) until both agents are online with a report over every relay and
    /// the broker explains a decision that covers every relay.
    fn wait_ready(&self) {
        let started = Instant::now();
        let limit = Duration::from_secs(60);
        let mut last = String::new();
        while started.elapsed() < limit {
            let (_, body) = self.broker_http("/v1/admin/peers");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let reported = |peer: &str| {
                v["peers"].as_array().is_some_and(|a| {
                    a.iter().any(|p| {
                        p["id"] == peer
                            && p["online"] == true
                            && p["paths"].as_u64() == Some(RELAYS as u64)
                    })
                })
            };
            if reported("alice") && reported("bob") {
                match self.explain() {
                    Ok(d) if d.ranked.len() + d.rejected.len() == RELAYS => {
                        eprintln!(
                            "fabric ready after {:.1} s (both agents reported every relay)",
                            started.elapsed().as_secs_f64()
                        );
                        return;
                    }
                    Ok(d) => last = format!("a decision over {} relays: {d}", d.ranked.len()),
                    Err(e) => last = e,
                }
            } else {
                last = format!("peers: {body}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the broker had no decision over all relays within 60 s; last: {last}");
    }

    /// Waits (`limit` at most) until the broker's decision satisfies `ok`; returns it.
    pub fn wait_decision(&self, limit: Duration, ok: impl Fn(&Decision) -> bool) -> Decision {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < limit {
            match self.explain() {
                Ok(d) if ok(&d) => return d,
                Ok(d) => last = d.to_string(),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the broker's decision did not change as expected within {limit:?}; last:\n{last}");
    }

    /// Bytes relay `i` forwarded (both directions) from its `/status`; `None` when it does not
    /// answer.
    pub fn relay_bytes(&self, i: usize) -> Option<u64> {
        let r = &self.net.relays[i];
        let (status, body) = http(&self.net.tb, r.node, RELAY_HTTP, "GET", "/status", None).ok()?;
        assert_eq!(status, 200, "{}'s /status: {body}", r.id);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        Some(v["bytes_a_to_b"].as_u64()? + v["bytes_b_to_a"].as_u64()?)
    }

    /// Every relay's byte counter (0 for one that does not answer).
    pub fn all_relay_bytes(&self) -> Vec<u64> {
        (0..RELAYS)
            .map(|i| self.relay_bytes(i).unwrap_or(0))
            .collect()
    }

    /// A connection to alice's `steelyard connect bob echo` listener: a new tunnel.
    pub fn tunnel(&self) -> TcpStream {
        let addr: SocketAddr = ECHO_LISTEN.parse().unwrap();
        let s = self
            .net
            .tb
            .in_netns(self.net.peers[0], || TcpStream::connect(addr))
            .unwrap()
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// The relays `steelyard connect` logged for its tunnels so far, in order (the broker's
    /// answer for each connection).
    pub fn tunnel_relays(&self) -> Vec<String> {
        self.net
            .log("connect")
            .lines()
            .filter_map(|l| l.split(" via relay ").nth(1))
            .map(|r| r.trim().to_owned())
            .collect()
    }

    /// Opens a tunnel, echoes `len` bytes through it and checks them; returns the relay the
    /// broker gave it, checked against the relays' counters: that relay forwarded at least the
    /// bytes both ways, every other relay at most [`IDLE_TUNNEL_BYTES`] (the keepalives of
    /// tunnels held open elsewhere). `len` must be larger than that.
    pub fn echo_through_one_relay(&self, len: usize) -> String {
        assert!(
            len > IDLE_TUNNEL_BYTES as usize,
            "echo more than the keepalive allowance"
        );
        let before = self.all_relay_bytes();
        let n = self.tunnel_relays().len();
        let mut s = self.tunnel();
        echo(&mut s, len, 7).unwrap_or_else(|e| panic!("echo through the tunnel: {e}"));
        drop(s);
        let relays = self.tunnel_relays();
        assert_eq!(relays.len(), n + 1, "connect logged {relays:?}");
        let relay = relays[n].clone();
        let used = self.net.relay_index(&relay);
        let after = self.all_relay_bytes();
        for i in 0..RELAYS {
            let moved = after[i] - before[i];
            if i == used {
                assert!(
                    moved >= 2 * len as u64,
                    "{relay} carried the tunnel but forwarded only {moved} bytes of 2 x {len}"
                );
            } else {
                assert!(
                    moved <= IDLE_TUNNEL_BYTES,
                    "{} forwarded {moved} bytes while the broker put the tunnel on {relay}",
                    self.net.relays[i].id
                );
            }
        }
        relay
    }

    /// Kills relay `i` (SIGKILL: a crash, its connections reset by the kernel).
    pub fn kill_relay(&self, i: usize) {
        let pid = self.net.pid(&self.net.relays[i].id);
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -KILL {pid}");
    }

    /// Cuts relay `i` off: its host drops every packet except on loopback, without telling
    /// anyone (a dead link). The relay keeps running and its `/status` still answers.
    pub fn cut_off_relay(&self, i: usize) {
        let node = self.net.relays[i].node;
        for chain in [["-I", "INPUT", "-i"], ["-I", "OUTPUT", "-o"]] {
            self.net
                .tb
                .run(
                    node,
                    "iptables",
                    &[chain[0], chain[1], "!", chain[2], "lo", "-j", "DROP"],
                )
                .unwrap();
        }
    }

    /// The broker's address as the namespaces see it.
    pub fn broker_addr(&self) -> &str {
        &self.broker_addr
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Bob's echo: every connection gets back what it sends, then a half-close.
fn echo_service(listener: TcpListener, stop: &std::sync::atomic::AtomicBool) {
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { return };
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        std::thread::spawn(move || {
            let mut back = s.try_clone().unwrap();
            let _ = std::io::copy(&mut s, &mut back);
            let _ = back.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// FNV-1a.
pub fn fnv(h: u64, data: &[u8]) -> u64 {
    data.iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

pub const FNV_START: u64 = 0xcbf29ce484222325;

/// A test pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `len` bytes through an echo tunnel, half-closes, and checks what comes back.
pub fn echo(s: &mut TcpStream, len: usize, seed: u64) -> Result<(), String> {
    let data = pattern(len, seed);
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(len);
    let read = s.read_to_end(&mut back);
    let wrote = writer.join().unwrap();
    read.map_err(|e| format!("reading the echo: {e}"))?;
    wrote.map_err(|e| format!("writing: {e}"))?;
    if back.len() != len || fnv(FNV_START, &back) != fnv(FNV_START, &pattern(len, seed)) {
        return Err(format!(
            "the echo returned {} of {len} bytes, or other bytes",
            back.len()
        ));
    }
    Ok(())
}
