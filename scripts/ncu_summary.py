#!/usr/bin/env python3
"""One line per distinct kernel (name, grid) of an Nsight Compute CSV written by
scripts/gpu_quant_profile.sh: grid size, duration (ns), thread instructions, issue activity,
DRAM throughput, registers, achieved occupancy. Usage: scripts/ncu_summary.py quant_ncu.txt"""
import csv,io,sys
txt=open(sys.argv[1]).read()
lines=[l for l in txt.splitlines() if l.startswith('"')]
rows=list(csv.reader(io.StringIO('\n'.join(lines))))
hdr=rows[0]; idx={h:i for i,h in enumerate(hdr)}
cols=['launch__grid_size','gpu__time_duration.sum','smsp__thread_inst_executed.sum','smsp__issue_active.avg.pct_of_peak_sustained_active','dram__throughput.avg.pct_of_peak_sustained_elapsed','launch__registers_per_thread','sm__warps_active.avg.pct_of_peak_sustained_active']
seen=set()
print('kernel | grid | ns | thread inst | issue% | dram% | regs | occ%')
for r in rows[2:]:
    name=r[idx['Kernel Name']].split('(')[0].split('::')[-1][:60]
    vals=[r[idx[c]] for c in cols]
    key=(name,vals[0])
    if key in seen: continue
    seen.add(key)
    print(name, '|', ' | '.join(vals))
