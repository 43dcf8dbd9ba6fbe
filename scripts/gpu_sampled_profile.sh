#!/usr/bin/env bash
# Nsight Compute durations of the sampled-LSS backward's own kernels (scores, probability fits,
# row sampling, gathers) at two shapes, to find what the sampled variant spends beyond keep-all.
# Usage: scripts/gpu_sampled_profile.sh [BIN_DIR [OUT_FILE]]
set -uo pipefail
bin="${1:-build-gpu}"
out="${2:-${OUT:-out/gpu}/sampled_ncu.txt}"
kernels="fit_probabilities_kernel|select_rows_kernel|leverage_kernel|row_norms_kernel|gather_t_kernel|gather_split_rows_kernel|dw_row_max_kernel|dx_coefs_kernel|dw_scale_finalize_kernel|check_sample_capacity_kernel"
for shape in 16384x768x768 16384x4096x4096; do
  echo "== $shape" >>"$out"
  timeout 120 ncu --clock-control none -k regex:"$kernels" --launch-count 28 \
    --metrics gpu__time_duration.sum --csv --page raw \
    "$bin/nibble" bench linear --shapes "$shape" --runs 10 --warmup 1 >>"$out" 2>&1
  echo "== exit $?" >>"$out"
done
