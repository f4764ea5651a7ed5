"""Host time of one MoE call without CUDA graphs: what Python dispatch, checks, planning and launches cost.

    python benchmarks/host_cost.py [--shapes qwen3-30b-a3b] [--tokens 1,16,64] [--profile]

Per token count: the wall time of issuing ``--calls`` calls back to back (the GPU queue stays shallow, so
this is the host's time) against the GPU time per call from CUDA events, for the eager layer
(``FusedMoE.__call__``: the custom op's dispatch, its checks and, up to the kernel's ``graph_tokens``, the
replay of the call's own CUDA graph, above it the repeat of its recorded launches), for the same layer with
``KernelOptions(call_graphs=False)`` (``direct``: the kernel's entry runs every call) and for the bare kernel entry
(:func:`fused_moe_triton`: planning and launches, never graphed).  ``--profile`` prints cProfile's top
functions of the eager calls.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from moe_passes import FusedMoE
from moe_passes.bench import SHAPES, shape_list
from moe_passes.kernels.options import KernelOptions, use
from moe_passes.kernels.triton_moe import fused_moe_triton


def _host_and_gpu(fn, calls: int):
    for _ in range(3):  # compiles, then (a layer call of few tokens) captures its graph
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    end.record()
    torch.cuda.synchronize()
    return host * 1e6, start.elapsed_time(end) * 1e3 / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_list, default=shape_list("qwen3-30b-a3b"))
    parser.add_argument("--tokens", default="1,16,64")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for name in args.shapes:
        hidden, inter, experts, top_k, activation, routing, extra = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        rows13 = (1 if activation == "relu2" else 2) * inter
        moe = FusedMoE.from_float(torch.randn(experts, rows13, hidden, generator=g) / 50,
                                  torch.randn(experts, hidden, inter, generator=g) / 50, top_k=top_k,
                                  activation=activation, routing=routing, calibration=torch.randn(8, hidden, generator=g),
                                  routing_bias=torch.zeros(experts) if routing == "deepseek_v3" else None,
                                  **extra).cuda()
        run_kwargs = dict(top_k=top_k, activation=activation, routing=routing, routing_bias=moe.routing_bias, **extra)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(tokens, hidden, device="cuda").bfloat16()
            logits = torch.randn(tokens, experts, device="cuda")
            with torch.inference_mode():
                layer = _host_and_gpu(lambda: moe(x, logits), args.calls)
                with use(KernelOptions(call_graphs=False)):
                    direct = _host_and_gpu(lambda: moe(x, logits), args.calls)
                bare = _host_and_gpu(lambda: fused_moe_triton(x, logits, moe.kernel_weights(),
                                                              **run_kwargs), args.calls)
                if args.profile:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.calls):
                        moe(x, logits)
                    prof.disable()
                    torch.cuda.synchronize()
                    print(f"--- {name} {tokens} tokens: cProfile of {args.calls} eager calls")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
            rows.append((name, tokens, *layer, *direct, *bare))
    print(f"{'shape':>12} {'tokens':>6} {'layer host us':>14} {'layer gpu us':>13} {'direct host us':>15} "
          f"{'direct gpu us':>14} {'kernel host us':>15} {'kernel gpu us':>14}")
    for name, tokens, lh, lg, dh, dg, kh, kg in rows:
        print(f"{name:>12} {tokens:>6} {lh:14.1f} {lg:13.1f} {dh:15.1f} {dg:14.1f} {kh:15.1f} {kg:14.1f}")


if __name__ == "__main__":
    main()
