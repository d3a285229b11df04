//! The agent daemon: keeps the broker channel up, reports measurements on the broker's
//! schedule, accepts offers into the local services, and opens tunnels for local clients.
//!
//! * **Broker channel.** One WebSocket to `/v1/agent`: hello → challenge → signed auth →
//!   welcome (schedule, relay map, ticket keys). Dropped channels are re-opened with
//!   exponential backoff and jitter ([`Backoff`]).
//! * **Reports.** The relay map (assembled from its pages by [`RelayMapPages`]) is measured with
//!   [`measure::measure_all`] every `interval_ms` plus a random share of `jitter_ms`, at once
//!   after a relay-map change, and when the broker sends `report_now`. Early (at most one
//!   measurement start per [`EARLY_REPORT_GAP`]): when a tunnel breaks, and when a watch finds
//!   a path moved beyond the broker's triggers (`rtt_change_ratio`, `on_reachability_change`):
//!   every [`watch_period`] between reports, a train of [`measure::WATCH_PROBES`] probes per
//!   relay (no TCP connect, no burst; with the default 64-byte probes 192 bytes each way per
//!   relay and watch, four watches per report interval).
//! * **Offers.** [`decide_offer`] applies the offer policy and the `[services]` table; an
//!   accepted offer dials the relay with its ticket and runs the Noise KK tunnel as responder
//!   (binding = session id, peer key = the one the broker vouches for, see [`identity`]). The
//!   opening side's handshake payload ([`Attach`]) says whether the tunnel starts a new stream
//!   (the agent connects the local service, answering the refusal in the handshake if it
//!   cannot) or resumes a live one (the tunnel is handed to that stream's bridge). A refused
//!   offer is answered with the reason. An offer the broker withdraws (`offer_withdrawn`: the
//!   initiator left or the offer timed out) stops its relay dial at once.
//! * **Control endpoint** (loopback TCP, [`AgentConfig::control`]). A client (`steelyard
//!   connect`, or [`open_via_agent`]) sends one JSON line [`ControlRequest`]; the agent asks the
//!   broker, dials the relay, runs the tunnel as initiator and answers one JSON line
//!   [`ControlReply`]; after an `ok` reply the control connection *is* the tunnel's plaintext
//!   end. So the identity key never leaves the agent. A relay that cannot be dialled is
//!   avoided in up to [`NEW_TUNNEL_RELAY_RETRIES`] further requests.
//! * **Forwards.** A control request with `listen` ([`forward_via_agent`], what `steelyard
//!   connect` sends) makes the agent bind that TCP address itself (loopback only unless
//!   `allow_remote_forwards`; at most [`MAX_FORWARDS`]) and answer with the bound address;
//!   every connection accepted there becomes a tunnel exactly as above (same broker request,
//!   relay retries, resume, [`MAX_TUNNELS`] limit and session reports), its outcome sent back
//!   as one JSON line per tunnel on the control connection. The listener closes when the
//!   control connection does; tunnels already accepted carry on to their end. The config's
//!   `[[forwards]]` are bound at start and run as long as the agent.
//! * **Failover.** Both ends bridge through [`crate::resume`]. When the tunnel breaks, the
//!   opening side asks the broker for a new session to the same service, naming the relays it
//!   lost tunnels through (`avoid`), and opens a tunnel with [`Attach::Resume`] and the
//!   stream's random resume id; the accepting side attaches it to the live stream (keyed by
//!   the authenticated peer and the id), and both retransmit what the other lacks. Bounded by
//!   `[resume]` in the config: replay buffer, resumes per stream, time to give up; then the
//!   local connection is dropped and the error logged. A relay that goes silent (drops every
//!   packet, no reset) is noticed by the keepalives within `resume.dead_after_ms`; a relay that
//!   does not answer a new dial within `resume.relay_connect_ms` is avoided like a refusing
//!   one.
//! * **Session end.** Each side sends `session_ended` once per session with the bytes moved.
//!   The initiator adds the end-to-end RTT (the Noise KK handshake is exactly one round trip
//!   A → relay → B → relay → A, in whole microseconds) and, for streams one relay carried
//!   from start to end, the goodput measured while data flowed ([`crate::goodput`]; none when
//!   too little moved to measure). A session replaced by a resume is reported ended without
//!   bytes when its tunnel breaks; the last one carries the stream's totals (after a failed
//!   resume, the last one is the broken one, and its end went out when it broke).
//! * **Broker limits.** The welcome states the channel's limits; every message to the broker
//!   is paced under the message rate ([`Pacer`]), and connect requests beyond
//!   `max_pending_connects` wait for a slot, so that a burst of local connects is queued rather
//!   than refused. A request the broker refuses anyway (its error names the request) fails at
//!   once with the broker's message.
//! * **UDP services** (`udp:HOST:PORT` in `[services]`): the accepting side sends the stream's
//!   datagram records to the service from a socket of its own ([`crate::datagram`]); the
//!   opening side is `steelyard connect --udp`, one stream per client address.
//!
//! What this module does **not** do (yet): relay sessions over UDP (offers for a UDP relay path
//! are refused; UDP services ride TCP relay sessions), resume
//! after the agent process restarts, watch loss between reports (only RTT and reachability), or
//! authenticate control clients beyond requiring a loopback address.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use steelyard_proto::api::{
    self, AgentHello, AgentMessage, AgentReport, ApiError, BrokerMessage, ConnectAnswer,
    ConnectRequest, EndToEndReport, ErrorCode, Offer, OfferReply, PathReport, RelayMapEntry,
    Role as AuthRole, SessionEnded, TransportKind, API_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::config::{broker_ws_url, AgentConfig, ServiceAddr};
use crate::datagram;
use crate::identity::{self, IdentityError};
use crate::measure::{self, MeasureConfig, RelayTarget, Reported, TrainResult};
use crate::resume::{self as tunnel_resume, Attach, AttachReply, ResumeConfig, RESUME_ID_LEN};
use crate::tunnel::{Role, StaticKeypair, Tunnel, TunnelConfig, TunnelError};

/// Longest control request or reply line, bytes.
pub const MAX_CONTROL_LINE: usize = 4096;
/// Most tunnels (both directions together) at once; more are refused.
pub const MAX_TUNNELS: usize = 1024;
/// Most forwards (listeners the agent runs for control clients) at once; more are refused.
pub const MAX_FORWARDS: usize = 64;
/// Tunnel events queued per forward towards its control client; more are dropped.
const FORWARD_EVENTS: usize = 64;
/// Most connect requests waiting for the broker at once.
pub const MAX_PENDING_CONNECTS: usize = 256;
/// How long a connect request waits for the broker's answer (the other peer may be asked).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a side waits at the relay for its partner.
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest time between the starts of two measurements when reporting early.
pub const EARLY_REPORT_GAP: Duration = Duration::from_secs(1);

/// How often the paths are watched between reports: a quarter of the report interval, within
/// 500 ms..=10 s.
pub fn watch_period(interval_ms: u64) -> Duration {
    Duration::from_millis((interval_ms / 4).clamp(500, 10_000))
}

/// How many other relays a new tunnel tries when the chosen one cannot be reached.
pub const NEW_TUNNEL_RELAY_RETRIES: usize = 2;
/// Messages queued towards the broker.
const OUT_QUEUE: usize = 256;
/// Share of the broker's sustained message rate the agent uses (the rest absorbs delays that
/// bunch paced messages up on the way).
const PACE_RATE_SHARE: f64 = 0.9;

/// The daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The control endpoint could not be bound.
    #[error("cannot listen on the control address {addr}: {source}; pick a free loopback port in `control`")]
    Control {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A `[[forwards]]` listener could not be bound.
    #[error("forward to {peer}/{service}: {message}")]
    Forward {
        /// The peer.
        peer: String,
        /// The service.
        service: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// One broker session failed; the daemon reconnects after a backoff.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach the broker at {0}: {1}")]
    Connect(String, String),
    #[error("the broker refused this agent: {0}")]
    Refused(ApiError),
    #[error("the broker closed the channel")]
    Closed,
    #[error("broker channel: {0}")]
    Ws(String),
}

// ---------------------------------------------------------------------------------------------
// Sans-I/O pieces

/// Reconnect delays: doubling from `base` up to `max`, each with up to 50 % random jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, capped at `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `random` supplies the jitter (any value).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter_ms = (exp.as_millis() as u64 / 2).max(1);
        exp + Duration::from_millis(random % jitter_ms)
    }

    /// A session got through: start from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Paces the messages an agent sends under the broker's message rate ([`api::ChannelLimits`]
/// from the welcome): a token bucket with [`PACE_RATE_SHARE`] of the broker's rate and half
/// its burst, so that what the broker receives stays within its own bucket even when the way
/// there delays some messages and bunches them up.
#[derive(Debug, Clone)]
pub struct Pacer {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl Pacer {
    /// A full bucket under `limits`, at `now`.
    pub fn new(limits: &api::ChannelLimits, now: Instant) -> Self {
        let burst = f64::from((limits.message_burst / 2).max(1));
        Self {
            tokens: burst,
            rate: (f64::from(limits.messages_per_sec) * PACE_RATE_SHARE).max(0.1),
            burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// One message was sent at `now`.
    pub fn take(&mut self, now: Instant) {
        self.refill(now);
        self.tokens -= 1.0;
    }

    /// When the next message may go: `None` for now.
    pub fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        // At least a microsecond: a wait that rounds to nothing would not refill the bucket.
        (self.tokens < 1.0).then(|| {
            now + Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
                .max(Duration::from_micros(1))
        })
    }
}

/// Assembles the paged relay map: page 0 starts a new map, which replaces the current one
/// once its last page has arrived.
#[derive(Debug, Clone, Default)]
pub struct RelayMapPages {
    current: Vec<RelayMapEntry>,
    building: Vec<RelayMapEntry>,
    expected: u32,
    next_page: u32,
}

impl RelayMapPages {
    /// Starts from the welcome's first page of `pages`.
    pub fn new(first: Vec<RelayMapEntry>, pages: u32) -> Self {
        let mut s = Self::default();
        s.page(first, 0, pages);
        s
    }

    /// Takes one page; returns `true` when it completed a new map.
    pub fn page(&mut self, relays: Vec<RelayMapEntry>, page: u32, pages: u32) -> bool {
        if page == 0 {
            self.building.clear();
            self.expected = pages.max(1);
            self.next_page = 0;
        }
        if page != self.next_page || page >= self.expected {
            return false; // out of order: wait for the next page 0
        }
        // Bounded: at most `pages` pages of at most RELAY_MAP_PAGE relays each, and the broker
        // limits the map; cap anyway so a broken broker cannot grow this without end.
        let room = 64 * api::RELAY_MAP_PAGE - self.building.len().min(64 * api::RELAY_MAP_PAGE);
        self.building.extend(relays.into_iter().take(room));
        self.next_page += 1;
        if self.next_page == self.expected {
            self.current = std::mem::take(&mut self.building);
            return true;
        }
        false
    }

    /// The complete map.
    pub fn relays(&self) -> &[RelayMapEntry] {
        &self.current
    }
}

/// The measurement targets of a relay map: relays with a TCP address that parses (names are
/// not resolved here); the probe address is the UDP address when it parses.
pub fn targets(relays: &[RelayMapEntry]) -> Vec<RelayTarget> {
    relays
        .iter()
        .filter_map(|r| {
            let tcp: SocketAddr = r.tcp_addr.as_deref()?.parse().ok()?;
            Some(RelayTarget {
                id: r.id.as_str().into(),
                probe: r.udp_addr.as_deref().and_then(|a| a.parse().ok()),
                tcp,
            })
        })
        .collect()
}

/// Whether to accept an offer from `from` for `service`, and if so, where the service is.
/// The `Err` is the reason sent back to the initiator.
pub fn decide_offer(
    cfg: &AgentConfig,
    from: &str,
    service: &str,
    transport: TransportKind,
) -> Result<ServiceAddr, String> {
    if !cfg.offers.allow.is_empty() && !cfg.offers.allow.iter().any(|p| p == from) {
        return Err(format!(
            "peer {from} is not in {}'s offers.allow list",
            cfg.peer_id
        ));
    }
    if transport != TransportKind::Tcp {
        return Err("this agent exposes TCP services only".into());
    }
    if service.is_empty() {
        return Err("no service named in the request; name one of the peer's [services]".into());
    }
    cfg.services.get(service).copied().ok_or_else(|| {
        let names: Vec<&str> = cfg.services.keys().map(String::as_str).collect();
        format!(
            "{} exposes no service {service:?} (it exposes: {})",
            cfg.peer_id,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Control protocol

/// What a control client asks: a tunnel to `service` on `peer` (this connection becomes it),
/// or with `listen` a forward (the agent listens there and tunnels every accepted connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// The peer to reach.
    pub peer: String,
    /// The service on that peer.
    pub service: String,
    /// Forward: listen on this TCP address (loopback unless the config's
    /// `allow_remote_forwards`) for as long as this control connection stays open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// The agent's answer; after `ok: true` the connection carries the tunnel's plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlReply {
    /// Whether the tunnel is up.
    pub ok: bool,
    /// The session id, when up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The relay carrying it, when up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// What went wrong and what to do, when not up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A forward's bound address (in the reply to a forward request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listening: Option<SocketAddr>,
    /// The local client a forward's tunnel event is about (events after a forward's reply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SocketAddr>,
}

/// A control client's failure.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The agent's control endpoint could not be reached.
    #[error("cannot reach the agent's control endpoint {addr}: {source}; is `steelyard agent` running with that `control` address?")]
    Unreachable {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("the agent could not open the tunnel: {0}")]
    Refused(String),
    /// The agent's answer was malformed or cut short.
    #[error("the agent's control endpoint answered badly: {0}")]
    Protocol(String),
}

/// Reads one `\n`-terminated line of at most [`MAX_CONTROL_LINE`] bytes, byte by byte so that
/// nothing after the line is consumed.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(128);
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return String::from_utf8(line)
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"));
        }
        if line.len() >= MAX_CONTROL_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long",
            ));
        }
        line.push(b);
    }
}

async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, v: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string(v).map_err(std::io::Error::other)?;
    text.push('\n');
    w.write_all(text.as_bytes()).await
}

/// Sends `req` to the agent at `control` and reads its reply line; a refusal is an error.
async fn control_request(
    control: SocketAddr,
    req: &ControlRequest,
) -> Result<(TcpStream, ControlReply), ControlError> {
    let mut s = TcpStream::connect(control)
        .await
        .map_err(|source| ControlError::Unreachable {
            addr: control,
            source,
        })?;
    let _ = s.set_nodelay(true);
    write_json(&mut s, req)
        .await
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let reply = read_reply(&mut s).await?;
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "no reason given".into()),
        ));
    }
    Ok((s, reply))
}

async fn read_reply(s: &mut TcpStream) -> Result<ControlReply, ControlError> {
    let line = read_line(s)
        .await
        .map_err(|e| ControlError::Protocol(format!("no reply line: {e}")))?;
    serde_json::from_str(&line).map_err(|e| ControlError::Protocol(format!("{e}: {line}")))
}

/// Asks the agent at `control` for a tunnel to `service` on `peer`. On success returns the
/// connection, which from then on carries the service's bytes, and the agent's reply.
pub async fn open_via_agent(
    control: SocketAddr,
    peer: &str,
    service: &str,
) -> Result<(TcpStream, ControlReply), ControlError> {
    let req = ControlRequest {
        peer: peer.to_owned(),
        service: service.to_owned(),
        listen: None,
    };
    control_request(control, &req).await
}

/// A forward the agent runs for this client: it listens while [`Forward`] lives (dropping it
/// closes the control connection, and the agent closes the listener).
#[derive(Debug)]
pub struct Forward {
    conn: TcpStream,
    /// The address the agent bound (the port filled in when 0 was asked for).
    pub listening: SocketAddr,
}

impl Forward {
    /// The next tunnel event: `ok` with the session and relay of a tunnel the forward opened
    /// for local client `from`, or its `error`. Fails when the agent ends the forward (it
    /// stopped, or the connection broke).
    pub async fn next_event(&mut self) -> Result<ControlReply, ControlError> {
        read_reply(&mut self.conn).await
    }
}

/// Asks the agent at `control` to listen on `listen` (TCP) and tunnel every connection it
/// accepts there to `service` on `peer`, for as long as the returned [`Forward`] lives.
pub async fn forward_via_agent(
    control: SocketAddr,
    peer: &str,
    service: &str,
    listen: SocketAddr,
) -> Result<Forward, ControlError> {
    let req = ControlRequest {
        peer: peer.to_owned(),
        service: service.to_owned(),
        listen: Some(listen),
    };
    let (conn, reply) = control_request(control, &req).await?;
    let listening = reply.listening.ok_or_else(|| {
        ControlError::Protocol(
            "the agent answered a forward request without its address; is it older than this \
             `steelyard connect`?"
                .into(),
        )
    })?;
    Ok(Forward { conn, listening })
}

// ---------------------------------------------------------------------------------------------
// The daemon

struct Shared {
    cfg: AgentConfig,
    key: SigningKey,
    noise: StaticKeypair,
    out: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<ConnectAnswer, ApiError>>>>,
    /// Connect requests that may wait for the broker's answer at once: the broker's
    /// `max_pending_connects` from the welcome (requests beyond it queue here instead of being
    /// refused). Replaced on each welcome; closed when the channel drops.
    connect_slots: Mutex<Arc<Semaphore>>,
    next_id: AtomicU64,
    tunnels: Arc<Semaphore>,
    /// Forwards run for control clients, at most [`MAX_FORWARDS`].
    forwards: Arc<Semaphore>,
    measure: MeasureConfig,
    /// A tunnel broke: measure and report now (its relay or the path to it may be gone).
    measure_now: tokio::sync::Notify,
    /// Live accepted streams, for tunnels that resume them.
    streams: Mutex<HashMap<StreamKey, mpsc::Sender<Resumed>>>,
    /// Offers being handled (decided, replied to, their relay dialled), by session id: the
    /// broker's `offer_withdrawn` wakes the one it names to stop waiting at the relay for an
    /// initiator that will not come. At most [`MAX_TUNNELS`] entries.
    offers: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    resume: ResumeConfig,
    resume_timeout: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// A configured agent with its control endpoint bound; [`Agent::run`] runs it.
pub struct Agent {
    shared: Arc<Shared>,
    control: TcpListener,
    /// The config's `[[forwards]]`, bound.
    forwards: Vec<(ControlRequest, TcpListener)>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("peer_id", &self.shared.cfg.peer_id)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Validates `cfg`, loads (or creates) the identity key and binds the control endpoint and
    /// the config's `[[forwards]]`.
    pub async fn bind(cfg: AgentConfig) -> Result<Self, DaemonError> {
        cfg.validate()?;
        let key = identity::load_or_create(&cfg.key_file)?;
        let max_replay = cfg.resume.max_replay_kib * 1024;
        let resume = ResumeConfig {
            max_replay,
            ack_every: max_replay / 4,
            max_resumes: cfg.resume.max_resumes,
            keepalive: Duration::from_millis(cfg.resume.keepalive_ms),
            dead_after: Duration::from_millis(cfg.resume.dead_after_ms),
        };
        let resume_timeout = Duration::from_millis(cfg.resume.timeout_ms);
        let control =
            TcpListener::bind(cfg.control)
                .await
                .map_err(|source| DaemonError::Control {
                    addr: cfg.control,
                    source,
                })?;
        let mut forwards = Vec::with_capacity(cfg.forwards.len());
        for f in &cfg.forwards {
            let listener =
                bind_forward(&cfg, f.listen)
                    .await
                    .map_err(|message| DaemonError::Forward {
                        peer: f.peer.clone(),
                        service: f.service.clone(),
                        message,
                    })?;
            let req = ControlRequest {
                peer: f.peer.clone(),
                service: f.service.clone(),
                listen: Some(f.listen),
            };
            forwards.push((req, listener));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                noise: identity::noise_keypair(&key),
                key,
                cfg,
                out: Mutex::new(None),
                pending: Mutex::new(HashMap::new()),
                connect_slots: Mutex::new(Arc::new(Semaphore::new(MAX_PENDING_CONNECTS))),
                next_id: AtomicU64::new(1),
                tunnels: Arc::new(Semaphore::new(MAX_TUNNELS)),
                forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
                measure: MeasureConfig::default(),
                measure_now: tokio::sync::Notify::new(),
                streams: Mutex::new(HashMap::new()),
                offers: Mutex::new(HashMap::new()),
                resume,
                resume_timeout,
            }),
            control,
            forwards,
        })
    }

    /// The bound control address.
    pub fn control_addr(&self) -> std::io::Result<SocketAddr> {
        self.control.local_addr()
    }

    /// The config's `[[forwards]]` as bound: `(local address, peer, service)` each (a port 0 in
    /// the config shows the port the system chose).
    pub fn forward_addrs(&self) -> Vec<(SocketAddr, &str, &str)> {
        self.forwards
            .iter()
            .filter_map(|(req, l)| Some((l.local_addr().ok()?, &*req.peer, &*req.service)))
            .collect()
    }

    /// This agent's Ed25519 public key, hex (what the broker records at enrollment).
    pub fn public_key_hex(&self) -> String {
        api::public_key_hex(&self.shared.key.verifying_key())
    }

    /// Runs until `shutdown` completes: the broker channel (reconnecting) and the control
    /// endpoint. Live tunnels are not waited for.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        let control = tokio::spawn(control_loop(shared.clone(), self.control));
        let forwards: Vec<_> = self
            .forwards
            .into_iter()
            .map(|(req, listener)| {
                let end = std::future::pending();
                tokio::spawn(forward_loop(shared.clone(), req, listener, end, None))
            })
            .collect();
        let broker = tokio::spawn(broker_loop(shared));
        shutdown.await;
        control.abort();
        forwards.iter().for_each(|f| f.abort());
        broker.abort();
    }
}

async fn broker_loop(shared: Arc<Shared>) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        let started = Instant::now();
        let result = broker_session(&shared).await;
        *lock(&shared.out) = None;
        // Requests queued for a slot fail now rather than go to the next broker session.
        lock(&shared.connect_slots).close();
        for (id, tx) in lock(&shared.pending).drain() {
            let _ = tx.send(Err(ApiError::new(
                ErrorCode::Internal,
                "the broker channel dropped before the answer came; retry",
            )
            .for_request(id)));
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
        }
        let delay = backoff.next_delay(random_u64());
        match result {
            Ok(()) | Err(SessionError::Closed) => {
                tracing::warn!(retry_in = ?delay, "broker channel closed; reconnecting")
            }
            Err(e) => tracing::warn!(retry_in = ?delay, "{e}"),
        }
        tokio::time::sleep(delay).await;
    }
}

fn host_port(url: &str) -> Option<(String, u16, bool)> {
    let (scheme, rest) = url.split_once("://")?;
    let tls = scheme == "wss";
    let authority = rest.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => match p.parse() {
            Ok(p) => (h, p),
            Err(_) => (authority, if tls { 443 } else { 80 }),
        },
        _ => (authority, if tls { 443 } else { 80 }),
    };
    Some((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        tls,
    ))
}

async fn broker_session(shared: &Arc<Shared>) -> Result<(), SessionError> {
    let base = &shared.cfg.broker;
    let url =
        broker_ws_url(base).ok_or_else(|| SessionError::Connect(base.clone(), "bad URL".into()))?;
    let (host, port, tls) =
        host_port(&url).ok_or_else(|| SessionError::Connect(url.clone(), "bad URL".into()))?;
    let fail = |e: String| SessionError::Connect(url.clone(), e);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        let (ws, _) = tokio_tungstenite::client_async(&url, tcp)
            .await
            .map_err(|e| fail(e.to_string()))?;
        return channel(shared, ws).await;
    }
    let Some(ca) = &shared.cfg.ca_file else {
        return Err(fail(
            "wss needs `ca_file` (the PEM of the CA that signed the broker's certificate)".into(),
        ));
    };
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| fail(format!("ca_file {}: {e}", ca.display())))?;
    for c in certs {
        let c = c.map_err(|e| fail(format!("ca_file {}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| fail(format!("ca_file {}: {e}", ca.display())))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| fail(format!("server name {host}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| fail(format!("TLS: {e}")))?;
    let (ws, _) = tokio_tungstenite::client_async(&url, stream)
        .await
        .map_err(|e| fail(e.to_string()))?;
    channel(shared, ws).await
}

async fn recv_broker<S>(ws: &mut WebSocketStream<S>) -> Result<BrokerMessage, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(SessionError::Closed),
            Some(Err(e)) => return Err(SessionError::Ws(e.to_string())),
            Some(Ok(Message::Text(t))) => {
                return api::decode_broker(&t, api::MAX_MESSAGE_BYTES)
                    .map_err(|e| SessionError::Ws(format!("bad message from the broker: {e}")))
            }
            Some(Ok(_)) => continue,
        }
    }
}

async fn send_ws<S>(ws: &mut WebSocketStream<S>, m: &AgentMessage) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Text(api::encode(m).into()))
        .await
        .map_err(|e| SessionError::Ws(e.to_string()))
}

async fn channel<S>(shared: &Arc<Shared>, mut ws: WebSocketStream<S>) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    send_ws(
        &mut ws,
        &AgentMessage::Hello(AgentHello {
            version: API_VERSION,
            peer_id: cfg.peer_id.clone(),
            public_key: api::public_key_hex(&shared.key.verifying_key()),
            enroll_token: cfg.enroll_token.clone(),
            auto_accept: false,
        }),
    )
    .await?;
    let nonce = match recv_broker(&mut ws).await? {
        BrokerMessage::Challenge(c) => c.nonce,
        BrokerMessage::Error(e) => return Err(SessionError::Refused(e)),
        other => {
            return Err(SessionError::Ws(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    let proof = api::sign_auth(&shared.key, AuthRole::Agent, &cfg.peer_id, &nonce)
        .map_err(SessionError::Refused)?;
    send_ws(&mut ws, &AgentMessage::Auth(proof)).await?;
    let welcome = match recv_broker(&mut ws).await? {
        BrokerMessage::Welcome(w) => w,
        BrokerMessage::Error(e) => return Err(SessionError::Refused(e)),
        other => {
            return Err(SessionError::Ws(format!(
                "expected a welcome, got {other:?}"
            )))
        }
    };
    tracing::info!(
        peer = %welcome.peer_id,
        enrolled = welcome.enrolled,
        relays = welcome.relays.len(),
        "connected to the broker"
    );
    let schedule = welcome.schedule;
    let mut map = RelayMapPages::new(welcome.relays, welcome.relay_map_pages);
    // Under the broker's limits: messages paced, connects queued for a slot. A broker that
    // does not state them gets neither (as before).
    let mut pacer = welcome.limits.map(|l| Pacer::new(&l, Instant::now()));
    let mut paced_until: Option<tokio::time::Instant> = None;
    let slots = welcome.limits.map_or(MAX_PENDING_CONNECTS, |l| {
        (l.max_pending_connects.max(1) as usize).min(MAX_PENDING_CONNECTS)
    });
    *lock(&shared.connect_slots) = Arc::new(Semaphore::new(slots));
    let (tx, mut rx) = mpsc::channel::<AgentMessage>(OUT_QUEUE);
    *lock(&shared.out) = Some(tx.clone());

    let mut next_measure = tokio::time::Instant::now();
    let mut measuring: Option<tokio::task::JoinHandle<Option<AgentReport>>> = None;
    // Watches between reports (see `measure::path_change`), on when the broker set a trigger.
    let watch_on = schedule.rtt_change_ratio > 0.0 || schedule.on_reachability_change;
    let watch_every = watch_period(schedule.interval_ms);
    let mut next_watch = tokio::time::Instant::now() + watch_every;
    let mut watching: Option<tokio::task::JoinHandle<Vec<(String, TrainResult)>>> = None;
    let mut reported: Option<HashMap<String, Reported>> = None;
    let mut last_started = tokio::time::Instant::now();
    // An early report (path change, lost tunnel): at once, but not within EARLY_REPORT_GAP of
    // the last measurement's start.
    let early = |next: tokio::time::Instant, last_started: tokio::time::Instant| {
        next.min((last_started + EARLY_REPORT_GAP).max(tokio::time::Instant::now()))
    };
    loop {
        tokio::select! {
            _ = shared.measure_now.notified() => {
                tracing::debug!("a tunnel broke: reporting early");
                next_measure = early(next_measure, last_started);
            }
            _ = tokio::time::sleep_until(next_watch),
                if watch_on && reported.is_some() && watching.is_none() && measuring.is_none() => {
                let targets = targets(map.relays());
                let (mcfg, parallel) = (shared.measure.clone(), shared.measure.parallel);
                watching = Some(tokio::spawn(async move {
                    futures_util::stream::iter(targets)
                        .map(|t| {
                            let mcfg = mcfg.clone();
                            async move {
                                let train = measure::watch_relay(&t, &mcfg).await;
                                train.map(|r| (t.id.as_str().to_owned(), r))
                            }
                        })
                        .buffer_unordered(parallel)
                        .filter_map(std::future::ready)
                        .collect()
                        .await
                }));
            }
            done = async { watching.as_mut().expect("guarded").await }, if watching.is_some() => {
                watching = None;
                next_watch = tokio::time::Instant::now() + watch_every;
                let last = reported.as_ref();
                let reason = done.unwrap_or_default().iter().find_map(|(relay, train)| {
                    measure::path_change(
                        relay,
                        last.and_then(|r| r.get(relay).copied()),
                        train,
                        schedule.rtt_change_ratio,
                        schedule.on_reachability_change,
                    )
                });
                if let Some(reason) = reason {
                    tracing::info!("{reason}: reporting before the schedule");
                    next_measure = early(next_measure, last_started);
                }
            }
            _ = tokio::time::sleep_until(next_measure), if measuring.is_none() => {
                last_started = tokio::time::Instant::now();
                let jitter = if schedule.jitter_ms > 0 { random_u64() % schedule.jitter_ms } else { 0 };
                next_measure = tokio::time::Instant::now()
                    + Duration::from_millis(schedule.interval_ms.max(100) + jitter);
                let targets = targets(map.relays());
                let (mcfg, location) = (shared.measure.clone(), cfg.location.clone());
                measuring = Some(tokio::spawn(async move {
                    let cycle = measure::measure_all(&targets, &mcfg).await.ok()?;
                    Some(AgentReport {
                        location,
                        paths: cycle.paths.into_iter().map(|(relay, m)| PathReport {
                            relay: relay.as_str().to_owned(),
                            rtt_ms: m.rtt_ms,
                            hops: m.hops,
                            loss: m.loss,
                            bandwidth_kbps: m.bandwidth_kbps,
                            tcp: m.tcp,
                            udp: m.udp,
                            age_ms: 0,
                        }).collect(),
                    })
                }));
            }
            done = async { measuring.as_mut().expect("guarded").await }, if measuring.is_some() => {
                measuring = None;
                if let Ok(Some(report)) = done {
                    tracing::debug!(paths = report.paths.len(), "report");
                    reported = Some(report.paths.iter().map(|p| {
                        (p.relay.clone(), Reported { udp_rtt_ms: p.udp.then_some(p.rtt_ms) })
                    }).collect());
                    next_watch = tokio::time::Instant::now() + watch_every;
                    // Paced like every other message; a queue full of them (hundreds of
                    // session ends) skips this report: the next one is an interval away.
                    if tx.try_send(AgentMessage::Report(report)).is_err() {
                        tracing::warn!("the queue to the broker is full: report skipped");
                    }
                }
            }
            _ = async { tokio::time::sleep_until(paced_until.expect("guarded")).await },
                if paced_until.is_some() => {
                paced_until = None;
            }
            out = rx.recv(), if paced_until.is_none() => {
                // `tx` lives in this scope, so the queue never ends here.
                if let Some(m) = out {
                    send_ws(&mut ws, &m).await?;
                    if let Some(p) = &mut pacer {
                        let now = Instant::now();
                        p.take(now);
                        paced_until = p.ready_at(now).map(tokio::time::Instant::from_std);
                    }
                }
            }
            m = recv_broker(&mut ws) => match m? {
                BrokerMessage::RelayMap(page) => {
                    if map.page(page.relays, page.page, page.pages) && schedule.on_relay_map_change {
                        next_measure = tokio::time::Instant::now();
                    }
                }
                BrokerMessage::ReportNow(r) => {
                    tracing::debug!(reason = %r.reason, "the broker asks for a report");
                    next_measure = tokio::time::Instant::now();
                }
                BrokerMessage::ReportAccepted(_) => {}
                BrokerMessage::ConnectAnswer(a) => {
                    if let Some(w) = lock(&shared.pending).remove(&a.request_id) {
                        let _ = w.send(Ok(a));
                    }
                }
                BrokerMessage::Offer(o) => {
                    // Registered here, before the next broker message is read, so that a
                    // withdrawal right behind the offer finds it.
                    let withdrawn = Arc::new(tokio::sync::Notify::new());
                    {
                        let mut offers = lock(&shared.offers);
                        if offers.len() < MAX_TUNNELS {
                            offers.insert(o.session_id.clone(), withdrawn.clone());
                        }
                    }
                    let (shared, tx) = (shared.clone(), tx.clone());
                    tokio::spawn(async move { handle_offer(shared, o, tx, withdrawn).await });
                }
                BrokerMessage::OfferWithdrawn(w) => {
                    tracing::info!(session = %w.session_id, reason = ?w.reason,
                        "the broker withdrew an offer; its initiator will not come");
                    if let Some(n) = lock(&shared.offers).remove(&w.session_id) {
                        n.notify_one();
                    }
                }
                BrokerMessage::Error(e) => match e.request_id.and_then(|id| lock(&shared.pending).remove(&id)) {
                    Some(w) => { let _ = w.send(Err(e)); }
                    None if e.code == ErrorCode::Replaced => return Err(SessionError::Refused(e)),
                    None => tracing::warn!("the broker reports: {e}"),
                },
                other => tracing::debug!("ignoring {other:?}"),
            }
        }
    }
}

fn hex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 4096 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

async fn resolve(addr: Option<&str>) -> Result<SocketAddr, String> {
    let addr = addr.ok_or("the broker gave no TCP address for the relay")?;
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("relay address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("relay address {addr} resolves to nothing"))
}

/// Where and as whom to dial: the relay, the ticket (hex), the peer's key (hex), the session.
#[derive(Clone, Copy)]
struct Dial<'a> {
    relay: Option<&'a str>,
    ticket_hex: &'a str,
    peer_key: &'a str,
    session_id: &'a str,
}

/// Dials the relay with `ticket_hex` and runs the Noise handshake as `role`, carrying
/// `payload` (initiator) or `respond`'s answer (responder) in it. Returns the tunnel, the
/// handshake's duration (one round trip through the relay) and the peer's payload.
async fn open_tunnel<F, Fut>(
    shared: &Shared,
    role: Role,
    dial: Dial<'_>,
    payload: &[u8],
    respond: F,
) -> Result<(Tunnel<TcpStream>, Duration, Vec<u8>), String>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: Future<Output = Vec<u8>>,
{
    let Dial {
        relay,
        ticket_hex,
        peer_key,
        session_id,
    } = dial;
    if peer_key.is_empty() {
        return Err(
            "the broker sent no peer key; upgrade the broker (it must send peer_key)".into(),
        );
    }
    let remote = identity::noise_public(peer_key).map_err(|e| e.to_string())?;
    let ticket = hex_vec(ticket_hex).ok_or("the broker's ticket is not hex")?;
    let relay = resolve(relay).await?;
    let stream = dial_relay(
        relay,
        &ticket,
        Duration::from_millis(shared.cfg.resume.relay_connect_ms),
    )
    .await
    .map_err(|e| format!("relay {relay}: {e}"))?;
    let started = Instant::now();
    let (tunnel, theirs) = Tunnel::handshake_with(
        stream,
        &TunnelConfig {
            role,
            local: shared.noise.clone(),
            remote_public: remote,
            binding: session_id.as_bytes().to_vec(),
            handshake_timeout: Duration::from_millis(shared.cfg.resume.handshake_ms),
        },
        payload,
        respond,
    )
    .await
    .map_err(|e| format!("tunnel through relay {relay}: {e}"))?;
    Ok((tunnel, started.elapsed(), theirs))
}

/// Dials `relay` and presents `ticket`: the relay must accept the connection and answer (its
/// first status) within `connect`, then pair us with the other side within [`PAIR_TIMEOUT`].
/// A relay that is down or cut off (packets dropped, nothing refused) thus costs `connect`,
/// not the kernel's minutes of SYN retries.
async fn dial_relay(
    relay: SocketAddr,
    ticket: &[u8],
    connect: Duration,
) -> Result<TcpStream, String> {
    use steelyard_relay::client::read_status;
    use steelyard_relay::wire::StatusCode;
    let hello = steelyard_relay::wire::encode_hello(ticket).map_err(|e| e.to_string())?;
    let opened = tokio::time::timeout(connect, async {
        let mut s = TcpStream::connect(relay).await?;
        s.set_nodelay(true)?;
        s.write_all(&hello).await?;
        let first = read_status(&mut s).await.map_err(std::io::Error::other)?;
        Ok::<_, std::io::Error>((s, first))
    })
    .await;
    let (mut s, mut status) = match opened {
        Err(_) => {
            return Err(format!(
                "no answer within {connect:?} (down or unreachable; resume.relay_connect_ms \
                 sets this bound)"
            ))
        }
        Ok(Err(e)) => return Err(format!("relay connection failed: {e}")),
        Ok(Ok(x)) => x,
    };
    let paired = tokio::time::timeout(PAIR_TIMEOUT, async {
        loop {
            match status {
                StatusCode::Waiting => status = read_status(&mut s).await?,
                StatusCode::Paired => return Ok(()),
                code => return Err(steelyard_relay::client::ClientError::Refused(code)),
            }
        }
    })
    .await;
    match paired {
        Err(_) => Err(format!(
            "the other side did not arrive at the relay within {PAIR_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(())) => Ok(s),
    }
}

/// [`open_tunnel`] as the initiator asking for `attach`; the accepting agent's refusal is
/// `Err((reason, true))`, any other failure `Err((reason, false))`.
async fn open_attached(
    shared: &Shared,
    answer: &ConnectAnswer,
    peer: &str,
    attach: Attach,
) -> Result<(Tunnel<TcpStream>, Duration), (String, bool)> {
    let (tunnel, rtt, theirs) = open_tunnel(
        shared,
        Role::Initiator,
        Dial {
            relay: answer.relay_tcp_addr.as_deref(),
            ticket_hex: &answer.ticket,
            peer_key: &answer.peer_key,
            session_id: &answer.session_id,
        },
        &attach.encode(),
        |_| async { Vec::new() },
    )
    .await
    .map_err(|e| (e, false))?;
    match AttachReply::decode(&theirs) {
        Ok(AttachReply::Accepted) => Ok((tunnel, rtt)),
        Ok(AttachReply::Refused(why)) => Err((format!("{peer} refused the tunnel: {why}"), true)),
        Err(e) => Err((e, true)),
    }
}

/// Reports a broker session ended: the bytes moved, and on the initiating side the end-to-end
/// RTT (the handshake's round trip) and the goodput when there is one (measured while data
/// flowed, see [`crate::goodput`]).
async fn report_end(
    shared: &Shared,
    session_id: String,
    bytes: Option<(u64, u64)>,
    rtt: Option<Duration>,
    goodput_kbps: Option<u64>,
) {
    let (sent, received) = bytes.unwrap_or_default();
    let end_to_end = rtt.map(|rtt| EndToEndReport {
        // Whole microseconds: nanoseconds in f64 milliseconds read back as 5.095007000000001.
        rtt_ms: rtt.as_micros() as f64 / 1000.0,
        loss: 0.0,
        bandwidth_kbps: goodput_kbps,
        age_ms: 0,
    });
    let tx = lock(&shared.out).clone();
    if let Some(tx) = tx {
        let _ = tx
            .send(AgentMessage::SessionEnded(SessionEnded {
                session_id,
                bytes_sent: sent,
                bytes_received: received,
                end_to_end,
            }))
            .await;
    }
}

/// The accepting side's end of a stream: the service's TCP connection, or the records side of a
/// UDP service's pump.
trait LocalIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> LocalIo for T {}
type LocalConn = Box<dyn LocalIo>;

/// Connects to the service: a TCP connection, or for a UDP service a socket connected to it
/// and a pump between it and the stream (ending after [`datagram::DEFAULT_IDLE`] without
/// datagrams).
async fn connect_service(local: ServiceAddr) -> std::io::Result<LocalConn> {
    if !local.udp {
        let conn = TcpStream::connect(local.addr).await?;
        let _ = conn.set_nodelay(true);
        return Ok(Box::new(conn));
    }
    let any: SocketAddr = if local.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(any).await?;
    sock.connect(local.addr).await?;
    let (ours, theirs) = tokio::io::duplex(4 * (datagram::MAX_DATAGRAM + 2));
    tokio::spawn(async move {
        let r = datagram::pump(theirs, &sock, None, None, datagram::DEFAULT_IDLE).await;
        tracing::debug!(service = %local.addr, "UDP flow ended: {r:?}");
    });
    Ok(Box::new(ours))
}

/// A stream's key at the accepting side: the opening peer and its resume id.
type StreamKey = (String, [u8; RESUME_ID_LEN]);

/// A new tunnel for a live stream, with its broker session id.
type Resumed = (Tunnel<TcpStream>, String);

/// What the accepting side decided during the handshake.
enum Accepted {
    /// A new stream: the service connection and where resumed tunnels will arrive.
    New(LocalConn, [u8; RESUME_ID_LEN], mpsc::Receiver<Resumed>),
    /// A resumed stream.
    Resume([u8; RESUME_ID_LEN]),
}

/// The accepting side's answer to the opening side's attach request: connect the service for a
/// new stream (registering it for resumes), or check that a resumed stream is live here.
async fn accept_attach(
    shared: &Shared,
    from: &str,
    service: &str,
    local: ServiceAddr,
    theirs: &[u8],
) -> Result<Accepted, String> {
    let key = |id| (from.to_owned(), id);
    match Attach::decode(theirs)? {
        Attach::New(id) => {
            if lock(&shared.streams).contains_key(&key(id)) {
                return Err("that resume id is in use already; open a new tunnel".into());
            }
            let conn = connect_service(local).await.map_err(|e| {
                format!(
                    "{} cannot connect to its service {service} at {}{}: {e}",
                    shared.cfg.peer_id,
                    if local.udp { "udp:" } else { "" },
                    local.addr
                )
            })?;
            // Bounded: one entry per live accepted tunnel, and those are at most MAX_TUNNELS.
            let (tx, rx) = mpsc::channel(2);
            lock(&shared.streams).insert(key(id), tx);
            Ok(Accepted::New(conn, id, rx))
        }
        Attach::Resume(id) => {
            if lock(&shared.streams).contains_key(&key(id)) {
                Ok(Accepted::Resume(id))
            } else {
                Err(format!(
                    "{} holds no live stream with that resume id from {from}: it ended, or \
                     gave up waiting for the resume",
                    shared.cfg.peer_id
                ))
            }
        }
    }
}

/// Removes an offer from [`Shared::offers`] when its dial is over, however it ends.
struct OfferEntry(Arc<Shared>, String);

impl Drop for OfferEntry {
    fn drop(&mut self) {
        lock(&self.0.offers).remove(&self.1);
    }
}

async fn handle_offer(
    shared: Arc<Shared>,
    offer: Offer,
    tx: mpsc::Sender<AgentMessage>,
    withdrawn: Arc<tokio::sync::Notify>,
) {
    let entry = OfferEntry(shared.clone(), offer.session_id.clone());
    let permit = shared.tunnels.clone().try_acquire_owned();
    let decision = match &permit {
        Ok(_) => decide_offer(&shared.cfg, &offer.from, &offer.service, offer.transport),
        Err(_) => Err(format!(
            "{} carries {MAX_TUNNELS} tunnels already",
            shared.cfg.peer_id
        )),
    };
    if offer.reply_expected {
        let _ = tx
            .send(AgentMessage::OfferReply(OfferReply {
                session_id: offer.session_id.clone(),
                accept: decision.is_ok(),
                reason: decision.as_ref().err().cloned(),
            }))
            .await;
    }
    drop(tx);
    let local = match decision {
        Ok(a) => a,
        Err(why) => {
            tracing::info!(from = %offer.from, service = %offer.service, "offer refused: {why}");
            return;
        }
    };
    let mut accepted = None;
    let mut was_withdrawn = false;
    let opened = tokio::select! {
        opened = open_tunnel(
            &shared,
            Role::Responder,
            Dial {
                relay: offer.relay_tcp_addr.as_deref(),
                ticket_hex: &offer.ticket,
                peer_key: &offer.peer_key,
                session_id: &offer.session_id,
            },
            &[],
            |theirs| {
                let (shared, accepted, offer) = (&shared, &mut accepted, &offer);
                async move {
                    let a =
                        accept_attach(shared, &offer.from, &offer.service, local, &theirs).await;
                    let reply = match &a {
                        Ok(_) => AttachReply::Accepted,
                        Err(why) => AttachReply::Refused(why.clone()),
                    };
                    *accepted = Some(a);
                    reply.encode()
                }
            },
        ) => opened,
        // Cancelling the dial is safe at any point: what the handshake set up is undone below.
        () = withdrawn.notified() => {
            was_withdrawn = true;
            Err("the broker withdrew the offer before it stood (the initiator left or it timed \
                 out)".to_owned())
        }
    };
    drop(entry);
    let tunnel = match opened {
        Ok((t, _, _)) => t,
        Err(e) => {
            if let Some(Ok(Accepted::New(_, id, _))) = accepted {
                lock(&shared.streams).remove(&(offer.from.clone(), id));
            }
            if was_withdrawn {
                // The broker ended the session itself; there is nothing to report.
                tracing::info!(session = %offer.session_id, from = %offer.from, "{e}");
            } else {
                tracing::warn!(session = %offer.session_id, from = %offer.from, "offer failed: {e}");
                report_end(&shared, offer.session_id, None, None, None).await;
            }
            return;
        }
    };
    let key = |id| (offer.from.clone(), id);
    let accepted =
        accepted.unwrap_or_else(|| Err("the handshake ended without an attach request".into()));
    let (conn, id, rx) = match accepted {
        Ok(Accepted::New(conn, id, rx)) => (conn, id, rx),
        Ok(Accepted::Resume(id)) => {
            // Hand the tunnel to the stream's bridge; it reports the session's end.
            let stream = lock(&shared.streams).get(&key(id)).cloned();
            let handed = match stream {
                Some(s) => s.send((tunnel, offer.session_id.clone())).await.is_ok(),
                None => false,
            };
            if !handed {
                tracing::warn!(session = %offer.session_id, from = %offer.from,
                    "the stream to resume ended during the handshake");
                report_end(&shared, offer.session_id, None, None, None).await;
            }
            return;
        }
        Err(why) => {
            tracing::warn!(session = %offer.session_id, from = %offer.from, "tunnel refused: {why}");
            report_end(&shared, offer.session_id, None, None, None).await;
            return;
        }
    };
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let current = Arc::new(Mutex::new(offer.session_id.clone()));
    let (rx2, cur2, sh2, sh3) = (rx.clone(), current.clone(), shared.clone(), shared.clone());
    let timeout = shared.resume_timeout;
    // A replaced session is over at the broker; the last one reports the stream's bytes.
    let take = move |(t, session): Resumed| {
        let old = std::mem::replace(&mut *lock(&cur2), session);
        let shared = sh2.clone();
        tokio::spawn(async move { report_end(&shared, old, None, None, None).await });
        t
    };
    let take2 = take.clone();
    let result = tunnel_resume::resumable_bridge_preemptible(
        conn,
        tunnel,
        |_| {
            sh3.measure_now.notify_one();
            let (rx, take) = (rx2.clone(), take.clone());
            async move {
                let next = tokio::time::timeout(timeout, async { rx.lock().await.recv().await });
                match next.await {
                    Ok(Some(r)) => Ok(take(r)),
                    _ => Err(TunnelError::Resume(format!(
                        "the opening peer did not resume the tunnel within {timeout:?}"
                    ))),
                }
            }
        },
        || {
            let (rx, take) = (rx.clone(), take2.clone());
            async move {
                match rx.lock().await.recv().await {
                    Some(r) => take(r),
                    None => std::future::pending().await,
                }
            }
        },
        &shared.resume,
    )
    .await;
    lock(&shared.streams).remove(&key(id));
    let session = lock(&current).clone();
    let bytes = match result {
        Ok(s) => {
            if s.resumes > 0 {
                tracing::info!(
                    session,
                    resumes = s.resumes,
                    retransmitted = s.retransmitted,
                    "stream ended after resuming on new relays"
                );
            }
            Some((s.sent, s.received))
        }
        Err(e) => {
            tracing::warn!(session, from = %offer.from, "tunnel ended with an error: {e}");
            None
        }
    };
    report_end(&shared, session, bytes, None, None).await;
    drop(permit);
}

async fn control_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !from.ip().is_loopback() {
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move { control_conn(shared, conn).await });
    }
}

fn refuse(error: String) -> ControlReply {
    ControlReply {
        ok: false,
        session_id: None,
        relay: None,
        error: Some(error),
        listening: None,
        from: None,
    }
}

async fn ask_broker(
    shared: &Shared,
    req: &ControlRequest,
    avoid: &[String],
) -> Result<ConnectAnswer, String> {
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    // The channel's queue and its connect slots are set together, queue last (see `channel`).
    let tx = lock(&shared.out).clone().ok_or_else(|| {
        format!(
            "agent {} is not connected to the broker {} yet; check its log and retry",
            shared.cfg.peer_id, shared.cfg.broker
        )
    })?;
    // A slot: the broker refuses connects beyond its `max_pending_connects`, so they wait here
    // for an earlier one to be answered. The slots close when the channel drops.
    let slots = lock(&shared.connect_slots).clone();
    let _slot = match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err("the broker channel dropped; retry".to_owned()),
        Err(_) => {
            return Err(format!(
                "earlier connect requests held every slot the broker allows \
                 (max_pending_connects) for {CONNECT_TIMEOUT:?}; retry"
            ))
        }
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (otx, orx) = oneshot::channel();
    {
        let mut pending = lock(&shared.pending);
        if pending.len() >= MAX_PENDING_CONNECTS {
            return Err(format!(
                "{MAX_PENDING_CONNECTS} connect requests are already waiting for the broker; retry later"
            ));
        }
        pending.insert(id, otx);
    }
    let sent = tx
        .send(AgentMessage::Connect(ConnectRequest {
            request_id: id,
            to: req.peer.clone(),
            transport: TransportKind::Tcp,
            service: req.service.clone(),
            avoid: avoid.to_vec(),
        }))
        .await;
    let result = match sent {
        Err(_) => Err("the broker channel dropped; retry".to_owned()),
        Ok(()) => match tokio::time::timeout_at(deadline, orx).await {
            Err(_) => Err(format!(
                "no answer from the broker within {CONNECT_TIMEOUT:?}; retry"
            )),
            Ok(Err(_)) => Err("the broker channel dropped; retry".to_owned()),
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(Ok(Err(e))) => Err(format!("the broker says {e}")),
        },
    };
    lock(&shared.pending).remove(&id);
    result
}

/// The opening side's current tunnel of a stream, and the relays it lost tunnels through.
struct Opened {
    session_id: String,
    relay_id: String,
    rtt: Duration,
    avoid: Vec<String>,
    /// `session_id`'s end was reported already (its tunnel broke and no resume replaced it):
    /// the broker takes one report per side and session.
    ended: bool,
}

impl Opened {
    fn avoid(&mut self, relay: &str) {
        if !self.avoid.iter().any(|r| r == relay) {
            if self.avoid.len() >= api::MAX_AVOID_RELAYS {
                self.avoid.remove(0);
            }
            self.avoid.push(relay.to_owned());
        }
    }
}

/// The opening side after its tunnel broke: asks the broker for a new session to the same
/// service, avoiding the relays that failed, and opens a tunnel that resumes stream `id`.
/// Retries with backoff until the resume timeout; the accepting peer's refusal is final.
async fn resume_opening(
    shared: Arc<Shared>,
    req: ControlRequest,
    id: [u8; RESUME_ID_LEN],
    opened: Arc<Mutex<Opened>>,
    attempt: u32,
) -> Result<Tunnel<TcpStream>, TunnelError> {
    let (old_session, old_relay, reported) = {
        let mut o = lock(&opened);
        let relay = o.relay_id.clone();
        o.avoid(&relay);
        let reported = std::mem::replace(&mut o.ended, true);
        (o.session_id.clone(), relay, reported)
    };
    shared.measure_now.notify_one();
    if !reported {
        report_end(&shared, old_session, None, None, None).await;
    }
    let timeout = shared.resume_timeout;
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    let mut last;
    loop {
        let avoid = lock(&opened).avoid.clone();
        match ask_broker(&shared, &req, &avoid).await {
            Err(e) => last = e,
            Ok(answer) => {
                match open_attached(&shared, &answer, &req.peer, Attach::Resume(id)).await {
                    Ok((tunnel, rtt)) => {
                        tracing::info!(peer = %req.peer, service = %req.service, attempt,
                        from_relay = %old_relay, to_relay = %answer.relay_id, "tunnel resumed");
                        let mut o = lock(&opened);
                        o.session_id = answer.session_id;
                        o.relay_id = answer.relay_id;
                        o.rtt = rtt;
                        o.ended = false;
                        return Ok(tunnel);
                    }
                    Err((e, refused)) => {
                        report_end(&shared, answer.session_id, None, None, None).await;
                        if refused {
                            return Err(TunnelError::Resume(format!("cannot resume: {e}")));
                        }
                        lock(&opened).avoid(&answer.relay_id);
                        last = e;
                    }
                }
            }
        }
        if Instant::now() + delay >= deadline {
            return Err(TunnelError::Resume(format!(
                "the tunnel to {}/{} broke (relay {old_relay}) and could not be resumed within \
                 {timeout:?}; last error: {last}",
                req.peer, req.service
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

async fn control_conn(shared: Arc<Shared>, mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let req = match tokio::time::timeout(Duration::from_secs(10), read_line(&mut conn)).await {
        Ok(Ok(line)) => match serde_json::from_str::<ControlRequest>(&line) {
            Ok(r) => r,
            Err(e) => {
                let _ = write_json(&mut conn, &refuse(format!("bad control request: {e}"))).await;
                return;
            }
        },
        _ => return,
    };
    match req.listen {
        Some(listen) => control_forward(shared, req, listen, conn).await,
        None => serve_tunnel(shared, req, conn, Answer::Control).await,
    }
}

/// Who hears how a tunnel request went.
enum Answer {
    /// The control client that asked for the tunnel: one JSON reply line on the connection,
    /// before the tunnel's bytes.
    Control,
    /// A forward's client (`steelyard connect`), as an event line, if one is listening; the
    /// local connection from `from` only ever sees the service's bytes.
    Forward {
        from: SocketAddr,
        events: Option<mpsc::Sender<ControlReply>>,
    },
}

impl Answer {
    /// Tells of a failure.
    async fn refuse(&self, conn: &mut TcpStream, req: &ControlRequest, error: String) {
        match self {
            Answer::Control => {
                let _ = write_json(conn, &refuse(error)).await;
            }
            Answer::Forward { from, events } => {
                tracing::warn!(%from, peer = %req.peer, service = %req.service,
                    "forwarded connection dropped: {error}");
                if let Some(events) = events {
                    let mut r = refuse(error);
                    r.from = Some(*from);
                    let _ = events.try_send(r);
                }
            }
        }
    }

    /// Tells that the tunnel is up; false when the control client is gone.
    async fn ok(&self, conn: &mut TcpStream, mut reply: ControlReply) -> bool {
        match self {
            Answer::Control => write_json(conn, &reply).await.is_ok(),
            Answer::Forward { from, events } => {
                if let Some(events) = events {
                    reply.from = Some(*from);
                    let _ = events.try_send(reply); // dropped when the client reads slowly
                }
                true
            }
        }
    }
}

/// Refuses a forward address that is not loopback, unless the config allows remote forwards.
fn check_forward_addr(cfg: &AgentConfig, listen: SocketAddr) -> Result<(), String> {
    if listen.ip().is_loopback() || cfg.allow_remote_forwards {
        return Ok(());
    }
    Err(format!(
        "forward address {listen} is not a loopback address: anyone who reaches it could use \
         the tunnel as this peer; listen on 127.0.0.1 or ::1, or set `allow_remote_forwards = \
         true` in the agent's config"
    ))
}

/// Binds a forward's listener, with errors that say what to do.
async fn bind_forward(cfg: &AgentConfig, listen: SocketAddr) -> Result<TcpListener, String> {
    check_forward_addr(cfg, listen)?;
    TcpListener::bind(listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "something else listens there; pick a free port"
        } else {
            "pick a local address and a free port"
        };
        format!("cannot listen on {listen}: {e}; {hint}")
    })
}

/// A control client's forward: binds `listen`, answers with the bound address, and tunnels
/// every accepted connection until the control connection closes (then the listener closes;
/// tunnels already accepted carry on to their end). Tunnel events go back as lines.
async fn control_forward(
    shared: Arc<Shared>,
    req: ControlRequest,
    listen: SocketAddr,
    mut conn: TcpStream,
) {
    let Ok(_permit) = shared.forwards.clone().try_acquire_owned() else {
        let _ = write_json(
            &mut conn,
            &refuse(format!(
                "this agent runs {MAX_FORWARDS} forwards already; stop one (its `steelyard \
                 connect`) and retry"
            )),
        )
        .await;
        return;
    };
    let listener = match bind_forward(&shared.cfg, listen).await {
        Ok(l) => l,
        Err(e) => {
            let _ = write_json(&mut conn, &refuse(e)).await;
            return;
        }
    };
    let listening = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            let _ = write_json(&mut conn, &refuse(format!("forward listener: {e}"))).await;
            return;
        }
    };
    let ok = ControlReply {
        ok: true,
        session_id: None,
        relay: None,
        error: None,
        listening: Some(listening),
        from: None,
    };
    if write_json(&mut conn, &ok).await.is_err() {
        return;
    }
    let (mut rd, mut wr) = conn.into_split();
    let (events, mut rx) = mpsc::channel::<ControlReply>(FORWARD_EVENTS);
    let writer = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if write_json(&mut wr, &ev).await.is_err() {
                return;
            }
        }
    });
    // The client sends nothing more: end of stream (or an error) means it is gone.
    let gone = async move {
        let mut sink = [0u8; 256];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    forward_loop(shared, req, listener, gone, Some(events)).await;
    writer.abort();
    tracing::info!(%listening, "forward closed: its control connection ended");
}

/// Accepts on a forward's `listener` until `end` completes, each connection a tunnel for `req`.
async fn forward_loop(
    shared: Arc<Shared>,
    req: ControlRequest,
    listener: TcpListener,
    end: impl Future<Output = ()>,
    events: Option<mpsc::Sender<ControlReply>>,
) {
    if let Ok(listening) = listener.local_addr() {
        tracing::info!(%listening, peer = %req.peer, service = %req.service, "forward open");
    }
    tokio::pin!(end);
    loop {
        let (conn, from) = tokio::select! {
            () = &mut end => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, typically: wait rather than spin.
                    tracing::warn!("forward accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = conn.set_nodelay(true);
        let tell = Answer::Forward {
            from,
            events: events.clone(),
        };
        tokio::spawn(serve_tunnel(shared.clone(), req.clone(), conn, tell));
    }
}

/// Opens a tunnel for `req` (asking the broker, dialling the relay, avoiding a relay that
/// cannot be dialled) and bridges `conn` to it, resuming on another relay when it breaks.
async fn serve_tunnel(shared: Arc<Shared>, req: ControlRequest, mut conn: TcpStream, tell: Answer) {
    let Ok(permit) = shared.tunnels.clone().try_acquire_owned() else {
        tell.refuse(
            &mut conn,
            &req,
            format!("this agent carries {MAX_TUNNELS} tunnels already; retry later"),
        )
        .await;
        return;
    };
    // A relay that cannot be dialled (it died and the broker has not noticed yet) is avoided
    // in a second and a third request; the peer's refusal is final.
    let mut avoid = Vec::new();
    let mut id = [0u8; RESUME_ID_LEN];
    let (answer, tunnel, rtt) = loop {
        if let Err(e) = getrandom::getrandom(&mut id) {
            tell.refuse(
                &mut conn,
                &req,
                format!("no randomness for the resume id: {e}"),
            )
            .await;
            return;
        }
        let answer = match ask_broker(&shared, &req, &avoid).await {
            Ok(a) => a,
            Err(e) => {
                tell.refuse(&mut conn, &req, e).await;
                return;
            }
        };
        match open_attached(&shared, &answer, &req.peer, Attach::New(id)).await {
            Ok((t, rtt)) => break (answer, t, rtt),
            Err((e, refused)) => {
                report_end(&shared, answer.session_id, None, None, None).await;
                if refused || avoid.len() >= NEW_TUNNEL_RELAY_RETRIES {
                    tell.refuse(&mut conn, &req, e).await;
                    return;
                }
                tracing::info!(relay = %answer.relay_id, "new tunnel failed, asking for another relay: {e}");
                avoid.push(answer.relay_id);
            }
        }
    };
    let ok = ControlReply {
        ok: true,
        session_id: Some(answer.session_id.clone()),
        relay: Some(answer.relay_id.clone()),
        error: None,
        listening: None,
        from: None,
    };
    if !tell.ok(&mut conn, ok).await {
        report_end(&shared, answer.session_id, None, Some(rtt), None).await;
        return;
    }
    let opened = Arc::new(Mutex::new(Opened {
        session_id: answer.session_id,
        relay_id: answer.relay_id,
        rtt,
        avoid: Vec::new(),
        ended: false,
    }));
    let result = tunnel_resume::resumable_bridge(
        conn,
        tunnel,
        |attempt| resume_opening(shared.clone(), req.clone(), id, opened.clone(), attempt),
        &shared.resume,
    )
    .await;
    let (session, rtt, reported) = {
        let o = lock(&opened);
        (o.session_id.clone(), o.rtt, o.ended)
    };
    let (bytes, goodput) = match result {
        Ok(s) => {
            if s.resumes > 0 {
                tracing::info!(
                    session,
                    resumes = s.resumes,
                    retransmitted = s.retransmitted,
                    "stream ended after resuming on new relays"
                );
            }
            // Goodput only for a stream that one tunnel carried from start to end.
            let goodput = s.goodput_kbps.filter(|_| s.resumes == 0);
            (Some((s.sent, s.received)), goodput)
        }
        Err(e) => {
            tracing::warn!(session, peer = %req.peer, service = %req.service,
                "tunnel ended with an error: {e}");
            (None, None)
        }
    };
    // After a failed resume the session's end went out when its tunnel broke.
    if !reported {
        report_end(&shared, session, bytes, Some(rtt), goodput).await;
    }
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..6).map(|_| b.next_delay(0)).collect();
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[5], Duration::from_secs(1));
        assert!(b.next_delay(u64::MAX) < Duration::from_millis(1500));
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(100));
    }

    fn entry(id: &str) -> RelayMapEntry {
        RelayMapEntry {
            id: id.into(),
            tcp_addr: Some("127.0.0.1:1".into()),
            udp_addr: Some("127.0.0.1:2".into()),
            region: String::new(),
            location: None,
        }
    }

    /// The broker's bucket (`server.rs`): full at the start, refilled at the rate.
    struct BrokerBucket {
        tokens: f64,
        rate: f64,
        burst: f64,
        last: Instant,
    }

    impl BrokerBucket {
        fn take(&mut self, now: Instant) -> bool {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                true
            } else {
                false
            }
        }
    }

    #[test]
    fn paced_messages_stay_within_the_brokers_bucket() {
        let limits = api::ChannelLimits {
            messages_per_sec: 100,
            message_burst: 200,
            max_pending_connects: 16,
        };
        let t0 = Instant::now();
        let mut pacer = Pacer::new(&limits, t0);
        let mut broker = BrokerBucket {
            tokens: 200.0,
            rate: 100.0,
            burst: 200.0,
            last: t0,
        };
        // Send as fast as the pacer allows for 10 s; each message arrives after a delay that
        // varies between 0 and 300 ms (so some bunch up).
        let (mut now, mut sent, mut arrivals) = (t0, 0u32, Vec::new());
        while now < t0 + Duration::from_secs(10) {
            if let Some(at) = pacer.ready_at(now) {
                assert!(at > now);
                now = at;
                continue;
            }
            pacer.take(now);
            let delay = if sent % 50 < 25 { 300 } else { 0 };
            arrivals.push(now + Duration::from_millis(delay));
            sent += 1;
        }
        arrivals.sort();
        let dropped = arrivals.iter().filter(|&&t| !broker.take(t)).count();
        assert_eq!(dropped, 0, "the broker refused paced messages");
        // And the pacing is not needlessly slow: half the burst, then 90 % of the rate.
        assert!((900..=1000).contains(&sent), "{sent} messages in 10 s");
    }

    #[test]
    fn relay_map_pages_replace_when_complete() {
        let mut m = RelayMapPages::new(vec![entry("a")], 1);
        assert_eq!(m.relays().len(), 1);
        assert!(!m.page(vec![entry("b")], 0, 2));
        assert_eq!(m.relays()[0].id, "a");
        assert!(!m.page(vec![entry("x")], 3, 2), "out of order is ignored");
        assert!(m.page(vec![entry("c")], 1, 2));
        let ids: Vec<_> = m.relays().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        let t = targets(m.relays());
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].probe, Some("127.0.0.1:2".parse().unwrap()));
    }

    #[test]
    fn offers_follow_policy_and_services() {
        let mut cfg = AgentConfig::parse(
            "broker = \"ws://x:1\"\npeer_id = \"b\"\nkey_file = \"k\"\n[services]\nhttp = \"127.0.0.1:80\"\n",
            "t",
        )
        .unwrap();
        assert!(decide_offer(&cfg, "a", "http", TransportKind::Tcp).is_ok());
        let e = decide_offer(&cfg, "a", "ssh", TransportKind::Tcp).unwrap_err();
        assert!(e.contains("exposes: http"), "{e}");
        assert!(decide_offer(&cfg, "a", "http", TransportKind::Udp).is_err());
        cfg.offers.allow = vec!["c".into()];
        let e = decide_offer(&cfg, "a", "http", TransportKind::Tcp).unwrap_err();
        assert!(e.contains("offers.allow"), "{e}");
        assert!(decide_offer(&cfg, "c", "http", TransportKind::Tcp).is_ok());
    }

    #[test]
    fn urls_split_into_host_and_port() {
        assert_eq!(
            host_port("ws://127.0.0.1:7400/v1/agent"),
            Some(("127.0.0.1".into(), 7400, false))
        );
        assert_eq!(
            host_port("wss://b.example/v1/agent"),
            Some(("b.example".into(), 443, true))
        );
        assert_eq!(
            host_port("ws://[::1]:9/v1/agent"),
            Some(("::1".into(), 9, false))
        );
        assert_eq!(hex_vec("0aff"), Some(vec![10, 255]));
        assert_eq!(hex_vec("0"), None);
    }
}
