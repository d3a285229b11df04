//! The test bed itself, checked with real tools (ping, iperf3, python sockets): routers add
//! hops, links limit bandwidth, lose and delay packets as configured, NAT hides the inside,
//! blocked UDP is blocked, and nothing is left behind.

use std::process::Stdio;
use std::time::Duration;

use steelyard_testbed::{LinkSpec, Testbed};

/// A test bed, or a loud skip outside CI when not root.
macro_rules! testbed {
    ($name:expr) => {
        match Testbed::new_or_skip($name).unwrap_or_else(|e| panic!("{e}")) {
            Some(tb) => tb,
            None => return,
        }
    };
}

fn stdout(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// RTTs in ms from ping's output lines `... time=12.3 ms`.
fn ping_rtts(text: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn routers_add_hops_and_routes_reach_everything() {
    let mut tb = testbed!("routers_add_hops_and_routes_reach_everything");
    let a = tb.host("a").unwrap();
    let r1 = tb.router("r1").unwrap();
    let r2 = tb.router("r2").unwrap();
    let b = tb.host("b").unwrap();
    tb.link(a, r1, LinkSpec::default()).unwrap();
    tb.link(r1, r2, LinkSpec::default()).unwrap();
    let to_b = tb.link(r2, b, LinkSpec::default()).unwrap();
    tb.route().unwrap();
    let out = stdout(
        tb.run(a, "ping", &["-c1", "-W2", &to_b.b_addr.to_string()])
            .unwrap(),
    );
    // b answers with TTL 64; two routers decrement it on the way back.
    assert!(out.contains("ttl=62"), "{out}");
}

#[test]
fn delay_is_added_each_way() {
    let mut tb = testbed!("delay_is_added_each_way");
    let a = tb.host("a").unwrap();
    let b = tb.host("b").unwrap();
    let link = tb
        .link(
            a,
            b,
            LinkSpec {
                delay_ms_each_way: Some(20),
                ..LinkSpec::default()
            },
        )
        .unwrap();
    let out = stdout(
        tb.run(
            a,
            "ping",
            &["-c7", "-i0.05", "-W2", &link.b_addr.to_string()],
        )
        .unwrap(),
    );
    let rtt = median(ping_rtts(&out));
    assert!(
        (40.0..45.0).contains(&rtt),
        "median RTT {rtt} ms, want 40 (+ <5):\n{out}"
    );
}

#[test]
fn loss_drops_the_configured_share() {
    let mut tb = testbed!("loss_drops_the_configured_share");
    let a = tb.host("a").unwrap();
    let b = tb.host("b").unwrap();
    let link = tb
        .link(
            a,
            b,
            LinkSpec {
                loss_each_way: Some(0.2),
                ..LinkSpec::default()
            },
        )
        .unwrap();
    // 400 echo requests; a round trip survives with probability 0.8² = 0.64.
    let out = tb
        .command(a, "ping")
        .args(["-c400", "-i0.002", "-W1", "-q", &link.b_addr.to_string()])
        .output()
        .unwrap();
    let text = stdout(out);
    let received: f64 = text
        .split(" received")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in {text}"));
    let loss = 1.0 - received / 400.0;
    // 400 trials at p = 0.36: the standard deviation is 2.4 points; allow 4 of them.
    assert!(
        (0.26..0.46).contains(&loss),
        "round-trip loss {loss}, want 0.36:\n{text}"
    );
}

#[test]
fn bandwidth_is_limited() {
    let mut tb = testbed!("bandwidth_is_limited");
    let a = tb.host("a").unwrap();
    let b = tb.host("b").unwrap();
    let link = tb
        .link(
            a,
            b,
            LinkSpec {
                bandwidth_kbit: Some(2_000),
                ..LinkSpec::default()
            },
        )
        .unwrap();
    let mut server = tb.command(b, "iperf3");
    server
        .args(["-s", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    tb.spawn(server).unwrap();
    let addr = link.b_addr.to_string();
    let mut out = None;
    for _ in 0..50 {
        // Until the server listens, iperf3 reports an error (with or without a failing status).
        // The first second (slow start, and a loaded machine's late wake-ups) is not counted:
        // the shaped rate is what is measured.
        match tb.run(
            a,
            "iperf3",
            &["-c", &addr, "-p", "5201", "-t", "3", "-O", "1", "-J"],
        ) {
            Ok(o) if stdout(o.clone()).contains("\"sum_received\"") => {
                out = Some(stdout(o));
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let json = out.expect("iperf3 ran");
    let bps: f64 = json
        .split("\"sum_received\"")
        .nth(1)
        .and_then(|s| s.split("\"bits_per_second\":").nth(1))
        .and_then(|s| s.split([',', '\n', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no received rate in iperf3's output: {json}"));
    let kbit = bps / 1000.0;
    assert!(
        (1_400.0..2_300.0).contains(&kbit),
        "{kbit} kbit/s through a 2000 kbit/s link"
    );
}

const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048)
    s.sendto(a[0].encode(), a)
"#;

const UDP_ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
for _ in range(10):
    s.sendto(b"who", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(2048)[0].decode())
        sys.exit(0)
    except socket.timeout:
        pass
sys.exit(3)
"#;

/// Starts the UDP echo (answers with the sender's address) in `node` and waits until it listens.
fn udp_echo(tb: &mut Testbed, node: steelyard_testbed::Node) {
    use std::io::BufRead;
    let mut cmd = tb.command(node, "python3");
    cmd.args(["-c", UDP_ECHO, "9000"]).stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    // Hand it to the test bed so it is killed on drop.
    tb.adopt(child);
}

#[test]
fn nat_hides_the_inside() {
    let mut tb = testbed!("nat_hides_the_inside");
    let inside = tb.host("in").unwrap();
    let nat = tb.router("nat").unwrap();
    let outside = tb.host("out").unwrap();
    let private = tb.link(inside, nat, LinkSpec::default()).unwrap();
    let public = tb.link(nat, outside, LinkSpec::default()).unwrap();
    tb.nat(nat, &private).unwrap();
    tb.route().unwrap();
    udp_echo(&mut tb, outside);
    // The outside sees the NAT's public address, not the inside host's.
    let seen = stdout(
        tb.run(
            inside,
            "python3",
            &["-c", UDP_ASK, &public.b_addr.to_string(), "9000"],
        )
        .unwrap(),
    );
    assert_eq!(seen.trim(), public.a_addr.to_string());
    // The outside has no route to the inside.
    let err = tb
        .run(
            outside,
            "ping",
            &["-c1", "-W1", &private.a_addr.to_string()],
        )
        .unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
}

#[test]
fn blocked_udp_is_blocked_and_tcp_is_not() {
    let mut tb = testbed!("blocked_udp_is_blocked_and_tcp_is_not");
    let a = tb.host("a").unwrap();
    let b = tb.host("b").unwrap();
    let link = tb.link(a, b, LinkSpec::default()).unwrap();
    udp_echo(&mut tb, b);
    let addr = link.b_addr.to_string();
    tb.run(a, "python3", &["-c", UDP_ASK, &addr, "9000"])
        .expect("UDP works before the block");
    tb.block_udp(a).unwrap();
    assert!(tb
        .run(a, "python3", &["-c", UDP_ASK, &addr, "9000"])
        .is_err());
    let mut server = tb.command(b, "python3");
    server.args([
        "-c",
        "import socket;s=socket.create_server(('0.0.0.0',9001));c,_=s.accept();c.sendall(b'tcp ok')",
    ]);
    tb.spawn(server).unwrap();
    let got = (0..50).find_map(|_| {
        let out = tb
            .run(
                a,
                "python3",
                &[
                    "-c",
                    "import socket,sys;print(socket.create_connection((sys.argv[1],9001),1).recv(16).decode())",
                    &addr,
                ],
            )
            .ok();
        if out.is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        out
    });
    assert_eq!(stdout(got.expect("TCP connects")).trim(), "tcp ok");
}

fn namespaces() -> String {
    stdout(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap(),
    )
}

#[test]
fn teardown_leaves_nothing_even_on_panic() {
    let tb = testbed!("teardown_leaves_nothing_even_on_panic");
    drop(tb);
    let names = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let mut tb = Testbed::new().unwrap();
        let a = tb.host("a").unwrap();
        let b = tb.host("b").unwrap();
        tb.link(
            a,
            b,
            LinkSpec {
                delay_ms_each_way: Some(5),
                ..LinkSpec::default()
            },
        )
        .unwrap();
        names
            .lock()
            .unwrap()
            .extend([tb.netns(a).to_string(), tb.netns(b).to_string()]);
        panic!("a failing test");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    let prefix = names[0]
        .strip_suffix("-a")
        .expect("namespaces are <prefix>-<node>");
    let left = namespaces();
    assert!(
        !left.contains(&format!("{prefix}-")),
        "namespaces of {prefix} left behind (nodes or the delay emulator): {left}"
    );
}

#[test]
fn sockets_opened_in_a_node_live_in_its_namespace() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let mut tb = testbed!("sockets_opened_in_a_node_live_in_its_namespace");
    let a = tb.host("a").unwrap();
    let b = tb.host("b").unwrap();
    let ab = tb.link(a, b, LinkSpec::default()).unwrap();
    tb.route().unwrap();
    // A listener on b's loopback: only b's namespace reaches it.
    let listener = tb
        .in_netns(b, || TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let local = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"from b").unwrap();
    });
    let mut s = tb
        .in_netns(b, || TcpStream::connect(local))
        .unwrap()
        .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "from b");
    server.join().unwrap();
    // a reaches b's link address but not b's loopback listener.
    let gone = tb.in_netns(a, || TcpStream::connect(local)).unwrap();
    assert!(gone.is_err(), "a reached b's loopback: {gone:?}");
    let ping = tb.in_netns(a, || {
        std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|u| u.connect((ab.b_addr, 9)).map(|()| u.local_addr()))
    });
    let bound = ping.unwrap().unwrap().unwrap();
    assert_eq!(
        bound.ip(),
        std::net::IpAddr::V4(ab.a_addr),
        "routed out of a's link"
    );
}
