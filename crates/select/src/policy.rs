//! The operator's policy: how much each metric weighs, how fresh data must be, region and tier
//! rules, allow/deny lists, per-peer pins, and the hysteresis that keeps live sessions in place.
//!
//! All weights are expressed in *score milliseconds*: the score of a candidate is a cost, and each
//! part of it is worth as much as that many milliseconds of round-trip time. That keeps every part
//! comparable and every explanation readable ("won on load by 12 ms").
//!
//! A policy is plain data (serde, unknown fields refused) so the broker can read it from TOML and
//! serve it over its API. [`Policy::validate`] says what is wrong with a bad one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{PeerId, RelayId};

/// The whole selection policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Weights of the score parts.
    pub weights: Weights,
    /// How fresh reports must be.
    pub freshness: Freshness,
    /// When a relay counts as full.
    pub limits: Limits,
    /// Hysteresis for re-selection of live sessions.
    pub hysteresis: Hysteresis,
    /// With strict tiers a relay of a higher tier is used only when no relay of a lower tier is a
    /// candidate (hot backups). Otherwise tiers are ignored.
    pub strict_tiers: bool,
    /// If not empty, only these relays are ever chosen.
    pub allow_relays: BTreeSet<RelayId>,
    /// These relays are never chosen.
    pub deny_relays: BTreeSet<RelayId>,
    /// Rules that apply to peers by their region.
    pub region_rules: Vec<RegionRule>,
    /// Per-peer pins: sessions involving the peer go through the pinned relay.
    pub pins: BTreeMap<PeerId, Pin>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            weights: Weights::default(),
            freshness: Freshness::default(),
            limits: Limits::default(),
            hysteresis: Hysteresis::default(),
            strict_tiers: true,
            allow_relays: BTreeSet::new(),
            deny_relays: BTreeSet::new(),
            region_rules: Vec::new(),
            pins: BTreeMap::new(),
        }
    }
}

/// Weights of the score parts, each in score milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Weights {
    /// Per millisecond of path RTT (both legs added).
    pub rtt_per_ms: f64,
    /// Per IP hop (both legs added).
    pub per_hop: f64,
    /// Per unit of path loss (both legs compounded); 2000 makes 1 % loss cost 20 ms.
    pub loss: f64,
    /// Cost of a path whose bandwidth is exactly [`Weights::bandwidth_reference_kbps`]; the cost
    /// scales with reference / bandwidth, so half the bandwidth costs twice as much.
    pub bandwidth: f64,
    /// The reference bandwidth in kbit/s.
    pub bandwidth_reference_kbps: u64,
    /// Per kilometre of great-circle distance A → relay → B.
    pub distance_per_km: f64,
    /// Cost of a relay at 50 % utilisation. The load part is `load × u / (1 − u)`: the queueing
    /// delay factor of a server at utilisation `u`, gentle when idle and steep near capacity.
    pub load: f64,
    /// Cost of a path measurement just before it expires; it grows linearly from zero at
    /// [`Freshness::path_fresh_secs`].
    pub staleness: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            rtt_per_ms: 1.0,
            per_hop: 1.0,
            loss: 2000.0,
            bandwidth: 10.0,
            bandwidth_reference_kbps: 10_000,
            distance_per_km: 0.005,
            load: 20.0,
            staleness: 10.0,
        }
    }
}

/// How fresh reports must be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Freshness {
    /// A path measurement younger than this counts in full.
    pub path_fresh_secs: u64,
    /// A path measurement older than this is ignored: the relay is unreachable for that peer.
    pub path_expire_secs: u64,
    /// A relay whose last load report is older than this is not a candidate.
    pub relay_timeout_secs: u64,
    /// End-to-end measurements younger than this replace the per-leg estimate.
    pub end_to_end_fresh_secs: u64,
    /// A session assigned to a relay counts as pending until a load report at least this much
    /// later (the time peers take to reach the relay), or until it is this old
    /// ([`Freshness::pending_expire_ms`]).
    pub pending_grace_ms: u64,
    /// Pending assignments older than this are forgotten (the ticket has expired by then).
    pub pending_expire_ms: u64,
}

impl Default for Freshness {
    fn default() -> Self {
        Self {
            path_fresh_secs: 90,
            path_expire_secs: 300,
            relay_timeout_secs: 10,
            end_to_end_fresh_secs: 600,
            pending_grace_ms: 1_000,
            pending_expire_ms: 30_000,
        }
    }
}

/// When a relay counts as full.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// CPU use (0..1) at which a relay is full.
    pub max_cpu: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_cpu: 0.95 }
    }
}

/// Hysteresis for re-selection: a live session moves only when the best relay's score is better
/// than the current relay's by both margins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hysteresis {
    /// Least relative gain, 0..1 (0.2 = the new score must be at least 20 % lower).
    pub min_gain_ratio: f64,
    /// Least absolute gain in score milliseconds.
    pub min_gain_ms: f64,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Self {
            min_gain_ratio: 0.2,
            min_gain_ms: 10.0,
        }
    }
}

/// A rule for peers in one region (or all regions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionRule {
    /// The peer region the rule applies to; `*` for every peer.
    pub peer_region: String,
    /// If not empty, such peers use only relays in these regions.
    #[serde(default)]
    pub allow_relay_regions: BTreeSet<String>,
    /// Relay regions such peers prefer.
    #[serde(default)]
    pub prefer_relay_regions: BTreeSet<String>,
    /// Score milliseconds added for a relay outside the preferred regions.
    #[serde(default)]
    pub outside_preferred_ms: f64,
}

impl RegionRule {
    /// Whether the rule applies to a peer in `region`.
    pub fn applies_to(&self, region: &str) -> bool {
        self.peer_region == "*" || self.peer_region == region
    }
}

/// A per-peer pin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The relay the peer's sessions use.
    pub relay: RelayId,
    /// Strict: if the relay is not a candidate, fail. Otherwise fall back to normal selection.
    #[serde(default)]
    pub strict: bool,
}

/// What is wrong with a policy.
#[derive(Debug, Error, PartialEq)]
pub enum PolicyError {
    /// A weight or limit is negative, not finite, or out of its range.
    #[error("policy field `{field}` is {value}: {expected}")]
    OutOfRange {
        /// The field's path, e.g. `weights.load`.
        field: &'static str,
        /// The value given.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
    /// Freshness limits contradict each other.
    #[error(
        "policy freshness: path_fresh_secs ({fresh}) must not exceed path_expire_secs ({expire})"
    )]
    FreshAfterExpiry {
        /// `path_fresh_secs`.
        fresh: u64,
        /// `path_expire_secs`.
        expire: u64,
    },
    /// A relay is both allowed and denied.
    #[error("policy lists relay `{0}` in both allow_relays and deny_relays; remove it from one")]
    AllowedAndDenied(RelayId),
}

impl Policy {
    /// Checks every field; the error names the field and what it must be.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let w = &self.weights;
        let non_negative: [(&'static str, f64); 7] = [
            ("weights.rtt_per_ms", w.rtt_per_ms),
            ("weights.per_hop", w.per_hop),
            ("weights.loss", w.loss),
            ("weights.bandwidth", w.bandwidth),
            ("weights.distance_per_km", w.distance_per_km),
            ("weights.load", w.load),
            ("weights.staleness", w.staleness),
        ];
        for (field, value) in non_negative {
            check(field, value, value >= 0.0, "a finite number >= 0")?;
        }
        for rule in &self.region_rules {
            let value = rule.outside_preferred_ms;
            check(
                "region_rules.outside_preferred_ms",
                value,
                value >= 0.0,
                "a finite number >= 0",
            )?;
        }
        let h = &self.hysteresis;
        check(
            "hysteresis.min_gain_ratio",
            h.min_gain_ratio,
            (0.0..1.0).contains(&h.min_gain_ratio),
            "a number in 0..1",
        )?;
        check(
            "hysteresis.min_gain_ms",
            h.min_gain_ms,
            h.min_gain_ms >= 0.0,
            "a finite number >= 0",
        )?;
        let max_cpu = self.limits.max_cpu;
        check(
            "limits.max_cpu",
            max_cpu,
            max_cpu > 0.0 && max_cpu <= 1.0,
            "a number in (0, 1]",
        )?;
        if w.bandwidth_reference_kbps == 0 {
            return Err(PolicyError::OutOfRange {
                field: "weights.bandwidth_reference_kbps",
                value: 0.0,
                expected: "a bandwidth in kbit/s > 0",
            });
        }
        let f = &self.freshness;
        if f.path_fresh_secs > f.path_expire_secs {
            return Err(PolicyError::FreshAfterExpiry {
                fresh: f.path_fresh_secs,
                expire: f.path_expire_secs,
            });
        }
        if let Some(relay) = self.allow_relays.intersection(&self.deny_relays).next() {
            return Err(PolicyError::AllowedAndDenied(relay.clone()));
        }
        Ok(())
    }
}

fn check(
    field: &'static str,
    value: f64,
    ok: bool,
    expected: &'static str,
) -> Result<(), PolicyError> {
    if value.is_finite() && ok {
        Ok(())
    } else {
        Err(PolicyError::OutOfRange {
            field,
            value,
            expected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_is_valid() {
        assert_eq!(Policy::default().validate(), Ok(()));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let mut p = Policy::default();
        p.weights.load = -1.0;
        let err = p.validate().unwrap_err();
        assert!(err.to_string().contains("weights.load"), "{err}");

        let mut p = Policy::default();
        p.hysteresis.min_gain_ratio = f64::NAN;
        assert!(matches!(
            p.validate(),
            Err(PolicyError::OutOfRange {
                field: "hysteresis.min_gain_ratio",
                ..
            })
        ));

        let mut p = Policy::default();
        p.freshness.path_fresh_secs = 1000;
        assert!(matches!(
            p.validate(),
            Err(PolicyError::FreshAfterExpiry { .. })
        ));

        let mut p = Policy::default();
        p.allow_relays.insert("r1".into());
        p.deny_relays.insert("r1".into());
        assert!(matches!(
            p.validate(),
            Err(PolicyError::AllowedAndDenied(_))
        ));
    }
}
