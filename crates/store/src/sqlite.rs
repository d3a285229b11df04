//! [`SqliteStore`]: durable state in one SQLite file (WAL mode). Each record is a JSON document
//! under its key, with the columns needed for ordering (sessions by creation time) beside it.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{check_id, PeerRecord, RelayRecord, SessionRecord, Store, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS peers (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS relays (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (created_at, id);
";

/// A store in one SQLite file.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        backend: "sqlite",
        message: e.to_string(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let conn = Connection::open(path.as_ref()).map_err(|e| StoreError::Backend {
            backend: "sqlite",
            message: format!("cannot open {}: {e}", path.as_ref().display()),
        })?;
        Self::init(conn)
    }

    /// A private in-memory database (for tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        // journal_mode returns a row; query it rather than execute.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(backend)?;
        conn.execute_batch("PRAGMA synchronous=NORMAL;")
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn put_doc<T: Serialize>(&self, table: &str, id: &str, doc: &T) -> Result<(), StoreError> {
        let data = serde_json::to_string(doc).map_err(backend)?;
        self.lock()
            .execute(
                &format!("INSERT OR REPLACE INTO {table} (id, data) VALUES (?1, ?2)"),
                params![id, data],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn get_doc<T: DeserializeOwned>(
        &self,
        table: &str,
        kind: &'static str,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let data: Option<String> = self
            .lock()
            .query_row(
                &format!("SELECT data FROM {table} WHERE id = ?1"),
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        data.map(|d| parse(kind, id, &d)).transpose()
    }

    fn list_docs<T: DeserializeOwned>(
        &self,
        table: &str,
        kind: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!("SELECT id, data FROM {table} ORDER BY id"))
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, data) = row.map_err(backend)?;
            out.push(parse(kind, &id, &data)?);
        }
        Ok(out)
    }

    fn delete(&self, table: &str, id: &str) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(&format!("DELETE FROM {table} WHERE id = ?1"), params![id])
            .map_err(backend)?;
        Ok(n > 0)
    }
}

fn parse<T: DeserializeOwned>(kind: &'static str, id: &str, data: &str) -> Result<T, StoreError> {
    serde_json::from_str(data).map_err(|e| StoreError::Corrupt {
        kind,
        id: id.to_owned(),
        message: e.to_string(),
    })
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn put_peer(&self, peer: &PeerRecord) -> Result<(), StoreError> {
        check_id("peer", &peer.id)?;
        self.put_doc("peers", &peer.id, peer)
    }

    fn get_peer(&self, id: &str) -> Result<Option<PeerRecord>, StoreError> {
        self.get_doc("peers", "peer", id)
    }

    fn list_peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.list_docs("peers", "peer")
    }

    fn delete_peer(&self, id: &str) -> Result<bool, StoreError> {
        self.delete("peers", id)
    }

    fn put_relay(&self, relay: &RelayRecord) -> Result<(), StoreError> {
        check_id("relay", &relay.id)?;
        self.put_doc("relays", &relay.id, relay)
    }

    fn get_relay(&self, id: &str) -> Result<Option<RelayRecord>, StoreError> {
        self.get_doc("relays", "relay", id)
    }

    fn list_relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        self.list_docs("relays", "relay")
    }

    fn delete_relay(&self, id: &str) -> Result<bool, StoreError> {
        self.delete("relays", id)
    }

    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        check_id("setting", key)?;
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .query_row(
                "SELECT value FROM settings WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
    }

    fn put_sessions(&self, sessions: &[SessionRecord]) -> Result<(), StoreError> {
        for s in sessions {
            check_id("session", &s.id)?;
        }
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO sessions (id, created_at, data) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            for s in sessions {
                let data = serde_json::to_string(s).map_err(backend)?;
                let created = i64::try_from(s.created_at).unwrap_or(i64::MAX);
                stmt.execute(params![s.id, created, data])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.get_doc("sessions", "session", id)
    }

    fn list_sessions(&self, limit: usize) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, data FROM sessions ORDER BY created_at DESC, id DESC LIMIT ?1",
            )
            .map_err(backend)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![limit], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(backend)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, data) = row.map_err(backend)?;
            out.push(parse("session", &id, &data)?);
        }
        Ok(out)
    }

    fn count_sessions(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .lock()
            .query_row("SELECT COUNT(*) FROM sessions", [], |r| r.get(0))
            .map_err(backend)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn prune_sessions(&self, before: u64) -> Result<u64, StoreError> {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let n = self
            .lock()
            .execute(
                "DELETE FROM sessions WHERE created_at < ?1",
                params![before],
            )
            .map_err(backend)?;
        Ok(n as u64)
    }
}
