"""Calls above ``graph_tokens`` repeat their recorded launches (``KernelSpec.replay``, ``triton_launch.Replay``) and
equal direct kernel calls bit for bit, on fresh inputs every call, on every variant the planner picks between
65 and 2048 tokens; calls whose launches cannot be repeated (expert parallelism computes with torch between
launches), inputs at another alignment and installed launch hooks run the kernel itself.  Skipped without CUDA
or Triton."""

import dataclasses
import warnings

import pytest
import torch

from moe_passes import FusedMoE
from moe_passes.kernels import graphed, registry

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
triton = pytest.importorskip("triton")
from moe_passes.kernels import triton_launch  # noqa: E402

replays = pytest.mark.skipif(triton_launch.JITFunction is None, reason="this Triton release launches through fn[grid]")
warnings.filterwarnings("ignore", category=UserWarning)

E, H, I = 16, 1024, 256


def _layer(seed: int, **kw) -> FusedMoE:
    g = torch.Generator().manual_seed(seed)
    experts = kw.pop("experts", E)
    gated = kw.get("activation", "silu") != "relu2"
    moe = FusedMoE.from_float(torch.randn(experts, (2 if gated else 1) * I, H, generator=g) / H ** 0.5,
                              torch.randn(experts, H, I, generator=g) / 16, top_k=4,
                              calibration=torch.randn(32, H, generator=g), **kw).cuda().requires_grad_(False)
    assert moe.kernel == "triton"
    return moe


def _run(moe: FusedMoE, graphs, x, logits):
    spec = registry.get(moe.kernel)
    scales = (moe.input_global_scale, moe.intermediate_global_scale, moe.routing_bias)
    biases = {k: v for k, v in moe._bias_args().items() if k in ("w13_bias", "w2_bias") and v is not None}
    if graphs is None:
        return spec.run(x, logits, moe.kernel_weights(), *scales, moe._run_args(), **biases)
    return graphs.run(spec.run, spec.name, x, logits, moe.kernel_weights(), scales, moe._run_args(), biases,
                      spec.replay, capture=False)


LAYERS = {
    "silu": dict(),
    "relu2": dict(activation="relu2"),
    "deepseek": dict(experts=32, routing="deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                     routing_bias=torch.randn(32, generator=torch.Generator().manual_seed(5))),
    "gpt-oss": dict(activation="swiglu_oai", w13_bias=torch.randn(E, 2 * I, generator=torch.Generator().manual_seed(6)),
                    w2_bias=torch.randn(E, H, generator=torch.Generator().manual_seed(7))),
}


@replays
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_replays_equal_direct_calls(layer):
    moe = _layer(len(layer), **LAYERS[layer])
    graphs = graphed.CallGraphs()
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    experts = moe.kernel_weights().w13.shape[0]
    for tokens in (65, 100, 300, 2048):
        for _ in range(4):  # warm, record and replay, replay, replay
            x = torch.randn(tokens, H, device="cuda", generator=g).bfloat16()
            logits = torch.randn(tokens, experts, device="cuda", generator=g).to(torch.bfloat16 if tokens % 2 else
                                                                               torch.float32)
            got = _run(moe, graphs, x, logits)
            assert torch.equal(got, _run(moe, None, x, logits)), tokens
        entry = next(reversed(graphs._repeats.values()))
        assert isinstance(entry, triton_launch.Replay), (tokens, entry)
    assert len(graphs) == 4


@replays
def test_calls_that_compute_between_launches_run_the_kernel():
    """Expert parallelism localises the routed ids with torch between launches: no replay, and every call still
    equals a direct one."""
    full = _layer(8, experts=2 * E)
    spec = registry.get("triton")
    local = registry.MoEWeights(*(t[E:] for t in full.kernel_weights()))
    args = dataclasses.replace(full._run_args(), local_expert_offset=E, global_num_experts=2 * E)
    scales = (full.input_global_scale, full.intermediate_global_scale, None)
    graphs = graphed.CallGraphs()
    for _ in range(3):
        x = torch.randn(128, H, device="cuda").bfloat16()
        logits = torch.randn(128, 2 * E, device="cuda")
        got = graphs.run(spec.run, spec.name, x, logits, local, scales, args, None, spec.replay, capture=False)
        assert torch.equal(got, spec.run(x, logits, local, *scales, args))
    assert len(graphs) == 0 and list(graphs._repeats.values()) == [graphed._UNREPEATED]


@replays
def test_other_alignments_and_launch_hooks_run_the_kernel():
    moe = _layer(9)
    graphs = graphed.CallGraphs()
    spare = torch.empty(128 * H + 1, device="cuda", dtype=torch.bfloat16)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    for step in range(9):  # 3, 4: misaligned (a replay declines, then a warm call); 6: a hook; 8 replays again
        x = torch.randn(128, H, device="cuda").bfloat16()
        logits = torch.randn(128, E, device="cuda")
        if step in (3, 4):
            x = spare[1:].view(128, H).copy_(x)  # two bytes past an aligned address: Triton specializes on it
        if step == 6:
            triton.knobs.runtime.launch_enter_hook.add(hook)
        try:
            got = _run(moe, graphs, x, logits)
        finally:
            if step == 6:
                triton.knobs.runtime.launch_enter_hook.remove(hook)
        assert torch.equal(got, _run(moe, None, x, logits)), step
        if step == 6:
            assert len(seen) >= 3  # every launch went through Triton's path, hooks and all
    assert isinstance(next(iter(graphs._repeats.values())), triton_launch.Replay)
