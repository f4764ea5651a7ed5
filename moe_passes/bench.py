"""``moe-nvfp4 bench``: the Triton NVFP4 MoE layer against the best 4-bit MoE peer, a bf16 MoE and the floor.

One run measures, per model layer shape and token count:

* ``triton``: the registered Triton kernel, whole layer (routing to output), CUDA-graph captured; what it ran
  in ``triton_plan`` (the plan's variant and config knobs, as ``moe-nvfp4 plan`` prints them);
* ``peer``: OpenAI ``triton_kernels``' MXFP4 ``matmul_ogs`` MoE with bf16 activations (vLLM's MoE path for
  gpt-oss on Hopper; ``moe_passes.bench_peer``), routing to output, when ``triton_kernels`` can be imported
  (installed, vLLM's copy, or ``--peer-path``); ``peer_experts``: the same from precomputed top-k ids;
* ``grouped_mm``: a bf16 MoE (route, sort by expert, two ``torch._grouped_mm`` GEMMs, activation,
  weighted ``index_add``), also captured;
* ``floor``: the NVFP4 weight-bandwidth floor, ``touched * params_per_expert * 9/16 / bandwidth``
  with ``touched`` the experts the timed inputs' routing selects (mean over the input sets; skewed routing,
  DeepSeek-V3's biased group-limited top-k, touches far fewer than the uniform ``E * (1 - (1 - k/E)^M)``, kept
  as ``experts_touched_uniform``) and the *read-only* bandwidth measured at the start of the run (the copy
  bandwidth, measured too, counts a write per byte read and understates a weight stream);
* ``TFLOPs``: the useful expert-GEMM FLOP/s (``2 x tokens x top_k x H x I`` per weight matrix) and their
  fraction of the dense bf16 matmul rate measured at the start of the run (``*_over_bf16_peak``).

All layers get the same bf16 float weights (each quantized to its own format: NVFP4 with the project's
quantizer, MXFP4 with ``triton_kernels``'), the same inputs and router logits.  Before timing, each 4-bit
layer's output is checked against an fp32 reference on its own dequantized weights (``--check``).
Each graph holds ``R`` back-to-back layer calls on ``R`` different input sets (different experts),
so that weights left in L2 by one call are rarely the next call's; times are per call (median over
replays).  Writes ``bench_moe.json`` after every row, and ``bench_moe.png`` / ``bench_moe_ratios.png``
(matplotlib, when it is installed) to ``--out``; ``--merge`` joins the JSON of split runs.
``--parallel ep|tp`` times an expert- / tensor-parallel layer per rank instead (``moe_passes.bench_parallel``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch

# name: (H, I, experts, top_k, activation, routing, extra routing args)
SHAPES = {
    "nemotron-3-nano": (2688, 1856, 128, 6, "relu2", "deepseek_v3", dict(n_group=1, topk_group=1, routed_scaling_factor=2.5)),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "silu", "renormalize", {}),
    "gemma-4-26b-a4b": (2816, 704, 128, 8, "gelu_tanh", "renormalize", {}),
    "deepseek-v3": (7168, 2048, 256, 8, "silu", "deepseek_v3", dict(n_group=8, topk_group=4, routed_scaling_factor=2.5)),
}
TOKENS = (1, 4, 16, 64, 128, 1024, 4096)
# issue 31's sweep
SWEEP_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
NVFP4_BYTES_PER_PARAM = 9 / 16     # E2M1 + one E4M3 scale per 16
MXFP4_BYTES_PER_PARAM = 8.5 / 16   # E2M1 + one e8m0 scale per 32 (the peer's format)
CHECK_MODES = ("all", "ends", "none")
JSON_NAME = "bench_moe.json"


def shape_list(text: str) -> list:
    """A benchmark's ``--shapes``: comma-separated names from :data:`SHAPES` (an argparse ``type``)."""
    shapes = [s for s in text.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}" if unknown
                                         else f"no shapes given; choose from {', '.join(SHAPES)}")
    return shapes


def token_list(text: str) -> list:
    """A benchmark's ``--tokens``: comma-separated positive integers, or ``sweep`` for :data:`SWEEP_TOKENS`."""
    if text.strip() == "sweep":
        return list(SWEEP_TOKENS)
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        tokens = []
    if not tokens or any(t <= 0 for t in tokens):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive token counts or 'sweep', got {text!r}")
    return tokens


def _median_seconds(fn, warmup: int = 3, runs: int = 10) -> float:
    """Median seconds of ``runs`` calls of ``fn`` on the current stream (CUDA events), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _median_seconds(functools.partial(dst.copy_, src))
    del src, dst
    return 2 * nbytes / seconds


def measure_read_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device read bandwidth in bytes/s: ``torch.sum`` over ``nbytes`` of random int64.

    A full sum must load every byte and writes 8, and an int64 add per 8 bytes is far below any arithmetic
    limit, so its time is the time to stream the buffer once: a weight stream's floor, which the copy
    bandwidth (a write per byte read) understates.  4 GiB is 80x an H100's L2, so the cache does not help.
    """
    src = torch.randint(-2**62, 2**62, (nbytes // 8,), dtype=torch.int64, device="cuda")
    seconds = _median_seconds(src.sum)
    nbytes = src.numel() * 8
    del src
    torch.cuda.empty_cache()
    return nbytes / seconds


def measure_bf16_peak(n: int = 8192) -> float:
    """The device's dense bf16 matrix rate in FLOP/s: the median of 10 ``n x n x n`` bf16 matmuls (cuBLAS, fp32
    accumulation), the reference for a prefill layer's useful FLOP/s."""
    a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    seconds = _median_seconds(functools.partial(torch.matmul, a, b))
    del a, b
    torch.cuda.empty_cache()
    return 2 * n ** 3 / seconds


def params_per_expert(h, i, activation) -> int:
    """An expert's weights: ``H x I`` per matrix, three gated (gate, up, down), two for relu2."""
    return (3 if activation != "relu2" else 2) * h * i


def useful_flops(name, tokens) -> float:
    """The layer's expert-GEMM FLOPs: 2 per weight, per token and chosen expert."""
    h, i, _, k, activation, _, _ = SHAPES[name]
    return 2.0 * tokens * k * params_per_expert(h, i, activation)


def uniform_touched(e, k, tokens) -> float:
    """Experts ``tokens`` tokens are expected to touch under uniform top-``k`` routing: ``E (1 - (1 - k/E)^T)``."""
    return e * (1 - (1 - k / e) ** tokens)


def floor_seconds(h, i, e, k, activation, tokens, bandwidth, bytes_per_param=NVFP4_BYTES_PER_PARAM,
                  touched=None) -> float:
    """Seconds to read the weights of ``touched`` experts (default: :func:`uniform_touched`) once, at
    ``bandwidth`` bytes/s: experts x params per expert x ``bytes_per_param``."""
    if touched is None:
        touched = uniform_touched(e, k, tokens)
    return touched * params_per_expert(h, i, activation) * bytes_per_param / bandwidth


def row_floors(name, tokens, read_bandwidth, copy_bandwidth=None, touched=None) -> dict:
    """A row's floors in us: NVFP4 at the read bandwidth (``floor_us``, the one ratios use), NVFP4 at the copy
    bandwidth (``floor_copy_us``, the definition before issue 31; left out without a measured copy bandwidth)
    and MXFP4 at the read bandwidth (the peer's), for ``touched`` experts (measured; default the uniform
    expectation), both counts recorded."""
    h, i, e, k, activation, _, _ = SHAPES[name]
    uniform = uniform_touched(e, k, tokens)
    touched = uniform if touched is None else touched
    per = dict(h=h, i=i, e=e, k=k, activation=activation, tokens=tokens, touched=touched)
    floors = dict(experts_touched=touched, experts_touched_uniform=uniform,
                  floor_us=floor_seconds(bandwidth=read_bandwidth, **per) * 1e6)
    if copy_bandwidth is not None:
        floors["floor_copy_us"] = floor_seconds(bandwidth=copy_bandwidth, **per) * 1e6
    floors["floor_mxfp4_us"] = floor_seconds(bandwidth=read_bandwidth, bytes_per_param=MXFP4_BYTES_PER_PARAM,
                                             **per) * 1e6
    return floors


def touched_experts(name, logits_sets, bias) -> float:
    """The mean number of distinct experts the shape's routing selects for each set of router logits."""
    from moe_passes.kernels.reference import route

    _, _, _, k, _, routing, extra = SHAPES[name]
    return statistics.fmean(route(lg, k, routing, routing_bias=bias, **extra)[1].unique().numel()
                            for lg in logits_sets)


def random_nvfp4(e, n, k, device):
    """Random packed E2M1 bytes and E4M3 block scales (values 2^-3..2^1), global scale 1/64 per expert."""
    w = torch.randint(0, 256, (e, n, k // 2), dtype=torch.uint8, device=device)
    exps = torch.randint(-3, 2, (e, n, k // 16), device=device).float()
    s = (torch.exp2(exps) * (1 + torch.randint(0, 8, exps.shape, device=device) / 8)).to(torch.float8_e4m3fn)
    gs = torch.full((e,), 64.0, dtype=torch.float32, device=device)
    return w, s, gs


def time_graph(fn: Callable[[int], torch.Tensor], reps: int, replays: int) -> float:
    """Capture ``reps`` calls ``fn(0..reps-1)`` in one graph; median seconds per call over ``replays``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for r in range(reps):
            fn(r)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(reps):
            fn(r)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def _grouped_mm_moe(x, logits, w13_t, w2_t, top_k, activation, routing, bias, extra):
    from moe_passes.kernels.reference import apply_activation, route

    weights, ids = route(logits, top_k, routing, routing_bias=bias, **extra)
    flat = ids.reshape(-1)
    experts = w13_t.shape[0]
    order = torch.argsort(flat)
    counts = torch.zeros(experts, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    token = order // top_k
    h = torch._grouped_mm(x[token], w13_t, offs=offs)
    a = apply_activation(h.float(), activation).to(torch.bfloat16)
    y = torch._grouped_mm(a, w2_t, offs=offs).float() * weights.reshape(-1)[order].unsqueeze(1)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, token, y)
    return out.to(torch.bfloat16)


def triton_layer(name, device):
    """A benchmark shape's layer for the Triton kernel: ``(spec, prepared weights, RunArgs, routing bias or
    None, padded hidden size)``; call it as ``spec.run(x, logits, weights, None, None, bias, args)``."""
    from moe_passes.kernels import registry
    from moe_passes.contract import MoEShape

    h, i, e, k, activation, routing, extra = SHAPES[name]
    spec = registry.get("triton")
    n1 = (2 if activation != "relu2" else 1) * i
    shape = MoEShape(hidden=h, intermediate=i, experts=e, top_k=k, activation=activation, alignment=spec.alignment)
    hp = shape.hidden_padded
    w13, s13, g13 = random_nvfp4(e, n1, hp, device)
    w2, s2, g2 = random_nvfp4(e, hp, shape.intermediate_padded, device)
    weights = spec.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), shape)
    args = registry.RunArgs(top_k=k, activation=activation, routing=routing, **extra)
    bias = (torch.randn(e, device=device) / 10) if routing == "deepseek_v3" else None
    return spec, weights, args, bias, hp


def plan_label(tokens, weights, args, device) -> str:
    """What the Triton layer on ``weights`` runs at ``tokens`` (``RunArgs`` ``args``): its plan's variant and the
    config fields off their defaults, as ``moe-nvfp4 plan`` names them."""
    from moe_passes.kernels.triton_moe import call_problem, plan_call

    problem = call_problem(tokens, weights, args.top_k, args.activation, args.routing, args.n_group, args.topk_group,
                           None, False)
    p = plan_call(problem, device, args.options)
    return p.variant if p.config is None else f"{p.variant} [{p.knobs()}]"


def float_weights(name, device, seed=0):
    """A shape's bf16 expert weights, ``w13 [E, N1, H]`` (``[gate; up]`` when gated) and ``w2 [E, H, I]``, Gaussian
    with unit gain (1/sqrt(fan-in)): the one set every layer of a row is built from."""
    h, i, e, k, activation, _, _ = SHAPES[name]
    n1 = (2 if activation != "relu2" else 1) * i
    gen = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.randn(e, n1, h, generator=gen, device=device, dtype=torch.bfloat16).mul_(h ** -0.5)
    w2 = torch.randn(e, h, i, generator=gen, device=device, dtype=torch.bfloat16).mul_(i ** -0.5)
    return w13, w2


def _quantize_nvfp4_chunked(w):
    """The project's ``quantize_nvfp4_experts`` (what ``FusedMoE.from_float`` uses) a few experts at a time: its fp32
    temporaries for DeepSeek-V3's w13 at once would not fit on the card."""
    from moe_passes.kernels.nvfp4 import quantize_nvfp4_experts
    e, n, k = w.shape
    q = torch.empty(e, n, k // 2, dtype=torch.uint8, device=w.device)
    s = torch.empty(e, n, k // 16, dtype=torch.float8_e4m3fn, device=w.device)
    g = torch.empty(e, dtype=torch.float32, device=w.device)
    per = max(1, int(1e9 // (n * k * 4)))
    for a in range(0, e, per):
        q[a:a + per], s[a:a + per], g[a:a + per] = quantize_nvfp4_experts(w[a:a + per])
    return q, s, g


def triton_layer_from_float(name, w13, w2):
    """``(spec, prepared weights, RunArgs, canonical MoEWeights)`` of the Triton kernel for float weights."""
    from moe_passes.kernels import registry
    from moe_passes.contract import MoEShape

    h, i, e, k, activation, routing, extra = SHAPES[name]
    spec = registry.get("triton")
    shape = MoEShape(hidden=h, intermediate=i, experts=e, top_k=k, activation=activation, alignment=spec.alignment)
    if (shape.hidden_padded, shape.intermediate_padded) != (h, i):
        raise RuntimeError(f"{name}: the triton kernel pads H/I to {shape.hidden_padded}/{shape.intermediate_padded}; "
                           "the benchmark compares unpadded layers")
    canonical = registry.MoEWeights(*_quantize_nvfp4_chunked(w13), *_quantize_nvfp4_chunked(w2))
    prepared = spec.prepare(canonical, shape)
    return spec, prepared, registry.RunArgs(top_k=k, activation=activation, routing=routing, **extra), canonical


def _grouped_mm_weights(w13, w2, probe, note):
    """bf16 weights for :func:`_grouped_mm_moe`, transposed views when this torch takes them (``probe`` runs one
    call), else contiguous ``[E, K, N]`` copies."""
    views = (w13.transpose(1, 2), w2.transpose(1, 2))
    try:
        probe(views)
        return views
    except Exception as exc:
        note(f"grouped_mm with transposed weights failed ({type(exc).__name__}: {exc}); using contiguous [E, K, N]")
        return views[0].contiguous(), views[1].contiguous()


def _reps_replays(tokens):
    return (16 if tokens <= 128 else (4 if tokens <= 1024 else 2)), (20 if tokens <= 128 else 5)


class Settings:
    """What one run measures (from the command line)."""

    def __init__(self, grouped_mm=True, tk=None, peer_experts=True, check="all", tol=2e-2, deadline=None,
                 bf16_peak=None):
        self.grouped_mm, self.tk, self.peer_experts = grouped_mm, tk, peer_experts
        self.check, self.tol, self.deadline, self.bf16_peak = check, tol, deadline, bf16_peak


def shape_seed(name, seed=0) -> int:
    """The seed of shape ``name``'s weights, routing bias and inputs in a run seeded ``seed``."""
    return seed * 1000 + list(SHAPES).index(name)


def routing_bias(name, device, seed: int):
    """The shape's routing correction bias (``deepseek_v3`` routing; None otherwise) for its ``shape_seed``:
    random, std 0.1, which concentrates the routing on fewer experts than uniform routing would touch (what the
    planner's rows per expert and the floor assume)."""
    e, routing = SHAPES[name][2], SHAPES[name][5]
    if routing != "deepseek_v3":
        return None
    return torch.randn(e, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1)) / 10


def token_inputs(name, tokens, reps, device, seed: int):
    """``reps`` sets of bf16 hidden states ``[tokens, H]`` and fp32 router logits ``[tokens, E]`` for the shape's
    ``shape_seed``."""
    h, e = SHAPES[name][0], SHAPES[name][2]
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + tokens)
    xs = [torch.randn(tokens, h, device=device, generator=gen).to(torch.bfloat16) for _ in range(reps)]
    ls = [torch.randn(tokens, e, device=device, generator=gen) for _ in range(reps)]
    return xs, ls


def measure_shape(name, tokens_list, read_bandwidth, copy_bandwidth, settings: Settings, emit, note=print, seed=0):
    """Build every layer of shape ``name`` from one set of float weights and time them at each token count.

    ``emit(row)`` gets each finished row (the caller prints and writes the JSON); a row skipped for the budget
    is emitted as ``dict(shape, tokens, skipped=reason)``.  Returns the rows."""
    from moe_passes import bench_peer
    from moe_passes.kernels.nvfp4 import dequantize_nvfp4
    from moe_passes.kernels.reference import route

    h, i, e, k, activation, routing, extra = SHAPES[name]
    device = torch.device("cuda")
    seed = shape_seed(name, seed)
    started = time.time()
    w13, w2 = float_weights(name, device, seed)
    bias = routing_bias(name, device, seed)
    spec, prepared, args, canonical = triton_layer_from_float(name, w13, w2)
    checking = settings.check != "none"
    peer = None
    if settings.tk is not None:
        peer = bench_peer.build_peer(settings.tk, w13, w2, k, activation, routing, keep_canonical=checking)
    ref_weights = {}
    if checking:
        ref_weights["nvfp4"] = (
            lambda x: dequantize_nvfp4(canonical.w13[x], canonical.w13_scale[x], canonical.w13_global_scale[x]),
            lambda x: dequantize_nvfp4(canonical.w2[x], canonical.w2_scale[x], canonical.w2_global_scale[x]))
        ref_weights["bf16"] = (lambda x: w13[x].float(), lambda x: w2[x].float())
        if peer is not None:
            ref_weights["mxfp4"] = (peer.w13_fp32, peer.w2_fp32)
    else:
        canonical = None
    gmm = None
    if settings.grouped_mm:
        x0 = torch.randn(4, h, device=device).to(torch.bfloat16)
        gmm = _grouped_mm_weights(w13, w2, lambda ws: _grouped_mm_moe(
            x0, torch.randn(4, e, device=device), ws[0], ws[1], k, activation, routing, bias, extra), note)
    if not checking and gmm is None:
        w13 = w2 = None  # nothing reads the float weights any more
    torch.cuda.synchronize()
    note(f"{name}: layers built in {time.time() - started:.1f} s, {torch.cuda.memory_allocated() / 2**30:.1f} GiB "
         "on the GPU")
    check_at = set(tokens_list) if settings.check == "all" else (
        {min(tokens_list), max(tokens_list)} if settings.check == "ends" else set())

    def ours(x, logits):
        return spec.run(x, logits, prepared, None, None, bias, args)

    rows = []
    for t in tokens_list:
        if settings.deadline is not None and time.time() > settings.deadline:
            row = dict(shape=name, tokens=t, skipped="budget (--budget-s) spent")
            emit(row)
            continue
        reps, replays = _reps_replays(t)
        xs, ls = token_inputs(name, t, reps, device, seed)
        row = dict(shape=name, tokens=t, hidden=h, intermediate=i, experts=e, top_k=k, activation=activation,
                   routing=routing, reps=reps, replays=replays, read_bandwidth_TBps=read_bandwidth / 1e12,
                   copy_bandwidth_TBps=copy_bandwidth / 1e12,
                   **row_floors(name, t, read_bandwidth, copy_bandwidth, touched_experts(name, ls, bias)),
                   useful_tflop=useful_flops(name, t) / 1e12, triton_plan=plan_label(t, prepared, args, device))
        if settings.bf16_peak:
            row["bf16_peak_TFLOPs"] = settings.bf16_peak / 1e12
        failed = set()
        if t in check_at:
            failed = _check_row(row, xs[0], ls[0], ours, peer, ref_weights, route, bias, extra, settings.tol, note)

        def timed(key, fn):
            if key in failed:
                row[key + "_error"] = "not timed: its output failed the reference check"
                return
            try:
                row[key + "_us"] = time_graph(fn, reps, replays) * 1e6
            except Exception as exc:  # report it and keep measuring the others
                row[key + "_error"] = f"{type(exc).__name__}: {exc}"[:400]
                note(f"{name} T={t} {key}: {row[key + '_error']}")
                torch.cuda.synchronize()  # a broken context raises here and ends the run: nothing after is sound

        timed("triton", lambda r: ours(xs[r], ls[r]))
        if peer is not None:
            timed("peer", lambda r: bench_peer.layer_forward(peer, xs[r], ls[r], bias, extra))
            if settings.peer_experts:
                pre = [route(ls[r], k, routing, routing_bias=bias, **extra) for r in range(reps)]
                timed("peer_experts", lambda r: bench_peer.experts_forward(
                    peer, xs[r], bench_peer.routing_from_ids(peer, pre[r][1], pre[r][0])))
                pre = None
        if gmm is not None:
            timed("grouped_mm", lambda r: _grouped_mm_moe(xs[r], ls[r], gmm[0], gmm[1], k, activation, routing, bias,
                                                          extra))
        add_ratios(row)
        emit(row)
        rows.append(row)
        xs = ls = None
    w13 = w2 = prepared = canonical = peer = gmm = ref_weights = None
    torch.cuda.empty_cache()
    return rows


def _check_row(row, x, logits, ours, peer, ref_weights, route, bias, extra, tol, note) -> set:
    """Compare ours (and the peer) with fp32 references on the same routing: each on its own dequantized weights
    (does the kernel compute the layer?) and on the bf16 weights (what the format costs).  Fills ``row``;
    returns the names of the layers that failed (``triton``, ``peer``), which are then not timed."""
    from moe_passes import bench_peer

    _, _, _, k, activation, routing, _ = SHAPES[row["shape"]]
    failed = set()
    try:
        weights, ids = route(logits, k, routing, routing_bias=bias, **extra)
        refs = {fmt: bench_peer.reference_moe(x, ids, weights, w13_of, w2_of, activation)
                for fmt, (w13_of, w2_of) in ref_weights.items()}
        outs = {"triton": (ours(x, logits), "nvfp4")}
        if peer is not None:
            routed, peer_ids = bench_peer.routing_from_logits(peer, logits, bias, extra)
            outs["peer"] = (bench_peer.experts_forward(peer, x, routed), "mxfp4")
            same = torch.sort(peer_ids.long(), 1).values == torch.sort(ids.long(), 1).values
            row["peer_routing_mismatched_tokens"] = int((~same.all(1)).sum())
        for key, (out, fmt) in outs.items():
            err = bench_peer.rel_err(out, refs[fmt])
            row[f"err_{key}_vs_{fmt}_ref"] = err
            row[f"err_{key}_vs_bf16_ref"] = bench_peer.rel_err(out, refs["bf16"])
            if not err <= tol:  # NaN fails too
                failed.add(key)
        row["check"] = "ok" if not failed else "FAIL " + ",".join(sorted(failed))
    except Exception as exc:
        row["check"] = "error"
        row["check_error"] = f"{type(exc).__name__}: {exc}"[:400]
        note(f"{row['shape']} T={row['tokens']} check: {row['check_error']}")
        failed = {"triton", "peer"}
    return failed


def add_ratios(row):
    """The row's ratios from its times: above 1, ours (``triton``) is faster; ``*_over_floor`` is a layer's time
    over its own format's floor at the read bandwidth; ``peer_over_floor`` is the peer's over the NVFP4 floor, the
    most ``peer_over_triton`` an NVFP4 layer could read (one at its floor)."""
    ours = row.get("triton_us")
    if ours:
        row["triton_over_floor"] = ours / row["floor_us"]
        for key in ("peer", "peer_experts", "grouped_mm"):
            if key + "_us" in row:
                row[f"{key}_over_triton"] = row[key + "_us"] / ours
        if "grouped_mm_us" in row:
            row["speedup_vs_grouped_mm"] = row["grouped_mm_us"] / ours  # the name before issue 31
    if "peer_us" in row:
        row["peer_over_mxfp4_floor"] = row["peer_us"] / row["floor_mxfp4_us"]
        row["peer_over_floor"] = row["peer_us"] / row["floor_us"]
    for key in ("triton", "peer"):
        if row.get(key + "_us") and "useful_tflop" in row:
            row[key + "_TFLOPs"] = row["useful_tflop"] / (row[key + "_us"] * 1e-6)
            if row.get("bf16_peak_TFLOPs"):
                row[key + "_over_bf16_peak"] = row[key + "_TFLOPs"] / row["bf16_peak_TFLOPs"]
    return row


# ------------------------------------------------------------------------------------------------------------
# JSON of one run, split runs merged, plots
# ------------------------------------------------------------------------------------------------------------
def merge_runs(docs: list) -> dict:
    """One document from the JSON of several runs (one shape or token range each, as the 10-minute device calls
    allow): rows keyed by (shape, tokens), a later run's measured row replacing an earlier one, a skipped row or
    one whose check failed never replacing a measured one that passed.  Runs on different devices are refused: their ratios do not compare."""
    if not docs:
        raise ValueError("nothing to merge")
    devices = sorted({d.get("meta", {}).get("device") for d in docs}, key=str)
    if len(devices) > 1:
        raise ValueError(f"runs from different devices {devices}: rerun on one device instead of merging")
    def good(row):
        return "skipped" not in row and row.get("check", "ok") == "ok"

    rows = {}
    for doc in docs:
        for row in doc.get("results", []):
            key = (row["shape"], row["tokens"])
            if key in rows and good(rows[key]) and not good(row):
                continue  # a skipped row, or one whose check failed (a layer untimed), keeps the good one
            rows[key] = row
    order = {name: n for n, name in enumerate(SHAPES)}
    merged = sorted(rows.values(), key=lambda r: (order.get(r["shape"], len(order)), r["shape"], r["tokens"]))
    metas = [d.get("meta", {}) for d in docs]
    return dict(meta=dict(device=devices[0], merged_from=metas), results=merged,
                peer=[d.get("peer") for d in docs])


def measured(rows) -> list:
    return [r for r in rows if "skipped" not in r]


def _pyplot():
    """matplotlib's pyplot on a file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(rows, path) -> bool:
    """Times against tokens, one panel per shape."""
    plt, rows = _pyplot(), measured(rows)
    names = list(dict.fromkeys(r["shape"] for r in rows))
    if plt is None or not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["shape"] == name]
        for key, style, label in (("triton_us", "o-", "ours: triton NVFP4"), ("peer_us", "^-", "triton_kernels MXFP4"),
                                  ("grouped_mm_us", "s-", "bf16 _grouped_mm"), ("floor_us", "k--", "NVFP4 floor (read)")):
            pts = [(r["tokens"], r[key]) for r in rs if key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("us per layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ratios(rows, path) -> bool:
    """Issue 31's plot: peer / ours (above 1: ours faster; targets 1.0 and 1.2 drawn) and ours / floor against
    tokens, one line per shape."""
    plt, rows = _pyplot(), measured(rows)
    names = list(dict.fromkeys(r["shape"] for r in rows))
    if plt is None or not names:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        rs = [r for r in rows if r["shape"] == name]
        pts = [(r["tokens"], r["peer_over_triton"]) for r in rs if "peer_over_triton" in r]
        if pts:
            left.plot(*zip(*pts), "o-", label=name)
        pts = [(r["tokens"], r["triton_over_floor"]) for r in rs if "triton_over_floor" in r]
        if pts:
            right.plot(*zip(*pts), "o-", label=name)
    for y in (1.0, 1.2):
        left.axhline(y, color="k", lw=0.8, ls="--" if y == 1.0 else ":")
    right.axhline(1.0, color="k", lw=0.8, ls="--")
    left.set_title("triton_kernels MXFP4 / ours (above 1: ours faster)")
    right.set_title("ours / NVFP4 floor at the read bandwidth")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(doc, out, plots=True) -> list:
    """``bench_moe.json`` (and the plots) in ``out``; returns what was written."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, JSON_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a run killed mid-write keeps the previous row's file
    written = [path]
    if plots:
        for fn, name in ((plot, "bench_moe.png"), (plot_ratios, "bench_moe_ratios.png")):
            if fn(doc["results"], os.path.join(out, name)):
                written.append(os.path.join(out, name))
    return written


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-nvfp4 bench", description=__doc__.split("\n\n")[0],
                                     epilog="With --model NAME it benchmarks a transformers model end to end instead "
                                            "(moe_passes.bench_model; moe-nvfp4 bench --model NAME --help).")
    parser.add_argument("--shapes", type=shape_list, default=list(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", type=token_list, default=list(TOKENS),
                        help="comma list of token counts, or 'sweep' for " + ",".join(map(str, SWEEP_TOKENS)))
    parser.add_argument("--out", default=".", help=f"folder for {JSON_NAME} and the plots")
    parser.add_argument("--no-grouped-mm", "--no-peer", dest="no_grouped_mm", action="store_true",
                        help="skip the bf16 _grouped_mm layer (--no-peer: its name before issue 31)")
    parser.add_argument("--no-tk-peer", action="store_true", help="skip the triton_kernels MXFP4 peer")
    parser.add_argument("--peer-path", default=None,
                        help="folder holding triton_kernels/ (the source), tried after an installed triton_kernels "
                             "and vllm.third_party.triton_kernels")
    parser.add_argument("--no-peer-experts", action="store_true",
                        help="skip the peer timed from precomputed top-k ids (peer_experts)")
    parser.add_argument("--check", choices=CHECK_MODES, default="all",
                        help="token counts checked against the fp32 reference before timing (default all)")
    parser.add_argument("--tol", type=float, default=2e-2,
                        help="largest relative error of a 4-bit layer against the reference on its own weights")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip the rows left once this many seconds have passed (the JSON says which)")
    parser.add_argument("--read-gib", type=float, default=4.0, help="buffer size of the read-bandwidth measurement")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help=f"no GPU: join the {JSON_NAME} of split runs into --out (rows, plots)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def given(flag):
        return any(a == flag or a.startswith(flag + "=") for a in argv)

    if given("--model"):  # a transformers model end to end: its own module
        from moe_passes import bench_model

        return bench_model.main(argv)
    if given("--parallel"):  # an EP / TP layer per rank: its own module
        from moe_passes import bench_parallel

        return bench_parallel.main(argv)
    parser = build_parser()
    opts = parser.parse_args(argv)
    if os.path.exists(opts.out) and not os.path.isdir(opts.out):
        parser.error(f"--out {opts.out!r} is a file; it names the folder the results go to")
    if opts.merge:
        try:
            docs = []
            for path in opts.merge:
                with open(path) as f:
                    docs.append(json.load(f))
                if not isinstance(docs[-1], dict) or not isinstance(docs[-1].get("results", []), list):
                    raise ValueError(f"{path} is not a bench_moe.json document (an object with a results list)")
            doc = merge_runs(docs)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"moe-nvfp4 bench --merge: {exc}", file=sys.stderr)
            return 2
        for path in write_outputs(doc, opts.out):
            print(path)
        return 0
    if not torch.cuda.is_available():
        print("moe-nvfp4 bench needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.time()

    def note(msg):
        print(f"# [{time.time() - started:6.1f}s] {msg}", flush=True)

    tk, peer_info = None, dict(available=False, reason="skipped: --no-tk-peer")
    if not opts.no_tk_peer:
        from moe_passes import bench_peer
        tk, peer_info = bench_peer.find_triton_kernels(opts.peer_path)
        if tk is not None:
            bench_peer.set_split_k_one()
            peer_info["split_k"] = 1
        note("peer: " + (f"triton_kernels from {peer_info['source']}" if tk is not None else peer_info["reason"]))
    torch.manual_seed(0)
    copy_bw = measure_copy_bandwidth()
    read_bw = measure_read_bandwidth(int(opts.read_gib * 2**30) // 8 * 8)
    peak = measure_bf16_peak()
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(date=datetime.date.today().isoformat(), device=props.name, sm_count=props.multi_processor_count,
                torch=torch.__version__, triton=triton_version, copy_bandwidth_TBps=copy_bw / 1e12,
                read_bandwidth_TBps=read_bw / 1e12, floor_bandwidth="read", bf16_peak_TFLOPs=peak / 1e12,
                bytes_per_param=dict(nvfp4=NVFP4_BYTES_PER_PARAM, mxfp4=MXFP4_BYTES_PER_PARAM),
                check=opts.check, tol=opts.tol, budget_s=opts.budget_s,
                command="moe-nvfp4 bench " + " ".join(argv))
    doc = dict(meta=meta, peer=peer_info, results=[])
    print(f"# {meta['device']}  read bandwidth {read_bw / 1e12:.2f} TB/s (floor)  copy bandwidth "
          f"{copy_bw / 1e12:.2f} TB/s  bf16 matmul {peak / 1e12:.0f} TFLOP/s  torch {torch.__version__}  "
          f"triton {triton_version}", flush=True)
    print(HEADER, flush=True)

    def emit(row):
        doc["results"].append(row)
        print(format_row(row), flush=True)
        write_outputs(doc, opts.out, plots=False)

    settings = Settings(grouped_mm=not opts.no_grouped_mm, tk=tk, peer_experts=not opts.no_peer_experts,
                        check=opts.check, tol=opts.tol, bf16_peak=peak,
                        deadline=started + opts.budget_s if opts.budget_s is not None else None)
    with torch.no_grad():
        for name in opts.shapes:
            if settings.deadline is not None and time.time() > settings.deadline:
                for t in opts.tokens:
                    emit(dict(shape=name, tokens=t, skipped="budget (--budget-s) spent"))
                continue
            measure_shape(name, opts.tokens, read_bw, copy_bw, settings, emit, note)
    meta["wall_s"] = time.time() - started
    written = write_outputs(doc, opts.out)
    if len(written) == 1:
        note("matplotlib is not installed: no PNG written")
    skipped = [r for r in doc["results"] if "skipped" in r]
    if skipped:
        note(f"{len(skipped)} rows skipped for the budget: " + ", ".join(f"{r['shape']}@{r['tokens']}" for r in skipped))
    bad = [r for r in doc["results"] if r.get("check", "ok") != "ok"]
    if bad:
        note("reference check failed: " + ", ".join(f"{r['shape']}@{r['tokens']} {r['check']}" for r in bad))
    return 1 if bad else 0


HEADER = (f"{'shape':16s} {'T':>5s} {'floor':>8s} {'ours':>8s} {'peer':>8s} {'peerX':>8s} {'bf16gmm':>8s} "
          f"{'peer/o':>6s} {'bf16/o':>6s} {'o/fl':>6s} {'p/fl':>6s} {'p/flMX':>6s} {'o/pk':>5s}  check")


def format_row(r) -> str:
    """One printed line per row (``-``: not measured)."""
    if "skipped" in r:
        return f"{r['shape']:16s} {r['tokens']:5d} skipped: {r['skipped']}"

    def cell(key, width, digits=1):
        v = r.get(key)
        return f"{'-':>{width}s}" if v is None else f"{v:{width}.{digits}f}"

    errors = [k for k in r if k.endswith("_error")]
    check = r.get("check", "-")
    if "err_triton_vs_nvfp4_ref" in r:
        check += f" ({r['err_triton_vs_nvfp4_ref']:.1e}/{r.get('err_peer_vs_mxfp4_ref', float('nan')):.1e})"
    return (f"{r['shape']:16s} {r['tokens']:5d} {cell('floor_us', 8)} {cell('triton_us', 8)} {cell('peer_us', 8)} "
            f"{cell('peer_experts_us', 8)} {cell('grouped_mm_us', 8)} {cell('peer_over_triton', 6, 2)} "
            f"{cell('grouped_mm_over_triton', 6, 2)} {cell('triton_over_floor', 6, 2)} {cell('peer_over_floor', 6, 2)} "
            f"{cell('peer_over_mxfp4_floor', 6, 2)} {cell('triton_over_bf16_peak', 5, 2)}  {check}"
            + (f"  errors: {', '.join(errors)}" if errors else ""))


if __name__ == "__main__":
    sys.exit(main())
