"""One-token NVFP4 MoE decode in one persistent CUDA launch (Hopper, SM90).

At one token the layer is a few microseconds of weight bytes (Qwen3-30B-A3B: 21 MB, 5.0 us at 4.25 TB/s),
and the Triton path spends as long again on its kernel boundaries: routing, GEMM1, GEMM2 and the combine
are separate launches, each draining the memory pipe before the next fills it.  Fewer-launch Triton decodes
were slower: a Triton program cannot keep another phase's weights in flight while it waits (its phases share
one register allocation).  :file:`cuda_decode1.cu` does it by hand:

- one CTA per SM, each routing the token itself (the logits are a few hundred bytes);
- work is split by the intermediate: a CTA owns *segments* (:func:`segments`), each some consecutive 16-row
  bands of one slot's intermediate, and computes their GEMM1 rows, the activation, and their whole GEMM2
  contribution (every hidden row, K = the segment's columns), so nothing it multiplies comes from another
  CTA;
- a producer warp streams all of that (w13 bands, then the segment's w2 piece blocks) into a ring of
  shared-memory stages with bulk copies, as far ahead as the ring allows; consumer warps decode each stage on
  the tensor cores (the Triton layout's E2M1 cut, ``mma.sync``, block scales applied to the MMA results);
- the CTAs' fp32 partial outputs meet once: one grid barrier, then each CTA sums some hidden bands over every
  partial in a fixed order, so the result does not depend on timing.

On by default for one token: on the H200 it is at least as fast as the Triton decode on all four benchmark
shapes, and its output does not depend on timing (docs/performance.md); ``KernelOptions.cuda_decode``
(``MOE_NVFP4_CUDA_DECODE=0``) turns it off, and its other knobs are ``KernelOptions.cuda_decode_*``.
``benchmarks/cuda_decode_timeline.py`` shows where its time goes.

The weights are the Triton path's prepared tensors (:func:`triton_moe.prepare_weights`), read as they are.
Numerics are those of ``fused_moe_reference(..., quantize_activations=False)``, like the Triton path.

Limits: one token; a CUDA GPU of compute capability 9.x; routing as :mod:`triton_route` takes it with at
most 512 experts and top-k <= 32, and not sparsemixer (PhiMoE); hidden and intermediate multiples of 16; two stages of one w13 band
(9 bytes per hidden element) and the token's buffers must fit in shared memory.  Other calls take the
Triton path.  Every CTA must be resident at once (one per SM; the grid barrier waits for all of them): the
launch is cooperative, whose contract that is.  Two launches of this decode running at the same time must
use different streams: the barrier's counter is kept per (device, stream, grid).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Optional

import torch

from moe_passes.contract import PARAMETRIC_ACTIVATIONS, is_gated
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.cuda_rtc import RtcError
from moe_passes.kernels.options import KernelOptions, current
from moe_passes.kernels.triton_common import ACT_CODES
from moe_passes.kernels.triton_layout import BAND_ROWS as _BAND, PIECE_GROUPS
from moe_passes.kernels.triton_route import FUSED_ROUTING, METHOD_CODES

__all__ = ["DecodePlan", "plan_decode", "segments", "row_segments", "piece_count", "static_refusal",
           "unsupported_reason", "decode_one_token", "bind_decode", "DecodeCall", "prepare_state", "plan_for", "SOURCE"]

SOURCE = Path(__file__).with_name("cuda_decode1.cu")
_NAME = "moe_nvfp4_decode1"
_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# What the kernel's routing takes (its shared-memory arrays), within what the fused routing takes.
# Its routing code has the methods without parameters (sparsemixer takes the Triton path).
ROUTING = registry.RoutingLimits(max_experts=min(512, FUSED_ROUTING.max_experts),
                                 max_top_k=min(32, FUSED_ROUTING.max_top_k),
                                 methods=frozenset({"default", "renormalize", "deepseek_v3", "llama4"}))
_MAX_STAGES = 16
_PIECE = 16 * PIECE_GROUPS  # elements per piece of the prepared layout's rows
_BLOCK2 = 576  # a stage's room for one w2 piece block: 16 rows x 4 groups of codes (512 B) and scales (64 B)
_BOXB = 16  # hidden bands per GEMM2 tensor copy; a GEMM2 stage holds a multiple of it


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Pipeline sizes of one layer shape: ``stages`` shared-memory stages of ``stage_bytes`` each (one w13
    band, or the w2 piece blocks of some hidden bands), ``grid`` CTAs of ``consumer_warps`` consumer warps
    plus the producer warp, and each CTA's row of the :func:`segments` table."""

    consumer_warps: int
    stages: int
    stage_bytes: int
    dynamic_smem: int
    grid: int
    segments: tuple
    max_units: int  # the most bands in one segment
    max_pieces: int  # the most w2 piece blocks one segment's columns touch
    max_segments: int  # the most segments of one CTA

    @property
    def threads(self) -> int:  # the consumers, then the producer warp
        return 32 * (self.consumer_warps + 1)


def piece_count(j0: int, n: int) -> int:
    """How many 64-element pieces (4 groups) the bands ``[j0, j0 + n)`` of a w2 row touch."""
    return (j0 + n + PIECE_GROUPS - 1) // PIECE_GROUPS - j0 // PIECE_GROUPS


def segments(inter: int, top_k: int, grid: int, max_units: int = 8) -> tuple:
    """Per CTA ``(count, slot, j0, n, slot, j0, n, ...)``: the intermediate bands ``[j0, j0 + n)`` of
    ``slot`` that it computes, through GEMM2.

    With at least as many CTAs as slots, every CTA works on one slot, and a slot's bands are split evenly
    over its CTAs (``ceil`` or ``floor`` of ``grid / top_k`` of them): splitting a CTA's work over two slots
    would make it pay for two slots' GEMM2 weights.  With fewer CTAs, every CTA takes whole slots.  A run of
    more than ``max_units`` bands becomes several segments of near-equal size.
    """
    if grid < 1 or max_units < 1:
        raise ValueError(f"grid ({grid}) and max_units ({max_units}) must be positive")
    bands = inter // _BAND

    def first(k, of, over):  # the first of the `over` items whose share of `of` is k: ceil(k * over / of)
        return -(-k * over // of)

    rows = []
    for c in range(grid):
        if grid >= top_k:
            slot = c * top_k // grid
            lo, hi = first(slot, top_k, grid), first(slot + 1, top_k, grid)
            r, m = c - lo, hi - lo
            runs = [(slot, r * bands // m, (r + 1) * bands // m)]
        else:
            runs = [(s, 0, bands) for s in range(first(c, grid, top_k), first(c + 1, grid, top_k))]
        segs: list = []
        for slot, j0, j1 in runs:
            k = -(-(j1 - j0) // max_units)
            for i in range(k):
                a, b = j0 + (j1 - j0) * i // k, j0 + (j1 - j0) * (i + 1) // k
                if b > a:
                    segs += [slot, a, b - a]
        rows.append((len(segs) // 3, *segs))
    return tuple(rows)


def row_segments(row: tuple) -> list:
    """The ``(slot, j0, n)`` segments of one CTA's row of the :func:`segments` table."""
    return [tuple(row[1 + 3 * i:4 + 3 * i]) for i in range(row[0])]


def _dynamic_extra(hidden: int, gated: bool, max_units: int, consumer_warps: int) -> int:
    """Dynamic shared memory after the ring (the kernel's OFF_X .. SMEM_END): the token's activations (bf16),
    the partial output (fp32), a segment's intermediate (bf16) and its GEMM1 per-warp sums (fp32)."""
    return 2 * hidden + 4 * hidden + 32 * max_units + 64 * (2 if gated else 1) * max_units * consumer_warps


def plan_decode(hidden: int, inter: int, experts: int, top_k: int, gated: bool, n_group: int, sm_count: int,
                smem_limit: int, consumer_warps: int = KernelOptions.cuda_decode_warps, grid: Optional[int] = None,
                max_units: int = KernelOptions.cuda_decode_max_units, stage_cap: Optional[int] = None) -> DecodePlan:
    """The stages that fit in ``smem_limit`` bytes (the device's per-block opt-in limit), or ValueError."""
    if hidden % _BAND or inter % _BAND:
        raise ValueError(f"hidden ({hidden}) and intermediate ({inter}) must be multiples of {_BAND}")
    if not 1 <= consumer_warps <= 31:
        raise ValueError(f"consumer_warps must be 1..31, got {consumer_warps}")
    if grid is None:
        grid = min(sm_count, top_k * (inter // _BAND))
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    rows = segments(inter, top_k, grid, max_units)
    segs = [seg for row in rows for seg in row_segments(row)]
    units = max(n for _, _, n in segs)
    pieces = max(piece_count(j0, n) for _, j0, n in segs)
    most = max(row[0] for row in rows)
    # a 16-row band is 16 * K/2 code bytes and 16 * K/16 scale bytes: 9 K
    stage = -(-max(9 * hidden, _BOXB * pieces * _BLOCK2) // 128) * 128
    extra = _dynamic_extra(hidden, gated, units, consumer_warps)
    # the kernel's static arrays (barriers, routing), rounded up
    static = 16 * _MAX_STAGES + 8 + 20 * (experts + 3) + 4 * n_group + 12 * top_k + 256
    stages = min(stage_cap or _MAX_STAGES, _MAX_STAGES, (smem_limit - extra - static) // stage)
    if stages < 2:
        raise ValueError(f"a w13 band of {stage} bytes leaves room for {max(stages, 0)} shared-memory stages "
                         f"of {smem_limit} bytes; two are needed")
    return DecodePlan(consumer_warps, stages, stage, stages * stage + extra, grid, rows, units, pieces, most)


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def _groups(routing: str, n_group: Optional[int]) -> int:
    return (n_group or 1) if routing == "deepseek_v3" else 1


def static_refusal(hidden: int, inter: int, experts: int, top_k: int, gated: bool, routing: str, n_group, topk_group,
                   sm_count: int, smem_limit: Optional[int], options: KernelOptions, *, biases: bool = False,
                   activation_params: bool = False) -> Optional[str]:
    """Why no call of this layer shape can take the kernel, whatever its tensors, or None: expert biases or a
    parametric activation (gpt-oss: its epilogue has neither), routing limits and, when ``smem_limit`` is
    known, the pipeline's fit (the planner asks this; :func:`unsupported_reason` too)."""
    if biases or activation_params:
        return "no expert biases or activation parameters in its epilogue (the Triton decode takes them)"
    refusal = ROUTING.refusal(routing, top_k, experts, n_group, topk_group)
    if refusal is not None:
        return f"routing the kernel does not take: {refusal}"
    if smem_limit is not None:
        try:
            _plan_decode_cached(hidden, inter, experts, top_k, gated, _groups(routing, n_group), sm_count, smem_limit,
                                options.cuda_decode_warps, None, options.cuda_decode_max_units,
                                options.cuda_decode_stage_cap)
        except ValueError as exc:
            return str(exc)
    return None


@functools.lru_cache(maxsize=None)
def _plan_decode_cached(*args) -> DecodePlan:
    return plan_decode(*args)


def unsupported_reason(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights,
                       top_k: int, activation: str, routing: str, routing_bias, n_group, topk_group,
                       routed_scaling_factor, options: Optional[KernelOptions] = None,
                       biases: bool = False) -> Optional[str]:
    """None when :func:`decode_one_token` takes this call, else why not (the Triton path takes it then).
    ``biases``: the call has expert biases."""
    options = current(options)
    if not options.cuda_decode:
        return "turned off (KernelOptions.cuda_decode, MOE_NVFP4_CUDA_DECODE=0)"
    device = hidden_states.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a compute capability 9.x GPU"
    if hidden_states.shape[0] != 1:
        return "one token only"
    if activation not in ACT_CODES:
        return f"no epilogue for activation {activation!r}"
    experts = router_logits.shape[1]
    w13, s13, g13, w2, s2, g2 = weights
    hidden, inter = w13.shape[2] * 2, w2.shape[2] * 2
    refusal = static_refusal(hidden, inter, experts, top_k, is_gated(activation), routing, n_group, topk_group, 0,
                             None, options, biases=biases, activation_params=activation in PARAMETRIC_ACTIVATIONS)
    if refusal is not None:
        return refusal
    if router_logits.dtype not in _FLOAT_KIND or (routing_bias is not None and routing_bias.dtype not in _FLOAT_KIND):
        return "logits and bias must be float32, bfloat16 or float16"
    if not all(_aligned(t) for t in (w13, s13, w2, s2)) or g13.dtype != torch.float32 or g2.dtype != torch.float32:
        return "weights must be contiguous and 16-byte aligned, global scales float32"
    try:
        plan_for(device, hidden, inter, experts, top_k, is_gated(activation), _groups(routing, n_group), options)
    except ValueError as exc:
        return str(exc)
    try:
        from moe_passes.kernels.cuda_rtc import rtc_available
        if not rtc_available():
            return "NVRTC or the CUDA driver library cannot be loaded"
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"NVRTC unavailable: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def device_limits(index: int):
    """``(SM count, per-block opt-in shared memory)`` of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 232448)


_PLANS: dict = {}


def plan_for(device, hidden, inter, experts, top_k, gated, n_group, options: KernelOptions,
             grid=None) -> DecodePlan:
    """:func:`plan_decode` for this device and these options, made once per shape (its segment table is
    Python loops over every CTA; the call path must not pay them again), refusals included."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, hidden, inter, experts, top_k, gated, n_group, options.cuda_decode_warps, grid,
           options.cuda_decode_max_units, options.cuda_decode_stage_cap)
    plan = _PLANS.get(key)
    if plan is None:
        sms, smem = device_limits(index)
        try:
            plan = plan_decode(hidden, inter, experts, top_k, gated, n_group, sms, smem, key[7], grid,
                               key[9], key[10])
        except ValueError as exc:
            plan = str(exc)
        _PLANS[key] = plan
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan


_ARENA_SLOTS = 64
_ARENAS: dict = {}  # device index -> int64 [_ARENA_SLOTS] barrier counters, made when a layer is prepared
_COUNTERS: dict = {}  # (device index, stream, grid) -> its one-element view of the arena


def _counters(index: int, grid: int) -> Optional[torch.Tensor]:
    """The grid barrier's 64-bit arrival counter per (device, stream, grid): every call adds ``grid`` to it
    and waits for the next multiple of ``grid``, so it is never reset, and calls in stream order share it.

    Counters are slots of an arena allocated when a layer was prepared for the device (:func:`prepare_state`):
    a CUDA graph tree warms up and captures on streams of its own, inside its memory pool, and a counter
    allocated there would outlive the call.  A caller that never prepared a layer (the kernel called directly)
    gets the arena made here, outside a capture only.  None when there is none or every slot is taken."""
    key = (index, torch.cuda.current_stream(index).cuda_stream, grid)
    counter = _COUNTERS.get(key)
    if counter is None:
        if index not in _ARENAS and not torch.cuda.is_current_stream_capturing():
            _make_arena(index)
        arena = _ARENAS.get(index)
        used = sum(1 for k in _COUNTERS if k[0] == index)
        if arena is None or used == _ARENA_SLOTS:
            return None
        counter = _COUNTERS[key] = arena[used:used + 1]
    return counter


def _make_arena(index: int) -> None:
    _ARENAS[index] = torch.zeros(_ARENA_SLOTS, dtype=torch.int64, device=torch.device("cuda", index))


def prepare_state(device: torch.device, hidden: int, inter: int, experts: int, top_k: int, gated: bool,
                  n_group: int, options: Optional[KernelOptions] = None) -> None:
    """The state calls of this layer shape keep on ``device``: the barrier counters' arena and the segment table.

    Called when a layer's weights are prepared (outside any CUDA graph capture or memory pool), so that no call
    allocates anything that outlives it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARENAS:
        _make_arena(index)
    try:
        plan = plan_for(torch.device("cuda", index), hidden, inter, experts, top_k, gated, n_group, current(options))
    except ValueError:
        return  # this shape takes the Triton path
    _segment_table(index, plan.segments, 1 + 3 * plan.max_segments)


_TABLES: dict = {}


def _segment_table(index: int, rows: tuple, width: int) -> Optional[torch.Tensor]:
    """The segment table on the device, made once per (device, table); None while a CUDA graph is being
    captured and it does not exist yet (copying it in would be a host-to-device copy inside the capture)."""
    key = (index, rows)
    table = _TABLES.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        padded = [list(row) + [0] * (width - len(row)) for row in rows]
        table = _TABLES[key] = torch.tensor(padded, dtype=torch.int32, device=torch.device("cuda", index))
    return table


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return SOURCE.read_text()


@functools.lru_cache(maxsize=None)
def _kernel(index: int, defines: tuple, dynamic_smem: int):
    """The compiled kernel of one set of defines, made once (a compile takes about a second)."""
    from moe_passes.kernels.cuda_rtc import compile_kernel

    source = "".join(f"#define {k} {v}\n" for k, v in defines) + _source()
    # cooperative: the grid barrier waits for every CTA, so every CTA must be resident at once
    return compile_kernel(source, _NAME, torch.device("cuda", index), dynamic_smem, cooperative=True)


_MAPS: dict = {}


def _w2_maps(w2: torch.Tensor, s2: torch.Tensor, hidden: int, inter: int) -> tuple:
    """Tensor maps of w2's codes and scales in the prepared layout when every piece is whole (inter a
    multiple of 64): ``[expert x hidden band][piece][piece block]`` (512 and 64 bytes), a box one piece of 16
    bands; made once per (address, shape)."""
    from moe_passes.kernels.cuda_rtc import tensor_map

    key = (w2.data_ptr(), s2.data_ptr(), tuple(w2.shape), hidden, inter)
    maps = _MAPS.get(key)
    if maps is None:
        bands, pieces = w2.shape[0] * hidden // _BAND, inter // _PIECE
        maps = _MAPS[key] = (
            tensor_map(w2, (128, pieces, bands), (512, 8 * inter), (128, 1, _BOXB)),
            tensor_map(s2, (16, pieces, bands), (64, inter), (16, 1, _BOXB)))
    return maps


_WARNED: set = set()


_NO_PDL: set = set()  # devices whose driver refused a programmatic dependent launch of this kernel


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def decode_one_token(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights, *,
                     top_k: int, activation: str, routing: str, routing_bias=None, n_group=None, topk_group=None,
                     routed_scaling_factor=None, out: torch.Tensor, options: Optional[KernelOptions] = None,
                     grid: Optional[int] = None, routing_out=None,
                     trace: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The layer for ``hidden_states [1, H]`` into ``out [1, H]`` (bf16), or None when the kernel cannot be
    built or launched here (the caller falls back; the reason is warned once).  Call
    :func:`unsupported_reason` first.

    ``routing_out``: optional ``(weights float32 [k], ids int32 [k])`` that receive the routing the kernel
    chose.  ``options``: the ``cuda_decode_*`` knobs (None: ``options.current()``); ``grid`` overrides the
    CTA count (tests).  ``trace`` (int64 ``[grid, 16]``, a
    diagnostic): build with the kernel's TRACE stamps, which land there (phase cycles per CTA, see the source)."""
    call = bind_decode(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                       routing_bias=routing_bias, n_group=n_group, topk_group=topk_group,
                       routed_scaling_factor=routed_scaling_factor, options=options, grid=grid, trace=trace)
    if call is None:
        return None
    return call(hidden_states, router_logits, out=out, routing_out=routing_out)


class DecodeCall:
    """The CUDA decode of one layer on one stream with everything but its per-call addresses resolved once
    (plan, compiled kernel, segment table, barrier counter, tensor maps, marshalled launch): repeating a
    call this way costs a fraction of the host time of :func:`decode_one_token`.  Valid while the weights,
    the routing bias and the stream it was bound to are the same memory (the caller keys it on them)."""

    def __init__(self, kernel, plan: DecodePlan, args: tuple, pdl: bool, hidden: int, top_k: int,
                 bias_is_logits: bool, device: torch.device, keep: Optional[torch.Tensor] = None):
        # addresses, not tensors: a call kept in a process-wide cache must not keep a deleted layer's weights
        self._kernel, self._plan, self._keep = kernel, plan, keep
        self._args = tuple(ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        self._launch = kernel.bind(plan.grid, plan.threads, self._args, pdl=pdl)
        self._hidden, self._top_k, self._bias_is_logits, self._device = hidden, top_k, bias_is_logits, device
        # the CTAs' fp32 partial outputs, then the routing's weights (fp32) and ids (int32): one allocation
        self._partials = plan.grid * hidden * 4
        self._scratch = self._partials + 8 * top_k

    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor, out: Optional[torch.Tensor] = None,
                 routing_out=None) -> Optional[torch.Tensor]:
        """``out`` (None: a new ``[1, H]`` bf16 tensor) for this token, or None when the launch was refused
        (warned once; the caller takes the Triton path).  The inputs must have the bound call's shapes and
        dtypes."""
        if not _aligned(hidden_states):  # the kernel's 16-byte vector loads
            hidden_states = hidden_states.contiguous().clone()
        router_logits = router_logits.contiguous()
        if out is None:
            out = torch.empty(1, self._hidden, dtype=torch.bfloat16, device=self._device)
        held = torch.empty(self._scratch, dtype=torch.uint8, device=self._device)  # freed after the launch
        scratch = held.data_ptr()
        if routing_out is None:
            weights, ids = scratch + self._partials, scratch + self._partials + 4 * self._top_k
        else:
            weights, ids = routing_out[0].data_ptr(), routing_out[1].data_ptr()
        x, logits = hidden_states.data_ptr(), router_logits.data_ptr()
        pointers = ((x, logits, logits) if self._bias_is_logits else (x, logits)) + (scratch, out.data_ptr(), ids,
                                                                                       weights)
        try:
            self._launch(*pointers)
        except RtcError as exc:
            return self._refused(exc, pointers, out)
        return out

    def _refused(self, exc: RtcError, pointers: tuple, out: torch.Tensor) -> Optional[torch.Tensor]:
        index = self._device.index
        try:
            if not self._launch.pdl:
                raise exc
            # without the attribute the kernel's griddepcontrol instructions do nothing: a plain launch
            _NO_PDL.add(index)
            _warn_once(f"one-launch CUDA decode: programmatic dependent launch refused, launching without it: {exc}")
            self._launch = self._kernel.bind(self._plan.grid, self._plan.threads, self._args)
            self._launch(*pointers)
        except RtcError as again:  # e.g. a cooperative grid the device cannot hold at once (MIG, other work)
            _warn_once(f"one-launch CUDA decode could not launch, using the Triton decode: {again}")
            return None
        return out


def bind_decode(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights, *,
                top_k: int, activation: str, routing: str, routing_bias=None, n_group=None, topk_group=None,
                routed_scaling_factor=None, options: Optional[KernelOptions] = None, grid: Optional[int] = None,
                trace: Optional[torch.Tensor] = None) -> Optional[DecodeCall]:
    """A :class:`DecodeCall` for calls shaped like this one on the current stream (the arguments of
    :func:`decode_one_token`), or None when the kernel cannot be built here (warned once)."""
    if activation in PARAMETRIC_ACTIVATIONS:  # its ACT chain would run the code as ReLU^2
        raise MoEConfigError(f"the one-launch CUDA decode has no epilogue for {activation!r}")
    if routing not in ROUTING.methods:  # its METHOD chain would route sparsemixer as llama4
        raise MoEConfigError(f"the one-launch CUDA decode does not route {routing!r}; it routes "
                             f"{', '.join(sorted(ROUTING.methods))}")
    device = hidden_states.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    w13, s13, g13, w2, s2, g2 = weights
    hidden, inter, experts = w13.shape[2] * 2, w2.shape[2] * 2, router_logits.shape[1]
    gated = is_gated(activation)
    deepseek = routing == "deepseek_v3"
    groups = (n_group or 1) if deepseek else 1
    options = current(options)
    plan = plan_for(device, hidden, inter, experts, top_k, gated, groups, options, grid)
    has_bias = deepseek and routing_bias is not None
    scale = float(routed_scaling_factor) if (deepseek and routed_scaling_factor is not None) else 1.0
    bias = routing_bias.contiguous() if has_bias else None
    defines = dict(
        H_=hidden, I_=inter, E_=experts, TOPK=top_k, GATED=int(gated), ACT=ACT_CODES[activation],
        METHOD=METHOD_CODES[routing], NGROUP=groups, TOPKGROUP=(topk_group or groups) if deepseek else 1,
        HAS_BIAS=int(has_bias),
        RSCALE=f"((float){scale!r})", LOGIT_KIND=_FLOAT_KIND[router_logits.dtype],
        BIAS_KIND=_FLOAT_KIND[(router_logits if bias is None else bias).dtype],
        NCW=plan.consumer_warps, NSTAGE=plan.stages, STAGE_BYTES=plan.stage_bytes, MAXU=plan.max_units,
        MAXSEG=plan.max_segments, W2TMA=int(options.cuda_decode_w2_tma and inter % _PIECE == 0),
        PDL=int(options.cuda_decode_pdl))
    if trace is not None:
        if trace.dtype != torch.int64 or trace.numel() < 16 * plan.grid or not trace.is_contiguous():
            raise ValueError(f"trace must be a contiguous int64 tensor of at least {16 * plan.grid} elements")
        defines["TRACE"] = 1
    try:
        kernel = _kernel(index, tuple(defines.items()), plan.dynamic_smem)
    except RtcError as exc:
        _warn_once(f"one-launch CUDA decode unavailable, using the Triton decode: {exc}")
        return None
    table = _segment_table(index, plan.segments, 1 + 3 * plan.max_segments)
    if table is None:
        _warn_once("one-launch CUDA decode: first call inside a CUDA-graph capture, using the Triton decode "
                   "there (call the layer once before capturing)")
        return None
    sync = _counters(index, plan.grid)
    if sync is None:
        _warn_once("one-launch CUDA decode: no barrier counter on this device and stream (prepare the layer on the "
                   f"device first; at most {_ARENA_SLOTS} streams), using the Triton decode")
        return None
    maps = _w2_maps(w2, s2, hidden, inter) if defines["W2TMA"] else (bytes(128), bytes(128))
    # None: the addresses each call gives (x, logits, [the bias: the logits again], partials, out, routing ids,
    # routing weights); a kernel without a bias never reads its bias pointer
    args = (None, None, bias, w13, s13, g13, w2, s2, g2, table, None, sync, None, None, None,
            sync if trace is None else trace, *maps)
    return DecodeCall(kernel, plan, args, bool(defines["PDL"]) and index not in _NO_PDL, hidden, top_k, bias is None,
                      device, keep=bias if bias is not routing_bias else None)  # a copy lives with the call
