//! The inputs of a decision: identities, time, what peers measure towards relays, what relays
//! say about themselves, and what agents measured end to end through a relay.
//!
//! These are plain data types. They hold no clock and do no I/O; every time is a [`Timestamp`]
//! that the caller supplies.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Creates the identifier from its text.
            pub fn new(id: impl AsRef<str>) -> Self {
                Self(Arc::from(id.as_ref()))
            }

            /// The identifier's text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self::new(id)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The name of a peer (an agent), unique within one broker.
    PeerId
);
id_type!(
    /// The name of a relay, unique within one broker.
    RelayId
);

/// A point in time, in milliseconds since the Unix epoch. The engine never reads a clock:
/// callers pass `now` and the times at which things were measured.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> u64 {
        self.0
    }

    /// How long before `now` this timestamp lies, in milliseconds; zero if it is in the future.
    pub const fn age_ms(self, now: Timestamp) -> u64 {
        now.0.saturating_sub(self.0)
    }

    /// This timestamp moved `ms` milliseconds later.
    pub const fn plus_ms(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

/// The transport a session needs from the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A byte stream (the relay's TCP listener).
    #[default]
    Tcp,
    /// Datagrams (the relay's UDP listener).
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

/// Where something is: coordinates in degrees and an operator-defined region name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Location {
    /// Latitude in degrees, -90..=90.
    pub lat: f64,
    /// Longitude in degrees, -180..=180.
    pub lon: f64,
    /// Region name such as `eu-west`; empty when unknown.
    #[serde(default)]
    pub region: String,
}

impl Location {
    /// Great-circle distance to `other` in kilometres (haversine on a sphere of radius 6371 km).
    pub fn distance_km(&self, other: &Location) -> f64 {
        const EARTH_RADIUS_KM: f64 = 6371.0;
        let (lat1, lat2) = (self.lat.to_radians(), other.lat.to_radians());
        let dlat = lat2 - lat1;
        let dlon = (other.lon - self.lon).to_radians();
        let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
    }
}

/// What one peer measured on its path to one relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathMetrics {
    /// Round-trip time in milliseconds (median of a probe train).
    pub rtt_ms: f64,
    /// IP hops between the peer and the relay.
    pub hops: u32,
    /// Share of probes lost, 0.0..=1.0.
    pub loss: f64,
    /// Available bandwidth in kbit/s, when it was measured.
    pub bandwidth_kbps: Option<u64>,
    /// Whether the relay answered over UDP.
    pub udp: bool,
    /// Whether the relay accepted a TCP connection.
    pub tcp: bool,
    /// When the measurement was taken.
    pub measured_at: Timestamp,
}

impl PathMetrics {
    /// Whether this path carries `transport`.
    pub fn carries(&self, transport: Transport) -> bool {
        match transport {
            Transport::Tcp => self.tcp,
            Transport::Udp => self.udp,
        }
    }
}

/// A peer's report: where it is and what it measured towards each relay it can reach.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    /// The reporting peer.
    pub peer: PeerId,
    /// Where the peer is, if it knows.
    pub location: Option<Location>,
    /// One entry per relay the peer reached. A relay missing here is unreachable for the peer.
    pub paths: Vec<(RelayId, PathMetrics)>,
}

/// What an operator (or the relay's registration) says about a relay; changes rarely.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// The relay's name.
    pub id: RelayId,
    /// Where it is.
    pub location: Option<Location>,
    /// Tier: with strict tiers, relays of tier 0 are used before tier 1, and so on (backups).
    #[serde(default)]
    pub tier: u8,
    /// Operator weight, > 0. A relay of weight 2 is chosen over one of weight 1 unless its score
    /// is more than twice as bad.
    #[serde(default = "one")]
    pub weight: f64,
    /// What the relay can carry.
    pub capacity: Capacity,
}

fn one() -> f64 {
    1.0
}

/// What a relay can carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Most sessions (paired or waiting) at once.
    pub max_sessions: u32,
    /// Most relayed bandwidth in kbit/s, both directions together; 0 means not limited.
    #[serde(default)]
    pub max_bandwidth_kbps: u64,
}

/// A relay's own report of its workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayLoad {
    /// Sessions active or waiting for their second side.
    pub sessions: u32,
    /// Relayed bandwidth in kbit/s, both directions together.
    pub bandwidth_kbps: u64,
    /// CPU use, 0.0..=1.0 of the relay's cores.
    pub cpu: f64,
    /// The relay takes no new sessions.
    pub draining: bool,
}

/// What agents measured end to end, A → relay → B, on a session that went through the relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndToEnd {
    /// Round-trip time A → relay → B → relay → A, in milliseconds.
    pub rtt_ms: f64,
    /// Share of packets lost end to end, 0.0..=1.0.
    pub loss: f64,
    /// Goodput through the relay in kbit/s, when measured.
    pub bandwidth_kbps: Option<u64>,
    /// When the measurement was taken.
    pub measured_at: Timestamp,
}

/// One decision request: a relay for a session from `from` (side A) to `to` (side B).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The initiating peer.
    pub from: PeerId,
    /// The peer asked for.
    pub to: PeerId,
    /// The transport the session needs.
    #[serde(default)]
    pub transport: Transport,
    /// For re-selection of a live session: the relay carrying it now. Hysteresis applies and
    /// this relay's load already includes the session.
    #[serde(default)]
    pub current: Option<RelayId>,
}

impl Request {
    /// A request for a new TCP session from `from` to `to`.
    pub fn new(from: impl Into<PeerId>, to: impl Into<PeerId>) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
            transport: Transport::Tcp,
            current: None,
        }
    }
}

impl From<String> for PeerId {
    fn from(id: String) -> Self {
        Self::new(id)
    }
}

impl From<String> for RelayId {
    fn from(id: String) -> Self {
        Self::new(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_between_known_cities_is_right() {
        let paris = Location {
            lat: 48.8566,
            lon: 2.3522,
            region: String::new(),
        };
        let london = Location {
            lat: 51.5074,
            lon: -0.1278,
            region: String::new(),
        };
        let d = paris.distance_km(&london);
        assert!((d - 343.5).abs() < 2.0, "{d}");
        assert_eq!(paris.distance_km(&paris), 0.0);
    }

    #[test]
    fn age_saturates_for_future_timestamps() {
        assert_eq!(Timestamp(10).age_ms(Timestamp(4)), 0);
        assert_eq!(Timestamp(4).age_ms(Timestamp(10)), 6);
    }
}
