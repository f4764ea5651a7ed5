"""What the Triton kernels of the Hopper path share (:mod:`triton_moe`, :mod:`triton_tc_decode`,
:mod:`triton_tiles`, :mod:`triton_group`, :mod:`triton_route`): the optional Triton import, the programmatic-dependent-launch wait, the PTX that cuts
an E2M1 word, the banded weight addressing, the fused activations and the kernel that finishes a split
GEMM1.

Triton is imported behind a guard: on a CPU-only machine without it ``triton`` and ``tl`` are None and no
kernel is defined.
"""

from __future__ import annotations

from moe_passes.contract import PARAMETRIC_ACTIVATIONS, activation_params

try:  # Triton is optional: CPU-only installs do not have it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU CI
    triton = None
    tl = None
try:  # programmatic dependent launch (Triton >= 3.4); without it the kernels just do not overlap
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


def _ptxas_as_inductor() -> None:
    """Point Triton at the ptxas inductor picks (on torch 2.11 its bundled ``torch/bin/ptxas``, unless
    ``TRITON_PTXAS_PATH`` is set), as inductor does before it compiles or loads a kernel in this process.

    Triton's disk-cache key holds the version of its ptxas, and inductor sets the path in-process only on some
    paths (on an H100 it was set in a warm process that loaded inductor's cached graphs, unset in the cold one
    that compiled them in worker processes), so our kernels' keys depended on inductor's history in the process
    and a warm second process compiled every one of them again."""
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    except ImportError:  # pragma: no cover - a torch without it: Triton's own ptxas, as before
        return
    _set_triton_ptxas_path()


if triton is not None:
    _ptxas_as_inductor()

# The activation codes of the Triton epilogues (``apply_act``) and of the CUDA decode's ``ACT`` define (which
# has no branch for swiglu_oai: ``cuda_decode`` refuses it).
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu2": 3, "swiglu_oai": 4}


def act_constexprs(activation: str, params=None) -> dict:
    """The activation's constexpr launch arguments of a GEMM1 epilogue: ``ACT``, and for ``swiglu_oai`` its
    ``ALPHA``, ``BETA``, ``LIMIT`` (``params`` as ``contract.activation_params`` takes them).  The parameters
    are compiled in: a model has one set, and the other activations' kernels keep their code and cache key."""
    if activation not in PARAMETRIC_ACTIVATIONS:
        return dict(ACT=ACT_CODES[activation])
    alpha, beta, limit = activation_params(activation, params)
    return dict(ACT=ACT_CODES[activation], ALPHA=alpha, BETA=beta, LIMIT=limit)


def epilogue_args(activation: str, params, w13_bias, w2_bias) -> tuple:
    """``(act, bias1, bias2)``: the launch keywords of the GEMM epilogues (``act_constexprs``), and of the expert
    biases for GEMM1 (``b13_ptr``, ``HAS_B1``) and GEMM2 (``b2_ptr``, ``HAS_B2``), empty where a layer has none so
    that its launches stay as they were."""
    bias1 = {} if w13_bias is None else dict(b13_ptr=w13_bias, HAS_B1=True)
    bias2 = {} if w2_bias is None else dict(b2_ptr=w2_bias, HAS_B2=True)
    return act_constexprs(activation, params), bias1, bias2


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1): Triton's block sizes."""
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    def word_cut_asm(word: str, p: str) -> str:
        """PTX that cuts one 32-bit word of the Triton layout (8 E2M1 codes, see ``triton_layout``) into four
        packed bf16 pairs ``{p}0..{p}3`` (elements 2j, 2j+1) with shifts and masks: bf16 ``e2m1 * 2^-126``
        patterns, zero and the subnormal 0.5 included.  Declares its registers ``{p}0..{p}3, {p}t``, so
        call it inside a ``{ }`` scope, once per prefix."""
        return f"""
        .reg .b32 {p}0, {p}1, {p}2, {p}3, {p}t;
        and.b32 {p}0, {word}, 0x81C081C0;
        shl.b32 {p}1, {word}, 3;
        and.b32 {p}1, {p}1, 0x81C081C0;
        shl.b32 {p}2, {word}, 6;
        and.b32 {p}2, {p}2, 0x81C081C0;
        shl.b32 {p}t, {word}, 1;
        and.b32 {p}t, {p}t, 0x80008000;
        shr.u32 {p}3, {word}, 5;
        and.b32 {p}3, {p}3, 0x01000100;
        or.b32 {p}t, {p}t, {p}3;
        shr.u32 {p}3, {word}, 4;
        and.b32 {p}3, {p}3, 0x00C000C0;
        or.b32 {p}3, {p}3, {p}t;
        """

    def scale_pairs_asm(scale: str) -> str:
        """PTX after :func:`word_cut_asm` (prefix ``p``): each pair times the bf16x2 ``scale`` with one FMA (adding
        -0 leaves the product alone), the 8 bf16 out in ``$0 .. $7``.  Declares ``z``."""
        return f"""
        .reg .b32 z;
        mov.b32 z, 0x80008000;
        fma.rn.bf16x2 p0, p0, {scale}, z;
        fma.rn.bf16x2 p1, p1, {scale}, z;
        fma.rn.bf16x2 p2, p2, {scale}, z;
        fma.rn.bf16x2 p3, p3, {scale}, z;
        mov.b32 {{$0, $1}}, p0;
        mov.b32 {{$2, $3}}, p1;
        mov.b32 {{$4, $5}}, p2;
        mov.b32 {{$6, $7}}, p3;
        """

    if gdc_wait is None:  # pragma: no cover - a Triton without the PDL intrinsics: the launches stay serial
        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

    @triton.jit
    def band_off(g, rr, KG):
        """Offset, in groups, of group ``g`` of band row ``rr`` (0..15) from its band's start, for rows of
        ``KG`` groups: ``triton_layout.band_offset`` (pieces of 4 groups, the last one narrower)."""
        p = g // 4
        width = tl.where(p < KG // 4, 4, KG - (KG // 4) * 4)
        return p * 64 + rr * width + (g - p * 4)

    @triton.jit
    def gdc(PDL: tl.constexpr, LAUNCH: tl.constexpr = True, LAUNCH_FIRST: tl.constexpr = False):
        """With PDL: wait until the previous kernel has finished and its writes are visible, then let the next
        kernel's programs launch.  Every program passes here before its first write and before it reads
        what the previous kernel wrote: its programs may start while that kernel still runs (and this
        call's workspace may be memory the caching allocator took back from it).

        LAUNCH_FIRST lets the next kernel launch before the wait: only for a kernel whose successor reads,
        before its own wait, nothing but what was final before this kernel's predecessor's programs passed
        their own waits (weights, routing ids): that successor may then start while the predecessor still
        runs."""
        if PDL:
            if LAUNCH_FIRST:
                gdc_launch_dependents()
            gdc_wait()
            if LAUNCH and not LAUNCH_FIRST:
                gdc_launch_dependents()

    @triton.jit
    def apply_act(g, u, ACT: tl.constexpr, ALPHA: tl.constexpr = 1.702, BETA: tl.constexpr = 1.0,
                  LIMIT: tl.constexpr = 7.0):
        """The activation of fp32 gate ``g`` and up ``u`` (``ALPHA``/``BETA``/``LIMIT``: swiglu_oai's only)."""
        if ACT == 4:  # gpt-oss's clamped SwiGLU (contract.SwigluOAI)
            gc = tl.minimum(g, LIMIT)
            uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
            return gc * tl.sigmoid(ALPHA * gc) * (uc + BETA)
        elif ACT == 0:  # SwiGLU
            return g * tl.sigmoid(g) * u
        elif ACT == 1:  # GeGLU, erf GELU
            return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
        elif ACT == 2:  # GeGLU, tanh GELU; tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            return 0.5 * g * (2.0 * tl.sigmoid(2.0 * z)) * u
        else:  # ReLU^2 (not gated; u unused)
            r = tl.maximum(g, 0.0)
            return r * r

    @triton.jit
    def act_kernel(part_ptr, out_ptr, num_pairs, I, GATED: tl.constexpr, ACT: tl.constexpr,
                    SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                    LAUNCH_FIRST: tl.constexpr = False, ids_ptr=None, b13_ptr=None, HAS_B1: tl.constexpr = False,
                    ALPHA: tl.constexpr = 1.702, BETA: tl.constexpr = 1.0, LIMIT: tl.constexpr = 7.0):
        """Sum the split-K partials of GEMM1 and apply the activation: bf16 intermediate ``[pairs, I]``.
        LAUNCH_FIRST (see ``gdc``): the GEMM2 after it loads weights before its wait.  HAS_B1: add the pair's
        expert's (``ids_ptr``) row of ``b13_ptr [E, N1]`` fp32 before the activation (None pointers without)."""
        gdc(PDL, LAUNCH_FIRST=LAUNCH_FIRST)
        pair = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < I
        N1 = 2 * I if GATED else I
        g = tl.zeros([BLOCK], dtype=tl.float32)
        u = tl.zeros([BLOCK], dtype=tl.float32)
        for sp in tl.static_range(SPLIT):
            base = part_ptr + (sp * num_pairs + pair) * N1 + offs
            g += tl.load(base, mask=ok, other=0.0)
            if GATED:
                u += tl.load(base + I, mask=ok, other=0.0)
        if HAS_B1:
            # another rank's pair (id -1, expert parallel) reads expert 0's row: its output is never read
            b = b13_ptr + tl.maximum(tl.load(ids_ptr + pair), 0).to(tl.int64) * N1 + offs
            g += tl.load(b, mask=ok, other=0.0)
            if GATED:
                u += tl.load(b + I, mask=ok, other=0.0)
        tl.store(out_ptr + pair * I + offs, apply_act(g, u, ACT, ALPHA, BETA, LIMIT).to(tl.bfloat16), mask=ok)
