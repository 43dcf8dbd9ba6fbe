#!/usr/bin/env bash
# Per-instruction warp-stall sampling of the first fused mask GEMM (the dx GEMM) of one
# `bench linear` shape, summarised by scripts/ncu_source_stalls.py.
# Usage: scripts/ncu_fused_sources.sh BIN_DIR OUT_FILE SHAPE [KERNEL_REGEX]
bin=$1; out=$2; shape=$3; kre=${4:-MaskHadamard}
tmp=$(mktemp -d)
timeout 200 ncu --clock-control none --kernel-name-base demangled -k regex:"$kre" -c 1 \
  --section SourceCounters --section WarpStateStats -o "$tmp/rep" \
  "$bin/nibble" bench linear --shapes "$shape" --runs 10 --warmup 0 --no-sampled >"$tmp/log" 2>&1
ncu -i "$tmp/rep.ncu-rep" --page source --csv --print-source sass >"$tmp/src.csv" 2>>"$tmp/log"
python3 "$(dirname "$0")/ncu_source_stalls.py" "$tmp/src.csv" 50 >"$out" 2>&1
tail -3 "$tmp/log" >>"$out"
head -3 "$tmp/src.csv" | cut -c1-600 >>"$out"
