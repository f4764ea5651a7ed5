"""``moe-nvfp4 bench --parallel``'s arguments on the CPU (the timing runs with ``--device cpu`` or on GPUs)."""

import pytest

from moe_passes import bench


def test_parallel_mode_is_dispatched_and_checks_its_shapes(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--parallel", "ep", "--device", "cpu", "--shapes", "llama-9000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "moe-nvfp4 bench --parallel" in err and "llama-9000" in err and "tiny" in err


def test_parallel_mode_must_be_ep_or_tp(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--parallel", "dp", "--device", "cpu"])
    assert "invalid choice" in capsys.readouterr().err
