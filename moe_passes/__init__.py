"""moe_nvfp4: a torch.compile backend and graph-pass framework for NVFP4 Mixture-of-Experts layers.

``torch.compile(model, backend="moe_nvfp4")`` rewrites every FusedMoE node into pad -> kernel -> slice
and proves at compile time that no padded tensor meets an unpadded one.
"""

from moe_passes.contract import MoEShape, align_hidden_dim, trtllm_chunk_size
from moe_passes.errors import KernelUnavailableError, MoEConfigError, MoEError, MoEShapeError
from moe_passes.layer import FusedMoE
from moe_passes.compile import compile

__all__ = ["FusedMoE", "compile", "MoEShape", "MoEError", "MoEShapeError", "MoEConfigError", "KernelUnavailableError",
           "align_hidden_dim", "trtllm_chunk_size"]
__version__ = "0.1.0"
