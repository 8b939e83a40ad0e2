#!/usr/bin/env bash
# Starts the Flux gateway and its dashboard in the background with the embedded defaults (or
# FLUX_* from the environment), writes its PID to run/flux.pid and its log to run/flux.log, and
# prints how to reach and stop it. Builds in release mode first when the sources changed. Running it again
# while Flux is up does not start a second gateway.
set -euo pipefail
cd "$(dirname "$0")"

RUN_DIR=run
PID_FILE="$RUN_DIR/flux.pid"
LOG_FILE="$RUN_DIR/flux.log"
BIN=target/release/flux
HOST="${FLUX_HOST:-127.0.0.1}"
PORT="${FLUX_PORT:-6001}"

running_pid() {
  [ -f "$PID_FILE" ] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  # The PID must still be our binary, not a recycled PID.
  [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$(readlink -f "$BIN")" ] && echo "$pid"
}

answers() {
  # A plain HTTP health check over bash's /dev/tcp: no curl needed on a fresh machine.
  { exec 3<>"/dev/tcp/$HOST/$PORT"; } 2>/dev/null || return 1
  printf 'GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$HOST" >&3
  local status
  read -r -t 2 status <&3 || true
  exec 3<&-
  [[ "$status" == "HTTP/1.1 200"* ]]
}

dashboard_url() {
  # The address flux logged: the one it really bound, even with FLUX_DASHBOARD_PORT=0.
  grep -o 'flux dashboard on http://[^ ]*' "$LOG_FILE" 2>/dev/null | awk '{print $4}' | tail -1
}

if pid="$(running_pid)"; then
  echo "Flux is already running (PID $pid) on $HOST:$PORT, dashboard $(dashboard_url). Stop it with ./cleanup.sh"
  exit 0
fi

if ! command -v cargo >/dev/null; then
  echo "start.sh: cargo is needed to build Flux (https://rustup.rs)" >&2
  exit 1
fi
echo "Building Flux (release)..."
cargo build --release --quiet --bin flux

mkdir -p "$RUN_DIR"
nohup "$BIN" >"$LOG_FILE" 2>&1 &
echo $! >"$PID_FILE"

for _ in $(seq 100); do
  answers && break
  if ! running_pid >/dev/null; then
    echo "Flux exited during startup; its log ($LOG_FILE):" >&2
    tail -20 "$LOG_FILE" >&2
    rm -f "$PID_FILE"
    exit 1
  fi
  sleep 0.1
done
answers || { echo "Flux did not answer on $HOST:$PORT within 10 s; see $LOG_FILE" >&2; exit 1; }
# The dashboard is logged once both listeners are up, a moment after the port answers.
for _ in $(seq 50); do [ -n "$(dashboard_url)" ] && break; sleep 0.1; done
DASHBOARD="$(dashboard_url)"
[ -n "$DASHBOARD" ] || { echo "Flux did not log its dashboard address; see $LOG_FILE" >&2; exit 1; }

cat <<INFO
Flux is running (PID $(cat "$PID_FILE")).

  Dashboard   $DASHBOARD
  Metrics     ${DASHBOARD}metrics  (Prometheus)
  WebSocket   ws://$HOST:$PORT/app/${FLUX_APP_KEY:-app-key}?protocol=7
  REST API    http://$HOST:$PORT/apps/${FLUX_APP_ID:-app-id}/
  App         id ${FLUX_APP_ID:-app-id}, key ${FLUX_APP_KEY:-app-key}, secret ${FLUX_APP_SECRET:-app-secret}
  Log         $LOG_FILE

Stop it with ./cleanup.sh
INFO
