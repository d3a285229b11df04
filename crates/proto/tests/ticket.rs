//! Session tickets: round trips, totality, key rotation and every refusal.

use proptest::prelude::*;
use steelyard_proto::ticket::{
    decode_unverified, ForgedReason, KeyId, MalformedReason, SessionId, Side, Ticket, TicketError,
    TicketLimits, TicketSigner, TicketVerifier, Transport, DEFAULT_MAX_CLOCK_SKEW_SECS,
    MAX_TICKET_LEN, MIN_TICKET_LEN, SIGNATURE_LEN,
};

const RELAY: &str = "relay-eu-1";
const ISSUED: u64 = 1_700_000_000;
const EXPIRES: u64 = ISSUED + 60;
const NOW: u64 = ISSUED + 5;

fn signer() -> TicketSigner {
    TicketSigner::from_seed([1; 32])
}

fn ticket_for(signer: &TicketSigner) -> Ticket {
    Ticket {
        key_id: signer.key_id(),
        session_id: SessionId(*b"0123456789abcdef"),
        relay_id: RELAY.to_owned(),
        side: Side::B,
        peer_id: "desk.bob".to_owned(),
        issued_at: ISSUED,
        expires_at: EXPIRES,
        limits: TicketLimits {
            max_bytes_per_sec: 1_000_000,
            max_total_bytes: 0,
            idle_timeout_secs: 120,
        },
        transport: Transport::Udp,
    }
}

fn signed(signer: &TicketSigner, ticket: &Ticket) -> Vec<u8> {
    signer.sign(ticket).expect("valid ticket signs")
}

fn malformed(result: Result<impl std::fmt::Debug, TicketError>) -> MalformedReason {
    match result {
        Err(TicketError::Malformed { reason }) => reason,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// Re-signs a hand-edited signed part so that only the edit, not the signature, is wrong.
fn resign(signer_seed: [u8; 32], signed_part: &[u8]) -> Vec<u8> {
    use ed25519_dalek::{Signer, SigningKey};
    let key = SigningKey::from_bytes(&signer_seed);
    let mut out = signed_part.to_vec();
    out.extend_from_slice(&key.sign(signed_part).to_bytes());
    out
}

// ---------------------------------------------------------------- round trips

#[test]
fn sign_then_verify_round_trip() {
    let signer = signer();
    let ticket = ticket_for(&signer);
    let bytes = signed(&signer, &ticket);
    assert_eq!(bytes.len(), ticket.encoded_len());
    assert_eq!(bytes.len(), 132 + RELAY.len() + "desk.bob".len());

    let verifier = TicketVerifier::new([signer.public_key()]);
    assert_eq!(verifier.verify(&bytes, RELAY, NOW), Ok(ticket.clone()));

    let decoded = decode_unverified(&bytes).unwrap();
    assert_eq!(decoded.ticket, ticket);
    assert_eq!(decoded.signed_part, &bytes[..bytes.len() - SIGNATURE_LEN]);
    assert_eq!(decoded.signature[..], bytes[bytes.len() - SIGNATURE_LEN..]);
}

#[test]
fn wire_layout_is_as_documented() {
    let signer = signer();
    let ticket = ticket_for(&signer);
    let b = signed(&signer, &ticket);
    assert_eq!(&b[0..3], b"SYT");
    assert_eq!(b[3], 1);
    assert_eq!(b[4..12], signer.public_key().as_bytes()[..8]);
    assert_eq!(&b[12..28], b"0123456789abcdef");
    assert_eq!(b[28], 1, "side B");
    assert_eq!(b[29], 1, "udp");
    assert_eq!(b[30..38], ISSUED.to_be_bytes());
    assert_eq!(b[38..46], EXPIRES.to_be_bytes());
    assert_eq!(b[46..54], 1_000_000u64.to_be_bytes());
    assert_eq!(b[54..62], 0u64.to_be_bytes());
    assert_eq!(b[62..66], 120u32.to_be_bytes());
    assert_eq!(b[66], 10);
    assert_eq!(&b[67..77], RELAY.as_bytes());
    assert_eq!(b[77], 8);
    assert_eq!(&b[78..86], b"desk.bob");
    assert_eq!(b.len(), 86 + 64);
}

#[test]
fn shortest_and_longest_tickets() {
    let signer = signer();
    let verifier = TicketVerifier::new([signer.public_key()]);
    for (relay, peer, len) in [
        ("r".to_owned(), "p".to_owned(), MIN_TICKET_LEN),
        ("r".repeat(64), "p".repeat(64), MAX_TICKET_LEN),
    ] {
        let ticket = Ticket {
            relay_id: relay.clone(),
            peer_id: peer,
            ..ticket_for(&signer)
        };
        let bytes = signed(&signer, &ticket);
        assert_eq!(bytes.len(), len);
        assert_eq!(verifier.verify(&bytes, &relay, NOW), Ok(ticket));
    }
}

fn id_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn ticket_strategy(key_id: KeyId) -> impl Strategy<Value = Ticket> {
    (
        any::<[u8; 16]>(),
        id_strategy(),
        any::<bool>(),
        id_strategy(),
        (any::<u64>(), any::<u64>()).prop_filter("distinct times", |(a, b)| a != b),
        (any::<u64>(), any::<u64>(), any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            move |(session, relay_id, side_b, peer_id, (t1, t2), (bps, total, idle), udp)| Ticket {
                key_id,
                session_id: SessionId(session),
                relay_id,
                side: if side_b { Side::B } else { Side::A },
                peer_id,
                issued_at: t1.min(t2),
                expires_at: t1.max(t2),
                limits: TicketLimits {
                    max_bytes_per_sec: bps,
                    max_total_bytes: total,
                    idle_timeout_secs: idle,
                },
                transport: if udp { Transport::Udp } else { Transport::Tcp },
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_valid_tickets_round_trip(ticket in ticket_strategy(signer().key_id())) {
        let signer = signer();
        let bytes = signer.sign(&ticket).unwrap();
        prop_assert_eq!(bytes.len(), ticket.encoded_len());
        prop_assert!((MIN_TICKET_LEN..=MAX_TICKET_LEN).contains(&bytes.len()));

        let decoded = decode_unverified(&bytes).unwrap();
        prop_assert_eq!(&decoded.ticket, &ticket);

        // Verify at the first valid second: accepted.
        let verifier = TicketVerifier::new([signer.public_key()]);
        let ok = verifier.verify(&bytes, &ticket.relay_id, ticket.issued_at);
        prop_assert_eq!(ok, Ok(ticket.clone()));
        // And at expires_at: expired.
        let expired = verifier.verify(&bytes, &ticket.relay_id, ticket.expires_at);
        prop_assert_eq!(
            expired,
            Err(TicketError::Expired { expired_at: ticket.expires_at, now: ticket.expires_at })
        );
    }

    // ------------------------------------------------------------ totality

    #[test]
    fn any_bytes_decode_or_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let verifier = TicketVerifier::new([signer().public_key()]);
        let _ = decode_unverified(&bytes);
        let _ = verifier.verify(&bytes, RELAY, NOW);
    }

    #[test]
    fn valid_header_then_garbage_is_refused(
        tail in proptest::collection::vec(any::<u8>(), 0..300),
        cut in 0usize..66,
    ) {
        // Keep a valid prefix so the decoder gets past the magic and version.
        let signer = signer();
        let mut bytes = signed(&signer, &ticket_for(&signer));
        bytes.truncate(cut.max(4));
        bytes.extend_from_slice(&tail);
        let verifier = TicketVerifier::new([signer.public_key()]);
        let _ = decode_unverified(&bytes);
        prop_assert!(verifier.verify(&bytes, RELAY, NOW).is_err());
    }

    #[test]
    fn any_now_and_relay_never_panic(now in any::<u64>(), relay in ".{0,80}", skew in any::<u64>()) {
        let signer = signer();
        let bytes = signed(&signer, &ticket_for(&signer));
        let verifier = TicketVerifier::new([signer.public_key()]).with_max_clock_skew(skew);
        let _ = verifier.verify(&bytes, &relay, now);
    }
}

#[test]
fn every_single_byte_mutation_is_refused() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let verifier = TicketVerifier::new([signer.public_key()]);
    let signature_start = bytes.len() - SIGNATURE_LEN;
    for i in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut mutated = bytes.clone();
            mutated[i] ^= mask;
            let result = verifier.verify(&mutated, RELAY, NOW);
            assert!(result.is_err(), "byte {i} ^ {mask:#04x} accepted");
            if i >= signature_start {
                assert_eq!(
                    result,
                    Err(TicketError::Forged {
                        key_id: signer.key_id(),
                        reason: ForgedReason::BadSignature
                    }),
                    "signature byte {i} ^ {mask:#04x}"
                );
            }
        }
    }
}

#[test]
fn every_truncation_is_malformed() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let verifier = TicketVerifier::new([signer.public_key()]);
    for len in 0..bytes.len() {
        let reason = malformed(verifier.verify(&bytes[..len], RELAY, NOW));
        assert!(
            matches!(reason, MalformedReason::Truncated { .. }),
            "cut at {len}: {reason:?}"
        );
    }
    assert_eq!(
        malformed(decode_unverified(&bytes[..bytes.len() - 1])),
        MalformedReason::Truncated { field: "signature" }
    );
    assert_eq!(
        malformed(decode_unverified(&[])),
        MalformedReason::Truncated { field: "magic" }
    );
}

// ------------------------------------------------------------ key rotation

#[test]
fn key_rotation() {
    let old = TicketSigner::from_seed([1; 32]);
    let new = TicketSigner::from_seed([2; 32]);
    assert_ne!(old.key_id(), new.key_id());
    let old_ticket = signed(&old, &ticket_for(&old));
    let new_ticket = signed(&new, &ticket_for(&new));

    let mut verifier = TicketVerifier::new([old.public_key(), new.public_key()]);
    assert_eq!(verifier.len(), 2);
    assert!(verifier.verify(&old_ticket, RELAY, NOW).is_ok());
    assert!(verifier.verify(&new_ticket, RELAY, NOW).is_ok());

    assert_eq!(verifier.remove(old.key_id()), Some(old.public_key()));
    assert!(!verifier.contains(old.key_id()));
    assert_eq!(verifier.key_ids().collect::<Vec<_>>(), vec![new.key_id()]);
    assert_eq!(
        verifier.verify(&old_ticket, RELAY, NOW),
        Err(TicketError::Forged {
            key_id: old.key_id(),
            reason: ForgedReason::UnknownKey
        })
    );
    assert!(verifier.verify(&new_ticket, RELAY, NOW).is_ok());

    // Removing twice is harmless; adding back restores trust.
    assert_eq!(verifier.remove(old.key_id()), None);
    assert_eq!(verifier.add(old.public_key()), None);
    assert!(verifier.verify(&old_ticket, RELAY, NOW).is_ok());
    assert_eq!(verifier.add(old.public_key()), Some(old.public_key()));
}

#[test]
fn empty_verifier_trusts_nothing() {
    let signer = signer();
    let verifier = TicketVerifier::new([]);
    assert!(verifier.is_empty());
    let bytes = signed(&signer, &ticket_for(&signer));
    assert!(matches!(
        verifier.verify(&bytes, RELAY, NOW),
        Err(TicketError::Forged {
            reason: ForgedReason::UnknownKey,
            ..
        })
    ));
}

// ------------------------------------------------------------ each refusal

#[test]
fn forged_by_another_key_claiming_a_trusted_key_id() {
    let broker = signer();
    let attacker = TicketSigner::from_seed([66; 32]);
    // The attacker signs a ticket that claims the broker's key id.
    let ticket = ticket_for(&broker);
    let mut body = signed(&broker, &ticket);
    body.truncate(body.len() - SIGNATURE_LEN);
    let forged = resign([66; 32], &body);
    assert_ne!(attacker.key_id(), broker.key_id());

    let verifier = TicketVerifier::new([broker.public_key()]);
    let err = verifier.verify(&forged, RELAY, NOW).unwrap_err();
    assert_eq!(
        err,
        TicketError::Forged {
            key_id: broker.key_id(),
            reason: ForgedReason::BadSignature
        }
    );
    assert!(
        err.to_string().contains("signature does not match"),
        "{err}"
    );
}

#[test]
fn forged_by_unknown_key() {
    let broker = signer();
    let stranger = TicketSigner::from_seed([3; 32]);
    let bytes = signed(&stranger, &ticket_for(&stranger));
    let verifier = TicketVerifier::new([broker.public_key()]);
    let err = verifier.verify(&bytes, RELAY, NOW).unwrap_err();
    assert_eq!(
        err,
        TicketError::Forged {
            key_id: stranger.key_id(),
            reason: ForgedReason::UnknownKey
        }
    );
    let message = err.to_string();
    assert!(
        message.contains(&stranger.key_id().to_string()),
        "{message}"
    );
    assert!(message.contains("does not trust"), "{message}");
}

#[test]
fn forged_beats_wrong_relay_and_expiry() {
    // A forgery is reported as such even when it is also for another relay and expired:
    // nothing unsigned is echoed back.
    let stranger = TicketSigner::from_seed([3; 32]);
    let bytes = signed(&stranger, &ticket_for(&stranger));
    let verifier = TicketVerifier::new([signer().public_key()]);
    assert!(matches!(
        verifier.verify(&bytes, "other-relay", EXPIRES + 1000),
        Err(TicketError::Forged { .. })
    ));
}

#[test]
fn expired() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let verifier = TicketVerifier::new([signer.public_key()]);
    assert!(verifier.verify(&bytes, RELAY, EXPIRES - 1).is_ok());
    let err = verifier.verify(&bytes, RELAY, EXPIRES).unwrap_err();
    assert_eq!(
        err,
        TicketError::Expired {
            expired_at: EXPIRES,
            now: EXPIRES
        }
    );
    assert_eq!(
        err.to_string(),
        format!("ticket expired at {EXPIRES} (now {EXPIRES}): ask the broker for a new connection")
    );
    assert!(matches!(
        verifier.verify(&bytes, RELAY, u64::MAX),
        Err(TicketError::Expired { .. })
    ));
}

#[test]
fn not_yet_valid_respects_clock_skew() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let verifier = TicketVerifier::new([signer.public_key()]);
    assert_eq!(verifier.max_clock_skew_secs(), DEFAULT_MAX_CLOCK_SKEW_SECS);
    assert_eq!(DEFAULT_MAX_CLOCK_SKEW_SECS, 30);

    // Exactly 30 s ahead of the relay's clock is still fine; 31 s is not.
    assert!(verifier.verify(&bytes, RELAY, ISSUED - 30).is_ok());
    let err = verifier.verify(&bytes, RELAY, ISSUED - 31).unwrap_err();
    assert_eq!(
        err,
        TicketError::NotYetValid {
            issued_at: ISSUED,
            now: ISSUED - 31,
            max_skew_secs: 30
        }
    );
    assert!(err.to_string().contains("clock"), "{err}");

    let strict = verifier.clone().with_max_clock_skew(0);
    assert!(strict.verify(&bytes, RELAY, ISSUED).is_ok());
    assert!(matches!(
        strict.verify(&bytes, RELAY, ISSUED - 1),
        Err(TicketError::NotYetValid { .. })
    ));
    let lenient = verifier.with_max_clock_skew(u64::MAX);
    assert!(lenient.verify(&bytes, RELAY, 0).is_ok());
}

#[test]
fn wrong_relay() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let verifier = TicketVerifier::new([signer.public_key()]);
    let err = verifier.verify(&bytes, "relay-us-2", NOW).unwrap_err();
    assert_eq!(
        err,
        TicketError::WrongRelay {
            ticket_relay: RELAY.to_owned(),
            this_relay: "relay-us-2".to_owned()
        }
    );
    assert!(err.to_string().contains("relay-us-2"), "{err}");
    // Relay ids compare exactly (no case folding).
    assert!(matches!(
        verifier.verify(&bytes, "RELAY-EU-1", NOW),
        Err(TicketError::WrongRelay { .. })
    ));
    // Wrong relay is reported before expiry.
    assert!(matches!(
        verifier.verify(&bytes, "relay-us-2", EXPIRES),
        Err(TicketError::WrongRelay { .. })
    ));
}

#[test]
fn malformed_bad_magic() {
    let signer = signer();
    let mut bytes = signed(&signer, &ticket_for(&signer));
    bytes[0] = b'X';
    assert_eq!(
        malformed(decode_unverified(&bytes)),
        MalformedReason::BadMagic
    );
    assert_eq!(
        malformed(decode_unverified(b"GET / HTTP/1.1\r\n")),
        MalformedReason::BadMagic
    );
}

#[test]
fn malformed_bad_version() {
    let signer = signer();
    let mut bytes = signed(&signer, &ticket_for(&signer));
    bytes[3] = 2;
    let err = decode_unverified(&bytes).unwrap_err();
    assert_eq!(
        err,
        TicketError::Malformed {
            reason: MalformedReason::UnsupportedVersion { version: 2 }
        }
    );
    assert!(err.to_string().contains("version 2"), "{err}");
    let verifier = TicketVerifier::new([signer.public_key()]);
    assert_eq!(verifier.verify(&bytes, RELAY, NOW), Err(err));
}

#[test]
fn malformed_trailing_bytes() {
    let signer = signer();
    let mut bytes = signed(&signer, &ticket_for(&signer));
    bytes.push(0);
    assert_eq!(
        malformed(decode_unverified(&bytes)),
        MalformedReason::TrailingBytes { extra: 1 }
    );
    let verifier = TicketVerifier::new([signer.public_key()]);
    assert!(matches!(
        verifier.verify(&bytes, RELAY, NOW),
        Err(TicketError::Malformed { .. })
    ));
}

#[test]
fn malformed_too_long() {
    let bytes = vec![0u8; MAX_TICKET_LEN + 1];
    assert_eq!(
        malformed(decode_unverified(&bytes)),
        MalformedReason::TooLong {
            len: MAX_TICKET_LEN + 1
        }
    );
}

#[test]
fn malformed_bad_string_chars() {
    let signer = signer();
    let ticket = ticket_for(&signer);
    let bytes = signed(&signer, &ticket);
    let relay_start = 67;
    let peer_start = relay_start + RELAY.len() + 1;
    for (offset, field) in [(relay_start, "relay_id"), (peer_start, "peer_id")] {
        for bad in [b' ', b'/', 0, 0x7f, 0xc3] {
            let mut body = bytes[..bytes.len() - SIGNATURE_LEN].to_vec();
            body[offset + 1] = bad;
            // Correctly signed, so only the character rule can refuse it.
            let resigned = resign([1; 32], &body);
            assert_eq!(
                malformed(decode_unverified(&resigned)),
                MalformedReason::BadChar { field },
                "{field} with byte {bad:#04x}"
            );
        }
    }
}

#[test]
fn malformed_string_length_overflow() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let relay_len_at = 66;
    let peer_len_at = 67 + RELAY.len();
    for (at, field) in [(relay_len_at, "relay_id"), (peer_len_at, "peer_id")] {
        for len in [0u8, 65, 200, 255] {
            let mut mutated = bytes.clone();
            mutated[at] = len;
            assert_eq!(
                malformed(decode_unverified(&mutated)),
                MalformedReason::BadLength { field, len },
                "{field} length {len}"
            );
        }
    }
    // A length within 1..=64 that runs past the end of the input is truncation.
    let mut short = bytes[..70].to_vec();
    short[relay_len_at] = 64;
    assert_eq!(
        malformed(decode_unverified(&short)),
        MalformedReason::Truncated { field: "relay_id" }
    );
}

#[test]
fn malformed_side_transport_and_lifetime() {
    let signer = signer();
    let bytes = signed(&signer, &ticket_for(&signer));
    let body = &bytes[..bytes.len() - SIGNATURE_LEN];

    let mut bad_side = body.to_vec();
    bad_side[28] = 2;
    assert_eq!(
        malformed(decode_unverified(&resign([1; 32], &bad_side))),
        MalformedReason::BadSide { value: 2 }
    );

    let mut bad_transport = body.to_vec();
    bad_transport[29] = 0xff;
    assert_eq!(
        malformed(decode_unverified(&resign([1; 32], &bad_transport))),
        MalformedReason::BadTransport { value: 0xff }
    );

    // A correctly signed ticket whose expires_at == issued_at is refused at parse time.
    let mut zero_lifetime = body.to_vec();
    zero_lifetime[38..46].copy_from_slice(&ISSUED.to_be_bytes());
    assert_eq!(
        malformed(decode_unverified(&resign([1; 32], &zero_lifetime))),
        MalformedReason::BadLifetime
    );
}

// ------------------------------------------------------------ signing rules

#[test]
fn sign_validates_fields() {
    let signer = signer();
    let good = ticket_for(&signer);
    let cases: Vec<(Ticket, &str)> = vec![
        (
            Ticket {
                relay_id: String::new(),
                ..good.clone()
            },
            "relay_id",
        ),
        (
            Ticket {
                relay_id: "r".repeat(65),
                ..good.clone()
            },
            "relay_id",
        ),
        (
            Ticket {
                relay_id: "relay eu".into(),
                ..good.clone()
            },
            "relay_id",
        ),
        (
            Ticket {
                peer_id: "bob@desk".into(),
                ..good.clone()
            },
            "peer_id",
        ),
        (
            Ticket {
                peer_id: "bøb".into(),
                ..good.clone()
            },
            "peer_id",
        ),
        (
            Ticket {
                expires_at: good.issued_at,
                ..good.clone()
            },
            "expires_at",
        ),
        (
            Ticket {
                expires_at: good.issued_at - 1,
                ..good.clone()
            },
            "expires_at",
        ),
        (
            Ticket {
                key_id: KeyId([0; 8]),
                ..good.clone()
            },
            "key_id",
        ),
    ];
    for (ticket, expected_field) in cases {
        match signer.sign(&ticket) {
            Err(err @ TicketError::Invalid { field, .. }) => {
                assert_eq!(field, expected_field, "{ticket:?}");
                assert!(err.to_string().starts_with("cannot sign ticket: "), "{err}");
            }
            other => panic!("{ticket:?} gave {other:?}"),
        }
    }
    assert_eq!(good.validate(), Ok(()));
}

#[test]
fn error_messages_say_what_to_do() {
    let cases = [
        (
            TicketError::Malformed {
                reason: MalformedReason::BadMagic,
            },
            "exactly as the broker issued them",
        ),
        (
            TicketError::Malformed {
                reason: MalformedReason::UnsupportedVersion { version: 9 },
            },
            "share a ticket format",
        ),
        (
            TicketError::Forged {
                key_id: KeyId([0; 8]),
                reason: ForgedReason::UnknownKey,
            },
            "add the broker's new public key",
        ),
        (
            TicketError::Forged {
                key_id: KeyId([0; 8]),
                reason: ForgedReason::BadSignature,
            },
            "ask the broker for a new connection",
        ),
        (
            TicketError::Expired {
                expired_at: 1,
                now: 2,
            },
            "ask the broker for a new connection",
        ),
        (
            TicketError::NotYetValid {
                issued_at: 100,
                now: 1,
                max_skew_secs: 30,
            },
            "(NTP)",
        ),
        (
            TicketError::WrongRelay {
                ticket_relay: "a".into(),
                this_relay: "b".into(),
            },
            "connect to the relay the broker named",
        ),
        (
            TicketError::Invalid {
                field: "peer_id",
                reason: "must be 1 to 64 bytes long",
            },
            "peer_id must be 1 to 64 bytes long",
        ),
    ];
    for (err, advice) in cases {
        let message = err.to_string();
        assert!(message.contains(advice), "{message:?} lacks {advice:?}");
    }
}
