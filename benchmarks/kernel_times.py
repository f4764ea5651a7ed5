"""Per-kernel times of one layer call for every benchmark shape, under Nsight Compute.

    ncu --clock-control none --profile-from-start off --csv \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \\
        python benchmarks/kernel_times.py 1,4,16 > kernels.csv

For where a kernel waits, name one shape and add sections, e.g. ``--section SpeedOfLight --section
MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy ... kernel_times.py 16 --shapes
qwen3-30b-a3b``.  Each shape and token count runs three eager calls on fresh inputs; only the third is
profiled (the first compiles).  ncu serializes the kernels and flushes the caches before each, so its durations are longer than
the same kernels' share of a captured, chained call: read them as a breakdown, not as the layer's time.
"""

from __future__ import annotations

import argparse

import torch

from moe_passes import bench


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokens", help="comma-separated token counts, e.g. 1,4,16")
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_times.py runs on a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in args.shapes:
        spec, weights, run_args, bias, hidden = bench.triton_layer(name, "cuda")
        experts = bench.SHAPES[name][2]
        for t in tokens:
            for call in range(3):
                x = (torch.randn(t, hidden, device="cuda") / 10).to(torch.bfloat16)
                logits = torch.randn(t, experts, device="cuda")
                torch.cuda.synchronize()
                if call == 2:
                    torch.cuda.profiler.start()
                spec.run(x, logits, weights, None, None, bias, run_args)
                torch.cuda.synchronize()
                if call == 2:
                    torch.cuda.profiler.stop()
        del weights


if __name__ == "__main__":
    main()
