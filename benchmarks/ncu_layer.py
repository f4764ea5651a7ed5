"""Eager calls of one benchmark layer, for Nsight Compute (which profiles kernels, not graph replays).

    ncu --clock-control none --kernel-name regex:"tgemv|qgemv" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python benchmarks/ncu_layer.py qwen3-30b-a3b 16

Each call routes fresh inputs, so ``--launch-skip`` past the first call skips the compilation.
"""

from __future__ import annotations

import argparse

import torch

from moe_passes import bench
from moe_passes.contract import MoEShape
from moe_passes.kernels import registry


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(bench.SHAPES))
    parser.add_argument("tokens", type=int)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_layer.py runs on a CUDA GPU")
    device = torch.device("cuda")
    spec = registry.get("triton")
    h, i, e, k, activation, routing, extra = bench.SHAPES[args.shape]
    gated = activation != "relu2"
    shape = MoEShape(hidden=h, intermediate=i, experts=e, top_k=k, activation=activation, alignment=spec.alignment)
    w13, s13, g13 = bench._random_nvfp4(e, (2 if gated else 1) * i, h, device)
    w2, s2, g2 = bench._random_nvfp4(e, h, i, device)
    weights = spec.prepare(registry.MoEWeights(w13, s13, g13, w2, s2, g2), shape)
    run_args = registry.RunArgs(top_k=k, activation=activation, routing=routing, **extra)
    bias = (torch.randn(e, device=device) / 10) if routing == "deepseek_v3" else None
    for _ in range(args.calls):
        x = (torch.randn(args.tokens, h, device=device) / 10).to(torch.bfloat16)
        logits = torch.randn(args.tokens, e, device=device)
        spec.run(x, logits, weights, None, None, bias, run_args)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
