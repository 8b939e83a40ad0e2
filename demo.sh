#!/usr/bin/env bash
# The slow-consumer demo: a few hundred fast subscribers and a handful of slow consumers on one
# channel under a steady publisher (flux-load slow-consumer), narrated from the dashboard's API
# while it runs: the slow rings fill, backpressure begins, the slow consumers are evicted with
# 4100 after 5 s, and the fast subscribers lose nothing. Starts Flux with ./start.sh if it is not
# running (./cleanup.sh stops it) and stops by itself in about a minute.
#
#   ./demo.sh                                   # 300 fast, 5 slow, 1,000 events/s for 30 s
#   DEMO_FAST=500 DEMO_SLOW=10 DEMO_SECONDS=40 ./demo.sh
#   ./demo.sh --nodes 3                         # the same on a 3-node cluster (./start.sh --nodes 3),
#                                               # with presence members on every node; halfway
#                                               # through, the last node is killed with SIGKILL
set -euo pipefail
cd "$(dirname "$0")"

NODES=1
case "${1:-}" in
  --nodes) NODES="${2:-}" ;;
  --nodes=*) NODES="${1#--nodes=}" ;;
  "") ;;
  *) echo "demo.sh: unknown argument $1 (try --nodes 3)" >&2; exit 2 ;;
esac
[[ "$NODES" =~ ^[1-9]$ ]] || { echo "demo.sh: --nodes takes a number from 1 to 9" >&2; exit 2; }

FAST="${DEMO_FAST:-300}"
SLOW="${DEMO_SLOW:-5}"
SECONDS_OF_LOAD="${DEMO_SECONDS:-30}"
RATE="${DEMO_RATE:-1000}"
RUN_DIR=run
LOAD_PID_FILE="$RUN_DIR/demo-load.pid"
PRESENCE_PID_FILE="$RUN_DIR/demo-presence.pid"
LOAD_LOG="$RUN_DIR/demo-load.log"
SUMMARY="$RUN_DIR/demo-summary.json"

command -v python3 >/dev/null || { echo "demo.sh: python3 is needed to read the dashboard's JSON" >&2; exit 1; }

./start.sh --nodes "$NODES" | sed 's/^/  /'
PORT="${FLUX_PORT:-6001}"
FIRST_LOG="$RUN_DIR/flux.log"
TARGET=(--port "$PORT")
if [ "$NODES" -gt 1 ]; then
  FIRST_LOG="$RUN_DIR/flux-1.log"
  TARGET=(--nodes "$(seq -s, "$PORT" $((PORT + NODES - 1)))")
fi
DASHBOARD="$(grep -o 'flux dashboard on http://[^ ]*' "$FIRST_LOG" | tail -1 | awk '{print $4}')"
[ -n "$DASHBOARD" ] || { echo "demo.sh: cannot find the dashboard address in $FIRST_LOG" >&2; exit 1; }

echo "Building flux-load (release)..."
cargo build --release --quiet --bin flux-load

LOAD_PID=""
PRESENCE_PID=""
MONITOR_PID=""
finish() {
  [ -n "$MONITOR_PID" ] && kill "$MONITOR_PID" 2>/dev/null || true
  for pid in "$LOAD_PID" "$PRESENCE_PID"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  rm -f "$LOAD_PID_FILE" "$PRESENCE_PID_FILE"
}
trap finish EXIT

cat <<INTRO

Flux demo: $FAST fast subscribers and $SLOW slow consumers on one channel, $RATE events/s of
1 KiB for $SECONDS_OF_LOAD s. The slow ones stop reading: their kernel buffers fill, then their
256-frame rings, then they are backpressured; after 5 s of that Flux evicts them (close 4100)
while the fast ones keep receiving everything.

Watch it live: $DASHBOARD

INTRO
if [ "$NODES" -gt 1 ]; then
  cat <<CLUSTER
The $NODES nodes share one Redis: the clients are spread over them and the events are published
to each in turn, so every event crosses nodes. $((NODES * 20)) presence members sit on channel
presence-guild, spread over the nodes too. Halfway through, node-$NODES is killed with SIGKILL:
the other nodes stop hearing its heartbeats and, within the node timeout (10 s), drop it, its
subscriptions and its presence members (member_removed), with no restart. Its own clients lose
their connection (behind a load balancer they would reconnect to another node).

CLUSTER
  target/release/flux-load presence-storm "${TARGET[@]}" --connections $((NODES * 20)) --churn 0 \
    --duration "$SECONDS_OF_LOAD" --quiet >"$RUN_DIR/demo-presence.log" 2>&1 &
  PRESENCE_PID=$!
  echo "$PRESENCE_PID" >"$PRESENCE_PID_FILE"
fi

target/release/flux-load slow-consumer "${TARGET[@]}" --connections "$FAST" --slow "$SLOW" \
  --rate "$RATE" --duration "$SECONDS_OF_LOAD" --quiet --json "$SUMMARY" >"$LOAD_LOG" 2>&1 &
LOAD_PID=$!
echo "$LOAD_PID" >"$LOAD_PID_FILE"

# The narrator: one line a second from /api/stats and /api/connections, and a sentence at
# every change of phase.
VICTIM_PID_FILE=""
[ "$NODES" -gt 1 ] && VICTIM_PID_FILE="$RUN_DIR/flux-$NODES.pid"
python3 - "$DASHBOARD" "$SLOW" "$VICTIM_PID_FILE" "$((SECONDS_OF_LOAD / 2))" "$PORT" <<'NARRATOR' &
import hashlib, hmac, json, os, signal, sys, time, urllib.request

base, slow = sys.argv[1].rstrip("/"), int(sys.argv[2])
victim_pid_file, kill_at, port = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
app_id, key, secret = (os.environ.get(v, d) for v, d in
                       [("FLUX_APP_ID", "app-id"), ("FLUX_APP_KEY", "app-key"), ("FLUX_APP_SECRET", "app-secret")])

def user_count():
    """presence-guild's members as node 1 answers, through the REST API, signed as the SDKs sign."""
    path = f"/apps/{app_id}/channels/presence-guild"
    params = {"auth_key": key, "auth_timestamp": str(int(time.time())), "auth_version": "1.0", "info": "user_count"}
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(secret.encode(), f"GET\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}?{query}&auth_signature={signature}", timeout=2) as r:
        return json.load(r).get("user_count", 0)

killed_at = victim = members_before = None

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
    if victim_pid_file and killed_at is None and time.time() - start >= kill_at:
        cluster = stats.get("cluster") or {}
        victim = max((n["id"] for n in cluster.get("nodes", [])), default=None)
        members_before = user_count()
        with open(victim_pid_file) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
        killed_at = time.time()
        say("killed", f"{victim} killed with SIGKILL. Node 1 sees {len(cluster.get('nodes', []))} other nodes and "
                      f"{members_before} presence members; watch its Cluster panel.")
    if killed_at is not None:
        cluster = stats.get("cluster") or {}
        if victim not in [n["id"] for n in cluster.get("nodes", [])]:
            say("dead", f"{victim} declared dead after {time.time() - killed_at:.1f} s: its subscriptions left the counts, and "
                        f"presence-guild went from {members_before} to {user_count()} members (member_removed sent for each).")
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
nodes = s.get("nodes") or []
if len(nodes) > 1:
    # The last node was killed halfway: its clients' missing events are the gaps above.
    for i, node in enumerate(nodes):
        note = "  (killed halfway: its clients were cut off)" if i == len(nodes) - 1 else ""
        rows.append((f"node {i + 1} ({node['address']})",
                     f"{node['clients']} clients, {node['delivered']:,} deliveries, {node['publish_calls']:,} publishes taken{note}"))
width = max(len(k) for k, _ in rows)
print("Summary")
for k, v in rows:
    print(f"  {k:<{width}}  {v}")
SUMMARY
echo
echo "Flux keeps running: $DASHBOARD (stop it with ./cleanup.sh)"
