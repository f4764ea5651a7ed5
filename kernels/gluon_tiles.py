"""Register-operand wgmma tiles (Gluon): the MoE GEMMs of 16-256-row expert blocks with the dequantized weights as
wgmma's A operand, straight from the registers the dequantization leaves them in.

``tl.dot`` in :mod:`triton_tiles` gets its weight tile through shared memory whichever operand it is (Triton
converts the dequantized registers to the MMA's layout by a store and ``ldmatrix``); Nsight Compute showed that
path, not the tensor cores, bounding the 128-row GEMM1 at 4096 tokens (L1/shared memory 77-81% busy).  Gluon
lets the kernel state its layouts, so the weight words are loaded where wgmma wants their values:

- wgmma ``m64nNk16`` with A in registers: warp ``w`` of a warpgroup holds rows ``16w .. 16w+15``; lane
  ``4g + t`` rows ``g`` and ``g + 8``, K slots ``2t, 2t+1, 2t+8, 2t+9`` of each 16-slot step (the
  ``mma.m16n8k16`` A fragment, :mod:`triton_tc_decode`).  A 16-row warp is one band of the banded weights
  (:mod:`triton_layout`), and lane ``4g + t`` loads words ``2t`` and ``2t + 1`` of each row's 64-element
  piece (8 contiguous bytes, 256 contiguous bytes a warp): word ``2t + h`` is group ``t``'s elements
  ``8h .. 8h + 7``, cut into 4 bf16 pairs (one scale) that fill this lane's slots.
- A dot product may visit K in any order if both operands agree, so slot ``P`` of a 64-slot piece holds weight
  element ``k = KMAP(P)`` and the token tile in shared memory is stored in the same order:
  ``P = 32h + 16j + 8q + 2t + b`` holds ``k = 16t + 8h + 4j + 2q + b``.  One small launch writes the hidden states
  in that order; GEMM1's epilogue writes the intermediate in it; both GEMMs then copy 16-byte runs.
- Each K step's token tile (``BM`` pair rows, wgmma's N: 16-256), weight words (a band's 64-element piece is
  512 contiguous bytes) and scale bytes go by ``cp.async`` into one slot of a ``STAGES``-slot shared-memory ring;
  a step waits for its slot, reads the words and scales in the fragment's layout, starts the copies of the step
  ``STAGES - 1`` ahead, dequantizes and runs the wgmmas.  The packed words are a quarter of a bf16 tile's bytes,
  and ``STAGES - 1`` steps of them stay in flight (1.03-1.11x the words loaded one or two steps ahead into registers).
  Each slot is its own allocation and the K loop is unrolled by the ring, so a step's slot is a constant and its
  one ``bar.sync`` is the only one: Triton's barrier pass cannot tell slots of one allocation apart and added a
  second (1.00-1.06x at 256-4096 tokens without it).
- The wgmmas are asynchronous with one group in flight: a tile is dequantized while the previous one multiplies
  (GEMM1's up rows while its gate rows run, the next step's gate rows while the up rows run; 128-row tiles of
  GEMM2 and of ungated GEMM1 as two 64-row halves the same way), and a step refills the previous step's slot
  once that step's last group is done (1.02-1.13x at 1024-4096 tokens).  ptxas serializes every wgmma of a
  kernel (its C7513/C7515 notes) if a branch or a move touches a register of a group in flight, so whole turns
  of the ring run unguarded, and a single-tile ring drains once a turn.  Where the K steps are not whole turns
  (``REM = steps % STAGES``, a compile-time argument), the first ``REM`` steps run in the ring's last slots, so
  every step is pipelined and unguarded (Gemma-4's GEMM2, 3 of 11 steps: 1.019x at 4096 tokens against running
  them synchronously after the loop, H100).
- Calls whose plan says so (``TileConfig.chains``: 16-row blocks) chain the launches by programmatic dependent
  launch: each kernel lets the next one launch once its programs have waited for the previous kernel, so the
  next kernel's programs fill the SMs the last ones leave.  GEMM2 (and GEMM1) copy the first steps' weight words
  and scales before that wait (weights are final; the expert map and sorted rows come from the grouping, done
  before the kernel ahead started) and the token tiles after it (1.02-1.03x at 128 tokens on Qwen3-30B-A3B and
  Gemma-4).
- A tail launch overlaps its main launch (``TileConfig.overlap``): it reads nothing the main launch
  writes, so the main launch lets it start at once and it waits for the main launch only before it ends; GEMM2's
  main launch waits for it, and so for both (1.02-1.08x at 1024-4096 tokens, H100).

Limits (the planner only picks these tiles where they hold): hidden and intermediate sizes multiples of 64,
GEMM2 without a K split, no expert biases, an SM90 GPU and a Triton with Gluon's Hopper API.
"""

from __future__ import annotations

import torch

from moe_passes.kernels.triton_common import triton

try:  # Gluon's Hopper API (Triton >= 3.5); without it the planner never picks these tiles
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                   warpgroup_mma_wait)
except (ImportError, AttributeError):  # pragma: no cover - exercised on CPU CI without Triton
    gluon = gl = None

__all__ = ["AVAILABLE", "KMAP", "takes", "gemm1_constexprs", "gemm2_constexprs", "launch_roles", "run_wgmma_tiles"]

AVAILABLE = gluon is not None and triton is not None


def _kmap(p: int) -> int:
    h, j, q, t, b = (p >> 5) & 1, (p >> 4) & 1, (p >> 3) & 1, (p >> 1) & 3, p & 1
    return 16 * t + 8 * h + 4 * j + 2 * q + b


# slot P of a 64-element piece holds element KMAP[P] (a permutation of 0..63)
KMAP = tuple(_kmap(p) for p in range(64))


def fits(hidden: int, inter: int, biases: bool) -> bool:
    """Do these tiles take a layer of these sizes: whole 64-element pieces in both GEMMs, no expert biases."""
    return hidden % 64 == 0 and inter % 64 == 0 and not biases


def takes(hidden: int, inter: int, biases: bool) -> bool:
    """Can these tiles run a layer of these sizes here: Gluon's Hopper API importable and :func:`fits` (the
    planner adds the SM90 check; a call adds an unsplit GEMM2)."""
    return AVAILABLE and fits(hidden, inter, biases)

if AVAILABLE:
    from moe_passes.kernels.triton_common import apply_act, scale_pairs_asm, word_cut_asm

    # The group's E4M3 scale (low byte of $9) -> ``s``, the bf16x2 ``scale * 2^119`` (cvt from E4M3, times 2^119)
    _SCALE_ASM = """
    .reg .b32 f2, s;
    .reg .b16 lo, hi;
    .reg .f32 fs;
    cvt.rn.f16x2.e4m3x2 f2, $9;
    mov.b32 {lo, hi}, f2;
    cvt.f32.f16 fs, lo;
    mul.f32 fs, fs, 0f7B000000;
    cvt.rn.bf16x2.f32 s, fs, fs;"""
    # One weight word ($8) and its scale -> 8 bf16 ``e2m1 * scale * 2^-7``, exact: the cut's ``e2m1 * 2^-126``
    # pairs times ``s``.
    _WORD_ASM = gl.constexpr("{" + word_cut_asm("$8", "p") + _SCALE_ASM + scale_pairs_asm("s") + "}")

    @gluon.constexpr_function
    def _band_layout(BN, COLS, NW, PER):
        """``[BN, COLS]`` weight words (``PER`` 2: word ``c = 8 * piece + 2t + h``) or scale bytes (``PER`` 1:
        byte ``c = 4 * piece + t``): lane ``4g + t`` of warp ``w`` holds rows ``16w + g`` and ``+ 8`` (``BN``
        beyond ``16 * NW``: more rows, in registers) and columns ``PER * t`` to ``PER * t + PER - 1``."""
        reg = [[0, 1], [8, 0]] if PER == 2 else [[8, 0]]
        c = 4 * PER
        while c < COLS:
            reg.append([0, c])
            c *= 2
        r = 16 * NW
        while r < BN:
            reg.append([r, 0])
            r *= 2
        warps = [[16 << i, 0] for i in range(NW.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=[[0, PER], [0, 2 * PER], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=warps, block_bases=[], shape=[BN, COLS])

    @gluon.jit
    def _kinv_of(k):
        """The slot of element offsets ``k`` (the inverse of ``KMAP``, the piece kept); pairs stay contiguous
        (the hint sits on the last op, which inlining keeps)."""
        s = k % 64
        p = 32 * ((s >> 3) & 1) + 16 * ((s >> 2) & 1) + 8 * ((s >> 1) & 1) + 2 * (s >> 4) + (s & 1)
        return gl.max_contiguous(gl.multiple_of(k - s + p, 2), 2)

    @gluon.jit
    def _gdc(PDL: gl.constexpr, WAIT: gl.constexpr = True, LAUNCH: gl.constexpr = True):
        """With PDL: (``WAIT``) wait until the previous kernel has finished and its writes are visible, then
        (``LAUNCH``) let the next kernel's programs launch (they fill the SMs this launch's last programs leave)."""
        if PDL:
            if WAIT:
                gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                          pack=1)
            if LAUNCH:
                gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)

    @gluon.jit
    def _dequant(w, s, BN: gl.constexpr, BK: gl.constexpr, DOT: gl.constexpr):
        """Words ``[BN, BK/8]`` and their scale bytes -> the bf16 A operand ``[BN, BK]`` in slot order, in
        ``DOT`` without moving data between threads (``assert_trivial``)."""
        e0, e1, e2, e3, e4, e5, e6, e7 = gl.inline_asm_elementwise(
            _WORD_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [w, s.to(gl.int16)], dtype=(gl.bfloat16,) * 8,
            is_pure=True, pack=1)
        # element n = 4j + 2q + b of word (t, h) goes to slot 32h + 16j + 8q + 2t + b
        v = gl.join(gl.join(gl.join(e0, e4), gl.join(e2, e6)), gl.join(gl.join(e1, e5), gl.join(e3, e7)))
        v = gl.reshape(v, [BN, BK // 64, 4, 2, 2, 2, 2])
        v = gl.permute(v, [0, 1, 3, 4, 5, 2, 6])
        return gl.convert_layout(gl.reshape(v, [BN, BK]), DOT, assert_trivial=True)

    @gluon.jit
    def _piece_offsets(row0, nlim, K, ROWS2, BN: gl.constexpr, NT: gl.constexpr, BK: gl.constexpr, P: gl.constexpr,
                       L: gl.constexpr, HALVES: gl.constexpr = False):
        """Offsets, in units of ``P`` a row's 64-element piece (8 words or 4 scale bytes), of the ``[NT * BN,
        BK / 64 * P]`` banded units a step starts at (gate rows from ``row0``, then with NT 2 up rows ``ROWS2``
        further), and which rows to load (those before ``nlim``; with ``HALVES`` the second set's rows count from
        ``BN``), in layout ``L``."""
        n = gl.arange(0, NT * BN, layout=gl.SliceLayout(1, L))
        row = row0 + n % BN + (n // BN) * ROWS2
        rr = row % 16
        c = gl.arange(0, BK // (64 // P), layout=gl.SliceLayout(0, L))
        off = ((row - rr) * (K // (64 // P)) + rr * P)[:, None] + ((c // P) * (16 * P) + c % P)[None, :]
        lim = n if HALVES else n % BN  # halves: the second set is rows BN.. of one tile
        return off, (lim < nlim)[:, None] & (c < BK // (64 // P))[None, :]

    @gluon.jit
    def _slot(BM: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr, XS: gl.constexpr, PLAIN: gl.constexpr):
        """One ring slot: the token tile, the weight words and the scale bytes of ``ROWS`` weight rows."""
        return (gl.allocate_shared_memory(gl.bfloat16, [BM, BK], XS),
                gl.allocate_shared_memory(gl.int32, [ROWS, BK // 8], PLAIN),
                gl.allocate_shared_memory(gl.uint8, [ROWS, BK // 16], PLAIN))

    @gluon.jit
    def _ring(BM: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr, XS: gl.constexpr, PLAIN: gl.constexpr,
              STAGES: gl.constexpr):
        """A ring of ``STAGES`` (2-4) slots, each its own allocations, as (token tiles, words, scales) by slot;
        slots past ``STAGES`` are the first one again (never indexed)."""
        r0 = _slot(BM, BK, ROWS, XS, PLAIN)
        r1 = _slot(BM, BK, ROWS, XS, PLAIN)
        r2 = r0
        r3 = r0
        if STAGES > 2:
            r2 = _slot(BM, BK, ROWS, XS, PLAIN)
        if STAGES > 3:
            r3 = _slot(BM, BK, ROWS, XS, PLAIN)
        return (r0[0], r1[0], r2[0], r3[0]), (r0[1], r1[1], r2[1], r3[1]), (r0[2], r1[2], r2[2], r3[2])

    @gluon.jit
    def _copy_step(xs, ws, ss, a_ptrs, a_mask, wp, w_off, w_ok, s_ptr, s_off, s_ok, step, BK: gl.constexpr):
        """Start one K step's copies into one ring slot: the token tile, the weight words, the scale bytes."""
        async_copy.async_copy_global_to_shared(xs, a_ptrs + step * BK, mask=a_mask)
        async_copy.async_copy_global_to_shared(ws, wp + w_off + step * (2 * BK), mask=w_ok)
        async_copy.async_copy_global_to_shared(ss, s_ptr + s_off + step * BK, mask=s_ok)

    @gluon.jit
    def _weight_tile(ws, ss, WL: gl.constexpr, SL: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                     DOT: gl.constexpr):
        """One ``[BN, BK]`` weight tile of a ring slot, dequantized into wgmma's A operand."""
        sb = ss.load(SL)
        s = gl.convert_layout(gl.reshape(gl.join(sb, sb), [BN, BK // 8]), WL)  # word 2t + h takes group t's scale
        return _dequant(ws.load(WL), s, BN, BK, DOT)

    @gluon.jit
    def _pipe_step(xs, ws, ss, a_ptrs, a_mask, wp, w_off, w_ok, s_ptr, s_off, s_ok, step, steps, acc, acc2, prev,
                   j: gl.constexpr, WL: gl.constexpr, SL: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                   DOT: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr, TWO: gl.constexpr):
        """One K step in ring slot ``j`` with asynchronous wgmma: one group stays in flight while the next tile is
        dequantized (gate while the previous up runs, up while this gate runs)."""
        # this step's slot has landed for every thread; every warp is done reading the previous step's words
        async_copy.wait_group(STAGES - 2)
        gl.thread_barrier()
        fence_async_shared()
        b = xs[j].permute((1, 0))
        a = _weight_tile(ws[j].slice(0, BN), ss[j].slice(0, BN), WL, SL, BN, BK, DOT)
        acc = warpgroup_mma(a, b, acc, is_async=True)
        # the previous step's last group done: its slot and A registers are free
        if TWO or j > 0:
            acc, acc2, a, prev = warpgroup_mma_wait(1, deps=[acc, acc2, a, prev])
        if NW > 4:  # the other warpgroup's group read the slot too
            gl.thread_barrier()
        if step + STAGES - 1 < steps:  # into the previous step's slot
            _copy_step(xs[(j + STAGES - 1) % STAGES], ws[(j + STAGES - 1) % STAGES], ss[(j + STAGES - 1) % STAGES],
                       a_ptrs, a_mask, wp, w_off, w_ok, s_ptr, s_off, s_ok, step + STAGES - 1, BK)
        async_copy.commit_group()
        if TWO:
            a2 = _weight_tile(ws[j].slice(BN, BN), ss[j].slice(BN, BN), WL, SL, BN, BK, DOT)
            acc2 = warpgroup_mma(a2, b, acc2, is_async=True)
            acc, acc2, a, a2 = warpgroup_mma_wait(1, deps=[acc, acc2, a, a2])
            prev = a2
        elif j == STAGES - 1:  # a loop-carried A tile in flight makes ptxas serialize: drain
            acc, a = warpgroup_mma_wait(0, deps=[acc, a])
        else:
            prev = a
        return acc, acc2, prev

    @gluon.jit
    def _mainloop(a_ptrs, a_mask, w_ptr, s_ptr, row0, nlim, K, ROWS2, BM: gl.constexpr, BN: gl.constexpr,
                  BK: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr, TWO: gl.constexpr, REM: gl.constexpr,
                  HALVES: gl.constexpr = False, PDL: gl.constexpr = 0):
        """``W @ A^T`` over K for the ``BN`` weight rows from ``row0`` (and, with TWO, those ``ROWS2`` further:
        gate and up, or with HALVES the next ``BN`` rows of one tile; rows from ``nlim`` on are not loaded)
        against the ``[BM, BK]`` activation tiles at ``a_ptrs + step * BK`` (slot order): fp32 ``[BN, BM]``
        accumulators in the wgmma layout.  Each step's token tile, weight words and scale bytes travel together by
        ``cp.async`` into one slot of a ``STAGES``-slot ring (one commit group); the words and scales are read from
        there in the fragment's layout (a band's piece is 512 contiguous bytes in memory and in the slot).  With
        ``PDL`` 1 the first steps' weight copies start before the wait for the previous kernel (the weights are
        final; the token tiles are its output): one group of them, then one group a step of the token tiles, so
        a step's wait still finds its copies done (one group more at the front only completes earlier)."""
        NT: gl.constexpr = 2 if TWO else 1
        WL: gl.constexpr = _band_layout(BN, BK // 8, NW, 2)
        SL: gl.constexpr = _band_layout(BN, BK // 16, NW, 1)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BM, 16])
        DOT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        XS: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
        PLAIN: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        # copies: 16 bytes a lane for the words (a warp moves 16 rows' pieces), 4 for a row's scales
        CW: gl.constexpr = gl.BlockedLayout([1, 4], [16, 2], [NW, 1], [1, 0])
        CS: gl.constexpr = gl.BlockedLayout([1, 4], [32, 1], [NW, 1], [1, 0])
        # one allocation a slot and the loop unrolled by the ring, so each step's slot is a constant: Triton's
        # barrier pass tells allocations apart (not slots of one), and the step's own barrier is the only one
        xs, ws, ss = _ring(BM, BK, NT * BN, XS, PLAIN, STAGES)  # weight rows: gate, then up
        w_off, w_ok = _piece_offsets(row0, nlim, K, ROWS2, BN, NT, BK, 8, CW, HALVES)
        s_off, s_ok = _piece_offsets(row0, nlim, K, ROWS2, BN, NT, BK, 4, CS, HALVES)
        wp = w_ptr.to(gl.pointer_type(gl.int32))
        steps = K // BK  # REM: steps % STAGES
        J0: gl.constexpr = STAGES - REM  # step 0's slot: with REM, the steps past whole turns run first
        if PDL == 1:
            for i in gl.static_range(STAGES - 1):
                if i < steps:
                    async_copy.async_copy_global_to_shared(ws[(J0 + i) % STAGES], wp + w_off + i * (2 * BK),
                                                           mask=w_ok)
                    async_copy.async_copy_global_to_shared(ss[(J0 + i) % STAGES], s_ptr + s_off + i * BK, mask=s_ok)
            async_copy.commit_group()
            _gdc(True)
            for i in gl.static_range(STAGES - 1):
                if i < steps:
                    async_copy.async_copy_global_to_shared(xs[(J0 + i) % STAGES], a_ptrs + i * BK, mask=a_mask)
                async_copy.commit_group()
        else:
            for i in gl.static_range(STAGES - 1):
                if i < steps:
                    _copy_step(xs[(J0 + i) % STAGES], ws[(J0 + i) % STAGES], ss[(J0 + i) % STAGES], a_ptrs, a_mask,
                               wp, w_off, w_ok, s_ptr, s_off, s_ok, i, BK)
                async_copy.commit_group()
        acc = gl.zeros([BN, BM], gl.float32, MMA)
        acc2 = gl.zeros([BN, BM], gl.float32, MMA)
        prev = gl.zeros([BN, BK], gl.bfloat16, DOT)  # the A tile of the group still in flight
        # every step pipelined and unguarded: a branch around an asynchronous wgmma makes ptxas serialize them
        if REM > 0:  # the REM steps in the ring's last slots, then whole turns entered with nothing in flight
            for j in gl.static_range(J0, STAGES):
                acc, acc2, prev = _pipe_step(xs, ws, ss, a_ptrs, a_mask, wp, w_off, w_ok, s_ptr, s_off, s_ok, j - J0,
                                             steps, acc, acc2, prev, j, WL, SL, BN, BK, DOT, NW, STAGES, TWO)
            acc, acc2 = warpgroup_mma_wait(0, deps=[acc, acc2])
            prev = gl.zeros([BN, BK], gl.bfloat16, DOT)
        for first in range(REM, steps - steps % STAGES + REM, STAGES):
            for j in gl.static_range(STAGES):
                acc, acc2, prev = _pipe_step(xs, ws, ss, a_ptrs, a_mask, wp, w_off, w_ok, s_ptr, s_off, s_ok,
                                             first + j, steps, acc, acc2, prev, j, WL, SL, BN, BK, DOT, NW,
                                             STAGES, TWO)
        acc, acc2 = warpgroup_mma_wait(0, deps=[acc, acc2])
        if REM == 0:
            # Never runs (steps % STAGES is REM), but ptxas serializes the loop's wgmmas (C7515) without a use of
            # the accumulators after it: this is the synchronous remainder the loop had before REM, kept as it was
            for j in gl.static_range(STAGES - 1):
                step = steps - steps % STAGES + j
                if step < steps:
                    async_copy.wait_group(STAGES - 2)
                    gl.thread_barrier()
                    fence_async_shared()
                    a = _weight_tile(ws[j].slice(0, BN), ss[j].slice(0, BN), WL, SL, BN, BK, DOT)
                    if TWO:
                        a2 = _weight_tile(ws[j].slice(BN, BN), ss[j].slice(BN, BN), WL, SL, BN, BK, DOT)
                    async_copy.commit_group()
                    b = xs[j].permute((1, 0))
                    acc = warpgroup_mma(a, b, acc)
                    if TWO:
                        acc2 = warpgroup_mma(a2, b, acc2)
        async_copy.wait_group(0)
        return acc, acc2

    @gluon.jit
    def _block(bexp_ptr, NFIRST: gl.constexpr):
        """This program's expert (or -1), its block and its column tile."""
        pid_m = gl.program_id(1 if NFIRST else 0)
        return gl.load(bexp_ptr + pid_m), pid_m, gl.program_id(0 if NFIRST else 1)

    @gluon.jit
    def _start(e, pid_m, pid_n, PDL: gl.constexpr):
        """``PDL`` 2 (a launch that overlaps the one before it): let the next kernel launch at once.  Chained or
        overlapping, a program without a block returns at once, but block 0's waits first: a launch with no
        blocks still ends only after the one before it, which the next one's wait relies on."""
        if PDL == 2:
            _gdc(True, WAIT=False)
        if PDL > 0:
            if (e < 0) & (pid_m + pid_n == 0):
                _gdc(True, LAUNCH=False)

    @gluon.jit
    def _gemm1_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, bexp_ptr, out_ptr, num_pairs, H, I, stride_x,
                      TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, BM: gl.constexpr,
                      BN: gl.constexpr, BK: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr,
                      NFIRST: gl.constexpr, REM: gl.constexpr, ALPHA: gl.constexpr = 1.702,
                      BETA: gl.constexpr = 1.0, LIMIT: gl.constexpr = 7.0, PDL: gl.constexpr = 0):
        """GEMM1 + activation for one (row block of one expert, BN intermediate columns) of the hidden states in
        slot order (``_slot_order_kernel``): the intermediate ``[rows, I]`` bf16, each 64-column piece in slot
        order too (GEMM2's A operand)."""
        e, pid_m, pid_n = _block(bexp_ptr, NFIRST)
        _start(e, pid_m, pid_n, PDL)
        if e < 0:
            return
        _gemm1_block(x_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, out_ptr, num_pairs, H, I, stride_x, e,
                     pid_m * BM, pid_n, TOP_K, GATED, ACT, BM, BN, BK, NW, STAGES, REM, ALPHA, BETA, LIMIT, PDL)
        _gdc(PDL == 2, LAUNCH=False)  # overlapping the launch before: end only after it

    @gluon.jit
    def _gemm1_block(x_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, out_ptr, num_pairs, H, I, stride_x, e, row0, pid_n,
                     TOP_K: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, BM: gl.constexpr,
                     BN: gl.constexpr, BK: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr, REM: gl.constexpr,
                     ALPHA: gl.constexpr, BETA: gl.constexpr, LIMIT: gl.constexpr, PDL: gl.constexpr):
        """GEMM1 of the ``BM`` grouped rows from ``row0`` (all of expert ``e``) and column tile ``pid_n``."""
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
        pair = gl.load(sorted_ptr + row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, XL)))
        e64 = e.to(gl.int64)
        tok = (pair // TOP_K).to(gl.int64)
        x_ptrs = x_ptr + tok[:, None] * stride_x + gl.arange(0, BK, layout=gl.SliceLayout(0, XL))[None, :]
        x_mask = (pair < num_pairs)[:, None]
        # ungated 128-column tiles as two 64-row halves: the pipelined wgmma keeps one half in flight
        HALVES: gl.constexpr = not GATED and BN == 128 and NW == 4
        HB: gl.constexpr = BN // 2 if HALVES else BN
        g, u = _mainloop(x_ptrs, x_mask, w_ptr, s_ptr, e64 * (2 * I if GATED else I) + pid_n * BN, I - pid_n * BN,
                         H, HB if HALVES else I, BM, HB, BK, NW, STAGES, GATED or HALVES, REM, HALVES, PDL)
        inv = 128.0 / gl.load(gs_ptr + e)  # the dequantized tiles carry 2^-7
        if HALVES:
            # ungated: the second argument (up) is not read
            _gemm1_store(g * inv, g, row0, pid_n * BN, out_ptr, I, BM, HB, NW, ACT, ALPHA, BETA, LIMIT)
            _gemm1_store(u * inv, u, row0, pid_n * BN + HB, out_ptr, I, BM, HB, NW, ACT, ALPHA, BETA, LIMIT)
        else:
            _gemm1_store(g * inv, u * inv, row0, pid_n * BN, out_ptr, I, BM, BN, NW, ACT, ALPHA, BETA, LIMIT)

    @gluon.jit
    def _gemm1_store(g, u, row0, col0, out_ptr, I, BM: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr,
                     ACT: gl.constexpr, ALPHA: gl.constexpr, BETA: gl.constexpr, LIMIT: gl.constexpr):
        """The activation of ``[BN, BM]`` gate (and up) accumulators into intermediate rows ``row0..``, columns
        ``col0..``."""
        h = gl.permute(apply_act(g, u, ACT, ALPHA, BETA, LIMIT).to(gl.bfloat16), [1, 0])
        OL: gl.constexpr = gl.BlockedLayout([1, 2], [4, 8], [NW, 1], [1, 0])
        h = gl.convert_layout(h, OL)
        rows_o = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, OL))
        n_o = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, OL))
        cols = _kinv_of(n_o)
        gl.store(out_ptr + rows_o.to(gl.int64)[:, None] * I + cols[None, :], h, mask=(n_o < I)[None, :])

    @gluon.jit
    def _gemm2_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, bexp_ptr, tw_ptr, y_ptr, num_pairs, H, I,
                      BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NW: gl.constexpr,
                      STAGES: gl.constexpr, NFIRST: gl.constexpr, REM: gl.constexpr, PDL: gl.constexpr = 0):
        """GEMM2 for one (row block, BN hidden columns): each pair's row times its routing weight into
        ``y [pairs, H]`` (y's dtype); the intermediate rows are in slot order already (16-byte copies)."""
        e, pid_m, pid_n = _block(bexp_ptr, NFIRST)
        _start(e, pid_m, pid_n, PDL)
        if e < 0:
            return
        _gemm2_block(a_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, tw_ptr, y_ptr, num_pairs, H, I, e, pid_m * BM,
                     pid_n, BM, BN, BK, NW, STAGES, REM, PDL)
        _gdc(PDL == 2, LAUNCH=False)

    @gluon.jit
    def _gemm2_block(a_ptr, w_ptr, s_ptr, gs_ptr, sorted_ptr, tw_ptr, y_ptr, num_pairs, H, I, e, row0, pid_n,
                     BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, NW: gl.constexpr, STAGES: gl.constexpr,
                     REM: gl.constexpr, PDL: gl.constexpr):
        """GEMM2 of the ``BM`` grouped rows from ``row0`` (all of expert ``e``) and column tile ``pid_n``."""
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
        rows = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, XL))
        pair = gl.load(sorted_ptr + rows)
        e64 = e.to(gl.int64)
        ka = gl.arange(0, BK, layout=gl.SliceLayout(0, XL))
        a_ptrs = a_ptr + rows.to(gl.int64)[:, None] * I + ka[None, :]
        a_mask = (pair < num_pairs)[:, None]
        # 128-column tiles as two 64-row halves: the pipelined wgmma keeps one half in flight
        HALVES: gl.constexpr = BN == 128 and NW == 4
        HB: gl.constexpr = BN // 2 if HALVES else BN
        acc, acc2 = _mainloop(a_ptrs, a_mask, w_ptr, s_ptr, e64 * H + pid_n * BN, H - pid_n * BN, I, HB, BM, HB,
                              BK, NW, STAGES, HALVES, REM, HALVES, PDL)
        scale = 128.0 / gl.load(gs_ptr + e)
        _gemm2_store(acc, row0, pid_n * BN, scale, sorted_ptr, tw_ptr, y_ptr, num_pairs, H, BM, HB, NW)
        if HALVES:
            _gemm2_store(acc2, row0, pid_n * BN + HB, scale, sorted_ptr, tw_ptr, y_ptr, num_pairs, H, BM, HB, NW)

    @gluon.jit
    def _gemm2_store(acc, row0, col0, scale, sorted_ptr, tw_ptr, y_ptr, num_pairs, H, BM: gl.constexpr,
                     BN: gl.constexpr, NW: gl.constexpr):
        """``[BN, BM]`` accumulators of grouped rows ``row0..`` times each pair's routing weight into ``y`` columns
        ``col0..``."""
        OL: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [NW, 1], [1, 0])
        acc = gl.convert_layout(gl.permute(acc, [1, 0]), OL)
        rows_o = row0 + gl.arange(0, BM, layout=gl.SliceLayout(1, OL))
        pair_o = gl.load(sorted_ptr + rows_o)
        ok = pair_o < num_pairs
        n_o = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, OL))
        tw = gl.load(tw_ptr + pair_o, mask=ok, other=0.0)
        y = acc * (tw * scale)[:, None]
        gl.store(y_ptr + pair_o.to(gl.int64)[:, None] * H + n_o[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok[:, None] & (n_o < H)[None, :])


if triton is not None:
    import triton.language as tl

    from moe_passes.kernels.triton_common import gdc

    @triton.jit
    def _slot_order_kernel(x_ptr, out_ptr, H, stride_x, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """``out[t, p] = x[t, KMAP(p)]`` per 64-element piece: the hidden states in slot order."""
        gdc(PDL)  # out may be memory the previous kernel still used
        t = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        s = p % 64
        k = p - s + 16 * ((s >> 1) & 3) + 8 * ((s >> 5) & 1) + 4 * ((s >> 4) & 1) + 2 * ((s >> 3) & 1) + (s & 1)
        k = tl.max_contiguous(tl.multiple_of(k, 2), 2)
        tl.store(out_ptr + t * H + p, tl.load(x_ptr + t * stride_x + k, mask=p < H), mask=p < H)


# a launch's place in a chain of launches (the kernels' PDL): none, chained (waits for the launch before it,
# then lets the next one start), overlapping (lets the next one start at once, ends after the launch before it)
ALONE, CHAINED, OVERLAPS = 0, 1, 2


def gemm1_constexprs(c, *, top_k: int, gated: bool, hidden: int, nfirst: bool, act: dict, pdl: int = ALONE) -> dict:
    """GEMM1's compile-time arguments for tile config ``c`` (``act``: the activation's, ``epilogue_args``)."""
    return dict(TOP_K=top_k, GATED=gated, BM=c.bm, BN=c.bn1, BK=c.bk1, NW=c.warps1, STAGES=c.stages1, NFIRST=nfirst,
                REM=hidden // c.bk1 % c.stages1, PDL=int(pdl), **act)


def gemm2_constexprs(c, *, inter: int, nfirst: bool, pdl: int = ALONE) -> dict:
    """GEMM2's compile-time arguments for tile config ``c``."""
    return dict(BM=c.bm, BN=c.bn2, BK=c.bk2, NW=c.warps2, STAGES=c.stages2, NFIRST=nfirst,
                REM=inter // c.bk2 % c.stages2, PDL=int(pdl))


def launch_roles(launches: int, pdl: bool, overlap: bool):
    """``(GEMM1's, GEMM2's)`` ``(kernel PDL, launched as dependent)`` for each of ``launches`` launches (main,
    then tail): all chained with ``pdl``; with ``overlap`` and a tail launch, each tail launch overlaps its main
    launch, and GEMM2's main launch waits for GEMM1's tail launch, which ends after GEMM1's main launch."""
    if overlap and launches == 2:
        return [(CHAINED if pdl else OVERLAPS, pdl), (OVERLAPS, True)], [(CHAINED, True), (OVERLAPS, True)]
    return ([(CHAINED if pdl else ALONE, pdl)] * launches,) * 2


def run_wgmma_tiles(launch, launches, hidden_states, weights, topk_w, y, *, pairs, hidden, inter, top_k, gated, act,
                    pdl=False, overlap=False):
    """GEMM1 then GEMM2 of each ``(tile config, sorted rows, intermediate rows, block map, blocks)`` in
    ``launches`` (:func:`triton_tiles.run_tiles`' list: the main blocks', then the tail blocks') on these tiles;
    ``y [1, pairs, hidden]``.  ``pdl``: the launches chained by programmatic dependent launch (the grouping's
    before them, the combine after).  ``overlap`` (a main and a tail launch): each tail launch starts while its
    main launch runs and ends after it; GEMM2's main launch waits for GEMM1's tail launch, and so for both GEMM1
    launches."""
    from moe_passes.kernels.triton_tiles import tile_grid

    w13, w13_scale, w13_gs, w2, w2_scale, w2_gs = weights
    tokens = hidden_states.shape[0]
    x = torch.empty(tokens, hidden, dtype=hidden_states.dtype, device=hidden_states.device)
    launch(_slot_order_kernel, (tokens, triton.cdiv(hidden, 1024)), hidden_states, x, hidden, hidden_states.stride(0),
           BLOCK=1024, PDL=pdl, num_warps=4, launch_pdl=pdl)
    roles = launch_roles(len(launches), pdl, overlap)
    for i, (c, rows_ids, rows_inter, block_map, nblocks) in enumerate(launches):
        grid1, nfirst = tile_grid(c, nblocks, triton.cdiv(inter, c.bn1))
        role, dependent = roles[0][i]
        launch(_gemm1_kernel, grid1, x, w13, w13_scale.view(torch.uint8), w13_gs, rows_ids, block_map, rows_inter,
               pairs, hidden, inter, x.stride(0), num_warps=c.warps1, launch_pdl=dependent,
               **gemm1_constexprs(c, top_k=top_k, gated=gated, hidden=hidden, nfirst=nfirst, act=act, pdl=role))
    for i, (c, rows_ids, rows_inter, block_map, nblocks) in enumerate(launches):
        grid2, nfirst = tile_grid(c, nblocks, triton.cdiv(hidden, c.bn2))
        role, dependent = roles[1][i]
        launch(_gemm2_kernel, grid2, rows_inter, w2, w2_scale.view(torch.uint8), w2_gs, rows_ids, block_map, topk_w, y,
               pairs, hidden, inter, num_warps=c.warps2, launch_pdl=dependent,
               **gemm2_constexprs(c, inter=inter, nfirst=nfirst, pdl=role))
