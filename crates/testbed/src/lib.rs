//! A network test bed of Linux network namespaces, for tests that need a network where paths
//! differ: hosts and routers (each router adds a real IP hop) joined by veth links, with per-link
//! bandwidth limits (`tc tbf`), random loss (netfilter `statistic`), one-way delay (a user-space
//! link emulator, since this kernel has no `netem`), NAT (masquerade) and blocked UDP.
//!
//! ```no_run
//! use steelyard_testbed::{LinkSpec, Testbed};
//! let Some(mut tb) = Testbed::new_or_skip("my_test").unwrap() else { return };
//! let a = tb.host("a").unwrap();
//! let r = tb.router("r").unwrap();
//! let b = tb.host("b").unwrap();
//! tb.link(a, r, LinkSpec::default()).unwrap();
//! let rb = tb.link(r, b, LinkSpec { delay_ms_each_way: Some(20), ..LinkSpec::default() }).unwrap();
//! tb.route().unwrap();
//! let out = tb.run(a, "ping", &["-c1", &rb.b_addr.to_string()]).unwrap();
//! ```
//!
//! Addresses come from 10.77.0.0/16 and exist only inside the namespaces a test bed made; nothing
//! is configured in the machine's own namespace. Every namespace is named
//! `sy<pid>-<n>-<node>` so a test bed is unique per process and per instance; dropping the test
//! bed (also when a test panics) kills the processes it started and deletes its namespaces, and
//! [`Testbed::new`] first sweeps namespaces left by test processes that no longer exist (a run
//! that was killed). It needs root (CI runs as root); [`Testbed::new_or_skip`] says loudly when a
//! test cannot run and fails under CI instead of skipping.
//!
//! What this crate does not do: it starts no Steelyard component by itself and measures nothing;
//! tests use [`Testbed::command`] / [`Testbed::spawn`] to run programs inside a node, and
//! [`Testbed::in_netns`] to open their own sockets inside one.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The link emulator's source; run with `python3 - IFACE_A IFACE_B DELAY_MS` inside a node.
const DELAY_BRIDGE: &str = include_str!("delay_bridge.py");

/// Programs the test bed runs, and the Debian package each comes from.
const TOOLS: [(&str, &str); 6] = [
    ("chrt", "util-linux"),
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iptables", "iptables"),
    ("ethtool", "ethtool"),
    ("python3", "python3"),
];

static INSTANCES: AtomicU32 = AtomicU32::new(0);

/// What went wrong building or using a test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The process may not create network namespaces.
    #[error("cannot create network namespaces ({0}): run the test as root")]
    NotPermitted(String),
    /// A program the test bed needs is missing.
    #[error("`{tool}` is missing: install it with `apt-get install -y {package}` (scripts/test.sh does)")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// Its Debian package.
        package: &'static str,
    },
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr (or the spawn error).
        stderr: String,
    },
    /// The topology asked for is not possible.
    #[error("topology: {0}")]
    Topology(String),
}

type Result<T> = std::result::Result<T, TestbedError>;

/// A node of the test bed (host or router).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Node(usize);

/// How a link behaves. The default is an unlimited, lossless link with no added delay.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkSpec {
    /// Rate limit in kbit/s, each way (`tc tbf` on both ends).
    pub bandwidth_kbit: Option<u64>,
    /// Share of packets dropped, each way (0..1), by netfilter on both ends. A round trip then
    /// loses `1 − (1 − p)²`.
    pub loss_each_way: Option<f64>,
    /// Delay added each way in ms (so the RTT grows by twice this), by a user-space emulator.
    pub delay_ms_each_way: Option<u32>,
}

/// A link as built: the addresses of its two ends (one /24 per link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Address of the first node's end.
    pub a_addr: Ipv4Addr,
    /// Address of the second node's end.
    pub b_addr: Ipv4Addr,
}

#[derive(Debug)]
struct NodeInfo {
    name: String,
    netns: String,
    router: bool,
}

#[derive(Debug)]
struct LinkInfo {
    a: Node,
    b: Node,
    a_if: String,
    b_if: String,
    subnet: u8,
    addrs: Link,
}

/// A network of namespaces; see the crate docs. Dropping it tears everything down.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    nodes: Vec<NodeInfo>,
    links: Vec<LinkInfo>,
    /// Subnets (link indices) hidden behind a NAT router: (link, router).
    nat: Vec<(usize, Node)>,
    children: Vec<Child>,
    /// Namespaces of link emulators (not nodes).
    extra_netns: Vec<String>,
}

impl Testbed {
    /// A new, empty test bed. Sweeps leftovers of killed runs first.
    pub fn new() -> Result<Self> {
        for (tool, package) in TOOLS {
            let found = Command::new(tool)
                .arg(if tool == "python3" { "--version" } else { "-V" })
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Err(TestbedError::MissingTool { tool, package });
            }
        }
        sweep_leftovers();
        let prefix = format!(
            "sy{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        );
        // Probe the permission with a throwaway namespace.
        let probe = format!("{prefix}-probe");
        let out = Command::new("ip")
            .args(["netns", "add", &probe])
            .output()
            .map_err(|e| TestbedError::NotPermitted(e.to_string()))?;
        if !out.status.success() {
            return Err(TestbedError::NotPermitted(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        Ok(Self {
            prefix,
            nodes: Vec::new(),
            links: Vec::new(),
            nat: Vec::new(),
            children: Vec::new(),
            extra_netns: Vec::new(),
        })
    }

    /// A new test bed, or `None` with a loud message when namespaces cannot be made here (not
    /// root). Under CI (`CI` set) that is an error instead: the test bed tests must run there.
    pub fn new_or_skip(test: &str) -> Result<Option<Self>> {
        match Self::new() {
            Ok(tb) => Ok(Some(tb)),
            Err(TestbedError::NotPermitted(why)) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "\n*** SKIPPED {test}: network namespaces unavailable ({why}); run as root. \
                     Under CI this is a failure. ***\n"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Adds a host: a namespace with loopback up and forwarding off.
    pub fn host(&mut self, name: &str) -> Result<Node> {
        self.node(name, false)
    }

    /// Adds a router: a namespace with IPv4 forwarding on. Each router on a path is one IP hop.
    pub fn router(&mut self, name: &str) -> Result<Node> {
        self.node(name, true)
    }

    fn node(&mut self, name: &str, router: bool) -> Result<Node> {
        if self.nodes.iter().any(|n| n.name == name) {
            return Err(TestbedError::Topology(format!("two nodes named {name}")));
        }
        let netns = format!("{}-{name}", self.prefix);
        sh(&["ip", "netns", "add", &netns])?;
        self.nodes.push(NodeInfo {
            name: name.to_string(),
            netns: netns.clone(),
            router,
        });
        in_ns(&netns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            &netns,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv4.ip_forward={}", u8::from(router)),
            ],
        )?;
        Ok(Node(self.nodes.len() - 1))
    }

    /// The name of a node's namespace (for `ip netns exec`).
    pub fn netns(&self, node: Node) -> &str {
        &self.nodes[node.0].netns
    }

    /// Joins two nodes with a link. Returns the addresses of its ends.
    pub fn link(&mut self, a: Node, b: Node, spec: LinkSpec) -> Result<Link> {
        let k = self.links.len();
        let subnet = u8::try_from(k + 1)
            .map_err(|_| TestbedError::Topology("at most 254 links".to_string()))?;
        let (a_if, b_if) = (
            format!("l{k}{}", self.nodes[b.0].name),
            format!("l{k}{}", self.nodes[a.0].name),
        );
        let (a_if, b_if) = (truncate_ifname(&a_if), truncate_ifname(&b_if));
        let (ns_a, ns_b) = (self.nodes[a.0].netns.clone(), self.nodes[b.0].netns.clone());
        match spec.delay_ms_each_way {
            None => {
                sh(&[
                    "ip", "link", "add", &a_if, "netns", &ns_a, "type", "veth", "peer", "name",
                    &b_if, "netns", &ns_b,
                ])?;
            }
            Some(delay) => {
                // a -- [emulator namespace: x <-> y] -- b
                let emu = format!("{}-delay{k}", self.prefix);
                sh(&["ip", "netns", "add", &emu])?;
                self.extra_netns.push(emu.clone());
                sh(&[
                    "ip", "link", "add", &a_if, "netns", &ns_a, "type", "veth", "peer", "name",
                    "x", "netns", &emu,
                ])?;
                sh(&[
                    "ip", "link", "add", &b_if, "netns", &ns_b, "type", "veth", "peer", "name",
                    "y", "netns", &emu,
                ])?;
                for dev in ["x", "y"] {
                    in_ns(&emu, &["ip", "link", "set", dev, "up", "promisc", "on"])?;
                    no_offloads(&emu, dev)?;
                }
                no_offloads(&ns_a, &a_if)?;
                no_offloads(&ns_b, &b_if)?;
                // Real-time priority: a busy machine must not add its own delay to the emulated
                // one (the bridge sleeps in poll(2) between frames, so it cannot hog a core).
                let mut child = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &emu,
                        "chrt",
                        "-f",
                        "50",
                        "python3",
                        "-",
                        "x",
                        "y",
                        &delay.to_string(),
                    ])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .map_err(|e| TestbedError::Command {
                        command: "python3 delay bridge".to_string(),
                        stderr: e.to_string(),
                    })?;
                {
                    use std::io::Write;
                    let mut stdin = child.stdin.take().expect("piped stdin");
                    stdin.write_all(DELAY_BRIDGE.as_bytes()).map_err(|e| {
                        TestbedError::Command {
                            command: "python3 delay bridge".to_string(),
                            stderr: e.to_string(),
                        }
                    })?;
                }
                let stdout = child.stdout.take().expect("piped stdout");
                self.children.push(child);
                let mut ready = String::new();
                BufReader::new(stdout).read_line(&mut ready).map_err(|e| {
                    TestbedError::Command {
                        command: "python3 delay bridge".to_string(),
                        stderr: e.to_string(),
                    }
                })?;
                if ready.trim() != "ready" {
                    return Err(TestbedError::Command {
                        command: "python3 delay bridge".to_string(),
                        stderr: format!("did not start (said {ready:?})"),
                    });
                }
            }
        }
        let addrs = Link {
            a_addr: Ipv4Addr::new(10, 77, subnet, 1),
            b_addr: Ipv4Addr::new(10, 77, subnet, 2),
        };
        for (ns, dev, addr) in [(&ns_a, &a_if, addrs.a_addr), (&ns_b, &b_if, addrs.b_addr)] {
            in_ns(
                ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            in_ns(ns, &["ip", "link", "set", dev, "up"])?;
            if let Some(kbit) = spec.bandwidth_kbit {
                // Burst: at least one MTU-sized packet, about 10 ms worth at the rate.
                let burst = (kbit * 1000 / 8 / 100).max(3000);
                in_ns(
                    ns,
                    &[
                        "tc",
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        &format!("{kbit}kbit"),
                        "burst",
                        &burst.to_string(),
                        "latency",
                        "200ms",
                    ],
                )?;
            }
            if let Some(p) = spec.loss_each_way {
                if !(0.0..=1.0).contains(&p) {
                    return Err(TestbedError::Topology(format!("loss {p} is not in 0..=1")));
                }
                in_ns(
                    ns,
                    &[
                        "iptables",
                        "-t",
                        "mangle",
                        "-A",
                        "POSTROUTING",
                        "-o",
                        dev,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p.to_string(),
                        "-j",
                        "DROP",
                    ],
                )?;
            }
        }
        self.links.push(LinkInfo {
            a,
            b,
            a_if,
            b_if,
            subnet,
            addrs: addrs.clone(),
        });
        Ok(addrs)
    }

    /// Makes `router` masquerade traffic that leaves it from the subnet of `inside` (a link of
    /// the router): nodes beyond the router see the router's address, and get no route into the
    /// inside subnet. Call before [`Testbed::route`].
    pub fn nat(&mut self, router: Node, inside: &Link) -> Result<()> {
        let k = self
            .links
            .iter()
            .position(|l| &l.addrs == inside)
            .ok_or_else(|| TestbedError::Topology("nat: unknown link".to_string()))?;
        let l = &self.links[k];
        if l.a != router && l.b != router {
            return Err(TestbedError::Topology(format!(
                "nat: {} is not on that link",
                self.nodes[router.0].name
            )));
        }
        in_ns(
            &self.nodes[router.0].netns,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &format!("10.77.{}.0/24", l.subnet),
                "!",
                "-d",
                &format!("10.77.{}.0/24", l.subnet),
                "-j",
                "MASQUERADE",
            ],
        )?;
        self.nat.push((k, router));
        Ok(())
    }

    /// Drops every UDP packet a node sends or receives, except on loopback (a firewall that
    /// blocks UDP).
    pub fn block_udp(&self, node: Node) -> Result<()> {
        let ns = &self.nodes[node.0].netns;
        for chain in [["-A", "OUTPUT", "-o"], ["-A", "INPUT", "-i"]] {
            in_ns(
                ns,
                &[
                    "iptables", chain[0], chain[1], "!", chain[2], "lo", "-p", "udp", "-j", "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Installs static routes so every node reaches every subnet along a shortest path through
    /// routers (hosts never forward). Subnets behind a NAT are reachable only from inside.
    pub fn route(&self) -> Result<()> {
        for (src, node) in self.nodes.iter().enumerate() {
            // Breadth-first from src: the first hop (next-hop address) towards each node.
            let mut first_hop: Vec<Option<Ipv4Addr>> = vec![None; self.nodes.len()];
            let mut seen = vec![false; self.nodes.len()];
            seen[src] = true;
            let mut queue = VecDeque::from([src]);
            while let Some(at) = queue.pop_front() {
                if at != src && !self.nodes[at].router {
                    continue; // hosts do not forward
                }
                for l in &self.links {
                    let (next, next_addr) = if l.a.0 == at {
                        (l.b.0, l.addrs.b_addr)
                    } else if l.b.0 == at {
                        (l.a.0, l.addrs.a_addr)
                    } else {
                        continue;
                    };
                    if !seen[next] {
                        seen[next] = true;
                        first_hop[next] = if at == src {
                            Some(next_addr)
                        } else {
                            first_hop[at]
                        };
                        queue.push_back(next);
                    }
                }
            }
            for (k, l) in self.links.iter().enumerate() {
                if l.a.0 == src || l.b.0 == src {
                    continue; // directly attached
                }
                let hidden = self
                    .nat
                    .iter()
                    .any(|(inside, router)| *inside == k && !self.inside_of_nat(src, k, *router));
                // Through a router on the link (hosts do not forward).
                let via = [l.a.0, l.b.0]
                    .into_iter()
                    .filter(|end| self.nodes[*end].router)
                    .find_map(|end| first_hop[end]);
                let (Some(via), false) = (via, hidden) else {
                    continue;
                };
                in_ns(
                    &node.netns,
                    &[
                        "ip",
                        "route",
                        "add",
                        &format!("10.77.{}.0/24", l.subnet),
                        "via",
                        &via.to_string(),
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Whether `node` sits on the inside of the NAT `router` for link `inside`: it reaches the
    /// inside link without passing through the router.
    fn inside_of_nat(&self, node: usize, inside: usize, router: Node) -> bool {
        let l = &self.links[inside];
        let mut seen = vec![false; self.nodes.len()];
        seen[node] = true;
        seen[router.0] = true; // cannot pass the router
        let mut queue = VecDeque::from([node]);
        while let Some(at) = queue.pop_front() {
            if at == l.a.0 || at == l.b.0 {
                return true;
            }
            for link in &self.links {
                let next = if link.a.0 == at {
                    link.b.0
                } else if link.b.0 == at {
                    link.a.0
                } else {
                    continue;
                };
                if !seen[next] {
                    seen[next] = true;
                    queue.push_back(next);
                }
            }
        }
        false
    }

    /// A command that runs `program` inside `node`.
    pub fn command(&self, node: Node, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.nodes[node.0].netns, program]);
        c
    }

    /// Runs `program args` inside `node` to completion; an error if it fails.
    pub fn run(&self, node: Node, program: &str, args: &[&str]) -> Result<Output> {
        let out = self
            .command(node, program)
            .args(args)
            .output()
            .map_err(|e| TestbedError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(TestbedError::Command {
                command: format!(
                    "{program} {} (in {})",
                    args.join(" "),
                    self.nodes[node.0].name
                ),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    String::from_utf8_lossy(&out.stdout).trim()
                ),
            });
        }
        Ok(out)
    }

    /// Starts a command built with [`Testbed::command`]; it is killed when the test bed drops.
    /// Returns its process id.
    pub fn spawn(&mut self, mut command: Command) -> Result<u32> {
        let child = command.spawn().map_err(|e| TestbedError::Command {
            command: format!("{command:?}"),
            stderr: e.to_string(),
        })?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Takes over a child started from [`Testbed::command`] by the caller (e.g. to read its
    /// first output line first): it is killed when the test bed drops.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// Runs `f` on a thread that has joined `node`'s network namespace and returns what it
    /// returns. Sockets `f` creates belong to that namespace for good, so a test can bind a
    /// service inside a node or connect to a node's loopback, then use the socket anywhere
    /// (e.g. hand it to another thread). The calling thread's namespace does not change.
    pub fn in_netns<T: Send>(&self, node: Node, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.nodes[node.0].netns);
        let file = std::fs::File::open(&path).map_err(|e| TestbedError::Command {
            command: format!("open {path}"),
            stderr: e.to_string(),
        })?;
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    TestbedError::Command {
                        command: format!("setns({path})"),
                        stderr: e.to_string(),
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Waits until `check` is true, polling every 20 ms, for at most `limit`.
    pub fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The interface names of a link's two ends (for tests that inspect counters).
    pub fn interfaces(&self, link: &Link) -> Option<(&str, &str)> {
        self.links
            .iter()
            .find(|l| &l.addrs == link)
            .map(|l| (l.a_if.as_str(), l.b_if.as_str()))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self
            .nodes
            .iter()
            .map(|n| n.netns.clone())
            .chain(self.extra_netns.clone())
        {
            delete_netns(&ns);
        }
    }
}

impl fmt::Display for Testbed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.links {
            writeln!(
                f,
                "{} {} -- {} {}",
                self.nodes[l.a.0].name, l.addrs.a_addr, l.addrs.b_addr, self.nodes[l.b.0].name
            )?;
        }
        Ok(())
    }
}

/// Kills what runs in a namespace and deletes it.
fn delete_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces of test beds whose process is gone (a killed run).
fn sweep_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("sy") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(name);
        }
    }
}

fn truncate_ifname(name: &str) -> String {
    name.chars().take(15).collect()
}

fn no_offloads(ns: &str, dev: &str) -> Result<()> {
    // Frames larger than the MTU (GSO/GRO) cannot cross a packet socket, and checksums left to
    // the device (TX checksum offload) would arrive unfinished: turn both off.
    in_ns(
        ns,
        &[
            "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx",
            "off",
        ],
    )
    .map(|_| ())
}

fn sh(args: &[&str]) -> Result<Output> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| TestbedError::Command {
            command: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn in_ns(ns: &str, args: &[&str]) -> Result<Output> {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    sh(&full)
}
