//! The broker's I/O layer: HTTP (plain or rustls TLS) with axum, one WebSocket per agent and
//! per relay (framed by [`crate::ws`], one task per connection reading the socket and draining
//! the connection's send queue), the admin API, a timer for the core's periodic work, and a writer thread that
//! persists records to the store in batches.
//!
//! The logic lives in [`Core`]; this module moves bytes, reads the clock, draws random
//! numbers, signs tickets, enforces per-connection limits and counts what happens. It does not
//! decide anything.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use steelyard_proto::api::{
    self, AgentHello, AgentMessage, ApiError, AuthProof, BrokerMessage, Challenge, ConnectAnswer,
    ConnectRequest, ErrorCode, Offer, PublicKeyInfo, RelayHello, RelayMessage, RelayWelcome,
    ReportAccepted, Role, TransportKind, NONCE_LEN,
};
use steelyard_proto::hex;
use steelyard_proto::ticket::{SessionId, TicketSigner};
use steelyard_select::{Policy, Timestamp};
use steelyard_store::{MemoryStore, SessionRecord, SqliteStore, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BrokerConfig, StoreKind};
use crate::core::{no_choice_error, ConnId, Core, Effects, Persist};
use crate::keys;
use crate::metrics::Metrics;
use crate::openapi;
use crate::ws;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The signing key could not be loaded or made.
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] steelyard_store::StoreError),
    /// The stored state is inconsistent.
    #[error("broker state: {0}")]
    State(String),
    /// TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// What a connection's writer sends.
enum Out {
    Text(String),
    /// A page of the encoded relay map, shared by every connection it is queued on (not a
    /// copy per agent: 10,000 agents times a map of 500 relays would be hundreds of MiB).
    Page(Arc<Vec<String>>, usize),
    Pong(Box<[u8]>),
    Close(Box<ApiError>),
}

impl Out {
    /// The frame a text or pong becomes (a close is sent by [`close_with`]).
    fn frame(&self) -> (u8, &[u8]) {
        match self {
            Out::Text(t) => (ws::TEXT, t.as_bytes()),
            Out::Page(pages, i) => (ws::TEXT, pages.get(*i).map_or(&[], |p| p.as_bytes())),
            Out::Pong(p) => (ws::PONG, p),
            Out::Close(_) => (ws::CLOSE, &[]),
        }
    }
}

/// Why a message could not be queued.
enum QueueError {
    /// `limits.send_queue` messages are waiting: the client is too slow.
    Full,
    /// The connection is closing.
    Closed,
}

/// One connection's send queue, drained by its connection's task. Bounded by `limits.send_queue`;
/// closed by the broker (slow consumer, close, shutdown) or by its task when the socket
/// fails. It holds no allocation while empty: a tokio mpsc channel costs about 1.5 KiB per
/// idle connection (cache-padded fields and a 32-slot block), a quarter of the broker's
/// memory per connected peer. Its one consumer's waker is kept in it (a `Notify` and the
/// future waiting on it cost more).
#[derive(Default)]
struct SendQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    items: std::collections::VecDeque<Out>,
    closed: bool,
    /// The task to wake when a message arrives or the queue closes.
    waker: Option<std::task::Waker>,
}

impl SendQueue {
    fn push(&self, out: Out, max: usize) -> Result<(), QueueError> {
        let mut s = lock(&self.state);
        if s.closed {
            return Err(QueueError::Closed);
        }
        if s.items.len() >= max {
            return Err(QueueError::Full);
        }
        s.items.push_back(out);
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// No more messages; the connection task ends after sending what is queued.
    fn close(&self) {
        let mut s = lock(&self.state);
        s.closed = true;
        let waker = s.waker.take();
        drop(s);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The next message; `Ready(None)` once closed and drained. `Pending` registers the
    /// caller's waker for the next push or close.
    fn poll_pop(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Out>> {
        let mut s = lock(&self.state);
        if let Some(out) = s.items.pop_front() {
            if s.items.is_empty() {
                // Give the memory back (even 4 slots, 96 bytes, are a tenth of what a connected
                // peer costs): an idle connection's queue holds no allocation.
                s.items = Default::default();
            }
            return std::task::Poll::Ready(Some(out));
        }
        if s.closed {
            return std::task::Poll::Ready(None);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        std::task::Poll::Pending
    }

    /// The next message; `None` once closed and drained.
    async fn pop(&self) -> Option<Out> {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }
}

struct Shared {
    core: Mutex<Core>,
    conns: Mutex<HashMap<ConnId, Arc<SendQueue>>>,
    next_conn: AtomicU64,
    signer: TicketSigner,
    keys: Vec<PublicKeyInfo>,
    config: BrokerConfig,
    metrics: Metrics,
    store: Arc<dyn Store>,
    outbox: Arc<Outbox>,
    unauth: Mutex<HashMap<IpAddr, u32>>,
    /// Open WebSockets (agents, relays, not yet authenticated), against `limits.max_connections`.
    open: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> Timestamp {
    Timestamp::from_millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if getrandom::getrandom(&mut out).is_err() {
        // Never expected on Linux; fall back to a time-and-counter mix rather than panic.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        let seed = now().millis() ^ FALLBACK.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        for (i, b) in out.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) & 0xff) as u8;
        }
    }
    out
}

impl Shared {
    /// Runs `f` on the core under its lock, then carries out the effects it queued.
    fn with_core<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let (result, effects, map) = {
            let mut core = lock(&self.core);
            let result = f(&mut core);
            let effects = core.take_effects();
            let map = effects
                .relay_map_changed
                .then(|| (core.relay_map_encoded(), core.online_agents()));
            (result, effects, map)
        };
        if !effects.is_empty() {
            self.apply(effects, map);
        }
        result
    }

    fn apply(&self, effects: Effects, map: Option<(Arc<Vec<String>>, Vec<ConnId>)>) {
        if !effects.persist.is_empty() {
            self.outbox.push(effects.persist);
        }
        for (conn, message) in effects.send {
            if matches!(message, BrokerMessage::ReportNow(_)) {
                self.metrics.report_requests.fetch_add(1, Ordering::Relaxed);
            }
            if let BrokerMessage::Error(e) = &message {
                self.metrics.error(e.code);
            }
            if matches!(message, BrokerMessage::ConnectAnswer(_)) {
                self.metrics.connects_ok.fetch_add(1, Ordering::Relaxed);
            }
            self.send(conn, &message);
        }
        for (conn, error) in effects.close {
            self.metrics.error(error.code);
            self.close(conn, error);
        }
        if let Some((pages, agents)) = map {
            for conn in agents {
                for i in 0..pages.len() {
                    self.send_out(conn, Out::Page(pages.clone(), i));
                }
            }
        }
    }

    fn send(&self, conn: ConnId, message: &BrokerMessage) {
        self.send_text(conn, api::encode(message));
    }

    fn send_text(&self, conn: ConnId, text: String) {
        self.send_out(conn, Out::Text(text));
    }

    fn send_out(&self, conn: ConnId, out: Out) {
        let mut conns = lock(&self.conns);
        if let Some(queue) = conns.get(&conn) {
            match queue.push(out, self.config.limits.send_queue) {
                Ok(()) => {
                    self.metrics.messages_out.fetch_add(1, Ordering::Relaxed);
                }
                Err(QueueError::Full) => {
                    // Too slow to keep up: its writer sends what is queued, then closes.
                    self.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    queue.close();
                    conns.remove(&conn);
                }
                Err(QueueError::Closed) => {
                    conns.remove(&conn);
                }
            }
        }
    }

    fn send_error(&self, conn: ConnId, error: ApiError) {
        self.metrics.error(error.code);
        self.send(conn, &BrokerMessage::Error(error));
    }

    fn close(&self, conn: ConnId, error: ApiError) {
        if let Some(queue) = lock(&self.conns).remove(&conn) {
            let _ = queue.push(Out::Close(Box::new(error)), usize::MAX);
            queue.close();
        }
    }

    fn new_conn(&self) -> (ConnId, Arc<SendQueue>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        (id, Arc::default())
    }

    fn attach(&self, conn: ConnId, queue: Arc<SendQueue>) {
        lock(&self.conns).insert(conn, queue);
    }
}

/// A running broker. Dropping it does not stop it; call [`RunningBroker::shutdown`].
pub struct RunningBroker {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl RunningBroker {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The public ticket keys it publishes.
    pub fn ticket_keys(&self) -> &[PublicKeyInfo] {
        &self.shared.keys
    }

    /// Stops accepting, closes every WebSocket (clients reconnect elsewhere or later), flushes
    /// the store and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let conns: Vec<ConnId> = lock(&self.shared.conns).keys().copied().collect();
        for conn in conns {
            self.shared.close(
                conn,
                ApiError::new(
                    ErrorCode::Internal,
                    "the broker is shutting down; reconnect",
                ),
            );
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.shared.outbox.close();
        if let Some(w) = self.writer.take() {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }
    }
}

fn open_store(config: &BrokerConfig) -> Result<Arc<dyn Store>, StartError> {
    Ok(match config.store {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Sqlite => {
            std::fs::create_dir_all(&config.data_dir).map_err(|e| {
                StartError::State(format!(
                    "cannot create data directory {}: {e}",
                    config.data_dir.display()
                ))
            })?;
            Arc::new(SqliteStore::open(config.data_dir.join("broker.db"))?)
        }
    })
}

fn tls_acceptor(config: &BrokerConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if config.listen_plain {
        return Ok(None);
    }
    let tls = config
        .tls
        .as_ref()
        .ok_or_else(|| StartError::Tls("no [tls] section and listen_plain is false".into()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| StartError::Tls(format!("certificate {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(StartError::Tls(format!(
            "no certificate in {}",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| StartError::Tls(format!("key {}: {e}", tls.key.display())))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| StartError::Tls(e.to_string()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// Starts a broker on the current tokio runtime: loads the key and the store, binds, and
/// serves until [`RunningBroker::shutdown`].
pub async fn start(config: BrokerConfig) -> Result<RunningBroker, StartError> {
    config.validate()?;
    let tls = tls_acceptor(&config)?;
    let (signer, generated) = keys::load_or_generate(&config.data_dir)?;
    if generated {
        tracing::info!(key_id = %signer.key_id(), dir = %config.data_dir.display(), "generated a new ticket signing key");
    }
    let mut published = vec![keys::key_info(&signer.public_key())];
    for k in &config.extra_ticket_keys {
        let key = api::parse_public_key(k).map_err(|e| StartError::State(e.message))?;
        published.push(keys::key_info(&key));
    }
    let store = open_store(&config)?;
    let policy = match store.get_setting("policy")? {
        Some(json) => Some(
            serde_json::from_str::<Policy>(&json)
                .map_err(|e| StartError::State(format!("the stored policy does not parse: {e}")))?,
        ),
        None => None,
    };
    let core = Core::new(
        &config,
        store.list_peers()?,
        store.list_relays()?,
        policy,
        signer.key_id(),
        now(),
    )
    .map_err(StartError::State)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;

    let outbox = Arc::new(Outbox::default());
    let shared = Arc::new(Shared {
        core: Mutex::new(core),
        conns: Mutex::new(HashMap::new()),
        next_conn: AtomicU64::new(1),
        signer,
        keys: published,
        config,
        metrics: Metrics::default(),
        store: store.clone(),
        outbox: outbox.clone(),
        unauth: Mutex::new(HashMap::new()),
        open: AtomicUsize::new(0),
    });
    // Effects queued while building the core (config relays to persist).
    shared.with_core(|_| ());
    let writer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("broker-store".into())
            .spawn(move || {
                writer_loop(
                    &*shared.store,
                    &shared.metrics,
                    &outbox,
                    shared.config.limits.history_days,
                )
            })
            .map_err(|e| StartError::State(format!("cannot start the store writer: {e}")))?
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let router = router(shared.clone());
    let accept = tokio::spawn(accept_loop(listener, tls, router, shutdown_rx.clone()));
    let ticker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                interval.tick().await;
                shared.with_core(|c| c.tick(now()));
            }
        })
    };
    tracing::info!(%local_addr, tls = shared.config.tls.is_some() && !shared.config.listen_plain, store = shared.store.backend(), "broker listening");
    Ok(RunningBroker {
        local_addr,
        shared,
        shutdown,
        tasks: vec![accept, ticker],
        writer: Some(writer),
    })
}

/// Records on their way to the store. Pushing is cheap and wakes the writer only when the
/// queue was empty; the writer then waits [`BATCH_WINDOW`] so that a burst becomes one batch.
#[derive(Default)]
struct Outbox {
    queue: Mutex<(Vec<Persist>, bool)>,
    wake: std::sync::Condvar,
}

/// How long the writer lets records accumulate before writing a batch. This is the most a
/// crash (not a clean stop, which flushes) can lose.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

impl Outbox {
    fn push(&self, records: Vec<Persist>) {
        let mut q = lock(&self.queue);
        let was_empty = q.0.is_empty();
        q.0.extend(records);
        if was_empty {
            self.wake.notify_one();
        }
    }

    fn close(&self) {
        lock(&self.queue).1 = true;
        self.wake.notify_one();
    }

    /// The next batch; `None` once closed and drained.
    fn take(&self) -> Option<Vec<Persist>> {
        let mut q = lock(&self.queue);
        while q.0.is_empty() && !q.1 {
            q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if q.0.is_empty() {
            return None;
        }
        if !q.1 {
            drop(q);
            std::thread::sleep(BATCH_WINDOW);
            q = lock(&self.queue);
        }
        Some(std::mem::take(&mut q.0))
    }
}

fn writer_loop(store: &dyn Store, metrics: &Metrics, outbox: &Outbox, history_days: u64) {
    let mut last_prune = Instant::now() - Duration::from_secs(3600);
    while let Some(batch) = outbox.take() {
        let mut sessions: Vec<SessionRecord> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for p in batch {
            let result = match p {
                Persist::Peer(r) => store.put_peer(&r),
                Persist::Relay(r) => store.put_relay(&r),
                Persist::Policy(json) => store.put_setting("policy", &json),
                Persist::Session(s) => {
                    match index.get(&s.id) {
                        Some(&i) => sessions[i] = s,
                        None => {
                            index.insert(s.id.clone(), sessions.len());
                            sessions.push(s);
                        }
                    }
                    Ok(())
                }
            };
            if let Err(e) = result {
                metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "store write failed");
            }
        }
        for chunk in sessions.chunks(4096) {
            if let Err(e) = store.put_sessions(chunk) {
                metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "store write of {} sessions failed", chunk.len());
            }
        }
        if history_days > 0 && last_prune.elapsed() > Duration::from_secs(3600) {
            last_prune = Instant::now();
            let before = now().millis().saturating_sub(history_days * 86_400_000);
            if let Err(e) = store.prune_sessions(before) {
                tracing::warn!(error = %e, "pruning session history failed");
            }
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    tower::ServiceExt::oneshot(router.clone(), req)
                },
            );
            // HTTP/1.1 only (TLS offers only http/1.1 by ALPN): WebSockets need it, and the
            // upgraded connection is then the bare stream, which `split` can take apart.
            let builder = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = builder.serve_connection(io, service).with_upgrades().await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = builder.serve_connection(io, service).with_upgrades().await;
                        }
                        _ => {
                            tracing::debug!(%peer, "TLS handshake failed");
                        }
                    }
                }
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/agent", get(agent_ws))
        .route("/v1/relay", get(relay_ws))
        .route("/v1/keys", get(get_keys))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/explain", get(explain))
        .route("/v1/admin/peers", get(admin_peers))
        .route("/v1/admin/peers/{id}/revoke", post(admin_revoke))
        .route("/v1/admin/relays", get(admin_relays))
        .route("/v1/admin/relays/{id}/drain", post(admin_drain))
        .route("/v1/admin/sessions", get(admin_sessions))
        .route(
            "/v1/admin/policy",
            get(admin_get_policy).put(admin_put_policy),
        )
        .with_state(shared)
}

// ---- HTTP ----------------------------------------------------------------------------------

fn http_error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    (status, Json(ApiError::new(code, message))).into_response()
}

#[allow(clippy::result_large_err)]
fn check_admin(shared: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = shared.config.admin_token.as_deref() else {
        return Err(http_error(
            StatusCode::FORBIDDEN,
            ErrorCode::Unauthenticated,
            "the admin API is disabled: set admin_token in the broker config",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
    if same {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(ApiError::new(
                ErrorCode::Unauthenticated,
                "send Authorization: Bearer <admin_token>",
            )),
        )
            .into_response())
    }
}

async fn get_keys(State(shared): State<Arc<Shared>>) -> Response {
    Json(serde_json::json!({ "keys": shared.keys })).into_response()
}

impl Shared {
    fn gauges(&self) -> crate::core::Gauges {
        let mut g = lock(&self.core).gauges();
        g.websockets_open = self.open.load(Ordering::Relaxed);
        g
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let g = shared.gauges();
    Json(serde_json::json!({ "status": "ok", "store": shared.store.backend(), "gauges": g }))
        .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let g = shared.gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(&g),
    )
        .into_response()
}

async fn openapi_json() -> Response {
    Json(openapi::document()).into_response()
}

#[derive(Deserialize)]
struct ExplainQuery {
    from: String,
    to: String,
    #[serde(default)]
    transport: TransportKind,
}

async fn explain(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let result = lock(&shared.core).explain(&q.from, &q.to, q.transport, now());
    match result {
        Ok(decision) => Json(decision).into_response(),
        Err(no) => {
            let e = no_choice_error(&no);
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(serde_json::json!({ "code": e.code, "message": e.message, "detail": no })),
            )
                .into_response()
        }
    }
}

async fn admin_peers(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let peers = lock(&shared.core).peers(now());
    Json(serde_json::json!({ "peers": peers })).into_response()
}

async fn admin_revoke(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    match shared.with_core(|c| c.revoke_peer(&id, now())) {
        Ok(()) => Json(serde_json::json!({ "revoked": id })).into_response(),
        Err(e) => http_error(StatusCode::NOT_FOUND, e.code, e.message),
    }
}

async fn admin_relays(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let relays = lock(&shared.core).relays(now());
    Json(serde_json::json!({ "relays": relays })).into_response()
}

#[derive(Deserialize)]
struct DrainQuery {
    #[serde(default = "yes")]
    draining: bool,
}

fn yes() -> bool {
    true
}

async fn admin_drain(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<DrainQuery>,
) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    match shared.with_core(|c| c.drain_relay(&id, q.draining)) {
        Ok(()) => Json(serde_json::json!({ "relay": id, "draining": q.draining })).into_response(),
        Err(e) => http_error(StatusCode::NOT_FOUND, e.code, e.message),
    }
}

#[derive(Deserialize)]
struct SessionsQuery {
    #[serde(default = "hundred")]
    limit: usize,
}

fn hundred() -> usize {
    100
}

async fn admin_sessions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<SessionsQuery>,
) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let limit = q.limit.min(10_000);
    let live = lock(&shared.core).live_sessions(limit);
    let store = shared.store.clone();
    let history = tokio::task::spawn_blocking(move || {
        store
            .list_sessions(limit)
            .and_then(|s| Ok((s, store.count_sessions()?)))
    })
    .await;
    match history {
        Ok(Ok((history, total))) => Json(serde_json::json!({
            "live": live,
            "history": history,
            "history_total": total,
        }))
        .into_response(),
        Ok(Err(e)) => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        ),
        Err(e) => http_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            e.to_string(),
        ),
    }
}

async fn admin_get_policy(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let policy = lock(&shared.core).policy().clone();
    Json(policy).into_response()
}

async fn admin_put_policy(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = check_admin(&shared, &headers) {
        return r;
    }
    let policy: Policy = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return http_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadMessage,
                format!("not a valid policy: {e}"),
            )
        }
    };
    match shared.with_core(|c| c.set_policy(policy)) {
        Ok(()) => Json(lock(&shared.core).policy().clone()).into_response(),
        Err(e) => http_error(StatusCode::BAD_REQUEST, e.code, e.message),
    }
}

// ---- WebSockets ----------------------------------------------------------------------------

struct UnauthGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for UnauthGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.shared.unauth);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// One open WebSocket counted against `limits.max_connections`, from the upgrade until its
/// task ends (or the upgrade fails).
struct OpenSlot(Arc<Shared>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Takes a slot of the total connection limit, or answers 503 with what to do.
#[allow(clippy::result_large_err)]
fn open_slot(shared: &Arc<Shared>) -> Result<OpenSlot, Response> {
    let max = shared.config.limits.max_connections;
    let taken = shared
        .open
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
    match taken {
        Ok(_) => Ok(OpenSlot(shared.clone())),
        Err(n) => {
            shared
                .metrics
                .connection_limit
                .fetch_add(1, Ordering::Relaxed);
            shared.metrics.error(ErrorCode::TooManyConnections);
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                Json(ApiError::new(
                    ErrorCode::TooManyConnections,
                    format!(
                        "the broker has {n} open WebSockets, its limit (limits.max_connections = \
                         {max}); retry later, or ask the operator to raise the limit or add a broker"
                    ),
                )),
            )
                .into_response())
        }
    }
}

#[allow(clippy::result_large_err)]
fn admit(shared: &Arc<Shared>, ip: IpAddr) -> Result<UnauthGuard, Response> {
    let mut map = lock(&shared.unauth);
    let n = map.entry(ip).or_insert(0);
    if *n >= shared.config.limits.max_unauthenticated_per_ip {
        shared.metrics.unauth_limit.fetch_add(1, Ordering::Relaxed);
        shared.metrics.error(ErrorCode::TooManyConnections);
        return Err(http_error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyConnections,
            format!(
                "{} unauthenticated connections from {ip} already; authenticate them first",
                *n
            ),
        ));
    }
    *n += 1;
    Ok(UnauthGuard {
        shared: shared.clone(),
        ip,
    })
}

async fn agent_ws(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    upgrade(shared, addr, req, Role::Agent)
}

async fn relay_ws(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    upgrade(shared, addr, req, Role::Relay)
}

/// Checks the WebSocket upgrade, admits it (total and per-address limits), answers 101 and
/// runs the socket in `role` once hyper hands over the connection.
fn upgrade(shared: Arc<Shared>, addr: SocketAddr, mut req: Request, role: Role) -> Response {
    let accept = match ws::check_upgrade(req.headers()) {
        Ok(a) => a,
        Err(ws::UpgradeError::Version) => {
            return (
                StatusCode::UPGRADE_REQUIRED,
                [(header::SEC_WEBSOCKET_VERSION, "13")],
                Json(ApiError::new(
                    ErrorCode::BadMessage,
                    "this broker speaks WebSocket version 13 only",
                )),
            )
                .into_response()
        }
        Err(e) => {
            let what = match e {
                ws::UpgradeError::Key => "the upgrade has no usable Sec-WebSocket-Key",
                _ => {
                    "this endpoint is a WebSocket: send a GET with Connection: Upgrade and \
                      Upgrade: websocket"
                }
            };
            return http_error(StatusCode::BAD_REQUEST, ErrorCode::BadMessage, what);
        }
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return http_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadMessage,
            "this connection cannot be upgraded (HTTP/1.1 is required for WebSockets)",
        );
    };
    let slot = match open_slot(&shared) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let guard = match admit(&shared, addr.ip()) {
        Ok(g) => g,
        Err(r) => return r,
    };
    shared.metrics.ws_accepted.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => run_socket(shared, take_io(upgraded), guard, role, slot).await,
            Err(e) => tracing::debug!(%addr, error = %e, "WebSocket upgrade failed"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, "upgrade"),
            (header::UPGRADE, "websocket"),
            (header::SEC_WEBSOCKET_ACCEPT, accept.as_str()),
        ],
    )
        .into_response()
}

/// An upgraded connection, owned by its one task (which reads and writes it in turn, so it is
/// not split). Plain TCP (the common case behind a TLS-terminating proxy, and the benchmark)
/// and rustls TLS are taken back from hyper as they are; anything else stays hyper's.
enum Io {
    Tcp(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Other(Box<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>),
}

type Stream = ws::Reader<Io>;

/// The connection hyper upgraded, and the bytes it read past the upgrade request.
fn take_io(upgraded: hyper::upgrade::Upgraded) -> (Io, bytes::Bytes) {
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;
    use tokio_rustls::server::TlsStream;
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return (Io::Tcp(parts.io.into_inner()), parts.read_buf),
        Err(u) => u,
    };
    match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
        Ok(parts) => (Io::Tls(Box::new(parts.io.into_inner())), parts.read_buf),
        Err(u) => (Io::Other(Box::new(TokioIo::new(u))), bytes::Bytes::new()),
    }
}

macro_rules! each_io {
    ($self:ident, $io:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Tcp($io) => $e,
            Io::Tls($io) => $e,
            Io::Other($io) => $e,
        }
    };
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
            Io::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        each_io!(self, io => std::pin::Pin::new(io).poll_shutdown(cx))
    }
}

enum Hello {
    Agent(AgentHello),
    Relay(RelayHello),
}

/// What a read means for the API: a text message, the end (`Ok(None)`), or the error to send
/// before closing; `None` for a ping, which the caller answers.
fn text_of(
    read: Result<Option<ws::Incoming>, ws::ReadError>,
) -> Option<Result<Option<String>, ApiError>> {
    Some(match read {
        Ok(None) | Err(ws::ReadError::Io(_)) => Ok(None),
        Ok(Some(ws::Incoming::Text(t))) => Ok(Some(t)),
        Ok(Some(ws::Incoming::Ping(_))) => return None,
        Ok(Some(ws::Incoming::Binary)) => Err(ApiError::new(
            ErrorCode::BadMessage,
            "binary frames are not part of the API: send JSON text frames",
        )),
        Err(e @ ws::ReadError::TooLarge { .. }) => {
            Err(ApiError::new(ErrorCode::TooLarge, e.to_string()))
        }
        Err(e) => Err(ApiError::new(ErrorCode::BadMessage, e.to_string())),
    })
}

/// Polls for the next text message, handing pings to `pong`.
fn poll_text(
    stream: &mut Stream,
    cx: &mut std::task::Context<'_>,
    mut pong: impl FnMut(Box<[u8]>),
) -> std::task::Poll<Result<Option<String>, ApiError>> {
    loop {
        let read = std::task::ready!(stream.poll_next(cx));
        match read {
            Ok(Some(ws::Incoming::Ping(p))) => pong(p),
            read => {
                if let Some(text) = text_of(read) {
                    return std::task::Poll::Ready(text);
                }
            }
        }
    }
}

/// The next text message before authentication; pings are answered at once (RFC 6455 §5.5.2).
async fn next_text_answering_pings(stream: &mut Stream) -> Result<Option<String>, ApiError> {
    loop {
        match stream.next().await {
            Ok(Some(ws::Incoming::Ping(p))) => {
                if ws::write_frame(stream.get_mut(), ws::PONG, &p)
                    .await
                    .is_err()
                {
                    return Ok(None);
                }
            }
            read => {
                if let Some(text) = text_of(read) {
                    return text;
                }
            }
        }
    }
}

async fn send_direct(io: &mut Io, message: &BrokerMessage) -> bool {
    ws::write_frame(io, ws::TEXT, api::encode(message).as_bytes())
        .await
        .is_ok()
}

async fn fail(shared: &Shared, io: &mut Io, error: ApiError) {
    shared.metrics.error(error.code);
    let _ = send_direct(io, &BrokerMessage::Error(error)).await;
    let _ = ws::write_frame(io, ws::CLOSE, &[]).await;
}

/// Hello → challenge → auth. Returns the hello of an authenticated client.
async fn handshake(
    shared: &Shared,
    stream: &mut Stream,
    role: Role,
) -> Result<(Hello, bool), Option<ApiError>> {
    let max = shared.config.limits.max_message_bytes;
    let text = next_text_answering_pings(stream).await?.ok_or(None)?;
    let hello = match role {
        Role::Agent => match api::decode_agent(&text, max)? {
            AgentMessage::Hello(h) => Hello::Agent(h),
            _ => return Err(Some(unauthenticated())),
        },
        Role::Relay => match api::decode_relay(&text, max)? {
            RelayMessage::Hello(h) => Hello::Relay(h),
            _ => return Err(Some(unauthenticated())),
        },
    };
    let nonce: [u8; NONCE_LEN] = random();
    if !send_direct(
        stream.get_mut(),
        &BrokerMessage::Challenge(Challenge {
            nonce: hex::encode(&nonce),
        }),
    )
    .await
    {
        return Err(None);
    }
    let text = next_text_answering_pings(stream).await?.ok_or(None)?;
    let proof: AuthProof = match role {
        Role::Agent => match api::decode_agent(&text, max)? {
            AgentMessage::Auth(p) => p,
            _ => return Err(Some(unauthenticated())),
        },
        Role::Relay => match api::decode_relay(&text, max)? {
            RelayMessage::Auth(p) => p,
            _ => return Err(Some(unauthenticated())),
        },
    };
    let enrolled = match &hello {
        Hello::Agent(h) => shared.with_core(|c| c.authenticate_agent(h, &nonce, &proof, now())),
        Hello::Relay(h) => shared.with_core(|c| c.authenticate_relay(h, &nonce, &proof, now())),
    }?;
    Ok((hello, enrolled))
}

fn unauthenticated() -> ApiError {
    ApiError::new(
        ErrorCode::Unauthenticated,
        "send hello, then auth with the signed challenge, before anything else",
    )
}

/// A connection's message rate limit: a token bucket refilled at `rate` per second up to
/// `burst` (both from the config, not kept per connection).
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Self {
        Self {
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The largest message accepted before authentication (a hello or an auth proof is well
/// under 1 KiB).
const PRE_AUTH_MAX_MESSAGE: usize = 8 * 1024;

async fn run_socket(
    shared: Arc<Shared>,
    io: (Io, bytes::Bytes),
    guard: UnauthGuard,
    role: Role,
    slot: OpenSlot,
) {
    // The open connection gets a task of its own, sized for what it keeps: this one, sized
    // for the upgrade, the handshake and the welcome, ends here.
    if let Some(connection) = open(shared, io, guard, role, slot).await {
        tokio::spawn(connection.serve());
    }
}

/// What woke a connection's task.
enum Event {
    /// A message to send (`None`: the queue closed).
    Out(Option<Out>),
    /// A message received, the end, or the error to close with.
    In(Result<Option<String>, ApiError>),
}

/// An authenticated connection: what its task keeps for as long as it is open.
struct Connection {
    shared: Arc<Shared>,
    stream: Stream,
    conn: ConnId,
    queue: Arc<SendQueue>,
    role: Role,
    id: Box<str>,
    /// Counts against the broker's open-connection limit while the connection lives.
    _slot: OpenSlot,
}

/// Handshake, welcome and attachment; `None` when the client did not authenticate (it has
/// been told why).
async fn open(
    shared: Arc<Shared>,
    (io, read): (Io, bytes::Bytes),
    guard: UnauthGuard,
    role: Role,
    slot: OpenSlot,
) -> Option<Connection> {
    let limits = &shared.config.limits;
    // The hard limit is twice the message limit: messages in between get a clear `too_large`
    // error; larger ones end the connection.
    let hard = limits.max_message_bytes * 2;
    // Before authentication only a hello and an auth proof are expected: small messages.
    // Bytes hyper read past the upgrade request come first (copied: hyper's buffer is freed).
    let mut stream = ws::Reader::with_read(io, hard.min(PRE_AUTH_MAX_MESSAGE), &read);
    drop(read);
    let auth = tokio::time::timeout(
        Duration::from_secs(limits.auth_timeout_secs),
        handshake(&shared, &mut stream, role),
    )
    .await;
    let (hello, enrolled) = match auth {
        Ok(Ok(x)) => x,
        Ok(Err(Some(e))) => {
            fail(&shared, stream.get_mut(), e).await;
            return None;
        }
        Ok(Err(None)) => return None,
        Err(_) => {
            fail(
                &shared,
                stream.get_mut(),
                ApiError::new(
                    ErrorCode::Unauthenticated,
                    format!("not authenticated within {} s", limits.auth_timeout_secs),
                ),
            )
            .await;
            return None;
        }
    };
    drop(guard);
    stream.set_max(hard);
    shared.metrics.auth_ok.fetch_add(1, Ordering::Relaxed);
    // The welcome (and the rest of the relay map) is queued before the connection is attached
    // and marked online, so nothing can overtake it.
    let (conn, queue) = shared.new_conn();
    let max = limits.send_queue;
    match &hello {
        Hello::Agent(h) => {
            if enrolled {
                shared.metrics.enrolled.fetch_add(1, Ordering::Relaxed);
            }
            let keys = shared.keys.clone();
            shared.with_core(|c| {
                let welcome = c.welcome(&h.peer_id, enrolled, keys);
                let _ = queue.push(
                    Out::Text(api::encode(&BrokerMessage::Welcome(welcome))),
                    max,
                );
                let pages = c.relay_map_encoded();
                for i in 1..pages.len() {
                    let _ = queue.push(Out::Page(pages.clone(), i), max);
                }
                shared.attach(conn, queue.clone());
                c.agent_online(&h.peer_id, conn, h.auto_accept, now());
            });
        }
        Hello::Relay(h) => {
            let welcome = BrokerMessage::RelayWelcome(RelayWelcome {
                relay_id: h.relay_id.clone(),
                enrolled,
                load_interval_ms: shared.config.schedule.relay_load_interval_ms,
                ticket_keys: shared.keys.clone(),
            });
            let _ = queue.push(Out::Text(api::encode(&welcome)), max);
            shared.with_core(|c| {
                shared.attach(conn, queue.clone());
                c.relay_online(&h.relay_id, conn);
            });
        }
    }
    // Only the id outlives the welcome: the connection's task stays small.
    let (role, id): (Role, Box<str>) = match hello {
        Hello::Agent(h) => (Role::Agent, h.peer_id.into()),
        Hello::Relay(h) => (Role::Relay, h.relay_id.into()),
    };
    Some(Connection {
        shared,
        stream,
        conn,
        queue,
        role,
        id,
        _slot: slot,
    })
}

impl Connection {
    /// Not an `async fn`: its argument would be kept twice in the task (as the argument, and
    /// moved into the body), and this future is what every open connection costs.
    #[allow(clippy::manual_async_fn)]
    fn serve(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            // The whole connection is kept (an async block captures only the fields it uses,
            // and the open-connection slot must live as long as the task).
            let this = &mut self;
            let shared = &*this.shared;
            let (conn, role) = (this.conn, this.role);
            let limits = &shared.config.limits;
            let (rate, burst) = (
                f64::from(limits.messages_per_sec),
                f64::from(limits.message_burst.max(1)),
            );
            let mut bucket = Bucket::full(burst);
            // One task per connection: it waits on the send queue and the socket at once, in one
            // poll (both are cancellation-safe: the queue's waker is replaced on each poll, and the
            // reader keeps partial frames in its own state, nothing on the task). A write is
            // finished before reading goes on.
            let reader_ended = loop {
                let event = std::future::poll_fn(|cx| {
                    if let std::task::Poll::Ready(out) = this.queue.poll_pop(cx) {
                        return std::task::Poll::Ready(Event::Out(out));
                    }
                    poll_text(&mut this.stream, cx, |p| {
                        shared.send_out(conn, Out::Pong(p))
                    })
                    .map(Event::In)
                })
                .await;
                match event {
                    Event::Out(None) => {
                        let _ = ws::write_frame(this.stream.get_mut(), ws::CLOSE, &[]).await;
                        break false;
                    }
                    Event::Out(Some(Out::Close(e))) => {
                        close_with(this.stream.get_mut(), e).await;
                        break false;
                    }
                    Event::Out(Some(out)) => {
                        let (opcode, payload) = out.frame();
                        if ws::write_frame(this.stream.get_mut(), opcode, payload)
                            .await
                            .is_err()
                        {
                            break false;
                        }
                    }
                    Event::In(text) => {
                        let text = match text {
                            Ok(Some(t)) => t,
                            Ok(None) => break true,
                            Err(e) => {
                                shared.metrics.error(e.code);
                                shared.close(conn, e);
                                break true;
                            }
                        };
                        shared.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
                        if !bucket.take(rate, burst) {
                            shared.send_error(conn, crate::core::rate_limited(&text, limits));
                            continue;
                        }
                        match role {
                            Role::Agent => handle_agent(shared, conn, &this.id, &text),
                            Role::Relay => handle_relay(shared, conn, &this.id, &text),
                        }
                    }
                }
            };
            lock(&shared.conns).remove(&conn);
            this.queue.close();
            match role {
                Role::Agent => shared.with_core(|c| c.agent_offline(&this.id, conn, now())),
                Role::Relay => shared.with_core(|c| c.relay_offline(&this.id, conn)),
            }
            if reader_ended {
                flush(this.stream.get_mut(), &this.queue).await;
            }
        }
    }
}

/// The client stopped: flush what is queued (a final error), then close, within a second.
/// Boxed, and made outside the connection's future: rare, and a timer is large.
fn flush<'a>(
    io: &'a mut Io,
    queue: &'a SendQueue,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let flush = async {
            while let Some(out) = queue.pop().await {
                if !write_out(io, out).await {
                    return;
                }
            }
            let _ = ws::write_frame(io, ws::CLOSE, &[]).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    })
}

/// Writes one queued message; `false` when the connection is done (a write failed, or a final
/// error was sent and followed by a close frame).
async fn write_out(sink: &mut Io, out: Out) -> bool {
    if let Out::Close(e) = out {
        close_with(sink, e).await;
        return false;
    }
    let (opcode, payload) = out.frame();
    ws::write_frame(sink, opcode, payload).await.is_ok()
}

/// Sends a final error and a close frame. Boxed, and made outside the caller's future: rare,
/// and a message is large.
fn close_with(
    io: &mut Io,
    error: Box<ApiError>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
    Box::pin(async move {
        if send_direct(io, &BrokerMessage::Error(*error)).await {
            let _ = ws::write_frame(io, ws::CLOSE, &[]).await;
        }
    })
}

fn handle_agent(shared: &Shared, conn: ConnId, peer: &str, text: &str) {
    let message = match api::decode_agent(text, shared.config.limits.max_message_bytes) {
        Ok(m) => m,
        Err(e) => return shared.send_error(conn, e),
    };
    let t = now();
    match message {
        AgentMessage::Hello(_) | AgentMessage::Auth(_) => shared.send_error(
            conn,
            ApiError::new(ErrorCode::BadMessage, "already authenticated"),
        ),
        AgentMessage::Report(report) => match shared.with_core(|c| c.agent_report(peer, report, t))
        {
            Ok(paths) => {
                shared.metrics.reports.fetch_add(1, Ordering::Relaxed);
                shared.send(
                    conn,
                    &BrokerMessage::ReportAccepted(ReportAccepted { paths }),
                );
            }
            Err(e) => shared.send_error(conn, e),
        },
        AgentMessage::Connect(req) => connect(shared, conn, peer, &req, t),
        AgentMessage::OfferReply(reply) => {
            match shared.with_core(|c| c.offer_reply(peer, &reply, t)) {
                Ok(answered) => {
                    let d = Duration::from_millis(answered.round_trip_ms);
                    shared.metrics.offer_round_trip.observe(d);
                    if answered.answer_sent {
                        shared.metrics.connect_latency.observe(d);
                    }
                }
                Err(e) => shared.send_error(conn, e),
            }
        }
        AgentMessage::SessionEnded(ended) => {
            if let Err(e) = shared.with_core(|c| c.session_ended(peer, &ended, t)) {
                shared.send_error(conn, e);
            }
        }
    }
}

fn connect(shared: &Shared, conn: ConnId, peer: &str, req: &ConnectRequest, t: Timestamp) {
    let started = Instant::now();
    let session_id = SessionId(random());
    let plan = match shared.with_core(|c| c.connect(peer, conn, req, session_id, t)) {
        Ok(plan) => plan,
        Err(e) => return shared.send_error(conn, e),
    };
    let (ticket_a, ticket_b) = match (
        shared.signer.sign(&plan.ticket_a),
        shared.signer.sign(&plan.ticket_b),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return shared.send_error(
                conn,
                ApiError::new(ErrorCode::Internal, format!("signing failed: {e}"))
                    .for_request(req.request_id),
            )
        }
    };
    let answer = ConnectAnswer {
        request_id: req.request_id,
        session_id: session_id.to_string(),
        peer: req.to.clone(),
        relay_id: plan.ticket_a.relay_id.clone(),
        relay_tcp_addr: plan.relay_tcp_addr.clone(),
        relay_udp_addr: plan.relay_udp_addr.clone(),
        transport: req.transport,
        ticket: hex::encode(&ticket_a),
        expires_at: plan.ticket_a.expires_at,
        peer_key: plan.b_public_key,
    };
    let offer = Offer {
        session_id: session_id.to_string(),
        from: peer.to_owned(),
        relay_id: plan.ticket_b.relay_id.clone(),
        relay_tcp_addr: plan.relay_tcp_addr,
        relay_udp_addr: plan.relay_udp_addr,
        transport: req.transport,
        ticket: hex::encode(&ticket_b),
        expires_at: plan.ticket_b.expires_at,
        reply_expected: plan.reply_expected,
        service: req.service.clone(),
        peer_key: plan.a_public_key,
    };
    if plan.reply_expected {
        shared.with_core(|c| c.park_answer(session_id, answer));
        shared.send(plan.b_conn, &BrokerMessage::Offer(offer));
    } else {
        shared.send(plan.b_conn, &BrokerMessage::Offer(offer));
        shared.metrics.connects_ok.fetch_add(1, Ordering::Relaxed);
        shared.send(conn, &BrokerMessage::ConnectAnswer(answer));
        shared.metrics.connect_latency.observe(started.elapsed());
    }
}

fn handle_relay(shared: &Shared, conn: ConnId, relay: &str, text: &str) {
    let message = match api::decode_relay(text, shared.config.limits.max_message_bytes) {
        Ok(m) => m,
        Err(e) => return shared.send_error(conn, e),
    };
    match message {
        RelayMessage::Hello(_) | RelayMessage::Auth(_) => shared.send_error(
            conn,
            ApiError::new(ErrorCode::BadMessage, "already authenticated"),
        ),
        RelayMessage::Load(load) => match shared.with_core(|c| c.relay_load(relay, load, now())) {
            Ok(()) => {
                shared.metrics.load_reports.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => shared.send_error(conn, e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(out: Option<Out>) -> Option<String> {
        match out? {
            Out::Text(t) => Some(t),
            _ => panic!("not text"),
        }
    }

    #[tokio::test]
    async fn send_queue_is_bounded_drains_after_close_and_gives_memory_back() {
        let q = SendQueue::default();
        for i in 0..10 {
            assert!(q.push(Out::Text(i.to_string()), 10).is_ok());
        }
        assert!(matches!(
            q.push(Out::Text("x".into()), 10),
            Err(QueueError::Full)
        ));
        for i in 0..10 {
            assert_eq!(text(q.pop().await), Some(i.to_string()));
        }
        assert_eq!(
            lock(&q.state).items.capacity(),
            0,
            "an idle queue holds no allocation after a burst"
        );
        q.push(Out::Text("one".into()), 10).ok().unwrap();
        assert_eq!(text(q.pop().await).as_deref(), Some("one"));
        assert_eq!(
            lock(&q.state).items.capacity(),
            0,
            "an idle queue holds no allocation after one message"
        );
        q.push(Out::Text("last".into()), 10).ok().unwrap();
        q.close();
        assert!(matches!(
            q.push(Out::Text("late".into()), 10),
            Err(QueueError::Closed)
        ));
        assert_eq!(text(q.pop().await).as_deref(), Some("last"));
        assert!(q.pop().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_push_and_by_close() {
        let q = Arc::new(SendQueue::default());
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { (text(q.pop().await), q.pop().await.is_none()) }
        });
        tokio::task::yield_now().await;
        q.push(Out::Text("hi".into()), 10).ok().unwrap();
        tokio::task::yield_now().await;
        q.close();
        let (first, ended) = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(first.as_deref(), Some("hi"));
        assert!(ended);
    }
}
