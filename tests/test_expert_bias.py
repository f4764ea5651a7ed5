"""Expert biases and the swiglu_oai activation (gpt-oss) through the contract, the reference, FusedMoE,
the compiled graph and the registry.

The oracle is an independent float64 implementation of gpt-oss's expert math written from its formulas, on
gpt-oss's own layout (``gate_up_proj [E, H, 2I]`` with gate and up interleaved, ``down_proj [E, I, H]``),
fed fresh random inputs: the reference must agree after the layout is read as ``[gate; up]`` rows.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_passes import FusedMoE
from moe_passes.contract import SwigluOAI, activation_params, align_biases
from moe_passes.errors import MoEConfigError, MoEShapeError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import dequantize_nvfp4_experts, quantize_nvfp4_experts
from moe_passes.kernels.reference import apply_activation, fused_moe_reference
from moe_passes.ops import KERNEL_OP


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _gpt_oss_fp64(x, logits, gate_up, gate_up_bias, down, down_bias, top_k, alpha, limit):
    """gpt-oss's MoE in float64: top-k on the logits, softmax over the k; per expert
    ``gate_up = x @ gate_up_proj[e] + bias`` (gate at even columns, up at odd), ``g = min(gate, limit)``,
    ``u = clamp(up, -limit, limit)``, ``(u + 1) * g * sigmoid(alpha * g) @ down_proj[e] + down_bias``,
    times the routing weight."""
    x, logits = x.double(), logits.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top, ids = logits[t].topk(top_k)
        w = torch.exp(top - top.max())
        w = w / w.sum()
        for k in range(top_k):
            e = int(ids[k])
            gu = x[t] @ gate_up[e].double() + gate_up_bias[e].double()
            g, u = gu[0::2].clamp(max=limit), gu[1::2].clamp(-limit, limit)
            h = (u + 1) * g * torch.sigmoid(alpha * g)
            h = h.to(torch.bfloat16).double()  # the kernels' bf16 intermediate (Hopper numerics)
            out[t] += w[k] * (h @ down[e].double() + down_bias[e].double())
    return out


def _gpt_oss_experts(experts, hidden, inter, seed):
    """Random gpt-oss-layout expert weights on the NVFP4 grid (along their reduction dimension)."""
    g = torch.Generator().manual_seed(seed)

    def on_grid(w):  # [E, K, N] stored; quantize along K
        return dequantize_nvfp4_experts(*quantize_nvfp4_experts(w.transpose(1, 2).contiguous())).transpose(1, 2)

    gate_up = on_grid(torch.randn(experts, hidden, 2 * inter, generator=g) * 0.3)
    down = on_grid(torch.randn(experts, inter, hidden, generator=g) * 0.3)
    gate_up_bias = torch.randn(experts, 2 * inter, generator=g)
    down_bias = torch.randn(experts, hidden, generator=g) * 5  # comparable to the experts' output
    return gate_up, gate_up_bias, down, down_bias


def _as_canonical(gate_up, gate_up_bias, down):
    """gpt-oss's layout read as FusedMoE's: w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]."""
    w13 = gate_up.transpose(1, 2)
    w13 = torch.cat([w13[:, 0::2], w13[:, 1::2]], dim=1)
    b13 = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
    return w13.contiguous(), b13.contiguous(), down.transpose(1, 2).contiguous()


@pytest.mark.parametrize("seed", range(3))
def test_reference_matches_independent_fp64_gpt_oss_math(seed):
    experts, hidden, inter, top_k, tokens = 4, 64, 32, 2, 9
    gate_up, b_gu, down, b_down = _gpt_oss_experts(experts, hidden, inter, seed)
    g = torch.Generator().manual_seed(100 + seed)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(torch.bfloat16)  # gate values well past the limit
    logits = torch.randn(tokens, experts, generator=g)
    want = _gpt_oss_fp64(x, logits, gate_up, b_gu, down, b_down, top_k, 1.702, 7.0)
    w13, b13, w2 = _as_canonical(gate_up, b_gu, down)
    q13, s13, g13 = quantize_nvfp4_experts(w13)
    q2, s2, g2 = quantize_nvfp4_experts(w2)
    got = fused_moe_reference(x, logits, q13, s13, g13, q2, s2, g2, top_k=top_k, activation="swiglu_oai",
                              routing="renormalize", quantize_activations=False, w13_bias=b13, w2_bias=b_down,
                              activation_params=[1.702, 1.0, 7.0])
    rel = float((got.double() - want).norm() / want.norm())
    assert rel < 5e-3, rel  # bf16 output rounding and fp32 sums; a missing bias or clamp is 10%+
    # the clamp matters on these inputs, and so does each bias
    assert bool((x.float() @ w13[0, :inter].t() + b13[0, :inter] > 7).any())
    no_b2 = fused_moe_reference(x, logits, q13, s13, g13, q2, s2, g2, top_k=top_k, activation="swiglu_oai",
                                quantize_activations=False, w13_bias=b13)
    assert float((no_b2.double() - want).norm() / want.norm()) > 0.05


def test_swiglu_oai_by_hand_and_parameters():
    h = torch.tensor([[10.0, -2.0, 9.0, -9.0]])  # gate = [10, -2], up = [9, -9]
    got = apply_activation(h, "swiglu_oai", SwigluOAI(alpha=1.702, beta=1.0, limit=7.0))
    sig = torch.sigmoid
    want = torch.tensor([[7 * sig(torch.tensor(7 * 1.702)) * 8, -2 * sig(torch.tensor(-2 * 1.702)) * -6]])
    torch.testing.assert_close(got, want)
    # alpha 1, beta 0, no effective clamp: plain SwiGLU
    x = torch.randn(5, 8)
    torch.testing.assert_close(apply_activation(x, "swiglu_oai", [1.0, 0.0, 1e9]), apply_activation(x, "silu"))
    assert activation_params("swiglu_oai") == [1.702, 1.0, 7.0]
    assert activation_params("silu") is None
    for bad in ([1.0, 2.0], "abc", [1.0, 1.0, -1.0]):
        with pytest.raises(MoEConfigError):
            activation_params("swiglu_oai", bad)
    with pytest.raises(MoEConfigError, match="takes no parameters"):
        activation_params("silu", [1.0, 1.0, 1.0])


def _layer(hidden=200, inter=40, experts=4, top_k=2, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.1
    b13 = torch.randn(experts, 2 * inter, generator=g)
    b2 = torch.randn(experts, hidden, generator=g)
    calib = torch.randn(32, hidden, generator=g)
    moe = FusedMoE.from_float(w13, w2, top_k=top_k, activation="swiglu_oai", w13_bias=b13, w2_bias=b2,
                              calibration=calib, **kw)
    return moe, b13, b2


def test_layer_pads_biases_like_weights_and_compiles_to_one_kernel_node():
    """Hidden 200 pads to 256 (TRTLLM alignment, emulated by the reference): w2_bias is zero-padded along H;
    intermediate 40 pads to 64 with each half of w13_bias padded on its own.  Compiled = eager = reference."""
    moe, b13, b2 = _layer()
    s = moe.kernel_shape
    assert (s.hidden_padded, s.intermediate_padded) == (256, 64)
    kb13, kb2 = moe._buffers["_kernel_w13_bias"], moe._buffers["_kernel_w2_bias"]
    assert kb13.dtype == kb2.dtype == torch.float32
    assert tuple(kb13.shape) == (4, 128) and tuple(kb2.shape) == (4, 256)
    torch.testing.assert_close(kb13[:, :40], b13[:, :40])
    torch.testing.assert_close(kb13[:, 64:104], b13[:, 40:])
    assert not kb13[:, 40:64].any() and not kb13[:, 104:].any()
    torch.testing.assert_close(kb2[:, :200], b2)
    assert not kb2[:, 200:].any()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 200, generator=g).to(torch.bfloat16)
    logits = torch.randn(7, 4, generator=g)
    eager = moe(x, logits)
    w = moe.canonical_weights()
    ref = fused_moe_reference(x, logits, *w, top_k=2, activation="swiglu_oai", input_global_scale=moe.input_global_scale,
                              intermediate_global_scale=moe.intermediate_global_scale, w13_bias=moe.w13_bias,
                              w2_bias=moe.w2_bias, activation_params=moe.activation_params)
    assert torch.equal(eager, ref)
    from moe_passes.testing import moe_reference  # the test kit's reference: biases and parameters included
    assert torch.equal(moe_reference(moe, x, logits), ref)
    seen = []
    compiled = torch.compile(moe, backend="moe_nvfp4", fullgraph=True,
                             options={"inner": "eager", "extra_passes": [lambda gm: seen.append(gm.graph)]})
    with torch.no_grad():
        out = compiled(x, logits)
    assert torch.equal(out, eager)
    (graph,) = seen
    kernels = [n for n in graph.nodes if n.target is KERNEL_OP]
    assert len(kernels) == 1
    args = dict(zip([a.name for a in KERNEL_OP._schema.arguments], kernels[0].args))
    assert args["activation_params"] == [1.702, 1.0, 7.0]
    assert tuple(args["w2_bias"].meta["val"].shape) == (4, 256)  # padded, like the weights
    assert [n.target for n in graph.nodes if n.target is torch.ops.aten.constant_pad_nd.default]


def test_biases_change_the_output_and_survive_device_moves_and_dtype_casts():
    moe, _, _ = _layer(seed=2)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))
    before = moe(x, logits)
    moe.to(torch.bfloat16)  # a model cast after conversion must not cast the fp32 biases
    assert moe._buffers["_kernel_w2_bias"].dtype == torch.float32 and moe.w13_bias.dtype == torch.float32
    assert torch.equal(moe(x, logits), before)
    state = moe.state_dict()
    assert {"w13_bias", "w2_bias"} <= set(state)
    plain = FusedMoE(moe.canonical_weights("cpu"), hidden_size=200, intermediate_size=40, top_k=2,
                     activation="swiglu_oai", input_global_scale=moe.input_global_scale,
                     intermediate_global_scale=moe.intermediate_global_scale)
    assert float((plain(x, logits).float() - before.float()).norm() / before.float().norm()) > 0.1


def test_bad_bias_shapes_and_dtypes_are_clear_errors():
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(4, 80, 200, generator=g), torch.randn(4, 200, 40, generator=g)
    with pytest.raises(MoEConfigError, match=r"w13_bias must be a float tensor of shape \[4, 80\]"):
        FusedMoE.from_float(w13, w2, top_k=2, activation="swiglu_oai", w13_bias=torch.zeros(4, 40))
    with pytest.raises(MoEConfigError, match=r"w2_bias must be a float tensor of shape \[4, 200\]"):
        FusedMoE.from_float(w13, w2, top_k=2, w2_bias=torch.zeros(4, 256))
    with pytest.raises(MoEConfigError, match="w2_bias must be a float"):
        FusedMoE.from_float(w13, w2, top_k=2, w2_bias=torch.zeros(4, 200, dtype=torch.int32))
    with pytest.raises(MoEConfigError, match="takes no parameters"):
        FusedMoE.from_float(w13, w2, top_k=2, activation="silu", activation_params=SwigluOAI())
    moe, _, _ = _layer()
    with pytest.raises(MoEConfigError, match="NaN"):
        FusedMoE(moe.canonical_weights("cpu"), hidden_size=200, intermediate_size=40, top_k=2,
                 activation="swiglu_oai", w2_bias=torch.full((4, 200), float("nan")))
    # At the op: unpadded or bf16 biases are refused with the contract's shape, eagerly and in the fake.
    x = torch.randn(3, 200).to(torch.bfloat16)
    logits = torch.randn(3, 4)
    base = (x, logits, *moe.kernel_weights(), moe.input_global_scale, moe.intermediate_global_scale, None, 200, 2,
            "swiglu_oai", "renormalize", None, None, None, moe.kernel, "bad")
    with pytest.raises(MoEShapeError, match=r"w2_bias has shape \(4, 208\), the contract says \(4, 256\)"):
        torch.ops.moe_nvfp4.fused_moe(*base, w2_bias=moe.w2_bias.clone())
    with pytest.raises(MoEConfigError, match="w13_bias must be a 2-D float32"):
        torch.ops.moe_nvfp4.fused_moe(*base, w13_bias=moe._buffers["_kernel_w13_bias"].to(torch.bfloat16))
    with pytest.raises(MoEConfigError, match=r"parameters must be \[alpha, beta, limit\]"):
        torch.ops.moe_nvfp4.fused_moe(*base, activation_params=[1.0])


def test_align_biases_pads_each_half():
    b13 = torch.arange(8.0).reshape(1, 8)  # gate 0..3, up 4..7
    p13, p2 = align_biases(b13, torch.ones(1, 3), gated=True, intermediate_padded=6, hidden_padded=5)
    assert p13.tolist() == [[0, 1, 2, 3, 0, 0, 4, 5, 6, 7, 0, 0]] and p2.tolist() == [[1, 1, 1, 0, 0]]
    assert align_biases(None, None, gated=False, intermediate_padded=16, hidden_padded=16) == (None, None)


def test_registry_declares_who_takes_biases_and_swiglu_oai(monkeypatch):
    import dataclasses

    for name in ("reference", "triton", "trtllm"):
        spec = registry.get(name)
        assert spec.expert_bias and spec.supports_activation("swiglu_oai"), name
        assert spec.lacks(activation="swiglu_oai", routing="renormalize", biases=True) is None
    assert registry.get("triton").prepare_biases is None  # its layout keeps rows in place

    # On a Hopper GPU (Triton available, TRTLLM not) gpt-oss's layers take the Triton kernel, with no warning.
    hopper = {**registry._REGISTRY, "triton": dataclasses.replace(registry.get("triton"), available=lambda d: True),
              "trtllm": dataclasses.replace(registry.get("trtllm"), available=lambda d: False)}
    monkeypatch.setattr(registry, "_REGISTRY", hopper)
    monkeypatch.setattr(registry, "_FALLBACK_WARNED", set())
    device = torch.device("cuda")  # a device name only: nothing runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.select(device, activation="swiglu_oai", routing="renormalize", biases=True).name == "triton"

    # A faster kernel that lacks biases is passed over, with one warning naming it and what it lacks.
    fast = registry.KernelSpec(name="fast", description="test", alignment=registry.get("reference").alignment,
                               activations=frozenset({"silu", "swiglu_oai"}), routings=frozenset({"renormalize"}),
                               available=lambda d: True, prepare=lambda w, s: w, run=None, priority=99)
    assert "activation parameters" in fast.lacks(activation="swiglu_oai", routing="renormalize")
    assert "expert biases" in fast.lacks(activation="silu", routing="renormalize", biases=True)
    with pytest.raises(MoEConfigError, match=r"kernel 'fast' does not support expert biases.*'reference', 'triton', "
                                             r"'trtllm'"):
        registry.check_supported(fast, activation="silu", routing="renormalize", biases=True)
    monkeypatch.setattr(registry, "_REGISTRY", {**hopper, "fast": fast})
    assert registry.select(device, activation="silu", routing="renormalize") is fast
    with pytest.warns(registry.KernelFallbackWarning, match="'fast' lacks expert biases.*runs on 'triton'"):
        assert registry.select(device, activation="silu", routing="renormalize", biases=True).name == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per combination
        registry.select(device, activation="silu", routing="renormalize", biases=True)
    with pytest.raises(MoEConfigError, match="does not support expert biases"):
        registry.select(device, activation="silu", routing="renormalize", biases=True, name="fast")


def test_parallel_with_biases_is_refused():
    from moe_passes.parallel import ExpertParallel

    moe, _, _ = _layer()
    with pytest.raises(MoEConfigError, match="not supported with parallel="):
        FusedMoE(moe.canonical_weights("cpu"), hidden_size=200, intermediate_size=40, top_k=2,
                 activation="swiglu_oai", w2_bias=moe.w2_bias, parallel=ExpertParallel())
