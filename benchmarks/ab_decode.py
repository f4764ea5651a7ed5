"""Same-run A/B of Triton layer variants: whole layer, CUDA-graph captured, modes alternated per round.

A mode is a name and overrides of what ``select_config`` picks (``TileConfig`` fields, applied only where
the tensor-core decode runs unless ``all:`` prefixes them) or of the grouping's one-program limit::

    python benchmarks/ab_decode.py --tokens 4,16,64 --rounds 2 \\
        --mode base --mode novec=vec1:0,vec2:0 --mode gemm1vec=vec1:1 --mode three_launch_grouping=group1:0

``group1:N`` sets the one-program grouping limit to N pairs (0: always three launches); ``cuda1:0`` turns
the one-launch CUDA decode of one token off (``cuda_decode``), ``cwarps:N`` gives it N consumer warps,
``cunits:N`` at most N intermediate bands per segment, ``cstages:N`` at most N stages, ``ctma:0`` w2 by one
bulk copy per piece block, ``cpdl:0`` no programmatic dependent launch.  Prints one row per shape and token count with every mode's per-round times in us,
and writes ``ab.json`` to ``--out``.  Before timing, every mode's output is checked against the first mode's:
the same exact products, summed in another order where a mode changes K splits or which groups a thread takes,
so they must agree to ``2e-3`` in relative norm (the GPU tests' bound between the kernel paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from moe_passes import bench
from moe_passes.kernels import cuda_decode
from moe_passes.kernels import triton_moe as tm

# mode keys that set a knob of the one-launch CUDA decode, and the knob; every mode starts from the defaults
_CUDA_KNOBS = {"cuda1": "ENABLED", "cwarps": "CONSUMER_WARPS", "cunits": "MAX_UNITS", "cstages": "STAGE_CAP",
               "ctma": "W2_TMA", "cpdl": "PDL"}
_CUDA_DEFAULTS = {attr: getattr(cuda_decode, attr) for attr in _CUDA_KNOBS.values()}


def parse_mode(text: str):
    """``name[=key:value,...]`` -> ``(name, TileConfig overrides, apply to all configs, grouping limit, CUDA
    decode knobs)``."""
    name, _, spec = text.partition("=")
    overrides, every, group1, cuda1 = {}, False, None, {}
    fields = {f.name: f.type for f in dataclasses.fields(tm.TileConfig)}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        if key == "all":
            every = True
            key, _, value = value.partition(":")
        if key == "group1":
            group1 = int(value)
        elif key in _CUDA_KNOBS:
            cuda1[key] = int(value)
        elif key in fields:
            overrides[key] = bool(int(value)) if fields[key] in (bool, "bool") else int(value)
        else:
            raise SystemExit(f"mode {text!r}: unknown key {key!r} (TileConfig fields: {', '.join(fields)})")
    return name, overrides, every, group1, cuda1


def install(mode, original_select, original_limit):
    """Make ``fused_moe_triton`` pick the mode's configs (it looks ``select_config`` up per call)."""
    _, overrides, every, group1, cuda1 = mode
    for key, attr in _CUDA_KNOBS.items():
        setattr(cuda_decode, attr, cuda1.get(key, _CUDA_DEFAULTS[attr]))

    def select(*args, **kwargs):
        cfg = original_select(*args, **kwargs)
        return dataclasses.replace(cfg, **overrides) if overrides and (every or cfg.tc) else cfg

    tm.select_config = select
    tm._ONE_PROGRAM_PAIRS = original_limit if group1 is None else group1


def check(modes, shapes, tokens, original_select, original_limit) -> int:
    """Outputs of every mode against the first mode's on fresh inputs; returns the mismatches."""
    bad = 0
    for name in shapes:
        spec, weights, args, bias, hidden = bench.triton_layer(name, "cuda")
        experts = bench.SHAPES[name][2]
        for t in tokens:
            x = torch.randn(t, hidden, device="cuda").to(torch.bfloat16)
            logits = torch.randn(t, experts, device="cuda")
            outs = []
            for mode in modes:
                install(mode, original_select, original_limit)
                outs.append(spec.run(x, logits, weights, None, None, bias, args))
            ref = outs[0].float()
            for mode, out in zip(modes[1:], outs[1:]):
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                if not rel < 2e-3:  # also catches NaN
                    bad += 1
                    print(f"MISMATCH {name} {t} tokens: {mode[0]} vs {modes[0][0]}: relative {rel:.2e}", flush=True)
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", action="append", required=True, help="name[=key:value,...]; repeat")
    parser.add_argument("--tokens", default="4,16,64")
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-check", action="store_true")
    args = parser.parse_args(argv)
    modes = [parse_mode(m) for m in args.mode]
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = args.shapes
    if not torch.cuda.is_available():
        raise SystemExit("ab_decode.py measures on a CUDA GPU")
    original_select, original_limit = tm.select_config, tm._ONE_PROGRAM_PAIRS
    try:
        if not args.no_check:
            torch.manual_seed(1)
            bad = check(modes, shapes, tokens, original_select, original_limit)
            print(f"check: {bad} mismatches", flush=True)
            if bad:
                return 1
        torch.manual_seed(0)
        bandwidth = bench.measure_copy_bandwidth()
        print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
        results = {}
        for rnd in range(args.rounds):
            for mode in modes:
                install(mode, original_select, original_limit)
                for name in shapes:
                    for row in bench.run_shape(name, tokens, bandwidth, lambda r: None, do_peer=False):
                        entry = results.setdefault((name, row["tokens"]), {"floor_us": row["floor_us"]})
                        entry.setdefault(mode[0], []).append(row["triton_us"])
            print(f"round {rnd + 1} done", flush=True)
    finally:
        tm.select_config, tm._ONE_PROGRAM_PAIRS = original_select, original_limit
        for attr, value in _CUDA_DEFAULTS.items():
            setattr(cuda_decode, attr, value)
    names = [m[0] for m in modes]
    print(f"{'shape':18s} {'T':>5s} {'floor':>7s} " + " ".join(f"{n:>16s}" for n in names))
    for (name, t), entry in results.items():
        cells = " ".join(f"{'/'.join(f'{v:.1f}' for v in entry[n]):>16s}" for n in names)
        print(f"{name:18s} {t:5d} {entry['floor_us']:7.1f} {cells}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab.json"), "w") as f:
        json.dump([dict(shape=s, tokens=t, **e) for (s, t), e in results.items()], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
