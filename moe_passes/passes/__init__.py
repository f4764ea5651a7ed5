"""Graph passes of the moe_nvfp4 backend, one module each, and the pipeline that orders them."""

from __future__ import annotations

from typing import Iterable, Optional

from moe_passes.passes.combine_parallel import CombineParallelMoE
from moe_passes.passes.lower_fused_moe import LowerFusedMoE
from moe_passes.passes.manager import GraphPass, PassLike, PassManager, PassRecord, PassResult
from moe_passes.passes.verify import VerifyMoEShapes, verify_graph

__all__ = ["GraphPass", "PassResult", "PassRecord", "PassManager", "LowerFusedMoE", "CombineParallelMoE", "VerifyMoEShapes",
           "verify_graph", "default_pipeline"]


def default_pipeline(extra_passes: Optional[Iterable[PassLike]] = None, *, parallel=None,
                     **manager_kwargs) -> PassManager:
    """The declared order: built-in rewrites, then the user's passes, then verification (always last).

    ``parallel`` (the backend's option, for layers sharded with ``ExpertParallel`` / ``TensorParallel``) adds
    the combine of their partial outputs right after the lowering; without it a sharded layer fails
    verification (its partial output would meet full ones)."""
    combine = [CombineParallelMoE(parallel)] if parallel is not None else []
    return PassManager([LowerFusedMoE(), *combine, *(extra_passes or ()), VerifyMoEShapes()], **manager_kwargs)
