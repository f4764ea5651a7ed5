"""Random NVFP4 expert weights for the kernel tests (shared by the Triton and CUDA decode tests)."""

from __future__ import annotations

import torch

from moe_passes.contract import is_gated
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import quantize_nvfp4_experts


def make_layer(hidden, inter, experts, activation, device, seed) -> registry.MoEWeights:
    """Canonical NVFP4 ``w13 [E, (2)I, H]`` and ``w2 [E, H, I]`` from N(0, 0.01) floats, seeded."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n1 = (2 if is_gated(activation) else 1) * inter
    w13 = torch.randn(experts, n1, hidden, generator=g) / 10
    w2 = torch.randn(experts, hidden, inter, generator=g) / 10
    return registry.MoEWeights(*quantize_nvfp4_experts(w13.to(device)), *quantize_nvfp4_experts(w2.to(device)))
