//! Counters of the broker's I/O layer and their Prometheus text rendering.
//!
//! Counters and histogram buckets are plain atomics bumped on the hot path; gauges come from
//! the core when `/metrics` is scraped. No registry, no labels beyond the fixed ones below.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use steelyard_proto::api::ErrorCode;

use crate::core::Gauges;

/// Every error code, in a fixed order, for per-code counters.
pub const CODES: [ErrorCode; 20] = [
    ErrorCode::BadMessage,
    ErrorCode::TooLarge,
    ErrorCode::RateLimited,
    ErrorCode::UnsupportedVersion,
    ErrorCode::Unauthenticated,
    ErrorCode::AuthFailed,
    ErrorCode::BadToken,
    ErrorCode::Revoked,
    ErrorCode::UnknownPeer,
    ErrorCode::PeerOffline,
    ErrorCode::NoCommonRelay,
    ErrorCode::NoUsableRelay,
    ErrorCode::Refused,
    ErrorCode::Timeout,
    ErrorCode::TooManyPending,
    ErrorCode::InvalidReport,
    ErrorCode::UnknownSession,
    ErrorCode::TooManyConnections,
    ErrorCode::Replaced,
    ErrorCode::Internal,
];

/// Upper bounds of the latency histograms' buckets, microseconds (100 µs to 15 s: the offer
/// timeout's default).
const BUCKETS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 15_000_000,
];

/// A Prometheus histogram with the fixed [`BUCKETS_US`] buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP steelyard_broker_{name} {help}");
        let _ = writeln!(out, "# TYPE steelyard_broker_{name} histogram");
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            match BUCKETS_US.get(i) {
                Some(&b) => {
                    let le = b as f64 / 1e6;
                    let _ = writeln!(
                        out,
                        "steelyard_broker_{name}_bucket{{le=\"{le}\"}} {cumulative}"
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "steelyard_broker_{name}_bucket{{le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "steelyard_broker_{name}_sum {sum}");
        let _ = writeln!(out, "steelyard_broker_{name}_count {cumulative}");
    }
}

fn code_index(code: ErrorCode) -> usize {
    CODES.iter().position(|c| *c == code).unwrap_or(0)
}

/// The broker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WebSocket connections accepted (agents and relays).
    pub ws_accepted: AtomicU64,
    /// Authentications that succeeded.
    pub auth_ok: AtomicU64,
    /// Peers enrolled.
    pub enrolled: AtomicU64,
    /// Messages received.
    pub messages_in: AtomicU64,
    /// Messages sent.
    pub messages_out: AtomicU64,
    /// Connections closed because their send queue was full.
    pub slow_consumers: AtomicU64,
    /// Connects answered with a relay.
    pub connects_ok: AtomicU64,
    /// Reports accepted.
    pub reports: AtomicU64,
    /// Relay load reports accepted.
    pub load_reports: AtomicU64,
    /// Early-report requests sent.
    pub report_requests: AtomicU64,
    /// Upgrades refused: too many unauthenticated connections from one address.
    pub unauth_limit: AtomicU64,
    /// Upgrades refused: the broker's total connection limit was reached.
    pub connection_limit: AtomicU64,
    /// Store write failures.
    pub store_errors: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
    /// Connect request received to answer sent (with a relay) to the initiator.
    pub connect_latency: Histogram,
    /// Offer sent to the acceptor to its reply received (accepted or refused).
    pub offer_round_trip: Histogram,
    errors: [AtomicU64; CODES.len()],
}

impl Metrics {
    /// Counts one error sent with `code`.
    pub fn error(&self, code: ErrorCode) {
        self.errors[code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many errors with `code` were sent.
    pub fn errors(&self, code: ErrorCode) -> u64 {
        self.errors[code_index(code)].load(Ordering::Relaxed)
    }

    /// Prometheus text format.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64); 14] = [
            (
                "ws_accepted_total",
                "WebSocket connections accepted",
                &self.ws_accepted,
            ),
            ("auth_ok_total", "Successful authentications", &self.auth_ok),
            ("enrolled_total", "Peers enrolled", &self.enrolled),
            ("messages_in_total", "Messages received", &self.messages_in),
            ("messages_out_total", "Messages sent", &self.messages_out),
            (
                "slow_consumers_total",
                "Connections closed for a full send queue",
                &self.slow_consumers,
            ),
            (
                "connects_ok_total",
                "Connect requests answered with a relay",
                &self.connects_ok,
            ),
            ("reports_total", "Agent reports accepted", &self.reports),
            (
                "load_reports_total",
                "Relay load reports accepted",
                &self.load_reports,
            ),
            (
                "report_requests_total",
                "Early-report requests sent",
                &self.report_requests,
            ),
            (
                "unauthenticated_limit_total",
                "Upgrades refused: too many unauthenticated connections from one address",
                &self.unauth_limit,
            ),
            (
                "connection_limit_total",
                "Upgrades refused with 503: limits.max_connections open WebSockets",
                &self.connection_limit,
            ),
            (
                "store_errors_total",
                "Store write failures",
                &self.store_errors,
            ),
            (
                "tls_failures_total",
                "Failed TLS handshakes",
                &self.tls_failures,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP steelyard_broker_{name} {help}");
            let _ = writeln!(out, "# TYPE steelyard_broker_{name} counter");
            let _ = writeln!(out, "steelyard_broker_{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP steelyard_broker_errors_total Errors sent, by code"
        );
        let _ = writeln!(out, "# TYPE steelyard_broker_errors_total counter");
        for (i, code) in CODES.iter().enumerate() {
            let _ = writeln!(
                out,
                "steelyard_broker_errors_total{{code=\"{code}\"}} {}",
                self.errors[i].load(Ordering::Relaxed)
            );
        }
        self.connect_latency.render(
            &mut out,
            "connect_latency_seconds",
            "Connect request received to answer with a relay sent; when the acceptor must \
             answer, this includes the offer round trip (millisecond resolution)",
        );
        self.offer_round_trip.render(
            &mut out,
            "offer_round_trip_seconds",
            "Offer created to the acceptor's reply (accept or refuse), millisecond resolution",
        );
        let gauges = [
            ("peers", "Enrolled peers", g.peers),
            ("peers_online", "Peers connected", g.peers_online),
            (
                "websockets_open",
                "Open WebSockets: agents, relays and not yet authenticated",
                g.websockets_open,
            ),
            ("relays", "Registered relays", g.relays),
            ("relays_online", "Relays connected", g.relays_online),
            ("live_sessions", "Sessions in memory", g.live_sessions),
            (
                "pending_offers",
                "Offers waiting for an answer",
                g.pending_offers,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP steelyard_broker_{name} {help}");
            let _ = writeln!(out, "# TYPE steelyard_broker_{name} gauge");
            let _ = writeln!(out, "steelyard_broker_{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(
            out.contains("# TYPE steelyard_broker_x_seconds histogram"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(
            out.contains("x_seconds_bucket{le=\"0.00025\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"15\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0008\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }
}
