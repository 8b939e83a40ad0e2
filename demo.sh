#!/usr/bin/env bash
# The slow-consumer demo: a few hundred fast subscribers and a handful of slow consumers on one
# channel under a steady publisher (flux-load slow-consumer), narrated from the dashboard's API
# while it runs: the slow rings fill, backpressure begins, the slow consumers are evicted with
# 4100 after 5 s, and the fast subscribers lose nothing. Starts Flux with ./start.sh if it is not
# running (./cleanup.sh stops it) and stops by itself in about a minute.
#
#   ./demo.sh                                   # 300 fast, 5 slow, 1,000 events/s for 30 s
#   DEMO_FAST=500 DEMO_SLOW=10 DEMO_SECONDS=40 ./demo.sh
set -euo pipefail
cd "$(dirname "$0")"

FAST="${DEMO_FAST:-300}"
SLOW="${DEMO_SLOW:-5}"
SECONDS_OF_LOAD="${DEMO_SECONDS:-30}"
RATE="${DEMO_RATE:-1000}"
RUN_DIR=run
LOAD_PID_FILE="$RUN_DIR/demo-load.pid"
LOAD_LOG="$RUN_DIR/demo-load.log"
SUMMARY="$RUN_DIR/demo-summary.json"

command -v python3 >/dev/null || { echo "demo.sh: python3 is needed to read the dashboard's JSON" >&2; exit 1; }

./start.sh | sed 's/^/  /'
PORT="${FLUX_PORT:-6001}"
DASHBOARD="$(grep -o 'flux dashboard on http://[^ ]*' "$RUN_DIR/flux.log" | tail -1 | awk '{print $4}')"
[ -n "$DASHBOARD" ] || { echo "demo.sh: cannot find the dashboard address in $RUN_DIR/flux.log" >&2; exit 1; }

echo "Building flux-load (release)..."
cargo build --release --quiet --bin flux-load

LOAD_PID=""
MONITOR_PID=""
finish() {
  [ -n "$MONITOR_PID" ] && kill "$MONITOR_PID" 2>/dev/null || true
  if [ -n "$LOAD_PID" ] && kill -0 "$LOAD_PID" 2>/dev/null; then kill -TERM "$LOAD_PID" 2>/dev/null || true; fi
  rm -f "$LOAD_PID_FILE"
}
trap finish EXIT

cat <<INTRO

Flux demo: $FAST fast subscribers and $SLOW slow consumers on one channel, $RATE events/s of
1 KiB for $SECONDS_OF_LOAD s. The slow ones stop reading: their kernel buffers fill, then their
256-frame rings, then they are backpressured; after 5 s of that Flux evicts them (close 4100)
while the fast ones keep receiving everything.

Watch it live: $DASHBOARD

INTRO

target/release/flux-load slow-consumer --port "$PORT" --connections "$FAST" --slow "$SLOW" \
  --rate "$RATE" --duration "$SECONDS_OF_LOAD" --quiet --json "$SUMMARY" >"$LOAD_LOG" 2>&1 &
LOAD_PID=$!
echo "$LOAD_PID" >"$LOAD_PID_FILE"

# The narrator: one line a second from /api/stats and /api/connections, and a sentence at
# every change of phase.
python3 - "$DASHBOARD" "$SLOW" <<'NARRATOR' &
import json, sys, time, urllib.request

base, slow = sys.argv[1].rstrip("/"), int(sys.argv[2])

def get(path):
    with urllib.request.urlopen(base + path, timeout=2) as r:
        return json.load(r)

said = set()
def say(key, text):
    if key not in said:
        said.add(key)
        print(f"\n  >> {text}\n", flush=True)

start = time.time()
evicted_at_start = None
print(f"{'time':>5} {'conns':>6} {'msgs out/s':>11} {'writes ok':>9} {'filling':>7} {'backpressured':>13} {'drops':>7} {'evicted':>7}")
while True:
    try:
        stats = get("/api/stats")
        conns = get("/api/connections")["connections"]
    except Exception:
        time.sleep(1)
        continue
    totals, latest = stats["totals"], stats.get("latest") or {}
    if evicted_at_start is None:
        evicted_at_start = totals["evictions"]
    evicted = totals["evictions"] - evicted_at_start
    # Fast subscribers hold a few frames for a moment (write coalescing); an eighth of the
    # ring or more means a consumer is falling behind.
    queued = [c for c in conns if c["ring_len"] >= max(c["ring_slots"] // 8, 1)]
    pressed = [c for c in conns if c.get("backpressured_ms") is not None]
    longest = max((c["backpressured_ms"] for c in pressed), default=0)
    print(f"{time.time() - start:>4.0f}s {totals['websockets']:>6} {latest.get('messages_out', 0):>11,.0f} "
          f"{stats['write_success_rate']:>8.1f}% {len(queued):>7} {len(pressed):>5} (max {longest / 1000:3.1f} s) "
          f"{totals['drops']:>7} {evicted:>7}", flush=True)
    if latest.get("messages_out", 0) > 0:
        say("publishing", "Publishing: every event is framed once and shared by all subscribers' rings.")
    if queued:
        say("filling", f"{len(queued)} ring(s) filling: those consumers' kernel buffers are full and Flux is holding frames for them.")
    if pressed:
        say("pressed", f"Backpressure: {len(pressed)} connection(s) cannot take more; the fast ones are written as before. Eviction after 5 s.")
    if totals["drops"] > 0:
        say("drops", "A slow ring is full (256 frames): further frames for it are dropped and counted, never buffered without bound.")
    if evicted > 0:
        say("evicted", f"Evicted: {evicted} slow consumer(s) closed with 4100 after 5 s of backpressure (see the dashboard's eviction log).")
    if evicted >= slow > 0:
        say("all", "All slow consumers are gone; the fast subscribers never noticed.")
    time.sleep(1)
NARRATOR
MONITOR_PID=$!

wait "$LOAD_PID" || echo "flux-load exited with an error; see $LOAD_LOG"
LOAD_PID=""
sleep 1
kill "$MONITOR_PID" 2>/dev/null || true
MONITOR_PID=""

echo
sed -n '/^role/,/^$/p' "$LOAD_LOG"
python3 - "$SUMMARY" "$DASHBOARD" <<'SUMMARY'
import json, sys, urllib.request
s = json.load(open(sys.argv[1]))
healthy, slow = s["roles"]["healthy"], s["roles"].get("slow", {})
try:
    with urllib.request.urlopen(sys.argv[2] + "api/evictions", timeout=2) as r:
        recent = json.load(r)["recent"][-slow.get("clients", 0):] if slow else []
except Exception:
    recent = []
rows = [
    ("events published", f"{s['published']:,}"),
    ("fast subscribers", f"{healthy['clients']}: {healthy['unique']:,} of {s['expected']:,} events "
                          f"({100 * healthy['unique'] / max(s['expected'], 1):.2f}%), {s['gaps']} gaps"),
    ("fast latency", f"p50 {s['latency_ms']['p50']:.1f} ms, p99 {s['latency_ms']['p99']:.1f} ms"),
    ("slow consumers", f"{slow.get('clients', 0)}, evicted with 4100: {slow.get('evicted', 0)}"),
]
if recent:
    rows.append(("backpressured before eviction", ", ".join(f"{e['backpressured_ms']} ms" for e in recent)))
width = max(len(k) for k, _ in rows)
print("Summary")
for k, v in rows:
    print(f"  {k:<{width}}  {v}")
SUMMARY
echo
echo "Flux keeps running: $DASHBOARD (stop it with ./cleanup.sh)"
