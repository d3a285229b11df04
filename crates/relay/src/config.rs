//! The relay's configuration: a TOML file, with every section optional except the relay's
//! identity, and the broker keys it trusts unless it has a `[broker]` section (then, without
//! `broker_keys`, it trusts the ticket keys the broker announces; see [`crate::keys`]).
//! Unknown keys are an error.
//!
//! This module parses and checks; it does not read flags or the environment (the binary
//! applies those as overrides on a parsed [`RelayConfig`] and then calls
//! [`RelayConfig::validate`]).
//!
//! ```toml
//! relay_id = "relay-eu-1"
//! broker_keys = ["<64 hex digits: the broker's Ed25519 public key>"]
//!
//! [listen]
//! tcp = "0.0.0.0:7400"      # relayed TCP sessions
//! udp = "0.0.0.0:7401"      # relayed UDP sessions (omit to disable)
//! probe = "0.0.0.0:7402"    # probe echo and bandwidth burst (omit to disable)
//! http = "127.0.0.1:7480"   # GET /status (JSON) and GET /metrics (Prometheus); omit to disable
//!
//! [capacity]
//! max_sessions = 10000
//! max_bandwidth_bytes_per_sec = 0   # 0 = unlimited; total over all TCP sessions
//!
//! [location]
//! lat = 50.1
//! lon = 8.7
//! region = "eu-central"
//! ```
//!
//! See [`Limits`], [`ProbeConfig`] and [`DrainConfig`] for the remaining sections, and
//! [`BrokerLinkConfig`] for `[broker]`: where the relay reports its load (without it the relay
//! runs standalone and reports only on its own `/status`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use steelyard_proto::ticket::is_valid_id;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read relay config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("invalid relay config: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value breaks a rule.
    #[error("invalid relay config: {field}: {reason}")]
    Invalid {
        /// The offending key.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// The whole relay configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// This relay's id, as the broker writes it into tickets (1–64 of `[A-Za-z0-9._-]`).
    #[serde(default)]
    pub relay_id: String,
    /// The broker's Ed25519 public keys, 64 hex digits each; several during key rotation.
    /// When set they are pinned: the only keys trusted, whatever the broker announces. May be
    /// empty with a `[broker]` section: then the keys of the broker's welcome are trusted.
    #[serde(default)]
    pub broker_keys: Vec<String>,
    /// Where to listen.
    #[serde(default)]
    pub listen: Listen,
    /// What the relay may carry.
    #[serde(default)]
    pub capacity: Capacity,
    /// Where the relay is, for the broker.
    #[serde(default)]
    pub location: Location,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: Limits,
    /// Probe responder settings.
    #[serde(default)]
    pub probe: ProbeConfig,
    /// Graceful drain settings.
    #[serde(default)]
    pub drain: DrainConfig,
    /// Socket options of relayed TCP connections.
    #[serde(default)]
    pub tcp: TcpConfig,
    /// The broker this relay reports to; `None` runs standalone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerLinkConfig>,
}

/// `[broker]`: the broker's relay WebSocket, and how this relay proves who it is there.
///
/// ```toml
/// [broker]
/// url = "wss://broker.example.net:7443/v1/relay"
/// identity_key_file = "/var/lib/steelyard/relay-identity.key"  # created (0600) on first start
/// enroll_token = "..."          # only needed until the broker knows this relay
/// ca_cert = "/etc/steelyard/broker-ca.pem"   # wss only; default: the system's CA bundle
/// report_interval_ms = 1000     # used when the broker's welcome sets no interval
/// advertise_tcp = "203.0.113.7:7400"   # default: the bound TCP address unless 0.0.0.0/[::]
/// advertise_udp = "203.0.113.7:7401"   # default: the bound UDP address unless 0.0.0.0/[::]
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerLinkConfig {
    /// `ws://host:port/v1/relay` or `wss://host:port/v1/relay`.
    pub url: String,
    /// File holding the relay's Ed25519 identity seed (64 hex digits); created with mode 0600
    /// on first start. A file readable by group or others is refused.
    #[serde(default = "default_identity_key_file")]
    pub identity_key_file: PathBuf,
    /// A relay enrollment token, for a relay the broker does not know yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// PEM file of the CA(s) that signed the broker's certificate (wss only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Load report interval when the broker's welcome does not set one, milliseconds.
    #[serde(default = "default_report_interval_ms")]
    pub report_interval_ms: u64,
    /// The TCP address peers should dial (`host:port`), sent in the hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_tcp: Option<String>,
    /// The UDP address peers should use for sessions and probes (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_udp: Option<String>,
}

fn default_identity_key_file() -> PathBuf {
    PathBuf::from("relay-identity.key")
}

fn default_report_interval_ms() -> u64 {
    1_000
}

impl BrokerLinkConfig {
    /// A section for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            identity_key_file: default_identity_key_file(),
            enroll_token: None,
            ca_cert: None,
            report_interval_ms: default_report_interval_ms(),
            advertise_tcp: None,
            advertise_udp: None,
        }
    }

    /// Whether the URL asks for TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.url.trim().to_ascii_lowercase().starts_with("wss://")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let url = self.url.trim().to_ascii_lowercase();
        let rest = url
            .strip_prefix("ws://")
            .or_else(|| url.strip_prefix("wss://"));
        match rest {
            Some(r) if !r.is_empty() && !r.starts_with('/') => {}
            _ => {
                return invalid(
                    "broker.url",
                    format!(
                        "{:?} is not a ws:// or wss:// URL with a host, e.g. \
                         wss://broker.example.net:7443/v1/relay",
                        self.url
                    ),
                )
            }
        }
        if self.ca_cert.is_some() && !self.is_tls() {
            return invalid(
                "broker.ca_cert",
                "only used with a wss:// URL; remove it or use wss://".into(),
            );
        }
        if self.identity_key_file.as_os_str().is_empty() {
            return invalid("broker.identity_key_file", "must not be empty".into());
        }
        if self.enroll_token.as_deref().is_some_and(str::is_empty) {
            return invalid(
                "broker.enroll_token",
                "must not be empty (omit it when the broker already knows this relay)".into(),
            );
        }
        if !(100..=3_600_000).contains(&self.report_interval_ms) {
            return invalid(
                "broker.report_interval_ms",
                "must be between 100 and 3600000".into(),
            );
        }
        Ok(())
    }
}

/// Listen addresses. Port 0 picks a free port (see the relay's bound addresses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// TCP sessions.
    pub tcp: SocketAddr,
    /// UDP sessions; `None` disables them.
    #[serde(default)]
    pub udp: Option<SocketAddr>,
    /// Probe responder; `None` disables it.
    #[serde(default)]
    pub probe: Option<SocketAddr>,
    /// `/status` and `/metrics`; `None` disables them.
    #[serde(default)]
    pub http: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            tcp: SocketAddr::from(([0, 0, 0, 0], 7400)),
            udp: None,
            probe: None,
            http: None,
        }
    }
}

/// Capacity the relay announces and enforces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// Most sessions (TCP paired + TCP waiting + UDP) at once; beyond it hellos get `full`.
    pub max_sessions: u32,
    /// Most bytes per second over all TCP sessions together; 0 = unlimited.
    pub max_bandwidth_bytes_per_sec: u64,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_bandwidth_bytes_per_sec: 0,
        }
    }
}

/// Where the relay is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Location {
    /// Latitude in degrees.
    pub lat: Option<f64>,
    /// Longitude in degrees.
    pub lon: Option<f64>,
    /// Region name.
    pub region: Option<String>,
}

/// Limits on what any client, including a stranger, can make the relay hold, and timeouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most TCP connections open at once (handshaking, waiting and paired: a paired session
    /// holds two); more are answered `full` and closed. The default leaves room for
    /// `capacity.max_sessions` (10,000) paired sessions and 4,096 connections in other phases.
    pub max_connections: u32,
    /// Most TCP connections from one IP address that have not yet sent a full hello.
    pub max_handshakes_per_ip: u32,
    /// Most first sides waiting for their partner, in total.
    pub max_pending_total: u32,
    /// Most first sides waiting for their partner from one IP address.
    pub max_pending_per_ip: u32,
    /// Time a client has to send its whole hello, in milliseconds.
    pub hello_timeout_ms: u64,
    /// Time a first side waits for its partner, in milliseconds.
    pub pair_timeout_ms: u64,
    /// Idle timeout of a TCP session when its ticket sets none, in seconds.
    pub idle_timeout_secs: u32,
    /// Idle timeout of a UDP session (and of a half-bound one), in seconds.
    pub udp_idle_timeout_secs: u32,
    /// Clock skew allowed between broker and relay, in seconds.
    pub max_clock_skew_secs: u64,
    /// Most used tickets remembered for replay protection; when full, new tickets are refused
    /// (`full`) rather than forgotten early.
    pub max_remembered_tickets: u32,
    /// Most pipes for `splice(2)` open at once (a busy TCP session holds two, each up to
    /// 256 KiB of kernel memory). A session direction that gets none copies through a 64 KiB
    /// userspace buffer instead (counted in `steelyard_relay_tcp_pipe_fallbacks_total`), as it
    /// does when the kernel refuses a pipe. 0 = never splice.
    pub max_pipes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 24_096,
            max_handshakes_per_ip: 64,
            max_pending_total: 4_096,
            max_pending_per_ip: 32,
            hello_timeout_ms: 5_000,
            pair_timeout_ms: 30_000,
            idle_timeout_secs: 300,
            udp_idle_timeout_secs: 60,
            max_clock_skew_secs: 30,
            max_remembered_tickets: 1_000_000,
            max_pipes: 16_384,
        }
    }
}

/// Probe responder settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Most packets in one bandwidth burst.
    pub burst_max_packets: u16,
    /// Bytes per second all bursts together may send.
    pub burst_bytes_per_sec: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            burst_max_packets: 64,
            burst_bytes_per_sec: 2_000_000,
        }
    }
}

/// Graceful drain settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// After a drain starts, live sessions get this long to finish before they are cut.
    pub grace_secs: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { grace_secs: 30 }
    }
}

/// `[tcp]`: socket options of the relay's TCP connections (set on the listener; accepted
/// connections inherit them).
///
/// ```toml
/// [tcp]
/// congestion = "cubic"   # default: the system's (net.ipv4.tcp_congestion_control)
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// TCP congestion control of relayed connections (`TCP_CONGESTION`), e.g. `"cubic"` or
    /// `"reno"`; unset = the system default. A relay whose peers are on its LAN (or on the same
    /// host) gains nothing from BBR's pacing, which costs a high-resolution timer per burst of
    /// segments: `"cubic"` moves 64 loopback streams with less relay CPU (docs/BENCHMARKS.md,
    /// relay-tcp). Over long, lossy paths the system default (BBR where it is set) may do
    /// better. The name must be in `/proc/sys/net/ipv4/tcp_available_congestion_control`
    /// (`modprobe tcp_NAME` adds one), and, unless the relay has `CAP_NET_ADMIN`, in
    /// `tcp_allowed_congestion_control`; the relay refuses to start otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub congestion: Option<String>,
}

impl RelayConfig {
    /// Parses TOML text. Does not [`validate`](Self::validate): overrides may follow.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Checks the rules and returns the parsed broker keys: empty when the relay takes them
    /// from the broker (no `broker_keys`, a `[broker]` section).
    pub fn validate(&self) -> Result<Vec<VerifyingKey>, ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        if !is_valid_id(&self.relay_id) {
            return Err(invalid(
                "relay_id",
                "required: 1 to 64 bytes of A-Z a-z 0-9 . _ - (the id the broker puts in tickets)",
            ));
        }
        if self.broker_keys.is_empty() && self.broker.is_none() {
            return Err(invalid(
                "broker_keys",
                "required without a [broker] section: at least one broker Ed25519 public key \
                 (64 hex digits), or a [broker] section (--broker-url) so that the relay trusts \
                 the keys the broker announces",
            ));
        }
        let keys = self
            .broker_keys
            .iter()
            .map(|k| parse_public_key(k))
            .collect::<Result<Vec<_>, _>>()?;
        let l = &self.limits;
        for (field, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_handshakes_per_ip", l.max_handshakes_per_ip),
            ("limits.max_pending_total", l.max_pending_total),
            ("limits.max_pending_per_ip", l.max_pending_per_ip),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.udp_idle_timeout_secs", l.udp_idle_timeout_secs),
            ("limits.max_remembered_tickets", l.max_remembered_tickets),
            ("capacity.max_sessions", self.capacity.max_sessions),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if l.hello_timeout_ms == 0 || l.pair_timeout_ms == 0 {
            return Err(invalid(
                "limits.hello_timeout_ms / pair_timeout_ms",
                "must be at least 1",
            ));
        }
        if let Some(cc) = &self.tcp.congestion {
            // TCP_CA_NAME_MAX is 16 bytes with the terminating NUL.
            if cc.is_empty()
                || cc.len() > 15
                || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(invalid(
                    "tcp.congestion",
                    "must be the name of a TCP congestion control (1 to 15 of A-Z a-z 0-9 _), \
                     one of /proc/sys/net/ipv4/tcp_available_congestion_control, e.g. \"cubic\"; \
                     omit it for the system default",
                ));
            }
        }
        if let Some(b) = &self.broker {
            b.validate()?;
        }
        Ok(keys)
    }
}

/// Parses a broker public key from 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, ConfigError> {
    let bytes: [u8; 32] =
        steelyard_proto::hex::decode(text.trim()).map_err(|e| ConfigError::Invalid {
            field: "broker_keys",
            reason: format!("{e}"),
        })?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| ConfigError::Invalid {
        field: "broker_keys",
        reason: "not a valid Ed25519 public key".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    #[test]
    fn minimal_and_full() {
        let c = RelayConfig::from_toml(&format!("relay_id = \"r1\"\nbroker_keys = [\"{KEY}\"]\n"))
            .unwrap();
        assert_eq!(c.validate().unwrap().len(), 1);
        assert_eq!(c.limits.max_pending_per_ip, 32);
        let c = RelayConfig::from_toml(&format!(
            "relay_id = \"r1\"\nbroker_keys = [\"{KEY}\"]\n[listen]\ntcp = \"127.0.0.1:0\"\n\
             udp = \"127.0.0.1:0\"\n[limits]\npair_timeout_ms = 5\n[location]\nregion = \"eu\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.pair_timeout_ms, 5);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = RelayConfig::from_toml("relay_id = \"r\"\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = RelayConfig::from_toml("[limits]\nmax_conections = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_conections"), "{e}");
        let c = RelayConfig::from_toml("relay_id = \"r\"\n").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("broker_keys"));
        // With a [broker] section the keys may come from the broker instead.
        let c = RelayConfig::from_toml(
            "relay_id = \"r\"\n[broker]\nurl = \"ws://127.0.0.1:1/v1/relay\"\n",
        )
        .unwrap();
        assert_eq!(c.validate().unwrap().len(), 0);
        let c = RelayConfig::from_toml("broker_keys = [\"zz\"]\nrelay_id = \"a b\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("relay_id"));
        let c = RelayConfig::from_toml("broker_keys = [\"zz\"]\nrelay_id = \"ab\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("hex"));
    }

    #[test]
    fn tcp_congestion() {
        let head = format!("relay_id = \"r1\"\nbroker_keys = [\"{KEY}\"]\n");
        let c = RelayConfig::from_toml(&head).unwrap();
        assert_eq!(c.tcp.congestion, None);
        let c = RelayConfig::from_toml(&format!("{head}[tcp]\ncongestion = \"cubic\"\n")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.tcp.congestion.as_deref(), Some("cubic"));
        for bad in ["", "cu bic", "a_name_far_too_long", "bbr\\u0000"] {
            let c =
                RelayConfig::from_toml(&format!("{head}[tcp]\ncongestion = \"{bad}\"\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("tcp.congestion"), "{bad:?}: {e}");
        }
        let e =
            RelayConfig::from_toml(&format!("{head}[tcp]\ncongestio = \"cubic\"\n")).unwrap_err();
        assert!(e.to_string().contains("congestio"), "{e}");
    }

    #[test]
    fn broker_section() {
        let head = format!("relay_id = \"r1\"\nbroker_keys = [\"{KEY}\"]\n");
        let c = RelayConfig::from_toml(&head).unwrap();
        assert!(c.broker.is_none());
        let c = RelayConfig::from_toml(&format!(
            "{head}[broker]\nurl = \"ws://127.0.0.1:1/v1/relay\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        let b = c.broker.unwrap();
        assert_eq!(b.report_interval_ms, 1000);
        assert_eq!(b.identity_key_file, PathBuf::from("relay-identity.key"));
        assert!(!b.is_tls());
        let e = RelayConfig::from_toml(&format!("{head}[broker]\nurl = \"ws://h\"\nurll = 1\n"))
            .unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
        for (extra, field) in [
            ("url = \"http://h/v1/relay\"", "broker.url"),
            ("url = \"ws:///v1/relay\"", "broker.url"),
            ("url = \"ws://h\"\nca_cert = \"ca.pem\"", "broker.ca_cert"),
            (
                "url = \"ws://h\"\nreport_interval_ms = 5",
                "broker.report_interval_ms",
            ),
            (
                "url = \"ws://h\"\nenroll_token = \"\"",
                "broker.enroll_token",
            ),
        ] {
            let c = RelayConfig::from_toml(&format!("{head}[broker]\n{extra}\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{extra}: {e}");
        }
        let c = RelayConfig::from_toml(&format!(
            "{head}[broker]\nurl = \"wss://h:1/v1/relay\"\nca_cert = \"ca.pem\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert!(c.broker.unwrap().is_tls());
    }
}
