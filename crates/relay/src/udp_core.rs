//! Sans-I/O UDP sessions: binds by ticket, learns each side's address, decides where each
//! datagram goes.
//!
//! [`UdpCore::on_datagram`] takes the source address, the datagram and `now` (unix
//! milliseconds) and returns a [`UdpAction`]: forward the datagram unchanged to an address,
//! send status datagrams, or drop it with a [`DropReason`]. A data datagram is forwarded only
//! when it comes from the exact address (IP and port) a side bound with its ticket, and only to
//! the other side's bound address: nothing from an unknown address is ever forwarded.
//!
//! What it does not do: touch sockets or clocks. The caller calls [`UdpCore::expire`]
//! periodically to end idle sessions.
//!
//! Binds are idempotent from the same address (a lost status can be retried with the same
//! ticket); the same ticket from another address is `reused`. Bounds: at most `max_sessions`
//! sessions (about 200 bytes each) and `max_remembered_tickets` used tickets.

use std::collections::HashMap;
use std::net::SocketAddr;

use steelyard_proto::ticket::{SessionId, Side, Ticket, Transport};

use crate::keys::TrustedKeys;

use crate::limit::TokenBucket;
use crate::pairing::{status_for, ReplayGuard};
use crate::wire::{decode_udp, StatusCode, UdpKind};

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a relay datagram.
    Malformed,
    /// Data for a session this relay does not have.
    UnknownSession,
    /// Data from an address that is not a bound side of the session.
    UnknownAddress,
    /// The other side has not bound yet.
    NoPeer,
    /// Over the ticket's rate or total limit.
    OverLimit,
    /// A status datagram sent to the relay.
    Unexpected,
}

impl DropReason {
    /// Every reason, for counters.
    pub const ALL: [DropReason; 6] = [
        DropReason::Malformed,
        DropReason::UnknownSession,
        DropReason::UnknownAddress,
        DropReason::NoPeer,
        DropReason::OverLimit,
        DropReason::Unexpected,
    ];

    /// Stable name for metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownSession => "unknown_session",
            DropReason::UnknownAddress => "unknown_address",
            DropReason::NoPeer => "no_peer",
            DropReason::OverLimit => "over_limit",
            DropReason::Unexpected => "unexpected",
        }
    }

    /// Index into [`DropReason::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// What to do with a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UdpAction {
    /// Send the datagram, unchanged, to this address. `from_side` is the sender's side.
    Forward {
        /// Destination.
        to: SocketAddr,
        /// Side that sent it.
        from_side: Side,
    },
    /// Send these status codes (for this session) to these addresses.
    Status {
        /// Session the status is about (echoed from the request's header).
        session_id: SessionId,
        /// Recipients and codes (one or two).
        replies: Vec<(SocketAddr, StatusCode)>,
    },
    /// Drop it.
    Drop(DropReason),
}

/// Settings of [`UdpCore`].
#[derive(Debug, Clone)]
pub struct UdpCoreConfig {
    /// This relay's id.
    pub relay_id: String,
    /// Most sessions.
    pub max_sessions: usize,
    /// Idle timeout when the ticket sets none, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Most remembered tickets.
    pub max_remembered_tickets: usize,
}

struct SideState {
    addr: SocketAddr,
    limit: Option<TokenBucket>,
    max_total: u64,
    sent: u64,
}

struct UdpSession {
    sides: [Option<SideState>; 2],
    idle_ms: u64,
    last_ms: u64,
}

fn idx(side: Side) -> usize {
    match side {
        Side::A => 0,
        Side::B => 1,
    }
}

/// The UDP session table. See the [module docs](self).
pub struct UdpCore {
    keys: TrustedKeys,
    cfg: UdpCoreConfig,
    replay: ReplayGuard,
    sessions: HashMap<SessionId, UdpSession>,
    draining: bool,
}

impl UdpCore {
    /// A UDP core trusting `keys` (a [`TicketVerifier`](steelyard_proto::ticket::TicketVerifier)
    /// converts into pinned keys).
    pub fn new(keys: impl Into<TrustedKeys>, cfg: UdpCoreConfig) -> Self {
        let keys = keys.into();
        let replay = ReplayGuard::new(cfg.max_remembered_tickets, keys.max_clock_skew_secs());
        Self {
            keys,
            cfg,
            replay,
            sessions: HashMap::new(),
            draining: false,
        }
    }

    /// Handles one datagram from `src`.
    pub fn on_datagram(&mut self, src: SocketAddr, datagram: &[u8], now_ms: u64) -> UdpAction {
        let Ok(p) = decode_udp(datagram) else {
            return UdpAction::Drop(DropReason::Malformed);
        };
        match p.kind {
            UdpKind::Data => self.on_data(src, p.session_id, datagram.len() as u64, now_ms),
            UdpKind::Bind => self.on_bind(src, p.session_id, p.body, now_ms),
            UdpKind::Status => UdpAction::Drop(DropReason::Unexpected),
        }
    }

    fn on_data(&mut self, src: SocketAddr, sid: SessionId, len: u64, now_ms: u64) -> UdpAction {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return UdpAction::Drop(DropReason::UnknownSession);
        };
        let from = if s.sides[0].as_ref().is_some_and(|x| x.addr == src) {
            Side::A
        } else if s.sides[1].as_ref().is_some_and(|x| x.addr == src) {
            Side::B
        } else {
            return UdpAction::Drop(DropReason::UnknownAddress);
        };
        let Some(to) = s.sides[idx(from.other())].as_ref().map(|x| x.addr) else {
            return UdpAction::Drop(DropReason::NoPeer);
        };
        let me = s.sides[idx(from)].as_mut().expect("matched above");
        if me.max_total != 0 && me.sent.saturating_add(len) > me.max_total {
            return UdpAction::Drop(DropReason::OverLimit);
        }
        if let Some(b) = me.limit.as_mut() {
            if !b.take_exact(len, now_ms.saturating_mul(1000)) {
                return UdpAction::Drop(DropReason::OverLimit);
            }
        }
        me.sent += len;
        s.last_ms = now_ms;
        UdpAction::Forward {
            to,
            from_side: from,
        }
    }

    fn on_bind(&mut self, src: SocketAddr, sid: SessionId, body: &[u8], now_ms: u64) -> UdpAction {
        let reply = |code| UdpAction::Status {
            session_id: sid,
            replies: vec![(src, code)],
        };
        let ticket = match self.keys.verify(body, &self.cfg.relay_id, now_ms / 1000) {
            Ok(t) => t,
            Err(e) => return reply(status_for(&e)),
        };
        if ticket.session_id != sid {
            return reply(StatusCode::Malformed);
        }
        if ticket.transport != Transport::Udp {
            return reply(StatusCode::WrongTransport);
        }
        if self.replay.contains(sid, ticket.side) {
            // Idempotent retry from the same address; anything else is a replay.
            if let Some(s) = self.sessions.get(&sid) {
                if s.sides[idx(ticket.side)]
                    .as_ref()
                    .is_some_and(|x| x.addr == src)
                {
                    let code = if s.sides[idx(ticket.side.other())].is_some() {
                        StatusCode::Paired
                    } else {
                        StatusCode::Waiting
                    };
                    return reply(code);
                }
            }
            return reply(StatusCode::Reused);
        }
        if self.draining {
            return reply(StatusCode::Draining);
        }
        let exists = self.sessions.contains_key(&sid);
        if !exists && self.sessions.len() >= self.cfg.max_sessions {
            return reply(StatusCode::Full);
        }
        if !self.replay.insert(&ticket) {
            return reply(StatusCode::Full);
        }
        let idle_ms = match ticket.limits.idle_timeout_secs {
            0 => self.cfg.idle_timeout_ms,
            s => u64::from(s) * 1000,
        };
        let side = side_state(&ticket, src, now_ms);
        let s = self.sessions.entry(sid).or_insert(UdpSession {
            sides: [None, None],
            idle_ms,
            last_ms: now_ms,
        });
        s.idle_ms = s.idle_ms.min(idle_ms);
        s.last_ms = now_ms;
        s.sides[idx(ticket.side)] = Some(side);
        match s.sides[idx(ticket.side.other())].as_ref() {
            Some(other) => UdpAction::Status {
                session_id: sid,
                replies: vec![(src, StatusCode::Paired), (other.addr, StatusCode::Paired)],
            },
            None => reply(StatusCode::Waiting),
        }
    }

    /// Ends sessions idle for their timeout; returns how many ended. Forgets expired tickets.
    pub fn expire(&mut self, now_ms: u64) -> usize {
        let before = self.sessions.len();
        self.sessions
            .retain(|_, s| now_ms.saturating_sub(s.last_ms) < s.idle_ms);
        self.replay.prune(now_ms / 1000);
        before - self.sessions.len()
    }

    /// Stops taking new sessions; existing ones go on.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// Sessions with both sides bound.
    pub fn active(&self) -> usize {
        self.sessions
            .values()
            .filter(|s| s.sides.iter().all(Option::is_some))
            .count()
    }

    /// All sessions, including half-bound ones.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }
}

fn side_state(ticket: &Ticket, addr: SocketAddr, now_ms: u64) -> SideState {
    SideState {
        addr,
        limit: match ticket.limits.max_bytes_per_sec {
            0 => None,
            r => Some(TokenBucket::new(r, now_ms.saturating_mul(1000))),
        },
        max_total: ticket.limits.max_total_bytes,
        sent: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::tests::{bytes, signer, ticket, NOW};
    use crate::wire::encode_udp;
    use steelyard_proto::ticket::TicketVerifier;

    const MS: u64 = NOW * 1000;

    fn core() -> UdpCore {
        UdpCore::new(
            TicketVerifier::new([signer().public_key()]),
            UdpCoreConfig {
                relay_id: "r1".into(),
                max_sessions: 2,
                idle_timeout_ms: 1000,
                max_remembered_tickets: 100,
            },
        )
    }

    fn bind(c: &mut UdpCore, src: &str, sid: u8, side: Side) -> UdpAction {
        let t = bytes(&ticket(sid, side, Transport::Udp));
        let d = encode_udp(UdpKind::Bind, SessionId([sid; 16]), &t);
        c.on_datagram(src.parse().unwrap(), &d, MS)
    }

    fn data(c: &mut UdpCore, src: &str, sid: u8) -> UdpAction {
        let d = encode_udp(UdpKind::Data, SessionId([sid; 16]), b"hello");
        c.on_datagram(src.parse().unwrap(), &d, MS)
    }

    fn codes(a: UdpAction) -> Vec<StatusCode> {
        match a {
            UdpAction::Status { replies, .. } => replies.into_iter().map(|r| r.1).collect(),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn binds_pairs_and_forwards_only_between_bound_addresses() {
        let mut c = core();
        let (a, b, x) = ("127.0.0.1:1000", "127.0.0.1:2000", "127.0.0.1:3000");
        assert_eq!(codes(bind(&mut c, a, 1, Side::A)), [StatusCode::Waiting]);
        assert_eq!(data(&mut c, a, 1), UdpAction::Drop(DropReason::NoPeer));
        assert_eq!(
            codes(bind(&mut c, b, 1, Side::B)),
            [StatusCode::Paired, StatusCode::Paired]
        );
        assert_eq!(
            data(&mut c, a, 1),
            UdpAction::Forward {
                to: b.parse().unwrap(),
                from_side: Side::A
            }
        );
        assert_eq!(
            data(&mut c, b, 1),
            UdpAction::Forward {
                to: a.parse().unwrap(),
                from_side: Side::B
            }
        );
        assert_eq!(
            data(&mut c, x, 1),
            UdpAction::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(
            data(&mut c, a, 9),
            UdpAction::Drop(DropReason::UnknownSession)
        );
        // Retry from the same address is idempotent; from another it is a replay.
        assert_eq!(codes(bind(&mut c, a, 1, Side::A)), [StatusCode::Paired]);
        assert_eq!(codes(bind(&mut c, x, 1, Side::A)), [StatusCode::Reused]);
        assert_eq!(
            data(&mut c, x, 1),
            UdpAction::Drop(DropReason::UnknownAddress)
        );
        assert_eq!(
            c.on_datagram(x.parse().unwrap(), b"garbage", MS),
            UdpAction::Drop(DropReason::Malformed)
        );
    }

    #[test]
    fn refusals_capacity_and_expiry() {
        let mut c = core();
        let t = bytes(&ticket(1, Side::A, Transport::Tcp));
        let d = encode_udp(UdpKind::Bind, SessionId([1; 16]), &t);
        assert_eq!(
            codes(c.on_datagram("127.0.0.1:1".parse().unwrap(), &d, MS)),
            [StatusCode::WrongTransport]
        );
        let t = bytes(&ticket(1, Side::A, Transport::Udp));
        let d = encode_udp(UdpKind::Bind, SessionId([2; 16]), &t);
        assert_eq!(
            codes(c.on_datagram("127.0.0.1:1".parse().unwrap(), &d, MS)),
            [StatusCode::Malformed]
        );
        bind(&mut c, "127.0.0.1:1", 1, Side::A);
        bind(&mut c, "127.0.0.1:2", 2, Side::A);
        assert_eq!(
            codes(bind(&mut c, "127.0.0.1:3", 3, Side::A)),
            [StatusCode::Full]
        );
        assert_eq!(c.sessions(), 2);
        assert_eq!(c.expire(MS + 999), 0);
        assert_eq!(c.expire(MS + 1000), 2);
        c.start_drain();
        assert_eq!(
            codes(bind(&mut c, "127.0.0.1:3", 3, Side::A)),
            [StatusCode::Draining]
        );
    }
}
