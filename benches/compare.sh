#!/usr/bin/env bash
# Reproduces BENCHMARKS.md's comparison table: the same flux-load scenarios against Flux,
# Sockudo and flux-raw (the raw loopback limit: "raw" writes each frame at once, "raw-batched"
# 64 frames or 10 ms per write, as Flux coalesces), one server at a time, on loopback.
#
#   benches/compare.sh                 # every scenario, every server found
#   SERVERS="flux raw" benches/compare.sh chat-storm fanout-1k
#   SERVERS="flux flux-tls sockudo-tls" benches/compare.sh fanout-1k big-channel-16k
#   SERVERS="flux-tls raw-batched-tls" benches/compare.sh fanout-1k   # TLS against its raw limit
#
# A server named with -tls speaks TLS (wss:// and https://) with a certificate made here by
# openssl for 127.0.0.1, and flux-load trusts its authority (--tls --ca).
#
# For every run it records flux-load's JSON summary plus the server's CPU seconds and peak RSS
# (from /proc), then prints the table (benches/compare_table.py). Results go to
# target/compare/<time>/. This is a benchmark, not a test: it asserts nothing and takes about
# 20 minutes for everything. Sockudo is looked for as `sockudo` on PATH or in ~/.cargo/bin
# (install: apt-get install protobuf-compiler && cargo install sockudo --locked); without it
# its column is left out.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_SCENARIOS=(chat-storm fanout-1k big-channel-16k presence-5k presence-10k slow-consumer idle-15k vacate-storm)
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=("${ALL_SCENARIOS[@]}")
SERVERS="${SERVERS:-flux sockudo raw raw-batched}"
OUT="${OUT:-target/compare/$(date +%Y%m%d-%H%M%S)}"
PORT="${PORT:-6401}"
mkdir -p "$OUT"

# flux-load's arguments per scenario.
scenario_args() {
  case "$1" in
    chat-storm) echo "chat-storm --duration 20" ;;
    fanout-1k) echo "chat-storm --connections 1000 --slow 0 --partition 0 --duration 20" ;;
    big-channel-16k) echo "big-channel --connections 16000 --rounds 20" ;;
    # After the joins, time for the guild-wide join announcements (N x N / 2 member_added: 12.5
    # and 50 million) to drain, so the 30 s measure the steady churn the scenario is about.
    presence-5k) echo "presence-storm --connections 5000 --duration 30 --hold-secs 10" ;;
    # Two reader processes at 10,000: one alone sometimes fell more than 5 s behind on some
    # sockets during the join storm (about 8 GB of member lists and announcements), and the
    # server evicted them as the slow consumers they then were (0-6,375 evictions a run).
    presence-10k) echo "presence-storm --connections 10000 --duration 30 --hold-secs 30 --processes 2" ;;
    slow-consumer) echo "slow-consumer" ;;
    # Connect, subscribe and sit idle for 10 s: memory per idle connection.
    idle-15k) echo "chat-storm --connections 15000 --slow 0 --partition 0 --rate 0 --hold-secs 10" ;;
    # 200 clients on 1,000 channels each close at once; 10 healthy subscribers and a connect
    # prober watch what the mass unsubscribe costs. A server that loses confirmations under the
    # subscribe burst gets 20 s, not 60, before the run goes on without them.
    vacate-storm) echo "vacate-storm --connections 200 --channels 1000 --duration 10 --connect-timeout 20" ;;
    *) echo "unknown scenario $1 (known: ${ALL_SCENARIOS[*]})" >&2; exit 2 ;;
  esac
}

# shellcheck source=benches/common.sh
. benches/common.sh
if [[ " $SERVERS " == *" sockudo"* && -z "$SOCKUDO_BIN" ]]; then
  echo "compare.sh: sockudo not found; leaving its columns out" >&2
  SERVERS="$(echo " $SERVERS " | sed 's/ sockudo-tls / /; s/ sockudo / /')"
fi

echo "Building Flux, flux-load and flux-raw (release)..."
cargo build --release --quiet --bin flux --bin flux-load --bin flux-raw

# A certificate authority and a certificate for 127.0.0.1 it signed, for the -tls servers.
TLS_DIR="$(cd "$OUT" && pwd)/tls" # absolute: Sockudo runs in a directory of its own
if [[ " $SERVERS " == *"-tls "* ]]; then
  mkdir -p "$TLS_DIR"
  (cd "$TLS_DIR" &&
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca \
      -keyout ca.key -out ca.pem 2>/dev/null &&
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
      -keyout key.pem -out cert.csr 2>/dev/null &&
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >cert.ext &&
    openssl x509 -req -days 2 -CAcreateserial -in cert.csr -CA ca.pem -CAkey ca.key -extfile cert.ext \
      -out cert.pem 2>/dev/null)
fi

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT

start_server() { # name port log
  local name="$1" port="$2" log="$3"
  case "$name" in
    flux | flux-tls)
      local tls=()
      [ "$name" = flux ] || tls=(FLUX_TLS_CERT="$TLS_DIR/cert.pem" FLUX_TLS_KEY="$TLS_DIR/key.pem")
      # Presence channels of 10,000 members need more than Pusher's default limit of 100.
      env "${tls[@]}" FLUX_PORT="$port" FLUX_DASHBOARD_PORT=0 FLUX_PRESENCE_MAX_MEMBERS=20000 RUST_LOG=warn target/release/flux >"$log" 2>&1 &
      ;;
    raw | raw-batched | raw-tls | raw-batched-tls)
      local raw_args=()
      [[ "$name" != raw-batched* ]] || raw_args+=(--frames-per-write 64)
      [[ "$name" != *-tls ]] || raw_args+=(--tls-cert "$TLS_DIR/cert.pem" --tls-key "$TLS_DIR/key.pem")
      RUST_LOG=warn target/release/flux-raw --port "$port" "${raw_args[@]}" >"$log" 2>&1 &
      ;;
    sockudo)
      start_sockudo "$OUT/sockudo-cwd" "$port" "$log"
      ;;
    sockudo-tls)
      start_sockudo "$OUT/sockudo-cwd" "$port" "$log" SSL_ENABLED=true SSL_CERT_PATH="$TLS_DIR/cert.pem" SSL_KEY_PATH="$TLS_DIR/key.pem"
      ;;
  esac
  SERVER_PID=$!
  for _ in $(seq 100); do
    if { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then exec 3<&-; return 0; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name exited at start; see $log" >&2; return 1; }
    sleep 0.1
  done
  echo "$name did not listen on $port within 10 s; see $log" >&2
  return 1
}


for scenario in "${SCENARIOS[@]}"; do
  args="$(scenario_args "$scenario")"
  for server in $SERVERS; do
    if [[ "$scenario" == presence-* && "$server" == raw* ]]; then
      continue # flux-raw has no presence channels: no member events to compare.
    fi
    PORT=$((PORT + 1))
    base="$OUT/$scenario.$server"
    echo "== $scenario against $server: flux-load $args"
    start_server "$server" "$PORT" "$base.server.log" || continue
    sleep 0.5
    rss_start="$(rss_kib "$SERVER_PID")"
    cpu_start="$(cpu_secs "$SERVER_PID")"
    # Peak RSS while the load runs, sampled twice a second (VmHWM would include start-up).
    (peak=0; while kill -0 "$SERVER_PID" 2>/dev/null; do
       r="$(rss_kib "$SERVER_PID")"; [ "${r:-0}" -gt "$peak" ] && peak="$r" && echo "$peak" >"$base.peak"
       sleep 0.5; done) &
    sampler=$!
    # vacate-storm reads the server's CPU itself, from the storm on, besides the whole run's below.
    storm_args=()
    [ "$scenario" != vacate-storm ] || storm_args=(--server-pid "$SERVER_PID")
    [[ "$server" != *-tls ]] || storm_args+=(--tls --ca "$TLS_DIR/ca.pem")
    # shellcheck disable=SC2086
    timeout 600 target/release/flux-load $args "${storm_args[@]}" --port "$PORT" --label "$server" --quiet --json "$base.json" \
      >"$base.load.log" 2>&1 || echo "flux-load failed against $server (or vacate-storm's check did); see $base.load.log" >&2
    cpu_end="$(cpu_secs "$SERVER_PID")"
    rss_end="$(rss_kib "$SERVER_PID")"
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    printf '{"rss_start_kib": %s, "rss_peak_kib": %s, "rss_end_kib": %s, "cpu_secs": %s}\n' \
      "$rss_start" "$(cat "$base.peak" 2>/dev/null || echo 0)" "$rss_end" \
      "$(awk -v a="$cpu_start" -v b="$cpu_end" 'BEGIN {printf "%.2f", b - a}')" >"$base.server.json"
    stop_server
    tail -n 12 "$base.load.log"
  done
done

python3 benches/compare_table.py "$OUT" | tee "$OUT/table.md"
echo "Results in $OUT"
