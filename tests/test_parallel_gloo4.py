"""Expert and tensor parallelism on the CPU with 4 gloo processes: each rank holds 2 of the 8 experts, or one
16-wide NVFP4 block of each gate/up half (padded to the kernel's 64 on its own); EP+DP gathers 4 ranks' tokens.

A subset of the 2-process cases, to keep the CI time in check: 4 ranks share the 2 cores.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from parallel_harness import check, run_group

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

NAMES = ["ep_eager_every_activation_and_routing", "tp_eager_every_activation_and_routing",
         "ep_compiled_eager_inner_all_activations", "tp_compiled_eager_inner_all_activations",
         "ep_data_parallel", "uneven_shards", "memory_per_rank", "backend_option_and_cache_key"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_group(str(tmp_path_factory.mktemp("gloo4")), 4, "gloo", "cpu", NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_case(results, name):
    check(results, name)
