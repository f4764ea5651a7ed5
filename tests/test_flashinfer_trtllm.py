"""The Blackwell path (kernels/flashinfer_trtllm.py), verified on the CPU.

* prepared bytes against FlashInfer's own CPU index helpers plus the 128x4 offset formula written here;
* a recording double of ``trtllm_fp4_block_scale_moe`` (with the installed function's signature) that
  checks every documented argument constraint and, in "emulate" mode, computes the MoE from what it is
  handed: it undoes the layout with FlashInfer's helpers and applies the output scale vectors the way
  FACTS.md describes the kernel, so a wrong layout, scalar or routing mapping shows up as a wrong result
  against ``fused_moe_reference``; in "echo" mode it returns each token's dequantized input, which makes
  chunk stitching checkable;
* enum mapping by name, the gelu_tanh error, signature detection across FlashInfer layouts;
* the real kernel against the reference, only on an SM100/SM103 GPU.
"""

from __future__ import annotations

import dataclasses

import inspect
import warnings

import pytest
import torch

fi_core = pytest.importorskip("flashinfer.fused_moe.core")
fi_enums = pytest.importorskip("flashinfer.tllm_enums")

from moe_passes.contract import (  # noqa: E402
    TRTLLM_ALIGNMENT, Alignment, MoEShape, PerformanceWarning, align_hidden_dim, align_intermediate_dim, is_gated,
    trtllm_chunk_size,
)
from moe_passes.errors import KernelUnavailableError, MoEConfigError  # noqa: E402
from moe_passes.kernels import flashinfer_trtllm as ft  # noqa: E402
from moe_passes.kernels import registry  # noqa: E402
from moe_passes.kernels.options import KernelOptions, use  # noqa: E402
from moe_passes.kernels.nvfp4 import (  # noqa: E402
    default_global_scale, dequantize_nvfp4, quantize_nvfp4, quantize_nvfp4_experts, unpack_e2m1,
)
from moe_passes.kernels.reference import apply_activation, fused_moe_reference, route  # noqa: E402

RoutingMethodType = fi_enums.RoutingMethodType
ActivationType = fi_enums.ActivationType


# ------------------------------------------------------------------------------------------------
# Independent helpers


def offsets_128x4(rows: int, cols: int) -> torch.Tensor:
    """Flat offset of linear scale (m, k) in the 128x4 layout (FACTS.md formula)."""
    kt = (cols + 3) // 4
    m = torch.arange(rows).unsqueeze(1)
    k = torch.arange(cols).unsqueeze(0)
    return (m // 128) * (kt * 512) + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


def interleave_128x4(s: torch.Tensor) -> torch.Tensor:
    rows, cols = s.shape
    rp, cp = (rows + 127) // 128 * 128, (cols + 3) // 4 * 4
    out = torch.zeros(rp * cp, dtype=torch.uint8)
    out[offsets_128x4(rows, cols).reshape(-1)] = s.reshape(-1)
    return out.reshape(rp, cp)


def deinterleave_128x4(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return s.reshape(-1)[offsets_128x4(rows, cols).reshape(-1)].reshape(rows, cols)


def fi_w13_perm(rows: int, cols: int, gated: bool, sf: bool) -> torch.Tensor:
    dummy = torch.zeros(rows, cols, dtype=torch.uint8)
    return fi_core._maybe_get_cached_w3_w1_permute_indices(
        {}, dummy, 128, num_elts_per_sf=16 if sf else None, is_gated_act_gemm=gated)


def fi_w2_perm(rows: int, cols: int, sf: bool) -> torch.Tensor:
    dummy = torch.zeros(rows, cols, dtype=torch.uint8)
    return fi_core.get_w2_permute_indices_with_cache({}, dummy, 128, num_elts_per_sf=16 if sf else None)


def up_gate(t: torch.Tensor, gated: bool) -> torch.Tensor:
    """Canonical [gate; up] rows (dim 0) to the kernel's [up; gate]."""
    if not gated:
        return t
    gate, up = t.chunk(2, dim=0)
    return torch.cat([up, gate], dim=0)


def random_canonical(experts: int, hidden: int, inter: int, gated: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    n1 = 2 * inter if gated else inter

    def rand(*shape):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)

    w13, s13 = rand(experts, n1, hidden // 2), rand(experts, n1, hidden // 16).view(torch.float8_e4m3fn)
    w2, s2 = rand(experts, hidden, inter // 2), rand(experts, hidden, inter // 16).view(torch.float8_e4m3fn)
    gs = torch.rand(experts, generator=g) + 0.5
    return w13, s13, gs, w2, s2, gs * 2


def pad_for_trtllm(w13, s13, w2, s2, activation):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        w13, s13, w2, s2, _ = align_hidden_dim(w13, s13, w2, s2, alignment=TRTLLM_ALIGNMENT.hidden)
    return align_intermediate_dim(w13, s13, w2, s2, gated=is_gated(activation),
                                  alignment=TRTLLM_ALIGNMENT.intermediate(activation))


# ------------------------------------------------------------------------------------------------
# Prepared bytes == FlashInfer's helpers + the 128x4 formula

LAYOUT_CASES = [
    # (hidden, intermediate, activation): hidden 2688 pads to 2816
    (2688, 192, "silu"),
    (2688, 256, "relu2"),
    (2048, 192, "gelu"),
    (2048, 256, "relu2"),
]


@pytest.mark.parametrize("hidden,inter,activation", LAYOUT_CASES)
def test_prepared_bytes_match_flashinfer_helpers(hidden, inter, activation):
    gated = is_gated(activation)
    experts = 2
    w13, s13, g13, w2, s2, g2 = random_canonical(experts, hidden, inter, gated, seed=hidden + inter)
    w13, s13, w2, s2 = pad_for_trtllm(w13, s13, w2, s2, activation)
    shape = MoEShape(hidden=hidden, intermediate=inter, experts=experts, top_k=2, activation=activation)
    hp, ip = shape.hidden_padded, shape.intermediate_padded
    assert (hp, ip) == (w2.shape[1], w2.shape[2] * 2)
    prepared = ft.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), shape)

    # Same logical shapes and dtypes; global scales untouched.
    for before, after in zip((w13, s13, g13, w2, s2, g2), prepared):
        assert after.shape == before.shape and after.dtype == before.dtype
    assert prepared.w13_global_scale is g13 and prepared.w2_global_scale is g2

    n1 = w13.shape[1]
    cache: dict = {}
    for e in range(experts):
        w = up_gate(w13[e], gated)
        s = up_gate(s13[e].view(torch.uint8), gated)
        idx = fi_core._maybe_get_cached_w3_w1_permute_indices(cache, w, 128, is_gated_act_gemm=gated)
        sidx = fi_core._maybe_get_cached_w3_w1_permute_indices(cache, s, 128, num_elts_per_sf=16,
                                                               is_gated_act_gemm=gated)
        assert torch.equal(prepared.w13[e], w[idx])
        assert torch.equal(prepared.w13_scale[e].view(torch.uint8), interleave_128x4(s[sidx]))
        assert prepared.w13_scale[e].shape == (n1, hp // 16)

        w2e, s2e = w2[e], s2[e].view(torch.uint8)
        idx2 = fi_core.get_w2_permute_indices_with_cache(cache, w2e, 128)
        sidx2 = fi_core.get_w2_permute_indices_with_cache(cache, s2e, 128, num_elts_per_sf=16)
        assert torch.equal(prepared.w2[e], w2e[idx2])
        assert torch.equal(prepared.w2_scale[e].view(torch.uint8), interleave_128x4(s2e[sidx2]))


def test_gated_reorder_index_helpers_agree():
    for rows in (128, 384, 2 * 1856):
        x = torch.zeros(rows, 2, dtype=torch.uint8)
        assert torch.equal(ft.gated_interleave_row_indices(rows), fi_core.get_reorder_rows_for_gated_act_gemm_row_indices(x))
    for rows in (128, 2816):
        x = torch.zeros(rows, 2, dtype=torch.uint8)
        assert torch.equal(ft.shuffle_row_indices(rows), fi_core.get_shuffle_matrix_a_row_indices(x, 128))
        assert torch.equal(ft.shuffle_row_indices(rows), fi_core.get_shuffle_matrix_sf_a_row_indices(x, 128, 16))


def test_prepare_rejects_misaligned_and_wrong_shapes():
    w13, s13, g13, w2, s2, g2 = random_canonical(2, 256, 64, gated=False, seed=0)  # I=64 plain: 64 rows
    shape = MoEShape(hidden=256, intermediate=64, experts=2, top_k=1, activation="relu2",
                     alignment=Alignment(256, 64, 64))
    with pytest.raises(MoEConfigError, match="multiple of 128"):
        ft.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), shape)
    good = MoEShape(hidden=256, intermediate=128, experts=2, top_k=1, activation="relu2")
    with pytest.raises(MoEConfigError, match="w13"):
        ft.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), good)
    gt = MoEShape(hidden=256, intermediate=128, experts=2, top_k=1, activation="gelu_tanh")
    with pytest.raises(MoEConfigError, match="erf"):
        ft.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), gt)


# ------------------------------------------------------------------------------------------------
# The recording double


class RecordingKernel:
    """Stands in for ``trtllm_fp4_block_scale_moe`` / ``..._routed_moe``.

    Checks every documented constraint (FACTS.md and FlashInfer's docstrings / launcher checks) of
    each argument, records the call, and computes an output: ``emulate`` (the MoE from the arguments,
    undoing the prepared layout with FlashInfer's index helpers) or ``echo`` (each token's input).
    """

    def __init__(self, mode: str = "emulate", *, routed: bool = False, max_tokens: int | None = None,
                 signature: inspect.Signature | None = None):
        self.mode, self.routed, self.max_tokens = mode, routed, max_tokens
        real = fi_core.trtllm_fp4_block_scale_routed_moe if routed else fi_core.trtllm_fp4_block_scale_moe
        self.__signature__ = signature or inspect.signature(real)
        self.__name__ = real.__name__
        self.calls: list[dict] = []

    def __call__(self, **kw):
        params = self.__signature__.parameters
        unknown = set(kw) - set(params)
        assert not unknown, f"keywords the signature lacks: {unknown}"
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kw]
        assert not missing, f"required arguments missing: {missing}"
        kw = {p: (kw[p] if p in kw else v.default) for p, v in params.items()}
        self.check(kw)
        self.calls.append(kw)
        out = self.compute(kw)
        if kw.get("output") is not None:
            kw["output"].copy_(out[:, :kw["output"].shape[1]])
            return [kw["output"]]
        return [out]

    # -- constraints --------------------------------------------------------------------------------
    def check(self, kw):
        hs, sf = kw["hidden_states"], kw["hidden_states_scale"]
        w1, s1, w2, s2 = kw["gemm1_weights"], kw["gemm1_weights_scale"], kw["gemm2_weights"], kw["gemm2_weights_scale"]
        e, tokens, k = kw["num_experts"], hs.shape[0], kw["top_k"]
        hidden = hs.shape[1] * 2
        inter = kw["intermediate_size"]
        assert hs.dtype == torch.uint8 and hs.ndim == 2 and hs.is_contiguous()
        assert sf.dtype == torch.float8_e4m3fn and tuple(sf.shape) == (tokens, hidden // 16) and sf.is_contiguous()
        if "hidden_states_scale_layout" in kw:
            assert kw["hidden_states_scale_layout"] == fi_enums.SfLayout.layout_linear
        act_name = self.activation_name(kw)
        gated = act_name in ("Swiglu", "Geglu", "SwiGlu", "GeGlu")
        n1 = 2 * inter if gated else inter
        assert w1.dtype == torch.uint8 and tuple(w1.shape) == (e, n1, hidden // 2) and w1.is_contiguous()
        assert s1.dtype == torch.float8_e4m3fn and tuple(s1.shape) == (e, n1, hidden // 16) and s1.is_contiguous()
        assert w2.dtype == torch.uint8 and tuple(w2.shape) == (e, hidden, inter // 2) and w2.is_contiguous()
        assert s2.dtype == torch.float8_e4m3fn and tuple(s2.shape) == (e, hidden, inter // 16) and s2.is_contiguous()
        assert hidden % 256 == 0 and n1 % 128 == 0 and inter % (64 if gated else 128) == 0
        # FlashInfer's docstring: gemm1_bias [E, M] fp32, gemm2_bias [E, H] fp32, alpha / beta / limit [E] fp32.
        for name, want in (("gemm1_bias", (e, n1)), ("gemm2_bias", (e, hidden)), ("gemm1_alpha", (e,)),
                           ("gemm1_beta", (e,)), ("gemm1_clamp_limit", (e,))):
            v = kw.get(name)
            if v is not None:
                assert v.dtype == torch.float32 and tuple(v.shape) == want and v.is_contiguous(), name
                assert bool(torch.isfinite(v).all()), name
        oai = [kw.get(n) is not None for n in ("gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit")]
        assert not any(oai) or (all(oai) and act_name in ("Swiglu", "SwiGlu")), oai
        for name in ("output1_scale_scalar", "output1_scale_gate_scalar", "output2_scale_scalar"):
            v = kw[name]
            assert v.dtype == torch.float32 and tuple(v.shape) == (kw["local_num_experts"],) and v.is_contiguous(), name
            assert bool(torch.isfinite(v).all()) and bool((v > 0).all()), name
        assert kw["local_expert_offset"] == 0 and kw["local_num_experts"] == e
        assert 0 < k <= e and kw["do_finalize"] is True
        routing = RoutingMethodType(kw["routing_method_type"]).name
        assert routing in ("Default", "Renormalize", "DeepSeekV3", "Llama4")
        if routing == "Llama4":
            assert k == 1
        if routing == "DeepSeekV3":
            assert isinstance(kw["n_group"], int) and isinstance(kw["topk_group"], int)
            assert isinstance(kw["routed_scaling_factor"], float)
        bias = kw["routing_bias"]
        if bias is not None:
            assert routing == "DeepSeekV3" and bias.dtype == torch.float32 and tuple(bias.shape) == (e,)
        if self.routed:
            ids = kw["topk_ids"]
            assert ids.dtype == torch.int32 and tuple(ids.shape) == (tokens, k) and ids.is_contiguous()
        else:
            logits = kw["routing_logits"]
            assert tuple(logits.shape) == (tokens, e) and logits.is_contiguous()
            assert logits.dtype == (torch.float32 if routing == "DeepSeekV3" else torch.bfloat16)
        out = kw.get("output")
        if out is not None:
            assert out.dtype == torch.bfloat16 and out.ndim == 2 and out.shape[0] == tokens
            assert 0 < out.shape[1] <= hidden and out.is_contiguous()
        # Launch limits: the grid.Y formula and the 300k cap, or the test's lowered chunk size.
        assert tokens <= trtllm_chunk_size(e, k)
        assert min(e, tokens * k) + max(0, tokens * k - e) // 128 <= 65535
        if self.max_tokens is not None:
            assert tokens <= self.max_tokens

    @staticmethod
    def activation_name(kw) -> str:
        if "activation_type" in kw:
            name = ActivationType(kw["activation_type"]).name
            assert name in ("Swiglu", "Geglu", "Relu2"), name
            return name
        if "gated_act_type" in kw:
            return fi_enums.GatedActType(kw["gated_act_type"]).name
        return "Swiglu"

    # -- semantics ------------------------------------------------------------------------------------
    def compute(self, kw):
        hs, sf = kw["hidden_states"], kw["hidden_states_scale"]
        tokens, hidden = hs.shape[0], hs.shape[1] * 2
        # Activations in the kernel's scaled units (x * gs_a): e2m1 * block scale, no global scale.
        x = dequantize_nvfp4(hs, sf, 1.0)
        if self.mode == "echo":
            return x.to(torch.bfloat16)
        e, k, inter = kw["num_experts"], kw["top_k"], kw["intermediate_size"]
        act = self.activation_name(kw)
        gated = act in ("Swiglu", "Geglu", "SwiGlu", "GeGlu")
        n1 = 2 * inter if gated else inter
        if self.routed:
            packed = kw["topk_ids"]
            ids = (packed >> 16).long()
            weights = (packed & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
        else:
            routing = {"Default": "default", "Renormalize": "renormalize", "DeepSeekV3": "deepseek_v3",
                       "Llama4": "llama4"}[RoutingMethodType(kw["routing_method_type"]).name]
            weights, ids = route(kw["routing_logits"].float(), k, routing, routing_bias=kw["routing_bias"],
                                 n_group=kw["n_group"], topk_group=kw["topk_group"],
                                 routed_scaling_factor=kw["routed_scaling_factor"])
        p1, ps1 = fi_w13_perm(n1, 2, gated, False), fi_w13_perm(n1, 2, gated, True)
        p2, ps2 = fi_w2_perm(hidden, 2, False), fi_w2_perm(hidden, 2, True)
        out = torch.zeros(tokens, hidden)
        for ex in range(e):
            rows = (ids == ex).nonzero()
            if rows.numel() == 0:
                continue
            tok, slot = rows[:, 0], rows[:, 1]
            w1 = torch.empty_like(kw["gemm1_weights"][ex])
            w1[p1] = kw["gemm1_weights"][ex]
            s1 = torch.empty(n1, hidden // 16, dtype=torch.uint8)
            s1[ps1] = deinterleave_128x4(kw["gemm1_weights_scale"][ex].view(torch.uint8), n1, hidden // 16)
            acc = x[tok] @ dequantize_nvfp4(w1, s1.view(torch.float8_e4m3fn), 1.0).t()
            if kw.get("gemm1_bias") is not None:  # on the raw accumulator, rows undone like the weight's
                b1 = torch.empty(n1)
                b1[fi_w13_perm(n1, 1, gated, False)] = kw["gemm1_bias"][ex]
                acc = acc + b1
            g = kw["output1_scale_gate_scalar"][ex]
            s_out1 = kw["output1_scale_scalar"][ex]
            if gated and kw.get("gemm1_alpha") is not None:  # SwiGLU with alpha, beta, clamp (raw units)
                up, gate = acc[:, :inter], acc[:, inter:]
                limit, beta, alpha = kw["gemm1_clamp_limit"][ex], kw["gemm1_beta"][ex], kw["gemm1_alpha"][ex]
                gate = gate.clamp(max=limit) * g
                h = gate * torch.sigmoid(alpha * gate) * ((up.clamp(-limit, limit) + beta) * s_out1)
            elif gated:  # kernel order [up; gate]: act(gate) * up
                up, gate = acc[:, :inter], acc[:, inter:]
                fn = torch.nn.functional.silu if act in ("Swiglu", "SwiGlu") else torch.nn.functional.gelu
                h = fn(gate * g) * (up * s_out1)
            else:
                h = torch.relu(acc * g).square() * s_out1
            packed_h, sf_h, _ = quantize_nvfp4(h, 1.0)
            h = dequantize_nvfp4(packed_h, sf_h, 1.0)
            w2 = torch.empty_like(kw["gemm2_weights"][ex])
            w2[p2] = kw["gemm2_weights"][ex]
            s2 = torch.empty(hidden, inter // 16, dtype=torch.uint8)
            s2[ps2] = deinterleave_128x4(kw["gemm2_weights_scale"][ex].view(torch.uint8), hidden, inter // 16)
            y = h @ dequantize_nvfp4(w2, s2.view(torch.float8_e4m3fn), 1.0).t()
            if kw.get("gemm2_bias") is not None:
                b2 = torch.empty(hidden)
                b2[fi_w2_perm(hidden, 1, False)] = kw["gemm2_bias"][ex]
                y = y + b2
            y = y * kw["output2_scale_scalar"][ex]
            out.index_add_(0, tok, y * weights[tok, slot].float().unsqueeze(1))
        return out.to(torch.bfloat16)


def make_api(mode="emulate", **kwargs) -> tuple[ft.FlashInferAPI, RecordingKernel, RecordingKernel]:
    fused = RecordingKernel(mode, **kwargs)
    routed = RecordingKernel(mode, routed=True, **kwargs)
    api = ft.FlashInferAPI(fused_moe=fused, routed_moe=routed, quantize=ft.torch_quantize_input,
                           enums=ft.FlashInferEnums(fi_enums))
    return api, fused, routed


class Layer:
    """Real NVFP4 weights (randn / 10), padded and prepared, with static activation scales."""

    def __init__(self, hidden, inter, experts, top_k, activation, tokens, seed=0, biases=False):
        g = torch.Generator().manual_seed(seed)
        gated = is_gated(activation)
        n1 = 2 * inter if gated else inter
        w13f = torch.randn(experts, n1, hidden, generator=g) / 10
        w2f = torch.randn(experts, hidden, inter, generator=g) / 10
        self.x = (torch.randn(tokens, hidden, generator=g) / 2).to(torch.bfloat16)
        self.logits = torch.randn(tokens, experts, generator=g).to(torch.bfloat16)
        self.bias = torch.randn(experts, generator=g) / 10
        q13, s13, g13 = quantize_nvfp4_experts(w13f)
        q2, s2, g2 = quantize_nvfp4_experts(w2f)
        self.activation, self.top_k, self.hidden = activation, top_k, hidden
        self.gs_a = default_global_scale(self.x.float().abs().amax())
        b13 = torch.randn(experts, n1, generator=g) if biases else torch.zeros(experts, n1)
        inter_amax = max(apply_activation(self.x.float() @ w13f[e].t() + b13[e], activation).abs().amax()
                         for e in range(experts))
        self.gs_c = default_global_scale(inter_amax)
        w13, s13p, w2, s2p = pad_for_trtllm(q13, s13, q2, s2, activation)
        self.canonical = registry.MoEWeights(w13, s13p, g13, w2, s2p, g2)
        self.shape = MoEShape(hidden=hidden, intermediate=inter, experts=experts, top_k=top_k, activation=activation)
        # Biases padded as the weights are: w2_bias along H, each half of w13_bias along I.
        self.w13_bias = self.w2_bias = None
        if biases:
            from moe_passes.contract import align_biases
            self.w13_bias, self.w2_bias = align_biases(
                b13, torch.randn(experts, hidden, generator=g), gated=gated,
                intermediate_padded=self.shape.intermediate_padded, hidden_padded=self.shape.hidden_padded)
        self.prepared = ft.prepare(self.canonical, self.shape)
        self.xp = torch.nn.functional.pad(self.x, (0, self.shape.hidden_padded - hidden))

    def args(self, routing, **kw):
        return registry.RunArgs(top_k=self.top_k, activation=self.activation, routing=routing, **kw)

    def reference(self, routing, routing_bias=None, **kw):
        return fused_moe_reference(self.xp, self.logits, *self.canonical, top_k=self.top_k,
                                   activation=self.activation, routing=routing, input_global_scale=self.gs_a,
                                   intermediate_global_scale=self.gs_c, routing_bias=routing_bias, **kw)


def assert_close_moe(out, ref):
    out, ref = out.float(), ref.float()
    rel = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    assert rel < 2e-2, f"relative error {rel:.4f}"


# ------------------------------------------------------------------------------------------------
# The call, through the double


@pytest.mark.parametrize("hidden,inter,activation,routing,top_k", [
    (2688, 192, "silu", "renormalize", 2),
    (2688, 256, "relu2", "deepseek_v3", 2),
    (2048, 192, "gelu", "default", 2),
    (2048, 256, "relu2", "llama4", 1),
])
def test_run_matches_reference_through_double(hidden, inter, activation, routing, top_k):
    layer = Layer(hidden, inter, experts=4, top_k=top_k, activation=activation, tokens=6, seed=inter)
    api, fused, _ = make_api("emulate")
    extra = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5) if routing == "deepseek_v3" else {}
    bias = layer.bias if routing == "deepseek_v3" else None
    with ft.use_api(api):
        out = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, bias, layer.args(routing, **extra))
    assert out.dtype == torch.bfloat16 and out.shape == layer.xp.shape
    assert len(fused.calls) == 1
    call = fused.calls[0]
    assert call["routing_method_type"] == RoutingMethodType[ft.ROUTING_NAMES[routing]].value
    assert call["activation_type"] == ActivationType[ft.ACTIVATION_NAMES[activation]].value
    ref = layer.reference(routing, routing_bias=bias, **extra)
    assert_close_moe(out[:, :hidden], ref[:, :hidden])
    assert torch.count_nonzero(out[:, hidden:]) == 0



def test_routing_bias_reaches_the_kernel_in_fp32():
    """A bias gap below bf16's resolution must still decide DeepSeek-V3's experts as the reference does."""
    layer = Layer(2048, 192, experts=4, top_k=1, activation="silu", tokens=5, seed=3)
    layer.logits = torch.zeros_like(layer.logits)
    # 1 + 2^-10 rounds to 1.0 in bf16: rounded, experts 2 and 3 tie and the kernel's tie-break would decide.
    bias = torch.tensor([0.5, 0.25, 1.0, 1.0 + 2.0 ** -10], dtype=torch.float32)
    extra = dict(n_group=1, topk_group=1, routed_scaling_factor=1.0)
    api, fused, _ = make_api("emulate")
    with ft.use_api(api):
        out = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, bias,
                     layer.args("deepseek_v3", **extra))
    assert torch.equal(fused.calls[0]["routing_bias"], bias)
    ref = layer.reference("deepseek_v3", routing_bias=bias, **extra)
    other = layer.reference("deepseek_v3", routing_bias=torch.tensor([0.5, 0.25, 1.0 + 2.0 ** -9, 1.0]), **extra)
    assert (ref - other).abs().max() > 0, "experts 2 and 3 must give different outputs for the test to mean anything"
    assert_close_moe(out[:, :2048], ref[:, :2048])


def test_grouped_deepseek_routing_past_flashinfer_limits_takes_another_kernel():
    """FlashInfer's grouped DeepSeekV3 routing refuses top_k > 22 and topk_group > 4 at launch: the spec says so,
    selection passes such a layer to another kernel and a direct call is a MoEConfigError, not a launch check."""
    assert ft.routing_limits("deepseek_v3", 8, 8, 4) is None
    assert ft.routing_limits("deepseek_v3", 24, 1, None) is None  # one group: FlashInfer's ungrouped routing
    assert "topk_group=8" in ft.routing_limits("deepseek_v3", 8, 8, None)  # topk_group defaults to n_group
    assert "top_k=23" in ft.routing_limits("deepseek_v3", 23, 2, 1)
    api, _, _ = make_api("emulate")
    cpu = torch.device("cpu")
    with ft.use_api(api):
        pick = dict(activation="silu", routing="deepseek_v3")
        assert registry.select(cpu, **pick, routing_args=(8, 8, 4)).name == "trtllm"
        assert registry.select(cpu, **pick, routing_args=(8, 8, None)).name != "trtllm"
        with pytest.raises(MoEConfigError, match="topk_group=8"):
            registry.select(cpu, **pick, name="trtllm", routing_args=(8, 8, None))
        layer = Layer(2048, 192, experts=8, top_k=2, activation="silu", tokens=3, seed=5)
        with pytest.raises(MoEConfigError, match="topk_group=8"):
            ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
                   layer.args("deepseek_v3", n_group=8))

def test_output_scale_vectors():
    g13, g2 = torch.tensor([2.0, 4.0]), torch.tensor([8.0, 16.0])
    out1, gate, out2 = ft.output_scales(g13, g2, torch.tensor(0.5), torch.tensor(3.0), gated=True)
    torch.testing.assert_close(gate, 1 / (g13 * 0.5))
    torch.testing.assert_close(out1, 3.0 / (g13 * 0.5))
    torch.testing.assert_close(out2, 1 / (3.0 * g2))
    out1, gate, out2 = ft.output_scales(g13, g2, torch.tensor(0.5), torch.tensor(3.0), gated=False)
    torch.testing.assert_close(out1, torch.full((2,), 3.0))
    assert all(t.dtype == torch.float32 and t.shape == (2,) for t in (out1, gate, out2))


def test_chunking_stitches_tokens_in_order():
    layer = Layer(2048, 192, experts=4, top_k=2, activation="silu", tokens=23, seed=1)
    api, fused, _ = make_api("echo", max_tokens=5)
    with ft.use_api(api):
        out = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
                     layer.args("renormalize", options=KernelOptions(trtllm_chunk_size=5)))
    assert [c["hidden_states"].shape[0] for c in fused.calls] == [5, 5, 5, 5, 3]
    # Each call saw its own slice of the routing logits, in order.
    assert torch.equal(torch.cat([c["routing_logits"] for c in fused.calls]), layer.logits)
    # Echo: the stitched output is every token's quantized input, once, in order.
    packed, sf, _ = quantize_nvfp4(layer.xp, layer.gs_a)
    assert torch.equal(out, dequantize_nvfp4(packed, sf, 1.0).to(torch.bfloat16))
    # Each call wrote directly into its rows of one output buffer.
    ptrs = [c["output"].data_ptr() for c in fused.calls]
    assert ptrs == [out.data_ptr() + i * 5 * out.shape[1] * out.element_size() for i in range(5)]


def test_chunked_emulation_equals_unchunked():
    layer = Layer(2048, 192, experts=4, top_k=2, activation="silu", tokens=11, seed=2)
    api, _, _ = make_api("emulate")
    with ft.use_api(api):
        whole = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("renormalize"))
        with use(KernelOptions(trtllm_chunk_size=4)):  # the scoped default: for calls whose args name none
            chunked = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
                             layer.args("renormalize"))
    torch.testing.assert_close(chunked, whole, atol=1e-2, rtol=1e-2)


def test_default_chunk_size_is_the_grid_formula():
    assert ft.chunk_size(512, 22) == trtllm_chunk_size(512, 22) == min(300_000, (512 + (65535 - 512 + 1) * 128 - 1) // 22)
    assert ft.chunk_size(128, 6) == 300_000
    assert ft.chunk_size(128, 6, KernelOptions(trtllm_chunk_size=7)) == 7
    with pytest.raises(MoEConfigError, match="positive"):
        KernelOptions(trtllm_chunk_size=0)
    assert ft.TRTLLM.max_tokens(512, 22) == trtllm_chunk_size(512, 22)


def test_narrow_output_buffer():
    layer = Layer(2688, 192, experts=4, top_k=2, activation="silu", tokens=5, seed=3)
    api, fused, _ = make_api("emulate")
    narrow = torch.full((5, 2688), float("nan"), dtype=torch.bfloat16)
    with ft.use_api(api):
        full = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("renormalize"))
        got = ft.fused_moe(layer.xp, layer.prepared, layer.gs_a, layer.gs_c, layer.args("renormalize"),
                           router_logits=layer.logits, output=narrow)
    assert got is narrow and fused.calls[-1]["output"].shape == (5, 2688)
    assert torch.equal(narrow, full[:, :2688])
    with pytest.raises(MoEConfigError, match="output"):
        ft.fused_moe(layer.xp, layer.prepared, layer.gs_a, layer.gs_c, layer.args("renormalize"),
                     router_logits=layer.logits, output=torch.empty(5, 4000, dtype=torch.bfloat16))


def test_routed_variant_matches_reference():
    layer = Layer(2688, 256, experts=4, top_k=2, activation="relu2", tokens=7, seed=4)
    weights, ids = route(layer.logits.float(), 2, "renormalize")
    api, fused, routed = make_api("emulate", max_tokens=3)
    with ft.use_api(api):
        out = ft.run_routed(layer.xp, weights, ids, layer.prepared, layer.gs_a, layer.gs_c,
                            layer.args("renormalize", options=KernelOptions(trtllm_chunk_size=3)))
    assert not fused.calls and [c["hidden_states"].shape[0] for c in routed.calls] == [3, 3, 1]
    packed = torch.cat([c["topk_ids"] for c in routed.calls])
    assert torch.equal((packed >> 16).long(), ids)
    assert torch.equal((packed & 0xFFFF).to(torch.int16).view(torch.bfloat16), weights.to(torch.bfloat16))
    assert_close_moe(out[:, :2688], layer.reference("renormalize")[:, :2688])


# ------------------------------------------------------------------------------------------------
# Mapping, capability, errors


def test_enum_mapping_by_name():
    assert {k: ActivationType[v] for k, v in ft.ACTIVATION_NAMES.items()} == {
        "silu": ActivationType.Swiglu, "gelu": ActivationType.Geglu, "relu2": ActivationType.Relu2,
        "swiglu_oai": ActivationType.Swiglu}
    assert {k: RoutingMethodType[v] for k, v in ft.ROUTING_NAMES.items()} == {
        "default": RoutingMethodType.Default, "renormalize": RoutingMethodType.Renormalize,
        "deepseek_v3": RoutingMethodType.DeepSeekV3, "llama4": RoutingMethodType.Llama4}
    spec = registry.get("trtllm")
    assert spec is ft.TRTLLM
    assert spec.activations == {"silu", "gelu", "relu2", "swiglu_oai"}
    assert spec.expert_bias and spec.activation_params and spec.prepare_biases is ft.prepare_biases
    assert spec.routings == {"default", "renormalize", "deepseek_v3", "llama4"}
    assert spec.alignment == TRTLLM_ALIGNMENT and spec.priority == 20 and spec.quantizes_activations


def test_gelu_tanh_is_a_clear_error():
    with pytest.raises(MoEConfigError, match="gelu_tanh.*erf- or tanh-GELU is undocumented"):
        registry.check_supported(ft.TRTLLM, activation="gelu_tanh", routing="renormalize")
    layer = Layer(2048, 192, experts=2, top_k=1, activation="gelu", tokens=2)
    api, fused, _ = make_api()
    with ft.use_api(api), pytest.raises(MoEConfigError, match="gelu_tanh"):
        ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
               registry.RunArgs(top_k=1, activation="gelu_tanh", routing="renormalize"))
    assert not fused.calls


def test_run_argument_errors():
    layer = Layer(2048, 192, experts=2, top_k=1, activation="silu", tokens=2)
    api, _, _ = make_api()
    with ft.use_api(api):
        with pytest.raises(MoEConfigError, match="llama4"):
            ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
                   registry.RunArgs(top_k=2, activation="silu", routing="llama4"))
        with pytest.raises(MoEConfigError, match="padded hidden"):
            ft.run(layer.x[:, :100], layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("default"))
        with pytest.raises(MoEConfigError, match="static"):
            ft.run(layer.xp, layer.logits, layer.prepared, None, layer.gs_c, None, layer.args("default"))


def test_sparsemixer_is_refused_not_routed_another_way(monkeypatch):
    """PhiMoE's sparsemixer has no RoutingMethodType: the spec does not declare it, a direct call is a clear error
    before any launch, and on a Blackwell device the layer's kernel is the Triton one (with a fallback warning)."""
    with pytest.raises(MoEConfigError, match="does not support routing 'sparsemixer'"):
        registry.check_supported(ft.TRTLLM, activation="silu", routing="sparsemixer")
    assert ft.TRTLLM.lacks(activation="silu", routing="sparsemixer") == "routing 'sparsemixer'"
    layer = Layer(2048, 192, experts=4, top_k=2, activation="silu", tokens=2)
    api, fused, _ = make_api()
    with ft.use_api(api), pytest.raises(MoEConfigError, match="does not support routing 'sparsemixer'"):
        ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
               registry.RunArgs(top_k=2, activation="silu", routing="sparsemixer", routing_params=(0.01,)))
    assert not fused.calls
    blackwell = torch.device("cuda:0")
    for name in ("trtllm", "triton"):  # both available on a (pretended) Blackwell GPU
        monkeypatch.setitem(registry._REGISTRY, name, dataclasses.replace(registry.get(name),
                                                                           available=lambda d: d.type == "cuda"))
    registry._FALLBACK_WARNED.clear()
    with pytest.warns(registry.KernelFallbackWarning, match="'trtllm' lacks routing 'sparsemixer'"):
        assert registry.select(blackwell, activation="silu", routing="sparsemixer").name == "triton"
    assert registry.select(blackwell, activation="silu", routing="renormalize").name == "trtllm"


def test_available_needs_sm100_and_flashinfer(monkeypatch):
    assert not ft.available(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for cap, expected in (((10, 0), True), ((10, 3), True), ((9, 0), False), ((12, 0), False), ((10, 1), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, cap=cap: cap)
        assert ft.available(torch.device("cuda:0")) is expected, cap
    monkeypatch.setattr(ft, "_flashinfer_importable", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (10, 0))
    assert not ft.available(torch.device("cuda"))
    api, _, _ = make_api()
    with ft.use_api(api):
        assert ft.available(torch.device("cpu"))
    assert not ft.available(torch.device("cpu"))


def test_flashinfer_is_not_imported_at_module_import():
    import subprocess
    import sys

    code = ("import sys; import moe_passes.kernels.flashinfer_trtllm as m; "
            "print('flashinfer' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# Signature detection across FlashInfer releases


def _old_style_signature(tile_required=True):
    """0.4-era layout: tile_tokens_dim (no default), gated_act_type, no output / scale-layout keywords."""
    P = inspect.Parameter
    names = ["routing_logits", "routing_bias", "hidden_states", "hidden_states_scale", "gemm1_weights",
             "gemm1_weights_scale", "gemm1_bias", "gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit", "gemm2_weights",
             "gemm2_weights_scale", "gemm2_bias", "output1_scale_scalar", "output1_scale_gate_scalar",
             "output2_scale_scalar", "num_experts", "top_k", "n_group", "topk_group", "intermediate_size",
             "local_expert_offset", "local_num_experts", "routed_scaling_factor"]
    params = [P(n, P.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(P("tile_tokens_dim", P.POSITIONAL_OR_KEYWORD, default=P.empty if tile_required else None))
    params += [P("routing_method_type", P.POSITIONAL_OR_KEYWORD, default=0),
               P("do_finalize", P.POSITIONAL_OR_KEYWORD, default=True),
               P("enable_pdl", P.POSITIONAL_OR_KEYWORD, default=None),
               P("gated_act_type", P.POSITIONAL_OR_KEYWORD, default=0)]
    return inspect.Signature(params)


def test_old_signature_layout():
    layer = Layer(2048, 192, experts=4, top_k=2, activation="silu", tokens=5, seed=5)
    api, fused, _ = make_api("emulate", signature=_old_style_signature())
    with ft.use_api(api):
        out = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("renormalize"))
    call = fused.calls[0]
    assert "activation_type" not in call and "output" not in call
    assert call["gated_act_type"] == fi_enums.GatedActType.SwiGlu.value
    assert call["tile_tokens_dim"] in (8, 16, 32, 64)
    assert_close_moe(out[:, :2048], layer.reference("renormalize")[:, :2048])


# ------------------------------------------------------------------------------------------------
# Expert biases and swiglu_oai (gpt-oss)


@pytest.mark.parametrize("hidden,inter,activation", [(2880, 192, "swiglu_oai"), (2048, 256, "relu2")])
def test_prepared_biases_follow_their_weight_rows_as_flashinfer_shuffles_them(hidden, inter, activation):
    """w13_bias gets w13's whole row reordering ([up; gate], the gated interleave, the epilogue shuffle) and
    w2_bias w2's shuffle, exactly as FlashInfer's own helpers reorder a bias given as a one-column matrix."""
    gated = is_gated(activation)
    shape = MoEShape(hidden=hidden, intermediate=inter, experts=3, top_k=2, activation=activation)
    g = torch.Generator().manual_seed(hidden)
    b13 = torch.randn(3, shape.w13_rows, generator=g)
    b2 = torch.randn(3, shape.hidden_padded, generator=g)
    p13, p2 = ft.prepare_biases(b13, b2, shape)
    cache: dict = {}
    for e in range(3):
        col = up_gate(b13[e], gated).reshape(-1, 1)
        idx = fi_core._maybe_get_cached_w3_w1_permute_indices(cache, col, 128, is_gated_act_gemm=gated)
        assert torch.equal(p13[e], col[idx].reshape(-1))
        col2 = b2[e].reshape(-1, 1)
        assert torch.equal(p2[e], col2[fi_core.get_w2_permute_indices_with_cache(cache, col2, 128)].reshape(-1))
    # A bias row lands where its weight row does: rows of an identity-like w13 carry their own index.
    rows = torch.arange(shape.w13_rows, dtype=torch.float32).expand(1, -1)
    moved, _ = ft.prepare_biases(rows.repeat(3, 1), None, shape)
    assert torch.equal(moved[0].long(), ft.w13_row_indices(shape.w13_rows, gated))
    with pytest.raises(MoEConfigError, match="w13_bias must be torch.float32"):
        ft.prepare_biases(b13.to(torch.bfloat16), None, shape)
    with pytest.raises(MoEConfigError, match="w2_bias must be torch.float32 with shape"):
        ft.prepare_biases(None, b2[:, :-16], shape)


def test_bias_and_activation_argument_units():
    """Biases, beta and the clamp limit in the raw accumulator's units (divided by the output scale of their
    GEMM), alpha as it is; fp32, one per local expert; nothing for a plain activation."""
    g13, g2 = torch.tensor([100.0, 200.0]), torch.tensor([50.0, 25.0])
    out1, gate1, out2 = ft.output_scales(g13, g2, torch.tensor(4.0), torch.tensor(8.0), gated=True)
    b13, b2 = torch.randn(2, 256), torch.randn(2, 512)
    args = ft.bias_and_activation_args(gate1, out2, "swiglu_oai", [1.702, 1.0, 7.0], b13, b2)
    torch.testing.assert_close(args["gemm1_bias"], b13 * (g13 * 4.0)[:, None])
    torch.testing.assert_close(args["gemm2_bias"], b2 * (g2 * 8.0)[:, None])
    torch.testing.assert_close(args["gemm1_alpha"], torch.full((2,), 1.702))
    torch.testing.assert_close(args["gemm1_beta"], g13 * 4.0)
    torch.testing.assert_close(args["gemm1_clamp_limit"], 7.0 * g13 * 4.0)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in args.values())
    plain = ft.bias_and_activation_args(gate1, out2, "silu")
    assert all(v is None for v in plain.values())
    with pytest.raises(MoEConfigError, match="takes no parameters"):
        ft.bias_and_activation_args(gate1, out2, "silu", [1.0, 1.0, 1.0])


@pytest.mark.parametrize("hidden,inter,routing", [(2880, 192, "renormalize"), (2048, 128, "deepseek_v3")])
def test_biases_and_swiglu_oai_through_double(hidden, inter, routing):
    """gpt-oss's expert math through the call: hidden 2880 padded to 3072 (w2_bias zero-padded along H),
    the biases and alpha / beta / limit mapped onto FlashInfer's arguments, against the reference."""
    layer = Layer(hidden, inter, experts=4, top_k=2, activation="swiglu_oai", tokens=7, seed=inter, biases=True)
    api, fused, _ = make_api("emulate")
    extra = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5) if routing == "deepseek_v3" else {}
    bias = layer.bias if routing == "deepseek_v3" else None
    b13, b2 = ft.prepare_biases(layer.w13_bias, layer.w2_bias, layer.shape)
    params = (1.702, 1.0, 7.0)
    with ft.use_api(api):
        out = ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, bias,
                     layer.args(routing, activation_params=params, **extra), w13_bias=b13, w2_bias=b2)
    call = fused.calls[0]
    assert call["activation_type"] == ActivationType.Swiglu.value
    assert all(call[n] is not None for n in ("gemm1_bias", "gemm2_bias", "gemm1_alpha", "gemm1_beta",
                                             "gemm1_clamp_limit"))
    ref = layer.reference(routing, routing_bias=bias, w13_bias=layer.w13_bias, w2_bias=layer.w2_bias,
                          activation_params=list(params), **extra)
    assert_close_moe(out[:, :hidden], ref[:, :hidden])
    # Without the biases the result is far off: the check sees them.
    no_bias = layer.reference(routing, routing_bias=bias, activation_params=list(params), **extra)
    assert (no_bias.float() - ref.float()).norm() > 0.2 * ref.float().norm()
    assert torch.count_nonzero(out[:, hidden:]) == 0


def test_a_flashinfer_without_bias_arguments_is_an_error_not_a_dropped_bias():
    layer = Layer(2048, 192, experts=4, top_k=2, activation="swiglu_oai", tokens=3, seed=9, biases=True)
    sig = _old_style_signature(tile_required=False)
    sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "gemm2_bias"])
    api, _, _ = make_api("emulate", signature=sig)
    b13, b2 = ft.prepare_biases(layer.w13_bias, layer.w2_bias, layer.shape)
    with ft.use_api(api), pytest.raises(KernelUnavailableError, match="gemm2_bias"):
        ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None,
               layer.args("renormalize", activation_params=(1.702, 1.0, 7.0)), w13_bias=b13, w2_bias=b2)


def test_old_signature_rejects_relu2_and_unknown_required():
    layer = Layer(2048, 256, experts=2, top_k=1, activation="relu2", tokens=2)
    api, _, _ = make_api("emulate", signature=_old_style_signature(tile_required=False))
    with ft.use_api(api), pytest.raises(KernelUnavailableError, match="activation_type"):
        ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("renormalize"))
    P = inspect.Parameter
    sig = inspect.signature(fi_core.trtllm_fp4_block_scale_moe)
    sig = sig.replace(parameters=[*list(sig.parameters.values())[:24], P("brand_new", P.POSITIONAL_OR_KEYWORD),
                                  *list(sig.parameters.values())[24:]])
    api, _, _ = make_api("emulate", signature=sig)
    with ft.use_api(api), pytest.raises(KernelUnavailableError, match="brand_new"):
        ft.run(layer.xp, layer.logits, layer.prepared, layer.gs_a, layer.gs_c, None, layer.args("renormalize"))


# ------------------------------------------------------------------------------------------------
# The real kernel (SM100/SM103 only)


def _blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() in ((10, 0), (10, 3))


@pytest.mark.gpu
@pytest.mark.blackwell
@pytest.mark.skipif(not _blackwell(), reason="needs an SM100/SM103 (Blackwell) GPU")
@pytest.mark.parametrize("hidden,inter,activation,routing,top_k", [
    (2688, 1856, "relu2", "renormalize", 6),
    (2048, 768, "silu", "renormalize", 8),
    (1024, 1024, "silu", "deepseek_v3", 4),
    (2048, 704, "gelu", "default", 8),
    (2880, 2880, "swiglu_oai", "renormalize", 4),  # gpt-oss-120b's shapes: hidden pads to 3072; biases
])
def test_real_kernel_matches_reference(hidden, inter, activation, routing, top_k):
    torch.manual_seed(0)
    oai = activation == "swiglu_oai"
    layer = Layer(hidden, inter, experts=16, top_k=top_k, activation=activation, tokens=64, seed=7, biases=oai)
    dev = torch.device("cuda")
    assert ft.available(dev)
    prepared = registry.MoEWeights(*(t.to(dev) for t in layer.prepared))
    extra = dict(n_group=4, topk_group=2, routed_scaling_factor=2.5) if routing == "deepseek_v3" else {}
    bias = layer.bias if routing == "deepseek_v3" else None
    biases, ref_extra = {}, {}
    if oai:  # the units of the bias / beta / limit mapping are settled here (docs/kernels.md)
        b13, b2 = ft.prepare_biases(layer.w13_bias, layer.w2_bias, layer.shape)
        biases = dict(w13_bias=b13.to(dev), w2_bias=b2.to(dev))
        extra["activation_params"] = (1.702, 1.0, 7.0)
        ref_extra = dict(w13_bias=layer.w13_bias, w2_bias=layer.w2_bias)
    out = ft.run(layer.xp.to(dev), layer.logits.to(dev), prepared, layer.gs_a.to(dev), layer.gs_c.to(dev),
                 None if bias is None else bias.to(dev), layer.args(routing, **extra), **biases)
    if oai:
        extra["activation_params"] = list(extra["activation_params"])
    ref = layer.reference(routing, routing_bias=bias, **extra, **ref_extra)
    torch.testing.assert_close(out[:, :hidden].float().cpu(), ref.float(), atol=0.1, rtol=0.1)


# ------------------------------------------------------------------------------------------------
# Through the real lowering: torch.compile(FusedMoE, backend="moe_nvfp4") dispatching to "trtllm"


def test_compiled_fused_moe_dispatches_to_trtllm():
    from moe_passes import FusedMoE

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(11)
    hidden, inter, experts, top_k = 2688, 192, 4, 2
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / 10
    w2 = torch.randn(experts, hidden, inter, generator=g) / 10
    calib = torch.randn(32, hidden, generator=g) / 2
    shared = torch.nn.Linear(hidden, hidden, bias=False).to(torch.bfloat16)
    api, fused, _ = make_api("emulate", max_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        reference = FusedMoE.from_float(w13, w2, top_k=top_k, activation="silu", calibration=calib,
                                        shared_expert=shared, kernel="reference")
        with ft.use_api(api):
            layer = FusedMoE.from_float(w13, w2, top_k=top_k, activation="silu", calibration=calib,
                                        shared_expert=shared, kernel="trtllm")
    assert layer.kernel == "trtllm"
    with pytest.raises(KernelUnavailableError):  # without the double, a CPU cannot host the kernel
        FusedMoE.from_float(w13[:, :, :256], w2[:, :256], top_k=top_k, activation="silu", calibration=calib[:, :256],
                            kernel="trtllm")

    from moe_passes.ops import KERNEL_OP

    kernel_nodes = []

    def observer(stage, name, gm):
        if stage == "after":
            kernel_nodes.extend(n for n in gm.graph.nodes if n.target is KERNEL_OP)

    compiled = torch.compile(layer, backend="moe_nvfp4", options={"inner": "eager", "observers": [observer]})
    for tokens in (7, 5):
        x = (torch.randn(tokens, hidden, generator=g) / 2).to(torch.bfloat16)
        logits = torch.randn(tokens, experts, generator=g).to(torch.bfloat16)
        before = len(fused.calls)
        with ft.use_api(api), torch.no_grad(), use(KernelOptions(trtllm_chunk_size=3)):
            out = compiled(x, logits)
            eager = layer(x, logits)
        with torch.no_grad():
            ref = reference(x, logits)
        assert out.shape == (tokens, hidden) and out.dtype == torch.bfloat16
        calls = fused.calls[before:]
        # Compiled and eager each chunked the padded (2816-wide) activations into calls of <= 3 tokens.
        assert [c["hidden_states"].shape for c in calls] == 2 * [torch.Size((min(3, tokens - s), 2816 // 2))
                                                                  for s in range(0, tokens, 3)]
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        assert_close_moe(out, ref)
    # The lowering produced the kernel op, naming this kernel, with padded hidden states.
    assert kernel_nodes and all("trtllm" in n.args for n in kernel_nodes)
    assert all(n.args[0].meta["val"].shape[1] == 2816 for n in kernel_nodes)
