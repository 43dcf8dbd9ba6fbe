#!/usr/bin/env bash
# bench linear for each binary variant, alternating, and the fused GEMM times from the JSON.
# Usage: scripts/bench_fused_variants.sh OUT_DIR BIN... (a variant is named by its path, so
# build-carry/base/nibble and build-carry/exp/nibble do not collide)
out=$1; shift
shapes=16384x4096x4096,16384x4096x11008,16384x11008x4096,8192x7680x9728
for round in 1 2; do
  for b in "$@"; do
    n=$(echo "$b" | tr / _)
    $b bench linear --shapes $shapes --no-sampled --json $out/$n.$round.json > $out/$n.$round.txt 2>&1
  done
done
python3 - "$out" "$@" <<'PY'
import json, sys, os
out = sys.argv[1]
for b in sys.argv[2:]:
    n = b.replace("/", "_")
    for r in (1, 2):
        d = json.load(open(f"{out}/{n}.{r}.json"))
        for s in d["shapes"]:
            t = s["times"]; g = lambda k: 1e3 * t[k]["median_ms"]
            print(f"{n:20s} r{r} {s['m_tokens']}x{s['n_out']}x{s['k_in']:<6} dx: plain {g('bwd_gemm_dx'):7.1f} fused {g('bwd_gemm_dx_fused'):7.1f} | dw: plain {g('bwd_gemm_dw'):7.1f} fused {g('bwd_gemm_dw_fused'):7.1f} | bwd {g('backward'):7.1f}")
PY
