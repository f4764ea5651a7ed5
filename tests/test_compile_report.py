"""benchmarks/compile_report.py: the tile kernels compiled for SM90 without a GPU (needs triton, skips without)."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("triton")

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compile_report.py")


def _report():
    spec = importlib.util.spec_from_file_location("compile_report", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compile_report", module)
    spec.loader.exec_module(module)
    return module


def test_report_compiles_the_planned_tiles_and_reads_their_resources():
    """Qwen3-30B-A3B at 4096 tokens plans the 128-row wgmma tiles with 32-row tails: four Gluon kernels, the main
    blocks' two with registers within the hardware's 255 and no spills, a shared-memory footprint, two programs an
    SM, asynchronous wgmma that ptxas did not serialize; so do Nemotron-3-Nano's (ungated); the ``tl.dot`` tiles
    with swapped operands (weights as the register operand) leave one drain per K step."""
    from moe_passes.kernels import gluon_tiles

    if not gluon_tiles.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper API")
    report = _report()
    plan, kernels = report.tile_kernels("qwen3-30b-a3b", 4096)
    assert plan.variant == "tiles128" and plan.config.wgmma and plan.config.tail and len(kernels) == 4
    ungated_plan, ungated = report.tile_kernels("nemotron-3-nano", 4096)
    assert ungated_plan.config.tail == 32 and len(ungated) == 4
    for label, fn, args, constexprs, warps, stages in kernels[:2] + ungated[:2]:
        assert fn in (gluon_tiles._gemm1_kernel, gluon_tiles._gemm2_kernel), label
        r = report.compile_kernel(fn, args, constexprs, warps, stages)
        assert 0 < r["regs"] <= 255 and r["spill"] == 0 and r["shared"] > 0 and r["wgmma"] >= 1, (label, r)
        assert min(r["by_regs"], r["by_smem"]) >= 2 and not r["serial"], (label, r)
    _, swapped = report.tile_kernels("qwen3-30b-a3b", 4096, (("wgmma", 0), ("swap", 1)))
    label, fn, args, constexprs, warps, stages = swapped[0]
    r = report.compile_kernel(fn, args, constexprs, warps, stages)
    assert r["drains"] == 1 and r["wgmma"] > 1, (label, r)


def test_a_token_count_the_tiles_do_not_take_compiles_nothing():
    plan, kernels = _report().tile_kernels("qwen3-30b-a3b", 16)
    assert kernels == [] and plan.variant != "tiles128"


@pytest.mark.parametrize("tokens", [128, 4096])
def test_steps_past_whole_ring_turns_stay_asynchronous(tokens):
    """Gemma-4's GEMM2 has 11 K steps, 3 past the 4-slot ring's whole turns: they run first and pipelined, so its
    kernels hold the same wgmmas a turn as the whole-turn kernels (none synchronous after the loop), unserialized
    and without spills."""
    from moe_passes.kernels import gluon_tiles

    if not gluon_tiles.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper API")
    report = _report()
    plan, kernels = report.tile_kernels("gemma-4-26b-a4b", tokens)
    gemm2 = [k for k in kernels if k[1] is gluon_tiles._gemm2_kernel]
    assert plan.config.wgmma and gemm2 and all(k[3]["REM"] == 3 for k in gemm2)
    for label, fn, args, constexprs, warps, stages in gemm2:
        r = report.compile_kernel(fn, args, constexprs, warps, stages)
        assert r["spill"] == 0 and not r["serial"], (label, r)
        assert r["wgmma"] == 2 * stages, (label, r)  # each step of the loop's turn: two halves


def test_overlapping_tail_launches_compile_as_the_plain_ones():
    """With ``overlap`` Qwen3-30B-A3B's four 4096-token kernels keep their registers, unspilled and unserialized;
    GEMM1's launches and GEMM2's tail launch let the next launch start (one ``launch_dependents``) and wait for the
    launch before them, GEMM2's main launch copies its first weights, then waits, then lets the next one start."""
    from moe_passes.kernels import gluon_tiles

    if not gluon_tiles.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper API")
    report = _report()
    _, plain = report.tile_kernels("qwen3-30b-a3b", 4096, (("overlap", 0),))
    _, overlapping = report.tile_kernels("qwen3-30b-a3b", 4096, (("overlap", 1),))
    assert [k[3]["PDL"] for k in plain] == [0, 0, 0, 0]
    # (main GEMM1, main GEMM2, tail GEMM1, tail GEMM2)
    assert [k[3]["PDL"] for k in overlapping] == [2, 1, 2, 2]
    for (label, fn, args, constexprs, warps, stages), other in zip(overlapping, plain):
        r = report.compile_kernel(fn, args, constexprs, warps, stages)
        base = report.compile_kernel(*other[1:])
        assert r["regs"] == base["regs"] and r["spill"] == 0 and not r["serial"], (label, r, base)
        assert base["gdc_wait"] == base["gdc_launch"] == 0 and r["gdc_launch"] == 1 and r["gdc_wait"] >= 1, (label, r)
