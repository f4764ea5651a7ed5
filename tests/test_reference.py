"""The reference MoE against hand-worked cases and independent float64 computations."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_passes.contract import align_hidden_dim
from moe_passes.errors import MoEConfigError
from moe_passes.kernels.nvfp4 import dequantize_nvfp4_experts, quantize_nvfp4, dequantize_nvfp4, quantize_nvfp4_experts
from moe_passes.kernels.reference import apply_activation, fused_moe_reference, route
from routing_cases import sparsemixer_fp64, sparsemixer_logits


# ---------------------------------------------------------------------------------------------- routing
def test_default_and_renormalize_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    z = sum(math.exp(v) for v in (1, 3, 2, 0))
    w, ids = route(logits, 2, "default")
    assert ids.tolist() == [[1, 2]]
    assert w[0].tolist() == pytest.approx([math.exp(3) / z, math.exp(2) / z], rel=1e-6)
    w, ids = route(logits, 2, "renormalize")
    assert ids.tolist() == [[1, 2]]
    assert w[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))], rel=1e-6)


def test_llama4_by_hand():
    w, ids = route(torch.tensor([[0.5, -1.0, 2.0]]), 1, "llama4")
    assert ids.tolist() == [[2]] and w.item() == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    with pytest.raises(MoEConfigError, match="one expert"):
        route(torch.randn(2, 3), 2, "llama4")


def _deepseek_by_hand(logits, bias, top_k, n_group, topk_group, scale):
    sig = [1 / (1 + math.exp(-v)) for v in logits]
    biased = [s + b for s, b in zip(sig, bias)]
    size = len(logits) // n_group
    group_scores = []
    for g in range(n_group):
        members = sorted(biased[g * size:(g + 1) * size], reverse=True)
        group_scores.append(members[0] + members[1])
    keep = sorted(range(n_group), key=lambda g: -group_scores[g])[:topk_group]
    allowed = [e for e in range(len(logits)) if e // size in keep]
    chosen = sorted(allowed, key=lambda e: -biased[e])[:top_k]
    total = sum(sig[e] for e in chosen)
    return chosen, [sig[e] / total * scale for e in chosen]


@pytest.mark.parametrize("seed", range(5))
def test_deepseek_v3_by_hand(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 16, generator=g)
    bias = torch.randn(16, generator=g) * 0.5
    w, ids = route(logits, 4, "deepseek_v3", routing_bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    for t in range(3):
        chosen, weights = _deepseek_by_hand(logits[t].tolist(), bias.tolist(), 4, 4, 2, 2.5)
        assert ids[t].tolist() == chosen
        assert w[t].tolist() == pytest.approx(weights, rel=1e-5)


def test_routing_errors():
    with pytest.raises(MoEConfigError, match="unknown routing"):
        route(torch.randn(2, 4), 1, "softmax")
    with pytest.raises(MoEConfigError, match="between 1"):
        route(torch.randn(2, 4), 5, "renormalize")
    with pytest.raises(MoEConfigError, match="divide"):
        route(torch.randn(2, 6), 2, "deepseek_v3", n_group=4, topk_group=1)


# ----------------------------------------------------------------------------- sparsemixer (PhiMoE)
def test_sparsemixer_by_hand():
    # best 2.0 at expert 1; jitter_eps 0.1 (threshold 0.2): the first mask keeps 2.0, 1.9 and 1.7 ((2 - 1.7) / 2
    # = 0.15) and drops 1.0 and -3.0 ((2 + 3) / 3); the second, against 1.9, keeps 1.7 ((1.9 - 1.7) / 1.9 = 0.105)
    # and drops 1.0, and expert 1 is out of its softmax
    logits = torch.tensor([[1.0, 2.0, 1.9, 1.7, -3.0]])
    w, ids = route(logits, 2, "sparsemixer", routing_params=[0.1])
    assert ids.tolist() == [[1, 2]]
    assert w[0, 0].item() == pytest.approx(1 / (1 + math.exp(-0.1) + math.exp(-0.3)), rel=1e-6)
    assert w[0, 1].item() == pytest.approx(1 / (1 + math.exp(-0.2)), rel=1e-6)


@pytest.mark.parametrize("jitter_eps", [0.01, 0.0, 0.05, 0.3, 0.7])
@pytest.mark.parametrize("experts", [2, 3, 16, 60])
def test_sparsemixer_matches_an_independent_fp64_formula(jitter_eps, experts):
    """Ties, all-negative rows, zero rows and experts just either side of each pick's threshold, against the
    formula evaluated token by token in float64."""
    logits = sparsemixer_logits(96, experts, jitter_eps, seed=1000 * experts + int(jitter_eps * 100))
    w, ids = route(logits, 2, "sparsemixer", routing_params=[jitter_eps])
    want_w, want_ids = sparsemixer_fp64(logits, jitter_eps)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (96, 2)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w.double(), want_w, rtol=2e-6, atol=1e-7)
    if experts > 3:  # the masks were exercised: some tokens' first weight is above the unmasked softmax's
        unmasked = torch.softmax(logits, dim=-1).gather(1, ids[:, :1])[:, 0]
        assert bool((w[:, 0] > unmasked + 1e-4).any()) and bool((w < 0.999).any())


def test_sparsemixer_margin_decides_the_mask():
    """An expert just inside the threshold counts in the softmax, one just outside does not."""
    for sign, counted in ((-1, True), (1, False)):
        s = 1.0 - 0.02 * (1 + sign * 1e-3)
        w, _ = route(torch.tensor([[1.0, s, -5.0]]), 2, "sparsemixer", routing_params=[0.01])
        want = 1 / (1 + math.exp(s - 1.0)) if counted else 1.0
        assert w[0, 0].item() == pytest.approx(want, rel=1e-6)


def test_sparsemixer_matches_transformers_phimoe():
    """transformers' own PhiMoE routing (inference mode) on the same float32 logits: same experts, same weights."""
    phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")
    for jitter_eps, experts in ((0.01, 16), (0.0, 8), (0.2, 32), (0.05, 5)):
        logits = sparsemixer_logits(64, experts, jitter_eps, seed=experts)
        want_w, want_ids = phimoe.sparsemixer(logits.clone(), jitter_eps=jitter_eps, training=False, top_k=2)
        w, ids = route(logits, 2, "sparsemixer", routing_params=[jitter_eps])
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(w, want_w.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("params, match", [(None, "needs its parameter"), ([], r"\[jitter_eps\]"),
                                           ([0.01, 0.02], r"\[jitter_eps\]"), (["x"], r"\[jitter_eps\]"),
                                           (0.01, r"\[jitter_eps\]"), ([-0.01], ">= 0"),
                                           ([float("nan")], "finite"), ([float("inf")], "finite")])
def test_sparsemixer_parameter_errors(params, match):
    with pytest.raises(MoEConfigError, match=match):
        route(torch.randn(2, 4), 2, "sparsemixer", routing_params=params)


def test_sparsemixer_routing_errors():
    for top_k in (1, 3):
        with pytest.raises(MoEConfigError, match="sparsemixer routing picks 2 experts per token"):
            route(torch.randn(2, 4), top_k, "sparsemixer", routing_params=[0.01])
    with pytest.raises(MoEConfigError, match="takes no parameters"):
        route(torch.randn(2, 4), 2, "renormalize", routing_params=[0.01])
    from moe_passes.contract import SparseMixer, routing_params
    assert routing_params("sparsemixer", SparseMixer(0.01)) == [0.01]
    assert routing_params("sparsemixer", (0,)) == [0.0]
    assert routing_params("llama4") is None
    with pytest.raises(MoEConfigError, match="finite number"):
        SparseMixer(True)


# ------------------------------------------------------------------------------------------ activations
def test_activations_against_formulas():
    h = torch.randn(5, 8, dtype=torch.float64)
    gate, up = h[:, :4], h[:, 4:]
    sig = 1 / (1 + torch.exp(-gate))
    erf_gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    tanh_gelu = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)))
    torch.testing.assert_close(apply_activation(h, "silu"), gate * sig * up)
    torch.testing.assert_close(apply_activation(h, "gelu"), erf_gelu * up)
    torch.testing.assert_close(apply_activation(h, "gelu_tanh"), tanh_gelu * up)
    torch.testing.assert_close(apply_activation(h, "relu2"), torch.where(h > 0, h * h, torch.zeros_like(h)))
    assert not torch.allclose(apply_activation(h, "gelu"), apply_activation(h, "gelu_tanh"), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------- whole-layer checks
def _problem(tokens, inter, hidden, experts, activation, seed):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * inter if activation != "relu2" else inter
    w13 = torch.randn(experts, rows, hidden, generator=g) / 10
    w2 = torch.randn(experts, hidden, inter, generator=g) / 10
    x = (torch.randn(tokens, hidden, generator=g) / 10).bfloat16()
    logits = torch.randn(tokens, experts, generator=g)
    return x, logits, quantize_nvfp4_experts(w13), quantize_nvfp4_experts(w2)


def _fp64_moe(x, logits, q13, q2, top_k, activation, quantize_input_gs=None, bf16_intermediate=False,
              quantize_intermediate_gs=None, amax_out=None):
    """Dense per-token float64 MoE over dequantized weights, renormalize routing computed from scratch.

    Activations are rounded through NVFP4 (by the quantizer that test_nvfp4 checks against its own fp64
    model) only where a global scale is given; ``amax_out`` collects the intermediate's amax.
    """
    x = x.double()
    if quantize_input_gs is not None:
        p, s, gs = quantize_nvfp4(x.float(), quantize_input_gs)
        x = dequantize_nvfp4(p, s, gs).double()
    w13 = dequantize_nvfp4_experts(*q13).double()
    w2 = dequantize_nvfp4_experts(*q2).double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        top = torch.topk(logits[t].double(), top_k)
        weights = torch.softmax(top.values, dim=0)
        for e, wt in zip(top.indices.tolist(), weights.tolist()):
            h = w13[e] @ x[t]
            if activation == "relu2":
                a = torch.relu(h) ** 2
            else:
                gate, up = h.chunk(2)
                a = (gate / (1 + torch.exp(-gate))) * up
            if amax_out is not None:
                amax_out.append(a.abs().max().item())
            if bf16_intermediate:
                a = a.bfloat16().double()
            if quantize_intermediate_gs is not None:
                p, s, gs = quantize_nvfp4(a.float().unsqueeze(0), quantize_intermediate_gs)
                a = dequantize_nvfp4(p, s, gs).double()[0]
            out[t] += wt * (w2[e] @ a)
    return out


@pytest.mark.parametrize("m, n, k", [(2, 1024, 1024), (64, 2048, 1536), (64, 704, 4096)])
def test_reference_at_vllm_shapes(m, n, k):
    """vLLM's kernel-test shapes (tokens m, intermediate n, hidden k) and tolerance (atol = rtol = 0.1).

    The fp64 model applies the same NVFP4 roundings (input and intermediate, same static global scales)
    and does everything else in float64, so vLLM's tolerance is loose here; the relative bound of 1e-2
    is the real check (fp32 accumulation and rare rounding-boundary flips are all that may differ).
    """
    x, logits, q13, q2 = _problem(m, n, k, experts=4, activation="silu", seed=m + n + k)
    gs_in = 448 * 6 / x.float().abs().max()
    amax = []
    _fp64_moe(x, logits, q13, q2, 2, "silu", quantize_input_gs=gs_in, amax_out=amax)
    gs_mid = torch.tensor(448 * 6 / max(amax), dtype=torch.float32)
    got = fused_moe_reference(x, logits, *q13, *q2, top_k=2, activation="silu", routing="renormalize",
                              input_global_scale=gs_in, intermediate_global_scale=gs_mid).double()
    want = _fp64_moe(x, logits, q13, q2, 2, "silu", quantize_input_gs=gs_in, quantize_intermediate_gs=gs_mid)
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.1)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-2, rel
    # And NVFP4 activations versus none at all: about 9% relative noise per rounding (one mantissa bit
    # under a shared e4m3 scale), two roundings; a wrong activation or layout gives errors of order 1.
    unquantized = _fp64_moe(x, logits, q13, q2, 2, "silu")
    assert ((got - unquantized).norm() / unquantized.norm()).item() < 0.25
    assert want.abs().max() > 1e-2  # never a comparison of near-zeros


@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_bf16_activation_mode_matches_fp64(activation):
    x, logits, q13, q2 = _problem(16, 128, 512, experts=8, activation=activation, seed=7)
    got = fused_moe_reference(x, logits, *q13, *q2, top_k=3, activation=activation,
                              quantize_activations=False).double()
    want = _fp64_moe(x, logits, q13, q2, 3, activation, bf16_intermediate=True)
    # Only fp32 accumulation and the bf16 output rounding separate the two.
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)


def test_quantized_input_matches_fp64_with_same_input_rounding():
    x, logits, q13, q2 = _problem(8, 128, 512, experts=4, activation="silu", seed=3)
    gs = torch.tensor(448 * 6 / 0.5)
    got = fused_moe_reference(x, logits, *q13, *q2, top_k=2, input_global_scale=gs).double()
    want = _fp64_moe(x, logits, q13, q2, 2, "silu", quantize_input_gs=gs)
    # Remaining difference: the NVFP4 rounding of the intermediate (relative error well under 10%).
    assert ((got - want).norm() / want.norm()).item() < 0.1


def test_every_activation_and_routing_runs_and_differs():
    x, logits, q13, q2 = _problem(12, 64, 256, experts=8, activation="silu", seed=11)
    outs = {}
    for act in ("silu", "gelu", "gelu_tanh"):
        for routing in ("default", "renormalize", "deepseek_v3"):
            outs[act, routing] = fused_moe_reference(x, logits, *q13, *q2, top_k=2, activation=act, routing=routing,
                                                     routing_bias=torch.randn(8) * 0.1, n_group=2, topk_group=1,
                                                     routed_scaling_factor=2.0)
    values = list(outs.values())
    assert all(v.shape == (12, 256) and v.dtype == torch.bfloat16 and v.float().abs().sum() > 0 for v in values)
    assert len({v.float().sum().item() for v in values}) == len(values)


@settings(max_examples=12, deadline=None)
@given(hidden=st.sampled_from([64, 80, 200, 336]), inter=st.sampled_from([16, 48, 64]),
       tokens=st.integers(1, 9), act=st.sampled_from(["silu", "gelu", "relu2"]), seed=st.integers(0, 10_000))
def test_padded_weights_give_identical_output(hidden, inter, tokens, act, seed):
    """Zero-padding weights along hidden (and the activations with them) changes nothing, bit for bit."""
    hidden16 = -(-hidden // 16) * 16
    x, logits, q13, q2 = _problem(tokens, inter, hidden16, experts=4, activation=act, seed=seed)
    x = x[:, :hidden16]
    gs_in, gs_mid = torch.tensor(448 * 6 / 0.6), torch.tensor(448 * 6 / 0.3)
    kwargs = dict(top_k=2, activation=act, input_global_scale=gs_in, intermediate_global_scale=gs_mid)
    plain = fused_moe_reference(x, logits, *q13, *q2, **kwargs)
    p13, ps13, p2, ps2, hp = align_hidden_dim(q13[0], q13[1], q2[0], q2[1], alignment=256)
    padded = fused_moe_reference(x, logits, p13, ps13, q13[2], p2, ps2, q2[2], **kwargs)
    assert hp % 256 == 0 and padded.shape == (tokens, hidden16)
    assert torch.equal(plain, padded)


def test_reference_input_errors():
    x, logits, q13, q2 = _problem(4, 64, 256, experts=4, activation="silu", seed=0)
    with pytest.raises(MoEConfigError, match="wide but the weights only"):
        fused_moe_reference(torch.randn(4, 512).bfloat16(), logits, *q13, *q2, top_k=2)
    with pytest.raises(MoEConfigError, match="router_logits shape"):
        fused_moe_reference(x, logits[:, :3], *q13, *q2, top_k=2)
    with pytest.raises(MoEConfigError, match="rows"):
        fused_moe_reference(x, logits, *q13, *q2, top_k=2, activation="relu2")


def test_zero_tokens_with_dynamic_scales_give_an_empty_output():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w13 = quantize_nvfp4_experts(torch.randn(4, 64, 256, generator=g))
    w2 = quantize_nvfp4_experts(torch.randn(4, 256, 32, generator=g))
    out = fused_moe_reference(torch.zeros(0, 256).bfloat16(), torch.zeros(0, 4), *w13, *w2, top_k=2)
    assert out.shape == (0, 256) and out.dtype == torch.bfloat16
