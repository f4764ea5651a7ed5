"""One expert-parallel rank's kernel time on one GPU, against the unsharded layer's.

    python benchmarks/ep_rank.py --shapes qwen3-30b-a3b --tokens 16,128,1024,4096 --world 8 --out ep_rank.json

Rank ``r`` of ``--world`` holds experts ``expert_block(E, world, r)`` and routes on the global logits
(``local_expert_offset`` / ``global_num_experts``); its time should approach ``1/world`` of the layer's as the
tokens spread over every expert.  The collective is not timed (``moe-nvfp4 bench --parallel ep`` times the whole
sharded layer on several GPUs).  CUDA-graph timed, fresh inputs per call in the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from moe_passes import bench
from moe_passes.kernels import registry
from moe_passes.parallel import expert_block


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=bench.shape_list, default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=bench.token_list, default="16,128,1024,4096")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ep_rank.py runs on a CUDA GPU")
    rows = []
    for name in args.shapes:
        spec, weights, run_args, bias, hidden = bench.triton_layer(name, "cuda")
        experts = weights.w13.shape[0]
        offset, count = expert_block(experts, args.world, args.rank)
        local = registry.MoEWeights(*(t[offset:offset + count] for t in weights))
        local_args = dataclasses.replace(run_args, local_expert_offset=offset, global_num_experts=experts)
        for tokens in args.tokens:
            reps, replays = bench._reps_replays(tokens)
            xs = [(torch.randn(tokens, hidden, device="cuda") / 10).to(torch.bfloat16) for _ in range(reps)]
            logits = [torch.randn(tokens, experts, device="cuda") for _ in range(reps)]
            full = bench.time_graph(lambda r: spec.run(xs[r], logits[r], weights, None, None, bias, run_args),
                                    reps, replays)
            rank = bench.time_graph(lambda r: spec.run(xs[r], logits[r], local, None, None, bias, local_args),
                                    reps, replays)
            row = dict(shape=name, tokens=tokens, world=args.world, rank=args.rank, local_experts=count,
                       full_us=full * 1e6, rank_us=rank * 1e6, rank_over_full=rank / full)
            rows.append(row)
            print(f"{name:18s} {tokens:6d} tokens  full {row['full_us']:9.1f} us  rank {args.rank}/{args.world} "
                  f"({count} experts) {row['rank_us']:9.1f} us  = {row['rank_over_full']:.3f} of the layer "
                  f"(ideal {1 / args.world:.3f})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
