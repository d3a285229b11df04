//! Steelyard's store: the broker's durable state behind one trait, [`Store`].
//!
//! What is durable: peer identities (public keys, enrollment, revocation), relays (addresses,
//! keys, capacity, location, draining), settings such as the policy (as JSON text), and the
//! session history. What is *not* here: live state — who is connected, the latest reports and
//! load figures, pending offers. The broker rebuilds those from its agents and relays, which
//! reconnect by themselves after a restart.
//!
//! Backends: [`MemoryStore`] (the default; lost at exit) and [`SqliteStore`] (one file, for
//! durable state on one machine). The trait is synchronous and record-oriented (get, put,
//! list, delete by key, plus a batch upsert of sessions), so a key-value backend such as Redis
//! fits it without a query language. One conformance suite (`tests/conformance.rs`) runs
//! against every backend.
//!
//! What this crate does not do: no networking, no async, no clock (callers pass times in as
//! unix milliseconds), no validation of what the records mean beyond their ids.

#![forbid(unsafe_code)]

mod memory;
mod records;
mod sqlite;

pub use memory::MemoryStore;
pub use records::{PeerRecord, RelayRecord, SessionRecord, SessionState, StoredLocation};
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (I/O, locking, SQL).
    #[error("store backend {backend} failed: {message}")]
    Backend {
        /// Which backend, e.g. `sqlite`.
        backend: &'static str,
        /// What it said.
        message: String,
    },
    /// A stored record could not be decoded: the data was written by an incompatible version
    /// or damaged.
    #[error("stored {kind} {id:?} is corrupt ({message}): restore it from a backup or delete it")]
    Corrupt {
        /// Record kind, e.g. `peer`.
        kind: &'static str,
        /// Its key.
        id: String,
        /// The decoder's complaint.
        message: String,
    },
    /// A record breaks a rule (for example an empty id).
    #[error("invalid {kind}: {message}")]
    Invalid {
        /// Record kind.
        kind: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The broker's durable state. Every method is a short, synchronous operation; callers that
/// must not block (async tasks) batch writes and run them off the hot path.
///
/// Semantics every backend obeys (checked by the conformance suite):
/// * `put_*` inserts or replaces the record with the same key; `get_*` returns the last one put;
/// * `list_peers`/`list_relays` return all records ordered by id;
/// * `list_sessions(limit)` returns the newest `limit` sessions by `created_at` (ties by id),
///   newest first;
/// * `delete_*` returns whether a record was there;
/// * ids must be non-empty, or the call fails with [`StoreError::Invalid`].
pub trait Store: Send + Sync + 'static {
    /// The backend's name: `memory`, `sqlite`, ...
    fn backend(&self) -> &'static str;

    /// Inserts or replaces a peer.
    fn put_peer(&self, peer: &PeerRecord) -> Result<(), StoreError>;
    /// The peer with id `id`.
    fn get_peer(&self, id: &str) -> Result<Option<PeerRecord>, StoreError>;
    /// Every peer, by id.
    fn list_peers(&self) -> Result<Vec<PeerRecord>, StoreError>;
    /// Forgets a peer.
    fn delete_peer(&self, id: &str) -> Result<bool, StoreError>;

    /// Inserts or replaces a relay.
    fn put_relay(&self, relay: &RelayRecord) -> Result<(), StoreError>;
    /// The relay with id `id`.
    fn get_relay(&self, id: &str) -> Result<Option<RelayRecord>, StoreError>;
    /// Every relay, by id.
    fn list_relays(&self) -> Result<Vec<RelayRecord>, StoreError>;
    /// Forgets a relay.
    fn delete_relay(&self, id: &str) -> Result<bool, StoreError>;

    /// Sets a setting (for example `policy`, as JSON text).
    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// A setting's value.
    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Inserts or replaces sessions, all or none.
    fn put_sessions(&self, sessions: &[SessionRecord]) -> Result<(), StoreError>;
    /// The session with id `id`.
    fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// The newest `limit` sessions, newest first.
    fn list_sessions(&self, limit: usize) -> Result<Vec<SessionRecord>, StoreError>;
    /// Number of sessions stored.
    fn count_sessions(&self) -> Result<u64, StoreError>;
    /// Deletes sessions created before `before` (unix ms); returns how many.
    fn prune_sessions(&self, before: u64) -> Result<u64, StoreError>;
}

pub(crate) fn check_id(kind: &'static str, id: &str) -> Result<(), StoreError> {
    if id.is_empty() {
        return Err(StoreError::Invalid {
            kind,
            message: "the id is empty".into(),
        });
    }
    Ok(())
}
