#!/usr/bin/env bash
# WebSocket conformance: runs the Autobahn|Testsuite fuzzing client (case groups 1-7, 9 and 10)
# against the echo server built on Flux's own event loop and codec, and fails unless every case
# is OK, NON-STRICT or INFORMATIONAL. The suite needs Python 2.7 (pyenv's 2.7.18 here); it is
# installed for the user on first run. Reports go to reports/autobahn/ (index.html to browse).
set -euo pipefail
cd "$(dirname "$0")/../.."

PY2="${PY2:-$HOME/.pyenv/versions/2.7.18/bin/python}"
WSTEST="$HOME/.local/bin/wstest"
PORT="${AUTOBAHN_PORT:-9001}"
OUT=reports/autobahn

if [ ! -x "$WSTEST" ]; then
  echo "autobahn: installing autobahntestsuite for $PY2"
  "$PY2" -m pip install --user --quiet autobahntestsuite
fi

cargo build --release --quiet --example echo_server
target/release/examples/echo_server "127.0.0.1:$PORT" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done

rm -rf "$OUT" && mkdir -p "$OUT"
cat > "$OUT/fuzzingclient.json" <<JSON
{
  "outdir": "$PWD/$OUT",
  "servers": [{"agent": "flux", "url": "ws://127.0.0.1:$PORT"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
JSON
(cd "$OUT" && "$WSTEST" -m fuzzingclient -s fuzzingclient.json > wstest.log 2>&1) || {
  tail -20 "$OUT/wstest.log"
  exit 1
}
python3 tests/autobahn/check_report.py "$OUT/index.json"
