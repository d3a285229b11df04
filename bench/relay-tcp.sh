#!/usr/bin/env bash
# Relay TCP throughput vs HAProxy (TCP mode, splicing on) vs direct, driven by iperf3 on
# loopback, 1 stream and 64 streams. Prints markdown table rows on stdout, progress on stderr.
#
# Path of "ours": iperf3 -c -> ticket_shim a -> steelyard relay (splice) -> ticket_shim b ->
# iperf3 -s. iperf3 cannot send the relay's hello, so the two shims add two local hops with a
# userspace copy each; HAProxy and direct have no shim. "ours" is therefore a lower bound.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${RELAY_BENCH_SECS:-5}
log() { echo "[relay-tcp] $*" >&2; }
for tool in iperf3 haproxy; do
  command -v "$tool" >/dev/null || { log "installing $tool"; apt-get install -y "$tool" >&2; }
done
log "building release binaries"
cargo build --release -p steelyard >&2
cargo build --release -p steelyard-relay --example ticket_shim >&2
BIN=target/release/steelyard
SHIM=target/release/examples/ticket_shim
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'cat "$WORK"/*.log "$WORK/last.json" >&2 2>/dev/null || true' ERR

SEED=0707070707070707070707070707070707070707070707070707070707070707
PUB=$($SHIM pubkey "$SEED")
if [ -z "$PUB" ]; then log "cannot derive the public key"; exit 1; fi
P_DIRECT=15201; P_HAP=15202; P_RELAY=15203; P_SHIM=15204
iperf3 -s -p $P_DIRECT -D --logfile "$WORK/iperf3.log" --pidfile "$WORK/iperf3.pid"
sleep 0.3; PIDS+=("$(cat "$WORK/iperf3.pid")")
cat > "$WORK/haproxy.cfg" <<CFG
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option splice-auto
listen bench
  bind 127.0.0.1:$P_HAP
  server s1 127.0.0.1:$P_DIRECT
CFG
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & PIDS+=($!)
$BIN relay --relay-id bench-relay --broker-key "$PUB" --tcp 127.0.0.1:$P_RELAY >"$WORK/relay.out" 2>"$WORK/relay.log" & PIDS+=($!)
sleep 0.5
export STEELYARD_SHIM_QUEUE="$WORK/queue"
$SHIM b 127.0.0.1:$P_DIRECT 127.0.0.1:$P_RELAY "$SEED" bench-relay 2>"$WORK/shimb.log" & PIDS+=($!)
$SHIM a 127.0.0.1:$P_SHIM 127.0.0.1:$P_RELAY "$SEED" bench-relay 2>"$WORK/shima.log" & PIDS+=($!)
sleep 0.5

gbps() { # port streams
  timeout $((DUR + 30)) iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t "$DUR" -J 2>/dev/null \
    | tee "$WORK/last.json" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
for streams in 1 64; do
  log "direct, $streams stream(s)"; d=$(gbps $P_DIRECT $streams)
  log "haproxy, $streams stream(s)"; h=$(gbps $P_HAP $streams)
  log "relay via shims, $streams stream(s)"; r=$(gbps $P_SHIM $streams)
  python3 - "$streams" "$d" "$h" "$r" "$DUR" <<'PY'
import sys
s, d, h, r, dur = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print(f"| relay TCP, {s} stream(s), iperf3 {dur} s loopback | {r:.2f} Gbit/s | HAProxy 2.6 splice {h:.2f} Gbit/s | {r/h if h else 0:.2f}x | direct {d:.2f} Gbit/s, relay/direct {r/d if d else 0:.2f}x; ours goes through 2 ticket shims (2 extra userspace hops), HAProxy through none; `bench/run relay-tcp` |")
PY
done
