"""The tensor-core tiles: GEMM1 with the activation fused and GEMM2 with the routing weight over the pairs
grouped by expert into ``bm``-row blocks (:mod:`triton_group`), for 16 rows per expert and more.

Gate and up tiles are computed in the same program.  The weight tile is dequantized in registers to exact
bf16 ``e2m1 * block_scale`` (times 2^-7: the E2M1 bits re-placed by :mod:`triton_layout` give four packed
bf16 pairs ``e2m1 * 2^-126`` in 11 integer operations, each times ``bf16(block_scale * 2^119)`` with one
bf16x2 FMA) and fed to ``tl.dot`` with fp32 accumulation; with ``wprefetch`` the raw weight words are loaded
one K step ahead (Triton's pipeliner only stages loads that feed a dot directly).  GEMM2 may split K.  An
expert's last few rows past its whole blocks can go to a tail block (``TileConfig.tail``) run by a second
launch of each GEMM with smaller tiles: a program's time follows the weight tiles it dequantizes, so a
128-row block holding 20 rows costs nearly as much as a full one.  Hidden and intermediate sizes need only
be multiples of 16 (the kernels mask K and N edges; ``NARROW`` handles a band's narrower last piece).
"""

from __future__ import annotations

import torch

from moe_passes.errors import MoEConfigError
from moe_passes.kernels import gluon_tiles
from moe_passes.kernels.options import TRITON_INTERPRET
from moe_passes.kernels.triton_common import epilogue_args, tl, triton
from moe_passes.kernels.triton_group import align
from moe_passes.kernels.triton_launch import launch
from moe_passes.kernels.triton_plan import TileConfig

__all__ = ["GRID_Y_MAX", "tile_grid", "gemm1_constexprs", "gemm2_constexprs", "run_tiles"]

GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2

if triton is not None:
    from moe_passes.kernels.triton_common import apply_act, gdc, scale_pairs_asm, word_cut_asm

    # Tensor-core tiles: each pair times ``$9`` = ``bf16(block_scale * 2^119)`` in both halves with one bf16x2
    # FMA (adding -0 leaves the product alone) -> 8 bf16 ``e2m1 * block_scale * 2^-7``, exact.
    _WORD_TO_BF16_ASM = tl.constexpr("{" + word_cut_asm("$8", "p") + scale_pairs_asm("$9") + "}")

    @triton.jit
    def _scale_pair(s):
        """E4M3 block-scale bytes -> int32 holding ``bf16(scale * 2^119)`` in both halves (exact).

        The byte ``s eeee mmm`` placed at fp16 bits 15 / 13..7 reads as ``scale * 2^-8`` (subnormals
        included); times 2^127 it is ``scale * 2^119`` (at most ~2^127.8, inside bf16's range), which
        makes ``e2m1 * 2^-126 * scale * 2^119`` a normal bf16 for every nonzero product.
        """
        s = s.to(tl.int32)
        f = (((s & 0x7F) << 7) | ((s & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        b = (f * 1.7014118346046923e38).to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return b | (b << 16)

    @triton.jit
    def _dequant_words(w, s, BN: tl.constexpr, BK: tl.constexpr):
        """A weight tile in the Triton layout, ``[BN, BK/8]`` words + ``[BN, BK/16]`` E4M3 scale bytes -> bf16
        ``[BN, BK]``.

        Values are ``e2m1 * block_scale * 2^-7`` exactly (the caller folds ``2^7`` into its epilogue).
        """
        sc = _scale_pair(s)
        sc = tl.reshape(tl.broadcast_to(sc[:, :, None], (BN, BK // 16, 2)), (BN, BK // 8))
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _WORD_TO_BF16_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, sc], dtype=(tl.bfloat16,) * 8, is_pure=True,
            pack=1)
        # nested joins put element n of each word at flat position n of the new [2, 2, 2] axes
        t = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
        return tl.reshape(t, (BN, BK))

    @triton.jit
    def _mma(a, b_t, acc, F32: tl.constexpr):
        """``acc + a @ b_t^T`` on the tensor cores (bf16 in, fp32 accumulate); fp32 under the interpreter."""
        if F32:
            return tl.dot(a.to(tl.float32), tl.trans(b_t.to(tl.float32)), acc, input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(b_t), acc)

    @triton.jit
    def _dequant_mma(w, s, x, acc, BN: tl.constexpr, BK: tl.constexpr, SWAP: tl.constexpr, F32: tl.constexpr):
        """Dequantize a raw weight tile and accumulate its product with the activations ``x [BM, BK]``:
        ``acc [BM, BN] + x @ W^T``, or with SWAP (weights as the register operand) ``acc [BN, BM] + W @ x^T``."""
        wt = _dequant_words(w, s, BN, BK)
        if SWAP:
            return _mma(wt, x, acc, F32)
        else:
            return _mma(x, wt, acc, F32)


    @triton.jit
    def _block(bexp_ptr, sorted_ptr, num_pairs, BM: tl.constexpr, NFIRST: tl.constexpr):
        """This program's row block of the expert-grouped pairs and its column tile (grid axes 0 and 1, or 1
        and 0 when NFIRST): ``(expert or -1, rows, pair per row, row holds a pair, column tile)``."""
        pid_m = tl.program_id(1 if NFIRST else 0)
        e = tl.load(bexp_ptr + pid_m)
        rows = pid_m * BM + tl.arange(0, BM)
        pair = tl.load(sorted_ptr + rows)
        return e, rows, pair, pair < num_pairs, tl.program_id(0 if NFIRST else 1)

    @triton.jit
    def _wptrs(w_ptr, s_ptr, row, KW, KS, BK: tl.constexpr):
        """Pointers to the first K step's weight words ``[BN, BK/8]`` and scale bytes ``[BN, BK/16]`` of
        weight rows ``row`` (banded layout, ``triton_layout``: a K step is whole 64-element pieces, whose 16
        rows are contiguous), and each row's place in its band."""
        rr = row % 16
        band = row - rr
        kj = tl.arange(0, BK // 8)
        gj = tl.arange(0, BK // 16)
        w = (w_ptr.to(tl.pointer_type(tl.int32)) + (band * KW + rr * 8)[:, None]
             + ((kj // 8) * 128 + kj % 8)[None, :])
        s = s_ptr + (band * KS + rr * 4)[:, None] + ((gj // 4) * 64 + gj % 4)[None, :]
        return w, s, rr

    @triton.jit
    def _wload(w_ptrs, s_ptrs, rr, step, k_words, k_groups, n_ok, BK: tl.constexpr, NARROW: tl.constexpr):
        """Raw weight words ``[BN, BK/8]`` and scale bytes ``[BN, BK/16]`` of K step ``step`` (masked at the K
        end, ``k_words``/``k_groups`` counted from step 0).  NARROW: the rows' groups are not a multiple of 4,
        so their last piece is narrower and its rows sit closer together; the correction costs 2-26% of a
        prefill call, so rows of whole pieces (hidden and intermediate multiples of 64) go without."""
        kj = tl.arange(0, BK // 8)
        gj = tl.arange(0, BK // 16)
        w_ok = n_ok[:, None] & ((step * (BK // 8) + kj) < k_words)[None, :]
        s_ok = n_ok[:, None] & ((step * (BK // 16) + gj) < k_groups)[None, :]
        w_at = w_ptrs + step * (2 * BK)
        s_at = s_ptrs + step * BK
        if NARROW:
            full = k_groups // 4
            narrow = (rr * (k_groups - full * 4 - 4))[:, None]  # < 0
            piece = step * (BK // 64)
            w_at += tl.where((piece + kj // 8)[None, :] == full, 2 * narrow, 0)
            s_at += tl.where((piece + gj // 4)[None, :] == full, narrow, 0)
        return tl.load(w_at, mask=w_ok, other=0), tl.load(s_at, mask=s_ok, other=0)

    @triton.jit
    def _gemm1_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, bexp_ptr, out_ptr,
                      num_pairs, H, I, stride_x,
                      TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
                      SWAP: tl.constexpr, PF: tl.constexpr = False, PDL: tl.constexpr = False,
                      NFIRST: tl.constexpr = False, NARROW: tl.constexpr = False, b13_ptr=None,
                      HAS_B1: tl.constexpr = False, ALPHA: tl.constexpr = 1.702, BETA: tl.constexpr = 1.0,
                      LIMIT: tl.constexpr = 7.0):
        """GEMM1 + activation on tensor cores: one program per (row block of one expert, BN columns).

        SWAP computes (W X^T): the dequantized weights are then the register operand of the MMA.  PF loads
        the next K step's weight words and scales into registers before this step's math: Triton's
        pipeliner only stages loads that feed a dot directly, and these feed the dequantization.  HAS_B1:
        the expert's biases ``b13_ptr [E, N1]`` fp32 before the activation; ALPHA/BETA/LIMIT: swiglu_oai's.
        """
        gdc(PDL)
        e, rows, pair, valid, pid_n = _block(bexp_ptr, sorted_ptr, num_pairs, BM, NFIRST)
        if e < 0:
            return
        e64 = e.to(tl.int64)
        tok = (pair // TOP_K).to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < I
        KW = H // 8
        KS = H // 16
        N1 = 2 * I if GATED else I
        row_g = e64 * N1 + offs_n
        wg_ptrs, sg_ptrs, rr = _wptrs(w_ptr, s_ptr, row_g, KW, KS, BK)
        wu_ptrs = wg_ptrs + I * KW
        su_ptrs = sg_ptrs + I * KS
        x_ptrs = x_ptr + tok[:, None] * stride_x + tl.arange(0, BK)[None, :]
        if SWAP:
            acc_g = tl.zeros([BN, BM], dtype=tl.float32)
            acc_u = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc_g = tl.zeros([BM, BN], dtype=tl.float32)
            acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        if PF:  # the next K step's raw weight tiles, already in registers
            wg_n, sg_n = _wload(wg_ptrs, sg_ptrs, rr, 0, KW, KS, n_ok, BK, NARROW)
            if GATED:
                wu_n, su_n = _wload(wu_ptrs, su_ptrs, rr, 0, KW, KS, n_ok, BK, NARROW)
        for step in range(0, tl.cdiv(H, BK)):
            k_ok = (step * BK + tl.arange(0, BK)) < H
            x = tl.load(x_ptrs + step * BK, mask=valid[:, None] & k_ok[None, :], other=0.0)
            if PF:
                wg_c, sg_c = wg_n, sg_n
                wg_n, sg_n = _wload(wg_ptrs, sg_ptrs, rr, step + 1, KW, KS, n_ok, BK, NARROW)
                if GATED:
                    wu_c, su_c = wu_n, su_n
                    wu_n, su_n = _wload(wu_ptrs, su_ptrs, rr, step + 1, KW, KS, n_ok, BK, NARROW)
            else:
                wg_c, sg_c = _wload(wg_ptrs, sg_ptrs, rr, step, KW, KS, n_ok, BK, NARROW)
                if GATED:
                    wu_c, su_c = _wload(wu_ptrs, su_ptrs, rr, step, KW, KS, n_ok, BK, NARROW)
            acc_g = _dequant_mma(wg_c, sg_c, x, acc_g, BN, BK, SWAP, F32)
            if GATED:
                acc_u = _dequant_mma(wu_c, su_c, x, acc_u, BN, BK, SWAP, F32)
        inv = 128.0 / tl.load(gs_ptr + e)  # 2^7: the dequantized tiles carry 2^-7
        g = acc_g * inv
        u = acc_u * inv
        if HAS_B1:  # one bias per column (weight row), along axis 0 of the swapped tile
            bp = b13_ptr + e64 * N1 + offs_n
            bg = tl.load(bp, mask=n_ok, other=0.0)
            g += bg[:, None] if SWAP else bg[None, :]
            if GATED:
                bu = tl.load(bp + I, mask=n_ok, other=0.0)
                u += bu[:, None] if SWAP else bu[None, :]
        if SWAP:
            h = tl.trans(apply_act(g, u, ACT, ALPHA, BETA, LIMIT))
        else:
            h = apply_act(g, u, ACT, ALPHA, BETA, LIMIT)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(out_ptrs, h.to(tl.bfloat16), mask=n_ok[None, :])

    @triton.jit
    def _gemm2_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, bexp_ptr, tw_ptr, y_ptr,
                      num_pairs, H, I, k_per_split,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
                      SWAP: tl.constexpr, PF: tl.constexpr = False, PDL: tl.constexpr = False,
                      NFIRST: tl.constexpr = False, NARROW: tl.constexpr = False, b2_ptr=None,
                      HAS_B2: tl.constexpr = False):
        """GEMM2 on tensor cores, routing weight in the epilogue, rows per (pair, K split) in ``y``'s dtype (fp32,
        or bf16 where nothing splits K: see ``fused_moe_triton``); PF as in GEMM1.
        HAS_B2: the expert's bias ``b2_ptr [E, H]`` fp32 added before the routing weight, by K split 0 only."""
        gdc(PDL)
        e, rows, pair, valid, pid_n = _block(bexp_ptr, sorted_ptr, num_pairs, BM, NFIRST)
        if e < 0:
            return
        pid_s = tl.program_id(2)
        e64 = e.to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < H
        k_begin = pid_s * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, I)
        row_w = e64 * H + offs_n
        # pointers start at this split's first K element; the bounds below are relative to it
        w_ptrs, s_ptrs, rr = _wptrs(w_ptr, s_ptr, row_w, I // 8, I // 16, BK)
        # a split starts at a whole piece (k_per_split is a multiple of BK): k_begin / 64 pieces of 16 rows
        w_ptrs += k_begin * 2
        s_ptrs += k_begin
        a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * I + (k_begin + tl.arange(0, BK))[None, :]
        kw = (k_end - k_begin) // 8
        ks = (k_end - k_begin) // 16
        if SWAP:
            acc = tl.zeros([BN, BM], dtype=tl.float32)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PF:
            w_n, s_n = _wload(w_ptrs, s_ptrs, rr, 0, kw, ks, n_ok, BK, NARROW)
        for step in range(0, tl.cdiv(k_end - k_begin, BK)):
            k_ok = (k_begin + step * BK + tl.arange(0, BK)) < k_end
            a = tl.load(a_ptrs + step * BK, mask=k_ok[None, :], other=0.0)
            if PF:
                w_c, s_c = w_n, s_n
                w_n, s_n = _wload(w_ptrs, s_ptrs, rr, step + 1, kw, ks, n_ok, BK, NARROW)
            else:
                w_c, s_c = _wload(w_ptrs, s_ptrs, rr, step, kw, ks, n_ok, BK, NARROW)
            acc = _dequant_mma(w_c, s_c, a, acc, BN, BK, SWAP, F32)
        if SWAP:
            acc = tl.trans(acc)
        tw = tl.load(tw_ptr + pair, mask=valid, other=0.0)
        scale = tw * 128.0 / tl.load(gs_ptr + e)
        y = acc * scale[:, None]
        if HAS_B2:
            b = tl.load(b2_ptr + e64 * H + offs_n, mask=n_ok & (pid_s == 0), other=0.0)
            y += b[None, :] * tw[:, None]
        y_ptrs = y_ptr + (pid_s * num_pairs + pair).to(tl.int64)[:, None] * H + offs_n[None, :]
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


def tile_grid(cfg: TileConfig, blocks: int, tiles: int, *rest: int):
    """``(grid, nfirst)`` of a tile launch: column tiles first (grid axis 0) when the config asks and the row
    blocks fit grid axis 1, so that the programs running together share their activation rows in L2."""
    nfirst = cfg.nfirst and blocks <= GRID_Y_MAX
    return ((tiles, blocks, *rest) if nfirst else (blocks, tiles, *rest)), nfirst


def gemm1_constexprs(c: TileConfig, *, top_k: int, gated: bool, hidden: int, pdl: bool, nfirst: bool,
                     act: dict) -> dict:
    """GEMM1's compile-time arguments for tile config ``c`` (``act``: ``epilogue_args``' activation keywords)."""
    return dict(TOP_K=top_k, GATED=gated, BM=c.bm, BN=c.bn1, BK=c.bk1, F32=TRITON_INTERPRET, SWAP=c.swap,
                PF=c.wprefetch, PDL=pdl, NFIRST=nfirst, NARROW=hidden % 64 != 0, **act)


def gemm2_constexprs(c: TileConfig, *, inter: int, pdl: bool, nfirst: bool) -> dict:
    """GEMM2's compile-time arguments for tile config ``c``."""
    return dict(BM=c.bm, BN=c.bn2, BK=c.bk2, F32=TRITON_INTERPRET, SWAP=c.swap, PF=c.wprefetch, PDL=pdl,
                NFIRST=nfirst, NARROW=inter % 64 != 0)


def run_tiles(hidden_states, weights, flat_ids, topk_w, counts, y, cfg: TileConfig, *, pairs, experts, hidden,
              inter, top_k, gated, activation, k_per_split, pdl=False, one_program=False, activation_params=None,
              w13_bias=None, w2_bias=None):
    """Group the pairs into ``cfg.bm``-row blocks (and tail blocks), then GEMM1 and GEMM2 over them, each once
    per block size; ``y [splits, pairs, hidden]`` fp32 gets the weighted rows, GEMM2's K split in steps of
    ``k_per_split`` elements.  ``counts``: int32 ``[experts]``, zeroed by the routing.  ``w13_bias [E, N1]`` /
    ``w2_bias [E, hidden]``: contiguous fp32 expert biases or None.  ``pdl``: programmatic dependent launch may
    be used (the launches chained where ``cfg.chains``; ``cfg.overlap`` needs it too)."""
    overlap = pdl and cfg.overlap
    pdl = pdl and cfg.chains
    if cfg.wgmma and (y.shape[0] != 1
                      or not gluon_tiles.takes(hidden, inter, w13_bias is not None or w2_bias is not None)):
        raise MoEConfigError(f"TileConfig wgmma: hidden ({hidden}) and intermediate ({inter}) sizes must be multiples "
                             f"of 64, GEMM2 unsplit ({y.shape[0]} K splits), no expert biases and Gluon importable "
                             f"({gluon_tiles.AVAILABLE})")
    w13, w13_scale, w13_gs, w2, w2_scale, w2_gs = weights
    bm = cfg.bm
    max_blocks = triton.cdiv(pairs, bm) + min(pairs, experts)
    main_rows = max_blocks * bm
    max_tails = min(pairs, experts) if cfg.tail else 0
    max_rows = main_rows + max_tails * cfg.tail
    sorted_ids, bexp = align(flat_ids, counts, bm, max_rows, max_blocks, pdl, cfg.tail, max_tails,
                             one_program=one_program)
    inter_buf = torch.empty(max_rows, inter, dtype=torch.bfloat16, device=hidden_states.device)
    act, bias1, bias2 = epilogue_args(activation, activation_params, w13_bias, w2_bias)
    # (tile config, its blocks' rows in sorted_ids / inter_buf, their expert map, block count)
    launches = [(cfg, sorted_ids, inter_buf, bexp[:max_blocks], max_blocks)]
    if cfg.tail:
        launches.append((cfg.tail_tiles(), sorted_ids[main_rows:], inter_buf[main_rows:], bexp[max_blocks:],
                         max_tails))
    if cfg.wgmma:
        return gluon_tiles.run_wgmma_tiles(launch, launches, hidden_states, weights, topk_w, y,
                                           pairs=pairs, hidden=hidden, inter=inter, top_k=top_k, gated=gated, act=act,
                                           pdl=pdl, overlap=overlap)
    for c, rows_ids, rows_inter, block_map, nblocks in launches:
        grid1, nfirst = tile_grid(c, nblocks, triton.cdiv(inter, c.bn1))
        launch(_gemm1_kernel, grid1, hidden_states, w13, w13_scale.view(torch.uint8), w13_gs, rows_ids, block_map,
               rows_inter, pairs, hidden, inter, hidden_states.stride(0),
               **gemm1_constexprs(c, top_k=top_k, gated=gated, hidden=hidden, pdl=pdl, nfirst=nfirst, act=act),
               **bias1, num_warps=c.warps1, num_stages=c.stages1, launch_pdl=pdl)
    for c, rows_ids, rows_inter, block_map, nblocks in launches:
        grid2, nfirst = tile_grid(c, nblocks, triton.cdiv(hidden, c.bn2), y.shape[0])
        launch(_gemm2_kernel, grid2, rows_inter, w2, w2_scale.view(torch.uint8), w2_gs, rows_ids, block_map, topk_w,
               y, pairs, hidden, inter, k_per_split,
               **gemm2_constexprs(c, inter=inter, pdl=pdl, nfirst=nfirst),
               **bias2, num_warps=c.warps2, num_stages=c.stages2, launch_pdl=pdl)
