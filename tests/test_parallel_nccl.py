"""The expert / tensor parallel cases with NCCL on as many GPUs as there are (2 used; skipped with fewer).

The layers there take the GPU kernel the registry selects (Triton on Hopper, TRTLLM on Blackwell), so
this also checks those kernels' local-expert support against the unsharded layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import parallel_cases
from parallel_harness import check, run_group

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason="needs 2 CUDA GPUs and NCCL")]

NAMES = list(parallel_cases.CASES)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(str(tmp_path_factory.mktemp("nccl")), 2, "nccl", "cuda", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_case(results, name):
    check(results, name)
