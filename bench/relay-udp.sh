#!/usr/bin/env bash
# Relayed UDP datagrams per second (200-byte payload) and per CPU second: relay vs coturn 4.6.
# Prints markdown table rows on stdout, progress on stderr.
#
# coturn: turnserver on 127.0.0.1 (static user, no TLS/DTLS, --no-cli, relay-ip 127.0.0.1,
# loopback peers allowed), driven by its own turnutils_uclient (50 allocations, 200-byte
# messages, -z 0) against turnutils_peer (echo). Each echoed message was relayed twice by
# turnserver (client -> peer, peer -> client), so relayed = 2 x tot_recv_msgs from uclient's own
# per-second progress lines; turnserver's CPU comes from /proc over the same window.
# ours: one relay session, both sides sending 200-byte payloads to each other through the relay
# (crates/relay/examples/relay_load.rs udp, paced in bursts every millisecond); relayed =
# datagrams delivered. Ours runs at the rate coturn reached (paced) and flat out. Rounds
# alternate coturn / ours. Both rows also give datagrams per context switch of the relaying
# process (all threads, /proc/PID/task/*/status): the per-datagram cost at a given rate depends
# mostly on how many datagrams each wakeup finds, i.e. on how bursty the load generator is.
# Env: RELAY_BENCH_SECS (5), RELAY_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${RELAY_BENCH_SECS:-5}
ROUNDS=${RELAY_BENCH_ROUNDS:-3}
log() { echo "[relay-udp] $*" >&2; }
command -v turnserver >/dev/null || { log "installing coturn"; apt-get install -y coturn >&2; }
log "building release binaries"
cargo build --release -p steelyard-relay --example relay_load >&2
cargo build --release -p steelyard --bin steelyard >&2
LOAD=target/release/examples/relay_load
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
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
  local n=$((DUR * 240))
  timeout $((DUR + 90)) turnutils_uclient -u bench -w bench -p $P_TURN -e 127.0.0.1 -r $P_PEER \
    -l 200 -n "$n" -m 50 -z 0 -c 127.0.0.1 2>&1 | python3 -c '
import json, re, sys, time
pid = sys.argv[1]
import os
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0
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
        pts.append((time.time(), int(m.group(1)), int(m.group(2)), cpu(), switches()))
pts = [p for p in pts if p[1] > 0]
if len(pts) < 3:
    sys.exit("uclient printed too few progress lines")
# From the first progress line with traffic to the last one.
(t0, s0, r0, c0, w0), (t1, s1, r1, c1, w1) = pts[0], pts[-1]
relayed = 2 * (r1 - r0)
print(json.dumps({"kind": "coturn", "secs": t1 - t0, "datagrams": relayed,
                  "per_sec": relayed / (t1 - t0), "path_cpu_s": c1 - c0,
                  "path_switches": w1 - w0, "sent": s1 - s0, "echoed": r1 - r0}))
' "$TPID"
}
ours_round() { # rate per side (0 = flat out)
  timeout $((DUR + 60)) "$LOAD" udp --target 127.0.0.1:$P_UDP --seed "$SEED" --relay-id bench-relay \
    --secs "$DUR" --payload 200 --pid "$RPID" --rate "$1"
}
for r in $(seq "$ROUNDS"); do
  log "round $r/$ROUNDS: coturn (turnutils_uclient)"
  coturn_round | tee -a "$WORK/results.jsonl" >&2
  rate=$(tail -1 "$WORK/results.jsonl" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["per_sec"] / 2))')
  log "round $r/$ROUNDS: relay at coturn's rate ($rate/s per side)"
  ours_round "$rate" | sed 's/"kind":"udp"/"kind":"paced"/' | tee -a "$WORK/results.jsonl" >&2
  log "round $r/$ROUNDS: relay flat out"
  ours_round 0 | tee -a "$WORK/results.jsonl" >&2
done
python3 - "$WORK/results.jsonl" "$DUR" "$ROUNDS" "$RELAY_DESC" "$TURN_VER" "$LOADAVG" <<'PY'
import json, statistics, sys
path, dur, rounds, relay_desc, turn_ver, loadavg = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
def agg(kind):
    rs = [r for r in rows if r["kind"] == kind]
    rate = statistics.median(r["per_sec"] for r in rs)
    per_cpu = sum(r["datagrams"] for r in rs) / sum(r["path_cpu_s"] for r in rs)
    per_switch = sum(r["datagrams"] for r in rs) / max(1, sum(r["path_switches"] for r in rs))
    return rate, per_cpu, ", ".join("%.0f" % r["per_sec"] for r in rs), per_switch
c_rate, c_pc, c_sp, c_ps = agg("coturn")
p_rate, p_pc, p_sp, p_ps = agg("paced")
u_rate, u_pc, u_sp, u_ps = agg("udp")
common = (f"median of {rounds} alternating rounds; relay: {relay_desc}; coturn {turn_ver} with its own "
          f"turnutils_uclient (50 allocations, -l 200 -z 0) + turnutils_peer, relayed = 2 × echoed messages "
          f"from uclient's progress lines; ours: `relay_load udp`, 1 session, both sides sending; CPU from "
          f"/proc/PID/stat of the relaying process only; 2 shared cores, load average {loadavg} at start")
print(f"| relay UDP at coturn's rate, 200-byte payload | {p_rate:,.0f} datagrams/s, {p_pc:,.0f} per CPU s "
      f"({1e6/p_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} datagrams/s, {c_pc:,.0f} per CPU s "
      f"({1e6/c_pc:.2f} CPU s per million) | {p_pc/c_pc:.2f}× per CPU s (goal ≥ 2×) | same offered rate; "
      f"rounds (datagrams/s) ours {p_sp}, coturn {c_sp}; datagrams per context switch of the relaying "
      f"process (how well it batches) ours {p_ps:.1f}, coturn {c_ps:.1f}; {common} |")
print(f"| relay UDP flat out, 200-byte payload | {u_rate:,.0f} datagrams/s, {u_pc:,.0f} per CPU s "
      f"({1e6/u_pc:.2f} CPU s per million) | coturn {c_rate:,.0f} datagrams/s (turnutils_uclient's most), "
      f"{c_pc:,.0f} per CPU s | {u_rate/c_rate:.2f}× rate, {u_pc/c_pc:.2f}× per CPU s | ours unpaced "
      f"(senders compete with the relay for the 2 cores; delivered, not offered, counted); rounds {u_sp}; "
      f"datagrams per context switch ours {u_ps:.1f}, coturn {c_ps:.1f}; {common} |")
PY
