"""``moe-nvfp4 bench``'s arguments and its floor, on the CPU (the timing itself needs the GPU)."""

import pytest

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
