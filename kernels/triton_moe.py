"""Hopper fast path: a Triton fused MoE for NVFP4 weights and bf16 activations.

What one call does (all on the GPU, no host synchronisation, CUDA-graph capturable):

1. routing: one Triton launch (:func:`_route_kernel`, the semantics of ``reference.route``) gives
   ``topk_weights / topk_ids [T, k]`` (``TileConfig.fused_route``, not selected, lets the per-pair decode's
   GEMM1 programs route their token themselves instead, :func:`_pair_expert`);
2. decode (up to ~1-2 pairs per touched expert, and 16-64 tokens with up to 8): :mod:`triton_tc_decode`
   runs the GEMVs on the tensor cores (inline ``mma.sync`` on the decoded registers), one program per pair
   or per 8-token expert block.  The packed decode here (:func:`_qgemv1_kernel` with the activation fused,
   :func:`_qgemv2_kernel` with the routing weight: CUDA-core dot products, each thread owning two 16-element
   groups of its rows per K step, the E2M1 codes made fp32 by a short PTX cut, each group's partial sum
   times its E4M3 scale) is not selected by :func:`select_config` (the banded weights scatter its row-wise
   loads); it stays a ``TileConfig`` option (``bm == 1``, ``tc`` False), see the known gaps in architecture.md;
3. otherwise the (token, expert) pairs are bucketed by expert into blocks of ``BM`` rows (three short
   launches: atomic ranks, block map, scatter) and two tensor-core kernels run: GEMM1 with the activation
   fused (gate and up tiles in the same program) and GEMM2 with the routing weight, optionally split along
   K.  An expert's last few rows past its whole blocks can go to a tail block instead (``TileConfig.tail``),
   run by a second launch of each GEMM with smaller tiles: a program's time follows the weight tiles it
   dequantizes, so a 128-row block holding 20 rows costs nearly as much as a full one.  The weight tile is
   dequantized in registers to exact bf16 ``e2m1 * block_scale`` (times 2^-7) and fed to ``tl.dot`` with
   fp32 accumulation; the raw weight words are loaded one K step ahead (Triton's pipeliner only stages loads
   that feed a dot directly);
4. combine: one small kernel sums each token's ``k`` (times splits) fp32 rows and writes bf16.

Weights are laid out once, at preparation (:func:`prepare_weights`, the registry's ``prepare``): the E2M1
bits of every 32-bit word are re-placed (:mod:`triton_layout`) so that 11 integer operations turn 8 codes
into four packed bf16 pairs ``e2m1 * 2^-126``, and codes and block scales are stored in 16-row bands of
64-element pieces, so that a warp's load of several rows' K step is one contiguous run.  Tiles multiply
each pair by ``bf16(block_scale * 2^119)`` with one bf16x2 FMA; the packed decode widens the pairs to fp32
and multiplies activations by 2^64 so that the products of the fp32-subnormal 0.5 stay normal.  Shapes and
dtypes are the canonical ones; nothing proportional to the weights is allocated or copied per call, and the
per-call workspace grows with the tokens.  Hidden and intermediate sizes need only be multiples of 16 (the
kernels mask K and N edges).

Numerics match ``fused_moe_reference(..., quantize_activations=False)``: bf16 activations, weights
dequantized exactly, fp32 accumulation, the intermediate rounded to bf16, fp32 combine, bf16 out.  The
decode's 2^64 activation scaling limits its range to |activation| < 2^64 (larger values overflow to inf,
visibly) and loses precision for products under ~2^-62 (activations below ~1e-19).

Triton is imported behind a guard: this module imports (and registers an unavailable kernel) on a
CPU-only machine without Triton.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from moe_passes.contract import ACTIVATIONS, ROUTING_METHODS, Alignment, MoEShape, is_gated
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.triton_layout import to_band_layout, to_triton_layout

from moe_passes.kernels.triton_common import _ACT_CODES, _next_pow2, gdc_wait, tl, triton
from moe_passes.kernels.triton_route import _route, _route_args, _route_spec
from moe_passes.kernels.triton_tc_decode import decode_tc

__all__ = ["TRITON_ALIGNMENT", "TileConfig", "fused_moe_triton", "prepare_weights", "select_config",
           "triton_available"]

TRITON_ALIGNMENT = Alignment(hidden=16, intermediate_gated=16, intermediate_plain=16)

# The Triton interpreter (TRITON_INTERPRET=1, CPU) mishandles bf16 dots: upcast the operands there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_GRID_Y_MAX = 65535  # CUDA's limit on grid axes 1 and 2
# Programmatic dependent launch between the kernels of one call (SM90+, decode and 16-row tiles): each
# kernel's programs are launched while the previous kernel drains and wait for it in-kernel, which hides
# the launch gaps.  MOE_NVFP4_PDL=0 turns it off (for A/B measurements and as an escape hatch).
PDL = os.environ.get("MOE_NVFP4_PDL", "1") != "0"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile shapes of one call.  ``bm`` is shared by both GEMMs (the row blocks come from one grouping)."""

    bm: int
    bn1: int
    bk1: int
    warps1: int
    stages1: int
    bn2: int
    bk2: int
    warps2: int
    stages2: int
    split2: int = 1
    swap: bool = False  # tensor-core path: weights as the (register) A operand, tokens as N
    split1: int = 1  # decode path: split of GEMM1's reduction (then a separate activation kernel)
    # decode path (bm == 1): the packed-decode GEMV kernels (``bn1``/``bn2`` rows per program, ``warps``
    # warps of 32 threads, each thread two 16-element groups per K step: ``bk`` and ``stages`` are unused)
    prefetch: bool = False  # packed-decode kernels: issue the next K step's loads before the current math
    wprefetch: bool = False  # tensor-core path: weight words loaded one K step ahead of their use
    # decode on the tensor cores (:mod:`triton_tc_decode`): ``bm`` 1 = one program per pair, 8 = pairs grouped
    # by expert into 8-token blocks; ``warps1``/``warps2`` warps of 16 rows each, ``split1``/``split2`` K splits
    tc: bool = False
    # tensor-core decode: GEMM1's / GEMM2's weights, scales and activations loaded two groups (16 bytes) per
    # thread and request where the sizes and addresses allow it (``triton_tc_decode._vec_ok``)
    vec1: bool = False
    vec2: bool = False
    # one program per pair (``bm == 1``): GEMM1's programs route their own tokens, no routing launch
    fused_route: bool = False
    # decode paths (with PDL): GEMM2 loads its first K step's weights (tensor-core decode without prefetch:
    # its first ``early2`` chunks') before waiting on GEMM1, and a split GEMM1's activation kernel lets it
    # launch before its own wait; 0: off
    early2: int = 0
    # grouped tile path (``_gemm1_kernel``/``_gemm2_kernel``): the grid's axis 0 is the column tiles, so the
    # programs resident together are all column tiles of a few row blocks (their activation rows read from
    # DRAM once, then from L2) rather than one column tile of hundreds of row blocks
    nfirst: bool = False
    # tensor-core decode per pair: GEMM1 programs of ``ks1`` warps sharing one 16-row tile and splitting its K
    # (the sums meet in shared memory, the activation is applied in the program: no activation launch);
    # ``warps1`` and ``split1`` are then unused; 1: off
    ks1: int = 1
    # grouped tile path: an expert's last rows, when there are at most ``tail`` of them past its whole ``bm``-row
    # blocks, go to a block of ``tail`` rows run by a second launch of smaller tiles (:func:`_tail_config`)
    # instead of a ``bm``-row block that would be mostly padding: a program's time follows the weight tiles it
    # dequantizes and its MMA rows, not the rows it holds.  0: off
    tail: int = 0


def triton_available(device=None) -> bool:
    """CUDA device of compute capability >= 8.0 (bf16 tensor cores) and Triton importable."""
    if triton is None or not torch.cuda.is_available():
        return False
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _use_pdl(device) -> bool:
    device = torch.device(device)
    return (PDL and gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":  # the Triton interpreter runs on CPU tensors
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tc_split(blocks: int, rows: int, k: int, target: int) -> int:
    """K split of a tensor-core decode GEMM: doubled until ``target`` warps (16-row tiles x splits) are
    launched, at most 8 and keeping at least two 128-element chunks per split."""
    tiles = blocks * -(-rows // 16)
    split = 1
    while split < 8 and tiles * split < target and k // (256 * split) >= 2:
        split *= 2
    return split


def _tc_config(blocks: int, hidden: int, inter: int, grouped: bool, target: int, vec1: bool) -> TileConfig:
    """The tensor-core decode (:mod:`triton_tc_decode`): one warp per 16-row tile.  The register prefetch
    pays on the grouped blocks only (per-pair programs were slower with it); GEMM2 always takes 16-byte loads,
    GEMM1 as the caller chooses; GEMM2 loads its first chunk of weights before its PDL wait (``early2``), never
    slower on either decode."""
    return TileConfig(bm=8 if grouped else 1, bn1=16, bk1=0, warps1=1, stages1=1, bn2=16, bk2=0, warps2=1,
                      stages2=1, split1=_tc_split(blocks, inter, hidden, target),
                      split2=_tc_split(blocks, hidden, inter, target), tc=True, prefetch=grouped, vec1=vec1,
                      vec2=True, early2=1)


def _check_config(cfg: TileConfig) -> None:
    """A caller's tile config must step K in whole 64-element pieces: the tiles address the banded weights
    (:mod:`triton_layout`) a piece at a time, and any other step would read the wrong bytes.  ``ks1`` exists
    only where its kernel does."""
    if not cfg.tc and cfg.bm > 1 and (cfg.bk1 % 64 or cfg.bk2 % 64 or cfg.bk1 <= 0 or cfg.bk2 <= 0):
        raise MoEConfigError(f"TileConfig bk1={cfg.bk1}, bk2={cfg.bk2}: the tensor-core tiles need K steps that "
                             "are positive multiples of 64 (one piece of the banded weight layout)")
    if cfg.ks1 != 1 and not (cfg.tc and cfg.bm == 1 and not cfg.prefetch and cfg.ks1 in (2, 4, 8, 16)):
        raise MoEConfigError(f"TileConfig ks1={cfg.ks1}: GEMM1's in-program K split is a power of two up to 16 "
                             "warps, for the per-pair tensor-core decode (tc, bm=1) without prefetch")
    if cfg.tail and not (not cfg.tc and cfg.bm >= 64 and cfg.tail in (16, 32, 64) and cfg.tail < cfg.bm
                         and cfg.split2 == 1):
        raise MoEConfigError(f"TileConfig tail={cfg.tail}: tail blocks of 16, 32 or 64 rows, fewer than bm, go "
                             f"with the grouped tiles of 64 rows or more and no GEMM2 K split (got bm={cfg.bm}, "
                             f"tc={cfg.tc}, split2={cfg.split2})")


# Column tiles and K steps of the 16-row tiles (weights as the MMA's A operand) and of the 64-row tiles, shared
# by select_config and the tail blocks' tiles (_tail_config)
_SWAPPED_TILES = dict(bn1=64, bk1=128, bn2=64, bk2=128, swap=True)
_TILES_64 = dict(bn1=128, bk1=64, bn2=128, bk2=64, swap=False)


def _tail_config(cfg: TileConfig) -> TileConfig:
    """The tiles of the tail blocks: the 16-row tiles' shapes for tails of 16 or 32 rows, the 64-row tiles'
    for 64; warps, stages, prefetch and grid order as the main blocks'."""
    if cfg.tail <= 32:
        return dataclasses.replace(cfg, bm=cfg.tail, tail=0, **_SWAPPED_TILES)
    return dataclasses.replace(cfg, bm=64, tail=0, **_TILES_64)


def select_config(tokens: int, top_k: int, experts: int, hidden: int, inter: int, gated: bool,
                  sm_count: int = 132) -> TileConfig:
    """Tile shapes by regime: decode (few rows per expert) is weight-bandwidth bound, prefill compute bound."""
    pairs = tokens * top_k
    # expected experts hit by `tokens` random top-k choices, and rows (pairs) per hit expert
    touched = experts * (1.0 - (1.0 - top_k / experts) ** tokens)
    rows_per_expert = pairs / max(1.0, touched)
    # Ungated (ReLU^2) layers leave the per-pair decode earlier: their 16-row tiles win sooner.
    shared_limit = 2.0 if gated else 1.3
    if 16 <= tokens <= 64 and rows_per_expert <= 8:
        # Tensor-core decode, pairs grouped by expert into 8-token blocks (one weight pass per expert): faster
        # than the 16-row tiles here, slower from 128 tokens (two blocks per expert).
        return _tc_config(min(pairs, experts), hidden, inter, grouped=True, target=8 * sm_count, vec1=True)
    if rows_per_expert <= 1.15 or (tokens <= 16 and rows_per_expert <= shared_limit):
        # Tensor-core decode, one program per pair; the routing keeps its own launch (routing inside GEMM1's
        # programs was slower at one token).
        cfg = _tc_config(pairs, hidden, inter, grouped=False, target=16 * sm_count, vec1=True)
        if hidden > 4096 and tokens <= 4:
            # GEMM1's K split among the warps of one program (``ks1``: no partial sums in memory, no activation
            # launch) where hidden is long; on the small layers it was equal or slower.
            cfg = dataclasses.replace(cfg, ks1=8 if tokens == 1 else 4, split1=1)
        return cfg
    if rows_per_expert <= 16:
        # 16-row blocks with the weights as the MMA's A operand (swap) and their words loaded one K step
        # ahead (faster than either alone at 32-128 tokens; every 32-row variant was slower).
        bm = 16
        touched = min(experts, pairs)
        tiles2 = touched * ((hidden + 63) // 64)
        split2 = 1
        while split2 < 4 and tiles2 * split2 < 2 * sm_count and inter // (split2 * 2) >= 256:
            split2 *= 2
        return TileConfig(bm=bm, warps1=4, stages1=3, warps2=4, stages2=3, split2=split2, wprefetch=True,
                          nfirst=True, **_SWAPPED_TILES)
    # Prefill: one warpgroup per program, weight words loaded one K step ahead (``wprefetch``), column tiles
    # first in the grid (``nfirst``: programs running together share activation rows in L2); 64-row blocks up
    # to 96 rows per expert, 128-row blocks above.  An expert's last few rows go to tail blocks of smaller tiles
    # (a program costs nearly as much with a quarter of its rows as with all of them): 16 rows behind 64-row
    # blocks, 32 behind 128-row blocks, 64 on long hidden sizes, where 32-row tails (swapped tiles) are slower.
    # The regimes and the runs that chose them: docs/architecture.md, "Dispatch".
    if rows_per_expert <= 96:
        return TileConfig(bm=64, warps1=4, stages1=3, warps2=4, stages2=3, wprefetch=True, nfirst=True, tail=16,
                          **_TILES_64)
    return TileConfig(bm=128, bn1=64 if gated else 128, bk1=64, warps1=4, stages1=3,
                      bn2=128, bk2=64, warps2=4, stages2=3, wprefetch=True, nfirst=True,
                      tail=64 if hidden > 4096 else 32)


if triton is not None:
    from moe_passes.kernels.triton_common import _act_kernel, _activation, _band_off, _gdc, word_cut_asm
    from moe_passes.kernels.triton_route import _pair_expert

    # Tensor-core tiles: each pair times ``$9`` = ``bf16(block_scale * 2^119)`` in both halves with one bf16x2
    # FMA (adding -0 leaves the product alone) -> 8 bf16 ``e2m1 * block_scale * 2^-7``, exact.
    _WORD_TO_BF16_ASM = tl.constexpr("{" + word_cut_asm("$8", "p") + """
    .reg .b32 z;
    mov.b32 z, 0x80008000;
    fma.rn.bf16x2 p0, p0, $9, z;
    fma.rn.bf16x2 p1, p1, $9, z;
    fma.rn.bf16x2 p2, p2, $9, z;
    fma.rn.bf16x2 p3, p3, $9, z;
    mov.b32 {$0, $1}, p0;
    mov.b32 {$2, $3}, p1;
    mov.b32 {$4, $5}, p2;
    mov.b32 {$6, $7}, p3;
    }""")
    # CUDA-core decode: the pairs widened to 8 fp32 ``e2m1 * 2^-126`` (a bf16 in the high half of a word is
    # that fp32; 0.5 becomes an fp32 subnormal, which the FMAs keep: no flush-to-zero in this code).
    _WORD_TO_F32_ASM = tl.constexpr("{" + word_cut_asm("$8", "p") + """
    shl.b32 $0, p0, 16;
    and.b32 $1, p0, 0xFFFF0000;
    shl.b32 $2, p1, 16;
    and.b32 $3, p1, 0xFFFF0000;
    shl.b32 $4, p2, 16;
    and.b32 $5, p2, 0xFFFF0000;
    shl.b32 $6, p3, 16;
    and.b32 $7, p3, 0xFFFF0000;
    }""")

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
    def _rank_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, num_pairs, max_rows, BLOCK: tl.constexpr,
                     PDL: tl.constexpr = False):
        """Grouping, step 1: each pair's rank among its expert's pairs (an atomic count, so the order inside
        one expert is arbitrary; every row of a tile, and of a tail tile, is computed alike, so no result
        depends on it) and the padding sentinel in every grouped row."""
        _gdc(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(sorted_ptr + offs, tl.zeros([BLOCK], dtype=tl.int32) + num_pairs, mask=offs < max_rows)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        rank = tl.atomic_add(counts_ptr + ids, 1, mask=ok, sem="relaxed")
        tl.store(rank_ptr + offs, rank, mask=ok)

    @triton.jit
    def _starts_kernel(counts_ptr, starts_ptr, bexp_ptr, tidx_ptr, texp_ptr, max_blocks, max_tails,
                       E: tl.constexpr, EP: tl.constexpr, BM: tl.constexpr, CF: tl.constexpr, BT: tl.constexpr = 0,
                       PDL: tl.constexpr = False):
        """Grouping, step 2 (one program): each expert's first row (its rows padded to whole BM-row blocks)
        and the expert of every block (-1 past the last used one).  With tail blocks (``BT`` > 0) an expert's
        last rows, when at most ``BT`` remain past its whole blocks, get a tail block instead: its index among
        the tails and the expert of every tail block likewise."""
        _gdc(PDL)
        e_idx = tl.arange(0, EP)
        counts = tl.load(counts_ptr + e_idx, mask=e_idx < E, other=0)
        padded = _main_rows(counts, BM, BT)
        ends = tl.cumsum(padded, axis=0)
        tl.store(starts_ptr + e_idx, ends - padded, mask=e_idx < E)
        _block_experts(ends, bexp_ptr, max_blocks, BM, E, CF)
        if BT > 0:
            tails = (counts > padded).to(tl.int32)
            tends = tl.cumsum(tails, axis=0)
            tl.store(tidx_ptr + e_idx, tends - tails, mask=e_idx < E)
            _block_experts(tends, texp_ptr, max_tails, 1, E, CF)

    @triton.jit
    def _block_experts(ends, bexp_ptr, n_blocks, UNIT: tl.constexpr, E: tl.constexpr, CF: tl.constexpr):
        """The expert of each of ``n_blocks`` blocks of ``UNIT`` rows, given the experts' running row ends
        (-1 past the last expert's), ``CF`` blocks at a time."""
        for b0 in range(0, n_blocks, CF):
            blk = b0 + tl.arange(0, CF)
            ex = tl.sum((ends[None, :] <= (blk * UNIT)[:, None]).to(tl.int32), axis=1)
            ex = tl.where(ex >= E, -1, ex)
            tl.store(bexp_ptr + blk, ex, mask=blk < n_blocks)

    @triton.jit
    def _main_rows(counts, BM: tl.constexpr, BT: tl.constexpr):
        """Rows of an expert's ``BM``-row blocks: all its rows rounded up to whole blocks, except a last
        ``BT`` rows or fewer, which go to a tail block."""
        full = counts // BM * BM
        if BT > 0:
            return tl.where(counts - full > BT, full + BM, full)
        else:
            return tl.where(counts > full, full + BM, full)

    @triton.jit
    def _scatter_kernel(ids_ptr, rank_ptr, starts_ptr, counts_ptr, tidx_ptr, sorted_ptr, num_pairs, tail0,
                        BLOCK: tl.constexpr, BM: tl.constexpr = 1, BT: tl.constexpr = 0, PDL: tl.constexpr = False):
        """Grouping, step 3: every pair into its row, ``start of its expert + rank``, or with tail blocks, past
        the expert's main rows, ``tail0 + BT * its tail's index + rank past the main rows``."""
        _gdc(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        rank = tl.load(rank_ptr + offs, mask=ok, other=0)
        row = tl.load(starts_ptr + ids, mask=ok, other=0) + rank
        if BT > 0:
            main = _main_rows(tl.load(counts_ptr + ids, mask=ok, other=0), BM, BT)
            t_row = tail0 + tl.load(tidx_ptr + ids, mask=ok, other=0) * BT + rank - main
            row = tl.where(rank >= main, t_row, row)
        tl.store(sorted_ptr + row, offs, mask=ok)

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _group_kernel(ids_ptr, counts_ptr, starts_ptr, sorted_ptr, bexp_ptr, num_pairs, max_rows, max_blocks,
                      E: tl.constexpr, EP: tl.constexpr, P: tl.constexpr, MB: tl.constexpr, MR: tl.constexpr,
                      BM: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr = False):
        """The three grouping steps in one program, for calls of at most ``P`` pairs (``MB`` >= max_blocks,
        ``MR`` >= max_rows).

        The ranks come from the same atomic count as ``_rank_kernel`` (``counts`` zeroed by the routing); the
        experts' row counts from a histogram of the ids in registers.  The block map is built by writing
        ``expert + 1`` at each used expert's first block and taking a running maximum.  The barriers order
        the phases' global writes for the whole program (one CTA)."""
        _gdc(PDL)
        offs = tl.arange(0, P)
        ok = offs < num_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0).to(tl.int32)
        rank = tl.atomic_add(counts_ptr + ids, 1, mask=ok, sem="relaxed")
        counts = tl.histogram(ids, EP, mask=ok)
        padded = (counts + BM - 1) // BM * BM
        ends = tl.cumsum(padded, axis=0)
        starts = ends - padded
        e_idx = tl.arange(0, EP)
        tl.store(starts_ptr + e_idx, starts, mask=e_idx < E)
        for r0 in range(0, MR, RB):
            rows = r0 + tl.arange(0, RB)
            tl.store(sorted_ptr + rows, tl.zeros([RB], dtype=tl.int32) + num_pairs, mask=rows < max_rows)
        blk = tl.arange(0, MB)
        tl.store(bexp_ptr + blk, tl.zeros([MB], dtype=tl.int32), mask=blk < max_blocks)
        tl.debug_barrier()
        tl.store(bexp_ptr + starts // BM, e_idx + 1, mask=(e_idx < E) & (counts > 0))
        row = tl.load(starts_ptr + ids, mask=ok, other=0) + rank
        tl.store(sorted_ptr + row, offs, mask=ok)
        tl.debug_barrier()
        first = tl.load(bexp_ptr + blk, mask=blk < max_blocks, other=0)
        ex = tl.associative_scan(first, 0, _max_combine) - 1
        ex = tl.where(blk * BM < tl.sum(padded, axis=0), ex, -1)
        tl.store(bexp_ptr + blk, ex, mask=blk < max_blocks)

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
                      NFIRST: tl.constexpr = False, NARROW: tl.constexpr = False):
        """GEMM1 + activation on tensor cores: one program per (row block of one expert, BN columns).

        SWAP computes (W X^T): the dequantized weights are then the register operand of the MMA.  PF loads
        the next K step's weight words and scales into registers before this step's math: Triton's
        pipeliner only stages loads that feed a dot directly, and these feed the dequantization.
        """
        _gdc(PDL)
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
        if SWAP:
            h = tl.trans(_activation(acc_g * inv, acc_u * inv, ACT))
        else:
            h = _activation(acc_g * inv, acc_u * inv, ACT)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(out_ptrs, h.to(tl.bfloat16), mask=n_ok[None, :])

    @triton.jit
    def _gemm2_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, bexp_ptr, tw_ptr, y_ptr,
                      num_pairs, H, I, k_per_split,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr,
                      SWAP: tl.constexpr, PF: tl.constexpr = False, PDL: tl.constexpr = False,
                      NFIRST: tl.constexpr = False, NARROW: tl.constexpr = False):
        """GEMM2 on tensor cores, routing weight in the epilogue, fp32 rows per (pair, K split); PF as in GEMM1."""
        _gdc(PDL)
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
        scale = tl.load(tw_ptr + pair, mask=valid, other=0.0) * 128.0 / tl.load(gs_ptr + e)
        y = acc * scale[:, None]
        y_ptrs = y_ptr + (pid_s * num_pairs + pair).to(tl.int64)[:, None] * H + offs_n[None, :]
        tl.store(y_ptrs, y, mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _dot8(w, xa, xb, acc):
        """``acc + sum_i w_i * x_i * 2^-62``: unscaled codes (``e2m1 * 2^-126``) against activations
        times 2^64, so that products of the fp32-subnormal 0.5 stay normal numbers."""
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _WORD_TO_F32_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        a0 = xa.to(tl.int32)
        a1 = (xa >> 32).to(tl.int32)
        b0 = xb.to(tl.int32)
        b1 = (xb >> 32).to(tl.int32)
        up = 18446744073709551616.0  # 2^64
        acc += e0 * ((a0 << 16).to(tl.float32, bitcast=True) * up)
        acc += e1 * ((a0 & -65536).to(tl.float32, bitcast=True) * up)
        acc += e2 * ((a1 << 16).to(tl.float32, bitcast=True) * up)
        acc += e3 * ((a1 & -65536).to(tl.float32, bitcast=True) * up)
        acc += e4 * ((b0 << 16).to(tl.float32, bitcast=True) * up)
        acc += e5 * ((b0 & -65536).to(tl.float32, bitcast=True) * up)
        acc += e6 * ((b1 << 16).to(tl.float32, bitcast=True) * up)
        acc += e7 * ((b1 & -65536).to(tl.float32, bitcast=True) * up)
        return acc

    @triton.jit
    def _dot16(wq, s, xa, xb, xc, xd, acc):
        """``acc + (16-element dot) * 2^-70``: ``wq`` int64 = one NVFP4 group (two words), ``s`` its E4M3 byte.

        The block scale (``e4m3 * 2^-8`` by the fp16 placement) multiplies the group's fp32 partial sum
        once; measured 3-7% faster than scaling every bf16 pair as the tensor-core tiles do.
        """
        part = _dot8(wq.to(tl.int32), xa, xb, tl.zeros_like(acc))
        part = _dot8((wq >> 32).to(tl.int32), xc, xd, part)
        s = s.to(tl.int32)
        s = (((s & 0x7F) << 7) | ((s & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return acc + part * s

    @triton.jit
    def _qload_w(w_ptrs, s_ptrs, rr, KG, g0, g_end, col, n_ok, UW, GATED: tl.constexpr, NC: tl.constexpr):
        """The weight words and scale bytes of one K step of the packed-decode kernels: thread ``c`` reads
        groups ``g0 + c`` and ``g0 + NC + c`` of every row (and of the up rows), so one warp load is 32
        groups of a row: 256 contiguous bytes row-major (measured 1-4% faster at 1 token than two adjacent
        groups per thread), 8 pieces of the row's band on the banded weights (``rr``: the rows' places in
        their bands, ``KG`` groups per row), which is why this decode is no longer selected."""
        m0 = n_ok & (g0 + col < g_end)[:, None]
        m1 = n_ok & (g0 + col + NC < g_end)[:, None]
        o0 = _band_off((g0 + col)[:, None], rr, KG)
        o1 = _band_off((g0 + NC + col)[:, None], rr, KG)
        wg0 = tl.load(w_ptrs + o0, mask=m0, other=0)
        wg1 = tl.load(w_ptrs + o1, mask=m1, other=0)
        sg0 = tl.load(s_ptrs + o0, mask=m0, other=0)
        sg1 = tl.load(s_ptrs + o1, mask=m1, other=0)
        if GATED:
            wu0 = tl.load(w_ptrs + (UW + o0), mask=m0, other=0)
            wu1 = tl.load(w_ptrs + (UW + o1), mask=m1, other=0)
            su0 = tl.load(s_ptrs + (UW + o0), mask=m0, other=0)
            su1 = tl.load(s_ptrs + (UW + o1), mask=m1, other=0)
        else:
            wu0 = wg0
            wu1 = wg1
            su0 = sg0
            su1 = sg1
        return wg0, wg1, sg0, sg1, wu0, wu1, su0, su1

    @triton.jit
    def _qload_x(x_ptrs, g0, g_end, col, NC: tl.constexpr):
        """The activation words (4 bf16 each) of the same K step, shared by all rows of the tile."""
        ok0 = (g0 + col < g_end)[:, None]
        ok1 = (g0 + col + NC < g_end)[:, None]
        xp = x_ptrs + 4 * g0
        x0 = tl.load(xp, mask=ok0, other=0)
        x1 = tl.load(xp + 1, mask=ok0, other=0)
        x2 = tl.load(xp + 2, mask=ok0, other=0)
        x3 = tl.load(xp + 3, mask=ok0, other=0)
        x4 = tl.load(xp + 4 * NC, mask=ok1, other=0)
        x5 = tl.load(xp + 4 * NC + 1, mask=ok1, other=0)
        x6 = tl.load(xp + 4 * NC + 2, mask=ok1, other=0)
        x7 = tl.load(xp + 4 * NC + 3, mask=ok1, other=0)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _qload(w_ptrs, s_ptrs, rr, KG, x_ptrs, g0, g_end, col, n_ok, UW, GATED: tl.constexpr, NC: tl.constexpr):
        """Everything one K step of the packed-decode kernels reads (:func:`_qload_w`, :func:`_qload_x`)."""
        wg0, wg1, sg0, sg1, wu0, wu1, su0, su1 = _qload_w(w_ptrs, s_ptrs, rr, KG, g0, g_end, col, n_ok, UW, GATED, NC)
        x0, x1, x2, x3, x4, x5, x6, x7 = _qload_x(x_ptrs, g0, g_end, col, NC)
        return wg0, wg1, sg0, sg1, wu0, wu1, su0, su1, x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _qsteps(w_ptrs, s_ptrs, rr, KG, x_ptrs, g_begin, g_end, col, n_ok, UW, acc_g, acc_u,
                GATED: tl.constexpr, NC: tl.constexpr, PREFETCH: tl.constexpr):
        """The K loop of the packed-decode kernels; with PREFETCH the next step's loads are issued before
        the current step is computed (register double buffering)."""
        if PREFETCH:
            (wg0, wg1, sg0, sg1, wu0, wu1, su0, su1,
             x0, x1, x2, x3, x4, x5, x6, x7) = _qload(w_ptrs, s_ptrs, rr, KG, x_ptrs, g_begin, g_end, col, n_ok, UW,
                                                      GATED, NC)
            for g0 in range(g_begin, g_end, 2 * NC):
                (nwg0, nwg1, nsg0, nsg1, nwu0, nwu1, nsu0, nsu1,
                 nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7) = _qload(w_ptrs, s_ptrs, rr, KG, x_ptrs, g0 + 2 * NC,
                                                                  g_end, col, n_ok, UW, GATED, NC)
                acc_g = _dot16(wg0, sg0, x0, x1, x2, x3, acc_g)
                acc_g = _dot16(wg1, sg1, x4, x5, x6, x7, acc_g)
                if GATED:
                    acc_u = _dot16(wu0, su0, x0, x1, x2, x3, acc_u)
                    acc_u = _dot16(wu1, su1, x4, x5, x6, x7, acc_u)
                wg0, wg1, sg0, sg1, wu0, wu1, su0, su1 = nwg0, nwg1, nsg0, nsg1, nwu0, nwu1, nsu0, nsu1
                x0, x1, x2, x3, x4, x5, x6, x7 = nx0, nx1, nx2, nx3, nx4, nx5, nx6, nx7
        else:
            for g0 in range(g_begin, g_end, 2 * NC):
                (wg0, wg1, sg0, sg1, wu0, wu1, su0, su1,
                 x0, x1, x2, x3, x4, x5, x6, x7) = _qload(w_ptrs, s_ptrs, rr, KG, x_ptrs, g0, g_end, col, n_ok,
                                                          UW, GATED, NC)
                acc_g = _dot16(wg0, sg0, x0, x1, x2, x3, acc_g)
                acc_g = _dot16(wg1, sg1, x4, x5, x6, x7, acc_g)
                if GATED:
                    acc_u = _dot16(wu0, su0, x0, x1, x2, x3, acc_u)
                    acc_u = _dot16(wu1, su1, x4, x5, x6, x7, acc_u)
        return acc_g, acc_u

    @triton.jit
    def _qgemv1_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, ids_ptr, out_ptr, part_ptr, num_pairs, H, I, stride_x8,
                       k_per_split, lg_ptr, bias_ptr, tw_ptr, stride_l, E, rscale,
                       TOP_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
                       BN: tl.constexpr, NC: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
                       PDL: tl.constexpr = False, ROUTE: tl.constexpr = False, KP: tl.constexpr = 1,
                       METHOD: tl.constexpr = 0, NG: tl.constexpr = 1, EG: tl.constexpr = 1,
                       TOPK_GROUP: tl.constexpr = 1, HAS_BIAS: tl.constexpr = False):
        """Decode GEMM1, packed decode: one program per (pair, BN intermediate rows, K split).

        Each thread owns two NVFP4 groups per K step (``NC`` groups apart; 2 x 8 weight bytes and 2 scale
        bytes per row, 64 activation bytes shared by all rows) of every row of the tile (tiles are
        ``[NC columns, BN rows]``); no data leaves the thread until the final row sums.  ``stride_x8`` is the
        activation row stride in 8-byte words.  ROUTE: see :func:`_pair_expert` (``lg_ptr`` .. ``HAS_BIAS``).
        """
        _gdc(PDL)
        pair = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        e64 = _pair_expert(pair, ids_ptr, tw_ptr, lg_ptr, bias_ptr, stride_l, E, rscale, TOP_K, ROUTE, KP, METHOD,
                           NG, EG, TOPK_GROUP, HAS_BIAS)
        tok = (pair // TOP_K).to(tl.int64)
        N1 = 2 * I if GATED else I
        KG = H // 16
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = (offs_n < I)[None, :]
        col = tl.arange(0, NC)
        row_g = e64 * N1 + offs_n
        rr = (row_g % 16)[None, :]  # banded layout: pointers to each row's band, offsets from _band_off
        w_ptrs = w_ptr.to(tl.pointer_type(tl.int64)) + (row_g[None, :] - rr) * KG
        s_ptrs = s_ptr + (row_g[None, :] - rr) * KG
        x_ptrs = x_ptr.to(tl.pointer_type(tl.int64)) + tok * stride_x8 + (4 * col)[:, None]
        k_begin = pid_s * k_per_split
        g_begin = k_begin // 16
        g_end = tl.minimum(k_begin + k_per_split, H) // 16
        acc_g = tl.zeros([NC, BN], dtype=tl.float32)
        acc_u = tl.zeros([NC, BN], dtype=tl.float32)
        acc_g, acc_u = _qsteps(w_ptrs, s_ptrs, rr, KG, x_ptrs, g_begin, g_end, col, n_ok, I * KG, acc_g, acc_u,
                               GATED, NC, PREFETCH)
        inv = 1180591620717411303424.0 / tl.load(gs_ptr + e64)  # 2^70: see _dot16
        ok = offs_n < I
        if SPLIT == 1:
            h = _activation(tl.sum(acc_g, axis=0) * inv, tl.sum(acc_u, axis=0) * inv, ACT)
            tl.store(out_ptr + pair.to(tl.int64) * I + offs_n, h.to(tl.bfloat16), mask=ok)
        else:
            p_ptrs = part_ptr + (pid_s * num_pairs + pair).to(tl.int64) * N1 + offs_n
            tl.store(p_ptrs, tl.sum(acc_g, axis=0) * inv, mask=ok)
            if GATED:
                tl.store(p_ptrs + I, tl.sum(acc_u, axis=0) * inv, mask=ok)

    @triton.jit
    def _qgemv2_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, ids_ptr, tw_ptr, y_ptr, num_pairs, H, I, k_per_split,
                       lg_ptr, bias_ptr, stride_l, E, rscale,
                       BN: tl.constexpr, NC: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr = False,
                       EARLY: tl.constexpr = False, TOP_K: tl.constexpr = 1, ROUTE: tl.constexpr = False,
                       KP: tl.constexpr = 1, METHOD: tl.constexpr = 0, NG: tl.constexpr = 1, EG: tl.constexpr = 1,
                       TOPK_GROUP: tl.constexpr = 1, HAS_BIAS: tl.constexpr = False):
        """Decode GEMM2, packed decode: one program per (pair, BN hidden rows, K split); routing weight applied.

        EARLY: the first K step's weight words and scales are loaded before the PDL wait, so that they
        arrive while GEMM1 drains.  The pair's expert is then read before the wait too: from the routing
        launch's ids (that launch finished before GEMM1's programs passed their waits, which is before this
        kernel can launch) or, with ROUTE (GEMM1 routed and is still writing the ids), routed again here
        from the logits (:func:`_pair_expert` without its stores; bit-identical to GEMM1's).
        """
        pair = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        if EARLY:
            e64 = _pair_expert(pair, ids_ptr, tw_ptr, lg_ptr, bias_ptr, stride_l, E, rscale, TOP_K, ROUTE, KP, METHOD,
                               NG, EG, TOPK_GROUP, HAS_BIAS, EARLY=True)
        else:
            _gdc(PDL)
            e64 = tl.load(ids_ptr + pair).to(tl.int64)
        KG = I // 16
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = (offs_n < H)[None, :]
        col = tl.arange(0, NC)
        row = e64 * H + offs_n
        rr = (row % 16)[None, :]
        w_ptrs = w_ptr.to(tl.pointer_type(tl.int64)) + (row[None, :] - rr) * KG
        s_ptrs = s_ptr + (row[None, :] - rr) * KG
        a_ptrs = a_ptr.to(tl.pointer_type(tl.int64)) + pair.to(tl.int64) * (I // 4) + (4 * col)[:, None]
        k_begin = pid_s * k_per_split
        g_begin = k_begin // 16
        g_end = tl.minimum(k_begin + k_per_split, I) // 16
        acc = tl.zeros([NC, BN], dtype=tl.float32)
        if EARLY:
            w0, w1, s0, s1, _, _, _, _ = _qload_w(w_ptrs, s_ptrs, rr, KG, g_begin, g_end, col, n_ok, 0, False, NC)
            _gdc(PDL)
            x0, x1, x2, x3, x4, x5, x6, x7 = _qload_x(a_ptrs, g_begin, g_end, col, NC)
            acc = _dot16(w0, s0, x0, x1, x2, x3, acc)
            acc = _dot16(w1, s1, x4, x5, x6, x7, acc)
            g_begin += 2 * NC
        acc, _ = _qsteps(w_ptrs, s_ptrs, rr, KG, a_ptrs, g_begin, g_end, col, n_ok, 0, acc, acc, False, NC, PREFETCH)
        scale = tl.load(tw_ptr + pair) * 1180591620717411303424.0 / tl.load(gs_ptr + e64)  # 2^70: see _dot16
        y = tl.sum(acc, axis=0) * scale
        tl.store(y_ptr + (pid_s * num_pairs + pair).to(tl.int64) * H + offs_n, y, mask=offs_n < H)

    @triton.jit
    def _combine_kernel(y_ptr, out_ptr, num_pairs, H, stride_out,
                        TOP_K: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        _gdc(PDL, LAUNCH=False)  # whatever follows the layer is not ours: it starts after this kernel ends
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            for j in tl.static_range(TOP_K):
                acc += tl.load(y_ptr + (s * num_pairs + t * TOP_K + j) * H + offs, mask=ok, other=0.0)
        tl.store(out_ptr + t * stride_out + offs, acc.to(tl.bfloat16), mask=ok)


# Up to this many pairs (and 16-row blocks) the grouping is one program (``_group_kernel``): measured on the
# H200 against the three launches, 2.4-4 us a call faster at 16-128 tokens on Qwen3 and Gemma-4 (Qwen3 16
# tokens 107.3 -> 104.1 us, 64 tokens 156.8 -> 152.7); Nemotron-Nano and DeepSeek-V3 within their noise.
_ONE_PROGRAM_PAIRS = 1024


def _align(flat_ids: torch.Tensor, counts: torch.Tensor, bm: int, max_rows: int, max_blocks: int, pdl: bool = False,
           tail: int = 0, max_tails: int = 0):
    """``(sorted_ids, bexp, texp)``: the pairs grouped by expert into BM-row blocks, in one program up to
    ``_ONE_PROGRAM_PAIRS`` pairs, else in three short launches (atomic ranks, block map, scatter); no sort.
    ``counts`` (int32 ``[experts]``) must be zero (the routing launch zeroes it).  With ``tail`` > 0 an
    expert's last ``tail`` rows or fewer go to a tail block instead: the tail blocks' rows follow the
    ``max_blocks * bm`` main rows, and ``texp`` (``[max_tails]``, None without tails) maps them to experts.

    Measured on the H200 (whole layer, captured): 120-130 us a call faster than torch's stable sort at
    1024-4096 tokens, and never slower than the earlier one-program kernel, which cost up to 90 us at
    128-256 tokens (Gemma-4 256 tokens 477 -> 381 us).
    """
    n = flat_ids.numel()
    device = flat_ids.device
    experts = counts.numel()
    starts = torch.empty(experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
    bexp = torch.empty(max_blocks, dtype=torch.int32, device=device)
    if n <= _ONE_PROGRAM_PAIRS and bm <= 16 and not tail:
        _group_kernel[(1,)](flat_ids, counts, starts, sorted_ids, bexp, n, max_rows, max_blocks, E=experts,
                            EP=_next_pow2(experts), P=_next_pow2(n), MB=_next_pow2(max_blocks),
                            MR=_next_pow2(max_rows), BM=bm, RB=1024, PDL=pdl, num_warps=4, launch_pdl=pdl)
        return sorted_ids, bexp, None
    rank = torch.empty(n, dtype=torch.int32, device=device)
    texp = tidx = None
    if tail:
        texp = torch.empty(max_tails, dtype=torch.int32, device=device)
        tidx = torch.empty(experts, dtype=torch.int32, device=device)
    block = 1024
    _rank_kernel[(triton.cdiv(max_rows, block),)](flat_ids, counts, rank, sorted_ids, n, max_rows, BLOCK=block,
                                                  PDL=pdl, num_warps=4, launch_pdl=pdl)
    _starts_kernel[(1,)](counts, starts, bexp, tidx if tail else starts, texp if tail else bexp, max_blocks,
                         max_tails if tail else 0, E=experts, EP=_next_pow2(experts), BM=bm, CF=64, BT=tail,
                         PDL=pdl, num_warps=4, launch_pdl=pdl)
    _scatter_kernel[(triton.cdiv(n, block),)](flat_ids, rank, starts, counts, tidx if tail else starts, sorted_ids,
                                              n, max_blocks * bm, BLOCK=block, BM=bm, BT=tail, PDL=pdl,
                                              num_warps=4, launch_pdl=pdl)
    return sorted_ids, bexp, texp


def fused_moe_triton(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights, *,
                     top_k: int, activation: str = "silu", routing: str = "renormalize",
                     routing_bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
                     topk_group: Optional[int] = None, routed_scaling_factor: Optional[float] = None,
                     out: Optional[torch.Tensor] = None, config: Optional[TileConfig] = None,
                     local_expert_offset: int = 0, global_num_experts: Optional[int] = None) -> torch.Tensor:
    """The NVFP4 MoE layer on bf16 ``hidden_states [T, Hp]`` (``Hp`` = the weights' hidden size).

    ``weights`` must come from :func:`prepare_weights` (or the registry's ``prepare``): the E2M1 bytes
    are read in the Triton layout, not the canonical one.  Expert parallelism: with ``global_num_experts``
    the weights hold experts ``[local_expert_offset, +E_local)`` and ``router_logits`` score all of them.
    """
    if triton is None:
        raise MoEConfigError("the triton MoE kernel needs the 'triton' package")
    w13, w13_scale, w13_gs, w2, w2_scale, w2_gs = weights
    if hidden_states.ndim != 2 or hidden_states.dtype != torch.bfloat16:
        raise MoEConfigError(f"hidden_states must be bf16 [tokens, hidden], got {hidden_states.dtype} "
                             f"{tuple(hidden_states.shape)}")
    tokens, hidden = hidden_states.shape
    experts, n1, hidden_w = w13.shape[0], w13.shape[1], w13.shape[2] * 2
    inter = w2.shape[2] * 2
    gated = is_gated(activation)
    if hidden != hidden_w or w2.shape[1] != hidden:
        raise MoEConfigError(f"hidden_states are {hidden} wide but the weights are {hidden_w} / {w2.shape[1]}")
    if n1 != (2 * inter if gated else inter):
        raise MoEConfigError(f"w13 has {n1} rows, inconsistent with intermediate {inter} and activation {activation!r}")
    if hidden % 16 or inter % 16:
        raise MoEConfigError(f"hidden ({hidden}) and intermediate ({inter}) must be multiples of 16")
    local = global_num_experts is not None
    routed_experts = global_num_experts if local else experts
    if local and not 0 <= local_expert_offset <= routed_experts - experts:
        raise MoEConfigError(f"local experts [{local_expert_offset}, {local_expert_offset + experts}) do not lie within "
                             f"the {routed_experts} global experts")
    if (router_logits.shape != (tokens, routed_experts) or not router_logits.is_floating_point()
            or router_logits.device != hidden_states.device):
        raise MoEConfigError(f"router_logits must be a float [{tokens}, {routed_experts}] tensor on {hidden_states.device}, "
                             f"got {router_logits.dtype} {tuple(router_logits.shape)} on {router_logits.device}")
    if hidden_states.stride(1) != 1:
        hidden_states = hidden_states.contiguous()
    device = hidden_states.device
    if out is None:
        out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=device)
    elif (out.shape != (tokens, hidden) or out.dtype != torch.bfloat16 or out.device != device
          or (tokens and out.stride(1) != 1)):
        raise MoEConfigError(f"out must be a bf16 [{tokens}, {hidden}] tensor with unit stride along hidden on "
                             f"{device}, got {out.dtype} {tuple(out.shape)} stride {out.stride()} on {out.device}")
    if tokens == 0:
        return out
    # The one-launch decode and GEMM1's own routing index the weights by global expert id: not with EP.
    if tokens == 1 and config is None and not local:
        done = _one_launch_decode(hidden_states, router_logits, weights, top_k, activation, routing, routing_bias,
                                  n_group, topk_group, routed_scaling_factor, out)
        if done is not None:
            return done

    cfg = config or select_config(tokens, top_k, experts, hidden, inter, gated, _sm_count(device))
    _check_config(cfg)
    # Serial launches for the prefill tiles: their calls take 0.5-12 ms, and chained launches gave no
    # consistent gain there.
    pdl = cfg.bm <= 16 and _use_pdl(device)
    counts = None if cfg.bm == 1 else torch.empty(experts, dtype=torch.int32, device=device)
    rspec = None
    if cfg.fused_route and cfg.bm == 1 and not local:
        rspec = _route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor)
    if rspec is None:
        topk_w, topk_ids = _route(router_logits, top_k, routing, routing_bias, n_group, topk_group,
                                  routed_scaling_factor, zero=counts, pdl=pdl)
    else:  # GEMM1's programs fill them
        topk_w = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
        topk_ids = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    if local:
        topk_w, topk_ids = _localize(topk_w, topk_ids, local_expert_offset, experts)
    flat_ids = topk_ids.reshape(-1)
    pairs = flat_ids.numel()
    split = cfg.split2
    # the packed-decode kernels split K at 32-element (2-group) granularity, the tensor-core decode at
    # 128 (a chunk), the others at their tile's
    k_step2 = 128 if cfg.tc else (32 if cfg.bm == 1 else cfg.bk2)
    k_per_split = triton.cdiv(triton.cdiv(inter, split), k_step2) * k_step2
    split = triton.cdiv(inter, k_per_split)
    y = torch.empty(split, pairs, hidden, dtype=torch.float32, device=device)

    if cfg.tc:
        hidden_states = _word_aligned(hidden_states, (w13, w2))
        inter_buf = torch.empty(pairs, inter, dtype=torch.bfloat16, device=device)
        if cfg.bm == 1:
            sorted_ids = bexp = None
            blocks = pairs
        else:
            blocks = triton.cdiv(pairs, cfg.bm) + min(pairs, experts)
            sorted_ids, bexp, _ = _align(flat_ids, counts, cfg.bm, blocks * cfg.bm, blocks, pdl)
        decode_tc(hidden_states, weights, flat_ids, topk_w, inter_buf, y, blocks=blocks, sorted_ids=sorted_ids,
                  bexp=bexp, pairs=pairs, hidden=hidden, inter=inter, top_k=top_k, gated=gated, activation=activation,
                  warps1=cfg.warps1, warps2=cfg.warps2, split1=cfg.split1, k_per_split2=k_per_split,
                  pf1=cfg.prefetch, pf2=cfg.prefetch, pdl=pdl, vec1=cfg.vec1, vec2=cfg.vec2, route=rspec,
                  early2=cfg.early2, ks1=cfg.ks1)
    elif cfg.bm == 1:
        # Decode: one program per (token, expert) pair, no grouping pass.  Programs of one column tile
        # run together, so pairs that share an expert read its weights from L2.
        inter_buf = torch.empty(pairs, inter, dtype=torch.bfloat16, device=device)
        _decode_packed(hidden_states, w13, w13_scale, w13_gs, w2, w2_scale, w2_gs, flat_ids, topk_w, inter_buf, y,
                       pairs, hidden, inter, top_k, gated, activation, cfg, split, k_per_split, pdl, rspec)
    else:
        bm = cfg.bm
        max_blocks = triton.cdiv(pairs, bm) + min(pairs, experts)
        main_rows = max_blocks * bm
        max_tails = min(pairs, experts) if cfg.tail else 0
        max_rows = main_rows + max_tails * cfg.tail
        sorted_ids, bexp, texp = _align(flat_ids, counts, bm, max_rows, max_blocks, pdl, cfg.tail, max_tails)
        inter_buf = torch.empty(max_rows, inter, dtype=torch.bfloat16, device=device)
        # (tile config, its blocks' rows in sorted_ids / inter_buf, their expert map, block count)
        launches = [(cfg, sorted_ids, inter_buf, bexp, max_blocks)]
        if cfg.tail:
            launches.append((_tail_config(cfg), sorted_ids[main_rows:], inter_buf[main_rows:], texp, max_tails))
        for c, rows_ids, rows_inter, block_map, nblocks in launches:
            grid1, nfirst = _tile_grid(c, nblocks, triton.cdiv(inter, c.bn1))
            _gemm1_kernel[grid1](hidden_states, w13, w13_scale.view(torch.uint8), w13_gs, rows_ids, block_map,
                                 rows_inter, pairs, hidden, inter, hidden_states.stride(0),
                                 TOP_K=top_k, GATED=gated, ACT=_ACT_CODES[activation],
                                 BM=c.bm, BN=c.bn1, BK=c.bk1, F32=_INTERPRET, SWAP=c.swap, PF=c.wprefetch,
                                 PDL=pdl, NFIRST=nfirst, NARROW=hidden % 64 != 0, num_warps=c.warps1,
                                 num_stages=c.stages1, launch_pdl=pdl)
        for c, rows_ids, rows_inter, block_map, nblocks in launches:
            grid2, nfirst = _tile_grid(c, nblocks, triton.cdiv(hidden, c.bn2), split)
            _gemm2_kernel[grid2](rows_inter, w2, w2_scale.view(torch.uint8), w2_gs, rows_ids, block_map, topk_w, y,
                                 pairs, hidden, inter, k_per_split,
                                 BM=c.bm, BN=c.bn2, BK=c.bk2, F32=_INTERPRET, SWAP=c.swap, PF=c.wprefetch,
                                 PDL=pdl, NFIRST=nfirst, NARROW=inter % 64 != 0, num_warps=c.warps2,
                                 num_stages=c.stages2, launch_pdl=pdl)

    block = 1024
    _combine_kernel[(tokens, triton.cdiv(hidden, block))](y, out, pairs, hidden, out.stride(0),
                                                          TOP_K=top_k, SPLIT=split, BLOCK=block, PDL=pdl,
                                                          num_warps=4, launch_pdl=pdl)
    return out


def _localize(topk_w: torch.Tensor, topk_ids: torch.Tensor, offset: int, experts: int):
    """Global expert ids to this rank's local ones.  A pair of another rank's expert keeps a valid local id (0)
    with weight 0, so the kernels below need no change and it adds nothing (its rows are still computed)."""
    local = topk_ids - offset
    mine = (local >= 0) & (local < experts)
    return torch.where(mine, topk_w, 0.0).contiguous(), torch.where(mine, local, 0).contiguous()


def _one_launch_decode(hidden_states, router_logits, weights, top_k, activation, routing, routing_bias, n_group,
                       topk_group, routed_scaling_factor, out) -> Optional[torch.Tensor]:
    """One token on SM90: the whole layer in one persistent CUDA launch (:mod:`cuda_decode`, at least as fast
    as the 1-token path here on every benchmark shape), or None where that kernel does not apply or is turned
    off (``MOE_NVFP4_CUDA_DECODE=0``)."""
    from moe_passes.kernels import cuda_decode

    args = (hidden_states, router_logits, weights, top_k, activation, routing, routing_bias, n_group, topk_group,
            routed_scaling_factor)
    if cuda_decode.unsupported_reason(*args) is not None:
        return None
    return cuda_decode.decode_one_token(hidden_states, router_logits, weights, top_k=top_k, activation=activation,
                                        routing=routing, routing_bias=routing_bias, n_group=n_group,
                                        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor, out=out)


def _tile_grid(cfg: TileConfig, blocks: int, tiles: int, *rest: int):
    """``(grid, nfirst)`` of a tile launch: column tiles first (grid axis 0) when the config asks and the row
    blocks fit grid axis 1, so that the programs running together share their activation rows in L2."""
    nfirst = cfg.nfirst and blocks <= _GRID_Y_MAX
    return ((tiles, blocks, *rest) if nfirst else (blocks, tiles, *rest)), nfirst


def _word_aligned(hidden_states: torch.Tensor, weights) -> torch.Tensor:
    """The decode kernels read activations and weights as 8-byte words: rows of the activations start on
    8-byte boundaries (at worst one copy, proportional to the tokens); unaligned weights are an error."""
    if hidden_states.stride(0) % 4 or hidden_states.data_ptr() % 8:
        hidden_states = hidden_states.contiguous()
        if hidden_states.data_ptr() % 8:  # a view at an odd offset
            hidden_states = hidden_states.clone()
    for t in weights:
        if t.data_ptr() % 8:
            raise MoEConfigError("the decode kernels need 8-byte aligned weights")
    return hidden_states


def _decode_packed(hidden_states, w13, w13_scale, w13_gs, w2, w2_scale, w2_gs, flat_ids, topk_w, inter_buf, y,
                   pairs, hidden, inter, top_k, gated, activation, cfg, split, k_per_split, pdl=False, route=None):
    """Decode GEMMs with the packed-decode kernels: weights and activations are read as 8-byte words.
    ``route``: a ``triton_route._RouteSpec``, GEMM1 then routes and fills ``flat_ids``/``topk_w``."""
    device = hidden_states.device
    n1 = w13.shape[1]
    hidden_states = _word_aligned(hidden_states, (w13, w13_scale, w2, w2_scale))
    split1 = cfg.split1
    k_per_split1 = triton.cdiv(triton.cdiv(hidden, split1), 32) * 32
    split1 = triton.cdiv(hidden, k_per_split1)
    part = torch.empty(split1, pairs, n1, dtype=torch.float32, device=device) if split1 > 1 else inter_buf
    _qgemv1_kernel[(pairs, triton.cdiv(inter, cfg.bn1), split1)](
        hidden_states, w13, w13_scale.view(torch.uint8), w13_gs, flat_ids, inter_buf, part, pairs,
        hidden, inter, hidden_states.stride(0) // 4, k_per_split1, **_route_args(route, flat_ids, topk_w),
        TOP_K=top_k, GATED=gated, ACT=_ACT_CODES[activation], BN=cfg.bn1, NC=32 * cfg.warps1, SPLIT=split1,
        PREFETCH=cfg.prefetch, PDL=pdl, num_warps=cfg.warps1, num_stages=1, launch_pdl=pdl)
    early = bool(cfg.early2) and pdl
    if split1 > 1:
        _act_kernel[(pairs, triton.cdiv(inter, 1024))](part, inter_buf, pairs, inter, GATED=gated,
                                                      ACT=_ACT_CODES[activation], SPLIT=split1, BLOCK=1024,
                                                      PDL=pdl, LAUNCH_FIRST=early, num_warps=4, launch_pdl=pdl)
    # before its wait an early GEMM2 routes again where GEMM1 routed (GEMM1 may still be writing the ids)
    rargs = _route_args(route if early else None, flat_ids, topk_w)
    del rargs["tw_ptr"]
    _qgemv2_kernel[(pairs, triton.cdiv(hidden, cfg.bn2), split)](
        inter_buf, w2, w2_scale.view(torch.uint8), w2_gs, flat_ids, topk_w, y, pairs, hidden, inter, k_per_split,
        **rargs, BN=cfg.bn2, NC=32 * cfg.warps2, PREFETCH=cfg.prefetch, PDL=pdl, EARLY=early, TOP_K=top_k,
        num_warps=cfg.warps2, num_stages=1, launch_pdl=pdl)


def prepare_weights(weights: registry.MoEWeights) -> registry.MoEWeights:
    """Canonical NVFP4 weights -> what :func:`fused_moe_triton` reads (done once, never per call).

    The E2M1 bytes of ``w13`` and ``w2`` get the bit placement of :mod:`triton_layout`, and codes and block
    scales its 16-row bands (same shapes and dtypes: the registry's contract); global scales are only made
    contiguous.
    """
    w13, s13, g13, w2, s2, g2 = weights
    return registry.MoEWeights(_banded_codes(w13), _banded_scales(s13), g13.contiguous(),
                               _banded_codes(w2), _banded_scales(s2), g2.contiguous())


def _banded_codes(w: torch.Tensor) -> torch.Tensor:
    return to_band_layout(to_triton_layout(w), 8)


def _banded_scales(s: torch.Tensor) -> torch.Tensor:
    return to_band_layout(s.contiguous().view(torch.uint8), 1).view(s.dtype)


def _prepare(weights: registry.MoEWeights, shape: MoEShape) -> registry.MoEWeights:
    if shape.hidden_padded % 16 or shape.intermediate_padded % 16:
        raise MoEConfigError(f"triton MoE needs hidden and intermediate sizes that are multiples of 16, got "
                             f"{shape.hidden_padded} and {shape.intermediate_padded}")
    return prepare_weights(weights)


def _prepare_state(device: torch.device, shape: MoEShape, args: registry.RunArgs) -> None:
    from moe_passes.kernels import cuda_decode

    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        groups = (args.n_group or 1) if args.routing == "deepseek_v3" else 1
        cuda_decode.prepare_state(device, shape.hidden_padded, shape.intermediate_padded, shape.experts, args.top_k,
                                  is_gated(args.activation), groups)


def _run(hidden_states, router_logits, weights: registry.MoEWeights, input_global_scale, intermediate_global_scale,
         routing_bias, args: registry.RunArgs) -> torch.Tensor:
    # Activations stay bf16 on this path: the activation global scales are not used.
    return fused_moe_triton(hidden_states, router_logits, weights, top_k=args.top_k, activation=args.activation,
                            routing=args.routing, routing_bias=routing_bias, n_group=args.n_group,
                            topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
                            local_expert_offset=args.local_expert_offset, global_num_experts=args.global_num_experts)


TRITON = registry.register(registry.KernelSpec(
    name="triton",
    description="Triton NVFP4-weight / bf16-activation fused MoE (CUDA, compute capability >= 8.0, tuned on "
                "SM90 Hopper); needs the triton package",
    alignment=TRITON_ALIGNMENT,
    activations=frozenset(ACTIVATIONS),
    routings=frozenset(ROUTING_METHODS),
    available=triton_available,
    prepare=_prepare,
    prepare_state=_prepare_state,
    run=_run,
    quantizes_activations=False,
    graph_tokens=64,  # an H100 host takes 150-550 us to set up a call that runs 20-200 us on the GPU
    priority=10,
))
