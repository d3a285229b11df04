//! Steelyard agent: the peer-side half of the fabric.
//!
//! * [`measure`]: measures the path to every relay of the relay map (RTT from a UDP probe
//!   train, loss, hop count from the relay-observed TTL, TCP reachability and connect time,
//!   available bandwidth from the relay's burst endpoint; a TTL scan with `IP_RECVERR` when
//!   the relay sees no TTL; a light watch between reports) and turns it into the
//!   [`steelyard_select::PathMetrics`] the broker selects with.
//! * [`tunnel`]: an end-to-end encrypted, authenticated tunnel (Noise KK) over a relayed TCP
//!   session, and the bridge between it and a local TCP connection, with half-close.
//! * [`resume`]: a sequence/acknowledge layer with a bounded replay buffer over the tunnel, so
//!   a bridged connection moves to a new relay without losing or repeating a byte; the daemon
//!   bridges every tunnel through it. Idle tunnels exchange keepalives, so a relay that goes
//!   silent is noticed within a bounded time and the tunnel resumes elsewhere.
//! * [`goodput`]: a tunnel's end-to-end goodput over the time data was flowing (idle time
//!   left out), or none when it moved too little to measure.
//!
//! Each module keeps its decisions in a sans-I/O core (bytes and times in, bytes and results
//! out) under a thin tokio layer.
//!
//! * [`identity`]: the agent's Ed25519 key on disk and the Noise static keys derived from it.
//! * [`config`]: the agent's TOML configuration.
//! * [`daemon`]: the running agent: broker channel with reconnects, scheduled reports, offers
//!   into local services, and the loopback control endpoint that `steelyard connect` uses.
//!
//! * [`datagram`]: UDP services: datagrams as records in the tunnel's stream, and the pump
//!   between that stream and a UDP socket.
//!
//! What this crate does **not** do yet: carry datagrams unreliably (a UDP service's datagrams
//! ride the reliable, resumable stream), or resume a tunnel after an agent process restarts.

pub mod config;
pub mod daemon;
pub mod datagram;
pub mod goodput;
pub mod identity;
pub mod measure;
pub mod resume;
pub mod tunnel;
