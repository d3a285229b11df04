//! The records the store keeps. Plain serde data, independent of the selection engine's types
//! so the store can be used (and its data read) without it.

use serde::{Deserialize, Serialize};

/// An enrolled peer's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer's name.
    pub id: String,
    /// Its Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// When it enrolled, unix ms.
    pub enrolled_at: u64,
    /// The name of the token it enrolled with (never the secret).
    #[serde(default)]
    pub token_name: String,
    /// Revoked by the operator: refused from then on.
    #[serde(default)]
    pub revoked: bool,
    /// When it was revoked, unix ms.
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// A location as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredLocation {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
    /// Region name.
    #[serde(default)]
    pub region: String,
}

/// A relay known to the broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayRecord {
    /// The relay's name.
    pub id: String,
    /// Its Ed25519 public key (64 hex digits), once known.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Where peers reach its TCP listener.
    #[serde(default)]
    pub tcp_addr: Option<String>,
    /// Where peers reach its UDP listener and probe responder.
    #[serde(default)]
    pub udp_addr: Option<String>,
    /// Where it is.
    #[serde(default)]
    pub location: Option<StoredLocation>,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// Most bandwidth in kbit/s; 0 = not limited.
    #[serde(default)]
    pub max_bandwidth_kbps: u64,
    /// Tier (0 first).
    #[serde(default)]
    pub tier: u8,
    /// Operator weight, > 0.
    pub weight: f64,
    /// Drained by the operator: no new sessions.
    #[serde(default)]
    pub draining: bool,
    /// When it was first registered, unix ms.
    pub registered_at: u64,
    /// Where it came from: `config` or `enrolled`.
    #[serde(default)]
    pub source: String,
}

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Offered to B, waiting for its answer.
    Offered,
    /// Both sides have tickets.
    Active,
    /// B refused, or did not answer in time.
    Refused,
    /// Ended (a side reported it, or its tickets expired unused).
    Ended,
}

/// One brokered session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id, 32 hex digits.
    pub id: String,
    /// The initiator (side A).
    pub from: String,
    /// The acceptor (side B).
    pub to: String,
    /// The relay.
    pub relay: String,
    /// `tcp` or `udp`.
    pub transport: String,
    /// Where it stands.
    pub state: SessionState,
    /// When it was created, unix ms.
    pub created_at: u64,
    /// When it ended, unix ms.
    #[serde(default)]
    pub ended_at: Option<u64>,
    /// Bytes A sent (as A reported).
    #[serde(default)]
    pub bytes_a_to_b: u64,
    /// Bytes B sent (as B reported).
    #[serde(default)]
    pub bytes_b_to_a: u64,
    /// End-to-end RTT measured by a side, ms.
    #[serde(default)]
    pub end_to_end_rtt_ms: Option<f64>,
}
