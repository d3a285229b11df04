//! Benchmark helper: lets a tool that cannot speak the relay hello (iperf3) run through a relay.
//!
//! `ticket_shim SIDE LISTEN RELAY SEED_HEX RELAY_ID`, or `ticket_shim pubkey SEED_HEX` to print
//! the public key the relay must trust.
//!
//! * `SIDE a`: listens on LISTEN; for every accepted connection mints a fresh session (side A
//!   ticket), dials RELAY with it and pipes; it also publishes the session's side-B ticket on
//!   the shared queue file so the `b` shim can dial the other side.
//! * `SIDE b`: for every B ticket on the queue, dials RELAY with it and connects to LISTEN (the
//!   real server, e.g. `iperf3 -s`), then pipes.
//!
//! The queue is a directory of files given by `STEELYARD_SHIM_QUEUE`. Each shim adds one local
//! hop (client → shim → relay → shim → server) with a userspace copy each way, so relay figures
//! measured through it are a lower bound on what the relay alone does. Signing tickets with a
//! seed is for benchmarks only; real deployments get tickets from the broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use steelyard_proto::ticket::{SessionId, Side, Ticket, TicketLimits, TicketSigner, Transport};
use steelyard_relay::client::dial;
use tokio::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!(
        "usage: ticket_shim a|b LISTEN RELAY SEED_HEX RELAY_ID  (env STEELYARD_SHIM_QUEUE=dir)"
    );
    std::process::exit(2)
}

fn ticket(signer: &TicketSigner, relay_id: &str, sid: SessionId, side: Side) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    signer
        .sign(&Ticket {
            key_id: signer.key_id(),
            session_id: sid,
            relay_id: relay_id.into(),
            side,
            peer_id: "bench".into(),
            issued_at: now - 1,
            expires_at: now + 3600,
            limits: TicketLimits::default(),
            transport: Transport::Tcp,
        })
        .expect("sign")
}

async fn pipe(a: TcpStream, b: TcpStream) {
    let (mut ar, mut aw) = a.into_split();
    let (mut br, mut bw) = b.into_split();
    let _ = tokio::join!(
        async {
            let _ = tokio::io::copy(&mut ar, &mut bw).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut bw).await;
        },
        async {
            let _ = tokio::io::copy(&mut br, &mut aw).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut aw).await;
        }
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "pubkey" {
        let seed: [u8; 32] = steelyard_proto::hex::decode(&args[2]).unwrap_or_else(|_| usage());
        let key = TicketSigner::from_seed(seed).public_key();
        println!("{}", steelyard_proto::hex::encode(key.as_bytes()));
        return;
    }
    if args.len() < 6 {
        usage();
    }
    let side = args[1].as_str();
    let listen: SocketAddr = args[2].parse().unwrap_or_else(|_| usage());
    let relay: SocketAddr = args[3].parse().unwrap_or_else(|_| usage());
    let seed: [u8; 32] = steelyard_proto::hex::decode(&args[4]).unwrap_or_else(|_| usage());
    let relay_id = args[5].clone();
    let queue = PathBuf::from(std::env::var("STEELYARD_SHIM_QUEUE").unwrap_or_else(|_| usage()));
    std::fs::create_dir_all(&queue).expect("queue dir");
    let signer = TicketSigner::from_seed(seed);
    match side {
        "a" => {
            let l = TcpListener::bind(listen).await.expect("bind");
            let mut n: u64 = 0;
            loop {
                let (client, _) = l.accept().await.expect("accept");
                let _ = client.set_nodelay(true);
                n += 1;
                let mut id = [0u8; 16];
                getrandom::getrandom(&mut id).expect("random");
                let sid = SessionId(id);
                let a = ticket(&signer, &relay_id, sid, Side::A);
                let b = ticket(&signer, &relay_id, sid, Side::B);
                let tmp = queue.join(format!(".{n}.tmp"));
                std::fs::write(&tmp, &b).expect("queue");
                std::fs::rename(&tmp, queue.join(format!("{sid}"))).expect("queue");
                tokio::spawn(async move {
                    match dial(relay, &a, Duration::from_secs(10)).await {
                        Ok(up) => pipe(client, up).await,
                        Err(e) => eprintln!("shim a: {e}"),
                    }
                });
            }
        }
        "b" => loop {
            let mut found = false;
            for e in std::fs::read_dir(&queue).expect("queue").flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') {
                    continue;
                }
                let Ok(t) = std::fs::read(e.path()) else {
                    continue;
                };
                let _ = std::fs::remove_file(e.path());
                found = true;
                tokio::spawn(async move {
                    match dial(relay, &t, Duration::from_secs(10)).await {
                        Ok(down) => match TcpStream::connect(listen).await {
                            Ok(server) => {
                                let _ = server.set_nodelay(true);
                                pipe(down, server).await
                            }
                            Err(e) => eprintln!("shim b: server: {e}"),
                        },
                        Err(e) => eprintln!("shim b: {e}"),
                    }
                });
            }
            if !found {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        },
        _ => usage(),
    }
}
