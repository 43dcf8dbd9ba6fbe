#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the whole GPU test suite, each under a time
# limit (the lent machine allows 10 minutes a call); gtest names each test as it passes, so a
# cut-off run still says how far it got. Usage: scripts/gpu_sanitize_all.sh [BIN_DIR [OUT_FILE]]
set -uo pipefail
bin="${1:-build-gpu}"
out="${2:-${OUT:-out/gpu}/sanitizer_all.txt}"
mkdir -p "$(dirname "$out")"
for tool in memcheck racecheck; do
  limit=$([ "$tool" = memcheck ] && echo "${MEMCHECK_LIMIT:-300}" || echo "${RACECHECK_LIMIT:-240}")
  echo "== $tool, whole suite, limit ${limit}s" >>"$out"
  t0=$SECONDS
  timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 1 "$bin/nibble_gpu_tests" \
    >>"$out" 2>&1
  echo "== $tool: exit $? after $((SECONDS - t0)) s" >>"$out"
done
grep -E "^== |SUMMARY|PASSED|FAILED" "$out"
