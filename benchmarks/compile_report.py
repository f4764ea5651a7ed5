"""Registers, spills, shared memory and MMA waits of the tile kernels as compiled for SM90, on a machine without a GPU.

    python benchmarks/compile_report.py [--shapes qwen3-30b-a3b,deepseek-v3] [--tokens 384,1024,4096] \
        [--tile swap=1,warps1=8]

For every shape and token count whose plan (``triton_plan.plan`` for a 132-SM SM90: H100, H200) takes the
tensor-core tiles, GEMM1 and GEMM2 of the main blocks and of the tail blocks are compiled with Triton's own
compiler for ``sm_90a`` (``triton.compile`` on the kernels' source, no driver needed): the Gluon kernels of
``gluon_tiles`` where the plan takes the wgmma tiles, else ``triton_tiles``' ``tl.dot`` kernels.  Their cubins
are read with the ``cuobjdump`` that ships with Triton and their PTX is assembled again with its ``ptxas -v``
for its notes.  The arguments are specialized as a launch specializes them: pointers 16-byte aligned, integers
that are multiples of 16 marked so (without that, Triton sees unaligned rows and emits scalar loads and no
async copies, a different kernel).  Per kernel it prints registers a thread, spill bytes, shared memory, the
programs an SM holds by registers and by shared memory, the wgmma ops after the first loop and how many of
their waits drain every MMA in flight (``pendings = 0``: the next dequantization does not overlap it), and
``serial``: ptxas' note that it serialized the kernel's wgmmas (C7513 / C7515: a register of an MMA in flight
touched by another instruction), which silently costs the overlap.  ``--tile`` overrides fields of the planned
``TileConfig`` (what ``KernelOptions.tile_overrides`` does at a call).  Needs ``triton`` (3.6 measured)
importable, not a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

from moe_passes import bench
from moe_passes.contract import is_gated
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.triton_plan import H200, Problem, TileConfig, plan

REGS_PER_SM = 65536
SMEM_PER_SM = 233472  # H100 / H200: 228 KiB, of which a block may take 227
SMEM_PER_BLOCK_RESERVED = 1024


def _types(kernel_args: dict) -> tuple:
    """``(signature, attrs)`` for ``ASTSource``: each runtime argument's Triton type, and the divisibility a
    launch would give it (pointers always, integers when their value is a multiple of 16)."""
    signature, divisible = {}, []
    for name, (kind, value) in kernel_args.items():
        signature[name] = kind
        if kind.startswith("*") or (kind == "i32" and value % 16 == 0):
            divisible.append(name)
    return signature, divisible


def compile_kernel(fn, kernel_args: dict, constexprs: dict, warps: int, stages: int) -> dict:
    """Compile ``fn`` (a Triton or Gluon kernel) for sm_90a; ``kernel_args``: runtime argument -> (Triton type,
    value)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, divisible = _types(kernel_args)
    names = fn.arg_names
    # parameters the launch leaves out take their defaults, as at a launch
    constexprs = dict({prm.name: prm.default for prm in fn.params
                       if prm.name not in kernel_args and prm.name not in constexprs}, **constexprs)
    signature.update({k: "constexpr" for k in constexprs})
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    src = source(fn, {n: signature[n] for n in names}, {(names.index(k),): v for k, v in constexprs.items()},
                 {(names.index(k),): [["tt.divisibility", 16]] for k in divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        notes = subprocess.run([os.path.join(tools, "ptxas"), "--gpu-name", "sm_90a", "-v", ptx, "-o", path],
                               capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = compiled.metadata.shared
    loop = compiled.asm["ttgir"].split("scf.for", 1)[-1]
    waits = re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", loop)
    # registers are allocated per warp in units of 256
    per_warp = -(-regs * 32 // 256) * 256
    return dict(regs=regs, spill=spill, shared=shared, by_regs=REGS_PER_SM // (per_warp * warps),
                by_smem=SMEM_PER_SM // (shared + SMEM_PER_BLOCK_RESERVED),
                wgmma=len(re.findall(r"ttng\.warp_group_dot ", loop)), drains=sum(w == "0" for w in waits),
                serial=bool(re.search(r"C751[35]|serialized", notes)),
                gdc_wait=compiled.asm["ptx"].count("griddepcontrol.wait"),
                gdc_launch=compiled.asm["ptx"].count("griddepcontrol.launch_dependents"))


def tile_kernels(name: str, tokens: int, overrides: tuple = ()):
    """``(plan, [(label, fn, kernel_args, constexprs, warps, stages)])`` of one shape and token count: GEMM1 and
    GEMM2 of the main blocks, then of the tail blocks; the list is empty where the plan is not the tiles."""
    from moe_passes.kernels import gluon_tiles
    from moe_passes.kernels import triton_tiles as tt
    from moe_passes.kernels.triton_common import epilogue_args
    from moe_passes.kernels.triton_plan import k_split

    hidden, inter, experts, top_k, activation, routing, extra = bench.SHAPES[name]
    gated = is_gated(activation)
    problem = Problem(tokens=tokens, top_k=top_k, experts=experts, hidden=hidden, inter=inter, gated=gated,
                      routing=routing, n_group=extra.get("n_group"), topk_group=extra.get("topk_group"))
    p = plan(problem, H200, KernelOptions(tile_overrides=overrides))
    cfg = p.config
    if not isinstance(cfg, TileConfig):
        return p, []
    pairs = tokens * top_k
    per_split = k_split(inter, cfg.split2, cfg.k_step2)[0]
    rows = "*bf16" if cfg.bf16_rows else "*fp32"
    act, _, _ = epilogue_args(activation, None, None, None)
    common = dict(w_ptr=("*u8", 0), s_ptr=("*u8", 0), gs_ptr=("*fp32", 0), sorted_ptr=("*i32", 0),
                  bexp_ptr=("*i32", 0), num_pairs=("i32", pairs), H=("i32", hidden), I=("i32", inter))
    args1 = dict(common, x_ptr=("*bf16", 0), out_ptr=("*bf16", 0), stride_x=("i32", hidden))
    args2 = dict(common, a_ptr=("*bf16", 0), tw_ptr=("*fp32", 0), y_ptr=(rows, 0), k_per_split=("i32", per_split))
    launches = (("main", cfg), ("tail", cfg.tail_tiles())) if cfg.tail else (("", cfg),)
    kernels = []
    roles1, roles2 = gluon_tiles.launch_roles(len(launches), cfg.chains, cfg.overlap)
    for i, (which, c) in enumerate(launches):
        if c.wgmma:
            label = f"{which} GEMM%d wgmma bm{c.bm}"
            wargs2 = {k: v for k, v in args2.items() if k != "k_per_split"}  # GEMM2 unsplit
            kernels.append((f"{label % 1} bn{c.bn1} w{c.warps1}".strip(), gluon_tiles._gemm1_kernel, args1,
                            gluon_tiles.gemm1_constexprs(c, top_k=top_k, gated=gated, hidden=hidden, nfirst=c.nfirst,
                                                           act=act, pdl=roles1[i][0]),
                            c.warps1, c.stages1))
            kernels.append((f"{label % 2} bn{c.bn2} w{c.warps2}".strip(), gluon_tiles._gemm2_kernel, wargs2,
                            gluon_tiles.gemm2_constexprs(c, inter=inter, nfirst=c.nfirst, pdl=roles2[i][0]),
                            c.warps2, c.stages2))
            continue
        pdl = cfg.chains  # the call's launches, tails included (run_tiles)
        k1 = tt.gemm1_constexprs(c, top_k=top_k, gated=gated, hidden=hidden, pdl=pdl, nfirst=c.nfirst, act=act)
        k2 = tt.gemm2_constexprs(c, inter=inter, pdl=pdl, nfirst=c.nfirst)
        kernels.append((f"{which} GEMM1 bm{c.bm} bn{c.bn1} bk{c.bk1} w{c.warps1}".strip(), tt._gemm1_kernel, args1,
                        dict(k1, b13_ptr=None), c.warps1, c.stages1))
        kernels.append((f"{which} GEMM2 bm{c.bm} bn{c.bn2} bk{c.bk2} w{c.warps2}".strip(), tt._gemm2_kernel, args2,
                        dict(k2, b2_ptr=None), c.warps2, c.stages2))
    return p, kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=bench.shape_list, default=",".join(bench.SHAPES))
    parser.add_argument("--tokens", type=bench.token_list, default="384,1024,4096")
    parser.add_argument("--tile", default="", help="TileConfig overrides, field=int,... (e.g. swap=1,warps1=8)")
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TileConfig)}
    overrides = []
    for item in filter(None, args.tile.split(",")):
        key, _, value = item.partition("=")
        if key not in fields or not value.lstrip("-").isdigit():
            parser.error(f"--tile {item!r}: expected field=integer with a TileConfig field "
                         f"({', '.join(sorted(fields))})")
        overrides.append((key, int(value)))
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("compile_report.py needs triton importable (pip install triton); no GPU is needed")
    print(f"{'shape':16s} {'T':>5s} {'kernel':40s} {'regs':>4s} {'spill':>5s} {'smem KiB':>8s} {'per SM':>9s} "
          f"{'wgmma':>5s} {'drain':>5s} serial")
    for name in args.shapes:
        for tokens in args.tokens:
            p, kernels = tile_kernels(name, tokens, tuple(overrides))
            if not kernels:
                print(f"{name:16s} {tokens:5d} {p.variant}: not the tiles")
                continue
            for label, fn, kernel_args, constexprs, warps, stages in kernels:
                r = compile_kernel(fn, kernel_args, constexprs, warps, stages)
                print(f"{name:16s} {tokens:5d} {label:40s} {r['regs']:4d} {r['spill']:5d} {r['shared'] / 1024:8.0f} "
                      f"{r['by_regs']:>4d}/{r['by_smem']:<4d} {r['wgmma']:5d} {r['drains']:5d} "
                      f"{'SERIALIZED' if r['serial'] else 'no'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
