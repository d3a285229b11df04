//! Relay wire formats: the TCP hello and status frames, the UDP session header, and the probe
//! packets. Pure codecs: no I/O, no clocks, no state.
//!
//! These live in the relay crate for now and will move to `steelyard-proto` once agents need
//! them; the layouts below are the contract, versioned by [`WIRE_VERSION`].
//!
//! Every decoder is total: any byte string gives a value or a [`WireError`], never a panic,
//! and no decoder reads past its documented maximum. Integers are unsigned big-endian.
//!
//! # TCP
//!
//! The client connects and sends one **hello** frame; the relay answers with **status** frames.
//!
//! | frame  | layout                                                                          |
//! |--------|---------------------------------------------------------------------------------|
//! | hello  | `b"SYRH"` · version `1` · ticket length (u16, 134..=260) · ticket bytes          |
//! | status | `b"SYRS"` · version `1` · code (u8, [`StatusCode`])                              |
//!
//! A hello is at most [`MAX_HELLO_LEN`] bytes; the relay reads exactly the hello and nothing
//! more, so a client may send stream bytes right after it. The relay answers
//! [`StatusCode::Waiting`] when this side is the first to arrive, then [`StatusCode::Paired`]
//! when both are there; from the byte after `Paired` on the connection is a raw byte pipe to
//! the other side. Any other code is final: the relay closes the connection after it.
//!
//! # UDP
//!
//! Every datagram starts with `b"SYU"` · kind (u8) · session id (16 bytes) = [`UDP_HEADER_LEN`].
//!
//! | kind | name   | direction     | rest of the datagram                             |
//! |------|--------|---------------|--------------------------------------------------|
//! | 1    | bind   | peer → relay  | the side's ticket                                |
//! | 2    | data   | peer ↔ relay  | payload, forwarded unchanged (header included)   |
//! | 3    | status | relay → peer  | code (u8, [`StatusCode`])                        |
//!
//! # Probe (UDP)
//!
//! Every probe packet starts with `b"SYP"` · kind (u8). A response is never longer than the
//! request that caused it.
//!
//! | kind | name         | rest                                                                        |
//! |------|--------------|-----------------------------------------------------------------------------|
//! | 1    | echo request | seq (u32) · client timestamp (u64, opaque) · padding; at least [`ECHO_LEN`] bytes in all |
//! | 2    | echo reply   | seq · client timestamp · relay receive time (u64, unix µs) · observed TTL (u8, 0 = unknown) · load (u8, percent, 255 = unknown) · flags (u8, bit 0 = draining) · 0 (u8) · zero padding up to the request's length |
//! | 3    | burst request| seq (u32) · cookie (16 bytes, zero when not yet known) · packets (u16) · packet length (u16) |
//! | 4    | burst cookie | seq · cookie (16 bytes): the cookie to repeat in a new burst request |
//! | 5    | burst data   | seq · index (u16) · count (u16) · relay send time (u64, unix µs) · zero padding up to the packet length |

use steelyard_proto::ticket::{SessionId, MAX_TICKET_LEN, MIN_TICKET_LEN};

/// Version of the relay framing.
pub const WIRE_VERSION: u8 = 1;
/// First four bytes of a hello frame.
pub const HELLO_MAGIC: [u8; 4] = *b"SYRH";
/// First four bytes of a status frame.
pub const STATUS_MAGIC: [u8; 4] = *b"SYRS";
/// Length of a hello frame's header (magic, version, ticket length).
pub const HELLO_HEADER_LEN: usize = 7;
/// Longest hello frame.
pub const MAX_HELLO_LEN: usize = HELLO_HEADER_LEN + MAX_TICKET_LEN;
/// Length of a status frame.
pub const STATUS_LEN: usize = 6;
/// First three bytes of every relayed UDP datagram.
pub const UDP_MAGIC: [u8; 3] = *b"SYU";
/// Length of the UDP session header.
pub const UDP_HEADER_LEN: usize = 3 + 1 + SessionId::LEN;
/// Length of a UDP status datagram.
pub const UDP_STATUS_LEN: usize = UDP_HEADER_LEN + 1;
/// First three bytes of every probe packet.
pub const PROBE_MAGIC: [u8; 3] = *b"SYP";
/// Length of an echo reply without padding, and so the shortest echo request answered.
pub const ECHO_LEN: usize = 4 + 4 + 8 + 8 + 4;
/// Length of a burst request.
pub const BURST_REQUEST_LEN: usize = 4 + 4 + 16 + 2 + 2;
/// Length of a burst cookie reply.
pub const BURST_COOKIE_LEN: usize = 4 + 4 + 16;
/// Length of a burst data packet without padding, and so the shortest packet length allowed.
pub const BURST_DATA_MIN_LEN: usize = 4 + 4 + 2 + 2 + 8;

/// Why bytes are not a valid relay frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The bytes do not start with the expected magic.
    #[error("bad magic: this is not a Steelyard relay frame (is the client speaking the relay protocol?)")]
    BadMagic,
    /// The version byte is not [`WIRE_VERSION`].
    #[error(
        "relay framing version {0} is not supported (this relay speaks version {WIRE_VERSION})"
    )]
    BadVersion(u8),
    /// The input ends early.
    #[error("frame truncated: need {need} bytes, got {got}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// A hello announces a ticket length outside the possible range.
    #[error(
        "hello announces a {0}-byte ticket; tickets are {MIN_TICKET_LEN}..={MAX_TICKET_LEN} bytes"
    )]
    BadTicketLength(usize),
    /// An unknown status code.
    #[error("unknown status code {0}")]
    BadStatus(u8),
    /// An unknown packet kind.
    #[error("unknown packet kind {0}")]
    BadKind(u8),
    /// A field value is out of range.
    #[error("field {0} is out of range")]
    BadField(&'static str),
}

/// Status codes the relay sends (TCP status frames and UDP status datagrams).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StatusCode {
    /// Ticket accepted; waiting for the other side.
    Waiting = 0,
    /// Both sides are here; the connection is now a pipe.
    Paired = 1,
    /// The hello or ticket could not be parsed.
    Malformed = 16,
    /// The ticket's key is unknown or its signature is bad.
    Forged = 17,
    /// The ticket has expired.
    Expired = 18,
    /// The ticket is issued in the future (clock skew).
    NotYetValid = 19,
    /// The ticket is for another relay.
    WrongRelay = 20,
    /// This side of this session was already used.
    Reused = 21,
    /// The relay is at capacity.
    Full = 22,
    /// The hello did not arrive in time, or the other side did not.
    TimedOut = 23,
    /// The relay is draining and takes no new sessions.
    Draining = 24,
    /// A UDP ticket on the TCP port, or the other way round.
    WrongTransport = 25,
    /// Too many connections or waiting sides from this source address.
    TooManyFromAddress = 26,
    /// The relay takes its ticket keys from the broker and has not received them yet: retry
    /// in a moment.
    NotReady = 27,
}

impl StatusCode {
    /// Every code, in wire order.
    pub const ALL: [StatusCode; 14] = [
        StatusCode::Waiting,
        StatusCode::Paired,
        StatusCode::Malformed,
        StatusCode::Forged,
        StatusCode::Expired,
        StatusCode::NotYetValid,
        StatusCode::WrongRelay,
        StatusCode::Reused,
        StatusCode::Full,
        StatusCode::TimedOut,
        StatusCode::Draining,
        StatusCode::WrongTransport,
        StatusCode::TooManyFromAddress,
        StatusCode::NotReady,
    ];

    /// The byte on the wire.
    pub fn to_wire(self) -> u8 {
        self as u8
    }

    /// The code for `byte`, if any.
    pub fn from_wire(byte: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.to_wire() == byte)
    }

    /// A stable lowercase name, used in metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            StatusCode::Waiting => "waiting",
            StatusCode::Paired => "paired",
            StatusCode::Malformed => "malformed",
            StatusCode::Forged => "forged",
            StatusCode::Expired => "expired",
            StatusCode::NotYetValid => "not_yet_valid",
            StatusCode::WrongRelay => "wrong_relay",
            StatusCode::Reused => "reused",
            StatusCode::Full => "full",
            StatusCode::TimedOut => "timed_out",
            StatusCode::Draining => "draining",
            StatusCode::WrongTransport => "wrong_transport",
            StatusCode::TooManyFromAddress => "too_many_from_address",
            StatusCode::NotReady => "not_ready",
        }
    }

    /// Index into [`StatusCode::ALL`], for counters.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Encodes a hello frame carrying `ticket`.
pub fn encode_hello(ticket: &[u8]) -> Result<Vec<u8>, WireError> {
    if !(MIN_TICKET_LEN..=MAX_TICKET_LEN).contains(&ticket.len()) {
        return Err(WireError::BadTicketLength(ticket.len()));
    }
    let mut out = Vec::with_capacity(HELLO_HEADER_LEN + ticket.len());
    out.extend_from_slice(&HELLO_MAGIC);
    out.push(WIRE_VERSION);
    out.extend_from_slice(
        &u16::try_from(ticket.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(ticket);
    Ok(out)
}

/// Decodes a hello header and returns the length of the ticket that follows it.
pub fn decode_hello_header(header: &[u8]) -> Result<usize, WireError> {
    if header.len() < HELLO_HEADER_LEN {
        return Err(WireError::Truncated {
            need: HELLO_HEADER_LEN,
            got: header.len(),
        });
    }
    if header[..4] != HELLO_MAGIC {
        return Err(WireError::BadMagic);
    }
    if header[4] != WIRE_VERSION {
        return Err(WireError::BadVersion(header[4]));
    }
    let len = usize::from(u16::from_be_bytes([header[5], header[6]]));
    if !(MIN_TICKET_LEN..=MAX_TICKET_LEN).contains(&len) {
        return Err(WireError::BadTicketLength(len));
    }
    Ok(len)
}

/// Decodes a whole hello frame and returns the ticket bytes. Trailing bytes are an error.
pub fn decode_hello(frame: &[u8]) -> Result<&[u8], WireError> {
    let len = decode_hello_header(frame)?;
    let body = &frame[HELLO_HEADER_LEN..];
    if body.len() < len {
        return Err(WireError::Truncated {
            need: HELLO_HEADER_LEN + len,
            got: frame.len(),
        });
    }
    if body.len() > len {
        return Err(WireError::BadField("hello length"));
    }
    Ok(body)
}

/// Encodes a status frame.
pub fn encode_status(code: StatusCode) -> [u8; STATUS_LEN] {
    let m = STATUS_MAGIC;
    [m[0], m[1], m[2], m[3], WIRE_VERSION, code.to_wire()]
}

/// Decodes a status frame (exactly [`STATUS_LEN`] bytes are read; more is an error).
pub fn decode_status(frame: &[u8]) -> Result<StatusCode, WireError> {
    if frame.len() < STATUS_LEN {
        return Err(WireError::Truncated {
            need: STATUS_LEN,
            got: frame.len(),
        });
    }
    if frame.len() > STATUS_LEN {
        return Err(WireError::BadField("status length"));
    }
    if frame[..4] != STATUS_MAGIC {
        return Err(WireError::BadMagic);
    }
    if frame[4] != WIRE_VERSION {
        return Err(WireError::BadVersion(frame[4]));
    }
    StatusCode::from_wire(frame[5]).ok_or(WireError::BadStatus(frame[5]))
}

/// Kind of a relayed UDP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpKind {
    /// Carries a ticket.
    Bind,
    /// Carries payload.
    Data,
    /// Carries a status code from the relay.
    Status,
}

/// A decoded UDP datagram, borrowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket<'a> {
    /// What the datagram is.
    pub kind: UdpKind,
    /// The session it belongs to.
    pub session_id: SessionId,
    /// Everything after the header.
    pub body: &'a [u8],
}

/// Decodes the UDP session header.
pub fn decode_udp(datagram: &[u8]) -> Result<UdpPacket<'_>, WireError> {
    if datagram.len() < UDP_HEADER_LEN {
        return Err(WireError::Truncated {
            need: UDP_HEADER_LEN,
            got: datagram.len(),
        });
    }
    if datagram[..3] != UDP_MAGIC {
        return Err(WireError::BadMagic);
    }
    let kind = match datagram[3] {
        1 => UdpKind::Bind,
        2 => UdpKind::Data,
        3 => UdpKind::Status,
        k => return Err(WireError::BadKind(k)),
    };
    let mut sid = [0u8; SessionId::LEN];
    sid.copy_from_slice(&datagram[4..UDP_HEADER_LEN]);
    Ok(UdpPacket {
        kind,
        session_id: SessionId(sid),
        body: &datagram[UDP_HEADER_LEN..],
    })
}

/// Writes a UDP header of `kind` for `session_id` followed by `body`.
pub fn encode_udp(kind: UdpKind, session_id: SessionId, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(UDP_HEADER_LEN + body.len());
    out.extend_from_slice(&UDP_MAGIC);
    out.push(match kind {
        UdpKind::Bind => 1,
        UdpKind::Data => 2,
        UdpKind::Status => 3,
    });
    out.extend_from_slice(&session_id.0);
    out.extend_from_slice(body);
    out
}

/// Encodes a UDP status datagram.
pub fn encode_udp_status(session_id: SessionId, code: StatusCode) -> Vec<u8> {
    encode_udp(UdpKind::Status, session_id, &[code.to_wire()])
}

/// A decoded probe packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Echo request.
    EchoRequest {
        /// Sequence number.
        seq: u32,
        /// Client timestamp, echoed unchanged.
        client_ts: u64,
        /// Total length of the request, padding included.
        len: usize,
    },
    /// Echo reply.
    EchoReply {
        /// Sequence number of the request.
        seq: u32,
        /// Client timestamp of the request.
        client_ts: u64,
        /// When the relay received the request, unix microseconds.
        relay_rx_us: u64,
        /// TTL (IPv4) or hop limit (IPv6) the relay observed; 0 = unknown.
        ttl: u8,
        /// Relay load in percent; 255 = unknown.
        load: u8,
        /// Whether the relay is draining.
        draining: bool,
    },
    /// Burst request.
    BurstRequest {
        /// Sequence number.
        seq: u32,
        /// Cookie from an earlier burst-cookie reply, or zeros.
        cookie: [u8; 16],
        /// Packets asked for.
        packets: u16,
        /// Length of each packet asked for.
        packet_len: u16,
    },
    /// Burst cookie reply.
    BurstCookie {
        /// Sequence number of the request.
        seq: u32,
        /// Cookie to repeat.
        cookie: [u8; 16],
    },
    /// One packet of a burst.
    BurstData {
        /// Sequence number of the request.
        seq: u32,
        /// Index of this packet in the burst.
        index: u16,
        /// Packets in the burst.
        count: u16,
        /// When the relay sent it, unix microseconds.
        relay_tx_us: u64,
        /// Total length including padding.
        len: usize,
    },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn need(b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() < n {
        Err(WireError::Truncated {
            need: n,
            got: b.len(),
        })
    } else {
        Ok(())
    }
}

/// Decodes a probe packet. Total; reads at most the fixed part of each kind.
pub fn decode_probe(p: &[u8]) -> Result<Probe, WireError> {
    need(p, 4)?;
    if p[..3] != PROBE_MAGIC {
        return Err(WireError::BadMagic);
    }
    match p[3] {
        1 => {
            need(p, ECHO_LEN)?;
            Ok(Probe::EchoRequest {
                seq: be_u32(p, 4),
                client_ts: be_u64(p, 8),
                len: p.len(),
            })
        }
        2 => {
            need(p, ECHO_LEN)?;
            Ok(Probe::EchoReply {
                seq: be_u32(p, 4),
                client_ts: be_u64(p, 8),
                relay_rx_us: be_u64(p, 16),
                ttl: p[24],
                load: p[25],
                draining: p[26] & 1 == 1,
            })
        }
        3 => {
            need(p, BURST_REQUEST_LEN)?;
            let mut cookie = [0u8; 16];
            cookie.copy_from_slice(&p[8..24]);
            Ok(Probe::BurstRequest {
                seq: be_u32(p, 4),
                cookie,
                packets: be_u16(p, 24),
                packet_len: be_u16(p, 26),
            })
        }
        4 => {
            need(p, BURST_COOKIE_LEN)?;
            let mut cookie = [0u8; 16];
            cookie.copy_from_slice(&p[8..24]);
            Ok(Probe::BurstCookie {
                seq: be_u32(p, 4),
                cookie,
            })
        }
        5 => {
            need(p, BURST_DATA_MIN_LEN)?;
            Ok(Probe::BurstData {
                seq: be_u32(p, 4),
                index: be_u16(p, 8),
                count: be_u16(p, 10),
                relay_tx_us: be_u64(p, 12),
                len: p.len(),
            })
        }
        k => Err(WireError::BadKind(k)),
    }
}

/// Encodes a probe packet. Echo requests and burst data are zero-padded to their `len` (at
/// least the fixed part).
pub fn encode_probe(probe: &Probe) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&PROBE_MAGIC);
    match *probe {
        Probe::EchoRequest {
            seq,
            client_ts,
            len,
        } => {
            out.push(1);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&client_ts.to_be_bytes());
            out.resize(len.max(ECHO_LEN), 0);
        }
        Probe::EchoReply {
            seq,
            client_ts,
            relay_rx_us,
            ttl,
            load,
            draining,
        } => {
            out.push(2);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&client_ts.to_be_bytes());
            out.extend_from_slice(&relay_rx_us.to_be_bytes());
            out.extend_from_slice(&[ttl, load, u8::from(draining), 0]);
        }
        Probe::BurstRequest {
            seq,
            cookie,
            packets,
            packet_len,
        } => {
            out.push(3);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&cookie);
            out.extend_from_slice(&packets.to_be_bytes());
            out.extend_from_slice(&packet_len.to_be_bytes());
        }
        Probe::BurstCookie { seq, cookie } => {
            out.push(4);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&cookie);
        }
        Probe::BurstData {
            seq,
            index,
            count,
            relay_tx_us,
            len,
        } => {
            out.push(5);
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&index.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
            out.extend_from_slice(&relay_tx_us.to_be_bytes());
            out.resize(len.max(BURST_DATA_MIN_LEN), 0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trip() {
        let ticket = vec![7u8; 150];
        let frame = encode_hello(&ticket).unwrap();
        assert_eq!(decode_hello_header(&frame).unwrap(), 150);
        assert_eq!(decode_hello(&frame).unwrap(), &ticket[..]);
        assert!(encode_hello(&[0; 10]).is_err());
        assert!(matches!(
            decode_hello(&frame[..100]),
            Err(WireError::Truncated { .. })
        ));
        let mut big = frame.clone();
        big[5..7].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(
            decode_hello_header(&big),
            Err(WireError::BadTicketLength(60000))
        );
    }

    #[test]
    fn status_round_trip() {
        for code in StatusCode::ALL {
            assert_eq!(decode_status(&encode_status(code)), Ok(code));
            assert_eq!(StatusCode::ALL[code.index()], code);
        }
        assert_eq!(
            decode_status(b"SYRS\x01\x63"),
            Err(WireError::BadStatus(99))
        );
    }

    #[test]
    fn probe_round_trip_and_sizes() {
        let req = Probe::EchoRequest {
            seq: 9,
            client_ts: 77,
            len: 64,
        };
        let bytes = encode_probe(&req);
        assert_eq!(bytes.len(), 64);
        assert_eq!(decode_probe(&bytes), Ok(req));
        let rep = Probe::EchoReply {
            seq: 9,
            client_ts: 77,
            relay_rx_us: 5,
            ttl: 64,
            load: 3,
            draining: true,
        };
        let bytes = encode_probe(&rep);
        assert_eq!(bytes.len(), ECHO_LEN);
        assert_eq!(decode_probe(&bytes), Ok(rep));
        let b = Probe::BurstRequest {
            seq: 1,
            cookie: [3; 16],
            packets: 4,
            packet_len: 500,
        };
        assert_eq!(encode_probe(&b).len(), BURST_REQUEST_LEN);
        assert_eq!(decode_probe(&encode_probe(&b)), Ok(b));
        let c = Probe::BurstCookie {
            seq: 1,
            cookie: [3; 16],
        };
        assert_eq!(encode_probe(&c).len(), BURST_COOKIE_LEN);
        const { assert!(BURST_COOKIE_LEN <= BURST_REQUEST_LEN) };
    }

    proptest! {
        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_hello_header(&bytes);
            let _ = decode_hello(&bytes);
            let _ = decode_status(&bytes);
            let _ = decode_udp(&bytes);
            let _ = decode_probe(&bytes);
        }

        #[test]
        fn decoders_are_total_with_magic(kind in 0u8..8, rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            for magic in [&b"SYRH"[..], b"SYRS", b"SYU", b"SYP"] {
                let mut b = magic.to_vec();
                b.push(kind);
                b.extend_from_slice(&rest);
                let _ = decode_hello(&b);
                let _ = decode_status(&b);
                let _ = decode_udp(&b);
                let _ = decode_probe(&b);
            }
        }
    }
}
