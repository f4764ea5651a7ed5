"""The custom ops of the MoE graph and their fake (meta) functions.

``moe_nvfp4::fused_moe`` is the high-level FusedMoE node users' models produce: unpadded hidden
states ``[T, H]`` in, ``[T, H]`` out.  The lowering pass rewrites it into visible graph nodes around
``moe_nvfp4::trtllm_nvfp4_moe``, which works in the kernel's padded domain (``[T, Hp]`` in and out)
and dispatches at run time to the kernel named by its ``kernel`` argument (kernels/registry.py).

Both fake functions are pure functions of their inputs and derive every size from the shape contract,
so fake-tensor propagation over a rewritten graph checks exactly what the kernels will require.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch
from torch import Tensor

from moe_passes import parallel
from moe_passes.contract import MoEShape, round_up
from moe_passes.contract import activation_params as _params_of
from moe_passes.contract import routing_params as _routing_params_of
from moe_passes.errors import MoEConfigError, MoEError, MoENonFiniteError, MoERangeWarning, MoEShapeError
from moe_passes.kernels import graphed, registry
from moe_passes.kernels.graphed import tensor_key
from moe_passes.kernels.nvfp4 import E2M1_MAX, E4M3_MAX

__all__ = ["fused_moe", "trtllm_nvfp4_moe", "check_moe_call", "check_layer_inputs", "FUSED_MOE", "KERNEL_OP",
           "TENSOR_ARGS", "BIAS_ARGS"]

# Order of the tensor arguments shared by both ops (after hidden_states and router_logits).  The optional expert
# biases (w13_bias, w2_bias) come last, after the parallel arguments, as keywords: a layer without them keeps
# its graph and cache key.
TENSOR_ARGS = registry.MoEWeights._fields + ("input_global_scale", "intermediate_global_scale", "routing_bias")
BIAS_ARGS = ("w13_bias", "w2_bias")

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _known_ne(a, b) -> bool:
    # Never guard on symbolic token counts: only report sizes that are provably different.
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a != b)


def _where(layer: str) -> str:
    return f"MoE layer {layer!r}" if layer else "MoE layer"


def _expert_count_error(scored, experts, where, layer) -> MoEShapeError:
    return MoEShapeError(f"{where}: router_logits score {scored} experts but the weights hold {experts}",
                         layer=layer, sizes=(scored, experts))


def _token_count_error(logit_tokens, tokens, where, layer) -> MoEShapeError:
    return MoEShapeError(f"{where}: router_logits has {logit_tokens} tokens, hidden_states {tokens}",
                         layer=layer, sizes=(logit_tokens, tokens))


def _width_error(width, hidden_size, hidden_padded, where, layer) -> Optional[MoEShapeError]:
    if width > hidden_padded:
        return MoEShapeError(f"{where}: hidden states are {width} wide, wider than the weights' {hidden_padded}",
                             layer=layer, sizes=(width, hidden_padded))
    if hidden_size is not None and width != hidden_size:
        return MoEShapeError(f"{where}: hidden states are {width} wide but the layer's hidden size is {hidden_size}",
                             layer=layer, sizes=(width, hidden_size))
    return None


def _device_error(name: str, on: torch.device, device: torch.device, where: str) -> MoEConfigError:
    return MoEConfigError(f"{where}: {name} is on {on} but hidden_states on {device}; every tensor argument "
                          f"of the op must be on one device (move the layer with .to(device))")


def _shape_text(t: Tensor) -> str:
    # Dynamo cannot trace str() of a symbolic size (a dynamic token count): traced, the rank says it.
    if torch.compiler.is_compiling():
        return f"of {t.ndim} dimensions"
    return str(tuple(t.shape))


def _activation_error(hidden_states: Tensor, router_logits: Tensor, where: str, layer: str) -> Optional[MoEError]:
    # Rank, dtype and device of the two per-call inputs; also traced by Dynamo (check_layer_inputs), so
    # plain comparisons of static properties only.
    if hidden_states.ndim != 2:
        return MoEShapeError(f"{where}: hidden_states must be [tokens, hidden], got shape "
                             f"{_shape_text(hidden_states)}", layer=layer)
    if hidden_states.dtype != torch.bfloat16:
        return MoEConfigError(f"{where}: hidden_states must be bfloat16 (the kernels' activation dtype), "
                              f"got {hidden_states.dtype}; cast the input or the model to bfloat16")
    if router_logits.ndim != 2 or router_logits.dtype not in _LOGIT_DTYPES:
        return MoEConfigError(f"{where}: router_logits must be a 2-D float32/bfloat16/float16 tensor "
                              f"[tokens, experts], got {router_logits.dtype} with shape {_shape_text(router_logits)}")
    if router_logits.device != hidden_states.device:
        return MoEConfigError(f"{where}: router_logits are on {router_logits.device} but hidden_states on "
                              f"{hidden_states.device}; every input of the layer must be on one device")
    return None


def _layer_input_error(hidden_states, router_logits, hidden_size, hidden_padded, experts, device, where,
                       layer) -> Optional[MoEError]:
    error = _activation_error(hidden_states, router_logits, where, layer)
    if error is not None:
        return error
    if hidden_states.device != device:  # the weights' device; check_moe_call meets w13 first
        return _device_error("w13", device, hidden_states.device, where)
    if router_logits.shape[1] != experts:
        return _expert_count_error(router_logits.shape[1], experts, where, layer)
    if router_logits.shape[0] != hidden_states.shape[0]:
        return _token_count_error(router_logits.shape[0], hidden_states.shape[0], where, layer)
    return _width_error(hidden_states.shape[1], hidden_size, hidden_padded, where, layer)


def check_layer_inputs(hidden_states: Tensor, router_logits: Tensor, *, hidden_size: int, hidden_padded: int,
                       experts: int, device: torch.device, layer: str) -> None:
    """The per-call checks of :func:`check_moe_call` on a layer's own inputs, for tracing by Dynamo.

    ``FusedMoE.forward`` calls this while Dynamo traces it: an error the op's fake function raised would
    reach the user wrapped in Dynamo's ``TorchRuntimeError``.  Every size and dtype compared here is
    guarded by Dynamo, so a passing call costs nothing at run time.  On bad input the graph breaks first
    (carrying the message, which is all ``fullgraph=True`` shows): Dynamo compiles what it traced so far
    and runs the ``raise`` as plain Python, so the user gets this exception itself.  A ``raise`` met while
    tracing would instead make Dynamo give up on the frame, and on ``FusedMoE.forward`` for good.  The
    price (docs/decisions.md, decision 17): later good calls may be served split at this layer.
    """
    where = _where(layer)
    error = _layer_input_error(hidden_states, router_logits, hidden_size, hidden_padded, experts, device, where,
                               layer)
    if error is not None:
        torch._dynamo.graph_break(msg=str(error))
        _raise(error)


@torch._dynamo.disable
def _raise(error: Exception) -> None:
    # Run as plain Python: Dynamo (torch 2.11) cannot trace raising an exception object made before its break.
    raise error


def check_moe_call(hidden_states: Tensor, router_logits: Tensor, weights: registry.MoEWeights, *, top_k: int,
                   activation: str, routing: str, kernel: str, layer: str, padded_input: bool,
                   hidden_size: Optional[int] = None, input_global_scale: Optional[Tensor] = None,
                   intermediate_global_scale: Optional[Tensor] = None, routing_bias: Optional[Tensor] = None,
                   local_expert_offset: int = 0, global_num_experts: Optional[int] = None,
                   w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
                   activation_params: Optional[List[float]] = None,
                   routing_params: Optional[List[float]] = None) -> MoEShape:
    """Validate one MoE call against the shape contract and the kernel's capabilities.

    Used by the fake functions (compile time) and the real ones (eager), so both reject the same input
    with the same message.  ``padded_input`` says whether ``hidden_states`` must already be padded
    (the kernel op) or must be the layer's true width (the FusedMoE op).  Every tensor argument must be
    on the hidden states' device: a kernel handed a pointer to another device's memory reads garbage.
    """
    where = _where(layer)
    spec = registry.get(kernel)
    error = _activation_error(hidden_states, router_logits, where, layer)
    if error is not None:
        raise error
    w = weights
    device = hidden_states.device
    for name, t, dtype, ndim in (("w13", w.w13, torch.uint8, 3), ("w13_scale", w.w13_scale, torch.float8_e4m3fn, 3),
                                 ("w13_global_scale", w.w13_global_scale, torch.float32, 1),
                                 ("w2", w.w2, torch.uint8, 3), ("w2_scale", w.w2_scale, torch.float8_e4m3fn, 3),
                                 ("w2_global_scale", w.w2_global_scale, torch.float32, 1)):
        if t.dtype != dtype or t.ndim != ndim:
            raise MoEConfigError(f"{where}: {name} must be a {ndim}-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
        if t.device != device:
            raise _device_error(name, t.device, device, where)
    experts = w.w13.shape[0]
    for name, t in (("input_global_scale", input_global_scale),
                    ("intermediate_global_scale", intermediate_global_scale)):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.numel() != 1:
            raise MoEConfigError(f"{where}: {name} must be a float32 tensor with one element, got {t.dtype} "
                                 f"{tuple(t.shape)}")
        if t.device != device:
            raise _device_error(name, t.device, device, where)
    if routing_bias is not None:  # one bias per global expert: routing runs over all of them on every rank
        total = experts if global_num_experts is None else global_num_experts
        if not routing_bias.dtype.is_floating_point or tuple(routing_bias.shape) != (total,):
            raise MoEConfigError(f"{where}: routing_bias must be a float tensor of shape ({total},), got "
                                 f"{routing_bias.dtype} {tuple(routing_bias.shape)}")
        if routing_bias.device != device:
            raise _device_error("routing_bias", routing_bias.device, device, where)
    hidden_padded, intermediate_padded = w.w2.shape[1], w.w2.shape[2] * 2
    biases = w13_bias is not None or w2_bias is not None
    registry.check_supported(spec, activation=activation, routing=routing, biases=biases)
    _params_of(activation, activation_params)  # parameters only for a parametric activation, three of them
    _routing_params_of(routing, routing_params)  # sparsemixer's jitter_eps, and nothing for the others
    if hidden_padded % spec.alignment.hidden:
        raise MoEShapeError(
            f"{where}: padded hidden size {hidden_padded} breaks kernel {kernel!r}'s alignment of "
            f"{spec.alignment.hidden} (expected {round_up(hidden_padded, spec.alignment.hidden)})",
            layer=layer, sizes=(hidden_padded, spec.alignment.hidden))
    inter_align = spec.alignment.intermediate(activation)
    if intermediate_padded % inter_align:
        raise MoEShapeError(
            f"{where}: intermediate size {intermediate_padded} breaks kernel {kernel!r}'s alignment of {inter_align}",
            layer=layer, sizes=(intermediate_padded, inter_align))
    shape = MoEShape.from_weights(w.w13, w.w2, hidden=hidden_size or hidden_padded, top_k=min(top_k, experts),
                                  activation=activation, alignment=spec.alignment)
    expected = shape.weight_shapes()
    for name in registry.MoEWeights._fields:
        if tuple(getattr(w, name).shape) != expected[name]:
            raise MoEShapeError(f"{where}: {name} has shape {tuple(getattr(w, name).shape)}, the contract says "
                                f"{expected[name]}", layer=layer, sizes=(tuple(getattr(w, name).shape), expected[name]))
    for name, t in (("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is None:
            continue
        want = shape.bias_shapes()[name]
        if t.dtype != torch.float32 or t.ndim != 2:
            raise MoEConfigError(f"{where}: {name} must be a 2-D float32 tensor {list(want)} (padded like the "
                                 f"weights), got {t.dtype} {tuple(t.shape)}")
        if tuple(t.shape) != want:
            raise MoEShapeError(f"{where}: {name} has shape {tuple(t.shape)}, the contract says {want} (padded like "
                                f"the weights)", layer=layer, sizes=(tuple(t.shape), want))
        if t.device != device:
            raise _device_error(name, t.device, device, where)
    # Expert parallelism: the weights hold experts [offset, offset + experts) of global_num_experts.
    total = experts if global_num_experts is None else global_num_experts
    if not (0 <= local_expert_offset and local_expert_offset + experts <= total):
        raise MoEConfigError(f"{where}: local experts [{local_expert_offset}, {local_expert_offset + experts}) do not "
                             f"lie within the {total} global experts")
    if router_logits.shape[1] != total:
        if global_num_experts is None:
            raise _expert_count_error(router_logits.shape[1], experts, where, layer)
        raise MoEShapeError(f"{where}: router_logits score {router_logits.shape[1]} experts but the layer has {total} "
                            f"(this rank holds {experts} of them)", layer=layer, sizes=(router_logits.shape[1], total))
    if not 0 < top_k <= total:
        raise MoEConfigError(f"{where}: top_k={top_k} must be between 1 and the number of experts ({total})")
    if _known_ne(router_logits.shape[0], hidden_states.shape[0]):
        raise _token_count_error(router_logits.shape[0], hidden_states.shape[0], where, layer)
    torch._check(router_logits.shape[0] == hidden_states.shape[0],
                 lambda: f"{where}: router_logits and hidden_states disagree on the token count")
    width = hidden_states.shape[1]
    if padded_input and width != hidden_padded:
        raise MoEShapeError(
            f"{where}: the kernel op got hidden states {width} wide but its weights are padded to {hidden_padded}; "
            f"activations and weights must be padded to the same width",
            layer=layer, sizes=(width, hidden_padded))
    if not padded_input:
        error = _width_error(width, hidden_size, hidden_padded, where, layer)
        if error is not None:
            raise error
        if round_up(width, spec.alignment.hidden) != hidden_padded:
            raise MoEShapeError(
                f"{where}: hidden size {width} pads to {round_up(width, spec.alignment.hidden)} for kernel {kernel!r}, "
                f"but the weights are padded to {hidden_padded}", layer=layer, sizes=(width, hidden_padded))
    return shape


def _weights(*tensors) -> registry.MoEWeights:
    return registry.MoEWeights(*tensors)


# Calls that passed check_moe_call, keyed by everything it reads (the per-call inputs' shape, dtype and device;
# every other tensor's address, shape and dtype; the non-tensor arguments), mapped to the kernel spec and
# RunArgs: a repeated eager call skips the checks, and the key also names the call's record in
# graphed.CALL_GRAPHS, so a hit builds one key per call, not two.
_CHECKED: dict = {}
_CHECKED_MAX = 4096


def _meta(t: Optional[Tensor]):
    return None if t is None else (t.shape, t.dtype, t.device)


def _checked_call(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                  routing_bias, top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                  layer, local_expert_offset, global_num_experts, w13_bias, w2_bias, activation_params,
                  routing_params, *, padded_input: bool, hidden_size: Optional[int] = None):
    """:func:`_check_and_args`, memoized: ``(spec, args, key)``, for real calls only (a fake call's sizes may
    be symbolic)."""
    # the spec's identity too: its capabilities are part of the check (the entry keeps it alive, so no id reuse)
    key = (id(registry.get(kernel)), _meta(hidden_states), _meta(router_logits), *map(tensor_key, weights),
           *map(tensor_key, (input_global_scale, intermediate_global_scale, routing_bias, w13_bias, w2_bias)),
           top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset,
           global_num_experts, padded_input, hidden_size,
           None if activation_params is None else tuple(activation_params),
           None if routing_params is None else tuple(routing_params))
    hit = _CHECKED.get(key)
    if hit is None:
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = hit = _check_and_args(
            hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias, top_k,
            activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset,
            global_num_experts, w13_bias, w2_bias, activation_params, routing_params, padded_input, hidden_size)
    return hit[0], hit[1], key


def _check_and_args(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                    routing_bias, top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                    layer, local_expert_offset, global_num_experts, w13_bias, w2_bias, activation_params,
                    routing_params, padded_input, hidden_size=None):
    """check_moe_call, then the kernel's spec and the call's RunArgs."""
    check_moe_call(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                   kernel=kernel, layer=layer, padded_input=padded_input, hidden_size=hidden_size,
                   input_global_scale=input_global_scale, intermediate_global_scale=intermediate_global_scale,
                   routing_bias=routing_bias, local_expert_offset=local_expert_offset,
                   global_num_experts=global_num_experts, w13_bias=w13_bias, w2_bias=w2_bias,
                   activation_params=activation_params, routing_params=routing_params)
    params = _params_of(activation, activation_params)
    route_params = _routing_params_of(routing, routing_params)
    args = registry.RunArgs(top_k=top_k, activation=activation, routing=routing, n_group=n_group,
                            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                            local_expert_offset=local_expert_offset, global_num_experts=global_num_experts,
                            activation_params=None if params is None else tuple(params),
                            routing_params=None if route_params is None else tuple(route_params))
    return registry.get(kernel), args


def _run_kernel(spec: registry.KernelSpec, args: registry.RunArgs, key, hidden_states, router_logits, weights,
                input_global_scale, intermediate_global_scale, routing_bias, layer, w13_bias=None, w2_bias=None):
    if spec.quantizes_activations and hidden_states.device.type == "cpu" and layer not in _RANGE_WARNED:
        _warn_if_beyond_calibration(hidden_states, input_global_scale, layer)
    # Only kernels that declare expert_bias ever get here with biases (check_moe_call); the others keep
    # their run signature.
    biases = {k: v for k, v in (("w13_bias", w13_bias), ("w2_bias", w2_bias)) if v is not None}
    scales = (input_global_scale, intermediate_global_scale, routing_bias)
    try:
        if hidden_states.is_cuda:
            if hidden_states.device.index != torch.cuda.current_device():  # Triton launches on the current device
                with torch.cuda.device(hidden_states.device):
                    return _run_kernel(spec, args, key, hidden_states, router_logits, weights, input_global_scale,
                                       intermediate_global_scale, routing_bias, layer, w13_bias, w2_bias)
            if hidden_states.shape[0] <= spec.graph_tokens:
                return graphed.CALL_GRAPHS.run(spec.run, spec.name, hidden_states, router_logits, weights, scales,
                                               args, biases, spec.direct, key=key)
            if spec.replay is not None:
                return graphed.CALL_GRAPHS.run(spec.run, spec.name, hidden_states, router_logits, weights, scales,
                                               args, biases, spec.replay, key=key, capture=False)
        return spec.run(hidden_states, router_logits, weights, *scales, args, **biases)
    except MoENonFiniteError as exc:
        raise MoENonFiniteError(f"{_where(layer)}: {exc}") from None


# Layers already warned about activations beyond their calibration: the warning is once per layer.
_RANGE_WARNED: set = set()


def _warn_if_beyond_calibration(hidden_states: Tensor, input_global_scale: Tensor, layer: str) -> None:
    """Warn (once per layer) when the input exceeds the amax its static global scale was calibrated for.

    Above ``amax = 448 * 6 / global_scale`` the e4m3 block scale saturates and the block's values clip:
    the output is wrong with no error.  Only for kernels that quantize activations, and only on the CPU:
    reading the maximum back is a host sync a GPU fast path must not pay.
    """
    calibrated = E4M3_MAX * E2M1_MAX / float(input_global_scale)
    amax = float(hidden_states.abs().amax()) if hidden_states.numel() else 0.0
    if math.isfinite(amax) and amax > calibrated:  # NaN / inf: the kernel's own error says more
        _RANGE_WARNED.add(layer)
        warnings.warn(f"{_where(layer)}: hidden states reach {amax:.4g}, {amax / calibrated:.2f}x the calibrated "
                      f"amax {calibrated:.4g}; NVFP4 block scales saturate above it, so those values are clipped. "
                      f"Calibrate the layer on representative inputs (FusedMoE.from_float(calibration=...)).",
                      MoERangeWarning, stacklevel=2)


# The ops are defined on a plain Library rather than with torch.library.custom_op: custom_op's Python autograd
# wrapper, redispatch and aliasing check took about half of an op call on a CPU host (16 of 34 us; decision 23).
# Autograd falls through (a C++ no-op); the impl itself refuses to be differentiated.
_LIB = torch.library.Library("moe_nvfp4", "FRAGMENT")


class _InferenceOnly(torch.autograd.Function):
    """Runs an op whose inputs require grad; the output requires grad too, and its backward is a clear error
    (the NVFP4 kernels have no backward), never silently missing gradients."""

    @staticmethod
    def forward(ctx, name, run, hidden_states, router_logits):
        ctx.name = name
        return run()

    @staticmethod
    def backward(ctx, grad):
        raise MoEConfigError(f"moe_nvfp4::{ctx.name} has no backward: the NVFP4 MoE ops are inference-only; run "
                             f"the model under torch.no_grad() or torch.inference_mode()")


def _op(fn):
    """Define ``moe_nvfp4::<fn name>`` with the schema of ``fn``'s annotations and ``fn`` as its kernel on every
    device; its fake is registered separately (torch.library.register_fake on the name)."""
    name = fn.__name__
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=()))

    def impl(hidden_states, router_logits, *args, **kwargs):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or router_logits.requires_grad):
            return _InferenceOnly.apply(name, lambda: fn(hidden_states, router_logits, *args, **kwargs),
                                        hidden_states, router_logits)
        return fn(hidden_states, router_logits, *args, **kwargs)

    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return fn


@_op
def trtllm_nvfp4_moe(
    hidden_states: Tensor, router_logits: Tensor,
    w13: Tensor, w13_scale: Tensor, w13_global_scale: Tensor, w2: Tensor, w2_scale: Tensor, w2_global_scale: Tensor,
    input_global_scale: Tensor, intermediate_global_scale: Tensor, routing_bias: Optional[Tensor],
    top_k: int, activation: str, routing: str, n_group: Optional[int], topk_group: Optional[int],
    routed_scaling_factor: Optional[float], kernel: str, layer: str,
    local_expert_offset: int = 0, global_num_experts: Optional[int] = None, group_name: str = "",
    data_parallel: bool = False, w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
    activation_params: Optional[List[float]] = None, routing_params: Optional[List[float]] = None,
) -> Tensor:
    """The lowered MoE kernel call: padded ``[T, Hp]`` bf16 in, ``[T, Hp]`` bf16 out.

    With ``group_name`` the output is this rank's partial sum (its experts, or its intermediate slice) and
    the graph must combine it over that group (``data_parallel``: by a reduce-scatter); the op never does.
    """
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    spec, args, key = _checked_call(
        hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias, top_k,
        activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset,
        global_num_experts, w13_bias, w2_bias, activation_params, routing_params, padded_input=True)
    return _run_kernel(spec, args, key, hidden_states, router_logits, weights, input_global_scale,
                       intermediate_global_scale, routing_bias, layer, w13_bias, w2_bias)


@torch.library.register_fake("moe_nvfp4::trtllm_nvfp4_moe", lib=_LIB)
def _trtllm_nvfp4_moe_fake(hidden_states, router_logits, w13, w13_scale, w13_global_scale, w2, w2_scale,
                           w2_global_scale, input_global_scale, intermediate_global_scale, routing_bias, top_k,
                           activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer,
                           local_expert_offset=0, global_num_experts=None, group_name="", data_parallel=False,
                           w13_bias=None, w2_bias=None, activation_params=None, routing_params=None):
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    _check_and_args(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                    routing_bias, top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                    layer, local_expert_offset, global_num_experts, w13_bias, w2_bias, activation_params,
                    routing_params, True)
    return hidden_states.new_empty((hidden_states.shape[0], w2.shape[1]), dtype=torch.bfloat16)


@_op
def fused_moe(
    hidden_states: Tensor, router_logits: Tensor,
    w13: Tensor, w13_scale: Tensor, w13_global_scale: Tensor, w2: Tensor, w2_scale: Tensor, w2_global_scale: Tensor,
    input_global_scale: Tensor, intermediate_global_scale: Tensor, routing_bias: Optional[Tensor],
    hidden_size: int, top_k: int, activation: str, routing: str, n_group: Optional[int], topk_group: Optional[int],
    routed_scaling_factor: Optional[float], kernel: str, layer: str,
    local_expert_offset: int = 0, global_num_experts: Optional[int] = None, group_name: str = "",
    data_parallel: bool = False, w13_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None,
    activation_params: Optional[List[float]] = None, routing_params: Optional[List[float]] = None,
) -> Tensor:
    """The FusedMoE node: unpadded ``[T, H]`` in, routed-expert output ``[T, H]`` out.

    Eagerly it does what the lowered graph does (pad, kernel, slice, and for a layer sharded over
    ``group_name`` the same functional collectives), so eager and compiled agree.
    """
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    spec, args, key = _checked_call(
        hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias, top_k,
        activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset,
        global_num_experts, w13_bias, w2_bias, activation_params, routing_params, padded_input=False,
        hidden_size=hidden_size)
    if group_name and data_parallel:
        hidden_states = parallel.all_gather(hidden_states, group_name)
        router_logits = parallel.all_gather(router_logits, group_name)
    pad = w2.shape[1] - hidden_size
    # pad and slice only where the lowering would (a zero-width pad still copies the activations)
    padded = torch.nn.functional.pad(hidden_states, (0, pad)) if pad else hidden_states
    out = _run_kernel(spec, args, key, padded, router_logits, weights, input_global_scale, intermediate_global_scale,
                      routing_bias, layer, w13_bias, w2_bias)
    if pad:
        out = out[:, :hidden_size].contiguous()
    if group_name:
        out = parallel.combine(out, group_name, data_parallel)
    return out


@torch.library.register_fake("moe_nvfp4::fused_moe", lib=_LIB)
def _fused_moe_fake(hidden_states, router_logits, w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale,
                    input_global_scale, intermediate_global_scale, routing_bias, hidden_size, top_k, activation,
                    routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset=0,
                    global_num_experts=None, group_name="", data_parallel=False, w13_bias=None, w2_bias=None,
                    activation_params=None, routing_params=None):
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    _check_and_args(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                    routing_bias, top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                    layer, local_expert_offset, global_num_experts, w13_bias, w2_bias, activation_params,
                    routing_params, False, hidden_size)
    return hidden_states.new_empty((hidden_states.shape[0], hidden_size), dtype=torch.bfloat16)


FUSED_MOE = torch.ops.moe_nvfp4.fused_moe.default
KERNEL_OP = torch.ops.moe_nvfp4.trtllm_nvfp4_moe.default
