//! The broker API's versioned JSON messages: what agents and relays say to the broker over
//! their WebSocket, and what the broker says back.
//!
//! One WebSocket text frame carries one JSON object whose `type` field names the message
//! (`snake_case`). Agents send [`AgentMessage`], relays send [`RelayMessage`], the broker sends
//! [`BrokerMessage`] to both.
//!
//! Compatibility: what the broker receives is strict — an unknown field or type in an
//! [`AgentMessage`] or [`RelayMessage`] is an error, never ignored. What the broker sends is
//! open to additions: agents and relays ignore fields of a [`BrokerMessage`] they do not know,
//! so a newer broker can add optional information (as [`Welcome::limits`] was added) without
//! breaking older clients. Anything a client must understand comes with a new [`API_VERSION`].
//! Unknown message types are errors in both directions.
//!
//! # Authentication, the same for agents and relays
//!
//! 1. The client sends a hello ([`AgentHello`] / [`RelayHello`]) with its id, its Ed25519
//!    public key, and — the first time only — an enrollment token.
//! 2. The broker answers [`BrokerMessage::Challenge`] with a random nonce.
//! 3. The client signs [`auth_payload`] (role, id, nonce) with its secret key and sends
//!    [`AuthProof`]; [`sign_auth`] does both steps.
//! 4. With a valid token the broker records the public key (enrollment); without one the key
//!    must be the one it recorded. It then answers [`BrokerMessage::Welcome`] (agents: report
//!    schedule and relay map) or [`BrokerMessage::RelayWelcome`] (relays: load interval).
//!
//! The agent keeps its secret key; the broker only ever sees public keys.
//!
//! What this module does **not** do: no I/O, no clock, no state. [`decode_agent`],
//! [`decode_relay`] and [`decode_broker`] are total: any text gives a message or an
//! [`ApiError`] with [`ErrorCode::BadMessage`] or [`ErrorCode::TooLarge`].

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::hex;

/// The version of this message set. A hello with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const API_VERSION: u32 = 1;
/// Default largest message, in bytes, that a broker accepts. Brokers may set a lower limit.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Length of an authentication nonce, in bytes.
pub const NONCE_LEN: usize = 32;
/// Most paths one report may carry.
pub const MAX_REPORT_PATHS: usize = 1024;
/// Most relays in one relay-map page. The map is sent in pages so that no single message (and
/// no per-connection buffer that holds one) grows with the number of relays.
pub const RELAY_MAP_PAGE: usize = 32;
/// Most relays a [`ConnectRequest`] may ask the broker to avoid.
pub const MAX_AVOID_RELAYS: usize = 8;
/// Domain separation prefix of every signed authentication payload.
pub const AUTH_CONTEXT: &[u8] = b"steelyard-broker-auth-v1\0";

/// Who is authenticating.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A peer's agent.
    Agent,
    /// A relay.
    Relay,
}

impl Role {
    fn tag(self) -> u8 {
        match self {
            Role::Agent => b'a',
            Role::Relay => b'r',
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
        })
    }
}

/// The transport a session needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// A TCP byte stream.
    #[default]
    Tcp,
    /// UDP datagrams.
    Udp,
}

/// Where something is: degrees and an operator-defined region name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoLocation {
    /// Latitude, -90..=90.
    pub lat: f64,
    /// Longitude, -180..=180.
    pub lon: f64,
    /// Region name such as `eu-west`; empty when unknown.
    #[serde(default)]
    pub region: String,
}

/// What a relay can carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayCapacity {
    /// Most sessions at once.
    pub max_sessions: u32,
    /// Most relayed bandwidth in kbit/s, both directions; 0 = not limited.
    #[serde(default)]
    pub max_bandwidth_kbps: u64,
}

// ---------------------------------------------------------------------------------------------
// Agent → broker

/// Everything an agent sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message: who I am.
    Hello(AgentHello),
    /// Second message: the signed challenge.
    Auth(AuthProof),
    /// What I measured towards the relays (on the schedule, or when asked).
    Report(AgentReport),
    /// Connect me to a peer.
    Connect(ConnectRequest),
    /// My answer to an [`Offer`].
    OfferReply(OfferReply),
    /// A session of mine ended; here is what it carried and measured.
    SessionEnded(SessionEnded),
}

/// An agent's hello.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// [`API_VERSION`].
    pub version: u32,
    /// The peer's name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub peer_id: String,
    /// The agent's Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// An enrollment token, on first contact only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// Accept offers without being asked (the broker answers the initiator at once).
    #[serde(default)]
    pub auto_accept: bool,
}

/// The signature over [`auth_payload`], 128 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthProof {
    /// Ed25519 signature, hex.
    pub signature: String,
}

/// An agent's report: where it is and what it measured towards each relay it reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    /// Where the peer is, if it knows.
    #[serde(default)]
    pub location: Option<GeoLocation>,
    /// One entry per relay reached; a relay of the map missing here is unreachable.
    pub paths: Vec<PathReport>,
}

/// One peer → relay measurement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathReport {
    /// The relay's id, as in the relay map.
    pub relay: String,
    /// Round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// IP hops.
    #[serde(default)]
    pub hops: u32,
    /// Share of probes lost, 0..=1.
    #[serde(default)]
    pub loss: f64,
    /// Available bandwidth in kbit/s, if measured.
    #[serde(default)]
    pub bandwidth_kbps: Option<u64>,
    /// The relay accepted a TCP connection.
    #[serde(default = "yes")]
    pub tcp: bool,
    /// The relay answered over UDP.
    #[serde(default = "yes")]
    pub udp: bool,
    /// How long ago the measurement was taken, milliseconds (the broker stamps it with its own
    /// clock, so agents' clocks do not matter).
    #[serde(default)]
    pub age_ms: u64,
}

fn yes() -> bool {
    true
}

/// Connect me to peer `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// Chosen by the agent; echoed in the answer or error.
    pub request_id: u64,
    /// The peer asked for.
    pub to: String,
    /// The transport needed.
    #[serde(default)]
    pub transport: TransportKind,
    /// The service asked for on the peer (a name from its `[services]`); empty when the
    /// session is not for a named service. Passed to the other peer in [`Offer::service`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service: String,
    /// Relays not to use for this session if another usable relay reaches both peers, at most
    /// [`MAX_AVOID_RELAYS`]: the agent just lost a tunnel through them (the broker may not have
    /// noticed yet) and is resuming it. When every usable relay is listed, the best of them is
    /// used anyway: the broker still sees it connected and reporting, so the loss may have been
    /// a stall rather than a dead relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
}

/// Accept or refuse an offer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferReply {
    /// The offer's session id.
    pub session_id: String,
    /// Whether to accept.
    pub accept: bool,
    /// Why not, shown to the initiator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A session ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionEnded {
    /// The session's id.
    pub session_id: String,
    /// Bytes this side sent through the relay.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Bytes this side received through the relay.
    #[serde(default)]
    pub bytes_received: u64,
    /// What this side measured end to end, A → relay → B.
    #[serde(default)]
    pub end_to_end: Option<EndToEndReport>,
}

/// An end-to-end measurement through the session's relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndToEndReport {
    /// Round-trip time A → relay → B → relay → A, milliseconds.
    pub rtt_ms: f64,
    /// Share of packets lost end to end, 0..=1.
    #[serde(default)]
    pub loss: f64,
    /// Goodput through the relay in kbit/s, if measured.
    #[serde(default)]
    pub bandwidth_kbps: Option<u64>,
    /// How long ago it was measured, milliseconds.
    #[serde(default)]
    pub age_ms: u64,
}

// ---------------------------------------------------------------------------------------------
// Relay → broker

/// Everything a relay sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMessage {
    /// First message: who I am.
    Hello(RelayHello),
    /// Second message: the signed challenge.
    Auth(AuthProof),
    /// My workload, every `load_interval_ms`.
    Load(LoadReport),
}

/// A relay's hello.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayHello {
    /// [`API_VERSION`].
    pub version: u32,
    /// The relay's name: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub relay_id: String,
    /// The relay's Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// A relay enrollment token, for relays the operator did not pre-register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// Where peers reach the relay's TCP listener (`host:port`).
    #[serde(default)]
    pub tcp_addr: Option<String>,
    /// Where peers reach the relay's UDP listener and probe responder (`host:port`).
    #[serde(default)]
    pub udp_addr: Option<String>,
    /// Where the relay is.
    #[serde(default)]
    pub location: Option<GeoLocation>,
    /// What it can carry.
    #[serde(default)]
    pub capacity: Option<RelayCapacity>,
}

/// A relay's periodic workload report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    /// Sessions paired and forwarding.
    pub sessions: u32,
    /// Sides waiting for their partner.
    #[serde(default)]
    pub pending: u32,
    /// Bandwidth received, kbit/s.
    #[serde(default)]
    pub bandwidth_in_kbps: u64,
    /// Bandwidth sent, kbit/s.
    #[serde(default)]
    pub bandwidth_out_kbps: u64,
    /// CPU use, 0..=1 of the relay's cores.
    #[serde(default)]
    pub cpu: f64,
    /// Current capacity, if it changed since the hello.
    #[serde(default)]
    pub capacity: Option<RelayCapacity>,
    /// The relay takes no new sessions.
    #[serde(default)]
    pub draining: bool,
}

// ---------------------------------------------------------------------------------------------
// Broker → agent / relay

/// Everything the broker sends to agents and relays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BrokerMessage {
    /// Sign this nonce.
    Challenge(Challenge),
    /// An agent is authenticated: its schedule and relay map.
    Welcome(Welcome),
    /// A relay is authenticated.
    RelayWelcome(RelayWelcome),
    /// The relay map changed.
    RelayMap(RelayMap),
    /// A report was accepted.
    ReportAccepted(ReportAccepted),
    /// Send a fresh report now.
    ReportNow(ReportNow),
    /// The answer to a [`ConnectRequest`].
    ConnectAnswer(ConnectAnswer),
    /// Another peer wants to connect.
    Offer(Offer),
    /// An offer sent earlier no longer stands: the initiator will not come. Drop whatever
    /// was prepared for it (ticket, tunnel to the relay).
    OfferWithdrawn(OfferWithdrawn),
    /// Something was refused or went wrong.
    Error(ApiError),
}

/// The challenge to sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// [`NONCE_LEN`] random bytes, hex.
    pub nonce: String,
}

/// An authenticated agent's instructions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The peer's id.
    pub peer_id: String,
    /// Whether this connection enrolled the peer.
    pub enrolled: bool,
    /// When to report.
    pub schedule: Schedule,
    /// The relays to probe: the first page of the relay map (at most [`RELAY_MAP_PAGE`]).
    pub relays: Vec<RelayMapEntry>,
    /// How many pages the relay map has, this one included; pages 1.. follow at once as
    /// [`BrokerMessage::RelayMap`] messages.
    #[serde(default = "one_page")]
    pub relay_map_pages: u32,
    /// The broker's ticket-signing keys.
    pub ticket_keys: Vec<PublicKeyInfo>,
    /// The limits this channel is held to, so that the agent can pace and queue its own
    /// messages under them instead of having them refused. Absent from brokers that predate
    /// this field: the agent then does not pace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ChannelLimits>,
}

/// The broker's limits on one agent channel (see [`Welcome::limits`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelLimits {
    /// Sustained messages per second the broker takes from the agent; more are refused with
    /// [`ErrorCode::RateLimited`].
    pub messages_per_sec: u32,
    /// Messages the broker takes at once above the sustained rate.
    pub message_burst: u32,
    /// Connect requests that may wait for the other peer's answer at once; more are refused
    /// with [`ErrorCode::TooManyPending`].
    pub max_pending_connects: u32,
}

fn one_page() -> u32 {
    1
}

/// When an agent reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Report every this many milliseconds...
    pub interval_ms: u64,
    /// ... plus a random delay up to this many milliseconds.
    pub jitter_ms: u64,
    /// Report at once when a path's RTT changes by more than this share (0.5 = 50 %).
    pub rtt_change_ratio: f64,
    /// Report at once when a relay becomes reachable or unreachable.
    pub on_reachability_change: bool,
    /// Report at once when the relay map changes.
    pub on_relay_map_change: bool,
}

/// A relay the agents should probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayMapEntry {
    /// The relay's id.
    pub id: String,
    /// Its TCP address, if it has one.
    #[serde(default)]
    pub tcp_addr: Option<String>,
    /// Its UDP (and probe) address, if it has one.
    #[serde(default)]
    pub udp_addr: Option<String>,
    /// Region name; empty when unknown.
    #[serde(default)]
    pub region: String,
    /// Where it is.
    #[serde(default)]
    pub location: Option<GeoLocation>,
}

/// The relay map, pushed when it changes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayMap {
    /// The relays of this page.
    pub relays: Vec<RelayMapEntry>,
    /// This page's number, from 0. Page 0 starts a new map, which replaces the agent's current
    /// one once its last page (`pages - 1`) has arrived.
    #[serde(default)]
    pub page: u32,
    /// How many pages the map has.
    #[serde(default = "one_page")]
    pub pages: u32,
}

/// A broker ticket-signing key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeyInfo {
    /// The key id tickets carry (16 hex digits).
    pub key_id: String,
    /// The Ed25519 public key (64 hex digits).
    pub public_key: String,
    /// Always `ed25519`.
    pub algorithm: String,
}

/// An authenticated relay's instructions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayWelcome {
    /// The relay's id.
    pub relay_id: String,
    /// Whether this connection registered the relay.
    pub enrolled: bool,
    /// Send a [`LoadReport`] every this many milliseconds.
    pub load_interval_ms: u64,
    /// The keys whose tickets the relay must accept.
    pub ticket_keys: Vec<PublicKeyInfo>,
}

/// A report was accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAccepted {
    /// Paths recorded.
    pub paths: u32,
}

/// The broker wants a fresh report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportNow {
    /// Why, e.g. `stale` or `connect`.
    pub reason: String,
}

/// The relay and ticket for a connect request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectAnswer {
    /// The request's id.
    pub request_id: u64,
    /// The session (32 hex digits).
    pub session_id: String,
    /// The peer asked for.
    pub peer: String,
    /// The chosen relay.
    pub relay_id: String,
    /// Its TCP address.
    #[serde(default)]
    pub relay_tcp_addr: Option<String>,
    /// Its UDP address.
    #[serde(default)]
    pub relay_udp_addr: Option<String>,
    /// The session's transport.
    pub transport: TransportKind,
    /// This side's signed ticket, hex.
    pub ticket: String,
    /// When the ticket expires, unix seconds.
    pub expires_at: u64,
    /// The other peer's Ed25519 public key (64 hex digits), as the broker recorded it when the
    /// peer enrolled: the broker vouches for it. The agents derive their Noise static keys
    /// from it (see `steelyard_agent::identity`). Empty from brokers that predate this field.
    #[serde(default)]
    pub peer_key: String,
}

/// Another peer asks for a session; the ticket is for this side (B).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The session (32 hex digits).
    pub session_id: String,
    /// The initiating peer.
    pub from: String,
    /// The chosen relay.
    pub relay_id: String,
    /// Its TCP address.
    #[serde(default)]
    pub relay_tcp_addr: Option<String>,
    /// Its UDP address.
    #[serde(default)]
    pub relay_udp_addr: Option<String>,
    /// The session's transport.
    pub transport: TransportKind,
    /// This side's signed ticket, hex.
    pub ticket: String,
    /// When the ticket expires, unix seconds.
    pub expires_at: u64,
    /// Whether the broker waits for an [`OfferReply`] (false when the agent auto-accepts).
    pub reply_expected: bool,
    /// The service the initiator asked for ([`ConnectRequest::service`]); empty when none.
    #[serde(default)]
    pub service: String,
    /// The initiator's Ed25519 public key (64 hex digits), as the broker recorded it: the
    /// broker vouches for it. Empty from brokers that predate this field.
    #[serde(default)]
    pub peer_key: String,
}

/// The broker withdrew an [`Offer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferWithdrawn {
    /// The offer's session id.
    pub session_id: String,
    /// Why.
    pub reason: WithdrawReason,
}

/// Why an offer was withdrawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    /// The acceptor did not answer within the broker's offer timeout; the initiator was told
    /// `timeout`.
    Timeout,
    /// The initiator disconnected from the broker before the acceptor answered.
    InitiatorGone,
}

/// What went wrong. Codes are stable; messages are for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message is not valid JSON, has an unknown type or field, or breaks a field rule.
    BadMessage,
    /// The message is larger than the broker's limit.
    TooLarge,
    /// Too many messages per second on this connection.
    RateLimited,
    /// The hello's version is not [`API_VERSION`].
    UnsupportedVersion,
    /// A message other than hello/auth before authentication.
    Unauthenticated,
    /// The signature or public key does not match.
    AuthFailed,
    /// The enrollment token is unknown, or the id is not enrolled and no token was given.
    BadToken,
    /// The peer or relay was revoked by the operator.
    Revoked,
    /// The peer asked for is not known to the broker.
    UnknownPeer,
    /// The peer asked for is not connected.
    PeerOffline,
    /// No relay is reachable by both peers.
    NoCommonRelay,
    /// Common relays exist but none can take the session.
    NoUsableRelay,
    /// The other peer refused.
    Refused,
    /// The other peer did not answer in time.
    Timeout,
    /// Too many connect requests waiting for this peer.
    TooManyPending,
    /// A report was refused (ranges, sizes, unknown relays).
    InvalidReport,
    /// The session id is unknown.
    UnknownSession,
    /// Too many unauthenticated connections from this address.
    TooManyConnections,
    /// Another connection authenticated with the same id; this one is closed.
    Replaced,
    /// The broker failed; try again.
    Internal,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::Revoked => "revoked",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::PeerOffline => "peer_offline",
            ErrorCode::NoCommonRelay => "no_common_relay",
            ErrorCode::NoUsableRelay => "no_usable_relay",
            ErrorCode::Refused => "refused",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TooManyPending => "too_many_pending",
            ErrorCode::InvalidReport => "invalid_report",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Replaced => "replaced",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error message: a stable code, a human explanation, and the request it answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// What went wrong.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// The [`ConnectRequest::request_id`] this answers, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
}

impl ApiError {
    /// An error with `code` and `message`, answering no request in particular.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            request_id: None,
        }
    }

    /// The same error, answering request `id`.
    #[must_use]
    pub fn for_request(mut self, id: u64) -> Self {
        self.request_id = Some(id);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Codecs and authentication helpers

fn decode<T: serde::de::DeserializeOwned>(text: &str, max: usize) -> Result<T, ApiError> {
    if text.len() > max {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "message of {} bytes exceeds the limit of {max} bytes",
                text.len()
            ),
        ));
    }
    serde_json::from_str(text)
        .map_err(|e| ApiError::new(ErrorCode::BadMessage, format!("not a valid message: {e}")))
}

/// Parses an agent's message of at most `max_bytes`. Total: never panics.
pub fn decode_agent(text: &str, max_bytes: usize) -> Result<AgentMessage, ApiError> {
    decode(text, max_bytes)
}

/// Parses a relay's message of at most `max_bytes`. Total: never panics.
pub fn decode_relay(text: &str, max_bytes: usize) -> Result<RelayMessage, ApiError> {
    decode(text, max_bytes)
}

/// Parses a broker's message of at most `max_bytes`. Total: never panics.
pub fn decode_broker(text: &str, max_bytes: usize) -> Result<BrokerMessage, ApiError> {
    decode(text, max_bytes)
}

/// How far into a message [`request_id_of`] looks: a connect request fits in far less (ids
/// are at most 64 bytes, `avoid` at most [`MAX_AVOID_RELAYS`] of them).
pub const REQUEST_ID_SCAN_BYTES: usize = 2048;

/// The `request_id` of a message the broker will not parse (e.g. one refused for the message
/// rate), found without parsing the rest: the first `"request_id"` key within the first
/// [`REQUEST_ID_SCAN_BYTES`] bytes, followed by `:` and an unsigned integer that fits in a
/// `u64`. `None` when there is no such field in that window. Bounded work, never panics.
pub fn request_id_of(text: &str) -> Option<u64> {
    const KEY: &[u8] = b"\"request_id\"";
    let bytes = &text.as_bytes()[..text.len().min(REQUEST_ID_SCAN_BYTES)];
    let at = bytes.windows(KEY.len()).position(|w| w == KEY)?;
    let mut rest = bytes[at + KEY.len()..].iter().copied().peekable();
    let skip_space = |r: &mut std::iter::Peekable<_>| {
        while r.next_if(|b: &u8| b.is_ascii_whitespace()).is_some() {}
    };
    skip_space(&mut rest);
    rest.next_if_eq(&b':')?;
    skip_space(&mut rest);
    let mut value: Option<u64> = None;
    while let Some(d) = rest.next_if(u8::is_ascii_digit) {
        value = Some(
            value
                .unwrap_or(0)
                .checked_mul(10)?
                .checked_add(u64::from(d - b'0'))?,
        );
    }
    // `1.5`, `1e3`: not an id.
    match rest.peek() {
        Some(b'.' | b'e' | b'E') => None,
        _ => value,
    }
}

/// Encodes any message as the JSON text of one WebSocket frame.
pub fn encode<T: Serialize>(message: &T) -> String {
    // Serialising these types cannot fail: all map keys are strings and no custom serialisers
    // return errors. Fall back to an internal error message rather than panic.
    serde_json::to_string(message).unwrap_or_else(|e| {
        format!(
            r#"{{"type":"error","code":"internal","message":"cannot encode message: {}"}}"#,
            e.to_string().replace('"', "'")
        )
    })
}

/// The bytes a client signs to answer a challenge: [`AUTH_CONTEXT`], the role, the id and
/// the nonce, each length-delimited.
pub fn auth_payload(role: Role, id: &str, nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUTH_CONTEXT.len() + 3 + id.len() + NONCE_LEN);
    out.extend_from_slice(AUTH_CONTEXT);
    out.push(role.tag());
    out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(nonce);
    out
}

/// Signs the challenge `nonce_hex` for `role` and `id` with `key`: the [`AuthProof`] to send.
pub fn sign_auth(
    key: &SigningKey,
    role: Role,
    id: &str,
    nonce_hex: &str,
) -> Result<AuthProof, ApiError> {
    let nonce = hex::decode::<NONCE_LEN>(nonce_hex)
        .map_err(|e| ApiError::new(ErrorCode::BadMessage, format!("challenge nonce: {e}")))?;
    let signature = key.sign(&auth_payload(role, id, &nonce));
    Ok(AuthProof {
        signature: hex::encode(&signature.to_bytes()),
    })
}

/// Checks `proof` against `key` for `role`, `id` and `nonce`.
pub fn verify_auth(
    key: &VerifyingKey,
    role: Role,
    id: &str,
    nonce: &[u8; NONCE_LEN],
    proof: &AuthProof,
) -> Result<(), ApiError> {
    let bytes = hex::decode::<64>(&proof.signature).map_err(|e| {
        ApiError::new(
            ErrorCode::AuthFailed,
            format!("signature is not 128 hex digits: {e}"),
        )
    })?;
    key.verify_strict(
        &auth_payload(role, id, nonce),
        &Signature::from_bytes(&bytes),
    )
    .map_err(|_| {
        ApiError::new(
            ErrorCode::AuthFailed,
            format!("the signature does not verify under the {role}'s key"),
        )
    })
}

/// Parses an Ed25519 public key from 64 hex digits.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, ApiError> {
    let bytes = hex::decode::<32>(hex_key).map_err(|e| {
        ApiError::new(
            ErrorCode::BadMessage,
            format!("public_key is not 64 hex digits: {e}"),
        )
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| {
        ApiError::new(
            ErrorCode::BadMessage,
            "public_key is not a valid Ed25519 point",
        )
    })
}

/// Splits a relay map into pages of at most [`RELAY_MAP_PAGE`] relays; an empty map is one
/// empty page.
pub fn relay_map_pages(relays: &[RelayMapEntry]) -> Vec<&[RelayMapEntry]> {
    if relays.is_empty() {
        return vec![&[]];
    }
    relays.chunks(RELAY_MAP_PAGE).collect()
}

/// The hex form of a public key, as hellos carry it.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_type_tags() {
        let hello = AgentMessage::Hello(AgentHello {
            version: API_VERSION,
            peer_id: "alice".into(),
            public_key: "00".repeat(32),
            enroll_token: Some("t".into()),
            auto_accept: true,
        });
        let text = encode(&hello);
        assert!(text.starts_with(r#"{"type":"hello""#), "{text}");
        assert_eq!(decode_agent(&text, MAX_MESSAGE_BYTES).unwrap(), hello);

        let load = RelayMessage::Load(LoadReport {
            sessions: 3,
            cpu: 0.5,
            ..LoadReport::default()
        });
        assert_eq!(
            decode_relay(&encode(&load), MAX_MESSAGE_BYTES).unwrap(),
            load
        );
        let err = BrokerMessage::Error(ApiError::new(ErrorCode::PeerOffline, "b").for_request(7));
        let text = encode(&err);
        assert!(text.contains(r#""code":"peer_offline""#), "{text}");
        assert_eq!(decode_broker(&text, MAX_MESSAGE_BYTES).unwrap(), err);
    }

    #[test]
    fn decoding_is_total_and_strict() {
        for bad in [
            "",
            "null",
            "{}",
            r#"{"type":"nope"}"#,
            r#"{"type":"connect","request_id":1,"to":"b","extra":1}"#,
            r#"{"type":"connect","request_id":-1,"to":"b"}"#,
            "\u{0}\u{ffff}",
        ] {
            let e = decode_agent(bad, MAX_MESSAGE_BYTES).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadMessage, "{bad:?}: {e}");
        }
        let big = format!(
            r#"{{"type":"connect","request_id":1,"to":"{}"}}"#,
            "x".repeat(100)
        );
        assert_eq!(
            decode_agent(&big, 50).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn service_and_peer_key_are_optional_on_the_wire() {
        let old = r#"{"type":"connect","request_id":1,"to":"b"}"#;
        match decode_agent(old, MAX_MESSAGE_BYTES).unwrap() {
            AgentMessage::Connect(c) => assert_eq!(c.service, ""),
            other => panic!("{other:?}"),
        }
        let offer = r#"{"type":"offer","session_id":"s","from":"a","relay_id":"r",
            "transport":"tcp","ticket":"00","expires_at":1,"reply_expected":true}"#;
        match decode_broker(offer, MAX_MESSAGE_BYTES).unwrap() {
            BrokerMessage::Offer(o) => {
                assert_eq!((o.service.as_str(), o.peer_key.as_str()), ("", ""))
            }
            other => panic!("{other:?}"),
        }
        let req = AgentMessage::Connect(ConnectRequest {
            request_id: 2,
            to: "b".into(),
            transport: TransportKind::Tcp,
            service: "ssh".into(),
            avoid: Vec::new(),
        });
        assert!(encode(&req).contains(r#""service":"ssh""#));
        assert_eq!(decode_agent(&encode(&req), MAX_MESSAGE_BYTES).unwrap(), req);
    }

    #[test]
    fn request_ids_are_found_without_parsing_the_message() {
        let connect = AgentMessage::Connect(ConnectRequest {
            request_id: 42,
            to: "b".into(),
            transport: TransportKind::Tcp,
            service: "ssh".into(),
            avoid: vec!["r1".into(); MAX_AVOID_RELAYS],
        });
        assert_eq!(request_id_of(&encode(&connect)), Some(42));
        assert_eq!(
            request_id_of(r#"{"to":"b", "request_id" : 18446744073709551615}"#),
            Some(u64::MAX)
        );
        for none in [
            "",
            r#"{"type":"report","paths":[]}"#,
            r#"{"request_id":18446744073709551616}"#,
            r#"{"request_id":-1}"#,
            r#"{"request_id":1.5}"#,
            r#"{"request_id":1e3}"#,
            r#"{"request_id":"7"}"#,
            r#"{"request_id""#,
            r#"{"request_id":"#,
        ] {
            assert_eq!(request_id_of(none), None, "{none}");
        }
        let far = format!(
            r#"{{"to":"{}","request_id":5}}"#,
            "x".repeat(REQUEST_ID_SCAN_BYTES)
        );
        assert_eq!(
            request_id_of(&far),
            None,
            "only the first bytes are looked at"
        );
        // Multi-byte characters across the window's end do not matter: bytes are scanned.
        let wide = format!(
            r#"{{"request_id":9,"to":"{}"}}"#,
            "é".repeat(REQUEST_ID_SCAN_BYTES)
        );
        assert_eq!(request_id_of(&wide), Some(9));
    }

    #[test]
    fn welcome_limits_are_optional_on_the_wire() {
        let old = r#"{"type":"welcome","peer_id":"a","enrolled":false,"schedule":{"interval_ms":1,
            "jitter_ms":0,"rtt_change_ratio":0.5,"on_reachability_change":true,
            "on_relay_map_change":true},"relays":[],"ticket_keys":[]}"#;
        match decode_broker(old, MAX_MESSAGE_BYTES).unwrap() {
            BrokerMessage::Welcome(w) => assert_eq!(w.limits, None),
            other => panic!("{other:?}"),
        }
        let new = old.replace(
            r#""ticket_keys":[]"#,
            r#""ticket_keys":[],"limits":{"messages_per_sec":100,"message_burst":200,
                "max_pending_connects":16}"#,
        );
        match decode_broker(&new, MAX_MESSAGE_BYTES).unwrap() {
            BrokerMessage::Welcome(w) => assert_eq!(
                w.limits,
                Some(ChannelLimits {
                    messages_per_sec: 100,
                    message_burst: 200,
                    max_pending_connects: 16
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clients_ignore_fields_a_newer_broker_adds_but_the_broker_refuses_unknown_fields() {
        // A newer broker's welcome, schedule, relay entry and error with fields this version
        // does not know: an agent still understands them.
        let newer = r#"{"type":"welcome","peer_id":"a","enrolled":false,"from_the_future":1,
            "schedule":{"interval_ms":1,"jitter_ms":0,"rtt_change_ratio":0.5,
            "on_reachability_change":true,"on_relay_map_change":true,"new_trigger":true},
            "relays":[{"id":"r1","udp_addr":"127.0.0.1:1","tcp_addr":"127.0.0.1:2","probe":"x",
            "region":"x","location":null,"weight":2}],"ticket_keys":[]}"#;
        match decode_broker(newer, MAX_MESSAGE_BYTES) {
            Ok(BrokerMessage::Welcome(w)) => assert_eq!(w.peer_id, "a"),
            other => panic!("a newer broker's welcome must decode: {other:?}"),
        }
        let error = r#"{"type":"error","code":"peer_offline","message":"m","hint":"h"}"#;
        assert!(matches!(
            decode_broker(error, MAX_MESSAGE_BYTES),
            Ok(BrokerMessage::Error(_))
        ));
        // Unknown message types stay errors, and the broker stays strict about what it takes.
        let unknown_type = r#"{"type":"teleport","peer_id":"a"}"#;
        assert_eq!(
            decode_broker(unknown_type, MAX_MESSAGE_BYTES)
                .unwrap_err()
                .code,
            ErrorCode::BadMessage
        );
        let hello = r#"{"type":"hello","version":1,"peer_id":"a","public_key":"00",
            "auto_accept":true,"extra":1}"#;
        let err = decode_agent(hello, MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadMessage);
        assert!(err.message.contains("extra"), "{}", err.message);
    }

    #[test]
    fn offer_withdrawn_round_trips() {
        let m = BrokerMessage::OfferWithdrawn(OfferWithdrawn {
            session_id: "ab".repeat(16),
            reason: WithdrawReason::InitiatorGone,
        });
        let text = encode(&m);
        assert!(text.contains(r#""type":"offer_withdrawn""#), "{text}");
        assert!(text.contains(r#""reason":"initiator_gone""#), "{text}");
        assert_eq!(decode_broker(&text, MAX_MESSAGE_BYTES).unwrap(), m);
    }

    #[test]
    fn error_codes_serialise_as_their_names() {
        for code in [
            ErrorCode::BadMessage,
            ErrorCode::TooManyConnections,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }

    #[test]
    fn challenge_signatures_bind_role_id_and_nonce() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let nonce = [9u8; NONCE_LEN];
        let proof = sign_auth(&key, Role::Agent, "alice", &hex::encode(&nonce)).unwrap();
        let public = key.verifying_key();
        verify_auth(&public, Role::Agent, "alice", &nonce, &proof).unwrap();
        assert!(verify_auth(&public, Role::Relay, "alice", &nonce, &proof).is_err());
        assert!(verify_auth(&public, Role::Agent, "alicf", &nonce, &proof).is_err());
        assert!(verify_auth(&public, Role::Agent, "alice", &[8; NONCE_LEN], &proof).is_err());
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert_eq!(
            verify_auth(&other, Role::Agent, "alice", &nonce, &proof)
                .unwrap_err()
                .code,
            ErrorCode::AuthFailed
        );
        assert_eq!(parse_public_key(&public_key_hex(&public)).unwrap(), public);
        assert!(parse_public_key("zz").is_err());
    }
}
