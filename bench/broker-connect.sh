#!/usr/bin/env bash
# Broker: brokered connects/s and request-to-answer latency over real WebSockets (10,000 peers x 50 of 500 relays), memory per peer, vs a bare axum WebSocket echo.
#
# Ours: `steelyard broker` (release, in-memory store) with 500 relays streaming load and
# PEERS enrolled agents each reporting PATHS random relays; CONCURRENCY initiators each keep one
# connect request in flight to a random peer (auto-accept: the broker answers A and offers B at
# once, two signed tickets per connect). Ceiling: a bare axum WebSocket echo server on the same
# machine, same client, same message size, same concurrency. Client and server share the
# machine's cores. Memory is the broker's RSS growth while the peers enroll, divided by PEERS:
# it includes each peer's WebSocket, its registry entry and its report in the selector. The
# same run is repeated over TLS (wss, a self-signed certificate), and once more with the broker
# in the bench process under a counting allocator (`broker_bench serve`) to say where a
# connected peer's heap bytes go.
# Bounded: counts from the variables below; every client phase runs under `timeout`, and the
# servers are killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=${BROKER_BENCH_PEERS:-10000}
RELAYS=${BROKER_BENCH_RELAYS:-500}
PATHS=${BROKER_BENCH_PATHS:-50}
CONNECTS=${BROKER_BENCH_CONNECTS:-100000}
CONCURRENCY=${BROKER_BENCH_CONCURRENCY:-32}
log() { echo "[broker-connect] $*" >&2; }

need=$((PEERS + RELAYS + 256))
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  log "need $need open files per process, the limit is $(ulimit -n): lower BROKER_BENCH_PEERS"; exit 1
fi
LOAD=$(cut -d' ' -f1 /proc/loadavg)
log "building release binaries"
cargo build --release -p steelyard --bin steelyard >&2
cargo build --release -p steelyard-broker --example broker_bench >&2
BIN=target/release/steelyard
BENCH=target/release/examples/broker_bench
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_addr() { # file -> host:port printed after "://"
  for _ in $(seq 100); do
    if grep -q "://" "$1" 2>/dev/null; then sed -n 's#.*://##p' "$1" | head -1; return; fi
    sleep 0.1
  done
  log "no address in $1"; cat "$1" >&2; exit 1
}

log "ceiling: bare axum WebSocket echo, $CONNECTS requests, $CONCURRENCY in flight"
"$BENCH" echo-server > "$WORK/echo.out" 2>&1 &
PIDS+=($!)
ECHO_ADDR=$(wait_addr "$WORK/echo.out")
timeout 300 "$BENCH" echo "$ECHO_ADDR" "$CONNECTS" "$CONCURRENCY" > "$WORK/echo.json"
kill "${PIDS[-1]}" 2>/dev/null || true

log "ours: steelyard broker, $RELAYS relays, $PEERS peers x $PATHS paths, $CONNECTS connects, $CONCURRENCY in flight"
"$BENCH" config "$RELAYS" > "$WORK/broker.toml"
"$BIN" broker --config "$WORK/broker.toml" --data-dir "$WORK/data" > "$WORK/broker.out" 2> "$WORK/broker.err" &
BROKER=$!
PIDS+=("$BROKER")
BROKER_ADDR=$(wait_addr "$WORK/broker.out")
timeout 600 "$BENCH" run "$BROKER_ADDR" "$BROKER" "$PEERS" "$RELAYS" "$PATHS" "$CONNECTS" "$CONCURRENCY" > "$WORK/broker.json"

kill "$BROKER" 2>/dev/null || true

log "ours over TLS: the same with wss (rustls, self-signed certificate)"
mkdir -p "$WORK/tls"
"$BENCH" config "$RELAYS" "$WORK/tls" > "$WORK/broker-tls.toml"
"$BIN" broker --config "$WORK/broker-tls.toml" --data-dir "$WORK/data-tls" > "$WORK/broker-tls.out" 2> "$WORK/broker-tls.err" &
BROKER=$!
PIDS+=("$BROKER")
BROKER_ADDR=$(wait_addr "$WORK/broker-tls.out")
BROKER_BENCH_TLS_CERT="$WORK/tls/cert.pem" timeout 600 "$BENCH" run "$BROKER_ADDR" "$BROKER" "$PEERS" "$RELAYS" "$PATHS" "$CONNECTS" "$CONCURRENCY" > "$WORK/broker-tls.json"
kill "$BROKER" 2>/dev/null || true

log "where the bytes go: the broker in-process under a counting allocator (plain, few connects)"
"$BENCH" serve "$WORK/broker.toml" "$WORK/heap" > "$WORK/heap.out" 2> "$WORK/heap.err" &
BROKER=$!
PIDS+=("$BROKER")
BROKER_ADDR=$(wait_addr "$WORK/heap.out")
BROKER_BENCH_HEAP_FILE="$WORK/heap" timeout 600 "$BENCH" run "$BROKER_ADDR" "$BROKER" "$PEERS" "$RELAYS" "$PATHS" 3200 "$CONCURRENCY" > "$WORK/heap.json"
kill "$BROKER" 2>/dev/null || true

log "state only: the broker core's memory per peer, without sockets"
timeout 300 "$BENCH" state "$PEERS" "$RELAYS" "$PATHS" > "$WORK/state.json"

python3 - "$WORK/broker.json" "$WORK/echo.json" "$PEERS" "$PATHS" "$RELAYS" "$CONCURRENCY" "$WORK/state.json" "$LOAD" "$WORK/broker-tls.json" "$WORK/heap.json" <<'PY'
import json, sys
b = json.load(open(sys.argv[1])); e = json.load(open(sys.argv[2]))
peers, paths, relays, conc = sys.argv[3:7]
state = json.load(open(sys.argv[7]))
state_kib = state["state_bytes_per_peer"] / 1024
load = sys.argv[8]
t = json.load(open(sys.argv[9]))
heap = json.load(open(sys.argv[10]))["heap"]
tkib = t["bytes_per_peer"] / 1024
rate, erate = b["connects_per_sec"], e["requests_per_sec"]
kib = b["bytes_per_peer"] / 1024
if kib <= 0:
    sys.exit("no memory figure: the broker's RSS was not read")
scope = f"{int(peers):,} peers x {paths} of {relays} relays, {conc} in flight"
print(f"| broker connects/s ({scope}) | {rate:,.0f}/s | goal >= 10,000/s; echo ceiling {erate:,.0f}/s | {rate/10000:.2f}x goal, {rate/erate:.2f}x ceiling | {b['connects']:,} answered, {b['failed']} no common relay; 2 Ed25519 tickets, offer to B, answer to A per connect; 2 shared cores, load average {load} at start |")
print(f"| broker connect latency p50 / p99 | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} ms | goal p99 <= 5 ms; echo {e['p50_ms']:.2f} / {e['p99_ms']:.2f} ms | {5/b['p99_ms']:.2f}x goal (p99) | request sent to answer received, client on the same 2 cores |")
print(f"| broker memory per registered peer | {kib:.1f} KiB | goal <= 4 KiB | {4/kib:.2f}x goal | RSS growth over {int(peers):,} enrolled peers, each with its own WebSocket and a {paths}-path report; {kib - state_kib:.1f} KiB of it is the connection (WebSocket framing, its task, send queue), the rest the state below |")
print(f"| broker memory per registered peer over TLS (wss) | {tkib:.1f} KiB | goal <= 4 KiB (plain above); {kib:.1f} KiB plain | {4/tkib:.2f}x goal, {tkib/kib:.2f}x plain | same run over rustls TLS 1.3 with a self-signed certificate: {tkib - kib:.1f} KiB more per peer, nearly all rustls' per-connection state (a 4 KiB record buffer it keeps for the connection's life, ~1.2 KiB connection, 2 x 560 B AEAD keys and smaller state; traced with `broker_bench serve`); connects over TLS {t['connects_per_sec']:,.0f}/s, p50 / p99 {t['p50_ms']:.2f} / {t['p99_ms']:.2f} ms |")
blocks = ", ".join(heap["blocks_per_peer"][:12])
print(f"| broker heap per registered peer (where the bytes go) | {heap['heap_bytes_per_peer']/1024:.2f} KiB | {kib:.1f} KiB RSS (row above) | {heap['heap_bytes_per_peer']/1024/kib:.2f}x RSS | live heap growth per peer, same plain run with the broker in `broker_bench serve` (counting allocator); blocks per peer: {blocks}. State alone: {state['heap']['heap_bytes_per_peer']:.0f} B ({', '.join(state['heap']['blocks_per_peer'])}); RSS above heap is malloc overhead and memory freed after the enrollment burst but kept by glibc |")
print(f"| broker state per peer (no socket) | {state_kib:.1f} KiB | goal <= 4 KiB | {4/state_kib:.2f}x goal | identity, registry entry and {paths}-path report in the selector; the rest of the row above is the WebSocket |")
PY
