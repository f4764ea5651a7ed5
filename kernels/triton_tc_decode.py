"""Tensor-core decode GEMVs: the dequantized weight registers are the A fragments of ``mma.sync``.

The decode GEMMs (a handful of tokens per expert) read every weight once and do little arithmetic per
byte, so what limits them after the memory system is the instruction issue of the E2M1 decode.  CUDA-core
GEMVs spend ~3.5 instructions per weight element (cut, widen to fp32, FMA).  Here one warp owns 16 weight rows and runs ``mma.sync.m16n8k16`` (bf16 in, fp32 accumulate) with
the weights as A (M = 16 rows) and up to 8 tokens as B (N = 8): the cut and one bf16x2 FMA with the block
scale per pair stay, the 8 FMAs per word become a quarter of an MMA (the gated GEMM1 loop compiles to 374
SASS instructions per thread for 128 weight elements, ~2.9 each, for up to 8 tokens at once).

``tl.dot`` cannot be told to take its A operand from the registers where the decode left it (Triton
converts the layout through shared memory, which is why its 16-row tiles lose at 1-4 tokens), so the
MMA is inline PTX on one-element-per-thread tensors of ``32 * WARPS`` elements.  Each thread reads its
``%tid.x`` and computes from it which rows and K elements it loads, so the fragment layout never depends
on how Triton lays out those tensors.  One exception: GEMM1's in-program K split (``KS``) sums its warps'
accumulators by reshaping them, which assumes Triton's default layout for these tensors (element ``i`` in
thread ``i``); its GPU tests would fail on a Triton that placed them otherwise.

Fragment bookkeeping (PTX ISA, ``mma.m16n8k16`` with bf16): thread ``lane = 4 g + c`` holds

- A: rows ``g`` and ``g + 8``, K slots ``2c, 2c+1`` (``a0 a1``, ``a2 a3``) and ``2c+8, 2c+9`` (``a4..a7``);
- B: K slots as A, column (token) ``g``;
- C/D: rows ``g`` and ``g + 8``, columns ``2c, 2c+1``.

A dot product may visit K in any order as long as A and B agree, so each thread feeds its slots from two
whole NVFP4 groups of a 128-element (8-group) chunk: one 8-byte load per row and group, and the activation
words of the same K.  Grouped programs take groups ``c`` and ``c + 4`` (a quad's load is 32 contiguous bytes
of a row), per-pair programs ``2c`` and ``2c + 1``; measured on the H200 both ways: grouped 16 tokens 0.5-6%
faster with the first (DeepSeek-V3 804 -> 757 us), per pair 4 tokens 3-5% faster with the second (Gemma-4
50.8 against 53.3 us).  One 32-bit weight word (8 codes) covers two MMAs: its pairs 0/1 fill slots
``2c..`` / ``2c+8..`` of the first, pairs 2/3 of the second, and the activation words holding the same
elements ``(4q .. 4q+3)`` are ``b0 b1 / b2 b3``.

Each such warp load spans 8 weight rows.  Row-major that was 8 cache lines, and Nsight Compute showed
the loop waiting on L1 requests (64% of the stalls, DRAM at 46% of its peak, Qwen3 16 tokens) rather
than on DRAM; on the banded weights (``triton_layout``: each 16-row band stored as 64-element pieces,
their 16 rows contiguous, addressed through ``_band_off``) the 8 rows' piece is one run of 2 lines.  With
``VEC`` (an even number of groups per row, aligned tensors) a thread's groups are always ``2c, 2c + 1``
and each row's pair is one 16-byte load (its two scales one 2-byte load; a narrow last piece of a band
then holds 2 groups, so the pair stays contiguous); ``XVEC`` does the same for the activation words.  That
halves the load instructions; where it pays is measured (the planner, :mod:`triton_plan`).

Two ways to pick the tokens (B columns) of a program:

- per pair (``GROUPED=False``): one program per (token, expert) pair, only column 0 is live (2-15 tokens:
  no grouping pass needed, most pairs have their own expert);
- grouped (``GROUPED=True``): the pairs bucketed by expert into blocks of ``8 * COLS`` (:mod:`triton_group`),
  each expert's weights decoded once for all of its tokens.  With ``COLS = 2`` a thread's dequantized A
  fragments of a chunk (``_chunk_frags``) feed the MMAs of two 8-token column tiles (``_cols_mma``): the
  decode's cost is the dequantization, so a 16-token block costs little more than an 8-token one.  The
  accumulators, activation words and pairs of the tiles are Triton tuples indexed by tile.
"""

from __future__ import annotations

import torch

from moe_passes.errors import MoEConfigError
from moe_passes.kernels.triton_common import epilogue_args, tl, triton
from moe_passes.kernels.triton_group import align
from moe_passes.kernels.triton_launch import launch
from moe_passes.kernels.triton_plan import DECODE_CHUNK, DecodeConfig, k_split

__all__ = ["decode_tc"]

if triton is not None:
    from moe_passes.kernels.triton_common import act_kernel, apply_act, band_off, gdc, word_cut_asm

    _MMA = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    # One weight word of rows g ($8) and g+8 ($9) -> the A fragments of its two MMAs ($0-$3, $4-$7): each
    # bf16x2 pair times its row's scale pair ($10 / $11, ``_scales``) with one FMA (adding -0 leaves it alone).
    _FRAGS_ASM = tl.constexpr("{" + word_cut_asm("$8", "a") + word_cut_asm("$9", "b") + """
    .reg .b32 z;
    mov.b32 z, 0x80008000;
    fma.rn.bf16x2 $0, a0, $10, z;
    fma.rn.bf16x2 $1, b0, $11, z;
    fma.rn.bf16x2 $2, a1, $10, z;
    fma.rn.bf16x2 $3, b1, $11, z;
    fma.rn.bf16x2 $4, a2, $10, z;
    fma.rn.bf16x2 $5, b2, $11, z;
    fma.rn.bf16x2 $6, a3, $10, z;
    fma.rn.bf16x2 $7, b3, $11, z;
    }""")
    # The two MMAs of one word: A fragments $4-$7 and $8-$11, the B column's activation words $12 (the word's
    # elements 0-3) and $13 (4-7), accumulators $14-$17, out $0-$3.
    _WORD_MMA_ASM = tl.constexpr(f"""{{
    .reg .b32 x0, x1, x2, x3;
    .reg .f32 d0, d1, d2, d3;
    mov.b64 {{x0, x1}}, $12;
    mov.b64 {{x2, x3}}, $13;
    {_MMA} {{d0, d1, d2, d3}}, {{$4, $5, $6, $7}}, {{x0, x1}}, {{$14, $15, $16, $17}};
    {_MMA} {{$0, $1, $2, $3}}, {{$8, $9, $10, $11}}, {{x2, x3}}, {{d0, d1, d2, d3}};
    }}""")

    @triton.jit
    def _thread_ids(like):
        """``%tid.x`` of the thread holding each element of the one-element-per-thread tensor ``like``."""
        return tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [like], dtype=tl.int32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _word_frags(w0, w1, s0, s1):
        """The 8 scaled A-fragment registers of one weight word of rows g (``w0``) and g+8 (``w1``)."""
        return tl.inline_asm_elementwise(_FRAGS_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [w0, w1, s0, s1],
                                         dtype=(tl.int32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _word_mma(f, xa, xb, c0, c1, c2, c3):
        """One word's fragments ``f`` (8, ``_word_frags``) against a B column's activation words ``xa``/``xb``."""
        return tl.inline_asm_elementwise(
            _WORD_MMA_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,l,l,f,f,f,f",
            [f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], xa, xb, c0, c1, c2, c3],
            dtype=(tl.float32,) * 4, is_pure=True, pack=1)

    # Two E4M3 block scales (bits 0-7 and 16-23 of $2) -> ``bf16(scale * 2^119)`` twice in $0 (the first) and
    # $1 (the second), as ``_scale_pair`` of :mod:`triton_tiles` does for one, with packed conversions.
    _SCALES_ASM = tl.constexpr("""{
    .reg .b32 h, t, p;
    .reg .f16 hl, hh;
    .reg .f32 fl, fh;
    and.b32 h, $2, 0x007F007F;
    shl.b32 h, h, 7;
    and.b32 t, $2, 0x00800080;
    shl.b32 t, t, 8;
    or.b32 h, h, t;
    mov.b32 {hl, hh}, h;
    cvt.f32.f16 fl, hl;
    cvt.f32.f16 fh, hh;
    mul.f32 fl, fl, 0f7F000000;
    mul.f32 fh, fh, 0f7F000000;
    cvt.rn.bf16x2.f32 p, fh, fl;
    prmt.b32 $0, p, 0, 0x1010;
    prmt.b32 $1, p, 0, 0x3232;
    }""")

    @triton.jit
    def _scales(s0, s1):
        """The E4M3 block-scale bytes of this thread's first (``s0``) and second (``s1``) group as bf16x2 FMA
        operands."""
        s = (s0.to(tl.int32) & 0xFF) | ((s1.to(tl.int32) & 0xFF) << 16)
        return tl.inline_asm_elementwise(_SCALES_ASM, "=r,=r,r", [s], dtype=(tl.int32, tl.int32), is_pure=True,
                                         pack=1)

    @triton.jit
    def _groups(g0, c, GROUPED: tl.constexpr, VEC: tl.constexpr):
        """This thread's two groups of the chunk starting at group ``g0``: ``c`` and ``c + 4`` when grouped and
        loaded 8 bytes at a time, else ``2c`` and ``2c + 1`` (see the module docstring)."""
        if GROUPED and not VEC:
            return g0 + c, g0 + c + 4
        else:
            return g0 + 2 * c, g0 + 2 * c + 1

    # A 16-byte load (two int64) where ``$3`` is nonzero, zeros elsewhere.  Triton loads the int64 elements of
    # these one-element-per-thread tensors 8 bytes at a time, and a warp's load spans 8 rows (8 cache lines),
    # so the L1 requests, not DRAM, bound the loop: two groups per request halve them.  Not pure: it must
    # stay after the PDL wait.
    _LD16_ASM = tl.constexpr("""{
    .reg .pred p;
    setp.ne.b32 p, $3, 0;
    mov.b64 $0, 0;
    mov.b64 $1, 0;
    @p ld.global.v2.b64 {$0, $1}, [$2];
    }""")

    @triton.jit
    def _ld16(ptrs, live):
        return tl.inline_asm_elementwise(_LD16_ASM, "=l,=l,l,r", [ptrs, live.to(tl.int32)],
                                         dtype=(tl.int64, tl.int64), is_pure=False, pack=1)

    @triton.jit
    def _wload(w0, w1, sb0, sb1, rr0, rr1, g0, c, KG: tl.constexpr, live, GROUPED: tl.constexpr,
               VEC: tl.constexpr):
        """Rows g and g+8 (band pointers ``w0``/``w1``, scales ``sb0``/``sb1``, band rows ``rr0``/``rr1``) of
        this thread's two groups of the chunk at ``g0`` (an int64 each) and their scale bytes.  A group past
        the last re-reads the last one(s) (its activations are masked to zero); ``live`` False (the prefetch
        past a split's end) loads nothing.  VEC (``KG`` even, 16-byte aligned rows): the
        two adjacent groups in one 16-byte load and their two scales in one 2-byte load."""
        G0, G1 = _groups(g0, c, GROUPED, VEC)
        if VEC:
            G0 = tl.minimum(G0, KG - 2)
            live = (c >= 0) & live  # a tensor also when ``live`` is the constant True
            A0 = band_off(G0, rr0, KG)
            B0 = band_off(G0, rr1, KG)
            a0, a1 = _ld16(w0 + A0, live)
            b0, b1 = _ld16(w1 + B0, live)
            s16 = tl.pointer_type(tl.uint16)
            sa = tl.load((sb0 + A0).to(s16), mask=live).to(tl.int32)
            sb = tl.load((sb1 + B0).to(s16), mask=live).to(tl.int32)
            return a0, a1, b0, b1, sa, sa >> 8, sb, sb >> 8
        else:
            G0 = tl.minimum(G0, KG - 1)
            G1 = tl.minimum(G1, KG - 1)
            A0 = band_off(G0, rr0, KG)
            A1 = band_off(G1, rr0, KG)
            B0 = band_off(G0, rr1, KG)
            B1 = band_off(G1, rr1, KG)
            return (tl.load(w0 + A0, mask=live), tl.load(w0 + A1, mask=live), tl.load(w1 + B0, mask=live),
                    tl.load(w1 + B1, mask=live), tl.load(sb0 + A0, mask=live), tl.load(sb0 + A1, mask=live),
                    tl.load(sb1 + B0, mask=live), tl.load(sb1 + B1, mask=live))

    @triton.jit
    def _xload(xp, g0, c, g_end, okb, GROUPED: tl.constexpr, VEC: tl.constexpr, XVEC: tl.constexpr):
        """The activation words (4 bf16 each) of this thread's two groups for its B column; XVEC (16-byte aligned
        rows) in 16-byte loads."""
        G0, G1 = _groups(g0, c, GROUPED, VEC)
        m0 = okb & (G0 < g_end)
        m1 = okb & (G1 < g_end)
        if XVEC:
            x0, x1 = _ld16(xp + 4 * G0, m0)
            x2, x3 = _ld16(xp + 4 * G0 + 2, m0)
            x4, x5 = _ld16(xp + 4 * G1, m1)
            x6, x7 = _ld16(xp + 4 * G1 + 2, m1)
            return x0, x1, x2, x3, x4, x5, x6, x7
        else:
            return (tl.load(xp + 4 * G0, mask=m0, other=0), tl.load(xp + 4 * G0 + 1, mask=m0, other=0),
                    tl.load(xp + 4 * G0 + 2, mask=m0, other=0), tl.load(xp + 4 * G0 + 3, mask=m0, other=0),
                    tl.load(xp + 4 * G1, mask=m1, other=0), tl.load(xp + 4 * G1 + 1, mask=m1, other=0),
                    tl.load(xp + 4 * G1 + 2, mask=m1, other=0), tl.load(xp + 4 * G1 + 3, mask=m1, other=0))

    @triton.jit
    def _chunk_frags(wa0, wa1, wb0, wb1, sa0, sa1, sb0, sb1):
        """The A fragments (32: 4 words x 8) of this thread's share of one 128-element chunk: its two groups of
        rows g (``wa*``) and g+8 (``wb*``), an int64 of two words each, and their scale bytes.  Made once per
        chunk, whatever the number of column tiles it meets."""
        pa0, pa1 = _scales(sa0, sa1)
        pb0, pb1 = _scales(sb0, sb1)
        return (_word_frags(wa0.to(tl.int32), wb0.to(tl.int32), pa0, pb0)
                + _word_frags((wa0 >> 32).to(tl.int32), (wb0 >> 32).to(tl.int32), pa0, pb0)
                + _word_frags(wa1.to(tl.int32), wb1.to(tl.int32), pa1, pb1)
                + _word_frags((wa1 >> 32).to(tl.int32), (wb1 >> 32).to(tl.int32), pa1, pb1))

    @triton.jit
    def _cols_mma(f, xs, acc, COLS: tl.constexpr):
        """The chunk's fragments ``f`` against each of the COLS column tiles: ``xs`` holds 8 activation words
        per tile (``_xloads``: words 0-3 the first group's, 4-7 the second's), ``acc`` 4 accumulators per tile."""
        out = ()
        for j in tl.static_range(COLS):
            x = xs[8 * j:8 * j + 8]
            c0, c1, c2, c3 = _word_mma(f[0:8], x[0], x[1], acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3])
            c0, c1, c2, c3 = _word_mma(f[8:16], x[2], x[3], c0, c1, c2, c3)
            c0, c1, c2, c3 = _word_mma(f[16:24], x[4], x[5], c0, c1, c2, c3)
            out = out + _word_mma(f[24:32], x[6], x[7], c0, c1, c2, c3)
        return out

    @triton.jit
    def _xloads(xps, g0, c, g_end, okbs, GROUPED: tl.constexpr, VEC: tl.constexpr, XVEC: tl.constexpr,
                COLS: tl.constexpr):
        """``_xload`` for each column tile's B column (row pointers ``xps``, live ``okbs``): 8 words per tile."""
        out = ()
        for j in tl.static_range(COLS):
            out = out + _xload(xps[j], g0, c, g_end, okbs[j], GROUPED, VEC, XVEC)
        return out

    @triton.jit
    def _program(pair_expert, sorted_ptr, bexp_ptr, num_pairs, GROUPED: tl.constexpr, WARPS: tl.constexpr,
                 CACHE: tl.constexpr, COLS: tl.constexpr = 1):
        """``(tid, c, expert, B pairs, D pairs)`` of this thread (lane ``4g + c``): per column tile ``j`` of
        the program's COLS, the pair of its B column ``g`` (``B pairs[j]``) and of its D columns ``2c`` and
        ``2c + 1`` (``D pairs[2j]``, ``[2j + 1]``); a pair >= num_pairs is no pair, an expert < 0 an empty
        block.  A grouped block is ``8 * COLS`` rows of the grouping, tile ``j`` its rows ``8j .. 8j + 7``.
        ``pair_expert``: the expert of a per-pair program (unused when grouped).  CACHE: the block map's load
        modifier, ".cg" (skip L1) where it is read before a PDL wait, "" otherwise."""
        blk = tl.program_id(0)
        tid = _thread_ids(tl.arange(0, 32 * WARPS))
        g = (tid & 31) >> 2
        c = tid & 3
        if GROUPED:
            e = tl.load(bexp_ptr + blk, cache_modifier=CACHE)
            base = sorted_ptr + blk * (8 * COLS)
            pbs = ()
            pds = ()
            for j in tl.static_range(COLS):
                pbs = pbs + (tl.load(base + 8 * j + g, cache_modifier=CACHE),)
                pds = pds + (tl.load(base + 8 * j + 2 * c, cache_modifier=CACHE),
                             tl.load(base + 8 * j + 2 * c + 1, cache_modifier=CACHE))
        else:
            e = pair_expert.to(tl.int32)
            pbs = (tl.where(g == 0, blk, num_pairs),)
            pds = (tl.where(c == 0, blk, num_pairs), tl.zeros_like(c) + num_pairs)
        return tid, c, e, pbs, pds

    @triton.jit
    def _row_ptrs(base64, pbs, num_pairs, words_per_row, TOP_K: tl.constexpr, COLS: tl.constexpr):
        """Per column tile: the row pointer (int64 words) of its B column's activations and whether it is a
        pair (pair ``p`` reads row ``p // TOP_K``)."""
        ptrs = ()
        oks = ()
        for j in tl.static_range(COLS):
            ok = pbs[j] < num_pairs
            oks = oks + (ok,)
            ptrs = ptrs + (base64 + tl.where(ok, pbs[j] // TOP_K, 0).to(tl.int64) * words_per_row,)
        return ptrs, oks

    @triton.jit
    def _rows(e64, tid, N: tl.constexpr, KG: tl.constexpr, WARPS: tl.constexpr, ROWS: tl.constexpr,
              KS: tl.constexpr = 1):
        """This thread's weight rows ``r0 = g`` and ``r1 = g + 8`` of the program's tile: ``r0``, the offsets
        (int64 words, one per group) of the two rows' bands, and their rows in the bands (``_band_off``).
        Rows past the end read row ``N - 1`` (never stored).  ``KS > 1``: all warps share one 16-row tile
        (they split its K)."""
        if KS > 1:
            r0 = tl.program_id(1) * 16 + ((tid & 31) >> 2)
        else:
            r0 = (tl.program_id(1) * WARPS + (tid >> 5)) * 16 + ((tid & 31) >> 2)
        R0 = e64 * ROWS + tl.minimum(r0, N - 1)
        R1 = e64 * ROWS + tl.minimum(r0 + 8, N - 1)
        return r0, (R0 - R0 % 16) * KG, (R1 - R1 % 16) * KG, R0 % 16, R1 % 16

    @triton.jit
    def _step1(wgp, wup, rr0, rr1, g0, c, KG: tl.constexpr, xps, okbs, ag, au, GATED: tl.constexpr,
               GROUPED: tl.constexpr, VEC: tl.constexpr, XVEC: tl.constexpr, live, g_end, COLS: tl.constexpr):
        """One 128-element chunk of GEMM1 at group ``g0`` (a scalar, or a tensor when the warps split K):
        load (weights only where ``live``; activations of groups at or past ``g_end`` count zero), then the
        gate (and up) MMAs of every column tile.  ``wgp``/``wup``: the gate / up rows' ``_wload`` pointers."""
        cg = _wload(*wgp, rr0, rr1, g0, c, KG, live, GROUPED, VEC)
        if GATED:
            cu = _wload(*wup, rr0, rr1, g0, c, KG, live, GROUPED, VEC)
        cx = _xloads(xps, g0, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
        ag = _cols_mma(_chunk_frags(*cg), cx, ag, COLS)
        if GATED:
            au = _cols_mma(_chunk_frags(*cu), cx, au, COLS)
        return ag, au

    @triton.jit
    def _col0_rows(acc, c, KS: tl.constexpr):
        """``[8]``: a one-tile accumulator's column-0 values (lanes ``c == 0``, rows g) summed over KS warps."""
        v = tl.reshape(tl.where(c == 0, acc, 0.0), [KS, 8, 4])
        return tl.sum(tl.sum(v, axis=2), axis=0)

    @triton.jit
    def _bias1(b13_ptr, e64, row, I, N1: tl.constexpr, GATED: tl.constexpr):
        """The gate (and up) biases of GEMM1 rows ``row`` of expert ``e64`` (``b13 [E, N1]`` fp32); 0 past I."""
        p = b13_ptr + e64 * N1 + row
        bg = tl.load(p, mask=row < I, other=0.0)
        bu = bg
        if GATED:
            bu = tl.load(p + I, mask=row < I, other=0.0)
        return bg, bu

    @triton.jit
    def _tgemv1_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, ids_ptr, sorted_ptr, bexp_ptr, out_ptr, part_ptr,
                       num_pairs, stride_x8, groups_per_split,
                       H: tl.constexpr, I: tl.constexpr,
                       TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, GROUPED: tl.constexpr,
                       WARPS: tl.constexpr, SPLIT: tl.constexpr, PF: tl.constexpr, VEC: tl.constexpr = False,
                       XVEC: tl.constexpr = False, PDL: tl.constexpr = False, KS: tl.constexpr = 1,
                       COLS: tl.constexpr = 1, b13_ptr=None, HAS_B1: tl.constexpr = False,
                       ALPHA: tl.constexpr = 1.702, BETA: tl.constexpr = 1.0, LIMIT: tl.constexpr = 7.0):
        """Decode GEMM1 (+ activation when not split): program = (pair or block, 16 * WARPS rows, K split).

        PF loads the next chunk's weights and activations before this chunk's MMAs (register double buffer).
        COLS (grouped): column tiles of 8 tokens per program, each chunk's weights dequantized once for all.
        KS > 1 (per pair, WARPS == KS, no PF, no grid split): the program's warps share one 16-row tile and
        split its K; their sums meet in shared memory and the activation is applied here, so no partial sums
        leave the program and no activation launch follows.  HAS_B1 (no grid split: a split GEMM1's
        ``act_kernel`` adds them): the expert's biases ``b13_ptr [E, N1]`` before the activation;
        ALPHA/BETA/LIMIT: swiglu_oai's parameters.
        """
        gdc(PDL)
        if GROUPED:
            pair_expert = 0
        else:  # the routing launch's id of this program's pair
            pair_expert = tl.load(ids_ptr + tl.program_id(0)).to(tl.int64)
        tid, c, e, pbs, pds = _program(pair_expert, sorted_ptr, bexp_ptr, num_pairs, GROUPED, WARPS, "", COLS)
        if e < 0:
            return
        e64 = e.to(tl.int64)
        N1: tl.constexpr = 2 * I if GATED else I
        KG: tl.constexpr = H // 16
        UP: tl.constexpr = I * KG  # gate row r -> up row I + r
        row, o0, o1, rr0, rr1 = _rows(e64, tid, I, KG, WARPS, N1, KS)
        w64 = w_ptr.to(tl.pointer_type(tl.int64))
        wgp = (w64 + o0, w64 + o1, s_ptr + o0, s_ptr + o1)
        wup = (w64 + o0 + UP, w64 + o1 + UP, s_ptr + o0 + UP, s_ptr + o1 + UP)
        xps, okbs = _row_ptrs(x_ptr.to(tl.pointer_type(tl.int64)), pbs, num_pairs, stride_x8, TOP_K, COLS)
        g_begin = tl.program_id(2) * groups_per_split
        g_end = tl.minimum(g_begin + groups_per_split, KG)
        ag = (tl.zeros([32 * WARPS], dtype=tl.float32),) * (4 * COLS)
        au = ag
        if KS > 1:  # this warp's share of the chunks (a tensor: the warp index comes from %tid.x)
            CPW: tl.constexpr = ((KG + 7) // 8 + KS - 1) // KS
            g_first = (tid >> 5) * (8 * CPW)
            for i in range(CPW):
                ag, au = _step1(wgp, wup, rr0, rr1, g_first + 8 * i, c, KG, xps, okbs, ag, au, GATED, GROUPED,
                                VEC, XVEC, g_first + 8 * i < KG, KG, COLS)
            inv = 128.0 / tl.load(gs_ptr + e64)
            # column 0 (the pair) of rows g / g+8 sits at lanes c == 0; element index = thread (the default
            # layout of these one-element-per-thread tensors), so the sums over the warps are reductions
            g_lo = _col0_rows(ag[0], c, KS) * inv
            u_lo = _col0_rows(au[0], c, KS) * inv
            if HAS_B1:
                bg, bu = _bias1(b13_ptr, e64, tl.program_id(1) * 16 + tl.arange(0, 8), I, N1, GATED)
                g_lo, u_lo = g_lo + bg, u_lo + bu
            lo = apply_act(g_lo, u_lo, ACT, ALPHA, BETA, LIMIT).to(tl.bfloat16)
            g_hi = _col0_rows(ag[2], c, KS) * inv
            u_hi = _col0_rows(au[2], c, KS) * inv
            if HAS_B1:
                bg, bu = _bias1(b13_ptr, e64, tl.program_id(1) * 16 + 8 + tl.arange(0, 8), I, N1, GATED)
                g_hi, u_hi = g_hi + bg, u_hi + bu
            hi = apply_act(g_hi, u_hi, ACT, ALPHA, BETA, LIMIT).to(tl.bfloat16)
            r = tl.program_id(1) * 16 + tl.arange(0, 8)
            orow = out_ptr + tl.program_id(0).to(tl.int64) * I
            tl.store(orow + r, lo, mask=r < I)
            tl.store(orow + r + 8, hi, mask=r + 8 < I)
            return
        if PF:
            wg = _wload(*wgp, rr0, rr1, g_begin, c, KG, True, GROUPED, VEC)
            if GATED:
                wu = _wload(*wup, rr0, rr1, g_begin, c, KG, True, GROUPED, VEC)
            xs = _xloads(xps, g_begin, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
        for g0 in range(g_begin, g_end, 8):
            if PF:
                cg, cx = wg, xs
                more = g0 + 8 < g_end
                wg = _wload(*wgp, rr0, rr1, g0 + 8, c, KG, more, GROUPED, VEC)
                xs = _xloads(xps, g0 + 8, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
                if GATED:
                    cu = wu
                    wu = _wload(*wup, rr0, rr1, g0 + 8, c, KG, more, GROUPED, VEC)
                ag = _cols_mma(_chunk_frags(*cg), cx, ag, COLS)
                if GATED:
                    au = _cols_mma(_chunk_frags(*cu), cx, au, COLS)
            else:
                ag, au = _step1(wgp, wup, rr0, rr1, g0, c, KG, xps, okbs, ag, au, GATED, GROUPED, VEC, XVEC, True,
                                g_end, COLS)
        inv = 128.0 / tl.load(gs_ptr + e64)  # 2^7: the dequantized A fragments carry 2^-7
        ok_r0 = row < I
        ok_r1 = row + 8 < I
        if HAS_B1 and SPLIT == 1:  # rows g and g + 8: the same for every column of the program
            bg0, bu0 = _bias1(b13_ptr, e64, row, I, N1, GATED)
            bg1, bu1 = _bias1(b13_ptr, e64, row + 8, I, N1, GATED)
        # accumulator 4j + h: tile j, row g, D column 2c + h; 4j + 2 + h: row g + 8
        for j in tl.static_range(COLS):
            for h in tl.static_range(2):
                ok = pds[2 * j + h] < num_pairs
                q = tl.where(ok, pds[2 * j + h], 0).to(tl.int64)
                if SPLIT == 1:
                    o = out_ptr + q * I + row
                    g0 = ag[4 * j + h] * inv
                    u0 = au[4 * j + h] * inv
                    if HAS_B1:
                        g0, u0 = g0 + bg0, u0 + bu0
                    tl.store(o, apply_act(g0, u0, ACT, ALPHA, BETA, LIMIT).to(tl.bfloat16), mask=ok & ok_r0)
                    g1 = ag[4 * j + 2 + h] * inv
                    u1 = au[4 * j + 2 + h] * inv
                    if HAS_B1:
                        g1, u1 = g1 + bg1, u1 + bu1
                    tl.store(o + 8, apply_act(g1, u1, ACT, ALPHA, BETA, LIMIT).to(tl.bfloat16), mask=ok & ok_r1)
                else:
                    pp = part_ptr + (tl.program_id(2).to(tl.int64) * num_pairs + q) * N1 + row
                    tl.store(pp, ag[4 * j + h] * inv, mask=ok & ok_r0)
                    tl.store(pp + 8, ag[4 * j + 2 + h] * inv, mask=ok & ok_r1)
                    if GATED:
                        tl.store(pp + I, au[4 * j + h] * inv, mask=ok & ok_r0)
                        tl.store(pp + I + 8, au[4 * j + 2 + h] * inv, mask=ok & ok_r1)

    @triton.jit
    def _tgemv2_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, ids_ptr, sorted_ptr, bexp_ptr, tw_ptr, y_ptr,
                       num_pairs, groups_per_split,
                       H: tl.constexpr, I: tl.constexpr,
                       GROUPED: tl.constexpr, WARPS: tl.constexpr, PF: tl.constexpr, VEC: tl.constexpr = False,
                       XVEC: tl.constexpr = False, PDL: tl.constexpr = False, EARLY: tl.constexpr = 0,
                       COLS: tl.constexpr = 1, b2_ptr=None, HAS_B2: tl.constexpr = False):
        """Decode GEMM2 with the routing weight: program = (pair or block, 16 * WARPS hidden rows, K split);
        fp32 rows ``y[split, pair]`` for the combine; COLS as in GEMM1.  HAS_B2: the expert's bias
        ``b2_ptr [E, H]`` fp32 added before the routing weight, by the first K split only.

        EARLY: the expert, the rows and the first chunk's weights (without PF, the first ``EARLY`` chunks')
        are read before the PDL wait: the grouping's block map and the routing launch's ids were final before
        GEMM1's programs passed their waits, which is before this kernel can launch.  Those reads bypass L1
        (``.cg``), so that no line an earlier kernel left in this SM's L1 can be read."""
        if EARLY:
            pair_expert = 0
            if not GROUPED:
                pair_expert = tl.load(ids_ptr + tl.program_id(0), cache_modifier=".cg").to(tl.int64)
        else:
            gdc(PDL)
            pair_expert = 0 if GROUPED else tl.load(ids_ptr + tl.program_id(0))
        tid, c, e, pbs, pds = _program(pair_expert, sorted_ptr, bexp_ptr, num_pairs, GROUPED, WARPS,
                                       ".cg" if EARLY else "", COLS)
        if e < 0:
            return
        e64 = e.to(tl.int64)
        KG: tl.constexpr = I // 16
        row, o0, o1, rr0, rr1 = _rows(e64, tid, H, KG, WARPS, H)
        w64 = w_ptr.to(tl.pointer_type(tl.int64))
        wp = (w64 + o0, w64 + o1, s_ptr + o0, s_ptr + o1)
        # GEMM1's output rows are per pair (TOP_K 1 here)
        aps, okbs = _row_ptrs(a_ptr.to(tl.pointer_type(tl.int64)), pbs, num_pairs, I // 4, 1, COLS)
        g_begin = tl.program_id(2) * groups_per_split
        g_end = tl.minimum(g_begin + groups_per_split, KG)
        acc = (tl.zeros([32 * WARPS], dtype=tl.float32),) * (4 * COLS)
        g_loop = g_begin
        if PF:
            wc = _wload(*wp, rr0, rr1, g_begin, c, KG, True, GROUPED, VEC)
            if EARLY:
                gdc(PDL)
            xs = _xloads(aps, g_begin, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
        elif EARLY:
            cw = _wload(*wp, rr0, rr1, g_begin, c, KG, True, GROUPED, VEC)
            if EARLY > 1:  # the second chunk too (nothing past the split's end: its products are zeros)
                cw2 = _wload(*wp, rr0, rr1, g_begin + 8, c, KG, g_begin + 8 < g_end, GROUPED, VEC)
            gdc(PDL)
            cx = _xloads(aps, g_begin, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
            acc = _cols_mma(_chunk_frags(*cw), cx, acc, COLS)
            if EARLY > 1:
                cx = _xloads(aps, g_begin + 8, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
                acc = _cols_mma(_chunk_frags(*cw2), cx, acc, COLS)
            g_loop = g_begin + 8 * EARLY
        for g0 in range(g_loop, g_end, 8):
            if PF:
                cw, cx = wc, xs
                wc = _wload(*wp, rr0, rr1, g0 + 8, c, KG, g0 + 8 < g_end, GROUPED, VEC)
                xs = _xloads(aps, g0 + 8, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
            else:
                cw = _wload(*wp, rr0, rr1, g0, c, KG, True, GROUPED, VEC)
                cx = _xloads(aps, g0, c, g_end, okbs, GROUPED, VEC, XVEC, COLS)
            acc = _cols_mma(_chunk_frags(*cw), cx, acc, COLS)
        inv = 128.0 / tl.load(gs_ptr + e64)
        if HAS_B2:
            first = tl.program_id(2) == 0
            b0 = tl.load(b2_ptr + e64 * H + row, mask=first & (row < H), other=0.0)
            b1 = tl.load(b2_ptr + e64 * H + row + 8, mask=first & (row + 8 < H), other=0.0)
        for j in tl.static_range(COLS):
            for h in tl.static_range(2):
                ok = pds[2 * j + h] < num_pairs
                q = tl.where(ok, pds[2 * j + h], 0).to(tl.int64)
                tw = tl.load(tw_ptr + q, mask=ok, other=0.0)
                sc = tw * inv
                yp = y_ptr + (tl.program_id(2).to(tl.int64) * num_pairs + q) * H + row
                y0 = acc[4 * j + h] * sc
                if HAS_B2:
                    y0 += b0 * tw
                tl.store(yp, y0, mask=ok & (row < H))
                y1 = acc[4 * j + 2 + h] * sc
                if HAS_B2:
                    y1 += b1 * tw
                tl.store(yp + 8, y1, mask=ok & (row + 8 < H))


def _vec_ok(k: int, w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Two adjacent groups of a weight row are one aligned 16-byte load (and their scales one 2-byte load)
    when a row holds an even number of groups and the tensors start aligned."""
    return (k // 16) % 2 == 0 and w.data_ptr() % 16 == 0 and scale.data_ptr() % 2 == 0


def _rows_aligned(x: torch.Tensor) -> bool:
    """Every row of the bf16 activations starts on a 16-byte boundary."""
    return x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0


def _word_aligned(hidden_states: torch.Tensor, weights) -> torch.Tensor:
    """The kernels read activations and weights as 8-byte words: rows of the activations start on 8-byte
    boundaries (at worst one copy, proportional to the tokens); unaligned weights are an error."""
    if hidden_states.stride(0) % 4 or hidden_states.data_ptr() % 8:
        hidden_states = hidden_states.contiguous()
        if hidden_states.data_ptr() % 8:  # a view at an odd offset
            hidden_states = hidden_states.clone()
    for t in weights:
        if t.data_ptr() % 8:
            raise MoEConfigError("the decode kernels need 8-byte aligned weights")
    return hidden_states


def decode_tc(hidden_states, weights, flat_ids, topk_w, counts, y, cfg: DecodeConfig, *, pairs, experts, hidden,
              inter, top_k, gated, activation, k_per_split, pdl=False, one_program=False, activation_params=None,
              w13_bias=None, w2_bias=None):
    """Both decode GEMMs on the tensor cores; ``y [splits, pairs, hidden]`` fp32 gets the weighted rows, GEMM2's
    K split in steps of ``k_per_split`` (a multiple of 128) elements.  ``w13_bias [E, N1]`` / ``w2_bias [E,
    hidden]``: contiguous fp32 expert biases or None.

    ``cfg.grouped``: the pairs first grouped by expert into ``cfg.bm``-row blocks (``8 * cfg.cols``;
    ``counts``: int32 ``[experts]`` zeroed by the routing; ``one_program``: the grouping in one program), else
    one program per pair.
    """
    w13, w13_scale, w13_gs, w2, w2_scale, w2_gs = weights
    device = hidden_states.device
    hidden_states = _word_aligned(hidden_states, (w13, w2))
    inter_buf = torch.empty(pairs, inter, dtype=torch.bfloat16, device=device)
    if cfg.grouped:
        blocks = triton.cdiv(pairs, cfg.bm) + min(pairs, experts)
        sorted_ids, bexp = align(flat_ids, counts, cfg.bm, blocks * cfg.bm, blocks, pdl, one_program=one_program)
    else:  # the kernels take them as unused pointers
        blocks = pairs
        sorted_ids = bexp = flat_ids
    # ks1 > 1: GEMM1 programs of ks1 warps that split one tile's K among themselves (no grid split)
    warps1, split1 = (cfg.ks1, 1) if cfg.ks1 > 1 else (cfg.warps1, cfg.split1)
    per1, split1 = k_split(hidden, split1, DECODE_CHUNK)
    direct = split1 == 1
    part = inter_buf if direct else torch.empty(split1, pairs, w13.shape[1], dtype=torch.float32, device=device)
    act, bias1, bias2 = epilogue_args(activation, activation_params, w13_bias, w2_bias)
    launch(_tgemv1_kernel, (blocks, triton.cdiv(inter, 16 if cfg.ks1 > 1 else 16 * warps1), split1),
           hidden_states, w13, w13_scale.view(torch.uint8), w13_gs, flat_ids, sorted_ids, bexp,
           inter_buf, part, pairs, hidden_states.stride(0) // 4, per1 // 16,
           H=hidden, I=inter, TOP_K=top_k, GATED=gated, GROUPED=cfg.grouped, WARPS=warps1,
           SPLIT=split1, PF=cfg.prefetch, VEC=cfg.vec1 and _vec_ok(hidden, w13, w13_scale),
           XVEC=cfg.vec1 and _rows_aligned(hidden_states), PDL=pdl, KS=cfg.ks1, COLS=cfg.cols, **act,
           **(bias1 if direct else {}), num_warps=warps1, num_stages=1, launch_pdl=pdl)
    early = cfg.early2 if pdl else 0
    if not direct:
        if bias1:
            bias1 = dict(bias1, ids_ptr=flat_ids)
        launch(act_kernel, (pairs, triton.cdiv(inter, 1024)), part, inter_buf, pairs, inter, GATED=gated,
               SPLIT=split1, BLOCK=1024, PDL=pdl, LAUNCH_FIRST=early > 0, **act, **bias1, num_warps=4, launch_pdl=pdl)
    launch(_tgemv2_kernel, (blocks, triton.cdiv(hidden, 16 * cfg.warps2), y.shape[0]),
           inter_buf, w2, w2_scale.view(torch.uint8), w2_gs, flat_ids, sorted_ids, bexp, topk_w, y, pairs,
           k_per_split // 16,
           H=hidden, I=inter, GROUPED=cfg.grouped, WARPS=cfg.warps2, PF=cfg.prefetch,
           VEC=cfg.vec2 and _vec_ok(inter, w2, w2_scale), XVEC=cfg.vec2 and _rows_aligned(inter_buf), PDL=pdl,
           EARLY=early, COLS=cfg.cols, **bias2, num_warps=cfg.warps2, num_stages=1, launch_pdl=pdl)
