"""The one-launch CUDA decode (one token, SM90) against the bf16-activation reference.

CPU tests check the pipeline plan and the support checks; GPU tests (marked ``gpu``, skipped without a
compute capability 9.x GPU) run the kernel through NVRTC.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_passes.contract import ACTIVATIONS, PARAMETRIC_ACTIVATIONS, ROUTING_METHODS
from moe_passes.kernels import cuda_decode, options
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.cuda_decode import plan_decode, segments
from moe_passes.kernels.reference import fused_moe_reference, route
from moe_passes.kernels.triton_common import ACT_CODES
from nvfp4_layers import make_layer

# The activations the CUDA decode has epilogues for (it refuses swiglu_oai and expert biases: the Triton
# decode takes those calls).
TRITON_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a in ACT_CODES and a not in PARAMETRIC_ACTIVATIONS)
# The routing methods the decode routes itself (sparsemixer, PhiMoE, takes the Triton path).
DECODE_ROUTINGS = tuple(r for r in ROUTING_METHODS if r in cuda_decode.ROUTING.methods)

H200_SMEM = 232448  # per-block opt-in shared memory of an H100 / H200
BENCH_SHAPES = {  # hidden, intermediate, experts, top_k, gated
    "nemotron-3-nano": (2688, 1856, 128, 6, False),
    "qwen3-30b-a3b": (2048, 768, 128, 8, True),
    "gemma-4-26b-a4b": (2816, 704, 128, 8, True),
}


@pytest.mark.parametrize("name", list(BENCH_SHAPES))
def test_plan_fits_the_small_benchmark_layers(name):
    hidden, inter, experts, top_k, gated = BENCH_SHAPES[name]
    plan = plan_decode(hidden, inter, experts, top_k, gated, 1, 132, H200_SMEM)
    assert plan.stage_bytes >= 9 * hidden and plan.stage_bytes >= 16 * plan.max_pieces * 576
    assert plan.stage_bytes % 128 == 0 and 2 <= plan.stages <= 16
    extra = 6 * hidden + 32 * plan.max_units + 64 * (2 if gated else 1) * plan.max_units * plan.consumer_warps
    assert plan.dynamic_smem == plan.stages * plan.stage_bytes + extra < H200_SMEM
    assert plan.grid == 132 and plan.threads == 32 * (plan.consumer_warps + 1)
    segs = [row[1 + 3 * i:4 + 3 * i] for row in plan.segments for i in range(row[0])]
    assert plan.max_units == max(n for _, _, n in segs)  # the kernel's MAXU and MAXSEG, the stage's size
    assert plan.max_pieces == max((j0 + n + 3) // 4 - j0 // 4 for _, j0, n in segs)
    assert plan.max_segments == max(row[0] for row in plan.segments) == 1
    # one slot per CTA, its bands split evenly: no CTA has more than one band over the mean
    assert plan.max_units <= -(-top_k * inter // 16 // 132) + 1


def test_plan_refuses_what_does_not_fit():
    # a w13 band of hidden 12800 is 115 KB: two stages do not fit
    with pytest.raises(ValueError, match="two are needed"):
        plan_decode(12800, 2048, 256, 8, True, 8, 132, H200_SMEM)
    with pytest.raises(ValueError, match="multiples of 16"):
        plan_decode(2056, 768, 128, 8, True, 1, 132, H200_SMEM)
    # no more CTAs than (slot, band) units
    assert plan_decode(64, 32, 4, 2, True, 1, 132, H200_SMEM).grid == 4
    with pytest.raises(ValueError, match="positive"):
        plan_decode(64, 32, 4, 2, True, 1, 132, H200_SMEM, grid=0)


@pytest.mark.parametrize("inter, top_k, grid, max_units", [
    (768, 8, 132, 8), (1856, 6, 132, 8), (704, 8, 132, 8), (208, 4, 7, 8), (96, 6, 1, 8), (96, 6, 4, 2),
    (64, 2, 100, 8), (1024, 8, 132, 3), (2048, 8, 132, 8), (32, 8, 16, 8)])
def test_segments_cover_every_band_once(inter, top_k, grid, max_units):
    rows = segments(inter, top_k, grid, max_units)
    bands = inter // 16
    assert len(rows) == grid
    seen = []
    for count, *flat in rows:
        assert len(flat) == 3 * count
        segs = [flat[3 * i:3 * i + 3] for i in range(count)]
        for slot, j0, n in segs:
            assert 0 <= slot < top_k and 1 <= n <= max_units and 0 <= j0 and j0 + n <= bands
            seen += [(slot, j) for j in range(j0, j0 + n)]
        if grid >= top_k:  # one slot per CTA, an even share of it
            assert len({slot for slot, _, _ in segs}) <= 1
            per_slot = grid // top_k
            assert sum(n for _, _, n in segs) <= -(-bands // per_slot)
        else:  # whole slots
            slots = {slot for slot, _, _ in segs}
            assert sum(n for _, _, n in segs) == bands * len(slots)
    assert sorted(seen) == [(s, j) for s in range(top_k) for j in range(bands)]


def test_unsupported_reason_on_cpu():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "silu", torch.device("cpu"), 0)
    reason = cuda_decode.unsupported_reason(x, torch.zeros(1, 4), weights, 2, "silu", "renormalize", None, None,
                                            None, None)
    assert reason is not None and ("9.x" in reason or "turned off" in reason)


def test_off_when_asked():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "silu", torch.device("cpu"), 0)
    reason = cuda_decode.unsupported_reason(x, torch.zeros(1, 4), weights, 2, "silu", "renormalize", None, None,
                                            None, None, options=KernelOptions(cuda_decode=False))
    assert "MOE_NVFP4_CUDA_DECODE=0" in reason
    with options.use(KernelOptions(cuda_decode=False)):  # the scoped default, for calls that name no options
        assert "turned off" in cuda_decode.unsupported_reason(x, torch.zeros(1, 4), weights, 2, "silu", "renormalize",
                                                              None, None, None, None)


def test_refuses_expert_biases_and_swiglu_oai():
    """gpt-oss's epilogue (expert biases, swiglu_oai's parameters) is not in the CUDA decode: the planner and
    the run-time check refuse it, so one token takes the Triton decode; a direct call is an error."""
    from moe_passes.errors import MoEConfigError

    args = (720, 208, 16, 4, True, "renormalize", None, None, 132, 232448, KernelOptions())
    assert cuda_decode.static_refusal(*args) is None
    for kw in (dict(biases=True), dict(activation_params=True)):
        assert "expert biases or activation parameters" in cuda_decode.static_refusal(*args, **kw)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "swiglu_oai", torch.device("cpu"), 0)
    with pytest.raises(MoEConfigError, match="no epilogue for 'swiglu_oai'"):
        cuda_decode.decode_one_token(x, torch.zeros(1, 4), weights, top_k=2, activation="swiglu_oai",
                                     routing="renormalize", out=torch.empty_like(x))


def test_refuses_sparsemixer_routing():
    """PhiMoE's sparsemixer routing has no code in the decode (its METHOD chain would route it as llama4): the
    planner and the run-time check refuse it, so one token takes the Triton decode; a direct call is an error,
    and the source itself refuses a METHOD it does not know."""
    from moe_passes.errors import MoEConfigError
    from moe_passes.kernels.triton_plan import H200, Problem, plan

    assert set(DECODE_ROUTINGS) == set(ROUTING_METHODS) - {"sparsemixer"}
    args = (720, 208, 16, 2, True, "sparsemixer", None, None, 132, 232448, KernelOptions())
    assert "routing 'sparsemixer' is not implemented" in cuda_decode.static_refusal(*args)
    assert cuda_decode.static_refusal(*args[:5], "renormalize", *args[6:]) is None
    problem = Problem(tokens=1, top_k=2, experts=16, hidden=720, inter=208, gated=True, routing="sparsemixer")
    chosen = plan(problem, H200)
    assert chosen.variant != "cuda_decode" and chosen.config is not None
    assert plan(dataclasses.replace(problem, routing="renormalize"), H200).variant == "cuda_decode"
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "silu", torch.device("cpu"), 0)
    with pytest.raises(MoEConfigError, match="does not route 'sparsemixer'"):
        cuda_decode.decode_one_token(x, torch.zeros(1, 4), weights, top_k=2, activation="silu",
                                     routing="sparsemixer", out=torch.empty_like(x))
    source = cuda_decode.SOURCE.read_text()
    assert "#if METHOD < 0 || METHOD > 3" in source and "#error" in source


def test_on_by_default_and_off_by_environment():
    assert KernelOptions().cuda_decode and KernelOptions.from_env({}).cuda_decode
    assert KernelOptions.from_env({"MOE_NVFP4_CUDA_DECODE": "1"}).cuda_decode
    assert not KernelOptions.from_env({"MOE_NVFP4_CUDA_DECODE": "0"}).cuda_decode
    assert not KernelOptions.from_env({"MOE_NVFP4_CUDA_DECODE": " 0\n"}).cuda_decode


def test_cuda_source_ships_with_the_package():
    src = cuda_decode.SOURCE
    assert src.exists() and "moe_nvfp4_decode1" in src.read_text()


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a compute capability 9.x GPU")


@pytest.fixture(autouse=True)
def _opted_in(request):
    """The GPU tests run the kernel even where MOE_NVFP4_CUDA_DECODE=0 turned it off."""
    if not request.node.get_closest_marker("gpu"):
        yield
        return
    with options.use(dataclasses.replace(options.current(), cuda_decode=True)):
        yield


def _routing(routing, experts, g, top_k=4):
    if routing == "llama4":
        return dict(top_k=1), None
    if routing == "deepseek_v3":
        bias = (torch.randn(experts, generator=g) / 10).cuda()
        return dict(top_k=top_k, n_group=4, topk_group=2, routed_scaling_factor=2.5), bias
    return dict(top_k=top_k), None


def _run(hidden, inter, experts, activation, routing, seed, *, grid=None, warps=None, top_k=4, logit_dtype=None,
         groups=None):
    """Kernel vs reference for one fresh random token; returns (out, weights, x, logits, kw, bias)."""
    from moe_passes.kernels.triton_moe import prepare_weights

    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    weights = make_layer(hidden, inter, experts, activation, torch.device("cuda"), seed)
    kw, bias = _routing(routing, experts, g, top_k)
    if groups is not None and routing == "deepseek_v3":
        kw.update(n_group=groups[0], topk_group=groups[1])
    x = (torch.randn(1, hidden, generator=g) / 10).to("cuda", torch.bfloat16)
    logits = torch.randn(1, experts, generator=g).cuda()
    if logit_dtype is not None:
        logits = logits.to(logit_dtype)
    prepared = prepare_weights(weights)
    args = (x, logits, prepared, kw["top_k"], activation, routing, bias, kw.get("n_group"), kw.get("topk_group"),
            kw.get("routed_scaling_factor"))
    assert cuda_decode.unsupported_reason(*args) is None
    out = torch.full((1, hidden), float("nan"), dtype=torch.bfloat16, device="cuda")  # poisoned
    rw = torch.full((kw["top_k"],), float("nan"), device="cuda")
    rid = torch.full((kw["top_k"],), -1, dtype=torch.int32, device="cuda")
    res = cuda_decode.decode_one_token(x, logits, prepared, top_k=kw["top_k"], activation=activation, routing=routing,
                                       routing_bias=bias, n_group=kw.get("n_group"), topk_group=kw.get("topk_group"),
                                       routed_scaling_factor=kw.get("routed_scaling_factor"), out=out,
                                       options=KernelOptions(cuda_decode_warps=warps) if warps else None, grid=grid,
                                       routing_out=(rw, rid))
    assert res is not None and res.data_ptr() == out.data_ptr()
    torch.cuda.synchronize()
    want_w, want_ids = route(logits, kw["top_k"], routing, routing_bias=bias, n_group=kw.get("n_group"),
                             topk_group=kw.get("topk_group"), routed_scaling_factor=kw.get("routed_scaling_factor"))
    assert rid.cpu().tolist() == want_ids[0].cpu().tolist()
    torch.testing.assert_close(rw.cpu(), want_w[0].float().cpu(), rtol=1e-5, atol=1e-6)
    ref = fused_moe_reference(x, logits, *weights, activation=activation, routing=routing, routing_bias=bias,
                              quantize_activations=False, **kw)
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output elements"
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=5e-2)
    return out, prepared, x, logits, kw, bias


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("activation", TRITON_ACTIVATIONS)
@pytest.mark.parametrize("routing", DECODE_ROUTINGS)
def test_activations_and_routings(activation, routing):
    # hidden 720 and intermediate 208: 45 and 13 groups per row, so every band ends in a narrow piece
    _run(720, 208, 16, activation, routing, seed=TRITON_ACTIVATIONS.index(activation) * 10 + ROUTING_METHODS.index(routing))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("grid", [1, 2, 3, 7, 40, None])
@pytest.mark.parametrize("warps", [4, 8, 12, 16])
def test_grids_and_consumer_warps(grid, warps):
    """Any grid: one CTA doing every unit (the stage ring wraps many times), CTAs with GEMM1 units only, with
    several hidden bands, more CTAs than GEMM1 units."""
    _run(512, 96, 16, "silu", "renormalize", seed=grid or 0, grid=grid, warps=warps, top_k=6)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("grid", [1, 2])
def test_few_ctas_sum_many_hidden_bands(grid):
    """A CTA sums more hidden columns than it has threads (hidden 2816 over one or two CTAs)."""
    _run(2816, 64, 8, "silu", "renormalize", seed=40 + grid, grid=grid, top_k=2)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("grid", [None, 8])
def test_deepseek_hidden_two_stages(grid):
    """Hidden 7168: a w13 band is 63 KB, so the ring has two stages; on 8 CTAs each slot's 32 bands are four
    segments of eight."""
    _run(7168, 512, 16, "silu", "deepseek_v3", seed=7 + (grid or 0), grid=grid, top_k=8, groups=(4, 2))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("name", list(BENCH_SHAPES))
def test_benchmark_layer_sizes(name):
    hidden, inter, _, top_k, gated = BENCH_SHAPES[name]
    routing = "renormalize" if gated else "deepseek_v3"
    _run(hidden, inter, 32, "silu" if gated else "relu2", routing, seed=hidden, top_k=top_k, groups=(1, 1))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(dtype):
    _run(256, 64, 32, "gelu", "deepseek_v3", seed=5, logit_dtype=dtype, groups=(8, 3), top_k=5)


@pytest.mark.gpu
@needs_hopper
def test_deterministic_and_calls_in_a_row():
    """The same token twice gives the same bits (the CTAs' partial outputs are summed in a fixed order), and
    calls in a row keep working (the grid barrier's counter grows by the grid size every call)."""
    out, prepared, x, logits, kw, _ = _run(1024, 256, 16, "silu", "renormalize", seed=11, grid=37)
    for _ in range(3):
        again = torch.empty_like(out)
        cuda_decode.decode_one_token(x, logits, prepared, activation="silu", routing="renormalize", out=again,
                                     grid=37, **kw)
        torch.cuda.synchronize()
        assert torch.equal(again, out)


@pytest.mark.gpu
@needs_hopper
def test_cuda_graph_replays_follow_fresh_inputs():
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    hidden, inter, experts, top_k = 768, 192, 32, 8
    weights = make_layer(hidden, inter, experts, "gelu_tanh", torch.device("cuda"), 21)
    prepared = prepare_weights(weights)
    xs = [torch.empty(1, hidden, dtype=torch.bfloat16, device="cuda") for _ in range(3)]
    ls = [torch.empty(1, experts, device="cuda") for _ in range(3)]

    def fill():
        for x, lg in zip(xs, ls):
            x.copy_((torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16))
            lg.copy_(torch.randn(1, experts, device="cuda"))

    def layer():
        return [fused_moe_triton(x, lg, prepared, top_k=top_k, activation="gelu_tanh", routing="renormalize")
                for x, lg in zip(xs, ls)]

    fill()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = layer()
    for _ in range(2):
        fill()
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for o, x, lg in zip(outs, xs, ls):
            ref = fused_moe_reference(x, lg, *weights, top_k=top_k, activation="gelu_tanh", routing="renormalize",
                                      quantize_activations=False)
            assert not o.isnan().any()
            assert ((o.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("pdl", [True, False])
def test_chained_layers_wait_for_what_they_read(pdl):
    """Calls in a row that read what the call before wrote: each call's router logits are the first experts'
    entries of the previous output (a view: the kernel reads them straight from the previous kernel's output),
    and every other call's token adds the previous output through a torch op (so the kernel follows itself,
    and follows another kernel).  With a programmatic dependent launch (``pdl``) a call may start before the
    previous kernel ends and must wait before it reads: eager calls in a row and a CUDA-graph replay of the
    chain give the bits of calls with a synchronize between each, and those match the reference call by call."""
    from moe_passes.kernels.triton_moe import prepare_weights

    opts = KernelOptions(cuda_decode_pdl=pdl)
    hidden, inter, experts, top_k, steps = 1024, 256, 32, 4, 6
    weights = make_layer(hidden, inter, experts, "silu", torch.device("cuda"), 31)
    prepared = prepare_weights(weights)
    g = torch.Generator(device="cpu").manual_seed(32)
    xs = [(torch.randn(1, hidden, generator=g) / 10).to("cuda", torch.bfloat16) for _ in range(steps)]
    first_logits = torch.randn(1, experts, generator=g).to("cuda", torch.bfloat16)

    def inputs(i, prev):
        if i == 0:
            return xs[0], first_logits
        return (xs[i] + prev if i % 2 else xs[i]), prev[:, :experts]

    def chain(outs, sync):
        prev = None
        for i in range(steps):
            x, logits = inputs(i, prev)
            done = cuda_decode.decode_one_token(x, logits, prepared, top_k=top_k, activation="silu",
                                                routing="renormalize", out=outs[i], options=opts)
            assert done is not None, "the CUDA decode did not launch"
            if sync:
                torch.cuda.synchronize()
            prev = outs[i]

    serial = [torch.empty(1, hidden, dtype=torch.bfloat16, device="cuda") for _ in range(steps)]
    chain(serial, sync=True)
    prev = None
    for i, out in enumerate(serial):  # every call against the reference on the same inputs
        x, logits = inputs(i, prev)
        ref = fused_moe_reference(x, logits, *weights, top_k=top_k, activation="silu", routing="renormalize",
                                  quantize_activations=False)
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, f"call {i}: relative error {rel:.2e}"
        prev = out
    eager = [torch.full_like(o, float("nan")) for o in serial]
    chain(eager, sync=False)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, serial))
    graphed = [torch.full_like(o, float("nan")) for o in serial]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(graphed, sync=False)
    for _ in range(2):
        for o in graphed:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(graphed, serial))


@pytest.mark.gpu
@needs_hopper
def test_fused_moe_triton_takes_it_at_one_token_only(monkeypatch):
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    calls = []
    real = cuda_decode.decode_one_token
    monkeypatch.setattr(cuda_decode, "decode_one_token", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    weights = make_layer(640, 160, 16, "relu2", torch.device("cuda"), 4)
    prepared = prepare_weights(weights)
    x = (torch.randn(2, 640, device="cuda") / 10).to(torch.bfloat16)
    logits = torch.randn(2, 16, device="cuda")
    kw = dict(top_k=3, activation="relu2", routing="deepseek_v3", n_group=2, topk_group=1, routed_scaling_factor=1.5)
    one = fused_moe_triton(x[:1], logits[:1], prepared, **kw)
    two = fused_moe_triton(x, logits, prepared, **kw)
    assert calls == [1]
    triton_one = fused_moe_triton(x[:1], logits[:1], prepared, options=KernelOptions(cuda_decode=False), **kw)
    assert calls == [1]
    torch.cuda.synchronize()
    torch.testing.assert_close(one.float(), triton_one.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(one.float(), two[:1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_hopper
def test_first_call_inside_a_capture_falls_back_to_triton(monkeypatch):
    """The schedule table is copied to the GPU on a shape's first call; inside a CUDA-graph capture that copy
    cannot happen, so the call takes the Triton decode (with a warning) and the replay is still right."""
    from moe_passes.kernels.triton_moe import fused_moe_triton, prepare_weights

    hidden, inter, experts = 528, 112, 16
    weights = make_layer(hidden, inter, experts, "silu", torch.device("cuda"), 8)
    prepared = prepare_weights(weights)
    x = (torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16)
    logits = torch.randn(1, experts, device="cuda")
    kw = dict(top_k=3, activation="silu", routing="renormalize")
    fused_moe_triton(x, logits, prepared, **kw)  # compiles the kernel
    monkeypatch.setattr(cuda_decode, "_TABLES", {})
    monkeypatch.setattr(cuda_decode, "_WARNED", set())
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(RuntimeWarning, match="inside a CUDA-graph capture"):
        with torch.cuda.graph(graph):
            out = fused_moe_triton(x, logits, prepared, **kw)
    x.copy_((torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    ref = fused_moe_reference(x, logits, *weights, quantize_activations=False, **kw)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
