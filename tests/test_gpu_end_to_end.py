"""The whole product on a CUDA GPU: layer moved to the GPU, kernel chosen by the registry, compiled by the backend.

Skipped without CUDA.  On Hopper the registry picks the Triton kernel (alignment 16: hidden 2688 needs
no pad, so the graph has no pad/slice); the reference kernel on the GPU keeps the TRTLLM alignment.
"""

import warnings

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE
from moe_passes.kernels import registry
from moe_passes.kernels.reference import fused_moe_reference
from moe_passes.ops import KERNEL_OP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
warnings.filterwarnings("ignore", category=UserWarning)

E, H, I = 16, 2688, 256


class Block(nn.Module):
    def __init__(self, seed=0, kernel=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate = nn.Linear(H, E, bias=False)
        shared = nn.Sequential(nn.Linear(H, 512, bias=False), nn.ReLU(), nn.Linear(512, H, bias=False))
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, H, generator=g) / H ** 0.5)
        self.moe = FusedMoE.from_float(torch.randn(E, I, H, generator=g) / H ** 0.5,
                                       torch.randn(E, H, I, generator=g) / I ** 0.5, top_k=4, activation="relu2",
                                       routing="deepseek_v3", routing_bias=torch.randn(E, generator=g) * 0.1,
                                       n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                       shared_expert=shared.to(torch.bfloat16),
                                       calibration=torch.randn(64, H, generator=g), kernel=kernel)
        self.requires_grad_(False)

    def forward(self, x):
        return self.moe(x, self.gate(x.float()))


def _expected(block, x):
    m = block.moe
    routed = fused_moe_reference(
        x, block.gate(x.float()), *m.canonical_weights(), top_k=m.top_k, activation=m.activation, routing=m.routing,
        input_global_scale=m.input_global_scale, intermediate_global_scale=m.intermediate_global_scale,
        routing_bias=m.routing_bias, n_group=m.n_group, topk_group=m.topk_group,
        routed_scaling_factor=m.routed_scaling_factor,
        quantize_activations=registry.get(m.kernel).quantizes_activations)
    return routed.float() + m.shared_expert(x).float()


def _graphs(block, inner):
    graphs = []

    def observer(stage, name, gm):
        if stage == "after" and name == "verify_moe_shapes":
            graphs.append(gm)

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="moe_nvfp4", dynamic=True, options={"inner": inner, "observers": [observer]})
    return compiled, graphs


@pytest.mark.parametrize("inner", ["inductor", "eager"])
def test_layer_on_gpu_compiles_and_matches(inner):
    block = Block().cuda()
    major, _ = torch.cuda.get_device_capability()
    if major == 9:
        assert block.moe.kernel == "triton"
    assert block.moe.kernel_weights().w13.is_cuda
    if block.moe.kernel == "triton":  # the Triton layout: same shapes, other byte order than the canonical copy
        kernel, canonical = block.moe.kernel_weights(), block.moe.canonical_weights()
        assert kernel.w13.shape == canonical.w13.shape and not torch.equal(kernel.w13, canonical.w13)
    compiled, graphs = _graphs(block, inner)
    with torch.no_grad():
        for tokens in (7, 1, 300):
            x = torch.randn(tokens, H, device="cuda").bfloat16()
            got, eager, want = compiled(x).float(), block(x).float(), _expected(block, x)
            scale = want.abs().max().item()
            assert scale > 0.1 and torch.isfinite(got).all()
            torch.testing.assert_close(got, eager, atol=2 ** -6 * scale, rtol=2 ** -6)
            torch.testing.assert_close(got, want, atol=2 ** -5 * scale, rtol=2 ** -5)
    assert len(graphs) == 2  # 7 and 300 tokens share the dynamic graph; Dynamo gives one token its own
    nodes = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    kernels = [n for n in nodes if n.target is KERNEL_OP]
    assert len(kernels) == 1
    padded = any(n.target is torch.ops.aten.constant_pad_nd.default for n in nodes)
    assert padded == (block.moe.kernel_shape.hidden_padded != H)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_another_gpu_than_the_current_one_runs_there():
    """A model split over GPUs (device_map) calls layers on cuda:1 while cuda:0 is current: Triton launches on
    the current device, so the op must switch to the tensors' device."""
    block = Block(seed=3).to("cuda:1")
    with torch.no_grad(), torch.cuda.device(0):
        for tokens in (1, 7, 300):
            x = torch.randn(tokens, H, device="cuda:1").bfloat16()
            got, want = block(x).float(), _expected(block, x)
            torch.testing.assert_close(got, want, atol=2 ** -5 * want.abs().max().item(), rtol=2 ** -5)


def test_moving_between_devices_reprepares_for_each_kernel():
    block = Block(seed=1)
    assert block.moe.kernel == "reference" and block.moe.kernel_shape.hidden_padded == 2816
    block.cuda()
    on_gpu = block.moe.kernel
    if torch.cuda.get_device_capability()[0] == 9:
        assert on_gpu == "triton" and block.moe.kernel_shape.hidden_padded == 2688
    block.cpu()
    assert block.moe.kernel == "reference" and block.moe.kernel_shape.hidden_padded == 2816
    assert not block.moe.kernel_weights().w13.is_cuda


def test_reference_kernel_on_gpu_pads_like_trtllm():
    block = Block(seed=2, kernel="reference").cuda()
    assert block.moe.kernel == "reference" and block.moe.kernel_shape.hidden_padded == 2816
    compiled, graphs = _graphs(block, "inductor")
    with torch.no_grad():
        x = torch.randn(33, H, device="cuda").bfloat16()
        got, want = compiled(x).float(), _expected(block, x)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, atol=2 ** -5 * scale, rtol=2 ** -5)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.constant_pad_nd.default in targets and torch.ops.aten.slice.Tensor in targets
