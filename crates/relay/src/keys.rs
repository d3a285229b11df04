//! The broker keys this relay trusts for tickets, shared by TCP pairing ([`crate::pairing`])
//! and the UDP core ([`crate::udp_core`]).
//!
//! Two sources, chosen once at start:
//! * **pinned**: `broker_keys` in the config. The set never changes while the relay runs.
//! * **announced**: no `broker_keys`, but a `[broker]` section. The set starts empty and *not
//!   ready*; each broker welcome replaces it with the keys the broker announced
//!   ([`TrustedKeys::announce`]). Until the first welcome every ticket is refused with
//!   [`VerifyError::NotReady`] (status `not_ready`: retry shortly), not `forged`. When the link
//!   drops the last announced keys stay trusted, so tickets already issued keep working.
//!
//! What it does not do: talk to the broker (see [`crate::broker_link`]) or remember used
//! tickets (see [`crate::pairing::ReplayGuard`]).

use std::sync::{Arc, RwLock};

use ed25519_dalek::VerifyingKey;
use steelyard_proto::ticket::{Ticket, TicketError, TicketVerifier};

/// Why a ticket was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The relay takes its keys from the broker and has not had a welcome yet.
    #[error("the relay has not received the broker's ticket keys yet; retry in a moment")]
    NotReady,
    /// The ticket itself failed.
    #[error(transparent)]
    Ticket(#[from] TicketError),
}

#[derive(Debug)]
struct State {
    verifier: TicketVerifier,
    ready: bool,
}

/// The trusted key set. Cheap to clone (all clones share one set). See the [module docs](self).
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    state: Arc<RwLock<State>>,
    pinned: bool,
    skew_secs: u64,
}

impl TrustedKeys {
    /// A fixed set (from the config): ready at once, [`announce`](Self::announce) is ignored.
    pub fn pinned(keys: impl IntoIterator<Item = VerifyingKey>, max_clock_skew_secs: u64) -> Self {
        Self::with(
            TicketVerifier::new(keys).with_max_clock_skew(max_clock_skew_secs),
            true,
            true,
        )
    }

    /// An empty set filled by the broker's welcomes; not ready until the first one.
    pub fn from_broker(max_clock_skew_secs: u64) -> Self {
        Self::with(
            TicketVerifier::new([]).with_max_clock_skew(max_clock_skew_secs),
            false,
            false,
        )
    }

    fn with(verifier: TicketVerifier, pinned: bool, ready: bool) -> Self {
        Self {
            skew_secs: verifier.max_clock_skew_secs(),
            state: Arc::new(RwLock::new(State { verifier, ready })),
            pinned,
        }
    }

    /// Whether the keys come from the config (and announcements are ignored).
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Whether tickets can be verified (pinned, or at least one welcome arrived).
    pub fn is_ready(&self) -> bool {
        self.state.read().unwrap_or_else(|e| e.into_inner()).ready
    }

    /// Whether a key with this id is trusted now.
    pub fn trusts(&self, key: &VerifyingKey) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .verifier
            .contains(steelyard_proto::ticket::KeyId::of(key))
    }

    /// The broker announced `keys` (a welcome): they replace the set, which becomes ready.
    /// Returns `false` (and changes nothing) when the set is pinned.
    pub fn announce(&self, keys: impl IntoIterator<Item = VerifyingKey>) -> bool {
        if self.pinned {
            return false;
        }
        let verifier = TicketVerifier::new(keys).with_max_clock_skew(self.skew_secs);
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = State {
            verifier,
            ready: true,
        };
        true
    }

    /// The clock-skew allowance, seconds.
    pub fn max_clock_skew_secs(&self) -> u64 {
        self.skew_secs
    }

    /// Verifies the ticket in `bytes` for relay `relay_id` at unix time `now_secs`.
    pub fn verify(
        &self,
        bytes: &[u8],
        relay_id: &str,
        now_secs: u64,
    ) -> Result<Ticket, VerifyError> {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        if !s.ready {
            return Err(VerifyError::NotReady);
        }
        Ok(s.verifier.verify(bytes, relay_id, now_secs)?)
    }
}

impl From<TicketVerifier> for TrustedKeys {
    /// A pinned set with `verifier`'s keys and clock-skew allowance.
    fn from(verifier: TicketVerifier) -> Self {
        Self::with(verifier, true, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pairing::tests::{bytes, signer, ticket, NOW};
    use steelyard_proto::ticket::{Side, TicketSigner, Transport};

    #[test]
    fn announced_keys_are_not_ready_until_a_welcome_then_replaced() {
        let keys = TrustedKeys::from_broker(30);
        let shared = keys.clone();
        let t = bytes(&ticket(1, Side::A, Transport::Tcp));
        assert_eq!(keys.verify(&t, "r1", NOW), Err(VerifyError::NotReady));
        assert!(shared.announce([signer().public_key()]));
        assert!(keys.is_ready());
        assert_eq!(keys.verify(&t, "r1", NOW).unwrap().side, Side::A);
        // Rotation: the next welcome names another key only; the old one is no longer trusted.
        assert!(shared.announce([TicketSigner::from_seed([9; 32]).public_key()]));
        assert!(matches!(
            keys.verify(&t, "r1", NOW),
            Err(VerifyError::Ticket(TicketError::Forged { .. }))
        ));
    }

    #[test]
    fn pinned_keys_ignore_announcements() {
        let keys = TrustedKeys::pinned([signer().public_key()], 30);
        assert!(keys.is_ready());
        assert!(!keys.announce([TicketSigner::from_seed([9; 32]).public_key()]));
        let t = bytes(&ticket(1, Side::A, Transport::Tcp));
        assert!(keys.verify(&t, "r1", NOW).is_ok());
    }
}
