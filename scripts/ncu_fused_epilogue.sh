#!/usr/bin/env bash
# ncu on the fused mask-Hadamard GEMMs of one bench linear shape: the dx GEMM then the dw GEMM
bin=$1; out=$2; shape=$3
timeout 200 ncu --clock-control none --kernel-name-base demangled -k regex:MaskHadamard -c 2 \
  --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
  --section SourceCounters \
  "$bin/nibble" bench linear --shapes $shape --runs 10 --warmup 0 --no-sampled > "$out" 2>&1
echo "== exit $?" >> "$out"
