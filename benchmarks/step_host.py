"""Where the host's time goes in one synchronized decode step, bf16 against the converted model (CUDA graphs).

    python benchmarks/step_host.py [--model qwen3-30b-a3b] [--batch 1] [--layers 8] [--out DIR] [--skip-guards]
                                   [--share-tensors]
                                   [--nvfp4-options pdl=0,cuda_decode_pdl=0 --nvfp4-options cuda_decode=0 ...]

Builds the preset as ``moe-nvfp4 bench --model`` does, compiles ``model.forward`` with
``mode="reduce-overhead"`` (bf16 under ``backend="inductor"``, then, after ``convert``, under
``backend="moe_nvfp4"``) and, after a warm-up, times 2 x 60 decode steps one by one:

* ``issue_ms``: the host's time inside the step call (Dynamo's guards, the AOT and CUDA-graph-tree wrappers,
  the graph launch), not waiting for the GPU;
* ``event_ms``: CUDA events recorded before and after the call, what ``moe-nvfp4 bench`` reports per step: the
  GPU waits for the host's issue, then runs the graph;
* ``wall_ms``: the call until its end event completes.

``--share-tensors`` adds two converted variants: every FusedMoE layer reading layer 0's prepared tensors and
activation scales (the same kernels and GPU time, wrong weights past layer 0, 56 fewer graph inputs on an 8-layer
model), then the real model again, to tell what the graph inputs cost.  ``--skip-guards`` times each variant once
more with Dynamo's guard evaluation skipped (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``;
``*_no_guards``): the difference is the guards' share of the issue time.  Each ``--nvfp4-options`` adds a converted
variant compiled and captured under those ``KernelOptions`` fields (for instance without programmatic dependent
launches, or without the cooperative CUDA decode), to tell which kernel nodes make a graph's launch cost host time.

Then a cProfile of 40 synchronized steps (the top functions by own time and by cumulative time, one text file per
variant), and the number of inputs of the CUDA-graph tree's node (parameters and buffers count: each is guarded
and checked at every replay).  Medians of the second 60 steps; writes ``step_host_<model>_b<batch>.json`` and
the two profiles to ``--out``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import statistics
import sys
import time

import torch

from moe_passes import bench_model as bm
from moe_passes.kernels import options as kernel_options

PROMPT = 64  # prompt tokens before decoding, as moe-nvfp4 bench; every timed round rewinds the cache to it
CACHE_LEN = 256


def _root_node():
    # The first root node of the current device's CUDA-graph tree (private: None where the layout differs).
    try:
        from torch._inductor.cudagraph_trees import get_container

        tree = get_container(torch.cuda.current_device()).tree_manager
        return next(iter(tree.roots.values()))[0]
    except Exception:
        return None


def _timed_steps(step, out, cache, steps: int):
    """``steps`` synchronized decode steps from the prompt's end: ``(out, issue, event, wall)``, the last three
    medians in ms."""
    bm._rewind(cache, PROMPT)
    issue, event, wall = [], [], []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        out = step(token)
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        t2 = time.perf_counter()
        issue.append((t1 - t0) * 1e3)
        event.append(start.elapsed_time(end))
        wall.append((t2 - t0) * 1e3)
    return out, statistics.median(issue), statistics.median(event), statistics.median(wall)


def variant(model, backend: str, batch: int, steps: int = 60, skip_guards: bool = False) -> dict:
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend=backend, mode="reduce-overhead", fullgraph=True, dynamic=False)
    kw = bm._cache_kwarg(model)
    vocab = model.config.get_text_config().vocab_size
    cache = bm.make_static_cache(model.config, CACHE_LEN, batch, torch.device("cuda"), torch.bfloat16)
    result: dict = {}
    with torch.no_grad():
        model(input_ids=bm._inputs(vocab, batch, PROMPT, 0).cuda(), **{kw: cache}, use_cache=True, logits_to_keep=1)

        def step(ids):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(input_ids=ids, **{kw: cache}, use_cache=True)

        out = step(bm._inputs(vocab, batch, 1, 1).cuda())
        for _ in range(8):
            out = step(out.logits[:, -1].argmax(-1, keepdim=True))
        for _ in range(2):  # the second round's medians are kept
            out, *times = _timed_steps(step, out, cache, steps)
            result.update(zip(("issue_ms", "event_ms", "wall_ms"), times))
        if skip_guards:
            # Dynamo's guards skipped (one cache entry per frame: nothing to tell apart), the rest as above
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                for _ in range(2):
                    out, *times = _timed_steps(step, out, cache, steps)
            result.update(zip(("issue_ms_no_guards", "event_ms_no_guards", "wall_ms_no_guards"), times))
        bm._rewind(cache, PROMPT)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(40):
            out = step(out.logits[:, -1].argmax(-1, keepdim=True))
            torch.cuda.synchronize()
        profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    node = _root_node()
    result["graph_inputs"] = None if node is None else len(node.static_input_data_ptrs)
    result["static_inputs"] = None if node is None else len(node.static_input_idxs)
    result["profile"] = text.getvalue()
    return result


def _options(text: str):
    """``pdl=0,cuda_decode=1`` -> (label, {field: value}) with each value typed like the field's default."""
    defaults = kernel_options.KernelOptions()
    fields = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not hasattr(defaults, name) or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: want FIELD=VALUE with a KernelOptions field")
        kind = type(getattr(defaults, name))
        fields[name] = value not in ("0", "false", "False") if kind is bool else kind(value)
    return text, fields


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(bm.PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default=".")
    parser.add_argument("--nvfp4-options", action="append", default=[], type=_options,
                        help="KernelOptions fields for one more converted variant, e.g. pdl=0,cuda_decode_pdl=0")
    parser.add_argument("--share-tensors", action="store_true",
                        help="also time the converted model with every MoE layer reading layer 0's tensors")
    parser.add_argument("--skip-guards", action="store_true",
                        help="also time each variant with Dynamo's guard evaluation skipped (*_no_guards)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_host.py times CUDA-graph replays: it needs a CUDA GPU", file=sys.stderr)
        return 2
    from moe_passes.integrations.transformers import convert

    config = bm.build_config(args.model, args.layers)
    model = bm.build_model(args.model, config, torch.device("cuda"))
    vocab = config.get_text_config().vocab_size
    results = {"bf16": variant(model, "inductor", args.batch, skip_guards=args.skip_guards)}
    print("bf16", {k: v for k, v in results["bf16"].items() if k != "profile"}, flush=True)
    with torch.no_grad():
        convert(model, calibration=bm._inputs(vocab, 4, PROMPT, 3).cuda())
    results["nvfp4"] = variant(model, "moe_nvfp4", args.batch, skip_guards=args.skip_guards)
    for label, fields in args.nvfp4_options:
        with kernel_options.use(kernel_options.KernelOptions(**fields)):
            results[f"nvfp4[{label}]"] = variant(model, "moe_nvfp4", args.batch, skip_guards=args.skip_guards)
        print(label, {k: v for k, v in results[f"nvfp4[{label}]"].items() if k != "profile"}, flush=True)
    if args.share_tensors:
        from moe_passes import FusedMoE
        from moe_passes.layer import _KERNEL_BUFFERS

        layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
        names = _KERNEL_BUFFERS + ("input_global_scale", "intermediate_global_scale")
        kept = [{n: m._buffers[n] for n in names} for m in layers]
        for m in layers[1:]:
            m._buffers.update(kept[0])
        results["nvfp4[shared tensors]"] = variant(model, "moe_nvfp4", args.batch, skip_guards=args.skip_guards)
        for m, own in zip(layers, kept):
            m._buffers.update(own)
        results["nvfp4[again]"] = variant(model, "moe_nvfp4", args.batch, skip_guards=args.skip_guards)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_host_{args.model}_b{args.batch}")
    for label, r in results.items():
        with open(f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label).strip('_')}.txt", "w") as f:
            f.write(r.pop("profile"))
        print(f"{label:6s} issue {r['issue_ms']:.3f} ms  event {r['event_ms']:.3f} ms  wall {r['wall_ms']:.3f} ms  "
              f"graph inputs {r['graph_inputs']}")
        if "issue_ms_no_guards" in r:
            print(f"{label:6s} without guards: issue {r['issue_ms_no_guards']:.3f} ms  "
                  f"event {r['event_ms_no_guards']:.3f} ms  wall {r['wall_ms_no_guards']:.3f} ms")
    with open(f"{stem}.json", "w") as f:
        json.dump(dict(model=args.model, batch=args.batch, layers=args.layers, command=" ".join(sys.argv),
                       device=torch.cuda.get_device_name(), torch=torch.__version__, variants=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
