//! Zero-copy forwarding between two paired TCP connections with `splice(2)` through a pipe per
//! direction (Linux). Bytes never enter user space.
//!
//! A direction gets its pipe when its first bytes arrive. When it cannot have one (the relay's
//! `max_pipes` are in use, or `pipe2` fails: per-user pipe memory, out of descriptors) it copies
//! through a 64 KiB userspace buffer instead, and counts a fallback; the session works either
//! way. A pipe that cannot be enlarged (`F_SETPIPE_SZ` refused) is used at its default size and
//! counted too.
//!
//! Each direction moves socket → pipe → socket until the source sends FIN, then shuts down the
//! write half of the destination (so half-close passes through) and stops; the session ends
//! when both directions have, or at the first error (either side reset), the idle timeout, the
//! ticket's total byte limit, or a cut from the relay (end of a drain's grace).
//!
//! Rate limits: a token bucket per direction from the sending side's ticket
//! (`max_bytes_per_sec`) and an optional relay-wide bucket shared by all sessions.
//!
//! What it does not do: read the hello, pair, or count sessions (the TCP module does).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::limit::TokenBucket;

/// Most bytes moved by one splice call (and the pipe size asked for).
const CHUNK: usize = 256 * 1024;

/// Limits of one direction.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirLimits {
    /// Bytes per second; 0 = unlimited.
    pub bytes_per_sec: u64,
    /// Total bytes; 0 = unlimited.
    pub max_total: u64,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their write half.
    Closed,
    /// No bytes either way for the idle timeout.
    Idle,
    /// A side reached its ticket's total byte limit.
    Limit,
    /// The relay cut the session.
    Cut,
    /// A socket error (reset, …).
    Error,
}

/// A relay-wide bandwidth limit shared by all sessions.
pub type SharedBucket = Arc<Mutex<TokenBucket>>;

/// Bytes of the userspace buffer of a direction that has no pipe.
const COPY_BUF: usize = 64 * 1024;

/// How many pipes the relay may hold, and the counters of pipe use. Shared by all sessions.
#[derive(Debug, Clone, Copy)]
pub struct PipeBudget<'a> {
    /// Most pipes open at once (two per busy session); 0 = always copy through userspace.
    pub max_open: u64,
    /// Pipes open now.
    pub open: &'a AtomicU64,
    /// Directions that got no pipe and copy through userspace.
    pub fallbacks: &'a AtomicU64,
    /// Pipes left at their default size because `F_SETPIPE_SZ` was refused.
    pub resize_failures: &'a AtomicU64,
}

/// A pipe, counted in its budget's `open` gauge until dropped.
struct Pipe<'a> {
    r: OwnedFd,
    w: OwnedFd,
    open: &'a AtomicU64,
}

impl Drop for Pipe<'_> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Relaxed);
    }
}

/// How a direction moves bytes.
enum Mover<'a> {
    Pipe(Pipe<'a>),
    Copy(Box<[u8]>),
}

impl<'a> PipeBudget<'a> {
    /// A pipe if the budget and the kernel allow, else a copy buffer (counted).
    fn mover(&self) -> Mover<'a> {
        if self.open.fetch_add(1, Relaxed) >= self.max_open {
            self.open.fetch_sub(1, Relaxed);
            return self.fallback("the relay's max_pipes are in use".into());
        }
        match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok((r, w)) => {
                // A bigger pipe means fewer syscalls; the default (64 KiB, or less over the
                // per-user soft limit) still works.
                if fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32)).is_err() {
                    self.resize_failures.fetch_add(1, Relaxed);
                }
                Mover::Pipe(Pipe {
                    r,
                    w,
                    open: self.open,
                })
            }
            Err(e) => {
                self.open.fetch_sub(1, Relaxed);
                self.fallback(format!("pipe2 failed: {e}"))
            }
        }
    }

    fn fallback(&self, why: String) -> Mover<'a> {
        self.fallbacks.fetch_add(1, Relaxed);
        tracing::debug!("no splice pipe ({why}): copying through userspace");
        Mover::Copy(vec![0u8; COPY_BUF].into_boxed_slice())
    }
}

fn origin() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_us() -> u64 {
    origin().elapsed().as_micros() as u64
}

struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    pipes: PipeBudget<'a>,
    limits: DirLimits,
    global: Option<&'a SharedBucket>,
    activity: &'a AtomicU64,
    counter: &'a AtomicU64,
}

enum DirEnd {
    Eof,
    Limit,
}

async fn one_way(d: Dir<'_>) -> io::Result<DirEnd> {
    // The pipe (or copy buffer) is made when the first bytes arrive: an idle session holds
    // none (two file descriptors and its kernel buffers fewer per direction).
    let mut mover: Option<Mover<'_>> = None;
    let mut own =
        (d.limits.bytes_per_sec > 0).then(|| TokenBucket::new(d.limits.bytes_per_sec, now_us()));
    let mut moved: u64 = 0;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let mut want = CHUNK as u64;
        if d.limits.max_total > 0 {
            if moved >= d.limits.max_total {
                return Ok(DirEnd::Limit);
            }
            want = want.min(d.limits.max_total - moved);
        }
        // Rate limits: wait until the buckets grant something.
        if let Some(b) = own.as_mut() {
            loop {
                let g = b.take_up_to(want, now_us());
                if g > 0 {
                    want = g;
                    break;
                }
                tokio::time::sleep(Duration::from_micros(b.wait_us(want.min(16 * 1024)))).await;
            }
        }
        if let Some(global) = d.global {
            loop {
                let (g, wait) = {
                    let mut b = global.lock().unwrap_or_else(|e| e.into_inner());
                    let g = b.take_up_to(want, now_us());
                    (g, b.wait_us(want.min(16 * 1024)))
                };
                if g > 0 {
                    if let Some(b) = own.as_mut() {
                        b.give_back(want - g);
                    }
                    want = g;
                    break;
                }
                tokio::time::sleep(Duration::from_micros(wait)).await;
            }
        }
        // socket -> pipe (or buffer). The pipe is empty here, so EAGAIN can only mean "socket
        // empty".
        let n = loop {
            d.src.readable().await?;
            if mover.is_none() {
                // Readiness can be left over from reading the hello: peek first, so that the
                // pipe is made only when bytes (or the FIN) are really there.
                let mut b = [0u8; 1];
                match d.src.try_io(Interest::READABLE, || {
                    nix::sys::socket::recv(
                        d.src.as_raw_fd(),
                        &mut b,
                        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                    )
                    .map_err(io::Error::from)
                }) {
                    Ok(_) => mover = Some(d.pipes.mover()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            let r = match mover.as_mut() {
                Some(Mover::Pipe(pipe)) => d.src.try_io(Interest::READABLE, || {
                    splice(d.src.as_fd(), None, &pipe.w, None, want as usize, flags)
                        .map_err(io::Error::from)
                }),
                Some(Mover::Copy(buf)) => {
                    let len = buf.len().min(want as usize);
                    d.src.try_read(&mut buf[..len])
                }
                None => return Err(io::Error::other("no pipe or buffer after the peek")),
            };
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if let Some(b) = own.as_mut() {
            b.give_back(want - n as u64);
        }
        if n == 0 {
            // FIN from the source: pass the half-close on.
            let _ =
                nix::sys::socket::shutdown(d.dst.as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(DirEnd::Eof);
        }
        // pipe (or buffer) -> socket until it is empty again.
        let mut done = 0;
        while done < n {
            d.dst.writable().await?;
            let r = match mover.as_ref() {
                Some(Mover::Pipe(pipe)) => d.dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe.r, None, d.dst.as_fd(), None, n - done, flags)
                        .map_err(io::Error::from)
                }),
                Some(Mover::Copy(buf)) => d.dst.try_write(&buf[done..n]),
                None => return Err(io::Error::other("no pipe or buffer after a read")),
            };
            match r {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
                Ok(m) => done += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
        d.counter.fetch_add(n as u64, Relaxed);
        d.activity.store(now_us(), Relaxed);
    }
}

/// Parameters of one spliced session.
pub struct SpliceSession<'a> {
    /// Side A's connection.
    pub a: &'a TcpStream,
    /// Side B's connection.
    pub b: &'a TcpStream,
    /// Limits on what A sends (from A's ticket).
    pub a_limits: DirLimits,
    /// Limits on what B sends.
    pub b_limits: DirLimits,
    /// Idle timeout.
    pub idle: Duration,
    /// Relay-wide bandwidth limit.
    pub global: Option<&'a SharedBucket>,
    /// The relay's pipes.
    pub pipes: PipeBudget<'a>,
    /// Counter of bytes A → B.
    pub a_to_b: &'a AtomicU64,
    /// Counter of bytes B → A.
    pub b_to_a: &'a AtomicU64,
}

/// Forwards between the two connections until the session ends or `cut` completes.
pub async fn run(s: SpliceSession<'_>, cut: impl std::future::Future<Output = ()>) -> End {
    let activity = AtomicU64::new(now_us());
    let ab = one_way(Dir {
        src: s.a,
        dst: s.b,
        pipes: s.pipes,
        limits: s.a_limits,
        global: s.global,
        activity: &activity,
        counter: s.a_to_b,
    });
    let ba = one_way(Dir {
        src: s.b,
        dst: s.a,
        pipes: s.pipes,
        limits: s.b_limits,
        global: s.global,
        activity: &activity,
        counter: s.b_to_a,
    });
    let both = async {
        let (x, y) = tokio::try_join!(
            async {
                match ab.await? {
                    DirEnd::Eof => Ok(()),
                    DirEnd::Limit => Err(io::Error::other("limit")),
                }
            },
            async {
                match ba.await? {
                    DirEnd::Eof => Ok(()),
                    DirEnd::Limit => Err(io::Error::other("limit")),
                }
            }
        )
        .map(|_| ((), ()))
        .map_err(|e| {
            if e.to_string() == "limit" {
                End::Limit
            } else {
                End::Error
            }
        })?;
        let _ = (x, y);
        Ok::<(), End>(())
    };
    let idle = async {
        loop {
            let last = activity.load(Relaxed);
            let since = Duration::from_micros(now_us().saturating_sub(last));
            if since >= s.idle {
                return;
            }
            tokio::time::sleep(s.idle - since + Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        r = both => match r { Ok(()) => End::Closed, Err(e) => e },
        () = idle => End::Idle,
        () = cut => End::Cut,
    }
}
