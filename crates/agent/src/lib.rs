//! Steelyard agent: the peer-side half of the fabric.
//!
//! * [`measure`]: measures the path to every relay of the relay map (RTT from a UDP probe
//!   train, loss, hop count from the relay-observed TTL, TCP reachability and connect time,
//!   available bandwidth from the relay's burst endpoint) and turns it into the
//!   [`steelyard_select::PathMetrics`] the broker selects with.
//! * [`tunnel`]: an end-to-end encrypted, authenticated tunnel (Noise KK) over a relayed TCP
//!   session, and the bridge between it and a local TCP connection, with half-close.
//! * [`resume`]: a sequence/acknowledge layer with a bounded replay buffer over the tunnel, so
//!   a bridged connection moves to a new relay without losing or repeating a byte.
//!
//! Each module keeps its decisions in a sans-I/O core (bytes and times in, bytes and results
//! out) under a thin tokio layer.
//!
//! What this crate does **not** do yet: talk to the broker (registration, report schedule,
//! connect requests, offers), hold an identity key on disk, or parse a configuration; when a
//! relay fails, finding the next relay and its tickets is the caller's job. Those depend on
//! the broker API and come next.

pub mod measure;
pub mod resume;
pub mod tunnel;
