//! The broker's logic, sans-I/O: identities, who is online, the relays and their load, the
//! peers' reports (in the [`Selector`]), sessions and pending offers.
//!
//! Every method takes what happened and `now` (unix milliseconds) and returns the answer; what
//! must also happen elsewhere — messages to other connections, connections to close, records to
//! persist — is queued as [`Effects`] that the I/O layer takes with [`Core::take_effects`] and
//! carries out. Randomness (nonces, session ids) is passed in.
//!
//! What it does not do: no sockets, no clock, no store calls, no signing (connect returns the
//! unsigned tickets; the I/O layer signs them outside the lock).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use steelyard_proto::api::{
    self, AgentHello, AgentReport, ApiError, AuthProof, BrokerMessage, ConnectAnswer,
    ConnectRequest, ErrorCode, GeoLocation, LoadReport, OfferReply, OfferWithdrawn, RelayHello,
    RelayMapEntry, ReportNow, Role, Schedule, SessionEnded, TransportKind, WithdrawReason,
    NONCE_LEN,
};
use steelyard_proto::ticket::{is_valid_id, KeyId, SessionId, Side, Ticket, TicketLimits};
use steelyard_select::{
    Capacity, Decision, EndToEnd, Location, NoChoice, PathMetrics, PeerId, PeerReport, Policy,
    RelayId, RelayInfo, RelayLoad, Request, Selector, Timestamp, Transport,
};
use steelyard_store::{PeerRecord, RelayRecord, SessionRecord, SessionState, StoredLocation};

use crate::config::{BrokerConfig, LimitsConfig, ScheduleConfig, TicketConfig, TokenConfig};

/// Identifies one WebSocket connection (assigned by the I/O layer).
pub type ConnId = u64;

/// A durable change for the store.
#[derive(Clone, Debug, PartialEq)]
pub enum Persist {
    /// A peer record changed.
    Peer(PeerRecord),
    /// A relay record changed.
    Relay(RelayRecord),
    /// The policy changed (JSON text).
    Policy(String),
    /// A session changed.
    Session(SessionRecord),
}

/// What the I/O layer must do besides answering the caller.
#[derive(Debug, Default)]
pub struct Effects {
    /// Messages to other connections.
    pub send: Vec<(ConnId, BrokerMessage)>,
    /// Connections to close, with the error to send first.
    pub close: Vec<(ConnId, ApiError)>,
    /// Records to persist.
    pub persist: Vec<Persist>,
    /// The relay map changed: push it to every online agent.
    pub relay_map_changed: bool,
}

impl Effects {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.send.is_empty()
            && self.close.is_empty()
            && self.persist.is_empty()
            && !self.relay_map_changed
    }
}

#[derive(Debug)]
struct PeerState {
    record: PeerRecord,
    conn: Option<ConnId>,
    auto_accept: bool,
    last_report: Option<Timestamp>,
    online_since: Option<Timestamp>,
    asked_report_at: Option<Timestamp>,
    pending_connects: u32,
}

#[derive(Debug)]
struct RelayState {
    record: RelayRecord,
    conn: Option<ConnId>,
    last_load: Option<(LoadReport, Timestamp)>,
}

#[derive(Debug)]
struct LiveSession {
    record: SessionRecord,
    a_conn: ConnId,
    /// The connection B had when the offer went out.
    b_conn: ConnId,
    request_id: u64,
    /// Until B answers: A's answer, and when the offer times out.
    parked: Option<ConnectAnswer>,
    deadline: Option<Timestamp>,
    ended_by: u8,
}

/// What a successful connect produced; the I/O layer signs both tickets, sends the offer to B
/// and (at once, or after B accepts) the answer to A.
#[derive(Debug)]
pub struct ConnectPlan {
    /// The session.
    pub session_id: SessionId,
    /// B's connection.
    pub b_conn: ConnId,
    /// A's ticket, unsigned.
    pub ticket_a: Ticket,
    /// B's ticket, unsigned.
    pub ticket_b: Ticket,
    /// The relay's TCP address.
    pub relay_tcp_addr: Option<String>,
    /// The relay's UDP address.
    pub relay_udp_addr: Option<String>,
    /// Whether B must answer before A gets its answer.
    pub reply_expected: bool,
    /// A's Ed25519 public key as recorded at enrollment (hex), for B's offer.
    pub a_public_key: String,
    /// B's Ed25519 public key as recorded at enrollment (hex), for A's answer.
    pub b_public_key: String,
}

/// What an acceptor's reply to an offer came to, for the latency metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferAnswered {
    /// From the connect request (the offer was sent in the same step) to the reply, ms.
    pub round_trip_ms: u64,
    /// Whether the initiator got its answer with a relay now.
    pub answer_sent: bool,
}

/// A peer as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerView {
    /// The stored identity.
    #[serde(flatten)]
    pub record: PeerRecord,
    /// Connected now.
    pub online: bool,
    /// Age of its last report, ms.
    pub report_age_ms: Option<u64>,
    /// Relays in its last report.
    pub paths: usize,
    /// Connects waiting for the other side.
    pub pending_connects: u32,
}

/// A relay as the admin API shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RelayView {
    /// The stored record.
    #[serde(flatten)]
    pub record: RelayRecord,
    /// Connected now.
    pub online: bool,
    /// Its last load report.
    pub load: Option<LoadReport>,
    /// Age of that report, ms.
    pub load_age_ms: Option<u64>,
    /// Healthy: connected, reporting within the policy's relay timeout, not draining.
    pub healthy: bool,
}

/// Counts for metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Gauges {
    /// Enrolled peers.
    pub peers: usize,
    /// Peers connected.
    pub peers_online: usize,
    /// Relays registered.
    pub relays: usize,
    /// Relays connected.
    pub relays_online: usize,
    /// Sessions in memory.
    pub live_sessions: usize,
    /// Offers waiting for an answer.
    pub pending_offers: usize,
    /// Open WebSockets (filled in by the I/O layer; the core does not know sockets).
    pub websockets_open: usize,
}

/// The broker's state. See the module docs.
pub struct Core {
    selector: Selector,
    schedule: ScheduleConfig,
    tickets: TicketConfig,
    limits: LimitsConfig,
    tokens: Vec<TokenConfig>,
    key_id: KeyId,
    peers: HashMap<String, PeerState>,
    relays: BTreeMap<String, RelayState>,
    sessions: HashMap<SessionId, LiveSession>,
    /// Live sessions in creation order, for forgetting.
    session_order: std::collections::VecDeque<(Timestamp, SessionId)>,
    /// Offers waiting for B's answer, by the connection B had when the offer went out: what
    /// fails when that connection drops, and what the tick checks for timeouts.
    offers: BTreeSet<(ConnId, SessionId)>,
    relay_map: Vec<RelayMapEntry>,
    /// The relay map encoded as `RelayMap` messages, pages 0.., rebuilt when it changes.
    relay_map_encoded: Arc<Vec<String>>,
    effects: Effects,
}

fn err(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError::new(code, message)
}

fn location_in(loc: &Option<GeoLocation>) -> Option<Location> {
    loc.as_ref().map(|l| Location {
        lat: l.lat,
        lon: l.lon,
        region: l.region.clone(),
    })
}

fn stored_location(loc: &Option<GeoLocation>) -> Option<StoredLocation> {
    loc.as_ref().map(|l| StoredLocation {
        lat: l.lat,
        lon: l.lon,
        region: l.region.clone(),
    })
}

fn relay_info(r: &RelayRecord) -> RelayInfo {
    RelayInfo {
        id: RelayId::new(&r.id),
        location: r.location.as_ref().map(|l| Location {
            lat: l.lat,
            lon: l.lon,
            region: l.region.clone(),
        }),
        tier: r.tier,
        weight: r.weight,
        capacity: Capacity {
            max_sessions: r.max_sessions,
            max_bandwidth_kbps: r.max_bandwidth_kbps,
        },
    }
}

fn token_eq(a: &str, b: &str) -> bool {
    // Length may leak; content does not (no early exit).
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn unix_secs(now: Timestamp) -> u64 {
    now.millis() / 1000
}

fn transport_of(t: TransportKind) -> (Transport, steelyard_proto::ticket::Transport) {
    match t {
        TransportKind::Tcp => (Transport::Tcp, steelyard_proto::ticket::Transport::Tcp),
        TransportKind::Udp => (Transport::Udp, steelyard_proto::ticket::Transport::Udp),
    }
}

fn transport_name(t: TransportKind) -> &'static str {
    match t {
        TransportKind::Tcp => "tcp",
        TransportKind::Udp => "udp",
    }
}

/// The error for a message dropped for the message rate. It names the limit and carries the
/// dropped message's `request_id` when it has one (found without parsing the message: bounded
/// work, see [`api::request_id_of`]), so the agent fails that request at once instead of
/// waiting for an answer that will not come.
pub fn rate_limited(text: &str, limits: &LimitsConfig) -> ApiError {
    let e = err(
        ErrorCode::RateLimited,
        format!(
            "more than {} messages per second (burst {}): message dropped; pace messages under \
             the limits in the welcome, or ask the operator to raise [limits] messages_per_sec",
            limits.messages_per_sec, limits.message_burst
        ),
    );
    match api::request_id_of(text) {
        Some(id) => e.for_request(id),
        None => e,
    }
}

/// What the selector weighs of a relay's load report: sessions and pending ones together, both
/// directions' bandwidth, CPU, and whether it takes no new sessions.
fn select_load(load: &LoadReport, draining: bool) -> RelayLoad {
    RelayLoad {
        sessions: load.sessions.saturating_add(load.pending),
        bandwidth_kbps: load
            .bandwidth_in_kbps
            .saturating_add(load.bandwidth_out_kbps),
        cpu: load.cpu,
        draining,
    }
}

/// Maps a selection failure to the API error an initiator gets.
pub fn no_choice_error(e: &NoChoice) -> ApiError {
    let code = match e {
        NoChoice::SamePeer { .. } => ErrorCode::BadMessage,
        NoChoice::UnknownPeer { .. } | NoChoice::NoCommonRelay { .. } => ErrorCode::NoCommonRelay,
        NoChoice::NoUsableRelay { .. } | NoChoice::PinUnavailable { .. } => {
            ErrorCode::NoUsableRelay
        }
    };
    err(code, e.to_string())
}

impl Core {
    /// A core from `config`, the durable records the store holds, the stored policy (which
    /// wins over the config's), and the broker's ticket key id. Relays in the config are
    /// (re-)registered; their stored draining flag is kept.
    pub fn new(
        config: &BrokerConfig,
        stored_peers: Vec<PeerRecord>,
        stored_relays: Vec<RelayRecord>,
        stored_policy: Option<Policy>,
        key_id: KeyId,
        now: Timestamp,
    ) -> Result<Self, String> {
        let policy = stored_policy.unwrap_or_else(|| config.policy.clone());
        let selector = Selector::new(policy).map_err(|e| e.to_string())?;
        let mut core = Self {
            selector,
            schedule: config.schedule.clone(),
            tickets: config.tickets.clone(),
            limits: config.limits.clone(),
            tokens: config.enroll_tokens.clone(),
            key_id,
            peers: HashMap::with_capacity(stored_peers.len()),
            relays: BTreeMap::new(),
            sessions: HashMap::new(),
            session_order: Default::default(),
            offers: BTreeSet::new(),
            relay_map: Vec::new(),
            relay_map_encoded: Arc::new(Vec::new()),
            effects: Effects::default(),
        };
        for record in stored_peers {
            core.peers.insert(record.id.clone(), PeerState::new(record));
        }
        let mut relays: BTreeMap<String, RelayRecord> = stored_relays
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        for rc in &config.relays {
            let old = relays.get(&rc.id);
            let record = RelayRecord {
                id: rc.id.clone(),
                public_key: Some(rc.public_key.to_ascii_lowercase()),
                tcp_addr: rc.tcp_addr.clone(),
                udp_addr: rc.udp_addr.clone(),
                location: rc.location.as_ref().map(|l| StoredLocation {
                    lat: l.lat,
                    lon: l.lon,
                    region: l.region.clone(),
                }),
                max_sessions: rc.max_sessions,
                max_bandwidth_kbps: rc.max_bandwidth_kbps,
                tier: rc.tier,
                weight: rc.weight,
                draining: old.is_some_and(|o| o.draining),
                registered_at: old.map_or(now.millis(), |o| o.registered_at),
                source: "config".into(),
            };
            if old != Some(&record) {
                core.effects.persist.push(Persist::Relay(record.clone()));
            }
            relays.insert(rc.id.clone(), record);
        }
        for (id, record) in relays {
            core.selector
                .upsert_relay(relay_info(&record))
                .map_err(|e| e.to_string())?;
            core.relays.insert(
                id,
                RelayState {
                    record,
                    conn: None,
                    last_load: None,
                },
            );
        }
        core.rebuild_relay_map();
        Ok(core)
    }

    /// Takes the queued effects.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// The selection policy in force.
    pub fn policy(&self) -> &Policy {
        self.selector.policy()
    }

    /// Replaces the policy (validated) and persists it.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), ApiError> {
        self.selector
            .set_policy(policy)
            .map_err(|e| err(ErrorCode::BadMessage, e.to_string()))?;
        let json = serde_json::to_string(self.selector.policy())
            .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        self.effects.persist.push(Persist::Policy(json));
        Ok(())
    }

    /// The schedule agents get.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            interval_ms: self.schedule.interval_ms,
            jitter_ms: self.schedule.jitter_ms,
            rtt_change_ratio: self.schedule.rtt_change_ratio,
            on_reachability_change: true,
            on_relay_map_change: true,
        }
    }

    /// The relay map agents probe.
    pub fn relay_map(&self) -> &[RelayMapEntry] {
        &self.relay_map
    }

    /// The relay map as encoded `RelayMap` messages, page 0 first.
    pub fn relay_map_encoded(&self) -> Arc<Vec<String>> {
        self.relay_map_encoded.clone()
    }

    /// The welcome for an agent: schedule, the relay map's first page, the page count.
    pub fn welcome(
        &self,
        peer_id: &str,
        enrolled: bool,
        ticket_keys: Vec<api::PublicKeyInfo>,
    ) -> api::Welcome {
        let pages = api::relay_map_pages(&self.relay_map);
        api::Welcome {
            peer_id: peer_id.to_owned(),
            enrolled,
            schedule: self.schedule(),
            relays: pages[0].to_vec(),
            relay_map_pages: pages.len() as u32,
            ticket_keys,
            limits: Some(api::ChannelLimits {
                messages_per_sec: self.limits.messages_per_sec,
                message_burst: self.limits.message_burst.max(1),
                max_pending_connects: self.limits.max_pending_connects,
            }),
        }
    }

    fn rebuild_relay_map(&mut self) {
        self.relay_map = self
            .relays
            .values()
            .map(|r| RelayMapEntry {
                id: r.record.id.clone(),
                tcp_addr: r.record.tcp_addr.clone(),
                udp_addr: r.record.udp_addr.clone(),
                region: r
                    .record
                    .location
                    .as_ref()
                    .map(|l| l.region.clone())
                    .unwrap_or_default(),
                location: r.record.location.as_ref().map(|l| GeoLocation {
                    lat: l.lat,
                    lon: l.lon,
                    region: l.region.clone(),
                }),
            })
            .collect();
        let pages = api::relay_map_pages(&self.relay_map);
        let n = pages.len() as u32;
        self.relay_map_encoded = Arc::new(
            pages
                .into_iter()
                .enumerate()
                .map(|(i, page)| {
                    api::encode(&BrokerMessage::RelayMap(api::RelayMap {
                        relays: page.to_vec(),
                        page: i as u32,
                        pages: n,
                    }))
                })
                .collect(),
        );
        self.effects.relay_map_changed = true;
    }

    fn token_for(&self, role: Role, token: &str) -> Option<&TokenConfig> {
        self.tokens
            .iter()
            .find(|t| t.role == role && token_eq(&t.token, token))
    }

    // ---- agents ------------------------------------------------------------------------

    /// Checks an agent's hello and signed challenge; enrolls it when it presents a valid token
    /// and is unknown. Returns whether it was enrolled now.
    pub fn authenticate_agent(
        &mut self,
        hello: &AgentHello,
        nonce: &[u8; NONCE_LEN],
        proof: &AuthProof,
        now: Timestamp,
    ) -> Result<bool, ApiError> {
        let key_hex = verify_identity(
            hello.version,
            Role::Agent,
            &hello.peer_id,
            &hello.public_key,
            nonce,
            proof,
        )?;
        match self.peers.get(&hello.peer_id) {
            Some(p) if p.record.revoked => Err(err(
                ErrorCode::Revoked,
                format!("peer {} was revoked by the operator", hello.peer_id),
            )),
            Some(p) if p.record.public_key == key_hex => Ok(false),
            Some(_) => Err(err(
                ErrorCode::AuthFailed,
                format!(
                    "peer {} is enrolled with another key: use the key it enrolled with, or ask \
                     the operator to revoke it and enroll under a new name",
                    hello.peer_id
                ),
            )),
            None => {
                let Some(token) = &hello.enroll_token else {
                    return Err(err(
                        ErrorCode::BadToken,
                        format!(
                            "peer {} is not enrolled: connect once with an enrollment token",
                            hello.peer_id
                        ),
                    ));
                };
                let Some(token) = self.token_for(Role::Agent, token) else {
                    return Err(err(ErrorCode::BadToken, "unknown enrollment token"));
                };
                let record = PeerRecord {
                    id: hello.peer_id.clone(),
                    public_key: key_hex,
                    enrolled_at: now.millis(),
                    token_name: token.name.clone(),
                    revoked: false,
                    revoked_at: None,
                };
                self.effects.persist.push(Persist::Peer(record.clone()));
                self.peers
                    .insert(hello.peer_id.clone(), PeerState::new(record));
                Ok(true)
            }
        }
    }

    /// Marks an authenticated agent online on `conn`; an older connection of the same peer is
    /// closed with [`ErrorCode::Replaced`].
    pub fn agent_online(&mut self, peer: &str, conn: ConnId, auto_accept: bool, now: Timestamp) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.online_since = Some(now);
            if let Some(old) = p.conn.replace(conn) {
                self.effects.close.push((
                    old,
                    err(
                        ErrorCode::Replaced,
                        "another connection authenticated as this peer",
                    ),
                ));
            }
            p.auto_accept = auto_accept;
        }
    }

    /// Marks an agent's connection gone (if it is still the current one). Offers it made on
    /// that connection are withdrawn: nobody would get the answer. Offers made *to* it fail at
    /// once: their initiators get [`ErrorCode::PeerOffline`] instead of waiting for the offer
    /// timeout, and the relays' pending load is released.
    pub fn agent_offline(&mut self, peer: &str, conn: ConnId, now: Timestamp) {
        let to_it: Vec<SessionId> = self
            .offers
            .range((conn, SessionId([0; SessionId::LEN]))..)
            .take_while(|(c, _)| *c == conn)
            .map(|(_, id)| *id)
            .collect();
        for id in to_it {
            if let Some(s) = self.sessions.get(&id) {
                let message = format!(
                    "peer {} went offline before answering the offer; connect again when it is \
                     back",
                    s.record.to
                );
                self.effects.send.push((
                    s.a_conn,
                    BrokerMessage::Error(
                        err(ErrorCode::PeerOffline, message).for_request(s.request_id),
                    ),
                ));
            }
            // Nobody to tell: the connection that got the offer is gone.
            self.end_offer(id, None, now);
        }
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if p.conn == Some(conn) {
            p.conn = None;
        }
        // Only peers with offers in flight pay for the scan.
        if p.pending_connects > 0 {
            let mine: Vec<SessionId> = self
                .sessions
                .iter()
                .filter(|(_, s)| s.a_conn == conn && s.deadline.is_some())
                .map(|(id, _)| *id)
                .collect();
            for id in mine {
                self.end_offer(id, Some(WithdrawReason::InitiatorGone), now);
            }
        }
    }

    /// Revokes a peer: refused from now on; its connection is closed and its report dropped.
    pub fn revoke_peer(&mut self, peer: &str, now: Timestamp) -> Result<(), ApiError> {
        let p = self
            .peers
            .get_mut(peer)
            .ok_or_else(|| err(ErrorCode::UnknownPeer, format!("no peer {peer}")))?;
        p.record.revoked = true;
        p.record.revoked_at = Some(now.millis());
        self.effects.persist.push(Persist::Peer(p.record.clone()));
        if let Some(conn) = p.conn.take() {
            self.effects.close.push((
                conn,
                err(ErrorCode::Revoked, "this peer was revoked by the operator"),
            ));
        }
        self.selector.remove_peer(peer);
        Ok(())
    }

    /// Records an agent's report. Checks sizes, ranges and relay ids; a bad report changes
    /// nothing. Returns the number of paths recorded.
    pub fn agent_report(
        &mut self,
        peer: &str,
        report: AgentReport,
        now: Timestamp,
    ) -> Result<u32, ApiError> {
        if report.paths.len() > api::MAX_REPORT_PATHS {
            return Err(err(
                ErrorCode::InvalidReport,
                format!(
                    "{} paths exceed the limit of {}",
                    report.paths.len(),
                    api::MAX_REPORT_PATHS
                ),
            ));
        }
        let expire_ms = self.selector.policy().freshness.path_expire_secs * 1000;
        let mut paths = Vec::with_capacity(report.paths.len());
        for p in report.paths {
            if !self.relays.contains_key(&p.relay) {
                return Err(err(
                    ErrorCode::InvalidReport,
                    format!("relay {:?} is not in the relay map", p.relay),
                ));
            }
            let metrics = PathMetrics {
                rtt_ms: p.rtt_ms,
                hops: p.hops,
                loss: p.loss,
                bandwidth_kbps: p.bandwidth_kbps,
                udp: p.udp,
                tcp: p.tcp,
                measured_at: Timestamp::from_millis(
                    now.millis().saturating_sub(p.age_ms.min(expire_ms + 1)),
                ),
            };
            paths.push((RelayId::new(&p.relay), metrics));
        }
        let n = paths.len() as u32;
        self.selector
            .peer_report(PeerReport {
                peer: PeerId::new(peer),
                location: location_in(&report.location),
                paths,
            })
            .map_err(|e| err(ErrorCode::InvalidReport, e.to_string()))?;
        if let Some(p) = self.peers.get_mut(peer) {
            p.last_report = Some(now);
            p.asked_report_at = None;
        }
        Ok(n)
    }

    /// Asks `peer` for a fresh report if its last one is stale and it was not asked within the
    /// last interval.
    fn maybe_ask_report(&mut self, peer: &str, now: Timestamp, reason: &str) {
        let (interval, stale) = (self.schedule.interval_ms, self.schedule.stale_after_ms);
        if let Some(p) = self.peers.get_mut(peer) {
            if let Some(m) = p.ask_report(now, reason, interval, stale) {
                self.effects.send.push(m);
            }
        }
    }

    /// Decides without creating anything: the explanation for `GET /v1/explain`.
    pub fn explain(
        &self,
        from: &str,
        to: &str,
        transport: TransportKind,
        now: Timestamp,
    ) -> Result<Decision, NoChoice> {
        let request = Request {
            from: PeerId::new(from),
            to: PeerId::new(to),
            transport: transport_of(transport).0,
            current: None,
        };
        self.selector
            .decide(&request, now)
            .map(Decision::with_reported_figures)
    }

    /// Peer `from` (on `a_conn`) asks for a session. Decides, creates the session and its
    /// tickets, and counts the assignment against the relay.
    pub fn connect(
        &mut self,
        from: &str,
        a_conn: ConnId,
        req: &ConnectRequest,
        session_id: SessionId,
        now: Timestamp,
    ) -> Result<ConnectPlan, ApiError> {
        let fail = |code, m: String| Err(err(code, m).for_request(req.request_id));
        if !is_valid_id(&req.to) {
            return fail(ErrorCode::BadMessage, "to must be a peer id".into());
        }
        if req.to == from {
            return fail(
                ErrorCode::BadMessage,
                "a peer cannot connect to itself".into(),
            );
        }
        if !req.service.is_empty() && !is_valid_id(&req.service) {
            return fail(
                ErrorCode::BadMessage,
                "service must be 1 to 64 bytes of [A-Za-z0-9._-], or empty".into(),
            );
        }
        if req.avoid.len() > api::MAX_AVOID_RELAYS || !req.avoid.iter().all(|r| is_valid_id(r)) {
            return fail(
                ErrorCode::BadMessage,
                format!(
                    "avoid must list at most {} relay ids",
                    api::MAX_AVOID_RELAYS
                ),
            );
        }
        let b_conn = match self.peers.get(&req.to) {
            None => return fail(ErrorCode::UnknownPeer, format!("no peer named {}", req.to)),
            Some(b) if b.record.revoked => {
                return fail(ErrorCode::UnknownPeer, format!("no peer named {}", req.to))
            }
            Some(b) => match b.conn {
                None => {
                    return fail(
                        ErrorCode::PeerOffline,
                        format!("peer {} is not connected to the broker", req.to),
                    )
                }
                Some(c) => c,
            },
        };
        let b_auto = self.peers[&req.to].auto_accept;
        let pending = self.peers.get(from).map_or(0, |p| p.pending_connects);
        if !b_auto && pending >= self.limits.max_pending_connects {
            return fail(
                ErrorCode::TooManyPending,
                format!(
                    "{pending} connect requests are already waiting for an answer (limit {})",
                    self.limits.max_pending_connects
                ),
            );
        }
        self.maybe_ask_report(from, now, "connect");
        self.maybe_ask_report(&req.to, now, "connect");
        let (transport, ticket_transport) = transport_of(req.transport);
        let request = Request {
            from: PeerId::new(from),
            to: PeerId::new(&req.to),
            transport,
            current: None,
        };
        let decision = self
            .selector
            .decide(&request, now)
            .map_err(|e| no_choice_error(&e).for_request(req.request_id))?;
        // A relay the requester just lost a tunnel through is skipped even if the broker has
        // not noticed yet; the next one in rank order takes the session. If every usable relay
        // is avoided, the winner takes it anyway: the broker still sees it connected and
        // reporting (a dead relay's channel drop already took it out of the ranking), so the
        // requester's loss was likely a stall, and refusing would end a tunnel that can resume.
        let avoided = |r: &str| req.avoid.iter().any(|a| a == r);
        let relay = decision
            .ranked
            .iter()
            .find(|c| !avoided(c.relay.as_str()))
            .map_or_else(|| decision.winner.clone(), |c| c.relay.clone());
        self.selector
            .record_assignment(relay.as_str(), now)
            .map_err(|e| err(ErrorCode::Internal, e.to_string()).for_request(req.request_id))?;
        let relay_state = &self.relays[relay.as_str()];
        let issued_at = unix_secs(now);
        let limits = TicketLimits {
            max_bytes_per_sec: self.tickets.max_bytes_per_sec,
            max_total_bytes: self.tickets.max_total_bytes,
            idle_timeout_secs: self.tickets.idle_timeout_secs,
        };
        let ticket = |side, peer: &str| Ticket {
            key_id: self.key_id,
            session_id,
            relay_id: relay.to_string(),
            side,
            peer_id: peer.to_owned(),
            issued_at,
            expires_at: issued_at + self.tickets.lifetime_secs,
            limits,
            transport: ticket_transport,
        };
        let plan = ConnectPlan {
            session_id,
            b_conn,
            ticket_a: ticket(Side::A, from),
            ticket_b: ticket(Side::B, &req.to),
            relay_tcp_addr: relay_state.record.tcp_addr.clone(),
            relay_udp_addr: relay_state.record.udp_addr.clone(),
            reply_expected: !b_auto,
            a_public_key: self
                .peers
                .get(from)
                .map(|p| p.record.public_key.clone())
                .unwrap_or_default(),
            b_public_key: self.peers[&req.to].record.public_key.clone(),
        };
        let record = SessionRecord {
            id: session_id.to_string(),
            from: from.to_owned(),
            to: req.to.clone(),
            relay: relay.to_string(),
            transport: transport_name(req.transport).into(),
            state: if b_auto {
                SessionState::Active
            } else {
                SessionState::Offered
            },
            created_at: now.millis(),
            ended_at: None,
            bytes_a_to_b: 0,
            bytes_b_to_a: 0,
            end_to_end_rtt_ms: None,
        };
        self.effects.persist.push(Persist::Session(record.clone()));
        if !b_auto {
            if let Some(p) = self.peers.get_mut(from) {
                p.pending_connects += 1;
            }
            self.offers.insert((b_conn, session_id));
        }
        self.remember_session(
            session_id,
            LiveSession {
                record,
                a_conn,
                b_conn,
                request_id: req.request_id,
                parked: None,
                deadline: (!b_auto).then(|| now.plus_ms(self.limits.offer_timeout_ms)),
                ended_by: 0,
            },
            now,
        );
        Ok(plan)
    }

    fn remember_session(&mut self, id: SessionId, s: LiveSession, now: Timestamp) {
        while self.sessions.len() >= self.limits.max_live_sessions {
            match self.session_order.pop_front() {
                Some((_, old)) => {
                    self.forget_session(old);
                }
                None => break,
            }
        }
        self.sessions.insert(id, s);
        self.session_order.push_back((now, id));
    }

    fn forget_session(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(&id) {
            if s.deadline.is_some() {
                self.resolve_pending(&s.record.from, s.b_conn, id);
            }
        }
    }

    /// Ends a pending offer that will not be answered: the session is refused, its relay's
    /// pending load released, and B (if still connected and `reason` is given) told to drop
    /// what it prepared.
    fn end_offer(&mut self, id: SessionId, reason: Option<WithdrawReason>, now: Timestamp) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.deadline.take().is_none() {
            return;
        }
        s.parked = None;
        s.record.state = SessionState::Refused;
        s.record.ended_at = Some(now.millis());
        self.selector
            .release_assignment(&s.record.relay, Timestamp::from_millis(s.record.created_at));
        let record = s.record.clone();
        let b_conn = s.b_conn;
        if let Some(reason) = reason {
            if let Some(b_now) = self.peers.get(&record.to).and_then(|b| b.conn) {
                self.effects.send.push((
                    b_now,
                    BrokerMessage::OfferWithdrawn(OfferWithdrawn {
                        session_id: record.id.clone(),
                        reason,
                    }),
                ));
            }
        }
        let from = record.from.clone();
        self.effects.persist.push(Persist::Session(record));
        self.resolve_pending(&from, b_conn, id);
    }

    /// An offer is no longer pending: it stops counting against its initiator.
    fn resolve_pending(&mut self, from: &str, b_conn: ConnId, id: SessionId) {
        self.offers.remove(&(b_conn, id));
        if let Some(p) = self.peers.get_mut(from) {
            p.pending_connects = p.pending_connects.saturating_sub(1);
        }
    }

    /// Keeps A's signed answer until B accepts.
    pub fn park_answer(&mut self, session_id: SessionId, answer: ConnectAnswer) {
        if let Some(s) = self.sessions.get_mut(&session_id) {
            if s.deadline.is_some() {
                s.parked = Some(answer);
            }
        }
    }

    /// B's answer to an offer: queues A's answer (accepted) or a `refused` error for A.
    pub fn offer_reply(
        &mut self,
        by: &str,
        reply: &OfferReply,
        now: Timestamp,
    ) -> Result<OfferAnswered, ApiError> {
        let id: SessionId = reply
            .session_id
            .parse()
            .map_err(|_| err(ErrorCode::BadMessage, "session_id must be 32 hex digits"))?;
        let s = match self.sessions.get_mut(&id) {
            Some(s) if s.record.to == by && s.deadline.is_some() => s,
            _ => {
                return Err(err(
                    ErrorCode::UnknownSession,
                    format!("no offer {} waits for an answer from you", reply.session_id),
                ))
            }
        };
        s.deadline = None;
        let (a_conn, b_conn) = (s.a_conn, s.b_conn);
        let answered = OfferAnswered {
            round_trip_ms: Timestamp::from_millis(s.record.created_at).age_ms(now),
            answer_sent: reply.accept && s.parked.is_some(),
        };
        let message = if reply.accept {
            s.record.state = SessionState::Active;
            match s.parked.take() {
                Some(answer) => BrokerMessage::ConnectAnswer(answer),
                None => BrokerMessage::Error(
                    err(
                        ErrorCode::Internal,
                        "the answer was not ready; connect again",
                    )
                    .for_request(s.request_id),
                ),
            }
        } else {
            s.record.state = SessionState::Refused;
            s.record.ended_at = Some(now.millis());
            // The session will never reach its relay: stop counting it as the relay's load.
            self.selector
                .release_assignment(&s.record.relay, Timestamp::from_millis(s.record.created_at));
            BrokerMessage::Error(
                err(
                    ErrorCode::Refused,
                    format!(
                        "peer {by} refused{}",
                        reply
                            .reason
                            .as_deref()
                            .map(|r| format!(": {}", r.chars().take(200).collect::<String>()))
                            .unwrap_or_default()
                    ),
                )
                .for_request(s.request_id),
            )
        };
        let record = s.record.clone();
        let from = record.from.clone();
        self.effects.persist.push(Persist::Session(record));
        self.effects.send.push((a_conn, message));
        self.resolve_pending(&from, b_conn, id);
        Ok(answered)
    }

    /// A side reports that a session ended, with bytes and an optional end-to-end measurement.
    pub fn session_ended(
        &mut self,
        by: &str,
        ended: &SessionEnded,
        now: Timestamp,
    ) -> Result<(), ApiError> {
        let id: SessionId = ended
            .session_id
            .parse()
            .map_err(|_| err(ErrorCode::BadMessage, "session_id must be 32 hex digits"))?;
        let s = match self.sessions.get_mut(&id) {
            Some(s) if s.record.from == by || s.record.to == by => s,
            _ => {
                return Err(err(
                    ErrorCode::UnknownSession,
                    format!("no session {} of yours is known", ended.session_id),
                ))
            }
        };
        let a_side = s.record.from == by;
        let bit = if a_side { 1 } else { 2 };
        if s.ended_by & bit != 0 {
            return Err(err(
                ErrorCode::BadMessage,
                "this side already reported the session's end",
            ));
        }
        s.ended_by |= bit;
        if a_side {
            s.record.bytes_a_to_b = ended.bytes_sent;
        } else {
            s.record.bytes_b_to_a = ended.bytes_sent;
        }
        s.record.state = SessionState::Ended;
        s.record.ended_at.get_or_insert(now.millis());
        let record = s.record.clone();
        if let Some(m) = &ended.end_to_end {
            let metrics = EndToEnd {
                rtt_ms: m.rtt_ms,
                loss: m.loss,
                bandwidth_kbps: m.bandwidth_kbps,
                measured_at: Timestamp::from_millis(now.millis().saturating_sub(m.age_ms)),
            };
            self.selector
                .end_to_end(
                    &PeerId::new(&record.from),
                    &PeerId::new(&record.to),
                    &RelayId::new(&record.relay),
                    metrics,
                )
                .map_err(|e| err(ErrorCode::InvalidReport, e.to_string()))?;
            if let Some(s) = self.sessions.get_mut(&id) {
                s.record.end_to_end_rtt_ms = Some(m.rtt_ms);
            }
        }
        let record = self.sessions.get(&id).map_or(record, |s| s.record.clone());
        self.effects.persist.push(Persist::Session(record));
        Ok(())
    }

    // ---- relays ------------------------------------------------------------------------

    /// Checks a relay's hello and signed challenge; registers it when it presents a valid
    /// relay token and is unknown. Updates addresses, location and capacity from the hello.
    pub fn authenticate_relay(
        &mut self,
        hello: &RelayHello,
        nonce: &[u8; NONCE_LEN],
        proof: &AuthProof,
        now: Timestamp,
    ) -> Result<bool, ApiError> {
        let key_hex = verify_identity(
            hello.version,
            Role::Relay,
            &hello.relay_id,
            &hello.public_key,
            nonce,
            proof,
        )?;
        let enrolled;
        let mut record = match self.relays.get(&hello.relay_id) {
            Some(r) if r.record.public_key.as_deref() == Some(key_hex.as_str()) => {
                enrolled = false;
                r.record.clone()
            }
            Some(_) => {
                return Err(err(
                    ErrorCode::AuthFailed,
                    format!("relay {} is registered with another key", hello.relay_id),
                ))
            }
            None => {
                let Some(token) = &hello.enroll_token else {
                    return Err(err(
                        ErrorCode::BadToken,
                        format!(
                            "relay {} is not registered: list it in the broker config or present \
                             a relay enrollment token",
                            hello.relay_id
                        ),
                    ));
                };
                if self.token_for(Role::Relay, token).is_none() {
                    return Err(err(ErrorCode::BadToken, "unknown relay enrollment token"));
                }
                let Some(capacity) = &hello.capacity else {
                    return Err(err(
                        ErrorCode::BadMessage,
                        "a relay enrolling must state its capacity",
                    ));
                };
                enrolled = true;
                RelayRecord {
                    id: hello.relay_id.clone(),
                    public_key: Some(key_hex),
                    tcp_addr: None,
                    udp_addr: None,
                    location: None,
                    max_sessions: capacity.max_sessions,
                    max_bandwidth_kbps: capacity.max_bandwidth_kbps,
                    tier: 0,
                    weight: 1.0,
                    draining: false,
                    registered_at: now.millis(),
                    source: "enrolled".into(),
                }
            }
        };
        let before = record.clone();
        if hello.tcp_addr.is_some() {
            record.tcp_addr = hello.tcp_addr.clone();
        }
        if hello.udp_addr.is_some() {
            record.udp_addr = hello.udp_addr.clone();
        }
        if hello.location.is_some() {
            record.location = stored_location(&hello.location);
        }
        if let Some(c) = &hello.capacity {
            record.max_sessions = c.max_sessions;
            record.max_bandwidth_kbps = c.max_bandwidth_kbps;
        }
        if enrolled || record != before {
            self.selector
                .upsert_relay(relay_info(&record))
                .map_err(|e| err(ErrorCode::BadMessage, e.to_string()))?;
            self.effects.persist.push(Persist::Relay(record.clone()));
            self.relays
                .entry(record.id.clone())
                .and_modify(|r| r.record = record.clone())
                .or_insert(RelayState {
                    record,
                    conn: None,
                    last_load: None,
                });
            self.rebuild_relay_map();
        }
        Ok(enrolled)
    }

    /// Marks a relay online on `conn`, closing an older connection.
    pub fn relay_online(&mut self, relay: &str, conn: ConnId) {
        if let Some(r) = self.relays.get_mut(relay) {
            if let Some(old) = r.conn.replace(conn) {
                self.effects.close.push((
                    old,
                    err(
                        ErrorCode::Replaced,
                        "another connection authenticated as this relay",
                    ),
                ));
            }
        }
    }

    /// Marks a relay's connection gone, and stops offering the relay at once: a relay whose
    /// channel dropped has most likely died, and a new session through it would fail. Its last
    /// load report is kept but counts as draining until the relay reports again (the first
    /// report after it reconnects ends that).
    pub fn relay_offline(&mut self, relay: &str, conn: ConnId) {
        let Some(r) = self.relays.get_mut(relay) else {
            return;
        };
        if r.conn != Some(conn) {
            return;
        }
        r.conn = None;
        let Some((load, at)) = r.last_load.clone() else {
            return;
        };
        // Cannot fail: the relay is registered and this load was accepted before.
        let _ = self
            .selector
            .relay_report(relay, select_load(&load, true), at);
    }

    /// Records a relay's load report.
    pub fn relay_load(
        &mut self,
        relay: &str,
        load: LoadReport,
        now: Timestamp,
    ) -> Result<(), ApiError> {
        let r = self
            .relays
            .get_mut(relay)
            .ok_or_else(|| err(ErrorCode::Internal, "relay vanished"))?;
        if let Some(c) = &load.capacity {
            if c.max_sessions != r.record.max_sessions
                || c.max_bandwidth_kbps != r.record.max_bandwidth_kbps
            {
                r.record.max_sessions = c.max_sessions;
                r.record.max_bandwidth_kbps = c.max_bandwidth_kbps;
                self.effects.persist.push(Persist::Relay(r.record.clone()));
                self.selector
                    .upsert_relay(relay_info(&r.record))
                    .map_err(|e| err(ErrorCode::BadMessage, e.to_string()))?;
            }
        }
        let weighed = select_load(&load, load.draining || r.record.draining);
        self.selector
            .relay_report(relay, weighed, now)
            .map_err(|e| err(ErrorCode::InvalidReport, e.to_string()))?;
        if let Some(r) = self.relays.get_mut(relay) {
            r.last_load = Some((load, now));
        }
        Ok(())
    }

    /// Drains (or undrains) a relay: no new sessions go to it.
    pub fn drain_relay(&mut self, relay: &str, draining: bool) -> Result<(), ApiError> {
        let r = self
            .relays
            .get_mut(relay)
            .ok_or_else(|| err(ErrorCode::BadMessage, format!("no relay {relay}")))?;
        r.record.draining = draining;
        self.effects.persist.push(Persist::Relay(r.record.clone()));
        if let Some((load, at)) = r.last_load.clone() {
            let select_load = RelayLoad {
                sessions: load.sessions.saturating_add(load.pending),
                bandwidth_kbps: load
                    .bandwidth_in_kbps
                    .saturating_add(load.bandwidth_out_kbps),
                cpu: load.cpu,
                draining: load.draining || draining,
            };
            self.selector
                .relay_report(relay, select_load, at)
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        }
        Ok(())
    }

    // ---- time ---------------------------------------------------------------------------

    /// Periodic work: offers past their deadline fail with `timeout`; online peers with stale
    /// reports are asked for a fresh one; expired selection data and old sessions are
    /// forgotten.
    pub fn tick(&mut self, now: Timestamp) {
        // Only pending offers are looked at, not every live session.
        let expired: Vec<SessionId> = self
            .offers
            .iter()
            .filter(|(_, id)| {
                self.sessions
                    .get(id)
                    .is_some_and(|s| s.deadline.is_some_and(|d| d <= now))
            })
            .map(|(_, id)| *id)
            .collect();
        for id in expired {
            if let Some(s) = self.sessions.get(&id) {
                let (a_conn, request_id) = (s.a_conn, s.request_id);
                let message = format!("peer {} did not answer the offer in time", s.record.to);
                self.effects.send.push((
                    a_conn,
                    BrokerMessage::Error(err(ErrorCode::Timeout, message).for_request(request_id)),
                ));
            }
            self.end_offer(id, Some(WithdrawReason::Timeout), now);
        }
        let (interval, stale) = (self.schedule.interval_ms, self.schedule.stale_after_ms);
        for p in self.peers.values_mut() {
            if let Some(m) = p.ask_report(now, "stale", interval, stale) {
                self.effects.send.push(m);
            }
        }
        let forget_ms = self.limits.session_memory_secs * 1000;
        while let Some((at, id)) = self.session_order.front().copied() {
            if at.age_ms(now) < forget_ms {
                break;
            }
            self.session_order.pop_front();
            self.forget_session(id);
        }
        self.selector.prune(now);
    }

    // ---- views --------------------------------------------------------------------------

    /// Whether `peer` is enrolled and not revoked.
    pub fn peer_active(&self, peer: &str) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.record.revoked)
    }

    /// Connections of online agents.
    pub fn online_agents(&self) -> Vec<ConnId> {
        self.peers.values().filter_map(|p| p.conn).collect()
    }

    /// Every peer, by id.
    pub fn peers(&self, now: Timestamp) -> Vec<PeerView> {
        let mut out: Vec<PeerView> = self
            .peers
            .values()
            .map(|p| PeerView {
                record: p.record.clone(),
                online: p.conn.is_some(),
                report_age_ms: p.last_report.map(|t| t.age_ms(now)),
                paths: self.selector.peer_path_count(&p.record.id).unwrap_or(0),
                pending_connects: p.pending_connects,
            })
            .collect();
        out.sort_by(|a, b| a.record.id.cmp(&b.record.id));
        out
    }

    /// Every relay, by id.
    pub fn relays(&self, now: Timestamp) -> Vec<RelayView> {
        let timeout = self.selector.policy().freshness.relay_timeout_secs * 1000;
        self.relays
            .values()
            .map(|r| {
                let age = r.last_load.as_ref().map(|(_, t)| t.age_ms(now));
                RelayView {
                    record: r.record.clone(),
                    online: r.conn.is_some(),
                    load: r.last_load.as_ref().map(|(l, _)| l.clone()),
                    load_age_ms: age,
                    healthy: r.conn.is_some()
                        && age.is_some_and(|a| a <= timeout)
                        && !r.record.draining
                        && !r.last_load.as_ref().is_some_and(|(l, _)| l.draining),
                }
            })
            .collect()
    }

    /// Live sessions, newest first, at most `limit`.
    pub fn live_sessions(&self, limit: usize) -> Vec<SessionRecord> {
        self.session_order
            .iter()
            .rev()
            .filter_map(|(_, id)| self.sessions.get(id).map(|s| s.record.clone()))
            .take(limit)
            .collect()
    }

    /// Counts for metrics.
    pub fn gauges(&self) -> Gauges {
        Gauges {
            peers: self.peers.len(),
            peers_online: self.peers.values().filter(|p| p.conn.is_some()).count(),
            relays: self.relays.len(),
            relays_online: self.relays.values().filter(|r| r.conn.is_some()).count(),
            live_sessions: self.sessions.len(),
            pending_offers: self.offers.len(),
            websockets_open: 0,
        }
    }
}

impl PeerState {
    /// A request for a fresh report if this peer is online, its last report is stale and it
    /// was not asked within the last interval.
    fn ask_report(
        &mut self,
        now: Timestamp,
        reason: &str,
        interval: u64,
        stale: u64,
    ) -> Option<(ConnId, BrokerMessage)> {
        let conn = self.conn?;
        // Staleness counts from the last report; a peer that never reported counts from when
        // it came online (it reports on its schedule), except when a connect needs it now.
        let since = match (self.last_report, reason) {
            (Some(t), _) => Some(t),
            (None, "connect") => None,
            (None, _) => self.online_since,
        };
        let is_stale = since.is_none_or(|t| t.age_ms(now) >= stale);
        let asked_recently = self
            .asked_report_at
            .is_some_and(|t| t.age_ms(now) < interval);
        if !is_stale || asked_recently {
            return None;
        }
        self.asked_report_at = Some(now);
        Some((
            conn,
            BrokerMessage::ReportNow(ReportNow {
                reason: reason.to_owned(),
            }),
        ))
    }

    fn new(record: PeerRecord) -> Self {
        Self {
            record,
            conn: None,
            auto_accept: false,
            last_report: None,
            online_since: None,
            asked_report_at: None,
            pending_connects: 0,
        }
    }
}

/// Checks a hello's version, id and key, and that `proof` signs the challenge with that key for
/// `role`; returns the key in hex, as it is recorded.
fn verify_identity(
    version: u32,
    role: Role,
    id: &str,
    public_key: &str,
    nonce: &[u8; NONCE_LEN],
    proof: &AuthProof,
) -> Result<String, ApiError> {
    check_version(version)?;
    if !is_valid_id(id) {
        let what = match role {
            Role::Relay => "relay_id must be 1 to 64 bytes of [A-Za-z0-9._-]",
            Role::Agent => "peer_id must be 1 to 64 bytes of [A-Za-z0-9._-]",
        };
        return Err(err(ErrorCode::BadMessage, what));
    }
    let key = api::parse_public_key(public_key)?;
    api::verify_auth(&key, role, id, nonce, proof)?;
    Ok(api::public_key_hex(&key))
}

fn check_version(version: u32) -> Result<(), ApiError> {
    if version != api::API_VERSION {
        return Err(err(
            ErrorCode::UnsupportedVersion,
            format!(
                "API version {version} is not supported; this broker speaks version {}",
                api::API_VERSION
            ),
        ));
    }
    Ok(())
}
