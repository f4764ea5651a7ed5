"""The shape contract: padding, alignments, chunk sizes."""

import warnings

import pytest
import torch

from moe_passes import contract
from moe_passes.contract import (MoEShape, PerformanceWarning, align_hidden_dim, intermediate_alignment,
                                 trtllm_chunk_size)
from moe_passes.errors import MoEConfigError
from moe_passes.kernels.nvfp4 import dequantize_nvfp4_experts, quantize_nvfp4_experts


def _weights(experts, hidden, inter, gated=True):
    w13 = torch.randn(experts, (2 if gated else 1) * inter, hidden) / 10
    w2 = torch.randn(experts, hidden, inter) / 10
    return quantize_nvfp4_experts(w13), quantize_nvfp4_experts(w2)


def test_pad_2688_to_2816_preserves_values_and_warns_once(monkeypatch):
    monkeypatch.setattr(contract, "_warned_pads", set())
    (q13, s13, g13), (q2, s2, g2) = _weights(2, 2688, 64)
    with pytest.warns(PerformanceWarning, match="2688 -> 2816"):
        p13, ps13, p2, ps2, hp = align_hidden_dim(q13, s13, q2, s2, alignment=256)
    assert hp == 2816
    assert p13.shape == (2, 128, 1408) and ps13.shape == (2, 128, 176)
    assert p2.shape == (2, 2816, 32) and ps2.shape == (2, 2816, 4)
    d13 = dequantize_nvfp4_experts(p13, ps13, g13)
    d2 = dequantize_nvfp4_experts(p2, ps2, g2)
    assert torch.equal(d13[..., :2688], dequantize_nvfp4_experts(q13, s13, g13)) and not d13[..., 2688:].any()
    assert torch.equal(d2[:, :2688], dequantize_nvfp4_experts(q2, s2, g2)) and not d2[:, 2688:].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align_hidden_dim(q13, s13, q2, s2, alignment=256)  # second time: silent


def test_no_op_when_aligned():
    (q13, s13, _), (q2, s2, _) = _weights(2, 2816, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = align_hidden_dim(q13, s13, q2, s2, alignment=256)
    assert out[0] is q13 and out[1] is s13 and out[2] is q2 and out[3] is s2 and out[4] == 2816


def test_align_rejects_inconsistent_weights():
    (q13, s13, _), (q2, s2, _) = _weights(1, 256, 32)
    with pytest.raises(MoEConfigError, match="disagree on the hidden size"):
        align_hidden_dim(q13, s13, q2[:, :128], s2[:, :128])
    with pytest.raises(MoEConfigError, match="float8_e4m3fn"):
        align_hidden_dim(q13, s13.float(), q2, s2)
    with pytest.raises(MoEConfigError, match="multiple of 16"):
        align_hidden_dim(q13, s13, q2, s2, alignment=100)


@pytest.mark.parametrize("experts, top_k, expected", [(128, 6, 300_000), (512, 22, 300_000), (40, 40, 209_588)])
def test_chunk_sizes(experts, top_k, expected):
    # By hand: (E + (65535 - E + 1) * 128 - 1) // top_k, capped at 300k.
    # (128, 6): 8372351 // 6 = 1395391 -> cap;  (512, 22): 8323583 // 22 = 378344 -> cap;
    # (40, 40): 8383527 // 40 = 209588.
    assert trtllm_chunk_size(experts, top_k) == expected


def test_chunk_size_bounds_grid():
    def ctas(experts, top_k, tokens):
        return min(experts, tokens * top_k) + max(0, tokens * top_k - experts) // 128

    # The largest token count within grid.Y (or the cap), also for more experts than grid.Y has rows.
    for experts, top_k in [(8, 2), (40, 40), (256, 8), (512, 22), (65534, 8), (65535, 8), (70000, 8), (70000, 1)]:
        t = trtllm_chunk_size(experts, top_k)
        assert 0 < t <= 300_000 and ctas(experts, top_k, t) <= 65535
        assert t == 300_000 or ctas(experts, top_k, t + 1) > 65535
    with pytest.raises(MoEConfigError):
        trtllm_chunk_size(4, 5)


def test_intermediate_alignment():
    assert intermediate_alignment("silu") == 64 and intermediate_alignment("gelu") == 64
    assert intermediate_alignment("relu2") == 128
    s = MoEShape(hidden=2688, intermediate=1856, experts=128, top_k=6, activation="relu2")
    assert (s.hidden_padded, s.intermediate_padded, s.w13_rows) == (2816, 1920, 1920)
    g = MoEShape(hidden=2048, intermediate=768, experts=128, top_k=8, activation="silu")
    assert (g.hidden_padded, g.intermediate_padded, g.w13_rows, g.needs_hidden_pad) == (2048, 768, 1536, False)
    assert g.weight_shapes()["w2_scale"] == (128, 2048, 48)


@pytest.mark.parametrize("kwargs, match", [
    (dict(top_k=9, experts=8), "exceeds the number of experts"),
    (dict(activation="swish"), "unknown activation"),
    (dict(hidden=0), "positive int"),
])
def test_shape_errors(kwargs, match):
    base = dict(hidden=256, intermediate=64, experts=8, top_k=2, activation="silu")
    base.update(kwargs)
    with pytest.raises(MoEConfigError, match=match):
        MoEShape(**base)


def test_intermediate_alignment_and_gated_bias_halves_are_checked():
    """A direct call with an alignment that is not whole NVFP4 blocks (its scales would not cover the padded
    columns), w13 rows that do not fit the activation, or a gated bias of odd width is a MoEConfigError."""
    q13, s13, _ = quantize_nvfp4_experts(torch.randn(1, 64, 64))
    q2, s2, _ = quantize_nvfp4_experts(torch.randn(1, 64, 32))
    with pytest.raises(MoEConfigError, match="positive multiple of 16"):
        contract.align_intermediate_dim(q13, s13, q2, s2, gated=True, alignment=24)
    with pytest.raises(MoEConfigError, match="expected 32 rows"):
        contract.align_intermediate_dim(q13, s13, q2, s2, gated=False, alignment=64)
    with pytest.raises(MoEConfigError, match="gate half and an up half"):
        contract.align_biases(torch.zeros(1, 33), None, gated=True, intermediate_padded=64, hidden_padded=64)
