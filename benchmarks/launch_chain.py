"""What each small launch of a captured decode call costs: the routing, the split-GEMM1 activation and the
combine launched twice or not at all (their work then cached or skipped), whole layer, CUDA-graph captured.

    python benchmarks/launch_chain.py 1,4,16

Twice: the marginal cost of one more such launch in the chain.  Not at all: an upper bound on what fusing
it away can save (the routing's ids and weights come from a first eager call; without the combine the
output is not written).  Only a measurement: the outputs of the variants are not meaningful.  It is
instrumentation, not an option of the kernels: it wraps the entry module's routing and combine and the
decode's activation kernel while it runs, and puts them back.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from moe_passes import bench
from moe_passes.kernels import triton_moe as tm
from moe_passes.kernels import triton_tc_decode as td

ORIGINAL = dict(route=tm.route, act=td.act_kernel, combine=tm.combine_kernel)
VARIANTS = {"base": {}, "route2": {"route": 2}, "route0": {"route": 0}, "act2": {"act": 2},
            "combine2": {"combine": 2}, "combine0": {"combine": 0}, "bare": {"route": 0, "combine": 0}}


class Repeated:
    """A Triton kernel whose launches run ``n`` times."""

    def __init__(self, kernel, n):
        self.kernel, self.n = kernel, n

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            for _ in range(self.n):
                launch(*args, **kwargs)
        return run


def routing(n, cache):
    def route(logits, *args, zero=None, pdl=False, **kwargs):
        if n == 0:
            if logits.shape not in cache:
                cache[logits.shape] = ORIGINAL["route"](logits, *args, zero=None, pdl=False, **kwargs)
            if zero is not None:
                zero.zero_()
            return cache[logits.shape]
        for _ in range(n):
            out = ORIGINAL["route"](logits, *args, zero=zero, pdl=pdl, **kwargs)
        return out
    return route


def install(variant, cache):
    tm.route = routing(variant.get("route", 1), cache)
    td.act_kernel = Repeated(ORIGINAL["act"], variant.get("act", 1))
    tm.combine_kernel = Repeated(ORIGINAL["combine"], variant.get("combine", 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokens")
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_chain.py measures on a CUDA GPU")
    results = {}
    try:
        for name in args.shapes:
            spec, weights, run_args, bias, hidden = bench.triton_layer(name, "cuda")
            experts = bench.SHAPES[name][2]
            for t in (int(x) for x in args.tokens.split(",")):
                xs = [(torch.randn(t, hidden, device="cuda") / 10).to(torch.bfloat16) for _ in range(16)]
                ls = [torch.randn(t, experts, device="cuda") for _ in range(16)]
                cache, row = {}, results.setdefault(f"{name}:{t}", {})
                for _ in range(args.rounds):
                    for vname, variant in VARIANTS.items():
                        install(variant, cache)
                        us = bench.time_graph(
                            lambda r: spec.run(xs[r], ls[r], weights, None, None, bias, run_args), 16, 20) * 1e6
                        row.setdefault(vname, []).append(round(us, 2))
                install({}, cache)
                print(name, t, " ".join(f"{v}={'/'.join(map(str, us))}" for v, us in row.items()), flush=True)
            weights = None  # the next shape's weights may need the memory
            torch.cuda.empty_cache()
    finally:
        tm.route, tm.combine_kernel = ORIGINAL["route"], ORIGINAL["combine"]
        td.act_kernel = ORIGINAL["act"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "launch_chain.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
