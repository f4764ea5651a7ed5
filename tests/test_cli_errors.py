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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_demo_shows_the_graph_that_ran_and_its_numerics(device, capsys):
    """The demo lists the graph that served --tokens (symbolic token count; the one-token graph it compiles
    after must not replace it), and on a GPU compares with the fp32 block there."""
    from moe_passes.cli import main

    assert main(["demo", "--tokens", "9", "--inner", "eager", "--repeats", "1", "--device", device]) == 0
    out = capsys.readouterr().out
    before, after = out.split("ATen graph before the passes")[1].split("ATen graph after lowering")
    assert re.search(r"fused_moe +moe_nvfp4\.fused_moe +\[s\d+x2688\]", before)
    assert re.search(r"slice_tensor +slice +\[s\d+x2688\]", after), after
    errors = dict(re.findall(r"^    (compiled vs [^\n]*?) {2,}\S+ +(\S+)$", out, flags=re.M))
    assert float(errors["compiled vs eager"]) < 2e-2 and float(errors["compiled vs unquantized fp32 block "
                                                                       "(NVFP4 error)"]) < 0.3, errors


@pytest.mark.parametrize("argv, why", [(["--repeats", "0"], "--repeats must be at least 1"),
                                       (["--device", "meta"], "--device meta holds no data")])
def test_demo_refuses_arguments_it_cannot_use(argv, why, capsys):
    from moe_passes.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", *argv])
    assert info.value.code == 2 and why in capsys.readouterr().err


def test_plan_into_a_closed_pipe_exits_quietly():
    # The reader closes before the planner writes (it is still importing torch): `plan | head -0`.
    proc = _cli("plan", "--hidden", "2688", "--intermediate", "1856", "--experts", "128", "--top-k", "6",
                stdout=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 1
