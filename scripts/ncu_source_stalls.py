#!/usr/bin/env python3
"""Summarise `ncu --page source --csv --print-source sass` output: warp-stall samples per SASS
opcode and per stall reason, and the instructions with the most samples. Usage:
  ncu_source_stalls.py SOURCE.csv [TOP]"""
import csv
import collections
import sys

rows = list(csv.reader(open(sys.argv[1], newline="")))
top = int(sys.argv[2]) if len(sys.argv) > 2 else 40
# the header row is the first one with a "Source" column
h = next(i for i, r in enumerate(rows) if "Source" in r)
head = rows[h]
body = [r for r in rows[h + 1:] if len(r) == len(head)]
col = {name: i for i, name in enumerate(head)}
src = col["Source"]
samp = next((c for c in head if c.startswith("Warp Stall Sampling (All")), None)
reasons = [c for c in head if c.startswith("stall_") or "Stall" in c and c != samp]
def num(v):
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return 0.0
total = sum(num(r[col[samp]]) for r in body) if samp else 0
print(f"{len(body)} SASS lines, {total:.0f} stall samples ({samp})")
by_op = collections.Counter()
for r in body:
    op = r[src].strip().split()[0] if r[src].strip() else "?"
    if op.startswith("@"):
        op = r[src].strip().split()[1]
    by_op[op.split(".")[0]] += num(r[col[samp]])
print("samples by opcode:")
for op, v in by_op.most_common(20):
    print(f"  {op:12s} {v:10.0f} {100 * v / max(total, 1):5.1f}%")
if reasons:
    print("samples by reason (columns):")
    sums = {c: sum(num(r[col[c]]) for r in body) for c in reasons}
    for c, v in sorted(sums.items(), key=lambda kv: -kv[1])[:16]:
        print(f"  {c:60s} {v:10.0f}")
print(f"top {top} instructions:")
addr = col.get("Address", None)
for r in sorted(body, key=lambda r: -num(r[col[samp]]))[:top]:
    a = r[addr] if addr is not None else ""
    print(f"  {num(r[col[samp]]):8.0f}  {a:>8s}  {r[src].strip()[:90]}")
