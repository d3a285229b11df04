//! The server side of RFC 6455 WebSockets, just what the broker's agent and relay channels
//! need: the upgrade check and accept key, a message reader and a frame writer over the
//! upgraded connection.
//!
//! Why not tungstenite (through axum): it keeps, for the life of each connection, a read
//! buffer of at least its configured size that grows to the largest message received, and a
//! write buffer as large as the largest message sent. With a 50-path report in and a relay
//! map page out, that was over half of the broker's memory per idle peer. Here nothing is kept
//! between messages, not even a read buffer (reads go to the stack); a message's bytes live
//! while it is read or written.
//!
//! Reading is split in two: [`Decoder`], a sans-I/O state machine (bytes in, messages out,
//! total over any input, memory bounded by the message limit), and [`Reader`], which feeds it
//! from a socket and is cancellation-safe (also as a plain poll), so one task can wait on the
//! socket and on its send queue at once.
//!
//! What it does not do: extensions (no compression), subprotocols, the client role, sending
//! fragmented messages. It receives text and binary messages (fragmented or not), answers
//! pings through the caller, ignores pongs and ends on close. Client frames must be masked.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::http::{header, HeaderMap};
use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Opcodes.
pub const TEXT: u8 = 0x1;
/// Close.
pub const CLOSE: u8 = 0x8;
/// Ping.
pub const PING: u8 = 0x9;
/// Pong.
pub const PONG: u8 = 0xA;

/// Bytes of a read into the stack: a frame header and a small message (a connect request)
/// arrive in one read; larger payloads are read straight into their own allocation. Nothing
/// of this stays allocated between reads.
pub const READ_CHUNK: usize = 1024;

/// Payloads up to this size are allocated at once when their header arrives; larger ones grow
/// as their bytes arrive, by at most this much ahead of them.
const EAGER_PAYLOAD: u64 = 16 * 1024;

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// Why a request is not a WebSocket upgrade this server accepts.
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeError {
    /// Not an upgrade to WebSocket at all.
    NotWebSocket,
    /// A WebSocket version other than 13.
    Version,
    /// No usable `Sec-WebSocket-Key`.
    Key,
}

/// Checks an upgrade request's headers; returns the `Sec-WebSocket-Accept` value.
pub fn check_upgrade(headers: &HeaderMap) -> Result<String, UpgradeError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err(UpgradeError::NotWebSocket);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(UpgradeError::Version);
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !k.is_empty() && k.len() <= 64 => Ok(accept_key(k.as_bytes())),
        _ => Err(UpgradeError::Key),
    }
}

/// A message received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text message.
    Text(String),
    /// A binary message (its bytes are not kept: the API has none).
    Binary,
    /// A ping: answer with a pong carrying this payload.
    Ping(Box<[u8]>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A message is larger than the limit.
    #[error("a message of at least {size} bytes exceeds the connection's limit of {max} bytes")]
    TooLarge {
        /// Its size so far.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The peer broke the protocol.
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
}

/// What the decoder made of the bytes so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete message.
    Message(Incoming),
    /// A close frame: the client is done.
    Close,
}

/// The sans-I/O frame decoder: bytes in, messages out. All its state lives in the struct, so
/// the [`Reader`] around it can be cancelled between any two reads without losing bytes.
///
/// Memory is bounded by the limit: a data frame's header is checked against it before anything
/// is reserved, and a message's buffer never grows past the end its frames have announced
/// (so never past the limit). Control frames (at most 125 bytes) are buffered apart. After an
/// error or a close frame it decodes nothing more.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    state: State,
    /// A data message being received (over one or more frames): its opcode and bytes so far.
    message: Option<(u8, Vec<u8>)>,
}

#[derive(Debug)]
enum State {
    /// Reading a frame header (2 to 14 bytes).
    Head { buf: [u8; 14], have: u8 },
    /// Reading a frame's payload.
    Payload(Frame),
    /// Closed or failed.
    Done,
}

#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Payload bytes still to come.
    left: u64,
    /// Payload bytes received (the mask's phase).
    done: u64,
    /// A control frame's payload; data goes to the decoder's message.
    control: Option<Vec<u8>>,
}

const HEAD: State = State::Head {
    buf: [0; 14],
    have: 0,
};

impl Decoder {
    /// A decoder that refuses messages larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            state: HEAD,
            message: None,
        }
    }

    /// Changes the message size limit (e.g. once the client has authenticated). Frames whose
    /// header has already been checked keep the limit they were checked against.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Bytes the decoder holds allocated now (message and control buffers), for bounds checks.
    pub fn allocated(&self) -> usize {
        let message = self.message.as_ref().map_or(0, |(_, b)| b.capacity());
        let control = match &self.state {
            State::Payload(f) => f.control.as_ref().map_or(0, Vec::capacity),
            _ => 0,
        };
        message + control
    }

    /// Whether the stream may end here: between messages, not inside a frame or message.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Head { have: 0, .. } | State::Done) && self.message.is_none()
    }

    /// Decodes from the front of `input`, advancing it past what was used. Returns at the first
    /// complete message, or `None` once `input` is used up without one.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Decoded>, ReadError> {
        let out = self.decode_inner(input);
        if out.is_err() {
            self.fail();
        }
        out
    }

    fn fail(&mut self) {
        self.state = State::Done;
        self.message = None;
    }

    fn decode_inner(&mut self, input: &mut &[u8]) -> Result<Option<Decoded>, ReadError> {
        loop {
            match &mut self.state {
                State::Done => {
                    *input = &[];
                    return Ok(None);
                }
                State::Head { buf, have } => {
                    let need = match head_len(&buf[..usize::from(*have)])? {
                        Some(n) => n,
                        None if input.is_empty() => return Ok(None),
                        None => {
                            buf[usize::from(*have)] = input[0];
                            *have += 1;
                            *input = &input[1..];
                            continue;
                        }
                    };
                    let take = (need - usize::from(*have)).min(input.len());
                    buf[usize::from(*have)..usize::from(*have) + take]
                        .copy_from_slice(&input[..take]);
                    *have += take as u8;
                    *input = &input[take..];
                    if usize::from(*have) < need {
                        return Ok(None);
                    }
                    let head = *buf;
                    self.start_frame(&head[..need])?;
                }
                State::Payload(frame) => {
                    if frame.left > 0 {
                        if input.is_empty() {
                            return Ok(None);
                        }
                        let take =
                            usize::try_from(frame.left).map_or(input.len(), |l| l.min(input.len()));
                        let target = match &mut frame.control {
                            Some(c) => c,
                            None => {
                                &mut self
                                    .message
                                    .as_mut()
                                    .expect("a data frame has its message")
                                    .1
                            }
                        };
                        let from = target.len();
                        target.extend_from_slice(&input[..take]);
                        unmask(&mut target[from..], frame.mask, frame.done);
                        frame.left -= take as u64;
                        frame.done += take as u64;
                        *input = &input[take..];
                        continue;
                    }
                    if let Some(out) = self.end_frame()? {
                        return Ok(Some(out));
                    }
                }
            }
        }
    }

    /// A complete header: checks it against the protocol and the limit, then reserves.
    fn start_frame(&mut self, head: &[u8]) -> Result<(), ReadError> {
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        let len = match head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        let mask: [u8; 4] = head[head.len() - 4..].try_into().expect("4 bytes");
        let control = if opcode >= 0x8 {
            if !fin || len > 125 {
                return Err(ReadError::Protocol(
                    "control frames must be final and at most 125 bytes",
                ));
            }
            if !matches!(opcode, CLOSE | PING | PONG) {
                return Err(ReadError::Protocol("unknown control opcode"));
            }
            // Rare: allocated rather than kept in every connection's decoder.
            Some(Vec::with_capacity(len as usize))
        } else {
            let start = match (opcode, &self.message) {
                (0x0, Some((_, bytes))) => bytes.len(),
                (0x0, None) => {
                    return Err(ReadError::Protocol(
                        "a continuation frame without a message to continue",
                    ))
                }
                (0x1 | 0x2, None) => 0,
                (0x1 | 0x2, Some(_)) => {
                    return Err(ReadError::Protocol(
                        "a new message began before the previous one ended",
                    ))
                }
                _ => return Err(ReadError::Protocol("unknown data opcode")),
            };
            let size = (start as u64).saturating_add(len);
            if size > self.max as u64 {
                return Err(ReadError::TooLarge {
                    size,
                    max: self.max,
                });
            }
            let bytes = &mut self.message.get_or_insert_with(|| (opcode, Vec::new())).1;
            // Small payloads at once; larger ones grow as their bytes arrive (a header alone
            // does not reserve the whole limit), never past the announced end.
            grow(
                bytes,
                start + (len.min(EAGER_PAYLOAD) as usize),
                size as usize,
            );
            None
        };
        self.state = State::Payload(Frame {
            fin,
            opcode,
            mask,
            left: len,
            done: 0,
            control,
        });
        Ok(())
    }

    /// A frame's payload is complete.
    fn end_frame(&mut self) -> Result<Option<Decoded>, ReadError> {
        let State::Payload(frame) = std::mem::replace(&mut self.state, HEAD) else {
            unreachable!("called on a complete payload");
        };
        if let Some(payload) = frame.control {
            return Ok(match frame.opcode {
                CLOSE => {
                    self.fail();
                    Some(Decoded::Close)
                }
                PING => Some(Decoded::Message(Incoming::Ping(payload.into_boxed_slice()))),
                _ => None, // a pong
            });
        }
        if !frame.fin {
            return Ok(None);
        }
        let (opcode, bytes) = self.message.take().expect("a data frame has its message");
        Ok(Some(Decoded::Message(match opcode {
            TEXT => Incoming::Text(
                String::from_utf8(bytes)
                    .map_err(|_| ReadError::Protocol("a text message is not valid UTF-8"))?,
            ),
            _ => Incoming::Binary,
        })))
    }

    /// When a data payload larger than the reader's buffer is still to come: the message's
    /// buffer (grown for up to the next 16 KiB) and how many bytes may be read straight into it.
    fn direct(&mut self) -> Option<(&mut Vec<u8>, usize)> {
        let State::Payload(frame) = &self.state else {
            return None;
        };
        if frame.control.is_some() || frame.left <= READ_CHUNK as u64 {
            return None;
        }
        let left = usize::try_from(frame.left).ok()?;
        let bytes = &mut self.message.as_mut()?.1;
        let end = bytes.len() + left;
        grow(bytes, bytes.len() + left.min(EAGER_PAYLOAD as usize), end);
        Some((bytes, left))
    }

    /// `got` bytes were appended to the buffer [`Decoder::direct`] returned.
    fn advance_direct(&mut self, got: usize) {
        let (State::Payload(frame), Some((_, bytes))) = (&mut self.state, &mut self.message) else {
            unreachable!("direct reads happen inside a data payload");
        };
        let from = bytes.len() - got;
        unmask(&mut bytes[from..], frame.mask, frame.done);
        frame.left -= got as u64;
        frame.done += got as u64;
    }
}

/// The length of the header that starts with `have` (`None`: more bytes are needed to say),
/// after checking what the first two bytes allow.
fn head_len(have: &[u8]) -> Result<Option<usize>, ReadError> {
    let (Some(b0), Some(b1)) = (have.first(), have.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol(
            "reserved bits are set, but no extension was negotiated",
        ));
    }
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    Ok(Some(match b1 & 0x7f {
        126 => 2 + 2 + 4,
        127 => 2 + 8 + 4,
        _ => 2 + 4,
    }))
}

/// Makes room in `bytes` for at least `need` bytes, doubling, but never reserving past `end`.
fn grow(bytes: &mut Vec<u8>, need: usize, end: usize) {
    if bytes.capacity() < need {
        let target = (bytes.capacity() * 2).max(need).min(end);
        bytes.reserve_exact(target - bytes.len());
    }
}

/// Reads messages from a client; see the module docs. Cancellation-safe: [`Reader::next`] may
/// be dropped at any await (e.g. in a `select!`) and called again without losing bytes.
///
/// No read buffer is kept while the connection is idle: each read goes into a buffer on the
/// stack of the poll that makes it, and what the decoder did not take before a message
/// completed (a client that sent more than one message at once) is kept in an allocation of
/// its own until it is decoded.
pub struct Reader<R> {
    io: R,
    decoder: Decoder,
    /// Bytes read but not decoded yet (`rest[at..]`); `None` when there are none.
    rest: Option<Box<[u8]>>,
    at: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader that refuses messages larger than `max` bytes.
    pub fn new(io: R, max: usize) -> Self {
        Self::with_read(io, max, &[])
    }

    /// A reader whose first bytes are `read`, already taken from `io` (e.g. by the HTTP
    /// server, past the upgrade request).
    pub fn with_read(io: R, max: usize, read: &[u8]) -> Self {
        Self {
            io,
            decoder: Decoder::new(max),
            rest: (!read.is_empty()).then(|| read.into()),
            at: 0,
        }
    }

    /// The connection, to write to it between reads.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// Changes the message size limit (e.g. once the client has authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.decoder.set_max(max);
    }

    /// Bytes the reader holds allocated now: bytes read ahead and the decoder's buffers.
    pub fn allocated(&self) -> usize {
        self.rest.as_ref().map_or(0, |r| r.len()) + self.decoder.allocated()
    }

    /// The next message; `None` when the client closed (close frame or end of stream).
    /// After an error the connection is out of step: close it.
    pub async fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Reader::next`] as a poll: `Pending` keeps nothing but the decoder's state.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Incoming>, ReadError>> {
        loop {
            // Bytes read ahead first; with none, an empty input still completes a frame whose
            // payload was read directly.
            let out = match &self.rest {
                Some(rest) => {
                    let mut input = &rest[self.at..];
                    let out = self.decoder.decode(&mut input);
                    self.at = rest.len() - input.len();
                    if input.is_empty() {
                        (self.rest, self.at) = (None, 0);
                    }
                    out
                }
                None => self.decoder.decode(&mut &[][..]),
            };
            match out? {
                Some(Decoded::Message(m)) => return Poll::Ready(Ok(Some(m))),
                Some(Decoded::Close) => return Poll::Ready(Ok(None)),
                None if self.rest.is_some() => continue,
                None => {}
            }
            if matches!(self.decoder.state, State::Done) {
                return Poll::Ready(Ok(None));
            }
            // Large payloads are read straight into their message: one copy, few reads.
            if let Some((bytes, left)) = self.decoder.direct() {
                let from = bytes.len();
                // The room `direct` reserved, up to the payload's end (zeroed: no unsafe).
                let room = (bytes.capacity() - from).min(left).max(1);
                bytes.resize(from + room, 0);
                let mut buf = ReadBuf::new(&mut bytes[from..]);
                let polled = Pin::new(&mut self.io).poll_read(cx, &mut buf);
                let got = buf.filled().len();
                bytes.truncate(from + got);
                ready!(polled)?;
                if got == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()));
                }
                self.decoder.advance_direct(got);
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let mut input = buf.filled();
            if input.is_empty() {
                return Poll::Ready(if self.decoder.at_boundary() {
                    Ok(None)
                } else {
                    Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())
                });
            }
            let out = self.decoder.decode(&mut input);
            if !input.is_empty() && out.is_ok() {
                // More than one message arrived at once: keep the rest for the next call.
                self.rest = Some(input.into());
            }
            match out? {
                Some(Decoded::Message(m)) => return Poll::Ready(Ok(Some(m))),
                Some(Decoded::Close) => return Poll::Ready(Ok(None)),
                None => {}
            }
        }
    }
}

/// Unmasks `bytes`, the payload's bytes from offset `done` on.
fn unmask(bytes: &mut [u8], mask: [u8; 4], done: u64) {
    let phase = (done % 4) as usize;
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= mask[(i + phase) % 4];
    }
}

/// Writes one unfragmented, unmasked frame and flushes. Header and payload go out in one
/// vectored write where the connection supports it. A small hand-written future rather than
/// `write_all_buf`: it sits in every connection's task while it writes.
pub fn write_frame<'a, W: AsyncWrite + Unpin>(
    io: &'a mut W,
    opcode: u8,
    payload: &'a [u8],
) -> WriteFrame<'a, W> {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode;
    let n = match payload.len() {
        len @ 0..=125 => {
            head[1] = len as u8;
            2
        }
        len @ 126..=0xffff => {
            head[1] = 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        len => {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    WriteFrame {
        io,
        head,
        n,
        payload,
        sent: 0,
    }
}

/// The future of [`write_frame`].
pub struct WriteFrame<'a, W> {
    io: &'a mut W,
    head: [u8; 10],
    /// Header bytes used.
    n: u8,
    payload: &'a [u8],
    /// Frame bytes written so far.
    sent: usize,
}

impl<W: AsyncWrite + Unpin> std::future::Future for WriteFrame<'_, W> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = usize::from(this.n);
        let mut io = Pin::new(&mut *this.io);
        while this.sent < n + this.payload.len() {
            let sent = this.sent;
            let wrote = if sent < n && io.is_write_vectored() {
                let slices = [
                    io::IoSlice::new(&this.head[sent..n]),
                    io::IoSlice::new(this.payload),
                ];
                ready!(io.as_mut().poll_write_vectored(cx, &slices))?
            } else if sent < n {
                ready!(io.as_mut().poll_write(cx, &this.head[sent..n]))?
            } else {
                ready!(io.as_mut().poll_write(cx, &this.payload[sent - n..]))?
            };
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.sent += wrote;
        }
        io.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(input: &[u8], max: usize) -> Vec<Result<Option<Incoming>, String>> {
        let mut reader = Reader::new(input, max);
        let mut out = Vec::new();
        loop {
            let next = reader.next().await.map_err(|e| e.to_string());
            let stop = !matches!(next, Ok(Some(_)));
            out.push(next);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_headers_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(check_upgrade(&h), Err(UpgradeError::NotWebSocket));
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(check_upgrade(&h), Err(UpgradeError::Version));
        h.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        assert_eq!(check_upgrade(&h), Err(UpgradeError::Key));
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        assert_eq!(
            check_upgrade(&h).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }

    #[tokio::test]
    async fn messages_of_every_length_form_and_fragmented() {
        let long = "x".repeat(70_000);
        let mid = "é".repeat(100);
        let mut input = frame(true, TEXT, b"hi");
        input.extend(frame(true, TEXT, mid.as_bytes()));
        input.extend(frame(true, TEXT, long.as_bytes()));
        input.extend(frame(false, TEXT, b"frag"));
        input.extend(frame(true, 0x9, b"p")); // a ping between fragments
        input.extend(frame(false, 0x0, b"men"));
        input.extend(frame(true, PONG, b""));
        input.extend(frame(true, 0x0, b"ted"));
        input.extend(frame(true, 0x2, &[0, 1, 2]));
        input.extend(frame(true, CLOSE, &[3, 232]));
        let got = read_all(&input, 100_000).await;
        let text = |s: &str| Ok(Some(Incoming::Text(s.into())));
        assert_eq!(
            got,
            [
                text("hi"),
                text(&mid),
                text(&long),
                Ok(Some(Incoming::Ping(Box::new(*b"p")))),
                text("fragmented"),
                Ok(Some(Incoming::Binary)),
                Ok(None),
            ]
        );
        assert_eq!(read_all(&[], 10).await, [Ok(None)], "end of stream");
    }

    #[tokio::test]
    async fn violations_and_oversized_messages_are_errors() {
        let err = |r: &[Result<Option<Incoming>, String>]| r.last().unwrap().clone().unwrap_err();
        let unmasked = [0x81, 0x02, b'h', b'i'];
        assert!(err(&read_all(&unmasked, 100).await).contains("masked"));
        let mut rsv = frame(true, TEXT, b"hi");
        rsv[0] |= 0x40;
        assert!(err(&read_all(&rsv, 100).await).contains("reserved"));
        assert!(err(&read_all(&frame(true, 0x0, b"x"), 100).await).contains("continuation"));
        let mut two = frame(false, TEXT, b"a");
        two.extend(frame(true, TEXT, b"b"));
        assert!(err(&read_all(&two, 100).await).contains("previous"));
        assert!(err(&read_all(&frame(true, 0x3, b"x"), 100).await).contains("opcode"));
        assert!(err(&read_all(&frame(false, 0x9, b"x"), 100).await).contains("control"));
        assert!(err(&read_all(&frame(true, TEXT, &[0xff]), 100).await).contains("UTF-8"));
        let big = read_all(&frame(true, TEXT, &[b'a'; 101]), 100).await;
        assert!(err(&big).contains("101 bytes exceeds"), "{big:?}");
        let mut split = frame(false, TEXT, &[b'a'; 60]);
        split.extend(frame(true, 0x0, &[b'a'; 60]));
        assert!(err(&read_all(&split, 100).await).contains("120 bytes"));
        // A length far beyond memory is refused before anything is allocated.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend(u64::MAX.to_be_bytes());
        huge.extend([0; 4]);
        assert!(err(&read_all(&huge, 100).await).contains("exceeds"));
        // A frame cut short is a connection error, not a message, small or large.
        let cut = &frame(true, TEXT, b"hello")[..7];
        assert!(err(&read_all(cut, 100).await).contains("connection"));
        let long = frame(true, TEXT, &[b'a'; 40_000]);
        assert!(err(&read_all(&long[..30_000], 100_000).await).contains("connection"));
        assert_eq!(
            read_all(&long, 100_000).await[0],
            Ok(Some(Incoming::Text("a".repeat(40_000))))
        );
    }

    #[tokio::test]
    async fn frames_written_have_the_right_header() {
        for (len, head) in [
            (5usize, vec![0x81, 5]),
            (300, vec![0x81, 126, 1, 44]),
            (70_000, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
        ] {
            let payload = vec![b'z'; len];
            let mut out = Vec::new();
            write_frame(&mut out, TEXT, &payload).await.unwrap();
            assert_eq!(&out[..head.len()], &head[..], "{len}");
            assert_eq!(&out[head.len()..], &payload[..]);
        }
    }
}
