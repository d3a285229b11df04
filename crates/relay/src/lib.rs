//! Steelyard relay: the data plane that pairs the two sides of a brokered session by their
//! tickets and forwards their traffic.
//!
//! * TCP: each side connects, sends a hello carrying its ticket ([`wire`]), and once both are
//!   there the two connections are spliced together zero-copy ([`splice`]), with half-close,
//!   idle timeout and the ticket's byte limits.
//! * UDP: datagrams carry a session header; the first from each side carries its ticket; the
//!   relay forwards only between the two addresses that bound ([`udp_core`]), on a thread of
//!   its own, in batches: `recvmmsg` in, UDP GSO sends per destination out ([`udp_batch`]).
//! * Probes: an echo responder (sequence, timestamps, observed TTL, load hint; never larger
//!   than the request) and a cookie-gated, rate-limited bandwidth burst ([`probe`]).
//! * `/status` (JSON load report) and `/metrics` (Prometheus) ([`metrics`]), graceful drain.
//!
//! The decisions live in sans-I/O cores that take inputs and `now` and are unit-tested without
//! sockets: [`pairing`] (tickets, replay, waiting sides, capacity), [`udp_core`],
//! [`udp_batch`], [`probe`], [`limit`]. Both pairing and the UDP core verify tickets against
//! one shared [`keys::TrustedKeys`]: pinned from the config, or announced by the broker. The
//! I/O layer ([`server`]) is tokio plus one UDP thread, and Linux-specific (`splice(2)`, UDP
//! GSO, `IP_RECVTTL`/`IPV6_RECVHOPLIMIT`).
//!
//! * The broker link ([`broker_link`]): with a `[broker]` section, a WebSocket to the broker's
//!   `/v1/relay`, authenticated with the relay's Ed25519 identity, over which it streams its
//!   load (and draining at once) and receives the broker's ticket keys; reconnects by itself
//!   with bounded backoff.
//!
//! What it does **not** do: parse command lines, or install signal handlers (the `steelyard`
//! binary does; see [`RelayHandle::drain`]). Without a `[broker]` section it reports load only
//! on its own `/status`.

pub mod broker_link;
pub mod client;
pub mod config;
pub mod keys;
pub mod limit;
pub mod metrics;
pub mod pairing;
pub mod probe;
pub mod server;
pub mod splice;
pub mod udp_batch;
pub mod udp_core;
pub mod wire;

pub use config::RelayConfig;
pub use server::{BoundAddrs, Relay, RelayError, RelayHandle};
