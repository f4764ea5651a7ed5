"""Small calls replayed from the kernel's own CUDA graphs (``kernels.graphed``) equal direct kernel calls.

Skipped without CUDA.  The direct call (``spec.run``) is the reference: the same kernels launched one by one,
so a replay must match it bit for bit, on fresh inputs every call, on every Hopper path a small call can take
(the one-launch CUDA decode and the Triton decodes).
"""

import gc
import warnings
import weakref

import pytest
import torch

from moe_passes import FusedMoE
from moe_passes.kernels import cuda_decode, graphed, registry
from moe_passes.kernels.options import KernelOptions, use

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
warnings.filterwarnings("ignore", category=UserWarning)

E, H, I = 16, 1024, 256


def _layer(seed: int) -> FusedMoE:
    g = torch.Generator().manual_seed(seed)
    moe = FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / 16,
                              top_k=4, activation="silu", routing="renormalize",
                              calibration=torch.randn(32, H, generator=g))
    return moe.cuda().requires_grad_(False)


def _call(moe: FusedMoE, graphs, x, logits, direct=True):
    spec = registry.get(moe.kernel)
    scales = (moe.input_global_scale, moe.intermediate_global_scale, moe.routing_bias)
    if graphs is None:
        return spec.run(x, logits, moe.kernel_weights(), *scales, moe._run_args())
    return graphs.run(spec.run, spec.name, x, logits, moe.kernel_weights(), scales, moe._run_args(),
                      direct=spec.direct if direct else None)


def _sm90() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@pytest.mark.parametrize("direct", [True, False], ids=["spec-direct", "graphs-only"])
@pytest.mark.parametrize("cuda_decode_on", [True, False])
def test_replays_equal_direct_calls(cuda_decode_on, direct):
    moe = _layer(seed=int(cuda_decode_on))
    graphs = graphed.CallGraphs()
    with use(KernelOptions(cuda_decode=cuda_decode_on)):
        for captured, tokens in enumerate((1, 2, 16, 64), start=1):
            for _ in range(4):
                x = torch.randn(tokens, H, device="cuda").bfloat16()
                logits = torch.randn(tokens, E, device="cuda")
                got = _call(moe, graphs, x, logits, direct)
                assert torch.equal(got, _call(moe, None, x, logits))
            assert len(graphs) == captured  # the calls after the first replayed one graph per token count
            # one token on the CUDA decode repeats its bound launch instead of a graph; all else is a graph
            bound = direct and cuda_decode_on and tokens == 1 and _sm90()
            entry = next(reversed(graphs._graphs.values()))
            assert isinstance(entry, cuda_decode.DecodeCall) == bound


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the one-launch CUDA decode needs SM90")
def test_bound_cuda_decode_repeats_equal_fresh_launches():
    """The repeat of a one-token call with its launch bound once (``cuda_decode.DecodeCall``) equals a fresh
    launch of the same kernel on fresh inputs: a DeepSeek-V3-routed layer (routing bias, scaling factor, bf16
    logits: the bias is its own argument) and hidden states that are not 16-byte aligned (copied first)."""
    g = torch.Generator().manual_seed(31)
    experts, groups = 32, 4
    moe = FusedMoE.from_float(torch.randn(experts, 2 * I, H, generator=g) / H ** 0.5,
                              torch.randn(experts, H, I, generator=g) / 16, top_k=4, routing="deepseek_v3",
                              n_group=groups, topk_group=2, routed_scaling_factor=2.5,
                              routing_bias=torch.randn(experts, generator=g),
                              calibration=torch.randn(32, H, generator=g)).cuda().requires_grad_(False)
    graphs = graphed.CallGraphs()
    spare = torch.empty(H + 1, device="cuda", dtype=torch.bfloat16)
    for step in range(6):
        logits = torch.randn(1, experts, device="cuda").bfloat16()
        x = torch.randn(1, H, device="cuda").bfloat16()
        if step % 2:
            x = spare[1:].view(1, H).copy_(x)  # two bytes past an aligned address
            assert x.data_ptr() % 16
        got = _call(moe, graphs, x, logits)
        assert torch.equal(got, _call(moe, None, x, logits))
    assert isinstance(next(iter(graphs._graphs.values())), cuda_decode.DecodeCall)
    weights = weakref.ref(moe._buffers["_kernel_w13"])
    del moe, got
    gc.collect()
    assert weights() is None  # the kept call holds addresses, not the layer's tensors


def test_options_are_part_of_the_key_and_can_turn_graphs_off():
    moe = _layer(seed=14)
    graphs = graphed.CallGraphs()
    x = torch.randn(1, H, device="cuda").bfloat16()
    logits = torch.randn(1, E, device="cuda")
    for cuda_decode_on in (True, False):
        with use(KernelOptions(cuda_decode=cuda_decode_on)):
            for _ in range(3):
                assert torch.equal(_call(moe, graphs, x, logits), _call(moe, None, x, logits))
    assert len(graphs) == 2
    before = len(graphed.CALL_GRAPHS)
    with use(KernelOptions(call_graphs=False)), torch.inference_mode():
        for _ in range(3):
            moe(x, logits)
    assert len(graphed.CALL_GRAPHS) == before


def test_graphs_are_keyed_by_weights():
    a, b = _layer(seed=10), _layer(seed=11)
    graphs = graphed.CallGraphs()
    for _ in range(3):
        x = torch.randn(1, H, device="cuda").bfloat16()
        logits = torch.randn(1, E, device="cuda")
        got_a, got_b = _call(a, graphs, x, logits), _call(b, graphs, x, logits)
        assert torch.equal(got_a, _call(a, None, x, logits))
        assert torch.equal(got_b, _call(b, None, x, logits))
        assert not torch.equal(got_a, got_b)
    assert len(graphs) == 2


def test_inside_an_outer_capture_the_kernel_runs_directly():
    moe = _layer(seed=12)
    graphs = graphed.CallGraphs()
    x = torch.randn(2, H, device="cuda").bfloat16()
    logits = torch.randn(2, E, device="cuda")
    for _ in range(2):  # warm: the second call would capture if the stream were not already capturing
        _call(moe, graphs, x, logits)
    graphs.clear()
    _call(moe, graphs, x, logits)
    outer = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outer.capture_begin()
        out = _call(moe, graphs, x, logits)
        outer.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    assert len(graphs) == 0
    fresh = torch.randn(2, H, device="cuda").bfloat16()
    x.copy_(fresh)
    outer.replay()
    assert torch.equal(out, _call(moe, None, fresh, logits))


def _replays() -> bool:
    from moe_passes.kernels import triton_launch
    return triton_launch.JITFunction is not None


@pytest.mark.parametrize("tokens", [3, pytest.param(200, marks=pytest.mark.skipif(
    not _replays(), reason="this Triton release launches through fn[grid]: nothing to replay"))],
    ids=["graph", "replay"])
def test_layer_and_compiled_default_mode_use_the_graphs(tokens):
    """Without a mode, a call of the layer or of the compiled layer up to ``graph_tokens`` replays a CUDA graph of
    the kernel's; a larger one repeats its recorded launches.  Both equal direct kernel calls bit for bit."""
    moe = _layer(seed=13)
    calls = graphed.CALL_GRAPHS
    table = calls._graphs if tokens <= registry.get(moe.kernel).graph_tokens else calls._repeats

    def made():
        return sum(1 for v in table.values() if v is not graphed._WARMED and v is not graphed._UNREPEATED)

    before = made()
    compiled = torch.compile(moe, backend="moe_nvfp4")
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(tokens, H, device="cuda").bfloat16()
            logits = torch.randn(tokens, E, device="cuda")
            got = compiled(x, logits)
            assert torch.equal(got, moe(x, logits))
            assert torch.equal(got, _call(moe, None, x, logits))
    assert made() > before


def test_expert_biases_are_keys_of_the_graph():
    """A gpt-oss-like layer (expert biases, swiglu_oai): calls of the layer replay graphs that equal direct
    kernel calls, and a graph captured with one layer's biases is never replayed with another's (same weights,
    other biases: other outputs)."""
    from moe_passes.contract import SwigluOAI

    g = torch.Generator().manual_seed(21)
    w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, torch.randn(E, H, I, generator=g) / 16
    layers = [FusedMoE.from_float(w13, w2, top_k=4, activation="swiglu_oai", w13_bias=torch.randn(E, 2 * I, generator=g),
                                  w2_bias=torch.randn(E, H, generator=g), activation_params=SwigluOAI(1.5, 0.25, 2.0),
                                  calibration=torch.randn(32, H, generator=g)).cuda().requires_grad_(False)
              for _ in range(2)]
    spec = registry.get(layers[0].kernel)
    graphs = graphed.CallGraphs()
    for _ in range(3):
        x = torch.randn(5, H, device="cuda").bfloat16()
        logits = torch.randn(5, E, device="cuda")
        outs = []
        for moe in layers:
            scales = (moe.input_global_scale, moe.intermediate_global_scale, moe.routing_bias)
            biases = {k: v for k, v in moe._bias_args().items() if k in ("w13_bias", "w2_bias")}
            assert set(biases) == {"w13_bias", "w2_bias"}
            args = (spec.run, spec.name, x, logits, moe.kernel_weights(), scales, moe._run_args())
            got = graphs.run(*args, biases=biases)
            with use(KernelOptions(call_graphs=False)):
                assert torch.equal(got, graphs.run(*args, biases=biases))
            with torch.no_grad():
                assert torch.equal(got, moe(x, logits))
            outs.append(got)
        assert not torch.equal(outs[0], outs[1])
    assert len(graphs) == 2
