"""The NVFP4 format: E2M1 elements, FP8 E4M3 block scales over 16 elements, an FP32 global scale.

Conventions (shared with FlashInfer / TensorRT-LLM / ModelOpt):

* an element is 4 bits: sign in bit 3, a 3-bit magnitude code meaning 0, 0.5, 1, 1.5, 2, 3, 4, 6;
* two elements per byte, the even-indexed element in the low nibble;
* one float8_e4m3fn block scale per 16 consecutive elements of the last (reduction) dimension;
* the global scale is a *multiplier* applied at quantization: ``gs = 448 * 6 / amax``.  Checkpoints
  store its reciprocal.  Dequantization is ``e2m1(q) * block_scale / gs``.

Everything here is plain torch and runs on any device.  Bad input raises ``ValueError`` naming the
problem, because these functions sit at the boundary where user tensors enter the project (NaN or inf
data: ``MoENonFiniteError``, a ``ValueError`` the MoE op re-raises with the layer's name).
"""

from __future__ import annotations

import torch

from moe_passes.errors import MoENonFiniteError

__all__ = [
    "BLOCK_SIZE",
    "E2M1_MAX",
    "E4M3_MAX",
    "E2M1_VALUES",
    "default_global_scale",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_nvfp4_experts",
    "dequantize_nvfp4_experts",
    "unpack_e2m1",
    "swizzle_scales",
    "unswizzle_scales",
    "swizzled_shape",
]

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
# Magnitude for each 3-bit code; index 8..15 are the negatives (sign bit set).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Round-to-nearest-even on the E2M1 grid as a count of thresholds crossed.  At an exact midpoint the
# even code wins, so the comparison is strict (>) when the lower neighbour has the even code and
# inclusive (>=) when the upper one has: 0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2, 2.5->2, 3.5->4, 5->4.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least one dimension (the reduction dimension K), got a scalar")


def default_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """``448 * 6 / amax`` as float32; 1.0 where amax is zero so that all-zero tensors stay finite, and at most
    float32's largest value where amax is so small (under ~8e-36) that the quotient would overflow."""
    amax = amax.float()
    if not bool(torch.isfinite(amax).all()):
        raise MoENonFiniteError(f"amax {amax.tolist() if amax.numel() <= 8 else 'of some rows'} is not finite: "
                                "NaN or infinite values set no NVFP4 global scale")
    scale = (E4M3_MAX * E2M1_MAX) / amax.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(amax > 0, scale.clamp(max=torch.finfo(torch.float32).max), 1.0)


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    mag = scaled.abs()
    code = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for threshold, inclusive in _THRESHOLDS:
        code += (mag >= threshold if inclusive else mag > threshold).to(torch.uint8)
    # Keep the sign of negative values (also for those that round to zero), as the hardware does.
    return code | (torch.signbit(scaled).to(torch.uint8) << 3)


def quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor | float | None = None):
    """Quantize ``x [..., K]`` to NVFP4.

    Returns ``(packed uint8 [..., K/2], scales float8_e4m3fn [..., K/16] (linear layout), global_scale)``.
    ``global_scale`` defaults to ``448*6/amax(x)`` (a float32 0-dim tensor).  A given global scale may
    also be a tensor broadcastable against ``x.shape[:-1]`` after a trailing unit dimension, e.g. one
    scale per expert of shape ``[E, 1]`` for weights ``[E, N, K]``; it is returned as float32.
    """
    _check_float(x, "x")
    k = x.shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(f"the last dimension K={k} must be a multiple of {BLOCK_SIZE} (the NVFP4 block size)")
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise MoENonFiniteError("x contains NaN or infinite values; NVFP4 cannot represent them")
    if global_scale is None:
        global_scale = default_global_scale(xf.abs().amax() if xf.numel() else torch.zeros(()))
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device)
    if not bool(torch.isfinite(gs).all()) or bool((gs <= 0).any()):
        raise ValueError(f"global_scale must be finite and positive, got {gs}")

    blocks = xf.reshape(*x.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    gs_b = gs.reshape(*gs.shape, 1, 1) if gs.ndim else gs
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    # Clamp before the cast: torch's float8 conversion does not saturate.
    sf = (gs_b * block_amax / E2M1_MAX).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    sf_f = sf.float()
    ratio = gs_b / sf_f.clamp_min(torch.finfo(torch.float32).tiny)
    scaled = blocks * ratio
    overflow = torch.isinf(ratio) & (sf_f > 0)  # gs/SF ~ 6/amax(block) overflows under ~2e-38; x*gs stays <= 2688
    if bool(overflow.any()):
        scaled = torch.where(overflow, blocks * gs_b / sf_f, scaled)
    # A block whose scale underflows to 0 quantizes to signed zeros (blocks * 0 keeps the sign bit).
    scaled = torch.where(sf_f > 0, scaled, blocks * 0.0)
    codes = _e2m1_codes(scaled).reshape(*x.shape[:-1], k)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), sf.reshape(*x.shape[:-1], k // BLOCK_SIZE), gs


def unpack_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [..., K/2]`` to the element values ``[..., K]`` (no scaling)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NVFP4 data must be uint8, got {packed.dtype}")
    # One lookup per byte: row b of the table holds (value of low nibble, value of high nibble).
    values = torch.tensor(E2M1_VALUES, dtype=dtype, device=packed.device)
    byte_table = torch.stack((values.repeat(16), values.repeat_interleave(16)), dim=-1)
    return byte_table[packed.int()].reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale, dtype: torch.dtype = torch.float32):
    """Inverse of :func:`quantize_nvfp4`: ``e2m1(q) * block_scale / global_scale`` as ``dtype``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float8_e4m3fn:
        raise ValueError(f"scales must be a float8_e4m3fn tensor, got {getattr(scales, 'dtype', type(scales))}")
    k = packed.shape[-1] * 2
    expected = (*packed.shape[:-1], k // BLOCK_SIZE)
    if k % BLOCK_SIZE or tuple(scales.shape) != expected:
        raise ValueError(
            f"scales shape {tuple(scales.shape)} does not match packed shape {tuple(packed.shape)} "
            f"(expected {expected}, one scale per {BLOCK_SIZE} elements in linear layout)"
        )
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device)
    gs_b = gs.reshape(*gs.shape, 1, 1) if gs.ndim else gs
    values = unpack_e2m1(packed).reshape(*packed.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    out = values * (scales.float().unsqueeze(-1) / gs_b)
    return out.reshape(*packed.shape[:-1], k).to(dtype)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def swizzled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the 128x4 swizzled scale matrix for a linear ``[rows, cols]`` one."""
    return _round_up(rows, 128), _round_up(cols, 4)


def _check_scales(scales: torch.Tensor, name: str) -> None:
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"{name} must be a float8_e4m3fn (or uint8 byte view) tensor, got {getattr(scales, 'dtype', type(scales))}")
    if scales.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions [..., rows, cols], got shape {tuple(scales.shape)}")


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Linear ``[..., M, K/16]`` block scales to the 128x4 swizzled layout ``[..., Mp, Kp]``.

    Rows are zero-padded to a multiple of 128 and columns to a multiple of 4; element ``(m, k)`` moves
    to flat offset ``(m//128)*(Kt*512) + (k//4)*512 + (m%32)*16 + ((m%128)//32)*4 + (k%4)``.
    Leading dimensions (e.g. experts) are treated independently.
    """
    _check_scales(scales, "scales")
    dtype = scales.dtype
    *lead, rows, cols = scales.shape
    rp, cp = swizzled_shape(rows, cols)
    raw = scales.view(torch.uint8) if dtype != torch.uint8 else scales
    raw = torch.nn.functional.pad(raw, (0, cp - cols, 0, rp - rows))
    mt, kt = rp // 128, cp // 4
    # m = mt*128 + a*32 + b and k = kt*4 + c  ->  offset order (mt, kt, b, a, c)
    tiles = raw.reshape(*lead, mt, 4, 32, kt, 4)
    n = len(lead)
    perm = list(range(n)) + [n + 0, n + 3, n + 2, n + 1, n + 4]
    out = tiles.permute(perm).contiguous().reshape(*lead, rp, cp)
    return out.view(dtype) if dtype != torch.uint8 else out


def unswizzle_scales(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales`: back to linear ``[..., rows, cols]``."""
    _check_scales(swizzled, "swizzled")
    dtype = swizzled.dtype
    *lead, rp, cp = swizzled.shape
    if (rp, cp) != swizzled_shape(rows, cols):
        raise ValueError(f"swizzled shape {(rp, cp)} does not belong to a [{rows}, {cols}] scale matrix (expected {swizzled_shape(rows, cols)})")
    raw = swizzled.view(torch.uint8) if dtype != torch.uint8 else swizzled
    mt, kt = rp // 128, cp // 4
    tiles = raw.reshape(*lead, mt, kt, 32, 4, 4)
    n = len(lead)
    perm = list(range(n)) + [n + 0, n + 3, n + 2, n + 1, n + 4]
    out = tiles.permute(perm).reshape(*lead, rp, cp)[..., :rows, :cols].contiguous()
    return out.view(dtype) if dtype != torch.uint8 else out


def quantize_nvfp4_experts(w: torch.Tensor):
    """Quantize stacked expert weights ``[E, N, K]`` with one global scale per expert.

    Returns ``(packed [E, N, K/2], scales [E, N, K/16], global_scale float32 [E])``.
    """
    _check_float(w, "w")
    if w.ndim != 3:
        raise ValueError(f"expert weights must be [experts, rows, K], got shape {tuple(w.shape)}")
    gs = default_global_scale(w.detach().float().abs().amax(dim=(1, 2)) if w.numel() else torch.zeros(w.shape[0]))
    packed, scales, gs = quantize_nvfp4(w, gs.to(w.device).reshape(-1, 1))
    return packed, scales, gs.reshape(-1)


def dequantize_nvfp4_experts(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, dtype=torch.float32):
    """Inverse of :func:`quantize_nvfp4_experts` (``global_scale`` has shape ``[E]``)."""
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device)
    if packed.ndim != 3 or gs.shape != (packed.shape[0],):
        raise ValueError(
            f"expected packed [E, N, K/2] with global_scale [E]; got {tuple(packed.shape)} and {tuple(gs.shape)}"
        )
    return dequantize_nvfp4(packed, scales, gs.reshape(-1, 1), dtype)
