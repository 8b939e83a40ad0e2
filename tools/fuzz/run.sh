#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) with cargo-fuzz (libFuzzer), on the
# nightly toolchain: `tools/fuzz/run.sh 600` for a long run by hand, a few seconds in CI.
# Each target starts from the seeds in tools/fuzz/seeds/<target> plus what earlier runs found
# (kept in tools/fuzz/corpus, not committed). A crash stops the run with its input saved under
# tools/fuzz/artifacts/<target>/ and a non-zero exit. Prints the executions each target ran.
set -euo pipefail
SECONDS_EACH="${1:-60}"
FUZZ="$(cd "$(dirname "$0")" && pwd)"
cd "$FUZZ"
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "no nightly toolchain: fuzzing skipped (rustup toolchain install nightly)"
  exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install --quiet cargo-fuzz
for target in ws_decode http_request client_message rest_call; do
  mkdir -p "corpus/$target"
  log="$(mktemp)"
  # -rss_limit_mb bounds a target's memory; -timeout fails an input that takes over 10 s.
  if ! cargo +nightly fuzz run --fuzz-dir "$FUZZ" "$target" "corpus/$target" "seeds/$target" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $target failed; its input is under $FUZZ/artifacts/$target/"
    exit 1
  fi
  runs="$(grep -o 'Done [0-9]* runs' "$log" | tail -1 || true)"
  echo "$target: ${runs:-no summary} in ${SECONDS_EACH} s, corpus $(ls "corpus/$target" | wc -l) inputs"
  rm -f "$log"
done
