//! The output of the engine: a [`Decision`] that names the winner and explains it (every
//! candidate with its inputs and the parts of its score, every relay left out and why), or a
//! [`NoChoice`] that says why there is no relay to pick.
//!
//! `Decision` implements `Display` as a plain-text table for terminals; it serialises to JSON for
//! the broker's explain API.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{PeerId, RelayId, Request, Transport};

/// Which side of a session: A asked, B was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    /// The initiating peer.
    A,
    /// The peer asked for.
    B,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::A => "A",
            Side::B => "B",
        })
    }
}

/// A decision: the winner, the ranked candidates and the relays left out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// What was asked.
    pub request: Request,
    /// The chosen relay.
    pub winner: RelayId,
    /// Why it won.
    pub why: Why,
    /// Every candidate, best first (by tier when tiers are strict, then score, then name).
    pub ranked: Vec<Candidate>,
    /// Relays that were not candidates, and why.
    pub rejected: Vec<Rejection>,
}

impl Decision {
    /// The winner's candidate entry.
    pub fn chosen(&self) -> &Candidate {
        self.ranked
            .iter()
            .find(|c| c.relay == self.winner)
            .expect("the winner is always among the ranked candidates")
    }

    /// The same decision with the path figures that come from the peers' reports (RTT and
    /// loss composed from the legs, distances) shown as reported: the selector stores them as
    /// `f32` (see `stored.rs`), and widening reads 5.3 back as 5.300000190734863. Each such
    /// figure is rounded to `f32` and widened through its shortest decimal form instead, so
    /// the figure has the precision it was stored with and no digits it never had. For
    /// explanations; the ranking is unchanged (decisions use the stored values as they are).
    #[must_use]
    pub fn with_reported_figures(mut self) -> Self {
        for c in &mut self.ranked {
            if c.path.source == PathSource::Legs {
                c.path.rtt_ms = f32_figure(c.path.rtt_ms);
                c.path.loss = f32_figure(c.path.loss);
            }
            c.path.distance_km = c.path.distance_km.map(f32_figure);
        }
        self
    }

    /// The rank (0 = best) of `relay` among the candidates, if it is one.
    pub fn rank_of(&self, relay: &str) -> Option<usize> {
        self.ranked.iter().position(|c| c.relay.as_str() == relay)
    }
}

/// One candidate relay with its inputs and score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The relay.
    pub relay: RelayId,
    /// Its tier.
    pub tier: u8,
    /// The estimated path A → relay → B.
    pub path: PathEstimate,
    /// The relay's workload.
    pub load: LoadView,
    /// The score, part by part.
    pub score: ScoreParts,
}

/// Where a path estimate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathSource {
    /// Composed from the two legs' reports.
    Legs,
    /// Measured end to end through the relay (RTT, loss, bandwidth); hops and distance from legs.
    EndToEnd,
}

/// The estimated path A → relay → B.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathEstimate {
    /// RTT in ms: the legs added, or measured end to end.
    pub rtt_ms: f64,
    /// IP hops, both legs added.
    pub hops: u32,
    /// Loss, 0..1: the legs compounded, or measured end to end.
    pub loss: f64,
    /// Bandwidth in kbit/s: the smaller leg, or measured end to end; `None` when unmeasured.
    pub bandwidth_kbps: Option<u64>,
    /// Distance A → relay → B in km, when all three locations are known.
    pub distance_km: Option<f64>,
    /// Where the figures came from.
    pub source: PathSource,
    /// Age in ms of the older leg's measurement.
    pub age_ms: u64,
}

/// Which resource bounds a relay's utilisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Sessions against `max_sessions`.
    Sessions,
    /// Bandwidth against `max_bandwidth_kbps`.
    Bandwidth,
    /// CPU against the policy's `max_cpu`.
    Cpu,
}

/// A relay's workload as the engine saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadView {
    /// Sessions in the relay's last report.
    pub sessions: u32,
    /// Sessions assigned since, not yet in a report.
    pub pending: u32,
    /// The relay's session capacity.
    pub max_sessions: u32,
    /// Bandwidth in the last report, kbit/s.
    pub bandwidth_kbps: u64,
    /// Bandwidth capacity, kbit/s (0 = not limited).
    pub max_bandwidth_kbps: u64,
    /// CPU in the last report, 0..1.
    pub cpu: f64,
    /// Utilisation 0..1: the largest of the three resources' shares.
    pub utilisation: f64,
    /// The resource that gave the utilisation.
    pub bound_by: Resource,
    /// Age of the last report in ms.
    pub report_age_ms: u64,
}

/// The score of a candidate: a cost in score milliseconds, lower is better.
/// `total = (rtt + hops + loss + bandwidth + distance + load + staleness + region) / weight`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreParts {
    /// From path RTT.
    pub rtt: f64,
    /// From hop count.
    pub hops: f64,
    /// From loss.
    pub loss: f64,
    /// From bandwidth.
    pub bandwidth: f64,
    /// From distance.
    pub distance: f64,
    /// From relay workload.
    pub load: f64,
    /// From the age of the path measurements.
    pub staleness: f64,
    /// From region preferences.
    pub region: f64,
    /// The operator weight the sum was divided by.
    pub weight: f64,
    /// The score.
    pub total: f64,
}

impl ScoreParts {
    /// The named parts (before the weight divides them), for explanations.
    pub fn named(&self) -> [(&'static str, f64); 8] {
        [
            ("rtt", self.rtt),
            ("hops", self.hops),
            ("loss", self.loss),
            ("bandwidth", self.bandwidth),
            ("distance", self.distance),
            ("load", self.load),
            ("staleness", self.staleness),
            ("region", self.region),
        ]
    }
}

/// Why the winner won.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Why {
    /// It was the only candidate.
    OnlyCandidate,
    /// It had the best score.
    BestScore {
        /// The second best.
        runner_up: RelayId,
        /// How much better the winner's total is, in score ms.
        margin_ms: f64,
        /// The parts where the two differ most, winner minus runner-up (negative = winner better),
        /// largest difference first.
        differences: Vec<(String, f64)>,
    },
    /// It is in a lower tier than every other candidate that beat it on score.
    LowerTier {
        /// The winner's tier.
        tier: u8,
    },
    /// A peer's pin chose it.
    Pinned {
        /// The peer whose pin applied.
        peer: PeerId,
    },
    /// Re-selection kept the current relay: the best alternative did not gain enough.
    KeptCurrent {
        /// The best alternative.
        best: RelayId,
        /// Its gain in score ms.
        gain_ms: f64,
        /// The gain that would have been needed.
        needed_ms: f64,
    },
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::OnlyCandidate => f.write_str("the only candidate"),
            Why::BestScore {
                runner_up,
                margin_ms,
                differences,
            } => {
                write!(f, "best score, {margin_ms:.1} ms ahead of {runner_up}")?;
                let mut sep = ": ";
                for (part, delta) in differences.iter().filter(|(_, d)| d.abs() >= 0.05) {
                    let verdict = if *delta < 0.0 { "won" } else { "lost" };
                    write!(f, "{sep}{verdict} on {part} by {:.1} ms", delta.abs())?;
                    sep = ", ";
                }
                Ok(())
            }
            Why::LowerTier { tier } => write!(f, "lowest tier with a candidate (tier {tier})"),
            Why::Pinned { peer } => write!(f, "pinned by peer {peer}"),
            Why::KeptCurrent {
                best,
                gain_ms,
                needed_ms,
            } => write!(
                f,
                "kept the current relay: {best} would gain {gain_ms:.1} ms, {needed_ms:.1} ms needed to move"
            ),
        }
    }
}

/// `x` at `f32` precision, widened through the shortest decimal that reads back as the same
/// `f32` (what `Display` prints). Values `f32` cannot hold are returned unchanged.
fn f32_figure(x: f64) -> f64 {
    let narrow = x as f32;
    if !narrow.is_finite() {
        return x;
    }
    narrow.to_string().parse().unwrap_or(x)
}

/// A relay that was not a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The relay.
    pub relay: RelayId,
    /// Why it was left out.
    pub reason: RejectReason,
}

/// Why a relay was not a candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RejectReason {
    /// Only one side reaches it.
    NotCommon {
        /// The side that does not reach it.
        missing_side: Side,
    },
    /// A side's measurement is older than the policy's `path_expire_secs`.
    PathExpired {
        /// The side.
        side: Side,
        /// Age in ms.
        age_ms: u64,
    },
    /// A side reaches the relay but not over the needed transport.
    NoTransport {
        /// The side.
        side: Side,
        /// The transport needed.
        transport: Transport,
    },
    /// A peer reported it but the broker does not know the relay.
    UnknownRelay,
    /// The relay has not sent a load report yet.
    NeverReported,
    /// The relay's last load report is older than the policy's `relay_timeout_secs`.
    Silent {
        /// Age of the last report in ms.
        age_ms: u64,
    },
    /// The relay is draining.
    Draining,
    /// The relay has no session slot left.
    Full {
        /// The resource that is exhausted.
        resource: Resource,
    },
    /// The policy's deny list names it.
    Denied,
    /// The policy's allow list does not name it.
    NotAllowed,
    /// A region rule for a side's region does not allow the relay's region.
    RegionNotAllowed {
        /// The side whose rule forbids it.
        side: Side,
        /// The relay's region.
        relay_region: String,
    },
    /// A pin chose another relay.
    NotPinned {
        /// The pinned relay.
        pinned: RelayId,
    },
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::NotCommon { missing_side } => {
                write!(f, "side {missing_side} does not reach it")
            }
            RejectReason::PathExpired { side, age_ms } => {
                write!(
                    f,
                    "side {side}'s measurement is {}s old (expired)",
                    age_ms / 1000
                )
            }
            RejectReason::NoTransport { side, transport } => {
                write!(f, "side {side} does not reach it over {transport}")
            }
            RejectReason::UnknownRelay => f.write_str("not a registered relay"),
            RejectReason::NeverReported => f.write_str("has not reported its load yet"),
            RejectReason::Silent { age_ms } => {
                write!(
                    f,
                    "silent: last load report {:.1}s ago",
                    *age_ms as f64 / 1000.0
                )
            }
            RejectReason::Draining => f.write_str("draining"),
            RejectReason::Full { resource } => write!(f, "full ({resource:?})"),
            RejectReason::Denied => f.write_str("denied by policy"),
            RejectReason::NotAllowed => f.write_str("not in the policy's allow list"),
            RejectReason::RegionNotAllowed { side, relay_region } => {
                write!(f, "region {relay_region:?} not allowed for side {side}")
            }
            RejectReason::NotPinned { pinned } => write!(f, "a pin chose {pinned}"),
        }
    }
}

/// Why there is no relay to pick. Every message says what each side lacks.
#[derive(Clone, Debug, Error, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NoChoice {
    /// A peer asked for itself.
    #[error("peer {peer} asked for a relay to itself")]
    SamePeer {
        /// The peer.
        peer: PeerId,
    },
    /// A peer has never reported (or was removed).
    #[error("no report from peer {peer}: it has not registered or not yet measured its relays")]
    UnknownPeer {
        /// The peer.
        peer: PeerId,
    },
    /// No relay is reachable by both sides.
    #[error(
        "no common relay: {from} reaches [{}] and {to} reaches [{}] over {transport}",
        join(from_reaches),
        join(to_reaches)
    )]
    NoCommonRelay {
        /// Side A.
        from: PeerId,
        /// Side B.
        to: PeerId,
        /// The transport needed.
        transport: Transport,
        /// The relays A reaches with a fresh measurement over the transport.
        from_reaches: Vec<RelayId>,
        /// The relays B reaches likewise.
        to_reaches: Vec<RelayId>,
    },
    /// Relays are common to both sides but none can take the session.
    #[error("no usable relay among the common ones: {}", explain(rejected))]
    NoUsableRelay {
        /// Each common relay and why it was left out.
        rejected: Vec<Rejection>,
    },
    /// A strict pin names a relay that cannot take the session.
    #[error("peer {peer} is pinned (strictly) to relay {relay}, which cannot take the session: {reason}")]
    PinUnavailable {
        /// The pinned peer.
        peer: PeerId,
        /// The relay.
        relay: RelayId,
        /// Why the relay is not usable.
        reason: String,
    },
}

fn join(ids: &[RelayId]) -> String {
    ids.iter()
        .map(RelayId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn explain(rejected: &[Rejection]) -> String {
    rejected
        .iter()
        .map(|r| format!("{} ({})", r.relay, r.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} -> {} over {}: relay {} ({})",
            self.request.from, self.request.to, self.request.transport, self.winner, self.why
        )?;
        writeln!(
            f,
            "{:>2} {:<14} {:>2} {:>8} {:>4} {:>6} {:>9} {:>7} {:>5} {:>4} | {:>6} {:>5} {:>5} {:>5} {:>5} {:>6} {:>5} {:>5} {:>4} | {:>7}",
            "#", "relay", "t", "rtt ms", "hops", "loss%", "bw Mbit", "km", "load%", "src",
            "rtt", "hops", "loss", "bw", "dist", "load", "stale", "regn", "wt", "score"
        )?;
        for (rank, c) in self.ranked.iter().enumerate() {
            let p = &c.path;
            let s = &c.score;
            let bw = p
                .bandwidth_kbps
                .map_or("?".to_string(), |k| format!("{:.1}", k as f64 / 1000.0));
            let km = p.distance_km.map_or("?".to_string(), |d| format!("{d:.0}"));
            let src = match p.source {
                PathSource::Legs => "legs",
                PathSource::EndToEnd => "e2e",
            };
            let mark = if c.relay == self.winner { "*" } else { " " };
            writeln!(
                f,
                "{:>2} {:<14} {:>2} {:>8.1} {:>4} {:>6.2} {:>9} {:>7} {:>5.1} {:>4} | {:>6.1} {:>5.1} {:>5.1} {:>5.1} {:>5.1} {:>6.1} {:>5.1} {:>5.1} {:>4.1} | {:>7.1}",
                format!("{}{mark}", rank + 1),
                truncate(c.relay.as_str(), 14),
                c.tier,
                p.rtt_ms,
                p.hops,
                p.loss * 100.0,
                bw,
                km,
                c.load.utilisation * 100.0,
                src,
                s.rtt,
                s.hops,
                s.loss,
                s.bandwidth,
                s.distance,
                s.load,
                s.staleness,
                s.region,
                s.weight,
                s.total
            )?;
        }
        for r in &self.rejected {
            writeln!(
                f,
                "   {:<14} not a candidate: {}",
                truncate(r.relay.as_str(), 14),
                r.reason
            )?;
        }
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::f32_figure;

    #[test]
    fn stored_figures_read_back_as_reported() {
        let widened = |x: f64| f64::from(x as f32);
        assert_ne!(widened(5.3), 5.3, "the artefact this undoes");
        for x in [5.3, 0.05, 1234.5, 7.4, 0.0, 1e-9, 99_999.9] {
            assert_eq!(f32_figure(widened(x)), x, "{x}");
        }
        // Two legs stored as f32, added in f64: shown at f32 precision.
        assert_eq!(f32_figure(widened(5.3) + widened(2.1)), 7.4);
        assert_eq!(f32_figure(1e300), 1e300);
        assert!(f32_figure(f64::NAN).is_nan());
    }
}
