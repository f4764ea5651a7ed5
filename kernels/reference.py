"""What the TRTLLM NVFP4 MoE kernel computes, in plain torch (CPU or GPU).

This is the correctness oracle of the project and the CPU implementation of the lowered op.  Steps:

1. routing (``default`` softmax->top-k, ``renormalize`` top-k->softmax, ``deepseek_v3`` sigmoid with
   correction bias, group selection and routed scaling, ``llama4`` top-1 sigmoid, ``sparsemixer``
   PhiMoE's masked top-2 softmaxes, ``contract.SparseMixer``);
2. the input quantized to NVFP4 with its per-tensor global scale (or kept in bf16, the Hopper mode);
3. GEMM1 against dequantized NVFP4 ``w13`` in fp32, plus the expert's ``w13_bias`` (fp32) if any;
4. the activation: ``silu`` = SwiGLU, ``gelu`` / ``gelu_tanh`` = GeGLU (erf / tanh GELU), with
   ``w13 = [gate; up]`` and ``out = act(gate) * up``; ``swiglu_oai`` = gpt-oss's clamped SwiGLU
   (``contract.SwigluOAI``); ``relu2`` = ReLU squared, not gated;
5. the intermediate quantized to NVFP4 with its global scale (or rounded to bf16);
6. GEMM2 against dequantized ``w2``, plus the expert's ``w2_bias`` (fp32) if any, then times the routing
   weight (gpt-oss adds its down-projection bias per expert before weighting); the sum in fp32; bf16 out.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moe_passes.contract import (ACTIVATIONS, ROUTING_METHODS, TRTLLM_ALIGNMENT, SwigluOAI, is_gated)
from moe_passes.contract import activation_params as _params_of
from moe_passes.contract import routing_params as _routing_params_of
from moe_passes.errors import MoEConfigError, MoENonFiniteError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import dequantize_nvfp4, default_global_scale, quantize_nvfp4

__all__ = ["route", "sparsemixer", "apply_activation", "fused_moe_reference", "qdq_nvfp4"]


def route(router_logits: torch.Tensor, top_k: int, routing: str = "renormalize", *,
          routing_bias: Optional[torch.Tensor] = None, n_group: Optional[int] = None,
          topk_group: Optional[int] = None, routed_scaling_factor: Optional[float] = None,
          routing_params=None):
    """Expert choice per token: ``(topk_weights float32 [T, k], topk_ids int64 [T, k])``.  ``routing_params``:
    the parameters of a parametric routing method (``sparsemixer``: ``[jitter_eps]`` or a ``SparseMixer``)."""
    if router_logits.ndim != 2:
        raise MoEConfigError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    registry.check_routing(routing, top_k, num_experts, n_group, topk_group)
    params = _routing_params_of(routing, routing_params)
    if routing_bias is not None and (not isinstance(routing_bias, torch.Tensor)
                                     or tuple(routing_bias.shape) != (num_experts,)):
        raise MoEConfigError(f"routing_bias must be a tensor of shape ({num_experts},), got "
                             f"{tuple(getattr(routing_bias, 'shape', ())) or type(routing_bias).__name__}")
    logits = router_logits.float()
    if routing == "sparsemixer":  # top_k == 2 (check_routing)
        return sparsemixer(logits, params[0])
    if routing == "default":
        weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    elif routing == "renormalize":
        top, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    elif routing == "llama4":  # top_k == 1 (check_routing)
        top, ids = torch.topk(logits, 1, dim=-1)
        weights = torch.sigmoid(top)
    else:  # deepseek_v3
        scores = torch.sigmoid(logits)
        biased = scores + (routing_bias.float() if routing_bias is not None else 0.0)
        groups = n_group or 1
        keep = topk_group or groups
        if groups > 1:
            per_group = biased.view(-1, groups, num_experts // groups)
            group_score = per_group.topk(min(2, num_experts // groups), dim=-1).values.sum(-1)
            chosen = group_score.topk(keep, dim=-1).indices
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, chosen, True)
            biased = biased.masked_fill(~mask.repeat_interleave(num_experts // groups, dim=1), float("-inf"))
        ids = biased.topk(top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = weights * (routed_scaling_factor if routed_scaling_factor is not None else 1.0)
    return weights, ids


def sparsemixer(logits: torch.Tensor, jitter_eps: float):
    """PhiMoE's inference routing (``contract.SparseMixer``) on float32 ``logits [T, E]``: ``(weights [T, 2],
    ids [T, 2])``.  Ties go to the lowest expert; the masks compare in float32 against ``2 * jitter_eps``."""
    threshold = torch.tensor(2 * jitter_eps, dtype=torch.float32)
    magnitude = logits.abs()
    weights, ids = [], []
    removed = torch.zeros_like(logits, dtype=torch.bool)
    for _ in range(2):
        # the best expert not picked yet (the lowest index among equals), then the mask against its logit,
        # measured on every logit; the softmax runs over the unmasked experts not picked before
        candidates = logits.masked_fill(removed, float("-inf"))
        best, pick = candidates.max(dim=-1, keepdim=True)
        masked = (best - logits) / torch.maximum(magnitude, best) > threshold
        probs = torch.softmax(candidates.masked_fill(masked, float("-inf")), dim=-1)
        weights.append(probs.gather(1, pick))
        ids.append(pick)
        removed = removed.scatter(1, pick, True)
    return torch.cat(weights, dim=1), torch.cat(ids, dim=1)


def apply_activation(h: torch.Tensor, activation: str, params=None) -> torch.Tensor:
    """GEMM1 output ``[.., N1]`` to the intermediate ``[.., I]`` (``[gate; up]`` for gated).  ``params``:
    the parameters of a parametric activation (``swiglu_oai``: a ``SwigluOAI`` or ``[alpha, beta, limit]``;
    None means its defaults)."""
    if activation == "relu2":
        return torch.relu(h).square()
    if activation not in ACTIVATIONS:
        raise MoEConfigError(f"unknown activation {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    values = _params_of(activation, params)
    gate, up = h.chunk(2, dim=-1)
    if activation == "swiglu_oai":
        p = SwigluOAI(*values)
        gate = gate.clamp(max=p.limit)
        return gate * torch.sigmoid(p.alpha * gate) * (up.clamp(-p.limit, p.limit) + p.beta)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up


def qdq_nvfp4(x: torch.Tensor, global_scale) -> torch.Tensor:
    """Round ``x`` through NVFP4 with a per-tensor global scale (fp32 result)."""
    packed, scales, gs = quantize_nvfp4(x, global_scale)
    return dequantize_nvfp4(packed, scales, gs)


def _qdq_activation(x: torch.Tensor, global_scale, what: str) -> torch.Tensor:
    try:
        return qdq_nvfp4(x, global_scale)
    except MoENonFiniteError:
        raise MoENonFiniteError(f"{what} contain NaN or infinite values, which NVFP4 cannot represent") from None


def fused_moe_reference(
    hidden_states: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global_scale: torch.Tensor,
    *,
    top_k: int,
    activation: str = "silu",
    routing: str = "renormalize",
    input_global_scale=None,
    intermediate_global_scale=None,
    routing_bias: Optional[torch.Tensor] = None,
    n_group: Optional[int] = None,
    topk_group: Optional[int] = None,
    routed_scaling_factor: Optional[float] = None,
    quantize_activations: bool = True,
    local_expert_offset: int = 0,
    global_num_experts: Optional[int] = None,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    activation_params=None,
    routing_params=None,
) -> torch.Tensor:
    """The NVFP4 MoE layer on ``hidden_states [T, H]``; returns bf16 ``[T, H]``.

    Expert biases: ``w13_bias [E_local, N1]`` is added to GEMM1's output before the activation and
    ``w2_bias [E_local, Hp]`` (or ``[E_local, H]``) to GEMM2's before the routing weight, both in fp32.
    ``activation_params``: the parameters of a parametric activation (``swiglu_oai``); ``routing_params``
    those of a parametric routing method (``sparsemixer``).

    Expert parallelism: with ``global_num_experts`` the weights hold only experts
    ``[local_expert_offset, local_expert_offset + E_local)``; routing runs on the global ``router_logits``
    and pairs routed to any other expert contribute nothing (their rank computes them).

    Weights are canonical NVFP4 (see ``registry.MoEWeights``) and may be padded along hidden to
    ``Hp >= H``: the activations are then zero-padded the same way and the output sliced back.
    Global scales of ``None`` are computed from this call's data (dynamic quantization); the kernel
    needs static ones.  ``quantize_activations=False`` keeps activations in bf16 (the Hopper path).
    """
    if hidden_states.ndim != 2:
        raise MoEConfigError(f"hidden_states must be [tokens, hidden], got shape {tuple(hidden_states.shape)}")
    tokens, hidden = hidden_states.shape
    local_experts, n1, hidden_padded = w13.shape[0], w13.shape[1], w13.shape[2] * 2
    num_experts = local_experts if global_num_experts is None else global_num_experts
    if not 0 <= local_expert_offset <= num_experts - local_experts:
        raise MoEConfigError(f"local experts [{local_expert_offset}, {local_expert_offset + local_experts}) do not lie "
                             f"within the {num_experts} global experts")
    if hidden > hidden_padded:
        raise MoEConfigError(f"hidden states are {hidden} wide but the weights only {hidden_padded}")
    if router_logits.shape != (tokens, num_experts):
        raise MoEConfigError(f"router_logits shape {tuple(router_logits.shape)} != (tokens={tokens}, experts={num_experts})")
    inter = w2.shape[-1] * 2
    if w2.ndim != 3 or tuple(w2.shape[:2]) != (local_experts, hidden_padded):
        raise MoEConfigError(f"w2 must be [{local_experts}, {hidden_padded}, I/2] packed (w13's experts and hidden), "
                             f"got {tuple(w2.shape)}")
    for name, t, want in (("w13_scale", w13_scale, (local_experts, n1, hidden_padded // 16)),
                          ("w2_scale", w2_scale, (local_experts, hidden_padded, inter // 16)),
                          ("w13_global_scale", w13_global_scale, (local_experts,)),
                          ("w2_global_scale", w2_global_scale, (local_experts,))):
        if tuple(torch.as_tensor(t).shape) != want:
            raise MoEConfigError(f"{name} must be {list(want)} for w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} "
                                 f"(registry.MoEWeights), got {tuple(torch.as_tensor(t).shape)}")
    if n1 != (2 * inter if is_gated(activation) else inter):
        raise MoEConfigError(f"w13 has {n1} rows, inconsistent with intermediate {inter} and activation {activation!r}")
    if w13_bias is not None and (w13_bias.ndim != 2 or tuple(w13_bias.shape) != (local_experts, n1)):
        raise MoEConfigError(f"w13_bias must be [{local_experts}, {n1}], got {tuple(w13_bias.shape)}")
    if w2_bias is not None and (w2_bias.ndim != 2 or w2_bias.shape[0] != local_experts
                                or w2_bias.shape[1] not in (hidden, hidden_padded)):
        raise MoEConfigError(f"w2_bias must be [{local_experts}, {hidden_padded}] (or [{local_experts}, {hidden}]), "
                             f"got {tuple(w2_bias.shape)}")
    if w2_bias is not None:
        w2_bias = F.pad(w2_bias.float(), (0, hidden_padded - w2_bias.shape[1]))
    params = _params_of(activation, activation_params)

    weights, ids = route(router_logits, top_k, routing, routing_bias=routing_bias, n_group=n_group,
                         topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                         routing_params=routing_params)
    x = F.pad(hidden_states.float(), (0, hidden_padded - hidden))
    if quantize_activations:
        if input_global_scale is None:
            input_global_scale = default_global_scale(x.abs().amax() if x.numel() else torch.zeros(()))
        x = _qdq_activation(x, input_global_scale, "the hidden states")
    else:
        x = x.to(torch.bfloat16).float()

    # Local expert index of each pair; pairs of other ranks' experts go to a bucket past the last one.
    flat_ids = ids.reshape(-1) - local_expert_offset
    flat_ids = flat_ids.masked_fill((flat_ids < 0) | (flat_ids >= local_experts), local_experts)
    token_of = torch.arange(tokens, device=x.device).repeat_interleave(top_k)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=local_experts + 1)[:local_experts].tolist()

    # GEMM1 + activation for every (token, expert) pair, grouped by expert.
    inters, groups, start = [], [], 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = order[start:start + count]
        start += count
        w = dequantize_nvfp4(w13[e], w13_scale[e], w13_global_scale[e])
        h = x[token_of[rows]] @ w.t()
        if w13_bias is not None:
            h = h + w13_bias[e].float()
        inters.append(apply_activation(h, activation, params))
        groups.append((e, rows))
    out = torch.zeros(tokens, hidden_padded, dtype=torch.float32, device=x.device)
    if not groups:
        return out[:, :hidden].to(torch.bfloat16)
    if quantize_activations and intermediate_global_scale is None:
        intermediate_global_scale = default_global_scale(torch.stack([t.abs().amax() for t in inters]).amax())

    for (e, rows), h in zip(groups, inters):
        h = (_qdq_activation(h, intermediate_global_scale, f"expert {e}'s intermediate activations")
             if quantize_activations else h.to(torch.bfloat16).float())
        w = dequantize_nvfp4(w2[e], w2_scale[e], w2_global_scale[e])
        y = h @ w.t()
        if w2_bias is not None:
            y = y + w2_bias[e]
        contribution = y * weights.reshape(-1)[rows].unsqueeze(1)
        out.index_add_(0, token_of[rows], contribution)
    return out[:, :hidden].to(torch.bfloat16)


def _run(hidden_states, router_logits, weights: registry.MoEWeights, input_global_scale, intermediate_global_scale,
         routing_bias, args: registry.RunArgs, *, w13_bias=None, w2_bias=None) -> torch.Tensor:
    return fused_moe_reference(
        hidden_states, router_logits, *weights,
        top_k=args.top_k, activation=args.activation, routing=args.routing,
        input_global_scale=input_global_scale, intermediate_global_scale=intermediate_global_scale,
        routing_bias=routing_bias, n_group=args.n_group, topk_group=args.topk_group,
        routed_scaling_factor=args.routed_scaling_factor, quantize_activations=True,
        local_expert_offset=args.local_expert_offset, global_num_experts=args.global_num_experts,
        w13_bias=w13_bias, w2_bias=w2_bias, activation_params=args.activation_params,
        routing_params=args.routing_params,
    )


REFERENCE = registry.register(registry.KernelSpec(
    name="reference",
    description="plain-torch emulation of the TRTLLM NVFP4 MoE kernel (same alignment and numerics); any device",
    alignment=TRTLLM_ALIGNMENT,
    activations=frozenset(ACTIVATIONS),
    routings=frozenset(ROUTING_METHODS),
    available=lambda device: True,
    prepare=lambda weights, shape: weights,
    run=_run,
    quantizes_activations=True,
    priority=0,
    expert_bias=True,
    activation_params=True,
))
