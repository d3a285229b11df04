#!/usr/bin/env bash
# Relay TCP goodput and CPU/GB vs HAProxy 2.6 (TCP mode, splicing on) vs direct, 1 and 64 streams.
# The relay runs twice: with the system's congestion control, and with `[tcp] congestion =
# "cubic"` (the documented choice for a relay whose peers are near it: no BBR pacing timers);
# direct runs twice too, with the system's and with cubic on the client's sockets, so that the
# cubic relay is also compared with a direct path that has no pacing either.
# Prints markdown table rows on stdout, progress on stderr.
#
# One load generator drives all three paths (crates/relay/examples/relay_load.rs), so the
# client's cost is identical: N sender->receiver stream pairs, 128 KiB writes, one direction,
# one blocking thread per socket end. direct: sender -> receiver's listener. haproxy: sender ->
# HAProxy frontend -> receiver's listener. relay: sender and receiver both dial the relay with
# signed tickets and the relay splices them. Rounds alternate relay / relay-cubic / HAProxy / direct /
# direct-cubic (order
# rotated each round); the row gives the median round and the path process's CPU seconds per GB
# (over all rounds): on-CPU time of all its threads from /proc/PID/task/*/schedstat in ns
# (relay_load's path_run_s; /proc/PID/stat counts 10 ms ticks; both paths' threads live through
# the run, so none of their time is lost). Env: RELAY_BENCH_SECS (5), RELAY_BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${RELAY_BENCH_SECS:-5}
ROUNDS=${RELAY_BENCH_ROUNDS:-3}
log() { echo "[relay-tcp] $*" >&2; }
command -v haproxy >/dev/null || { log "installing haproxy"; apt-get install -y haproxy >&2; }
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
P_HAP=15202; P_BACK=15212; P_RELAY=15203; P_CUBIC=15204
RELAY_DESC='`steelyard relay` (release)'
target/release/steelyard relay --relay-id bench-relay --broker-key "$PUB" --tcp 127.0.0.1:$P_RELAY \
  >"$WORK/relay.out" 2>"$WORK/relay.log" & RPID=$!
PIDS+=("$RPID")
SYS_CC=$(cat /proc/sys/net/ipv4/tcp_congestion_control)
cat >"$WORK/relay-cubic.toml" <<CFG
relay_id = "bench-relay"
broker_keys = ["$PUB"]
[listen]
tcp = "127.0.0.1:$P_CUBIC"
[tcp]
congestion = "cubic"
CFG
target/release/steelyard relay --config "$WORK/relay-cubic.toml" \
  >"$WORK/relay-cubic.out" 2>"$WORK/relay-cubic.log" & CPID=$!
PIDS+=("$CPID")
cat > "$WORK/haproxy.cfg" <<CFG
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option splice-auto
  option splice-request
  option splice-response
listen bench
  bind 127.0.0.1:$P_HAP
  server s1 127.0.0.1:$P_BACK
CFG
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & HPID=$!
PIDS+=("$HPID")
sleep 0.7
kill -0 "$RPID" && kill -0 "$HPID" && kill -0 "$CPID"
HAP_THREADS=$(awk '/^Threads:/{print $2}' "/proc/$HPID/status")
RELAY_THREADS=$(awk '/^Threads:/{print $2}' "/proc/$RPID/status")
LOADAVG=$(cut -d' ' -f1 /proc/loadavg)

run() { # path streams
  local extra=()
  case $1 in
    relay) extra=(--target 127.0.0.1:$P_RELAY --seed "$SEED" --relay-id bench-relay --pid "$RPID") ;;
    relay-cubic) extra=(--target 127.0.0.1:$P_CUBIC --seed "$SEED" --relay-id bench-relay --pid "$CPID") ;;
    haproxy) extra=(--target 127.0.0.1:$P_HAP --listen 127.0.0.1:$P_BACK --pid "$HPID") ;;
    direct) extra=() ;;
    direct-cubic) extra=(--congestion cubic) ;;
  esac
  # relay_load's mode is "relay" (or "direct") for both variants: tag the cubic one's line.
  timeout $((DUR + 60)) "$LOAD" "${1%-cubic}" --streams "$2" --secs "$DUR" "${extra[@]}" |
    sed "s/\"mode\":\"${1%-cubic}\"/\"mode\":\"$1\"/"
}
: >"$WORK/results.jsonl"
for streams in 1 64; do
  for r in $(seq "$ROUNDS"); do
    paths=(relay relay-cubic haproxy direct direct-cubic)
    k=$(( (r - 1) % ${#paths[@]} ))
    order="${paths[*]:k} ${paths[*]:0:k}"
    for path in $order; do
      log "$streams stream(s), round $r/$ROUNDS: $path"
      run "$path" "$streams" | tee -a "$WORK/results.jsonl" >&2
    done
  done
done
python3 - "$WORK/results.jsonl" "$DUR" "$ROUNDS" "$RELAY_DESC" "$HAP_THREADS" "$RELAY_THREADS" "$LOADAVG" "$SYS_CC" <<'PY'
import json, statistics, sys
path, dur, rounds, relay_desc, hap_thr, relay_thr, loadavg, sys_cc = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
for streams in (1, 64):
    def pick(mode):
        rs = [r for r in rows if r["mode"] == mode and r["streams"] == streams]
        gbps = statistics.median(r["per_sec"] * 8 / 1e9 for r in rs)
        gb = sum(r["bytes"] for r in rs) / 1e9
        cpu = sum(r["path_run_s"] for r in rs) / gb if rs[0]["path_run_s"] is not None else None
        client = sum(r["client_cpu_s"] for r in rs) / gb
        spread = "–".join("%.1f" % (r["per_sec"] * 8 / 1e9) for r in rs)
        return gbps, cpu, client, spread
    h, hc, hcl, hsp = pick("haproxy")
    d, _, dcl, dsp = pick("direct")
    dc, _, dccl, dcsp = pick("direct-cubic")
    for mode, cc in (("relay", f"system default congestion control ({sys_cc})"),
                     ("relay-cubic", "`[tcp] congestion = \"cubic\"`")):
      r, rc, rcl, rsp = pick(mode)
      print(f"| relay TCP, {cc}, {streams} stream(s), loopback, median of {rounds} alternating {dur} s rounds | "
          f"{r:.2f} Gbit/s, relay CPU {rc:.3f} s/GB | HAProxy 2.6 (TCP mode, splice-auto/request/response) "
          f"{h:.2f} Gbit/s, HAProxy CPU {hc:.3f} s/GB | {r/h:.2f}× HAProxy (goal ≥ 1.0×); "
          f"{r/d:.2f}× direct (goal ≥ 0.6×) | direct {d:.2f} Gbit/s. Rounds (Gbit/s): relay {rsp}, HAProxy {hsp}, "
          f"direct {dsp}. CPU per GB relay/HAProxy {rc/hc:.2f}× (on-CPU ns of all the process's threads, "
          f"/proc/PID/task/*/schedstat). Same client for all three: `relay_load` "
          f"(one blocking thread per socket end, 128 KiB writes; client CPU s/GB relay {rcl:.3f}, HAProxy {hcl:.3f}, "
          f"direct {dcl:.3f}); whole path CPU s/GB (relay + client) {rc+rcl:.3f} vs direct {dcl:.3f}, "
          f"{dcl/(rc+rcl):.2f}× direct by CPU. The client's sockets (direct, and both hops' client ends) use the system default ({sys_cc}); "
          f"direct with cubic on its sockets: {dc:.2f} Gbit/s (rounds {dcsp}, client CPU {dccl:.3f} s/GB), relay {r/dc:.2f}× that. Relay: {relay_desc}, {relay_thr} threads; HAProxy {hap_thr} threads "
          f"(system congestion control). "
          f"2 shared cores, load average {loadavg} at start |")
PY
