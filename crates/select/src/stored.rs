//! How the selector stores one path of a peer's report: 24 bytes instead of the 72 that a
//! [`PathMetrics`] with its relay slot and distance takes. A broker keeps every peer's latest
//! report (tens of paths each, for every registered peer), so this is most of its state per peer.
//!
//! What is kept, and how exactly:
//!
//! * RTT and loss as `f32` (relative error at most 2⁻²⁴, about 6 × 10⁻⁸; an RTT beyond
//!   `f32::MAX` ms is stored as `f32::MAX`);
//! * bandwidth as `u32` kbit/s, exact up to 4,294,967,294 kbit/s (more is stored as that);
//!   "not measured" is a sentinel;
//! * hops (0..=255, checked by the selector), UDP and TCP exactly, packed with the relay slot
//!   into one `u32` (so a selector holds at most [`MAX_SLOTS`] relay names);
//! * `measured_at` exactly, as milliseconds before the newest measurement of the same report
//!   (kept once per peer). A path measured more than `u32::MAX` ms (49.7 days) before the
//!   report's newest is stored as measured at the epoch: expired under any policy;
//! * the peer-to-relay distance as `f32` km (relative error 6 × 10⁻⁸); unknown is NaN.
//!
//! This module only converts; validation of ranges is the selector's job.

use crate::model::{PathMetrics, Timestamp, Transport};

/// Bits of the packed key below the slot: 8 for hops, 1 for UDP, 1 for TCP.
const SLOT_SHIFT: u32 = 10;
/// Relay slots a selector can hand out: the slot shares a `u32` with hops and transports.
pub(crate) const MAX_SLOTS: usize = 1 << (32 - SLOT_SHIFT);
const UDP: u32 = 1 << 1;
const TCP: u32 = 1;
/// `bandwidth_kbps` when the peer did not measure it.
const NO_BANDWIDTH: u32 = u32::MAX;
/// `before_newest_ms` of a path too old to express: read back as measured at the epoch.
const ANCIENT: u32 = u32::MAX;

/// A relay slot: an index into the selector's relay table.
pub(crate) type Slot = u32;

/// One stored path of a peer's report. See the module docs for what each field keeps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PathEntry {
    /// `slot << 10 | hops << 2 | udp << 1 | tcp`: ordering by key orders by slot.
    key: u32,
    rtt_ms: f32,
    loss: f32,
    bandwidth_kbps: u32,
    /// Milliseconds before the report's newest `measured_at`; [`ANCIENT`] if too many.
    before_newest_ms: u32,
    /// Peer to relay in km, NaN when either location is unknown. Kept up to date by the
    /// selector when either location changes (trigonometry is too dear for every decision).
    distance_km: f32,
}

const _: () = assert!(std::mem::size_of::<PathEntry>() == 24);

impl PathEntry {
    /// Stores `m` for the relay in `slot`. `newest` is the newest `measured_at` of the report
    /// (`>= m.measured_at`), `m.hops` must be at most 255 and `slot` below [`MAX_SLOTS`].
    pub(crate) fn new(
        slot: Slot,
        m: &PathMetrics,
        newest: Timestamp,
        distance_km: Option<f64>,
    ) -> Self {
        debug_assert!((slot as usize) < MAX_SLOTS && m.hops <= 255);
        let hops = m.hops.min(255);
        let key = slot << SLOT_SHIFT
            | hops << 2
            | if m.udp { UDP } else { 0 }
            | if m.tcp { TCP } else { 0 };
        let before = newest.millis().saturating_sub(m.measured_at.millis());
        Self {
            key,
            rtt_ms: m.rtt_ms.min(f64::from(f32::MAX)) as f32,
            loss: m.loss as f32,
            bandwidth_kbps: m
                .bandwidth_kbps
                .map_or(NO_BANDWIDTH, |b| u32::try_from(b).unwrap_or(u32::MAX - 1)),
            before_newest_ms: u32::try_from(before).unwrap_or(ANCIENT),
            distance_km: distance_km.map_or(f32::NAN, |d| d as f32),
        }
    }

    /// The path's metrics as stored; `newest` as given to [`PathEntry::new`].
    pub(crate) fn metrics(&self, newest: Timestamp) -> PathMetrics {
        PathMetrics {
            rtt_ms: self.rtt_ms(),
            hops: self.hops(),
            loss: self.loss(),
            bandwidth_kbps: self.bandwidth_kbps(),
            udp: self.carries(Transport::Udp),
            tcp: self.carries(Transport::Tcp),
            measured_at: self.measured_at(newest),
        }
    }

    pub(crate) fn slot(&self) -> Slot {
        self.key >> SLOT_SHIFT
    }

    pub(crate) fn rtt_ms(&self) -> f64 {
        f64::from(self.rtt_ms)
    }

    pub(crate) fn loss(&self) -> f64 {
        f64::from(self.loss)
    }

    pub(crate) fn hops(&self) -> u32 {
        (self.key >> 2) & 0xff
    }

    pub(crate) fn bandwidth_kbps(&self) -> Option<u64> {
        (self.bandwidth_kbps != NO_BANDWIDTH).then_some(u64::from(self.bandwidth_kbps))
    }

    pub(crate) fn carries(&self, transport: Transport) -> bool {
        self.key
            & match transport {
                Transport::Udp => UDP,
                Transport::Tcp => TCP,
            }
            != 0
    }

    pub(crate) fn measured_at(&self, newest: Timestamp) -> Timestamp {
        if self.before_newest_ms == ANCIENT {
            return Timestamp::from_millis(0);
        }
        Timestamp::from_millis(newest.millis() - u64::from(self.before_newest_ms))
    }

    pub(crate) fn distance_km(&self) -> Option<f64> {
        (!self.distance_km.is_nan()).then_some(f64::from(self.distance_km))
    }

    pub(crate) fn set_distance_km(&mut self, distance_km: Option<f64>) {
        self.distance_km = distance_km.map_or(f32::NAN, |d| d as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(measured_at: u64) -> PathMetrics {
        PathMetrics {
            rtt_ms: 12.5,
            hops: 255,
            loss: 0.25,
            bandwidth_kbps: Some(u64::from(u32::MAX) + 7),
            udp: true,
            tcp: false,
            measured_at: Timestamp::from_millis(measured_at),
        }
    }

    #[test]
    fn the_edges_are_kept_or_saturate_as_documented() {
        let newest = Timestamp::from_millis(1_700_000_000_000);
        let slot = (MAX_SLOTS - 1) as Slot;
        let e = PathEntry::new(slot, &path(newest.millis() - 5), newest, Some(1234.5));
        assert_eq!(e.slot(), slot);
        let back = e.metrics(newest);
        assert_eq!(back.hops, 255);
        assert!(back.udp && !back.tcp);
        assert_eq!(back.bandwidth_kbps, Some(u64::from(u32::MAX) - 1));
        assert_eq!(
            back.measured_at,
            Timestamp::from_millis(newest.millis() - 5)
        );
        assert_eq!(e.distance_km(), Some(1234.5));

        let ancient = PathEntry::new(0, &path(1), newest, None);
        assert_eq!(ancient.measured_at(newest), Timestamp::from_millis(0));
        assert_eq!(ancient.distance_km(), None);

        let mut huge = path(newest.millis());
        huge.rtt_ms = f64::MAX;
        huge.bandwidth_kbps = None;
        let e = PathEntry::new(3, &huge, newest, None);
        assert_eq!(e.rtt_ms(), f64::from(f32::MAX));
        assert_eq!(e.bandwidth_kbps(), None);
        assert_eq!(e.slot(), 3);
    }
}
