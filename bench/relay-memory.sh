#!/usr/bin/env bash
# Memory per idle paired TCP session: relay vs HAProxy 2.6 holding the same number of idle
# proxied connections (10,000 asked; see the open-files note below), and per idle paired UDP
# session with 10,000 open. Prints markdown table rows on stdout, progress on stderr.
#
# The relay's resident set (VmRSS from /proc) is read before and after N paired sessions are
# opened through it by `relay_load idle relay` (2N client connections; an idle relayed session
# holds its 2 sockets, its splice pipes are made on the first bytes); HAProxy's the same way
# with `relay_load idle haproxy` (N client connections through HAProxy to our listener: HAProxy
# holds 2N sockets). RSS counts user-space memory only; kernel socket memory is not in it, for
# either. Open files: 10,000 sessions need 20,000 descriptors in the relay (and in the client);
# the script raises the hard limit when it may (root with CAP_SYS_RESOURCE), otherwise it runs
# the largest round count that fits under the hard limit and says so in the row.
# UDP: a second relay process (so that memory the TCP sessions freed is not reused) holds
# RELAY_BENCH_UDP_SESSIONS paired UDP sessions opened by `relay_load idle udp` from one side A and
# one side B socket (a UDP session needs no descriptor in the relay, so 10,000 fit here).
# Env: RELAY_BENCH_SESSIONS (10000), RELAY_BENCH_UDP_SESSIONS (10000).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${RELAY_BENCH_SESSIONS:-10000}
U=${RELAY_BENCH_UDP_SESSIONS:-10000}
log() { echo "[relay-memory] $*" >&2; }
command -v haproxy >/dev/null || { log "installing haproxy"; apt-get install -y haproxy >&2; }
ulimit -Hn 100000 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)"
HARD=$(ulimit -Hn)
ASKED=$N
if (( 2 * N + 500 > HARD )); then
  N=$(( (HARD - 500) / 2 / 1000 * 1000 ))
  log "hard open-files limit is $HARD (cannot raise it here): $N sessions instead of $ASKED"
fi
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
P_RELAY=15233; P_HAP=15232; P_BACK=15242; P_URELAY=15234; P_UDP=15235
cat >"$WORK/relay.toml" <<CFG
relay_id = "bench-relay"
broker_keys = ["$PUB"]
[listen]
tcp = "127.0.0.1:$P_RELAY"
[capacity]
max_sessions = $((N + 1000))
[limits]
max_connections = $((2 * N + 2000))
CFG
cat >"$WORK/relay-udp.toml" <<CFG
relay_id = "bench-relay"
broker_keys = ["$PUB"]
[listen]
tcp = "127.0.0.1:$P_URELAY"
udp = "127.0.0.1:$P_UDP"
[capacity]
max_sessions = $((U + 1000))
[limits]
udp_idle_timeout_secs = 600
CFG
RELAY_DESC='`steelyard relay` (release)'
target/release/steelyard relay --config "$WORK/relay.toml" >"$WORK/relay.out" 2>"$WORK/relay.log" & RPID=$!
PIDS+=("$RPID")
target/release/steelyard relay --config "$WORK/relay-udp.toml" >"$WORK/relay-udp.out" 2>"$WORK/relay-udp.log" & UPID=$!
PIDS+=("$UPID")
cat >"$WORK/haproxy.cfg" <<CFG
global
  maxconn $((N + 200))
  maxpipes 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  option splice-auto
listen bench
  bind 127.0.0.1:$P_HAP
  maxconn $((N + 200))
  server s1 127.0.0.1:$P_BACK maxconn $((N + 200))
CFG
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & HPID=$!
PIDS+=("$HPID")
sleep 1
kill -0 "$RPID" && kill -0 "$HPID" && kill -0 "$UPID"
rss() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

measure() { # path pid -> "before after opened"
  local path=$1 pid=$2 extra=()
  case $path in
    relay) extra=(--target 127.0.0.1:$P_RELAY --seed "$SEED" --relay-id bench-relay) ;;
    haproxy) extra=(--target 127.0.0.1:$P_HAP --listen 127.0.0.1:$P_BACK) ;;
    udp) extra=(--target 127.0.0.1:$P_UDP --seed "$SEED" --relay-id bench-relay) ;;
  esac
  # One session first so that lazily built per-process state is counted in "before".
  timeout 30 "$LOAD" idle "$path" --sessions 1 --hold 0 "${extra[@]}" >&2
  sleep 1
  local before; before=$(rss "$pid")
  rm -f "$WORK/ready"
  local n=$N; [[ $path == udp ]] && n=$U
  timeout 300 "$LOAD" idle "$path" --sessions "$n" --hold 240 --ready-file "$WORK/ready" "${extra[@]}" >&2 &
  local lpid=$!
  for _ in $(seq 2400); do [[ -s $WORK/ready ]] && break; kill -0 "$lpid" 2>/dev/null || break; sleep 0.1; done
  [[ -s $WORK/ready ]] || { log "$path: sessions did not open"; kill "$lpid" 2>/dev/null; return 1; }
  sleep 2
  local after; after=$(rss "$pid")
  local fds; fds=$(ls "/proc/$pid/fd" | wc -l)
  kill "$lpid" 2>/dev/null || true
  wait "$lpid" 2>/dev/null || true
  echo "$before $after $(cat "$WORK/ready") $fds"
}
log "relay: opening $N idle paired sessions"
read -r rb ra rn rfd < <(measure relay "$RPID")
log "relay: RSS $rb KiB -> $ra KiB with $rn sessions ($rfd fds)"
sleep 2
log "haproxy: opening $N idle proxied connections"
read -r hb ha hn hfd < <(measure haproxy "$HPID")
log "haproxy: RSS $hb KiB -> $ha KiB with $hn connections ($hfd fds)"
sleep 2
log "relay: opening $U idle paired UDP sessions"
read -r ub ua un ufd < <(measure udp "$UPID")
log "relay (UDP): RSS $ub KiB -> $ua KiB with $un sessions ($ufd fds)"
python3 - "$rb" "$ra" "$rn" "$rfd" "$hb" "$ha" "$hn" "$hfd" "$ub" "$ua" "$un" "$ufd" "$RELAY_DESC" "$ASKED" "$HARD" "$U" <<'PY'
import sys
rb, ra, rn, rfd, hb, ha, hn, hfd, ub, ua, un, ufd = map(int, sys.argv[1:13])
desc, asked, hard, uasked = sys.argv[13], int(sys.argv[14]), int(sys.argv[15]), int(sys.argv[16])
r = (ra - rb) / rn
h = (ha - hb) / hn
print(f"| relay memory per idle paired TCP session, {rn:,} sessions open | {r:.2f} KiB "
      f"(RSS {rb/1024:.1f} → {ra/1024:.1f} MiB) | HAProxy 2.6 {h:.2f} KiB per idle proxied connection "
      f"(RSS {hb/1024:.1f} → {ha/1024:.1f} MiB, {hn:,} open) | {r/h if h else float('inf'):.2f}× HAProxy's memory "
      f"| VmRSS delta / sessions, after 1 warm-up session; relay holds {rfd:,} fds (2 sockets per idle session; "
      f"pipes are made on first bytes), HAProxy {hfd:,}; kernel socket/pipe memory not in RSS for either; relay: {desc}; "
      f"sessions opened by `relay_load idle`"
      + (f"; {asked:,} sessions asked, but the hard open-files limit here is {hard:,} and cannot be raised "
         f"(no CAP_SYS_RESOURCE), so {rn:,} were opened: at {r:.2f} KiB each, {asked:,} would add "
         f"{r*asked/1024:.1f} MiB (linear extrapolation)" if rn < asked else "") + " |")
u = (ua - ub) / un
print(f"| relay memory per idle paired UDP session, {un:,} sessions open | {u:.2f} KiB "
      f"(RSS {ub/1024:.1f} → {ua/1024:.1f} MiB) | HAProxy 2.6 does not relay UDP; its TCP figure above, "
      f"{h:.2f} KiB per idle proxied connection, for scale | {u/h if h else float('inf'):.2f}× HAProxy's TCP memory "
      f"| VmRSS delta / sessions, after 1 warm-up session, in a relay process of its own; {un:,} of {uasked:,} "
      f"sessions paired (the relay answered `paired` to both sides), all bound from one side A and one side B "
      f"socket by `relay_load idle udp` (sessions are keyed by id); relay holds {ufd:,} fds (none per UDP session); "
      f"udp_idle_timeout_secs = 600 so none expire during the measurement; relay: {desc} |")
PY
