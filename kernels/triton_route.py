"""Routing on the GPU: ``reference.route``'s semantics (softmax / renormalize / deepseek_v3 / llama4 /
sparsemixer top-k)
in one Triton launch, one program per token (:func:`route`); what it does not take
(:data:`FUSED_ROUTING`) the torch routing does."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moe_passes.contract import routing_params as routing_params_of
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import reference, registry
from moe_passes.kernels.triton_common import next_pow2, tl, triton
from moe_passes.kernels.triton_launch import launch

__all__ = ["METHOD_CODES", "FUSED_ROUTING", "RouteSpec", "route_spec", "route"]

if triton is not None:
    from moe_passes.kernels.triton_common import gdc

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, zero_ptr, n_zero, stride_l, E, param,
                      K: tl.constexpr, KP: tl.constexpr, METHOD: tl.constexpr, NG: tl.constexpr,
                      EG: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PDL: tl.constexpr = False):
        """One program per token: the routing of ``reference.route`` (:func:`_route_token`) in one launch.
        Program 0 also zeroes ``n_zero`` int32 at ``zero_ptr`` (the grouping's expert counters: one launch
        fewer)."""
        gdc(PDL)
        t = tl.program_id(0).to(tl.int64)
        if t == 0:
            for z0 in range(0, n_zero, 1024):
                zo = z0 + tl.arange(0, 1024)
                tl.store(zero_ptr + zo, tl.zeros([1024], dtype=tl.int32), mask=zo < n_zero)
        ids, v = _route_token(logits_ptr, bias_ptr, t, stride_l, E, param, K, KP, METHOD, NG, EG, TOPK_GROUP,
                              HAS_BIAS)
        kr = tl.arange(0, KP)
        tl.store(ids_ptr + t * K + kr, ids, mask=kr < K)
        tl.store(w_ptr + t * K + kr, v, mask=kr < K)

    @triton.jit
    def _route_token(logits_ptr, bias_ptr, t, stride_l, E, param, K: tl.constexpr, KP: tl.constexpr,
                     METHOD: tl.constexpr, NG: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
        """Token ``t``'s top-k ``(expert ids int64 [KP], weights fp32 [KP])``, entries past ``K`` unused.

        METHOD 0 default (softmax, top-k), 1 renormalize (top-k, softmax), 2 deepseek_v3 (sigmoid + bias,
        best ``TOPK_GROUP`` of ``NG`` groups by their top-2 sum, top-k, renormalize, scaled by ``param``),
        3 llama4, 4 sparsemixer (top-2 by logit, each weight a softmax over the experts its mask keeps;
        ``param`` is the mask threshold ``2 * jitter_eps``).
        Experts are held as ``[NG, EG]`` (``EG`` a power of two >= E / NG; padding is masked).
        """
        gi = tl.arange(0, NG)
        ji = tl.arange(0, EG)
        EPG = E // NG
        ok = (ji < EPG)[None, :] & (gi < NG)[:, None]
        e_idx = gi[:, None] * EPG + ji[None, :]
        logits = tl.load(logits_ptr + t * stride_l + e_idx, mask=ok, other=float("-inf")).to(tl.float32)
        neg = float("-inf")
        if METHOD == 0:
            mx = tl.max(tl.max(logits, axis=1), axis=0)
            ex = tl.where(ok, tl.exp(logits - mx), 0.0)
            prob = ex / tl.sum(tl.sum(ex, axis=1), axis=0)
            sel = tl.where(ok, prob, neg)
        elif METHOD == 2:
            sig = tl.sigmoid(logits)
            sel = sig
            if HAS_BIAS:
                sel = sig + tl.load(bias_ptr + e_idx, mask=ok, other=0.0).to(tl.float32)
            sel = tl.where(ok, sel, neg)
            if NG > 1:
                # group score: sum of the two best (or the one) biased scores of each group
                m1 = tl.max(sel, axis=1)
                first = tl.min(tl.where(sel == m1[:, None], ji[None, :], EG), axis=1)
                if EPG > 1:
                    m2 = tl.max(tl.where(ji[None, :] == first[:, None], neg, sel), axis=1)
                    gscore = m1 + m2
                else:
                    gscore = m1
                keep = tl.zeros([NG], dtype=tl.int1)
                for _ in tl.static_range(TOPK_GROUP):
                    gm = tl.max(tl.where(keep, neg, gscore), axis=0)
                    gsel = tl.min(tl.where((gscore == gm) & (keep == 0), gi, NG), axis=0)
                    keep = keep | (gi == gsel)
                sel = tl.where(keep[:, None], sel, neg)
        else:
            sel = tl.where(ok, logits, neg)
        # Top-k with one reduction per pick: each score becomes an int64 key, its fp32 bits mapped to an
        # order-preserving integer above the expert's inverted index, so the max is the best score and,
        # among equal scores, the lowest expert (the reference's tie rule).  Weights are gathered after.
        bits = sel.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        order = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits | 0x80000000)
        key = tl.where(ok, (order << 16) | (65535 - e_idx), -1)
        kr = tl.arange(0, KP)
        ids = tl.zeros([KP], dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.max(tl.max(key, axis=1), axis=0)
            ids = tl.where(kr == j, 65535 - (best & 0xFFFF), ids)
            key = tl.where(key == best, -1, key)
        k_ok = kr < K
        lg = tl.load(logits_ptr + t * stride_l + ids, mask=k_ok, other=0.0).to(tl.float32)
        if METHOD == 0:
            v = tl.exp(lg - mx) / tl.sum(tl.sum(ex, axis=1), axis=0)
        elif METHOD == 1:
            v = tl.where(k_ok, tl.exp(lg - tl.max(tl.where(k_ok, lg, neg), axis=0)), 0.0)
            v = v / tl.sum(v, axis=0)
        elif METHOD == 2:
            v = tl.where(k_ok, tl.sigmoid(lg), 0.0)
            v = v * (param / tl.maximum(tl.sum(v, axis=0), 1e-20))
        elif METHOD == 4:
            # pick j's mask drops the experts whose (m_j - s) / max(|s|, m_j) exceeds param (round-to-nearest
            # division, as torch's: the threshold is sharp; only subnormal quotients, far below any threshold,
            # flush to 0); its softmax runs over the rest, without the picks before j, and takes m_j's term
            # exp(0) = 1.  K == 2.
            mag = tl.abs(logits)
            first = tl.sum(tl.where(kr == 0, ids, 0), axis=0)
            v = tl.zeros([KP], dtype=tl.float32)
            for j in tl.static_range(K):
                mj = tl.sum(tl.where(kr == j, lg, 0.0), axis=0)
                ratio = tl.math.div_rn(mj - logits, tl.maximum(mag, mj))
                live = ok & ((ratio > param) == 0)
                if j > 0:
                    live = live & (e_idx != first)
                den = tl.sum(tl.sum(tl.where(live, tl.exp(logits - mj), 0.0), axis=1), axis=0)
                v = tl.where(kr == j, 1.0 / den, v)
        else:
            v = tl.sigmoid(lg)
        return ids, v


# The routing codes of ``_route_token``'s METHOD and of the CUDA decode's METHOD define.
METHOD_CODES = {"default": 0, "renormalize": 1, "deepseek_v3": 2, "llama4": 3, "sparsemixer": 4}
# What ``_route_token`` takes: its top-k keys hold a 16-bit expert index, its registers at most 64 picks.
FUSED_ROUTING = registry.RoutingLimits(max_experts=65535, max_top_k=64)


class RouteSpec(NamedTuple):
    """What a Triton kernel needs to route: ``logits`` (unit stride over experts), ``bias`` (the logits when
    there is none), the method's scalar (deepseek_v3's scaling factor, sparsemixer's mask threshold
    ``2 * jitter_eps``) and the kernel's routing constants."""
    logits: torch.Tensor
    bias: torch.Tensor
    param: float
    consts: dict


def route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group,
               routed_scaling_factor, routing_params=None) -> Optional[RouteSpec]:
    """The routing as :func:`_route_token` takes it, or None for what it does not take (the reference then
    routes, and raises the errors)."""
    experts = router_logits.shape[1]
    if FUSED_ROUTING.refusal(routing, top_k, experts, n_group, topk_group) is not None:
        return None
    try:
        params = routing_params_of(routing, routing_params)
    except MoEConfigError:
        return None
    groups = (n_group or 1) if routing == "deepseek_v3" else 1
    keep = topk_group or groups
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    has_bias = routing == "deepseek_v3" and routing_bias is not None
    if has_bias and routing_bias.stride(0) != 1:  # the kernel reads bias_ptr + expert
        routing_bias = routing_bias.contiguous()
    param = routed_scaling_factor if (routing == "deepseek_v3" and routed_scaling_factor is not None) else 1.0
    if routing == "sparsemixer":  # the mask threshold, rounded to fp32 as torch compares with it
        param = 2 * params[0]
    consts = dict(KP=next_pow2(top_k), METHOD=METHOD_CODES[routing], NG=groups,
                  EG=next_pow2(experts // groups), TOPK_GROUP=keep, HAS_BIAS=has_bias)
    return RouteSpec(router_logits, routing_bias if has_bias else router_logits, float(param), consts)


def route(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor,
          zero: Optional[torch.Tensor] = None, pdl: bool = False, routing_params=None):
    """``(weights float32 [T, k], ids int64 [T, k])``: one Triton launch, same semantics as ``reference.route``.

    ``zero`` (int32, optional) is zeroed on the way (the grouping's counters).  ``routing_params``: a
    parametric method's parameters (sparsemixer's ``[jitter_eps]``).
    """
    tokens, experts = router_logits.shape
    spec = route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor,
                      routing_params)
    if spec is None:
        w, ids = reference.route(router_logits, top_k, routing, routing_bias=routing_bias, n_group=n_group,
                                 topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                                 routing_params=routing_params)
        if zero is not None:
            zero.zero_()
        return w.float().contiguous(), ids.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        launch(_route_kernel, (tokens,), spec.logits, spec.bias, weights, ids, ids if zero is None else zero,
               0 if zero is None else zero.numel(), spec.logits.stride(0), experts, spec.param,
               K=top_k, PDL=pdl, num_warps=1 if experts <= 256 else 4, launch_pdl=pdl, **spec.consts)
    elif zero is not None:
        zero.zero_()
    return weights, ids
