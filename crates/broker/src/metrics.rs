//! Counters of the broker's I/O layer and their Prometheus text rendering.
//!
//! Counters are plain atomics bumped on the hot path; gauges come from the core when
//! `/metrics` is scraped. No registry, no labels beyond the fixed ones below.

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
    /// Store write failures.
    pub store_errors: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
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
        let counters: [(&str, &str, &AtomicU64); 13] = [
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
        let gauges = [
            ("peers", "Enrolled peers", g.peers),
            ("peers_online", "Peers connected", g.peers_online),
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
