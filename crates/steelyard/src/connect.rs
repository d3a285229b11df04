//! `steelyard connect <peer> <service> --listen ADDR`: a local listener whose every accepted
//! connection becomes a tunnel to `service` on `peer`, through the running agent.
//!
//! The agent does the work (`steelyard_agent::daemon`): this command sends its loopback
//! control endpoint one forward request; the agent binds `--listen` itself (loopback only,
//! unless its config has `allow_remote_forwards`) and serves every accepted connection as a
//! tunnel, so tunnelled bytes go client → agent → relay with no process in between. This
//! command stays in the foreground printing one line per tunnel (its relay, or why it failed);
//! when it exits (Ctrl-C, killed) its control connection closes and the agent closes the
//! listener (connections already accepted carry on to their end). If the agent stops, this
//! command exits with an error. The identity key never leaves the agent.
//!
//! With `--udp` it binds a UDP socket itself, for a service the peer declares as UDP
//! (`udp:HOST:PORT` in its `[services]`): each client address gets its own tunnel (at most
//! [`MAX_UDP_FLOWS`] at once), its datagrams travel as records
//! (`steelyard_agent::datagram`), and a flow ends after a minute without datagrams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use steelyard_agent::config::{AgentConfig, DEFAULT_CONTROL};
use steelyard_agent::daemon::{forward_via_agent, open_via_agent};

/// Flags of `steelyard connect`.
#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// The peer to reach.
    pub peer: String,
    /// The service on that peer (a name from its `[services]`).
    pub service: String,
    /// Where to listen for local clients.
    #[arg(long, env = "STEELYARD_CONNECT_LISTEN")]
    pub listen: SocketAddr,
    /// The agent's control address (default: from `--config`, else 127.0.0.1:7450).
    #[arg(long, env = "STEELYARD_AGENT_CONTROL")]
    pub control: Option<SocketAddr>,
    /// The agent's TOML config, to read its control address from.
    #[arg(long, short, env = "STEELYARD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen for UDP datagrams instead of TCP connections (the service must be a UDP one).
    #[arg(long)]
    pub udp: bool,
}

/// Most UDP client addresses tunnelled at once; datagrams from more are dropped.
pub const MAX_UDP_FLOWS: usize = 256;
/// Datagrams queued per UDP flow while its tunnel opens or is slow; more are dropped.
const UDP_QUEUE: usize = 64;

/// Runs the forward until interrupted or the agent ends it.
pub fn run(args: ConnectArgs) -> anyhow::Result<()> {
    let control = match (args.control, &args.config) {
        (Some(c), _) => c,
        (None, Some(path)) => AgentConfig::from_file(path)?.control,
        (None, None) => DEFAULT_CONTROL.parse()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    if args.udp {
        return rt.block_on(run_udp(args, control));
    }
    rt.block_on(async move {
        let mut forward = forward_via_agent(control, &args.peer, &args.service, args.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot forward {} to {}/{}",
                    args.listen, args.peer, args.service
                )
            })?;
        println!(
            "connect {} {} listening={} control={control}",
            args.peer, args.service, forward.listening
        );
        loop {
            let ev = forward.next_event().await.with_context(|| {
                format!(
                    "the agent at {control} ended the forward on {} (did it stop?)",
                    forward.listening
                )
            })?;
            let from = ev.from.map(|f| f.to_string()).unwrap_or_default();
            match (ev.ok, ev.error) {
                (true, _) => log(&format!(
                    "{from}: tunnel {} via relay {}",
                    ev.session_id.unwrap_or_default(),
                    ev.relay.unwrap_or_default()
                )),
                (false, e) => log(&format!("{from}: {}", e.unwrap_or_default())),
            }
        }
    })
}

async fn run_udp(args: ConnectArgs, control: SocketAddr) -> anyhow::Result<()> {
    use steelyard_agent::datagram;
    let sock = Arc::new(
        tokio::net::UdpSocket::bind(args.listen)
            .await
            .with_context(|| format!("cannot bind UDP {}; pick a free port", args.listen))?,
    );
    println!(
        "connect {} {} listening=udp:{} control={control}",
        args.peer,
        args.service,
        sock.local_addr()?
    );
    type Flows = Arc<Mutex<HashMap<SocketAddr, tokio::sync::mpsc::Sender<Vec<u8>>>>>;
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; datagram::MAX_DATAGRAM + 1];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let d = buf[..n].to_vec();
        let mut map = flows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(&from) {
            match tx.try_send(d) {
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    map.remove(&from);
                }
                _ => continue, // sent, or dropped on a full queue (as a full path would)
            }
            continue;
        }
        if map.len() >= MAX_UDP_FLOWS {
            continue;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(UDP_QUEUE);
        let _ = tx.try_send(d);
        map.insert(from, tx);
        drop(map);
        let (peer, service, sock, flows) = (
            args.peer.clone(),
            args.service.clone(),
            sock.clone(),
            flows.clone(),
        );
        tokio::spawn(async move {
            match open_via_agent(control, &peer, &service).await {
                Ok((tunnel, reply)) => {
                    log(&format!(
                        "udp {from}: tunnel {} via relay {}",
                        reply.session_id.unwrap_or_default(),
                        reply.relay.unwrap_or_default()
                    ));
                    let end =
                        datagram::pump(tunnel, &sock, Some(from), Some(rx), datagram::DEFAULT_IDLE)
                            .await;
                    log(&format!("udp {from}: flow ended: {end:?}"));
                }
                Err(e) => log(&format!("udp {from}: {e}")),
            }
            flows
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&from);
        });
    }
}

fn log(line: &str) {
    eprintln!("steelyard connect: {line}");
}
