//! Shared helpers for the relay's integration tests: a signer, tickets, and an in-process relay
//! on loopback with ephemeral ports.
#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
use steelyard_relay::{BoundAddrs, Relay, RelayConfig, RelayHandle};

pub const RELAY_ID: &str = "relay-test-1";

pub fn signer() -> TicketSigner {
    TicketSigner::from_seed([11; 32])
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A fresh random-enough session id.
pub fn session() -> SessionId {
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&(std::process::id() as u64 ^ now()).to_be_bytes());
    SessionId(id)
}

pub fn ticket(sid: SessionId, side: Side, transport: Transport, limits: TicketLimits) -> Ticket {
    Ticket {
        key_id: signer().key_id(),
        session_id: sid,
        relay_id: RELAY_ID.into(),
        side,
        peer_id: format!("peer-{side}"),
        issued_at: now() - 5,
        expires_at: now() + 120,
        limits,
        transport,
    }
}

pub fn sign(t: &Ticket) -> Vec<u8> {
    signer().sign(t).unwrap()
}

/// Both sides' signed tickets for a new session.
pub fn pair(transport: Transport, limits: TicketLimits) -> (SessionId, Vec<u8>, Vec<u8>) {
    let sid = session();
    (
        sid,
        sign(&ticket(sid, Side::A, transport, limits)),
        sign(&ticket(sid, Side::B, transport, limits)),
    )
}

pub fn public_key_hex() -> String {
    steelyard_proto::hex::encode(signer().public_key().as_bytes())
}

pub fn config() -> RelayConfig {
    let mut c = RelayConfig::from_toml(&format!(
        "relay_id = \"{RELAY_ID}\"\nbroker_keys = [\"{}\"]\n[listen]\ntcp = \"127.0.0.1:0\"\n\
         udp = \"127.0.0.1:0\"\nprobe = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n",
        public_key_hex()
    ))
    .unwrap();
    c.drain.grace_secs = 2;
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

pub const WAIT: Duration = Duration::from_secs(10);

/// A cheap checksum (FNV-1a over 8-byte words) that is fast enough in debug builds.
pub fn mix(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h ^= u64::from_le_bytes(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
