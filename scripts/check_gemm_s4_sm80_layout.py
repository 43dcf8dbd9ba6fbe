#!/usr/bin/env python3
"""CPU self-check of the data movement in src/cuda/gemm/gemm_s4s4_s32_tn_sm80.cu (no GPU needed).

Simulates one 128 x 128 CTA over one 64-byte K stage, for both element types of the kernel
template (s4: 128 elements, s8: 64 elements): the kernel's swizzled shared-memory layout, its
ldmatrix lane addresses and fragment register assignment, and its epilogue's (row, col)
mapping, with the instructions' semantics written down independently:
  - ldmatrix.x4.b16: lane l supplies the row address of row l % 8 of matrix l / 8 and receives in
    register j the 32 bits at byte 4 * (l % 4) of row l / 4 of matrix j (PTX ISA);
  - mma.m16n8k64 s4: thread/value -> (row, k) maps of CuTe's MMA_Traits<SM80_16x8x64_S32S4S4S32_TN>
    (A: (T32, V32) -> (M16, K64) with strides ((128, 1), (16, 8, 512)); B: ((64, 1), (8, 256));
    C: SM80_16x8_Row, ((32, 1), (16, 8))), value v of a register at bits 4 * (v % 8);
  - mma.m16n8k32 s8: CuTe's MMA_Traits<SM80_16x8x32_S32S8S8S32_TN> (A: (T32, V16) -> (M16, K32),
    shape ((4, 8), (4, 2, 2)), strides ((64, 1), (16, 8, 256)); B: ((4, 8), (4, 2)),
    ((32, 1), (8, 128)); C as above), value v of a register at bits 8 * (v % 4).
It checks that the result equals the plain product of the codes, and that every 8-row
group that one ldmatrix matrix reads hits 8 distinct 16-byte bank groups (no bank conflicts).
What it cannot check: that the hardware follows those documented semantics (the GPU tests do).
Run: python3 scripts/check_gemm_s4_sm80_layout.py   (pure Python, a few seconds)
"""
import random

TILE_M, TILE_N, ROW_BYTES = 128, 128, 64  # kTileM, kTileN, kTileKBytes
WARPS_N = 4


def smem_offset(row, chunk):  # the kernel's smem_offset
    return row * ROW_BYTES + ((chunk ^ ((row >> 1) & 3)) * 16)


def fill(tile):  # cp.async of every 16-byte chunk to its swizzled place
    smem = bytearray(len(tile) * ROW_BYTES)
    for r, row in enumerate(tile):
        for c in range(4):
            o = smem_offset(r, c)
            smem[o:o + 16] = row[16 * c:16 * c + 16]
    return smem


def s4(byte_row, k):  # element k of a packed row, sign-extended (docs/formats.md)
    v = (byte_row[k // 2] >> (4 * (k % 2))) & 0xF
    return v - 16 if v >= 8 else v


def ldmatrix_x4(smem, lane_addr):
    return [[int.from_bytes(smem[lane_addr[8 * j + l // 4] + 4 * (l % 4):][:4], "little")
             for j in range(4)] for l in range(32)]


def s8(byte_row, k):  # element k of an int8 row
    v = byte_row[k]
    return v - 256 if v >= 128 else v


def nibble(reg, v):
    x = (reg >> (4 * v)) & 0xF
    return x - 16 if x >= 8 else x


def sbyte(reg, v):
    x = (reg >> (8 * v)) & 0xFF
    return x - 256 if x >= 128 else x


# Per element type: elements per 32-bit register, the register decoder, the mma's K, the A and B
# (thread, value) -> index maps (index = row + rows * k), and the element reader of a global row.
ELEMS = {
    "s4": dict(per_reg=8, decode=nibble, k=64, elem=s4,
               a_idx=lambda t0, t1, v: 128 * t0 + t1 + 16 * (v % 8) + 8 * ((v // 8) % 2)
               + 512 * (v // 16),
               b_idx=lambda t0, t1, v: 64 * t0 + t1 + 8 * (v % 8) + 256 * (v // 8)),
    "s8": dict(per_reg=4, decode=sbyte, k=32, elem=s8,
               a_idx=lambda t0, t1, v: 64 * t0 + t1 + 16 * (v % 4) + 8 * ((v // 4) % 2)
               + 256 * (v // 8),
               b_idx=lambda t0, t1, v: 32 * t0 + t1 + 8 * (v % 4) + 128 * (v // 4)),
}


def mma(et, a_regs, b_regs):  # one m16n8k64 (s4) / m16n8k32 (s8) on fragments; d[lane][4]
    e = ELEMS[et]
    kk, pr = e["k"], e["per_reg"]
    a = [[None] * kk for _ in range(16)]
    b = [[None] * kk for _ in range(8)]
    for t in range(32):
        t0, t1 = t % 4, t // 4
        for v in range(4 * pr):
            idx = e["a_idx"](t0, t1, v)
            assert a[idx % 16][idx // 16] is None, "A layout maps two values to one element"
            a[idx % 16][idx // 16] = e["decode"](a_regs[t][v // pr], v % pr)
        for v in range(2 * pr):
            idx = e["b_idx"](t0, t1, v)
            assert b[idx % 8][idx // 8] is None, "B layout maps two values to one element"
            b[idx % 8][idx // 8] = e["decode"](b_regs[t][v // pr], v % pr)
    assert all(x is not None for row in a + b for x in row), "a fragment layout leaves holes"
    d = [[0] * 4 for _ in range(32)]
    for t in range(32):
        for v in range(4):
            idx = 32 * (t % 4) + t // 4 + 16 * (v % 2) + 8 * (v // 2)
            m, n = idx % 16, idx // 16
            d[t][v] = sum(a[m][k] * b[n][k] for k in range(kk))
    return d


def check(et, seed):
    rnd = random.Random(seed)
    ga = [bytes(rnd.randrange(256) for _ in range(ROW_BYTES)) for _ in range(TILE_M)]
    gb = [bytes(rnd.randrange(256) for _ in range(ROW_BYTES)) for _ in range(TILE_N)]
    sa, sb = fill(ga), fill(gb)
    c = [[None] * TILE_N for _ in range(TILE_M)]
    for warp in range(8):
        wm, wn = warp // WARPS_N, warp % WARPS_N
        acc = [[[[0] * 4 for _ in range(32)] for _ in range(4)] for _ in range(4)]
        for s in range(2):  # the two mma K-steps (32 bytes each) of a stage
            a_off = [smem_offset(wm * 64 + l % 8 + 8 * ((l // 8) % 2), 2 * s + l // 16)
                     for l in range(32)]
            b_off = [smem_offset(wn * 32 + l % 8 + 8 * (l // 16), 2 * s + (l // 8) % 2)
                     for l in range(32)]
            af = [ldmatrix_x4(sa, [o + i * 16 * ROW_BYTES for o in a_off]) for i in range(4)]
            bf = [None] * 4
            for j in range(2):
                r = ldmatrix_x4(sb, [o + j * 16 * ROW_BYTES for o in b_off])
                bf[2 * j] = [x[0:2] for x in r]
                bf[2 * j + 1] = [x[2:4] for x in r]
            for i in range(4):
                for j in range(4):
                    d = mma(et, af[i], bf[j])
                    for l in range(32):
                        for v in range(4):
                            acc[i][j][l][v] += d[l][v]
        for l in range(32):  # the kernel's epilogue mapping
            g, t = l // 4, l % 4
            for i in range(4):
                for half in range(2):
                    row = wm * 64 + i * 16 + g + 8 * half
                    for j in range(4):
                        col = wn * 32 + j * 8 + 2 * t
                        c[row][col] = acc[i][j][l][2 * half]
                        c[row][col + 1] = acc[i][j][l][2 * half + 1]
    elem, k_stage = ELEMS[et]["elem"], ROW_BYTES * ELEMS[et]["per_reg"] // 4  # elements per row
    bad = sum(c[m][n] != sum(elem(ga[m], k) * elem(gb[n], k) for k in range(k_stage))
              for m in range(TILE_M) for n in range(TILE_N))
    assert bad == 0, f"{et}: {bad} of {TILE_M * TILE_N} elements differ from the plain product"


def main():
    for et, seed in (("s4", 1), ("s8", 2)):
        check(et, seed)
    for chunk in range(4):
        for r0 in range(0, TILE_M, 8):
            groups = {(smem_offset(r, chunk) % 128) // 16 for r in range(r0, r0 + 8)}
            assert len(groups) == 8, f"bank conflict: rows {r0}..{r0 + 7}, chunk {chunk}"
    print("ok (s4 and s8): fragments, epilogue mapping and swizzle agree with the documented "
          "semantics")


if __name__ == "__main__":
    main()
