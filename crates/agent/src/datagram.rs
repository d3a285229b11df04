//! UDP services over a tunnel: datagrams carried as records in the tunnel's byte stream, and the
//! pump between such a stream and a UDP socket.
//!
//! A record is a length (u16, big-endian) and that many bytes of one datagram (0..=[`MAX_DATAGRAM`]).
//! The stream under it is the resumable, encrypted tunnel ([`crate::resume`]), so datagrams
//! arrive in order, once, and survive a relay failure; they are not dropped when the path is
//! congested (a UDP application sees latency instead of loss). [`Decoder`] is the sans-I/O
//! part: bytes in, whole datagrams out, never more than one record buffered.
//!
//! A UDP flow has no end: [`pump`] ends when the stream ends or after `idle` with no datagram
//! either way, and then half-closes the stream.
//!
//! What this module does not do: map client addresses to flows (`steelyard connect --udp`
//! does), or carry datagrams unreliably.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;

/// How long a UDP flow lives without a datagram either way.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// Largest datagram carried (the largest UDP payload over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// Encodes one datagram as a record. Errors if it is larger than [`MAX_DATAGRAM`].
pub fn encode(datagram: &[u8]) -> Result<Vec<u8>, String> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(format!(
            "a datagram of {} bytes is larger than the {MAX_DATAGRAM} a UDP service carries",
            datagram.len()
        ));
    }
    let mut out = Vec::with_capacity(2 + datagram.len());
    out.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
    out.extend_from_slice(datagram);
    Ok(out)
}

/// Splits a byte stream into datagrams. Sans-I/O and total.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Bytes to read next: the rest of the header or of the current record (never 0).
    pub fn want(&self) -> usize {
        match self.record_len() {
            None => 2 - self.buf.len(),
            Some(n) => 2 + n - self.buf.len(),
        }
    }

    fn record_len(&self) -> Option<usize> {
        (self.buf.len() >= 2).then(|| u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize)
    }

    /// Takes `bytes` (at most [`want`](Self::want) of them; the rest is the caller's error)
    /// and returns the datagram they complete, if any. A record longer than
    /// [`MAX_DATAGRAM`] is an error.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if bytes.len() > self.want() {
            return Err(format!(
                "decoder fed {} bytes, wanted at most {}",
                bytes.len(),
                self.want()
            ));
        }
        self.buf.extend_from_slice(bytes);
        match self.record_len() {
            Some(n) if n > MAX_DATAGRAM => Err(format!(
                "the peer sent a datagram record of {n} bytes, over the {MAX_DATAGRAM} limit"
            )),
            Some(n) if self.buf.len() == 2 + n => {
                let d = self.buf[2..].to_vec();
                self.buf.clear();
                Ok(Some(d))
            }
            _ => Ok(None),
        }
    }
}

/// Why a pump ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PumpEnd {
    /// The stream ended.
    StreamClosed,
    /// No datagram either way for the idle time.
    Idle,
}

/// Moves datagrams between `stream` (records) and `sock` (sending with `send_to` to `to`, or
/// `send` when `to` is `None` and the socket is connected) until the stream ends or nothing
/// moved for `idle`. Datagrams the socket receives are read with `recv` (a connected socket
/// only hears its peer) or come in through `incoming` (a listening socket shared by flows).
pub async fn pump<S>(
    stream: S,
    sock: &UdpSocket,
    to: Option<std::net::SocketAddr>,
    mut incoming: Option<tokio::sync::mpsc::Receiver<Vec<u8>>>,
    idle: Duration,
) -> std::io::Result<PumpEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let mut dec = Decoder::default();
    let mut rbuf = vec![0u8; MAX_DATAGRAM + 2];
    let mut ubuf = vec![0u8; MAX_DATAGRAM + 1];
    let end = loop {
        let want = dec.want();
        tokio::select! {
            n = r.read(&mut rbuf[..want]) => {
                let n = n?;
                if n == 0 {
                    break PumpEnd::StreamClosed;
                }
                if let Some(d) = dec.push(&rbuf[..n]).map_err(std::io::Error::other)? {
                    match to {
                        Some(to) => sock.send_to(&d, to).await?,
                        None => sock.send(&d).await?,
                    };
                }
            }
            d = async {
                match incoming.as_mut() {
                    Some(rx) => rx.recv().await.ok_or(std::io::ErrorKind::BrokenPipe.into()),
                    None => sock.recv(&mut ubuf).await.map(|n| ubuf[..n].to_vec()),
                }
            } => {
                let d = d?;
                // A datagram too large to carry is dropped, as a full UDP path would.
                if let Ok(rec) = encode(&d) {
                    w.write_all(&rec).await?;
                }
            }
            _ = tokio::time::sleep(idle) => break PumpEnd::Idle,
        }
    };
    let _ = w.shutdown().await;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_in_any_split_and_bounds_hold() {
        let ds: Vec<Vec<u8>> = vec![b"hello".to_vec(), vec![], vec![7; 1000]];
        let stream: Vec<u8> = ds.iter().flat_map(|d| encode(d).unwrap()).collect();
        for step in [1, 3, 1000] {
            let (mut dec, mut out, mut i) = (Decoder::default(), Vec::new(), 0);
            while i < stream.len() {
                let n = dec.want().min(step).min(stream.len() - i);
                if let Some(d) = dec.push(&stream[i..i + n]).unwrap() {
                    out.push(d);
                }
                i += n;
            }
            assert_eq!(out, ds, "step {step}");
        }
        assert!(encode(&vec![0; MAX_DATAGRAM + 1]).is_err());
        assert_eq!(
            encode(&vec![0; MAX_DATAGRAM]).unwrap().len(),
            MAX_DATAGRAM + 2
        );
        let mut dec = Decoder::default();
        assert!(dec.push(&[0xff, 0xff]).unwrap_err().contains("65535 bytes"));
        let mut dec = Decoder::default();
        assert!(dec.push(&[0, 1, 2]).is_err(), "more than wanted");
    }
}
