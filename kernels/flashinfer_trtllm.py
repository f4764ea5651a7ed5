"""Blackwell (SM100/SM103): FlashInfer's TRTLLM-gen NVFP4 fused MoE.

Three parts, all behind :func:`available`:

* :func:`prepare` lays canonical NVFP4 weights out for the kernel, once per layer, in plain torch
  (FlashInfer's own ``shuffle_matrix_sf_a`` / ``block_scale_interleave`` need a GPU):

  - ``w13`` rows ``[gate; up]`` become ``[up; gate]`` (the kernel computes ``act(second half) * first
    half``), then the gated-activation interleave ``(r0, r_{N/2}, r1, r_{N/2+1}, ...)``, then the
    ``shuffle_matrix_a`` row permutation for epilogue tile 128 (within every 32-row block, new row
    ``j`` takes old row ``4 * (j % 8) + j // 8``);
  - the block scales get the same row permutation, then the 128x4 swizzle
    (:func:`moe_passes.kernels.nvfp4.swizzle_scales`);
  - ``w2`` and its scales get the shuffle (no reorder, no interleave);
  - global scales are kept: :func:`output_scales` derives the kernel's three per-expert vectors
    from them and the activation global scales at call time;
  - expert biases (:func:`prepare_biases`) get their weight's row order: ``w13_bias`` the whole w13
    reordering, ``w2_bias`` the w2 shuffle.

* :func:`bias_and_activation_args` maps the biases and ``swiglu_oai``'s alpha / beta / limit onto
  ``gemm1_bias``, ``gemm1_alpha``, ``gemm1_beta``, ``gemm1_clamp_limit``, ``gemm2_bias`` (fp32, one row
  or value per local expert), in the units of the kernel's accumulators (see its docstring).

* :func:`fused_moe` / :func:`run` / :func:`run_routed` quantize the input to NVFP4 (linear scale
  layout), call ``flashinfer.fused_moe.trtllm_fp4_block_scale_moe`` (or the ``_routed_moe`` variant)
  by keyword, matching the installed signature, in chunks of at most :func:`chunk_size` tokens.

* the registry entry ``"trtllm"``.

FlashInfer is imported lazily, on first use, never at import of this module.  Tests substitute the
FlashInfer entry points with :func:`use_api` (which also makes :func:`available` true on any device,
since the double stands in for the GPU as well).

Everything that needs an SM100 GPU is unverified on the machines this was written on; what is checked
on the CPU is listed in ``docs/kernels.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
from typing import Any, Callable, Iterator, Optional

import torch

from moe_passes.contract import ROUTING_METHODS, TRTLLM_ALIGNMENT, is_gated, trtllm_chunk_size
from moe_passes.contract import activation_params as contract_params
from moe_passes.errors import KernelUnavailableError, MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import BLOCK_SIZE, quantize_nvfp4
from moe_passes.kernels.options import KernelOptions, current
from moe_passes.kernels.trtllm_layout import (ACTIVATION_NAMES, EPILOGUE_TILE_M, GELU_TANH_REASON, check_tensor,
                                              gated_interleave_row_indices, prepare, prepare_biases,
                                              shuffle_row_indices, w2_row_indices, w13_row_indices)

__all__ = [
    "EPILOGUE_TILE_M",
    "SUPPORTED_CAPABILITIES",
    "ACTIVATION_NAMES",
    "ROUTING_NAMES",
    "FlashInferAPI",
    "available",
    "use_api",
    "torch_quantize_input",
    "shuffle_row_indices",
    "gated_interleave_row_indices",
    "w13_row_indices",
    "w2_row_indices",
    "prepare",
    "prepare_biases",
    "bias_and_activation_args",
    "output_scales",
    "chunk_size",
    "fused_moe",
    "run",
    "run_routed",
    "TRTLLM",
]

SUPPORTED_CAPABILITIES = frozenset({(10, 0), (10, 3)})

# Our gated activations and routing names -> FlashInfer enum member names (looked up by name: values moved
# between releases; ACTIVATION_NAMES, the activations the kernel runs, is with the layout).  Older releases
# name the gated activation ``gated_act_type`` with GatedActType.
# swiglu_oai is FlashInfer's Swiglu with gemm1_alpha / gemm1_beta / gemm1_clamp_limit set.
_GATED_ACT_NAMES = {"silu": "SwiGlu", "gelu": "GeGlu", "swiglu_oai": "SwiGlu"}
ROUTING_NAMES = {"default": "Default", "renormalize": "Renormalize", "deepseek_v3": "DeepSeekV3", "llama4": "Llama4"}


# --------------------------------------------------------------------------------------------------
# The FlashInfer entry points, loaded lazily (or substituted by tests)


@dataclasses.dataclass(frozen=True)
class FlashInferAPI:
    """What this module calls in FlashInfer.

    ``fused_moe`` / ``routed_moe``: ``trtllm_fp4_block_scale_moe`` / ``..._routed_moe`` (called by
    keyword, after matching their signatures).  ``quantize(x bf16 [T, H], gs fp32 0-dim) ->
    (uint8 [T, H/2], float8_e4m3fn [T, H/16] linear)``.  ``enums``: an object with the attributes
    ``RoutingMethodType`` and some of ``ActivationType``, ``GatedActType``, ``SfLayout``.
    """

    fused_moe: Callable[..., Any]
    routed_moe: Optional[Callable[..., Any]]
    quantize: Callable[[torch.Tensor, torch.Tensor], tuple]
    enums: Any


_api_override: Optional[FlashInferAPI] = None


@contextlib.contextmanager
def use_api(api: FlashInferAPI) -> Iterator[FlashInferAPI]:
    """Route every FlashInfer call of this module to ``api`` (a test double) inside the block.

    While active, :func:`available` is true on every device: the double stands in for the hardware.
    """
    global _api_override
    if not isinstance(api, FlashInferAPI):
        raise TypeError(f"use_api expects a FlashInferAPI, got {type(api).__name__}")
    previous, _api_override = _api_override, api
    try:
        yield api
    finally:
        _api_override = previous


class FlashInferEnums:
    """The FlashInfer enums a call needs, each from the first module that has it (None where none does)."""

    def __init__(self, *modules):
        for name in ("RoutingMethodType", "ActivationType", "GatedActType", "SfLayout"):
            setattr(self, name, next((getattr(m, name) for m in modules if hasattr(m, name)), None))


def _flashinfer_quantize(x: torch.Tensor, gs: torch.Tensor):
    import flashinfer

    packed, sf = flashinfer.fp4_quantize(
        x, gs.reshape(1).float(), sf_vec_size=BLOCK_SIZE, sf_use_ue8m0=False, is_sf_swizzled_layout=False
    )
    return packed, sf.view(torch.float8_e4m3fn).reshape(x.shape[0], x.shape[1] // BLOCK_SIZE)


@functools.lru_cache(maxsize=1)
def _load_flashinfer() -> FlashInferAPI:
    try:
        import flashinfer.fused_moe as fused_moe_mod
    except Exception as exc:  # noqa: BLE001 - any import failure means the kernel is unavailable
        raise KernelUnavailableError(
            f"the 'trtllm' MoE kernel needs flashinfer-python (pip install 'moe-nvfp4[blackwell]'): {exc}"
        ) from exc
    try:
        import flashinfer.tllm_enums as enums_mod
    except ImportError:
        enums_mod = None
    fused = getattr(fused_moe_mod, "trtllm_fp4_block_scale_moe", None)
    if fused is None:
        raise KernelUnavailableError("the installed flashinfer has no fused_moe.trtllm_fp4_block_scale_moe")
    return FlashInferAPI(
        fused_moe=fused,
        routed_moe=getattr(fused_moe_mod, "trtllm_fp4_block_scale_routed_moe", None),
        quantize=_flashinfer_quantize,
        enums=FlashInferEnums(*(m for m in (enums_mod, fused_moe_mod) if m is not None)),
    )


def _api() -> FlashInferAPI:
    return _api_override if _api_override is not None else _load_flashinfer()


@functools.lru_cache(maxsize=1)
def _flashinfer_importable() -> bool:
    if importlib.util.find_spec("flashinfer") is None:
        return False
    try:
        _load_flashinfer()
    except KernelUnavailableError:
        return False
    return True


def available(device) -> bool:
    """SM100/SM103 CUDA device and flashinfer importable (or a test double installed by :func:`use_api`)."""
    if _api_override is not None:
        return True
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if tuple(torch.cuda.get_device_capability(index)) not in SUPPORTED_CAPABILITIES:
        return False
    return _flashinfer_importable()


def torch_quantize_input(x: torch.Tensor, gs: torch.Tensor):
    """Plain-torch twin of the input quantization (``FlashInferAPI.quantize``), for doubles and CPU."""
    packed, scales, _ = quantize_nvfp4(x, gs)
    return packed, scales


def bias_and_activation_args(out1_gate: torch.Tensor, out2: torch.Tensor, activation: str,
                             activation_params=None, w13_bias: Optional[torch.Tensor] = None,
                             w2_bias: Optional[torch.Tensor] = None) -> dict:
    """``gemm1_bias``, ``gemm1_alpha``, ``gemm1_beta``, ``gemm1_clamp_limit``, ``gemm2_bias`` for one call.

    ``out1_gate`` / ``out2``: :func:`output_scales`' ``output1_scale_gate_scalar`` and
    ``output2_scale_scalar`` ([E_local] fp32).  All are float32, one value or row per local expert, or None.

    Units.  The kernel's GEMM accumulators hold scaled values: GEMM1's ``real / out1_gate`` (real times
    gs_w13 * gs_a), GEMM2's ``real / out2``.  FlashInfer's own trace reference of this kernel adds
    ``gemm1_bias`` / ``gemm2_bias`` to those raw accumulators, before the output scales, so the biases are
    handed over divided by the same scales.  The clamp limit and beta act on the raw GEMM1 accumulator too:
    one ``gemm1_clamp_limit`` serves both halves (gate clamped above, the linear half on both sides), and the
    linear half reaches the intermediate only through ``output1_scale_scalar = gs_c * out1_gate``, so a
    physical limit / beta is ``limit / out1_gate``; alpha multiplies the gate after its scale (physical).
    This reading is the one under which every documented piece fits; it has not run on a Blackwell GPU
    here (docs/kernels.md).
    """
    args = dict(gemm1_bias=None, gemm1_alpha=None, gemm1_beta=None, gemm1_clamp_limit=None, gemm2_bias=None)
    scale1 = out1_gate.float().reshape(-1, 1)
    if w13_bias is not None:
        args["gemm1_bias"] = (w13_bias.float() / scale1).contiguous()
    if w2_bias is not None:
        args["gemm2_bias"] = (w2_bias.float() / out2.float().reshape(-1, 1)).contiguous()
    if activation == "swiglu_oai":
        alpha, beta, limit = contract_params(activation, activation_params)
        ones = torch.ones_like(out1_gate, dtype=torch.float32)
        args["gemm1_alpha"] = (ones * alpha).contiguous()
        args["gemm1_beta"] = (beta / out1_gate.float()).contiguous()
        args["gemm1_clamp_limit"] = (limit / out1_gate.float()).contiguous()
    elif activation_params is not None:
        raise MoEConfigError(f"activation {activation!r} takes no parameters, got {activation_params!r}")
    return args


def output_scales(w13_global_scale: torch.Tensor, w2_global_scale: torch.Tensor, input_global_scale,
                  intermediate_global_scale, gated: bool):
    """The kernel's per-expert ``(output1_scale_scalar, output1_scale_gate_scalar, output2_scale_scalar)``.

    With multipliers gs: gate = 1 / (gs_w13 * gs_a); out1 = gs_c * gate when gated, gs_c otherwise;
    out2 = 1 / (gs_c * gs_w2).  All float32 ``[E]``.
    """
    g13 = w13_global_scale.float()
    g2 = w2_global_scale.float()
    gs_a = torch.as_tensor(input_global_scale, dtype=torch.float32, device=g13.device).reshape(())
    gs_c = torch.as_tensor(intermediate_global_scale, dtype=torch.float32, device=g13.device).reshape(())
    gate = 1.0 / (g13 * gs_a)
    out1 = gs_c * gate if gated else gs_c.expand_as(g13)
    out2 = 1.0 / (gs_c * g2)
    return out1.contiguous(), gate.contiguous(), out2.contiguous()


# --------------------------------------------------------------------------------------------------
# The call


def chunk_size(num_experts: int, top_k: int, options: Optional[KernelOptions] = None) -> int:
    """Most tokens per launch: ``KernelOptions.trtllm_chunk_size`` when set (tests), else ``trtllm_chunk_size``."""
    override = current(options).trtllm_chunk_size
    return override if override is not None else trtllm_chunk_size(num_experts, top_k)


def routing_limits(routing: str, top_k: int, n_group: Optional[int], topk_group: Optional[int]) -> Optional[str]:
    """What FlashInfer's grouped DeepSeekV3 routing refuses at launch (``topK <= 22``, ``topkGroup <= 4``)."""
    if routing != "deepseek_v3" or (n_group or 1) <= 1:
        return None
    keep = topk_group or n_group
    if top_k > 22 or keep > 4:
        return (f"deepseek_v3 routing with top_k={top_k} and topk_group={keep} (its grouped routing takes at most "
                f"22 and 4)")
    return None


def _check_args(args: registry.RunArgs, num_experts: int) -> None:
    if args.activation not in ACTIVATION_NAMES:
        registry.check_supported(TRTLLM, activation=args.activation, routing=args.routing)
    if args.routing not in ROUTING_NAMES:
        raise MoEConfigError(f"kernel 'trtllm' does not support routing {args.routing!r}; it supports {sorted(ROUTING_NAMES)}")
    registry.check_routing(args.routing, args.top_k, num_experts, args.n_group, args.topk_group)
    limit = routing_limits(args.routing, args.top_k, args.n_group, args.topk_group)
    if limit is not None:
        raise MoEConfigError(f"kernel 'trtllm' does not support {limit}")


def _enum_member(enum_cls, name: str, what: str):
    if enum_cls is None or not hasattr(enum_cls, name):
        raise KernelUnavailableError(f"the installed flashinfer has no {what} named {name!r}")
    return getattr(enum_cls, name)


@functools.lru_cache(maxsize=32)
def _parameters(fn) -> tuple[dict, bool]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as exc:
        raise KernelUnavailableError(f"cannot read the signature of {getattr(fn, '__name__', fn)}: {exc}") from exc
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return dict(params), var_kw


def _tile_tokens_dim(tokens: int, num_experts: int, top_k: int) -> int:
    # Only for old releases that still require it: the per-expert token count rounded up to a power
    # of two, within the kernel's tiles 8..64.
    per_expert = max(1, tokens * top_k // num_experts)
    return min(max(1 << (per_expert - 1).bit_length(), 8), 64)


def _call(fn, kwargs: dict, *, essential: frozenset, tokens: int, num_experts: int, top_k: int,
          activation: str, enums) -> Any:
    """Call ``fn`` by keyword with the arguments its signature has (FlashInfer 0.4 -> 0.7 and later)."""
    params, var_kw = _parameters(fn)
    name = getattr(fn, "__name__", "the FlashInfer MoE function")
    kwargs = dict(kwargs)
    if "activation_type" in params:
        kwargs["activation_type"] = int(_enum_member(enums.ActivationType, ACTIVATION_NAMES[activation], "ActivationType"))
    elif "gated_act_type" in params:
        if activation not in _GATED_ACT_NAMES:
            raise KernelUnavailableError(
                f"the installed flashinfer's {name} only takes gated activations (gated_act_type); "
                f"activation {activation!r} needs a release with activation_type"
            )
        kwargs["gated_act_type"] = int(_enum_member(enums.GatedActType, _GATED_ACT_NAMES[activation], "GatedActType"))
    elif activation != "silu":
        raise KernelUnavailableError(f"the installed flashinfer's {name} has no activation argument (SwiGLU only)")
    if "tile_tokens_dim" in params and params["tile_tokens_dim"].default is inspect.Parameter.empty:
        kwargs["tile_tokens_dim"] = _tile_tokens_dim(tokens, num_experts, top_k)
    if "hidden_states_scale_layout" in params and enums.SfLayout is not None:
        kwargs["hidden_states_scale_layout"] = enums.SfLayout.layout_linear
    if not var_kw:
        lacking = sorted(k for k in essential if k in kwargs and k not in params)
        if lacking:
            raise KernelUnavailableError(f"the installed flashinfer's {name} has no parameter(s) {lacking}; "
                                         "this release is not supported by the 'trtllm' kernel")
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    missing = [p.name for p in params.values()
               if p.default is inspect.Parameter.empty and p.name not in kwargs
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise KernelUnavailableError(f"the installed flashinfer's {name} requires {missing}, which the 'trtllm' kernel does not know")
    result = fn(**kwargs)
    return result[0] if isinstance(result, (list, tuple)) else result


_ESSENTIAL = frozenset({
    "routing_bias", "hidden_states", "hidden_states_scale", "gemm1_weights", "gemm1_weights_scale",
    "gemm2_weights", "gemm2_weights_scale", "output1_scale_scalar", "output1_scale_gate_scalar",
    "output2_scale_scalar", "num_experts", "top_k", "n_group", "topk_group", "intermediate_size",
    "local_expert_offset", "local_num_experts", "routed_scaling_factor", "routing_method_type",
    "routing_logits", "topk_ids",
})


def _pack_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    # (expert_id << 16) | bf16 bits of the weight: the precomputed-routing format every release takes.
    bits = topk_weights.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return ((topk_ids.to(torch.int32) << 16) | bits).contiguous()


def fused_moe(hidden_states: torch.Tensor, weights: registry.MoEWeights, input_global_scale,
              intermediate_global_scale, args: registry.RunArgs, *, router_logits: Optional[torch.Tensor] = None,
              routing_bias: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
              topk_ids: Optional[torch.Tensor] = None, output: Optional[torch.Tensor] = None,
              w13_bias: Optional[torch.Tensor] = None, w2_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The TRTLLM NVFP4 MoE on ``hidden_states [T, Hp]`` with prepared ``weights``; bf16 ``[T, W]``.

    ``w13_bias [E_local, N1]`` / ``w2_bias [E_local, Hp]``: expert biases as :func:`prepare_biases` laid
    them out (real units; :func:`bias_and_activation_args` scales them for the kernel).

    Routing comes from ``router_logits [T, E]`` (computed by the kernel, ``routing_bias`` used by
    ``deepseek_v3`` only, as in the reference) or precomputed ``topk_weights`` / ``topk_ids [T, k]``
    (the ``_routed_moe`` entry point).  ``output``, if given, is a bf16 ``[T, W]`` buffer with
    ``W <= Hp`` that receives the first ``W`` columns (the kernel writes it directly where the
    installed FlashInfer takes ``output``); it is returned.  Tokens are processed in chunks of at
    most :func:`chunk_size`.
    """
    if not isinstance(weights, registry.MoEWeights):
        weights = registry.MoEWeights(*weights)
    w13, s13, g13, w2, s2, g2 = weights
    local_experts, n1, hp = w13.shape[0], w13.shape[1], w13.shape[2] * 2
    # Expert parallelism: the kernel routes over all experts and computes its block [offset, +local_experts).
    num_experts = local_experts if args.global_num_experts is None else args.global_num_experts
    if not 0 <= args.local_expert_offset <= num_experts - local_experts:
        raise MoEConfigError(f"local experts [{args.local_expert_offset}, {args.local_expert_offset + local_experts}) "
                             f"do not lie within the {num_experts} global experts")
    ip = w2.shape[-1] * 2
    _check_args(args, num_experts)
    gated = is_gated(args.activation)
    if n1 != (2 * ip if gated else ip):
        raise MoEConfigError(f"w13 has {n1} rows, inconsistent with intermediate {ip} and activation {args.activation!r}")
    if hidden_states.ndim != 2 or hidden_states.shape[1] != hp:
        raise MoEConfigError(f"hidden_states must be [tokens, {hp}] (the padded hidden size), got {tuple(hidden_states.shape)}")
    tokens = hidden_states.shape[0]
    if input_global_scale is None or intermediate_global_scale is None:
        raise MoEConfigError("kernel 'trtllm' needs static input and intermediate global scales, got None")
    routed = router_logits is None
    if routed:
        if topk_ids is None or topk_weights is None:
            raise MoEConfigError("pass either router_logits or both topk_weights and topk_ids")
        if topk_ids.shape != (tokens, args.top_k) or topk_weights.shape != (tokens, args.top_k):
            raise MoEConfigError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                                 f"must be [tokens={tokens}, top_k={args.top_k}]")
    elif router_logits.shape != (tokens, num_experts):
        raise MoEConfigError(f"router_logits shape {tuple(router_logits.shape)} != (tokens={tokens}, experts={num_experts})")
    for name, t, want in (("w13_bias", w13_bias, (local_experts, n1)), ("w2_bias", w2_bias, (local_experts, hp))):
        if t is not None:
            check_tensor(t, name, torch.float32, want)
    if output is not None:
        if output.dtype != torch.bfloat16 or output.ndim != 2 or output.shape[0] != tokens or not 0 < output.shape[1] <= hp:
            raise MoEConfigError(f"output must be bf16 [tokens={tokens}, width <= {hp}], got {output.dtype} {tuple(output.shape)}")
        if not output.is_contiguous():
            raise MoEConfigError("output must be contiguous")

    api = _api()
    enums = api.enums
    fn = api.routed_moe if routed else api.fused_moe
    if fn is None:
        raise KernelUnavailableError("the installed flashinfer has no trtllm_fp4_block_scale_routed_moe")
    width = output.shape[1] if output is not None else hp
    out = output if output is not None else torch.empty(tokens, hp, dtype=torch.bfloat16, device=hidden_states.device)
    if tokens == 0:
        return out

    device = hidden_states.device
    gs_a = torch.as_tensor(input_global_scale, dtype=torch.float32, device=device).reshape(())
    out1, gate1, out2 = output_scales(g13, g2, gs_a, intermediate_global_scale, gated)
    extras = bias_and_activation_args(gate1, out2, args.activation, args.activation_params, w13_bias, w2_bias)
    x_q, x_sf = api.quantize(hidden_states.to(torch.bfloat16).contiguous(), gs_a)
    routing_type = int(_enum_member(enums.RoutingMethodType, ROUTING_NAMES[args.routing], "RoutingMethodType"))
    deepseek = args.routing == "deepseek_v3"
    if routed:
        packed_topk = _pack_topk(topk_ids, topk_weights)
    else:
        # DeepSeekV3 routing takes float32 logits; every release takes bfloat16 for the others.
        logits = router_logits.to(torch.float32 if deepseek else torch.bfloat16).contiguous()
    # fp32 as the reference and the Triton route keep it: a bf16 bias picks other experts for ~4% of tokens.
    bias = routing_bias.to(torch.float32).contiguous() if (deepseek and routing_bias is not None) else None
    params, var_kw = _parameters(fn)
    writes_output = var_kw or "output" in params

    common = dict(
        routing_bias=bias,
        gemm1_weights=w13, gemm1_weights_scale=s13,
        gemm2_weights=w2, gemm2_weights_scale=s2, **extras,
        output1_scale_scalar=out1, output1_scale_gate_scalar=gate1, output2_scale_scalar=out2,
        num_experts=num_experts, top_k=args.top_k,
        n_group=(args.n_group or 1) if deepseek else args.n_group,
        topk_group=(args.topk_group or args.n_group or 1) if deepseek else args.topk_group,
        intermediate_size=ip, local_expert_offset=args.local_expert_offset, local_num_experts=local_experts,
        routed_scaling_factor=(args.routed_scaling_factor if args.routed_scaling_factor is not None else 1.0)
        if deepseek else args.routed_scaling_factor,
        routing_method_type=routing_type, do_finalize=True,
    )
    # A bias or activation parameter the installed signature lacks must be an error, never silently dropped.
    essential = _ESSENTIAL | {k for k, v in extras.items() if v is not None}
    step = chunk_size(num_experts, args.top_k, args.options)
    for start in range(0, tokens, step):
        stop = min(tokens, start + step)
        kwargs = dict(common, hidden_states=x_q[start:stop], hidden_states_scale=x_sf[start:stop])
        if routed:
            kwargs["topk_ids"] = packed_topk[start:stop]
        else:
            kwargs["routing_logits"] = logits[start:stop]
        if writes_output:
            kwargs["output"] = out[start:stop]
        result = _call(fn, kwargs, essential=essential, tokens=stop - start, num_experts=num_experts,
                       top_k=args.top_k, activation=args.activation, enums=enums)
        if not writes_output:
            out[start:stop].copy_(result[:, :width])
        elif result is not None and result.data_ptr() != out[start:stop].data_ptr():
            out[start:stop].copy_(result[:, :width])
    return out


def run(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias,
        args: registry.RunArgs, *, w13_bias=None, w2_bias=None) -> torch.Tensor:
    """The registry's ``run``: ``[T, Hp]`` bf16 in, ``[T, Hp]`` bf16 out, routing done by the kernel."""
    return fused_moe(hidden_states, weights, input_global_scale, intermediate_global_scale, args,
                     router_logits=router_logits, routing_bias=routing_bias, w13_bias=w13_bias, w2_bias=w2_bias)


def run_routed(hidden_states, topk_weights, topk_ids, weights, input_global_scale, intermediate_global_scale,
               args: registry.RunArgs, *, output: Optional[torch.Tensor] = None, w13_bias=None,
               w2_bias=None) -> torch.Tensor:
    """Precomputed routing (``topk_weights``, ``topk_ids`` ``[T, k]``): ``trtllm_fp4_block_scale_routed_moe``."""
    return fused_moe(hidden_states, weights, input_global_scale, intermediate_global_scale, args,
                     topk_weights=topk_weights, topk_ids=topk_ids, output=output, w13_bias=w13_bias,
                     w2_bias=w2_bias)


TRTLLM = registry.register(registry.KernelSpec(
    name="trtllm",
    description="FlashInfer TRTLLM-gen NVFP4 fused MoE; needs an SM100/SM103 (Blackwell) GPU and flashinfer-python",
    alignment=TRTLLM_ALIGNMENT,
    activations=frozenset(ACTIVATION_NAMES),
    # sparsemixer (PhiMoE) has no RoutingMethodType: its layers take the Triton path (Hopper) or the reference
    routings=frozenset(ROUTING_NAMES),
    available=available,
    prepare=prepare,
    run=run,
    max_tokens=trtllm_chunk_size,
    quantizes_activations=True,
    priority=20,
    unsupported_reasons={"gelu_tanh": GELU_TANH_REASON},
    expert_bias=True,
    activation_params=True,
    prepare_biases=prepare_biases,
    routing_limits=routing_limits,
))
