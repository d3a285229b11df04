//! Shared helpers for the agent's integration tests: an in-process relay on loopback with
//! ephemeral ports, ticket signing, and a checksum.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
use steelyard_relay::{BoundAddrs, Relay, RelayConfig, RelayHandle};

pub const RELAY_ID: &str = "relay-agent-test";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn signer() -> TicketSigner {
    TicketSigner::from_seed([23; 32])
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

pub fn session() -> SessionId {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&(u64::from(std::process::id()) ^ now()).to_be_bytes());
    SessionId(id)
}

/// Both sides' signed TCP tickets for a new session on [`RELAY_ID`].
pub fn tcp_pair() -> (SessionId, Vec<u8>, Vec<u8>) {
    let sid = session();
    let t = |side| Ticket {
        key_id: signer().key_id(),
        session_id: sid,
        relay_id: RELAY_ID.into(),
        side,
        peer_id: format!("peer-{side}"),
        issued_at: now() - 5,
        expires_at: now() + 120,
        limits: TicketLimits::default(),
        transport: Transport::Tcp,
    };
    (
        sid,
        signer().sign(&t(Side::A)).unwrap(),
        signer().sign(&t(Side::B)).unwrap(),
    )
}

/// A loopback relay config; `probe` says whether the probe responder listens.
pub fn config(probe: bool) -> RelayConfig {
    let key = steelyard_proto::hex::encode(signer().public_key().as_bytes());
    let probe_line = if probe {
        "probe = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    let mut c = RelayConfig::from_toml(&format!(
        "relay_id = \"{RELAY_ID}\"\nbroker_keys = [\"{key}\"]\n[listen]\ntcp = \"127.0.0.1:0\"\n\
         udp = \"127.0.0.1:0\"\n{probe_line}"
    ))
    .unwrap();
    c.drain.grace_secs = 1;
    c
}

/// Starts a relay in the current runtime.
pub async fn start(cfg: RelayConfig) -> (BoundAddrs, RelayHandle, tokio::task::JoinHandle<()>) {
    let relay = Relay::bind(cfg).await.unwrap();
    let addrs = relay.addrs();
    let handle = relay.handle();
    let task = tokio::spawn(async move { relay.run().await.unwrap() });
    (addrs, handle, task)
}

/// An address on loopback where nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A cheap checksum (FNV-1a over 8-byte words), fast enough in debug builds.
pub fn mix(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h ^= u64::from_le_bytes(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
