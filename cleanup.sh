#!/usr/bin/env bash
# Stops what start.sh (and demo.sh) started, by PID file and never by process name, then
# removes the runtime files. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")"

RUN_DIR=run
shopt -s nullglob
for pid_file in "$RUN_DIR"/*.pid; do
  pid="$(cat "$pid_file")"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "Stopping $(basename "$pid_file" .pid) (PID $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # SIGTERM lets Flux close its clients with 4200; give it a bounded time.
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "PID $pid did not stop in 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pid_file"
done
rm -rf "$RUN_DIR"
echo "Clean."
