#!/usr/bin/env bash
# Relayed UDP datagrams per second (200-byte payload) and per CPU second: relay vs coturn 4.6.
# Prints markdown table rows on stdout, progress on stderr.
#
# coturn: turnserver on 127.0.0.1 (static user, no TLS/DTLS, --no-cli, relay-ip 127.0.0.1,
# loopback peers allowed), driven by its own turnutils_uclient (50 allocations, 200-byte
# messages, -z 0) against turnutils_peer (echo). Each echoed message was relayed twice by
# turnserver (client -> peer, peer -> client), so relayed = 2 x tot_recv_msgs from uclient's own
# per-second progress lines; turnserver's CPU (on-CPU ns of all its threads,
# /proc/PID/task/*/schedstat; /proc/PID/stat counts only 10 ms ticks) over the same window.
# ours: 200-byte payloads through the relay (crates/relay/examples/relay_load.rs udp); relayed =
# datagrams delivered. Ours runs four ways per round, after coturn's round:
#  * sessions: like for like with uclient: as many relay sessions as uclient has allocations
#    (ALLOC, 50), each with its own tickets and side A / side B sockets, offered what uclient
#    was seen to send on the wire: each burst (BURST back to back) from ONE allocation, the
#    allocations taking turns, each for (messages per allocation / BURST) bursts; side B
#    echoes each on the session's own socket, as turnutils_peer echoes to each allocation's
#    relayed address. At coturn's rate in that round.
#  * spread: the same 50 sessions, each burst spread one datagram per session (what uclient
#    was assumed to do; it does not, see the calibration's flows per burst), so no two
#    datagrams of a burst go to the same destination.
#  * burst: the same offered pattern through ONE relay session. Before the rounds, one
#    unmeasured calibration run of uclient is captured with tcpdump on lo (tcpdump is never on
#    during a measured round: on lo its tap is charged to the sending process) and its data
#    datagrams to turnserver are split into bursts at gaps > 500 us. relay_load then sends
#    bursts of the median size (uclient's steady tick: one message per allocation; larger
#    bursts are catch-ups when it runs late, which relay_load does by itself too) from side A,
#    back to back, at the rate coturn reached in that round (so every burst/rate seconds), and
#    side B echoes each datagram like turnutils_peer.
#    After the rounds one relay_load run of each burst mode is captured the same way to check
#    the pattern (and, for sessions, how many distinct sessions each burst covers).
#  * paced: both sides send at coturn's rate, topped up every millisecond (a few per tick).
#  * flat out: both sides send as fast as they can.
# Every row gives datagrams per context switch of the relaying process (all threads,
# /proc/PID/task/*/status): the per-datagram cost at a given rate depends mostly on how many
# datagrams each wakeup finds, i.e. on how bursty the load generator is.
# Env: RELAY_BENCH_SECS (5), RELAY_BENCH_ROUNDS (3), RELAY_BENCH_ALLOC (50: uclient -m and our
# --sessions).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${RELAY_BENCH_SECS:-5}
ROUNDS=${RELAY_BENCH_ROUNDS:-3}
ALLOC=${RELAY_BENCH_ALLOC:-50}
# Messages per allocation in a measured coturn round: its message phase lasts about DUR s at
# ~12k/s.
N_MSG=$((DUR * 240))
log() { echo "[relay-udp] $*" >&2; }
command -v turnserver >/dev/null || { log "installing coturn"; apt-get install -y coturn >&2; }
command -v tcpdump >/dev/null || { log "installing tcpdump"; apt-get install -y tcpdump >&2; }
log "building release binaries"
cargo build --release -p steelyard-relay --example relay_load >&2
cargo build --release -p steelyard --bin steelyard >&2
LOAD=target/release/examples/relay_load
WORK=$(mktemp -d)
PIDS=()
# The relay drains on SIGTERM and exits at once on a second one. Everything is gone (and its
# ports free for the next run) before this returns.
cleanup() {
  local p i
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for i in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
# Splits the data datagrams of a pcap (UDP payload >= 200 bytes) matching "src PORTS" or
# "dst PORTS" (PORTS: comma-separated) into bursts at gaps > 500 us; prints JSON: bursts, mean
# and median size, mean and median interval between burst starts, rate, the median number of
# distinct flows (source and destination port pairs: allocations or sessions) per burst, and
# in all.
burst_pattern() {
  python3 - "$@" <<'PY'
import json, statistics as st, struct, sys
path, which, ports = sys.argv[1], sys.argv[2], {int(p) for p in sys.argv[3].split(",")}
f = open(path, "rb")
hdr = f.read(24)
if len(hdr) < 24:
    sys.exit(f"{path}: no pcap header (did tcpdump run?)")
nano = struct.unpack("<I", hdr[:4])[0] == 0xA1B23C4D
ts, peers = [], []
while len(h := f.read(16)) == 16:
    sec, frac, incl, _ = struct.unpack("<IIII", h)
    d = f.read(incl)
    ip = d[14:]  # lo is EN10MB
    if len(ip) < 28 or ip[9] != 17:
        continue
    ihl = (ip[0] & 15) * 4
    sp, dp, ulen = struct.unpack("!HHH", ip[ihl:ihl + 6])
    if ulen - 8 >= 200 and (sp if which == "src" else dp) in ports:
        ts.append(sec + frac / (1e9 if nano else 1e6))
        peers.append((sp, dp))
if len(ts) < 100:
    sys.exit(f"{path}: only {len(ts)} data datagrams with {which} port in {sorted(ports)}")
sizes, starts, n, distinct, cur = [], [ts[0]], 1, [], {peers[0]}
for a, b, p in zip(ts, ts[1:], peers[1:]):
    if b - a > 500e-6:
        sizes.append(n); starts.append(b); n = 1
        distinct.append(len(cur)); cur = {p}
    else:
        n += 1; cur.add(p)
sizes.append(n); distinct.append(len(cur))
iv = [b - a for a, b in zip(starts, starts[1:])] or [0.0]
print(json.dumps({"datagrams": len(ts), "bursts": len(sizes), "mean_burst": st.mean(sizes),
                  "median_burst": st.median(sizes), "mean_interval_ms": st.mean(iv) * 1e3,
                  "median_interval_ms": st.median(iv) * 1e3,
                  "rate": (len(ts) - 1) / max(ts[-1] - ts[0], 1e-9),
                  "median_flows_per_burst": st.median(distinct), "flows": len(set(peers))}))
PY
}
capture() { # PCAP FILTER: starts tcpdump on lo in the background, sets TD
  tcpdump -i lo -nn -Z root -B 16384 -s 96 -w "$1" "$2" >/dev/null 2>"$1.log" & TD=$!
  PIDS+=("$TD")
  for _ in $(seq 50); do grep -q listening "$1.log" 2>/dev/null && return; sleep 0.1; done
  log "tcpdump did not start: $(cat "$1.log")"; exit 1
}
stop_capture() { kill "$TD"; wait "$TD" || true; }
trap cleanup EXIT
trap 'cat "$WORK"/*.log >&2 2>/dev/null || true' ERR

SEED=0707070707070707070707070707070707070707070707070707070707070707
PUB=$($LOAD pubkey "$SEED")
P_TCP=15223; P_UDP=15224; P_TURN=15478; P_PEER=15480
RELAY_DESC='`steelyard relay` (release)'
target/release/steelyard relay --relay-id bench-relay --broker-key "$PUB" --tcp 127.0.0.1:$P_TCP \
  --udp 127.0.0.1:$P_UDP >"$WORK/relay.out" 2>"$WORK/relay.log" & RPID=$!
PIDS+=("$RPID")
turnserver -n --no-cli --no-tls --no-dtls --listening-ip 127.0.0.1 --relay-ip 127.0.0.1 \
  --listening-port $P_TURN --min-port 40000 --max-port 40999 --lt-cred-mech --user bench:bench \
  --realm steelyard --allow-loopback-peers --no-multicast-peers --log-file stdout --simple-log \
  >"$WORK/turn.log" 2>&1 & TPID=$!
PIDS+=("$TPID")
turnutils_peer -L 127.0.0.1 -p $P_PEER >"$WORK/peer.log" 2>&1 & PIDS+=($!)
sleep 1
kill -0 "$RPID" && kill -0 "$TPID"
TURN_VER=$(turnserver --version 2>/dev/null | head -1)
LOADAVG=$(cut -d' ' -f1 /proc/loadavg)
: >"$WORK/results.jsonl"

coturn_round() {
  # Messages per allocation so that the message phase lasts about DUR seconds at ~12k/s.
  local n=$N_MSG
  timeout $((DUR + 90)) turnutils_uclient -u bench -w bench -p $P_TURN -e 127.0.0.1 -r $P_PEER \
    -l 200 -n "$n" -m "$ALLOC" -z 0 -c 127.0.0.1 2>&1 | python3 -c '
import json, re, sys, time
pid = sys.argv[1]
import os
def run():
    return sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
               for t in os.listdir(f"/proc/{pid}/task")) / 1e9
def switches():
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        for l in open(f"/proc/{pid}/task/{t}/status"):
            if l.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                n += int(l.split()[1])
    return n
pts = []
for line in sys.stdin:
    m = re.search(r"start_mclient: msz=\d+, tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", line)
    if m:
        pts.append((time.time(), int(m.group(1)), int(m.group(2)), run(), switches()))
pts = [p for p in pts if p[1] > 0]
if len(pts) < 3:
    sys.exit("uclient printed too few progress lines")
# From the first progress line with traffic to the last one.
(t0, s0, r0, c0, w0), (t1, s1, r1, c1, w1) = pts[0], pts[-1]
relayed = 2 * (r1 - r0)
print(json.dumps({"kind": "coturn", "secs": t1 - t0, "datagrams": relayed,
                  "per_sec": relayed / (t1 - t0), "path_run_s": c1 - c0,
                  "path_switches": w1 - w0, "sent": s1 - s0, "echoed": r1 - r0}))
' "$TPID"
}
ours_round() { # rate per side (0 = flat out), burst size (0 = paced), sessions, session bursts, secs
  timeout $((DUR + 60)) "$LOAD" udp --target 127.0.0.1:$P_UDP --seed "$SEED" --relay-id bench-relay \
    --secs "${5:-$DUR}" --payload 200 --pid "$RPID" --rate "$1" --burst "$2" --sessions "$3" \
    --session-bursts "$4"
}
log "calibration (not measured): turnutils_uclient's sending pattern under tcpdump"
capture "$WORK/uclient.pcap" "udp and (dst port $P_TURN or src port $P_PEER)"
timeout 90 turnutils_uclient -u bench -w bench -p $P_TURN -e 127.0.0.1 -r $P_PEER \
  -l 200 -n 480 -m "$ALLOC" -z 0 -c 127.0.0.1 >"$WORK/calib.log" 2>&1
stop_capture
UC_PAT=$(burst_pattern "$WORK/uclient.pcap" dst $P_TURN)
UC_ECHO=$(burst_pattern "$WORK/uclient.pcap" src $P_PEER)
log "uclient pattern: $UC_PAT; turnutils_peer's echoes: $UC_ECHO"
BURST=$(python3 -c 'import json,sys; print(max(1, round(json.loads(sys.argv[1])["median_burst"])))' "$UC_PAT")
# uclient's allocations take turns, each sending its N_MSG messages in bursts of BURST.
TURN_BURSTS=$(( N_MSG / BURST > 0 ? N_MSG / BURST : 1 ))
for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: coturn (turnutils_uclient)"
  coturn_round | tee -a "$WORK/results.jsonl" >&2
  rate=$(tail -1 "$WORK/results.jsonl" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["per_sec"] / 2))')
  log "round $r/$ROUNDS: relay, $ALLOC sessions taking turns, $TURN_BURSTS bursts of $BURST each, at $rate/s, echoed"
  ours_round "$rate" "$BURST" "$ALLOC" "$TURN_BURSTS" | sed 's/"kind":"udp"/"kind":"sessions"/' | tee -a "$WORK/results.jsonl" >&2
  log "round $r/$ROUNDS: relay, $ALLOC sessions, bursts of $ALLOC spread one datagram per session, at $rate/s, echoed"
  ours_round "$rate" "$ALLOC" "$ALLOC" 0 | sed 's/"kind":"udp"/"kind":"spread"/' | tee -a "$WORK/results.jsonl" >&2
  log "round $r/$ROUNDS: relay, 1 session, uclient's pattern: bursts of $BURST at $rate/s per side, echoed"
  ours_round "$rate" "$BURST" 1 0 | sed 's/"kind":"udp"/"kind":"burst"/' | tee -a "$WORK/results.jsonl" >&2
  log "round $r/$ROUNDS: relay, 1 session, at coturn's rate ($rate/s per side), paced every millisecond"
  ours_round "$rate" 0 1 0 | sed 's/"kind":"udp"/"kind":"paced"/' | tee -a "$WORK/results.jsonl" >&2
  log "round $r/$ROUNDS: relay, 1 session, flat out"
  ours_round 0 0 1 0 | tee -a "$WORK/results.jsonl" >&2
done
check() { # burst sessions session-bursts: sets PAT and ECHO to the patterns of a 2 s relay_load
  # burst run under tcpdump (side A's datagrams, side B's echoes)
  local out ports
  capture "$WORK/ours-$2-$3.pcap" "udp and dst port $P_UDP"
  out=$(ours_round "$rate" "$1" "$2" "$3" 2)
  stop_capture
  ports=$(python3 -c 'import json,sys; print(",".join(map(str, json.loads(sys.argv[1])["ports_a"])))' "$out")
  PAT=$(burst_pattern "$WORK/ours-$2-$3.pcap" src "$ports")
  ports=$(python3 -c 'import json,sys; print(",".join(map(str, json.loads(sys.argv[1])["ports_b"])))' "$out")
  ECHO=$(burst_pattern "$WORK/ours-$2-$3.pcap" src "$ports")
}
log "pattern check (not measured): relay_load burst modes under tcpdump at $rate/s per side"
check "$BURST" 1 0; OURS_PAT=$PAT; OURS_ECHO=$ECHO
log "relay_load pattern, 1 session: $OURS_PAT; echoes: $OURS_ECHO"
check "$BURST" "$ALLOC" "$TURN_BURSTS"; SESS_PAT=$PAT; SESS_ECHO=$ECHO
log "relay_load pattern, $ALLOC sessions taking turns: $SESS_PAT; echoes: $SESS_ECHO"
check "$ALLOC" "$ALLOC" 0; SPREAD_PAT=$PAT; SPREAD_ECHO=$ECHO
log "relay_load pattern, $ALLOC sessions spread: $SPREAD_PAT; echoes: $SPREAD_ECHO"
python3 - "$WORK/results.jsonl" "$DUR" "$ROUNDS" "$RELAY_DESC" "$TURN_VER" "$LOADAVG" "$BURST" \
  "$UC_PAT" "$OURS_PAT" "$SESS_PAT" "$ALLOC" "$UC_ECHO" "$OURS_ECHO" "$SESS_ECHO" "$SPREAD_PAT" \
  "$SPREAD_ECHO" "$TURN_BURSTS" <<'PY'
import json, statistics, sys
(path, dur, rounds, relay_desc, turn_ver, loadavg, burst, uc_pat, ours_pat, sess_pat, alloc, uc_echo,
 ours_echo, sess_echo, spread_pat, spread_echo, turn_bursts) = sys.argv[1:]
uc, ou, se, sp = (json.loads(x) for x in (uc_pat, ours_pat, sess_pat, spread_pat))
uce, oue, see, spe = (json.loads(x) for x in (uc_echo, ours_echo, sess_echo, spread_echo))
rows = [json.loads(l) for l in open(path) if l.strip()]
def agg(kind):
    rs = [r for r in rows if r["kind"] == kind]
    rate = statistics.median(r["per_sec"] for r in rs)
    per_cpu = sum(r["datagrams"] for r in rs) / sum(r["path_run_s"] for r in rs)
    per_switch = sum(r["datagrams"] for r in rs) / max(1, sum(r["path_switches"] for r in rs))
    return rate, per_cpu, ", ".join("%.0f" % r["per_sec"] for r in rs), per_switch
c_rate, c_pc, c_sp, c_ps = agg("coturn")
s_rate, s_pc, s_sp, s_ps = agg("sessions")
x_rate, x_pc, x_sp, x_ps = agg("spread")
b_rate, b_pc, b_sp, b_ps = agg("burst")
p_rate, p_pc, p_sp, p_ps = agg("paced")
u_rate, u_pc, u_sp, u_ps = agg("udp")
common = (f"median of {rounds} alternating rounds; relay: {relay_desc}; coturn {turn_ver} with its own "
          f"turnutils_uclient ({alloc} allocations, -l 200 -z 0) + turnutils_peer, relayed = 2 × echoed messages "
          f"from uclient's progress lines; ours: `relay_load udp`; CPU: on-CPU "
          f"time of the relaying process's threads (/proc/PID/task/*/schedstat, ns) only; 2 shared cores, load average {loadavg} at start")
def pat(p):
    return (f"{p['mean_burst']:.1f} datagrams per burst (median {p['median_burst']:.0f}) from a median of "
            f"{p['median_flows_per_burst']:.0f} flow(s) ({p['flows']} in all) every "
            f"{p['mean_interval_ms']:.2f} ms (median {p['median_interval_ms']:.2f}), {p['rate']:,.0f}/s")
print(f"| relay UDP, {alloc} sessions like coturn's {alloc} allocations, turnutils_uclient's pattern, 200-byte payload | "
      f"{s_rate:,.0f} datagrams/s, {s_pc:,.0f} per CPU s ({1e6/s_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} "
      f"datagrams/s, {c_pc:,.0f} per CPU s ({1e6/c_pc:.2f} CPU s per million) | {s_pc/c_pc:.2f}× per CPU s (goal ≥ 2×) | "
      f"like for like: {alloc} relay sessions (own tickets, own side A and side B sockets) as uclient has {alloc} "
      f"allocations, offered what uclient sends on the wire: uclient's pattern (tcpdump on lo, unmeasured "
      f"calibration run, data datagrams to turnserver split at gaps > 500 µs): {pat(uc)}, turnutils_peer's echoes "
      f"{pat(uce)}, i.e. each burst comes from ONE allocation and they take turns; ours: side A sends bursts of "
      f"{burst} on one session, the sessions taking turns, {turn_bursts} bursts each (uclient's messages per "
      f"allocation / {burst}), at coturn's rate in each round, catching up when late; side B echoes each on its "
      f"session's socket like turnutils_peer; check capture of relay_load at the last round's rate: "
      f"{pat(se)}, side B's echoes {pat(see)}; rounds (datagrams/s) ours "
      f"{s_sp}, coturn {c_sp}; datagrams per context switch of the relaying process ours {s_ps:.1f}, coturn "
      f"{c_ps:.1f}; {common} |")
print(f"| relay UDP, {alloc} sessions, each burst spread one datagram per session, 200-byte payload | "
      f"{x_rate:,.0f} datagrams/s, {x_pc:,.0f} per CPU s ({1e6/x_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} "
      f"datagrams/s, {c_pc:,.0f} per CPU s ({1e6/c_pc:.2f} CPU s per million) | {x_pc/c_pc:.2f}× per CPU s (goal ≥ 2×) | "
      f"harder than uclient's load: bursts of {alloc} with one datagram per session, so no two datagrams of a "
      f"burst share a destination (the relay cannot coalesce them into one GSO send); check capture: {pat(sp)}, "
      f"side B's echoes {pat(spe)}; rounds (datagrams/s) ours {x_sp}, coturn {c_sp}; datagrams per context "
      f"switch of the relaying process ours {x_ps:.1f}, coturn {c_ps:.1f}; {common} |")
print(f"| relay UDP, same offered pattern as turnutils_uclient, 200-byte payload | {b_rate:,.0f} datagrams/s, "
      f"{b_pc:,.0f} per CPU s ({1e6/b_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} datagrams/s, {c_pc:,.0f} "
      f"per CPU s ({1e6/c_pc:.2f} CPU s per million) | {b_pc/c_pc:.2f}× per CPU s (goal ≥ 2×) | uclient's pattern "
      f"(tcpdump on lo, unmeasured calibration run, data datagrams to turnserver split at gaps > 500 µs): "
      f"{pat(uc)}; ours: side A sends bursts of {burst} (uclient's median) back to back at coturn's rate in "
      f"each round, catching up when late, side B echoes each like turnutils_peer; check capture of relay_load at the last round's rate: {pat(ou)}, side B's echoes {pat(oue)}; "
      f"rounds (datagrams/s) ours {b_sp}, coturn {c_sp}; datagrams per context switch of the relaying process "
      f"ours {b_ps:.1f}, coturn {c_ps:.1f}; coturn has {alloc} allocations, ours 1 session; {common} |")
print(f"| relay UDP at coturn's rate, paced every millisecond, 200-byte payload | {p_rate:,.0f} datagrams/s, {p_pc:,.0f} per CPU s "
      f"({1e6/p_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} datagrams/s, {c_pc:,.0f} per CPU s "
      f"({1e6/c_pc:.2f} CPU s per million) | {p_pc/c_pc:.2f}× per CPU s (goal ≥ 2×) | same offered rate, smoother than coturn's load: both sides "
      f"top up to the rate every millisecond, 1 session; "
      f"rounds (datagrams/s) ours {p_sp}, coturn {c_sp}; datagrams per context switch of the relaying "
      f"process (how well it batches) ours {p_ps:.1f}, coturn {c_ps:.1f}; {common} |")
print(f"| relay UDP flat out, 200-byte payload | {u_rate:,.0f} datagrams/s, {u_pc:,.0f} per CPU s "
      f"({1e6/u_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} datagrams/s (turnutils_uclient's most), "
      f"{c_pc:,.0f} per CPU s | {u_rate/c_rate:.2f}× rate, {u_pc/c_pc:.2f}× per CPU s | ours unpaced, 1 session "
      f"(senders compete with the relay for the 2 cores; delivered, not offered, counted); rounds {u_sp}; "
      f"datagrams per context switch ours {u_ps:.1f}, coturn {c_ps:.1f}; {common} |")
PY
