"""The kernel ops inside CUDA graph trees: ``mode="reduce-overhead"`` replays match eager, on every path the
registry can select on SM90 (the one-launch CUDA decode, the Triton decodes, the grouped GEMMs).

Skipped without CUDA.  Each compiled call gets fresh inputs; its output is cloned before the next replay
overwrites it.
"""

import warnings

import pytest
import torch
from torch import nn

from moe_passes import FusedMoE
from moe_passes.kernels import options

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
warnings.filterwarnings("ignore", category=UserWarning)

E, H, I = 16, 1024, 256
TOKENS = (1, 2, 16, 64)


def _layer(shared: bool, seed: int) -> FusedMoE:
    g = torch.Generator().manual_seed(seed)
    expert = None
    if shared:
        expert = nn.Sequential(nn.Linear(H, 384, bias=False), nn.SiLU(), nn.Linear(384, H, bias=False))
        expert = expert.to(torch.bfloat16)
    moe = FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / 16,
                              top_k=4, activation="silu", routing="renormalize", shared_expert=expert,
                              calibration=torch.randn(32, H, generator=g))
    return moe.cuda().requires_grad_(False)


def _replay(compiled, make_inputs, expected, rounds=3, exact=True):
    for _ in range(rounds):
        inputs = make_inputs()
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(*inputs).clone()
        want = expected(*inputs)
        if exact:
            assert torch.equal(got, want)
        else:
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), atol=2 ** -6 * scale, rtol=2 ** -6)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("cuda_decode_on", [True, False])
def test_fused_moe_replays_match_eager(shared, cuda_decode_on):
    moe = _layer(shared, seed=int(shared) + 2 * int(cuda_decode_on))
    torch._dynamo.reset()
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    compiled = torch.compile(moe, backend="moe_nvfp4", mode="reduce-overhead")
    # the op names no options: the scoped default reaches the kernel (eager and captured calls alike)
    scoped = options.current() if cuda_decode_on else options.KernelOptions(cuda_decode=False)
    with torch.inference_mode(), options.use(scoped):
        for tokens in TOKENS:
            def make_inputs(tokens=tokens):
                return (torch.randn(tokens, H, device="cuda").bfloat16(),
                        torch.randn(tokens, E, device="cuda"))
            # without a shared expert the graph is the kernel op alone: bit for bit
            _replay(compiled, make_inputs, moe, exact=not shared)
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips


def test_converted_transformers_model_replays_match_eager():
    transformers = pytest.importorskip("transformers")
    from moe_passes.integrations.transformers import convert

    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, intermediate_size=1024, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    report = convert(model)
    assert len(report.converted) == 2, report
    model.requires_grad_(False)
    torch._dynamo.reset()
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    replayed = torch.compile(model, backend="moe_nvfp4", mode="reduce-overhead")
    # The same inductor code without CUDA graphs: replays must give its logits bit for bit.  Against eager the
    # bf16 attention and norms fuse differently, and a router logit moved by an ulp can flip a top-k tie (on
    # the CPU's reference kernel, 1-5% relative), so eager is held to a relative norm.
    plain = torch.compile(model, backend="moe_nvfp4")

    def logits(m):
        return lambda ids: m(input_ids=ids, use_cache=False).logits

    # two backends over one forward: every switch is a guard failure, so let neither fall back to eager
    limits = torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)
    with torch.inference_mode(), limits:
        for tokens in TOKENS:
            def make_inputs(tokens=tokens):
                return (torch.randint(0, 256, (1, tokens), device="cuda"),)
            _replay(logits(replayed), make_inputs, logits(plain))
            ids = make_inputs()[0]
            torch.compiler.cudagraph_mark_step_begin()
            got, want = logits(replayed)(ids).float(), logits(model)(ids).float()
            # bf16 noise and an occasional flipped top-k tie: a few percent; a stale or wrong replay: ~100%
            assert (got - want).norm() / want.norm() < 0.1
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips
