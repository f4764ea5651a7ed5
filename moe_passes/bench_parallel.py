"""``moe-nvfp4 bench --parallel ep|tp``: an expert- or tensor-parallel layer timed on every rank.

Spawns ``--world`` processes (one GPU each, NCCL; ``--device cpu`` runs gloo on the CPU, a smoke test),
builds the shape's layer sharded over them (each rank fills only its own shard with random NVFP4 bytes),
compiles it with ``backend="moe_nvfp4"`` and ``options={"parallel": ...}``, and times per rank and token count:

* ``layer_us``: the compiled layer, pad -> local kernel -> slice -> all-reduce (median over calls, no CUDA
  graph: functional collectives inside CUDA graph trees misbehaved in some torch versions);
* ``kernel_us``: the rank's kernel op alone on the same inputs (no collective);
* ``weight_bytes``: the rank's kernel weights, and ``unsharded_bytes``: the whole layer's (the shape contract).

Prints one line per rank and token count and writes ``bench_parallel.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

# name: (H, I, experts, top_k, activation, routing, extra routing args); the GPU shapes are bench.SHAPES
TINY = {"tiny": (48, 64, 8, 2, "silu", "renormalize", {})}


def _shapes():
    from moe_passes.bench import SHAPES

    return {**SHAPES, **TINY}


def _layer(name, parallel, device):
    """The shape's FusedMoE sharded by ``parallel``; only this rank's shard holds random bytes."""
    from moe_passes import FusedMoE
    from moe_passes.bench import random_nvfp4
    from moe_passes.contract import round_up
    from moe_passes.kernels import registry
    from moe_passes.parallel import ExpertParallel, expert_block, intermediate_block

    h, i, e, k, activation, routing, extra = _shapes()[name]
    n1 = (2 if activation != "relu2" else 1) * i
    hc, ic = round_up(h, 16), round_up(i, 16)
    # The unsharded tensors are allocated but never written outside the shard (untouched host pages).
    w13 = torch.empty(e, n1, hc // 2, dtype=torch.uint8)
    s13 = torch.zeros(e, n1, hc // 16, dtype=torch.float8_e4m3fn)
    w2 = torch.empty(e, hc, ic // 2, dtype=torch.uint8)
    s2 = torch.zeros(e, hc, ic // 16, dtype=torch.float8_e4m3fn)
    g = torch.full((e,), 64.0)
    if isinstance(parallel, ExpertParallel):
        lo, n = expert_block(e, parallel.world_size, parallel.rank)
        w13[lo:lo + n], s13[lo:lo + n], _ = random_nvfp4(n, n1, hc, "cpu")
        w2[lo:lo + n], s2[lo:lo + n], _ = random_nvfp4(n, hc, ic, "cpu")
    else:
        start, size = intermediate_block(ic, parallel.world_size, parallel.rank)
        halves = [0, ic] if activation != "relu2" else [0]
        for base in halves:
            rows = slice(base + start, base + start + size)
            w, s, _ = random_nvfp4(e, size, hc, "cpu")
            w13[:, rows], s13[:, rows] = w, s
        w, s, _ = random_nvfp4(e, hc, size, "cpu")
        w2[:, :, start // 2:(start + size) // 2], s2[:, :, start // 16:(start + size) // 16] = w, s
    bias = torch.randn(e) / 10 if routing == "deepseek_v3" else None
    layer = FusedMoE(registry.MoEWeights(w13, s13, g, w2, s2, g.clone()), hidden_size=h, intermediate_size=i,
                     top_k=k, activation=activation, routing=routing, routing_bias=bias, parallel=parallel,
                     input_global_scale=torch.tensor(1.0), intermediate_global_scale=torch.tensor(1.0),
                     name=name, **extra)
    del w13, s13, w2, s2
    return layer.to(device).requires_grad_(False)


def _median_seconds(fn, repeats, device, barrier):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(rank, opts, init_file, out_dir):
    import torch.distributed as dist

    from moe_passes.contract import MoEShape
    from moe_passes.kernels import registry
    from moe_passes.ops import KERNEL_OP
    from moe_passes.parallel import ExpertParallel, TensorParallel

    cuda = opts.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=opts.world)
    torch.manual_seed(rank)
    if not cuda:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // opts.world))
    rows = []
    try:
        for name in opts.shapes:
            parallel = ExpertParallel() if opts.parallel == "ep" else TensorParallel()
            layer = _layer(name, parallel, device)
            h, i, e, k, activation, _, _ = _shapes()[name]
            spec = registry.get(layer.kernel)
            unsharded = MoEShape(hidden=h, intermediate=i, experts=e, top_k=k, activation=activation,
                                 alignment=spec.alignment).weight_bytes()
            weight_bytes = sum(t.numel() * t.element_size() for t in layer.kernel_weights())
            torch._dynamo.reset()
            compiled = torch.compile(layer, backend="moe_nvfp4", dynamic=True,
                                     options={"inner": opts.inner, "parallel": parallel})
            for tokens in opts.tokens:
                g = torch.Generator().manual_seed(tokens)  # the same tokens on every rank
                x = (torch.randn(tokens, h, generator=g) / 10).to(torch.bfloat16).to(device)
                logits = torch.randn(tokens, e, generator=g).to(device)
                xp = torch.nn.functional.pad(x, (0, layer.kernel_weights().w2.shape[1] - h))

                def run_layer():
                    with torch.no_grad():
                        return compiled(x, logits)

                def run_kernel():
                    return KERNEL_OP(xp, logits, *layer.kernel_weights(), layer.input_global_scale,
                                     layer.intermediate_global_scale, layer.routing_bias, layer.top_k,
                                     layer.activation, layer.routing, layer.n_group, layer.topk_group,
                                     layer.routed_scaling_factor, layer.kernel, layer.name, *layer._parallel_args())

                repeats = opts.repeats if tokens <= 1024 else max(3, opts.repeats // 4)
                row = dict(shape=name, rank=rank, world=opts.world, parallel=opts.parallel, tokens=tokens,
                           kernel=layer.kernel, weight_bytes=weight_bytes, unsharded_bytes=unsharded,
                           memory_share=weight_bytes / unsharded,
                           layer_us=_median_seconds(run_layer, repeats, device, dist.barrier) * 1e6,
                           kernel_us=_median_seconds(run_kernel, repeats, device, dist.barrier) * 1e6)
                if cuda:
                    row["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                rows.append(row)
            del layer, compiled
            if cuda:
                torch.cuda.empty_cache()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rows, f)
        dist.destroy_process_group()


def main(argv=None) -> int:
    from moe_passes.bench import token_list

    shapes = _shapes()
    parser = argparse.ArgumentParser(prog="moe-nvfp4 bench --parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=("ep", "tp"), required=True)
    parser.add_argument("--world", type=int, default=None, help="ranks (default: every GPU, or 2 on the CPU)")
    parser.add_argument("--shapes", default="qwen3-30b-a3b", help=f"comma list of {', '.join(shapes)}")
    parser.add_argument("--tokens", type=token_list, default=[1, 16, 128, 1024], help="comma list of token counts")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--inner", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=".", help="folder for bench_parallel.json")
    opts = parser.parse_args(argv)
    opts.shapes = [s for s in opts.shapes.split(",") if s]
    unknown = [s for s in opts.shapes if s not in shapes]
    if unknown or not opts.shapes:
        parser.error(f"unknown shapes {unknown}; choose from {', '.join(shapes)}")
    if opts.repeats < 1 or (opts.world is not None and opts.world < 1):
        parser.error("--repeats and --world must be at least 1")
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("moe-nvfp4 bench --parallel needs CUDA GPUs (or --device cpu)", file=sys.stderr)
        return 2
    if opts.world is None:
        opts.world = torch.cuda.device_count() if opts.device == "cuda" else 2
    if opts.device == "cuda" and opts.world > torch.cuda.device_count():
        parser.error(f"--world {opts.world} exceeds the {torch.cuda.device_count()} GPUs")
    import torch.multiprocessing as mp

    os.makedirs(opts.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(opts, os.path.join(tmp, "init"), tmp), nprocs=opts.world, join=True)
        rows = []
        for rank in range(opts.world):
            with open(os.path.join(tmp, f"rank{rank}.json")) as f:
                rows += json.load(f)
    rows.sort(key=lambda r: (r["shape"], r["tokens"], r["rank"]))
    print(f"{'shape':16s} {'mode':4s} {'rank':>4s} {'T':>5s} {'layer us':>9s} {'kernel us':>9s} {'weights MiB':>11s} "
          f"{'share':>6s}")
    for r in rows:
        print(f"{r['shape']:16s} {r['parallel']:4s} {r['rank']:2d}/{r['world']:<1d} {r['tokens']:5d} {r['layer_us']:9.1f} "
              f"{r['kernel_us']:9.1f} {r['weight_bytes'] / 2**20:11.1f} {r['memory_share']:6.3f}")
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, device=opts.device,
                gpu=torch.cuda.get_device_name(0) if opts.device == "cuda" else None,
                command="moe-nvfp4 bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    with open(os.path.join(opts.out, "bench_parallel.json"), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
