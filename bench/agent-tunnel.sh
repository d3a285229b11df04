#!/usr/bin/env bash
# Agent tunnel throughput (Noise-encrypted, through both agents) vs the bare relay vs direct, 1 and 16 streams, CPU s/GB per process.
#
# Real release processes on loopback (bench/agent-system.bash): broker, one relay, agents alice
# and bob, `steelyard connect bob sink --listen` (a forward: alice's agent listens) in front of
# bob's `sink` service, which is the port where the client accepts its receivers. The client
# (crates/steelyard/examples/tunnel_load.rs) moves the same BYTES on every path, split over N
# streams, one direction, 128 KiB writes:
#   tunnel: sender -> alice's agent (its forward listener; Noise encrypt) -> relay -> bob's
#           agent (decrypt) -> receiver; the `steelyard connect` process carries no bytes (its
#           CPU is still listed: it should stay ~0);
#   relay:  sender and receiver dial the same relay with tickets the client signs (no Noise);
#   direct: sender -> receiver.
# Rounds alternate the three paths (order rotated each round); a row gives the median round's
# goodput, and CPU seconds per GB of each process summed over all rounds (/proc/PID/stat over
# the transfer window). Env: AGENT_BENCH_BYTES (2 GiB), AGENT_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_NAME=agent-tunnel
BYTES=${AGENT_BENCH_BYTES:-2147483648}
ROUNDS=${AGENT_BENCH_ROUNDS:-3}
source bench/agent-system.bash

PROCS="connect=$CONN_SINK_PID,alice=$ALICE_PID,relay=$RELAY_PID,bob=$BOB_PID,broker=$BROKER_PID"
run() { # path streams
  local extra=()
  case $1 in
    tunnel) extra=(--target "$CONN_SINK" --sink "127.0.0.1:$P_SINK") ;;
    relay) extra=(--target "$RELAY_TCP" --seed "$SEED" --relay-id bench-relay) ;;
    direct) extra=() ;;
  esac
  timeout 400 "$TUNNEL_LOAD" throughput "$1" --streams "$2" --bytes "$BYTES" --hz "$HZ" --pids "$PROCS" "${extra[@]}"
}
: >"$WORK/results.jsonl"
for streams in 1 16; do
  for r in $(seq "$ROUNDS"); do
    case $((r % 3)) in 1) order="tunnel relay direct" ;; 2) order="relay direct tunnel" ;; 0) order="direct tunnel relay" ;; esac
    for path in $order; do
      log "$streams stream(s), round $r/$ROUNDS: $path"
      run "$path" "$streams" | tee -a "$WORK/results.jsonl" >&2
    done
  done
done

# The tunnel's plaintext chunk per frame, as the agent crate defines it (for the notes).
const() { sed -n "s/^\(pub \)\?const $1: usize = \(.*\);/\2/p" crates/agent/src/tunnel.rs; }
CHUNK="$(const MAX_CHUNK) = $(( $(const MAX_FRAME_LEN) - 1 - $(const TAG_LEN) ))"
[[ $(const MAX_CHUNK) == "MAX_FRAME_LEN - 1 - TAG_LEN" ]] || CHUNK=$(const MAX_CHUNK)
python3 - "$WORK/results.jsonl" "$BYTES" "$ROUNDS" "$LOADAVG" "${CHUNK:-unknown}" <<'PY'
import json, statistics, sys
path, nbytes, rounds, loadavg, chunk = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
gib = int(nbytes) / 2**30
for streams in (1, 16):
    def pick(mode):
        rs = [r for r in rows if r["mode"] == mode and r["streams"] == streams]
        gbps = statistics.median(r["gbps"] for r in rs)
        gb = sum(r["bytes"] for r in rs) / 1e9
        cpu = {k: sum(r["cpu_s"][k] for r in rs) / gb for k in rs[0]["cpu_s"]}
        cpu["client"] = sum(r["client_cpu_s"] for r in rs) / gb
        spread = "–".join("%.2f" % r["gbps"] for r in rs)
        return gbps, cpu, spread
    t, tc, tsp = pick("tunnel")
    r, rc, rsp = pick("relay")
    d, dc, dsp = pick("direct")
    tunnel_cpu = ", ".join(f"{k} {tc[k]:.2f}" for k in ("connect", "alice", "relay", "bob", "broker", "client"))
    t_all, r_all = sum(tc.values()), rc["relay"] + rc["client"]
    print(f"| agent tunnel throughput, {streams} stream(s), {gib:g} GiB per round, loopback, median of {rounds} alternating rounds "
          f"| {t:.2f} Gbit/s | bare relay {r:.2f} Gbit/s; direct {d:.2f} Gbit/s | {t/r:.2f}× bare relay, {t/d:.2f}× direct "
          f"| CPU s/GB, tunnel: {tunnel_cpu} (all {t_all:.2f}, {t_all / r_all:.1f}× the bare relay's); bare relay: relay {rc['relay']:.2f}, client {rc['client']:.2f} (all {r_all:.2f}); direct: client {dc['client']:.2f}. "
          f"On 2 shared cores every path is CPU-bound, so CPU s/GB is the steadier figure. "
          f"Rounds (Gbit/s): tunnel {tsp}, relay {rsp}, direct {dsp}. Tunnel = sender → alice's agent (the forward listener it runs for `steelyard connect`, which carries no bytes; Noise KK, ChaCha20-Poly1305, MAX_CHUNK = {chunk} bytes of plaintext per frame) "
          f"→ relay → bob's agent → receiver; bare relay = the same relay process, tickets signed by the client, no encryption. "
          f"Client `tunnel_load throughput` (blocking thread per socket end, 128 KiB writes). 2 shared cores, load average {loadavg} at start |")
PY
