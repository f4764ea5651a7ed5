"""The command line refuses what cannot work with one clear line, and stops quietly when its reader leaves."""

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, **popen):
    code = "import sys; from moe_passes.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True, **popen)


@pytest.mark.parametrize("layer, reason", [
    (("--hidden", "0", "--intermediate", "64", "--experts", "8", "--top-k", "2"), "hidden must be a positive int"),
    (("--hidden", "64", "--intermediate", "64", "--experts", "4", "--top-k", "5"), r"top_k=5 exceeds the number of"),
])
def test_plan_refuses_impossible_layers(layer, reason, capsys):
    from moe_passes.cli import main

    assert main(["plan", *layer]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moe-nvfp4 plan: error:")
    assert re.search(reason, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_demo_on_cuda_without_cuda_is_a_clear_error(capsys):
    from moe_passes.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch build has no CUDA support" in err and "Traceback" not in err


def test_plan_into_a_closed_pipe_exits_quietly():
    # The reader closes before the planner writes (it is still importing torch): `plan | head -0`.
    proc = _cli("plan", "--hidden", "2688", "--intermediate", "1856", "--experts", "128", "--top-k", "6",
                stdout=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1
