"""Hopper fast path: a Triton fused MoE for NVFP4 weights and bf16 activations; the kernel entry point.

A call (all on the GPU, no host synchronisation, CUDA-graph capturable) is validated, planned
(:mod:`triton_plan`: which variant, with which config, and why), allocated and launched:

- one token on SM90: the whole layer in one persistent CUDA launch (:mod:`cuda_decode`), or where that
  kernel refuses the call at run time, the Triton plan it carries;
- otherwise routing (one launch, :mod:`triton_route`), then the variant's GEMMs: the tensor-core decode
  per pair or grouped into 8-token expert blocks (:mod:`triton_tc_decode`), or the tensor-core tiles over
  16-128-row expert blocks (:mod:`triton_tiles`), both grouping through :mod:`triton_group`; then one
  combine launch summing each token's ``k`` (times K splits) fp32 rows into bf16.

Weights are laid out once, at preparation (:func:`prepare_weights`, the registry's ``prepare``): the E2M1
bits of every 32-bit word re-placed (:mod:`triton_layout`) and codes and block scales stored in 16-row bands
of 64-element pieces, so that a warp's load of several rows' K step is one contiguous run.  Shapes and
dtypes are the canonical ones; nothing proportional to the weights is allocated or copied per call, and the
per-call workspace grows with the tokens.

Numerics match ``fused_moe_reference(..., quantize_activations=False)``: bf16 activations, weights
dequantized exactly, fp32 accumulation (plus the fp32 expert biases where a layer has them: gpt-oss), the
intermediate rounded to bf16, fp32 combine, bf16 out.

Triton is imported behind a guard: this module imports (and registers an unavailable kernel) on a
CPU-only machine without Triton.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from moe_passes.contract import ACTIVATIONS, PARAMETRIC_ACTIVATIONS, ROUTING_METHODS, Alignment, MoEShape, is_gated
from moe_passes.contract import activation_params as _params_of
from moe_passes.contract import routing_params as routing_params_of
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import cuda_decode, registry
from moe_passes.kernels.options import KernelOptions, current
from moe_passes.kernels.triton_common import ACT_CODES, gdc_wait, tl, triton
from moe_passes.kernels.triton_launch import Refused, launch, record
from moe_passes.kernels.triton_layout import to_band_layout, to_triton_layout
from moe_passes.kernels.triton_plan import (Config, DecodeConfig, DeviceInfo, Plan, Problem, cached_plan, k_split,
                                            plan_config)
from moe_passes.kernels.triton_route import route
from moe_passes.kernels.triton_tc_decode import decode_tc
from moe_passes.kernels.triton_tiles import run_tiles

__all__ = ["TRITON_ALIGNMENT", "fused_moe_triton", "plan_call", "call_problem", "prepare_weights",
           "triton_available", "pdl_supported", "device_info"]

TRITON_ALIGNMENT = Alignment(hidden=16, intermediate_gated=16, intermediate_plain=16)


def triton_available(device=None) -> bool:
    """CUDA device of compute capability >= 8.0 (bf16 tensor cores) and Triton importable."""
    if triton is None or not torch.cuda.is_available():
        return False
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def pdl_supported(device) -> bool:
    """Programmatic dependent launch can chain this device's Triton kernels: SM90+ and a Triton with the
    intrinsics (whether a call uses it is ``KernelOptions.pdl`` and its plan's)."""
    device = torch.device(device)
    return gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    sms, smem = cuda_decode.device_limits(index)
    return DeviceInfo(sm_count=sms, capability=tuple(torch.cuda.get_device_capability(index)), smem_optin=smem)


def device_info(device) -> DeviceInfo:
    """What the planner needs of ``device``; the Triton interpreter's CPU tensors plan as 132 SMs, no SM90."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceInfo(sm_count=132, capability=(0, 0), smem_optin=None)
    return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())


def plan_call(problem: Problem, device, options: Optional[KernelOptions] = None) -> Plan:
    """The plan :func:`fused_moe_triton` follows for ``problem`` on ``device`` (cached)."""
    return cached_plan(problem, device_info(device), current(options))


if triton is not None:
    from moe_passes.kernels.triton_common import gdc

    @triton.jit
    def combine_kernel(y_ptr, out_ptr, num_pairs, H, stride_out,
                       TOP_K: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                       ids_ptr=None, LOCAL: tl.constexpr = False):
        """Each token's ``TOP_K`` pairs times ``SPLIT`` K splits of rows (fp32 or bf16), summed in fp32 in a fixed
        order, to bf16.
        LOCAL (expert parallel): pairs whose id (``ids_ptr``) is -1 belong to another rank and add nothing."""
        gdc(PDL, LAUNCH=False)  # whatever follows the layer is not ours: it starts after this kernel ends
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            for j in tl.static_range(TOP_K):
                live = ok
                if LOCAL:
                    live = ok & (tl.load(ids_ptr + t * TOP_K + j) >= 0)
                acc += tl.load(y_ptr + (s * num_pairs + t * TOP_K + j) * H + offs, mask=live,
                               other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_out + offs, acc.to(tl.bfloat16), mask=ok)


def fused_moe_triton(hidden_states: torch.Tensor, router_logits: torch.Tensor, weights: registry.MoEWeights, *,
                     top_k: int, activation: str = "silu", routing: str = "renormalize",
                     routing_bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
                     topk_group: Optional[int] = None, routed_scaling_factor: Optional[float] = None,
                     out: Optional[torch.Tensor] = None, config: Optional[Config] = None,
                     local_expert_offset: int = 0, global_num_experts: Optional[int] = None,
                     options: Optional[KernelOptions] = None, activation_params=None,
                     w13_bias: Optional[torch.Tensor] = None, w2_bias: Optional[torch.Tensor] = None,
                     routing_params=None) -> torch.Tensor:
    """The NVFP4 MoE layer on bf16 ``hidden_states [T, Hp]`` (``Hp`` = the weights' hidden size).

    ``weights`` must come from :func:`prepare_weights` (or the registry's ``prepare``): the E2M1 bytes
    are read in the Triton layout, not the canonical one.  Expert parallelism: with ``global_num_experts``
    the weights hold experts ``[local_expert_offset, +E_local)`` and ``router_logits`` score all of them.
    ``config`` (a ``DecodeConfig`` or ``TileConfig``) runs that variant instead of the planner's choice;
    ``options`` (None: ``options.current()``) carry the knobs.  ``activation_params``: ``swiglu_oai``'s
    ``[alpha, beta, limit]`` (or a ``SwigluOAI``; None: its defaults).  Expert biases (gpt-oss), fp32, in
    the canonical row order (the Triton layout keeps rows where they are): ``w13_bias [E_local, N1]`` added
    to GEMM1's output before the activation, ``w2_bias [E_local, Hp]`` to GEMM2's before the routing
    weight; a narrower ``w2_bias`` (``[E_local, H]``) counts as zero-padded, as in the reference.
    ``routing_params``: a parametric routing method's parameters (``sparsemixer``: ``[jitter_eps]``).
    """
    options = current(options)
    if activation not in ACT_CODES:  # a direct call must not guess
        raise MoEConfigError(f"the triton kernel has no epilogue for activation {activation!r}; it runs "
                             f"{', '.join(ACT_CODES)}")
    params = _params_of(activation, activation_params)  # refuses parameters for an activation without any
    routing_params = routing_params_of(routing, routing_params)  # sparsemixer's must be there, others' not
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
    misaligned = registry.alignment_error(TRITON_ALIGNMENT, hidden, inter, activation)
    if misaligned is not None:
        raise MoEConfigError(misaligned)
    _check_weights(weights, experts, n1, hidden, inter, hidden_states.device)
    w13_bias, w2_bias = _check_biases(w13_bias, w2_bias, experts, n1, hidden, hidden_states.device)
    local = global_num_experts is not None
    routed_experts = global_num_experts if local else experts
    if local and not 0 <= local_expert_offset <= routed_experts - experts:
        raise MoEConfigError(f"local experts [{local_expert_offset}, {local_expert_offset + experts}) do not lie within "
                             f"the {routed_experts} global experts")
    if (router_logits.shape != (tokens, routed_experts) or not router_logits.is_floating_point()
            or router_logits.device != hidden_states.device):
        raise MoEConfigError(f"router_logits must be a float [{tokens}, {routed_experts}] tensor on {hidden_states.device}, "
                             f"got {router_logits.dtype} {tuple(router_logits.shape)} on {router_logits.device}")
    if routing_bias is not None and (not routing_bias.is_floating_point() or routing_bias.device != hidden_states.device
                                     or tuple(routing_bias.shape) != (routed_experts,)):
        raise MoEConfigError(f"routing_bias must be a float [{routed_experts}] tensor on {hidden_states.device}, got "
                             f"{routing_bias.dtype} {tuple(routing_bias.shape)} on {routing_bias.device}")
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
    biases = w13_bias is not None or w2_bias is not None
    problem = call_problem(tokens, weights, top_k, activation, routing, n_group, topk_group, global_num_experts, biases)
    plan = plan_call(problem, device, options) if config is None else plan_config(config, problem, options)
    if plan.variant == "cuda_decode":
        done = _cuda_decode(hidden_states, router_logits, weights, top_k, activation, routing, routing_bias,
                            n_group, topk_group, routed_scaling_factor, out, options, biases)
        if done is not None:
            return done
        plan = plan.fallback
    cfg = plan.config
    pdl_ok = options.pdl and pdl_supported(device)
    pdl = cfg.chains and pdl_ok
    counts = None if cfg.bm == 1 else torch.empty(experts, dtype=torch.int32, device=device)  # zeroed by route
    topk_w, topk_ids = route(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor,
                             zero=counts, pdl=pdl, routing_params=routing_params)
    if local:
        topk_w, topk_ids = _localize(topk_w, topk_ids, local_expert_offset, experts)
    flat_ids = topk_ids.reshape(-1)
    pairs = flat_ids.numel()
    k_per_split, split = k_split(inter, cfg.split2, cfg.k_step2)
    rows_dtype = torch.bfloat16 if cfg.bf16_rows else torch.float32
    y = torch.empty(split, pairs, hidden, dtype=rows_dtype, device=device)
    variant = decode_tc if isinstance(cfg, DecodeConfig) else run_tiles
    variant(hidden_states, weights, flat_ids, topk_w, counts, y, cfg, pairs=pairs, experts=experts, hidden=hidden,
            inter=inter, top_k=top_k, gated=gated, activation=activation, k_per_split=k_per_split, pdl=pdl_ok,
            one_program=plan.one_program_grouping, activation_params=params, w13_bias=w13_bias, w2_bias=w2_bias)
    block = 1024
    launch(combine_kernel, (tokens, triton.cdiv(hidden, block)), y, out, pairs, hidden, out.stride(0),
           TOP_K=top_k, SPLIT=split, BLOCK=block, PDL=pdl, **(dict(ids_ptr=flat_ids, LOCAL=True) if local else {}),
           num_warps=4, launch_pdl=pdl)
    return out


def _check_weights(weights: registry.MoEWeights, experts: int, n1: int, hidden: int, inter: int, device) -> None:
    """The prepared weights as the kernels index them (no strides taken: contiguous, by expert), on ``device``."""
    fp8 = torch.float8_e4m3fn
    want = dict(w13=(torch.uint8, (experts, n1, hidden // 2)), w13_scale=(fp8, (experts, n1, hidden // 16)),
                w13_global_scale=(torch.float32, (experts,)), w2=(torch.uint8, (experts, hidden, inter // 2)),
                w2_scale=(fp8, (experts, hidden, inter // 16)), w2_global_scale=(torch.float32, (experts,)))
    for name, t in zip(registry.MoEWeights._fields, weights):
        dtype, shape = want[name]
        if t.dtype != dtype or tuple(t.shape) != shape or t.device != device or not t.is_contiguous():
            raise MoEConfigError(f"{name} must be a contiguous {dtype} {list(shape)} tensor on {device} "
                                 f"(prepare_weights' layout), got {'' if t.is_contiguous() else 'a non-contiguous '}"
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _check_biases(w13_bias, w2_bias, experts: int, n1: int, hidden: int, device):
    """The expert biases as the kernels read them: contiguous fp32 ``[E, N1]`` and ``[E, hidden]`` (a narrower
    ``w2_bias`` zero-padded, a copy; the layer's are padded once, at preparation), or a MoEConfigError."""
    for name, t, rows in (("w13_bias", w13_bias, (n1,)), ("w2_bias", w2_bias, range(1, hidden + 1))):
        if t is None:
            continue
        if t.ndim != 2 or t.shape[0] != experts or t.shape[1] not in rows or not t.is_floating_point():
            want = f"[{experts}, {n1}]" if name == "w13_bias" else f"[{experts}, {hidden}] (or narrower: zero-padded)"
            raise MoEConfigError(f"{name} must be a float {want} tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise MoEConfigError(f"{name} is on {t.device}, the hidden states on {device}")
    if w13_bias is not None:
        w13_bias = w13_bias.float().contiguous()
    if w2_bias is not None:
        w2_bias = w2_bias.float().contiguous()
        if w2_bias.shape[1] < hidden:
            w2_bias = torch.nn.functional.pad(w2_bias, (0, hidden - w2_bias.shape[1]))
    return w13_bias, w2_bias


def _localize(topk_w: torch.Tensor, topk_ids: torch.Tensor, offset: int, experts: int):
    """Global expert ids to this rank's local ones; a pair of another rank's expert gets id -1 and weight 0.
    The kernels skip such pairs: the grouping leaves them out, a per-pair program returns at once and the
    combine adds nothing for them (their ``y`` rows are never written)."""
    local = topk_ids - offset
    mine = (local >= 0) & (local < experts)
    return torch.where(mine, topk_w, 0.0).contiguous(), torch.where(mine, local, -1).contiguous()


def call_problem(tokens: int, weights: registry.MoEWeights, top_k: int, activation: str, routing: str, n_group,
                 topk_group, global_num_experts: Optional[int], biases: bool) -> Problem:
    """The planner's view of a call on these (prepared) weights: sizes as they hold them."""
    experts, hidden, inter = weights.w13.shape[0], weights.w13.shape[2] * 2, weights.w2.shape[2] * 2
    return Problem(tokens, top_k, experts, hidden, inter, is_gated(activation), routing, n_group, topk_group,
                   global_num_experts, biases=biases, activation_params=activation in PARAMETRIC_ACTIVATIONS)


def _cuda_decode(hidden_states, router_logits, weights, top_k, activation, routing, routing_bias, n_group,
                 topk_group, routed_scaling_factor, out, options, biases=False) -> Optional[torch.Tensor]:
    """The one-launch CUDA decode of one token, or None where it refuses this call at run time (dtypes,
    alignment, no NVRTC, a refused launch: the caller takes the plan's Triton fallback)."""
    args = (hidden_states, router_logits, weights, top_k, activation, routing, routing_bias, n_group, topk_group,
            routed_scaling_factor)
    if cuda_decode.unsupported_reason(*args, options=options, biases=biases) is not None:
        return None
    return cuda_decode.decode_one_token(hidden_states, router_logits, weights, top_k=top_k, activation=activation,
                                        routing=routing, routing_bias=routing_bias, n_group=n_group,
                                        topk_group=topk_group, routed_scaling_factor=routed_scaling_factor, out=out,
                                        options=options)


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
    misaligned = registry.alignment_error(TRITON_ALIGNMENT, shape.hidden_padded, shape.intermediate_padded,
                                          shape.activation)
    if misaligned is not None:
        raise MoEConfigError(f"triton MoE: {misaligned}")
    return prepare_weights(weights)


def _prepare_state(device: torch.device, shape: MoEShape, args: registry.RunArgs) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        groups = (args.n_group or 1) if args.routing == "deepseek_v3" else 1
        cuda_decode.prepare_state(device, shape.hidden_padded, shape.intermediate_padded, shape.experts, args.top_k,
                                  is_gated(args.activation), groups, args.options)


def _run(hidden_states, router_logits, weights: registry.MoEWeights, input_global_scale, intermediate_global_scale,
         routing_bias, args: registry.RunArgs, *, w13_bias=None, w2_bias=None) -> torch.Tensor:
    # Activations stay bf16 on this path: the activation global scales are not used.
    return fused_moe_triton(hidden_states, router_logits, weights, top_k=args.top_k, activation=args.activation,
                            routing=args.routing, routing_bias=routing_bias, n_group=args.n_group,
                            topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
                            local_expert_offset=args.local_expert_offset, global_num_experts=args.global_num_experts,
                            options=args.options, activation_params=args.activation_params, w13_bias=w13_bias,
                            w2_bias=w2_bias, routing_params=args.routing_params)


def _direct(hidden_states, router_logits, weights: registry.MoEWeights, input_global_scale, intermediate_global_scale,
            routing_bias, args: registry.RunArgs, *, w13_bias=None, w2_bias=None):
    """The call of :func:`_run` bound once where it is one launch of the CUDA decode (``KernelSpec.direct``;
    the call already ran through :func:`fused_moe_triton`, so its checks passed); None for the others."""
    biases = w13_bias is not None or w2_bias is not None
    if hidden_states.shape[0] != 1 or biases or args.global_num_experts is not None:
        return None
    if routing_bias is not None and not routing_bias.is_contiguous():  # a bound copy would miss later writes
        return None
    options = current(args.options)
    problem = call_problem(1, weights, args.top_k, args.activation, args.routing, args.n_group, args.topk_group, None,
                           False)
    if plan_call(problem, hidden_states.device, options).variant != "cuda_decode":
        return None
    decode_args = (hidden_states, router_logits, weights, args.top_k, args.activation, args.routing, routing_bias,
                   args.n_group, args.topk_group, args.routed_scaling_factor)
    if cuda_decode.unsupported_reason(*decode_args, options=options) is not None:
        return None
    return cuda_decode.bind_decode(hidden_states, router_logits, weights, top_k=args.top_k,
                                   activation=args.activation, routing=args.routing, routing_bias=routing_bias,
                                   n_group=args.n_group, topk_group=args.topk_group,
                                   routed_scaling_factor=args.routed_scaling_factor, options=options)


def _replay(hidden_states, router_logits, weights: registry.MoEWeights, input_global_scale,
            intermediate_global_scale, routing_bias, args: registry.RunArgs, *, w13_bias=None, w2_bias=None):
    """The launches of :func:`_run`'s call recorded once (``KernelSpec.replay``), or None where the call computes
    with torch between them (the torch routing, expert parallelism's localisation, a bias padded per call)."""
    run = functools.partial(_run, hidden_states, router_logits, weights, input_global_scale,
                            intermediate_global_scale, routing_bias, args, w13_bias=w13_bias, w2_bias=w2_bias)
    try:
        return record(run, (hidden_states, router_logits),
                      (*weights, input_global_scale, intermediate_global_scale, routing_bias, w13_bias, w2_bias))
    except Refused:
        return None


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
    direct=_direct,
    replay=_replay,
    quantizes_activations=False,
    graph_tokens=64,  # an H100 host takes 150-550 us to set up a call that runs 20-200 us on the GPU
    priority=10,
    # gpt-oss: expert biases in the GEMM epilogues and swiglu_oai's parameters; the layout keeps rows in
    # place, so the biases need no prepare_biases
    expert_bias=True,
    activation_params=True,
))
