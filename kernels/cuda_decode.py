"""One-token decode of the NVFP4 MoE layer in one persistent CUDA launch (Hopper, SM90). Opt-in.

At one token the layer is a few microseconds of weight bytes (Qwen3-30B-A3B: 21 MB, 5.0 us at 4.25 TB/s),
and the Triton path spends as long again on its kernel boundaries: routing, GEMM1, GEMM2 and the combine
are separate launches, each draining the memory pipe before the next fills it.  Every fewer-launch Triton
variant lost (docs/architecture.md, decisions 12 and 16), because a Triton program cannot keep another
phase's weights in flight while it waits.  :file:`cuda_decode1.cu` does it by hand:

- one CTA per SM, each routing the token itself (the logits are a few hundred bytes);
- a producer warp streams the CTA's ops (:func:`schedule`) into a ring of shared-memory stages with bulk
  copies: GEMM1 units (16 intermediate rows of one slot) and GEMM2 items (some slots of 16 hidden rows);
- consumer warps decode each stage on the tensor cores (the Triton decode's E2M1 cut and ``mma.sync``);
  GEMM1 applies the activation, and a publisher warp stores the bf16 rows and bumps the slot's counter; a
  poller warp copies every slot whose count is complete into shared memory, and GEMM2 items wait for their
  slots only.  A CTA owns whole hidden bands (every slot, routing weight and combine included), so no
  partial sums cross CTAs and the result does not depend on timing.

Status (H200, docs/benchmarks.md, sixth session): correct and deterministic, but not faster than the Triton
decode yet (Qwen3 17.2 against 17.2 us, Gemma-4 21.3 against 19.2, Nemotron-Nano 28.5 against 22.0), so it is
opt-in: ``MOE_NVFP4_CUDA_DECODE=1``.  ``benchmarks/cuda_decode_timeline.py`` shows where its time goes.

The weights are the Triton path's prepared tensors (:func:`triton_moe.prepare_weights`), read as they are.
Numerics are those of ``fused_moe_reference(..., quantize_activations=False)``, like the Triton path.

Limits: one token; a CUDA GPU of compute capability 9.x; routing as :mod:`triton_route` takes it with at
most 512 experts and top-k <= 32; a GEMM1 unit (gate and up bands, 18 bytes per hidden element) small enough
that two stages fit in shared memory (gated hidden up to about 6000).  Other calls take the Triton path.
Every CTA must be resident at once (one per SM; the slot counters are waited on), and two launches of this
decode running at the same time must use different streams: the counters are kept per (device, stream).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from moe_passes.contract import is_gated
from moe_passes.kernels import registry
from moe_passes.kernels.triton_common import _ACT_CODES
from moe_passes.kernels.triton_route import _METHOD_CODES

__all__ = ["DecodePlan", "plan_decode", "partition", "schedule", "unsupported_reason", "decode_one_token",
           "ENABLED"]

# Opt-in: on the H200 it is still slower than the Triton decode (docs/benchmarks.md, sixth session).
ENABLED = os.environ.get("MOE_NVFP4_CUDA_DECODE", "0") == "1"
CONSUMER_WARPS = 8  # warps that decode and multiply (three more stream, publish and poll)
# Pipeline knobs for same-session A/Bs (benchmarks/ab_decode.py): hidden bands per CTA (the grid is that
# many bands' worth of CTAs, at most the SM count; None: the SM count), GEMM1 units weighted by each CTA's
# GEMM2 bytes, a cap on the ring's stages.  One band per CTA measured best on Qwen3 (17.2 against 17.6 us).
BANDS_PER_CTA: Optional[int] = 1
WEIGHTED = True
STAGE_CAP: Optional[int] = None
_SOURCE = Path(__file__).with_name("cuda_decode1.cu")
_NAME = "moe_nvfp4_decode1"
_FLOAT_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_EXPERTS = 512
_MAX_TOP_K = 32
_MAX_STAGES = 16
_BAND = 16  # rows per band of the prepared layout


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Pipeline sizes of one layer shape: ``stages`` shared-memory stages of ``stage_bytes`` each (one GEMM1
    unit, or up to ``slots_per_stage`` GEMM2 (band, slot) units), ``grid`` CTAs of ``consumer_warps`` consumer
    warps plus the producer, publisher and poller warps, and each CTA's ``schedule`` row (:func:`schedule`)."""

    consumer_warps: int
    stages: int
    stage_bytes: int
    slots_per_stage: int
    dynamic_smem: int
    grid: int
    schedule: tuple
    max_ops: int  # the longest row's op count
    max_bands: int  # the most hidden bands a CTA owns (at least 1)

    @property
    def threads(self) -> int:  # the consumers, then the producer, publisher and poller warps
        return 32 * (self.consumer_warps + 3)


def _bands_of(row) -> int:
    return len({(-1 - op) >> 10 for op in row[2:] if op < 0})


def partition(hidden: int, inter: int, top_k: int, gated: bool, grid: int, weighted: bool = True) -> tuple:
    """Per CTA ``(lo1, hi1, lo2, hi2)``: GEMM1 units ``[lo1, hi1)`` (unit = slot * bands + band of the
    intermediate) and GEMM2 units ``[lo2, hi2)`` (unit = hidden band * top_k + slot).

    Each CTA owns whole hidden bands (``floor`` shares of them), so a band's slots are summed in one CTA.
    With ``weighted``, GEMM1 units then fill every CTA up to the same byte count (a CTA with one band more
    gets about ``top_k * 9 * inter`` bytes' worth fewer units); without, every CTA gets an equal share.
    """
    bands, units1 = hidden // _BAND, top_k * (inter // _BAND)
    item1 = (2 if gated else 1) * 9 * hidden
    band2 = top_k * 9 * inter
    own = [bands * (c + 1) // grid - bands * c // grid for c in range(grid)]
    target = (units1 * item1 + bands * band2) / grid
    want = [max(0.0, target - b * band2) if weighted else 1.0 for b in own]
    total = sum(want)
    ranges, lo1, cum, lo2 = [], 0, 0.0, 0
    for c in range(grid):
        cum += want[c] * units1 / total
        hi1 = units1 if c == grid - 1 else max(lo1, min(units1, round(cum)))
        hi2 = lo2 + own[c] * top_k
        ranges.append((lo1, hi1, lo2, hi2))
        lo1, lo2 = hi1, hi2
    return tuple(ranges)


def _op(band: int, first_slot: int, slots: int) -> int:
    """A GEMM2 item's code in a schedule row (the kernel's decoding of negative ops)."""
    return -1 - (band << 10 | first_slot << 5 | (slots - 1))


def schedule(hidden: int, inter: int, top_k: int, gated: bool, grid: int, slots_per_stage: int,
             weighted: bool = True) -> tuple:
    """Per CTA ``(op count, first hidden band, ops...)``: what its producer streams and its consumers run.

    GEMM1 units (op >= 0: ``slot * bands + band`` of the intermediate) are dealt in rounds, in unit order,
    one per round to every CTA that :func:`partition` gives more than that many; so slots complete in order,
    slot ``s`` after round ``ready[s]``.  The CTA's GEMM2 items (op < 0, :func:`_op`: consecutive slots that
    complete in the same round, at most ``slots_per_stage``, of one of its hidden bands) follow its GEMM1 unit
    of the round after their slots completed, the others at the end.  No CTA waits on a unit that some CTA
    schedules behind a wait on a later round, so the schedule cannot deadlock while every CTA is resident.
    """
    ranges = partition(hidden, inter, top_k, gated, grid, weighted)
    nb1 = inter // _BAND
    counts = [hi1 - lo1 for lo1, hi1, _, _ in ranges]
    units: list = [[] for _ in range(grid)]
    unit_round: list = []
    for r in range(max(counts, default=0)):
        for c in range(grid):
            if counts[c] > r:
                units[c].append(len(unit_round))
                unit_round.append(r)
    ready = [unit_round[(s + 1) * nb1 - 1] for s in range(top_k)]
    chunks, s = [], 0
    while s < top_k:
        n = 1
        while s + n < top_k and n < slots_per_stage and ready[s + n] == ready[s]:
            n += 1
        chunks.append((ready[s + n - 1], s, n))
        s += n
    rows = []
    for c, (_, _, lo2, hi2) in enumerate(ranges):
        items = sorted((r, b, s0, n) for r, s0, n in chunks for b in range(lo2 // top_k, hi2 // top_k))
        ops, k = [], 0
        for r, u in enumerate(units[c]):
            ops.append(u)
            while k < len(items) and items[k][0] <= r - 1:
                ops.append(_op(*items[k][1:]))
                k += 1
        ops.extend(_op(*item[1:]) for item in items[k:])
        rows.append((len(ops), lo2 // top_k, *ops))
    return tuple(rows)


def plan_decode(hidden: int, inter: int, experts: int, top_k: int, gated: bool, n_group: int, sm_count: int,
                smem_limit: int, consumer_warps: int = 8, grid: Optional[int] = None,
                bands_per_cta: Optional[int] = None, weighted: bool = True,
                stage_cap: Optional[int] = None) -> DecodePlan:
    """The stages that fit in ``smem_limit`` bytes (the device's per-block opt-in limit), or ValueError."""
    if hidden % _BAND or inter % _BAND:
        raise ValueError(f"hidden ({hidden}) and intermediate ({inter}) must be multiples of {_BAND}")
    if not 1 <= consumer_warps <= 31:
        raise ValueError(f"consumer_warps must be 1..31, got {consumer_warps}")
    if grid is None and bands_per_cta:
        grid = min(sm_count, -(-(hidden // _BAND) // bands_per_cta))
    if grid is None:
        grid = min(sm_count, max(top_k * (inter // _BAND), hidden // _BAND))
    if grid < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    # a 16-row band is 16 * K/2 code bytes and 16 * K/16 scale bytes: 9 K
    item1 = (2 if gated else 1) * 9 * hidden  # GEMM1 unit: the gate and up bands
    unit2 = 9 * inter  # GEMM2 unit: one expert's band of hidden rows
    stage = -(-max(item1, unit2) // 128) * 128
    slots = max(1, min(top_k, stage // unit2))
    rows = schedule(hidden, inter, top_k, gated, grid, slots, weighted)
    max_ops = max(row[0] for row in rows)
    max_bands = max(1, max(_bands_of(row) for row in rows))
    dynamic_extra = 2 * hidden + 2 * top_k * inter  # the token's activations and the intermediate
    # the kernel's static arrays (barriers, reductions, routing, rows in flight), rounded up
    static = (16 * _MAX_STAGES + 8 + 2 * consumer_warps * 32 * 4 + 20 * (experts + 3) + 4 * n_group
              + 20 * top_k + 64 * max_bands + 40 * max_ops + 256)
    stages = min(stage_cap or _MAX_STAGES, _MAX_STAGES, (smem_limit - dynamic_extra - static) // stage)
    if stages < 2:
        raise ValueError(f"a GEMM1 unit of {stage} bytes leaves room for {max(stages, 0)} shared-memory stages "
                         f"of {smem_limit} bytes; two are needed")
    return DecodePlan(consumer_warps, stages, stage, slots, stages * stage + dynamic_extra, grid, rows, max_ops,
                      max_bands)


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0


def unsupported_reason(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights,
                       top_k: int, activation: str, routing: str, routing_bias, n_group, topk_group,
                       routed_scaling_factor) -> Optional[str]:
    """None when :func:`decode_one_token` takes this call, else why not (the Triton path takes it then)."""
    from moe_passes.kernels.triton_route import _route_spec

    if not ENABLED:
        return "off (opt-in: MOE_NVFP4_CUDA_DECODE=1)"
    device = hidden_states.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "needs a compute capability 9.x GPU"
    if hidden_states.shape[0] != 1:
        return "one token only"
    experts = router_logits.shape[1]
    if experts > _MAX_EXPERTS or top_k > _MAX_TOP_K:
        return f"at most {_MAX_EXPERTS} experts and top_k {_MAX_TOP_K}"
    if _route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor) is None:
        return "routing arguments the fused routing does not take"
    if router_logits.dtype not in _FLOAT_KIND or (routing_bias is not None and routing_bias.dtype not in _FLOAT_KIND):
        return "logits and bias must be float32, bfloat16 or float16"
    w13, s13, g13, w2, s2, g2 = weights
    if not all(_aligned(t) for t in (w13, s13, w2, s2)) or g13.dtype != torch.float32 or g2.dtype != torch.float32:
        return "weights must be contiguous and 16-byte aligned, global scales float32"
    hidden, inter = w13.shape[2] * 2, w2.shape[2] * 2
    try:
        _plan(device, hidden, inter, experts, top_k, is_gated(activation),
              (n_group or 1) if routing == "deepseek_v3" else 1)
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
def _device_limits(index: int):
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 232448)


_PLANS: dict = {}


def _plan(device, hidden, inter, experts, top_k, gated, n_group, consumer_warps=None, grid=None) -> DecodePlan:
    """:func:`plan_decode` for this device and the module's knobs, made once per shape (its schedule is
    Python loops over every CTA; the call path must not pay them again), refusals included."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, hidden, inter, experts, top_k, gated, n_group, consumer_warps or CONSUMER_WARPS, grid,
           BANDS_PER_CTA, WEIGHTED, STAGE_CAP)
    plan = _PLANS.get(key)
    if plan is None:
        sms, smem = _device_limits(index)
        try:
            plan = plan_decode(hidden, inter, experts, top_k, gated, n_group, sms, smem, key[7], grid,
                               BANDS_PER_CTA, WEIGHTED, STAGE_CAP)
        except ValueError as exc:
            plan = str(exc)
        _PLANS[key] = plan
    if isinstance(plan, str):
        raise ValueError(plan)
    return plan


_SYNC: dict = {}
_KEEP: list = []  # every counter buffer ever handed out: captured graphs keep pointing at theirs


def _counters(index: int) -> torch.Tensor:
    """Zeroed int32 counters ``[GEMM1 units done per slot (top_k), CTAs out]`` per (device, stream): the
    kernel leaves them zero, so one buffer serves every call in stream order."""
    key = (index, torch.cuda.current_stream(index).cuda_stream)
    buf = _SYNC.get(key)
    if buf is None:
        buf = _SYNC[key] = torch.zeros(_MAX_TOP_K + 1, dtype=torch.int32, device=torch.device("cuda", index))
        _KEEP.append(buf)
    return buf


_TABLES: dict = {}


def _schedule_table(index: int, rows: tuple, width: int) -> Optional[torch.Tensor]:
    """The schedule on the device, made once per (device, schedule); None while a CUDA graph is being
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
    return _SOURCE.read_text()


@functools.lru_cache(maxsize=None)
def _kernel(index: int, defines: tuple, dynamic_smem: int):
    """The compiled kernel of one set of defines, made once (a compile takes about a second)."""
    from moe_passes.kernels.cuda_rtc import compile_kernel

    source = "".join(f"#define {k} {v}\n" for k, v in defines) + _source()
    return compile_kernel(source, _NAME, torch.device("cuda", index), dynamic_smem)


_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def decode_one_token(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights, *,
                     top_k: int, activation: str, routing: str, routing_bias=None, n_group=None, topk_group=None,
                     routed_scaling_factor=None, out: torch.Tensor, consumer_warps: Optional[int] = None,
                     grid: Optional[int] = None, routing_out=None,
                     trace: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The layer for ``hidden_states [1, H]`` into ``out [1, H]`` (bf16), or None when the kernel cannot be
    built here (the caller falls back; the reason is warned once).  Call :func:`unsupported_reason` first.

    ``routing_out``: optional ``(weights float32 [k], ids int32 [k])`` that receive the routing the kernel
    chose.  ``consumer_warps`` and ``grid`` override the pipeline (tests).  ``trace`` (int64 ``[grid, 16]``, a
    diagnostic): build with the kernel's TRACE stamps, which land there (phase cycles per CTA, see the source)."""
    from moe_passes.kernels.cuda_rtc import RtcError

    device = hidden_states.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    w13, s13, g13, w2, s2, g2 = weights
    hidden, inter, experts = w13.shape[2] * 2, w2.shape[2] * 2, router_logits.shape[1]
    gated = is_gated(activation)
    deepseek = routing == "deepseek_v3"
    groups = (n_group or 1) if deepseek else 1
    plan = _plan(device, hidden, inter, experts, top_k, gated, groups, consumer_warps, grid)
    has_bias = deepseek and routing_bias is not None
    scale = float(routed_scaling_factor) if (deepseek and routed_scaling_factor is not None) else 1.0
    logits = router_logits.contiguous()
    bias = routing_bias.contiguous() if has_bias else logits
    defines = dict(
        H_=hidden, I_=inter, E_=experts, TOPK=top_k, GATED=int(gated), ACT=_ACT_CODES[activation], METHOD=_METHOD_CODES[routing],
        NGROUP=groups, TOPKGROUP=(topk_group or groups) if deepseek else 1, HAS_BIAS=int(has_bias),
        RSCALE=f"((float){scale!r})", LOGIT_KIND=_FLOAT_KIND[logits.dtype], BIAS_KIND=_FLOAT_KIND[bias.dtype],
        NCW=plan.consumer_warps, NSTAGE=plan.stages, STAGE_BYTES=plan.stage_bytes, S2=plan.slots_per_stage,
        MAXOPS=plan.max_ops, MAXB=plan.max_bands)
    if trace is not None:
        if trace.dtype != torch.int64 or trace.numel() < 16 * plan.grid or not trace.is_contiguous():
            raise ValueError(f"trace must be a contiguous int64 tensor of at least {16 * plan.grid} elements")
        defines["TRACE"] = 1
    try:
        kernel = _kernel(index, tuple(defines.items()), plan.dynamic_smem)
    except RtcError as exc:
        _warn_once(f"one-launch CUDA decode unavailable, using the Triton decode: {exc}")
        return None
    table = _schedule_table(index, plan.schedule, plan.max_ops + 2)
    if table is None:
        _warn_once("one-launch CUDA decode: first call inside a CUDA-graph capture, using the Triton decode "
                   "there (call the layer once before capturing)")
        return None
    x = hidden_states if _aligned(hidden_states) else hidden_states.contiguous().clone()
    act = torch.empty(top_k * inter, dtype=torch.bfloat16, device=device)
    sync = _counters(index)
    if routing_out is None:
        routing_out = (torch.empty(top_k, dtype=torch.float32, device=device),
                       torch.empty(top_k, dtype=torch.int32, device=device))
    kernel(plan.grid, plan.threads, x, logits, bias, w13, s13, g13, w2, s2, g2, act, table, sync, out,
           routing_out[1], routing_out[0], sync if trace is None else trace)
    return out
