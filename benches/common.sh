# Shared by benches/compare.sh and benches/cluster.sh (sourced, not run): where Sockudo is,
# how it is started for a comparison, and what /proc says of a server process.

# Sockudo on PATH, in ~/.cargo/bin, or where this project's machine built it; empty if none.
SOCKUDO_BIN="${SOCKUDO_BIN:-$(command -v sockudo || true)}"
for candidate in "$HOME/.cargo/bin/sockudo" /work/sockudo-install/bin/sockudo; do
  [ -n "$SOCKUDO_BIN" ] || { [ -x "$candidate" ] && SOCKUDO_BIN="$candidate"; } || true
done

# Starts Sockudo in the background on `port`, logging to `log`, in the empty directory `dir` (it
# reads config/ relative to its working directory), with the default app and the limits that
# would cut the load short lifted (connections per app, API rate limit, channels per publish),
# metrics and logs off as Flux's are; any further NAME=value arguments are added to its
# environment.
start_sockudo() { # dir port log [NAME=value...]
  local dir="$1" port="$2" log="$3"
  shift 3
  mkdir -p "$dir"
  (cd "$dir" && exec env HOST=127.0.0.1 PORT="$port" \
    SOCKUDO_DEFAULT_APP_ID=app-id SOCKUDO_DEFAULT_APP_KEY=app-key SOCKUDO_DEFAULT_APP_SECRET=app-secret \
    SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=1000000 SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=1000000 \
    SOCKUDO_DEFAULT_APP_MAX_EVENT_CHANNELS_AT_ONCE=100 SOCKUDO_DEFAULT_APP_MAX_PRESENCE_MEMBERS_PER_CHANNEL=20000 \
    RATE_LIMITER_ENABLED=false METRICS_ENABLED=false SHUTDOWN_GRACE_PERIOD=1 RUST_LOG=warn "$@" "$SOCKUDO_BIN") >"$log" 2>&1 &
}

# A process's resident memory now (KiB), and its CPU seconds so far (all threads).
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
