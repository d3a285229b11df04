//! A minimal relay client for agents, tools and tests: dial the relay's TCP port with a ticket
//! and wait until the session is paired; bind a UDP socket to a session.
//!
//! What it does not do: get tickets (the broker does), retry, or encrypt (agents encrypt end
//! to end above this).

use std::net::SocketAddr;
use std::time::Duration;

use steelyard_proto::ticket::SessionId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::wire::{self, StatusCode, UdpKind, STATUS_LEN};

/// Why dialing failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("relay connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The relay refused the ticket or the session.
    #[error("relay refused the session: {}", .0.name())]
    Refused(StatusCode),
    /// The relay sent something that is not a status frame.
    #[error("relay sent an invalid status frame: {0}")]
    Protocol(#[from] wire::WireError),
    /// No answer in time.
    #[error("relay did not answer in time")]
    Timeout,
}

/// Reads one status frame.
pub async fn read_status(stream: &mut TcpStream) -> Result<StatusCode, ClientError> {
    let mut b = [0u8; STATUS_LEN];
    stream.read_exact(&mut b).await?;
    Ok(wire::decode_status(&b)?)
}

/// Connects to `relay`, sends the hello with `ticket` and returns the connection once the
/// relay answers `Paired` (waiting at most `wait`), ready for raw bytes.
pub async fn dial(
    relay: SocketAddr,
    ticket: &[u8],
    wait: Duration,
) -> Result<TcpStream, ClientError> {
    let mut s = TcpStream::connect(relay).await?;
    s.set_nodelay(true)?;
    s.write_all(&wire::encode_hello(ticket)?).await?;
    tokio::time::timeout(wait, async {
        loop {
            match read_status(&mut s).await? {
                StatusCode::Waiting => continue,
                StatusCode::Paired => return Ok(()),
                code => return Err(ClientError::Refused(code)),
            }
        }
    })
    .await
    .map_err(|_| ClientError::Timeout)??;
    Ok(s)
}

/// Sends the bind datagram for `session` with `ticket` from `sock` to `relay` until a status
/// arrives (retrying every 200 ms, at most `wait`), and returns that status.
pub async fn udp_bind(
    sock: &UdpSocket,
    relay: SocketAddr,
    session: SessionId,
    ticket: &[u8],
    wait: Duration,
) -> Result<StatusCode, ClientError> {
    let bind = wire::encode_udp(UdpKind::Bind, session, ticket);
    let mut buf = [0u8; 2048];
    tokio::time::timeout(wait, async {
        loop {
            sock.send_to(&bind, relay).await?;
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
            {
                let (n, _) = r?;
                if let Ok(p) = wire::decode_udp(&buf[..n]) {
                    if p.kind == UdpKind::Status && p.session_id == session {
                        if let Some(code) = p.body.first().and_then(|c| StatusCode::from_wire(*c)) {
                            return Ok(code);
                        }
                    }
                }
            }
        }
    })
    .await
    .map_err(|_| ClientError::Timeout)?
}
