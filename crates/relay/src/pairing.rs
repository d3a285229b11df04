//! Sans-I/O TCP pairing: ticket checks, replay protection, waiting first sides, capacity.
//!
//! [`Pairing`] takes a hello's ticket bytes, the client's IP address and `now` (unix
//! milliseconds), and answers: refused with a [`StatusCode`], waiting for the other side, or
//! paired with the first side's waiter. It owns no sockets, clocks or tasks: the caller passes
//! a `waiter` value (the I/O layer uses a channel to the waiting connection's task; tests use a
//! number) and gets it back when the partner arrives or the wait is cancelled.
//!
//! What it does **not** do: read or write bytes, time anything out by itself (the caller calls
//! [`Pairing::cancel`] or [`Pairing::expire`]), or count bytes.
//!
//! Bounds: waiting sides at most `max_pending_total` and `max_pending_per_ip` per IP; remembered
//! tickets at most `max_remembered_tickets` (each about 100 bytes with index overhead).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketError, Transport};

use crate::keys::{TrustedKeys, VerifyError};
use crate::wire::StatusCode;

/// Maps a verification failure to its wire status code.
pub fn status_for(err: &VerifyError) -> StatusCode {
    match err {
        VerifyError::NotReady => StatusCode::NotReady,
        VerifyError::Ticket(e) => ticket_status(e),
    }
}

fn ticket_status(err: &TicketError) -> StatusCode {
    match err {
        TicketError::Malformed { .. } | TicketError::Invalid { .. } => StatusCode::Malformed,
        TicketError::Forged { .. } => StatusCode::Forged,
        TicketError::Expired { .. } => StatusCode::Expired,
        TicketError::NotYetValid { .. } => StatusCode::NotYetValid,
        TicketError::WrongRelay { .. } => StatusCode::WrongRelay,
    }
}

/// Remembers which `(session, side)` tickets were used, until they expire (plus skew).
///
/// Bounded: at most `capacity` entries; [`ReplayGuard::insert`] fails when full.
#[derive(Debug)]
pub struct ReplayGuard {
    used: HashSet<(SessionId, Side)>,
    by_expiry: BTreeSet<(u64, SessionId, Side)>,
    skew_secs: u64,
    capacity: usize,
}

impl ReplayGuard {
    /// A guard for at most `capacity` tickets that forgets them `skew_secs` after expiry.
    pub fn new(capacity: usize, skew_secs: u64) -> Self {
        Self {
            used: HashSet::new(),
            by_expiry: BTreeSet::new(),
            skew_secs,
            capacity,
        }
    }

    /// Whether this side of this session was already used.
    pub fn contains(&self, session: SessionId, side: Side) -> bool {
        self.used.contains(&(session, side))
    }

    /// Records a use; `false` if the guard is full (the caller must refuse the ticket).
    pub fn insert(&mut self, ticket: &Ticket) -> bool {
        if self.used.len() >= self.capacity {
            return false;
        }
        let key = (ticket.session_id, ticket.side);
        if self.used.insert(key) {
            let forget_at = ticket.expires_at.saturating_add(self.skew_secs);
            self.by_expiry.insert((forget_at, key.0, key.1));
        }
        true
    }

    /// Forgets tickets whose expiry plus skew is at or before `now_secs`.
    pub fn prune(&mut self, now_secs: u64) {
        while let Some(&(at, sid, side)) = self.by_expiry.first() {
            if at > now_secs {
                break;
            }
            self.by_expiry.pop_first();
            self.used.remove(&(sid, side));
        }
    }

    /// Number of remembered tickets.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }
}

/// Settings of [`Pairing`].
#[derive(Debug, Clone)]
pub struct PairingConfig {
    /// This relay's id.
    pub relay_id: String,
    /// Most sessions (paired + waiting) at once.
    pub max_sessions: usize,
    /// Most waiting first sides in total.
    pub max_pending_total: usize,
    /// Most waiting first sides per IP address.
    pub max_pending_per_ip: usize,
    /// Most remembered tickets.
    pub max_remembered_tickets: usize,
    /// How long a first side may wait, in milliseconds.
    pub pair_timeout_ms: u64,
}

/// Identifies one waiting first side, so that a late cancel cannot remove a newer entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PendingToken(pub u64);

/// A refused hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code sent to the client.
    pub code: StatusCode,
    /// Why, for logs.
    pub reason: String,
}

/// What to do with a hello.
#[derive(Debug)]
pub enum HelloOutcome<W> {
    /// Send the code and close.
    Refused(Refusal),
    /// This is the first side: send [`StatusCode::Waiting`] and wait until the waiter is
    /// called, or until `deadline_ms`, then [`Pairing::cancel`].
    Waiting {
        /// This side's verified ticket.
        ticket: Ticket,
        /// Names this wait for [`Pairing::cancel`].
        token: PendingToken,
        /// When to give up, unix milliseconds.
        deadline_ms: u64,
    },
    /// This is the second side: hand this connection to `waiter` (the first side). The session
    /// now counts as active until [`Pairing::session_ended`].
    Paired {
        /// This side's verified ticket.
        ticket: Ticket,
        /// The first side's ticket.
        first: Ticket,
        /// The first side's waiter.
        waiter: W,
    },
}

struct Pending<W> {
    side: Side,
    ip: IpAddr,
    ticket: Ticket,
    token: PendingToken,
    deadline_ms: u64,
    waiter: W,
}

/// The TCP pairing state machine. See the [module docs](self).
pub struct Pairing<W> {
    keys: TrustedKeys,
    cfg: PairingConfig,
    replay: ReplayGuard,
    pending: HashMap<SessionId, Pending<W>>,
    pending_per_ip: HashMap<IpAddr, usize>,
    active: usize,
    next_token: u64,
    draining: bool,
}

impl<W> Pairing<W> {
    /// A pairing core trusting `keys` (a [`TicketVerifier`](steelyard_proto::ticket::TicketVerifier)
    /// converts into pinned keys).
    pub fn new(keys: impl Into<TrustedKeys>, cfg: PairingConfig) -> Self {
        let keys = keys.into();
        let replay = ReplayGuard::new(cfg.max_remembered_tickets, keys.max_clock_skew_secs());
        Self {
            keys,
            cfg,
            replay,
            pending: HashMap::new(),
            pending_per_ip: HashMap::new(),
            active: 0,
            next_token: 1,
            draining: false,
        }
    }

    /// Handles a hello carrying `ticket_bytes` from `ip` at `now_ms` (unix milliseconds).
    pub fn hello(
        &mut self,
        ticket_bytes: &[u8],
        ip: IpAddr,
        now_ms: u64,
        waiter: W,
    ) -> HelloOutcome<W> {
        let refuse = |code, reason: String| HelloOutcome::Refused(Refusal { code, reason });
        if self.draining {
            return refuse(StatusCode::Draining, "relay is draining".into());
        }
        let ticket = match self
            .keys
            .verify(ticket_bytes, &self.cfg.relay_id, now_ms / 1000)
        {
            Ok(t) => t,
            Err(e) => return refuse(status_for(&e), e.to_string()),
        };
        if ticket.transport != Transport::Tcp {
            return refuse(
                StatusCode::WrongTransport,
                "UDP ticket presented on the TCP port".into(),
            );
        }
        if self.replay.contains(ticket.session_id, ticket.side) {
            return refuse(
                StatusCode::Reused,
                format!(
                    "session {} side {} already used",
                    ticket.session_id, ticket.side
                ),
            );
        }
        // The other side waiting? Pair (capacity was counted when it arrived).
        if let Some(p) = self.pending.get(&ticket.session_id) {
            if p.side == ticket.side.other() {
                if !self.replay.insert(&ticket) {
                    return refuse(StatusCode::Full, "replay memory full".into());
                }
                let p = self.remove_pending(ticket.session_id).expect("present");
                self.active += 1;
                return HelloOutcome::Paired {
                    ticket,
                    first: p.ticket,
                    waiter: p.waiter,
                };
            }
        }
        if self.active + self.pending.len() >= self.cfg.max_sessions
            || self.pending.len() >= self.cfg.max_pending_total
        {
            return refuse(StatusCode::Full, "relay at capacity".into());
        }
        let per_ip = self.pending_per_ip.get(&ip).copied().unwrap_or(0);
        if per_ip >= self.cfg.max_pending_per_ip {
            return refuse(
                StatusCode::TooManyFromAddress,
                format!("{per_ip} sides from {ip} already waiting"),
            );
        }
        if !self.replay.insert(&ticket) {
            return refuse(StatusCode::Full, "replay memory full".into());
        }
        let token = PendingToken(self.next_token);
        self.next_token += 1;
        let deadline_ms = now_ms.saturating_add(self.cfg.pair_timeout_ms);
        *self.pending_per_ip.entry(ip).or_insert(0) += 1;
        self.pending.insert(
            ticket.session_id,
            Pending {
                side: ticket.side,
                ip,
                ticket: ticket.clone(),
                token,
                deadline_ms,
                waiter,
            },
        );
        HelloOutcome::Waiting {
            ticket,
            token,
            deadline_ms,
        }
    }

    fn remove_pending(&mut self, sid: SessionId) -> Option<Pending<W>> {
        let p = self.pending.remove(&sid)?;
        if let Some(n) = self.pending_per_ip.get_mut(&p.ip) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_ip.remove(&p.ip);
            }
        }
        Some(p)
    }

    /// Cancels a wait (timeout, client gone, drain). Returns the waiter if it was still
    /// waiting; `None` means it was paired meanwhile and its waiter has been handed over.
    pub fn cancel(&mut self, session: SessionId, token: PendingToken) -> Option<W> {
        match self.pending.get(&session) {
            Some(p) if p.token == token => self.remove_pending(session).map(|p| p.waiter),
            _ => None,
        }
    }

    /// Removes and returns every wait whose deadline is at or before `now_ms`, and forgets
    /// expired tickets.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(SessionId, W)> {
        let due: Vec<SessionId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline_ms <= now_ms)
            .map(|(s, _)| *s)
            .collect();
        self.replay.prune(now_ms / 1000);
        due.into_iter()
            .filter_map(|s| self.remove_pending(s).map(|p| (s, p.waiter)))
            .collect()
    }

    /// Forgets remembered tickets past expiry plus skew (call periodically).
    pub fn prune(&mut self, now_ms: u64) {
        self.replay.prune(now_ms / 1000);
    }

    /// Stops taking sessions; returns every waiter so the caller can tell them.
    pub fn start_drain(&mut self) -> Vec<(SessionId, W)> {
        self.draining = true;
        let all: Vec<SessionId> = self.pending.keys().copied().collect();
        all.into_iter()
            .filter_map(|s| self.remove_pending(s).map(|p| (s, p.waiter)))
            .collect()
    }

    /// A paired session ended.
    pub fn session_ended(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// Paired sessions.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Waiting first sides.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Remembered tickets.
    pub fn remembered(&self) -> usize {
        self.replay.len()
    }

    /// Whether draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use steelyard_proto::ticket::{TicketLimits, TicketSigner, TicketVerifier};

    pub(crate) const NOW: u64 = 1_700_000_000;

    pub(crate) fn signer() -> TicketSigner {
        TicketSigner::from_seed([42; 32])
    }

    pub(crate) fn ticket(sid: u8, side: Side, transport: Transport) -> Ticket {
        Ticket {
            key_id: signer().key_id(),
            session_id: SessionId([sid; 16]),
            relay_id: "r1".into(),
            side,
            peer_id: "p".into(),
            issued_at: NOW - 10,
            expires_at: NOW + 60,
            limits: TicketLimits::default(),
            transport,
        }
    }

    pub(crate) fn bytes(t: &Ticket) -> Vec<u8> {
        signer().sign(t).unwrap()
    }

    fn core(max_pending_per_ip: usize) -> Pairing<u32> {
        Pairing::new(
            TicketVerifier::new([signer().public_key()]),
            PairingConfig {
                relay_id: "r1".into(),
                max_sessions: 4,
                max_pending_total: 3,
                max_pending_per_ip,
                max_remembered_tickets: 100,
                pair_timeout_ms: 1000,
            },
        )
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const MS: u64 = NOW * 1000;

    fn code<W>(o: HelloOutcome<W>) -> StatusCode {
        match o {
            HelloOutcome::Refused(r) => r.code,
            HelloOutcome::Waiting { .. } => StatusCode::Waiting,
            HelloOutcome::Paired { .. } => StatusCode::Paired,
        }
    }

    #[test]
    fn pairs_two_sides_and_refuses_replay() {
        let mut c = core(8);
        let a = bytes(&ticket(1, Side::A, Transport::Tcp));
        let b = bytes(&ticket(1, Side::B, Transport::Tcp));
        assert_eq!(code(c.hello(&a, IP, MS, 1)), StatusCode::Waiting);
        assert_eq!(c.pending(), 1);
        match c.hello(&b, IP, MS, 2) {
            HelloOutcome::Paired { waiter, first, .. } => {
                assert_eq!(waiter, 1);
                assert_eq!(first.side, Side::A);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!((c.pending(), c.active()), (0, 1));
        assert_eq!(code(c.hello(&a, IP, MS, 3)), StatusCode::Reused);
        assert_eq!(code(c.hello(&b, IP, MS, 3)), StatusCode::Reused);
        c.session_ended();
        assert_eq!(c.active(), 0);
        // Still refused after the session ends, until expiry + skew.
        assert_eq!(code(c.hello(&a, IP, MS + 5000, 3)), StatusCode::Reused);
        c.expire((NOW + 60 + 30) * 1000);
        assert_eq!(c.remembered(), 0);
    }

    #[test]
    fn second_use_of_same_side_while_waiting_is_reused() {
        let mut c = core(8);
        let a = bytes(&ticket(1, Side::A, Transport::Tcp));
        assert_eq!(code(c.hello(&a, IP, MS, 1)), StatusCode::Waiting);
        assert_eq!(code(c.hello(&a, IP, MS, 2)), StatusCode::Reused);
        assert_eq!(c.pending(), 1);
    }

    #[test]
    fn every_ticket_failure_has_its_code() {
        let mut c = core(8);
        assert_eq!(code(c.hello(b"junk", IP, MS, 0)), StatusCode::Malformed);
        let other = TicketSigner::from_seed([1; 32]);
        let mut t = ticket(2, Side::A, Transport::Tcp);
        t.key_id = other.key_id();
        assert_eq!(
            code(c.hello(&other.sign(&t).unwrap(), IP, MS, 0)),
            StatusCode::Forged
        );
        let mut t = ticket(2, Side::A, Transport::Tcp);
        t.relay_id = "r2".into();
        assert_eq!(code(c.hello(&bytes(&t), IP, MS, 0)), StatusCode::WrongRelay);
        let t = ticket(2, Side::A, Transport::Tcp);
        assert_eq!(
            code(c.hello(&bytes(&t), IP, (NOW + 61) * 1000, 0)),
            StatusCode::Expired
        );
        let mut t = ticket(2, Side::A, Transport::Tcp);
        t.issued_at = NOW + 100;
        t.expires_at = NOW + 200;
        assert_eq!(
            code(c.hello(&bytes(&t), IP, MS, 0)),
            StatusCode::NotYetValid
        );
        let t = ticket(2, Side::A, Transport::Udp);
        assert_eq!(
            code(c.hello(&bytes(&t), IP, MS, 0)),
            StatusCode::WrongTransport
        );
        // None of the failures burned the ticket.
        let t = ticket(2, Side::A, Transport::Tcp);
        assert_eq!(code(c.hello(&bytes(&t), IP, MS, 0)), StatusCode::Waiting);
    }

    #[test]
    fn pending_limits_and_capacity() {
        let mut c = core(2);
        for sid in 1..=2 {
            let t = bytes(&ticket(sid, Side::A, Transport::Tcp));
            assert_eq!(code(c.hello(&t, IP, MS, 0)), StatusCode::Waiting);
        }
        let t3 = bytes(&ticket(3, Side::A, Transport::Tcp));
        assert_eq!(
            code(c.hello(&t3, IP, MS, 0)),
            StatusCode::TooManyFromAddress
        );
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(code(c.hello(&t3, ip2, MS, 0)), StatusCode::Waiting);
        let t4 = bytes(&ticket(4, Side::A, Transport::Tcp));
        assert_eq!(code(c.hello(&t4, ip2, MS, 0)), StatusCode::Full);
        // The partner of a waiting side still gets in when pending is full.
        let b1 = bytes(&ticket(1, Side::B, Transport::Tcp));
        assert_eq!(code(c.hello(&b1, ip2, MS, 0)), StatusCode::Paired);
        // Draining refuses and hands back the waiters.
        let drained = c.start_drain();
        assert_eq!(drained.len(), 2);
        assert_eq!(code(c.hello(&t4, ip2, MS, 0)), StatusCode::Draining);
    }

    #[test]
    fn timeouts_and_cancel() {
        let mut c = core(8);
        let a = bytes(&ticket(1, Side::A, Transport::Tcp));
        let HelloOutcome::Waiting {
            token, deadline_ms, ..
        } = c.hello(&a, IP, MS, 7)
        else {
            panic!()
        };
        assert_eq!(deadline_ms, MS + 1000);
        assert!(c.expire(MS + 999).is_empty());
        assert_eq!(c.expire(MS + 1000).len(), 1);
        assert_eq!(c.cancel(SessionId([1; 16]), token), None);
        let a2 = bytes(&ticket(5, Side::A, Transport::Tcp));
        let HelloOutcome::Waiting { token, .. } = c.hello(&a2, IP, MS, 8) else {
            panic!()
        };
        assert_eq!(c.cancel(SessionId([5; 16]), PendingToken(999)), None);
        assert_eq!(c.cancel(SessionId([5; 16]), token), Some(8));
        // B arriving after A gave up waits itself (and then times out): no pairing with a ghost.
        let b = bytes(&ticket(5, Side::B, Transport::Tcp));
        assert_eq!(code(c.hello(&b, IP, MS, 9)), StatusCode::Waiting);
    }

    #[test]
    fn replay_guard_is_bounded() {
        let mut g = ReplayGuard::new(2, 30);
        assert!(g.insert(&ticket(1, Side::A, Transport::Tcp)));
        assert!(g.insert(&ticket(1, Side::B, Transport::Tcp)));
        assert!(!g.insert(&ticket(2, Side::A, Transport::Tcp)));
        g.prune(NOW + 60 + 30);
        assert!(g.is_empty());
    }
}
