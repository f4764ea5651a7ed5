"""``moe-nvfp4 bench``'s arguments and its floor, on the CPU (the timing itself needs the GPU)."""

import pytest
import torch

from moe_passes import bench


def test_unknown_shape_is_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "qwen3-30b-a3b,llama-9000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "llama-9000" in err and all(name in err for name in bench.SHAPES)


def test_empty_shape_list_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shapes", ","])
    assert "no shapes given" in capsys.readouterr().err


def test_shape_list_keeps_order():
    assert bench.shape_list("deepseek-v3,qwen3-30b-a3b") == ["deepseek-v3", "qwen3-30b-a3b"]


@pytest.mark.parametrize("name", list(bench.SHAPES))
def test_floor_counts_the_touched_experts_bytes(name):
    h, i, e, k, activation, _, _ = bench.SHAPES[name]
    matrices = 2 if activation == "relu2" else 3
    per_expert = matrices * h * i // 2 + matrices * h * i // 16  # E2M1 codes + one E4M3 scale per 16
    # one token touches exactly k experts; a huge batch touches all of them
    assert bench.floor_seconds(h, i, e, k, activation, 1, 1.0) == pytest.approx(k * per_expert)
    assert bench.floor_seconds(h, i, e, k, activation, 10**6, 1.0) == pytest.approx(e * per_expert)
    # and the time scales inversely with the bandwidth
    assert bench.floor_seconds(h, i, e, k, activation, 4, 2e12) == pytest.approx(
        bench.floor_seconds(h, i, e, k, activation, 4, 1.0) / 2e12)


def test_bench_inputs_are_seeded_per_shape_and_token_count():
    """``moe-nvfp4 bench`` and ``benchmarks/ab_decode.py`` draw a shape's routing bias and inputs from these
    helpers, so the A/B script times the routing skew the bench reports: the same seed gives the same tensors,
    another token count, shape or run seed gives others, and only ``deepseek_v3`` routing has a bias."""
    seed = bench.shape_seed("deepseek-v3")
    assert len({seed, bench.shape_seed("deepseek-v3", 1), bench.shape_seed("qwen3-30b-a3b")}) == 3
    bias = bench.routing_bias("deepseek-v3", "cpu", seed)
    assert bias.shape == (256,) and torch.equal(bias, bench.routing_bias("deepseek-v3", "cpu", seed))
    assert 0.05 < bias.std().item() < 0.2
    assert bench.routing_bias("qwen3-30b-a3b", "cpu", bench.shape_seed("qwen3-30b-a3b")) is None
    xs, ls = bench.token_inputs("deepseek-v3", 3, 2, "cpu", seed)
    assert [tuple(x.shape) for x in xs] == [(3, 7168)] * 2 and xs[0].dtype == torch.bfloat16
    assert [tuple(lg.shape) for lg in ls] == [(3, 256)] * 2 and ls[0].dtype == torch.float32
    assert not torch.equal(xs[0], xs[1])
    again, _ = bench.token_inputs("deepseek-v3", 3, 2, "cpu", seed)
    assert all(torch.equal(a, b) for a, b in zip(xs, again))
    other, _ = bench.token_inputs("deepseek-v3", 4, 1, "cpu", seed)
    assert not torch.equal(other[0][:3], xs[0])


def test_each_row_names_the_plan_the_triton_layer_ran():
    """A row's ``triton_plan`` is the planner's variant and knobs for the layer's own (prepared) sizes: here
    Qwen3-30B-A3B's on a device without SM90 (the CPU plans as one), where the 4096-token call takes the 128-row
    tiles with 32-row tails and bf16 pair rows, and 64 tokens the 8-token decode blocks."""
    from moe_passes.kernels.registry import MoEWeights, RunArgs

    h, i, e, k, activation, routing, extra = bench.SHAPES["qwen3-30b-a3b"]
    u8 = torch.uint8
    weights = MoEWeights(torch.empty(e, 2 * i, h // 2, dtype=u8), torch.empty(e, 2 * i, h // 16, dtype=u8),
                         torch.empty(e), torch.empty(e, h, i // 2, dtype=u8), torch.empty(e, h, i // 16, dtype=u8),
                         torch.empty(e))
    args = RunArgs(top_k=k, activation=activation, routing=routing, **extra)
    prefill = bench.plan_label(4096, weights, args, "cpu")
    assert prefill.startswith("tiles128 [") and "tail=32" in prefill and "bf16_rows" in prefill, prefill
    assert "wgmma" not in prefill and "chains" not in prefill
    assert bench.plan_label(64, weights, args, "cpu").startswith("grouped_decode [")
    # the sizes come from the weights: with a hidden over 4096 the 256-token call leaves the 16-token blocks
    assert bench.plan_label(256, weights, args, "cpu").startswith("grouped_decode16 [")
    wide = weights._replace(w13=torch.empty(e, 2 * i, 4 * h // 2, dtype=u8))
    assert bench.plan_label(256, wide, args, "cpu").startswith("tiles64 [")


@pytest.mark.parametrize("argv, why", [
    (["--parallel", "ep", "--device", "cpu", "--tokens", "abc"], "expected comma-separated positive token counts"),
    (["--parallel=ep", "--device", "cpu", "--repeats", "0"], "--repeats and --world must be at least 1"),
    (["--parallel", "ep", "--device", "cpu", "--world", "0"], "--repeats and --world must be at least 1"),
    (["--model", "qwen3-30b-a3b", "--device", "foo"], "--device 'foo' is not a device"),
    (["--model=qwen3-30b-a3b", "--warmup", "-2"], "--warmup must not be negative"),
])
def test_bench_arguments_are_refused_with_one_line(argv, why, capsys):
    """Every bench entry (the layer, --parallel, --model; also given as --flag=value) refuses bad arguments with
    argparse's exit code 2 and a message, before building anything."""
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2 and why in capsys.readouterr().err


def test_merge_refuses_a_document_that_is_not_a_run_and_an_out_that_is_a_file(tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert bench.main(["--merge", str(listed), "--out", str(tmp_path / "merged")]) == 2
    assert "is not a bench_moe.json document" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench.main(["--merge", str(listed), "--out", str(listed)])
    assert info.value.code == 2 and "is a file" in capsys.readouterr().err
