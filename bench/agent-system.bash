# Sourced by bench/agent-connect.sh and bench/agent-tunnel.sh (not a benchmark itself).
#
# Starts a local Steelyard on loopback as real release processes, the way `steelyard dev` does
# (crates/steelyard/src/demo/live.rs) but with ONE relay, so every brokered tunnel and every
# bare-relay session of the benchmarks crosses the same relay process:
#   * `steelyard broker` (plain HTTP, in-memory store, default 30 s report schedule);
#   * `steelyard relay` trusting two ticket keys: the broker's (tunnels) and a bench seed's
#     (bare sessions opened by the load generators with tickets they sign themselves);
#   * `tunnel_load echo`: the echo service behind bob (and the latency floor);
#   * agents alice and bob; bob exposes `echo` and `sink` (the port where `relay_load` accepts
#     its receivers) to alice;
#   * `steelyard connect bob echo` and `steelyard connect bob sink`: forwards, i.e. listeners
#     that alice's agent itself runs (tunnelled bytes do not cross the `steelyard connect`
#     processes; they only hold the forwards open and log one line per tunnel).
# Sets: BIN LOAD TUNNEL_LOAD WORK SEED PUB RELAY_TCP ECHO P_SINK CONN_ECHO CONN_SINK and the pids
# BROKER_PID RELAY_PID ALICE_PID BOB_PID CONN_ECHO_PID CONN_SINK_PID ECHO_PID. Everything started
# here is killed on exit. Bounded: every wait below gives up after at most 60 s.

log() { echo "[$BENCH_NAME] $*" >&2; }
log "building release binaries"
cargo build --release -p steelyard --bin steelyard --example tunnel_load >&2
cargo build --release -p steelyard-relay --example relay_load >&2
BIN=target/release/steelyard
LOAD=target/release/examples/relay_load
TUNNEL_LOAD=target/release/examples/tunnel_load
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'tail -n 20 "$WORK"/*.log >&2 2>/dev/null || true' ERR

SEED=0909090909090909090909090909090909090909090909090909090909090909
PUB=$($LOAD pubkey "$SEED")
P_SINK=${AGENT_BENCH_SINK_PORT:-15241}
tok() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
ADMIN=$(tok); AGENT_TOKEN=$(tok); RELAY_TOKEN=$(tok)

wait_line() { # file pattern -> the first matching line (60 s at most)
  for _ in $(seq 600); do
    if grep -q -- "$2" "$1" 2>/dev/null; then grep -m1 -- "$2" "$1"; return; fi
    sleep 0.1
  done
  log "no line matching '$2' in $1 within 60 s"; tail -n 20 "$1" "${1%.out}.log" >&2 || true; exit 1
}
start() { # name args... ; stdout -> NAME.out, stderr -> NAME.log; sets LAST_PID
  local name=$1; shift
  RUST_LOG=${AGENT_BENCH_LOG:-warn} "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
field() { tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }

cat >"$WORK/broker.toml" <<EOF
listen = "127.0.0.1:0"
listen_plain = true
store = "memory"
data_dir = "$WORK/broker-data"
admin_token = "$ADMIN"

[[enroll_tokens]]
name = "agents"
token = "$AGENT_TOKEN"

[[enroll_tokens]]
name = "relays"
token = "$RELAY_TOKEN"
role = "relay"
EOF
start broker "$BIN" broker --config "$WORK/broker.toml"; BROKER_PID=$LAST_PID
BROKER=$(wait_line "$WORK/broker.out" "://" | sed 's#.*://##')
BROKER_KEY=$(curl -sf "http://$BROKER/v1/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0]["public_key"])')

PROBE=${AGENT_BENCH_PROBE_PORT:-15242}
cat >"$WORK/relay.toml" <<EOF
relay_id = "bench-relay"
broker_keys = ["$BROKER_KEY", "$PUB"]

[listen]
tcp = "127.0.0.1:0"
probe = "127.0.0.1:$PROBE"

[broker]
url = "ws://$BROKER/v1/relay"
identity_key_file = "$WORK/relay.key"
enroll_token = "$RELAY_TOKEN"
advertise_udp = "127.0.0.1:$PROBE"
EOF
start relay "$BIN" relay --config "$WORK/relay.toml"; RELAY_PID=$LAST_PID
RELAY_TCP=$(wait_line "$WORK/relay.out" "relay listening" | field tcp)

start echo "$TUNNEL_LOAD" echo --listen 127.0.0.1:0; ECHO_PID=$LAST_PID
ECHO=$(wait_line "$WORK/echo.out" "echo listening" | awk '{print $3}')

for peer in alice bob; do
  services=""
  [[ $peer == bob ]] && services=$(printf '[services]\necho = "%s"\nsink = "127.0.0.1:%s"\n\n[offers]\nallow = ["alice"]\n' "$ECHO" "$P_SINK")
  cat >"$WORK/$peer.toml" <<EOF
broker = "ws://$BROKER"
enroll_token = "$AGENT_TOKEN"
peer_id = "$peer"
key_file = "$WORK/$peer.key"
control = "127.0.0.1:0"

$services
EOF
  start "$peer" "$BIN" agent --config "$WORK/$peer.toml"
  [[ $peer == alice ]] && ALICE_PID=$LAST_PID || BOB_PID=$LAST_PID
done
ALICE_CTL=$(wait_line "$WORK/alice.out" "^agent alice" | field control)
wait_line "$WORK/bob.out" "^agent bob" >/dev/null

log "waiting until both agents have reported their path to the relay"
for i in $(seq 600); do
  if curl -sf -H "Authorization: Bearer $ADMIN" "http://$BROKER/v1/admin/peers" | python3 -c '
import json, sys
peers = {p["id"]: p for p in json.load(sys.stdin)["peers"]}
ok = all(peers.get(n, {}).get("online") and peers[n].get("paths") == 1 for n in ("alice", "bob"))
sys.exit(0 if ok else 1)'; then break; fi
  [[ $i == 600 ]] && { log "the agents did not report within 60 s"; tail -n 20 "$WORK"/*.log >&2; exit 1; }
  sleep 0.1
done

start conn-echo "$BIN" connect bob echo --listen 127.0.0.1:0 --control "$ALICE_CTL"; CONN_ECHO_PID=$LAST_PID
CONN_ECHO=$(wait_line "$WORK/conn-echo.out" "listening=" | field listening)
start conn-sink "$BIN" connect bob sink --listen 127.0.0.1:0 --control "$ALICE_CTL"; CONN_SINK_PID=$LAST_PID
CONN_SINK=$(wait_line "$WORK/conn-sink.out" "listening=" | field listening)

# One tunnel end to end before any measurement: proves the system works and warms it.
"$TUNNEL_LOAD" latency tunnel --target "$CONN_ECHO" --count 3 >/dev/null

# CPU seconds (user + system) a process has used so far.
HZ=$(getconf CLK_TCK)
cpu_of() { awk -v hz="$HZ" '{ sub(/.*\) /, ""); split($0, f, " "); printf "%.3f", (f[12] + f[13]) / hz }' "/proc/$1/stat"; }
LOADAVG=$(cut -d' ' -f1 /proc/loadavg)
log "system up: broker $BROKER, relay $RELAY_TCP, echo $ECHO, alice's listeners echo=$CONN_ECHO sink=$CONN_SINK"
