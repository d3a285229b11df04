//! The broker's configuration: what `steelyard broker` reads from its TOML file. Unknown keys
//! are errors. [`BrokerConfig::validate`] checks what serde cannot (TLS or an explicit
//! plain-HTTP opt-in, token rules, relay entries, the policy).
//!
//! This module only reads and checks; it opens no file other than the config itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use steelyard_proto::api::Role;
use steelyard_select::Policy;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("config {path}: {message}")]
    Parse {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// A value breaks a rule.
    #[error("config: {0}")]
    Invalid(String),
}

/// Which store backend keeps durable state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In memory: lost at exit (the default, for demos and tests).
    #[default]
    Memory,
    /// SQLite in `data_dir/broker.db`.
    Sqlite,
}

/// The whole broker configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Serve plain HTTP without TLS. Only for local demos and tests: tokens and tickets then
    /// cross the network in clear.
    #[serde(default)]
    pub listen_plain: bool,
    /// TLS certificate chain and key (PEM). Required unless `listen_plain`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Directory for the signing key and the SQLite database; created if missing.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The store backend.
    #[serde(default)]
    pub store: StoreKind,
    /// Bearer token of the admin API. Without it the admin API (and explain) answers 403.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Enrollment tokens.
    #[serde(default)]
    pub enroll_tokens: Vec<TokenConfig>,
    /// Relays registered by the operator.
    #[serde(default)]
    pub relays: Vec<RelayConfig>,
    /// When agents report.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// What tickets allow.
    #[serde(default)]
    pub tickets: TicketConfig,
    /// Limits on what strangers can make the broker do.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Extra ticket public keys (64 hex digits) published at `/v1/keys` beside the broker's own,
    /// for key rotation.
    #[serde(default)]
    pub extra_ticket_keys: Vec<String>,
    /// The selection policy (used until an operator stores another one through the admin API).
    #[serde(default)]
    pub policy: Policy,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("steelyard-broker-data")
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            listen_plain: false,
            tls: None,
            data_dir: default_data_dir(),
            store: StoreKind::Memory,
            admin_token: None,
            enroll_tokens: Vec::new(),
            relays: Vec::new(),
            schedule: ScheduleConfig::default(),
            tickets: TicketConfig::default(),
            limits: LimitsConfig::default(),
            extra_ticket_keys: Vec::new(),
            policy: Policy::default(),
        }
    }
}

/// TLS files.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// An enrollment token.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A name for logs and records (the secret is never stored).
    pub name: String,
    /// The secret, at least 16 characters.
    pub token: String,
    /// Who may enroll with it.
    #[serde(default = "agent_role")]
    pub role: Role,
}

fn agent_role() -> Role {
    Role::Agent
}

/// A location in the config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationConfig {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Region.
    #[serde(default)]
    pub region: String,
}

/// A relay the operator registers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Its id.
    pub id: String,
    /// Its Ed25519 public key, 64 hex digits; it must prove it holds the secret.
    pub public_key: String,
    /// TCP address peers use.
    #[serde(default)]
    pub tcp_addr: Option<String>,
    /// UDP (and probe) address peers use.
    #[serde(default)]
    pub udp_addr: Option<String>,
    /// Where it is.
    #[serde(default)]
    pub location: Option<LocationConfig>,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// Most bandwidth, kbit/s; 0 = not limited.
    #[serde(default)]
    pub max_bandwidth_kbps: u64,
    /// Tier (0 first).
    #[serde(default)]
    pub tier: u8,
    /// Operator weight, > 0.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// The report schedule given to agents.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Report interval, milliseconds.
    pub interval_ms: u64,
    /// Random extra delay, milliseconds.
    pub jitter_ms: u64,
    /// Report early when a path's RTT changes by more than this share.
    pub rtt_change_ratio: f64,
    /// A report older than this is stale: the broker asks for a fresh one (at most once per
    /// interval) when it sweeps or when a connect needs the peer.
    pub stale_after_ms: u64,
    /// Relays send a load report this often, milliseconds.
    pub relay_load_interval_ms: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            interval_ms: 30_000,
            jitter_ms: 5_000,
            rtt_change_ratio: 0.5,
            stale_after_ms: 75_000,
            relay_load_interval_ms: 1_000,
        }
    }
}

/// Ticket contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketConfig {
    /// Lifetime of a ticket, seconds.
    pub lifetime_secs: u64,
    /// Bytes per second per side; 0 = unlimited.
    pub max_bytes_per_sec: u64,
    /// Total bytes per side; 0 = unlimited.
    pub max_total_bytes: u64,
    /// Relay idle timeout, seconds; 0 = the relay's default.
    pub idle_timeout_secs: u32,
}

impl Default for TicketConfig {
    fn default() -> Self {
        Self {
            lifetime_secs: 60,
            max_bytes_per_sec: 0,
            max_total_bytes: 0,
            idle_timeout_secs: 0,
        }
    }
}

/// Limits on what a stranger can push.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest message accepted, bytes.
    pub max_message_bytes: usize,
    /// Sustained messages per second per connection.
    pub messages_per_sec: u32,
    /// Burst of messages above the rate.
    pub message_burst: u32,
    /// Connect requests of one peer waiting for the other side's answer.
    pub max_pending_connects: u32,
    /// Unauthenticated WebSocket connections per IP address.
    pub max_unauthenticated_per_ip: u32,
    /// Open WebSockets in total (agents, relays and not yet authenticated); upgrades beyond
    /// it are refused with HTTP 503.
    pub max_connections: usize,
    /// Seconds a new WebSocket has to authenticate.
    pub auth_timeout_secs: u64,
    /// Milliseconds the acceptor has to answer an offer.
    pub offer_timeout_ms: u64,
    /// Messages queued for one connection before it counts as too slow and is closed.
    pub send_queue: usize,
    /// Sessions remembered in memory (the store keeps the history).
    pub max_live_sessions: usize,
    /// Live sessions are forgotten from memory after this many seconds.
    pub session_memory_secs: u64,
    /// Session history older than this many days is pruned from the store (0 = keep).
    pub history_days: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            messages_per_sec: 100,
            message_burst: 200,
            max_pending_connects: 16,
            max_unauthenticated_per_ip: 64,
            max_connections: 65_536,
            auth_timeout_secs: 10,
            offer_timeout_ms: 15_000,
            send_queue: 1024,
            max_live_sessions: 1_000_000,
            session_memory_secs: 3_600,
            history_days: 30,
        }
    }
}

impl BrokerConfig {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.listen_plain && self.tls.is_none() {
            return bad(
                "set [tls] cert and key, or listen_plain = true (plain HTTP, for local demos only)"
                    .into(),
            );
        }
        if let Some(token) = &self.admin_token {
            if token.len() < 16 {
                return bad("admin_token must be at least 16 characters".into());
            }
        }
        for t in &self.enroll_tokens {
            if t.token.len() < 16 {
                return bad(format!(
                    "enroll token {:?} must be at least 16 characters",
                    t.name
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.relays {
            if !steelyard_proto::ticket::is_valid_id(&r.id) {
                return bad(format!(
                    "relay id {:?} must be 1 to 64 bytes of [A-Za-z0-9._-]",
                    r.id
                ));
            }
            if !seen.insert(&r.id) {
                return bad(format!("relay {} is listed twice", r.id));
            }
            steelyard_proto::api::parse_public_key(&r.public_key)
                .map_err(|e| ConfigError::Invalid(format!("relay {}: {}", r.id, e.message)))?;
            if !(r.weight.is_finite() && r.weight > 0.0) {
                return bad(format!("relay {}: weight must be > 0", r.id));
            }
        }
        for k in &self.extra_ticket_keys {
            steelyard_proto::api::parse_public_key(k)
                .map_err(|e| ConfigError::Invalid(format!("extra_ticket_keys: {}", e.message)))?;
        }
        let l = &self.limits;
        if l.max_message_bytes < 1024 || l.max_message_bytes > 16 << 20 {
            return bad("limits.max_message_bytes must be in 1024..=16777216".into());
        }
        if l.messages_per_sec == 0 || l.max_unauthenticated_per_ip == 0 || l.max_connections == 0 {
            return bad(
                "limits.messages_per_sec, max_unauthenticated_per_ip and max_connections must be > 0"
                    .into(),
            );
        }
        if l.send_queue < 64 {
            return bad(
                "limits.send_queue must be at least 64 (the relay map is queued at once)".into(),
            );
        }
        if self.schedule.interval_ms < 100 {
            return bad("schedule.interval_ms must be at least 100".into());
        }
        if self.tickets.lifetime_secs == 0 {
            return bad("tickets.lifetime_secs must be > 0".into());
        }
        self.policy
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_missing_tls_are_errors() {
        let p = Path::new("t.toml");
        let e = BrokerConfig::parse("listen_plain = true\nnope = 1\n", p).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = BrokerConfig::parse("", p).unwrap_err();
        assert!(e.to_string().contains("listen_plain"), "{e}");
        let e = BrokerConfig::parse("listen_plain = true\n[policy]\nbogus = 2\n", p).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c =
            BrokerConfig::parse("listen_plain = true\n[policy.weights]\nload = 5.0\n", p).unwrap();
        assert_eq!(c.policy.weights.load, 5.0);
    }

    #[test]
    fn short_tokens_are_refused() {
        let e = BrokerConfig::parse(
            "listen_plain = true\n[[enroll_tokens]]\nname = \"x\"\ntoken = \"short\"\n",
            Path::new("t"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
    }
}
