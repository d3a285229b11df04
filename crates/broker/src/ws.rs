//! The server side of RFC 6455 WebSockets, just what the broker's agent and relay channels
//! need: the upgrade check and accept key, a message reader and a frame writer over the
//! upgraded connection.
//!
//! Why not tungstenite (through axum): it keeps, for the life of each connection, a read
//! buffer of at least its configured size that grows to the largest message received, and a
//! write buffer as large as the largest message sent. With a 50-path report in and a relay
//! map page out, that was over half of the broker's memory per idle peer. Here nothing is kept
//! between messages but a small read buffer; a message's bytes live while it is read or
//! written.
//!
//! What it does not do: extensions (no compression), subprotocols, the client role, sending
//! fragmented messages. It receives text and binary messages (fragmented or not), answers
//! pings through the caller, ignores pongs and ends on close. Client frames must be masked.

use std::io;

use axum::http::{header, HeaderMap};
use base64::Engine;
use bytes::Buf;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Opcodes.
pub const TEXT: u8 = 0x1;
/// Close.
pub const CLOSE: u8 = 0x8;
/// Pong.
pub const PONG: u8 = 0xA;

/// Bytes of the read buffer: a frame header and a small message (a connect request) arrive in
/// one read; larger payloads are read straight into their own allocation.
const READ_BUFFER: usize = 256;

/// Payloads up to this size are allocated at once when their header arrives; larger ones grow
/// as their bytes arrive.
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

/// Reads messages from a client; see the module docs.
pub struct Reader<R> {
    io: BufReader<R>,
    max: usize,
    /// A fragmented message being received: its opcode and bytes so far.
    partial: Option<(u8, Vec<u8>)>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// A reader that refuses messages larger than `max` bytes.
    pub fn new(io: R, max: usize) -> Self {
        Self {
            io: BufReader::with_capacity(READ_BUFFER, io),
            max,
            partial: None,
        }
    }

    /// Changes the message size limit (e.g. once the client has authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// The next message; `None` when the client closed (close frame or end of stream).
    /// After an error the connection is out of step: close it.
    pub async fn next(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let mut head = [0u8; 2];
            match self.io.read_exact(&mut head).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
            if head[0] & 0x70 != 0 {
                return Err(ReadError::Protocol(
                    "reserved bits are set, but no extension was negotiated",
                ));
            }
            if head[1] & 0x80 == 0 {
                return Err(ReadError::Protocol("client frames must be masked"));
            }
            let len = match head[1] & 0x7f {
                126 => u64::from(self.io.read_u16().await?),
                127 => self.io.read_u64().await?,
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            self.io.read_exact(&mut mask).await?;
            if opcode >= 0x8 {
                if !fin || len > 125 {
                    return Err(ReadError::Protocol(
                        "control frames must be final and at most 125 bytes",
                    ));
                }
                // Rare: allocated rather than kept in every connection's reader state.
                let mut payload = vec![0u8; len as usize];
                self.io.read_exact(&mut payload).await?;
                unmask(&mut payload, mask);
                match opcode {
                    CLOSE => return Ok(None),
                    0x9 => return Ok(Some(Incoming::Ping(payload.into_boxed_slice()))),
                    PONG => continue,
                    _ => return Err(ReadError::Protocol("unknown control opcode")),
                }
            }
            let (opcode, mut bytes) = match (opcode, self.partial.take()) {
                (0x0, Some(p)) => p,
                (0x0, None) => {
                    return Err(ReadError::Protocol(
                        "a continuation frame without a message to continue",
                    ))
                }
                (0x1 | 0x2, None) => (opcode, Vec::new()),
                (0x1 | 0x2, Some(_)) => {
                    return Err(ReadError::Protocol(
                        "a new message began before the previous one ended",
                    ))
                }
                _ => return Err(ReadError::Protocol("unknown data opcode")),
            };
            let start = bytes.len();
            let size = (start as u64).saturating_add(len);
            if size > self.max as u64 {
                return Err(ReadError::TooLarge {
                    size,
                    max: self.max,
                });
            }
            if len <= EAGER_PAYLOAD {
                bytes.resize(size as usize, 0);
                self.io.read_exact(&mut bytes[start..]).await?;
            } else {
                // Grown as bytes arrive: a header alone does not reserve the whole limit.
                let got = (&mut self.io).take(len).read_to_end(&mut bytes).await?;
                if (got as u64) < len {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
            unmask(&mut bytes[start..], mask);
            if !fin {
                self.partial = Some((opcode, bytes));
                continue;
            }
            return match opcode {
                0x1 => String::from_utf8(bytes)
                    .map(|t| Some(Incoming::Text(t)))
                    .map_err(|_| ReadError::Protocol("a text message is not valid UTF-8")),
                _ => Ok(Some(Incoming::Binary)),
            };
        }
    }
}

fn unmask(bytes: &mut [u8], mask: [u8; 4]) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Writes one unfragmented, unmasked frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    opcode: u8,
    payload: &[u8],
) -> io::Result<()> {
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
    let mut frame = Buf::chain(&head[..n], payload);
    io.write_all_buf(&mut frame).await?;
    io.flush().await
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
