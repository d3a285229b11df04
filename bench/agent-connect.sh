#!/usr/bin/env bash
# Agent tunnel: local connect to first echoed byte (p50/p90/p99/max over 1,000 sequential connects) vs the echo service direct and a bare relay, with the broker's share.
#
# Real release processes on loopback (bench/agent-system.bash): broker, one relay, agents alice
# and bob, `steelyard connect bob echo` (a forward: alice's agent listens) in front of bob's
# echo service. The client
# (crates/steelyard/examples/tunnel_load.rs) opens CONNECTS sequential connections; each
# writes one byte and waits for it to come back; the time runs from just before connect() to
# the echoed byte. Same run, same client: the echo service direct (the floor) and a bare relay
# session per connect (the same relay process, tickets the client signs, no broker, no Noise).
# Then a traced pass of TRACE tunnel connects under tcpdump on lo splits each connect at the
# packets: SYN at alice's forward listener -> alice's request to the broker; the broker (offer to bob, bob's
# reply, answer to alice); relay dials + Noise handshake up to alice's tunnel-up line to
# `steelyard connect` (on the forward's control connection); the byte
# through the tunnel. Connects are paced GAP ms apart on every path so that the figure is a
# connect's latency, not queueing: the broker's default limit of 100 messages per second per
# agent connection (`[limits] messages_per_sec`) allows ~45 tunnel connects/s per agent (a
# connect request and a session_ended each), and the agent paces its messages under the limits
# the broker announces in its welcome (a connect over them waits for its turn). The row counts
# the broker's rate_limited errors during the run. Env: AGENT_BENCH_CONNECTS (1000),
# AGENT_BENCH_TRACE (300), AGENT_BENCH_GAP_MS (25).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=agent-connect
COUNT=${AGENT_BENCH_CONNECTS:-1000}
TRACE=${AGENT_BENCH_TRACE:-300}
GAP=${AGENT_BENCH_GAP_MS:-25}
command -v tcpdump >/dev/null || { echo "[$BENCH_NAME] installing tcpdump" >&2; apt-get install -y tcpdump >&2; }
source bench/agent-system.bash

rate_limited() {
  curl -sf -H "Authorization: Bearer $ADMIN" "http://$BROKER/metrics" |
    awk '/^steelyard_broker_errors_total\{code="rate_limited"\}/ { print $2; found = 1 } END { if (!found) print "?" }'
}
RL0=$(rate_limited)
: >"$WORK/lat.jsonl"
for mode in direct relay tunnel; do
  case $mode in
    direct) args=(--target "$ECHO") ;;
    relay) args=(--target "$RELAY_TCP" --seed "$SEED" --relay-id bench-relay) ;;
    tunnel) args=(--target "$CONN_ECHO") ;;
  esac
  log "$mode: $COUNT sequential connects"
  timeout 900 "$TUNNEL_LOAD" latency "$mode" --count "$COUNT" --gap-ms "$GAP" "${args[@]}" | tee -a "$WORK/lat.jsonl" >&2
done
RL1=$(rate_limited)

log "traced pass: $TRACE tunnel connects under tcpdump"
port() { echo "${1##*:}"; }
BPORT=$(port "$BROKER")
ws_port() { # pid -> local port of that process's connection to the broker
  ss -tnpH state established "( dport = :$BPORT )" | awk -v p="pid=$1," 'index($0, p) { n = split($3, a, ":"); print a[n]; exit }'
}
ALICE_WS=$(ws_port "$ALICE_PID"); BOB_WS=$(ws_port "$BOB_PID")
[[ -n $ALICE_WS && -n $BOB_WS ]] || { log "cannot find the agents' broker connections (ss)"; exit 1; }
ALICE_CTL_PORT=$(port "$ALICE_CTL")
tcpdump -i lo -s 128 -B 16384 -w "$WORK/trace.pcap" \
  "tcp and (port $(port "$CONN_ECHO") or port $ALICE_CTL_PORT or port $BPORT or port $(port "$RELAY_TCP") or port $(port "$ECHO"))" \
  2>"$WORK/tcpdump.log" & TCPDUMP=$!
PIDS+=("$TCPDUMP")
sleep 1
timeout 600 "$TUNNEL_LOAD" latency tunnel --count "$TRACE" --gap-ms "$GAP" --target "$CONN_ECHO" >"$WORK/traced.json"
sleep 0.5
kill -INT "$TCPDUMP"; wait "$TCPDUMP" 2>/dev/null || true
[[ -n ${AGENT_BENCH_KEEP_PCAP:-} ]] && cp "$WORK/trace.pcap" "$AGENT_BENCH_KEEP_PCAP"

python3 - "$WORK/lat.jsonl" "$WORK/traced.json" "$WORK/trace.pcap" "$COUNT" "$LOADAVG" "$GAP" "$RL0" "$RL1" \
  "$(port "$CONN_ECHO")" "$ALICE_CTL_PORT" "$BPORT" "$ALICE_WS" "$BOB_WS" "$(port "$RELAY_TCP")" "$(port "$ECHO")" <<'PY'
import json, statistics, struct, sys
lat, traced, pcap, count, loadavg, gap, rl0, rl1 = sys.argv[1:9]
L, CTL, BRK, AWS, BWS, RLY, ECHO = map(int, sys.argv[9:16])
limited = int(rl1) - int(rl0) if rl0.isdigit() and rl1.isdigit() else "unknown"

runs = {r["mode"]: r for r in map(json.loads, open(lat))}
d, r, t = runs["direct"], runs["relay"], runs["tunnel"]
tr = json.load(open(traced))

# --- the trace: (time, sport, dport, flags, payload length) per TCP/IPv4 packet
pk = []
with open(pcap, "rb") as f:
    magic, _, _, _, _, _, link = struct.unpack("<IHHiIII", f.read(24))
    scale = 1e-9 if magic == 0xA1B23C4D else 1e-6
    off = {1: 14, 113: 16, 276: 20}.get(link, 14)
    while hdr := f.read(16):
        sec, frac, incl, orig = struct.unpack("<IIII", hdr)
        data = f.read(incl)
        ip = data[off:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:]
        sp, dp = struct.unpack(">HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        pk.append((sec + frac * scale, sp, dp, tcp[13], total - ihl - doff))
SYN, ACK = 2, 16
starts = [i for i, p in enumerate(pk) if p[2] == L and p[3] & SYN and not p[3] & ACK]
def first(i, end, pred):
    for j in range(i, end):
        if pred(pk[j]):
            return j
    return None
phases = {k: [] for k in ("local", "broker", "bob", "relay", "data", "total", "pair", "noise", "noise_cpu")}
# Noise KK handshake messages as the agents send them (2-byte length, 32-byte ephemeral key, the
# encrypted payload and its 16-byte tag): alice's carries an Attach (resume::Attach: version,
# kind, 16-byte id = 18 bytes), bob's answer an AttachReply::Accepted (1 byte).
HS1 = 2 + 32 + 18 + 16
HS2 = 2 + 32 + 1 + 16
skipped = {}
for n, i in enumerate(starts):
    end = starts[n + 1] if n + 1 < len(starts) else len(pk)
    client = pk[i][1]
    req = first(i, end, lambda p: p[1] == AWS and p[2] == BRK and p[4] > 0)
    if req is None:
        skipped["request"] = skipped.get("request", 0) + 1
        continue
    offer = first(req, end, lambda p: p[1] == BRK and p[2] == BWS and p[4] > 0)
    reply = offer and first(offer, end, lambda p: p[1] == BWS and p[2] == BRK and p[4] > 0)
    ans = first(req, end, lambda p: p[1] == BRK and p[2] == AWS and p[4] > 0)
    ok = ans and first(ans, end, lambda p: p[1] == CTL and p[4] > 0)
    back = ok and first(ok, end, lambda p: p[1] == L and p[2] == client and p[4] > 0)
    if None in (offer, reply, ans, ok, back) or not (offer < reply < ans):
        why = [k for k, v in dict(offer=offer, reply=reply, answer=ans, ok=ok, back=back).items() if v is None] or ["order"]
        skipped[why[0]] = skipped.get(why[0], 0) + 1
        continue
    T = lambda j: pk[j][0] * 1000
    phases["local"].append(T(req) - T(i))
    phases["broker"].append(T(ans) - T(req) - (T(reply) - T(offer)))
    phases["bob"].append(T(reply) - T(offer))
    phases["relay"].append(T(ok) - T(ans))
    phases["data"].append(T(back) - T(ok))
    phases["total"].append(T(back) - T(i))
    # Inside the relay phase: alice's first handshake message (to the relay) names alice's relay
    # connection; the relay's last status frame to it before that is "paired".
    m1 = first(ans, ok, lambda p: p[2] == RLY and p[4] == HS1)
    if m1 is not None:
        a_port = pk[m1][1]
        paired = max((j for j in range(ans, m1) if pk[j][1] == RLY and pk[j][2] == a_port and pk[j][4] > 0), default=None)
        f1 = first(m1, ok, lambda p: p[1] == RLY and p[2] != a_port and p[4] == HS1)
        m2 = f1 and first(f1, ok, lambda p: p[2] == RLY and p[1] != a_port and p[4] == HS2)
        f2 = m2 and first(m2, ok, lambda p: p[1] == RLY and p[2] == a_port and p[4] == HS2)
        if None not in (paired, f1, m2, f2):
            phases["pair"].append(T(paired) - T(ans))
            phases["noise"].append(T(ok) - T(paired))
            phases["noise_cpu"].append((T(m1) - T(paired)) + (T(m2) - T(f1)) + (T(ok) - T(f2)))
n = len(phases["total"])
print(f"trace: {len(starts)} connects, {n} split; not split (first missing packet): {skipped or 'none'}", file=sys.stderr)
if n < len(starts) * 0.9 or n == 0:
    sys.exit(f"the trace split only {n} of {len(starts)} connects; see the pcap")
med = {k: statistics.median(v) if v else float("nan") for k, v in phases.items()}
share = lambda k: 100 * med[k] / med["total"]

fmt = lambda x: f"p50 {x['p50_ms']:.2f}, p90 {x['p90_ms']:.2f}, p99 {x['p99_ms']:.2f}, max {x['max_ms']:.2f} ms"
fails = f"{t['failures']} of {t['count']} failed" if t["failures"] else "none failed"
print(f"| agent tunnel: local connect to first echoed byte, {count} sequential connects {gap} ms apart, loopback | {fmt(t)} "
      f"| goal p50 ≤ 5 ms; bare relay {fmt(r)}; echo direct {fmt(d)} | {5 / t['p50_ms']:.2f}× goal (p50); "
      f"{t['p50_ms'] / r['p50_ms']:.1f}× bare relay, {t['p50_ms'] / d['p50_ms']:.0f}× direct (p50) "
      f"| alice's agent (forward listener) → broker (offer to bob, bob accepts, answer) → both agents dial the relay → Noise KK handshake → byte → bob's agent → echo service and back; {fails}; broker rate_limited errors during the run: {limited}. "
      f"Bare relay: fresh ticket pair per connect, both sides dial at once, no broker, no encryption (the same relay process). "
      f"Client `tunnel_load` (sequential, one connect at a time, {gap} ms pause after each on every path: the broker allows an agent 100 messages/s). 2 shared cores, load average {loadavg} at start |")
print(f"| where a tunnel connect's time goes (median of {n} traced connects, tcpdump on lo) | "
      f"broker {med['broker']:.2f} ms ({share('broker'):.0f} %), bob's offer decision {med['bob']:.2f} ms ({share('bob'):.0f} %) "
      f"| relay dials + Noise handshake {med['relay']:.2f} ms ({share('relay'):.0f} %: dial and pairing {med['pair']:.2f} ms, "
      f"handshake from 'paired' to alice's tunnel-up line {med['noise']:.2f} ms, of which {med['noise_cpu']:.2f} ms inside the agents between packets, "
      f"Noise KK: an ephemeral key and X25519 operations on each side, plus wake-ups; {len(phases['noise'])} connects split); first byte through the tunnel {med['data']:.2f} ms ({share('data'):.0f} %); "
      f"local accept to broker request {med['local']:.2f} ms ({share('local'):.0f} %); medians of each phase, so they need not add up | total {med['total']:.2f} ms on the wire "
      f"(client saw p50 {tr['p50_ms']:.2f} ms under capture) | split at packets: SYN at alice's listener; alice's connect request to the broker; "
      f"the broker's offer to bob and bob's reply (bob's share); the broker's answer to alice (broker = request → answer minus bob's share: two WebSocket hops each way, selection, 2 tickets); "
      f"alice's tunnel-up line to `steelyard connect` on the forward's control connection (after relay pairing and the handshake); the echoed byte at the listener (includes bob's connect to the service) |")
PY
