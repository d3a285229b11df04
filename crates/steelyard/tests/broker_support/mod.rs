//! Shared pieces of the process tests: start the real `steelyard broker` binary, talk to it
//! with real WebSocket clients (tokio-tungstenite) and a minimal HTTP/1.1 client (agent and
//! relay handshakes, reports, connect answers, admin GETs, `/metrics` samples); start
//! `steelyard agent`s and a broker with a `steelyard relay` r1 ([`BrokerWithRelay`]); common
//! config writers. It holds no assertions of its own beyond each helper's stated expectation
//! (an accepted report, a successful command, an agent's address line); tests check the rest.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use steelyard_proto::api::{
    self, AgentHello, AgentMessage, AgentReport, ApiError, AuthProof, BrokerMessage, LoadReport,
    PathReport, RelayHello, RelayMessage, Role, API_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub const AGENT_TOKEN: &str = "agent-enroll-token-0123456789";
pub const RELAY_TOKEN: &str = "relay-enroll-token-0123456789";
pub const ADMIN: &str = "admin-token-0123456789abcdef";

/// A unique, empty temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "steelyard-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn key_hex(n: u8) -> String {
    api::public_key_hex(&key(n).verifying_key())
}

/// The common head of test configs: plain HTTP, tokens, admin token.
pub fn base_config(dir: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
listen_plain = true
data_dir = "{}"
admin_token = "{ADMIN}"

[[enroll_tokens]]
name = "agents"
token = "{AGENT_TOKEN}"

[[enroll_tokens]]
name = "relays"
token = "{RELAY_TOKEN}"
role = "relay"
"#,
        dir.display()
    )
}

/// [`base_config`] with relay r1 configured (key 100, no addresses) taking `max_sessions`.
pub fn r1_config(dir: &Path, max_sessions: u32) -> String {
    base_config(dir)
        + &format!(
            "\n[[relays]]\nid = \"r1\"\npublic_key = \"{}\"\nmax_sessions = {max_sessions}\n",
            key_hex(100)
        )
}

/// A running `steelyard broker` process.
pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
}

impl BrokerProcess {
    /// Writes `config` to `dir/broker.toml` and starts the broker on it.
    pub fn start(dir: &Path, config: &str) -> Self {
        let path = dir.join("broker.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
            .args(["broker", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start steelyard broker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("://").nth(1) {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("the broker did not print its address within 30 s");
            }
        };
        Self {
            child,
            addr,
            dir: dir.to_owned(),
        }
    }

    /// SIGTERM, then wait (at most 10 s) for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "broker exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the broker did not stop within 10 s of SIGTERM");
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 request; returns the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("HTTP response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status");
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

/// `http` and parse the body as JSON.
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, body) = http(addr, method, path, token, body).await;
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {body}"));
    (status, value)
}

/// `GET path` with the admin token: the status and the body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, Some(ADMIN), None).await
}

/// [`admin_get`] with the body parsed as JSON.
pub async fn admin_get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    http_json(addr, "GET", path, Some(ADMIN), None).await
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a raw WebSocket to `path`.
pub async fn ws(addr: SocketAddr, path: &str) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("WebSocket to {path}: {e}"));
    ws
}

pub async fn send_json<T: serde::Serialize>(ws: &mut Ws, message: &T) {
    ws.send(Message::Text(api::encode(message).into()))
        .await
        .unwrap();
}

/// The next broker message, within 5 s; `None` when the socket closed.
pub async fn recv(ws: &mut Ws) -> Option<BrokerMessage> {
    recv_within(ws, Duration::from_secs(5)).await
}

pub async fn recv_within(ws: &mut Ws, within: Duration) -> Option<BrokerMessage> {
    loop {
        let next = tokio::time::timeout(within, ws.next())
            .await
            .expect("a broker message in time");
        match next {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(t))) => {
                return Some(
                    api::decode_broker(&t, usize::MAX)
                        .unwrap_or_else(|e| panic!("broker sent an invalid message {t}: {e}")),
                )
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends a TCP connect request for `to` (no service).
pub async fn send_connect(ws: &mut Ws, request_id: u64, to: &str) {
    send_json(
        ws,
        &api::AgentMessage::Connect(api::ConnectRequest {
            request_id,
            to: to.into(),
            transport: api::TransportKind::Tcp,
            service: String::new(),
            avoid: Vec::new(),
        }),
    )
    .await;
}

/// Waits for the next error message (other messages are skipped).
pub async fn recv_error(ws: &mut Ws) -> api::ApiError {
    recv_where(ws, |m| match m {
        BrokerMessage::Error(e) => Some(e.clone()),
        _ => None,
    })
    .await
}

/// The next message for which `pick` returns `Some`, skipping others (relay maps, report
/// acknowledgements, early-report requests), within 5 s overall.
pub async fn recv_where<T>(ws: &mut Ws, mut pick: impl FnMut(&BrokerMessage) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let m = recv_within(ws, left).await.expect("socket open");
        if let Some(x) = pick(&m) {
            return x;
        }
    }
}

/// The next connect answer (other messages skipped); an error message instead panics.
pub async fn recv_answer(ws: &mut Ws) -> api::ConnectAnswer {
    recv_where(ws, |m| match m {
        BrokerMessage::ConnectAnswer(a) => Some(a.clone()),
        BrokerMessage::Error(e) => panic!("expected a connect answer, got {e}"),
        _ => None,
    })
    .await
}

/// Hello → challenge → auth as an agent. Returns the socket and the broker's verdict
/// (welcome or error).
pub async fn agent(
    addr: SocketAddr,
    id: &str,
    k: &SigningKey,
    token: Option<&str>,
    auto_accept: bool,
) -> (Ws, Result<api::Welcome, ApiError>) {
    let mut ws = ws(addr, "/v1/agent").await;
    send_json(
        &mut ws,
        &AgentMessage::Hello(AgentHello {
            version: API_VERSION,
            peer_id: id.into(),
            public_key: api::public_key_hex(&k.verifying_key()),
            enroll_token: token.map(Into::into),
            auto_accept,
        }),
    )
    .await;
    let nonce = match recv(&mut ws).await {
        Some(BrokerMessage::Challenge(c)) => c.nonce,
        other => panic!("expected a challenge, got {other:?}"),
    };
    let proof: AuthProof = api::sign_auth(k, Role::Agent, id, &nonce).unwrap();
    send_json(&mut ws, &AgentMessage::Auth(proof)).await;
    let verdict = match recv(&mut ws).await {
        Some(BrokerMessage::Welcome(w)) => Ok(w),
        Some(BrokerMessage::Error(e)) => Err(e),
        other => panic!("expected welcome or error, got {other:?}"),
    };
    (ws, verdict)
}

/// Same as [`agent`] for a relay.
pub async fn relay(
    addr: SocketAddr,
    hello: RelayHello,
    k: &SigningKey,
) -> (Ws, Result<api::RelayWelcome, ApiError>) {
    let mut ws = ws(addr, "/v1/relay").await;
    let id = hello.relay_id.clone();
    send_json(&mut ws, &RelayMessage::Hello(hello)).await;
    let nonce = match recv(&mut ws).await {
        Some(BrokerMessage::Challenge(c)) => c.nonce,
        other => panic!("expected a challenge, got {other:?}"),
    };
    send_json(
        &mut ws,
        &RelayMessage::Auth(api::sign_auth(k, Role::Relay, &id, &nonce).unwrap()),
    )
    .await;
    let verdict = match recv(&mut ws).await {
        Some(BrokerMessage::RelayWelcome(w)) => Ok(w),
        Some(BrokerMessage::Error(e)) => Err(e),
        other => panic!("expected relay welcome or error, got {other:?}"),
    };
    (ws, verdict)
}

pub fn relay_hello(id: &str, n: u8) -> RelayHello {
    RelayHello {
        version: API_VERSION,
        relay_id: id.into(),
        public_key: key_hex(n),
        enroll_token: None,
        tcp_addr: None,
        udp_addr: None,
        location: None,
        capacity: None,
    }
}

/// Relay r1 (key 100, pre-registered in the broker's config) authenticated and its load
/// (`LoadReport::default()`) sent.
pub async fn relay_up(addr: SocketAddr) -> Ws {
    let (mut r1, v) = relay(addr, relay_hello("r1", 100), &key(100)).await;
    v.unwrap();
    send_json(&mut r1, &RelayMessage::Load(LoadReport::default())).await;
    r1
}

/// A path to `relay` as an agent reports it: 5 ms, one hop, no loss, TCP and UDP, just
/// measured. Change a field with `PathReport { rtt_ms: 1.0, ..path_report("r1") }`.
pub fn path_report(relay: &str) -> PathReport {
    PathReport {
        relay: relay.into(),
        rtt_ms: 5.0,
        hops: 1,
        loss: 0.0,
        bandwidth_kbps: None,
        tcp: true,
        udp: true,
        age_ms: 0,
    }
}

/// An agent's report of `paths` (no location).
pub fn agent_report(paths: Vec<PathReport>) -> AgentMessage {
    AgentMessage::Report(AgentReport {
        location: None,
        paths,
    })
}

/// Sends a report of `paths` and waits for the broker to accept it (other messages skipped).
pub async fn report_paths(ws: &mut Ws, paths: Vec<PathReport>) {
    send_json(ws, &agent_report(paths)).await;
    recv_where(ws, |m| {
        matches!(m, BrokerMessage::ReportAccepted(_)).then_some(())
    })
    .await;
}

/// Agent `id` (key `n`, the agent enroll token) authenticated, with one accepted report of
/// [`path_report`]`("r1")`.
pub async fn reported_agent(addr: SocketAddr, id: &str, n: u8, auto_accept: bool) -> Ws {
    let (mut ws, v) = agent(addr, id, &key(n), Some(AGENT_TOKEN), auto_accept).await;
    v.unwrap();
    report_paths(&mut ws, vec![path_report("r1")]).await;
    ws
}

/// The value of the sample `name` (exact, labels included) in `addr`'s `/metrics`.
pub async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, body) = http(addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in /metrics:\n{body}"))
}

/// Expects an error with `code` as the next message.
pub async fn expect_error(ws: &mut Ws, code: api::ErrorCode) -> ApiError {
    match recv(ws).await {
        Some(BrokerMessage::Error(e)) if e.code == code => e,
        other => panic!("expected a {code} error, got {other:?}"),
    }
}

/// A `steelyard` child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `steelyard <args>` with `RUST_LOG=log` (stderr inherited) and returns it with its
/// first stdout line (the address line every long-running subcommand prints).
pub fn start_logging(args: &[&str], log: &str) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_steelyard"))
        .args(args)
        .env("RUST_LOG", log)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start steelyard");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {}
    });
    let proc = Proc(child);
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("steelyard {args:?} printed nothing within 30 s"));
    (proc, line)
}

/// [`start_logging`] at `warn`.
pub fn start(args: &[&str]) -> (Proc, String) {
    start_logging(args, "warn")
}

/// Writes `dir/<peer>.toml` for `steelyard agent` `peer`: the plain broker at `broker`, the
/// agent enroll token, its key in `dir/<peer>.key`, its control socket on 127.0.0.1:`control`,
/// then `extra` (services, offers, forwards...). Returns the file's path.
pub fn agent_config(
    dir: &Path,
    broker: SocketAddr,
    peer: &str,
    control: u16,
    extra: &str,
) -> String {
    let path = dir.join(format!("{peer}.toml"));
    std::fs::write(
        &path,
        format!(
            "broker = \"ws://{broker}\"\nenroll_token = \"{AGENT_TOKEN}\"\npeer_id = \"{peer}\"\n\
             key_file = \"{}\"\ncontrol = \"127.0.0.1:{control}\"\n{extra}",
            dir.join(format!("{peer}.key")).display()
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Starts `steelyard agent` `peer` on an [`agent_config`] with a free control port, logging at
/// `log`; checks its address line and returns it with its control address.
pub fn start_agent_logging(
    dir: &Path,
    broker: SocketAddr,
    peer: &str,
    extra: &str,
    log: &str,
) -> (Proc, SocketAddr) {
    let control = free_port();
    let config = agent_config(dir, broker, peer, control, extra);
    let (proc, line) = start_logging(&["agent", "--config", &config], log);
    assert!(
        line.starts_with(&format!("agent {peer} control=")),
        "{line}"
    );
    (proc, format!("127.0.0.1:{control}").parse().unwrap())
}

/// [`start_agent_logging`] at `warn`.
pub fn start_agent(dir: &Path, broker: SocketAddr, peer: &str, extra: &str) -> (Proc, SocketAddr) {
    start_agent_logging(dir, broker, peer, extra, "warn")
}

/// A broker (schedule every 2 s) with relay r1 pre-registered (key 100, `max_sessions = 1000`),
/// a `steelyard relay` r1 on free ports that trusts the ticket key the broker publishes, and a
/// task that feeds the broker r1's load (`LoadReport::default()` every 500 ms) over the relay
/// WebSocket under r1's pre-registered identity (the relay process has no broker link).
pub struct BrokerWithRelay {
    pub broker: BrokerProcess,
    pub relay: Proc,
    pub feeder: tokio::task::JoinHandle<()>,
}

impl BrokerWithRelay {
    pub async fn start(dir: &Path) -> Self {
        let (relay_tcp, relay_udp, relay_probe) = (free_port(), free_udp_port(), free_udp_port());
        let mut config = base_config(dir);
        config.push_str(&format!(
            "\n[schedule]\ninterval_ms = 2000\njitter_ms = 200\n\n[[relays]]\nid = \"r1\"\npublic_key = \"{}\"\n\
             tcp_addr = \"127.0.0.1:{relay_tcp}\"\nudp_addr = \"127.0.0.1:{relay_probe}\"\nmax_sessions = 1000\n",
            key_hex(100)
        ));
        let broker = BrokerProcess::start(dir, &config);
        let addr = broker.addr;

        // The relay trusts the key the broker publishes.
        let (status, keys) = http_json(addr, "GET", "/v1/keys", None, None).await;
        assert_eq!(status, 200, "{keys}");
        let broker_key = keys["keys"][0]["public_key"].as_str().unwrap().to_owned();
        let (relay_proc, line) = start(&[
            "relay",
            "--relay-id",
            "r1",
            "--broker-key",
            &broker_key,
            "--tcp",
            &format!("127.0.0.1:{relay_tcp}"),
            "--udp",
            &format!("127.0.0.1:{relay_udp}"),
            "--probe",
            &format!("127.0.0.1:{relay_probe}"),
        ]);
        assert!(line.starts_with("relay listening"), "{line}");

        let (mut relay_ws, v) = relay(addr, relay_hello("r1", 100), &key(100)).await;
        v.expect("relay r1 authenticates");
        let feeder = tokio::spawn(async move {
            loop {
                send_json(&mut relay_ws, &RelayMessage::Load(LoadReport::default())).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Self {
            broker,
            relay: relay_proc,
            feeder,
        }
    }

    /// Stops the load feed, then the broker (SIGTERM, clean exit checked).
    pub fn stop(self) {
        self.feeder.abort();
        self.broker.stop();
    }
}

/// Runs `cmd` to its end expecting success; its stdout (a failure panics with its stderr).
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP port free on 127.0.0.1 just now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A UDP port free on 127.0.0.1 just now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// FNV-1a of `data`: a cheap checksum for comparing what was sent with what came back.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// A TCP echo service on 127.0.0.1 that half-closes after echoing everything.
pub async fn echo_service() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A broker config serving TLS only, with a self-signed certificate for `localhost` written to
/// `dir` (`cert.pem`, `key.pem`); returns the certificate (for clients to trust) and the config.
pub fn tls_config(dir: &Path) -> (rcgen::CertifiedKey, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), certified.key_pair.serialize_pem()).unwrap();
    let config = base_config(dir).replace("listen_plain = true\n", "")
        + &format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        );
    (certified, config)
}
