"""Same-run A/B of Triton layer variants: whole layer, CUDA-graph captured, modes alternated per round.

A mode is a name and the ``KernelOptions`` it runs with: overrides of the tensor-core decode's config
(``DecodeConfig`` fields; ``all:`` prefixed, of the tiles' ``TileConfig`` fields too, wherever the planned
config has the field), of the grouping's one-program limit, or of the one-token CUDA decode::

    python benchmarks/ab_decode.py --tokens 4,16,64 --rounds 2 \\
        --mode base --mode novec=vec1:0,vec2:0 --mode gemm1vec=vec1:1 --mode three_launch_grouping=group1:0

``variant:NAME`` runs the Triton variant NAME (``triton_plan.VARIANTS``) at every token count; ``group1:N`` sets the one-program grouping limit to N pairs (0: always three launches); ``cuda1:0`` turns
the one-launch CUDA decode of one token off, ``cwarps:N`` gives it N consumer warps, ``cunits:N`` at most
N intermediate bands per segment, ``cstages:N`` at most N stages, ``ctma:0`` w2 by one bulk copy per piece
block, ``cpdl:0`` no programmatic dependent launch; ``pdl:0`` unchains the Triton launches.  Prints one row
per shape and token count with every mode's per-round times in us, and writes ``ab.json`` to ``--out`` (with
each mode's plan, ``MODE_plan``: ``bench.plan_label``).
Before timing, every mode's output is checked against the first mode's: the same exact products, summed in
another order where a mode changes K splits or which groups a thread takes, so they must agree to ``2e-3``
in relative norm (the GPU tests' bound between the kernel paths), ``4e-3`` where one of them writes its pair rows
in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from moe_passes import bench
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.triton_plan import DecodeConfig, TileConfig

# mode keys that set a KernelOptions field directly
_OPTION_KEYS = {"group1": "one_program_pairs", "cuda1": "cuda_decode", "cwarps": "cuda_decode_warps",
                "cunits": "cuda_decode_max_units", "cstages": "cuda_decode_stage_cap", "ctma": "cuda_decode_w2_tma",
                "cpdl": "cuda_decode_pdl", "pdl": "pdl"}


def _value(cls, key, text):
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    return bool(int(text)) if kind in (bool, "bool") else int(text)


def parse_mode(text: str):
    """``name[=key:value,...]`` -> ``(name, KernelOptions)`` (defaults from the environment)."""
    name, _, spec = text.partition("=")
    base = KernelOptions.from_env()
    fields, decode, tiles = {}, {}, {}
    decode_fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    tile_fields = {f.name for f in dataclasses.fields(TileConfig)}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition(":")
        every = key == "all"
        if every:
            key, _, value = value.partition(":")
        if key == "variant":
            fields["variant"] = value
            continue
        if key in _OPTION_KEYS:
            option = _OPTION_KEYS[key]
            kind = {f.name: f.type for f in dataclasses.fields(KernelOptions)}[option]
            fields[option] = bool(int(value)) if kind in (bool, "bool") else int(value)
            continue
        if key not in decode_fields and not (every and key in tile_fields):
            raise SystemExit(f"mode {text!r}: unknown key {key!r} (DecodeConfig fields: {', '.join(decode_fields)}; "
                             f"with all: also TileConfig's: {', '.join(tile_fields)}; options: "
                             f"{', '.join(_OPTION_KEYS)})")
        if key in decode_fields:
            decode[key] = _value(DecodeConfig, key, value)
        if every and key in tile_fields:
            tiles[key] = _value(TileConfig, key, value)
    return name, dataclasses.replace(base, decode_overrides=tuple(decode.items()),
                                     tile_overrides=tuple(tiles.items()), **fields)


def check(modes, shapes, tokens) -> int:
    """Outputs of every mode against the first mode's on fresh inputs; returns the mismatches."""
    bad = 0
    for name in shapes:
        spec, weights, args, bias, hidden = bench.triton_layer(name, "cuda")
        experts = bench.SHAPES[name][2]
        for t in tokens:
            x = torch.randn(t, hidden, device="cuda").to(torch.bfloat16)
            logits = torch.randn(t, experts, device="cuda")
            outs = [spec.run(x, logits, weights, None, None, bias, dataclasses.replace(args, options=options))
                    for _, options in modes]
            ref = outs[0].float()
            for mode, out in zip(modes[1:], outs[1:]):
                rel = ((out.float() - ref).norm() / ref.norm()).item()
                # 2e-3: the same products summed in another order; 4e-3 where one mode writes the pair rows in
                # bf16 (``TileConfig.bf16_rows``) and the other in fp32
                if not rel < 4e-3:  # also catches NaN
                    bad += 1
                    print(f"MISMATCH {name} {t} tokens: {mode[0]} vs {modes[0][0]}: relative {rel:.2e}", flush=True)
    return bad


def time_modes(name, tokens, modes, rounds, seed=0):
    """Yield ``(tokens, experts touched, {mode: [us per round]}, {mode: its plan})`` for one shape: one layer
    built as ``moe-nvfp4 bench`` builds it (the same float weights, quantizer and seeded routing bias, so the
    same routing skew), the same inputs for every mode, the modes alternated inside each round, each round
    starting further along the list: on DeepSeek-V3 a mode timed later in a round read 2-6% slower than the same
    config timed first, so the rounds spread each mode over the places."""
    seed = bench.shape_seed(name, seed)
    w13, w2 = bench.float_weights(name, "cuda", seed)
    spec, prepared, args, _ = bench.triton_layer_from_float(name, w13, w2)
    w13 = w2 = None
    bias = bench.routing_bias(name, "cuda", seed)
    for t in tokens:
        reps, replays = bench._reps_replays(t)
        xs, ls = bench.token_inputs(name, t, reps, "cuda", seed)
        times, touched = {}, bench.touched_experts(name, ls, bias)
        plans = {mode: bench.plan_label(t, prepared, dataclasses.replace(args, options=options), "cuda")
                 for mode, options in modes}
        step = -(-len(modes) // rounds)
        for turn in range(rounds):
            first = turn * step % len(modes)
            for mode, options in modes[first:] + modes[:first]:
                a = dataclasses.replace(args, options=options)
                us = bench.time_graph(lambda r: spec.run(xs[r], ls[r], prepared, None, None, bias, a), reps,
                                      replays) * 1e6
                times.setdefault(mode, []).append(us)
        yield t, touched, times, plans
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", action="append", required=True, help="name[=key:value,...]; repeat")
    parser.add_argument("--tokens", default="4,16,64")
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=".")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--keep-going", action="store_true", help="time the modes even after a mismatch")
    args = parser.parse_args(argv)
    modes = [parse_mode(m) for m in args.mode]
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = args.shapes
    if not torch.cuda.is_available():
        raise SystemExit("ab_decode.py measures on a CUDA GPU")
    if not args.no_check:
        torch.manual_seed(1)
        bad = check(modes, shapes, tokens)
        print(f"check: {bad} mismatches", flush=True)
        if bad and not args.keep_going:
            return 1
    torch.manual_seed(0)
    bandwidth = bench.measure_read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = {}
    for name in shapes:
        for t, touched, times, plans in time_modes(name, tokens, modes, args.rounds):
            entry = results.setdefault((name, t), bench.row_floors(name, t, bandwidth, touched=touched))
            entry.update(times)
            entry.update({f"{m}_plan": p for m, p in plans.items()})
            print(f"{name} {t}: " + " ".join(f"{m}={sum(v) / len(v):.1f}" for m, v in times.items()), flush=True)
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
