//! Steelyard's selection engine: which relay should carry a session between peer A and peer B.
//!
//! Inputs are what the broker knows: each peer's latest report of the relays it reaches (RTT,
//! hops, loss, bandwidth, when measured, over which transports), peer and relay locations, each
//! relay's capacity, tier, operator weight and latest load report, sessions assigned since that
//! report, end-to-end measurements of A → relay → B, and the [`Policy`]. The output is a
//! [`Decision`]: the winner, every candidate ranked with its inputs and the parts of its score,
//! every relay left out with the reason — or a [`NoChoice`] that says why there is none.
//!
//! How a candidate is scored (lower is better, in *score milliseconds*):
//!
//! * the two legs combine into one path: RTT adds, hops add, loss compounds, bandwidth is the
//!   smaller leg, distance adds; a fresh end-to-end measurement replaces RTT, loss and bandwidth;
//! * each path figure is weighted ([`policy::Weights`]); bandwidth costs `reference / bandwidth`;
//! * load costs `weight × u / (1 − u)` where `u` is the largest share of sessions (including
//!   pending assignments), bandwidth and CPU against capacity: gentle when idle, steep near full;
//!   a relay without a free slot is never a candidate;
//! * measurements older than the fresh limit cost more as they age and are ignored once expired;
//!   relays that stop reporting leave the candidate set;
//! * region preferences add a penalty; the operator weight divides the sum;
//! * with strict tiers, lower tiers win before score; pins and hysteresis apply last.
//!
//! What this crate does not do: no I/O, no clock, no threads, no global state. The broker feeds
//! it and acts on its decisions.

mod decision;
mod engine;
mod model;
pub mod policy;
mod stored;

pub use decision::{
    Candidate, Decision, LoadView, NoChoice, PathEstimate, PathSource, RejectReason, Rejection,
    Resource, ScoreParts, Side, Why,
};
pub use engine::{Selector, UpdateError, MAX_PENDING_PER_RELAY};
pub use model::{
    Capacity, EndToEnd, Location, PathMetrics, PeerId, PeerReport, RelayId, RelayInfo, RelayLoad,
    Request, Timestamp, Transport,
};
pub use policy::{Pin, Policy, PolicyError, RegionRule};
