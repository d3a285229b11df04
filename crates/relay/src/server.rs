//! The relay's I/O layer (tokio): binds the sockets, runs the TCP accept loop, a task per
//! connection until it is paired (hello, waiting) and then one task per session (a compact
//! [`splice::Session`]), the UDP forwarding loop, the probe responder, the `/status` + `/metrics` HTTP server
//! and the once-a-second sampler, and drains gracefully.
//!
//! All decisions are made by the sans-I/O cores ([`Pairing`], [`UdpCore`], [`ProbeResponder`]);
//! this module moves bytes, keeps time and enforces connection-level limits (connections in
//! total, handshaking connections per IP, hello deadline).
//!
//! UDP runs on its own OS thread (not a tokio task): a blocking `recvmmsg` takes up to 32
//! datagrams at once, the core decides for each, and the batch is forwarded with one UDP GSO
//! send per run of datagrams to the same destination and one `sendmmsg` for the rest, so a
//! burst costs one wakeup, no handoff between threads, and one trip through the IP stack per
//! destination. The probe responder reads the TTL
//! of IPv4 requests (`IP_RECVTTL`) and the hop limit of IPv6 ones (`IPV6_RECVHOPLIMIT`).
//! Everything else (TCP, probes, HTTP, sampling) runs on the tokio runtime.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, recvmsg, sendmmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned,
    MsgFlags, MultiHeaders, SockaddrStorage,
};
use steelyard_proto::ticket::{Side, Ticket};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config::RelayConfig;
use crate::keys::TrustedKeys;
use crate::limit::TokenBucket;
use crate::metrics::Metrics;
use crate::pairing::{HelloOutcome, Pairing, PairingConfig};
use crate::probe::{ProbeAction, ProbeResponder};
use crate::splice::{self, DirLimits, End, SharedBucket};
use crate::udp_batch;
use crate::udp_core::{UdpAction, UdpCore, UdpCoreConfig};
use crate::wire::{self, StatusCode, HELLO_HEADER_LEN};

/// Why the relay could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A socket could not be bound.
    #[error("cannot listen on {what} {addr}: {source} (is another process using the port?)")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// `[tcp] congestion` names a congestion control the kernel will not give this relay.
    #[error(
        "cannot use tcp.congestion = {name:?}: {source}; available here: {available} (see \
         /proc/sys/net/ipv4/tcp_available_congestion_control; `modprobe tcp_{name}` may add it); \
         without CAP_NET_ADMIN only these are allowed: {allowed} \
         (net.ipv4.tcp_allowed_congestion_control); or omit it for the system default"
    )]
    Congestion {
        /// The configured name.
        name: String,
        /// The OS error.
        source: std::io::Error,
        /// The kernel's available list.
        available: String,
        /// The kernel's allowed list.
        allowed: String,
    },
    /// Another I/O error.
    #[error("relay I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The addresses the relay actually listens on (ports resolved when the config said 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundAddrs {
    /// TCP sessions.
    pub tcp: SocketAddr,
    /// UDP sessions.
    pub udp: Option<SocketAddr>,
    /// Probe responder.
    pub probe: Option<SocketAddr>,
    /// HTTP `/status` and `/metrics`.
    pub http: Option<SocketAddr>,
}

struct Partner {
    stream: TcpStream,
    ticket: Ticket,
    conn: Conn,
}

/// One open TCP connection: its place under `limits.max_connections` and in the
/// `tcp_connections_open` gauge, held from accept until the connection closes (also while it is
/// half of a paired session).
struct Conn {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Conn {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.tcp_open.fetch_add(1, Relaxed);
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.tcp_open.fetch_sub(1, Relaxed);
    }
}

type Waiter = oneshot::Sender<Partner>;

struct Shared {
    cfg: RelayConfig,
    metrics: Arc<Metrics>,
    pairing: Mutex<Pairing<Waiter>>,
    handshakes: Mutex<HashMap<IpAddr, u32>>,
    global_bw: Option<SharedBucket>,
    cut: watch::Receiver<bool>,
}

/// Controls a running relay from outside: start a drain, read metrics.
#[derive(Clone)]
pub struct RelayHandle {
    drain: Arc<watch::Sender<bool>>,
    metrics: Arc<Metrics>,
    keys: TrustedKeys,
}

impl RelayHandle {
    /// Starts a graceful drain: stop taking sessions, let live ones finish within the grace
    /// period, then [`Relay::run`] returns.
    pub fn drain(&self) {
        let _ = self.drain.send(true);
    }

    /// The relay's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The ticket keys the relay trusts (the broker link announces into them).
    pub fn keys(&self) -> &TrustedKeys {
        &self.keys
    }
}

/// A bound, not yet running relay.
pub struct Relay {
    shared: Arc<Shared>,
    tcp: TcpListener,
    udp: Option<std::net::UdpSocket>,
    probe: Option<UdpSocket>,
    http: Option<TcpListener>,
    keys: TrustedKeys,
    drain_tx: Arc<watch::Sender<bool>>,
    cut_tx: watch::Sender<bool>,
    addrs: BoundAddrs,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Relay {
    /// Validates `cfg` and binds every configured socket. Must be called inside a tokio runtime.
    pub async fn bind(cfg: RelayConfig) -> Result<Self, RelayError> {
        let pinned = cfg.validate()?;
        let skew = cfg.limits.max_clock_skew_secs;
        // Without `broker_keys` (validate allows that only with `[broker]`), the keys come
        // from the broker's welcome.
        let keys = if pinned.is_empty() {
            TrustedKeys::from_broker(skew)
        } else {
            TrustedKeys::pinned(pinned, skew)
        };
        let bind_err = |what, addr| move |source| RelayError::Bind { what, addr, source };
        let tcp = TcpListener::bind(cfg.listen.tcp)
            .await
            .map_err(bind_err("tcp", cfg.listen.tcp))?;
        if let Some(name) = &cfg.tcp.congestion {
            set_congestion(&tcp, name)?;
        }
        let udp = match cfg.listen.udp {
            Some(a) => Some(std::net::UdpSocket::bind(a).map_err(bind_err("udp", a))?),
            None => None,
        };
        let probe = match cfg.listen.probe {
            Some(a) => {
                let s = UdpSocket::bind(a).await.map_err(bind_err("probe", a))?;
                enable_recv_ttl(&s, a);
                Some(s)
            }
            None => None,
        };
        let http = match cfg.listen.http {
            Some(a) => Some(TcpListener::bind(a).await.map_err(bind_err("http", a))?),
            None => None,
        };
        let addrs = BoundAddrs {
            tcp: tcp.local_addr()?,
            udp: udp
                .as_ref()
                .map(std::net::UdpSocket::local_addr)
                .transpose()?,
            probe: probe.as_ref().map(UdpSocket::local_addr).transpose()?,
            http: http.as_ref().map(TcpListener::local_addr).transpose()?,
        };
        let pairing = Pairing::new(
            keys.clone(),
            PairingConfig {
                relay_id: cfg.relay_id.clone(),
                max_sessions: cfg.capacity.max_sessions as usize,
                max_pending_total: cfg.limits.max_pending_total as usize,
                max_pending_per_ip: cfg.limits.max_pending_per_ip as usize,
                max_remembered_tickets: cfg.limits.max_remembered_tickets as usize,
                pair_timeout_ms: cfg.limits.pair_timeout_ms,
            },
        );
        let (drain_tx, _) = watch::channel(false);
        let (cut_tx, cut) = watch::channel(false);
        let global_bw = match cfg.capacity.max_bandwidth_bytes_per_sec {
            0 => None,
            r => Some(Arc::new(Mutex::new(TokenBucket::new(r, 0)))),
        };
        Ok(Self {
            shared: Arc::new(Shared {
                cfg,
                metrics: Arc::new(Metrics::default()),
                pairing: Mutex::new(pairing),
                handshakes: Mutex::new(HashMap::new()),
                global_bw,
                cut,
            }),
            tcp,
            udp,
            probe,
            http,
            keys,
            drain_tx: Arc::new(drain_tx),
            cut_tx,
            addrs,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// A handle to drain the relay and read its metrics.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            drain: self.drain_tx.clone(),
            metrics: self.shared.metrics.clone(),
            keys: self.keys.clone(),
        }
    }

    /// Runs until a drain (from [`RelayHandle::drain`]) has completed.
    pub async fn run(self) -> Result<(), RelayError> {
        let Relay {
            shared,
            tcp,
            udp,
            probe,
            http,
            keys,
            drain_tx,
            cut_tx,
            addrs,
        } = self;
        info!(relay_id = %shared.cfg.relay_id, ?addrs, "relay listening");
        let mut drain_rx = drain_tx.subscribe();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(accept_loop(tcp, shared.clone(), drain_tx.subscribe()));
        let udp_stop = Arc::new(AtomicBool::new(false));
        // Stops the UDP thread however `run` ends, also when its future is dropped.
        let _udp_stop_on_drop = StopOnDrop(udp_stop.clone());
        let udp_thread = match udp {
            Some(sock) => {
                let (shared, stop) = (shared.clone(), udp_stop.clone());
                Some(
                    std::thread::Builder::new()
                        .name("relay-udp".into())
                        .spawn(move || udp_thread(sock, shared, keys, stop))?,
                )
            }
            None => None,
        };
        if let Some(sock) = probe {
            tasks.spawn(probe_loop(sock, shared.clone()));
        }
        tasks.spawn(sampler(shared.clone()));
        let http_task = http.map(|l| tokio::spawn(http_server(l, shared.clone())));

        until_true(&mut drain_rx).await;
        let grace = Duration::from_secs(shared.cfg.drain.grace_secs);
        info!(grace_secs = grace.as_secs(), "draining: no new sessions");
        shared.metrics.draining.store(true, Relaxed);
        let waiters = shared
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .start_drain();
        drop(waiters); // each waiting first side is told `draining` and closed
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let live = shared.metrics.active_sessions() + shared.metrics.pending_sessions();
            if live == 0 || tokio::time::Instant::now() >= deadline {
                if live > 0 {
                    warn!(live, "drain grace over: cutting live sessions");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = cut_tx.send(true);
        // Let the cut sessions close their sockets.
        let wait_closed = tokio::time::Instant::now() + Duration::from_secs(2);
        while shared.metrics.tcp_active.load(Relaxed) > 0
            && tokio::time::Instant::now() < wait_closed
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tasks.abort_all();
        if let Some(h) = http_task {
            h.abort();
        }
        udp_stop.store(true, Relaxed);
        if let Some(t) = udp_thread {
            // It sees the flag within one UDP_TICK.
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        info!("drained");
        Ok(())
    }
}

/// Sets `TCP_CONGESTION` on the listener: the connections it accepts inherit it.
fn set_congestion(listener: &TcpListener, name: &str) -> Result<(), RelayError> {
    setsockopt(
        listener,
        sockopt::TcpCongestion,
        &std::ffi::OsString::from(name),
    )
    .map_err(|e| {
        let list = |f: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{f}"))
                .map_or_else(|_| "(unknown)".into(), |s| s.trim().to_owned())
        };
        RelayError::Congestion {
            name: name.to_owned(),
            source: e.into(),
            available: list("tcp_available_congestion_control"),
            allowed: list("tcp_allowed_congestion_control"),
        }
    })
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// Raises this process's soft open-files limit to its hard limit (each relayed TCP session
/// holds two sockets and two pipes, four descriptors more). Returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).ok()?;
    Some(hard)
}

async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|d| *d).await;
}

struct HandshakeGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        let mut h = self
            .shared
            .handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = h.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                h.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut drain: watch::Receiver<bool>) {
    let sem = Arc::new(Semaphore::new(shared.cfg.limits.max_connections as usize));
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = until_true(&mut drain) => return,
        };
        let m = &shared.metrics;
        m.tcp_accepted.fetch_add(1, Relaxed);
        let Ok(permit) = sem.clone().try_acquire_owned() else {
            m.tcp_refused_conn_limit.fetch_add(1, Relaxed);
            m.tcp_status_sent(StatusCode::Full);
            let _ = stream.try_write(&wire::encode_status(StatusCode::Full));
            continue;
        };
        let guard = {
            let mut h = shared.handshakes.lock().unwrap_or_else(|e| e.into_inner());
            let n = h.entry(peer.ip()).or_insert(0);
            if *n >= shared.cfg.limits.max_handshakes_per_ip {
                None
            } else {
                *n += 1;
                Some(HandshakeGuard {
                    shared: shared.clone(),
                    ip: peer.ip(),
                })
            }
        };
        let Some(guard) = guard else {
            m.tcp_refused_conn_limit.fetch_add(1, Relaxed);
            m.tcp_status_sent(StatusCode::TooManyFromAddress);
            let _ = stream.try_write(&wire::encode_status(StatusCode::TooManyFromAddress));
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle_conn(stream, peer, shared.clone(), permit, guard));
    }
}

async fn send_status(stream: &mut TcpStream, m: &Metrics, code: StatusCode) {
    m.tcp_status_sent(code);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        stream.write_all(&wire::encode_status(code)),
    )
    .await;
}

enum HelloError {
    Closed,
    Bad,
}

async fn read_hello(stream: &mut TcpStream) -> Result<Vec<u8>, HelloError> {
    let mut header = [0u8; HELLO_HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|_| HelloError::Closed)?;
    let len = wire::decode_hello_header(&header).map_err(|_| HelloError::Bad)?;
    let mut ticket = vec![0u8; len];
    stream
        .read_exact(&mut ticket)
        .await
        .map_err(|_| HelloError::Closed)?;
    Ok(ticket)
}

async fn handle_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    guard: HandshakeGuard,
) {
    let m = shared.metrics.clone();
    let conn = Conn::new(permit, m.clone());
    let hello_timeout = Duration::from_millis(shared.cfg.limits.hello_timeout_ms);
    let ticket_bytes = match tokio::time::timeout(hello_timeout, read_hello(&mut stream)).await {
        Ok(Ok(t)) => t,
        Ok(Err(HelloError::Bad)) => {
            return send_status(&mut stream, &m, StatusCode::Malformed).await
        }
        Ok(Err(HelloError::Closed)) => return,
        Err(_) => return send_status(&mut stream, &m, StatusCode::TimedOut).await,
    };
    drop(guard);
    let (tx, rx) = oneshot::channel();
    let outcome = shared
        .pairing
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .hello(&ticket_bytes, peer.ip(), now_ms(), tx);
    match outcome {
        HelloOutcome::Refused(r) => {
            debug!(%peer, code = r.code.name(), reason = %r.reason, "hello refused");
            send_status(&mut stream, &m, r.code).await;
        }
        HelloOutcome::Paired {
            ticket,
            first,
            waiter,
        } => {
            debug!(%peer, session = %ticket.session_id, "second side arrived");
            if let Err(p) = waiter.send(Partner {
                stream,
                ticket,
                conn,
            }) {
                // The first side's task is gone (only possible if it was aborted).
                let mut s = p.stream;
                shared
                    .pairing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .session_ended();
                send_status(&mut s, &m, StatusCode::TimedOut).await;
            }
            let _ = first;
        }
        HelloOutcome::Waiting {
            ticket,
            token,
            deadline_ms,
        } => {
            m.tcp_pending.fetch_add(1, Relaxed);
            send_status(&mut stream, &m, StatusCode::Waiting).await;
            let wait = Duration::from_millis(deadline_ms.saturating_sub(now_ms()));
            let r = wait_partner(&mut stream, rx, wait, &shared, &ticket, token).await;
            m.tcp_pending.fetch_sub(1, Relaxed);
            match r {
                Ok(partner) => start_session(stream, ticket, conn, partner, shared).await,
                Err(code) => {
                    if let Some(code) = code {
                        send_status(&mut stream, &m, code).await;
                    }
                }
            }
        }
    }
}

/// Waits for the partner. `Err(Some(code))`: tell the client and close; `Err(None)`: it left.
async fn wait_partner(
    stream: &mut TcpStream,
    mut rx: oneshot::Receiver<Partner>,
    wait: Duration,
    shared: &Shared,
    ticket: &Ticket,
    token: crate::pairing::PendingToken,
) -> Result<Partner, Option<StatusCode>> {
    let sleep = tokio::time::sleep(wait);
    tokio::pin!(sleep);
    let mut watch_close = true;
    let cancel = |shared: &Shared| {
        shared
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancel(ticket.session_id, token)
            .is_some()
    };
    loop {
        tokio::select! {
            r = &mut rx => return r.map_err(|_| Some(StatusCode::Draining)),
            () = &mut sleep => {
                if cancel(shared) {
                    return Err(Some(StatusCode::TimedOut));
                }
                // Paired meanwhile: the partner is on its way.
                return (&mut rx).await.map_err(|_| Some(StatusCode::Draining));
            }
            r = stream.ready(Interest::READABLE), if watch_close => {
                let mut b = [0u8; 1];
                match r.map(|_| stream.try_io(Interest::READABLE, || {
                    nix::sys::socket::recv(stream.as_raw_fd(), &mut b, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT)
                        .map_err(std::io::Error::from)
                })) {
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Ok(Ok(n)) if n > 0 => watch_close = false, // early data: keep it for the pipe
                    _ => {
                        // Closed or reset while waiting.
                        if cancel(shared) {
                            return Err(None);
                        }
                        return (&mut rx).await.map_err(|_| None);
                    }
                }
            }
        }
    }
}

/// Tells both sides they are paired and spawns the session as a task of its own, which holds
/// only what forwarding needs (the connections, their limits, the idle timeout): the hello,
/// the tickets and this connection task's state are dropped here.
async fn start_session(
    mut mine: TcpStream,
    my_ticket: Ticket,
    my_conn: Conn,
    partner: Partner,
    shared: Arc<Shared>,
) {
    let m = &shared.metrics;
    let mut other = partner.stream;
    m.tcp_sessions_total.fetch_add(1, Relaxed);
    m.tcp_active.fetch_add(1, Relaxed);
    send_status(&mut mine, m, StatusCode::Paired).await;
    send_status(&mut other, m, StatusCode::Paired).await;
    let lim = |t: &Ticket| DirLimits {
        bytes_per_sec: t.limits.max_bytes_per_sec,
        max_total: t.limits.max_total_bytes,
    };
    let idle_secs = [
        my_ticket.limits.idle_timeout_secs,
        partner.ticket.limits.idle_timeout_secs,
    ]
    .into_iter()
    .filter(|s| *s > 0)
    .min()
    .unwrap_or(shared.cfg.limits.idle_timeout_secs);
    let (a, a_t, b, b_t) = if my_ticket.side == Side::A {
        (mine, &my_ticket, other, &partner.ticket)
    } else {
        (other, &partner.ticket, mine, &my_ticket)
    };
    let mut cut = shared.cut.clone();
    let session = splice::Session::new(
        a,
        b,
        (lim(a_t), lim(b_t)),
        Duration::from_secs(u64::from(idle_secs)),
        splice::Env {
            metrics: m.clone(),
            max_pipes: u64::from(shared.cfg.limits.max_pipes),
            global: shared.global_bw.clone(),
        },
        async move { until_true(&mut cut).await },
    );
    let id = my_ticket.session_id;
    let conns = (my_conn, partner.conn);
    // `map`, not an `async` block: the task holds the session once, not also a copy of it.
    tokio::spawn(futures_util::FutureExt::map(session, move |end| {
        drop(conns);
        let m = &shared.metrics;
        match end {
            End::Idle => m.tcp_idle_closed.fetch_add(1, Relaxed),
            End::Limit => m.tcp_limit_closed.fetch_add(1, Relaxed),
            End::Cut => m.tcp_drain_cut.fetch_add(1, Relaxed),
            End::Closed | End::Error => 0,
        };
        debug!(session = %id, ?end, "session ended");
        shared
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .session_ended();
        m.tcp_active.fetch_sub(1, Relaxed);
    }));
}

/// Runs the UDP data plane on the calling (dedicated) thread until `stop` is set.
///
/// One blocking `recvmmsg` (`MSG_WAITFORONE`) takes every datagram queued, up to
/// [`UDP_BATCH`], as soon as the first arrives; the core decides for each; one blocking
/// `sendmmsg` forwards the batch. So a burst costs one wakeup of this thread and no handoff
/// between threads, and the headers and buffers are allocated once. `SO_RCVTIMEO` of
/// [`UDP_TICK`] wakes the loop when idle to expire sessions, notice a drain and `stop`;
/// `SO_SNDTIMEO` bounds how long a full send buffer can hold the loop.
fn udp_thread(
    sock: std::net::UdpSocket,
    shared: Arc<Shared>,
    keys: TrustedKeys,
    stop: Arc<AtomicBool>,
) {
    let cfg = &shared.cfg;
    let mut core = UdpCore::new(
        keys,
        UdpCoreConfig {
            relay_id: cfg.relay_id.clone(),
            max_sessions: cfg.capacity.max_sessions as usize,
            idle_timeout_ms: u64::from(cfg.limits.udp_idle_timeout_secs) * 1000,
            max_remembered_tickets: cfg.limits.max_remembered_tickets as usize,
        },
    );
    if let Err(e) = sock
        .set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(UDP_TICK)))
        .and_then(|()| sock.set_write_timeout(Some(Duration::from_secs(1))))
    {
        warn!("UDP sessions disabled: cannot make the UDP socket blocking with timeouts: {e}");
        return;
    }
    let fd = sock.as_raw_fd();
    let m = shared.metrics.clone();
    let mut bufs = vec![0u8; UDP_BATCH * UDP_SLOT];
    let mut rx_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
    let mut tx = UdpSender::new(fd);
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(UDP_BATCH);
    // Forwards of this batch: slot index, and (destination, length).
    let mut out_slots: Vec<usize> = Vec::with_capacity(UDP_BATCH);
    let mut out: Vec<(SocketAddr, usize)> = Vec::with_capacity(UDP_BATCH);
    let mut last_sweep = now_ms();
    let mut draining = false;
    while !stop.load(Relaxed) {
        got.clear();
        let r = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .chunks_exact_mut(UDP_SLOT)
                .map(|c| [IoSliceMut::new(c)])
                .collect();
            recvmmsg(
                fd,
                &mut rx_hdrs,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            )
            .map(|res| {
                for msg in res {
                    got.push((msg.bytes, msg.address.as_ref().and_then(to_socket_addr)));
                }
            })
        };
        let now = now_ms();
        match r {
            Ok(()) => {}
            Err(Errno::EAGAIN | Errno::EINTR) => {}
            Err(e) => {
                warn!("UDP receive failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        out.clear();
        out_slots.clear();
        let (mut a_to_b, mut b_to_a) = (0u64, 0u64);
        for (i, &(n, src)) in got.iter().enumerate() {
            let Some(src) = src else { continue };
            let dgram = &bufs[i * UDP_SLOT..i * UDP_SLOT + n.min(UDP_SLOT)];
            match core.on_datagram(src, dgram, now) {
                UdpAction::Forward { to, from_side } => {
                    out_slots.push(i);
                    out.push((to, dgram.len()));
                    match from_side {
                        Side::A => a_to_b += dgram.len() as u64,
                        Side::B => b_to_a += dgram.len() as u64,
                    }
                }
                UdpAction::Status {
                    session_id,
                    replies,
                } => {
                    // Counted before the replies go out: a client that reads /status right
                    // after its `paired` sees its session.
                    m.udp_sessions.store(core.sessions() as u64, Relaxed);
                    m.udp_active.store(core.active() as u64, Relaxed);
                    for (to, code) in replies {
                        m.udp_status[code.index()].fetch_add(1, Relaxed);
                        let _ = sock.send_to(&wire::encode_udp_status(session_id, code), to);
                    }
                }
                UdpAction::Drop(r) => {
                    m.udp_dropped[r.index()].fetch_add(1, Relaxed);
                }
            }
        }
        if !out.is_empty() {
            m.bytes_a_to_b.fetch_add(a_to_b, Relaxed);
            m.bytes_b_to_a.fetch_add(b_to_a, Relaxed);
            let sent = tx.send(&bufs, &out_slots, &out, &m);
            m.udp_forwarded.fetch_add(sent as u64, Relaxed);
        }
        if !draining && m.draining.load(Relaxed) {
            draining = true;
            core.start_drain();
        }
        if now.saturating_sub(last_sweep) >= 250 {
            last_sweep = now;
            core.expire(now);
            m.udp_sessions.store(core.sessions() as u64, Relaxed);
            m.udp_active.store(core.active() as u64, Relaxed);
        }
    }
}

/// Datagrams per `recvmmsg`/`sendmmsg` call.
const UDP_BATCH: usize = 32;
/// Bytes per datagram slot (the largest UDP payload).
const UDP_SLOT: usize = 65536;
/// Longest time the UDP thread blocks without a datagram (housekeeping, drain, stop).
const UDP_TICK: Duration = Duration::from_millis(250);

fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::from(std::net::SocketAddrV4::from(*v4)))
        .or_else(|| {
            a.as_sockaddr_in6()
                .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
        })
}

fn slot(bufs: &[u8], i: usize, len: usize) -> &[u8] {
    &bufs[i * UDP_SLOT..i * UDP_SLOT + len]
}

/// Sends a batch of forwards: runs of datagrams to the same destination as one UDP GSO send
/// ([`udp_batch::plan`]), the rest with one `sendmmsg`. A GSO send the kernel refuses is sent
/// again without GSO; when the kernel cannot do UDP GSO at all, it is not tried again.
struct UdpSender {
    fd: std::os::fd::RawFd,
    hdrs: MultiHeaders<SockaddrStorage>,
    gso: bool,
    /// Segment size from which GSO sends were refused (larger than the path's MTU allows):
    /// runs of datagrams this long or longer go one by one.
    gso_refused_at: usize,
    groups: Vec<udp_batch::Group>,
    singles: Vec<usize>,
    addrs: Vec<Option<SockaddrStorage>>,
}

impl UdpSender {
    fn new(fd: std::os::fd::RawFd) -> Self {
        Self {
            fd,
            hdrs: MultiHeaders::preallocate(UDP_BATCH, None),
            gso: true,
            gso_refused_at: usize::MAX,
            groups: Vec::new(),
            singles: Vec::with_capacity(UDP_BATCH),
            addrs: Vec::with_capacity(UDP_BATCH),
        }
    }

    /// Sends datagram `k` (`bufs` slot `slots[k]`, `batch[k]` = destination and length) for
    /// every `k`. Returns how many were sent.
    fn send(
        &mut self,
        bufs: &[u8],
        slots: &[usize],
        batch: &[(SocketAddr, usize)],
        m: &Metrics,
    ) -> usize {
        self.singles.clear();
        if !self.gso {
            self.singles.extend(0..batch.len());
            return self.flush_singles(bufs, slots, batch);
        }
        udp_batch::plan(batch, &mut self.groups);
        let mut sent = 0;
        let groups = std::mem::take(&mut self.groups);
        for g in &groups {
            if g.items.len() == 1 || !self.gso || g.segment >= self.gso_refused_at {
                self.singles.extend_from_slice(&g.items);
                continue;
            }
            // Keep the order per destination: what is queued goes first.
            sent += self.flush_singles(bufs, slots, batch);
            let iovs: Vec<IoSlice<'_>> = g
                .items
                .iter()
                .map(|&k| IoSlice::new(slot(bufs, slots[k], batch[k].1)))
                .collect();
            let segment = u16::try_from(g.segment).unwrap_or(u16::MAX);
            let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
            let to = SockaddrStorage::from(g.to);
            match sendmsg(self.fd, &iovs, &cmsg, MsgFlags::empty(), Some(&to)) {
                Ok(_) => {
                    sent += g.items.len();
                    m.udp_gso_sends.fetch_add(1, Relaxed);
                }
                // The send buffer stayed full for the send timeout: drop, as for one datagram.
                Err(Errno::EAGAIN) => {}
                Err(e) => {
                    if matches!(e, Errno::EIO | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) {
                        warn!("UDP GSO unavailable ({e}): forwarding one datagram per message");
                        self.gso = false;
                    } else if matches!(e, Errno::EINVAL | Errno::EMSGSIZE) {
                        // Segments too long for the route's MTU: do not try this size again.
                        self.gso_refused_at = self.gso_refused_at.min(g.segment);
                    }
                    self.singles.extend_from_slice(&g.items);
                }
            }
        }
        self.groups = groups;
        sent + self.flush_singles(bufs, slots, batch)
    }

    /// Sends the queued single datagrams with blocking `sendmmsg` calls (the socket's send
    /// timeout bounds a full buffer); a datagram the kernel refuses is skipped.
    fn flush_singles(
        &mut self,
        bufs: &[u8],
        slots: &[usize],
        batch: &[(SocketAddr, usize)],
    ) -> usize {
        let mut done = 0;
        let mut sent = 0;
        self.addrs.clear();
        self.addrs.extend(
            self.singles
                .iter()
                .map(|&k| Some(SockaddrStorage::from(batch[k].0))),
        );
        while done < self.singles.len() {
            let iovs: Vec<[IoSlice<'_>; 1]> = self.singles[done..]
                .iter()
                .map(|&k| [IoSlice::new(slot(bufs, slots[k], batch[k].1))])
                .collect();
            match sendmmsg(
                self.fd,
                &mut self.hdrs,
                iovs.iter(),
                &self.addrs[done..],
                [],
                MsgFlags::empty(),
            ) {
                Ok(res) => {
                    let k = res.count();
                    done += k.max(1);
                    sent += k;
                }
                Err(Errno::EINTR) => {}
                // Full for longer than the send timeout, or refused: skip this datagram.
                Err(_) => done += 1,
            }
        }
        self.singles.clear();
        sent
    }
}

/// Asks the kernel to report each request's TTL (IPv4) or hop limit (IPv6) with it. An IPv6
/// socket also asks for the TTL of IPv4-mapped requests (dual stack); failures only mean
/// replies report 0 (unknown).
fn enable_recv_ttl(s: &UdpSocket, addr: SocketAddr) {
    if addr.is_ipv6() {
        if let Err(e) = setsockopt(s, sockopt::Ipv6RecvHopLimit, &true) {
            warn!("IPV6_RECVHOPLIMIT unavailable, IPv6 probe replies report hop limit 0: {e}");
        }
    }
    if let Err(e) = setsockopt(s, sockopt::Ipv4RecvTtl, &true) {
        if addr.is_ipv4() {
            warn!("IP_RECVTTL unavailable, probe replies report TTL 0: {e}");
        }
    }
}

fn recv_with_ttl(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, u8)> {
    let mut cmsg = nix::cmsg_space!(libc_int, libc_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let mut ttl = 0u8;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) => {
                    ttl = u8::try_from(t).unwrap_or(255);
                }
                _ => {}
            }
        }
    }
    let addr = msg
        .address
        .as_ref()
        .and_then(to_socket_addr)
        .ok_or_else(|| std::io::Error::other("datagram without source address"))?;
    Ok((msg.bytes, addr, ttl))
}

#[allow(non_camel_case_types)]
type libc_int = i32;

async fn probe_loop(sock: UdpSocket, shared: Arc<Shared>) {
    let mut secret = [0u8; 32];
    if getrandom::getrandom(&mut secret).is_err() {
        warn!("no OS randomness: probe bursts disabled");
        secret = [0; 32];
    }
    let pc = &shared.cfg.probe;
    let mut responder = ProbeResponder::new(
        secret,
        pc.burst_max_packets,
        pc.burst_bytes_per_sec,
        now_us(),
    );
    let m = shared.metrics.clone();
    let mut buf = vec![0u8; 2048];
    loop {
        let r = sock
            .async_io(Interest::READABLE, || recv_with_ttl(&sock, &mut buf))
            .await;
        let Ok((n, src, ttl)) = r else { continue };
        let load = m.load_percent(&shared.cfg);
        let draining = m.draining.load(Relaxed);
        match responder.respond(src, &buf[..n.min(buf.len())], ttl, load, draining, now_us()) {
            ProbeAction::Reply(out) => {
                m.probe_echo.fetch_add(1, Relaxed);
                let _ = sock.try_send_to(&out, src);
            }
            ProbeAction::Burst(packets) => {
                for p in packets {
                    if sock.send_to(&p, src).await.is_ok() {
                        m.probe_burst_packets.fetch_add(1, Relaxed);
                    }
                }
            }
            ProbeAction::Ignore => {
                m.probe_ignored.fetch_add(1, Relaxed);
            }
        }
    }
}

async fn sampler(shared: Arc<Shared>) {
    let mut prev = (0, 0, crate::metrics::cpu_seconds().unwrap_or(0.0));
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = tokio::time::Instant::now();
        shared
            .metrics
            .update_sample(&mut prev, (now - last).as_secs_f64());
        last = now;
        shared
            .pairing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prune(now_ms());
    }
}

async fn http_server(listener: TcpListener, shared: Arc<Shared>) {
    let app = axum::Router::new()
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        warn!("http server stopped: {e}");
    }
}

async fn status(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(s.metrics.status(&s.cfg))
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render_prometheus(&s.cfg),
    )
}
