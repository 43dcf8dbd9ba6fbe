#!/usr/bin/env bash
# Nsight Compute on the quantization passes of the linear layer at 16384x4096x4096 (bf16): the
# fused forward quantizer (x, w, and x without the side channel), the bit split's passes, the
# db column sums and the mask/Hadamard passes. Per kernel: duration, thread instructions
# (divide by the element count for instructions per element), issue activity, DRAM throughput,
# registers and achieved occupancy. The kernels of one `bench linear` round run in the order
# of its launch list (bench/linear_bench.cu), so the grid sizes and the order tell x from w.
# Usage: scripts/gpu_quant_profile.sh [BIN_DIR [OUT_FILE]]
set -uo pipefail
bin="${1:-build-gpu}"
out="${2:-${OUT:-out/gpu}/quant_ncu.txt}"
kernels="hq_lsq_quantize_kernel|bitsplit|absmax|column_partials|column_finalize|lsq_mask_hadamard|unpack_s4_transpose"
metrics="gpu__time_duration.sum,smsp__thread_inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size"
timeout 140 ncu --clock-control none -k regex:"$kernels" --launch-count 40 --metrics "$metrics" \
  --csv --page raw "$bin/nibble" bench linear --shapes 16384x4096x4096 --runs 10 --warmup 0 \
  >>"$out" 2>&1
echo "== exit $?" >>"$out"
