#!/usr/bin/env bash
# BENCHMARKS.md's cluster figures, side by side in one run, on loopback:
#
#   cluster-300, cluster-500   3,000 subscribers of one channel, events published round-robin
#   (cluster-RATE)             (any rate: cluster-100 is 100 events/s):
#                              one Flux node holding all 3,000 ("flux-1"), three Flux nodes on
#                              one Redis holding 1,000 each ("flux-3"; "flux-3x1": one worker
#                              each), and three Sockudo nodes with its Redis adapter
#                              ("sockudo-3"), at 300 and 500 events/s
#   presence-cluster           3,000 members of one presence channel, 100 changes/s, on one
#                              Flux node and on three
#   redis-channel              the cost, on a node, of events for channels it has no subscriber of
#                              (what per-channel Redis subscriptions would save)
#
#   benches/cluster.sh                          # everything (about 10 minutes)
#   benches/cluster.sh cluster-500              # one run
#   SETUPS="flux-1 flux-3" benches/cluster.sh   # without Sockudo
#
# For every run it keeps flux-load's JSON summary and each server process's CPU seconds and peak
# RSS, Redis's CPU seconds and PUBLISH count, then prints the tables (benches/cluster_table.py).
# Results go to target/cluster/<time>/. It needs redis-server; Sockudo is looked for as
# `sockudo` on PATH, in ~/.cargo/bin or in /work/sockudo-install/bin (built with
# `cargo install sockudo --features redis`); without it its column is left out. A benchmark,
# not a test: it asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_RUNS=(cluster-300 cluster-500 presence-cluster redis-channel)
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=("${ALL_RUNS[@]}")
SETUPS="${SETUPS:-flux-1 flux-3 flux-3x1 sockudo-3}"
OUT="${OUT:-target/cluster/$(date +%Y%m%d-%H%M%S)}"
BASE_PORT="${BASE_PORT:-6500}"
REDIS_PORT="${REDIS_PORT:-6599}"
mkdir -p "$OUT"

command -v redis-server >/dev/null || { echo "cluster.sh: redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
# shellcheck source=benches/common.sh
. benches/common.sh
if [[ " $SETUPS " == *" sockudo-3 "* && -z "$SOCKUDO_BIN" ]]; then
  echo "cluster.sh: sockudo not found; leaving its column out" >&2
  SETUPS="${SETUPS//sockudo-3/}"
fi

echo "Building Flux and flux-load (release)..."
cargo build --release --quiet --bin flux --bin flux-load

PIDS=()
REDIS_PID=""
stop_all() {
  for pid in "${PIDS[@]}" $REDIS_PID; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}" $REDIS_PID; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  PIDS=()
  REDIS_PID=""
}
trap stop_all EXIT

listening() { { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null && exec 3<&-; }

await_port() { # port pid name log
  for _ in $(seq 100); do
    listening "$1" && return 0
    kill -0 "$2" 2>/dev/null || { echo "$3 exited at start; see $4" >&2; return 1; }
    sleep 0.1
  done
  echo "$3 did not listen on $1 within 10 s; see $4" >&2
  return 1
}

start_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$1.redis.log" 2>&1 &
  REDIS_PID=$!
  await_port "$REDIS_PORT" "$REDIS_PID" redis-server "$1.redis.log"
}

# Starts a setup's servers on BASE_PORT, BASE_PORT+1, ...; sets PIDS and NODE_PORTS.
start_setup() { # setup base
  # "flux-3" is three nodes; "flux-3x1" three nodes of one worker each (three machines' worth of
  # nodes on this one, without more event-loop threads than cores).
  local setup="$1" base="$2" spec=${1##*-} i port
  local count=${spec%x*} workers=()
  [[ "$spec" != *x* ]] || workers=(FLUX_WORKERS="${spec#*x}")
  NODE_PORTS=()
  [ "$count" -eq 1 ] || start_redis "$base"
  for i in $(seq "$count"); do
    port=$((BASE_PORT + i))
    NODE_PORTS+=("$port")
    case "$setup" in
      flux-1)
        env "${workers[@]}" FLUX_PORT="$port" FLUX_DASHBOARD_PORT=0 FLUX_PRESENCE_MAX_MEMBERS=20000 RUST_LOG=warn \
          target/release/flux >"$base.node$i.log" 2>&1 &
        ;;
      flux-*)
        env "${workers[@]}" FLUX_PORT="$port" FLUX_DASHBOARD_PORT=0 FLUX_PRESENCE_MAX_MEMBERS=20000 \
          FLUX_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" FLUX_NODE_ID="node-$i" RUST_LOG=warn target/release/flux >"$base.node$i.log" 2>&1 &
        ;;
      sockudo-*)
        # Its Redis adapter and cache on our redis-server.
        start_sockudo "$OUT/sockudo-cwd-$i" "$port" "$base.node$i.log" \
          ADAPTER_DRIVER=redis CACHE_DRIVER=redis REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
        ;;
    esac
    PIDS+=($!)
  done
  for i in $(seq "$count"); do await_port "${NODE_PORTS[$((i - 1))]}" "${PIDS[$((i - 1))]}" "$setup node $i" "$base.node$i.log" || return 1; done
}

# flux-load's arguments per run (the target is added per setup).
run_args() {
  case "$1" in
    # cluster-RATE: RATE events/s.
    cluster-[0-9]*) echo "chat-storm --connections 3000 --slow 0 --partition 0 --rate ${1#cluster-} --duration 20" ;;
    # 50 leaves and rejoins a second: 100 membership changes, each announced to 3,000 members.
    presence-cluster) echo "presence-storm --connections 3000 --churn 50 --duration 30 --hold-secs 10" ;;
    *) echo "unknown run $1 (known: ${ALL_RUNS[*]})" >&2; exit 2 ;;
  esac
}

publishes() { redis-cli -p "$REDIS_PORT" info commandstats 2>/dev/null | sed -n 's/^cmdstat_publish:calls=\([0-9]*\),.*/\1/p' | tr -d '\r' | grep . || echo 0; }

# Runs flux-load against the running setup and records everything about it in $base.*.
measure() { # base args...
  local base="$1"; shift
  local i cpu_start=() redis_start=0 pub_start=0
  for pid in "${PIDS[@]}"; do cpu_start+=("$(cpu_secs "$pid")"); done
  [ -z "$REDIS_PID" ] || { redis_start="$(cpu_secs "$REDIS_PID")"; pub_start="$(publishes)"; }
  (while true; do
     for i in "${!PIDS[@]}"; do
       r="$(rss_kib "${PIDS[$i]}")"; p="$(cat "$base.peak$i" 2>/dev/null || echo 0)"
       [ "${r:-0}" -gt "$p" ] && echo "$r" >"$base.peak$i"
     done
     sleep 0.5
   done) &
  local sampler=$!
  timeout 600 target/release/flux-load "$@" --quiet --json "$base.json" >"$base.load.log" 2>&1 || echo "flux-load failed; see $base.load.log" >&2
  kill "$sampler" 2>/dev/null || true
  wait "$sampler" 2>/dev/null || true
  {
    printf '{"nodes": ['
    for i in "${!PIDS[@]}"; do
      [ "$i" -eq 0 ] || printf ', '
      printf '{"cpu_secs": %s, "rss_peak_kib": %s}' "$(awk -v a="${cpu_start[$i]}" -v b="$(cpu_secs "${PIDS[$i]}")" 'BEGIN {printf "%.2f", b - a}')" \
        "$(cat "$base.peak$i" 2>/dev/null || echo 0)"
    done
    printf ']'
    if [ -n "$REDIS_PID" ]; then
      printf ', "redis_cpu_secs": %s, "redis_publishes": %s' "$(awk -v a="$redis_start" -v b="$(cpu_secs "$REDIS_PID")" 'BEGIN {printf "%.2f", b - a}')" \
        "$(($(publishes) - pub_start))"
    fi
    printf '}\n'
  } >"$base.server.json"
  tail -n 8 "$base.load.log"
}

for run in "${RUNS[@]}"; do
  if [ "$run" = redis-channel ]; then
    # Two Flux nodes; every subscriber and every publish on node 2, so node 1 receives each
    # event over Redis for a channel it has no subscriber of. Node 1's CPU per event is the
    # cost a per-channel Redis subscription would save it.
    base="$OUT/$run.flux-2"
    echo "== $run: flux-load chat-storm against node 2 of 2"
    start_setup flux-2 "$base" || { stop_all; continue; }
    sleep 1
    measure "$base" chat-storm --connections 100 --slow 0 --partition 0 --rate 2000 --duration 20 --port "${NODE_PORTS[1]}" --label flux-2
    stop_all
    continue
  fi
  args="$(run_args "$run")"
  for setup in $SETUPS; do
    if [[ "$run" == presence-* && "$setup" == sockudo-* ]]; then
      continue # Sockudo's presence is not part of the issue's comparison.
    fi
    base="$OUT/$run.$setup"
    echo "== $run on $setup: flux-load $args"
    start_setup "$setup" "$base" || { stop_all; continue; }
    sleep 1
    target=(--port "${NODE_PORTS[0]}")
    [ ${#NODE_PORTS[@]} -eq 1 ] || target=(--nodes "$(IFS=,; echo "${NODE_PORTS[*]}")")
    # shellcheck disable=SC2086
    measure "$base" $args "${target[@]}" --label "$setup"
    stop_all
  done
done

python3 benches/cluster_table.py "$OUT" | tee "$OUT/table.md"
echo "Results in $OUT"
