//! The relay map is sent in pages (so no message grows with the number of relays): the welcome
//! carries the first page and says how many follow; a change (a relay enrolling) pushes the
//! whole new map, page 0 first, to every online agent.

mod broker_support;

use broker_support::*;
use steelyard_proto::api::{BrokerMessage, RelayCapacity, RELAY_MAP_PAGE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_map_pages_then_updates() {
    let dir = temp_dir("relaymap");
    let mut config = base_config(&dir);
    for i in 0..70u32 {
        config.push_str(&format!(
            "\n[[relays]]\nid = \"r{i:03}\"\npublic_key = \"{}\"\nmax_sessions = 10\n",
            key_hex(1)
        ));
    }
    let broker = BrokerProcess::start(&dir, &config);
    let addr = broker.addr;
    let (mut ws, v) = agent(addr, "alice", &key(2), Some(AGENT_TOKEN), false).await;
    let w = v.unwrap();
    assert_eq!(w.relays.len(), RELAY_MAP_PAGE);
    assert_eq!(w.relay_map_pages, 3);
    let mut ids: Vec<String> = w.relays.iter().map(|r| r.id.clone()).collect();
    for page in 1..3 {
        let m = recv_where(&mut ws, |m| match m {
            BrokerMessage::RelayMap(m) => Some(m.clone()),
            _ => None,
        })
        .await;
        assert_eq!((m.page, m.pages), (page, 3));
        ids.extend(m.relays.into_iter().map(|r| r.id));
    }
    let expected: Vec<String> = (0..70).map(|i| format!("r{i:03}")).collect();
    assert_eq!(ids, expected);

    // A relay enrolls: everyone gets the new map, 71 relays in 3 pages.
    let mut hello = relay_hello("new-relay", 50);
    hello.enroll_token = Some(RELAY_TOKEN.into());
    hello.capacity = Some(RelayCapacity {
        max_sessions: 5,
        max_bandwidth_kbps: 0,
    });
    let (_relay, v) = relay(addr, hello, &key(50)).await;
    assert!(v.unwrap().enrolled);
    let mut total = 0;
    for page in 0..3 {
        let m = recv_where(&mut ws, |m| match m {
            BrokerMessage::RelayMap(m) => Some(m.clone()),
            _ => None,
        })
        .await;
        assert_eq!((m.page, m.pages), (page, 3));
        total += m.relays.len();
    }
    assert_eq!(total, 71);
    broker.stop();
}
