"""What Dynamo's guards cost at every call of a compiled model, bf16 against the converted model (no GPU needed).

    python benchmarks/guard_cost.py [--model qwen3-30b-a3b] [--layers 8] [--tiny] [--device cpu] [--out DIR]

Compiles ``model.forward`` (``backend="eager"``: the guards do not depend on the backend) for one decode step
with a static cache, once for the bf16 model and once after ``convert``, then times the guard manager's
``check`` on the step's own frame locals: the host time Dynamo spends before every call, CUDA graphs or not.
Prints the guard tree's size (lines, tensor guards, the rest) and the best of 7 rounds of 2000 checks per
variant, both variants in one process.  On a busy host the spread between processes exceeds the difference
(nvfp4 - bf16 from -14 to +82 us over nine runs on a 2-core machine): repeat it, or run it on a quiet one.
Writes ``guard_cost_<model>.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def _guard_manager(fn_code):
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn_code)
    if len(entries) != 1:
        raise SystemExit(f"expected one compiled entry for the step, found {len(entries)}")
    return entries[0].guard_manager


def variant(model, bm, vocab: int, device: torch.device) -> dict:
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True, dynamic=False)
    cache = bm.make_static_cache(model.config, 64, 1, device, torch.bfloat16)
    kw = bm._cache_kwarg(model)
    with torch.no_grad():
        model(input_ids=bm._inputs(vocab, 1, 8, 0).to(device), **{kw: cache}, use_cache=True)
        ids = bm._inputs(vocab, 1, 1, 1).to(device)
        for _ in range(3):
            compiled(input_ids=ids, **{kw: cache}, use_cache=True)
    forward = model.forward.__func__
    manager = _guard_manager(forward.__code__)
    # the frame's locals as Dynamo sees them: transformers wraps forward(self, *args, **kwargs) in a closure
    f_locals = {"self": model, "args": (), "kwargs": dict(input_ids=ids, **{kw: cache}, use_cache=True)}
    for name, cell in zip(forward.__code__.co_freevars, forward.__closure__ or ()):
        f_locals[name] = cell.cell_contents
    rounds = []
    with torch.no_grad():  # grad mode is guarded too
        if not manager.check(f_locals):
            raise SystemExit("the guards fail on the step's own locals: this frame layout is not the one compiled")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                manager.check(f_locals)
            rounds.append((time.perf_counter() - start) / 2000 * 1e6)
    text = str(manager)
    tensors = text.count("TENSOR_MATCH")
    return dict(check_us=min(rounds), rounds_us=rounds, lines=len(text.splitlines()), tensor_guards=tensors,
                other_guards=text.count("_MATCH") - tensors)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the preset's scaled-down config (the CPU's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    from moe_passes import bench_model as bm
    from moe_passes.integrations.transformers import convert

    device = torch.device(args.device)
    tiny = args.tiny or device.type == "cpu"
    config = bm.build_config(args.model, args.layers, tiny=tiny)
    model = bm.build_model(args.model, config, device)
    vocab = config.get_text_config().vocab_size
    results = {"bf16": variant(model, bm, vocab, device)}
    with torch.no_grad():
        convert(model, calibration=bm._inputs(vocab, 4, 8, 3).to(device))
    results["nvfp4"] = variant(model, bm, vocab, device)
    for label, r in results.items():
        print(f"{label:6s} guard check {r['check_us']:7.1f} us  {r['lines']} lines, {r['tensor_guards']} tensor "
              f"guards, {r['other_guards']} others")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"guard_cost_{args.model}.json"), "w") as f:
        json.dump(dict(model=args.model, layers=args.layers, tiny=tiny, device=args.device, torch=torch.__version__,
                       command=" ".join(sys.argv), variants=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
