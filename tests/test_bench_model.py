"""``moe-nvfp4 bench --model``: the end-to-end benchmark runs on a tiny model on the CPU and writes its JSON.

No timing is checked here (the CPU smoke run has no CUDA graphs and its times mean nothing); the GPU run is
documented in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from moe_passes import bench_model, cli  # noqa: E402

TINY_RUN = ["--model", "qwen3-30b-a3b", "--tiny", "--device", "cpu", "--inner", "eager", "--layers", "1",
            "--batches", "1,2", "--prompt", "8", "--prefill", "16", "--steps", "2", "--rounds", "1", "--warmup", "1",
            "--prefill-repeats", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "result.json"
    rc = cli.main(["bench", *TINY_RUN, "--out", str(out)])
    torch._dynamo.reset()
    return rc, out


def test_tiny_run_writes_every_figure(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    data = json.loads(out.read_text())
    meta = data["meta"]
    for key in ("date", "device", "torch", "transformers", "command", "git_commit"):
        assert key in meta
    assert meta["command"].startswith("moe-nvfp4 bench --model qwen3-30b-a3b")
    assert data["model"]["name"] == "qwen3-30b-a3b" and data["model"]["layers"] == 1
    assert data["settings"]["batches"] == [1, 2]
    assert set(data["variants"]) == {"bf16", "nvfp4"}
    for variant in data["variants"].values():
        assert set(variant["decode"]) == {"1", "2"}
        for timing in [*variant["decode"].values(), variant["prefill"]]:
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
        assert all(d["pipelined_ms"] > 0 for d in variant["decode"].values())
        assert variant["prefill"]["tokens"] == 16
        assert variant["compile_s"] > 0 and set(variant["first_calls_s"]) == {"decode_b1", "decode_b2", "prefill_16"}
        assert set(variant["profile"]) == {"1", "2"}  # None on the CPU: the profile counts CUDA kernels
        assert variant["counters"]["graphs"] == 3 and variant["counters"]["graph_breaks"] == 0  # fullgraph
    assert data["variants"]["nvfp4"]["conversion"]["converted"] == 1
    assert data["variants"]["nvfp4"]["convert_s"] > 0
    comp = data["comparison"]
    assert set(comp["decode_speedup"]) == {"1", "2"} and comp["prefill_speedup"] > 0 and comp["compile_ratio"] > 0
    assert {"decode_speedup_b1", "prefill_speedup", "compile_ratio"} <= set(comp["targets"])


def test_tiny_run_nvfp4_logits_are_close_to_bf16(tiny_run):
    """The converted model's first decode step against the bf16 one: NVFP4's error, not a wrong model (measured
    0.012 on this tiny config, where the MoE is a small part of the logits), and not zero (it was converted)."""
    _, out = tiny_run
    errors = json.loads(out.read_text())["comparison"]["logit_rel_err"]
    assert set(errors) == {"1", "2"}
    assert all(0 < e < 0.1 for e in errors.values()), errors


def test_tiny_run_plots_when_matplotlib_is_installed(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = tiny_run
    assert bench_model.plot(json.loads(out.read_text()), str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_without_cuda_the_gpu_run_says_how_to_smoke_test(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench", "--model", "qwen3-30b-a3b"]) == 2
    assert "--device cpu --tiny" in capsys.readouterr().err


def test_unknown_model_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_model.main(["--model", "llama-9000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "llama-9000" in err and all(name in err for name in bench_model.PRESETS)


def test_a_family_convert_leaves_alone_is_skipped_with_the_reason(monkeypatch, capsys):
    from moe_passes.integrations import transformers as integration

    convert = integration.convert
    monkeypatch.setattr(integration, "convert", lambda model, **kw: convert(model, include=lambda *a: False, **kw))
    assert bench_model.main(["--model", "qwen3-30b-a3b", "--tiny", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "skipped" in err and "excluded by include=" in err


def test_a_missing_config_class_is_skipped(monkeypatch, capsys):
    preset = bench_model.PRESETS["qwen3-30b-a3b"]
    monkeypatch.setitem(bench_model.PRESETS, "qwen3-30b-a3b",
                        bench_model.Preset("NoSuchMoeConfig", preset.model_class, preset.shapes, preset.tiny))
    assert bench_model.main(["--model", "qwen3-30b-a3b", "--tiny", "--device", "cpu"]) == 2
    assert "has no NoSuchMoeConfig" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(bench_model.PRESETS))
def test_every_preset_builds_its_tiny_config(name):
    import transformers

    if not hasattr(transformers, bench_model.PRESETS[name].config_class):
        pytest.skip(f"transformers {transformers.__version__} has no {bench_model.PRESETS[name].config_class}")
    config = bench_model.build_config(name, 3, tiny=True)
    assert config.get_text_config().vocab_size == bench_model.PRESETS[name].tiny["vocab_size"]


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                        ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA B200", "b200"),
                                        ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")])
def test_device_slug(name, slug):
    assert bench_model.device_slug(name) == slug


def test_gpu_activity_counts_kernels_and_the_union_of_busy_time(tmp_path):
    """Two steps: overlapping kernels count once in the busy time, copies count as busy but not as kernels,
    CPU events count as neither."""
    events = [dict(ph="X", cat="kernel", name="gemv", ts=0, dur=10),
              dict(ph="X", cat="kernel", name="moe", ts=5, dur=10),
              dict(ph="X", cat="gpu_memcpy", name="copy", ts=20, dur=2),
              dict(ph="X", cat="kernel", name="moe", ts=30, dur=6),
              dict(ph="X", cat="cpu_op", name="aten::mm", ts=0, dur=100),
              dict(ph="i", cat="kernel", name="marker", ts=1)]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(dict(traceEvents=events)))
    activity = bench_model._gpu_activity(str(path), steps=2)
    assert activity["kernels_per_step"] == 1.5 and activity["copies_per_step"] == 0.5
    assert activity["gpu_busy_ms_per_step"] == pytest.approx((15 + 2 + 6) / 1e3 / 2)
    assert activity["kernel_ms_per_step"] == pytest.approx(26 / 1e3 / 2)
    assert [k["name"] for k in activity["top_kernels"]] == ["moe", "gemv"]
    assert activity["top_kernels"][0]["calls_per_step"] == 1.0


def test_static_cache_for_a_sliding_window_model_decodes_as_transformers_does():
    """Gemma-4's sliding static layers count their length in a Python int (a recompile every step), so the
    benchmark gives them plain static layers when the window covers the cache: the logits of eager decode steps
    must equal those with transformers' own cache, and a cache that outgrows the window is a clear error."""
    import transformers

    if not hasattr(transformers, bench_model.PRESETS["gemma-4-26b-a4b"].config_class):
        pytest.skip("this transformers has no Gemma-4")
    config = bench_model.build_config("gemma-4-26b-a4b", 2, tiny=True)
    model = bench_model.build_model("gemma-4-26b-a4b", config, torch.device("cpu"), torch.float32)
    cache_kw = bench_model._cache_kwarg(model)
    ids = torch.randint(0, config.vocab_size, (1, 12))
    ours = bench_model.make_static_cache(config, 32, 1, torch.device("cpu"), torch.float32)
    assert not any(layer.is_sliding for layer in ours.layers)
    theirs = transformers.StaticCache(config=config, max_cache_len=32)
    assert any(layer.is_sliding for layer in theirs.layers)
    with torch.no_grad():
        for cache in (ours, theirs):
            model(input_ids=ids, **{cache_kw: cache}, use_cache=True)
        for step in range(3):
            token = torch.randint(0, config.vocab_size, (1, 1))
            a, b = (model(input_ids=token, **{cache_kw: c}, use_cache=True).logits for c in (ours, theirs))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outgrows the sliding window"):
        bench_model.make_static_cache(config, config.sliding_window + 1, 1, torch.device("cpu"), torch.float32)
