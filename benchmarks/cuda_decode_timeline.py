#!/usr/bin/env python3
"""Where the one-launch CUDA decode's time goes: per-CTA phase stamps of one call (a TRACE build).

Usage: ``python benchmarks/cuda_decode_timeline.py qwen3-30b-a3b [more shapes]``.  Prints, over the CTAs,
min / median / max of each phase's start, in SM cycles and in us at 1.98 GHz (the H200's clock under load),
counted from each CTA's own start; and the span from the first CTA's start to the last one's end.  The
TRACE build records the stamps with ``%clock64`` (and ``%globaltimer`` for the span); it is a separate
compile of the same kernel, so the timings are of that build, one call, after warm-up calls.
"""

from __future__ import annotations

import sys

import torch

from moe_passes import bench
from moe_passes.kernels import cuda_decode

PHASES = {1: "routed", 3: "first stage in", 4: "GEMM1 done (last segment)", 9: "last GEMM2 stage in",
          5: "GEMM2 done", 6: "at the grid barrier", 8: "arrived (fence, add)", 7: "barrier passed",
          10: "CTA ends"}
COUNTS = {12: "GEMM1 stages not in on arrival", 13: "GEMM2 stages not in on arrival"}


def timeline(name: str) -> None:
    spec, weights, args, bias, hidden = bench.triton_layer(name, "cuda")
    experts = bench.SHAPES[name][2]
    x = (torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16)
    logits = torch.randn(1, experts, device="cuda")
    out = torch.empty(1, hidden, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    trace = torch.zeros(sms * 16, dtype=torch.int64, device="cuda")
    kw = dict(top_k=args.top_k, activation=args.activation, routing=args.routing, routing_bias=bias,
              n_group=args.n_group, topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
              out=out, trace=trace)
    for _ in range(3):
        cuda_decode.decode_one_token(x, logits, weights, **kw)
    trace.zero_()
    cuda_decode.decode_one_token(x, logits, weights, **kw)
    torch.cuda.synchronize()
    used = trace.view(sms, 16)[:, 0] != 0
    t = trace.view(sms, 16)[used].cpu().double()
    print(f"{name}: {int(used.sum())} CTAs; cycles min / median / max (us at 1.98 GHz)")
    for k, label in PHASES.items():
        v = t[:, k][t[:, k] > 0]
        if len(v):
            print(f"  {label:18s} {v.min():7.0f} {v.median():7.0f} {v.max():7.0f}   "
                  f"({v.min() / 1980:.2f} / {v.median() / 1980:.2f} / {v.max() / 1980:.2f})")
    for k, label in COUNTS.items():
        v = t[:, k]
        print(f"  {label:26s} min / median / max {v.min():.0f} / {v.median():.0f} / {v.max():.0f}")
    print(f"  first start -> last end: {(t[:, 11].max() - t[:, 0].min()) / 1e3:.2f} us (globaltimer)")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU of compute capability 9.x")
    cuda_decode.ENABLED = True
    for shape in [s for arg in sys.argv[1:] for s in arg.split(",")] or ["qwen3-30b-a3b"]:
        timeline(shape)
