"""``moe-nvfp4 bench``: the Triton NVFP4 MoE layer against a bf16 ``torch._grouped_mm`` MoE and the floor.

One run measures, per model layer shape and token count:

* ``triton``: the registered Triton kernel, whole layer (routing to output), CUDA-graph captured;
* ``grouped_mm``: a bf16 MoE (route, sort by expert, two ``torch._grouped_mm`` GEMMs, activation,
  weighted ``index_add``), also captured;
* ``floor``: the NVFP4 weight-bandwidth floor, ``touched * params_per_expert * 9/16 / bandwidth``
  with ``touched = E * (1 - (1 - k/E)^M)`` and the copy bandwidth measured at the start of the run.

Each graph holds ``R`` back-to-back layer calls on ``R`` different input sets (different experts),
so that weights left in L2 by one call are rarely the next call's; times are per call (median over
replays).  Weights are random bytes (E2M1 codes) with random E4M3 block scales: never zeros.
Writes ``bench_moe.json`` and ``bench_moe.png`` (matplotlib, when it is installed) to ``--out``.
``--parallel ep|tp`` times an expert- / tensor-parallel layer per rank instead (``moe_passes.bench_parallel``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
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


def shape_list(text: str) -> list:
    """A benchmark's ``--shapes``: comma-separated names from :data:`SHAPES` (an argparse ``type``)."""
    shapes = [s for s in text.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise argparse.ArgumentTypeError(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}" if unknown
                                         else f"no shapes given; choose from {', '.join(SHAPES)}")
    return shapes


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def floor_seconds(h, i, e, k, activation, tokens, bandwidth) -> float:
    params = (3 if activation != "relu2" else 2) * h * i
    touched = e * (1 - (1 - k / e) ** tokens)
    return touched * params * 9 / 16 / bandwidth


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


def run_shape(name, tokens_list, bandwidth, log, do_peer=True, log_note=print, options=None):
    """Time one shape at each token count; ``options`` (a ``KernelOptions``, None: the default) reach the kernel
    through its ``RunArgs``."""
    h, i, e, k, activation, routing, extra = SHAPES[name]
    device = torch.device("cuda")
    n1 = (2 if activation != "relu2" else 1) * i
    spec, weights, args, bias, hp = triton_layer(name, device)
    if options is not None:
        args = dataclasses.replace(args, options=options)
    peer = None
    if do_peer:
        # bf16 weights stored [E, N, K] (K contiguous), handed to _grouped_mm transposed.
        w13_bf = (torch.randn(e, n1, h, device=device, dtype=torch.bfloat16) / 10)
        w2_bf = (torch.randn(e, h, i, device=device, dtype=torch.bfloat16) / 10)
        peer = (w13_bf.transpose(1, 2), w2_bf.transpose(1, 2))
        try:  # some torch builds want the second operand K-major: fall back to a contiguous copy
            x0 = (torch.randn(4, h, device=device) / 10).to(torch.bfloat16)
            _grouped_mm_moe(x0, torch.randn(4, e, device=device), peer[0], peer[1], k, activation, routing, bias, extra)
        except Exception as exc:
            log_note(f"grouped_mm with transposed weights failed ({type(exc).__name__}: {exc}); using contiguous [E, K, N]")
            peer = (peer[0].contiguous(), peer[1].contiguous())
            del w13_bf, w2_bf
    rows = []
    for t in tokens_list:
        reps = 16 if t <= 128 else (4 if t <= 1024 else 2)
        replays = 20 if t <= 128 else 5
        xs = [(torch.randn(t, hp, device=device) / 10).to(torch.bfloat16) for _ in range(reps)]
        ls = [torch.randn(t, e, device=device) for _ in range(reps)]
        row = dict(shape=name, tokens=t, hidden=h, intermediate=i, experts=e, top_k=k, activation=activation,
                   routing=routing, floor_us=floor_seconds(h, i, e, k, activation, t, bandwidth) * 1e6)
        row["triton_us"] = time_graph(
            lambda r: spec.run(xs[r], ls[r], weights, None, None, bias, args), reps, replays) * 1e6
        if peer is not None:
            xb = [x[:, :h].contiguous() for x in xs]
            try:
                row["grouped_mm_us"] = time_graph(
                    lambda r: _grouped_mm_moe(xb[r], ls[r], peer[0], peer[1], k, activation, routing, bias, extra),
                    reps, replays) * 1e6
            except Exception as exc:  # report, keep measuring the kernel
                row["grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:300]
        row["triton_over_floor"] = row["triton_us"] / row["floor_us"]
        if "grouped_mm_us" in row:
            row["speedup_vs_grouped_mm"] = row["grouped_mm_us"] / row["triton_us"]
        log(row)
        rows.append(row)
        del xs, ls
    del weights, peer
    torch.cuda.empty_cache()
    return rows


def plot(rows, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["shape"] == name]
        tok = [r["tokens"] for r in rs]
        ax.plot(tok, [r["triton_us"] for r in rs], "o-", label="triton NVFP4 (graph)")
        if all("grouped_mm_us" in r for r in rs):
            ax.plot(tok, [r["grouped_mm_us"] for r in rs], "s-", label="bf16 _grouped_mm (graph)")
        ax.plot(tok, [r["floor_us"] for r in rs], "k--", label="NVFP4 weight floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("tokens")
        ax.set_ylabel("us per layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    if "--parallel" in (sys.argv[1:] if argv is None else argv):  # an EP / TP layer per rank: its own module
        from moe_passes import bench_parallel

        return bench_parallel.main(argv)
    parser = argparse.ArgumentParser(prog="moe-nvfp4 bench", description=__doc__.split("\n\n")[0],
                                     epilog="With --model NAME it benchmarks a transformers model end to end instead "
                                            "(moe_passes.bench_model; moe-nvfp4 bench --model NAME --help).")
    parser.add_argument("--shapes", type=shape_list, default=",".join(SHAPES),
                        help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    parser.add_argument("--out", default=".", help="folder for bench_moe.json and bench_moe.png")
    parser.add_argument("--no-peer", action="store_true", help="skip the bf16 _grouped_mm peer")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe-nvfp4 bench needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = opts.shapes
    tokens = [int(t) for t in opts.tokens.split(",") if t]
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = dict(date=datetime.date.today().isoformat(), device=props.name, sm_count=props.multi_processor_count,
                torch=torch.__version__, triton=triton_version, copy_bandwidth_TBps=bandwidth / 1e12,
                command="moe-nvfp4 bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"# {meta['device']}  copy bandwidth {bandwidth / 1e12:.2f} TB/s  torch {torch.__version__}  "
          f"triton {triton_version}", flush=True)
    header = f"{'shape':18s} {'T':>5s} {'floor':>8s} {'triton':>8s} {'x floor':>7s} {'bf16 gmm':>9s} {'speedup':>7s}"
    print(header, flush=True)

    def log(r):
        g = r.get("grouped_mm_us")
        print(f"{r['shape']:18s} {r['tokens']:5d} {r['floor_us']:8.1f} {r['triton_us']:8.1f} "
              f"{r['triton_over_floor']:7.2f} {g if g is None else round(g, 1)!s:>9s} "
              f"{r.get('speedup_vs_grouped_mm', float('nan')):7.2f}", flush=True)

    rows = []
    for name in shapes:
        rows += run_shape(name, tokens, bandwidth, log, do_peer=not opts.no_peer)
        with open(os.path.join(opts.out, "bench_moe.json"), "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
    png = os.path.join(opts.out, "bench_moe.png")
    if not plot(rows, png):
        print("matplotlib is not installed: no PNG written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
