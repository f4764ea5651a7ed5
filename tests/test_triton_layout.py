"""The Triton kernel's weight layout and the bit arithmetic its PTX relies on, checked on the CPU.

The GPU code cuts bf16 patterns out of each 32-bit word with the shifts and masks that
``emulate_word_decode`` repeats in torch, then multiplies by ``bf16(block_scale * 2^119)``; these tests pin
that (a) every E2M1 code at every position of a word decodes to its canonical value, and (b) every
product with every finite E4M3 scale is exact in bf16 and a normal number (no flush, no rounding).
"""

from __future__ import annotations

import pytest
import torch

from moe_passes.kernels.nvfp4 import E2M1_VALUES, unpack_e2m1
from moe_passes.kernels.triton_layout import (band_offset, emulate_word_decode, from_band_layout,
                                              from_triton_layout, to_band_layout, to_triton_layout)


def _all_codes_at_all_positions() -> torch.Tensor:
    """Words where each of the 8 positions takes each of the 16 codes, the other positions random."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for pos in range(8):
        for code in range(16):
            nib = torch.randint(0, 16, (8,), generator=g)
            nib[pos] = code
            rows.append((nib[0::2] | (nib[1::2] << 4)).to(torch.uint8))
    return torch.stack(rows)  # [128, 4] bytes = one word each


def test_every_code_at_every_position_decodes_to_its_value():
    canonical = _all_codes_at_all_positions()
    got = emulate_word_decode(to_triton_layout(canonical)).double() * 2.0 ** 126
    want = unpack_e2m1(canonical).double()
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0 stays -0


def test_round_trip_and_shape_on_random_expert_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (3, 40, 72), dtype=torch.uint8, generator=g)
    kernel = to_triton_layout(w)
    assert kernel.shape == w.shape and kernel.dtype == torch.uint8
    assert not torch.equal(kernel, w)
    assert torch.equal(from_triton_layout(kernel), w)
    assert torch.equal(emulate_word_decode(kernel).double() * 2.0 ** 126, unpack_e2m1(w).double())


def test_non_contiguous_input_is_permuted_as_its_values():
    g = torch.Generator().manual_seed(2)
    w = torch.randint(0, 256, (16, 8), dtype=torch.uint8, generator=g)
    view = w.t()  # [8, 16], not contiguous
    assert torch.equal(to_triton_layout(view), to_triton_layout(view.contiguous()))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 6, dtype=torch.uint8), "multiple of 4"),
    (torch.zeros(4, 8, dtype=torch.int32), "uint8"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        to_triton_layout(bad)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5, 13, 14, 15, 16])
@pytest.mark.parametrize("per_group", [8, 1])
def test_band_layout_places_every_group_where_the_kernels_look(groups, per_group):
    g = torch.Generator().manual_seed(groups * 10 + per_group)
    t = torch.randint(0, 256, (2, 48, groups * per_group), dtype=torch.uint8, generator=g)
    banded = to_band_layout(t, per_group)
    assert banded.shape == t.shape and banded.dtype == t.dtype
    assert torch.equal(from_band_layout(banded, per_group), t)
    flat = banded.reshape(2, -1)
    for row in range(48):
        band, r = divmod(row, 16)
        for grp in range(groups):
            # pieces of 4 groups, a piece's 16 rows one after another, the last piece as wide as what is left
            piece, within = divmod(grp, 4)
            width = min(4, groups - 4 * piece)
            at = band * 16 * groups + piece * 64 + r * width + within
            assert band_offset(grp, r, groups) == at - band * 16 * groups
            got = flat[:, at * per_group:(at + 1) * per_group]
            assert torch.equal(got, t[:, row, grp * per_group:(grp + 1) * per_group]), (row, grp)


def test_band_layout_makes_a_k_step_of_eight_rows_one_run():
    """What the layout is for: group ``4p .. 4p+3`` of band rows 0..7 is 8 * 32 contiguous code bytes."""
    t = torch.arange(16 * 12 * 8, dtype=torch.int64).reshape(1, 16, 96)  # 12 groups of 8 "bytes"
    banded = to_band_layout(t, 8).reshape(-1)
    for piece in range(3):
        run = torch.cat([t[0, r, piece * 32:(piece + 1) * 32] for r in range(8)])
        start = piece * 64 * 8
        assert torch.equal(banded[start:start + 256], run)


def test_band_layout_of_a_non_contiguous_input_is_that_of_its_values():
    g = torch.Generator().manual_seed(3)
    view = torch.randint(0, 256, (32, 2, 40), dtype=torch.uint8, generator=g).transpose(0, 1)  # [2, 32, 40]
    assert torch.equal(to_band_layout(view, 8), to_band_layout(view.contiguous(), 8))
    assert torch.equal(from_band_layout(to_band_layout(view, 8), 8), view)


def test_band_offset_matches_on_tensors_and_ints():
    g = torch.arange(15).repeat(16)
    r = torch.arange(16).repeat_interleave(15)
    assert band_offset(g, r, 15).tolist() == [band_offset(int(a), int(b), 15) for a, b in zip(g, r)]
    assert sorted(band_offset(g, r, 15).tolist()) == list(range(16 * 15))  # a permutation of the band


@pytest.mark.parametrize("shape, match", [((4, 20, 16), "multiples of 16"), ((1, 16, 12), "multiples of 8")])
def test_band_layout_bad_shapes_are_clear_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        to_band_layout(torch.zeros(shape, dtype=torch.uint8), 8)


def test_prepared_weights_are_bit_placed_then_banded():
    from moe_passes.kernels.triton_moe import prepare_weights
    from moe_passes.kernels.registry import MoEWeights

    g = torch.Generator().manual_seed(5)
    w13 = torch.randint(0, 256, (2, 32, 184), dtype=torch.uint8, generator=g)  # 368 wide: 23 groups
    s13 = torch.randint(0, 120, (2, 32, 23), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    w2 = torch.randint(0, 256, (2, 368, 8), dtype=torch.uint8, generator=g)
    s2 = torch.randint(0, 120, (2, 368, 1), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    gs = torch.rand(2) + 1
    got = prepare_weights(MoEWeights(w13, s13, gs, w2, s2, gs))
    for prepared, codes in ((got.w13, w13), (got.w2, w2)):
        assert prepared.shape == codes.shape
        assert torch.equal(from_triton_layout(from_band_layout(prepared, 8)), codes)
    for prepared, scales in ((got.w13_scale, s13), (got.w2_scale, s2)):
        assert prepared.dtype == torch.float8_e4m3fn and prepared.shape == scales.shape
        assert torch.equal(from_band_layout(prepared.view(torch.uint8), 1), scales.view(torch.uint8))


def _bf16_exact(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double() == x


def test_scale_pair_and_products_are_exact_normal_bf16():
    """bf16(scale * 2^119) is exact for all 254 finite E4M3 bytes, and so is every e2m1 * that product."""
    scales = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    scales = scales[torch.isfinite(scales)]
    assert scales.numel() == 254
    scaled = scales * 2.0 ** 119
    assert bool(_bf16_exact(scaled).all())
    # the kernel's fp16 placement of the byte: s eeee mmm at bits 15 / 13..7 reads as scale * 2^-8
    b = torch.arange(256, dtype=torch.int32)
    f16 = (((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(torch.int16).view(torch.float16).double()
    ok = torch.isfinite(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double())
    assert torch.equal(f16[ok] * 2.0 ** 127, scaled)
    # weights as the kernel holds them (e2m1 * 2^-126, subnormal for 0.5) times the scale pair
    w = torch.tensor(E2M1_VALUES, dtype=torch.float64) * 2.0 ** -126
    assert bool(_bf16_exact(w).all())
    prod = w[:, None] * scaled[None, :]
    assert bool(_bf16_exact(prod).all())
    nonzero = prod[prod != 0].abs()
    assert float(nonzero.min()) >= torch.finfo(torch.bfloat16).tiny  # normal: nothing for a flush to lose
    assert torch.equal(prod * 2.0 ** 7, torch.tensor(E2M1_VALUES, dtype=torch.float64)[:, None] * scales[None, :])
