//! The [`Selector`]: the state a broker keeps for selection (relays and their load, the peers'
//! latest reports, end-to-end measurements, sessions assigned but not yet reported, the policy)
//! and the decision over it.
//!
//! The selector is sans-I/O: every method that depends on time takes `now`; nothing here reads a
//! clock, touches a socket or holds a lock. A decision is a pure function of the state and `now`
//! (`&self`); recording the assignment that follows is the caller's separate step
//! ([`Selector::record_assignment`]), so asking for an explanation changes nothing.

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

use crate::decision::{
    Candidate, Decision, LoadView, NoChoice, PathEstimate, PathSource, RejectReason, Rejection,
    Resource, ScoreParts, Side, Why,
};
use crate::model::{
    EndToEnd, Location, PeerId, PeerReport, RelayId, RelayInfo, RelayLoad, Request, Timestamp,
};
use crate::policy::{Policy, PolicyError};
use crate::stored::{PathEntry, Slot, MAX_SLOTS};

/// At most this many pending assignments are remembered per relay; older ones are dropped first.
pub const MAX_PENDING_PER_RELAY: usize = 65_536;

/// Utilisation used for the load penalty is capped here so the penalty stays finite.
const MAX_PENALISED_UTILISATION: f64 = 0.999;

/// Why the selector refused an update.
#[derive(Debug, Error, PartialEq)]
pub enum UpdateError {
    /// The relay is not registered.
    #[error("relay {0} is not registered: register it (with its capacity) before it reports load")]
    UnknownRelay(RelayId),
    /// A field is out of range.
    #[error("{what}: field `{field}` is {value}, expected {expected}")]
    OutOfRange {
        /// What was being updated, e.g. `relay r1` or `peer p1's path to r2`.
        what: String,
        /// The field.
        field: &'static str,
        /// The value given, as text.
        value: String,
        /// What is allowed.
        expected: &'static str,
    },
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// A relay's slot. Slots are never reused, so a peer's path keeps pointing at the right relay
/// even across removal and re-registration under the same name (which gets the same slot).
#[derive(Debug)]
struct RelaySlot {
    id: RelayId,
    /// `None` once the relay is removed.
    entry: Option<RelayEntry>,
}

#[derive(Debug)]
struct RelayEntry {
    info: RelayInfo,
    load: Option<(RelayLoad, Timestamp)>,
    /// Times of assignments not yet reflected in a load report, oldest first.
    pending: VecDeque<Timestamp>,
}

#[derive(Debug)]
struct PeerEntry {
    location: Option<Location>,
    /// The newest `measured_at` of the report: paths store their time relative to it.
    newest: Timestamp,
    /// Sorted by slot, no duplicates: two peers' common relays are a merge of two sorted lists.
    /// Stored compactly (see [`crate::stored`]); a boxed slice has no spare capacity.
    paths: Box<[PathEntry]>,
}

/// The selection state and the decision over it. See the module docs.
#[derive(Debug, Default)]
pub struct Selector {
    policy: Policy,
    slots: Vec<RelaySlot>,
    slot_of: HashMap<RelayId, Slot>,
    peers: HashMap<PeerId, PeerEntry>,
    /// Keyed by the peer pair (smaller name first), then the relay's slot.
    end_to_end: HashMap<PeerId, HashMap<PeerId, HashMap<Slot, EndToEnd>>>,
}

impl Selector {
    /// An empty selector with `policy`.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(Self {
            policy,
            ..Self::default()
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy after validating it.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        self.policy = policy;
        Ok(())
    }

    /// Registers a relay or updates its static description; its load and pending sessions stay.
    pub fn upsert_relay(&mut self, info: RelayInfo) -> Result<(), UpdateError> {
        if !(info.weight.is_finite() && info.weight > 0.0) {
            return Err(UpdateError::OutOfRange {
                what: format!("relay {}", info.id),
                field: "weight",
                value: info.weight.to_string(),
                expected: "a finite number > 0",
            });
        }
        if let Some(loc) = &info.location {
            check_location(&format!("relay {}", info.id), loc)?;
        }
        let slot = match self.slot_of.get(&info.id) {
            Some(slot) => *slot,
            None => {
                if self.slots.len() >= MAX_SLOTS {
                    return Err(UpdateError::OutOfRange {
                        what: format!("relay {}", info.id),
                        field: "id",
                        value: info.id.to_string(),
                        expected: "fewer than 2^22 relay names in one selector",
                    });
                }
                let slot = self.slots.len() as Slot;
                self.slots.push(RelaySlot {
                    id: info.id.clone(),
                    entry: None,
                });
                self.slot_of.insert(info.id.clone(), slot);
                slot
            }
        };
        let relay_slot = &mut self.slots[slot as usize];
        let moved = relay_slot.entry.as_ref().map(|e| &e.info.location) != Some(&info.location);
        let location = info.location.clone();
        match &mut relay_slot.entry {
            Some(entry) => entry.info = info,
            None => {
                relay_slot.entry = Some(RelayEntry {
                    info,
                    load: None,
                    pending: VecDeque::new(),
                })
            }
        }
        if moved {
            for peer in self.peers.values_mut() {
                if let Ok(at) = peer.paths.binary_search_by_key(&slot, PathEntry::slot) {
                    peer.paths[at].set_distance_km(distance(&peer.location, &location));
                }
            }
        }
        Ok(())
    }

    /// Forgets a relay: it stops being a candidate; peers' reports of it stay until replaced.
    pub fn remove_relay(&mut self, relay: &str) -> bool {
        self.entry_mut(relay)
            .is_some_and(|slot| slot.take().is_some())
    }

    /// The registered relays.
    pub fn relays(&self) -> impl Iterator<Item = &RelayInfo> {
        self.slots
            .iter()
            .filter_map(|s| s.entry.as_ref().map(|e| &e.info))
    }

    /// A relay's last load report and when it arrived.
    pub fn relay_load(&self, relay: &str) -> Option<&(RelayLoad, Timestamp)> {
        let slot = self.slot_of.get(relay)?;
        self.slots[*slot as usize].entry.as_ref()?.load.as_ref()
    }

    fn entry_mut(&mut self, relay: &str) -> Option<&mut Option<RelayEntry>> {
        let slot = *self.slot_of.get(relay)?;
        Some(&mut self.slots[slot as usize].entry)
    }

    fn registered_mut(&mut self, relay: &str) -> Result<&mut RelayEntry, UpdateError> {
        self.entry_mut(relay)
            .and_then(Option::as_mut)
            .ok_or_else(|| UpdateError::UnknownRelay(RelayId::new(relay)))
    }

    /// Records a relay's load report received at `now`. Assignments made more than the policy's
    /// `pending_grace_ms` before `now` are taken to be in the report and stop counting as pending.
    pub fn relay_report(
        &mut self,
        relay: &str,
        load: RelayLoad,
        now: Timestamp,
    ) -> Result<(), UpdateError> {
        if !(load.cpu.is_finite() && (0.0..=1.0).contains(&load.cpu)) {
            return Err(UpdateError::OutOfRange {
                what: format!("load report of relay {relay}"),
                field: "cpu",
                value: load.cpu.to_string(),
                expected: "a share of the CPU in 0..=1",
            });
        }
        let grace = self.policy.freshness.pending_grace_ms;
        let entry = self.registered_mut(relay)?;
        entry.load = Some((load, now));
        while entry
            .pending
            .front()
            .is_some_and(|t| t.age_ms(now) >= grace)
        {
            entry.pending.pop_front();
        }
        Ok(())
    }

    /// Records that a session was just assigned to `relay`: until the relay's load reports show
    /// it, it counts against the relay's capacity. This is what keeps a burst of connects inside
    /// one report interval from herding onto one relay.
    pub fn record_assignment(&mut self, relay: &str, now: Timestamp) -> Result<(), UpdateError> {
        let expire = self.policy.freshness.pending_expire_ms;
        let entry = self.registered_mut(relay)?;
        while entry
            .pending
            .front()
            .is_some_and(|t| t.age_ms(now) >= expire)
        {
            entry.pending.pop_front();
        }
        if entry.pending.len() >= MAX_PENDING_PER_RELAY {
            entry.pending.pop_front();
        }
        // Keep the queue ordered even if callers' clocks step back.
        let at = entry.pending.partition_point(|t| *t <= now);
        entry.pending.insert(at, now);
        Ok(())
    }

    /// Forgets one pending assignment made to `relay` at `at` (the session was refused or its
    /// offer timed out, so it will never reach the relay). `false` if there was none.
    pub fn release_assignment(&mut self, relay: &str, at: Timestamp) -> bool {
        let Some(entry) = self.entry_mut(relay).and_then(Option::as_mut) else {
            return false;
        };
        match entry.pending.iter().rposition(|t| *t == at) {
            Some(i) => entry.pending.remove(i).is_some(),
            None => false,
        }
    }

    /// Replaces a peer's report. Every path is checked (ranges; each relay named once and
    /// registered); a bad one refuses the whole report and the previous one stays.
    pub fn peer_report(&mut self, report: PeerReport) -> Result<(), UpdateError> {
        let who = |relay: &RelayId| format!("peer {}'s path to {relay}", report.peer);
        for (relay, m) in &report.paths {
            let bad = |field: &'static str, value: String, expected: &'static str| {
                Err(UpdateError::OutOfRange {
                    what: who(relay),
                    field,
                    value,
                    expected,
                })
            };
            if !(m.rtt_ms.is_finite() && m.rtt_ms >= 0.0) {
                return bad("rtt_ms", m.rtt_ms.to_string(), "a finite number >= 0");
            }
            if !(m.loss.is_finite() && (0.0..=1.0).contains(&m.loss)) {
                return bad("loss", m.loss.to_string(), "a share in 0..=1");
            }
            if m.hops > 255 {
                return bad("hops", m.hops.to_string(), "0..=255");
            }
        }
        if let Some(loc) = &report.location {
            check_location(&format!("peer {}", report.peer), loc)?;
        }
        let newest = report
            .paths
            .iter()
            .map(|(_, m)| m.measured_at)
            .max()
            .unwrap_or_default();
        let mut paths = Vec::with_capacity(report.paths.len());
        for (relay, metrics) in &report.paths {
            let slot = *self
                .slot_of
                .get(relay)
                .ok_or_else(|| UpdateError::UnknownRelay(relay.clone()))?;
            let relay_location = self.slots[slot as usize]
                .entry
                .as_ref()
                .and_then(|e| e.info.location.clone());
            paths.push(PathEntry::new(
                slot,
                metrics,
                newest,
                distance(&report.location, &relay_location),
            ));
        }
        paths.sort_unstable_by_key(PathEntry::slot);
        if let Some(twice) = paths.windows(2).find(|w| w[0].slot() == w[1].slot()) {
            return Err(UpdateError::OutOfRange {
                what: format!("report of peer {}", report.peer),
                field: "paths",
                value: self.slots[twice[0].slot() as usize].id.to_string(),
                expected: "each relay at most once",
            });
        }
        self.peers.insert(
            report.peer,
            PeerEntry {
                location: report.location,
                newest,
                paths: paths.into_boxed_slice(),
            },
        );
        Ok(())
    }

    /// A peer's latest report, paths ordered by relay name, as stored: RTT, loss and distance
    /// to `f32` precision, see [`crate::stored`] for the exact tolerances.
    pub fn peer_report_of(&self, peer: &str) -> Option<PeerReport> {
        self.peers.get_key_value(peer).map(|(id, entry)| {
            let mut paths: Vec<_> = entry
                .paths
                .iter()
                .map(|p| {
                    (
                        self.slots[p.slot() as usize].id.clone(),
                        p.metrics(entry.newest),
                    )
                })
                .collect();
            paths.sort_by(|x, y| x.0.cmp(&y.0));
            PeerReport {
                peer: id.clone(),
                location: entry.location.clone(),
                paths,
            }
        })
    }

    /// How many relays a peer's latest report covers (without copying the report).
    pub fn peer_path_count(&self, peer: &str) -> Option<usize> {
        self.peers.get(peer).map(|p| p.paths.len())
    }

    /// Forgets a peer.
    pub fn remove_peer(&mut self, peer: &str) -> bool {
        self.peers.remove(peer).is_some()
    }

    /// Records an end-to-end measurement A → relay → B (the pair is unordered).
    pub fn end_to_end(
        &mut self,
        a: &PeerId,
        b: &PeerId,
        relay: &RelayId,
        metrics: EndToEnd,
    ) -> Result<(), UpdateError> {
        let what = || format!("end-to-end measurement {a} -> {relay} -> {b}");
        if !(metrics.rtt_ms.is_finite() && metrics.rtt_ms >= 0.0) {
            return Err(UpdateError::OutOfRange {
                what: what(),
                field: "rtt_ms",
                value: metrics.rtt_ms.to_string(),
                expected: "a finite number >= 0",
            });
        }
        if !(metrics.loss.is_finite() && (0.0..=1.0).contains(&metrics.loss)) {
            return Err(UpdateError::OutOfRange {
                what: what(),
                field: "loss",
                value: metrics.loss.to_string(),
                expected: "a share in 0..=1",
            });
        }
        let slot = *self
            .slot_of
            .get(relay)
            .ok_or_else(|| UpdateError::UnknownRelay(relay.clone()))?;
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        self.end_to_end
            .entry(first.clone())
            .or_default()
            .entry(second.clone())
            .or_default()
            .insert(slot, metrics);
        Ok(())
    }

    /// Forgets what has expired by `now`: pending assignments and end-to-end measurements past
    /// their limits. Decisions already ignore them; this bounds memory. Call it now and then.
    pub fn prune(&mut self, now: Timestamp) {
        let f = &self.policy.freshness;
        let (pending_expire, e2e_expire) = (f.pending_expire_ms, f.end_to_end_fresh_secs * 1000);
        for entry in self.slots.iter_mut().filter_map(|s| s.entry.as_mut()) {
            while entry
                .pending
                .front()
                .is_some_and(|t| t.age_ms(now) >= pending_expire)
            {
                entry.pending.pop_front();
            }
        }
        self.end_to_end.retain(|_, by_peer| {
            by_peer.retain(|_, by_relay| {
                by_relay.retain(|_, m| m.measured_at.age_ms(now) <= e2e_expire);
                !by_relay.is_empty()
            });
            !by_peer.is_empty()
        });
    }

    /// Decides which relay should carry `request`, and explains why. Changes nothing: call
    /// [`Selector::record_assignment`] when the session is actually created.
    pub fn decide(&self, request: &Request, now: Timestamp) -> Result<Decision, NoChoice> {
        if request.from == request.to {
            return Err(NoChoice::SamePeer {
                peer: request.from.clone(),
            });
        }
        let a = self
            .peers
            .get(&request.from)
            .ok_or_else(|| NoChoice::UnknownPeer {
                peer: request.from.clone(),
            })?;
        let b = self
            .peers
            .get(&request.to)
            .ok_or_else(|| NoChoice::UnknownPeer {
                peer: request.to.clone(),
            })?;

        let end_to_end = self.end_to_end_of(&request.from, &request.to);
        let mut candidates = Vec::with_capacity(a.paths.len().min(b.paths.len()));
        let mut rejected = Vec::new();
        let not_common = |slot: Slot, missing_side| Rejection {
            relay: self.slots[slot as usize].id.clone(),
            reason: RejectReason::NotCommon { missing_side },
        };
        let (mut i, mut j) = (0, 0);
        while i < a.paths.len() || j < b.paths.len() {
            let pa = a.paths.get(i);
            let pb = b.paths.get(j);
            match (pa, pb) {
                (Some(pa), Some(pb)) if pa.slot() == pb.slot() => {
                    let e2e = end_to_end.and_then(|m| m.get(&pa.slot()));
                    match self.evaluate(request, (a, pa), (b, pb), e2e, now) {
                        Ok(candidate) => candidates.push(Some(candidate)),
                        Err(reason) => rejected.push(Rejection {
                            relay: self.slots[pa.slot() as usize].id.clone(),
                            reason,
                        }),
                    }
                    i += 1;
                    j += 1;
                }
                (Some(pa), pb) if pb.is_none_or(|pb| pa.slot() < pb.slot()) => {
                    rejected.push(not_common(pa.slot(), Side::B));
                    i += 1;
                }
                (_, Some(pb)) => {
                    rejected.push(not_common(pb.slot(), Side::A));
                    j += 1;
                }
                (_, None) => unreachable!("the loop runs while either list has paths"),
            }
        }
        rejected.sort_unstable_by(|x, y| x.relay.cmp(&y.relay));

        if candidates.is_empty() {
            return Err(self.no_choice(request, a, b, rejected, now));
        }
        // Sort small keys, then move each candidate once: candidates are large.
        let strict_tiers = self.policy.strict_tiers;
        let mut order: Vec<(u8, f64, usize)> = candidates
            .iter()
            .flatten()
            .enumerate()
            .map(|(at, c)| (if strict_tiers { c.tier } else { 0 }, c.score.total, at))
            .collect();
        order.sort_unstable_by(|x, y| {
            x.0.cmp(&y.0).then(x.1.total_cmp(&y.1)).then_with(|| {
                let name = |at: usize| candidates[at].as_ref().map(|c| &c.relay);
                name(x.2).cmp(&name(y.2))
            })
        });
        let ranked: Vec<Candidate> = order
            .iter()
            .filter_map(|(_, _, at)| candidates[*at].take())
            .collect();

        if let Some((winner, why)) = self.apply_pins(request, &ranked, &rejected)? {
            return Ok(Decision {
                request: request.clone(),
                winner,
                why,
                ranked,
                rejected,
            });
        }

        let (winner, why) = self.pick(request, &ranked);
        Ok(Decision {
            request: request.clone(),
            winner,
            why,
            ranked,
            rejected,
        })
    }

    /// The winner among ranked candidates (not empty), with hysteresis for a live session.
    fn pick(&self, request: &Request, ranked: &[Candidate]) -> (RelayId, Why) {
        let best = &ranked[0];
        if let Some(current) = request
            .current
            .as_ref()
            .and_then(|cur| ranked.iter().find(|c| &c.relay == cur))
        {
            if current.relay != best.relay
                && !(self.policy.strict_tiers && best.tier < current.tier)
            {
                let h = &self.policy.hysteresis;
                let gain = current.score.total - best.score.total;
                let needed = h.min_gain_ms.max(current.score.total * h.min_gain_ratio);
                if gain < needed {
                    return (
                        current.relay.clone(),
                        Why::KeptCurrent {
                            best: best.relay.clone(),
                            gain_ms: gain,
                            needed_ms: needed,
                        },
                    );
                }
            }
        }
        let Some(runner_up) = ranked.get(1) else {
            return (best.relay.clone(), Why::OnlyCandidate);
        };
        if self.policy.strict_tiers
            && ranked
                .iter()
                .any(|c| c.tier > best.tier && c.score.total < best.score.total)
        {
            return (best.relay.clone(), Why::LowerTier { tier: best.tier });
        }
        let (wb, wr) = (&best.score, &runner_up.score);
        let mut differences: Vec<(String, f64)> = wb
            .named()
            .iter()
            .zip(wr.named())
            .map(|((name, x), (_, y))| ((*name).to_string(), x / wb.weight - y / wr.weight))
            .filter(|(_, d)| *d != 0.0)
            .collect();
        differences.sort_by(|x, y| y.1.abs().total_cmp(&x.1.abs()));
        (
            best.relay.clone(),
            Why::BestScore {
                runner_up: runner_up.relay.clone(),
                margin_ms: wr.total - wb.total,
                differences,
            },
        )
    }

    /// Applies the peers' pins (A's first). `Ok(None)`: no pin applies.
    fn apply_pins(
        &self,
        request: &Request,
        ranked: &[Candidate],
        rejected: &[Rejection],
    ) -> Result<Option<(RelayId, Why)>, NoChoice> {
        for peer in [&request.from, &request.to] {
            let Some(pin) = self.policy.pins.get(peer) else {
                continue;
            };
            if ranked.iter().any(|c| c.relay == pin.relay) {
                return Ok(Some((
                    pin.relay.clone(),
                    Why::Pinned { peer: peer.clone() },
                )));
            }
            if pin.strict {
                let reason = rejected.iter().find(|r| r.relay == pin.relay).map_or_else(
                    || "neither side reports reaching it".to_string(),
                    |r| r.reason.to_string(),
                );
                return Err(NoChoice::PinUnavailable {
                    peer: peer.clone(),
                    relay: pin.relay.clone(),
                    reason,
                });
            }
        }
        Ok(None)
    }

    /// Why nothing could be chosen: either no relay is reachable by both sides, or none of the
    /// common ones can take the session.
    fn no_choice(
        &self,
        request: &Request,
        a: &PeerEntry,
        b: &PeerEntry,
        rejected: Vec<Rejection>,
        now: Timestamp,
    ) -> NoChoice {
        let unreachable = |r: &RejectReason| {
            matches!(
                r,
                RejectReason::NotCommon { .. }
                    | RejectReason::PathExpired { .. }
                    | RejectReason::NoTransport { .. }
            )
        };
        if rejected.iter().all(|r| unreachable(&r.reason)) {
            let reaches = |peer: &PeerEntry| {
                let mut ids: Vec<RelayId> = peer
                    .paths
                    .iter()
                    .filter(|p| self.path_usable(p, peer.newest, request, now))
                    .map(|p| self.slots[p.slot() as usize].id.clone())
                    .collect();
                ids.sort();
                ids
            };
            return NoChoice::NoCommonRelay {
                from: request.from.clone(),
                to: request.to.clone(),
                transport: request.transport,
                from_reaches: reaches(a),
                to_reaches: reaches(b),
            };
        }
        NoChoice::NoUsableRelay {
            rejected: rejected
                .into_iter()
                .filter(|r| !unreachable(&r.reason))
                .collect(),
        }
    }

    fn end_to_end_of(&self, a: &PeerId, b: &PeerId) -> Option<&HashMap<Slot, EndToEnd>> {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        self.end_to_end.get(first)?.get(second)
    }

    fn path_usable(
        &self,
        p: &PathEntry,
        newest: Timestamp,
        request: &Request,
        now: Timestamp,
    ) -> bool {
        p.carries(request.transport)
            && p.measured_at(newest).age_ms(now) <= self.policy.freshness.path_expire_secs * 1000
    }

    /// One common relay: a candidate with its score, or the reason it is not one.
    fn evaluate(
        &self,
        request: &Request,
        (a, path_a): (&PeerEntry, &PathEntry),
        (b, path_b): (&PeerEntry, &PathEntry),
        end_to_end: Option<&EndToEnd>,
        now: Timestamp,
    ) -> Result<Candidate, RejectReason> {
        let policy = &self.policy;
        let fresh = &policy.freshness;
        let mut path_age_ms = 0;
        for (side, peer, m) in [(Side::A, a, path_a), (Side::B, b, path_b)] {
            let age_ms = m.measured_at(peer.newest).age_ms(now);
            path_age_ms = path_age_ms.max(age_ms);
            if age_ms > fresh.path_expire_secs * 1000 {
                return Err(RejectReason::PathExpired { side, age_ms });
            }
            if !m.carries(request.transport) {
                return Err(RejectReason::NoTransport {
                    side,
                    transport: request.transport,
                });
            }
        }
        let slot = &self.slots[path_a.slot() as usize];
        let relay_id = &slot.id;
        let entry = slot.entry.as_ref().ok_or(RejectReason::UnknownRelay)?;
        let info = &entry.info;
        let (load, reported_at) = entry.load.as_ref().ok_or(RejectReason::NeverReported)?;
        let report_age_ms = reported_at.age_ms(now);
        if report_age_ms > fresh.relay_timeout_secs * 1000 {
            return Err(RejectReason::Silent {
                age_ms: report_age_ms,
            });
        }
        if load.draining {
            return Err(RejectReason::Draining);
        }
        if policy.deny_relays.contains(relay_id) {
            return Err(RejectReason::Denied);
        }
        if !policy.allow_relays.is_empty() && !policy.allow_relays.contains(relay_id) {
            return Err(RejectReason::NotAllowed);
        }
        let relay_region = info.location.as_ref().map_or("", |l| l.region.as_str());
        let mut region_penalty = 0.0;
        for (side, peer) in [(Side::A, a), (Side::B, b)] {
            let peer_region = peer.location.as_ref().map_or("", |l| l.region.as_str());
            for rule in policy
                .region_rules
                .iter()
                .filter(|r| r.applies_to(peer_region))
            {
                if !rule.allow_relay_regions.is_empty()
                    && !rule.allow_relay_regions.contains(relay_region)
                {
                    return Err(RejectReason::RegionNotAllowed {
                        side,
                        relay_region: relay_region.to_string(),
                    });
                }
                if !rule.prefer_relay_regions.is_empty()
                    && !rule.prefer_relay_regions.contains(relay_region)
                {
                    region_penalty += rule.outside_preferred_ms;
                }
            }
        }

        // A new session needs a free slot; a live session on its current relay already has one,
        // and the load it is compared on is the load without it, as for every other relay.
        let is_current = request.current.as_ref() == Some(relay_id);
        let load_view = self.load_view(entry, load, report_age_ms, is_current, now);
        let committed = u64::from(load_view.sessions) + u64::from(load_view.pending);
        if committed + u64::from(!is_current) > u64::from(info.capacity.max_sessions) {
            return Err(RejectReason::Full {
                resource: Resource::Sessions,
            });
        }
        let cap = &info.capacity;
        if cap.max_bandwidth_kbps > 0 && load.bandwidth_kbps >= cap.max_bandwidth_kbps {
            return Err(RejectReason::Full {
                resource: Resource::Bandwidth,
            });
        }
        if load.cpu >= policy.limits.max_cpu {
            return Err(RejectReason::Full {
                resource: Resource::Cpu,
            });
        }

        let e2e =
            end_to_end.filter(|m| m.measured_at.age_ms(now) <= fresh.end_to_end_fresh_secs * 1000);
        let path = estimate_path(path_a, path_b, path_age_ms, e2e);
        let score = self.score(&path, &load_view, region_penalty, info.weight);
        Ok(Candidate {
            relay: relay_id.clone(),
            tier: info.tier,
            path,
            load: load_view,
            score,
        })
    }

    fn load_view(
        &self,
        entry: &RelayEntry,
        load: &RelayLoad,
        report_age_ms: u64,
        includes_this_session: bool,
        now: Timestamp,
    ) -> LoadView {
        let expire = self.policy.freshness.pending_expire_ms;
        let live_from = entry.pending.partition_point(|t| t.age_ms(now) >= expire);
        let pending = u32::try_from(entry.pending.len() - live_from).unwrap_or(u32::MAX);
        let cap = &entry.info.capacity;
        let sessions_share = if cap.max_sessions == 0 {
            1.0
        } else {
            let others = (u64::from(load.sessions) + u64::from(pending))
                .saturating_sub(u64::from(includes_this_session));
            others as f64 / f64::from(cap.max_sessions)
        };
        let bandwidth_share = if cap.max_bandwidth_kbps == 0 {
            0.0
        } else {
            load.bandwidth_kbps as f64 / cap.max_bandwidth_kbps as f64
        };
        let cpu_share = load.cpu / self.policy.limits.max_cpu;
        let (utilisation, bound_by) = [
            (sessions_share, Resource::Sessions),
            (bandwidth_share, Resource::Bandwidth),
            (cpu_share, Resource::Cpu),
        ]
        .into_iter()
        .fold((f64::MIN, Resource::Sessions), |best, x| {
            if x.0 > best.0 {
                x
            } else {
                best
            }
        });
        LoadView {
            sessions: load.sessions,
            pending,
            max_sessions: cap.max_sessions,
            bandwidth_kbps: load.bandwidth_kbps,
            max_bandwidth_kbps: cap.max_bandwidth_kbps,
            cpu: load.cpu,
            utilisation,
            bound_by,
            report_age_ms,
        }
    }

    fn score(&self, path: &PathEstimate, load: &LoadView, region: f64, weight: f64) -> ScoreParts {
        let w = &self.policy.weights;
        let fresh = &self.policy.freshness;
        let reference = w.bandwidth_reference_kbps as f64;
        let bandwidth = match path.bandwidth_kbps {
            Some(kbps) => w.bandwidth * reference / (kbps.max(1) as f64),
            None => w.bandwidth,
        };
        let u = load.utilisation.clamp(0.0, MAX_PENALISED_UTILISATION);
        let fresh_ms = fresh.path_fresh_secs * 1000;
        let window_ms = fresh.path_expire_secs * 1000 - fresh_ms;
        let staleness = if window_ms == 0 {
            0.0
        } else {
            let over = path.age_ms.saturating_sub(fresh_ms) as f64 / window_ms as f64;
            w.staleness * over.min(1.0)
        };
        let mut parts = ScoreParts {
            rtt: w.rtt_per_ms * path.rtt_ms,
            hops: w.per_hop * f64::from(path.hops),
            loss: w.loss * path.loss,
            bandwidth,
            distance: path.distance_km.map_or(0.0, |km| w.distance_per_km * km),
            load: w.load * u / (1.0 - u),
            staleness,
            region,
            weight,
            total: 0.0,
        };
        parts.total = parts.named().iter().map(|(_, v)| v).sum::<f64>() / weight;
        parts
    }
}

/// The path A → relay → B from the two legs, or from a fresh end-to-end measurement; `age_ms`
/// is the older leg's age.
fn estimate_path(
    pa: &PathEntry,
    pb: &PathEntry,
    age_ms: u64,
    end_to_end: Option<&EndToEnd>,
) -> PathEstimate {
    let distance_km = match (pa.distance_km(), pb.distance_km()) {
        (Some(x), Some(y)) => Some(x + y),
        _ => None,
    };
    let legs_bandwidth = match (pa.bandwidth_kbps(), pb.bandwidth_kbps()) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    let hops = pa.hops() + pb.hops();
    match end_to_end {
        Some(e) => PathEstimate {
            rtt_ms: e.rtt_ms,
            hops,
            loss: e.loss,
            // A tunnel's goodput proves the path carries at least that much; it may have been
            // limited by the application or the endpoints, so it raises the legs' estimate but
            // never lowers it.
            bandwidth_kbps: match (e.bandwidth_kbps, legs_bandwidth) {
                (Some(x), Some(y)) => Some(x.max(y)),
                (x, y) => x.or(y),
            },
            distance_km,
            source: PathSource::EndToEnd,
            age_ms,
        },
        None => PathEstimate {
            rtt_ms: pa.rtt_ms() + pb.rtt_ms(),
            hops,
            loss: 1.0 - (1.0 - pa.loss()) * (1.0 - pb.loss()),
            bandwidth_kbps: legs_bandwidth,
            distance_km,
            source: PathSource::Legs,
            age_ms,
        },
    }
}

fn distance(peer: &Option<Location>, relay: &Option<Location>) -> Option<f64> {
    Some(peer.as_ref()?.distance_km(relay.as_ref()?))
}

fn check_location(what: &str, loc: &Location) -> Result<(), UpdateError> {
    let bad = |field, value: f64, expected| UpdateError::OutOfRange {
        what: what.to_string(),
        field,
        value: value.to_string(),
        expected,
    };
    if !(loc.lat.is_finite() && (-90.0..=90.0).contains(&loc.lat)) {
        return Err(bad("lat", loc.lat, "degrees in -90..=90"));
    }
    if !(loc.lon.is_finite() && (-180.0..=180.0).contains(&loc.lon)) {
        return Err(bad("lon", loc.lon, "degrees in -180..=180"));
    }
    Ok(())
}
