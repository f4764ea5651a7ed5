"""ModelOpt-layout NVFP4 checkpoints: write from float weights, load into FusedMoE without float."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("safetensors")

from moe_passes import FusedMoE  # noqa: E402
from moe_passes.errors import MoEConfigError  # noqa: E402
from moe_passes.integrations import checkpoint  # noqa: E402
from moe_passes.integrations.checkpoint import (load_modelopt_moe, modelopt_expert_tensors,  # noqa: E402
                                                save_modelopt_experts)
from moe_passes.kernels import nvfp4  # noqa: E402
from moe_passes.kernels.reference import apply_activation  # noqa: E402

# H = 208 pads to 256 at load (TRTLLM alignment); I = 80 pads to 128 (gated alignment 64).
E, I, H = 4, 80, 208
FIELDS = ("w13", "w13_scale", "w13_global_scale", "w2", "w2_scale", "w2_global_scale")
FP32_ULP = 2.0 ** -23


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _weights(seed, gated=True):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, generator=gen) * 0.1
    if gated:
        w13[:, I:] *= 3.0  # up rows larger than gate rows: separate per-projection scales really differ
    w2 = torch.randn(E, H, I, generator=gen) * 0.1
    return w13, w2, gen


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _amaxes(layer: FusedMoE):
    # ModelOpt stores activation amax / (448*6); the float layer's static scales are 448*6 / amax.
    return 2688.0 / layer.input_global_scale, 2688.0 / layer.intermediate_global_scale


@pytest.mark.parametrize("names", checkpoint.PROJECTION_NAMES)
def test_checkpoint_loads_equal_to_the_layer_built_from_the_same_float_weights(tmp_path, monkeypatch, names):
    w13, w2, gen = _weights(0)
    calib = torch.randn(64, H, generator=gen)
    built = FusedMoE.from_float(w13, w2, top_k=2, calibration=calib)
    in_amax, mid_amax = _amaxes(built)
    path = tmp_path / "experts.safetensors"
    save_modelopt_experts(path, {"model.layers.0.mlp.experts": (w13, w2)}, names=names,
                          input_amax=in_amax, intermediate_amax=mid_amax)

    def no_float(*args, **kwargs):
        raise AssertionError("the loader must not quantize or dequantize")
    for fn in ("quantize_nvfp4", "dequantize_nvfp4", "quantize_nvfp4_experts", "dequantize_nvfp4_experts"):
        monkeypatch.setattr(nvfp4, fn, no_float)
        monkeypatch.setattr(checkpoint, fn, no_float, raising=False)
    loaded = load_modelopt_moe(path, "model.layers.0.mlp.experts", top_k=2)
    monkeypatch.undo()

    assert loaded.hidden_size == H and loaded.kernel_shape.hidden_padded == 256
    assert loaded.kernel_shape.intermediate_padded == 128
    for f in FIELDS:
        a, b = getattr(loaded, f), getattr(built, f)
        assert a.shape == b.shape and a.dtype == b.dtype, f
        if f.endswith("global_scale"):
            # The checkpoint stores amax/2688, the float path computes 2688/amax: one fp32 rounding apart.
            torch.testing.assert_close(a, b, rtol=2 * FP32_ULP, atol=0)
        else:
            assert torch.equal(_bytes(a), _bytes(b)), f
    for a, b in zip(loaded.kernel_weights(), built.kernel_weights()):  # padded kernel copies too
        assert torch.equal(_bytes(a), _bytes(b)) if a.dtype != torch.float32 else torch.allclose(a, b, rtol=1e-6)
    torch.testing.assert_close(loaded.input_global_scale, built.input_global_scale, rtol=2 * FP32_ULP, atol=0)
    torch.testing.assert_close(loaded.intermediate_global_scale, built.intermediate_global_scale,
                               rtol=2 * FP32_ULP, atol=0)

    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    logits = torch.randn(16, E, generator=gen)
    out_loaded, out_built = loaded(x, logits), built(x, logits)
    assert out_built.abs().amax() > 0
    torch.testing.assert_close(out_loaded, out_built, rtol=0, atol=0)


def _expert_fn(w13, w2, x, activation="silu"):
    return torch.stack([apply_activation(x @ w13[e].t(), activation) @ w2[e].t() for e in range(w13.shape[0])])


def test_separate_gate_and_up_scales_load_exactly():
    """Gate and up quantized with their own weight_scale_2: the loader keeps every byte, uses the gate's
    global scale for w13 and folds c = ws_gate / ws_up into w2's global scale.  Through the expert
    (act(gate) * up, then down) the loaded weights compute what the checkpoint's weights compute,
    up to fp32 rounding of the folded scalar and the matmuls."""
    w13, w2, gen = _weights(1)
    xb = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    mid_amax = max(float(apply_activation(xb.float() @ w13[e].t(), "silu").abs().amax()) for e in range(E))
    tensors = modelopt_expert_tensors("experts", w13, w2, fused_gate_up_scale=False,
                                      input_amax=xb.float().abs().amax(), intermediate_amax=mid_amax)
    ws = {p: torch.stack([tensors[f"experts.{e}.{p}.weight_scale_2"] for e in range(E)])
          for p in ("gate_proj", "up_proj", "down_proj")}
    assert not torch.allclose(ws["gate_proj"], ws["up_proj"], rtol=0.5)  # they really differ (~3x)
    layer = load_modelopt_moe(tensors, "experts", top_k=2)

    def deq(p, e):
        return nvfp4.dequantize_nvfp4(tensors[f"experts.{e}.{p}.weight"], tensors[f"experts.{e}.{p}.weight_scale"],
                                      1.0 / tensors[f"experts.{e}.{p}.weight_scale_2"])
    ck13 = torch.stack([torch.cat([deq("gate_proj", e), deq("up_proj", e)]) for e in range(E)]).double()
    ck2 = torch.stack([deq("down_proj", e) for e in range(E)]).double()
    ld13 = nvfp4.dequantize_nvfp4_experts(layer.w13, layer.w13_scale, layer.w13_global_scale).double()
    ld2 = nvfp4.dequantize_nvfp4_experts(layer.w2, layer.w2_scale, layer.w2_global_scale).double()
    assert torch.equal(ld13[:, :I], ck13[:, :I])  # gate half: bit-identical values
    x = torch.randn(32, H, generator=gen).double()
    want, got = _expert_fn(ck13, ck2, x), _expert_fn(ld13, ld2, x)
    assert want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().amax()))
    # The static intermediate scale covers the rescaled intermediate of every expert (no saturation).
    c = ws["gate_proj"] / ws["up_proj"]
    torch.testing.assert_close(layer.intermediate_global_scale, 1.0 / (c * (mid_amax / 2688.0)).max())

    # End to end, the layer agrees with a float MoE on the checkpoint's weights within NVFP4 activation
    # rounding (two roundings of ~9% RMS each; see tests/test_integrations_transformers.py).
    logits = torch.randn(16, E, generator=gen)
    weights, ids = torch.topk(logits, 2, dim=-1)
    weights = torch.softmax(weights, dim=-1).double()
    per_expert = _expert_fn(ck13, ck2, xb.double())
    ref = sum(weights[:, k, None] * per_expert[ids[:, k], torch.arange(16)] for k in range(2))
    out = layer(xb, logits).double()
    err = float((out - ref).norm() / ref.norm())
    print(f"separate gate/up scales: layer vs float MoE on the checkpoint's weights: rel err {err:.4f}")
    assert err < 0.25


def test_relu2_experts_and_padded_hidden_size():
    w13, w2, gen = _weights(2, gated=False)
    tensors = modelopt_expert_tensors("experts", w13, w2, activation="relu2", input_amax=4.0, intermediate_amax=4.0)
    assert not any(".gate_proj." in k for k in tensors)
    built = FusedMoE.from_float(w13, w2, top_k=2, activation="relu2")
    loaded = load_modelopt_moe(tensors, "experts", top_k=2, activation="relu2", hidden_size=200)
    assert loaded.hidden_size == 200 and loaded.kernel_shape.hidden_padded == 256
    for f in ("w13", "w13_scale", "w2", "w2_scale"):
        assert torch.equal(_bytes(getattr(loaded, f)), _bytes(getattr(built, f))), f
    out = loaded(torch.randn(4, 200, generator=gen).to(torch.bfloat16), torch.randn(4, E, generator=gen))
    assert out.shape == (4, 200) and out.abs().amax() > 0


def test_malformed_checkpoints_are_rejected_with_the_key():
    w13, w2, _ = _weights(3)
    tensors = modelopt_expert_tensors("experts", w13, w2)
    with pytest.raises(MoEConfigError, match="no ModelOpt NVFP4 experts under 'nope'"):
        load_modelopt_moe(tensors, "nope", top_k=2)
    broken = dict(tensors)
    broken["experts.1.up_proj.weight_scale"] = broken["experts.1.up_proj.weight_scale"].float()
    with pytest.raises(MoEConfigError, match=r"experts\.1\.up_proj\.weight_scale must be float8_e4m3fn"):
        load_modelopt_moe(broken, "experts", top_k=2)
    missing = {k: v for k, v in tensors.items() if k != "experts.2.down_proj.input_scale"}
    with pytest.raises(MoEConfigError, match=r"no tensor 'experts\.2\.down_proj\.input_scale'"):
        load_modelopt_moe(missing, "experts", top_k=2)
    gap = {k: v for k, v in tensors.items() if not k.startswith("experts.1.")}  # would load expert 0 alone
    with pytest.raises(MoEConfigError, match=r"experts\.1\.down_proj\.weight is missing but expert 3"):
        load_modelopt_moe(gap, "experts", top_k=1)
    for bad, why in ((torch.tensor([1e-3, 1e-3]), "one value each"), (torch.tensor(float("inf")), "finite"),
                     (torch.tensor(float("nan")), "finite"), (torch.tensor(0.0), "positive")):
        broken = dict(tensors, **{"experts.2.gate_proj.weight_scale_2": bad})
        with pytest.raises(MoEConfigError, match=rf"experts\.2\.gate_proj: .*{why}"):
            load_modelopt_moe(broken, "experts", top_k=2)
    other = modelopt_expert_tensors("experts", w13[:, :, :H - 16], w2[:, :H - 16])
    uneven = dict(tensors, **{k: v for k, v in other.items() if k.startswith("experts.3.")})
    with pytest.raises(MoEConfigError, match="expert 3 under 'experts'"):
        load_modelopt_moe(uneven, "experts", top_k=2)
    # A gated checkpoint read as ungated would silently drop its gate projection.
    with pytest.raises(MoEConfigError, match="gate projection .* not gated"):
        load_modelopt_moe(tensors, "experts", top_k=2, activation="relu2")


def test_separate_gate_and_up_scales_are_refused_where_up_is_not_linear():
    """swiglu_oai clamps up and adds 1: the gate/up scale ratio cannot be folded into w2 there, so split scales
    are refused; one shared scale loads."""
    w13, w2, _ = _weights(4)
    split = modelopt_expert_tensors("experts", w13, w2, fused_gate_up_scale=False)
    with pytest.raises(MoEConfigError, match="'swiglu_oai' is not linear in up"):
        load_modelopt_moe(split, "experts", top_k=2, activation="swiglu_oai")
    shared = modelopt_expert_tensors("experts", w13, w2)
    assert load_modelopt_moe(shared, "experts", top_k=2, activation="swiglu_oai").activation == "swiglu_oai"


def test_sparsemixer_layer_loads_with_its_jitter_eps():
    """A PhiMoE-style layer from a checkpoint: the routing and its parameter are constructor keywords, and the
    loaded layer routes and computes as the one built from the same floats (its output against that layer's on
    fresh inputs, and a different jitter_eps changes the output, so the parameter really arrives)."""
    from moe_passes.contract import SparseMixer

    w13, w2, gen = _weights(3)
    routing = dict(top_k=2, routing="sparsemixer", routing_params=SparseMixer(0.3))
    built = FusedMoE.from_float(w13, w2, calibration=torch.randn(64, H, generator=gen), **routing)
    in_amax, mid_amax = _amaxes(built)
    tensors = modelopt_expert_tensors("experts", w13, w2, input_amax=in_amax, intermediate_amax=mid_amax)
    loaded = load_modelopt_moe(tensors, "experts", **routing)
    assert loaded.routing == "sparsemixer" and list(loaded.routing_params) == [0.3]
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    logits = torch.randn(16, E, generator=gen)
    with torch.no_grad():
        out = loaded(x, logits)
        torch.testing.assert_close(out, built(x, logits), rtol=0, atol=0)
        other = load_modelopt_moe(tensors, "experts", top_k=2, routing="sparsemixer",
                                  routing_params=SparseMixer(0.0))(x, logits)
    assert not torch.equal(out, other)
    with pytest.raises(MoEConfigError, match="jitter_eps"):
        load_modelopt_moe(tensors, "experts", top_k=2, routing="sparsemixer")
