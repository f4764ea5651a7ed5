"""Expert and tensor parallelism on the CPU: 2 gloo processes, one process group for the whole module.

Each test asserts one case of ``parallel_cases`` (see there for what each checks), all run in one spawn.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import parallel_cases
from parallel_harness import check, run_group

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# Uneven shards matter at 4 ranks (ranks with one expert): that case runs in test_parallel_gloo4 only.
NAMES = [name for name in parallel_cases.CASES if name != "uneven_shards"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(str(tmp_path_factory.mktemp("gloo2")), 2, "gloo", "cpu", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_case(results, name):
    check(results, name)
