"""The one-launch CUDA decode (one token, SM90) against the bf16-activation reference.

CPU tests check the pipeline plan and the support checks; GPU tests (marked ``gpu``, skipped without a
compute capability 9.x GPU) run the kernel through NVRTC.
"""

from __future__ import annotations

import pytest
import torch

from moe_passes.contract import ACTIVATIONS, ROUTING_METHODS
from moe_passes.kernels import cuda_decode
from moe_passes.kernels.cuda_decode import partition, plan_decode, schedule
from moe_passes.kernels.reference import fused_moe_reference, route
from nvfp4_layers import make_layer

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
    unit1 = (2 if gated else 1) * 9 * hidden
    assert plan.stage_bytes >= unit1 and plan.stage_bytes % 128 == 0
    assert plan.slots_per_stage * 9 * inter <= plan.stage_bytes
    assert 2 <= plan.stages <= 16
    assert plan.dynamic_smem == plan.stages * plan.stage_bytes + 2 * hidden + 2 * top_k * inter
    assert plan.dynamic_smem < H200_SMEM
    assert plan.grid == 132 and plan.threads == 32 * (plan.consumer_warps + 3)
    assert plan.max_ops == max(row[0] for row in plan.schedule)  # the kernel's MAXOPS and MAXB
    assert plan.max_bands == max(len({(-1 - op) >> 10 for op in row[2:] if op < 0}) for row in plan.schedule)


def test_plan_refuses_what_does_not_fit():
    # DeepSeek-V3's gated hidden 7168: one GEMM1 unit is 129 KB, two stages do not fit
    with pytest.raises(ValueError, match="two are needed"):
        plan_decode(7168, 2048, 256, 8, True, 8, 132, H200_SMEM)
    with pytest.raises(ValueError, match="multiples of 16"):
        plan_decode(2056, 768, 128, 8, True, 1, 132, H200_SMEM)
    # no more CTAs than the larger of the GEMM1 units and the hidden bands
    assert plan_decode(64, 32, 4, 2, True, 1, 132, H200_SMEM).grid == 4
    with pytest.raises(ValueError, match="positive"):
        plan_decode(64, 32, 4, 2, True, 1, 132, H200_SMEM, grid=0)


@pytest.mark.parametrize("hidden, inter, top_k, gated, grid", [
    (2048, 768, 8, True, 132), (2688, 1856, 6, False, 132), (2816, 704, 8, True, 132), (720, 208, 4, True, 7),
    (512, 96, 6, True, 1), (4096, 64, 2, False, 100), (256, 1024, 8, True, 132)])
def test_partition_covers_every_unit_once_and_balances_bytes(hidden, inter, top_k, gated, grid):
    ranges = partition(hidden, inter, top_k, gated, grid)
    assert len(ranges) == grid
    units1, bands = top_k * (inter // 16), hidden // 16
    item1, band2 = (2 if gated else 1) * 9 * hidden, top_k * 9 * inter
    assert ranges[0][0] == 0 and ranges[0][2] == 0
    assert ranges[-1][1] == units1 and ranges[-1][3] == bands * top_k
    for (lo1, hi1, lo2, hi2), nxt in zip(ranges, ranges[1:] + ((units1, 0, bands * top_k, 0),)):
        assert lo1 <= hi1 == nxt[0] and lo2 <= hi2 == nxt[2]  # contiguous, in order: each unit once
        assert lo2 % top_k == 0 and hi2 % top_k == 0  # whole hidden bands
    load = [(hi1 - lo1) * item1 + (hi2 - lo2) // top_k * band2 for lo1, hi1, lo2, hi2 in ranges]
    mean = sum(load) / grid
    # nobody above the mean by more than one GEMM1 unit, unless its whole bands alone exceed it
    for (lo1, hi1, lo2, hi2), b in zip(ranges, load):
        assert b <= max(mean, (hi2 - lo2) // top_k * band2) + item1 + 1


def _decode_op(op):
    code = -1 - op
    return code >> 10, (code >> 5) & 31, (code & 31) + 1


@pytest.mark.parametrize("hidden, inter, top_k, gated, grid, slots", [
    (2048, 768, 8, True, 132, 5), (2688, 1856, 6, False, 132, 1), (2816, 704, 8, True, 132, 8), (720, 208, 4, True, 7, 4),
    (512, 96, 6, True, 1, 6), (4096, 64, 2, False, 100, 2), (256, 1024, 8, True, 132, 1)])
def test_schedule_runs_every_unit_once_without_deadlock(hidden, inter, top_k, gated, grid, slots):
    """Each GEMM1 unit and each (hidden band, slot) once, a band's items in slot order, and the CTAs' op lists
    run to the end when each CTA takes its ops in order and a GEMM2 item waits for its slots' units (the
    kernel's rules; every CTA is resident)."""
    rows = schedule(hidden, inter, top_k, gated, grid, slots)
    nb1, bands = inter // 16, hidden // 16
    units = sorted(op for row in rows for op in row[2:] if op >= 0)
    assert units == list(range(top_k * nb1))
    seen = []
    for n, band0, *ops in rows:
        assert n == len(ops)
        per_band = {}
        for op in ops:
            if op < 0:
                b, s0, cnt = _decode_op(op)
                assert 1 <= cnt <= slots and s0 + cnt <= top_k and b >= band0
                assert per_band.get(b, 0) == s0  # slot order within a band
                per_band[b] = s0 + cnt
                seen += [(b, s) for s in range(s0, s0 + cnt)]
        assert all(v == top_k for v in per_band.values())
    assert sorted(seen) == [(b, s) for b in range(bands) for s in range(top_k)]
    done = [0] * top_k  # GEMM1 units finished per slot
    pos = [0] * grid
    progress = True
    while progress:
        progress = False
        for c, (n, _, *ops) in enumerate(rows):
            while pos[c] < n:
                op = ops[pos[c]]
                if op >= 0:
                    done[op // nb1] += 1
                else:
                    _, s0, cnt = _decode_op(op)
                    if any(done[s] < nb1 for s in range(s0, s0 + cnt)):
                        break
                pos[c] += 1
                progress = True
    assert pos == [row[0] for row in rows], "a CTA waits forever"


def test_unsupported_reason_on_cpu():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "silu", torch.device("cpu"), 0)
    reason = cuda_decode.unsupported_reason(x, torch.zeros(1, 4), weights, 2, "silu", "renormalize", None, None,
                                            None, None)
    assert reason is not None and ("9.x" in reason or "opt-in" in reason)


def test_off_unless_asked(monkeypatch):
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    weights = make_layer(64, 32, 4, "silu", torch.device("cpu"), 0)
    reason = cuda_decode.unsupported_reason(x, torch.zeros(1, 4), weights, 2, "silu", "renormalize", None, None,
                                            None, None)
    assert "MOE_NVFP4_CUDA_DECODE=1" in reason


def test_cuda_source_ships_with_the_package():
    src = cuda_decode._SOURCE
    assert src.exists() and "moe_nvfp4_decode1" in src.read_text()


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="needs a compute capability 9.x GPU")


@pytest.fixture(autouse=True)
def _opted_in(monkeypatch, request):
    """The kernel is opt-in (MOE_NVFP4_CUDA_DECODE=1); the GPU tests turn it on for themselves."""
    if request.node.get_closest_marker("gpu"):
        monkeypatch.setattr(cuda_decode, "ENABLED", True)


def _routing(routing, experts, g, top_k=4):
    if routing == "llama4":
        return dict(top_k=1), None
    if routing == "deepseek_v3":
        bias = (torch.randn(experts, generator=g) / 10).cuda()
        return dict(top_k=top_k, n_group=4, topk_group=2, routed_scaling_factor=2.5), bias
    return dict(top_k=top_k), None


def _run(hidden, inter, experts, activation, routing, seed, *, grid=None, warps=8, top_k=4, logit_dtype=None,
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
                                       consumer_warps=warps, grid=grid, routing_out=(rw, rid))
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
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("routing", ROUTING_METHODS)
def test_activations_and_routings(activation, routing):
    # hidden 720 and intermediate 208: 45 and 13 groups per row, so every band ends in a narrow piece
    _run(720, 208, 16, activation, routing, seed=ACTIVATIONS.index(activation) * 10 + ROUTING_METHODS.index(routing))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("grid", [1, 2, 3, 7, 40, None])
@pytest.mark.parametrize("warps", [4, 8, 16])
def test_grids_and_consumer_warps(grid, warps):
    """Any grid: one CTA doing every unit (the stage ring wraps many times), CTAs with GEMM1 units only, with
    several hidden bands, more CTAs than GEMM1 units."""
    _run(512, 96, 16, "silu", "renormalize", seed=grid or 0, grid=grid, warps=warps, top_k=6)


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
def test_deterministic_and_counters_reset():
    """The same token twice gives the same bits (each hidden band is summed in one CTA, in a fixed order), and
    calls in a row keep working (the kernel leaves its counters zero)."""
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
    monkeypatch.setattr(cuda_decode, "ENABLED", False)
    triton_one = fused_moe_triton(x[:1], logits[:1], prepared, **kw)
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
