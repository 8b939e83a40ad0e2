#!/usr/bin/env bash
# Starts the Flux gateway and its dashboard in the background with the embedded defaults (or
# FLUX_* from the environment), writes its PID to run/flux.pid and its log to run/flux.log, and
# prints how to reach and stop it. Builds in release mode first when the sources changed. Running it again
# while Flux is up does not start a second gateway.
#
#   ./start.sh              # one node on 6001, dashboard on 8080
#   ./start.sh --nodes 3    # a local redis-server and three clustered nodes: 6001-6003,
#                           # dashboards 8080-8082 (FLUX_REDIS_URL set: that Redis instead)
set -euo pipefail
cd "$(dirname "$0")"

NODES=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "start.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || { echo "start.sh: --nodes takes a number from 1 to 99" >&2; exit 2; }

RUN_DIR=run
BIN=target/release/flux
HOST="${FLUX_HOST:-127.0.0.1}"
PORT="${FLUX_PORT:-6001}"
DASHBOARD_PORT="${FLUX_DASHBOARD_PORT:-8080}"
# The local Redis of a cluster: not 6379, so a Redis the machine already runs is left alone.
REDIS_PORT="${FLUX_START_REDIS_PORT:-6390}"

# Node i's files: run/flux.* for a single node (as before), run/flux-i.* in a cluster.
node_name() { if [ "$NODES" -eq 1 ]; then echo flux; else echo "flux-$1"; fi; }

# The PID in run/NAME.pid if it is still that program (`readlink` of its binary), not a recycled PID.
running_pid() {
  local pid_file="$RUN_DIR/$1.pid" exe="$2" pid
  [ -f "$pid_file" ] || return 1
  pid="$(cat "$pid_file")"
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$exe")" ] && echo "$pid"
}

answers() {
  # A plain HTTP health check over bash's /dev/tcp: no curl needed on a fresh machine.
  local port="$1" status
  { exec 3<>"/dev/tcp/$HOST/$port"; } 2>/dev/null || return 1
  printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$HOST" >&3
  read -r -t 2 status <&3 || true
  exec 3<&-
  [[ "$status" == "HTTP/1.1 200"* ]]
}

dashboard_url() {
  # The address flux logged: the one it really bound, even with FLUX_DASHBOARD_PORT=0.
  grep -o 'flux dashboard on http://[^ ]*' "$RUN_DIR/$1.log" 2>/dev/null | awk '{print $4}' | tail -1
}

if pid="$(running_pid "$(node_name 1)" "$BIN")"; then
  echo "Flux is already running (PID $pid) on $HOST:$PORT, dashboard $(dashboard_url "$(node_name 1)"). Stop it with ./cleanup.sh"
  exit 0
fi

if ! command -v cargo >/dev/null; then
  echo "start.sh: cargo is needed to build Flux (https://rustup.rs)" >&2
  exit 1
fi
echo "Building Flux (release)..."
cargo build --release --quiet --bin flux
mkdir -p "$RUN_DIR"

REDIS_URL="${FLUX_REDIS_URL:-}"
if [ "$NODES" -gt 1 ] && [ -z "$REDIS_URL" ]; then
  REDIS_BIN="$(command -v redis-server || true)"
  if [ -z "$REDIS_BIN" ]; then
    echo "start.sh: a cluster needs Redis. Install it with: sudo apt-get install redis-server" >&2
    echo "          (or point FLUX_REDIS_URL at a Redis you run)" >&2
    exit 1
  fi
  nohup "$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$RUN_DIR/redis.log" 2>&1 &
  echo $! >"$RUN_DIR/redis.pid"
  for _ in $(seq 50); do
    { exec 4<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null && { exec 4<&-; break; }
    running_pid redis "$REDIS_BIN" >/dev/null || { echo "redis-server exited; see $RUN_DIR/redis.log" >&2; exit 1; }
    sleep 0.1
  done
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi

# Starts node i (1-based) in the background.
start_node() {
  local i="$1" name
  name="$(node_name "$i")"
  if [ "$NODES" -eq 1 ]; then
    nohup "$BIN" >"$RUN_DIR/$name.log" 2>&1 &
  else
    FLUX_PORT=$((PORT + i - 1)) FLUX_DASHBOARD_PORT=$((DASHBOARD_PORT + i - 1)) FLUX_REDIS_URL="$REDIS_URL" \
      FLUX_NODE_ID="${FLUX_NODE_ID:-node}-$i" nohup "$BIN" >"$RUN_DIR/$name.log" 2>&1 &
  fi
  echo $! >"$RUN_DIR/$name.pid"
}

# Waits for node i to answer and log its dashboard; says why not and fails otherwise.
await_node() {
  local i="$1" name port
  name="$(node_name "$i")"
  port=$((PORT + i - 1))
  for _ in $(seq 100); do
    answers "$port" && break
    if ! running_pid "$name" "$BIN" >/dev/null; then
      echo "Flux ($name) exited during startup; its log ($RUN_DIR/$name.log):" >&2
      tail -20 "$RUN_DIR/$name.log" >&2
      rm -f "$RUN_DIR/$name.pid"
      return 1
    fi
    sleep 0.1
  done
  answers "$port" || { echo "Flux ($name) did not answer on $HOST:$port within 10 s; see $RUN_DIR/$name.log" >&2; return 1; }
  # The dashboard is logged once both listeners are up, a moment after the port answers.
  for _ in $(seq 50); do [ -n "$(dashboard_url "$name")" ] && break; sleep 0.1; done
  [ -n "$(dashboard_url "$name")" ] || { echo "Flux ($name) did not log its dashboard address; see $RUN_DIR/$name.log" >&2; return 1; }
}

for i in $(seq "$NODES"); do start_node "$i"; done
for i in $(seq "$NODES"); do await_node "$i" || { ./cleanup.sh >/dev/null; exit 1; }; done

if [ "$NODES" -eq 1 ]; then
  DASHBOARD="$(dashboard_url flux)"
  cat <<INFO
Flux is running (PID $(cat "$RUN_DIR/flux.pid")).

  Dashboard   $DASHBOARD
  Metrics     ${DASHBOARD}metrics  (Prometheus)
  WebSocket   ws://$HOST:$PORT/app/${FLUX_APP_KEY:-app-key}?protocol=7
  REST API    http://$HOST:$PORT/apps/${FLUX_APP_ID:-app-id}/
  App         id ${FLUX_APP_ID:-app-id}, key ${FLUX_APP_KEY:-app-key}, secret ${FLUX_APP_SECRET:-app-secret}
  Log         $RUN_DIR/flux.log

Stop it with ./cleanup.sh
INFO
  exit 0
fi

echo "A Flux cluster of $NODES nodes is running on $REDIS_URL:"
echo
for i in $(seq "$NODES"); do
  name="$(node_name "$i")"
  printf '  %-8s PID %-7s ws://%s:%s/app/%s?protocol=7  REST http://%s:%s/apps/%s/  dashboard %s  log %s\n' \
    "${FLUX_NODE_ID:-node}-$i" "$(cat "$RUN_DIR/$name.pid")" "$HOST" $((PORT + i - 1)) "${FLUX_APP_KEY:-app-key}" \
    "$HOST" $((PORT + i - 1)) "${FLUX_APP_ID:-app-id}" "$(dashboard_url "$name")" "$RUN_DIR/$name.log"
done
cat <<INFO

  App         id ${FLUX_APP_ID:-app-id}, key ${FLUX_APP_KEY:-app-key}, secret ${FLUX_APP_SECRET:-app-secret}
  A client on any node gets events published on every node; each dashboard shows the cluster.

Stop them with ./cleanup.sh
INFO
