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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(bench.SHAPES))
    parser.add_argument("tokens", type=int)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_layer.py runs on a CUDA GPU")
    spec, weights, run_args, bias, hidden = bench.triton_layer(args.shape, "cuda")
    experts = bench.SHAPES[args.shape][2]
    for _ in range(args.calls):
        x = (torch.randn(args.tokens, hidden, device="cuda") / 10).to(torch.bfloat16)
        logits = torch.randn(args.tokens, experts, device="cuda")
        spec.run(x, logits, weights, None, None, bias, run_args)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
