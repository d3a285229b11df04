//! Counters and gauges of a running relay, the `/status` JSON document (the load report) and
//! the Prometheus text exposition for `/metrics`.
//!
//! What it does not do: serve HTTP (see the server module) or decide anything.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use serde::Serialize;

use crate::config::RelayConfig;
use crate::udp_core::DropReason;
use crate::wire::StatusCode;

/// All counters, updated lock-free from the data path.
#[derive(Debug, Default)]
pub struct Metrics {
    /// TCP connections accepted.
    pub tcp_accepted: AtomicU64,
    /// TCP connections refused before the hello (connection limits).
    pub tcp_refused_conn_limit: AtomicU64,
    /// TCP connections currently open (any phase).
    pub tcp_open: AtomicU64,
    /// Status codes sent on TCP, by [`StatusCode::index`].
    pub tcp_status: [AtomicU64; StatusCode::ALL.len()],
    /// UDP status datagrams sent, by code.
    pub udp_status: [AtomicU64; StatusCode::ALL.len()],
    /// TCP sessions paired (total).
    pub tcp_sessions_total: AtomicU64,
    /// TCP sessions active now.
    pub tcp_active: AtomicU64,
    /// TCP first sides waiting now.
    pub tcp_pending: AtomicU64,
    /// TCP sessions ended by idle timeout.
    pub tcp_idle_closed: AtomicU64,
    /// TCP sessions ended by the ticket's total byte limit.
    pub tcp_limit_closed: AtomicU64,
    /// TCP sessions cut at the end of a drain.
    pub tcp_drain_cut: AtomicU64,
    /// Bytes forwarded from side A to side B (TCP and UDP).
    pub bytes_a_to_b: AtomicU64,
    /// Bytes forwarded from side B to side A (TCP and UDP).
    pub bytes_b_to_a: AtomicU64,
    /// UDP datagrams forwarded.
    pub udp_forwarded: AtomicU64,
    /// UDP GSO sends (each carried two or more forwarded datagrams to one destination).
    pub udp_gso_sends: AtomicU64,
    /// TCP session directions that could not get a pipe for `splice(2)` (`max_pipes`, pipe
    /// memory limit, out of descriptors) and copied through userspace instead.
    pub tcp_pipe_fallbacks: AtomicU64,
    /// Splice pipes open now.
    pub tcp_pipes_open: AtomicU64,
    /// Pipes used at their default size because the kernel refused to enlarge them.
    pub tcp_pipe_resize_failures: AtomicU64,
    /// UDP datagrams dropped, by [`DropReason::index`].
    pub udp_dropped: [AtomicU64; 6],
    /// UDP sessions now (including half-bound).
    pub udp_sessions: AtomicU64,
    /// UDP sessions with both sides bound.
    pub udp_active: AtomicU64,
    /// Probe echo replies sent.
    pub probe_echo: AtomicU64,
    /// Probe burst packets sent.
    pub probe_burst_packets: AtomicU64,
    /// Probe datagrams ignored.
    pub probe_ignored: AtomicU64,
    /// Whether draining.
    pub draining: AtomicBool,
    /// Latest sample of rates and CPU.
    pub sample: Mutex<Sample>,
}

/// Rates computed by the sampler once a second.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Sample {
    /// Bytes per second A → B.
    pub bytes_per_sec_a_to_b: f64,
    /// Bytes per second B → A.
    pub bytes_per_sec_b_to_a: f64,
    /// CPU used by the relay process, in cores (1.0 = one core busy).
    pub cpu_cores: f64,
    /// CPU seconds used since start.
    pub cpu_seconds_total: f64,
}

/// The `/status` document: the relay's load report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Relay id.
    pub relay_id: String,
    /// Whether draining.
    pub draining: bool,
    /// Active sessions (TCP paired + UDP both bound).
    pub active_sessions: u64,
    /// Waiting first sides (TCP) and half-bound UDP sessions.
    pub pending_sessions: u64,
    /// Capacity.
    pub max_sessions: u32,
    /// Capacity in bytes per second (0 = unlimited).
    pub max_bandwidth_bytes_per_sec: u64,
    /// Bytes forwarded A → B since start.
    pub bytes_a_to_b: u64,
    /// Bytes forwarded B → A since start.
    pub bytes_b_to_a: u64,
    /// Latest rates and CPU.
    #[serde(flatten)]
    pub sample: Sample,
    /// Number of CPUs.
    pub cpus: usize,
    /// Load in percent: the highest of sessions, bandwidth and CPU against capacity.
    pub load_percent: u8,
    /// Location.
    pub region: Option<String>,
    /// Latitude.
    pub lat: Option<f64>,
    /// Longitude.
    pub lon: Option<f64>,
}

impl Metrics {
    /// Counts a TCP status sent.
    pub fn tcp_status_sent(&self, code: StatusCode) {
        self.tcp_status[code.index()].fetch_add(1, Relaxed);
    }

    /// Active sessions over TCP and UDP.
    pub fn active_sessions(&self) -> u64 {
        self.tcp_active.load(Relaxed) + self.udp_active.load(Relaxed)
    }

    /// Pending sessions.
    pub fn pending_sessions(&self) -> u64 {
        self.tcp_pending.load(Relaxed)
            + self
                .udp_sessions
                .load(Relaxed)
                .saturating_sub(self.udp_active.load(Relaxed))
    }

    /// Load in percent against `cfg`'s capacity.
    pub fn load_percent(&self, cfg: &RelayConfig) -> u8 {
        let s = self.sample();
        let sessions = (self.active_sessions() + self.pending_sessions()) as f64
            / f64::from(cfg.capacity.max_sessions.max(1));
        let bw = match cfg.capacity.max_bandwidth_bytes_per_sec {
            0 => 0.0,
            m => (s.bytes_per_sec_a_to_b + s.bytes_per_sec_b_to_a) / m as f64,
        };
        let cpu = s.cpu_cores / cpus() as f64;
        (sessions.max(bw).max(cpu) * 100.0).clamp(0.0, 100.0) as u8
    }

    /// The latest sample.
    pub fn sample(&self) -> Sample {
        self.sample.lock().map(|s| *s).unwrap_or_default()
    }

    /// Builds the status report.
    pub fn status(&self, cfg: &RelayConfig) -> StatusReport {
        StatusReport {
            relay_id: cfg.relay_id.clone(),
            draining: self.draining.load(Relaxed),
            active_sessions: self.active_sessions(),
            pending_sessions: self.pending_sessions(),
            max_sessions: cfg.capacity.max_sessions,
            max_bandwidth_bytes_per_sec: cfg.capacity.max_bandwidth_bytes_per_sec,
            bytes_a_to_b: self.bytes_a_to_b.load(Relaxed),
            bytes_b_to_a: self.bytes_b_to_a.load(Relaxed),
            sample: self.sample(),
            cpus: cpus(),
            load_percent: self.load_percent(cfg),
            region: cfg.location.region.clone(),
            lat: cfg.location.lat,
            lon: cfg.location.lon,
        }
    }

    /// Prometheus text exposition.
    pub fn render_prometheus(&self, cfg: &RelayConfig) -> String {
        let mut o = String::with_capacity(4096);
        let s = self.sample();
        let mut g = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            "steelyard_relay_active_sessions",
            "gauge",
            "Paired sessions (TCP and UDP).",
            self.active_sessions() as f64,
        );
        g(
            "steelyard_relay_pending_sessions",
            "gauge",
            "First sides waiting for their partner.",
            self.pending_sessions() as f64,
        );
        g(
            "steelyard_relay_max_sessions",
            "gauge",
            "Session capacity.",
            f64::from(cfg.capacity.max_sessions),
        );
        g(
            "steelyard_relay_max_bandwidth_bytes_per_second",
            "gauge",
            "Bandwidth capacity (0 = unlimited).",
            cfg.capacity.max_bandwidth_bytes_per_sec as f64,
        );
        g(
            "steelyard_relay_draining",
            "gauge",
            "1 while draining.",
            f64::from(u8::from(self.draining.load(Relaxed))),
        );
        g(
            "steelyard_relay_load_percent",
            "gauge",
            "Highest of session, bandwidth and CPU load, percent.",
            f64::from(self.load_percent(cfg)),
        );
        g(
            "steelyard_relay_cpu_seconds_total",
            "counter",
            "CPU seconds used by the relay process.",
            s.cpu_seconds_total,
        );
        g(
            "steelyard_relay_cpu_cores",
            "gauge",
            "CPU in use, in cores, over the last second.",
            s.cpu_cores,
        );
        g(
            "steelyard_relay_tcp_connections_open",
            "gauge",
            "Open TCP connections in any phase.",
            self.tcp_open.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            self.tcp_accepted.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_connections_refused_total",
            "counter",
            "TCP connections closed at once by connection limits.",
            self.tcp_refused_conn_limit.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_sessions_total",
            "counter",
            "TCP sessions paired.",
            self.tcp_sessions_total.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_idle_closed_total",
            "counter",
            "TCP sessions closed by idle timeout.",
            self.tcp_idle_closed.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_limit_closed_total",
            "counter",
            "TCP sessions closed at the ticket's byte limit.",
            self.tcp_limit_closed.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_drain_cut_total",
            "counter",
            "TCP sessions cut when the drain grace ended.",
            self.tcp_drain_cut.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_udp_sessions",
            "gauge",
            "UDP sessions, including half-bound.",
            self.udp_sessions.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_udp_forwarded_total",
            "counter",
            "UDP datagrams forwarded.",
            self.udp_forwarded.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_udp_gso_sends_total",
            "counter",
            "UDP GSO sends, each carrying two or more forwarded datagrams.",
            self.udp_gso_sends.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_pipe_fallbacks_total",
            "counter",
            "TCP session directions that got no splice pipe and copied through userspace.",
            self.tcp_pipe_fallbacks.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_pipes_open",
            "gauge",
            "Splice pipes open.",
            self.tcp_pipes_open.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_tcp_pipe_resize_failures_total",
            "counter",
            "Splice pipes left at their default size (F_SETPIPE_SZ refused).",
            self.tcp_pipe_resize_failures.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_probe_echo_total",
            "counter",
            "Probe echo replies sent.",
            self.probe_echo.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_probe_burst_packets_total",
            "counter",
            "Probe burst packets sent.",
            self.probe_burst_packets.load(Relaxed) as f64,
        );
        g(
            "steelyard_relay_probe_ignored_total",
            "counter",
            "Probe datagrams ignored.",
            self.probe_ignored.load(Relaxed) as f64,
        );
        let _ = writeln!(o, "# HELP steelyard_relay_bytes_total Bytes forwarded, by direction.\n# TYPE steelyard_relay_bytes_total counter");
        let _ = writeln!(
            o,
            "steelyard_relay_bytes_total{{direction=\"a_to_b\"}} {}",
            self.bytes_a_to_b.load(Relaxed)
        );
        let _ = writeln!(
            o,
            "steelyard_relay_bytes_total{{direction=\"b_to_a\"}} {}",
            self.bytes_b_to_a.load(Relaxed)
        );
        let _ = writeln!(o, "# HELP steelyard_relay_status_total Status codes sent, by transport and code.\n# TYPE steelyard_relay_status_total counter");
        for code in StatusCode::ALL {
            for (t, arr) in [("tcp", &self.tcp_status), ("udp", &self.udp_status)] {
                let _ = writeln!(
                    o,
                    "steelyard_relay_status_total{{transport=\"{t}\",code=\"{}\"}} {}",
                    code.name(),
                    arr[code.index()].load(Relaxed)
                );
            }
        }
        let _ = writeln!(o, "# HELP steelyard_relay_udp_dropped_total UDP datagrams dropped, by reason.\n# TYPE steelyard_relay_udp_dropped_total counter");
        for r in DropReason::ALL {
            let _ = writeln!(
                o,
                "steelyard_relay_udp_dropped_total{{reason=\"{}\"}} {}",
                r.name(),
                self.udp_dropped[r.index()].load(Relaxed)
            );
        }
        o
    }

    /// Updates the sample from the byte counters and `/proc/self/stat`; call about once a second
    /// with the previous totals and the elapsed seconds.
    pub fn update_sample(&self, prev: &mut (u64, u64, f64), elapsed_secs: f64) {
        let ab = self.bytes_a_to_b.load(Relaxed);
        let ba = self.bytes_b_to_a.load(Relaxed);
        let cpu = cpu_seconds().unwrap_or(prev.2);
        let dt = elapsed_secs.max(1e-3);
        let s = Sample {
            bytes_per_sec_a_to_b: ab.saturating_sub(prev.0) as f64 / dt,
            bytes_per_sec_b_to_a: ba.saturating_sub(prev.1) as f64 / dt,
            cpu_cores: (cpu - prev.2).max(0.0) / dt,
            cpu_seconds_total: cpu,
        };
        *prev = (ab, ba, cpu);
        if let Ok(mut g) = self.sample.lock() {
            *g = s;
        }
    }
}

/// Number of CPUs available.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU seconds (user + system) used by this process, from `/proc/self/stat`.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_proc_stat_cpu(&stat, clock_ticks())
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Parses utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in seconds.
pub fn parse_proc_stat_cpu(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    // The command name (field 2) may contain spaces and parentheses; fields restart after the
    // last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14, i.e. the 12th item of rest.
    let utime: f64 = f.nth(11)?.parse().ok()?;
    let stime: f64 = f.next()?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let line = "1234 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_proc_stat_cpu(line, 100.0), Some(3.0));
        assert_eq!(parse_proc_stat_cpu("garbage", 100.0), None);
        assert!(cpu_seconds().is_some());
    }

    #[test]
    fn exposition_has_the_main_series() {
        let m = Metrics::default();
        let cfg = RelayConfig::default();
        let text = m.render_prometheus(&cfg);
        for name in [
            "steelyard_relay_active_sessions 0",
            "steelyard_relay_draining 0",
            "steelyard_relay_bytes_total{direction=\"a_to_b\"} 0",
            "steelyard_relay_status_total{transport=\"tcp\",code=\"forged\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
