//! End-to-end goodput of a tunnel, measured over the time data was actually flowing. Sans-I/O:
//! the caller feeds byte events with their times and asks for the figure at the end.
//!
//! A tunnel's life is mostly idle for interactive or long-held sessions; bytes over the whole
//! life would make its relay look slow. Instead a [`Meter`] groups the events of one direction
//! into **bursts**: events closer than [`Meter::new`]'s `gap` belong to the same burst. A burst
//! counts its bytes after its first event over the time from its first to its last event (the
//! first event's bytes were on their way before the clock started). The goodput is the bytes
//! of all bursts over the time of all bursts, and there is none when those bytes are fewer than
//! the minimum (too little to measure) or the time is under a millisecond.
//!
//! [`Goodput`] keeps one meter per direction and reports the faster direction: an echo moves
//! the same bytes both ways at once, and adding the two would double the path's rate.
//!
//! What this module does not do: read clocks or sockets, or decide when to report.

use std::time::{Duration, Instant};

/// Idle gap that ends a burst by default: longer than a round trip on any path we select, so
/// waiting for an answer inside a transfer still counts as flowing.
pub const DEFAULT_GAP: Duration = Duration::from_millis(250);
/// Fewest measured bytes (in one direction, over all bursts) for a goodput figure.
pub const MIN_BYTES: u64 = 64 * 1024;

/// Bursts of one direction.
#[derive(Debug, Clone)]
pub struct Meter {
    gap: Duration,
    burst: Option<(Instant, Instant)>,
    /// Bytes after the first event of the current burst.
    burst_bytes: u64,
    bytes: u64,
    active: Duration,
}

impl Meter {
    /// A meter whose bursts end after `gap` without bytes.
    pub fn new(gap: Duration) -> Self {
        Self {
            gap,
            burst: None,
            burst_bytes: 0,
            bytes: 0,
            active: Duration::ZERO,
        }
    }

    /// `n` bytes moved at `now` (times never go backwards; an earlier time counts as `now`
    /// equal to the last one).
    pub fn record(&mut self, now: Instant, n: u64) {
        if n == 0 {
            return;
        }
        match &mut self.burst {
            Some((_, last)) if now.saturating_duration_since(*last) <= self.gap => {
                *last = now.max(*last);
                self.burst_bytes += n;
            }
            _ => {
                self.close();
                self.burst = Some((now, now));
            }
        }
    }

    fn close(&mut self) {
        if let Some((first, last)) = self.burst.take() {
            self.bytes += std::mem::take(&mut self.burst_bytes);
            self.active += last - first;
        }
    }

    /// Measured bytes and time so far (the current burst included).
    pub fn totals(&self) -> (u64, Duration) {
        let current = self
            .burst
            .map_or(Duration::ZERO, |(first, last)| last - first);
        (self.bytes + self.burst_bytes, self.active + current)
    }

    /// Goodput in kbit/s, or `None` with fewer than `min_bytes` measured bytes or under a
    /// millisecond of flowing time.
    pub fn kbps(&self, min_bytes: u64) -> Option<u64> {
        let (bytes, active) = self.totals();
        let us = active.as_micros() as u64;
        (bytes >= min_bytes && us >= 1000).then(|| bytes.saturating_mul(8_000) / us)
    }
}

/// Both directions of a tunnel.
#[derive(Debug, Clone)]
pub struct Goodput {
    /// Bytes this side sent.
    pub sent: Meter,
    /// Bytes this side received.
    pub received: Meter,
}

impl Default for Goodput {
    fn default() -> Self {
        Self {
            sent: Meter::new(DEFAULT_GAP),
            received: Meter::new(DEFAULT_GAP),
        }
    }
}

impl Goodput {
    /// The faster measurable direction's goodput in kbit/s (see [`Meter::kbps`]).
    pub fn kbps(&self, min_bytes: u64) -> Option<u64> {
        match (self.sent.kbps(min_bytes), self.received.kbps(min_bytes)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn idle_time_between_bursts_does_not_count() {
        let t0 = Instant::now();
        let mut m = Meter::new(ms(250));
        // 1 MiB in 100 ms (64 KiB every 6.25 ms after the first), an hour idle, the same again.
        for start in [ms(0), ms(3_600_000)] {
            for i in 0..=16u64 {
                m.record(t0 + start + Duration::from_micros(i * 6250), 64 * 1024);
            }
        }
        // 2 × 16 × 64 KiB over 2 × 100 ms = 83 886 kbit/s; over the whole life it would be ~2.
        assert_eq!(m.totals(), (2 * 1024 * 1024, ms(200)));
        assert_eq!(m.kbps(MIN_BYTES), Some(83_886));
    }

    #[test]
    fn gaps_shorter_than_the_threshold_count_as_flowing() {
        let t0 = Instant::now();
        let mut m = Meter::new(ms(250));
        for i in 0..=10u64 {
            m.record(t0 + ms(i * 200), 100 * 1024);
        }
        // 10 × 100 KiB after the first event, over 2 s.
        assert_eq!(m.totals(), (1_024_000, ms(2000)));
        assert_eq!(m.kbps(MIN_BYTES), Some(4096));
    }

    #[test]
    fn too_little_to_measure_reports_nothing() {
        let t0 = Instant::now();
        let mut m = Meter::new(ms(250));
        assert_eq!(m.kbps(MIN_BYTES), None);
        // Keystrokes: each its own burst, no measured bytes.
        for i in 0..1000u64 {
            m.record(t0 + ms(i * 300), 100);
        }
        assert_eq!(m.totals(), (0, Duration::ZERO));
        assert_eq!(m.kbps(MIN_BYTES), None);
        // One big write arriving at once: bytes but no time.
        let mut m = Meter::new(ms(250));
        m.record(t0, 10 << 20);
        m.record(t0, 10 << 20);
        assert_eq!(m.kbps(MIN_BYTES), None);
        // Zero-byte events and a clock that steps back change nothing.
        m.record(t0 + ms(10), 0);
        m.record(t0 - ms(10), 1);
        assert_eq!(m.totals(), ((10 << 20) + 1, Duration::ZERO));
    }

    #[test]
    fn the_faster_direction_is_reported() {
        let t0 = Instant::now();
        let mut g = Goodput::default();
        for i in 0..=10u64 {
            g.sent.record(t0 + ms(i * 10), 64 * 1024);
            g.received.record(t0 + ms(i * 20), 64 * 1024);
        }
        assert_eq!(g.sent.kbps(MIN_BYTES), Some(52428));
        assert_eq!(g.received.kbps(MIN_BYTES), Some(26214));
        assert_eq!(g.kbps(MIN_BYTES), Some(52428));
        let one_way = Goodput {
            received: g.received.clone(),
            ..Goodput::default()
        };
        assert_eq!(one_way.kbps(MIN_BYTES), Some(26214));
    }
}
