//! End-to-end encrypted tunnel between two agents over a relayed byte stream, and the bridge
//! between such a tunnel and a local TCP connection (the user's application on the initiating
//! side, the exposed service on the accepting side).
//!
//! # Protocol
//!
//! Once the relay has paired the two sides, the stream carries only **frames**: a length
//! (u16, big-endian) and that many bytes, at most [`MAX_FRAME_LEN`]. A frame shorter than
//! [`MIN_FRAME_LEN`] or longer than the maximum is a protocol error; nothing larger is ever
//! buffered.
//!
//! 1. Handshake: Noise `Noise_KK_25519_ChaChaPoly_BLAKE2s` ([`NOISE_PARAMS`]). Both agents know
//!    their own static key and the other's public static key (the ones the broker vouches for),
//!    so the handshake is two messages (initiator → responder, responder → initiator), and it
//!    fails on either side if the other does not hold the expected key. The Noise prologue is
//!    `b"steelyard-tunnel/1"` followed by a caller-chosen binding (the session id), so a relay
//!    cannot splice a handshake from one session into another. Each handshake message may
//!    carry a short payload ([`Tunnel::handshake_with`]); the agent daemon uses it to attach a
//!    tunnel to a new or a resumed stream (see [`crate::resume::Attach`]).
//! 2. Transport: every frame is one ChaCha20-Poly1305 message with an implicit nonce (the frame
//!    counter of its direction). Its plaintext is a type byte then data: `0` = data (at most
//!    [`MAX_CHUNK`] bytes), `1` = end of stream (no data; the sender will send nothing more),
//!    `2` = acknowledgement (u64 bytes received, u8 end of stream received), `3` = abort (a
//!    UTF-8 reason of at most [`MAX_ABORT_REASON`] bytes); `2` and `3` are used only by the
//!    resumable layer in [`crate::resume`] and are errors in a plain tunnel.
//!
//! # I/O
//!
//! Each half batches its system calls: the reader reads up to [`READ_BUF`] bytes at a time and
//! decrypts every whole frame in them (no unbuffered 2-byte length reads), and the writer
//! encrypts all the frames of one [`TunnelWriter::send`] into one buffer (flushed every
//! [`WRITE_BATCH`] bytes) and writes it with one call. [`bridge`] reads up to [`READ_BUF`]
//! bytes from the local side at a time, so a busy stream moves four full frames per syscall.
//! All these buffers start at [`SMALL_BUF`] and grow only for a stream that moves large frames.
//! Memory per tunnel end, bounded: the reader holds [`READ_BUF`] + [`MAX_FRAME_LEN`] bytes,
//! the writer at most [`WRITE_BATCH`] + 2 + [`MAX_FRAME_LEN`] + [`MAX_CHUNK`] (≈ 0.9 MiB in all,
//! touched only as a stream's traffic needs it).
//!
//! The relay sees only lengths and ciphertext. Any change to a frame, a dropped, repeated or
//! reordered frame, fails authentication ([`TunnelError::AuthenticationFailed`]); a stream that
//! ends without the peer's authenticated end-of-stream frame is
//! [`TunnelError::Truncated`], so a relay cannot cut a transfer short unnoticed.
//!
//! # Half-close
//!
//! [`bridge`] copies both ways at once. When the local side stops sending (EOF), it sends the
//! end frame and shuts down the write half of the relayed stream; when the peer's end frame
//! arrives it shuts down the write half of the local connection. The bridge returns once both
//! directions are done, or at the first error (dropping both connections).
//!
//! What this module does not do: dial the relay (see `steelyard_relay::client`), obtain or
//! check keys against the broker, rekey (a tunnel carries at most 2^64 frames per direction),
//! pad lengths, or resume on another relay (that is [`crate::resume`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use snow::{params::NoiseParams, Builder, StatelessTransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";
/// Prologue prefix; the caller's binding follows it.
pub const PROLOGUE_PREFIX: &[u8] = b"steelyard-tunnel/1";
/// Longest frame body on the wire (the Noise message limit).
pub const MAX_FRAME_LEN: usize = 65535;
/// Shortest transport frame body: the type byte and the 16-byte tag.
pub const MIN_FRAME_LEN: usize = 1 + TAG_LEN;
/// Most plaintext bytes in one data frame: a whole Noise message less the type byte and the
/// tag, so a frame is as large as the protocol allows (fewer frames, fewer tags, fewer calls).
pub const MAX_CHUNK: usize = MAX_FRAME_LEN - 1 - TAG_LEN;
/// Bytes a [`TunnelReader`] reads from the relayed stream at once (several frames per read
/// call; the last frame may be partial and is completed by the next read).
pub const READ_BUF: usize = 256 * 1024;
/// Encrypted bytes a [`TunnelWriter`] gathers before one write call (several frames per write).
pub const WRITE_BATCH: usize = 256 * 1024;
/// Size the buffers of a tunnel start at: they grow to [`READ_BUF`] / [`WRITE_BATCH`] only
/// when a frame larger than this passes, so a tunnel carrying small messages (an interactive
/// session, a connect-and-echo) never allocates, zeroes and faults in the large ones.
pub const SMALL_BUF: usize = 16 * 1024;
/// Most bytes of a handshake payload ([`Tunnel::handshake_with`]).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 128;
/// Length of a static public or private key.
pub const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const FRAME_DATA: u8 = 0;
const FRAME_END: u8 = 1;
const FRAME_ACK: u8 = 2;
const FRAME_ABORT: u8 = 3;
/// Longest reason in an abort frame, bytes.
pub const MAX_ABORT_REASON: usize = 200;

/// One decrypted frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Stream bytes (never empty).
    Data(&'a [u8]),
    /// The peer will send no more stream bytes.
    End,
    /// The peer has received `received` stream bytes, and the end of stream if `end`.
    Ack {
        /// Stream bytes received.
        received: u64,
        /// Whether the end of stream was received.
        end: bool,
    },
    /// The peer gives up the stream for the reason given (resumable layer): do not wait for
    /// it to resume.
    Abort(&'a str),
}

/// Why a tunnel failed.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A socket error.
    #[error("tunnel I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The Noise handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The handshake did not finish in time.
    #[error("handshake failed: no answer from the peer within {0:?}")]
    HandshakeTimeout(Duration),
    /// A frame did not decrypt: it was altered, dropped, repeated or reordered on the way.
    #[error("authentication failed: a frame from the peer did not verify (the relay or the network altered the stream); tunnel closed")]
    AuthenticationFailed,
    /// The stream ended without the peer's authenticated end of stream.
    #[error(
        "tunnel truncated: the relayed stream ended before the peer's authenticated end of stream"
    )]
    Truncated,
    /// A frame header or a decrypted frame that breaks the protocol.
    #[error("tunnel protocol error: {0}")]
    Protocol(&'static str),
    /// A key has the wrong length or the crypto library refused a setting.
    #[error("tunnel setup error: {0}")]
    Setup(String),
    /// A broken tunnel could not be replaced (resumable layer): what was tried and why it failed.
    #[error("{0}")]
    Resume(String),
    /// No frame from the peer for this long, keepalives included (resumable layer): the relay
    /// or the path went silent.
    #[error(
        "no frame from the peer for {0:?} (keepalives included): the relay or the path went silent"
    )]
    Silent(Duration),
    /// Sending after the end of stream was sent.
    #[error("tunnel already finished sending")]
    Finished,
}

/// A static X25519 key pair.
#[derive(Clone)]
pub struct StaticKeypair {
    /// The private key.
    pub private: [u8; KEY_LEN],
    /// The public key.
    pub public: [u8; KEY_LEN],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StaticKeypair {{ public: {:02x?}, private: <hidden> }}",
            self.public
        )
    }
}

fn params() -> Result<NoiseParams, TunnelError> {
    NOISE_PARAMS
        .parse()
        .map_err(|e| TunnelError::Setup(format!("{e:?}")))
}

impl StaticKeypair {
    /// A new random key pair from the OS random source.
    pub fn generate() -> Result<Self, TunnelError> {
        let kp = Builder::new(params()?)
            .generate_keypair()
            .map_err(|e| TunnelError::Setup(format!("key generation: {e}")))?;
        let mut out = Self {
            private: [0; KEY_LEN],
            public: [0; KEY_LEN],
        };
        out.private.copy_from_slice(&kp.private);
        out.public.copy_from_slice(&kp.public);
        Ok(out)
    }
}

/// Which end of the handshake this agent plays. The side that asked the broker for the
/// connection (ticket side A) initiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the first handshake message.
    Initiator,
    /// Answers it.
    Responder,
}

/// What a tunnel endpoint needs to know.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Initiator or responder.
    pub role: Role,
    /// This agent's static key pair.
    pub local: StaticKeypair,
    /// The peer's static public key, as the broker vouches for it.
    pub remote_public: [u8; KEY_LEN],
    /// Bytes both sides bind the handshake to (the session id), appended to the prologue.
    pub binding: Vec<u8>,
    /// Longest time the handshake may take.
    pub handshake_timeout: Duration,
}

/// Decodes a frame header: the body length, or an error if it is out of range. Total.
pub fn decode_frame_len(header: [u8; 2], min: usize) -> Result<usize, TunnelError> {
    let len = usize::from(u16::from_be_bytes(header));
    if len < min {
        return Err(TunnelError::Protocol(
            "frame shorter than its authentication tag",
        ));
    }
    Ok(len)
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    min: usize,
) -> Result<Option<usize>, TunnelError> {
    let mut hdr = [0u8; 2];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = decode_frame_len(hdr, min)?;
    buf.resize(len, 0);
    match r.read_exact(&mut buf[..len]).await {
        Ok(_) => Ok(Some(len)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(TunnelError::Truncated),
        Err(e) => Err(e.into()),
    }
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), TunnelError> {
    w.write_all(frame).await?;
    Ok(())
}

/// An established tunnel over stream `S`.
pub struct Tunnel<S> {
    stream: S,
    crypto: Arc<StatelessTransportState>,
    remote_static: [u8; KEY_LEN],
}

impl<S> std::fmt::Debug for Tunnel<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tunnel {{ remote_static: {:02x?} }}", self.remote_static)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Tunnel<S> {
    /// Runs the Noise KK handshake over `stream` (already paired by the relay) within
    /// `cfg.handshake_timeout`.
    pub async fn handshake(stream: S, cfg: &TunnelConfig) -> Result<Self, TunnelError> {
        Self::handshake_with(stream, cfg, &[], |_| async { Vec::new() })
            .await
            .map(|(t, _)| t)
    }

    /// [`handshake`](Self::handshake), carrying one payload of at most
    /// [`MAX_HANDSHAKE_PAYLOAD`] bytes each way inside the two handshake messages (encrypted
    /// and authenticated like the handshake; no extra round trip). The initiator sends
    /// `payload`; the responder answers with what `respond(initiator's payload)` yields (its
    /// own `payload` is unused), within the handshake timeout. Returns the tunnel and the
    /// peer's payload.
    pub async fn handshake_with<F, Fut>(
        mut stream: S,
        cfg: &TunnelConfig,
        payload: &[u8],
        respond: F,
    ) -> Result<(Self, Vec<u8>), TunnelError>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: Future<Output = Vec<u8>>,
    {
        let timeout = cfg.handshake_timeout;
        let inner = Self::handshake_inner(&mut stream, cfg, payload, respond);
        match tokio::time::timeout(timeout, inner).await {
            Err(_) => Err(TunnelError::HandshakeTimeout(timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok((crypto, theirs))) => Ok((
                Self {
                    stream,
                    crypto: Arc::new(crypto),
                    remote_static: cfg.remote_public,
                },
                theirs,
            )),
        }
    }

    async fn handshake_inner<F, Fut>(
        stream: &mut S,
        cfg: &TunnelConfig,
        payload: &[u8],
        respond: F,
    ) -> Result<(StatelessTransportState, Vec<u8>), TunnelError>
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: Future<Output = Vec<u8>>,
    {
        let mut prologue = PROLOGUE_PREFIX.to_vec();
        prologue.extend_from_slice(&cfg.binding);
        let builder = Builder::new(params()?)
            .local_private_key(&cfg.local.private)
            .remote_public_key(&cfg.remote_public)
            .prologue(&prologue);
        let setup = |e: snow::Error| TunnelError::Setup(e.to_string());
        let mut hs = match cfg.role {
            Role::Initiator => builder.build_initiator().map_err(setup)?,
            Role::Responder => builder.build_responder().map_err(setup)?,
        };
        let mut msg = vec![0u8; 2 + 256];
        let mut theirs = vec![0u8; 256];
        let mut theirs_len = 0;
        let mut respond = Some(respond);
        let mut buf = Vec::new();
        let mut my_turn = cfg.role == Role::Initiator;
        while !hs.is_handshake_finished() {
            if my_turn {
                let ours = match (cfg.role, respond.take()) {
                    (Role::Responder, Some(f)) => f(theirs[..theirs_len].to_vec()).await,
                    _ => payload.to_vec(),
                };
                if ours.len() > MAX_HANDSHAKE_PAYLOAD {
                    return Err(TunnelError::Setup(format!(
                        "handshake payload of {} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}",
                        ours.len()
                    )));
                }
                let n = hs.write_message(&ours, &mut msg[2..]).map_err(setup)?;
                msg[..2].copy_from_slice(&(n as u16).to_be_bytes());
                write_frame(stream, &msg[..2 + n]).await?;
                stream.flush().await?;
            } else {
                let n = match read_frame(stream, &mut buf, 1).await {
                    Ok(Some(n)) => n,
                    Ok(None) | Err(TunnelError::Truncated) => {
                        return Err(TunnelError::Handshake(
                            "the peer closed the connection during the handshake (it may not \
                             accept our static key)"
                                .into(),
                        ))
                    }
                    Err(e) => return Err(e),
                };
                if n > 256 {
                    return Err(TunnelError::Handshake("handshake message too long".into()));
                }
                theirs_len = hs.read_message(&buf[..n], &mut theirs).map_err(|e| {
                    TunnelError::Handshake(match e {
                        snow::Error::Decrypt => "the peer's handshake message did not verify: it \
                                                 does not hold the static key we expect, or the \
                                                 relay altered the handshake"
                            .into(),
                        e => format!("invalid handshake message: {e}"),
                    })
                })?;
                if theirs_len > MAX_HANDSHAKE_PAYLOAD {
                    return Err(TunnelError::Handshake("handshake payload too long".into()));
                }
            }
            my_turn = !my_turn;
        }
        theirs.truncate(theirs_len);
        Ok((hs.into_stateless_transport_mode().map_err(setup)?, theirs))
    }

    /// The peer's static public key (the one the handshake proved it holds).
    pub fn remote_static(&self) -> [u8; KEY_LEN] {
        self.remote_static
    }

    /// Splits the tunnel into a receiving and a sending half that can be used concurrently.
    pub fn split(self) -> (TunnelReader<ReadHalf<S>>, TunnelWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            TunnelReader {
                r,
                crypto: self.crypto.clone(),
                nonce: 0,
                buf: Vec::new(),
                start: 0,
                end: 0,
                plain: Vec::new(),
                ended: false,
            },
            TunnelWriter {
                w,
                crypto: self.crypto,
                nonce: 0,
                out: Vec::new(),
                out_len: 0,
                plain: Vec::new(),
                finished: false,
            },
        )
    }
}

/// The sending half of a tunnel.
pub struct TunnelWriter<W> {
    w: W,
    crypto: Arc<StatelessTransportState>,
    nonce: u64,
    /// Encrypted frames not yet written: `out[..out_len]`. [`SMALL_BUF`] long, or once a
    /// large frame passed, room for one more frame after [`WRITE_BATCH`] bytes.
    out: Vec<u8>,
    out_len: usize,
    plain: Vec<u8>,
    finished: bool,
}

impl<W: AsyncWrite + Unpin> TunnelWriter<W> {
    /// Encrypts one frame onto the end of the output buffer (not yet written).
    fn seal(&mut self, kind: u8, data: &[u8]) -> Result<(), TunnelError> {
        self.plain.clear();
        self.plain.push(kind);
        self.plain.extend_from_slice(data);
        let at = self.out_len;
        let need = at + 2 + self.plain.len() + TAG_LEN;
        if self.out.len() < need && at < WRITE_BATCH {
            let size = if need > SMALL_BUF {
                WRITE_BATCH + 2 + MAX_FRAME_LEN
            } else {
                SMALL_BUF
            };
            self.out.resize(size, 0);
        }
        // Room for a frame is always left unless a send was cancelled half-way (the stream is
        // then broken anyway): an error, never a panic.
        let room = self
            .out
            .get_mut(at + 2..)
            .filter(|r| r.len() >= self.plain.len() + TAG_LEN)
            .ok_or(TunnelError::Protocol(
                "tunnel writer reused after a cancelled send",
            ))?;
        let n = self
            .crypto
            .write_message(self.nonce, &self.plain, room)
            .map_err(|e| TunnelError::Setup(format!("encrypt: {e}")))?;
        self.nonce += 1;
        self.out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
        self.out_len = at + 2 + n;
        Ok(())
    }

    /// Writes the output buffer with as few calls as the stream takes.
    async fn flush_out(&mut self) -> Result<(), TunnelError> {
        let r = write_frame(&mut self.w, &self.out[..self.out_len]).await;
        self.out_len = 0;
        r
    }

    async fn send_frame(&mut self, kind: u8, data: &[u8]) -> Result<(), TunnelError> {
        self.seal(kind, data)?;
        self.flush_out().await
    }

    /// Encrypts and sends `data` (split into frames of at most [`MAX_CHUNK`] bytes, written
    /// [`WRITE_BATCH`] bytes at a time).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), TunnelError> {
        if self.finished {
            return Err(TunnelError::Finished);
        }
        for chunk in data.chunks(MAX_CHUNK) {
            self.seal(FRAME_DATA, chunk)?;
            if self.out_len >= WRITE_BATCH {
                self.flush_out().await?;
            }
        }
        if self.out_len > 0 {
            self.flush_out().await?;
        }
        Ok(())
    }

    /// Sends the end-of-stream frame and shuts down the write half of the stream.
    pub async fn finish(&mut self) -> Result<(), TunnelError> {
        if self.finished {
            return Ok(());
        }
        self.send_end().await?;
        self.w.shutdown().await?;
        Ok(())
    }

    /// Sends the end-of-stream frame, keeping the stream open for acknowledgements.
    pub async fn send_end(&mut self) -> Result<(), TunnelError> {
        self.send_frame(FRAME_END, &[]).await?;
        self.finished = true;
        Ok(())
    }

    /// Sends an acknowledgement frame (resumable layer).
    pub async fn send_ack(&mut self, received: u64, end: bool) -> Result<(), TunnelError> {
        let mut body = [0u8; 9];
        body[..8].copy_from_slice(&received.to_be_bytes());
        body[8] = u8::from(end);
        self.send_frame(FRAME_ACK, &body).await
    }

    /// Sends an abort frame with `reason` (cut to [`MAX_ABORT_REASON`] bytes; resumable layer).
    pub async fn send_abort(&mut self, reason: &str) -> Result<(), TunnelError> {
        let mut end = reason.len().min(MAX_ABORT_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        self.send_frame(FRAME_ABORT, &reason.as_bytes()[..end])
            .await
    }

    /// Shuts down the write half of the underlying stream.
    pub async fn shutdown(&mut self) -> Result<(), TunnelError> {
        self.w.shutdown().await?;
        Ok(())
    }
}

/// The receiving half of a tunnel.
pub struct TunnelReader<R> {
    r: R,
    crypto: Arc<StatelessTransportState>,
    nonce: u64,
    /// Bytes read from the stream; `start..end` not yet decrypted. [`SMALL_BUF`] long, or
    /// [`READ_BUF`] once a larger frame arrived (which holds any frame).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Vec<u8>,
    ended: bool,
}

impl<R: AsyncRead + Unpin> TunnelReader<R> {
    /// The next chunk of plaintext, or `None` once the peer's authenticated end of stream
    /// arrived. Never returns an empty chunk. An acknowledgement frame is a protocol error here.
    pub async fn recv(&mut self) -> Result<Option<&[u8]>, TunnelError> {
        if self.ended {
            return Ok(None);
        }
        match self.recv_frame().await? {
            Frame::Data(d) => Ok(Some(d)),
            Frame::End => Ok(None),
            Frame::Ack { .. } | Frame::Abort(_) => Err(TunnelError::Protocol(
                "acknowledgement or abort frame in a plain (non-resumable) tunnel",
            )),
        }
    }

    /// Makes at least `want` undecrypted bytes available at `buf[start..]`, reading as much
    /// as the stream has ready (up to the buffer's end). Cancel-safe: bytes read stay in the
    /// buffer. `want` is at most `2 + MAX_FRAME_LEN`, which fits the buffer.
    async fn fill(&mut self, want: usize) -> Result<(), TunnelError> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        while self.end - self.start < want {
            if self.buf.len() - self.start < want {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.buf.len() < want {
                    let size = if want > SMALL_BUF {
                        READ_BUF
                    } else {
                        SMALL_BUF
                    };
                    self.buf.resize(size, 0);
                }
            }
            let n = self.r.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(TunnelError::Truncated);
            }
            self.end += n;
        }
        Ok(())
    }

    /// The next frame of any type. Empty data frames are skipped. After an end-of-stream
    /// frame, further frames are still read (the resumable layer needs acknowledgements).
    /// Cancel-safe (a cancelled call loses no bytes; the next call continues the frame).
    pub async fn recv_frame(&mut self) -> Result<Frame<'_>, TunnelError> {
        loop {
            self.fill(2).await?;
            let n = decode_frame_len(
                [self.buf[self.start], self.buf[self.start + 1]],
                MIN_FRAME_LEN,
            )?;
            self.fill(2 + n).await?;
            let body = self.start + 2..self.start + 2 + n;
            self.start = body.end;
            if self.plain.len() < n {
                let size = if n > SMALL_BUF {
                    MAX_FRAME_LEN
                } else {
                    SMALL_BUF
                };
                self.plain.resize(size, 0);
            }
            let m = self
                .crypto
                .read_message(self.nonce, &self.buf[body], &mut self.plain)
                .map_err(|_| TunnelError::AuthenticationFailed)?;
            self.nonce += 1;
            match self.plain[..m].split_first() {
                Some((&FRAME_DATA, data)) if data.len() > MAX_CHUNK => {
                    return Err(TunnelError::Protocol(
                        "data frame larger than the chunk limit",
                    ))
                }
                Some((&FRAME_DATA, [])) => continue,
                Some((&FRAME_DATA, _)) => return Ok(Frame::Data(&self.plain[1..m])),
                Some((&FRAME_END, [])) => {
                    self.ended = true;
                    return Ok(Frame::End);
                }
                Some((&FRAME_ACK, body)) if body.len() == 9 && body[8] <= 1 => {
                    let mut r = [0u8; 8];
                    r.copy_from_slice(&body[..8]);
                    return Ok(Frame::Ack {
                        received: u64::from_be_bytes(r),
                        end: body[8] == 1,
                    });
                }
                Some((&FRAME_ABORT, why)) if why.len() <= MAX_ABORT_REASON => {
                    return std::str::from_utf8(&self.plain[1..m])
                        .map(Frame::Abort)
                        .map_err(|_| TunnelError::Protocol("abort reason is not UTF-8"))
                }
                _ => return Err(TunnelError::Protocol("unknown or malformed frame")),
            }
        }
    }
}

/// What a bridge moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BridgeStats {
    /// Plaintext bytes from the local connection into the tunnel.
    pub sent: u64,
    /// Plaintext bytes from the tunnel to the local connection.
    pub received: u64,
}

/// Copies between `local` and `tunnel` both ways at once, with half-close (see the module
/// docs), until both directions ended. Returns the bytes moved, or the first error.
pub async fn bridge<L, S>(local: L, tunnel: Tunnel<S>) -> Result<BridgeStats, TunnelError>
where
    L: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut lr, mut lw) = tokio::io::split(local);
    let (mut tr, mut tw) = tunnel.split();
    let up = async {
        let mut buf = vec![0u8; SMALL_BUF];
        let mut sent = 0u64;
        loop {
            let n = lr.read(&mut buf).await?;
            if n == buf.len() && n < READ_BUF {
                buf.resize(READ_BUF, 0); // a bulk stream: read several frames per call
            }
            if n == 0 {
                tw.finish().await?;
                return Ok::<u64, TunnelError>(sent);
            }
            tw.send(&buf[..n]).await?;
            sent += n as u64;
        }
    };
    let down = async {
        let mut received = 0u64;
        while let Some(data) = tr.recv().await? {
            lw.write_all(data).await?;
            received += data.len() as u64;
        }
        lw.shutdown().await?;
        Ok::<u64, TunnelError>(received)
    };
    let (sent, received) = tokio::try_join!(up, down)?;
    Ok(BridgeStats { sent, received })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TunnelConfig, TunnelConfig) {
        let a = StaticKeypair::generate().unwrap();
        let b = StaticKeypair::generate().unwrap();
        let cfg = |role, local: &StaticKeypair, remote: &StaticKeypair| TunnelConfig {
            role,
            local: local.clone(),
            remote_public: remote.public,
            binding: b"session-1".to_vec(),
            handshake_timeout: Duration::from_secs(5),
        };
        (cfg(Role::Initiator, &a, &b), cfg(Role::Responder, &b, &a))
    }

    #[test]
    fn frame_len_bounds() {
        assert!(decode_frame_len([0, 5], MIN_FRAME_LEN).is_err());
        assert_eq!(decode_frame_len([0, 17], MIN_FRAME_LEN).unwrap(), 17);
        assert_eq!(
            decode_frame_len([255, 255], MIN_FRAME_LEN).unwrap(),
            MAX_FRAME_LEN
        );
        let dbg = format!("{:?}", pair().0.local);
        assert!(dbg.contains("<hidden>"));
    }

    #[tokio::test]
    async fn in_memory_round_trip_end_and_truncation() {
        let (ca, cb) = pair();
        let (sa, sb) = tokio::io::duplex(1 << 16);
        let (ta, tb) = tokio::join!(Tunnel::handshake(sa, &ca), Tunnel::handshake(sb, &cb));
        let (ta, tb) = (ta.unwrap(), tb.unwrap());
        assert_eq!(tb.remote_static(), ca.local.public);
        let (_ra, mut wa) = ta.split();
        let (mut rb, _wb) = tb.split();
        let data = vec![42u8; MAX_CHUNK * 2 + 5];
        let writer = async {
            wa.send(&data).await.unwrap();
            wa.send(&[]).await.unwrap();
            wa.finish().await.unwrap();
            assert!(matches!(wa.send(b"x").await, Err(TunnelError::Finished)));
        };
        let reader = async {
            let mut got = Vec::new();
            while let Some(d) = rb.recv().await.unwrap() {
                assert!(!d.is_empty());
                got.extend_from_slice(d);
            }
            assert!(rb.recv().await.unwrap().is_none());
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert_eq!(got, data);

        // A stream that ends without the end frame is truncated.
        let (ca, cb) = pair();
        let (sa, sb) = tokio::io::duplex(1 << 16);
        let (ta, tb) = tokio::join!(Tunnel::handshake(sa, &ca), Tunnel::handshake(sb, &cb));
        let (_ra, mut wa) = ta.unwrap().split();
        let (mut rb, _wb) = tb.unwrap().split();
        wa.send(b"hello").await.unwrap();
        drop(wa);
        drop(_ra);
        assert_eq!(rb.recv().await.unwrap(), Some(&b"hello"[..]));
        assert!(matches!(rb.recv().await, Err(TunnelError::Truncated)));
    }

    #[tokio::test]
    async fn handshake_payloads_travel_both_ways() {
        let (ca, cb) = pair();
        let (sa, sb) = tokio::io::duplex(1 << 16);
        let (a, b) = tokio::join!(
            Tunnel::handshake_with(sa, &ca, b"attach me", |_| async { Vec::new() }),
            Tunnel::handshake_with(sb, &cb, &[], |theirs| async move {
                [b"ok: ".as_slice(), &theirs].concat()
            })
        );
        let ((_, from_b), (_, from_a)) = (a.unwrap(), b.unwrap());
        assert_eq!(from_a, b"attach me");
        assert_eq!(from_b, b"ok: attach me");
        let (ca, _) = pair();
        let (sa, _sb) = tokio::io::duplex(1 << 16);
        let long = vec![0u8; MAX_HANDSHAKE_PAYLOAD + 1];
        let e = Tunnel::handshake_with(sa, &ca, &long, |_| async { Vec::new() })
            .await
            .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    /// A stream that counts the read and write calls that moved bytes.
    struct Counting<S> {
        inner: S,
        reads: Arc<std::sync::atomic::AtomicUsize>,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.reads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
            if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The syscall budget of the data path: full-size frames, several frames per write call
    /// and per read call (not one write per frame, nor a read for each 2-byte length).
    #[tokio::test]
    async fn frames_are_full_size_and_batched_per_call() {
        use std::sync::atomic::Ordering::Relaxed;
        let (ca, cb) = pair();
        let (sa, sb) = tokio::io::duplex(4 << 20);
        let (wa_n, rb_n) = (Arc::default(), Arc::default());
        let sa = Counting {
            inner: sa,
            reads: Arc::default(),
            writes: Arc::clone(&wa_n),
        };
        let sb = Counting {
            inner: sb,
            reads: Arc::clone(&rb_n),
            writes: Arc::default(),
        };
        let (ta, tb) = tokio::join!(Tunnel::handshake(sa, &ca), Tunnel::handshake(sb, &cb));
        let (_ra, mut wa) = ta.unwrap().split();
        let (mut rb, _wb) = tb.unwrap().split();
        let (w0, r0) = (wa_n.load(Relaxed), rb_n.load(Relaxed));
        // 16 full frames, all written before the reader starts.
        let data: Vec<u8> = (0..MAX_CHUNK * 16).map(|i| (i % 251) as u8).collect();
        wa.send(&data).await.unwrap();
        wa.finish().await.unwrap();
        let writes = wa_n.load(Relaxed) - w0;
        // 16 frames of 2 + 65535 bytes in WRITE_BATCH pieces, and the end frame.
        assert!(writes <= 5, "{writes} write calls for 16 frames");
        let mut got = Vec::new();
        while let Some(d) = rb.recv().await.unwrap() {
            assert_eq!(d.len(), MAX_CHUNK, "every frame carries a full chunk");
            got.extend_from_slice(d);
        }
        assert_eq!(got, data);
        let reads = rb_n.load(Relaxed) - r0;
        assert!(reads <= 8, "{reads} read calls for 17 frames");
    }

    /// Forwards whole frames from `from` to `to`, sending frame number `dup` twice.
    async fn frame_forwarder<R, W>(mut from: R, mut to: W, dup: usize)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = Vec::new();
        let mut i = 0;
        while let Ok(Some(n)) = read_frame(&mut from, &mut buf, 1).await {
            let mut frame = (n as u16).to_be_bytes().to_vec();
            frame.extend_from_slice(&buf[..n]);
            for _ in 0..if i == dup { 2 } else { 1 } {
                if to.write_all(&frame).await.is_err() {
                    return;
                }
            }
            i += 1;
        }
    }

    #[tokio::test]
    async fn replayed_frame_fails_authentication_and_short_frame_is_a_protocol_error() {
        let (ca, cb) = pair();
        // A <-> a_peer, b_peer <-> B; A's frames go to B through the forwarder, which sends
        // frame 1 (the first data frame; frame 0 is the handshake message) twice.
        let (sa, a_peer) = tokio::io::duplex(1 << 16);
        let (sb, b_peer) = tokio::io::duplex(1 << 16);
        let (a_peer_r, mut a_peer_w) = tokio::io::split(a_peer);
        let (mut b_peer_r, b_peer_w) = tokio::io::split(b_peer);
        tokio::spawn(frame_forwarder(a_peer_r, b_peer_w, 1));
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut b_peer_r, &mut a_peer_w).await;
        });
        let (ta, tb) = tokio::join!(Tunnel::handshake(sa, &ca), Tunnel::handshake(sb, &cb));
        let (_ra, mut wa) = ta.unwrap().split();
        let (mut rb, _wb) = tb.unwrap().split();
        wa.send(b"once").await.unwrap();
        assert_eq!(rb.recv().await.unwrap(), Some(&b"once"[..]));
        assert!(matches!(
            rb.recv().await,
            Err(TunnelError::AuthenticationFailed)
        ));

        // A header announcing fewer bytes than a tag is refused before the body is read.
        let (mut raw, mut s) = tokio::io::duplex(1 << 10);
        raw.write_all(&[0, 3, 1, 2, 3]).await.unwrap();
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut s, &mut buf, MIN_FRAME_LEN).await,
            Err(TunnelError::Protocol(_))
        ));
    }
}
