//! Broker benchmark client (and its ceiling), driven by `bench/broker-connect.sh`.
//!
//! * `broker_bench config RELAYS [TLS_DIR]` prints a broker config with RELAYS pre-registered
//!   relays and limits raised for one client machine; with TLS_DIR, the broker serves TLS with
//!   a self-signed certificate written there (`TLS_DIR/cert.pem`), and `run` with
//!   `BROKER_BENCH_TLS_CERT=TLS_DIR/cert.pem` connects over `wss`.
//! * `broker_bench echo-server` runs a bare axum WebSocket echo server (the ceiling) and
//!   prints its address.
//! * `broker_bench run BROKER_ADDR BROKER_PID PEERS RELAYS PATHS CONNECTS CONCURRENCY`
//!   connects RELAYS relays (load every second), enrolls PEERS agents each reporting PATHS
//!   random relays, measures the broker's RSS growth per peer, then sends CONNECTS connect
//!   requests from CONCURRENCY initiators (one in flight each) to random peers and prints
//!   connects/s and p50/p99 latency from request to answer as JSON.
//! * `broker_bench state PEERS RELAYS PATHS` measures the broker's own state per peer (the
//!   sans-I/O core: identity, registry entry, report in the selector), without sockets.
//! * `broker_bench echo ECHO_ADDR REQUESTS CONCURRENCY` does the same request/answer loop
//!   against the echo server with a message of a connect request's size.
//! * `broker_bench serve CONFIG HEAP_FILE` runs the broker in this process (the same
//!   `steelyard_broker::start` as `steelyard broker`) under a counting allocator, and keeps
//!   HEAP_FILE up to date with its live heap: bytes, then a count of live blocks per size.
//!   With `BROKER_BENCH_HEAP_FILE=HEAP_FILE`, `run` reads it next to the RSS and reports the
//!   heap per peer and which block sizes grew by about one (or more) per peer: where a
//!   connected peer's bytes go.
//!
//! Everything is bounded: counts come from the command line and every phase has a timeout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use steelyard_proto::api::{
    self, AgentHello, AgentMessage, AgentReport, BrokerMessage, ConnectRequest, LoadReport,
    PathReport, RelayHello, RelayMessage, Role, TransportKind, API_VERSION,
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Counts live heap bytes and live blocks per size (the last slot counts larger blocks).
/// Used by `serve` to see where a connected peer's bytes go; elsewhere it only adds two
/// relaxed atomic operations per allocation.
struct Counting;

const SIZES: usize = 4097;
static LIVE: AtomicI64 = AtomicI64::new(0);
static BLOCKS: [AtomicI64; SIZES] = [const { AtomicI64::new(0) }; SIZES];

#[allow(unsafe_code)]
// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc(layout);
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: std::alloc::Layout) {
        count(layout.size(), -1);
        std::alloc::System.dealloc(p, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = std::alloc::System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }
    unsafe fn realloc(&self, p: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let q = std::alloc::System.realloc(p, layout, new);
        if !q.is_null() {
            count(layout.size(), -1);
            count(new, 1);
        }
        q
    }
}

fn count(size: usize, n: i64) {
    LIVE.fetch_add(n * size as i64, Ordering::Relaxed);
    BLOCKS[size.min(SIZES - 1)].fetch_add(n, Ordering::Relaxed);
}

#[global_allocator]
static ALLOC: Counting = Counting;

const TOKEN: &str = "bench-enroll-token-0123456789";
/// A client connection: plain TCP, or TLS when `BROKER_BENCH_TLS_CERT` names the broker's
/// certificate.
trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}
type Ws = tokio_tungstenite::WebSocketStream<Box<dyn ClientIo>>;

/// The TLS client config trusting the broker's self-signed certificate, if the run is over TLS.
fn tls_client() -> Option<&'static tokio_rustls::TlsConnector> {
    static TLS: std::sync::OnceLock<Option<tokio_rustls::TlsConnector>> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        use rustls::pki_types::pem::PemObject;
        let path = std::env::var_os("BROKER_BENCH_TLS_CERT")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            rustls::pki_types::CertificateDer::pem_file_iter(&path).expect("TLS certificate")
        {
            roots
                .add(cert.expect("TLS certificate"))
                .expect("TLS certificate");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
    })
    .as_ref()
}

/// A WebSocket to `path` on the broker, over TLS if the run is.
async fn open_ws(addr: SocketAddr, path: &str) -> Ws {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the broker");
    let (io, scheme): (Box<dyn ClientIo>, _) = match tls_client() {
        Some(tls) => {
            let name = "localhost".try_into().expect("a server name");
            (
                Box::new(tls.connect(name, tcp).await.expect("TLS handshake")),
                "wss",
            )
        }
        None => (Box::new(tcp), "ws"),
    };
    let (ws, _) = tokio_tungstenite::client_async(format!("{scheme}://localhost{path}"), io)
        .await
        .expect("WebSocket upgrade");
    ws
}

fn seed(kind: u8, i: u64) -> SigningKey {
    let mut s = [kind; 32];
    s[..8].copy_from_slice(&i.to_le_bytes());
    SigningKey::from_bytes(&s)
}

fn relay_id(i: u64) -> String {
    format!("relay-{i:04}")
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({name}) missing or invalid; see the module docs"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match args.get(1).map(String::as_str) {
        Some("config") => print_config(arg(&args, 2, "RELAYS"), args.get(3).map(Into::into)),
        Some("echo-server") => runtime.block_on(echo_server()),
        Some("serve") => {
            runtime.block_on(serve(arg(&args, 2, "CONFIG"), arg(&args, 3, "HEAP_FILE")))
        }
        Some("run") => {
            let out = runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(600),
                    run(
                        arg(&args, 2, "BROKER_ADDR"),
                        arg(&args, 3, "BROKER_PID"),
                        arg(&args, 4, "PEERS"),
                        arg(&args, 5, "RELAYS"),
                        arg(&args, 6, "PATHS"),
                        arg(&args, 7, "CONNECTS"),
                        arg(&args, 8, "CONCURRENCY"),
                    ),
                )
                .await
                .expect("the benchmark finished within 600 s")
            });
            println!("{out}");
        }
        Some("state") => state(
            arg(&args, 2, "PEERS"),
            arg(&args, 3, "RELAYS"),
            arg(&args, 4, "PATHS"),
        ),
        Some("echo") => {
            let out = runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(300),
                    echo(
                        arg(&args, 2, "ECHO_ADDR"),
                        arg(&args, 3, "REQUESTS"),
                        arg(&args, 4, "CONCURRENCY"),
                    ),
                )
                .await
                .expect("the echo benchmark finished within 300 s")
            });
            println!("{out}");
        }
        _ => {
            eprintln!("usage: broker_bench config|echo-server|run|echo ... (see the module docs)");
            std::process::exit(2);
        }
    }
}

fn print_config(relays: u64, tls_dir: Option<std::path::PathBuf>) {
    let listen = match tls_dir {
        None => "listen_plain = true".to_owned(),
        Some(dir) => {
            // A self-signed certificate for localhost; the client trusts it by file.
            let certified =
                rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("certificate");
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
            std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write the key");
            format!(
                "[tls]\ncert = \"{}\"\nkey = \"{}\"",
                cert.display(),
                key.display()
            )
        }
    };
    // Top-level keys first: a [tls] table ends them.
    let (top, tls) = match listen.strip_prefix("[tls]") {
        Some(_) => ("", listen.as_str()),
        None => (listen.as_str(), ""),
    };
    println!(
        r#"listen = "127.0.0.1:0"
{top}
store = "memory"

[[enroll_tokens]]
name = "bench"
token = "{TOKEN}"

[limits]
messages_per_sec = 1000000
message_burst = 1000000
max_unauthenticated_per_ip = 100000
send_queue = 100000

[schedule]
interval_ms = 600000
stale_after_ms = 3600000

{tls}
"#
    );
    for i in 0..relays {
        println!(
            "[[relays]]\nid = \"{}\"\npublic_key = \"{}\"\ntcp_addr = \"127.0.0.1:{}\"\nmax_sessions = 1000000\n",
            relay_id(i),
            api::public_key_hex(&seed(0xAA, i).verifying_key()),
            20000 + i
        );
    }
}

async fn echo_server() {
    use axum::extract::ws::{Message as M, WebSocketUpgrade};
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::get(|ws: WebSocketUpgrade| async move {
            ws.on_upgrade(|mut socket| async move {
                while let Some(Ok(m)) = socket.recv().await {
                    if let M::Text(_) = m {
                        if socket.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "echo listening on http://{}",
        listener.local_addr().unwrap()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    axum::serve(listener, app).await.unwrap();
}

/// The broker in this process, its live heap written to `heap_file` every 100 ms.
async fn serve(config: std::path::PathBuf, heap_file: std::path::PathBuf) {
    let mut config = steelyard_broker::BrokerConfig::load(&config).expect("broker config");
    config.data_dir = heap_file.with_extension("data");
    let broker = steelyard_broker::start(config).await.expect("broker start");
    std::thread::spawn(move || loop {
        let mut out = LIVE.load(Ordering::Relaxed).to_string();
        for b in &BLOCKS {
            out.push(' ');
            out.push_str(&b.load(Ordering::Relaxed).to_string());
        }
        let tmp = heap_file.with_extension("tmp");
        std::fs::write(&tmp, out).expect("heap file");
        std::fs::rename(&tmp, &heap_file).expect("heap file");
        std::thread::sleep(Duration::from_millis(100));
    });
    println!(
        "broker (heap counted) listening on http://{}",
        broker.local_addr()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
}

/// This process's live heap: bytes, and live blocks per size.
fn heap_now() -> (i64, Vec<i64>) {
    let blocks = BLOCKS.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    (LIVE.load(Ordering::Relaxed), blocks)
}

/// The live heap `serve` last wrote: bytes, and live blocks per size.
fn heap(file: Option<&std::path::Path>) -> Option<(i64, Vec<i64>)> {
    let text = std::fs::read_to_string(file?).ok()?;
    let mut n = text.split(' ').map(|v| v.parse::<i64>().unwrap_or(0));
    Some((n.next()?, n.collect()))
}

/// Heap growth per peer, and the block sizes that grew by at least half a block per peer.
fn heap_growth(before: &(i64, Vec<i64>), after: &(i64, Vec<i64>), peers: u64) -> serde_json::Value {
    let per_peer = (after.0 - before.0) as f64 / peers as f64;
    let mut blocks: Vec<(usize, f64)> = before
        .1
        .iter()
        .zip(&after.1)
        .enumerate()
        .map(|(size, (b, a))| (size, (a - b) as f64 / peers as f64))
        .filter(|&(_, n)| n >= 0.5)
        .collect();
    blocks.sort_by(|x, y| (y.1 * y.0 as f64).total_cmp(&(x.1 * x.0 as f64)));
    serde_json::json!({
        "heap_bytes_per_peer": per_peer,
        "blocks_per_peer": blocks.iter().map(|(size, n)| {
            let size = if *size == SIZES - 1 { format!(">={size}") } else { size.to_string() };
            format!("{n:.2} x {size} B")
        }).collect::<Vec<_>>(),
    })
}

/// RSS growth of this process while a core registers PEERS peers with PATHS-path reports.
fn state(peers: u64, relays: u64, paths: u64) {
    use steelyard_broker::config::{BrokerConfig, RelayConfig, TokenConfig};
    use steelyard_broker::core::Core;
    use steelyard_select::Timestamp;
    let mut config = BrokerConfig {
        listen_plain: true,
        ..BrokerConfig::default()
    };
    config.enroll_tokens.push(TokenConfig {
        name: "bench".into(),
        token: TOKEN.into(),
        role: Role::Agent,
    });
    for i in 0..relays {
        config.relays.push(RelayConfig {
            id: relay_id(i),
            public_key: api::public_key_hex(&seed(0xAA, i).verifying_key()),
            tcp_addr: Some(format!("127.0.0.1:{}", 20000 + i)),
            udp_addr: None,
            location: None,
            max_sessions: 1_000_000,
            max_bandwidth_kbps: 0,
            tier: 0,
            weight: 1.0,
        });
    }
    let now = Timestamp(1_700_000_000_000);
    let mut core = Core::new(
        &config,
        vec![],
        vec![],
        None,
        steelyard_proto::ticket::KeyId([1; 8]),
        now,
    )
    .unwrap();
    core.take_effects();
    // Inputs are made and consumed one peer at a time: what they allocate is freed and reused,
    // so the RSS growth is what the core keeps.
    let nonce = [7u8; api::NONCE_LEN];
    let input = |i: u64| {
        let key = seed(0xBB, i);
        let id = format!("peer-{i:05}");
        let hello = AgentHello {
            version: API_VERSION,
            peer_id: id.clone(),
            public_key: api::public_key_hex(&key.verifying_key()),
            enroll_token: Some(TOKEN.into()),
            auto_accept: true,
        };
        let proof = api::sign_auth(
            &key,
            Role::Agent,
            &id,
            &steelyard_proto::hex::encode(&nonce),
        )
        .unwrap();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
        let mut chosen = std::collections::BTreeSet::new();
        while (chosen.len() as u64) < paths.min(relays) {
            chosen.insert(rng.below(relays));
        }
        let report = AgentReport {
            location: None,
            paths: chosen
                .into_iter()
                .map(|r| PathReport {
                    relay: relay_id(r),
                    rtt_ms: 5.0 + rng.below(100) as f64,
                    hops: 3,
                    loss: 0.0,
                    bandwidth_kbps: Some(50_000),
                    tcp: true,
                    udp: true,
                    age_ms: 0,
                })
                .collect(),
        };
        (hello, proof, report)
    };
    // Warm the allocator with one peer's worth of transient inputs.
    drop(input(u64::MAX));
    let heap_before = heap_now();
    let before = rss_kib(std::process::id());
    for i in 0..peers {
        let (hello, proof, report) = input(i);
        core.authenticate_agent(&hello, &nonce, &proof, now)
            .unwrap();
        core.agent_online(&hello.peer_id, i, true, now);
        core.agent_report(&hello.peer_id, report, now).unwrap();
        core.take_effects();
    }
    let after = rss_kib(std::process::id());
    let heap = heap_growth(&heap_before, &heap_now(), peers);
    let per_peer = (after.saturating_sub(before)) as f64 * 1024.0 / peers as f64;
    println!(
        "{}",
        serde_json::json!({ "peers": peers, "relays": relays, "paths": paths, "state_bytes_per_peer": per_peer, "heap": heap })
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

async fn recv_msg(ws: &mut Ws) -> BrokerMessage {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return api::decode_broker(&t, usize::MAX).unwrap(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("broker connection failed: {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, m: &impl serde::Serialize) {
    ws.send(Message::Text(api::encode(m).into())).await.unwrap();
}

async fn connect_relay(addr: SocketAddr, i: u64) -> Ws {
    let mut ws = open_ws(addr, "/v1/relay").await;
    let key = seed(0xAA, i);
    let id = relay_id(i);
    send(
        &mut ws,
        &RelayMessage::Hello(RelayHello {
            version: API_VERSION,
            relay_id: id.clone(),
            public_key: api::public_key_hex(&key.verifying_key()),
            enroll_token: None,
            tcp_addr: None,
            udp_addr: None,
            location: None,
            capacity: None,
        }),
    )
    .await;
    let BrokerMessage::Challenge(c) = recv_msg(&mut ws).await else {
        panic!("no challenge")
    };
    send(
        &mut ws,
        &RelayMessage::Auth(api::sign_auth(&key, Role::Relay, &id, &c.nonce).unwrap()),
    )
    .await;
    match recv_msg(&mut ws).await {
        BrokerMessage::RelayWelcome(_) => ws,
        other => panic!("relay {id}: {other:?}"),
    }
}

async fn enroll_peer(addr: SocketAddr, i: u64, relays: u64, paths: u64) -> Ws {
    let mut ws = open_ws(addr, "/v1/agent").await;
    let key = seed(0xBB, i);
    let id = format!("peer-{i:05}");
    send(
        &mut ws,
        &AgentMessage::Hello(AgentHello {
            version: API_VERSION,
            peer_id: id.clone(),
            public_key: api::public_key_hex(&key.verifying_key()),
            enroll_token: Some(TOKEN.into()),
            auto_accept: true,
        }),
    )
    .await;
    let BrokerMessage::Challenge(c) = recv_msg(&mut ws).await else {
        panic!("no challenge")
    };
    send(
        &mut ws,
        &AgentMessage::Auth(api::sign_auth(&key, Role::Agent, &id, &c.nonce).unwrap()),
    )
    .await;
    match recv_msg(&mut ws).await {
        BrokerMessage::Welcome(_) => {}
        other => panic!("peer {id}: {other:?}"),
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1));
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < paths.min(relays) {
        chosen.insert(rng.below(relays));
    }
    let report = AgentReport {
        location: None,
        paths: chosen
            .into_iter()
            .map(|r| PathReport {
                relay: relay_id(r),
                rtt_ms: 5.0 + rng.below(100) as f64,
                hops: 3 + rng.below(10) as u32,
                loss: rng.below(3) as f64 / 100.0,
                bandwidth_kbps: Some(10_000 + rng.below(90_000)),
                tcp: true,
                udp: true,
                age_ms: 0,
            })
            .collect(),
    };
    send(&mut ws, &AgentMessage::Report(report)).await;
    loop {
        match recv_msg(&mut ws).await {
            BrokerMessage::ReportAccepted(_) => return ws,
            BrokerMessage::Error(e) => panic!("peer {id} report: {e}"),
            _ => {}
        }
    }
}

/// Just the request id of an answer or error.
#[derive(serde::Deserialize)]
struct RequestId {
    #[serde(default)]
    request_id: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[allow(clippy::too_many_arguments)]
async fn run(
    addr: SocketAddr,
    pid: u32,
    peers: u64,
    relays: u64,
    paths: u64,
    connects: u64,
    concurrency: u64,
) -> String {
    let started = Instant::now();
    // Relays, with a load report every second.
    let mut relay_tasks = Vec::new();
    for chunk in (0..relays).collect::<Vec<_>>().chunks(100) {
        let ws =
            futures_util::future::join_all(chunk.iter().map(|&i| connect_relay(addr, i))).await;
        for mut ws in ws {
            relay_tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if ws
                        .send(Message::Text(
                            api::encode(&RelayMessage::Load(LoadReport::default())).into(),
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // Drain anything the broker says.
                    while let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_millis(1), ws.next()).await
                    {
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let heap_file = std::env::var_os("BROKER_BENCH_HEAP_FILE").map(std::path::PathBuf::from);
    let heap_before = heap(heap_file.as_deref());
    let rss_before = rss_kib(pid);
    eprintln!("[bench] {relays} relays up; broker RSS {rss_before} KiB; enrolling {peers} peers");

    // Peers: enroll, report, then keep a reader per peer.
    let t = Instant::now();
    let mut sinks = Vec::with_capacity(peers as usize);
    let mut answer_rx: HashMap<u64, mpsc::UnboundedReceiver<(u64, bool)>> = HashMap::new();
    let offers = Arc::new(AtomicU64::new(0));
    let ids: Vec<u64> = (0..peers).collect();
    for chunk in ids.chunks(256) {
        let socks = futures_util::future::join_all(
            chunk.iter().map(|&i| enroll_peer(addr, i, relays, paths)),
        )
        .await;
        for (ws, &i) in socks.into_iter().zip(chunk) {
            let (sink, mut stream) = ws.split();
            sinks.push(sink);
            let (tx, rx) = mpsc::unbounded_channel();
            if i < concurrency {
                answer_rx.insert(i, rx);
            }
            let offers = offers.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(t) = m else { continue };
                    // Cheap dispatch on the type tag (the encoder writes it first) so that the
                    // client, which shares the machine, spends little CPU per message.
                    if t.starts_with(r#"{"type":"offer""#) {
                        offers.fetch_add(1, Ordering::Relaxed);
                    } else if t.starts_with(r#"{"type":"connect_answer""#) {
                        if let Ok(id) = serde_json::from_str::<RequestId>(&t) {
                            let _ = tx.send((id.request_id.unwrap_or(0), true));
                        }
                    } else if t.starts_with(r#"{"type":"error""#) {
                        if let Ok(id) = serde_json::from_str::<RequestId>(&t) {
                            let _ = tx.send((id.request_id.unwrap_or(0), false));
                        }
                    }
                }
            });
        }
    }
    let enroll_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    let per_peer = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / peers as f64;
    let heap = match (heap_before, heap(heap_file.as_deref())) {
        (Some(b), Some(a)) => heap_growth(&b, &a, peers),
        _ => serde_json::Value::Null,
    };
    if !heap.is_null() {
        eprintln!("[bench] heap: {heap}");
    }
    eprintln!("[bench] {peers} peers enrolled in {enroll_secs:.1} s; broker RSS {rss_after} KiB ({per_peer:.0} B/peer)");

    // Connects: CONCURRENCY initiators, one request in flight each.
    let per = connects / concurrency;
    let mut sinks: Vec<Option<_>> = sinks.into_iter().map(Some).collect();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let mut sink = sinks[i as usize].take().unwrap();
        let mut rx = answer_rx.remove(&i).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0xC0FFEE ^ (i + 7));
            let mut lat = Vec::with_capacity(per as usize);
            let mut failed = 0u64;
            for n in 0..per {
                let mut to = rng.below(peers);
                if to == i {
                    to = (to + 1) % peers;
                }
                let req = AgentMessage::Connect(ConnectRequest {
                    request_id: n + 1,
                    to: format!("peer-{to:05}"),
                    transport: TransportKind::Tcp,
                    service: String::new(),
                    avoid: Vec::new(),
                });
                let sent = Instant::now();
                sink.send(Message::Text(api::encode(&req).into()))
                    .await
                    .unwrap();
                loop {
                    let (id, ok) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                        .await
                        .expect("answer within 10 s")
                        .expect("reader alive");
                    if id == n + 1 {
                        if ok {
                            lat.push(sent.elapsed().as_micros() as u64);
                        } else {
                            failed += 1;
                        }
                        break;
                    }
                }
            }
            (lat, failed, sink)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    let mut keep = Vec::new();
    for t in tasks {
        let (lat, f, sink) = t.await.unwrap();
        all.extend(lat);
        failed += f;
        keep.push(sink);
    }
    let secs = t.elapsed().as_secs_f64();
    all.sort_unstable();
    let rate = all.len() as f64 / secs;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = serde_json::json!({
        "peers": peers, "relays": relays, "paths": paths,
        "connects": all.len(), "failed": failed, "seconds": secs,
        "connects_per_sec": rate,
        "p50_ms": percentile(&all, 0.50), "p99_ms": percentile(&all, 0.99), "max_ms": percentile(&all, 1.0),
        "offers_seen": offers.load(Ordering::Relaxed),
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "bytes_per_peer": per_peer,
        "heap": heap,
        "enroll_seconds": enroll_secs, "total_seconds": started.elapsed().as_secs_f64(),
    });
    for t in relay_tasks {
        t.abort();
    }
    drop(keep);
    drop(sinks);
    out.to_string()
}

async fn echo(addr: SocketAddr, requests: u64, concurrency: u64) -> String {
    let payload = api::encode(&AgentMessage::Connect(ConnectRequest {
        request_id: 123456,
        to: "peer-01234".into(),
        transport: TransportKind::Tcp,
        service: String::new(),
        avoid: Vec::new(),
    }));
    let per = requests / concurrency;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let payload = payload.clone();
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
            .await
            .unwrap();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per as usize);
            for _ in 0..per {
                let sent = Instant::now();
                ws.send(Message::Text(payload.clone().into()))
                    .await
                    .unwrap();
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), ws.next())
                        .await
                        .expect("echo within 10 s")
                    {
                        Some(Ok(Message::Text(_))) => break,
                        Some(Ok(_)) => continue,
                        other => panic!("echo failed: {other:?}"),
                    }
                }
                lat.push(sent.elapsed().as_micros() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    all.sort_unstable();
    serde_json::json!({
        "requests": all.len(), "seconds": secs, "requests_per_sec": all.len() as f64 / secs,
        "p50_ms": percentile(&all, 0.50), "p99_ms": percentile(&all, 0.99),
    })
    .to_string()
}
