"""The Triton kernel's weight layout: E2M1 nibbles re-placed inside each 32-bit word, once, at preparation.

The canonical layout keeps element ``i`` of a word (8 consecutive elements along K) in nibble ``i``
(``sign | e1 e0 m``).  The kernels want bf16 bit patterns: a code placed with its magnitude bits at bf16
bits 8..6 and its sign at bit 15 reads as ``e2m1 * 2^-126`` (codes 0 and 1 become the bf16 zero and
subnormal), and two of them in one 32-bit register are a packed ``bf16x2``.  The layout here puts the
bits so that every pair ``(2j, 2j+1)`` comes out with at most three shifts and masks::

    pair 0 (e0, e1):  w        & 0x81C081C0
    pair 1 (e2, e3): (w << 3)  & 0x81C081C0
    pair 2 (e4, e5): (w << 6)  & 0x81C081C0
    pair 3 (e6, e7): ((w >> 4) & 0x00C000C0) | ((w >> 5) & 0x01000100) | ((w << 1) & 0x80008000)

which is 11 integer operations for 8 elements (the canonical layout needs 19 plus 8 conversions).
``0x81C081C0`` is the sign and magnitude bits of both bf16 halves; the three translates ``0, -3, -6``
of that pattern are the only ones that do not overlap, so the last pair takes the 8 bits left over.

Then rows are stored in *bands* (:func:`to_band_layout`, applied to the codes and to the E4M3 block
scales alike): 16 consecutive rows (a multiple of 16 per expert on this path) form a band, K is cut into
*pieces* of 4 groups (64 elements: 32 code bytes and 4 scale bytes per row), and a band holds its pieces
one after another, each piece's 16 rows contiguous::

    row-major:  row 0: [p0 p1 p2 ...]  row 1: [p0 p1 p2 ...]  ...  row 15: [...]
    banded:     [p0 of rows 0..15] [p1 of rows 0..15] [p2 of rows 0..15] ...

The last piece of a row is narrower when K/16 is not a multiple of 4, so the tensors keep their shapes
(the registry's contract: only the order of bytes changes).  Why: a warp's load of 8 rows x 32 bytes of
one K step touches 8 cache lines row-major and 2 banded; the kernels' loops wait on those L1 requests, and
the banded copy made the decode 3-19% faster (H200, 2-64 tokens).  Group ``g`` of band row ``r`` sits
:func:`band_offset` groups after the band's start.  Global scales are not touched.  Everything here is
plain torch (it runs on the CPU), so the CPU tests can check the layout against the canonical decode.
"""

from __future__ import annotations

import torch

__all__ = ["to_triton_layout", "from_triton_layout", "to_band_layout", "from_band_layout", "band_offset",
           "emulate_word_decode", "PAIR_MASK", "BAND_ROWS", "PIECE_GROUPS"]

PAIR_MASK = 0x81C081C0
BAND_ROWS = 16  # rows per band
PIECE_GROUPS = 4  # 16-element groups per piece (64 elements)

# element -> (bit of code bit 0, code bit 1, code bit 2, sign) inside the 32-bit word
_PLACES = (
    (6, 7, 8, 15), (22, 23, 24, 31),  # pair 0: where bf16 wants them
    (3, 4, 5, 12), (19, 20, 21, 28),  # pair 1: three bits lower
    (0, 1, 2, 9), (16, 17, 18, 25),   # pair 2: six bits lower
    (10, 11, 13, 14), (26, 27, 29, 30),  # pair 3: the bits left over
)
_CHUNK_WORDS = 1 << 22  # bounds the int64 temporaries (32 MiB each) when preparing large experts


def _check(packed: torch.Tensor, name: str) -> None:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"{name} must be a uint8 tensor of packed E2M1 pairs, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.ndim < 1 or packed.shape[-1] % 4:
        raise ValueError(f"{name}: the last dimension ({tuple(packed.shape)}) must be a multiple of 4 bytes "
                         "(8 elements per 32-bit word)")


def _words(packed: torch.Tensor) -> torch.Tensor:
    """Little-endian 32-bit words as non-negative int64, flat."""
    b = packed.contiguous().reshape(-1, 4).to(torch.int64)
    return b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    return torch.stack([(words >> s) & 0xFF for s in (0, 8, 16, 24)], dim=1).to(torch.uint8)


def _permute(packed: torch.Tensor, forward: bool) -> torch.Tensor:
    out = torch.empty_like(packed, memory_format=torch.contiguous_format)
    src = packed.contiguous().view(-1)
    dst = out.view(-1)
    for start in range(0, src.numel(), 4 * _CHUNK_WORDS):
        w = _words(src[start:start + 4 * _CHUNK_WORDS])
        r = torch.zeros_like(w)
        for i, places in enumerate(_PLACES):
            for bit, place in enumerate(places):
                if forward:  # canonical nibble bit (4i + bit) -> place
                    r |= ((w >> (4 * i + bit)) & 1) << place
                else:
                    r |= ((w >> place) & 1) << (4 * i + bit)
        dst[start:start + 4 * _CHUNK_WORDS] = _bytes(r).view(-1)
    return out


def to_triton_layout(packed: torch.Tensor) -> torch.Tensor:
    """Canonical packed E2M1 bytes ``[..., K/2]`` -> the Triton kernel's layout (same shape, dtype, device)."""
    _check(packed, "packed")
    return _permute(packed, forward=True)


def from_triton_layout(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_triton_layout`."""
    _check(packed, "packed")
    return _permute(packed, forward=False)


def band_offset(g, r, groups: int):
    """Offset, in groups, of group ``g`` of band row ``r`` (0..15) from its band's start, for rows of
    ``groups`` groups (works elementwise on integer tensors; the kernels compute the same)."""
    p = g // PIECE_GROUPS
    full = groups // PIECE_GROUPS
    width = groups - full * PIECE_GROUPS
    if isinstance(p, torch.Tensor):
        width = torch.where(p < full, PIECE_GROUPS, width)
    elif p < full:
        width = PIECE_GROUPS
    return p * (BAND_ROWS * PIECE_GROUPS) + r * width + (g - p * PIECE_GROUPS)


def _check_bands(t: torch.Tensor, name: str, per_group: int) -> None:
    if t.ndim < 2 or t.shape[-2] % BAND_ROWS or t.shape[-1] % per_group:
        raise ValueError(f"{name}: {tuple(t.shape)} needs rows (dimension -2) in multiples of {BAND_ROWS} and a "
                         f"last dimension in multiples of {per_group} bytes (one 16-element group)")


def _split(t: torch.Tensor, per_group: int):
    """``[..., N, W]`` -> its whole pieces ``[..., N/16, 16, pieces, piece bytes]`` and the narrow rest
    ``[..., N/16, 16, rest bytes]`` (views of the row-major tensor)."""
    n, width = t.shape[-2], t.shape[-1]
    piece = PIECE_GROUPS * per_group
    full = width // piece
    bands = t.reshape(*t.shape[:-2], n // BAND_ROWS, BAND_ROWS, width)
    return bands[..., :full * piece].unflatten(-1, (full, piece)), bands[..., full * piece:]


def to_band_layout(t: torch.Tensor, per_group: int) -> torch.Tensor:
    """Row-major ``[..., N, K*per_group]`` (``per_group`` bytes per 16-element group: 8 for packed codes,
    1 for E4M3 scales) -> the banded order described above (same shape, dtype and device)."""
    _check_bands(t, "to_band_layout", per_group)
    whole, rest = _split(t.contiguous(), per_group)
    # each band: its whole pieces, each piece's 16 rows in turn, then the 16 rows' narrow rest
    banded = torch.cat([whole.transpose(-3, -2).flatten(-3), rest.flatten(-2)], dim=-1)
    return banded.reshape(t.shape)


def from_band_layout(t: torch.Tensor, per_group: int) -> torch.Tensor:
    """The inverse of :func:`to_band_layout`."""
    _check_bands(t, "from_band_layout", per_group)
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    whole, rest = _split(out, per_group)
    pieces, piece = whole.shape[-2], whole.shape[-1]
    bands = t.contiguous().reshape(*rest.shape[:-2], -1)
    whole.copy_(bands[..., :pieces * BAND_ROWS * piece].unflatten(-1, (pieces, BAND_ROWS, piece)).transpose(-3, -2))
    rest.copy_(bands[..., pieces * BAND_ROWS * piece:].unflatten(-1, (BAND_ROWS, rest.shape[-1])))
    return out


def emulate_word_decode(packed: torch.Tensor) -> torch.Tensor:
    """What the kernels' PTX computes from the Triton layout, in torch: bf16 ``e2m1 * 2^-126`` values.

    Returns float32 ``[..., K]`` (the bf16 patterns widened); multiplied by ``2^126`` this must equal the
    canonical decode.  Used by the CPU tests to pin the bit contract the GPU code relies on.
    """
    _check(packed, "packed")
    w = _words(packed)
    pairs = [w & PAIR_MASK, (w << 3) & PAIR_MASK, (w << 6) & PAIR_MASK,
             ((w >> 4) & 0x00C000C0) | ((w >> 5) & 0x01000100) | ((w << 1) & 0x80008000)]
    halves = []
    for p in pairs:
        halves += [p & 0xFFFF, (p >> 16) & 0xFFFF]
    bits = torch.stack(halves, dim=1)  # [words, 8] bf16 patterns in element order
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    vals = bits.view(torch.bfloat16).to(torch.float32)
    return vals.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
