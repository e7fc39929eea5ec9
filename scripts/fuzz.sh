#!/usr/bin/env bash
# Runs the fuzz targets of tests/integration/fuzz.rs long: every target (or those named) for
# PLAZA_FUZZ_INPUTS inputs each (default 1,000,000) from a random seed (PLAZA_FUZZ_SEED to
# replay one; the slow `session` target runs a thousandth of the count), then prints each target's inputs, time and inputs/s, and the total time.
# A panic fails the run; the input is saved under target/fuzz-crashes/ (see
# tests/integration/fuzz/engine.rs; keep it under tests/integration/fuzz/regressions/<target>/ once fixed).
#
#   ./scripts/fuzz.sh                       # all targets, 1,000,000 inputs each
#   PLAZA_FUZZ_INPUTS=50000 ./scripts/fuzz.sh sdp core
#   PLAZA_FUZZ_SEED=0x1234 ./scripts/fuzz.sh rtcp
#   FUZZ_JOBS=2 ./scripts/fuzz.sh           # two targets at a time (rates then share the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

export PLAZA_FUZZ_INPUTS="${PLAZA_FUZZ_INPUTS:-1000000}"
export PLAZA_FUZZ_SEED="${PLAZA_FUZZ_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}"
jobs="${FUZZ_JOBS:-1}"
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
export PLAZA_FUZZ_REPORT="$report"

filters=()
for t in "$@"; do filters+=("fuzz::fuzz_$t"); done
[ ${#filters[@]} -gt 0 ] || filters=("fuzz::fuzz_")

echo "==> fuzz: ${PLAZA_FUZZ_INPUTS} inputs per target, seed ${PLAZA_FUZZ_SEED}, ${jobs} at a time"
start=$(date +%s.%N)
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --test integration --no-fail-fast --test-threads "$jobs" \
    --success-output immediate --failure-output immediate "${filters[@]}" || status=$?
else
  cargo test --release --test integration --no-fail-fast -- --test-threads "$jobs" --nocapture \
    "${filters[@]}" || status=$?
fi
end=$(date +%s.%N)

echo
echo "==> fuzz results (seed ${PLAZA_FUZZ_SEED})"
sort "$report"
awk -v s="$start" -v e="$end" 'BEGIN { printf "total: %.1f s wall\n", e - s }'
if [ "$status" -ne 0 ]; then
  echo "FUZZ FAILED: see the panic above; crashing inputs are in target/fuzz-crashes/" >&2
  exit "$status"
fi
