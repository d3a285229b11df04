//! Scenario files: a small world of relays and peers (with their measurements) written in TOML,
//! loaded into a [`Selector`]. `steelyard demo` runs the built-in one; operators can write their
//! own to see what the engine would decide. This module only reads and converts; it decides
//! nothing.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;
use steelyard_select::{
    Capacity, Location, PathMetrics, PeerId, PeerReport, Policy, RelayId, RelayInfo, RelayLoad,
    Selector, Timestamp,
};

/// The built-in scenario.
pub const BUILT_IN: &str = include_str!("scenarios/demo.toml");

/// A whole scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// The selection policy (defaults when absent).
    #[serde(default)]
    pub policy: Policy,
    /// The relays.
    pub relays: Vec<ScenarioRelay>,
    /// The peers; the first two are the default pair.
    pub peers: Vec<ScenarioPeer>,
}

/// A relay and its current load.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioRelay {
    /// Name.
    pub id: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Region.
    #[serde(default)]
    pub region: String,
    /// Tier (0 = primary).
    #[serde(default)]
    pub tier: u8,
    /// Operator weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Session capacity.
    pub max_sessions: u32,
    /// Bandwidth capacity in kbit/s (0 = unlimited).
    #[serde(default)]
    pub max_bandwidth_kbps: u64,
    /// Current sessions.
    #[serde(default)]
    pub sessions: u32,
    /// Current bandwidth in kbit/s.
    #[serde(default)]
    pub bandwidth_kbps: u64,
    /// Current CPU share.
    #[serde(default)]
    pub cpu: f64,
    /// Draining.
    #[serde(default)]
    pub draining: bool,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// A peer, where it is, and what it measured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioPeer {
    /// Name.
    pub name: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Region.
    #[serde(default)]
    pub region: String,
    /// Paths to relays.
    pub paths: Vec<ScenarioPath>,
}

/// One measured path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioPath {
    /// The relay.
    pub relay: String,
    /// RTT in ms.
    pub rtt_ms: f64,
    /// Hops.
    #[serde(default)]
    pub hops: u32,
    /// Loss share.
    #[serde(default)]
    pub loss: f64,
    /// Bandwidth in kbit/s.
    pub bandwidth_kbps: Option<u64>,
    /// Reached over UDP.
    #[serde(default = "yes")]
    pub udp: bool,
    /// Reached over TCP.
    #[serde(default = "yes")]
    pub tcp: bool,
    /// Age of the measurement in seconds.
    #[serde(default)]
    pub age_secs: u64,
}

impl Scenario {
    /// Reads a scenario from `path`, or the built-in one.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, name) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read scenario {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (BUILT_IN.to_string(), "the built-in scenario".to_string()),
        };
        let scenario: Scenario =
            toml::from_str(&text).with_context(|| format!("{name} is not a valid scenario"))?;
        anyhow::ensure!(
            scenario.peers.len() >= 2,
            "{name} has {} peer(s): a scenario needs at least two",
            scenario.peers.len()
        );
        Ok(scenario)
    }

    /// A selector holding the scenario as it stands at `now`.
    pub fn selector(&self, now: Timestamp) -> Result<Selector> {
        let mut s = Selector::new(self.policy.clone()).context("the scenario's policy")?;
        for r in &self.relays {
            s.upsert_relay(RelayInfo {
                id: RelayId::new(&r.id),
                location: Some(Location {
                    lat: r.lat,
                    lon: r.lon,
                    region: r.region.clone(),
                }),
                tier: r.tier,
                weight: r.weight,
                capacity: Capacity {
                    max_sessions: r.max_sessions,
                    max_bandwidth_kbps: r.max_bandwidth_kbps,
                },
            })?;
            s.relay_report(&r.id, self.load_of(r), now)?;
        }
        for p in &self.peers {
            let paths = p
                .paths
                .iter()
                .map(|m| {
                    let metrics = PathMetrics {
                        rtt_ms: m.rtt_ms,
                        hops: m.hops,
                        loss: m.loss,
                        bandwidth_kbps: m.bandwidth_kbps,
                        udp: m.udp,
                        tcp: m.tcp,
                        measured_at: Timestamp::from_millis(
                            now.millis().saturating_sub(m.age_secs * 1000),
                        ),
                    };
                    (RelayId::new(&m.relay), metrics)
                })
                .collect();
            s.peer_report(PeerReport {
                peer: PeerId::new(&p.name),
                location: Some(Location {
                    lat: p.lat,
                    lon: p.lon,
                    region: p.region.clone(),
                }),
                paths,
            })
            .with_context(|| format!("peer {}", p.name))?;
        }
        Ok(s)
    }

    /// The load a relay reports, per the scenario.
    pub fn load_of(&self, r: &ScenarioRelay) -> RelayLoad {
        RelayLoad {
            sessions: r.sessions,
            bandwidth_kbps: r.bandwidth_kbps,
            cpu: r.cpu,
            draining: r.draining,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_scenario_loads() {
        let s = Scenario::load(None).expect("built-in scenario");
        s.selector(Timestamp::from_millis(1_000_000_000))
            .expect("selector");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = BUILT_IN.replace("max_sessions = 1000\nsessions = 120", "max_sesions = 1000");
        let err = toml::from_str::<Scenario>(&bad).unwrap_err().to_string();
        assert!(err.contains("max_sesions"), "{err}");
    }
}
