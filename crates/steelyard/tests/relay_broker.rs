//! The relay reports its load to the broker, end to end with real processes: a real
//! `steelyard broker` (plain HTTP, in-memory store, a relay enrollment token) and a real
//! `steelyard relay --broker-url …`. The relay enrolls with its own identity key, the broker's
//! admin API shows its live load; a session brokered for two test agents raises pending and
//! then sessions in the broker's view; a killed and restarted broker gets the relay back by
//! itself; SIGTERM on the relay shows up as draining at once.

mod broker_support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_support::*;
use futures_util::SinkExt;
use steelyard_proto::api::BrokerMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

struct RelayProc {
    child: Child,
    tcp: SocketAddr,
    udp: Option<SocketAddr>,
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(dir: &Path, broker: SocketAddr, ticket_key: &str) -> RelayProc {
    let url = format!("ws://{broker}/v1/relay");
    spawn_relay(dir, "r1", &url, Some(ticket_key), &[])
}

/// Starts `steelyard relay` reporting to `url`; with `ticket_key` pinned as its only trusted
/// key, without it trusting the keys the broker announces.
fn spawn_relay(
    dir: &Path,
    id: &str,
    url: &str,
    ticket_key: Option<&str>,
    extra: &[&str],
) -> RelayProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["relay", "--relay-id", id])
        .args(ticket_key.map(|k| ["--broker-key", k]).iter().flatten())
        .args(["--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--broker-url", url])
        .arg("--identity-key")
        .arg(dir.join(format!("{id}-identity.key")))
        .args(["--drain-grace-secs", "30"])
        .args(extra)
        .env("STEELYARD_RELAY_ENROLL_TOKEN", RELAY_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start steelyard relay");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|a| a.parse().ok())
    };
    let tcp = addr("tcp=").unwrap_or_else(|| panic!("no tcp= in {line:?}"));
    let udp = addr("udp=");
    RelayProc { child, tcp, udp }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn broker_config(dir: &Path, port: u16) -> String {
    let head = base_config(dir).replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    format!("{head}\n[schedule]\nrelay_load_interval_ms = 200\n")
}

/// Waits (at most `within`) until the broker's admin view of relay `r1` satisfies `ok`;
/// returns that view.
async fn wait_relay(
    broker: SocketAddr,
    within: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Duration) {
    let start = Instant::now();
    let mut last = serde_json::Value::Null;
    while start.elapsed() < within {
        let (status, body) = admin_get_json(broker, "/v1/admin/relays").await;
        assert_eq!(status, 200, "{body}");
        if let Some(r) = body["relays"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["id"] == "r1"))
        {
            if ok(r) {
                return (r.clone(), start.elapsed());
            }
            last = r.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("within {within:?} the broker did not show r1 {what}; last view: {last}");
}

async fn send_text(ws: &mut Ws, value: serde_json::Value) {
    ws.send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Two new agents `from` and `to` report r1 and `from` connects to `to`: returns their tickets
/// (the broker signed them) and the relay TCP address the broker gave.
async fn broker_session(
    broker: SocketAddr,
    from: &str,
    to: &str,
) -> (Vec<u8>, Vec<u8>, Option<String>) {
    let n = 2 * u8::try_from(from.len() + to.len()).unwrap();
    let (mut a, v) = agent(broker, from, &key(n), Some(AGENT_TOKEN), false).await;
    v.unwrap();
    let (mut b, v) = agent(broker, to, &key(n + 1), Some(AGENT_TOKEN), true).await;
    v.unwrap();
    for ws in [&mut a, &mut b] {
        send_text(
            ws,
            serde_json::json!({"type": "report", "paths": [{"relay": "r1", "rtt_ms": 5.0}]}),
        )
        .await;
        recv_where(ws, |m| {
            matches!(m, BrokerMessage::ReportAccepted(_)).then_some(())
        })
        .await;
    }
    send_text(
        &mut a,
        serde_json::json!({"type": "connect", "request_id": 1, "to": to}),
    )
    .await;
    let answer = recv_answer(&mut a).await;
    let offer = recv_where(&mut b, |m| match m {
        BrokerMessage::Offer(o) => Some(o.clone()),
        _ => None,
    })
    .await;
    assert_eq!(answer.relay_id, "r1");
    (
        hex_bytes(&answer.ticket),
        hex_bytes(&offer.ticket),
        answer.relay_tcp_addr,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reports_load_reconnects_and_drains() {
    let dir = temp_dir("relay-broker");
    let port = free_port();
    let config = broker_config(&dir, port);
    let broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let (_, keys) = http_json(addr, "GET", "/v1/keys", None, None).await;
    let ticket_key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();

    // The relay enrolls with the token and its new identity; its load shows up.
    let mut relay = start_relay(&dir, addr, &ticket_key);
    let (view, took) = wait_relay(addr, Duration::from_secs(5), "online with load", |r| {
        r["online"] == true && r["load"].is_object()
    })
    .await;
    eprintln!("relay online with load after {took:?}");
    assert_eq!(view["load"]["sessions"], 0);
    assert_eq!(view["load"]["draining"], false);
    assert_eq!(view["tcp_addr"], relay.tcp.to_string());
    assert_eq!(view["max_sessions"], 10_000);
    let mode = std::fs::metadata(dir.join("r1-identity.key"))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);

    // Two agents; the broker picks r1 for their session.
    let (a_ticket, b_ticket, relay_tcp_addr) = broker_session(addr, "alice", "bob").await;
    assert_eq!(relay_tcp_addr, Some(relay.tcp.to_string()));

    // Alice's side waits at the relay: pending rises in the broker's view.
    let tcp = relay.tcp;
    let a = tokio::spawn(async move {
        steelyard_relay::client::dial(tcp, &a_ticket, Duration::from_secs(20)).await
    });
    let (_, took) = wait_relay(addr, Duration::from_secs(5), "with a pending side", |r| {
        r["load"]["pending"] == 1
    })
    .await;
    eprintln!("pending side seen by the broker after {took:?}");
    // Bob arrives: one live session.
    let mut b = steelyard_relay::client::dial(relay.tcp, &b_ticket, Duration::from_secs(10))
        .await
        .unwrap();
    let mut a = a.await.unwrap().unwrap();
    let (_, took) = wait_relay(addr, Duration::from_secs(5), "with a live session", |r| {
        r["load"]["sessions"] == 1 && r["load"]["pending"] == 0
    })
    .await;
    eprintln!("live session seen by the broker after {took:?}");
    a.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // Kill the broker (no goodbye) and start it again on the same port and data directory
    // (the in-memory store forgot the relay): the relay reconnects, re-enrolls and reports
    // its live session.
    drop(broker);
    let restarted = Instant::now();
    let broker = BrokerProcess::start(&dir, &config);
    assert_eq!(broker.addr, addr);
    let (view, _) = wait_relay(addr, Duration::from_secs(10), "back after a restart", |r| {
        r["online"] == true && r["load"]["sessions"] == 1
    })
    .await;
    eprintln!(
        "relay back on the restarted broker {:?} after the restart began",
        restarted.elapsed()
    );
    assert_eq!(view["load"]["draining"], false);

    // SIGTERM: the relay drains (the live session keeps it up) and says so at once.
    let pid = relay.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (view, took) = wait_relay(addr, Duration::from_secs(2), "draining", |r| {
        r["load"]["draining"] == true
    })
    .await;
    eprintln!("draining seen by the broker {took:?} after SIGTERM");
    assert_eq!(view["healthy"], false);
    assert_eq!(view["load"]["sessions"], 1);
    // The session still works; when it ends the relay exits cleanly.
    b.write_all(b"pong").await.unwrap();
    a.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not exit after its session ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "relay exited with {status}");
    let (view, _) = wait_relay(addr, Duration::from_secs(2), "offline", |r| {
        r["online"] == false
    })
    .await;
    assert_eq!(view["load"]["draining"], true);
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without `--broker-key` the relay trusts the ticket keys of the broker's welcome: before the
/// broker is there every ticket (TCP and UDP) gets `not_ready`; once it is, tickets the broker
/// signs pair, and a ticket signed by any other key is `forged`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_without_broker_keys_trusts_the_keys_the_broker_announces() {
    use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
    use steelyard_relay::client::{dial, udp_bind, ClientError};
    use steelyard_relay::wire::StatusCode;

    let dir = temp_dir("relay-broker-keys");
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/v1/relay");
    let relay = spawn_relay(&dir, "r1", &url, None, &["--udp", "127.0.0.1:0"]);
    let stranger = TicketSigner::from_seed([77; 32]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ticket = |sid: u8, transport| {
        stranger
            .sign(&Ticket {
                key_id: stranger.key_id(),
                session_id: SessionId([sid; 16]),
                relay_id: "r1".into(),
                side: Side::A,
                peer_id: "p".into(),
                issued_at: now - 5,
                expires_at: now + 120,
                limits: TicketLimits::default(),
                transport,
            })
            .unwrap()
    };
    let wait = Duration::from_secs(5);
    let refused = |r: Result<tokio::net::TcpStream, ClientError>| match r {
        Err(ClientError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_udp = relay.udp.expect("relay udp address");

    // No broker yet: not ready, on both transports.
    assert_eq!(
        refused(dial(relay.tcp, &ticket(1, Transport::Tcp), wait).await),
        StatusCode::NotReady
    );
    assert_eq!(
        udp_bind(
            &udp,
            relay_udp,
            SessionId([2; 16]),
            &ticket(2, Transport::Udp),
            wait
        )
        .await
        .unwrap(),
        StatusCode::NotReady
    );

    // The broker comes up on that port; the relay connects and takes its keys.
    let broker = BrokerProcess::start(&dir, &broker_config(&dir, port));
    let addr = broker.addr;
    wait_relay(addr, Duration::from_secs(10), "online", |r| {
        r["online"] == true
    })
    .await;
    let (a_ticket, b_ticket, _) = broker_session(addr, "carol", "dave").await;
    let tcp = relay.tcp;
    let a = tokio::spawn(async move { dial(tcp, &a_ticket, Duration::from_secs(20)).await });
    let mut b = dial(relay.tcp, &b_ticket, wait).await.unwrap();
    let mut a = a.await.unwrap().unwrap();
    a.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // A key the broker did not announce is not trusted.
    assert_eq!(
        refused(dial(relay.tcp, &ticket(3, Transport::Tcp), wait).await),
        StatusCode::Forged
    );
    assert_eq!(
        udp_bind(
            &udp,
            relay_udp,
            SessionId([4; 16]),
            &ticket(4, Transport::Udp),
            wait
        )
        .await
        .unwrap(),
        StatusCode::Forged
    );
    drop(relay);
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `GET path` over HTTPS, trusting `cert`; the body as JSON.
async fn https_json(
    addr: SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    path: &str,
) -> serde_json::Value {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {ADMIN}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_reports_over_wss_with_a_ca_file() {
    let dir = temp_dir("relay-broker-tls");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("other.pem"), other.cert.pem()).unwrap();
    let (certified, config) = tls_config(&dir);
    let config = config + "[schedule]\nrelay_load_interval_ms = 200\n";
    let broker = BrokerProcess::start(&dir, &config);
    let cert = certified.cert.der().clone();
    let keys = https_json(broker.addr, &cert, "/v1/keys").await;
    let ticket_key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();
    let url = format!("wss://localhost:{}/v1/relay", broker.addr.port());
    let ca = dir.join("cert.pem").display().to_string();
    let wrong_ca = dir.join("other.pem").display().to_string();
    let _good = spawn_relay(&dir, "r1", &url, Some(&ticket_key), &["--broker-ca", &ca]);
    let _bad = spawn_relay(
        &dir,
        "r2",
        &url,
        Some(&ticket_key),
        &["--broker-ca", &wrong_ca],
    );
    let start = Instant::now();
    loop {
        let view = https_json(broker.addr, &cert, "/v1/admin/relays").await;
        let relays = view["relays"].as_array().unwrap();
        if relays
            .iter()
            .any(|r| r["id"] == "r1" && r["online"] == true && r["load"].is_object())
        {
            eprintln!("relay online over wss after {:?}", start.elapsed());
            // The relay that does not trust the broker's certificate never got in.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let view = https_json(broker.addr, &cert, "/v1/admin/relays").await;
            assert!(
                !view["relays"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["id"] == "r2"),
                "{view}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "r1 not online over wss: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn broker_flags_need_a_broker_url() {
    let out = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["relay", "--relay-id", "r1", "--broker-key"])
        .arg("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        .args(["--enroll-token", "x", "--print-config"])
        .env_remove("STEELYARD_RELAY_BROKER_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--broker-url"), "{err}");

    let shown = stdout_of(
        Command::new(env!("CARGO_BIN_EXE_steelyard"))
            .args(["relay", "--relay-id", "r1", "--broker-key"])
            .arg("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
            .args([
                "--broker-url",
                "ws://127.0.0.1:9/v1/relay",
                "--print-config",
            ])
            .env("STEELYARD_RELAY_ENROLL_TOKEN", "secret-token"),
    );
    assert!(
        shown.contains("[broker]") && shown.contains("ws://127.0.0.1:9/v1/relay"),
        "{shown}"
    );
    assert!(!shown.contains("secret-token"), "{shown}");

    let out = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["relay", "--relay-id", "r1", "--broker-key"])
        .arg("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        .args(["--broker-url", "http://h/v1/relay", "--print-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.url"), "{err}");

    // An identity file others can read is refused before the relay announces its ports.
    let dir = temp_dir("relay-identity-mode");
    let id = dir.join("id.key");
    std::fs::write(&id, "11".repeat(32)).unwrap();
    std::fs::set_permissions(&id, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(["relay", "--relay-id", "r1", "--broker-key"])
        .arg("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        .args([
            "--tcp",
            "127.0.0.1:0",
            "--broker-url",
            "ws://127.0.0.1:9/v1/relay",
        ])
        .arg("--identity-key")
        .arg(&id)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
    assert!(out.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
