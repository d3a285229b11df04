//! The store conformance suite: the same checks against every backend. A backend that passes
//! behaves as the `Store` trait documents.

use steelyard_store::{
    MemoryStore, PeerRecord, RelayRecord, SessionRecord, SessionState, SqliteStore, Store,
    StoreError, StoredLocation,
};

fn peer(id: &str, key: &str) -> PeerRecord {
    PeerRecord {
        id: id.into(),
        public_key: key.into(),
        enrolled_at: 1_000,
        token_name: "default".into(),
        revoked: false,
        revoked_at: None,
    }
}

fn relay(id: &str) -> RelayRecord {
    RelayRecord {
        id: id.into(),
        public_key: Some("ab".repeat(32)),
        tcp_addr: Some("127.0.0.1:7000".into()),
        udp_addr: None,
        location: Some(StoredLocation {
            lat: 48.85,
            lon: 2.35,
            region: "eu-west".into(),
        }),
        max_sessions: 100,
        max_bandwidth_kbps: 0,
        tier: 1,
        weight: 1.5,
        draining: false,
        registered_at: 5,
        source: "config".into(),
    }
}

fn session(id: &str, created_at: u64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        from: "a".into(),
        to: "b".into(),
        relay: "r1".into(),
        transport: "tcp".into(),
        state: SessionState::Active,
        created_at,
        ended_at: None,
        bytes_a_to_b: 0,
        bytes_b_to_a: 0,
        end_to_end_rtt_ms: None,
    }
}

fn peers_round_trip(s: &dyn Store) {
    assert_eq!(s.get_peer("alice").unwrap(), None);
    s.put_peer(&peer("bob", "02")).unwrap();
    s.put_peer(&peer("alice", "01")).unwrap();
    assert_eq!(s.get_peer("alice").unwrap(), Some(peer("alice", "01")));
    let mut revoked = peer("alice", "01");
    revoked.revoked = true;
    revoked.revoked_at = Some(9);
    s.put_peer(&revoked).unwrap();
    assert_eq!(s.get_peer("alice").unwrap(), Some(revoked.clone()));
    let ids: Vec<_> = s.list_peers().unwrap().into_iter().map(|p| p.id).collect();
    assert_eq!(ids, ["alice", "bob"]);
    assert!(s.delete_peer("bob").unwrap());
    assert!(!s.delete_peer("bob").unwrap());
    assert_eq!(s.list_peers().unwrap(), vec![revoked]);
}

fn relays_round_trip(s: &dyn Store) {
    s.put_relay(&relay("r2")).unwrap();
    s.put_relay(&relay("r1")).unwrap();
    let mut drained = relay("r1");
    drained.draining = true;
    s.put_relay(&drained).unwrap();
    assert_eq!(s.get_relay("r1").unwrap(), Some(drained));
    assert_eq!(s.get_relay("nope").unwrap(), None);
    let ids: Vec<_> = s.list_relays().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert!(s.delete_relay("r2").unwrap());
    assert_eq!(s.list_relays().unwrap().len(), 1);
}

fn settings_round_trip(s: &dyn Store) {
    assert_eq!(s.get_setting("policy").unwrap(), None);
    s.put_setting("policy", r#"{"strict_tiers":false}"#)
        .unwrap();
    s.put_setting("policy", r#"{"strict_tiers":true}"#).unwrap();
    assert_eq!(
        s.get_setting("policy").unwrap().as_deref(),
        Some(r#"{"strict_tiers":true}"#)
    );
}

fn sessions_ordered_and_pruned(s: &dyn Store) {
    s.put_sessions(&[session("s1", 10), session("s3", 30), session("s2", 20)])
        .unwrap();
    s.put_sessions(&[session("s4", 20)]).unwrap();
    let ids: Vec<_> = s
        .list_sessions(10)
        .unwrap()
        .into_iter()
        .map(|x| x.id)
        .collect();
    assert_eq!(ids, ["s3", "s4", "s2", "s1"]);
    assert_eq!(s.list_sessions(2).unwrap().len(), 2);
    assert_eq!(s.count_sessions().unwrap(), 4);

    let mut ended = session("s1", 10);
    ended.state = SessionState::Ended;
    ended.ended_at = Some(99);
    ended.bytes_a_to_b = 1234;
    ended.end_to_end_rtt_ms = Some(12.5);
    s.put_sessions(&[ended.clone()]).unwrap();
    assert_eq!(s.get_session("s1").unwrap(), Some(ended));
    assert_eq!(s.count_sessions().unwrap(), 4);

    assert_eq!(s.prune_sessions(20).unwrap(), 1);
    assert_eq!(s.get_session("s1").unwrap(), None);
    assert_eq!(s.count_sessions().unwrap(), 3);
}

fn empty_ids_are_refused(s: &dyn Store) {
    assert!(matches!(
        s.put_peer(&peer("", "01")),
        Err(StoreError::Invalid { kind: "peer", .. })
    ));
    assert!(matches!(
        s.put_relay(&relay("")),
        Err(StoreError::Invalid { .. })
    ));
    // All or none: the valid session before the bad one is not stored either.
    assert!(s.put_sessions(&[session("ok", 1), session("", 2)]).is_err());
    assert_eq!(s.get_session("ok").unwrap(), None);
}

fn large_batches(s: &dyn Store) {
    let batch: Vec<_> = (0..2_000u64)
        .map(|i| session(&format!("b{i:05}"), i))
        .collect();
    s.put_sessions(&batch).unwrap();
    assert_eq!(s.count_sessions().unwrap(), 2_000);
    assert_eq!(s.list_sessions(1).unwrap()[0].id, "b01999");
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            fn store() -> Box<dyn Store> {
                Box::new($make)
            }

            #[test]
            fn peers() {
                peers_round_trip(&*store());
            }
            #[test]
            fn relays() {
                relays_round_trip(&*store());
            }
            #[test]
            fn settings() {
                settings_round_trip(&*store());
            }
            #[test]
            fn sessions() {
                sessions_ordered_and_pruned(&*store());
            }
            #[test]
            fn empty_ids() {
                empty_ids_are_refused(&*store());
            }
            #[test]
            fn batches() {
                large_batches(&*store());
            }
        }
    };
}

conformance!(memory, MemoryStore::new());
conformance!(sqlite, SqliteStore::open_in_memory().unwrap());
conformance!(sqlite_file, {
    let dir = temp_dir("conformance");
    SqliteStore::open(dir.join("store.db")).unwrap()
});

fn temp_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "steelyard-store-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn sqlite_keeps_everything_across_reopen() {
    let dir = temp_dir("reopen");
    let path = dir.join("store.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.put_peer(&peer("alice", "01")).unwrap();
        s.put_relay(&relay("r1")).unwrap();
        s.put_setting("policy", "{}").unwrap();
        s.put_sessions(&[session("s1", 1)]).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.get_peer("alice").unwrap(), Some(peer("alice", "01")));
    assert_eq!(s.get_relay("r1").unwrap(), Some(relay("r1")));
    assert_eq!(s.get_setting("policy").unwrap().as_deref(), Some("{}"));
    assert_eq!(s.get_session("s1").unwrap(), Some(session("s1", 1)));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sqlite_reports_corrupt_records_and_unopenable_files() {
    let dir = temp_dir("corrupt");
    let path = dir.join("store.db");
    SqliteStore::open(&path).unwrap();
    // Damage one record behind the store's back.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO peers (id, data) VALUES ('broken', '{not json')",
            [],
        )
        .unwrap();
    let s = SqliteStore::open(&path).unwrap();
    match s.get_peer("broken") {
        Err(StoreError::Corrupt {
            kind: "peer", id, ..
        }) => assert_eq!(id, "broken"),
        other => panic!("expected a corrupt record, got {other:?}"),
    }
    let err = SqliteStore::open(dir.join("no/such/dir/x.db"))
        .err()
        .expect("opening in a missing directory fails");
    assert!(err.to_string().contains("cannot open"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
