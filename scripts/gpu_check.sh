#!/usr/bin/env bash
# One call on a GPU machine: correctness first, then the benchmarks, each stage under its own
# time limit so that a slow stage cannot eat the others' results. Binaries are built
# beforehand (the GPU machine may lack the Debian -dev packages the build needs):
#   cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a
#   cmake --build build-gpu --target nibble nibble_gpu_tests
# Usage: scripts/gpu_check.sh [BIN_DIR [OUT_DIR]]   (defaults: build-gpu, $OUT or out/gpu)
# Writes eight files to OUT_DIR (the lent machine returns at most eight): gpu_tests.txt (device
# line first), sanitizer.txt, gemm.{txt,json,svg}, linear.{txt,json,svg}; with SWEEP_SHAPES set
# (MxNxK,... for BIN_DIR/nibble_bench_gemm_sweep) also sweep.txt, the tile sweep on those
# shapes (then bundle OUT_DIR, e.g. tar, to bring the nine back). BENCH_GEMM=0 skips
# `nibble bench gemm`; PROFILE_QUANT=1 adds quant_ncu.txt, Nsight Compute on the quantization
# passes (scripts/gpu_quant_profile.sh).
set -uo pipefail
bin="${1:-build-gpu}"
out="${2:-${OUT:-out/gpu}}"
mkdir -p "$out"
status=0

stage() {  # stage NAME LIMIT_S LOG CMD...: runs CMD with a time limit, appends to LOG
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ $rc -ne 0 ] && status=1
  return 0
}

{
  nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.sm,temperature.gpu \
    --format=csv
  date -u +%Y-%m-%dT%H:%M:%SZ
} >"$out/gpu_tests.txt" 2>&1

stage "GPU tests" 150 "$out/gpu_tests.txt" "$bin/nibble_gpu_tests"
tail -3 "$out/gpu_tests.txt"

# compute-sanitizer on the kernels new in this change (small shapes; the full suite under
# memcheck takes far longer than a lease allows).
san_filter="${SAN_FILTER:-GemmS4S4S32TnDequantSm80.*:*Sampled*}"
stage "memcheck" 90 "$out/sanitizer.txt" compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$bin/nibble_gpu_tests" --gtest_filter="$san_filter"
race_filter="${RACE_FILTER:-GemmS4S4S32TnSm80.IdentityOperands*:GemmS8S8S32TnSm80*Identity*}"
stage "racecheck" 60 "$out/sanitizer.txt" compute-sanitizer --tool racecheck --error-exitcode 1 \
  "$bin/nibble_gpu_tests" --gtest_filter="$race_filter"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|== .*exit" "$out/sanitizer.txt"

if [ -n "${SWEEP_SHAPES:-}" ]; then
  stage "tile sweep" 150 "$out/sweep.txt" "$bin/nibble_bench_gemm_sweep" --runs 20 \
    --shapes "$SWEEP_SHAPES"
fi

if [ "${BENCH_GEMM:-1}" != 0 ]; then
  stage "bench gemm" 120 "$out/gemm.txt" "$bin/nibble" bench gemm --json "$out/gemm.json" \
    --plot "$out/gemm.svg"
fi
stage "bench linear" 180 "$out/linear.txt" "$bin/nibble" bench linear --json "$out/linear.json" \
  --plot "$out/linear.svg"
if [ "${PROFILE_QUANT:-0}" != 0 ]; then
  stage "quant profile" 150 "$out/quant_ncu.txt" "$(dirname "$0")/gpu_quant_profile.sh" "$bin" \
    "$out/quant_ncu.txt"
fi
[ -f "$out/gemm.txt" ] && cat "$out/gemm.txt"
cat "$out/linear.txt"
exit $status
