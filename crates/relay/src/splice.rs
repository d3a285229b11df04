//! Zero-copy forwarding between two paired TCP connections with `splice(2)` through a pipe per
//! direction (Linux). Bytes never enter user space.
//!
//! A [`Session`] owns both connections and is a future polled by hand (no `async` state
//! machine, no readiness futures: `poll_read_ready`/`poll_write_ready` keep the wakers in the
//! sockets' own registrations), so an idle paired session costs its task plus a few hundred
//! bytes: the two sockets, two directions' state, a boxed idle timer and the cut signal.
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
//! (`max_bytes_per_sec`) and an optional relay-wide bucket shared by all sessions; a direction
//! that must wait for tokens gets a timer then, and only then.
//!
//! What it does not do: read the hello, pair, or count sessions (the TCP module does).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::limit::TokenBucket;
use crate::metrics::Metrics;

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

/// What a session shares with the rest of the relay: its counters (pipes open, fallbacks,
/// resize failures, bytes each way), the pipe budget and the relay-wide bandwidth limit.
#[derive(Clone)]
pub struct Env {
    /// The relay's counters.
    pub metrics: Arc<Metrics>,
    /// Most pipes open at once (two per busy session); 0 = always copy through userspace.
    pub max_pipes: u64,
    /// Relay-wide bandwidth limit.
    pub global: Option<SharedBucket>,
}

/// How a direction moves bytes. A pipe is counted in `tcp_pipes_open` until the session drops
/// it.
enum Mover {
    Pipe { r: OwnedFd, w: OwnedFd },
    Copy(Box<[u8]>),
}

impl Env {
    /// A pipe if the budget and the kernel allow, else a copy buffer (counted).
    fn mover(&self) -> Mover {
        let m = &self.metrics;
        if m.tcp_pipes_open.fetch_add(1, Relaxed) >= self.max_pipes {
            m.tcp_pipes_open.fetch_sub(1, Relaxed);
            return self.fallback("the relay's max_pipes are in use".into());
        }
        match nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC) {
            Ok((r, w)) => {
                // A bigger pipe means fewer syscalls; the default (64 KiB, or less over the
                // per-user soft limit) still works.
                if fcntl(&w, FcntlArg::F_SETPIPE_SZ(CHUNK as i32)).is_err() {
                    m.tcp_pipe_resize_failures.fetch_add(1, Relaxed);
                }
                Mover::Pipe { r, w }
            }
            Err(e) => {
                m.tcp_pipes_open.fetch_sub(1, Relaxed);
                self.fallback(format!("pipe2 failed: {e}"))
            }
        }
    }

    fn fallback(&self, why: String) -> Mover {
        self.metrics.tcp_pipe_fallbacks.fetch_add(1, Relaxed);
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

enum DirEnd {
    Eof,
    Limit,
}

/// One direction's state between polls.
struct Dir {
    limits: DirLimits,
    /// The sending side's own rate limit.
    own: Option<TokenBucket>,
    /// Made when the first bytes arrive.
    mover: Option<Mover>,
    /// A rate limit's wait, while one lasts.
    wait: Option<Pin<Box<Sleep>>>,
    /// Bytes granted by the rate limits for the next read (0: none asked yet).
    granted: u64,
    /// Bytes read and not yet written (in the pipe, or `buf[done..done + pending]`).
    pending: usize,
    done: usize,
    moved: u64,
    finished: bool,
}

impl Dir {
    fn new(limits: DirLimits) -> Self {
        Self {
            limits,
            own: (limits.bytes_per_sec > 0)
                .then(|| TokenBucket::new(limits.bytes_per_sec, now_us())),
            mover: None,
            wait: None,
            granted: 0,
            pending: 0,
            done: 0,
            moved: 0,
            finished: false,
        }
    }

    /// Waits for `d` in this direction's timer.
    fn poll_wait(&mut self, cx: &mut Context<'_>, d: Duration) -> Poll<()> {
        let at = Instant::now() + d;
        match self.wait.as_mut() {
            Some(w) => w.as_mut().reset(at),
            None => self.wait = Some(Box::pin(tokio::time::sleep_until(at))),
        }
        if let Some(w) = self.wait.as_mut() {
            ready!(w.as_mut().poll(cx));
        }
        self.wait = None;
        Poll::Ready(())
    }

    /// How many bytes the rate limits grant the next read (at most `want`), or pending.
    fn poll_grant(&mut self, cx: &mut Context<'_>, env: &Env, want: u64) -> Poll<u64> {
        if self.granted > 0 {
            return Poll::Ready(self.granted);
        }
        if let Some(w) = self.wait.as_mut() {
            ready!(w.as_mut().poll(cx));
            self.wait = None;
        }
        let mut want = want;
        loop {
            if let Some(b) = self.own.as_mut() {
                let g = b.take_up_to(want, now_us());
                if g == 0 {
                    let us = b.wait_us(want.min(16 * 1024));
                    ready!(self.poll_wait(cx, Duration::from_micros(us)));
                    continue;
                }
                want = g;
            }
            if let Some(global) = &env.global {
                let (g, us) = {
                    let mut b = global.lock().unwrap_or_else(|e| e.into_inner());
                    let g = b.take_up_to(want, now_us());
                    (g, b.wait_us(want.min(16 * 1024)))
                };
                if g == 0 {
                    if let Some(b) = self.own.as_mut() {
                        b.give_back(want);
                    }
                    ready!(self.poll_wait(cx, Duration::from_micros(us)));
                    continue;
                }
                if let Some(b) = self.own.as_mut() {
                    b.give_back(want - g);
                }
                want = g;
            }
            self.granted = want;
            return Poll::Ready(want);
        }
    }

    /// Moves bytes from `src` to `dst` until it would block (pending) or the direction ends.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        env: &Env,
        counter: &AtomicU64,
        activity: &mut u64,
    ) -> Poll<io::Result<DirEnd>> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            // pipe (or buffer) -> socket until it is empty again.
            if self.pending > 0 {
                ready!(dst.poll_write_ready(cx))?;
                let r = match &self.mover {
                    Some(Mover::Pipe { r, .. }) => dst.try_io(Interest::WRITABLE, || {
                        splice(r, None, dst.as_fd(), None, self.pending, flags)
                            .map_err(io::Error::from)
                    }),
                    Some(Mover::Copy(buf)) => {
                        dst.try_write(&buf[self.done..self.done + self.pending])
                    }
                    None => {
                        return Poll::Ready(Err(io::Error::other("bytes but no pipe or buffer")))
                    }
                };
                match r {
                    Ok(0) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "wrote 0 bytes",
                        )))
                    }
                    Ok(m) => {
                        self.pending -= m;
                        self.done += m;
                        self.moved += m as u64;
                        counter.fetch_add(m as u64, Relaxed);
                        *activity = now_us();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            let mut want = CHUNK as u64;
            if self.limits.max_total > 0 {
                if self.moved >= self.limits.max_total {
                    return Poll::Ready(Ok(DirEnd::Limit));
                }
                want = want.min(self.limits.max_total - self.moved);
            }
            if self.own.is_some() || env.global.is_some() {
                want = ready!(self.poll_grant(cx, env, want));
            }
            // socket -> pipe (or buffer). The pipe is empty here, so EAGAIN can only mean
            // "socket empty".
            ready!(src.poll_read_ready(cx))?;
            if self.mover.is_none() {
                // Readiness can be left over from reading the hello: peek first, so that the
                // pipe is made only when bytes (or the FIN) are really there.
                let mut b = [0u8; 1];
                match src.try_io(Interest::READABLE, || {
                    nix::sys::socket::recv(
                        src.as_raw_fd(),
                        &mut b,
                        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                    )
                    .map_err(io::Error::from)
                }) {
                    Ok(_) => self.mover = Some(env.mover()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let r = match self.mover.as_mut() {
                Some(Mover::Pipe { w, .. }) => src.try_io(Interest::READABLE, || {
                    splice(src.as_fd(), None, &*w, None, want as usize, flags)
                        .map_err(io::Error::from)
                }),
                Some(Mover::Copy(buf)) => {
                    let len = buf.len().min(want as usize);
                    src.try_read(&mut buf[..len])
                }
                None => {
                    return Poll::Ready(Err(io::Error::other("no pipe or buffer after the peek")))
                }
            };
            let n = match r {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            };
            if let Some(b) = self.own.as_mut() {
                b.give_back(self.granted.saturating_sub(n as u64));
            }
            self.granted = 0;
            if n == 0 {
                // FIN from the source: pass the half-close on.
                let _ =
                    nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write);
                return Poll::Ready(Ok(DirEnd::Eof));
            }
            self.pending = n;
            self.done = 0;
        }
    }
}

/// Two paired connections forwarding to each other: a future that ends with the session.
/// Side A's bytes count in `bytes_a_to_b`, side B's in `bytes_b_to_a`.
pub struct Session {
    a: TcpStream,
    b: TcpStream,
    /// A → B, then B → A.
    dirs: [Dir; 2],
    env: Env,
    idle: Duration,
    /// When bytes last moved either way, microseconds on this module's clock.
    activity: u64,
    idle_timer: Pin<Box<Sleep>>,
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Session {
    /// A session between `a` and `b`, with limits on what each sends, ended after `idle`
    /// without bytes either way, or when `cut` completes.
    pub fn new(
        a: TcpStream,
        b: TcpStream,
        (a_limits, b_limits): (DirLimits, DirLimits),
        idle: Duration,
        env: Env,
        cut: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self {
            a,
            b,
            dirs: [Dir::new(a_limits), Dir::new(b_limits)],
            env,
            idle,
            activity: now_us(),
            idle_timer: Box::pin(tokio::time::sleep(idle + Duration::from_millis(5))),
            cut: Box::pin(cut),
        }
    }
}

impl Future for Session {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let s = self.get_mut();
        if s.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Cut);
        }
        for i in 0..2 {
            let (src, dst, counter) = if i == 0 {
                (&s.a, &s.b, &s.env.metrics.bytes_a_to_b)
            } else {
                (&s.b, &s.a, &s.env.metrics.bytes_b_to_a)
            };
            let d = &mut s.dirs[i];
            if d.finished {
                continue;
            }
            match d.poll_move(cx, src, dst, &s.env, counter, &mut s.activity) {
                Poll::Ready(Ok(DirEnd::Eof)) => d.finished = true,
                Poll::Ready(Ok(DirEnd::Limit)) => return Poll::Ready(End::Limit),
                Poll::Ready(Err(_)) => return Poll::Ready(End::Error),
                Poll::Pending => {}
            }
        }
        if s.dirs.iter().all(|d| d.finished) {
            return Poll::Ready(End::Closed);
        }
        // The idle timer is reset only when it fires (not on every byte moved).
        while s.idle_timer.as_mut().poll(cx).is_ready() {
            let since = Duration::from_micros(now_us().saturating_sub(s.activity));
            if since >= s.idle {
                return Poll::Ready(End::Idle);
            }
            let at = Instant::now() + (s.idle - since) + Duration::from_millis(5);
            s.idle_timer.as_mut().reset(at);
        }
        Poll::Pending
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for d in &self.dirs {
            if let Some(Mover::Pipe { .. }) = d.mover {
                self.env.metrics.tcp_pipes_open.fetch_sub(1, Relaxed);
            }
        }
    }
}
