#!/usr/bin/env bash
# End-to-end tests with real clients: pusher-js 8, the official `pusher` server SDK and `ws`
# (node --test), then Python's `websockets`. Installs the npm packages (from package-lock.json)
# and a virtualenv with websockets when missing. Every test bounds its own time.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd ../.. && pwd)"

(cd "$ROOT" && cargo build --quiet --bin flux)
export FLUX_BIN="$ROOT/target/debug/flux"

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
timeout 300 node --test --test-concurrency=1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet 'websockets>=13,<16'
fi
timeout 120 .venv/bin/python test_websockets.py
