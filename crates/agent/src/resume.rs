//! Resumable tunnels: a sequence/acknowledge layer over [`crate::tunnel`] so that a bridged
//! connection survives the loss of its relay and continues, without losing or repeating a
//! byte, over a new encrypted tunnel through another relay.
//!
//! # Protocol
//!
//! Stream bytes are numbered implicitly from 0 in each direction. Each side keeps every byte
//! it sent until the peer acknowledges it, in a [`ReplayBuffer`] of at most
//! [`ResumeConfig::max_replay`] bytes; when it is full, reading from the local connection
//! pauses (back-pressure), so memory stays bounded. A receiver acknowledges (tunnel frame type
//! `2`: bytes received, end of stream received) every [`ResumeConfig::ack_every`] bytes and on
//! the end of stream.
//!
//! Every tunnel (the first one, and each one after a relay failure) starts with both sides
//! sending an acknowledgement of what they hold. Each side then drops the acknowledged prefix
//! of its replay buffer and retransmits the rest, and the end-of-stream frame if the peer has
//! not seen it. A claimed position outside the replay buffer is an error
//! ([`ResumeError::CannotResume`]), never a silent gap.
//!
//! **Liveness.** A side that has sent no frame for [`ResumeConfig::keepalive`] sends an
//! acknowledgement of what it holds (a repeated acknowledgement is harmless), so an idle
//! tunnel still carries a frame each way every `keepalive`. A side that receives no frame for
//! [`ResumeConfig::dead_after`] counts the tunnel as failed ([`TunnelError::Silent`]) and
//! resumes: a relay or a path that drops everything without a reset is noticed in bounded
//! time instead of never.
//!
//! The session ends when both ends of stream have been sent, received and acknowledged; the
//! local connection is then half-closed in both directions and the tunnel shut down. A side
//! whose local connection fails sends an abort frame (best effort) so that the peer closes its
//! local connection at once instead of waiting for a resume ([`ResumeError::PeerAborted`]).
//!
//! Which stream a tunnel carries is settled inside its Noise handshake: the opening side's
//! payload is an [`Attach`] (a new stream, or the resumption of one, by a random id), the
//! accepting side's answer an [`AttachReply`].
//!
//! What fails for good instead of resuming: authentication failures and protocol errors (a
//! relay that tampers does not get another try in the same session), more than
//! [`ResumeConfig::max_resumes`] tunnel failures, and a failed reconnect. What this module
//! does not do: find the next relay or its tickets (the caller's `reconnect` does: the broker
//! picks, both agents dial), or resume after the agent process itself restarts.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::goodput::{self, Goodput};
use crate::tunnel::{Frame, Tunnel, TunnelError, READ_BUF, SMALL_BUF};

/// Length of a resume id.
pub const RESUME_ID_LEN: usize = 16;
/// Longest refusal reason carried in an [`AttachReply`], bytes.
pub const MAX_REFUSAL_LEN: usize = 120;
const ATTACH_VERSION: u8 = 1;

/// What the opening side of a tunnel asks for, in its handshake payload: a new stream that can
/// later be resumed under `id`, or the continuation of the stream `id`. The id is random and
/// only meaningful between the two peers the handshake authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// A new stream.
    New([u8; RESUME_ID_LEN]),
    /// The continuation of a stream whose tunnel broke.
    Resume([u8; RESUME_ID_LEN]),
}

impl Attach {
    /// The wire form: version, kind (0 new, 1 resume), id.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, id) = match self {
            Attach::New(id) => (0, id),
            Attach::Resume(id) => (1, id),
        };
        [&[ATTACH_VERSION, kind][..], id].concat()
    }

    /// Parses the wire form. Total.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        let Some((&[version, kind], id)) = b.split_first_chunk::<2>() else {
            return Err(
                "the opening side sent no attach request (an older agent? upgrade both)".into(),
            );
        };
        if version != ATTACH_VERSION {
            return Err(format!(
                "attach version {version} is not {ATTACH_VERSION}; upgrade both agents"
            ));
        }
        let id: [u8; RESUME_ID_LEN] = id
            .try_into()
            .map_err(|_| format!("attach id of {} bytes, not {RESUME_ID_LEN}", id.len()))?;
        match kind {
            0 => Ok(Attach::New(id)),
            1 => Ok(Attach::Resume(id)),
            k => Err(format!("unknown attach kind {k}")),
        }
    }
}

/// The accepting side's answer to an [`Attach`], in its handshake payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachReply {
    /// The tunnel carries the stream.
    Accepted,
    /// It does not, and why.
    Refused(String),
}

impl AttachReply {
    /// The wire form: `0`, or `1` and a UTF-8 reason cut to [`MAX_REFUSAL_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            AttachReply::Accepted => vec![0],
            AttachReply::Refused(why) => {
                let mut end = why.len().min(MAX_REFUSAL_LEN);
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                [&[1u8][..], &why.as_bytes()[..end]].concat()
            }
        }
    }

    /// Parses the wire form. Total.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        match b.split_first() {
            Some((0, [])) => Ok(AttachReply::Accepted),
            Some((1, why)) if why.len() <= MAX_REFUSAL_LEN => Ok(AttachReply::Refused(
                String::from_utf8_lossy(why).into_owned(),
            )),
            _ => Err("the accepting agent sent a malformed attach reply; upgrade both".into()),
        }
    }
}

/// Smallest replay buffer allowed.
pub const MIN_REPLAY: usize = 16 << 10;
/// Largest replay buffer allowed.
pub const MAX_REPLAY: usize = 64 << 20;

/// Why a resumable session failed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The tunnel failed in a way that is not retried (authentication, protocol).
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    /// The peer claims a position the replay buffer no longer (or never) covers.
    #[error(
        "cannot resume: the peer acknowledges byte {claimed}, but this side holds {base}..={end}"
    )]
    CannotResume {
        /// What the peer claimed.
        claimed: u64,
        /// First byte still held.
        base: u64,
        /// One past the last byte sent.
        end: u64,
    },
    /// The peer acknowledged an end of stream that was never sent.
    #[error("protocol error: the peer acknowledged an end of stream that was not sent")]
    BadAck,
    /// Too many tunnel failures.
    #[error("gave up after {attempts} tunnel failures; last: {last}")]
    GaveUp {
        /// Failures so far.
        attempts: u32,
        /// The last failure.
        last: TunnelError,
    },
    /// The caller's reconnect failed.
    #[error("reconnect after a tunnel failure failed: {0}")]
    Reconnect(TunnelError),
    /// Reading or writing the local connection failed.
    #[error("local connection error: {0}")]
    Local(std::io::Error),
    /// The peer gave up the stream (its local connection failed).
    #[error("the peer aborted the stream: {0}")]
    PeerAborted(String),
    /// A configuration value out of range.
    #[error("resume setting out of range: {0}")]
    Config(&'static str),
}

/// Settings of the resumable layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeConfig {
    /// Most unacknowledged bytes kept for retransmission, [`MIN_REPLAY`]..=[`MAX_REPLAY`].
    pub max_replay: usize,
    /// Acknowledge after this many bytes received, 1..=`max_replay / 2`.
    pub ack_every: usize,
    /// Most tunnel failures survived in one session.
    pub max_resumes: u32,
    /// Send a keepalive (an acknowledgement) after this long without sending a frame,
    /// [`MIN_KEEPALIVE`]..=`dead_after / 2`.
    pub keepalive: Duration,
    /// A tunnel that delivers no frame for this long has failed, at most [`MAX_DEAD_AFTER`].
    pub dead_after: Duration,
}

/// Shortest keepalive interval.
pub const MIN_KEEPALIVE: Duration = Duration::from_millis(50);
/// Longest silence allowed before a tunnel counts as failed.
pub const MAX_DEAD_AFTER: Duration = Duration::from_secs(3600);

impl Default for ResumeConfig {
    fn default() -> Self {
        Self {
            max_replay: 1 << 20,
            ack_every: 256 << 10,
            max_resumes: 8,
            keepalive: Duration::from_secs(1),
            dead_after: Duration::from_secs(4),
        }
    }
}

impl ResumeConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), ResumeError> {
        if !(MIN_REPLAY..=MAX_REPLAY).contains(&self.max_replay) {
            return Err(ResumeError::Config(
                "max_replay must be 16 KiB..=64 MiB (MIN_REPLAY..=MAX_REPLAY)",
            ));
        }
        if self.ack_every == 0 || self.ack_every > self.max_replay / 2 {
            return Err(ResumeError::Config("ack_every must be 1..=max_replay/2"));
        }
        if self.keepalive < MIN_KEEPALIVE
            || self.keepalive > self.dead_after / 2
            || self.dead_after > MAX_DEAD_AFTER
        {
            return Err(ResumeError::Config(
                "keepalive must be 50 ms..=dead_after/2 and dead_after at most 1 h",
            ));
        }
        Ok(())
    }
}

/// The bytes sent but not yet acknowledged, with their stream offsets. Sans-I/O.
#[derive(Debug)]
pub struct ReplayBuffer {
    base: u64,
    buf: VecDeque<u8>,
    cap: usize,
}

impl ReplayBuffer {
    /// An empty buffer holding at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            base: 0,
            buf: VecDeque::new(),
            cap,
        }
    }

    /// Bytes that can still be pushed.
    pub fn free(&self) -> usize {
        self.cap - self.buf.len()
    }

    /// Offset of the first byte held (everything before it is acknowledged).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// One past the offset of the last byte sent.
    pub fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Appends sent bytes; at most [`free`](Self::free) of them are kept, and the count kept
    /// is returned (the caller never pushes more than it checked).
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        self.buf.extend(&data[..n]);
        n
    }

    /// Drops everything before `upto`. Errors if `upto` lies outside `base..=end`.
    pub fn ack(&mut self, upto: u64) -> Result<(), ResumeError> {
        if upto < self.base || upto > self.end() {
            return Err(ResumeError::CannotResume {
                claimed: upto,
                base: self.base,
                end: self.end(),
            });
        }
        let n = (upto - self.base) as usize;
        self.buf.drain(..n);
        self.base = upto;
        Ok(())
    }

    /// A copy of everything held (to retransmit after [`ack`](Self::ack)).
    pub fn pending(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }
}

/// Both directions' positions. Sans-I/O.
#[derive(Debug)]
struct State {
    replay: ReplayBuffer,
    end_queued: bool,
    end_acked: bool,
    received: u64,
    end_received: bool,
    acked_sent: u64,
    end_ack_sent: bool,
    ack_every: u64,
    local_failed: Option<std::io::ErrorKind>,
    goodput: Goodput,
}

impl State {
    fn ack_due(&mut self) -> Option<(u64, bool)> {
        let due = self.received - self.acked_sent >= self.ack_every
            || (self.end_received && !self.end_ack_sent);
        due.then(|| {
            self.acked_sent = self.received;
            self.end_ack_sent = self.end_received;
            (self.received, self.end_received)
        })
    }

    fn on_ack(&mut self, received: u64, end: bool) -> Result<(), ResumeError> {
        self.replay.ack(received)?;
        if end {
            if !self.end_queued || received != self.replay.end() {
                return Err(ResumeError::BadAck);
            }
            self.end_acked = true;
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.end_acked && self.end_received && self.end_ack_sent
    }
}

/// What a resumable bridge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumeStats {
    /// Stream bytes from the local connection delivered to the peer.
    pub sent: u64,
    /// Stream bytes from the peer written to the local connection.
    pub received: u64,
    /// Tunnels used after the first.
    pub resumes: u32,
    /// Bytes sent a second time after a resume.
    pub retransmitted: u64,
    /// Goodput in kbit/s over the time data was flowing, of the faster direction; `None` when
    /// the stream moved too little to measure (see [`crate::goodput`]).
    pub goodput_kbps: Option<u64>,
}

/// Writes `chunks` to `w` in order, several per call (`write_vectored`, no gathering copy)
/// when the stream takes vectored writes, else one `write_all` each. Empties `chunks`.
async fn write_gathered<W: AsyncWrite + Unpin>(
    w: &mut W,
    chunks: &mut Vec<Vec<u8>>,
) -> std::io::Result<()> {
    if chunks.len() == 1 || !w.is_write_vectored() {
        for c in chunks.drain(..) {
            w.write_all(&c).await?;
        }
        return Ok(());
    }
    // `first` is the first chunk not fully written, `off` how much of it was.
    let (mut first, mut off) = (0, 0);
    while first < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[first..]
            .iter()
            .enumerate()
            .map(|(k, c)| std::io::IoSlice::new(if k == 0 { &c[off..] } else { c }))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = chunks[first].len() - off;
            if n >= left {
                (first, off) = (first + 1, 0);
                n -= left;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    chunks.clear();
    Ok(())
}

/// Decrypted chunks queued for the local connection's writer (each at most a frame's data).
const LOCAL_QUEUE: usize = 8;

fn fatal(e: &TunnelError) -> bool {
    matches!(
        e,
        TunnelError::AuthenticationFailed | TunnelError::Protocol(_) | TunnelError::Setup(_)
    )
}

/// Bridges `local` to the peer over `first`, and over a new tunnel from `reconnect(attempt)`
/// each time the current one fails, until both directions have ended (see the module docs).
///
/// Both agents must run this with the same `cfg.max_replay` or larger on the sending side
/// than anything the peer may need; `reconnect` must produce a tunnel to the same peer (both
/// sides dial the new relay and handshake).
pub async fn resumable_bridge<L, S, F, Fut>(
    local: L,
    first: Tunnel<S>,
    reconnect: F,
    cfg: &ResumeConfig,
) -> Result<ResumeStats, ResumeError>
where
    L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<Tunnel<S>, TunnelError>>,
{
    resumable_bridge_preemptible(local, first, reconnect, std::future::pending, cfg).await
}

/// [`resumable_bridge`], where `preempt()` may also yield a new tunnel while the current one
/// still looks alive: the current one is then dropped (it counts as a failure) and the session
/// continues on the new one. This is the accepting side's view: the peer that opened the
/// tunnel knows first that it broke (a relay that vanishes without closing its connections
/// leaves this side waiting), and its new tunnel is the proof.
pub async fn resumable_bridge_preemptible<L, S, F, Fut, P, PFut>(
    local: L,
    first: Tunnel<S>,
    mut reconnect: F,
    mut preempt: P,
    cfg: &ResumeConfig,
) -> Result<ResumeStats, ResumeError>
where
    L: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<Tunnel<S>, TunnelError>>,
    P: FnMut() -> PFut,
    PFut: Future<Output = Tunnel<S>>,
{
    cfg.validate()?;
    let (mut lr, mut lw) = tokio::io::split(local);
    let state = Arc::new(Mutex::new(State {
        replay: ReplayBuffer::new(cfg.max_replay),
        end_queued: false,
        end_acked: false,
        received: 0,
        end_received: false,
        acked_sent: 0,
        end_ack_sent: false,
        ack_every: cfg.ack_every as u64,
        local_failed: None,
        goodput: Goodput::default(),
    }));
    let notify = Arc::new(Notify::new());
    // The local writer lives across tunnels, so a cancelled tunnel never leaves a chunk half
    // written: a chunk counts as received once it is in this channel.
    // It writes every chunk that is ready with one call.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(LOCAL_QUEUE);
    let mut tx = Some(tx);
    let (st2, n2) = (state.clone(), notify.clone());
    let writer = tokio::spawn(async move {
        let mut ready = Vec::with_capacity(LOCAL_QUEUE);
        while rx.recv_many(&mut ready, LOCAL_QUEUE).await > 0 {
            let result = write_gathered(&mut lw, &mut ready).await;
            if let Err(e) = result {
                st2.lock().unwrap_or_else(|p| p.into_inner()).local_failed = Some(e.kind());
                n2.notify_one();
                return Err(e);
            }
        }
        lw.shutdown().await
    });
    let mut stats = ResumeStats::default();
    let mut tunnel = first;
    let mut failures = 0u32;
    let outcome = loop {
        let run = run_tunnel(tunnel, &mut lr, &mut tx, &state, &notify, &mut stats, cfg);
        let result = tokio::select! {
            r = run => r,
            newer = preempt() => {
                failures += 1;
                if failures > cfg.max_resumes {
                    break Err(ResumeError::GaveUp {
                        attempts: failures,
                        last: TunnelError::Resume("the peer replaced the tunnel".into()),
                    });
                }
                tracing::info!(attempt = failures, "the peer resumed on a new tunnel");
                tunnel = newer;
                stats.resumes += 1;
                continue;
            }
        };
        match result {
            Ok(()) => break Ok(()),
            Err(ResumeError::Tunnel(e)) if !fatal(&e) => {
                failures += 1;
                if failures > cfg.max_resumes {
                    break Err(ResumeError::GaveUp {
                        attempts: failures,
                        last: e,
                    });
                }
                tracing::info!(error = %e, attempt = failures, "tunnel lost; resuming on a new one");
                match reconnect(failures).await {
                    Ok(t) => tunnel = t,
                    Err(e) => break Err(ResumeError::Reconnect(e)),
                }
                stats.resumes += 1;
            }
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = outcome {
        // Do not half-close the local connection as if the stream had ended.
        writer.abort();
        return Err(e);
    }
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ResumeError::Local(e)),
        Err(e) => return Err(ResumeError::Local(std::io::Error::other(e))),
    }
    let st = state.lock().unwrap_or_else(|p| p.into_inner());
    stats.sent = st.replay.end();
    stats.received = st.received;
    stats.goodput_kbps = st.goodput.kbps(goodput::MIN_BYTES);
    Ok(stats)
}

async fn run_tunnel<R, S>(
    tunnel: Tunnel<S>,
    lr: &mut R,
    tx: &mut Option<mpsc::Sender<Vec<u8>>>,
    state: &Arc<Mutex<State>>,
    notify: &Arc<Notify>,
    stats: &mut ResumeStats,
    cfg: &ResumeConfig,
) -> Result<(), ResumeError>
where
    R: AsyncRead + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let (mut tr, mut tw) = tunnel.split();
    // Every frame from the peer within `dead_after`, or the tunnel has failed.
    let dead_after = cfg.dead_after;
    macro_rules! recv_live {
        () => {
            match tokio::time::timeout(dead_after, tr.recv_frame()).await {
                Ok(r) => r,
                Err(_) => Err(TunnelError::Silent(dead_after)),
            }
        };
    }
    // 1. Tell the peer what we hold; learn what it holds.
    let (received, end_received) = {
        let mut st = lock();
        st.acked_sent = st.received;
        st.end_ack_sent = st.end_received;
        (st.received, st.end_received)
    };
    tw.send_ack(received, end_received).await?;
    let (peer_received, peer_end) = match recv_live!()? {
        Frame::Ack { received, end } => (received, end),
        Frame::Abort(why) => return Err(ResumeError::PeerAborted(why.to_owned())),
        _ => {
            return Err(TunnelError::Protocol(
                "a resumed tunnel must start with an acknowledgement",
            )
            .into())
        }
    };
    // 2. Retransmit what the peer lacks.
    let (retransmit, resend_end) = {
        let mut st = lock();
        st.replay.ack(peer_received)?;
        if peer_end {
            st.on_ack(peer_received, true)?;
        }
        (st.replay.pending(), st.end_queued && !peer_end)
    };
    stats.retransmitted += retransmit.len() as u64;
    // 3. Run both directions until done or the tunnel fails. The retransmission is the first
    // thing the sending direction does, so that both sides read while they retransmit.
    let up = async {
        tw.send(&retransmit).await?;
        drop(retransmit);
        if resend_end {
            tw.send_end().await?;
        }
        let mut buf = vec![0u8; SMALL_BUF];
        let mut last_sent = Instant::now();
        loop {
            let (ack, free, end_queued, done, local_failed) = {
                let mut st = lock();
                (
                    st.ack_due(),
                    st.replay.free().min(buf.len()),
                    st.end_queued,
                    st.done(),
                    st.local_failed,
                )
            };
            if let Some(kind) = local_failed {
                let e = std::io::Error::from(kind);
                let _ = tw
                    .send_abort(&format!("its local connection failed: {e}"))
                    .await;
                return Err(ResumeError::Local(e));
            }
            if let Some((r, e)) = ack {
                tw.send_ack(r, e).await?;
                last_sent = Instant::now();
                continue;
            }
            if done {
                // Graceful close: the peer is done too once it has our last acknowledgement.
                let _ = tw.shutdown().await;
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = notify.notified() => {}
                _ = tokio::time::sleep_until((last_sent + cfg.keepalive).into()) => {
                    // Keepalive: what we hold, again.
                    let (r, e) = {
                        let mut st = lock();
                        st.acked_sent = st.received;
                        st.end_ack_sent = st.end_received;
                        (st.received, st.end_received)
                    };
                    tw.send_ack(r, e).await?;
                    last_sent = Instant::now();
                }
                r = lr.read(&mut buf[..free]), if !end_queued && free > 0 => {
                    let n = match r {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tw.send_abort(&format!("its local connection failed: {e}")).await;
                            return Err(ResumeError::Local(e));
                        }
                    };
                    if n == buf.len() && n < READ_BUF {
                        buf.resize(READ_BUF, 0); // a bulk stream: several frames per call
                    }
                    if n == 0 {
                        lock().end_queued = true;
                        tw.send_end().await?;
                    } else {
                        lock().replay.push(&buf[..n]);
                        tw.send(&buf[..n]).await?;
                        lock().goodput.sent.record(Instant::now(), n as u64);
                    }
                    last_sent = Instant::now();
                }
            }
        }
    };
    let down = async {
        loop {
            match recv_live!() {
                Ok(Frame::Data(d)) => {
                    if lock().end_received {
                        return Err(TunnelError::Protocol("data after end of stream").into());
                    }
                    let Some(t) = tx.as_ref() else {
                        return Err(TunnelError::Protocol("data after end of stream").into());
                    };
                    let len = d.len() as u64;
                    if t.send(d.to_vec()).await.is_err() {
                        return Err(ResumeError::Local(std::io::ErrorKind::BrokenPipe.into()));
                    }
                    let mut st = lock();
                    st.received += len;
                    st.goodput.received.record(Instant::now(), len);
                }
                Ok(Frame::End) => {
                    lock().end_received = true;
                    *tx = None;
                }
                Ok(Frame::Ack { received, end }) => lock().on_ack(received, end)?,
                Ok(Frame::Abort(why)) => return Err(ResumeError::PeerAborted(why.to_owned())),
                // The peer closes once it is done; if we are done too, that is the end.
                Err(e) if lock().done() => {
                    tracing::debug!(error = %e, "tunnel closed after completion");
                    notify.notify_one();
                    std::future::pending::<()>().await;
                }
                Err(e) => return Err(ResumeError::from(e)),
            }
            notify.notify_one();
        }
    };
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectored writes of queued chunks over a real socket, with partial writes (more than
    /// the socket buffers hold at once), deliver every byte in order.
    #[tokio::test]
    async fn gathered_writes_survive_partial_writes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut chunks: Vec<Vec<u8>> = (0..LOCAL_QUEUE)
            .map(|i| (0..65_000 + i * 7).map(|k| (k * 31 + i) as u8).collect())
            .collect();
        let want: Vec<u8> = chunks.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        for _ in 0..8 {
            let mut round = chunks.clone();
            write_gathered(&mut client, &mut round).await.unwrap();
            assert!(round.is_empty());
        }
        client.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), want.len() * 8);
        assert!(got.chunks(want.len()).all(|c| c == want.as_slice()));
        chunks.clear();
    }

    #[test]
    fn replay_buffer_bounds_and_acks() {
        let mut b = ReplayBuffer::new(10);
        assert_eq!(b.push(b"hello"), 5);
        assert_eq!(b.push(b"world!!"), 5);
        assert_eq!(b.free(), 0);
        assert_eq!(b.end(), 10);
        b.ack(3).unwrap();
        assert_eq!(b.pending(), b"loworld");
        assert!(matches!(
            b.ack(2),
            Err(ResumeError::CannotResume {
                claimed: 2,
                base: 3,
                end: 10
            })
        ));
        assert!(matches!(b.ack(11), Err(ResumeError::CannotResume { .. })));
        b.ack(10).unwrap();
        assert!(b.pending().is_empty());
        assert_eq!((b.base(), b.free()), (10, 10));
    }

    #[test]
    fn acks_are_due_by_count_and_at_end() {
        let mut s = State {
            replay: ReplayBuffer::new(100),
            end_queued: false,
            end_acked: false,
            received: 0,
            end_received: false,
            acked_sent: 0,
            end_ack_sent: false,
            ack_every: 10,
            local_failed: None,
            goodput: Goodput::default(),
        };
        s.received = 9;
        assert_eq!(s.ack_due(), None);
        s.received = 10;
        assert_eq!(s.ack_due(), Some((10, false)));
        assert_eq!(s.ack_due(), None);
        s.received = 12;
        s.end_received = true;
        assert_eq!(s.ack_due(), Some((12, true)));
        assert!(!s.done());
        // An end acknowledgement for an end never sent is refused.
        assert!(matches!(s.on_ack(0, true), Err(ResumeError::BadAck)));
        s.replay.push(b"abc");
        s.end_queued = true;
        assert!(matches!(s.on_ack(2, true), Err(ResumeError::BadAck)));
        s.on_ack(3, true).unwrap();
        assert!(s.done());
    }

    #[test]
    fn attach_payloads_round_trip_and_reject_junk() {
        for a in [Attach::New([7; 16]), Attach::Resume([9; 16])] {
            assert_eq!(Attach::decode(&a.encode()), Ok(a));
        }
        assert!(Attach::decode(&[])
            .unwrap_err()
            .contains("no attach request"));
        assert!(Attach::decode(&[2, 0]).unwrap_err().contains("version 2"));
        assert!(Attach::decode(&[1, 0, 1]).unwrap_err().contains("1 bytes"));
        let mut bad = Attach::New([0; 16]).encode();
        bad[1] = 5;
        assert!(Attach::decode(&bad).unwrap_err().contains("kind 5"));
        for r in [AttachReply::Accepted, AttachReply::Refused("gone".into())] {
            assert_eq!(AttachReply::decode(&r.encode()), Ok(r));
        }
        let long = AttachReply::Refused("é".repeat(100)).encode();
        assert!(long.len() <= 1 + MAX_REFUSAL_LEN);
        assert!(
            matches!(AttachReply::decode(&long), Ok(AttachReply::Refused(w)) if w.len() == 120)
        );
        assert!(AttachReply::decode(&[]).is_err());
        assert!(AttachReply::decode(&[0, 1]).is_err());
        assert!(AttachReply::decode(&[1; 200]).is_err());
    }

    #[test]
    fn config_bounds() {
        assert!(ResumeConfig::default().validate().is_ok());
        let bad = ResumeConfig {
            ack_every: 0,
            ..ResumeConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ResumeConfig {
            max_replay: 10,
            ..ResumeConfig::default()
        };
        assert!(bad.validate().is_err());
        for (keepalive, dead_after) in [(10, 4000), (3000, 4000), (1000, 4_000_000)] {
            let bad = ResumeConfig {
                keepalive: Duration::from_millis(keepalive),
                dead_after: Duration::from_millis(dead_after),
                ..ResumeConfig::default()
            };
            assert!(bad.validate().is_err(), "{keepalive} {dead_after}");
        }
    }
}
