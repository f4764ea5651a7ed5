"""The Hopper planner (kernels/triton_plan.py) on the CPU: properties of its plans over many shapes, token
counts and devices, the regime table it follows, the options it takes, and ``moe-nvfp4 plan``."""

from __future__ import annotations

import ast
import dataclasses
import math
import pathlib
import random
import re

import pytest
import torch

from moe_passes.bench import SHAPES
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import options as kernel_options
from moe_passes.kernels.options import KernelOptions
from moe_passes.kernels.triton_plan import (H200, REGIMES, VARIANTS, DecodeConfig, DeviceInfo, Problem, TileConfig,
                                            cached_plan, k_split, one_program_grouping, plan, rows_per_expert)

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = [Problem(1, k, e, h, i, a != "relu2", r, x.get("n_group"), x.get("topk_group"))
         for h, i, e, k, a, r, x in SHAPES.values()]
DEVICES = [H200, DeviceInfo(114, (9, 0), 232448), DeviceInfo(78, (9, 0), None), DeviceInfo(108, (8, 0), None)]
TOKENS = list(range(1, 300)) + [512, 1000, 1024, 2048, 4096, 8192]


def _random_shapes(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        experts = rng.choice([4, 8, 16, 60, 64, 128, 256, 512])
        yield Problem(1, rng.randint(1, min(experts, 16)), experts, 16 * rng.randint(4, 600),
                      16 * rng.randint(2, 300), rng.random() < 0.6)


SHAPES_UNDER_TEST = BENCH + list(_random_shapes(24))


def _first_regime(tokens, top_k, experts, gated, hidden, wgmma=False):
    """The table read independently: the first row whose declared token range, row limit and hidden limit
    hold (its wgmma rows only where the wgmma tiles fit)."""
    touched = experts * (1.0 - (1.0 - top_k / experts) ** tokens)
    rows = tokens * top_k / max(1.0, touched)
    for regime in REGIMES:
        lo, hi = regime.tokens
        if (lo <= tokens <= hi and rows <= regime.max_rows[0 if gated else 1]
                and regime.min_hidden < hidden <= regime.max_hidden and (wgmma or not regime.wgmma)):
            return regime
    raise AssertionError("the table has no catch-all row")


def _fits(shape, device, available):
    """Where the wgmma tiles fit, read independently of the planner."""
    return available and device.capability[0] == 9 and shape.hidden % 64 == 0 and shape.inter % 64 == 0


@pytest.fixture(params=[False, True], ids=["tl_dot", "gluon"])
def gluon_available(request, monkeypatch):
    """The planner as on a machine without Gluon's Hopper API (the CPU CI) and as on one with it."""
    from moe_passes.kernels import gluon_tiles

    monkeypatch.setattr(gluon_tiles, "AVAILABLE", request.param)
    return request.param


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: f"{d.sm_count}sm-sm{d.capability[0]}0")
def test_every_plan_follows_the_table_and_its_config_fits(device, gluon_available):
    for shape in SHAPES_UNDER_TEST:
        fits = _fits(shape, device, gluon_available)
        for tokens in TOKENS:
            problem = dataclasses.replace(shape, tokens=tokens)
            p = plan(problem, device)
            assert p.variant in VARIANTS and p.why
            if p.variant == "cuda_decode":
                assert tokens == 1 and device.capability[0] == 9 and p.config is None
                p = p.fallback
            assert p.variant == _first_regime(tokens, shape.top_k, shape.experts, shape.gated, shape.hidden,
                                              fits).variant
            cfg = p.config
            assert isinstance(cfg, TileConfig if p.variant.startswith("tiles") else DecodeConfig)
            assert cfg == dataclasses.replace(cfg)  # re-validates (__post_init__)
            assert cfg.bm == {"pair_decode": 1, "grouped_decode": 8, "grouped_decode16": 16}.get(p.variant, cfg.bm)
            assert not p.variant.startswith("tiles") or cfg.bm == int(p.variant[5:])
            # every tile plan takes the wgmma tiles exactly where they fit; their tail launches overlap the main
            # ones exactly there
            assert not p.variant.startswith("tiles") or cfg.wgmma == fits
            assert getattr(cfg, "overlap", False) == (fits and bool(getattr(cfg, "tail", 0)))
            if isinstance(cfg, TileConfig):  # 16-row calls chain their launches; big prefill calls write bf16 rows
                assert cfg.chains == (cfg.bm == 16)
                assert cfg.bf16_rows == (cfg.bm >= 64 and cfg.split2 == 1
                                         and problem.pairs * problem.hidden >= 1 << 22)
            # K splits are powers of two, capped, and leave every part at least 256 elements
            for split, k, most in ((getattr(cfg, "split1", 1), problem.hidden, 8), (cfg.split2, problem.inter, 8)):
                assert split & (split - 1) == 0 and split <= most and (split == 1 or k >= 256 * split)
            if isinstance(cfg, TileConfig):
                assert cfg.split2 <= 4 and cfg.bk1 % 64 == 0 and cfg.bk2 % 64 == 0
                if cfg.tail:
                    tail = cfg.tail_tiles()
                    assert tail.bm == min(cfg.tail, 64) and tail.tail == 0 and tail.split2 == cfg.split2
            if isinstance(cfg, DecodeConfig) and cfg.ks1 > 1:
                assert problem.hidden > 4096 and tokens <= 4 and cfg.split1 == 1 and not cfg.grouped
            assert p.one_program_grouping == (problem.pairs <= 1024 and cfg.bm in (8, 16) and not
                                              getattr(cfg, "tail", 0))


def test_the_variant_changes_only_at_the_declared_boundaries(gluon_available):
    """Along the token counts of a shape the variant changes exactly where the first table row taking the call
    changes, rows per expert never fall, and the tiles never get smaller."""
    for shape in SHAPES_UNDER_TEST:
        previous = None
        fits = _fits(shape, H200, gluon_available)
        for tokens in range(2, 5000):
            p = plan(dataclasses.replace(shape, tokens=tokens), H200)
            regime = _first_regime(tokens, shape.top_k, shape.experts, shape.gated, shape.hidden, fits)
            rows = rows_per_expert(tokens, shape.top_k, shape.experts)
            if previous is not None:
                prev_p, prev_regime, prev_rows = previous
                assert (p.variant != prev_p.variant) <= (regime.variant != prev_regime.variant)
                assert rows >= prev_rows - 1e-9
                if prev_p.variant.startswith("tiles") and p.variant.startswith("tiles"):
                    assert p.config.bm >= prev_p.config.bm
            previous = p, regime, rows


def test_benchmark_shapes_take_the_documented_variants(gluon_available):
    """docs/architecture.md's dispatch table for the four benchmark layers on an H200, with and without the
    wgmma tiles."""
    common = {1: "cuda_decode", 2: "pair_decode", 8: "pair_decode", 16: "grouped_decode", 64: "grouped_decode",
              1024: "tiles64", 4096: "tiles128"}
    if gluon_available:
        # from 65 tokens: 16-row blocks to 8 rows per expert (gated, hidden <= 4096), 5 (gated) or 4, 32-row blocks
        # to 32 (24 over a hidden of 4096); at 64, 16-row blocks on ungated layers, from 16 on hiddens over 4096
        common.update({128: "tiles32", 256: "tiles32", 384: "tiles32", 768: "tiles64"})
        by_shape = {"nemotron-3-nano": {64: "tiles16", 96: "tiles32", 512: "tiles32", 1536: "tiles128"},
                    "qwen3-30b-a3b": {96: "tiles16", 128: "tiles16", 512: "tiles32", 1024: "tiles128"},
                    "gemma-4-26b-a4b": {96: "tiles16", 128: "tiles16", 512: "tiles32", 1024: "tiles128"},
                    "deepseek-v3": {16: "tiles16", 32: "tiles16", 64: "tiles16", 96: "tiles16", 128: "tiles16",
                                    512: "tiles32", 768: "tiles32", 1024: "tiles64", 2048: "tiles128"}}
    else:
        # 128 and 256 tokens: 8-token blocks up to 7 rows per expert, 16-token blocks for gated layers above and
        # for DeepSeek-V3's long hidden; at 384 tokens the 64-row tiles (8-warp GEMM1 on the gated short
        # hiddens); the 128-row tiles from 57 rows per expert (49 ungated)
        by_shape = {"nemotron-3-nano": {128: "grouped_decode", 256: "tiles64", 384: "tiles64", 1536: "tiles128"},
                    "qwen3-30b-a3b": {128: "grouped_decode16", 256: "grouped_decode16", 384: "tiles64",
                                      1024: "tiles128"},
                    "gemma-4-26b-a4b": {128: "grouped_decode16", 256: "grouped_decode16", 384: "tiles64",
                                        1024: "tiles128"},
                    "deepseek-v3": {96: "grouped_decode16", 128: "grouped_decode16", 256: "grouped_decode16",
                                    384: "tiles64", 2048: "tiles128"}}
    for name, shape in zip(SHAPES, BENCH):
        want = {**common, **by_shape[name]}
        got = {t: plan(dataclasses.replace(shape, tokens=t), H200).variant for t in want}
        assert got == want, name
        # tl.dot GEMM1's 8-warp programs: gated, hidden <= 4096, 24-56 rows per expert (384-768 tokens here)
        for t in (384, 512, 768, 1024):
            cfg = plan(dataclasses.replace(shape, tokens=t), H200).config
            want_warps = 8 if shape.gated and shape.hidden <= 4096 and t <= 768 and not gluon_available else 4
            assert cfg.warps1 == want_warps and cfg.warps2 == 4, (name, t)


def test_cuda_decode_only_where_it_can_take_the_call():
    qwen3 = dataclasses.replace(BENCH[1], tokens=1)
    assert plan(qwen3, H200).variant == "cuda_decode"
    off = plan(qwen3, H200, KernelOptions(cuda_decode=False))
    assert off.variant == "pair_decode" and off == plan(qwen3, H200).fallback
    assert plan(dataclasses.replace(qwen3, routed_experts=4 * qwen3.experts), H200).variant == "pair_decode"  # expert parallel
    assert plan(qwen3, DeviceInfo(132, (10, 0), 232448)).variant == "pair_decode"  # not SM90
    assert plan(dataclasses.replace(qwen3, experts=1024), H200).variant == "pair_decode"  # past its routing limits
    assert plan(dataclasses.replace(qwen3, tokens=2), H200).variant == "pair_decode"
    # gpt-oss: the CUDA decode's epilogue has no expert biases nor swiglu_oai's parameters
    assert plan(dataclasses.replace(qwen3, biases=True), H200).variant == "pair_decode"
    assert plan(dataclasses.replace(qwen3, activation_params=True), H200).variant == "pair_decode"
    # a hidden size whose w13 band leaves no room for two shared-memory stages: refused when the limit is known
    huge = dataclasses.replace(qwen3, hidden=12800)
    assert plan(huge, H200).variant == "pair_decode"
    assert plan(huge, DeviceInfo(132, (9, 0), None)).variant == "cuda_decode"  # left to the call


def test_overrides_reach_only_their_family_and_unknown_fields_are_errors():
    opts = KernelOptions(decode_overrides=(("vec1", False), ("split2", 2)), tile_overrides=(("nfirst", False),))
    qwen3 = BENCH[1]
    decode = plan(dataclasses.replace(qwen3, tokens=16), H200, opts).config
    assert (decode.vec1, decode.split2) == (False, 2)
    tiles = plan(dataclasses.replace(qwen3, tokens=1024), H200, opts).config
    assert tiles.nfirst is False and tiles.split2 == plan(dataclasses.replace(qwen3, tokens=1024), H200).config.split2
    with pytest.raises(MoEConfigError, match="no fields"):
        plan(dataclasses.replace(qwen3, tokens=16), H200, KernelOptions(decode_overrides=(("tail", 16),)))
    with pytest.raises(MoEConfigError, match="ks1"):  # an override still makes a config that validates
        plan(dataclasses.replace(qwen3, tokens=16), H200, KernelOptions(decode_overrides=(("ks1", 4),)))


def test_one_program_grouping_follows_its_option():
    qwen3 = dataclasses.replace(BENCH[1], tokens=64)  # 512 pairs, grouped decode
    assert plan(qwen3, H200).one_program_grouping
    assert not plan(qwen3, H200, KernelOptions(one_program_pairs=0)).one_program_grouping
    assert not one_program_grouping(100, 64, 0, KernelOptions())  # blocks of more than 16 rows
    assert not one_program_grouping(100, 16, 16, KernelOptions())  # tails


@pytest.mark.parametrize("k, split, step", [(768, 2, 128), (2880, 3, 128), (1040, 3, 64), (208, 4, 64),
                                            (7168, 8, 128), (16, 1, 128), (1856, 4, 128)])
def test_k_split_covers_k_in_whole_steps(k, split, step):
    per, used = k_split(k, split, step)
    assert per % step == 0 and used <= split and per * used >= k > per * (used - 1)


def test_plans_are_cached_per_problem_device_and_options():
    qwen3 = dataclasses.replace(BENCH[1], tokens=16)
    opts = KernelOptions()
    assert cached_plan(qwen3, H200, opts) is cached_plan(dataclasses.replace(qwen3), H200, KernelOptions())
    assert cached_plan(qwen3, H200, KernelOptions(pdl=False)) == cached_plan(qwen3, H200, opts)
    assert len({KernelOptions(), KernelOptions(), KernelOptions(pdl=False)}) == 2  # hashable, by value


@pytest.mark.parametrize("bad", [dict(pdl="0"), dict(cuda_decode_warps=2.5), dict(cuda_decode_warps="12"),
                                 dict(one_program_pairs=None), dict(trtllm_chunk_size=True),
                                 dict(tile_overrides=[("bm", 16)]), dict(tile_overrides=(("bm", [16]),)),
                                 dict(tile_overrides=(("warps1", 0),)), dict(tile_overrides=(("stages1", 1),))])
def test_bad_options_are_refused_when_made_or_planned(bad):
    with pytest.raises(MoEConfigError):
        plan(dataclasses.replace(BENCH[1], tokens=4096), H200, KernelOptions(**bad))


@pytest.mark.parametrize("field, value", [("tokens", 0), ("tokens", -1), ("hidden", 0), ("top_k", 129)])
def test_no_plan_for_an_empty_or_impossible_problem(field, value):
    with pytest.raises(MoEConfigError, match="no plan"):
        plan(dataclasses.replace(BENCH[1], **{field: value}), H200)


def test_options_come_from_the_environment_once_and_can_be_scoped():
    assert KernelOptions.from_env({}) == KernelOptions()
    assert not KernelOptions.from_env({"MOE_NVFP4_PDL": "0"}).pdl
    assert not KernelOptions.from_env({"MOE_NVFP4_CUDA_DECODE": "0"}).cuda_decode
    base = kernel_options.current()
    with kernel_options.use(KernelOptions(one_program_pairs=7)) as scoped:
        assert kernel_options.current() is scoped
        assert kernel_options.current(base) is base  # a call's own options win
    assert kernel_options.current() is base
    for bad in (dict(cuda_decode_warps=0), dict(one_program_pairs=-1), dict(cuda_decode_stage_cap=1),
                dict(decode_overrides=("vec1", False))):
        with pytest.raises(MoEConfigError):
            KernelOptions(**bad)


def test_environment_read_only_in_the_options_module():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.name != "options.py":
            assert not re.search(r"os\.environ|getenv", path.read_text()), path.name


def test_the_planner_needs_neither_triton_nor_a_gpu():
    tree = ast.parse((ROOT / "kernels" / "triton_plan.py").read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(m.split(".")[0] == "triton" or m.endswith("triton_common") for m in imported), imported
    assert "torch.cuda" not in (ROOT / "kernels" / "triton_plan.py").read_text()


def test_cli_plan_names_each_token_counts_variant(capsys):
    from moe_passes.cli import PLAN_TOKENS, main

    h, i, e, k, activation, routing, extra = SHAPES["nemotron-3-nano"]
    assert main(["plan", "--hidden", str(h), "--intermediate", str(i), "--experts", str(e), "--top-k", str(k),
                 "--activation", activation, "--routing", routing, "--tokens", "300"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\s+(\d+)  (\w+)", out, flags=re.M))
    assert sorted(int(t) for t in rows) == sorted({*PLAN_TOKENS, 300})
    # Without a GPU it plans for an H200 with Gluon, whether or not this machine's Triton has it.
    h200 = dataclasses.replace(H200, gluon=True)
    for tokens, variant in rows.items():
        want = plan(Problem(int(tokens), k, e, h, i, False, routing), h200).variant
        assert variant == want and variant in VARIANTS
    if not torch.cuda.is_available():
        assert rows["128"] == "tiles32" and "wgmma" in out
    assert math.isclose(rows_per_expert(1, k, e), 1.0)


def test_cli_plan_of_gpt_oss_takes_the_triton_decode_at_one_token(capsys):
    from moe_passes.cli import main

    assert main(["plan", "--hidden", "2880", "--intermediate", "2880", "--experts", "32", "--top-k", "4",
                 "--activation", "swiglu_oai"]) == 0
    rows = dict(re.findall(r"^\s+(\d+)  (\w+)", capsys.readouterr().out, flags=re.M))
    assert rows["1"] == "pair_decode" and "cuda_decode" not in rows.values()


def test_a_forced_variant_runs_at_every_token_count_and_a_bad_one_is_refused():
    """``KernelOptions.variant`` (A/B runs): that Triton variant wherever the table would pick another, the CUDA
    decode included; an unknown name or a non-string is a MoEConfigError naming the choices."""
    qwen3 = BENCH[1]
    for variant in VARIANTS[1:]:
        for tokens in (1, 40, 700):
            p = plan(dataclasses.replace(qwen3, tokens=tokens), H200, KernelOptions(variant=variant))
            assert p.variant == variant and p.fallback is None
            assert p.config.bm == {"pair_decode": 1, "grouped_decode": 8, "grouped_decode16": 16}.get(
                variant, p.config.bm)
    with pytest.raises(MoEConfigError, match="grouped_decode16"):
        plan(qwen3, H200, KernelOptions(variant="grouped_decode32"))
    with pytest.raises(MoEConfigError, match="variant"):
        KernelOptions(variant=3)


def test_an_expert_parallel_rank_plans_for_its_share_of_the_pairs():
    """A rank holding 16 of 128 experts sees 1/8 of the pairs on its experts, as many per expert as the whole
    layer: the same variant as the unsharded layer (not the one for 8x the rows), and its decode K splits sized
    for its own blocks."""
    qwen3 = BENCH[1]
    for tokens in (2, 16, 64, 128, 256, 1024, 4096):
        whole = plan(dataclasses.replace(qwen3, tokens=tokens), H200)
        rank = plan(dataclasses.replace(qwen3, tokens=tokens, experts=16, routed_experts=128), H200)
        assert rank.variant == whole.variant, tokens
        assert rank.why.split(";")[0] == whole.why.split(";")[0]  # "N rows per expert"
    unsharded = dataclasses.replace(qwen3, tokens=1024, experts=16)  # 16 experts taking every pair
    assert plan(unsharded, H200).variant == "tiles128"


def test_wgmma_tiles_where_they_fit(gluon_available):
    """On an SM90 GPU with Gluon, whole 64-element pieces and no expert biases, the wgmma tiles take the calls
    from 65 tokens (16-row blocks up to 8 rows per expert gated on hiddens up to 4096, else 5 gated and 4 ungated,
    32-row blocks up to 32, then the 64- and 128-row blocks), at 64 tokens on ungated layers and from 16 on hiddens
    over 4096; elsewhere the table is the tl.dot one."""
    qwen = Problem(4096, 8, 128, 2048, 768, True)
    sm100 = DeviceInfo(capability=(10, 0))
    cases = [  # problem, device, variant with the wgmma tiles, variant without
        (qwen, H200, "tiles128", "tiles128"),
        (dataclasses.replace(qwen, tokens=96), H200, "tiles16", "grouped_decode"),  # 6 rows
        (dataclasses.replace(qwen, tokens=256), H200, "tiles32", "grouped_decode16"),  # 16 rows
        (dataclasses.replace(qwen, tokens=768), H200, "tiles64", "tiles64"),  # 48 rows
        (Problem(96, 8, 256, 7168, 2048, True), H200, "tiles16", "grouped_decode16"),  # 3 rows, long hidden
        (Problem(128, 8, 256, 7168, 2048, True), H200, "tiles16", "grouped_decode16"),  # 4.1 rows, long hidden
        (Problem(192, 8, 256, 7168, 2048, True), H200, "tiles32", "grouped_decode16"),  # 6 rows, long hidden
        (Problem(128, 6, 128, 2688, 1856, False), H200, "tiles32", "grouped_decode"),  # 6 rows, ungated
        (Problem(64, 6, 128, 2688, 1856, False), H200, "tiles16", "grouped_decode"),  # 64 tokens, ungated
        (Problem(63, 6, 128, 2688, 1856, False), H200, "grouped_decode", "grouped_decode"),  # below 64 tokens
        (Problem(64, 8, 256, 7168, 2048, True), H200, "tiles16", "grouped_decode"),  # 64 tokens, long hidden
        (Problem(16, 8, 256, 7168, 2048, True), H200, "tiles16", "grouped_decode"),  # 16 tokens, long hidden
        (Problem(15, 8, 256, 7168, 2048, True), H200, "pair_decode", "pair_decode"),  # below 16 tokens
        (Problem(48, 8, 256, 7168, 2048, True), DeviceInfo(), "tiles16", "grouped_decode"),  # any 132-SM SM90
        (Problem(48, 8, 256, 4096, 2048, True), H200, "grouped_decode", "grouped_decode"),  # a hidden of 4096
        (Problem(64, 8, 128, 2048, 768, True), H200, "grouped_decode", "grouped_decode"),  # 64 tokens, gated
        (qwen, sm100, "tiles128", "tiles128"),
        (dataclasses.replace(qwen, tokens=256, hidden=2880, inter=1040), H200, "grouped_decode16", "grouped_decode16"),
        (dataclasses.replace(qwen, tokens=256, biases=True), H200, "grouped_decode16", "grouped_decode16"),
    ]
    for problem, device, with_wgmma, without in cases:
        p = plan(problem, device)
        fits = _fits(problem, device, gluon_available) and not problem.biases
        assert p.variant == (with_wgmma if fits else without), (problem, p)
        if not p.variant.startswith("tiles"):
            continue
        assert p.config.wgmma is fits and ("wgmma" in p.knobs()) is fits
        if fits:  # the ring's 4 slots, no GEMM2 K split, 4 warps
            assert (p.config.stages1, p.config.stages2, p.config.split2, p.config.warps1) == (4, 4, 1, 4)
