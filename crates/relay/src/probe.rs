//! Sans-I/O probe responder: echo replies (sequence, timestamps, observed TTL, load hint) and
//! rate-limited bandwidth bursts.
//!
//! An echo reply is never longer than its request (it is padded to exactly the request's
//! length, so both directions carry the same size; requests shorter than
//! [`ECHO_LEN`] are dropped). A burst is sent only to a client that
//! proved it receives at its source address: the first burst request gets a 24-byte cookie
//! (shorter than the 28-byte request) keyed on the source address and a 30-second window; only
//! a request carrying that cookie gets the burst, which is capped in packets and packet size
//! and in total bytes per second over all clients. So spoofed requests cannot aim bursts at a
//! victim.
//!
//! What it does not do: sockets, clocks, or TTL reading (the I/O layer reads `IP_RECVTTL`).

use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use crate::limit::TokenBucket;
use crate::wire::{decode_probe, encode_probe, Probe, BURST_DATA_MIN_LEN, ECHO_LEN};

/// Largest burst packet.
pub const MAX_BURST_PACKET_LEN: usize = 1400;

/// What to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// Nothing.
    Ignore,
    /// One reply datagram to the source.
    Reply(Vec<u8>),
    /// Several datagrams to the source.
    Burst(Vec<Vec<u8>>),
}

/// The probe responder state: the cookie secret and the burst budget.
pub struct ProbeResponder {
    secret: [u8; 32],
    budget: TokenBucket,
    max_packets: u16,
}

impl ProbeResponder {
    /// A responder with cookie `secret`, sending bursts of at most `max_packets` packets and
    /// `bytes_per_sec` in total.
    pub fn new(secret: [u8; 32], max_packets: u16, bytes_per_sec: u64, now_us: u64) -> Self {
        Self {
            secret,
            budget: TokenBucket::new(bytes_per_sec.max(1), now_us),
            max_packets,
        }
    }

    fn cookie(&self, src: SocketAddr, window: u64) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(self.secret);
        match src.ip() {
            std::net::IpAddr::V4(ip) => h.update(ip.octets()),
            std::net::IpAddr::V6(ip) => h.update(ip.octets()),
        }
        h.update(src.port().to_be_bytes());
        h.update(window.to_be_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize()[..16]);
        out
    }

    /// Answers one probe datagram from `src`. `ttl` is the TTL or hop limit the socket layer
    /// observed (0 if unknown), `load` the relay's load in percent, `now_us` unix microseconds.
    pub fn respond(
        &mut self,
        src: SocketAddr,
        req: &[u8],
        ttl: u8,
        load: u8,
        draining: bool,
        now_us: u64,
    ) -> ProbeAction {
        match decode_probe(req) {
            Ok(Probe::EchoRequest {
                seq,
                client_ts,
                len,
            }) => {
                let mut out = encode_probe(&Probe::EchoReply {
                    seq,
                    client_ts,
                    relay_rx_us: now_us,
                    ttl,
                    load,
                    draining,
                });
                debug_assert!(out.len() <= ECHO_LEN);
                out.resize(len, 0);
                ProbeAction::Reply(out)
            }
            Ok(Probe::BurstRequest {
                seq,
                cookie,
                packets,
                packet_len,
            }) => {
                let window = now_us / 30_000_000;
                let valid = cookie == self.cookie(src, window)
                    || cookie == self.cookie(src, window.saturating_sub(1));
                if !valid {
                    return ProbeAction::Reply(encode_probe(&Probe::BurstCookie {
                        seq,
                        cookie: self.cookie(src, window),
                    }));
                }
                let count = packets.clamp(1, self.max_packets.max(1));
                let len = usize::from(packet_len).clamp(BURST_DATA_MIN_LEN, MAX_BURST_PACKET_LEN);
                let total = u64::from(count) * len as u64;
                if !self.budget.take_exact(total, now_us) {
                    return ProbeAction::Ignore;
                }
                ProbeAction::Burst(
                    (0..count)
                        .map(|index| {
                            encode_probe(&Probe::BurstData {
                                seq,
                                index,
                                count,
                                relay_tx_us: now_us,
                                len,
                            })
                        })
                        .collect(),
                )
            }
            _ => ProbeAction::Ignore,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn echo_is_never_larger_than_request() {
        let mut r = ProbeResponder::new([1; 32], 8, 1_000_000, 0);
        for len in [0usize, 4, 10, ECHO_LEN - 1, ECHO_LEN, 100, 1400] {
            let mut req = encode_probe(&Probe::EchoRequest {
                seq: 3,
                client_ts: 99,
                len: ECHO_LEN,
            });
            req.resize(len, 0);
            match r.respond(src(), &req, 61, 7, false, 1234) {
                ProbeAction::Reply(out) => {
                    assert!(out.len() <= req.len());
                    assert_eq!(
                        decode_probe(&out),
                        Ok(Probe::EchoReply {
                            seq: 3,
                            client_ts: 99,
                            relay_rx_us: 1234,
                            ttl: 61,
                            load: 7,
                            draining: false
                        })
                    );
                }
                ProbeAction::Ignore => assert!(len < ECHO_LEN),
                a => panic!("{a:?}"),
            }
        }
    }

    #[test]
    fn burst_needs_cookie_and_is_rate_limited() {
        let mut r = ProbeResponder::new([1; 32], 8, 100_000, 0);
        let ask = |cookie| {
            encode_probe(&Probe::BurstRequest {
                seq: 1,
                cookie,
                packets: 100,
                packet_len: 1000,
            })
        };
        let ProbeAction::Reply(c) = r.respond(src(), &ask([0; 16]), 0, 0, false, 0) else {
            panic!()
        };
        assert!(c.len() <= ask([0; 16]).len());
        let Ok(Probe::BurstCookie { cookie, .. }) = decode_probe(&c) else {
            panic!()
        };
        // Another source address cannot use this cookie.
        let other: SocketAddr = "127.0.0.2:5000".parse().unwrap();
        assert!(matches!(
            r.respond(other, &ask(cookie), 0, 0, false, 0),
            ProbeAction::Reply(_)
        ));
        let ProbeAction::Burst(p) = r.respond(src(), &ask(cookie), 0, 0, false, 0) else {
            panic!()
        };
        assert_eq!(p.len(), 8);
        assert!(p.iter().all(|x| x.len() == 1000));
        // Budget: 64 KiB burst allowance, then limited.
        let mut sent = 8000;
        while let ProbeAction::Burst(p) = r.respond(src(), &ask(cookie), 0, 0, false, 0) {
            sent += p.len() * 1000;
        }
        assert!(sent <= 64 * 1024 + 8000, "{sent}");
    }
}
