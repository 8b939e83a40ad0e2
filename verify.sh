#!/usr/bin/env bash
# End-to-end checks of a release build: starts its own gateway on a free port, runs real
# clients and the slow-consumer scenario against it, checks the results, stops what it started.
# Exits non-zero with a clear message at the first failure.
set -euo pipefail
cd "$(dirname "$0")"

WORK="$(mktemp -d)"
FLUX_PID=""
TLS_PID=""
cleanup() {
  [ -n "$FLUX_PID" ] && kill -TERM "$FLUX_PID" 2>/dev/null && wait "$FLUX_PID" 2>/dev/null || true
  [ -n "$TLS_PID" ] && kill -TERM "$TLS_PID" 2>/dev/null && wait "$TLS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "verify: FAILED: $*" >&2; [ -f "$WORK/flux.log" ] && tail -20 "$WORK/flux.log" >&2; exit 1; }
pass() { echo "verify: ok: $*"; }

echo "verify: building (release)"
cargo build --release --quiet --bin flux --bin flux-load
if [ ! -d tests/e2e/node_modules ]; then
  (cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error)
fi

# 1. The gateway starts and answers.
FLUX_PORT=0 FLUX_DASHBOARD_PORT=0 FLUX_WORKERS=2 RUST_LOG=info target/release/flux 2>"$WORK/flux.log" &
FLUX_PID=$!
for _ in $(seq 100); do grep -q "flux listening on" "$WORK/flux.log" && break; sleep 0.1; done
ADDR="$(grep -o 'flux listening on [0-9.:]*' "$WORK/flux.log" | awk '{print $4}')"
[ -n "$ADDR" ] || fail "the gateway did not start"
PORT="${ADDR##*:}"
curl -fsS "http://$ADDR/" >/dev/null || fail "the gateway does not answer on $ADDR"
for _ in $(seq 50); do grep -q "flux dashboard on" "$WORK/flux.log" && break; sleep 0.1; done
DASHBOARD="$(grep -o 'flux dashboard on http://[^ ]*' "$WORK/flux.log" | awk '{print $4}')"
[ -n "$DASHBOARD" ] && curl -fsS "${DASHBOARD}api/stats" >/dev/null || fail "the dashboard does not answer (${DASHBOARD:-no address logged})"
pass "the gateway answers on $ADDR, its dashboard on $DASHBOARD"

# 2. A real client (pusher-js) receives an event published with the official SDK.
(cd tests/e2e && timeout 20 node --input-type=module -e "
  import PusherClient from 'pusher-js';
  import PusherServer from 'pusher';
  const client = new PusherClient('app-key', { wsHost: '127.0.0.1', wsPort: $PORT, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1' });
  const channel = client.subscribe('verify');
  channel.bind('pusher:subscription_succeeded', () =>
    new PusherServer({ appId: 'app-id', key: 'app-key', secret: 'app-secret', host: '127.0.0.1', port: '$PORT', useTLS: false })
      .trigger('verify', 'ping', { ok: true }));
  channel.bind('ping', (data) => { client.disconnect(); process.exit(data.ok === true ? 0 : 1); });
") || fail "a pusher-js client did not receive an event published with the pusher SDK"
pass "pusher-js received an event published with the pusher SDK"

# 3. Slow consumers are evicted inside the window while fast ones get everything.
target/release/flux-load slow-consumer --port "$PORT" --connections 100 --slow 5 --quiet --json "$WORK/slow.json" >"$WORK/load.log" 2>&1 \
  || fail "flux-load slow-consumer failed: $(tail -5 "$WORK/load.log")"
read -r EXPECTED HEALTHY GAPS EVICTED <<<"$(python3 -c "
import json; s = json.load(open('$WORK/slow.json'))
print(s['expected'], s['roles']['healthy']['unique'], s['gaps'], s['roles']['slow']['evicted'])")"
[ "$EXPECTED" -gt 0 ] || fail "nothing was published"
[ "$GAPS" -eq 0 ] && [ "$HEALTHY" -eq "$EXPECTED" ] || fail "fast consumers received $HEALTHY of $EXPECTED events"
pass "fast consumers received 100% ($HEALTHY of $EXPECTED events)"
[ "$EVICTED" -eq 5 ] || fail "$EVICTED of 5 slow consumers saw close code 4100"
TIMES="$(grep -o 'backpressured for [0-9]* ms' "$WORK/flux.log" | awk '{print $3}')"
[ "$(echo "$TIMES" | grep -c .)" -ge 5 ] || fail "the gateway logged $(echo "$TIMES" | grep -c .) evictions, expected 5"
for ms in $TIMES; do
  [ "$ms" -gt 5000 ] && [ "$ms" -lt 6000 ] || fail "an eviction came after $ms ms of backpressure, outside (5000, 6000)"
done
pass "5 slow consumers evicted with 4100 after $(echo $TIMES | tr ' ' ',') ms of backpressure"

# 4. Writes mostly complete at once: the share of flushes that did not meet WouldBlock, over
# the whole run, slow consumers included.
RATE="$(curl -fsS "${DASHBOARD}api/stats" | python3 -c "import json, sys; print(json.load(sys.stdin)['write_success_rate'])")" \
  || fail "cannot read the write success rate from ${DASHBOARD}api/stats"
python3 -c "import sys; sys.exit(0 if float('$RATE') > 95 else 1)" || fail "write success rate $RATE%, not over 95%"
pass "write success rate $(printf '%.2f' "$RATE")% (over 95%)"

# 5. Memory stayed bounded.
PEAK_KB="$(awk '/VmHWM/ {print $2}' "/proc/$FLUX_PID/status")"
[ "$PEAK_KB" -lt 262144 ] || fail "peak RSS $((PEAK_KB / 1024)) MiB, over 256 MiB"
pass "peak gateway memory $((PEAK_KB / 1024)) MiB"

# 6. A short soak: chat, presence churn, reconnecting clients, slow consumers that stall again
# after every eviction, and signed REST reads, all at once for 30 s, the server sampled every
# 2 s. flux-load judges it: memory and open files flat after a 10 s warm-up, no event lost by a
# healthy subscriber, every stall ended in an eviction; it exits non-zero otherwise.
DASHBOARD_PORT="${DASHBOARD%/}"; DASHBOARD_PORT="${DASHBOARD_PORT##*:}"
target/release/flux-load soak --port "$PORT" --pid "$FLUX_PID" --metrics-port "$DASHBOARD_PORT" --duration 30 --warmup 10 \
  --sample-every 2 --quiet --json "$WORK/soak.json" --svg "$WORK/soak.svg" >"$WORK/soak.log" 2>&1 \
  || fail "the soak failed: $(grep -A 12 '^soak:' "$WORK/soak.log" | tail -12)"
pass "30 s soak: $(grep -E '^  (memory|open files|slow consumers)' "$WORK/soak.log" | sed 's/^ *//' | paste -sd ';' -)"

# 7. Clean shutdown, no panic.
kill -TERM "$FLUX_PID"
wait "$FLUX_PID" || fail "the gateway exited with $? on SIGTERM"
FLUX_PID=""
! grep -q "panicked" "$WORK/flux.log" || fail "a panic in the gateway log"
pass "clean shutdown, no panic in the log"

# 8. Over TLS: a certificate for 127.0.0.1 from a CA made here, trusted by the clients only.
curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${curve[@]}" -days 2 -subj /CN=verify-ca -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null \
  && openssl req "${curve[@]}" -subj /CN=localhost -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null \
  && echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$WORK/tls.ext" \
  && openssl x509 -req -days 2 -in "$WORK/tls.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
    -extfile "$WORK/tls.ext" -out "$WORK/tls.pem" 2>/dev/null || fail "openssl could not make a test certificate"
FLUX_PORT=0 FLUX_DASHBOARD_PORT=0 FLUX_WORKERS=2 FLUX_TLS_CERT="$WORK/tls.pem" FLUX_TLS_KEY="$WORK/tls.key" RUST_LOG=info \
  target/release/flux 2>"$WORK/tls.log" &
TLS_PID=$!
for _ in $(seq 100); do grep -q "flux listening on" "$WORK/tls.log" && break; sleep 0.1; done
TLS_ADDR="$(grep -o 'flux listening on [0-9.:]*' "$WORK/tls.log" | awk '{print $4}')"
[ -n "$TLS_ADDR" ] || fail "the TLS gateway did not start: $(tail -3 "$WORK/tls.log")"
TLS_PORT="${TLS_ADDR##*:}"
(cd tests/e2e && NODE_EXTRA_CA_CERTS="$WORK/ca.pem" timeout 20 node --input-type=module -e "
  import PusherClient from 'pusher-js';
  import PusherServer from 'pusher';
  const client = new PusherClient('app-key', { wsHost: '127.0.0.1', wssPort: $TLS_PORT, forceTLS: true, enabledTransports: ['ws'], cluster: 'mt1' });
  const channel = client.subscribe('verify');
  channel.bind('pusher:subscription_succeeded', () =>
    new PusherServer({ appId: 'app-id', key: 'app-key', secret: 'app-secret', host: '127.0.0.1', port: '$TLS_PORT', useTLS: true })
      .trigger('verify', 'ping', { ok: true }));
  channel.bind('ping', (data) => { client.disconnect(); process.exit(data.ok === true ? 0 : 1); });
") || fail "pusher-js (forceTLS) did not receive an event published with the pusher SDK (useTLS)"
pass "over TLS: pusher-js (forceTLS) received an event published with the pusher SDK (useTLS)"
target/release/flux-load slow-consumer --port "$TLS_PORT" --tls --ca "$WORK/ca.pem" --connections 100 --slow 5 --quiet \
  --json "$WORK/tls-slow.json" >"$WORK/tls-load.log" 2>&1 || fail "flux-load slow-consumer --tls failed: $(tail -5 "$WORK/tls-load.log")"
read -r EXPECTED HEALTHY GAPS EVICTED <<<"$(python3 -c "
import json; s = json.load(open('$WORK/tls-slow.json'))
print(s['expected'], s['roles']['healthy']['unique'], s['gaps'], s['roles']['slow']['evicted'])")"
[ "$EXPECTED" -gt 0 ] && [ "$GAPS" -eq 0 ] && [ "$HEALTHY" -eq "$EXPECTED" ] || fail "over TLS, fast consumers received $HEALTHY of $EXPECTED events"
[ "$EVICTED" -eq 5 ] || fail "over TLS, $EVICTED of 5 slow consumers saw close code 4100"
pass "over TLS: fast consumers received 100% ($HEALTHY of $EXPECTED events), 5 slow consumers evicted with 4100"
kill -TERM "$TLS_PID"
wait "$TLS_PID" || fail "the TLS gateway exited with $? on SIGTERM"
TLS_PID=""
! grep -q "panicked" "$WORK/tls.log" || fail "a panic in the TLS gateway log"
echo "verify: all checks passed"
