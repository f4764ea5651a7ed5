"""What the dequantization costs the wgmma tiles: time them with its PTX replaced by cheaper, wrong PTX.

    python benchmarks/dequant_probe.py VARIANT [ab_decode.py arguments]
    for v in base nodq cut2 cut2s base; do
        TRITON_CACHE_DIR=/tmp/tc_$v python benchmarks/dequant_probe.py $v --shapes deepseek-v3,qwen3-30b-a3b \\
            --tokens 32,128 --rounds 3 --mode t16=variant:tiles16 --out out_$v
    done

``gluon_tiles`` turns each weight word and its E4M3 scale into 8 bf16 with one inline-PTX block (``_WORD_ASM``:
11 integer operations for the cut, 4 for the scale, 4 bf16x2 multiplies).  Before the first compile this
script replaces that block; the layer then computes garbage, so the output check is off, but the kernel's loads,
ring and wgmmas are unchanged and its time says how much of the layer the dequantization's instructions cost:

- ``base``: the kernel as it is (time it first and last: the spread between processes);
- ``nodq``: the word passed through (no cut, no scale): the bound a cheaper dequantization could reach;
- ``cut2``: every pair cut by one shift and one mask, 3 integer operations a word fewer than any layout of
  the codes allows (``triton_layout``: no fourth translate of the bf16 pattern fits), the scale as it is;
- ``cut2s``: ``cut2`` with a 2-operation scale conversion instead of 4.

Each variant is a process of its own, with its own ``TRITON_CACHE_DIR`` (the patched block is a global the
compiled kernels depend on).  Timing only; results in ``benchmarks/results/*dequant-probe*.json``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab_decode  # noqa: E402
from moe_passes.kernels import gluon_tiles  # noqa: E402
from moe_passes.kernels.triton_common import scale_pairs_asm  # noqa: E402

# two operations in its place (wrong values, the same registers)
_CHEAP_SCALE = """
    .reg .b32 s, s9;
    cvt.u32.u16 s9, $9;
    shl.b32 s, s9, 4;
    add.u32 s, s, 0x77807780;"""
# one shift and one mask a pair
_CUT2 = """
    .reg .b32 p0, p1, p2, p3;
    and.b32 p0, $8, 0x81C081C0;
    shl.b32 p1, $8, 3; and.b32 p1, p1, 0x81C081C0;
    shl.b32 p2, $8, 6; and.b32 p2, p2, 0x81C081C0;
    shr.b32 p3, $8, 2; and.b32 p3, p3, 0x81C081C0;"""
VARIANTS = ("base", "nodq", "cut2", "cut2s")


def variant_asm(name: str):
    """The PTX block that replaces ``gluon_tiles._WORD_ASM`` for variant ``name`` (None: the kernel's own)."""
    if name == "nodq":
        return "{ mov.b32 {$0, $1}, $8; mov.b32 {$2, $3}, $8; mov.b32 {$4, $5}, $8; mov.b32 {$6, $7}, $8; }"
    if name in ("cut2", "cut2s"):  # the kernel's own scale conversion in cut2
        scale = _CHEAP_SCALE if name == "cut2s" else gluon_tiles._SCALE_ASM
        return "{" + _CUT2 + scale + scale_pairs_asm("s") + "}"
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VARIANTS:
        raise SystemExit(f"usage: dequant_probe.py {{{','.join(VARIANTS)}}} [ab_decode.py arguments]")
    if not gluon_tiles.AVAILABLE:
        raise SystemExit("dequant_probe.py needs Gluon's Hopper API (the wgmma tiles)")
    asm = variant_asm(argv[0])
    if asm is not None:
        gluon_tiles._WORD_ASM = gluon_tiles.gl.constexpr(asm)
    print(f"dequant_probe: {argv[0]}", flush=True)
    return ab_decode.main(argv[1:] + ["--no-check"])


if __name__ == "__main__":
    sys.exit(main())
