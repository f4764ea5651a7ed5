#!/usr/bin/env python3
"""Where the one-launch CUDA decode's time goes: per-CTA phase stamps (a TRACE build of the kernel).

Usage: ``python benchmarks/cuda_decode_timeline.py qwen3-30b-a3b[,more shapes] [--sets R] [--warm]``.

Like the benchmark (``moe_passes.bench``), the calls rotate over ``R`` input sets (different experts), so a
call's weights are rarely in L2 from the call before; ``--warm`` repeats one input set instead (its weights
stay in L2: the kernel's own speed, without the memory's).  After warm-up rounds, one round of ``R`` calls is
traced.  Prints, per phase, the median over the calls of the CTAs' median / max start, in us at 1.98 GHz
(the H200's clock under load; from each CTA's own start, ``%clock64``), the span from the first CTA's start
to the last one's end (``%globaltimer``), and the same phases per CTA class: CTAs with the same number of
intermediate bands and of w2 pieces do the same work, so their spread is the memory's, not the split's.
The TRACE build is a separate compile of the same kernel: the timings are of that build.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import torch

from moe_passes import bench
from moe_passes.contract import is_gated
from moe_passes.kernels import cuda_decode
from moe_passes.kernels.options import KernelOptions

PHASES = {1: "routed", 3: "first stage in", 4: "GEMM1 done (last segment)", 9: "last GEMM2 stage in",
          5: "GEMM2 done", 6: "at the grid barrier", 8: "arrived (fence, add)", 7: "barrier passed",
          10: "CTA ends"}
COUNTS = {12: "GEMM1 stages not in on arrival", 13: "GEMM2 stages not in on arrival"}
CLOCK_GHZ = 1.98


def _classes(plan) -> dict:
    """CTAs by (intermediate bands, most w2 pieces of a segment)."""
    out = collections.defaultdict(list)
    for cta, row in enumerate(plan.segments):
        segs = cuda_decode.row_segments(row)
        if segs:
            out[(sum(n for _, _, n in segs), max(cuda_decode.piece_count(j0, n) for _, j0, n in segs))].append(cta)
    return out


def timeline(name: str, sets: int, warm: bool, options: KernelOptions) -> None:
    spec, weights, args, bias, hidden = bench.triton_layer(name, "cuda")
    experts = bench.SHAPES[name][2]
    n = 1 if warm else sets
    xs = [(torch.randn(1, hidden, device="cuda") / 10).to(torch.bfloat16) for _ in range(n)]
    logits = [torch.randn(1, experts, device="cuda") for _ in range(n)]
    out = torch.empty(1, hidden, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    traces = [torch.zeros(sms * 16, dtype=torch.int64, device="cuda") for _ in range(sets)]
    kw = dict(top_k=args.top_k, activation=args.activation, routing=args.routing, routing_bias=bias,
              n_group=args.n_group, topk_group=args.topk_group, routed_scaling_factor=args.routed_scaling_factor,
              out=out, options=options)
    for _ in range(3):  # warm-up rounds; the last one's stamps are kept
        for i in range(sets):
            traces[i].zero_()
            cuda_decode.decode_one_token(xs[i % n], logits[i % n], weights, trace=traces[i], **kw)
    torch.cuda.synchronize()
    groups = (args.n_group or 1) if args.routing == "deepseek_v3" else 1
    plan = cuda_decode.plan_for(out.device, hidden, weights[3].shape[2] * 2, experts, args.top_k,
                                is_gated(args.activation), groups, options)
    calls = [t.view(sms, 16).cpu().double() for t in traces]
    used = calls[0][:, 0] != 0
    us = lambda v: v / (CLOCK_GHZ * 1e3)  # noqa: E731
    med = statistics.median
    print(f"{name}: {int(used.sum())} CTAs, {sets} calls over {n} input set(s); us at {CLOCK_GHZ} GHz, "
          f"median over calls of the CTAs' median / max")
    for k, label in PHASES.items():
        if any((t[used, k] > 0).any() for t in calls):
            print(f"  {label:26s} {us(med(float(t[used, k].median()) for t in calls)):6.2f} / "
                  f"{us(med(float(t[used, k].max()) for t in calls)):6.2f}")
    for k, label in COUNTS.items():
        print(f"  {label:26s} median / max {med(float(t[used, k].median()) for t in calls):.0f} / "
              f"{med(float(t[used, k].max()) for t in calls):.0f}")
    span = med(float(t[used, 11].max() - t[used, 0].min()) for t in calls) / 1e3
    print(f"  first start -> last end: {span:.2f} us (globaltimer)")
    for (bands, pieces), ctas in sorted(_classes(plan).items()):
        idx = torch.tensor(ctas)
        cell = lambda k: f"{us(med(float(t[idx, k].median()) for t in calls)):5.2f}"  # noqa: E731
        print(f"  {len(ctas):3d} CTAs of {bands} bands, {pieces} w2 pieces: GEMM1 done {cell(4)}, GEMM2 done "
              f"{cell(5)}, arrived {cell(8)}")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU of compute capability 9.x")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", type=bench.shape_list, default=[["qwen3-30b-a3b"]])
    parser.add_argument("--sets", type=int, default=8, help="input sets the calls rotate over (default 8)")
    parser.add_argument("--warm", action="store_true", help="one input set: the weights stay in L2")
    ns = parser.parse_args()
    for shape in [s for arg in ns.shapes for s in arg]:
        timeline(shape, max(1, ns.sets), ns.warm, KernelOptions.from_env())
