#!/usr/bin/env bash
# End-to-end tests of the real `flux` binary with real third-party clients: pusher-js 8, the
# official `pusher` server SDK and `ws` (node --test), then Python's `websockets`.
# Builds the debug binary, installs the npm packages from package-lock.json and a virtualenv with
# websockets when missing or stale, and bounds every step in time. Loopback only.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
E2E="$ROOT/tests/e2e"
cd "$ROOT"

# The one websockets release these tests are known to pass with (its asyncio client needs 13+).
WEBSOCKETS="websockets==15.0.1"

timeout 900 cargo build --quiet --bin flux
export FLUX_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/flux"

# npm ci records what it installed in node_modules/.package-lock.json: reinstall when that is
# missing or older than the lock file.
if [ ! -f "$E2E/node_modules/.package-lock.json" ] || [ "$E2E/package-lock.json" -nt "$E2E/node_modules/.package-lock.json" ]; then
  (cd "$E2E" && timeout 300 npm ci --no-audit --no-fund --loglevel=error)
fi
timeout 300 node --test tests/e2e/

if ! "$E2E/.venv/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$E2E/.venv"
  timeout 120 python3 -m venv "$E2E/.venv"
fi
# Already satisfied is answered from the venv itself, without the network.
PIP_DISABLE_PIP_VERSION_CHECK=1 timeout 300 "$E2E/.venv/bin/pip" install --quiet --timeout 60 "$WEBSOCKETS"
timeout 120 "$E2E/.venv/bin/python" tests/e2e/test_websockets.py
