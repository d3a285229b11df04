//! [`MemoryStore`]: the default backend, maps behind a lock. Everything is lost at exit.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::{check_id, PeerRecord, RelayRecord, SessionRecord, Store, StoreError};

#[derive(Default)]
struct Inner {
    peers: BTreeMap<String, PeerRecord>,
    relays: BTreeMap<String, RelayRecord>,
    settings: HashMap<String, String>,
    sessions: HashMap<String, SessionRecord>,
    /// (created_at, id) for ordering.
    by_time: BTreeMap<(u64, String), ()>,
}

/// An in-memory store. Cheap, fast, and forgets everything at exit.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain maps in a usable state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn put_peer(&self, peer: &PeerRecord) -> Result<(), StoreError> {
        check_id("peer", &peer.id)?;
        self.lock().peers.insert(peer.id.clone(), peer.clone());
        Ok(())
    }

    fn get_peer(&self, id: &str) -> Result<Option<PeerRecord>, StoreError> {
        Ok(self.lock().peers.get(id).cloned())
    }

    fn list_peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        Ok(self.lock().peers.values().cloned().collect())
    }

    fn delete_peer(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().peers.remove(id).is_some())
    }

    fn put_relay(&self, relay: &RelayRecord) -> Result<(), StoreError> {
        check_id("relay", &relay.id)?;
        self.lock().relays.insert(relay.id.clone(), relay.clone());
        Ok(())
    }

    fn get_relay(&self, id: &str) -> Result<Option<RelayRecord>, StoreError> {
        Ok(self.lock().relays.get(id).cloned())
    }

    fn list_relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        Ok(self.lock().relays.values().cloned().collect())
    }

    fn delete_relay(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().relays.remove(id).is_some())
    }

    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        check_id("setting", key)?;
        self.lock().settings.insert(key.into(), value.into());
        Ok(())
    }

    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().settings.get(key).cloned())
    }

    fn put_sessions(&self, sessions: &[SessionRecord]) -> Result<(), StoreError> {
        for s in sessions {
            check_id("session", &s.id)?;
        }
        let mut inner = self.lock();
        for s in sessions {
            if let Some(old) = inner.sessions.insert(s.id.clone(), s.clone()) {
                inner.by_time.remove(&(old.created_at, old.id));
            }
            inner.by_time.insert((s.created_at, s.id.clone()), ());
        }
        Ok(())
    }

    fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        Ok(self.lock().sessions.get(id).cloned())
    }

    fn list_sessions(&self, limit: usize) -> Result<Vec<SessionRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .by_time
            .keys()
            .rev()
            .take(limit)
            .filter_map(|(_, id)| inner.sessions.get(id).cloned())
            .collect())
    }

    fn count_sessions(&self) -> Result<u64, StoreError> {
        Ok(self.lock().sessions.len() as u64)
    }

    fn prune_sessions(&self, before: u64) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let old: Vec<(u64, String)> = inner
            .by_time
            .range(..(before, String::new()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &old {
            inner.by_time.remove(key);
            inner.sessions.remove(&key.1);
        }
        Ok(old.len() as u64)
    }
}
