//! Session tickets: the broker's signed permission for one side of one relayed session.
//!
//! When peer A asks the broker for peer B, the broker picks a relay and signs one ticket for
//! each side ([`Side::A`], the initiator, and [`Side::B`], the acceptor) with its Ed25519 key
//! ([`TicketSigner`]). Each peer presents its ticket to the relay, which checks it offline with
//! the broker's public keys ([`TicketVerifier`]; several keys may be trusted at once so the
//! broker can rotate its key without downtime). A relay forwards for nobody without a ticket
//! that verifies.
//!
//! What this module does **not** do: it keeps no state, so it cannot tell that a ticket was
//! already used. A ticket is meant to be good once; the relay must remember
//! `(session_id, side)` of every ticket it accepted until that ticket's `expires_at` (plus the
//! clock-skew allowance) and refuse a second use itself. Nor does it read a clock: the caller
//! passes `now` in unix seconds.
//!
//! # Checks, in order
//!
//! [`TicketVerifier::verify`] reports the first failure it finds:
//!
//! 1. the bytes parse as a version-1 ticket whose fields obey the rules below
//!    ([`TicketError::Malformed`]);
//! 2. the key id names a trusted key and the signature verifies under it
//!    ([`TicketError::Forged`]); Ed25519 verification is strict (no malleable signatures,
//!    no weak keys);
//! 3. the ticket names this relay ([`TicketError::WrongRelay`]);
//! 4. it is not issued in the future by more than the clock-skew allowance
//!    ([`TicketError::NotYetValid`]; [`DEFAULT_MAX_CLOCK_SKEW_SECS`] unless set), and
//!    `now < expires_at` ([`TicketError::Expired`]).
//!
//! Nothing from the ticket is trusted, or echoed in a status, before step 2 passes.
//!
//! # Wire layout, version 1
//!
//! Integers are unsigned big-endian. `R` and `P` are the lengths of `relay_id` and `peer_id`.
//!
//! | offset   | size | field               | rules                                              |
//! |----------|------|---------------------|----------------------------------------------------|
//! | 0        | 3    | magic               | `b"SYT"` ([`TICKET_MAGIC`])                        |
//! | 3        | 1    | version             | `1` ([`TICKET_VERSION`])                           |
//! | 4        | 8    | `key_id`            | first 8 bytes of the signer's Ed25519 public key   |
//! | 12       | 16   | `session_id`        | any                                                |
//! | 28       | 1    | `side`              | `0` = A (initiator), `1` = B (acceptor)            |
//! | 29       | 1    | `transport`         | `0` = TCP, `1` = UDP                               |
//! | 30       | 8    | `issued_at`         | unix seconds                                       |
//! | 38       | 8    | `expires_at`        | unix seconds, greater than `issued_at`             |
//! | 46       | 8    | `max_bytes_per_sec` | `0` = unlimited                                    |
//! | 54       | 8    | `max_total_bytes`   | `0` = unlimited                                    |
//! | 62       | 4    | `idle_timeout_secs` | `0` = the relay's own default                      |
//! | 66       | 1    | `R`                 | `1..=64`                                           |
//! | 67       | R    | `relay_id`          | bytes of `[A-Za-z0-9._-]`                          |
//! | 67+R     | 1    | `P`                 | `1..=64`                                           |
//! | 68+R     | P    | `peer_id`           | bytes of `[A-Za-z0-9._-]`                          |
//! | 68+R+P   | 64   | signature           | Ed25519 over bytes `0 .. 68+R+P` (all of the above)|
//!
//! The total is `132 + R + P` bytes: at least [`MIN_TICKET_LEN`] (134), at most
//! [`MAX_TICKET_LEN`] (260). Nothing may follow the signature.
//!
//! # Example
//!
//! ```
//! use steelyard_proto::ticket::*;
//!
//! let signer = TicketSigner::from_seed([7; 32]);
//! let ticket = Ticket {
//!     key_id: signer.key_id(),
//!     session_id: SessionId([1; 16]),
//!     relay_id: "relay-eu-1".into(),
//!     side: Side::A,
//!     peer_id: "laptop.alice".into(),
//!     issued_at: 1_700_000_000,
//!     expires_at: 1_700_000_060,
//!     limits: TicketLimits::default(),
//!     transport: Transport::Tcp,
//! };
//! let bytes = signer.sign(&ticket)?;
//!
//! let verifier = TicketVerifier::new([signer.public_key()]);
//! assert_eq!(verifier.verify(&bytes, "relay-eu-1", 1_700_000_010)?, ticket);
//! assert!(matches!(
//!     verifier.verify(&bytes, "relay-eu-1", 1_700_000_060),
//!     Err(TicketError::Expired { .. })
//! ));
//! # Ok::<(), TicketError>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::hex::{self, HexError};

/// The four bytes every ticket starts with are this magic and then [`TICKET_VERSION`].
pub const TICKET_MAGIC: [u8; 3] = *b"SYT";
/// The ticket format version this crate writes and reads.
pub const TICKET_VERSION: u8 = 1;
/// Longest `relay_id` or `peer_id`, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Length of the Ed25519 signature that ends every ticket.
pub const SIGNATURE_LEN: usize = 64;
/// Length of the fixed-width part: magic through `idle_timeout_secs`.
const FIXED_LEN: usize = 3 + 1 + KeyId::LEN + SessionId::LEN + 1 + 1 + 8 + 8 + 8 + 8 + 4;
/// Shortest possible encoded ticket (both ids one byte long).
pub const MIN_TICKET_LEN: usize = FIXED_LEN + 2 * (1 + 1) + SIGNATURE_LEN;
/// Longest possible encoded ticket (both ids [`MAX_ID_LEN`] bytes long). A relay may read at
/// most this many bytes for a ticket.
pub const MAX_TICKET_LEN: usize = FIXED_LEN + 2 * (1 + MAX_ID_LEN) + SIGNATURE_LEN;
/// How far in the future `issued_at` may lie before a ticket is [`TicketError::NotYetValid`],
/// unless the verifier is told otherwise.
pub const DEFAULT_MAX_CLOCK_SKEW_SECS: u64 = 30;

/// Names the broker key that signed a ticket: the first 8 bytes of its Ed25519 public key.
///
/// Displays and parses as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KeyId::LEN]);

impl KeyId {
    /// Length in bytes.
    pub const LEN: usize = 8;

    /// The key id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        let mut id = [0u8; Self::LEN];
        id.copy_from_slice(&key.as_bytes()[..Self::LEN]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex::write(f, &self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode(s).map(Self)
    }
}

/// Identifies one relayed session; both sides' tickets carry the same id.
///
/// The broker picks it at random. Displays and parses as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; SessionId::LEN]);

impl SessionId {
    /// Length in bytes.
    pub const LEN: usize = 16;
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex::write(f, &self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode(s).map(Self)
    }
}

/// Which side of the session a ticket admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// The initiator: the peer that asked the broker for the connection.
    A,
    /// The acceptor: the peer the initiator asked for.
    B,
}

impl Side {
    /// The side this one is paired with.
    pub fn other(self) -> Self {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }

    fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Side::A),
            1 => Some(Side::B),
            _ => None,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// The transport the session is relayed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// A TCP byte stream.
    Tcp,
    /// UDP datagrams.
    Udp,
}

impl Transport {
    fn to_wire(self) -> u8 {
        match self {
            Transport::Tcp => 0,
            Transport::Udp => 1,
        }
    }

    fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Transport::Tcp),
            1 => Some(Transport::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

/// Limits the relay enforces on the side that presents the ticket.
///
/// The default is all zeros: no byte limits and the relay's own idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TicketLimits {
    /// Most bytes per second this side may send; `0` = unlimited.
    pub max_bytes_per_sec: u64,
    /// Most bytes this side may send over the whole session; `0` = unlimited.
    pub max_total_bytes: u64,
    /// Seconds without traffic after which the relay closes the session; `0` = the relay's
    /// own default.
    pub idle_timeout_secs: u32,
}

/// The content of a session ticket. See the [module docs](self) for its encoding.
///
/// A `Ticket` obtained from [`decode_unverified`] or [`TicketVerifier::verify`] always obeys the
/// field rules of [`Ticket::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The broker key that signs the ticket; must equal [`TicketSigner::key_id`] of the signer.
    pub key_id: KeyId,
    /// The session both sides' tickets belong to.
    pub session_id: SessionId,
    /// The one relay that may accept this ticket: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub relay_id: String,
    /// The side this ticket admits.
    pub side: Side,
    /// The peer this ticket was issued to: 1 to 64 bytes of `[A-Za-z0-9._-]`.
    pub peer_id: String,
    /// When the broker issued the ticket, in unix seconds.
    pub issued_at: u64,
    /// The first unix second at which the ticket is no longer valid; greater than `issued_at`.
    pub expires_at: u64,
    /// Limits the relay enforces on this side.
    pub limits: TicketLimits,
    /// Transport of the session.
    pub transport: Transport,
}

impl Ticket {
    /// Checks the field rules that signing and decoding enforce: `relay_id` and `peer_id` are
    /// 1 to 64 bytes of `[A-Za-z0-9._-]`, and `expires_at > issued_at`.
    ///
    /// Returns [`TicketError::Invalid`] naming the first field that breaks a rule.
    pub fn validate(&self) -> Result<(), TicketError> {
        check_id("relay_id", &self.relay_id)?;
        check_id("peer_id", &self.peer_id)?;
        if self.expires_at <= self.issued_at {
            return Err(TicketError::Invalid {
                field: "expires_at",
                reason: "must be later than issued_at: give the ticket a positive lifetime",
            });
        }
        Ok(())
    }

    /// Length of this ticket once signed: `132 + relay_id.len() + peer_id.len()`.
    pub fn encoded_len(&self) -> usize {
        FIXED_LEN + 2 + self.relay_id.len() + self.peer_id.len() + SIGNATURE_LEN
    }

    /// The bytes the signature covers. The caller has validated the ticket, so the id lengths
    /// fit in a byte.
    fn encode_signed_part(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&TICKET_MAGIC);
        out.push(TICKET_VERSION);
        out.extend_from_slice(&self.key_id.0);
        out.extend_from_slice(&self.session_id.0);
        out.push(self.side.to_wire());
        out.push(self.transport.to_wire());
        out.extend_from_slice(&self.issued_at.to_be_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.limits.max_bytes_per_sec.to_be_bytes());
        out.extend_from_slice(&self.limits.max_total_bytes.to_be_bytes());
        out.extend_from_slice(&self.limits.idle_timeout_secs.to_be_bytes());
        for id in [&self.relay_id, &self.peer_id] {
            out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(id.as_bytes());
        }
        out
    }
}

/// Whether `s` is a valid `relay_id` or `peer_id`: 1 to 64 bytes of `[A-Za-z0-9._-]`.
pub fn is_valid_id(s: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&s.len()) && s.bytes().all(is_id_byte)
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn check_id(field: &'static str, value: &str) -> Result<(), TicketError> {
    if !(1..=MAX_ID_LEN).contains(&value.len()) {
        return Err(TicketError::Invalid {
            field,
            reason: "must be 1 to 64 bytes long",
        });
    }
    if !value.bytes().all(is_id_byte) {
        return Err(TicketError::Invalid {
            field,
            reason: "may contain only A-Z, a-z, 0-9, '.', '_' and '-'",
        });
    }
    Ok(())
}

/// Why a ticket is a forgery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForgedReason {
    /// The key id names no key this verifier trusts.
    UnknownKey,
    /// The key is trusted but the signature does not verify under it.
    BadSignature,
}

impl fmt::Display for ForgedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForgedReason::UnknownKey => {
                "signed with a key this relay does not trust: if the broker rotated its key, \
                 add the broker's new public key to this relay's trusted keys"
            }
            ForgedReason::BadSignature => {
                "the signature does not match the contents: the ticket was altered or not \
                 issued by the broker; ask the broker for a new connection"
            }
        })
    }
}

/// What exactly is wrong with bytes that do not parse as a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MalformedReason {
    /// More bytes than [`MAX_TICKET_LEN`].
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// The input ends before `field` is complete.
    Truncated {
        /// The field the input ends in.
        field: &'static str,
    },
    /// The first three bytes are not [`TICKET_MAGIC`].
    BadMagic,
    /// The version byte is not [`TICKET_VERSION`].
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// The side byte is neither 0 (A) nor 1 (B).
    BadSide {
        /// The byte found.
        value: u8,
    },
    /// The transport byte is neither 0 (TCP) nor 1 (UDP).
    BadTransport {
        /// The byte found.
        value: u8,
    },
    /// A string's length byte is 0 or more than [`MAX_ID_LEN`].
    BadLength {
        /// `"relay_id"` or `"peer_id"`.
        field: &'static str,
        /// The length byte found.
        len: u8,
    },
    /// A string holds a byte outside `[A-Za-z0-9._-]`.
    BadChar {
        /// `"relay_id"` or `"peer_id"`.
        field: &'static str,
    },
    /// `expires_at` is not later than `issued_at`.
    BadLifetime,
    /// Bytes follow the signature.
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

impl fmt::Display for MalformedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const RESEND: &str =
            "the client must send the ticket bytes exactly as the broker issued them";
        match self {
            MalformedReason::TooLong { len } => write!(
                f,
                "{len} bytes is longer than any ticket ({MAX_TICKET_LEN} at most): {RESEND}"
            ),
            MalformedReason::Truncated { field } => {
                write!(f, "it ends inside the {field} field: {RESEND}")
            }
            MalformedReason::BadMagic => write!(
                f,
                "it does not start with \"SYT\", so it is not a Steelyard ticket: {RESEND}"
            ),
            MalformedReason::UnsupportedVersion { version } => write!(
                f,
                "ticket version {version} is not supported (this build reads version \
                 {TICKET_VERSION}): run broker and relay versions that share a ticket format"
            ),
            MalformedReason::BadSide { value } => {
                write!(f, "side byte {value} is neither 0 (A) nor 1 (B): {RESEND}")
            }
            MalformedReason::BadTransport { value } => write!(
                f,
                "transport byte {value} is neither 0 (TCP) nor 1 (UDP): {RESEND}"
            ),
            MalformedReason::BadLength { field, len } => write!(
                f,
                "{field} length {len} is outside 1..={MAX_ID_LEN}: {RESEND}"
            ),
            MalformedReason::BadChar { field } => {
                write!(f, "{field} holds a byte outside [A-Za-z0-9._-]: {RESEND}")
            }
            MalformedReason::BadLifetime => write!(
                f,
                "expires_at is not later than issued_at: ask the broker for a new connection"
            ),
            MalformedReason::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes follow the signature: {RESEND}")
            }
        }
    }
}

/// Why a ticket was refused, or could not be signed.
///
/// A relay maps each variant to a status code on the wire. The messages say what was wrong and
/// what to do; the values they show come from the ticket only once it parsed, so they are
/// printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The bytes are not a well-formed version-1 ticket.
    #[error("malformed ticket: {reason}")]
    Malformed {
        /// What exactly is wrong.
        reason: MalformedReason,
    },
    /// The key id is unknown or the signature does not verify.
    #[error("forged ticket (key id {key_id}): {reason}")]
    Forged {
        /// The key id the ticket claims.
        key_id: KeyId,
        /// Unknown key or bad signature.
        reason: ForgedReason,
    },
    /// `now` is at or past the ticket's `expires_at`.
    #[error("ticket expired at {expired_at} (now {now}): ask the broker for a new connection")]
    Expired {
        /// The ticket's `expires_at`.
        expired_at: u64,
        /// The `now` it was checked against.
        now: u64,
    },
    /// `issued_at` lies further in the future than the allowed clock skew.
    #[error(
        "ticket not valid before {issued_at} (now {now}, allowed clock skew {max_skew_secs} s): \
         check that the clocks of the broker and this relay are synchronised (NTP)"
    )]
    NotYetValid {
        /// The ticket's `issued_at`.
        issued_at: u64,
        /// The `now` it was checked against.
        now: u64,
        /// The verifier's clock-skew allowance.
        max_skew_secs: u64,
    },
    /// The ticket was issued for another relay.
    #[error(
        "ticket is for relay {ticket_relay:?} but this is relay {this_relay:?}: connect to the \
         relay the broker named, or ask the broker for a new connection"
    )]
    WrongRelay {
        /// The relay the ticket names.
        ticket_relay: String,
        /// The relay that checked it.
        this_relay: String,
    },
    /// Signing refused a ticket whose fields break the rules.
    #[error("cannot sign ticket: {field} {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// The rule it breaks.
        reason: &'static str,
    },
}

fn malformed(reason: MalformedReason) -> TicketError {
    TicketError::Malformed { reason }
}

/// A ticket that parsed but whose signature has not been checked, for tools and diagnostics.
///
/// Nothing in it may be trusted; relays use [`TicketVerifier::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnverifiedTicket<'a> {
    /// The decoded fields.
    pub ticket: Ticket,
    /// The bytes the signature covers (everything before it).
    pub signed_part: &'a [u8],
    /// The Ed25519 signature.
    pub signature: [u8; SIGNATURE_LEN],
}

/// Parses `bytes` as a ticket without checking its signature.
///
/// Total: any input gives a value or [`TicketError::Malformed`]; it never panics and reads at
/// most [`MAX_TICKET_LEN`] bytes.
pub fn decode_unverified(bytes: &[u8]) -> Result<UnverifiedTicket<'_>, TicketError> {
    if bytes.len() > MAX_TICKET_LEN {
        return Err(malformed(MalformedReason::TooLong { len: bytes.len() }));
    }
    let mut r = Reader { rest: bytes };
    if r.array::<3>("magic")? != TICKET_MAGIC {
        return Err(malformed(MalformedReason::BadMagic));
    }
    let version = r.u8("version")?;
    if version != TICKET_VERSION {
        return Err(malformed(MalformedReason::UnsupportedVersion { version }));
    }
    let key_id = KeyId(r.array("key_id")?);
    let session_id = SessionId(r.array("session_id")?);
    let side = r.u8("side")?;
    let side = Side::from_wire(side).ok_or(malformed(MalformedReason::BadSide { value: side }))?;
    let transport = r.u8("transport")?;
    let transport =
        Transport::from_wire(transport).ok_or(malformed(MalformedReason::BadTransport {
            value: transport,
        }))?;
    let issued_at = r.u64("issued_at")?;
    let expires_at = r.u64("expires_at")?;
    let limits = TicketLimits {
        max_bytes_per_sec: r.u64("max_bytes_per_sec")?,
        max_total_bytes: r.u64("max_total_bytes")?,
        idle_timeout_secs: r.u32("idle_timeout_secs")?,
    };
    let relay_id = r.id("relay_id")?;
    let peer_id = r.id("peer_id")?;
    let (signed_part, _) = bytes.split_at(bytes.len() - r.rest.len());
    let signature = r.array("signature")?;
    if !r.rest.is_empty() {
        return Err(malformed(MalformedReason::TrailingBytes {
            extra: r.rest.len(),
        }));
    }
    if expires_at <= issued_at {
        return Err(malformed(MalformedReason::BadLifetime));
    }
    Ok(UnverifiedTicket {
        ticket: Ticket {
            key_id,
            session_id,
            relay_id,
            side,
            peer_id,
            issued_at,
            expires_at,
            limits,
            transport,
        },
        signed_part,
        signature,
    })
}

/// Reads fields front to back; every read either succeeds or reports the field it ran out in.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], TicketError> {
        if self.rest.len() < n {
            return Err(malformed(MalformedReason::Truncated { field }));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], TicketError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, TicketError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, TicketError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, TicketError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A u8-length-prefixed id string.
    fn id(&mut self, field: &'static str) -> Result<String, TicketError> {
        let len = self.u8(field)?;
        if len == 0 || usize::from(len) > MAX_ID_LEN {
            return Err(malformed(MalformedReason::BadLength { field, len }));
        }
        let raw = self.take(usize::from(len), field)?;
        if !raw.iter().copied().all(is_id_byte) {
            return Err(malformed(MalformedReason::BadChar { field }));
        }
        // All bytes are ASCII, so this cannot fail; map the error anyway to stay total.
        String::from_utf8(raw.to_vec()).map_err(|_| malformed(MalformedReason::BadChar { field }))
    }
}

/// Signs tickets with the broker's Ed25519 key.
///
/// `Debug` shows only the key id, never the secret.
pub struct TicketSigner {
    key: SigningKey,
    key_id: KeyId,
}

impl TicketSigner {
    /// A signer whose secret key is the 32-byte Ed25519 seed `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(&seed))
    }

    /// A signer using `key`.
    pub fn from_signing_key(key: SigningKey) -> Self {
        let key_id = KeyId::of(&key.verifying_key());
        Self { key, key_id }
    }

    /// The id that tickets signed by this signer must carry, and that relays look the key up by.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The public key relays need to verify this signer's tickets.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Checks `ticket` ([`Ticket::validate`], and that its `key_id` is this signer's), then
    /// encodes and signs it. The result is [`Ticket::encoded_len`] bytes long.
    pub fn sign(&self, ticket: &Ticket) -> Result<Vec<u8>, TicketError> {
        ticket.validate()?;
        if ticket.key_id != self.key_id {
            return Err(TicketError::Invalid {
                field: "key_id",
                reason: "is not this signer's key id: set it from TicketSigner::key_id()",
            });
        }
        let mut out = ticket.encode_signed_part();
        let signature = self.key.sign(&out);
        out.extend_from_slice(&signature.to_bytes());
        Ok(out)
    }
}

impl fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Verifies tickets offline against a set of trusted broker public keys, indexed by key id.
///
/// Trust several keys while the broker rotates: add the new key, let the broker sign with it,
/// and remove the old key once every ticket signed with it has expired.
#[derive(Debug, Clone)]
pub struct TicketVerifier {
    keys: BTreeMap<KeyId, VerifyingKey>,
    max_clock_skew_secs: u64,
}

impl TicketVerifier {
    /// A verifier trusting `keys`, with a clock-skew allowance of
    /// [`DEFAULT_MAX_CLOCK_SKEW_SECS`].
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        let mut verifier = Self {
            keys: BTreeMap::new(),
            max_clock_skew_secs: DEFAULT_MAX_CLOCK_SKEW_SECS,
        };
        for key in keys {
            verifier.add(key);
        }
        verifier
    }

    /// Sets how many seconds `issued_at` may lie ahead of `now` before a ticket is
    /// [`TicketError::NotYetValid`].
    #[must_use]
    pub fn with_max_clock_skew(mut self, secs: u64) -> Self {
        self.max_clock_skew_secs = secs;
        self
    }

    /// The clock-skew allowance in seconds.
    pub fn max_clock_skew_secs(&self) -> u64 {
        self.max_clock_skew_secs
    }

    /// Trusts `key`. Returns the key it replaces if one with the same [`KeyId`] was trusted.
    pub fn add(&mut self, key: VerifyingKey) -> Option<VerifyingKey> {
        self.keys.insert(KeyId::of(&key), key)
    }

    /// Stops trusting the key with id `key_id`; its tickets become [`TicketError::Forged`].
    /// Returns the key if it was trusted.
    pub fn remove(&mut self, key_id: KeyId) -> Option<VerifyingKey> {
        self.keys.remove(&key_id)
    }

    /// Whether a key with id `key_id` is trusted.
    pub fn contains(&self, key_id: KeyId) -> bool {
        self.keys.contains_key(&key_id)
    }

    /// The ids of the trusted keys, in ascending order.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.keys().copied()
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is trusted (then every ticket is [`TicketError::Forged`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies the ticket in `bytes` for the relay named `this_relay` at unix time `now`.
    ///
    /// Checks, reporting the first failure: parse ([`TicketError::Malformed`]), trusted key and
    /// valid signature ([`TicketError::Forged`]), relay ([`TicketError::WrongRelay`]), time
    /// ([`TicketError::NotYetValid`], [`TicketError::Expired`]). Total: never panics.
    ///
    /// It does not detect reuse; see the [module docs](self).
    pub fn verify(&self, bytes: &[u8], this_relay: &str, now: u64) -> Result<Ticket, TicketError> {
        let UnverifiedTicket {
            ticket,
            signed_part,
            signature,
        } = decode_unverified(bytes)?;

        let key = self.keys.get(&ticket.key_id).ok_or(TicketError::Forged {
            key_id: ticket.key_id,
            reason: ForgedReason::UnknownKey,
        })?;
        key.verify_strict(signed_part, &Signature::from_bytes(&signature))
            .map_err(|_| TicketError::Forged {
                key_id: ticket.key_id,
                reason: ForgedReason::BadSignature,
            })?;

        if ticket.relay_id != this_relay {
            return Err(TicketError::WrongRelay {
                ticket_relay: ticket.relay_id,
                this_relay: this_relay.to_owned(),
            });
        }

        if ticket.issued_at > now.saturating_add(self.max_clock_skew_secs) {
            return Err(TicketError::NotYetValid {
                issued_at: ticket.issued_at,
                now,
                max_skew_secs: self.max_clock_skew_secs,
            });
        }
        if now >= ticket.expires_at {
            return Err(TicketError::Expired {
                expired_at: ticket.expires_at,
                now,
            });
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_constants() {
        assert_eq!(FIXED_LEN, 66);
        assert_eq!(MIN_TICKET_LEN, 134);
        assert_eq!(MAX_TICKET_LEN, 260);
    }

    #[test]
    fn ids_display_and_parse() {
        let key_id = KeyId([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        assert_eq!(key_id.to_string(), "deadbeef00010203");
        assert_eq!(format!("{key_id:?}"), "KeyId(deadbeef00010203)");
        assert_eq!("DEADBEEF00010203".parse::<KeyId>(), Ok(key_id));
        assert!("deadbeef".parse::<KeyId>().is_err());

        let session = SessionId([0xab; 16]);
        assert_eq!(session.to_string(), "ab".repeat(16));
        assert_eq!(session.to_string().parse::<SessionId>(), Ok(session));
    }

    #[test]
    fn key_id_is_public_key_prefix() {
        let signer = TicketSigner::from_seed([9; 32]);
        assert_eq!(signer.key_id().0[..], signer.public_key().as_bytes()[..8]);
        let debug = format!("{signer:?}");
        assert!(debug.contains(&signer.key_id().to_string()), "{debug}");
    }

    #[test]
    fn id_rules() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("relay-eu_1.example"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id("slash/"));
        assert!(!is_valid_id("ünï"));
    }

    #[test]
    fn side_other() {
        assert_eq!(Side::A.other(), Side::B);
        assert_eq!(Side::B.other(), Side::A);
    }
}
