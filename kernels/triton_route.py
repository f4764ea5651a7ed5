"""Routing on the GPU: ``reference.route``'s semantics (softmax / renormalize / deepseek_v3 / llama4 top-k)
as one Triton device function, run by its own launch (one program per token) or by the decode GEMM1
programs themselves (:func:`_pair_expert`, no launch)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from moe_passes.kernels.reference import route
from moe_passes.kernels.triton_common import _next_pow2, tl, triton

if triton is not None:
    from moe_passes.kernels.triton_common import _gdc

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, zero_ptr, n_zero, stride_l, E, scale,
                      K: tl.constexpr, KP: tl.constexpr, METHOD: tl.constexpr, NG: tl.constexpr,
                      EG: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PDL: tl.constexpr = False):
        """One program per token: the routing of ``reference.route`` (:func:`_route_token`) in one launch.
        Program 0 also zeroes ``n_zero`` int32 at ``zero_ptr`` (the grouping's expert counters: one launch
        fewer)."""
        _gdc(PDL)
        t = tl.program_id(0).to(tl.int64)
        if t == 0:
            for z0 in range(0, n_zero, 1024):
                zo = z0 + tl.arange(0, 1024)
                tl.store(zero_ptr + zo, tl.zeros([1024], dtype=tl.int32), mask=zo < n_zero)
        ids, v = _route_token(logits_ptr, bias_ptr, t, stride_l, E, scale, K, KP, METHOD, NG, EG, TOPK_GROUP,
                              HAS_BIAS, "")
        kr = tl.arange(0, KP)
        tl.store(ids_ptr + t * K + kr, ids, mask=kr < K)
        tl.store(w_ptr + t * K + kr, v, mask=kr < K)

    @triton.jit
    def _route_token(logits_ptr, bias_ptr, t, stride_l, E, scale, K: tl.constexpr, KP: tl.constexpr,
                     METHOD: tl.constexpr, NG: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                     HAS_BIAS: tl.constexpr, CACHE: tl.constexpr):
        """Token ``t``'s top-k ``(expert ids int64 [KP], weights fp32 [KP])``, entries past ``K`` unused.
        ``CACHE``: the logits loads' cache modifier.

        METHOD 0 default (softmax, top-k), 1 renormalize (top-k, softmax), 2 deepseek_v3 (sigmoid + bias,
        best ``TOPK_GROUP`` of ``NG`` groups by their top-2 sum, top-k, renormalize, scale), 3 llama4.
        Experts are held as ``[NG, EG]`` (``EG`` a power of two >= E / NG; padding is masked).
        """
        gi = tl.arange(0, NG)
        ji = tl.arange(0, EG)
        EPG = E // NG
        ok = (ji < EPG)[None, :] & (gi < NG)[:, None]
        e_idx = gi[:, None] * EPG + ji[None, :]
        logits = tl.load(logits_ptr + t * stride_l + e_idx, mask=ok, other=float("-inf"),
                         cache_modifier=CACHE).to(tl.float32)
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
        lg = tl.load(logits_ptr + t * stride_l + ids, mask=k_ok, other=0.0, cache_modifier=CACHE).to(tl.float32)
        if METHOD == 0:
            v = tl.exp(lg - mx) / tl.sum(tl.sum(ex, axis=1), axis=0)
        elif METHOD == 1:
            v = tl.where(k_ok, tl.exp(lg - tl.max(tl.where(k_ok, lg, neg), axis=0)), 0.0)
            v = v / tl.sum(v, axis=0)
        elif METHOD == 2:
            v = tl.where(k_ok, tl.sigmoid(lg), 0.0)
            v = v * (scale / tl.maximum(tl.sum(v, axis=0), 1e-20))
        else:
            v = tl.sigmoid(lg)
        return ids, v

    @triton.jit
    def _pair_expert(pair, ids_ptr, tw_ptr, lg_ptr, bias_ptr, stride_l, E, rscale, TOP_K: tl.constexpr,
                     ROUTE: tl.constexpr, KP: tl.constexpr, METHOD: tl.constexpr, NG: tl.constexpr,
                     EG: tl.constexpr, TOPK_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, EARLY: tl.constexpr = False):
        """The expert (int64) of a decode program's (token, expert) pair.  ROUTE: the program routes its
        token itself (no routing launch before it) and the programs of the pair's first tile and split
        write the pair's id and weight for the kernels after it; else the id the routing launch wrote.

        EARLY: called before the program's PDL wait (a GEMM2 that loads weights early, see
        ``triton_moe._qgemv2_kernel``): nothing is stored and every load bypasses L1 (``.cg``), so that no
        line an earlier kernel left in this SM's L1 can be read."""
        if ROUTE:
            ids, v = _route_token(lg_ptr, bias_ptr, (pair // TOP_K).to(tl.int64), stride_l, E, rscale, TOP_K, KP,
                                  METHOD, NG, EG, TOPK_GROUP, HAS_BIAS, ".cg" if EARLY else "")
            pick = tl.arange(0, KP) == pair % TOP_K
            e = tl.sum(tl.where(pick, ids, 0), axis=0)
            if not EARLY:
                if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
                    tl.store(ids_ptr + pair, e)
                    tl.store(tw_ptr + pair, tl.sum(tl.where(pick, v, 0.0), axis=0))
            return e
        elif EARLY:
            return tl.load(ids_ptr + pair, cache_modifier=".cg").to(tl.int64)
        else:
            return tl.load(ids_ptr + pair).to(tl.int64)


_METHOD_CODES = {"default": 0, "renormalize": 1, "deepseek_v3": 2, "llama4": 3}


class _RouteSpec(NamedTuple):
    """What a Triton kernel needs to route: ``logits`` (unit stride over experts), ``bias`` (the logits when
    there is none), the deepseek_v3 scaling factor and the kernel's routing constants."""
    logits: torch.Tensor
    bias: torch.Tensor
    scale: float
    consts: dict


def _route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group,
                routed_scaling_factor) -> Optional[_RouteSpec]:
    """The routing as :func:`_route_token` takes it, or None for what it does not take (the reference then
    routes, and raises the errors)."""
    experts = router_logits.shape[1]
    groups = (n_group or 1) if routing == "deepseek_v3" else 1
    keep = topk_group or groups
    if (routing not in _METHOD_CODES or not 0 < top_k <= experts or experts % groups or not 0 < keep <= groups
            or (routing == "llama4" and top_k != 1) or groups & (groups - 1) or top_k > 64 or experts > 65535):
        return None
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    has_bias = routing == "deepseek_v3" and routing_bias is not None
    scale = routed_scaling_factor if (routing == "deepseek_v3" and routed_scaling_factor is not None) else 1.0
    consts = dict(KP=_next_pow2(top_k), METHOD=_METHOD_CODES[routing], NG=groups,
                  EG=_next_pow2(experts // groups), TOPK_GROUP=keep, HAS_BIAS=has_bias)
    return _RouteSpec(router_logits, routing_bias if has_bias else router_logits, float(scale), consts)


def _route_args(spec: Optional[_RouteSpec], ids: torch.Tensor, weights: torch.Tensor) -> dict:
    """Keyword arguments of a decode GEMM1 kernel that routes its pairs itself (``spec``), or that reads the
    routing launch's ids (``spec`` None: the routing arguments are unused)."""
    if spec is None:
        return dict(lg_ptr=ids, bias_ptr=ids, tw_ptr=weights, stride_l=0, E=1, rscale=1.0)
    return dict(lg_ptr=spec.logits, bias_ptr=spec.bias, tw_ptr=weights, stride_l=spec.logits.stride(0),
                E=spec.logits.shape[1], rscale=spec.scale, ROUTE=True, **spec.consts)


def _route(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor,
           zero: Optional[torch.Tensor] = None, pdl: bool = False):
    """``(weights float32 [T, k], ids int64 [T, k])``: one Triton launch, same semantics as ``reference.route``.

    ``zero`` (int32, optional) is zeroed on the way (the grouping's counters).
    """
    tokens, experts = router_logits.shape
    spec = _route_spec(router_logits, top_k, routing, routing_bias, n_group, topk_group, routed_scaling_factor)
    if spec is None:
        w, ids = route(router_logits, top_k, routing, routing_bias=routing_bias, n_group=n_group,
                       topk_group=topk_group, routed_scaling_factor=routed_scaling_factor)
        if zero is not None:
            zero.zero_()
        return w.float().contiguous(), ids.contiguous()
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if tokens:
        _route_kernel[(tokens,)](spec.logits, spec.bias, weights, ids, ids if zero is None else zero,
                                 0 if zero is None else zero.numel(), spec.logits.stride(0), experts, spec.scale,
                                 K=top_k, PDL=pdl, num_warps=1 if experts <= 256 else 4, launch_pdl=pdl,
                                 **spec.consts)
    elif zero is not None:
        zero.zero_()
    return weights, ids
