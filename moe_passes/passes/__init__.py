"""Graph passes of the moe_nvfp4 backend, one module each, and the pipeline that orders them."""

from __future__ import annotations

from typing import Iterable, Optional

from moe_passes.passes.lower_fused_moe import LowerFusedMoE
from moe_passes.passes.manager import GraphPass, PassLike, PassManager, PassRecord, PassResult
from moe_passes.passes.verify import VerifyMoEShapes, verify_graph

__all__ = ["GraphPass", "PassResult", "PassRecord", "PassManager", "LowerFusedMoE", "VerifyMoEShapes",
           "verify_graph", "default_pipeline"]


def default_pipeline(extra_passes: Optional[Iterable[PassLike]] = None, **manager_kwargs) -> PassManager:
    """The declared order: built-in rewrites, then the user's passes, then verification (always last)."""
    return PassManager([LowerFusedMoE(), *(extra_passes or ()), VerifyMoEShapes()], **manager_kwargs)
