//! Path measurement: what one agent sees on its path to each relay of the relay map, as the
//! [`PathMetrics`] the broker's selection engine consumes.
//!
//! Per relay, one measurement is:
//!
//! 1. a **probe train** over UDP to the relay's probe responder: [`MeasureConfig::probes`]
//!    echo requests of [`MeasureConfig::probe_len`] bytes, one every
//!    [`MeasureConfig::spacing`], then up to [`MeasureConfig::timeout`] for late replies.
//!    RTT is the median of the answered probes (timed with the agent's own clock; the relay's
//!    timestamps are not trusted), loss is the share of probes without a valid reply;
//! 2. **hop count** from the TTL the relay observed on our probes. The sender's initial TTL is
//!    not on the wire, so it is guessed as the smallest of 64, 128 and 255 that is at least the
//!    observed TTL (the defaults of Linux/macOS, Windows and network gear), and
//!    `hops = initial − observed` (the smallest observed TTL of the train counts). On loopback
//!    that gives 0. A sender whose initial TTL is none of these, or a path longer than the gap
//!    between two guesses (over 63 hops), is mis-counted; a relay that cannot read the TTL
//!    (it answers 0) leaves the hop count unknown, reported as
//!    [`MeasureConfig::unknown_hops`];
//! 3. **TCP reachability**: the time to connect to the relay's TCP port (the connection is
//!    closed right away, before any hello). It is the RTT when UDP gets no answer, so a peer
//!    behind a UDP-blocking firewall still reports the relays it reaches by TCP;
//! 4. **available bandwidth** from the relay's burst endpoint, only when UDP works: a burst
//!    request, the relay's cookie (proof that we receive at our address), the request again with
//!    the cookie, then [`MeasureConfig::burst_packets`] packets; bandwidth is the bytes of the
//!    packets after the first divided by the spread of their arrival times.
//!
//! The decisions (matching replies to requests, median, loss, TTL guess, cookie handshake,
//! bandwidth arithmetic, what goes into [`PathMetrics`]) live in sans-I/O cores
//! ([`ProbeTrain`], [`BurstProbe`], [`Measurement::path_metrics`]) that take bytes and times;
//! [`measure_relay`] and [`measure_all`] are the thin tokio layer that owns sockets and clocks.
//!
//! Bytes per report cycle are fixed by the configuration: see [`MeasureConfig::udp_budget`]
//! (the integration tests check the real counters against it).
//!
//! Between reports, [`watch_relay`] sends a short train ([`WATCH_PROBES`] probes, no TCP, no
//! burst) and [`path_change`] decides whether the path moved beyond the broker's triggers, so
//! the caller can report before the schedule.
//!
//! 5. **TTL scan** ([`ttl_scan`], Linux/IPv4): when the relay answered but observed no TTL
//!    (and always with [`TtlScan::Only`]), one echo request per TTL with `IP_RECVERR`; the first
//!    TTL the relay answers gives the hops.
//!
//! What this module does not do: schedule cycles or send reports (the broker sets the schedule
//! and the broker channel sends them), or measure location.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use steelyard_relay::probe::MAX_BURST_PACKET_LEN;
use steelyard_relay::wire::{
    decode_probe, encode_probe, Probe, BURST_COOKIE_LEN, BURST_DATA_MIN_LEN, BURST_REQUEST_LEN,
    ECHO_LEN,
};
use steelyard_select::{PathMetrics, RelayId, Timestamp};
use tokio::net::{TcpStream, UdpSocket};

/// Most probes in one train (bounds the per-train state).
pub const MAX_PROBES: u16 = 2048;
/// Largest echo request the agent sends.
pub const MAX_PROBE_LEN: usize = 1200;

/// One relay of the relay map, as far as measuring it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// The relay's id.
    pub id: RelayId,
    /// The relay's probe responder (UDP); `None` when it has none.
    pub probe: Option<SocketAddr>,
    /// The relay's TCP session port.
    pub tcp: SocketAddr,
}

/// How to measure. Every field is bounded by [`MeasureConfig::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct MeasureConfig {
    /// Echo requests per train, 1..=[`MAX_PROBES`].
    pub probes: u16,
    /// Time between two echo requests.
    pub spacing: Duration,
    /// How long to wait for replies after the last request.
    pub timeout: Duration,
    /// Length of each echo request (and so of each reply), [`ECHO_LEN`]..=[`MAX_PROBE_LEN`].
    pub probe_len: usize,
    /// Longest time a TCP connect may take before the relay counts as unreachable over TCP.
    pub tcp_timeout: Duration,
    /// Packets to ask for in a bandwidth burst; 0 skips the bandwidth measurement.
    pub burst_packets: u16,
    /// Length of each burst packet, [`BURST_DATA_MIN_LEN`]..=[`MAX_BURST_PACKET_LEN`].
    pub burst_packet_len: u16,
    /// Longest wait for the cookie and then for the whole burst.
    pub burst_timeout: Duration,
    /// Hop count reported when the relay could not observe the TTL.
    pub unknown_hops: u32,
    /// Most relays measured at the same time, 1..=256.
    pub parallel: usize,
    /// When to count hops with a TTL scan instead of the relay-observed TTL.
    pub ttl_scan: TtlScan,
    /// Highest TTL a scan tries, 1..=64 (a relay further away gets `unknown_hops`).
    pub ttl_scan_max: u8,
}

/// When [`measure_relay`] runs a TTL scan ([`ttl_scan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlScan {
    /// Never: hops from the relay-observed TTL only.
    Off,
    /// When the relay answered but observed no TTL (the default).
    Fallback,
    /// Always, and hops come from the scan alone (to check the scan against a known path).
    Only,
}

impl Default for MeasureConfig {
    fn default() -> Self {
        Self {
            probes: 10,
            spacing: Duration::from_millis(20),
            timeout: Duration::from_millis(1000),
            probe_len: 64,
            tcp_timeout: Duration::from_millis(2000),
            burst_packets: 32,
            burst_packet_len: 1200,
            burst_timeout: Duration::from_millis(1000),
            unknown_hops: 16,
            parallel: 16,
            ttl_scan: TtlScan::Fallback,
            ttl_scan_max: 32,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("measurement setting {field} is out of range: {why}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// The allowed range.
    pub why: &'static str,
}

/// UDP payload bytes one relay's measurement sends and receives when nothing is lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// UDP payload bytes sent.
    pub udp_sent: u64,
    /// UDP payload bytes received.
    pub udp_received: u64,
    /// TCP connections opened (each costs a handshake and a close, no payload).
    pub tcp_connects: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Self) {
        self.udp_sent += o.udp_sent;
        self.udp_received += o.udp_received;
        self.tcp_connects += o.tcp_connects;
    }
}

impl MeasureConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, why| Err(ConfigError { field, why });
        if self.probes == 0 || self.probes > MAX_PROBES {
            return bad("probes", "1..=256");
        }
        if !(ECHO_LEN..=MAX_PROBE_LEN).contains(&self.probe_len) {
            return bad("probe_len", "28..=1200 bytes");
        }
        if self.spacing > Duration::from_secs(1) {
            return bad("spacing", "at most 1 s");
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(10) {
            return bad("timeout", "more than 0, at most 10 s");
        }
        if self.tcp_timeout.is_zero() || self.tcp_timeout > Duration::from_secs(10) {
            return bad("tcp_timeout", "more than 0, at most 10 s");
        }
        if !(BURST_DATA_MIN_LEN..=MAX_BURST_PACKET_LEN)
            .contains(&usize::from(self.burst_packet_len))
        {
            return bad("burst_packet_len", "20..=1400 bytes");
        }
        if self.burst_packets > 1024 {
            return bad("burst_packets", "0..=1024");
        }
        if self.burst_timeout > Duration::from_secs(10) {
            return bad("burst_timeout", "at most 10 s");
        }
        if !(1..=256).contains(&self.parallel) {
            return bad("parallel", "1..=256");
        }
        if !(1..=64).contains(&self.ttl_scan_max) {
            return bad("ttl_scan_max", "1..=64");
        }
        Ok(())
    }

    /// The traffic of one relay's measurement when every packet arrives and the relay grants
    /// the whole burst: the probe train both ways, two burst requests, one cookie, the burst,
    /// one TCP connect. This is the most a measurement moves per relay and report cycle (a
    /// relay caps bursts at its own `burst_max_packets`, so it can be less), except for a relay
    /// that observes no TTL: its TTL scan adds at most `ttl_scan_max × 28` bytes each way.
    pub fn udp_budget(&self) -> Traffic {
        let train = u64::from(self.probes) * self.probe_len as u64;
        let burst = if self.burst_packets == 0 {
            (0, 0)
        } else {
            (
                2 * BURST_REQUEST_LEN as u64,
                BURST_COOKIE_LEN as u64
                    + u64::from(self.burst_packets) * u64::from(self.burst_packet_len),
            )
        };
        Traffic {
            udp_sent: train + burst.0,
            udp_received: train + burst.1,
            tcp_connects: 1,
        }
    }
}

/// The smallest of the common initial TTLs (64, 128, 255) that is at least `observed`.
pub fn initial_ttl_guess(observed: u8) -> u8 {
    [64u8, 128, 255]
        .into_iter()
        .find(|&t| t >= observed)
        .unwrap_or(255)
}

/// Hops from a TTL the relay observed; `None` when it observed none (0).
pub fn hops_from_ttl(observed: u8) -> Option<u32> {
    (observed != 0).then(|| u32::from(initial_ttl_guess(observed) - observed))
}

/// The median of `values` (mean of the two middle ones for an even count); `None` if empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// What a probe train found.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainResult {
    /// Probes sent.
    pub sent: u16,
    /// Probes answered by a valid reply.
    pub answered: u16,
    /// Median RTT of the answered probes, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Share of probes without a reply, 0..=1 (1 when nothing was sent).
    pub loss: f64,
    /// Smallest non-zero TTL the relay observed, if any.
    pub observed_ttl: Option<u8>,
    /// Last load hint (percent) the relay gave, if any.
    pub load: Option<u8>,
    /// Whether the relay said it is draining.
    pub draining: bool,
}

/// Sans-I/O probe train: builds echo requests, matches replies, computes RTT, loss and TTL.
///
/// Times are microseconds from any origin the caller keeps fixed (a monotonic clock). A
/// reply counts only if its sequence number is one this train sent and not yet answered and it
/// echoes that request's timestamp; anything else is ignored.
#[derive(Debug)]
pub struct ProbeTrain {
    base: u32,
    count: u16,
    len: usize,
    sent_at: Vec<Option<u64>>,
    rtt_us: Vec<Option<u64>>,
    min_ttl: Option<u8>,
    load: Option<u8>,
    draining: bool,
}

impl ProbeTrain {
    /// A train of `count` (clamped to 1..=[`MAX_PROBES`]) requests of `len` bytes whose
    /// sequence numbers start at `base` (pick it at random so that off-path guesses fail).
    pub fn new(base: u32, count: u16, len: usize) -> Self {
        let count = count.clamp(1, MAX_PROBES);
        Self {
            base,
            count,
            len: len.clamp(ECHO_LEN, MAX_PROBE_LEN),
            sent_at: vec![None; usize::from(count)],
            rtt_us: vec![None; usize::from(count)],
            min_ttl: None,
            load: None,
            draining: false,
        }
    }

    /// Requests in the train.
    pub fn len(&self) -> u16 {
        self.count
    }

    /// Always false: a train has at least one request.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th request, recorded as sent at `now_us`; `None` past the end of the train.
    pub fn request(&mut self, i: u16, now_us: u64) -> Option<Vec<u8>> {
        let slot = self.sent_at.get_mut(usize::from(i))?;
        *slot = Some(now_us);
        Some(encode_probe(&Probe::EchoRequest {
            seq: self.base.wrapping_add(u32::from(i)),
            client_ts: now_us,
            len: self.len,
        }))
    }

    /// Feeds one datagram received at `now_us`. Returns whether it was a new valid reply.
    pub fn on_datagram(&mut self, bytes: &[u8], now_us: u64) -> bool {
        let Ok(Probe::EchoReply {
            seq,
            client_ts,
            ttl,
            load,
            draining,
            ..
        }) = decode_probe(bytes)
        else {
            return false;
        };
        let i = seq.wrapping_sub(self.base) as usize;
        let (Some(Some(sent)), Some(rtt)) = (self.sent_at.get(i), self.rtt_us.get(i)) else {
            return false;
        };
        if *sent != client_ts || rtt.is_some() {
            return false;
        }
        self.rtt_us[i] = Some(now_us.saturating_sub(*sent));
        if ttl != 0 {
            self.min_ttl = Some(self.min_ttl.map_or(ttl, |m| m.min(ttl)));
        }
        if load != 255 {
            self.load = Some(load);
        }
        self.draining |= draining;
        true
    }

    /// The index of the first request answered, if any.
    pub fn first_answered(&self) -> Option<u16> {
        self.rtt_us
            .iter()
            .position(Option::is_some)
            .map(|i| i as u16)
    }

    /// Whether every request sent so far has been answered and the whole train was sent.
    pub fn complete(&self) -> bool {
        self.rtt_us.iter().all(Option::is_some)
    }

    /// The train's result. Requests never sent count as lost.
    pub fn result(&self) -> TrainResult {
        let sent = self.sent_at.iter().filter(|s| s.is_some()).count() as u16;
        let mut rtts: Vec<f64> = self
            .rtt_us
            .iter()
            .flatten()
            .map(|&us| us as f64 / 1000.0)
            .collect();
        let answered = rtts.len() as u16;
        TrainResult {
            sent,
            answered,
            rtt_ms: median(&mut rtts),
            loss: if self.count == 0 {
                1.0
            } else {
                f64::from(self.count - answered) / f64::from(self.count)
            },
            observed_ttl: self.min_ttl,
            load: self.load,
            draining: self.draining,
        }
    }
}

/// Where a [`BurstProbe`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BurstState {
    /// Waiting for the relay's cookie.
    AwaitingCookie,
    /// Cookie sent back; receiving the burst.
    Receiving,
    /// Every packet of the burst arrived.
    Done,
}

/// Sans-I/O bandwidth probe: the cookie handshake and the arithmetic over arrival times.
#[derive(Debug)]
pub struct BurstProbe {
    seq: u32,
    packets: u16,
    packet_len: u16,
    state: BurstState,
    seen: Vec<bool>,
    expected: u16,
    bytes: u64,
    first_len: u64,
    first_us: Option<u64>,
    last_us: u64,
}

impl BurstProbe {
    /// A probe asking for `packets` (1..=1024) packets of `packet_len` bytes, with sequence
    /// number `seq`.
    pub fn new(seq: u32, packets: u16, packet_len: u16) -> Self {
        let packets = packets.clamp(1, 1024);
        Self {
            seq,
            packets,
            packet_len,
            state: BurstState::AwaitingCookie,
            seen: vec![false; usize::from(packets)],
            expected: packets,
            bytes: 0,
            first_len: 0,
            first_us: None,
            last_us: 0,
        }
    }

    /// The first request (without a cookie).
    pub fn start(&self) -> Vec<u8> {
        self.request([0; 16])
    }

    fn request(&self, cookie: [u8; 16]) -> Vec<u8> {
        encode_probe(&Probe::BurstRequest {
            seq: self.seq,
            cookie,
            packets: self.packets,
            packet_len: self.packet_len,
        })
    }

    /// Where the probe stands.
    pub fn state(&self) -> BurstState {
        self.state
    }

    /// Feeds one datagram received at `now_us`; returns a datagram to send, if any (the
    /// request with the cookie, once the cookie arrives).
    pub fn on_datagram(&mut self, bytes: &[u8], now_us: u64) -> Option<Vec<u8>> {
        match (self.state, decode_probe(bytes)) {
            (BurstState::AwaitingCookie, Ok(Probe::BurstCookie { seq, cookie }))
                if seq == self.seq =>
            {
                self.state = BurstState::Receiving;
                Some(self.request(cookie))
            }
            (
                BurstState::Receiving,
                Ok(Probe::BurstData {
                    seq,
                    index,
                    count,
                    len,
                    ..
                }),
            ) if seq == self.seq && count >= 1 && count <= self.packets && index < count => {
                let i = usize::from(index);
                if self.seen[i] {
                    return None;
                }
                self.seen[i] = true;
                self.expected = count;
                self.bytes += len as u64;
                if self.first_us.is_none() {
                    self.first_us = Some(now_us);
                    self.first_len = len as u64;
                }
                self.last_us = now_us;
                if self.received() >= usize::from(count) {
                    self.state = BurstState::Done;
                }
                None
            }
            _ => None,
        }
    }

    /// Burst packets received so far.
    pub fn received(&self) -> usize {
        self.seen.iter().filter(|s| **s).count()
    }

    /// UDP payload bytes of burst data received.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Available bandwidth in kbit/s: the bytes after the first packet over the spread of
    /// arrival times (at least 1 µs). `None` with fewer than two packets.
    pub fn bandwidth_kbps(&self) -> Option<u64> {
        let first = self.first_us?;
        if self.received() < 2 {
            return None;
        }
        let spread_us = self.last_us.saturating_sub(first).max(1);
        let bits = (self.bytes - self.first_len) * 8;
        // bits per µs = Mbit/s; × 1000 = kbit/s.
        Some(bits.saturating_mul(1000) / spread_us)
    }
}

/// Everything measured towards one relay.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The relay.
    pub relay: RelayId,
    /// The probe train's result, when the relay has a probe address.
    pub train: Option<TrainResult>,
    /// TCP connect time in milliseconds, `None` if the connect failed or timed out.
    pub tcp_connect_ms: Option<f64>,
    /// Bandwidth from the burst, in kbit/s.
    pub bandwidth_kbps: Option<u64>,
    /// Hops found by a TTL scan, when one ran ([`MeasureConfig::ttl_scan`]) and found the relay.
    pub scanned_hops: Option<u32>,
    /// Bytes this measurement actually moved.
    pub traffic: Traffic,
    /// When it was taken (unix ms).
    pub measured_at: Timestamp,
}

impl Measurement {
    /// Whether the relay answered over UDP.
    pub fn udp(&self) -> bool {
        self.train.as_ref().is_some_and(|t| t.answered > 0)
    }

    /// The path metrics to report, or `None` when the relay is unreachable over both UDP and
    /// TCP (it is then left out of the report, which the broker reads as unreachable).
    ///
    /// RTT is the UDP median when UDP works, else the TCP connect time. Loss is the train's
    /// loss when UDP works; a TCP-only path reports 0 (TCP hides loss behind retransmission
    /// and there is no UDP evidence). Hops come from a TTL scan when one ran, else from the
    /// observed TTL, or `unknown_hops` when there is neither.
    pub fn path_metrics(&self, unknown_hops: u32) -> Option<PathMetrics> {
        let udp = self.udp();
        let tcp = self.tcp_connect_ms.is_some();
        let train = self.train.as_ref().filter(|_| udp);
        let rtt_ms = match train {
            Some(t) => t.rtt_ms?,
            None => self.tcp_connect_ms?,
        };
        Some(PathMetrics {
            rtt_ms,
            hops: self
                .scanned_hops
                .or_else(|| train.and_then(|t| t.observed_ttl).and_then(hops_from_ttl))
                .unwrap_or(unknown_hops),
            loss: train.map_or(0.0, |t| t.loss.clamp(0.0, 1.0)),
            bandwidth_kbps: self.bandwidth_kbps,
            udp,
            tcp,
            measured_at: self.measured_at,
        })
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        // Not secret, only hard to guess; fall back to the clock.
        return SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    }
    u32::from_be_bytes(b)
}

async fn bind_udp_for(target: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(target).await?;
    Ok(sock)
}

async fn run_train(addr: SocketAddr, cfg: &MeasureConfig, traffic: &mut Traffic) -> TrainResult {
    let mut train = ProbeTrain::new(random_u32(), cfg.probes, cfg.probe_len);
    let Ok(sock) = bind_udp_for(addr).await else {
        return train.result();
    };
    let origin = Instant::now();
    let us = |at: Instant| at.duration_since(origin).as_micros() as u64;
    let mut buf = vec![0u8; 2048];
    let mut next = 0u16;
    let mut next_at = tokio::time::Instant::now();
    let mut deadline = None;
    loop {
        if next < train.len() {
            tokio::select! {
                _ = tokio::time::sleep_until(next_at) => {
                    if let Some(req) = train.request(next, us(Instant::now())) {
                        // A send error (e.g. ICMP unreachable reported on a connected socket)
                        // is a lost probe.
                        if sock.send(&req).await.is_ok() {
                            traffic.udp_sent += req.len() as u64;
                        }
                    }
                    next += 1;
                    next_at += cfg.spacing;
                    if next == train.len() {
                        deadline = Some(tokio::time::Instant::now() + cfg.timeout);
                    }
                }
                r = sock.recv(&mut buf) => {
                    if let Ok(n) = r {
                        traffic.udp_received += n as u64;
                        train.on_datagram(&buf[..n], us(Instant::now()));
                    }
                }
            }
        } else {
            if train.complete() {
                break;
            }
            let Some(d) = deadline else { break };
            match tokio::time::timeout_at(d, sock.recv(&mut buf)).await {
                Err(_) => break,
                Ok(Ok(n)) => {
                    traffic.udp_received += n as u64;
                    train.on_datagram(&buf[..n], us(Instant::now()));
                }
                // ECONNREFUSED from an earlier ICMP error: keep waiting for real replies.
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
    train.result()
}

async fn run_burst(addr: SocketAddr, cfg: &MeasureConfig, traffic: &mut Traffic) -> Option<u64> {
    if cfg.burst_packets == 0 || cfg.burst_timeout.is_zero() {
        return None;
    }
    let sock = bind_udp_for(addr).await.ok()?;
    let mut probe = BurstProbe::new(random_u32(), cfg.burst_packets, cfg.burst_packet_len);
    let origin = Instant::now();
    let start = probe.start();
    sock.send(&start).await.ok()?;
    traffic.udp_sent += start.len() as u64;
    let deadline = tokio::time::Instant::now() + cfg.burst_timeout;
    let mut buf = vec![0u8; 2048];
    while probe.state() != BurstState::Done {
        match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => break,
            Ok(Err(_)) => return None,
            Ok(Ok(n)) => {
                traffic.udp_received += n as u64;
                let now = origin.elapsed().as_micros() as u64;
                if let Some(reply) = probe.on_datagram(&buf[..n], now) {
                    sock.send(&reply).await.ok()?;
                    traffic.udp_sent += reply.len() as u64;
                }
            }
        }
    }
    probe.bandwidth_kbps()
}

async fn tcp_connect_ms(addr: SocketAddr, timeout: Duration) -> Option<f64> {
    let start = Instant::now();
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let ms = start.elapsed().as_secs_f64() * 1000.0;
            drop(stream);
            Some(ms)
        }
        _ => None,
    }
}

/// Counts the routers to the relay's probe responder at `addr`: one echo request per TTL from
/// 1 to [`MeasureConfig::ttl_scan_max`], all at once from one socket with `IP_RECVERR`, so the
/// kernel hands over the ICMP time-exceeded answers of the routers on the error queue. The
/// first TTL the relay answers is the hop count plus one ([`scan_hops`]); the scan ends when
/// every lower TTL has expired, or after [`MeasureConfig::timeout`]. Linux and IPv4 only
/// (elsewhere `None`). Moves at most `ttl_scan_max × 28` bytes each way.
pub async fn ttl_scan(addr: SocketAddr, cfg: &MeasureConfig, traffic: &mut Traffic) -> Option<u32> {
    #[cfg(target_os = "linux")]
    {
        linux_scan::run(addr, cfg, traffic).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (addr, cfg, traffic);
        None
    }
}

#[cfg(target_os = "linux")]
mod linux_scan {
    use std::io::IoSliceMut;
    use std::net::SocketAddr;
    use std::os::fd::AsFd;
    use std::time::Instant;

    use nix::sys::socket::{
        recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn,
    };
    use steelyard_relay::wire::{decode_probe, Probe};
    use tokio::io::Interest;
    use tokio::net::UdpSocket;

    use super::{bind_udp_for, random_u32, scan_hops, MeasureConfig, ProbeTrain, Traffic};

    /// `SO_EE_ORIGIN_ICMP` and ICMP type 11, time exceeded.
    const ORIGIN_ICMP: u8 = 2;
    const TIME_EXCEEDED: u8 = 11;

    /// One entry of the error queue: the scan index of an expired request, if it was one.
    fn read_error(sock: &UdpSocket, base: u32, count: u16) -> std::io::Result<Option<u16>> {
        let mut data = [0u8; 256];
        let mut cmsg = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in);
        let (n, expired) = {
            let mut iov = [IoSliceMut::new(&mut data)];
            let msg = recvmsg::<SockaddrIn>(
                std::os::fd::AsRawFd::as_raw_fd(&sock.as_fd()),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_ERRQUEUE,
            )
            .map_err(std::io::Error::from)?;
            let expired = msg.cmsgs().map_err(std::io::Error::from)?.any(|c| {
                matches!(c, ControlMessageOwned::Ipv4RecvErr(e, _)
                    if e.ee_origin == ORIGIN_ICMP && e.ee_type == TIME_EXCEEDED)
            });
            (msg.bytes, expired)
        };
        Ok(match decode_probe(&data[..n.min(data.len())]) {
            Ok(Probe::EchoRequest { seq, .. }) if expired => {
                let i = seq.wrapping_sub(base);
                (i < u32::from(count)).then_some(i as u16)
            }
            _ => None,
        })
    }

    pub(super) async fn run(
        addr: SocketAddr,
        cfg: &MeasureConfig,
        traffic: &mut Traffic,
    ) -> Option<u32> {
        if !addr.is_ipv4() {
            return None;
        }
        let sock = bind_udp_for(addr).await.ok()?;
        setsockopt(&sock.as_fd(), sockopt::Ipv4RecvErr, &true).ok()?;
        let base = random_u32();
        let count = u16::from(cfg.ttl_scan_max);
        let mut train = ProbeTrain::new(base, count, super::ECHO_LEN);
        let origin = Instant::now();
        let us = |at: Instant| at.duration_since(origin).as_micros() as u64;
        for i in 0..count {
            setsockopt(&sock.as_fd(), sockopt::Ipv4Ttl, &(i32::from(i) + 1)).ok()?;
            if let Some(req) = train.request(i, us(Instant::now())) {
                // With IP_RECVERR a send reports (and clears) an ICMP error that came back for
                // an earlier request instead of sending: send again.
                for _ in 0..3 {
                    if sock.send(&req).await.is_ok() {
                        traffic.udp_sent += req.len() as u64;
                        break;
                    }
                }
            }
        }
        let mut expired = vec![false; usize::from(count)];
        let deadline = tokio::time::Instant::now() + cfg.timeout;
        let mut buf = vec![0u8; 2048];
        loop {
            if scan_hops(train.first_answered(), &expired).1 {
                break;
            }
            tokio::select! {
                r = sock.recv(&mut buf) => {
                    // With IP_RECVERR a queued ICMP error is also reported here once.
                    if let Ok(n) = r {
                        traffic.udp_received += n as u64;
                        train.on_datagram(&buf[..n], us(Instant::now()));
                    }
                }
                r = sock.async_io(Interest::ERROR, || read_error(&sock, base, count)) => {
                    match r {
                        Ok(Some(i)) => expired[usize::from(i)] = true,
                        Ok(None) => {}
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        scan_hops(train.first_answered(), &expired).0
    }
}

/// Measures one relay: the probe train and the TCP connect at once, then the bandwidth burst
/// if UDP answered. Takes at most about `probes × spacing + timeout + burst_timeout`.
pub async fn measure_relay(target: &RelayTarget, cfg: &MeasureConfig) -> Measurement {
    let measured_at = Timestamp::from_millis(unix_ms());
    let mut traffic = Traffic::default();
    let (train, tcp_connect_ms) = match target.probe {
        Some(addr) => {
            let (t, tcp) = tokio::join!(
                run_train(addr, cfg, &mut traffic),
                tcp_connect_ms(target.tcp, cfg.tcp_timeout)
            );
            (Some(t), tcp)
        }
        None => (None, tcp_connect_ms(target.tcp, cfg.tcp_timeout).await),
    };
    traffic.tcp_connects += 1;
    let bandwidth_kbps = match (target.probe, &train) {
        (Some(addr), Some(t)) if t.answered > 0 => run_burst(addr, cfg, &mut traffic).await,
        _ => None,
    };
    let scanned_hops = match (target.probe, &train, cfg.ttl_scan) {
        (Some(addr), Some(t), TtlScan::Fallback) if t.answered > 0 && t.observed_ttl.is_none() => {
            ttl_scan(addr, cfg, &mut traffic).await
        }
        (Some(addr), Some(t), TtlScan::Only) if t.answered > 0 => {
            // The scan alone: a failed scan must show as unknown, not as the observed TTL.
            let hops = ttl_scan(addr, cfg, &mut traffic).await;
            Some(hops.unwrap_or(cfg.unknown_hops))
        }
        _ => None,
    };
    Measurement {
        relay: target.id.clone(),
        train,
        tcp_connect_ms,
        bandwidth_kbps,
        scanned_hops,
        traffic,
        measured_at,
    }
}

/// What a TTL scan found, from the first TTL the relay answered (`first_answered`: index into
/// the scan, TTL − 1) and which TTLs came back as ICMP time-exceeded: `(hops, done)`, where
/// `hops` is the routers before the relay (`None` until it answered) and `done` says that every
/// TTL below the answering one has expired on the way, so nothing more can change the answer.
/// Sans-I/O.
pub fn scan_hops(first_answered: Option<u16>, expired: &[bool]) -> (Option<u32>, bool) {
    match first_answered {
        None => (None, false),
        Some(k) => {
            let below = &expired[..usize::from(k).min(expired.len())];
            (Some(u32::from(k)), below.iter().all(|e| *e))
        }
    }
}

/// Between reports, a light check of the paths: what the last report said about one relay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reported {
    /// The reported RTT, ms, when the relay answered over UDP.
    pub udp_rtt_ms: Option<f64>,
}

/// Probe trains of [`WATCH_PROBES`] echo requests, no TCP connect, no burst: the watch between
/// two reports. Per relay and watch: `WATCH_PROBES × probe_len` bytes each way.
pub const WATCH_PROBES: u16 = 3;
/// An RTT change smaller than this never counts as a path change (loopback and LAN jitter).
pub const MIN_RTT_CHANGE_MS: f64 = 1.0;

/// Whether a watch result differs enough from the last report to report before the schedule:
/// the relay became reachable or unreachable over UDP (when `on_reachability` is set), or its
/// RTT moved by more than `rtt_ratio` of the reported one (and by at least
/// [`MIN_RTT_CHANGE_MS`]; `rtt_ratio` ≤ 0 turns this off). `before` is `None` for a relay the
/// last report did not list. The reason says which relay and what moved. Sans-I/O.
pub fn path_change(
    relay: &str,
    before: Option<Reported>,
    now: &TrainResult,
    rtt_ratio: f64,
    on_reachability: bool,
) -> Option<String> {
    let before_rtt = before.and_then(|b| b.udp_rtt_ms);
    match (before_rtt, now.rtt_ms) {
        (Some(_), None) if on_reachability => {
            Some(format!("relay {relay} stopped answering over UDP"))
        }
        (None, Some(rtt)) if on_reachability => Some(format!(
            "relay {relay} answers over UDP again ({rtt:.1} ms)"
        )),
        (Some(a), Some(b))
            if rtt_ratio > 0.0
                && (b - a).abs() >= MIN_RTT_CHANGE_MS
                && (b - a).abs() > rtt_ratio * a =>
        {
            Some(format!(
                "RTT to relay {relay} moved from {a:.1} ms to {b:.1} ms (more than {:.0} %)",
                rtt_ratio * 100.0
            ))
        }
        _ => None,
    }
}

/// The watch of one relay: a train of [`WATCH_PROBES`] echo requests with `cfg`'s length,
/// spacing and timeout; `None` when the relay has no probe address.
pub async fn watch_relay(target: &RelayTarget, cfg: &MeasureConfig) -> Option<TrainResult> {
    let addr = target.probe?;
    let cfg = MeasureConfig {
        probes: WATCH_PROBES,
        ..cfg.clone()
    };
    Some(run_train(addr, &cfg, &mut Traffic::default()).await)
}

/// The result of one report cycle.
#[derive(Debug, Clone, PartialEq)]
pub struct CycleReport {
    /// Path metrics of every relay reached over UDP or TCP, in relay-map order. A relay not
    /// listed was not reachable.
    pub paths: Vec<(RelayId, PathMetrics)>,
    /// Every relay's raw measurement, reachable or not.
    pub measurements: Vec<Measurement>,
    /// Traffic of the whole cycle.
    pub traffic: Traffic,
}

/// Measures every relay in `targets`, at most [`MeasureConfig::parallel`] at a time
/// (duplicate ids are measured once). Validates `cfg` first.
pub async fn measure_all(
    targets: &[RelayTarget],
    cfg: &MeasureConfig,
) -> Result<CycleReport, ConfigError> {
    cfg.validate()?;
    let mut seen = HashMap::new();
    let mut set = tokio::task::JoinSet::new();
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.parallel));
    for (i, t) in targets.iter().enumerate() {
        if seen.insert(t.id.clone(), i).is_some() {
            continue;
        }
        let (t, cfg, permits) = (t.clone(), cfg.clone(), permits.clone());
        set.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await.ok();
            (i, measure_relay(&t, &cfg).await)
        });
    }
    let mut results = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    let mut report = CycleReport {
        paths: Vec::new(),
        measurements: Vec::new(),
        traffic: Traffic::default(),
    };
    for (_, m) in results {
        report.traffic += m.traffic;
        if let Some(p) = m.path_metrics(cfg.unknown_hops) {
            report.paths.push((m.relay.clone(), p));
        }
        report.measurements.push(m);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u32, client_ts: u64, ttl: u8) -> Vec<u8> {
        encode_probe(&Probe::EchoReply {
            seq,
            client_ts,
            relay_rx_us: 0,
            ttl,
            load: 12,
            draining: false,
        })
    }

    #[test]
    fn scan_hops_from_the_first_answer_and_done_when_the_lower_ttls_expired() {
        assert_eq!(scan_hops(None, &[true, true]), (None, false));
        // TTL 1 answered: no router.
        assert_eq!(scan_hops(Some(0), &[false; 4]), (Some(0), true));
        // TTL 3 answered; TTL 1 and 2 expired at two routers.
        assert_eq!(
            scan_hops(Some(2), &[true, true, false, false]),
            (Some(2), true)
        );
        // TTL 2's expiry has not come back yet: the answer may still be right, not done.
        assert_eq!(scan_hops(Some(2), &[true, false, false]), (Some(2), false));
        let bad = MeasureConfig {
            ttl_scan_max: 0,
            ..MeasureConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "ttl_scan_max");
    }

    #[test]
    fn path_changes_follow_the_triggers() {
        let train = |rtt: Option<f64>| TrainResult {
            sent: 3,
            answered: if rtt.is_some() { 3 } else { 0 },
            rtt_ms: rtt,
            loss: if rtt.is_some() { 0.0 } else { 1.0 },
            observed_ttl: None,
            load: None,
            draining: false,
        };
        let was = |rtt| {
            Some(Reported {
                udp_rtt_ms: Some(rtt),
            })
        };
        // RTT: beyond the ratio and the floor.
        let r = path_change("r1", was(10.0), &train(Some(20.0)), 0.5, true).unwrap();
        assert!(r.contains("from 10.0 ms to 20.0 ms"), "{r}");
        assert_eq!(
            path_change("r1", was(10.0), &train(Some(14.0)), 0.5, true),
            None
        );
        assert_eq!(
            path_change("r1", was(0.1), &train(Some(0.9)), 0.5, true),
            None
        );
        assert_eq!(
            path_change("r1", was(10.0), &train(Some(40.0)), 0.0, true),
            None
        );
        // Reachability, only when asked for.
        let r = path_change("r1", was(10.0), &train(None), 0.5, true).unwrap();
        assert!(r.contains("stopped answering"), "{r}");
        assert_eq!(path_change("r1", was(10.0), &train(None), 0.5, false), None);
        let r = path_change("r1", None, &train(Some(3.0)), 0.5, true).unwrap();
        assert!(r.contains("answers over UDP again"), "{r}");
        let tcp_only = Some(Reported { udp_rtt_ms: None });
        assert_eq!(path_change("r1", tcp_only, &train(None), 0.5, true), None);
    }

    #[test]
    fn ttl_guess_and_hops() {
        assert_eq!(initial_ttl_guess(64), 64);
        assert_eq!(initial_ttl_guess(1), 64);
        assert_eq!(initial_ttl_guess(65), 128);
        assert_eq!(initial_ttl_guess(200), 255);
        assert_eq!(initial_ttl_guess(255), 255);
        assert_eq!(hops_from_ttl(64), Some(0));
        assert_eq!(hops_from_ttl(57), Some(7));
        assert_eq!(hops_from_ttl(113), Some(15));
        assert_eq!(hops_from_ttl(250), Some(5));
        assert_eq!(hops_from_ttl(0), None);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut [f64::NAN, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn train_matches_replies_and_counts_loss() {
        let mut t = ProbeTrain::new(u32::MAX - 1, 4, 64);
        let reqs: Vec<_> = (0..4)
            .map(|i| t.request(i, 1000 * u64::from(i)).unwrap())
            .collect();
        assert!(t.request(4, 0).is_none());
        assert!(reqs.iter().all(|r| r.len() == 64));
        // seq wraps: base u32::MAX-1, so request 2 has seq 0.
        assert!(t.on_datagram(&reply(u32::MAX - 1, 0, 60), 3000));
        assert!(t.on_datagram(&reply(0, 2000, 61), 3000));
        // Duplicate, wrong timestamp, unknown seq, garbage: ignored.
        assert!(!t.on_datagram(&reply(0, 2000, 61), 3500));
        assert!(!t.on_datagram(&reply(1, 9999, 61), 3500));
        assert!(!t.on_datagram(&reply(77, 0, 61), 3500));
        assert!(!t.on_datagram(b"garbage", 3500));
        assert!(!t.complete());
        let r = t.result();
        assert_eq!((r.sent, r.answered), (4, 2));
        assert_eq!(r.loss, 0.5);
        assert_eq!(r.rtt_ms, Some(2.0)); // RTTs 3 ms and 1 ms
        assert_eq!(r.observed_ttl, Some(60));
        assert_eq!(r.load, Some(12));
    }

    #[test]
    fn burst_cookie_then_bandwidth() {
        let mut b = BurstProbe::new(7, 4, 1000);
        assert_eq!(
            decode_probe(&b.start()),
            Ok(Probe::BurstRequest {
                seq: 7,
                cookie: [0; 16],
                packets: 4,
                packet_len: 1000
            })
        );
        // Data before the cookie is ignored.
        let data = |index, seq| {
            encode_probe(&Probe::BurstData {
                seq,
                index,
                count: 4,
                relay_tx_us: 0,
                len: 1000,
            })
        };
        assert_eq!(b.on_datagram(&data(0, 7), 0), None);
        assert_eq!(b.received(), 0);
        let cookie = encode_probe(&Probe::BurstCookie {
            seq: 7,
            cookie: [9; 16],
        });
        let again = b.on_datagram(&cookie, 0).unwrap();
        assert_eq!(
            decode_probe(&again),
            Ok(Probe::BurstRequest {
                seq: 7,
                cookie: [9; 16],
                packets: 4,
                packet_len: 1000
            })
        );
        assert_eq!(b.bandwidth_kbps(), None);
        b.on_datagram(&data(0, 7), 1_000);
        b.on_datagram(&data(0, 7), 1_500); // duplicate
        b.on_datagram(&data(1, 8), 1_500); // other seq
        b.on_datagram(&data(2, 7), 2_000);
        b.on_datagram(&data(3, 7), 3_000);
        assert_eq!(b.state(), BurstState::Receiving);
        // 2 packets after the first, 16000 bits over 2000 µs = 8 Mbit/s.
        assert_eq!(b.bandwidth_kbps(), Some(8_000));
        b.on_datagram(&data(1, 7), 3_000);
        assert_eq!(b.state(), BurstState::Done);
        assert_eq!(b.bytes(), 4000);
    }

    #[test]
    fn path_metrics_rules() {
        let train = |answered, ttl| TrainResult {
            sent: 4,
            answered,
            rtt_ms: (answered > 0).then_some(1.5),
            loss: f64::from(4 - answered) / 4.0,
            observed_ttl: ttl,
            load: None,
            draining: false,
        };
        let m = |train, tcp| Measurement {
            relay: RelayId::new("r"),
            train,
            tcp_connect_ms: tcp,
            bandwidth_kbps: Some(5),
            scanned_hops: None,
            traffic: Traffic::default(),
            measured_at: Timestamp::from_millis(9),
        };
        let p = m(Some(train(3, Some(62))), Some(0.5))
            .path_metrics(16)
            .unwrap();
        assert_eq!(
            (p.rtt_ms, p.hops, p.loss, p.udp, p.tcp),
            (1.5, 2, 0.25, true, true)
        );
        let p = m(Some(train(0, None)), Some(0.5)).path_metrics(16).unwrap();
        assert_eq!(
            (p.rtt_ms, p.hops, p.loss, p.udp, p.tcp),
            (0.5, 16, 0.0, false, true)
        );
        let p = m(None, Some(0.5)).path_metrics(16).unwrap();
        assert!(!p.udp && p.tcp);
        let p = m(Some(train(4, None)), None).path_metrics(16).unwrap();
        assert_eq!((p.hops, p.udp, p.tcp), (16, true, false));
        // A TTL scan's count wins over the observed TTL and the unknown default.
        let mut scanned = m(Some(train(4, None)), None);
        scanned.scanned_hops = Some(3);
        assert_eq!(scanned.path_metrics(16).unwrap().hops, 3);
        assert_eq!(m(Some(train(0, None)), None).path_metrics(16), None);
    }

    #[test]
    fn config_bounds_and_budget() {
        let c = MeasureConfig::default();
        assert_eq!(c.validate(), Ok(()));
        let b = c.udp_budget();
        assert_eq!(b.udp_sent, 10 * 64 + 2 * 28);
        assert_eq!(b.udp_received, 10 * 64 + 24 + 32 * 1200);
        for bad in [
            MeasureConfig {
                probes: 0,
                ..c.clone()
            },
            MeasureConfig {
                probe_len: 10,
                ..c.clone()
            },
            MeasureConfig {
                burst_packet_len: 5000,
                ..c.clone()
            },
            MeasureConfig {
                timeout: Duration::ZERO,
                ..c.clone()
            },
            MeasureConfig {
                parallel: 0,
                ..c.clone()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
