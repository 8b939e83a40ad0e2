#!/usr/bin/env bash
# The dashboard in a real browser: starts a release `flux` on free ports, then dashboard.mjs
# drives Debian's Chromium (headless, through playwright-core) against its dashboard while
# flux-load runs the slow-consumer scenario, and checks that the live numbers move, that a slow
# consumer turns red in the connections grid and that its eviction shows in the log.
# Installs what it needs when missing (Debian `chromium`, the npm packages of package-lock.json),
# bounds every step in time, and stops what it started. Loopback only.
# Artefacts: tests/browser/dashboard.png and tests/browser/artifacts/ (both gitignored).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/tests/browser"
ARTIFACTS="$HERE/artifacts"
cd "$ROOT"

export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  timeout 300 $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 $SUDO apt-get install -y -qq chromium
fi

# npm ci records what it installed in node_modules/.package-lock.json: reinstall when that is
# missing or older than the lock file.
if [ ! -f "$HERE/node_modules/.package-lock.json" ] || [ "$HERE/package-lock.json" -nt "$HERE/node_modules/.package-lock.json" ]; then
  (cd "$HERE" && timeout 300 npm ci --no-audit --no-fund --loglevel=error)
fi

timeout 1800 cargo build --release --quiet --bin flux --bin flux-load

rm -rf "$ARTIFACTS"
mkdir -p "$ARTIFACTS"
FLUX_PID=""
stop_flux() {
  if [ -n "$FLUX_PID" ]; then
    kill -TERM "$FLUX_PID" 2>/dev/null || true
    wait "$FLUX_PID" 2>/dev/null || true
    FLUX_PID=""
  fi
}
trap stop_flux EXIT

FLUX_PORT=0 FLUX_DASHBOARD_PORT=0 FLUX_WORKERS=2 RUST_LOG=info target/release/flux 2>"$ARTIFACTS/flux.log" &
FLUX_PID=$!
for _ in $(seq 100); do grep -q "flux dashboard on" "$ARTIFACTS/flux.log" && break; sleep 0.1; done
ADDR="$(grep -o 'flux listening on [0-9.:]*' "$ARTIFACTS/flux.log" | awk '{print $4}' || true)"
DASHBOARD="$(grep -o 'flux dashboard on http://[0-9.:]*/' "$ARTIFACTS/flux.log" | awk '{print $4}' || true)"
if [ -z "$ADDR" ] || [ -z "$DASHBOARD" ]; then
  echo "browser test: flux did not start; its log:" >&2
  cat "$ARTIFACTS/flux.log" >&2
  exit 1
fi
echo "browser test: flux on $ADDR, dashboard on $DASHBOARD"

FLUX_PORT="${ADDR##*:}" FLUX_DASHBOARD_URL="$DASHBOARD" FLUX_LOAD_BIN="$ROOT/target/release/flux-load" \
  ARTIFACTS="$ARTIFACTS" SCREENSHOT="$HERE/dashboard.png" \
  timeout --kill-after=10 180 node "$HERE/dashboard.mjs"

# The gateway must stop cleanly after all that.
kill -TERM "$FLUX_PID"
if ! wait "$FLUX_PID"; then
  FLUX_PID=""
  echo "browser test: flux did not exit 0 on SIGTERM" >&2
  exit 1
fi
FLUX_PID=""
if grep -q panicked "$ARTIFACTS/flux.log"; then
  echo "browser test: a panic in the gateway log" >&2
  exit 1
fi
echo "browser test: passed"
