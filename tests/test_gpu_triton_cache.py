"""A second process finds the Triton kernels the first one compiled in Triton's disk cache, whatever inductor did
to Triton's ptxas setting in either process (``triton_common._ptxas_as_inductor``).

Triton's cache key holds the ptxas version.  Inductor points Triton at torch's bundled ptxas in-process on some
paths only: on an H100 with torch 2.11 a cold ``bench --model`` process kept Triton's own ptxas while the warm one,
loading inductor's cached graphs, had ``TRITON_PTXAS_PATH`` set to torch's, and the warm process compiled every
one of our kernels again.  Skipped without CUDA or Triton, and where inductor picks no ptxas (nothing to keep in
step with).
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# One layer called at 16 and 200 tokens: the routing, grouping, decode, tile and combine kernels.  AS_INDUCTOR:
# the process starts as after an in-process inductor compile, which sets the path before our package is imported.
_SCRIPT = """
import os, sys, torch
if sys.argv[1] == "as_inductor":
    from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path
    _set_triton_ptxas_path()
from moe_passes import FusedMoE
g = torch.Generator().manual_seed(0)
E, H, I = 16, 512, 256
moe = FusedMoE.from_float(torch.randn(E, 2 * I, H, generator=g) / 23, torch.randn(E, H, I, generator=g) / 16, top_k=4,
                          activation="silu", routing="renormalize", calibration=torch.randn(8, H, generator=g)).cuda()
assert moe.kernel == "triton", moe.kernel
with torch.inference_mode():
    for tokens in (16, 200):
        moe(torch.randn(tokens, H, device="cuda").bfloat16(), torch.randn(tokens, E, device="cuda"))
torch.cuda.synchronize()
print(os.environ.get("TRITON_PTXAS_PATH"))
"""


def _compiled_kernels(cache: pathlib.Path) -> set:
    return {p.relative_to(cache) for p in cache.rglob("*.json") if not p.name.startswith("__grp__")}


def _run(cache: pathlib.Path, how: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_PTXAS_PATH"}
    env.update(TRITON_CACHE_DIR=str(cache), MOE_NVFP4_CUDA_DECODE="0")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, how], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_second_process_compiles_no_kernel_of_ours_again(tmp_path):
    pytest.importorskip("triton")
    compile_tasks = pytest.importorskip("torch._inductor.runtime.compile_tasks")
    if not hasattr(compile_tasks, "_set_triton_ptxas_path"):
        pytest.skip("this torch's inductor has no ptxas setting to keep in step with")
    ptxas = _run(tmp_path, "as_inductor")
    if ptxas == "None":
        pytest.skip("this torch's inductor picks no ptxas: Triton keeps its own in every process")
    first = _compiled_kernels(tmp_path)
    assert first, "the first process compiled no Triton kernel: the test exercises nothing"
    assert _run(tmp_path, "plain") == ptxas
    again = _compiled_kernels(tmp_path) - first
    assert not again, f"the second process compiled again: {sorted(str(p) for p in again)}"
