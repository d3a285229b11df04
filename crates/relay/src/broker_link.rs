//! The relay's link to the broker: one WebSocket to the broker's `/v1/relay` (ws:// or wss://),
//! authenticated with the relay's Ed25519 identity, over which the relay streams its load.
//!
//! What it does:
//! * loads the identity seed from `[broker] identity_key_file`, creating it (mode 0600) on
//!   first start ([`load_or_create_identity`]); a file readable by group or others is refused;
//! * connects, sends the hello (id, public key, enrollment token if configured, advertised
//!   addresses, location, capacity), signs the challenge and waits for the welcome;
//! * sends a [`LoadReport`] built from [`Metrics::status`] every `load_interval_ms` of the
//!   welcome (or `report_interval_ms` of the config when the welcome says 0), and at once when
//!   the relay starts draining; a last report (draining) when the relay stops
//!   ([`BrokerLinkHandle::shutdown`]);
//! * reconnects by itself after any failure, with exponential backoff and jitter, bounded by
//!   [`BACKOFF_MAX`] ([`backoff_delay`]); the backoff resets once a welcomed connection has
//!   lasted [`STABLE_AFTER`].
//!
//! * hands the welcome's `ticket_keys` to the relay's [`TrustedKeys`]: without `broker_keys` in
//!   the config they become the keys tickets verify against (replaced on every welcome, kept
//!   when the link drops); with `broker_keys` the set is pinned and a key the relay does not
//!   trust is logged as a warning naming the key to add.
//!
//! It never stops the relay: a broker that is down or refuses the relay only means reports
//! are not delivered (and, without pinned keys, that tickets get `not_ready` until the first
//! welcome), and the relay keeps serving tickets it can verify. Announced keys are as
//! trustworthy as the link: use `wss://` (the broker's certificate is checked) off loopback.
//!
//! The enrollment token, when configured, is sent in every hello: the broker ignores it for a
//! relay it already knows with the same key, and a broker restarted with an in-memory store
//! needs it again.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use steelyard_proto::api::{
    self, ApiError, BrokerMessage, GeoLocation, LoadReport, RelayCapacity, RelayHello,
    RelayMessage, RelayWelcome, Role, API_VERSION, MAX_MESSAGE_BYTES,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

use crate::config::{BrokerLinkConfig, RelayConfig};
use crate::keys::TrustedKeys;
use crate::metrics::{cpus, Metrics};
use crate::server::{BoundAddrs, RelayHandle};

/// First reconnect delay (before jitter).
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time allowed to connect and complete hello → challenge → auth → welcome.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long after its welcome resets the backoff; a broker that
/// welcomes and then drops the relay at once (say, two relays with one identity replacing
/// each other) keeps backing off.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// How often the link checks whether the relay started draining.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Why the link could not start, or why one connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The relay config has no `[broker]` section.
    #[error("no broker configured: set [broker] url (or --broker-url)")]
    NotConfigured,
    /// The identity key file could not be read or created.
    #[error("relay identity key {path}: {reason}")]
    Identity {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("broker CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The broker URL cannot be used.
    #[error("broker url {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Connecting or talking to the broker failed.
    #[error("broker connection: {0}")]
    Io(#[from] std::io::Error),
    /// The WebSocket failed.
    #[error("broker WebSocket: {0}")]
    WebSocket(Box<tokio_tungstenite::tungstenite::Error>),
    /// The broker refused the relay or one of its messages.
    #[error("broker refused: {0}")]
    Refused(#[from] ApiError),
    /// The broker sent something this relay does not understand here.
    #[error("broker protocol: {0}")]
    Protocol(String),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// No welcome within [`HANDSHAKE_TIMEOUT`].
    #[error("no welcome from the broker within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
}

impl From<tokio_tungstenite::tungstenite::Error> for LinkError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        LinkError::WebSocket(Box::new(e))
    }
}

/// The reconnect delay after `failures` consecutive failures (0 = the first retry), with
/// `jitter` in `0.0..=1.0`: half of `min(BACKOFF_MAX, BACKOFF_BASE · 2^failures)` plus up to
/// the other half by `jitter`. Never zero, never more than [`BACKOFF_MAX`].
pub fn backoff_delay(failures: u32, jitter: f64) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let half = cap / 2;
    half + half.mul_f64(jitter.clamp(0.0, 1.0))
}

fn random_unit() -> f64 {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// Reads the identity seed (64 hex digits) from `path`, or creates the file with a new random
/// seed and mode 0600 when it does not exist.
pub fn load_or_create_identity(path: &Path) -> Result<SigningKey, LinkError> {
    let err = |reason: String| LinkError::Identity {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(err(format!(
                    "mode {:o} lets others read the relay's secret key; run chmod 600 on it",
                    meta.permissions().mode() & 0o777
                )));
            }
            let seed: [u8; 32] = steelyard_proto::hex::decode(text.trim()).map_err(|e| {
                err(format!(
                    "not 64 hex digits ({e}); restore it, or delete it to create a new identity \
                     (the broker must then forget this relay's old key)"
                ))
            })?;
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::getrandom(&mut seed).map_err(|e| err(format!("no randomness: {e}")))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("cannot create: {e}")))?;
            use std::io::Write;
            writeln!(file, "{}", steelyard_proto::hex::encode(&seed))
                .and_then(|()| file.sync_all())
                .map_err(|e| err(format!("cannot write: {e}")))?;
            info!(path = %path.display(), "created a new relay identity key");
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn tls_connector(cfg: &BrokerLinkConfig) -> Result<tokio_rustls::TlsConnector, LinkError> {
    let mut roots = rustls::RootCertStore::empty();
    let files: Vec<std::path::PathBuf> = match &cfg.ca_cert {
        Some(p) => vec![p.clone()],
        None => [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .iter()
        .map(std::path::PathBuf::from)
        .filter(|p| p.exists())
        .take(1)
        .collect(),
    };
    for path in &files {
        let ca_err = |reason: String| LinkError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| ca_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ca_err(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ca_err("holds no usable PEM certificate".into()));
        }
    }
    if roots.is_empty() {
        return Err(LinkError::Tls(
            "no CA certificates: set [broker] ca_cert (--broker-ca) to the broker's CA".into(),
        ));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| LinkError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Host and port of a ws:// or wss:// URL.
fn host_port(url: &str) -> Result<(String, u16, bool), LinkError> {
    let bad = |reason: &str| LinkError::Url {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let req = url.into_client_request().map_err(|e| bad(&e.to_string()))?;
    let uri = req.uri();
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => return Err(bad("scheme must be ws or wss")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((host, port, tls))
}

/// A running link; [`shutdown`](Self::shutdown) sends a last report and closes it.
pub struct BrokerLinkHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BrokerLinkHandle {
    /// Asks the link to send a final report (with `draining` as the relay's metrics say) and
    /// close the WebSocket; waits at most `within`.
    pub async fn shutdown(self, within: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// The link's settings and state, shared by its connections.
pub struct BrokerLink {
    link: BrokerLinkConfig,
    relay: RelayConfig,
    key: SigningKey,
    metrics: Arc<Metrics>,
    keys: TrustedKeys,
    addrs: BoundAddrs,
    tls: Option<tokio_rustls::TlsConnector>,
    host: String,
    port: u16,
}

/// How one connection ended without error.
enum Ended {
    /// Shutdown was asked for.
    Stopped,
}

impl BrokerLink {
    /// Prepares a link for `relay` (whose `[broker]` section must be set) running as
    /// `handle`: loads or creates the identity key and the TLS settings. Fails on what a retry
    /// cannot fix.
    pub fn new(
        relay: &RelayConfig,
        handle: &RelayHandle,
        addrs: BoundAddrs,
    ) -> Result<Self, LinkError> {
        let link = relay.broker.clone().ok_or(LinkError::NotConfigured)?;
        let (host, port, tls) = host_port(link.url.trim())?;
        let tls = if tls {
            Some(tls_connector(&link)?)
        } else {
            None
        };
        let key = load_or_create_identity(&link.identity_key_file)?;
        Ok(Self {
            link,
            relay: relay.clone(),
            key,
            metrics: handle.metrics().clone(),
            keys: handle.keys().clone(),
            addrs,
            tls,
            host,
            port,
        })
    }

    /// The relay's identity public key, 64 hex digits (what the broker records).
    pub fn public_key_hex(&self) -> String {
        api::public_key_hex(&self.key.verifying_key())
    }

    /// Starts the link task. Must be called inside a tokio runtime.
    pub fn spawn(self) -> BrokerLinkHandle {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(self.run(stop_rx));
        BrokerLinkHandle { stop, task }
    }

    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let mut welcomed = None;
            match self.connect_once(&mut stop, &mut welcomed).await {
                Ok(Ended::Stopped) => return,
                Err(e) => warn!(url = %self.link.url, "broker link: {e}"),
            }
            if welcomed.is_some_and(|t: tokio::time::Instant| t.elapsed() >= STABLE_AFTER) {
                failures = 0;
            }
            if *stop.borrow() {
                return;
            }
            let delay = backoff_delay(failures, random_unit());
            failures = failures.saturating_add(1);
            info!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting to the broker"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => return,
            }
        }
    }

    async fn connect_once(
        &self,
        stop: &mut watch::Receiver<bool>,
        welcomed: &mut Option<tokio::time::Instant>,
    ) -> Result<Ended, LinkError> {
        let tcp = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| LinkError::Timeout)??;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => self.session(tcp, stop, welcomed).await,
            Some(connector) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| LinkError::Tls(format!("server name {}: {e}", self.host)))?;
                let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| LinkError::Timeout)??;
                self.session(tls, stop, welcomed).await
            }
        }
    }

    fn hello(&self) -> RelayHello {
        let advertise = |configured: &Option<String>, bound: Option<std::net::SocketAddr>| {
            configured.clone().or_else(|| {
                bound
                    .filter(|a| !a.ip().is_unspecified())
                    .map(|a| a.to_string())
            })
        };
        let loc = &self.relay.location;
        RelayHello {
            version: API_VERSION,
            relay_id: self.relay.relay_id.clone(),
            public_key: self.public_key_hex(),
            enroll_token: self.link.enroll_token.clone(),
            tcp_addr: advertise(&self.link.advertise_tcp, Some(self.addrs.tcp)),
            udp_addr: advertise(&self.link.advertise_udp, self.addrs.udp),
            location: match (loc.lat, loc.lon) {
                (Some(lat), Some(lon)) => Some(GeoLocation {
                    lat,
                    lon,
                    region: loc.region.clone().unwrap_or_default(),
                }),
                _ => None,
            },
            capacity: Some(self.capacity()),
        }
    }

    fn capacity(&self) -> RelayCapacity {
        RelayCapacity {
            max_sessions: self.relay.capacity.max_sessions,
            max_bandwidth_kbps: self
                .relay
                .capacity
                .max_bandwidth_bytes_per_sec
                .saturating_mul(8)
                / 1000,
        }
    }

    /// The current load, from the relay's own status report.
    pub fn load_report(&self) -> LoadReport {
        load_report(&self.metrics, &self.relay)
    }

    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        stop: &mut watch::Receiver<bool>,
        welcomed: &mut Option<tokio::time::Instant>,
    ) -> Result<Ended, LinkError> {
        let (mut ws, _) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::client_async(self.link.url.trim(), stream),
        )
        .await
        .map_err(|_| LinkError::Timeout)??;
        let welcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut ws))
            .await
            .map_err(|_| LinkError::Timeout)??;
        *welcomed = Some(tokio::time::Instant::now());
        let interval_ms = match welcome.load_interval_ms {
            0 => self.link.report_interval_ms,
            ms => ms.clamp(100, 3_600_000),
        };
        info!(
            relay_id = %welcome.relay_id,
            enrolled = welcome.enrolled,
            interval_ms,
            "connected to the broker"
        );
        self.take_ticket_keys(&welcome);

        let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_poll = tokio::time::interval(DRAIN_POLL);
        let mut reported_draining = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let load = self.load_report();
                    reported_draining = load.draining;
                    send(&mut ws, &RelayMessage::Load(load)).await?;
                }
                _ = drain_poll.tick() => {
                    if !reported_draining && self.metrics.draining.load(Relaxed) {
                        info!("draining: telling the broker now");
                        let load = self.load_report();
                        reported_draining = true;
                        send(&mut ws, &RelayMessage::Load(load)).await?;
                    }
                }
                () = stopped(stop) => {
                    send(&mut ws, &RelayMessage::Load(self.load_report())).await?;
                    let _ = ws.close(None).await;
                    return Ok(Ended::Stopped);
                }
                msg = ws.next() => match msg {
                    None | Some(Ok(Message::Close(_))) => return Err(LinkError::Closed),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Text(t))) => match api::decode_broker(&t, MAX_MESSAGE_BYTES) {
                        Ok(BrokerMessage::Error(e)) => {
                            if e.code == api::ErrorCode::Replaced {
                                return Err(e.into());
                            }
                            warn!("broker: {e}");
                        }
                        Ok(other) => debug!(?other, "broker message ignored"),
                        Err(e) => warn!("broker sent an invalid message: {e}"),
                    },
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        ws: &mut WebSocketStream<S>,
    ) -> Result<RelayWelcome, LinkError> {
        send(ws, &RelayMessage::Hello(self.hello())).await?;
        let nonce = match recv(ws).await? {
            BrokerMessage::Challenge(c) => c.nonce,
            BrokerMessage::Error(e) => return Err(e.into()),
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected a challenge, got {other:?}"
                )))
            }
        };
        let proof = api::sign_auth(&self.key, Role::Relay, &self.relay.relay_id, &nonce)?;
        send(ws, &RelayMessage::Auth(proof)).await?;
        match recv(ws).await? {
            BrokerMessage::RelayWelcome(w) => Ok(w),
            BrokerMessage::Error(e) => Err(e.into()),
            other => Err(LinkError::Protocol(format!(
                "expected a relay welcome, got {other:?}"
            ))),
        }
    }

    /// Trusts the welcome's ticket keys, or (pinned keys) warns about any not trusted.
    fn take_ticket_keys(&self, welcome: &RelayWelcome) {
        let mut announced = Vec::new();
        for info in &welcome.ticket_keys {
            match api::parse_public_key(&info.public_key) {
                Ok(k) => announced.push(k),
                Err(e) => warn!("the broker announced an invalid ticket key: {e}"),
            }
        }
        if !self.keys.is_pinned() {
            if announced.is_empty() {
                warn!(
                    "the broker announced no ticket keys: every ticket will be refused as forged"
                );
            }
            info!(keys = announced.len(), "trusting the broker's ticket keys");
            self.keys.announce(announced);
            return;
        }
        for k in announced.iter().filter(|k| !self.keys.trusts(k)) {
            warn!(
                key = %api::public_key_hex(k),
                "the broker signs tickets with a key this relay does not trust; add it to \
                 broker_keys (--broker-key) and restart, or remove broker_keys to trust the \
                 broker's keys; until then its tickets are refused as forged"
            );
        }
    }
}

/// The load report for `metrics` against `cfg`'s capacity: sessions and pending sides,
/// bandwidth received and sent (every relayed byte is both), CPU as a share of all cores,
/// draining.
pub fn load_report(metrics: &Metrics, cfg: &RelayConfig) -> LoadReport {
    let s = metrics.status(cfg);
    let kbps = |bytes_per_sec: f64| (bytes_per_sec.max(0.0) * 8.0 / 1000.0).round() as u64;
    let through = kbps(s.sample.bytes_per_sec_a_to_b + s.sample.bytes_per_sec_b_to_a);
    LoadReport {
        sessions: u32::try_from(s.active_sessions).unwrap_or(u32::MAX),
        pending: u32::try_from(s.pending_sessions).unwrap_or(u32::MAX),
        bandwidth_in_kbps: through,
        bandwidth_out_kbps: through,
        cpu: (s.sample.cpu_cores / cpus().max(1) as f64).clamp(0.0, 1.0),
        capacity: None,
        draining: s.draining,
    }
}

/// Resolves once a stop was asked for (never if the handle is gone without asking).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    message: &RelayMessage,
) -> Result<(), LinkError> {
    ws.send(Message::Text(api::encode(message).into())).await?;
    Ok(())
}

async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> Result<BrokerMessage, LinkError> {
    loop {
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(LinkError::Closed),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Message::Text(t))) => {
                return api::decode_broker(&t, MAX_MESSAGE_BYTES)
                    .map_err(|e| LinkError::Protocol(e.to_string()))
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_jittered_and_bounded() {
        // Without jitter: half the cap; with full jitter: the cap.
        assert_eq!(backoff_delay(0, 0.0), Duration::from_millis(125));
        assert_eq!(backoff_delay(0, 1.0), Duration::from_millis(250));
        assert_eq!(backoff_delay(1, 1.0), Duration::from_millis(500));
        assert_eq!(backoff_delay(2, 0.0), Duration::from_millis(500));
        assert_eq!(backoff_delay(3, 0.5), Duration::from_millis(1500));
        let mut prev = Duration::ZERO;
        for n in 0..40 {
            let lo = backoff_delay(n, 0.0);
            let hi = backoff_delay(n, 1.0);
            assert!(
                lo > Duration::ZERO && lo >= prev && hi <= BACKOFF_MAX,
                "{n}"
            );
            assert!(hi >= lo && hi <= lo * 2, "{n}");
            prev = lo;
        }
        assert_eq!(backoff_delay(7, 1.0), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX, 1.0), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX, 0.0), BACKOFF_MAX / 2);
        // Out-of-range jitter is clamped.
        assert_eq!(backoff_delay(0, 7.0), backoff_delay(0, 1.0));
        assert_eq!(backoff_delay(0, -1.0), backoff_delay(0, 0.0));
        for _ in 0..100 {
            let d = backoff_delay(4, random_unit());
            assert!(d >= backoff_delay(4, 0.0) && d <= backoff_delay(4, 1.0));
        }
    }

    #[test]
    fn identity_is_created_0600_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("steelyard-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("id.key");
        let k1 = load_or_create_identity(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create_identity(&path).unwrap();
        assert_eq!(k1.to_bytes(), k2.to_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_identity(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(dir.join("bad.key"), "zz").unwrap();
        std::fs::set_permissions(dir.join("bad.key"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = load_or_create_identity(&dir.join("bad.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 hex"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn urls() {
        assert_eq!(
            host_port("ws://127.0.0.1:7/v1/relay").unwrap(),
            ("127.0.0.1".into(), 7, false)
        );
        assert_eq!(
            host_port("wss://broker.example/v1/relay").unwrap(),
            ("broker.example".into(), 443, true)
        );
        assert_eq!(
            host_port("ws://[::1]:9/v1/relay").unwrap(),
            ("::1".into(), 9, false)
        );
        assert!(host_port("http://h/v1/relay").is_err());
    }
}
