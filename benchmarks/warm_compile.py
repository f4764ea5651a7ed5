"""Compile time in a second process with warm caches, against the first process's cold compile.

    python benchmarks/warm_compile.py [--model qwen3-30b-a3b] [--layers 8] [--out DIR]
    python benchmarks/warm_compile.py --tiny --device cpu          # the same mechanism on the CPU, tiny model
    python benchmarks/warm_compile.py --profile 40                 # and where the warm process spends its time

Runs ``moe-nvfp4 bench --model M --warm-cache`` twice, each in its own Python process, with one fresh cache
directory for both (``TORCHINDUCTOR_CACHE_DIR``, and ``TRITON_CACHE_DIR`` inside it): the first process
compiles cold and fills inductor's FX-graph and AOT-autograd caches and Triton's kernel cache; the second
starts from them, as a user's second run of a script does.  Each process times both variants (bf16 under
``backend="inductor"``, the converted model under ``backend="moe_nvfp4"``, the bench's mode) with one decode
batch and a short prefill, so a run is mostly compilation.  Reports each variant's first decode call (its
compile) and first prefill call, cold and warm, and warm / cold (issue 26: at most 0.25 for ``moe_nvfp4``).
Also lists the kernels the warm process compiled instead of loading from the caches (Triton entries and NVRTC
cubins written after the cold process ended) and, for each Triton kernel, the compile options in which its new
entry differs from the cold process's entries of the same kernel.  Writes ``warm_compile.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _run(args, cache: str, out: str, profile: str = "") -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    cmd = [sys.executable, *prof, "-m", "moe_passes.cli", "bench", "--model", args.model, "--layers", str(args.layers),
           "--device", args.device, "--warm-cache", "--batches", "1", "--rounds", "1", "--steps", "2",
           "--warmup", "1", "--prefill", str(args.prefill), "--prefill-repeats", "1", "--profile-steps", "0",
           "--mode", args.mode, "--out", out] + (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        data = json.load(f)
    firsts = {v: data["variants"][v]["first_calls_s"] for v in ("bf16", "nvfp4")}
    return dict(wall_s=wall, command=" ".join(cmd[1:]), meta=data["meta"],
                triton_ptxas_path={v: data["variants"][v].get("triton_ptxas_path") for v in ("bf16", "nvfp4")},
                decode_s={v: f["decode_b1"][0] for v, f in firsts.items()},
                prefill_s={v: f[f"prefill_{args.prefill}"][0] for v, f in firsts.items()})


def _written_since(cache: str, since: float) -> dict:
    """The kernels the warm process compiled rather than loaded: Triton cache entries (``<kernel>.json`` beside each
    binary, group files left out) and NVRTC cubins written after ``since``, by name."""
    found = {"triton": [], "moe_nvfp4_cubin": []}
    for sub in found:
        for root, _, files in os.walk(os.path.join(cache, sub)):
            for name in files:
                path = os.path.join(root, name)
                if os.path.getmtime(path) < since:
                    continue
                if sub == "triton" and name.endswith(".json") and not name.startswith("__grp__"):
                    found[sub].append(name[:-5])
                elif sub != "triton":
                    found[sub].append(name)
    return {k: sorted(v) for k, v in found.items()}


def _metadata_diffs(cache: str, since: float) -> dict:
    """Why the warm process missed Triton's cache: for each kernel it compiled, the fields of its metadata (the
    compile options: warps, stages, libdevice, PDL, ...) that differ from the nearest entry of the same kernel
    the cold process wrote.  No field differing means the cache keys differ outside the options: the kernel's
    source or argument specialization, the ptxas version, or a cache-invalidating environment variable."""
    entries: dict = {}
    for root, _, files in os.walk(os.path.join(cache, "triton")):
        for name in files:
            if name.endswith(".json") and not name.startswith("__grp__"):
                path = os.path.join(root, name)
                with open(path) as f:
                    meta = {k: v for k, v in json.load(f).items() if k != "hash"}
                entries.setdefault(name[:-5], []).append((os.path.getmtime(path) >= since, meta))
    diffs = {}
    for kernel, found in sorted(entries.items()):
        cold = [m for warm, m in found if not warm]
        for warm_meta in (m for warm, m in found if warm):
            if not cold:
                diffs.setdefault(kernel, []).append("no entry of the cold process")
                continue
            nearest = min(cold, key=lambda m: sum(m.get(k) != v for k, v in warm_meta.items()))
            diffs.setdefault(kernel, []).append(
                {k: [nearest.get(k), v] for k, v in warm_meta.items() if nearest.get(k) != v})
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=256, help="tokens of the prefill graph (256)")
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=".")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run the warm process under cProfile (warm.prof in --out) and print its top N functions "
                             "of Triton, inductor and this package's kernels, ops and passes by cumulative time")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    profile = os.path.abspath(os.path.join(args.out, "warm.prof")) if args.profile else ""
    with tempfile.TemporaryDirectory(prefix="moe_nvfp4_warm_") as cache:
        cold = _run(args, cache, os.path.join(cache, "run1.json"))
        between = time.time()
        warm = _run(args, cache, os.path.join(cache, "run2.json"), profile)
        missed = _written_since(cache, between)
        missed["triton_metadata_diffs"] = _metadata_diffs(cache, between)
    result = dict(model=args.model, layers=args.layers, tiny=args.tiny, device=cold["meta"]["device"],
                  date=cold["meta"].get("date"), torch=cold["meta"].get("torch"), command=" ".join(sys.argv),
                  cold=cold, warm=warm, warm_over_cold={}, compiled_in_warm_process=missed)
    print(f"# {result['device']}  {args.model}{' (tiny)' if args.tiny else ''}, {args.layers} layers")
    print(f"{'':16s}{'cold s':>9s}{'warm s':>9s}{'warm/cold':>11s}")
    for what in ("decode_s", "prefill_s"):
        for variant in ("bf16", "nvfp4"):
            c, w = cold[what][variant], warm[what][variant]
            result["warm_over_cold"][f"{variant}_{what[:-2]}"] = w / c
            print(f"{variant + ' ' + what[:-2]:16s}{c:9.2f}{w:9.2f}{w / c:11.2f}")
    for cache_name in ("triton", "moe_nvfp4_cubin"):
        print(f"compiled again by the warm process ({cache_name}): {', '.join(missed[cache_name]) or 'none'}")
    for kernel, diffs in missed["triton_metadata_diffs"].items():
        print(f"  {kernel}: " + "; ".join(str(d) if d else "same options as a cold entry" for d in diffs))
    with open(os.path.join(args.out, "warm_compile.json"), "w") as f:
        json.dump(result, f, indent=1)
    if profile:
        import pstats

        print(f"\n# the warm process under cProfile ({profile}): where compile-time work remains, by cumulative time")
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(r"triton|_inductor|moe_passes/(kernels|ops|backend|passes)",
                                                    args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
