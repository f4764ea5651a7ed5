"""The custom ops of the MoE graph and their fake (meta) functions.

``moe_nvfp4::fused_moe`` is the high-level FusedMoE node users' models produce: unpadded hidden
states ``[T, H]`` in, ``[T, H]`` out.  The lowering pass rewrites it into visible graph nodes around
``moe_nvfp4::trtllm_nvfp4_moe``, which works in the kernel's padded domain (``[T, Hp]`` in and out)
and dispatches at run time to the kernel named by its ``kernel`` argument (kernels/registry.py).

Both fake functions are pure functions of their inputs and derive every size from the shape contract,
so fake-tensor propagation over a rewritten graph checks exactly what the kernels will require.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_passes.contract import MoEShape, round_up
from moe_passes.errors import MoEConfigError, MoEShapeError
from moe_passes.kernels import registry

__all__ = ["fused_moe", "trtllm_nvfp4_moe", "check_moe_call", "FUSED_MOE", "KERNEL_OP", "TENSOR_ARGS"]

# Order of the tensor arguments shared by both ops (after hidden_states and router_logits).
TENSOR_ARGS = registry.MoEWeights._fields + ("input_global_scale", "intermediate_global_scale", "routing_bias")

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _known_ne(a, b) -> bool:
    # Never guard on symbolic token counts: only report sizes that are provably different.
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return statically_known_true(a != b)


def check_moe_call(hidden_states: Tensor, router_logits: Tensor, weights: registry.MoEWeights, *, top_k: int,
                   activation: str, routing: str, kernel: str, layer: str, padded_input: bool,
                   hidden_size: Optional[int] = None, local_expert_offset: int = 0,
                   global_num_experts: Optional[int] = None) -> MoEShape:
    """Validate one MoE call against the shape contract and the kernel's capabilities.

    Used by the fake functions (compile time) and the real ones (eager), so both reject the same input
    with the same message.  ``padded_input`` says whether ``hidden_states`` must already be padded
    (the kernel op) or must be the layer's true width (the FusedMoE op).
    """
    where = f"MoE layer {layer!r}" if layer else "MoE layer"
    spec = registry.get(kernel)
    if hidden_states.ndim != 2:
        raise MoEShapeError(f"{where}: hidden_states must be [tokens, hidden], got shape {tuple(hidden_states.shape)}",
                            layer=layer)
    if hidden_states.dtype != torch.bfloat16:
        raise MoEConfigError(f"{where}: hidden_states must be bfloat16 (the kernels' activation dtype), "
                             f"got {hidden_states.dtype}; cast the input or the model to bfloat16")
    if router_logits.ndim != 2 or router_logits.dtype not in _LOGIT_DTYPES:
        raise MoEConfigError(f"{where}: router_logits must be a 2-D float32/bfloat16/float16 tensor [tokens, experts], "
                             f"got {router_logits.dtype} with shape {tuple(router_logits.shape)}")
    w = weights
    for name, t, dtype, ndim in (("w13", w.w13, torch.uint8, 3), ("w13_scale", w.w13_scale, torch.float8_e4m3fn, 3),
                                 ("w13_global_scale", w.w13_global_scale, torch.float32, 1),
                                 ("w2", w.w2, torch.uint8, 3), ("w2_scale", w.w2_scale, torch.float8_e4m3fn, 3),
                                 ("w2_global_scale", w.w2_global_scale, torch.float32, 1)):
        if t.dtype != dtype or t.ndim != ndim:
            raise MoEConfigError(f"{where}: {name} must be a {ndim}-D {dtype} tensor, got {t.dtype} {tuple(t.shape)}")
    experts = w.w13.shape[0]
    hidden_padded, intermediate_padded = w.w2.shape[1], w.w2.shape[2] * 2
    registry.check_supported(spec, activation=activation, routing=routing)
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
    # Expert parallelism: the weights hold experts [offset, offset + experts) of global_num_experts.
    total = experts if global_num_experts is None else global_num_experts
    if not (0 <= local_expert_offset and local_expert_offset + experts <= total):
        raise MoEConfigError(f"{where}: local experts [{local_expert_offset}, {local_expert_offset + experts}) do not "
                             f"lie within the {total} global experts")
    if router_logits.shape[1] != total:
        holds = (f"the weights hold {experts}" if global_num_experts is None
                 else f"the layer has {total} (this rank holds {experts} of them)")
        raise MoEShapeError(f"{where}: router_logits score {router_logits.shape[1]} experts but {holds}",
                            layer=layer, sizes=(router_logits.shape[1], total))
    if not 0 < top_k <= total:
        raise MoEConfigError(f"{where}: top_k={top_k} must be between 1 and the number of experts ({total})")
    if _known_ne(router_logits.shape[0], hidden_states.shape[0]):
        raise MoEShapeError(f"{where}: router_logits has {router_logits.shape[0]} tokens, hidden_states "
                            f"{hidden_states.shape[0]}", layer=layer)
    torch._check(router_logits.shape[0] == hidden_states.shape[0],
                 lambda: f"{where}: router_logits and hidden_states disagree on the token count")
    width = hidden_states.shape[1]
    if padded_input and width != hidden_padded:
        raise MoEShapeError(
            f"{where}: the kernel op got hidden states {width} wide but its weights are padded to {hidden_padded}; "
            f"activations and weights must be padded to the same width",
            layer=layer, sizes=(width, hidden_padded))
    if not padded_input:
        if width > hidden_padded:
            raise MoEShapeError(f"{where}: hidden states are {width} wide, wider than the weights' {hidden_padded}",
                                layer=layer, sizes=(width, hidden_padded))
        if hidden_size is not None and width != hidden_size:
            raise MoEShapeError(f"{where}: hidden states are {width} wide but the layer's hidden size is {hidden_size}",
                                layer=layer, sizes=(width, hidden_size))
        if round_up(width, spec.alignment.hidden) != hidden_padded:
            raise MoEShapeError(
                f"{where}: hidden size {width} pads to {round_up(width, spec.alignment.hidden)} for kernel {kernel!r}, "
                f"but the weights are padded to {hidden_padded}", layer=layer, sizes=(width, hidden_padded))
    return shape


def _weights(*tensors) -> registry.MoEWeights:
    return registry.MoEWeights(*tensors)


def _run_kernel(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias,
                top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                local_expert_offset=0, global_num_experts=None):
    spec = registry.get(kernel)
    args = registry.RunArgs(top_k=top_k, activation=activation, routing=routing, n_group=n_group,
                            topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                            local_expert_offset=local_expert_offset, global_num_experts=global_num_experts)
    return spec.run(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                    routing_bias, args)


@torch.library.custom_op("moe_nvfp4::trtllm_nvfp4_moe", mutates_args=())
def trtllm_nvfp4_moe(
    hidden_states: Tensor, router_logits: Tensor,
    w13: Tensor, w13_scale: Tensor, w13_global_scale: Tensor, w2: Tensor, w2_scale: Tensor, w2_global_scale: Tensor,
    input_global_scale: Tensor, intermediate_global_scale: Tensor, routing_bias: Optional[Tensor],
    top_k: int, activation: str, routing: str, n_group: Optional[int], topk_group: Optional[int],
    routed_scaling_factor: Optional[float], kernel: str, layer: str,
    local_expert_offset: int = 0, global_num_experts: Optional[int] = None, group_name: str = "",
    data_parallel: bool = False,
) -> Tensor:
    """The lowered MoE kernel call: padded ``[T, Hp]`` bf16 in, ``[T, Hp]`` bf16 out.

    With ``group_name`` the output is this rank's partial sum (its experts, or its intermediate slice) and
    the graph must combine it over that group (``data_parallel``: by a reduce-scatter); the op never does.
    """
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    check_moe_call(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                   kernel=kernel, layer=layer, padded_input=True, local_expert_offset=local_expert_offset,
                   global_num_experts=global_num_experts)
    out = _run_kernel(hidden_states, router_logits, weights, input_global_scale, intermediate_global_scale,
                      routing_bias, top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                      local_expert_offset, global_num_experts)
    return out


@trtllm_nvfp4_moe.register_fake
def _trtllm_nvfp4_moe_fake(hidden_states, router_logits, w13, w13_scale, w13_global_scale, w2, w2_scale,
                           w2_global_scale, input_global_scale, intermediate_global_scale, routing_bias, top_k,
                           activation, routing, n_group, topk_group, routed_scaling_factor, kernel, layer,
                           local_expert_offset=0, global_num_experts=None, group_name="", data_parallel=False):
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    check_moe_call(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                   kernel=kernel, layer=layer, padded_input=True, local_expert_offset=local_expert_offset,
                   global_num_experts=global_num_experts)
    return hidden_states.new_empty((hidden_states.shape[0], w2.shape[1]), dtype=torch.bfloat16)


@torch.library.custom_op("moe_nvfp4::fused_moe", mutates_args=())
def fused_moe(
    hidden_states: Tensor, router_logits: Tensor,
    w13: Tensor, w13_scale: Tensor, w13_global_scale: Tensor, w2: Tensor, w2_scale: Tensor, w2_global_scale: Tensor,
    input_global_scale: Tensor, intermediate_global_scale: Tensor, routing_bias: Optional[Tensor],
    hidden_size: int, top_k: int, activation: str, routing: str, n_group: Optional[int], topk_group: Optional[int],
    routed_scaling_factor: Optional[float], kernel: str, layer: str,
    local_expert_offset: int = 0, global_num_experts: Optional[int] = None, group_name: str = "",
    data_parallel: bool = False,
) -> Tensor:
    """The FusedMoE node: unpadded ``[T, H]`` in, routed-expert output ``[T, H]`` out.

    Eagerly it does what the lowered graph does (pad, kernel, slice, and for a layer sharded over
    ``group_name`` the same functional collectives), so eager and compiled agree.
    """
    from moe_passes import parallel

    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    check_moe_call(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                   kernel=kernel, layer=layer, padded_input=False, hidden_size=hidden_size,
                   local_expert_offset=local_expert_offset, global_num_experts=global_num_experts)
    if group_name and data_parallel:
        hidden_states = parallel.all_gather(hidden_states, group_name)
        router_logits = parallel.all_gather(router_logits, group_name)
    padded = torch.nn.functional.pad(hidden_states, (0, w2.shape[1] - hidden_size))
    out = _run_kernel(padded, router_logits, weights, input_global_scale, intermediate_global_scale, routing_bias,
                      top_k, activation, routing, n_group, topk_group, routed_scaling_factor, kernel,
                      local_expert_offset, global_num_experts)
    out = out[:, :hidden_size].contiguous()
    if group_name:
        out = parallel.combine(out, group_name, data_parallel)
    return out


@fused_moe.register_fake
def _fused_moe_fake(hidden_states, router_logits, w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale,
                    input_global_scale, intermediate_global_scale, routing_bias, hidden_size, top_k, activation,
                    routing, n_group, topk_group, routed_scaling_factor, kernel, layer, local_expert_offset=0,
                    global_num_experts=None, group_name="", data_parallel=False):
    weights = _weights(w13, w13_scale, w13_global_scale, w2, w2_scale, w2_global_scale)
    check_moe_call(hidden_states, router_logits, weights, top_k=top_k, activation=activation, routing=routing,
                   kernel=kernel, layer=layer, padded_input=False, hidden_size=hidden_size,
                   local_expert_offset=local_expert_offset, global_num_experts=global_num_experts)
    return hidden_states.new_empty((hidden_states.shape[0], hidden_size), dtype=torch.bfloat16)


FUSED_MOE = torch.ops.moe_nvfp4.fused_moe.default
KERNEL_OP = torch.ops.moe_nvfp4.trtllm_nvfp4_moe.default
