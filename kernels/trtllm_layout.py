"""The weight layout FlashInfer's TRTLLM-gen NVFP4 MoE kernel reads, made once when a layer is prepared.

The gated GEMM1 wants its rows as ``[up; gate]`` interleaved in blocks of 8 and both GEMMs want the row order
of ``shuffle_matrix_a`` (epilogue tiles of 128 rows); block scales follow their rows and are then swizzled
into 128x4 tiles.  Expert biases move with their rows.  The call itself is in ``flashinfer_trtllm``.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_passes.contract import TRTLLM_ALIGNMENT, MoEShape
from moe_passes.errors import MoEConfigError
from moe_passes.kernels import registry
from moe_passes.kernels.nvfp4 import BLOCK_SIZE, swizzle_scales

__all__ = ["EPILOGUE_TILE_M", "ACTIVATION_NAMES", "GELU_TANH_REASON", "shuffle_row_indices", "gated_interleave_row_indices", "w13_row_indices",
           "w2_row_indices", "check_tensor", "prepare", "prepare_biases"]

EPILOGUE_TILE_M = 128
# Our activations by the kernel's ActivationType names: the ones it runs.
ACTIVATION_NAMES = {"silu": "Swiglu", "gelu": "Geglu", "relu2": "Relu2", "swiglu_oai": "Swiglu"}

GELU_TANH_REASON = (
    "the TRTLLM-gen NVFP4 MoE kernel has no tanh-approximated GeGLU (FlashInfer's GegluTanh exists "
    "only for other backends), and whether its Geglu is erf- or tanh-GELU is undocumented; use the "
    "'reference' kernel or a kernel that lists gelu_tanh"
)


def shuffle_row_indices(rows: int, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    """``shuffle_matrix_a``'s row order: ``out[j] = in[idx[j]]``.

    Rows move within blocks of 32 (epilogue tile a multiple of 128; else 16): in a block of ``b``
    rows, new row ``j`` takes old row ``(b // 8) * (j % 8) + j // 8``.
    """
    block = 32 if epilogue_tile_m % 128 == 0 else 16
    if rows % block:
        raise MoEConfigError(f"the TRTLLM weight shuffle needs a row count that is a multiple of {block}, got {rows}")
    j = torch.arange(rows, dtype=torch.long)
    within = j % block
    return j - within + (block // 8) * (within % 8) + within // 8


def gated_interleave_row_indices(rows: int) -> torch.Tensor:
    """Gated-activation GEMM row order ``(r0, r_{N/2}, r1, r_{N/2+1}, ...)``: ``out[j] = in[idx[j]]``."""
    if rows % 2:
        raise MoEConfigError(f"gated weights need an even number of rows, got {rows}")
    j = torch.arange(rows, dtype=torch.long)
    return j // 2 + (j % 2) * (rows // 2)


def w13_row_indices(rows: int, gated: bool, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    """Row order taking canonical ``w13`` (``[gate; up]`` when gated) to the kernel's layout.

    ``[gate; up] -> [up; gate]``, then the gated interleave, then the shuffle; non-gated: the shuffle.
    """
    order = torch.arange(rows, dtype=torch.long)
    if gated:
        order = (order + rows // 2) % rows  # [up; gate]
        order = order[gated_interleave_row_indices(rows)]
    return order[shuffle_row_indices(rows, epilogue_tile_m)]


def w2_row_indices(rows: int, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    return shuffle_row_indices(rows, epilogue_tile_m)


def check_tensor(t, name: str, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor):
        raise MoEConfigError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise MoEConfigError(
            f"{name} must be {dtype} with shape {tuple(shape)} for the 'trtllm' kernel, "
            f"got {t.dtype} with shape {tuple(t.shape)}"
        )


def _permute_scales(scales: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    raw = scales.view(torch.uint8).index_select(1, order.to(scales.device))
    return swizzle_scales(raw).view(torch.float8_e4m3fn)


def prepare(weights: registry.MoEWeights, shape: MoEShape) -> registry.MoEWeights:
    """Canonical NVFP4 weights (already padded to the TRTLLM alignment) to the kernel's layout.

    Returns new tensors with the same shapes and dtypes; global scales are passed through.
    """
    if not isinstance(weights, registry.MoEWeights):
        weights = registry.MoEWeights(*weights)
    if shape.activation not in ACTIVATION_NAMES:
        raise MoEConfigError(
            f"kernel 'trtllm' does not support activation {shape.activation!r}"
            + (f" ({GELU_TANH_REASON})" if shape.activation == "gelu_tanh" else "")
        )
    e, hp, ip, n1 = shape.experts, shape.hidden_padded, shape.intermediate_padded, shape.w13_rows
    w13, s13, g13, w2, s2, g2 = weights
    check_tensor(w13, "w13", torch.uint8, (e, n1, hp // 2))
    check_tensor(s13, "w13_scale", torch.float8_e4m3fn, (e, n1, hp // BLOCK_SIZE))
    check_tensor(w2, "w2", torch.uint8, (e, hp, ip // 2))
    check_tensor(s2, "w2_scale", torch.float8_e4m3fn, (e, hp, ip // BLOCK_SIZE))
    for name, gs in (("w13_global_scale", g13), ("w2_global_scale", g2)):
        if not isinstance(gs, torch.Tensor) or gs.shape != (e,) or not gs.dtype.is_floating_point:
            raise MoEConfigError(f"{name} must be a float tensor of shape ({e},), got {getattr(gs, 'shape', gs)}")
    # Swizzled scales keep their linear shape only when rows % 128 == 0 and columns % 4 == 0; the
    # shuffle itself needs rows % 32.  TRTLLM_ALIGNMENT guarantees both.
    for name, rows, cols in (("w13 (2I or I)", n1, hp // BLOCK_SIZE), ("w2 (H)", hp, ip // BLOCK_SIZE)):
        if rows % 128 or cols % 4:
            raise MoEConfigError(
                f"kernel 'trtllm' needs {name} rows to be a multiple of 128 and scale columns a multiple of 4, "
                f"got {rows} rows and {cols} scale columns (pad with the kernel's alignment {TRTLLM_ALIGNMENT})"
            )
    order13 = w13_row_indices(n1, shape.gated).to(w13.device)
    order2 = w2_row_indices(hp).to(w2.device)
    return registry.MoEWeights(
        w13.index_select(1, order13).contiguous(),
        _permute_scales(s13, order13),
        g13,
        w2.index_select(1, order2).contiguous(),
        _permute_scales(s2, order2),
        g2,
    )


def prepare_biases(w13_bias: Optional[torch.Tensor], w2_bias: Optional[torch.Tensor], shape: MoEShape):
    """Padded canonical fp32 biases (``[E, N1]`` gate half then up half, ``[E, Hp]``) in the row order
    :func:`prepare` gives the weights: a bias belongs to its weight row wherever the row goes."""
    e = shape.experts
    if w13_bias is not None:
        check_tensor(w13_bias, "w13_bias", torch.float32, (e, shape.w13_rows))
        w13_bias = w13_bias.index_select(1, w13_row_indices(shape.w13_rows, shape.gated).to(w13_bias.device))
    if w2_bias is not None:
        check_tensor(w2_bias, "w2_bias", torch.float32, (e, shape.hidden_padded))
        w2_bias = w2_bias.index_select(1, w2_row_indices(shape.hidden_padded).to(w2_bias.device))
    return (None if w13_bias is None else w13_bias.contiguous(), None if w2_bias is None else w2_bias.contiguous())
