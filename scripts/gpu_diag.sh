#!/usr/bin/env bash
# One GPU call for diagnosis (2026-12-03, H200): GPU tests, the GEMM tile sweep, Nsight Compute
# on the linear layer's non-GEMM kernels, and bench linear at two shapes. Binaries prebuilt in
# BIN_DIR (see gpu_check.sh). Usage: scripts/gpu_diag.sh [BIN_DIR [OUT_DIR]]
set -uo pipefail
bin="${1:-build-gpu}"
out="${2:-${OUT:-out/gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv >"$out/gpu_tests.txt"
timeout 150 "$bin/nibble_gpu_tests" >>"$out/gpu_tests.txt" 2>&1; echo "gpu tests exit $?" | tee -a "$out/gpu_tests.txt"
tail -3 "$out/gpu_tests.txt"
timeout 150 "$bin/nibble_bench_gemm_sweep" --runs 20 >"$out/sweep.txt" 2>&1; echo "sweep exit $?" | tee -a "$out/sweep.txt"
timeout 120 ncu --clock-control none \
  -k regex:"hq_lsq_quantize_kernel|bitsplit_kernel|absmax_kernel|lsq_mask_hadamard_kernel|column_partials_kernel|unpack_s4_transpose_kernel" \
  --launch-count 10 --section SpeedOfLight --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
  "$bin/nibble" bench linear --shapes 16384x4096x4096 --no-sampled --runs 10 --warmup 1 \
  >"$out/ncu.txt" 2>&1; echo "ncu exit $?" | tee -a "$out/ncu.txt"
timeout 100 "$bin/nibble" bench linear --shapes 16384x4096x4096,16384x11008x4096,15360x8704x10752 \
  --json "$out/linear.json" >"$out/linear.txt" 2>&1; echo "linear exit $?" | tee -a "$out/linear.txt"
cat "$out/sweep.txt" "$out/linear.txt"
