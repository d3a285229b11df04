//! The agent's TOML configuration (`steelyard agent --config agent.toml`).
//!
//! ```toml
//! broker = "wss://broker.example.net:7443"   # or ws://… for a plain-HTTP broker
//! ca_file = "/etc/steelyard/ca.pem"          # optional: trust this CA for wss
//! enroll_token = "…"                         # needed on first contact only
//! peer_id = "laptop"
//! key_file = "/var/lib/steelyard/agent.key"  # created (0600) on first start
//! control = "127.0.0.1:7450"                 # where `steelyard connect` reaches this agent
//! allow_remote_forwards = false              # forwards may listen beyond loopback (default no)
//!
//! [location]                                 # optional
//! lat = 48.1
//! lon = 11.6
//! region = "eu-central"
//!
//! [services]                                 # what peers may reach through this agent
//! http = "127.0.0.1:8080"
//! dns = "udp:127.0.0.1:53"                   # a UDP service (datagrams in the tunnel)
//!
//! [[forwards]]                               # optional: listeners the agent always runs
//! listen = "127.0.0.1:2222"                  # (like `steelyard connect office-pc ssh --listen …`)
//! peer = "office-pc"
//! service = "ssh"
//!
//! [offers]                                   # which peers may connect; default: everyone
//! allow = ["office-pc"]
//!
//! [resume]                                   # live tunnels moving to another relay; defaults:
//! max_replay_kib = 1024                      # unacknowledged bytes kept per tunnel direction
//! max_resumes = 8                            # relay failures one tunnel survives
//! timeout_ms = 10000                         # time to find a new relay before giving up
//! keepalive_ms = 1000                        # an idle tunnel sends a keepalive this often
//! dead_after_ms = 4000                       # a tunnel silent this long has failed: resume
//! relay_connect_ms = 1000                    # a relay must accept and answer within this
//! handshake_ms = 5000                        # the peer's Noise handshake within this
//! ```
//!
//! Unknown keys are errors. What this module does not do: read flags or the environment
//! (the binary applies those on top).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use steelyard_proto::api::GeoLocation;

/// Default control endpoint.
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7450";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("agent config {path}: {source}; check the path")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("agent config {path} is not valid: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value is out of range.
    #[error("agent config: {0}")]
    Invalid(String),
}

/// Which offers the agent accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferPolicy {
    /// Peers allowed to connect; empty (the default) accepts every peer the broker vouches for.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// How live tunnels move to another relay when theirs fails (see `crate::resume`). Both
/// agents of a tunnel use their own settings; the replay buffer is the memory bound: each
/// tunnel holds at most `max_replay_kib` KiB per direction at each end.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResumeSettings {
    /// Most unacknowledged bytes kept for retransmission, KiB, 16..=65536. It also bounds the
    /// bytes in flight per tunnel direction (throughput ≤ this per round trip).
    pub max_replay_kib: usize,
    /// Most relay failures one tunnel survives, 0..=1000; 0 closes a tunnel when its relay
    /// fails.
    pub max_resumes: u32,
    /// How long to keep trying to resume after a failure, ms, 100..=600000; then the tunnel
    /// closes with an error.
    pub timeout_ms: u64,
    /// A tunnel that sent no frame for this long sends a keepalive, ms, 50..=`dead_after_ms/2`.
    pub keepalive_ms: u64,
    /// A tunnel that received no frame for this long has failed (its relay or path went
    /// silent) and resumes elsewhere, ms, up to 3600000.
    pub dead_after_ms: u64,
    /// A relay must accept the TCP connection and answer the ticket within this, ms,
    /// 100..=60000; otherwise the agent moves on to another relay.
    pub relay_connect_ms: u64,
    /// The peer's Noise handshake through the relay must finish within this, ms, 100..=60000.
    pub handshake_ms: u64,
}

impl Default for ResumeSettings {
    fn default() -> Self {
        Self {
            max_replay_kib: 1024,
            max_resumes: 8,
            timeout_ms: 10_000,
            keepalive_ms: 1000,
            dead_after_ms: 4000,
            relay_connect_ms: 1000,
            handshake_ms: 5000,
        }
    }
}

/// Where a service listens: `"127.0.0.1:8080"` or `"tcp:127.0.0.1:8080"` for TCP,
/// `"udp:127.0.0.1:53"` for UDP (its datagrams travel as records in the tunnel, see
/// `crate::datagram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The address.
    pub addr: SocketAddr,
    /// Whether the service speaks UDP.
    pub udp: bool,
}

impl std::str::FromStr for ServiceAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (udp, rest) = match s.split_once(':') {
            Some(("udp", rest)) => (true, rest),
            Some(("tcp", rest)) => (false, rest),
            _ => (false, s),
        };
        let addr = rest.parse().map_err(|e| {
            format!("service address {s:?}: {e} (write HOST:PORT, tcp:HOST:PORT or udp:HOST:PORT)")
        })?;
        Ok(Self { addr, udp })
    }
}

impl<'de> Deserialize<'de> for ServiceAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Most `[[forwards]]` in a config.
pub const MAX_STATIC_FORWARDS: usize = 64;

/// A forward from the config: the agent listens on `listen` (TCP) and tunnels every accepted
/// connection to `service` on `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticForward {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The peer to reach.
    pub peer: String,
    /// The service on that peer.
    pub service: String,
}

/// The agent's whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The broker's base URL: `ws://host:port` or `wss://host:port` (`http`/`https` also work).
    pub broker: String,
    /// A PEM file of CA certificates to trust for `wss` (instead of none: there is no built-in
    /// root store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Enrollment token, needed the first time this peer connects.
    #[serde(default)]
    pub enroll_token: Option<String>,
    /// This peer's name.
    pub peer_id: String,
    /// The identity key file; created with mode 0600 when missing.
    pub key_file: PathBuf,
    /// Where the agent is.
    #[serde(default)]
    pub location: Option<GeoLocation>,
    /// Loopback address of the control endpoint for `steelyard connect`.
    #[serde(default = "default_control")]
    pub control: SocketAddr,
    /// Whether forwards (`steelyard connect --listen`, `[[forwards]]`) may listen on addresses
    /// other than loopback, where other machines could use the tunnels as this peer.
    #[serde(default)]
    pub allow_remote_forwards: bool,
    /// Forwards the agent runs for as long as it runs (at most `MAX_STATIC_FORWARDS`).
    #[serde(default)]
    pub forwards: Vec<StaticForward>,
    /// Service name → local address, reachable by peers through tunnels.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceAddr>,
    /// Which offers to accept.
    #[serde(default)]
    pub offers: OfferPolicy,
    /// Resuming live tunnels on another relay.
    #[serde(default)]
    pub resume: ResumeSettings,
}

fn default_control() -> SocketAddr {
    // A constant that parses.
    DEFAULT_CONTROL
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7450)))
}

impl AgentConfig {
    /// Parses `text` (named `origin` in errors) and validates it.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use steelyard_proto::ticket::is_valid_id;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !is_valid_id(&self.peer_id) {
            return bad(format!(
                "peer_id {:?} must be 1 to 64 bytes of [A-Za-z0-9._-]",
                self.peer_id
            ));
        }
        if broker_ws_url(&self.broker).is_none() {
            return bad(format!(
                "broker {:?} must start with ws://, wss://, http:// or https://",
                self.broker
            ));
        }
        if !self.control.ip().is_loopback() {
            return bad(format!(
                "control {} must be a loopback address: anyone who reaches it can open tunnels as this peer",
                self.control
            ));
        }
        if self.forwards.len() > MAX_STATIC_FORWARDS {
            return bad(format!(
                "{} [[forwards]]; at most {MAX_STATIC_FORWARDS}",
                self.forwards.len()
            ));
        }
        for f in &self.forwards {
            if !is_valid_id(&f.peer) || !is_valid_id(&f.service) {
                return bad(format!(
                    "forwards: peer {:?} and service {:?} must be 1 to 64 bytes of [A-Za-z0-9._-]",
                    f.peer, f.service
                ));
            }
            if !f.listen.ip().is_loopback() && !self.allow_remote_forwards {
                return bad(format!(
                    "forwards: listen {} is not a loopback address: anyone who reaches it could \
                     use the tunnel as this peer; listen on 127.0.0.1 or ::1, or set \
                     `allow_remote_forwards = true`",
                    f.listen
                ));
            }
        }
        for name in self.services.keys() {
            if !is_valid_id(name) {
                return bad(format!(
                    "service name {name:?} must be 1 to 64 bytes of [A-Za-z0-9._-]"
                ));
            }
        }
        let r = &self.resume;
        if !(16..=65536).contains(&r.max_replay_kib) {
            return bad(format!(
                "resume.max_replay_kib = {} must be 16..=65536",
                r.max_replay_kib
            ));
        }
        if r.max_resumes > 1000 {
            return bad(format!(
                "resume.max_resumes = {} must be 0..=1000",
                r.max_resumes
            ));
        }
        if !(100..=600_000).contains(&r.timeout_ms) {
            return bad(format!(
                "resume.timeout_ms = {} must be 100..=600000",
                r.timeout_ms
            ));
        }
        if r.keepalive_ms < 50
            || r.keepalive_ms > r.dead_after_ms / 2
            || r.dead_after_ms > 3_600_000
        {
            return bad(format!(
                "resume.keepalive_ms = {} and resume.dead_after_ms = {} must satisfy \
                 50 <= keepalive_ms <= dead_after_ms/2 and dead_after_ms <= 3600000",
                r.keepalive_ms, r.dead_after_ms
            ));
        }
        for (key, v) in [
            ("relay_connect_ms", r.relay_connect_ms),
            ("handshake_ms", r.handshake_ms),
        ] {
            if !(100..=60_000).contains(&v) {
                return bad(format!("resume.{key} = {v} must be 100..=60000"));
            }
        }
        for p in &self.offers.allow {
            if !is_valid_id(p) {
                return bad(format!("offers.allow: {p:?} is not a peer id"));
            }
        }
        Ok(())
    }
}

/// The agent WebSocket URL for broker base URL `base`, or `None` for an unknown scheme.
pub fn broker_ws_url(base: &str) -> Option<String> {
    let base = base.trim_end_matches('/');
    let (scheme, rest) = base.split_once("://")?;
    let scheme = match scheme {
        "ws" | "http" => "ws",
        "wss" | "https" => "wss",
        _ => return None,
    };
    if rest.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{rest}/v1/agent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
broker = "ws://127.0.0.1:7400"
peer_id = "b"
key_file = "/tmp/b.key"
[services]
http = "127.0.0.1:8080"
[offers]
allow = ["a"]
"#;

    #[test]
    fn parses_and_rejects() {
        let c = AgentConfig::parse(GOOD, "t").unwrap();
        assert_eq!(c.control.to_string(), DEFAULT_CONTROL);
        assert_eq!(c.services["http"].addr.port(), 8080);
        assert!(!c.services["http"].udp);
        let u = AgentConfig::parse(
            &GOOD.replace("\"127.0.0.1:8080\"", "\"udp:127.0.0.1:53\""),
            "t",
        )
        .unwrap();
        assert_eq!(
            (u.services["http"].addr.port(), u.services["http"].udp),
            (53, true)
        );
        let e = AgentConfig::parse(
            &GOOD.replace("\"127.0.0.1:8080\"", "\"sctp:1.2.3.4:5\""),
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("udp:HOST:PORT"), "{e}");
        assert!(AgentConfig::parse(&format!("{GOOD}\nnope = 1"), "t").is_err());
        let e = AgentConfig::parse(&GOOD.replace("ws://", "ftp://"), "t").unwrap_err();
        assert!(e.to_string().contains("must start with"), "{e}");
        let e = AgentConfig::parse(&format!("control = \"0.0.0.0:1\"\n{GOOD}"), "t").unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert_eq!(c.resume, ResumeSettings::default());
        let r = AgentConfig::parse(&format!("{GOOD}\n[resume]\nmax_resumes = 2\n"), "t").unwrap();
        assert_eq!((r.resume.max_resumes, r.resume.timeout_ms), (2, 10_000));
        let e = AgentConfig::parse(&format!("{GOOD}\n[resume]\nmax_replay_kib = 1\n"), "t")
            .unwrap_err();
        assert!(e.to_string().contains("max_replay_kib = 1 must be"), "{e}");
        let e = AgentConfig::parse(&format!("{GOOD}\n[resume]\nkeepalive_ms = 3000\n"), "t")
            .unwrap_err();
        assert!(e.to_string().contains("keepalive_ms = 3000"), "{e}");
        let e = AgentConfig::parse(&format!("{GOOD}\n[resume]\nrelay_connect_ms = 5\n"), "t")
            .unwrap_err();
        assert!(
            e.to_string().contains("relay_connect_ms = 5 must be"),
            "{e}"
        );
        let f = AgentConfig::parse(
            &format!("{GOOD}\n[[forwards]]\nlisten = \"127.0.0.1:2222\"\npeer = \"a\"\nservice = \"ssh\"\n"),
            "t",
        )
        .unwrap();
        assert_eq!(f.forwards[0].listen.port(), 2222);
        let remote = format!(
            "{GOOD}\n[[forwards]]\nlisten = \"0.0.0.0:2222\"\npeer = \"a\"\nservice = \"ssh\"\n"
        );
        let e = AgentConfig::parse(&remote, "t").unwrap_err();
        assert!(e.to_string().contains("not a loopback address"), "{e}");
        let r =
            AgentConfig::parse(&format!("allow_remote_forwards = true\n{remote}"), "t").unwrap();
        assert!(r.allow_remote_forwards);
        assert_eq!(
            broker_ws_url("https://b.example:7443/").as_deref(),
            Some("wss://b.example:7443/v1/agent")
        );
    }
}
