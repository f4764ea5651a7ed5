"""The kernels' local-expert support (expert parallelism) without a process group: the outputs of every
expert block, each computed with ``local_expert_offset`` / ``global_num_experts`` on the global router
logits, sum to the unsharded layer's output.  The reference on the CPU; the registry's GPU kernel (Triton on
Hopper, TRTLLM on Blackwell) where there is a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moe_passes import FusedMoE
from moe_passes.ops import KERNEL_OP
from moe_passes.parallel import expert_block

DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()
ROUTINGS = {"default": {}, "renormalize": {}, "llama4": {},
            "deepseek_v3": dict(n_group=4, topk_group=2, routed_scaling_factor=2.5)}


def _layer(device, activation, routing, experts=8, hidden=64, inter=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(experts, (1 if activation == "relu2" else 2) * inter, hidden, generator=g) / 8
    w2 = torch.randn(experts, hidden, inter, generator=g) / 8
    bias = torch.randn(experts, generator=g) / 4 if routing == "deepseek_v3" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FusedMoE.from_float(w13.to(device), w2.to(device), top_k=1 if routing == "llama4" else 2,
                                   activation=activation, routing=routing, routing_bias=bias,
                                   calibration=torch.randn(32, hidden, generator=g).to(device), **ROUTINGS[routing])


def _kernel(layer, x, logits, weights, offset=0, total=None):
    hp = weights.w2.shape[1]
    xp = torch.nn.functional.pad(x, (0, hp - x.shape[1]))
    return KERNEL_OP(xp, logits, *weights, layer.input_global_scale, layer.intermediate_global_scale,
                     layer.routing_bias, layer.top_k, layer.activation, layer.routing, layer.n_group, layer.topk_group,
                     layer.routed_scaling_factor, layer.kernel, "", offset, total, "", False)[:, :x.shape[1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_expert_blocks_sum_to_the_layer(device, activation, routing, ranks=3):
    layer = _layer(device, activation, routing)
    experts = layer.kernel_weights().w13.shape[0]
    g = torch.Generator().manual_seed(ranks)
    for tokens in (1, 7, 300):
        x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16).to(device)
        logits = torch.randn(tokens, experts, generator=g).to(device)
        with torch.no_grad():
            full = _kernel(layer, x, logits, layer.kernel_weights())
            parts = []
            for rank in range(ranks):  # 8 experts over 3 ranks: uneven blocks of 3, 3, 2
                offset, count = expert_block(experts, ranks, rank)
                local = type(layer.kernel_weights())(*(t[offset:offset + count] for t in layer.kernel_weights()))
                parts.append(_kernel(layer, x, logits, local, offset, experts))
        total = torch.stack([p.float() for p in parts]).sum(0)
        err = ((total - full.float()).norm() / full.float().norm()).item()
        assert err < 1e-2, f"{tokens} tokens: the expert blocks sum to {err:.2e} relative error"
        # Every block really computes only its own experts: no block alone is the layer's output (with 300
        # tokens every block is routed to).
        assert tokens < 300 or all(((p.float() - full.float()).norm() / full.float().norm()).item() > 0.1 for p in parts)
